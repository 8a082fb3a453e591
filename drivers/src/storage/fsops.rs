//! Thin fd-relative syscall wrappers for the archive reader and writer.
//!
//! Everything below the root works on (directory fd, single name) pairs and
//! never follows a symlink: directories are opened with
//! `O_DIRECTORY | O_NOFOLLOW`, `*at` calls use `AT_SYMLINK_NOFOLLOW`, and
//! xattrs of inodes that must not be opened (symlinks, devices, FIFOs) go
//! through `/proc/self/fd/<dirfd>/<name>` with the `l*xattr` calls, which
//! resolve the directory by its fd and do not follow the final name.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub type Stat = libc::stat;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_sz(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in name"))
}

pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

pub fn openat(
    dir: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    loop {
        let r = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        match cvt(r) {
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Open the directory `name` in `dir`, refusing symlinks.
pub fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Open a top-level directory given by the (trusted) caller.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

pub fn fstat(fd: RawFd) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// `lstat` of `name` in `dir`.
pub fn fstatat(dir: RawFd, name: &CStr) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<Stat>::uninit();
    cvt(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// `fstatat` that maps "does not exist" to `None`.
pub fn try_fstatat(dir: RawFd, name: &CStr) -> io::Result<Option<Stat>> {
    match fstatat(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if errno(&e) == libc::ENOENT => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Names in a directory (without `.` and `..`), sorted bytewise.
pub fn list_dir(dir: RawFd) -> io::Result<Vec<Vec<u8>>> {
    let fd = cvt(unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) })?;
    let dp = unsafe { libc::fdopendir(fd) };
    if dp.is_null() {
        let e = io::Error::last_os_error();
        unsafe { libc::close(fd) };
        return Err(e);
    }
    unsafe { libc::rewinddir(dp) };
    let mut names = Vec::new();
    let res = loop {
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dp) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if errno(&e) == 0 { Ok(()) } else { Err(e) };
        }
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    unsafe { libc::closedir(dp) };
    res?;
    names.sort();
    Ok(names)
}

pub fn readlinkat(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = cvt_sz(unsafe {
        libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    if n >= buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "symlink target too long",
        ));
    }
    buf.truncate(n);
    Ok(buf)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, dev) }).map(drop)
}

/// Hard link; `flags == 0` so a symlink at `old` is linked, not followed.
pub fn linkat(old_dir: RawFd, old: &CStr, new_dir: RawFd, new: &CStr) -> io::Result<()> {
    cvt(unsafe { libc::linkat(old_dir, old.as_ptr(), new_dir, new.as_ptr(), 0) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, rmdir: bool) -> io::Result<()> {
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

/// Remove `name` in `dir` and, for a directory, everything below it, without
/// following symlinks. A missing `name` is not an error.
pub fn remove_all_at(dir: RawFd, name: &CStr) -> io::Result<()> {
    let Some(st) = try_fstatat(dir, name)? else {
        return Ok(());
    };
    if is_dir(&st) {
        let fd = open_dir_at(dir, name)?;
        for child in list_dir(fd.as_raw_fd())? {
            remove_all_at(fd.as_raw_fd(), &cstr(&child)?)?;
        }
        unlinkat(dir, name, true)
    } else {
        unlinkat(dir, name, false)
    }
}

pub fn fchown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchown(fd, uid, gid) }).map(drop)
}

pub fn lchownat(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmod(fd, mode as libc::mode_t) }).map(drop)
}

/// chmod of a name that is known not to be a symlink (Linux has no
/// `fchmodat(AT_SYMLINK_NOFOLLOW)`); the caller created it just before.
pub fn fchmodat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchmodat(dir, name.as_ptr(), mode as libc::mode_t, 0) }).map(drop)
}

fn times(sec: i64, nsec: u32) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as libc::c_long,
        },
    ]
}

/// Set the mtime (atime left alone).
pub fn futimens(fd: RawFd, sec: i64, nsec: u32) -> io::Result<()> {
    let t = times(sec, nsec);
    cvt(unsafe { libc::futimens(fd, t.as_ptr()) }).map(drop)
}

pub fn lutimensat(dir: RawFd, name: &CStr, sec: i64, nsec: u32) -> io::Result<()> {
    let t = times(sec, nsec);
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// Where an xattr operation applies.
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    /// An open file or directory.
    Fd(RawFd),
    /// A name in a directory, not followed (symlinks, devices, FIFOs).
    At(RawFd, &'a CStr),
}

fn proc_path(dir: RawFd, name: &CStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name.to_bytes());
    cstr(&p)
}

