//! `/1.0/certificates`: trusted client certificates (replicated in a cluster).

use axum::body::Bytes;
use axum::extract::{Path, State as St};
use axum::response::Response;
use ferry_db::Command;
use serde_json::{json, Value};

use super::{parse_body, sync, State};
use crate::core::{now_rfc3339, ActionError};

#[derive(serde::Deserialize)]
struct AddCert {
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    /// PEM, or base64 DER as Incus clients send it.
    certificate: String,
}

fn parse_cert(text: &str) -> Result<Vec<u8>, ActionError> {
    let bad = || {
        ActionError::BadRequest(
            "\"certificate\" is not a PEM or base64 DER X.509 certificate".into(),
        )
    };
    if text.contains("-----BEGIN") {
        let der = rustls_pemfile::certs(&mut text.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(bad)?;
        return Ok(der.to_vec());
    }
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| bad())?;
    // Must at least be a DER SEQUENCE.
    if der.first() != Some(&0x30) {
        return Err(bad());
    }
    Ok(der)
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        body.join("\n")
    )
}

pub async fn add(St(d): State, body: Bytes) -> Result<Response, ActionError> {
    let req: AddCert = parse_body(&body)?;
    if !matches!(req.kind.as_str(), "" | "client") {
        return Err(ActionError::BadRequest(format!(
            "Unsupported certificate type {:?}: use \"client\"",
            req.kind
        )));
    }
    let der = parse_cert(&req.certificate)?;
    let fingerprint = ferry_cluster::identity::fingerprint(&der);
    let name = if req.name.is_empty() {
        fingerprint[..12].to_string()
    } else {
        req.name
    };
    d.submit(Command::AddCertificate {
        fingerprint: fingerprint.clone(),
        name,
        kind: "client".into(),
        certificate: to_pem(&der),
        created_at: now_rfc3339(),
    })
    .await?;
    Ok(sync(json!({"fingerprint": fingerprint})))
}

pub async fn list(St(d): State) -> Result<Response, ActionError> {
    let certs: Vec<Value> = d
        .db()
        .list_certificates()?
        .into_iter()
        .map(|c| json!({"fingerprint": c.fingerprint, "name": c.name, "type": c.kind, "certificate": c.certificate, "restricted": false, "projects": []}))
        .collect();
    Ok(sync(Value::Array(certs)))
}

pub async fn remove(St(d): State, Path(fp): Path<String>) -> Result<Response, ActionError> {
    let fp = fp.to_ascii_lowercase();
    let matches: Vec<String> = d
        .db()
        .list_certificates()?
        .into_iter()
        .map(|c| c.fingerprint)
        .filter(|f| f.starts_with(&fp))
        .collect();
    let full = match matches.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(ActionError::NotFound(format!(
                "certificate {fp} not found (see `ferry config trust list`)"
            )))
        }
        _ => {
            return Err(ActionError::BadRequest(format!(
                "certificate prefix {fp} is ambiguous: give more digits"
            )))
        }
    };
    d.submit(Command::RemoveCertificate { fingerprint: full })
        .await?;
    Ok(sync(json!({})))
}
