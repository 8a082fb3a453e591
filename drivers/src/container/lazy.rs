//! Post-copy ("lazy") container moves: the container resumes on the target
//! first and its memory follows on demand (CRIU `--lazy-pages`, userfaultfd).
//!
//! ```text
//!  source (member A)                      daemon(s)                 target (member B)
//!  migrate_dump_lazy ──criu dump --lazy-pages --leave-stopped──┐
//!    tasks frozen; metadata images written                     │
//!    status fd: NUL  ──► Ok(LazyDump)  (images complete) ──ship images──► images_dir
//!    criu dump now serves pages (TCP port or --ps-socket)            lazy_pages(images_dir, from)
//!                                                                    criu lazy-pages --page-server
//!                                                                    status fd: NUL (socket ready)
//!                                                                    migrate_restore_lazy
//!                                   ◄──── page requests (relayed) ── criu restore --lazy-pages
//!                                                                    tasks RUN here, fault pages in
//!  LazyDump::commit  ◄── "restored" ────────────────────────────────  Ok  (source can't resume now)
//!  migrate_lazy_finish_source: wait dump exit          LazyPages::wait: every page fetched
//!    (= every page served), kill the stopped tree, clean up
//! ```
//!
//! Failure before the target restored: `migrate_lazy_abort_source` hangs up
//! the page connection (the serving dump sees EOF and exits, leaving the
//! tree stopped) and resumes the tree like [`ContainerDriver::migrate_resume_source`].
//! After the target restored ([`LazyDump::commit`]) the source must never
//! run again: `migrate_resume_source` refuses, and every task got a
//! SIGSTOP, so even if CRIU resumes the tree after a broken page stream
//! (it does, on a send error) the tasks stop at once; the finish kills them.
//! A page stream that breaks after the restore leaves the target's tasks
//! without part of their memory: the caller must then stop the container on
//! the target (LazyPages::wait reports the error).
//!
//! What CRIU 4.2.1 does (read in its source, checked here):
//! - `criu dump --lazy-pages` writes every image (and the few pages it never
//!   serves lazily, e.g. stacks, into `pages-*.img`), then runs a page
//!   server in the dump process itself: `--address/--port` to listen, or
//!   `--ps-socket FD` for a connected socket; `--status-fd` gets its NUL
//!   byte right before it starts serving, so it marks "images complete".
//!   No `--page-server` on the dump (that makes it a client).
//! - The serving dump treats EOF on the page connection as the end of the
//!   transfer (exit 0) whether or not every page was fetched, so a dump's
//!   exit status says nothing about the target: `LazyPages::wait` does.
//!   With `--leave-stopped` the tree is then left stopped (without it CRIU
//!   would kill the tree on a hang-up: never lazy-dump without it).
//! - `criu lazy-pages` reads `pstree.img` and the pagemaps at start (images
//!   must be shipped first), listens on `lazy-pages.socket` in the images
//!   dir (status fd then), receives the restore's userfaultfds and only
//!   then connects to the page source; it exits 0 once all pages arrived.
//! - `criu restore --lazy-pages` hangs if the lazy-pages daemon or the page
//!   source dies mid-way: bounded by `Timeouts::lazy_restore`, and aborted
//!   at once when the lazy-pages daemon exits with an error.
//! - Feature names: `criu check --feature uffd-noncoop` (there is no
//!   `lazy_pages` feature); pre-dump needs `mem_dirty_track`.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::criu::{self, PageEndpoint};
use super::migrate::{dir_bytes, free_port, spawn_ready, DUMPED_MARKER};
use super::procfs::{self, InitRecord};
use super::state::mkdirs;
use super::{remove_if_exists, ContainerDriver, DumpInfo, Layout};
use crate::*;

