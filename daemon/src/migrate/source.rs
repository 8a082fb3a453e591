//! The source side of a move (the member the instance lives on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_db::{Command, InstanceRecord, MemberRecord};
use ferry_drivers::container::ContainerDriver;
use ferry_drivers::storage::{write_archive, ArchiveOptions, Manifest};
use ferry_drivers::{Driver, InstanceSpec, InstanceType, Lifecycle};
use ferry_migration::{
    source_handshake, ByteChannel, Compression, FsTransfer, InstanceType as MigType, LocalEnd,
    Message, MessageChannel, MoveOptions, Offer, Plan, QemuFeature, SourceState, StatePlan,
    StateTransfer, VersionRange,
};
use serde_json::{json, Map};
use tokio_util::io::SyncIoBridge;

use super::ws::{self, WsControl};
use super::{Secrets, SinkRequest, DIAL_TIMEOUT, SINK_PATH};
use crate::core::{ActionError, Daemon};
use crate::ops::{Op, Outcome};

pub fn local_end() -> LocalEnd {
    LocalEnd::new(
        VersionRange::CURRENT,
        format!("ferry {}", crate::core::VERSION),
    )
}

pub(super) type Bridge = SyncIoBridge<tokio::io::WriteHalf<ByteChannel<tokio::io::DuplexStream>>>;

/// Writes to the fs bridge, failing as soon as the move is cancelled (so a
/// long first pass stops at once instead of running to its end).
struct Cancellable<'a> {
    inner: &'a mut Bridge,
    cancel: tokio_util::sync::CancellationToken,
}

impl std::io::Write for Cancellable<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("the move was cancelled"));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Send one archive pass of `root` on the fs bridge (blocking, off the
/// runtime); with `op`, its `fs_progress` shows the bytes sent twice a second.
pub(super) async fn send_archive(
    bridge: Bridge,
    root: std::path::PathBuf,
    base: Option<Manifest>,
    record: bool,
    cancel: tokio_util::sync::CancellationToken,
    op: Option<Arc<Op>>,
) -> Result<(Bridge, ferry_drivers::storage::ArchiveStats), String> {
    let progress = Arc::new(ferry_drivers::storage::Progress::default());
    let ticker = op.map(|op| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                op.set_meta(
                    "fs_progress",
                    json!(format!("{:.1} MB sent", progress.bytes() as f64 / 1e6)),
                );
            }
        })
    });
    let res = tokio::task::spawn_blocking(move || {
        let mut bridge = bridge;
        let opts = ArchiveOptions {
            record_manifest: record,
            base,
            progress: Some(progress),
            ..Default::default()
        };
        let mut w = Cancellable {
            inner: &mut bridge,
            cancel,
        };
        let stats = write_archive(&root, &mut w, &opts)
            .map_err(|e| format!("sending {}: {e}", root.display()))?;
        Ok((bridge, stats))
    })
    .await
    .map_err(|e| format!("archive task: {e}"));
    if let Some(t) = ticker {
        t.abort();
    }
    res?
}

