//! Archive writer: walks the rootfs through directory fds (never following a
//! symlink, so a container rewriting its tree during the first pass cannot
//! make us read host files) and streams entries in pre-order, children
//! sorted by name.
//!
//! Incremental passes compare each path's stat with the [`Manifest`] of the
//! previous pass. Both stats come from this member's own kernel, so the
//! target's clock never matters. A path is resent when its type, inode,
//! size, mode, owner, link count, mtime or ctime changed — ctime cannot be
//! set from user space, so `touch -d` cannot hide a change — or when it was
//! "racy": its mtime/ctime was within [`RACY_SECS`] of the moment the
//! previous pass started, where a later change within the same timestamp
//! tick could have left the stat identical (git's "racy clean" problem).
//! On local filesystems with nanosecond timestamps (ext4, xfs, btrfs,
//! tmpfs) the window is [`RACY_FINE_MS`] instead: their timestamps come from
//! the kernel's coarse clock, at most one jiffy (≤ 10 ms) behind, so any
//! change after an entry was read gets a timestamp newer than one that was
//! already 100 ms old when the pass started. (A container launched a moment
//! before its move would otherwise resend its whole rootfs while frozen.)
//! Entries without sub-second timestamps (e.g. ext4 with 128-byte inodes)
//! keep the 2 s window.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{self, show, Enc, Kind, Meta, ENTRY_LINKABLE, MAX_CHUNK, MAX_PATH, ROOT};
use super::fsops::{self, errno, Stat, XTarget};
use super::{ArchiveError, ArchiveOptions, ArchiveStats, Progress};

/// Entries whose mtime/ctime is this close to the start of the pass that
/// recorded them are always resent by the next pass.
pub const RACY_SECS: i64 = 2;
/// The window on filesystems with fine timestamps (see the module doc).
pub const RACY_FINE_MS: i64 = 100;

/// When a pass started, and whether its filesystem has fine timestamps.
#[derive(Clone, Copy)]
struct PassClock {
    secs: i64,
    nanos: i128,
    fine_fs: bool,
}

impl PassClock {
    fn now(root_fd: RawFd) -> PassClock {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        PassClock {
            secs: d.as_secs() as i64,
            nanos: d.as_nanos() as i128,
            fine_fs: fine_timestamps(root_fd),
        }
    }
}

/// Local filesystems whose timestamps have nanoseconds from the kernel's
/// clock (not a server's).
pub(super) fn fine_timestamps(fd: RawFd) -> bool {
    const EXT: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into the struct we own.
    if unsafe { libc::fstatfs(fd, &mut sfs) } != 0 {
        return false;
    }
    matches!(sfs.f_type as i64, EXT | XFS | BTRFS | TMPFS)
}

/// What one pass saw of each path, keyed by archive path (`.` = root).
#[derive(Clone, Default)]
pub struct Manifest {
    entries: HashMap<Vec<u8>, Stamp>,
}

impl Manifest {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// True when `path` (relative to the root, `.` for the root) was seen.
    pub fn contains(&self, path: &Path) -> bool {
        self.entries.contains_key(path.as_os_str().as_bytes())
    }
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Manifest({} paths)", self.entries.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    mode: u32,
    ino: u64,
    nlink: u64,
    size: i64,
    uid: u32,
    gid: u32,
    rdev: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    racy: bool,
}

impl Stamp {
    fn new(st: &Stat, clock: PassClock) -> Stamp {
        let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
        let fine = clock.fine_fs && (st.st_mtime_nsec != 0 || st.st_ctime_nsec != 0);
        let racy = if fine {
            let newest = ns(st.st_mtime, st.st_mtime_nsec).max(ns(st.st_ctime, st.st_ctime_nsec));
            newest + RACY_FINE_MS as i128 * 1_000_000 >= clock.nanos
        } else {
            st.st_mtime.max(st.st_ctime) + RACY_SECS >= clock.secs
        };
        Stamp {
            mode: st.st_mode,
            ino: st.st_ino,
            nlink: st.st_nlink,
            size: st.st_size,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
            racy,
        }
    }
    fn same_as(&self, now: &Stamp) -> bool {
        !self.racy
            && Stamp {
                racy: false,
                ..*now
            } == *self
    }
}

fn meta_of(st: &Stat, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
        xattrs,
    }
}

