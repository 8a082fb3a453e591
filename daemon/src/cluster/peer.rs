//! HTTP client for member-to-member calls over mutual TLS (and for a joiner
//! dialling the cluster before it has the cluster certificate).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The dialling side's TCP stream under TLS on websockets (the migration
/// channels: this side receives a move's bulk data). rustls reads the socket
/// in steps of 4 KiB up to one TLS record, compacting its buffer after each
/// record; read from a buffer of [`WS_READ_BUFFER`] instead, it costs one
/// `recv` per buffer, not several per record, and far fewer copies inside
/// rustls (a CPU profile of a container move's receiving ferryd: about three
/// quarters fewer `memmove` samples, ≈ 8 % fewer samples in all).
pub type BufferedTcp = tokio::io::BufReader<TcpStream>;
const WS_READ_BUFFER: usize = 128 * 1024;

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot reach member at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("member at {addr} answered {status}: {message}")]
    Status {
        addr: String,
        status: u16,
        message: String,
    },
    #[error("bad answer from member at {addr}: {detail}")]
    Decode { addr: String, detail: String },
}

/// A raw response from a peer.
pub struct PeerResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    /// The `ETag` header (an instance's, for `If-Match` on a later PUT).
    pub etag: Option<String>,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct PeerClient {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    headers: Vec<(&'static str, String)>,
    /// Idle kept-alive connections per peer address (shared by clones): a
    /// fresh TCP + mTLS handshake per request cost ~2.6 ms of CPU per
    /// replicated write (doc/benchmarks.md).
    pool: Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<Sender>>>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
const POOL_PER_PEER: usize = 8;

impl PeerClient {
    pub fn new(tls: rustls::ClientConfig) -> Self {
        PeerClient {
            tls: Arc::new(tls),
            timeout: Duration::from_secs(10),
            headers: vec![],
            pool: Default::default(),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Add a header to every request.
    pub fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }

    /// One request, on a kept-alive connection to `addr` if one is idle.
    pub async fn send(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<PeerResponse, PeerError> {
        tokio::time::timeout(self.timeout, self.send_inner(addr, method, path, body))
            .await
            .map_err(|_| PeerError::Connect {
                addr: addr.into(),
                detail: format!("no answer within {:?}", self.timeout),
            })?
    }

    async fn send_inner(
        &self,
        addr: &str,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<PeerResponse, PeerError> {
        let conn_err = |detail: String| PeerError::Connect {
            addr: addr.into(),
            detail,
        };
        let mut sender = self.sender(addr).await?;
        let mut req = Request::builder().method(method);
        for (k, v) in &self.headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .uri(path)
            .header("host", "ferry-cluster")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| conn_err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (content_type, etag) = (header("content-type"), header("etag"));
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| conn_err(e.to_string()))?
            .to_bytes();
        if !sender.is_closed() {
            let mut pool = self.pool.lock().unwrap();
            let idle = pool.entry(addr.to_string()).or_default();
            if idle.len() < POOL_PER_PEER {
                idle.push(sender);
            }
        }
        Ok(PeerResponse {
            status,
            content_type,
            etag,
            body,
        })
    }

    /// An idle pooled connection that is still usable, else a new one.
    /// (A request is never retried once sent: callers decide about retries.)
    async fn sender(&self, addr: &str) -> Result<Sender, PeerError> {
        loop {
            let pooled = self.pool.lock().unwrap().get_mut(addr).and_then(Vec::pop);
            let Some(mut s) = pooled else { break };
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let tls = self.connect(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| PeerError::Connect {
                    addr: addr.into(),
                    detail: e.to_string(),
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// TCP + TLS (pinned to the cluster certificate) to a peer.
    async fn connect(
        &self,
        addr: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, PeerError> {
        let tcp = self.tcp(addr).await?;
        self.tls(addr, tcp).await
    }

    async fn tcp(&self, addr: &str) -> Result<TcpStream, PeerError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| PeerError::Connect {
                addr: addr.into(),
                detail: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn tls<IO>(
        &self,
        addr: &str,
        io: IO,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, PeerError>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        TlsConnector::from(self.tls.clone())
            .connect(ferry_cluster::mtls::cluster_server_name(), io)
            .await
            .map_err(|e| PeerError::Connect {
                addr: addr.into(),
                detail: format!("TLS: {e}"),
            })
    }

    /// Open a websocket to a peer (the migration channels).
    pub async fn websocket(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<crate::migrate::ws::WsPipe, PeerError> {
        Ok(crate::migrate::ws::from_tungstenite(
            self.websocket_raw(addr, path).await?,
        ))
    }

    /// Open a websocket to a peer, frames as they come (relays).
    pub async fn websocket_raw(
        &self,
        addr: &str,
        path: &str,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<BufferedTcp>>,
        PeerError,
    > {
        let conn_err = |detail: String| PeerError::Connect {
            addr: addr.into(),
            detail,
        };
        let tcp = self.tcp(addr).await?;
        let tls = self
            .tls(addr, BufferedTcp::with_capacity(WS_READ_BUFFER, tcp))
            .await?;
        let url = format!("wss://ferry-cluster{path}");
        let (ws, resp) =
            tokio::time::timeout(self.timeout, tokio_tungstenite::client_async(url, tls))
                .await
                .map_err(|_| conn_err("websocket handshake timed out".into()))?
                .map_err(|e| conn_err(format!("websocket: {e}")))?;
        if resp.status().as_u16() != 101 {
            return Err(PeerError::Status {
                addr: addr.into(),
                status: resp.status().as_u16(),
                message: "websocket refused".into(),
            });
        }
        Ok(ws)
    }

    /// POST JSON, expect 200 with a JSON body of type R.
    pub async fn call<T: Serialize, R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        body: &T,
    ) -> Result<R, PeerError> {
        let bytes = serde_json::to_vec(body).map_err(|e| PeerError::Decode {
            addr: addr.into(),
            detail: e.to_string(),
        })?;
        let resp = self.send(addr, Method::POST, path, bytes.into()).await?;
        if resp.status != StatusCode::OK {
            let message = serde_json::from_slice::<serde_json::Value>(&resp.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned());
            return Err(PeerError::Status {
                addr: addr.into(),
                status: resp.status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&resp.body).map_err(|e| PeerError::Decode {
            addr: addr.into(),
            detail: e.to_string(),
        })
    }
}
