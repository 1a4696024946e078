//! The write-ahead log: framing, appending, syncing, listing and replaying
//! log files. It owns the bytes of `wal-*.log` files and nothing else; what a
//! record means is `record.rs`'s business, when to sync is the writer's.
//!
//! Format (see `storage-format.md`): a 24-byte header, then records framed as
//! `len u32 | crc32 u32 | lsn u64 | kind u8 | payload`, where `len` counts the
//! bytes from `lsn` to the end of the payload and the crc covers those bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::storage::codec::{le_u32, le_u64};
use crate::storage::datadir::{DataDir, fsync_dir, numbered_name, parse_numbered};
use crate::storage::fs::{Create, WriteFile};

pub const WAL_MAGIC: &[u8; 8] = b"TAGSWAL\0";
pub const WAL_VERSION: u32 = 1;
pub const WAL_HEADER_LEN: usize = 24;
/// Bytes before a record's `lsn` field: `len` and `crc`.
pub const FRAME_PREFIX: usize = 8;
/// Smallest valid `len`: an lsn and a kind byte.
pub const MIN_RECORD_LEN: usize = 9;
/// Largest valid `len`.
pub const MAX_RECORD_LEN: usize = 1 << 30;

pub fn file_name(first_lsn: u64) -> String {
    numbered_name("wal-", first_lsn, ".log")
}

fn parse_file_name(name: &str) -> Option<u64> {
    parse_numbered(name, "wal-", ".log")
}

/// Creates (or empties) a file of framed records, as the log, the change
/// feed and the audit trail are: its 24-byte header (`magic`, `version`,
/// 4 reserved bytes, `first`, the number of its first record) written and
/// synced, and the directory synced.
pub fn create_framed(
    dir: &DataDir,
    name: &str,
    magic: &[u8; 8],
    version: u32,
    first: u64,
) -> Result<(PathBuf, Arc<dyn WriteFile>)> {
    let path = dir.join(name);
    let file = dir
        .fs()
        .create(&path, Create::Truncate)
        .map_err(|e| Error::io(&path, e))?;
    let mut header = Vec::with_capacity(WAL_HEADER_LEN);
    header.extend_from_slice(magic);
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&first.to_le_bytes());
    file.write_at(&header, 0)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(&path, e))?;
    fsync_dir(dir)?;
    Ok((path, file))
}

/// Appends one framed record to `out`.
pub fn frame(out: &mut Vec<u8>, lsn: u64, kind: u8, payload: &[u8]) {
    frame_with(out, lsn, kind, |out| out.extend_from_slice(payload));
}

/// [`frame`], the payload appended to `out` by `write` in place (no copy of
/// it made first).
pub fn frame_with(out: &mut Vec<u8>, lsn: u64, kind: u8, write: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_PREFIX]);
    out.extend_from_slice(&lsn.to_le_bytes());
    out.push(kind);
    write(out);
    let len = (out.len() - start - FRAME_PREFIX) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start + FRAME_PREFIX..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Log files grow in steps of this many bytes, allocated ahead of the
/// records, so that a sync after an append does not also have to commit a
/// new file size (it roughly halves the cost of fdatasync here).
pub const PREALLOCATE: u64 = 4 << 20;

/// The log file being appended to.
pub struct WalWriter {
    path: PathBuf,
    /// Shared with [`Syncer`] while it syncs the file.
    file: Arc<dyn WriteFile>,
    first_lsn: u64,
    /// Logical end: the header and the records written so far.
    bytes: u64,
    /// Bytes allocated on disk (zeros past `bytes`).
    allocated: u64,
    /// The file system has no fallocate: the file grows with each append.
    no_fallocate: bool,
}

