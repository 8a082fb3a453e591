//! The VM driver end to end with real QEMU: create a testvm, boot it, watch
//! its counter (QMP and console), stateful stop, restore (the counter must
//! continue), stateless stop, delete. Needs root and /dev/kvm; skips otherwise.

mod vmcommon;
use vmcommon::{is_qemu, skip_reason, spec, wait_for, KillOnDrop};

use std::time::{Duration, Instant};

use ferry_drivers::vm::VmDriver;
use ferry_drivers::{Lifecycle, OpCtx, StateSave};

fn progress_ctx() -> OpCtx {
    OpCtx::new(|k, v| eprintln!("  progress {k}: {v}"), Default::default())
}

#[tokio::test]
async fn testvm_lifecycle_and_stateful_stop() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED testvm_lifecycle_and_stateful_stop: {why}");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("fvm")
        .tempdir_in("/tmp")
        .unwrap();
    let s = spec(
        dir.path(),
        "v1",
        &[("limits.memory", "256MiB"), ("testvm.dirty_mib", "16")],
    );
    let _guard = KillOnDrop(s.paths.run.join("qemu.pid"));
    let d = VmDriver::default();
    let ctx = progress_ctx();
    d.validate(&s).unwrap();
    d.create(&s, &ctx).await.unwrap();

    // Cold boot.
    let t = Instant::now();
    d.start(&s, &ctx).await.unwrap();
    let st = d.state(&s).await.unwrap();
    assert!(st.running && st.pid > 0, "{st:?}");
    assert_eq!(st.processes, 1, "{st:?}");
    assert!(st.memory_usage > 0, "{st:?}");
    wait_for(60, "the first counter line", || {
        d.console_counter(&s).unwrap()
    })
    .await;
    let boot = t.elapsed();
    let a = d.read_counter(&s).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = d.read_counter(&s).await.unwrap();
    assert!(b > a, "counter does not advance over QMP: {a} then {b}");
    let c1 = wait_for(5, "a counter line > 0", || {
        d.console_counter(&s).unwrap().filter(|n| *n > 0)
    })
    .await;

    // Stateful stop: QEMU gone, state kept.
    let pid = st.pid;
    let t = Instant::now();
    d.save_state(&s, &ctx).await.unwrap();
    let save = t.elapsed();
    assert!(
        !is_qemu(pid),
        "QEMU {pid} still alive after the stateful stop"
    );
    assert!(!d.state(&s).await.unwrap().running);
    assert!(d.has_saved_state(&s));
    assert!(s.paths.state_dir().join("memory.state").exists());
    let at_save = d.console_counter(&s).unwrap().unwrap();
    assert!(at_save >= c1);

    // Restore: the counter continues.
    let t = Instant::now();
    d.restore_state(&s, &ctx).await.unwrap();
    let restore = t.elapsed();
    assert!(!d.has_saved_state(&s), "state not removed after restore");
    let after = d.read_counter(&s).await.unwrap();
    assert!(
        after >= b,
        "counter reset by restore: {after} < {b} (last value read before the save)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = d.read_counter(&s).await.unwrap();
    assert!(
        later > after,
        "counter does not advance after restore: {after} then {later}"
    );
    wait_for(5, "a console line after the restore", || {
        d.console_counter(&s).unwrap().filter(|n| *n > at_save)
    })
    .await;

    // Stateless stop, then delete.
    let pid2 = d.state(&s).await.unwrap().pid;
    d.stop(&s, false, &ctx).await.unwrap();
    assert!(!d.state(&s).await.unwrap().running);
    assert!(!is_qemu(pid2), "QEMU {pid2} still alive after stop");
    d.delete(&s).await.unwrap();
    assert!(!s.paths.volume.exists());

    eprintln!(
        "TIMES: boot (QEMU start to first counter line) {:.2} s, save {:.3} s, restore {:.3} s; counter {b} before save, {at_save} on console at save, {after} after restore, {later} later",
        boot.as_secs_f64(),
        save.as_secs_f64(),
        restore.as_secs_f64()
    );
}

