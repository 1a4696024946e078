//! The sharded roaring bitmap every tag (and the set of live customers) is kept in.
//!
//! Customer ids are split into shards of 2^20 ids. Each shard is its own
//! CRoaring bitmap (the C library, through the `croaring` crate) behind an
//! `Arc`, so a snapshot is a cheap shallow copy and a write copies only the
//! shards it touches (at most 128 KiB each), never a whole tag. Queries run
//! shard by shard, which bounds the size of every intermediate result.
//!
//! CRoaring is the only in-memory representation: its container operations
//! are vectorised, 12–15× faster than roaring-rs on sparse shards and 2× on
//! dense ones (measured here), and keeping a second copy for counting would
//! double the memory of every tag that is queried. roaring-rs remains the
//! format of id sets inside log records (`storage::record`); this module
//! converts them at the edge. Both libraries read and write the same portable
//! serialization. This module owns the in-memory representation only; it
//! knows nothing of files, snapshots or queries.

use std::sync::Arc;

pub use croaring::Bitmap;
use roaring::RoaringBitmap;

/// log2 of the number of ids in a shard.
pub const SHARD_BITS: u32 = 20;
/// Ids in a shard.
pub const SHARD_SIZE: u32 = 1 << SHARD_BITS;

/// Shard number of a customer id.
#[inline]
pub fn shard_of(id: u32) -> usize {
    (id >> SHARD_BITS) as usize
}

/// First id of a shard.
#[inline]
pub fn shard_start(shard: usize) -> u32 {
    (shard as u32) << SHARD_BITS
}

/// A set of customer ids, stored as one CRoaring bitmap per shard.
#[derive(Clone, Default, Debug)]
pub struct ShardedBitmap {
    shards: Vec<Option<Arc<Bitmap>>>,
    len: u64,
}

impl PartialEq for ShardedBitmap {
    fn eq(&self, other: &Self) -> bool {
        if self.len != other.len {
            return false;
        }
        let n = self.shards.len().max(other.shards.len());
        (0..n).all(|i| match (self.shard(i), other.shard(i)) {
            (Some(a), Some(b)) => a == b,
            (None, None) => true,
            (Some(a), None) | (None, Some(a)) => a.is_empty(),
        })
    }
}