impl Daemon {
    /// `POST /1.0/instances/<name>?target=M {"migration": true, "live": bool}`.
    pub async fn move_instance(
        self: &Arc<Self>,
        name: &str,
        target: &str,
        live: bool,
        options: MoveOptions,
    ) -> Result<Arc<Op>, ActionError> {
        let cluster = self.require_cluster()?;
        // A move decides on the record and the target: read them linearizably.
        cluster
            .barrier()
            .await
            .map_err(|e| ActionError::Unavailable(format!("cannot read the cluster state: {e}")))?;
        let rec = self.record(name)?;
        if rec.member != self.member {
            return Err(ActionError::Internal(format!(
                "instance \"{name}\" lives on {}, not here",
                rec.member
            )));
        }
        if target == self.member {
            return Err(ActionError::BadRequest(format!(
                "Instance \"{name}\" already runs on member \"{target}\""
            )));
        }
        let spec = self.spec_for(&rec)?;
        let target_rec = cluster.db.get_member(target)?.ok_or_else(|| {
            ActionError::BadRequest(format!(
                "Member \"{target}\" is not in the cluster: see `ferry cluster list`"
            ))
        })?;
        if !cluster.check_online(target, &target_rec.address).await {
            return Err(ActionError::BadRequest(format!(
                "Member \"{target}\" is offline: choose another --target"
            )));
        }
        let lease = self.leases_acquire(name, "it is being moved")?;
        let running = self.runtime(&spec).await.running;
        let d = self.clone();
        Ok(self.ops.spawn(
            "Migrating instance",
            json!({"instances": [format!("/1.0/instances/{name}")]}),
            true,
            move |op| async move {
                let _lease = lease;
                let started = Instant::now();
                let mut m = MoveRun {
                    d: d.clone(),
                    op: op.clone(),
                    rec,
                    spec,
                    target: target_rec,
                    live: live && running,
                    running,
                    dumped: false,
                    frozen: None,
                    vm_migrated: false,
                    options,
                };
                match m.run().await {
                    Ok(plan) => {
                        let mut meta = Map::new();
                        meta.insert("plan".into(), json!(plan));
                        meta.insert(
                            "total_ms".into(),
                            json!(started.elapsed().as_millis() as u64),
                        );
                        Outcome::Done(meta)
                    }
                    Err(e) => {
                        d.pending.forget(&op.id);
                        m.recover().await;
                        if op.cancel_token().is_cancelled() {
                            Outcome::Cancelled(format!("move cancelled: {e}"))
                        } else {
                            Outcome::Failed(format!("move failed: {e}"))
                        }
                    }
                }
            },
        ))
    }
}

pub(super) struct MoveRun {
    pub(super) d: Arc<Daemon>,
    pub(super) op: Arc<Op>,
    pub(super) rec: InstanceRecord,
    pub(super) spec: InstanceSpec,
    pub(super) target: MemberRecord,
    pub(super) live: bool,
    pub(super) running: bool,
    pub(super) dumped: bool,
    pub(super) frozen: Option<Instant>,
    /// A VM whose QEMU migration completed (its source QEMU is paused).
    pub(super) vm_migrated: bool,
    /// --bandwidth / --max-downtime / --postcopy of this move.
    pub(super) options: MoveOptions,
}

impl MoveRun {
    pub(super) fn stage(&self, s: &str) {
        self.op.set_meta("stage", json!(s));
    }

    pub(super) fn check_cancel(&self) -> Result<(), String> {
        if self.op.cancel_token().is_cancelled() {
            return Err("cancelled by the user".into());
        }
        Ok(())
    }

    fn offer(&self) -> Offer {
        let vm = self.spec.kind == InstanceType::VirtualMachine;
        let state = match (self.live, vm) {
            (false, _) => vec![StateTransfer::None],
            (true, false) => vec![StateTransfer::CriuPageServer],
            (true, true) => vec![StateTransfer::VmQemuLive {
                features: vec![QemuFeature::AutoConverge, QemuFeature::Postcopy],
            }],
        };
        Offer {
            instance_type: if vm { MigType::Vm } else { MigType::Container },
            fs: vec![FsTransfer::Archive {
                compression: vec![Compression::Zstd, Compression::None],
            }],
            state,
            state_compression: vec![Compression::None],
            volume_size: 0,
            snapshots: vec![],
            stateful: self.live,
            live: self.live,
            options: self.options.clone(),
        }
    }

