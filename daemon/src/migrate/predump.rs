//! Pre-copy of a live container's memory by CRIU pre-dumps: only with a
//! plan that agreed `criu_pre_dump` (both members passed `criu check
//! --feature mem_dirty_track`), protocol v2.
//!
//! On the fs channel, after the first rootfs pass (and its ack):
//!
//! ```text
//!  S: pre-dump 1 → archive of <images>.pre/1 ─────▶ T: into <images>.pre/1
//!  S: pre-dump 2 → archive of <images>.pre/2 ─────▶ T: into <images>.pre/2   (parent → ../1)
//!  ...           (PreDumpGoal decides when to stop)
//!  S: archive of an empty directory (the end) ────▶ T: page server with
//!                                                     --prev-images-dir ../<images>.pre/N
//!  S ◀── control: progress "pre-dumps received" ─── T
//!  S: freeze: criu dump --track-mem --prev-images-dir ../<images>.pre/N, pages on state
//! ```
//!
//! The container runs during every pre-dump; a pre-dump that fails (or a
//! cancel) fails the move before anything was frozen.

use std::path::{Path, PathBuf};

use ferry_drivers::container::{
    final_parent, pre_dump_dir, pre_dump_root, ContainerDriver, PreDumpGoal, PreDumpInfo,
};
use ferry_drivers::OpCtx;
use ferry_migration::{Plan, SourceState, StatePlan, StateTransfer};
use serde_json::json;

use super::progress::Phase;
use super::source::{send_archive, Bridge, MoveRun, Pass};
use super::target::{recv_archive, ReadBridge};
use super::ws::WsControl;

/// `progress.detail` of the target's ack that every pre-dump is on its disk
/// and its page server runs on top of them.
pub(super) const PRE_DUMPS_RECEIVED: &str = "pre-dumps received";

/// What this member offers (source) or accepts (target) for pre-dumps when
/// it can track dirty memory: up to 5 iterations, stopping once one writes
/// at most 10 % of the pages it scanned (the plan takes the smaller values).
pub(super) async fn pre_dump_capability() -> Option<StateTransfer> {
    match ContainerDriver::pre_dump_support().await {
        Ok(()) => Some(StateTransfer::CriuPreDump {
            max_iterations: 5,
            goal_percent: 10,
        }),
        Err(e) => {
            tracing::debug!("no CRIU pre-dumps on this member: {e}");
            None
        }
    }
}

/// The move's pre-dump settings, if it pre-dumps: `criu_pre_dump` agreed
/// for a live, non-lazy container move over protocol v2 (both sides decide
/// alike from the plan).
pub(super) fn pre_dump_of(plan: &Plan) -> Option<PreDumpGoal> {
    match &plan.state {
        StatePlan::CriuPageServer {
            pre_dump: Some(p),
            lazy_pages: false,
            ..
        } if plan.version >= 2 => Some(PreDumpGoal {
            max_iterations: p.max_iterations,
            goal_percent: p.goal_percent,
        }),
        _ => None,
    }
}

