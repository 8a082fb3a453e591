//! Container moves, both sides. What travels on the fs channel, in order:
//!
//! | plan                     | dir pool                                   | shared pool        |
//! |--------------------------|--------------------------------------------|--------------------|
//! | live (CRIU page server)  | rootfs pass 1, pass 2 (changes), CRIU images | CRIU images      |
//! | live with pre-dumps      | pass 1, pre-dump dirs + an empty one, pass 2, CRIU images | pre-dump dirs + an empty one, CRIU images |
//! | stateful stop (v1 peers) | rootfs pass 1, pass 2 (changes), state dir | nothing            |
//! | stateless                | rootfs (after the stop)                    | nothing            |
//!
//! Pages of a live move stream on the state channel (CRIU page server fed
//! by a socketpair relayed over the websocket). Checkpoint images live in
//! the member-local run directory, never on the (possibly shared) volume.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::container::{
    AnswerForSink, ContainerDriver, LazyFrom, LazyServe, PageServer, PageSink, PagesTo,
};
use ferry_drivers::{Driver, InstanceSpec, Lifecycle, OpCtx, StateSave, VolatileChanges};
use ferry_migration::{
    ByteChannel, Message, MessageChannel, Plan, Progress, SourceState, Stage, StatePlan,
    TargetState,
};
use serde_json::json;
use tokio_util::io::SyncIoBridge;

use super::predump::{pre_dump_of, recv_pre_dumps, remove_images, PRE_DUMPS_RECEIVED};
use super::progress::Phase;
use super::source::{close_bridge, send_archive, MoveRun, Pass};
use super::target::{recv_archive, ReadBridge};
use super::ws::{self, WsControl, WsPipe};
use super::{is_shared, socketpair};
use crate::core::Daemon;

