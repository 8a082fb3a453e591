//! The container's cgroup: memory limit, CPU limit, process count, memory
//! usage, and a way to kill everything left over.
//!
//! Preference order:
//! 1. cgroup v2 with the `memory` controller (unified mode, `/sys/fs/cgroup`
//!    or the hybrid `/sys/fs/cgroup/unified` if it carries `memory`):
//!    `<mnt>/ferry/<name>-<key>`, `memory.max`, `memory.current`.
//! 2. cgroup v1 `memory` hierarchy (hybrid/legacy hosts):
//!    `<mnt>/ferry/<name>-<key>`, `memory.limit_in_bytes`, `memory.usage_in_bytes`.
//! 3. none: no limit can be applied (a `limits.memory` then fails to start),
//!    processes are counted by walking the init's descendants.
//!
//! `limits.cpu` (N CPUs' worth of time, fractions allowed) is a CFS quota of
//! N × 100 ms per 100 ms period: `cpu.max` in the same directory on v2
//! (the `cpu` controller enabled down to it), `cpu.cfs_quota_us` in a
//! directory of the same name in the v1 `cpu` hierarchy otherwise, which the
//! tasks then join too. Without a `cpu` controller a `limits.cpu` fails to
//! start.
//!
//! The cgroup is created before the container is started or restored and
//! removed when it stops. CRIU records the tasks' cgroup paths at dump and, in
//! its default `soft` mode, puts the restored tasks back into the same paths;
//! the driver pre-creates the cgroup (with the limit) before restoring and
//! re-attaches the restored tree afterwards, so the result does not depend on
//! CRIU's cgroup handling.
//!
//! `<key>` is a hash of the instance's run dir on this member (not of its
//! volume, which two members share on a `shared` pool): several members of
//! a test cluster may share one host (and its cgroup tree) while the same-named
//! instance runs on two of them during a move; each must only ever touch its
//! own cgroup. A task restored from another member's dump lands (CRIU soft
//! mode) in that member's cgroup path; re-attaching moves it into ours and
//! the emptied foreign cgroup is removed if no one uses it.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupKind {
    V2,
    V1Memory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub kind: CgroupKind,
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    /// `<mount>/ferry/<name>-<key>`.
    pub dir: PathBuf,
    /// Where the `cpu` controller is for this cgroup, if the host has one:
    /// [`Cgroup::dir`] on v2, `<v1 cpu mount>/ferry/<name>-<key>` on v1
    /// (created only for a `limits.cpu`).
    pub cpu: Option<CpuDir>,
}

/// The `cpu` controller's directory for a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuDir {
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    pub dir: PathBuf,
    /// v1: a hierarchy of its own (the tasks join it separately).
    pub separate: bool,
}

/// The CFS period ferry uses, in µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// A cgroup mount found in mountinfo: (fstype, mount point, super options).
type CgMount = (String, PathBuf, String);

/// Parse `/proc/self/mountinfo` for cgroup and cgroup2 mounts.
pub fn parse_cgroup_mounts(mountinfo: &str) -> Vec<CgMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mnt) = left.split(' ').nth(4) else {
            continue;
        };
        let mut r = right.split(' ');
        let (Some(fstype), Some(_src), Some(opts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        if fstype == "cgroup" || fstype == "cgroup2" {
            out.push((
                fstype.to_string(),
                PathBuf::from(super::mounts::unescape(mnt)),
                opts.to_string(),
            ));
        }
    }
    out
}

/// Choose the hierarchy from the mounts; `has_memory_v2` tells whether a
/// cgroup2 mount point offers the memory controller.
pub fn choose(
    mounts: &[CgMount],
    has_memory_v2: impl Fn(&Path) -> bool,
) -> Option<(CgroupKind, PathBuf)> {
    if let Some((_, m, _)) = mounts
        .iter()
        .find(|(t, m, _)| t == "cgroup2" && has_memory_v2(m))
    {
        return Some((CgroupKind::V2, m.clone()));
    }
    mounts
        .iter()
        .find(|(t, _, o)| t == "cgroup" && o.split(',').any(|x| x == "memory"))
        .map(|(_, m, _)| (CgroupKind::V1Memory, m.clone()))
}

fn v2_has_memory(m: &Path) -> bool {
    v2_has(m, "memory")
}

fn v2_has(m: &Path, controller: &str) -> bool {
    std::fs::read_to_string(m.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().any(|c| c == controller))
        .unwrap_or(false)
}

/// Where the `cpu` controller is, given the memory hierarchy chosen:
/// the same v2 mount if it offers `cpu`, else a v1 hierarchy carrying `cpu`.
pub fn choose_cpu(
    mounts: &[CgMount],
    kind: CgroupKind,
    mount: &Path,
    v2_has_cpu: impl Fn(&Path) -> bool,
) -> Option<(PathBuf, bool)> {
    if kind == CgroupKind::V2 && v2_has_cpu(mount) {
        return Some((mount.to_path_buf(), false));
    }
    mounts
        .iter()
        .find(|(t, _, o)| t == "cgroup" && o.split(',').any(|x| x == "cpu"))
        .map(|(_, m, _)| (m.clone(), true))
}

