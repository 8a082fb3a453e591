//! # The ferry migration protocol (version 2)
//!
//! Two members move one instance over three channels:
//!
//! * **control** — the messages of this file, one JSON message per frame
//!   (a websocket binary frame, or a `u32` big-endian length + payload on a
//!   byte stream; see `channel.rs`);
//! * **state** — a byte stream relayed in both directions: the CRIU
//!   page-server stream for containers, the QEMU migration stream for VMs;
//! * **fs** — a byte stream: the instance's storage (archive passes or an NBD
//!   tunnel), then the state images (CRIU metadata images or a stop file).
//!
//! On the byte channels an empty frame ends that direction (half-close).
//! The version is agreed from the `Hello`s, the first message each side sends.
//! Current version 2; previous accepted version 1. Version 1 (ferry 0.1)
//! moves storage as an archive or on a shared pool and runtime state only by
//! a stateful stop (`stateful_stop_file`: CRIU images or a QEMU state file
//! travel on fs after the storage; the target starts statefully). Version 2
//! adds the live transfers: `criu_page_server`, `criu_pre_dump`,
//! `criu_lazy_pages`, `vm_qemu_live` and the `block_mirror` fs type. A
//! member started with `--migration-protocol 1` speaks only version 1 (a
//! rolling upgrade keeps old and new members able to move instances). A
//! member speaking `min..=max` and a peer speaking `pmin..=pmax` agree on
//! `min(max, pmax)` if that is `>= max(min, pmin)` ([`agree_version`]); each
//! side then drops from its offer/capabilities what the agreed version cannot
//! express ([`Offer::for_version`]) and ignores values it does not know
//! (`unknown` variants), so a v2 member can talk to a v1 member.
//!
//! ## Sequences
//!
//! Live container move (CRIU stop-and-copy streamed through the page server;
//! `criu dump --page-server` on S talks to ferry's relay, the state channel
//! carries it, T's relay feeds `criu page-server`):
//!
//! ```text
//!  source (S)                       control            state      fs      target (T)
//!   Hello{1..2, source}       ─────────────────────►
//!                             ◄───────────────────── Hello{1..2, target}
//!   Offer{container, fs:[archive{zstd,none}, shared{p}],
//!         state:[criu_pre_dump?, criu_page_server, criu_lazy_pages?,
//!                stateful_stop_file], stateful, live} ──►
//!                                                    T: plan = negotiate(offer, caps)
//!                             ◄───────────────────── Response{fs:[archive], compression:zstd,
//!                                                             state:[criu_page_server]}
//!   S: negotiate(offer, response) must give the same plan; both log it
//!   archive pass 1 (instance running)  ═════════════════════════════════► unpack
//!                             ◄───────────────────── Progress{filesystem, "first pass applied"} (v2)
//!   [pre-dumps, if agreed]             ══════ pages ═══════►           page server
//!   freeze; criu dump ──► relay        ══════ pages ═══════►           page server
//!   final sync + CRIU metadata images  ═════════════════════════════════► unpack
//!   FsDone{bytes}             ─────────────────────►
//!   StateReady                ─────────────────────►     T: criu restore
//!                             ◄───────────────────── Progress{restoring}
//!                             ◄───────────────────── Resumed
//!                             ◄───────────────────── Success
//!   S: one DB write (member := T), delete the local volume, release the lease
//! ```
//!
//! With `criu_lazy_pages` (post-copy) T restores before the pages arrive
//! and pulls them over the state channel; S keeps serving until `Success`.
//! After `Resumed` the move cannot be undone: a cut link loses the instance.
//!
//! Live VM move (QEMU `migrate fd:` on both sides, socketpairs handed over
//! with `getfd`; the relay carries the return path that post-copy needs):
//!
//! ```text
//!  source (S)                       control            state      fs      target (T)
//!   Hello / Hello, Offer{vm, fs:[shared{p}|block_mirror|archive],
//!     state:[vm_qemu_live{auto_converge, xbzrle, postcopy}, stateful_stop_file]} ──►
//!                             ◄───────────────────── Response{state:[vm_qemu_live{auto_converge}]}
//!                                                    T: qemu -incoming defer, migrate-incoming fd:
//!   [block_mirror: NBD to T     ◄═════════════════════════════════════════► nbd-server]
//!   migrate fd: ◄──► relay       ◄═════ QEMU stream ═════►  relay ◄──► QEMU
//!   Progress{memory, bytes, total} (once a second, S's view)  ──►
//!   completed: FsDone{bytes}, StateReady ──►          T: wait for RESUME
//!                             ◄───────────────────── Resumed, Success
//! ```
//!
//! Stateful-stop fallback (the target does not echo a live state type, or
//! the offer is `live: false`):
//!
//! ```text
//!   Hello / Hello, Offer{…, state:[vm_qemu_live{…}, stateful_stop_file]} ──►
//!                             ◄───────────────────── Response{state:[stateful_stop_file],
//!                                                     reasons:["… falling back …"]}
//!   stateful stop (state into a file on the volume)
//!   storage + state file               ═════════════════════════════════► unpack
//!   FsDone{bytes}, StateReady ─────────────────────►   T: stateful start
//!                             ◄───────────────────── Resumed, Success
//! ```
//!
//! Every side may send `Failure{message}` or `Cancel{reason}` at any time
//! after the `Hello`s; after sending or receiving either, a side reads no more
//! messages, closes the channels and cleans up (S keeps or restarts the
//! instance, T deletes what it received). `Progress` may flow in both
//! directions at any time after the `Response`.
//!
//! ## Receiver state machines
//!
//! The target ([`TargetState`]) — `FsDone` is sent exactly once (bytes may be
//! 0 for shared storage), `StateReady` exactly once iff the plan is stateful:
//!
//! ```text
//!   AwaitHello ──Hello(source, common version)──► AwaitOffer
//!   AwaitOffer ──Offer (negotiate ok)──────────► Transfer{fs_done, state_ready}
//!   Transfer   ──Progress──► Transfer   ──FsDone (once)──► Transfer
//!              ──StateReady (once, stateful plans)──► Transfer
//!              (when fs_done and state_ready-or-stateless) ──► Restore
//!   Restore    ──Progress──► Restore    ──local resumed()──► Resumed
//!   Resumed    ──Progress──► Resumed    ──local succeed()──► Done
//!   any state after AwaitHello ──Failure──► Failed
//!   AwaitOffer/Transfer/Restore ──Cancel──► Cancelled
//!   Resumed ──Cancel──► error (too late: the instance runs on the target)
//!   Done/Failed/Cancelled: terminal, every message is an error
//! ```
//!
//! The source ([`SourceState`]) — local events are what it has sent:
//!
//! ```text
//!   AwaitHello    ──Hello(target, common version)──► AwaitResponse
//!   AwaitResponse ──Response (re-check ok)──► Transfer{fs_sent, state_sent}
//!   Transfer      ──Progress──► Transfer   ──local fs_sent()/state_sent()──► Transfer
//!                 ──Resumed (after FsDone and StateReady were sent)──► Resumed
//!                 ──Success (same condition)──► Done
//!   Resumed       ──Progress──► Resumed    ──Success──► Done
//!   any state after AwaitHello ──Failure──► Failed
//!   AwaitResponse/Transfer ──Cancel──► Cancelled; Resumed ──Cancel──► error
//! ```
//! Anything else is a [`ProtocolError`]: the receiving side sends `Failure`
//! and ends the move.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::negotiate::{negotiate, Capabilities, NegotiationError, Plan};