impl MoveRun {
    pub(super) async fn transfer_container(
        &mut self,
        ctl: &mut WsControl,
        mut st: SourceState,
        plan: &Plan,
        state_pipe: WsPipe,
        fs_pipe: WsPipe,
    ) -> Result<(), String> {
        let driver = ContainerDriver::default();
        let ctx = OpCtx::detached();
        let shared = is_shared(plan);
        let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
            .map_err(|e| e.to_string())?;
        let counters = fs.counters();
        let (_r, w) = tokio::io::split(fs);
        let mut bridge = SyncIoBridge::new(w);
        let rootfs = self.spec.paths.volume.join("rootfs");
        let images = Self::images_dir(&self.spec);
        if self.running && !plan.is_stateful() {
            self.phase(Phase::Preparing, "stopping the instance (stateless move)");
            Driver::Container(driver.clone())
                .stop(&self.spec, false, &ctx)
                .await
                .map_err(|e| e.to_string())?;
        }
        self.check_cancel()?;
        let mut manifest = None;
        if !shared {
            self.phase(
                Phase::Filesystem,
                if plan.is_stateful() {
                    "copying the root filesystem (instance running)"
                } else {
                    "copying the root filesystem"
                },
            );
            let pass = Pass {
                record: plan.is_stateful(),
                cancel: self.op.cancel_token(),
                progress: Some((self.op.clone(), Some(plan.volume_size))),
                limit: plan.options.bandwidth,
                ..Default::default()
            };
            let (b, pass1) = send_archive(bridge, rootfs.clone(), pass).await?;
            bridge = b;
            manifest = pass1.manifest;
            if plan.is_stateful() && plan.version >= 2 {
                // Freeze only once the target applied the first pass:
                // otherwise its backlog would count as downtime.
                self.phase(
                    Phase::Filesystem,
                    "waiting for the target to apply the first pass",
                );
                st = wait_ack(
                    ctl,
                    st,
                    self.op.cancel_token(),
                    FIRST_PASS_APPLIED,
                    "apply the first filesystem pass",
                )
                .await?;
            }
        }
        self.check_cancel()?;
        let mut parent = None;
        if let Some(goal) = pre_dump_of(plan) {
            (st, bridge, parent) = self
                .pre_copy_memory(ctl, st, bridge, &images, goal, plan.options.bandwidth)
                .await?;
        }
        let mut pages = None;
        match &plan.state {
            StatePlan::CriuPageServer { lazy_pages, .. } => {
                let lazy = *lazy_pages;
                let _ = std::fs::remove_dir_all(&images);
                std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
                self.op.set_cancellable(false);
                self.phase(
                    Phase::Memory,
                    if lazy {
                        "checkpointing (CRIU lazy dump: memory follows on demand)"
                    } else {
                        "checkpointing (CRIU dump, memory streamed to the target)"
                    },
                );
                // CRIU writes pages into (or, lazily, serves them on) one end
                // of a socketpair; ferry relays the other end over the state
                // channel (no TCP port, no Nagle stalls).
                let (criu_end, ours) = socketpair()?;
                let (compression, limit) = (plan.state_compression, plan.options.bandwidth);
                let sink = plan.uses_page_sink();
                // Into ferry's page sink: CRIU gets its answers here and a deep
                // socket buffer, so it writes the pages at memory speed and
                // goes on with the dump while ferry sends them.
                if sink {
                    deepen_send_buffer(&criu_end);
                }
                let relay = tokio::spawn(async move {
                    let r = if sink {
                        let ours = AnswerForSink::new(ours);
                        super::relay_state(ours, state_pipe, compression, limit).await
                    } else {
                        super::relay_state(ours, state_pipe, compression, limit).await
                    };
                    if let Err(e) = &r {
                        tracing::warn!(error = %e, "memory page stream");
                    }
                    r
                });
                if lazy {
                    // The dump keeps serving pages until the target has them all.
                    let dump = driver
                        .migrate_dump_lazy(&self.spec, &images, LazyServe::Socket(criu_end), &ctx)
                        .await
                        .map_err(|e| format!("checkpoint failed: {e}"))?;
                    self.op.set_meta(
                        "criu_dump_ms",
                        json!(dump.info().dump_time.as_millis() as u64),
                    );
                    // Frozen from CRIU's start, not from our checks before it.
                    self.frozen = Some(dump.info().frozen_at);
                    self.lazy = Some(dump);
                } else {
                    let dump = driver
                        .migrate_dump_after(
                            &self.spec,
                            &images,
                            PagesTo::Socket(criu_end),
                            parent.as_deref(),
                            &ctx,
                        )
                        .await
                        .map_err(|e| format!("checkpoint failed: {e}"))?;
                    self.op
                        .set_meta("criu_dump_ms", json!(dump.dump_time.as_millis() as u64));
                    // Frozen from CRIU's start, not from the driver's checks
                    // before it (the container still ran then).
                    self.frozen = Some(dump.frozen_at);
                    self.mark("CRIU dump done");
                    self.dumped = true;
                    // The pages may still be on their way (CRIU wrote them
                    // into a deep socket buffer): the final rootfs pass and
                    // the images go over the fs channel meanwhile, and the
                    // relay is awaited before the hand-over.
                    pages = Some(relay);
                }
            }
            StatePlan::StatefulStopFile => {
                self.stateful_stop("stateful stop on the source (CRIU dump to files)")
                    .await?;
            }
            _ => {}
        }
        if plan.is_stateful() {
            self.phase(
                Phase::Filesystem,
                "final sync of the root filesystem and the saved state",
            );
            if !shared {
                let pass = Pass {
                    base: manifest,
                    limit: plan.options.bandwidth,
                    ..Default::default()
                };
                let (b, pass2) = send_archive(bridge, rootfs, pass).await?;
                bridge = b;
                self.mark(&format!(
                    "final rootfs pass sent ({} entries, {} bytes of content, {} deleted)",
                    pass2.entries, pass2.bytes, pass2.deleted
                ));
            }
            let extra = match &plan.state {
                StatePlan::CriuPageServer { .. } => Some(images.clone()),
                StatePlan::StatefulStopFile if !shared => Some(self.spec.paths.state_dir()),
                _ => None,
            };
            if let Some(dir) = extra {
                let pass = Pass {
                    limit: plan.options.bandwidth,
                    ..Default::default()
                };
                let (b, _) = send_archive(bridge, dir, pass).await?;
                bridge = b;
            }
            if let Some(relay) = pages {
                self.pages_sent(relay).await?;
            }
            if let Some(t) = self.frozen {
                self.op.set_meta(
                    "frozen_ms_at_handover",
                    json!(t.elapsed().as_millis() as u64),
                );
            }
        }
        close_bridge(bridge).await?;
        self.finish_handover(ctl, st, plan, counters.sent.get())
            .await?;
        self.phase(Phase::Completing, "cleaning up the source");
        if let Some(dump) = self.lazy.take() {
            match driver
                .migrate_lazy_finish_source(&self.spec, dump, &ctx)
                .await
            {
                Ok(served) => self.op.set_meta(
                    "postcopy_serving_ms",
                    json!(served.serving.as_millis() as u64),
                ),
                Err(e) => tracing::warn!(error = %e, "source cleanup after a post-copy move"),
            }
        } else if plan.is_live() {
            if let Err(e) = driver.migrate_finish_source(&self.spec, &ctx).await {
                tracing::warn!(error = %e, "source cleanup after move");
            }
        }
        self.clean_up_source().await;
        Ok(())
    }

