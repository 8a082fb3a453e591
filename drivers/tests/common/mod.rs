//! Shared by the container driver e2e tests (harness = false: the container
//! driver re-execs the test binary as its `forkstart` helper): a tiny test
//! runner, specs, clean-up, and probes of processes and cgroups.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use ferry_drivers::{InstancePaths, InstanceSpec, InstanceType};

pub type TestResult = Result<(), String>;
pub type TestFn = fn(PathBuf) -> Pin<Box<dyn Future<Output = TestResult>>>;

/// Run `tests` (each in its own temp dir, 120 s limit), print the outcome
/// of each and `N passed, N failed`, exit 1 on any failure. A failed test's
/// dir is kept for its logs.
pub fn run(tests: &[(&str, TestFn)], filter: Option<&str>, prefix: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in tests {
        if filter.is_some_and(|flt| !name.contains(flt)) {
            continue;
        }
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        println!("test {name} ...");
        let r = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(120), f(dir.path().to_path_buf()))
                .await
                .unwrap_or_else(|_| Err("timed out after 120s".into()))
        });
        match r {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(msg) => {
                println!("test {name} ... FAILED: {msg}");
                println!("  logs kept in {}", dir.keep().display());
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

macro_rules! ensure_ {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($fmt)+)));
        }
    };
}

pub(crate) use ensure_ as ensure;

pub fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// The spec of container `name` on the member whose data dir is `member`.
pub fn spec(member: &Path, name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.to_string(),
        kind: InstanceType::Container,
        image: "busybox".into(),
        config: [("limits.memory".to_string(), "128MiB".to_string())].into(),
        volatile: BTreeMap::new(),
        paths: InstancePaths {
            volume: member.join("volumes").join(name),
            run: member.join("run").join(name),
            logs: member.join("logs").join(name),
            images: member.join("images"),
        },
    }
}

/// Kills and unmounts whatever a test left behind, even when it failed.
pub struct Cleanup(pub Vec<InstanceSpec>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for s in &self.0 {
            let p = &s.paths;
            for f in ["init.pid", "criu-restore.pid"] {
                if let Some(pid) = std::fs::read_to_string(p.run.join(f))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        for s in &self.0 {
            // The member's mount point (and the volume's own path, which
            // an older layout bound onto itself).
            for m in [s.paths.run.join("rootfs"), s.paths.volume.join("rootfs")] {
                for _ in 0..4 {
                    let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
                }
            }
            for dir in ferry_cgroups(&s.name) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

pub fn counter(s: &InstanceSpec) -> Option<u64> {
    // The init rewrites the file; an empty read is a write in progress.
    for _ in 0..20 {
        if let Some(n) = std::fs::read_to_string(s.paths.volume.join("rootfs/counter"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A process's nice value (`/proc/<pid>/stat`, field 19).
pub fn nice_of(pid: u32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
}

pub fn pid_gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

/// The ferry cgroups of instance `name` (`ferry/<name>-<hash>`) on any hierarchy.
pub fn ferry_cgroups(name: &str) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/memory",
    ]
    .iter()
    .filter_map(|h| std::fs::read_dir(Path::new(h).join("ferry")).ok())
    .flatten()
    .filter_map(|e| e.ok())
    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    .map(|e| e.path())
    .collect()
}
