//! Typed API objects (see doc/api.md). Every field has a default so that
//! missing keys or `null` values never fail decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Deserialize `null` as the type's default value.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Status codes used by the API (Incus's).
pub mod status_code {
    pub const OPERATION_CREATED: i64 = 100;
    pub const STARTED: i64 = 101;
    pub const STOPPED: i64 = 102;
    pub const RUNNING: i64 = 103;
    pub const CANCELLING: i64 = 104;
    pub const PENDING: i64 = 105;
    pub const STARTING: i64 = 106;
    pub const STOPPING: i64 = 107;
    pub const FROZEN: i64 = 110;
    pub const ERROR: i64 = 112;
    pub const SUCCESS: i64 = 200;
    pub const FAILURE: i64 = 400;
    pub const CANCELLED: i64 = 401;
}

/// The JSON wrapper of every response.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Envelope {
    /// `sync`, `async` or `error`.
    #[serde(deserialize_with = "nullable")]
    pub r#type: String,
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    #[serde(deserialize_with = "nullable")]
    pub status_code: i64,
    /// URL of the operation for async responses.
    #[serde(deserialize_with = "nullable")]
    pub operation: String,
    #[serde(deserialize_with = "nullable")]
    pub error_code: i64,
    #[serde(deserialize_with = "nullable")]
    pub error: String,
    pub metadata: Value,
}

impl Envelope {
    pub fn is_async(&self) -> bool {
        self.r#type == "async"
    }

    pub fn is_error(&self) -> bool {
        self.r#type == "error"
    }

    /// Decode `metadata` into a typed value.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, crate::ClientError> {
        serde_json::from_value(self.metadata.clone())
            .map_err(|e| crate::ClientError::Decode(format!("metadata: {e}")))
    }
}

/// A background operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Operation {
    #[serde(deserialize_with = "nullable")]
    pub id: String,
    #[serde(deserialize_with = "nullable")]
    pub class: String,
    #[serde(deserialize_with = "nullable")]
    pub description: String,
    #[serde(deserialize_with = "nullable")]
    pub created_at: String,
    #[serde(deserialize_with = "nullable")]
    pub updated_at: String,
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    #[serde(deserialize_with = "nullable")]
    pub status_code: i64,
    #[serde(deserialize_with = "nullable")]
    pub resources: BTreeMap<String, Vec<String>>,
    pub metadata: Value,
    #[serde(deserialize_with = "nullable")]
    pub may_cancel: bool,
    #[serde(deserialize_with = "nullable")]
    pub err: String,
    #[serde(deserialize_with = "nullable")]
    pub location: String,
}

impl Operation {
    /// Final when `status_code >= 200` (Success, Failure, Cancelled).
    pub fn is_final(&self) -> bool {
        self.status_code >= status_code::SUCCESS
    }

    pub fn is_success(&self) -> bool {
        self.status_code == status_code::SUCCESS
    }

    /// `Ok(self)` for a successful operation, else
    /// [`ClientError::OperationFailed`](crate::ClientError::OperationFailed)
    /// with its `err` (or, when that is empty, its status).
    pub fn into_result(self) -> Result<Operation, crate::ClientError> {
        if self.is_success() {
            return Ok(self);
        }
        let msg = if !self.err.is_empty() {
            self.err
        } else if !self.status.is_empty() {
            format!("Operation {}", self.status.to_lowercase())
        } else {
            format!("Operation ended with status code {}", self.status_code)
        };
        Err(crate::ClientError::OperationFailed(msg))
    }

    /// `metadata.stage`, if present.
    pub fn stage(&self) -> Option<&str> {
        self.metadata.get("stage").and_then(Value::as_str)
    }

    /// All `*_progress` string values of `metadata` (plus a bare `progress`),
    /// sorted by key.
    pub fn progress_values(&self) -> Vec<(&str, &str)> {
        let Some(map) = self.metadata.as_object() else {
            return Vec::new();
        };
        let mut out: Vec<(&str, &str)> = map
            .iter()
            .filter(|(k, _)| k.ends_with("_progress") || k.as_str() == "progress")
            .filter_map(|(k, v)| v.as_str().map(|s| (k.as_str(), s)))
            .collect();
        out.sort();
        out
    }
}