    /// Wait for the memory page stream to have reached the target.
    async fn pages_sent(
        &mut self,
        relay: tokio::task::JoinHandle<Result<super::StateStats, String>>,
    ) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(60), relay).await {
            Ok(Ok(Ok(stats))) => {
                self.mark("memory pages sent");
                self.op.set_meta(
                    "state_progress",
                    json!(format!("{} MB of memory", stats.sent / 1_000_000)),
                );
                stats.publish(&self.op);
                Ok(())
            }
            Ok(Ok(Err(e))) => Err(format!("memory stream: {e}")),
            _ => Err("memory stream did not finish".into()),
        }
    }
}

impl Daemon {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn receive_container(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        plan: &Plan,
        spec: &InstanceSpec,
        state_pipe: WsPipe,
        fs_pipe: WsPipe,
        start_after: bool,
    ) -> Result<(), String> {
        let driver = ContainerDriver::default();
        let ctx = OpCtx::detached();
        let shared = is_shared(plan);
        if !shared {
            std::fs::create_dir_all(&spec.paths.volume).map_err(|e| e.to_string())?;
            // Marks a partial receive: removed on success; a ferryd that died
            // mid-receive deletes such volumes when it starts again.
            std::fs::write(super::target::receiving_marker(spec), b"")
                .map_err(|e| e.to_string())?;
        }
        let images = MoveRun::images_dir(spec);
        let _ = std::fs::remove_dir_all(&images);
        std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
        let lazy = plan.is_postcopy();
        let live = matches!(plan.state, StatePlan::CriuPageServer { .. });
        let pre_dumps = pre_dump_of(plan).is_some();
        let mut state_pipe = Some(state_pipe);
        // Memory pages: a CRIU page server fed by the state channel (after
        // pre-dumps: once they are here, on top of the last one).
        let start_page_server = |parent: Option<PathBuf>, pipe: Option<WsPipe>| {
            let (driver, ctx, images) = (driver.clone(), ctx.clone(), images.clone());
            let compression = plan.state_compression;
            async move {
                let state_pipe = pipe.ok_or("no state channel")?;
                let (criu_end, ours) = socketpair()?;
                let ps = driver
                    .page_server_after(&images, criu_end, parent.as_deref(), &ctx)
                    .await
                    .map_err(|e| e.to_string())?;
                let relay = tokio::spawn(super::relay_state(ours, state_pipe, compression, None));
                Ok::<_, String>(PagesIn::Criu(Box::new(ps), relay))
            }
        };
        let mut page_server = None;
        if live && !lazy && !pre_dumps {
            page_server = Some(if plan.uses_page_sink() {
                let state_pipe = state_pipe.take().ok_or("no state channel")?;
                // The source answers CRIU (AnswerForSink): nothing goes back.
                let mut sink = PageSink::new(&images).answers(false);
                let compression = plan.state_compression;
                PagesIn::Sink(tokio::spawn(async move {
                    let r = super::relay_state(&mut sink, state_pipe, compression, None).await;
                    (r, sink)
                }))
            } else {
                start_page_server(None, state_pipe.take()).await?
            });
        }
        let received = async {
            let fs = ByteChannel::new(ws::into_stream(fs_pipe), plan.fs_compression())
                .map_err(|e| e.to_string())?;
            let (r, _w) = tokio::io::split(fs);
            let mut bridge: ReadBridge = SyncIoBridge::new(r);
            let rootfs = spec.paths.volume.join("rootfs");
            if !shared {
                bridge = recv_archive(bridge, rootfs.clone(), false).await?;
                if plan.is_stateful() && plan.version >= 2 {
                    send_ack(ctl, FIRST_PASS_APPLIED).await?;
                }
            }
            if pre_dumps {
                let (b, parent) = recv_pre_dumps(bridge, &images).await?;
                bridge = b;
                page_server = Some(start_page_server(parent, state_pipe.take()).await?);
                send_ack(ctl, PRE_DUMPS_RECEIVED).await?;
            }
            if !shared && plan.is_stateful() {
                bridge = recv_archive(bridge, rootfs.clone(), true).await?;
                tracing::debug!(instance = %spec.name, "move target: final rootfs pass applied");
            }
            match &plan.state {
                StatePlan::CriuPageServer { .. } => {
                    let meta = spec.paths.run.join("migration-meta.tmp");
                    let _ = std::fs::remove_dir_all(&meta);
                    let _bridge = recv_archive(bridge, meta.clone(), false).await?;
                    merge_dir(&meta, &images).map_err(|e| format!("checkpoint images: {e}"))?;
                }
                StatePlan::StatefulStopFile if !shared => {
                    let _bridge = recv_archive(bridge, spec.paths.state_dir(), false).await?;
                }
                _ => {}
            }
            tracing::debug!(instance = %spec.name, "move target: filesystem and images received");
            Ok::<_, String>(())
        }
        .await;
        if let Err(e) = received {
            return Err(PagesIn::prefer_error(page_server.as_mut(), e).await);
        }
        // (The sink is never used with post-copy or pre-dumps.)
        if matches!(page_server, Some(PagesIn::Sink(_))) && early_restore() {
            let pages = page_server.take().ok_or("no page sink")?;
            let (st, vol) = self
                .restore_while_pages_arrive(ctl, st, spec, &images, pages)
                .await?;
            return self.resumed(ctl, st, spec, &images, vol).await;
        }
        let st = match super::target::await_restore(ctl, st).await {
            Ok(st) => st,
            Err(e) => return Err(PagesIn::prefer_error(page_server.as_mut(), e).await),
        };
        tracing::debug!(instance = %spec.name, "move target: source says all sent");
        if lazy {
            let state_pipe = state_pipe.take().ok_or("no state channel")?;
            return self
                .restore_postcopy(ctl, st, spec, &images, state_pipe, plan)
                .await;
        }
        let vol: VolatileChanges = if let Some(pages) = page_server {
            pages.done(&spec.name).await?;
            driver
                .migrate_restore(spec, &images, &ctx)
                .await
                .map_err(|e| format!("restore failed: {e}"))?
        } else if plan.state == StatePlan::StatefulStopFile {
            Driver::Container(driver.clone())
                .restore_state(spec, &ctx)
                .await
                .map_err(|e| format!("stateful start failed: {e}"))?
        } else if start_after {
            Driver::Container(driver.clone())
                .start(spec, &ctx)
                .await
                .map_err(|e| format!("start failed: {e}"))?
        } else {
            Default::default()
        };
        self.resumed(ctl, st, spec, &images, vol).await
    }

