//! What the raft state machine needs from the database: applying committed log
//! entries together with the raft bookkeeping, and exporting/importing snapshots.
//!
//! Raft's own types (log ids, memberships) stay opaque here — the caller passes them as
//! JSON strings and gets them back — so `ferry-db` does not depend on openraft. They
//! live in `meta` (`raft_applied_log_id`, `raft_membership`), which the state checksum
//! leaves out. See `doc/cluster.md`.

use std::path::Path;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::{apply, schema, Command, Db, DbError, SCHEMA_VERSION};

const APPLIED_LOG_ID: &str = "raft_applied_log_id";
const MEMBERSHIP: &str = "raft_membership";

/// One committed raft log entry, as the state machine hands it to the database.
#[derive(Debug, Clone, Copy)]
pub struct LogEntry<'a> {
    /// The entry's log index; becomes `meta.applied_index`.
    pub index: u64,
    /// The entry's log id (JSON), recorded as the last applied one.
    pub log_id: &'a str,
    /// The command of a normal entry; `None` for blank and membership entries.
    pub command: Option<&'a Command>,
    /// The command's request id ([`crate::LogCommand::request`]), if it has one.
    pub request: Option<&'a str>,
    /// For a membership entry, the new stored membership (JSON).
    pub membership: Option<&'a str>,
}

/// The raft bookkeeping stored with the state (both JSON, `None` before the first entry).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftMeta {
    pub applied_log_id: Option<String>,
    pub membership: Option<String>,
}

impl DbError {
    /// Whether this error is a command's deterministic refusal (every member refuses the
    /// same entry the same way) rather than a failure of the database itself.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            DbError::NotFound { .. } | DbError::AlreadyExists { .. } | DbError::Conflict(_)
        )
    }
}

impl Db {
    /// Applies committed raft entries, in order, in ONE transaction that also records
    /// the last entry's index and log id (and any new membership).
    ///
    /// A command that is rejected ([`DbError::is_rejection`]) runs inside a savepoint
    /// that is rolled back: it changes nothing, but its index still counts as applied
    /// and its rejection is returned in its slot of the result. Any other error fails
    /// the whole batch and nothing is recorded.
    pub fn apply_log_entries(
        &self,
        entries: &[LogEntry<'_>],
    ) -> Result<Vec<Result<(), DbError>>, DbError> {
        let mut conn = self.lock();
        let mut tx = conn.transaction()?;
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            let outcome = match (entry.command, entry.request) {
                (None, _) => Ok(()),
                (Some(cmd), None) => apply_refusable(&mut tx, cmd)?,
                (Some(cmd), Some(id)) => {
                    let outcome = match earlier_outcome(&tx, id, entry.index)? {
                        // A retry of a write applied before: answered, not applied again.
                        Some(first) => first,
                        None => apply_refusable(&mut tx, cmd)?,
                    };
                    record_outcome(&tx, id, entry.index, &outcome)?;
                    outcome
                }
            };
            if let Some(membership) = entry.membership {
                set_meta(&tx, MEMBERSHIP, membership)?;
            }
            results.push(outcome);
        }
        if let Some(last) = entries.last() {
            set_meta(&tx, "applied_index", &last.index.to_string())?;
            set_meta(&tx, APPLIED_LOG_ID, last.log_id)?;
            tx.execute(
                "DELETE FROM applied_requests WHERE log_index + ?1 < ?2",
                [KEEP_REQUESTS, last.index],
            )?;
        }
        tx.commit()?;
        Ok(results)
    }

    /// The raft bookkeeping recorded with the current state.
    pub fn raft_meta(&self) -> Result<RaftMeta, DbError> {
        read_raft_meta(&self.lock())
    }

    /// Writes a consistent copy of the database to `path` (`VACUUM INTO`; the file must
    /// not exist) and returns the raft bookkeeping of exactly that copy.
    pub fn export_snapshot(&self, path: &Path) -> Result<RaftMeta, DbError> {
        let target = path
            .to_str()
            .ok_or_else(|| DbError::Encode(format!("snapshot path {path:?} is not UTF-8")))?;
        let conn = self.lock();
        let meta = read_raft_meta(&conn)?;
        conn.execute("VACUUM INTO ?1", [target])?;
        Ok(meta)
    }

