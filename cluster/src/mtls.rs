//! rustls configurations for the cluster port (ring provider throughout).
//!
//! Server side ([`server_config`], [`standalone_server_config`]): the server
//! asks for a client certificate but does not require one (a joiner has none
//! yet, and `GET /1.0` is public). A client that DOES present a certificate
//! must present either exactly the cluster certificate (a member) or one in
//! the trust store (a user); anything else fails the TLS handshake. After the
//! handshake, [`classify_peer`] tells the HTTP layer which kind of peer it has.
//!
//! Client side: [`member_client_config`] (member to member: presents the
//! cluster certificate, accepts only a server presenting exactly it) and
//! [`joiner_client_config`] (no client certificate, accepts only a server
//! whose certificate has the token's fingerprint).
//!
//! Certificates are pinned by their exact bytes or SHA-256; there is no CA
//! chain to validate, and validity dates are not checked. Handshake
//! signatures are always verified, which proves the peer holds the key.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig,
    SignatureScheme,
};
use thiserror::Error;

use crate::cert::{ClusterCert, CLUSTER_SAN};
use crate::identity::{fingerprint, Identity, IdentityError};
use crate::token::normalize_fingerprint;
use crate::trust::TrustStore;

#[derive(Debug, Error)]
pub enum MtlsError {
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("{0:?} is not a SHA-256 certificate fingerprint (64 hex digits)")]
    BadFingerprint(String),
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    /// Presented the cluster certificate: another member of this cluster.
    Member,
    /// Presented a certificate from the trust store (its fingerprint).
    TrustedClient(String),
    /// Presented no certificate: may only use public endpoints (and join with
    /// a token).
    Anonymous,
}

/// The crypto provider used for every config here: ring's, with AES-128-GCM
/// first among the TLS 1.3 suites (ring's default puts AES-256-GCM first).
/// Members move whole instances over these connections, so the bulk cipher's
/// cost counts; AES-128-GCM is TLS 1.3's mandatory suite and about 10 %
/// cheaper here (4 AES rounds fewer per block). A peer that prefers another
/// suite still gets it: the order only decides between suites both offer.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let first = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.sort_by_key(|s| s.suite() != first);
    Arc::new(p)
}

/// The TLS server name members use when dialling each other (a SAN of every
/// cluster certificate; the pinning verifiers do not depend on it).
pub fn cluster_server_name() -> ServerName<'static> {
    ServerName::try_from(CLUSTER_SAN).expect("a valid DNS name")
}

// ---------------------------------------------------------------------------
// Server side

/// Optional client certificate: none is fine; if one is presented it must be
/// the cluster certificate (when `member` is set) or in the trust store.
#[derive(Debug)]
struct PeerCertVerifier {
    member: Option<CertificateDer<'static>>,
    trust: TrustStore,
    algs: WebPkiSupportedAlgorithms,
}

/// Carries the whole message: rustls shows `OtherError`s with `Debug`.
#[derive(Debug)]
struct RefusedClient(String);

impl fmt::Display for RefusedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedClient {}