/// The protocol version this build speaks natively.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this build still accepts (current and previous).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

// ───────────────────────────── versions ─────────────────────────────

/// Why two members found no protocol version in common.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VersionError {
    #[error(
        "no common migration protocol version: this member speaks v{local_min}..=v{local_max}, \
         the peer speaks v{peer_min}..=v{peer_max}; upgrade the older member (mixed-version \
         clusters can only move instances between adjacent versions)"
    )]
    NoCommonVersion {
        local_min: u32,
        local_max: u32,
        peer_min: u32,
        peer_max: u32,
    },
    #[error(
        "invalid protocol version range v{min}..=v{max}: this build speaks \
         v{MIN_PROTOCOL_VERSION}..=v{PROTOCOL_VERSION}; pick versions inside it with min <= max"
    )]
    InvalidRange { min: u32, max: u32 },
}

/// The versions one member is willing to speak. A member can be told to
/// speak only the previous version during a rolling upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    pub min: u32,
    pub max: u32,
}

impl VersionRange {
    /// Everything this build speaks: `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION`.
    pub const CURRENT: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// A restricted range, checked against what this build can speak.
    pub fn new(min: u32, max: u32) -> Result<Self, VersionError> {
        if min > max || min < MIN_PROTOCOL_VERSION || max > PROTOCOL_VERSION {
            return Err(VersionError::InvalidRange { min, max });
        }
        Ok(VersionRange { min, max })
    }

