//! Archive reader: extracts an untrusted archive below `dest`.
//!
//! Safety rests on three rules:
//! * every path is checked by [`format::path_problem`] (relative, no `..`,
//!   `.`, empty component or NUL, bounded length);
//! * parents are reached from the `dest` fd one component at a time with
//!   `O_DIRECTORY | O_NOFOLLOW`, and entries are created with `*at` calls that
//!   do not follow a final symlink (`O_EXCL | O_NOFOLLOW`, `mkdirat`,
//!   `symlinkat`, `mknodat`, `linkat` without `AT_SYMLINK_FOLLOW`), so nothing
//!   is ever created through a symlink, wherever it points;
//! * hard links name an earlier entry of the archive (in an incremental pass,
//!   also an existing non-directory of the tree), reached the same way.
//!
//! This assumes nobody else modifies `dest` during the extraction (the
//! container does not run there yet); the archive is the adversary.
//!
//! Directory metadata (owner, mode, xattrs, mtime) is applied at the end,
//! deepest first, so restrictive modes, setgid bits and default ACLs of a
//! directory do not affect the creation of its children, and children do not
//! disturb its mtime. In an incremental pass, directories whose content was
//! changed but which are not themselves in the archive get their previous
//! mtime back.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::rc::Rc;

use super::format::{self, path_problem, show, split_parent, Dec, Kind, Meta, ROOT};
use super::fsops::{self, errno, Stat, XTarget};
use super::{ArchiveError, ArchiveStats, ExtractOptions, Progress};

/// Extract the archive read from `input` into `dest`. Blocking.
///
/// A full archive needs `dest` absent (it is created) or an empty directory;
/// an incremental one needs the existing tree. Reads exactly up to the end of
/// the trailer and never beyond (wrap the input in a `BufReader` for speed).
/// On error `dest` is left partial; the caller removes it.
pub fn read_archive(
    input: impl Read,
    dest: &Path,
    opts: &ExtractOptions,
) -> Result<ArchiveStats, ArchiveError> {
    let mut dec = Dec::new(input);
    let mut magic = [0u8; 8];
    dec.raw(&mut magic).map_err(stream_err("the header"))?;
    if &magic != format::MAGIC {
        return Err(ArchiveError::BadMagic {
            found: show(&magic),
        });
    }
    let version = dec.u16().map_err(stream_err("the header"))?;
    if !(format::MIN_VERSION..=format::VERSION).contains(&version) {
        return Err(ArchiveError::UnsupportedVersion {
            found: version,
            min: format::MIN_VERSION,
            max: format::VERSION,
        });
    }
    let flags = dec.u16().map_err(stream_err("the header"))?;
    let reserved = dec.u32().map_err(stream_err("the header"))?;
    if flags & !format::KNOWN_FLAGS != 0 || reserved != 0 {
        return Err(ArchiveError::Malformed {
            context: "the header".into(),
            reason: format!("unknown flags {flags:#x} / reserved {reserved:#x}"),
        });
    }
    let incremental = flags & format::FLAG_INCREMENTAL != 0;
    let root = open_dest(dest, incremental)?;
    let mut x = Extractor {
        dec,
        opts,
        max_path: opts.max_path_len.min(format::MAX_PATH),
        incremental,
        root: Rc::new(root),
        cache: None,
        linkable: HashSet::new(),
        deferred: Vec::new(),
        touched: HashMap::new(),
        stats: ArchiveStats::default(),
        logical_bytes: 0,
        buf: vec![0u8; format::MAX_CHUNK],
        is_root: unsafe { libc::geteuid() } == 0,
        owner_warned: false,
    };
    x.run()?;
    if opts.sync {
        fsops::syncfs(x.root.as_raw_fd()).map_err(ArchiveError::io(b".", "syncfs"))?;
    }
    x.stats.archive_bytes = x.dec.n;
    Ok(x.stats)
}

