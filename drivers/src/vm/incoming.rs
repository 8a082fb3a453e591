//! The target side of a live migration: a QEMU started with `-incoming
//! defer` ([`PendingIncoming`]), then given its stream ([`IncomingVm`]),
//! which follows the migration until the guest runs here.
//!
//! The two steps are apart so that a caller can start QEMU (the longest part
//! of the target's set-up: 50–70 ms on the project's test machine) while it
//! still negotiates the move, and give it the stream once the plan is known
//! ([`VmDriver::launch_incoming`], [`PendingIncoming::accept`]);
//! [`VmDriver::migrate_incoming`] does both at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::VmConfig;
use super::migrate::{
    cleanup_target, migration_error, wait_event, Failure, IncomingStats, LaunchConfig,
    MigrateParams, MigrationStream, POLL, QMP_CONNECT, RESUME_GRACE,
};
use super::mirror;
use super::qemu::{self, Launch, VmFiles};
use super::qmp::{Qmp, QmpEvent};
use super::state::{self, LaunchRecord};
use super::VmDriver;
use crate::{DriverError, InstanceSpec, OpCtx};

impl VmDriver {
    /// Target side, first step: start QEMU as the source's runs
    /// (`source`), waiting for a stream (`-incoming defer`). The disk must
    /// already be at the target spec's volume path (for a disk mirror:
    /// created by [`prepare_mirror_target`](Self::prepare_mirror_target)).
    pub async fn launch_incoming(
        &self,
        spec: &InstanceSpec,
        source: &LaunchConfig,
        ctx: &OpCtx,
    ) -> Result<PendingIncoming, DriverError> {
        VmConfig::from_spec(spec)?;
        let f = VmFiles::of(spec);
        qemu::check_launchable(
            &spec.name,
            &f,
            ": transfer the volume before the live migration",
        )?;
        let version = qemu::qemu_version().await?;
        let launch = Launch {
            name: spec.name.clone(),
            machine: source.machine.clone(),
            memory_mib: source.memory_mib,
            cpus: source.cpus,
            accel: qemu::pick_accel(),
            incoming: true,
            autostart: true,
        };
        ctx.check_cancelled("live migration (target)")?;
        ctx.progress("stage", "starting QEMU for the incoming migration");
        let pid = qemu::launch(&launch, &f).await?;
        Ok(PendingIncoming {
            spec: spec.clone(),
            files: f,
            pid,
            record: LaunchRecord::of(&launch, version),
        })
    }

    /// Target side, both steps: start QEMU and give it the stream (see
    /// [`launch_incoming`](Self::launch_incoming) and
    /// [`PendingIncoming::accept`]). Returns once QEMU listens;
    /// [`IncomingVm::wait`] then follows the migration.
    pub async fn migrate_incoming(
        &self,
        spec: &InstanceSpec,
        source: &LaunchConfig,
        params: &MigrateParams,
        stream: impl Into<MigrationStream>,
        ctx: &OpCtx,
    ) -> Result<IncomingVm, DriverError> {
        params.validate()?;
        self.launch_incoming(spec, source, ctx)
            .await?
            .accept(params, stream)
            .await
    }
}

/// A target QEMU started for an incoming migration that has no stream yet.
/// Dropping it without [`accept`](Self::accept) or
/// [`discard`](Self::discard) kills that QEMU.
pub struct PendingIncoming {
    spec: InstanceSpec,
    files: VmFiles,
    pid: u32,
    record: LaunchRecord,
}