/// In the run dir once the target of a post-copy move restored: the source
/// tree must never resume (its memory is being served to the target).
pub(super) const SERVED_MARKER: &str = "migrate-lazy-committed";
/// Log of `criu lazy-pages`, in its images dir (moved to the instance's
/// logs once every page arrived).
const LAZY_PAGES_LOG: &str = "lazy-pages.log";
/// The unix socket `criu lazy-pages` and `criu restore` meet on (CRIU's
/// fixed name, in the images/work dir).
const LAZY_SOCKET: &str = "lazy-pages.socket";
/// Minimum `fs.pipe-max-size` for lazy pages (CRIU's page pipes; measured:
/// smaller values fail on this host kind).
const MIN_PIPE_MAX: u64 = 4 << 20;

/// How the source's lazy dump serves the pages.
#[derive(Debug)]
pub enum LazyServe {
    /// Listen on a free 127.0.0.1 port ferry picks
    /// ([`LazyDump::addr`]); the daemon relays it to the target.
    Tcp,
    /// Over this connected stream socket (`--ps-socket`; e.g. one end of a
    /// unix socketpair the daemon relays): no port, nobody else can connect.
    Socket(OwnedFd),
}

/// Where the target's `criu lazy-pages` fetches pages from.
#[derive(Debug)]
pub enum LazyFrom {
    /// Connect to this TCP address (e.g. the daemon's local relay listener).
    Tcp(SocketAddr),
    /// This connected stream socket (`--ps-socket`).
    Socket(OwnedFd),
}

/// Whether this host can take part in post-copy moves and pre-dumps; each
/// `Err` says why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationFeatures {
    pub lazy_pages: Result<(), String>,
    pub pre_dump: Result<(), String>,
}

/// What the source's lazy dump did while serving.
#[derive(Debug, Clone)]
pub struct LazyServed {
    /// From the images being complete to the dump's exit. (CRIU's
    /// `stats-dump` of a lazy dump is useless here: 0 pages written and a
    /// bogus frozen time.)
    pub serving: Duration,
}

/// A running lazy dump (source side). Dropping it kills `criu dump`
/// (the tree is then left as CRIU leaves it: call
/// `migrate_lazy_abort_source` or `migrate_lazy_finish_source` instead).
#[derive(Debug)]
pub struct LazyDump {
    child: tokio::process::Child,
    exited: Option<ExitStatus>,
    info: DumpInfo,
    ready_at: Instant,
    addr: Option<SocketAddr>,
    /// Our duplicate of the page socket: shutting it down hangs up.
    sock: Option<OwnedFd>,
    rec: InitRecord,
    run: PathBuf,
    images: PathBuf,
    log: PathBuf,
    committed: bool,
}

impl LazyDump {
    /// The dump up to "images complete": `frozen_at`, `dump_time` (start to
    /// ready), `image_bytes` (what to ship), `network_lock`.
    pub fn info(&self) -> &DumpInfo {
        &self.info
    }

    /// Where the dump listens for the target's lazy-pages daemon
    /// ([`LazyServe::Tcp`]); None with a socket.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The `criu dump` process (None once it exited).
    pub fn pid(&self) -> Option<u32> {
        self.exited.is_none().then(|| self.child.id()).flatten()
    }

