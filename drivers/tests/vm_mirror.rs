//! Live VM move with the disk mirrored over NBD while the guest runs, between
//! two "members" (two data trees) on one host. Both links go through relays
//! the test runs, as the daemon will over its websockets:
//! - RAM: QEMU A ⇄ fd_a ═ relay ═ fd_b ⇄ QEMU B (socketpairs),
//! - disk: QEMU A (NBD client) → socket S ═ relay ═ socket T → QEMU B (NBD server).
//!
//! Guest-like writes to A's disk go through QEMU's block layer with HMP
//! `qemu-io` (the test guest itself never writes its disk).
//! Needs root and /dev/kvm; skips otherwise. Tests run one at a time.
//! QEMU 7.2: `FERRY_QEMU=/opt/ferry/qemu-7.2/usr/bin/qemu-system-x86_64`.
//! Cross-version: `FERRY_QEMU_SOURCE=.. FERRY_QEMU_TARGET=..` (the test sets
//! `FERRY_QEMU` around each side's launch).

mod vmcommon;
use vmcommon::{
    advancing, begin, check_on_b, check_qemu_defaults_on_a, check_still_on_a, ctx,
    ferry_downtime_ms, finish_on_a, is_qemu, kill_qemu_after, stop_on_a, stream, use_qemu_of,
    wait_for, Members, MEM_256_DIRTY_16, MEM_512_DIRTY_128, MIB,
};

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_drivers::vm::migrate::{IncomingVm, MigrateParams, MigrationProgress};
use ferry_drivers::vm::mirror::{MirrorParams, MirrorProgress};
use ferry_drivers::vm::qmp::Qmp;
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{InstanceSpec, Lifecycle, OpCtx, StateSave};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A's disk is enlarged to this, with random data in DATA_START..DATA_END.
const DISK_MIB: u64 = 64;
const DATA_START_MIB: u64 = 4;
const DATA_END_MIB: u64 = 28;

impl Members {
    /// Socket the source's NBD client connects to (the relay listens).
    fn sock_s(&self) -> PathBuf {
        self.dir.path().join("s.sock")
    }
    /// Socket the target's NBD server listens on.
    fn sock_t(&self) -> PathBuf {
        self.dir.path().join("t.sock")
    }
}

fn disk(s: &InstanceSpec) -> PathBuf {
    s.paths.volume.join("disk.img")
}

/// Enlarge the disk and put pseudo-random data in it (so the mirror has
/// real work and sha256 comparisons mean something).
fn fill_disk(path: &Path) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(DISK_MIB * MIB).unwrap();
    f.seek(SeekFrom::Start(DATA_START_MIB * MIB)).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; MIB as usize];
    for _ in DATA_START_MIB..DATA_END_MIB {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

/// Create, enlarge, boot the VM on A; returns A's QEMU pid.
async fn boot_on_a(d: &VmDriver, m: &Members) -> u32 {
    vmcommon::boot_on_a(d, m, |a| fill_disk(&disk(a))).await
}

/// The NBD relay: listens on `listen`, connects each client to `target`.
/// Cancelling `cut` closes everything (a broken link).
struct NbdRelay {
    cut: CancellationToken,
    /// Bytes source → target.
    bytes: Arc<AtomicU64>,
    conns: Arc<AtomicU64>,
}

fn nbd_relay(listen: &Path, target: PathBuf) -> NbdRelay {
    let _ = std::fs::remove_file(listen);
    let listener = tokio::net::UnixListener::bind(listen).unwrap();
    let cut = CancellationToken::new();
    let bytes = Arc::new(AtomicU64::new(0));
    let conns = Arc::new(AtomicU64::new(0));
    let r = NbdRelay {
        cut: cut.clone(),
        bytes: bytes.clone(),
        conns: conns.clone(),
    };
    tokio::spawn(async move {
        loop {
            let mut client = tokio::select! {
                a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => return },
                _ = cut.cancelled() => return,
            };
            conns.fetch_add(1, Ordering::SeqCst);
            let (cut, bytes, target) = (cut.clone(), bytes.clone(), target.clone());
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::UnixStream::connect(&target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let replies = AtomicU64::new(0);
                tokio::select! {
                    _ = pump(&mut cr, &mut sw, &bytes) => {}
                    _ = pump(&mut sr, &mut cw, &replies) => {}
                    _ = cut.cancelled() => {}
                }
            });
        }
    });
    r
}

/// Copy until EOF or error, counting bytes as they pass.
async fn pump(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    n: &AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => {
                if w.write_all(&buf[..k]).await.is_err() {
                    return;
                }
                n.fetch_add(k as u64, Ordering::SeqCst);
            }
        }
    }
}

