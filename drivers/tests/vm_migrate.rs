//! Live VM migration between two "members" (two data trees) on one host, with
//! the daemon's relay simulated by a `copy_bidirectional` between the other
//! ends of two socketpairs:  QEMU A ⇄ fd_a ═ relay ═ fd_b ⇄ QEMU B.
//! Needs root and /dev/kvm; skips otherwise. Tests run one at a time (a
//! global lock) so the timings are not disturbed by each other.
//!
//! Cross-version: `FERRY_QEMU_SOURCE=/path FERRY_QEMU_TARGET=/path cargo test
//! -p ferry-drivers --test vm_migrate live_move_basic -- --nocapture`
//! (the test sets `FERRY_QEMU` around each side's launch).

mod vmcommon;
use vmcommon::{
    advancing, begin, check_on_b, check_qemu_defaults_on_a, check_still_on_a, ctx, ctx_with,
    ferry_downtime_ms, finish_on_a, is_qemu, kill_qemu_after, stop_on_a, stream, use_qemu_of,
    wait_for, Members, MEM_256_DIRTY_16, MEM_512_DIRTY_128, MIB,
};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_drivers::vm::migrate::{
    IncomingStats, MigrateParams, MigrationControl, MigrationProgress, OutgoingStats,
};
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{DriverError, Lifecycle, OpCtx};
use tokio_util::sync::CancellationToken;

/// Create and boot the VM on A, ship its disk to B; returns A's QEMU pid.
async fn boot_on_a(d: &VmDriver, m: &Members) -> u32 {
    let a_pid = vmcommon::boot_on_a(d, m, |_| {}).await;
    // The daemon ships the (tiny, read-only-after-boot) disk over the fs channel.
    std::fs::create_dir_all(&m.b.paths.volume).unwrap();
    std::fs::copy(
        m.a.paths.volume.join("disk.img"),
        m.b.paths.volume.join("disk.img"),
    )
    .unwrap();
    a_pid
}

struct Outcome {
    out: Result<OutgoingStats, DriverError>,
    inc: Result<IncomingStats, DriverError>,
    progress: Vec<MigrationProgress>,
    b_pid: u32,
    relay: std::io::Result<(u64, u64)>,
    /// Whether the driver told the caller the stream was given up
    /// (`MigrationControl::abandoned`).
    abandoned: bool,
    /// QEMU versions of source and target.
    versions: (String, String),
}

/// What a test's side action can see and do during a move.
#[derive(Clone)]
struct Ctl {
    b_pid: u32,
    cut: CancellationToken,
    seen: Arc<Mutex<Vec<MigrationProgress>>>,
}

impl Ctl {
    /// Wait until a progress report shows `status` (reports come once a second).
    async fn wait_status(&self, status: &str, secs: u64) {
        let seen = self.seen.clone();
        wait_for(secs, status, || {
            seen.lock()
                .unwrap()
                .last()
                .filter(|p| p.status == status)
                .map(|_| ())
        })
        .await;
    }
}

/// Run one move. `meanwhile(ctl)` runs beside it (cancel, kill, cut, ...).
async fn run_move<F: std::future::Future<Output = ()>>(
    d: &VmDriver,
    m: &Members,
    params: &MigrateParams,
    a_token: CancellationToken,
    meanwhile: impl FnOnce(Ctl) -> F,
) -> Outcome {
    let cfg = d.launch_config(&m.a).unwrap();
    let cut = CancellationToken::new();
    let (fd_a, fd_b, relay) = stream(cut.clone());
    use_qemu_of("FERRY_QEMU_TARGET");
    let b_ctx = ctx("B");
    let a_ctx = ctx_with("A", a_token);
    let incoming = d
        .migrate_incoming(&m.b, &cfg, params, fd_b, &b_ctx)
        .await
        .unwrap();
    let b_pid = incoming.pid();
    let b_version = ferry_drivers::vm::qemu::qemu_version()
        .await
        .map(|v| format!("{}.{}.{}", v.0, v.1, v.2))
        .unwrap();
    let versions = (cfg.qemu_version.clone(), b_version);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let progress = move |p: MigrationProgress| seen2.lock().unwrap().push(p);
    let ctl = Ctl {
        b_pid,
        cut,
        seen: seen.clone(),
    };
    let control = MigrationControl::default();
    let abandoned = control.abandoned();
    let (inc, out, ()) = tokio::join!(
        incoming.wait(&b_ctx),
        d.migrate_outgoing_with(&m.a, params, fd_a, &control, progress, &a_ctx),
        meanwhile(ctl)
    );
    let abandoned = tokio::time::timeout(Duration::ZERO, abandoned)
        .await
        .is_ok();
    let relay = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay did not end")
        .unwrap();
    let progress = seen.lock().unwrap().clone();
    Outcome {
        out,
        inc,
        progress,
        b_pid,
        relay,
        abandoned,
        versions,
    }
}

