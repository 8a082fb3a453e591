//! Stateful stop and start with CRIU.
//!
//! Dump: `criu dump --tree <init>` into `volume/state.tmp`, renamed to
//! `volume/state` once complete, so a partial dump never looks like a saved
//! state. CRIU kills the tree after a successful dump and resumes it after a
//! failed one; the driver then checks which of the two happened.
//!
//! Restore: cgroup re-created (with its limit), rootfs bind-mounted at the
//! member's mount point (`run/rootfs`), `criu restore --restore-detached --root <rootfs> --pidfile ...`
//! bounded by a timeout and the operation's cancellation; on any failure the
//! restored pids are killed and the host set-up undone, the saved state kept.
//! The restored tree is re-attached to the cgroup, and the state removed.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::cgroup::Cgroup;
use super::criu::{self, Outcome};
use super::procfs::{self, InitRecord};
use super::{remove_if_exists, ContainerDriver, Layout};
use crate::*;

pub(super) fn mkdirs(dirs: &[&std::path::Path]) -> Result<(), DriverError> {
    for d in dirs {
        std::fs::create_dir_all(d).map_err(DriverError::io(format!("create {}", d.display())))?;
    }
    Ok(())
}

impl StateSave for ContainerDriver {
    async fn save_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let l = Layout::of(spec);
        let rec = self.running_record(spec).ok_or_else(|| {
            DriverError::WrongState(format!("container {} is not running", spec.name))
        })?;
        let bin = criu::checked_criu().await?;
        procfs::ensure_no_strays(&spec.name, rec.pid, "stop the container statelessly")?;
        ctx.progress("stage", "preparing checkpoint");
        remove_if_exists(&l.state_tmp)
            .map_err(DriverError::io(format!("remove {}", l.state_tmp.display())))?;
        mkdirs(&[&l.state_tmp, &spec.paths.logs])?;
        if ctx.is_cancelled() {
            let _ = remove_if_exists(&l.state_tmp);
            return Err(DriverError::Cancelled(
                "stateful stop (the container is still running)".into(),
            ));
        }
        ctx.progress("stage", "dumping container state");
        let t0 = Instant::now();
        let args = criu::dump_args(rec.pid, &l.state_tmp, &l.dump_log);
        // The dump is the irreversible step: it is not interrupted by cancel.
        if let Err((_, e)) = criu::run(&bin, &args, &l.dump_log, self.timeouts.dump, None).await {
            let _ = remove_if_exists(&l.state_tmp);
            let alive = procfs::check_running(&rec);
            let what = if alive {
                "the container is still running"
            } else {
                "the container is no longer running"
            };
            tracing::warn!(container = %spec.name, "criu dump failed, {what}: {e}");
            return Err(match e {
                DriverError::Command { program, detail } => DriverError::Command {
                    program,
                    detail: format!("{detail}\n{what}"),
                },
                other => other,
            });
        }
        tracing::info!(container = %spec.name, ms = t0.elapsed().as_millis() as u64, "container state dumped");
        remove_if_exists(&l.state)
            .map_err(DriverError::io(format!("remove old {}", l.state.display())))?;
        std::fs::rename(&l.state_tmp, &l.state).map_err(DriverError::io(format!(
            "rename dump to {}",
            l.state.display()
        )))?;
        ctx.progress("stage", "state saved; cleaning up");
        if !Self::wait_gone(&rec, self.timeouts.kill).await {
            self.terminate(&rec, true).await?;
        }
        self.cleanup_host(spec).await?;
        Ok(super::stopped())
    }

    async fn restore_state(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let l = Layout::of(spec);
        if !self.has_saved_state(spec) {
            return Err(DriverError::WrongState(format!(
                "container {} has no saved state",
                spec.name
            )));
        }
        if let Some(rec) = self.running_record(spec) {
            return Err(DriverError::WrongState(format!(
                "container {} is already running (pid {})",
                spec.name, rec.pid
            )));
        }
        if !l.volume_rootfs.is_dir() {
            return Err(DriverError::WrongState(format!(
                "container {} has no root filesystem",
                spec.name
            )));
        }
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("stateful start (nothing was done)")?;
        ctx.progress("stage", "preparing restore");
        self.cleanup_host(spec).await?;
        mkdirs(&[&spec.paths.run, &spec.paths.logs])?;
        let cg = self.setup_cgroup(spec)?;
        match self
            .run_restore(spec, &l.state, &bin, cg.as_ref(), ctx, RestoreMode::Plain)
            .await
        {
            Ok(rec) => {
                tracing::info!(container = %spec.name, pid = rec.pid, "container restored");
                if let Err(e) = remove_if_exists(&l.state) {
                    tracing::warn!("cannot remove restored state {}: {e}", l.state.display());
                }
                Ok(super::running(spec))
            }
            Err(e) => {
                self.kill_partial_restore(&l, cg.as_ref()).await;
                let _ = self.cleanup_host(spec).await;
                Err(e)
            }
        }
    }

    fn has_saved_state(&self, spec: &InstanceSpec) -> bool {
        Layout::of(spec).state.join("inventory.img").is_file()
    }

    async fn discard_state(&self, spec: &InstanceSpec) -> Result<(), DriverError> {
        let l = Layout::of(spec);
        for d in [&l.state, &l.state_tmp] {
            remove_if_exists(d).map_err(DriverError::io(format!("remove {}", d.display())))?;
        }
        Ok(())
    }
}

