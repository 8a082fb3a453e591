//! CRIU through its command line.
//!
//! We run the `criu` binary (4.2.x) with tokio::process instead of rust-criu's
//! `criu swrk` RPC: rust-criu 0.6.1 has no pidfile, page-server, lazy-pages
//! or network-lock options (live migration will need page-server), and it
//! drops the restored pid. The CLI reads /etc/criu/default.conf (where
//! `network-lock nftables` is set on hosts without iptables), logs to a file
//! we choose, and every invocation is bounded by a timeout (a restore whose
//! page source died hangs forever otherwise).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::DriverError;

pub const REQUIRED: (u32, u32) = (4, 2);

/// Locate the criu binary: $PATH first, then the sbin directories (ferryd
/// may run with a PATH lacking them).
pub fn find_criu() -> Option<PathBuf> {
    find_tool("criu")
}

pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Parse `criu --version` output ("Version: 4.2.1").
pub fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let mut it = v
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// Answers of `criu --version` / `criu check --feature F`, per binary (path
/// and modification time: a replaced binary is checked again). Each run
/// costs tens of ms, and every move asks.
type CheckKey = (PathBuf, std::time::SystemTime, String);
static CHECKS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<CheckKey, Result<(), String>>>,
> = std::sync::LazyLock::new(Default::default);

/// The kept answer to `what`, or `run`'s: `Ok(answer)` is what CRIU said
/// (kept); `Err` means it could not say — it did not run or hung (not kept).
async fn cached_check(
    bin: &Path,
    what: &str,
    run: impl std::future::Future<Output = Result<Result<(), String>, String>>,
) -> Result<(), String> {
    let key = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .map(|mtime| (bin.to_path_buf(), mtime, what.to_string()));
    let lock = || CHECKS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(answer) = key.as_ref().and_then(|k| lock().get(k).cloned()) {
        return answer;
    }
    let answer = run.await?;
    if let Some(k) = key {
        lock().insert(k, answer.clone());
    }
    answer
}

/// The criu binary, checked to be 4.2.x.
pub async fn checked_criu() -> Result<PathBuf, DriverError> {
    let missing = |detail: String| DriverError::MissingTool {
        tool: "criu".into(),
        detail,
    };
    let bin =
        find_criu().ok_or_else(|| missing("criu not found in PATH or /usr/local/sbin".into()))?;
    cached_check(&bin, "--version", check_version(&bin))
        .await
        .map(|()| bin)
        .map_err(missing)
}

async fn check_version(bin: &Path) -> Result<Result<(), String>, String> {
    let out = tokio::process::Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(match parse_version(&text) {
        Some((maj, min, _)) if (maj, min) == REQUIRED => Ok(()),
        Some((maj, min, p)) => Err(format!(
            "{} is version {maj}.{min}.{p}, ferry needs 4.2.x",
            bin.display()
        )),
        None => Err(format!(
            "cannot parse `{} --version`: {}",
            bin.display(),
            text.trim()
        )),
    })
}

/// `criu check --feature FEAT` (feature names as in `criu check --help`,
/// e.g. `uffd-noncoop`, `mem_dirty_track`): Ok, or Err with CRIU's own
/// explanation ("Dirty tracking is OFF...").
pub async fn check_feature(bin: &Path, feature: &str) -> Result<(), String> {
    let what = format!("check --feature {feature}");
    cached_check(bin, &what, run_check_feature(bin, feature)).await
}

async fn run_check_feature(bin: &Path, feature: &str) -> Result<Result<(), String>, String> {
    let out = tokio::process::Command::new(bin)
        .args(["check", "--feature", feature])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(30), out).await {
        Err(_) => return Err(format!("`criu check --feature {feature}` hung for 30s")),
        Ok(Err(e)) => return Err(format!("run {}: {e}", bin.display())),
        Ok(Ok(o)) => o,
    };
    if out.status.success() {
        return Ok(Ok(()));
    }
    let text = format!(
        "{} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(Err(format!(
        "`criu check --feature {feature}` failed ({}): {}",
        out.status,
        text.trim()
    )))
}

