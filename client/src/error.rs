//! Library error type.

use thiserror::Error;

/// Everything that can go wrong talking to `ferryd`.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The daemon could not be reached (socket missing, connection refused…).
    #[error("Cannot connect to ferryd at {target}: {source}{hint}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
        /// Extra advice appended to the message (may be empty).
        hint: String,
    },
    /// TLS setup or handshake failure (bad PEM files, pinned certificate mismatch…).
    #[error("{0}")]
    Tls(String),
    /// HTTP protocol failure.
    #[error("HTTP error: {0}")]
    Http(String),
    /// The server answered with an error envelope (or a non-JSON error status).
    /// Displays as the server's message only.
    #[error("{message}")]
    Api { status: u16, message: String },
    /// The server answered something we could not understand.
    #[error("Invalid response from server: {0}")]
    Decode(String),
    /// A background operation ended in Failure or Cancelled; holds its `err`.
    #[error("{0}")]
    OperationFailed(String),
    /// Local configuration problem (bad URL, missing file…).
    #[error("{0}")]
    Config(String),
    /// Local I/O problem (reading/writing certificate files…).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// HTTP status of an API error, if this is one.
    pub fn api_status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the library.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
