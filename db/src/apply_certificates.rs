//! Applying the certificate commands: trusting and removing client certificates.
//!
//! Same rules as `apply.rs` and `apply_members.rs`: validate everything before the
//! first write, read nothing but the database, and refuse bad input with a rejection
//! (`NotFound`, `AlreadyExists`, `Conflict`), never with a SQLite error. The PEM is
//! stored as given: the daemon parsed it and computed the fingerprint.

use rusqlite::{params, Connection, OptionalExtension};

use crate::apply_members::is_sha256_hex;
use crate::{Command, DbError, CERTIFICATE_CLIENT};

pub(crate) fn command(conn: &Connection, cmd: &Command) -> Result<(), DbError> {
    match cmd {
        Command::AddCertificate {
            fingerprint,
            name,
            kind,
            certificate,
            created_at,
        } => {
            if !is_sha256_hex(fingerprint) {
                return Err(DbError::Conflict(
                    "the certificate fingerprint is not a SHA-256 in lowercase hex (64 digits)"
                        .into(),
                ));
            }
            if kind != CERTIFICATE_CLIENT {
                return Err(DbError::Conflict(format!(
                    "unknown certificate type \"{kind}\" (expected \"{CERTIFICATE_CLIENT}\")"
                )));
            }
            if exists(conn, fingerprint)? {
                return Err(DbError::AlreadyExists {
                    what: "certificate",
                    name: fingerprint.clone(),
                });
            }
            conn.execute(
                "INSERT INTO certificates (fingerprint, name, type, certificate, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![fingerprint, name, kind, certificate, created_at],
            )?;
            Ok(())
        }
        Command::RemoveCertificate { fingerprint } => {
            if !exists(conn, fingerprint)? {
                return Err(DbError::NotFound {
                    what: "certificate",
                    name: fingerprint.clone(),
                });
            }
            conn.execute(
                "DELETE FROM certificates WHERE fingerprint = ?1",
                [fingerprint],
            )?;
            Ok(())
        }
        other => unreachable!("not a certificate command: {}", other.op()),
    }
}

