//! Formatting and request-building tests for the instance commands, plus
//! command flows against a canned unix-socket server.

use super::*;
use std::sync::{Arc, Mutex};

use clap::Parser;
use ferry_client::Client;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;

use crate::cli::{Cli, Command, Format};

fn full(v: Value) -> InstanceFull {
    serde_json::from_value(v).unwrap()
}

fn running() -> InstanceFull {
    full(
        json!({"name":"c1","type":"container","status":"Running","status_code":103,"location":"none",
        "architecture":"x86_64","created_at":"2026-11-22T01:00:00Z","last_used_at":"2026-11-22T01:05:00Z",
        "stateful":false,"config":{"image.alias":"busybox","limits.memory":"256MiB","volatile.last_state.power":"RUNNING"},
        "state":{"status":"Running","status_code":103,"pid":1234,"processes":2,"started_at":"2026-11-22T01:05:00Z",
            "memory":{"usage":1048576,"usage_peak":2097152}},"snapshots":[],"backups":[]}),
    )
}

fn parse(args: &[&str]) -> Command {
    Cli::try_parse_from(std::iter::once("ferry").chain(args.iter().copied()))
        .unwrap()
        .command
}

#[test]
fn list_table() {
    let vm = full(
        json!({"name":"a-vm","type":"virtual-machine","status":"Stopped","status_code":102,
        "location":"member2","state":{"pid":0}}),
    );
    let rows = list_rows(&[running(), vm]);
    let table = render_table(&["NAME", "TYPE", "STATUS", "PID", "LOCATION"], &rows);
    assert_eq!(
        table,
        "NAME  TYPE             STATUS   PID   LOCATION\n\
         a-vm  VIRTUAL-MACHINE  STOPPED        member2\n\
         c1    CONTAINER        RUNNING  1234  none\n"
    );
}

#[test]
fn info_shows_state_and_config() {
    let text = info_text(&running());
    let expected = "Name: c1\nType: container\nStatus: RUNNING\nLocation: none\nImage: busybox\n\
        Architecture: x86_64\nCreated: 2026/11/22 01:00 UTC\nLast Used: 2026/11/22 01:05 UTC\nStateful: false\n\
        PID: 1234\nProcesses: 2\nStarted: 2026/11/22 01:05 UTC\nMemory usage: 1.00MiB\nMemory usage (peak): 2.00MiB\n\
        Config:\n  image.alias: busybox\n  limits.memory: 256MiB\n  volatile.last_state.power: RUNNING\n";
    assert_eq!(text, expected);
}

#[test]
fn info_of_stopped_stateful_instance_has_no_pid() {
    let i = full(
        json!({"name":"c2","status":"Stopped","status_code":102,"stateful":true,"state":{"pid":0}}),
    );
    let text = info_text(&i);
    assert!(text.contains("Type: container\n"));
    assert!(text.contains("Stateful: true\n"));
    assert!(!text.contains("PID"));
    assert!(text.ends_with("Config:\n"));
}

#[test]
fn launch_request_body() {
    let Command::Launch(a) = parse(&["launch", "busybox", "c1", "-c", "limits.memory=256MiB"])
    else {
        panic!()
    };
    assert_eq!(
        launch_body(&a),
        json!({"name":"c1","type":"container","source":{"type":"image","alias":"busybox"},
            "config":{"limits.memory":"256MiB"},"start":true})
    );
    let Command::Launch(a) = parse(&["launch", "debian", "v1", "--vm", "--no-start"]) else {
        panic!()
    };
    assert_eq!(
        launch_body(&a),
        json!({"name":"v1","type":"virtual-machine","source":{"type":"image","alias":"debian"},"config":{},"start":false})
    );
    let Command::Launch(a) = parse(&["launch", "busybox", "c2", "--storage", "shared"]) else {
        panic!()
    };
    assert_eq!(launch_body(&a)["devices"]["root"]["pool"], "shared");
}

#[test]
fn exec_request_body_and_log_paths() {
    let Command::Exec(a) = parse(&["exec", "c1", "--env", "A=1", "--", "cat", "/counter"]) else {
        panic!()
    };
    assert_eq!(
        exec_body(&a),
        json!({"command":["cat","/counter"],"environment":{"A":"1"},"record-output":true,
            "wait-for-websocket":false,"interactive":false})
    );
    assert_eq!(
        log_path("c1", "/1.0/instances/c1/logs/exec_1.stdout"),
        "/1.0/instances/c1/logs/exec_1.stdout"
    );
    assert_eq!(
        log_path("c1", "exec_1.stderr"),
        "/1.0/instances/c1/logs/exec_1.stderr"
    );
}

#[test]
fn state_bodies() {
    assert_eq!(
        state_body("stop", -1, false, true),
        json!({"action":"stop","timeout":-1,"force":false,"stateful":true})
    );
}

/// Canned server answering by (method, path); records every request.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

