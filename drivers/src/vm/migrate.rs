//! Live migration of a running VM from one QEMU to another over a byte stream
//! the daemon relays (the state websocket between two members).
//!
//! ```text
//!  source member                  daemon relay                 target member
//!  ─────────────                  ────────────                 ─────────────
//!  launch_config(spec) ──────── (control channel) ───────────▶ migrate_incoming(spec, cfg, params, fd_b)
//!                                                                QEMU -incoming defer (no -S)
//!                                                                caps; getfd; migrate-incoming fd:
//!  migrate_outgoing(spec, params, fd_a)                          IncomingVm::wait()
//!    caps; params; getfd; migrate fd:   fd_a ⇄ websocket ⇄ fd_b  (both directions: post-copy
//!    query-migrate on each QMP event,                             needs the return path)
//!    at least every 50 ms (10 ms while settling on the target)
//!    progress every second
//!    [post-copy: migrate-start-postcopy after the first pass]
//!    STOP (source) ─────────── final RAM + device state ───────▶ RESUME (target runs the guest)
//!    completed → OutgoingStats                                   completed + running → IncomingStats
//!  migrate_finish_source(spec): quit the paused source QEMU
//! ```
//!
//! Both QEMUs get one end of a socketpair by `getfd` (SCM_RIGHTS on QMP); the
//! driver then closes its own copy, so QEMU's close is the stream's EOF.
//! With multifd (`multifd_channels` > 0) QEMU opens its connections itself:
//! the stream is a unix socket path instead ([`MigrationStream::Unix`]), the
//! source QEMU connecting to it and the target QEMU listening on it.
//!
//! With a disk mirror (`block_mirror`, see [`super::mirror`]): the target
//! exports its disk over NBD ([`IncomingVm::start_nbd_export`]), the source
//! mirrors into it before the RAM migration; the RAM migration then runs with
//! `pause-before-switchover`, and at `pre-switchover` (guest paused) the
//! watch loop completes the mirror without pivoting and issues
//! `migrate-continue`. The target stops its NBD server once the guest runs.
//!
//! Failure semantics:
//! - pre-copy (cancel, stall, broken stream, target gone): the source keeps
//!   running in the same QEMU (`migrate_cancel`; `cont` if QEMU left it
//!   paused), with QEMU's own migration capabilities and parameters put
//!   back; the target QEMU is killed and its runtime files removed.
//! - post-copy (after `migrate-start-postcopy` was issued): neither side can
//!   go back. Cancellation requests are refused (reported as progress) and the
//!   move is driven to completion; if the stream breaks, the guest's RAM is
//!   split between both QEMUs and the error says so. Both QEMUs are left as
//!   they are (QEMU parks them in `postcopy-paused`), never killed by us.
//! - A cancel that races with completion: if QEMU reports `completed`, the
//!   source returns `Ok` — the VM runs on the target.
//! - With a disk mirror, any failure of `migrate_outgoing*` (mirror error,
//!   mirror not finishing at switchover, and all pre-copy failures above)
//!   also force-cancels the block job and removes the NBD node; the source
//!   disk was never written by the move. After success the NBD node is
//!   removed from the paused source QEMU.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qapi::qmp::{MigrateSetParameters, MigrationCapability as Cap};
use serde::{Deserialize, Serialize};

use super::aftermath::{recover_source, restore_qemu_defaults};
pub use super::aftermath::{QEMU_DEFAULT_BANDWIDTH, QEMU_DEFAULT_DOWNTIME_LIMIT_MS};
use super::config::VmConfig;
pub use super::incoming::{IncomingVm, PendingIncoming};
use super::mirror;
use super::priority::{self, VcpuPriority};
use super::qemu::{self, Launch, VmFiles};
use super::qmp::{MigrateInfo, Qmp, QmpEvent};
use super::state::{self, LaunchRecord};
use super::switchover::SwitchoverRate;
use super::VmDriver;
use crate::{DriverError, InstanceSpec, OpCtx};

/// Name under which both QEMUs receive their end of the stream.
pub const STREAM_FD: &str = "ferry-migrate";
/// `max-bandwidth` used for "unlimited" (QEMU has no 0 = unlimited here).
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;
/// QEMU refuses a downtime-limit above 2000 s.
const MAX_DOWNTIME_MS: u64 = 2_000_000;
pub(super) const QMP_CONNECT: Duration = Duration::from_secs(10);
pub(super) const POLL: Duration = Duration::from_millis(50);
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Default of [`MigrateParams::downtime_target_ms`].
pub const DEFAULT_DOWNTIME_TARGET_MS: u64 = 10;
/// Settling ends (the limit is raised to the maximum) after this many
/// dirty-bitmap syncs: QEMU's first sync is at the start, the second ends the
/// bulk pass, so 5 = three passes over the re-dirtied pages.
const SETTLE_SYNCS: u64 = 5;
/// ... or after a third of the time the bulk pass took, or one and a half
/// times what sending once more what the guest dirtied during the bulk pass
/// takes at the rate given to QEMU (3/4 of the measured one, see
/// [`super::switchover`]), whichever is longer, within these bounds
/// (settling must not cost more than a fraction of the move).
const SETTLE_TIME_MIN: Duration = Duration::from_millis(50);
const SETTLE_TIME_MAX: Duration = Duration::from_secs(1);
/// Polling while settling: the budget is short.
const SETTLE_POLL: Duration = Duration::from_millis(10);

