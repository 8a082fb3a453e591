//! VM moves: the disk travels first as an archive over `fs`, then QEMU's
//! migration stream runs between the two QEMUs through socketpairs relayed
//! over the `state` websocket in both directions (post-copy needs the
//! return path). No state file is written on either side.

use std::sync::Arc;
use std::time::Instant;

use ferry_drivers::vm::migrate::{
    LaunchConfig, MigrateParams, MigrationControl, MigrationStream, PendingIncoming,
};
use ferry_drivers::vm::mirror::MirrorParams;
use ferry_drivers::vm::{VcpuPriority, VmDriver};
use ferry_drivers::{Driver, InstanceSpec, Lifecycle, OpCtx, StateSave};
use ferry_migration::{
    ByteChannel, FsPlan, Message, MessageChannel, Plan, QemuFeature, SourceState, StatePlan,
    TargetState,
};
use serde_json::json;
use tokio_util::io::SyncIoBridge;

use super::progress::Phase;
use super::source::{close_bridge, send_archive, MoveRun, Pass};
use super::ws::{self, WsControl, WsPipe};
use super::{is_shared, qemu_stream_socketpair, AbortOnDrop, SinkRequest};
use crate::core::Daemon;

/// QEMU parameters from the agreed plan (the same on both sides).
fn params(plan: &Plan) -> MigrateParams {
    let has = |f: QemuFeature| plan.has_qemu_feature(f);
    MigrateParams {
        auto_converge: has(QemuFeature::AutoConverge),
        xbzrle: has(QemuFeature::Xbzrle),
        postcopy: plan.is_postcopy(),
        max_bandwidth: plan.options.bandwidth,
        downtime_limit_ms: plan
            .options
            .max_downtime_ms
            .unwrap_or(MigrateParams::default().downtime_limit_ms),
        downtime_target_ms: plan
            .options
            .downtime_target_ms
            .or(MigrateParams::default().downtime_target_ms),
        multifd_channels: if has(QemuFeature::Multifd) {
            ferry_migration::MULTIFD_CHANNELS as u8
        } else {
            0
        },
        ..MigrateParams::default()
    }
}

/// A block mirror needs a live QEMU on both sides.
fn is_mirror(plan: &Plan) -> Result<bool, String> {
    let mirror = matches!(plan.fs, FsPlan::BlockMirror { .. });
    if mirror && !matches!(plan.state, StatePlan::VmQemuLive { .. }) {
        return Err(format!(
            "the agreed plan copies the disk by block mirror without a live migration ({plan}); \
             move the VM with --stateless or upgrade the target"
        ));
    }
    Ok(mirror)
}

