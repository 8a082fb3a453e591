//! ferry-db: the state machine holding the authoritative record of every instance,
//! of the cluster's members and of the trusted client certificates.
//!
//! The database is changed only by applying typed [`Command`]s, each in one SQLite
//! transaction together with the bump of `meta.applied_index`. Today the [`Writer`]
//! applies commands locally; the cluster work adds a raft variant that replicates the
//! same commands (wrapped in a versioned [`LogCommand`]) before applying them.
//! The format and schema history are documented in `doc/db.md`.

mod apply;
mod apply_certificates;
mod apply_members;
mod apply_placement;
mod certificates;
mod command;
mod db;
mod members;
mod replicated;
mod schema;
mod writer;

pub use apply_placement::{Reservation, PLACEMENT_KEYS};
pub use certificates::{CertificateRecord, CERTIFICATE_CLIENT};
pub use command::{
    Command, InstanceRecord, LogCommand, COMMAND_FORMAT_VERSION, MIN_COMMAND_FORMAT_VERSION,
};
pub use db::Db;
pub use members::{MemberRecord, MEMBER_EVACUATED, MEMBER_ONLINE};
pub use replicated::{LogEntry, RaftMeta};
pub use schema::SCHEMA_VERSION;
pub use writer::Writer;

/// Everything that can go wrong reading or changing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{what} \"{name}\" not found{}", not_found_hint(what, name))]
    NotFound { what: &'static str, name: String },
    #[error("{what} \"{name}\" already exists")]
    AlreadyExists { what: &'static str, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error(
        "database schema version {db} is newer than this ferry supports ({code}); \
         upgrade ferry on this member before starting it"
    )]
    SchemaTooNew { db: u32, code: u32 },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot encode or decode database data: {0}")]
    Encode(String),
    /// The replicated write path cannot commit right now (no leader, no quorum).
    #[error("{0}")]
    Unavailable(String),
}

/// What to do about a missing record, for the kinds where the user can act.
fn not_found_hint(what: &str, name: &str) -> String {
    match what {
        "join token" => format!(
            ": create one with `ferry cluster add {name}` on a cluster member, \
             then join with the token it prints (the name must match)"
        ),
        _ => String::new(),
    }
}