impl ClientCertVerifier for PeerCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self
            .member
            .as_ref()
            .is_some_and(|m| m.as_ref() == end.as_ref())
            || self.trust.is_trusted(end)
        {
            return Ok(ClientCertVerified::assertion());
        }
        let fp = fingerprint(end);
        tracing::warn!(fingerprint = %fp, "refused a client certificate that is neither the cluster certificate nor trusted");
        let msg = format!(
            "client certificate {fp} is neither the cluster certificate nor trusted: add it with `ferry config trust add`, or connect without a certificate"
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(RefusedClient(msg))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn build_server(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    member: Option<CertificateDer<'static>>,
    trust: TrustStore,
) -> Result<ServerConfig, MtlsError> {
    let provider = provider();
    let verifier = PeerCertVerifier {
        member,
        trust,
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)?;
    // No session resumption: a resumed handshake skips client-certificate
    // verification, so a certificate removed from the trust store would keep
    // working. Every connection verifies afresh.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The cluster port of a clustered member: presents the cluster certificate;
/// accepts members (cluster certificate), trusted users, and anonymous peers.
pub fn server_config(cluster: &ClusterCert, trust: TrustStore) -> Result<ServerConfig, MtlsError> {
    build_server(
        vec![cluster.cert_der()],
        cluster.key_der(),
        Some(cluster.cert_der()),
        trust,
    )
}

/// A member that is not (yet) clustered: presents its own identity
/// (`server.crt`); accepts trusted users and anonymous peers.
pub fn standalone_server_config(
    id: &Identity,
    trust: TrustStore,
) -> Result<ServerConfig, MtlsError> {
    build_server(id.cert_der()?, id.key_der()?, None, trust)
}

/// Which kind of peer completed the handshake on a [`server_config`] port.
/// Pass `ServerConnection::peer_certificates()` (for tokio-rustls:
/// `stream.get_ref().1.peer_certificates()`).
///
/// A certificate that is neither the cluster certificate nor trusted cannot
/// get past the handshake; should one reach here anyway (e.g. the trust store
/// changed since), it is treated as [`PeerKind::Anonymous`], the least
/// privileged kind.
pub fn classify_peer(
    conn_peer_certs: Option<&[CertificateDer<'_>]>,
    cluster: &ClusterCert,
    trust: &TrustStore,
) -> PeerKind {
    match conn_peer_certs.and_then(|c| c.first()) {
        Some(end) if cluster.is(end) => PeerKind::Member,
        Some(end) => classify_user(end, trust),
        None => PeerKind::Anonymous,
    }
}

/// [`classify_peer`] for a [`standalone_server_config`] port (never `Member`).
pub fn classify_standalone_peer(
    conn_peer_certs: Option<&[CertificateDer<'_>]>,
    trust: &TrustStore,
) -> PeerKind {
    match conn_peer_certs.and_then(|c| c.first()) {
        Some(end) => classify_user(end, trust),
        None => PeerKind::Anonymous,
    }
}

fn classify_user(end: &CertificateDer<'_>, trust: &TrustStore) -> PeerKind {
    let fp = fingerprint(end);
    if trust.is_trusted(end) {
        PeerKind::TrustedClient(fp)
    } else {
        tracing::warn!(fingerprint = %fp, "a certificate no longer trusted reached the HTTP layer; treating the peer as anonymous");
        PeerKind::Anonymous
    }
}

// ---------------------------------------------------------------------------
// Client side

#[derive(Debug, Clone)]
enum Pin {
    /// Exactly these DER bytes.
    Der(CertificateDer<'static>),
    /// SHA-256 of the DER, lowercase hex.
    Fingerprint(String),
}

/// Accepts only the pinned server certificate; handshake signatures are still
/// verified with the provider's algorithms.
#[derive(Debug)]
struct PinnedServer {
    pin: Pin,
    algs: WebPkiSupportedAlgorithms,
}

/// Carries the whole message: rustls shows `OtherError`s with `Debug`.
#[derive(Debug)]
struct PinMismatch(String);

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let msg = match &self.pin {
            Pin::Der(want) if want.as_ref() == end.as_ref() => return Ok(ServerCertVerified::assertion()),
            Pin::Der(_) => format!("the server presented certificate {}, which is not this cluster's certificate: it is not a member of this cluster", fingerprint(end)),
            Pin::Fingerprint(want) => {
                let got = fingerprint(end);
                if &got == want {
                    return Ok(ServerCertVerified::assertion());
                }
                format!(
                    "the server's certificate fingerprint {got} does not match the join token's {want}: this is not the cluster that issued the token (check the address, or ask for a new token with `ferry cluster add NAME` on a member)"
                )
            }
        };
        tracing::warn!("{msg}");
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch(msg))),
        )))
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn pinned_builder(
    pin: Pin,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, MtlsError> {
    let provider = provider();
    let verifier = PinnedServer {
        pin,
        algs: provider.signature_verification_algorithms,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// Member to member: presents the cluster certificate and accepts only a
/// server presenting exactly the cluster certificate.
pub fn member_client_config(cluster: &ClusterCert) -> Result<ClientConfig, MtlsError> {
    Ok(pinned_builder(Pin::Der(cluster.cert_der()))?
        .with_client_auth_cert(vec![cluster.cert_der()], cluster.key_der())?)
}

/// A joiner (which has no certificate yet): presents none and accepts only a
/// server whose certificate's SHA-256 is `fingerprint` (from the join token;
/// `AB:CD:..` and uppercase are accepted).
pub fn joiner_client_config(fingerprint: &str) -> Result<ClientConfig, MtlsError> {
    let fp = normalize_fingerprint(fingerprint);
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(MtlsError::BadFingerprint(fingerprint.to_string()));
    }
    Ok(pinned_builder(Pin::Fingerprint(fp))?.with_no_client_auth())
}

#[cfg(test)]
#[path = "mtls_tests.rs"]
mod tests;
