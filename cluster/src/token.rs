//! Join tokens.
//!
//! `ferry cluster add NAME` on a member makes a [`JoinToken`] and prints
//! [`JoinToken::encode`]: URL-safe base64 of a small versioned JSON object.
//! The token carries everything a joiner needs to reach the cluster and to
//! recognise it: existing member addresses, the SHA-256 fingerprint of the
//! cluster certificate (the joiner pins it), a one-time secret and an expiry.
//!
//! The cluster keeps only a [`PendingJoin`] (the SHA-256 of the secret, the
//! name and the expiry); the secret itself is never stored or logged.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The token format version this code writes and reads.
pub const TOKEN_VERSION: u64 = 1;
/// Marker in every token's JSON, so that a random base64 JSON blob is not
/// mistaken for a token.
const TOKEN_KIND: &str = "ferry-cluster-join";
/// Random bytes in a secret (256 bits), hex-encoded in the token.
pub const SECRET_BYTES: usize = 32;

const ASK_AGAIN: &str = "ask for a new token with `ferry cluster add NAME` on a member";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("this is not a ferry join token (expected the single line printed by `ferry cluster add NAME`): {ASK_AGAIN}")]
    NotAToken,
    #[error("this join token has format version {found}, but this ferry reads version {TOKEN_VERSION}: run the same ferry version as the cluster, or {ASK_AGAIN}")]
    UnsupportedVersion { found: u64 },
    #[error("the join token is damaged ({0}): copy it again in full, or {ASK_AGAIN}")]
    Malformed(String),
    #[error("the join token has expired: {ASK_AGAIN}")]
    Expired,
    #[error("the join token's secret is not valid for this cluster (revoked, or made by another cluster): {ASK_AGAIN}")]
    WrongSecret,
    #[error("the join token was already used (each token joins one member, once): {ASK_AGAIN}")]
    AlreadyUsed,
}

/// What `ferry cluster add` hands to the new member.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Name the new member will have in the cluster.
    pub member_name: String,
    /// `host:port` of existing members, to try in order.
    pub addresses: Vec<String>,
    /// SHA-256 (lowercase hex) of the cluster certificate.
    pub fingerprint: String,
    /// One-time secret: >= 256 random bits, lowercase hex.
    pub secret: String,
    /// Unix seconds after which the cluster refuses the token.
    pub expires_at: i64,
}

/// Never prints the secret.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("member_name", &self.member_name)
            .field("addresses", &self.addresses)
            .field("fingerprint", &self.fingerprint)
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The JSON on the wire: the token plus its kind and version.
#[derive(Serialize, Deserialize)]
struct Wire {
    kind: String,
    version: u64,
    #[serde(flatten)]
    token: JoinToken,
}

impl JoinToken {
    /// A new token with a fresh random secret, valid for `ttl` from now.
    pub fn new(
        member_name: impl Into<String>,
        addresses: Vec<String>,
        fingerprint: impl Into<String>,
        ttl: Duration,
    ) -> JoinToken {
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        JoinToken {
            member_name: member_name.into(),
            addresses,
            fingerprint: normalize_fingerprint(&fingerprint.into()),
            secret: new_secret(),
            expires_at: now_unix().saturating_add(ttl),
        }
    }

    /// The printable token: URL-safe base64 (no padding) of versioned JSON.
    pub fn encode(&self) -> String {
        let wire = Wire {
            kind: TOKEN_KIND.into(),
            version: TOKEN_VERSION,
            token: self.clone(),
        };
        let json = serde_json::to_vec(&wire).expect("a JoinToken always serializes");
        URL_SAFE_NO_PAD.encode(json)
    }

    /// Parse and validate a printed token. Checks its shape and version, not
    /// its expiry (see [`JoinToken::check_expiry`]) nor its secret (only the
    /// cluster can, see [`PendingJoin::check`]).
    pub fn decode(text: &str) -> Result<JoinToken, TokenError> {
        // Tolerate copy-paste damage that carries no information: whitespace,
        // line breaks, padding, and the standard base64 alphabet.
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        if cleaned.is_empty() {
            return Err(TokenError::NotAToken);
        }
        let json = URL_SAFE_NO_PAD
            .decode(cleaned.as_bytes())
            .map_err(|_| TokenError::NotAToken)?;
        let value: serde_json::Value =
            serde_json::from_slice(&json).map_err(|_| TokenError::NotAToken)?;
        if value.get("kind").and_then(|k| k.as_str()) != Some(TOKEN_KIND) {
            return Err(TokenError::NotAToken);
        }
        match value.get("version").map(|v| v.as_u64()) {
            Some(Some(TOKEN_VERSION)) => {}
            Some(Some(found)) => return Err(TokenError::UnsupportedVersion { found }),
            Some(None) => return Err(TokenError::Malformed("version is not a number".into())),
            None => return Err(TokenError::Malformed("no version".into())),
        }
        let wire: Wire =
            serde_json::from_value(value).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let mut token = wire.token;
        token.fingerprint = normalize_fingerprint(&token.fingerprint);
        token.validate()?;
        Ok(token)
    }

