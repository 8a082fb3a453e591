//! VMs end to end: a real ferryd driving real QEMU (KVM) running the testvm
//! guest. The guest's counter (read over QMP from guest memory, and from its
//! serial console) must continue across a stateful stop/start.

use std::time::Duration;

use ferry_client::Method;
use ferry_drivers::vm::VmDriver;
use ferry_test::{need_root, wait_for, Member};
use serde_json::json;

async fn qmp_counter(m: &Member, name: &str) -> u64 {
    VmDriver::default()
        .read_counter(&m.spec(name, true))
        .await
        .expect("read the guest counter over QMP")
}

fn console_counter(m: &Member, name: &str) -> Option<u64> {
    let out = m.ferry_ok(&["console", "--show-log", name]);
    out.lines().rev().find_map(|l| {
        l.strip_prefix("counter ")
            .and_then(|n| n.trim().parse().ok())
    })
}

fn pid_alive(pid: i64) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

async fn advancing(m: &Member, name: &str) -> (u64, u64) {
    let a = qmp_counter(m, name).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = qmp_counter(m, name).await;
    assert!(
        b > a,
        "guest counter of {name} does not advance: {a} then {b}"
    );
    (a, b)
}

#[tokio::test]
async fn vm_lifecycle_over_rest_and_cli() {
    if !need_root("vm_lifecycle_over_rest_and_cli") {
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("note: /dev/kvm absent: QEMU runs under TCG");
    }
    let m = Member::start("m1");
    m.launch(
        "v1",
        "virtual-machine",
        "testvm",
        json!({"limits.memory": "256MiB", "testvm.dirty_mib": "16"}),
    )
    .await;
    let inst = m.instance("v1").await;
    assert_eq!(inst["status"], "Running", "{inst}");
    assert_eq!(inst["type"], "virtual-machine");
    let pid = inst["state"]["pid"].as_i64().unwrap();
    assert!(pid_alive(pid));
    wait_for(30, "the guest's first counter line on the console", || {
        console_counter(&m, "v1")
    });
    advancing(&m, "v1").await;
    // The console prints the counter every ~100 ms, so it lags the live value read over QMP.
    let printed = console_counter(&m, "v1").unwrap();

    // Stateful stop over REST: QEMU gone, state kept.
    m.state("v1", "stop", true).await;
    let stopped = m.instance("v1").await;
    assert_eq!(stopped["status"], "Stopped");
    assert_eq!(stopped["stateful"], true, "{stopped}");
    wait_for(10, "QEMU to exit", || (!pid_alive(pid)).then_some(()));
    let at_save = console_counter(&m, "v1").unwrap();
    assert!(
        at_save >= printed,
        "console went back: {at_save} < {printed}"
    );

    // Stateful start: the guest continues where it was.
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.state("v1", "start", false).await;
    let after = qmp_counter(&m, "v1").await;
    assert!(
        after >= at_save,
        "guest counter reset by restore: {after} < {at_save}"
    );
    let (a, _) = advancing(&m, "v1").await;
    eprintln!("VM counter: {at_save} at save, {after} right after restore, {a} later");
    assert_eq!(m.instance("v1").await["stateful"], false);

    // Again through the CLI.
    m.ferry_ok(&["stop", "--stateful", "v1"]);
    let at_save2 = console_counter(&m, "v1").unwrap();
    m.ferry_ok(&["start", "v1"]);
    let (a2, _) = advancing(&m, "v1").await;
    assert!(a2 >= at_save2, "guest counter reset: {a2} < {at_save2}");

    // Stateless stop/start: a cold boot, the counter starts again.
    m.ferry_ok(&["stop", "v1"]);
    assert_eq!(m.instance("v1").await["status"], "Stopped");
    m.ferry_ok(&["start", "v1"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let fresh = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not boot again"
        );
        if let Ok(n) = VmDriver::default().read_counter(&m.spec("v1", true)).await {
            if n > 0 {
                break n;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        fresh < a2,
        "a stateless start should boot fresh: {fresh} >= {a2}"
    );

    let out = m.ferry(&["exec", "v1", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("virtual machine"));

    let pid = m.instance("v1").await["state"]["pid"].as_i64().unwrap();
    m.ferry_ok(&["delete", "--force", "v1"]);
    wait_for(10, "QEMU to exit", || (!pid_alive(pid)).then_some(()));
    assert!(!m.spec("v1", true).paths.volume.exists());
}

/// Cancel a stateful stop of a VM big enough that saving takes a while: the
/// operation ends Cancelled, the VM keeps running (not restarted), no saved
/// state is left, and no operation stays stuck.
#[tokio::test]
async fn cancelled_stateful_stop_leaves_the_vm_running() {
    if !need_root("cancelled_stateful_stop_leaves_the_vm_running") {
        return;
    }
    let m = Member::start("m1");
    m.launch(
        "v2",
        "virtual-machine",
        "testvm",
        json!({"limits.memory": "2GiB", "testvm.dirty_mib": "1536"}),
    )
    .await;
    wait_for(30, "the guest's first counter line", || {
        console_counter(&m, "v2")
    });
    let pid = m.instance("v2").await["state"]["pid"].as_i64().unwrap();

    let body = json!({"action": "stop", "stateful": true});
    let env = m
        .client
        .put("/1.0/instances/v2/state", Some(&body))
        .await
        .unwrap();
    let op: ferry_client::types::Operation = env.decode().unwrap();
    // Cancel as soon as the memory is being written.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cur = m.client.operation(&op.id).await.unwrap();
        if cur.status_code >= 200
            || cur
                .metadata
                .get("stage")
                .and_then(|s| s.as_str())
                .is_some_and(|s| s.contains("memory"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "save never started: {cur:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, v) = m
        .raw(Method::DELETE, &format!("/1.0/operations/{}", op.id), None)
        .await;
    let fin = m.client.wait_operation(&op.id, |_| {}).await;
    eprintln!("cancel answered {code}: {v}; operation ended: {fin:?}");
    let fin = m.client.operation(&op.id).await.unwrap();
    assert!(fin.status_code >= 200, "operation stuck: {fin:?}");
    let inst = m.instance("v2").await;
    if fin.status == "Cancelled" {
        assert_eq!(inst["status"], "Running", "{inst}");
        assert_eq!(
            inst["stateful"], false,
            "a cancelled save left a state behind"
        );
        assert_eq!(
            inst["state"]["pid"].as_i64().unwrap(),
            pid,
            "the VM was restarted, not kept running"
        );
        // The guest counts whole passes over 1.5 GiB: on a loaded nested-KVM
        // host one pass can take many seconds, so wait for the next one.
        let a = qmp_counter(&m, "v2").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while qmp_counter(&m, "v2").await <= a {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest does not run after the cancelled save (counter stuck at {a})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        // The save won the race: then it must be a complete stateful stop.
        assert_eq!(fin.status, "Success", "{fin:?}");
        assert_eq!(inst["status"], "Stopped");
        assert_eq!(inst["stateful"], true);
        eprintln!("note: the save finished before the cancel arrived");
    }
    // The lease was released: the next action is accepted.
    let ops = m.client.operations().await.unwrap();
    assert!(ops.iter().all(|o| o.status_code >= 200), "{ops:?}");
}

/// QEMU 7.2 (Debian main's, unpacked by scripts/setup.sh beside 10.0) must
/// work too: launch, stateful stop and start, the counter continues.
#[tokio::test]
async fn vm_stateful_stop_start_on_qemu_7_2() {
    if !need_root("vm_stateful_stop_start_on_qemu_7_2") {
        return;
    }
    let q72 = "/opt/ferry/qemu-7.2/usr/bin/qemu-system-x86_64";
    if !std::path::Path::new(q72).exists() {
        eprintln!(
            "SKIP vm_stateful_stop_start_on_qemu_7_2: {q72} missing (scripts/setup.sh unpacks it)"
        );
        return;
    }
    let m = Member::start_with_env("m1", &[("FERRY_QEMU", q72)]);
    m.launch("v72", "virtual-machine", "testvm", json!({}))
        .await;
    let pid = m.instance("v72").await["state"]["pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with(q72),
        "not running QEMU 7.2"
    );
    wait_for(30, "the guest's first counter line", || {
        console_counter(&m, "v72")
    });
    advancing(&m, "v72").await;
    m.state("v72", "stop", true).await;
    let at_save = console_counter(&m, "v72").unwrap();
    m.state("v72", "start", false).await;
    let after = qmp_counter(&m, "v72").await;
    assert!(
        after >= at_save,
        "guest counter reset by restore on QEMU 7.2: {after} < {at_save}"
    );
    advancing(&m, "v72").await;
    m.ferry_ok(&["delete", "--force", "v72"]);
}