    /// Only the oldest version this build accepts (`--protocol previous`).
    pub fn previous_only() -> Self {
        VersionRange {
            min: MIN_PROTOCOL_VERSION,
            max: MIN_PROTOCOL_VERSION,
        }
    }
}

impl Default for VersionRange {
    fn default() -> Self {
        Self::CURRENT
    }
}

/// The version two members use: the highest both speak.
pub fn agree_version(
    local_min: u32,
    local_max: u32,
    peer_min: u32,
    peer_max: u32,
) -> Result<u32, VersionError> {
    let lo = local_min.max(peer_min);
    let hi = local_max.min(peer_max);
    if local_min > local_max || peer_min > peer_max || hi < lo {
        return Err(VersionError::NoCommonVersion {
            local_min,
            local_max,
            peer_min,
            peer_max,
        });
    }
    Ok(hi)
}

// ───────────────────────────── messages ─────────────────────────────

/// Which end of the move a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Target,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Target => "target",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceType {
    Container,
    Vm,
}

/// Compression of a byte channel (fs archive, state stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    /// One zstd stream over the whole channel.
    Zstd,
    /// Each frame compressed on its own when that pays off (state stream
    /// only; see `frames`).
    ZstdFrames,
    /// `zstd_frames` plus acknowledgements: each side reports the payload
    /// it wrote locally, and a sender keeps at most
    /// [`crate::frames::WINDOW`] payload bytes unacknowledged. Compressed
    /// frames are small: without a window, the link's buffers can hold
    /// hundreds of MiB of easily compressed memory that the receiver has
    /// yet to write, and a VM's switch-over would wait for all of it.
    ZstdFramesAcked,
    /// A value from a newer peer; never chosen.
    #[serde(other)]
    Unknown,
}

/// How the instance's storage gets to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FsTransfer {
    /// A streamed archive of the volume (rootfs tree or disk image) over fs.
    Archive { compression: Vec<Compression> },
    /// The volume lives on a pool both members see: nothing to copy.
    Shared { pool_id: String },
    /// VM disks copied while the VM runs: NBD export on the target tunnelled
    /// over fs, `blockdev-mirror` on the source.
    BlockMirror { compression: Vec<Compression> },
    #[serde(other)]
    Unknown,
}

/// How the instance's runtime state gets to the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StateTransfer {
    /// CRIU stop-and-copy: the dump's pages stream over state to a page server.
    CriuPageServer,
    /// Iterative pre-dumps before the final dump (only where
    /// `criu check --feature mem_dirty_track` passes).
    CriuPreDump {
        max_iterations: u32,
        goal_percent: u8,
    },
    /// CRIU post-copy: restore first, pages follow on demand over state.
    CriuLazyPages,
    /// With `criu_page_server` (stop-and-copy, no pre-dump): the target
    /// writes the dump's page stream into images itself instead of running
    /// `criu page-server`. `criu_iov`: the page-server header layout of the
    /// source's CRIU (2 = CRIU 4.2: 32 bytes, 64-bit page counts); the
    /// target lists the layouts it reads. Since protocol v2 (an older v2
    /// peer reads it as unknown and the page server is used).
    FerryPageSink { criu_iov: u32 },
    /// QEMU-to-QEMU live migration over the state channel.
    VmQemuLive { features: Vec<QemuFeature> },
    /// Fallback: stateful stop, state file on the fs channel, stateful start.
    StatefulStopFile,
    /// Stateless: stop, move, start.
    None,
    #[serde(other)]
    Unknown,
}

/// QEMU migration capabilities that are part of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuFeature {
    AutoConverge,
    Xbzrle,
    Postcopy,
    PauseBeforeSwitchover,
    /// QEMU's multifd: RAM pages over [`MULTIFD_CHANNELS`] more state
    /// channels besides the main one, each relayed over its own websocket.
    /// Not with post-copy or XBZRLE.
    Multifd,
    /// The target says when its QEMU waits for the migration stream
    /// ([`Message::Listening`]) and the source starts QEMU's migration only
    /// then. Without it, a source on a shared pool (nothing to copy first)
    /// starts at once, its bytes wait in the link while the target's QEMU
    /// starts, and a guest with little to send switches over into that
    /// wait: paused until the target's QEMU is up.
    TargetListens,
    #[serde(other)]
    Unknown,
}

