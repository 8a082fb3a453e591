//! Placement reservations: memory promised to an instance that is about to move
//! to a member (evacuation). Stored as `volatile.placement.*` keys of the
//! instance, so they replicate, snapshot and checksum with it; `MoveInstance`
//! removes them, a failed move's clean-up unsets them, and an expired one no
//! longer counts (the submitter of a later reservation supplies `now`).
//!
//! Same rules as `apply.rs`: validate before the first write, read nothing but
//! the database, refuse with `Conflict`/`NotFound` rejections.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use crate::{Command, Db, DbError, MEMBER_EVACUATED};

const TARGET: &str = "volatile.placement.target";
const MEMORY: &str = "volatile.placement.memory";
const EXPIRES: &str = "volatile.placement.expires";
/// The keys a reservation writes (unset them all to release it).
pub const PLACEMENT_KEYS: [&str; 3] = [TARGET, MEMORY, EXPIRES];

/// One live reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub instance: String,
    pub member: String,
    pub memory: u64,
    pub expires_at: i64,
}

pub(crate) fn command(conn: &Connection, cmd: &Command) -> Result<(), DbError> {
    let Command::ReservePlacement {
        name,
        member,
        memory,
        capacity,
        now,
        expires_at,
    } = cmd
    else {
        unreachable!("apply_placement::command called with {}", cmd.op());
    };
    let (id, on): (i64, String) = conn
        .query_row(
            "SELECT id, member FROM instances WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(|_| DbError::NotFound {
            what: "instance",
            name: name.clone(),
        })?;
    if &on == member {
        return Err(DbError::Conflict(format!(
            "instance \"{name}\" is already on member \"{member}\""
        )));
    }
    let state: String = conn
        .query_row("SELECT state FROM members WHERE name = ?1", [member], |r| {
            r.get(0)
        })
        .map_err(|_| DbError::NotFound {
            what: "member",
            name: member.clone(),
        })?;
    if state == MEMBER_EVACUATED {
        return Err(DbError::Conflict(format!(
            "member \"{member}\" is evacuated: no instance can be placed on it"
        )));
    }
    let reserved: u64 = reservations(conn, *now)?
        .into_iter()
        .filter(|r| &r.member == member && &r.instance != name)
        .map(|r| r.memory)
        .sum();
    if reserved.saturating_add(*memory) > *capacity {
        return Err(DbError::Conflict(format!(
            "member \"{member}\" cannot take {memory} more bytes of memory: {reserved} of its \
             {capacity} free bytes are already reserved by other moves"
        )));
    }
    let mut put = conn.prepare_cached(
        "INSERT INTO instances_volatile (instance_id, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (instance_id, key) DO UPDATE SET value = excluded.value",
    )?;
    put.execute(params![id, TARGET, member])?;
    put.execute(params![id, MEMORY, memory.to_string()])?;
    put.execute(params![id, EXPIRES, expires_at.to_string()])?;
    Ok(())
}

/// Removes instance `id`'s reservation (its move completed).
pub(crate) fn clear(conn: &Connection, id: i64) -> Result<(), DbError> {
    conn.execute(
        "DELETE FROM instances_volatile WHERE instance_id = ?1 AND key IN (?2, ?3, ?4)",
        params![id, TARGET, MEMORY, EXPIRES],
    )?;
    Ok(())
}

/// Reservations that have not expired at `now` (unix seconds). A malformed
/// one (not written by this code) counts as nothing.
fn reservations(conn: &Connection, now: i64) -> Result<Vec<Reservation>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT i.name, v.key, v.value FROM instances_volatile v
         JOIN instances i ON i.id = v.instance_id
         WHERE v.key IN (?1, ?2, ?3) ORDER BY i.name",
    )?;
    let rows = stmt
        .query_map(params![TARGET, MEMORY, EXPIRES], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut by: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (name, key, value) in rows {
        by.entry(name).or_default().insert(key, value);
    }
    Ok(by
        .into_iter()
        .filter_map(|(instance, keys)| {
            Some(Reservation {
                member: keys.get(TARGET)?.clone(),
                memory: keys.get(MEMORY)?.parse().ok()?,
                expires_at: keys.get(EXPIRES)?.parse().ok()?,
                instance,
            })
        })
        .filter(|r| r.expires_at > now)
        .collect())
}