/// How long to wait for the guest to settle after a bulk pass that took
/// `bulk` and left `dirty` bytes to send again at `rate` bytes/s (0: not
/// measured).
fn settle_budget(bulk: Duration, dirty: u64, rate: u64) -> Duration {
    let resend = if rate > 0 {
        Duration::from_secs_f64(dirty as f64 / rate as f64) * 3 / 2
    } else {
        Duration::ZERO
    };
    (bulk / 3)
        .max(resend)
        .clamp(SETTLE_TIME_MIN, SETTLE_TIME_MAX)
}
/// Pre-copy with no byte moving for this long is cancelled (stuck relay).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The target may take this long after `completed` to report the run state.
pub(super) const RESUME_GRACE: Duration = Duration::from_secs(5);

/// How to migrate. Part of the negotiated plan: both sides get the same value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrateParams {
    /// Throttle the guest's vCPUs when it dirties RAM faster than it is sent.
    pub auto_converge: bool,
    /// XBZRLE delta compression of re-sent pages (source-side cache).
    pub xbzrle: bool,
    /// Switch to post-copy after the first pass. A broken stream during
    /// post-copy loses the VM.
    pub postcopy: bool,
    /// Bytes/s; `None` = unlimited (QEMU's own default would be 128 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// Longest acceptable pause of the guest at switchover.
    pub downtime_limit_ms: u64,
    /// Switch-over policy. While the guest converges, QEMU may switch over
    /// only when it expects a pause below this (its `downtime-limit` starts
    /// here); the limit is raised to `downtime_limit_ms` once the guest does
    /// not get there: auto-converge starts throttling it, three passes after
    /// the bulk pass, or after a third of the time the bulk pass took or
    /// 1.5 × the time to send again what the guest dirtied meanwhile,
    /// whichever is longer (at least 50 ms, at most 1 s). While it runs,
    /// QEMU judges the switch-over with the rate ferry measured
    /// ([`super::switchover`]). `None` or ≥ the limit: QEMU's
    /// own behaviour (switch over as soon as the estimate fits the limit,
    /// usually right after the bulk pass with what the guest dirtied
    /// meanwhile). Ignored with post-copy. Source side only.
    pub downtime_target_ms: Option<u64>,
    /// The disk is mirrored over NBD during the move ([`super::mirror`]):
    /// pause before switchover to complete the mirror. The source needs a
    /// READY mirror job when the migration starts.
    pub block_mirror: bool,
    /// QEMU's multifd: RAM pages travel over this many extra connections
    /// besides the main one, sent and loaded by as many threads on each
    /// side (0: one stream). Needs [`MigrationStream::Unix`] (QEMU opens
    /// the connections itself) and QEMU 8.0 or later on both sides.
    pub multifd_channels: u8,
}

/// Where a QEMU migration stream goes.
#[derive(Debug)]
pub enum MigrationStream {
    /// One stream: one end of a socketpair, handed to QEMU with `getfd`.
    Fd(OwnedFd),
    /// A unix socket, for multifd: the source QEMU connects to it (as often
    /// as it has channels; the caller listens there and relays each
    /// connection), the target QEMU listens on it (the caller connects).
    Unix(PathBuf),
}

impl From<OwnedFd> for MigrationStream {
    fn from(fd: OwnedFd) -> Self {
        MigrationStream::Fd(fd)
    }
}

impl MigrationStream {
    /// Hand the stream to QEMU: the URI for `migrate` / `migrate-incoming`.
    pub(super) async fn uri(&self, qmp: &mut Qmp) -> Result<String, DriverError> {
        match self {
            MigrationStream::Fd(fd) => {
                qmp.send_fd(STREAM_FD, fd.as_fd()).await?;
                Ok(format!("fd:{STREAM_FD}"))
            }
            MigrationStream::Unix(path) => Ok(format!("unix:{}", path.display())),
        }
    }
}

impl Default for MigrateParams {
    fn default() -> Self {
        MigrateParams {
            auto_converge: true,
            xbzrle: false,
            postcopy: false,
            max_bandwidth: None,
            downtime_limit_ms: 300,
            downtime_target_ms: Some(DEFAULT_DOWNTIME_TARGET_MS),
            block_mirror: false,
            multifd_channels: 0,
        }
    }
}

impl MigrateParams {
    pub fn validate(&self) -> Result<(), DriverError> {
        if let Some(b) = self.max_bandwidth {
            if b == 0 || b > UNLIMITED_BANDWIDTH {
                return Err(DriverError::InvalidConfig(format!(
                    "migration bandwidth {b} bytes/s: must be from 1 to {UNLIMITED_BANDWIDTH} (or unset for unlimited)"
                )));
            }
        }
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > MAX_DOWNTIME_MS {
            return Err(DriverError::InvalidConfig(format!(
                "migration downtime limit {} ms: must be from 1 to {MAX_DOWNTIME_MS} ms",
                self.downtime_limit_ms
            )));
        }
        if let Some(t) = self.downtime_target_ms {
            if t == 0 || t > MAX_DOWNTIME_MS {
                return Err(DriverError::InvalidConfig(format!(
                    "migration downtime target {t} ms: must be from 1 to {MAX_DOWNTIME_MS} ms (or unset)"
                )));
            }
        }
        Ok(())
    }

    /// Whether ferry's switch-over policy runs (a downtime target below the
    /// limit, no post-copy).
    fn switchover_policy(&self) -> bool {
        self.initial_downtime_limit() < self.downtime_limit_ms
    }

    /// The `downtime-limit` QEMU starts with: the target while settling.
    fn initial_downtime_limit(&self) -> u64 {
        match self.downtime_target_ms {
            Some(t) if !self.postcopy && t < self.downtime_limit_ms => t,
            _ => self.downtime_limit_ms,
        }
    }

