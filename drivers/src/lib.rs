//! Instance drivers for ferry.
//!
//! A closed set of drivers (containers and VMs) behind narrow capability traits:
//! [`Lifecycle`] (create/start/stop/delete/query) and [`StateSave`] (stateful
//! stop and start). Migration send/receive traits come with the migration work.
//! The daemon dispatches through [`Driver`], an enum, not trait objects.
//!
//! Drivers know nothing about HTTP or the database: they take an
//! [`InstanceSpec`] (name, image, config, paths computed by the daemon) and
//! report progress through an [`OpCtx`].

pub mod container;
pub mod ctx;
pub mod error;
pub mod storage;
pub mod vm;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use ctx::OpCtx;
pub use error::DriverError;

/// Kind of instance; serialized as Incus does ("container", "virtual-machine").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum InstanceType {
    #[serde(rename = "container")]
    Container,
    #[serde(rename = "virtual-machine")]
    VirtualMachine,
}

impl InstanceType {
    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceType::Container => "container",
            InstanceType::VirtualMachine => "virtual-machine",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "container" | "" => Some(InstanceType::Container),
            "virtual-machine" => Some(InstanceType::VirtualMachine),
            _ => None,
        }
    }
}

/// Where an instance keeps its files. Computed by the daemon from its data dir
/// and the instance's storage pool; drivers create what they need below these.
#[derive(Debug, Clone)]
pub struct InstancePaths {
    /// The instance's volume on its storage pool: `rootfs/` for containers,
    /// `disk.img` for VMs, and `state/` for saved runtime state.
    pub volume: PathBuf,
    /// Runtime files (pidfile, QMP socket); may be wiped at host reboot.
    pub run: PathBuf,
    /// Logs (container/VM console log, CRIU logs).
    pub logs: PathBuf,
    /// Cache of built images shared by all instances of the member
    /// (e.g. the busybox rootfs template, the assembled test VM boot sector).
    pub images: PathBuf,
}

impl InstancePaths {
    pub fn state_dir(&self) -> PathBuf {
        self.volume.join("state")
    }
}

/// Everything a driver needs to act on one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub name: String,
    pub kind: InstanceType,
    /// Image name: `busybox` for containers, `testvm` for VMs.
    pub image: String,
    /// User config (`limits.memory`, `limits.cpu`, `testvm.dirty_mib`, ...).
    pub config: BTreeMap<String, String>,
    /// Volatile keys as last stored in the DB (`volatile.*`).
    pub volatile: BTreeMap<String, String>,
    pub paths: InstancePaths,
}

/// What the driver sees of a running or stopped instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuntimeState {
    pub running: bool,
    /// Host pid of the container init / QEMU process (0 when stopped).
    pub pid: u32,
    /// Number of processes (containers) or vCPU threads (VMs) if known.
    pub processes: i64,
    /// Memory usage in bytes if known.
    pub memory_usage: i64,
}

/// Volatile keys a driver wants stored (value `None` = unset the key).
pub type VolatileChanges = BTreeMap<String, Option<String>>;

/// Instance lifecycle.
#[allow(async_fn_in_trait)]
pub trait Lifecycle {
    /// Validate the image name and config for this driver. Must not touch disk.
    fn validate(&self, spec: &InstanceSpec) -> Result<(), DriverError>;
    /// Create the instance's volume from its image (rootfs / disk).
    async fn create(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError>;
    /// Start the instance from scratch (a cold boot).
    async fn start(&self, spec: &InstanceSpec, ctx: &OpCtx)
        -> Result<VolatileChanges, DriverError>;
    /// Stop: clean shutdown, or kill at once when `force`.
    async fn stop(
        &self,
        spec: &InstanceSpec,
        force: bool,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError>;
    /// Live state from the host (processes, pidfiles, QMP).
    async fn state(&self, spec: &InstanceSpec) -> Result<RuntimeState, DriverError>;
    /// Remove the volume, runtime and log files. The instance must be stopped.
    async fn delete(&self, spec: &InstanceSpec) -> Result<(), DriverError>;
}

/// Stateful stop and start.
#[allow(async_fn_in_trait)]
pub trait StateSave {
    /// Save the running instance's full runtime state under `paths.state_dir()`
    /// and stop it (CRIU dump / QEMU migrate-to-file).
    async fn save_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError>;
    /// Start the instance from its saved state; removes the state afterwards.
    async fn restore_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError>;
    /// True when a saved state exists that `restore_state` can use.
    fn has_saved_state(&self, spec: &InstanceSpec) -> bool;
    /// Remove a saved state (a stateless start discards it).
    async fn discard_state(&self, spec: &InstanceSpec) -> Result<(), DriverError>;
}

/// The closed set of drivers, dispatched by instance type.
#[derive(Debug, Clone)]
pub enum Driver {
    Container(container::ContainerDriver),
    Vm(vm::VmDriver),
}

macro_rules! dispatch {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Driver::Container($d) => $e,
            Driver::Vm($d) => $e,
        }
    };
}

impl Driver {
    pub fn for_type(kind: InstanceType) -> Driver {
        match kind {
            InstanceType::Container => Driver::Container(container::ContainerDriver::default()),
            InstanceType::VirtualMachine => Driver::Vm(vm::VmDriver::default()),
        }
    }
}

impl Lifecycle for Driver {
    fn validate(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        dispatch!(self, d => d.validate(spec))
    }
    async fn create(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        dispatch!(self, d => d.create(spec, ctx).await)
    }
    async fn start(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        dispatch!(self, d => d.start(spec, ctx).await)
    }
    async fn stop(
        &self,
        spec: &InstanceSpec,
        force: bool,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        dispatch!(self, d => d.stop(spec, force, ctx).await)
    }
    async fn state(&self, spec: &InstanceSpec) -> Result<RuntimeState, DriverError> {
        dispatch!(self, d => d.state(spec).await)
    }
    async fn delete(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        dispatch!(self, d => d.delete(spec).await)
    }
}

impl StateSave for Driver {
    async fn save_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        dispatch!(self, d => d.save_state(spec, ctx).await)
    }
    async fn restore_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        dispatch!(self, d => d.restore_state(spec, ctx).await)
    }
    fn has_saved_state(&self, spec: &InstanceSpec) -> bool {
        dispatch!(self, d => d.has_saved_state(spec))
    }
    async fn discard_state(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        dispatch!(self, d => d.discard_state(spec).await)
    }
}

/// Run the drivers' tool checks once (`criu --version`, the CRIU features a
/// move's offer asks for, `qemu --version`), so the first move or start
/// after the daemon starts does not wait for them (QEMU takes ~0.1 s to
/// print its version here). Results are cached per process; a missing tool
/// is reported when it is needed, not here.
pub async fn warm_up() {
    let container = container::ContainerDriver::default();
    let (criu, qemu) = tokio::join!(container.migration_features(), vm::qemu::qemu_version());
    tracing::debug!(
        lazy_pages = criu.lazy_pages.is_ok(),
        pre_dump = criu.pre_dump.is_ok(),
        qemu = qemu.is_ok(),
        "driver tool checks cached"
    );
}

/// Parse a size like `512MiB`, `1GiB`, `256MB`, `1048576` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12XB"), None);
        assert_eq!(parse_size("MiB"), None);
    }
}