impl MoveRun {
    pub(super) async fn transfer_vm(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        plan: &Plan,
        state_pipes: Vec<WsPipe>,
        fs_pipe: WsPipe,
    ) -> Result<(), String> {
        let vm = VmDriver::default();
        let ctx = OpCtx::detached();
        let shared = is_shared(plan);
        let mirror = is_mirror(plan)?;
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let counters = fs.counters();
        if self.running && !plan.is_stateful() {
            self.phase(Phase::Preparing, "stopping the VM (stateless move)");
            Driver::Vm(vm.clone())
                .stop(&self.spec, false, &ctx)
                .await
                .map_err(|e| e.to_string())?;
        }
        if plan.state == StatePlan::StatefulStopFile {
            // The previous protocol's path: RAM into a state file on the
            // volume, which then travels with the disk.
            self.check_cancel()?;
            self.stateful_stop("stateful stop on the source (RAM into a state file)")
                .await?;
        }
        self.check_cancel()?;
        let mut fs = Some(fs);
        let live = matches!(plan.state, StatePlan::VmQemuLive { .. });
        // The guest's vCPUs yield to the whole move, the disk mirror included
        // (put back when this guard goes, however the move ends).
        let vcpus = if live {
            vm.lower_vcpu_priority(&self.spec).await
        } else {
            VcpuPriority::default()
        };
        if !shared && !mirror {
            self.phase(Phase::Filesystem, "copying the VM's volume");
            let (_r, w) = tokio::io::split(fs.take().ok_or("no fs channel")?);
            let pass = Pass {
                cancel: self.op.cancel_token(),
                progress: Some((self.op.clone(), Some(plan.volume_size))),
                limit: plan.options.bandwidth,
                ..Default::default()
            };
            let (b, _) =
                send_archive(SyncIoBridge::new(w), self.spec.paths.volume.clone(), pass).await?;
            close_bridge(b).await?;
        }
        if mirror {
            self.mirror_disk(plan, fs.take().ok_or("no fs channel")?)
                .await?;
        }
        let st = if live && plan.has_qemu_feature(QemuFeature::TargetListens) {
            self.await_listening(ctl, st).await?
        } else {
            st
        };
        if live {
            self.phase(Phase::Memory, "migrating memory (QEMU pre-copy)");
            let compression = plan.state_compression;
            let (stream, relays) = if plan.has_qemu_feature(QemuFeature::Multifd) {
                // QEMU connects once per channel to a socket we listen on.
                let path = self.spec.paths.run.join("migration-out.sock");
                let relays = super::multifd::relay_outgoing(&path, state_pipes, compression)?;
                (MigrationStream::Unix(path), relays)
            } else {
                let (qemu_fd, ours) = qemu_stream_socketpair()?;
                let relay = super::multifd::relay_single(ours, state_pipes, compression)?;
                (MigrationStream::Fd(qemu_fd), relay)
            };
            let control = MigrationControl::default();
            let abandoned = control.abandoned();
            let nbd = self.nbd_relay.clone();
            let relay = tokio::spawn(async move {
                // QEMU gave up on the stream: close every connection to it
                // now (its clean-up may wait for that), not when the link's
                // timeouts end the relays.
                let r = tokio::select! {
                    r = relays => r,
                    _ = abandoned => Err("QEMU's migration ended without completing".to_string()),
                };
                if r.is_err() {
                    // The link is gone: end the disk mirror's NBD relay too,
                    // or QEMU would wait on it (its monitor blocked).
                    if let Some(h) = nbd {
                        h.abort();
                    }
                }
                r
            });
            // If the migration fails however, the relays end with it.
            let relay = AbortOnDrop::new(relay);
            let op = self.op.clone();
            let ctx = OpCtx::new(|_, _| {}, self.op.cancel_token());
            let started = Instant::now();
            let stats = vm
                .migrate_outgoing_with(
                    &self.spec,
                    &MigrateParams {
                        block_mirror: mirror,
                        ..params(plan)
                    },
                    stream,
                    &control,
                    move |p| {
                        op.set_meta("state_progress", json!(p.summary()));
                        op.set_meta("qemu_status", json!(p.status));
                        super::progress::publish(&op, &memory_figures(&p, started));
                    },
                    &ctx,
                )
                .await
                .map_err(|e| {
                    let e = e.to_string();
                    // Post-copy had started: nothing to roll back to.
                    if e.contains("split between") {
                        self.vm_lost = true;
                        format!(
                            "the VM is lost: the link broke during post-copy ({e}); it is recorded \
                             with status Error on {}; delete it or restore it from a backup",
                            self.d.member
                        )
                    } else {
                        format!("QEMU migration: {e}")
                    }
                })?;
            // QEMU completed: the source is paused, the target runs or is about to.
            self.mark("QEMU migration completed");
            // The guest runs on the target now (or is about to).
            drop(vcpus);
            self.vm_migrated = true;
            self.stop_event_us = stats.stop_event_us;
            self.frozen = Some(
                started
                    + std::time::Duration::from_millis(
                        stats.total_time_ms.saturating_sub(stats.downtime_ms),
                    ),
            );
            self.op.set_meta(
                "qemu_params",
                json!(MigrateParams {
                    block_mirror: mirror,
                    ..params(plan)
                }),
            );
            self.op.set_meta("qemu", json!({"total_ms": stats.total_time_ms, "downtime_ms": stats.downtime_ms, "transferred": stats.transferred, "passes": stats.dirty_sync_count, "max_throttle_percent": stats.max_throttle_percent, "switchover_limit_ms": stats.switchover_limit_ms, "switchover_bandwidth": stats.switchover_bandwidth, "vcpu_nice": stats.vcpu_nice, "mirror_switchover_ms": stats.mirror_switchover_ms}));
            // Completed: the relays may still carry the stream's tail to the
            // target (a slow link); they end by themselves.
            if let Ok(Ok(Ok(stats))) =
                tokio::time::timeout(std::time::Duration::from_secs(10), relay.detach()).await
            {
                stats.publish(&self.op);
            }
        }
        self.hand_over(ctl, st, plan, counters.sent.get()).await?;
        // The target runs the guest and keeps it (its `Success`: the point
        // of no return, see `commit_location`): the paused source QEMU goes
        // while the new location is recorded.
        let quit = plan.is_live().then(|| {
            let spec = self.spec.clone();
            tokio::spawn(async move { VmDriver::default().migrate_finish_source(&spec).await })
        });
        let recorded = self.commit_location().await;
        if let Some(quit) = quit {
            let done = quit.await.map_err(|e| e.to_string());
            if let Err(e) = done.and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::warn!(error = %e, "source QEMU cleanup after move");
            }
        }
        recorded?;
        self.phase(Phase::Completing, "cleaning up the source");
        self.clean_up_source().await;
        Ok(())
    }

    /// Block mirror: the source QEMU copies the disk to the target QEMU's
    /// NBD export while the guest runs; ferry relays the NBD connection
    /// (a unix socket here ⇄ fs channel ⇄ the export's socket there).
    async fn mirror_disk(
        &mut self,
        plan: &Plan,
        fs: ByteChannel<tokio::io::DuplexStream>,
    ) -> Result<(), String> {
        let sock = self.spec.paths.run.join("nbd-mirror.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            match listener.accept().await {
                Ok((conn, _)) => {
                    if let Err(e) = ferry_migration::relay(conn, fs).await {
                        tracing::debug!(error = %e, "NBD relay ended");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "NBD relay: accept"),
            }
        });
        self.nbd_relay = Some(task.abort_handle());
        self.phase(
            Phase::Filesystem,
            "copying the disk while the VM runs (block mirror)",
        );
        let op = self.op.clone();
        let started = Instant::now();
        let ctx = OpCtx::new(|_, _| {}, self.op.cancel_token());
        let res = VmDriver::default()
            .mirror(
                &self.spec,
                &sock,
                &MirrorParams {
                    max_bandwidth: plan.options.bandwidth,
                },
                move |p| {
                    let mut f = super::progress::Figures::measure(
                        Phase::Filesystem,
                        p.done,
                        Some(p.total),
                        started.elapsed(),
                    );
                    if p.rate > 0 {
                        f.rate_bytes_per_s = p.rate;
                    }
                    op.set_meta("disk_progress", json!(p.summary()));
                    super::progress::publish(&op, &f);
                },
                &ctx,
            )
            .await;
        let _ = std::fs::remove_file(&sock);
        res.map_err(|e| format!("disk mirror: {e}"))?;
        self.op.set_meta(
            "disk_mirror_ms",
            json!(started.elapsed().as_millis() as u64),
        );
        Ok(())
    }

    pub(super) async fn recover_vm(&mut self) {
        let vm = VmDriver::default();
        if let Some(h) = self.nbd_relay.take() {
            h.abort();
        }
        // A mirror job or NBD node left by a failure before the migration.
        if let Err(e) = vm.mirror_cancel(&self.spec).await {
            tracing::warn!(error = %e, "removing the disk mirror after a failed move");
        }
        if self.vm_migrated {
            if let Err(e) = vm.migrate_resume_source(&self.spec).await {
                tracing::error!(instance = %self.rec.name, error = %e, "could not resume the VM on the source after a failed move");
            }
        } else if self.running && !self.live && !self.d.runtime(&self.spec).await.running {
            let _ = Driver::Vm(vm).start(&self.spec, &OpCtx::detached()).await;
        }
    }
}