fn listxattr(t: XTarget, buf: &mut [u8], path: &Option<CString>) -> io::Result<usize> {
    let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
    cvt_sz(unsafe {
        match (t, path) {
            (XTarget::Fd(fd), _) => libc::flistxattr(fd, ptr, len),
            (_, Some(p)) => libc::llistxattr(p.as_ptr(), ptr, len),
            _ => unreachable!(),
        }
    })
}

fn getxattr(t: XTarget, path: &Option<CString>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let (ptr, len) = (buf.as_mut_ptr().cast(), buf.len());
    cvt_sz(unsafe {
        match (t, path) {
            (XTarget::Fd(fd), _) => libc::fgetxattr(fd, name.as_ptr(), ptr, len),
            (_, Some(p)) => libc::lgetxattr(p.as_ptr(), name.as_ptr(), ptr, len),
            _ => unreachable!(),
        }
    })
}

fn not_supported(e: &io::Error) -> bool {
    matches!(errno(e), libc::ENOTSUP | libc::ENOSYS)
}

/// All xattrs of an inode, sorted by name. Unsupported → empty.
pub fn get_xattrs(t: XTarget) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = match t {
        XTarget::Fd(_) => None,
        XTarget::At(dir, name) => Some(proc_path(dir, name)?),
    };
    let mut list = Vec::new();
    loop {
        let size = match listxattr(t, &mut [], &path) {
            Ok(s) => s,
            Err(e) if not_supported(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        list.resize(size, 0);
        match listxattr(t, &mut list, &path) {
            Ok(n) => {
                list.truncate(n);
                break;
            }
            Err(e) if errno(&e) == libc::ERANGE => continue, // grew meanwhile
            Err(e) => return Err(e),
        }
    }
    let mut out = Vec::new();
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = cstr(name)?;
        let mut val = Vec::new();
        let got = loop {
            let size = match getxattr(t, &path, &cname, &mut []) {
                Ok(s) => s,
                Err(e) if errno(&e) == libc::ENODATA => break false, // removed meanwhile
                Err(e) => return Err(e),
            };
            val.resize(size, 0);
            match getxattr(t, &path, &cname, &mut val) {
                Ok(n) => {
                    val.truncate(n);
                    break true;
                }
                Err(e) if errno(&e) == libc::ERANGE => continue,
                Err(e) if errno(&e) == libc::ENODATA => break false,
                Err(e) => return Err(e),
            }
        };
        if got {
            out.push((name.to_vec(), val));
        }
    }
    out.sort();
    Ok(out)
}

pub fn set_xattr(t: XTarget, name: &[u8], value: &[u8]) -> io::Result<()> {
    let cname = cstr(name)?;
    let (ptr, len) = (value.as_ptr().cast(), value.len());
    cvt(unsafe {
        match t {
            XTarget::Fd(fd) => libc::fsetxattr(fd, cname.as_ptr(), ptr, len, 0),
            XTarget::At(dir, n) => {
                let p = proc_path(dir, n)?;
                libc::lsetxattr(p.as_ptr(), cname.as_ptr(), ptr, len, 0)
            }
        }
    })
    .map(drop)
}

/// Errors meaning "this filesystem (or this caller) cannot store that xattr":
/// skipped with a warning rather than failing the extraction.
pub fn xattr_refused(e: &io::Error) -> bool {
    matches!(
        errno(e),
        libc::ENOTSUP | libc::EPERM | libc::EACCES | libc::EINVAL | libc::ERANGE | libc::E2BIG
    )
}

/// `lseek` with `SEEK_DATA` (or `SEEK_HOLE`): `Ok(None)` when there is no
/// data (hole) at or after `off` (ENXIO); an error when the filesystem
/// cannot tell (the caller then copies everything).
pub fn seek_data(fd: RawFd, off: u64, hole: bool) -> io::Result<Option<u64>> {
    let whence = if hole {
        libc::SEEK_HOLE
    } else {
        libc::SEEK_DATA
    };
    let r = unsafe { libc::lseek64(fd, off as libc::off64_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if errno(&e) == libc::ENXIO {
        Ok(None)
    } else {
        Err(e)
    }
}

pub fn pread(fd: RawFd, buf: &mut [u8], off: u64) -> io::Result<usize> {
    loop {
        let r = unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), buf.len(), off as i64) };
        match cvt_sz(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Flush the whole filesystem holding `fd` to stable storage.
pub fn syncfs(fd: RawFd) -> io::Result<()> {
    cvt(unsafe { libc::syncfs(fd) }).map(drop)
}
