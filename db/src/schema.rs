//! Schema updates.
//!
//! `UPDATES` is append-only: entry `i` upgrades the schema from version `i` to `i + 1`.
//! Never edit or reorder an existing entry — databases in the field have already run
//! it. To change the schema, append a new entry and document it in `doc/db.md`.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::DbError;

/// Version of the schema this code creates and understands: the number of updates.
pub const SCHEMA_VERSION: u32 = UPDATES.len() as u32;

const UPDATES: &[&str] = &[UPDATE_1, UPDATE_2, UPDATE_3, UPDATE_4, UPDATE_5];

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

/// Version 3: cluster membership and join tokens.
///
/// `members` (from version 1, never written before) gains its raft node id, ferry
/// version, state and join time. SQLite cannot add a UNIQUE column, so `node_id`
/// is unique through an index; rows from before this update keep a NULL node id.
const UPDATE_3: &str = "
ALTER TABLE members ADD COLUMN node_id INTEGER;
ALTER TABLE members ADD COLUMN version TEXT NOT NULL DEFAULT '';
ALTER TABLE members ADD COLUMN state TEXT NOT NULL DEFAULT 'online';
ALTER TABLE members ADD COLUMN joined_at TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX members_node_id ON members (node_id);

CREATE TABLE join_tokens (
    member_name   TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    expires_at    INTEGER NOT NULL,
    used          INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);
";

