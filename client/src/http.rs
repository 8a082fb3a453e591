//! Transport: one HTTP/1.1 connection per request, over a unix socket or
//! TLS (rustls) over TCP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{ClientError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub body: Bytes,
}

/// Where and how to connect.
#[derive(Clone)]
pub(crate) enum Transport {
    Unix(PathBuf),
    Https {
        host: String,
        port: u16,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Transport {
    /// Human description of the endpoint, for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Transport::Unix(p) => p.display().to_string(),
            Transport::Https { host, port, .. } => format!("https://{}", host_port(host, *port)),
        }
    }

    fn host_header(&self) -> String {
        match self {
            Transport::Unix(_) => "unix.socket".to_string(),
            Transport::Https { host, port, .. } => host_port(host, *port),
        }
    }

    /// Send one request and collect the whole response.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse> {
        let req = build_request(method, path, body, &self.host_header())?;
        match self {
            Transport::Unix(p) => {
                let stream = UnixStream::connect(p).await.map_err(|e| {
                    let hint = "\nIs ferryd running? (the socket is DIR/unix.socket; set --dir or FERRY_DIR)";
                    self.connect_error(e, hint)
                })?;
                exchange(stream, req).await
            }
            Transport::Https {
                host,
                port,
                server_name,
                tls,
            } => {
                let tcp = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| {
                    let e =
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out");
                    self.connect_error(e, "")
                })?
                .map_err(|e| self.connect_error(e, ""))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let stream = connector
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| self.tls_error(e))?;
                exchange(stream, req).await
            }
        }
    }

    fn tls_error(&self, e: std::io::Error) -> ClientError {
        let detail = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
                o.0.to_string()
            }
            Some(re) => re.to_string(),
            None => e.to_string(),
        };
        ClientError::Tls(format!(
            "TLS handshake with {} failed: {detail}",
            self.describe()
        ))
    }

    fn connect_error(&self, source: std::io::Error, hint: &str) -> ClientError {
        ClientError::Connect {
            target: self.describe(),
            source,
            hint: hint.to_string(),
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn build_request(
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    host: &str,
) -> Result<Request<Full<Bytes>>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .header(
            header::USER_AGENT,
            concat!("ferry/", env!("CARGO_PKG_VERSION")),
        );
    if body.is_some() {
        builder = builder.header(header::CONTENT_TYPE, "application/json");
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Http(format!("invalid request for {path}: {e}")))
}

async fn exchange<S>(io: S, req: Request<Full<Bytes>>) -> Result<RawResponse>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let http_err = |e: hyper::Error| ClientError::Http(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_err)?;
    let conn_task = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection ended with error: {e}");
        }
    });
    let resp = sender.send_request(req).await.map_err(http_err)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(http_err)?
        .to_bytes();
    drop(sender);
    conn_task.abort();
    Ok(RawResponse { status, body })
}

/// Split `https://HOST[:PORT][/]` into host and port (default 8443).
pub fn parse_https_url(url: &str) -> Result<(String, u16)> {
    let bad = |why: &str| {
        ClientError::Config(format!(
            "Invalid remote URL {url:?}: {why} (expected https://HOST:PORT)"
        ))
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(bad("no path is allowed"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad("garbage after ]"))?),
        };
        (h, port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("empty host"));
    }
    let port = match port {
        None => 8443,
        Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
    };
    Ok((host.to_string(), port))
}

/// The TLS server name for a host (an IP address or a DNS name).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| ClientError::Config(format!("Invalid host name {host:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_https_url("https://10.0.0.1:8443").unwrap(),
            ("10.0.0.1".into(), 8443)
        );
        assert_eq!(
            parse_https_url("https://host.example/").unwrap(),
            ("host.example".into(), 8443)
        );
        assert_eq!(
            parse_https_url("https://[::1]:9000").unwrap(),
            ("::1".into(), 9000)
        );
        assert_eq!(
            parse_https_url("https://[::1]").unwrap(),
            ("::1".into(), 8443)
        );
        assert!(parse_https_url("http://x:1").is_err());
        assert!(parse_https_url("https://x:notaport").is_err());
        assert!(parse_https_url("https://x:1/1.0").is_err());
        assert!(parse_https_url("https://").is_err());
    }

    #[test]
    fn host_header_brackets_ipv6() {
        assert_eq!(host_port("::1", 8443), "[::1]:8443");
        assert_eq!(host_port("a", 1), "a:1");
    }
}
