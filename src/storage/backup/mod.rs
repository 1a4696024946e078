//! Online backups and restores: a consistent copy of a store taken while
//! writes go on, as one file (a header, then one zstd frame of checksummed
//! entries), and a new data directory made from a full backup and any
//! increments taken after it.
//!
//! Owns the backup file's format (`storage-format.md`, "Backup files") and
//! what a backup holds: the `MANIFEST`, the segment and archive files it
//! names, the log records after its checkpoint up to the backup's position,
//! and the audit trail's files. [`take`] reads a store's files (it never
//! writes to the store it copies); [`restore`] writes a new directory from
//! backup files (it never touches an existing store). Knows nothing of
//! gRPC: the server streams what [`Source::write`] produces.

pub mod restore;
pub mod take;

pub use restore::{RestoreReport, restore_dir, restore_into};
pub use take::{Source, Summary};

use crate::storage::codec::{le_u32, le_u64};

/// The first 8 bytes of every backup file.
pub const BACKUP_MAGIC: &[u8; 8] = b"TAGSBAK\0";
/// The format's version; a reader refuses others.
pub const BACKUP_VERSION: u32 = 1;
/// Bytes of the header, which is not compressed (a client reads it to ask
/// for an increment).
pub const HEADER_LEN: usize = 88;
/// Bytes at the end of a file that an increment's entry for a file of its
/// base is checked against.
pub const TAIL_CHECK: usize = 4096;
/// A name in an entry is at most this long.
pub const MAX_NAME: usize = 255;

/// Entry kinds inside the compressed stream.
pub(crate) const ENTRY_END: u8 = 0;
pub(crate) const ENTRY_FILE: u8 = 1;
pub(crate) const ENTRY_IN_BASE: u8 = 2;
pub(crate) const ENTRY_LOG: u8 = 3;

/// The audit trail's file names (the audit room's), which a backup copies
/// as they are: the audit room checks them when the restored store starts.
pub(crate) const AUDIT_PREFIX: &str = "audit-";
pub(crate) const AUDIT_SUFFIX: &str = ".log";

/// A backup file's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// This backup's id (random, never 0).
    pub id: u64,
    /// The id of the backup this one is an increment of; 0: a full backup.
    pub base_id: u64,
    /// The position (lsn) of that base; 0 for a full backup.
    pub base_position: u64,
    /// The lsn the backup holds every write up to (its position).
    pub position: u64,
    /// The checkpoint lsn of the manifest it holds (0: the store had none).
    pub checkpoint_lsn: u64,
    /// The next segment number of that manifest: every segment and archive
    /// file it holds is numbered below it (0: no manifest).
    pub next_segment_no: u64,
    /// The first sequence number of the audit file being written when the
    /// backup was taken (0: none); older audit files were complete.
    pub audit_newest: u64,
    /// When it was taken, Unix ms.
    pub at_ms: i64,
}

impl Header {
    pub fn is_incremental(&self) -> bool {
        self.base_id != 0
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(BACKUP_MAGIC);
        b[8..12].copy_from_slice(&BACKUP_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&u32::from(self.is_incremental()).to_le_bytes());
        let words = [
            self.id,
            self.base_id,
            self.base_position,
            self.position,
            self.checkpoint_lsn,
            self.next_segment_no,
            self.audit_newest,
            self.at_ms as u64,
        ];
        for (i, w) in words.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        // 80..84 reserved, 0.
        let crc = crc32fast::hash(&b[..84]);
        b[84..88].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads a header; the error says what is wrong (the caller names the
    /// file).
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_LEN {
            return Err(format!(
                "{} bytes: shorter than a backup's header ({HEADER_LEN} bytes)",
                b.len()
            ));
        }
        if &b[..8] != BACKUP_MAGIC {
            return Err("bad magic: not a tagstore backup".into());
        }
        let version = le_u32(b, 8).unwrap_or(0);
        if version != BACKUP_VERSION {
            return Err(format!("unsupported backup version {version}"));
        }
        if crc32fast::hash(&b[..84]) != le_u32(b, 84).unwrap_or(0) {
            return Err("header checksum mismatch".into());
        }
        let w = |i: usize| le_u64(b, 16 + 8 * i).unwrap_or(0);
        let h = Header {
            id: w(0),
            base_id: w(1),
            base_position: w(2),
            position: w(3),
            checkpoint_lsn: w(4),
            next_segment_no: w(5),
            audit_newest: w(6),
            at_ms: w(7) as i64,
        };
        let kind = le_u32(b, 12).unwrap_or(u32::MAX);
        if kind != u32::from(h.is_incremental()) || h.id == 0 {
            return Err(format!("inconsistent header (kind {kind}, id {})", h.id));
        }
        Ok(h)
    }
}

/// CRC-32 of the last [`TAIL_CHECK`] bytes of `data` (all of it when
/// shorter): what an increment checks a file of its base by.
pub(crate) fn tail_crc(data: &[u8]) -> u32 {
    crc32fast::hash(&data[data.len().saturating_sub(TAIL_CHECK)..])
}

/// True for the names a backup's file entries may carry: the manifest,
/// segment, archive and audit files (never a path, never anything else).
pub(crate) fn allowed_name(name: &str) -> bool {
    use crate::storage::datadir::parse_numbered;
    name == crate::storage::manifest::MANIFEST_FILE
        || crate::storage::segment::parse_file_name(name).is_some()
        || crate::storage::archive::parse_file_name(name).is_some()
        || parse_numbered(name, AUDIT_PREFIX, AUDIT_SUFFIX).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_damage_is_refused() {
        let h = Header {
            id: 7,
            base_id: 3,
            base_position: 10,
            position: 20,
            checkpoint_lsn: 15,
            next_segment_no: 9,
            audit_newest: 4,
            at_ms: 1_700_000_000_000,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(h));
        for i in 0..HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(Header::decode(&bad).is_err(), "byte {i}");
        }
        assert!(Header::decode(&b[..40]).is_err());
    }

    #[test]
    fn only_store_file_names_are_allowed() {
        assert!(allowed_name("MANIFEST"));
        assert!(allowed_name("seg-0000000000000001.seg"));
        assert!(allowed_name("events-0000000000000001.tev"));
        assert!(allowed_name("audit-0000000000000001.log"));
        for bad in [
            "LOCK",
            "MANIFEST.tmp",
            "../MANIFEST",
            "seg-1.seg",
            "wal-0000000000000001.log",
            "orphaned",
            "seg-0000000000000001.seg/x",
        ] {
            assert!(!allowed_name(bad), "{bad}");
        }
    }
}
