//! The customer dictionary: external string keys to dense `u32` ids and back.
//!
//! Keys added since the last checkpoint live in memory (`recent`); older keys
//! live in dictionary sections of segment files, read in place through the
//! memory map (an id-ordered table for id → key and an open-addressing hash
//! table for key → id), so start-up does not load the dictionary at all.
//!
//! The dictionary does not decide whether a customer is alive: a deleted
//! customer's key may still be found here until a merge rewrites the sections,
//! and callers check the live set of their snapshot. Ids are never reused.

use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::RwLock;

use crate::bitmap::ShardedBitmap;
use crate::error::{Error, Result};
use crate::storage::codec::{fnv1a64, le_u32, le_u64};
use crate::storage::segment::{BlobKind, Entry, Segment};

const SECTION_HEADER_LEN: usize = 16;

/// Encodes a dictionary section from `(id, key)` pairs in ascending id order.
pub fn encode_section<'a>(entries: impl Iterator<Item = (u32, &'a str)>) -> Vec<u8> {
    let mut ids: Vec<u32> = Vec::new();
    let mut offsets: Vec<u64> = vec![0];
    let mut keys: Vec<u8> = Vec::new();
    for (id, key) in entries {
        debug_assert!(ids.last().is_none_or(|&last| last < id));
        ids.push(id);
        keys.extend_from_slice(key.as_bytes());
        offsets.push(keys.len() as u64);
    }
    let count = ids.len();
    let slot_count = (count * 2).next_power_of_two().max(2);
    let mask = slot_count - 1;
    let mut slots = vec![0u32; slot_count];
    for i in 0..count {
        let key = &keys[offsets[i] as usize..offsets[i + 1] as usize];
        let mut s = fnv1a64(key) as usize & mask;
        while slots[s] != 0 {
            s = (s + 1) & mask;
        }
        slots[s] = i as u32 + 1;
    }
    let mut out =
        Vec::with_capacity(SECTION_HEADER_LEN + count * 12 + 8 + slot_count * 4 + keys.len());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&(slot_count as u32).to_le_bytes());
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for id in &ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for o in &offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    for s in &slots {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(&keys);
    out
}

/// One dictionary section, read in place from a mapped segment.
pub struct DictLayer {
    seg: Arc<Segment>,
    entry: Entry,
    count: usize,
    slot_count: usize,
    ids_at: usize,
    offsets_at: usize,
    slots_at: usize,
    keys_at: usize,
    min_id: u32,
    max_id: u32,
}

impl DictLayer {
    /// Opens the dictionary section of a segment, checking its crc and layout.
    pub fn open(seg: Arc<Segment>) -> Result<Self> {
        let entry = *seg
            .entries_of(BlobKind::Dictionary, 0)
            .first()
            .ok_or_else(|| {
                Error::corrupt(
                    &seg.path,
                    0,
                    "the manifest names this segment for a dictionary section it does not have",
                )
            })?;
        let b = seg.blob(&entry)?;
        let corrupt = |why: &str| {
            Error::corrupt(
                &seg.path,
                entry.offset,
                format!("dictionary section: {why}"),
            )
        };
        let count = le_u32(b, 0).ok_or_else(|| corrupt("short header"))? as usize;
        let slot_count = le_u32(b, 4).ok_or_else(|| corrupt("short header"))? as usize;
        let key_bytes = le_u64(b, 8).ok_or_else(|| corrupt("short header"))? as usize;
        if !slot_count.is_power_of_two() || slot_count < count {
            return Err(corrupt("bad hash table size"));
        }
        let ids_at = SECTION_HEADER_LEN;
        let offsets_at = ids_at + count * 4;
        let slots_at = offsets_at + (count + 1) * 8;
        let keys_at = slots_at + slot_count * 4;
        if keys_at.checked_add(key_bytes) != Some(b.len()) {
            return Err(corrupt("sizes do not add up to the blob length"));
        }
        let min_id = if count > 0 {
            le_u32(b, ids_at).unwrap_or(0)
        } else {
            0
        };
        let max_id = if count > 0 {
            le_u32(b, ids_at + (count - 1) * 4).unwrap_or(0)
        } else {
            0
        };
        Ok(Self {
            seg,
            entry,
            count,
            slot_count,
            ids_at,
            offsets_at,
            slots_at,
            keys_at,
            min_id,
            max_id,
        })
    }