impl WalWriter {
    /// Creates a new log file whose first record will have `first_lsn`. An
    /// existing file of that name holds no records (replay read them all), so
    /// it is replaced.
    pub fn create(dir: &DataDir, first_lsn: u64) -> Result<Self> {
        let path = dir.join(file_name(first_lsn));
        let file = dir
            .fs()
            .create(&path, Create::Truncate)
            .map_err(|e| Error::io(&path, e))?;
        let mut header = Vec::with_capacity(WAL_HEADER_LEN);
        header.extend_from_slice(WAL_MAGIC);
        header.extend_from_slice(&WAL_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&first_lsn.to_le_bytes());
        file.write_at(&header, 0).map_err(|e| Error::io(&path, e))?;
        let mut w = Self {
            path,
            file,
            first_lsn,
            bytes: WAL_HEADER_LEN as u64,
            allocated: WAL_HEADER_LEN as u64,
            no_fallocate: false,
        };
        match w.allocate(PREALLOCATE) {
            // Writes reserve their own room (and are refused without it).
            Ok(()) | Err(Error::DiskFull(_)) => {}
            Err(e) => return Err(e),
        }
        w.file.sync_all().map_err(|e| Error::io(&w.path, e))?;
        fsync_dir(dir)?;
        Ok(w)
    }