/// How many multifd channels a plan with [`QemuFeature::Multifd`] uses (the
/// source offers as many extra state channel secrets).
pub const MULTIFD_CHANNELS: usize = 2;

/// Per-move knobs the source asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveOptions {
    /// Bytes per second on the state stream; `None` = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    /// QEMU downtime-limit; `None` = QEMU's default (300 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// The pause ferry first waits for before accepting up to
    /// `max_downtime_ms` (the source's switch-over policy); `None` = the
    /// source's default (10 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_target_ms: Option<u64>,
    /// The user asked for post-copy (`--postcopy`).
    #[serde(default)]
    pub postcopy: bool,
    /// The state stream's compression the user asked for (`--compression`);
    /// `None` = the source's default (`zstd_frames`, falling back to none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_compression: Option<Compression>,
}

/// The first message on control, from both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The highest version the sender speaks.
    pub protocol_version: u32,
    /// The lowest version the sender accepts.
    pub min_version: u32,
    /// e.g. "ferry 0.1.0", for logs and error messages.
    pub software_version: String,
    pub role: Role,
}

impl Hello {
    pub fn new(versions: VersionRange, software_version: impl Into<String>, role: Role) -> Self {
        Hello {
            protocol_version: versions.max,
            min_version: versions.min,
            software_version: software_version.into(),
            role,
        }
    }
}

/// What the source can do, in its order of preference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub instance_type: InstanceType,
    pub fs: Vec<FsTransfer>,
    pub state: Vec<StateTransfer>,
    /// Compressions the source can apply to the state stream.
    #[serde(default)]
    pub state_compression: Vec<Compression>,
    /// Bytes of storage that will land on the target.
    pub volume_size: u64,
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Keep the runtime state (the instance is running and not `--stateless`).
    pub stateful: bool,
    /// Prefer a live transfer; `false` asks for a stateful stop.
    pub live: bool,
    #[serde(default)]
    pub options: MoveOptions,
}

/// What the target accepts: subsets of the offer (see `negotiate.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub fs: Vec<FsTransfer>,
    pub state: Vec<StateTransfer>,
    /// Compression of the fs channel.
    pub compression: Compression,
    #[serde(default = "no_compression")]
    pub state_compression: Compression,
    /// Why something offered was not taken (fallbacks, dropped features).
    #[serde(default)]
    pub reasons: Vec<String>,
}

fn no_compression() -> Compression {
    Compression::None
}

/// Phases shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Preparing,
    Filesystem,
    Memory,
    Restoring,
    Completing,
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub stage: Stage,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Free text, e.g. "120 MiB remaining (80 MiB/s) (20% CPU throttle)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One control message. JSON: `{"type": "<snake_case name>", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    Offer(Offer),
    Response(Response),
    /// Source: everything for the fs channel has been sent.
    FsDone {
        bytes: u64,
    },
    /// Source: all state has been sent (lazy pages: the dump is complete and
    /// pages will be served on demand).
    StateReady {},
    /// Target, with [`QemuFeature::TargetListens`] in the plan: its QEMU
    /// waits for the migration stream (sent once).
    Listening {},
    Progress(Progress),
    /// Target: the instance runs on the target (the point of no return).
    /// `at_us`: when it resumed (µs since the epoch, e.g. QEMU's RESUME
    /// event), for ferry's downtime measure where both clocks agree.
    Resumed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_us: Option<u64>,
    },
    /// Target: the move is complete.
    Success {},
    Failure {
        message: String,
    },
    Cancel {
        #[serde(default)]
        reason: String,
    },
}

impl Message {
    /// The wire name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Offer(_) => "offer",
            Message::Response(_) => "response",
            Message::FsDone { .. } => "fs_done",
            Message::StateReady {} => "state_ready",
            Message::Listening {} => "listening",
            Message::Progress(_) => "progress",
            Message::Resumed { .. } => "resumed",
            Message::Success {} => "success",
            Message::Failure { .. } => "failure",
            Message::Cancel { .. } => "cancel",
        }
    }
}

