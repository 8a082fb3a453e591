//! ferry's own receiver for a CRIU dump's page-server stream: the target of
//! a live move writes the dump's memory pages into CRIU images itself,
//! straight from the state channel, instead of relaying them through a
//! socketpair to a `criu page-server` process (one process and one socket
//! hop fewer inside the freeze).
//!
//! The stream is what `criu dump --page-server` sends (CRIU 4.2, checked by
//! [`super::criu::checked_criu`]): a sequence of 32-byte little-endian
//! headers `{u32 cmd, u32 pad, u64 nr_pages, u64 vaddr, u64 dst_id}`, the
//! command's flags in the top 16 bits of `cmd`, `dst_id` = image id << 8 |
//! type (1 task pagemap, 2 shmem pagemap):
//!
//! | cmd | meaning | data after the header | answer |
//! |---|---|---|---|
//! | 4 `OPEN2` | start the pagemap of `dst_id` | – | 1 byte: has a parent (always 0 here) |
//! | 3 `OPEN` | the same, older form | – | – |
//! | 6 `ADD_F` | one pagemap entry with its flags | `nr_pages` × 4 KiB if the flags have `PRESENT` | – |
//! | 1 `ADD` | the same with `PRESENT` | `nr_pages` × 4 KiB | – |
//! | 0x1023 `FLUSH` | all so far is received | – | u32 0 |
//! | 0x1024 `FLUSH_N_CLOSE` | the dump is done | – | u32 0, end |
//!
//! Anything else (holes and parents of pre-dumps, lazy page requests) is
//! refused: those paths keep CRIU's own page server.
//!
//! Written images, as `criu page-server` writes them: `pagemap-<id>.img`
//! (or `pagemap-shmem-<id>.img`) = the common and pagemap magics, then
//! length-prefixed protobuf messages: a `PagemapHead { pages_id }` and one
//! `PagemapEntry { vaddr, compat_nr_pages: 0, flags, nr_pages }` per entry;
//! `pages-<pages_id>.img` = the raw page data in entry order.
//!
//! [`PageSink`] is an `AsyncRead + AsyncWrite`: what is written to it is the
//! stream; what is read from it are the answers (EOF once the dump closed the
//! session). File writes happen inline: they go to the page cache, as the
//! page server's do, and are not synced (the images live only until the
//! restore).
//!
//! In a move the answers do not cross the link: every answer is zeros, so
//! the source's [`AnswerForSink`] hands them to CRIU itself and the target's
//! sink answers nothing (`answers(false)`). CRIU then never waits for a
//! round trip behind pages still in flight, and with a deep socket buffer
//! its dump is as short as a dump to local files; the target checks that
//! the stream ended with CRIU's close before it restores.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The header layout this sink reads (CRIU 4.2: 64-bit page counts).
pub const CRIU_IOV_LAYOUT: u32 = 2;

const HEADER: usize = 32;
const PAGE: u64 = 4096;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

const PS_IOV_ADD: u32 = 1;
const PS_IOV_OPEN: u32 = 3;
const PS_IOV_OPEN2: u32 = 4;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_FLUSH: u32 = 0x1023;
const PS_IOV_FLUSH_N_CLOSE: u32 = 0x1024;
const PE_PRESENT: u32 = 1 << 2;

const TYPE_TASK: u64 = 1;
const TYPE_SHMEM: u64 = 2;

/// The first `pages-<id>.img` id: far above the ids the source's CRIU gives
/// images it writes itself (1, 2, …), which arrive in the same directory.
const FIRST_PAGES_ID: u32 = 1 << 20;

#[derive(Debug, Error)]
pub enum PageSinkError {
    #[error("page stream: {0}")]
    Protocol(String),
    #[error("page stream: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("page stream ended before the dump closed it ({0})")]
    Truncated(String),
}

