//! The change feed's files: for every write, who entered and who left each
//! tag (rule tags included) and each value of an enumerated field
//! (lifecycles included), kept for a retention so that a watcher can resume
//! from a log position after a disconnect or a restart.
//!
//! Owns the bytes of `feed-*.log` files, their writing, rotation and
//! retention, and reading them back in order; what changed is worked out by
//! `state::apply` (the one apply function, so replay works out the same
//! entries), when and what to write is the writer's.
//!
//! The feed is derived data: every entry follows from the log and the state
//! before it. A group's entries are appended while its log records are
//! synced (before the sync returns: a crash can leave entries of writes the
//! log lost, which recovery cuts), shown to readers only once the sync has
//! returned and the group is published, and not synced themselves. Before
//! a checkpoint deletes log files, the feed is synced up to the checkpoint
//! (with a mark for positions that changed no membership), so that recovery
//! can always work out the lost tail of the feed again from the log it
//! keeps. When a feed file cannot be
//! written (a full disk), the feed starts again after that write and the
//! older files go: a watcher from before then is told to resynchronise,
//! never given a feed with a hole in it.
//!
//! Format (see `storage-format.md`): a 24-byte header (`TAGSFEED`, version,
//! reserved, the first lsn the file covers), then records framed as the
//! log's: `len u32 | crc32 u32 | lsn u64 | kind u8 | payload`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::bitmap::Bitmap;
use crate::error::{Error, Result};
use crate::storage::codec::{Dec, Enc, le_u32, le_u64};
use crate::storage::datadir::{DataDir, list_numbered, numbered_name};
use crate::storage::fs::WriteFile;
use crate::storage::wal::{self, FRAME_PREFIX};

pub const FEED_MAGIC: &[u8; 8] = b"TAGSFEED";
pub const FEED_VERSION: u32 = 1;
pub const FEED_HEADER_LEN: usize = 24;
/// A record of the memberships one write changed.
pub const KIND_CHANGES: u8 = 1;
/// A record that changes nothing: the feed covers every position up to its
/// lsn (written before log files are deleted, and at shutdown).
pub const KIND_MARK: u8 = 2;
/// Largest record a reader accepts (a write that changes 20M memberships
/// stays far below it).
const MAX_FEED_RECORD: usize = 1 << 30;
/// Bytes a reader asks for at a time.
const READ_CHUNK: usize = 1 << 20;

pub fn file_name(first_lsn: u64) -> String {
    numbered_name("feed-", first_lsn, ".log")
}

/// What changed membership: a tag, or one value of an enumerated field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Tag(String),
    Value { field: String, value: String },
}

/// One subject's changes in one write. A dropped subject has no members
/// any more; its last members are not listed as leaving one by one.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub subject: Option<Subject>,
    pub entered: Bitmap,
    pub left: Bitmap,
    pub dropped: bool,
}

impl Change {
    pub fn subject(&self) -> &Subject {
        self.subject.as_ref().unwrap_or(&EMPTY_SUBJECT)
    }
}

static EMPTY_SUBJECT: Subject = Subject::Tag(String::new());

/// One record of the feed: a write's changes, or a mark.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub lsn: u64,
    /// When the write was applied (Unix ms); 0 in a mark.
    pub at_ms: i64,
    /// Empty in a mark.
    pub changes: Vec<Change>,
}

/// Appends `entry`, framed, to `out`.
pub fn encode(out: &mut Vec<u8>, entry: &Entry) {
    let mut e = Enc::new();
    e.i64(entry.at_ms).u32(entry.changes.len() as u32);
    for c in &entry.changes {
        let flags = u8::from(c.dropped);
        match c.subject() {
            Subject::Tag(name) => {
                e.u8(0).str(name);
            }
            Subject::Value { field, value } => {
                e.u8(1).str(field).str(value);
            }
        }
        e.u8(flags);
        put_bitmap(&mut e, &c.entered);
        put_bitmap(&mut e, &c.left);
    }
    wal::frame(out, entry.lsn, KIND_CHANGES, &e.buf);
}

fn put_bitmap(e: &mut Enc, b: &Bitmap) {
    let bytes = b.serialize::<croaring::Portable>();
    e.u32(bytes.len() as u32);
    e.buf.extend_from_slice(&bytes);
}

