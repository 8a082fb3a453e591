//! Applying the membership commands: members and join tokens.
//!
//! Same rules as `apply.rs`: validate everything before the first write (the caller
//! rolls the transaction or savepoint back on error), read nothing but the database —
//! the current time comes inside the command — and refuse bad input with a rejection
//! (`NotFound`, `AlreadyExists`, `Conflict`), never with a SQLite error: under raft a
//! non-rejection error stops the member's state machine.

use rusqlite::{params, Connection, OptionalExtension};

use crate::{Command, DbError, MEMBER_EVACUATED, MEMBER_ONLINE};

pub(crate) fn command(conn: &Connection, cmd: &Command) -> Result<(), DbError> {
    match cmd {
        Command::AddMember {
            name,
            node_id,
            address,
            version,
            joined_at,
        } => {
            let node_id = check_new_member(conn, name, *node_id)?;
            insert_member(conn, name, node_id, address, version, joined_at)
        }
        Command::AddJoinToken {
            member_name,
            secret_sha256,
            expires_at,
            created_at,
        } => add_join_token(conn, member_name, secret_sha256, *expires_at, created_at),
        Command::JoinMember {
            name,
            node_id,
            address,
            version,
            secret_sha256,
            now,
            joined_at,
        } => {
            redeem_token(conn, name, secret_sha256, *now)?;
            let node_id = check_new_member(conn, name, *node_id)?;
            conn.execute(
                "UPDATE join_tokens SET used = 1 WHERE member_name = ?1",
                [name],
            )?;
            insert_member(conn, name, node_id, address, version, joined_at)
        }
        Command::RemoveMember { name } => remove_member(conn, name),
        Command::SetMemberState { name, state } => {
            if state != MEMBER_ONLINE && state != MEMBER_EVACUATED {
                return Err(DbError::Conflict(format!(
                    "unknown member state \"{state}\" (expected \"{MEMBER_ONLINE}\" or \
                     \"{MEMBER_EVACUATED}\")"
                )));
            }
            member_id(conn, name)?;
            conn.execute(
                "UPDATE members SET state = ?2 WHERE name = ?1",
                params![name, state],
            )?;
            Ok(())
        }
        other => unreachable!("not a membership command: {}", other.op()),
    }
}

/// Checks that neither the name nor the node id is taken; returns the node id as stored.
fn check_new_member(conn: &Connection, name: &str, node_id: u64) -> Result<i64, DbError> {
    let stored = i64::try_from(node_id).map_err(|_| {
        DbError::Conflict(format!(
            "raft node id {node_id} is out of range (at most {})",
            i64::MAX
        ))
    })?;
    if find_member(conn, name)?.is_some() {
        return Err(DbError::AlreadyExists {
            what: "member",
            name: name.to_string(),
        });
    }
    let taken: Option<i64> = conn
        .query_row("SELECT id FROM members WHERE node_id = ?1", [stored], |r| {
            r.get(0)
        })
        .optional()?;
    if taken.is_some() {
        return Err(DbError::AlreadyExists {
            what: "raft node id",
            name: node_id.to_string(),
        });
    }
    Ok(stored)
}

fn insert_member(
    conn: &Connection,
    name: &str,
    node_id: i64,
    address: &str,
    version: &str,
    joined_at: &str,
) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO members (name, node_id, address, version, state, joined_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![name, node_id, address, version, MEMBER_ONLINE, joined_at],
    )?;
    Ok(())
}

fn add_join_token(
    conn: &Connection,
    member_name: &str,
    secret_sha256: &str,
    expires_at: i64,
    created_at: &str,
) -> Result<(), DbError> {
    if !is_sha256_hex(secret_sha256) {
        return Err(DbError::Conflict(
            "the join token digest is not a SHA-256 in lowercase hex (64 digits)".into(),
        ));
    }
    if find_member(conn, member_name)?.is_some() {
        return Err(DbError::AlreadyExists {
            what: "member",
            name: member_name.to_string(),
        });
    }
    // A token for a name that has not joined yet is replaced: only the newest one works.
    conn.execute(
        "INSERT INTO join_tokens (member_name, secret_sha256, expires_at, used, created_at)
         VALUES (?1, ?2, ?3, 0, ?4)
         ON CONFLICT (member_name) DO UPDATE SET
             secret_sha256 = excluded.secret_sha256,
             expires_at = excluded.expires_at,
             used = 0,
             created_at = excluded.created_at",
        params![member_name, secret_sha256, expires_at, created_at],
    )?;
    Ok(())
}