    async fn resumed(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        spec: &InstanceSpec,
        images: &Path,
        vol: VolatileChanges,
    ) -> Result<(), String> {
        let st = super::target::send_resumed(ctl, st, None).await?;
        // After Resumed: freeing the images is not part of the downtime.
        remove_images(images);
        self.report_success(ctl, st, spec, vol).await
    }

    /// With ferry's page sink the pages may still be arriving once the
    /// other images are here: `criu restore` starts now, sets the container
    /// up meanwhile and waits at its gate (before it reads any page) until
    /// the source has said all is sent and the sink holds every page. If
    /// either fails, the gate refuses and CRIU aborts the restore.
    async fn restore_while_pages_arrive(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        spec: &InstanceSpec,
        images: &Path,
        mut pages: PagesIn,
    ) -> Result<(TargetState, VolatileChanges), String> {
        let (opener, gate) = ferry_drivers::container::pages_gate();
        let ready = async {
            let r = match super::target::await_restore(ctl, st).await {
                Ok(st) => pages.done(&spec.name).await.map(|()| st),
                Err(e) => Err(PagesIn::prefer_error(Some(&mut pages), e).await),
            };
            match &r {
                Ok(_) => {
                    tracing::debug!(instance = %spec.name, "move target: all pages here, opening the restore's gate");
                    opener.open()
                }
                Err(_) => opener.refuse(),
            }
            r
        };
        let (driver, ctx) = (ContainerDriver::default(), OpCtx::detached());
        let restore = driver.migrate_restore_gated(spec, images, gate, &ctx);
        let (ready, restored) = tokio::join!(ready, restore);
        if let (Err(e), Err(r)) = (&ready, &restored) {
            tracing::debug!(instance = %spec.name, error = %e, restore = %r, "move target: the pages did not all arrive; the gated restore ended");
        }
        let st = ready?;
        let vol = restored.map_err(|e| format!("restore failed: {e}"))?;
        Ok((st, vol))
    }
}