/// `criu dump` of the whole tree rooted at `pid`; CRIU kills the tree when
/// the dump succeeds and resumes it when the dump fails.
pub fn dump_args(pid: u32, images: &Path, log: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = ["dump", "--tree"].map(OsString::from).into();
    v.push(pid.to_string().into());
    v.extend(common_args(images, log));
    v
}

/// `criu restore` detached (`-d`): the restored init is re-parented like a
/// cold-started one. `root` is the rootfs mount point (the member's
/// `run/rootfs`). With `lazy`, `--lazy-pages`: the tasks run before their
/// memory is there and fault it in through the `criu lazy-pages` daemon
/// listening in `images`.
pub fn restore_args(
    images: &Path,
    root: &Path,
    pidfile: &Path,
    log: &Path,
    lazy: bool,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "restore".into(),
        "--restore-detached".into(),
        "--root".into(),
        root.into(),
    ];
    v.push("--pidfile".into());
    v.push(pidfile.into());
    if lazy {
        v.push("--lazy-pages".into());
    }
    v.extend(common_args(images, log));
    v
}

/// Where a dump sends its memory pages / where a page server listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEndpoint {
    /// TCP (`--address A --port P`).
    Tcp(std::net::SocketAddr),
    /// An already connected stream socket inherited as this fd number
    /// (`--ps-socket FD`): no port, and no Nagle/delayed-ACK stalls (a unix
    /// socketpair whose other end the daemon relays).
    Fd(i32),
}

impl PageEndpoint {
    fn args(&self) -> Vec<OsString> {
        match self {
            PageEndpoint::Tcp(addr) => vec![
                "--address".into(),
                addr.ip().to_string().into(),
                "--port".into(),
                addr.port().to_string().into(),
            ],
            PageEndpoint::Fd(fd) => vec!["--ps-socket".into(), fd.to_string().into()],
        }
    }
}

/// The final `criu dump` of a live move: like [`dump_args`] but the tasks
/// are left stopped (`--leave-stopped`) instead of killed, so a failed move
/// can resume them; with `pages` the memory pages go to a
/// `criu page-server` there instead of into `images`.
pub fn migrate_dump_args(
    pid: u32,
    images: &Path,
    log: &Path,
    pages: Option<PageEndpoint>,
) -> Vec<OsString> {
    let mut v = dump_args(pid, images, log);
    v.push("--leave-stopped".into());
    if let Some(ep) = pages {
        v.push("--page-server".into());
        v.extend(ep.args());
    }
    v
}

/// Incremental dumps: `--track-mem` (soft-dirty tracking, so the next
/// iteration sends only what changed) and, after a previous iteration,
/// `--prev-images-dir PARENT` (relative to the images dir: CRIU links it as
/// `images/parent` and marks unchanged pages as being there).
pub fn incremental_args(parent: Option<&Path>) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["--track-mem".into()];
    if let Some(p) = parent {
        v.push("--prev-images-dir".into());
        v.push(p.into());
    }
    v
}

/// One iteration of iterative migration: `criu pre-dump` of the running
/// tree into `images` (its memory only; the tasks run on), see
/// [`incremental_args`].
pub fn pre_dump_args(pid: u32, images: &Path, log: &Path, parent: Option<&Path>) -> Vec<OsString> {
    let mut v: Vec<OsString> = ["pre-dump", "--tree"].map(OsString::from).into();
    v.push(pid.to_string().into());
    v.extend(common_args(images, log));
    v.extend(incremental_args(parent));
    v
}

/// `criu page-server` receiving one dump's pages into `images` (it exits
/// when the dump's connection closes). CRIU refuses `--port 0`: the caller
/// picks the port. With `--status-fd 3` CRIU writes one NUL byte to fd 3
/// once it listens (or holds the socket).
pub fn page_server_args(
    images: &Path,
    ep: PageEndpoint,
    parent: Option<&Path>,
    log: &Path,
) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec!["page-server".into(), "--images-dir".into(), images.into()];
    v.extend(ep.args());
    if let Some(p) = parent {
        // A dump after pre-dumps: CRIU links `images/parent` to it.
        v.extend(["--prev-images-dir".into(), p.into()]);
    }
    v.extend(status_and_log(log));
    v
}

