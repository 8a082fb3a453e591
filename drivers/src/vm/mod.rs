//! VM driver: QEMU/KVM driven over QMP (qapi crate).
//!
//! Layout of one VM:
//! - `volume/disk.img`: raw disk, the `testvm` template with the instance's
//!   parameter block (re-patched from config at every cold boot),
//! - `volume/state/memory.state` + `vm.json`: a stateful stop's RAM/device
//!   state (QEMU migration stream) and how to start QEMU to load it,
//! - `run/qmp.sock`, `run/qemu.pid`, `run/launch.json`: runtime files of the
//!   daemonized QEMU (it outlives ferryd; liveness comes from the pidfile and
//!   `/proc`, see [`qemu::running_pid`]),
//! - `logs/console.log`: the guest's serial console, appended across boots,
//! - `images/testvm-<hash>.bin`: the assembled guest, shared by all VMs.
//!
//! Modules: [`config`] (keys, validation), [`image`] (guest template and
//! parameter block), [`qemu`] (command line, processes), [`qmp`] (QMP client
//! with fd passing, reusable for live migration), [`state`] (save/restore),
//! [`guest`] (reading the test guest's counter), [`migrate`] (live
//! migration), [`mirror`] (copying the disk of a running VM over NBD).

mod aftermath;
pub mod config;
pub mod guest;
pub mod image;
mod incoming;
pub mod migrate;
pub mod mirror;
mod priority;
pub mod qemu;
pub mod qmp;
pub mod state;
mod switchover;

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::*;
use config::VmConfig;
use qemu::{Launch, VmFiles};
use qmp::Qmp;

pub use image::COUNTER_ADDR;
pub use priority::VcpuPriority;

const QMP_CONNECT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub struct VmDriver {}

impl VmDriver {
    /// Can this member's QEMU take part in a multifd migration (8.0 and
    /// later: see [`qmp::MULTIFD_SINCE`])?
    pub async fn multifd_support() -> bool {
        matches!(qemu::qemu_version().await, Ok((major, minor, micro))
            if (major as u64, minor as u64, micro as u64) >= qmp::MULTIFD_SINCE)
    }

    /// The same for the QEMU this running VM was started with (QEMU may
    /// have been upgraded since): its launch record's version, else the
    /// installed one.
    pub async fn multifd_support_of(&self, spec: &InstanceSpec) -> bool {
        let recorded = state::read_record(&state::launch_record_path(spec)).and_then(|r| {
            let mut v = r.qemu_version.split('.').map(|n| n.parse::<u64>().ok());
            Some((v.next()??, v.next()??, v.next().flatten().unwrap_or(0)))
        });
        match recorded {
            Some(v) => v >= qmp::MULTIFD_SINCE,
            None => Self::multifd_support().await,
        }
    }

    /// The test guest's counter, read from guest RAM at [`COUNTER_ADDR`] over QMP.
    pub async fn read_counter(&self, spec: &InstanceSpec) -> Result<u64, DriverError> {
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Err(DriverError::WrongState(format!(
                "VM {} is not running",
                spec.name
            )));
        }
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        let out = qmp.hmp(&format!("xp /1gx {COUNTER_ADDR:#x}")).await?;
        guest::parse_xp(&out, COUNTER_ADDR)
            .ok_or_else(|| DriverError::Qmp(format!("unexpected output of xp: {:?}", out.trim())))
    }

    /// Whether the VM's QEMU still holds a migration that ended (or runs):
    /// its yank instance is registered. Seconds after a failed move this
    /// means QEMU's clean-up is stuck (see `Qmp::set_capabilities`).
    pub async fn migration_pending(&self, spec: &InstanceSpec) -> Result<bool, DriverError> {
        let f = VmFiles::of(spec);
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        qmp.migration_yank_registered().await
    }

    /// Before a live move: wait (up to 10 s) for QEMU to finish cleaning up
    /// an earlier migration, or refuse with what to do (see
    /// `Qmp::set_capabilities`), before the target does any work.
    pub async fn ready_to_migrate(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        qmp.wait_migration_cleanup().await
    }

    /// The number on the last complete `counter N` line of the console log.
    pub fn console_counter(&self, spec: &InstanceSpec) -> Result<Option<u64>, DriverError> {
        let path = VmFiles::of(spec).console;
        guest::console_counter(&path).map_err(DriverError::io(format!("read {}", path.display())))
    }

    /// Path of the serial console log.
    pub fn console_log(&self, spec: &InstanceSpec) -> std::path::PathBuf {
        VmFiles::of(spec).console
    }

    async fn graceful_stop(&self, f: &VmFiles, pid: u32) -> Result<(), DriverError> {
        // The test guest has no ACPI: `quit` is the clean way to end QEMU.
        match Qmp::connect(&f.qmp, Duration::from_secs(5)).await {
            Ok(mut qmp) => {
                if let Err(e) = qmp.quit().await {
                    tracing::warn!("QMP quit failed ({e}); sending SIGTERM");
                    qemu::signal(f, pid, Signal::SIGTERM);
                }
            }
            Err(e) => {
                tracing::warn!("QMP unreachable ({e}); sending SIGTERM");
                qemu::signal(f, pid, Signal::SIGTERM);
            }
        }
        if qemu::wait_exit(f, pid, Duration::from_secs(15)).await {
            qemu::clean_runtime(f);
            return Ok(());
        }
        tracing::warn!("QEMU (pid {pid}) did not exit within 15 s; killing it");
        qemu::kill_and_clean(f, pid).await
    }
}

impl Lifecycle for VmDriver {
    fn validate(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        VmConfig::from_spec(spec).map(|_| ())
    }

