//! TLS for the HTTPS transport: certificate pinning, client certificates.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{ClientError, Result};

/// The crypto provider used everywhere in this crate (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the server only if it presents exactly the pinned certificate
/// (DER comparison). Handshake signatures are still verified.
#[derive(Debug)]
pub struct PinnedServerCertVerifier {
    expected: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerCertVerifier {
    pub fn new(expected: CertificateDer<'static>) -> Self {
        PinnedServerCertVerifier {
            expected,
            provider: provider(),
        }
    }
}

#[derive(Debug)]
struct PinMismatch;

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the server certificate does not match the pinned --server-cert")
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedServerCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.expected.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Read all certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = fs::read(path)
        .map_err(|e| ClientError::io(format!("Cannot read {}", path.display()), e))?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| {
            ClientError::Tls(format!(
                "Invalid PEM certificate in {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(ClientError::Tls(format!(
            "No certificate found in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Read the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = fs::read(path)
        .map_err(|e| ClientError::io(format!("Cannot read {}", path.display()), e))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| ClientError::Tls(format!("Invalid PEM key in {}: {e}", path.display())))?
        .ok_or_else(|| ClientError::Tls(format!("No private key found in {}", path.display())))
}

/// Build a rustls client config that pins `server_cert` and presents the
/// given client certificate chain and key.
pub fn client_config(
    client_certs: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
    server_cert: CertificateDer<'static>,
) -> Result<ClientConfig> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(format!("TLS setup failed: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServerCertVerifier::new(server_cert)))
        .with_client_auth_cert(client_certs, client_key)
        .map_err(|e| ClientError::Tls(format!("Invalid client certificate or key: {e}")))
}

/// SHA-256 fingerprint of a DER certificate, lowercase hex without separators
/// (the form Incus uses).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A freshly generated self-signed certificate, PEM encoded.
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub fingerprint: String,
}

/// Generate a self-signed ECDSA P-256 client certificate with `rcgen`.
pub fn generate_client_cert(common_name: &str) -> Result<GeneratedCert> {
    let err = |e: rcgen::Error| ClientError::Tls(format!("Cannot generate a certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![common_name.to_string()]).map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&key).map_err(err)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        fingerprint: fingerprint(cert.der()),
    })
}

/// Make sure a client certificate and key exist at the given paths,
/// generating them (key mode 0600) if the certificate is missing.
/// Returns `Some(fingerprint)` when a new certificate was generated.
pub fn ensure_client_cert(cert_path: &Path, key_path: &Path) -> Result<Option<String>> {
    if cert_path.exists() && key_path.exists() {
        return Ok(None);
    }
    for p in [cert_path, key_path] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
    }
    let cn = format!("ferry-client@{}", hostname());
    let gen = generate_client_cert(&cn)?;
    write_file(key_path, gen.key_pem.as_bytes(), 0o600)?;
    write_file(cert_path, gen.cert_pem.as_bytes(), 0o644)?;
    Ok(Some(gen.fingerprint))
}

/// Fingerprint of the first certificate of a PEM file.
pub fn pem_file_fingerprint(path: &Path) -> Result<String> {
    Ok(fingerprint(load_certs(path)?[0].as_ref()))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ClientError::io(format!("Cannot create {}", dir.display()), e))
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let ctx = || format!("Cannot write {}", path.display());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| ClientError::io(ctx(), e))?;
    f.write_all(data).map_err(|e| ClientError::io(ctx(), e))
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