/// `--status-fd 3 --log-file LOG -v4`: the NUL byte on fd 3 when ready,
/// a verbose log.
fn status_and_log(log: &Path) -> [OsString; 5] {
    [
        "--status-fd".into(),
        "3".into(),
        "--log-file".into(),
        log.into(),
        "-v4".into(),
    ]
}

/// The final dump of a post-copy move: `criu dump --lazy-pages
/// --leave-stopped`. The metadata (and the few pages CRIU never serves
/// lazily, e.g. stacks) go to `images`; then the dump process itself serves
/// the remaining pages at `ep` (listening there for TCP, or on the already
/// connected socket) until the target's `criu lazy-pages` closes the
/// connection. With `--status-fd` CRIU writes one NUL byte to that fd when
/// it starts serving, i.e. once every image is written and flushed. No
/// `--page-server`: that would make the dump a page-server *client*.
pub fn lazy_dump_args(
    pid: u32,
    images: &Path,
    log: &Path,
    ep: PageEndpoint,
    status_fd: i32,
) -> Vec<OsString> {
    let mut v = dump_args(pid, images, log);
    v.extend(["--leave-stopped".into(), "--lazy-pages".into()]);
    v.extend(ep.args());
    v.extend(["--status-fd".into(), status_fd.to_string().into()]);
    v
}

/// `criu lazy-pages` on the target: reads the shipped metadata in
/// `images`, listens on `images/lazy-pages.socket` for the restore's
/// userfaultfds (NUL byte on `--status-fd 3` once it does), and fetches
/// pages from the dump at `ep` (`--page-server`: connects to a TCP address
/// or uses the connected socket) as the restored tasks fault, then the
/// rest in the background; it exits when every page is in place.
pub fn lazy_pages_args(images: &Path, ep: PageEndpoint, log: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "lazy-pages".into(),
        "--page-server".into(),
        "--images-dir".into(),
        images.into(),
    ];
    v.extend(ep.args());
    v.extend(status_and_log(log));
    v
}

/// Most fds [`place_fds`] handles.
pub const MAX_PLACED_FDS: usize = 4;

/// For a child between fork and exec: make each `(src, dst)` source fd
/// available as fd `dst` across exec (a source may be any number, even
/// another pair's target). Only fcntl/dup2: async-signal-safe, no
/// allocation.
pub fn place_fds(pairs: &[(i32, i32)]) -> std::io::Result<()> {
    let mut tmp = [-1i32; MAX_PLACED_FDS];
    if pairs.len() > MAX_PLACED_FDS {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // Park every source above the targets first (close-on-exec copies).
    for (i, &(src, _)) in pairs.iter().enumerate() {
        // SAFETY: plain syscalls on fds owned by the parent.
        tmp[i] = unsafe { libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 64) };
        if tmp[i] < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, &(_, dst)) in pairs.iter().enumerate() {
        // dup2 to a different number clears close-on-exec on `dst`.
        if unsafe { libc::dup2(tmp[i], dst) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The run id CRIU prints at the top of its log (`CRIU run id = <uuid>`).
/// With `network-lock nftables` the lock is the table `inet CRIU-<first 21
/// characters of the dump's run id>` in the dumped network namespace
/// (CRIU formats `"inet CRIU-%s"` into a 32-byte buffer).
pub fn run_id_in_log(log: &str) -> Option<String> {
    log.lines()
        .take(50)
        .find_map(|l| {
            l.split_once("CRIU run id = ")
                .map(|(_, id)| id.trim().to_string())
        })
        .filter(|id| !id.is_empty())
}

/// Name of the nftables table the dump with run id `run_id` locks the
/// network with.
pub fn nft_lock_table(run_id: &str) -> String {
    let id: String = run_id.chars().take(21).collect();
    format!("CRIU-{id}")
}

/// What `stats-dump` says about a dump (CRIU's `DumpStatsEntry`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Time the tasks were frozen, in microseconds (field 2).
    pub frozen_us: Option<u64>,
    /// Memory pages looked at (field 5).
    pub pages_scanned: Option<u64>,
    /// Pages left out because the parent images hold them (field 6).
    pub pages_skipped_parent: Option<u64>,
    /// Memory pages written to images or to the page server (field 7).
    pub pages_written: Option<u64>,
}

/// Parse a `stats-dump` image: 8 bytes of magic, a u32 length, then a
/// `StatsEntry { DumpStatsEntry dump = 1; ... }` protobuf message.
pub fn parse_dump_stats(img: &[u8]) -> Option<DumpStats> {
    let len = u32::from_le_bytes(img.get(8..12)?.try_into().ok()?) as usize;
    let msg = img.get(12..12 + len)?;
    let dump = proto_fields(msg)?
        .into_iter()
        .find_map(|(f, v)| match (f, v) {
            (1, ProtoVal::Bytes(b)) => Some(b),
            _ => None,
        })?;
    let mut st = DumpStats::default();
    for (f, v) in proto_fields(dump)? {
        if let ProtoVal::Varint(n) = v {
            match f {
                2 => st.frozen_us = Some(n),
                5 => st.pages_scanned = Some(n),
                6 => st.pages_skipped_parent = Some(n),
                7 => st.pages_written = Some(n),
                _ => {}
            }
        }
    }
    Some(st)
}

enum ProtoVal<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

/// The top-level fields of a protobuf message (varint, 64/32-bit and
/// length-delimited wire types).
fn proto_fields(mut b: &[u8]) -> Option<Vec<(u64, ProtoVal<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let val = match key & 7 {
            0 => ProtoVal::Varint(varint(&mut b)?),
            1 => {
                b = b.get(8..)?;
                continue;
            }
            2 => {
                let n = varint(&mut b)? as usize;
                let v = b.get(..n)?;
                b = &b[n..];
                ProtoVal::Bytes(v)
            }
            5 => {
                b = b.get(4..)?;
                continue;
            }
            _ => return None,
        };
        out.push((key >> 3, val));
    }
    Some(out)
}

fn common_args(images: &Path, log: &Path) -> Vec<OsString> {
    vec![
        "--images-dir".into(),
        images.into(),
        "--log-file".into(),
        log.into(),
        "-v4".into(),
        // Put the tasks back into the cgroups they were dumped from; the
        // driver pre-creates ferry/<name> (with its limit) before restoring.
        "--manage-cgroups=soft".into(),
    ]
}

/// Why a bounded command stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited,
    TimedOut,
    Cancelled,
}

