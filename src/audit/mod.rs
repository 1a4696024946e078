//! The audit trail: who (the token's name) read or changed customers, with
//! which call, when, how many customers and about what (a customer's key,
//! a query, a tag), in append-only, checksummed files inside the data
//! directory (`audit-*.log`), kept for a retention and read back with
//! filters. PIPL asks a brand to be able to say who accessed a person's
//! data; this is what lets it.
//!
//! Owns the audit files' bytes, their appending (by the calls themselves,
//! under a lock) and syncing (by one thread), rotation, retention and
//! reading; every file operation goes through the data
//! directory's file system (`storage::fs`). Knows nothing of gRPC (the
//! server says what to record) and nothing of the store's state.
//!
//! Format (see `storage-format.md`): a 24-byte header (`TAGSAUDT`, version,
//! reserved, the sequence number of its first record), then records framed
//! as the log's: `len u32 | crc32 u32 | seq u64 | kind u8 | payload`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::error::{Error, Result};
use crate::storage::codec::{Dec, Enc, le_u32, le_u64};
use crate::storage::datadir::{DataDir, list_numbered, numbered_name};
use crate::storage::fs::WriteFile;
use crate::storage::wal::{self, FRAME_PREFIX};

pub const AUDIT_MAGIC: &[u8; 8] = b"TAGSAUDT";
pub const AUDIT_VERSION: u32 = 1;
pub const AUDIT_HEADER_LEN: usize = 24;
const KIND_RECORD: u8 = 1;
/// Longest `subject` kept, in bytes (longer ones are cut at a character
/// boundary and marked with `…`).
pub const MAX_SUBJECT_BYTES: usize = 1024;
/// The writer syncs what it wrote at least this often.
const SYNC_EVERY: Duration = Duration::from_millis(100);
/// A trail that failed tries a new file this often.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Records one read returns at most.
pub const MAX_READ: usize = 10_000;

pub fn file_name(first_seq: u64) -> String {
    numbered_name("audit-", first_seq, ".log")
}

/// One audited call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Its place in the trail, from 1 (set by the writer).
    pub seq: u64,
    /// When the call was answered, Unix ms.
    pub at_ms: i64,
    /// The token's name; empty on a server without tokens (loopback).
    pub who: String,
    /// The call (`Profile`, `Export`, `Update`, …).
    pub method: String,
    /// How many customers it read or changed (as the call counts them).
    pub customers: u64,
    /// About what: the customer's key, the query, the tags; at most
    /// [`MAX_SUBJECT_BYTES`].
    pub subject: String,
    /// `OK`, or the status it failed with.
    pub outcome: String,
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut e = Enc::new();
        e.i64(self.at_ms)
            .str(&self.who)
            .str(&self.method)
            .u64(self.customers)
            .str(&self.subject)
            .str(&self.outcome);
        wal::frame(out, self.seq, KIND_RECORD, &e.buf);
    }

    fn decode(seq: u64, payload: &[u8]) -> std::result::Result<Record, String> {
        let mut d = Dec::new(payload);
        let e = |x: crate::storage::codec::DecodeError| format!("at {}: {}", x.offset, x.reason);
        let r = Record {
            seq,
            at_ms: d.i64().map_err(e)?,
            who: d.str().map_err(e)?.to_string(),
            method: d.str().map_err(e)?.to_string(),
            customers: d.u64().map_err(e)?,
            subject: d.str().map_err(e)?.to_string(),
            outcome: d.str().map_err(e)?.to_string(),
        };
        d.finish().map_err(e)?;
        Ok(r)
    }
}

/// `text` cut to at most `max` bytes at a character boundary (with `…`).
pub fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// How long the trail is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditConfig {
    /// Whole files go once their newest record is older than this many
    /// days; 0 keeps them for ever.
    pub retention_days: u32,
    /// A file is closed and a new one begun past this size.
    pub file_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 400,
            file_bytes: 16 << 20,
        }
    }
}