/// QEMU's progress as move figures (RAM transferred of transferred + remaining).
fn memory_figures(
    p: &ferry_drivers::vm::migrate::MigrationProgress,
    started: Instant,
) -> super::progress::Figures {
    let mut f = super::progress::Figures::measure(
        Phase::Memory,
        p.transferred,
        Some(p.transferred + p.remaining),
        started.elapsed(),
    );
    if p.rate > 0 {
        f.rate_bytes_per_s = p.rate;
    }
    f.eta_s = p.eta.map(|e| e.as_secs());
    f
}

impl MoveRun {
    /// Wait until the target's QEMU waits for the migration stream. Started
    /// before, the migration would fill the link while that QEMU starts,
    /// and a guest with little to send would switch over into the wait:
    /// paused until the target's QEMU is up (on a shared pool, where no
    /// disk mirror comes first, that is most of its start: 50–110 ms after
    /// the plan on the benchmark host).
    async fn await_listening(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
    ) -> Result<SourceState, String> {
        // In the timeline only: after a disk mirror the operation's phase
        // must not step back (the message is usually there already).
        self.mark("waiting for the target's QEMU to listen");
        let cancel = self.op.cancel_token();
        let mut st = st;
        loop {
            let (next, msg) = tokio::select! {
                r = st.recv(ctl) => r.map_err(super::peer_error("target"))?,
                _ = cancel.cancelled() => return Err("cancelled by the user".into()),
            };
            st = next;
            if matches!(msg, Message::Listening {}) {
                self.mark("the target's QEMU listens");
                return Ok(st);
            }
        }
    }
}

