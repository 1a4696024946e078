//! Taking a backup: which files, opened while checkpoints cannot delete
//! them ([`Source::take`]), then written out as a backup file, checking
//! every checksum on the way ([`Source::write`]). Reads the store's files,
//! never writes them.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::error::{Error, Result};
use crate::storage::datadir::{DataDir, list_numbered, numbered_name};
use crate::storage::fs::{Mapped, ReadFile};
use crate::storage::manifest::{MANIFEST_FILE, Manifest};
use crate::storage::segment::Segment;
use crate::storage::wal::{
    self, FRAME_PREFIX, MAX_RECORD_LEN, MIN_RECORD_LEN, WAL_HEADER_LEN, WAL_MAGIC, WAL_VERSION,
};

/// Pieces of a file written at a time (progress is told after each).
const CHUNK: usize = 1 << 20;

/// What a backup copies, open: the manifest's bytes, its segment and
/// archive files (mapped: they never change), and the log and audit files
/// (open for reading: they grow, and a checkpoint may delete a log file
/// while the backup reads it; the handle keeps reading it).
pub struct Source {
    position: u64,
    at_ms: i64,
    manifest: Option<(Vec<u8>, Manifest)>,
    segments: Vec<Arc<Segment>>,
    archives: Vec<(String, PathBuf, Mapped)>,
    logs: Vec<(PathBuf, u64, Arc<dyn ReadFile>)>,
    audit: Vec<(u64, Arc<dyn ReadFile>, u64)>,
}

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct Summary {
    pub header: Header,
    /// Files written whole into the backup (the manifest among them).
    pub files: u64,
    /// Files an increment left to its base.
    pub in_base: u64,
    /// Log records written (the writes after the checkpoint).
    pub log_records: u64,
    /// Bytes of the files and records, before compression.
    pub content_bytes: u64,
    /// Bytes of the backup file.
    pub backup_bytes: u64,
}

