//! The events the store has ingested, remembered by id so that an event
//! sent again (a retried batch, a file loaded twice, a consumer restarted
//! from an older offset) is applied once. An event's id is a 128-bit hash of
//! its source, type and the source's own event id ([`seen_id`]); ids are
//! kept by the UTC day they were ingested on, and a day is forgotten
//! whole once it is past the retention (`EngineConfig::dedup_days`).
//!
//! Only the writer reads this (to plan an ingest); it is logged with each
//! ingest batch, replayed at recovery, and written to segments at
//! checkpoints (one blob per day, `storage-format.md`). Its memory is about
//! 32 bytes per remembered id.
//!
//! This room owns the remembered ids. It knows nothing of sources, records
//! or facts.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

const DAY_MS: i64 = 86_400_000;

/// The UTC day of a Unix time in ms (day 0 is 1970-01-01).
pub fn day_of(at_ms: i64) -> i32 {
    at_ms.div_euclid(DAY_MS).clamp(0, i64::from(i32::MAX)) as i32
}

/// The de-duplication id of an event: FNV-1a (128-bit) of the source name,
/// the event type and the source's event id, each followed by a 0xFF byte
/// (which UTF-8 text never contains, so the parts cannot run together).
/// Stable across versions and machines: the ids are on disk.
pub fn seen_id(source: &str, event_type: &str, event_id: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for part in [source, event_type, event_id] {
        for &b in part.as_bytes().iter().chain(std::iter::once(&0xFF)) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

/// The ids of one day, shared with a running checkpoint until the writer
/// changes them.
pub type SeenDay = Arc<HashSet<u128>>;

/// Remembered event ids by the day they were ingested.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub days: BTreeMap<i32, SeenDay>,
    /// Days changed since the last checkpoint began.
    pub dirty: std::collections::BTreeSet<i32>,
}

impl Seen {
    pub fn contains(&self, id: u128) -> bool {
        self.days.values().rev().any(|d| d.contains(&id))
    }

    /// Remembers `ids` on `day`.
    pub fn insert(&mut self, day: i32, ids: &[u128]) {
        if ids.is_empty() {
            return;
        }
        let set = Arc::make_mut(self.days.entry(day).or_default());
        set.extend(ids.iter().copied());
        self.dirty.insert(day);
    }

    /// Forgets a day.
    pub fn drop_day(&mut self, day: i32) {
        if self.days.remove(&day).is_some() {
            self.dirty.insert(day);
        }
    }

    /// Ids remembered in all.
    pub fn len(&self) -> u64 {
        self.days.values().map(|d| d.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.days.values().all(|d| d.is_empty())
    }
}

/// A day's ids as a segment blob: ascending, 16 bytes each, little-endian.
pub fn encode_day(ids: &HashSet<u128>) -> Vec<u8> {
    let mut sorted: Vec<u128> = ids.iter().copied().collect();
    sorted.sort_unstable();
    let mut out = Vec::with_capacity(sorted.len() * 16);
    for id in sorted {
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// A blob written by [`encode_day`]; `None` if its length is not a multiple
/// of 16 or its ids are not strictly ascending.
pub fn decode_day(blob: &[u8]) -> Option<HashSet<u128>> {
    if !blob.len().is_multiple_of(16) {
        return None;
    }
    let mut set = HashSet::with_capacity(blob.len() / 16);
    let mut prev: Option<u128> = None;
    for chunk in blob.chunks_exact(16) {
        let id = u128::from_le_bytes(chunk.try_into().ok()?);
        if prev.is_some_and(|p| p >= id) {
            return None;
        }
        prev = Some(id);
        set.insert(id);
    }
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_parts_do_not_run_together() {
        assert_ne!(
            seen_id("jd_orders", "order", "J77"),
            seen_id("jd_orders", "refund", "J77")
        );
        assert_ne!(seen_id("ab", "c", "d"), seen_id("a", "bc", "d"));
        // Pinned: computed from the definition by an independent script.
        assert_eq!(
            seen_id("", "", ""),
            0xa68b_3a0a_9e8b_5822_836d_bc78_95a2_fd34
        );
        assert_eq!(
            seen_id("jd_orders", "order", "J77"),
            0xd4d2_f20e_30b4_4d4f_649d_2422_c1b4_57a2
        );
    }

    #[test]
    fn days_round_trip_and_bad_blobs_are_refused() {
        let set: HashSet<u128> = [3u128, u128::MAX, 0, 1 << 100].into_iter().collect();
        let blob = encode_day(&set);
        assert_eq!(blob.len(), 64);
        assert_eq!(decode_day(&blob), Some(set));
        assert_eq!(decode_day(&blob[..63]), None);
        let mut unsorted = blob.clone();
        unsorted[..16].copy_from_slice(&u128::MAX.to_le_bytes());
        assert_eq!(decode_day(&unsorted), None);
    }

    #[test]
    fn remembered_until_the_day_is_dropped() {
        let mut s = Seen::default();
        s.insert(100, &[1, 2]);
        s.insert(101, &[3]);
        assert!(s.contains(1) && s.contains(3) && !s.contains(4));
        assert_eq!(s.len(), 3);
        s.drop_day(100);
        assert!(!s.contains(1) && s.contains(3));
        assert!(s.dirty.contains(&100) && s.dirty.contains(&101));
        assert_eq!(day_of(86_400_000 - 1), 0);
        assert_eq!(day_of(86_400_000), 1);
    }
}
