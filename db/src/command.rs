//! The typed write commands and their versioned log-entry wrapper.
//!
//! Commands are the only way to change the database, and (once the cluster is
//! raft-backed) the payload of every log entry. Their JSON shape is a stored and wire
//! format: changing it means bumping [`COMMAND_FORMAT_VERSION`] and keeping the
//! previous version decodable. (Version 1 is frozen by the first release that ships
//! the raft cluster; until then commands may still be added to it.) See `doc/db.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DbError;

/// Format version written into every [`LogCommand`].
pub const COMMAND_FORMAT_VERSION: u32 = 1;
/// Oldest format version this code still decodes.
pub const MIN_COMMAND_FORMAT_VERSION: u32 = 1;

/// One instance, as stored in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub name: String,
    /// "container" | "virtual-machine"
    pub kind: String,
    /// The cluster member the instance lives on: the single source of truth for its location.
    pub member: String,
    /// Last known power state: "Running" | "Stopped" | "Error".
    pub status: String,
    pub storage_pool: String,
    pub image: String,
    pub description: String,
    /// User configuration.
    pub config: BTreeMap<String, String>,
    /// `volatile.*` keys (full key names), stored apart from the user configuration.
    pub volatile: BTreeMap<String, String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_used_at: String,
}

/// A typed write command: the only way to change the database.
///
/// Applying a command must be deterministic (no clock, no randomness, no I/O besides
/// the database): every raft member applies the same entries and must reach the same
/// state. Timestamps therefore travel inside the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Fails with `AlreadyExists` if the name is taken.
    CreateInstance { record: InstanceRecord },
    /// Deletes the instance with its config and volatile keys.
    DeleteInstance { name: String },
    /// Records the power state; `last_used_at` is updated only when given.
    SetInstanceStatus {
        name: String,
        status: String,
        last_used_at: Option<String>,
    },
    /// Sets (`Some`) or unsets (`None`) volatile keys; other keys are kept.
    UpdateVolatile {
        name: String,
        changes: BTreeMap<String, Option<String>>,
    },
    /// Replaces the whole user configuration.
    SetInstanceConfig {
        name: String,
        config: BTreeMap<String, String>,
    },
    /// Changes the instance's member; fails with `Conflict` if it is not on `from_member`.
    MoveInstance {
        name: String,
        from_member: String,
        to_member: String,
    },
    /// Adds a member directly, without a join token: the bootstrap member when
    /// clustering is enabled. Fails with `AlreadyExists` if the name or node id is taken.
    AddMember {
        name: String,
        /// Raft node id (at most `i64::MAX`).
        node_id: u64,
        /// `host:port` of the member-to-member API.
        address: String,
        /// The member's ferry version.
        version: String,
        /// RFC 3339.
        joined_at: String,
    },
    /// Records a pending join for `member_name` (the SHA-256 of its one-time secret,
    /// lowercase hex), replacing any earlier token for that name. Fails with
    /// `AlreadyExists` (what "member") if the member exists.
    AddJoinToken {
        member_name: String,
        secret_sha256: String,
        /// Unix seconds; the token is refused when `now > expires_at`.
        expires_at: i64,
        /// RFC 3339.
        created_at: String,
    },
    /// Redeems the join token for `name` and adds the member, atomically. The token
    /// must exist, match `secret_sha256`, be unused and not expired at `now`.
    JoinMember {
        name: String,
        node_id: u64,
        address: String,
        version: String,
        /// SHA-256 of the secret the joiner presented, lowercase hex.
        secret_sha256: String,
        /// Unix seconds, chosen by the submitting member (apply never reads the clock).
        now: i64,
        /// RFC 3339.
        joined_at: String,
    },
    /// Removes a member (and its join token). Fails with `Conflict` while any
    /// instance is still on it.
    RemoveMember { name: String },
    /// Sets a member's state: "online" | "evacuated".
    SetMemberState { name: String, state: String },
    /// Trusts a client certificate. The submitting daemon parses the PEM and computes
    /// the fingerprint; the database stores both as given. Fails with `Conflict` unless
    /// `fingerprint` is 64 lowercase hex digits and `kind` is "client", then with
    /// `AlreadyExists` (what "certificate") if the fingerprint is already trusted.
    AddCertificate {
        /// SHA-256 of the certificate's DER, lowercase hex.
        fingerprint: String,
        name: String,
        /// "client".
        #[serde(rename = "type")]
        kind: String,
        /// PEM.
        certificate: String,
        /// RFC 3339.
        created_at: String,
    },
    /// Stops trusting a certificate. Fails with `NotFound` (what "certificate").
    RemoveCertificate { fingerprint: String },
    /// Reserves `memory` bytes on `member` for instance `name`, which is about to
    /// move there (evacuation placement). Fails with `Conflict` if the member is
    /// evacuated, already holds the instance, or if the live reservations on it
    /// (`expires_at > now`, other instances) plus `memory` exceed `capacity` (the
    /// submitter's linearizable view of the member's free memory, reservations
    /// not counted). Two evacuations placing on the same member at once are thus
    /// ordered by the log, and the second one sees the first's reservation.
    /// Stored as `volatile.placement.*` keys, removed by `MoveInstance`.
    ReservePlacement {
        name: String,
        member: String,
        memory: u64,
        capacity: u64,
        /// Unix seconds, chosen by the submitter (apply never reads the clock).
        now: i64,
        expires_at: i64,
    },
}

