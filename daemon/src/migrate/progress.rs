//! Move progress as users see it: a phase, bytes done/total, rate and ETA,
//! in the operation's metadata (`phase`, `stage`, `move_progress` and the
//! structured `progress` object).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::ops::Op;

/// The phases of a move, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preparing,
    Filesystem,
    Memory,
    Restoring,
    Completing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Filesystem => "filesystem",
            Phase::Memory => "memory",
            Phase::Restoring => "restoring",
            Phase::Completing => "completing",
        }
    }
}

/// Bytes done of a total at a rate, for one phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub phase: Phase,
    pub bytes_done: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    pub rate_bytes_per_s: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<u64>,
}

impl Figures {
    /// From bytes done so far after `elapsed` (rate = average).
    pub fn measure(phase: Phase, done: u64, total: Option<u64>, elapsed: Duration) -> Figures {
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (done as f64 / secs) as u64
        } else {
            0
        };
        let eta = match (total, rate) {
            (Some(t), r) if r > 0 => Some(t.saturating_sub(done) / r),
            _ => None,
        };
        Figures {
            phase,
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_s: rate,
            eta_s: eta,
        }
    }

    /// "12.0 MB of 40.0 MB, 25.1 MB/s, ETA 1 s".
    pub fn summary(&self) -> String {
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        let mut s = mb(self.bytes_done);
        if let Some(t) = self.bytes_total {
            s.push_str(&format!(" of {}", mb(t)));
        }
        s.push_str(&format!(", {:.1} MB/s", self.rate_bytes_per_s as f64 / 1e6));
        if let Some(e) = self.eta_s {
            s.push_str(&format!(", ETA {e} s"));
        }
        s
    }
}

/// Set the phase and its human text.
pub fn set_phase(op: &Op, phase: Phase, text: &str) {
    op.set_meta("phase", json!(phase.as_str()));
    op.set_meta("stage", json!(text));
}

/// Publish figures (also as the `move_progress` line the CLI shows).
pub fn publish(op: &Op, f: &Figures) {
    op.set_meta("progress", json!(f));
    op.set_meta("move_progress", json!(f.summary()));
}

/// Publishes `bytes()` twice a second while it lives (dropping it stops
/// that); [`Ticker::finish`] also publishes the final figures.
pub struct Ticker {
    task: tokio::task::JoinHandle<()>,
    publish_now: Arc<dyn Fn() + Send + Sync>,
}

impl Ticker {
    /// Stop and publish the last figures (a pass shorter than the period
    /// would otherwise show none).
    pub fn finish(self) {
        self.task.abort();
        (self.publish_now)();
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start a [`Ticker`] for `phase`.
pub fn ticker(
    op: Arc<Op>,
    phase: Phase,
    total: Option<u64>,
    bytes: impl Fn() -> u64 + Send + Sync + 'static,
) -> Ticker {
    let started = Instant::now();
    let publish_now: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        publish(
            &op,
            &Figures::measure(phase, bytes(), total, started.elapsed()),
        )
    });
    let tick = publish_now.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tick();
        }
    });
    Ticker { task, publish_now }
}

/// Bytes a volume occupies (file sizes, not following symlinks).
pub fn tree_size(root: &std::path::Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(root) else {
        return 0;
    };
    if !meta.is_dir() {
        return if meta.is_file() { meta.len() } else { 0 };
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return 0;
    };
    rd.flatten().map(|e| tree_size(&e.path())).sum()
}

/// Free bytes on the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_rate_eta_and_summary() {
        let f = Figures::measure(
            Phase::Filesystem,
            10_000_000,
            Some(40_000_000),
            Duration::from_secs(2),
        );
        assert_eq!(f.rate_bytes_per_s, 5_000_000);
        assert_eq!(f.eta_s, Some(6));
        assert_eq!(f.summary(), "10.0 MB of 40.0 MB, 5.0 MB/s, ETA 6 s");
        let f = Figures::measure(Phase::Memory, 0, None, Duration::ZERO);
        assert_eq!((f.rate_bytes_per_s, f.eta_s), (0, None));
        assert_eq!(serde_json::to_value(&f).unwrap()["phase"], json!("memory"));
    }

    #[tokio::test]
    async fn a_ticker_finished_early_still_shows_the_final_figures() {
        let ops = crate::ops::Operations::new(crate::events::EventBus::new(), "m1".into());
        let op = ops.spawn("Testing", json!({}), false, |op| async move {
            op.cancel_token().cancelled().await;
            crate::ops::Outcome::Cancelled("done".into())
        });
        // Ended well within the 500 ms period: nothing ticked yet.
        let t = ticker(op.clone(), Phase::Filesystem, Some(4000), || 3000);
        assert!(op.to_json()["metadata"].get("progress").is_none());
        t.finish();
        let shown = op.to_json()["metadata"]["progress"].clone();
        assert_eq!(shown["bytes_done"], 3000, "{shown}");
        assert_eq!(shown["phase"], "filesystem", "{shown}");
        let _ = op.cancel();
    }

    #[test]
    fn tree_size_counts_files() {
        let d = std::env::temp_dir().join(format!("ferry-ts-{}", rand::random::<u64>()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), vec![0u8; 1000]).unwrap();
        std::fs::write(d.join("g"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/etc", d.join("l")).unwrap();
        assert_eq!(tree_size(&d), 1024);
        assert!(free_bytes(&d).unwrap() > 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
