//! The raft state machine over the cluster database ([`ferry_db::Db`]).
//!
//! A batch of committed entries is applied in one SQLite transaction that also records
//! the last applied log id and the last membership (`Db::apply_log_entries`), so after
//! a crash the database and its recorded position always agree. A rejected command
//! still advances the applied log id; its refusal is the entry's [`ApplyResult`].

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ferry_db::{Db, LogCommand, LogEntry, RaftMeta};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, StorageError,
    StorageIOError, StoredMembership,
};

use super::snapshot::{self, Meta, SnapshotError, SnapshotStore};
use super::{run_blocking, ApplyResult, NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<NodeId, BasicNode>;

/// The state machine of one member. Cloning shares the database and snapshot store.
#[derive(Debug, Clone)]
pub struct StateMachine {
    db: Arc<Db>,
    snapshots: Arc<SnapshotStore>,
}

/// Builds snapshots of the state machine (a copy of the database).
#[derive(Debug, Clone)]
pub struct SnapshotBuilder {
    sm: StateMachine,
}

/// An entry decoded for `Db::apply_log_entries`, owned so it can cross to a blocking thread.
struct OwnedEntry {
    index: u64,
    log_id: String,
    command: Option<LogCommand>,
    membership: Option<String>,
}

impl StateMachine {
    /// The state machine over `db`, keeping snapshots in `snapshot_dir` (created if needed).
    pub fn open(db: Arc<Db>, snapshot_dir: &Path) -> Result<StateMachine, SnapshotError> {
        let snapshots = SnapshotStore::open(snapshot_dir)?;
        snapshots.clean()?;
        Ok(StateMachine {
            db,
            snapshots: Arc::new(snapshots),
        })
    }

    /// The cluster database this state machine applies to.
    pub fn db(&self) -> &Arc<Db> {
        &self.db
    }

    fn build(&self) -> Result<(Meta, Vec<u8>), SnapshotError> {
        let tmp = self.snapshots.temp_path("build");
        let exported = self
            .db
            .export_snapshot(&tmp)
            .map_err(SnapshotError::from)
            .and_then(|raft_meta| match std::fs::read(&tmp) {
                Ok(bytes) => Ok((raft_meta, bytes)),
                Err(source) => Err(SnapshotError::Io {
                    path: tmp.clone(),
                    source,
                }),
            });
        let _ = std::fs::remove_file(&tmp);
        let (raft_meta, bytes) = exported?;
        let (last_log_id, last_membership) = decode_raft_meta(&raft_meta)?;
        let snapshot_id = match &last_log_id {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, unique_suffix()),
            None => format!("none-{}", unique_suffix()),
        };
        let meta = Meta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let data = snapshot::encode(&meta, &bytes)?;
        self.snapshots.save(&meta, &data)?;
        Ok((meta, data))
    }

    fn install(&self, meta: &Meta, data: &[u8]) -> Result<(), SnapshotError> {
        let (inner_meta, db_bytes) = snapshot::decode(data)?;
        if inner_meta.last_log_id != meta.last_log_id {
            return Err(SnapshotError::Format(format!(
                "snapshot data is for log id {:?} but its metadata says {:?}",
                inner_meta.last_log_id, meta.last_log_id
            )));
        }
        let tmp = self.snapshots.temp_path("install");
        let imported = std::fs::write(&tmp, db_bytes)
            .map_err(|source| SnapshotError::Io {
                path: tmp.clone(),
                source,
            })
            .and_then(|()| Ok(self.db.import_snapshot(&tmp)?));
        let _ = std::fs::remove_file(&tmp);
        let (applied, _) = decode_raft_meta(&imported?)?;
        if applied != meta.last_log_id {
            return Err(SnapshotError::Format(format!(
                "installed snapshot database records log id {applied:?}, expected {:?}",
                meta.last_log_id
            )));
        }
        self.snapshots.save(meta, data)
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn decode_raft_meta(
    meta: &RaftMeta,
) -> Result<(Option<LogId<NodeId>>, Membership), serde_json::Error> {
    let applied = meta
        .applied_log_id
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?;
    let membership = meta
        .membership
        .as_deref()
        .map(serde_json::from_str)
        .transpose()?
        .unwrap_or_default();
    Ok((applied, membership))
}

fn owned_entry(entry: Entry) -> Result<OwnedEntry, serde_json::Error> {
    let log_id = serde_json::to_string(&entry.log_id)?;
    let (command, membership) = match entry.payload {
        EntryPayload::Blank => (None, None),
        EntryPayload::Normal(cmd) => (Some(cmd), None),
        EntryPayload::Membership(m) => {
            let stored = Membership::new(Some(entry.log_id), m);
            (None, Some(serde_json::to_string(&stored)?))
        }
    };
    Ok(OwnedEntry {
        index: entry.log_id.index,
        log_id,
        command,
        membership,
    })
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let db = Arc::clone(&self.db);
        let meta = run_blocking(move || db.raft_meta())
            .await
            .map_err(sm_read_err)?
            .map_err(sm_read_err)?;
        decode_raft_meta(&meta).map_err(sm_read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let owned = entries
            .into_iter()
            .map(owned_entry)
            .collect::<Result<Vec<_>, _>>()
            .map_err(sm_write_err)?;
        if owned.is_empty() {
            return Ok(Vec::new());
        }
        let db = Arc::clone(&self.db);
        let (indexes, outcomes) = run_blocking(move || {
            let entries: Vec<LogEntry<'_>> = owned
                .iter()
                .map(|e| LogEntry {
                    index: e.index,
                    log_id: &e.log_id,
                    command: e.command.as_ref().map(|c| &c.command),
                    request: e.command.as_ref().and_then(|c| c.request.as_deref()),
                    membership: e.membership.as_deref(),
                })
                .collect();
            let indexes: Vec<u64> = owned.iter().map(|e| e.index).collect();
            db.apply_log_entries(&entries).map(|r| (indexes, r))
        })
        .await
        .map_err(sm_write_err)?
        .map_err(sm_write_err)?;
        let mut results = Vec::with_capacity(outcomes.len());
        for (index, outcome) in indexes.into_iter().zip(outcomes) {
            results.push(match outcome {
                Ok(()) => ApplyResult::Applied { index },
                Err(err) => {
                    tracing::debug!(index, error = %err, "raft entry rejected by the state machine");
                    ApplyResult::rejected(index, &err).ok_or_else(|| sm_write_err(err))?
                }
            });
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let sm = self.clone();
        let owned_meta = meta.clone();
        let data = snapshot.into_inner();
        run_blocking(move || sm.install(&owned_meta, &data))
            .await
            .map_err(sm_write_err)?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "installed raft snapshot");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let store = Arc::clone(&self.snapshots);
        let current = run_blocking(move || store.load())
            .await
            .map_err(sm_read_err)?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let sm = self.sm.clone();
        let (meta, data) = run_blocking(move || sm.build())
            .await
            .map_err(sm_read_err)?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, last_log_id = ?meta.last_log_id, "built raft snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
