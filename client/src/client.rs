//! The REST client.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{ClientError, Result};
use crate::http::{parse_https_url, server_name, RawResponse, Transport};
use crate::types::{operations_from_metadata, Envelope, Instance, InstanceFull, Operation};
use crate::{config, tls};

/// Minimum time between two polls of an operation, in case the server's
/// `/wait` returns early.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A client of the ferry REST API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Arc<Transport>,
}

impl Client {
    /// Talk to the daemon over its unix socket.
    pub fn unix(path: impl Into<PathBuf>) -> Client {
        Client {
            transport: Arc::new(Transport::Unix(path.into())),
        }
    }

    /// Talk to a remote daemon over HTTPS (`https://HOST[:PORT]`, default port
    /// 8443), presenting the given client certificate and accepting only a
    /// server that presents exactly the certificate in `server_cert`.
    pub fn https(
        url: &str,
        client_cert: impl AsRef<Path>,
        client_key: impl AsRef<Path>,
        server_cert: impl AsRef<Path>,
    ) -> Result<Client> {
        let (host, port) = parse_https_url(url)?;
        let certs = tls::load_certs(client_cert.as_ref())?;
        let key = tls::load_key(client_key.as_ref())?;
        let pinned = tls::load_certs(server_cert.as_ref())?.swap_remove(0);
        let config = tls::client_config(certs, key, pinned)?;
        Ok(Client {
            transport: Arc::new(Transport::Https {
                server_name: server_name(&host)?,
                host,
                port,
                tls: Arc::new(config),
            }),
        })
    }

    /// Local daemon at `DIR/unix.socket`, DIR being `dir`, else `$FERRY_DIR`,
    /// else `/var/lib/ferry`. With `remote`, connect over HTTPS using the
    /// default client certificate (`~/.config/ferry/client.{crt,key}`,
    /// generated if missing) and the server certificate named by
    /// `$FERRY_SERVER_CERT`.
    pub fn from_env(dir: Option<PathBuf>, remote: Option<String>) -> Result<Client> {
        match remote {
            None => Ok(Client::unix(config::socket_path(dir))),
            Some(url) => {
                let (cert, key) = config::default_client_cert_paths()?;
                tls::ensure_client_cert(&cert, &key)?;
                let server_cert = std::env::var_os("FERRY_SERVER_CERT").ok_or_else(|| {
                    ClientError::Config(
                        "A remote needs the server certificate: set FERRY_SERVER_CERT (or --server-cert)".into(),
                    )
                })?;
                Client::https(&url, cert, key, PathBuf::from(server_cert))
            }
        }
    }

    /// Endpoint description (socket path or https URL).
    pub fn endpoint(&self) -> String {
        self.transport.describe()
    }