/// The target starts `criu restore` while the pages still arrive (ferry's
/// page sink only); `FERRY_EARLY_RESTORE=0` on a member waits for them
/// first, for comparisons.
fn early_restore() -> bool {
    std::env::var("FERRY_EARLY_RESTORE").map_or(true, |v| v != "0")
}

impl Daemon {
    /// Post-copy: start CRIU's lazy-pages daemon (pages come over the state
    /// channel from the source's serving dump), restore, report Resumed,
    /// then wait for every page before Success. A page stream that breaks
    /// after the restore loses the container: it is stopped here.
    async fn restore_postcopy(
        &self,
        ctl: &mut WsControl,
        st: TargetState,
        spec: &InstanceSpec,
        images: &Path,
        state_pipe: WsPipe,
        plan: &Plan,
    ) -> Result<(), String> {
        let driver = ContainerDriver::default();
        let ctx = OpCtx::detached();
        let (criu_end, ours) = socketpair()?;
        let mut pages = driver
            .lazy_pages(images, LazyFrom::Socket(criu_end), &ctx)
            .await
            .map_err(|e| format!("lazy-pages daemon: {e}"))?;
        let compression = plan.state_compression;
        tokio::spawn(async move {
            if let Err(e) = super::relay_state(ours, state_pipe, compression, None).await {
                tracing::warn!(error = %e, "post-copy page stream");
            }
        });
        let vol = match driver
            .migrate_restore_lazy(spec, images, &mut pages, &ctx)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                pages.kill().await;
                return Err(format!("restore failed: {e}"));
            }
        };
        let st = super::target::send_resumed(ctl, st, None).await?;
        if let Err(e) = pages.wait().await {
            let _ = Driver::Container(driver).stop(spec, true, &ctx).await;
            return Err(format!(
                "post-copy: the memory pages stopped arriving after the container resumed here ({e}); \
                 the container is lost and was stopped"
            ));
        }
        self.report_success(ctl, st, spec, vol).await
    }
}

/// `progress.detail` of the target's ack that the first rootfs pass is on
/// its disk (protocol v2; v1 targets do not send it and are not waited for).
const FIRST_PASS_APPLIED: &str = "first pass applied";