fn exists(conn: &Connection, fingerprint: &str) -> Result<bool, DbError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM certificates WHERE fingerprint = ?1",
            [fingerprint],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateRecord, Db};

    fn fp(c: char) -> String {
        c.to_string().repeat(64)
    }

    fn pem(c: char) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{c}\n-----END CERTIFICATE-----\n")
    }

    fn add(name: &str, c: char) -> Command {
        Command::AddCertificate {
            fingerprint: fp(c),
            name: name.into(),
            kind: "client".into(),
            certificate: pem(c),
            created_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn record(name: &str, c: char) -> CertificateRecord {
        CertificateRecord {
            fingerprint: fp(c),
            name: name.into(),
            kind: "client".into(),
            certificate: pem(c),
            created_at: "2025-01-01T00:00:00Z".into(),
        }
    }

    fn remove(c: char) -> Command {
        Command::RemoveCertificate { fingerprint: fp(c) }
    }

    /// `cmd` (an `AddCertificate`) with (fingerprint, name, kind, certificate, created_at)
    /// changed by `f`.
    fn with_add(
        mut cmd: Command,
        f: impl FnOnce(&mut String, &mut String, &mut String, &mut String, &mut String),
    ) -> Command {
        if let Command::AddCertificate {
            fingerprint,
            name,
            kind,
            certificate,
            created_at,
        } = &mut cmd
        {
            f(fingerprint, name, kind, certificate, created_at);
        }
        cmd
    }

    /// "bob" (fingerprint b…) and "alice" (a…) trusted.
    fn trusted() -> Db {
        let db = Db::open_in_memory().unwrap();
        for cmd in [add("bob", 'b'), add("alice", 'a')] {
            db.apply(&cmd).unwrap();
        }
        db
    }

    #[test]
    fn add_reads_and_remove() {
        let db = Db::open_in_memory().unwrap();
        assert_eq!(db.list_certificates().unwrap(), vec![]);
        assert!(!db.is_trusted_fingerprint(&fp('a')).unwrap());
        // Names need not be unique: listed by name, then fingerprint.
        for cmd in [add("bob", 'b'), add("alice", 'c'), add("alice", 'a')] {
            db.apply(&cmd).unwrap();
        }
        assert_eq!(
            db.list_certificates().unwrap(),
            vec![
                record("alice", 'a'),
                record("alice", 'c'),
                record("bob", 'b')
            ]
        );
        assert_eq!(
            db.get_certificate(&fp('b')).unwrap(),
            Some(record("bob", 'b'))
        );
        assert_eq!(db.get_certificate(&fp('d')).unwrap(), None);
        for c in ['a', 'b', 'c'] {
            assert!(db.is_trusted_fingerprint(&fp(c)).unwrap(), "{c}");
        }
        // Not trusted: unknown, upper case, a prefix, garbage.
        for other in [fp('d'), fp('A'), "a".repeat(63), String::new(), "x".into()] {
            assert!(!db.is_trusted_fingerprint(&other).unwrap(), "{other:?}");
        }

        db.apply(&remove('b')).unwrap();
        assert!(!db.is_trusted_fingerprint(&fp('b')).unwrap());
        assert_eq!(db.get_certificate(&fp('b')).unwrap(), None);
        // The same certificate can be trusted again.
        db.apply(&add("bob", 'b')).unwrap();
        assert!(db.is_trusted_fingerprint(&fp('b')).unwrap());
    }

    #[test]
    fn record_json_uses_type() {
        let json = serde_json::to_string(&record("alice", 'a')).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"fingerprint":"{}","name":"alice","type":"client","certificate":"-----BEGIN CERTIFICATE-----\na\n-----END CERTIFICATE-----\n","created_at":"2025-01-01T00:00:00Z"}}"#,
                fp('a')
            )
        );
        let back: CertificateRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record("alice", 'a'));
    }

    #[test]
    fn refusals_change_nothing() {
        let db = trusted();
        let before = (
            db.checksum().unwrap(),
            db.applied_index().unwrap(),
            db.list_certificates().unwrap(),
        );
        let shape = "the certificate fingerprint is not a SHA-256 in lowercase hex (64 digits)";
        let cases: Vec<(Command, String)> = vec![
            (
                with_add(add("carol", 'a'), |_, _, _, pem, _| *pem = "other".into()),
                format!("certificate \"{}\" already exists", fp('a')),
            ),
            (
                with_add(add("carol", 'c'), |fp, _, _, _, _| *fp = "C".repeat(64)),
                shape.into(),
            ),
            (
                with_add(add("carol", 'c'), |fp, _, _, _, _| *fp = "c".repeat(40)),
                shape.into(),
            ),
            (
                with_add(add("carol", 'c'), |fp, _, _, _, _| {
                    *fp = format!("{}:", "c".repeat(63))
                }),
                shape.into(),
            ),
            (
                with_add(add("carol", 'c'), |_, _, kind, _, _| {
                    *kind = "server".into()
                }),
                "unknown certificate type \"server\" (expected \"client\")".into(),
            ),
            // Shape is checked before existence.
            (
                with_add(add("carol", 'a'), |_, _, kind, _, _| {
                    *kind = "metrics".into()
                }),
                "unknown certificate type \"metrics\" (expected \"client\")".into(),
            ),
            (
                remove('c'),
                format!("certificate \"{}\" not found", fp('c')),
            ),
        ];
        for (cmd, expected) in &cases {
            let err = db.apply(cmd).unwrap_err();
            assert_eq!(err.to_string(), *expected, "{cmd:?}");
            assert!(err.is_rejection(), "{err}");
            let after = (
                db.checksum().unwrap(),
                db.applied_index().unwrap(),
                db.list_certificates().unwrap(),
            );
            assert_eq!(after, before, "{cmd:?}");
        }
    }

    #[test]
    fn checksum_covers_certificates() {
        let base = trusted();
        let sum = base.checksum().unwrap();
        assert_ne!(sum, Db::open_in_memory().unwrap().checksum().unwrap());
        // Same contents in another order -> same checksum.
        let other = Db::open_in_memory().unwrap();
        for cmd in [
            add("alice", 'a'),
            add("x", 'c'),
            add("bob", 'b'),
            remove('c'),
        ] {
            other.apply(&cmd).unwrap();
        }
        assert_eq!(other.checksum().unwrap(), sum);

        // Every column counts.
        let alice = add("alice", 'a');
        let changes = [
            vec![alice.clone(), add("carol", 'c')],
            vec![alice.clone(), remove('a')],
            vec![with_add(alice.clone(), |fp, _, _, _, _| {
                *fp = "ab".repeat(32)
            })],
            vec![with_add(alice.clone(), |_, name, _, _, _| {
                *name = "alicia".into()
            })],
            vec![with_add(alice.clone(), |_, _, _, pem, _| pem.push(' '))],
            vec![with_add(alice.clone(), |_, _, _, _, at| {
                *at = "2025-01-02T00:00:00Z".into()
            })],
        ];
        for cmds in changes {
            let db = Db::open_in_memory().unwrap();
            db.apply(&add("bob", 'b')).unwrap();
            for cmd in &cmds {
                db.apply(cmd).unwrap();
            }
            assert_ne!(db.checksum().unwrap(), sum, "{cmds:?}");
        }
        // A value moving between fields must not collide.
        let split = |name: &str, pem: &str| {
            let db = Db::open_in_memory().unwrap();
            db.apply(&with_add(add(name, 'a'), |_, _, _, p, _| *p = pem.into()))
                .unwrap();
            db.checksum().unwrap()
        };
        assert_ne!(split("ab", "c"), split("a", "bc"));
    }
}