/// A guest-like write through A's block layer (HMP qemu-io on the drive).
async fn qemu_io(s: &InstanceSpec, cmd: &str) {
    let mut q = Qmp::connect(&s.paths.run.join("qmp.sock"), Duration::from_secs(10))
        .await
        .unwrap();
    let out = q.hmp(&format!("qemu-io ide0-hd0 \"{cmd}\"")).await.unwrap();
    // qemu-io prints its report to QEMU's stdout (daemonized: /dev/null);
    // the monitor only gets errors. The written bytes are checked on disk.
    assert!(out.trim().is_empty(), "qemu-io {cmd}: {out}");
}

fn sha256(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

fn qemu_label() -> String {
    let v = |k: &str| std::env::var(k).ok();
    match (v("FERRY_QEMU_SOURCE"), v("FERRY_QEMU_TARGET")) {
        (None, None) => v("FERRY_QEMU").unwrap_or_else(|| "default".into()),
        (s, t) => format!(
            "{} -> {}",
            s.unwrap_or_else(|| "default".into()),
            t.unwrap_or_else(|| "default".into())
        ),
    }
}

/// Target ready for the mirror and the RAM stream: empty disk, QEMU waiting
/// with `-incoming defer`, NBD export on T, relay S → T.
async fn prepare_target(
    d: &VmDriver,
    m: &Members,
    params: &MigrateParams,
    fd_b: OwnedFd,
) -> (IncomingVm, NbdRelay) {
    let size = d.disk_size(&m.a).unwrap();
    d.prepare_mirror_target(&m.b, size).unwrap();
    assert!(
        d.prepare_mirror_target(&m.b, size).is_err(),
        "must not replace a disk"
    );
    let cfg = d.launch_config(&m.a).unwrap();
    use_qemu_of("FERRY_QEMU_TARGET");
    let mut incoming = d
        .migrate_incoming(&m.b, &cfg, params, fd_b, &ctx("B"))
        .await
        .unwrap();
    incoming.start_nbd_export(&m.sock_t()).await.unwrap();
    assert!(m.sock_t().exists());
    (incoming, nbd_relay(&m.sock_s(), m.sock_t()))
}

/// [`check_cleaned`], then A still stops normally.
async fn check_stayed(d: &VmDriver, m: &Members, a_pid: u32, b_pid: u32, label: &str) {
    check_cleaned(d, m, a_pid, b_pid, label).await;
    stop_on_a(d, m, a_pid).await;
}

/// After a failed move: A runs on in the same QEMU with no block job and no
/// NBD node left; B's QEMU is gone.
async fn check_cleaned(d: &VmDriver, m: &Members, a_pid: u32, b_pid: u32, label: &str) {
    check_still_on_a(d, m, a_pid, label).await;
    check_qemu_defaults_on_a(m, label).await;
    let jobs = d.block_jobs(&m.a).await.unwrap();
    assert!(jobs.is_empty(), "{label}: block jobs left on A: {jobs:?}");
    let mut q = Qmp::connect(&m.a.paths.run.join("qmp.sock"), Duration::from_secs(10))
        .await
        .unwrap();
    let nodes = q
        .execute_raw("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    assert!(
        !nodes.to_string().contains("ferry-mirror-target"),
        "{label}: NBD node left on A"
    );
    assert_eq!(q.status().await.unwrap(), "running");
    drop(q);
    wait_for(10, "B's QEMU to be gone", || {
        (!is_qemu(b_pid)).then_some(())
    })
    .await;
    assert!(!m.b.paths.run.join("qmp.sock").exists() && !m.sock_t().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_move_with_guest_writes() {
    let Some((d, m)) = begin(
        "mirror_move_with_guest_writes",
        "fmir",
        "m1",
        MEM_256_DIRTY_16,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    advancing(&d, &m.a, "A before the move").await;
    let params = MigrateParams {
        block_mirror: true,
        ..Default::default()
    };
    // Without a mirror, a block_mirror migration is refused up front.
    let (fd_x, _fd_y, _r) = stream(CancellationToken::new());
    let e = d
        .migrate_outgoing(&m.a, &params, fd_x, |_| {}, &OpCtx::detached())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("mirror"), "{e}");

    let (fd_a, fd_b, _relay) = stream(CancellationToken::new());
    let (incoming, nbd) = prepare_target(&d, &m, &params, fd_b).await;
    let b_pid = incoming.pid();
    let a_ctx = ctx("A");
    let t0 = Instant::now();
    let job = d
        .mirror_start(
            &m.a,
            &m.sock_s(),
            &MirrorParams {
                max_bandwidth: Some(16 * MIB),
            },
            &a_ctx,
        )
        .await
        .unwrap();
    // Write 1: into an area the mirror has already copied, before READY.
    let before = loop {
        let j = d.block_jobs(&m.a).await.unwrap();
        let j = j
            .into_iter()
            .find(|j| j.id == job.job_id)
            .expect("mirror job");
        if j.offset > MIB || j.ready {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    qemu_io(&m.a, "write -P 0xab 512k 64k").await;
    assert!(!before.ready, "mirror READY too early to test: {before:?}");
    let seen: Arc<Mutex<Vec<MirrorProgress>>> = Default::default();
    let seen2 = seen.clone();
    let ready = d
        .mirror_wait_ready(&m.a, &job, move |p| seen2.lock().unwrap().push(p), &a_ctx)
        .await
        .unwrap();
    let mirror_s = t0.elapsed().as_secs_f64();
    assert!(ready.ready);
    // Write 2: after READY, before switchover (mirrored as it happens).
    qemu_io(&m.a, "write -P 0xcd 8M 64k").await;
    qemu_io(&m.a, "write -P 0xef 40M 4k").await;

    let ram: Arc<Mutex<Vec<MigrationProgress>>> = Default::default();
    let ram2 = ram.clone();
    let b_ctx = ctx("B");
    let (inc, out) = tokio::join!(
        incoming.wait(&b_ctx),
        d.migrate_outgoing(
            &m.a,
            &params,
            fd_a,
            move |p| ram2.lock().unwrap().push(p),
            &a_ctx
        )
    );
    let out = out.unwrap();
    let inc = inc.unwrap();
    assert!(!m.sock_t().exists(), "target NBD socket left behind");
    let (at_stop, b1, b2) = check_on_b(&d, &m, &inc, b_pid, "mirror move").await;
    assert!(d.block_jobs(&m.a).await.unwrap().is_empty());
    let mut q = Qmp::connect(&m.a.paths.run.join("qmp.sock"), Duration::from_secs(10))
        .await
        .unwrap();
    let nodes = q
        .execute_raw("query-named-block-nodes", json!({}))
        .await
        .unwrap();
    assert!(
        !nodes.to_string().contains("ferry-mirror-target"),
        "NBD node left on A after the move"
    );
    drop(q);
    finish_on_a(&d, &m, a_pid, "mirror move").await;
    d.stop(&m.b, true, &OpCtx::detached()).await.unwrap();

    let (ha, hb) = (sha256(&disk(&m.a)), sha256(&disk(&m.b)));
    assert_eq!(ha, hb, "disks differ after the move");
    assert!(read_at(&disk(&m.b), 512 << 10, 64 << 10)
        .iter()
        .all(|b| *b == 0xab));
    assert!(read_at(&disk(&m.b), 8 * MIB, 64 << 10)
        .iter()
        .all(|b| *b == 0xcd));
    assert!(read_at(&disk(&m.b), 40 * MIB, 4 << 10)
        .iter()
        .all(|b| *b == 0xef));
    let ferry_ms = ferry_downtime_ms(&out, &inc);
    let reports = seen.lock().unwrap().clone();
    for p in &reports {
        eprintln!(
            "  mirror {:>5.2}s {} {}",
            p.elapsed.as_secs_f64(),
            p.status,
            p.summary()
        );
    }
    eprintln!(
        "RESULT mirror move (QEMU {}): disk {DISK_MIB} MiB ({} MiB data) mirrored to READY in {mirror_s:.2} s at 16 MiB/s cap, \
         {} mirror reports; NBD relayed {} MiB over {} connection(s); RAM: total {} ms, QEMU downtime {} ms, \
         ferry downtime (A STOP -> B RESUME) {ferry_ms} ms, of which mirror completion {:?} ms, RAM sent {} MiB; counter at STOP {at_stop}, on B {b1} -> {b2}; \
         sha256 {ha}",
        qemu_label(),
        DATA_END_MIB - DATA_START_MIB,
        reports.len(),
        nbd.bytes.load(Ordering::SeqCst) / MIB,
        nbd.conns.load(Ordering::SeqCst),
        out.total_time_ms,
        out.downtime_ms,
        out.mirror_switchover_ms,
        out.transferred / MIB,
    );
    nbd.cut.cancel();
    d.delete(&m.b).await.unwrap();
    d.delete(&m.a).await.unwrap();
}

/// The NBD link breaks while the bulk copy runs: the mirror fails, the VM
/// runs on at the source with no block job left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_cut_during_mirror_keeps_vm_on_source() {
    let Some((d, m)) = begin(
        "relay_cut_during_mirror_keeps_vm_on_source",
        "fmir",
        "m2",
        &[("limits.memory", "256MiB")],
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        block_mirror: true,
        ..Default::default()
    };
    let (_fd_a, fd_b, _relay) = stream(CancellationToken::new());
    let (incoming, nbd) = prepare_target(&d, &m, &params, fd_b).await;
    let b_pid = incoming.pid();
    let a_ctx = ctx("A");
    let job = d
        .mirror_start(
            &m.a,
            &m.sock_s(),
            &MirrorParams {
                max_bandwidth: Some(8 * MIB),
            },
            &a_ctx,
        )
        .await
        .unwrap();
    let cut = nbd.cut.clone();
    let t = Instant::now();
    let (r, ()) = tokio::join!(
        d.mirror_wait_ready(&m.a, &job, |_| {}, &a_ctx),
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cut.cancel();
        }
    );
    eprintln!(
        "RESULT relay cut during mirror (QEMU {}): ended after {:.2} s: {r:?}",
        qemu_label(),
        t.elapsed().as_secs_f64()
    );
    assert!(r.is_err(), "mirror survived a cut link: {r:?}");
    drop(incoming);
    check_stayed(&d, &m, a_pid, b_pid, "relay cut").await;
}

/// The target QEMU dies during the RAM pre-copy, with a READY mirror: the
/// migration fails, the mirror is removed, the VM runs on at the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_killed_during_ram_copy_with_mirror() {
    let Some((d, m)) = begin(
        "target_killed_during_ram_copy_with_mirror",
        "fmir",
        "m3",
        MEM_512_DIRTY_128,
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    // Never converges: 128 MiB hot set at 32 MiB/s without auto-converge.
    let params = MigrateParams {
        block_mirror: true,
        auto_converge: false,
        max_bandwidth: Some(32 * MIB),
        ..Default::default()
    };
    let (fd_a, fd_b, _relay) = stream(CancellationToken::new());
    let (incoming, _nbd) = prepare_target(&d, &m, &params, fd_b).await;
    let b_pid = incoming.pid();
    let a_ctx = ctx("A");
    d.mirror(&m.a, &m.sock_s(), &MirrorParams::default(), |_| {}, &a_ctx)
        .await
        .unwrap();
    let b_ctx = ctx("B");
    let t = Instant::now();
    let (inc, out, ()) = tokio::join!(
        incoming.wait(&b_ctx),
        d.migrate_outgoing(&m.a, &params, fd_a, |_| {}, &a_ctx),
        kill_qemu_after(3, b_pid)
    );
    eprintln!(
        "RESULT kill target during RAM copy with mirror (QEMU {}): ended after {:.2} s; outgoing: {out:?}; incoming: {inc:?}",
        qemu_label(),
        t.elapsed().as_secs_f64()
    );
    assert!(out.is_err() && inc.is_err());
    check_cleaned(&d, &m, a_pid, b_pid, "kill target").await;
    // The QEMU that tried the move (with pause-before-switchover) can still
    // save its state to a file and come back from it.
    let c = OpCtx::detached();
    let before = d.read_counter(&m.a).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), d.save_state(&m.a, &c))
        .await
        .expect("the stateful stop after a failed move hangs")
        .unwrap();
    assert!(!is_qemu(a_pid));
    d.restore_state(&m.a, &c).await.unwrap();
    let after = d.read_counter(&m.a).await.unwrap();
    assert!(
        after >= before,
        "the counter went back: {before} -> {after}"
    );
    advancing(&d, &m.a, "A after the stateful round trip").await;
    let pid = d.state(&m.a).await.unwrap().pid;
    stop_on_a(&d, &m, pid).await;
}

/// The NBD link dies after READY, before the RAM migration (no guest write
/// in between): completing the mirror at switchover must either fail —
/// the migration is cancelled and the VM runs on at the source — or
/// succeed with identical disks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_link_lost_after_ready() {
    let Some((d, m)) = begin(
        "nbd_link_lost_after_ready",
        "fmir",
        "m4",
        &[("limits.memory", "256MiB")],
    )
    .await
    else {
        return;
    };
    let a_pid = boot_on_a(&d, &m).await;
    let params = MigrateParams {
        block_mirror: true,
        ..Default::default()
    };
    let (fd_a, fd_b, _relay) = stream(CancellationToken::new());
    let (incoming, nbd) = prepare_target(&d, &m, &params, fd_b).await;
    let b_pid = incoming.pid();
    let a_ctx = ctx("A");
    d.mirror(&m.a, &m.sock_s(), &MirrorParams::default(), |_| {}, &a_ctx)
        .await
        .unwrap();
    nbd.cut.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_ctx = ctx("B");
    let (inc, out) = tokio::join!(
        incoming.wait(&b_ctx),
        d.migrate_outgoing(&m.a, &params, fd_a, |_| {}, &a_ctx),
    );
    eprintln!(
        "RESULT NBD link lost after READY (QEMU {}): outgoing: {out:?}; incoming: {inc:?}",
        qemu_label()
    );
    if out.is_err() {
        check_stayed(&d, &m, a_pid, b_pid, "link lost after READY").await;
    } else {
        d.migrate_finish_source(&m.a).await.unwrap();
        d.stop(&m.b, true, &OpCtx::detached()).await.unwrap();
        assert_eq!(sha256(&disk(&m.a)), sha256(&disk(&m.b)));
    }
}