    fn validate(&self) -> Result<(), TokenError> {
        let bad = |m: String| Err(TokenError::Malformed(m));
        if self.member_name.is_empty()
            || self
                .member_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            return bad(format!(
                "member name {:?} is not a valid name",
                self.member_name
            ));
        }
        if self.addresses.is_empty() {
            return bad("no member address".into());
        }
        for a in &self.addresses {
            if !valid_host_port(a) {
                return bad(format!("address {a:?} is not host:port"));
            }
        }
        if self.fingerprint.len() != 64 || !is_lower_hex(&self.fingerprint) {
            return bad("the certificate fingerprint is not 64 hex digits".into());
        }
        if self.secret.len() < SECRET_BYTES * 2 || !is_lower_hex(&self.secret) {
            return bad(format!(
                "the secret is not at least {} hex digits",
                SECRET_BYTES * 2
            ));
        }
        Ok(())
    }

    /// `Err(Expired)` if the token's expiry is at or before `now` (unix seconds).
    pub fn check_expiry(&self, now: i64) -> Result<(), TokenError> {
        if now >= self.expires_at {
            Err(TokenError::Expired)
        } else {
            Ok(())
        }
    }

    /// [`JoinToken::check_expiry`] against the current time.
    pub fn is_expired(&self) -> bool {
        self.check_expiry(now_unix()).is_err()
    }
}

/// What the cluster keeps for an issued token (e.g. in the replicated DB):
/// the SHA-256 of the secret, never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingJoin {
    pub member_name: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    pub expires_at: i64,
    pub used: bool,
}

impl PendingJoin {
    pub fn from_token(token: &JoinToken) -> PendingJoin {
        PendingJoin {
            member_name: token.member_name.clone(),
            secret_sha256: secret_digest(&token.secret),
            expires_at: token.expires_at,
            used: false,
        }
    }

    /// Server-side check of a join attempt at `now` (unix seconds). The secret
    /// is checked first, in constant time, so that a caller without the secret
    /// learns nothing about the token's state. The caller marks the record
    /// used (in the same committed write that admits the member).
    pub fn check(&self, given_secret: &str, now: i64) -> Result<(), TokenError> {
        if !digest_matches(&self.secret_sha256, given_secret) {
            return Err(TokenError::WrongSecret);
        }
        if self.used {
            return Err(TokenError::AlreadyUsed);
        }
        if now >= self.expires_at {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// Constant-time comparison of two secrets: compares their SHA-256 digests,
/// so neither the content nor the length of `expected` leaks through timing.
pub fn secret_matches(expected: &str, given: &str) -> bool {
    ct_eq(
        &Sha256::digest(expected.as_bytes()),
        &Sha256::digest(given.as_bytes()),
    )
}

/// SHA-256 of a secret, lowercase hex (what [`PendingJoin`] stores).
pub fn secret_digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Constant-time check of `given` against a stored [`secret_digest`].
pub fn digest_matches(stored_sha256_hex: &str, given: &str) -> bool {
    ct_eq(
        stored_sha256_hex.as_bytes(),
        secret_digest(given).as_bytes(),
    )
}

/// Byte equality without early exit. Lengths are compared openly; callers
/// pass fixed-length digests.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn new_secret() -> String {
    let mut buf = [0u8; SECRET_BYTES];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut buf)
        .expect("the operating system's random number generator failed");
    hex(&buf)
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Lowercase, without `:` separators (accepts `AB:CD:...` as printed by openssl).
pub fn normalize_fingerprint(fp: &str) -> String {
    fp.trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

fn valid_host_port(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty() && !host.contains(['[', ']', ':', '/', ' '])
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken::new(
            "m2",
            vec!["127.0.0.1:8443".into(), "[::1]:8443".into()],
            "AB".repeat(32),
            Duration::from_secs(600),
        )
    }

    fn raw(json: serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json).unwrap())
    }