impl PendingIncoming {
    /// The waiting QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Set the migration's capabilities and parameters (the plan's, the
    /// same as the source's) and have QEMU take `stream`. On failure the
    /// QEMU is killed and its runtime files removed.
    pub async fn accept(
        mut self,
        params: &MigrateParams,
        stream: impl Into<MigrationStream>,
    ) -> Result<IncomingVm, DriverError> {
        let stream = stream.into();
        let stream_socket = match &stream {
            MigrationStream::Unix(path) => Some(path.clone()),
            MigrationStream::Fd(_) => None,
        };
        let pid = std::mem::take(&mut self.pid);
        let setup = async {
            params.validate()?;
            let mut qmp = Qmp::connect(&self.files.qmp, QMP_CONNECT).await?;
            super::migrate::set_caps(&mut qmp, params).await?;
            let uri = stream.uri(&mut qmp).await?;
            qmp.migrate_incoming(&uri).await?;
            Ok::<_, DriverError>(qmp)
        };
        let qmp = match setup.await {
            Ok(q) => q,
            Err(e) => {
                cleanup_target(&self.spec, &self.files, pid).await;
                if let Some(sock) = &stream_socket {
                    let _ = std::fs::remove_file(sock);
                }
                return Err(e);
            }
        };
        // QEMU has its own copy: ours must go so QEMU's close ends the stream.
        drop(stream);
        Ok(IncomingVm {
            spec: self.spec.clone(),
            files: self.files.clone(),
            pid,
            qmp: Some(qmp),
            record: self.record.clone(),
            started: Instant::now(),
            postcopy: params.postcopy,
            nbd_socket: None,
            stream_socket,
        })
    }

    /// Not needed after all (the plan did not migrate live): kill the QEMU
    /// and remove its runtime files. The disk stays.
    pub async fn discard(mut self) {
        let pid = std::mem::take(&mut self.pid);
        cleanup_target(&self.spec, &self.files, pid).await;
    }
}

impl Drop for PendingIncoming {
    fn drop(&mut self) {
        if self.pid != 0 {
            qemu::signal(&self.files, self.pid, nix::sys::signal::Signal::SIGKILL);
            qemu::clean_runtime(&self.files);
        }
    }
}

/// A target QEMU waiting for (or receiving) a live migration. Dropping it
/// without [`wait`](Self::wait) kills that QEMU.
pub struct IncomingVm {
    spec: InstanceSpec,
    files: VmFiles,
    pid: u32,
    qmp: Option<Qmp>,
    record: LaunchRecord,
    started: Instant,
    postcopy: bool,
    /// The NBD server's socket, while the disk is exported for a mirror.
    nbd_socket: Option<PathBuf>,
    /// QEMU's listening socket for a multifd stream (removed when done).
    stream_socket: Option<PathBuf>,
}

impl IncomingVm {
    /// The target QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Export the (prepared, empty) disk writable over NBD on the unix socket
    /// `socket`, for the source's disk mirror ([`super::mirror`]). Call
    /// before [`wait`](Self::wait); the server is stopped when the guest
    /// runs here, or goes with this QEMU on failure.
    pub async fn start_nbd_export(&mut self, socket: &Path) -> Result<(), DriverError> {
        let qmp = self.qmp.as_mut().expect("IncomingVm already waited");
        mirror::start_nbd_export(qmp, &self.files.disk, socket).await?;
        self.nbd_socket = Some(socket.to_path_buf());
        Ok(())
    }

    /// Follow the migration until the guest runs on the target. On failure
    /// or cancel (before post-copy) the target QEMU is killed and its
    /// runtime files removed.
    pub async fn wait(mut self, ctx: &OpCtx) -> Result<IncomingStats, DriverError> {
        let mut qmp = self.qmp.take().expect("IncomingVm waited twice");
        let r = self.follow(&mut qmp, ctx).await;
        if let Some(sock) = self.stream_socket.take() {
            let _ = std::fs::remove_file(sock);
        }
        if let Some(sock) = self.nbd_socket.take() {
            if r.is_ok() {
                if let Err(e) = mirror::stop_nbd_export(&mut qmp).await {
                    tracing::warn!("stopping the NBD server of {}: {e}", self.spec.name);
                }
            }
            let _ = std::fs::remove_file(sock);
        }
        drop(qmp);
        match r {
            Ok(stats) => {
                state::write_record(&state::launch_record_path(&self.spec), &self.record)?;
                self.pid = 0;
                Ok(stats)
            }
            Err(Failure::PreCopy(e)) => {
                cleanup_target(&self.spec, &self.files, self.pid).await;
                self.pid = 0;
                Err(e)
            }
            Err(Failure::PostCopy(e)) => {
                // Holds the guest's CPU state and part of its RAM: left alone.
                self.pid = 0;
                Err(e)
            }
        }
    }