    /// Capabilities, all set explicitly (a QEMU keeps them across migrations).
    pub(super) fn capabilities(&self) -> Vec<(Cap, bool)> {
        vec![
            (Cap::events, true),
            (Cap::auto_converge, self.auto_converge),
            (Cap::xbzrle, self.xbzrle),
            (Cap::postcopy_ram, self.postcopy),
            // Completes the disk mirror while the guest is paused.
            (Cap::pause_before_switchover, self.block_mirror),
            (Cap::multifd, self.multifd_channels > 0),
        ]
    }
}

/// Capabilities of a migration into or out of a state file (stateful stop
/// and start): `events` on, every other one off, whatever an earlier live
/// migration of this QEMU left set (a QEMU keeps them: after a failed move
/// with a disk mirror, `pause-before-switchover` parked a save at
/// `pre-switchover` for good).
pub(super) fn file_capabilities() -> Vec<(Cap, bool)> {
    MigrateParams {
        auto_converge: false,
        xbzrle: false,
        postcopy: false,
        block_mirror: false,
        ..MigrateParams::default()
    }
    .capabilities()
}

/// How the source's QEMU was started: the target starts its QEMU the same way.
pub type LaunchConfig = LaunchRecord;

/// Progress of an outgoing migration, reported once a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationProgress {
    /// QEMU's status (`setup`, `active`, `postcopy-active`, `device`, ...).
    pub status: String,
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Bytes/s over the last report interval.
    pub rate: u64,
    /// Passes over guest RAM so far.
    pub dirty_sync_count: u64,
    pub cpu_throttle_percent: u64,
    /// `remaining / rate`; ignores re-dirtied pages, so a lower bound.
    pub eta: Option<Duration>,
    pub elapsed: Duration,
}

impl MigrationProgress {
    /// "X MiB remaining (Y MiB/s) (Z% CPU throttle)".
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} MiB remaining ({} MiB/s), pass {}",
            self.remaining >> 20,
            self.rate >> 20,
            self.dirty_sync_count
        );
        if self.cpu_throttle_percent > 0 {
            s.push_str(&format!(" ({}% CPU throttle)", self.cpu_throttle_percent));
        }
        s
    }
}

/// Result of a completed outgoing migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutgoingStats {
    /// QEMU's total time (source).
    pub total_time_ms: u64,
    /// QEMU's downtime (source's view: stop → completion).
    pub downtime_ms: u64,
    pub setup_time_ms: u64,
    /// RAM bytes sent.
    pub transferred: u64,
    pub dirty_sync_count: u64,
    /// Highest auto-converge throttle seen.
    pub max_throttle_percent: u64,
    /// Whether the migration switched to post-copy.
    pub postcopy: bool,
    /// QEMU's timestamp (µs since the epoch) of the source's STOP event;
    /// ferry's downtime is target RESUME minus this (same clock domain needed).
    pub stop_event_us: Option<u64>,
    /// Wall time of migrate_outgoing from `migrate` to completion.
    pub wall_ms: u64,
    /// With a disk mirror: time spent completing it at switchover (guest
    /// paused; part of the downtime).
    #[serde(default)]
    pub mirror_switchover_ms: Option<u64>,
    /// The `downtime-limit` in force when QEMU switched over: the downtime
    /// target if the guest settled, else the maximum.
    #[serde(default)]
    pub switchover_limit_ms: u64,
    /// The switch-over bandwidth (bytes/s) ferry measured and gave QEMU
    /// ([`super::switchover`]); 0: QEMU used its own estimate.
    #[serde(default)]
    pub switchover_bandwidth: u64,
    /// The nice value the source's vCPU threads ran at during the migration
    /// ([`super::priority`]), whoever lowered them; 0: they did not yield.
    #[serde(default)]
    pub vcpu_nice: i32,
}

/// Result of a completed incoming migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IncomingStats {
    /// QEMU's timestamp (µs since the epoch) of the target's RESUME event.
    pub resume_event_us: Option<u64>,
    /// From `migrate-incoming` to the guest running (or completion).
    pub wall_ms: u64,
    /// The guest runs on the target (false if it was paused on the source).
    pub running: bool,
    /// The target saw post-copy.
    pub postcopy: bool,
}

/// The caller's handle on a running outgoing migration, both ways: it can
/// ask for post-copy now (the driver does so by itself after the first pass
/// when `postcopy` is set), and it hears when the migration ended without
/// completing, so it can close its ends of the stream at once.
///
/// QEMU's migration can hang on a connection that stays open but is no
/// longer read (its threads block writing into it), and its clean-up does
/// not finish until they return: a caller relaying the stream must close
/// every connection once [`Self::abandoned`] fires, before the driver waits
/// for that clean-up (shown on raw QEMU by
/// `scripts/experiments/multifd-unread-stall.py`).
#[derive(Debug, Clone, Default)]
pub struct MigrationControl {
    postcopy: Arc<AtomicBool>,
    abandoned: tokio_util::sync::CancellationToken,
}

impl MigrationControl {
    /// Switch to post-copy at the next poll (needs `params.postcopy`).
    pub fn start_postcopy(&self) {
        self.postcopy.store(true, Ordering::SeqCst)
    }
    fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::SeqCst)
    }
    /// Completes once the migration failed, was cancelled or broke: the
    /// stream will carry nothing more.
    pub fn abandoned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.abandoned.clone().cancelled_owned()
    }
    fn abandon(&self) {
        self.abandoned.cancel()
    }
}

pub(super) fn migration_error(detail: String) -> DriverError {
    DriverError::Command {
        program: "QEMU live migration".into(),
        detail,
    }
}

