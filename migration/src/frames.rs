//! Adaptive per-frame zstd for the state stream (`Compression::ZstdFrames`).
//!
//! The state relay turns each read from the local socket (CRIU's page
//! stream, QEMU's migration stream) into one websocket frame. With this
//! codec every such frame is compressed on its own, so the stream stays as
//! interactive as the uncompressed one (no block to fill or flush), and the
//! encoder gives up on data that does not compress instead of paying for it
//! on every frame:
//!
//! ```text
//! frame   = tag:u8 body
//! tag 0   raw       body = the bytes as read
//! tag 1   zstd      body = raw_len:u32 (little endian) ++ one zstd frame of raw_len bytes
//! tag 2   ack       body = written:u64 (little endian), `zstd_frames_acked` only
//! (an empty websocket frame, without a tag, still ends the direction)
//! ```
//!
//! With `zstd_frames_acked`, each side sends an ack frame after every
//! [`ACK_EVERY`] payload bytes it wrote locally (the total so far, so a
//! later ack covers an earlier one), and a sender waits while more than
//! [`WINDOW`] payload bytes it sent are unacknowledged. A side sends no ack
//! after it ended its direction; its peer stops waiting for acks once it
//! sees that end.
//!
//! Encoder policy: frames under [`MIN_COMPRESS`] bytes go raw (protocol
//! chatter, QEMU's return path). A frame is sent compressed only when that
//! saves at least 1/8 of it. After a frame that did not, the next `backoff`
//! frames go raw without trying; `backoff` doubles on every miss up to
//! [`MAX_BACKOFF`] and resets on a hit. Incompressible memory (encrypted or
//! random pages) thus costs about one compression attempt in 64 frames,
//! while memory full of zeros and small values crosses the link at a
//! fraction of its size.
//!
//! The decoder refuses unknown tags, a `raw_len` over [`MAX_RAW`] (before
//! allocating anything) and a zstd frame that does not decode to exactly
//! `raw_len` bytes.

use thiserror::Error;

pub const TAG_RAW: u8 = 0;
pub const TAG_ZSTD: u8 = 1;
pub const TAG_ACK: u8 = 2;
/// `zstd_frames_acked`: the most payload a sender keeps unacknowledged.
pub const WINDOW: u64 = 8 << 20;
/// `zstd_frames_acked`: a receiver acknowledges after this much payload.
pub const ACK_EVERY: u64 = 1 << 20;
/// Frames shorter than this are never compressed.
pub const MIN_COMPRESS: usize = 2048;
/// The largest frame a peer may announce (the relay reads at most 256 KiB).
pub const MAX_RAW: usize = 4 * 1024 * 1024;
/// At most this many frames go raw after a miss before trying again.
pub const MAX_BACKOFF: u32 = 64;
/// zstd level of the state stream (fast; negative levels lose most of the
/// gain on page data).
pub const LEVEL: i32 = 1;

#[derive(Debug, Error)]
pub enum FrameError {
    #[error("state frame: unknown tag {0} (expected 0 = raw, 1 = zstd or, acknowledged, 2 = ack)")]
    UnknownTag(u8),
    #[error("state frame: truncated header ({0} bytes)")]
    Truncated(usize),
    #[error("state frame: announces {0} bytes, more than the {MAX_RAW} allowed")]
    TooLarge(usize),
    #[error("state frame: zstd data does not decode to the announced {announced} bytes: {detail}")]
    Corrupt { announced: usize, detail: String },
    #[error("zstd: {0}")]
    Zstd(#[from] std::io::Error),
}

/// An ack frame: `written` payload bytes were written on the receiving side.
pub fn ack_frame(written: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(9);
    f.push(TAG_ACK);
    f.extend_from_slice(&written.to_le_bytes());
    f
}

/// The count an ack frame carries; `Ok(None)` for any other frame.
pub fn parse_ack(frame: &[u8]) -> Result<Option<u64>, FrameError> {
    match frame.first() {
        Some(&TAG_ACK) => {
            let body: [u8; 8] = frame[1..]
                .try_into()
                .map_err(|_| FrameError::Truncated(frame.len()))?;
            Ok(Some(u64::from_le_bytes(body)))
        }
        _ => Ok(None),
    }
}

/// Counters of what the encoder did (for logs and the operation's metadata).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrameStats {
    /// Payload bytes in (as read from the local socket).
    pub raw_bytes: u64,
    /// Bytes of frames out (tags and headers included).
    pub wire_bytes: u64,
    pub frames: u64,
    pub compressed_frames: u64,
    /// Compression attempts that did not pay off.
    pub misses: u64,
}