    #[test]
    fn round_trip() {
        let t = token();
        assert_eq!(
            t.fingerprint,
            "ab".repeat(32),
            "fingerprint normalized to lowercase"
        );
        assert_eq!(t.secret.len(), 64);
        let enc = t.encode();
        assert!(
            enc.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{enc}"
        );
        assert_eq!(JoinToken::decode(&enc).unwrap(), t);
        // Line-wrapped copy-paste and the standard alphabet still decode.
        let wrapped = format!("  {}\n{}  \n", &enc[..20], &enc[20..]);
        assert_eq!(JoinToken::decode(&wrapped).unwrap(), t);
        let std_b64 =
            base64::engine::general_purpose::STANDARD.encode(URL_SAFE_NO_PAD.decode(&enc).unwrap());
        assert_eq!(JoinToken::decode(&std_b64).unwrap(), t);
        // The JSON says what it is and which version.
        let json: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&enc).unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["kind"], TOKEN_KIND);
    }

    #[test]
    fn secrets_are_fresh_and_redacted() {
        let (a, b) = (token(), token());
        assert_ne!(a.secret, b.secret);
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn garbage_is_not_a_token() {
        for g in [
            "",
            "   ",
            "hello world!",
            "%%%%",
            &URL_SAFE_NO_PAD.encode(b"not json"),
            &raw(serde_json::json!({"a": 1})),
            &raw(serde_json::json!([1, 2])),
        ] {
            let e = JoinToken::decode(g).unwrap_err();
            assert_eq!(e, TokenError::NotAToken, "{g:?}");
            assert!(e.to_string().contains("ferry cluster add"), "{e}");
        }
    }

    #[test]
    fn other_version_is_named() {
        let mut v = serde_json::to_value(token()).unwrap();
        v["kind"] = TOKEN_KIND.into();
        v["version"] = 2.into();
        let e = JoinToken::decode(&raw(v.clone())).unwrap_err();
        assert_eq!(e, TokenError::UnsupportedVersion { found: 2 });
        assert!(e.to_string().contains("version 2"), "{e}");
        v.as_object_mut().unwrap().remove("version");
        assert!(matches!(
            JoinToken::decode(&raw(v)).unwrap_err(),
            TokenError::Malformed(_)
        ));
    }

    #[test]
    fn malformed_fields_are_named() {
        let cases: [(&str, serde_json::Value, &str); 6] = [
            ("secret", "abcd".into(), "secret"),
            ("secret", "zz".repeat(32).into(), "secret"),
            ("fingerprint", "1234".into(), "fingerprint"),
            ("addresses", serde_json::json!([]), "no member address"),
            ("addresses", serde_json::json!(["nohostport"]), "host:port"),
            ("member_name", "a b".into(), "member name"),
        ];
        for (field, val, want) in cases {
            let mut v = serde_json::to_value(token()).unwrap();
            v["kind"] = TOKEN_KIND.into();
            v["version"] = 1.into();
            v[field] = val;
            let e = JoinToken::decode(&raw(v)).unwrap_err();
            assert!(
                matches!(&e, TokenError::Malformed(m) if m.contains(want)),
                "{field}: {e}"
            );
        }
        let mut v = serde_json::to_value(token()).unwrap();
        v["kind"] = TOKEN_KIND.into();
        v["version"] = 1.into();
        v.as_object_mut().unwrap().remove("secret");
        let e = JoinToken::decode(&raw(v)).unwrap_err();
        assert!(
            matches!(&e, TokenError::Malformed(m) if m.contains("secret")),
            "{e}"
        );
    }

    #[test]
    fn expiry() {
        let t = token();
        assert!(!t.is_expired());
        assert_eq!(t.check_expiry(t.expires_at - 1), Ok(()));
        assert_eq!(t.check_expiry(t.expires_at), Err(TokenError::Expired));
        let old = JoinToken::new("m2", vec!["h:1".into()], "ab".repeat(32), Duration::ZERO);
        assert!(old.is_expired());
        // Expired tokens still decode (the joiner gets the clear Expired error from check_expiry).
        let back = JoinToken::decode(&old.encode()).unwrap();
        let e = back.check_expiry(now_unix()).unwrap_err();
        assert!(
            e.to_string().contains("expired") && e.to_string().contains("ferry cluster add"),
            "{e}"
        );
    }

    #[test]
    fn constant_time_secret_check() {
        let t = token();
        assert!(secret_matches(&t.secret, &t.secret));
        assert!(!secret_matches(&t.secret, &t.secret[..63]));
        assert!(!secret_matches(&t.secret, ""));
        let mut flipped = t.secret.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        assert!(!secret_matches(
            &t.secret,
            std::str::from_utf8(&flipped).unwrap()
        ));
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }

    #[test]
    fn pending_join_checks_secret_then_use_then_expiry() {
        let t = token();
        let mut p = PendingJoin::from_token(&t);
        assert!(!p.secret_sha256.contains(&t.secret));
        assert_eq!(p.check(&t.secret, t.expires_at - 1), Ok(()));
        assert_eq!(
            p.check("00".repeat(32).as_str(), t.expires_at - 1),
            Err(TokenError::WrongSecret)
        );
        assert_eq!(p.check(&t.secret, t.expires_at), Err(TokenError::Expired));
        // A wrong secret says nothing about expiry or use.
        assert_eq!(
            p.check("nope", t.expires_at + 100),
            Err(TokenError::WrongSecret)
        );
        p.used = true;
        let e = p.check(&t.secret, t.expires_at - 1).unwrap_err();
        assert_eq!(e, TokenError::AlreadyUsed);
        assert!(e.to_string().contains("already used"), "{e}");
    }

    #[test]
    fn host_port_validation() {
        for ok in ["127.0.0.1:8443", "[::1]:1", "m1.example:65535", "host:80"] {
            assert!(valid_host_port(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            ":80",
            "host:0",
            "host:99999",
            "::1:80",
            "[zz]:80",
            "a b:80",
        ] {
            assert!(!valid_host_port(bad), "{bad}");
        }
    }
}