fn fake(handler: fn(&str, &str) -> (u16, Value)) -> (tempfile::TempDir, Ctx, Seen) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unix.socket");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen2.clone();
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let (m, p) = (req.method().to_string(), req.uri().to_string());
                    let body = req.into_body().collect().await?.to_bytes();
                    let (status, v) = handler(&m, &p);
                    seen.lock()
                        .unwrap()
                        .push((m, p, String::from_utf8_lossy(&body).into()));
                    let resp = hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::from(v.to_string())));
                    Ok::<_, hyper::Error>(resp.unwrap())
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    let ctx = Ctx {
        client: Client::unix(&path),
        format: Format::Table,
    };
    (dir, ctx, seen)
}

fn env(kind: &str, code: u16, metadata: Value) -> (u16, Value) {
    (
        code,
        json!({"type":kind,"status":"","status_code":0,"operation":"","error_code":0,"error":"","metadata":metadata}),
    )
}

fn op_done(metadata: Value) -> Value {
    json!({"id":"op1","status":"Success","status_code":200,"metadata":metadata})
}

#[tokio::test]
async fn delete_force_stops_running_instance_first() {
    let (_d, ctx, seen) = fake(|m, p| match (m, p) {
        ("GET", "/1.0/instances/c1") => env(
            "sync",
            200,
            json!({"name":"c1","status":"Running","status_code":103}),
        ),
        ("PUT", "/1.0/instances/c1/state") | ("DELETE", "/1.0/instances/c1") => env(
            "async",
            202,
            json!({"id":"op1","status":"Running","status_code":103}),
        ),
        ("GET", "/1.0/operations/op1/wait?timeout=1") => env("sync", 200, op_done(Value::Null)),
        _ => (
            404,
            json!({"type":"error","error":"not found","error_code":404}),
        ),
    });
    let Command::Delete(a) = parse(&["delete", "c1", "--force"]) else {
        panic!()
    };
    assert_eq!(delete(&ctx, &a).await.unwrap(), 0);
    let seen = seen.lock().unwrap();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|(m, p, _)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET", "/1.0/instances/c1"),
            ("PUT", "/1.0/instances/c1/state"),
            ("GET", "/1.0/operations/op1/wait?timeout=1"),
            ("DELETE", "/1.0/instances/c1"),
            ("GET", "/1.0/operations/op1/wait?timeout=1"),
        ]
    );
    let stop: Value = serde_json::from_str(&seen[1].2).unwrap();
    assert_eq!(
        stop,
        json!({"action":"stop","timeout":-1,"force":true,"stateful":false})
    );
}

#[tokio::test]
async fn start_resumes_stateful_and_reports_failure() {
    let (_d, ctx, seen) = fake(|m, p| match (m, p) {
        ("GET", "/1.0/instances/c1") => env(
            "sync",
            200,
            json!({"name":"c1","status":"Stopped","status_code":102,"stateful":true}),
        ),
        ("PUT", "/1.0/instances/c1/state") => env(
            "async",
            202,
            json!({"id":"op1","status":"Running","status_code":103}),
        ),
        ("GET", "/1.0/operations/op1/wait?timeout=1") => env(
            "sync",
            200,
            json!({"id":"op1","status":"Failure","status_code":400,"err":"CRIU restore failed"}),
        ),
        _ => (
            404,
            json!({"type":"error","error":"not found","error_code":404}),
        ),
    });
    let err = start(&ctx, "c1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "CRIU restore failed\nTry `ferry console --show-log c1` for more info"
    );
    let body: Value = serde_json::from_str(&seen.lock().unwrap()[1].2).unwrap();
    assert_eq!(
        body,
        json!({"action":"start","timeout":0,"force":false,"stateful":true})
    );
}

#[tokio::test]
async fn exec_returns_the_exit_status() {
    let (_d, ctx, seen) = fake(|m, p| match (m, p) {
        ("POST", "/1.0/instances/c1/exec") => env(
            "async",
            202,
            json!({"id":"op1","status":"Running","status_code":103}),
        ),
        ("GET", "/1.0/operations/op1/wait?timeout=1") => env(
            "sync",
            200,
            op_done(
                json!({"return":3,"output":{"1":"/1.0/instances/c1/logs/exec_op1.stdout","2":"exec_op1.stderr"}}),
            ),
        ),
        ("GET", "/1.0/instances/c1/logs/exec_op1.stdout")
        | ("GET", "/1.0/instances/c1/logs/exec_op1.stderr") => (200, json!("")),
        _ => (
            404,
            json!({"type":"error","error":"not found","error_code":404}),
        ),
    });
    let Command::Exec(a) = parse(&["exec", "c1", "--", "false"]) else {
        panic!()
    };
    assert_eq!(exec(&ctx, &a).await.unwrap(), 3);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert!(seen[2..]
        .iter()
        .all(|(m, p, _)| m == "GET" && p.starts_with("/1.0/instances/c1/logs/exec_op1.std")));
}
