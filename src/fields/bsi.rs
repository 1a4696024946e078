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

use crate::bitmap::{Bitmap, for_each_id};

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
pub type Slices<'a> = [Option<&'a Bitmap>];

fn bit(c: u64, k: usize) -> bool {
    k < 64 && c >> k & 1 == 1
}

/// True when `c` has a bit set at or above `slices.len()`: larger than any
/// value the slices can hold.
fn beyond(slices: &Slices, c: u64) -> bool {
    slices.len() < 64 && c >> slices.len() != 0
}

/// Bits of `c` below bit `k`.
fn low_bits(c: u64, k: usize) -> u64 {
    if k >= 64 { c } else { c & ((1u64 << k) - 1) }
}

/// Members of `within` whose value is ≤ `c`.
pub fn le(within: Bitmap, slices: &Slices, c: u64) -> Bitmap {
    if beyond(slices, c) {
        return within;
    }
    let mut eq = within;
    let mut lt = Bitmap::new();
    for k in (0..slices.len()).rev() {
        if eq.is_empty() {
            break;
        }
        // The rest of `c` is all ones: every candidate left is ≤ c.
        if low_bits(!c, k + 1) == 0 {
            break;
        }
        match (bit(c, k), slices[k]) {
            (true, Some(s)) => {
                lt |= &eq - s;
                eq &= s;
            }
            (true, None) => {
                lt |= eq;
                eq = Bitmap::new();
            }
            (false, Some(s)) => eq -= s,
            (false, None) => {}
        }
    }
    lt |= eq;
    lt
}

/// Members of `within` whose value is ≥ `c`.
pub fn ge(within: Bitmap, slices: &Slices, c: u64) -> Bitmap {
    if beyond(slices, c) {
        return Bitmap::new();
    }
    let mut eq = within;
    let mut gt = Bitmap::new();
    for k in (0..slices.len()).rev() {
        if eq.is_empty() {
            break;
        }
        // The rest of `c` is all zeros: every candidate left is ≥ c.
        if low_bits(c, k + 1) == 0 {
            break;
        }
        match (bit(c, k), slices[k]) {
            (false, Some(s)) => {
                gt |= &eq & s;
                eq -= s;
            }
            (false, None) => {}
            (true, Some(s)) => eq &= s,
            (true, None) => eq = Bitmap::new(),
        }
    }
    gt |= eq;
    gt
}

/// Members of `within` whose value is exactly `c`: one operation per slice.
pub fn eq(within: Bitmap, slices: &Slices, c: u64) -> Bitmap {
    if beyond(slices, c) {
        return Bitmap::new();
    }
    let mut eq = within;
    for k in (0..slices.len()).rev() {
        if eq.is_empty() {
            break;
        }
        match (bit(c, k), slices[k]) {
            (true, Some(s)) => eq &= s,
            (true, None) => return Bitmap::new(),
            (false, Some(s)) => eq -= s,
            (false, None) => {}
        }
    }
    eq
}

