//! The raft layer of the replicated cluster database (openraft 0.9, `storage-v2`).
//!
//! Every member runs one openraft node. Its pieces here:
//!
//! - [`LogStore`]: the raft log, vote and committed log id in a member-local SQLite
//!   file (`DIR/raft.db`). An append is acknowledged only after its commit returned.
//! - [`StateMachine`]: the cluster state, a [`ferry_db::Db`] (`DIR/ferry.db`). Each
//!   batch of committed entries is applied in one SQLite transaction together with
//!   the last applied log id; snapshots are copies of that database (`DIR/snapshots/`).
//! - [`open_raft`]: opens both and starts the node. The network (member-to-member
//!   HTTPS) is the daemon's: it passes its own [`openraft::RaftNetworkFactory`].
//!
//! Log entries carry a [`ferry_db::LogCommand`]; the response of each entry is an
//! [`ApplyResult`], which the proposer turns back into `Result<u64, DbError>` with
//! [`ApplyResult::into_result`]. Design notes: `doc/cluster.md`, section "Raft".

mod log_store;
mod snapshot;
mod state_machine;

#[cfg(test)]
mod tests;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_db::{Db, DbError, LogCommand};
use serde::{Deserialize, Serialize};

pub use log_store::{LogStore, LogStoreError};
pub use snapshot::SnapshotError;
pub use state_machine::{SnapshotBuilder, StateMachine};

openraft::declare_raft_types!(
    /// openraft's type parameters for ferry.
    pub TypeConfig:
        D = LogCommand,
        R = ApplyResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A member's raft node. `BasicNode::addr` is the member's `host:port` HTTPS address.
pub type Raft = openraft::Raft<TypeConfig>;
/// Raft node id of a member.
pub type NodeId = u64;

/// File names inside a member's raft directory.
pub const LOG_FILE: &str = "raft.db";
pub const STATE_FILE: &str = "ferry.db";
pub const SNAPSHOT_DIR: &str = "snapshots";

/// What applying one log entry did; the `R` of [`TypeConfig`], returned by
/// `client_write` in `ClientWriteResponse::data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ApplyResult {
    /// The entry was applied at `index` (also for blank and membership entries).
    Applied { index: u64 },
    /// The command was refused by its validation on every member; nothing changed, but
    /// `index` still counts as applied.
    Rejected { index: u64, rejection: Rejection },
}

/// A command's refusal, carried back to the proposer (possibly over the network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub kind: RejectionKind,
    /// For `NotFound`/`AlreadyExists`: what kind of record ("instance") and its name.
    pub what: String,
    pub name: String,
    /// The error text, as `DbError` displays it.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionKind {
    NotFound,
    AlreadyExists,
    Conflict,
}

impl ApplyResult {
    /// The log index the entry was applied at, whatever the outcome.
    pub fn index(&self) -> u64 {
        match self {
            ApplyResult::Applied { index } | ApplyResult::Rejected { index, .. } => *index,
        }
    }

    /// Maps the outcome back to what `Writer::submit` returns: the applied index, or the
    /// command's `DbError`.
    pub fn into_result(self) -> Result<u64, DbError> {
        match self {
            ApplyResult::Applied { index } => Ok(index),
            ApplyResult::Rejected { rejection, .. } => Err(rejection.into_db_error()),
        }
    }

    /// The result for a rejection; `None` if `err` is not a rejection (a storage error).
    pub(crate) fn rejected(index: u64, err: &DbError) -> Option<ApplyResult> {
        let (kind, what, name) = match err {
            DbError::NotFound { what, name } => (RejectionKind::NotFound, *what, name.as_str()),
            DbError::AlreadyExists { what, name } => {
                (RejectionKind::AlreadyExists, *what, name.as_str())
            }
            DbError::Conflict(_) => (RejectionKind::Conflict, "", ""),
            _ => return None,
        };
        Some(ApplyResult::Rejected {
            index,
            rejection: Rejection {
                kind,
                what: what.to_string(),
                name: name.to_string(),
                message: err.to_string(),
            },
        })
    }
}

impl Rejection {
    pub fn into_db_error(self) -> DbError {
        match self.kind {
            RejectionKind::NotFound => DbError::NotFound {
                what: static_what(&self.what),
                name: self.name,
            },
            RejectionKind::AlreadyExists => DbError::AlreadyExists {
                what: static_what(&self.what),
                name: self.name,
            },
            RejectionKind::Conflict => DbError::Conflict(self.message),
        }
    }
}