    async fn create(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let cfg = VmConfig::from_spec(spec)?;
        let f = VmFiles::of(spec);
        if f.disk.exists() {
            return Err(DriverError::WrongState(format!(
                "VM {} already has a disk at {}",
                spec.name,
                f.disk.display()
            )));
        }
        ctx.progress("stage", "building the testvm image");
        let template = image::ensure_template(&spec.paths.images).await?;
        ctx.check_cancelled("create")?;
        std::fs::create_dir_all(&spec.paths.volume).map_err(DriverError::io(format!(
            "create {}",
            spec.paths.volume.display()
        )))?;
        ctx.progress("stage", "writing the disk");
        image::write_disk(&template, &f.disk, &image::GuestParams::from_config(&cfg))?;
        Ok(VolatileChanges::new())
    }

    async fn start(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let cfg = VmConfig::from_spec(spec)?;
        let f = VmFiles::of(spec);
        qemu::check_launchable(&spec.name, &f, "")?;
        let version = qemu::qemu_version().await?;
        image::repatch_disk(&f.disk, &image::GuestParams::from_config(&cfg))?;
        ctx.check_cancelled("start")?;
        let launch = Launch::new(spec, &cfg, qemu::pick_accel());
        ctx.progress("stage", "starting QEMU");
        let pid = qemu::launch(&launch, &f).await?;
        let check = async {
            ctx.check_cancelled("start")?;
            let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
            match qmp.status().await?.as_str() {
                "running" => Ok(()),
                s => Err(DriverError::Qmp(format!("QEMU started but the VM is {s}"))),
            }
        };
        if let Err(e) = check.await {
            let _ = qemu::kill_and_clean(&f, pid).await;
            return Err(e);
        }
        state::write_record(
            &state::launch_record_path(spec),
            &state::LaunchRecord::of(&launch, version),
        )?;
        Ok(VolatileChanges::new())
    }

    async fn stop(
        &self,
        spec: &InstanceSpec,
        force: bool,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let f = VmFiles::of(spec);
        let Some(pid) = qemu::running_pid(&f) else {
            qemu::clean_runtime(&f);
            return Ok(VolatileChanges::new());
        };
        ctx.progress(
            "stage",
            if force {
                "killing QEMU"
            } else {
                "stopping QEMU"
            },
        );
        if force {
            qemu::kill_and_clean(&f, pid).await?;
        } else {
            self.graceful_stop(&f, pid).await?;
        }
        let _ = std::fs::remove_file(state::launch_record_path(spec));
        Ok(VolatileChanges::new())
    }

    async fn state(&self, spec: &InstanceSpec) -> Result<RuntimeState, DriverError> {
        let f = VmFiles::of(spec);
        let Some(pid) = qemu::running_pid(&f) else {
            return Ok(RuntimeState::default());
        };
        let (vcpus, rss) = qemu::usage(pid);
        let processes = if vcpus > 0 {
            vcpus
        } else {
            VmConfig::from_spec(spec)
                .map(|c| c.cpus as i64)
                .unwrap_or(0)
        };
        Ok(RuntimeState {
            running: true,
            pid,
            processes,
            memory_usage: rss,
        })
    }

    async fn delete(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        if let Some(pid) = qemu::running_pid(&f) {
            return Err(DriverError::WrongState(format!(
                "VM {} is running (QEMU pid {pid}): stop it first",
                spec.name
            )));
        }
        let p = &spec.paths;
        match std::fs::remove_dir_all(&p.volume) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DriverError::io(format!("remove {}", p.volume.display()))(e)),
        }
        qemu::clean_runtime(&f);
        let _ = std::fs::remove_file(state::launch_record_path(spec));
        let _ = std::fs::remove_file(&f.console);
        let _ = std::fs::remove_dir(&p.run);
        let _ = std::fs::remove_dir(&p.logs);
        Ok(())
    }
}

impl StateSave for VmDriver {
    async fn save_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        state::save(spec, ctx).await
    }

    async fn restore_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        state::restore(spec, ctx).await
    }

    fn has_saved_state(&self, spec: &InstanceSpec) -> bool {
        VmFiles::of(spec).state_file.exists()
    }

    async fn discard_state(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let dir = VmFiles::of(spec).state_dir;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::io(format!("remove {}", dir.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(image: &str, config: &[(&str, &str)]) -> InstanceSpec {
        InstanceSpec {
            name: "v1".into(),
            kind: InstanceType::VirtualMachine,
            image: image.into(),
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volatile: Default::default(),
            paths: InstancePaths {
                volume: "/x/v".into(),
                run: "/x/r".into(),
                logs: "/x/l".into(),
                images: "/x/i".into(),
            },
        }
    }

    #[test]
    fn validate() {
        let d = VmDriver::default();
        assert!(d
            .validate(&spec("testvm", &[("limits.memory", "512MiB")]))
            .is_ok());
        let e = d.validate(&spec("busybox", &[])).unwrap_err();
        assert!(
            matches!(e, DriverError::InvalidConfig(_)) && e.to_string().contains("testvm"),
            "{e}"
        );
        assert!(d
            .validate(&spec("testvm", &[("raw.qemu", "-foo")]))
            .is_err());
        assert!(d
            .validate(&spec(
                "testvm",
                &[("limits.memory", "64MiB"), ("testvm.dirty_mib", "64")]
            ))
            .is_err());
    }

    #[test]
    fn stopped_vm_state() {
        let d = VmDriver::default();
        let s = spec("testvm", &[]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(d.state(&s)).unwrap(), RuntimeState::default());
        assert!(!d.has_saved_state(&s));
    }
}