    /// Where the images went (ship all of them once this handle exists).
    pub fn images_dir(&self) -> &Path {
        &self.images
    }

    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// The target restored: from now on the source tree must not run again.
    /// Records it in the run dir (so `migrate_resume_source` refuses) and
    /// queues a SIGSTOP to every task (CRIU resumes the tree by itself if
    /// serving fails with an error; the tasks then stop at once instead of
    /// running next to the target's copy). Idempotent.
    pub fn commit(&mut self) {
        if self.committed {
            return;
        }
        self.committed = true;
        let marker = self.run.join(SERVED_MARKER);
        if let Err(e) = std::fs::write(&marker, b"") {
            tracing::warn!("cannot write {}: {e}", marker.display());
        }
        for p in procfs::tree_pids(self.rec.pid) {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGSTOP);
        }
        tracing::info!(
            pid = self.rec.pid,
            "lazy move committed: the source will not resume"
        );
    }

    /// Wait until `criu dump` exits: the target's lazy-pages daemon hung up,
    /// normally after fetching every page (see the module doc: only
    /// [`LazyPages::wait`] proves that). Not bounded; cancel-safe.
    pub async fn wait(&mut self) -> Result<LazyServed, DriverError> {
        let status = match self.exited {
            Some(s) => s,
            None => {
                let s = self
                    .child
                    .wait()
                    .await
                    .map_err(DriverError::io("wait for criu dump --lazy-pages"))?;
                self.exited = Some(s);
                // Let the relay see EOF from this side too.
                self.sock = None;
                s
            }
        };
        if !status.success() {
            return Err(DriverError::Command {
                program: "criu dump --lazy-pages".into(),
                detail: format!(
                    "serving pages failed: exited with {status}{}",
                    criu::log_tail(&self.log)
                ),
            });
        }
        Ok(LazyServed {
            serving: self.ready_at.elapsed(),
        })
    }

    /// Hang up the page connection so that the serving dump sees EOF.
    fn hang_up(&mut self) {
        if let Some(s) = &self.sock {
            let _ = nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        if let Some(addr) = self.addr {
            // Still listening (nobody connected): connect and close. Refused
            // when the target's daemon is connected; it then hangs up itself
            // or the caller's timeout kills the dump.
            let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map(|c| c.shutdown(std::net::Shutdown::Both));
        }
    }

    /// Stop `criu dump` within `grace`: hang up, then SIGKILL.
    async fn end(&mut self, grace: Duration) {
        if self.exited.is_some() {
            return;
        }
        self.hang_up();
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(s)) => self.exited = Some(s),
            _ => {
                tracing::warn!("criu dump --lazy-pages did not end after a hang-up; killing it");
                let _ = self.child.kill().await;
                self.exited = self.child.wait().await.ok();
            }
        }
        self.sock = None;
    }
}

/// A running `criu lazy-pages` daemon (target side). Dropping it kills the
/// daemon (a restored container then loses the pages not fetched yet).
#[derive(Debug)]
pub struct LazyPages {
    child: tokio::process::Child,
    exited: Option<ExitStatus>,
    started: Instant,
    images: PathBuf,
    log: PathBuf,
    /// Set by a successful restore: where the log goes at the end.
    logs_dir: Option<PathBuf>,
}

impl LazyPages {
    /// The `criu lazy-pages` process (None once it exited).
    pub fn pid(&self) -> Option<u32> {
        self.exited.is_none().then(|| self.child.id()).flatten()
    }

    /// Wait until every page arrived (the daemon exits 0); then the images
    /// dir is removed (after a restore) and the log moved to the instance's
    /// logs. An error means the restored container misses memory: stop it.
    /// Returns the time since the daemon started. Not bounded; cancel-safe.
    pub async fn wait(&mut self) -> Result<Duration, DriverError> {
        let status = match self.exited {
            Some(s) => s,
            None => {
                let s = self
                    .child
                    .wait()
                    .await
                    .map_err(DriverError::io("wait for criu lazy-pages"))?;
                self.exited = Some(s);
                s
            }
        };
        if !status.success() {
            return Err(DriverError::Command {
                program: "criu lazy-pages".into(),
                detail: format!(
                    "exited with {status} before every page arrived{}",
                    criu::log_tail(&self.log)
                ),
            });
        }
        if let Some(logs) = &self.logs_dir {
            let _ = std::fs::rename(&self.log, logs.join(LAZY_PAGES_LOG));
            if let Err(e) = remove_if_exists(&self.images) {
                tracing::warn!("cannot remove {}: {e}", self.images.display());
            }
        }
        Ok(self.started.elapsed())
    }

    /// Kill the daemon (e.g. the move is abandoned before the restore).
    pub async fn kill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill().await;
            self.exited = self.child.wait().await.ok();
        }
    }
}

