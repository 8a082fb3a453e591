//! The REST API: parses requests, calls the core, shapes Incus-style responses.
//! HTTP status codes exist only here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::core::{ActionError, Daemon};
use crate::ops::Op;

pub mod auth;
mod certificates;
mod cluster;
mod filter;
mod forward;
mod instances;
mod operations;
mod relay;

pub use forward::FORWARDED;

pub type State = axum::extract::State<Arc<Daemon>>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/", get(|| async { sync(json!(["/1.0"])) }))
        .route("/1.0", get(server_info))
        .route(
            "/1.0/instances",
            get(instances::list).post(instances::create),
        )
        .route(
            "/1.0/instances/{name}",
            get(instances::get_one)
                .delete(instances::delete)
                .patch(instances::patch)
                .put(instances::put)
                .post(instances::post),
        )
        .route(
            "/1.0/instances/{name}/state",
            get(instances::get_state).put(instances::put_state),
        )
        .route("/1.0/instances/{name}/exec", post(instances::exec))
        .route("/1.0/instances/{name}/logs/{file}", get(instances::get_log))
        .route("/1.0/instances/{name}/console", get(instances::get_console))
        .route("/1.0/operations", get(operations::list))
        .route(
            "/1.0/operations/{id}",
            get(operations::get_one).delete(operations::cancel),
        )
        .route("/1.0/operations/{id}/wait", get(operations::wait))
        .route("/1.0/operations/{id}/websocket", get(operations::websocket))
        .route(crate::migrate::SINK_PATH, post(cluster::migration_sink))
        .route("/1.0/events", get(operations::events))
        .route(
            "/1.0/certificates",
            get(certificates::list).post(certificates::add),
        )
        .route(
            "/1.0/certificates/{fingerprint}",
            axum::routing::delete(certificates::remove),
        )
        .route(
            "/1.0/cluster",
            get(cluster::get_cluster).put(cluster::put_cluster),
        )
        .route(
            "/1.0/cluster/members",
            get(cluster::list_members).post(cluster::add_member),
        )
        .route(
            "/1.0/cluster/members/{name}",
            get(cluster::get_member).delete(cluster::delete_member),
        )
        .route(
            "/1.0/cluster/members/{name}/state",
            post(cluster::post_member_state),
        )
        .route(crate::cluster::net::APPEND_PATH, post(cluster::raft_append))
        .route(crate::cluster::net::VOTE_PATH, post(cluster::raft_vote))
        .route(
            crate::cluster::net::SNAPSHOT_PATH,
            post(cluster::raft_snapshot),
        )
        .route(crate::cluster::WRITE_PATH, post(cluster::raft_write))
        .route(crate::cluster::BARRIER_PATH, post(cluster::raft_barrier))
        .route(crate::cluster::HEARTBEAT_PATH, post(cluster::heartbeat))
        .route(crate::cluster::JOIN_PATH, post(cluster::join))
        .route("/internal/db/checksum", get(cluster::checksum))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not found: no such API endpoint".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            forward::forward,
        ))
        .layer(axum::middleware::from_fn(auth::authorize))
        .with_state(daemon)
}

/// API extensions this server implements (names as Incus uses them).
const EXTENSIONS: &[&str] = &[
    "api_filtering",
    "container_full",
    "instance_get_full",
    "console",
    "operation_wait",
    "clustering",
    "clustering_evacuation",
];

async fn server_info(axum::extract::State(d): State) -> Response {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    sync(json!({
        "api_extensions": EXTENSIONS,
        "api_status": "stable",
        "api_version": "1.0",
        "auth": "trusted",
        "public": false,
        "auth_methods": ["tls"],
        "config": {},
        "environment": {
            "server": "ferry",
            "server_name": d.member,
            "server_version": crate::core::VERSION,
            "server_clustered": d.cluster().is_some(),
            "architectures": [std::env::consts::ARCH],
            "kernel_version": kernel,
            "driver": "qemu | criu",
            "storage": "dir",
            "project": "default",
        },
    }))
}

pub fn sync(metadata: Value) -> Response {
    let body = json!({"type": "sync", "status": "Success", "status_code": 200, "operation": "",
        "error_code": 0, "error": "", "metadata": metadata});
    (StatusCode::OK, axum::Json(body)).into_response()
}

pub fn async_op(op: &Arc<Op>) -> Response {
    let url = format!("/1.0/operations/{}", op.id);
    let body = json!({"type": "async", "status": "Operation created", "status_code": 100, "operation": url,
        "error_code": 0, "error": "", "metadata": op.to_json()});
    let mut r = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

pub fn error(code: StatusCode, msg: String) -> Response {
    let body = json!({"type": "error", "status": "", "status_code": 0, "operation": "",
        "error_code": code.as_u16(), "error": msg, "metadata": null});
    (code, axum::Json(body)).into_response()
}

impl IntoResponse for ActionError {
    fn into_response(self) -> Response {
        let code = match &self {
            ActionError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ActionError::NotFound(_) => StatusCode::NOT_FOUND,
            ActionError::Conflict(_) => StatusCode::CONFLICT,
            ActionError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ActionError::Forbidden(_) => StatusCode::FORBIDDEN,
            ActionError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            ActionError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(code, self.to_string())
    }
}

/// Parse a JSON body, naming what is wrong when it is not valid.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ActionError> {
    serde_json::from_slice(body).map_err(|e| {
        ActionError::BadRequest(format!(
            "Malformed JSON request body: {e}; see doc/api.md for the expected shape"
        ))
    })
}

pub fn raw(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}
