//! The `busybox` image: a rootfs template built once from the host's
//! busybox-static into `<images>/busybox-rootfs`, copied into each
//! container's volume.

use std::io;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::DriverError;

/// The only container image.
pub const IMAGE: &str = "busybox";
/// Where the template comes from (Debian package busybox-static).
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// Bumped whenever the template's content changes; a stale template is rebuilt.
const TEMPLATE_VERSION: &str = "ferry busybox rootfs v2\n";
const VERSION_FILE: &str = "etc/ferry-image";

/// The container's init: bumps /counter about ten times a second. Its
/// stdout/stderr are the console log (`/var/log/console.log`), so it prints
/// little: a banner at boot, `counter N` every 100 ticks (~10 s) and on
/// SIGUSR1, a line when SIGTERM ends it. It traps TERM (a pid-1 shell
/// ignores signals it has no handler for) and exits.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# ferry busybox init: counter loop; exits on SIGTERM.
# stdout/stderr: the console log (ferry console --show-log NAME).
n=0
trap 'echo "init: SIGTERM at counter $n, exiting"; exit 0' TERM
trap 'echo "counter $n"' USR1
echo "init: ferry busybox container $(hostname) booting"
ip link set lo up 2>/dev/null
while :; do
  n=$((n+1))
  echo $n > /counter
  [ $((n % 100)) -eq 0 ] && echo "counter $n"
  sleep 0.1
done
"#;

pub fn template_dir(images: &Path) -> PathBuf {
    images.join("busybox-rootfs")
}

fn template_ok(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(VERSION_FILE))
        .map(|v| v == TEMPLATE_VERSION)
        .unwrap_or(false)
}

/// True when the ELF file at `path` has a PT_INTERP header (dynamically linked).
pub fn elf_is_dynamic(bytes: &[u8]) -> Option<bool> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return None; // not a 64-bit little-endian ELF
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().ok()?) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff.checked_add(i * phentsize)?;
        let p_type = u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?);
        if p_type == 3 {
            return Some(true);
        }
    }
    Some(false)
}

fn check_host_busybox() -> Result<(), DriverError> {
    let missing = |detail: String| DriverError::MissingTool {
        tool: "busybox-static".into(),
        detail,
    };
    let bytes = std::fs::read(HOST_BUSYBOX).map_err(|e| missing(format!("{HOST_BUSYBOX}: {e}")))?;
    match elf_is_dynamic(&bytes) {
        Some(false) => Ok(()),
        Some(true) => Err(missing(format!(
            "{HOST_BUSYBOX} is dynamically linked; install busybox-static"
        ))),
        None => Err(missing(format!(
            "{HOST_BUSYBOX} is not an x86-64 ELF binary"
        ))),
    }
}

/// Build the template if it is missing or stale. Blocking. Built in a
/// temporary directory and renamed into place, so concurrent builders and
/// crashes never leave a half-built template behind.
pub fn ensure_template(images: &Path) -> Result<PathBuf, DriverError> {
    let dir = template_dir(images);
    if template_ok(&dir) {
        return Ok(dir);
    }
    check_host_busybox()?;
    std::fs::create_dir_all(images)
        .map_err(DriverError::io(format!("create {}", images.display())))?;
    let tmp = images.join(format!(".busybox-rootfs.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let built = build_template(&tmp).map_err(DriverError::io(format!(
        "build rootfs template in {}",
        tmp.display()
    )));
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !template_ok(&dir) {
        // Stale: move it aside first (rename is atomic, removal is not).
        let old = images.join(format!(".busybox-rootfs.old-{}", std::process::id()));
        let _ = std::fs::rename(&dir, &old);
        let _ = std::fs::remove_dir_all(&old);
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if !template_ok(&dir) {
            return Err(DriverError::io(format!(
                "install rootfs template {}",
                dir.display()
            ))(e));
        }
        // Another builder won the race; use theirs.
    }
    Ok(dir)
}

