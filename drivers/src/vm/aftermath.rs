//! What a migration that did not complete leaves in the source QEMU, and
//! putting it back: the guest running as before, QEMU's own migration
//! settings, and only once QEMU itself has cleaned up.

use std::time::{Duration, Instant};

use qapi::qmp::{MigrateSetParameters, MigrationCapability as Cap};

use super::migrate::{in_progress, MigrateParams, POLL, STREAM_FD};
use super::qmp::Qmp;
use crate::DriverError;

/// After a pre-copy failure or cancel: wait for QEMU to settle, then make
/// sure the guest runs as it did before.
pub(super) async fn recover_source(qmp: &mut Qmp, was_running: bool) -> Result<(), DriverError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match qmp.query_migrate().await?.status.as_str() {
            s if in_progress(s) => tokio::time::sleep(POLL).await,
            _ => break,
        }
    }
    let _ = qmp.close_fd(STREAM_FD).await;
    if was_running && settled_run_state(qmp, deadline).await? != "running" {
        qmp.cont().await?;
    }
    restore_qemu_defaults(qmp).await;
    Ok(())
}

/// The guest's run state once it left `finish-migrate`, in which QEMU
/// refuses `cont` ("Migration is not finalized yet"): the migration's
/// status can already say `failed` while the clean-up that leaves that
/// state (and restarts a guest that ran) is still to come (seen after an
/// I/O error in the migration's completion). Waits up to `deadline`, and
/// at least a few seconds.
async fn settled_run_state(qmp: &mut Qmp, deadline: Instant) -> Result<String, DriverError> {
    let deadline = deadline.max(Instant::now() + Duration::from_secs(5));
    loop {
        let state = qmp.status().await?;
        if state != "finish-migrate" || Instant::now() >= deadline {
            return Ok(state);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// QEMU's `max-bandwidth` default (128 MiB/s).
pub const QEMU_DEFAULT_BANDWIDTH: u64 = 128 << 20;
/// QEMU's `downtime-limit` default, in ms.
pub const QEMU_DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

/// After a move that did not complete: put back QEMU's own migration
/// settings on the source. A QEMU keeps capabilities and parameters across
/// migrations, so whatever comes next (a save, another move, a QMP user)
/// would otherwise inherit this move's `pause-before-switchover`, its 10 ms
/// `downtime-limit`, its bandwidth figures. The guest runs on regardless:
/// a refusal (or QEMU not done cleaning up the migration, see
/// [`Qmp::set_capabilities`]) is only logged.
pub(super) async fn restore_qemu_defaults(qmp: &mut Qmp) {
    let caps: Vec<(Cap, bool)> = MigrateParams::default()
        .capabilities()
        .into_iter()
        .map(|(c, _)| (c, false))
        .collect();
    let params = MigrateSetParameters {
        max_bandwidth: Some(QEMU_DEFAULT_BANDWIDTH),
        max_postcopy_bandwidth: Some(0),
        downtime_limit: Some(QEMU_DEFAULT_DOWNTIME_LIMIT_MS),
        avail_switchover_bandwidth: Some(0),
        ..Default::default()
    };
    let r = async {
        qmp.set_capabilities(&caps).await?;
        qmp.set_parameters(params).await
    };
    if let Err(e) = r.await {
        tracing::warn!(error = %e, "putting back QEMU's migration defaults after a failed move");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A QMP peer whose failed migration leaves the guest in
    /// `finish-migrate` for `finishing` run-state queries (then `paused`),
    /// and which refuses `cont` in that state as QEMU does; returns how
    /// many `cont` it accepted and refused.
    async fn fake_qemu(listener: tokio::net::UnixListener, finishing: usize) -> (usize, usize) {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n").await.unwrap();
        let (mut queries, mut running) = (0, false);
        let (mut accepted, mut refused) = (0, 0);
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
            let finishing_now = queries < finishing;
            let ret = match v["execute"].as_str() {
                Some("query-migrate") => serde_json::json!({"status": "failed"}),
                Some("query-status") => {
                    queries += 1;
                    let status = match (finishing_now, running) {
                        (true, _) => "finish-migrate",
                        (false, true) => "running",
                        (false, false) => "paused",
                    };
                    serde_json::json!({"status": status, "running": running})
                }
                Some("cont") if finishing_now => {
                    refused += 1;
                    let e = serde_json::json!({"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}, "id": id});
                    w.write_all(format!("{e}\n").as_bytes()).await.unwrap();
                    continue;
                }
                Some("cont") => {
                    accepted += 1;
                    running = true;
                    serde_json::json!({})
                }
                _ => serde_json::json!({}),
            };
            let reply = serde_json::json!({"return": ret, "id": id});
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
        (accepted, refused)
    }

    /// `fake_qemu` on a fresh socket, and a monitor connected to it.
    async fn connect_to_fake(
        finishing: usize,
    ) -> (
        Qmp,
        tokio::task::JoinHandle<(usize, usize)>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let fake = tokio::spawn(fake_qemu(
            tokio::net::UnixListener::bind(&path).unwrap(),
            finishing,
        ));
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        (qmp, fake, dir)
    }

    #[tokio::test]
    async fn the_guest_is_resumed_once_qemu_finalized_the_failed_migration() {
        let (mut qmp, fake, _dir) = connect_to_fake(3).await;
        let r = recover_source(&mut qmp, true).await;
        drop(qmp);
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(fake.await.unwrap(), (1, 0));
    }

    #[tokio::test]
    async fn the_wait_for_the_run_state_ends_at_its_deadline() {
        // Never finalized: the wait gives up after its (at least 5 s)
        // deadline, and `cont` then gets QEMU's refusal.
        let (mut qmp, fake, _dir) = connect_to_fake(usize::MAX).await;
        let started = Instant::now();
        let state = settled_run_state(&mut qmp, Instant::now()).await.unwrap();
        assert_eq!(state, "finish-migrate");
        assert!(started.elapsed() >= Duration::from_secs(5));
        let e = qmp.cont().await.unwrap_err().to_string();
        drop(qmp);
        assert!(e.contains("not finalized"), "{e}");
        assert_eq!(fake.await.unwrap(), (0, 1));
    }
}
