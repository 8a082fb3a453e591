//! VM moves: the disk travels first as an archive over `fs`, then QEMU's
//! migration stream runs between the two QEMUs through socketpairs relayed
//! over the `state` websocket in both directions (post-copy needs the
//! return path). No state file is written on either side.

use std::os::fd::OwnedFd;
use std::time::Instant;

use ferry_drivers::vm::migrate::{LaunchConfig, MigrateParams};
use ferry_drivers::vm::VmDriver;
use ferry_drivers::{Driver, InstanceSpec, Lifecycle, OpCtx};
use ferry_migration::{
    ByteChannel, Message, MessageChannel, Plan, SourceState, StatePlan, TargetState,
};
use serde_json::json;
use tokio_util::io::SyncIoBridge;

use super::source::{send_archive, MoveRun};
use super::ws::{self, WsControl, WsPipe};
use crate::core::Daemon;

/// QEMU parameters from the agreed plan (the same on both sides).
fn params(plan: &Plan) -> MigrateParams {
    MigrateParams {
        postcopy: plan.is_postcopy(),
        max_bandwidth: plan.options.bandwidth,
        downtime_limit_ms: plan
            .options
            .max_downtime_ms
            .unwrap_or(MigrateParams::default().downtime_limit_ms),
        ..MigrateParams::default()
    }
}

/// A connected socketpair: one end for QEMU (an fd), one for our relay.
fn socketpair() -> Result<(OwnedFd, tokio::net::UnixStream), String> {
    let (qemu_end, ours) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    Ok((OwnedFd::from(qemu_end), ours))
}

impl MoveRun {
    pub(super) async fn transfer_vm(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        plan: &Plan,
        state_pipe: WsPipe,
        fs_pipe: WsPipe,
    ) -> Result<(), String> {
        let vm = VmDriver::default();
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let counters = fs.counters();
        let (_r, w) = tokio::io::split(fs);
        if self.running && !self.live {
            self.stage("stopping the VM (stateless move)");
            Driver::Vm(vm.clone())
                .stop(&self.spec, false, &OpCtx::detached())
                .await
                .map_err(|e| e.to_string())?;
        }
        self.check_cancel()?;
        self.stage("copying the VM's disk");
        let (mut bridge, _) = send_archive(
            SyncIoBridge::new(w),
            self.spec.paths.volume.clone(),
            None,
            false,
            self.op.cancel_token(),
            Some(self.op.clone()),
        )
        .await?;
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            bridge.flush()?;
            bridge.shutdown()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("closing the fs stream: {e}"))?;
        let mut st = st;
        if matches!(plan.state, StatePlan::VmQemuLive { .. }) {
            self.stage("migrating memory (QEMU pre-copy)");
            let (qemu_fd, ours) = socketpair()?;
            let state_stream = ws::into_stream(state_pipe);
            let relay = tokio::spawn(async move {
                ferry_migration::relay(ours, state_stream)
                    .await
                    .map_err(|e| e.to_string())
            });
            let op = self.op.clone();
            let ctx = OpCtx::new(|_, _| {}, self.op.cancel_token());
            let started = Instant::now();
            let stats = vm
                .migrate_outgoing(
                    &self.spec,
                    &params(plan),
                    qemu_fd,
                    move |p| op.set_meta("state_progress", json!(p.summary())),
                    &ctx,
                )
                .await
                .map_err(|e| format!("QEMU migration: {e}"))?;
            // QEMU completed: the source is paused, the target runs or is about to.
            self.vm_migrated = true;
            self.frozen = Some(
                started
                    + std::time::Duration::from_millis(
                        stats.total_time_ms.saturating_sub(stats.downtime_ms),
                    ),
            );
            self.op.set_meta("qemu_params", json!(params(plan)));
            self.op.set_meta("qemu", json!({"total_ms": stats.total_time_ms, "downtime_ms": stats.downtime_ms, "transferred": stats.transferred, "passes": stats.dirty_sync_count, "max_throttle_percent": stats.max_throttle_percent}));
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), relay).await;
        }
        ctl.send(&Message::FsDone {
            bytes: counters.sent.get(),
        })
        .await
        .map_err(|e| e.to_string())?;
        st = st.fs_sent().map_err(|e| e.to_string())?;
        if plan.is_stateful() {
            ctl.send(&Message::StateReady {})
                .await
                .map_err(|e| e.to_string())?;
            st = st.state_sent().map_err(|e| e.to_string())?;
        }
        self.await_target(ctl, st).await?;
        self.commit_location().await?;
        self.stage("cleaning up the source");
        if self.live {
            if let Err(e) = vm.migrate_finish_source(&self.spec).await {
                tracing::warn!(error = %e, "source QEMU cleanup after move");
            }
        }
        if let Err(e) = Driver::Vm(vm).delete(&self.spec).await {
            tracing::warn!(error = %e, "deleting the source volume after move");
        }
        self.d
            .events
            .send_lifecycle("instance-migrated", &self.rec.name);
        Ok(())
    }

    pub(super) async fn recover_vm(&mut self) {
        let vm = VmDriver::default();
        if self.vm_migrated {
            if let Err(e) = vm.migrate_resume_source(&self.spec).await {
                tracing::error!(instance = %self.rec.name, error = %e, "could not resume the VM on the source after a failed move");
            }
        } else if self.running && !self.live && !self.d.runtime(&self.spec).await.running {
            let _ = Driver::Vm(vm).start(&self.spec, &OpCtx::detached()).await;
        }
    }
}

