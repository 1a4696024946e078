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
//!
//! `section.rs` owns a section's bytes (writing one, and reading one in
//! place); this file owns the dictionary made of sections and recent keys.

use std::sync::Arc;

use hashbrown::HashMap;
use parking_lot::RwLock;

use crate::bitmap::Members;
use crate::error::{Error, Result};
use crate::storage::codec::fnv1a64;

pub mod identities;
mod section;

pub use identities::Identities;
use section::LOOKUP_GROUP;
pub use section::{DictLayer, encode_identity_section, encode_section};

struct Inner {
    /// Sections in segment files, oldest first.
    layers: Vec<Arc<DictLayer>>,
    /// Key → id for keys added since the newest section (live ones only).
    recent_ids: HashMap<Box<str>, u32>,
    /// Id → key for ids from `recent_base` on (kept for deleted ids too, until
    /// the next checkpoint, so older snapshots can still name them).
    recent_keys: Vec<Option<Box<str>>>,
    recent_base: u32,
    /// About the heap bytes of the two above (see [`key_bytes`]).
    recent_bytes: usize,
}

/// About the heap bytes a recent key takes: its two copies (one in each
/// map) and their bookkeeping.
fn key_bytes(key: &str) -> usize {
    2 * key.len() + 64
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
                recent_bytes: 0,
            }),
        }
    }

    /// The id last given to `key`. It may belong to a deleted customer: check
    /// the live set.
    pub fn lookup(&self, key: &str) -> Result<Option<u32>> {
        let inner = self.inner.read();
        if let Some(&id) = inner.recent_ids.get(key) {
            return Ok(Some(id));
        }
        let hash = fnv1a64(key.as_bytes());
        for layer in inner.layers.iter().rev() {
            if let Some(id) = layer.find_hashed(key, hash)? {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// [`Dictionary::lookup`] of many keys under one lock, the look-ups of
    /// each section overlapped (see `DictLayer::find_group`): the same
    /// answers, several times faster for large batches.
    pub fn lookup_many(&self, keys: &[&str]) -> Result<Vec<Option<u32>>> {
        let inner = self.inner.read();
        let mut out = vec![None; keys.len()];
        let mut pending = Vec::new();
        for (k, key) in keys.iter().enumerate() {
            match inner.recent_ids.get(*key) {
                Some(&id) => out[k] = Some(id),
                None => pending.push(k),
            }
        }
        if pending.is_empty() || inner.layers.is_empty() {
            return Ok(out);
        }
        let hashes: Vec<u64> = keys.iter().map(|k| fnv1a64(k.as_bytes())).collect();
        let (mut group, mut left) = (Vec::new(), Vec::new());
        for chunk in pending.chunks(LOOKUP_GROUP) {
            // Every section's first slot for the group is requested at once:
            // a key found in the oldest section does not wait for the misses
            // in the newer ones one by one.
            for layer in inner.layers.iter().rev() {
                layer.prefetch_slots(&hashes, chunk);
            }
            group.clear();
            group.extend_from_slice(chunk);
            for layer in inner.layers.iter().rev() {
                if group.is_empty() {
                    break;
                }
                left.clear();
                layer.find_group(keys, &hashes, &group, &mut out, &mut left)?;
                std::mem::swap(&mut group, &mut left);
            }
        }
        Ok(out)
    }

    /// The key of `id`, if it was ever assigned (and not yet erased).
    pub fn key_of(&self, id: u32) -> Result<Option<String>> {
        let inner = self.inner.read();
        Ok(Self::key_in(&inner, id)?.map(str::to_string))
    }

    fn key_in(inner: &Inner, id: u32) -> Result<Option<&str>> {
        if id >= inner.recent_base {
            return Ok(inner
                .recent_keys
                .get((id - inner.recent_base) as usize)
                .and_then(|k| k.as_deref()));
        }
        for layer in inner.layers.iter().rev() {
            if let Some(key) = layer.key_of(id)? {
                return Ok(Some(key));
            }
        }
        Ok(None)
    }

    /// Appends the keys of `ids` to `out`, under one lock. Every id must have
    /// a key here: the ids come from a snapshot that shares this dictionary,
    /// and a missing one is an error, never a row silently left out.
    pub fn keys_of(&self, ids: &[u32], out: &mut Vec<String>) -> Result<()> {
        let inner = self.inner.read();
        for &id in ids {
            match Self::key_in(&inner, id)? {
                Some(key) => out.push(key.to_string()),
                None => return Err(Error::MissingKey(id)),
            }
        }
        Ok(())
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
        if inner.recent_keys[at].replace(key.into()).is_none() {
            inner.recent_bytes += key_bytes(key);
        }
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
    pub(crate) fn recent_entries(&self, upto: u32, live: Members<'_>) -> Vec<(u32, Box<str>)> {
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

    /// After a checkpoint: the dictionary of the snapshots to come, made of
    /// `layers`, with the recent keys from `upto` on (those below are now in
    /// a section). This one is left as it is: the snapshots that share it
    /// (an export in progress) still name every id they hold, even ids whose
    /// keys a dictionary merge has just erased from disk. Its memory goes
    /// with the last of them.
    pub(crate) fn successor(&self, layers: Vec<Arc<DictLayer>>, upto: u32) -> Dictionary {
        let inner = self.inner.read();
        let base = inner.recent_base.max(upto);
        let skip = ((base - inner.recent_base) as usize).min(inner.recent_keys.len());
        let recent_keys: Vec<Option<Box<str>>> = inner.recent_keys[skip..].to_vec();
        let recent_bytes = recent_keys.iter().flatten().map(|k| key_bytes(k)).sum();
        let recent_ids = inner
            .recent_ids
            .iter()
            .filter(|(_, id)| **id >= base)
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        Dictionary {
            inner: RwLock::new(Inner {
                layers,
                recent_ids,
                recent_keys,
                recent_base: base,
                recent_bytes,
            }),
        }
    }

    /// Keys held in memory (not yet in a section).
    pub fn recent_len(&self) -> usize {
        self.inner.read().recent_ids.len()
    }

    /// About the heap bytes of the keys held in memory (those of customers
    /// deleted since the last checkpoint included, until it).
    pub fn recent_bytes(&self) -> usize {
        self.inner.read().recent_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::segment::{BlobKind, Segment, SegmentWriter};

    #[test]
    fn recent_keys_count_their_bytes_until_a_checkpoint_takes_them() {
        let d = Dictionary::new(Vec::new(), 0);
        assert_eq!(d.recent_bytes(), 0);
        d.insert(0, "phone:13800001111");
        d.insert(1, "k");
        d.insert(1, "k");
        assert_eq!(
            d.recent_bytes(),
            key_bytes("phone:13800001111") + key_bytes("k")
        );
        let next = d.successor(Vec::new(), 1);
        assert_eq!(next.recent_bytes(), key_bytes("k"));
        assert_eq!(d.successor(Vec::new(), 2).recent_bytes(), 0);
    }

    #[test]
    fn section_lookups_both_ways() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::storage::DataDir::os(tmp.path());
        let keys: Vec<String> = (0..5000).map(|i| format!("phone:1380000{i:04}")).collect();
        let section = encode_section(
            keys.iter()
                .enumerate()
                .map(|(i, k)| (i as u32 * 3, k.as_str())),
        );
        let mut w = SegmentWriter::create(&dir, 1).unwrap();
        w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
        w.finish().unwrap();
        let layer = DictLayer::open(Segment::open(&dir, 1).unwrap()).unwrap();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(layer.find(k).unwrap(), Some(i as u32 * 3));
            assert_eq!(layer.key_of(i as u32 * 3).unwrap(), Some(k.as_str()));
        }
        assert_eq!(layer.find("wechat:nobody").unwrap(), None);
        assert_eq!(layer.key_of(1).unwrap(), None);
        assert_eq!(layer.iter().filter(|r| r.is_ok()).count(), 5000);

        let dict = Dictionary::new(vec![Arc::new(layer)], 20_000);
        dict.insert(20_000, "jd:pin_1");
        assert_eq!(dict.lookup("jd:pin_1").unwrap(), Some(20_000));
        assert_eq!(dict.lookup(&keys[7]).unwrap(), Some(21));
        assert_eq!(dict.key_of(21).unwrap().as_deref(), Some(keys[7].as_str()));
        dict.forget([20_000].into_iter());
        assert_eq!(dict.lookup("jd:pin_1").unwrap(), None);
        // The id still names its key for readers of older snapshots.
        assert_eq!(dict.key_of(20_000).unwrap().as_deref(), Some("jd:pin_1"));
    }

    #[test]
    fn lookup_many_agrees_with_lookup() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::storage::DataDir::os(tmp.path());
        // Three sections; "k:00017" is in the first and again (re-created with
        // a new id) in the third, where the newer id must win.
        let ranges = [(0u32, 4000u32), (4000, 9000), (9000, 9500)];
        let mut layers = Vec::new();
        for (no, &(lo, hi)) in ranges.iter().enumerate() {
            let mut entries: Vec<(u32, String)> =
                (lo..hi).map(|i| (i, format!("k:{i:05}"))).collect();
            if no == 2 {
                entries.push((9500, "k:00017".to_string()));
            }
            let section = encode_section(entries.iter().map(|(i, k)| (*i, k.as_str())));
            let mut w = SegmentWriter::create(&dir, no as u64 + 1).unwrap();
            w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
            w.finish().unwrap();
            layers.push(Arc::new(
                DictLayer::open(Segment::open(&dir, no as u64 + 1).unwrap()).unwrap(),
            ));
        }
        let dict = Dictionary::new(layers, 9501);
        dict.insert(9501, "recent:a");
        let mut keys: Vec<String> = (0..12_000).rev().map(|i| format!("k:{i:05}")).collect();
        keys.extend([
            "recent:a".to_string(),
            "missing".to_string(),
            "k:00017".to_string(),
        ]);
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let many = dict.lookup_many(&refs).unwrap();
        for (key, got) in keys.iter().zip(&many) {
            assert_eq!(*got, dict.lookup(key).unwrap(), "{key}");
        }
        assert_eq!(many.iter().flatten().count(), 9500 + 2);
        assert_eq!(dict.lookup("k:00017").unwrap(), Some(9500));
        assert_eq!(dict.lookup_many(&[]).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_page_fails_the_lookups_that_touch_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::storage::DataDir::os(tmp.path());
        let keys: Vec<String> = (0..40_000).map(|i| format!("wechat:o{i:08}")).collect();
        let section = encode_section(keys.iter().enumerate().map(|(i, k)| (i as u32, k.as_str())));
        let mut w = SegmentWriter::create(&dir, 1).unwrap();
        w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
        w.finish().unwrap();
        let path = dir.join(crate::storage::segment::file_name(1));
        let mut data = std::fs::read(&path).unwrap();
        // Flip a byte in the last page of the body (the keys of the last entries).
        let at = data.len() - 32 - ENTRY_LEN_FOR_TEST - 10;
        data[at] ^= 0x01;
        std::fs::write(&path, &data).unwrap();
        let layer = DictLayer::open(Segment::open(&dir, 1).unwrap()).unwrap();
        assert_eq!(
            layer.find(&keys[0]).unwrap(),
            Some(0),
            "untouched pages still serve"
        );
        let err = layer.key_of(39_999).unwrap_err().to_string();
        assert!(err.contains("page checksum mismatch"), "{err}");
    }

    const ENTRY_LEN_FOR_TEST: usize = crate::storage::segment::ENTRY_LEN;

    #[test]
    fn empty_section() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::storage::DataDir::os(tmp.path());
        let section = encode_section(std::iter::empty());
        let mut w = SegmentWriter::create(&dir, 1).unwrap();
        w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
        w.finish().unwrap();
        let layer = DictLayer::open(Segment::open(&dir, 1).unwrap()).unwrap();
        assert!(layer.is_empty());
        assert_eq!(layer.find("x").unwrap(), None);
    }
}
