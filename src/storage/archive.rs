//! The event archive: ingested events kept, zstd-compressed, in files of
//! their own (`events-<n>.tev`), so that facts can be rebuilt from them.
//!
//! Events reach the archive through the log: a batch carries the encoded
//! events it ingested ([`Batch::events`](crate::storage::record::Batch)),
//! and each checkpoint reads the log records it covers and writes their
//! events into one new archive file, named by the manifest with the log
//! range and the ingest times it holds. A file is never changed after it is
//! written; retention drops whole files (the manifest stops naming them,
//! then they are deleted).
//!
//! A file is a header, blocks of events (each one zstd frame of about
//! [`BLOCK_BYTES`]), an index naming each block's customers as a Roaring
//! bitmap (so that a rebuild of a few customers decompresses only the
//! blocks that hold them) and a trailer; `storage-format.md` has every byte.
//!
//! This room owns the file format. It does not know what an event says
//! (its bytes are the ingestion room's), nor which files the store keeps
//! (the manifest's), nor when they are written (the checkpoint's).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use crate::error::{Error, Result};
use crate::storage::codec::{Dec, le_u32, le_u64};
use crate::storage::datadir::{DataDir, list_numbered, numbered_name, parse_numbered};
use crate::storage::fs::{Appender, Create, Mapped};

pub const ARCHIVE_MAGIC: &[u8; 8] = b"TAGSEVT\0";
pub const ARCHIVE_END_MAGIC: &[u8; 8] = b"TAGSEVE\0";
pub const ARCHIVE_VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
const TRAILER_LEN: usize = 24;
/// Raw bytes of events gathered before a block is compressed.
pub const BLOCK_BYTES: usize = 1 << 20;
/// Largest raw block a reader accepts (a block closes once it passes
/// [`BLOCK_BYTES`], and one event is far smaller than the rest).
pub const MAX_BLOCK_BYTES: usize = 8 << 20;
/// Largest encoded event the archive keeps.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// zstd level: the default, a good trade for text-like records.
const LEVEL: i32 = 3;

pub fn file_name(no: u64) -> String {
    numbered_name("events-", no, ".tev")
}

pub fn parse_file_name(name: &str) -> Option<u64> {
    parse_numbered(name, "events-", ".tev")
}

/// Numbers of every archive file in `dir`.
pub fn list(dir: &DataDir) -> Result<Vec<u64>> {
    list_numbered(dir, "events-", ".tev")
}

/// One block as the index describes it.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    pub offset: u64,
    pub compressed: u32,
    pub raw: u32,
    pub crc: u32,
    pub events: u32,
    pub customers: RoaringBitmap,
}

/// Writes one archive file.
pub struct ArchiveWriter {
    path: PathBuf,
    out: BufWriter<Appender>,
    offset: u64,
    raw: Vec<u8>,
    raw_events: u32,
    raw_customers: RoaringBitmap,
    blocks: Vec<BlockInfo>,
    events: u64,
}

impl ArchiveWriter {
    /// Creates file number `no`, emptying a leftover of a checkpoint that
    /// did not finish (the manifest names no file under a number the writer
    /// has not used).
    pub fn create(dir: &DataDir, no: u64) -> Result<Self> {
        let path = dir.join(file_name(no));
        let file = dir
            .fs()
            .create(&path, Create::Truncate)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            path,
            out: BufWriter::with_capacity(1 << 20, Appender::new(file, 0)),
            offset: 0,
            raw: Vec::with_capacity(BLOCK_BYTES + (64 << 10)),
            raw_events: 0,
            raw_customers: RoaringBitmap::new(),
            blocks: Vec::new(),
            events: 0,
        };
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(ARCHIVE_MAGIC);
        header.extend_from_slice(&ARCHIVE_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io(&self.path, e))?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Events added so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Adds one event of `customer`.
    pub fn push(&mut self, customer: u32, event: &[u8]) -> Result<()> {
        if event.len() > MAX_EVENT_BYTES {
            return Err(Error::Checkpoint(format!(
                "an event of {} bytes is over the archive's limit of {MAX_EVENT_BYTES}",
                event.len()
            )));
        }
        self.raw.extend_from_slice(&customer.to_le_bytes());
        self.raw
            .extend_from_slice(&(event.len() as u32).to_le_bytes());
        self.raw.extend_from_slice(event);
        self.raw_events += 1;
        self.raw_customers.insert(customer);
        self.events += 1;
        if self.raw.len() >= BLOCK_BYTES {
            self.close_block()?;
        }
        Ok(())
    }

    fn close_block(&mut self) -> Result<()> {
        if self.raw.is_empty() {
            return Ok(());
        }
        let z = zstd::bulk::compress(&self.raw, LEVEL).map_err(|e| Error::io(&self.path, e))?;
        let info = BlockInfo {
            offset: self.offset,
            compressed: z.len() as u32,
            raw: self.raw.len() as u32,
            crc: crc32fast::hash(&z),
            events: self.raw_events,
            customers: std::mem::take(&mut self.raw_customers),
        };
        self.write(&z)?;
        self.blocks.push(info);
        self.raw.clear();
        self.raw_events = 0;
        Ok(())
    }

