//! The bandwidth QEMU assumes for the switch-over (`avail-switchover-bandwidth`).
//!
//! QEMU switches a pre-copy migration over once what is left fits in the
//! `downtime-limit` at the rate it expects for the final copy. By default
//! it estimates that rate every 100 ms from the bytes it wrote in the last
//! window. A window spent scanning RAM the guest never touched writes almost
//! nothing (a zero page is a marker of a few bytes), so the estimate drops
//! far below what the stream carries: measured here, 17 MB/s during a move
//! whose stream carried 1 GB/s a moment earlier. With a downtime target of
//! 10 ms, QEMU then waits for a dirty set of 170 KB, one a busy guest never
//! gets to, and the switch-over policy's settling budget runs out although
//! the guest had converged.
//!
//! ferry measures the rate itself between two of its `query-migrate` polls
//! in which QEMU sent mostly whole pages, and tells QEMU three quarters of
//! it (only while its switch-over policy runs: QEMU's own behaviour stays
//! QEMU's). The quarter held back is for what else the pause holds and
//! QEMU does not count: the devices' state, completing the disk mirror, the
//! target's resume. A window mixing zero pages and whole pages
//! underestimates the rate, which only makes the switch-over later, never
//! the pause longer.

use std::time::{Duration, Instant};

use super::qmp::MigrateInfo;

/// Shortest poll window a rate is taken from.
const MIN_WINDOW: Duration = Duration::from_millis(20);
/// Fewest whole-page bytes a window must have sent.
const MIN_BYTES: u64 = 1 << 20;
/// QEMU is told again when the rate moved by more than 1/this.
const CHANGE: u64 = 4;
const PAGE: u64 = 4096;
/// The share of the measured rate QEMU is told (see the module doc).
const SHARE: (u128, u128) = (3, 4);

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    transferred: u64,
    normal_bytes: u64,
    zero_pages: u64,
}

/// Samples the stream's rate from successive `query-migrate` answers.
#[derive(Debug, Default)]
pub(super) struct SwitchoverRate {
    mark: Option<Mark>,
    /// Bytes/s last given to QEMU (0: none yet).
    told: u64,
}

impl SwitchoverRate {
    /// Take a `query-migrate` answer read at `at`; returns the bandwidth
    /// (bytes/s) QEMU should now be told, if it changed.
    pub(super) fn observe(&mut self, at: Instant, info: &MigrateInfo) -> Option<u64> {
        let now = Mark {
            at,
            transferred: info.transferred?,
            normal_bytes: info.normal_bytes?,
            zero_pages: info.zero_pages?,
        };
        let Some(prev) = self.mark else {
            self.mark = Some(now);
            return None;
        };
        let dt = now.at.saturating_duration_since(prev.at);
        if dt < MIN_WINDOW {
            return None;
        }
        self.mark = Some(now);
        let normal = now.normal_bytes.saturating_sub(prev.normal_bytes);
        let zero = now.zero_pages.saturating_sub(prev.zero_pages) * PAGE;
        if normal < MIN_BYTES || zero > normal {
            return None;
        }
        let sent = now.transferred.saturating_sub(prev.transferred);
        let measured = u128::from(sent) * 1_000_000 / dt.as_micros().max(1);
        let rate = (measured * SHARE.0 / SHARE.1) as u64;
        if rate == 0 || (self.told != 0 && rate.abs_diff(self.told) <= self.told / CHANGE) {
            return None;
        }
        self.told = rate;
        Some(rate)
    }

    /// Bytes/s last given to QEMU (0: none).
    pub(super) fn told(&self) -> u64 {
        self.told
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(transferred: u64, normal_bytes: u64, zero_pages: u64) -> MigrateInfo {
        MigrateInfo {
            transferred: Some(transferred),
            normal_bytes: Some(normal_bytes),
            zero_pages: Some(zero_pages),
            ..Default::default()
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn rate_comes_from_windows_of_whole_pages_only() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = SwitchoverRate::default();
        assert_eq!(
            r.observe(t0, &info(0, 0, 0)),
            None,
            "first answer only marks"
        );
        // 20 MiB of whole pages in 20 ms.
        let rate = r.observe(ms(20), &info(20 * MIB, 20 * MIB, 0)).unwrap();
        assert_eq!(rate, 750 * MIB);
        assert_eq!(r.told(), rate);
        // Scanning untouched RAM: 100 000 zero pages, 0.8 MiB on the wire.
        // QEMU's own estimate would collapse; ferry keeps what it told.
        assert_eq!(
            r.observe(ms(40), &info(20 * MIB + 800_000, 20 * MIB, 100_000)),
            None
        );
        assert_eq!(r.told(), rate);
        // Whole pages again at about the same rate: nothing new to tell.
        assert_eq!(r.observe(ms(60), &info(41 * MIB, 40 * MIB, 100_000)), None);
        // Markedly slower (a quarter): told.
        let slow = r.observe(ms(80), &info(46 * MIB, 45 * MIB, 100_000));
        assert_eq!(slow, Some(250 * MIB * 3 / 4));
    }

    #[test]
    fn short_windows_and_missing_fields_tell_nothing() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = SwitchoverRate::default();
        assert_eq!(r.observe(t0, &MigrateInfo::default()), None);
        r.observe(t0, &info(0, 0, 0));
        // 10 ms is too short to trust; the mark stays, so the next window is 20 ms.
        assert_eq!(r.observe(ms(10), &info(5 * MIB, 5 * MIB, 0)), None);
        assert_eq!(
            r.observe(ms(20), &info(10 * MIB, 10 * MIB, 0)),
            Some(375 * MIB)
        );
        // Too few whole pages in the window (a small dirty set): no sample.
        assert_eq!(
            r.observe(ms(50), &info(10 * MIB + 1000, 10 * MIB + 1000, 0)),
            None
        );
    }
}