    /// Replaces the whole database with the snapshot file at `path` (made by
    /// [`Db::export_snapshot`], possibly by an older ferry: its schema is brought up to
    /// date afterwards) and returns the snapshot's raft bookkeeping. The copy is one
    /// SQLite backup step, so it is atomic: a crash leaves the old or the new contents.
    pub fn import_snapshot(&self, path: &Path) -> Result<RaftMeta, DbError> {
        let src = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let version = schema::version(&src)?;
        if version > SCHEMA_VERSION {
            return Err(DbError::SchemaTooNew {
                db: version,
                code: SCHEMA_VERSION,
            });
        }
        if version == 0 {
            return Err(DbError::Encode(
                "the snapshot is not a ferry database (no schema)".into(),
            ));
        }
        let meta = read_raft_meta(&src)?;
        let mut conn = self.lock();
        {
            let backup = Backup::new(&src, &mut conn)?;
            match backup.step(-1)? {
                StepResult::Done => {}
                other => {
                    return Err(DbError::Encode(format!(
                        "copying the snapshot into the database did not finish ({other:?}); retry"
                    )))
                }
            }
        }
        schema::update(&mut conn)?;
        Ok(meta)
    }
}

/// Apply `cmd` in a savepoint: its refusal ([`DbError::is_rejection`]) rolls
/// it back and is the outcome; any other error fails the batch.
fn apply_refusable(
    tx: &mut rusqlite::Transaction<'_>,
    cmd: &Command,
) -> Result<Result<(), DbError>, DbError> {
    let sp = tx.savepoint()?;
    match apply::command(&sp, cmd) {
        Ok(()) => {
            sp.commit()?;
            Ok(Ok(()))
        }
        // Dropping the savepoint rolls it back.
        Err(err) if err.is_rejection() => Ok(Err(err)),
        Err(err) => Err(err),
    }
}

/// How many log entries a request id is remembered for (a proposer retries
/// within seconds; this is far more entries than a cluster commits meanwhile).
pub const KEEP_REQUESTS: u64 = 100_000;

/// The outcome of request `id` if an entry at most [`KEEP_REQUESTS`] before
/// `index` applied it.
fn earlier_outcome(
    conn: &Connection,
    id: &str,
    index: u64,
) -> Result<Option<Result<(), DbError>>, DbError> {
    let row: Option<Option<String>> = conn
        .query_row(
            "SELECT rejection FROM applied_requests WHERE id = ?1 AND log_index + ?2 >= ?3",
            rusqlite::params![id, KEEP_REQUESTS, index],
            |r| r.get(0),
        )
        .optional()?;
    Ok(row.map(|rejection| match rejection {
        None => Ok(()),
        Some(text) => Err(DbError::Conflict(text)),
    }))
}

fn record_outcome(
    conn: &Connection,
    id: &str,
    index: u64,
    outcome: &Result<(), DbError>,
) -> Result<(), DbError> {
    let rejection = outcome.as_ref().err().map(|e| e.to_string());
    conn.execute(
        "INSERT INTO applied_requests (id, log_index, rejection) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET log_index = excluded.log_index,
                                        rejection = excluded.rejection",
        rusqlite::params![id, index, rejection],
    )?;
    Ok(())
}

fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

fn get_meta(conn: &Connection, key: &str) -> Result<Option<String>, DbError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