impl ContainerDriver {
    /// Whether post-copy moves can work on this host: criu 4.2.x,
    /// `criu check --feature uffd-noncoop` (userfaultfd with fork/remap
    /// events) and `fs.pipe-max-size` >= 4 MiB.
    pub async fn lazy_pages_support() -> Result<(), DriverError> {
        let bin = criu::checked_criu().await?;
        criu::check_feature(&bin, "uffd-noncoop")
            .await
            .map_err(DriverError::Unsupported)?;
        let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        match pipe_max {
            Some(n) if n >= MIN_PIPE_MAX => Ok(()),
            other => Err(DriverError::Unsupported(format!(
                "post-copy needs fs.pipe-max-size >= {MIN_PIPE_MAX} (is {other:?}): \
                 sysctl -w fs.pipe-max-size={MIN_PIPE_MAX}"
            ))),
        }
    }

    /// Whether iterative pre-dumps can work: `criu check --feature
    /// mem_dirty_track` (soft-dirty bits). Never pre-dump without it: a
    /// failed `criu pre-dump` leaves a parasite mapping in the live tasks.
    pub async fn pre_dump_support() -> Result<(), DriverError> {
        let bin = criu::checked_criu().await?;
        criu::check_feature(&bin, "mem_dirty_track")
            .await
            .map_err(DriverError::Unsupported)
    }

    /// Both checks, for the migration offer.
    pub async fn migration_features(&self) -> MigrationFeatures {
        MigrationFeatures {
            lazy_pages: Self::lazy_pages_support().await.map_err(|e| e.to_string()),
            pre_dump: Self::pre_dump_support().await.map_err(|e| e.to_string()),
        }
    }

    /// Source side of a post-copy move: `criu dump --lazy-pages
    /// --leave-stopped` of the running container. Returns once every image
    /// is in `images_dir` (ship them all to the target now); the dump keeps
    /// running, frozen tree and all, serving pages at `serve` until the
    /// target's lazy-pages daemon hangs up. Bounded by `timeouts.dump` up to
    /// "ready". On failure the container runs on (unlocked).
    ///
    /// Then exactly one of [`ContainerDriver::migrate_lazy_abort_source`]
    /// (the target did not restore) or
    /// [`ContainerDriver::migrate_lazy_finish_source`] (it did).
    pub async fn migrate_dump_lazy(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        serve: LazyServe,
        ctx: &OpCtx,
    ) -> Result<LazyDump, DriverError> {
        let l = Layout::of(spec);
        let rec = self.check_dumpable(spec).await?;
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("move (nothing was dumped; the container is still running)")?;
        mkdirs(&[images_dir, &spec.paths.logs, &spec.paths.run])?;
        for f in ["stats-dump", LAZY_SOCKET] {
            let p = images_dir.join(f);
            remove_if_exists(&p).map_err(DriverError::io(format!("remove {}", p.display())))?;
        }
        let (ep, addr, sock) = match serve {
            LazyServe::Tcp => {
                let a = free_port()?;
                (PageEndpoint::Tcp(a), Some(a), None)
            }
            LazyServe::Socket(s) => (PageEndpoint::Fd(4), None, Some(s)),
        };
        let args = criu::lazy_dump_args(rec.pid, images_dir, &l.dump_log, ep, 3);
        ctx.progress("stage", "dumping container state (post-copy)");
        let frozen_at = Instant::now();
        let r = spawn_ready(
            &bin,
            &args,
            sock.as_ref().map(|s| s.as_raw_fd()),
            &l.dump_log,
            self.timeouts.dump,
            "dump --lazy-pages",
        )
        .await;
        let dump_time = frozen_at.elapsed();
        let lock = std::fs::read_to_string(&l.dump_log)
            .ok()
            .and_then(|t| criu::run_id_in_log(&t))
            .map(|id| criu::nft_lock_table(&id));
        let child = match r {
            Ok(Ok(child)) => child,
            other => {
                // Exited: CRIU resumed and unlocked the tree itself (make
                // sure); killed (timeout): the tasks run on, still locked.
                let killed = matches!(other, Err(DriverError::Timeout(_)));
                if killed || self.tree_stopped(rec.pid) {
                    if let Err(e) = self.resume_tree(&rec, lock.as_deref()).await {
                        tracing::warn!(container = %spec.name, "resume after failed lazy dump: {e}");
                    }
                }
                let alive = procfs::check_running(&rec) && !self.tree_stopped(rec.pid);
                let what = if alive {
                    "the container is still running"
                } else {
                    "the container is no longer running"
                };
                return Err(match other {
                    Ok(Err(detail)) => DriverError::Command {
                        program: "criu dump --lazy-pages".into(),
                        detail: format!("{detail}\n{what}"),
                    },
                    Err(DriverError::Timeout(m)) => DriverError::Timeout(format!("{m}; {what}")),
                    Err(e) => e,
                    Ok(Ok(_)) => unreachable!(),
                });
            }
        };
        let mut dump = LazyDump {
            child,
            exited: None,
            info: DumpInfo {
                frozen_at,
                dump_time,
                criu_frozen: None,
                pages_written: None,
                image_bytes: dir_bytes(images_dir),
                network_lock: lock.clone(),
            },
            ready_at: Instant::now(),
            addr,
            sock,
            rec,
            run: spec.paths.run.clone(),
            images: images_dir.to_path_buf(),
            log: l.dump_log.clone(),
            committed: false,
        };
        let marker = spec.paths.run.join(DUMPED_MARKER);
        if let Err(e) = std::fs::write(&marker, lock.as_deref().unwrap_or("")) {
            dump.end(Duration::from_secs(5)).await;
            let _ = self.resume_tree(&rec, lock.as_deref()).await;
            return Err(DriverError::io(format!(
                "write {} (the container was resumed)",
                marker.display()
            ))(e));
        }
        tracing::info!(
            container = %spec.name,
            ms = dump_time.as_millis() as u64,
            image_bytes = dump.info.image_bytes,
            ?addr,
            "container dumped for a post-copy move; serving its pages"
        );
        Ok(dump)
    }

