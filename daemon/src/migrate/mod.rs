//! Moving an instance between members (`ferry move c1 --target m2`).
//!
//! The source member owns the move: it takes the instance's lease, creates
//! the operation, mints one random 256-bit secret per channel (control,
//! state, fs) and asks the target (`/internal/migration/sink`) to dial
//! `/1.0/operations/<id>/websocket?secret=…` three times over member mTLS.
//! Secrets are single-use and compared in constant time; unlike Incus they
//! are not published in the operation's metadata (only the target needs
//! them). The protocol itself (`ferry-migration`) runs over those channels;
//! see `source.rs` and `target.rs`, and doc/migration-protocol.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_db::InstanceRecord;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub mod container;
mod multifd;
mod predump;
pub mod progress;
pub mod source;
pub mod target;
pub mod vm;
pub mod ws;

use ws::WsPipe;

pub const SINK_PATH: &str = "/internal/migration/sink";
/// How long the source waits for the target to dial the channels.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Secrets {
    pub control: String,
    pub state: String,
    pub fs: String,
    /// More state channels, for QEMU's multifd (a target that does not
    /// know them ignores them, and the plan then leaves multifd out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_extra: Vec<String>,
}

/// A random 256-bit websocket secret (64 hex digits).
pub fn new_secret() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

impl Secrets {
    /// The three channels' secrets and `extra` more state channels'.
    pub fn new(extra: usize) -> Secrets {
        let s = new_secret;
        Secrets {
            control: s(),
            state: s(),
            fs: s(),
            state_extra: (0..extra).map(|_| s()).collect(),
        }
    }
}

/// The source's request to the target: become the sink of this move.
#[derive(Debug, Serialize, Deserialize)]
pub struct SinkRequest {
    pub record: InstanceRecord,
    /// The source member's name and address.
    pub source_member: String,
    pub source_address: String,
    pub operation: String,
    pub secrets: Secrets,
    /// Start the instance on the target after a stateless transfer.
    pub start_after: bool,
    /// A VM's launch record (machine, memory, vCPUs) for a live move.
    #[serde(default)]
    pub launch: Option<serde_json::Value>,
    /// A VM's disk size (the target creates the disk a block mirror fills).
    #[serde(default)]
    pub disk_size: Option<u64>,
    /// The source's offer leads with a live VM move whose disk needs nothing
    /// copied before the target's QEMU starts (block mirror, shared pool):
    /// a target that can take it starts its QEMU while the move is still
    /// being negotiated (doc/migration-protocol.md).
    #[serde(default)]
    pub early_launch: bool,
}

impl SinkRequest {
    /// The instance is on the shared pool: its volume is the source's, not
    /// the target's to create or remove.
    pub fn on_shared_pool(&self) -> bool {
        self.record.storage_pool == crate::settings::SHARED_POOL
    }
}

/// A connected socketpair: one end for CRIU/QEMU (an fd), one for our relay.
pub(super) fn socketpair() -> Result<(std::os::fd::OwnedFd, tokio::net::UnixStream), String> {
    let (theirs, ours) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
    ours.set_nonblocking(true).map_err(|e| e.to_string())?;
    let ours = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
    Ok((std::os::fd::OwnedFd::from(theirs), ours))
}

/// The send buffer of each end of a QEMU migration stream's socketpair.
/// With the kernel's default (about 208 KiB) QEMU's migration thread and
/// ferry's relay (and, on the target, the relay and QEMU's loader) take
/// turns in small steps: each waits for the other whenever the buffer is
/// full or empty, and on a busy member those gaps are CPU the guest's vCPUs
/// take, to dirty again what was just sent. 2 MiB lets each side run longer
/// per turn. It adds at most this much, per socketpair, to what is still in
/// flight at switch-over (a few ms at the rates measured here).
/// `FERRY_STREAM_SNDBUF_KIB` overrides it (0: the kernel's default), for
/// comparisons.
const QEMU_STREAM_SNDBUF: usize = 2 << 20;

