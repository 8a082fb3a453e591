//! `/1.0/instances` endpoints.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State as St};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;

use super::{async_op, parse_body, raw, sync, State};
use crate::core::ActionError;

type Q = Query<HashMap<String, String>>;

fn recursion(q: &HashMap<String, String>) -> u8 {
    q.get("recursion").and_then(|r| r.parse().ok()).unwrap_or(0)
}

/// `GET /1.0/instances[?recursion=0|1|2][&filter=…]`.
pub async fn list(St(d): State, Query(q): Q) -> Result<Response, ActionError> {
    let filter = super::filter::Filter::parse(q.get("filter").map_or("", String::as_str))
        .map_err(ActionError::BadRequest)?;
    let recs = d.db().list_instances()?;
    let level = recursion(&q);
    let mut out = Vec::with_capacity(recs.len());
    for r in &recs {
        if level == 0 && filter.is_empty() {
            out.push(serde_json::json!(format!("/1.0/instances/{}", r.name)));
            continue;
        }
        let j = d.instance_json(r, level >= 2 || !filter.is_empty()).await;
        if !filter.matches(&j) {
            continue;
        }
        out.push(match level {
            0 => serde_json::json!(format!("/1.0/instances/{}", r.name)),
            1 => d.instance_json(r, false).await,
            _ => j,
        });
    }
    Ok(sync(serde_json::Value::Array(out)))
}

pub async fn create(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req = parse_body(&body)?;
    Ok(async_op(&d.create_instance(req)?))
}

pub async fn get_one(
    St(d): State,
    Path(name): Path<String>,
    Query(q): Q,
) -> Result<Response, ActionError> {
    let rec = d.record(&name)?;
    let mut r = sync(d.instance_json(&rec, recursion(&q) >= 1).await);
    let tag = format!("\"{}\"", crate::instance_put::etag(&rec));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    Ok(r)
}

/// `PUT /1.0/instances/<name>`: replace the writable fields (`incus config
/// set`, `unset`, `edit`), honouring `If-Match`; see crate::instance_put.
pub async fn put(
    St(d): State,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req = parse_body(&body)?;
    let if_match = headers
        .get(header::IF_MATCH)
        .map(|v| {
            v.to_str()
                .map_err(|_| ActionError::BadRequest("If-Match: not a valid header value".into()))
        })
        .transpose()?;
    Ok(async_op(&d.put_instance(&name, req, if_match).await?))
}

pub async fn delete(St(d): State, Path(name): Path<String>) -> Result<Response, ActionError> {
    Ok(async_op(&d.delete_instance(&name).await?))
}

pub async fn get_state(St(d): State, Path(name): Path<String>) -> Result<Response, ActionError> {
    Ok(sync(d.instance_state_json(&name).await?))
}

pub async fn put_state(
    St(d): State,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req = parse_body(&body)?;
    Ok(async_op(&d.change_state(&name, req).await?))
}

pub async fn exec(
    St(d): State,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req = parse_body(&body)?;
    Ok(async_op(&d.exec(&name, req).await?))
}

pub async fn get_log(
    St(d): State,
    Path((name, file)): Path<(String, String)>,
) -> Result<Response, ActionError> {
    let p = d.log_path(&name, &file)?;
    let bytes = tokio::fs::read(&p).await.map_err(|_| {
        ActionError::NotFound(format!(
            "Log file {file:?} of instance \"{name}\" not found"
        ))
    })?;
    Ok(raw(bytes))
}

/// The console log: a VM's serial output (`logs/<name>/console.log`), a
/// container's `/var/log/console.log` in its rootfs (running or not).
pub async fn get_console(St(d): State, Path(name): Path<String>) -> Result<Response, ActionError> {
    let spec = d.spec_for(&d.record(&name)?)?;
    if spec.kind == ferry_drivers::InstanceType::Container {
        let log = ferry_drivers::container::ContainerDriver::default()
            .console_log(&spec)
            .await
            .map_err(|e| match e {
                ferry_drivers::DriverError::WrongState(m) => ActionError::Conflict(m),
                e => {
                    ActionError::Internal(format!("cannot read the console log of \"{name}\": {e}"))
                }
            })?;
        return Ok(raw(log));
    }
    let p = d.log_path(&name, "console.log")?;
    // No output yet is an empty log, not an error.
    Ok(raw(tokio::fs::read(&p).await.unwrap_or_default()))
}