    pub fn segment_no(&self) -> u64 {
        self.seg.no
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn bytes(&self) -> &[u8] {
        self.seg.raw(&self.entry)
    }

    fn id_at(&self, i: usize) -> Option<u32> {
        le_u32(self.bytes(), self.ids_at + i * 4)
    }

    fn key_at(&self, i: usize) -> Option<&str> {
        let b = self.bytes();
        let lo = le_u64(b, self.offsets_at + i * 8)? as usize;
        let hi = le_u64(b, self.offsets_at + (i + 1) * 8)? as usize;
        let keys = b.get(self.keys_at..)?;
        std::str::from_utf8(keys.get(lo..hi)?).ok()
    }

    /// The id of `key` in this section.
    pub fn find(&self, key: &str) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        let b = self.bytes();
        let mask = self.slot_count - 1;
        let mut s = fnv1a64(key.as_bytes()) as usize & mask;
        for _ in 0..self.slot_count {
            let slot = le_u32(b, self.slots_at + s * 4)? as usize;
            if slot == 0 {
                return None;
            }
            if self.key_at(slot - 1) == Some(key) {
                return self.id_at(slot - 1);
            }
            s = (s + 1) & mask;
        }
        None
    }

    /// The key of `id` in this section.
    pub fn key_of(&self, id: u32) -> Option<&str> {
        if self.count == 0 || id < self.min_id || id > self.max_id {
            return None;
        }
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.id_at(mid)?.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.key_at(mid),
            }
        }
        None
    }

    /// Every `(id, key)` in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        (0..self.count).filter_map(|i| Some((self.id_at(i)?, self.key_at(i)?)))
    }
}

struct Inner {
    /// Sections in segment files, oldest first.
    layers: Vec<Arc<DictLayer>>,
    /// Key → id for keys added since the newest section (live ones only).
    recent_ids: HashMap<Box<str>, u32>,
    /// Id → key for ids from `recent_base` on (kept for deleted ids too, until
    /// the next checkpoint, so older snapshots can still name them).
    recent_keys: Vec<Option<Box<str>>>,
    recent_base: u32,
}

/// The customer dictionary shared by the writer and every reader.
pub struct Dictionary {
    inner: RwLock<Inner>,
}

impl Dictionary {
    /// A dictionary made of `layers`, with new ids starting at `next_id`.
    pub fn new(layers: Vec<Arc<DictLayer>>, next_id: u32) -> Self {
        Self {
            inner: RwLock::new(Inner {
                layers,
                recent_ids: HashMap::new(),
                recent_keys: Vec::new(),
                recent_base: next_id,
            }),
        }
    }

    /// The id last given to `key`. It may belong to a deleted customer: check
    /// the live set.
    pub fn lookup(&self, key: &str) -> Option<u32> {
        let inner = self.inner.read();
        if let Some(&id) = inner.recent_ids.get(key) {
            return Some(id);
        }
        inner.layers.iter().rev().find_map(|l| l.find(key))
    }

    /// The key of `id`, if it was ever assigned (and not yet erased).
    pub fn key_of(&self, id: u32) -> Option<String> {
        let inner = self.inner.read();
        Self::key_in(&inner, id).map(str::to_string)
    }

    fn key_in(inner: &Inner, id: u32) -> Option<&str> {
        if id >= inner.recent_base {
            return inner
                .recent_keys
                .get((id - inner.recent_base) as usize)?
                .as_deref();
        }
        inner.layers.iter().rev().find_map(|l| l.key_of(id))
    }

    /// Appends the keys of `ids` to `out` (skipping ids without a key), under one lock.
    pub fn keys_of(&self, ids: &[u32], out: &mut Vec<String>) {
        let inner = self.inner.read();
        out.extend(
            ids.iter()
                .filter_map(|&id| Self::key_in(&inner, id).map(str::to_string)),
        );
    }