// ───────────────────────── receiver state machines ─────────────────────────

/// A message or event the receiving state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("migration protocol violation: received `{got}` while {state}; expected {expected}")]
    Unexpected {
        state: &'static str,
        got: &'static str,
        expected: &'static str,
    },
    #[error("the peer says it is the {got} of this move, but so is this member; check which member started it")]
    WrongRole { got: Role },
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
    #[error("the target's response is not a valid choice from the offer: {0}")]
    BadResponse(String),
    #[error("{event} twice: the migration already did this")]
    Repeated { event: &'static str },
    #[error(
        "cancel arrived after the instance resumed on the target; the move can no longer be undone"
    )]
    TooLateToCancel,
}

fn unexpected(state: &'static str, msg: &Message, expected: &'static str) -> ProtocolError {
    ProtocolError::Unexpected {
        state,
        got: msg.kind(),
        expected,
    }
}

fn check_hello(hello: &Hello, local: VersionRange, expect: Role) -> Result<u32, ProtocolError> {
    if hello.role != expect {
        return Err(ProtocolError::WrongRole { got: hello.role });
    }
    Ok(agree_version(
        local.min,
        local.max,
        hello.min_version,
        hello.protocol_version,
    )?)
}

/// The target's view of the conversation (what it receives from the source).
#[derive(Debug, Clone, PartialEq)]
pub enum TargetState {
    AwaitHello {
        local: VersionRange,
        caps: Capabilities,
    },
    AwaitOffer {
        version: u32,
        caps: Capabilities,
    },
    Transfer {
        version: u32,
        plan: Plan,
        fs_done: bool,
        state_ready: bool,
    },
    Restore {
        version: u32,
        plan: Plan,
    },
    Resumed {
        version: u32,
        plan: Plan,
    },
    Done {
        version: u32,
        plan: Plan,
    },
    Failed {
        message: String,
    },
    Cancelled {
        reason: String,
    },
}

