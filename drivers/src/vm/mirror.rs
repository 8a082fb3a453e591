//! Copying a running VM's disk to the target while the guest runs: the
//! target's QEMU exports its (empty, same-size) disk over NBD, the source's
//! QEMU attaches that export as a block node and mirrors its disk into it.
//! ferry provides one unix socket path on each side and relays the bytes
//! between them (the daemon: over the migration's `fs` websocket).
//!
//! ```text
//!  source member                         relay                 target member
//!  ─────────────                         ─────                 ─────────────
//!  disk_size(spec) ─────────────── (control channel) ────────▶ prepare_mirror_target(spec, size)
//!                                                               migrate_incoming(.., block_mirror)
//!                                                               IncomingVm::start_nbd_export(T)
//!                                                                 nbd-server-start unix:T
//!                                                                 block-export-add (writable)
//!  mirror_start(spec, S)              S ⇄ (websocket) ⇄ T
//!    blockdev-add nbd unix:S export ferry-disk
//!    blockdev-mirror sync=full (auto-dismiss off)
//!  mirror_wait_ready(progress)  ── query-block-jobs: offset/len, until READY
//!  (guest writes are now mirrored as they happen)
//!  migrate_outgoing(.., block_mirror)                          IncomingVm::wait()
//!    pause-before-switchover on; RAM pre-copy
//!    status pre-switchover (guest paused):
//!      block-job-cancel (soft: a READY mirror completes
//!      without pivoting: the target holds the same data)
//!      wait concluded, job-dismiss
//!      migrate-continue pre-switchover ────── device state ───▶ completed, guest runs
//!    blockdev-del the NBD node                                  nbd-server-stop
//! ```
//!
//! Failure semantics (the source's disk is never written by any of this):
//! - before the RAM migration ([`VmDriver::mirror_wait_ready`] fails or is
//!   cancelled, or the caller gives up and calls [`VmDriver::mirror_cancel`]):
//!   the block job is force-cancelled and dismissed, the NBD node removed;
//!   the guest never stopped running on the source.
//! - during pre-copy (mirror error, stream error, cancel, target gone): the
//!   migration is cancelled, the guest continues on the source (`cont` if
//!   needed), then the block job and the NBD node are removed as above.
//! - the target QEMU is killed by the usual incoming-migration cleanup and
//!   its NBD socket file removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::qemu::{self, VmFiles};
use super::qmp::{Qmp, QmpEvent};
use super::VmDriver;
use crate::{DriverError, InstanceSpec, OpCtx};

/// Job id of the mirror in the source QEMU.
pub const MIRROR_JOB: &str = "ferry-mirror";
/// Node name of the NBD client (the mirror's target) in the source QEMU.
pub const MIRROR_NODE: &str = "ferry-mirror-target";
/// Export name (and export id) of the disk in the target QEMU's NBD server.
pub const NBD_EXPORT: &str = "ferry-disk";

const QMP_CONNECT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A mirror whose offset does not move for this long is given up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the mirror to drain at switchover (guest paused).
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How to mirror. Part of the negotiated plan (serde, defaults = unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MirrorParams {
    /// Bytes/s for the bulk copy; `None` = unlimited. Guest writes after
    /// READY are mirrored as they come.
    pub max_bandwidth: Option<u64>,
}

/// Progress of the bulk copy, reported once a second and at READY.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MirrorProgress {
    /// The block job's status (`running`, `ready`, ...).
    pub status: String,
    /// Bytes of the disk copied (or known to need no copy) so far.
    pub done: u64,
    /// Bytes to copy (grows when the guest re-dirties copied areas).
    pub total: u64,
    /// Bytes/s over the last report interval.
    pub rate: u64,
    pub ready: bool,
    pub elapsed: Duration,
}

impl MirrorProgress {
    /// "disk: X of Y MiB (Z MiB/s)".
    pub fn summary(&self) -> String {
        let mut s = format!(
            "disk: {} of {} MiB ({} MiB/s)",
            self.done >> 20,
            self.total >> 20,
            self.rate >> 20
        );
        if self.ready {
            s.push_str(", in sync");
        }
        s
    }
}

