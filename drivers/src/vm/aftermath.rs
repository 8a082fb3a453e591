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
    if was_running && qmp.status().await? != "running" {
        cont_once_finalized(qmp, deadline).await?;
    }
    restore_qemu_defaults(qmp).await;
    Ok(())
}

/// `cont`, which QEMU refuses ("Migration is not finalized yet") while it
/// is still cleaning up a failed migration whose status already says
/// `failed` (seen after an I/O error in the migration's completion, with
/// the guest paused): asked again until it is done, up to `deadline`.
async fn cont_once_finalized(qmp: &mut Qmp, deadline: Instant) -> Result<(), DriverError> {
    // At least a few seconds, however long the wait for the status took.
    let deadline = deadline.max(Instant::now() + Duration::from_secs(5));
    loop {
        match qmp.cont().await {
            Err(e) if e.to_string().contains("not finalized") && Instant::now() < deadline => {
                tracing::debug!("cont: {e}; asking again");
                tokio::time::sleep(POLL).await;
            }
            r => return r,
        }
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

    /// A QMP peer that refuses `cont` as QEMU does while it cleans up a
    /// failed migration, `refusals` times, then accepts it; returns how
    /// many `cont` it was sent.
    async fn fake_qemu(listener: tokio::net::UnixListener, refusals: usize) -> usize {
        let (sock, _) = listener.accept().await.unwrap();
        let (r, mut w) = sock.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": []}}\n").await.unwrap();
        let mut conts = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
            let reply = if v["execute"] == "cont" {
                conts += 1;
                if conts <= refusals {
                    serde_json::json!({"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}, "id": id})
                } else {
                    serde_json::json!({"return": {}, "id": id})
                }
            } else {
                serde_json::json!({"return": {}, "id": id})
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
        conts
    }

    async fn cont_against(refusals: usize, deadline: Instant) -> (Result<(), DriverError>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let fake = tokio::spawn(fake_qemu(
            tokio::net::UnixListener::bind(&path).unwrap(),
            refusals,
        ));
        let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let r = cont_once_finalized(&mut qmp, deadline).await;
        drop(qmp);
        (r, fake.await.unwrap())
    }

    #[tokio::test]
    async fn cont_is_asked_again_until_qemu_finalized_the_failed_migration() {
        let (r, conts) = cont_against(3, Instant::now()).await;
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(conts, 4);
    }

    #[tokio::test]
    async fn cont_gives_up_after_its_deadline() {
        // Refused for good: given up after the (at least 5 s) deadline.
        let (r, conts) = cont_against(usize::MAX, Instant::now()).await;
        let e = r.unwrap_err().to_string();
        assert!(e.contains("not finalized"), "{e}");
        assert!(conts > 10, "{conts}");
    }
}