/// Run criu with a time limit and optional cancellation; on timeout or
/// cancel the criu process is killed. Failure text includes the log's tail.
pub async fn run(
    bin: &Path,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
    cancel: Option<&CancellationToken>,
) -> Result<(), (Outcome, DriverError)> {
    run_with(bin, args, log, timeout, cancel, &[], 0).await
}

/// [`run`], with the fds of `fds` (`(src, dst)`, see [`place_fds`])
/// inherited by criu, and criu's nice value raised by `nice` (0: unchanged).
pub async fn run_with(
    bin: &Path,
    args: &[OsString],
    log: &Path,
    timeout: Duration,
    cancel: Option<&CancellationToken>,
    fds: &[(i32, i32)],
    nice: i32,
) -> Result<(), (Outcome, DriverError)> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if nice != 0 {
        // SAFETY: nice(2) only.
        unsafe {
            cmd.pre_exec(move || {
                *libc::__errno_location() = 0;
                if libc::nice(nice) == -1 && *libc::__errno_location() != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if !fds.is_empty() {
        let mut pairs = [(-1, -1); MAX_PLACED_FDS];
        let n = fds.len().min(MAX_PLACED_FDS);
        pairs[..n].copy_from_slice(&fds[..n]);
        // SAFETY: place_fds only calls fcntl/dup2.
        unsafe {
            cmd.pre_exec(move || place_fds(&pairs[..n]));
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        (
            Outcome::Exited,
            DriverError::io(format!("run {}", bin.display()))(e),
        )
    })?;
    let never = CancellationToken::new();
    let cancel = cancel.unwrap_or(&never);
    let what = args
        .first()
        .and_then(|a| a.to_str())
        .unwrap_or("criu")
        .to_string();
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| (Outcome::Exited, DriverError::io("wait for criu")(e)))?,
        _ = tokio::time::sleep(timeout) => {
            let _ = child.kill().await;
            return Err((Outcome::TimedOut, DriverError::Timeout(format!(
                "criu {what} did not finish within {}s; see {}", timeout.as_secs(), log.display()))));
        }
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            return Err((Outcome::Cancelled, DriverError::Cancelled(format!("criu {what} interrupted"))));
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut stderr).await;
    }
    let stderr = stderr.trim();
    let sep = if stderr.is_empty() { "" } else { ": " };
    let detail = format!(
        "criu {what} exited with {status}{sep}{stderr}{}",
        log_tail(log)
    );
    Err((
        Outcome::Exited,
        DriverError::Command {
            program: "criu".into(),
            detail,
        },
    ))
}