/// Version 4: trusted client certificates (Incus's `/1.0/certificates`).
///
/// `fingerprint` is the SHA-256 of the certificate's DER, lowercase hex, computed by
/// the daemon (the database never parses PEM). Names need not be unique.
const UPDATE_4: &str = "
CREATE TABLE certificates (
    fingerprint TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    type        TEXT NOT NULL,
    certificate TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
";

/// Version 5: the replicated writes applied recently, by request id, so that a
/// retried write is applied once (`rejection`: NULL when it was applied, else
/// the refusal's text). Rows older than `replicated::KEEP_REQUESTS` entries go.
const UPDATE_5: &str = "
CREATE TABLE applied_requests (
    id        TEXT PRIMARY KEY,
    log_index INTEGER NOT NULL,
    rejection TEXT
);
CREATE INDEX applied_requests_log_index ON applied_requests (log_index);
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

    const CERT_FP: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

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
                    conn.execute(
                        "INSERT INTO members (name, address) VALUES ('m1', '10.0.0.1:8443')",
                        [],
                    )
                    .unwrap();
                }
                if k >= 4 {
                    conn.execute(
                        "INSERT INTO certificates (fingerprint, name, type, certificate, created_at)
                         VALUES (?1, 'alice', 'client', 'PEM', 't0')",
                        [CERT_FP],
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
                let address: String = db.with_conn(|c| {
                    c.query_row("SELECT address FROM members WHERE name = 'm1'", [], |r| {
                        r.get(0)
                    })
                    .unwrap()
                });
                assert_eq!(address, "10.0.0.1:8443", "member row kept across updates");
            }
            assert_eq!(
                db.is_trusted_fingerprint(CERT_FP).unwrap(),
                k >= 4,
                "certificate row kept across updates (from version {k})"
            );
            db.apply(&Command::DeleteInstance {
                name: "nope".into(),
            })
            .unwrap_err();
        }
    }

    #[test]
    fn update_3_keeps_version_2_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            assert_eq!(update_with(&mut conn, &UPDATES[..2]).unwrap(), 2);
            conn.execute_batch(
                "INSERT INTO instances (name, type, member, status, storage_pool, image,
                     description, created_at, last_used_at)
                 VALUES ('c1', 'container', 'old', 'Running', 'default', 'busybox', 'd', 't0', 't1');
                 INSERT INTO instances_config (instance_id, key, value) VALUES (1, 'limits.cpu', '1');
                 INSERT INTO members (name, address) VALUES ('old', '10.0.0.9:8443');
                 UPDATE meta SET value = '41' WHERE key = 'applied_index';",
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(db.applied_index().unwrap(), 41);
        let c1 = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(
            (c1.member.as_str(), c1.config["limits.cpu"].as_str()),
            ("old", "1")
        );
        // The version 1 member row is kept, with the new columns' defaults. It has no
        // raft node id, so the typed reads refuse it (with a way out) ...
        let row: (String, String, Option<i64>, String, String, String) = db.with_conn(|c| {
            c.query_row(
                "SELECT name, address, node_id, version, state, joined_at FROM members",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .unwrap()
        });
        assert_eq!(
            row,
            (
                "old".into(),
                "10.0.0.9:8443".into(),
                None,
                "".into(),
                "online".into(),
                "".into()
            )
        );
        let err = db.get_member("old").unwrap_err();
        assert!(
            err.to_string().contains("ferry cluster remove old"),
            "{err}"
        );
        db.checksum().unwrap();
        // ... and the commands work with it: it blocks its name, and can be removed
        // once its instance is gone.
        assert!(matches!(
            db.apply(&Command::AddJoinToken {
                member_name: "old".into(),
                secret_sha256: "0".repeat(64),
                expires_at: 1,
                created_at: "t".into(),
            }),
            Err(DbError::AlreadyExists { what: "member", .. })
        ));
        db.apply(&Command::DeleteInstance { name: "c1".into() })
            .unwrap();
        db.apply(&Command::RemoveMember { name: "old".into() })
            .unwrap();
        assert_eq!(db.list_members().unwrap(), vec![]);
        // Two new members without node ids cannot collide on the unique index.
        db.with_conn(|c| {
            c.execute_batch("INSERT INTO members (name, address) VALUES ('a', 'x'), ('b', 'y');")
                .unwrap()
        });
    }

    #[test]
    fn update_4_keeps_version_3_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        let (sum, members, instances) = {
            // The same contents written through commands at the current version, to
            // compare the upgraded database with.
            let db = Db::open_in_memory().unwrap();
            db.apply(&Command::AddMember {
                name: "m1".into(),
                node_id: 1,
                address: "10.0.0.1:8443".into(),
                version: "0.1.0".into(),
                joined_at: "t0".into(),
            })
            .unwrap();
            db.apply(&Command::AddJoinToken {
                member_name: "m2".into(),
                secret_sha256: "a".repeat(64),
                expires_at: 5,
                created_at: "t0".into(),
            })
            .unwrap();
            (
                db.checksum().unwrap(),
                db.list_members().unwrap(),
                db.list_instances().unwrap(),
            )
        };
        {
            let mut conn = Connection::open(&path).unwrap();
            assert_eq!(update_with(&mut conn, &UPDATES[..3]).unwrap(), 3);
            conn.execute_batch(&format!(
                "INSERT INTO members (name, address, node_id, version, state, joined_at)
                 VALUES ('m1', '10.0.0.1:8443', 1, '0.1.0', 'online', 't0');
                 INSERT INTO join_tokens (member_name, secret_sha256, expires_at, used, created_at)
                 VALUES ('m2', '{}', 5, 0, 't0');
                 UPDATE meta SET value = '77' WHERE key = 'applied_index';
                 INSERT INTO meta (key, value) VALUES ('raft_applied_log_id', '\"x\"');",
                "a".repeat(64)
            ))
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(db.applied_index().unwrap(), 77);
        assert_eq!(
            db.raft_meta().unwrap().applied_log_id.as_deref(),
            Some("\"x\"")
        );
        assert_eq!(db.list_members().unwrap(), members);
        assert_eq!(db.list_instances().unwrap(), instances);
        assert_eq!(db.checksum().unwrap(), sum);
        // The new table starts empty and works.
        assert_eq!(db.list_certificates().unwrap(), vec![]);
        assert!(!db.is_trusted_fingerprint(&"f".repeat(64)).unwrap());
        db.apply(&Command::AddCertificate {
            fingerprint: "f".repeat(64),
            name: "alice".into(),
            kind: "client".into(),
            certificate: "PEM".into(),
            created_at: "t1".into(),
        })
        .unwrap();
        assert!(db.is_trusted_fingerprint(&"f".repeat(64)).unwrap());
        assert_eq!(db.applied_index().unwrap(), 78);
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
