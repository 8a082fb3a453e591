//! Offer/response negotiation: a pure function from what the source offers
//! and what the target can do to the [`Plan`] both sides carry out.
//!
//! The target runs [`negotiate`] with its [`Capabilities`] and answers with
//! [`Plan::to_response`]; the source runs [`check_response`], which treats the
//! response as the target's capabilities, negotiates again and insists on
//! the same answer. Rules (doc/migration-protocol.md has the table):
//!
//! * fs: the first offered type the target accepts (offer order = source
//!   preference); archive/block_mirror need a compression in common (first in
//!   the offer's order), shared needs the same `pool_id`. Copying types need
//!   `volume_size <= free_bytes` when the target states its free space.
//! * state: stateless offers get `none`. Stateful live offers get, for
//!   containers, `criu_page_server` (+ `criu_pre_dump` when both list it, with
//!   the smaller iterations/goal; + `criu_lazy_pages` when post-copy was asked
//!   for and both list it); for VMs `vm_qemu_live` with the features both
//!   list (post-copy only when asked for). Otherwise — or when `live` is
//!   false — `stateful_stop_file` if both list it, else an error.
//! * state stream compression: the first common one, only for streamed state.
//! * Unknown values (from newer peers) are never chosen.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::{
    Compression, FsTransfer, InstanceType, MoveOptions, Offer, ProtocolError, QemuFeature,
    Response, StateTransfer,
};

/// What the target member can do (its storage pools, CRIU checks, QEMU).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub fs: Vec<FsTransfer>,
    pub state: Vec<StateTransfer>,
    /// Compressions the target can decode on the state stream.
    #[serde(default)]
    pub state_compression: Vec<Compression>,
    /// Free bytes on the target pool, when known.
    #[serde(default)]
    pub free_bytes: Option<u64>,
}

/// Why no plan came out of an offer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NegotiationError {
    #[error("invalid migration offer: {0}")]
    InvalidOffer(String),
    #[error(
        "no filesystem transfer in common with the target ({0}); make the storage pool available \
         on the target or allow an archive transfer"
    )]
    NoFsTransfer(String),
    #[error(
        "no state transfer in common with the target ({0}); move the instance with --stateless \
         or upgrade the target member"
    )]
    NoStateTransfer(String),
    #[error(
        "the target pool has {free} bytes free but the volume needs {needed}; free space on the \
         target or choose another member"
    )]
    InsufficientSpace { needed: u64, free: u64 },
}

/// Pre-dump parameters both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreDump {
    pub max_iterations: u32,
    pub goal_percent: u8,
}

/// The chosen filesystem transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FsPlan {
    Archive { compression: Compression },
    Shared { pool_id: String },
    BlockMirror { compression: Compression },
}

/// The chosen state transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StatePlan {
    None,
    CriuPageServer {
        pre_dump: Option<PreDump>,
        lazy_pages: bool,
        /// The target's page sink reads the stream (`ferry_page_sink`, with
        /// this header layout) instead of `criu page-server`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_sink: Option<u32>,
    },
    VmQemuLive {
        features: Vec<QemuFeature>,
    },
    StatefulStopFile,
}

/// What both sides do. Recorded in the operation and logged on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub instance_type: InstanceType,
    pub fs: FsPlan,
    pub state: StatePlan,
    pub state_compression: Compression,
    pub volume_size: u64,
    pub snapshots: Vec<String>,
    /// The source's options, with `postcopy` true only if it was agreed.
    pub options: MoveOptions,
    /// Why offered items were not taken (fallbacks, dropped features).
    pub reasons: Vec<String>,
    /// The protocol version both sides agreed on (set by the state machines).
    #[serde(default = "v1")]
    pub version: u32,
}

fn v1() -> u32 {
    1
}

impl Plan {
    /// A live QEMU-to-QEMU plan with this QEMU feature.
    pub fn has_qemu_feature(&self, f: QemuFeature) -> bool {
        matches!(&self.state, StatePlan::VmQemuLive { features } if features.contains(&f))
    }