impl ShardedBitmap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of ids in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the highest shard number that may hold ids.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The bitmap of one shard, if it has any ids.
    #[inline]
    pub fn shard(&self, i: usize) -> Option<&Bitmap> {
        self.shards.get(i).and_then(|s| s.as_deref())
    }

    /// Non-empty shards with their numbers, in order.
    pub fn shards(&self) -> impl Iterator<Item = (usize, &Bitmap)> {
        self.shards
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_deref().map(|b| (i, b)))
    }

    pub fn contains(&self, id: u32) -> bool {
        self.shard(shard_of(id)).is_some_and(|b| b.contains(id))
    }

    /// How many ids of the set lie in `lo..=hi`.
    pub fn range_len(&self, lo: u32, hi: u32) -> u64 {
        if lo > hi {
            return 0;
        }
        (shard_of(lo)..=shard_of(hi))
            .filter_map(|i| self.shard(i))
            .map(|b| b.range_cardinality(lo..=hi))
            .sum()
    }

    /// For many membership tests in a row: [`Members::contains`] answers
    /// without a look-up while the set is every id from 0 up to its largest
    /// (the live customers of a store that has deleted none).
    pub fn members(&self) -> Members<'_> {
        let all_below = match self.max() {
            Some(max) if self.len == u64::from(max) + 1 => max.saturating_add(1),
            _ => 0,
        };
        Members {
            set: self,
            all_below,
        }
    }

    /// Shard `i`, unshared (copied if a snapshot still holds it), to change.
    fn shard_mut(&mut self, i: usize) -> &mut Bitmap {
        if self.shards.len() <= i {
            self.shards.resize(i + 1, None);
        }
        Arc::make_mut(self.shards[i].get_or_insert_with(Default::default))
    }

    /// Drops empty shards at the end (and empties), keeping the vector short.
    fn tidy(&mut self, i: usize) {
        if self.shards[i].as_ref().is_some_and(|b| b.is_empty()) {
            self.shards[i] = None;
        }
        while self.shards.last().is_some_and(|s| s.is_none()) {
            self.shards.pop();
        }
    }

    pub fn insert(&mut self, id: u32) -> bool {
        let added = self.shard_mut(shard_of(id)).add_checked(id);
        self.len += added as u64;
        added
    }

    pub fn remove(&mut self, id: u32) -> bool {
        let i = shard_of(id);
        if !self.shard(i).is_some_and(|b| b.contains(id)) {
            return false;
        }
        self.shard_mut(i).remove(id);
        self.len -= 1;
        self.tidy(i);
        true
    }

    /// Adds every id of `other`; returns how many were new.
    pub fn union_with(&mut self, other: &RoaringBitmap) -> u64 {
        let mut added = 0;
        let mut ids = Vec::new();
        for (i, lo, hi) in shard_spans(other) {
            ids.clear();
            ids.extend(other.range(lo..=hi));
            let shard = self.shard_mut(i);
            let before = shard.cardinality();
            if few(ids.len(), shard) {
                // A handful of ids: adding each in place beats a union,
                // which rebuilds every array container it touches.
                shard.add_many(&ids);
            } else {
                shard.or_inplace(&Bitmap::of(&ids));
            }
            added += shard.cardinality() - before;
        }
        self.len += added;
        added
    }

    /// Adds every id of another sharded bitmap; returns how many were new.
    pub fn union_sharded(&mut self, other: &ShardedBitmap) -> u64 {
        let mut added = 0;
        for (i, part) in other.shards() {
            let shard = self.shard_mut(i);
            let before = shard.cardinality();
            shard.or_inplace(part);
            added += shard.cardinality() - before;
        }
        self.len += added;
        added
    }

    /// Removes every id of another sharded bitmap; returns how many were
    /// present. Shards with nothing to remove stay shared.
    pub fn difference_sharded(&mut self, other: &ShardedBitmap) -> u64 {
        let mut removed = 0;
        for (i, part) in other.shards() {
            let n = self.shard(i).map_or(0, |b| b.and_cardinality(part));
            if n == 0 {
                continue;
            }
            self.shard_mut(i).andnot_inplace(part);
            removed += n;
            self.tidy(i);
        }
        self.len -= removed;
        removed
    }

    /// The ids in both.
    pub fn and(&self, other: &ShardedBitmap) -> ShardedBitmap {
        let mut out = ShardedBitmap::new();
        for (i, a) in self.shards() {
            if let Some(b) = other.shard(i) {
                out.set_shard(i, a & b);
            }
        }
        out
    }

    /// The ids of `self` not in `other`.
    pub fn and_not(&self, other: &ShardedBitmap) -> ShardedBitmap {
        let mut out = ShardedBitmap::new();
        for (i, a) in self.shards() {
            match other.shard(i) {
                Some(b) => out.set_shard(i, a - b),
                None => out.set_shard(i, a.clone()),
            }
        }
        out
    }

    /// The ids in exactly one of the two.
    pub fn xor(&self, other: &ShardedBitmap) -> ShardedBitmap {
        let mut out = ShardedBitmap::new();
        for i in 0..self.shard_count().max(other.shard_count()) {
            match (self.shard(i), other.shard(i)) {
                (Some(a), Some(b)) => out.set_shard(i, a ^ b),
                (Some(a), None) | (None, Some(a)) => out.set_shard(i, a.clone()),
                (None, None) => {}
            }
        }
        out
    }

    /// Who is in `new` and not in `self` (entered), and the reverse (left),
    /// looking only at the ids of `among` when it is given. Shards the two
    /// share (the same copy) are skipped unread.
    pub fn entered_left(
        &self,
        new: &ShardedBitmap,
        among: Option<&ShardedBitmap>,
    ) -> (ShardedBitmap, ShardedBitmap) {
        let mut entered = ShardedBitmap::new();
        let mut left = ShardedBitmap::new();
        for i in 0..self.shard_count().max(new.shard_count()) {
            let a = self.shards.get(i).and_then(Option::as_ref);
            let b = new.shards.get(i).and_then(Option::as_ref);
            if let (Some(a), Some(b)) = (a, b)
                && Arc::ptr_eq(a, b)
            {
                continue;
            }
            let c = match among {
                Some(m) => match m.shard(i) {
                    Some(c) => Some(c),
                    None => continue,
                },
                None => None,
            };
            let only = |x: &Bitmap| match c {
                Some(c) => x & c,
                None => x.clone(),
            };
            match (a, b) {
                (None, None) => {}
                (Some(a), None) => left.set_shard(i, only(a)),
                (None, Some(b)) => entered.set_shard(i, only(b)),
                (Some(a), Some(b)) => {
                    let (a, b) = (only(a), only(b));
                    entered.set_shard(i, &b - &a);
                    left.set_shard(i, &a - &b);
                }
            }
        }
        (entered, left)
    }

    /// Removes every id of `other`; returns how many were present.
    pub fn difference_with(&mut self, other: &RoaringBitmap) -> u64 {
        let mut removed = 0;
        let mut ids = Vec::new();
        for (i, lo, hi) in shard_spans(other) {
            let Some(current) = self.shard(i) else {
                continue;
            };
            ids.clear();
            ids.extend(other.range(lo..=hi));
            let before = current.cardinality();
            if few(ids.len(), current) {
                // Only copy a shard a snapshot shares when something changes.
                if !ids.iter().any(|&id| current.contains(id)) {
                    continue;
                }
                self.shard_mut(i).remove_many(&ids);
            } else {
                let part = Bitmap::of(&ids);
                if !current.intersect(&part) {
                    continue;
                }
                self.shard_mut(i).andnot_inplace(&part);
            }
            removed += before - self.shard(i).map_or(0, Bitmap::cardinality);
            self.tidy(i);
        }
        self.len -= removed;
        removed
    }

    /// True when the set shares an id with `other`.
    pub fn intersects(&self, other: &RoaringBitmap) -> bool {
        shard_spans(other).into_iter().any(|(i, lo, hi)| {
            self.shard(i)
                .is_some_and(|b| other.range(lo..=hi).any(|id| b.contains(id)))
        })
    }

    /// Number of ids in both sets.
    pub fn intersection_len(&self, other: &ShardedBitmap) -> u64 {
        self.shards()
            .filter_map(|(i, a)| other.shard(i).map(|b| a.and_cardinality(b)))
            .sum()
    }

    /// Builds a sharded bitmap from a flat roaring-rs one.
    pub fn from_roaring(bitmap: &RoaringBitmap) -> Self {
        let mut out = Self::new();
        let mut ids = Vec::new();
        for (i, lo, hi) in shard_spans(bitmap) {
            ids.clear();
            ids.extend(bitmap.range(lo..=hi));
            out.set_shard(i, Bitmap::of(&ids));
        }
        out
    }

    /// Sets one shard wholesale (used when loading from disk).
    pub fn set_shard(&mut self, i: usize, bitmap: Bitmap) {
        if self.shards.len() <= i {
            self.shards.resize(i + 1, None);
        }
        if let Some(old) = &self.shards[i] {
            self.len -= old.cardinality();
        }
        self.len += bitmap.cardinality();
        self.shards[i] = if bitmap.is_empty() {
            None
        } else {
            Some(Arc::new(bitmap))
        };
        self.tidy(i);
    }

    /// All ids as one flat bitmap.
    pub fn to_flat(&self) -> Bitmap {
        let parts: Vec<&Bitmap> = self.shards().map(|(_, b)| b).collect();
        Bitmap::fast_or(&parts)
    }

    /// The highest id in the set.
    pub fn max(&self) -> Option<u32> {
        self.shards().last().and_then(|(_, b)| b.maximum())
    }

    /// Every id in ascending order (one call into CRoaring per id: for
    /// long walks, [`for_each_id`] on each shard is faster).
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.shards().flat_map(|(_, b)| b.iter())
    }

    /// Bytes of the portable serialization of all shards: an estimate of
    /// memory use (CRoaring holds the same containers in memory).
    pub fn serialized_size(&self) -> usize {
        self.shards()
            .map(|(_, b)| b.get_serialized_size_in_bytes::<croaring::Portable>())
            .sum()
    }
}

