//! A dictionary section: the bytes `storage-format.md` describes (an
//! id-ordered table for id → key, an open-addressing hash table for key →
//! id), written once by [`encode_section`] and read in place through a
//! segment's memory map by [`DictLayer`], page by page as look-ups need
//! them. Knows nothing of the recent keys or of which sections are current.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::storage::codec::{fnv1a64, le_u32, le_u64};
use crate::storage::segment::{BlobKind, Entry, Segment};

/// Bytes of the section header.
const SECTION_HEADER_LEN: usize = 32;
/// Keys whose look-ups [`Dictionary::lookup_many`] overlaps.
pub(super) const LOOKUP_GROUP: usize = 32;
/// log2 of the page size that per-page checksums cover.
const PAGE_SHIFT: u32 = 16;

/// Hash table size for `count` keys: a power of two, load factor at most 0.8.
fn slots_for(count: usize) -> usize {
    (count + count / 4 + 1).next_power_of_two().max(2)
}

/// A hash table entry: the high 32 bits of the key's hash, then index + 1.
fn slot_entry(hash: u64, index: usize) -> u64 {
    (hash & 0xffff_ffff_0000_0000) | (index as u64 + 1)
}

/// Header flag: each entry's bytes are its key, a NUL byte and the entry's
/// information (identity sections); only the key is hashed and compared.
const FLAG_INFO: u32 = 1;

/// Encodes a dictionary section from `(id, key)` pairs in ascending id order.
pub fn encode_section<'a>(entries: impl Iterator<Item = (u32, &'a str)>) -> Vec<u8> {
    encode(entries.map(|(id, key)| (id, key, None)), 0)
}

/// Encodes an identity section from `(id, identity, info)` entries in
/// non-decreasing id order (a customer has many identities). Identities
/// never contain a NUL byte (the ingestion room's normal forms keep control
/// characters out).
pub fn encode_identity_section<'a>(
    entries: impl Iterator<Item = (u32, &'a str, &'a str)>,
) -> Vec<u8> {
    encode(
        entries.map(|(id, key, info)| (id, key, Some(info))),
        FLAG_INFO,
    )
}

fn encode<'a>(
    entries: impl Iterator<Item = (u32, &'a str, Option<&'a str>)>,
    flags: u32,
) -> Vec<u8> {
    let mut ids: Vec<u32> = Vec::new();
    let mut offsets: Vec<u64> = vec![0];
    let mut keys: Vec<u8> = Vec::new();
    for (id, key, info) in entries {
        debug_assert!(
            ids.last()
                .is_none_or(|&last| last < id || (flags & FLAG_INFO != 0 && last == id))
        );
        ids.push(id);
        keys.extend_from_slice(key.as_bytes());
        if let Some(info) = info {
            debug_assert!(!key.contains('\0'));
            keys.push(0);
            keys.extend_from_slice(info.as_bytes());
        }
        offsets.push(keys.len() as u64);
    }
    let count = ids.len();
    let slot_count = slots_for(count);
    let mask = slot_count - 1;
    let mut slots = vec![0u64; slot_count];
    for i in 0..count {
        let entry = &keys[offsets[i] as usize..offsets[i + 1] as usize];
        let hash = fnv1a64(key_part(entry, flags));
        let mut s = hash as usize & mask;
        while slots[s] != 0 {
            s = (s + 1) & mask;
        }
        slots[s] = slot_entry(hash, i);
    }
    // The body goes straight into the output, after room for the header and
    // the page checksums (filled in last): one copy of the section in memory.
    let body_len = count * 4 + (count + 1) * 8 + slot_count * 8 + keys.len();
    let page_count = body_len.div_ceil(1 << PAGE_SHIFT);
    let body_at = SECTION_HEADER_LEN + page_count * 4;
    let mut out = Vec::with_capacity(body_at + body_len);
    out.resize(body_at, 0);
    for id in &ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    drop(ids);
    for o in &offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    drop(offsets);
    for s in &slots {
        out.extend_from_slice(&s.to_le_bytes());
    }
    drop(slots);
    out.extend_from_slice(&keys);
    debug_assert_eq!(out.len(), body_at + body_len);
    let page_crcs: Vec<u8> = out[body_at..]
        .chunks(1 << PAGE_SHIFT)
        .flat_map(|page| crc32fast::hash(page).to_le_bytes())
        .collect();
    let mut header = Vec::with_capacity(SECTION_HEADER_LEN);
    header.extend_from_slice(&(count as u32).to_le_bytes());
    header.extend_from_slice(&(slot_count as u32).to_le_bytes());
    header.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    header.extend_from_slice(&PAGE_SHIFT.to_le_bytes());
    header.extend_from_slice(&(page_count as u32).to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(&page_crcs).to_le_bytes());
    header.extend_from_slice(&flags.to_le_bytes());
    out[..SECTION_HEADER_LEN].copy_from_slice(&header);
    out[SECTION_HEADER_LEN..body_at].copy_from_slice(&page_crcs);
    out
}