    async fn run(&mut self) -> Result<Plan, String> {
        let cluster = self.d.cluster().ok_or("this member left the cluster")?;
        let driver = ContainerDriver::default();
        let secrets = Secrets::new();
        let [rc, rs, rf] = self.d.pending.expect(&self.op.id, &secrets);
        self.stage("asking the target to receive the instance");
        let req = SinkRequest {
            record: self.rec.clone(),
            source_member: self.d.member.clone(),
            source_address: self.d.listen.map(|a| a.to_string()).unwrap_or_default(),
            operation: self.op.id.clone(),
            secrets,
            start_after: self.running && !self.live,
            launch: match (self.spec.kind, self.live) {
                (InstanceType::VirtualMachine, true) => Some(
                    serde_json::to_value(
                        ferry_drivers::vm::VmDriver::default()
                            .launch_config(&self.spec)
                            .map_err(|e| e.to_string())?,
                    )
                    .map_err(|e| e.to_string())?,
                ),
                _ => None,
            },
        };
        cluster
            .peers
            .call::<_, serde_json::Value>(&self.target.address, SINK_PATH, &req)
            .await
            .map_err(|e| e.to_string())?;
        let wait = |rx: tokio::sync::oneshot::Receiver<ws::WsPipe>| async move {
            tokio::time::timeout(DIAL_TIMEOUT, rx)
                .await
                .map_err(|_| "the target did not connect its channels within 30 s".to_string())?
                .map_err(|_| "channel setup aborted".to_string())
        };
        let mut ctl = WsControl(wait(rc).await?);
        let state_pipe = wait(rs).await?;
        let fs_pipe = wait(rf).await?;
        let st = source_handshake(&mut ctl, &local_end(), self.offer())
            .await
            .map_err(|e| e.to_string())?;
        let plan = st.plan().cloned().ok_or("no plan after the handshake")?;
        tracing::info!(instance = %self.rec.name, target = %self.target.name, plan = ?plan, "move plan agreed");
        self.op.set_meta("plan", json!(plan));
        let result = if self.spec.kind == InstanceType::VirtualMachine {
            self.transfer_vm(&mut ctl, st, &plan, state_pipe, fs_pipe)
                .await
        } else {
            self.transfer(&mut ctl, st, &plan, state_pipe, fs_pipe, &driver)
                .await
        };
        if let Err(e) = &result {
            let _ = ctl.send(&Message::Failure { message: e.clone() }).await;
        }
        result?;
        Ok(plan)
    }

