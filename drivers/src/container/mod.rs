//! Container driver: namespaces + pivot_root + cgroups, CRIU for state.
//!
//! Layout of one container:
//! - `volume/rootfs/`: copy of the busybox template (the container's files),
//! - `run/rootfs/`: while the container runs on this member, a bind mount of
//!   `volume/rootfs` (pivot_root and CRIU `--root` need a mount point). It
//!   lives in the member's own run dir so that two members sharing one
//!   volume (a `shared` pool, both sides of a move) never stack or unmount
//!   each other's mounts; each member's clean-up unmounts only its own,
//! - `volume/state/`: CRIU images of a stateful stop (`state.tmp/` while
//!   dumping, renamed when complete),
//! - `volume/rootfs/var/log/console.log`: the console log, the init's
//!   stdout and stderr (see [`console`]: in the rootfs so CRIU restores it
//!   by path and it moves with the rootfs),
//! - `run/init.pid`: `PID STARTTIME` of the container init (host pid),
//! - `logs/dump.log`, `logs/restore.log`: CRIU logs (`logs/page-server.log`
//!   on the target of a move),
//! - `run/migrate-dumped`: present while a move's dump left the tree stopped
//!   (see [`migrate`]); `run/migrate-lazy-committed`: the target of a
//!   post-copy move restored, this tree must never resume (see [`lazy`]),
//! - `logs/lazy-pages.log`: CRIU's lazy-pages daemon on the target of a
//!   post-copy move,
//! - cgroup `<hierarchy>/ferry/<name>-<hash of the run dir>` (see [`cgroup`]).
//!
//! Processes: see [`forkstart`] for how an init is started, and [`procfs`] for
//! why liveness is decided from `/proc` (who reaps the init).

mod cgroup;
mod config;
mod console;
mod criu;
mod forkstart;
mod gate;
mod image;
mod lazy;
mod lifecycle;
mod migrate;
mod mounts;
mod pagesink;
mod predump;
mod procfs;
mod state;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::*;
use cgroup::Cgroup;
use procfs::InitRecord;

pub use console::CONSOLE_LOG;
pub use forkstart::forkstart_main;
pub use gate::{pages_gate, PagesGate, PagesGateOpener};
pub use image::IMAGE;
pub use lazy::{LazyDump, LazyFrom, LazyPages, LazyServe, LazyServed, MigrationFeatures};
pub use migrate::{DumpInfo, PageServer, PagesTo};
pub use pagesink::{AnswerForSink, PageSink, PageSinkError, PageSinkStats, CRIU_IOV_LAYOUT};
pub use predump::{final_parent, pre_dump_dir, pre_dump_root, PreDumpGoal, PreDumpInfo};
pub use procfs::recorded_process;

/// Time limits of the driver's steps.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// Grace period after SIGTERM before SIGKILL.
    pub stop: Duration,
    /// How long to wait for the processes to vanish after SIGKILL.
    pub kill: Duration,
    /// The forkstart helper.
    pub start: Duration,
    pub dump: Duration,
    pub restore: Duration,
    /// `criu restore --lazy-pages` of a post-copy move (it hangs when the
    /// page source is gone, so it is bounded separately and tighter).
    pub lazy_restore: Duration,
    /// How long the source's lazy dump may go on serving pages after the
    /// target restored (then it is killed and the target's memory is lost).
    pub lazy_serve: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            stop: Duration::from_secs(10),
            kill: Duration::from_secs(10),
            start: Duration::from_secs(30),
            dump: Duration::from_secs(300),
            restore: Duration::from_secs(120),
            lazy_restore: Duration::from_secs(60),
            lazy_serve: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContainerDriver {
    /// Binary run as `<helper> forkstart ...` (ferryd itself by default).
    helper: PathBuf,
    pub timeouts: Timeouts,
}

impl Default for ContainerDriver {
    fn default() -> Self {
        let helper = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        ContainerDriver::with_helper(helper)
    }
}

/// Where a container's files are.
pub(crate) struct Layout {
    /// The mount point the container's root is bound at while it runs here.
    pub rootfs: PathBuf,
    /// The container's files on its volume (bound at `rootfs`).
    pub volume_rootfs: PathBuf,
    pub pidfile: PathBuf,
    pub criu_pidfile: PathBuf,
    pub state: PathBuf,
    pub state_tmp: PathBuf,
    pub dump_log: PathBuf,
    pub restore_log: PathBuf,
}