/// The key within an entry's bytes (all of them, unless the section's
/// entries carry information after a NUL).
#[inline]
fn key_part(entry: &[u8], flags: u32) -> &[u8] {
    if flags & FLAG_INFO == 0 {
        return entry;
    }
    match entry.iter().position(|&b| b == 0) {
        Some(at) => &entry[..at],
        None => entry,
    }
}

/// Asks the CPU to start loading the cache line holding `bytes[at]`; a hint
/// only (nothing happens past the end, or off x86-64).
#[inline(always)]
fn prefetch(bytes: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < bytes.len() {
        // SAFETY: `at` is within `bytes`; a prefetch reads nothing the
        // program can see and cannot fault.
        unsafe {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(at) as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at);
}

/// One dictionary section, read in place from a mapped segment. Opening it
/// reads only the header and the page checksum table; each 64 KiB page of
/// the body is checked the first time a look-up touches it, so start-up
/// does not grow with the dictionary.
pub struct DictLayer {
    seg: Arc<Segment>,
    entry: Entry,
    count: usize,
    slot_count: usize,
    page_shift: u32,
    /// Offset of the body within the blob.
    body_at: usize,
    crcs_at: usize,
    ids_at: usize,
    offsets_at: usize,
    slots_at: usize,
    keys_at: usize,
    min_id: u32,
    max_id: u32,
    /// [`FLAG_INFO`] for an identity section, 0 for a dictionary section.
    flags: u32,
    verified: Vec<AtomicU64>,
}

impl DictLayer {
    /// Opens the dictionary section of a segment, checking its header and
    /// its page checksum table.
    pub fn open(seg: Arc<Segment>) -> Result<Self> {
        Self::open_kind(seg, BlobKind::Dictionary)
    }

    /// Opens the identity section of a segment (the same layout, with
    /// information after each key and ids that may repeat).
    pub fn open_identities(seg: Arc<Segment>) -> Result<Self> {
        Self::open_kind(seg, BlobKind::Identities)
    }

    fn open_kind(seg: Arc<Segment>, kind: BlobKind) -> Result<Self> {
        let what = match kind {
            BlobKind::Identities => "identity section",
            _ => "dictionary section",
        };
        let entry = *seg.entries_of(kind, 0).first().ok_or_else(|| {
            Error::corrupt(
                &seg.path,
                0,
                format!("the manifest names this segment for a {what} it does not have"),
            )
        })?;
        let b = seg.raw(&entry);
        let corrupt = |why: &str| Error::corrupt(&seg.path, entry.offset, format!("{what}: {why}"));
        let short = || corrupt("short header");
        let count = le_u32(b, 0).ok_or_else(short)? as usize;
        let slot_count = le_u32(b, 4).ok_or_else(short)? as usize;
        let key_bytes = le_u64(b, 8).ok_or_else(short)? as usize;
        let page_shift = le_u32(b, 16).ok_or_else(short)?;
        let page_count = le_u32(b, 20).ok_or_else(short)? as usize;
        let table_crc = le_u32(b, 24).ok_or_else(short)?;
        let flags = le_u32(b, 28).ok_or_else(short)?;
        let want_flags = if kind == BlobKind::Identities {
            FLAG_INFO
        } else {
            0
        };
        if flags != want_flags {
            return Err(corrupt("unknown flags"));
        }
        if !(12..=30).contains(&page_shift) {
            return Err(corrupt("bad page size"));
        }
        let crcs_at = SECTION_HEADER_LEN;
        let body_at = crcs_at + page_count * 4;
        let table = b
            .get(crcs_at..body_at)
            .ok_or_else(|| corrupt("page checksum table runs past the blob"))?;
        if crc32fast::hash(table) != table_crc {
            return Err(corrupt("page checksum table checksum mismatch"));
        }
        if !slot_count.is_power_of_two() || slot_count <= count {
            return Err(corrupt("bad hash table size"));
        }
        let ids_at = 0;
        let offsets_at = ids_at + count * 4;
        let slots_at = offsets_at + (count + 1) * 8;
        let keys_at = slots_at + slot_count * 8;
        let body_len = keys_at.checked_add(key_bytes);
        if body_len.and_then(|l| l.checked_add(body_at)) != Some(b.len())
            || page_count != body_len.unwrap_or(0).div_ceil(1 << page_shift)
        {
            return Err(corrupt("sizes do not add up to the blob length"));
        }
        let mut layer = Self {
            seg: seg.clone(),
            entry,
            count,
            slot_count,
            page_shift,
            body_at,
            crcs_at,
            ids_at,
            offsets_at,
            slots_at,
            keys_at,
            min_id: 0,
            max_id: 0,
            flags,
            verified: (0..page_count.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        };
        if count > 0 {
            layer.min_id = layer.u32_at(ids_at)?;
            layer.max_id = layer.u32_at(ids_at + (count - 1) * 4)?;
        }
        Ok(layer)
    }

    pub fn segment_no(&self) -> u64 {
        self.seg.no
    }

    /// The lowest and highest id in the section (its ids lie between them).
    pub fn id_range(&self) -> (u32, u32) {
        (self.min_id, self.max_id)
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    #[inline]
    fn body(&self) -> &[u8] {
        &self.seg.raw(&self.entry)[self.body_at..]
    }

    /// Checks the pages covering body bytes `lo..hi` (once each).
    #[inline]
    fn check(&self, lo: usize, hi: usize) -> Result<&[u8]> {
        let body = self.body();
        let bytes = body
            .get(lo..hi)
            .ok_or_else(|| self.corrupt(lo, "offset out of bounds"))?;
        if lo == hi {
            return Ok(bytes);
        }
        let (first, last) = (lo >> self.page_shift, (hi - 1) >> self.page_shift);
        if first == last
            && self.verified[first / 64].load(Ordering::Relaxed) & (1u64 << (first % 64)) != 0
        {
            return Ok(bytes);
        }
        self.check_pages(first, last)?;
        Ok(bytes)
    }

    /// Verifies pages `first..=last` of the body against their checksums,
    /// those not verified before.
    #[cold]
    fn check_pages(&self, first: usize, last: usize) -> Result<()> {
        let body = self.body();
        for p in first..=last {
            let (word, bit) = (p / 64, 1u64 << (p % 64));
            if self.verified[word].load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            let start = p << self.page_shift;
            let page = &body[start..body.len().min(start + (1 << self.page_shift))];
            let expect = le_u32(self.seg.raw(&self.entry), self.crcs_at + p * 4).unwrap_or(0);
            if crc32fast::hash(page) != expect {
                return Err(self.corrupt(start, "page checksum mismatch"));
            }
            self.verified[word].fetch_or(bit, Ordering::Relaxed);
        }
        Ok(())
    }

    fn corrupt(&self, body_offset: usize, why: &str) -> Error {
        Error::corrupt(
            &self.seg.path,
            self.entry.offset + (self.body_at + body_offset) as u64,
            if self.flags & FLAG_INFO != 0 {
                format!("identity section: {why}")
            } else {
                format!("dictionary section: {why}")
            },
        )
    }

    #[inline]
    fn u32_at(&self, at: usize) -> Result<u32> {
        let b = self.check(at, at + 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    #[inline]
    fn u64_at(&self, at: usize) -> Result<u64> {
        let b = self.check(at, at + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    #[inline]
    fn id_at(&self, i: usize) -> Result<u32> {
        self.u32_at(self.ids_at + i * 4)
    }

    #[inline]
    fn key_bytes_at(&self, i: usize) -> Result<&[u8]> {
        let lo = self.u64_at(self.offsets_at + i * 8)? as usize;
        let hi = self.u64_at(self.offsets_at + (i + 1) * 8)? as usize;
        if lo > hi {
            return Err(self.corrupt(self.offsets_at + i * 8, "key offsets out of order"));
        }
        self.check(
            self.keys_at.saturating_add(lo),
            self.keys_at.saturating_add(hi),
        )
    }

    fn key_at(&self, i: usize) -> Result<&str> {
        let bytes = self.key_bytes_at(i)?;
        std::str::from_utf8(bytes)
            .map_err(|_| self.corrupt(self.offsets_at + i * 8, "key is not UTF-8"))
    }

    /// The id of `key` in this section (`hash` is its FNV-1a hash).
    pub(super) fn find_hashed(&self, key: &str, hash: u64) -> Result<Option<u32>> {
        match self.index_hashed(key, hash)? {
            Some(i) => self.id_at(i).map(Some),
            None => Ok(None),
        }
    }

    /// The information of `key`'s entry in this section.
    pub fn info_of(&self, key: &str) -> Result<Option<&str>> {
        match self.index_hashed(key, fnv1a64(key.as_bytes()))? {
            Some(i) => Ok(Some(self.entry_at(i)?.1)),
            None => Ok(None),
        }
    }

    /// The index of `key`'s entry (`hash` is its FNV-1a hash).
    fn index_hashed(&self, key: &str, hash: u64) -> Result<Option<usize>> {
        if self.count == 0 {
            return Ok(None);
        }
        let mask = self.slot_count - 1;
        let tag = hash >> 32;
        let mut s = hash as usize & mask;
        for _ in 0..self.slot_count {
            let entry = self.u64_at(self.slots_at + s * 8)?;
            if entry == 0 {
                return Ok(None);
            }
            if entry >> 32 == tag {
                let index = (entry & 0xffff_ffff) as usize;
                if index == 0 || index > self.count {
                    return Err(self.corrupt(self.slots_at + s * 8, "hash slot out of range"));
                }
                if key_part(self.key_bytes_at(index - 1)?, self.flags) == key.as_bytes() {
                    return Ok(Some(index - 1));
                }
            }
            s = (s + 1) & mask;
        }
        Ok(None)
    }

    /// Starts loading the hash slots where `group`'s keys begin their probe
    /// (see `DictLayer::find_group`).
    pub(super) fn prefetch_slots(&self, hashes: &[u64], group: &[usize]) {
        if self.count == 0 {
            return;
        }
        let body = self.body();
        let mask = self.slot_count - 1;
        for &k in group {
            prefetch(body, self.slots_at + (hashes[k] as usize & mask) * 8);
        }
    }

    /// Looks up a small group of keys at once: `group` holds indexes into
    /// `keys` and `hashes` (FNV-1a); those found get their id in `out`, the
    /// others go to `left`. The group's hash slots are read first (after
    /// [`DictLayer::prefetch_slots`]), then its key offsets and ids are
    /// prefetched, then its key bytes, so the cache misses of the group
    /// overlap instead of running one after another (a look-up is four
    /// dependent misses into a table far larger than the cache).
    pub(super) fn find_group(
        &self,
        keys: &[&str],
        hashes: &[u64],
        group: &[usize],
        out: &mut [Option<u32>],
        left: &mut Vec<usize>,
    ) -> Result<()> {
        if self.count == 0 {
            left.extend_from_slice(group);
            return Ok(());
        }
        let body = self.body();
        let mask = self.slot_count - 1;
        // The first slot whose hash tag matches: index + 1, or 0 for none.
        let mut found = [0usize; LOOKUP_GROUP];
        for (j, &k) in group.iter().enumerate() {
            let tag = hashes[k] >> 32;
            let mut s = hashes[k] as usize & mask;
            for _ in 0..self.slot_count {
                let entry = self.u64_at(self.slots_at + s * 8)?;
                if entry == 0 {
                    break;
                }
                if entry >> 32 == tag {
                    let index = (entry & 0xffff_ffff) as usize;
                    if index == 0 || index > self.count {
                        return Err(self.corrupt(self.slots_at + s * 8, "hash slot out of range"));
                    }
                    found[j] = index;
                    prefetch(body, self.offsets_at + (index - 1) * 8);
                    prefetch(body, self.ids_at + (index - 1) * 4);
                    break;
                }
                s = (s + 1) & mask;
            }
        }
        for &index in found.iter().take(group.len()) {
            if index > 0 {
                let lo = self.u64_at(self.offsets_at + (index - 1) * 8)? as usize;
                prefetch(body, self.keys_at.saturating_add(lo));
            }
        }
        for (j, &k) in group.iter().enumerate() {
            let id = match found[j] {
                0 => None,
                index
                    if key_part(self.key_bytes_at(index - 1)?, self.flags)
                        == keys[k].as_bytes() =>
                {
                    Some(self.id_at(index - 1)?)
                }
                // Another key with the same 32-bit hash tag came first: the
                // full probe sorts it out.
                _ => self.find_hashed(keys[k], hashes[k])?,
            };
            match id {
                Some(id) => out[k] = Some(id),
                None => left.push(k),
            }
        }
        Ok(())
    }

    /// The id of `key` in this section.
    pub fn find(&self, key: &str) -> Result<Option<u32>> {
        self.find_hashed(key, fnv1a64(key.as_bytes()))
    }

    /// The key of `id` in this section.
    pub fn key_of(&self, id: u32) -> Result<Option<&str>> {
        if self.count == 0 || id < self.min_id || id > self.max_id {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.id_at(mid)?.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return self.key_at(mid).map(Some),
            }
        }
        Ok(None)
    }

    /// Every `(id, key)` in ascending id order.
    pub fn iter(&self) -> impl Iterator<Item = Result<(u32, &str)>> + '_ {
        (0..self.count).map(|i| Ok((self.id_at(i)?, self.key_at(i)?)))
    }

    /// Entry `i`'s key and information (empty in a dictionary section).
    fn entry_at(&self, i: usize) -> Result<(&str, &str)> {
        let all = self.key_at(i)?;
        if self.flags & FLAG_INFO == 0 {
            return Ok((all, ""));
        }
        Ok(all.split_once('\0').unwrap_or((all, "")))
    }

    /// Every `(id, key, information)` in ascending id order.
    pub fn entries(&self) -> impl Iterator<Item = Result<(u32, &str, &str)>> + '_ {
        (0..self.count).map(|i| {
            let (key, info) = self.entry_at(i)?;
            Ok((self.id_at(i)?, key, info))
        })
    }

    /// The `(key, information)` of every entry of `id`, in key order
    /// (an identity section may hold several entries of one id).
    pub fn entries_of(&self, id: u32) -> Result<Vec<(&str, &str)>> {
        let mut out = Vec::new();
        if self.count == 0 || id < self.min_id || id > self.max_id {
            return Ok(out);
        }
        let (mut lo, mut hi) = (0usize, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.id_at(mid)? < id {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        while lo < self.count && self.id_at(lo)? == id {
            out.push(self.entry_at(lo)?);
            lo += 1;
        }
        Ok(out)
    }
}