/// A mirror running in the source QEMU (the job lives in QEMU: this is its
/// description, no connection is held).
#[derive(Debug, Clone)]
pub struct MirrorJob {
    pub job_id: String,
    /// The source disk's block node.
    pub source_node: String,
    /// The NBD client node the disk is mirrored into.
    pub target_node: String,
    /// Where the source QEMU connected (ferry's relay).
    pub socket: PathBuf,
    pub disk_size: u64,
    pub started: Instant,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockJobInfo {
    pub id: String,
    pub kind: String,
    /// Job status (`running`, `ready`, `concluded`, ...).
    pub status: String,
    pub ready: bool,
    pub offset: u64,
    pub len: u64,
    pub error: Option<String>,
}

impl BlockJobInfo {
    pub fn from_json(v: &Value) -> BlockJobInfo {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        BlockJobInfo {
            id: s("device").unwrap_or_default(),
            kind: s("type").unwrap_or_default(),
            status: s("status").unwrap_or_default(),
            ready: v.get("ready").and_then(Value::as_bool).unwrap_or(false),
            offset: u("offset"),
            len: u("len"),
            error: s("error"),
        }
    }

    fn ended(&self) -> bool {
        matches!(self.status.as_str(), "concluded" | "null" | "aborting")
    }
}

fn mirror_error(detail: String) -> DriverError {
    DriverError::Command {
        program: "QEMU block mirror".into(),
        detail,
    }
}

/// All block jobs of a QEMU.
pub async fn block_jobs(qmp: &mut Qmp) -> Result<Vec<BlockJobInfo>, DriverError> {
    let v = qmp.execute_raw("query-block-jobs", json!({})).await?;
    Ok(v.as_array()
        .map(|a| a.iter().map(BlockJobInfo::from_json).collect())
        .unwrap_or_default())
}

async fn our_job(qmp: &mut Qmp) -> Result<Option<BlockJobInfo>, DriverError> {
    Ok(block_jobs(qmp)
        .await?
        .into_iter()
        .find(|j| j.id == MIRROR_JOB))
}

/// The block node of the VM's disk (the `-drive` whose file is `disk`).
async fn disk_node(qmp: &mut Qmp, disk: &Path) -> Result<String, DriverError> {
    let v = qmp.execute_raw("query-block", json!({})).await?;
    let want = disk.to_string_lossy();
    let inserted: Vec<&Value> = v
        .as_array()
        .map(|a| a.iter().filter_map(|b| b.get("inserted")).collect())
        .unwrap_or_default();
    let node = |i: &Value| {
        i.get("node-name")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    inserted
        .iter()
        .find(|i| i.get("file").and_then(Value::as_str) == Some(&*want))
        .and_then(|i| node(i))
        .or_else(|| (inserted.len() == 1).then(|| node(inserted[0])).flatten())
        .ok_or_else(|| {
            DriverError::WrongState(format!(
                "QEMU has no block device for the disk {}",
                disk.display()
            ))
        })
}

fn check_socket_path(p: &Path) -> Result<(), DriverError> {
    if p.as_os_str().len() >= 108 {
        return Err(DriverError::InvalidConfig(format!(
            "NBD socket path {} is too long for a unix socket (max 107 bytes)",
            p.display()
        )));
    }
    Ok(())
}

fn is_ours(ev: &QmpEvent) -> bool {
    ev.data.get("device").and_then(Value::as_str) == Some(MIRROR_JOB)
        || ev.data.get("id").and_then(Value::as_str) == Some(MIRROR_JOB)
}

/// Whether an event means the mirror broke (before switchover, any end of
/// the job is a failure: a mirror never ends by itself).
pub(super) fn event_failure(ev: &QmpEvent) -> Option<String> {
    if !is_ours(ev) {
        return None;
    }
    match ev.name.as_str() {
        "BLOCK_JOB_ERROR" => Some(format!(
            "I/O error on the mirror's {} ({})",
            ev.data
                .get("operation")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            ev.data.get("action").and_then(Value::as_str).unwrap_or("?")
        )),
        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => Some(
            ev.data
                .get("error")
                .and_then(Value::as_str)
                .map(|e| format!("the mirror ended: {e}"))
                .unwrap_or_else(|| format!("the mirror ended ({})", ev.name)),
        ),
        _ => None,
    }
}

/// Before the RAM migration: a READY mirror must exist.
pub(super) async fn check_ready(qmp: &mut Qmp) -> Result<(), DriverError> {
    match our_job(qmp).await? {
        Some(j) if j.ready && !j.ended() => Ok(()),
        Some(j) => Err(DriverError::WrongState(format!(
            "the disk mirror is not in sync (job {}: {}{}): wait for it (mirror_wait_ready) before the live migration",
            j.id,
            j.status,
            j.error.map(|e| format!(", {e}")).unwrap_or_default()
        ))),
        None => Err(DriverError::WrongState(
            "block_mirror is set but the VM has no disk mirror: start one (mirror_start) before the live migration"
                .into(),
        )),
    }
}

/// At `pre-switchover` (guest paused): let the READY mirror drain and end
/// without pivoting (soft `block-job-cancel`), then dismiss it. Returns how
/// long it took (part of the downtime). It wakes on QEMU's events (the job
/// announces each state it goes through) rather than sleeping between
/// queries; every event it takes is pushed to `seen` for the caller (the
/// source's STOP among them).
pub(super) async fn complete_for_switchover(
    qmp: &mut Qmp,
    seen: &mut Vec<QmpEvent>,
) -> Result<Duration, DriverError> {
    let t = Instant::now();
    check_ready(qmp).await?;
    qmp.execute_raw(
        "block-job-cancel",
        json!({"device": MIRROR_JOB, "force": false}),
    )
    .await?;
    loop {
        match our_job(qmp).await? {
            None => break,
            Some(j) if j.status == "concluded" => {
                if let Some(e) = j.error {
                    return Err(mirror_error(format!(
                        "completing the disk mirror at switchover failed: {e}"
                    )));
                }
                let _ = qmp
                    .execute_raw("job-dismiss", json!({"id": MIRROR_JOB}))
                    .await;
                break;
            }
            Some(_) if t.elapsed() >= SWITCHOVER_TIMEOUT => {
                return Err(DriverError::Timeout(format!(
                    "the disk mirror did not finish within {SWITCHOVER_TIMEOUT:?} at switchover"
                )))
            }
            Some(_) => wait_job_step(qmp, seen).await,
        }
    }
    tracing::debug!("disk mirror completed at switchover in {:?}", t.elapsed());
    Ok(t.elapsed())
}

/// Waits for the mirror job's next step towards its end (QEMU's
/// `JOB_STATUS_CHANGE` to waiting, pending, concluded, aborting or null, or
/// a `BLOCK_JOB_*` event), at most [`STEP_FALLBACK`]. Other events (the
/// source's STOP, `MIGRATION`, the job's earlier states still queued) go to
/// `seen` without waking the caller: each wake-up costs a QMP query.
async fn wait_job_step(qmp: &mut Qmp, seen: &mut Vec<QmpEvent>) {
    let deadline = Instant::now() + STEP_FALLBACK;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(ev) = qmp.next_event(left).await else {
            return;
        };
        let step = is_ours(&ev) && ending_step(&ev);
        seen.push(ev);
        if step {
            return;
        }
    }
}

/// The longest wait for a mirror job's event before querying it again.
const STEP_FALLBACK: Duration = Duration::from_millis(5);

fn ending_step(ev: &QmpEvent) -> bool {
    match ev.name.as_str() {
        "JOB_STATUS_CHANGE" => matches!(
            ev.data.get("status").and_then(Value::as_str),
            Some("waiting" | "pending" | "concluded" | "aborting" | "null")
        ),
        name => name.starts_with("BLOCK_JOB_"),
    }
}

/// Remove the mirror from the source QEMU: force-cancel and dismiss the job
/// if any, then delete the NBD node if any. The source disk is untouched.
pub(super) async fn cleanup_source(qmp: &mut Qmp) -> Result<(), DriverError> {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    let mut cancel_sent = false;
    while let Some(j) = our_job(qmp).await? {
        if j.status == "concluded" {
            qmp.execute_raw("job-dismiss", json!({"id": MIRROR_JOB}))
                .await?;
            continue;
        }
        if !cancel_sent && j.status != "aborting" {
            if let Err(e) = qmp
                .execute_raw(
                    "block-job-cancel",
                    json!({"device": MIRROR_JOB, "force": true}),
                )
                .await
            {
                tracing::warn!("cancelling the disk mirror: {e}");
            }
            cancel_sent = true;
        }
        if Instant::now() >= deadline {
            return Err(DriverError::Timeout(format!(
                "the disk mirror job did not end within {CLEANUP_TIMEOUT:?} after a forced cancel (status {})",
                j.status
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({}))
        .await?;
    let present = nodes.as_array().is_some_and(|a| {
        a.iter()
            .any(|n| n.get("node-name").and_then(Value::as_str) == Some(MIRROR_NODE))
    });
    if present {
        qmp.execute_raw("blockdev-del", json!({"node-name": MIRROR_NODE}))
            .await?;
    }
    Ok(())
}

/// Target side: serve the VM's disk, writable, on the unix socket `socket`.
pub(super) async fn start_nbd_export(
    qmp: &mut Qmp,
    disk: &Path,
    socket: &Path,
) -> Result<(), DriverError> {
    check_socket_path(socket)?;
    let node = disk_node(qmp, disk).await?;
    let _ = std::fs::remove_file(socket);
    qmp.execute_raw(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket.to_string_lossy()}}}),
    )
    .await?;
    let export = json!({
        "type": "nbd",
        "id": NBD_EXPORT,
        "node-name": node,
        "name": NBD_EXPORT,
        "writable": true,
    });
    if let Err(e) = qmp.execute_raw("block-export-add", export).await {
        let _ = qmp.execute_raw("nbd-server-stop", json!({})).await;
        let _ = std::fs::remove_file(socket);
        return Err(e);
    }
    tracing::debug!("NBD export {NBD_EXPORT} of {node} on {}", socket.display());
    Ok(())
}

/// Target side: end the NBD server (and with it the export).
pub(super) async fn stop_nbd_export(qmp: &mut Qmp) -> Result<(), DriverError> {
    qmp.execute_raw("nbd-server-stop", json!({}))
        .await
        .map(|_| ())
}

impl VmDriver {
    /// Size of the VM's disk in bytes (the target prepares one as large).
    pub fn disk_size(&self, spec: &InstanceSpec) -> Result<u64, DriverError> {
        let disk = VmFiles::of(spec).disk;
        std::fs::metadata(&disk)
            .map(|m| m.len())
            .map_err(DriverError::io(format!("stat {}", disk.display())))
    }