    /// Runtime state moves (anything but `none`).
    pub fn is_stateful(&self) -> bool {
        self.state != StatePlan::None
    }

    /// Live: both agreed on a streamed state type.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state,
            StatePlan::CriuPageServer { .. } | StatePlan::VmQemuLive { .. }
        )
    }

    /// The instance resumes on the target before all memory arrived.
    pub fn is_postcopy(&self) -> bool {
        match &self.state {
            StatePlan::CriuPageServer { lazy_pages, .. } => *lazy_pages,
            StatePlan::VmQemuLive { features } => features.contains(&QemuFeature::Postcopy),
            _ => false,
        }
    }

    /// The target's page sink receives the dump's pages (`ferry_page_sink`).
    pub fn uses_page_sink(&self) -> bool {
        matches!(
            self.state,
            StatePlan::CriuPageServer {
                page_sink: Some(_),
                ..
            }
        )
    }

    /// The fs channel's compression (`none` for shared storage).
    pub fn fs_compression(&self) -> Compression {
        match self.fs {
            FsPlan::Archive { compression } | FsPlan::BlockMirror { compression } => compression,
            FsPlan::Shared { .. } => Compression::None,
        }
    }

    /// The response that announces this plan.
    pub fn to_response(&self) -> Response {
        let fs = match &self.fs {
            FsPlan::Archive { compression } => FsTransfer::Archive {
                compression: vec![*compression],
            },
            FsPlan::BlockMirror { compression } => FsTransfer::BlockMirror {
                compression: vec![*compression],
            },
            FsPlan::Shared { pool_id } => FsTransfer::Shared {
                pool_id: pool_id.clone(),
            },
        };
        let state = match &self.state {
            StatePlan::None => vec![StateTransfer::None],
            StatePlan::StatefulStopFile => vec![StateTransfer::StatefulStopFile],
            StatePlan::VmQemuLive { features } => vec![StateTransfer::VmQemuLive {
                features: features.clone(),
            }],
            StatePlan::CriuPageServer {
                pre_dump,
                lazy_pages,
                page_sink,
            } => {
                let mut v = Vec::new();
                if let Some(p) = pre_dump {
                    v.push(StateTransfer::CriuPreDump {
                        max_iterations: p.max_iterations,
                        goal_percent: p.goal_percent,
                    });
                }
                v.push(StateTransfer::CriuPageServer);
                if *lazy_pages {
                    v.push(StateTransfer::CriuLazyPages);
                }
                if let Some(criu_iov) = *page_sink {
                    v.push(StateTransfer::FerryPageSink { criu_iov });
                }
                v
            }
        };
        Response {
            fs: vec![fs],
            state,
            compression: self.fs_compression(),
            state_compression: self.state_compression,
            reasons: self.reasons.clone(),
        }
    }
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fs = match &self.fs {
            FsPlan::Archive { compression } => format!("archive ({})", wire(compression)),
            FsPlan::BlockMirror { compression } => format!("block mirror ({})", wire(compression)),
            FsPlan::Shared { pool_id } => format!("shared pool {pool_id}"),
        };
        let state = match &self.state {
            StatePlan::None => "none (stateless)".to_string(),
            StatePlan::StatefulStopFile => "stateful stop + state file".to_string(),
            StatePlan::CriuPageServer {
                pre_dump,
                lazy_pages,
                page_sink,
            } => format!(
                "CRIU page server{}{}{}",
                if page_sink.is_some() {
                    " stream into ferry's page sink"
                } else {
                    ""
                },
                pre_dump
                    .map(|p| format!(
                        ", pre-dump ≤{}× until {}%",
                        p.max_iterations, p.goal_percent
                    ))
                    .unwrap_or_default(),
                if *lazy_pages {
                    ", lazy pages (post-copy)"
                } else {
                    ""
                }
            ),
            StatePlan::VmQemuLive { features } => format!("QEMU live [{}]", wire_list(features)),
        };
        write!(
            f,
            "fs: {fs}; state: {state}; state compression: {}; live: {}",
            wire(&self.state_compression),
            self.is_live()
        )?;
        if !self.reasons.is_empty() {
            write!(f, "; notes: {}", self.reasons.join("; "))?;
        }
        Ok(())
    }
}