impl Cgroup {
    /// The cgroup this host would use for container `name` whose run dir on
    /// this member is `key` (not created).
    pub fn for_instance(name: &str, key: &Path) -> Option<Cgroup> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mounts = parse_cgroup_mounts(&mi);
        let (kind, mount) = choose(&mounts, v2_has_memory)?;
        let dir = mount.join("ferry").join(dir_name(name, key));
        let cpu =
            choose_cpu(&mounts, kind, &mount, |m| v2_has(m, "cpu")).map(|(cmount, separate)| {
                CpuDir {
                    dir: if separate {
                        cmount.join("ferry").join(dir_name(name, key))
                    } else {
                        dir.clone()
                    },
                    mount: cmount,
                    separate,
                }
            });
        Some(Cgroup {
            kind,
            mount,
            dir,
            cpu,
        })
    }

    /// The v1 `cpu` directory when it exists (the tasks join it as well).
    fn separate_cpu_dir(&self) -> Option<&Path> {
        self.cpu
            .as_ref()
            .filter(|c| c.separate && c.dir.is_dir())
            .map(|c| c.dir.as_path())
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Create the cgroup and apply the memory limit and the CPU quota
    /// (µs per [`CPU_PERIOD_US`]; the caller checked [`Cgroup::cpu`]).
    pub fn create(&self, memory_limit: Option<u64>, cpu_quota_us: Option<u64>) -> io::Result<()> {
        std::fs::create_dir_all(self.mount.join("ferry"))?;
        self.delegate(cpu_quota_us.is_some());
        std::fs::create_dir_all(&self.dir)?;
        self.set_limits(memory_limit, cpu_quota_us)
    }

    /// v2: enable the controllers down to `ferry/<name>` (its parent holds
    /// no process, so this is allowed while containers run).
    fn delegate(&self, cpu: bool) {
        if self.kind == CgroupKind::V2 {
            let ctrls = if cpu { "+memory +cpu" } else { "+memory" };
            for d in [self.mount.clone(), self.mount.join("ferry")] {
                let _ = std::fs::write(d.join("cgroup.subtree_control"), ctrls);
            }
        }
    }

    /// Set (or, with `None`, lift) the memory limit and the CPU quota of an
    /// existing cgroup, at once for the tasks in it. A v1 `cpu` directory is
    /// created when a quota first comes, and the tasks join it.
    pub fn set_limits(
        &self,
        memory_limit: Option<u64>,
        cpu_quota_us: Option<u64>,
    ) -> io::Result<()> {
        let (file, unlimited) = match self.kind {
            CgroupKind::V2 => ("memory.max", "max"),
            CgroupKind::V1Memory => ("memory.limit_in_bytes", "-1"),
        };
        let value = memory_limit.map_or(unlimited.to_string(), |l| l.to_string());
        let current = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let current = current.trim();
        // v1 shows "no limit" as a huge number of bytes.
        let unlimited_now = current == "max" || current.parse::<u64>().is_ok_and(|n| n >= 1 << 62);
        if memory_limit.is_some() || !unlimited_now {
            std::fs::write(self.dir.join(file), &value)?;
        }
        let Some(cpu) = &self.cpu else {
            return match cpu_quota_us {
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no cpu controller",
                )),
                None => Ok(()),
            };
        };
        match (cpu.separate, cpu_quota_us) {
            (true, Some(quota)) => {
                let new = !cpu.dir.is_dir();
                std::fs::create_dir_all(&cpu.dir)?;
                std::fs::write(cpu.dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                std::fs::write(cpu.dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                if new {
                    for pid in self.pids() {
                        std::fs::write(cpu.dir.join("cgroup.procs"), pid.to_string())?;
                    }
                }
            }
            (true, None) if cpu.dir.is_dir() => {
                std::fs::write(cpu.dir.join("cpu.cfs_quota_us"), "-1")?;
            }
            (true, None) => {}
            (false, quota) => {
                if quota.is_some() {
                    self.delegate(true);
                }
                let max = cpu.dir.join("cpu.max");
                if quota.is_some() || max.exists() {
                    let q = quota.map_or("max".to_string(), |q| q.to_string());
                    std::fs::write(max, format!("{q} {CPU_PERIOD_US}"))?;
                }
            }
        }
        Ok(())
    }

    /// Every `cgroup.procs` a task of the container joins: the memory (or
    /// v2) directory's, and the v1 `cpu` directory's when there is one.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.procs_file()];
        v.extend(self.separate_cpu_dir().map(|d| d.join("cgroup.procs")));
        v
    }

    /// (hierarchy mount, our directory, kind, controller naming it in
    /// `/proc/<pid>/cgroup`) of every hierarchy the container's tasks are
    /// in; `V1Memory` stands for any v1 hierarchy there.
    pub fn hierarchies(&self) -> Vec<(PathBuf, PathBuf, CgroupKind, &'static str)> {
        let mut v = vec![(self.mount.clone(), self.dir.clone(), self.kind, "memory")];
        if let (Some(c), Some(d)) = (&self.cpu, self.separate_cpu_dir()) {
            v.push((
                c.mount.clone(),
                d.to_path_buf(),
                CgroupKind::V1Memory,
                "cpu",
            ));
        }
        v
    }

    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn memory_usage(&self) -> Option<i64> {
        let file = match self.kind {
            CgroupKind::V2 => "memory.current",
            CgroupKind::V1Memory => "memory.usage_in_bytes",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn attach(&self, pid: u32) -> io::Result<()> {
        for f in self.procs_files() {
            std::fs::write(f, pid.to_string())?;
        }
        Ok(())
    }

    /// SIGKILL every process still in the cgroup.
    pub fn kill_all(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Kill leftovers and remove the cgroup (and its v1 `cpu` directory);
    /// retries while exiting tasks drain.
    pub async fn remove(&self) -> io::Result<()> {
        let mut dirs: Vec<PathBuf> = vec![self.dir.clone()];
        dirs.extend(self.separate_cpu_dir().map(Path::to_path_buf));
        for dir in dirs {
            self.remove_dir(&dir).await?;
        }
        Ok(())
    }

    async fn remove_dir(&self, dir: &Path) -> io::Result<()> {
        let mut last = None;
        for _ in 0..50 {
            self.kill_all();
            match std::fs::remove_dir(dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| io::Error::other("cgroup busy")))
    }
}

/// The directory of hierarchy `mount` that `pid` is in (`controller`
/// names the v1 hierarchy; v2 has one).
pub fn current_in(pid: u32, mount: &Path, kind: CgroupKind, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = controller_path_in(&text, kind, controller)?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// `<name>-<8 hex digits of FNV-1a(key)>`: stable across ferry versions.
pub fn dir_name(name: &str, key: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{name}-{h:08x}")
}

/// The path in `/proc/<pid>/cgroup` for the v1 hierarchy carrying
/// `controller`, or the unified one (v2).
fn controller_path_in<'a>(
    proc_cgroup: &'a str,
    kind: CgroupKind,
    controller: &str,
) -> Option<&'a str> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_id, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match kind {
            CgroupKind::V2 => ctrls.is_empty(),
            CgroupKind::V1Memory => ctrls.split(',').any(|c| c == controller),
        };
        hit.then_some(path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn hybrid_without_v2_memory_uses_v1() {
        let m = parse_cgroup_mounts(HYBRID);
        assert_eq!(m.len(), 3);
        let c = choose(&m, |_| false).unwrap();
        assert_eq!(
            c,
            (CgroupKind::V1Memory, PathBuf::from("/sys/fs/cgroup/memory"))
        );
    }

    #[test]
    fn v2_with_memory_preferred() {
        let m = parse_cgroup_mounts(HYBRID);
        let c = choose(&m, |p| p == Path::new("/sys/fs/cgroup/unified")).unwrap();
        assert_eq!(c, (CgroupKind::V2, PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "27 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate";
        let c = choose(&parse_cgroup_mounts(unified), |_| true).unwrap();
        assert_eq!(c.1, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn names_and_proc_cgroup() {
        let a = dir_name("c1", Path::new("/var/lib/ferry/m1/c1"));
        assert!(a.starts_with("c1-") && a.len() == 11, "{a}");
        assert_eq!(a, dir_name("c1", Path::new("/var/lib/ferry/m1/c1")));
        assert_ne!(a, dir_name("c1", Path::new("/var/lib/ferry/m2/c1")));
        let pc = "9:name=systemd:/\n4:memory:/ferry/c1-0badcafe\n1:cpu,cpuacct:/\n0::/x";
        assert_eq!(
            controller_path_in(pc, CgroupKind::V1Memory, "memory"),
            Some("/ferry/c1-0badcafe")
        );
        assert_eq!(controller_path_in(pc, CgroupKind::V2, "memory"), Some("/x"));
        assert_eq!(
            controller_path_in(pc, CgroupKind::V1Memory, "cpu"),
            Some("/")
        );
        assert_eq!(controller_path_in("1:cpu:/", CgroupKind::V2, "cpu"), None);
    }

    #[test]
    fn cpu_controller_v2_or_v1() {
        let m = parse_cgroup_mounts(HYBRID);
        let memory = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(
            choose_cpu(&m, CgroupKind::V1Memory, memory, |_| true),
            Some((PathBuf::from("/sys/fs/cgroup/cpu"), true))
        );
        let unified = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            choose_cpu(&m, CgroupKind::V2, unified, |_| true),
            Some((unified.to_path_buf(), false))
        );
        let v2only = parse_cgroup_mounts("27 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw");
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(choose_cpu(&v2only, CgroupKind::V2, root, |_| false), None);
    }

    #[test]
    fn no_cgroups() {
        assert_eq!(
            choose(
                &parse_cgroup_mounts("27 1 0:26 / / rw - ext4 /dev/vda rw"),
                |_| true
            ),
            None
        );
    }
}