/// `DbError` names record kinds with `&'static str`; map the known ones back.
fn static_what(what: &str) -> &'static str {
    match what {
        "instance" => "instance",
        "member" => "member",
        "operation" => "operation",
        "join token" => "join token",
        "raft node id" => "raft node id",
        _ => "record",
    }
}

/// Failure to open a member's raft storage or start its node.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    #[error("cannot open the raft storage in {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    LogStore(#[from] LogStoreError),
    #[error("cannot open the cluster database: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("invalid raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    #[error("the raft node stopped: {0}")]
    Fatal(Box<openraft::error::Fatal<NodeId>>),
}

/// Raft timing and compaction for ferry: 250 ms heartbeats, 1–2 s election timeout, a
/// snapshot every 1000 entries, keeping the last 100 entries after one (so a briefly
/// lagging member catches up from the log rather than a snapshot).
pub fn default_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        // Sending a snapshot chunk includes the receiver installing it (an fsync or two).
        install_snapshot_timeout: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        purge_batch_size: 64,
        ..Default::default()
    }
}

/// Opens (creating if needed) the raft storage of a member under `dir` — `raft.db`,
/// `ferry.db`, `snapshots/` — and starts its raft node with `config` (validated; see
/// [`default_config`]) and the daemon's network.
///
/// Returns the node and the cluster database it applies to. The database is for reads
/// only: every write goes through `raft.client_write(LogCommand::new(cmd))`. A new
/// cluster is created by calling `raft.initialize(..)` once on the first member; a
/// joining member just starts and waits to be added by the leader.
pub async fn open_raft<N>(
    node_id: NodeId,
    dir: &Path,
    config: openraft::Config,
    network: N,
) -> Result<(Raft, Arc<Db>), RaftError>
where
    N: openraft::RaftNetworkFactory<TypeConfig>,
{
    open_raft_with(node_id, dir, config, network, None).await
}

/// [`open_raft`] applying to an already open cluster database `db`.
pub async fn open_raft_with<N>(
    node_id: NodeId,
    dir: &Path,
    config: openraft::Config,
    network: N,
    db: Option<Arc<Db>>,
) -> Result<(Raft, Arc<Db>), RaftError>
where
    N: openraft::RaftNetworkFactory<TypeConfig>,
{
    let (log_store, state_machine, db) = open_storage_with(dir, db).await?;
    let config = Arc::new(
        config
            .validate()
            .map_err(|e| RaftError::Config(Box::new(e)))?,
    );
    let raft = Raft::new(node_id, config, network, log_store, state_machine)
        .await
        .map_err(|e| RaftError::Fatal(Box::new(e)))?;
    Ok((raft, db))
}

/// Runs blocking storage work (SQLite commits fsync) off the async workers. A panic
/// in `f` is propagated; cancellation (runtime shutdown) becomes an I/O error.
pub(crate) async fn run_blocking<T, F>(f: F) -> Result<T, std::io::Error>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => Ok(value),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(std::io::Error::other(
            "the storage task was cancelled because ferryd is shutting down",
        )),
    }
}

/// Opens the log store, the cluster database and the state machine under `dir`,
/// without starting a node (tests, tools).
pub async fn open_storage(dir: &Path) -> Result<(LogStore, StateMachine, Arc<Db>), RaftError> {
    open_storage_with(dir, None).await
}

/// Like [`open_storage`], but applying to an already open cluster database
/// (the daemon's own handle, so only one connection writes `ferry.db`).
pub async fn open_storage_with(
    dir: &Path,
    db: Option<Arc<Db>>,
) -> Result<(LogStore, StateMachine, Arc<Db>), RaftError> {
    let dir = dir.to_path_buf();
    let path = dir.clone();
    run_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|source| RaftError::Dir {
            path: dir.clone(),
            source,
        })?;
        let log_store = LogStore::open(&dir.join(LOG_FILE))?;
        let db = match db {
            Some(db) => db,
            None => Arc::new(Db::open(&dir.join(STATE_FILE))?),
        };
        let state_machine = StateMachine::open(Arc::clone(&db), &dir.join(SNAPSHOT_DIR))?;
        Ok::<_, RaftError>((log_store, state_machine, db))
    })
    .await
    .map_err(|source| RaftError::Dir { path, source })?
}
