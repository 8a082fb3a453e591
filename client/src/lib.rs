//! `ferry_client`: a client for the ferry REST API (shaped like Incus's, see
//! `doc/api.md`), over the daemon's unix socket or HTTPS with a pinned
//! server certificate and a client certificate.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_client::ClientError> {
//! use ferry_client::{Client, Method};
//! let client = Client::from_env(None, None)?;
//! let body = serde_json::json!({"action": "start", "timeout": 0, "force": false, "stateful": false});
//! let op = client
//!     .run_async(Method::PUT, "/1.0/instances/c1/state", Some(&body), |op| println!("{}", op.status))
//!     .await?;
//! assert!(op.is_success());
//! # Ok(()) }
//! ```

mod client;
pub mod config;
mod error;
pub mod http;
pub mod tls;
pub mod types;

pub use client::{operation_id, Client};
pub use error::{ClientError, Result};
pub use http::RawResponse;
pub use hyper::Method;
pub use types::{
    operations_from_metadata, status_code, CpuState, Envelope, Instance, InstanceFull,
    InstanceState, MemoryState, Operation,
};