    /// Records that `key` has `id` (idempotent).
    pub(crate) fn insert(&self, id: u32, key: &str) {
        let mut inner = self.inner.write();
        if id < inner.recent_base {
            return;
        }
        let at = (id - inner.recent_base) as usize;
        if inner.recent_keys.len() <= at {
            inner.recent_keys.resize(at + 1, None);
        }
        inner.recent_keys[at] = Some(key.into());
        inner.recent_ids.insert(key.into(), id);
    }

    /// Forgets the key → id mapping of deleted customers added since the last
    /// checkpoint (older ones are masked by the live set until a merge).
    pub(crate) fn forget(&self, ids: impl Iterator<Item = u32>) {
        let mut inner = self.inner.write();
        let base = inner.recent_base;
        for id in ids {
            if id < base {
                continue;
            }
            let key = inner
                .recent_keys
                .get((id - base) as usize)
                .and_then(|k| k.clone());
            if let Some(key) = key
                && inner.recent_ids.get(&key) == Some(&id)
            {
                inner.recent_ids.remove(&key);
            }
        }
    }

    /// Sections in segment files, oldest first.
    pub fn layers(&self) -> Vec<Arc<DictLayer>> {
        self.inner.read().layers.clone()
    }

    /// Copies the recent `(id, key)` pairs with ids below `upto` that are live.
    pub(crate) fn recent_entries(&self, upto: u32, live: &ShardedBitmap) -> Vec<(u32, Box<str>)> {
        let inner = self.inner.read();
        let base = inner.recent_base;
        inner
            .recent_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (base + i as u32, k))
            .take_while(|(id, _)| *id < upto)
            .filter_map(|(id, k)| Some((id, k.clone()?)))
            .filter(|(id, _)| live.contains(*id))
            .collect()
    }

    /// After a checkpoint: `layers` replace the sections, and the recent keys
    /// below `upto` (now in a section) are dropped from memory.
    pub(crate) fn install(&self, layers: Vec<Arc<DictLayer>>, upto: u32) {
        let mut inner = self.inner.write();
        inner.layers = layers;
        if upto > inner.recent_base {
            let n = ((upto - inner.recent_base) as usize).min(inner.recent_keys.len());
            inner.recent_keys.drain(..n);
            inner.recent_base = upto;
            inner.recent_ids.retain(|_, id| *id >= upto);
        }
    }

    /// Keys held in memory (not yet in a section).
    pub fn recent_len(&self) -> usize {
        self.inner.read().recent_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::segment::SegmentWriter;

    #[test]
    fn section_lookups_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<String> = (0..5000).map(|i| format!("phone:1380000{i:04}")).collect();
        let section = encode_section(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (i as u32 * 3, k.as_str())),
        );
        let mut w = SegmentWriter::create(dir.path(), 1).unwrap();
        w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
        w.finish().unwrap();
        let layer = DictLayer::open(Segment::open(dir.path(), 1).unwrap()).unwrap();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(layer.find(k), Some(i as u32 * 3));
            assert_eq!(layer.key_of(i as u32 * 3), Some(k.as_str()));
        }
        assert_eq!(layer.find("wechat:nobody"), None);
        assert_eq!(layer.key_of(1), None);
        assert_eq!(layer.iter().count(), 5000);

        let dict = Dictionary::new(vec![Arc::new(layer)], 20_000);
        dict.insert(20_000, "jd:pin_1");
        assert_eq!(dict.lookup("jd:pin_1"), Some(20_000));
        assert_eq!(dict.lookup(&keys[7]), Some(21));
        assert_eq!(dict.key_of(21).as_deref(), Some(keys[7].as_str()));
        dict.forget([20_000].into_iter());
        assert_eq!(dict.lookup("jd:pin_1"), None);
        // The id still names its key for readers of older snapshots.
        assert_eq!(dict.key_of(20_000).as_deref(), Some("jd:pin_1"));
    }
}
