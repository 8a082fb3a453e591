//! The container's console log: `/var/log/console.log` inside its rootfs.
//!
//! The forkstart child opens it (after `pivot_root`, so inside the
//! container's root) as the init's stdout and stderr; everything the init
//! and its children print lands there. Why a file in the rootfs and not a
//! host file in the member's logs dir: CRIU checkpoints an open regular file
//! by its path on the container's root mount and reopens it on restore under
//! `--root`, so it needs no external-file handling, and it travels with the
//! rootfs (stateful stop keeps it in the volume; a move copies it with the
//! archive, the final pass while the tree is frozen). The fd is
//! `O_WRONLY|O_APPEND`: CRIU skips its file-size check for exactly those
//! flags (a log file), so a log whose copy on the target differs in size
//! restores too, and writes always go to the end.
//!
//! Bounded: at each cold start, a log over [`MAX_BYTES`] is cut to its last
//! [`KEEP_BYTES`] (at a line boundary); the API returns at most the last
//! [`MAX_BYTES`]. The image's init prints little (see `image.rs`).
//!
//! The host reads the file from the volume without following symlinks or
//! opening anything but a regular file: the container controls that tree.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstatat, Mode, SFlag};

use super::{ContainerDriver, Layout};
use crate::*;

/// The console log, relative to the container's root.
pub const CONSOLE_LOG: &str = "var/log/console.log";
/// A log larger than this is cut at the next cold start; reads return at
/// most this many bytes (the end of the log).
pub const MAX_BYTES: u64 = 1 << 20;
/// What a cut keeps (the end of the log).
pub const KEEP_BYTES: u64 = 256 << 10;

/// The line that replaces what a cut dropped.
const CUT_NOTE: &[u8] = b"[ferry: older console output dropped]\n";

/// `buf` from just after its first newline (all of it if it has none).
fn from_line_start(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => &buf[i + 1..],
        None => buf,
    }
}