/// Statuses in which a migration is still under way on the source.
pub(super) fn in_progress(status: &str) -> bool {
    matches!(
        status,
        "setup" | "active" | "device" | "pre-switchover" | "cancelling" | "wait-unplug" | "colo"
    ) || status.starts_with("postcopy")
}

pub(super) async fn set_caps(qmp: &mut Qmp, params: &MigrateParams) -> Result<(), DriverError> {
    if params.multifd_channels > 0 && !qmp.has_multifd() {
        return Err(DriverError::InvalidConfig(format!(
            "multifd migration needs QEMU {}.{} or later on both members; move without it",
            super::qmp::MULTIFD_SINCE.0,
            super::qmp::MULTIFD_SINCE.1
        )));
    }
    qmp.set_capabilities(&params.capabilities()).await?;
    if params.multifd_channels > 0 {
        qmp.set_parameters(MigrateSetParameters {
            multifd_channels: Some(params.multifd_channels),
            ..Default::default()
        })
        .await?;
    }
    Ok(())
}

async fn set_source_parameters(qmp: &mut Qmp, params: &MigrateParams) -> Result<(), DriverError> {
    qmp.set_parameters(MigrateSetParameters {
        max_bandwidth: Some(params.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH)),
        // 0 = unlimited; a cap applies to post-copy as well.
        max_postcopy_bandwidth: Some(params.max_bandwidth.unwrap_or(0)),
        downtime_limit: Some(params.initial_downtime_limit()),
        // QEMU's own estimate until ferry measured the stream (a QEMU keeps
        // parameters across migrations).
        avail_switchover_bandwidth: Some(0),
        ..Default::default()
    })
    .await
}

impl VmDriver {
    /// How this VM's QEMU runs (machine, RAM, vCPUs, QEMU version): the
    /// target of a live migration must start its QEMU identically.
    pub fn launch_config(&self, spec: &InstanceSpec) -> Result<LaunchConfig, DriverError> {
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Err(DriverError::WrongState(format!(
                "VM {} is not running: nothing to migrate live",
                spec.name
            )));
        }
        if let Some(r) = state::read_record(&state::launch_record_path(spec)) {
            return Ok(r);
        }
        let cfg = VmConfig::from_spec(spec)?;
        let l = Launch::new(spec, &cfg, qemu::pick_accel());
        Ok(LaunchRecord {
            version: 1,
            machine: l.machine,
            memory_mib: l.memory_mib,
            cpus: l.cpus,
            qemu_version: String::new(),
        })
    }

    /// Source side: migrate the running VM into `stream_fd`. See the module
    /// doc for what failure and cancellation leave behind.
    pub async fn migrate_outgoing(
        &self,
        spec: &InstanceSpec,
        params: &MigrateParams,
        stream: impl Into<MigrationStream>,
        progress: impl Fn(MigrationProgress) + Send,
        ctx: &OpCtx,
    ) -> Result<OutgoingStats, DriverError> {
        self.migrate_outgoing_with(
            spec,
            params,
            stream,
            &MigrationControl::default(),
            progress,
            ctx,
        )
        .await
    }

    /// [`migrate_outgoing`](Self::migrate_outgoing) with a handle on the
    /// migration (see [`MigrationControl`]).
    pub async fn migrate_outgoing_with(
        &self,
        spec: &InstanceSpec,
        params: &MigrateParams,
        stream: impl Into<MigrationStream>,
        control: &MigrationControl,
        progress: impl Fn(MigrationProgress) + Send,
        ctx: &OpCtx,
    ) -> Result<OutgoingStats, DriverError> {
        let r = self
            .outgoing(spec, params, stream.into(), control, progress, ctx)
            .await;
        if params.block_mirror {
            // Success: drop the NBD node; failure: the job too (source disk untouched).
            if let Err(e) = self.mirror_cancel(spec).await {
                tracing::warn!("removing the disk mirror of {}: {e}", spec.name);
            }
        }
        r
    }

    async fn outgoing(
        &self,
        spec: &InstanceSpec,
        params: &MigrateParams,
        stream: MigrationStream,
        control: &MigrationControl,
        progress: impl Fn(MigrationProgress) + Send,
        ctx: &OpCtx,
    ) -> Result<OutgoingStats, DriverError> {
        params.validate()?;
        let f = VmFiles::of(spec);
        let pid = qemu::running_pid(&f).ok_or_else(|| {
            DriverError::WrongState(format!(
                "VM {} is not running: nothing to migrate live",
                spec.name
            ))
        })?;
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        let status = qmp.status().await?;
        let prior = qmp.query_migrate().await?;
        if in_progress(&prior.status) {
            return Err(DriverError::WrongState(format!(
                "VM {} already has a migration in progress ({})",
                spec.name, prior.status
            )));
        }
        if status == "postmigrate" {
            return Err(DriverError::WrongState(format!(
                "VM {} was already migrated away from this member (its QEMU is paused in postmigrate)",
                spec.name
            )));
        }
        let was_running = status == "running";
        ctx.check_cancelled("live migration")?;
        if params.block_mirror {
            mirror::check_ready(&mut qmp).await?;
        }
        set_caps(&mut qmp, params).await?;
        set_source_parameters(&mut qmp, params).await?;
        qmp.drain_events();
        let uri = stream.uri(&mut qmp).await?;
        if let Err(e) = qmp.migrate(&uri).await {
            control.abandon();
            let _ = qmp.close_fd(STREAM_FD).await;
            restore_qemu_defaults(&mut qmp).await;
            return Err(e);
        }
        drop(stream);
        ctx.progress("stage", "migrating the VM's memory");
        let vcpus = VcpuPriority::lower(&mut qmp, priority::migration_vcpu_nice()).await;
        let mut w = OutgoingWatch::new(params, control, ctx);
        let r = w.run(&mut qmp, &progress).await;
        let vcpu_nice = vcpus.restore();
        if r.is_err() {
            // Before waiting for QEMU's clean-up, which may need the
            // caller's ends of the stream closed.
            control.abandon();
        }
        match r {
            Ok(stats) => Ok(OutgoingStats { vcpu_nice, ..stats }),
            Err(Failure::PostCopy(e)) => Err(e),
            Err(Failure::PreCopy(e)) => match recover_source(&mut qmp, was_running).await {
                Ok(()) => Err(e),
                Err(r) => Err(migration_error(format!(
                    "{e}; and resuming the VM on the source (QEMU pid {pid}) afterwards failed: {r}"
                ))),
            },
        }
    }

    /// After a completed migration: quit the paused source QEMU and clean its
    /// runtime files. Refuses to end a QEMU whose guest still runs here.
    pub async fn migrate_finish_source(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        let Some(pid) = qemu::running_pid(&f) else {
            clean_run_dir(spec, &f);
            return Ok(());
        };
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        let status = qmp.status().await?;
        let mig = qmp.query_migrate().await?;
        if status == "running" || mig.status != "completed" {
            return Err(DriverError::WrongState(format!(
                "VM {} is {status} on this member (migration {}): it was not migrated away, refusing to stop it",
                spec.name, mig.status
            )));
        }
        let _ = qmp.quit().await;
        drop(qmp);
        if !qemu::wait_exit(&f, pid, Duration::from_secs(10)).await {
            qemu::kill_and_clean(&f, pid).await?;
        }
        clean_run_dir(spec, &f);
        Ok(())
    }

    /// At a restart of ferryd, for a receive its previous process never
    /// finished: kill the target QEMU left behind, if any (with a multifd
    /// stream it may still wait for connections that will never come), and
    /// remove the instance's runtime directory (QEMU's sockets, pidfile and
    /// launch record). The caller removes the volume afterwards.
    pub async fn discard_incoming(&self, spec: &InstanceSpec) {
        let f = VmFiles::of(spec);
        if let Some(pid) = qemu::running_pid(&f) {
            tracing::warn!(instance = %spec.name, pid, "killing the QEMU of an unfinished receive");
            cleanup_target(spec, &f, pid).await;
        }
        // What clean-up leaves: QEMU's sockets (NBD export, multifd stream).
        if let Err(e) = std::fs::remove_dir_all(&spec.paths.run) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", spec.paths.run.display());
            }
        }
    }

    /// After a completed migration whose target then failed: run the guest
    /// on the source again (`cont` from `postmigrate`).
    pub async fn migrate_resume_source(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Err(DriverError::WrongState(format!(
                "VM {} has no QEMU on this member to resume",
                spec.name
            )));
        }
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        if qmp.status().await? != "running" {
            qmp.cont().await?;
        }
        restore_qemu_defaults(&mut qmp).await;
        Ok(())
    }
}

