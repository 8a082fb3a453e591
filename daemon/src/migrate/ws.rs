//! Websockets as migration channels. Either end (axum on the dialled side,
//! tokio-tungstenite on the dialling side) becomes a [`WsPipe`]: a pair of
//! queues of binary frames, where an empty frame ends that direction
//! (half-close). From a pipe we make the control channel (one JSON message
//! per frame) or a byte stream for the bulk channels.

use axum::body::Bytes;
use axum::extract::ws::{Message as AxMsg, WebSocket};
use ferry_migration::{
    decode_message, encode_message, ChannelError, Message, MessageChannel, DEFAULT_MAX_FRAME,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Duration, Instant};
use tokio_tungstenite::tungstenite::Message as TMsg;

/// Frames queued per direction: a few MiB at most in flight per channel (a
/// deep queue hides a slow receiver from QEMU, whose switch-over estimate
/// then counts bytes still queued here, and costs memory per move).
const QUEUE: usize = 8;
/// Both ends ping every few seconds; a link that delivers nothing (not even
/// a pong) for `DEAD_AFTER`, or takes longer than `SEND_TIMEOUT` to accept
/// one frame, is dead: the channel closes and the move fails instead of
/// waiting for TCP's own timeouts (many minutes on a silent partition).
const PING_EVERY: Duration = Duration::from_secs(3);
pub(super) const DEAD_AFTER: Duration = Duration::from_secs(15);
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

fn link_dead(last_rx: Instant) -> bool {
    let dead = last_rx.elapsed() > DEAD_AFTER;
    if dead {
        tracing::warn!(
            "migration channel: nothing received for {:?}: the link is dead",
            DEAD_AFTER
        );
    }
    dead
}

fn link_broken(e: &dyn std::fmt::Display) {
    tracing::warn!(error = %e, "migration channel: the connection broke");
}

pub(super) const CHUNK: usize = 256 * 1024;

/// Frames in and out of one websocket; an empty frame = end of that direction.
/// Received frames keep the websocket's own buffer (`Bytes`: clones share
/// it), so the payload is not copied again.
pub struct WsPipe {
    pub tx: mpsc::Sender<Vec<u8>>,
    pub rx: mpsc::Receiver<Bytes>,
}

/// Pump an axum (server side) websocket.
pub fn from_axum(mut ws: WebSocket) -> WsPipe {
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        let (mut reading, mut writing) = (true, true);
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut last_rx = Instant::now();
        while reading || writing {
            tokio::select! {
                m = ws.recv(), if reading => {
                    last_rx = Instant::now();
                    match m {
                        Some(Ok(AxMsg::Binary(b))) if in_tx.send(b.clone()).await.is_err() => reading = false,
                        Some(Ok(AxMsg::Close(_))) | None => reading = false,
                        // The connection broke (e.g. reset): nothing more
                        // goes out either. Ending now tells the relays at
                        // once, which may be waiting for acknowledgements.
                        Some(Err(e)) => { link_broken(&e); break }
                        _ => {}
                    }
                },
                f = out_rx.recv(), if writing => match f {
                    Some(b) => {
                        let end = b.is_empty();
                        if !matches!(timeout(SEND_TIMEOUT, ws.send(AxMsg::Binary(b.into()))).await, Ok(Ok(()))) { break }
                        if end { writing = false }
                    }
                    None => { let _ = timeout(SEND_TIMEOUT, ws.send(AxMsg::Binary(Vec::new().into()))).await; writing = false }
                },
                _ = ping.tick() => {
                    if link_dead(last_rx) { break }
                    if !matches!(timeout(SEND_TIMEOUT, ws.send(AxMsg::Ping(Vec::new().into()))).await, Ok(Ok(()))) { break }
                }
            }
        }
        let _ = timeout(CLOSE_TIMEOUT, ws.send(AxMsg::Close(None))).await;
    });
    WsPipe {
        tx: out_tx,
        rx: in_rx,
    }
}

pub fn from_tungstenite<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> WsPipe
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let (mut reading, mut writing) = (true, true);
        let mut ping = tokio::time::interval(PING_EVERY);
        let mut last_rx = Instant::now();
        while reading || writing {
            tokio::select! {
                m = stream.next(), if reading => {
                    last_rx = Instant::now();
                    match m {
                        Some(Ok(TMsg::Binary(b))) if in_tx.send(b.clone()).await.is_err() => reading = false,
                        Some(Ok(TMsg::Close(_))) | None => reading = false,
                        // The connection broke (e.g. reset): nothing more
                        // goes out either. Ending now tells the relays at
                        // once, which may be waiting for acknowledgements.
                        Some(Err(e)) => { link_broken(&e); break }
                        _ => {}
                    }
                },
                f = out_rx.recv(), if writing => match f {
                    Some(b) => {
                        let end = b.is_empty();
                        if !matches!(timeout(SEND_TIMEOUT, sink.send(TMsg::Binary(b.into()))).await, Ok(Ok(()))) { break }
                        if end { writing = false }
                    }
                    None => { let _ = timeout(SEND_TIMEOUT, sink.send(TMsg::Binary(Vec::new().into()))).await; writing = false }
                },
                _ = ping.tick() => {
                    if link_dead(last_rx) { break }
                    if !matches!(timeout(SEND_TIMEOUT, sink.send(TMsg::Ping(Vec::new().into()))).await, Ok(Ok(()))) { break }
                }
            }
        }
        let _ = timeout(CLOSE_TIMEOUT, sink.send(TMsg::Close(None))).await;
    });
    WsPipe {
        tx: out_tx,
        rx: in_rx,
    }
}

pub struct WsControl(pub WsPipe);

impl MessageChannel for WsControl {
    async fn send(&mut self, msg: &Message) -> Result<(), ChannelError> {
        let bytes = encode_message(msg, DEFAULT_MAX_FRAME)?;
        self.0
            .tx
            .send(bytes)
            .await
            .map_err(|_| ChannelError::Closed)
    }

    async fn recv(&mut self) -> Result<Message, ChannelError> {
        match self.0.rx.recv().await {
            Some(b) if b.is_empty() => Err(ChannelError::Closed),
            Some(b) => decode_message(&b, DEFAULT_MAX_FRAME),
            None => Err(ChannelError::Closed),
        }
    }
}

/// A bulk channel as a byte stream (shutdown = half-close = empty frame).
pub fn into_stream(pipe: WsPipe) -> DuplexStream {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (mut r, mut w) = tokio::io::split(theirs);
    let WsPipe { tx, mut rx } = pipe;
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Vec::new()).await;
                    break;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if frame.is_empty() {
                break;
            }
            if w.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    ours
}
