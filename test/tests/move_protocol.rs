//! The target of a move against a misbehaving source, over the real
//! channels: this test plays the source member (it holds the cluster
//! certificate, asks a real ferryd to receive an instance, and serves the
//! three websockets the target dials over mTLS), then sends an unsupported
//! protocol version, a malformed message and an oversized one. Each time the
//! target answers with a `failure` naming the problem, creates nothing and
//! releases the instance's lease (the next attempt is accepted).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_test::{need_root, start_cluster, Member};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMsg;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// One raw HTTP request from `from`'s member identity to `to`; the response text.
async fn member_post(from: &Member, to: &Member, path: &str, body: &Value) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = ferry_cluster::ClusterCert::load(&from.dir)
        .unwrap()
        .unwrap();
    let tls = ferry_cluster::mtls::member_client_config(&cert).unwrap();
    let tcp = tokio::net::TcpStream::connect(&to.https).await.unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ferry_cluster::mtls::cluster_server_name(), tcp)
        .await
        .unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut resp)).await;
    resp
}

/// Ask `target` to receive instance `name` from us; accept the three
/// channels it dials; return them by role.
async fn sink(
    source: &Member,
    target: &Member,
    listener: &tokio::net::TcpListener,
    acceptor: &tokio_rustls::TlsAcceptor,
    name: &str,
) -> HashMap<&'static str, Ws> {
    let secret = |s: &str| format!("{s}{}", "0".repeat(64 - s.len()));
    let (control, state, fs) = (secret("c0"), secret("5a"), secret("f5"));
    let req = json!({
        "record": {"name": name, "kind": "container", "member": source.name, "status": "Running",
                   "storage_pool": "default", "image": "busybox", "description": "", "config": {},
                   "volatile": {}, "created_at": "2026-01-01T00:00:00Z", "last_used_at": "2026-01-01T00:00:00Z"},
        "source_member": source.name,
        "source_address": listener.local_addr().unwrap().to_string(),
        "operation": "11111111-2222-4333-8444-555555555555",
        "secrets": {"control": control, "state": state, "fs": fs},
        "start_after": false,
    });
    let resp = member_post(source, target, "/internal/migration/sink", &req).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "sink refused: {resp}");
    let mut chans = HashMap::new();
    while chans.len() < 3 {
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the target dials its channels")
            .unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut path = String::new();
        // The callback's error type is tungstenite's, not ours.
        #[allow(clippy::result_large_err)]
        let ws = tokio_tungstenite::accept_hdr_async(
            tls,
            |r: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                path = r.uri().to_string();
                Ok(resp)
            },
        )
        .await
        .unwrap();
        let role = if path.ends_with(&control) {
            "control"
        } else if path.ends_with(&state) {
            "state"
        } else {
            assert!(path.ends_with(&fs), "unexpected channel {path}");
            "fs"
        };
        chans.insert(role, ws);
    }
    chans
}

/// The next binary frame on control, as JSON (pings skipped).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message from the target")
            .expect("control open")
            .unwrap();
        if let WsMsg::Binary(b) = m {
            return serde_json::from_slice(&b).unwrap();
        }
    }
}

#[tokio::test]
async fn a_misbehaving_source_gets_a_clear_failure_and_no_side_effect() {
    if !need_root("a_misbehaving_source_gets_a_clear_failure_and_no_side_effect") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    // Serve as m1: the cluster certificate, members only.
    let cert = ferry_cluster::ClusterCert::load(&ms[0].dir)
        .unwrap()
        .unwrap();
    let trust_dir = tempfile::tempdir().unwrap();
    let server = ferry_cluster::mtls::server_config(
        &cert,
        ferry_cluster::trust::TrustStore::new(trust_dir.path()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hello = |v: u32, min: u32| {
        json!({"type": "hello", "protocol_version": v, "min_version": min,
               "software_version": "ferry test", "role": "source"})
    };
    let volume = ms[1].spec("ghost", false).paths.volume;

    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "unsupported version",
            vec![hello(9, 9).to_string().into_bytes()],
            "no common migration protocol version",
        ),
        (
            "malformed message",
            vec![
                hello(2, 1).to_string().into_bytes(),
                b"{\"type\": \"offer\", \"fs\": 7".to_vec(),
            ],
            "malformed control message",
        ),
        (
            "oversized message",
            vec![hello(2, 1).to_string().into_bytes(), vec![b' '; 2 << 20]],
            "exceeds the 1048576-byte limit",
        ),
    ];
    for (what, frames, expect) in cases {
        let mut ch = sink(&ms[0], &ms[1], &listener, &acceptor, "ghost").await;
        let ctl = ch.get_mut("control").unwrap();
        for f in frames {
            ctl.send(WsMsg::Binary(f.into())).await.unwrap();
        }
        let theirs = next_json(ctl).await;
        assert_eq!(theirs["type"], "hello", "{what}: {theirs}");
        let failure = next_json(ctl).await;
        eprintln!("{what}: {failure}");
        assert_eq!(failure["type"], "failure", "{what}: {failure}");
        let msg = failure["message"].as_str().unwrap();
        assert!(!msg.is_empty() && msg.contains(expect), "{what}: {msg}");
        drop(ch);
        // Nothing was created on the target, and its lease on the instance
        // is released (the next sink request for it is accepted above).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!volume.exists(), "{what}: the target kept files");
    }
    // The cluster is fine: a real container still launches and runs on m2.
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m2"]);
    assert_eq!(ms[1].instance("c1").await["status"], "Running");
    ms[0].ferry_ok(&["delete", "--force", "c1"]);
}