impl Daemon {
    /// Target side of a VM move (after the handshake).
    pub(super) async fn receive_vm(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        plan: &Plan,
        spec: &InstanceSpec,
        state_pipe: WsPipe,
        fs_pipe: WsPipe,
        launch: Option<serde_json::Value>,
        start_after: bool,
    ) -> Result<(), String> {
        let vm = VmDriver::default();
        let ctx = OpCtx::detached();
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let (r, _w) = tokio::io::split(fs);
        super::target::recv_archive(SyncIoBridge::new(r), spec.paths.volume.clone(), false).await?;
        std::fs::write(super::target::receiving_marker(spec), b"").map_err(|e| e.to_string())?;
        let incoming = if matches!(plan.state, StatePlan::VmQemuLive { .. }) {
            let launch: LaunchConfig =
                serde_json::from_value(launch.ok_or("the source sent no launch configuration")?)
                    .map_err(|e| e.to_string())?;
            let (qemu_fd, ours) = socketpair()?;
            let incoming = vm
                .migrate_incoming(spec, &launch, &params(plan), qemu_fd, &ctx)
                .await
                .map_err(|e| e.to_string())?;
            let state_stream = ws::into_stream(state_pipe);
            tokio::spawn(async move { ferry_migration::relay(state_stream, ours).await });
            Some(incoming)
        } else {
            None
        };
        let mut st = st;
        while !matches!(st, TargetState::Restore { .. }) {
            let msg = ctl
                .recv()
                .await
                .map_err(|e| format!("control channel: {e}"))?;
            let fail = if let Message::Failure { message } = &msg {
                Some(message.clone())
            } else {
                None
            };
            st = st.on_message(msg).map_err(|e| e.to_string())?;
            if let Some(m) = fail {
                return Err(format!("the source failed: {m}"));
            }
        }
        if let Some(incoming) = incoming {
            incoming
                .wait(&ctx)
                .await
                .map_err(|e| format!("incoming migration: {e}"))?;
        } else if start_after {
            Driver::Vm(vm)
                .start(spec, &ctx)
                .await
                .map_err(|e| format!("start failed: {e}"))?;
        }
        let _ = std::fs::remove_file(super::target::receiving_marker(spec));
        st = st.resumed().map_err(|e| e.to_string())?;
        ctl.send(&Message::Resumed {})
            .await
            .map_err(|e| e.to_string())?;
        let _st = st.succeed().map_err(|e| e.to_string())?;
        ctl.send(&Message::Success {})
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
