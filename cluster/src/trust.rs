//! Trusted client certificates: one PEM file per certificate under a directory
//! (`DIR/trust/<fingerprint>.crt`). Read on each check, so adding a file takes
//! effect for the next TLS handshake without a restart.

use std::fs;
use std::path::{Path, PathBuf};

use crate::identity::fingerprint;

#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

impl TrustStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TrustStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fingerprints of all trusted certificates.
    pub fn fingerprints(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.dir) else { return vec![] };
        let mut out = vec![];
        for entry in rd.flatten() {
            let Ok(pem) = fs::read(entry.path()) else { continue };
            for der in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                out.push(fingerprint(&der));
            }
        }
        out
    }

    pub fn is_trusted(&self, der: &[u8]) -> bool {
        let fp = fingerprint(der);
        self.fingerprints().iter().any(|f| f == &fp)
    }

    /// Add a PEM certificate; returns its fingerprint.
    pub fn add_pem(&self, pem: &str) -> std::io::Result<String> {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no PEM certificate found"))?;
        let fp = fingerprint(&der);
        fs::create_dir_all(&self.dir)?;
        fs::write(self.dir.join(format!("{fp}.crt")), pem)?;
        Ok(fp)
    }
}
