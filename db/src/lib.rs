//! ferry-db: the state machine holding the authoritative record of every instance.
//!
//! The database is changed only by applying typed [`Command`]s, each in one SQLite
//! transaction together with the bump of `meta.applied_index`. Today the [`Writer`]
//! applies commands locally; the cluster work adds a raft variant that replicates the
//! same commands (wrapped in a versioned [`LogCommand`]) before applying them.
//! The format and schema history are documented in `doc/db.md`.

mod apply;
mod command;
mod db;
mod schema;
mod writer;

pub use command::{
    Command, InstanceRecord, LogCommand, COMMAND_FORMAT_VERSION, MIN_COMMAND_FORMAT_VERSION,
};
pub use db::Db;
pub use schema::SCHEMA_VERSION;
pub use writer::Writer;

/// Everything that can go wrong reading or changing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{what} \"{name}\" not found")]
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
}