    async fn transfer(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        plan: &Plan,
        state_pipe: ws::WsPipe,
        fs_pipe: ws::WsPipe,
        driver: &ContainerDriver,
    ) -> Result<(), String> {
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let counters = fs.counters();
        let (_r, w) = tokio::io::split(fs);
        let bridge = SyncIoBridge::new(w);
        let rootfs = self.spec.paths.volume.join("rootfs");
        if self.running && !self.live {
            self.stage("stopping the instance (stateless move)");
            Driver::Container(driver.clone())
                .stop(&self.spec, false, &ferry_drivers::OpCtx::detached())
                .await
                .map_err(|e| e.to_string())?;
        }
        self.check_cancel()?;
        self.stage("copying the root filesystem (instance running)");
        let (bridge, pass1) = send_archive(
            bridge,
            rootfs.clone(),
            None,
            true,
            self.op.cancel_token(),
            Some(self.op.clone()),
        )
        .await?;
        self.op.set_meta(
            "fs_progress",
            json!(format!("{:.1} MB sent", pass1.bytes as f64 / 1e6)),
        );
        self.check_cancel()?;
        let images = self.spec.paths.volume.join("migration.tmp");
        let _ = std::fs::remove_dir_all(&images);
        std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
        let mut bridge = bridge;
        let mut st = st;
        if matches!(plan.state, StatePlan::CriuPageServer { .. }) {
            self.op.set_cancellable(false);
            self.stage("checkpointing (CRIU dump, memory streamed to the target)");
            // CRIU writes pages into one end of a socketpair; ferry relays the
            // other end over the state channel (no TCP port, no Nagle stalls).
            let (criu_end, ours) =
                std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
            ours.set_nonblocking(true).map_err(|e| e.to_string())?;
            let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
            let state_stream = ws::into_stream(state_pipe);
            let relay = tokio::spawn(async move {
                ferry_migration::relay(ours, state_stream)
                    .await
                    .map_err(|e| e.to_string())
            });
            let frozen = Instant::now();
            self.frozen = Some(frozen);
            let ctx = ferry_drivers::OpCtx::detached();
            let pages =
                ferry_drivers::container::PagesTo::Socket(std::os::fd::OwnedFd::from(criu_end));
            let dump = driver
                .migrate_dump_with(&self.spec, &images, pages, &ctx)
                .await
                .map_err(|e| format!("checkpoint failed: {e}"))?;
            self.op
                .set_meta("criu_dump_ms", json!(dump.dump_time.as_millis() as u64));
            self.dumped = true;
            match tokio::time::timeout(Duration::from_secs(60), relay).await {
                Ok(Ok(Ok(stats))) => self.op.set_meta(
                    "state_progress",
                    json!(format!("{} MB of memory", stats.a_to_b / 1_000_000)),
                ),
                Ok(Ok(Err(e))) => return Err(format!("memory stream: {e}")),
                _ => return Err("memory stream did not finish".into()),
            }
            self.stage("final sync of the root filesystem and checkpoint images");
            let manifest = pass1.manifest.clone();
            let (b, _pass2) =
                send_archive(bridge, rootfs, manifest, false, Default::default(), None).await?;
            let (b, _img) =
                send_archive(b, images.clone(), None, false, Default::default(), None).await?;
            bridge = b;
            self.op.set_meta(
                "frozen_ms_at_handover",
                json!(frozen.elapsed().as_millis() as u64),
            );
        }
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            bridge.flush()?;
            bridge.shutdown()
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("closing the fs stream: {e}"))?;
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
        self.dumped = false;
        self.stage("cleaning up the source");
        let ctx = ferry_drivers::OpCtx::detached();
        if self.live {
            if let Err(e) = driver.migrate_finish_source(&self.spec, &ctx).await {
                tracing::warn!(error = %e, "source cleanup after move");
            }
        }
        let _ = std::fs::remove_dir_all(&images);
        if let Err(e) = Driver::Container(driver.clone()).delete(&self.spec).await {
            tracing::warn!(error = %e, "deleting the source volume after move");
        }
        self.d
            .events
            .send_lifecycle("instance-migrated", &self.rec.name);
        Ok(())
    }

    /// Wait for the target's Resumed/Success (recording ferry's downtime).
    pub(super) async fn await_target(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
    ) -> Result<(), String> {
        self.stage("waiting for the target to resume the instance");
        let mut st = st;
        loop {
            let msg = ctl
                .recv()
                .await
                .map_err(|e| format!("control channel: {e}"))?;
            if let (Message::Resumed {}, Some(t)) = (&msg, self.frozen) {
                // Downtime as ferry sees it: freeze on the source → running on the target.
                self.op
                    .set_meta("downtime_ms", json!(t.elapsed().as_millis() as u64));
            }
            let fail = if let Message::Failure { message } = &msg {
                Some(message.clone())
            } else {
                None
            };
            st = st.on_message(msg).map_err(|e| e.to_string())?;
            if let Some(m) = fail {
                return Err(format!("the target failed: {m}"));
            }
            if st.is_terminal() {
                return Ok(());
            }
        }
    }

    /// The target runs it: one replicated write moves the record.
    pub(super) async fn commit_location(&mut self) -> Result<(), String> {
        self.d
            .submit(Command::MoveInstance {
                name: self.rec.name.clone(),
                from_member: self.d.member.clone(),
                to_member: self.target.name.clone(),
            })
            .await
            .map_err(|e| format!("recording the new location: {e}"))?;
        self.dumped = false;
        self.vm_migrated = false;
        Ok(())
    }

    /// After a failure: the instance runs on the source exactly as before.
    async fn recover(&mut self) {
        let driver = ContainerDriver::default();
        let ctx = ferry_drivers::OpCtx::detached();
        if self.spec.kind == InstanceType::VirtualMachine {
            self.recover_vm().await;
            return;
        }
        if self.dumped {
            if let Err(e) = driver.migrate_resume_source(&self.spec, &ctx).await {
                tracing::error!(instance = %self.rec.name, error = %e, "could not resume the instance on the source after a failed move");
            }
        } else if self.running && !self.live && !self.d.runtime(&self.spec).await.running {
            let _ = Driver::Container(driver.clone())
                .start(&self.spec, &ctx)
                .await;
        }
        let _ = std::fs::remove_dir_all(self.spec.paths.volume.join("migration.tmp"));
    }
}
