//! Shared by the VM driver e2e tests: specs, clean-up by pid, skip checks,
//! and for the live-move tests (vm_migrate, vm_mirror): two members' trees,
//! booting on A, the RAM stream relay and the checks before/after a move.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::vm::migrate::{IncomingStats, OutgoingStats};
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{InstancePaths, InstanceSpec, InstanceType, Lifecycle, OpCtx};
use tokio_util::sync::CancellationToken;

pub const MIB: u64 = 1 << 20;

/// A guest with 256 MiB of RAM that dirties 16 MiB of it over and over.
pub const MEM_256_DIRTY_16: &[(&str, &str)] =
    &[("limits.memory", "256MiB"), ("testvm.dirty_mib", "16")];
/// A guest with 512 MiB of RAM that dirties 128 MiB of it over and over
/// (at 32 MiB/s a pre-copy converges only with auto-converge).
pub const MEM_512_DIRTY_128: &[(&str, &str)] =
    &[("limits.memory", "512MiB"), ("testvm.dirty_mib", "128")];

pub fn spec(root: &Path, name: &str, config: &[(&str, &str)]) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        kind: InstanceType::VirtualMachine,
        image: "testvm".into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        volatile: BTreeMap::new(),
        paths: InstancePaths {
            volume: root.join("vol").join(name),
            run: root.join("run").join(name),
            logs: root.join("logs").join(name),
            images: root.join("images"),
        },
    }
}

/// Kills whatever QEMU the pidfile names when the test ends, even on a panic.
pub struct KillOnDrop(pub PathBuf);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if is_qemu(pid as u32) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

pub fn is_qemu(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("qemu")
}

pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("needs /dev/kvm".into());
    }
    for tool in ["qemu-system-x86_64", "nasm"] {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The live-move tests of one binary run one at a time (so the timings are
/// not disturbed by each other): a `Members` holds this lock.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Progress reports of one side, printed with its name.
pub fn ctx_with(side: &'static str, token: CancellationToken) -> OpCtx {
    OpCtx::new(move |k, v| eprintln!("  [{side}] {k}: {v}"), token)
}

pub fn ctx(side: &'static str) -> OpCtx {
    ctx_with(side, CancellationToken::new())
}

/// Select the QEMU binary for one side (cross-version runs).
pub fn use_qemu_of(side_var: &str) {
    if let Ok(bin) = std::env::var(side_var) {
        std::env::set_var("FERRY_QEMU", bin);
    }
}

/// Two members' trees and one VM name.
/// Fields drop in order: the guards kill the QEMUs (reading their pidfiles)
/// before the temporary directory is removed, and the lock goes last.
pub struct Members {
    _ga: KillOnDrop,
    _gb: KillOnDrop,
    pub a: InstanceSpec,
    pub b: InstanceSpec,
    pub dir: tempfile::TempDir,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// Start of a live-move test: `None` (after saying why) where this host
/// cannot run it; else, once the tests before it are done, the driver and
/// two fresh members' trees (under /tmp/`prefix`…) for the VM `name`.
pub async fn begin(
    test: &str,
    prefix: &str,
    name: &str,
    config: &[(&str, &str)],
) -> Option<(VmDriver, Members)> {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    let serial = SERIAL.lock().await;
    let d = VmDriver::default();
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let a = spec(&dir.path().join("a"), name, config);
    let b = spec(&dir.path().join("b"), name, config);
    let ga = KillOnDrop(a.paths.run.join("qemu.pid"));
    let gb = KillOnDrop(b.paths.run.join("qemu.pid"));
    let m = Members {
        _ga: ga,
        _gb: gb,
        a,
        b,
        dir,
        _serial: serial,
    };
    Some((d, m))
}

/// Create the VM on A, run `prepare` on its spec, boot it and wait for its
/// first counter line; returns A's QEMU pid.
pub async fn boot_on_a(d: &VmDriver, m: &Members, prepare: impl FnOnce(&InstanceSpec)) -> u32 {
    use_qemu_of("FERRY_QEMU_SOURCE");
    let c = OpCtx::detached();
    d.create(&m.a, &c).await.unwrap();
    prepare(&m.a);
    d.start(&m.a, &c).await.unwrap();
    wait_for(60, "the first counter line > 0", || {
        d.console_counter(&m.a).unwrap().filter(|n| *n > 0)
    })
    .await;
    d.state(&m.a).await.unwrap().pid
}

/// The RAM stream: QEMU A's fd, QEMU B's fd, and the relay between the other
/// two ends (socketpairs). Cancelling `cut` drops both relay ends (a broken link).
pub fn stream(
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

/// The guest's counter advances over 400 ms; returns both readings.
pub async fn advancing(d: &VmDriver, s: &InstanceSpec, what: &str) -> (u64, u64) {
    let x = d.read_counter(s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let y = d.read_counter(s).await.unwrap();
    assert!(y > x, "{what}: counter does not advance ({x} then {y})");
    (x, y)
}

/// Beside a move: after `secs`, SIGKILL the (still running) QEMU `pid`.
pub async fn kill_qemu_after(secs: u64, pid: u32) {
    tokio::time::sleep(Duration::from_secs(secs)).await;
    assert!(is_qemu(pid));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// After a successful move: the guest runs on B in QEMU `b_pid`, its counter
/// going on from (at least) A's, which is paused (postmigrate) with its RAM
/// intact, so its counter is the value at STOP.
/// Returns the counter at STOP and two readings on B.
pub async fn check_on_b(
    d: &VmDriver,
    m: &Members,
    inc: &IncomingStats,
    b_pid: u32,
    label: &str,
) -> (u64, u64, u64) {
    assert!(inc.running, "{label}: guest not running on B: {inc:?}");
    let at_stop = d.read_counter(&m.a).await.unwrap();
    let (b1, b2) = advancing(d, &m.b, "B after the move").await;
    assert!(
        b1 >= at_stop,
        "{label}: counter on B ({b1}) is behind A's at STOP ({at_stop})"
    );
    let st_b = d.state(&m.b).await.unwrap();
    assert!(st_b.running && st_b.pid == b_pid, "{st_b:?}");
    (at_stop, b1, b2)
}

/// After a successful move: finish on the source; A's QEMU is gone.
pub async fn finish_on_a(d: &VmDriver, m: &Members, a_pid: u32, label: &str) {
    d.migrate_finish_source(&m.a).await.unwrap();
    assert!(
        !is_qemu(a_pid),
        "{label}: A's QEMU {a_pid} still alive after finish"
    );
}

/// The downtime ferry sees (A's STOP to B's RESUME event), in ms.
pub fn ferry_downtime_ms(out: &OutgoingStats, inc: &IncomingStats) -> String {
    match (out.stop_event_us, inc.resume_event_us) {
        (Some(s), Some(r)) => format!("{:.1}", (r as f64 - s as f64) / 1000.0),
        _ => "n/a".into(),
    }
}

/// After a failed move: the VM runs on at A in the same QEMU.
pub async fn check_still_on_a(d: &VmDriver, m: &Members, a_pid: u32, label: &str) {
    let st = d.state(&m.a).await.unwrap();
    assert!(
        st.running && st.pid == a_pid,
        "{label}: VM not left running in the same QEMU on A: {st:?}"
    );
    advancing(d, &m.a, &format!("{label}: A after the failed move")).await;
}

/// After a failed move: A's QEMU has QEMU's own migration settings again,
/// none of the move's (a QEMU keeps them across migrations).
pub async fn check_qemu_defaults_on_a(m: &Members, label: &str) {
    use ferry_drivers::vm::migrate::{QEMU_DEFAULT_BANDWIDTH, QEMU_DEFAULT_DOWNTIME_LIMIT_MS};
    use ferry_drivers::vm::qmp::Qmp;
    let mut q = Qmp::connect(&m.a.paths.run.join("qmp.sock"), Duration::from_secs(10))
        .await
        .unwrap();
    let caps = q
        .execute_raw("query-migrate-capabilities", serde_json::json!({}))
        .await
        .unwrap();
    let on: Vec<_> = caps
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == true)
        .map(|c| c["capability"].clone())
        .collect();
    assert!(
        on.is_empty(),
        "{label}: capabilities left on in A's QEMU: {on:?}"
    );
    let p = q
        .execute_raw("query-migrate-parameters", serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(
        p["downtime-limit"], QEMU_DEFAULT_DOWNTIME_LIMIT_MS,
        "{label}: {p}"
    );
    assert_eq!(p["max-bandwidth"], QEMU_DEFAULT_BANDWIDTH, "{label}: {p}");
    if let Some(bw) = p.get("avail-switchover-bandwidth") {
        // QEMU 8.2 and later
        assert_eq!(bw, 0, "{label}: {p}");
    }
}

/// A can still be stopped normally (after a failed move); its QEMU is gone.
pub async fn stop_on_a(d: &VmDriver, m: &Members, a_pid: u32) {
    d.stop(&m.a, false, &OpCtx::detached()).await.unwrap();
    assert!(!is_qemu(a_pid));
}