impl Db {
    /// Live placement reservations at `now` (unix seconds), by instance name.
    pub fn placement_reservations(&self, now: i64) -> Result<Vec<Reservation>, DbError> {
        reservations(&self.lock(), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InstanceRecord;

    fn db_with(instances: &[(&str, &str)]) -> Db {
        let db = Db::open_in_memory().unwrap();
        for (i, m) in ["m1", "m2", "m3"].iter().enumerate() {
            db.apply(&Command::AddMember {
                name: m.to_string(),
                node_id: i as u64 + 1,
                address: format!("127.0.0.1:{}", 9000 + i),
                version: "0".into(),
                joined_at: "2025-01-01T00:00:00Z".into(),
            })
            .unwrap();
        }
        for (name, member) in instances {
            db.apply(&Command::CreateInstance {
                record: InstanceRecord {
                    name: name.to_string(),
                    kind: "container".into(),
                    member: member.to_string(),
                    status: "Running".into(),
                    storage_pool: "default".into(),
                    image: "busybox".into(),
                    description: String::new(),
                    config: Default::default(),
                    volatile: Default::default(),
                    created_at: "2025-01-01T00:00:00Z".into(),
                    last_used_at: "2025-01-01T00:00:00Z".into(),
                },
            })
            .unwrap();
        }
        db
    }

    fn reserve(name: &str, member: &str, memory: u64, capacity: u64, now: i64) -> Command {
        Command::ReservePlacement {
            name: name.into(),
            member: member.into(),
            memory,
            capacity,
            now,
            expires_at: now + 60,
        }
    }

    #[test]
    fn a_second_reservation_that_does_not_fit_is_refused_and_changes_nothing() {
        let db = db_with(&[("a", "m1"), ("b", "m3")]);
        db.apply(&reserve("a", "m2", 600, 1000, 100)).unwrap();
        let sum = db.checksum().unwrap();
        // b's evacuator saw the same 1000 free bytes on m2: 600 are promised to a.
        let err = db.apply(&reserve("b", "m2", 500, 1000, 101)).unwrap_err();
        assert!(
            matches!(&err, DbError::Conflict(m) if m.contains("600 of its 1000")),
            "{err}"
        );
        assert_eq!(db.checksum().unwrap(), sum);
        db.apply(&reserve("b", "m2", 400, 1000, 101)).unwrap();
        let live = db.placement_reservations(101).unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].member, "m2");
        assert_eq!(live[0].memory, 600);
    }

    #[test]
    fn moving_clears_and_expiry_releases_a_reservation() {
        let db = db_with(&[("a", "m1"), ("b", "m1")]);
        db.apply(&reserve("a", "m2", 600, 1000, 100)).unwrap();
        db.apply(&Command::MoveInstance {
            name: "a".into(),
            from_member: "m1".into(),
            to_member: "m2".into(),
        })
        .unwrap();
        assert!(db.placement_reservations(100).unwrap().is_empty());
        let a = db.get_instance("a").unwrap().unwrap();
        assert!(a
            .volatile
            .keys()
            .all(|k| !k.starts_with("volatile.placement.")));
        // An abandoned reservation stops counting once expired.
        db.apply(&reserve("b", "m3", 900, 1000, 100)).unwrap();
        assert!(db.apply(&reserve("a", "m3", 200, 1000, 120)).is_err());
        db.apply(&reserve("a", "m3", 200, 1000, 161)).unwrap();
    }

    #[test]
    fn evacuated_or_current_member_and_unknown_names_are_refused() {
        let db = db_with(&[("a", "m1")]);
        db.apply(&Command::SetMemberState {
            name: "m2".into(),
            state: MEMBER_EVACUATED.into(),
        })
        .unwrap();
        let e = db.apply(&reserve("a", "m2", 1, 10, 0)).unwrap_err();
        assert!(e.to_string().contains("evacuated"), "{e}");
        let e = db.apply(&reserve("a", "m1", 1, 10, 0)).unwrap_err();
        assert!(e.to_string().contains("already on"), "{e}");
        assert!(matches!(
            db.apply(&reserve("zz", "m3", 1, 10, 0)).unwrap_err(),
            DbError::NotFound { .. }
        ));
        assert!(matches!(
            db.apply(&reserve("a", "m9", 1, 10, 0)).unwrap_err(),
            DbError::NotFound { .. }
        ));
    }
}
