//! Member-local settings given on ferryd's command line (or environment):
//! the migration protocol versions this member speaks, its default move
//! bandwidth, whether its VM moves use QEMU's multifd, and where the
//! `shared` storage pool is mounted here.

use std::path::{Path, PathBuf};

use ferry_migration::VersionRange;

/// The storage pool every member sees (configured per member with
/// `--shared-pool PATH`); instances on it move without copying storage.
pub const SHARED_POOL: &str = "shared";
/// The file in a shared pool that names it: members that read the same id
/// see the same directory.
const POOL_ID_FILE: &str = ".ferry-pool-id";

#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Migration protocol versions spoken (`--migration-protocol 1` during a
    /// rolling upgrade: only the previous version).
    pub migration_protocol: VersionRange,
    /// Default cap (bytes/s) for moves from this member; `--bandwidth` wins.
    pub migration_bandwidth: Option<u64>,
    /// Whether live VM moves from and to this member use QEMU's multifd
    /// (`--migration-multifd`).
    pub migration_multifd: Multifd,
    /// Where the `shared` pool is mounted on this member.
    pub shared_pool: Option<PathBuf>,
    /// How many instances an evacuation or restore moves at once
    /// (`--evacuate-parallel`; 0 = the default, 2).
    pub evacuate_parallel: usize,
    /// Memory this member offers to instances (`--instance-memory`); placement
    /// counts the running instances' memory against it. `None`: no cap beyond
    /// the host's available memory.
    pub instance_memory: Option<u64>,
}

/// `--migration-multifd`: QEMU's parallel RAM channels on live VM moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Multifd {
    /// Offered on a move without a bandwidth cap or post-copy, accepted
    /// where this member's QEMU can (8.0 or later).
    #[default]
    Auto,
    /// Neither offered nor accepted: one stream per move.
    Off,
    /// Also offered on a bandwidth-capped move (instead of XBZRLE).
    Always,
}

impl Multifd {
    /// `auto` (or `on`, `1`), `off` (or `0`, `false`), `always`.
    pub fn parse(s: &str) -> Result<Multifd, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "on" | "1" | "true" => Ok(Multifd::Auto),
            "off" | "0" | "false" => Ok(Multifd::Off),
            "always" => Ok(Multifd::Always),
            other => Err(format!(
                "--migration-multifd {other:?}: use \"auto\" (the default), \"off\" or \"always\""
            )),
        }
    }
}

impl Settings {
    /// `--migration-protocol`: `1`/`previous` or `2`/`current`.
    pub fn parse_protocol(s: &str) -> Result<VersionRange, String> {
        let max = match s.trim() {
            "previous" => ferry_migration::MIN_PROTOCOL_VERSION,
            "current" => ferry_migration::PROTOCOL_VERSION,
            n => n.parse::<u32>().map_err(|_| {
                format!(
                    "--migration-protocol {n:?}: use a version number, \"previous\" or \"current\""
                )
            })?,
        };
        VersionRange::new(ferry_migration::MIN_PROTOCOL_VERSION, max).map_err(|e| e.to_string())
    }

    /// Moves at once during an evacuation or restore.
    pub fn parallel(&self) -> usize {
        if self.evacuate_parallel == 0 {
            2
        } else {
            self.evacuate_parallel
        }
    }

    /// `--instance-memory 4GiB`.
    pub fn parse_memory(s: &str) -> Result<u64, String> {
        match ferry_drivers::parse_size(s.trim()) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "--instance-memory {s:?}: use a positive size like 4GiB or 512MiB"
            )),
        }
    }

    /// `--migration-bandwidth 64MiB` (per second).
    pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
        let v = s.trim().trim_end_matches("/s");
        match ferry_drivers::parse_size(v) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "--migration-bandwidth {s:?}: use a positive size per second like 64MiB or 100MB"
            )),
        }
    }

    /// The shared pool's id as this member sees it (created on first use).
    pub fn shared_pool_id(&self) -> Option<String> {
        let dir = self.shared_pool.as_ref()?;
        pool_id(dir).ok()
    }
}

fn pool_id(dir: &Path) -> std::io::Result<String> {
    let f = dir.join(POOL_ID_FILE);
    if let Ok(s) = std::fs::read_to_string(&f) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    std::fs::create_dir_all(dir)?;
    let id: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    // create_new: two members initialising at once agree on the first id.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&f)
    {
        Ok(mut file) => {
            use std::io::Write;
            file.write_all(id.as_bytes())?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(std::fs::read_to_string(&f)?.trim().to_string())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_multifd_setting() {
        use super::Multifd;
        for (v, want) in [
            ("auto", Multifd::Auto),
            ("1", Multifd::Auto),
            ("OFF", Multifd::Off),
            ("0", Multifd::Off),
            ("always", Multifd::Always),
        ] {
            assert_eq!(Multifd::parse(v), Ok(want), "{v}");
        }
        let e = Multifd::parse("sometimes").unwrap_err();
        assert!(e.contains("sometimes") && e.contains("always"), "{e}");
    }

    use super::*;

    #[test]
    fn protocol_and_bandwidth_parse() {
        assert_eq!(Settings::parse_protocol("1").unwrap().max, 1);
        assert_eq!(Settings::parse_protocol("previous").unwrap().max, 1);
        assert_eq!(
            Settings::parse_protocol("current").unwrap(),
            VersionRange::CURRENT
        );
        assert!(Settings::parse_protocol("9").is_err());
        assert!(Settings::parse_protocol("x")
            .unwrap_err()
            .contains("previous"));
        assert_eq!(Settings::parse_bandwidth("64MiB").unwrap(), 64 << 20);
        assert_eq!(Settings::parse_bandwidth("100MB/s").unwrap(), 100_000_000);
        assert!(Settings::parse_bandwidth("0").is_err());
        assert!(Settings::parse_bandwidth("fast").is_err());
        assert_eq!(Settings::parse_memory("1GiB").unwrap(), 1 << 30);
        assert!(Settings::parse_memory("0")
            .unwrap_err()
            .contains("positive size"));
        assert_eq!(Settings::default().parallel(), 2);
    }

    #[test]
    fn shared_pool_id_is_stable_and_shared() {
        let d = std::env::temp_dir().join(format!("ferry-pool-{}", rand::random::<u64>()));
        let a = Settings {
            shared_pool: Some(d.clone()),
            ..Default::default()
        };
        let b = a.clone();
        let id = a.shared_pool_id().unwrap();
        assert_eq!(id.len(), 32);
        assert_eq!(b.shared_pool_id().unwrap(), id);
        assert_eq!(Settings::default().shared_pool_id(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