/// The audit trail of one data directory: a record is appended by the
/// caller itself, under a lock (a write to the file, not a sync: a read of
/// customers is answered once its record is in the file); a thread syncs
/// at least every 100 ms and drops the files past the retention; another
/// reads the older files once after the start, for their records' times.
pub struct Audit {
    writer: Arc<Mutex<Writer>>,
    dir: DataDir,
    stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set to stop the scan of the older files (at shutdown).
    stop_scan: Arc<AtomicBool>,
    scanner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The file being appended to, and the ones before it.
struct Writer {
    dir: DataDir,
    config: AuditConfig,
    clock: SharedClock,
    file: Option<(PathBuf, Arc<dyn WriteFile>, u64)>,
    /// First sequence numbers of the files, oldest first, with the time of
    /// their newest record: `None` for an older file not yet read since
    /// the start (never dropped, never skipped by a read's time), `i64::MAX`
    /// for a damaged one (kept).
    files: Vec<(u64, Option<i64>)>,
    next_seq: u64,
    dirty: bool,
    /// Why the trail cannot be written, and since when.
    failed: Option<(String, Instant)>,
    buf: Vec<u8>,
}

impl Audit {
    /// Opens the trail of `dir`: its newest file is checked (a torn last
    /// record is cut) and numbers go on from it, a new file is begun, and
    /// the syncing thread started. The older files are not read here (a
    /// year's trail is gigabytes, and the server waits for this): a thread
    /// reads each once, for the time of its newest record (the retention
    /// needs it), and logs any damage it finds.
    pub fn open(dir: DataDir, config: AuditConfig, clock: SharedClock) -> Result<Arc<Audit>> {
        let names = list(&dir)?;
        let older = names.len().saturating_sub(1);
        let mut files: Vec<(u64, Option<i64>)> =
            names[..older].iter().map(|&first| (first, None)).collect();
        let mut next_seq = 1;
        if let Some(&first) = names.last() {
            next_seq = first.max(1);
            match scan(&dir, first, true) {
                Ok(scan) => {
                    files.push((first, Some(scan.newest_ms)));
                    next_seq = next_seq.max(scan.last_seq + 1);
                }
                Err(e) => {
                    // Damage does not stop the server: the file stays (a
                    // read through it names the damage) and the trail goes
                    // on past every number it could hold (a record takes
                    // at least 17 bytes), leaving a gap in the numbers.
                    tracing::error!(error = %e, "the audit trail is damaged; it goes on in a new file");
                    let path = dir.join(file_name(first));
                    let len = dir.fs().read(&path).map_or(0, |d| d.len() as u64);
                    files.push((first, Some(i64::MAX)));
                    next_seq = next_seq.max(first + len / 17 + 1);
                }
            }
        }
        let mut w = Writer {
            dir: dir.clone(),
            config,
            clock,
            file: None,
            files,
            next_seq,
            dirty: false,
            failed: None,
            buf: Vec::new(),
        };
        w.begin_file()?;
        let writer = Arc::new(Mutex::new(w));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let w = writer.clone();
        let syncer = std::thread::Builder::new()
            .name("tagstore-audit".into())
            .spawn(move || sync_loop(w, stopped))
            .map_err(|e| Error::io(dir.path(), e))?;
        let stop_scan = Arc::new(AtomicBool::new(false));
        let scanner = if older > 0 {
            let (w, stop) = (writer.clone(), stop_scan.clone());
            let spawned = std::thread::Builder::new()
                .name("tagstore-audit-scan".into())
                .spawn(move || scan_older(w, stop));
            match spawned {
                Ok(h) => Some(h),
                Err(e) => {
                    // The trail works without it: its older files are kept
                    // (never dropped by the retention) until the next start.
                    tracing::error!(error = %e, "could not start reading the older audit files; they are kept");
                    None
                }
            }
        } else {
            None
        };
        Ok(Arc::new(Audit {
            writer,
            dir,
            stop: Mutex::new(Some(stop)),
            syncer: Mutex::new(Some(syncer)),
            stop_scan,
            scanner: Mutex::new(scanner),
        }))
    }