fn get_bitmap(d: &mut Dec<'_>) -> crate::storage::codec::DecResult<Bitmap> {
    let n = d.u32()? as usize;
    let at = d.pos();
    let bytes = d.bytes(n)?;
    match Bitmap::try_deserialize::<croaring::Portable>(bytes) {
        Some(b) if b.get_serialized_size_in_bytes::<croaring::Portable>() == n => Ok(b),
        _ => Err(crate::storage::codec::DecodeError {
            offset: at,
            reason: "invalid portable roaring bitmap".into(),
        }),
    }
}

fn encode_mark(out: &mut Vec<u8>, lsn: u64) {
    wal::frame(out, lsn, KIND_MARK, &[]);
}

/// Decodes a record's payload.
pub fn decode(lsn: u64, kind: u8, payload: &[u8]) -> std::result::Result<Entry, String> {
    if kind == KIND_MARK {
        return if payload.is_empty() {
            Ok(Entry {
                lsn,
                ..Default::default()
            })
        } else {
            Err("a mark record with a payload".into())
        };
    }
    if kind != KIND_CHANGES {
        return Err(format!("unknown feed record kind {kind}"));
    }
    let mut d = Dec::new(payload);
    let e = |x: crate::storage::codec::DecodeError| format!("at {}: {}", x.offset, x.reason);
    let at_ms = d.i64().map_err(e)?;
    let n = d.u32().map_err(e)? as usize;
    // Every change takes at least 18 bytes: no count can ask for more room
    // than the record has.
    if n > d.remaining() / 18 {
        return Err(format!("{n} changes in {} bytes", d.remaining()));
    }
    let mut changes = Vec::with_capacity(n);
    for _ in 0..n {
        let subject = match d.u8().map_err(e)? {
            0 => Subject::Tag(d.str().map_err(e)?.to_string()),
            1 => Subject::Value {
                field: d.str().map_err(e)?.to_string(),
                value: d.str().map_err(e)?.to_string(),
            },
            k => return Err(format!("unknown subject kind {k}")),
        };
        let flags = d.u8().map_err(e)?;
        if flags > 1 {
            return Err(format!("unknown change flags {flags}"));
        }
        changes.push(Change {
            subject: Some(subject),
            entered: get_bitmap(&mut d).map_err(e)?,
            left: get_bitmap(&mut d).map_err(e)?,
            dropped: flags == 1,
        });
    }
    d.finish().map_err(e)?;
    Ok(Entry {
        lsn,
        at_ms,
        changes,
    })
}

/// How long the feed is kept, and in what pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedConfig {
    /// Bytes of feed files kept at most (the oldest whole file goes first);
    /// 0 turns the feed off.
    pub retention_bytes: u64,
    /// A file goes once everything in it is older than this (ms); 0: no
    /// limit by age.
    pub retention_ms: i64,
    /// A new file is begun once the current one holds this many bytes.
    pub file_bytes: u64,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            retention_bytes: 1 << 30,
            retention_ms: 7 * 86_400_000,
            file_bytes: 64 << 20,
        }
    }
}

impl FeedConfig {
    pub fn enabled(&self) -> bool {
        self.retention_bytes > 0
    }
}

/// Where the feed stands, for readers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedView {
    pub enabled: bool,
    /// The files, by the first lsn each covers, oldest first.
    pub files: Vec<u64>,
    /// Every write after lsn `start - 1` up to `end` is in the feed: a
    /// watcher may resume after any position from `start - 1` to `end`.
    pub start: u64,
    pub end: u64,
    /// Why the feed last started again, if it did since the server started.
    pub restarted: Option<String>,
}

/// The feed's position shared between its writer and readers: the view
/// under a lock, and a signal that moves with `end`.
pub struct FeedShared {
    view: Mutex<FeedView>,
    end_tx: tokio::sync::watch::Sender<u64>,
    /// The newest entries, as the writer made them: readers that have
    /// caught up take them from here, with no file read and no decoding.
    ring: Mutex<Ring>,
}

/// The newest entries in memory, at most [`RING_BYTES`] of them (as
/// encoded): every entry after lsn `base` up to the feed's end is here.
#[derive(Default)]
struct Ring {
    entries: VecDeque<(Arc<Entry>, usize)>,
    base: u64,
    bytes: usize,
}

/// Bytes of entries (as encoded) kept in memory for readers that have
/// caught up.
pub const RING_BYTES: usize = 32 << 20;