#[tokio::test]
async fn delete_refuses_running_vm_and_force_stop_kills() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED delete_refuses_running_vm_and_force_stop_kills: {why}");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("fvm")
        .tempdir_in("/tmp")
        .unwrap();
    let s = spec(
        dir.path(),
        "v2",
        &[
            ("limits.memory", "64MiB"),
            ("testvm.dirty_mib", "8"),
            ("limits.cpu", "2"),
        ],
    );
    let _guard = KillOnDrop(s.paths.run.join("qemu.pid"));
    let d = VmDriver::default();
    let ctx = OpCtx::detached();
    d.create(&s, &ctx).await.unwrap();
    d.start(&s, &ctx).await.unwrap();
    assert!(d.start(&s, &ctx).await.is_err(), "second start must fail");
    let st = d.state(&s).await.unwrap();
    assert_eq!(st.processes, 2, "{st:?}");
    assert!(
        d.delete(&s).await.is_err(),
        "delete of a running VM must fail"
    );
    d.stop(&s, true, &ctx).await.unwrap();
    assert!(!d.state(&s).await.unwrap().running);
    d.delete(&s).await.unwrap();
}

/// Cancel a stateful stop of a VM big enough that saving takes a while: the
/// VM keeps running in the same QEMU, no state is left behind.
#[tokio::test]
async fn cancelled_save_leaves_vm_running() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED cancelled_save_leaves_vm_running: {why}");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("fvm")
        .tempdir_in("/tmp")
        .unwrap();
    let s = spec(
        dir.path(),
        "v3",
        &[("limits.memory", "1GiB"), ("testvm.dirty_mib", "768")],
    );
    let _guard = KillOnDrop(s.paths.run.join("qemu.pid"));
    let d = VmDriver::default();
    d.create(&s, &OpCtx::detached()).await.unwrap();
    d.start(&s, &OpCtx::detached()).await.unwrap();
    wait_for(60, "the first counter line > 0", || {
        d.console_counter(&s).unwrap().filter(|n| *n > 0)
    })
    .await;
    let pid = d.state(&s).await.unwrap().pid;

    let token = tokio_util::sync::CancellationToken::new();
    let ctx = OpCtx::new(|k, v| eprintln!("  progress {k}: {v}"), token.clone());
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        token.cancel();
    });
    let t = Instant::now();
    let r = d.save_state(&s, &ctx).await;
    canceller.await.unwrap();
    eprintln!("save ended after {:.3} s: {r:?}", t.elapsed().as_secs_f64());
    match r {
        Err(ferry_drivers::DriverError::Cancelled(_)) => {
            let st = d.state(&s).await.unwrap();
            assert!(
                st.running && st.pid == pid,
                "VM not left running in the same QEMU: {st:?}"
            );
            assert!(
                !d.has_saved_state(&s),
                "a cancelled save left a state behind"
            );
            assert!(!s.paths.state_dir().join("memory.state.tmp").exists());
            let a = d.read_counter(&s).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let b = d.read_counter(&s).await.unwrap();
            assert!(b > a, "VM paused after a cancelled save: {a} then {b}");
            d.stop(&s, true, &OpCtx::detached()).await.unwrap();
        }
        Ok(_) => {
            eprintln!("note: the save finished before the cancel");
            assert!(d.has_saved_state(&s));
            d.discard_state(&s).await.unwrap();
        }
        Err(e) => panic!("save failed: {e}"),
    }
    d.delete(&s).await.unwrap();
}

/// Timing of a stateful stop/start of a 1 GiB guest rewriting 768 MiB
/// (`cargo test -p ferry-drivers --test vm -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn big_vm_save_restore_times() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED big_vm_save_restore_times: {why}");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("fvm")
        .tempdir_in("/tmp")
        .unwrap();
    let s = spec(
        dir.path(),
        "v4",
        &[("limits.memory", "1GiB"), ("testvm.dirty_mib", "768")],
    );
    let _guard = KillOnDrop(s.paths.run.join("qemu.pid"));
    let d = VmDriver::default();
    let ctx = progress_ctx();
    d.create(&s, &ctx).await.unwrap();
    d.start(&s, &ctx).await.unwrap();
    wait_for(60, "a counter line > 1", || {
        d.console_counter(&s).unwrap().filter(|n| *n > 1)
    })
    .await;
    let before = d.read_counter(&s).await.unwrap();
    let t = Instant::now();
    d.save_state(&s, &ctx).await.unwrap();
    let save = t.elapsed();
    let size = std::fs::metadata(s.paths.state_dir().join("memory.state"))
        .unwrap()
        .len();
    let t = Instant::now();
    d.restore_state(&s, &ctx).await.unwrap();
    let restore = t.elapsed();
    let after = d.read_counter(&s).await.unwrap();
    assert!(after >= before);
    eprintln!(
        "TIMES 1GiB/768MiB: save {:.3} s ({} MiB), restore {:.3} s",
        save.as_secs_f64(),
        size >> 20,
        restore.as_secs_f64()
    );
    d.stop(&s, true, &ctx).await.unwrap();
    d.delete(&s).await.unwrap();
}