/// [`socketpair`] for a QEMU migration stream (see [`QEMU_STREAM_SNDBUF`]).
pub(super) fn qemu_stream_socketpair(
) -> Result<(std::os::fd::OwnedFd, tokio::net::UnixStream), String> {
    let (theirs, ours) = socketpair()?;
    let size = std::env::var("FERRY_STREAM_SNDBUF_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(QEMU_STREAM_SNDBUF, |kib| kib << 10);
    if size > 0 {
        for r in [set_send_buffer(&theirs, size), set_send_buffer(&ours, size)] {
            if let Err(e) = r {
                tracing::debug!("migration stream send buffer of {size} bytes: {e}");
            }
        }
    }
    Ok((theirs, ours))
}

/// SO_SNDBUFFORCE (root: above `net.core.wmem_max`), else SO_SNDBUF. The
/// kernel reports (and accounts) twice the value, for its bookkeeping. For
/// QEMU's stream and CRIU's page socket.
pub(super) fn set_send_buffer(fd: &impl std::os::fd::AsFd, bytes: usize) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(fd, sockopt::SndBufForce, &bytes)
        .or_else(|_| setsockopt(fd, sockopt::SndBuf, &bytes))
}

/// Relay a local socket (CRIU's page-server / lazy-pages end, QEMU's
/// migration stream) or ferry's page sink and the state channel, both ways,
/// until both directions ended. Uncompressed and `zstd_frames` plans take the direct path: each
/// read from the socket becomes one websocket frame (with `zstd_frames`
/// compressed on its own when that pays off, see `ferry_migration::frames`)
/// and each frame is written to the socket — no intermediate byte stream.
/// With `zstd_frames_acked` each side also acknowledges what it wrote
/// locally and a sender keeps at most `frames::WINDOW` bytes unacknowledged
/// ([`AckWindow`]). A `zstd` plan goes through the zstd byte channel. `limit` (bytes/s) paces
/// what crosses the link (a container move's `--bandwidth`; QEMU paces its
/// own stream).
pub(super) async fn relay_state<L>(
    local: L,
    pipe: ws::WsPipe,
    compression: ferry_migration::Compression,
    limit: Option<u64>,
) -> Result<StateStats, String>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use ferry_migration::{Compression, FrameDecoder, FrameEncoder};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chunk = limit.map_or(ws::CHUNK, |l| (l as usize / 10).clamp(4096, ws::CHUNK));
    let (mut r, mut w) = tokio::io::split(local);
    let read_err = |total: u64, e: std::io::Error| {
        format!("reading the local stream after {total} bytes: {e}")
    };
    let write_err = |total: u64, e: std::io::Error| {
        format!("writing the local stream after {total} bytes: {e}")
    };
    if compression == Compression::Zstd || compression == Compression::Unknown {
        let stream = ferry_migration::ByteChannel::new(ws::into_stream(pipe), compression)
            .map_err(|e| e.to_string())?;
        let counters = stream.counters();
        let (mut cr, mut cw) = tokio::io::split(stream);
        let up = async {
            let (mut total, mut pace) = (0u64, Pace::new(limit));
            let mut buf = vec![0u8; chunk];
            loop {
                let n = r.read(&mut buf).await.map_err(|e| read_err(total, e))?;
                if n == 0 {
                    cw.shutdown().await.map_err(|e| e.to_string())?;
                    return Ok(total);
                }
                cw.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
                cw.flush().await.map_err(|e| e.to_string())?;
                total += n as u64;
                pace.after(total).await;
            }
        };
        let down = async {
            let total = tokio::io::copy(&mut cr, &mut w)
                .await
                .map_err(|e| write_err(0, e))?;
            let _ = w.shutdown().await;
            Ok::<u64, String>(total)
        };
        let (sent, received) = tokio::try_join!(up, down)?;
        return Ok(StateStats {
            sent,
            received,
            sent_wire: counters.sent_wire.get(),
        });
    }
    let framed = matches!(
        compression,
        Compression::ZstdFrames | Compression::ZstdFramesAcked
    );
    let window =
        (compression == Compression::ZstdFramesAcked).then(|| Arc::new(AckWindow::default()));
    let (mut enc, mut dec) = if framed {
        let e = |e: ferry_migration::FrameError| e.to_string();
        (
            Some(FrameEncoder::new().map_err(e)?),
            Some(FrameDecoder::new().map_err(e)?),
        )
    } else {
        (None, None)
    };
    let ws::WsPipe { tx, mut rx } = pipe;
    let ack_tx = tx.clone();
    let up_window = window.clone();
    // Bytes on the link so far: the frames' as counted by the encoder; without
    // one, the payload itself.
    let wire = |enc: &Option<FrameEncoder>, total: u64| {
        enc.as_ref().map_or(total, |e| e.stats().wire_bytes)
    };
    let up = async move {
        let (mut total, mut pace) = (0u64, Pace::new(limit));
        loop {
            let mut buf = Vec::with_capacity(chunk + 1);
            if framed {
                buf.push(ferry_migration::frames::TAG_RAW);
            }
            let n = r.read_buf(&mut buf).await.map_err(|e| read_err(total, e))?;
            // An empty frame ends this direction (half-close), as EOF did here.
            if n == 0 {
                buf.clear();
            } else if let Some(enc) = enc.as_mut() {
                buf = enc.encode_raw_frame(buf).map_err(|e| e.to_string())?;
            }
            match (&up_window, n) {
                (Some(win), 0) => win.end_ours(),
                (Some(win), _) => win.wait_room(total + n as u64).await?,
                (None, _) => {}
            }
            if tx.send(buf).await.is_err() {
                return Err(format!("the state channel closed after {total} bytes"));
            }
            if n == 0 {
                let s = enc.as_ref().map(|e| e.stats()).unwrap_or_default();
                tracing::debug!(
                    bytes = total,
                    wire = wire(&enc, total),
                    compressed_frames = s.compressed_frames,
                    misses = s.misses,
                    "state relay: local stream ended, sent"
                );
                return Ok((total, wire(&enc, total)));
            }
            total += n as u64;
            pace.after(wire(&enc, total)).await;
        }
    };
    let down = async move {
        let (mut total, mut acked) = (0u64, 0u64);
        while let Some(frame) = rx.recv().await {
            if frame.is_empty() {
                break;
            }
            if let Some(win) = &window {
                let ack = ferry_migration::frames::parse_ack(&frame)
                    .map_err(|e| format!("after {total} bytes from the peer: {e}"))?;
                if let Some(n) = ack {
                    win.acked(n);
                    continue;
                }
            }
            let data = match dec.as_mut() {
                Some(d) => d
                    .decode(&frame)
                    .map_err(|e| format!("after {total} bytes from the peer: {e}"))?,
                None => &frame[..],
            };
            w.write_all(data).await.map_err(|e| write_err(total, e))?;
            total += data.len() as u64;
            if let Some(win) = &window {
                if total - acked >= ferry_migration::frames::ACK_EVERY && !win.ours_ended() {
                    acked = total;
                    let ack = ferry_migration::frames::ack_frame(total);
                    if ack_tx.send(ack).await.is_err() {
                        return Err(format!("the state channel closed after {total} bytes"));
                    }
                }
            }
        }
        // The peer sends no acks after its end: stop waiting for them.
        if let Some(win) = &window {
            win.end_theirs();
        }
        drop(ack_tx);
        let _ = w.shutdown().await;
        tracing::debug!(
            bytes = total,
            "state relay: peer stream ended, written locally"
        );
        Ok::<u64, String>(total)
    };
    let ((sent, sent_wire), received) = tokio::try_join!(up, down)?;
    Ok(StateStats {
        sent,
        received,
        sent_wire,
    })
}

