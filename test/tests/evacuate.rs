//! Cluster evacuation and restore with three real members: containers moved
//! live by CRIU, VMs QEMU-to-QEMU, placed by free memory, brought back.

use std::time::{Duration, Instant};

use ferry_client::Method;
use ferry_drivers::vm::VmDriver;
use ferry_test::{form_cluster, location, need_root, pid_alive, wait_for, Member};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn member<'a>(ms: &'a [Member], name: &str) -> &'a Member {
    ms.iter().find(|m| m.name == name).unwrap()
}

/// The instance's counter, read on the member that holds it.
async fn counter(ms: &[Member], name: &str, vm: bool) -> u64 {
    let at = location(&ms[0], name).unwrap();
    let m = member(ms, &at);
    if vm {
        VmDriver::default()
            .read_counter(&m.spec(name, true))
            .await
            .unwrap()
    } else {
        m.container_counter(name)
    }
}

/// Waits until the counter on its current member passes `floor`.
async fn counts_past(ms: &[Member], name: &str, vm: bool, floor: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = counter(ms, name, vm).await;
        if n > floor {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: counter stuck at {n} (was {floor} before)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn member_status(m: &Member, name: &str) -> String {
    let list: Value =
        serde_json::from_str(&m.ferry_ok(&["cluster", "list", "--format", "json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x["server_name"] == name)
        .map(|x| x["status"].as_str().unwrap().to_string())
        .unwrap()
}

async fn pid(ms: &[Member], name: &str) -> i64 {
    let at = location(&ms[0], name).unwrap();
    member(ms, &at).instance(name).await["state"]["pid"]
        .as_i64()
        .unwrap()
}

/// m1 holds two containers and two VMs; m2 offers 400 MiB to instances and
/// m3 600 MiB. Evacuating m1 live puts each instance, biggest first, on the
/// member with the most free memory at its turn; all keep counting. A launch
/// meanwhile never lands on m1. Restore brings all four back, still counting.
#[tokio::test]
async fn evacuate_live_places_by_free_memory_and_restore_brings_all_back() {
    if !need_root("evacuate_live_places_by_free_memory_and_restore_brings_all_back") {
        return;
    }
    let ms = vec![
        Member::start("m1"),
        Member::start_with_env("m2", &[("FERRY_INSTANCE_MEMORY", "400MiB")]),
        Member::start_with_env("m3", &[("FERRY_INSTANCE_MEMORY", "600MiB")]),
    ];
    form_cluster(&ms);
    let m1 = &ms[0];
    let instances = [
        ("v1", true, "256MiB"),
        ("v2", true, "192MiB"),
        ("c1", false, "64MiB"),
        ("c2", false, "32MiB"),
    ];
    for (name, vm, mem) in instances {
        let limit = format!("limits.memory={mem}");
        let mut args = vec![
            "launch",
            if vm { "testvm" } else { "busybox" },
            name,
            "--target",
            "m1",
            "-c",
            &limit,
        ];
        if vm {
            args.push("--vm");
        }
        m1.ferry_ok(&args);
    }
    let mut before = std::collections::BTreeMap::new();
    for (name, vm, _) in instances {
        if vm {
            wait_for(30, "the guest's counter", || {
                let out = m1.ferry_ok(&["console", "--show-log", name]);
                out.contains("counter ").then_some(())
            });
        }
        before.insert(
            name,
            (counts_past(&ms, name, vm, 0).await, pid(&ms, name).await),
        );
    }

    // Evacuate through m2 (forwarded to m1), live.
    let out = ms[1].ferry_ok(&[
        "cluster",
        "evacuate",
        "m1",
        "--action",
        "live-migrate",
        "--force",
        "--format",
        "json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    eprintln!("evacuation report: {report}");
    assert_eq!(report["total"], 4, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let to = |name: &str| -> String {
        report["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| {
                assert_eq!(e["status"], "moved", "{e}");
                assert_eq!(e["action"], "live-migrate", "{e}");
                assert!(e["path"].as_str().unwrap().starts_with("live"), "{e}");
                e["to"].as_str().unwrap().to_string()
            })
            .unwrap()
    };
    // Biggest first, each to the most free memory at its turn:
    // v1 256 → m3 (600 vs 400); v2 192 → m2 (400 vs 344); c1 64 → m3 (344 vs
    // 208); c2 32 → m3 (280 vs 208).
    assert_eq!(
        [to("v1"), to("v2"), to("c1"), to("c2")],
        ["m3", "m2", "m3", "m3"],
        "{report}"
    );
    assert_eq!(member_status(m1, "m1"), "Evacuated");
    for (name, vm, mem) in instances {
        let at = location(&ms[2], name).unwrap();
        assert_eq!(at, to(name), "{name}: the record disagrees with the report");
        let inst = member(&ms, &at).instance(name).await;
        assert_eq!(inst["status"], "Running", "{name}");
        assert_eq!(
            inst["config"]["volatile.evacuate.origin"], "m1",
            "{name}: {inst}"
        );
        let (n, old_pid) = before[name];
        let now = counts_past(&ms, name, vm, n).await;
        assert!(now > n, "{name} counter reset: {now} <= {n}");
        assert!(!pid_alive(old_pid), "{name} still runs on m1");
        let _ = mem;
    }
    // No member took more than it offers.
    for (m, cap) in [("m2", 400 * MIB), ("m3", 600 * MIB)] {
        let used: u64 = instances
            .iter()
            .filter(|(n, _, _)| to(n) == m)
            .map(|(_, _, mem)| mem.trim_end_matches("MiB").parse::<u64>().unwrap() * MIB)
            .sum();
        assert!(used <= cap, "{m} overcommitted: {used} > {cap}");
    }

    // Nothing new lands on an evacuated member.
    ms[1].ferry_ok(&["launch", "busybox", "c3"]);
    assert_ne!(location(m1, "c3").as_deref(), Some("m1"));
    let out = ms[1].ferry(&["launch", "busybox", "c4", "--target", "m1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("evacuated"),
        "{out:?}"
    );
    assert_eq!(location(m1, "c4"), None);
    ms[1].ferry_ok(&["delete", "--force", "c3"]);

    // Restore, raced by a second request on the same member: refused.
    let (code, body) = m1
        .raw(
            Method::POST,
            "/1.0/cluster/members/m1/state",
            Some(
                json!({"action": "restore", "mode": ""})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let op_id = body["metadata"]["id"].as_str().unwrap().to_string();
    let (code, body) = ms[2]
        .raw(
            Method::POST,
            "/1.0/cluster/members/m1/state",
            Some(
                json!({"action": "evacuate", "mode": "stop"})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already being restored"),
        "{body}"
    );
    let done = m1
        .client
        .wait_operation(&op_id, |_| {})
        .await
        .unwrap_or_else(|e| panic!("restore failed: {e}"));
    let report = &done.metadata["evacuation"];
    eprintln!("restore report: {report}");
    assert_eq!(report["total"], 4, "{report}");
    assert_eq!(member_status(m1, "m1"), "Online");
    for (name, vm, _) in instances {
        assert_eq!(location(&ms[1], name).as_deref(), Some("m1"), "{name}");
        let inst = m1.instance(name).await;
        assert_eq!(inst["status"], "Running");
        assert!(
            inst["config"].get("volatile.evacuate.origin").is_none(),
            "{name}: {inst}"
        );
        let (n, _) = before[name];
        let now = counts_past(&ms, name, vm, n).await;
        assert!(now > n, "{name} counter reset by the round trip");
    }
    let ops = m1.client.operations().await.unwrap();
    assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
}

/// One instance cannot move (both other members already hold files with its
/// name): the other moves, the operation fails naming it with the whole
/// report, and it still runs on the evacuated member, untouched. Then
/// `--action stop` stops it in place and restore brings everything back.
#[tokio::test]
async fn a_failing_instance_is_reported_and_keeps_running_on_its_member() {
    if !need_root("a_failing_instance_is_reported_and_keeps_running_on_its_member") {
        return;
    }
    let ms: Vec<Member> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| Member::start(n))
        .collect();
    form_cluster(&ms);
    let m1 = &ms[0];
    for name in ["c1", "c2"] {
        m1.ferry_ok(&["launch", "busybox", name, "--target", "m1"]);
    }
    let c2_pid = m1.instance("c2").await["state"]["pid"].as_i64().unwrap();
    for m in &ms[1..] {
        std::fs::create_dir_all(m.spec("c2", false).paths.volume).unwrap();
    }
    let c1_before = counts_past(&ms, "c1", false, 0).await;

    let out = m1.ferry(&["cluster", "evacuate", "m1", "--force"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("c2"),
        "the error does not name c2: {stderr}"
    );
    assert!(
        stdout.contains("c1") && stdout.contains("c2") && stdout.to_lowercase().contains("failed"),
        "no per-instance report: {stdout}"
    );
    // c1 moved and counts on; c2 runs on m1, same process, record unchanged.
    let c1_at = location(&ms[1], "c1").unwrap();
    assert_ne!(c1_at, "m1");
    counts_past(&ms, "c1", false, c1_before).await;
    assert_eq!(location(&ms[2], "c2").as_deref(), Some("m1"));
    let c2 = m1.instance("c2").await;
    assert_eq!(c2["state"]["pid"].as_i64(), Some(c2_pid));
    assert_eq!(c2["status"], "Running");
    assert!(
        c2["config"].get("volatile.evacuate.origin").is_none(),
        "{c2}"
    );
    assert!(
        c2["config"].get("volatile.placement.target").is_none(),
        "a failed move kept its reservation: {c2}"
    );
    let a = m1.container_counter("c2");
    counts_past(&ms, "c2", false, a).await;
    assert_eq!(member_status(m1, "m1"), "Evacuated");
    for m in &ms {
        let ops = m.client.operations().await.unwrap();
        assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
    }

    // Bad input changes nothing.
    let (code, body) = m1
        .raw(
            Method::POST,
            "/1.0/cluster/members/m1/state",
            Some(br#"{"action":"evacuate","mode":"teleport"}"#),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("live-migrate"),
        "{body}"
    );
    let (code, _) = m1
        .raw(
            Method::POST,
            "/1.0/cluster/members/nosuch/state",
            Some(br#"{"action":"evacuate"}"#),
        )
        .await;
    assert_eq!(code, 404);

    // What cannot move can be stopped in place; restore starts it again and
    // brings c1 back.
    m1.ferry_ok(&["cluster", "evacuate", "m1", "--action", "stop", "--force"]);
    assert_eq!(m1.instance("c2").await["status"], "Stopped");
    assert!(!pid_alive(c2_pid));
    m1.ferry_ok(&["cluster", "restore", "m1", "--force"]);
    assert_eq!(member_status(m1, "m1"), "Online");
    for name in ["c1", "c2"] {
        assert_eq!(location(&ms[2], name).as_deref(), Some("m1"), "{name}");
        let inst = m1.instance(name).await;
        assert_eq!(inst["status"], "Running", "{name}");
        assert!(inst["config"].get("volatile.evacuate.origin").is_none());
    }
    counts_past(&ms, "c1", false, c1_before).await;

    // Per-instance ways out: c1 does not allow live moves (an `auto`
    // evacuation stops, moves and starts it), c2 is pinned to `stop`.
    m1.ferry_ok(&["config", "set", "c1", "migration.stateful=false"]);
    m1.ferry_ok(&["config", "set", "c2", "cluster.evacuate=stop"]);
    let bad = m1.ferry(&["config", "set", "c2", "cluster.evacuate=later"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("live-migrate, migrate or stop"),
        "{bad:?}"
    );
    let out = m1.ferry_ok(&["cluster", "evacuate", "m1", "--force", "--format", "json"]);
    let report: Value = serde_json::from_str(&out).unwrap();
    let entry = |n: &str| {
        report["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(entry("c1")["action"], "migrate", "{report}");
    assert_eq!(entry("c1")["status"], "moved", "{report}");
    assert!(
        entry("c1")["path"]
            .as_str()
            .unwrap()
            .starts_with("stateless"),
        "{report}"
    );
    assert_eq!(entry("c2")["action"], "stop", "{report}");
    assert_eq!(entry("c2")["status"], "stopped", "{report}");
    assert_ne!(location(&ms[1], "c1").as_deref(), Some("m1"));
    assert_eq!(location(&ms[1], "c2").as_deref(), Some("m1"));
    m1.ferry_ok(&["cluster", "restore", "m1", "--force"]);
    for name in ["c1", "c2"] {
        assert_eq!(location(&ms[2], name).as_deref(), Some("m1"), "{name}");
        assert_eq!(m1.instance(name).await["status"], "Running", "{name}");
    }
}

/// An evacuation cancelled while its move copies the container's root
/// filesystem (slowly: m1's moves are capped at 128 KiB/s): the move stops, the
/// container runs on m1 as before (same process, counting), the operation
/// ends Cancelled with the report, and `restore --skip-instances` clears the
/// mark without moving anything.
#[tokio::test]
async fn a_cancelled_evacuation_leaves_the_instance_running_on_its_member() {
    if !need_root("a_cancelled_evacuation_leaves_the_instance_running_on_its_member") {
        return;
    }
    let ms = vec![
        Member::start_with_env(
            "m1",
            &[
                ("FERRY_MIGRATION_BANDWIDTH", "256KiB"),
                ("FERRY_EVACUATE_PARALLEL", "2"),
            ],
        ),
        Member::start("m2"),
    ];
    form_cluster(&ms);
    let m1 = &ms[0];
    m1.ferry_ok(&["launch", "busybox", "c1", "--target", "m1"]);
    let pid = m1.instance("c1").await["state"]["pid"].as_i64().unwrap();
    let before = counts_past(&ms, "c1", false, 0).await;

    let (code, body) = m1
        .raw(
            Method::POST,
            "/1.0/cluster/members/m1/state",
            Some(br#"{"action":"evacuate","mode":"live-migrate"}"#),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let id = body["metadata"]["id"].as_str().unwrap().to_string();
    // Cancel while the root filesystem is being copied (pass 1, running).
    let path = format!("/1.0/operations/{id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, op) = m1.raw(Method::GET, &path, None).await;
        let current = &op["metadata"]["metadata"]["evacuation"]["current"];
        if current[0]["phase"] == "filesystem" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the move never reached its filesystem phase: {op}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = m1.raw(Method::DELETE, &path, None).await;
    assert_eq!(code, 200, "{body}");
    let end = m1.client.wait_operation_to_end(&id, |_| {}).await.unwrap();
    assert_eq!(end.status, "Cancelled", "{end:?}");
    let report = &end.metadata["evacuation"];
    assert_eq!(report["instances"][0]["name"], "c1", "{report}");
    assert_eq!(report["instances"][0]["status"], "failed", "{report}");
    assert!(
        report["instances"][0]["error"]
            .as_str()
            .unwrap()
            .contains("cancel"),
        "{report}"
    );

    assert_eq!(location(&ms[1], "c1").as_deref(), Some("m1"));
    let inst = m1.instance("c1").await;
    assert_eq!(inst["status"], "Running");
    assert_eq!(
        inst["state"]["pid"].as_i64(),
        Some(pid),
        "not the same process"
    );
    assert!(
        inst["config"].get("volatile.placement.target").is_none(),
        "{inst}"
    );
    counts_past(&ms, "c1", false, before).await;
    for m in &ms {
        let ops = m.client.operations().await.unwrap();
        assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
    }
    assert_eq!(member_status(m1, "m1"), "Evacuated");
    m1.ferry_ok(&["cluster", "restore", "m1", "--skip-instances", "--force"]);
    assert_eq!(member_status(m1, "m1"), "Online");
    assert_eq!(location(&ms[1], "c1").as_deref(), Some("m1"));
}
