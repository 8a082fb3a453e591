//! A QMP client on top of the `qapi` crate, with what qapi lacks:
//!
//! - **fd passing**: [`Qmp::send_fd`] writes one space byte carrying the fd as
//!   SCM_RIGHTS on the raw QMP socket (QEMU's JSON parser skips whitespace and
//!   keeps the fd), then issues `getfd`. The kernel never merges a message
//!   carrying fds with later bytes, so the fd is attached to exactly that
//!   byte. Commands are sent one at a time (`&mut self`), so the byte can't
//!   interleave with a command's JSON.
//! - **events that never break the stream**: qapi's enums are closed, and an
//!   event (or event field value) unknown to its schema would end its decoder.
//!   A line filter under qapi's reader takes every `{"event": ...}` line off
//!   the stream and hands it out as JSON ([`QmpEvent`]); qapi only sees the
//!   greeting and command replies.
//! - **commands whose replies carry enums that grow between QEMU versions**
//!   (`query-status`, `query-migrate`) are issued with raw-JSON reply types
//!   ([`RawQueryStatus`], [`RawQueryMigrate`]); block-layer, NBD and
//!   `migrate-continue` commands go out with JSON arguments and replies by
//!   name ([`Qmp::execute_raw`], [`RAW_COMMANDS`]).
//!
//! One connection per action: QEMU's monitor serves one client at a time.
//! Live migration will reuse this: `migrate-set-capabilities`/`-parameters`
//! (typed qapi commands via [`Qmp::execute`]), events via [`Qmp::next_event`].

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::DriverError;

/// A QMP event as JSON (never fails to parse because of a newer QEMU).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Microseconds since the epoch, from QEMU's timestamp.
    pub timestamp_us: u64,
}

impl QmpEvent {
    /// `data.status` of MIGRATION events ("active", "completed", ...).
    pub fn migration_status(&self) -> Option<&str> {
        (self.name == "MIGRATION")
            .then(|| self.data.get("status").and_then(Value::as_str))
            .flatten()
    }
}