impl FeedShared {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            view: Mutex::new(FeedView::default()),
            end_tx: tokio::sync::watch::channel(0).0,
            ring: Mutex::new(Ring::default()),
        })
    }

    pub fn view(&self) -> FeedView {
        self.view.lock().clone()
    }

    /// A receiver that changes whenever the feed's end moves.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.end_tx.subscribe()
    }

    /// How many receivers from [`FeedShared::subscribe`] are held.
    pub fn followers(&self) -> usize {
        self.end_tx.receiver_count()
    }

    /// The entries after `after` and the feed's end, if memory holds them.
    pub fn recent(&self, after: u64) -> Option<(Vec<Arc<Entry>>, u64)> {
        let end = self.view.lock().end;
        self.ring_after(after, end, usize::MAX)
            .map(|(entries, _)| (entries, end))
    }

    /// The ring starts again, empty, after lsn `base`.
    fn reset_ring(&self, base: u64) {
        let mut r = self.ring.lock();
        r.entries.clear();
        r.bytes = 0;
        r.base = base;
    }

    fn push_ring(&self, entry: Arc<Entry>, bytes: usize) {
        let mut r = self.ring.lock();
        r.bytes += bytes;
        r.entries.push_back((entry, bytes));
        while r.bytes > RING_BYTES {
            let Some((old, n)) = r.entries.pop_front() else {
                break;
            };
            r.bytes -= n;
            r.base = old.lsn;
        }
    }

    /// The entries after `after` up to `end`, about `max_bytes` of them (at
    /// least one), when the ring holds all of them; with whether they run
    /// to `end`. `None` when the ring does not reach back to `after`.
    fn ring_after(
        &self,
        after: u64,
        end: u64,
        max_bytes: usize,
    ) -> Option<(Vec<Arc<Entry>>, bool)> {
        let r = self.ring.lock();
        if after < r.base {
            return None;
        }
        let from = r.entries.partition_point(|(e, _)| e.lsn <= after);
        let mut out = Vec::new();
        let mut bytes = 0;
        for (e, n) in r.entries.range(from..) {
            if e.lsn > end {
                break;
            }
            if bytes >= max_bytes && !out.is_empty() {
                return Some((out, false));
            }
            bytes += n;
            out.push(e.clone());
        }
        Some((out, true))
    }

    fn set(&self, view: FeedView) {
        let end = view.end;
        *self.view.lock() = view;
        self.end_tx.send_replace(end);
    }
}

/// A file of the feed, as the writer knows it.
#[derive(Debug, Clone)]
struct FeedFile {
    first_lsn: u64,
    bytes: u64,
    /// When its newest change was applied (Unix ms; 0: none yet).
    newest_ms: i64,
}

/// The feed file being appended to, and the ones before it.
pub struct FeedWriter {
    dir: DataDir,
    config: FeedConfig,
    shared: Arc<FeedShared>,
    /// Oldest first; the last is being appended to.
    files: VecDeque<FeedFile>,
    current: Option<(PathBuf, Arc<dyn WriteFile>)>,
    /// Every write up to this lsn is in the feed (written, maybe not synced).
    end: u64,
    /// Whether everything written is synced.
    synced: bool,
    restarted: Option<String>,
    buf: Vec<u8>,
    /// Entries of the group being committed, written ahead of the log's
    /// sync and not yet shown, with their sizes as encoded.
    ahead: Vec<(Arc<Entry>, usize)>,
    /// Why writing them ahead failed: the next [`FeedWriter::advance`]
    /// starts the feed again.
    ahead_failed: Option<Error>,
}

/// What [`FeedWriter::recover`] found.
#[derive(Debug, Default)]
pub struct FeedRecovery {
    /// The feed covered every write up to this lsn (before the log's
    /// entries after it are appended again).
    pub end: u64,
    /// What was cut or why the feed started again, if anything was.
    pub note: Option<String>,
}