/// In the forkstart child, after `pivot_root`: create `/var/log` if needed,
/// cut an oversized log, and return the log opened for appending (to be
/// dup'ed onto fds 1 and 2). Symlinks and special files at the log's path
/// are refused.
pub(super) fn open_for_init() -> Result<std::fs::File, String> {
    let path = Path::new("/").join(CONSOLE_LOG);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    // O_NONBLOCK: a FIFO planted there must fail (ENXIO), not block.
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(&path)
    {
        Ok(f) => cut(&f).map_err(|e| format!("console log {}: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("console log {}: {e}", path.display())),
    }
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(flags)
        .open(&path)
        .map_err(|e| format!("console log {}: {e}", path.display()))?;
    regular(&f).map_err(|e| format!("console log {}: {e}", path.display()))?;
    // Back to blocking, keeping O_APPEND (CRIU records the flags).
    // SAFETY: plain fcntl on an fd we own.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::F_SETFL,
            libc::O_APPEND,
        )
    } != 0
    {
        return Err(format!(
            "console log: fcntl: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

fn regular(f: &std::fs::File) -> std::io::Result<u64> {
    let md = f.metadata()?;
    if !md.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(md.len())
}

/// Cut the log open in `f` to its last [`KEEP_BYTES`] if it is over
/// [`MAX_BYTES`] (nothing has it open: a cold start).
fn cut(f: &std::fs::File) -> std::io::Result<()> {
    let len = regular(f)?;
    if len <= MAX_BYTES {
        return Ok(());
    }
    let mut tail = vec![0u8; KEEP_BYTES as usize];
    f.read_exact_at(&mut tail, len - KEEP_BYTES)?;
    let mut out = CUT_NOTE.to_vec();
    out.extend_from_slice(from_line_start(&tail));
    f.write_all_at(&out, 0)?;
    f.set_len(out.len() as u64)
}

/// Open `name` in the directory `dir` without following a symlink.
fn open_in(dir: &OwnedFd, name: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    let fd = openat(
        Some(std::os::fd::AsRawFd::as_raw_fd(dir)),
        name,
        flags,
        Mode::empty(),
    )?;
    // SAFETY: openat just returned this fd; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read the console log of the rootfs at `rootfs` (a host path): at most
/// the last [`MAX_BYTES`], from a line start; empty if there is none yet.
/// Blocking.
pub fn read_log(rootfs: &Path) -> Result<Vec<u8>, DriverError> {
    let shown = rootfs.join(CONSOLE_LOG);
    let not_regular = || {
        DriverError::WrongState(format!(
            "the console log {} is not a regular file (a symlink or special file was put there)",
            shown.display()
        ))
    };
    let io = |e: Errno| -> DriverError {
        match e {
            Errno::ELOOP | Errno::ENOTDIR => not_regular(),
            e => DriverError::io(format!("read {}", shown.display()))(e.into()),
        }
    };
    let root = match std::fs::File::open(rootfs) {
        Ok(f) => OwnedFd::from(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DriverError::io(format!("open {}", rootfs.display()))(e)),
    };
    let mut dir = root;
    let mut parts: Vec<&str> = CONSOLE_LOG.split('/').collect();
    let file = parts.pop().unwrap_or_default();
    for part in parts {
        dir = match open_in(&dir, part, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(d) => d,
            Err(Errno::ENOENT) => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
    }
    // Look before opening: opening a device node can have side effects.
    let dirfd = std::os::fd::AsRawFd::as_raw_fd(&dir);
    match fstatat(Some(dirfd), file, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => {}
        Ok(_) => return Err(not_regular()),
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    }
    let fd = match open_in(&dir, file, OFlag::O_RDONLY | OFlag::O_NONBLOCK) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut f = std::fs::File::from(fd);
    let read = |e| DriverError::io(format!("read {}", shown.display()))(e);
    // Checked again on the open file (it may have been swapped meanwhile).
    let len = regular(&f).map_err(|_| not_regular())?;
    let start = len.saturating_sub(MAX_BYTES);
    f.seek(SeekFrom::Start(start)).map_err(read)?;
    let mut buf = Vec::with_capacity(len.min(MAX_BYTES) as usize);
    f.take(MAX_BYTES).read_to_end(&mut buf).map_err(read)?;
    if start > 0 {
        let skip = buf.len() - from_line_start(&buf).len();
        buf.drain(..skip);
    }
    Ok(buf)
}

impl ContainerDriver {
    /// The container's console log (what its init and the processes it
    /// started wrote to stdout/stderr), read from its volume: works whether
    /// it runs or not; empty before its first start. At most the last
    /// [`MAX_BYTES`].
    pub async fn console_log(&self, spec: &InstanceSpec) -> Result<Vec<u8>, DriverError> {
        let rootfs = Layout::of(spec).volume_rootfs;
        tokio::task::spawn_blocking(move || read_log(&rootfs))
            .await
            .map_err(|e| DriverError::Io {
                context: "console log read task".into(),
                source: std::io::Error::other(e),
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn rootfs_with_log(content: Option<&[u8]>) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("var/log")).unwrap();
        if let Some(c) = content {
            std::fs::write(t.path().join(CONSOLE_LOG), c).unwrap();
        }
        t
    }

    #[test]
    fn reads_the_log_or_nothing() {
        let t = rootfs_with_log(Some(b"init: booting\ncounter 100\n"));
        assert_eq!(read_log(t.path()).unwrap(), b"init: booting\ncounter 100\n");
        let empty = rootfs_with_log(None);
        assert!(read_log(empty.path()).unwrap().is_empty());
        let bare = tempfile::tempdir().unwrap();
        assert!(read_log(bare.path()).unwrap().is_empty());
        assert!(read_log(&bare.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn reads_only_the_end_of_a_big_log() {
        let mut big = Vec::new();
        let mut n = 0;
        while big.len() as u64 <= MAX_BYTES + 100 {
            big.extend_from_slice(format!("line {n}\n").as_bytes());
            n += 1;
        }
        let t = rootfs_with_log(Some(&big));
        let got = read_log(t.path()).unwrap();
        assert!(got.len() as u64 <= MAX_BYTES);
        assert!(got.starts_with(b"line ") && big.ends_with(&got));
        assert!(got.ends_with(format!("line {}\n", n - 1).as_bytes()));
    }

    #[test]
    fn refuses_symlinks_and_special_files() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "host secret").unwrap();
        // The file itself a symlink.
        let t = rootfs_with_log(None);
        symlink(secret.path(), t.path().join(CONSOLE_LOG)).unwrap();
        assert!(matches!(
            read_log(t.path()),
            Err(DriverError::WrongState(_))
        ));
        // A directory on the way a symlink.
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("elsewhere/log")).unwrap();
        std::fs::write(t.path().join("elsewhere/log/console.log"), "x").unwrap();
        symlink(t.path().join("elsewhere"), t.path().join("var")).unwrap();
        assert!(matches!(
            read_log(t.path()),
            Err(DriverError::WrongState(_))
        ));
        // A FIFO.
        let t = rootfs_with_log(None);
        nix::unistd::mkfifo(&t.path().join(CONSOLE_LOG), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            read_log(t.path()),
            Err(DriverError::WrongState(_))
        ));
    }

    #[test]
    fn cut_keeps_the_end_from_a_line_start() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("log");
        let mut big = Vec::new();
        let mut n = 0;
        while big.len() as u64 <= MAX_BYTES {
            big.extend_from_slice(format!("counter {n}\n").as_bytes());
            n += 1;
        }
        std::fs::write(&p, &big).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        cut(&f).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got.starts_with(CUT_NOTE));
        let kept = &got[CUT_NOTE.len()..];
        assert!(kept.len() as u64 <= KEEP_BYTES && kept.starts_with(b"counter "));
        assert!(big.ends_with(kept));
        // A small log is left alone.
        std::fs::write(&p, "a\nb\n").unwrap();
        cut(&f).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"a\nb\n");
    }
}
