//! Client tests against a tiny canned HTTP server on a unix socket.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

type Handler = dyn Fn(&str, &str, &str) -> (u16, String) + Send + Sync;

/// Requests seen by the fake server: (method, path+query, body, content-type).
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

struct Fake {
    _dir: tempfile::TempDir,
    client: Client,
    seen: Seen,
}

fn fake(handler: impl Fn(&str, &str, &str) -> (u16, String) + Send + Sync + 'static) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unix.socket");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let handler: Arc<Handler> = Arc::new(handler);
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (handler, seen) = (handler.clone(), seen2.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (handler, seen) = (handler.clone(), seen.clone());
                async move {
                    let method = req.method().to_string();
                    let uri = req.uri().to_string();
                    let ctype = req
                        .headers()
                        .get("content-type")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default();
                    let body = req.into_body().collect().await?.to_bytes();
                    let body = String::from_utf8_lossy(&body).to_string();
                    let (status, out) = handler(&method, &uri, &body);
                    seen.lock().unwrap().push((method, uri, body, ctype));
                    let resp = Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(out)))
                        .unwrap();
                    Ok::<_, hyper::Error>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    Fake {
        client: Client::unix(&path),
        _dir: dir,
        seen,
    }
}

fn sync(metadata: Value) -> (u16, String) {
    let env = json!({"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,"error":"","metadata":metadata});
    (200, env.to_string())
}

fn error(code: u16, msg: &str) -> (u16, String) {
    let env = json!({"type":"error","status":"","status_code":0,"operation":"","error_code":code,"error":msg,"metadata":null});
    (code, env.to_string())
}

fn op(status: &str, code: i64, err: &str, metadata: Value) -> Value {
    json!({"id":"op1","class":"task","description":"Stopping instance","created_at":"2026-11-22T01:00:00Z",
        "updated_at":"2026-11-22T01:00:00Z","status":status,"status_code":code,
        "resources":{"instances":["/1.0/instances/c1"]},"metadata":metadata,"may_cancel":false,"err":err,"location":"none"})
}

fn async_env(op: Value) -> (u16, String) {
    let env = json!({"type":"async","status":"Operation created","status_code":100,
        "operation":"/1.0/operations/op1","error_code":0,"error":"","metadata":op});
    (202, env.to_string())
}

#[tokio::test]
async fn get_sync_and_errors() {
    let f = fake(|_, path, _| match path {
        "/1.0" => sync(json!({"api_version":"1.0"})),
        "/1.0/instances/nope" => error(404, "Instance not found"),
        "/1.0/teapot" => (418, "short and stout".into()),
        _ => (404, String::new()),
    });
    let env = f.client.get("/1.0").await.unwrap();
    assert_eq!(env.metadata["api_version"], "1.0");

    let err = f.client.get("/1.0/instances/nope").await.unwrap_err();
    assert_eq!(err.to_string(), "Instance not found");
    assert_eq!(err.api_status(), Some(404));

    let err = f.client.get("/1.0/teapot").await.unwrap_err();
    assert_eq!(err.to_string(), "short and stout");
    assert_eq!(err.api_status(), Some(418));

    let err = f.client.get("/other").await.unwrap_err();
    assert_eq!(err.to_string(), "Not Found");
}

#[tokio::test]
async fn get_raw_returns_bytes_or_api_error() {
    let f = fake(|_, path, _| match path {
        "/1.0/instances/c1/console?type=log" => (200, "boot\x01log\n".into()),
        _ => error(404, "Instance not found"),
    });
    assert_eq!(
        f.client
            .get_raw("/1.0/instances/c1/console?type=log")
            .await
            .unwrap(),
        b"boot\x01log\n"
    );
    let err = f
        .client
        .get_raw("/1.0/instances/c2/console?type=log")
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Instance not found");
}

#[tokio::test]
async fn wait_operation_polls_until_final() {
    let polls = Arc::new(AtomicUsize::new(0));
    let p = polls.clone();
    let f = fake(move |_, path, _| {
        assert_eq!(path, "/1.0/operations/op1/wait?timeout=1");
        match p.fetch_add(1, Ordering::SeqCst) {
            0 => sync(op(
                "Running",
                103,
                "",
                json!({"stage":"dumping memory (CRIU)"}),
            )),
            1 => sync(op(
                "Running",
                103,
                "",
                json!({"stage":"dumping memory (CRIU)","progress":"40%"}),
            )),
            _ => sync(op("Success", 200, "", json!({"return":0}))),
        }
    });
    let mut stages = Vec::new();
    let done = f
        .client
        .wait_operation("/1.0/operations/op1", |o| stages.push(o.status.clone()))
        .await
        .unwrap();
    assert!(done.is_success());
    assert_eq!(done.metadata["return"], 0);
    assert_eq!(stages, ["Running", "Running", "Success"]);
    assert_eq!(polls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn wait_operation_reports_failure_and_cancel() {
    let f = fake(|_, path, _| match path {
        "/1.0/operations/bad/wait?timeout=1" => sync(op(
            "Failure",
            400,
            "CRIU dump failed: no space left",
            Value::Null,
        )),
        "/1.0/operations/gone/wait?timeout=1" => sync(op("Cancelled", 401, "", Value::Null)),
        _ => error(404, "Operation not found"),
    });
    let err = f.client.wait_operation("bad", |_| {}).await.unwrap_err();
    assert!(matches!(err, ClientError::OperationFailed(_)));
    assert_eq!(err.to_string(), "CRIU dump failed: no space left");
    let err = f.client.wait_operation("gone", |_| {}).await.unwrap_err();
    assert_eq!(err.to_string(), "Operation cancelled");
    let err = f
        .client
        .wait_operation("missing", |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Operation not found");
}

#[tokio::test]
async fn run_async_sends_json_and_waits() {
    let f = fake(|method, path, _| match (method, path) {
        ("PUT", "/1.0/instances/c1/state") => async_env(op("Running", 103, "", Value::Null)),
        ("GET", "/1.0/operations/op1/wait?timeout=1") => sync(op("Success", 200, "", Value::Null)),
        ("PUT", "/1.0/instances/bad/state") => error(400, "Instance is not running"),
        ("PUT", "/1.0/instances/sync/state") => sync(json!({})),
        _ => error(404, "not found"),
    });
    let body = json!({"action":"stop","timeout":-1,"force":false,"stateful":true});
    let mut updates = 0;
    let done = f
        .client
        .run_async(Method::PUT, "/1.0/instances/c1/state", Some(&body), |_| {
            updates += 1
        })
        .await
        .unwrap();
    assert!(done.is_success());
    assert_eq!(updates, 2, "initial operation + one poll");
    {
        let seen = f.seen.lock().unwrap();
        assert_eq!(seen[0].0, "PUT");
        assert_eq!(serde_json::from_str::<Value>(&seen[0].2).unwrap(), body);
        assert_eq!(seen[0].3, "application/json");
        assert_eq!(seen[1].0, "GET");
        assert_eq!(seen[1].3, "", "no content-type without a body");
    }
    let err = f
        .client
        .run_async(Method::PUT, "/1.0/instances/bad/state", Some(&body), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Instance is not running");
    let err = f
        .client
        .run_async(
            Method::PUT,
            "/1.0/instances/sync/state",
            Some(&body),
            |_| {},
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Decode(_)), "{err:?}");
}

#[tokio::test]
async fn run_async_to_end_returns_a_failed_operation_with_its_metadata() {
    let f = fake(|method, path, _| match (method, path) {
        ("POST", "/1.0/cluster/members/m1/state") => async_env(op(
            "Running",
            103,
            "",
            json!({"evacuation_progress": "0/2"}),
        )),
        ("GET", "/1.0/operations/op1/wait?timeout=1") => sync(op(
            "Failure",
            400,
            "Failed to evacuate v1",
            json!({"evacuation": {"failed": 1}}),
        )),
        _ => error(404, "not found"),
    });
    let body = json!({"action": "evacuate", "mode": ""});
    let path = "/1.0/cluster/members/m1/state";
    let mut progress = Vec::new();
    let done = f
        .client
        .run_async_to_end(Method::POST, path, Some(&body), |o| {
            progress.push(o.metadata["evacuation_progress"].clone())
        })
        .await
        .unwrap();
    assert_eq!(progress, [json!("0/2"), Value::Null]);
    assert!(!done.is_success());
    assert_eq!(done.metadata["evacuation"]["failed"], 1);
    let err = done.into_result().unwrap_err();
    assert!(matches!(err, ClientError::OperationFailed(_)));
    assert_eq!(err.to_string(), "Failed to evacuate v1");
    // run_async (the same request) still turns the failure into an error.
    let err = f
        .client
        .run_async(Method::POST, path, Some(&body), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "Failed to evacuate v1");
    let done = f.client.wait_operation_to_end("op1", |_| {}).await.unwrap();
    assert_eq!(done.status, "Failure");
}

#[tokio::test]
async fn typed_helpers() {
    let f = fake(|method, path, _| match (method, path) {
        ("GET", "/1.0/operations?recursion=1") => {
            sync(json!({"running":[op("Running",103,"",Value::Null)],"success":null}))
        }
        ("DELETE", "/1.0/operations/op1") => sync(json!({})),
        ("GET", "/1.0/instances/c1?recursion=1") => {
            sync(json!({"name":"c1","status":"Stopped","status_code":102,"state":{"pid":0}}))
        }
        _ => error(404, "not found"),
    });
    let ops = f.client.operations().await.unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].description, "Stopping instance");
    f.client
        .cancel_operation("/1.0/operations/op1")
        .await
        .unwrap();
    let inst = f.client.instance_full("c1").await.unwrap();
    assert!(!inst.is_active());
    assert_eq!(inst.state.unwrap().pid, 0);
}

#[tokio::test]
async fn connect_error_names_the_socket() {
    let client = Client::unix("/nonexistent/ferry/unix.socket");
    let err = client.get("/1.0").await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with("Cannot connect to ferryd at /nonexistent/ferry/unix.socket: "),
        "{msg}"
    );
    assert!(msg.contains("Is ferryd running?"), "{msg}");
}

#[test]
fn from_env_uses_dir() {
    let c = Client::from_env(Some("/tmp/ferry-x".into()), None).unwrap();
    assert_eq!(c.endpoint(), "/tmp/ferry-x/unix.socket");
}

#[test]
fn operation_ids() {
    assert_eq!(operation_id("abc"), "abc");
    assert_eq!(operation_id("/1.0/operations/abc"), "abc");
    assert_eq!(operation_id("/1.0/operations/abc/"), "abc");
    assert_eq!(operation_id("/1.0/operations/abc?project=default"), "abc");
}
