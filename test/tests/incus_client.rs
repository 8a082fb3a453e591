//! The stock `incus` client (Debian incus-client 6.0.4, installed by
//! scripts/setup.sh) drives real ferryd members over their unix sockets:
//! list, info, start/stop (stateful too), exec, move, cluster list,
//! evacuate/restore, operation list, console, config set/get/show/unset.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use ferry_test::{location, need_root, start_cluster, wait_for, Member};
use serde_json::Value;

/// `incus ARGS` against `m`'s unix socket, with a throw-away client config.
fn incus(m: &Member, conf: &Path, args: &[&str]) -> Output {
    let out = Command::new("incus")
        .args(args)
        .env("INCUS_SOCKET", m.dir.join("unix.socket"))
        .env("INCUS_CONF", conf)
        .env_remove("INCUS_PROJECT")
        .env_remove("INCUS_REMOTE")
        .output()
        .expect("run incus: install it with scripts/setup.sh (Debian incus-client 6.0.4)");
    eprintln!(
        "$ incus {} (via {}) -> {:?}\n{}{}",
        args.join(" "),
        m.name,
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn incus_ok(m: &Member, conf: &Path, args: &[&str]) -> String {
    let out = incus(m, conf, args);
    assert!(out.status.success(), "incus {args:?} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// c1's counter through `incus exec` (retried: /counter is rewritten
/// ten times a second and a read can land between truncate and write).
fn counter(m: &Member, conf: &Path) -> u64 {
    wait_for(5, "a counter read through incus exec", || {
        incus_ok(m, conf, &["exec", "c1", "--", "cat", "/counter"])
            .trim()
            .parse()
            .ok()
    })
}

fn counts_past(m: &Member, conf: &Path, floor: u64) -> u64 {
    wait_for(10, "the counter to pass its earlier value", || {
        let n = counter(m, conf);
        (n > floor).then_some(n)
    })
}

fn json_location(m: &Member, conf: &Path) -> (String, String) {
    let list: Value =
        serde_json::from_str(&incus_ok(m, conf, &["list", "--format", "json"])).unwrap();
    let c1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "c1")
        .expect("c1 in incus list");
    (
        c1["location"].as_str().unwrap().to_string(),
        c1["status"].as_str().unwrap().to_string(),
    )
}

/// A client config dir and a cluster of member1 and member2, with the
/// busybox container c1 running on member1.
fn two_members_with_c1() -> (tempfile::TempDir, Vec<Member>) {
    let conf = tempfile::tempdir().unwrap();
    let ms = start_cluster(&["member1", "member2"]);
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "member1"]);
    (conf, ms)
}

#[tokio::test]
async fn stock_incus_client_drives_ferryd() {
    if !need_root("stock_incus_client_drives_ferryd") {
        return;
    }
    let (conf, ms) = two_members_with_c1();
    let conf = conf.path();
    let (m1, m2) = (&ms[0], &ms[1]);

    // list / info / cluster list
    let table = incus_ok(m1, conf, &["list"]);
    assert!(
        table.contains("c1") && table.contains("RUNNING") && table.contains("member1"),
        "{table}"
    );
    assert_eq!(
        json_location(m2, conf),
        ("member1".into(), "Running".into())
    );
    // Server-side filters (api_filtering): the client sends `status eq running`.
    assert!(incus_ok(m1, conf, &["list", "status=running"]).contains("c1"));
    assert!(!incus_ok(m1, conf, &["list", "status=stopped"]).contains("c1"));
    assert!(!incus_ok(m1, conf, &["list", "location=member2"]).contains("c1"));
    let info = incus_ok(m2, conf, &["info", "c1"]);
    for want in ["Name: c1", "Status: RUNNING", "Location: member1", "PID:"] {
        assert!(info.contains(want), "missing {want:?} in:\n{info}");
    }
    let members = incus_ok(m1, conf, &["cluster", "list"]);
    assert!(
        members.contains("member1") && members.contains("member2") && members.contains("ONLINE"),
        "{members}"
    );

    // exec: output and exit code passed through.
    let first = counter(m1, conf);
    let out = incus(
        m1,
        conf,
        &[
            "exec",
            "c1",
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "to-out");
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "to-err");

    // The client forwards SIGTERM to the command (exit 128 + 15).
    let mut sleeper = Command::new("incus")
        .args(["exec", "c1", "--", "sleep", "60"])
        .env("INCUS_SOCKET", m1.dir.join("unix.socket"))
        .env("INCUS_CONF", conf)
        .spawn()
        .unwrap();
    wait_for(10, "sleep running in c1", || {
        let ps = incus_ok(m1, conf, &["exec", "c1", "--", "ps"]);
        ps.contains("sleep 60").then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = sleeper.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{status:?}");

    // A terminal (-t): the command's stdin/stdout are a tty.
    let out = incus(
        m1,
        conf,
        &["exec", "-t", "c1", "--", "sh", "-c", "stty size; exit 4"],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("24 80"),
        "{out:?}"
    );

    // restart, stop / start, then a stateful stop: the counter continues on start.
    let pid = m1.instance("c1").await["state"]["pid"].as_i64();
    incus_ok(m1, conf, &["restart", "c1"]);
    let inst = m1.instance("c1").await;
    assert_eq!(inst["status"], "Running");
    assert_ne!(
        inst["state"]["pid"].as_i64(),
        pid,
        "restart kept the old init"
    );
    incus_ok(m1, conf, &["stop", "c1"]);
    assert_eq!(m1.instance("c1").await["status"], "Stopped");
    incus_ok(m1, conf, &["start", "c1"]);
    assert_eq!(m1.instance("c1").await["status"], "Running");
    let before = counts_past(m1, conf, 0);
    incus_ok(m1, conf, &["stop", "--stateful", "c1"]);
    let inst = m1.instance("c1").await;
    assert_eq!(inst["status"], "Stopped");
    assert_eq!(inst["stateful"], true, "{inst}");
    let saved = m1.container_counter("c1");
    assert!(saved >= before);
    incus_ok(m1, conf, &["start", "c1"]);
    let resumed = counts_past(m1, conf, saved);
    assert!(
        resumed > saved,
        "the stateful start did not resume the counter"
    );
    let _ = first;

    // Evacuate member1 live through member2's socket, then restore.
    let before = counter(m1, conf);
    incus_ok(
        m2,
        conf,
        &[
            "cluster",
            "evacuate",
            "member1",
            "--action",
            "live-migrate",
            "--force",
        ],
    );
    assert_eq!(
        json_location(m1, conf),
        ("member2".into(), "Running".into())
    );
    let members = incus_ok(m2, conf, &["cluster", "list"]);
    assert!(members.contains("EVACUATED"), "{members}");
    let after = counts_past(m2, conf, before);
    incus_ok(m2, conf, &["cluster", "restore", "member1", "--force"]);
    assert_eq!(
        json_location(m2, conf),
        ("member1".into(), "Running".into())
    );
    let members = incus_ok(m1, conf, &["cluster", "list"]);
    assert!(!members.contains("EVACUATED"), "{members}");
    let after = counts_past(m1, conf, after);

    // A live move; exec through the other member (websockets relayed).
    incus_ok(m1, conf, &["move", "c1", "--target", "member2"]);
    assert_eq!(
        json_location(m1, conf),
        ("member2".into(), "Running".into())
    );
    assert_eq!(location(m1, "c1").as_deref(), Some("member2"));
    counts_past(m1, conf, after);

    // operation list (cluster-wide) and the console log.
    let ops = incus_ok(m1, conf, &["operation", "list"]);
    assert!(
        ops.contains("Migrating instance") && ops.contains("SUCCESS"),
        "{ops}"
    );
    let console = incus_ok(m1, conf, &["console", "c1", "--show-log"]);
    assert!(
        console.contains("init: ferry busybox container c1 booting"),
        "no boot banner in the console log:\n{console}"
    );

    // Errors are Incus-style: a clear message and a non-zero exit.
    let out = incus(m1, conf, &["info", "nosuch"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
    let out = incus(m1, conf, &["exec", "nosuch", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let ops = m1.client.operations().await.unwrap();
    assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
}

/// `curl` over `m`'s unix socket: (HTTP status, headers + body).
fn curl(m: &Member, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--unix-socket"])
        .arg(m.dir.join("unix.socket"))
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status from curl {args:?}: {out:?}"));
    (status, text)
}

/// The `ETag` header in a `curl -i` answer.
fn etag_of(answer: &str) -> String {
    answer
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("etag").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no ETag in:\n{answer}"))
}

#[tokio::test]
async fn stock_incus_config_set_get_show_unset() {
    if !need_root("stock_incus_config_set_get_show_unset") {
        return;
    }
    let (conf, ms) = two_members_with_c1();
    let conf = conf.path();
    let (m1, m2) = (&ms[0], &ms[1]);
    let cgroup = std::path::PathBuf::from(
        m1.instance("c1").await["config"]["volatile.cgroup"]
            .as_str()
            .expect("volatile.cgroup of a running container"),
    );
    let memory_limit = || -> u64 {
        let v = ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .find_map(|f| std::fs::read_to_string(cgroup.join(f)).ok())
            .expect("memory limit file of c1's cgroup");
        v.trim().parse().unwrap_or(u64::MAX)
    };
    let unlimited = memory_limit();
    assert!(unlimited > 1 << 40, "{unlimited}");

    // Through member2: GET + PUT forwarded to member1 with the ETag.
    incus_ok(
        m2,
        conf,
        &[
            "config",
            "set",
            "c1",
            "limits.memory=128MiB",
            "user.note=hi",
        ],
    );
    let cfg = m1.instance("c1").await["config"].clone();
    assert_eq!(cfg["limits.memory"], "128MiB", "{cfg}");
    assert_eq!(cfg["user.note"], "hi", "{cfg}");
    assert_eq!(
        memory_limit(),
        128 << 20,
        "not applied to the running container"
    );
    assert_eq!(
        incus_ok(m2, conf, &["config", "get", "c1", "limits.memory"]).trim(),
        "128MiB"
    );
    assert_eq!(
        m2.ferry_ok(&["config", "get", "c1", "limits.memory"])
            .trim(),
        "128MiB"
    );
    assert_eq!(m2.ferry_ok(&["config", "get", "c1", "limits.cpu"]), "\n");
    let shown = incus_ok(m1, conf, &["config", "show", "c1"]);
    assert!(
        shown.contains("limits.memory: 128MiB") && shown.contains("user.note: hi"),
        "{shown}"
    );

    // Bad values and ferry's own keys are refused, naming the key; nothing changes.
    let before = m1.instance("c1").await["config"].clone();
    for (arg, named) in [
        ("limits.cpu=lots", "limits.cpu"),
        ("volatile.cgroup=/elsewhere", "volatile.cgroup"),
        ("image.alias=alpine", "image.alias"),
    ] {
        let out = incus(m2, conf, &["config", "set", "c1", arg]);
        assert_ne!(out.status.code(), Some(0), "{arg} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{arg}: {err}");
        assert_eq!(
            m1.instance("c1").await["config"],
            before,
            "{arg} changed the config"
        );
    }
    assert_eq!(memory_limit(), 128 << 20);

    // If-Match: the ETag both members give is the one a PUT must carry; a
    // stale one is refused with 412 and changes nothing.
    let (code, a1) = curl(m1, &["http://f/1.0/instances/c1"]);
    assert_eq!(code, 200, "{a1}");
    let (_, a2) = curl(m2, &["http://f/1.0/instances/c1"]);
    let tag = etag_of(&a1);
    assert_eq!(tag, etag_of(&a2), "member2 forwards a different ETag");
    let put = r#"{"config": {"limits.memory": "64MiB"}}"#;
    for via in [m1, m2] {
        let (code, answer) = curl(
            via,
            &[
                "-X",
                "PUT",
                "-H",
                "If-Match: \"0000\"",
                "-d",
                put,
                "http://f/1.0/instances/c1",
            ],
        );
        assert_eq!(code, 412, "{answer}");
        assert!(answer.contains("ETag"), "{answer}");
    }
    assert_eq!(m1.instance("c1").await["config"], before);
    let (code, answer) = curl(
        m2,
        &[
            "-X",
            "PUT",
            "-H",
            &format!("If-Match: {tag}"),
            "-d",
            put,
            "http://f/1.0/instances/c1",
        ],
    );
    assert_eq!(code, 202, "{answer}");
    let cfg = m1.instance("c1").await["config"].clone();
    assert_eq!(cfg["limits.memory"], "64MiB", "{cfg}");
    assert!(
        cfg.get("user.note").is_none(),
        "PUT replaces the config: {cfg}"
    );
    assert_eq!(memory_limit(), 64 << 20);

    // unset lifts the limit on the running container.
    incus_ok(m2, conf, &["config", "unset", "c1", "limits.memory"]);
    assert!(m1.instance("c1").await["config"]
        .get("limits.memory")
        .is_none());
    assert!(
        memory_limit() > 1 << 40,
        "limits.memory unset but still applied"
    );

    // config edit: the YAML of `config show`, changed, on stdin.
    let yaml = incus_ok(m1, conf, &["config", "show", "c1"])
        .replace("config:\n", "config:\n  limits.memory: 96MiB\n");
    let mut edit = Command::new("incus")
        .args(["config", "edit", "c1"])
        .env("INCUS_SOCKET", m2.dir.join("unix.socket"))
        .env("INCUS_CONF", conf)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    edit.stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    assert!(
        edit.wait().unwrap().success(),
        "incus config edit failed:\n{yaml}"
    );
    assert_eq!(m1.instance("c1").await["config"]["limits.memory"], "96MiB");
    assert_eq!(memory_limit(), 96 << 20);
    assert_eq!(m1.instance("c1").await["status"], "Running");
    let ops = m1.client.operations().await.unwrap();
    assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
}
