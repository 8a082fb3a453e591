//! Stateful stop and start of a VM: QEMU migration into / out of a file.
//!
//! Save: migration capabilities reset (only `events`: an earlier live move
//! may have left others set), `stop`, lift the bandwidth limit, hand QEMU
//! the opened `state/memory.state.tmp` (`getfd`), `migrate fd:NAME`, follow
//! `query-migrate` (woken by events) until `completed`, fsync, rename
//! to `memory.state`, write `vm.json` (how QEMU must be started to take the
//! state back), `quit`. On failure or cancel: `migrate_cancel`, `cont` if the
//! VM was running, remove the partial file: the VM runs on as before.
//!
//! Restore: start QEMU with the recorded machine/memory/vCPUs plus
//! `-incoming defer -S`, capabilities as for the save, `getfd` the state
//! file (read-only),
//! `migrate-incoming fd:NAME`, wait for `completed`, `cont`, then remove the
//! state. On failure or cancel: kill that QEMU, keep the state.

use std::fs::File;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::VmConfig;
use super::qemu::{self, Launch, VmFiles};
use super::qmp::{MigrateInfo, Qmp};
use crate::{DriverError, InstanceSpec, OpCtx, VolatileChanges};

const FD_NAME: &str = "ferry-state";
const QMP_CONNECT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// A save to a local file is not throttled (QEMU's default is 128 MiB/s).
const SAVE_BANDWIDTH: u64 = 1 << 40;

/// How QEMU was started; kept in `run/launch.json` while it runs and copied to
/// `state/vm.json` by a save, so the restore uses the same machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchRecord {
    pub version: u32,
    pub machine: String,
    pub memory_mib: u64,
    pub cpus: u32,
    #[serde(default)]
    pub qemu_version: String,
}

impl LaunchRecord {
    pub fn of(l: &Launch, qemu: (u32, u32, u32)) -> Self {
        LaunchRecord {
            version: 1,
            machine: l.machine.clone(),
            memory_mib: l.memory_mib,
            cpus: l.cpus,
            qemu_version: format!("{}.{}.{}", qemu.0, qemu.1, qemu.2),
        }
    }
}

pub fn launch_record_path(spec: &InstanceSpec) -> std::path::PathBuf {
    spec.paths.run.join("launch.json")
}

pub fn write_record(path: &std::path::Path, r: &LaunchRecord) -> Result<(), DriverError> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(r).expect("serialize launch record");
    std::fs::write(&tmp, body)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(DriverError::io(format!("write {}", path.display())))
}

pub fn read_record(path: &std::path::Path) -> Option<LaunchRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Time allowed for moving the VM's RAM to or from a file.
fn migration_timeout(memory_mib: u64) -> Duration {
    Duration::from_secs(60 + memory_mib / 32)
}

fn failed(what: &str, info: &MigrateInfo) -> DriverError {
    DriverError::Command {
        program: "QEMU migration".into(),
        detail: format!(
            "{what} ended {}: {}",
            info.status,
            info.error.as_deref().unwrap_or("no error description")
        ),
    }
}

/// Follow `query-migrate` until `completed`, woken early by QEMU's
/// MIGRATION events. Cancellation and timeout return errors.
async fn wait_completed(
    qmp: &mut Qmp,
    ctx: &OpCtx,
    what: &str,
    timeout: Duration,
    outgoing: bool,
) -> Result<MigrateInfo, DriverError> {
    let deadline = Instant::now() + timeout;
    let mut last_report = Instant::now();
    loop {
        ctx.check_cancelled(what)?;
        // Events are taken before the query: one that arrives after the
        // answer stays queued and ends the wait below at once.
        qmp.drain_events();
        let info = qmp.query_migrate().await?;
        match info.status.as_str() {
            "completed" => {
                if outgoing && info.total_time_ms.unwrap_or(0) == 0 {
                    // QEMU 7.2 may report completion before the timings are filled in.
                    tokio::time::sleep(POLL).await;
                    return Ok(qmp.query_migrate().await.unwrap_or(info));
                }
                return Ok(info);
            }
            "failed" | "cancelled" | "cancelling" => return Err(failed(what, &info)),
            _ => {}
        }
        if last_report.elapsed() >= Duration::from_millis(500) {
            last_report = Instant::now();
            if let (Some(t), Some(total)) = (info.transferred, info.total) {
                ctx.progress(
                    "state_progress",
                    &format!("{} MiB of {} MiB", t >> 20, total >> 20),
                );
            }
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout(format!(
                "{what}: migration still {} after {timeout:?}",
                info.status
            )));
        }
        qmp.next_event(POLL).await;
    }
}

/// Undo a failed or cancelled save: the VM runs on exactly as before.
async fn rollback_save(qmp: &mut Qmp, was_running: bool) -> Result<(), DriverError> {
    let _ = qmp.migrate_cancel().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match qmp.query_migrate().await.map(|i| i.status) {
            Ok(s)
                if matches!(
                    s.as_str(),
                    "setup" | "active" | "cancelling" | "device" | "pre-switchover"
                ) =>
            {
                tokio::time::sleep(POLL).await
            }
            _ => break,
        }
    }
    let _ = qmp.close_fd(FD_NAME).await;
    if was_running {
        qmp.cont().await?;
    }
    super::aftermath::restore_qemu_defaults(qmp).await;
    Ok(())
}

