//! The raft log store: log entries, vote, committed and last purged log id in a
//! member-local SQLite file (`DIR/raft.db`, WAL, `synchronous=FULL`).
//!
//! ```sql
//! CREATE TABLE log   (idx INTEGER PRIMARY KEY, log_id TEXT NOT NULL, entry TEXT NOT NULL);
//! CREATE TABLE store (key TEXT PRIMARY KEY, value TEXT NOT NULL);  -- vote, committed, last_purged
//! ```
//!
//! `log_id` and `entry` are the serde JSON of openraft's `LogId` and `Entry` (whose
//! payload is a versioned `LogCommand`); `store` values are JSON too. The layout
//! version is `PRAGMA user_version` (1). Every write is one transaction, and
//! [`RaftLogStorage::append`] reports the entries flushed only after the commit
//! returned, so a follower never acknowledges an entry it could lose.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogId, LogState, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use rusqlite::{params, Connection, OptionalExtension};

use super::{run_blocking, NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

/// Layout version of `raft.db`, kept in `PRAGMA user_version`.
const LOG_STORE_VERSION: u32 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    idx    INTEGER PRIMARY KEY,
    log_id TEXT NOT NULL,
    entry  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS store (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("raft log database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot encode or decode a raft log record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "the raft log {path} has layout version {found}, newer than this ferry supports \
         ({supported}); upgrade ferry on this member"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("raft log storage task failed: {0}")]
    Task(#[from] std::io::Error),
}

/// The SQLite raft log of one member. Cheap to clone (it is also its own log reader);
/// all clones share one connection.
#[derive(Clone)]
pub struct LogStore {
    conn: Arc<Mutex<Connection>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens (creating if needed) the log at `path`; the parent directory must exist.
    pub fn open(path: &Path) -> Result<LogStore, LogStoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, path = %path.display(), "raft log did not switch to WAL journal mode");
        }
        // FULL: a committed append (and so an acknowledged entry) survives power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let found: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > LOG_STORE_VERSION {
            return Err(LogStoreError::TooNew {
                path: path.to_path_buf(),
                found,
                supported: LOG_STORE_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", LOG_STORE_VERSION)?;
        Ok(LogStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` on the connection on a blocking thread (commits fsync).
    async fn with_conn<T, F>(&self, f: F) -> Result<T, LogStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, LogStoreError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        run_blocking(move || f(&mut lock(&conn))).await?
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // An unfinished transaction rolls back when dropped, so poisoning is harmless.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

fn get_json<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    key: &str,
) -> Result<Option<T>, LogStoreError> {
    let value: Option<String> = conn
        .query_row("SELECT value FROM store WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(value.map(|v| serde_json::from_str(&v)).transpose()?)
}

fn put_json<T: serde::Serialize>(
    conn: &Connection,
    key: &str,
    value: &T,
) -> Result<(), LogStoreError> {
    conn.execute(
        "INSERT INTO store (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, serde_json::to_string(value)?],
    )?;
    Ok(())
}

/// Inclusive SQL bounds of a range of log indexes; `None` if it is empty.
fn index_bounds<RB: RangeBounds<u64>>(range: &RB) -> Option<(i64, i64)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    (start <= end).then(|| (clamp(start), clamp(end)))
}

fn read_err(e: LogStoreError) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: LogStoreError) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let Some((start, end)) = index_bounds(&range) else {
            return Ok(Vec::new());
        };
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT entry FROM log WHERE idx >= ?1 AND idx <= ?2 ORDER BY idx",
            )?;
            let rows = stmt.query_map([start, end], |r| r.get::<_, String>(0))?;
            let mut entries = Vec::new();
            for row in rows {
                entries.push(serde_json::from_str(&row?)?);
            }
            Ok(entries)
        })
        .await
        .map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        self.with_conn(|conn| {
            let last_purged: Option<LogId<NodeId>> = get_json(conn, LAST_PURGED)?;
            let last: Option<String> = conn
                .query_row(
                    "SELECT log_id FROM log ORDER BY idx DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let last_log_id = match last {
                Some(json) => Some(serde_json::from_str(&json)?),
                None => last_purged,
            };
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id,
            })
        })
        .await
        .map_err(read_err)
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.with_conn(move |conn| put_json(conn, VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.with_conn(|conn| get_json(conn, VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // The committed log id is a hint (it lets a restarted member re-apply up to it
        // before hearing from the leader), so it need not cost an fsync per commit:
        // with WAL and synchronous=NORMAL the write is ordered before, and made durable
        // by, the next FULL commit (an append).
        self.with_conn(move |conn| {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            let written = put_json(conn, COMMITTED, &committed);
            conn.pragma_update(None, "synchronous", "FULL")?;
            written
        })
        .await
        .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        self.with_conn(|conn| Ok(get_json::<Option<LogId<NodeId>>>(conn, COMMITTED)?.flatten()))
            .await
            .map_err(read_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode on the caller's thread; the blocking thread only writes.
        let mut rows = Vec::new();
        for entry in entries {
            let index = i64::try_from(entry.log_id.index)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            let log_id = serde_json::to_string(&entry.log_id)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            let json = serde_json::to_string(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            rows.push((index, log_id, json));
        }
        let written = self
            .with_conn(move |conn| {
                let tx = conn.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT OR REPLACE INTO log (idx, log_id, entry) VALUES (?1, ?2, ?3)",
                    )?;
                    for (index, log_id, json) in &rows {
                        stmt.execute(params![index, log_id, json])?;
                    }
                }
                // synchronous=FULL: once commit returns, the entries are on disk.
                tx.commit()?;
                Ok(())
            })
            .await;
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let since = i64::try_from(log_id.index).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            conn.execute("DELETE FROM log WHERE idx >= ?1", [since])?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let upto = i64::try_from(log_id.index).unwrap_or(i64::MAX);
        self.with_conn(move |conn| {
            let tx = conn.transaction()?;
            put_json(&tx, LAST_PURGED, &log_id)?;
            tx.execute("DELETE FROM log WHERE idx <= ?1", [upto])?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_bounds_cover_every_range_shape() {
        assert_eq!(index_bounds(&(3..7)), Some((3, 6)));
        assert_eq!(index_bounds(&(3..=7)), Some((3, 7)));
        assert_eq!(index_bounds(&(..)), Some((0, i64::MAX)));
        assert_eq!(index_bounds(&(5..5)), None);
        assert_eq!(index_bounds(&(0..0)), None);
        assert_eq!(
            index_bounds(&(Bound::Excluded(2), Bound::Unbounded)),
            Some((3, i64::MAX))
        );
    }

    #[test]
    fn refuses_a_newer_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.db");
        drop(LogStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", LOG_STORE_VERSION + 1)
            .unwrap();
        assert!(matches!(
            LogStore::open(&path),
            Err(LogStoreError::TooNew { .. })
        ));
    }
}
