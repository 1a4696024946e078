//! What the engine counts and times for operators: log syncs, checkpoints
//! (and the segments their compaction emptied), write requests and group
//! commits, and when readers last got a new snapshot. Plain atomics that
//! the engine's threads add to and anyone may read; how they are exported
//! (the server's metrics endpoint) is not this room's business.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Upper bounds of the timing buckets, in microseconds (the last bucket,
/// past them all, is unbounded).
pub const BOUNDS_MICROS: [u64; 18] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 60_000_000,
];

/// A histogram of durations.
#[derive(Debug)]
pub struct Timings {
    /// Per bucket (not cumulative); the last one past every bound.
    buckets: [AtomicU64; BOUNDS_MICROS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

/// A histogram read at one moment: its sum in seconds, its count, and per
/// bucket its upper bound in seconds (`f64::INFINITY` for the last) and
/// its own count.
pub type TimingsRead = (f64, u64, Vec<(f64, u64)>);

impl Timings {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BOUNDS_MICROS.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> TimingsRead {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let bound = BOUNDS_MICROS
                    .get(i)
                    .map_or(f64::INFINITY, |&b| b as f64 / 1e6);
                (bound, c.load(Ordering::Relaxed))
            })
            .collect();
        (
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.count.load(Ordering::Relaxed),
            buckets,
        )
    }
}

/// Everything the engine counts.
#[derive(Debug)]
pub struct Meters {
    /// `fdatasync` of the log (each group commit's, with `sync = always`).
    pub log_sync: Timings,
    /// Checkpoints that finished, from their start to their manifest.
    pub checkpoint: Timings,
    pub checkpoints_failed: AtomicU64,
    /// Segments emptied into a checkpoint's new one by compaction.
    pub segments_compacted: AtomicU64,
    /// Write requests the writer took, and the group commits they made.
    pub writes: AtomicU64,
    pub commits: AtomicU64,
    /// Of those commits, the ones made on the caller's thread (a small
    /// write that found the writer idle).
    pub commits_on_caller: AtomicU64,
    started: Instant,
    /// Microseconds after `started` of the last publish.
    published_at: AtomicU64,
}

impl Default for Meters {
    fn default() -> Self {
        Self {
            log_sync: Timings::default(),
            checkpoint: Timings::default(),
            checkpoints_failed: AtomicU64::new(0),
            segments_compacted: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commits_on_caller: AtomicU64::new(0),
            started: Instant::now(),
            published_at: AtomicU64::new(0),
        }
    }
}

impl Meters {
    /// Readers got a new snapshot now.
    pub fn published(&self) {
        let us = self.started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        self.published_at.store(us, Ordering::Relaxed);
    }

    /// How long ago readers last got a new snapshot (since the engine
    /// opened, when none was published since).
    pub fn snapshot_age(&self) -> Duration {
        let at = Duration::from_micros(self.published_at.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_their_buckets() {
        let t = Timings::default();
        t.observe(Duration::from_micros(50));
        t.observe(Duration::from_micros(51));
        t.observe(Duration::from_secs(3600));
        let (sum, count, buckets) = t.read();
        assert_eq!(count, 3);
        assert!((sum - 3600.000101).abs() < 1e-6);
        assert_eq!(buckets[0], (0.00005, 1));
        assert_eq!(buckets[1], (0.0001, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 3);
    }
}
