//! What a migration that did not complete leaves in the source QEMU, and
//! putting it back: the guest running as before, QEMU's own migration
//! settings, and only once QEMU itself has cleaned up.

use std::time::{Duration, Instant};

use qapi::qmp::{MigrateSetParameters, MigrationCapability as Cap};

use super::migrate::{in_progress, MigrateParams, POLL, SETTLE_POLL, STREAM_FD};
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
        qmp.cont().await?;
    }
    restore_qemu_defaults(qmp).await;
    Ok(())
}

/// How long QEMU may take to clean up after a migration ended.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Wait until QEMU finished cleaning up after a migration; false if it did
/// not within [`CLEANUP_TIMEOUT`] (true if it cannot tell). A migration ends in two steps: its thread
/// sets the final status (`failed`, `cancelled`, `completed`), then a bottom
/// half on the main loop cleans up. Capabilities must not change in between:
/// QEMU 10.0 stops multifd's channels there only if `multifd` is still on,
/// and then aborts (`yank_unregister_instance`: assertion
/// `QLIST_EMPTY(&entry->yankfns)` in util/yank.c) on the channels it left
/// registered. The clean-up's last step drops the migration's yank instance.
pub(super) async fn wait_migration_cleanup(qmp: &mut Qmp) -> bool {
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    loop {
        match qmp.migration_yank_registered().await {
            Ok(false) => return true,
            Ok(true) if Instant::now() < deadline => tokio::time::sleep(SETTLE_POLL).await,
            Ok(true) => return false,
            // Cannot tell (QEMU 7.2 and later have query-yank): go on.
            Err(e) => {
                tracing::warn!(error = %e, "query-yank");
                return true;
            }
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
/// a refusal is only logged.
pub(super) async fn restore_qemu_defaults(qmp: &mut Qmp) {
    if !wait_migration_cleanup(qmp).await {
        tracing::warn!("QEMU's clean-up of the failed migration did not finish within {CLEANUP_TIMEOUT:?}: its migration settings are left as they are");
        return;
    }
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