/// Classify one line of QMP output: `Some` for an event.
pub fn parse_event(line: &[u8]) -> Option<QmpEvent> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let name = v.get("event")?.as_str()?.to_string();
    let ts = v.get("timestamp");
    let secs = ts
        .and_then(|t| t.get("seconds"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let usecs = ts
        .and_then(|t| t.get("microseconds"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(QmpEvent {
        name,
        data: v.get("data").cloned().unwrap_or(Value::Null),
        timestamp_us: secs * 1_000_000 + usecs,
    })
}

/// AsyncRead adapter that removes event lines from the QMP stream.
struct EventFilter<R> {
    inner: R,
    /// Bytes read but not yet split into lines.
    pending: Vec<u8>,
    /// Filtered bytes ready for the reader.
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
    events: mpsc::UnboundedSender<QmpEvent>,
}

impl<R> EventFilter<R> {
    fn split_lines(&mut self) {
        while let Some(nl) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            match parse_event(&line) {
                Some(ev) => {
                    let _ = self.events.send(ev);
                }
                None => self.out.extend_from_slice(&line),
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for EventFilter<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                if this.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.out = std::mem::take(&mut this.pending);
                continue;
            }
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.pending.extend_from_slice(rb.filled());
                this.split_lines();
            }
        }
    }
}

macro_rules! raw_command {
    ($ty:ident, $name:literal) => {
        #[doc = concat!("`", $name, "` with the reply kept as JSON.")]
        #[derive(Debug, Clone, Copy, Default, serde::Serialize)]
        pub struct $ty {}
        impl qapi::Command for $ty {
            type Ok = Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl qmp::QmpCommand for $ty {}
    };
}
raw_command!(RawQueryStatus, "query-status");
raw_command!(RawQueryMigrate, "query-migrate");

/// Commands sent with JSON arguments and a JSON reply, by name, through
/// [`Qmp::execute_raw`]: for commands whose argument or reply types use
/// enums that grow between QEMU versions (block jobs, block nodes, NBD), so
/// one code path serves QEMU 7.2 and 10.0 alike.
macro_rules! raw_commands {
    ($($ty:ident => $name:literal),* $(,)?) => {
        $(
            #[doc = concat!("`", $name, "` with JSON arguments and reply.")]
            #[derive(Debug, Clone, serde::Serialize)]
            #[serde(transparent)]
            pub struct $ty(pub Value);
            impl qapi::Command for $ty {
                type Ok = Value;
                const NAME: &'static str = $name;
                const ALLOW_OOB: bool = false;
            }
            impl qmp::QmpCommand for $ty {}
        )*

        /// Names accepted by [`Qmp::execute_raw`].
        pub const RAW_COMMANDS: &[&str] = &[$($name),*];

        impl Qmp {
            /// Run a command of [`RAW_COMMANDS`] with `args` (a JSON object;
            /// `{}` for none) and return its reply as JSON.
            pub async fn execute_raw(&mut self, name: &str, args: Value) -> Result<Value, DriverError> {
                match name {
                    $($name => self.execute($ty(args)).await,)*
                    _ => Err(DriverError::Qmp(format!(
                        "QMP command {name} is not in ferry's raw command set ({})",
                        RAW_COMMANDS.join(", ")
                    ))),
                }
            }
        }
    };
}
raw_commands! {
    RawQueryBlock => "query-block",
    RawQueryBlockJobs => "query-block-jobs",
    RawQueryNamedBlockNodes => "query-named-block-nodes",
    RawBlockdevAdd => "blockdev-add",
    RawBlockdevDel => "blockdev-del",
    RawBlockdevMirror => "blockdev-mirror",
    RawBlockJobCancel => "block-job-cancel",
    RawJobDismiss => "job-dismiss",
    RawNbdServerStart => "nbd-server-start",
    RawNbdServerStop => "nbd-server-stop",
    RawBlockExportAdd => "block-export-add",
    RawMigrateContinue => "migrate-continue",
    RawQueryCpusFast => "query-cpus-fast",
    RawQueryMigrateCapabilities => "query-migrate-capabilities",
    RawQueryMigrateParameters => "query-migrate-parameters",
    RawQueryYank => "query-yank",
}

/// How long QEMU may take to clean up after a migration ended.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
const CLEANUP_POLL: Duration = Duration::from_millis(10);

/// Whether a `query-yank` reply lists the migration's yank instance.
fn lists_migration_yank(reply: &Value) -> bool {
    reply.as_array().is_some_and(|instances| {
        instances
            .iter()
            .any(|i| i.get("type").and_then(Value::as_str) == Some("migration"))
    })
}

/// Migration status as reported by `query-migrate` (fields kept loose).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrateInfo {
    pub status: String,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub transferred: Option<u64>,
    pub remaining: Option<u64>,
    pub total: Option<u64>,
    pub error: Option<String>,
    /// Bitmap syncs so far: 1 during the first pass, 2+ once it ended.
    pub dirty_sync_count: Option<u64>,
    /// Auto-converge's current vCPU throttle.
    pub cpu_throttle_percent: Option<u64>,
    /// QEMU's own transfer rate estimate (megabits/s).
    pub mbps: Option<f64>,
    pub setup_time_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    /// Bytes of whole pages sent so far.
    pub normal_bytes: Option<u64>,
    /// Zero pages sent so far (as markers).
    pub zero_pages: Option<u64>,
}

impl MigrateInfo {
    pub fn from_json(v: &Value) -> MigrateInfo {
        let ram = v.get("ram");
        let ram_u = |k: &str| ram.and_then(|r| r.get(k)).and_then(Value::as_u64);
        MigrateInfo {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            total_time_ms: v.get("total-time").and_then(Value::as_u64),
            downtime_ms: v.get("downtime").and_then(Value::as_u64),
            transferred: ram_u("transferred"),
            remaining: ram_u("remaining"),
            total: ram_u("total"),
            error: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
            dirty_sync_count: ram_u("dirty-sync-count"),
            cpu_throttle_percent: v.get("cpu-throttle-percentage").and_then(Value::as_u64),
            mbps: ram.and_then(|r| r.get("mbps")).and_then(Value::as_f64),
            setup_time_ms: v.get("setup-time").and_then(Value::as_u64),
            expected_downtime_ms: v.get("expected-downtime").and_then(Value::as_u64),
            normal_bytes: ram_u("normal-bytes"),
            zero_pages: ram_u("duplicate"),
        }
    }
}

type Service = QapiService<QmpStreamTokio<OwnedWriteHalf>>;

/// One negotiated QMP connection.
pub struct Qmp {
    service: Service,
    events: mpsc::UnboundedReceiver<QmpEvent>,
    pump: tokio::task::JoinHandle<()>,
    raw_fd: RawFd,
    /// Timeout of a single command.
    pub command_timeout: Duration,
    /// A command whose reply never came (timed out, or its future was
    /// dropped): the qapi crate keeps it pending under the same id, and the
    /// next command on this connection would make it panic ("duplicate
    /// command id") and abort ferryd. Such a connection is refused; callers
    /// connect again.
    in_flight: bool,
    /// QEMU's version from its greeting (major, minor, micro).
    version: (u64, u64, u64),
}

/// The first QEMU with `avail-switchover-bandwidth` (8.2).
const SWITCHOVER_BANDWIDTH_SINCE: (u64, u64, u64) = (8, 2, 0);
/// QEMU 8.0 and later tell an incoming migration's channels apart by their
/// first bytes (the main channel starts with the file magic).
pub const MULTIFD_SINCE: (u64, u64, u64) = (8, 0, 0);

impl Drop for Qmp {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

fn qmp_err(what: &str) -> impl FnOnce(io::Error) -> DriverError + '_ {
    move |e| DriverError::Qmp(format!("{what}: {e}"))
}

impl Qmp {
    /// Connect to a QMP socket and negotiate capabilities, within `timeout`
    /// (a busy monitor — another client connected — does not greet).
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, DriverError> {
        let what = format!("connect to QMP socket {}", path.display());
        tokio::time::timeout(timeout, Self::connect_inner(path, &what))
            .await
            .map_err(|_| {
                DriverError::Timeout(format!("{what}: no QMP greeting within {timeout:?}"))
            })?
    }

    async fn connect_inner(path: &Path, what: &str) -> Result<Qmp, DriverError> {
        let sock = UnixStream::connect(path).await.map_err(qmp_err(what))?;
        let raw_fd = sock.as_raw_fd();
        let (r, w): (OwnedReadHalf, OwnedWriteHalf) = sock.into_split();
        let (tx, events) = mpsc::unbounded_channel();
        let filter = EventFilter {
            inner: r,
            pending: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            events: tx,
        };
        let negotiation = QmpStreamTokio::open_split(filter, w)
            .await
            .map_err(qmp_err(what))?;
        let v = &negotiation.capabilities.QMP.version.qemu;
        let version = (v.major as u64, v.minor as u64, v.micro as u64);
        let stream = negotiation.negotiate().await.map_err(qmp_err(what))?;
        let (service, responses) = stream.into_parts();
        let pump = tokio::spawn(responses.into_future());
        Ok(Qmp {
            service,
            events,
            pump,
            raw_fd,
            command_timeout: Duration::from_secs(30),
            in_flight: false,
            version,
        })
    }

    /// Does this QEMU take `avail-switchover-bandwidth` (8.2 and later)?
    pub fn has_switchover_bandwidth(&self) -> bool {
        self.version >= SWITCHOVER_BANDWIDTH_SINCE
    }

    /// Can this QEMU take multifd channels in any order (8.0 and later: an
    /// incoming QEMU tells its main channel from the others by their first
    /// bytes, so a relay may connect them in any order)?
    pub fn has_multifd(&self) -> bool {
        self.version >= MULTIFD_SINCE
    }

    /// Run one typed qapi command.
    pub async fn execute<C: qmp::QmpCommand>(&mut self, cmd: C) -> Result<C::Ok, DriverError> {
        let name = C::NAME;
        if self.in_flight {
            return Err(DriverError::Qmp(format!(
                "{name} not sent: an earlier command on this QMP connection never got its reply \
                 (reconnect to the monitor)"
            )));
        }
        self.in_flight = true;
        let res = tokio::time::timeout(self.command_timeout, self.service.execute(cmd)).await;
        // Only a reply (success or QMP error) clears the command; an I/O
        // error can leave it pending inside qapi (e.g. a failed write).
        if matches!(res, Ok(Ok(_)) | Ok(Err(qapi::ExecuteError::Qapi(_)))) {
            self.in_flight = false;
        }
        match res {
            Err(_) => Err(DriverError::Timeout(format!(
                "QMP command {name} got no reply within {:?}",
                self.command_timeout
            ))),
            Ok(Err(qapi::ExecuteError::Qapi(e))) => {
                Err(DriverError::Qmp(format!("{name} failed: {e}")))
            }
            Ok(Err(qapi::ExecuteError::Io(e))) => Err(DriverError::Qmp(format!(
                "{name}: connection to QEMU lost: {e}"
            ))),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Hand `fd` to QEMU under `name` (SCM_RIGHTS, then `getfd`).
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), DriverError> {
        let fds = [fd.as_raw_fd()];
        let mut tries = 0;
        loop {
            let iov = [IoSlice::new(b" ")];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            match sendmsg::<()>(self.raw_fd, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None) {
                Ok(1) => break,
                Ok(n) => {
                    return Err(DriverError::Qmp(format!(
                        "passing fd {name}: sent {n} bytes"
                    )))
                }
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) if tries < 500 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(DriverError::Qmp(format!(
                        "passing fd {name} over the QMP socket: {e}"
                    )))
                }
            }
        }
        self.execute(qmp::getfd {
            fdname: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Release an fd given with [`send_fd`](Self::send_fd) that QEMU did not consume.
    pub async fn close_fd(&mut self, name: &str) -> Result<(), DriverError> {
        self.execute(qmp::closefd {
            fdname: name.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Run status (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, DriverError> {
        let v = self.execute(RawQueryStatus {}).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// Whether QEMU still holds a migration's yank instance. A migration
    /// registers it when it starts; dropping it is the last step of QEMU's
    /// clean-up, which runs on the main loop after the migration's status
    /// already reads `failed`, `cancelled` or `completed`.
    pub async fn migration_yank_registered(&mut self) -> Result<bool, DriverError> {
        let v = self
            .execute_raw("query-yank", Value::Object(Default::default()))
            .await?;
        Ok(lists_migration_yank(&v))
    }

    /// Wait until QEMU finished cleaning up after a migration. A migration
    /// ends in two steps: its thread sets the final status (`failed`,
    /// `cancelled`, `completed`), then a bottom half on the main loop cleans
    /// up. Capabilities must not change in between: QEMU 10.0 stops
    /// multifd's channels there only if `multifd` is still on, and then
    /// aborts (`yank_unregister_instance`: assertion
    /// `QLIST_EMPTY(&entry->yankfns)` in util/yank.c) on the channels it left
    /// registered. The clean-up's last step drops the migration's yank
    /// instance. If `query-yank` fails, there is nothing to wait for that
    /// can be seen (every QEMU ferry drives, 7.2 and later, has it).
    ///
    /// The clean-up can also never come: QEMU 10.0's migration thread can
    /// stay blocked for good in `multifd_send_sync_main` after a multifd
    /// channel failed (its send threads gone), and QEMU then refuses any
    /// new migration ("duplicate yank instance"); the guest runs on.
    /// `scripts/experiments/multifd-unread-stall.py` shows it on raw QEMU.
    pub async fn wait_migration_cleanup(&mut self) -> Result<(), DriverError> {
        let deadline = std::time::Instant::now() + CLEANUP_TIMEOUT;
        loop {
            match self.migration_yank_registered().await {
                Ok(false) => return Ok(()),
                Ok(true) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(CLEANUP_POLL).await
                }
                Ok(true) => {
                    return Err(DriverError::WrongState(format!(
                        "QEMU has not finished cleaning up an earlier migration after {} s \
                         (QEMU 10.0 can stay so after a failed multifd migration); the VM runs \
                         on here; try again, and if this persists restart the VM before moving \
                         it or stopping it statefully",
                        CLEANUP_TIMEOUT.as_secs()
                    )))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "query-yank");
                    return Ok(());
                }
            }
        }
    }

    pub async fn query_migrate(&mut self) -> Result<MigrateInfo, DriverError> {
        Ok(MigrateInfo::from_json(
            &self.execute(RawQueryMigrate {}).await?,
        ))
    }

    pub async fn stop(&mut self) -> Result<(), DriverError> {
        self.execute(qmp::stop {}).await.map(|_| ())
    }

    pub async fn cont(&mut self) -> Result<(), DriverError> {
        self.execute(qmp::cont {}).await.map(|_| ())
    }

    /// `quit`; QEMU may close the socket before or after replying.
    pub async fn quit(&mut self) -> Result<(), DriverError> {
        match self.execute(qmp::quit {}).await {
            Ok(_) => Ok(()),
            Err(DriverError::Qmp(m)) if m.contains("connection to QEMU lost") => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn migrate(&mut self, uri: &str) -> Result<(), DriverError> {
        let cmd = qmp::migrate {
            uri: Some(uri.to_string()),
            channels: None,
            detach: None,
            resume: None,
        };
        self.execute(cmd).await.map(|_| ())
    }

    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), DriverError> {
        let cmd = qmp::migrate_incoming {
            uri: Some(uri.to_string()),
            channels: None,
            exit_on_error: None,
        };
        self.execute(cmd).await.map(|_| ())
    }

    /// Switch a running pre-copy migration (with `postcopy-ram`) to post-copy.
    pub async fn migrate_start_postcopy(&mut self) -> Result<(), DriverError> {
        self.execute(qmp::migrate_start_postcopy {})
            .await
            .map(|_| ())
    }

    pub async fn migrate_cancel(&mut self) -> Result<(), DriverError> {
        self.execute(qmp::migrate_cancel {}).await.map(|_| ())
    }

    /// Enable or disable migration capabilities, once QEMU has cleaned up
    /// after any earlier migration (see [`Self::wait_migration_cleanup`]).
    pub async fn set_capabilities(
        &mut self,
        caps: &[(qmp::MigrationCapability, bool)],
    ) -> Result<(), DriverError> {
        self.wait_migration_cleanup().await?;
        let capabilities = caps
            .iter()
            .map(|(capability, state)| qmp::MigrationCapabilityStatus {
                capability: *capability,
                state: *state,
            })
            .collect();
        self.execute(qmp::migrate_set_capabilities { capabilities })
            .await
            .map(|_| ())
    }

    /// Set migration parameters (fields left `None` are unchanged). On a
    /// QEMU older than 8.2 `avail-switchover-bandwidth` is left out (7.2
    /// refuses the whole command over it: "Parameter
    /// 'avail-switchover-bandwidth' is unexpected"); QEMU then estimates the
    /// switch-over bandwidth itself, as it always did.
    pub async fn set_parameters(
        &mut self,
        mut params: qmp::MigrateSetParameters,
    ) -> Result<(), DriverError> {
        if !self.has_switchover_bandwidth() {
            params.avail_switchover_bandwidth = None;
        }
        self.execute(qmp::migrate_set_parameters(params))
            .await
            .map(|_| ())
    }

    /// Limit (or, with a huge value, unlimit) the migration bandwidth in bytes/s.
    pub async fn set_max_bandwidth(&mut self, bytes_per_s: u64) -> Result<(), DriverError> {
        self.set_parameters(qmp::MigrateSetParameters {
            max_bandwidth: Some(bytes_per_s),
            ..Default::default()
        })
        .await
    }

    /// HMP command through QMP; returns its text output.
    pub async fn hmp(&mut self, command_line: &str) -> Result<String, DriverError> {
        self.execute(qmp::human_monitor_command {
            command_line: command_line.to_string(),
            cpu_index: None,
        })
        .await
    }

    /// Next event, waiting at most `timeout`; `None` on timeout or closed connection.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<QmpEvent> {
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// Whether the connection to QEMU is gone (the event pump ended).
    pub fn is_closed(&self) -> bool {
        self.pump.is_finished()
    }

    /// Events received so far, without waiting.
    pub fn drain_events(&mut self) -> Vec<QmpEvent> {
        let mut v = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            v.push(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn the_migration_yank_instance_is_found_among_others() {
        let during: Value = serde_json::from_str(
            r#"[{"type": "block-node", "node-name": "n"}, {"type": "migration"}, {"type": "chardev", "id": "qmp"}]"#,
        )
        .unwrap();
        assert!(lists_migration_yank(&during));
        let after: Value = serde_json::from_str(r#"[{"type": "chardev", "id": "qmp"}]"#).unwrap();
        assert!(!lists_migration_yank(&after));
        assert!(!lists_migration_yank(&Value::Null));
    }

    #[test]
    fn events_are_recognised() {
        let e = parse_event(br#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "wait-unplug-v99"}}"#).unwrap();
        assert_eq!(e.name, "MIGRATION");
        assert_eq!(e.migration_status(), Some("wait-unplug-v99"));
        assert_eq!(e.timestamp_us, 2_000_005);
        assert!(parse_event(br#"{"return": {}}"#).is_none());
        assert!(parse_event(br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#).is_none());
        assert!(parse_event(b"not json").is_none());
    }

    #[tokio::test]
    async fn filter_removes_event_lines() {
        let input: &[u8] = b"{\"QMP\": {}}\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\n{\"return\": {}}\n{\"ret";
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut f = EventFilter {
            inner: input,
            pending: vec![],
            out: vec![],
            out_pos: 0,
            eof: false,
            events: tx,
        };
        let mut s = String::new();
        f.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "{\"QMP\": {}}\n{\"return\": {}}\n{\"ret");
        assert_eq!(rx.recv().await.unwrap().name, "STOP");
    }

    #[test]
    fn migrate_info() {
        let v: Value = serde_json::from_str(
            r#"{"status": "completed", "total-time": 812, "downtime": 20, "ram": {"transferred": 1000, "remaining": 0, "total": 4096}}"#,
        )
        .unwrap();
        let i = MigrateInfo::from_json(&v);
        assert_eq!(i.status, "completed");
        assert_eq!(
            (i.total_time_ms, i.downtime_ms, i.transferred),
            (Some(812), Some(20), Some(1000))
        );
        let f = MigrateInfo::from_json(
            &serde_json::json!({"status": "failed", "error-desc": "disk full"}),
        );
        assert_eq!(f.error.as_deref(), Some("disk full"));
        assert_eq!(
            MigrateInfo::from_json(&serde_json::json!({})).status,
            "none"
        );
    }
}