/// Why an outgoing migration ended without completing.
pub(super) enum Failure {
    /// Before post-copy: the source still holds the whole VM.
    PreCopy(DriverError),
    /// During post-copy: the VM is split, nothing to roll back.
    PostCopy(DriverError),
}

/// State of the source-side watch loop.
struct OutgoingWatch<'a> {
    params: &'a MigrateParams,
    control: &'a MigrationControl,
    ctx: &'a OpCtx,
    started: Instant,
    stop_event_us: Option<u64>,
    postcopy_requested: bool,
    cancel_sent: bool,
    cancel_refused: bool,
    max_throttle: u64,
    last_report: Instant,
    last_reported_bytes: u64,
    last_change: Instant,
    last_bytes: u64,
    /// Why the disk mirror broke (from its events), before switchover.
    mirror_failure: Option<String>,
    /// The mirror was completed at switchover (in that time): its end is
    /// no failure.
    mirror_done: Option<Duration>,
    /// The `downtime-limit` QEMU has now.
    limit_now: u64,
    /// The stream's rate, for QEMU's switch-over decision.
    switchover: SwitchoverRate,
    /// When the bulk pass ended (the second dirty-bitmap sync), while
    /// settling, and how long settling may last from then.
    bulk_done: Option<(Instant, Duration)>,
}

impl<'a> OutgoingWatch<'a> {
    fn new(params: &'a MigrateParams, control: &'a MigrationControl, ctx: &'a OpCtx) -> Self {
        let now = Instant::now();
        OutgoingWatch {
            params,
            control,
            ctx,
            started: now,
            stop_event_us: None,
            postcopy_requested: false,
            cancel_sent: false,
            cancel_refused: false,
            max_throttle: 0,
            last_report: now,
            last_reported_bytes: 0,
            last_change: now,
            last_bytes: 0,
            mirror_failure: None,
            mirror_done: None,
            limit_now: params.initial_downtime_limit(),
            switchover: SwitchoverRate::default(),
            bulk_done: None,
        }
    }

    /// While the switch-over policy runs: keep QEMU's switch-over bandwidth
    /// at the rate the stream was measured to carry (see [`super::switchover`]).
    async fn tell_switchover_rate(&mut self, qmp: &mut Qmp, info: &MigrateInfo) {
        if !self.params.switchover_policy()
            || info.status != "active"
            || self.cancel_sent
            || !qmp.has_switchover_bandwidth()
        {
            return;
        }
        let Some(bw) = self.switchover.observe(Instant::now(), info) else {
            return;
        };
        let set = MigrateSetParameters {
            avail_switchover_bandwidth: Some(bw),
            ..Default::default()
        };
        match qmp.set_parameters(set).await {
            Ok(()) => tracing::debug!(
                mib_per_s = bw >> 20,
                "migration: switch-over bandwidth set to the measured rate"
            ),
            // e.g. completed meanwhile; QEMU keeps its own estimate.
            Err(e) => tracing::warn!("setting the switch-over bandwidth: {e}"),
        }
    }

