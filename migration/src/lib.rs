//! ferry-migration: the protocol two ferryd members speak to move an
//! instance, and the plumbing under it.
//!
//! * [`protocol`] — messages, versions, the receiver state machines (the
//!   file opens with the sequence diagrams); wire format in
//!   `doc/migration-protocol.md`.
//! * [`negotiate`](mod@negotiate) — offer + capabilities → [`Plan`], a pure function.
//! * [`session`] — the hello/offer/response exchange over a channel.
//! * [`channel`] — [`MessageChannel`] (framed control messages) and
//!   [`ByteChannel`] (bulk streams with optional zstd and counters).
//! * [`relay`](mod@relay) — two-way byte relay with half-close (QEMU / CRIU ↔ state).
//!
//! Depends on serde, tokio I/O and zstd only: websockets, drivers and the DB
//! stay in the daemon, which adapts its websockets to these traits.

pub mod channel;
pub mod compress;
pub mod frames;
pub mod negotiate;
pub mod protocol;
pub mod relay;
pub mod session;

pub use channel::{
    decode_message, encode_message, ByteChannel, ByteCounters, ChannelError, Counter, Counting,
    FramedChannel, MessageChannel, DEFAULT_MAX_FRAME,
};
pub use frames::{FrameDecoder, FrameEncoder, FrameError, FrameStats};
pub use negotiate::{
    check_response, has_live_vm, negotiate, Capabilities, FsPlan, NegotiationError, Plan, PreDump,
    StatePlan,
};
pub use protocol::{
    agree_version, Compression, FsTransfer, Hello, InstanceType, Message, MoveOptions, Offer,
    Progress, ProtocolError, QemuFeature, Response, Role, SourceState, Stage, StateTransfer,
    TargetState, VersionError, VersionRange, MIN_PROTOCOL_VERSION, MULTIFD_CHANNELS,
    PROTOCOL_VERSION,
};
pub use relay::{relay, Relay, RelayError, RelayStats};
pub use session::{source_handshake, target_handshake, LocalEnd, Session, SessionError};
