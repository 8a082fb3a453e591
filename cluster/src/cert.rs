//! The shared cluster certificate.
//!
//! Like Incus, a ferry cluster has ONE self-signed certificate and key that
//! every member holds: `ferry cluster enable` makes it on the first member and
//! a joiner receives it during the join. Members present it both as TLS server
//! certificate and as client certificate to each other, and recognise each
//! other by it (exact DER match). It is kept as `DIR/cluster.crt` (0644) and
//! `DIR/cluster.key` (0600).

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::identity::{fingerprint, write_file, IdentityError};

/// Subject alternative name (and common name) that every cluster certificate
/// carries; members use it as the TLS server name when dialling each other.
pub const CLUSTER_SAN: &str = "ferry-cluster";
/// File name of the cluster certificate inside the member's data directory.
pub const CERT_FILE: &str = "cluster.crt";
/// File name of the cluster key inside the member's data directory.
pub const KEY_FILE: &str = "cluster.key";

#[derive(Debug, Error)]
pub enum CertError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate the cluster certificate: {0}")]
    Generate(String),
    #[error("the cluster {what} is not usable PEM ({detail})")]
    BadPem { what: &'static str, detail: String },
    #[error("the cluster key does not belong to the cluster certificate ({0})")]
    KeyMismatch(String),
    #[error("{0} already exists: this member already has a cluster certificate (remove it only if you mean to leave the cluster)")]
    AlreadyExists(PathBuf),
    #[error("the cluster certificate received has fingerprint {got}, not the join token's {want}: refusing it; ask for a new token with `ferry cluster add NAME` on a member")]
    FingerprintMismatch { got: String, want: String },
    #[error("{present} exists but {missing} is missing: restore {missing} from another member, or remove {present} to leave the cluster")]
    Incomplete { present: PathBuf, missing: PathBuf },
}

impl From<IdentityError> for CertError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Io { path, source } => CertError::Io { path, source },
            other => CertError::Generate(other.to_string()),
        }
    }
}

/// The cluster certificate and its private key, parsed and checked.
pub struct ClusterCert {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
    fingerprint: String,
}

impl Clone for ClusterCert {
    fn clone(&self) -> Self {
        ClusterCert {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// Never prints the key.
impl fmt::Debug for ClusterCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ClusterCert {
    /// Generate a new cluster certificate in memory (ECDSA P-256, self-signed).
    /// `sans` (DNS names or IP addresses) become subject alternative names, plus
    /// [`CLUSTER_SAN`].
    pub fn generate(sans: &[String]) -> Result<ClusterCert, CertError> {
        let gen = |e: rcgen::Error| CertError::Generate(e.to_string());
        let mut names: Vec<String> = Vec::new();
        for n in sans
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .chain([CLUSTER_SAN])
        {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
        let mut params = rcgen::CertificateParams::new(names).map_err(gen)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, CLUSTER_SAN);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "ferry");
        // Members pin this certificate by its exact bytes, so validity dates are
        // not what protects the cluster; keep them wide so nothing expires under it.
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2074, 1, 1);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let cert = params.self_signed(&key).map_err(gen)?;
        ClusterCert::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Generate a new cluster certificate and save it in `dir` (what
    /// `ferry cluster enable` does). Refuses to overwrite an existing one.
    pub fn create(dir: &Path, sans: &[String]) -> Result<ClusterCert, CertError> {
        for p in [cert_path(dir), key_path(dir)] {
            if p.exists() {
                return Err(CertError::AlreadyExists(p));
            }
        }
        let cert = ClusterCert::generate(sans)?;
        cert.save(dir)?;
        tracing::info!(fingerprint = %cert.fingerprint, dir = %dir.display(), "created the cluster certificate");
        Ok(cert)
    }

    /// Load the cluster certificate from `dir`; `Ok(None)` if this member has
    /// none (not clustered). Half a pair is an error.
    pub fn load(dir: &Path) -> Result<Option<ClusterCert>, CertError> {
        let (c, k) = (cert_path(dir), key_path(dir));
        match (c.exists(), k.exists()) {
            (false, false) => return Ok(None),
            (true, false) => {
                return Err(CertError::Incomplete {
                    present: c,
                    missing: k,
                })
            }
            (false, true) => {
                return Err(CertError::Incomplete {
                    present: k,
                    missing: c,
                })
            }
            (true, true) => {}
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CertError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(&c)?, read(&k)?);
        let cert = ClusterCert::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            CertError::BadPem { what, detail } => CertError::BadPem {
                what,
                detail: format!("{detail}; in {}", dir.display()),
            },
            other => other,
        })?;
        Ok(Some(cert))
    }

    /// Build from PEM text (e.g. as received by a joiner). Checks that the key
    /// is a key rustls can use and that it matches the certificate.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCert, CertError> {
        let mut reader = cert_pem.as_bytes();
        let mut certs = rustls_pemfile::certs(&mut reader);
        let cert_der = match certs.next() {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return Err(CertError::BadPem {
                    what: "certificate",
                    detail: e.to_string(),
                })
            }
            None => {
                return Err(CertError::BadPem {
                    what: "certificate",
                    detail: "no CERTIFICATE block found".into(),
                })
            }
        };
        if certs.next().is_some() {
            return Err(CertError::BadPem {
                what: "certificate",
                detail: "expected exactly one certificate".into(),
            });
        }
        let key_der = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
            Ok(Some(k)) => k,
            Ok(None) => {
                return Err(CertError::BadPem {
                    what: "key",
                    detail: "no PRIVATE KEY block found".into(),
                })
            }
            Err(e) => {
                return Err(CertError::BadPem {
                    what: "key",
                    detail: e.to_string(),
                })
            }
        };
        let provider = rustls::crypto::ring::default_provider();
        let ck = rustls::sign::CertifiedKey::from_der(
            vec![cert_der.clone()],
            key_der.clone_key(),
            &provider,
        )
        .map_err(|e| CertError::KeyMismatch(e.to_string()))?;
        // from_der tolerates "unknown" consistency; insist on a positive match.
        ck.keys_match()
            .map_err(|e| CertError::KeyMismatch(e.to_string()))?;
        let fingerprint = fingerprint(&cert_der);
        Ok(ClusterCert {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            cert_der,
            key_der,
            fingerprint,
        })
    }

    /// Write `DIR/cluster.crt` (0644) and `DIR/cluster.key` (0600) atomically,
    /// key first so a crash never leaves a certificate without its key.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        write_file(&key_path(dir), self.key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path(dir), self.cert_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// SHA-256 of the certificate DER, lowercase hex (what join tokens carry).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key_der.clone_key()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key. Secret: only ever sent to a joiner over TLS after its
    /// join secret was checked.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A joiner's check of the certificate it received against the token's
    /// fingerprint (`AB:CD:..` and uppercase are accepted).
    pub fn check_fingerprint(&self, expected: &str) -> Result<(), CertError> {
        let want = crate::token::normalize_fingerprint(expected);
        if want == self.fingerprint {
            Ok(())
        } else {
            Err(CertError::FingerprintMismatch {
                got: self.fingerprint.clone(),
                want,
            })
        }
    }

    /// Whether `der` is exactly this cluster certificate.
    pub fn is(&self, der: &[u8]) -> bool {
        self.cert_der.as_ref() == der
    }
}