/// Validates the join token for `name` (without changing it). The secret is checked
/// first, so whoever lacks it learns nothing about the token's state.
fn redeem_token(
    conn: &Connection,
    name: &str,
    secret_sha256: &str,
    now: i64,
) -> Result<(), DbError> {
    let token: Option<(String, i64, i64)> = conn
        .query_row(
            "SELECT secret_sha256, expires_at, used FROM join_tokens WHERE member_name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((stored, expires_at, used)) = token else {
        // The message suggests `ferry cluster add NAME` (see `DbError`'s display).
        return Err(DbError::NotFound {
            what: "join token",
            name: name.to_string(),
        });
    };
    if !ct_eq(stored.as_bytes(), secret_sha256.as_bytes()) {
        return Err(DbError::Conflict("wrong join token secret".into()));
    }
    if used != 0 {
        return Err(DbError::Conflict("join token already used".into()));
    }
    if now > expires_at {
        return Err(DbError::Conflict("join token expired".into()));
    }
    Ok(())
}

fn remove_member(conn: &Connection, name: &str) -> Result<(), DbError> {
    let id = member_id(conn, name)?;
    let instances: i64 = conn.query_row(
        "SELECT COUNT(*) FROM instances WHERE member = ?1",
        [name],
        |r| r.get(0),
    )?;
    if instances > 0 {
        return Err(DbError::Conflict(format!(
            "member \"{name}\" still has {instances} instance(s): move or delete them first"
        )));
    }
    conn.execute("DELETE FROM members WHERE id = ?1", [id])?;
    // Its (used) token goes too, so the name can be added again later.
    conn.execute("DELETE FROM join_tokens WHERE member_name = ?1", [name])?;
    Ok(())
}