/// Write an archive of the tree at `root` to `out`. Blocking.
///
/// Output is buffered internally and flushed at the end. A full archive
/// starts with the root entry `.`; an incremental one (`opts.base`) carries
/// only changed entries, then the deleted paths (deepest first).
pub fn write_archive(
    root: &Path,
    out: impl Write,
    opts: &ArchiveOptions,
) -> Result<ArchiveStats, ArchiveError> {
    let root_b = root.as_os_str().as_bytes();
    let rootfd = fsops::open_dir_path(root).map_err(ArchiveError::io(root_b, "open root"))?;
    let st = fsops::fstat(rootfd.as_raw_fd()).map_err(ArchiveError::io(root_b, "stat root"))?;
    let pass_start = PassClock::now(rootfd.as_raw_fd());
    let mut w = Writer {
        enc: Enc::new(BufWriter::with_capacity(256 << 10, out)),
        opts,
        root_dev: st.st_dev,
        pass_start,
        links: HashMap::new(),
        seen: (opts.record_manifest || opts.base.is_some()).then(Manifest::default),
        stats: ArchiveStats::default(),
        buf: vec![0u8; MAX_CHUNK],
    };
    let flags = if opts.base.is_some() {
        format::FLAG_INCREMENTAL
    } else {
        0
    };
    w.enc.header(flags).map_err(ArchiveError::Stream)?;

    let stamp = Stamp::new(&st, pass_start);
    let changed = w.changed(ROOT, &stamp);
    w.record(ROOT, stamp);
    w.dir(rootfd.as_raw_fd(), &st, ROOT, changed)?;

    if let Some(base) = &opts.base {
        let seen = w
            .seen
            .as_ref()
            .expect("manifest kept for incremental passes");
        let mut gone: Vec<&Vec<u8>> = base
            .entries
            .keys()
            .filter(|p| !seen.entries.contains_key(*p))
            .collect();
        // Reverse bytewise order puts `a/b` before `a`.
        gone.sort_unstable_by(|a, b| b.cmp(a));
        for p in gone {
            w.enc.delete(p).map_err(ArchiveError::Stream)?;
            w.stats.deleted += 1;
        }
    }
    let (entries, deleted, bytes) = (w.stats.entries, w.stats.deleted, w.stats.bytes);
    w.enc
        .trailer(entries, deleted, bytes)
        .map_err(ArchiveError::Stream)?;
    w.enc.w.flush().map_err(ArchiveError::Stream)?;
    let mut stats = w.stats;
    stats.archive_bytes = w.enc.n;
    if opts.record_manifest {
        stats.manifest = w.seen;
    }
    Ok(stats)
}

struct Writer<'a, W: Write> {
    enc: Enc<BufWriter<W>>,
    opts: &'a ArchiveOptions,
    root_dev: u64,
    pass_start: PassClock,
    /// (dev, ino) of inodes with several names → first path seen.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Manifest of this pass (kept when recording or incremental).
    seen: Option<Manifest>,
    stats: ArchiveStats,
    buf: Vec<u8>,
}

/// Errors meaning the entry changed under us (the container is running).
fn raced(e: &std::io::Error) -> bool {
    matches!(
        errno(e),
        libc::ENOENT | libc::ELOOP | libc::ENOTDIR | libc::ENXIO
    )
}