/// Checks after a successful move; prints the numbers; cleans up.
async fn check_moved(
    d: &VmDriver,
    m: &Members,
    a_pid: u32,
    o: Outcome,
    label: &str,
) -> (OutgoingStats, IncomingStats) {
    assert!(
        !o.abandoned,
        "{label}: a completed migration was reported abandoned"
    );
    let out = o
        .out
        .unwrap_or_else(|e| panic!("{label}: outgoing failed: {e}"));
    let inc = o
        .inc
        .unwrap_or_else(|e| panic!("{label}: incoming failed: {e}"));
    let (at_stop, b1, b2) = check_on_b(d, m, &inc, o.b_pid, label).await;
    finish_on_a(d, m, a_pid, label).await;
    assert!(!d.state(&m.a).await.unwrap().running);
    assert!(!m.a.paths.run.join("qmp.sock").exists() && !m.a.paths.run.join("qemu.pid").exists());
    let at_b = d.console_counter(&m.b).unwrap().unwrap_or(0);
    wait_for(5, "a console line on B", || {
        d.console_counter(&m.b).unwrap().filter(|n| *n > at_b)
    })
    .await;
    eprintln!(
        "{label} (QEMU {} -> {}): {out:?}\n{inc:?}",
        o.versions.0, o.versions.1
    );
    let ferry_ms = ferry_downtime_ms(&out, &inc);
    let last = o.progress.last().cloned().unwrap_or_default();
    let (relayed_ab, relayed_ba) = o.relay.as_ref().map(|x| *x).unwrap_or((0, 0));
    eprintln!(
        "RESULT {label}: total {} ms (wall {} ms, setup {} ms), QEMU downtime {} ms, ferry downtime (A STOP -> B RESUME) {ferry_ms} ms, \
         RAM sent {} MiB, passes {}, max throttle {}%, postcopy {}/{}, relayed A->B {} MiB B->A {} KiB, \
         {} progress reports (last: {}), counter at STOP {at_stop}, on B {b1} -> {b2}",
        out.total_time_ms,
        out.wall_ms,
        out.setup_time_ms,
        out.downtime_ms,
        out.transferred / MIB,
        out.dirty_sync_count,
        out.max_throttle_percent,
        out.postcopy,
        inc.postcopy,
        relayed_ab / MIB,
        relayed_ba / 1024,
        o.progress.len(),
        last.summary(),
    );
    d.stop(&m.b, true, &OpCtx::detached()).await.unwrap();
    d.delete(&m.b).await.unwrap();
    d.delete(&m.a).await.unwrap();
    (out, inc)
}

/// After a failed/cancelled move: A runs on in the same QEMU, B is gone.
async fn check_stayed(d: &VmDriver, m: &Members, a_pid: u32, o: &Outcome, label: &str) {
    // The caller heard it in time to close its ends of the stream.
    assert!(
        o.abandoned,
        "{label}: a failed migration was not reported abandoned"
    );
    check_still_on_a(d, m, a_pid, label).await;
    check_qemu_defaults_on_a(m, label).await;
    assert!(
        !is_qemu(o.b_pid),
        "{label}: B's QEMU {} still alive",
        o.b_pid
    );
    assert!(!d.state(&m.b).await.unwrap().running);
    assert!(!m.b.paths.run.join("qmp.sock").exists() && !m.b.paths.run.join("qemu.pid").exists());
    // A can still be migrated (or stopped) normally afterwards.
    stop_on_a(d, m, a_pid).await;
}

