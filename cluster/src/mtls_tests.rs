//! Real TLS handshakes over loopback (tokio-rustls).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

type PeerCerts = Option<Vec<CertificateDer<'static>>>;

const LIMIT: Duration = Duration::from_secs(10);

/// Accept one connection: handshake, read "ping", answer "pong"; returns the
/// client's certificates, or the handshake/IO error as text.
async fn serve_once(
    cfg: ServerConfig,
) -> (
    SocketAddr,
    tokio::task::JoinHandle<Result<PeerCerts, String>>,
) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let task = tokio::spawn(async move {
        let (stream, _) = tcp.accept().await.map_err(|e| e.to_string())?;
        let mut tls = tokio::time::timeout(LIMIT, acceptor.accept(stream))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let certs = tls.get_ref().1.peer_certificates().map(|c| c.to_vec());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(certs)
    });
    (addr, task)
}

/// Connect, send "ping", expect "pong". With TLS 1.3 a client learns that the
/// server refused its certificate only on its first read, so a refusal shows
/// up here either from `connect` or from the read.
async fn talk(addr: SocketAddr, cfg: ClientConfig) -> Result<(), String> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(Arc::new(cfg))
            .connect(cluster_server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        if &buf != b"pong" {
            return Err("bad answer".into());
        }
        Ok(())
    };
    tokio::time::timeout(LIMIT, fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

/// Run one exchange; returns (client result, server result).
async fn exchange(
    server: ServerConfig,
    client: ClientConfig,
) -> (Result<(), String>, Result<PeerCerts, String>) {
    let (addr, task) = serve_once(server).await;
    let c = talk(addr, client).await;
    let s = tokio::time::timeout(LIMIT, task)
        .await
        .expect("server task hung")
        .unwrap();
    (c, s)
}

/// A client presenting `cert`/`key` that pins the server certificate `server`.
fn user_client(cert: &ClusterCert, server: CertificateDer<'static>) -> ClientConfig {
    pinned_builder(Pin::Der(server))
        .unwrap()
        .with_client_auth_cert(vec![cert.cert_der()], cert.key_der())
        .unwrap()
}

/// A self-signed certificate that is not the cluster's (same shape as a
/// user's client certificate or a rogue member's).
fn self_signed() -> ClusterCert {
    ClusterCert::generate(&["rogue".into()]).unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    cluster: ClusterCert,
    trust: TrustStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ClusterCert::create(dir.path(), &["127.0.0.1".into()]).unwrap();
    let trust = TrustStore::new(dir.path().join("trust"));
    Fixture {
        _dir: dir,
        cluster,
        trust,
    }
}

#[tokio::test]
async fn member_to_member() {
    let f = fixture();
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        member_client_config(&f.cluster).unwrap(),
    )
    .await;
    c.unwrap();
    let certs = s.unwrap();
    assert_eq!(
        classify_peer(certs.as_deref(), &f.cluster, &f.trust),
        PeerKind::Member
    );
}

#[tokio::test]
async fn member_loaded_from_disk_talks_to_member_that_joined() {
    // A joiner receives the PEM pair and saves it; both sides must agree.
    let f = fixture();
    let joiner_dir = tempfile::tempdir().unwrap();
    ClusterCert::from_pem(f.cluster.cert_pem(), f.cluster.key_pem())
        .unwrap()
        .save(joiner_dir.path())
        .unwrap();
    let joined = ClusterCert::load(joiner_dir.path()).unwrap().unwrap();
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        member_client_config(&joined).unwrap(),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_peer(s.unwrap().as_deref(), &f.cluster, &f.trust),
        PeerKind::Member
    );
}

#[tokio::test]
async fn self_signed_peer_is_refused_at_tls_layer() {
    let f = fixture();
    let rogue = self_signed();
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        user_client(&rogue, f.cluster.cert_der()),
    )
    .await;
    assert!(c.is_err(), "client must see the refusal");
    let e = s.unwrap_err();
    assert!(
        e.contains("neither the cluster certificate nor trusted"),
        "{e}"
    );
}

#[tokio::test]
async fn another_clusters_member_is_refused() {
    let f = fixture();
    let other = fixture();
    // The other cluster's member pins our server too (worst case: it knows our cert).
    let client = pinned_builder(Pin::Der(f.cluster.cert_der()))
        .unwrap()
        .with_client_auth_cert(vec![other.cluster.cert_der()], other.cluster.key_der())
        .unwrap();
    let (c, s) = exchange(server_config(&f.cluster, f.trust.clone()).unwrap(), client).await;
    assert!(c.is_err());
    assert!(s.is_err());
}

#[tokio::test]
async fn trusted_user_is_classified() {
    let f = fixture();
    let user = self_signed();
    let fp = f.trust.add_pem(user.cert_pem()).unwrap();
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        user_client(&user, f.cluster.cert_der()),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_peer(s.unwrap().as_deref(), &f.cluster, &f.trust),
        PeerKind::TrustedClient(fp)
    );
}

#[tokio::test]
async fn no_client_cert_is_anonymous_and_joiner_with_right_fingerprint_connects() {
    let f = fixture();
    let upper_with_colons = f
        .cluster
        .fingerprint()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":");
    for fp in [f.cluster.fingerprint().to_string(), upper_with_colons] {
        let (c, s) = exchange(
            server_config(&f.cluster, f.trust.clone()).unwrap(),
            joiner_client_config(&fp).unwrap(),
        )
        .await;
        c.unwrap();
        let certs = s.unwrap();
        assert!(certs.is_none());
        assert_eq!(
            classify_peer(certs.as_deref(), &f.cluster, &f.trust),
            PeerKind::Anonymous
        );
    }
}

