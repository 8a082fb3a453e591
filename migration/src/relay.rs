//! Copy bytes both ways between two endpoints — e.g. QEMU's end of a
//! socketpair and the state channel, or a local CRIU page-server socket and
//! the state channel. Each direction ends on its own: EOF on one side's read
//! half becomes `shutdown()` of the other side's write half (half-close),
//! while the opposite direction keeps flowing. Post-copy needs this: the
//! target's page requests travel back while the source still sends.
//!
//! Every chunk is flushed as soon as it is written, so request/response
//! protocols across the relay (CRIU page server, QEMU return path) never
//! wait on a buffer. The first error in either direction ends the relay.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::channel::Counter;

/// Default chunk size per direction.
pub const RELAY_CHUNK: usize = 256 * 1024;

/// Bytes moved by a finished relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayStats {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

#[derive(Debug, Error)]
pub enum RelayError {
    #[error("relay {from} → {to}: reading from {from} failed after {bytes} bytes: {source}")]
    Read {
        from: String,
        to: String,
        bytes: u64,
        source: io::Error,
    },
    #[error("relay {from} → {to}: writing to {to} failed after {bytes} bytes: {source}")]
    Write {
        from: String,
        to: String,
        bytes: u64,
        source: io::Error,
    },
}

/// A two-way relay between endpoint `a` and endpoint `b`. The names appear
/// in errors ("relay qemu → state channel: …").
#[derive(Debug, Clone)]
pub struct Relay {
    a_name: String,
    b_name: String,
    chunk: usize,
    a_to_b: Counter,
    b_to_a: Counter,
}

impl Relay {
    pub fn new(a_name: impl Into<String>, b_name: impl Into<String>) -> Self {
        Relay {
            a_name: a_name.into(),
            b_name: b_name.into(),
            chunk: RELAY_CHUNK,
            a_to_b: Counter::default(),
            b_to_a: Counter::default(),
        }
    }

    pub fn chunk_size(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// Live counters (a → b, b → a) for progress reports while it runs.
    pub fn counters(&self) -> (Counter, Counter) {
        (self.a_to_b.clone(), self.b_to_a.clone())
    }

    /// Run until both directions have ended (EOF read and propagated) or
    /// one fails.
    pub async fn run<A, B>(&self, a: A, b: B) -> Result<RelayStats, RelayError>
    where
        A: AsyncRead + AsyncWrite,
        B: AsyncRead + AsyncWrite,
    {
        let (mut ar, mut aw) = tokio::io::split(a);
        let (mut br, mut bw) = tokio::io::split(b);
        let forward = copy_half(
            &mut ar,
            &mut bw,
            &self.a_name,
            &self.b_name,
            self.chunk,
            &self.a_to_b,
        );
        let backward = copy_half(
            &mut br,
            &mut aw,
            &self.b_name,
            &self.a_name,
            self.chunk,
            &self.b_to_a,
        );
        let (a_to_b, b_to_a) = tokio::try_join!(forward, backward)?;
        tracing::debug!(a = %self.a_name, b = %self.b_name, a_to_b, b_to_a, "relay finished");
        Ok(RelayStats { a_to_b, b_to_a })
    }
}

/// Relay with default names and chunk size.
pub async fn relay<A, B>(a: A, b: B) -> Result<RelayStats, RelayError>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    Relay::new("a", "b").run(a, b).await
}

async fn copy_half<R, W>(
    r: &mut R,
    w: &mut W,
    from: &str,
    to: &str,
    chunk: usize,
    counter: &Counter,
) -> Result<u64, RelayError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    let werr = |bytes, source| RelayError::Write {
        from: from.into(),
        to: to.into(),
        bytes,
        source,
    };
    loop {
        let n = r.read(&mut buf).await.map_err(|source| RelayError::Read {
            from: from.into(),
            to: to.into(),
            bytes: total,
            source,
        })?;
        if n == 0 {
            w.shutdown().await.map_err(|e| werr(total, e))?;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await.map_err(|e| werr(total, e))?;
        w.flush().await.map_err(|e| werr(total, e))?;
        total += n as u64;
        counter.add(n as u64);
    }
}
