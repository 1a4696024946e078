//! Restoring: a full backup and its increments, in order, into a new data
//! directory, checking every checksum (the header's, each file's, each log
//! record's, the stream's and zstd's own), then the restored store itself
//! (its segments' blobs, its archive files, and a start of the engine,
//! which replays the log). Writes only the new directory.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::*;
use crate::error::{Error, Result};
use crate::storage::datadir::{DataDir, fsync_dir};
use crate::storage::fs::{Create, WriteFile};
use crate::storage::manifest::{MANIFEST_FILE, Manifest};
use crate::storage::wal::{
    self, FRAME_PREFIX, MAX_RECORD_LEN, MIN_RECORD_LEN, WAL_MAGIC, WAL_VERSION,
};

/// Bytes copied at a time.
const CHUNK: usize = 1 << 20;

/// What a restore made.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The last backup's header: the restored store holds every write up
    /// to its position.
    pub header: Header,
    /// Backup files read (1 + increments).
    pub backups: usize,
    /// Files written into the new directory (a file an increment replaced
    /// counts again).
    pub files: u64,
    /// Bytes written, before the check's start of the engine.
    pub bytes: u64,
    /// Log records restored (the writes after the last backup's checkpoint).
    pub log_records: u64,
    /// Tags and live customers of the restored store, as its start found.
    pub tags: usize,
    pub customers: u64,
}