async fn nothing(_: Ctl) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_move_basic() {
    let Some((d, m)) = begin("live_move_basic", "fmig", "v1", MEM_256_DIRTY_16).await else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    advancing(&d, &m.a, "A before the move").await;
    let label = format!(
        "basic 256MiB/16MiB {} -> {}",
        std::env::var("FERRY_QEMU_SOURCE").unwrap_or("default".into()),
        std::env::var("FERRY_QEMU_TARGET").unwrap_or("default".into())
    );
    let o = run_move(
        &d,
        &m,
        &MigrateParams::default(),
        CancellationToken::new(),
        nothing,
    )
    .await;
    check_moved(&d, &m, a_pid, o, &label).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_capped_move_converges_with_auto_converge() {
    let Some((d, m)) = begin(
        "bandwidth_capped_move_converges_with_auto_converge",
        "fmig",
        "v2",
        MEM_512_DIRTY_128,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        max_bandwidth: Some(32 * MIB),
        ..Default::default()
    };
    let o = tokio::time::timeout(
        Duration::from_secs(240),
        run_move(&d, &m, &params, CancellationToken::new(), nothing),
    )
    .await
    .expect("capped move did not finish within 240 s");
    for p in &o.progress {
        eprintln!(
            "  progress {:>5.1}s {} {}",
            p.elapsed.as_secs_f64(),
            p.status,
            p.summary()
        );
    }
    let (out, _) = check_moved(
        &d,
        &m,
        a_pid,
        o,
        "capped 32MiB/s, 512MiB/128MiB, auto-converge",
    )
    .await;
    assert!(
        out.max_throttle_percent > 0,
        "converged without throttling? {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_move_completes() {
    let Some((d, m)) = begin("postcopy_move_completes", "fmig", "v3", MEM_512_DIRTY_128).await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        postcopy: true,
        auto_converge: false,
        max_bandwidth: Some(64 * MIB),
        ..Default::default()
    };
    // A cancel during post-copy is refused: the move still completes.
    let token = CancellationToken::new();
    let t2 = token.clone();
    let o = tokio::time::timeout(
        Duration::from_secs(120),
        run_move(&d, &m, &params, token, |c| async move {
            c.wait_status("postcopy-active", 60).await;
            t2.cancel();
        }),
    )
    .await
    .expect("postcopy move did not finish within 120 s");
    let (out, inc) = check_moved(&d, &m, a_pid, o, "postcopy 64MiB/s, 512MiB/128MiB").await;
    assert!(
        out.postcopy && inc.postcopy,
        "did not switch to post-copy: {out:?} {inc:?}"
    );
}

/// Bandwidth-capped, no auto-converge: pre-copy never converges; cancel it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_precopy_keeps_vm_on_source() {
    let Some((d, m)) = begin(
        "cancel_during_precopy_keeps_vm_on_source",
        "fmig",
        "v4",
        MEM_512_DIRTY_128,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        auto_converge: false,
        max_bandwidth: Some(32 * MIB),
        ..Default::default()
    };
    let token = CancellationToken::new();
    let t2 = token.clone();
    let t = Instant::now();
    let o = run_move(&d, &m, &params, token, |_c| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        t2.cancel();
    })
    .await;
    eprintln!(
        "RESULT cancel: ended after {:.2} s; outgoing: {:?}; incoming: {:?}; {} progress reports",
        t.elapsed().as_secs_f64(),
        o.out,
        o.inc,
        o.progress.len()
    );
    assert!(
        matches!(o.out, Err(DriverError::Cancelled(_))),
        "{:?}",
        o.out
    );
    assert!(o.inc.is_err());
    check_stayed(&d, &m, a_pid, &o, "cancel").await;
}

/// Kill the target QEMU mid-pre-copy: the source keeps the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_during_precopy_keeps_vm_on_source() {
    let Some((d, m)) = begin(
        "target_killed_during_precopy_keeps_vm_on_source",
        "fmig",
        "v5",
        MEM_512_DIRTY_128,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        auto_converge: false,
        max_bandwidth: Some(32 * MIB),
        ..Default::default()
    };
    let t = Instant::now();
    let o = run_move(&d, &m, &params, CancellationToken::new(), |c| {
        kill_qemu_after(3, c.b_pid)
    })
    .await;
    eprintln!(
        "RESULT kill-target: ended after {:.2} s; outgoing: {:?}; incoming: {:?}; relay: {:?}",
        t.elapsed().as_secs_f64(),
        o.out,
        o.inc,
        o.relay
    );
    assert!(o.out.is_err() && o.inc.is_err());
    check_stayed(&d, &m, a_pid, &o, "kill-target").await;
}

/// Cut the link during post-copy: both sides report the VM lost, and both
/// QEMUs are left (paused) for a manual recovery rather than killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_during_postcopy_reports_loss() {
    let Some((d, m)) = begin(
        "link_cut_during_postcopy_reports_loss",
        "fmig",
        "v6",
        MEM_512_DIRTY_128,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        postcopy: true,
        auto_converge: false,
        max_bandwidth: Some(16 * MIB),
        ..Default::default()
    };
    let o = tokio::time::timeout(
        Duration::from_secs(120),
        run_move(&d, &m, &params, CancellationToken::new(), |c| async move {
            c.wait_status("postcopy-active", 60).await;
            c.cut.cancel();
        }),
    )
    .await
    .expect("cut move did not end within 120 s");
    eprintln!(
        "RESULT postcopy-cut: outgoing: {:?}\n  incoming: {:?}",
        o.out, o.inc
    );
    let out = o.out.as_ref().unwrap_err().to_string();
    let inc = o.inc.as_ref().unwrap_err().to_string();
    assert!(out.contains("post-copy") && out.contains("lost"), "{out}");
    assert!(inc.contains("post-copy") && inc.contains("lost"), "{inc}");
    assert!(
        is_qemu(a_pid) && is_qemu(o.b_pid),
        "QEMUs must be left for recovery"
    );
    d.stop(&m.a, true, &OpCtx::detached()).await.unwrap();
    d.stop(&m.b, true, &OpCtx::detached()).await.unwrap();
}