impl From<PageSinkError> for io::Error {
    fn from(e: PageSinkError) -> io::Error {
        match e {
            PageSinkError::Io { what, source } => {
                io::Error::new(source.kind(), format!("page stream: {what}: {source}"))
            }
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

/// What a finished sink wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageSinkStats {
    /// Pagemap images written (one per task or shmem segment).
    pub pagemaps: u32,
    /// Pagemap entries.
    pub entries: u64,
    /// Bytes of page data.
    pub page_bytes: u64,
}

/// The pagemap being written: the `dst_id` its `OPEN2` named.
struct Open {
    dst_id: u64,
    pagemap: BufWriter<File>,
    pages: File,
    pages_path: PathBuf,
}

/// Receives a dump's page-server stream into `dir` (see the module doc).
pub struct PageSink {
    dir: PathBuf,
    cursor: Cursor,
    /// Answer CRIU (false when the source's [`AnswerForSink`] does).
    answers_here: bool,
    open: Option<Open>,
    next_pages_id: u32,
    answers: Vec<u8>,
    answered: usize,
    closed: bool,
    reader: Option<Waker>,
    stats: PageSinkStats,
}

impl PageSink {
    /// A sink writing into the existing directory `dir`.
    pub fn new(dir: &Path) -> PageSink {
        PageSink {
            dir: dir.to_path_buf(),
            cursor: Cursor::default(),
            answers_here: true,
            open: None,
            next_pages_id: FIRST_PAGES_ID,
            answers: Vec::new(),
            answered: 0,
            closed: false,
            reader: None,
            stats: PageSinkStats::default(),
        }
    }

    /// Whether to answer CRIU from here (default) or leave every answer to
    /// the source's [`AnswerForSink`] (nothing travels back).
    pub fn answers(mut self, yes: bool) -> PageSink {
        self.answers_here = yes;
        self
    }

    /// The result once the stream ended: the stats, or why the images are
    /// incomplete.
    pub fn finish(&self) -> Result<PageSinkStats, PageSinkError> {
        if self.closed {
            Ok(self.stats)
        } else {
            Err(PageSinkError::Truncated(format!(
                "{} bytes of pages in {} entries received",
                self.stats.page_bytes, self.stats.entries
            )))
        }
    }

    /// Consume stream bytes: page data goes to the open pages image,
    /// headers are acted on.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), PageSinkError> {
        while !data.is_empty() {
            if self.closed {
                return Err(PageSinkError::Protocol(format!(
                    "{} bytes after the dump closed the session",
                    data.len()
                )));
            }
            match self.cursor.next(&mut data)? {
                Some(Piece::Pages(pages)) => {
                    // Pages follow only a header that found its image open
                    // (after a refused one the stream is not fed again).
                    let Some(open) = self.open.as_mut() else {
                        return Err(PageSinkError::Protocol(
                            "page data without an open image".into(),
                        ));
                    };
                    open.pages
                        .write_all(pages)
                        .map_err(|source| PageSinkError::Io {
                            what: format!("write {}", open.pages_path.display()),
                            source,
                        })?;
                    self.stats.page_bytes += pages.len() as u64;
                }
                Some(Piece::Header(h)) => self.command(h)?,
                None => {}
            }
        }
        Ok(())
    }

    fn command(&mut self, h: Header) -> Result<(), PageSinkError> {
        match h.cmd {
            PS_IOV_OPEN | PS_IOV_OPEN2 => {
                self.close_open()?;
                self.open = Some(self.open_pagemap(h.dst_id)?);
                if h.cmd == PS_IOV_OPEN2 && self.answers_here {
                    // No parent images: the dump sends every page.
                    self.answers.push(0);
                }
            }
            PS_IOV_ADD | PS_IOV_ADD_F => {
                let flags = h.entry_flags();
                if flags & PE_PRESENT == 0 {
                    return Err(PageSinkError::Protocol(format!(
                        "an entry without pages (flags {flags:#x} at {:#x}): holes and lazy \
                         pages need CRIU's own page server",
                        h.vaddr
                    )));
                }
                let open = match self.open.as_mut() {
                    Some(o) if o.dst_id == h.dst_id => o,
                    _ => {
                        return Err(PageSinkError::Protocol(format!(
                            "pages for image {:#x}, which was not opened",
                            h.dst_id
                        )))
                    }
                };
                let mut pe = Vec::with_capacity(32);
                pb_varint(&mut pe, 1, h.vaddr);
                pb_varint(&mut pe, 2, 0);
                pb_varint(&mut pe, 4, u64::from(flags));
                pb_varint(&mut pe, 5, h.nr_pages);
                write_message(&mut open.pagemap, &pe).map_err(|source| PageSinkError::Io {
                    what: "write a pagemap entry".into(),
                    source,
                })?;
                self.stats.entries += 1;
            }
            PS_IOV_FLUSH | PS_IOV_FLUSH_N_CLOSE => {
                self.flush_open()?;
                if self.answers_here {
                    self.answers.extend_from_slice(&0u32.to_le_bytes());
                }
                if h.cmd == PS_IOV_FLUSH_N_CLOSE {
                    self.close_open()?;
                    self.closed = true;
                }
            }
            other => {
                return Err(PageSinkError::Protocol(format!(
                    "command {other:#x} is not supported by ferry's page sink (pre-dump parents \
                     and lazy pages use CRIU's own page server)"
                )))
            }
        }
        if self.answered < self.answers.len() || self.closed {
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
        Ok(())
    }

    fn open_pagemap(&mut self, dst_id: u64) -> Result<Open, PageSinkError> {
        let id = dst_id >> 8;
        let name = match dst_id & 0xff {
            TYPE_TASK => format!("pagemap-{id}.img"),
            TYPE_SHMEM => format!("pagemap-shmem-{id}.img"),
            t => {
                return Err(PageSinkError::Protocol(format!(
                    "image type {t} in {dst_id:#x} is not a pagemap ferry's page sink knows"
                )))
            }
        };
        let pages_id = self.next_pages_id;
        self.next_pages_id += 1;
        let create = |path: PathBuf| {
            File::options()
                .write(true)
                .create_new(true)
                .open(&path)
                .map(|f| (f, path.clone()))
                .map_err(|source| PageSinkError::Io {
                    what: format!("create {}", path.display()),
                    source,
                })
        };
        let (pm, pm_path) = create(self.dir.join(name))?;
        let (pages, pages_path) = create(self.dir.join(format!("pages-{pages_id}.img")))?;
        let mut pagemap = BufWriter::new(pm);
        let mut head = Vec::new();
        pb_varint(&mut head, 1, u64::from(pages_id));
        pagemap
            .write_all(&IMG_COMMON_MAGIC.to_le_bytes())
            .and_then(|()| pagemap.write_all(&PAGEMAP_MAGIC.to_le_bytes()))
            .and_then(|()| write_message(&mut pagemap, &head))
            .map_err(|source| PageSinkError::Io {
                what: format!("write {}", pm_path.display()),
                source,
            })?;
        self.stats.pagemaps += 1;
        Ok(Open {
            dst_id,
            pagemap,
            pages,
            pages_path,
        })
    }

    fn flush_open(&mut self) -> Result<(), PageSinkError> {
        if let Some(o) = self.open.as_mut() {
            o.pagemap.flush().map_err(|source| PageSinkError::Io {
                what: "flush the images".into(),
                source,
            })?;
        }
        Ok(())
    }

    fn close_open(&mut self) -> Result<(), PageSinkError> {
        self.flush_open()?;
        self.open = None;
        Ok(())
    }
}

struct Header {
    cmd: u32,
    flags: u32,
    nr_pages: u64,
    vaddr: u64,
    dst_id: u64,
}

impl Header {
    fn parse(b: &[u8; HEADER]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let raw = u32_at(0);
        Header {
            cmd: raw & 0xffff,
            flags: raw >> 16,
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        }
    }

    /// The flags of an `ADD`/`ADD_F` entry.
    fn entry_flags(&self) -> u32 {
        if self.cmd == PS_IOV_ADD {
            PE_PRESENT
        } else {
            self.flags
        }
    }

    /// Bytes of page data that follow this header.
    fn data_len(&self) -> Result<u64, PageSinkError> {
        match self.cmd {
            PS_IOV_ADD | PS_IOV_ADD_F if self.entry_flags() & PE_PRESENT != 0 => {
                self.nr_pages.checked_mul(PAGE).ok_or_else(|| {
                    PageSinkError::Protocol(format!("{} pages is too many", self.nr_pages))
                })
            }
            _ => Ok(0),
        }
    }
}

/// Where a page-server stream is: in a header or in an entry's pages.
#[derive(Default)]
struct Cursor {
    header: [u8; HEADER],
    have: usize,
    data_left: u64,
}

enum Piece<'a> {
    Header(Header),
    Pages(&'a [u8]),
}

impl Cursor {
    /// Take the next piece from the front of `data`: a run of page data, a
    /// completed header, or (a header's first bytes) nothing yet.
    fn next<'a>(&mut self, data: &mut &'a [u8]) -> Result<Option<Piece<'a>>, PageSinkError> {
        if self.data_left > 0 {
            let n = self.data_left.min(data.len() as u64) as usize;
            let (pages, rest) = data.split_at(n);
            *data = rest;
            self.data_left -= n as u64;
            return Ok(Some(Piece::Pages(pages)));
        }
        let n = (HEADER - self.have).min(data.len());
        self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
        self.have += n;
        *data = &data[n..];
        if self.have < HEADER {
            return Ok(None);
        }
        self.have = 0;
        let h = Header::parse(&self.header);
        self.data_left = h.data_len()?;
        Ok(Some(Piece::Header(h)))
    }
}