impl Command {
    /// Short name of the operation, for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Command::CreateInstance { .. } => "create_instance",
            Command::DeleteInstance { .. } => "delete_instance",
            Command::SetInstanceStatus { .. } => "set_instance_status",
            Command::UpdateVolatile { .. } => "update_volatile",
            Command::SetInstanceConfig { .. } => "set_instance_config",
            Command::MoveInstance { .. } => "move_instance",
            Command::AddMember { .. } => "add_member",
            Command::AddJoinToken { .. } => "add_join_token",
            Command::JoinMember { .. } => "join_member",
            Command::RemoveMember { .. } => "remove_member",
            Command::SetMemberState { .. } => "set_member_state",
            Command::AddCertificate { .. } => "add_certificate",
            Command::RemoveCertificate { .. } => "remove_certificate",
            Command::ReservePlacement { .. } => "reserve_placement",
        }
    }
}

/// What goes into a raft log entry: a format version and the command.
///
/// It is the raft application data (`D`), so openraft serializes it inside its own
/// entry type. Deserializing goes through [`LogCommandWire`], which checks the version
/// before it interprets the command: an entry from a newer ferry is refused with a
/// clear error instead of being misread. (The command is buffered as a JSON value, so
/// only self-describing formats work; ferry uses JSON everywhere.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LogCommandWire")]
pub struct LogCommand {
    pub version: u32,
    pub command: Command,
    /// The proposer's id for this write (random, 32 hex digits), the same on
    /// every retry of it: the state machine applies a request once and answers
    /// a retry with the first outcome (see `Db::apply_log_entries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// The encoded shape of a [`LogCommand`], before its version is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogCommandWire {
    version: u32,
    command: serde_json::Value,
    #[serde(default)]
    request: Option<String>,
}

impl TryFrom<LogCommandWire> for LogCommand {
    type Error = DbError;

    fn try_from(wire: LogCommandWire) -> Result<LogCommand, DbError> {
        check_version(wire.version)?;
        // Version 1 is the only one so far. When version 2 arrives, decode version 1
        // into its own (frozen) type here and convert it to the current `Command`.
        let command = serde_json::from_value(wire.command)
            .map_err(|e| DbError::Encode(format!("log command version {}: {e}", wire.version)))?;
        Ok(LogCommand {
            version: wire.version,
            command,
            request: wire.request,
        })
    }
}

fn check_version(version: u32) -> Result<(), DbError> {
    if !(MIN_COMMAND_FORMAT_VERSION..=COMMAND_FORMAT_VERSION).contains(&version) {
        return Err(DbError::Encode(format!(
            "log command format version {version} is not supported (this ferry accepts {}..={}); \
             upgrade ferry on this member",
            MIN_COMMAND_FORMAT_VERSION, COMMAND_FORMAT_VERSION
        )));
    }
    Ok(())
}

/// Only the version, read first so an unsupported entry is reported as such rather
/// than as a confusing shape error.
#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

impl LogCommand {
    /// Wraps a command in the current format version.
    pub fn new(command: Command) -> LogCommand {
        LogCommand {
            version: COMMAND_FORMAT_VERSION,
            command,
            request: None,
        }
    }

    /// The same, tagged with the proposer's request id (kept across retries).
    pub fn with_request(self, id: impl Into<String>) -> LogCommand {
        LogCommand {
            request: Some(id.into()),
            ..self
        }
    }

    /// Serializes to the JSON bytes stored in a log entry.
    pub fn encode(&self) -> Result<Vec<u8>, DbError> {
        serde_json::to_vec(self).map_err(|e| DbError::Encode(format!("log command: {e}")))
    }