fn read_raft_meta(conn: &Connection) -> Result<RaftMeta, DbError> {
    Ok(RaftMeta {
        applied_log_id: get_meta(conn, APPLIED_LOG_ID)?,
        membership: get_meta(conn, MEMBERSHIP)?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{InstanceRecord, LogCommand};

    fn create(name: &str) -> Command {
        Command::CreateInstance {
            record: InstanceRecord {
                name: name.into(),
                kind: "container".into(),
                member: "m1".into(),
                status: "Stopped".into(),
                storage_pool: "default".into(),
                image: "busybox".into(),
                description: String::new(),
                config: BTreeMap::from([("limits.cpu".into(), "1".into())]),
                volatile: BTreeMap::new(),
                created_at: "2025-01-01T00:00:00Z".into(),
                last_used_at: "2025-01-01T00:00:00Z".into(),
            },
        }
    }

    fn entry<'a>(index: u64, log_id: &'a str, command: Option<&'a Command>) -> LogEntry<'a> {
        LogEntry {
            index,
            log_id,
            command,
            request: None,
            membership: None,
        }
    }

    fn status(name: &str, status: &str) -> Command {
        Command::SetInstanceStatus {
            name: name.into(),
            status: status.into(),
            last_used_at: None,
        }
    }

    #[test]
    fn a_retried_request_is_applied_once_and_answered_with_its_first_outcome() {
        let db = Db::open_in_memory().unwrap();
        let tagged = |index, cmd, id| LogEntry {
            request: Some(id),
            ..entry(index, "\"x\"", Some(cmd))
        };
        let (c1, running, stopped) = (
            create("c1"),
            status("c1", "Running"),
            status("c1", "Stopped"),
        );
        let mv = Command::MoveInstance {
            name: "c1".into(),
            from_member: "m9".into(),
            to_member: "m2".into(),
        };
        let first = db
            .apply_log_entries(&[
                tagged(1, &c1, "r1"),
                tagged(2, &running, "r2"),
                tagged(3, &stopped, "r3"),
                tagged(4, &mv, "r4"),
            ])
            .unwrap();
        assert!(first[..3].iter().all(|r| r.is_ok()), "{first:?}");
        let refused = match &first[3] {
            Err(DbError::Conflict(m)) => m.clone(),
            other => panic!("{other:?}"),
        };
        // Retries, in a later batch: the answer of the first time, no effect.
        let retries = db
            .apply_log_entries(&[
                tagged(5, &running, "r2"),
                tagged(6, &c1, "r1"),
                tagged(7, &mv, "r4"),
                // The same command under a new id is a new write.
                tagged(8, &c1, "r8"),
            ])
            .unwrap();
        assert!(retries[0].is_ok() && retries[1].is_ok(), "{retries:?}");
        assert!(matches!(&retries[2], Err(DbError::Conflict(m)) if *m == refused));
        assert!(matches!(retries[3], Err(DbError::AlreadyExists { .. })));
        // The interleaved "Stopped" was not overwritten by the retried "Running".
        assert_eq!(db.get_instance("c1").unwrap().unwrap().status, "Stopped");
        assert_eq!(db.applied_index().unwrap(), 8);
        // Forgotten after KEEP_REQUESTS entries: then it is a new write again.
        let late = KEEP_REQUESTS + 10;
        let r = db.apply_log_entries(&[tagged(late, &c1, "r1")]).unwrap();
        assert!(matches!(r[0], Err(DbError::AlreadyExists { .. })), "{r:?}");
        let kept: Vec<(String, u64)> = db
            .lock()
            .prepare("SELECT id, log_index FROM applied_requests")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            kept,
            vec![("r1".to_string(), late)],
            "only the last entry's request is kept"
        );
    }

    #[test]
    fn rejected_entry_advances_the_index_and_changes_nothing() {
        let db = Db::open_in_memory().unwrap();
        let c1 = create("c1");
        let mv = Command::MoveInstance {
            name: "c1".into(),
            from_member: "m9".into(),
            to_member: "m2".into(),
        };
        let results = db
            .apply_log_entries(&[
                entry(3, "\"a\"", Some(&c1)),
                entry(4, "\"b\"", Some(&c1)),
                entry(5, "\"c\"", Some(&mv)),
                LogEntry {
                    membership: Some("\"m\""),
                    ..entry(6, "\"d\"", None)
                },
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(DbError::AlreadyExists { .. })));
        assert!(matches!(results[2], Err(DbError::Conflict(_))));
        assert!(results[3].is_ok());
        assert_eq!(db.applied_index().unwrap(), 6);
        assert_eq!(
            db.raft_meta().unwrap(),
            RaftMeta {
                applied_log_id: Some("\"d\"".into()),
                membership: Some("\"m\"".into())
            }
        );
        assert_eq!(db.get_instance("c1").unwrap().unwrap().member, "m1");
    }

    #[test]
    fn rejected_join_advances_the_index() {
        let db = Db::open_in_memory().unwrap();
        let token = Command::AddJoinToken {
            member_name: "m2".into(),
            secret_sha256: "a".repeat(64),
            expires_at: 100,
            created_at: "2025-01-01T00:00:00Z".into(),
        };
        let join = |secret: char, now: i64| Command::JoinMember {
            name: "m2".into(),
            node_id: 2,
            address: "m2:8443".into(),
            version: "0.1.0".into(),
            secret_sha256: secret.to_string().repeat(64),
            now,
            joined_at: "2025-01-01T00:01:00Z".into(),
        };
        let (wrong, late, good) = (join('b', 1), join('a', 101), join('a', 100));
        let results = db
            .apply_log_entries(&[
                entry(1, "\"a\"", Some(&token)),
                entry(2, "\"b\"", Some(&wrong)),
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(&results[1], Err(DbError::Conflict(m)) if m == "wrong join token secret"));
        assert_eq!(db.applied_index().unwrap(), 2);
        assert_eq!(
            db.raft_meta().unwrap().applied_log_id.as_deref(),
            Some("\"b\"")
        );
        assert_eq!(db.get_member("m2").unwrap(), None);

        let results = db
            .apply_log_entries(&[
                entry(3, "\"c\"", Some(&late)),
                entry(4, "\"d\"", Some(&good)),
                entry(5, "\"e\"", Some(&good)),
            ])
            .unwrap();
        assert!(matches!(&results[0], Err(DbError::Conflict(m)) if m == "join token expired"));
        assert!(results[1].is_ok());
        // Replaying the same join (e.g. a retried submit) is refused: one member per token.
        assert!(matches!(&results[2], Err(DbError::Conflict(m)) if m == "join token already used"));
        assert_eq!(db.applied_index().unwrap(), 5);
        assert_eq!(db.get_member("m2").unwrap().unwrap().node_id, 2);
    }

    #[test]
    fn certificate_commands_through_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("a.db")).unwrap();
        let fp = "c".repeat(64);
        let add = Command::AddCertificate {
            fingerprint: fp.clone(),
            name: "alice".into(),
            kind: "client".into(),
            certificate: "-----BEGIN CERTIFICATE-----\nc\n-----END CERTIFICATE-----\n".into(),
            created_at: "2025-01-01T00:00:00Z".into(),
        };
        let bad_type = Command::AddCertificate {
            fingerprint: "d".repeat(64),
            name: "bob".into(),
            kind: "server".into(),
            certificate: "x".into(),
            created_at: "2025-01-01T00:00:00Z".into(),
        };
        let remove = Command::RemoveCertificate {
            fingerprint: fp.clone(),
        };
        // Entries as they travel: encoded and decoded like openraft does.
        let decoded: Vec<Command> = [&add, &add, &bad_type]
            .iter()
            .map(|cmd| {
                let bytes = LogCommand::new((*cmd).clone()).encode().unwrap();
                serde_json::from_slice::<LogCommand>(&bytes)
                    .unwrap()
                    .command
            })
            .collect();
        let results = db
            .apply_log_entries(&[
                entry(1, "\"a\"", Some(&decoded[0])),
                entry(2, "\"b\"", Some(&decoded[1])),
                entry(3, "\"c\"", Some(&decoded[2])),
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(
            matches!(&results[1], Err(DbError::AlreadyExists { what: "certificate", name }) if *name == fp)
        );
        assert!(matches!(&results[2], Err(DbError::Conflict(_))));
        assert_eq!(db.applied_index().unwrap(), 3);
        assert!(db.is_trusted_fingerprint(&fp).unwrap());
        assert_eq!(db.list_certificates().unwrap().len(), 1);

        // A snapshot carries the certificates.
        let snap = dir.path().join("snap.db");
        db.export_snapshot(&snap).unwrap();
        let other = Db::open_in_memory().unwrap();
        other.import_snapshot(&snap).unwrap();
        assert_eq!(other.checksum().unwrap(), db.checksum().unwrap());
        assert_eq!(
            other.get_certificate(&fp).unwrap(),
            db.get_certificate(&fp).unwrap()
        );

        let results = db
            .apply_log_entries(&[
                entry(4, "\"d\"", Some(&remove)),
                entry(5, "\"e\"", Some(&remove)),
            ])
            .unwrap();
        assert!(results[0].is_ok());
        assert!(matches!(
            &results[1],
            Err(DbError::NotFound {
                what: "certificate",
                ..
            })
        ));
        assert_eq!(db.applied_index().unwrap(), 5);
        assert!(!db.is_trusted_fingerprint(&fp).unwrap());
        assert_ne!(other.checksum().unwrap(), db.checksum().unwrap());
    }

    #[test]
    fn snapshot_export_and_import_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let source = Db::open(&dir.path().join("a.db")).unwrap();
        let c1 = create("c1");
        source
            .apply_log_entries(&[LogEntry {
                membership: Some("\"m\""),
                ..entry(7, "\"x\"", Some(&c1))
            }])
            .unwrap();
        let snap = dir.path().join("snap.db");
        let meta = source.export_snapshot(&snap).unwrap();
        assert_eq!(meta.applied_log_id.as_deref(), Some("\"x\""));

        let target = Db::open(&dir.path().join("b.db")).unwrap();
        let c2 = create("c2");
        target
            .apply_log_entries(&[entry(1, "\"y\"", Some(&c2))])
            .unwrap();
        assert_eq!(target.import_snapshot(&snap).unwrap(), meta);
        assert_eq!(target.checksum().unwrap(), source.checksum().unwrap());
        assert_eq!(target.applied_index().unwrap(), 7);
        assert_eq!(target.raft_meta().unwrap(), meta);
        assert!(target.get_instance("c2").unwrap().is_none());
        // The live database keeps working after the import.
        target
            .apply_log_entries(&[entry(8, "\"z\"", Some(&c2))])
            .unwrap();
        assert!(target.get_instance("c2").unwrap().is_some());

        // Also into an in-memory database.
        let mem = Db::open_in_memory().unwrap();
        mem.import_snapshot(&snap).unwrap();
        assert_eq!(mem.checksum().unwrap(), source.checksum().unwrap());
    }

    #[test]
    fn import_refuses_a_file_that_is_not_a_ferry_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let db = Db::open_in_memory().unwrap();
        assert!(matches!(db.import_snapshot(&path), Err(DbError::Encode(_))));
    }
}