    /// While settling on the downtime target: raise QEMU's limit to the
    /// maximum once the guest does not converge to the target.
    async fn maybe_stop_settling(&mut self, qmp: &mut Qmp, info: &MigrateInfo) {
        let max = self.params.downtime_limit_ms;
        if self.limit_now >= max || info.status != "active" || self.cancel_sent {
            return;
        }
        let syncs = info.dirty_sync_count.unwrap_or(0);
        tracing::trace!(
            at_ms = self.started.elapsed().as_millis() as u64,
            syncs,
            remaining_kib = info.remaining.unwrap_or(0) >> 10,
            transferred_kib = info.transferred.unwrap_or(0) >> 10,
            "migration: settling"
        );
        if syncs >= 2 && self.bulk_done.is_none() {
            let budget = settle_budget(
                self.started.elapsed(),
                info.remaining.unwrap_or(0),
                self.switchover.told(),
            );
            self.bulk_done = Some((Instant::now(), budget));
        }
        let throttle = info.cpu_throttle_percent.unwrap_or(0);
        let why = if throttle > 0 {
            format!("auto-converge throttles the guest ({throttle}%)")
        } else if syncs >= SETTLE_SYNCS {
            format!("{} passes after the bulk pass", syncs.saturating_sub(2))
        } else if let Some((at, budget)) = self.bulk_done.filter(|(at, b)| at.elapsed() >= *b) {
            format!("{:?} after the bulk pass (budget {budget:?})", at.elapsed())
        } else {
            return;
        };
        let set = MigrateSetParameters {
            downtime_limit: Some(max),
            ..Default::default()
        };
        match qmp.set_parameters(set).await {
            Ok(()) => {
                tracing::info!(
                    "migration: no switch-over within {} ms yet ({why}): downtime-limit raised to {max} ms",
                    self.limit_now
                );
                self.limit_now = max;
            }
            // e.g. completed meanwhile; the next poll tells.
            Err(e) => tracing::warn!("raising the downtime-limit to {max} ms: {e}"),
        }
    }

    fn note_events(&mut self, events: Vec<QmpEvent>) {
        for ev in events {
            if ev.name == "STOP" && self.stop_event_us.is_none() {
                self.stop_event_us = Some(ev.timestamp_us);
            }
            if self.params.block_mirror
                && self.mirror_done.is_none()
                && self.mirror_failure.is_none()
            {
                self.mirror_failure = mirror::event_failure(&ev);
            }
        }
    }

    fn report(&mut self, info: &MigrateInfo, progress: &(impl Fn(MigrationProgress) + Send)) {
        let now = Instant::now();
        let transferred = info.transferred.unwrap_or(0);
        let secs = now.duration_since(self.last_report).as_secs_f64().max(1e-3);
        let rate = (transferred.saturating_sub(self.last_reported_bytes) as f64 / secs) as u64;
        let remaining = info.remaining.unwrap_or(0);
        let p = MigrationProgress {
            status: info.status.clone(),
            transferred,
            remaining,
            total: info.total.unwrap_or(0),
            rate,
            dirty_sync_count: info.dirty_sync_count.unwrap_or(0),
            cpu_throttle_percent: info.cpu_throttle_percent.unwrap_or(0),
            eta: (rate > 0).then(|| Duration::from_secs_f64(remaining as f64 / rate as f64)),
            elapsed: self.started.elapsed(),
        };
        self.ctx.progress("state_progress", &p.summary());
        progress(p);
        self.last_report = now;
        self.last_reported_bytes = transferred;
    }

    async fn run(
        &mut self,
        qmp: &mut Qmp,
        progress: &(impl Fn(MigrationProgress) + Send),
    ) -> Result<OutgoingStats, Failure> {
        loop {
            // Events are taken before the query, never after: one that
            // arrives after the answer (e.g. `completed` right after
            // `device`) must stay queued to end the wait below at once.
            self.note_events(qmp.drain_events());
            let info = match qmp.query_migrate().await {
                Ok(i) => i,
                Err(e) => return Err(self.lost_source(e)),
            };
            self.max_throttle = self
                .max_throttle
                .max(info.cpu_throttle_percent.unwrap_or(0));
            match info.status.as_str() {
                "completed" => {
                    let stats = self.completed(qmp, info).await;
                    if let Ok(last) = qmp.query_migrate().await {
                        self.report(&last, progress);
                    }
                    return Ok(stats);
                }
                "failed" | "cancelled" => return Err(self.failed(&info)),
                s if s.starts_with("postcopy-") && s != "postcopy-active" => {
                    return Err(Failure::PostCopy(migration_error(format!(
                        "the stream broke during post-copy (QEMU status {s}): the VM's memory is split between \
                         the source QEMU (paused, on this member) and the target QEMU; the VM is lost unless \
                         the stream is re-established (QEMU migrate-recover, not supported by ferry yet)"
                    ))))
                }
                _ => {}
            }
            if info.status == "postcopy-active" {
                self.postcopy_requested = true;
            }
            if self.params.block_mirror {
                self.handle_mirror(qmp, &info).await?;
            }
            self.maybe_switch_postcopy(qmp, &info).await;
            self.tell_switchover_rate(qmp, &info).await;
            self.maybe_stop_settling(qmp, &info).await;
            self.handle_cancel_and_stall(qmp, &info).await?;
            if self.last_report.elapsed() >= REPORT_EVERY {
                self.report(&info, progress);
            }
            let poll = if self.limit_now < self.params.downtime_limit_ms {
                SETTLE_POLL
            } else {
                POLL
            };
            // Wake on QEMU's next event (`events` is on): react at once to
            // `pre-switchover` (the guest is paused) and to completion.
            if let Some(ev) = qmp.next_event(poll).await {
                self.note_events(vec![ev]);
            }
        }
    }