/// A value's wire name (`zstd`, `auto_converge`) for logs and reasons.
fn wire<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Object(m)) if m.get("type").is_some_and(|t| t.is_string()) => {
            m["type"].as_str().unwrap_or("?").to_string()
        }
        Ok(v) => v.to_string(),
        Err(_) => "?".into(),
    }
}

fn wire_list<T: Serialize>(values: &[T]) -> String {
    values.iter().map(wire).collect::<Vec<_>>().join(", ")
}

// ───────────────────────── version restriction ─────────────────────────

/// The protocol version that introduced a value; unknown values: never.
trait Since {
    fn since(&self) -> u32;
}

impl Since for Compression {
    fn since(&self) -> u32 {
        match self {
            Compression::Unknown => u32::MAX,
            Compression::ZstdFrames | Compression::ZstdFramesAcked => 2,
            Compression::None | Compression::Zstd => 1,
        }
    }
}

impl Since for QemuFeature {
    fn since(&self) -> u32 {
        if *self == QemuFeature::Unknown {
            u32::MAX
        } else {
            1
        }
    }
}

/// Version 1 (ferry 0.1) moved storage (archive or shared pool) and state
/// only as a stateful stop + state file; version 2 added the live transfers
/// (CRIU page server, pre-dump, lazy pages, QEMU-to-QEMU) and block mirror.
impl Since for FsTransfer {
    fn since(&self) -> u32 {
        match self {
            FsTransfer::Unknown => u32::MAX,
            FsTransfer::BlockMirror { .. } => 2,
            FsTransfer::Archive { .. } | FsTransfer::Shared { .. } => 1,
        }
    }
}

impl Since for StateTransfer {
    fn since(&self) -> u32 {
        match self {
            StateTransfer::Unknown => u32::MAX,
            StateTransfer::CriuPageServer
            | StateTransfer::CriuPreDump { .. }
            | StateTransfer::CriuLazyPages
            | StateTransfer::FerryPageSink { .. }
            | StateTransfer::VmQemuLive { .. } => 2,
            StateTransfer::StatefulStopFile | StateTransfer::None => 1,
        }
    }
}

fn keep<T: Since>(v: &mut Vec<T>, version: u32) {
    v.retain(|x| x.since() <= version);
}

fn restrict_fs(fs: &mut Vec<FsTransfer>, version: u32) {
    keep(fs, version);
    for f in fs.iter_mut() {
        if let FsTransfer::Archive { compression } | FsTransfer::BlockMirror { compression } = f {
            keep(compression, version);
        }
    }
}

fn restrict_state(state: &mut Vec<StateTransfer>, version: u32) {
    keep(state, version);
    for s in state.iter_mut() {
        if let StateTransfer::VmQemuLive { features } = s {
            keep(features, version);
        }
    }
}

impl Offer {
    /// The offer as `version` can express it: values introduced later (and
    /// values this build does not know) are dropped.
    pub fn for_version(mut self, version: u32) -> Self {
        restrict_fs(&mut self.fs, version);
        restrict_state(&mut self.state, version);
        keep(&mut self.state_compression, version);
        self
    }

    /// Does this offer, as `version` can express it, lead with a live VM
    /// move whose disk needs nothing copied before the target's QEMU starts
    /// (a block mirror, or a shared pool)? A target that can take it (see
    /// [`has_live_vm`]) then starts its QEMU before the plan is agreed.
    pub fn leads_with_live_vm(&self, version: u32) -> bool {
        has_live_vm(version)
            && matches!(self.state.first(), Some(StateTransfer::VmQemuLive { .. }))
            && matches!(
                self.fs.first(),
                Some(FsTransfer::BlockMirror { .. } | FsTransfer::Shared { .. })
            )
    }

