//! Applying commands inside an open transaction.
//!
//! Every function validates before it writes, and the caller rolls the whole
//! transaction back on error, so a failed command changes nothing. Nothing here may
//! read the clock or anything else outside the database: apply must be deterministic.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::{apply_certificates, apply_members, apply_placement, Command, DbError, InstanceRecord};

pub(crate) fn command(conn: &Connection, cmd: &Command) -> Result<(), DbError> {
    match cmd {
        Command::CreateInstance { record } => create_instance(conn, record),
        Command::DeleteInstance { name } => {
            let id = instance_id(conn, name)?;
            // instances_config and instances_volatile go with it (ON DELETE CASCADE).
            conn.execute("DELETE FROM instances WHERE id = ?1", [id])?;
            Ok(())
        }
        Command::SetInstanceStatus {
            name,
            status,
            last_used_at,
        } => {
            let id = instance_id(conn, name)?;
            conn.execute(
                "UPDATE instances SET status = ?2, last_used_at = COALESCE(?3, last_used_at) WHERE id = ?1",
                params![id, status, last_used_at],
            )?;
            Ok(())
        }
        Command::UpdateVolatile { name, changes } => update_volatile(conn, name, changes),
        Command::SetInstanceConfig { name, config } => {
            let id = instance_id(conn, name)?;
            conn.execute("DELETE FROM instances_config WHERE instance_id = ?1", [id])?;
            insert_key_values(conn, "instances_config", id, config)
        }
        Command::MoveInstance {
            name,
            from_member,
            to_member,
        } => move_instance(conn, name, from_member, to_member),
        Command::AddMember { .. }
        | Command::AddJoinToken { .. }
        | Command::JoinMember { .. }
        | Command::RemoveMember { .. }
        | Command::SetMemberState { .. } => apply_members::command(conn, cmd),
        Command::AddCertificate { .. } | Command::RemoveCertificate { .. } => {
            apply_certificates::command(conn, cmd)
        }
        Command::ReservePlacement { .. } => apply_placement::command(conn, cmd),
    }
}

fn create_instance(conn: &Connection, r: &InstanceRecord) -> Result<(), DbError> {
    if find_instance(conn, &r.name)?.is_some() {
        return Err(DbError::AlreadyExists {
            what: "instance",
            name: r.name.clone(),
        });
    }
    conn.execute(
        "INSERT INTO instances (name, type, member, status, storage_pool, image, description,
             created_at, last_used_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            r.name,
            r.kind,
            r.member,
            r.status,
            r.storage_pool,
            r.image,
            r.description,
            r.created_at,
            r.last_used_at
        ],
    )?;
    let id = conn.last_insert_rowid();
    insert_key_values(conn, "instances_config", id, &r.config)?;
    insert_key_values(conn, "instances_volatile", id, &r.volatile)
}

fn update_volatile(
    conn: &Connection,
    name: &str,
    changes: &BTreeMap<String, Option<String>>,
) -> Result<(), DbError> {
    let id = instance_id(conn, name)?;
    for (key, value) in changes {
        match value {
            Some(value) => conn.execute(
                "INSERT INTO instances_volatile (instance_id, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (instance_id, key) DO UPDATE SET value = excluded.value",
                params![id, key, value],
            )?,
            None => conn.execute(
                "DELETE FROM instances_volatile WHERE instance_id = ?1 AND key = ?2",
                params![id, key],
            )?,
        };
    }
    Ok(())
}

fn move_instance(conn: &Connection, name: &str, from: &str, to: &str) -> Result<(), DbError> {
    let id = instance_id(conn, name)?;
    let member: String =
        conn.query_row("SELECT member FROM instances WHERE id = ?1", [id], |r| {
            r.get(0)
        })?;
    if member != from {
        return Err(DbError::Conflict(format!(
            "instance \"{name}\" is on member \"{member}\", not \"{from}\"; \
             it was moved concurrently: reload the instance and retry"
        )));
    }
    conn.execute(
        "UPDATE instances SET member = ?2 WHERE id = ?1",
        params![id, to],
    )?;
    // The move is done: its placement reservation (if any) is now real use.
    crate::apply_placement::clear(conn, id)
}

/// Inserts rows into `table` (a fixed table name, never user input).
fn insert_key_values(
    conn: &Connection,
    table: &str,
    id: i64,
    values: &BTreeMap<String, String>,
) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO {table} (instance_id, key, value) VALUES (?1, ?2, ?3)"
    ))?;
    for (key, value) in values {
        stmt.execute(params![id, key, value])?;
    }
    Ok(())
}

