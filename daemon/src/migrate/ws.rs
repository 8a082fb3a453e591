//! Websockets as migration channels. Either end (axum on the dialled side,
//! tokio-tungstenite on the dialling side) becomes a [`WsPipe`]: a pair of
//! queues of binary frames, where an empty frame ends that direction
//! (half-close). From a pipe we make the control channel (one JSON message
//! per frame) or a byte stream for the bulk channels.

use axum::extract::ws::{Message as AxMsg, WebSocket};
use ferry_migration::{
    decode_message, encode_message, ChannelError, Message, MessageChannel, DEFAULT_MAX_FRAME,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as TMsg;

const QUEUE: usize = 64;
const CHUNK: usize = 256 * 1024;

/// Frames in and out of one websocket; an empty frame = end of that direction.
pub struct WsPipe {
    pub tx: mpsc::Sender<Vec<u8>>,
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// Pump an axum (server side) websocket.
pub fn from_axum(mut ws: WebSocket) -> WsPipe {
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        let (mut reading, mut writing) = (true, true);
        while reading || writing {
            tokio::select! {
                m = ws.recv(), if reading => match m {
                    Some(Ok(AxMsg::Binary(b))) => { if in_tx.send(b.to_vec()).await.is_err() { reading = false } }
                    Some(Ok(AxMsg::Close(_))) | None | Some(Err(_)) => reading = false,
                    _ => {}
                },
                f = out_rx.recv(), if writing => match f {
                    Some(b) => {
                        let end = b.is_empty();
                        if ws.send(AxMsg::Binary(b.into())).await.is_err() { break }
                        if end { writing = false }
                    }
                    None => { let _ = ws.send(AxMsg::Binary(Vec::new().into())).await; writing = false }
                },
            }
        }
        let _ = ws.send(AxMsg::Close(None)).await;
    });
    WsPipe {
        tx: out_tx,
        rx: in_rx,
    }
}

/// Pump a tokio-tungstenite (client side) websocket.
pub fn from_tungstenite<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> WsPipe
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let (mut reading, mut writing) = (true, true);
        while reading || writing {
            tokio::select! {
                m = stream.next(), if reading => match m {
                    Some(Ok(TMsg::Binary(b))) => { if in_tx.send(b.to_vec()).await.is_err() { reading = false } }
                    Some(Ok(TMsg::Close(_))) | None | Some(Err(_)) => reading = false,
                    _ => {}
                },
                f = out_rx.recv(), if writing => match f {
                    Some(b) => {
                        let end = b.is_empty();
                        if sink.send(TMsg::Binary(b.into())).await.is_err() { break }
                        if end { writing = false }
                    }
                    None => { let _ = sink.send(TMsg::Binary(Vec::new().into())).await; writing = false }
                },
            }
        }
        let _ = sink.send(TMsg::Close(None)).await;
    });
    WsPipe {
        tx: out_tx,
        rx: in_rx,
    }
}

/// The control channel: one JSON message per binary frame.
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
