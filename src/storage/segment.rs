//! Immutable segment files: writing them once at a checkpoint, then reading
//! them through a memory map. A segment holds many tags
//! (each tag's bitmap is a run of per-shard blobs), and may hold the live
//! customer set and a customer dictionary section. Every blob carries a crc32
//! in the segment's directory; a blob is checked when it is read, so a damaged
//! byte is reported (file and offset) instead of served.
//!
//! This module knows blobs and their directory; which segment holds the
//! current version of a tag is the manifest's business.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bitmap::{Bitmap, ShardedBitmap, shard_of};
use crate::error::{Error, Result};
use crate::storage::codec::{le_u32, le_u64};
use crate::storage::datadir::DataDir;
use crate::storage::fs::{Appender, Create, Mapped};

pub const SEG_MAGIC: &[u8; 8] = b"TAGSSEG\0";
pub const SEG_END_MAGIC: &[u8; 8] = b"TAGSEND\0";
pub const SEG_VERSION: u32 = 1;
pub const SEG_HEADER_LEN: usize = 16;
pub const SEG_TRAILER_LEN: usize = 32;
pub const ENTRY_LEN: usize = 32;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BlobKind {
    /// One shard of a tag's bitmap; `owner` is the tag id.
    TagShard = 1,
    /// One shard of the live-customer bitmap; `owner` is 0.
    LiveShard = 2,
    /// A customer dictionary section; `owner` and `shard` are 0.
    Dictionary = 3,
    /// One shard of one bitmap ("slot") of a field; `owner` is the field id
    /// and `shard` packs the slot (high 20 bits) with the shard (low 12).
    FieldSlot = 4,
    /// The ids of the events ingested on one day ([`crate::storage::seen`]);
    /// `owner` is the day (days since 1970-01-01, UTC), `shard` is 0.
    SeenIds = 5,
    /// An identity section ([`crate::storage::identities`]); `owner` and
    /// `shard` are 0.
    Identities = 6,
    /// The merge log ([`crate::storage::merges`]), whole; `owner` and
    /// `shard` are 0.
    MergeLog = 7,
    /// One shard of a frozen audience's members (an audience snapshot);
    /// `owner` is the snapshot that first held them.
    SnapshotShard = 8,
    /// The member-count history ([`crate::storage::history`]), whole;
    /// `owner` and `shard` are 0.
    History = 9,
}

/// Bits of a packed `shard` word that hold the shard number (ids are u32 and
/// shards hold 2^20 ids, so 4096 shards).
pub const SHARD_BITS: u32 = 12;
/// Largest slot number a [`BlobKind::FieldSlot`] entry can carry.
pub const MAX_SLOT: u32 = (1 << (32 - SHARD_BITS)) - 1;

/// The `shard` word of a field-slot blob.
pub fn pack_slot(slot: u32, shard: u32) -> u32 {
    slot << SHARD_BITS | shard
}

impl BlobKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::TagShard),
            2 => Some(Self::LiveShard),
            3 => Some(Self::Dictionary),
            4 => Some(Self::FieldSlot),
            5 => Some(Self::SeenIds),
            6 => Some(Self::Identities),
            7 => Some(Self::MergeLog),
            8 => Some(Self::SnapshotShard),
            9 => Some(Self::History),
            _ => None,
        }
    }
}

/// One row of a segment's directory.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub kind: BlobKind,
    pub owner: u32,
    pub shard: u32,
    pub crc: u32,
    pub offset: u64,
    pub len: u64,
}

pub fn file_name(no: u64) -> String {
    format!("seg-{no:016x}.seg")
}

pub fn parse_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("seg-")?.strip_suffix(".seg")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
}

/// An open, memory-mapped segment file.
pub struct Segment {
    pub no: u64,
    pub path: PathBuf,
    map: Mapped,
    entries: Vec<Entry>,
    index: HashMap<(BlobKind, u32), Range<usize>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("path", &self.path).finish()
    }
}

