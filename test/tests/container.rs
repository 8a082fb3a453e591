//! Containers end to end: a real ferryd, real namespaces, real CRIU 4.2.1.
//! The counter the container's init writes to /counter must continue across
//! a stateful stop/start and restart from scratch across a stateless one.

use std::time::Duration;

use ferry_test::{need_root, Member};
use serde_json::json;

fn pid_alive(pid: i64) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
                    .unwrap_or(true)
            })
            .unwrap_or(false)
}

fn advancing(m: &Member, name: &str) -> (u64, u64) {
    let a = m.container_counter(name);
    std::thread::sleep(Duration::from_millis(800));
    let b = m.container_counter(name);
    assert!(b > a, "counter of {name} does not advance: {a} then {b}");
    (a, b)
}

#[tokio::test]
async fn container_lifecycle_over_rest_and_cli() {
    if !need_root("container_lifecycle_over_rest_and_cli") {
        return;
    }
    let mut m = Member::start("m1");
    m.launch(
        "c1",
        "container",
        "busybox",
        json!({"limits.memory": "64MiB"}),
    )
    .await;
    let inst = m.instance("c1").await;
    assert_eq!(inst["status"], "Running", "{inst}");
    assert_eq!(inst["type"], "container");
    assert_eq!(inst["location"], "m1");
    let pid = inst["state"]["pid"].as_i64().unwrap();
    assert!(pid_alive(pid), "container init {pid} not running");
    let (_, b) = advancing(&m, "c1");

    // exec runs inside the container's namespaces.
    let n: u64 = ferry_test::wait_for(5, "a counter read through exec", || {
        m.ferry_ok(&["exec", "c1", "--", "cat", "/counter"])
            .trim()
            .parse()
            .ok()
    });
    assert!(n >= b);
    assert_eq!(m.ferry_ok(&["exec", "c1", "--", "hostname"]).trim(), "c1");
    let init = m.ferry_ok(&["exec", "c1", "--", "cat", "/proc/1/cmdline"]);
    assert!(init.contains("init"), "pid 1 in the container is {init:?}");
    let out = m.ferry(&["exec", "c1", "--", "sh", "-c", "echo oops >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops");
    let ns = |p: i64, t: &str| std::fs::read_link(format!("/proc/{p}/ns/{t}")).unwrap();
    for t in ["pid", "mnt", "uts", "ipc", "net"] {
        assert_ne!(
            ns(pid, t),
            ns(std::process::id() as i64, t),
            "container shares the host's {t} namespace"
        );
    }

    // Stateful stop (CRIU dump) over REST: process gone, counter frozen.
    m.state("c1", "stop", true).await;
    let stopped = m.instance("c1").await;
    assert_eq!(stopped["status"], "Stopped");
    assert_eq!(stopped["stateful"], true, "{stopped}");
    assert!(
        !pid_alive(pid),
        "container init {pid} still runs after a stateful stop"
    );
    let at_dump = m.container_counter("c1");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        m.container_counter("c1"),
        at_dump,
        "counter moved while stopped"
    );

    // Stateful start (CRIU restore): the counter continues, it is not reset.
    m.state("c1", "start", false).await;
    let restored = m.instance("c1").await;
    assert_eq!(restored["status"], "Running");
    assert_eq!(restored["stateful"], false);
    let (a, _) = advancing(&m, "c1");
    assert!(a >= at_dump, "counter reset by restore: {a} < {at_dump}");
    eprintln!("container counter: {at_dump} at dump, {a} after restore");

    // Once more through the CLI.
    m.ferry_ok(&["stop", "--stateful", "c1"]);
    let at_dump2 = m.container_counter("c1");
    assert!(at_dump2 >= a);
    let info = m.ferry_ok(&["info", "c1"]);
    assert!(info.to_lowercase().contains("status: stopped"), "{info}");
    m.ferry_ok(&["start", "c1"]);
    let (a2, _) = advancing(&m, "c1");
    assert!(
        a2 >= at_dump2,
        "counter reset by restore: {a2} < {at_dump2}"
    );

    // Stateless stop and start: a cold boot, the counter starts again.
    m.ferry_ok(&["stop", "c1"]);
    assert_eq!(m.instance("c1").await["stateful"], false);
    m.ferry_ok(&["start", "c1"]);
    std::thread::sleep(Duration::from_millis(500));
    let cold = m.container_counter("c1");
    assert!(
        cold < a2,
        "a stateless start should boot fresh: {cold} >= {a2}"
    );
    advancing(&m, "c1");

    let list: serde_json::Value =
        serde_json::from_str(&m.ferry_ok(&["list", "--format", "json"])).unwrap();
    assert_eq!(list[0]["name"], "c1");
    assert_eq!(list[0]["status"], "Running");
    let table = m.ferry_ok(&["list"]);
    assert!(table.contains("c1") && table.contains("RUNNING"), "{table}");

    // The container outlives a daemon restart, and the new daemon finds it.
    let pid = m.instance("c1").await["state"]["pid"].as_i64().unwrap();
    m.restart_daemon();
    let inst = m.instance("c1").await;
    assert_eq!(inst["status"], "Running");
    assert_eq!(inst["state"]["pid"].as_i64().unwrap(), pid);
    advancing(&m, "c1");

    m.ferry_ok(&["delete", "--force", "c1"]);
    assert!(!pid_alive(pid));
    assert!(
        !m.spec("c1", false).paths.volume.exists(),
        "volume left behind"
    );
    let list: serde_json::Value =
        serde_json::from_str(&m.ferry_ok(&["list", "--format", "json"])).unwrap();
    assert_eq!(list, json!([]));
}