/// A spawned task that is aborted when this handle is dropped (a plain
/// `JoinHandle` lets the task run on).
pub(super) struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    pub(super) fn new(task: tokio::task::JoinHandle<T>) -> Self {
        AbortOnDrop(Some(task))
    }

    pub(super) fn handle(&mut self) -> &mut tokio::task::JoinHandle<T> {
        self.0.as_mut().expect("present until dropped or detached")
    }

    /// Let the task run on by itself.
    pub(super) fn detach(mut self) -> tokio::task::JoinHandle<T> {
        self.0.take().expect("present until dropped or detached")
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// What a state relay moved: payload bytes each way, and the bytes that
/// crossed the link for `sent` (after compression; empty end frame excluded).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct StateStats {
    pub sent: u64,
    pub received: u64,
    pub sent_wire: u64,
}

impl StateStats {
    /// Operation metadata: `state_bytes` and `state_wire_bytes` (what the
    /// compression saved on the link), `state_return_bytes` (page requests,
    /// QEMU's return path).
    pub(super) fn publish(&self, op: &crate::ops::Op) {
        op.set_meta("state_bytes", serde_json::json!(self.sent));
        op.set_meta("state_wire_bytes", serde_json::json!(self.sent_wire));
        op.set_meta("state_return_bytes", serde_json::json!(self.received));
    }
}

