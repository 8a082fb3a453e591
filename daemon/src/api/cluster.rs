//! `/1.0/cluster` endpoints (Incus-shaped) and the member-to-member
//! `/internal/*` endpoints (raft RPCs, forwarded writes, heartbeats, join).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ferry_db::LogCommand;
use openraft::error::{ClientWriteError, RaftError};
use serde_json::{json, Map, Value};

use super::{async_op, error, parse_body, sync, State};
use crate::cluster::actions::JoinRequest;
use crate::cluster::Heartbeat;
use crate::core::{ActionError, Daemon};
use crate::ops::Outcome;

#[derive(serde::Deserialize)]
struct ClusterPut {
    #[serde(default)]
    server_name: String,
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    cluster_token: String,
}

pub async fn get_cluster(St(d): State) -> Response {
    sync(json!({"server_name": d.member, "enabled": d.cluster().is_some(), "member_config": []}))
}

pub async fn put_cluster(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req: ClusterPut = parse_body(&body)?;
    if !req.enabled {
        return Err(ActionError::BadRequest(
            "disabling clustering is not supported: remove the member instead".into(),
        ));
    }
    let (desc, d2) = if req.cluster_token.is_empty() {
        ("Enabling clustering", d.clone())
    } else {
        ("Joining cluster", d.clone())
    };
    let name = if req.server_name.is_empty() {
        d.member.clone()
    } else {
        req.server_name.clone()
    };
    let op = d
        .ops
        .spawn(desc, json!({"cluster": []}), false, move |_op| async move {
            let res = if req.cluster_token.is_empty() {
                d2.cluster_enable(&name).await
            } else {
                d2.cluster_join(&req.cluster_token).await
            };
            match res {
                Ok(()) => Outcome::Done(Map::new()),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        });
    Ok(async_op(&op))
}

pub async fn list_members(
    St(d): State,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ActionError> {
    let members = d.members_json()?;
    if q.get("recursion").is_some_and(|r| r != "0") {
        return Ok(sync(Value::Array(members)));
    }
    let urls: Vec<String> = members
        .iter()
        .map(|m| {
            format!(
                "/1.0/cluster/members/{}",
                m["server_name"].as_str().unwrap_or("")
            )
        })
        .collect();
    Ok(sync(json!(urls)))
}

pub async fn get_member(St(d): State, Path(name): Path<String>) -> Result<Response, ActionError> {
    let m = d
        .members_json()?
        .into_iter()
        .find(|m| m["server_name"] == name.as_str());
    m.map(sync)
        .ok_or_else(|| ActionError::NotFound(format!("member \"{name}\" not found")))
}

#[derive(serde::Deserialize)]
struct MemberStatePost {
    action: String,
    #[serde(default)]
    mode: String,
}

/// `POST /1.0/cluster/members/<name>/state`: evacuate or restore (the
/// forwarding layer already sent it to the member itself).
pub async fn post_member_state(
    St(d): State,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req: MemberStatePost = parse_body(&body)?;
    crate::evacuate::parse_request(&req.action, &req.mode)?;
    if d.require_cluster()?.db.get_member(&name)?.is_none() {
        return Err(ActionError::NotFound(format!(
            "member \"{name}\" not found: see `ferry cluster list`"
        )));
    }
    Ok(async_op(
        &d.member_state(&name, &req.action, &req.mode).await?,
    ))
}

#[derive(serde::Deserialize)]
struct AddMember {
    server_name: String,
}

pub async fn add_member(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req: AddMember = parse_body(&body)?;
    let token = d.cluster_add(&req.server_name).await?;
    let mut meta = Map::new();
    meta.insert("serverName".into(), json!(token.member_name));
    meta.insert("fingerprint".into(), json!(token.fingerprint));
    meta.insert("addresses".into(), json!(token.addresses));
    meta.insert(
        "expiresAt".into(),
        json!(chrono::DateTime::from_timestamp(token.expires_at, 0).map(|t| t.to_rfc3339())),
    );
    meta.insert("token".into(), json!(token.encode()));
    let op = d.ops.spawn(
        "Requesting a join token",
        json!({"cluster": []}),
        false,
        move |_| async move { Outcome::Done(meta) },
    );
    op.wait(Some(std::time::Duration::from_secs(5))).await;
    Ok(async_op(&op))
}

pub async fn delete_member(
    St(d): State,
    Path(name): Path<String>,
) -> Result<Response, ActionError> {
    let c = d.require_cluster()?;
    if !c.is_leader() {
        let (_, leader) = c
            .leader()
            .ok_or_else(|| ActionError::Internal("no cluster leader yet: retry".into()))?;
        let r = c
            .peers
            .send(
                &leader,
                hyper::Method::DELETE,
                &format!("/1.0/cluster/members/{name}"),
                Bytes::new(),
            )
            .await
            .map_err(|e| ActionError::Internal(e.to_string()))?;
        return Ok((r.status, [("content-type", "application/json")], r.body).into_response());
    }
    d.cluster_remove(&name).await?;
    Ok(sync(json!({})))
}

// ---- member-to-member ----

fn json_reply<T: serde::Serialize>(v: &T) -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::to_value(v).unwrap_or(Value::Null)),
    )
        .into_response()
}

fn cluster_of(d: &Arc<Daemon>) -> Result<Arc<crate::cluster::Cluster>, ActionError> {
    d.cluster()
        .ok_or_else(|| ActionError::Conflict("this member is not clustered (yet)".into()))
}

pub async fn raft_append(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    let req = parse_body(&body)?;
    Ok(json_reply(&c.raft.append_entries(req).await))
}

pub async fn raft_vote(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    let req = parse_body(&body)?;
    Ok(json_reply(&c.raft.vote(req).await))
}

pub async fn raft_snapshot(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    let req = parse_body(&body)?;
    Ok(json_reply(&c.raft.install_snapshot(req).await))
}

/// A write forwarded by a follower: commit it here if leader.
pub async fn raft_write(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    let entry: LogCommand = parse_body(&body)?;
    let attempt =
        tokio::time::timeout(crate::cluster::WRITE_TIMEOUT, c.raft.client_write(entry)).await;
    let Ok(attempt) = attempt else {
        return Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no quorum: the leader could not commit the write".into(),
        ));
    };
    match attempt {
        Ok(resp) => Ok(json_reply(&crate::cluster::ForwardedWrite {
            result: resp.data,
            log_index: resp.log_id.index,
        })),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Ok(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not the leader (any more): retry".into(),
        )),
        Err(e) => Ok(error(StatusCode::SERVICE_UNAVAILABLE, format!("raft: {e}"))),
    }
}

pub async fn raft_barrier(St(d): State) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    Ok(json_reply(&c.read_index().await?))
}

pub async fn heartbeat(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let c = cluster_of(&d)?;
    let hb: Heartbeat = parse_body(&body)?;
    c.record_heartbeat(hb);
    Ok(json_reply(&crate::cluster::local_heartbeat(&d.member)))
}

pub async fn join(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req: JoinRequest = parse_body(&body)?;
    Ok(json_reply(&d.handle_join(req).await?))
}

/// The state machine's checksum and applied index, to compare members.
pub async fn checksum(St(d): State) -> Result<Response, ActionError> {
    let db = d.db();
    Ok(json_reply(
        &json!({"checksum": db.checksum()?, "applied_index": db.applied_index()?}),
    ))
}

pub async fn migration_sink(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req: crate::migrate::SinkRequest = parse_body(&body)?;
    d.migration_sink(req).await?;
    Ok(json_reply(&json!({})))
}