    /// Why `version` changes what this offer can get (for the plan's
    /// reasons): the known transfer types it cannot express.
    pub fn version_notes(&self, version: u32) -> Vec<String> {
        let dropped: Vec<String> = self
            .state
            .iter()
            .filter(|s| **s != StateTransfer::Unknown && s.since() > version)
            .map(wire)
            .chain(
                self.fs
                    .iter()
                    .filter(|f| **f != FsTransfer::Unknown && f.since() > version)
                    .map(wire),
            )
            .collect();
        if dropped.is_empty() {
            return vec![];
        }
        vec![format!(
            "the members agreed on migration protocol v{version}, which has no {} (a member \
             speaks the previous protocol version)",
            dropped.join(", ")
        )]
    }
}

/// Does protocol `version` have live VM moves (QEMU to QEMU, the disk by
/// block mirror where it is not on a shared pool)?
pub fn has_live_vm(version: u32) -> bool {
    StateTransfer::VmQemuLive { features: vec![] }.since() <= version
        && FsTransfer::BlockMirror {
            compression: vec![],
        }
        .since()
            <= version
}

impl Capabilities {
    /// The capabilities as `version` can express them.
    pub fn for_version(mut self, version: u32) -> Self {
        restrict_fs(&mut self.fs, version);
        restrict_state(&mut self.state, version);
        keep(&mut self.state_compression, version);
        self
    }
}

// ───────────────────────────── negotiation ─────────────────────────────

fn first_common(offered: &[Compression], accepted: &[Compression]) -> Option<Compression> {
    offered
        .iter()
        .copied()
        .find(|c| *c != Compression::Unknown && accepted.contains(c))
}