    /// The trail's size on disk and whether it can be written now (for
    /// the metrics; lists the directory).
    pub fn stats(&self) -> Result<AuditStats> {
        let entries = self
            .dir
            .fs()
            .list(&self.dir)
            .map_err(|e| Error::io(self.dir.path(), e))?;
        let mut stats = AuditStats {
            failing: self.writer.lock().failed.is_some(),
            ..Default::default()
        };
        for e in entries {
            if e.is_file
                && crate::storage::datadir::parse_numbered(&e.name, "audit-", ".log").is_some()
            {
                stats.files += 1;
                stats.bytes += e.len;
            }
        }
        Ok(stats)
    }

    /// Whether every older file has been read since the start (their times
    /// known to the retention).
    pub fn scanned(&self) -> bool {
        self.writer.lock().files.iter().all(|f| f.1.is_some())
    }

    /// Appends a record to the trail's file (synced within 100 ms). An
    /// error says why it could not be: a read of customers must then not
    /// be answered. A trail that failed tries a new file at most once a
    /// second.
    pub fn record(&self, r: Record) -> Result<()> {
        let mut w = self.writer.lock();
        if let Some((why, since)) = &w.failed
            && since.elapsed() < RETRY_EVERY
        {
            return Err(Error::Internal(format!(
                "the audit trail cannot be written: {why}"
            )));
        }
        if w.write(std::iter::once(&r)) {
            Ok(())
        } else {
            let why = w
                .failed
                .as_ref()
                .map_or_else(|| "unknown cause".to_string(), |(m, _)| m.clone());
            Err(Error::Internal(format!(
                "the audit trail could not write the record: {why}"
            )))
        }
    }

    /// Syncs what was written and stops the syncing thread and the scan
    /// of the older files (at shutdown; a scan stops before its next file).
    pub fn close(&self) {
        self.stop_scan.store(true, Ordering::Relaxed);
        if let Some(h) = self.scanner.lock().take() {
            let _ = h.join();
        }
        self.stop.lock().take();
        if let Some(h) = self.syncer.lock().take() {
            let _ = h.join();
        }
        self.writer.lock().sync();
    }

