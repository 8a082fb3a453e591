//! The database handle: opening, reads and the state checksum.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use crate::{apply, certificates, members, schema, Command, DbError, InstanceRecord};

/// The ferry database: one SQLite connection behind a mutex. `Send + Sync`; share it
/// with `Arc`. Calls block on SQLite, so async callers write through [`crate::Writer`].
pub struct Db {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path` and runs pending schema updates.
    /// The parent directory must exist.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = Connection::open(path)?;
        // Another process (e.g. a second ferryd by mistake) may hold the write lock briefly.
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, path = %path.display(), "database did not switch to WAL journal mode");
        }
        Db::setup(conn)
    }

    /// An empty, private in-memory database (tests, tools).
    pub fn open_in_memory() -> Result<Db, DbError> {
        Db::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Db, DbError> {
        // FULL: a committed transaction (and so an acknowledged command) survives power loss.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        schema::update(&mut conn)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied command behind: an
        // unfinished transaction rolls back when dropped. So poisoning is harmless.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn with_conn<T>(&self, f: impl FnOnce(&Connection) -> T) -> T {
        f(&self.lock())
    }

    pub fn schema_version(&self) -> Result<u32, DbError> {
        schema::version(&self.lock())
    }

    /// Applies one command in one transaction together with bumping `meta.applied_index`;
    /// returns the new applied index. On error nothing changes and the index stays.
    pub fn apply(&self, cmd: &Command) -> Result<u64, DbError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        apply::command(&tx, cmd)?;
        let index = applied_index(&tx)? + 1;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'applied_index'",
            [index.to_string()],
        )?;
        tx.commit()?;
        tracing::debug!(op = cmd.op(), index, "applied command");
        Ok(index)
    }

    /// Index of the last command applied.
    pub fn applied_index(&self) -> Result<u64, DbError> {
        applied_index(&self.lock())
    }

    pub fn get_instance(&self, name: &str) -> Result<Option<InstanceRecord>, DbError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                &format!("{INSTANCE_SELECT} WHERE name = ?1"),
                [name],
                instance_row,
            )
            .optional()?;
        row.map(|(id, record)| complete(&conn, id, record))
            .transpose()
    }

    /// All instances, sorted by name.
    pub fn list_instances(&self) -> Result<Vec<InstanceRecord>, DbError> {
        list_instances(&self.lock())
    }

    /// SHA-256 (hex) over the state machine contents — instances with their config and
    /// volatile keys, then members and join tokens, then trusted certificates — in a
    /// canonical order. Equal contents give equal checksums on any member, whatever the
    /// row ids or insertion order. (`meta`, with the applied index and raft bookkeeping, is left out.)
    pub fn checksum(&self) -> Result<String, DbError> {
        let conn = self.lock();
        let instances = list_instances(&conn)?;
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        // v2: members and join tokens joined (schema version 3); v3: certificates
        // (schema version 4).
        field(b"ferry-db state checksum v3");
        field(&(instances.len() as u64).to_le_bytes());
        for r in &instances {
            for s in [
                &r.name,
                &r.kind,
                &r.member,
                &r.status,
                &r.storage_pool,
                &r.image,
                &r.description,
            ] {
                field(s.as_bytes());
            }
            field(r.created_at.as_bytes());
            field(r.last_used_at.as_bytes());
            for map in [&r.config, &r.volatile] {
                field(&(map.len() as u64).to_le_bytes());
                for (k, v) in map {
                    field(k.as_bytes());
                    field(v.as_bytes());
                }
            }
        }
        members::checksum_fields(&conn, &mut field)?;
        certificates::checksum_fields(&conn, &mut field)?;
        Ok(format!("{:x}", hasher.finalize()))
    }
}

pub(crate) fn applied_index(conn: &Connection) -> Result<u64, DbError> {
    let value: String = conn.query_row(
        "SELECT value FROM meta WHERE key = 'applied_index'",
        [],
        |r| r.get(0),
    )?;
    value
        .parse()
        .map_err(|_| DbError::Encode(format!("meta.applied_index is not a number: {value:?}")))
}

const INSTANCE_SELECT: &str =
    "SELECT id, name, type, member, status, storage_pool, image, description,
    created_at, last_used_at FROM instances";

/// Maps an `INSTANCE_SELECT` row; config and volatile are filled by [`complete`].
fn instance_row(r: &Row<'_>) -> rusqlite::Result<(i64, InstanceRecord)> {
    let record = InstanceRecord {
        name: r.get(1)?,
        kind: r.get(2)?,
        member: r.get(3)?,
        status: r.get(4)?,
        storage_pool: r.get(5)?,
        image: r.get(6)?,
        description: r.get(7)?,
        config: BTreeMap::new(),
        volatile: BTreeMap::new(),
        created_at: r.get(8)?,
        last_used_at: r.get(9)?,
    };
    Ok((r.get(0)?, record))
}

fn complete(
    conn: &Connection,
    id: i64,
    mut record: InstanceRecord,
) -> Result<InstanceRecord, DbError> {
    record.config = key_values(conn, "instances_config", id)?;
    record.volatile = key_values(conn, "instances_volatile", id)?;
    Ok(record)
}

/// The key/value rows of one instance in `table` (a fixed table name, never user input).
fn key_values(
    conn: &Connection,
    table: &str,
    id: i64,
) -> Result<BTreeMap<String, String>, DbError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT key, value FROM {table} WHERE instance_id = ?1"
    ))?;
    let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn list_instances(conn: &Connection) -> Result<Vec<InstanceRecord>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("{INSTANCE_SELECT} ORDER BY name"))?;
    let rows = stmt
        .query_map([], instance_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(id, record)| complete(conn, id, record))
        .collect()
}