    /// Allocates the file up to `len` bytes (zeros). A file system without
    /// fallocate simply grows the file with each append (`Ok`); a full disk
    /// is [`Error::DiskFull`], and nothing was written.
    fn allocate(&mut self, len: u64) -> Result<()> {
        if len <= self.allocated || self.no_fallocate {
            return Ok(());
        }
        match self.file.allocate(len) {
            Ok(()) => {
                self.allocated = len;
                Ok(())
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => Err(Error::DiskFull(format!(
                    "no space left to extend {} to {len} bytes",
                    self.path.display()
                ))),
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::EFBIG) => {
                    self.no_fallocate = true;
                    Ok(())
                }
                _ => Err(Error::io(&self.path, e)),
            },
        }
    }

    /// Makes sure `n` more bytes can be appended without the file system
    /// running out of space: the writer asks before it applies a write, so
    /// that a full disk refuses that write (and the store takes writes again
    /// once space is freed) instead of failing an append of a write already
    /// applied in memory.
    pub fn reserve(&mut self, n: u64) -> Result<()> {
        let end = self.bytes + n;
        if end > self.allocated {
            self.allocate(end.div_ceil(PREALLOCATE) * PREALLOCATE)?;
        }
        Ok(())
    }

    /// Writes framed records (not yet durable: call [`WalWriter::sync`]).
    pub fn append(&mut self, framed: &[u8]) -> Result<()> {
        let end = self.bytes + framed.len() as u64;
        if end > self.allocated {
            self.allocate(end.div_ceil(PREALLOCATE) * PREALLOCATE)?;
        }
        self.file
            .write_at(framed, self.bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.bytes = end;
        Ok(())
    }

    /// Cuts the unused preallocated space and syncs: the file is then
    /// exactly its records. Done when the writer moves to a new file.
    pub fn seal(self) -> Result<()> {
        self.file
            .set_len(self.bytes)
            .and_then(|_| self.file.sync_all())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    /// Starts [`WalWriter::sync`] on `syncer`'s thread: everything appended
    /// so far is durable once [`PendingSync::wait`] returns `Ok`. Append
    /// nothing more before that.
    pub fn start_sync(&self, syncer: &Syncer) -> PendingSync {
        let (done, rx) = mpsc::sync_channel(1);
        let sent = syncer.tx.send(SyncJob {
            file: self.file.clone(),
            done,
        });
        PendingSync {
            rx: sent.is_ok().then_some(rx),
            path: self.path.clone(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn first_lsn(&self) -> u64 {
        self.first_lsn
    }
}

/// A thread that runs `fdatasync` of the log for the writer, so that the
/// writer can apply a large write to memory while the disk works instead of
/// one after the other. The thread ends when the `Syncer` is dropped.
pub struct Syncer {
    tx: mpsc::Sender<SyncJob>,
}

struct SyncJob {
    file: Arc<dyn WriteFile>,
    done: mpsc::SyncSender<std::io::Result<()>>,
}

impl Syncer {
    /// Starts the thread; each sync's time goes to `timings`.
    pub fn start(timings: Arc<crate::storage::meters::Meters>) -> Result<Syncer> {
        let (tx, rx) = mpsc::channel::<SyncJob>();
        std::thread::Builder::new()
            .name("tagstore-sync".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let started = std::time::Instant::now();
                    let res = job.file.sync_data();
                    timings.log_sync.observe(started.elapsed());
                    let _ = job.done.send(res);
                }
            })
            .map_err(|e| Error::io(Path::new("tagstore-sync thread"), e))?;
        Ok(Syncer { tx })
    }
}

/// A sync started by [`WalWriter::start_sync`].
#[must_use = "the log is durable only once wait returns Ok"]
pub struct PendingSync {
    rx: Option<mpsc::Receiver<std::io::Result<()>>>,
    path: PathBuf,
}

impl PendingSync {
    /// Waits for the sync; its error, or one saying the thread is gone.
    pub fn wait(self) -> Result<()> {
        let res = match self.rx.map(|rx| rx.recv()) {
            Some(Ok(res)) => res,
            _ => Err(std::io::Error::other("the log's sync thread has stopped")),
        };
        res.map_err(|e| Error::io(&self.path, e))
    }
}

/// A log file found in the data directory.
#[derive(Debug, Clone)]
pub struct WalFile {
    pub path: PathBuf,
    pub first_lsn: u64,
    /// Bytes, when listed.
    pub len: u64,
}

/// Log files in `dir`, ordered by their first lsn.
pub fn list(dir: &DataDir) -> Result<Vec<WalFile>> {
    let mut out = Vec::new();
    for entry in dir.fs().list(dir).map_err(|e| Error::io(dir.path(), e))? {
        if let Some(first_lsn) = parse_file_name(&entry.name) {
            out.push(WalFile {
                path: dir.join(&entry.name),
                first_lsn,
                len: entry.len,
            });
        }
    }
    out.sort_by_key(|f| f.first_lsn);
    Ok(out)
}

/// What replay found.
#[derive(Debug, Default)]
pub struct ReplayOutcome {
    /// Lsn of the last valid record in the log (applied or skipped).
    pub last_lsn: Option<u64>,
    /// Records applied (those after the checkpoint).
    pub applied: u64,
    /// Bytes of log read.
    pub bytes: u64,
    /// A description of the torn tail that was cut off, if there was one.
    pub truncated: Option<String>,
}

/// Replays every record with an lsn above `after_lsn`, in order, through
/// `apply`. A torn tail (the last record of the newest file cut short or
/// failing its checksum where it ends the file) is truncated away and
/// reported. Any other damage is a hard error naming file and offset.
pub fn replay(
    dir: &DataDir,
    files: &[WalFile],
    after_lsn: u64,
    apply: impl FnMut(u64, u8, &[u8]) -> Result<()>,
) -> Result<ReplayOutcome> {
    scan(
        dir,
        files,
        after_lsn,
        None,
        |wf| dir.fs().read(&wf.path),
        apply,
    )
}

/// Reads the records `after_lsn + 1 ..= upto_lsn` of finished log files (a
/// checkpoint's, to archive their events), in order, through `f`. Changes
/// nothing: any damage, a torn tail included, is a hard error, and so is a
/// record missing from the range.
pub fn read_finished(
    dir: &DataDir,
    files: &[WalFile],
    after_lsn: u64,
    upto_lsn: u64,
    f: impl FnMut(u64, u8, &[u8]) -> Result<()>,
) -> Result<()> {
    read_range(
        dir,
        files,
        after_lsn,
        upto_lsn,
        |wf| dir.fs().read(&wf.path),
        f,
    )
}

/// As [`read_finished`], the files' bytes given by `load` (a past version
/// read for `AS OF` loads them through handles opened while no checkpoint
/// could move them).
pub fn read_range(
    dir: &DataDir,
    files: &[WalFile],
    after_lsn: u64,
    upto_lsn: u64,
    load: impl Fn(&WalFile) -> std::io::Result<Vec<u8>>,
    f: impl FnMut(u64, u8, &[u8]) -> Result<()>,
) -> Result<()> {
    let out = scan(dir, files, after_lsn, Some(upto_lsn), load, f)?;
    match out.last_lsn {
        Some(last) if last >= upto_lsn => Ok(()),
        _ if upto_lsn <= after_lsn => Ok(()),
        last => Err(Error::Checkpoint(format!(
            "the log ends at lsn {} before {upto_lsn}, which the checkpoint covers",
            last.unwrap_or(after_lsn)
        ))),
    }
}

/// Replay (`upto_lsn` `None`: the newest file's torn tail is cut) or a
/// read of finished files up to `upto_lsn` (nothing is changed).
fn scan(
    dir: &DataDir,
    files: &[WalFile],
    after_lsn: u64,
    upto_lsn: Option<u64>,
    load: impl Fn(&WalFile) -> std::io::Result<Vec<u8>>,
    mut apply: impl FnMut(u64, u8, &[u8]) -> Result<()>,
) -> Result<ReplayOutcome> {
    let mut out = ReplayOutcome::default();
    let mut expected: Option<u64> = None;
    // Once `upto_lsn` is read, nothing after it is looked at: the newest
    // file may be taking a record at this moment.
    let reached = |out: &ReplayOutcome| {
        upto_lsn.is_some_and(|upto| out.last_lsn.is_some_and(|last| last >= upto))
    };
    for (n, wf) in files.iter().enumerate() {
        if reached(&out) {
            return Ok(out);
        }
        let is_last = upto_lsn.is_none() && n + 1 == files.len();
        let data = load(wf).map_err(|e| Error::io(&wf.path, e))?;
        out.bytes += data.len() as u64;
        let corrupt =
            |offset: usize, reason: String| Error::corrupt(&wf.path, offset as u64, reason);
        if let Some(exp) = expected
            && wf.first_lsn < exp
            && data.iter().skip(WAL_HEADER_LEN).all(|&b| b == 0)
        {
            // A file begun for a checkpoint whose start then failed (a full
            // disk before its header, a failed directory sync): the writer
            // kept on in the older file, so this one never took a record.
            continue;
        }
        if data.len() < WAL_HEADER_LEN {
            if is_last {
                out.truncated = Some(format!(
                    "{}: header cut short at {} bytes; file removed",
                    wf.path.display(),
                    data.len()
                ));
                dir.fs()
                    .remove(&wf.path)
                    .map_err(|e| Error::io(&wf.path, e))?;
                continue;
            }
            return Err(corrupt(0, "log file shorter than its header".into()));
        }
        if &data[..8] != WAL_MAGIC {
            return Err(corrupt(0, "bad magic: not a tagstore log file".into()));
        }
        let version = le_u32(&data, 8).unwrap_or(0);
        if version != WAL_VERSION {
            return Err(corrupt(8, format!("unsupported log version {version}")));
        }
        let first_lsn = le_u64(&data, 16).unwrap_or(0);
        if first_lsn != wf.first_lsn {
            return Err(corrupt(
                16,
                format!(
                    "header says first lsn {first_lsn}, file name says {}",
                    wf.first_lsn
                ),
            ));
        }
        if let Some(exp) = expected
            && first_lsn != exp
        {
            return Err(corrupt(
                16,
                format!("log gap: expected lsn {exp}, file starts at {first_lsn}"),
            ));
        }
        let mut next = first_lsn;
        let mut pos = WAL_HEADER_LEN;
        while pos < data.len() {
            if reached(&out) {
                return Ok(out);
            }
            let remaining = data.len() - pos;
            let torn = |why: &str| -> Option<String> {
                is_last.then(|| {
                    format!(
                        "{}: torn record at offset {pos} ({why}); {remaining} bytes cut off",
                        wf.path.display()
                    )
                })
            };
            if data[pos..].iter().all(|&b| b == 0) {
                // Preallocated space: the end of this file's records.
                if is_last {
                    truncate(dir, &wf.path, pos)?;
                }
                break;
            }
            let len = le_u32(&data, pos).map(|l| l as usize);
            let problem = match len {
                None => Some("length field cut short".to_string()),
                Some(l) if !(MIN_RECORD_LEN..=MAX_RECORD_LEN).contains(&l) => {
                    return Err(corrupt(pos, format!("invalid record length {l}")));
                }
                Some(l) if FRAME_PREFIX + l > remaining => Some(format!(
                    "record of {l} bytes, {} present",
                    remaining.saturating_sub(FRAME_PREFIX)
                )),
                Some(_) => None,
            };
            if let Some(why) = problem {
                match torn(&why) {
                    Some(msg) => {
                        truncate(dir, &wf.path, pos)?;
                        out.truncated = Some(msg);
                        break;
                    }
                    None => {
                        return Err(corrupt(
                            pos,
                            format!("damaged record in a log file that is not the newest: {why}"),
                        ));
                    }
                }
            }
            let len = len.unwrap_or(0);
            let body = &data[pos + FRAME_PREFIX..pos + FRAME_PREFIX + len];
            let crc = le_u32(&data, pos + 4).unwrap_or(0);
            if crc32fast::hash(body) != crc {
                // The final record: only zeros (preallocated space) or nothing follows it.
                let ends_file = data[pos + FRAME_PREFIX + len..].iter().all(|&b| b == 0);
                if ends_file && let Some(msg) = torn("checksum mismatch in the final record") {
                    truncate(dir, &wf.path, pos)?;
                    out.truncated = Some(msg);
                    break;
                }
                return Err(corrupt(pos, "record checksum mismatch".into()));
            }
            let lsn = le_u64(body, 0).unwrap_or(0);
            if upto_lsn.is_some_and(|upto| lsn > upto) {
                return Ok(out);
            }
            if lsn != next {
                return Err(corrupt(
                    pos,
                    format!("log gap: expected lsn {next}, found {lsn}"),
                ));
            }
            if lsn > after_lsn {
                if out.applied == 0 && lsn != after_lsn + 1 {
                    return Err(corrupt(
                        pos,
                        format!(
                            "log gap: the checkpoint covers up to lsn {after_lsn}, but the next record is {lsn}"
                        ),
                    ));
                }
                apply(lsn, body[8], &body[9..]).map_err(|e| match e {
                    // The record itself is bad: this file, at this record.
                    Error::BadRecord(reason) => corrupt(pos, format!("record lsn {lsn}: {reason}")),
                    // Damage elsewhere (a segment blob the record touches)
                    // keeps the name of the damaged file: the log is fine.
                    Error::Corrupt {
                        path,
                        offset,
                        reason,
                    } => Error::Corrupt {
                        path,
                        offset,
                        reason: format!(
                            "{reason} (read while replaying record lsn {lsn} of {}, which is intact)",
                            wf.path.display()
                        ),
                    },
                    other => other,
                })?;
                out.applied += 1;
            }
            out.last_lsn = Some(lsn);
            next = lsn + 1;
            pos += FRAME_PREFIX + len;
        }
        expected = Some(next);
    }
    if let Some(last) = out.last_lsn
        && last < after_lsn
    {
        // The checkpoint covers more than the log holds: fine (the log was
        // trimmed), but then no later record may exist either.
        out.last_lsn = Some(after_lsn);
    }
    Ok(out)
}

fn truncate(dir: &DataDir, path: &Path, len: usize) -> Result<()> {
    let f = dir.fs().open_write(path).map_err(|e| Error::io(path, e))?;
    f.set_len(len as u64).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};

    /// Writes `n` records and leaves the file as a crash would: with its
    /// preallocated zeros after the records.
    fn write_log(dir: &Path, first: u64, n: u64) -> PathBuf {
        let mut w = WalWriter::create(&DataDir::os(dir), first).unwrap();
        let mut buf = Vec::new();
        for lsn in first..first + n {
            frame(&mut buf, lsn, 1, format!("record {lsn}").as_bytes());
        }
        w.append(&buf).unwrap();
        w.sync().unwrap();
        dir.join(file_name(first))
    }

    /// Where the records of a file end (before any preallocated zeros).
    fn logical_end(path: &Path) -> u64 {
        let data = fs::read(path).unwrap();
        let mut pos = WAL_HEADER_LEN;
        while let Some(len) = le_u32(&data, pos).filter(|&l| l != 0) {
            pos += FRAME_PREFIX + len as usize;
        }
        pos as u64
    }

    #[test]
    fn preallocated_space_is_not_damage_and_sealing_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 3);
        assert!(
            fs::metadata(&path).unwrap().len() >= PREALLOCATE,
            "space is allocated ahead"
        );
        let (seen, out) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(
            out.truncated.is_none(),
            "zeros after the records are not a torn tail"
        );
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            logical_end(&path),
            "recovery trims them"
        );

        let mut w = WalWriter::create(&DataDir::os(dir.path()), 4).unwrap();
        let mut buf = Vec::new();
        frame(&mut buf, 4, 1, b"record 4");
        w.append(&buf).unwrap();
        let end = w.bytes();
        w.seal().unwrap();
        assert_eq!(
            fs::metadata(dir.path().join(file_name(4))).unwrap().len(),
            end
        );
        let (seen, _) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_torn_record_followed_by_preallocated_zeros_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 4);
        // Zero the second half of the last record, as a crash between page writes would.
        let end = logical_end(&path) as usize;
        let mut data = fs::read(&path).unwrap();
        for b in &mut data[end - 6..end] {
            *b = 0;
        }
        fs::write(&path, &data).unwrap();
        let (seen, out) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(
            out.truncated
                .unwrap()
                .contains("checksum mismatch in the final record")
        );
    }

    fn collect(dir: &Path, after: u64) -> Result<(Vec<u64>, ReplayOutcome)> {
        let mut seen = Vec::new();
        let dir = DataDir::os(dir);
        let files = list(&dir)?;
        let out = replay(&dir, &files, after, |lsn, kind, payload| {
            assert_eq!(kind, 1);
            assert_eq!(payload, format!("record {lsn}").as_bytes());
            seen.push(lsn);
            Ok(())
        })?;
        Ok((seen, out))
    }

    #[test]
    fn replays_in_order_and_skips_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 1, 5);
        write_log(dir.path(), 6, 3);
        let (seen, out) = collect(dir.path(), 3).unwrap();
        assert_eq!(seen, vec![4, 5, 6, 7, 8]);
        assert_eq!(out.last_lsn, Some(8));
        assert!(out.truncated.is_none());
    }

    #[test]
    fn torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 4);
        let len = logical_end(&path);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let (seen, out) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(out.truncated.unwrap().contains("torn record"));
        // The cut is durable: a second replay finds a clean log.
        let (seen, out) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(out.truncated.is_none());
    }

    #[test]
    fn flipped_bit_before_the_tail_is_a_hard_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_log(dir.path(), 1, 4);
        let mut data = fs::read(&path).unwrap();
        data[WAL_HEADER_LEN + FRAME_PREFIX + 10] ^= 0x10;
        fs::write(&path, &data).unwrap();
        let err = collect(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(err.contains(&format!("offset {WAL_HEADER_LEN}")), "{err}");
        assert!(err.contains("wal-0000000000000001.log"), "{err}");
    }

    #[test]
    fn damage_in_an_older_file_is_a_hard_error() {
        let dir = tempfile::tempdir().unwrap();
        let old = write_log(dir.path(), 1, 2);
        write_log(dir.path(), 3, 2);
        let len = logical_end(&old);
        OpenOptions::new()
            .write(true)
            .open(&old)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        assert!(collect(dir.path(), 0).is_err());
    }

    #[test]
    fn gap_between_files_is_a_hard_error() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 1, 2);
        write_log(dir.path(), 5, 2);
        let err = collect(dir.path(), 0).unwrap_err().to_string();
        assert!(err.contains("log gap"), "{err}");
    }

    /// A log file begun for a checkpoint that then failed, while the writer
    /// kept writing to the older file: it holds no record and is passed
    /// over, by replay and by a checkpoint's read (which failed on it before
    /// the fix: "log gap: expected lsn 4, file starts at 3").
    #[test]
    fn an_empty_file_begun_by_a_failed_rotation_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        write_log(dir.path(), 1, 3);
        WalWriter::create(&DataDir::os(dir.path()), 3).unwrap();
        // Not even a header (the disk was full).
        std::fs::write(dir.path().join(file_name(2)), b"").unwrap();
        write_log(dir.path(), 4, 1);
        let (seen, _) = collect(dir.path(), 0).unwrap();
        assert_eq!(seen, vec![1, 2, 3, 4]);
        let d = DataDir::os(dir.path());
        let files = list(&d).unwrap();
        let mut read = Vec::new();
        read_finished(&d, &files, 1, 3, |lsn, _, _| {
            read.push(lsn);
            Ok(())
        })
        .unwrap();
        assert_eq!(read, vec![2, 3]);
        let err = read_finished(&d, &files, 0, 9, |_, _, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ends at lsn 4 before 9"), "{err}");
    }
}