impl TargetState {
    pub fn new(local: VersionRange, caps: Capabilities) -> Self {
        TargetState::AwaitHello { local, caps }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TargetState::AwaitHello { .. } => "awaiting the source's hello",
            TargetState::AwaitOffer { .. } => "awaiting the offer",
            TargetState::Transfer { .. } => "receiving the instance",
            TargetState::Restore { .. } => "restoring the instance",
            TargetState::Resumed { .. } => "running the instance after resume",
            TargetState::Done { .. } => "done (success sent)",
            TargetState::Failed { .. } => "failed",
            TargetState::Cancelled { .. } => "cancelled",
        }
    }

    /// The agreed plan, once negotiated.
    pub fn plan(&self) -> Option<&Plan> {
        match self {
            TargetState::Transfer { plan, .. }
            | TargetState::Restore { plan, .. }
            | TargetState::Resumed { plan, .. }
            | TargetState::Done { plan, .. } => Some(plan),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TargetState::Done { .. } | TargetState::Failed { .. } | TargetState::Cancelled { .. }
        )
    }

    /// Apply one message from the source.
    pub fn on_message(self, msg: Message) -> Result<Self, ProtocolError> {
        use TargetState as S;
        let state = self.name();
        match (self, msg) {
            (S::AwaitHello { local, caps }, Message::Hello(h)) => {
                let version = check_hello(&h, local, Role::Source)?;
                Ok(S::AwaitOffer {
                    version,
                    caps: caps.for_version(version),
                })
            }
            (S::AwaitHello { .. }, m) => Err(unexpected(
                state,
                &m,
                "hello (the first message carries the version)",
            )),
            (s, _) if s.is_terminal() => Err(ProtocolError::Unexpected {
                state,
                got: "any message",
                expected: "nothing",
            }),
            (_, Message::Failure { message }) => Ok(S::Failed { message }),
            (S::Resumed { .. }, Message::Cancel { .. }) => Err(ProtocolError::TooLateToCancel),
            (_, Message::Cancel { reason }) => Ok(S::Cancelled { reason }),
            (S::AwaitOffer { version, caps }, Message::Offer(offer)) => {
                let mut plan = negotiate(&offer.for_version(version), &caps)?;
                plan.version = version;
                Ok(S::Transfer {
                    version,
                    plan,
                    fs_done: false,
                    state_ready: false,
                }
                .advance())
            }
            (S::AwaitOffer { .. }, m) => Err(unexpected(state, &m, "offer")),
            (s @ S::Transfer { .. }, Message::Progress(_)) => Ok(s),
            (
                S::Transfer {
                    version,
                    plan,
                    fs_done,
                    state_ready,
                },
                Message::FsDone { .. },
            ) => {
                if fs_done {
                    return Err(ProtocolError::Repeated { event: "fs_done" });
                }
                Ok(S::Transfer {
                    version,
                    plan,
                    fs_done: true,
                    state_ready,
                }
                .advance())
            }
            (
                S::Transfer {
                    version,
                    plan,
                    fs_done,
                    state_ready,
                },
                m @ Message::StateReady {},
            ) => {
                if !plan.is_stateful() {
                    return Err(unexpected(state, &m, "fs_done (the plan is stateless)"));
                }
                if state_ready {
                    return Err(ProtocolError::Repeated {
                        event: "state_ready",
                    });
                }
                Ok(S::Transfer {
                    version,
                    plan,
                    fs_done,
                    state_ready: true,
                }
                .advance())
            }
            (S::Transfer { .. }, m) => {
                Err(unexpected(state, &m, "progress, fs_done or state_ready"))
            }
            (s @ (S::Restore { .. } | S::Resumed { .. }), Message::Progress(_)) => Ok(s),
            (_, m) => Err(unexpected(state, &m, "progress, failure or cancel")),
        }
    }

    fn advance(self) -> Self {
        match self {
            TargetState::Transfer {
                version,
                plan,
                fs_done: true,
                state_ready,
            } if state_ready || !plan.is_stateful() => TargetState::Restore { version, plan },
            s => s,
        }
    }

    /// Local event: the instance runs on the target (send `Resumed`).
    pub fn resumed(self) -> Result<Self, ProtocolError> {
        match self {
            TargetState::Restore { version, plan } => Ok(TargetState::Resumed { version, plan }),
            s => Err(ProtocolError::Unexpected {
                state: s.name(),
                got: "local resume",
                expected: "restore first",
            }),
        }
    }

    /// Local event: the move is complete (send `Success`). Allowed from
    /// `Restore` too, for restores that report resume and success together.
    pub fn succeed(self) -> Result<Self, ProtocolError> {
        match self {
            TargetState::Restore { version, plan } | TargetState::Resumed { version, plan } => {
                Ok(TargetState::Done { version, plan })
            }
            s => Err(ProtocolError::Unexpected {
                state: s.name(),
                got: "local success",
                expected: "restore first",
            }),
        }
    }
}

/// The source's view of the conversation (what it receives from the target).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceState {
    AwaitHello {
        local: VersionRange,
        offer: Offer,
    },
    AwaitResponse {
        version: u32,
        offer: Offer,
    },
    Transfer {
        version: u32,
        plan: Plan,
        fs_sent: bool,
        state_sent: bool,
    },
    Resumed {
        version: u32,
        plan: Plan,
    },
    Done {
        version: u32,
        plan: Plan,
    },
    Failed {
        message: String,
    },
    Cancelled {
        reason: String,
    },
}