/// Calls `f` with every id of `b` in ascending order. CRoaring's iterator
/// makes a call into C per id; this reads them 256 at a time.
#[inline]
pub fn for_each_id(b: &Bitmap, mut f: impl FnMut(u32)) {
    let mut buf = [0u32; 256];
    let mut it = b.iter();
    loop {
        let n = it.next_many(&mut buf);
        if n == 0 {
            return;
        }
        buf[..n].iter().for_each(|&id| f(id));
    }
}

/// The bitmap whose bit `k` of `words[w]` stands for id `base + 64 w + k`
/// (`base` a multiple of 65,536): the word-parallel counters of
/// `fields::bsi` end here. It writes the portable serialization directly
/// (a bitmap container per 65,536 ids holding more than 4,096, sorted
/// 16-bit values otherwise) and lets CRoaring read it, which is a copy
/// rather than an insertion per id. `bytes` is scratch space.
pub fn from_words(base: u32, words: &[u64], bytes: &mut Vec<u8>) -> Bitmap {
    const WORDS: usize = 1024;
    debug_assert_eq!(base % (1 << 16), 0, "containers start at multiples of 2^16");
    let key0 = base >> 16;
    let chunks: Vec<(u32, &[u64], u64)> = words
        .chunks(WORDS)
        .enumerate()
        .map(|(c, w)| {
            (
                key0 + c as u32,
                w,
                w.iter().map(|x| u64::from(x.count_ones())).sum(),
            )
        })
        .filter(|&(_, _, card)| card > 0)
        .collect();
    bytes.clear();
    // Cookie without run containers, then the count, the keys with their
    // cardinalities less one, and the byte offset of every container.
    bytes.extend_from_slice(&12346u32.to_le_bytes());
    bytes.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for &(key, _, card) in &chunks {
        bytes.extend_from_slice(&(key as u16).to_le_bytes());
        bytes.extend_from_slice(&((card - 1) as u16).to_le_bytes());
    }
    let mut offset = bytes.len() + 4 * chunks.len();
    for &(_, _, card) in &chunks {
        bytes.extend_from_slice(&(offset as u32).to_le_bytes());
        offset += if card > 4096 {
            WORDS * 8
        } else {
            card as usize * 2
        };
    }
    for &(_, w, card) in &chunks {
        if card > 4096 {
            for x in w.iter().copied().chain(std::iter::repeat(0)).take(WORDS) {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        } else {
            for (j, &x) in w.iter().enumerate() {
                let mut x = x;
                while x != 0 {
                    let v = (j * 64) as u16 + x.trailing_zeros() as u16;
                    bytes.extend_from_slice(&v.to_le_bytes());
                    x &= x - 1;
                }
            }
        }
    }
    Bitmap::try_deserialize::<croaring::Portable>(bytes)
        .expect("the portable serialization written above is valid")
}

/// True when `n` ids are few enough next to `shard` that changing them one
/// by one is cheaper than a set operation over whole containers.
fn few(n: usize, shard: &Bitmap) -> bool {
    n <= 64 || (n as u64).saturating_mul(32) <= shard.cardinality()
}

/// Membership tests on a [`ShardedBitmap`] ([`ShardedBitmap::members`]).
#[derive(Clone, Copy)]
pub struct Members<'a> {
    set: &'a ShardedBitmap,
    /// Every id below this is in the set (0 when that is not known).
    all_below: u32,
}