impl MoveRun {
    /// Source: pre-dump while the container runs and ship each iteration,
    /// then the end marker; wait for the target's ack. Returns the final
    /// dump's `--prev-images-dir` (`None` if no iteration was worth it).
    pub(super) async fn pre_copy_memory(
        &mut self,
        ctl: &mut WsControl,
        st: SourceState,
        mut bridge: Bridge,
        images: &Path,
        goal: PreDumpGoal,
        limit: Option<u64>,
    ) -> Result<(SourceState, Bridge, Option<PathBuf>), String> {
        let driver = ContainerDriver::default();
        let ctx = OpCtx::new(|_, _| {}, self.op.cancel_token());
        let root = pre_dump_root(images);
        let _ = std::fs::remove_dir_all(&root);
        let mut done: Vec<PreDumpInfo> = Vec::new();
        while goal.another(&done) {
            self.check_cancel()?;
            let i = done.len() as u32 + 1;
            self.phase(
                Phase::Memory,
                &format!("pre-copying memory (CRIU pre-dump {i}; the instance runs)"),
            );
            let info = driver
                .migrate_pre_dump(&self.spec, images, i, &ctx)
                .await
                .map_err(|e| format!("pre-dump {i} failed (the instance runs on): {e}"))?;
            let pass = Pass {
                cancel: self.op.cancel_token(),
                limit,
                ..Default::default()
            };
            let (b, _) = send_archive(bridge, pre_dump_dir(images, i), pass).await?;
            bridge = b;
            self.mark(&format!(
                "pre-dump {i} sent ({} of {} pages)",
                info.pages_written, info.pages_scanned
            ));
            done.push(info);
            self.op.set_meta("pre_dumps", pre_dump_meta(&done));
        }
        // The end: an empty directory.
        let end = root.join("end");
        std::fs::create_dir_all(&end).map_err(|e| format!("{}: {e}", end.display()))?;
        let (b, _) = send_archive(bridge, end, Pass::default()).await?;
        self.phase(
            Phase::Memory,
            "waiting for the target to take the pre-dumps",
        );
        let st = super::container::wait_ack(
            ctl,
            st,
            self.op.cancel_token(),
            PRE_DUMPS_RECEIVED,
            "take the pre-dumps",
        )
        .await?;
        let last = done.len() as u32;
        Ok((st, b, (last > 0).then(|| final_parent(images, last))))
    }
}

fn pre_dump_meta(done: &[PreDumpInfo]) -> serde_json::Value {
    json!(done
        .iter()
        .map(|d| json!({
            "iteration": d.iteration,
            "pages_written": d.pages_written,
            "pages_scanned": d.pages_scanned,
            "ms": d.took.as_millis() as u64,
        }))
        .collect::<Vec<_>>())
}

/// Target: receive pre-dump directories until the empty one. Returns the
/// bridge and the final page server's `--prev-images-dir` (`None` when the
/// source sent none).
pub(super) async fn recv_pre_dumps(
    mut bridge: ReadBridge,
    images: &Path,
) -> Result<(ReadBridge, Option<PathBuf>), String> {
    let _ = std::fs::remove_dir_all(pre_dump_root(images));
    let mut n = 0;
    loop {
        let dir = pre_dump_dir(images, n + 1);
        bridge = recv_archive(bridge, dir.clone(), false).await?;
        let empty = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .next()
            .is_none();
        if empty {
            let _ = std::fs::remove_dir(&dir);
            break;
        }
        n += 1;
    }
    tracing::debug!(pre_dumps = n, "move target: pre-dumps received");
    Ok((bridge, (n > 0).then(|| final_parent(images, n))))
}

/// Remove a move's checkpoint images and pre-dump directories (the source
/// after the move or its recovery, the target once the instance runs; a
/// failed receive deletes the whole run directory).
pub(super) fn remove_images(images: &Path) {
    let _ = std::fs::remove_dir_all(images);
    let _ = std::fs::remove_dir_all(pre_dump_root(images));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_migration::{FsPlan, PreDump};

    fn plan(version: u32, pre: Option<PreDump>, lazy: bool) -> Plan {
        Plan {
            instance_type: ferry_migration::InstanceType::Container,
            fs: FsPlan::Archive {
                compression: ferry_migration::Compression::Zstd,
            },
            state: StatePlan::CriuPageServer {
                pre_dump: pre,
                lazy_pages: lazy,
                page_sink: None,
            },
            state_compression: ferry_migration::Compression::None,
            volume_size: 0,
            snapshots: vec![],
            options: Default::default(),
            reasons: vec![],
            version,
        }
    }

    #[test]
    fn only_agreed_live_v2_moves_pre_dump() {
        let pd = PreDump {
            max_iterations: 4,
            goal_percent: 10,
        };
        assert_eq!(
            pre_dump_of(&plan(2, Some(pd), false)),
            Some(PreDumpGoal {
                max_iterations: 4,
                goal_percent: 10
            })
        );
        assert_eq!(pre_dump_of(&plan(2, None, false)), None);
        assert_eq!(pre_dump_of(&plan(1, Some(pd), false)), None, "v1");
        assert_eq!(pre_dump_of(&plan(2, Some(pd), true)), None, "post-copy");
    }
}