/// `DIR/cluster.crt`
pub fn cert_path(dir: &Path) -> PathBuf {
    dir.join(CERT_FILE)
}

/// `DIR/cluster.key`
pub fn key_path(dir: &Path) -> PathBuf {
    dir.join(KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn create_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ClusterCert::load(dir.path()).unwrap().is_none());
        let a = ClusterCert::create(dir.path(), &["10.0.0.1".into(), "m1.example".into()]).unwrap();
        assert_eq!(a.fingerprint().len(), 64);
        assert_eq!(a.fingerprint(), fingerprint(&a.cert_der()));
        let b = ClusterCert::load(dir.path()).unwrap().unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.key_pem(), b.key_pem());
        let mode = |f| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(mode(CERT_FILE), 0o644);
        assert!(
            !format!("{a:?}").contains("PRIVATE"),
            "Debug must not print the key"
        );
    }

    #[test]
    fn create_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCert::create(dir.path(), &[]).unwrap();
        let e = ClusterCert::create(dir.path(), &[]).unwrap_err();
        assert!(matches!(e, CertError::AlreadyExists(_)), "{e}");
        assert!(
            e.to_string().contains("already has a cluster certificate"),
            "{e}"
        );
    }

    #[test]
    fn half_a_pair_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCert::create(dir.path(), &[]).unwrap();
        std::fs::remove_file(key_path(dir.path())).unwrap();
        let e = ClusterCert::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("cluster.key is missing"), "{e}");
    }

    #[test]
    fn sans_include_cluster_name_and_ips() {
        let c = ClusterCert::generate(&[
            "127.0.0.1".into(),
            "node.local".into(),
            "ferry-cluster".into(),
        ])
        .unwrap();
        // DER contains the DNS names verbatim and the IP as 4 raw bytes.
        let der = c.cert_der();
        let has = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"ferry-cluster"));
        assert!(has(b"node.local"));
        assert!(has(&[0x87, 4, 127, 0, 0, 1]), "IP SAN 127.0.0.1");
    }

    #[test]
    fn mismatched_key_or_garbage_refused() {
        let a = ClusterCert::generate(&[]).unwrap();
        let b = ClusterCert::generate(&[]).unwrap();
        let e = ClusterCert::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(e, CertError::KeyMismatch(_)), "{e}");
        let e = ClusterCert::from_pem("garbage", a.key_pem()).unwrap_err();
        assert!(
            matches!(
                e,
                CertError::BadPem {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        let e = ClusterCert::from_pem(a.cert_pem(), "garbage").unwrap_err();
        assert!(matches!(e, CertError::BadPem { what: "key", .. }), "{e}");
        assert!(ClusterCert::from_pem(a.cert_pem(), a.key_pem()).is_ok());
        assert!(a.is(&a.cert_der()) && !a.is(&b.cert_der()));
        a.check_fingerprint(&a.fingerprint().to_uppercase())
            .unwrap();
        let e = a
            .check_fingerprint(b.fingerprint())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not the join token's") && e.contains("ferry cluster add"),
            "{e}"
        );
    }
}
