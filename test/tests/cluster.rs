//! Clustering end to end: three real ferryd processes on loopback, joined by
//! one-time tokens, replicating their DB with raft over mutual TLS.

use std::time::Duration;

use ferry_client::Client;
use ferry_test::{cluster_members, form_cluster, need_root, wait_for, Member};
use serde_json::Value;

fn members(m: &Member) -> Vec<Value> {
    cluster_members(m)
}

fn form() -> Vec<Member> {
    let ms: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| Member::start(n))
        .collect();
    form_cluster(&ms);
    ms
}

#[tokio::test]
async fn three_members_join_by_token_and_share_instances() {
    if !need_root("three_members_join_by_token_and_share_instances") {
        return;
    }
    let ms = form();
    let table = ms[2].ferry_ok(&["cluster", "list"]);
    assert!(
        table.contains("m1")
            && table.contains("m2")
            && table.contains("m3")
            && table.contains("leader"),
        "{table}"
    );

    // A used token is refused, and so is an expired one; nothing changes.
    let token = ms[0].ferry_ok(&["cluster", "add", "m4"]).trim().to_string();
    let m4 = Member::start("m4");
    m4.ferry_ok(&["cluster", "join", &token]);
    let m4b = Member::start("m4");
    let out = m4b.ferry(&["cluster", "join", &token]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already"), "reused token: {err}");
    let cert = ferry_cluster_fingerprint(&ms[0]);
    let expired = ferry_test_token("m5", &ms[0].https, &cert, 0);
    let m5 = Member::start("m5");
    let out = m5.ferry(&["cluster", "join", &expired]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{out:?}"
    );
    let garbage = m5.ferry(&["cluster", "join", "not-a-token"]);
    assert_eq!(garbage.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&garbage.stderr).contains("token"),
        "{garbage:?}"
    );
    assert_eq!(members(&ms[0]).len(), 4);
    ms[0].ferry_ok(&["cluster", "remove", "m4"]);
    wait_for(10, "m4 removed everywhere", || {
        members(&ms[2])
            .iter()
            .all(|x| x["server_name"] != "m4")
            .then_some(())
    });
    drop(m4);

    // A peer presenting a self-signed certificate is refused at the TLS layer.
    let tmp = tempfile::tempdir().unwrap();
    let (crt, key) = (tmp.path().join("c.crt"), tmp.path().join("c.key"));
    ferry_client::tls::ensure_client_cert(&crt, &key).unwrap();
    let rogue = Client::https(
        &format!("https://{}", ms[0].https),
        &crt,
        &key,
        ms[0].dir.join("cluster.crt"),
    )
    .unwrap();
    let e = rogue
        .get("/1.0")
        .await
        .expect_err("a self-signed peer must be refused");
    eprintln!("self-signed peer refused: {e}");

    // Trusting that client on one member trusts it on every member (replicated).
    let out = ms[0].ferry_ok(&[
        "config",
        "trust",
        "add",
        crt.to_str().unwrap(),
        "--name",
        "alice",
    ]);
    let _ = out;
    let at_m3 = Client::https(
        &format!("https://{}", ms[2].https),
        &crt,
        &key,
        ms[2].dir.join("cluster.crt"),
    )
    .unwrap();
    let env = wait_for_ok(|| async { at_m3.get("/1.0/instances").await.ok() }).await;
    assert_eq!(env.metadata, serde_json::json!([]));
    // A trusted client is not a member: the internal API is refused.
    let err = at_m3
        .post("/internal/raft/write", Some(&serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.api_status(), Some(403), "{err}");
    // Listings read the local copy: m2 shows it once it applied the entry.
    wait_for(10, "the certificate listed on m2", || {
        ms[1]
            .ferry_ok(&["config", "trust", "list"])
            .contains("alice")
            .then_some(())
    });
    let fp = ferry_client::tls::pem_file_fingerprint(&crt).unwrap();
    ms[1].ferry_ok(&["config", "trust", "remove", &fp[..16]]);
    wait_for_ok(|| async { at_m3.get("/1.0").await.is_err().then_some(()) }).await;

    // Instances launched on different members are listed everywhere with their location.
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m2"]);
    ms[2].ferry_ok(&["launch", "busybox", "c2"]);
    let c2_member = {
        let list: Value =
            serde_json::from_str(&ms[2].ferry_ok(&["list", "--format", "json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "c2")
            .unwrap()["location"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for m in &ms {
        let list: Value = serde_json::from_str(&m.ferry_ok(&["list", "--format", "json"])).unwrap();
        let loc = |n: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == n)
                .map(|i| i["location"].clone())
        };
        assert_eq!(loc("c1"), Some(Value::from("m2")), "on {}: {list}", m.name);
        let status = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "c1")
            .unwrap()["status"]
            .clone();
        assert_eq!(
            status, "Running",
            "c1's status as listed on {}: {list}",
            m.name
        );
        assert_eq!(
            loc("c2"),
            Some(Value::from(c2_member.as_str())),
            "on {}: {list}",
            m.name
        );
        let info = m.ferry_ok(&["info", "c1"]);
        assert!(
            info.contains("Location: m2") && info.to_lowercase().contains("status: running"),
            "{info}"
        );
    }
    // The container really runs on m2 (its volume is in m2's data dir), nowhere else.
    assert!(ms[1].spec("c1", false).paths.volume.join("rootfs").exists());
    assert!(!ms[0].spec("c1", false).paths.volume.exists());
    // Exec and stop/start through another member are forwarded.
    let n: u64 = wait_for(5, "a counter read through exec", || {
        ms[0]
            .ferry_ok(&["exec", "c1", "--", "cat", "/counter"])
            .trim()
            .parse()
            .ok()
    });
    assert!(n > 0);
    ms[2].ferry_ok(&["stop", "--stateful", "c1"]);
    ms[2].ferry_ok(&["start", "c1"]);
    ms[0].ferry_ok(&["delete", "--force", "c1"]);
    ms[0].ferry_ok(&["delete", "--force", "c2"]);
    wait_for(10, "no instance listed on m2", || {
        let list: Value =
            serde_json::from_str(&ms[1].ferry_ok(&["list", "--format", "json"])).unwrap();
        (list == serde_json::json!([])).then_some(())
    });
    // Every member's state machine holds the same contents.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut sums = vec![];
        for m in &ms {
            sums.push(m.db_checksum().await);
        }
        if sums.iter().all(|s| s == &sums[0]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "members' databases differ: {sums:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn ferry_cluster_fingerprint(m: &Member) -> String {
    ferry_client::tls::pem_file_fingerprint(&m.dir.join("cluster.crt")).unwrap()
}

/// A well-formed token that expired (secret unknown to the cluster).
fn ferry_test_token(name: &str, addr: &str, fingerprint: &str, ttl_secs: u64) -> String {
    let mut t = ferry_cluster::token::JoinToken::new(
        name,
        vec![addr.to_string()],
        fingerprint,
        Duration::from_secs(ttl_secs),
    );
    t.expires_at -= 10;
    t.encode()
}

async fn wait_for_ok<T, F, Fut>(f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