/// Whether `s` is a SHA-256 digest in lowercase hex (exactly 64 digits).
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Constant-time equality: the time taken depends on the lengths only (a SHA-256 hex
/// digest always has 64 bytes), not on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn find_member(conn: &Connection, name: &str) -> Result<Option<i64>, DbError> {
    Ok(conn
        .query_row("SELECT id FROM members WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

fn member_id(conn: &Connection, name: &str) -> Result<i64, DbError> {
    find_member(conn, name)?.ok_or_else(|| DbError::NotFound {
        what: "member",
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{Db, InstanceRecord, MemberRecord};

    const EXPIRES: i64 = 1_000;

    fn digest(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn add(name: &str, node_id: u64) -> Command {
        Command::AddMember {
            name: name.into(),
            node_id,
            address: format!("{name}.example:8443"),
            version: "0.1.0".into(),
            joined_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn token(name: &str, secret: char) -> Command {
        Command::AddJoinToken {
            member_name: name.into(),
            secret_sha256: digest(secret),
            expires_at: EXPIRES,
            created_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn join(name: &str, node_id: u64, secret: char, now: i64) -> Command {
        Command::JoinMember {
            name: name.into(),
            node_id,
            address: format!("{name}.example:8443"),
            version: "0.1.1".into(),
            secret_sha256: digest(secret),
            now,
            joined_at: "2025-01-01T00:10:00Z".into(),
        }
    }

    fn instance_on(name: &str, member: &str) -> Command {
        Command::CreateInstance {
            record: InstanceRecord {
                name: name.into(),
                kind: "container".into(),
                member: member.into(),
                status: "Stopped".into(),
                storage_pool: "default".into(),
                image: "busybox".into(),
                description: String::new(),
                config: BTreeMap::new(),
                volatile: BTreeMap::new(),
                created_at: "2025-01-01T00:00:00Z".into(),
                last_used_at: "2025-01-01T00:00:00Z".into(),
            },
        }
    }

    /// `cmd` (a `JoinMember`) with (address, secret_sha256, now) changed by `f`.
    fn with_join(mut cmd: Command, f: impl FnOnce(&mut String, &mut String, &mut i64)) -> Command {
        if let Command::JoinMember {
            address,
            secret_sha256,
            now,
            ..
        } = &mut cmd
        {
            f(address, secret_sha256, now);
        }
        cmd
    }

    /// `cmd` (an `AddJoinToken`) with its expiry changed by `f`.
    fn with_token(mut cmd: Command, f: impl FnOnce(&mut i64)) -> Command {
        if let Command::AddJoinToken { expires_at, .. } = &mut cmd {
            f(expires_at);
        }
        cmd
    }

    /// (member_name, secret_sha256, expires_at, used) of every token.
    fn tokens(db: &Db) -> Vec<(String, String, i64, i64)> {
        db.with_conn(|c| {
            c.prepare("SELECT member_name, secret_sha256, expires_at, used FROM join_tokens ORDER BY member_name")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        })
    }

    /// m1 bootstrapped (node 1), a pending token for m2 (secret 'a'), c1 on m1.
    fn cluster() -> Db {
        let db = Db::open_in_memory().unwrap();
        for cmd in [add("m1", 1), token("m2", 'a'), instance_on("c1", "m1")] {
            db.apply(&cmd).unwrap();
        }
        db
    }

    #[test]
    fn add_member_and_reads() {
        let db = Db::open_in_memory().unwrap();
        assert_eq!(db.list_members().unwrap(), vec![]);
        db.apply(&add("m2", 7)).unwrap();
        db.apply(&add("m1", 1)).unwrap();
        let m1 = MemberRecord {
            name: "m1".into(),
            node_id: 1,
            address: "m1.example:8443".into(),
            version: "0.1.0".into(),
            state: "online".into(),
            joined_at: "2025-01-01T00:00:00Z".into(),
        };
        assert_eq!(db.get_member("m1").unwrap(), Some(m1.clone()));
        assert_eq!(db.get_member("m3").unwrap(), None);
        assert_eq!(db.member_by_node_id(1).unwrap(), Some(m1.clone()));
        assert_eq!(db.member_by_node_id(2).unwrap(), None);
        assert_eq!(db.member_by_node_id(u64::MAX).unwrap(), None);
        let names: Vec<_> = db
            .list_members()
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["m1", "m2"]);
        // The largest storable node id round-trips.
        db.apply(&add("m3", i64::MAX as u64)).unwrap();
        assert_eq!(
            db.member_by_node_id(i64::MAX as u64).unwrap().unwrap().name,
            "m3"
        );
    }

    #[test]
    fn join_with_a_token() {
        let db = cluster();
        assert_eq!(tokens(&db), [("m2".into(), digest('a'), EXPIRES, 0)]);
        // A new token for a pending name replaces the old one.
        db.apply(&token("m2", 'b')).unwrap();
        assert_eq!(tokens(&db), [("m2".into(), digest('b'), EXPIRES, 0)]);
        // Expiry is inclusive: `now == expires_at` still joins.
        db.apply(&join("m2", 2, 'b', EXPIRES)).unwrap();
        assert_eq!(tokens(&db), [("m2".into(), digest('b'), EXPIRES, 1)]);
        let m2 = db.get_member("m2").unwrap().unwrap();
        assert_eq!(
            (
                m2.node_id,
                m2.state.as_str(),
                m2.version.as_str(),
                m2.joined_at.as_str()
            ),
            (2, "online", "0.1.1", "2025-01-01T00:10:00Z")
        );
        assert_eq!(db.member_by_node_id(2).unwrap(), Some(m2));
    }

    #[test]
    fn set_state_and_remove() {
        let db = cluster();
        db.apply(&join("m2", 2, 'a', 0)).unwrap();
        db.apply(&Command::SetMemberState {
            name: "m2".into(),
            state: "evacuated".into(),
        })
        .unwrap();
        assert_eq!(db.get_member("m2").unwrap().unwrap().state, "evacuated");
        db.apply(&Command::RemoveMember { name: "m2".into() })
            .unwrap();
        assert_eq!(db.get_member("m2").unwrap(), None);
        assert_eq!(db.member_by_node_id(2).unwrap(), None);
        assert_eq!(tokens(&db), [], "the used token goes with the member");
        // The name and node id can be used again.
        db.apply(&token("m2", 'c')).unwrap();
        db.apply(&join("m2", 2, 'c', 0)).unwrap();
        // Once its instances are gone, m1 can go too.
        db.apply(&Command::DeleteInstance { name: "c1".into() })
            .unwrap();
        db.apply(&Command::RemoveMember { name: "m1".into() })
            .unwrap();
        let names: Vec<_> = db
            .list_members()
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["m2"]);
    }

    fn assert_err(err: &DbError, expected: &str) {
        assert_eq!(err.to_string(), expected);
        assert!(err.is_rejection(), "{err}");
    }

    #[test]
    fn refusals_change_nothing() {
        let db = cluster();
        // m3 joined with secret 'c'; its token is used.
        db.apply(&token("m3", 'c')).unwrap();
        db.apply(&join("m3", 3, 'c', 0)).unwrap();
        let before = (
            db.checksum().unwrap(),
            db.applied_index().unwrap(),
            tokens(&db),
            db.list_members().unwrap(),
        );
        let cases: Vec<(Command, &str)> = vec![
            (add("m1", 9), "member \"m1\" already exists"),
            (add("m9", 1), "raft node id \"1\" already exists"),
            (
                add("m9", u64::MAX),
                "raft node id 18446744073709551615 is out of range (at most 9223372036854775807)",
            ),
            (token("m1", 'a'), "member \"m1\" already exists"),
            (
                Command::AddJoinToken {
                    member_name: "m9".into(),
                    secret_sha256: "A".repeat(64),
                    expires_at: EXPIRES,
                    created_at: "t".into(),
                },
                "the join token digest is not a SHA-256 in lowercase hex (64 digits)",
            ),
            (
                join("m9", 9, 'a', 0),
                "join token \"m9\" not found: create one with `ferry cluster add m9` on a \
                 cluster member, then join with the token it prints (the name must match)",
            ),
            (join("m2", 2, 'b', 0), "wrong join token secret"),
            (
                with_join(join("m2", 2, 'a', 0), |_, digest, _| *digest = "a".into()),
                "wrong join token secret",
            ),
            (join("m2", 2, 'a', EXPIRES + 1), "join token expired"),
            (join("m3", 4, 'c', 0), "join token already used"),
            // The wrong secret is reported before the token's state.
            (join("m3", 4, 'a', EXPIRES + 1), "wrong join token secret"),
            (join("m2", 1, 'a', 0), "raft node id \"1\" already exists"),
            (
                join("m2", u64::MAX, 'a', 0),
                "raft node id 18446744073709551615 is out of range (at most 9223372036854775807)",
            ),
            (
                Command::RemoveMember { name: "m9".into() },
                "member \"m9\" not found",
            ),
            (
                Command::RemoveMember { name: "m1".into() },
                "member \"m1\" still has 1 instance(s): move or delete them first",
            ),
            (
                Command::SetMemberState {
                    name: "m9".into(),
                    state: "online".into(),
                },
                "member \"m9\" not found",
            ),
            (
                Command::SetMemberState {
                    name: "m1".into(),
                    state: "asleep".into(),
                },
                "unknown member state \"asleep\" (expected \"online\" or \"evacuated\")",
            ),
        ];
        for (cmd, expected) in &cases {
            let err = db.apply(cmd).unwrap_err();
            assert_err(&err, expected);
            let after = (
                db.checksum().unwrap(),
                db.applied_index().unwrap(),
                tokens(&db),
                db.list_members().unwrap(),
            );
            assert_eq!(after, before, "{cmd:?}");
        }
        // A member added without a token (bootstrap) under a pending name: the token
        // can no longer be redeemed.
        db.apply(&add("m2", 2)).unwrap();
        assert_err(
            &db.apply(&join("m2", 5, 'a', 0)).unwrap_err(),
            "member \"m2\" already exists",
        );
        assert_eq!(tokens(&db)[0].3, 0, "the token stays unused");
    }

    #[test]
    fn checksum_covers_members_and_tokens() {
        let base = cluster();
        let sum = base.checksum().unwrap();
        // Same contents in another order -> same checksum.
        let other = Db::open_in_memory().unwrap();
        for cmd in [instance_on("c1", "m1"), token("m2", 'a'), add("m1", 1)] {
            other.apply(&cmd).unwrap();
        }
        assert_eq!(other.checksum().unwrap(), sum);

        let changes = [
            add("m9", 9),
            token("m9", 'b'),
            token("m2", 'b'),
            join("m2", 2, 'a', 0),
            Command::SetMemberState {
                name: "m1".into(),
                state: "evacuated".into(),
            },
            with_token(token("m2", 'a'), |expires_at| *expires_at += 1),
        ];
        for cmd in changes {
            let db = cluster();
            db.apply(&cmd).unwrap();
            assert_ne!(db.checksum().unwrap(), sum, "{cmd:?}");
        }
        // Members differing only in node id or address differ.
        let mut moved = add("m1", 1);
        if let Command::AddMember { address, .. } = &mut moved {
            *address = "elsewhere:1".into();
        }
        let sums: Vec<String> = [add("m1", 1), add("m1", 2), moved]
            .iter()
            .map(|cmd| {
                let db = Db::open_in_memory().unwrap();
                db.apply(cmd).unwrap();
                db.checksum().unwrap()
            })
            .collect();
        assert_ne!(sums[0], sums[1]);
        assert_ne!(sums[0], sums[2]);
    }

    #[test]
    fn ct_eq_compares_whole_inputs() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }
}
