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
use vmcommon::{is_qemu, skip_reason, spec, wait_for, KillOnDrop};

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_drivers::vm::migrate::{IncomingStats, MigrateParams, MigrationProgress, OutgoingStats};
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{DriverError, InstanceSpec, Lifecycle, OpCtx};
use tokio_util::sync::CancellationToken;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MIB: u64 = 1 << 20;

fn ctx(side: &'static str, token: CancellationToken) -> OpCtx {
    OpCtx::new(move |k, v| eprintln!("  [{side}] {k}: {v}"), token)
}

/// Select the QEMU binary for one side (cross-version runs).
fn use_qemu_of(side_var: &str) {
    if let Ok(bin) = std::env::var(side_var) {
        std::env::set_var("FERRY_QEMU", bin);
    }
}

/// Two members' trees and one VM name.
/// Fields drop in order: the QEMU guards (which read the pidfiles) before the tree.
struct Members {
    a: InstanceSpec,
    b: InstanceSpec,
    _ga: KillOnDrop,
    _gb: KillOnDrop,
    _dir: tempfile::TempDir,
}

fn members(name: &str, config: &[(&str, &str)]) -> Members {
    let dir = tempfile::Builder::new()
        .prefix("fmig")
        .tempdir_in("/tmp")
        .unwrap();
    let a = spec(&dir.path().join("a"), name, config);
    let b = spec(&dir.path().join("b"), name, config);
    let ga = KillOnDrop(a.paths.run.join("qemu.pid"));
    let gb = KillOnDrop(b.paths.run.join("qemu.pid"));
    Members {
        _dir: dir,
        a,
        b,
        _ga: ga,
        _gb: gb,
    }
}

/// Create and boot the VM on A, ship its disk to B; returns A's QEMU pid.
async fn boot_on_a(d: &VmDriver, m: &Members) -> u32 {
    use_qemu_of("FERRY_QEMU_SOURCE");
    let c = OpCtx::detached();
    d.create(&m.a, &c).await.unwrap();
    d.start(&m.a, &c).await.unwrap();
    wait_for(60, "the first counter line > 0", || {
        d.console_counter(&m.a).unwrap().filter(|n| *n > 0)
    })
    .await;
    // The daemon ships the (tiny, read-only-after-boot) disk over the fs channel.
    std::fs::create_dir_all(&m.b.paths.volume).unwrap();
    std::fs::copy(
        m.a.paths.volume.join("disk.img"),
        m.b.paths.volume.join("disk.img"),
    )
    .unwrap();
    d.state(&m.a).await.unwrap().pid
}

/// QEMU A's fd, QEMU B's fd, and the relay between the other two ends.
/// Cancelling `cut` drops both relay ends (a broken link).
fn stream(
    cut: CancellationToken,
) -> (
    OwnedFd,
    OwnedFd,
    tokio::task::JoinHandle<std::io::Result<(u64, u64)>>,
) {
    let (a_qemu, a_relay) = std::os::unix::net::UnixStream::pair().unwrap();
    let (b_qemu, b_relay) = std::os::unix::net::UnixStream::pair().unwrap();
    a_relay.set_nonblocking(true).unwrap();
    b_relay.set_nonblocking(true).unwrap();
    let mut ar = tokio::net::UnixStream::from_std(a_relay).unwrap();
    let mut br = tokio::net::UnixStream::from_std(b_relay).unwrap();
    let relay = tokio::spawn(async move {
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut ar, &mut br) => r,
            _ = cut.cancelled() => Err(std::io::Error::other("relay cut by the test")),
        }
    });
    (a_qemu.into(), b_qemu.into(), relay)
}

struct Outcome {
    out: Result<OutgoingStats, DriverError>,
    inc: Result<IncomingStats, DriverError>,
    progress: Vec<MigrationProgress>,
    b_pid: u32,
    relay: std::io::Result<(u64, u64)>,
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
    let b_ctx = ctx("B", CancellationToken::new());
    let a_ctx = ctx("A", a_token);
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
    let (inc, out, ()) = tokio::join!(
        incoming.wait(&b_ctx),
        d.migrate_outgoing(&m.a, params, fd_a, progress, &a_ctx),
        meanwhile(ctl)
    );
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
        versions,
    }
}

