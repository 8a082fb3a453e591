//! Decoding the samples of doc/api.md.

use super::*;
use serde_json::json;

const INSTANCE: &str = r#"{"name":"c1","type":"container","status":"Running","status_code":103,
 "location":"none","description":"","architecture":"x86_64",
 "created_at":"2026-11-22T01:00:00Z","last_used_at":"2026-11-22T01:00:00Z",
 "ephemeral":false,"stateful":false,"profiles":[],"project":"default",
 "config":{"image.alias":"busybox","limits.memory":"256MiB","volatile.last_state.power":"RUNNING"},
 "expanded_config":{},"devices":{},"expanded_devices":{"root":{"type":"disk","path":"/","pool":"default"}}}"#;

const STATE: &str = r#"{"status":"Running","status_code":103,"pid":1234,"processes":2,
 "cpu":{"usage":0},"memory":{"usage":1048576,"usage_peak":0,"total":0,"swap_usage":0,"swap_usage_peak":0},
 "disk":{},"network":null,"started_at":"2026-11-22T01:00:01Z","os_info":null}"#;

const OPERATION: &str = r#"{"id":"6916c8a6-9b7d-4abd-90b3-aedfec7ec7da","class":"task","description":"Stopping instance",
 "created_at":"2026-11-22T01:00:00Z","updated_at":"2026-11-22T01:00:02Z","status":"Running","status_code":103,
 "resources":{"instances":["/1.0/instances/c1"]},
 "metadata":{"stage":"dumping memory (CRIU)","progress":"40%","dump_progress":"12.0 MB"},
 "may_cancel":true,"err":"","location":"none"}"#;

#[test]
fn sync_envelope() {
    let env: Envelope = serde_json::from_str(
        r#"{"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,"error":"","metadata":{"a":1}}"#,
    )
    .unwrap();
    assert_eq!(env.r#type, "sync");
    assert_eq!(env.status_code, 200);
    assert!(!env.is_async() && !env.is_error());
    assert_eq!(env.metadata, json!({"a": 1}));
}

#[test]
fn async_envelope_carries_operation() {
    let body = format!(
        r#"{{"type":"async","status":"Operation created","status_code":100,"operation":"/1.0/operations/6916c8a6-9b7d-4abd-90b3-aedfec7ec7da","error_code":0,"error":"","metadata":{OPERATION}}}"#
    );
    let env: Envelope = serde_json::from_str(&body).unwrap();
    assert!(env.is_async());
    let op: Operation = env.decode().unwrap();
    assert_eq!(op.id, "6916c8a6-9b7d-4abd-90b3-aedfec7ec7da");
    assert_eq!(op.status_code, status_code::RUNNING);
    assert!(!op.is_final());
    assert!(op.may_cancel);
    assert_eq!(
        op.resources["instances"],
        vec!["/1.0/instances/c1".to_string()]
    );
    assert_eq!(op.stage(), Some("dumping memory (CRIU)"));
    assert_eq!(
        op.progress_values(),
        vec![("dump_progress", "12.0 MB"), ("progress", "40%")]
    );
}

#[test]
fn error_envelope() {
    let env: Envelope = serde_json::from_str(
        r#"{"type":"error","status":"","status_code":0,"operation":"","error_code":404,"error":"Instance not found","metadata":null}"#,
    )
    .unwrap();
    assert!(env.is_error());
    assert_eq!(env.error_code, 404);
    assert_eq!(env.error, "Instance not found");
    assert!(env.metadata.is_null());
}

#[test]
fn minimal_and_null_fields_decode() {
    let env: Envelope =
        serde_json::from_str(r#"{"type":"error","error":"x","error_code":500,"metadata":null}"#)
            .unwrap();
    assert_eq!(env.status, "");
    let op: Operation = serde_json::from_str(
        r#"{"id":"x","status_code":200,"resources":null,"err":null,"metadata":null}"#,
    )
    .unwrap();
    assert!(op.is_final() && op.is_success());
    assert!(op.resources.is_empty());
    assert!(op.progress_values().is_empty());
}

#[test]
fn instance_and_state() {
    let inst: Instance = serde_json::from_str(INSTANCE).unwrap();
    assert_eq!(inst.name, "c1");
    assert_eq!(inst.r#type, "container");
    assert!(inst.is_active() && !inst.is_vm());
    assert_eq!(inst.config["volatile.last_state.power"], "RUNNING");
    assert_eq!(inst.expanded_devices["root"]["pool"], "default");
    let st: InstanceState = serde_json::from_str(STATE).unwrap();
    assert_eq!(st.pid, 1234);
    assert_eq!(st.processes, 2);
    assert_eq!(st.memory.usage, 1_048_576);
    assert!(st.network.is_null());
}

#[test]
fn instance_full_flattens() {
    let mut v: Value = serde_json::from_str(INSTANCE).unwrap();
    v["state"] = serde_json::from_str(STATE).unwrap();
    v["snapshots"] = json!([]);
    v["backups"] = Value::Null;
    let full: InstanceFull = serde_json::from_value(v).unwrap();
    assert_eq!(full.name, "c1");
    assert_eq!(full.state.as_ref().unwrap().pid, 1234);
    assert!(full.backups.is_empty());
    let stopped: InstanceFull = serde_json::from_value(
        json!({"name":"c2","status":"Stopped","status_code":102,"state":null}),
    )
    .unwrap();
    assert!(stopped.state.is_none());
    assert!(!stopped.is_active());
}

#[test]
fn operations_map_flattens_sorted() {
    let op: Value = serde_json::from_str(OPERATION).unwrap();
    let mut done = op.clone();
    done["id"] = json!("older");
    done["status"] = json!("Success");
    done["status_code"] = json!(200);
    done["created_at"] = json!("2026-11-21T00:00:00Z");
    let meta = json!({"running": [op], "success": [done], "failure": null});
    let ops = operations_from_metadata(meta).unwrap();
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0].id, "older");
    assert_eq!(ops[1].id, "6916c8a6-9b7d-4abd-90b3-aedfec7ec7da");
    assert!(operations_from_metadata(json!({})).unwrap().is_empty());
}
