//! Bit-sliced integers over one shard of customer ids.
//!
//! A value is kept as 64 bit slices plus an existence set: customer `c` is in
//! slice `k` when bit `k` of its *offset-binary* value is set. Offset binary
//! (`v as u64 ^ 1 << 63`) orders signed values as unsigned ones, so
//! `i64::MIN` is 0 and `i64::MAX` is `u64::MAX`, and every comparison below is
//! an unsigned walk from the top bit down. Each step is one or two bitmap
//! operations on the shard, so a range costs bit depth × shard operations and
//! never visits customers one by one; empty slices (the high bits of small
//! values) cost next to nothing.
//!
//! The same walk serves the day counters of `COUNT(x WITHIN n d)`: those are
//! unsigned slices built by bit-sliced addition ([`add_counts`]).
//!
//! This module is pure arithmetic on bitmaps; it knows nothing of fields,
//! snapshots or storage.

use roaring::RoaringBitmap;

/// Bit slices of one field.
pub const BITS: usize = 64;

/// The offset-binary form of a value.
pub fn encode(v: i64) -> u64 {
    (v as u64) ^ (1 << 63)
}

/// The value of an offset-binary form.
pub fn decode(u: u64) -> i64 {
    (u ^ (1 << 63)) as i64
}

/// One shard's slices: `slices[k]` holds the customers with bit `k` set
/// (`None` when nobody has it).
pub type Slices<'a> = [Option<&'a RoaringBitmap>];

fn bit(c: u64, k: usize) -> bool {
    k < 64 && c >> k & 1 == 1
}

/// True when `c` has a bit set at or above `slices.len()`: larger than any
/// value the slices can hold.
fn beyond(slices: &Slices, c: u64) -> bool {
    slices.len() < 64 && c >> slices.len() != 0
}

/// Members of `within` whose value is ≤ `c`.
pub fn le(within: RoaringBitmap, slices: &Slices, c: u64) -> RoaringBitmap {
    if beyond(slices, c) {
        return within;
    }
    let mut eq = within;
    let mut lt = RoaringBitmap::new();
    for k in (0..slices.len()).rev() {
        if eq.is_empty() {
            break;
        }
        match (bit(c, k), slices[k]) {
            (true, Some(s)) => {
                lt |= &eq - s;
                eq &= s;
            }
            (true, None) => {
                lt |= eq;
                eq = RoaringBitmap::new();
            }
            (false, Some(s)) => eq -= s,
            (false, None) => {}
        }
    }
    lt |= eq;
    lt
}

/// Members of `within` whose value is ≥ `c`.
pub fn ge(within: RoaringBitmap, slices: &Slices, c: u64) -> RoaringBitmap {
    if beyond(slices, c) {
        return RoaringBitmap::new();
    }
    let mut eq = within;
    let mut gt = RoaringBitmap::new();
    for k in (0..slices.len()).rev() {
        if eq.is_empty() {
            break;
        }
        match (bit(c, k), slices[k]) {
            (false, Some(s)) => {
                gt |= &eq & s;
                eq -= s;
            }
            (false, None) => {}
            (true, Some(s)) => eq &= s,
            (true, None) => eq = RoaringBitmap::new(),
        }
    }
    gt |= eq;
    gt
}

/// Members of `within` whose value lies in `lo..=hi`.
pub fn range(within: RoaringBitmap, slices: &Slices, lo: u64, hi: u64) -> RoaringBitmap {
    if lo > hi {
        return RoaringBitmap::new();
    }
    let above = if lo == 0 {
        within
    } else {
        ge(within, slices, lo)
    };
    if hi == u64::MAX {
        above
    } else {
        le(above, slices, hi)
    }
}

/// The smallest value among `within` (all of which must have a value).
pub fn min(within: &RoaringBitmap, slices: &Slices) -> Option<u64> {
    if within.is_empty() {
        return None;
    }
    let mut cand = within.clone();
    let mut u = 0u64;
    for k in (0..slices.len()).rev() {
        match slices[k] {
            None => {}
            Some(s) => {
                let zeros = &cand - s;
                if zeros.is_empty() {
                    u |= 1 << k;
                } else {
                    cand = zeros;
                }
            }
        }
    }
    Some(u)
}

/// The largest value among `within` (all of which must have a value).
pub fn max(within: &RoaringBitmap, slices: &Slices) -> Option<u64> {
    if within.is_empty() {
        return None;
    }
    let mut cand = within.clone();
    let mut u = 0u64;
    for k in (0..slices.len()).rev() {
        if let Some(s) = slices[k] {
            let ones = &cand & s;
            if !ones.is_empty() {
                u |= 1 << k;
                cand = ones;
            }
        }
    }
    Some(u)
}

