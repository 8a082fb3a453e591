//! Trusted client certificates, from two sources checked at each TLS
//! handshake (so a change takes effect without a restart):
//! - the replicated DB's `certificates` table (`ferry config trust add`, the
//!   same on every member of a cluster);
//! - a member-local directory, one PEM file per certificate
//!   (`DIR/trust/<fingerprint>.crt`), for bootstrapping by hand.

use std::fs;
use std::path::{Path, PathBuf};

use crate::identity::fingerprint;

#[derive(Clone)]
pub struct TrustStore {
    dir: PathBuf,
    db: Option<std::sync::Arc<ferry_db::Db>>,
}

impl std::fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustStore")
            .field("dir", &self.dir)
            .field("db", &self.db.is_some())
            .finish()
    }
}

impl TrustStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TrustStore {
            dir: dir.into(),
            db: None,
        }
    }

    /// Also trust the certificates recorded in `db`.
    pub fn with_db(mut self, db: std::sync::Arc<ferry_db::Db>) -> Self {
        self.db = Some(db);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fingerprints of all trusted certificates.
    pub fn fingerprints(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out = vec![];
        for entry in rd.flatten() {
            let Ok(pem) = fs::read(entry.path()) else {
                continue;
            };
            for der in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                out.push(fingerprint(&der));
            }
        }
        out
    }

    pub fn is_trusted(&self, der: &[u8]) -> bool {
        let fp = fingerprint(der);
        if let Some(db) = &self.db {
            if db.is_trusted_fingerprint(&fp).unwrap_or(false) {
                return true;
            }
        }
        self.fingerprints().iter().any(|f| f == &fp)
    }

    /// Add a PEM certificate; returns its fingerprint.
    pub fn add_pem(&self, pem: &str) -> std::io::Result<String> {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "no PEM certificate found")
            })?;
        let fp = fingerprint(&der);
        fs::create_dir_all(&self.dir)?;
        fs::write(self.dir.join(format!("{fp}.crt")), pem)?;
        Ok(fp)
    }
}