impl Segment {
    /// Maps a segment and checks its header, trailer and directory (not the
    /// blobs: those are checked when read).
    pub fn open(dir: &DataDir, no: u64) -> Result<Arc<Segment>> {
        let path = dir.join(file_name(no));
        // Segment files are immutable once written (never opened for writing
        // again), so the mapped bytes do not change under us.
        let map = dir.fs().map(&path).map_err(|e| Error::io(&path, e))?;
        let corrupt = |off: usize, why: String| Error::corrupt(&path, off as u64, why);
        let n = map.len();
        if n < SEG_HEADER_LEN + SEG_TRAILER_LEN {
            return Err(corrupt(
                0,
                format!("file of {n} bytes is too short for a segment"),
            ));
        }
        if &map[..8] != SEG_MAGIC {
            return Err(corrupt(0, "bad magic: not a tagstore segment".into()));
        }
        let version = le_u32(&map, 8).unwrap_or(0);
        if version != SEG_VERSION {
            return Err(corrupt(8, format!("unsupported segment version {version}")));
        }
        let t = n - SEG_TRAILER_LEN;
        if &map[t + 24..t + 32] != SEG_END_MAGIC {
            return Err(corrupt(
                t + 24,
                "bad trailer magic (file cut short?)".into(),
            ));
        }
        let dir_off = le_u64(&map, t).unwrap_or(u64::MAX) as usize;
        let count = le_u64(&map, t + 8).unwrap_or(u64::MAX) as usize;
        let dir_crc = le_u32(&map, t + 16).unwrap_or(0);
        let dir_len = count.saturating_mul(ENTRY_LEN);
        if dir_off < SEG_HEADER_LEN || dir_off.checked_add(dir_len) != Some(t) {
            return Err(corrupt(
                t,
                format!("directory of {count} entries at {dir_off} does not fit the file"),
            ));
        }
        let dir_bytes = &map[dir_off..t];
        if crc32fast::hash(dir_bytes) != dir_crc {
            return Err(corrupt(dir_off, "directory checksum mismatch".into()));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let at = i * ENTRY_LEN;
            let e = &dir_bytes[at..at + ENTRY_LEN];
            let kind = BlobKind::from_u8(e[0])
                .ok_or_else(|| corrupt(dir_off + at, format!("unknown blob kind {}", e[0])))?;
            let entry = Entry {
                kind,
                owner: le_u32(e, 4).unwrap_or(0),
                shard: le_u32(e, 8).unwrap_or(0),
                crc: le_u32(e, 12).unwrap_or(0),
                offset: le_u64(e, 16).unwrap_or(0),
                len: le_u64(e, 24).unwrap_or(0),
            };
            let end = entry.offset.checked_add(entry.len);
            if (entry.offset as usize) < SEG_HEADER_LEN
                || end.is_none_or(|end| end as usize > dir_off)
            {
                return Err(corrupt(
                    dir_off + at,
                    "blob lies outside the data area".into(),
                ));
            }
            entries.push(entry);
        }
        entries.sort_by_key(|e| (e.kind, e.owner, e.shard));
        let mut index: HashMap<(BlobKind, u32), Range<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            index
                .entry((e.kind, e.owner))
                .and_modify(|r| r.end = i + 1)
                .or_insert(i..i + 1);
        }
        Ok(Arc::new(Segment {
            no,
            path,
            map,
            entries,
            index,
        }))
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// The whole file's bytes (a backup copies them).
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Checks every blob's checksum (a backup's and a restore's check; a
    /// query checks only the blobs it reads). The first damaged blob is a
    /// [`Error::Corrupt`] naming the file and the blob's offset.
    pub fn check_blobs(&self) -> Result<()> {
        for e in &self.entries {
            self.blob(e)?;
        }
        Ok(())
    }

    pub fn entries_of(&self, kind: BlobKind, owner: u32) -> &[Entry] {
        match self.index.get(&(kind, owner)) {
            Some(r) => &self.entries[r.clone()],
            None => &[],
        }
    }

    pub fn contains(&self, kind: BlobKind, owner: u32) -> bool {
        self.index.contains_key(&(kind, owner))
    }

    /// Bytes held by the blobs of one owner.
    pub fn bytes_of(&self, kind: BlobKind, owner: u32) -> u64 {
        self.entries_of(kind, owner).iter().map(|e| e.len).sum()
    }

    /// A blob's bytes, unchecked (for callers that checked the crc once already).
    pub fn raw(&self, e: &Entry) -> &[u8] {
        &self.map[e.offset as usize..(e.offset + e.len) as usize]
    }

    /// A blob's bytes, after checking its crc.
    pub fn blob(&self, e: &Entry) -> Result<&[u8]> {
        let bytes = &self.map[e.offset as usize..(e.offset + e.len) as usize];
        if crc32fast::hash(bytes) != e.crc {
            return Err(Error::corrupt(
                &self.path,
                e.offset,
                format!(
                    "checksum mismatch in a {:?} blob (owner {}, shard {})",
                    e.kind, e.owner, e.shard
                ),
            ));
        }
        Ok(bytes)
    }

    /// The entries of one slot of a field.
    pub fn slot_entries(&self, field: u32, slot: u32) -> &[Entry] {
        let all = self.entries_of(BlobKind::FieldSlot, field);
        let lo = all.partition_point(|e| e.shard >> SHARD_BITS < slot);
        let hi = all.partition_point(|e| e.shard >> SHARD_BITS <= slot);
        &all[lo..hi]
    }

