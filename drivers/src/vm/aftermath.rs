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
        qmp.cont().await?;
    }
    restore_qemu_defaults(qmp).await;
    Ok(())
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
