//! Trusted client certificates (Incus's `/1.0/certificates`): reads, and their part of
//! the state checksum. (Applying the certificate commands is in `apply_certificates.rs`.)
//!
//! The database never parses a certificate: the daemon parses the PEM and computes the
//! fingerprint (SHA-256 of the DER, lowercase hex) before it submits `AddCertificate`.

use rusqlite::{Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::apply_members::is_sha256_hex;
use crate::{Db, DbError};

/// Certificate type: a client allowed to use the API. The only type so far.
pub const CERTIFICATE_CLIENT: &str = "client";

/// One trusted certificate, as stored in the database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRecord {
    /// SHA-256 of the certificate's DER, lowercase hex (64 digits). Unique.
    pub fingerprint: String,
    /// Not necessarily unique.
    pub name: String,
    /// "client".
    #[serde(rename = "type")]
    pub kind: String,
    /// PEM.
    pub certificate: String,
    /// RFC 3339.
    pub created_at: String,
}

const CERTIFICATE_SELECT: &str =
    "SELECT fingerprint, name, type, certificate, created_at FROM certificates";

fn certificate_row(r: &Row<'_>) -> rusqlite::Result<CertificateRecord> {
    Ok(CertificateRecord {
        fingerprint: r.get(0)?,
        name: r.get(1)?,
        kind: r.get(2)?,
        certificate: r.get(3)?,
        created_at: r.get(4)?,
    })
}

impl Db {
    /// All trusted certificates, sorted by name, then fingerprint (byte order).
    pub fn list_certificates(&self) -> Result<Vec<CertificateRecord>, DbError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached(&format!("{CERTIFICATE_SELECT} ORDER BY name, fingerprint"))?;
        let rows = stmt
            .query_map([], certificate_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The certificate with this exact fingerprint (lowercase hex).
    pub fn get_certificate(&self, fingerprint: &str) -> Result<Option<CertificateRecord>, DbError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached(&format!("{CERTIFICATE_SELECT} WHERE fingerprint = ?1"))?;
        Ok(stmt.query_row([fingerprint], certificate_row).optional()?)
    }

    /// Whether a client presenting a certificate with this fingerprint (SHA-256 of its
    /// DER, lowercase hex) is trusted. Meant for every TLS handshake: one primary-key
    /// lookup through a cached statement, and no database access at all for a string
    /// that is not a lowercase SHA-256 hex digest (no stored fingerprint can match it).
    pub fn is_trusted_fingerprint(&self, fingerprint: &str) -> Result<bool, DbError> {
        if !is_sha256_hex(fingerprint) {
            return Ok(false);
        }
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM certificates WHERE fingerprint = ?1)")?;
        Ok(stmt.query_row([fingerprint], |r| r.get(0))?)
    }
}

/// Feeds the certificates, in canonical order (by fingerprint, which is unique), to the
/// checksum's `field` (length-prefixed fields), preceded by their count.
pub(crate) fn checksum_fields(
    conn: &Connection,
    field: &mut dyn FnMut(&[u8]),
) -> Result<(), DbError> {
    let mut stmt = conn.prepare_cached(&format!("{CERTIFICATE_SELECT} ORDER BY fingerprint"))?;
    let certificates = stmt
        .query_map([], certificate_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    field(&(certificates.len() as u64).to_le_bytes());
    for c in &certificates {
        for s in [
            &c.fingerprint,
            &c.name,
            &c.kind,
            &c.certificate,
            &c.created_at,
        ] {
            field(s.as_bytes());
        }
    }
    Ok(())
}