    /// Bytes held by one slot of a field.
    pub fn slot_bytes(&self, field: u32, slot: u32) -> u64 {
        self.slot_entries(field, slot).iter().map(|e| e.len).sum()
    }

    /// Decodes the bitmap stored for `owner` (empty if there is none); for
    /// [`BlobKind::FieldSlot`], `owner` is the field and `slot` picks the bitmap.
    pub fn load_bitmap(&self, kind: BlobKind, owner: u32, slot: u32) -> Result<ShardedBitmap> {
        let entries = match kind {
            BlobKind::FieldSlot => self.slot_entries(owner, slot),
            _ => self.entries_of(kind, owner),
        };
        let mut out = ShardedBitmap::new();
        for e in entries {
            let bytes = self.blob(e)?;
            // CRoaring's checked reader: it rejects truncated input and
            // validates every container before the bitmap is used.
            let bm = Bitmap::try_deserialize::<croaring::Portable>(bytes).ok_or_else(|| {
                Error::corrupt(&self.path, e.offset, "invalid roaring bitmap".to_string())
            })?;
            let shard = match kind {
                BlobKind::FieldSlot => (e.shard & ((1 << SHARD_BITS) - 1)) as usize,
                _ => e.shard as usize,
            };
            if bm.minimum().is_some_and(|v| shard_of(v) != shard)
                || bm.maximum().is_some_and(|v| shard_of(v) != shard)
            {
                return Err(Error::corrupt(
                    &self.path,
                    e.offset,
                    format!("bitmap holds ids outside its shard {shard}"),
                ));
            }
            out.set_shard(shard, bm);
        }
        Ok(out)
    }
}

/// Writes a new segment file. Nothing refers to it until a manifest does, so a
/// crash while writing leaves an orphan that the next start removes.
pub struct SegmentWriter {
    path: PathBuf,
    out: BufWriter<Appender>,
    offset: u64,
    entries: Vec<Entry>,
    scratch: Vec<u8>,
}

impl SegmentWriter {
    pub fn create(dir: &DataDir, no: u64) -> Result<Self> {
        let path = dir.join(file_name(no));
        let file = dir
            .fs()
            .create(&path, Create::New)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            path,
            out: BufWriter::with_capacity(1 << 20, Appender::new(file, 0)),
            offset: 0,
            entries: Vec::new(),
            scratch: Vec::new(),
        };
        let mut header = Vec::with_capacity(SEG_HEADER_LEN);
        header.extend_from_slice(SEG_MAGIC);
        header.extend_from_slice(&SEG_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io(&self.path, e))?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Appends one blob and records it in the directory.
    pub fn add_blob(&mut self, kind: BlobKind, owner: u32, shard: u32, bytes: &[u8]) -> Result<()> {
        let entry = Entry {
            kind,
            owner,
            shard,
            crc: crc32fast::hash(bytes),
            offset: self.offset,
            len: bytes.len() as u64,
        };
        self.write(bytes)?;
        self.entries.push(entry);
        Ok(())
    }

    /// Appends every shard of a bitmap, in the portable Roaring serialization.
    pub fn add_bitmap(&mut self, kind: BlobKind, owner: u32, bitmap: &ShardedBitmap) -> Result<()> {
        self.add_shards(kind, owner, 0, bitmap)
    }

    /// Appends every shard of one slot of a field.
    pub fn add_slot(&mut self, field: u32, slot: u32, bitmap: &ShardedBitmap) -> Result<()> {
        if slot > MAX_SLOT {
            return Err(Error::Checkpoint(format!(
                "slot {slot} of field {field} is beyond the largest storable slot {MAX_SLOT}"
            )));
        }
        self.add_shards(BlobKind::FieldSlot, field, slot << SHARD_BITS, bitmap)
    }

    fn add_shards(
        &mut self,
        kind: BlobKind,
        owner: u32,
        high: u32,
        bitmap: &ShardedBitmap,
    ) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        for (i, shard) in bitmap.shards() {
            scratch.clear();
            let _written = shard.serialize_into_vec::<croaring::Portable>(&mut scratch);
            self.add_blob(kind, owner, high | i as u32, &scratch)?;
        }
        self.scratch = scratch;
        Ok(())
    }

    /// Writes the directory and trailer and makes the file durable. Returns its size.
    pub fn finish(mut self) -> Result<u64> {
        let dir_off = self.offset;
        let mut dir = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            dir.push(e.kind as u8);
            dir.extend_from_slice(&[0; 3]);
            dir.extend_from_slice(&e.owner.to_le_bytes());
            dir.extend_from_slice(&e.shard.to_le_bytes());
            dir.extend_from_slice(&e.crc.to_le_bytes());
            dir.extend_from_slice(&e.offset.to_le_bytes());
            dir.extend_from_slice(&e.len.to_le_bytes());
        }
        let mut trailer = Vec::with_capacity(SEG_TRAILER_LEN);
        trailer.extend_from_slice(&dir_off.to_le_bytes());
        trailer.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&crc32fast::hash(&dir).to_le_bytes());
        trailer.extend_from_slice(&0u32.to_le_bytes());
        trailer.extend_from_slice(SEG_END_MAGIC);
        self.write(&dir)?;
        self.write(&trailer)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?
            .into_file();
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.offset)
    }
}