/// Move the restored tree into our cgroup. CRIU (soft mode) restores tasks
/// into the cgroup paths recorded at dump: ours when dumped here (then this
/// is a no-op), another member's when the dump came from elsewhere; an
/// emptied foreign ferry cgroup is removed (rmdir fails harmlessly if used).
/// The same in each hierarchy the container uses (v1: memory and cpu).
fn reattach(cg: &Cgroup, init: u32) {
    let hierarchies = cg.hierarchies();
    let foreign: Vec<(PathBuf, PathBuf)> = hierarchies
        .iter()
        .filter_map(|(mount, ours, kind, ctrl)| {
            super::cgroup::current_in(init, mount, *kind, ctrl)
                .filter(|d| d != ours && d.starts_with(mount.join("ferry")))
                .map(|d| (d, ours.join("cgroup.procs")))
        })
        .collect();
    for p in procfs::tree_pids(init) {
        if let Err(e) = cg.attach(p) {
            tracing::debug!(
                pid = p,
                "cannot attach restored task to {}: {e}",
                cg.dir.display()
            );
        }
    }
    for (dir, ours) in foreign {
        // A task the tree forked while we listed it stayed behind. During a
        // move on one host the foreign cgroup is the source's, which still
        // holds the source's stopped tree (another pid namespace) and is
        // emptied with SIGKILL when the source lets go: move every task of
        // our pid namespace out of it.
        let ns = procfs::pidns_of(init);
        for _ in 0..10 {
            let left: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .filter(|&p| ns.is_some() && procfs::pidns_of(p) == ns)
                .collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = std::fs::write(&ours, p.to_string());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

impl ContainerDriver {
    /// Restore the images in `images` onto the rootfs of `l` and record the
    /// restored init in the pidfile; `lazy`: `--lazy-pages` (a `criu
    /// lazy-pages` daemon serves `images`), bounded by `timeouts.lazy_restore`.
    pub(super) async fn run_restore(
        &self,
        spec: &InstanceSpec,
        images: &std::path::Path,
        bin: &std::path::Path,
        cg: Option<&Cgroup>,
        ctx: &OpCtx,
        mode: RestoreMode,
    ) -> Result<InitRecord, DriverError> {
        let lazy = matches!(mode, RestoreMode::Lazy);
        let l = &Layout::of(spec);
        l.bind_rootfs()?;
        let root = l
            .rootfs
            .canonicalize()
            .map_err(DriverError::io(format!("resolve {}", l.rootfs.display())))?;
        let pidfile =
            std::path::absolute(&l.criu_pidfile).map_err(DriverError::io("resolve pidfile"))?;
        ctx.check_cancelled("stateful start (nothing was restored; the state is kept)")?;
        ctx.progress("stage", "restoring container state");
        let t0 = Instant::now();
        let mut args = criu::restore_args(images, &root, &pidfile, &l.restore_log, lazy);
        let mut gate = match mode {
            RestoreMode::Gated(g) => Some(super::gate::ArmedGate::arm(g, &spec.paths.run)?),
            _ => None,
        };
        if let Some(g) = &gate {
            args.extend(g.args());
        }
        let limit = if lazy {
            self.timeouts.lazy_restore
        } else if gate.is_some() {
            // Plus the wait at the gate (a move's source gives its pages a
            // minute after the dump).
            self.timeouts.restore + Duration::from_secs(60)
        } else {
            self.timeouts.restore
        };
        // A gated restore sets up while a move's pages still cross on the
        // same CPUs: it yields to them (its gate script restores CRIU's
        // priority when it lets the restore go on).
        let nice = if gate.is_some() { gated_nice() } else { 0 };
        let run = criu::run_with(
            bin,
            &args,
            &l.restore_log,
            limit,
            Some(ctx.cancel_token()),
            &[],
            nice,
        );
        let ran = match gate.as_mut() {
            // The gate's end stays open (and the verdict is passed on) until criu exits.
            Some(g) => tokio::select! {
                r = run => r,
                _ = g.relay_verdict() => unreachable!("the gate's relay never ends"),
            },
            None => run.await,
        };
        drop(gate);
        match ran {
            Ok(()) => {}
            Err((Outcome::Cancelled, _)) => {
                return Err(DriverError::Cancelled(
                    "stateful start (the container is stopped; its state is kept)".into(),
                ))
            }
            Err((_, e)) => return Err(e),
        }
        let pid = InitRecord::read(&l.criu_pidfile)
            .ok_or_else(|| {
                DriverError::WrongState(format!(
                    "criu restore wrote no pidfile at {}",
                    pidfile.display()
                ))
            })?
            .pid;
        let rec = InitRecord::of_pid(pid).ok_or_else(|| {
            DriverError::WrongState(format!("restored init {pid} exited right away"))
        })?;
        rec.write(&l.pidfile)
            .map_err(DriverError::io(format!("write {}", l.pidfile.display())))?;
        let _ = std::fs::remove_file(&l.criu_pidfile);
        tracing::info!(container = %spec.name, ms = t0.elapsed().as_millis() as u64, pid, "criu restore done");
        if let Some(cg) = cg {
            reattach(cg, pid);
        }
        if !procfs::check_running(&rec) {
            return Err(DriverError::WrongState(format!(
                "restored init {pid} died; see {}",
                l.restore_log.display()
            )));
        }
        Ok(rec)
    }

    /// After a failed or interrupted restore: kill whatever was restored.
    pub(super) async fn kill_partial_restore(&self, l: &Layout, cg: Option<&Cgroup>) {
        // criu's pidfile holds a bare pid written moments ago; ours has a start time.
        let recs = [&l.pidfile, &l.criu_pidfile]
            .into_iter()
            .filter_map(|f| InitRecord::read(f));
        for rec in recs {
            if procfs::check_running(&rec) {
                let _ = kill(Pid::from_raw(rec.pid as i32), Signal::SIGKILL);
                let _ = Self::wait_gone(&rec, self.timeouts.kill).await;
            }
        }
        if let Some(cg) = cg {
            cg.kill_all();
        }
    }
}

/// How [`ContainerDriver::run_restore`] runs `criu restore`.
#[derive(Debug)]
pub(super) enum RestoreMode {
    /// Every image in place.
    Plain,
    /// `--lazy-pages`: memory comes from a lazy-pages daemon.
    Lazy,
    /// Pages still arriving: held at the gate before reading them.
    Gated(super::gate::PagesGate),
}

/// How much a gated restore's `criu` is niced while it waits for the pages
/// (it sets up with time to spare; the page transfer is the critical path).
/// `FERRY_GATED_NICE=0` turns it off, for comparisons.
const GATED_NICE: i32 = 10;

fn gated_nice() -> i32 {
    std::env::var("FERRY_GATED_NICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(GATED_NICE)
        .clamp(0, 19)
}
