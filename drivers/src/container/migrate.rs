//! Live migration primitives: the daemon moves a running container between
//! members with these; it owns the channels, this module only runs CRIU.
//!
//! Source side:
//! 1. [`ContainerDriver::migrate_dump`]: the final `criu dump --leave-stopped`;
//!    metadata images into a directory, memory pages into it too or to a
//!    page server on the target ([`ContainerDriver::page_server`]). The tree
//!    is left *stopped*, not killed.
//! 2. then either [`ContainerDriver::migrate_finish_source`] (the move
//!    succeeded: kill the stopped tree, clean up the host) or
//!    [`ContainerDriver::migrate_resume_source`] (it failed or was cancelled:
//!    the same processes run on, same pid).
//!
//! Post-copy moves (the container runs on the target before its memory
//! arrived) have their own primitives in [`super::lazy`].
//!
//! Target side: [`ContainerDriver::page_server`] before the dump,
//! [`ContainerDriver::migrate_restore`] once the rootfs and every image are
//! in place.
//!
//! What CRIU 4.2.1 does here (measured on this host kind):
//! - `--leave-stopped`: after a successful dump every task of the tree is in
//!   state `T` (SIGSTOP'ed when CRIU detaches); a SIGCONT to each task
//!   resumes it (SIGCONT acts at generation, so also on the pid-namespace
//!   init, which otherwise ignores signals from outside without a handler).
//! - `network-lock nftables` (`/etc/criu/default.conf`): the dump adds the
//!   table `inet CRIU-<first 21 chars of the dump's run id>` to the
//!   container's network namespace (input and output chains with policy
//!   drop except CRIU's own mark). CRIU deletes it itself when a dump fails
//!   or with `--leave-running`, but *keeps* it after a successful
//!   `--leave-stopped` dump, and CRIU has no command to unlock later: we
//!   delete it with `nft` inside the container's netns on resume. The same
//!   table is also saved in the dump's `nftables-*.img`; the restore knows
//!   the dump's run id (inventory `dump_criu_run_id`) and removes it on the
//!   target itself.
//! - A failed dump (CRIU error, lost page-server connection) leaves the
//!   tree running and unlocked; CRIU being killed (our timeout) may not, so
//!   every failure path runs the resume steps as well.
//! - `criu page-server` refuses `--port 0`: we pick a free port, start it
//!   with `--status-fd` (one NUL byte once it listens) and retry with
//!   another port when the bind fails. It serves exactly one dump
//!   connection and exits when that closes. Anyone on the host can connect
//!   to that port first.
//! - Over TCP, even on loopback, the dump's end of the page-server
//!   conversation stalls on Nagle + delayed ACK: ~190 ms of extra freeze
//!   for a tiny container (the final "disconnect" waits for the last small
//!   writes). Both `criu dump` and `criu page-server` accept an already
//!   connected socket instead (`--ps-socket FD`): with a unix socketpair
//!   at each end and the daemon relaying the other ends
//!   ([`PagesTo::Socket`], [`ContainerDriver::page_server_on_socket`]) the
//!   stall is gone and no port is opened.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::criu::{self, Outcome, PageEndpoint};
use super::gate::PagesGate;
use super::procfs::{self, InitRecord};
use super::state::{mkdirs, RestoreMode};
use super::{remove_if_exists, ContainerDriver, Layout};
use crate::*;

/// File in the run dir while the tree is left stopped by a move's dump;
/// holds the name of the nftables table that locks its network.
pub(super) const DUMPED_MARKER: &str = "migrate-dumped";
/// Log of the page server, kept in its images directory (and moved to the
/// instance's logs by [`ContainerDriver::migrate_restore`]).
const PAGE_SERVER_LOG: &str = "page-server.log";

/// Where [`ContainerDriver::migrate_dump_with`] sends the memory pages.
#[derive(Debug)]
pub enum PagesTo {
    /// Into the images directory, with the metadata.
    Files,
    /// To a `criu page-server` listening on TCP.
    PageServer(SocketAddr),
    /// Over this connected stream socket (e.g. one end of a unix
    /// socketpair whose other end the daemon relays to the target's
    /// [`ContainerDriver::page_server_on_socket`]). Preferred: on TCP CRIU's
    /// small writes meet Nagle + delayed ACKs (~190 ms of extra freeze
    /// measured on loopback); a unix socket has none, and no port is open.
    Socket(OwnedFd),
}