impl Layout {
    pub fn of(spec: &InstanceSpec) -> Layout {
        let p = &spec.paths;
        Layout {
            rootfs: p.run.join("rootfs"),
            volume_rootfs: p.volume.join("rootfs"),
            pidfile: p.run.join("init.pid"),
            criu_pidfile: p.run.join("criu-restore.pid"),
            state: p.state_dir(),
            state_tmp: p.volume.join("state.tmp"),
            dump_log: p.logs.join("dump.log"),
            restore_log: p.logs.join("restore.log"),
        }
    }

    /// Bind the volume's root filesystem at the run dir's mount point.
    pub fn bind_rootfs(&self) -> Result<(), DriverError> {
        mounts::bind(&self.volume_rootfs, &self.rootfs).map_err(|e| {
            DriverError::io(format!(
                "bind-mount {} at {}",
                self.volume_rootfs.display(),
                self.rootfs.display()
            ))(e.into())
        })
    }
}

pub(crate) fn power(state: &str) -> VolatileChanges {
    [(
        "volatile.last_state.power".to_string(),
        Some(state.to_string()),
    )]
    .into()
}

/// Volatile keys of a running container on this member: its power state and
/// the cgroup it runs in here (member-specific, like Incus's device keys).
pub(crate) fn running(spec: &InstanceSpec) -> VolatileChanges {
    let mut v = power("RUNNING");
    let cg = Cgroup::for_instance(&spec.name, &spec.paths.run).map(|c| c.dir.display().to_string());
    v.insert("volatile.cgroup".to_string(), cg);
    v
}

/// The spec's memory limit (bytes) and CPU quota (µs per period) for `cg`;
/// a `limits.cpu` on a host without a cpu controller is refused.
fn limits_for(spec: &InstanceSpec, cg: &Cgroup) -> Result<(Option<u64>, Option<u64>), DriverError> {
    let quota = config::cpu_quota_us(&spec.config);
    if quota.is_some() && cg.cpu.is_none() {
        return Err(DriverError::Unsupported(
            "apply limits.cpu: no cgroup cpu controller is mounted (unset limits.cpu)".into(),
        ));
    }
    Ok((config::memory_limit(&spec.config), quota))
}

/// Volatile keys of a stopped container: power state; no cgroup.
pub(crate) fn stopped() -> VolatileChanges {
    let mut v = power("STOPPED");
    v.insert("volatile.cgroup".to_string(), None);
    v
}

/// stdin for `exec`: the container's own /dev/null, reached through its
/// init's root (so the file is on the container's root mount). A host file
/// (ferryd's /dev/null) kept open by a daemon the command starts — shells
/// keep copies of fd 0 — would make the container impossible to checkpoint
/// (CRIU: "Can't lookup mount"). The host's /dev/null if the image has none.
/// The stdio of a command run in a container by [`ContainerDriver::spawn_exec`].
pub struct ExecStdio {
    /// `None`: the container's own /dev/null.
    pub stdin: Option<Stdio>,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// stdin is a terminal: make it the command's controlling terminal.
    pub tty: bool,
}

/// A command running in a container.
pub struct ExecChild {
    /// nsenter, which waits for the command and exits with its status.
    pub child: tokio::process::Child,
    _procs: Vec<std::fs::File>,
}

/// The exit code of a command (128 + signal when killed).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

fn container_null(init_pid: u32) -> Stdio {
    match std::fs::File::open(format!("/proc/{init_pid}/root/dev/null")) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    }
}

