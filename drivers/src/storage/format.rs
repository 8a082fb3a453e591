//! Wire encoding of the rootfs archive (see `doc/archive-format.md`).
//!
//! All integers are little-endian. Lengths are checked against the limits
//! below *before* anything is allocated, so a hostile length cannot make the
//! reader allocate more than a chunk.

use std::io::{self, Read, Write};

/// First 8 bytes of every archive.
pub const MAGIC: &[u8; 8] = b"FERRYARC";
/// Format version written by this build.
pub const VERSION: u16 = 1;
/// Oldest format version this build reads.
pub const MIN_VERSION: u16 = 1;

/// Header flag: the archive is an incremental pass over an existing tree.
pub const FLAG_INCREMENTAL: u16 = 1;
pub const KNOWN_FLAGS: u16 = FLAG_INCREMENTAL;

pub const TAG_ENTRY: u8 = b'E';
pub const TAG_DELETE: u8 = b'X';
pub const TAG_TRAILER: u8 = b'T';

pub const CHUNK_DATA: u8 = b'D';
pub const CHUNK_HOLE: u8 = b'H';
pub const CHUNK_END: u8 = b'Z';

/// Entry flag: the inode has more than one name; later names may be hard
/// links to this entry.
pub const ENTRY_LINKABLE: u8 = 1;

/// Largest data chunk.
pub const MAX_CHUNK: usize = 1 << 20;
/// Hard upper bound of a path (the reader's `max_path_len` may be lower).
pub const MAX_PATH: usize = 4096;
/// Largest symlink target (PATH_MAX - 1).
pub const MAX_LINK_TARGET: usize = 4095;
pub const MAX_XATTRS: usize = 1024;
pub const MAX_XATTR_NAME: usize = 255;
/// Linux's XATTR_SIZE_MAX.
pub const MAX_XATTR_VALUE: usize = 65536;

/// The path of the root directory entry.
pub const ROOT: &[u8] = b".";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Dir = 1,
    File = 2,
    Symlink = 3,
    HardLink = 4,
    Char = 5,
    Block = 6,
    Fifo = 7,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::HardLink,
            5 => Kind::Char,
            6 => Kind::Block,
            7 => Kind::Fifo,
            _ => return None,
        })
    }
}

/// Inode metadata carried by every entry except hard links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits only (`& 0o7777`, incl. setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// (name, value) pairs, e.g. `security.capability`, `user.*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Writer side: counts bytes written.
pub struct Enc<W: Write> {
    pub w: W,
    pub n: u64,
}

