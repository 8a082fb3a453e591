//! Iterative pre-copy of a container's memory (CRIU pre-dumps), for hosts
//! where `criu check --feature mem_dirty_track` passes (soft-dirty bits).
//!
//! ```text
//!  <images>.pre/1   criu pre-dump --track-mem                 (all pages; the tasks run on)
//!  <images>.pre/2   criu pre-dump --track-mem --prev-images-dir ../1   (pages dirtied since 1)
//!  ...              until an iteration writes ≤ goal % of what it scanned, stops shrinking,
//!                   or max_iterations
//!  <images>         criu dump --track-mem --prev-images-dir ../<images>.pre/N  (the rest, frozen)
//! ```
//!
//! Each directory gets a `parent` link to the previous one (CRIU makes it);
//! the restore follows the chain. The daemon ships every pre-dump directory
//! to the target while the container runs, into the same layout, and starts
//! the target's page server with the same `--prev-images-dir` before the
//! final dump. Without dirty tracking no pre-dump is ever run: on such a
//! kernel CRIU 4.2.1's `pre-dump` aborts ("BUG at criu/mem.c:46") and can
//! leave its parasite in the live tasks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::criu;
use super::state::mkdirs;
use super::{ContainerDriver, Layout};
use crate::{DriverError, InstanceSpec, OpCtx};

/// Directory of pre-dump iteration `i` (from 1) of the move whose final
/// images go to `images`: `<images>.pre/<i>`.
pub fn pre_dump_dir(images: &Path, i: u32) -> PathBuf {
    pre_dump_root(images).join(i.to_string())
}

/// `<images>.pre`: every pre-dump of one move (remove it with the images).
pub fn pre_dump_root(images: &Path) -> PathBuf {
    let mut name = images.file_name().unwrap_or_default().to_os_string();
    name.push(".pre");
    images.with_file_name(name)
}

/// `--prev-images-dir` of the dump or page server writing into `images`
/// after pre-dump `last`: relative, as CRIU wants it.
pub fn final_parent(images: &Path, last: u32) -> PathBuf {
    let root = pre_dump_root(images);
    Path::new("..")
        .join(root.file_name().unwrap_or_default())
        .join(last.to_string())
}

/// What one pre-dump did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreDumpInfo {
    pub iteration: u32,
    pub pages_scanned: u64,
    pub pages_written: u64,
    pub took: Duration,
}

/// When to stop pre-dumping (the plan's `max_iterations`, `goal_percent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreDumpGoal {
    pub max_iterations: u32,
    pub goal_percent: u8,
}

impl PreDumpGoal {
    /// Whether another pre-dump is worth it after `done` (in order): not
    /// when the last one wrote at most `goal_percent` % of the pages it
    /// scanned (the final dump will be that small), when it wrote more than
    /// 90 % of what the one before wrote (the guest dirties as fast as we
    /// copy: more passes do not help), or after `max_iterations`.
    pub fn another(&self, done: &[PreDumpInfo]) -> bool {
        let Some(last) = done.last() else {
            return self.max_iterations > 0;
        };
        if done.len() as u32 >= self.max_iterations {
            return false;
        }
        if last.pages_written * 100 <= u64::from(self.goal_percent) * last.pages_scanned.max(1) {
            return false;
        }
        match done.len().checked_sub(2).map(|i| done[i]) {
            Some(prev) => last.pages_written * 10 < prev.pages_written * 9,
            None => true,
        }
    }
}

impl ContainerDriver {
    /// Pre-dump iteration `iteration` (from 1) of the running container
    /// into [`pre_dump_dir`]`(images, iteration)`, on top of the previous
    /// one. The container keeps running; on failure CRIU resumes it.
    /// Refuses when the host cannot track dirty memory.
    pub async fn migrate_pre_dump(
        &self,
        spec: &InstanceSpec,
        images: &Path,
        iteration: u32,
        ctx: &OpCtx,
    ) -> Result<PreDumpInfo, DriverError> {
        if iteration == 0 {
            return Err(DriverError::InvalidConfig(
                "pre-dump iterations count from 1".into(),
            ));
        }
        Self::pre_dump_support().await?;
        let rec = self.check_dumpable(spec).await?;
        let bin = criu::checked_criu().await?;
        ctx.check_cancelled("move (pre-dump not started; the container runs on)")?;
        let l = Layout::of(spec);
        let dir = pre_dump_dir(images, iteration);
        let _ = std::fs::remove_dir_all(&dir);
        mkdirs(&[&dir, &spec.paths.logs])?;
        let parent = (iteration > 1).then(|| PathBuf::from(format!("../{}", iteration - 1)));
        let args = criu::pre_dump_args(rec.pid, &dir, &l.dump_log, parent.as_deref());
        let t0 = Instant::now();
        criu::run(
            &bin,
            &args,
            &l.dump_log,
            self.timeouts.dump,
            Some(ctx.cancel_token()),
        )
        .await
        .map_err(|(_, e)| e)?;
        let stats = std::fs::read(dir.join("stats-dump"))
            .ok()
            .and_then(|b| criu::parse_dump_stats(&b))
            .unwrap_or_default();
        let info = PreDumpInfo {
            iteration,
            pages_scanned: stats.pages_scanned.unwrap_or(0),
            pages_written: stats.pages_written.unwrap_or(0),
            took: t0.elapsed(),
        };
        tracing::info!(container = %spec.name, ?info, "pre-dump done (the container runs on)");
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(i: u32, scanned: u64, written: u64) -> PreDumpInfo {
        PreDumpInfo {
            iteration: i,
            pages_scanned: scanned,
            pages_written: written,
            took: Duration::ZERO,
        }
    }

    #[test]
    fn layout_and_parents() {
        let images = Path::new("/m/run/c1/migrate-images");
        assert_eq!(
            pre_dump_dir(images, 2),
            Path::new("/m/run/c1/migrate-images.pre/2")
        );
        assert_eq!(
            final_parent(images, 3),
            Path::new("../migrate-images.pre/3")
        );
        // The final dump's parent, resolved from the images dir, is the
        // last pre-dump's directory.
        assert_eq!(
            images.join(final_parent(images, 3)),
            Path::new("/m/run/c1/migrate-images/../migrate-images.pre/3")
        );
    }

    #[test]
    fn when_to_stop() {
        let g = PreDumpGoal {
            max_iterations: 4,
            goal_percent: 10,
        };
        assert!(g.another(&[]));
        assert!(!PreDumpGoal {
            max_iterations: 0,
            goal_percent: 10
        }
        .another(&[]));
        // First pass writes everything: go on.
        assert!(g.another(&[it(1, 25_000, 25_000)]));
        // Small enough (≤ 10 % of what was scanned): stop.
        assert!(!g.another(&[it(1, 25_000, 25_000), it(2, 25_000, 2_000)]));
        // Shrinking but still large: go on.
        assert!(g.another(&[it(1, 25_000, 25_000), it(2, 25_000, 12_000)]));
        // Not shrinking (a guest dirtying as fast as we copy): stop.
        assert!(!g.another(&[
            it(1, 25_000, 25_000),
            it(2, 25_000, 12_000),
            it(3, 25_000, 11_500)
        ]));
        // The cap.
        assert!(!g.another(&[
            it(1, 25_000, 25_000),
            it(2, 25_000, 12_000),
            it(3, 25_000, 6_000),
            it(4, 25_000, 3_000)
        ]));
    }
}