/// What the final dump of a move did.
#[derive(Debug, Clone)]
pub struct DumpInfo {
    /// When `criu dump` was started: the tasks are frozen from (about) here
    /// until the restore on the target is done.
    pub frozen_at: Instant,
    /// How long `criu dump` ran.
    pub dump_time: Duration,
    /// CRIU's own measure of the time the tasks were frozen during the dump
    /// (`stats-dump`), if readable.
    pub criu_frozen: Option<Duration>,
    /// Memory pages written (to `images_dir` or to the page server).
    pub pages_written: Option<u64>,
    /// Bytes of the image files in `images_dir` (the metadata, plus the
    /// pages when no page server was used): what the daemon has to ship.
    pub image_bytes: u64,
    /// The nftables table CRIU left in the container's network namespace.
    pub network_lock: Option<String>,
}

impl ContainerDriver {
    /// Final CRIU dump of the running container for a move: the tasks are
    /// left stopped; metadata images go to `images_dir`, memory pages to the
    /// page server at `page_server` (see [`ContainerDriver::page_server`])
    /// or to `images_dir`.
    ///
    /// Refused while an exec session runs (CRIU would not save it). Not
    /// interruptible by `ctx` once CRIU runs (killing `criu dump` while its
    /// parasite is inside a task can kill the task); to abort a dump that
    /// streams to a page server, cut that connection: CRIU then fails and
    /// resumes the tree. On any failure the container runs on.
    pub async fn migrate_dump(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        page_server: Option<SocketAddr>,
        ctx: &OpCtx,
    ) -> Result<DumpInfo, DriverError> {
        let pages = match page_server {
            Some(addr) => PagesTo::PageServer(addr),
            None => PagesTo::Files,
        };
        self.migrate_dump_with(spec, images_dir, pages, ctx).await
    }

    /// [`ContainerDriver::migrate_dump`] with any [`PagesTo`].
    pub async fn migrate_dump_with(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        pages: PagesTo,
        ctx: &OpCtx,
    ) -> Result<DumpInfo, DriverError> {
        self.migrate_dump_after(spec, images_dir, pages, None, ctx)
            .await
    }