/// Source: wait (bounded) for the target's ack `detail` on control (it
/// could not `what` in time otherwise).
pub(super) async fn wait_ack(
    ctl: &mut WsControl,
    st: SourceState,
    cancel: tokio_util::sync::CancellationToken,
    detail: &str,
    what: &str,
) -> Result<SourceState, String> {
    let mut st = st;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (next, msg) = tokio::select! {
            _ = cancel.cancelled() => return Err("cancelled by the user".into()),
            r = tokio::time::timeout(left, st.recv(ctl)) => r
                .map_err(|_| format!("the target did not {what} within 10 minutes"))?
                .map_err(super::peer_error("target"))?,
        };
        st = next;
        if matches!(&msg, Message::Progress(p) if p.detail.as_deref() == Some(detail)) {
            return Ok(st);
        }
    }
}

/// Target: tell the source that `detail` happened (protocol v2 acks).
async fn send_ack(ctl: &mut WsControl, detail: &str) -> Result<(), String> {
    ctl.send(&Message::Progress(Progress {
        stage: Stage::Filesystem,
        bytes: 0,
        total: None,
        detail: Some(detail.into()),
    }))
    .await
    .map_err(|e| e.to_string())
}

/// Move every file of `from` into `to` (keeping what `to` already has), then remove `from`.
fn merge_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest: PathBuf = to.join(e.file_name());
        if !dest.exists() {
            std::fs::rename(e.path(), dest)?;
        }
    }
    std::fs::remove_dir_all(from)
}

/// Where the target's memory pages go: CRIU's page server (fed by a relay)
/// or ferry's page sink (the relay writes the images itself).
enum PagesIn {
    Criu(
        Box<PageServer>,
        tokio::task::JoinHandle<Result<super::StateStats, String>>,
    ),
    Sink(tokio::task::JoinHandle<(Result<super::StateStats, String>, PageSink)>),
}

impl PagesIn {
    /// When the page sink fails (a full disk, say), the source stops and
    /// what broke elsewhere is only a consequence: the sink's error first.
    async fn prefer_error(pages: Option<&mut PagesIn>, e: String) -> String {
        let sink_err = match pages {
            Some(p) => p.failed().await,
            None => None,
        };
        sink_err.map_or(e.clone(), |pe| format!("{pe} (and here: {e})"))
    }

    /// The sink's error if its relay has ended with one (waiting a moment
    /// for it to notice).
    async fn failed(&mut self) -> Option<String> {
        let PagesIn::Sink(relay) = self else {
            return None;
        };
        match tokio::time::timeout(Duration::from_millis(500), relay).await {
            Ok(Ok((Err(e), _))) => Some(format!("page sink: {e}")),
            _ => None,
        }
    }

    /// Wait for every page to be written (the dump has ended).
    async fn done(self, name: &str) -> Result<(), String> {
        match self {
            PagesIn::Criu(ps, relay) => {
                let _ = relay.await;
                tracing::debug!(instance = %name, "move target: page stream ended");
                ps.wait().await.map_err(|e| format!("page server: {e}"))?;
                tracing::debug!(instance = %name, "move target: page server done");
            }
            PagesIn::Sink(relay) => {
                let (relayed, sink) = relay.await.map_err(|e| format!("page sink: {e}"))?;
                relayed.map_err(|e| format!("page sink: {e}"))?;
                let stats = sink.finish().map_err(|e| e.to_string())?;
                tracing::debug!(instance = %name, pagemaps = stats.pagemaps, entries = stats.entries,
                    page_bytes = stats.page_bytes, "move target: page sink wrote the pages");
            }
        }
        Ok(())
    }
}

/// Let CRIU's end of the page socketpair hold up to an eighth of the
/// member's available memory (at most 256 MiB) of pages not yet sent, so the
/// dump does not wait for the link. Past that it waits as before; without
/// the right to force it (not root) it gets what `net.core.wmem_max` allows.
fn deepen_send_buffer(criu_end: &std::os::fd::OwnedFd) {
    const MAX: u64 = 256 << 20;
    let bytes = (crate::cluster::mem_free() / 8).min(MAX) as usize;
    // The kernel doubles what is set (its bookkeeping).
    if let Err(e) = super::set_send_buffer(criu_end, bytes / 2) {
        tracing::debug!(error = %e, "cannot deepen the page socket's send buffer");
    }
}
