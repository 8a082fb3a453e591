//! Cluster members and join tokens: reads, and their part of the state checksum.
//! (Applying the member commands is in `apply_members.rs`.)

use rusqlite::{Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::{Db, DbError};

/// Member state: serving instances.
pub const MEMBER_ONLINE: &str = "online";
/// Member state: its instances were moved away (maintenance).
pub const MEMBER_EVACUATED: &str = "evacuated";

/// One cluster member, as stored in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    pub name: String,
    /// Raft node id.
    pub node_id: u64,
    /// `host:port` of the member-to-member API.
    pub address: String,
    /// The ferry version the member reported when it joined.
    pub version: String,
    /// "online" | "evacuated".
    pub state: String,
    /// RFC 3339.
    pub joined_at: String,
}

const MEMBER_SELECT: &str = "SELECT name, node_id, address, version, state, joined_at FROM members";

impl Db {
    /// All members, sorted by name (byte order).
    pub fn list_members(&self) -> Result<Vec<MemberRecord>, DbError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!("{MEMBER_SELECT} ORDER BY name"))?;
        let rows = stmt
            .query_map([], raw_member)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter().map(RawMember::into_record).collect()
    }

    pub fn get_member(&self, name: &str) -> Result<Option<MemberRecord>, DbError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                &format!("{MEMBER_SELECT} WHERE name = ?1"),
                [name],
                raw_member,
            )
            .optional()?;
        row.map(RawMember::into_record).transpose()
    }

    /// The member with raft node id `node_id`.
    pub fn member_by_node_id(&self, node_id: u64) -> Result<Option<MemberRecord>, DbError> {
        // A node id above i64::MAX cannot be stored, so no member has it.
        let Ok(id) = i64::try_from(node_id) else {
            return Ok(None);
        };
        let conn = self.lock();
        let row = conn
            .query_row(
                &format!("{MEMBER_SELECT} WHERE node_id = ?1"),
                [id],
                raw_member,
            )
            .optional()?;
        row.map(RawMember::into_record).transpose()
    }
}

/// A `members` row as stored: `node_id` is NULL only for a row written before schema
/// version 3 (no shipped ferry wrote any).
struct RawMember {
    name: String,
    node_id: Option<i64>,
    address: String,
    version: String,
    state: String,
    joined_at: String,
}

fn raw_member(r: &Row<'_>) -> rusqlite::Result<RawMember> {
    Ok(RawMember {
        name: r.get(0)?,
        node_id: r.get(1)?,
        address: r.get(2)?,
        version: r.get(3)?,
        state: r.get(4)?,
        joined_at: r.get(5)?,
    })
}

impl RawMember {
    fn into_record(self) -> Result<MemberRecord, DbError> {
        let node_id = self
            .node_id
            .and_then(|id| u64::try_from(id).ok())
            .ok_or_else(|| {
                DbError::Encode(format!(
                    "member \"{}\" has no valid raft node id (a row from before schema \
                     version 3); remove it with `ferry cluster remove {}`",
                    self.name, self.name
                ))
            })?;
        Ok(MemberRecord {
            name: self.name,
            node_id,
            address: self.address,
            version: self.version,
            state: self.state,
            joined_at: self.joined_at,
        })
    }
}

/// Feeds members and join tokens, in canonical order, to the checksum's `field`
/// (length-prefixed fields). Reads raw rows, so it never fails on a legacy member.
pub(crate) fn checksum_fields(
    conn: &Connection,
    field: &mut dyn FnMut(&[u8]),
) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(&format!("{MEMBER_SELECT} ORDER BY name"))?;
    let members = stmt
        .query_map([], raw_member)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    field(&(members.len() as u64).to_le_bytes());
    for m in &members {
        field(m.name.as_bytes());
        match m.node_id {
            // A tag byte keeps "no node id" apart from every real one.
            Some(id) => field(&[&[1u8][..], &id.to_le_bytes()].concat()),
            None => field(&[0u8]),
        }
        for s in [&m.address, &m.version, &m.state, &m.joined_at] {
            field(s.as_bytes());
        }
    }

    let mut stmt = conn.prepare_cached(
        "SELECT member_name, secret_sha256, expires_at, used, created_at
         FROM join_tokens ORDER BY member_name",
    )?;
    let tokens = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    field(&(tokens.len() as u64).to_le_bytes());
    for (name, digest, expires_at, used, created_at) in &tokens {
        field(name.as_bytes());
        field(digest.as_bytes());
        field(&expires_at.to_le_bytes());
        field(&used.to_le_bytes());
        field(created_at.as_bytes());
    }
    Ok(())
}
