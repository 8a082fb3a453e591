//! Cluster plumbing for ferry.
//!
//! Today: a member's TLS identity (certificate + key made with rcgen on first
//! start) and the trust store of client certificates. The raft-replicated DB,
//! join tokens and member-to-member mTLS build on this.

pub mod identity;
pub mod trust;

pub use identity::{Identity, IdentityError};
pub use trust::TrustStore;