    fn lost_source(&self, e: DriverError) -> Failure {
        let e = migration_error(format!(
            "lost the source QEMU's monitor during the migration: {e}"
        ));
        if self.postcopy_requested {
            Failure::PostCopy(e)
        } else {
            Failure::PreCopy(e)
        }
    }

    fn failed(&self, info: &MigrateInfo) -> Failure {
        let why = info.error.as_deref().unwrap_or("no error description");
        if self.postcopy_requested {
            return Failure::PostCopy(migration_error(format!(
                "post-copy migration {}: {why}; the VM's memory was split between source and target: the VM is lost",
                info.status
            )));
        }
        if self.cancel_sent && info.status == "cancelled" {
            let what = if self.ctx.is_cancelled() {
                "live migration"
            } else {
                "live migration (stalled)"
            };
            return Failure::PreCopy(if self.ctx.is_cancelled() {
                DriverError::Cancelled(format!("{what}: the VM keeps running on the source"))
            } else {
                DriverError::Timeout(format!(
                    "{what}: no data moved for {STALL_TIMEOUT:?}; cancelled, the VM keeps running on the source"
                ))
            });
        }
        Failure::PreCopy(migration_error(format!(
            "migration {}: {why} (the VM keeps running on the source)",
            info.status
        )))
    }