/// The sum of the offset-binary forms of `within`'s values.
pub fn sum_encoded(within: &RoaringBitmap, slices: &Slices) -> u128 {
    slices
        .iter()
        .enumerate()
        .filter_map(|(k, s)| s.map(|s| (u128::from(within.intersection_len(s))) << k))
        .sum()
}

/// Adds one to the counter of every member of `day`: bit-sliced addition of
/// a one-bit number to the counters in `counts` (slice `k` = bit `k`).
pub fn add_counts(counts: &mut Vec<RoaringBitmap>, day: &RoaringBitmap) {
    let mut carry = day.clone();
    for slice in counts.iter_mut() {
        if carry.is_empty() {
            return;
        }
        let next = &*slice & &carry;
        *slice ^= &carry;
        carry = next;
    }
    if !carry.is_empty() {
        counts.push(carry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn slices_of(values: &[(u32, i64)]) -> (RoaringBitmap, Vec<RoaringBitmap>) {
        let mut exists = RoaringBitmap::new();
        let mut bits = vec![RoaringBitmap::new(); BITS];
        for &(id, v) in values {
            exists.insert(id);
            let u = encode(v);
            for (k, b) in bits.iter_mut().enumerate() {
                if u >> k & 1 == 1 {
                    b.insert(id);
                }
            }
        }
        (exists, bits)
    }

    #[test]
    fn comparisons_match_a_scan_including_extremes() {
        let mut rng = StdRng::seed_from_u64(5);
        let special = [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX];
        let values: Vec<(u32, i64)> = (0..3000u32)
            .map(|id| {
                let v = match id % 4 {
                    0 => special[rng.random_range(0..special.len())],
                    1 => rng.random_range(-1000..1000),
                    _ => rng.random(),
                };
                (id * 3, v)
            })
            .collect();
        let (exists, bits) = slices_of(&values);
        let refs: Vec<Option<&RoaringBitmap>> =
            bits.iter().map(|b| (!b.is_empty()).then_some(b)).collect();
        let mut probes: Vec<i64> = special.to_vec();
        probes.extend((0..40).map(|_| values[rng.random_range(0..values.len())].1));
        probes.extend((0..20).map(|_| rng.random_range(-1000..1000)));
        for &c in &probes {
            let expect_le: RoaringBitmap =
                values.iter().filter(|x| x.1 <= c).map(|x| x.0).collect();
            let expect_ge: RoaringBitmap =
                values.iter().filter(|x| x.1 >= c).map(|x| x.0).collect();
            assert_eq!(le(exists.clone(), &refs, encode(c)), expect_le, "<= {c}");
            assert_eq!(ge(exists.clone(), &refs, encode(c)), expect_ge, ">= {c}");
            let hi = c.saturating_add(500);
            let expect: RoaringBitmap = values
                .iter()
                .filter(|x| x.1 >= c && x.1 <= hi)
                .map(|x| x.0)
                .collect();
            assert_eq!(range(exists.clone(), &refs, encode(c), encode(hi)), expect);
        }
        let lo = values.iter().map(|x| x.1).min().unwrap();
        let hi = values.iter().map(|x| x.1).max().unwrap();
        assert_eq!(min(&exists, &refs).map(decode), Some(lo));
        assert_eq!(max(&exists, &refs).map(decode), Some(hi));
        let sum: i128 = values.iter().map(|x| i128::from(x.1)).sum();
        let n = i128::from(exists.len() as u32);
        assert_eq!(sum_encoded(&exists, &refs) as i128 - (n << 63), sum);
    }

    #[test]
    fn day_counters_add_up() {
        let mut rng = StdRng::seed_from_u64(6);
        let days: Vec<RoaringBitmap> = (0..45)
            .map(|_| (0..500u32).filter(|_| rng.random_bool(0.3)).collect())
            .collect();
        let mut counts = Vec::new();
        for d in &days {
            add_counts(&mut counts, d);
        }
        let refs: Vec<Option<&RoaringBitmap>> = counts.iter().map(Some).collect();
        let all: RoaringBitmap = (0..500u32).collect();
        for n in [0u64, 1, 3, 13, 14, 30, 45, 46, 1000] {
            let expect: RoaringBitmap = (0..500u32)
                .filter(|id| days.iter().filter(|d| d.contains(*id)).count() as u64 >= n)
                .collect();
            assert_eq!(ge(all.clone(), &refs, n), expect, ">= {n}");
            let expect_le: RoaringBitmap = (0..500u32)
                .filter(|id| days.iter().filter(|d| d.contains(*id)).count() as u64 <= n)
                .collect();
            assert_eq!(le(all.clone(), &refs, n), expect_le, "<= {n}");
        }
    }
}