/// Segment numbers of every segment file in `dir`.
pub fn list(dir: &DataDir) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in dir.fs().list(dir).map_err(|e| Error::io(dir.path(), e))? {
        if let Some(no) = parse_file_name(&entry.name) {
            out.push(no);
        }
    }
    out.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::SHARD_SIZE;
    use std::fs;

    #[test]
    fn write_read_and_detect_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::os(tmp.path());
        let mut bm = ShardedBitmap::new();
        for id in (0..3_000_000u32).step_by(11) {
            bm.insert(id);
        }
        let mut w = SegmentWriter::create(&dir, 1).unwrap();
        w.add_bitmap(BlobKind::TagShard, 7, &bm).unwrap();
        w.add_blob(BlobKind::Dictionary, 0, 0, b"hello").unwrap();
        w.add_slot(9, 3, &bm).unwrap();
        let mut other = ShardedBitmap::new();
        other.insert(5_000_000);
        w.add_slot(9, 64, &other).unwrap();
        w.finish().unwrap();
        let seg = Segment::open(&dir, 1).unwrap();
        assert_eq!(seg.load_bitmap(BlobKind::FieldSlot, 9, 3).unwrap(), bm);
        assert_eq!(seg.load_bitmap(BlobKind::FieldSlot, 9, 64).unwrap(), other);
        assert!(
            seg.load_bitmap(BlobKind::FieldSlot, 9, 4)
                .unwrap()
                .is_empty()
        );
        assert_eq!(seg.load_bitmap(BlobKind::TagShard, 7, 0).unwrap(), bm);
        assert!(
            seg.load_bitmap(BlobKind::TagShard, 8, 0)
                .unwrap()
                .is_empty()
        );
        let e = seg.entries_of(BlobKind::Dictionary, 0)[0];
        assert_eq!(seg.blob(&e).unwrap(), b"hello");

        // Flip one bit inside the first blob.
        let path = dir.join(file_name(1));
        let mut data = fs::read(&path).unwrap();
        data[SEG_HEADER_LEN + 40] ^= 1;
        fs::write(&path, &data).unwrap();
        let seg = Segment::open(&dir, 1).unwrap();
        let err = seg
            .load_bitmap(BlobKind::TagShard, 7, 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("offset 16"),
            "{err}"
        );

        // A cut-short file fails at open.
        fs::write(&path, &data[..data.len() - 5]).unwrap();
        assert!(Segment::open(&dir, 1).is_err());
    }

    /// Blobs whose checksum is right but whose bitmap is not: cut short,
    /// with a container whose values are out of order, or with an id from
    /// another shard. Each is a corruption error, never a partial set.
    #[test]
    fn checksummed_but_invalid_bitmaps_are_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::os(tmp.path());
        let good = Bitmap::of(&[1, 2, 3]).serialize::<croaring::Portable>();
        let mut unordered = good.clone();
        // The values follow the 16-byte header (cookie, count, key and
        // cardinality, offset): swap the first two.
        unordered[16..20].copy_from_slice(&[2, 0, 1, 0]);
        let elsewhere = Bitmap::of(&[SHARD_SIZE + 1]).serialize::<croaring::Portable>();
        let mut w = SegmentWriter::create(&dir, 1).unwrap();
        w.add_blob(BlobKind::TagShard, 1, 0, &good[..good.len() - 1])
            .unwrap();
        w.add_blob(BlobKind::TagShard, 2, 0, &unordered).unwrap();
        w.add_blob(BlobKind::TagShard, 3, 0, &elsewhere).unwrap();
        w.add_blob(BlobKind::TagShard, 4, 0, &good).unwrap();
        w.finish().unwrap();
        let seg = Segment::open(&dir, 1).unwrap();
        for (tag, why) in [
            (1, "invalid roaring bitmap"),
            (2, "invalid roaring bitmap"),
            (3, "outside its shard"),
        ] {
            let err = seg.load_bitmap(BlobKind::TagShard, tag, 0).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "tag {tag}: {err}");
            assert!(err.to_string().contains(why), "tag {tag}: {err}");
        }
        let ok = seg.load_bitmap(BlobKind::TagShard, 4, 0).unwrap();
        assert_eq!(ok.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
    }
}
