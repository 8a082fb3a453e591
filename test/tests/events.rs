//! `/1.0/events` over the unix socket: every operation change is pushed as an
//! `operation` event, as the Incus client expects, ending with the final status.

use std::time::Duration;

use ferry_test::{need_root, Member};
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn operation_events_are_pushed_until_the_final_status() {
    if !need_root("operation_events_are_pushed_until_the_final_status") {
        return;
    }
    let m = Member::start("m1");
    let stream = tokio::net::UnixStream::connect(m.dir.join("unix.socket"))
        .await
        .unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://unix.socket/1.0/events", stream)
        .await
        .expect("events websocket");
    assert_eq!(resp.status().as_u16(), 101);

    let body = json!({"name": "c1", "type": "container", "source": {"type": "image", "alias": "busybox"}, "start": true});
    let env = m.client.post("/1.0/instances", Some(&body)).await.unwrap();
    let id = env.metadata["id"].as_str().unwrap().to_string();

    let mut seen = vec![];
    let mut lifecycle = vec![];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("no final event within 60 s")
            .unwrap()
            .unwrap();
        let Ok(text) = msg.to_text() else { continue };
        let ev: Value = serde_json::from_str(text).unwrap();
        assert!(
            ev["timestamp"].as_str().is_some_and(|t| t.contains('T')),
            "{ev}"
        );
        if ev["type"] == "lifecycle" {
            lifecycle.push(ev["metadata"]["action"].as_str().unwrap().to_string());
            continue;
        }
        assert_eq!(ev["type"], "operation");
        if ev["metadata"]["id"] != id.as_str() {
            continue;
        }
        let code = ev["metadata"]["status_code"].as_i64().unwrap();
        seen.push(code);
        if code >= 200 {
            assert_eq!(code, 200, "{ev}");
            assert_eq!(ev["metadata"]["err"], "");
            break;
        }
    }
    assert_eq!(
        seen.first(),
        Some(&103),
        "first event should show the operation running: {seen:?}"
    );
    assert!(
        lifecycle.contains(&"instance-created".to_string()),
        "{lifecycle:?}"
    );
    assert!(
        lifecycle.contains(&"instance-started".to_string()),
        "{lifecycle:?}"
    );
    m.ferry_ok(&["delete", "--force", "c1"]);
}