fn stream_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
    let context = context.into();
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ArchiveError::Truncated { context },
        _ => ArchiveError::Stream(e),
    }
}

fn open_dest(dest: &Path, incremental: bool) -> Result<OwnedFd, ArchiveError> {
    let bad = |reason: String| ArchiveError::Destination {
        dest: dest.display().to_string(),
        reason,
    };
    if !incremental {
        match std::fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(dest).map_err(|e| bad(format!("create: {e}")))?;
            }
            Err(e) => return Err(bad(e.to_string())),
            Ok(md) if !md.is_dir() => return Err(bad("exists and is not a directory".into())),
            Ok(_) => {
                let mut it = std::fs::read_dir(dest).map_err(|e| bad(e.to_string()))?;
                if it.next().is_some() {
                    return Err(bad("a full archive needs an empty destination".into()));
                }
            }
        }
    }
    fsops::open_dir_path(dest).map_err(|e| bad(format!("open: {e}")))
}

/// Why a parent directory could not be reached.
enum Walk {
    Missing(Vec<u8>),
    Symlink(Vec<u8>),
    NotDir(Vec<u8>),
    Io(Vec<u8>, io::Error),
}

impl Walk {
    fn into_error(self, entry: &[u8]) -> ArchiveError {
        let (path, reason) = (show(entry), match self {
            Walk::Missing(p) => format!("parent directory `{}` does not exist (directories must come before their content)", show(&p)),
            Walk::Symlink(p) => format!("parent `{}` is a symlink; entries are never created through symlinks", show(&p)),
            Walk::NotDir(p) => format!("parent `{}` is not a directory", show(&p)),
            Walk::Io(p, e) => return ArchiveError::io(&p, "open directory")(e),
        });
        ArchiveError::Unsafe { path, reason }
    }
}

struct Extractor<'a, R: Read> {
    dec: Dec<R>,
    opts: &'a ExtractOptions,
    max_path: usize,
    incremental: bool,
    root: Rc<OwnedFd>,
    /// Last directory walked to (archives are in pre-order, so it is usually
    /// the parent of the next entry or the parent's parent).
    cache: Option<(Vec<u8>, Rc<OwnedFd>)>,
    /// Entries later hard links may name.
    linkable: HashSet<Vec<u8>>,
    deferred: Vec<(Vec<u8>, Meta)>,
    /// Incremental: directories modified here → their mtime before.
    touched: HashMap<Vec<u8>, (i64, u32)>,
    stats: ArchiveStats,
    logical_bytes: u64,
    buf: Vec<u8>,
    is_root: bool,
    owner_warned: bool,
}