fn validate(offer: &Offer) -> Result<(), NegotiationError> {
    let bad = |m: String| Err(NegotiationError::InvalidOffer(m));
    if !offer.fs.iter().any(|f| *f != FsTransfer::Unknown) {
        return bad("it lists no filesystem transfer type this member knows".into());
    }
    let vm = offer.instance_type == InstanceType::Vm;
    for f in &offer.fs {
        if matches!(f, FsTransfer::BlockMirror { .. }) && !vm {
            return bad("block_mirror is for VM disks, the instance is a container".into());
        }
    }
    for s in &offer.state {
        match s {
            StateTransfer::CriuPageServer
            | StateTransfer::CriuPreDump { .. }
            | StateTransfer::CriuLazyPages
            | StateTransfer::FerryPageSink { .. }
                if vm =>
            {
                return bad(format!(
                    "{} is a container state transfer, the instance is a VM",
                    wire(s)
                ));
            }
            StateTransfer::VmQemuLive { .. } if !vm => {
                return bad(
                    "vm_qemu_live is a VM state transfer, the instance is a container".into(),
                );
            }
            StateTransfer::CriuPreDump { goal_percent, .. } if *goal_percent > 100 => {
                return bad(format!(
                    "criu_pre_dump goal_percent {goal_percent} is over 100"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn choose_fs(
    offer: &Offer,
    caps: &Capabilities,
    reasons: &mut Vec<String>,
) -> Result<FsPlan, NegotiationError> {
    let mut why = Vec::new();
    for f in &offer.fs {
        match f {
            FsTransfer::Archive { compression } | FsTransfer::BlockMirror { compression } => {
                let archive = matches!(f, FsTransfer::Archive { .. });
                let name = if archive { "archive" } else { "block_mirror" };
                let theirs = caps.fs.iter().find_map(|t| match t {
                    FsTransfer::Archive { compression } if archive => Some(compression),
                    FsTransfer::BlockMirror { compression } if !archive => Some(compression),
                    _ => None,
                });
                match theirs.map(|t| first_common(compression, t)) {
                    None => why.push(format!("the target does not accept {name}")),
                    Some(None) => why.push(format!("no {name} compression in common")),
                    Some(Some(c)) => {
                        reasons.append(&mut why);
                        return Ok(if archive {
                            FsPlan::Archive { compression: c }
                        } else {
                            FsPlan::BlockMirror { compression: c }
                        });
                    }
                }
            }
            FsTransfer::Shared { pool_id } => {
                if caps
                    .fs
                    .iter()
                    .any(|t| matches!(t, FsTransfer::Shared { pool_id: p } if p == pool_id))
                {
                    reasons.append(&mut why);
                    return Ok(FsPlan::Shared {
                        pool_id: pool_id.clone(),
                    });
                }
                why.push(format!("the target does not see shared pool {pool_id:?}"));
            }
            FsTransfer::Unknown => {}
        }
    }
    Err(NegotiationError::NoFsTransfer(why.join("; ")))
}

fn both<'a>(
    offer: &'a Offer,
    caps: &'a Capabilities,
    pred: impl Fn(&StateTransfer) -> bool,
) -> Option<(&'a StateTransfer, &'a StateTransfer)> {
    Some((
        offer.state.iter().find(|s| pred(s))?,
        caps.state.iter().find(|s| pred(s))?,
    ))
}

fn choose_live(offer: &Offer, caps: &Capabilities, reasons: &mut Vec<String>) -> Option<StatePlan> {
    let postcopy = offer.options.postcopy;
    match offer.instance_type {
        InstanceType::Container => {
            if both(offer, caps, |s| *s == StateTransfer::CriuPageServer).is_none() {
                reasons.push("the target does not accept criu_page_server".into());
                return None;
            }
            let lazy_pages =
                postcopy && both(offer, caps, |s| *s == StateTransfer::CriuLazyPages).is_some();
            if postcopy && !lazy_pages {
                reasons.push("post-copy was requested but criu_lazy_pages is not shared; using stop-and-copy".into());
            }
            let pre_dump = match both(offer, caps, |s| {
                matches!(s, StateTransfer::CriuPreDump { .. })
            }) {
                Some((
                    StateTransfer::CriuPreDump {
                        max_iterations: a,
                        goal_percent: ga,
                    },
                    StateTransfer::CriuPreDump {
                        max_iterations: b,
                        goal_percent: gb,
                    },
                )) => Some(PreDump {
                    max_iterations: *a.min(b),
                    goal_percent: *ga.min(gb),
                }),
                _ => None,
            };
            // The sink takes a plain stop-and-copy dump of a layout both know.
            let page_sink = match both(offer, caps, |s| {
                matches!(s, StateTransfer::FerryPageSink { .. })
            }) {
                _ if lazy_pages || pre_dump.is_some() => None,
                Some((
                    StateTransfer::FerryPageSink { criu_iov: a },
                    StateTransfer::FerryPageSink { criu_iov: b },
                )) if a == b => Some(*a),
                _ => None,
            };
            Some(StatePlan::CriuPageServer {
                pre_dump,
                lazy_pages,
                page_sink,
            })
        }
        InstanceType::Vm => {
            let Some((
                StateTransfer::VmQemuLive { features: ours },
                StateTransfer::VmQemuLive { features: theirs },
            )) = both(offer, caps, |s| {
                matches!(s, StateTransfer::VmQemuLive { .. })
            })
            else {
                reasons.push("the target does not accept vm_qemu_live".into());
                return None;
            };
            let mut features: Vec<QemuFeature> = Vec::new();
            for f in ours {
                let wanted =
                    *f != QemuFeature::Unknown && (*f != QemuFeature::Postcopy || postcopy);
                if wanted && theirs.contains(f) && !features.contains(f) {
                    features.push(*f);
                }
            }
            let dropped: Vec<QemuFeature> = ours
                .iter()
                .copied()
                .filter(|f| *f != QemuFeature::Postcopy && !features.contains(f))
                .collect();
            if !dropped.is_empty() {
                reasons.push(format!(
                    "QEMU features not shared with the target: {}",
                    wire_list(&dropped)
                ));
            }
            let excludes = [QemuFeature::Postcopy, QemuFeature::Xbzrle];
            if features.contains(&QemuFeature::Multifd)
                && excludes.iter().any(|f| features.contains(f))
            {
                features.retain(|f| *f != QemuFeature::Multifd);
                reasons.push("multifd is not used with post-copy or XBZRLE".into());
            }
            if postcopy && !features.contains(&QemuFeature::Postcopy) {
                reasons.push(
                    "post-copy was requested but is not shared with the target; using pre-copy"
                        .into(),
                );
            }
            Some(StatePlan::VmQemuLive { features })
        }
    }
}

fn choose_state(
    offer: &Offer,
    caps: &Capabilities,
    reasons: &mut Vec<String>,
) -> Result<StatePlan, NegotiationError> {
    if !offer.stateful {
        return Ok(StatePlan::None);
    }
    let mut why = Vec::new();
    if offer.live {
        if let Some(plan) = choose_live(offer, caps, &mut why) {
            reasons.append(&mut why);
            return Ok(plan);
        }
    }
    if both(offer, caps, |s| *s == StateTransfer::StatefulStopFile).is_some() {
        if offer.live {
            reasons.push(format!(
                "live transfer not agreed ({}): falling back to a stateful stop",
                why.join("; ")
            ));
        }
        return Ok(StatePlan::StatefulStopFile);
    }
    why.push("stateful_stop_file is not listed by both sides".into());
    Err(NegotiationError::NoStateTransfer(why.join("; ")))
}

/// Derive the plan from the source's offer and the target's capabilities.
/// Pure: the same inputs give the same plan on both members.
pub fn negotiate(offer: &Offer, caps: &Capabilities) -> Result<Plan, NegotiationError> {
    validate(offer)?;
    let mut reasons = Vec::new();
    let fs = choose_fs(offer, caps, &mut reasons)?;
    if !matches!(fs, FsPlan::Shared { .. }) {
        if let Some(free) = caps.free_bytes {
            if free < offer.volume_size {
                return Err(NegotiationError::InsufficientSpace {
                    needed: offer.volume_size,
                    free,
                });
            }
        }
    }
    let state = choose_state(offer, caps, &mut reasons)?;
    let streamed = matches!(
        state,
        StatePlan::CriuPageServer { .. } | StatePlan::VmQemuLive { .. }
    );
    let state_compression = match streamed {
        true => first_common(&offer.state_compression, &caps.state_compression)
            .unwrap_or(Compression::None),
        false => Compression::None,
    };
    let mut plan = Plan {
        instance_type: offer.instance_type,
        fs,
        state,
        state_compression,
        volume_size: offer.volume_size,
        snapshots: offer.snapshots.clone(),
        options: offer.options.clone(),
        reasons,
        version: 1,
    };
    plan.options.postcopy = plan.is_postcopy();
    Ok(plan)
}

/// The source's re-check: the response must be exactly what negotiating the
/// offer against the response's own choices gives. Returns the plan, with
/// the target's reasons.
pub fn check_response(offer: &Offer, resp: &Response) -> Result<Plan, ProtocolError> {
    let caps = Capabilities {
        fs: resp.fs.clone(),
        state: resp.state.clone(),
        state_compression: vec![resp.state_compression],
        free_bytes: None,
    };
    let mut plan =
        negotiate(offer, &caps).map_err(|e| ProtocolError::BadResponse(e.to_string()))?;
    let mut expected = plan.to_response();
    expected.reasons = resp.reasons.clone();
    if &expected != resp {
        let json = |r: &Response| serde_json::to_string(r).unwrap_or_default();
        return Err(ProtocolError::BadResponse(format!(
            "the target answered {} but the offer with those choices gives {}",
            json(resp),
            json(&expected)
        )));
    }
    plan.reasons = resp.reasons.clone();
    Ok(plan)
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