/// A sender's side of `zstd_frames_acked`: how much of what it sent the
/// peer acknowledged, and whether either direction ended.
#[derive(Default)]
pub(super) struct AckWindow {
    acked: AtomicU64,
    ours_ended: AtomicBool,
    theirs_ended: AtomicBool,
    wake: tokio::sync::Notify,
}

impl AckWindow {
    /// Wait until sending up to `upto` payload bytes keeps at most
    /// `frames::WINDOW` unacknowledged. Fails when no ack comes for as long
    /// as the link counts as dead.
    async fn wait_room(&self, upto: u64) -> Result<(), String> {
        use ferry_migration::frames::WINDOW;
        loop {
            let acked = self.acked.load(Ordering::Acquire);
            if upto.saturating_sub(acked) <= WINDOW || self.theirs_ended.load(Ordering::Acquire) {
                return Ok(());
            }
            if tokio::time::timeout(ws::DEAD_AFTER, self.wake.notified())
                .await
                .is_err()
            {
                return Err(format!(
                    "the peer acknowledged {acked} bytes of the state stream and no more for {}s",
                    ws::DEAD_AFTER.as_secs()
                ));
            }
        }
    }

    fn acked(&self, n: u64) {
        self.acked.fetch_max(n, Ordering::AcqRel);
        self.wake.notify_one();
    }

    fn end_ours(&self) {
        self.ours_ended.store(true, Ordering::Release);
    }

    fn ours_ended(&self) -> bool {
        self.ours_ended.load(Ordering::Acquire)
    }

    fn end_theirs(&self) {
        self.theirs_ended.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// Keeps a stream at or under `limit` bytes per second (on average since
/// its start).
struct Pace {
    start: std::time::Instant,
    limit: Option<u64>,
}

impl Pace {
    fn new(limit: Option<u64>) -> Pace {
        Pace {
            start: std::time::Instant::now(),
            limit: limit.filter(|l| *l > 0),
        }
    }

    /// `total` bytes have gone: wait until that is within the limit.
    async fn after(&mut self, total: u64) {
        if let Some(l) = self.limit {
            let due = std::time::Duration::from_secs_f64(total as f64 / l as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A control-channel error as the user sees it; `peer` is "source" or "target".
pub(super) fn peer_error(peer: &'static str) -> impl Fn(ferry_migration::SessionError) -> String {
    use ferry_migration::SessionError as E;
    move |e| match e {
        E::PeerFailed(m) => format!("the {peer} failed: {m}"),
        E::PeerCancelled(r) => format!("the {peer} cancelled the move: {r}"),
        E::Channel(e) => format!("control channel: {e}"),
        e => e.to_string(),
    }
}

/// The plan keeps the volume where it is (a pool both members see).
pub(super) fn is_shared(plan: &ferry_migration::Plan) -> bool {
    matches!(plan.fs, ferry_migration::FsPlan::Shared { .. })
}

/// Remove an instance's member-local files (run dir, logs) but never its
/// volume: for instances on the shared pool, whose volume another member
/// uses. A root still mounted in the run dir is left alone (removing the
/// tree would delete the volume's files through the mount).
pub fn remove_member_files(spec: &ferry_drivers::InstanceSpec) {
    let root = spec.paths.run.join("rootfs");
    match std::fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %root.display(), error = %e, "not removing the run directory: its root mount point is still in use");
            return;
        }
    }
    let _ = std::fs::remove_dir_all(&spec.paths.run);
    let _ = std::fs::remove_dir_all(&spec.paths.logs);
}

/// Websockets the dialled side waits for, by operation id and secret: the
/// migration channels (`WsPipe`) and exec's stdio (raw websockets).
pub struct Pending<T = WsPipe> {
    map: Mutex<HashMap<String, Waiters<T>>>,
}

/// The websockets one operation waits for: (secret, where to deliver it).
type Waiters<T> = Vec<(String, oneshot::Sender<T>)>;

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            map: Mutex::new(HashMap::new()),
        }
    }
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What [`Pending::expect`] returns: control, state and fs, then the extra
/// state channels.
pub type ChannelReceivers = (
    [oneshot::Receiver<WsPipe>; 3],
    Vec<oneshot::Receiver<WsPipe>>,
);

impl Pending<WsPipe> {
    /// Expect the channels for `op`; returns the receivers of the three
    /// in order, then those of the extra state channels.
    pub fn expect(&self, op: &str, secrets: &Secrets) -> ChannelReceivers {
        let mut all = vec![
            secrets.control.as_str(),
            secrets.state.as_str(),
            secrets.fs.as_str(),
        ];
        all.extend(secrets.state_extra.iter().map(String::as_str));
        let mut rx = self.expect_all(op, &all).into_iter();
        let three = [(); 3].map(|_| rx.next().expect("three receivers"));
        (three, rx.collect())
    }
}

impl<T> Pending<T> {
    /// Expect one websocket per secret for `op`; receivers in that order.
    pub fn expect_all(&self, op: &str, secrets: &[&str]) -> Vec<oneshot::Receiver<T>> {
        let (tx, rx): (Vec<_>, Vec<_>) = secrets
            .iter()
            .map(|s| {
                let (tx, rx) = oneshot::channel();
                (((*s).to_string(), tx), rx)
            })
            .unzip();
        self.map.lock().unwrap().insert(op.to_string(), tx);
        rx
    }

