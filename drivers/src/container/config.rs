//! Validation of a container's image, name and config. Pure: touches no disk.

use std::collections::BTreeMap;

use super::image::IMAGE;
use crate::{DriverError, InstanceSpec, InstanceType};

/// Keys a container accepts besides the namespaced prefixes below.
pub const KEYS: &[&str] = &["limits.memory", "limits.cpu", "cluster.evacuate"];
/// Free-form namespaces.
pub const PREFIXES: &[&str] = &["user.", "volatile.", "image.", "migration."];

/// The image, defaulting to `busybox` when empty.
pub fn image_of(spec: &InstanceSpec) -> &str {
    if spec.image.is_empty() {
        IMAGE
    } else {
        &spec.image
    }
}

/// Instance names become host names and cgroup directory names: RFC 1123
/// labels only (letters, digits, `-`, 1–63 characters, no leading/trailing `-`).
pub fn validate_name(name: &str) -> Result<(), DriverError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(DriverError::InvalidConfig(format!(
            "container name {name:?} must be 1-63 letters, digits or '-' (not at either end)"
        )))
    }
}

pub fn validate_config(config: &BTreeMap<String, String>) -> Result<(), DriverError> {
    for (k, v) in config {
        if !(KEYS.contains(&k.as_str()) || PREFIXES.iter().any(|p| k.starts_with(p))) {
            return Err(DriverError::InvalidConfig(format!(
                "unknown container config key {k:?}; valid keys: {}, {}*",
                KEYS.join(", "),
                PREFIXES.join("*, ")
            )));
        }
        match k.as_str() {
            "limits.memory" => {
                memory_limit_value(v)?;
            }
            "limits.cpu" => {
                let ok = v
                    .trim()
                    .parse::<f64>()
                    .map(|n| n.is_finite() && n > 0.0)
                    .unwrap_or(false);
                if !ok {
                    return Err(DriverError::InvalidConfig(format!(
                        "limits.cpu {v:?} is not a positive number of CPUs (e.g. \"1\" or \"0.5\")"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn memory_limit_value(v: &str) -> Result<u64, DriverError> {
    match crate::parse_size(v) {
        Some(n) if n >= 4 << 20 => Ok(n),
        Some(_) => Err(DriverError::InvalidConfig(format!(
            "limits.memory {v:?} is below the 4MiB minimum"
        ))),
        None => Err(DriverError::InvalidConfig(format!(
            "limits.memory {v:?} is not a size (e.g. \"256MiB\", \"1GiB\")"
        ))),
    }
}

/// The CPU limit as a CFS quota in µs per [`super::cgroup::CPU_PERIOD_US`],
/// if configured (assumes a validated config): `limits.cpu` CPUs' worth of
/// time, at least 1 ms (the kernel's minimum quota).
pub fn cpu_quota_us(config: &BTreeMap<String, String>) -> Option<u64> {
    let n: f64 = config.get("limits.cpu")?.trim().parse().ok()?;
    let quota = (n * super::cgroup::CPU_PERIOD_US as f64).round() as u64;
    Some(quota.max(1000))
}

/// The memory limit in bytes, if configured (assumes a validated config).
pub fn memory_limit(config: &BTreeMap<String, String>) -> Option<u64> {
    config
        .get("limits.memory")
        .and_then(|v| memory_limit_value(v).ok())
}

pub fn validate(spec: &InstanceSpec) -> Result<(), DriverError> {
    if spec.kind != InstanceType::Container {
        return Err(DriverError::InvalidConfig(format!(
            "the container driver cannot run a {} instance",
            spec.kind.as_str()
        )));
    }
    let image = image_of(spec);
    if image != IMAGE {
        return Err(DriverError::InvalidConfig(format!(
            "unknown container image {image:?}; the only container image is {IMAGE:?}"
        )));
    }
    validate_name(&spec.name)?;
    validate_config(&spec.config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InstancePaths;

    fn spec(image: &str, cfg: &[(&str, &str)]) -> InstanceSpec {
        InstanceSpec {
            name: "c1".into(),
            kind: InstanceType::Container,
            image: image.into(),
            config: cfg
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volatile: BTreeMap::new(),
            paths: InstancePaths {
                volume: "/v".into(),
                run: "/r".into(),
                logs: "/l".into(),
                images: "/i".into(),
            },
        }
    }

    fn invalid(r: Result<(), DriverError>) -> String {
        match r {
            Err(DriverError::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn image_must_be_busybox() {
        assert!(validate(&spec("busybox", &[])).is_ok());
        assert!(validate(&spec("", &[])).is_ok());
        let m = invalid(validate(&spec("alpine", &[])));
        assert!(m.contains("\"busybox\""), "{m}");
        let mut vm = spec("busybox", &[]);
        vm.kind = InstanceType::VirtualMachine;
        invalid(validate(&vm));
    }

    #[test]
    fn config_keys() {
        let ok = [
            ("limits.memory", "256MiB"),
            ("limits.cpu", "2"),
            ("user.note", "x"),
            ("volatile.last_state.power", "RUNNING"),
            ("image.os", "busybox"),
            ("migration.stateful", "true"),
        ];
        assert!(validate(&spec("busybox", &ok)).is_ok());
        let m = invalid(validate(&spec("busybox", &[("limits.disk", "1GiB")])));
        assert!(
            m.contains("limits.disk") && m.contains("limits.memory"),
            "{m}"
        );
        invalid(validate(&spec("busybox", &[("boot.autostart", "true")])));
        invalid(validate(&spec("busybox", &[("limits.memory", "lots")])));
        invalid(validate(&spec("busybox", &[("limits.memory", "1KiB")])));
        invalid(validate(&spec("busybox", &[("limits.cpu", "-1")])));
        let cfg: BTreeMap<String, String> =
            [("limits.memory".to_string(), "256MiB".to_string())].into();
        assert_eq!(memory_limit(&cfg), Some(256 << 20));
        assert_eq!(memory_limit(&BTreeMap::new()), None);
        let cpu = |v: &str| cpu_quota_us(&[("limits.cpu".to_string(), v.to_string())].into());
        assert_eq!(cpu("2"), Some(200_000));
        assert_eq!(cpu("0.5"), Some(50_000));
        assert_eq!(cpu("0.001"), Some(1000), "the kernel's minimum quota");
        assert_eq!(cpu_quota_us(&BTreeMap::new()), None);
    }

    #[test]
    fn names() {
        for ok in ["c1", "web-01", "A"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "x-", "a/b", "..", "a b", &"x".repeat(64)] {
            invalid(validate_name(bad));
        }
    }
}
