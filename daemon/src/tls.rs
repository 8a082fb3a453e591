//! HTTPS listener. Before clustering the member presents its own certificate
//! (`server.crt`); once clustered, the shared cluster certificate. Client
//! certificates are optional at the TLS layer but, when presented, must be the
//! cluster certificate (a member) or a trusted client's (checked by rustls
//! verifiers in `ferry_cluster::mtls`); each connection is classified so the
//! API can authorize per endpoint (see `api::auth`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use ferry_cluster::{ClusterCert, Identity, PeerKind, TrustStore};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// What the TLS layer established about a connection's peer.
#[derive(Clone, Debug)]
pub enum Peer {
    /// The root-only unix socket.
    Local,
    Remote {
        addr: SocketAddr,
        kind: PeerKind,
    },
}

/// The server's TLS mode; swapped when the member joins or creates a cluster.
pub enum TlsMode {
    Standalone(Identity),
    Cluster(ClusterCert),
}

#[derive(Clone)]
pub struct TlsState {
    inner: Arc<RwLock<(Arc<rustls::ServerConfig>, Arc<TlsMode>)>>,
    trust: TrustStore,
}

impl TlsState {
    pub fn new(mode: TlsMode, trust: TrustStore) -> anyhow::Result<Self> {
        let cfg = Self::config(&mode, &trust)?;
        Ok(TlsState {
            inner: Arc::new(RwLock::new((Arc::new(cfg), Arc::new(mode)))),
            trust,
        })
    }

    fn config(mode: &TlsMode, trust: &TrustStore) -> anyhow::Result<rustls::ServerConfig> {
        Ok(match mode {
            TlsMode::Standalone(id) => {
                ferry_cluster::mtls::standalone_server_config(id, trust.clone())?
            }
            TlsMode::Cluster(c) => ferry_cluster::mtls::server_config(c, trust.clone())?,
        })
    }

    /// Switch to the cluster certificate (new connections only).
    pub fn set_mode(&self, mode: TlsMode) -> anyhow::Result<()> {
        let cfg = Self::config(&mode, &self.trust)?;
        *self.inner.write().unwrap() = (Arc::new(cfg), Arc::new(mode));
        Ok(())
    }

    fn current(&self) -> (Arc<rustls::ServerConfig>, Arc<TlsMode>) {
        self.inner.read().unwrap().clone()
    }

    fn classify(
        &self,
        mode: &TlsMode,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> PeerKind {
        match mode {
            TlsMode::Standalone(_) => {
                ferry_cluster::mtls::classify_standalone_peer(certs, &self.trust)
            }
            TlsMode::Cluster(c) => ferry_cluster::mtls::classify_peer(certs, c, &self.trust),
        }
    }
}

/// A listener for axum: TCP accept + TLS handshake; handshakes run
/// concurrently so one slow or garbage-sending client holds up no one.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    pub async fn bind(addr: SocketAddr, state: TlsState) -> std::io::Result<TlsListener> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    // No Nagle: migration streams are written frame by frame
                    // and flushed; a held-back tail segment waits for the
                    // peer's (delayed) ACK.
                    Ok(x) => {
                        let _ = x.0.set_nodelay(true);
                        x
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (state, tx) = (state.clone(), tx.clone());
                tokio::spawn(async move {
                    let (cfg, mode) = state.current();
                    let hs = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        TlsAcceptor::from(cfg).accept(stream),
                    )
                    .await;
                    match hs {
                        Ok(Ok(tls)) => {
                            let kind = state.classify(&mode, tls.get_ref().1.peer_certificates());
                            let _ = tx.send((tls, Peer::Remote { addr: peer, kind })).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer::Remote {
            addr: self.local,
            kind: PeerKind::Anonymous,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(_: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Peer::Local
    }
}