impl Members<'_> {
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        id < self.all_below || self.set.contains(id)
    }
}

/// The shards `bitmap` has ids in, each with its first and last possible id,
/// in shard order.
fn shard_spans(bitmap: &RoaringBitmap) -> Vec<(usize, u32, u32)> {
    let (Some(min), Some(max)) = (bitmap.min(), bitmap.max()) else {
        return Vec::new();
    };
    (shard_of(min)..=shard_of(max))
        .map(|i| {
            let lo = shard_start(i);
            (i, lo, lo.saturating_add(SHARD_SIZE - 1))
        })
        .filter(|&(_, lo, hi)| {
            shard_of(min) == shard_of(max) || bitmap.range_cardinality(lo..=hi) > 0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_across_shards() {
        let mut b = ShardedBitmap::new();
        assert!(b.insert(5));
        assert!(!b.insert(5));
        assert!(b.insert(SHARD_SIZE * 3 + 7));
        assert_eq!(b.len(), 2);
        assert_eq!(b.shard_count(), 4);
        assert!(b.remove(SHARD_SIZE * 3 + 7));
        assert_eq!(b.shard_count(), 1);
        assert!(!b.remove(99));
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![5]);
        assert_eq!(b.max(), Some(5));
        assert_eq!(ShardedBitmap::new().max(), None);
    }

    fn flat(b: &ShardedBitmap) -> RoaringBitmap {
        b.iter().collect()
    }

    #[test]
    fn bulk_ops_match_flat() {
        let base: RoaringBitmap = (0..5_000_000u32).step_by(7).collect();
        let mut b = ShardedBitmap::from_roaring(&base);
        assert_eq!(b.len(), base.len());
        assert_eq!(flat(&b), base);
        assert_eq!(b.to_flat().cardinality(), base.len());
        let rm: RoaringBitmap = (0..5_000_000u32).step_by(3).collect();
        let removed = b.difference_with(&rm);
        assert_eq!(removed, (&base & &rm).len());
        assert_eq!(flat(&b), &base - &rm);
        let added = b.union_with(&rm);
        assert_eq!(added, rm.len());
        assert_eq!(flat(&b), &base | &rm);
        assert_eq!(b.len(), (&base | &rm).len());
        assert!(b.intersects(&rm));
        assert!(!b.intersects(&RoaringBitmap::from([1u32, 2, 4])));
    }

    #[test]
    fn members_skip_look_ups_only_while_the_set_is_a_full_prefix() {
        let mut b = ShardedBitmap::from_roaring(&(0..3 * SHARD_SIZE + 5).collect());
        let m = b.members();
        assert_eq!(m.all_below, 3 * SHARD_SIZE + 5);
        assert!(m.contains(0) && m.contains(3 * SHARD_SIZE + 4));
        assert!(!m.contains(3 * SHARD_SIZE + 5));
        // One id gone: every answer is looked up again.
        assert!(b.remove(SHARD_SIZE + 7));
        let m = b.members();
        assert_eq!(m.all_below, 0);
        assert!(!m.contains(SHARD_SIZE + 7));
        assert!(m.contains(SHARD_SIZE + 6) && m.contains(SHARD_SIZE + 8));
        // As many ids as a prefix, but not starting at 0.
        let shifted = ShardedBitmap::from_roaring(&(1..=10u32).collect());
        assert_eq!(shifted.members().all_below, 0);
        assert!(!shifted.members().contains(0));
        assert_eq!(ShardedBitmap::new().members().all_below, 0);
    }

    #[test]
    fn few_ids_change_in_place_and_count_right() {
        let base: RoaringBitmap = (0..3_000_000u32).step_by(2).collect();
        let mut b = ShardedBitmap::from_roaring(&base);
        // Spread over three shards, half already present.
        let some: RoaringBitmap = [0u32, 1, SHARD_SIZE + 2, SHARD_SIZE + 3, 2_999_999].into();
        assert_eq!(b.union_with(&some), 3);
        assert_eq!(b.len(), base.len() + 3);
        assert_eq!(b.difference_with(&some), 5);
        assert_eq!(flat(&b), &base - &some);
        // Removing what is absent changes nothing and copies nothing.
        let snap = b.clone();
        assert_eq!(b.difference_with(&[1u32, 3].into()), 0);
        assert!(std::ptr::eq(
            b.shard(0).expect("shard 0"),
            snap.shard(0).expect("shard 0")
        ));
    }

    #[test]
    fn for_each_id_visits_every_id_in_order() {
        let b: Bitmap = (0..100_000u32).step_by(3).chain([1 << 30]).collect();
        let mut seen = Vec::new();
        for_each_id(&b, |id| seen.push(id));
        assert_eq!(seen, b.iter().collect::<Vec<_>>());
        for_each_id(&Bitmap::new(), |_| panic!("an empty bitmap has no ids"));
    }

    #[test]
    fn from_words_matches_the_bits() {
        let mut bytes = Vec::new();
        // A dense chunk, a sparse chunk, an empty chunk, and a partial tail.
        let mut words = vec![0u64; 3 * 1024 + 8];
        words[..1024].fill(0x5555_5555_5555_5555);
        words[1024 + 3] = 1 << 63 | 1;
        words[3 * 1024 + 7] = 1 << 5;
        let base = 5 << 16;
        let got = from_words(base, &words, &mut bytes);
        let expect: Bitmap = words
            .iter()
            .enumerate()
            .flat_map(|(w, &x)| {
                (0..64)
                    .filter(move |k| x >> k & 1 == 1)
                    .map(move |k| base + (w * 64 + k) as u32)
            })
            .collect();
        assert_eq!(got, expect);
        assert_eq!(got.cardinality(), 32_768 + 3);
        assert!(from_words(0, &[0; 16], &mut bytes).is_empty());
    }

    #[test]
    fn snapshot_copies_are_independent() {
        let mut a = ShardedBitmap::new();
        a.insert(1);
        let snap = a.clone();
        a.insert(2);
        assert!(!snap.contains(2));
        assert!(a.contains(2));
        let other = ShardedBitmap::from_roaring(&[1u32, 2, 3].into());
        assert_eq!(a.intersection_len(&other), 2);
        assert_eq!(snap.intersection_len(&other), 1);
    }
}