    async fn follow(&self, qmp: &mut Qmp, ctx: &OpCtx) -> Result<IncomingStats, Failure> {
        let mut resume_us = None;
        let mut postcopy_seen = false;
        let mut completed_at: Option<Instant> = None;
        let mut cancel_refused = false;
        let mut last_query = Instant::now() - Duration::from_secs(1);
        let mut status = String::from("setup");
        let mut woke_by: Option<QmpEvent> = None;
        loop {
            for ev in woke_by.take().into_iter().chain(qmp.drain_events()) {
                match ev.name.as_str() {
                    "RESUME" => resume_us = resume_us.or(Some(ev.timestamp_us)),
                    "MIGRATION" => status = ev.migration_status().unwrap_or("").to_string(),
                    _ => {}
                }
            }
            if last_query.elapsed() >= Duration::from_millis(250) || status == "completed" {
                last_query = Instant::now();
                match qmp.query_migrate().await {
                    Ok(i) => status = i.status,
                    Err(e) => return Err(self.target_gone(format!("{e}"), postcopy_seen)),
                }
            }
            if status == "postcopy-active" {
                postcopy_seen = true;
            }
            match status.as_str() {
                "failed" | "cancelled" if postcopy_seen => {
                    return Err(Failure::PostCopy(migration_error(format!(
                        "incoming post-copy migration {status} on the target (QEMU pid {}): the VM is lost",
                        self.pid
                    ))))
                }
                "failed" | "cancelled" => {
                    return Err(Failure::PreCopy(migration_error(format!("incoming migration {status} on the target"))))
                }
                s if s.starts_with("postcopy-") && s != "postcopy-active" => {
                    return Err(Failure::PostCopy(migration_error(format!(
                        "the stream broke during post-copy (target QEMU pid {} is {s}): the guest runs here but part of \
                         its memory is still on the source; the VM is lost unless the stream is re-established \
                         (QEMU migrate-recover, not supported by ferry yet). Both QEMUs are left paused.",
                        self.pid
                    ))))
                }
                "completed" => {
                    let at = *completed_at.get_or_insert_with(Instant::now);
                    let run = qmp.status().await.map_err(|e| self.target_gone(format!("{e}"), postcopy_seen))?;
                    if run == "running" || at.elapsed() >= RESUME_GRACE {
                        // The RESUME event was read before the status reply.
                        for ev in qmp.drain_events() {
                            if ev.name == "RESUME" {
                                resume_us = resume_us.or(Some(ev.timestamp_us));
                            }
                        }
                        if resume_us.is_none() && run == "running" {
                            resume_us = wait_event(qmp, "RESUME", Duration::from_millis(100)).await.map(|e| e.timestamp_us);
                        }
                        return Ok(IncomingStats {
                            resume_event_us: resume_us,
                            wall_ms: self.started.elapsed().as_millis() as u64,
                            running: run == "running",
                            postcopy: postcopy_seen,
                        });
                    }
                }
                _ => {}
            }
            if qemu::running_pid(&self.files).is_none() {
                return Err(self.target_gone("QEMU exited".into(), postcopy_seen));
            }
            if ctx.is_cancelled() {
                if postcopy_seen || (self.postcopy && status.starts_with("postcopy")) {
                    if !cancel_refused {
                        cancel_refused = true;
                        ctx.progress("stage", "cannot cancel during post-copy (the guest runs here): finishing the move");
                    }
                } else {
                    return Err(Failure::PreCopy(DriverError::Cancelled(
                        "incoming live migration: the target QEMU was stopped".into(),
                    )));
                }
            }
            // Woken early by QEMU's events (MIGRATION completed, RESUME):
            // the source waits for this side's Resumed.
            woke_by = qmp.next_event(POLL).await;
        }
    }

    fn target_gone(&self, why: String, postcopy: bool) -> Failure {
        if postcopy {
            return Failure::PostCopy(migration_error(format!(
                "the target QEMU (pid {}) failed during post-copy ({why}): the VM is lost",
                self.pid
            )));
        }
        Failure::PreCopy(migration_error(format!(
            "the target QEMU (pid {}) failed during the incoming migration ({why}); the source keeps the VM",
            self.pid
        )))
    }
}

impl Drop for IncomingVm {
    fn drop(&mut self) {
        if self.pid != 0 {
            qemu::signal(&self.files, self.pid, nix::sys::signal::Signal::SIGKILL);
            qemu::clean_runtime(&self.files);
        }
        for sock in [self.nbd_socket.take(), self.stream_socket.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(sock);
        }
    }
}