/// The source's end of a dump's page stream to a [`PageSink`] that answers
/// nothing: the answers come from here. Every answer the sink would give is
/// zeros (`OPEN2`: no parent; a flush: u32 0), so this end hands CRIU
/// [`PREPAID`] zero bytes up front, and more if the stream it passes on ever
/// asks for more. CRIU then never waits for a round trip behind the pages
/// it already wrote: with a deep socket buffer it writes them at memory
/// speed and goes on with the dump while ferry sends them. What this gives
/// up is CRIU's own end-to-end check (its close waited for the page
/// server); the target checks instead: its sink must see the stream end
/// with CRIU's close, and the move fails otherwise.
pub struct AnswerForSink<S> {
    inner: S,
    cursor: Cursor,
    /// Answer bytes the commands seen so far need.
    needed: u64,
    /// Answer bytes written to CRIU.
    written: u64,
    /// CRIU's close (`FLUSH_N_CLOSE`) went through.
    closed: bool,
}

/// Answer bytes handed to CRIU before it asks (a 1-byte answer per task's
/// pagemap, 4 per flush): far more than a dump uses.
pub const PREPAID: u64 = 4096;

impl<S> AnswerForSink<S> {
    pub fn new(inner: S) -> AnswerForSink<S> {
        AnswerForSink {
            inner,
            cursor: Cursor::default(),
            needed: 0,
            written: 0,
            closed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AnswerForSink<S> {
    /// Write the owed zero bytes to CRIU: [`PREPAID`], or what the stream
    /// needed if that is more.
    fn pay(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        const ZEROS: [u8; 512] = [0; 512];
        loop {
            let owed = self.needed.max(PREPAID) - self.written;
            if owed == 0 {
                return Poll::Ready(Ok(()));
            }
            let n = owed.min(ZEROS.len() as u64) as usize;
            match ready!(Pin::new(&mut self.inner).poll_write(cx, &ZEROS[..n]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                w => self.written += w as u64,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for AnswerForSink<S> {
    /// What CRIU sends, passed on; the answers it needs are counted.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(Err(e)) = this.pay(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = match Pin::new(&mut this.inner).poll_read(cx, buf) {
            // A unix socket closed with unread data (answers CRIU did not
            // need) resets its peer: after the close, that is the end.
            Poll::Ready(Err(e)) if this.closed && e.kind() == io::ErrorKind::ConnectionReset => {
                Poll::Ready(Ok(()))
            }
            r => r,
        };
        if let Poll::Ready(Ok(())) = r {
            let mut data = &buf.filled()[before..];
            while !data.is_empty() {
                if let Some(Piece::Header(h)) =
                    this.cursor.next(&mut data).map_err(io::Error::from)?
                {
                    this.needed += match h.cmd {
                        PS_IOV_OPEN2 => 1,
                        PS_IOV_FLUSH | PS_IOV_FLUSH_N_CLOSE => 4,
                        _ => 0,
                    };
                    this.closed |= h.cmd == PS_IOV_FLUSH_N_CLOSE;
                }
            }
            if let Poll::Ready(Err(e)) = this.pay(cx) {
                return Poll::Ready(Err(e));
            }
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AnswerForSink<S> {
    /// Bytes from the target (none from a sink that answers nothing).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.pay(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// The answers CRIU was given go out before the end.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.pay(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A protobuf varint field (wire type 0).
fn pb_varint(out: &mut Vec<u8>, field: u32, value: u64) {
    varint(out, u64::from(field) << 3);
    varint(out, value);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One CRIU image message: u32 length, then the protobuf bytes.
fn write_message(w: &mut impl Write, msg: &[u8]) -> io::Result<()> {
    w.write_all(&(msg.len() as u32).to_le_bytes())?;
    w.write_all(msg)
}

impl AsyncWrite for PageSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        Poll::Ready(this.feed(buf).map(|()| buf.len()).map_err(Into::into))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The stream ended: complete only after the dump closed the session.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.finish().map(|_| ()).map_err(Into::into);
        if let Some(w) = this.reader.take() {
            w.wake();
        }
        Poll::Ready(r)
    }
}

impl AsyncRead for PageSink {
    /// The answers to the dump; EOF once it closed the session.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let pending = &this.answers[this.answered..];
        if !pending.is_empty() {
            let n = pending.len().min(buf.remaining());
            buf.put_slice(&pending[..n]);
            this.answered += n;
            return Poll::Ready(Ok(()));
        }
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        this.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
#[path = "pagesink_tests.rs"]
mod tests;