impl<W: Write> Writer<'_, W> {
    fn warn(&mut self, msg: String) {
        tracing::warn!("rootfs archive: {msg}");
        self.stats.warnings.push(msg);
    }

    fn changed(&self, rel: &[u8], now: &Stamp) -> bool {
        match &self.opts.base {
            None => true,
            Some(base) => !base.entries.get(rel).is_some_and(|old| old.same_as(now)),
        }
    }

    fn record(&mut self, rel: &[u8], stamp: Stamp) {
        if let Some(m) = &mut self.seen {
            m.entries.insert(rel.to_vec(), stamp);
        }
    }

    /// The entry changed while being read: warn, and make sure the next pass
    /// resends it.
    fn race(&mut self, rel: &[u8], what: &str) {
        if let Some(s) = self.seen.as_mut().and_then(|m| m.entries.get_mut(rel)) {
            s.racy = true;
        }
        // Not sent, so it cannot be the name later hard links refer to
        // (rare: only when a multiply-linked inode changes under us).
        self.links.retain(|_, first| first.as_slice() != rel);
        self.warn(format!(
            "`{}` {what} while being archived; left to the next pass",
            show(rel)
        ));
    }

    fn start(&mut self, rel: &[u8], kind: Kind, st: &Stat) -> Result<(), ArchiveError> {
        let flags = if kind != Kind::Dir && st.st_nlink > 1 {
            ENTRY_LINKABLE
        } else {
            0
        };
        self.enc
            .entry_start(rel, kind, flags)
            .map_err(ArchiveError::Stream)?;
        self.stats.entries += 1;
        Progress::add(&self.opts.progress, 1, 0);
        Ok(())
    }

    fn meta(&mut self, m: &Meta, rel: &[u8]) -> Result<(), ArchiveError> {
        let too_big = m.xattrs.len() > format::MAX_XATTRS
            || m.xattrs.iter().any(|(n, v)| {
                n.len() > format::MAX_XATTR_NAME || v.len() > format::MAX_XATTR_VALUE
            });
        if too_big {
            return Err(ArchiveError::Limit {
                path: show(rel),
                what: "xattrs exceed the format's limits".into(),
            });
        }
        self.enc.meta(m).map_err(ArchiveError::Stream)
    }

    /// For an inode with several names: the first name seen, if any
    /// (otherwise this one becomes the first).
    fn earlier_name(&mut self, st: &Stat, rel: &[u8]) -> Option<Vec<u8>> {
        if st.st_nlink < 2 {
            return None;
        }
        let key = (st.st_dev, st.st_ino);
        if let Some(first) = self.links.get(&key) {
            return Some(first.clone());
        }
        self.links.insert(key, rel.to_vec());
        None
    }

    fn hard_link(&mut self, rel: &[u8], target: &[u8]) -> Result<(), ArchiveError> {
        self.enc
            .entry_start(rel, Kind::HardLink, 0)
            .map_err(ArchiveError::Stream)?;
        self.enc.bytes16(target).map_err(ArchiveError::Stream)?;
        self.stats.entries += 1;
        Progress::add(&self.opts.progress, 1, 0);
        Ok(())
    }

    /// A directory (already opened as `fd`): its entry, then its children.
    fn dir(&mut self, fd: RawFd, st: &Stat, rel: &[u8], changed: bool) -> Result<(), ArchiveError> {
        if changed {
            let x =
                fsops::get_xattrs(XTarget::Fd(fd)).map_err(ArchiveError::io(rel, "read xattrs"))?;
            self.start(rel, Kind::Dir, st)?;
            self.meta(&meta_of(st, x), rel)?;
        }
        if self.opts.one_file_system && st.st_dev != self.root_dev {
            if changed {
                self.warn(format!(
                    "`{}` is a mount point; its content is not archived",
                    show(rel)
                ));
            }
            return Ok(());
        }
        let names = fsops::list_dir(fd).map_err(ArchiveError::io(rel, "read directory"))?;
        for name in names {
            let mut child = Vec::with_capacity(rel.len() + 1 + name.len());
            if rel != ROOT {
                child.extend_from_slice(rel);
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            if child.len() > MAX_PATH {
                return Err(ArchiveError::Limit {
                    path: show(&child),
                    what: format!("path longer than {MAX_PATH} bytes"),
                });
            }
            self.visit(fd, &name, &child)?;
        }
        Ok(())
    }

    fn visit(&mut self, dir: RawFd, name: &[u8], rel: &[u8]) -> Result<(), ArchiveError> {
        let cname = fsops::cstr(name).map_err(ArchiveError::io(rel, "name"))?;
        let st = match fsops::fstatat(dir, &cname) {
            Ok(st) => st,
            Err(e) if raced(&e) => {
                self.warn(format!("`{}` vanished while being archived", show(rel)));
                return Ok(());
            }
            Err(e) => return Err(ArchiveError::io(rel, "lstat")(e)),
        };
        let stamp = Stamp::new(&st, self.pass_start);
        let changed = self.changed(rel, &stamp);
        self.record(rel, stamp);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => match fsops::open_dir_at(dir, &cname) {
                Ok(fd) => self.dir(fd.as_raw_fd(), &st, rel, changed),
                Err(e) if raced(&e) => {
                    self.race(rel, "changed type");
                    Ok(())
                }
                Err(e) => Err(ArchiveError::io(rel, "open directory")(e)),
            },
            libc::S_IFREG => self.file(dir, &cname, &st, rel, changed),
            libc::S_IFLNK => {
                if let Some(first) = self.earlier_name(&st, rel) {
                    return if changed {
                        self.hard_link(rel, &first)
                    } else {
                        Ok(())
                    };
                }
                if !changed {
                    return Ok(());
                }
                let target = match fsops::readlinkat(dir, &cname) {
                    Ok(t) => t,
                    Err(e) if raced(&e) || errno(&e) == libc::EINVAL => {
                        self.race(rel, "changed type");
                        return Ok(());
                    }
                    Err(e) => return Err(ArchiveError::io(rel, "readlink")(e)),
                };
                let x = fsops::get_xattrs(XTarget::At(dir, &cname))
                    .map_err(ArchiveError::io(rel, "read xattrs"))?;
                self.start(rel, Kind::Symlink, &st)?;
                self.meta(&meta_of(&st, x), rel)?;
                self.enc.bytes16(&target).map_err(ArchiveError::Stream)
            }
            fmt @ (libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO) => {
                if let Some(first) = self.earlier_name(&st, rel) {
                    return if changed {
                        self.hard_link(rel, &first)
                    } else {
                        Ok(())
                    };
                }
                if !changed {
                    return Ok(());
                }
                let x = fsops::get_xattrs(XTarget::At(dir, &cname))
                    .map_err(ArchiveError::io(rel, "read xattrs"))?;
                let kind = match fmt {
                    libc::S_IFCHR => Kind::Char,
                    libc::S_IFBLK => Kind::Block,
                    _ => Kind::Fifo,
                };
                self.start(rel, kind, &st)?;
                self.meta(&meta_of(&st, x), rel)?;
                if kind != Kind::Fifo {
                    let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
                    self.enc.u32(major).map_err(ArchiveError::Stream)?;
                    self.enc.u32(minor).map_err(ArchiveError::Stream)?;
                }
                Ok(())
            }
            _ => {
                self.warn(format!("`{}` is a socket; not archived", show(rel)));
                Ok(())
            }
        }
    }

    fn file(
        &mut self,
        dir: RawFd,
        cname: &std::ffi::CStr,
        st: &Stat,
        rel: &[u8],
        changed: bool,
    ) -> Result<(), ArchiveError> {
        if let Some(first) = self.earlier_name(st, rel) {
            return if changed {
                self.hard_link(rel, &first)
            } else {
                Ok(())
            };
        }
        if !changed {
            return Ok(());
        }
        // O_NONBLOCK/O_NOCTTY: if the name was swapped for a FIFO or a
        // terminal meanwhile, opening must neither block nor have effects.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
        let fd = match fsops::openat(dir, cname, flags, 0) {
            Ok(fd) => fd,
            Err(e) if raced(&e) => {
                self.race(rel, "vanished");
                return Ok(());
            }
            Err(e) => return Err(ArchiveError::io(rel, "open")(e)),
        };
        let fd = fd.as_raw_fd();
        let now = fsops::fstat(fd).map_err(ArchiveError::io(rel, "fstat"))?;
        if now.st_mode & libc::S_IFMT != libc::S_IFREG || now.st_ino != st.st_ino {
            self.race(rel, "was replaced");
            return Ok(());
        }
        let x = fsops::get_xattrs(XTarget::Fd(fd)).map_err(ArchiveError::io(rel, "read xattrs"))?;
        self.start(rel, Kind::File, st)?;
        self.meta(&meta_of(st, x), rel)?;
        self.content(fd, now.st_size.max(0) as u64, rel)
    }

    /// File data as chunks, up to the size seen at open (the file may change
    /// meanwhile; the next pass then resends it).
    fn content(&mut self, fd: RawFd, size: u64, rel: &[u8]) -> Result<(), ArchiveError> {
        let stream = ArchiveError::Stream;
        let mut sparse = self.opts.sparse;
        let mut off = 0u64;
        'outer: while off < size {
            if sparse {
                match fsops::seek_data(fd, off, false) {
                    Ok(None) => {
                        self.enc.chunk_hole(size - off).map_err(stream)?;
                        break;
                    }
                    Ok(Some(data)) if data > off => {
                        let data = data.min(size);
                        self.enc.chunk_hole(data - off).map_err(stream)?;
                        off = data;
                        continue;
                    }
                    Ok(Some(_)) => {}
                    Err(_) => sparse = false,
                }
            }
            let end = match sparse {
                true => fsops::seek_data(fd, off, true)
                    .ok()
                    .flatten()
                    .unwrap_or(size)
                    .min(size),
                false => size,
            };
            while off < end {
                let want = (end - off).min(MAX_CHUNK as u64) as usize;
                let n = fsops::pread(fd, &mut self.buf[..want], off)
                    .map_err(ArchiveError::io(rel, "read"))?;
                if n == 0 {
                    break 'outer; // shrank meanwhile
                }
                self.enc.chunk_data(&self.buf[..n]).map_err(stream)?;
                off += n as u64;
                self.stats.bytes += n as u64;
                Progress::add(&self.opts.progress, 0, n as u64);
            }
        }
        self.enc.chunk_end().map_err(stream)
    }
}