    /// Target side, before [`migrate_incoming`](Self::migrate_incoming):
    /// create an empty (sparse) disk of `size` bytes for the mirror to fill.
    /// Refuses to replace an existing disk. Not flushed to stable storage:
    /// that is the caller's, once the mirror is complete.
    pub fn prepare_mirror_target(&self, spec: &InstanceSpec, size: u64) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        if let Some(pid) = qemu::running_pid(&f) {
            return Err(DriverError::WrongState(format!(
                "VM {} already runs on this member (QEMU pid {pid})",
                spec.name
            )));
        }
        if size == 0 || !size.is_multiple_of(512) {
            return Err(DriverError::InvalidConfig(format!(
                "disk size {size}: must be a positive multiple of 512 bytes"
            )));
        }
        let io = |what: &str| DriverError::io(format!("{what} {}", f.disk.display()));
        std::fs::create_dir_all(&spec.paths.volume).map_err(DriverError::io(format!(
            "create {}",
            spec.paths.volume.display()
        )))?;
        let file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&f.disk)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DriverError::WrongState(format!(
                    "VM {} already has a disk at {} on this member: delete it before moving the VM here",
                    spec.name,
                    f.disk.display()
                )))
            }
            Err(e) => return Err(io("create")(e)),
        };
        // Not synced here: the mirror then writes it, and the caller makes
        // the finished disk durable (ferry fsyncs it and its directory
        // once the guest runs); an fsync of the empty file cost ≈15 ms.
        file.set_len(size).map_err(io("size"))
    }

    /// Source side: connect the running VM's QEMU to the target's NBD export
    /// through `nbd_socket` (ferry's relay listens there) and start mirroring
    /// the disk. Returns once the job runs; [`mirror_wait_ready`](Self::mirror_wait_ready)
    /// follows it. On error nothing is left in QEMU.
    pub async fn mirror_start(
        &self,
        spec: &InstanceSpec,
        nbd_socket: &Path,
        params: &MirrorParams,
        ctx: &OpCtx,
    ) -> Result<MirrorJob, DriverError> {
        check_socket_path(nbd_socket)?;
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Err(DriverError::WrongState(format!(
                "VM {} is not running: nothing to mirror",
                spec.name
            )));
        }
        let disk_size = self.disk_size(spec)?;
        ctx.check_cancelled("disk mirror")?;
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        if let Some(j) = our_job(&mut qmp).await? {
            return Err(DriverError::WrongState(format!(
                "VM {} already has a disk mirror ({}): cancel it first",
                spec.name, j.status
            )));
        }
        let source_node = disk_node(&mut qmp, &f.disk).await?;
        let nbd = json!({
            "driver": "nbd",
            "node-name": MIRROR_NODE,
            "server": {"type": "unix", "path": nbd_socket.to_string_lossy()},
            "export": NBD_EXPORT,
        });
        qmp.execute_raw("blockdev-add", nbd).await.map_err(|e| {
            mirror_error(format!(
                "connecting to the target's disk export through {}: {e}",
                nbd_socket.display()
            ))
        })?;
        let mut args = json!({
            "job-id": MIRROR_JOB,
            "device": source_node,
            "target": MIRROR_NODE,
            "sync": "full",
            "auto-dismiss": false,
        });
        if let Some(b) = params.max_bandwidth {
            args["speed"] = json!(b);
        }
        if let Err(e) = qmp.execute_raw("blockdev-mirror", args).await {
            let _ = cleanup_source(&mut qmp).await;
            return Err(e);
        }
        ctx.progress("stage", "mirroring the disk");
        Ok(MirrorJob {
            job_id: MIRROR_JOB.into(),
            source_node,
            target_node: MIRROR_NODE.into(),
            socket: nbd_socket.to_path_buf(),
            disk_size,
            started: Instant::now(),
        })
    }

    /// Follow the mirror until it is in sync (READY), reporting progress.
    /// On failure, stall or cancel the mirror is removed (see the module
    /// doc) and the VM runs on unchanged.
    pub async fn mirror_wait_ready(
        &self,
        spec: &InstanceSpec,
        job: &MirrorJob,
        progress: impl Fn(MirrorProgress) + Send,
        ctx: &OpCtx,
    ) -> Result<MirrorProgress, DriverError> {
        let r = wait_ready(spec, job, &progress, ctx).await;
        if r.is_err() {
            if let Err(e) = self.mirror_cancel(spec).await {
                tracing::warn!("removing the failed disk mirror of {}: {e}", spec.name);
            }
        }
        r
    }

    /// [`mirror_start`](Self::mirror_start) then [`mirror_wait_ready`](Self::mirror_wait_ready).
    pub async fn mirror(
        &self,
        spec: &InstanceSpec,
        nbd_socket: &Path,
        params: &MirrorParams,
        progress: impl Fn(MirrorProgress) + Send,
        ctx: &OpCtx,
    ) -> Result<MirrorJob, DriverError> {
        let job = self.mirror_start(spec, nbd_socket, params, ctx).await?;
        self.mirror_wait_ready(spec, &job, progress, ctx).await?;
        Ok(job)
    }

    /// Abandon a mirror (the move failed before or without the RAM
    /// migration): force-cancel the job and remove the NBD node. No-op when
    /// there is none or the VM does not run.
    pub async fn mirror_cancel(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Ok(());
        }
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        cleanup_source(&mut qmp).await
    }

    /// The block jobs of the VM's QEMU (empty when it does not run).
    pub async fn block_jobs(&self, spec: &InstanceSpec) -> Result<Vec<BlockJobInfo>, DriverError> {
        let f = VmFiles::of(spec);
        if qemu::running_pid(&f).is_none() {
            return Ok(Vec::new());
        }
        let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
        block_jobs(&mut qmp).await
    }
}