#[tokio::test]
async fn joiner_with_wrong_fingerprint_refuses_server() {
    let f = fixture();
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        joiner_client_config(&"00".repeat(32)).unwrap(),
    )
    .await;
    let e = c.unwrap_err();
    assert!(e.contains("does not match the join token"), "{e}");
    assert!(s.is_err());
}

#[tokio::test]
async fn member_client_refuses_a_server_with_another_cert() {
    let f = fixture();
    let other = fixture();
    // Another cluster's member, even one that would accept us.
    let (c, _) = exchange(
        server_config(&other.cluster, other.trust.clone()).unwrap(),
        member_client_config(&f.cluster).unwrap(),
    )
    .await;
    let e = c.unwrap_err();
    assert!(e.contains("not this cluster's certificate"), "{e}");
    // A standalone member presenting its own server.crt.
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::load_or_generate(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
        "m9",
        &[],
    )
    .unwrap();
    let (c, _) = exchange(
        standalone_server_config(&id, f.trust.clone()).unwrap(),
        member_client_config(&f.cluster).unwrap(),
    )
    .await;
    assert!(c.is_err());
}

#[tokio::test]
async fn standalone_server_accepts_users_and_anonymous_but_not_others() {
    let dir = tempfile::tempdir().unwrap();
    let id = Identity::load_or_generate(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
        "m1",
        &["127.0.0.1".into()],
    )
    .unwrap();
    let trust = TrustStore::new(dir.path().join("trust"));
    let server_der = id.cert_der().unwrap()[0].clone();
    let user = self_signed();
    let fp = trust.add_pem(user.cert_pem()).unwrap();

    let (c, s) = exchange(
        standalone_server_config(&id, trust.clone()).unwrap(),
        user_client(&user, server_der.clone()),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_standalone_peer(s.unwrap().as_deref(), &trust),
        PeerKind::TrustedClient(fp)
    );

    let (c, s) = exchange(
        standalone_server_config(&id, trust.clone()).unwrap(),
        joiner_client_config(&id.fingerprint().unwrap()).unwrap(),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_standalone_peer(s.unwrap().as_deref(), &trust),
        PeerKind::Anonymous
    );

    // Not clustered: a cluster certificate means nothing here.
    let stray_cluster = self_signed();
    let (c, s) = exchange(
        standalone_server_config(&id, trust.clone()).unwrap(),
        user_client(&stray_cluster, server_der),
    )
    .await;
    assert!(c.is_err());
    assert!(s.is_err());
}

#[test]
fn classify_without_handshake() {
    let f = fixture();
    let user = self_signed();
    let stranger = self_signed();
    let fp = f.trust.add_pem(user.cert_pem()).unwrap();
    assert_eq!(
        classify_peer(None, &f.cluster, &f.trust),
        PeerKind::Anonymous
    );
    assert_eq!(
        classify_peer(Some(&[]), &f.cluster, &f.trust),
        PeerKind::Anonymous
    );
    assert_eq!(
        classify_peer(Some(&[f.cluster.cert_der()]), &f.cluster, &f.trust),
        PeerKind::Member
    );
    assert_eq!(
        classify_peer(Some(&[user.cert_der()]), &f.cluster, &f.trust),
        PeerKind::TrustedClient(fp)
    );
    // Cannot pass the handshake; if it ever got here it would get no privileges.
    assert_eq!(
        classify_peer(Some(&[stranger.cert_der()]), &f.cluster, &f.trust),
        PeerKind::Anonymous
    );
    assert_eq!(
        classify_standalone_peer(Some(&[f.cluster.cert_der()]), &f.trust),
        PeerKind::Anonymous
    );
}

#[test]
fn bad_fingerprint_is_refused_up_front() {
    for fp in ["", "abc", &"zz".repeat(32)] {
        let e = joiner_client_config(fp).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a SHA-256 certificate fingerprint"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn tls12_same_rules() {
    let f = fixture();
    let tls12 = |client: Option<&ClusterCert>| {
        let p = provider();
        let verifier = PinnedServer {
            pin: Pin::Der(f.cluster.cert_der()),
            algs: p.signature_verification_algorithms,
        };
        let b = ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        match client {
            Some(c) => b
                .with_client_auth_cert(vec![c.cert_der()], c.key_der())
                .unwrap(),
            None => b.with_no_client_auth(),
        }
    };
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        tls12(Some(&f.cluster)),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_peer(s.unwrap().as_deref(), &f.cluster, &f.trust),
        PeerKind::Member
    );
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        tls12(Some(&self_signed())),
    )
    .await;
    assert!(c.is_err() && s.is_err());
    let (c, s) = exchange(
        server_config(&f.cluster, f.trust.clone()).unwrap(),
        tls12(None),
    )
    .await;
    c.unwrap();
    assert_eq!(
        classify_peer(s.unwrap().as_deref(), &f.cluster, &f.trust),
        PeerKind::Anonymous
    );
}

#[test]
fn members_prefer_aes128_gcm_and_keep_every_suite() {
    let p = provider();
    let default = rustls::crypto::ring::default_provider();
    assert_eq!(
        p.cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    let names = |v: &[rustls::SupportedCipherSuite]| {
        let mut n: Vec<_> = v.iter().map(|s| format!("{:?}", s.suite())).collect();
        n.sort();
        n
    };
    assert_eq!(names(&p.cipher_suites), names(&default.cipher_suites));
}
