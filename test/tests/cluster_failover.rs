//! Raft under failure, with real ferryd processes: the leader is killed with
//! SIGKILL during a stream of writes; a new leader takes over within seconds,
//! no acknowledged write is lost, and all members converge to identical DB
//! contents. A member restarted after the log was compacted catches up by
//! snapshot. Garbage on the cluster port does not hurt a member.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_client::Method;
use ferry_test::{
    cluster_members, form_cluster, leader_name, need_root, raw_unix, start_cluster, wait_for,
    Member,
};
use serde_json::json;

async fn patch(m: &Member, key: &str, value: &str) -> bool {
    let body = json!({"config": {key: value}}).to_string();
    let sock = m.dir.join("unix.socket");
    let fut = raw_unix(&sock, "PATCH", "/1.0/instances/w", Some(body.as_bytes()));
    matches!(
        tokio::time::timeout(Duration::from_secs(20), fut).await,
        Ok((200, _))
    )
}

async fn converged(ms: &[&Member]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut sums = vec![];
        for m in ms {
            sums.push(m.db_checksum().await);
        }
        if sums.iter().all(|s| s == &sums[0]) {
            return sums[0].0.clone();
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge: {sums:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn leader_killed_during_writes_loses_no_acknowledged_write() {
    if !need_root("leader_killed_during_writes_loses_no_acknowledged_write") {
        return;
    }
    let env = [("FERRY_RAFT_SNAPSHOT_EVERY", "20")];
    let mut ms: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| Member::start_with_env(n, &env))
        .collect();
    form_cluster(&ms);
    let leader = leader_name(&ms[0]).unwrap();
    let li = ms.iter().position(|m| m.name == leader).unwrap();
    let fi = (li + 1) % 3;
    let follower = ms[fi].name.clone();
    ms[0].ferry_ok(&[
        "launch",
        "busybox",
        "w",
        "--no-start",
        "--target",
        &follower,
    ]);

    // Writes go through the follower that holds `w` (forwarded to the leader by raft).
    let mut acked = BTreeMap::new();
    let mut first_after_kill = None;
    let mut killed_at = None;
    let start = Instant::now();
    let mut i = 0u32;
    while start.elapsed() < Duration::from_secs(12) {
        i += 1;
        if killed_at.is_none() && i == 30 {
            ms[li].kill_daemon();
            killed_at = Some(Instant::now());
        }
        let (k, v) = (format!("user.k{i}"), i.to_string());
        if patch(&ms[fi], &k, &v).await {
            acked.insert(k, v);
            if let (Some(t), None) = (killed_at, first_after_kill) {
                first_after_kill = Some(t.elapsed());
            }
        }
    }
    let recovered = first_after_kill.expect("no write succeeded after the leader was killed");
    eprintln!(
        "{} writes attempted, {} acknowledged; first write after the kill succeeded {:?} after it",
        i,
        acked.len(),
        recovered
    );
    assert!(
        recovered < Duration::from_secs(10),
        "writes resumed only after {recovered:?}"
    );
    let new_leader = leader_name(&ms[fi]).unwrap();
    assert_ne!(new_leader, leader, "a new leader must have been elected");
    let down = cluster_members(&ms[fi])
        .into_iter()
        .find(|x| x["server_name"] == leader.as_str())
        .unwrap();
    assert_eq!(down["status"], "Offline", "{down}");

    // The killed member comes back (its log was compacted meanwhile: catch-up by snapshot).
    ms[li].start_daemon();
    wait_for(20, "the old leader online again", || {
        cluster_members(&ms[fi])
            .iter()
            .all(|x| x["status"] == "Online")
            .then_some(())
    });
    let refs: Vec<&Member> = ms.iter().collect();
    let sum = converged(&refs).await;
    eprintln!("converged: {sum}");
    let snapshots = std::fs::read_dir(ms[li].dir.join("snapshots"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(snapshots > 0, "the restarted member holds no snapshot");
    // No acknowledged write is lost, on any member.
    for m in &ms {
        let inst = m.instance("w").await;
        for (k, v) in &acked {
            assert_eq!(
                inst["config"][k],
                json!(v),
                "acknowledged write {k}={v} lost (seen from {})",
                m.name
            );
        }
    }
    ms[0].ferry_ok(&["delete", "w"]);
    let _ = Method::GET;
}

#[tokio::test]
async fn garbage_on_the_cluster_port_and_malformed_raft_messages_are_refused() {
    if !need_root("garbage_on_the_cluster_port_and_malformed_raft_messages_are_refused") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for junk in [
        &b"\x16\x03\x01\x00\x05hello"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0u8; 4096][..],
    ] {
        let mut s = tokio::net::TcpStream::connect(&ms[0].https).await.unwrap();
        let _ = s.write_all(junk).await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    // Malformed raft messages from a real member identity (the cluster cert).
    let cert = ferry_cluster::ClusterCert::load(&ms[1].dir)
        .unwrap()
        .unwrap();
    let tls = ferry_cluster::mtls::member_client_config(&cert).unwrap();
    let tcp = tokio::net::TcpStream::connect(&ms[0].https).await.unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ferry_cluster::mtls::cluster_server_name(), tcp)
        .await
        .unwrap();
    let body = "{\"vote\": 12, \"entries\": \"nope\"}";
    let req = format!("POST /internal/raft/append HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    let _ = conn.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("Malformed JSON"), "{resp}");
    // Still healthy: a replicated write works and both members agree.
    ms[1].ferry_ok(&["launch", "busybox", "after", "--no-start"]);
    let refs: Vec<&Member> = ms.iter().collect();
    converged(&refs).await;
    ms[0].ferry_ok(&["delete", "after"]);
}

/// With two of three members dead, a write fails with a clear "no quorum"
/// error within a bounded time instead of hanging; once they are back, the
/// cluster recovers and writes succeed again.
#[tokio::test]
async fn losing_quorum_fails_writes_clearly_and_recovers() {
    if !need_root("losing_quorum_fails_writes_clearly_and_recovers") {
        return;
    }
    let mut ms: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| Member::start(n))
        .collect();
    form_cluster(&ms);
    ms[0].ferry_ok(&["launch", "busybox", "w", "--no-start", "--target", "m1"]);
    assert!(patch(&ms[0], "user.a", "1").await);
    ms[1].kill_daemon();
    ms[2].kill_daemon();
    let started = Instant::now();
    let body = json!({"config": {"user.b": "2"}}).to_string();
    let sock = ms[0].dir.join("unix.socket");
    let (code, v) = tokio::time::timeout(
        Duration::from_secs(30),
        raw_unix(&sock, "PATCH", "/1.0/instances/w", Some(body.as_bytes())),
    )
    .await
    .expect("the write hung instead of failing");
    let took = started.elapsed();
    eprintln!("write without quorum: {code} after {took:?}: {v}");
    assert_eq!(code, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("quorum"), "{v}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    ms[1].start_daemon();
    ms[2].start_daemon();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !patch(&ms[0], "user.c", "3").await {
        assert!(Instant::now() < deadline, "the cluster did not recover");
    }
    let refs: Vec<&Member> = ms.iter().collect();
    converged(&refs).await;
    assert_eq!(ms[2].instance("w").await["config"]["user.c"], "3");
    ms[0].ferry_ok(&["delete", "w"]);
}