impl Source {
    /// Opens what a backup of `dir` copies. `position` gives the lsn of the
    /// newest published write; it is asked after the manifest is read, so
    /// every write up to it is in the manifest's segments or in the log
    /// after its checkpoint. The caller keeps checkpoints from deleting
    /// files while this runs (the engine's files lock); after it returns,
    /// deletions do no harm.
    pub fn take(dir: &DataDir, position: impl FnOnce() -> u64, at_ms: i64) -> Result<Source> {
        let path = dir.join(MANIFEST_FILE);
        let manifest = match dir.fs().read(&path) {
            Ok(bytes) => {
                let m = Manifest::parse(&path, &bytes)?;
                Some((bytes, m))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let position = position();
        let mut segments = Vec::new();
        let mut archives = Vec::new();
        if let Some((_, m)) = &manifest {
            for no in m.segments() {
                segments.push(Segment::open(dir, no)?);
            }
            for a in &m.archives {
                let name = crate::storage::archive::file_name(a.no);
                let path = dir.join(&name);
                let map = dir.fs().map(&path).map_err(|e| match e.kind() {
                    io::ErrorKind::NotFound => Error::corrupt(
                        &path,
                        0,
                        "the manifest names this event archive file, but it is missing: \
                         a backup would not be whole",
                    ),
                    _ => Error::io(&path, e),
                })?;
                archives.push((name, path, map));
            }
        }
        let mut logs = Vec::new();
        for f in wal::list(dir)? {
            let file = dir
                .fs()
                .open_read(&f.path)
                .map_err(|e| Error::io(&f.path, e))?;
            logs.push((f.path, f.first_lsn, file));
        }
        let mut audit = Vec::new();
        let lens: std::collections::HashMap<String, u64> = dir
            .fs()
            .list(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
            .into_iter()
            .map(|e| (e.name, e.len))
            .collect();
        for first in list_numbered(dir, AUDIT_PREFIX, AUDIT_SUFFIX)? {
            let name = numbered_name(AUDIT_PREFIX, first, AUDIT_SUFFIX);
            let path = dir.join(&name);
            match dir.fs().open_read(&path) {
                Ok(file) => audit.push((first, file, lens.get(&name).copied().unwrap_or(0))),
                // Dropped by the trail's retention meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(Source {
            position,
            at_ms,
            manifest,
            segments,
            archives,
            logs,
            audit,
        })
    }

    /// The lsn the backup holds every write up to.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes it will copy at most, before compression (the log's files
    /// count whole: their records after the checkpoint are fewer).
    pub fn estimated_bytes(&self) -> u64 {
        let mut n = self.manifest.as_ref().map_or(0, |(b, _)| b.len() as u64);
        n += self.segments.iter().map(|s| s.size()).sum::<u64>();
        n += self.archives.iter().map(|a| a.2.len() as u64).sum::<u64>();
        n += self.audit.iter().map(|a| a.2).sum::<u64>();
        for (path, _, _) in &self.logs {
            n += std::fs::metadata(path).map_or(0, |m| m.len());
        }
        n
    }

    /// Writes the backup to `out`: an increment of `base` (the header of a
    /// backup of this store at or before this position), or a full backup.
    /// `progress(done, estimated)` is told the bytes copied so far. Every
    /// segment blob and log record is checked as it is copied: damage fails
    /// the backup (a `Corrupt` error naming the file and offset) rather
    /// than being copied. An error writing to `out` is an I/O error on
    /// "the backup's output".
    pub fn write(
        self,
        base: Option<&Header>,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Summary> {
        let next_segment_no = self.manifest.as_ref().map_or(0, |(_, m)| m.next_segment_no);
        let checkpoint_lsn = self.manifest.as_ref().map_or(0, |(_, m)| m.checkpoint_lsn);
        if let Some(b) = base {
            if b.position > self.position {
                return Err(Error::Precondition(format!(
                    "the base backup holds writes up to lsn {}, past this store's {}: \
                     it is not a backup of this store",
                    b.position, self.position
                )));
            }
            if b.next_segment_no > next_segment_no {
                return Err(Error::Precondition(format!(
                    "the base backup names segment numbers up to {}, past this store's {}: \
                     it is not a backup of this store",
                    b.next_segment_no, next_segment_no
                )));
            }
        }
        let header = Header {
            id: random_id()?,
            base_id: base.map_or(0, |b| b.id),
            base_position: base.map_or(0, |b| b.position),
            position: self.position,
            checkpoint_lsn,
            next_segment_no,
            audit_newest: self.audit.last().map_or(0, |a| a.0),
            at_ms: self.at_ms,
        };
        let estimated = self.estimated_bytes();
        let mut counted = Counting { inner: out, n: 0 };
        counted.write_all(&header.encode()).map_err(output_error)?;
        let mut enc = zstd::stream::write::Encoder::new(&mut counted, 3).map_err(output_error)?;
        enc.include_checksum(true).map_err(output_error)?;
        let mut w = Entries {
            out: enc,
            crc: crc32fast::Hasher::new(),
            entries: 0,
            content: 0,
            estimated,
            progress,
        };
        let mut s = Summary {
            header,
            files: 0,
            in_base: 0,
            log_records: 0,
            content_bytes: 0,
            backup_bytes: 0,
        };
        // A file an increment's base holds: the base's segment and archive
        // numbers are below its next number; its audit files older than its
        // newest were complete when it was taken.
        let in_base = |name: &str| -> bool {
            let Some(b) = base else { return false };
            if let Some(no) = crate::storage::segment::parse_file_name(name)
                .or_else(|| crate::storage::archive::parse_file_name(name))
            {
                return no < b.next_segment_no;
            }
            crate::storage::datadir::parse_numbered(name, AUDIT_PREFIX, AUDIT_SUFFIX)
                .is_some_and(|first| first < b.audit_newest)
        };
        if let Some((bytes, _)) = &self.manifest {
            w.file(MANIFEST_FILE, bytes)?;
            s.files += 1;
        }
        for seg in &self.segments {
            let name = crate::storage::segment::file_name(seg.no);
            if in_base(&name) {
                w.in_base(&name, seg.bytes())?;
                s.in_base += 1;
            } else {
                seg.check_blobs()?;
                w.file(&name, seg.bytes())?;
                s.files += 1;
            }
        }
        for (name, _, map) in &self.archives {
            if in_base(name) {
                w.in_base(name, map)?;
                s.in_base += 1;
            } else {
                w.file(name, map)?;
                s.files += 1;
            }
        }
        s.log_records = w.log(&self.logs, checkpoint_lsn, self.position)?;
        for (first, file, len) in &self.audit {
            let name = numbered_name(AUDIT_PREFIX, *first, AUDIT_SUFFIX);
            let path = PathBuf::from(&name);
            let mut data = vec![0u8; usize::try_from(*len).unwrap_or(usize::MAX)];
            file.read_exact_at(&mut data, 0)
                .map_err(|e| Error::io(&path, e))?;
            if in_base(&name) {
                w.in_base(&name, &data)?;
                s.in_base += 1;
            } else {
                w.file(&name, &data)?;
                s.files += 1;
            }
        }
        s.content_bytes = w.content;
        w.end()?;
        s.backup_bytes = counted.n;
        counted.flush().map_err(output_error)?;
        Ok(s)
    }
}

/// A nonzero random id.
fn random_id() -> Result<u64> {
    loop {
        let id = getrandom::u64()
            .map_err(|e| Error::Internal(format!("no random numbers from the OS: {e}")))?;
        if id != 0 {
            return Ok(id);
        }
    }
}

fn output_error(e: io::Error) -> Error {
    Error::io("the backup's output", e)
}

/// Counts the bytes written through it.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The compressed stream of entries, with the checksum of everything
/// written into it.
struct Entries<'a, W: Write> {
    out: zstd::stream::write::Encoder<'static, W>,
    crc: crc32fast::Hasher,
    entries: u64,
    content: u64,
    estimated: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<W: Write> Entries<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes).map_err(output_error)
    }

    fn name(&mut self, kind: u8, name: &str) -> Result<()> {
        self.put(&[kind])?;
        self.put(&(name.len() as u32).to_le_bytes())?;
        self.put(name.as_bytes())
    }

    /// Copies `data` a piece at a time, telling progress after each.
    fn content(&mut self, data: &[u8]) -> Result<()> {
        for piece in data.chunks(CHUNK) {
            self.put(piece)?;
            self.content += piece.len() as u64;
            (self.progress)(self.content, self.estimated.max(self.content));
        }
        Ok(())
    }

    fn file(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.name(ENTRY_FILE, name)?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.content(data)?;
        self.put(&crc32fast::hash(data).to_le_bytes())?;
        self.entries += 1;
        Ok(())
    }

    fn in_base(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.name(ENTRY_IN_BASE, name)?;
        self.put(&(data.len() as u64).to_le_bytes())?;
        self.put(&tail_crc(data).to_le_bytes())?;
        self.entries += 1;
        Ok(())
    }

    /// The log records `after + 1 ..= upto`, read from `logs` in order and
    /// each checked (length, checksum, lsn in sequence), written as they
    /// are framed in the log. Nothing when the manifest covers them all.
    fn log(
        &mut self,
        logs: &[(PathBuf, u64, Arc<dyn ReadFile>)],
        after: u64,
        upto: u64,
    ) -> Result<u64> {
        if upto <= after {
            return Ok(0);
        }
        self.put(&[ENTRY_LOG])?;
        self.put(&(after + 1).to_le_bytes())?;
        let mut next = after + 1;
        let mut body = Vec::new();
        for (path, first_lsn, file) in logs {
            if next > upto {
                break;
            }
            let corrupt = |off: u64, why: String| Error::corrupt(path, off, why);
            let mut head = [0u8; WAL_HEADER_LEN];
            match file.read_exact_at(&mut head, 0) {
                Ok(()) => {}
                // A file begun for a checkpoint whose start failed.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
                Err(e) => return Err(Error::io(path, e)),
            }
            if &head[..8] != WAL_MAGIC || le_u32(&head, 8) != Some(WAL_VERSION) {
                return Err(corrupt(
                    0,
                    "not a tagstore log file of a known version".into(),
                ));
            }
            if le_u64(&head, 16) != Some(*first_lsn) {
                return Err(corrupt(
                    16,
                    "header and file name disagree on the first lsn".into(),
                ));
            }
            if *first_lsn > next {
                return Err(corrupt(
                    16,
                    format!("log gap: expected lsn {next}, file starts at {first_lsn}"),
                ));
            }
            let mut pos = WAL_HEADER_LEN as u64;
            while next <= upto {
                let mut prefix = [0u8; FRAME_PREFIX];
                match file.read_exact_at(&mut prefix, pos) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(Error::io(path, e)),
                }
                let len = le_u32(&prefix, 0).unwrap_or(0) as usize;
                if len == 0 {
                    // Preallocated space: this file's records end here.
                    break;
                }
                if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&len) {
                    return Err(corrupt(pos, format!("invalid record length {len}")));
                }
                body.resize(len, 0);
                file.read_exact_at(&mut body, pos + FRAME_PREFIX as u64)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => {
                            corrupt(pos, format!("record of {len} bytes cut short"))
                        }
                        _ => Error::io(path, e),
                    })?;
                if crc32fast::hash(&body) != le_u32(&prefix, 4).unwrap_or(0) {
                    return Err(corrupt(pos, "record checksum mismatch".into()));
                }
                let lsn = le_u64(&body, 0).unwrap_or(0);
                if lsn >= next {
                    if lsn != next {
                        return Err(corrupt(
                            pos,
                            format!("log gap: expected lsn {next}, found {lsn}"),
                        ));
                    }
                    self.put(&prefix)?;
                    self.put(&body)?;
                    self.content += (FRAME_PREFIX + len) as u64;
                    (self.progress)(self.content, self.estimated.max(self.content));
                    next += 1;
                }
                pos += (FRAME_PREFIX + len) as u64;
            }
        }
        if next <= upto {
            return Err(Error::Corrupt {
                path: PathBuf::from("the log"),
                offset: 0,
                reason: format!(
                    "the log ends at lsn {} before the backup's position {upto}",
                    next - 1
                ),
            });
        }
        self.put(&0u32.to_le_bytes())?;
        self.entries += 1;
        Ok(next - after - 1)
    }

    fn end(mut self) -> Result<()> {
        let crc = self.crc.clone().finalize();
        let mut tail = vec![ENTRY_END];
        tail.extend_from_slice(&self.entries.to_le_bytes());
        tail.extend_from_slice(&self.content.to_le_bytes());
        tail.extend_from_slice(&crc.to_le_bytes());
        self.out.write_all(&tail).map_err(output_error)?;
        self.out.finish().map_err(output_error)?;
        Ok(())
    }
}
