//! The source side of a move (the member the instance lives on).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_db::{Command, InstanceRecord, MemberRecord};
use ferry_drivers::container::ContainerDriver;
use ferry_drivers::storage::{write_archive, ArchiveOptions, Manifest};
use ferry_drivers::{Driver, InstanceSpec, InstanceType, Lifecycle, StateSave};
use ferry_migration::{
    source_handshake, ByteChannel, Compression, FsTransfer, InstanceType as MigType, LocalEnd,
    Message, MessageChannel, MoveOptions, Offer, Plan, QemuFeature, SourceState, StatePlan,
    StateTransfer,
};
use serde_json::{json, Map};
use tokio_util::io::SyncIoBridge;

use super::progress::Phase;
use super::ws::{self, WsControl};
use super::{Secrets, SinkRequest, DIAL_TIMEOUT, SINK_PATH};
use crate::core::{ActionError, Daemon};
use crate::ops::{Op, Outcome};

/// Pause between attempts to record a handed-over instance's new location.
const RECORD_RETRY: Duration = Duration::from_secs(1);

impl Daemon {
    /// This member on the migration wire (versions from --migration-protocol).
    pub fn local_end(&self) -> LocalEnd {
        LocalEnd::new(
            self.settings.migration_protocol,
            format!("ferry {}", crate::core::VERSION),
        )
    }
}

pub(super) type Bridge = SyncIoBridge<tokio::io::WriteHalf<ByteChannel<tokio::io::DuplexStream>>>;

/// Writes to the fs bridge, failing as soon as the move is cancelled (so a
/// long first pass stops at once instead of running to its end), at most
/// `limit` bytes per second (the move's `--bandwidth`).
struct Cancellable<'a> {
    inner: &'a mut Bridge,
    cancel: tokio_util::sync::CancellationToken,
    limit: Option<u64>,
    started: Instant,
    written: u64,
}

impl std::io::Write for Cancellable<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("the move was cancelled"));
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if let Some(l) = self.limit.filter(|l| *l > 0) {
            let due = Duration::from_secs_f64(self.written as f64 / l as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                // A blocking thread (spawn_blocking): sleeping here is fine.
                std::thread::sleep(wait.min(Duration::from_secs(1)));
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How one archive pass is sent (see [`send_archive`]).
#[derive(Default)]
pub(super) struct Pass {
    /// The previous pass's manifest: send only what changed since.
    pub base: Option<Manifest>,
    /// Record this pass's manifest (for a later incremental pass).
    pub record: bool,
    /// Stop at once when it fires.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Report the bytes sent (of a total, when known) in this operation.
    pub progress: Option<(Arc<Op>, Option<u64>)>,
    /// Bytes per second at most (the move's `--bandwidth`).
    pub limit: Option<u64>,
}

/// Send one archive pass of `root` on the fs bridge (blocking, off the
/// runtime), as `pass` says.
pub(super) async fn send_archive(
    bridge: Bridge,
    root: std::path::PathBuf,
    pass: Pass,
) -> Result<(Bridge, ferry_drivers::storage::ArchiveStats), String> {
    let Pass {
        base,
        record,
        cancel,
        progress: op,
        limit,
    } = pass;
    let progress = Arc::new(ferry_drivers::storage::Progress::default());
    let ticker = op.map(|(op, total)| {
        let p = progress.clone();
        super::progress::ticker(op, Phase::Filesystem, total, move || p.bytes())
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
            limit,
            started: Instant::now(),
            written: 0,
        };
        let stats = write_archive(&root, &mut w, &opts)
            .map_err(|e| format!("sending {}: {e}", root.display()))?;
        Ok((bridge, stats))
    })
    .await
    .map_err(|e| format!("archive task: {e}"));
    // A pass that ended shows its final figures; a failed one only stops.
    if let (Some(t), Ok(Ok(_))) = (ticker, &res) {
        t.finish();
    }
    res?
}

/// Flush and half-close the fs bridge (the target sees the end of the stream).
pub(super) async fn close_bridge(bridge: Bridge) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut bridge = bridge;
        bridge.flush()?;
        bridge.shutdown()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("closing the fs stream: {e}"))
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
        if target_rec.state == ferry_db::MEMBER_EVACUATED {
            return Err(ActionError::BadRequest(format!(
                "Member \"{target}\" is evacuated: choose another --target, or bring it back \
                 with `ferry cluster restore {target}`"
            )));
        }
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
                    saved_state: false,
                    lazy: None,
                    stop_event_us: None,
                    nbd_relay: None,
                    frozen: None,
                    vm_migrated: false,
                    vm_lost: false,
                    handed_over: false,
                    options,
                    started,
                    timeline: Default::default(),
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
    /// A container dumped with --leave-stopped (resumable on the source).
    pub(super) dumped: bool,
    /// Stopped statefully for the fallback path (restart from its state).
    pub(super) saved_state: bool,
    pub(super) frozen: Option<Instant>,
    /// A VM whose QEMU migration completed (its source QEMU is paused).
    pub(super) vm_migrated: bool,
    /// A VM whose post-copy broke: its memory is split between both QEMUs.
    pub(super) vm_lost: bool,
    /// The target reported success: it runs the instance; the source never
    /// resumes its own copy from here on.
    pub(super) handed_over: bool,
    /// QEMU's STOP event on the source (µs since the epoch).
    pub(super) stop_event_us: Option<u64>,
    /// The serving dump of a post-copy container move.
    pub(super) lazy: Option<ferry_drivers::container::LazyDump>,
    /// The relay of a VM's block mirror (NBD over fs): ended on failure so
    /// that QEMU's NBD client sees EOF instead of waiting on a dead link.
    pub(super) nbd_relay: Option<tokio::task::AbortHandle>,
    /// --bandwidth / --max-downtime / --postcopy of this move.
    pub(super) options: MoveOptions,
    pub(super) started: Instant,
    /// Each stage with the ms since the move started (operation metadata
    /// `timeline`: where the time went).
    pub(super) timeline: std::sync::Mutex<Vec<serde_json::Value>>,
}

