//! Transparent forwarding inside a cluster: a request about an instance that
//! lives on another member, a launch placed on another member, or an
//! operation running on another member is proxied there over member mTLS.

use std::sync::Arc;

use axum::body::{to_bytes, Body, Bytes};
use axum::extract::{Request, State as St};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error;
use crate::core::Daemon;

/// Marks a request one member sent another on a client's behalf (never re-forwarded).
pub const FORWARDED: &str = "x-ferry-forwarded";
const MAX_BODY: usize = 16 << 20;

pub async fn forward(St(d): St<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let Some(cluster) = d.cluster() else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let target_member = match segs.as_slice() {
        ["1.0", "instances"] if req.method() == Method::POST => {
            match placement(&d, query.as_deref()).await {
                Ok(m) => m,
                Err(resp) => return resp,
            }
        }
        ["1.0", "instances", name, ..] => {
            d.db().get_instance(name).ok().flatten().map(|r| r.member)
        }
        // Evacuate/restore runs on the member itself.
        ["1.0", "cluster", "members", name, "state"] if req.method() == Method::POST => {
            match cluster.db.get_member(name) {
                Ok(Some(m)) if m.name != d.member => {
                    if !cluster.check_online(&m.name, &m.address).await {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "member \"{}\" is offline: it must be online to evacuate or \
                                 restore it (bring its ferryd back, or remove it with \
                                 `ferry cluster remove {}`)",
                                m.name, m.name
                            ),
                        );
                    }
                    Some(m.name)
                }
                _ => None,
            }
        }
        ["1.0", "operations", id, "websocket"] if d.ops.get(id).is_none() => {
            let id = id.to_string();
            let pq = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            return super::relay::websocket(&d, req, &id, &pq).await;
        }
        ["1.0", "operations", id, ..] if d.ops.get(id).is_none() => {
            return forward_operation(&d, req, &path, query.as_deref())
                .await
                .unwrap_or_else(|| {
                    error(
                        StatusCode::NOT_FOUND,
                        format!("Operation {id} not found on any member"),
                    )
                });
        }
        _ => None,
    };
    match target_member {
        Some(m) if m != d.member => {
            let Ok(Some(rec)) = cluster.db.get_member(&m) else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("member \"{m}\" is not known to the cluster"),
                );
            };
            let pq = match (&query, segs.as_slice()) {
                (None, ["1.0", "instances"]) => format!("{path}?target={m}"),
                (Some(q), ["1.0", "instances"]) if !q.contains("target=") => {
                    format!("{path}?{q}&target={m}")
                }
                (Some(q), _) => format!("{path}?{q}"),
                (None, _) => path.clone(),
            };
            proxy(&d, &rec.address, req, &pq).await
        }
        _ => next.run(req).await,
    }
}

/// Which member a launch goes to: `?target=` if given (must exist), else the
/// online member with the most free memory (decided on a linearizable read).
async fn placement(d: &Arc<Daemon>, query: Option<&str>) -> Result<Option<String>, Response> {
    let cluster = d.cluster().expect("clustered");
    let target = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("target="))
            .map(str::to_string)
    });
    if let Err(e) = cluster.barrier().await {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot place the instance: {e}"),
        ));
    }
    let members = cluster.db.list_members().unwrap_or_default();
    if let Some(t) = target.filter(|t| !t.is_empty()) {
        return match members.iter().find(|m| m.name == t) {
            None => Err(error(
                StatusCode::BAD_REQUEST,
                format!("Member \"{t}\" is not in the cluster: see `ferry cluster list`"),
            )),
            Some(m) if m.state == ferry_db::MEMBER_EVACUATED => Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "Member \"{t}\" is evacuated: no new instance is placed on it; choose \
                     another --target, or bring it back with `ferry cluster restore {t}`"
                ),
            )),
            Some(m) => match cluster.check_online(&t, &m.address).await {
                true => Ok(Some(t)),
                false => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("Member \"{t}\" is offline: choose another --target"),
                )),
            },
        };
    }
    let best = members
        .iter()
        .filter(|m| m.state != "evacuated")
        .filter_map(|m| match cluster.member_seen(&m.name) {
            Some((true, hb)) => Some((hb.mem_free, m.name.clone())),
            _ => None,
        })
        .max();
    match best {
        Some((_, n)) => Ok(Some(n)),
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no member can take a new instance: every member is offline or evacuated \
             (see `ferry cluster list`; `ferry cluster restore MEMBER` brings one back)"
                .into(),
        )),
    }
}

async fn forward_operation(
    d: &Arc<Daemon>,
    req: Request,
    path: &str,
    query: Option<&str>,
) -> Option<Response> {
    let cluster = d.cluster()?;
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let method = req.method().clone();
    let body = to_bytes(req.into_body(), MAX_BODY).await.ok()?;
    for m in cluster.db.list_members().ok()? {
        if m.name == d.member {
            continue;
        }
        if let Ok(r) = send(d, &m.address, method.clone(), &pq, body.clone(), None).await {
            if r.status() != StatusCode::NOT_FOUND {
                return Some(r);
            }
        }
    }
    None
}

async fn proxy(d: &Arc<Daemon>, addr: &str, req: Request, pq: &str) -> Response {
    let method = req.method().clone();
    // An instance's PUT carries `If-Match` (its ETag from a GET).
    let if_match = req
        .headers()
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}"),
            )
        }
    };
    send(d, addr, method, pq, body, if_match.as_deref())
        .await
        .unwrap_or_else(|e| e)
}

async fn send(
    d: &Arc<Daemon>,
    addr: &str,
    method: Method,
    pq: &str,
    body: Bytes,
    if_match: Option<&str>,
) -> Result<Response, Response> {
    let cluster = d.cluster().expect("clustered");
    let mut peers = cluster
        .peers
        .clone()
        .with_timeout(std::time::Duration::from_secs(120))
        .with_header(FORWARDED, "1");
    if let Some(tag) = if_match {
        peers = peers.with_header("if-match", tag);
    }
    match peers.send(addr, method, pq, body).await {
        Ok(r) => {
            super::relay::mirror_operation(d, addr, r.status, &r.body);
            let mut resp = Response::new(Body::from(r.body));
            *resp.status_mut() = r.status;
            let ct = r.content_type.unwrap_or_else(|| "application/json".into());
            if let Ok(v) = HeaderValue::from_str(&ct) {
                resp.headers_mut().insert("content-type", v);
            }
            if let Some(v) = r.etag.and_then(|t| HeaderValue::from_str(&t).ok()) {
                resp.headers_mut().insert(header::ETAG, v);
            }
            Ok(resp)
        }
        Err(e) => Err(error(
            StatusCode::BAD_GATEWAY,
            format!("forwarding to member at {addr} failed: {e}"),
        )
        .into_response()),
    }
}
