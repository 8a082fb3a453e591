//! Host-side mounts: the volume's rootfs bind-mounted at a mount point in
//! the member's run dir (pivot_root and CRIU's `--root` need a mount point;
//! a per-member one lets two members share a volume).

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` (absolute, canonical) is a mount point in `mountinfo`.
pub fn is_mount_point_in(mountinfo: &str, path: &Path) -> bool {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape(m)) == path)
}

pub fn is_mount_point(path: &Path) -> bool {
    let Ok(p) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|mi| is_mount_point_in(&mi, &p))
        .unwrap_or(false)
}

/// Bind-mount `src` at `dst` (created if missing; private), unless `dst`
/// already is a mount point.
pub fn bind(src: &Path, dst: &Path) -> nix::Result<()> {
    if is_mount_point(dst) {
        return Ok(());
    }
    std::fs::create_dir_all(dst)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
}

/// Lazily unmount everything mounted at `path` (stacked mounts included).
pub fn unmount_all(path: &Path) -> nix::Result<()> {
    for _ in 0..16 {
        if !is_mount_point(path) {
            return Ok(());
        }
        umount2(path, MntFlags::MNT_DETACH)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lookup() {
        let mi = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
                  90 27 254:0 /x/rootfs /srv/my\\040dir/rootfs rw - ext4 /dev/vda rw\n";
        assert!(is_mount_point_in(mi, Path::new("/srv/my dir/rootfs")));
        assert!(is_mount_point_in(mi, Path::new("/")));
        assert!(!is_mount_point_in(mi, Path::new("/srv")));
        assert_eq!(unescape("a\\011b\\"), "a\tb\\");
    }
}