    /// Before switchover a broken mirror cancels the migration; at
    /// `pre-switchover` the mirror is completed, then `migrate-continue`.
    async fn handle_mirror(&mut self, qmp: &mut Qmp, info: &MigrateInfo) -> Result<(), Failure> {
        if self.mirror_done.is_some() || self.cancel_sent {
            return Ok(());
        }
        let mut failure = self.mirror_failure.take().map(|why| {
            migration_error(format!(
                "the disk mirror broke during the migration ({why}); the VM keeps running on the source"
            ))
        });
        if failure.is_none() && info.status == "pre-switchover" {
            self.ctx.progress("stage", "completing the disk mirror");
            let mut seen = Vec::new();
            let done = mirror::complete_for_switchover(qmp, &mut seen).await;
            if let Ok(took) = &done {
                // Before the events: the job's own end is no failure now.
                self.mirror_done = Some(*took);
            }
            self.note_events(seen);
            match done {
                Ok(_) => {
                    let cont = serde_json::json!({"state": "pre-switchover"});
                    if let Err(e) = qmp.execute_raw("migrate-continue", cont).await {
                        failure = Some(e);
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        let Some(e) = failure else { return Ok(()) };
        // The mirror ends before the switchover to post-copy too: until
        // then, even with post-copy requested, the source can take the VM back.
        if info.status.starts_with("postcopy") {
            return Err(Failure::PostCopy(e));
        }
        self.cancel_sent = true;
        if let Err(c) = qmp.migrate_cancel().await {
            tracing::warn!("migrate_cancel after a disk mirror failure: {c}");
        }
        Err(Failure::PreCopy(e))
    }

    async fn maybe_switch_postcopy(&mut self, qmp: &mut Qmp, info: &MigrateInfo) {
        if !self.params.postcopy
            || self.postcopy_requested
            || self.cancel_sent
            || info.status != "active"
        {
            return;
        }
        if info.dirty_sync_count.unwrap_or(0) < 2 && !self.control.postcopy_requested() {
            return;
        }
        self.ctx.progress("stage", "switching to post-copy");
        match qmp.migrate_start_postcopy().await {
            Ok(()) => self.postcopy_requested = true,
            // e.g. the migration completed meanwhile; the next poll tells.
            Err(e) => tracing::warn!("migrate-start-postcopy: {e}"),
        }
    }

    async fn handle_cancel_and_stall(
        &mut self,
        qmp: &mut Qmp,
        info: &MigrateInfo,
    ) -> Result<(), Failure> {
        let bytes = info.transferred.unwrap_or(0);
        if bytes != self.last_bytes {
            self.last_bytes = bytes;
            self.last_change = Instant::now();
        }
        let stalled = !self.postcopy_requested && self.last_change.elapsed() >= STALL_TIMEOUT;
        if self.ctx.is_cancelled() || stalled {
            if self.postcopy_requested {
                if !self.cancel_refused {
                    self.cancel_refused = true;
                    self.ctx.progress(
                        "stage",
                        "cannot cancel during post-copy (the guest already runs on the target): finishing the move",
                    );
                }
            } else if !self.cancel_sent {
                self.ctx.progress("stage", "cancelling the migration");
                if let Err(e) = qmp.migrate_cancel().await {
                    return Err(Failure::PreCopy(e));
                }
                self.cancel_sent = true;
            }
        }
        Ok(())
    }

    async fn completed(&mut self, qmp: &mut Qmp, mut info: MigrateInfo) -> OutgoingStats {
        // QEMU 7.2 may report completion before the timings are filled in.
        for _ in 0..20 {
            if info.total_time_ms.unwrap_or(0) != 0 && info.downtime_ms.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            match qmp.query_migrate().await {
                Ok(i) => info = i,
                Err(_) => break,
            }
        }
        self.note_events(qmp.drain_events());
        if self.stop_event_us.is_none() {
            // The STOP event may trail the completed status by a moment.
            if let Some(ev) = wait_event(qmp, "STOP", Duration::from_millis(200)).await {
                self.stop_event_us = Some(ev.timestamp_us);
            }
        }
        OutgoingStats {
            total_time_ms: info.total_time_ms.unwrap_or(0),
            downtime_ms: info.downtime_ms.unwrap_or(0),
            setup_time_ms: info.setup_time_ms.unwrap_or(0),
            transferred: info.transferred.unwrap_or(0),
            dirty_sync_count: info.dirty_sync_count.unwrap_or(0),
            max_throttle_percent: self.max_throttle,
            postcopy: self.postcopy_requested,
            stop_event_us: self.stop_event_us,
            wall_ms: self.started.elapsed().as_millis() as u64,
            mirror_switchover_ms: self.mirror_done.map(|d| d.as_millis() as u64),
            switchover_limit_ms: self.limit_now,
            switchover_bandwidth: self.switchover.told(),
            vcpu_nice: 0,
        }
    }
}

pub(super) async fn wait_event(qmp: &mut Qmp, name: &str, timeout: Duration) -> Option<QmpEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let ev = qmp.next_event(left).await?;
        if ev.name == name {
            return Some(ev);
        }
    }
}

fn clean_run_dir(spec: &InstanceSpec, f: &VmFiles) {
    qemu::clean_runtime(f);
    let _ = std::fs::remove_file(state::launch_record_path(spec));
    let _ = std::fs::remove_dir(&spec.paths.run);
}

pub(super) async fn cleanup_target(spec: &InstanceSpec, f: &VmFiles, pid: u32) {
    if let Err(e) = qemu::kill_and_clean(f, pid).await {
        tracing::warn!("cleaning up the target QEMU of {}: {e}", spec.name);
    }
    clean_run_dir(spec, f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_defaults_and_validation() {
        let p = MigrateParams::default();
        assert!(p.auto_converge && !p.postcopy && !p.xbzrle);
        assert_eq!((p.max_bandwidth, p.downtime_limit_ms), (None, 300));
        p.validate().unwrap();
        assert!(MigrateParams {
            max_bandwidth: Some(0),
            ..p.clone()
        }
        .validate()
        .is_err());
        assert!(MigrateParams {
            downtime_limit_ms: 0,
            ..p.clone()
        }
        .validate()
        .is_err());
        let caps = MigrateParams {
            postcopy: true,
            ..p.clone()
        }
        .capabilities();
        assert!(caps.contains(&(Cap::postcopy_ram, true)) && caps.contains(&(Cap::events, true)));
        assert!(caps.contains(&(Cap::pause_before_switchover, false)));
        let caps = MigrateParams {
            block_mirror: true,
            ..p.clone()
        }
        .capabilities();
        assert!(caps.contains(&(Cap::pause_before_switchover, true)));
        let parsed: MigrateParams = serde_json::from_str(r#"{"postcopy": true}"#).unwrap();
        assert!(parsed.postcopy && parsed.auto_converge && parsed.downtime_limit_ms == 300);
        assert!(MigrateParams {
            downtime_target_ms: Some(0),
            ..p.clone()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn switch_over_starts_at_the_downtime_target() {
        let p = MigrateParams::default();
        assert_eq!(p.initial_downtime_limit(), DEFAULT_DOWNTIME_TARGET_MS);
        // No settling: no target, a target at or above the limit, post-copy.
        for q in [
            MigrateParams {
                downtime_target_ms: None,
                ..p.clone()
            },
            MigrateParams {
                downtime_target_ms: Some(300),
                ..p.clone()
            },
            MigrateParams {
                downtime_target_ms: Some(500),
                ..p.clone()
            },
            MigrateParams {
                postcopy: true,
                ..p.clone()
            },
        ] {
            assert_eq!(q.initial_downtime_limit(), 300, "{q:?}");
        }
        // A peer without the field gets the policy's default.
        let parsed: MigrateParams = serde_json::from_str(r#"{"downtime_limit_ms": 50}"#).unwrap();
        assert_eq!(parsed.initial_downtime_limit(), DEFAULT_DOWNTIME_TARGET_MS);
        let ms = Duration::from_millis;
        assert_eq!(settle_budget(ms(60), 0, 0), ms(50));
        assert_eq!(settle_budget(ms(600), 0, 0), ms(200));
        assert_eq!(settle_budget(ms(60_000), 0, 0), ms(1000));
        // 60 MiB left after a 250 ms bulk pass, at 600 MiB/s: 100 ms to send
        // it again, so 150 ms rather than 83.
        assert_eq!(settle_budget(ms(250), 60 << 20, 600 << 20), ms(150));
        // Little left: a third of the bulk pass.
        assert_eq!(settle_budget(ms(300), 6 << 20, 600 << 20), ms(100));
        assert_eq!(settle_budget(ms(300), 6 << 30, 1 << 20), ms(1000));
    }

    #[test]
    fn progress_summary() {
        let p = MigrationProgress {
            remaining: 64 << 20,
            rate: 32 << 20,
            dirty_sync_count: 3,
            cpu_throttle_percent: 40,
            ..Default::default()
        };
        assert_eq!(
            p.summary(),
            "64 MiB remaining (32 MiB/s), pass 3 (40% CPU throttle)"
        );
    }

    #[test]
    fn statuses() {
        for s in [
            "setup",
            "active",
            "device",
            "postcopy-active",
            "postcopy-paused",
            "cancelling",
        ] {
            assert!(in_progress(s), "{s}");
        }
        for s in ["none", "completed", "failed", "cancelled"] {
            assert!(!in_progress(s), "{s}");
        }
    }
}