impl<R: Read> Extractor<'_, R> {
    fn run(&mut self) -> Result<(), ArchiveError> {
        loop {
            let n = self.stats.entries + self.stats.deleted;
            let ctx = || format!("the record after {n} records");
            match self.dec.u8().map_err(stream_err(ctx()))? {
                format::TAG_ENTRY => self.entry()?,
                format::TAG_DELETE => self.delete()?,
                format::TAG_TRAILER => break,
                t => {
                    return Err(ArchiveError::Malformed {
                        context: ctx(),
                        reason: format!("unknown record tag {t:#04x}"),
                    })
                }
            }
        }
        let mut declared = [0u64; 3];
        for d in &mut declared {
            *d = self.dec.u64().map_err(stream_err("the trailer"))?;
        }
        let seen = [self.stats.entries, self.stats.deleted, self.stats.bytes];
        for (what, (d, s)) in ["entries", "deletions", "content bytes"]
            .into_iter()
            .zip(declared.into_iter().zip(seen))
        {
            if d != s {
                return Err(ArchiveError::Trailer {
                    what,
                    declared: d,
                    seen: s,
                });
            }
        }
        self.finish()
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("rootfs extraction: {msg}");
        self.stats.warnings.push(msg);
    }

    fn read_path(&mut self, context: &str) -> Result<Vec<u8>, ArchiveError> {
        let len = self.dec.u16().map_err(stream_err(context))?;
        self.dec.vec(len as usize).map_err(stream_err(context))
    }

    fn check_path(&self, p: &[u8]) -> Result<(), ArchiveError> {
        match path_problem(p, self.max_path) {
            None => Ok(()),
            Some(reason) => Err(ArchiveError::Unsafe {
                path: show(p),
                reason,
            }),
        }
    }

    fn count(&mut self, path: &[u8]) -> Result<(), ArchiveError> {
        let n = self.stats.entries + self.stats.deleted;
        match self.opts.max_entries {
            Some(max) if n > max => Err(ArchiveError::Limit {
                path: show(path),
                what: format!("more than {max} entries"),
            }),
            _ => Ok(()),
        }
    }

    fn entry(&mut self) -> Result<(), ArchiveError> {
        let n = self.stats.entries + 1;
        let path = self.read_path(&format!("the path of entry #{n}"))?;
        self.check_path(&path)?;
        self.stats.entries += 1;
        self.count(&path)?;
        let ctx = format!("entry `{}`", show(&path));
        let kind = self.dec.u8().map_err(stream_err(&ctx))?;
        let flags = self.dec.u8().map_err(stream_err(&ctx))?;
        let malformed = |reason: String| ArchiveError::Malformed {
            context: ctx.clone(),
            reason,
        };
        let kind =
            Kind::from_u8(kind).ok_or_else(|| malformed(format!("unknown entry kind {kind}")))?;
        if flags & !format::ENTRY_LINKABLE != 0 {
            return Err(malformed(format!("unknown entry flags {flags:#x}")));
        }
        if path == ROOT && kind != Kind::Dir {
            return Err(ArchiveError::Unsafe {
                path: show(&path),
                reason: "the root entry `.` must be a directory".into(),
            });
        }
        if kind == Kind::HardLink {
            let target = self.read_path(&ctx)?;
            self.hard_link(&path, &target)?;
        } else {
            let meta = self.meta(&ctx)?;
            match kind {
                Kind::Dir => self.dir(&path, meta)?,
                Kind::File => self.file(&path, meta, &ctx)?,
                Kind::Symlink => {
                    let target = self.read_path(&ctx)?;
                    if target.is_empty()
                        || target.len() > format::MAX_LINK_TARGET
                        || target.contains(&0)
                    {
                        return Err(malformed(
                            "symlink target empty, too long or containing NUL".into(),
                        ));
                    }
                    self.symlink(&path, meta, &target)?;
                }
                Kind::Char | Kind::Block | Kind::Fifo => {
                    let (mut major, mut minor) = (0, 0);
                    if kind != Kind::Fifo {
                        major = self.dec.u32().map_err(stream_err(&ctx))?;
                        minor = self.dec.u32().map_err(stream_err(&ctx))?;
                        if !self.opts.allow_devices {
                            return Err(ArchiveError::DeviceNotAllowed { path: show(&path) });
                        }
                    }
                    self.node(&path, meta, kind, libc::makedev(major, minor))?;
                }
                Kind::HardLink => unreachable!(),
            }
        }
        if flags & format::ENTRY_LINKABLE != 0 && kind != Kind::Dir {
            self.linkable.insert(path);
        }
        Progress::add(&self.opts.progress, 1, 0);
        Ok(())
    }

    fn meta(&mut self, ctx: &str) -> Result<Meta, ArchiveError> {
        let d = &mut self.dec;
        let e = || stream_err(ctx);
        let malformed = |reason: &str| ArchiveError::Malformed {
            context: ctx.into(),
            reason: reason.into(),
        };
        let mode = d.u32().map_err(e())?;
        if mode & !0o7777 != 0 {
            return Err(malformed("mode has bits beyond 0o7777"));
        }
        let uid = d.u32().map_err(e())?;
        let gid = d.u32().map_err(e())?;
        let mtime_sec = d.u64().map_err(e())? as i64;
        let mtime_nsec = d.u32().map_err(e())?;
        if mtime_nsec >= 1_000_000_000 {
            return Err(malformed("mtime nanoseconds out of range"));
        }
        let count = d.u16().map_err(e())? as usize;
        if count > format::MAX_XATTRS {
            return Err(malformed("too many xattrs"));
        }
        let mut xattrs = Vec::with_capacity(count);
        for _ in 0..count {
            let nlen = d.u8().map_err(e())? as usize;
            let name = d.vec(nlen).map_err(e())?;
            if name.is_empty() || name.contains(&0) {
                return Err(malformed("xattr name empty or containing NUL"));
            }
            let vlen = d.u32().map_err(e())? as usize;
            if vlen > format::MAX_XATTR_VALUE {
                return Err(malformed("xattr value longer than 64 KiB"));
            }
            xattrs.push((name, d.vec(vlen).map_err(e())?));
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            xattrs,
        })
    }

    /// Open directory `dir` (validated archive path; `""` or `.` = root)
    /// without following symlinks.
    fn open_dir(&mut self, dir: &[u8]) -> Result<Rc<OwnedFd>, Walk> {
        if dir.is_empty() || dir == ROOT {
            return Ok(self.root.clone());
        }
        let (mut cur, mut done) = (self.root.clone(), 0usize);
        if let Some((p, fd)) = &self.cache {
            if p == dir {
                return Ok(fd.clone());
            }
            if dir.starts_with(p) && dir[p.len()] == b'/' {
                (cur, done) = (fd.clone(), p.len() + 1);
            }
        }
        for comp in dir[done..].split(|&b| b == b'/') {
            let end = done + comp.len();
            let prefix = || dir[..end].to_vec();
            let c = fsops::cstr(comp).map_err(|e| Walk::Io(prefix(), e))?;
            cur = match fsops::open_dir_at(cur.as_raw_fd(), &c) {
                Ok(fd) => Rc::new(fd),
                Err(e) => {
                    return Err(match fsops::try_fstatat(cur.as_raw_fd(), &c) {
                        Ok(None) => Walk::Missing(prefix()),
                        Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                            Walk::Symlink(prefix())
                        }
                        Ok(Some(st)) if !fsops::is_dir(&st) => Walk::NotDir(prefix()),
                        _ => Walk::Io(prefix(), e),
                    })
                }
            };
            done = end + 1;
        }
        self.cache = Some((dir.to_vec(), cur.clone()));
        Ok(cur)
    }

    /// Parent fd, name and current state of `path`'s slot.
    fn slot(&mut self, path: &[u8]) -> Result<(Rc<OwnedFd>, CString, Option<Stat>), ArchiveError> {
        let (dir, name) = split_parent(path);
        let pfd = self.open_dir(dir).map_err(|w| w.into_error(path))?;
        let cname = fsops::cstr(name).map_err(ArchiveError::io(path, "name"))?;
        let existing =
            fsops::try_fstatat(pfd.as_raw_fd(), &cname).map_err(ArchiveError::io(path, "lstat"))?;
        Ok((pfd, cname, existing))
    }

    /// Record a directory's mtime before the first change to its content.
    fn touch(&mut self, path: &[u8], pfd: &OwnedFd) -> Result<(), ArchiveError> {
        let dir = match split_parent(path).0 {
            b"" => ROOT,
            d => d,
        };
        if self.incremental && !self.touched.contains_key(dir) {
            let st = fsops::fstat(pfd.as_raw_fd()).map_err(ArchiveError::io(dir, "fstat"))?;
            self.touched
                .insert(dir.to_vec(), (st.st_mtime, st.st_mtime_nsec as u32));
        }
        Ok(())
    }

    /// Make room for a new entry at `path`. Returns true when an existing
    /// directory is kept (a directory entry over a directory).
    fn make_room(
        &mut self,
        path: &[u8],
        slot: &(Rc<OwnedFd>, CString, Option<Stat>),
        new_is_dir: bool,
    ) -> Result<bool, ArchiveError> {
        let (pfd, cname, existing) = slot;
        let Some(st) = existing else {
            self.touch(path, pfd)?;
            return Ok(false);
        };
        if !self.incremental {
            return Err(ArchiveError::Malformed {
                context: format!("entry `{}`", show(path)),
                reason: "duplicate entry (the path already exists)".into(),
            });
        }
        if fsops::is_dir(st) && new_is_dir {
            return Ok(true);
        }
        self.touch(path, pfd)?;
        fsops::remove_all_at(pfd.as_raw_fd(), cname)
            .map_err(ArchiveError::io(path, "remove the old entry"))?;
        self.forget(path);
        Ok(false)
    }

    /// Drop the cached directory fd if it is `path` or below it.
    fn forget(&mut self, path: &[u8]) {
        if let Some((p, _)) = &self.cache {
            if p == path || (p.starts_with(path) && p[path.len()] == b'/') {
                self.cache = None;
            }
        }
    }

    fn dir(&mut self, path: &[u8], meta: Meta) -> Result<(), ArchiveError> {
        if path != ROOT {
            let slot = self.slot(path)?;
            if !self.make_room(path, &slot, true)? {
                fsops::mkdirat(slot.0.as_raw_fd(), &slot.1, 0o700)
                    .map_err(ArchiveError::io(path, "mkdir"))?;
            }
        }
        self.deferred.push((path.to_vec(), meta));
        Ok(())
    }

    fn add_bytes(&mut self, path: &[u8], n: u64) -> Result<(), ArchiveError> {
        self.logical_bytes = self.logical_bytes.saturating_add(n);
        match self.opts.max_total_bytes {
            Some(max) if self.logical_bytes > max => Err(ArchiveError::Limit {
                path: show(path),
                what: format!("more than {max} bytes of file content"),
            }),
            _ => Ok(()),
        }
    }

    fn file(&mut self, path: &[u8], meta: Meta, ctx: &str) -> Result<(), ArchiveError> {
        let slot = self.slot(path)?;
        self.make_room(path, &slot, false)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = fsops::openat(slot.0.as_raw_fd(), &slot.1, flags, 0o600)
            .map_err(ArchiveError::io(path, "create"))?;
        let mut f = File::from(fd);
        let (mut pos, mut hole_last) = (0u64, false);
        loop {
            match self.dec.u8().map_err(stream_err(ctx))? {
                format::CHUNK_DATA => {
                    let len = self.dec.u32().map_err(stream_err(ctx))? as usize;
                    if len > format::MAX_CHUNK {
                        return Err(ArchiveError::Malformed {
                            context: ctx.into(),
                            reason: format!("data chunk of {len} bytes"),
                        });
                    }
                    self.add_bytes(path, len as u64)?;
                    self.dec
                        .raw(&mut self.buf[..len])
                        .map_err(stream_err(ctx))?;
                    f.write_all(&self.buf[..len])
                        .map_err(ArchiveError::io(path, "write"))?;
                    pos += len as u64;
                    hole_last = false;
                    self.stats.bytes += len as u64;
                    Progress::add(&self.opts.progress, 0, len as u64);
                }
                format::CHUNK_HOLE => {
                    let len = self.dec.u64().map_err(stream_err(ctx))?;
                    self.add_bytes(path, len)?;
                    pos = pos
                        .checked_add(len)
                        .filter(|p| *p <= i64::MAX as u64)
                        .ok_or_else(|| ArchiveError::Malformed {
                            context: ctx.into(),
                            reason: "file size overflows".into(),
                        })?;
                    f.seek(SeekFrom::Start(pos))
                        .map_err(ArchiveError::io(path, "seek"))?;
                    hole_last = true;
                }
                format::CHUNK_END => break,
                t => {
                    return Err(ArchiveError::Malformed {
                        context: ctx.into(),
                        reason: format!("unknown chunk tag {t:#04x}"),
                    })
                }
            }
        }
        if hole_last {
            f.set_len(pos)
                .map_err(ArchiveError::io(path, "set length"))?;
        }
        self.apply_fd(f.as_raw_fd(), path, &meta)
    }

    fn symlink(&mut self, path: &[u8], meta: Meta, target: &[u8]) -> Result<(), ArchiveError> {
        let slot = self.slot(path)?;
        self.make_room(path, &slot, false)?;
        let (pfd, name) = (slot.0.as_raw_fd(), &slot.1);
        let t = fsops::cstr(target).map_err(ArchiveError::io(path, "symlink target"))?;
        fsops::symlinkat(&t, pfd, name).map_err(ArchiveError::io(path, "symlink"))?;
        let r = fsops::lchownat(pfd, name, meta.uid, meta.gid);
        self.owner(r, path)?;
        self.xattrs(XTarget::At(pfd, name), path, &meta)?;
        fsops::lutimensat(pfd, name, meta.mtime_sec, meta.mtime_nsec)
            .map_err(ArchiveError::io(path, "set mtime"))
    }

    fn node(
        &mut self,
        path: &[u8],
        meta: Meta,
        kind: Kind,
        dev: libc::dev_t,
    ) -> Result<(), ArchiveError> {
        let slot = self.slot(path)?;
        self.make_room(path, &slot, false)?;
        let (pfd, name) = (slot.0.as_raw_fd(), &slot.1);
        let fmt = match kind {
            Kind::Char => libc::S_IFCHR,
            Kind::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        fsops::mknodat(pfd, name, fmt | 0o600, dev).map_err(ArchiveError::io(path, "mknod"))?;
        let r = fsops::lchownat(pfd, name, meta.uid, meta.gid);
        self.owner(r, path)?;
        // Not a symlink: we just created it and nobody else writes here.
        fsops::fchmodat(pfd, name, meta.mode).map_err(ArchiveError::io(path, "chmod"))?;
        self.xattrs(XTarget::At(pfd, name), path, &meta)?;
        fsops::lutimensat(pfd, name, meta.mtime_sec, meta.mtime_nsec)
            .map_err(ArchiveError::io(path, "set mtime"))
    }

    fn hard_link(&mut self, path: &[u8], target: &[u8]) -> Result<(), ArchiveError> {
        let unsafe_link = |reason: String| ArchiveError::Unsafe {
            path: show(path),
            reason: format!("hard link target `{}`: {reason}", show(target)),
        };
        if let Some(r) = path_problem(target, self.max_path) {
            return Err(unsafe_link(r));
        }
        if target == ROOT {
            return Err(unsafe_link("the root cannot be hard linked".into()));
        }
        let known = self.linkable.contains(target);
        if !known && !self.incremental {
            return Err(unsafe_link("not an earlier entry of this archive".into()));
        }
        let tslot = self.slot(target).map_err(|e| match e {
            ArchiveError::Unsafe { reason, .. } => unsafe_link(reason),
            e => e,
        })?;
        match &tslot.2 {
            None => return Err(unsafe_link("does not exist".into())),
            Some(st) if fsops::is_dir(st) => return Err(unsafe_link("is a directory".into())),
            Some(_) => {}
        }
        let slot = self.slot(path)?;
        self.make_room(path, &slot, false)?;
        fsops::linkat(tslot.0.as_raw_fd(), &tslot.1, slot.0.as_raw_fd(), &slot.1).map_err(
            ArchiveError::io(path, format!("hard link to `{}`", show(target))),
        )
    }

    fn delete(&mut self) -> Result<(), ArchiveError> {
        let n = self.stats.deleted + 1;
        let path = self.read_path(&format!("the path of deletion #{n}"))?;
        self.check_path(&path)?;
        if path == ROOT {
            return Err(ArchiveError::Unsafe {
                path: show(&path),
                reason: "the root cannot be deleted".into(),
            });
        }
        if !self.incremental {
            return Err(ArchiveError::Malformed {
                context: format!("deletion of `{}`", show(&path)),
                reason: "deletions are only valid in an incremental archive".into(),
            });
        }
        self.stats.deleted += 1;
        self.count(&path)?;
        // A parent that is missing, a symlink or not a directory means the
        // path does not exist in the tree: nothing to delete.
        let (dir, name) = split_parent(&path);
        let pfd = match self.open_dir(dir) {
            Ok(fd) => fd,
            Err(Walk::Io(p, e)) => return Err(ArchiveError::io(&p, "open directory")(e)),
            Err(_) => return Ok(()),
        };
        let cname = fsops::cstr(name).map_err(ArchiveError::io(&path, "name"))?;
        if fsops::try_fstatat(pfd.as_raw_fd(), &cname)
            .map_err(ArchiveError::io(&path, "lstat"))?
            .is_some()
        {
            self.touch(&path, &pfd)?;
            fsops::remove_all_at(pfd.as_raw_fd(), &cname)
                .map_err(ArchiveError::io(&path, "delete"))?;
            self.forget(&path);
        }
        Ok(())
    }

    fn owner(&mut self, r: io::Result<()>, path: &[u8]) -> Result<(), ArchiveError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if !self.is_root && matches!(errno(&e), libc::EPERM | libc::EINVAL) => {
                if !self.owner_warned {
                    self.owner_warned = true;
                    self.warn("not running as root: ownership is not preserved".into());
                }
                Ok(())
            }
            Err(e) => Err(ArchiveError::io(path, "chown")(e)),
        }
    }

    fn xattrs(&mut self, t: XTarget, path: &[u8], meta: &Meta) -> Result<(), ArchiveError> {
        for (name, value) in &meta.xattrs {
            match fsops::set_xattr(t, name, value) {
                Ok(()) => {}
                Err(e) if fsops::xattr_refused(&e) => {
                    self.warn(format!(
                        "`{}`: xattr {} not stored: {e}",
                        show(path),
                        show(name)
                    ));
                }
                Err(e) => {
                    return Err(ArchiveError::io(path, format!("set xattr {}", show(name)))(
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Owner, then mode (chown clears setuid bits and capabilities), then
    /// xattrs (incl. security.capability), then mtime.
    fn apply_fd(&mut self, fd: RawFd, path: &[u8], meta: &Meta) -> Result<(), ArchiveError> {
        let r = fsops::fchown(fd, meta.uid, meta.gid);
        self.owner(r, path)?;
        fsops::fchmod(fd, meta.mode).map_err(ArchiveError::io(path, "chmod"))?;
        self.xattrs(XTarget::Fd(fd), path, meta)?;
        fsops::futimens(fd, meta.mtime_sec, meta.mtime_nsec)
            .map_err(ArchiveError::io(path, "set mtime"))
    }

    fn finish(&mut self) -> Result<(), ArchiveError> {
        let deferred = std::mem::take(&mut self.deferred);
        let in_archive: HashSet<&[u8]> = deferred.iter().map(|(p, _)| p.as_slice()).collect();
        let touched = std::mem::take(&mut self.touched);
        for (dir, (sec, nsec)) in &touched {
            if in_archive.contains(dir.as_slice()) {
                continue;
            }
            let fd = match self.open_dir(dir) {
                Ok(fd) => fd,
                Err(Walk::Io(p, e)) => return Err(ArchiveError::io(&p, "open directory")(e)),
                Err(_) => continue, // deleted later in the archive
            };
            fsops::futimens(fd.as_raw_fd(), *sec, *nsec)
                .map_err(ArchiveError::io(dir, "restore mtime"))?;
        }
        for (dir, meta) in deferred.iter().rev() {
            let fd = self.open_dir(dir).map_err(|w| w.into_error(dir))?;
            self.apply_fd(fd.as_raw_fd(), dir, meta)?;
        }
        Ok(())
    }
}
