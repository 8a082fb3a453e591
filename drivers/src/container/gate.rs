//! Starting a move's `criu restore` before its memory pages have all
//! arrived: the restore sets up namespaces, mounts, cgroups and the network
//! (most of its time for a small tree) while the pages still stream in, and
//! waits at a gate before it reads any of them.
//!
//! The gate is CRIU's `post-setup-namespaces` action: CRIU runs the action
//! script from its main process before it lets the restored tree fork and
//! restore memory (`restore_root_task`: scripts, then the `FORKING` stage;
//! the tasks open their pagemap images only after that). ferry's script
//! reads one line from a FIFO that ferryd holds open: `ok` lets the restore
//! go on, anything else (or end of file) makes the script fail and CRIU
//! abort the restore, killing what it had created.
//!
//! ```text
//!  ferryd                                   criu restore
//!  ──────                                   ────────────
//!  mkfifo gate, open it read-write
//!  spawn criu --action-script gate.sh ───▶ cgroups, namespaces, mounts, net
//!  (pages still arriving)                   post-setup-namespaces: gate.sh
//!                                             read verdict < gate   (blocks)
//!  pages complete ── "ok" ──▶ gate ──────▶ verdict ok: fork, read pages, resume
//!  pages failed   ── "fail" ─▶ gate ─────▶ exit 1: CRIU aborts the restore
//! ```
//!
//! ferryd keeps its end of the FIFO open until criu has exited, so the
//! script never waits for a writer that is gone; a verdict never given
//! (the opener dropped) counts as `fail`.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;

use crate::DriverError;

/// File names in the instance's run directory.
const FIFO: &str = "restore-gate.fifo";
const SCRIPT: &str = "restore-gate.sh";

/// The caller's end: says whether the pages are complete.
#[derive(Debug)]
pub struct PagesGateOpener(oneshot::Sender<bool>);

impl PagesGateOpener {
    /// The pages are all in place: the restore may read them.
    pub fn open(self) {
        let _ = self.0.send(true);
    }

    /// The pages will not be complete: the restore must abort (dropping
    /// the opener does the same).
    pub fn refuse(self) {
        let _ = self.0.send(false);
    }
}

/// The restore's end, given to
/// [`ContainerDriver::migrate_restore_gated`](super::ContainerDriver::migrate_restore_gated).
#[derive(Debug)]
pub struct PagesGate(oneshot::Receiver<bool>);

/// A new gate, closed.
pub fn pages_gate() -> (PagesGateOpener, PagesGate) {
    let (tx, rx) = oneshot::channel();
    (PagesGateOpener(tx), PagesGate(rx))
}

/// The gate set up for one `criu restore`: the FIFO (held open here) and
/// the action script that waits on it.
pub(super) struct ArmedGate {
    fifo: std::fs::File,
    fifo_path: PathBuf,
    script: PathBuf,
    verdict: Option<oneshot::Receiver<bool>>,
}

impl ArmedGate {
    pub(super) fn arm(gate: PagesGate, run_dir: &Path) -> Result<ArmedGate, DriverError> {
        let fifo_path = run_dir.join(FIFO);
        let script = run_dir.join(SCRIPT);
        let _ = std::fs::remove_file(&fifo_path);
        nix::unistd::mkfifo(&fifo_path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| DriverError::io(format!("create {}", fifo_path.display()))(e.into()))?;
        // Read-write: opening never blocks, and the script's open finds a
        // writer for as long as this file is open.
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo_path)
            .map_err(DriverError::io(format!("open {}", fifo_path.display())))?;
        std::fs::write(&script, script_text(&fifo_path))
            .and_then(|()| {
                std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(DriverError::io(format!("write {}", script.display())))?;
        Ok(ArmedGate {
            fifo,
            fifo_path,
            script,
            verdict: Some(gate.0),
        })
    }

    /// CRIU's arguments for the gate.
    pub(super) fn args(&self) -> [OsString; 2] {
        ["--action-script".into(), self.script.clone().into()]
    }

    /// Wait for the caller's verdict and pass it to the script; pending
    /// forever once given (for use in a `select!` with criu's exit).
    pub(super) async fn relay_verdict(&mut self) {
        let Some(rx) = self.verdict.as_mut() else {
            return std::future::pending().await;
        };
        let ok = rx.await.unwrap_or(false);
        self.verdict = None;
        let line: &[u8] = if ok { b"ok\n" } else { b"fail\n" };
        // A few bytes into an empty pipe: never blocks.
        if let Err(e) = (&self.fifo).write_all(line) {
            tracing::warn!("restore gate {}: {e}", self.fifo_path.display());
        }
        tracing::debug!(ok, "restore gate: verdict given");
        std::future::pending().await
    }
}

impl Drop for ArmedGate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.fifo_path);
        let _ = std::fs::remove_file(&self.script);
    }
}

