//! The other move paths, with real ferryd members, CRIU and QEMU:
//! - a member speaking the previous migration protocol (v1, as during a
//!   rolling upgrade): moves in both directions fall back to a stateful
//!   stop, the state travels as files, the target starts statefully, and the
//!   operation says which path was used and why;
//! - a `shared` pool both members see: nothing is copied, the volume stays;
//! - members on QEMU 7.2 and 10.0: live VM moves both ways.

use std::path::Path;
use std::time::Duration;

use ferry_drivers::vm::VmDriver;
use ferry_test::{
    form_cluster, location, need_root, pid_alive, start_cluster, wait_for, wait_guest, Member,
};
use serde_json::{json, Value};

fn move_json(m: &Member, name: &str, target: &str) -> Value {
    let out = m.ferry_ok(&["move", name, "--target", target, "--format", "json"]);
    let meta: Value = serde_json::from_str(&out).unwrap();
    eprintln!("move {name} -> {target}: {meta}");
    meta
}

/// The counter of a container whose volume is at `volume`.
fn counter_at(volume: &Path) -> u64 {
    wait_for(5, "a counter value", || {
        std::fs::read_to_string(volume.join("rootfs/counter"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

fn assert_advances(read: impl Fn() -> u64, from: u64, what: &str) {
    let now = read();
    assert!(now >= from, "{what}: counter reset ({now} < {from})");
    std::thread::sleep(Duration::from_millis(700));
    assert!(read() > now, "{what}: counter does not advance");
}

#[tokio::test]
async fn moves_to_and_from_a_previous_protocol_member_use_a_stateful_stop() {
    if !need_root("moves_to_and_from_a_previous_protocol_member_use_a_stateful_stop") {
        return;
    }
    let ms = vec![
        Member::start("m1"),
        Member::start_with_env("m2", &[("FERRY_MIGRATION_PROTOCOL", "1")]),
    ];
    form_cluster(&ms);
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m1"]);
    ms[0].launch_on("testvm", "v1", "m1", &["limits.memory=128MiB"]);
    std::thread::sleep(Duration::from_millis(800));
    let vm = VmDriver::default();
    wait_guest(&ms[0].spec("v1", true)).await;

    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let (src, dst) = (&ms[from], &ms[to]);
        // Container.
        let before = src.container_counter("c1");
        let meta = move_json(src, "c1", &dst.name);
        assert_eq!(
            meta["plan"]["state"]["type"], "stateful_stop_file",
            "{meta}"
        );
        assert_eq!(meta["plan"]["version"], 1, "{meta}");
        assert!(
            meta["path"].as_str().unwrap().contains("stateful stop"),
            "{meta}"
        );
        assert!(
            meta["why"].as_str().unwrap().contains("protocol v1"),
            "the operation does not say why: {meta}"
        );
        assert_eq!(dst.instance("c1").await["status"], "Running");
        assert_advances(|| dst.container_counter("c1"), before, "container");
        assert!(!src.spec("c1", false).paths.volume.exists());
        for m in &ms {
            wait_for(10, "the new location everywhere", || {
                (location(m, "c1").as_deref() == Some(dst.name.as_str())).then_some(())
            });
        }
        // VM.
        let before = vm.read_counter(&src.spec("v1", true)).await.unwrap();
        let meta = move_json(src, "v1", &dst.name);
        assert_eq!(
            meta["plan"]["state"]["type"], "stateful_stop_file",
            "{meta}"
        );
        assert!(
            meta["why"].as_str().unwrap().contains("vm_qemu_live"),
            "{meta}"
        );
        let dspec = dst.spec("v1", true);
        let after = vm.read_counter(&dspec).await.unwrap();
        assert!(after >= before, "guest counter reset: {after} < {before}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(vm.read_counter(&dspec).await.unwrap() > after);
        assert!(!src.spec("v1", true).paths.volume.exists());
        assert_eq!(location(src, "v1").as_deref(), Some(dst.name.as_str()));
    }
    ms[0].ferry_ok(&["delete", "--force", "c1"]);
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
}

/// Members on different QEMU versions, as during an upgrade: m1 runs
/// Debian main's QEMU 7.2, m2 the backports' 10.0. A live VM move goes both
/// ways (dir pool: the disk by block mirror), each side on its own QEMU.
#[tokio::test]
async fn live_vm_moves_between_qemu_7_2_and_10_0_members() {
    if !need_root("live_vm_moves_between_qemu_7_2_and_10_0_members") {
        return;
    }
    let q72 = "/opt/ferry/qemu-7.2/usr/bin/qemu-system-x86_64";
    if !Path::new(q72).exists() {
        eprintln!("SKIP: {q72} missing (scripts/setup.sh unpacks it)");
        return;
    }
    // Both members would use multifd (the default): the 7.2 side cannot,
    // and the plan says so.
    let ms = vec![
        Member::start_with_env("m1", &[("FERRY_QEMU", q72)]),
        Member::start("m2"),
    ];
    form_cluster(&ms);
    ms[0].launch_on("testvm", "v1", "m1", &["limits.memory=128MiB"]);
    let vm = VmDriver::default();
    wait_guest(&ms[0].spec("v1", true)).await;
    let qemu_of = |pid: i64| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    for (from, to, binary) in [
        (0usize, 1usize, "/usr/bin/"),
        (1, 0, "/opt/ferry/qemu-7.2/"),
    ] {
        let (src, dst) = (&ms[from], &ms[to]);
        let src_pid = src.instance("v1").await["state"]["pid"].as_i64().unwrap();
        // QEMU 7.2 cannot take multifd channels in any order: one stream.
        let after = move_on_one_stream(src, dst, to == 0).await;
        let pid = dst.instance("v1").await["state"]["pid"].as_i64().unwrap();
        assert!(
            qemu_of(pid).starts_with(binary),
            "the VM on {} runs {}, not its member's QEMU",
            dst.name,
            qemu_of(pid)
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(vm.read_counter(&dst.spec("v1", true)).await.unwrap() > after);
        assert!(!pid_alive(src_pid), "the source QEMU {src_pid} still runs");
        assert!(!src.spec("v1", true).paths.volume.exists());
    }
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
}

/// A member started with `--migration-multifd off` (here through its
/// environment, `FERRY_MULTIFD=off`) neither accepts nor offers QEMU's
/// multifd: live VM moves to and from it use one stream, and the plan says
/// why when the other side offered it. The guest runs on both times.
#[tokio::test]
async fn a_member_with_multifd_off_moves_vms_on_one_stream() {
    if !need_root("a_member_with_multifd_off_moves_vms_on_one_stream") {
        return;
    }
    if !VmDriver::multifd_support().await {
        eprintln!("SKIP: this member's QEMU is older than 8.0 (no multifd anyway)");
        return;
    }
    let ms = vec![
        Member::start("m1"),
        Member::start_with_env("m2", &[("FERRY_MULTIFD", "off")]),
    ];
    form_cluster(&ms);
    ms[0].launch_on("testvm", "v1", "m1", &["limits.memory=128MiB"]);
    wait_guest(&ms[0].spec("v1", true)).await;
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        move_on_one_stream(&ms[from], &ms[to], from == 0).await;
    }
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
}

/// Move the running VM `v1` live from `src` to `dst` and check it went over
/// QEMU's single stream (no multifd), saying so in the plan's `why` when
/// `src` offered multifd and `dst` declined it; the guest's counter goes on
/// and the record moved. Returns the counter read on `dst`.
async fn move_on_one_stream(src: &Member, dst: &Member, declined: bool) -> u64 {
    let vm = VmDriver::default();
    let before = vm.read_counter(&src.spec("v1", true)).await.unwrap();
    let meta = move_json(src, "v1", &dst.name);
    assert_eq!(meta["plan"]["state"]["type"], "vm_qemu_live", "{meta}");
    assert_eq!(meta["qemu_params"]["multifd_channels"], 0, "{meta}");
    if declined {
        let why = meta["why"].as_str().unwrap_or_default();
        assert!(
            why.contains("not shared with the target: multifd"),
            "{meta}"
        );
    }
    let after = vm.read_counter(&dst.spec("v1", true)).await.unwrap();
    assert!(after >= before, "guest counter reset: {after} < {before}");
    assert_eq!(location(src, "v1").as_deref(), Some(dst.name.as_str()));
    after
}

#[tokio::test]
async fn instances_on_a_shared_pool_move_without_copying_storage() {
    if !need_root("instances_on_a_shared_pool_move_without_copying_storage") {
        return;
    }
    let pool = ferry_test::shared_pool_dir();
    let p = pool.path().to_str().unwrap();
    // m1 and m2 see the pool; m3 does not. m1 receives container pages
    // with CRIU's own page server, m2 with ferry's page sink.
    let ms = vec![
        Member::start_with_env("m1", &[("FERRY_SHARED_POOL", p), ("FERRY_PAGE_SINK", "0")]),
        Member::start_with_env("m2", &[("FERRY_SHARED_POOL", p)]),
        Member::start("m3"),
    ];
    form_cluster(&ms);
    ms[0].ferry_ok(&[
        "launch",
        "busybox",
        "c1",
        "--target",
        "m1",
        "--storage",
        "shared",
    ]);
    ms[0].launch_in(
        "testvm",
        "v1",
        "m1",
        Some("shared"),
        &["limits.memory=128MiB"],
    );
    let cvol = ms[0].shared_spec("c1", false, pool.path()).paths.volume;
    assert!(
        cvol.join("rootfs").is_dir(),
        "the container is not on the shared pool"
    );
    assert!(!ms[0].spec("c1", false).paths.volume.exists());
    std::thread::sleep(Duration::from_millis(800));
    let before = counter_at(&cvol);

    // A member without the pool cannot take it: a clear error, nothing changes.
    let out = ms[0].ferry(&["move", "c1", "--target", "m3"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shared"),
        "{out:?}"
    );
    assert_eq!(location(&ms[0], "c1").as_deref(), Some("m1"));
    assert_advances(|| counter_at(&cvol), before, "after a refused move");

    // Live container move m1 -> m2 and back: no copy, the volume stays.
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let before = counter_at(&cvol);
        let meta = move_json(&ms[from], "c1", &ms[to].name);
        assert_eq!(meta["plan"]["fs"]["type"], "shared", "{meta}");
        assert_eq!(meta["plan"]["state"]["type"], "criu_page_server", "{meta}");
        let (sink, path) = if to == 1 {
            (json!(2), "live (CRIU dump into ferry's page sink)")
        } else {
            (Value::Null, "live (CRIU page server)")
        };
        assert_eq!(meta["plan"]["state"]["page_sink"], sink, "{meta}");
        assert_eq!(meta["path"], path, "{meta}");
        assert!(
            cvol.join("rootfs/bin/busybox").exists(),
            "the shared volume was removed"
        );
        assert_eq!(ms[to].instance("c1").await["status"], "Running");
        assert_advances(|| counter_at(&cvol), before, "shared container");
        assert_eq!(
            location(&ms[from], "c1").as_deref(),
            Some(ms[to].name.as_str())
        );
    }

    // VM: live, both QEMUs on the same disk file.
    let vm = VmDriver::default();
    let vspec = |m: &Member| m.shared_spec("v1", true, pool.path());
    wait_guest(&vspec(&ms[0])).await;
    let disk = vspec(&ms[0]).paths.volume.join("disk.img");
    let before = vm.read_counter(&vspec(&ms[0])).await.unwrap();
    let meta = move_json(&ms[0], "v1", "m2");
    assert_eq!(meta["plan"]["fs"]["type"], "shared", "{meta}");
    assert_eq!(meta["plan"]["state"]["type"], "vm_qemu_live", "{meta}");
    let features = meta["plan"]["state"]["features"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Multifd without a disk mirror as well.
    if VmDriver::multifd_support().await {
        assert!(features.iter().any(|f| f == "multifd"), "{meta}");
    }
    // Nothing to copy first: the source waited for the target's QEMU to
    // listen before starting its migration (otherwise a guest with little
    // to send switches over while that QEMU still starts, and stays paused
    // until it is up).
    assert!(features.iter().any(|f| f == "target_listens"), "{meta}");
    let at = |stage: &str| {
        let t = meta["timeline"].as_array().expect("a timeline");
        t.iter()
            .position(|e| e["stage"] == stage)
            .unwrap_or_else(|| panic!("no {stage:?} in the timeline: {meta}"))
    };
    assert!(
        at("the target's QEMU listens") < at("migrating memory (QEMU pre-copy)"),
        "{meta}"
    );
    assert!(disk.exists(), "the shared disk was removed");
    let after = vm.read_counter(&vspec(&ms[1])).await.unwrap();
    assert!(after >= before);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(vm.read_counter(&vspec(&ms[1])).await.unwrap() > after);
    assert_eq!(location(&ms[0], "v1").as_deref(), Some("m2"));

    ms[0].ferry_ok(&["delete", "--force", "c1"]);
    ms[0].ferry_ok(&["delete", "--force", "v1"]);
    assert!(!cvol.exists(), "delete left the shared volume");
}

/// `--postcopy` on a container: CRIU lazy pages over the state channel. The
/// container resumes on the target before its memory arrived, keeps
/// counting, and the source's serving dump ends once every page was sent.
#[tokio::test]
async fn postcopy_container_move_resumes_first_and_pulls_memory() {
    if !need_root("postcopy_container_move_resumes_first_and_pulls_memory") {
        return;
    }
    let ms = start_cluster(&["m1", "m2"]);
    ms[0].ferry_ok(&["launch", "busybox", "c1", "--target", "m1"]);
    let src_pid = ms[0].instance("c1").await["state"]["pid"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let before = ms[0].container_counter("c1");
    let out = ms[0].ferry(&[
        "move",
        "c1",
        "--target",
        "m2",
        "--postcopy",
        "--bandwidth",
        "64MiB",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Warning: with --postcopy"),
        "the CLI does not warn about post-copy: {out:?}"
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("post-copy move: {meta}");
    assert_eq!(meta["plan"]["state"]["lazy_pages"], true, "{meta}");
    // The page stream (requests and pages) is compressed frame by frame.
    assert_eq!(meta["plan"]["state_compression"], "zstd_frames", "{meta}");
    assert!(
        meta["path"].as_str().unwrap().contains("post-copy"),
        "{meta}"
    );
    assert!(meta["postcopy_serving_ms"].is_u64(), "{meta}");
    let inst = ms[1].instance("c1").await;
    assert_eq!(inst["location"], "m2");
    assert_eq!(inst["status"], "Running");
    assert!(!pid_alive(src_pid), "the source container still runs");
    assert_advances(|| ms[1].container_counter("c1"), before, "post-copy");
    // exec works: the whole address space arrived.
    let n: u64 = wait_for(5, "exec cat /counter", || {
        ms[1]
            .ferry_ok(&["exec", "c1", "--", "cat", "/counter"])
            .trim()
            .parse()
            .ok()
    });
    assert!(n >= before);
    ms[1].ferry_ok(&["delete", "--force", "c1"]);
}