/// Restores `backups` (a full backup, then its increments in order) into
/// `to`, a directory that must not exist or be empty. The files are made
/// in `<to>.restoring` beside it, checked, the store started once and shut
/// down (which replays and checkpoints the restored log), and only then
/// renamed to `to`: a restore that fails or is interrupted leaves no
/// directory that looks like a store at `to`. A failed restore deletes what
/// it made; an interrupted one leaves `<to>.restoring`, which the next
/// restore refuses to reuse (it names it).
pub fn restore_dir(backups: &[PathBuf], to: &Path) -> Result<RestoreReport> {
    if backups.is_empty() {
        return Err(Error::invalid("no backup file given"));
    }
    match std::fs::read_dir(to) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::invalid(format!(
                    "{} exists and is not empty: a restore makes a new data directory",
                    to.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(to, e)),
    }
    let mut staging = to.as_os_str().to_owned();
    staging.push(".restoring");
    let staging = PathBuf::from(staging);
    if staging.exists() {
        return Err(Error::invalid(format!(
            "{} exists (left by an interrupted restore?): remove it and restore again",
            staging.display()
        )));
    }
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let made = (|| {
        let mut inputs: Vec<(PathBuf, Box<dyn Read>)> = Vec::new();
        for path in backups {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            inputs.push((path.clone(), Box::new(f)));
        }
        let dir = DataDir::os(&staging);
        let mut report = restore_into(inputs, &dir)?;
        check_restored(&dir)?;
        let engine = crate::storage::Engine::open(crate::storage::EngineConfig::new(&staging))?;
        let snap = engine.snapshot();
        report.tags = snap.tags.len();
        report.customers = snap.live()?.len();
        let at = snap.lsn;
        drop(snap);
        engine.shutdown()?;
        drop(engine);
        if at != report.header.position {
            return Err(Error::Recovery(format!(
                "the restored store starts at lsn {at}, not at the backup's position {}",
                report.header.position
            )));
        }
        Ok(report)
    })();
    let report = match made {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if to.exists() {
        std::fs::remove_dir(to).map_err(|e| Error::io(to, e))?;
    }
    std::fs::rename(&staging, to).map_err(|e| Error::io(to, e))?;
    if let Some(parent) = to.parent().filter(|p| !p.as_os_str().is_empty()) {
        let d = std::fs::File::open(parent).map_err(|e| Error::io(parent, e))?;
        d.sync_all().map_err(|e| Error::io(parent, e))?;
    }
    Ok(report)
}

/// Checks what [`restore_into`] made beyond the backup's own checksums:
/// every blob of every segment the manifest names, and each archive
/// file's index.
pub fn check_restored(dir: &DataDir) -> Result<()> {
    let Some(m) = Manifest::read(dir)? else {
        return Ok(());
    };
    for no in m.segments() {
        crate::storage::segment::Segment::open(dir, no)?.check_blobs()?;
    }
    for a in &m.archives {
        crate::storage::archive::ArchiveFile::open(dir, a.no)?;
    }
    Ok(())
}

/// Writes the files of `backups` (each a name for errors and its bytes:
/// a full backup, then its increments in order) into `dir`, leaving
/// exactly the files the last one holds (with its base's files it names).
/// Every checksum is checked; the first failure is an error naming the
/// backup file and what in it is wrong.
pub fn restore_into<'a>(
    backups: Vec<(PathBuf, Box<dyn Read + 'a>)>,
    dir: &DataDir,
) -> Result<RestoreReport> {
    let mut prev: Option<Header> = None;
    let mut report = RestoreReport {
        header: Header {
            id: 0,
            base_id: 0,
            base_position: 0,
            position: 0,
            checkpoint_lsn: 0,
            next_segment_no: 0,
            audit_newest: 0,
            at_ms: 0,
        },
        backups: backups.len(),
        files: 0,
        bytes: 0,
        log_records: 0,
        tags: 0,
        customers: 0,
    };
    for (label, mut input) in backups {
        let label: &Path = &label;
        let mut head = [0u8; HEADER_LEN];
        read_exactly(&mut input, &mut head, label, "its header")?;
        let h = Header::decode(&head).map_err(|why| Error::corrupt(label, 0, why))?;
        match prev {
            None if h.is_incremental() => {
                return Err(Error::invalid(format!(
                    "{} is an increment (of backup {:016x}, lsn {}): give its full backup \
                     first, then the increments in the order they were taken",
                    label.display(),
                    h.base_id,
                    h.base_position
                )));
            }
            Some(_) if !h.is_incremental() => {
                return Err(Error::invalid(format!(
                    "{} is a full backup: only increments may follow the first file",
                    label.display()
                )));
            }
            Some(p) if h.base_id != p.id => {
                return Err(Error::invalid(format!(
                    "{} is an increment of backup {:016x} (lsn {}), not of the file before it \
                     ({:016x}, lsn {})",
                    label.display(),
                    h.base_id,
                    h.base_position,
                    p.id,
                    p.position
                )));
            }
            _ => {}
        }
        let dec = zstd::stream::read::Decoder::new(input)
            .map_err(|e| Error::corrupt(label, HEADER_LEN as u64, format!("zstd: {e}")))?;
        let mut r = Stream {
            input: dec,
            label,
            crc: crc32fast::Hasher::new(),
            at: 0,
        };
        let names = one_backup(&mut r, &h, dir, &mut report)?;
        // Files of the stage before that this backup does not hold.
        for e in dir
            .fs()
            .list(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
        {
            let store_file = allowed_name(&e.name) || e.name.starts_with("wal-");
            if e.is_file && store_file && !names.contains(&e.name) {
                let path = dir.join(&e.name);
                dir.fs().remove(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        if h.checkpoint_lsn > 0 && !names.contains(MANIFEST_FILE) {
            return Err(Error::corrupt(
                label,
                0,
                "the header names a checkpoint, but the backup holds no MANIFEST",
            ));
        }
        prev = Some(h);
        report.header = h;
    }
    fsync_dir(dir)?;
    Ok(report)
}

/// Reads one backup's entries into `dir`; the names it holds.
fn one_backup(
    r: &mut Stream<'_, '_>,
    h: &Header,
    dir: &DataDir,
    report: &mut RestoreReport,
) -> Result<HashSet<String>> {
    let mut names = HashSet::new();
    let mut entries = 0u64;
    let mut content = 0u64;
    loop {
        let mut kind = [0u8; 1];
        r.raw(&mut kind, "an entry")?;
        if kind[0] == ENTRY_END {
            let expected = r.crc.clone().finalize();
            let mut tail = [0u8; 20];
            r.raw(&mut tail, "the end entry")?;
            let (n, bytes, crc) = (
                le_u64(&tail, 0).unwrap_or(0),
                le_u64(&tail, 8).unwrap_or(0),
                le_u32(&tail, 16).unwrap_or(0),
            );
            if (n, bytes, crc) != (entries, content, expected) {
                return Err(r.bad(format!(
                    "the end entry says {n} entries, {bytes} bytes, checksum {crc:08x}; \
                     read {entries}, {content}, {expected:08x}"
                )));
            }
            // zstd checks its frame's checksum at the frame's end; nothing
            // may follow.
            let mut more = [0u8; 1];
            match r.input.read(&mut more) {
                Ok(0) => {}
                Ok(_) => return Err(r.bad("bytes after the end entry".into())),
                Err(e) => return Err(r.bad(format!("after the end entry: {e}"))),
            }
            return Ok(names);
        }
        r.crc.update(&kind);
        match kind[0] {
            ENTRY_FILE => {
                let name = r.name()?;
                let len = r.u64()?;
                let path = dir.join(&name);
                let file = dir
                    .fs()
                    .create(&path, Create::Truncate)
                    .map_err(|e| Error::io(&path, e))?;
                let crc = r.copy(len, &*file, &path)?;
                if r.u32()? != crc {
                    return Err(r.bad(format!("file {name}: checksum mismatch")));
                }
                file.sync_all().map_err(|e| Error::io(&path, e))?;
                report.files += 1;
                report.bytes += len;
                content += len;
                names.insert(name);
            }
            ENTRY_IN_BASE => {
                let name = r.name()?;
                let len = r.u64()?;
                let tail = r.u32()?;
                let path = dir.join(&name);
                let data = match dir.fs().read(&path) {
                    Ok(d) => d,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(Error::invalid(format!(
                            "{} needs {name} from its base, and the backups before it do not hold it",
                            r.label.display()
                        )));
                    }
                    Err(e) => return Err(Error::io(&path, e)),
                };
                if data.len() as u64 != len || tail_crc(&data) != tail {
                    return Err(Error::invalid(format!(
                        "{} needs {name} from its base, and the one the backups before it hold \
                         differs (they are not of the same store?)",
                        r.label.display()
                    )));
                }
                names.insert(name);
            }
            ENTRY_LOG => {
                let first = r.u64()?;
                if first != h.checkpoint_lsn + 1 {
                    return Err(r.bad(format!(
                        "its log starts at lsn {first}, not after its checkpoint ({})",
                        h.checkpoint_lsn
                    )));
                }
                let name = wal::file_name(first);
                let path = dir.join(&name);
                let (n, bytes) = r.log(first, h.position, dir, &path)?;
                report.log_records += n;
                report.files += 1;
                report.bytes += bytes;
                content += bytes - wal::WAL_HEADER_LEN as u64;
                names.insert(name);
            }
            other => return Err(r.bad(format!("unknown entry kind {other}"))),
        }
        entries += 1;
    }
}

/// The decompressed entries of one backup, with the checksum of what was
/// read and where.
struct Stream<'a, 'b> {
    input: zstd::stream::read::Decoder<'static, io::BufReader<Box<dyn Read + 'b>>>,
    label: &'a Path,
    crc: crc32fast::Hasher,
    at: u64,
}

fn read_exactly(r: &mut dyn Read, buf: &mut [u8], label: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::corrupt(
            label,
            0,
            format!("the file ends inside {what}: cut short (a backup that did not finish?)"),
        ),
        _ => Error::io(label, e),
    })
}

impl Stream<'_, '_> {
    fn bad(&self, why: String) -> Error {
        Error::corrupt(
            self.label,
            self.at,
            format!("{why} (the offset counts the decompressed entries)"),
        )
    }

    /// Reads without hashing (the end entry).
    fn raw(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.at += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.bad(format!(
                "the backup ends inside {what}: cut short (a backup that did not finish?)"
            ))),
            Err(e) => Err(self.bad(format!("damaged or cut short ({e})"))),
        }
    }

    fn read(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.raw(buf, what)?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(&mut b, "an entry")?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(&mut b, "an entry")?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self) -> Result<String> {
        let len = self.u32()? as usize;
        if len > MAX_NAME {
            return Err(self.bad(format!("a file name of {len} bytes")));
        }
        let mut b = vec![0u8; len];
        self.read(&mut b, "a file name")?;
        match String::from_utf8(b) {
            Ok(name) if allowed_name(&name) => Ok(name),
            Ok(name) => Err(self.bad(format!("the name {name:?} is not one of a store's files"))),
            Err(_) => Err(self.bad("a file name that is not UTF-8".into())),
        }
    }

    /// Copies `len` bytes into `file`; their CRC-32.
    fn copy(&mut self, len: u64, file: &dyn WriteFile, path: &Path) -> Result<u32> {
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK))];
        let mut at = 0u64;
        while at < len {
            let n = usize::try_from(len - at).unwrap_or(CHUNK).min(CHUNK);
            self.read(&mut buf[..n], "a file's content")?;
            crc.update(&buf[..n]);
            file.write_at(&buf[..n], at)
                .map_err(|e| Error::io(path, e))?;
            at += n as u64;
        }
        file.set_len(len).map_err(|e| Error::io(path, e))?;
        Ok(crc.finalize())
    }

    /// The log entry's records, `first ..= upto`, each checked, into a new
    /// log file at `path`; (records, bytes written).
    fn log(&mut self, first: u64, upto: u64, dir: &DataDir, path: &Path) -> Result<(u64, u64)> {
        let file = dir
            .fs()
            .create(path, Create::Truncate)
            .map_err(|e| Error::io(path, e))?;
        let mut head = Vec::with_capacity(wal::WAL_HEADER_LEN);
        head.extend_from_slice(WAL_MAGIC);
        head.extend_from_slice(&WAL_VERSION.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&first.to_le_bytes());
        file.write_at(&head, 0).map_err(|e| Error::io(path, e))?;
        let mut at = head.len() as u64;
        let mut next = first;
        let mut body = Vec::new();
        loop {
            let len = self.u32()? as usize;
            if len == 0 {
                break;
            }
            if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&len) {
                return Err(self.bad(format!("a log record of invalid length {len}")));
            }
            let crc = self.u32()?;
            // Read as it arrives: a length the file does not back with
            // bytes allocates nothing.
            body.clear();
            while body.len() < len {
                let n = (len - body.len()).min(CHUNK);
                let at = body.len();
                body.resize(at + n, 0);
                self.read(&mut body[at..], "a log record")?;
            }
            if crc32fast::hash(&body) != crc {
                return Err(self.bad(format!("log record lsn {next}: checksum mismatch")));
            }
            let lsn = le_u64(&body, 0).unwrap_or(0);
            if lsn != next {
                return Err(self.bad(format!("log gap: expected lsn {next}, found {lsn}")));
            }
            let mut frame = Vec::with_capacity(FRAME_PREFIX + len);
            frame.extend_from_slice(&(len as u32).to_le_bytes());
            frame.extend_from_slice(&crc.to_le_bytes());
            frame.extend_from_slice(&body);
            file.write_at(&frame, at).map_err(|e| Error::io(path, e))?;
            at += frame.len() as u64;
            next += 1;
        }
        if next != upto + 1 {
            return Err(self.bad(format!(
                "its log ends at lsn {}, not at its position {upto}",
                next - 1
            )));
        }
        file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok((next - first, at))
    }
}