impl FeedWriter {
    /// Opens the feed of `dir` at start, once the log is replayed: `entries`
    /// are the replayed writes' entries (every write after
    /// `checkpoint_lsn` up to `last_lsn`, those that changed something). A
    /// torn tail is cut, and so is anything past `last_lsn` (a log that
    /// was not synced lost those writes); the entries the feed lacks are
    /// appended again from `entries`. If the feed cannot reach back to
    /// `checkpoint_lsn` (files lost, or the feed was off), it starts again
    /// after `last_lsn`'s predecessors it can cover: at `checkpoint_lsn + 1`.
    pub fn recover(
        dir: &DataDir,
        config: FeedConfig,
        shared: Arc<FeedShared>,
        checkpoint_lsn: u64,
        last_lsn: u64,
        entries: &[Entry],
    ) -> Result<(FeedWriter, FeedRecovery)> {
        let mut w = FeedWriter {
            dir: dir.clone(),
            config,
            shared,
            files: VecDeque::new(),
            current: None,
            end: 0,
            synced: true,
            restarted: None,
            buf: Vec::new(),
            ahead: Vec::new(),
            ahead_failed: None,
        };
        let mut report = FeedRecovery::default();
        let names = list(dir)?;
        if !config.enabled() {
            for first in names {
                w.remove_file(first);
            }
            w.publish();
            return Ok((w, report));
        }
        let mut found: Option<u64> = None;
        let mut broken: Option<String> = None;
        for (n, &first) in names.iter().enumerate() {
            let is_last = n + 1 == names.len();
            // A file that ends before the log does (its successor starts
            // by the log's end) is checked frame by frame only; the rest,
            // which recovery may cut, record by record.
            let whole = names
                .get(n + 1)
                .is_none_or(|&next| next > last_lsn.saturating_add(1));
            match scan_file(dir, first, last_lsn, is_last, whole) {
                Ok(s) => {
                    if let Some(end) = found
                        && first <= end
                    {
                        broken = Some(format!(
                            "{} starts at lsn {first}, within a feed that reaches lsn {end}",
                            file_name(first)
                        ));
                        break;
                    }
                    if let Some(cut) = s.cut {
                        report.note = Some(cut);
                    }
                    w.files.push_back(FeedFile {
                        first_lsn: first,
                        bytes: s.bytes,
                        newest_ms: s.newest_ms,
                    });
                    found = Some(s.end.max(first - 1));
                    if s.past_end && !is_last {
                        // Writes the log lost: the later files hold only
                        // such writes too.
                        for &later in &names[n + 1..] {
                            w.remove_file(later);
                        }
                        break;
                    }
                }
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        let covered = found.unwrap_or(0);
        let usable = broken.is_none() && found.is_some() && covered >= checkpoint_lsn;
        if !usable {
            let why = broken.unwrap_or_else(|| match found {
                None => "no feed files".to_string(),
                Some(end) => format!(
                    "the feed ends at lsn {end}, before the checkpoint at {checkpoint_lsn} whose log is gone"
                ),
            });
            for &first in &names {
                w.remove_file(first);
            }
            w.files.clear();
            let start = checkpoint_lsn + 1;
            w.begin_file(start)?;
            w.end = checkpoint_lsn;
            if !names.is_empty() {
                report.note = Some(format!("the feed starts again at lsn {start}: {why}"));
                w.restarted = Some(format!("at start, from lsn {start}: {why}"));
            }
        } else {
            w.end = covered;
            let last = w.files.back().map(|f| f.first_lsn).unwrap_or(covered + 1);
            let path = dir.join(file_name(last));
            let file = dir
                .fs()
                .open_write(&path)
                .map_err(|e| Error::io(&path, e))?;
            w.current = Some((path, file));
        }
        report.end = w.end;
        for e in entries {
            if e.lsn > w.end {
                let _ = w.append(e)?;
            }
        }
        w.end = w.end.max(last_lsn);
        w.sync()?;
        w.shared.reset_ring(w.end);
        w.publish();
        Ok((w, report))
    }

    fn publish(&self) {
        self.shared.set(FeedView {
            enabled: self.config.enabled(),
            files: self.files.iter().map(|f| f.first_lsn).collect(),
            start: self.files.front().map_or(self.end + 1, |f| f.first_lsn),
            end: self.end,
            restarted: self.restarted.clone(),
        });
    }

    fn remove_file(&self, first: u64) {
        let path = self.dir.join(file_name(first));
        if let Err(e) = self.dir.fs().remove(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a feed file");
        }
    }

    /// Begins a new file covering from `first_lsn`.
    fn begin_file(&mut self, first_lsn: u64) -> Result<()> {
        let (path, file) = wal::create_framed(
            &self.dir,
            &file_name(first_lsn),
            FEED_MAGIC,
            FEED_VERSION,
            first_lsn,
        )?;
        self.files.push_back(FeedFile {
            first_lsn,
            bytes: FEED_HEADER_LEN as u64,
            newest_ms: 0,
        });
        self.current = Some((path, file));
        Ok(())
    }

    fn write(&mut self, framed: &[u8], at_ms: i64) -> Result<()> {
        let Some((path, file)) = &self.current else {
            return Err(Error::Internal("the feed has no file open".into()));
        };
        let Some(f) = self.files.back_mut() else {
            return Err(Error::Internal("the feed has no file listed".into()));
        };
        file.write_at(framed, f.bytes)
            .map_err(|e| Error::io(path, e))?;
        f.bytes += framed.len() as u64;
        f.newest_ms = f.newest_ms.max(at_ms);
        self.synced = false;
        Ok(())
    }

    /// Appends a write's entry to the file (not synced, not shown to
    /// readers: [`FeedWriter::advance`] shows it); its size as encoded.
    fn append(&mut self, entry: &Entry) -> Result<usize> {
        self.buf.clear();
        let mut buf = std::mem::take(&mut self.buf);
        encode(&mut buf, entry);
        let n = buf.len();
        let res = self.write(&buf, entry.at_ms);
        self.buf = buf;
        res?;
        Ok(n)
    }

    /// Writes the entries of a group whose log records are written and not
    /// yet synced: the file takes them while the disk syncs the log, and
    /// readers see them only after [`FeedWriter::advance`]. A failure is
    /// kept for `advance` (the feed then starts again); it never fails the
    /// write itself.
    pub fn write_ahead(&mut self, entries: Vec<Entry>) {
        if !self.config.enabled() || self.ahead_failed.is_some() {
            return;
        }
        if self.current.is_none() {
            // An earlier failure: start again after this group.
            self.ahead_failed = Some(Error::Internal("no feed file".into()));
            return;
        }
        for e in entries {
            let newest = self.ahead.last().map_or(self.end, |(a, _)| a.lsn);
            if e.lsn <= newest {
                continue;
            }
            match self.append(&e) {
                Ok(n) => self.ahead.push((Arc::new(e), n)),
                Err(err) => {
                    self.ahead_failed = Some(err);
                    return;
                }
            }
        }
    }

    /// The group up to `lsn` is synced in the log and published: the
    /// entries written ahead are shown to readers and the feed's end moves
    /// to `lsn`. A failure to write them starts the feed again after `lsn`
    /// (readers from before are told to resynchronise).
    pub fn advance(&mut self, lsn: u64, now_ms: i64) {
        let ahead = std::mem::take(&mut self.ahead);
        let failed = self.ahead_failed.take();
        if !self.config.enabled() || lsn <= self.end {
            return;
        }
        match failed {
            None => {
                for (e, n) in ahead {
                    self.shared.push_ring(e, n);
                }
                self.end = lsn;
                if self
                    .files
                    .back()
                    .is_some_and(|f| f.bytes >= self.config.file_bytes)
                    && let Err(e) = self.rotate(lsn + 1, now_ms)
                {
                    self.start_again(lsn, &e);
                }
            }
            Some(e) => self.start_again(lsn, &e),
        }
        self.publish();
    }

    fn start_again(&mut self, lsn: u64, e: &Error) {
        tracing::error!(error = %e, lsn, "the change feed could not be written; it starts again after this write");
        self.current = None;
        for f in std::mem::take(&mut self.files) {
            self.remove_file(f.first_lsn);
        }
        self.end = lsn;
        self.shared.reset_ring(lsn);
        self.restarted = Some(format!("after lsn {lsn}: {e}"));
        if let Err(e2) = self.begin_file(lsn + 1) {
            tracing::error!(error = %e2, "no new feed file; the next write tries again");
            self.current = None;
            self.files.clear();
        }
        self.synced = false;
    }

    /// Closes the current file (synced) and begins one from `first_lsn`,
    /// then lets the retention take the oldest files.
    fn rotate(&mut self, first_lsn: u64, now_ms: i64) -> Result<()> {
        self.sync()?;
        self.begin_file(first_lsn)?;
        self.expire(now_ms);
        Ok(())
    }

    /// Deletes the oldest files past the retention (never the current one).
    pub fn expire(&mut self, now_ms: i64) {
        while self.files.len() > 1 {
            let total: u64 = self.files.iter().map(|f| f.bytes).sum();
            let oldest = &self.files[0];
            let too_old = self.config.retention_ms > 0
                && oldest.newest_ms > 0
                && oldest.newest_ms < now_ms - self.config.retention_ms;
            if total <= self.config.retention_bytes && !too_old {
                break;
            }
            let first = oldest.first_lsn;
            self.files.pop_front();
            self.remove_file(first);
        }
        self.publish();
    }

    /// Makes the feed durable up to `lsn` (a mark when its last record is
    /// older), before log files up to `lsn` are deleted. A failure starts
    /// the feed again after `lsn`: the log that could rebuild it is about
    /// to go.
    pub fn sync_to(&mut self, lsn: u64) {
        if !self.config.enabled() {
            return;
        }
        let res = (|| -> Result<()> {
            if self.current.is_none() {
                return Err(Error::Internal("no feed file".into()));
            }
            let mut mark = Vec::new();
            encode_mark(&mut mark, self.end.max(lsn));
            self.write(&mark, 0)?;
            self.sync()
        })();
        if let Err(e) = res {
            self.start_again(self.end.max(lsn), &e);
            self.publish();
        }
    }

    fn sync(&mut self) -> Result<()> {
        if self.synced {
            return Ok(());
        }
        if let Some((path, file)) = &self.current {
            file.sync_data().map_err(|e| Error::io(path, e))?;
        }
        self.synced = true;
        Ok(())
    }

    pub fn end(&self) -> u64 {
        self.end
    }
}

/// The feed files in `dir`, by the first lsn each covers, oldest first.
pub fn list(dir: &DataDir) -> Result<Vec<u64>> {
    list_numbered(dir, "feed-", ".log")
}

struct Scanned {
    /// The last lsn of its records (0: none).
    end: u64,
    bytes: u64,
    newest_ms: i64,
    cut: Option<String>,
    /// Records past the log's end were cut.
    past_end: bool,
}

/// Reads a feed file at start: checks every record's frame (length,
/// checksum, rising lsn, kind) and, when `whole`, decodes it (its
/// changes' names and bitmaps; a file of older writes only has its
/// records' times read: decoding every record of 133 MB of feed took
/// 0.5-0.7 s of a start, and a full feed is 1 GiB by default); cuts a torn
/// tail (of the newest file) and records past `last_lsn`.
fn scan_file(
    dir: &DataDir,
    first: u64,
    last_lsn: u64,
    is_last: bool,
    whole: bool,
) -> Result<Scanned> {
    let path = dir.join(file_name(first));
    let data = dir.fs().read(&path).map_err(|e| Error::io(&path, e))?;
    let corrupt = |at: usize, why: String| Error::corrupt(&path, at as u64, why);
    if data.len() < FEED_HEADER_LEN || &data[..8] != FEED_MAGIC {
        return Err(corrupt(0, "not a tagstore feed file".into()));
    }
    let version = le_u32(&data, 8).unwrap_or(0);
    if version != FEED_VERSION {
        return Err(corrupt(8, format!("unsupported feed version {version}")));
    }
    if le_u64(&data, 16) != Some(first) {
        return Err(corrupt(16, "header and file name disagree".into()));
    }
    let mut out = Scanned {
        end: 0,
        bytes: FEED_HEADER_LEN as u64,
        newest_ms: 0,
        cut: None,
        past_end: false,
    };
    let mut pos = FEED_HEADER_LEN;
    let mut prev = first.saturating_sub(1);
    while pos < data.len() {
        match frame_at(&data, pos) {
            Framed::Record {
                lsn,
                kind,
                payload,
                next,
            } => {
                if lsn > last_lsn {
                    out.past_end = true;
                    out.cut = Some(format!(
                        "{}: records from lsn {lsn} cut (the log ends at {last_lsn})",
                        path.display()
                    ));
                    break;
                }
                if lsn <= prev && !(kind == KIND_MARK && lsn == prev) {
                    return Err(corrupt(pos, format!("lsn {lsn} after lsn {prev}")));
                }
                let at_ms = if whole {
                    decode(lsn, kind, payload)
                        .map_err(|why| corrupt(pos, why))?
                        .at_ms
                } else {
                    framed_at_ms(kind, payload).map_err(|why| corrupt(pos, why))?
                };
                out.newest_ms = out.newest_ms.max(at_ms);
                out.end = lsn;
                prev = lsn;
                pos = next;
            }
            Framed::Torn(why) if is_last => {
                out.cut = Some(format!(
                    "{}: torn record at offset {pos} ({why}) cut",
                    path.display()
                ));
                break;
            }
            Framed::Torn(why) | Framed::Bad(why) => return Err(corrupt(pos, why)),
        }
    }
    out.bytes = pos as u64;
    if pos < data.len() {
        let file = dir
            .fs()
            .open_write(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(pos as u64)
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(&path, e))?;
    }
    Ok(out)
}

/// The time of a record whose frame checked, without decoding its changes
/// (the first field of a changes record; a mark has none).
fn framed_at_ms(kind: u8, payload: &[u8]) -> std::result::Result<i64, String> {
    match kind {
        KIND_MARK if payload.is_empty() => Ok(0),
        KIND_MARK => Err("a mark record with a payload".into()),
        KIND_CHANGES => payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_le_bytes)
            .ok_or_else(|| format!("a changes record of {} bytes", payload.len())),
        k => Err(format!("unknown feed record kind {k}")),
    }
}

enum Framed<'a> {
    Record {
        lsn: u64,
        kind: u8,
        payload: &'a [u8],
        next: usize,
    },
    /// Cut short or failing its checksum: where a file ends, a write that
    /// did not finish.
    Torn(String),
    /// Impossible anywhere.
    Bad(String),
}