/// Members of `within` whose value lies in `lo..=hi`.
pub fn range(within: Bitmap, slices: &Slices, lo: u64, hi: u64) -> Bitmap {
    if lo > hi {
        return Bitmap::new();
    }
    if lo == hi {
        return eq(within, slices, lo);
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
pub fn min(within: &Bitmap, slices: &Slices) -> Option<u64> {
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
pub fn max(within: &Bitmap, slices: &Slices) -> Option<u64> {
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
pub fn sum_encoded(within: &Bitmap, slices: &Slices) -> u128 {
    slices
        .iter()
        .enumerate()
        .filter_map(|(k, s)| s.map(|s| (u128::from(within.and_cardinality(s))) << k))
        .sum()
}

/// Adds one to the counter of every member of `day`: bit-sliced addition of
/// a one-bit number to the counters in `counts` (slice `k` = bit `k`).
pub fn add_counts(counts: &mut Vec<Bitmap>, day: &Bitmap) {
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

/// Bit-sliced day counters over one shard of ids, held as plain words while
/// they are built: adding a day is a word-parallel ripple-carry addition (64
/// customers per operation, skipping words the day does not touch), which
/// beats roaring's container-by-container XOR/AND for counters that change
/// on every day. [`DenseCounter::finish`] turns the slices back into roaring
/// bitmaps for the comparison walk.
pub struct DenseCounter {
    base: u32,
    words: usize,
    slices: Vec<Vec<u64>>,
    carry: Vec<u64>,
    mask: Option<Vec<u64>>,
}

impl DenseCounter {
    /// Counters for ids `base .. base + span` (`span` a multiple of 64);
    /// with `mask`, only ids in it are counted.
    pub fn new(base: u32, span: u32, mask: Option<&Bitmap>) -> Self {
        let words = span.div_ceil(64) as usize;
        let mask = mask.map(|m| {
            let mut w = vec![0u64; words];
            for_each_id(m, |id| {
                let off = (id - base) as usize;
                w[off >> 6] |= 1 << (off & 63);
            });
            w
        });
        Self {
            base,
            words,
            slices: Vec::new(),
            carry: vec![0; words],
            mask,
        }
    }

    /// Adds one to the counter of every id of `day` (all within the span).
    pub fn add(&mut self, day: &Bitmap) {
        let (lo, hi) = match (day.minimum(), day.maximum()) {
            (Some(a), Some(b)) => (
                ((a - self.base) >> 6) as usize,
                ((b - self.base) >> 6) as usize + 1,
            ),
            _ => return,
        };
        let hi = hi.min(self.words);
        let (base, carry) = (self.base, &mut self.carry);
        for_each_id(day, |id| {
            let off = (id - base) as usize;
            carry[off >> 6] |= 1 << (off & 63);
        });
        if day.cardinality() < ((hi - lo) / 8) as u64 {
            // A sparse day: ripple only the words its members touch.
            let (base, mask) = (self.base, self.mask.as_deref());
            let (carry, slices, words) = (&mut self.carry, &mut self.slices, self.words);
            for_each_id(day, |id| {
                let w = ((id - base) >> 6) as usize;
                let mut c = std::mem::take(&mut carry[w]);
                if let Some(m) = mask {
                    c &= m[w];
                }
                let mut j = 0;
                while c != 0 {
                    if j == slices.len() {
                        slices.push(vec![0; words]);
                    }
                    let s = &mut slices[j][w];
                    let next = *s & c;
                    *s ^= c;
                    c = next;
                    j += 1;
                }
            });
            return;
        }
        let carry = &mut self.carry[lo..hi];
        if let Some(m) = &self.mask {
            for (c, m) in carry.iter_mut().zip(&m[lo..hi]) {
                *c &= m;
            }
        }
        // Slice by slice over the touched words: plain loops the compiler
        // vectorises; stop once no carry is left.
        let mut j = 0;
        loop {
            if j == self.slices.len() {
                self.slices.push(vec![0; self.words]);
            }
            let slice = &mut self.slices[j][lo..hi];
            let mut left = 0u64;
            for (s, c) in slice.iter_mut().zip(carry.iter_mut()) {
                let next = *s & *c;
                *s ^= *c;
                *c = next;
                left |= next;
            }
            if left == 0 {
                break;
            }
            j += 1;
        }
    }

    fn to_bitmap(&self, words: &[u64], bytes: &mut Vec<u8>) -> Bitmap {
        crate::bitmap::from_words(self.base, words, bytes)
    }

    /// The counter slices as roaring bitmaps (slice `k` = bit `k`).
    pub fn finish(self) -> Vec<Bitmap> {
        let mut bytes = Vec::with_capacity(self.words * 8);
        self.slices
            .iter()
            .map(|words| self.to_bitmap(words, &mut bytes))
            .collect()
    }

    /// [`DenseCounter::finish`], plus the ids whose counter is not zero.
    pub fn finish_with_any(self) -> (Vec<Bitmap>, Bitmap) {
        let mut any = vec![0u64; self.words];
        for slice in &self.slices {
            for (a, s) in any.iter_mut().zip(slice) {
                *a |= s;
            }
        }
        let mut bytes = Vec::with_capacity(self.words * 8);
        let any = self.to_bitmap(&any, &mut bytes);
        (self.finish(), any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn slices_of(values: &[(u32, i64)]) -> (Bitmap, Vec<Bitmap>) {
        let mut exists = Bitmap::new();
        let mut bits = vec![Bitmap::new(); BITS];
        for &(id, v) in values {
            exists.add(id);
            let u = encode(v);
            for (k, b) in bits.iter_mut().enumerate() {
                if u >> k & 1 == 1 {
                    b.add(id);
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
        let refs: Vec<Option<&Bitmap>> =
            bits.iter().map(|b| (!b.is_empty()).then_some(b)).collect();
        let mut probes: Vec<i64> = special.to_vec();
        probes.extend((0..40).map(|_| values[rng.random_range(0..values.len())].1));
        probes.extend((0..20).map(|_| rng.random_range(-1000..1000)));
        for &c in &probes {
            let expect_le: Bitmap = values.iter().filter(|x| x.1 <= c).map(|x| x.0).collect();
            let expect_ge: Bitmap = values.iter().filter(|x| x.1 >= c).map(|x| x.0).collect();
            assert_eq!(le(exists.clone(), &refs, encode(c)), expect_le, "<= {c}");
            assert_eq!(ge(exists.clone(), &refs, encode(c)), expect_ge, ">= {c}");
            let expect_eq: Bitmap = values.iter().filter(|x| x.1 == c).map(|x| x.0).collect();
            assert_eq!(eq(exists.clone(), &refs, encode(c)), expect_eq, "= {c}");
            let hi = c.saturating_add(500);
            let expect: Bitmap = values
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
        let n = i128::from(exists.cardinality() as u32);
        assert_eq!(sum_encoded(&exists, &refs) as i128 - (n << 63), sum);
    }

    #[test]
    fn day_counters_add_up() {
        let mut rng = StdRng::seed_from_u64(6);
        let days: Vec<Bitmap> = (0..45)
            .map(|_| (0..500u32).filter(|_| rng.random_bool(0.3)).collect())
            .collect();
        let mut counts = Vec::new();
        for d in &days {
            add_counts(&mut counts, d);
        }
        let mut dense = DenseCounter::new(0, 512, None);
        for d in &days {
            dense.add(d);
        }
        let (dense, any) = dense.finish_with_any();
        assert_eq!(dense, counts, "dense and roaring counters agree");
        let union = days.iter().fold(Bitmap::new(), |a, d| a | d);
        assert_eq!(any, union);
        // Sparse days (a few members over a wide span) take the per-word path.
        let mut wide = DenseCounter::new(0, 1 << 16, None);
        let sparse: Vec<Bitmap> = (0..20u32)
            .map(|d| {
                (0..5u32)
                    .map(|i| (i * 7919 + d * 13) % 60_000)
                    .chain([0, 65_535])
                    .collect()
            })
            .collect();
        let mut expect = Vec::new();
        for d in &sparse {
            wide.add(d);
            add_counts(&mut expect, d);
        }
        assert_eq!(wide.finish(), expect);
        let odd: Bitmap = (0..500u32).filter(|i| i % 2 == 1).collect();
        let mut masked = DenseCounter::new(0, 512, Some(&odd));
        for d in &days {
            masked.add(d);
        }
        let expect: Vec<Bitmap> = counts.iter().map(|c| c & &odd).collect();
        let got = masked.finish();
        assert_eq!(got[..], expect[..got.len()]);
        assert!(expect[got.len()..].iter().all(Bitmap::is_empty));
        let refs: Vec<Option<&Bitmap>> = counts.iter().map(Some).collect();
        let all: Bitmap = (0..500u32).collect();
        for n in [0u64, 1, 3, 13, 14, 30, 45, 46, 1000] {
            let expect: Bitmap = (0..500u32)
                .filter(|id| days.iter().filter(|d| d.contains(*id)).count() as u64 >= n)
                .collect();
            assert_eq!(ge(all.clone(), &refs, n), expect, ">= {n}");
            let expect_le: Bitmap = (0..500u32)
                .filter(|id| days.iter().filter(|d| d.contains(*id)).count() as u64 <= n)
                .collect();
            assert_eq!(le(all.clone(), &refs, n), expect_le, "<= {n}");
            let expect_eq: Bitmap = (0..500u32)
                .filter(|id| days.iter().filter(|d| d.contains(*id)).count() as u64 == n)
                .collect();
            assert_eq!(eq(all.clone(), &refs, n), expect_eq, "= {n}");
        }
    }
}
