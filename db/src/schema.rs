//! Schema updates.
//!
//! `UPDATES` is append-only: entry `i` upgrades the schema from version `i` to `i + 1`.
//! Never edit or reorder an existing entry — databases in the field have already run
//! it. To change the schema, append a new entry and document it in `doc/db.md`.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::DbError;

/// Version of the schema this code creates and understands: the number of updates.
pub const SCHEMA_VERSION: u32 = UPDATES.len() as u32;

const UPDATES: &[&str] = &[UPDATE_1, UPDATE_2];

/// Version 1: the initial schema.
const UPDATE_1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('applied_index', '0');

CREATE TABLE members (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL
);

CREATE TABLE instances (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    type         TEXT NOT NULL,
    member       TEXT NOT NULL,
    status       TEXT NOT NULL,
    storage_pool TEXT NOT NULL,
    image        TEXT NOT NULL,
    description  TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL
);

CREATE TABLE instances_config (
    id          INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    UNIQUE (instance_id, key)
);

CREATE TABLE instances_volatile (
    id          INTEGER PRIMARY KEY,
    instance_id INTEGER NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    UNIQUE (instance_id, key)
);
";

/// Version 2: index instances by member, for evacuation and per-member listings.
const UPDATE_2: &str = "
CREATE INDEX instances_member ON instances (member);
";

/// Brings the schema up to date. Returns the resulting version.
pub(crate) fn update(conn: &mut Connection) -> Result<u32, DbError> {
    update_with(conn, UPDATES)
}

/// Runs the pending entries of `updates` in one transaction, so a failed update leaves
/// the database at its previous version.
pub(crate) fn update_with(conn: &mut Connection, updates: &[&str]) -> Result<u32, DbError> {
    let code = updates.len() as u32;
    // IMMEDIATE: take the write lock up front so two processes opening the same file
    // cannot both decide to run the same update.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema (
            version    INTEGER PRIMARY KEY,
            applied_at TEXT NOT NULL
        );",
    )?;
    let current = version(&tx)?;
    if current > code {
        return Err(DbError::SchemaTooNew { db: current, code });
    }
    for (index, sql) in updates.iter().enumerate().skip(current as usize) {
        let next = index as u32 + 1;
        tracing::info!(from = index, to = next, "updating database schema");
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema (version, applied_at)
             VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            [next],
        )?;
    }
    tx.commit()?;
    Ok(code)
}

/// The schema version recorded in the database (0 for an empty database).
pub(crate) fn version(conn: &Connection) -> Result<u32, DbError> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(0);
    }
    let v: Option<u32> = conn.query_row("SELECT MAX(version) FROM schema", [], |r| r.get(0))?;
    Ok(v.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, Db};

    fn schema_sql(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY type, name")
            .unwrap();
        let rows = stmt.query_map([], |r| {
            Ok(format!(
                "{} {}: {}",
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?
            ))
        });
        rows.unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn updates_from_empty() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(version(&conn).unwrap(), 0);
        assert_eq!(update(&mut conn).unwrap(), SCHEMA_VERSION);
        assert_eq!(version(&conn).unwrap(), SCHEMA_VERSION);
        let versions: Vec<u32> = conn
            .prepare("SELECT version FROM schema ORDER BY version")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
        // Running again is a no-op.
        assert_eq!(update(&mut conn).unwrap(), SCHEMA_VERSION);
        assert_eq!(
            conn.query_row("SELECT COUNT(*) FROM schema", [], |r| r.get::<_, u32>(0))
                .unwrap(),
            SCHEMA_VERSION
        );
    }

    #[test]
    fn opening_at_each_intermediate_version_upgrades() {
        let fresh = {
            let mut conn = Connection::open_in_memory().unwrap();
            update(&mut conn).unwrap();
            schema_sql(&conn)
        };
        for k in 0..=UPDATES.len() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ferry.db");
            {
                let mut conn = Connection::open(&path).unwrap();
                assert_eq!(update_with(&mut conn, &UPDATES[..k]).unwrap(), k as u32);
                if k >= 1 {
                    conn.execute(
                        "INSERT INTO instances (name, type, member, status, storage_pool, image,
                             description, created_at, last_used_at)
                         VALUES ('old', 'container', 'm1', 'Stopped', 'default', 'busybox', '', 't0', 't0')",
                        [],
                    )
                    .unwrap();
                }
            }
            let db = Db::open(&path).unwrap();
            assert_eq!(
                db.schema_version().unwrap(),
                SCHEMA_VERSION,
                "from version {k}"
            );
            assert_eq!(db.with_conn(schema_sql), fresh, "from version {k}");
            if k >= 1 {
                let old = db
                    .get_instance("old")
                    .unwrap()
                    .expect("row kept across updates");
                assert_eq!(old.member, "m1");
            }
            db.apply(&Command::DeleteInstance {
                name: "nope".into(),
            })
            .unwrap_err();
        }
    }

    #[test]
    fn refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        drop(Db::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute(
                "INSERT INTO schema (version, applied_at) VALUES (?1, 'later')",
                [SCHEMA_VERSION + 1],
            )
            .unwrap();
        }
        match Db::open(&path) {
            Err(DbError::SchemaTooNew { db, code }) => {
                assert_eq!((db, code), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("opened a database newer than the code"),
        }
        let msg = DbError::SchemaTooNew { db: 3, code: 2 }.to_string();
        assert!(msg.contains("upgrade ferry"), "{msg}");
    }
}