fn frame_at(data: &[u8], pos: usize) -> Framed<'_> {
    let Some(len) = le_u32(data, pos).map(|l| l as usize) else {
        return Framed::Torn("length cut short".into());
    };
    if len == 0 && data[pos..].iter().all(|&b| b == 0) {
        return Framed::Torn("zeros".into());
    }
    if !(9..=MAX_FEED_RECORD).contains(&len) {
        return Framed::Bad(format!("invalid record length {len}"));
    }
    let end = pos + FRAME_PREFIX + len;
    if end > data.len() {
        return Framed::Torn(format!(
            "record of {len} bytes, {} present",
            data.len() - pos - FRAME_PREFIX.min(data.len() - pos)
        ));
    }
    let crc = le_u32(data, pos + 4).unwrap_or(0);
    let body = &data[pos + FRAME_PREFIX..end];
    if crc32fast::hash(body) != crc {
        return Framed::Torn("checksum mismatch".into());
    }
    Framed::Record {
        lsn: le_u64(body, 0).unwrap_or(0),
        kind: body[8],
        payload: &body[9..],
        next: end,
    }
}

/// Why a reader cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The position asked for is no longer (or not yet) in the feed.
    Expired(String),
    /// The feed is off.
    Off,
    /// A file could not be read, or holds something that is not a record.
    Failed(String),
}