/// An instance (container or VM).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Instance {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    /// `container` or `virtual-machine`.
    #[serde(deserialize_with = "nullable")]
    pub r#type: String,
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    #[serde(deserialize_with = "nullable")]
    pub status_code: i64,
    #[serde(deserialize_with = "nullable")]
    pub location: String,
    #[serde(deserialize_with = "nullable")]
    pub description: String,
    #[serde(deserialize_with = "nullable")]
    pub architecture: String,
    #[serde(deserialize_with = "nullable")]
    pub created_at: String,
    #[serde(deserialize_with = "nullable")]
    pub last_used_at: String,
    #[serde(deserialize_with = "nullable")]
    pub ephemeral: bool,
    #[serde(deserialize_with = "nullable")]
    pub stateful: bool,
    #[serde(deserialize_with = "nullable")]
    pub profiles: Vec<String>,
    #[serde(deserialize_with = "nullable")]
    pub project: String,
    #[serde(deserialize_with = "nullable")]
    pub config: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    pub expanded_config: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(deserialize_with = "nullable")]
    pub expanded_devices: BTreeMap<String, BTreeMap<String, String>>,
}

impl Instance {
    /// Active unless Stopped or Error (as Incus counts it).
    pub fn is_active(&self) -> bool {
        self.status_code != status_code::STOPPED && self.status_code != status_code::ERROR
    }

    pub fn is_vm(&self) -> bool {
        self.r#type == "virtual-machine"
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuState {
    #[serde(deserialize_with = "nullable")]
    pub usage: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryState {
    #[serde(deserialize_with = "nullable")]
    pub usage: i64,
    #[serde(deserialize_with = "nullable")]
    pub usage_peak: i64,
    #[serde(deserialize_with = "nullable")]
    pub total: i64,
    #[serde(deserialize_with = "nullable")]
    pub swap_usage: i64,
    #[serde(deserialize_with = "nullable")]
    pub swap_usage_peak: i64,
}

/// Runtime state of an instance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceState {
    #[serde(deserialize_with = "nullable")]
    pub status: String,
    #[serde(deserialize_with = "nullable")]
    pub status_code: i64,
    #[serde(deserialize_with = "nullable")]
    pub pid: i64,
    #[serde(deserialize_with = "nullable")]
    pub processes: i64,
    #[serde(deserialize_with = "nullable")]
    pub cpu: CpuState,
    #[serde(deserialize_with = "nullable")]
    pub memory: MemoryState,
    pub disk: Value,
    pub network: Value,
    #[serde(deserialize_with = "nullable")]
    pub started_at: String,
    pub os_info: Value,
}

/// Instance plus state, snapshots and backups (`?recursion=1` on one
/// instance, `?recursion=2` on the list).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceFull {
    #[serde(flatten)]
    pub instance: Instance,
    pub state: Option<InstanceState>,
    #[serde(deserialize_with = "nullable")]
    pub snapshots: Vec<Value>,
    #[serde(deserialize_with = "nullable")]
    pub backups: Vec<Value>,
}

impl std::ops::Deref for InstanceFull {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        &self.instance
    }
}

/// Decode the metadata of `GET /1.0/operations?recursion=1` (a map
/// status -> [Operation], where a list may be `null`) into one list, oldest first.
pub fn operations_from_metadata(metadata: Value) -> Result<Vec<Operation>, crate::ClientError> {
    let map: BTreeMap<String, Option<Vec<Operation>>> = serde_json::from_value(metadata)
        .map_err(|e| crate::ClientError::Decode(format!("operations: {e}")))?;
    let mut ops: Vec<Operation> = map.into_values().flatten().flatten().collect();
    ops.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    Ok(ops)
}

#[cfg(test)]
#[path = "types_tests.rs"]
mod tests;