fn find_instance(conn: &Connection, name: &str) -> Result<Option<i64>, DbError> {
    Ok(conn
        .query_row("SELECT id FROM instances WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

fn instance_id(conn: &Connection, name: &str) -> Result<i64, DbError> {
    find_instance(conn, name)?.ok_or_else(|| DbError::NotFound {
        what: "instance",
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Db;

    fn record(name: &str) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            kind: "container".into(),
            member: "m1".into(),
            status: "Stopped".into(),
            storage_pool: "default".into(),
            image: "busybox".into(),
            description: format!("test instance {name}"),
            config: BTreeMap::from([("limits.memory".into(), "64MiB".into())]),
            volatile: BTreeMap::from([("volatile.uuid".into(), format!("uuid-{name}"))]),
            created_at: "2025-01-01T00:00:00Z".into(),
            last_used_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn db_with(names: &[&str]) -> Db {
        let db = Db::open_in_memory().unwrap();
        for name in names {
            db.apply(&Command::CreateInstance {
                record: record(name),
            })
            .unwrap();
        }
        db
    }

    #[test]
    fn create_and_delete() {
        let db = Db::open_in_memory().unwrap();
        assert_eq!(db.applied_index().unwrap(), 0);
        assert_eq!(
            db.apply(&Command::CreateInstance {
                record: record("c2")
            })
            .unwrap(),
            1
        );
        assert_eq!(
            db.apply(&Command::CreateInstance {
                record: record("c1")
            })
            .unwrap(),
            2
        );
        assert_eq!(db.get_instance("c1").unwrap(), Some(record("c1")));
        assert_eq!(
            db.list_instances().unwrap(),
            vec![record("c1"), record("c2")]
        );

        assert_eq!(
            db.apply(&Command::DeleteInstance { name: "c1".into() })
                .unwrap(),
            3
        );
        assert_eq!(db.get_instance("c1").unwrap(), None);
        assert_eq!(db.applied_index().unwrap(), 3);
        let orphans: i64 = db.with_conn(|c| {
            c.query_row(
                "SELECT (SELECT COUNT(*) FROM instances_config) + (SELECT COUNT(*) FROM instances_volatile)",
                [],
                |r| r.get(0),
            )
            .unwrap()
        });
        assert_eq!(orphans, 2, "only c2's config and volatile rows remain");
    }

    #[test]
    fn set_status() {
        let db = db_with(&["c1"]);
        let set = |status: &str, last_used_at: Option<&str>| Command::SetInstanceStatus {
            name: "c1".into(),
            status: status.into(),
            last_used_at: last_used_at.map(String::from),
        };
        db.apply(&set("Running", Some("2025-02-02T00:00:00Z")))
            .unwrap();
        let got = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(
            (got.status.as_str(), got.last_used_at.as_str()),
            ("Running", "2025-02-02T00:00:00Z")
        );
        db.apply(&set("Stopped", None)).unwrap();
        let got = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(
            (got.status.as_str(), got.last_used_at.as_str()),
            ("Stopped", "2025-02-02T00:00:00Z")
        );
    }

    #[test]
    fn update_volatile_sets_and_unsets() {
        let db = db_with(&["c1"]);
        let changes = BTreeMap::from([
            ("volatile.uuid".to_string(), None),
            (
                "volatile.last_state.power".to_string(),
                Some("RUNNING".to_string()),
            ),
            ("volatile.never_set".to_string(), None),
        ]);
        db.apply(&Command::UpdateVolatile {
            name: "c1".into(),
            changes,
        })
        .unwrap();
        let got = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(
            got.volatile,
            BTreeMap::from([("volatile.last_state.power".into(), "RUNNING".into())])
        );
        let changes = BTreeMap::from([(
            "volatile.last_state.power".to_string(),
            Some("STOPPED".to_string()),
        )]);
        db.apply(&Command::UpdateVolatile {
            name: "c1".into(),
            changes,
        })
        .unwrap();
        let got = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(got.volatile["volatile.last_state.power"], "STOPPED");
        assert_eq!(got.config, record("c1").config, "config untouched");
    }

    #[test]
    fn set_config_replaces_it() {
        let db = db_with(&["c1"]);
        let config = BTreeMap::from([("migration.stateful".to_string(), "true".to_string())]);
        db.apply(&Command::SetInstanceConfig {
            name: "c1".into(),
            config: config.clone(),
        })
        .unwrap();
        let got = db.get_instance("c1").unwrap().unwrap();
        assert_eq!(got.config, config);
        assert_eq!(got.volatile, record("c1").volatile, "volatile untouched");
    }

    #[test]
    fn move_instance() {
        let db = db_with(&["c1"]);
        let mv = |from: &str, to: &str| Command::MoveInstance {
            name: "c1".into(),
            from_member: from.into(),
            to_member: to.into(),
        };
        db.apply(&mv("m1", "m2")).unwrap();
        assert_eq!(db.get_instance("c1").unwrap().unwrap().member, "m2");

        let index = db.applied_index().unwrap();
        let err = db.apply(&mv("m1", "m3")).unwrap_err();
        assert!(
            matches!(&err, DbError::Conflict(m) if m.contains("\"m2\"")),
            "{err}"
        );
        assert_eq!(db.get_instance("c1").unwrap().unwrap().member, "m2");
        assert_eq!(db.applied_index().unwrap(), index);
    }

    #[test]
    fn failed_commands_change_nothing() {
        let db = db_with(&["c1"]);
        let before = (db.checksum().unwrap(), db.applied_index().unwrap());
        let mut dup = record("c1");
        dup.config.insert("other".into(), "x".into());
        let failing = [
            Command::CreateInstance { record: dup },
            Command::DeleteInstance {
                name: "ghost".into(),
            },
            Command::SetInstanceStatus {
                name: "ghost".into(),
                status: "Running".into(),
                last_used_at: None,
            },
            Command::UpdateVolatile {
                name: "ghost".into(),
                changes: BTreeMap::from([("volatile.a".into(), Some("1".into()))]),
            },
            Command::SetInstanceConfig {
                name: "ghost".into(),
                config: BTreeMap::new(),
            },
            Command::MoveInstance {
                name: "ghost".into(),
                from_member: "m1".into(),
                to_member: "m2".into(),
            },
            Command::MoveInstance {
                name: "c1".into(),
                from_member: "m9".into(),
                to_member: "m2".into(),
            },
        ];
        for cmd in &failing {
            let err = db.apply(cmd).unwrap_err();
            match (cmd, &err) {
                (
                    Command::CreateInstance { .. },
                    DbError::AlreadyExists {
                        what: "instance",
                        name,
                    },
                ) => {
                    assert_eq!(name, "c1")
                }
                (Command::MoveInstance { name, .. }, DbError::Conflict(_)) if name == "c1" => {}
                (
                    _,
                    DbError::NotFound {
                        what: "instance",
                        name,
                    },
                ) => assert_eq!(name, "ghost"),
                _ => panic!("{cmd:?} failed with an unexpected error: {err}"),
            }
            assert_eq!(
                (db.checksum().unwrap(), db.applied_index().unwrap()),
                before,
                "{cmd:?}"
            );
        }
        assert_eq!(
            DbError::NotFound {
                what: "instance",
                name: "c1".into()
            }
            .to_string(),
            "instance \"c1\" not found"
        );
    }

    #[test]
    fn checksum_depends_only_on_contents() {
        // Same contents reached in a different order (different row ids) -> same checksum.
        let a = db_with(&["c1", "c2"]);
        let b = db_with(&["c2", "x", "c1"]);
        b.apply(&Command::DeleteInstance { name: "x".into() })
            .unwrap();
        assert_eq!(a.checksum().unwrap(), b.checksum().unwrap());
        assert_eq!(a.checksum().unwrap().len(), 64);

        let changes = [
            Command::SetInstanceStatus {
                name: "c1".into(),
                status: "Running".into(),
                last_used_at: None,
            },
            Command::UpdateVolatile {
                name: "c1".into(),
                changes: BTreeMap::from([("volatile.uuid".into(), None)]),
            },
            Command::SetInstanceConfig {
                name: "c2".into(),
                config: BTreeMap::new(),
            },
            Command::MoveInstance {
                name: "c2".into(),
                from_member: "m1".into(),
                to_member: "m2".into(),
            },
            Command::DeleteInstance { name: "c1".into() },
        ];
        for cmd in changes {
            let c = db_with(&["c1", "c2"]);
            c.apply(&cmd).unwrap();
            assert_ne!(a.checksum().unwrap(), c.checksum().unwrap(), "{cmd:?}");
        }
        // A value moving between fields must not collide.
        let mut r1 = record("c3");
        r1.config = BTreeMap::from([("ab".into(), "c".into())]);
        let mut r2 = record("c3");
        r2.config = BTreeMap::from([("a".into(), "bc".into())]);
        let (d1, d2) = (Db::open_in_memory().unwrap(), Db::open_in_memory().unwrap());
        d1.apply(&Command::CreateInstance { record: r1 }).unwrap();
        d2.apply(&Command::CreateInstance { record: r2 }).unwrap();
        assert_ne!(d1.checksum().unwrap(), d2.checksum().unwrap());
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        let checksum = {
            let db = Db::open(&path).unwrap();
            db.apply(&Command::CreateInstance {
                record: record("c1"),
            })
            .unwrap();
            db.checksum().unwrap()
        };
        let db = Db::open(&path).unwrap();
        assert_eq!(db.applied_index().unwrap(), 1);
        assert_eq!(db.checksum().unwrap(), checksum);
        let mode: String = db.with_conn(|c| {
            c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap()
        });
        assert_eq!(mode, "wal");
        let fk: i64 = db.with_conn(|c| {
            c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))
                .unwrap()
        });
        assert_eq!(fk, 1);
    }
}