    /// [`migrate_dump_with`](Self::migrate_dump_with) after pre-dumps
    /// ([`predump`](super::predump)): `parent` is the last pre-dump's
    /// directory relative to `images_dir`; only the pages changed since
    /// then are sent.
    pub async fn migrate_dump_after(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        pages: PagesTo,
        parent: Option<&Path>,
        ctx: &OpCtx,
    ) -> Result<DumpInfo, DriverError> {
        let l = Layout::of(spec);
        let rec = self.check_dumpable(spec).await?;
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("move (nothing was dumped; the container is still running)")?;
        mkdirs(&[images_dir, &spec.paths.logs, &spec.paths.run])?;
        let stats_img = images_dir.join("stats-dump");
        remove_if_exists(&stats_img)
            .map_err(DriverError::io(format!("remove {}", stats_img.display())))?;
        ctx.progress("stage", "dumping container state");
        // criu inherits the socket as fd 3.
        let (endpoint, fds) = match &pages {
            PagesTo::Files => (None, vec![]),
            PagesTo::PageServer(addr) => (Some(PageEndpoint::Tcp(*addr)), vec![]),
            PagesTo::Socket(sock) => (Some(PageEndpoint::Fd(3)), vec![(sock.as_raw_fd(), 3)]),
        };
        let mut args = criu::migrate_dump_args(rec.pid, images_dir, &l.dump_log, endpoint);
        if parent.is_some() {
            args.extend(criu::incremental_args(parent));
        }
        let frozen_at = Instant::now();
        let r = criu::run_with(&bin, &args, &l.dump_log, self.timeouts.dump, None, &fds, 0).await;
        // Our copy of the socket must go, or the relay never sees EOF.
        drop(pages);
        let dump_time = frozen_at.elapsed();
        let lock = std::fs::read_to_string(&l.dump_log)
            .ok()
            .and_then(|t| criu::run_id_in_log(&t))
            .map(|id| criu::nft_lock_table(&id));
        if let Err((outcome, e)) = r {
            // CRIU resumes the tree and unlocks its network after its own
            // failures; not if it was killed (timeout). Make sure.
            if outcome != Outcome::Exited || self.tree_stopped(rec.pid) {
                if let Err(re) = self.resume_tree(&rec, lock.as_deref()).await {
                    tracing::warn!(container = %spec.name, "resume after failed dump: {re}");
                }
            }
            let alive = procfs::check_running(&rec) && !self.tree_stopped(rec.pid);
            let what = if alive {
                "the container is still running"
            } else {
                "the container is no longer running"
            };
            tracing::warn!(container = %spec.name, "migration dump failed, {what}: {e}");
            return Err(match e {
                DriverError::Command { program, detail } => DriverError::Command {
                    program,
                    detail: format!("{detail}\n{what}"),
                },
                DriverError::Timeout(m) => DriverError::Timeout(format!("{m}; {what}")),
                other => other,
            });
        }
        // CRIU queues SIGSTOP and detaches: the tasks stop as they leave
        // the kernel, a moment after criu exits. Report only once they have.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.tree_all_stopped(rec.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if !self.tree_all_stopped(rec.pid) {
            tracing::warn!(container = %spec.name, "tasks not all stopped 2s after the dump");
        }
        let marker = spec.paths.run.join(DUMPED_MARKER);
        if let Err(e) = std::fs::write(&marker, lock.as_deref().unwrap_or("")) {
            let _ = self.resume_tree(&rec, lock.as_deref()).await;
            return Err(DriverError::io(format!(
                "write {} (the container was resumed)",
                marker.display()
            ))(e));
        }
        let stats = std::fs::read(&stats_img)
            .ok()
            .and_then(|b| criu::parse_dump_stats(&b))
            .unwrap_or_default();
        let info = DumpInfo {
            frozen_at,
            dump_time,
            criu_frozen: stats.frozen_us.map(Duration::from_micros),
            pages_written: stats.pages_written,
            image_bytes: dir_bytes(images_dir),
            network_lock: lock,
        };
        tracing::info!(
            container = %spec.name,
            ms = dump_time.as_millis() as u64,
            pages = info.pages_written.unwrap_or(0),
            image_bytes = info.image_bytes,
            pages = ?endpoint,
            "container dumped for a move (left stopped)"
        );
        Ok(info)
    }

    /// After a failed or cancelled move: the tree left stopped by
    /// [`ContainerDriver::migrate_dump`] runs on, as the same processes:
    /// CRIU's network lock is removed from the container's netns and every
    /// task gets SIGCONT. (A task that was already stopped before the dump
    /// is continued too.)
    pub async fn migrate_resume_source(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<(), DriverError> {
        let rec = self.running_record(spec).ok_or_else(|| {
            DriverError::WrongState(format!(
                "container {} is not running on this member: nothing to resume",
                spec.name
            ))
        })?;
        if spec.paths.run.join(super::lazy::SERVED_MARKER).exists() {
            return Err(DriverError::WrongState(format!(
                "container {} was restored on the target of a post-copy move and its memory is \
                 being served from here: it can no longer resume on this member; finish the move \
                 (migrate_lazy_finish_source) and stop it on the target instead",
                spec.name
            )));
        }
        ctx.progress("stage", "resuming container on the source");
        let marker = spec.paths.run.join(DUMPED_MARKER);
        let lock = std::fs::read_to_string(&marker)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        self.resume_tree(&rec, lock.as_deref()).await?;
        if !procfs::check_running(&rec) {
            return Err(DriverError::WrongState(format!(
                "container {} died while it was stopped for the move",
                spec.name
            )));
        }
        remove_if_exists(&marker)
            .map_err(DriverError::io(format!("remove {}", marker.display())))?;
        tracing::info!(container = %spec.name, pid = rec.pid, "container resumed on the source");
        Ok(())
    }

    /// After a successful move: kill the stopped tree and undo the host
    /// set-up (rootfs mount, cgroup, pidfiles). The volume is left to the
    /// caller.
    pub async fn migrate_finish_source(
        &self,
        spec: &InstanceSpec,
        ctx: &OpCtx,
    ) -> Result<(), DriverError> {
        ctx.progress("stage", "removing the container from the source");
        if let Some(rec) = self.running_record(spec) {
            // SIGKILL works on stopped tasks; SIGTERM would wait for a SIGCONT.
            self.terminate(&rec, true).await?;
        }
        self.cleanup_host(spec).await?;
        for m in [DUMPED_MARKER, super::lazy::SERVED_MARKER] {
            let marker = spec.paths.run.join(m);
            remove_if_exists(&marker)
                .map_err(DriverError::io(format!("remove {}", marker.display())))?;
        }
        tracing::info!(container = %spec.name, "moved container removed from the source");
        Ok(())
    }

    /// Target side: start a `criu page-server` writing into `images_dir`,
    /// listening on 127.0.0.1 (a free port chosen here). It serves one dump
    /// and exits; dropping the handle kills it.
    pub async fn page_server(
        &self,
        images_dir: &Path,
        ctx: &OpCtx,
    ) -> Result<PageServer, DriverError> {
        let bin = criu::checked_criu().await?;
        mkdirs(&[images_dir])?;
        let log = images_dir.join(PAGE_SERVER_LOG);
        let mut last = String::new();
        for attempt in 0..8 {
            ctx.check_cancelled("page server (nothing was started)")?;
            let addr = free_port()?;
            match spawn_page_server(&bin, images_dir, PageEndpoint::Tcp(addr), None, None, &log)
                .await?
            {
                Ok(child) => {
                    tracing::info!(%addr, dir = %images_dir.display(), "criu page-server listening");
                    return Ok(PageServer {
                        child,
                        addr: Some(addr),
                        images_dir: images_dir.to_path_buf(),
                        log,
                    });
                }
                Err(detail) if detail.contains("Address already in use") => {
                    tracing::debug!(attempt, %addr, "page-server port taken, retrying");
                    last = detail;
                }
                Err(detail) => {
                    return Err(DriverError::Command {
                        program: "criu page-server".into(),
                        detail,
                    })
                }
            }
        }
        Err(DriverError::Command {
            program: "criu page-server".into(),
            detail: format!("no free port after 8 attempts: {last}"),
        })
    }

    /// Target side: a `criu page-server` serving the dump that arrives over
    /// `sock`, a connected stream socket (see [`PagesTo::Socket`]); it exits
    /// when the dump is done or the socket closes.
    pub async fn page_server_on_socket(
        &self,
        images_dir: &Path,
        sock: OwnedFd,
        ctx: &OpCtx,
    ) -> Result<PageServer, DriverError> {
        self.page_server_after(images_dir, sock, None, ctx).await
    }

    /// [`page_server_on_socket`](Self::page_server_on_socket) for a dump
    /// after pre-dumps: `parent` (relative to `images_dir`) is where the
    /// last pre-dump's images were received; CRIU links it as
    /// `images_dir/parent` for the restore.
    pub async fn page_server_after(
        &self,
        images_dir: &Path,
        sock: OwnedFd,
        parent: Option<&Path>,
        ctx: &OpCtx,
    ) -> Result<PageServer, DriverError> {
        let bin = criu::checked_criu().await?;
        mkdirs(&[images_dir])?;
        ctx.check_cancelled("page server (nothing was started)")?;
        let log = images_dir.join(PAGE_SERVER_LOG);
        // criu inherits the socket as fd 4 (3 is its status fd).
        let r = spawn_page_server(
            &bin,
            images_dir,
            PageEndpoint::Fd(4),
            Some(sock.as_raw_fd()),
            parent,
            &log,
        )
        .await?;
        drop(sock);
        let child = r.map_err(|detail| DriverError::Command {
            program: "criu page-server".into(),
            detail,
        })?;
        Ok(PageServer {
            child,
            addr: None,
            images_dir: images_dir.to_path_buf(),
            log,
        })
    }

    /// Target side: restore the container from `images_dir` (metadata and
    /// pages, whichever way they came) onto the received rootfs at
    /// `spec.paths.volume/rootfs` (bound at this member's `run/rootfs`), as a normal running container of this
    /// member (pidfile, cgroup). `images_dir` is removed on success and kept
    /// on failure (the caller removes it with the rest of the target's
    /// leftovers); on failure whatever was restored is killed and the host
    /// set-up undone.
    pub async fn migrate_restore(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        self.restore_moved(spec, images_dir, RestoreMode::Plain, ctx)
            .await
    }

    /// [`migrate_restore`](Self::migrate_restore) started while the memory
    /// pages are still arriving: every other image must be in place; the
    /// restore sets the container up and waits at `gate` before it reads
    /// any page (see the `gate` module). A refused or dropped opener
    /// aborts it: nothing is left running, the images stay.
    pub async fn migrate_restore_gated(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        gate: PagesGate,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        self.restore_moved(spec, images_dir, RestoreMode::Gated(gate), ctx)
            .await
    }

    async fn restore_moved(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        mode: RestoreMode,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let l = self.check_restorable(spec, images_dir)?;
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("restore on the target (nothing was restored)")?;
        ctx.progress("stage", "restoring container");
        self.cleanup_host(spec).await?;
        mkdirs(&[&spec.paths.run, &spec.paths.logs])?;
        let cg = self.setup_cgroup(spec)?;
        match self
            .run_restore(spec, images_dir, &bin, cg.as_ref(), ctx, mode)
            .await
        {
            Ok(rec) => {
                tracing::info!(container = %spec.name, pid = rec.pid, "container restored from a move");
                let ps_log = images_dir.join(PAGE_SERVER_LOG);
                if ps_log.is_file() {
                    let _ = std::fs::rename(&ps_log, spec.paths.logs.join(PAGE_SERVER_LOG));
                }
                if let Err(e) = super::discard_dir(images_dir) {
                    tracing::warn!("cannot remove {}: {e}", images_dir.display());
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

    /// The init of a container a move may dump now: running, not already
    /// dumped, and no processes outside its tree (exec sessions).
    pub(super) async fn check_dumpable(
        &self,
        spec: &InstanceSpec,
    ) -> Result<InitRecord, DriverError> {
        let rec = self.running_record(spec).ok_or_else(|| {
            DriverError::WrongState(format!("container {} is not running", spec.name))
        })?;
        if spec.paths.run.join(DUMPED_MARKER).exists() {
            return Err(DriverError::WrongState(format!(
                "container {} is already stopped by a move's dump; resume or finish that move first",
                spec.name
            )));
        }
        procfs::ensure_no_strays(&spec.name, rec.pid, "move the container statelessly")?;
        Ok(rec)
    }

    /// Checks before a move's restore: not running here, images and
    /// rootfs in place.
    pub(super) fn check_restorable(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
    ) -> Result<Layout, DriverError> {
        let l = Layout::of(spec);
        if let Some(rec) = self.running_record(spec) {
            return Err(DriverError::WrongState(format!(
                "container {} is already running on this member (pid {})",
                spec.name, rec.pid
            )));
        }
        if !images_dir.join("inventory.img").is_file() {
            return Err(DriverError::WrongState(format!(
                "no CRIU images in {} to restore container {} from",
                images_dir.display(),
                spec.name
            )));
        }
        if !l.volume_rootfs.is_dir() {
            return Err(DriverError::WrongState(format!(
                "container {} has no root filesystem at {}",
                spec.name,
                l.volume_rootfs.display()
            )));
        }
        Ok(l)
    }

    /// Whether any task of the tree at `init` is stopped (`T`).
    pub(super) fn tree_stopped(&self, init: u32) -> bool {
        procfs::tree_pids(init)
            .into_iter()
            .any(|p| procfs::read_stat(p).is_some_and(|st| st.state == 'T'))
    }

    /// Whether every task of the tree at `init` is stopped (`T`).
    pub(super) fn tree_all_stopped(&self, init: u32) -> bool {
        procfs::tree_pids(init)
            .into_iter()
            .all(|p| procfs::read_stat(p).is_none_or(|st| matches!(st.state, 'T' | 'Z' | 'X')))
    }

    /// Unlock the network (CRIU's nftables table `lock`, or any `CRIU-*`
    /// table when the name is unknown) and SIGCONT every task of the tree.
    pub(super) async fn resume_tree(
        &self,
        rec: &InitRecord,
        lock: Option<&str>,
    ) -> Result<(), DriverError> {
        let removed = remove_lock_tables(rec.pid, lock).await;
        let pids = procfs::tree_pids(rec.pid);
        for &p in &pids {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGCONT);
        }
        // SIGCONT takes effect at once; give the scheduler a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.tree_stopped(rec.pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let removed = removed?;
        tracing::debug!(pid = rec.pid, tasks = pids.len(), ?removed, "tree resumed");
        if self.tree_stopped(rec.pid) {
            return Err(DriverError::WrongState(format!(
                "container init {} is still stopped after SIGCONT",
                rec.pid
            )));
        }
        Ok(())
    }
}

/// Delete CRIU's network-lock tables from the netns of `pid`: the named
/// one, or every `inet CRIU-*` table when `name` is None. Returns the
/// tables removed.
pub(crate) async fn remove_lock_tables(
    pid: u32,
    name: Option<&str>,
) -> Result<Vec<String>, DriverError> {
    let tables = nft_in_netns(pid, &["list", "tables", "inet"]).await?;
    let mut removed = Vec::new();
    for t in lock_tables_in(&tables, name) {
        nft_in_netns(pid, &["delete", "table", "inet", &t]).await?;
        removed.push(t);
    }
    Ok(removed)
}

/// CRIU lock tables in `nft list tables inet` output.
fn lock_tables_in(list: &str, name: Option<&str>) -> Vec<String> {
    list.lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .map(str::trim)
        .filter(|t| match name {
            Some(n) => *t == n,
            None => t.starts_with("CRIU-"),
        })
        .map(String::from)
        .collect()
}

/// Run `nft ARGS` in the network namespace of `pid` (setns between fork and
/// exec; the rest of the process context stays the host's).
pub(crate) async fn nft_in_netns(pid: u32, args: &[&str]) -> Result<String, DriverError> {
    let nft = criu::find_tool("nft").ok_or_else(|| DriverError::MissingTool {
        tool: "nft".into(),
        detail: "not found (Debian package nftables); needed to undo CRIU's network lock".into(),
    })?;
    let ns_path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&ns_path).map_err(DriverError::io(format!("open {ns_path}")))?;
    let fd = ns.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&nft);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only setns(2) runs in the child, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .map_err(|_| DriverError::Timeout(format!("nft {} in netns of {pid}", args.join(" "))))?
        .map_err(DriverError::io(format!("run nft in netns of {pid}")))?;
    drop(ns);
    if !out.status.success() {
        return Err(DriverError::Command {
            program: "nft".into(),
            detail: format!(
                "`nft {}` in the netns of pid {pid}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `criu page-server` (target side of a move).
#[derive(Debug)]
pub struct PageServer {
    child: tokio::process::Child,
    addr: Option<SocketAddr>,
    images_dir: PathBuf,
    log: PathBuf,
}

impl PageServer {
    /// Where the dump must connect (`migrate_dump(.., Some(addr), ..)`, or
    /// the daemon's relay); None for [`ContainerDriver::page_server_on_socket`].
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    pub fn images_dir(&self) -> &Path {
        &self.images_dir
    }

    /// Wait until the page server exits (after the dump's connection
    /// closed); an error if it failed. Not bounded: race it against the
    /// dump or a timeout; dropping the future kills the server.
    pub async fn wait(mut self) -> Result<(), DriverError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(DriverError::io("wait for criu page-server"))?;
        if status.success() {
            return Ok(());
        }
        Err(DriverError::Command {
            program: "criu page-server".into(),
            detail: format!("exited with {status}{}", criu::log_tail(&self.log)),
        })
    }
}

/// A port on 127.0.0.1 nobody listens on right now (it may be taken before
/// CRIU binds it: the caller retries).
pub(super) fn free_port() -> Result<SocketAddr, DriverError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(DriverError::io("find a free port for criu page-server"))?;
    l.local_addr()
        .map_err(DriverError::io("find a free port for criu page-server"))
}

/// Start `criu page-server` at `ep` and wait until it is ready; `sock`
/// (with `PageEndpoint::Fd(4)`) is inherited as fd 4.
/// Outer error: could not run at all; inner error: criu failed (detail).
async fn spawn_page_server(
    bin: &Path,
    images: &Path,
    ep: PageEndpoint,
    sock: Option<i32>,
    parent: Option<&Path>,
    log: &Path,
) -> Result<Result<tokio::process::Child, String>, DriverError> {
    let args = criu::page_server_args(images, ep, parent, log);
    let what = format!("page-server on {ep:?}");
    spawn_ready(bin, &args, sock, log, Duration::from_secs(30), &what).await
}

/// Run `criu ARGS` with fd 3 as its `--status-fd` (and `sock`, if any, as
/// fd 4) and wait up to `within` for the NUL byte CRIU writes when ready.
/// Outer error: could not run at all, or not ready in time (criu was then
/// killed: `DriverError::Timeout`); inner error: criu exited before getting
/// ready (detail, with its stderr and log tail).
pub(super) async fn spawn_ready(
    bin: &Path,
    args: &[std::ffi::OsString],
    sock: Option<i32>,
    log: &Path,
    within: Duration,
    what: &str,
) -> Result<Result<tokio::process::Child, String>, DriverError> {
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| DriverError::io("pipe")(e.into()))?;
    let mut pairs = [(wr.as_raw_fd(), 3), (-1, -1)];
    let n = match sock {
        Some(fd) => {
            pairs[1] = (fd, 4);
            2
        }
        None => 1,
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: place_fds only calls fcntl/dup2: fd 3 is the status fd criu
    // writes to, fd 4 the page socket.
    unsafe {
        cmd.pre_exec(move || criu::place_fds(&pairs[..n]));
    }
    let mut child = cmd
        .spawn()
        .map_err(DriverError::io(format!("run {} {what}", bin.display())))?;
    drop(wr);
    let ready =
        tokio::time::timeout(within, tokio::task::spawn_blocking(move || read_status(rd))).await;
    match ready {
        Ok(Ok(true)) => Ok(Ok(child)),
        Ok(Ok(false)) => {
            let status = child.wait().await.ok();
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut stderr).await;
            }
            let tail = criu::log_tail(log);
            Ok(Err(format!(
                "criu {what} exited ({}) before getting ready: {}{tail}",
                status.map(|s| s.to_string()).unwrap_or_default(),
                stderr.trim()
            )))
        }
        Ok(Err(e)) => Err(DriverError::Io {
            context: format!("criu {what} status task"),
            source: std::io::Error::other(e),
        }),
        Err(_) => {
            let _ = child.kill().await;
            Err(DriverError::Timeout(format!(
                "criu {what} was not ready within {}s (killed); see {}",
                within.as_secs(),
                log.display()
            )))
        }
    }
}

/// Read CRIU's status fd: true once the NUL byte arrives, false on EOF
/// (criu exited without getting ready).
pub(super) fn read_status(rd: OwnedFd) -> bool {
    use std::io::Read;
    let mut f = std::fs::File::from(rd);
    let mut b = [0u8; 1];
    loop {
        match f.read(&mut b) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Total size of the regular files directly in `dir`.
pub(super) fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lock_tables() {
        let list =
            "table inet CRIU-771bd155-dfb2-4cc4-85\ntable inet filter\ntable inet CRIU-aaaa\n";
        assert_eq!(
            lock_tables_in(list, Some("CRIU-771bd155-dfb2-4cc4-85")),
            vec!["CRIU-771bd155-dfb2-4cc4-85"]
        );
        assert_eq!(
            lock_tables_in(list, None),
            vec!["CRIU-771bd155-dfb2-4cc4-85", "CRIU-aaaa"]
        );
        assert!(lock_tables_in("", None).is_empty());
    }

    #[test]
    fn free_ports_differ_from_zero() {
        let a = free_port().unwrap();
        assert!(a.port() != 0 && a.ip().is_loopback());
    }
}