    /// Records matching `filter` with a sequence number above `after`,
    /// oldest first, at most `limit`; with whether more match. Reads the
    /// files (blocking), skipping those that hold nothing after `after` or
    /// since `filter.since_ms`, and stops with [`Error::Abandoned`] before
    /// the next file once `gone` says no one waits for the answer (a trail
    /// kept for a year is thousands of files). Damage anywhere but a torn
    /// last record of the newest file is an error naming the file and the
    /// offset.
    pub fn read(
        &self,
        filter: &Filter,
        after: u64,
        limit: usize,
        gone: &dyn Fn() -> bool,
    ) -> Result<(Vec<Record>, bool)> {
        let names = list(&self.dir)?;
        // When each file's newest record was made, as the writer knows it
        // (a damaged file: never skipped).
        let newest: std::collections::HashMap<u64, Option<i64>> =
            self.writer.lock().files.iter().copied().collect();
        let mut out = Vec::new();
        for (n, &first) in names.iter().enumerate() {
            if gone() {
                return Err(Error::Abandoned);
            }
            let is_last = n + 1 == names.len();
            // A file whose successor starts at or before `after` holds
            // nothing after it.
            if names.get(n + 1).is_some_and(|&next| next <= after + 1) {
                continue;
            }
            // Nor one whose newest record is older than `since_ms` (the
            // file being written is always read).
            if !is_last
                && newest
                    .get(&first)
                    .is_some_and(|&t| t.is_some_and(|t| t < filter.since_ms))
            {
                continue;
            }
            let path = self.dir.join(file_name(first));
            let data = match self.dir.fs().read(&path) {
                Ok(d) => d,
                // Dropped by the retention meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            let mut more = false;
            parse(&path, &data, is_last, |r| {
                if r.seq > after && filter.matches(&r) {
                    if out.len() == limit {
                        more = true;
                        return false;
                    }
                    out.push(r);
                }
                true
            })?;
            if more {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.close();
    }
}

/// The trail on disk, for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    pub files: u64,
    pub bytes: u64,
    /// The trail cannot be written now: calls that read customers are
    /// refused until it can.
    pub failing: bool,
}

/// Which records a read wants; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub who: String,
    pub method: String,
    /// Records whose subject contains this text (a customer's key).
    pub subject: String,
    pub since_ms: i64,
    /// 0: no end.
    pub until_ms: i64,
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        (self.who.is_empty() || r.who == self.who)
            && (self.method.is_empty() || r.method == self.method)
            && (self.subject.is_empty() || r.subject.contains(&self.subject))
            && r.at_ms >= self.since_ms
            && (self.until_ms == 0 || r.at_ms < self.until_ms)
    }
}

/// Reads each older file of the trail once (outside the lock: records go
/// on being appended), for the time of its newest record; damage is
/// logged and the file kept. Then drops the files past the retention.
/// Stops before its next file once `stop` is set.
fn scan_older(writer: Arc<Mutex<Writer>>, stop: Arc<AtomicBool>) {
    let (dir, unread): (DataDir, Vec<u64>) = {
        let w = writer.lock();
        let unread = w.files.iter().filter(|f| f.1.is_none()).map(|f| f.0);
        (w.dir.clone(), unread.collect())
    };
    for first in unread {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let newest = match scan(&dir, first, false) {
            Ok(s) => s.newest_ms,
            Err(e) => {
                tracing::error!(error = %e, "an older file of the audit trail is damaged; it is kept, and a read through it names the damage");
                i64::MAX
            }
        };
        let mut w = writer.lock();
        if let Some(f) = w.files.iter_mut().find(|f| f.0 == first) {
            f.1 = Some(newest);
        }
    }
    writer.lock().expire();
}

/// Syncs the trail at least every 100 ms (the sync itself outside the
/// lock, so that records go on being appended), and drops the files past
/// the retention hourly, until told to stop.
fn sync_loop(writer: Arc<Mutex<Writer>>, stopped: Receiver<()>) {
    let mut last_expiry = Instant::now();
    loop {
        match stopped.recv_timeout(SYNC_EVERY) {
            Err(RecvTimeoutError::Timeout) => {}
            // Told to stop (the sender dropped): the caller syncs last.
            _ => return,
        }
        let file = {
            let mut w = writer.lock();
            if last_expiry.elapsed() >= Duration::from_secs(3600) {
                w.expire();
                last_expiry = Instant::now();
            }
            if !w.dirty {
                continue;
            }
            w.dirty = false;
            w.file.as_ref().map(|(p, f, _)| (p.clone(), f.clone()))
        };
        if let Some((path, file)) = file
            && let Err(e) = file.sync_data()
        {
            let e = Error::io(path, e);
            let mut w = writer.lock();
            w.file = None;
            w.fail(&e);
        }
    }
}

impl Writer {
    fn fail(&mut self, e: &Error) {
        tracing::error!(error = %e, "the audit trail cannot be written: calls that read customers are refused");
        self.failed = Some((e.to_string(), Instant::now()));
    }

