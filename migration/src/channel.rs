//! Channels. They are abstract so the protocol runs over websockets in the
//! daemon and over in-memory pipes in tests.
//!
//! * [`MessageChannel`]: the control channel, one [`Message`] per frame.
//!   [`FramedChannel`] implements it over any `AsyncRead + AsyncWrite` with
//!   `u32` big-endian length + JSON payload frames; a websocket adapter sends
//!   [`encode_message`]'s bytes as one binary frame and parses received
//!   frames with [`decode_message`], so both enforce the same limits.
//! * [`ByteChannel`]: a bulk stream (fs, state) — any `AsyncRead +
//!   AsyncWrite` — with optional zstd and byte counters for progress.
//!   Half-close is `shutdown()`; over a websocket it is an empty binary frame.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};

use crate::compress::{ZstdDecoder, ZstdEncoder};
use crate::protocol::{Compression, Message};

/// Largest control frame accepted by default (control messages are small).
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Why a control frame could not be sent or received.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("the peer closed the control channel")]
    Closed,
    #[error("the control channel was cut in the middle of a frame ({got} of {expected} bytes)")]
    Truncated { got: usize, expected: usize },
    #[error(
        "control frame of {size} bytes exceeds the {max}-byte limit; the peer is broken or hostile"
    )]
    FrameTooLarge { size: usize, max: usize },
    #[error("empty control frame: every control frame carries one JSON message")]
    EmptyFrame,
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control channel I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// Encode one message as a frame payload (JSON), checking the size limit.
pub fn encode_message(msg: &Message, max_frame: usize) -> Result<Vec<u8>, ChannelError> {
    let payload = serde_json::to_vec(msg).map_err(|e| ChannelError::Malformed(e.to_string()))?;
    if payload.len() > max_frame {
        return Err(ChannelError::FrameTooLarge {
            size: payload.len(),
            max: max_frame,
        });
    }
    Ok(payload)
}

/// Decode one frame payload into a message, checking the size limit.
pub fn decode_message(payload: &[u8], max_frame: usize) -> Result<Message, ChannelError> {
    if payload.len() > max_frame {
        return Err(ChannelError::FrameTooLarge {
            size: payload.len(),
            max: max_frame,
        });
    }
    if payload.is_empty() {
        return Err(ChannelError::EmptyFrame);
    }
    serde_json::from_slice(payload).map_err(|e| {
        let head = String::from_utf8_lossy(&payload[..payload.len().min(64)]).into_owned();
        ChannelError::Malformed(format!("{e} (frame starts with {head:?})"))
    })
}

/// Sends and receives one protocol message per frame.
pub trait MessageChannel: Send {
    /// Send one message. Not cancel-safe: a dropped send may leave half a frame.
    fn send(&mut self, msg: &Message) -> impl Future<Output = Result<(), ChannelError>> + Send;
    /// Receive one message; [`ChannelError::Closed`] on a clean end of stream.
    fn recv(&mut self) -> impl Future<Output = Result<Message, ChannelError>> + Send;
}

