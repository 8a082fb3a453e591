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

/// The criu binary, checked to be 4.2.x.
pub async fn checked_criu() -> Result<PathBuf, DriverError> {
    let missing = |detail: String| DriverError::MissingTool {
        tool: "criu".into(),
        detail,
    };
    let bin =
        find_criu().ok_or_else(|| missing("criu not found in PATH or /usr/local/sbin".into()))?;
    let out = tokio::process::Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| missing(format!("{}: {e}", bin.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_version(&text) {
        Some((maj, min, _)) if (maj, min) == REQUIRED => Ok(bin),
        Some((maj, min, p)) => Err(missing(format!(
            "{} is version {maj}.{min}.{p}, ferry needs 4.2.x",
            bin.display()
        ))),
        None => Err(missing(format!(
            "cannot parse `{} --version`: {}",
            bin.display(),
            text.trim()
        ))),
    }
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
/// cold-started one. `root` is the rootfs, bind-mounted onto itself.
pub fn restore_args(images: &Path, root: &Path, pidfile: &Path, log: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        "restore".into(),
        "--restore-detached".into(),
        "--root".into(),
        root.into(),
    ];
    v.push("--pidfile".into());
    v.push(pidfile.into());
    v.extend(common_args(images, log));
    v
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
    let mut child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
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
        );
        let r: Vec<_> = r.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(r[0], "restore");
        assert!(r.contains(&"--restore-detached"));
        assert!(r.windows(2).any(|w| w == ["--root", "/v/rootfs"]));
        assert!(r.windows(2).any(|w| w == ["--pidfile", "/r/p"]));
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
