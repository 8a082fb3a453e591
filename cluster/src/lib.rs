//! Cluster plumbing for ferry.
//!
//! Today: a member's TLS identity (certificate + key made with rcgen on first
//! start) and the trust store of client certificates. The raft-replicated DB,
//! join tokens and member-to-member mTLS build on this.

pub mod cert;
pub mod identity;
pub mod mtls;
pub mod raft;
pub mod token;
pub mod trust;

pub use cert::{CertError, ClusterCert};
pub use identity::{Identity, IdentityError};
pub use mtls::{classify_peer, PeerKind};
pub use token::{JoinToken, PendingJoin, TokenError};
pub use trust::TrustStore;
