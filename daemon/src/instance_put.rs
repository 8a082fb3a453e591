//! `PUT /1.0/instances/<name>`: Incus's "replace the writable fields" call,
//! which the stock `incus config set`, `config unset` and `config edit` use
//! (GET the instance with its ETag, change the map, PUT it back with
//! `If-Match`).
//!
//! ferry keeps Incus's semantics for what it supports — the body's `config`
//! replaces the user configuration, so a key left out is unset — and refuses,
//! naming the field, what it does not: devices, profiles, ephemeral instances
//! and a new description. The keys ferry itself shows in `config`
//! (`image.alias` and the `volatile.*` keys) may come back unchanged or be
//! left out; a changed value is refused.

use std::collections::BTreeMap;

use ferry_db::InstanceRecord;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::core::ActionError;

/// The config key that shows the image an instance was launched from.
pub const IMAGE_KEY: &str = "image.alias";

/// The body of a PUT (Incus's `InstancePut`). `architecture` and `stateful`
/// are read-only and ignored, as Incus does.
#[derive(Debug, Default, serde::Deserialize)]
pub struct InstancePut {
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: Map<String, Value>,
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(default)]
    pub ephemeral: bool,
    #[serde(default)]
    pub description: Option<String>,
}

/// The `config` map clients see: the user keys, the image and the volatile keys.
fn shown_config(rec: &InstanceRecord) -> Map<String, Value> {
    let mut config: Map<String, Value> = rec
        .config
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    config.insert(IMAGE_KEY.into(), json!(rec.image));
    for (k, v) in &rec.volatile {
        config.insert(k.clone(), json!(v));
    }
    config
}

