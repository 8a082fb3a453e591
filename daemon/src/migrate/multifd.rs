//! QEMU's multifd over ferry's links. QEMU opens one connection for its
//! main channel and one per multifd channel (`migrate unix:PATH`), so the
//! stream cannot be one socketpair: on the source ferry listens on a unix
//! socket in the instance's run directory and relays each connection QEMU
//! opens over its own state websocket; on the target QEMU listens
//! (`migrate-incoming unix:PATH`) and ferry connects once per websocket.
//! Which connection is the main channel does not matter: an incoming QEMU
//! (8.0 and later, checked by the driver) tells them apart by their first
//! bytes. Each connection is relayed as the single stream is (compression,
//! acknowledgements, half-close); any one failing fails QEMU's migration.
//! [`relay_single`] gives the single stream the same shape ([`Relays`]), so
//! both sides start whichever they have the same way.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use ferry_migration::Compression;

use super::ws::WsPipe;
use super::{relay_state, AbortOnDrop, StateStats};

/// All of a move's state relays, as one future: their summed figures, or
/// the first failure.
pub(super) type Relays = Pin<Box<dyn Future<Output = Result<StateStats, String>> + Send>>;

/// The single stream (no multifd): our end of QEMU's socketpair relayed
/// over the one state channel, as a [`Relays`].
pub(super) fn relay_single(
    ours: UnixStream,
    pipes: Vec<WsPipe>,
    compression: Compression,
) -> Result<Relays, String> {
    let pipe = pipes.into_iter().next().ok_or("no state channel")?;
    Ok(Box::pin(relay_state(ours, pipe, compression, None)))
}

/// How long the source waits for QEMU's connections once it was told to
/// migrate (it opens them all at once).
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Source: listen on `path` (now, before QEMU is told to migrate) and relay
/// the connections QEMU opens, one over each of `pipes`.
pub(super) fn relay_outgoing(
    path: &Path,
    pipes: Vec<WsPipe>,
    compression: Compression,
) -> Result<Relays, String> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("migration socket {}: {e}", path.display()))?;
    let path: PathBuf = path.to_path_buf();
    Ok(Box::pin(async move {
        // Relays started so far end with this future, however it ends.
        let mut relays = Tasks::default();
        let accept_all = async {
            for (i, pipe) in pipes.into_iter().enumerate() {
                let (conn, _) = tokio::time::timeout(ACCEPT_TIMEOUT, listener.accept())
                    .await
                    .map_err(|_| {
                        format!(
                            "QEMU opened {i} of its migration connections within {} s",
                            ACCEPT_TIMEOUT.as_secs()
                        )
                    })?
                    .map_err(|e| format!("migration socket: accept: {e}"))?;
                relays.push(tokio::spawn(relay_state(conn, pipe, compression, None)));
            }
            Ok::<_, String>(())
        };
        let accepted = accept_all.await;
        let _ = std::fs::remove_file(&path);
        accepted?;
        join(relays).await
    }))
}