/// The error lines (or the last lines) of a CRIU log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    // The RLIMIT_NOFILE complaint appears in every log here and is harmless.
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| (l.contains("Error") || l.contains("error")) && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let pick = if errors.is_empty() {
        &lines[lines.len().saturating_sub(5)..]
    } else {
        &errors[errors.len().saturating_sub(5)..]
    };
    format!("\n  (log {}):\n  {}", log.display(), pick.join("\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(
            parse_version("Version: 4.2\nGitID: v4.2\n"),
            Some((4, 2, 0))
        );
        assert_eq!(parse_version("Version: 3.17.1"), Some((3, 17, 1)));
        assert_eq!(parse_version("criu: command not found"), None);
    }

    #[test]
    fn dump_and_restore_args() {
        let d = dump_args(42, Path::new("/v/state.tmp"), Path::new("/l/dump.log"));
        let d: Vec<_> = d.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(&d[..3], ["dump", "--tree", "42"]);
        assert!(d.windows(2).any(|w| w == ["--images-dir", "/v/state.tmp"]));
        assert!(d.windows(2).any(|w| w == ["--log-file", "/l/dump.log"]));
        assert!(!d.contains(&"--leave-running"));
        let r = restore_args(
            Path::new("/v/state"),
            Path::new("/v/rootfs"),
            Path::new("/r/p"),
            Path::new("/l/r.log"),
            false,
        );
        let r: Vec<_> = r.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(r[0], "restore");
        assert!(r.contains(&"--restore-detached"));
        assert!(r.windows(2).any(|w| w == ["--root", "/v/rootfs"]));
        assert!(r.windows(2).any(|w| w == ["--pidfile", "/r/p"]));
    }

    #[test]
    fn migrate_args() {
        let addr: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let d = migrate_dump_args(
            7,
            Path::new("/i"),
            Path::new("/l"),
            Some(PageEndpoint::Tcp(addr)),
        );
        let d: Vec<_> = d.iter().map(|s| s.to_str().unwrap()).collect();
        assert!(d.contains(&"--leave-stopped") && d.contains(&"--page-server"));
        assert!(d.windows(2).any(|w| w == ["--address", "127.0.0.1"]));
        assert!(d.windows(2).any(|w| w == ["--port", "40123"]));
        let d = migrate_dump_args(7, Path::new("/i"), Path::new("/l"), None);
        assert!(!d.iter().any(|a| a == "--page-server"));
        let p = page_server_args(
            Path::new("/i"),
            PageEndpoint::Tcp(addr),
            None,
            Path::new("/l"),
        );
        let p: Vec<_> = p.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(p[0], "page-server");
        assert!(p.windows(2).any(|w| w == ["--status-fd", "3"]));
        assert!(p.windows(2).any(|w| w == ["--port", "40123"]));
        assert!(!p.contains(&"--prev-images-dir"));
        let p = page_server_args(
            Path::new("/i"),
            PageEndpoint::Fd(4),
            Some(Path::new("../p/2")),
            Path::new("/l"),
        );
        assert!(p.windows(2).any(|w| w == ["--prev-images-dir", "../p/2"]));
        let d = migrate_dump_args(
            7,
            Path::new("/i"),
            Path::new("/l"),
            Some(PageEndpoint::Fd(4)),
        );
        let d: Vec<_> = d.iter().map(|s| s.to_str().unwrap()).collect();
        assert!(d.windows(2).any(|w| w == ["--ps-socket", "4"]) && d.contains(&"--page-server"));
        assert!(!d.contains(&"--port"));
    }

    #[test]
    fn pre_dump_and_incremental_args() {
        let p = pre_dump_args(
            7,
            Path::new("/i/pre/2"),
            Path::new("/l"),
            Some(Path::new("../1")),
        );
        let p: Vec<_> = p.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(&p[..3], ["pre-dump", "--tree", "7"]);
        assert!(p.windows(2).any(|w| w == ["--images-dir", "/i/pre/2"]));
        assert!(p.windows(2).any(|w| w == ["--prev-images-dir", "../1"]));
        assert!(p.contains(&"--track-mem") && !p.contains(&"--leave-stopped"));
        let first = pre_dump_args(7, Path::new("/i/pre/1"), Path::new("/l"), None);
        assert!(!first.iter().any(|a| a == "--prev-images-dir"));
        assert_eq!(incremental_args(None), vec![OsString::from("--track-mem")]);
    }

    #[test]
    fn lazy_args() {
        let d = lazy_dump_args(7, Path::new("/i"), Path::new("/l"), PageEndpoint::Fd(3), 4);
        let d: Vec<_> = d.iter().map(|s| s.to_str().unwrap()).collect();
        assert!(d.contains(&"--lazy-pages") && d.contains(&"--leave-stopped"));
        assert!(
            !d.contains(&"--page-server"),
            "a lazy dump serves, it is no client"
        );
        assert!(d.windows(2).any(|w| w == ["--ps-socket", "3"]));
        assert!(d.windows(2).any(|w| w == ["--status-fd", "4"]));
        let addr: std::net::SocketAddr = "127.0.0.1:40123".parse().unwrap();
        let p = lazy_pages_args(Path::new("/i"), PageEndpoint::Tcp(addr), Path::new("/l"));
        let p: Vec<_> = p.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(&p[..2], ["lazy-pages", "--page-server"]);
        assert!(p.windows(2).any(|w| w == ["--port", "40123"]));
        assert!(p.windows(2).any(|w| w == ["--status-fd", "3"]));
        let r = restore_args(
            Path::new("/i"),
            Path::new("/r"),
            Path::new("/p"),
            Path::new("/l"),
            true,
        );
        assert!(r.iter().any(|a| a == "--lazy-pages"));
        let r = restore_args(
            Path::new("/i"),
            Path::new("/r"),
            Path::new("/p"),
            Path::new("/l"),
            false,
        );
        assert!(!r.iter().any(|a| a == "--lazy-pages"));
    }

    #[test]
    fn run_id_and_lock_table() {
        let log = "(00.000000) Parsing config file /etc/criu/default.conf\n\
                   (00.000000) CRIU run id = 771bd155-dfb2-4cc4-85fe-9eb39799fa5d\n";
        let id = run_id_in_log(log).unwrap();
        assert_eq!(id, "771bd155-dfb2-4cc4-85fe-9eb39799fa5d");
        assert_eq!(nft_lock_table(&id), "CRIU-771bd155-dfb2-4cc4-85");
        assert_eq!(run_id_in_log("nothing"), None);
    }

    #[test]
    fn dump_stats() {
        // A real stats-dump written by criu 4.2.1.
        let img = [
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x23, 0x00, 0x00, 0x00, 0x0a, 0x21,
            0x08, 0xd7, 0x01, 0x10, 0x92, 0xb0, 0x05, 0x18, 0x82, 0x08, 0x20, 0xee, 0x01, 0x28,
            0x6a, 0x30, 0x00, 0x38, 0x3d, 0x40, 0x00, 0x48, 0x00, 0x50, 0x0c, 0x58, 0x0c, 0x60,
            0x00, 0x68, 0x00, 0x70, 0x00,
        ];
        let st = parse_dump_stats(&img).unwrap();
        assert_eq!(st.frozen_us, Some(88082));
        assert_eq!(st.pages_written, Some(61));
        assert_eq!(
            (st.pages_scanned, st.pages_skipped_parent),
            (Some(106), Some(0))
        );
        assert_eq!(parse_dump_stats(&img[..20]), None);
    }

    #[tokio::test]
    async fn run_times_out() {
        let Some(sleep) = find_tool("sleep") else {
            return;
        };
        let args = ["5".into()];
        let t = std::time::Instant::now();
        let r = run(
            &sleep,
            &args,
            Path::new("/nonexistent"),
            Duration::from_millis(200),
            None,
        )
        .await;
        assert!(matches!(
            r,
            Err((Outcome::TimedOut, DriverError::Timeout(_)))
        ));
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