#[derive(serde::Deserialize)]
pub struct Patch {
    #[serde(default)]
    config: std::collections::BTreeMap<String, String>,
}

pub async fn patch(
    St(d): State,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req: Patch = parse_body(&body)?;
    d.patch_config(&name, req.config).await?;
    Ok(sync(serde_json::json!({})))
}

#[derive(serde::Deserialize)]
pub struct Post {
    #[serde(default)]
    migration: bool,
    #[serde(default)]
    live: bool,
    #[serde(default)]
    name: String,
    /// Cap in bytes per second on what the move sends (a container's rootfs
    /// passes and memory pages, a VM's disk mirror and RAM stream); absent:
    /// the member's default, else unlimited.
    #[serde(default)]
    bandwidth: Option<u64>,
    #[serde(default)]
    max_downtime_ms: Option<u64>,
    /// VMs: the pause to wait for before accepting up to `max_downtime_ms`.
    #[serde(default)]
    downtime_target_ms: Option<u64>,
    #[serde(default)]
    postcopy: bool,
    /// The state stream's compression: "adaptive" (default), "zstd_frames",
    /// "zstd_frames_acked", "zstd" or "none".
    #[serde(default)]
    state_compression: Option<String>,
}

/// `POST /1.0/instances/<name>?target=M {"migration": true, "live": true}`: move.
pub async fn post(
    St(d): State,
    Path(name): Path<String>,
    Query(q): Q,
    body: Bytes,
) -> Result<Response, ActionError> {
    let req: Post = parse_body(&body)?;
    if !req.name.is_empty() && req.name != name {
        return Err(ActionError::BadRequest(
            "renaming instances is not supported".into(),
        ));
    }
    let target = q.get("target").filter(|t| !t.is_empty()).ok_or_else(|| {
        ActionError::BadRequest(
            "a move needs a target member: ?target=MEMBER (ferry move NAME --target MEMBER)".into(),
        )
    })?;
    if !req.migration {
        return Err(ActionError::BadRequest(
            "set \"migration\": true to move the instance".into(),
        ));
    }
    if req.bandwidth == Some(0) {
        return Err(ActionError::BadRequest(
            "\"bandwidth\" must be a positive number of bytes per second (omit it for unlimited)"
                .into(),
        ));
    }
    if req.max_downtime_ms == Some(0) {
        return Err(ActionError::BadRequest(
            "\"max_downtime_ms\" must be positive (default 300)".into(),
        ));
    }
    if req.downtime_target_ms == Some(0) {
        return Err(ActionError::BadRequest(
            "\"downtime_target_ms\" must be positive (default 10; set it to max_downtime_ms to switch over as soon as QEMU allows)".into(),
        ));
    }
    use ferry_migration::Compression;
    let state_compression = match req.state_compression.as_deref() {
        None => None,
        Some("adaptive") => None,
        Some("zstd_frames") => Some(Compression::ZstdFrames),
        Some("zstd_frames_acked") => Some(Compression::ZstdFramesAcked),
        Some("zstd") => Some(Compression::Zstd),
        Some("none") => Some(Compression::None),
        Some(other) => {
            return Err(ActionError::BadRequest(format!(
                "\"state_compression\": unknown value {other:?}: use \"adaptive\" (the default: per-frame zstd, acknowledged for VMs), \"zstd_frames\", \"zstd_frames_acked\", \"zstd\" or \"none\""
            )))
        }
    };
    let options = ferry_migration::MoveOptions {
        bandwidth: req.bandwidth,
        max_downtime_ms: req.max_downtime_ms,
        downtime_target_ms: req.downtime_target_ms,
        postcopy: req.postcopy,
        state_compression,
    };
    Ok(async_op(
        &d.move_instance(&name, target, req.live, options).await?,
    ))
}
