//! VM config: parsing and validation of the keys the VM driver understands.

use crate::{parse_size, DriverError, InstanceSpec};

/// The only VM image ferry ships.
pub const TESTVM_IMAGE: &str = "testvm";

const MIB: u64 = 1 << 20;
/// The guest's own code, stacks and page tables live in the first 2 MiB.
const MIN_DIRTY_START_MIB: u32 = 2;
const MIN_MEMORY_MIB: u64 = 32;
const MAX_MEMORY_MIB: u64 = 1 << 20; // 1 TiB
const MAX_CPUS: u32 = 255;

/// Parsed VM configuration (defaults applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in MiB (`limits.memory`, default 256MiB).
    pub memory_mib: u64,
    /// vCPUs (`limits.cpu`, default 1).
    pub cpus: u32,
    /// Start of the range the test guest rewrites (`testvm.dirty_start_mib`, default 4).
    pub dirty_start_mib: u32,
    /// Size of that range (`testvm.dirty_mib`, default 16).
    pub dirty_mib: u32,
    /// Console print interval (`testvm.interval_ms`, default 100).
    pub interval_ms: u32,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 256,
            cpus: 1,
            dirty_start_mib: 4,
            dirty_mib: 16,
            interval_ms: 100,
        }
    }
}

/// Key prefixes accepted besides the exact keys below.
const ALLOWED_PREFIXES: &[&str] = &["testvm.", "user.", "volatile.", "image.", "migration."];
const ALLOWED_KEYS: &[&str] = &["limits.memory", "limits.cpu", "cluster.evacuate"];

fn invalid(msg: String) -> DriverError {
    DriverError::InvalidConfig(msg)
}

fn parse_u32(key: &str, v: &str, min: u32, max: u32) -> Result<u32, DriverError> {
    match v.trim().parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid(format!(
            "{key}={v:?}: expected an integer from {min} to {max}"
        ))),
    }
}

/// Highest guest-physical address (in MiB) of RAM that is contiguous from 0 on
/// the i440FX machine: with 3.5 GiB or more, QEMU puts RAM above 3 GiB at 4 GiB.
pub fn low_ram_mib(memory_mib: u64) -> u64 {
    if memory_mib >= 3584 {
        3072
    } else {
        memory_mib
    }
}