/// Length-prefixed frames (`u32` BE length, then the JSON payload) over a
/// byte stream. `recv` is cancel-safe (partial frames are kept), so it can
/// sit in a `select!` beside a cancel signal.
pub struct FramedChannel<T> {
    io: T,
    max_frame: usize,
    rbuf: Vec<u8>,
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> FramedChannel<T> {
    pub fn new(io: T) -> Self {
        Self::with_max_frame(io, DEFAULT_MAX_FRAME)
    }

    pub fn with_max_frame(io: T, max_frame: usize) -> Self {
        FramedChannel {
            io,
            max_frame,
            rbuf: Vec::new(),
        }
    }

    pub fn into_inner(self) -> T {
        self.io
    }

    /// Send one raw frame (no JSON check); tests use it for garbage frames.
    pub async fn send_frame(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > self.max_frame {
            return Err(ChannelError::FrameTooLarge {
                size: payload.len(),
                max: self.max_frame,
            });
        }
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        self.io.write_all(&frame).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Receive one raw frame payload.
    pub async fn recv_frame(&mut self) -> Result<Vec<u8>, ChannelError> {
        loop {
            if self.rbuf.len() >= 4 {
                let len = u32::from_be_bytes(self.rbuf[..4].try_into().expect("4 bytes")) as usize;
                if len > self.max_frame {
                    return Err(ChannelError::FrameTooLarge {
                        size: len,
                        max: self.max_frame,
                    });
                }
                if self.rbuf.len() >= 4 + len {
                    let frame = self.rbuf[4..4 + len].to_vec();
                    self.rbuf.drain(..4 + len);
                    return Ok(frame);
                }
                self.rbuf.reserve(4 + len - self.rbuf.len());
            } else {
                self.rbuf.reserve(4096);
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(match self.rbuf.len() {
                    0 => ChannelError::Closed,
                    n if n < 4 => ChannelError::Truncated {
                        got: n,
                        expected: 4,
                    },
                    n => ChannelError::Truncated {
                        got: n - 4,
                        expected: u32::from_be_bytes(self.rbuf[..4].try_into().expect("4 bytes"))
                            as usize,
                    },
                });
            }
        }
    }

    /// Shut down the write side (the peer's `recv` then gets `Closed`).
    pub async fn close(&mut self) -> Result<(), ChannelError> {
        self.io.shutdown().await?;
        Ok(())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> MessageChannel for FramedChannel<T> {
    async fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        let payload = encode_message(msg, self.max_frame)?;
        tracing::trace!(
            kind = msg.kind(),
            bytes = payload.len(),
            "migration control: send"
        );
        self.send_frame(&payload).await
    }

    async fn recv(&mut self) -> Result<Message, ChannelError> {
        let payload = self.recv_frame().await?;
        let msg = decode_message(&payload, self.max_frame)?;
        tracing::trace!(
            kind = msg.kind(),
            bytes = payload.len(),
            "migration control: recv"
        );
        Ok(msg)
    }
}

// ───────────────────────────── byte channels ─────────────────────────────

/// A shared byte counter; clone it to read progress from another task.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
}

/// Counts the bytes that pass through an `AsyncRead` or `AsyncWrite`.
#[derive(Debug)]
pub struct Counting<T> {
    inner: T,
    counter: Counter,
}

impl<T> Counting<T> {
    pub fn new(inner: T, counter: Counter) -> Self {
        Counting { inner, counter }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.counter.add((buf.filled().len() - before) as u64);
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.counter.add(n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Counters of one byte channel: payload bytes (before compression / after
/// decompression) and wire bytes, in each direction.
#[derive(Debug, Clone, Default)]
pub struct ByteCounters {
    pub sent: Counter,
    pub sent_wire: Counter,
    pub received: Counter,
    pub received_wire: Counter,
}

enum Reader<R> {
    Plain(Counting<R>),
    Zstd(Counting<ZstdDecoder<Counting<R>>>),
}

enum Writer<W> {
    Plain(Counting<W>),
    Zstd(Counting<ZstdEncoder<Counting<W>>>),
}

/// A bulk stream with optional zstd in both directions and byte counters.
/// It is itself `AsyncRead + AsyncWrite`, so it can be one end of a relay.
/// `shutdown()` ends the compressed frame and half-closes the inner stream.
pub struct ByteChannel<T> {
    reader: Reader<ReadHalf<T>>,
    writer: Writer<WriteHalf<T>>,
    counters: ByteCounters,
}

/// The zstd level used on byte channels: fast enough for the state stream.
pub const ZSTD_LEVEL: i32 = 1;

impl<T: AsyncRead + AsyncWrite> ByteChannel<T> {
    pub fn new(io: T, compression: Compression) -> io::Result<Self> {
        let counters = ByteCounters::default();
        let (r, w) = tokio::io::split(io);
        let c = counters.clone();
        let (reader, writer) = match compression {
            Compression::None => (
                Reader::Plain(Counting::new(r, c.received.clone())),
                Writer::Plain(Counting::new(w, c.sent.clone())),
            ),
            Compression::Zstd => (
                Reader::Zstd(Counting::new(
                    ZstdDecoder::new(Counting::new(r, c.received_wire.clone()))?,
                    c.received.clone(),
                )),
                Writer::Zstd(Counting::new(
                    ZstdEncoder::new(Counting::new(w, c.sent_wire.clone()), ZSTD_LEVEL)?,
                    c.sent.clone(),
                )),
            ),
            Compression::ZstdFrames | Compression::ZstdFramesAcked => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "zstd_frames compresses frame by frame: it is not a byte-stream codec",
                ))
            }
            Compression::Unknown => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unknown compression cannot be used",
                ))
            }
        };
        Ok(ByteChannel {
            reader,
            writer,
            counters,
        })
    }

    /// Counters to poll for progress; without compression the wire counters
    /// stay 0 and the payload counters are the wire bytes.
    pub fn counters(&self) -> ByteCounters {
        self.counters.clone()
    }
}

impl<T: AsyncRead> AsyncRead for ByteChannel<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.reader {
            Reader::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Zstd(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for ByteChannel<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.writer {
            Writer::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Zstd(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.writer {
            Writer::Plain(w) => Pin::new(w).poll_flush(cx),
            Writer::Zstd(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.writer {
            Writer::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Zstd(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
