//! `/1.0/operations` and `/1.0/events`.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State as St};
use axum::response::Response;
use serde_json::{json, Map, Value};

use super::{sync, State};
use crate::core::ActionError;

fn not_found(id: &str) -> ActionError {
    ActionError::NotFound(format!(
        "Operation {id} not found (finished operations are kept for 5 minutes)"
    ))
}

/// `GET /1.0/operations`: this member's operations and, unless the request
/// was forwarded by a member, every other member's (as Incus lists them
/// cluster-wide); a member that does not answer within a second is left out.
pub async fn list(
    St(d): State,
    Query(q): Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let full = q.get("recursion").is_some_and(|r| r != "0");
    let mut by_status: Map<String, Value> = Map::new();
    let mut add = |key: String, item: Value| {
        by_status
            .entry(key)
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .unwrap()
            .push(item);
    };
    for op in d.ops.all() {
        let item = if full {
            op.to_json()
        } else {
            json!(format!("/1.0/operations/{}", op.id))
        };
        add(op.status().name().to_lowercase(), item);
    }
    if !headers.contains_key(super::FORWARDED) {
        for (key, items) in other_members_operations(&d, full).await {
            for item in items {
                add(key.clone(), item);
            }
        }
    }
    sync(Value::Object(by_status))
}

async fn other_members_operations(
    d: &std::sync::Arc<crate::core::Daemon>,
    full: bool,
) -> Vec<(String, Vec<Value>)> {
    let Some(c) = d.cluster() else {
        return vec![];
    };
    let peers = c
        .peers
        .clone()
        .with_timeout(Duration::from_secs(1))
        .with_header(super::FORWARDED, "1");
    let path = format!("/1.0/operations?recursion={}", u8::from(full));
    let members = c.db.list_members().unwrap_or_default();
    let asks = members.iter().filter(|m| m.name != d.member).map(|m| {
        peers.send(
            &m.address,
            axum::http::Method::GET,
            &path,
            Default::default(),
        )
    });
    let mut out = vec![];
    for r in futures::future::join_all(asks).await.into_iter().flatten() {
        let Ok(v) = serde_json::from_slice::<Value>(&r.body) else {
            continue;
        };
        if let Value::Object(m) = &v["metadata"] {
            for (k, items) in m {
                out.push((k.clone(), items.as_array().cloned().unwrap_or_default()));
            }
        }
    }
    out
}

pub async fn get_one(St(d): State, Path(id): Path<String>) -> Result<Response, ActionError> {
    let op = d.ops.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(sync(op.to_json()))
}

pub async fn cancel(St(d): State, Path(id): Path<String>) -> Result<Response, ActionError> {
    let op = d.ops.get(&id).ok_or_else(|| not_found(&id))?;
    op.cancel().map_err(ActionError::BadRequest)?;
    Ok(sync(json!({})))
}

pub async fn wait(
    St(d): State,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ActionError> {
    let op = d.ops.get(&id).ok_or_else(|| not_found(&id))?;
    let timeout = match q.get("timeout").map(|t| t.parse::<f64>()) {
        None => None,
        Some(Ok(t)) if t < 0.0 => None,
        Some(Ok(t)) => Some(Duration::from_secs_f64(t.min(86400.0))),
        Some(Err(_)) => {
            return Err(ActionError::BadRequest(
                "timeout must be a number of seconds (-1: no limit)".into(),
            ))
        }
    };
    op.wait(timeout).await;
    Ok(sync(op.to_json()))
}

/// Events websocket. The subscriber is registered before the 101 response
/// so no event between the upgrade and the first read is lost.
pub async fn events(St(d): State, ws: WebSocketUpgrade) -> Response {
    let rx = d.events.subscribe();
    ws.on_upgrade(move |socket| pump(socket, rx))
}

async fn pump(mut socket: WebSocket, mut rx: tokio::sync::broadcast::Receiver<String>) {
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(text) => if socket.send(Message::Text(text.into())).await.is_err() { break },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "events subscriber too slow");
                }
                Err(_) => break,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
}

/// `GET /1.0/operations/<id>/websocket?secret=S`: a migration channel or an
/// exec stream. The
/// secret is checked (constant time, single use) before the upgrade.
pub async fn websocket(
    St(d): State,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Result<Response, ActionError> {
    let secret = q.get("secret").map(String::as_str).unwrap_or("");
    if let Some(waiter) = d.pending.take(&id, secret) {
        return Ok(ws.on_upgrade(move |socket| async move {
            let _ = waiter.send(crate::migrate::ws::from_axum(socket));
        }));
    }
    let waiter = d
        .exec_pending
        .take(&id, secret)
        .ok_or_else(|| ActionError::Forbidden("invalid or already used websocket secret".into()))?;
    Ok(ws.on_upgrade(move |socket| async move {
        let _ = waiter.send(socket);
    }))
}
