//! Errors of driver operations. Text says what failed and what to do.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DriverError {
    /// Bad image name or config value (a user error: maps to 400).
    #[error("invalid instance configuration: {0}")]
    InvalidConfig(String),
    /// The instance is not in a state that allows the action (maps to 400/409).
    #[error("{0}")]
    WrongState(String),
    /// A host tool the driver needs is missing or too old.
    #[error("{tool} is not usable: {detail} (run scripts/setup.sh to install it)")]
    MissingTool { tool: String, detail: String },
    /// The operation was cancelled; the instance was left as described.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// An external program (criu, qemu) failed.
    #[error("{program} failed: {detail}")]
    Command { program: String, detail: String },
    /// QMP conversation failed.
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    /// The host lacks a kernel feature the request needs (e.g. a cgroup
    /// memory controller for `limits.memory`).
    #[error("this host cannot {0}")]
    Unsupported(String),
}

impl DriverError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let context = context.into();
        move |source| DriverError::Io { context, source }
    }
}