impl<W: Write> Enc<W> {
    pub fn new(w: W) -> Self {
        Enc { w, n: 0 }
    }
    pub fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }
    pub fn u8(&mut self, v: u8) -> io::Result<()> {
        self.raw(&[v])
    }
    pub fn u16(&mut self, v: u16) -> io::Result<()> {
        self.raw(&v.to_le_bytes())
    }
    pub fn u32(&mut self, v: u32) -> io::Result<()> {
        self.raw(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> io::Result<()> {
        self.raw(&v.to_le_bytes())
    }
    /// Byte string with a u16 length prefix.
    pub fn bytes16(&mut self, b: &[u8]) -> io::Result<()> {
        let len = u16::try_from(b.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string longer than 65535"))?;
        self.u16(len)?;
        self.raw(b)
    }

    pub fn header(&mut self, flags: u16) -> io::Result<()> {
        self.raw(MAGIC)?;
        self.u16(VERSION)?;
        self.u16(flags)?;
        self.u32(0)
    }

    /// Entry prefix: tag, path, kind, flags.
    pub fn entry_start(&mut self, path: &[u8], kind: Kind, flags: u8) -> io::Result<()> {
        self.u8(TAG_ENTRY)?;
        self.bytes16(path)?;
        self.u8(kind as u8)?;
        self.u8(flags)
    }

    pub fn meta(&mut self, m: &Meta) -> io::Result<()> {
        self.u32(m.mode)?;
        self.u32(m.uid)?;
        self.u32(m.gid)?;
        self.u64(m.mtime_sec as u64)?;
        self.u32(m.mtime_nsec)?;
        self.u16(m.xattrs.len() as u16)?;
        for (name, value) in &m.xattrs {
            self.u8(name.len() as u8)?;
            self.raw(name)?;
            self.u32(value.len() as u32)?;
            self.raw(value)?;
        }
        Ok(())
    }

    pub fn chunk_data(&mut self, data: &[u8]) -> io::Result<()> {
        self.u8(CHUNK_DATA)?;
        self.u32(data.len() as u32)?;
        self.raw(data)
    }
    pub fn chunk_hole(&mut self, len: u64) -> io::Result<()> {
        self.u8(CHUNK_HOLE)?;
        self.u64(len)
    }
    pub fn chunk_end(&mut self) -> io::Result<()> {
        self.u8(CHUNK_END)
    }

    pub fn delete(&mut self, path: &[u8]) -> io::Result<()> {
        self.u8(TAG_DELETE)?;
        self.bytes16(path)
    }

    pub fn trailer(&mut self, entries: u64, deleted: u64, bytes: u64) -> io::Result<()> {
        self.u8(TAG_TRAILER)?;
        self.u64(entries)?;
        self.u64(deleted)?;
        self.u64(bytes)
    }
}

/// Reader side: reads exactly what it is asked for (never buffers ahead), so
/// the stream can carry more data after the trailer.
pub struct Dec<R: Read> {
    pub r: R,
    pub n: u64,
}

impl<R: Read> Dec<R> {
    pub fn new(r: R) -> Self {
        Dec { r, n: 0 }
    }
    pub fn raw(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.r.read_exact(buf)?;
        self.n += buf.len() as u64;
        Ok(())
    }
    pub fn u8(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.raw(&mut b)?;
        Ok(b[0])
    }
    pub fn u16(&mut self) -> io::Result<u16> {
        let mut b = [0u8; 2];
        self.raw(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.raw(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.raw(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Read `len` bytes into a new vector; the caller has bounded `len`.
    pub fn vec(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.raw(&mut v)?;
        Ok(v)
    }
}

/// Why a path from the archive is refused, or `None` when it is acceptable:
/// relative, `/`-separated, no empty, `.` or `..` component, no NUL. The root
/// itself is the single path `.`.
pub fn path_problem(p: &[u8], max_len: usize) -> Option<String> {
    if p.is_empty() {
        return Some("empty path".into());
    }
    if p.len() > max_len {
        return Some(format!(
            "path is {} bytes, longer than the limit {max_len}",
            p.len()
        ));
    }
    if p.contains(&0) {
        return Some("path contains a NUL byte".into());
    }
    if p == ROOT {
        return None;
    }
    if p[0] == b'/' {
        return Some("absolute path".into());
    }
    for comp in p.split(|&b| b == b'/') {
        match comp {
            b"" => return Some("empty path component (`//` or trailing `/`)".into()),
            b"." => return Some("`.` path component".into()),
            b".." => return Some("`..` path component".into()),
            c if c.len() > 255 => return Some("path component longer than 255 bytes".into()),
            _ => {}
        }
    }
    None
}

/// Split `a/b/c` into (`a/b`, `c`); a top-level name has the parent `""`.
pub fn split_parent(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&p[..0], p),
    }
}

/// Printable form of an archive path for error messages.
pub fn show(p: &[u8]) -> String {
    p.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        for ok in [&b"."[..], b"a", b"a/b", b"a/.b", b"a/..b", b"...", b"a b"] {
            assert_eq!(path_problem(ok, 4096), None, "{}", show(ok));
        }
        for bad in [
            &b""[..],
            b"/abs",
            b"../x",
            b"a/../b",
            b"a/..",
            b"a//b",
            b"a/",
            b"./a",
            b"a/./b",
            b"a\0b",
        ] {
            assert!(path_problem(bad, 4096).is_some(), "{}", show(bad));
        }
        assert!(path_problem(b"abcdef", 5).is_some());
        assert_eq!(split_parent(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_parent(b"c"), (&b""[..], &b"c"[..]));
    }
}