    /// Appends records, numbered in order, in one write; false if they
    /// could not be (none was).
    fn write<'a>(&mut self, records: impl Iterator<Item = &'a Record>) -> bool {
        if self.file.is_none() {
            // An earlier failure: try a new file.
            if let Err(e) = self.begin_file() {
                self.fail(&e);
                return false;
            }
            tracing::info!("the audit trail is written again");
            self.failed = None;
        }
        self.buf.clear();
        let mut seq = self.next_seq;
        let mut newest = 0;
        for r in records {
            let numbered = Record { seq, ..r.clone() };
            numbered.encode(&mut self.buf);
            newest = newest.max(r.at_ms);
            seq += 1;
        }
        let Some((path, file, bytes)) = &mut self.file else {
            return false;
        };
        if let Err(e) = file.write_at(&self.buf, *bytes) {
            let e = Error::io(path.clone(), e);
            // Records written in part would read as damage: cut them.
            let _ = file.set_len(*bytes);
            self.file = None;
            self.fail(&e);
            return false;
        }
        *bytes += self.buf.len() as u64;
        self.next_seq = seq;
        self.dirty = true;
        if let Some(last) = self.files.last_mut() {
            last.1 = Some(last.1.unwrap_or(0).max(newest));
        }
        if *bytes >= self.config.file_bytes {
            self.sync();
            if let Err(e) = self.begin_file() {
                self.file = None;
                self.fail(&e);
            }
            self.expire();
        }
        true
    }

    fn sync(&mut self) {
        if let Some((path, file, _)) = &self.file
            && let Err(e) = file.sync_data()
        {
            let e = Error::io(path.clone(), e);
            self.file = None;
            self.fail(&e);
        }
        self.dirty = false;
    }

    fn begin_file(&mut self) -> Result<()> {
        let first = self.next_seq;
        let (path, file) = wal::create_framed(
            &self.dir,
            &file_name(first),
            AUDIT_MAGIC,
            AUDIT_VERSION,
            first,
        )?;
        if self.files.last().is_some_and(|f| f.0 == first) {
            // An empty file of the same number (a file begun at the last
            // start, with no record) was just made again.
            self.files.pop();
        }
        self.files.push((first, Some(0)));
        self.file = Some((path, file, AUDIT_HEADER_LEN as u64));
        Ok(())
    }

    /// Deletes the oldest files whose newest record is past the retention
    /// (never the current one).
    fn expire(&mut self) {
        if self.config.retention_days == 0 {
            return;
        }
        let before = self.clock.now_ms() - i64::from(self.config.retention_days) * 86_400_000;
        // An older file not yet read stops it: files go oldest first.
        while self.files.len() > 1 && self.files[0].1.is_some_and(|t| t < before) {
            let (first, _) = self.files.remove(0);
            let path = self.dir.join(file_name(first));
            if let Err(e) = self.dir.fs().remove(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an audit file past its retention");
            }
        }
    }
}

/// The audit files of `dir`, by first sequence number.
pub fn list(dir: &DataDir) -> Result<Vec<u64>> {
    list_numbered(dir, "audit-", ".log")
}

struct Scanned {
    last_seq: u64,
    newest_ms: i64,
}