    /// Send a request and return the raw response (any status).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<RawResponse> {
        let body = match body {
            Some(v) => Some(serde_json::to_vec(v).map_err(|e| ClientError::Decode(e.to_string()))?),
            None => None,
        };
        tracing::debug!(%method, path, "request");
        self.transport.send(method, path, body).await
    }

    /// Send a request and decode the envelope; error envelopes and HTTP error
    /// statuses become [`ClientError::Api`].
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Envelope> {
        let resp = self.raw(method, path, body).await?;
        parse_envelope(&resp)
    }

    pub async fn get(&self, path: &str) -> Result<Envelope> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<&Value>) -> Result<Envelope> {
        self.request(Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Option<&Value>) -> Result<Envelope> {
        self.request(Method::PUT, path, body).await
    }

    pub async fn delete(&self, path: &str, body: Option<&Value>) -> Result<Envelope> {
        self.request(Method::DELETE, path, body).await
    }

    /// GET a raw (non-JSON) resource such as a log file or the console log.
    pub async fn get_raw(&self, path: &str) -> Result<Vec<u8>> {
        let resp = self.raw(Method::GET, path, None).await?;
        if resp.status >= 400 {
            return Err(parse_envelope(&resp)
                .err()
                .unwrap_or_else(|| api_error(&resp)));
        }
        Ok(resp.body.to_vec())
    }

    /// GET and decode the metadata.
    pub async fn get_metadata<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.get(path).await?.decode()
    }

    /// `GET /1.0/instances?recursion=2`.
    pub async fn instances_full(&self) -> Result<Vec<InstanceFull>> {
        self.get_metadata("/1.0/instances?recursion=2").await
    }

    /// `GET /1.0/instances/<name>`.
    pub async fn instance(&self, name: &str) -> Result<Instance> {
        self.get_metadata(&format!("/1.0/instances/{name}")).await
    }

    /// `GET /1.0/instances/<name>?recursion=1`.
    pub async fn instance_full(&self, name: &str) -> Result<InstanceFull> {
        self.get_metadata(&format!("/1.0/instances/{name}?recursion=1"))
            .await
    }

    /// `GET /1.0/operations/<id>`.
    pub async fn operation(&self, id: &str) -> Result<Operation> {
        self.get_metadata(&format!("/1.0/operations/{}", operation_id(id)))
            .await
    }

    /// `GET /1.0/operations?recursion=1`, flattened, oldest first.
    pub async fn operations(&self) -> Result<Vec<Operation>> {
        operations_from_metadata(self.get("/1.0/operations?recursion=1").await?.metadata)
    }

    /// `DELETE /1.0/operations/<id>`.
    pub async fn cancel_operation(&self, id: &str) -> Result<()> {
        self.delete(&format!("/1.0/operations/{}", operation_id(id)), None)
            .await?;
        Ok(())
    }

    /// Wait for an operation (id or `/1.0/operations/<id>` URL) to end by
    /// polling `/wait?timeout=1`, calling `on_update` after each poll.
    /// Failure and Cancelled become [`ClientError::OperationFailed`].
    pub async fn wait_operation(
        &self,
        op_id: &str,
        on_update: impl FnMut(&Operation),
    ) -> Result<Operation> {
        self.wait_operation_to_end(op_id, on_update)
            .await?
            .into_result()
    }

    /// Like [`Client::wait_operation`], but returns the final operation
    /// however it ended (Success, Failure or Cancelled), so that the metadata
    /// of a failed operation can still be read; see [`Operation::into_result`].
    pub async fn wait_operation_to_end(
        &self,
        op_id: &str,
        mut on_update: impl FnMut(&Operation),
    ) -> Result<Operation> {
        let path = format!("/1.0/operations/{}/wait?timeout=1", operation_id(op_id));
        loop {
            let started = Instant::now();
            let op: Operation = self.get_metadata(&path).await?;
            on_update(&op);
            if op.is_final() {
                return Ok(op);
            }
            let elapsed = started.elapsed();
            if elapsed < MIN_POLL_INTERVAL {
                tokio::time::sleep(MIN_POLL_INTERVAL - elapsed).await;
            }
        }
    }

    /// Send a request answered by an async envelope and wait for its
    /// operation; `on_update` sees the initial operation and every poll.
    /// Failure and Cancelled become [`ClientError::OperationFailed`].
    pub async fn run_async(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        on_update: impl FnMut(&Operation),
    ) -> Result<Operation> {
        self.run_async_to_end(method, path, body, on_update)
            .await?
            .into_result()
    }

    /// Like [`Client::run_async`], but returns the final operation however
    /// it ended (Success, Failure or Cancelled); only a request that fails
    /// (or an operation that cannot be waited for) is an error.
    pub async fn run_async_to_end(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        mut on_update: impl FnMut(&Operation),
    ) -> Result<Operation> {
        let env = self.request(method, path, body).await?;
        let op = operation_of(&env)?;
        on_update(&op);
        if op.is_final() {
            return Ok(op);
        }
        self.wait_operation_to_end(&op.id, on_update).await
    }
}

/// The operation id from an id or an operation URL.
pub fn operation_id(id_or_url: &str) -> &str {
    let s = id_or_url.split('?').next().unwrap_or(id_or_url);
    s.trim_end_matches('/').rsplit('/').next().unwrap_or(s)
}

/// The Operation carried by an async envelope.
fn operation_of(env: &Envelope) -> Result<Operation> {
    if !env.is_async() {
        return Err(ClientError::Decode(format!(
            "expected an async response (operation), got type {:?}",
            env.r#type
        )));
    }
    let mut op: Operation = env.decode()?;
    if op.id.is_empty() {
        op.id = operation_id(&env.operation).to_string();
    }
    if op.id.is_empty() {
        return Err(ClientError::Decode(
            "async response without an operation id".into(),
        ));
    }
    Ok(op)
}

fn api_error(resp: &RawResponse) -> ClientError {
    let text = String::from_utf8_lossy(&resp.body).trim().to_string();
    let message = if text.is_empty() {
        hyper::StatusCode::from_u16(resp.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP status {}", resp.status))
    } else {
        text
    };
    ClientError::Api {
        status: resp.status,
        message,
    }
}

/// Decode an envelope; error envelopes and error statuses become `Api` errors.
pub(crate) fn parse_envelope(resp: &RawResponse) -> Result<Envelope> {
    let env: Envelope = match serde_json::from_slice(&resp.body) {
        Ok(env) => env,
        Err(_) if resp.status >= 400 => return Err(api_error(resp)),
        Err(e) => return Err(ClientError::Decode(format!("HTTP {}: {e}", resp.status))),
    };
    if env.is_error() || resp.status >= 400 {
        let status = if resp.status >= 400 {
            resp.status
        } else {
            u16::try_from(env.error_code).unwrap_or(500)
        };
        let message = if env.error.is_empty() {
            api_error(resp).to_string()
        } else {
            env.error
        };
        return Err(ClientError::Api { status, message });
    }
    Ok(env)
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