impl SourceState {
    /// `offer` is the full offer; it is cut down to the agreed version when
    /// the target's hello arrives (read it back with [`SourceState::offer`]).
    pub fn new(local: VersionRange, offer: Offer) -> Self {
        SourceState::AwaitHello { local, offer }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SourceState::AwaitHello { .. } => "awaiting the target's hello",
            SourceState::AwaitResponse { .. } => "awaiting the response to the offer",
            SourceState::Transfer { .. } => "sending the instance",
            SourceState::Resumed { .. } => "serving the resumed target",
            SourceState::Done { .. } => "done (target reported success)",
            SourceState::Failed { .. } => "failed",
            SourceState::Cancelled { .. } => "cancelled",
        }
    }

    /// The offer to send, once the version is agreed.
    pub fn offer(&self) -> Option<&Offer> {
        match self {
            SourceState::AwaitResponse { offer, .. } => Some(offer),
            _ => None,
        }
    }

    pub fn plan(&self) -> Option<&Plan> {
        match self {
            SourceState::Transfer { plan, .. }
            | SourceState::Resumed { plan, .. }
            | SourceState::Done { plan, .. } => Some(plan),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            SourceState::Done { .. } | SourceState::Failed { .. } | SourceState::Cancelled { .. }
        )
    }

    /// Apply one message from the target.
    pub fn on_message(self, msg: Message) -> Result<Self, ProtocolError> {
        use SourceState as S;
        let state = self.name();
        match (self, msg) {
            (S::AwaitHello { local, offer }, Message::Hello(h)) => {
                let version = check_hello(&h, local, Role::Target)?;
                Ok(S::AwaitResponse {
                    version,
                    offer: offer.for_version(version),
                })
            }
            (S::AwaitHello { .. }, m) => Err(unexpected(
                state,
                &m,
                "hello (the first message carries the version)",
            )),
            (s, _) if s.is_terminal() => Err(ProtocolError::Unexpected {
                state,
                got: "any message",
                expected: "nothing",
            }),
            (_, Message::Failure { message }) => Ok(S::Failed { message }),
            (S::Resumed { .. }, Message::Cancel { .. }) => Err(ProtocolError::TooLateToCancel),
            (_, Message::Cancel { reason }) => Ok(S::Cancelled { reason }),
            (S::AwaitResponse { version, offer }, Message::Response(resp)) => {
                let mut plan = crate::negotiate::check_response(&offer, &resp)?;
                plan.version = version;
                Ok(S::Transfer {
                    version,
                    plan,
                    fs_sent: false,
                    state_sent: false,
                })
            }
            (S::AwaitResponse { .. }, m) => Err(unexpected(state, &m, "response")),
            (s @ (S::Transfer { .. } | S::Resumed { .. }), Message::Progress(_)) => Ok(s),
            (s @ S::Transfer { .. }, Message::Listening {})
                if s.plan()
                    .is_some_and(|p| p.has_qemu_feature(QemuFeature::TargetListens)) =>
            {
                Ok(s)
            }
            (
                S::Transfer {
                    version,
                    plan,
                    fs_sent,
                    state_sent,
                },
                m @ (Message::Resumed { .. } | Message::Success {}),
            ) => {
                if !fs_sent || (plan.is_stateful() && !state_sent) {
                    return Err(unexpected(
                        state,
                        &m,
                        "progress (fs_done/state_ready not sent yet)",
                    ));
                }
                Ok(match m {
                    Message::Resumed { .. } => S::Resumed { version, plan },
                    _ => S::Done { version, plan },
                })
            }
            (S::Transfer { .. }, m) => Err(unexpected(
                state,
                &m,
                "progress, resumed, success or failure",
            )),
            (S::Resumed { version, plan }, Message::Success {}) => Ok(S::Done { version, plan }),
            (_, m) => Err(unexpected(state, &m, "progress, success or failure")),
        }
    }

    /// Local event: `FsDone` was sent.
    pub fn fs_sent(self) -> Result<Self, ProtocolError> {
        match self {
            SourceState::Transfer { fs_sent: true, .. } => {
                Err(ProtocolError::Repeated { event: "fs_done" })
            }
            SourceState::Transfer {
                version,
                plan,
                state_sent,
                ..
            } => Ok(SourceState::Transfer {
                version,
                plan,
                fs_sent: true,
                state_sent,
            }),
            s => Err(ProtocolError::Unexpected {
                state: s.name(),
                got: "local fs_done",
                expected: "a negotiated plan",
            }),
        }
    }

    /// Local event: `StateReady` was sent (only for stateful plans).
    pub fn state_sent(self) -> Result<Self, ProtocolError> {
        match self {
            SourceState::Transfer { ref plan, .. } if !plan.is_stateful() => {
                Err(ProtocolError::Unexpected {
                    state: "sending the instance",
                    got: "local state_ready",
                    expected: "fs_done only (the plan is stateless)",
                })
            }
            SourceState::Transfer {
                state_sent: true, ..
            } => Err(ProtocolError::Repeated {
                event: "state_ready",
            }),
            SourceState::Transfer {
                version,
                plan,
                fs_sent,
                ..
            } => Ok(SourceState::Transfer {
                version,
                plan,
                fs_sent,
                state_sent: true,
            }),
            s => Err(ProtocolError::Unexpected {
                state: s.name(),
                got: "local state_ready",
                expected: "a negotiated plan",
            }),
        }
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