    /// Parses a log entry, accepting format versions
    /// `MIN_COMMAND_FORMAT_VERSION..=COMMAND_FORMAT_VERSION`.
    pub fn decode(bytes: &[u8]) -> Result<LogCommand, DbError> {
        let probe: VersionProbe = serde_json::from_slice(bytes)
            .map_err(|e| DbError::Encode(format!("log command has no valid version: {e}")))?;
        check_version(probe.version)?;
        // The version is checked again (and the command decoded) by `LogCommandWire`.
        serde_json::from_slice(bytes).map_err(|e| DbError::Encode(format!("log command: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> InstanceRecord {
        InstanceRecord {
            name: "c1".into(),
            kind: "container".into(),
            member: "m1".into(),
            status: "Stopped".into(),
            storage_pool: "default".into(),
            image: "busybox".into(),
            description: "".into(),
            config: BTreeMap::from([("limits.memory".into(), "64MiB".into())]),
            volatile: BTreeMap::from([("volatile.uuid".into(), "u1".into())]),
            created_at: "2025-01-01T00:00:00Z".into(),
            last_used_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    /// One command of every kind, with its JSON encoding at format version 1.
    /// These strings are a stored format: never edit them, add a new version instead.
    fn golden() -> Vec<(Command, &'static str)> {
        vec![
            (
                Command::CreateInstance { record: record() },
                r#"{"version":1,"command":{"op":"create_instance","record":{"name":"c1","kind":"container","member":"m1","status":"Stopped","storage_pool":"default","image":"busybox","description":"","config":{"limits.memory":"64MiB"},"volatile":{"volatile.uuid":"u1"},"created_at":"2025-01-01T00:00:00Z","last_used_at":"2025-01-01T00:00:00Z"}}}"#,
            ),
            (
                Command::DeleteInstance { name: "c1".into() },
                r#"{"version":1,"command":{"op":"delete_instance","name":"c1"}}"#,
            ),
            (
                Command::SetInstanceStatus {
                    name: "c1".into(),
                    status: "Running".into(),
                    last_used_at: Some("2025-01-02T00:00:00Z".into()),
                },
                r#"{"version":1,"command":{"op":"set_instance_status","name":"c1","status":"Running","last_used_at":"2025-01-02T00:00:00Z"}}"#,
            ),
            (
                Command::SetInstanceStatus {
                    name: "c1".into(),
                    status: "Error".into(),
                    last_used_at: None,
                },
                r#"{"version":1,"command":{"op":"set_instance_status","name":"c1","status":"Error","last_used_at":null}}"#,
            ),
            (
                Command::UpdateVolatile {
                    name: "c1".into(),
                    changes: BTreeMap::from([
                        ("volatile.a".into(), Some("1".into())),
                        ("volatile.b".into(), None),
                    ]),
                },
                r#"{"version":1,"command":{"op":"update_volatile","name":"c1","changes":{"volatile.a":"1","volatile.b":null}}}"#,
            ),
            (
                Command::SetInstanceConfig {
                    name: "c1".into(),
                    config: BTreeMap::from([("migration.stateful".into(), "true".into())]),
                },
                r#"{"version":1,"command":{"op":"set_instance_config","name":"c1","config":{"migration.stateful":"true"}}}"#,
            ),
            (
                Command::MoveInstance {
                    name: "c1".into(),
                    from_member: "m1".into(),
                    to_member: "m2".into(),
                },
                r#"{"version":1,"command":{"op":"move_instance","name":"c1","from_member":"m1","to_member":"m2"}}"#,
            ),
            (
                Command::AddMember {
                    name: "m1".into(),
                    node_id: 1,
                    address: "10.0.0.1:8443".into(),
                    version: "0.1.0".into(),
                    joined_at: "2025-01-01T00:00:00Z".into(),
                },
                r#"{"version":1,"command":{"op":"add_member","name":"m1","node_id":1,"address":"10.0.0.1:8443","version":"0.1.0","joined_at":"2025-01-01T00:00:00Z"}}"#,
            ),
            (
                Command::AddJoinToken {
                    member_name: "m2".into(),
                    secret_sha256: "ab".repeat(32),
                    expires_at: 1735693200,
                    created_at: "2025-01-01T00:00:00Z".into(),
                },
                r#"{"version":1,"command":{"op":"add_join_token","member_name":"m2","secret_sha256":"abababababababababababababababababababababababababababababababab","expires_at":1735693200,"created_at":"2025-01-01T00:00:00Z"}}"#,
            ),
            (
                Command::JoinMember {
                    name: "m2".into(),
                    node_id: 2,
                    address: "10.0.0.2:8443".into(),
                    version: "0.1.0".into(),
                    secret_sha256: "ab".repeat(32),
                    now: 1735690000,
                    joined_at: "2025-01-01T00:10:00Z".into(),
                },
                r#"{"version":1,"command":{"op":"join_member","name":"m2","node_id":2,"address":"10.0.0.2:8443","version":"0.1.0","secret_sha256":"abababababababababababababababababababababababababababababababab","now":1735690000,"joined_at":"2025-01-01T00:10:00Z"}}"#,
            ),
            (
                Command::RemoveMember { name: "m2".into() },
                r#"{"version":1,"command":{"op":"remove_member","name":"m2"}}"#,
            ),
            (
                Command::SetMemberState {
                    name: "m1".into(),
                    state: "evacuated".into(),
                },
                r#"{"version":1,"command":{"op":"set_member_state","name":"m1","state":"evacuated"}}"#,
            ),
            (
                Command::AddCertificate {
                    fingerprint: "0f".repeat(32),
                    name: "alice".into(),
                    kind: "client".into(),
                    certificate: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                        .into(),
                    created_at: "2025-01-01T00:00:00Z".into(),
                },
                r#"{"version":1,"command":{"op":"add_certificate","fingerprint":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","name":"alice","type":"client","certificate":"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n","created_at":"2025-01-01T00:00:00Z"}}"#,
            ),
            (
                Command::RemoveCertificate {
                    fingerprint: "0f".repeat(32),
                },
                r#"{"version":1,"command":{"op":"remove_certificate","fingerprint":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"}}"#,
            ),
        ]
    }

    #[test]
    fn golden_json_shape_is_stable() {
        for (cmd, json) in golden() {
            let encoded = LogCommand::new(cmd.clone()).encode().unwrap();
            assert_eq!(std::str::from_utf8(&encoded).unwrap(), json);
            assert!(
                json.contains(&format!(r#""op":"{}""#, cmd.op())),
                "op() of {cmd:?}"
            );
        }
    }

    #[test]
    fn log_command_round_trips() {
        for (cmd, json) in golden() {
            let decoded = LogCommand::decode(json.as_bytes()).unwrap();
            assert_eq!(
                decoded,
                LogCommand {
                    version: 1,
                    command: cmd,
                    request: None,
                }
            );
        }
    }

    #[test]
    fn request_id_round_trips_and_unknown_envelope_fields_are_refused() {
        let cmd =
            LogCommand::new(Command::DeleteInstance { name: "c1".into() }).with_request("00ff");
        let json = String::from_utf8(cmd.encode().unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"version":1,"command":{"op":"delete_instance","name":"c1"},"request":"00ff"}"#
        );
        assert_eq!(LogCommand::decode(json.as_bytes()).unwrap(), cmd);
        let odd =
            r#"{"version":1,"command":{"op":"delete_instance","name":"c1"},"requests":"00ff"}"#;
        let err = LogCommand::decode(odd.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn missing_optional_field_decodes_as_none() {
        let json = r#"{"version":1,"command":{"op":"set_instance_status","name":"c1","status":"Stopped"}}"#;
        let decoded = LogCommand::decode(json.as_bytes()).unwrap();
        assert_eq!(
            decoded.command,
            Command::SetInstanceStatus {
                name: "c1".into(),
                status: "Stopped".into(),
                last_used_at: None
            }
        );
    }

    #[test]
    fn unsupported_versions_are_refused() {
        for version in [0, COMMAND_FORMAT_VERSION + 1] {
            let json = format!(
                r#"{{"version":{version},"command":{{"op":"delete_instance","name":"c1"}}}}"#
            );
            let err = LogCommand::decode(json.as_bytes()).unwrap_err();
            assert!(
                matches!(&err, DbError::Encode(m) if m.contains("not supported")),
                "{err}"
            );
        }
    }

    #[test]
    fn plain_serde_checks_the_version_too() {
        // openraft deserializes entries with serde, not `decode`: the version must still
        // be checked before the command is interpreted.
        let json = format!(
            r#"{{"version":{},"command":{{"op":"delete_instance","name":"c1"}}}}"#,
            COMMAND_FORMAT_VERSION + 1
        );
        let err = serde_json::from_str::<LogCommand>(&json).unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
        let ok: LogCommand = serde_json::from_str(golden()[1].1).unwrap();
        assert_eq!(ok.command, Command::DeleteInstance { name: "c1".into() });
    }

    #[test]
    fn unknown_ops_and_fields_are_refused() {
        // A member must never silently ignore part of a command another member applied.
        for json in [
            r#"{"version":1,"command":{"op":"explode","name":"c1"}}"#,
            r#"{"version":1,"command":{"op":"delete_instance","name":"c1","force":true}}"#,
            r#"{"version":1,"command":{"op":"delete_instance"}}"#,
            // The certificate type travels as "type", never as the Rust field name.
            r#"{"version":1,"command":{"op":"add_certificate","fingerprint":"","name":"a","kind":"client","certificate":"","created_at":""}}"#,
        ] {
            assert!(
                matches!(LogCommand::decode(json.as_bytes()), Err(DbError::Encode(_))),
                "{json}"
            );
        }
    }
}
