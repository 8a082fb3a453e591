//! What a member does for a client whose request it forwarded to another
//! member: it mirrors the operation that request created into its own event
//! stream (the Incus client waits for the operation's events on the member it
//! talks to), and it relays the operation's websockets (exec streams) to the
//! member that runs it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as AxMsg, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TClose;
use tokio_tungstenite::tungstenite::Message as TMsg;

use super::error;
use crate::core::Daemon;

const POLL: Duration = Duration::from_millis(250);

/// If `body` (a forwarded request's answer from the member at `addr`) is an
/// async operation, publish its changes here until it ends.
pub fn mirror_operation(d: &Arc<Daemon>, addr: &str, status: StatusCode, body: &Bytes) {
    if status != StatusCode::ACCEPTED {
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let Some(id) = v["metadata"]["id"].as_str().map(str::to_string) else {
        return;
    };
    let (d, addr) = (d.clone(), addr.to_string());
    tokio::spawn(async move {
        let Some(c) = d.cluster() else { return };
        let peers = c
            .peers
            .clone()
            .with_timeout(Duration::from_secs(10))
            .with_header(super::FORWARDED, "1");
        let path = format!("/1.0/operations/{id}");
        let mut last = String::new();
        let mut misses = 0;
        loop {
            match peers.send(&addr, Method::GET, &path, Bytes::new()).await {
                Ok(r) if r.status.is_success() => {
                    misses = 0;
                    let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
                        return;
                    };
                    let op = &v["metadata"];
                    let stamp = op["updated_at"].as_str().unwrap_or_default().to_string()
                        + op["status"].as_str().unwrap_or_default();
                    if stamp != last {
                        d.events.send_operation(op);
                        last = stamp;
                    }
                    if op["status_code"].as_u64().unwrap_or(0) >= 200 {
                        return;
                    }
                }
                // Gone (kept 5 minutes after its end) or its member is down.
                _ => {
                    misses += 1;
                    if misses > 240 {
                        return;
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    });
}

/// `GET /1.0/operations/<id>/websocket?…` for an operation another member
/// runs: upgrade here, dial the same URL there, relay frames both ways.
pub async fn websocket(d: &Arc<Daemon>, req: Request, id: &str, pq: &str) -> Response {
    let Some(c) = d.cluster() else {
        return error(StatusCode::NOT_FOUND, format!("Operation {id} not found"));
    };
    let peers = c
        .peers
        .clone()
        .with_timeout(Duration::from_secs(10))
        .with_header(super::FORWARDED, "1");
    let mut owner = None;
    for m in c.db.list_members().unwrap_or_default() {
        if m.name == d.member {
            continue;
        }
        let path = format!("/1.0/operations/{id}");
        if let Ok(r) = peers
            .send(&m.address, Method::GET, &path, Bytes::new())
            .await
        {
            if r.status.is_success() {
                owner = Some(m.address);
                break;
            }
        }
    }
    let Some(addr) = owner else {
        return error(
            StatusCode::NOT_FOUND,
            format!("Operation {id} not found on any member"),
        );
    };
    let remote = match peers.websocket_raw(&addr, pq).await {
        Ok(ws) => ws,
        Err(e) => {
            return error(
                StatusCode::FORBIDDEN,
                format!("the member running operation {id} refused the websocket: {e}"),
            )
        }
    };
    let (mut parts, _) = req.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    upgrade.on_upgrade(move |local| relay(local, remote))
}

async fn relay<S>(local: WebSocket, remote: tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut lsink, mut lstream) = local.split();
    let (mut rsink, mut rstream) = remote.split();
    let up = async {
        while let Some(Ok(m)) = lstream.next().await {
            let close = matches!(m, AxMsg::Close(_));
            let t = match m {
                AxMsg::Text(t) => TMsg::Text(t.as_str().into()),
                AxMsg::Binary(b) => TMsg::Binary(b),
                AxMsg::Close(f) => TMsg::Close(f.map(|f| TClose {
                    code: f.code.into(),
                    reason: f.reason.as_str().into(),
                })),
                _ => continue,
            };
            if rsink.send(t).await.is_err() || close {
                break;
            }
        }
    };
    let down = async {
        while let Some(Ok(m)) = rstream.next().await {
            let close = matches!(m, TMsg::Close(_));
            let a = match m {
                TMsg::Text(t) => AxMsg::Text(t.as_str().into()),
                TMsg::Binary(b) => AxMsg::Binary(b),
                TMsg::Close(f) => AxMsg::Close(f.map(|f| CloseFrame {
                    code: f.code.into(),
                    reason: f.reason.as_str().into(),
                })),
                _ => continue,
            };
            if lsink.send(a).await.is_err() || close {
                break;
            }
        }
    };
    // One side closed: give the other a moment to finish, then drop both.
    tokio::pin!(up, down);
    let linger = Duration::from_secs(5);
    tokio::select! {
        _ = &mut up => { let _ = tokio::time::timeout(linger, down).await; }
        _ = &mut down => { let _ = tokio::time::timeout(linger, up).await; }
    }
}
