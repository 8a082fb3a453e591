//! Shared by the VM driver e2e tests: specs, clean-up by pid, skip checks.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_drivers::{InstancePaths, InstanceSpec, InstanceType};

pub fn spec(root: &Path, name: &str, config: &[(&str, &str)]) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        kind: InstanceType::VirtualMachine,
        image: "testvm".into(),
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        volatile: BTreeMap::new(),
        paths: InstancePaths {
            volume: root.join("vol").join(name),
            run: root.join("run").join(name),
            logs: root.join("logs").join(name),
            images: root.join("images"),
        },
    }
}

/// Kills whatever QEMU the pidfile names when the test ends, even on a panic.
pub struct KillOnDrop(pub PathBuf);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            if is_qemu(pid as u32) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

pub fn is_qemu(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !zombie && String::from_utf8_lossy(&cmdline).contains("qemu")
}

pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("needs /dev/kvm".into());
    }
    for tool in ["qemu-system-x86_64", "nasm"] {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

pub async fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