pub struct FrameEncoder {
    zstd: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
    /// Frames to send raw before the next attempt.
    skip: u32,
    backoff: u32,
    stats: FrameStats,
}

impl FrameEncoder {
    pub fn new() -> Result<Self, FrameError> {
        Ok(FrameEncoder {
            zstd: zstd::bulk::Compressor::new(LEVEL)?,
            scratch: Vec::new(),
            skip: 0,
            backoff: 1,
            stats: FrameStats::default(),
        })
    }

    /// One frame carrying `data` (must not be empty: an empty frame is the
    /// end of the direction, sent by the caller as is).
    pub fn encode(&mut self, data: &[u8]) -> Result<Vec<u8>, FrameError> {
        self.encode_raw_frame(raw_frame(data))
    }

    /// Like `encode`, for a raw frame already built by the caller (`frame[0]`
    /// = `TAG_RAW`, the data after it): returned as is when it goes raw,
    /// which saves copying incompressible data once more.
    pub fn encode_raw_frame(&mut self, frame: Vec<u8>) -> Result<Vec<u8>, FrameError> {
        debug_assert!(frame.len() > 1 && frame[0] == TAG_RAW);
        let len = frame.len() - 1;
        self.stats.raw_bytes += len as u64;
        self.stats.frames += 1;
        let out = if len < MIN_COMPRESS {
            frame
        } else if self.skip > 0 {
            self.skip -= 1;
            frame
        } else {
            self.try_compress(&frame[1..])?.unwrap_or(frame)
        };
        self.stats.wire_bytes += out.len() as u64;
        Ok(out)
    }

    /// The compressed frame, or `None` when compressing does not pay off.
    fn try_compress(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        // Worth it only if it saves 1/8.
        let budget = data.len() - data.len() / 8;
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let n = self.zstd.compress_to_buffer(data, &mut self.scratch)?;
        if n <= budget {
            let mut f = Vec::with_capacity(5 + n);
            f.push(TAG_ZSTD);
            f.extend_from_slice(&(data.len() as u32).to_le_bytes());
            f.extend_from_slice(&self.scratch[..n]);
            self.stats.compressed_frames += 1;
            self.backoff = 1;
            Ok(Some(f))
        } else {
            self.stats.misses += 1;
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            Ok(None)
        }
    }

    pub fn stats(&self) -> FrameStats {
        self.stats
    }
}

fn raw_frame(data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 1);
    f.push(TAG_RAW);
    f.extend_from_slice(data);
    f
}

pub struct FrameDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Result<Self, FrameError> {
        Ok(FrameDecoder {
            zstd: zstd::bulk::Decompressor::new()?,
            buf: Vec::new(),
        })
    }

    /// The payload of one (non-empty) frame; valid until the next call.
    pub fn decode<'a>(&'a mut self, frame: &'a [u8]) -> Result<&'a [u8], FrameError> {
        match frame.first() {
            None => Err(FrameError::Truncated(0)),
            Some(&TAG_RAW) => Ok(&frame[1..]),
            Some(&TAG_ZSTD) => {
                if frame.len() < 5 {
                    return Err(FrameError::Truncated(frame.len()));
                }
                let announced =
                    u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
                if announced > MAX_RAW {
                    return Err(FrameError::TooLarge(announced));
                }
                self.buf.clear();
                self.buf.resize(announced, 0);
                let n = self
                    .zstd
                    .decompress_to_buffer(&frame[5..], &mut self.buf[..])
                    .map_err(|e| FrameError::Corrupt {
                        announced,
                        detail: e.to_string(),
                    })?;
                if n != announced {
                    return Err(FrameError::Corrupt {
                        announced,
                        detail: format!("got {n} bytes"),
                    });
                }
                Ok(&self.buf[..])
            }
            Some(&t) => Err(FrameError::UnknownTag(t)),
        }
    }
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