/// Target: QEMU listens on `path`; one connection per pipe, each opened
/// when the pipe's first bytes arrive. An incoming QEMU reads the first
/// bytes of each connection it accepts before it goes on (to tell the main
/// channel from the others), and waits for them in its main loop, where its
/// NBD export runs too: a connection opened before the source's QEMU sends
/// anything (while the disk mirror still runs) would stall the mirror.
///
/// Nothing runs until the returned future is first polled: the caller
/// spawns it once QEMU listens. Without a disk mirror the source's QEMU
/// sends at once, and its first bytes may arrive while the target QEMU is
/// still starting (a connection then would find no socket and fail the
/// move).
pub(super) fn relay_incoming(path: &Path, pipes: Vec<WsPipe>, compression: Compression) -> Relays {
    let path = path.to_path_buf();
    Box::pin(async move {
        let mut relays = Tasks::default();
        for pipe in pipes {
            let conn = ConnectOnWrite::new(path.clone());
            relays.push(tokio::spawn(relay_state(conn, pipe, compression, None)));
        }
        join(relays).await
    })
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<UnixStream>> + Send>>;

/// A unix socket connection opened on the first write; reads wait for it.
struct ConnectOnWrite {
    path: PathBuf,
    state: Conn,
    read_waker: Option<Waker>,
}

enum Conn {
    Idle,
    Connecting(Connecting),
    Ready(UnixStream),
}

impl ConnectOnWrite {
    fn new(path: PathBuf) -> Self {
        ConnectOnWrite {
            path,
            state: Conn::Idle,
            read_waker: None,
        }
    }

    /// Start (or go on) connecting; Ready once connected.
    fn poll_connect(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match &mut self.state {
                Conn::Ready(_) => return Poll::Ready(Ok(())),
                Conn::Idle => {
                    let path = self.path.clone();
                    self.state = Conn::Connecting(Box::pin(async move {
                        UnixStream::connect(&path).await.map_err(|e| {
                            std::io::Error::new(
                                e.kind(),
                                format!("QEMU's migration socket {}: {e}", path.display()),
                            )
                        })
                    }));
                }
                Conn::Connecting(f) => {
                    let conn = ready!(f.as_mut().poll(cx))?;
                    self.state = Conn::Ready(conn);
                    if let Some(w) = self.read_waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }
}

impl AsyncRead for ConnectOnWrite {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.state {
            Conn::Ready(c) => Pin::new(c).poll_read(cx, buf),
            _ => {
                self.read_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ConnectOnWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_connect(cx))?;
        match &mut self.state {
            Conn::Ready(c) => Pin::new(c).poll_write(cx, buf),
            _ => unreachable!("connected above"),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.state {
            Conn::Ready(c) => Pin::new(c).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The peer ended before sending anything: nothing to connect.
        match &mut self.state {
            Conn::Ready(c) => Pin::new(c).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Spawned relays that end when this is dropped: a move that fails or is
/// abandoned closes every connection to QEMU at once (a spawned task would
/// otherwise go on, holding connections QEMU may be blocked writing into).
#[derive(Default)]
struct Tasks(Vec<AbortOnDrop<Result<StateStats, String>>>);

impl Tasks {
    fn push(&mut self, relay: tokio::task::JoinHandle<Result<StateStats, String>>) {
        self.0.push(AbortOnDrop::new(relay))
    }
}

/// Wait for every relay; sum their figures. The first failure is the
/// result, and the others are ended (as they are when this future is
/// dropped): QEMU fails the migration as soon as one of its connections
/// breaks.
async fn join(mut relays: Tasks) -> Result<StateStats, String> {
    let mut sum = StateStats::default();
    let mut pending: futures::stream::FuturesUnordered<_> =
        relays.0.iter_mut().map(AbortOnDrop::handle).collect();
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        let s = r.map_err(|e| e.to_string()).and_then(|r| r)?;
        sum.sent += s.sent;
        sum.received += s.received;
        sum.sent_wire += s.sent_wire;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A relay that runs until aborted; `gone` completes when it is dropped.
    fn endless(tasks: &mut Tasks) -> tokio::sync::oneshot::Receiver<()> {
        let (held, gone) = tokio::sync::oneshot::channel::<()>();
        tasks.push(tokio::spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
            Ok(StateStats::default())
        }));
        gone
    }

    #[tokio::test]
    async fn one_failing_relay_ends_the_others() {
        let mut tasks = Tasks::default();
        let gone = endless(&mut tasks);
        tasks.push(tokio::spawn(async { Err("broken pipe".to_string()) }));
        assert_eq!(join(tasks).await.unwrap_err(), "broken pipe");
        let ended = tokio::time::timeout(Duration::from_secs(2), gone).await;
        assert!(ended.is_ok(), "the other relay still runs");
    }

    #[tokio::test]
    async fn dropping_the_joined_relays_ends_them() {
        let mut tasks = Tasks::default();
        let gone = endless(&mut tasks);
        let joined = join(tasks);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), joined)
                .await
                .is_err(),
            "joined relays ended by themselves"
        );
        let ended = tokio::time::timeout(Duration::from_secs(2), gone).await;
        assert!(ended.is_ok(), "a relay outlived its dropped join");
    }

    #[tokio::test]
    async fn connects_on_the_first_write_and_wakes_the_waiting_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Split as the relay does; the reader starts first and must wait.
        let (mut r, mut w) = tokio::io::split(ConnectOnWrite::new(path.clone()));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4];
            r.read_exact(&mut buf).await.map(|_| buf)
        });
        let early = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(early.is_err(), "connected before anything was written");
        assert!(
            !reader.is_finished(),
            "a read before the first write must wait"
        );
        w.write_all(b"QEVM").await.unwrap();
        let (mut qemu, _) = listener.accept().await.unwrap();
        let mut got = [0u8; 4];
        qemu.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"QEVM");
        qemu.write_all(b"back").await.unwrap();
        assert_eq!(&reader.await.unwrap().unwrap(), b"back");
    }

    #[tokio::test]
    async fn a_stream_that_ends_unused_never_connects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let mut c = ConnectOnWrite::new(path);
        c.shutdown().await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "connected although nothing was sent");
    }
}
