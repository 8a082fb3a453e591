//! The typed write commands and their versioned log-entry wrapper.
//!
//! Commands are the only way to change the database, and (once the cluster is
//! raft-backed) the payload of every log entry. Their JSON shape is a stored and wire
//! format: changing it means bumping [`COMMAND_FORMAT_VERSION`] and keeping the
//! previous version decodable. See `doc/db.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::DbError;

/// Format version written into every [`LogCommand`].
pub const COMMAND_FORMAT_VERSION: u32 = 1;
/// Oldest format version this code still decodes.
pub const MIN_COMMAND_FORMAT_VERSION: u32 = 1;

/// One instance, as stored in the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        }
    }
}

/// What goes into a (future raft) log entry: a format version and the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogCommand {
    pub version: u32,
    pub command: Command,
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
        if !(MIN_COMMAND_FORMAT_VERSION..=COMMAND_FORMAT_VERSION).contains(&probe.version) {
            return Err(DbError::Encode(format!(
                "log command format version {} is not supported (this ferry accepts {}..={}); \
                 upgrade ferry on this member",
                probe.version, MIN_COMMAND_FORMAT_VERSION, COMMAND_FORMAT_VERSION
            )));
        }
        // Version 1 is the only one so far. When version 2 arrives, decode version 1
        // into its own (frozen) type here and convert it to the current `Command`.
        serde_json::from_slice(bytes)
            .map_err(|e| DbError::Encode(format!("log command version {}: {e}", probe.version)))
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
        ]
    }

    #[test]
    fn golden_json_shape_is_stable() {
        for (cmd, json) in golden() {
            let encoded = LogCommand::new(cmd.clone()).encode().unwrap();
            assert_eq!(std::str::from_utf8(&encoded).unwrap(), json);
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
                    command: cmd
                }
            );
        }
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
    fn unknown_ops_and_fields_are_refused() {
        // A member must never silently ignore part of a command another member applied.
        for json in [
            r#"{"version":1,"command":{"op":"explode","name":"c1"}}"#,
            r#"{"version":1,"command":{"op":"delete_instance","name":"c1","force":true}}"#,
            r#"{"version":1,"command":{"op":"delete_instance"}}"#,
        ] {
            assert!(
                matches!(LogCommand::decode(json.as_bytes()), Err(DbError::Encode(_))),
                "{json}"
            );
        }
    }
}
