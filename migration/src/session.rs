//! The control conversation driven over a [`MessageChannel`]: the hello
//! exchange and offer/response for each side, then the state machines of
//! `protocol.rs` check every later message ([`Session`]).
//!
//! On a protocol or negotiation error the side that detects it sends
//! `Failure{message}` (best effort) before returning the error, so the peer
//! shows the same reason to its user.

use thiserror::Error;

use crate::channel::{ChannelError, MessageChannel};
use crate::negotiate::{Capabilities, Plan};
use crate::protocol::{
    Hello, Message, Offer, ProtocolError, Role, SourceState, TargetState, VersionRange,
};

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the peer reported a failure: {0}")]
    PeerFailed(String),
    #[error("the peer cancelled the move{}", if .0.is_empty() { String::new() } else { format!(": {}", .0) })]
    PeerCancelled(String),
}

/// Who this member is on the wire.
#[derive(Debug, Clone)]
pub struct LocalEnd {
    pub versions: VersionRange,
    /// e.g. "ferry 0.1.0".
    pub software_version: String,
}

impl LocalEnd {
    pub fn new(versions: VersionRange, software_version: impl Into<String>) -> Self {
        LocalEnd {
            versions,
            software_version: software_version.into(),
        }
    }
}

/// Either side's receive state.
#[derive(Debug, Clone, PartialEq)]
pub enum Session {
    Source(SourceState),
    Target(TargetState),
}

impl Session {
    pub fn plan(&self) -> Option<&Plan> {
        match self {
            Session::Source(s) => s.plan(),
            Session::Target(t) => t.plan(),
        }
    }

    pub fn on_message(self, msg: Message) -> Result<Self, ProtocolError> {
        Ok(match self {
            Session::Source(s) => Session::Source(s.on_message(msg)?),
            Session::Target(t) => Session::Target(t.on_message(msg)?),
        })
    }

    /// Receive one message and apply it. A `Failure`/`Cancel` from the peer
    /// comes back as an error; a protocol violation is reported to the peer.
    pub async fn recv<C: MessageChannel>(
        self,
        ch: &mut C,
    ) -> Result<(Self, Message), SessionError> {
        recv_into(ch, self, Session::on_message).await
    }
}

/// Send `Failure{e}` (ignoring send errors) and hand back the error.
async fn fail<C: MessageChannel>(ch: &mut C, e: ProtocolError) -> SessionError {
    let _ = ch
        .send(&Message::Failure {
            message: e.to_string(),
        })
        .await;
    SessionError::Protocol(e)
}

async fn recv_into<C: MessageChannel, S>(
    ch: &mut C,
    state: S,
    step: impl FnOnce(S, Message) -> Result<S, ProtocolError>,
) -> Result<(S, Message), SessionError> {
    let msg = match ch.recv().await {
        Ok(msg) => msg,
        Err(e) => {
            // Tell the peer why its message was refused; a cut channel can't be told.
            if matches!(
                e,
                ChannelError::Malformed(_)
                    | ChannelError::FrameTooLarge { .. }
                    | ChannelError::EmptyFrame
            ) {
                let _ = ch
                    .send(&Message::Failure {
                        message: format!("refused a control message: {e}"),
                    })
                    .await;
            }
            return Err(e.into());
        }
    };
    match step(state, msg.clone()) {
        Err(e) => Err(fail(ch, e).await),
        Ok(s) => match msg {
            Message::Failure { message } => Err(SessionError::PeerFailed(message)),
            Message::Cancel { reason } => Err(SessionError::PeerCancelled(reason)),
            msg => Ok((s, msg)),
        },
    }
}

impl SourceState {
    /// Receive one message from the target and apply it: a protocol
    /// violation is reported to the target, a `failure`/`cancel` from it
    /// comes back as an error.
    pub async fn recv<C: MessageChannel>(
        self,
        ch: &mut C,
    ) -> Result<(Self, Message), SessionError> {
        recv_into(ch, self, SourceState::on_message).await
    }
}

impl TargetState {
    /// Receive one message from the source and apply it (see
    /// [`SourceState::recv`]).
    pub async fn recv<C: MessageChannel>(
        self,
        ch: &mut C,
    ) -> Result<(Self, Message), SessionError> {
        recv_into(ch, self, TargetState::on_message).await
    }
}

/// Source side: hellos, offer, response. Returns the state (in `Transfer`)
/// with the agreed version and plan.
pub async fn source_handshake<C: MessageChannel>(
    ch: &mut C,
    local: &LocalEnd,
    offer: Offer,
) -> Result<SourceState, SessionError> {
    ch.send(&Message::Hello(Hello::new(
        local.versions,
        &local.software_version,
        Role::Source,
    )))
    .await?;
    let state = recv_into(
        ch,
        SourceState::new(local.versions, offer),
        SourceState::on_message,
    )
    .await?
    .0;
    let offer = state
        .offer()
        .expect("state after hello holds the offer")
        .clone();
    ch.send(&Message::Offer(offer)).await?;
    let state = recv_into(ch, state, SourceState::on_message).await?.0;
    if let SourceState::Transfer { version, plan, .. } = &state {
        tracing::info!(version, %plan, "migration plan agreed (source)");
    }
    Ok(state)
}

/// Target side: hellos, offer, response. A negotiation failure is sent to
/// the source as `Failure` and returned.
pub async fn target_handshake<C: MessageChannel>(
    ch: &mut C,
    local: &LocalEnd,
    caps: Capabilities,
) -> Result<TargetState, SessionError> {
    ch.send(&Message::Hello(Hello::new(
        local.versions,
        &local.software_version,
        Role::Target,
    )))
    .await?;
    let state = recv_into(
        ch,
        TargetState::new(local.versions, caps),
        TargetState::on_message,
    )
    .await?
    .0;
    let state = recv_into(ch, state, TargetState::on_message).await?.0;
    let plan = state.plan().expect("state after offer holds the plan");
    if let TargetState::Transfer { version, .. } | TargetState::Restore { version, .. } = &state {
        tracing::info!(version, %plan, "migration plan agreed (target)");
    }
    ch.send(&Message::Response(plan.to_response())).await?;
    Ok(state)
}