fn remove_if_exists(p: &Path) -> std::io::Result<()> {
    let r = if p.is_dir() && !p.is_symlink() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Remove a directory without waiting for it: it is renamed out of the way
/// at once (same parent, so the name is free again), and deleted on a
/// thread of its own. Freeing 100 MiB of checkpoint pages takes tens of ms:
/// not inside a move's downtime.
pub(crate) fn discard_dir(p: &Path) -> std::io::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return remove_if_exists(p);
    };
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let trash = parent.join(format!(
        ".{}.discard-{}-{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    match std::fs::rename(p, &trash) {
        Ok(()) => {
            let spawned = std::thread::Builder::new()
                .name("discard-dir".into())
                .spawn({
                    let trash = trash.clone();
                    move || {
                        if let Err(e) = std::fs::remove_dir_all(&trash) {
                            tracing::warn!("cannot remove {}: {e}", trash.display());
                        }
                    }
                });
            if spawned.is_err() {
                remove_if_exists(&trash)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => remove_if_exists(p),
    }
}

impl ContainerDriver {
    /// A driver that runs `helper forkstart ...` to start containers; the
    /// helper's `main` must call [`forkstart_main`] for that verb.
    pub fn with_helper(helper: PathBuf) -> Self {
        ContainerDriver {
            helper,
            timeouts: Timeouts::default(),
        }
    }

    pub fn helper(&self) -> &Path {
        &self.helper
    }

    /// The recorded init, if it is alive.
    pub(crate) fn running_record(&self, spec: &InstanceSpec) -> Option<InitRecord> {
        InitRecord::read(&Layout::of(spec).pidfile).filter(procfs::check_running)
    }

    /// Wait until the init is gone (or a zombie); true if it is.
    pub(crate) async fn wait_gone(rec: &InitRecord, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !procfs::check_running(rec) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM (unless `force`), wait, SIGKILL, wait.
    pub(crate) async fn terminate(&self, rec: &InitRecord, force: bool) -> Result<(), DriverError> {
        let pid = Pid::from_raw(rec.pid as i32);
        if !force {
            let _ = kill(pid, Signal::SIGTERM);
            if Self::wait_gone(rec, self.timeouts.stop).await {
                return Ok(());
            }
            tracing::warn!(pid = rec.pid, "container init ignored SIGTERM; killing it");
        }
        let _ = kill(pid, Signal::SIGKILL);
        if Self::wait_gone(rec, self.timeouts.kill).await {
            return Ok(());
        }
        Err(DriverError::Timeout(format!(
            "container init {} still alive {:?} after SIGKILL",
            rec.pid, self.timeouts.kill
        )))
    }

    /// Create the cgroup with the configured limits. `None` when the host
    /// has no usable hierarchy and no limit is asked for.
    pub(crate) fn setup_cgroup(&self, spec: &InstanceSpec) -> Result<Option<Cgroup>, DriverError> {
        let Some(cg) = Cgroup::for_instance(&spec.name, &spec.paths.run) else {
            if spec.config.contains_key("limits.memory") || spec.config.contains_key("limits.cpu") {
                return Err(DriverError::Unsupported(
                    "apply limits.memory / limits.cpu: no cgroup memory controller is mounted (unset them)".into(),
                ));
            }
            return Ok(None);
        };
        let (limit, quota) = limits_for(spec, &cg)?;
        match cg.create(limit, quota) {
            Ok(()) => Ok(Some(cg)),
            Err(e) if limit.is_none() && quota.is_none() => {
                tracing::warn!(dir = %cg.dir.display(), "cannot create container cgroup, running without: {e}");
                Ok(None)
            }
            Err(e) => Err(DriverError::io(format!(
                "create cgroup {} with limits.memory / limits.cpu",
                cg.dir.display()
            ))(e)),
        }
    }

    /// Apply the spec's `limits.memory` and `limits.cpu` to the container
    /// running here, at once (a stopped container gets them when it
    /// starts). A limit the kernel refuses, e.g. a memory limit below what
    /// the container uses now, is an error and the old limits stay.
    pub fn apply_limits(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let Some(cg) = Cgroup::for_instance(&spec.name, &spec.paths.run).filter(Cgroup::exists)
        else {
            return Ok(());
        };
        let (limit, quota) = limits_for(spec, &cg)?;
        cg.set_limits(limit, quota).map_err(|e| {
            let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                " (the container uses more memory than that now: free some or choose a higher limit)"
            } else {
                ""
            };
            DriverError::InvalidConfig(format!(
                "applying limits.memory={} limits.cpu={} to the running container {}: {e}{hint}",
                spec.config.get("limits.memory").map_or("(none)", String::as_str),
                spec.config.get("limits.cpu").map_or("(none)", String::as_str),
                spec.name
            ))
        })
    }

    /// Undo host-side setup: this member's rootfs mount, cgroup, pidfiles.
    /// Idempotent. Never touches the volume.
    pub(crate) async fn cleanup_host(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let l = Layout::of(spec);
        if l.rootfs.exists() {
            mounts::unmount_all(&l.rootfs).map_err(|e| {
                DriverError::io(format!("unmount {}", l.rootfs.display()))(e.into())
            })?;
            // rmdir, not remove_dir_all: if anything is still mounted there
            // the container's files must not be deleted through it.
            if let Err(e) = std::fs::remove_dir(&l.rootfs) {
                tracing::warn!("cannot remove mount point {}: {e}", l.rootfs.display());
            }
        }
        if let Some(cg) = Cgroup::for_instance(&spec.name, &spec.paths.run) {
            cg.remove().await.map_err(DriverError::io(format!(
                "remove cgroup {}",
                cg.dir.display()
            )))?;
        }
        for f in [&l.pidfile, &l.criu_pidfile] {
            remove_if_exists(f).map_err(DriverError::io(format!("remove {}", f.display())))?;
        }
        Ok(())
    }

    /// Run `argv` inside the running container (its mount, UTS, IPC, net and
    /// pid namespaces, root and working directory, and cgroup) with a clean
    /// environment plus `env`; returns the exit code (128+N if killed by
    /// signal N).
    pub async fn exec(
        &self,
        spec: &InstanceSpec,
        argv: &[String],
        env: &BTreeMap<String, String>,
        stdout: std::fs::File,
        stderr: std::fs::File,
    ) -> Result<i32, DriverError> {
        let stdio = ExecStdio {
            stdin: None,
            stdout: stdout.into(),
            stderr: stderr.into(),
            tty: false,
        };
        let mut child = self.spawn_exec(spec, argv, env, stdio)?;
        let status = child
            .child
            .wait()
            .await
            .map_err(DriverError::io("run nsenter"))?;
        Ok(exit_code(status))
    }

    /// Start `argv` inside the running container (its namespaces, its
    /// cgroup, a session of its own) with the given stdio; the caller waits
    /// for it. With `tty`, stdin is a terminal that becomes the command's
    /// controlling terminal.
    pub fn spawn_exec(
        &self,
        spec: &InstanceSpec,
        argv: &[String],
        env: &BTreeMap<String, String>,
        stdio: ExecStdio,
    ) -> Result<ExecChild, DriverError> {
        if argv.is_empty() {
            return Err(DriverError::InvalidConfig(
                "exec needs a command to run".into(),
            ));
        }
        let rec = self.running_record(spec).ok_or_else(|| {
            DriverError::WrongState(format!("container {} is not running", spec.name))
        })?;
        let nsenter = criu::find_tool("nsenter").ok_or_else(|| DriverError::MissingTool {
            tool: "nsenter".into(),
            detail: "not found (Debian package util-linux)".into(),
        })?;
        let mut cmd = tokio::process::Command::new(nsenter);
        cmd.arg(format!("--target={}", rec.pid))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd", "--",
            ])
            // A session of its own inside the container: a job the command
            // leaves behind (re-parented to the init) would otherwise belong
            // to a session led from outside the pid namespace, which CRIU
            // refuses to dump. busybox setsid execs without forking here.
            .args(["/bin/busybox", "setsid"])
            .args(stdio.tty.then_some("-c"))
            .args(argv)
            .env_clear()
            .env("PATH", "/bin:/sbin:/usr/bin:/usr/sbin")
            .env("HOME", "/root")
            .envs(env)
            .stdin(stdio.stdin.unwrap_or_else(|| container_null(rec.pid)))
            .stdout(stdio.stdout)
            .stderr(stdio.stderr)
            .kill_on_drop(true);
        // Join the container's cgroup between fork and exec so the command
        // is limited and counted like the rest of the container.
        let procs: Vec<std::fs::File> = Cgroup::for_instance(&spec.name, &spec.paths.run)
            .filter(Cgroup::exists)
            .map(|cg| cg.procs_files())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| std::fs::OpenOptions::new().write(true).open(p).ok())
            .collect();
        if !procs.is_empty() {
            let fds: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: only write(2) runs in the child, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    for fd in &fds {
                        libc::write(*fd, b"0".as_ptr().cast(), 1);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(DriverError::io("run nsenter"))?;
        Ok(ExecChild {
            child,
            _procs: procs,
        })
    }
}