async fn wait_ready(
    spec: &InstanceSpec,
    job: &MirrorJob,
    progress: &(impl Fn(MirrorProgress) + Send),
    ctx: &OpCtx,
) -> Result<MirrorProgress, DriverError> {
    let f = VmFiles::of(spec);
    let mut qmp = Qmp::connect(&f.qmp, QMP_CONNECT).await?;
    let mut event_error: Option<String> = None;
    let mut last_report = job.started;
    let mut last_reported = 0u64;
    let (mut last_offset, mut last_change) = (0u64, Instant::now());
    let mut reported_once = false;
    loop {
        for ev in qmp.drain_events() {
            if let Some(e) = event_failure(&ev) {
                event_error.get_or_insert(e);
            }
        }
        let j = our_job(&mut qmp).await?.ok_or_else(|| {
            mirror_error(format!(
                "the disk mirror job disappeared{}",
                event_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ))
        })?;
        if j.ended() {
            let why = j.error.or(event_error).unwrap_or_else(|| j.status.clone());
            return Err(mirror_error(format!(
                "mirroring the disk to the target through {} failed: {why}",
                job.socket.display()
            )));
        }
        if j.offset != last_offset {
            (last_offset, last_change) = (j.offset, Instant::now());
        }
        let now = Instant::now();
        if j.ready || now.duration_since(last_report) >= REPORT_EVERY || !reported_once {
            let secs = now.duration_since(last_report).as_secs_f64().max(1e-3);
            let p = MirrorProgress {
                status: j.status.clone(),
                done: j.offset,
                total: j.len,
                rate: (j.offset.saturating_sub(last_reported) as f64 / secs) as u64,
                ready: j.ready,
                elapsed: job.started.elapsed(),
            };
            ctx.progress("disk_progress", &p.summary());
            progress(p.clone());
            (last_report, last_reported, reported_once) = (now, j.offset, true);
            if j.ready {
                return Ok(p);
            }
        }
        if ctx.is_cancelled() {
            return Err(DriverError::Cancelled(
                "disk mirror: cancelled, the VM keeps running on the source".into(),
            ));
        }
        if last_change.elapsed() >= STALL_TIMEOUT {
            return Err(DriverError::Timeout(format!(
                "disk mirror: no progress for {STALL_TIMEOUT:?}; cancelled, the VM keeps running on the source"
            )));
        }
        // Wake up early on an event (BLOCK_JOB_READY, errors).
        if let Some(ev) = qmp.next_event(POLL).await {
            if let Some(e) = event_failure(&ev) {
                event_error.get_or_insert(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_info_and_events() {
        let j = BlockJobInfo::from_json(&json!({
            "device": "ferry-mirror", "type": "mirror", "status": "ready", "ready": true,
            "offset": 1048576, "len": 1048576, "busy": false, "future-field": {"x": 1}
        }));
        assert_eq!(
            (j.id.as_str(), j.ready, j.offset, j.ended()),
            ("ferry-mirror", true, 1 << 20, false)
        );
        let c = BlockJobInfo::from_json(
            &json!({"device": "ferry-mirror", "status": "concluded", "error": "EIO"}),
        );
        assert!(c.ended() && c.error.as_deref() == Some("EIO"));
        let ev = |name: &str, data: Value| QmpEvent {
            name: name.into(),
            data,
            timestamp_us: 0,
        };
        assert!(event_failure(&ev(
            "BLOCK_JOB_ERROR",
            json!({"device": "ferry-mirror", "operation": "write", "action": "report"})
        ))
        .unwrap()
        .contains("write"));
        assert!(event_failure(&ev(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "ferry-mirror", "error": "Input/output error"})
        ))
        .unwrap()
        .contains("Input/output"));
        assert!(event_failure(&ev("BLOCK_JOB_READY", json!({"device": "ferry-mirror"}))).is_none());
        assert!(event_failure(&ev("BLOCK_JOB_COMPLETED", json!({"device": "other"}))).is_none());
        // What wakes the wait at switchover: the job's steps towards its end.
        let status = |s: &str| {
            ev(
                "JOB_STATUS_CHANGE",
                json!({"id": "ferry-mirror", "status": s}),
            )
        };
        for s in ["waiting", "pending", "concluded", "aborting", "null"] {
            assert!(ending_step(&status(s)), "{s}");
        }
        for s in ["ready", "standby", "running"] {
            assert!(!ending_step(&status(s)), "{s}");
        }
        assert!(ending_step(&ev(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "ferry-mirror"})
        )));
        assert!(!ending_step(&ev("STOP", Value::Null)));
        assert!(!ending_step(&ev(
            "MIGRATION",
            json!({"status": "pre-switchover"})
        )));
    }

    #[test]
    fn progress_summary_and_params() {
        let p = MirrorProgress {
            done: 32 << 20,
            total: 64 << 20,
            rate: 16 << 20,
            ..Default::default()
        };
        assert_eq!(p.summary(), "disk: 32 of 64 MiB (16 MiB/s)");
        let m: MirrorParams = serde_json::from_str("{}").unwrap();
        assert_eq!(m.max_bandwidth, None);
    }
}