fn script_text(fifo: &Path) -> String {
    let q = shell_quote(&fifo.to_string_lossy());
    format!(
        "#!/bin/sh\n\
         # ferry: hold this restore before it reads memory pages until ferryd\n\
         # says they have all arrived (see drivers/src/container/gate.rs).\n\
         [ \"$CRTOOLS_SCRIPT_ACTION\" = post-setup-namespaces ] || exit 0\n\
         read -r verdict < {q} || exit 1\n\
         [ \"$verdict\" = ok ] || exit 1\n\
         # CRIU set up at a lower priority while the pages crossed; what is\n\
         # left of the restore is the move's critical path. CRIU execs this\n\
         # file from a process it forked: criu is our parent or grandparent.\n\
         p=$PPID\n\
         [ \"$(cat /proc/$p/comm 2>/dev/null)\" = criu ] || read -r _ _ _ p _ < /proc/$PPID/stat\n\
         renice -n 0 -p \"$p\" >/dev/null 2>&1 || :\n"
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run_script(script: &Path, action: &str) -> bool {
        // Through sh: exec'ing a file another test thread has just written
        // can fail with ETXTBSY (its fd lives on in a concurrent fork).
        tokio::process::Command::new("sh")
            .arg(script)
            .env("CRTOOLS_SCRIPT_ACTION", action)
            .status()
            .await
            .unwrap()
            .success()
    }

    #[tokio::test]
    async fn the_script_waits_for_the_verdict_at_post_setup_namespaces_only() {
        let dir = tempfile::tempdir().unwrap();
        // Other actions pass at once.
        let (opener, gate) = pages_gate();
        let mut armed = ArmedGate::arm(gate, dir.path()).unwrap();
        assert!(run_script(&armed.script, "pre-restore").await);
        // The gate action waits until the verdict, then passes on "ok".
        let script = armed.script.clone();
        let waiting =
            tokio::spawn(async move { run_script(&script, "post-setup-namespaces").await });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the script did not wait");
        opener.open();
        tokio::select! {
            _ = armed.relay_verdict() => unreachable!(),
            r = waiting => assert!(r.unwrap(), "ok must let the restore go on"),
        }
        drop(armed);
        assert!(!dir.path().join(FIFO).exists() && !dir.path().join(SCRIPT).exists());
    }

    #[tokio::test]
    async fn a_refused_or_dropped_opener_fails_the_script() {
        for refuse in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (opener, gate) = pages_gate();
            let mut armed = ArmedGate::arm(gate, dir.path()).unwrap();
            if refuse {
                opener.refuse();
            } else {
                drop(opener);
            }
            let script = armed.script.clone();
            let run =
                tokio::spawn(async move { run_script(&script, "post-setup-namespaces").await });
            tokio::select! {
                _ = armed.relay_verdict() => unreachable!(),
                r = run => assert!(!r.unwrap(), "refuse={refuse}: the restore must abort"),
            }
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