impl VmConfig {
    /// Check the image name and parse the config; no disk access.
    pub fn from_spec(spec: &InstanceSpec) -> Result<VmConfig, DriverError> {
        if spec.image != TESTVM_IMAGE {
            return Err(invalid(format!(
                "VM image {:?} is not available: the only VM image is `{TESTVM_IMAGE}`",
                spec.image
            )));
        }
        Self::parse(spec.config.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// Parse config keys (unknown keys are refused, see [`ALLOWED_PREFIXES`]).
    pub fn parse<'a>(
        config: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<VmConfig, DriverError> {
        let mut c = VmConfig::default();
        for (key, value) in config {
            match key {
                "limits.memory" => c.memory_mib = parse_memory(value)?,
                "limits.cpu" => c.cpus = parse_u32(key, value, 1, MAX_CPUS)?,
                "testvm.dirty_mib" => c.dirty_mib = parse_u32(key, value, 0, 1 << 20)?,
                "testvm.dirty_start_mib" => c.dirty_start_mib = parse_u32(key, value, MIN_DIRTY_START_MIB, 1 << 20)?,
                "testvm.interval_ms" => c.interval_ms = parse_u32(key, value, 10, 60_000)?,
                k if ALLOWED_KEYS.contains(&k) || ALLOWED_PREFIXES.iter().any(|p| k.starts_with(p)) => {}
                k => {
                    return Err(invalid(format!(
                        "unknown config key {k:?} for a virtual machine (known: limits.memory, limits.cpu, cluster.evacuate, \
                         testvm.dirty_mib, testvm.dirty_start_mib, testvm.interval_ms, user.*)"
                    )))
                }
            }
        }
        c.check_dirty_range()?;
        Ok(c)
    }

    fn check_dirty_range(&self) -> Result<(), DriverError> {
        let end = self.dirty_start_mib as u64 + self.dirty_mib as u64;
        let low = low_ram_mib(self.memory_mib);
        if end > low {
            return Err(invalid(format!(
                "the test guest's dirty range {}..{} MiB (testvm.dirty_start_mib + testvm.dirty_mib) does not fit \
                 in the guest's {} MiB of low memory (limits.memory={} MiB): lower testvm.dirty_mib or raise limits.memory",
                self.dirty_start_mib, end, low, self.memory_mib
            )));
        }
        Ok(())
    }

    /// End of the dirty range in MiB.
    pub fn dirty_end_mib(&self) -> u64 {
        self.dirty_start_mib as u64 + self.dirty_mib as u64
    }

    /// Number of 2 MiB pages the guest must identity-map (covers the guest's
    /// own first 2 MiB and the dirty range).
    pub fn map_2m_pages(&self) -> u32 {
        (self.dirty_end_mib().div_ceil(2)).clamp(1, 2048) as u32
    }
}

fn parse_memory(v: &str) -> Result<u64, DriverError> {
    let bytes = parse_size(v).ok_or_else(|| {
        invalid(format!(
            "limits.memory={v:?}: expected a size such as 256MiB or 1GiB"
        ))
    })?;
    if bytes % MIB != 0 {
        return Err(invalid(format!(
            "limits.memory={v:?}: must be a whole number of MiB"
        )));
    }
    let mib = bytes / MIB;
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        return Err(invalid(format!(
            "limits.memory={v:?}: a VM needs from {MIN_MEMORY_MIB}MiB to {}GiB",
            MAX_MEMORY_MIB >> 10
        )));
    }
    Ok(mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kv: &[(&str, &str)]) -> Result<VmConfig, DriverError> {
        VmConfig::parse(kv.iter().copied())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(c.memory_mib, 256);
        assert_eq!(c.map_2m_pages(), 10);
    }

    #[test]
    fn values_and_allowed_prefixes() {
        let c = parse(&[
            ("limits.memory", "1GiB"),
            ("limits.cpu", "2"),
            ("testvm.dirty_mib", "768"),
            ("user.note", "x"),
            ("volatile.foo", "y"),
            ("image.os", "z"),
            ("migration.stateful", "true"),
            ("testvm.future_knob", "1"),
        ])
        .unwrap();
        assert_eq!((c.memory_mib, c.cpus, c.dirty_mib), (1024, 2, 768));
        assert_eq!(c.map_2m_pages(), 386);
    }

    #[test]
    fn rejects() {
        for kv in [
            ("limits.cpu", "0"),
            ("limits.cpu", "two"),
            ("limits.memory", "lots"),
            ("limits.memory", "16MiB"),
            ("limits.memory", "1000000"),
            ("testvm.dirty_mib", "-1"),
            ("testvm.dirty_start_mib", "1"),
            ("testvm.interval_ms", "1"),
            ("security.privileged", "true"),
            ("limits.processes", "10"),
        ] {
            let e = parse(&[kv]).unwrap_err();
            assert!(matches!(e, DriverError::InvalidConfig(_)), "{kv:?}: {e}");
        }
    }

    #[test]
    fn dirty_range_must_fit() {
        assert!(parse(&[("limits.memory", "256MiB"), ("testvm.dirty_mib", "252")]).is_ok());
        let e = parse(&[("limits.memory", "256MiB"), ("testvm.dirty_mib", "253")]).unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        // Above 3.5 GiB the low RAM ends at 3 GiB.
        assert!(parse(&[("limits.memory", "4GiB"), ("testvm.dirty_mib", "3068")]).is_ok());
        assert!(parse(&[("limits.memory", "4GiB"), ("testvm.dirty_mib", "3069")]).is_err());
    }
}