impl Daemon {
    /// Target side of a VM move (after the handshake).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive_vm(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        plan: &Plan,
        spec: &InstanceSpec,
        state_pipes: Vec<WsPipe>,
        fs_pipe: WsPipe,
        early: Option<Result<PendingIncoming, String>>,
        req: &SinkRequest,
    ) -> Result<(), String> {
        let vm = VmDriver::default();
        let ctx = OpCtx::detached();
        let mirror = is_mirror(plan)?;
        let live = matches!(plan.state, StatePlan::VmQemuLive { .. });
        let uses_early = live && (mirror || is_shared(plan));
        let unused = (!uses_early).then_some("the agreed plan does not use it");
        let early = self.take_early(early, spec, unused, req).await;
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let mut fs = Some(fs);
        if mirror && early.is_none() {
            self.prepare_disk(spec, req.disk_size)?;
        } else if !mirror && !is_shared(plan) {
            let (r, _w) = tokio::io::split(fs.take().ok_or("no fs channel")?);
            super::target::recv_archive(SyncIoBridge::new(r), spec.paths.volume.clone(), false)
                .await?;
            std::fs::write(super::target::receiving_marker(spec), b"")
                .map_err(|e| e.to_string())?;
        }
        let incoming = if live {
            let compression = plan.state_compression;
            // The relays start (spawned below) once QEMU waits for the stream.
            let (stream, relays) = if plan.has_qemu_feature(QemuFeature::Multifd) {
                // QEMU listens; a connection per channel when its bytes come.
                let path = spec.paths.run.join("migration-in.sock");
                let relays = super::multifd::relay_incoming(&path, state_pipes, compression);
                (MigrationStream::Unix(path), relays)
            } else {
                let (qemu_fd, ours) = qemu_stream_socketpair()?;
                let relay = super::multifd::relay_single(ours, state_pipes, compression)?;
                (MigrationStream::Fd(qemu_fd), relay)
            };
            let started = match early {
                Some(qemu) => qemu.accept(&params(plan), stream).await,
                None => {
                    let launch: LaunchConfig = serde_json::from_value(
                        req.launch
                            .clone()
                            .ok_or("the source sent no launch configuration")?,
                    )
                    .map_err(|e| e.to_string())?;
                    vm.migrate_incoming(spec, &launch, &params(plan), stream, &ctx)
                        .await
                }
            };
            let mut incoming = started.map_err(|e| e.to_string())?;
            if mirror {
                // The source's mirror writes the disk through this export.
                let sock = spec.paths.run.join("nbd-export.sock");
                incoming
                    .start_nbd_export(&sock)
                    .await
                    .map_err(|e| format!("NBD export: {e}"))?;
                let conn = tokio::net::UnixStream::connect(&sock)
                    .await
                    .map_err(|e| format!("NBD export: {e}"))?;
                let fs = fs.take().ok_or("no fs channel")?;
                tokio::spawn(async move {
                    if let Err(e) = ferry_migration::relay(fs, conn).await {
                        tracing::debug!(error = %e, "NBD relay ended");
                    }
                });
            }
            tokio::spawn(relays);
            if plan.has_qemu_feature(QemuFeature::TargetListens) {
                ctl.send(&Message::Listening {})
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some(incoming)
        } else {
            None
        };
        let st = super::target::await_restore(ctl, st).await?;
        let mut resumed_at = None;
        let vol = if let Some(incoming) = incoming {
            let stats = incoming
                .wait(&ctx)
                .await
                .map_err(|e| format!("incoming migration: {e}"))?;
            resumed_at = stats.resume_event_us;
            Default::default()
        } else if plan.state == StatePlan::StatefulStopFile {
            Driver::Vm(vm)
                .restore_state(spec, &ctx)
                .await
                .map_err(|e| format!("stateful start failed: {e}"))?
        } else if req.start_after {
            Driver::Vm(vm)
                .start(spec, &ctx)
                .await
                .map_err(|e| format!("start failed: {e}"))?
        } else {
            Default::default()
        };
        let st = super::target::send_resumed(ctl, st, resumed_at).await?;
        self.report_success(ctl, st, spec, vol).await
    }

    /// The empty disk a block mirror fills, and the marker that a receive
    /// is under way (a restarted ferryd removes what such a receive left).
    fn prepare_disk(&self, spec: &InstanceSpec, size: Option<u64>) -> Result<(), String> {
        std::fs::create_dir_all(&spec.paths.volume).map_err(|e| e.to_string())?;
        std::fs::write(super::target::receiving_marker(spec), b"").map_err(|e| e.to_string())?;
        VmDriver::default()
            .prepare_mirror_target(spec, size.ok_or("the source sent no disk size")?)
            .map_err(|e| e.to_string())
    }

    /// Start the target QEMU of a live VM move before the plan is agreed,
    /// where the source's request says the plan will need it (the disk
    /// needs nothing copied first) and this member speaks live VM moves.
    /// `None` where it does not apply. It runs as a task of its own, so
    /// that QEMU starts at once, not after the channels' TLS set-up; its
    /// result dropped kills the QEMU.
    pub(super) fn launch_early(
        self: &Arc<Self>,
        req: &SinkRequest,
        spec: &InstanceSpec,
    ) -> Option<tokio::task::JoinHandle<Result<PendingIncoming, String>>> {
        if !req.early_launch
            || spec.kind != ferry_drivers::InstanceType::VirtualMachine
            || !ferry_migration::has_live_vm(self.settings.migration_protocol.max)
        {
            return None;
        }
        let (d, spec) = (self.clone(), spec.clone());
        let (launch, disk_size) = (req.launch.clone(), req.disk_size);
        let disk_needed = !req.on_shared_pool();
        Some(tokio::spawn(async move {
            let launch: LaunchConfig =
                serde_json::from_value(launch.ok_or("the source sent no launch configuration")?)
                    .map_err(|e| e.to_string())?;
            if disk_needed {
                d.prepare_disk(&spec, disk_size)?;
            }
            VmDriver::default()
                .launch_incoming(&spec, &launch, &OpCtx::detached())
                .await
                .map_err(|e| e.to_string())
        }))
    }

    /// The QEMU started early, unless there is a reason not to use it
    /// (`unused`: no plan agreed, or a plan that does not migrate QEMU to
    /// QEMU). Then, or if it failed to start, it goes with the disk
    /// prepared for it; a move that goes on does so as without it.
    pub(super) async fn take_early(
        &self,
        early: Option<Result<PendingIncoming, String>>,
        spec: &InstanceSpec,
        unused: Option<&str>,
        req: &SinkRequest,
    ) -> Option<PendingIncoming> {
        let why = match (early?, unused) {
            (Ok(qemu), None) => return Some(qemu),
            (Ok(qemu), Some(why)) => {
                qemu.discard().await;
                why.to_string()
            }
            (Err(e), _) => format!("it failed to start: {e}"),
        };
        tracing::info!(instance = %spec.name, "the target QEMU started early goes ({why})");
        if req.on_shared_pool() || !super::target::receiving_marker(spec).exists() {
            return None;
        }
        // Only this receive created the volume (it did not exist: checked
        // when the request came).
        if let Err(e) = std::fs::remove_dir_all(&spec.paths.volume) {
            tracing::warn!("removing {}: {e}", spec.paths.volume.display());
        }
        None
    }
}