/// Checks one file at start; a torn last record of the newest is cut.
fn scan(dir: &DataDir, first: u64, is_last: bool) -> Result<Scanned> {
    let path = dir.join(file_name(first));
    let data = dir.fs().read(&path).map_err(|e| Error::io(&path, e))?;
    let mut s = Scanned {
        last_seq: first.saturating_sub(1),
        newest_ms: 0,
    };
    let end = parse(&path, &data, is_last, |r| {
        s.last_seq = r.seq;
        s.newest_ms = s.newest_ms.max(r.at_ms);
        true
    })?;
    if end < data.len() {
        let file = dir
            .fs()
            .open_write(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(end as u64)
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        tracing::warn!(path = %path.display(), offset = end, "cut a torn record off the audit trail");
    }
    Ok(s)
}

/// Reads the records of one file's bytes in order through `f` (false:
/// stop); returns where the valid records end. In the newest file a record
/// cut short or failing its checksum at the end is torn (the end); any
/// other damage is an error naming the file and offset.
fn parse(
    path: &std::path::Path,
    data: &[u8],
    is_last: bool,
    mut f: impl FnMut(Record) -> bool,
) -> Result<usize> {
    let corrupt = |at: usize, why: String| Error::corrupt(path, at as u64, why);
    if data.len() < AUDIT_HEADER_LEN || &data[..8] != AUDIT_MAGIC {
        return Err(corrupt(0, "not a tagstore audit file".into()));
    }
    let version = le_u32(data, 8).unwrap_or(0);
    if version != AUDIT_VERSION {
        return Err(corrupt(8, format!("unsupported audit version {version}")));
    }
    let first = le_u64(data, 16).unwrap_or(0);
    let mut expect = first;
    let mut pos = AUDIT_HEADER_LEN;
    while pos < data.len() {
        let len = le_u32(data, pos).map(|l| l as usize);
        let torn = match len {
            None => true,
            Some(l) if !(9..=wal::MAX_RECORD_LEN).contains(&l) => {
                if is_last && data[pos..].iter().all(|&b| b == 0) {
                    true
                } else {
                    return Err(corrupt(pos, format!("invalid record length {l}")));
                }
            }
            Some(l) => pos + FRAME_PREFIX + l > data.len(),
        };
        let body = (!torn).then(|| {
            let l = len.unwrap_or(0);
            &data[pos + FRAME_PREFIX..pos + FRAME_PREFIX + l]
        });
        let ok = body.is_some_and(|b| crc32fast::hash(b) == le_u32(data, pos + 4).unwrap_or(0));
        if !ok {
            let end = pos + FRAME_PREFIX + len.unwrap_or(0);
            if is_last && (torn || end >= data.len()) {
                return Ok(pos);
            }
            return Err(corrupt(pos, "record fails its checksum".into()));
        }
        let body = body.unwrap_or_default();
        let seq = le_u64(body, 0).unwrap_or(0);
        if seq != expect {
            return Err(corrupt(pos, format!("record {seq} where {expect} was due")));
        }
        if body[8] != KIND_RECORD {
            return Err(corrupt(pos, format!("unknown record kind {}", body[8])));
        }
        let r = Record::decode(seq, &body[9..]).map_err(|why| corrupt(pos, why))?;
        pos += FRAME_PREFIX + body.len();
        expect += 1;
        if !f(r) {
            break;
        }
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::storage::fs::{Create, FileSystem, MemFs};

    fn open(fs: &MemFs, clock: &Arc<ManualClock>, days: u32) -> Arc<Audit> {
        let dir = DataDir::new(Arc::new(fs.clone()), "/mem/audit");
        fs.create_dir_all(std::path::Path::new("/mem/audit"))
            .unwrap();
        Audit::open(
            dir,
            AuditConfig {
                retention_days: days,
                file_bytes: 4096,
            },
            clock.clone(),
        )
        .unwrap()
    }

    fn rec(who: &str, at_ms: i64, subject: &str) -> Record {
        Record {
            at_ms,
            who: who.into(),
            method: "Profile".into(),
            customers: 1,
            subject: subject.into(),
            outcome: "OK".into(),
            ..Default::default()
        }
    }

    #[test]
    fn records_are_numbered_kept_across_restarts_and_crashes_and_read_with_filters() {
        let fs = MemFs::new();
        let clock = ManualClock::at(1_000);
        let a = open(&fs, &clock, 0);
        a.record(rec("ops", 1, "phone:1")).unwrap();
        a.record(rec("crm", 2, "phone:2")).unwrap();
        a.close();
        let a = open(&fs, &clock, 0);
        a.record(rec("ops", 3, "phone:2")).unwrap();
        a.close();
        let (all, more) = a.read(&Filter::default(), 0, 10, &|| false).unwrap();
        assert!(!more);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        let f = Filter {
            subject: "phone:2".into(),
            ..Default::default()
        };
        let (two, _) = a.read(&f, 0, 10, &|| false).unwrap();
        assert_eq!(
            two.iter().map(|r| r.who.as_str()).collect::<Vec<_>>(),
            vec!["crm", "ops"]
        );
        let (page, more) = a.read(&Filter::default(), 1, 1, &|| false).unwrap();
        assert_eq!((page[0].seq, more), (2, true));
        // A crash keeps what was synced (closing synced everything).
        let image = fs.crash_image();
        let b = open(&image, &clock, 0);
        b.record(rec("x", 4, "")).unwrap();
        b.close();
        let (all, _) = b.read(&Filter::default(), 0, 10, &|| false).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[3].seq, 4);
    }

    #[test]
    fn a_flipped_byte_is_an_error_naming_the_file_and_a_subject_is_cut() {
        let fs = MemFs::new();
        let clock = ManualClock::at(1_000);
        let a = open(&fs, &clock, 0);
        a.record(rec("ops", 1, &"客".repeat(2000))).unwrap();
        a.record(rec("ops", 2, "k")).unwrap();
        a.close();
        let path = std::path::PathBuf::from("/mem/audit").join(file_name(1));
        let mut data = fs.read(&path).unwrap();
        data[AUDIT_HEADER_LEN + 20] ^= 0xff;
        let f = fs.create(&path, Create::Truncate).unwrap();
        f.write_at(&data, 0).unwrap();
        let err = a
            .read(&Filter::default(), 0, 10, &|| false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("audit-0000000000000001.log") && err.contains("checksum"),
            "{err}"
        );
        assert!(cut(&"客".repeat(2000), MAX_SUBJECT_BYTES).len() <= MAX_SUBJECT_BYTES);
        assert!(cut(&"客".repeat(2000), MAX_SUBJECT_BYTES).ends_with('…'));
    }

    #[tokio::test]
    async fn a_trail_that_cannot_write_refuses_reads_until_it_can_again() {
        use crate::storage::fs::Op;
        let fs = MemFs::new();
        let clock = ManualClock::at(1_000);
        let a = open(&fs, &clock, 0);
        a.record(rec("ops", 1, "k1")).unwrap();
        fs.fail(Op::Write, "audit-", 0, 1, libc::EIO);
        let err = a.record(rec("ops", 2, "k2")).unwrap_err();
        assert!(err.to_string().contains("could not write"), "{err}");
        assert!(a.stats().unwrap().failing, "the metrics say it fails");
        // Until a new file is made, nothing is taken.
        assert!(a.record(rec("ops", 3, "k3")).is_err());
        let mut again = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if a.record(rec("ops", 4, "k4")).is_ok() {
                again = true;
                break;
            }
        }
        assert!(again, "the trail never took records again");
        let stats = a.stats().unwrap();
        assert!(
            !stats.failing && stats.files >= 2 && stats.bytes > 0,
            "{stats:?}"
        );
        a.close();
        let (all, _) = a.read(&Filter::default(), 0, 10, &|| false).unwrap();
        let subjects: Vec<&str> = all.iter().map(|r| r.subject.as_str()).collect();
        assert_eq!(subjects, vec!["k1", "k4"]);
    }

    /// Twelve records of 1 KB at 10 to 21 ms: three files and more.
    fn records_over_three_files(a: &Audit) {
        let big = "x".repeat(1000);
        for i in 0..12 {
            a.record(rec("ops", 10 + i, &big)).unwrap();
        }
    }

    /// Damages the first record of the trail's first file; its path.
    fn flip_a_byte_of_the_first_file(fs: &MemFs) -> std::path::PathBuf {
        let path = std::path::PathBuf::from("/mem/audit").join(file_name(1));
        let mut data = fs.read(&path).unwrap();
        data[AUDIT_HEADER_LEN + 20] ^= 0xff;
        let f = fs.create(&path, Create::Truncate).unwrap();
        f.write_at(&data, 0).unwrap();
        path
    }

    /// A read since a time does not open the files whose records are all
    /// older (shown by one that is damaged: a read through it says so),
    /// and a caller gone stops a read before it opens a file.
    #[test]
    fn a_read_since_a_time_skips_older_files_and_a_caller_gone_stops_it() {
        let fs = MemFs::new();
        let clock = ManualClock::at(0);
        let a = open(&fs, &clock, 0);
        records_over_three_files(&a);
        a.record(rec("ops", 5_000, "new")).unwrap();
        a.close();
        assert!(list(&a.dir).unwrap().len() >= 3);
        flip_a_byte_of_the_first_file(&fs);
        let err = a.read(&Filter::default(), 0, 10, &|| false).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        let since = Filter {
            since_ms: 5_000,
            ..Default::default()
        };
        let (got, more) = a.read(&since, 0, 10, &|| false).unwrap();
        let subjects: Vec<&str> = got.iter().map(|r| r.subject.as_str()).collect();
        assert_eq!((subjects, more), (vec!["new"], false));
        let gone = a.read(&since, 0, 10, &|| true).unwrap_err();
        assert!(matches!(gone, Error::Abandoned), "{gone}");
    }

    /// Opening a trail reads its newest file only (a year's trail is
    /// gigabytes): damage in an older file, found later in the background,
    /// leaves no gap in the numbers, and the files' times are learnt for
    /// the retention.
    #[test]
    fn opening_a_trail_reads_only_its_newest_file() {
        let fs = MemFs::new();
        let clock = ManualClock::at(0);
        let a = open(&fs, &clock, 0);
        records_over_three_files(&a);
        a.close();
        assert!(list(&a.dir).unwrap().len() >= 3);
        drop(a);
        let path = flip_a_byte_of_the_first_file(&fs);
        let b = open(&fs, &clock, 0);
        b.record(rec("ops", 30, "after")).unwrap();
        // Read after the start, the damaged file is kept (the retention
        // cannot date it).
        let began = Instant::now();
        while !b.scanned() {
            assert!(began.elapsed() < Duration::from_secs(10), "never scanned");
            std::thread::sleep(Duration::from_millis(5));
        }
        b.close();
        let (got, _) = b.read(&Filter::default(), 12, 10, &|| false).unwrap();
        let got: Vec<(u64, &str)> = got.iter().map(|r| (r.seq, r.subject.as_str())).collect();
        assert_eq!(
            got,
            vec![(13, "after")],
            "numbers go on from the newest file"
        );
        assert!(
            b.dir.fs().read(&path).is_ok(),
            "the damaged file was dropped"
        );
    }

    #[test]
    fn files_past_the_retention_go_whole() {
        let fs = MemFs::new();
        let clock = ManualClock::at(0);
        let a = open(&fs, &clock, 1);
        let day = 86_400_000;
        // Enough to fill more than one file.
        let big = "x".repeat(1000);
        for i in 0..20 {
            a.record(rec("ops", i, &big)).unwrap();
        }
        a.close();
        assert!(list(&a.dir).unwrap().len() >= 2);
        clock.set(3 * day);
        let b = open(&fs, &clock, 1);
        // The older files' times are read after the start.
        let began = Instant::now();
        while !b.scanned() {
            assert!(began.elapsed() < Duration::from_secs(10), "never scanned");
            std::thread::sleep(Duration::from_millis(5));
        }
        b.record(rec("ops", 3 * day, "new")).unwrap();
        // Fill a file so that the writer rotates and expires.
        for _ in 0..20 {
            b.record(rec("ops", 3 * day, &big)).unwrap();
        }
        b.close();
        let (left, _) = b.read(&Filter::default(), 0, MAX_READ, &|| false).unwrap();
        assert!(left.iter().all(|r| r.at_ms >= 3 * day), "old records kept");
    }
}