/// The writable fields as GET shows them (Incus's `InstancePut`): what a
/// client PUTs back, and what the ETag is a hash of.
pub fn writable(rec: &InstanceRecord) -> Map<String, Value> {
    let v = json!({
        "architecture": std::env::consts::ARCH,
        "config": shown_config(rec),
        "devices": {},
        "ephemeral": false,
        "profiles": [],
        "description": rec.description,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// The instance's ETag: a hash of [`writable`], so any change (a config
/// write, a move's new volatile keys) changes it.
pub fn etag(rec: &InstanceRecord) -> String {
    let digest = Sha256::digest(Value::Object(writable(rec)).to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a request's `If-Match` (quotes allowed) against the current ETag.
pub fn check_if_match(rec: &InstanceRecord, if_match: Option<&str>) -> Result<(), ActionError> {
    let Some(tag) = if_match.map(|t| t.trim().trim_matches('"')) else {
        return Ok(());
    };
    if tag.is_empty() || tag == "*" || tag == etag(rec) {
        return Ok(());
    }
    Err(ActionError::PreconditionFailed(format!(
        "Instance \"{}\" changed since it was read (ETag mismatch): read it again and redo the change",
        rec.name
    )))
}

/// The user-config changes a PUT asks for, as `patch_config` takes them (an
/// empty value unsets the key); an error for anything ferry cannot do.
pub fn changes(
    rec: &InstanceRecord,
    put: InstancePut,
) -> Result<BTreeMap<String, String>, ActionError> {
    let bad = |m: String| Err(ActionError::BadRequest(m));
    if !put.devices.is_empty() {
        let names: Vec<&str> = put.devices.keys().map(String::as_str).collect();
        return bad(format!(
            "Devices are not supported by ferry (the root disk comes from the storage pool \"{}\"): remove {names:?} from \"devices\"",
            rec.storage_pool
        ));
    }
    if !put.profiles.is_empty() {
        return bad(format!(
            "Profiles are not supported by ferry: remove {:?} from \"profiles\"",
            put.profiles
        ));
    }
    if put.ephemeral {
        return bad(
            "Ephemeral instances are not supported by ferry: set \"ephemeral\" to false".into(),
        );
    }
    if let Some(d) = put.description.as_deref() {
        if d != rec.description {
            return bad(format!(
                "Changing the description is not supported by ferry: keep {:?}",
                rec.description
            ));
        }
    }
    let mut wanted = BTreeMap::new();
    for (k, v) in put.config {
        if k == IMAGE_KEY {
            if v != rec.image {
                return bad(format!(
                    "Config key \"{IMAGE_KEY}\" is read-only (the image \"{}\" the instance was launched from): keep it or leave it out",
                    rec.image
                ));
            }
        } else if k.starts_with("volatile.") {
            if rec.volatile.get(&k) != Some(&v) {
                return bad(format!(
                    "Config key {k:?} is volatile and set by ferry: keep its value or leave it out"
                ));
            }
        } else {
            wanted.insert(k, v);
        }
    }
    let mut out: BTreeMap<String, String> = rec
        .config
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .map(|k| (k.clone(), String::new()))
        .collect();
    for (k, v) in wanted {
        if rec.config.get(&k) != Some(&v) {
            out.insert(k, v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> InstanceRecord {
        InstanceRecord {
            name: "c1".into(),
            kind: "container".into(),
            member: "m1".into(),
            status: "Running".into(),
            storage_pool: "default".into(),
            image: "busybox".into(),
            description: String::new(),
            config: [("limits.memory", "256MiB"), ("user.a", "1")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            volatile: [("volatile.cgroup".to_string(), "/x".to_string())].into(),
            created_at: String::new(),
            last_used_at: String::new(),
        }
    }

    /// What `incus config set`/`unset` send: GET's config with one key changed.
    fn put_of(
        rec: &InstanceRecord,
        edit: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> InstancePut {
        let mut config: BTreeMap<String, String> = shown_config(rec)
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
            .collect();
        edit(&mut config);
        InstancePut {
            config,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_changes_nothing() {
        let r = rec();
        assert!(changes(&r, put_of(&r, |_| {})).unwrap().is_empty());
    }

    #[test]
    fn set_change_and_unset() {
        let r = rec();
        let c = changes(
            &r,
            put_of(&r, |c| {
                c.insert("limits.cpu".into(), "0.5".into());
                c.insert("limits.memory".into(), "128MiB".into());
                c.remove("user.a");
            }),
        )
        .unwrap();
        let want: BTreeMap<String, String> = [
            ("limits.cpu", "0.5"),
            ("limits.memory", "128MiB"),
            ("user.a", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        assert_eq!(c, want);
    }

    #[test]
    fn ferry_keys_may_be_left_out_but_not_changed() {
        let r = rec();
        let c = changes(
            &r,
            put_of(&r, |c| {
                c.remove(IMAGE_KEY);
                c.remove("volatile.cgroup");
            }),
        )
        .unwrap();
        assert!(c.is_empty(), "{c:?}");
        for (k, v) in [
            (IMAGE_KEY, "alpine"),
            ("volatile.cgroup", "/y"),
            ("volatile.new", "1"),
        ] {
            let e = changes(&r, put_of(&r, |c| drop(c.insert(k.into(), v.into()))))
                .unwrap_err()
                .to_string();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        let r = rec();
        let mut p = put_of(&r, |_| {});
        p.devices.insert("eth0".into(), json!({"type": "nic"}));
        assert!(changes(&r, p).unwrap_err().to_string().contains("eth0"));
        let mut p = put_of(&r, |_| {});
        p.profiles = vec!["default".into()];
        assert!(changes(&r, p).unwrap_err().to_string().contains("Profiles"));
        let mut p = put_of(&r, |_| {});
        p.ephemeral = true;
        assert!(changes(&r, p)
            .unwrap_err()
            .to_string()
            .contains("Ephemeral"));
        let mut p = put_of(&r, |_| {});
        p.description = Some("new".into());
        assert!(changes(&r, p)
            .unwrap_err()
            .to_string()
            .contains("description"));
        let mut p = put_of(&r, |_| {});
        p.description = Some(String::new());
        assert!(changes(&r, p).unwrap().is_empty());
    }

    #[test]
    fn etag_follows_every_shown_field() {
        let r = rec();
        let t = etag(&r);
        assert_eq!(t.len(), 64);
        assert_eq!(t, etag(&rec()));
        check_if_match(&r, Some(&format!("\"{t}\""))).unwrap();
        check_if_match(&r, Some(&t)).unwrap();
        check_if_match(&r, None).unwrap();
        let mut moved = rec();
        moved.volatile.insert("volatile.cgroup".into(), "/z".into());
        assert_ne!(etag(&moved), t);
        let mut set = rec();
        set.config.insert("limits.cpu".into(), "1".into());
        assert_ne!(etag(&set), t);
        let e = check_if_match(&set, Some(&t)).unwrap_err();
        assert!(matches!(e, ActionError::PreconditionFailed(_)), "{e}");
    }
}