/// Reads the feed in order from a position, a piece at a time; the
/// caller waits on [`FeedShared::subscribe`] when it has caught up.
pub struct FeedReader {
    dir: DataDir,
    shared: Arc<FeedShared>,
    /// Every entry up to this lsn has been returned.
    after: u64,
    /// The file being read and the offset of its next record.
    at: Option<(u64, u64)>,
}

impl FeedReader {
    /// A reader of the entries after lsn `after`; refused when the feed no
    /// longer reaches back there, or has not reached it yet.
    pub fn new(
        dir: DataDir,
        shared: Arc<FeedShared>,
        after: u64,
    ) -> std::result::Result<Self, ReadError> {
        let view = shared.view();
        if !view.enabled {
            return Err(ReadError::Off);
        }
        check_position(&view, after)?;
        Ok(Self {
            dir,
            shared,
            after,
            at: None,
        })
    }

    /// The position: every entry up to it has been returned.
    pub fn position(&self) -> u64 {
        self.after
    }

    /// The next entries (changes only; marks move the position), up to about
    /// `max_bytes` of records; empty when the reader has caught up with the
    /// feed's end, which then becomes its position.
    pub fn next(&mut self, max_bytes: usize) -> std::result::Result<Vec<Arc<Entry>>, ReadError> {
        let view = self.shared.view();
        if !view.enabled {
            return Err(ReadError::Off);
        }
        check_position(&view, self.after)?;
        if let Some((entries, all)) = self.shared.ring_after(self.after, view.end, max_bytes) {
            // Caught up (or nearly): the newest entries, from memory. The
            // file position is found again if the reader ever falls behind.
            self.after = match (all, entries.last()) {
                (false, Some(e)) => e.lsn,
                _ => view.end,
            };
            self.at = None;
            return Ok(entries);
        }
        let mut out = Vec::new();
        let mut consumed = 0usize;
        let mut chunk = READ_CHUNK;
        loop {
            if self.after >= view.end {
                return Ok(out);
            }
            let (file, offset) = match self.at {
                Some(at) => at,
                None => {
                    check_position(&view, self.after)?;
                    let Some(&file) = view.files.iter().rev().find(|&&f| f <= self.after + 1)
                    else {
                        return Err(expired(&view, self.after));
                    };
                    (file, FEED_HEADER_LEN as u64)
                }
            };
            let path = self.dir.join(file_name(file));
            let data = match self.dir.fs().read_at(&path, offset, chunk) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(expired(&self.shared.view(), self.after));
                }
                Err(e) => return Err(ReadError::Failed(format!("{}: {e}", path.display()))),
            };
            let mut pos = 0usize;
            while pos < data.len() {
                match frame_at(&data, pos) {
                    Framed::Record {
                        lsn,
                        kind,
                        payload,
                        next,
                    } => {
                        if lsn > view.end {
                            // Written, not yet shown: a later call reads it.
                            self.at = Some((file, offset + pos as u64));
                            self.after = view.end;
                            return Ok(out);
                        }
                        self.take(lsn, kind, payload, &mut out, &path, offset + pos as u64)?;
                        consumed += next - pos;
                        pos = next;
                        self.at = Some((file, offset + pos as u64));
                        if consumed >= max_bytes && !out.is_empty() {
                            return Ok(out);
                        }
                    }
                    // Cut short by the read, or a write not finished.
                    Framed::Torn(_) => break,
                    Framed::Bad(why) => {
                        return Err(ReadError::Failed(format!(
                            "{} at offset {}: {why}",
                            path.display(),
                            offset + pos as u64
                        )));
                    }
                }
            }
            if pos > 0 {
                chunk = READ_CHUNK;
                continue;
            }
            let declared = le_u32(&data, 0).unwrap_or(0) as usize;
            if data.len() == chunk && FRAME_PREFIX + declared > chunk && declared <= MAX_FEED_RECORD
            {
                // One record longer than a read: read it whole.
                chunk = FRAME_PREFIX + declared;
                continue;
            }
            // The end of this file's records: on to the next file, if there
            // is one (this one is then complete).
            match view.files.iter().find(|&&f| f > file) {
                Some(&next_file) => {
                    self.after = self.after.max(next_file - 1);
                    self.at = Some((next_file, FEED_HEADER_LEN as u64));
                }
                None => {
                    // Every record up to the end shown has been read.
                    self.after = view.end;
                    return Ok(out);
                }
            }
        }
    }

    fn take(
        &mut self,
        lsn: u64,
        kind: u8,
        payload: &[u8],
        out: &mut Vec<Arc<Entry>>,
        path: &std::path::Path,
        offset: u64,
    ) -> std::result::Result<(), ReadError> {
        if lsn <= self.after {
            return Ok(());
        }
        let entry = decode(lsn, kind, payload).map_err(|why| {
            ReadError::Failed(format!("{} at offset {offset}: {why}", path.display()))
        })?;
        self.after = lsn;
        if !entry.changes.is_empty() {
            out.push(Arc::new(entry));
        }
        Ok(())
    }
}

fn expired(view: &FeedView, after: u64) -> ReadError {
    let mut msg = format!(
        "the change feed no longer holds the writes after lsn {after}: it begins after lsn {}",
        view.start.saturating_sub(1)
    );
    if let Some(r) = &view.restarted {
        msg.push_str(&format!(" (it started again {r})"));
    }
    msg.push_str("; resynchronise (read the members whole) and watch from the lsn of that read");
    ReadError::Expired(msg)
}

fn check_position(view: &FeedView, after: u64) -> std::result::Result<(), ReadError> {
    if after + 1 < view.start {
        return Err(expired(view, after));
    }
    if after > view.end {
        return Err(ReadError::Expired(format!(
            "lsn {after} is ahead of the store, whose last write is lsn {}: this store lost writes the watcher saw, or it is another store; resynchronise",
            view.end
        )));
    }
    Ok(())
}