    /// Source side, the target did NOT restore (failed, cancelled): stop
    /// serving and resume the tree here (same processes, network unlocked).
    /// Refused once the dump was committed ([`LazyDump::commit`]).
    pub async fn migrate_lazy_abort_source(
        &self,
        spec: &InstanceSpec,
        mut dump: LazyDump,
        ctx: &OpCtx,
    ) -> Result<(), DriverError> {
        if dump.committed {
            return Err(DriverError::WrongState(format!(
                "container {} was restored on the target of the post-copy move: it cannot \
                 resume on this member; finish the move instead",
                spec.name
            )));
        }
        dump.end(Duration::from_secs(10)).await;
        tracing::info!(container = %spec.name, status = ?dump.exited, "lazy dump ended; resuming the source");
        self.migrate_resume_source(spec, ctx).await
    }

    /// Source side, the target restored: commit (if not yet), wait until
    /// the dump served every page the target asked for (bounded by
    /// `timeouts.lazy_serve`; then the dump is killed and the target's
    /// missing pages are lost), then kill the stopped tree and clean up the
    /// host like [`ContainerDriver::migrate_finish_source`]. The tree is
    /// removed even when serving failed; the serving error is returned then.
    pub async fn migrate_lazy_finish_source(
        &self,
        spec: &InstanceSpec,
        mut dump: LazyDump,
        ctx: &OpCtx,
    ) -> Result<LazyServed, DriverError> {
        dump.commit();
        ctx.progress("stage", "serving memory pages to the target");
        let served = match tokio::time::timeout(self.timeouts.lazy_serve, dump.wait()).await {
            Ok(r) => r,
            Err(_) => {
                let _ = dump.child.kill().await;
                Err(DriverError::Timeout(format!(
                    "the target did not fetch all pages within {:?}; the source stopped serving",
                    self.timeouts.lazy_serve
                )))
            }
        };
        drop(dump);
        self.migrate_finish_source(spec, ctx).await?;
        served
    }