async fn advancing(d: &VmDriver, s: &InstanceSpec, what: &str) -> (u64, u64) {
    let x = d.read_counter(s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let y = d.read_counter(s).await.unwrap();
    assert!(y > x, "{what}: counter does not advance ({x} then {y})");
    (x, y)
}

/// Checks after a successful move; prints the numbers; cleans up.
async fn check_moved(
    d: &VmDriver,
    m: &Members,
    a_pid: u32,
    o: Outcome,
    label: &str,
) -> (OutgoingStats, IncomingStats) {
    let out = o
        .out
        .unwrap_or_else(|e| panic!("{label}: outgoing failed: {e}"));
    let inc = o
        .inc
        .unwrap_or_else(|e| panic!("{label}: incoming failed: {e}"));
    assert!(inc.running, "{label}: guest not running on B: {inc:?}");
    // A is paused (postmigrate) with its RAM intact: its counter is the value at STOP.
    let at_stop = d.read_counter(&m.a).await.unwrap();
    let (b1, b2) = advancing(d, &m.b, "B after the move").await;
    assert!(
        b1 >= at_stop,
        "{label}: counter on B ({b1}) is behind A's at STOP ({at_stop})"
    );
    let st_b = d.state(&m.b).await.unwrap();
    assert!(st_b.running && st_b.pid == o.b_pid, "{st_b:?}");
    d.migrate_finish_source(&m.a).await.unwrap();
    assert!(
        !is_qemu(a_pid),
        "{label}: A's QEMU {a_pid} still alive after finish"
    );
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
    let ferry_ms = match (out.stop_event_us, inc.resume_event_us) {
        (Some(s), Some(r)) => format!("{:.1}", (r as f64 - s as f64) / 1000.0),
        _ => "n/a".into(),
    };
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
    let st = d.state(&m.a).await.unwrap();
    assert!(
        st.running && st.pid == a_pid,
        "{label}: VM not left running in the same QEMU on A: {st:?}"
    );
    advancing(d, &m.a, &format!("{label}: A after the failed move")).await;
    assert!(
        !is_qemu(o.b_pid),
        "{label}: B's QEMU {} still alive",
        o.b_pid
    );
    assert!(!d.state(&m.b).await.unwrap().running);
    assert!(!m.b.paths.run.join("qmp.sock").exists() && !m.b.paths.run.join("qemu.pid").exists());
    // A can still be migrated (or stopped) normally afterwards.
    d.stop(&m.a, false, &OpCtx::detached()).await.unwrap();
    assert!(!is_qemu(a_pid));
}

async fn lock() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

async fn nothing(_: Ctl) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_move_basic() {
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED live_move_basic: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v1",
        &[("limits.memory", "256MiB"), ("testvm.dirty_mib", "16")],
    );
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
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED bandwidth_capped_move_converges_with_auto_converge: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v2",
        &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")],
    );
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
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED postcopy_move_completes: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v3",
        &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")],
    );
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
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED cancel_during_precopy_keeps_vm_on_source: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v4",
        &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")],
    );
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
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED target_killed_during_precopy_keeps_vm_on_source: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v5",
        &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")],
    );
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        auto_converge: false,
        max_bandwidth: Some(32 * MIB),
        ..Default::default()
    };
    let t = Instant::now();
    let o = run_move(&d, &m, &params, CancellationToken::new(), |c| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(is_qemu(c.b_pid));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.b_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
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
    if let Some(why) = skip_reason() {
        return eprintln!("SKIPPED link_cut_during_postcopy_reports_loss: {why}");
    }
    let _l = lock().await;
    let d = VmDriver::default();
    let m = members(
        "v6",
        &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")],
    );
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