    /// Writes the last block, the index and the trailer, and syncs the
    /// file. Returns its length in bytes.
    pub fn finish(mut self) -> Result<u64> {
        self.close_block()?;
        let index_offset = self.offset;
        let mut index = Vec::new();
        index.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            index.extend_from_slice(&b.offset.to_le_bytes());
            index.extend_from_slice(&b.compressed.to_le_bytes());
            index.extend_from_slice(&b.raw.to_le_bytes());
            index.extend_from_slice(&b.crc.to_le_bytes());
            index.extend_from_slice(&b.events.to_le_bytes());
            index.extend_from_slice(&(b.customers.serialized_size() as u32).to_le_bytes());
            b.customers
                .serialize_into(&mut index)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        let mut trailer = Vec::with_capacity(TRAILER_LEN);
        trailer.extend_from_slice(&index_offset.to_le_bytes());
        trailer.extend_from_slice(&(index.len() as u32).to_le_bytes());
        trailer.extend_from_slice(&crc32fast::hash(&index).to_le_bytes());
        trailer.extend_from_slice(ARCHIVE_END_MAGIC);
        self.write(&index)?;
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

/// An archive file open for reading, its index checked.
pub struct ArchiveFile {
    pub path: PathBuf,
    data: Mapped,
    pub blocks: Vec<BlockInfo>,
}

impl ArchiveFile {
    pub fn open(dir: &DataDir, no: u64) -> Result<Self> {
        let path = dir.join(file_name(no));
        let data = dir.fs().map(&path).map_err(|e| match e.kind() {
            // Only files the manifest names are opened.
            std::io::ErrorKind::NotFound => Error::corrupt(
                &path,
                0,
                "the manifest names this event archive file, but it is missing",
            ),
            _ => Error::io(&path, e),
        })?;
        let blocks = read_index(&path, &data)?;
        Ok(Self { path, data, blocks })
    }

    /// Calls `f` with (customer, event bytes) of every event in the blocks
    /// that hold one of `customers` (every block, with `None`) whose
    /// customer is wanted, in the order they were archived. Returns the
    /// events passed to `f`.
    pub fn for_each(
        &self,
        customers: Option<&RoaringBitmap>,
        mut f: impl FnMut(u32, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut n = 0;
        for b in &self.blocks {
            if customers.is_some_and(|c| c.is_disjoint(&b.customers)) {
                continue;
            }
            let raw = self.block(b)?;
            let corrupt = |reason: String| Error::corrupt(&self.path, b.offset, reason);
            let mut d = Dec::new(&raw);
            while d.remaining() > 0 {
                let customer = d.u32().map_err(|e| corrupt(e.reason))?;
                let len = d.u32().map_err(|e| corrupt(e.reason))? as usize;
                let event = d.bytes(len).map_err(|e| corrupt(e.reason))?;
                if customers.is_none_or(|c| c.contains(customer)) {
                    f(customer, event)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn block(&self, b: &BlockInfo) -> Result<Vec<u8>> {
        let corrupt = |reason: String| Error::corrupt(&self.path, b.offset, reason);
        let start = b.offset as usize;
        let z = start
            .checked_add(b.compressed as usize)
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| corrupt("block runs past the end of the file".into()))?;
        if crc32fast::hash(z) != b.crc {
            return Err(corrupt("block checksum mismatch".into()));
        }
        if b.raw as usize > MAX_BLOCK_BYTES {
            return Err(corrupt(format!(
                "block of {} bytes raw is too large",
                b.raw
            )));
        }
        let raw = zstd::bulk::decompress(z, b.raw as usize)
            .map_err(|e| corrupt(format!("block does not decompress: {e}")))?;
        if raw.len() != b.raw as usize {
            return Err(corrupt(format!(
                "block decompresses to {} bytes, its index says {}",
                raw.len(),
                b.raw
            )));
        }
        Ok(raw)
    }
}

fn read_index(path: &Path, data: &[u8]) -> Result<Vec<BlockInfo>> {
    let corrupt = |offset: usize, reason: String| Error::corrupt(path, offset as u64, reason);
    if data.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(
            0,
            "archive file shorter than header and trailer".into(),
        ));
    }
    if &data[..8] != ARCHIVE_MAGIC {
        return Err(corrupt(0, "bad magic: not a tagstore event archive".into()));
    }
    let version = le_u32(data, 8).unwrap_or(0);
    if version != ARCHIVE_VERSION {
        return Err(corrupt(8, format!("unsupported archive version {version}")));
    }
    let t = data.len() - TRAILER_LEN;
    if &data[t + 16..] != ARCHIVE_END_MAGIC {
        return Err(corrupt(
            t,
            "bad trailer magic: the file is cut short".into(),
        ));
    }
    let index_offset = le_u64(data, t).unwrap_or(0) as usize;
    let index_len = le_u32(data, t + 8).unwrap_or(0) as usize;
    let crc = le_u32(data, t + 12).unwrap_or(0);
    let index = index_offset
        .checked_add(index_len)
        .filter(|&end| index_offset >= HEADER_LEN && end == t)
        .and_then(|end| data.get(index_offset..end))
        .ok_or_else(|| corrupt(t, "index out of place".into()))?;
    if crc32fast::hash(index) != crc {
        return Err(corrupt(index_offset, "index checksum mismatch".into()));
    }
    let bad = |e: crate::storage::codec::DecodeError| corrupt(index_offset + e.offset, e.reason);
    let mut d = Dec::new(index);
    let n = d.u32().map_err(bad)?;
    let mut blocks = Vec::new();
    for _ in 0..n {
        let offset = d.u64().map_err(bad)?;
        let compressed = d.u32().map_err(bad)?;
        let raw = d.u32().map_err(bad)?;
        let crc = d.u32().map_err(bad)?;
        let events = d.u32().map_err(bad)?;
        let customers = d.bitmap().map_err(bad)?;
        if offset < HEADER_LEN as u64 || offset + u64::from(compressed) > index_offset as u64 {
            return Err(corrupt(
                index_offset,
                format!("block at {offset} lies outside the blocks"),
            ));
        }
        blocks.push(BlockInfo {
            offset,
            compressed,
            raw,
            crc,
            events,
            customers,
        });
    }
    d.finish().map_err(bad)?;
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::MemFs;
    use std::sync::Arc;

    fn dir() -> DataDir {
        let fs = MemFs::new();
        let dir = DataDir::new(Arc::new(fs), "/d");
        dir.fs().create_dir_all(&dir).unwrap();
        dir
    }

    fn event(i: u32) -> Vec<u8> {
        format!(
            "event {i} of customer {} {}",
            i % 1000,
            "x".repeat((i % 50) as usize)
        )
        .into_bytes()
    }

    #[test]
    fn events_round_trip_and_blocks_are_skipped_by_customer() {
        let dir = dir();
        let mut w = ArchiveWriter::create(&dir, 7).unwrap();
        for i in 0..60_000u32 {
            // Customers 0..1000 early, 5000.. late: later blocks hold none of the first.
            let c = if i < 30_000 {
                i % 1000
            } else {
                5000 + i % 1000
            };
            w.push(c, &event(i)).unwrap();
        }
        assert_eq!(w.events(), 60_000);
        let bytes = w.finish().unwrap();
        assert_eq!(list(&dir).unwrap(), vec![7]);
        let f = ArchiveFile::open(&dir, 7).unwrap();
        assert!(f.blocks.len() > 1, "{} blocks", f.blocks.len());
        assert!(bytes < 60_000 * 20, "{bytes} bytes: compressed");
        let mut all = Vec::new();
        assert_eq!(
            f.for_each(None, |c, e| {
                all.push((c, e.to_vec()));
                Ok(())
            })
            .unwrap(),
            60_000
        );
        assert_eq!(all[12_345].1, event(12_345));
        let wanted: RoaringBitmap = [3u32].into_iter().collect();
        let mut mine = Vec::new();
        f.for_each(Some(&wanted), |c, e| {
            mine.push((c, e.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(mine.len(), 30);
        assert!(mine.iter().all(|(c, _)| *c == 3));
        let holding = f.blocks.iter().filter(|b| b.customers.contains(3)).count();
        assert!(holding < f.blocks.len());
    }

    #[test]
    fn damage_is_named() {
        let dir = dir();
        let mut w = ArchiveWriter::create(&dir, 1).unwrap();
        for i in 0..1000 {
            w.push(i, &event(i)).unwrap();
        }
        w.finish().unwrap();
        let path = dir.join(file_name(1));
        let good = dir.fs().read(&path).unwrap();
        let put = |bytes: &[u8]| {
            let f = dir.fs().create(&path, Create::Truncate).unwrap();
            f.write_at(bytes, 0).unwrap();
        };
        // A flipped bit in the first block: the index opens, the block says so.
        let mut bad = good.clone();
        bad[HEADER_LEN + 3] ^= 1;
        put(&bad);
        let f = ArchiveFile::open(&dir, 1).unwrap();
        let err = f.for_each(None, |_, _| Ok(())).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        // Cut short: the trailer is gone.
        put(&good[..good.len() - 5]);
        let err = ArchiveFile::open(&dir, 1).err().unwrap().to_string();
        assert!(err.contains("trailer") || err.contains("index"), "{err}");
        // A flipped bit in the index.
        let mut bad = good.clone();
        let at = good.len() - TRAILER_LEN - 2;
        bad[at] ^= 1;
        put(&bad);
        let err = ArchiveFile::open(&dir, 1).err().unwrap().to_string();
        assert!(err.contains("index checksum"), "{err}");
    }
}
