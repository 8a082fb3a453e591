//! A member's (or a client's) TLS identity: an ECDSA P-256 certificate and key,
//! generated with rcgen and kept as PEM files.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("{path} holds no usable PEM {what}: delete it to have a new one generated")]
    BadPem { path: PathBuf, what: &'static str },
}

/// A certificate chain (one self-signed certificate today) and its private key.
#[derive(Debug)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Identity {
    /// Load `cert_path`/`key_path`, generating both first if either is missing.
    /// `names` become the certificate's subject alternative names.
    pub fn load_or_generate(
        cert_path: &Path,
        key_path: &Path,
        common_name: &str,
        names: &[String],
    ) -> Result<Identity, IdentityError> {
        if !cert_path.exists() || !key_path.exists() {
            let (cert, key) = generate(common_name, names)?;
            write_file(key_path, key.as_bytes(), 0o600)?;
            write_file(cert_path, cert.as_bytes(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "generated a new TLS certificate");
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        let cert_pem = fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key_pem = fs::read_to_string(key_path).map_err(io(key_path))?;
        let id = Identity {
            cert_pem,
            key_pem,
            cert_path: cert_path.into(),
            key_path: key_path.into(),
        };
        id.cert_der()?;
        id.key_der()?;
        Ok(id)
    }

    pub fn cert_der(&self) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .filter_map(Result::ok)
            .collect();
        if certs.is_empty() {
            return Err(IdentityError::BadPem {
                path: self.cert_path.clone(),
                what: "certificate",
            });
        }
        Ok(certs)
    }

    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, IdentityError> {
        match rustls_pemfile::private_key(&mut self.key_pem.as_bytes()) {
            Ok(Some(k)) => Ok(k),
            _ => Err(IdentityError::BadPem {
                path: self.key_path.clone(),
                what: "private key",
            }),
        }
    }

    /// SHA-256 fingerprint (lowercase hex) of the leaf certificate.
    pub fn fingerprint(&self) -> Result<String, IdentityError> {
        Ok(fingerprint(&self.cert_der()?[0]))
    }
}

/// SHA-256 of a DER certificate, lowercase hex, as Incus prints fingerprints.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn generate(common_name: &str, names: &[String]) -> Result<(String, String), IdentityError> {
    let mut sans: Vec<String> = names.to_vec();
    if sans.is_empty() {
        sans.push(common_name.to_string());
    }
    let mut params =
        rcgen::CertificateParams::new(sans).map_err(|e| IdentityError::Generate(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "ferry");
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Generate(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| IdentityError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write `data` to `path` atomically (temporary file, fsync, rename) with `mode`.
pub(crate) fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    // `a.crt` -> `a.crt.tmp`, so a certificate and its key never share a temporary file.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    // A stale temporary file keeps its old mode on open: set it explicitly.
    f.set_permissions(<fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(mode))
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        let a = Identity::load_or_generate(&c, &k, "m1", &["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        let b = Identity::load_or_generate(&c, &k, "m1", &[]).unwrap();
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
        assert_eq!(a.fingerprint().unwrap().len(), 64);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn garbage_pem_is_refused_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        fs::write(&c, "nope").unwrap();
        fs::write(&k, "nope").unwrap();
        let e = Identity::load_or_generate(&c, &k, "m1", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("delete it"), "{e}");
    }
}