/// Stateful stop.
pub async fn save(spec: &InstanceSpec, ctx: &OpCtx) -> Result<VolatileChanges, DriverError> {
    let f = VmFiles::of(spec);
    let pid = qemu::running_pid(&f)
        .ok_or_else(|| DriverError::WrongState(format!("VM {} is not running", spec.name)))?;
    let record = match read_record(&launch_record_path(spec)) {
        Some(r) => r,
        None => LaunchRecord::of(
            &Launch::new(spec, &VmConfig::from_spec(spec)?, qemu::pick_accel()),
            qemu::qemu_version().await?,
        ),
    };
    ctx.check_cancelled("stateful stop")?;
    let started = Instant::now();
    std::fs::create_dir_all(&f.state_dir)
        .map_err(DriverError::io(format!("create {}", f.state_dir.display())))?;
    let tmp = f.state_file.with_extension("state.tmp");
    let file = File::create(&tmp).map_err(DriverError::io(format!("create {}", tmp.display())))?;

    let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
    let was_running = qmp.status().await? == "running";
    ctx.progress("stage", "pausing the VM");
    let result = async {
        qmp.set_capabilities(&super::migrate::file_capabilities())
            .await?;
        qmp.stop().await?;
        ctx.progress("stage", "saving the VM's memory");
        qmp.set_max_bandwidth(SAVE_BANDWIDTH).await?;
        qmp.send_fd(FD_NAME, file.as_fd()).await?;
        qmp.migrate(&format!("fd:{FD_NAME}")).await?;
        let info = wait_completed(
            &mut qmp,
            ctx,
            "saving the VM state",
            migration_timeout(record.memory_mib),
            true,
        )
        .await?;
        file.sync_all()
            .map_err(DriverError::io(format!("sync {}", tmp.display())))?;
        Ok::<_, DriverError>(info)
    }
    .await;
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(match rollback_save(&mut qmp, was_running).await {
                Ok(()) => e,
                Err(r) => {
                    DriverError::Qmp(format!("{e}; and resuming the VM afterwards failed: {r}"))
                }
            });
        }
    };
    drop(file);
    if let Err(e) = std::fs::rename(&tmp, &f.state_file)
        .map_err(DriverError::io(format!("rename {}", tmp.display())))
        .and_then(|_| write_record(&f.state_meta, &record))
    {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir_all(&f.state_dir);
        let _ = rollback_save(&mut qmp, was_running).await;
        return Err(e);
    }
    let saved_ms = started.elapsed().as_millis();
    ctx.progress("stage", "stopping QEMU");
    let _ = qmp.quit().await;
    drop(qmp);
    if !qemu::wait_exit(&f, pid, Duration::from_secs(10)).await {
        qemu::kill_and_clean(&f, pid).await?;
    }
    qemu::clean_runtime(&f);
    let _ = std::fs::remove_file(launch_record_path(spec));
    let size = std::fs::metadata(&f.state_file)
        .map(|m| m.len())
        .unwrap_or(0);
    ctx.progress(
        "state_time",
        &format!(
            "saved {} MiB in {saved_ms} ms (QEMU migration {} ms)",
            size >> 20,
            info.total_time_ms.unwrap_or(0)
        ),
    );
    Ok(VolatileChanges::new())
}

/// Stateful start.
pub async fn restore(spec: &InstanceSpec, ctx: &OpCtx) -> Result<VolatileChanges, DriverError> {
    let f = VmFiles::of(spec);
    if qemu::running_pid(&f).is_some() {
        return Err(DriverError::WrongState(format!(
            "VM {} is already running",
            spec.name
        )));
    }
    if !f.state_file.exists() {
        return Err(DriverError::WrongState(format!(
            "VM {} has no saved state: start it without one",
            spec.name
        )));
    }
    let version = qemu::qemu_version().await?;
    let cfg = VmConfig::from_spec(spec)?;
    let mut launch = Launch::new(spec, &cfg, qemu::pick_accel());
    if let Some(r) = read_record(&f.state_meta) {
        launch.machine = r.machine;
        launch.memory_mib = r.memory_mib;
        launch.cpus = r.cpus;
    }
    launch.incoming = true;
    let file = File::open(&f.state_file)
        .map_err(DriverError::io(format!("open {}", f.state_file.display())))?;
    ctx.check_cancelled("stateful start")?;
    let started = Instant::now();
    ctx.progress("stage", "starting QEMU for the saved state");
    let pid = qemu::launch(&launch, &f).await?;
    let result = async {
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        ctx.progress("stage", "loading the VM's memory");
        qmp.set_capabilities(&super::migrate::file_capabilities())
            .await?;
        qmp.send_fd(FD_NAME, file.as_fd()).await?;
        qmp.migrate_incoming(&format!("fd:{FD_NAME}")).await?;
        let info = wait_completed(
            &mut qmp,
            ctx,
            "loading the VM state",
            migration_timeout(launch.memory_mib),
            false,
        )
        .await?;
        ctx.check_cancelled("stateful start")?;
        ctx.progress("stage", "resuming the VM");
        qmp.cont().await?;
        let status = qmp.status().await?;
        if status != "running" {
            return Err(DriverError::Qmp(format!(
                "VM is {status} after resuming from the saved state"
            )));
        }
        Ok::<_, DriverError>(info)
    }
    .await;
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            let _ = qemu::kill_and_clean(&f, pid).await;
            return Err(e);
        }
    };
    write_record(
        &launch_record_path(spec),
        &LaunchRecord::of(&launch, version),
    )?;
    drop(file);
    let _ = std::fs::remove_dir_all(&f.state_dir);
    let _ = info; // the incoming side reports no timings
    ctx.progress(
        "state_time",
        &format!("restored in {} ms", started.elapsed().as_millis()),
    );
    Ok(VolatileChanges::new())
}