impl MoveRun {
    pub(super) fn phase(&self, phase: Phase, text: &str) {
        super::progress::set_phase(&self.op, phase, text);
        self.mark(text);
    }

    /// Note a step in the operation's `timeline`.
    pub(super) fn mark(&self, text: &str) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        tracing::debug!(instance = %self.spec.name, at_ms, "move source: {text}");
        let mut t = self.timeline.lock().unwrap_or_else(|e| e.into_inner());
        t.push(json!({"at_ms": at_ms, "stage": text}));
        self.op.set_meta("timeline", json!(*t));
    }

    pub(super) fn check_cancel(&self) -> Result<(), String> {
        if self.op.cancel_token().is_cancelled() {
            return Err("cancelled by the user".into());
        }
        Ok(())
    }

    /// Member-local directory for checkpoint images of this move.
    pub(super) fn images_dir(spec: &InstanceSpec) -> std::path::PathBuf {
        spec.paths.run.join("migration")
    }

    /// Offer QEMU's multifd (RAM sent and loaded by several threads on
    /// each side, over more state channels) on an unlimited link without
    /// post-copy, where the VM's QEMU can; the member's
    /// `--migration-multifd` can turn it off, or offer it on a capped link
    /// too, instead of XBZRLE (tests use that for a slow move).
    async fn offers_multifd(&self, capped: bool) -> bool {
        use crate::settings::Multifd;
        let setting = self.d.settings.migration_multifd;
        (!capped || setting == Multifd::Always)
            && setting != Multifd::Off
            && !self.options.postcopy
            && self.spec.kind == InstanceType::VirtualMachine
            && ferry_drivers::vm::VmDriver::default()
                .multifd_support_of(&self.spec)
                .await
    }

    async fn offer(&self) -> Offer {
        let vm = self.spec.kind == InstanceType::VirtualMachine;
        let state = match (self.live, vm) {
            (false, _) => vec![StateTransfer::None],
            (true, false) => {
                let mut v = vec![StateTransfer::CriuPageServer];
                if !self.options.postcopy {
                    // Our CRIU (4.2, checked before any dump) writes this
                    // page-server header layout.
                    v.push(StateTransfer::FerryPageSink {
                        criu_iov: ferry_drivers::container::CRIU_IOV_LAYOUT,
                    });
                    // Only where CRIU can track dirty memory (not on this
                    // project's test machine: see doc/moves.md).
                    v.extend(super::predump::pre_dump_capability().await);
                } else {
                    match ContainerDriver::lazy_pages_support().await {
                        Ok(()) => v.push(StateTransfer::CriuLazyPages),
                        Err(e) => {
                            tracing::warn!(error = %e, "post-copy asked for but CRIU lazy pages do not work on this member")
                        }
                    }
                }
                v.push(StateTransfer::StatefulStopFile);
                v
            }
            (true, true) => {
                let mut features = vec![QemuFeature::AutoConverge, QemuFeature::Postcopy];
                // FERRY_TARGET_LISTENS=0 starts QEMU's migration at once, as
                // ferry before it (for comparisons: shared-move-bench).
                if std::env::var("FERRY_TARGET_LISTENS").as_deref() != Ok("0") {
                    features.push(QemuFeature::TargetListens);
                }
                // XBZRLE (delta-compressed re-sent pages) pays off when the
                // link is the bottleneck; on an unlimited link it costs CPU.
                let capped = self
                    .options
                    .bandwidth
                    .or(self.d.settings.migration_bandwidth)
                    .is_some();
                if self.offers_multifd(capped).await {
                    features.push(QemuFeature::Multifd);
                } else if capped {
                    features.push(QemuFeature::Xbzrle);
                }
                vec![
                    StateTransfer::VmQemuLive { features },
                    StateTransfer::StatefulStopFile,
                ]
            }
        };
        let fs = if self.rec.storage_pool == crate::settings::SHARED_POOL {
            // Only members that see the same pool can take it.
            match self.d.settings.shared_pool_id() {
                Some(pool_id) => vec![FsTransfer::Shared { pool_id }],
                None => vec![],
            }
        } else {
            let mut fs = vec![];
            if vm && self.live {
                // The disk is copied while the VM runs (NBD over fs,
                // uncompressed: it is request/response traffic).
                fs.push(FsTransfer::BlockMirror {
                    compression: vec![Compression::None],
                });
            }
            fs.push(FsTransfer::Archive {
                compression: vec![Compression::Zstd, Compression::None],
            });
            fs
        };
        let volume_size = if self.rec.storage_pool == crate::settings::SHARED_POOL {
            0
        } else {
            super::progress::tree_size(&self.spec.paths.volume)
        };
        let mut options = self.options.clone();
        if options.bandwidth.is_none() {
            options.bandwidth = self.d.settings.migration_bandwidth;
        }
        Offer {
            instance_type: if vm { MigType::Vm } else { MigType::Container },
            fs,
            state,
            // Adaptive per-frame zstd by default: it gives up on frames that
            // do not compress. A peer without it: one zstd stream pays off on
            // a capped link; on an unlimited one it costs more CPU than it saves.
            // A VM's pre-copy also gets acknowledgements (`zstd_frames_acked`):
            // what the link still holds at switch-over is downtime. A frozen
            // container's pages need no window.
            state_compression: match options.state_compression {
                Some(Compression::None) => vec![Compression::None],
                Some(Compression::ZstdFramesAcked) => vec![
                    Compression::ZstdFramesAcked,
                    Compression::ZstdFrames,
                    Compression::None,
                ],
                Some(c) => vec![c, Compression::None],
                None => {
                    let mut v = vec![Compression::ZstdFrames];
                    if vm {
                        v.insert(0, Compression::ZstdFramesAcked);
                    }
                    if options.bandwidth.is_some() {
                        v.extend([Compression::Zstd, Compression::None]);
                    } else {
                        v.extend([Compression::None, Compression::Zstd]);
                    }
                    v
                }
            },
            volume_size,
            snapshots: vec![],
            stateful: self.live,
            live: self.live,
            options,
        }
    }

    async fn run(&mut self) -> Result<Plan, String> {
        let cluster = self.d.cluster().ok_or("this member left the cluster")?;
        let offer = self.offer().await;
        let multifd_offered = matches!(offer.state.first(), Some(StateTransfer::VmQemuLive { features }) if features.contains(&QemuFeature::Multifd));
        let secrets = Secrets::new(if multifd_offered {
            ferry_migration::MULTIFD_CHANNELS
        } else {
            0
        });
        if self.live && self.spec.kind == InstanceType::VirtualMachine {
            // A stuck earlier migration would fail this one after the
            // target started its QEMU and the disk was mirrored.
            ferry_drivers::vm::VmDriver::default()
                .ready_to_migrate(&self.spec)
                .await
                .map_err(|e| e.to_string())?;
        }
        let ([rc, rs, rf], extra) = self.d.pending.expect(&self.op.id, &secrets);
        self.phase(
            Phase::Preparing,
            "asking the target to receive the instance",
        );
        if offer.fs.is_empty() {
            return Err(format!(
                "instance \"{}\" is on the shared pool, which is not configured on this member \
                 (start ferryd with --shared-pool PATH)",
                self.rec.name
            ));
        }
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
            disk_size: match self.spec.kind {
                InstanceType::VirtualMachine => ferry_drivers::vm::VmDriver::default()
                    .disk_size(&self.spec)
                    .ok(),
                InstanceType::Container => None,
            },
            early_launch: offer.leads_with_live_vm(self.d.settings.migration_protocol.max),
        };
        cluster
            .peers
            .call::<_, serde_json::Value>(&self.target.address, SINK_PATH, &req)
            .await
            .map_err(|e| e.to_string())?;
        self.mark("the target accepted: waiting for its channels");
        let wait = |rx: tokio::sync::oneshot::Receiver<ws::WsPipe>| async move {
            tokio::time::timeout(DIAL_TIMEOUT, rx)
                .await
                .map_err(|_| "the target did not connect its channels within 30 s".to_string())?
                .map_err(|_| "channel setup aborted".to_string())
        };
        let mut ctl = WsControl(wait(rc).await?);
        let state_pipe = wait(rs).await?;
        let fs_pipe = wait(rf).await?;
        let st = source_handshake(&mut ctl, &self.d.local_end(), offer.clone())
            .await
            .map_err(|e| e.to_string())?;
        let mut plan = st.plan().cloned().ok_or("no plan after the handshake")?;
        plan.reasons.extend(offer.version_notes(plan.version));
        tracing::info!(instance = %self.rec.name, target = %self.target.name, plan = %plan, "move plan agreed");
        self.mark("plan agreed");
        self.op.set_meta("plan", json!(plan));
        self.op.set_meta("path", json!(path_of(&plan)));
        if !plan.reasons.is_empty() {
            self.op.set_meta("why", json!(plan.reasons.join("; ")));
        }
        let result = if self.spec.kind == InstanceType::VirtualMachine {
            let mut state_pipes = vec![state_pipe];
            if plan.has_qemu_feature(QemuFeature::Multifd) {
                for rx in extra {
                    state_pipes.push(wait(rx).await?);
                }
            }
            // Unused extra channels (a plan without multifd) are dropped.
            self.d.pending.forget(&self.op.id);
            self.transfer_vm(&mut ctl, st, &plan, state_pipes, fs_pipe)
                .await
        } else {
            self.d.pending.forget(&self.op.id);
            self.transfer_container(&mut ctl, st, &plan, state_pipe, fs_pipe)
                .await
        };
        if let Err(e) = result {
            // The target may have failed first (its reason is the real one:
            // a full disk, a failed restore): prefer what it reported.
            let theirs = match tokio::time::timeout(Duration::from_millis(500), ctl.recv()).await {
                Ok(Ok(Message::Failure { message })) if !e.starts_with("the target failed") => {
                    Some(message)
                }
                _ => None,
            };
            let _ = ctl.send(&Message::Failure { message: e.clone() }).await;
            return Err(match theirs {
                Some(m) => format!("the target failed: {m} (and here: {e})"),
                None => e,
            });
        }
        Ok(plan)
    }

    /// The previous protocol's path: save the running state (CRIU images /
    /// QEMU state file under the volume's `state/`) and stop; from here a
    /// failure restarts the instance from that state.
    pub(super) async fn stateful_stop(&mut self, what: &str) -> Result<(), String> {
        self.op.set_cancellable(false);
        self.phase(Phase::Memory, what);
        self.frozen = Some(Instant::now());
        Driver::for_type(self.spec.kind)
            .save_state(&self.spec, &ferry_drivers::OpCtx::detached())
            .await
            .map_err(|e| format!("stateful stop failed: {e}"))?;
        self.saved_state = true;
        Ok(())
    }

    /// Tell the target everything was sent, wait for it to run the
    /// instance, then record the new location (the point of no return).
    pub(super) async fn finish_handover(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        plan: &Plan,
        fs_bytes: u64,
    ) -> Result<(), String> {
        self.hand_over(ctl, st, plan, fs_bytes).await?;
        self.commit_location().await
    }

    /// Tell the target everything was sent and wait for it to run the
    /// instance (its `Success`); [`commit_location`](Self::commit_location)
    /// follows.
    pub(super) async fn hand_over(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        plan: &Plan,
        fs_bytes: u64,
    ) -> Result<(), String> {
        tracing::debug!(instance = %self.rec.name, "move source: all sent");
        ctl.send(&Message::FsDone { bytes: fs_bytes })
            .await
            .map_err(|e| e.to_string())?;
        let mut st = st.fs_sent().map_err(|e| e.to_string())?;
        if plan.is_stateful() {
            ctl.send(&Message::StateReady {})
                .await
                .map_err(|e| e.to_string())?;
            st = st.state_sent().map_err(|e| e.to_string())?;
        }
        self.await_target(ctl, st).await
    }

    /// Wait for the target's Resumed/Success (recording ferry's downtime).
    pub(super) async fn await_target(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
    ) -> Result<(), String> {
        self.phase(
            Phase::Restoring,
            "waiting for the target to resume the instance",
        );
        let mut st = st;
        loop {
            let (next, msg) = st.recv(ctl).await.map_err(super::peer_error("target"))?;
            st = next;
            if let (Message::Resumed { at_us }, Some(t)) = (&msg, self.frozen) {
                // Downtime as ferry sees it: freeze on the source → running
                // on the target; for VMs QEMU's STOP (source) → RESUME
                // (target) event timestamps (wall clocks: one host or NTP).
                let events = match (self.stop_event_us, at_us) {
                    (Some(stop), Some(resume)) if *resume >= stop => Some((resume - stop) / 1000),
                    _ => None,
                };
                let ms = events.unwrap_or(t.elapsed().as_millis() as u64);
                self.op.set_meta("downtime_ms", json!(ms));
                self.mark("the target resumed the instance");
            }
            if let (Message::Resumed { .. }, Some(dump)) = (&msg, self.lazy.as_mut()) {
                // Post-copy: it runs on the target; the source may never resume.
                dump.commit();
                self.phase(
                    Phase::Memory,
                    "post-copy: serving memory pages to the target",
                );
            }
            if st.is_terminal() {
                return Ok(());
            }
        }
    }

    /// The target runs it: one replicated write moves the record.
    ///
    /// The target's `Success` is the point of no return: it runs the
    /// instance and keeps it. From here on the source never resumes its own
    /// copy (that would run it twice: on a shared pool, two instances on one
    /// volume). So the write is retried while the cluster database cannot
    /// take it (no quorum, no leader), however long that lasts, and the
    /// operation says what it waits for. A write that was applied although
    /// its answer was lost (a write forwarded to the leader is retried, and
    /// the retry is then refused: the record is no longer on this member)
    /// counts as done once the record is seen on the target.
    pub(super) async fn commit_location(&mut self) -> Result<(), String> {
        self.handed_over = true;
        self.op.set_cancellable(false);
        self.phase(Phase::Completing, "recording the new location");
        let waiting = Instant::now();
        let mut retries = 0u32;
        loop {
            let err = match self
                .d
                .submit(Command::MoveInstance {
                    name: self.rec.name.clone(),
                    from_member: self.d.member.clone(),
                    to_member: self.target.name.clone(),
                })
                .await
            {
                Ok(_) => break,
                Err(e) => e,
            };
            if self.recorded_on_target().await {
                tracing::warn!(instance = %self.rec.name, error = %err, "the new location was recorded although the write reported an error (its answer was lost, then its retry was refused)");
                break;
            }
            if err.is_rejection() {
                // Refused for good (the record changed under the lease):
                // the instance runs on the target all the same.
                return Err(format!(
                    "the instance runs on member \"{}\" now, but recording its new location was refused: {err}; \
                     its copy here is left stopped",
                    self.target.name
                ));
            }
            retries += 1;
            let text = format!(
                "recording the new location: waiting for the cluster database ({} s, attempt {}): {err}",
                waiting.elapsed().as_secs(),
                retries + 1
            );
            tracing::warn!(instance = %self.rec.name, "{text}");
            self.op.set_meta("stage", json!(text));
            tokio::time::sleep(RECORD_RETRY).await;
        }
        if retries > 0 {
            tracing::info!(instance = %self.rec.name, waited_s = waiting.elapsed().as_secs(), "the new location is recorded after the cluster database was unavailable");
        }
        self.mark("new location recorded");
        self.dumped = false;
        self.saved_state = false;
        self.vm_migrated = false;
        Ok(())
    }

    /// Does the (linearizably read) record place the instance on the target?
    async fn recorded_on_target(&self) -> bool {
        if let Some(c) = self.d.cluster() {
            if c.barrier().await.is_err() {
                return false;
            }
        }
        matches!(self.d.db().get_instance(&self.rec.name), Ok(Some(r)) if r.member == self.target.name)
    }

    /// After the move: remove what the source still holds (on a shared pool
    /// the volume now belongs to the target: only member-local files go),
    /// then announce the move.
    pub(super) async fn clean_up_source(&self) {
        super::predump::remove_images(&Self::images_dir(&self.spec));
        if self.rec.storage_pool == crate::settings::SHARED_POOL {
            super::remove_member_files(&self.spec);
        } else if let Err(e) = Driver::for_type(self.spec.kind).delete(&self.spec).await {
            tracing::warn!(error = %e, "deleting the source volume after move");
        }
        self.d
            .events
            .send_lifecycle("instance-migrated", &self.rec.name);
        self.mark("source cleaned up");
    }

    /// After a failure: the instance runs on the source exactly as before.
    async fn recover(&mut self) {
        if self.handed_over {
            // The target runs it (see `commit_location`): resuming here
            // would run it twice. What is left here stays as it is.
            tracing::error!(instance = %self.rec.name, target = %self.target.name, "the move failed after the target took the instance over: its copy here is not resumed");
            return;
        }
        let ctx = ferry_drivers::OpCtx::detached();
        let driver = Driver::for_type(self.spec.kind);
        if let Some(dump) = self.lazy.take() {
            let c = ContainerDriver::default();
            if dump.is_committed() {
                // Restored on the target, then the page stream broke: the
                // memory is split between both members; nothing can run it.
                tracing::error!(instance = %self.rec.name, "post-copy move broke after the target restored: the container is lost");
                let _ = c.migrate_lazy_finish_source(&self.spec, dump, &ctx).await;
                let _ = self
                    .d
                    .submit(Command::SetInstanceStatus {
                        name: self.rec.name.clone(),
                        status: "Stopped".into(),
                        last_used_at: None,
                    })
                    .await;
            } else if let Err(e) = c.migrate_lazy_abort_source(&self.spec, dump, &ctx).await {
                tracing::error!(instance = %self.rec.name, error = %e, "could not resume the instance on the source after a failed post-copy move");
            }
        } else if self.vm_lost {
            // Nothing can run it: leave both QEMUs as they are (paused, for
            // a manual post-copy recovery) and record the state.
            tracing::error!(instance = %self.rec.name, "post-copy move broke: the VM is lost (memory split between source and target)");
            let _ = self
                .d
                .submit(Command::SetInstanceStatus {
                    name: self.rec.name.clone(),
                    status: "Error".into(),
                    last_used_at: None,
                })
                .await;
        } else if self.saved_state {
            if let Err(e) = driver.restore_state(&self.spec, &ctx).await {
                tracing::error!(instance = %self.rec.name, error = %e, "could not restart the instance from its saved state after a failed move");
            }
        } else if self.spec.kind == InstanceType::VirtualMachine {
            self.recover_vm().await;
        } else if self.dumped {
            if let Err(e) = ContainerDriver::default()
                .migrate_resume_source(&self.spec, &ctx)
                .await
            {
                tracing::error!(instance = %self.rec.name, error = %e, "could not resume the instance on the source after a failed move");
            }
        } else if self.running && !self.live && !self.d.runtime(&self.spec).await.running {
            let _ = driver.start(&self.spec, &ctx).await;
        }
        super::predump::remove_images(&Self::images_dir(&self.spec));
    }
}

/// Which path a plan takes, for the operation's metadata.
pub fn path_of(plan: &Plan) -> &'static str {
    match &plan.state {
        StatePlan::None => "stateless: stop, transfer, start",
        StatePlan::StatefulStopFile => "stateful stop: state file transferred, stateful start",
        StatePlan::CriuPageServer {
            lazy_pages: true, ..
        } => "live (post-copy: CRIU lazy pages)",
        StatePlan::CriuPageServer {
            page_sink: Some(_), ..
        } => "live (CRIU dump into ferry's page sink)",
        StatePlan::CriuPageServer { .. } => "live (CRIU page server)",
        StatePlan::VmQemuLive { .. } => "live (QEMU to QEMU)",
    }
}