    /// Take (single use) the waiter for `secret` of `op`.
    pub fn take(&self, op: &str, secret: &str) -> Option<oneshot::Sender<T>> {
        let mut map = self.map.lock().unwrap();
        let list = map.get_mut(op)?;
        let i = list.iter().position(|(s, _)| ct_eq(s, secret))?;
        Some(list.remove(i).1)
    }

    pub fn forget(&self, op: &str) {
        self.map.lock().unwrap().remove(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn qemu_stream_socketpair_has_the_larger_send_buffer() {
        use nix::sys::socket::{getsockopt, sockopt};
        let (plain, plain_ours) = socketpair().unwrap();
        let (theirs, ours) = qemu_stream_socketpair().unwrap();
        // SAFETY: geteuid(2). Above net.core.wmem_max needs SO_SNDBUFFORCE (root).
        if unsafe { libc::geteuid() } == 0 && std::env::var_os("FERRY_STREAM_SNDBUF_KIB").is_none()
        {
            // The kernel reports twice what was set (its bookkeeping share).
            assert!(getsockopt(&theirs, sockopt::SndBuf).unwrap() >= QEMU_STREAM_SNDBUF);
            assert!(getsockopt(&ours, sockopt::SndBuf).unwrap() >= QEMU_STREAM_SNDBUF);
        }
        assert!(getsockopt(&plain, sockopt::SndBuf).unwrap() < QEMU_STREAM_SNDBUF);
        assert!(getsockopt(&plain_ours, sockopt::SndBuf).unwrap() < QEMU_STREAM_SNDBUF);
    }

    #[test]
    fn secrets_are_single_use_and_exact() {
        let p = Pending::default();
        let s = Secrets::new(2);
        assert_eq!(s.control.len(), 64);
        assert_eq!(s.state_extra.len(), 2);
        let (_rx, extra) = p.expect("op1", &s);
        assert_eq!(extra.len(), 2);
        assert!(p.take("op1", &s.state_extra[1]).is_some());
        assert!(p.take("op1", "nope").is_none());
        assert!(p.take("op2", &s.control).is_none());
        assert!(p.take("op1", &s.control).is_some());
        assert!(p.take("op1", &s.control).is_none(), "a secret works once");
        assert!(p.take("op1", &s.fs).is_some());
    }

    use axum::body::Bytes;
    use ferry_migration::frames::{ACK_EVERY, WINDOW};
    use ferry_migration::Compression;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// One direction of a link whose buffer is as deep as it gets (a
    /// socket's buffer full of small compressed frames): the sender never
    /// waits for the receiver.
    fn deep_link(mut from: mpsc::Receiver<Vec<u8>>, to: mpsc::Sender<Bytes>) {
        let (buf_tx, mut buf_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(f) = from.recv().await {
                let _ = buf_tx.send(f);
            }
        });
        tokio::spawn(async move {
            while let Some(f) = buf_rx.recv().await {
                if to.send(Bytes::from(f)).await.is_err() {
                    return;
                }
            }
        });
    }

    fn linked_pipes() -> (ws::WsPipe, ws::WsPipe) {
        let (a_tx, a_out) = mpsc::channel(8);
        let (b_tx, b_out) = mpsc::channel(8);
        let (a_in, a_rx) = mpsc::channel(8);
        let (b_in, b_rx) = mpsc::channel(8);
        deep_link(a_out, b_in);
        deep_link(b_out, a_in);
        (
            ws::WsPipe { tx: a_tx, rx: a_rx },
            ws::WsPipe { tx: b_tx, rx: b_rx },
        )
    }

    /// 64 MiB of pages holding one byte each (compress ~200:1) from A to a
    /// receiver that stalls after 1 MiB: how far the sender got meanwhile,
    /// then everything must arrive intact.
    async fn sent_while_the_receiver_stalls(compression: Compression) -> u64 {
        const TOTAL: usize = 64 << 20;
        let (pa, pb) = linked_pipes();
        let (a_user, a_local) = tokio::io::duplex(64 << 10);
        let (mut b_user, b_local) = tokio::io::duplex(64 << 10);
        let ra = tokio::spawn(relay_state(a_local, pa, compression, None));
        let rb = tokio::spawn(relay_state(b_local, pb, compression, None));
        let written = Arc::new(AtomicU64::new(0));
        let w = written.clone();
        let (mut a_read, mut a_write) = tokio::io::split(a_user);
        let writer = tokio::spawn(async move {
            let mut page = vec![0u8; 4096];
            for i in 0..TOTAL / 4096 {
                page[0] = (i % 251) as u8 + 1;
                a_write.write_all(&page).await.unwrap();
                w.fetch_add(4096, Ordering::Relaxed);
            }
            a_write.shutdown().await.unwrap();
            // The peer ends its direction without sending anything.
            let mut rest = vec![];
            a_read.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        });
        let mut got = vec![0u8; 1 << 20];
        b_user.read_exact(&mut got).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ahead = written.load(Ordering::Relaxed);
        b_user.shutdown().await.unwrap();
        let mut rest = vec![];
        b_user.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got.len(), TOTAL);
        assert!(got
            .chunks(4096)
            .enumerate()
            .all(|(i, p)| p[0] == (i % 251) as u8 + 1 && p[1..].iter().all(|b| *b == 0)));
        writer.await.unwrap();
        ra.await.unwrap().unwrap();
        rb.await.unwrap().unwrap();
        ahead
    }