fn applets() -> io::Result<Vec<String>> {
    let out = Command::new(HOST_BUSYBOX).arg("--list-full").output()?;
    if !out.status.success() {
        return Err(io::Error::other("busybox --list-full failed"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}

fn build_template(root: &Path) -> io::Result<()> {
    let mkdir = |rel: &str, mode: u32| -> io::Result<()> {
        let p = root.join(rel);
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
    };
    mkdir("", 0o755)?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "root", "var/run",
        "var/log",
    ] {
        mkdir(d, 0o755)?;
    }
    mkdir("tmp", 0o1777)?;
    std::fs::copy(HOST_BUSYBOX, root.join("bin/busybox"))?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    for applet in applets()? {
        let rel = applet.trim_start_matches('/');
        if rel.is_empty() || rel.contains("..") || rel == "bin/busybox" || rel == "sbin/init" {
            continue;
        }
        let link = root.join(rel);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if link.symlink_metadata().is_err() {
            symlink("/bin/busybox", &link)?;
        }
    }
    for (name, minor) in [("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)] {
        let p = root.join("dev").join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(1, minor),
        )
        .map_err(io::Error::from)?;
        // mknod is subject to the umask.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666))?;
    }
    let write = |rel: &str, content: &str, mode: u32| -> io::Result<()> {
        let p = root.join(rel);
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
    };
    write("sbin/init", INIT_SCRIPT, 0o755)?;
    write("etc/hostname", "busybox\n", 0o644)?;
    write("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n", 0o644)?;
    write(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )?;
    write("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    write(VERSION_FILE, TEMPLATE_VERSION, 0o644)
}

/// Copy a tree preserving file types (dirs, files, symlinks, device nodes,
/// fifos), modes and ownership. Blocking. `dst` must not exist.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let md = src.symlink_metadata()?;
    let ft = md.file_type();
    if ft.is_dir() {
        std::fs::create_dir(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
    } else if ft.is_symlink() {
        symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_file() {
        std::fs::copy(src, dst)?;
    } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
        let kind = if ft.is_char_device() {
            SFlag::S_IFCHR
        } else if ft.is_block_device() {
            SFlag::S_IFBLK
        } else {
            SFlag::S_IFIFO
        };
        mknod(dst, kind, Mode::from_bits_truncate(md.mode()), md.rdev())
            .map_err(io::Error::from)?;
    } else {
        return Ok(()); // sockets are not copied
    }
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))?;
    if !ft.is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(md.mode() & 0o7777))?;
    }
    Ok(())
}

/// Give the copied rootfs the instance's host name.
pub fn personalize(rootfs: &Path, name: &str) -> io::Result<()> {
    std::fs::write(rootfs.join("etc/hostname"), format!("{name}\n"))?;
    std::fs::write(
        rootfs.join("etc/hosts"),
        format!("127.0.0.1 localhost {name}\n::1 localhost\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_detection() {
        assert_eq!(elf_is_dynamic(b"#!/bin/sh\n"), None);
        // The test binary itself is a dynamically linked x86-64 ELF.
        if cfg!(all(target_arch = "x86_64", target_env = "gnu")) {
            let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
            assert_eq!(elf_is_dynamic(&me), Some(true));
        }
    }

    #[test]
    fn copies_tree_with_symlinks_and_modes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        std::fs::create_dir_all(src.join("a/b")).unwrap();
        std::fs::write(src.join("a/b/f"), "hi").unwrap();
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        symlink("/bin/busybox", src.join("a/sh")).unwrap();
        std::fs::set_permissions(src.join("a"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let dst = t.path().join("dst");
        copy_tree(&src, &dst).unwrap();
        assert_eq!(std::fs::read_to_string(dst.join("a/b/f")).unwrap(), "hi");
        assert_eq!(
            std::fs::metadata(dst.join("a/b/f")).unwrap().mode() & 0o7777,
            0o750
        );
        assert_eq!(
            std::fs::metadata(dst.join("a")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            std::fs::read_link(dst.join("a/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
    }

    #[test]
    fn init_script_traps_term() {
        assert!(INIT_SCRIPT.contains("exit 0' TERM"));
        assert!(INIT_SCRIPT.contains("> /counter"));
        assert!(INIT_SCRIPT.contains("' USR1"));
    }
}
