//! Certificate pinning and client certificate tests, including real TLS
//! handshakes over loopback.

use super::*;
use std::sync::Mutex;

use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn der_of(gen: &GeneratedCert) -> CertificateDer<'static> {
    rustls_pemfile::certs(&mut gen.cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
}

fn key_of(gen: &GeneratedCert) -> PrivateKeyDer<'static> {
    rustls_pemfile::private_key(&mut gen.key_pem.as_bytes())
        .unwrap()
        .unwrap()
}

fn name() -> ServerName<'static> {
    ServerName::try_from("127.0.0.1").unwrap()
}

#[test]
fn verifier_accepts_only_the_pinned_cert() {
    let a = generate_client_cert("server-a").unwrap();
    let b = generate_client_cert("server-b").unwrap();
    let v = PinnedServerCertVerifier::new(der_of(&a));
    assert!(v
        .verify_server_cert(&der_of(&a), &[], &name(), &[], UnixTime::now())
        .is_ok());
    let err = v
        .verify_server_cert(&der_of(&b), &[], &name(), &[], UnixTime::now())
        .unwrap_err();
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(o)) => {
            assert!(o.0.to_string().contains("does not match the pinned"))
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!v.supported_verify_schemes().is_empty());
}

#[test]
fn fingerprints_are_sha256_hex() {
    let a = generate_client_cert("x").unwrap();
    assert_eq!(a.fingerprint.len(), 64);
    assert_eq!(a.fingerprint, fingerprint(der_of(&a).as_ref()));
    assert!(a
        .fingerprint
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    // Known vector: SHA-256 of "abc".
    assert_eq!(
        fingerprint(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn ensure_client_cert_generates_once() {
    let dir = tempfile::tempdir().unwrap();
    let crt = dir.path().join("sub/client.crt");
    let key = dir.path().join("sub/client.key");
    let fp = ensure_client_cert(&crt, &key).unwrap().expect("generated");
    assert_eq!(pem_file_fingerprint(&crt).unwrap(), fp);
    load_key(&key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(ensure_client_cert(&crt, &key).unwrap(), None);
    assert_eq!(pem_file_fingerprint(&crt).unwrap(), fp);
}

/// Server-side verifier that accepts any client certificate but records it.
#[derive(Debug, Default)]
struct RecordClientCert {
    seen: Mutex<Option<Vec<u8>>>,
}

impl ClientCertVerifier for RecordClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        *self.seen.lock().unwrap() = Some(end_entity.to_vec());
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Serve one HTTPS request with a canned envelope; returns the port.
async fn tls_server(server: &GeneratedCert, recorder: Arc<RecordClientCert>) -> u16 {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key_of(server).secret_der().to_vec(),
    ));
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(recorder)
        .with_single_cert(vec![der_of(server)], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        let _ = tls.read(&mut buf).await;
        let body = r#"{"type":"sync","status":"Success","status_code":200,"operation":"","error_code":0,"error":"","metadata":{"api_version":"1.0"}}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tls.write_all(resp.as_bytes()).await;
        let _ = tls.shutdown().await;
    });
    port
}

fn write_pems(
    dir: &Path,
    name: &str,
    gen: &GeneratedCert,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    fs::write(&crt, &gen.cert_pem).unwrap();
    fs::write(&key, &gen.key_pem).unwrap();
    (crt, key)
}

#[tokio::test]
async fn https_handshake_pins_and_presents_client_cert() {
    let dir = tempfile::tempdir().unwrap();
    let server = generate_client_cert("server").unwrap();
    let other = generate_client_cert("impostor").unwrap();
    let client = generate_client_cert("client").unwrap();
    let (server_crt, _) = write_pems(dir.path(), "server", &server);
    let (other_crt, _) = write_pems(dir.path(), "other", &other);
    let (client_crt, client_key) = write_pems(dir.path(), "client", &client);

    // Pinned to the right certificate: works, and the server saw our cert.
    let rec = Arc::new(RecordClientCert::default());
    let port = tls_server(&server, rec.clone()).await;
    let url = format!("https://127.0.0.1:{port}");
    let c = crate::Client::https(&url, &client_crt, &client_key, &server_crt).unwrap();
    let env = c.get("/1.0").await.unwrap();
    assert_eq!(env.metadata["api_version"], "1.0");
    assert_eq!(
        rec.seen.lock().unwrap().as_deref(),
        Some(der_of(&client).as_ref())
    );

    // Pinned to another certificate: refused.
    let port = tls_server(&server, Arc::new(RecordClientCert::default())).await;
    let url = format!("https://127.0.0.1:{port}");
    let c = crate::Client::https(&url, &client_crt, &client_key, &other_crt).unwrap();
    let err = c.get("/1.0").await.unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
    assert!(
        err.to_string().contains("does not match the pinned"),
        "{err}"
    );
}

#[test]
fn https_client_reports_missing_files() {
    let err = crate::Client::https(
        "https://127.0.0.1:1",
        "/nonexistent.crt",
        "/nonexistent.key",
        "/x.crt",
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent.crt"), "{err}");
}