    #[tokio::test]
    async fn acknowledged_frames_bound_what_the_link_holds() {
        let acked = sent_while_the_receiver_stalls(Compression::ZstdFramesAcked).await;
        // 1 MiB read + the window + one frame and the local buffers.
        assert!(
            acked <= (1 << 20) + WINDOW + ACK_EVERY + (1 << 20),
            "the sender got {acked} bytes ahead of a stalled receiver"
        );
        // Without acks the deep link takes it all: what the test is about.
        let plain = sent_while_the_receiver_stalls(Compression::ZstdFrames).await;
        assert!(
            plain > 4 * WINDOW,
            "without acks only {plain} bytes went ahead"
        );
    }

    #[tokio::test]
    async fn a_peer_that_ended_its_direction_no_longer_holds_the_window() {
        // B ends its direction at once (like a QEMU that never writes its
        // return path and closes early): A must still send everything.
        let (pa, pb) = linked_pipes();
        let (a_user, a_local) = tokio::io::duplex(64 << 10);
        let (b_user, b_local) = tokio::io::duplex(64 << 10);
        let c = Compression::ZstdFramesAcked;
        let ra = tokio::spawn(relay_state(a_local, pa, c, None));
        let rb = tokio::spawn(relay_state(b_local, pb, c, None));
        let (mut b_read, mut b_write) = tokio::io::split(b_user);
        b_write.shutdown().await.unwrap();
        let (mut a_read, mut a_write) = tokio::io::split(a_user);
        let writer = tokio::spawn(async move {
            let data = vec![7u8; 3 * WINDOW as usize];
            a_write.write_all(&data).await.unwrap();
            a_write.shutdown().await.unwrap();
            let mut rest = vec![];
            a_read.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = vec![];
        tokio::time::timeout(Duration::from_secs(20), b_read.read_to_end(&mut got))
            .await
            .expect("the sender stalled")
            .unwrap();
        assert_eq!(got.len(), 3 * WINDOW as usize);
        writer.await.unwrap();
        ra.await.unwrap().unwrap();
        rb.await.unwrap().unwrap();
    }
}
