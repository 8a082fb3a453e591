//! Streaming zstd over tokio I/O, driven from `poll_*` with zstd's raw
//! (non-blocking) stream API: no blocking threads, no extra crates. Each
//! call compresses at most one buffer's worth, so a poll stays short.
//!
//! `flush()` ends a zstd block so the peer can decode everything written so
//! far (interactive streams: the CRIU page-server protocol, QEMU's return
//! path); `shutdown()` ends the frame and half-closes the inner stream. The
//! decoder accepts concatenated frames and reports a stream cut before the
//! end of a frame as `UnexpectedEof`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

const BUF: usize = 128 * 1024;

/// Compresses what is written to it into `inner`.
pub struct ZstdEncoder<W> {
    inner: W,
    enc: Encoder<'static>,
    out: Box<[u8]>,
    /// `out[pos..len]` is compressed data not yet written to `inner`.
    pos: usize,
    len: usize,
    finished: bool,
}

impl<W: AsyncWrite + Unpin> ZstdEncoder<W> {
    pub fn new(inner: W, level: i32) -> io::Result<Self> {
        Ok(ZstdEncoder {
            inner,
            enc: Encoder::new(level)?,
            out: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            finished: false,
        })
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Write pending compressed bytes to `inner`.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.len {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.pos..self.len]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.pos = 0;
        self.len = 0;
        Poll::Ready(Ok(()))
    }

    /// Run `op` (flush or finish) until zstd has nothing more to emit.
    fn end_block(&mut self, cx: &mut Context<'_>, finish: bool) -> Poll<io::Result<()>> {
        loop {
            ready!(self.drain(cx))?;
            if self.finished {
                return Poll::Ready(Ok(()));
            }
            let mut out = OutBuffer::around(&mut self.out[..]);
            let remaining = if finish {
                self.enc.finish(&mut out, true)?
            } else {
                self.enc.flush(&mut out)?
            };
            self.len = out.pos();
            if remaining == 0 {
                self.finished = finish;
                ready!(self.drain(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ZstdEncoder<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of a zstd stream",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            ready!(this.drain(cx))?;
            let mut input = InBuffer::around(buf);
            let mut out = OutBuffer::around(&mut this.out[..]);
            this.enc.run(&mut input, &mut out)?;
            this.len = out.pos();
            if input.pos() > 0 {
                return Poll::Ready(Ok(input.pos()));
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.end_block(cx, false))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.end_block(cx, true))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Decompresses what it reads from `inner`.
pub struct ZstdDecoder<R> {
    inner: R,
    dec: Decoder<'static>,
    input: Box<[u8]>,
    /// `input[pos..len]` is compressed data not yet given to zstd.
    pos: usize,
    len: usize,
    /// The last run filled the output: zstd may hold more without new input.
    more_out: bool,
    /// The last run ended a frame (a clean place for the stream to end).
    frame_done: bool,
    eof: bool,
}

impl<R: AsyncRead + Unpin> ZstdDecoder<R> {
    pub fn new(inner: R) -> io::Result<Self> {
        Ok(ZstdDecoder {
            inner,
            dec: Decoder::new()?,
            input: vec![0; BUF].into_boxed_slice(),
            pos: 0,
            len: 0,
            more_out: false,
            frame_done: false,
            eof: false,
        })
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ZstdDecoder<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.pos < this.len || this.more_out {
                let mut input = InBuffer::around(&this.input[this.pos..this.len]);
                let dst = buf.initialize_unfilled();
                let cap = dst.len();
                let mut out = OutBuffer::around(dst);
                let hint = this.dec.run(&mut input, &mut out).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("corrupt zstd stream on a migration channel: {e}"),
                    )
                })?;
                let produced = out.pos();
                this.pos += input.pos();
                this.more_out = produced == cap;
                if hint == 0 {
                    this.frame_done = true;
                } else if produced > 0 || input.pos() > 0 {
                    this.frame_done = false;
                }
                buf.advance(produced);
                if produced > 0 {
                    return Poll::Ready(Ok(()));
                }
                if this.pos < this.len {
                    continue;
                }
            }
            if this.eof {
                return Poll::Ready(if this.frame_done {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zstd stream on a migration channel ended mid-frame",
                    ))
                });
            }
            let mut rb = ReadBuf::new(&mut this.input[..]);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            this.pos = 0;
            this.len = rb.filled().len();
            this.eof = this.len == 0;
        }
    }
}
