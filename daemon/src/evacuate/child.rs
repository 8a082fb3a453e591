//! An operation an evacuation waits on: a move or state change here, or a
//! move started on the member that holds the instance (restore).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use hyper::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::core::Daemon;
use crate::ops::Op;

pub enum Child {
    Local(Arc<Op>),
    Remote { addr: String, id: String },
}

const POLL: Duration = Duration::from_millis(500);

impl Child {
    /// `method path` with `body` on `member` (over member mTLS); the answer
    /// must be an async operation.
    pub async fn start_remote(
        d: &Arc<Daemon>,
        member: &str,
        path: &str,
        body: Value,
    ) -> Result<Child, String> {
        let cluster = d.require_cluster().map_err(|e| e.to_string())?;
        let rec = cluster
            .db
            .get_member(member)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("member \"{member}\" is not in the cluster"))?;
        let r = peers(d)?
            .send(
                &rec.address,
                Method::POST,
                path,
                Bytes::from(body.to_string()),
            )
            .await
            .map_err(|e| format!("asking {member}: {e}"))?;
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        match v["metadata"]["id"].as_str() {
            Some(id) if r.status.as_u16() == 202 => Ok(Child::Remote {
                addr: rec.address,
                id: id.to_string(),
            }),
            _ => Err(v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{member} answered HTTP {}", r.status))),
        }
    }

    async fn snapshot(&self, d: &Arc<Daemon>) -> Result<Value, String> {
        match self {
            Child::Local(op) => Ok(op.to_json()),
            Child::Remote { addr, id } => {
                // Long poll: answers at once when the operation ends, else
                // after half a second with its progress.
                let path = format!("/1.0/operations/{id}/wait?timeout=0.5");
                let r = peers(d)?
                    .send(addr, Method::GET, &path, Bytes::new())
                    .await
                    .map_err(|e| e.to_string())?;
                let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
                if r.status.is_success() {
                    Ok(v["metadata"].clone())
                } else {
                    Err(v["error"]
                        .as_str()
                        .unwrap_or("no such operation")
                        .to_string())
                }
            }
        }
    }

    async fn cancel(&self, d: &Arc<Daemon>) {
        match self {
            Child::Local(op) => {
                let _ = op.cancel();
            }
            Child::Remote { addr, id } => {
                if let Ok(p) = peers(d) {
                    let _ = p
                        .send(
                            addr,
                            Method::DELETE,
                            &format!("/1.0/operations/{id}"),
                            Bytes::new(),
                        )
                        .await;
                }
            }
        }
    }

    /// Wait for the operation's end, calling `progress` with its JSON on
    /// every poll; cancels it when `cancel` fires. Ok(final JSON) on success.
    pub async fn follow(
        &self,
        d: &Arc<Daemon>,
        cancel: &CancellationToken,
        progress: impl Fn(&Value),
    ) -> Result<Value, String> {
        let mut cancelled = false;
        let mut unreachable = 0;
        loop {
            if cancel.is_cancelled() && !cancelled {
                cancelled = true;
                self.cancel(d).await;
            }
            match self.snapshot(d).await {
                Ok(j) => {
                    unreachable = 0;
                    progress(&j);
                    if j["status_code"].as_u64().unwrap_or(0) >= 200 {
                        return match j["status"].as_str() {
                            Some("Success") => Ok(j),
                            _ => Err(j["err"].as_str().unwrap_or("failed").to_string()),
                        };
                    }
                }
                // A member restarting: give it a minute before giving up.
                Err(e) => {
                    unreachable += 1;
                    if unreachable > 120 {
                        return Err(format!("lost track of the operation: {e}"));
                    }
                }
            }
            match self {
                Child::Local(op) => {
                    tokio::select! {
                        _ = op.wait(Some(POLL)) => {}
                        _ = cancel.cancelled(), if !cancelled => {}
                    }
                }
                // The snapshot itself waited (long poll), unless it failed.
                Child::Remote { .. } if unreachable == 0 => {}
                Child::Remote { .. } => {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = cancel.cancelled(), if !cancelled => {}
                    }
                }
            }
        }
    }
}

fn peers(d: &Arc<Daemon>) -> Result<crate::cluster::peer::PeerClient, String> {
    let c = d.require_cluster().map_err(|e| e.to_string())?;
    Ok(c.peers
        .clone()
        .with_timeout(Duration::from_secs(30))
        .with_header(crate::api::FORWARDED, "1"))
}