    /// Target side: start `criu lazy-pages` on the shipped images in
    /// `images_dir`, fetching pages from `from`; returns once it is ready
    /// for the restore ([`ContainerDriver::migrate_restore_lazy`]). It
    /// connects to `from` only during that restore.
    pub async fn lazy_pages(
        &self,
        images_dir: &Path,
        from: LazyFrom,
        ctx: &OpCtx,
    ) -> Result<LazyPages, DriverError> {
        let bin = criu::checked_criu().await?;
        if !images_dir.join("pstree.img").is_file() {
            return Err(DriverError::WrongState(format!(
                "no CRIU images in {}: ship the lazy dump's images before starting lazy-pages",
                images_dir.display()
            )));
        }
        ctx.check_cancelled("lazy-pages (nothing was started)")?;
        let sock_path = images_dir.join(LAZY_SOCKET);
        remove_if_exists(&sock_path)
            .map_err(DriverError::io(format!("remove {}", sock_path.display())))?;
        let log = images_dir.join(LAZY_PAGES_LOG);
        let (ep, sock) = match from {
            LazyFrom::Tcp(a) => (PageEndpoint::Tcp(a), None),
            LazyFrom::Socket(s) => (PageEndpoint::Fd(4), Some(s)),
        };
        let args = criu::lazy_pages_args(images_dir, ep, &log);
        let r = spawn_ready(
            &bin,
            &args,
            sock.as_ref().map(|s| s.as_raw_fd()),
            &log,
            Duration::from_secs(30),
            "lazy-pages",
        )
        .await?;
        drop(sock);
        let child = r.map_err(|detail| DriverError::Command {
            program: "criu lazy-pages".into(),
            detail,
        })?;
        tracing::info!(dir = %images_dir.display(), ?ep, "criu lazy-pages ready");
        Ok(LazyPages {
            child,
            exited: None,
            started: Instant::now(),
            images: images_dir.to_path_buf(),
            log,
            logs_dir: None,
        })
    }

    /// Target side: `criu restore --lazy-pages` from `images_dir` (served
    /// by `pages`), bounded by `timeouts.lazy_restore` and aborted when the
    /// lazy-pages daemon fails. Ok: the container RUNS here, as this
    /// member's (pidfile, cgroup), while its memory still comes from the
    /// source: the source must now commit and finish
    /// (`migrate_lazy_finish_source`), never resume; watch
    /// [`LazyPages::wait`] (an error there: stop the container). On
    /// failure whatever was restored is killed, `pages` killed, the host
    /// set-up undone and `images_dir` kept; the source may resume.
    pub async fn migrate_restore_lazy(
        &self,
        spec: &InstanceSpec,
        images_dir: &Path,
        pages: &mut LazyPages,
        ctx: &OpCtx,
    ) -> Result<VolatileChanges, DriverError> {
        let l = self.check_restorable(spec, images_dir)?;
        if let Some(st) = pages.exited {
            return Err(DriverError::WrongState(format!(
                "criu lazy-pages already exited ({st}); start another one"
            )));
        }
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("restore on the target (nothing was restored)")?;
        ctx.progress("stage", "restoring container (post-copy)");
        self.cleanup_host(spec).await?;
        mkdirs(&[&spec.paths.run, &spec.paths.logs])?;
        let cg = self.setup_cgroup(spec)?;
        let r = {
            let restore = self.run_restore(
                spec,
                images_dir,
                &bin,
                cg.as_ref(),
                ctx,
                super::state::RestoreMode::Lazy,
            );
            tokio::pin!(restore);
            tokio::select! {
                r = &mut restore => r,
                st = pages.child.wait() => {
                    pages.exited = st.as_ref().ok().copied();
                    match st {
                        // Every page already there (tiny container): fine.
                        Ok(s) if s.success() => restore.await,
                        other => Err(DriverError::Command {
                            program: "criu lazy-pages".into(),
                            detail: format!(
                                "exited ({}) during the restore{}",
                                other.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                                criu::log_tail(&pages.log)
                            ),
                        }),
                    }
                }
            }
        };
        match r {
            Ok(rec) => {
                tracing::info!(container = %spec.name, pid = rec.pid, "container restored (post-copy); pages follow");
                pages.logs_dir = Some(spec.paths.logs.clone());
                Ok(super::running(spec))
            }
            Err(e) => {
                pages.kill().await;
                self.kill_partial_restore(&l, cg.as_ref()).await;
                let _ = self.cleanup_host(spec).await;
                Err(e)
            }
        }
    }
}
