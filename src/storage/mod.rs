//! The storage engine: durable per-tag bitmaps over dense customer ids.
//!
//! A write becomes a logged [`record::Batch`] (WAL, fsynced before it is
//! acknowledged), is applied to the writer's state, and is published as an
//! immutable [`Snapshot`] that readers use without locks held for long.
//! Checkpoints turn a snapshot into an immutable segment file and a new
//! manifest, then drop the log they cover. On start the engine maps the
//! segments (bitmaps decode lazily) and replays the log after the checkpoint.
//!
//! This module knows nothing of gRPC or of the query language. Its rooms:
//!
//! - the files, one module per kind: [`wal`] (log files: framing, appending,
//!   syncing, replaying), [`segment`], [`manifest`], [`dictionary`] (key
//!   sections read in place), [`record`] (what a log record means), [`codec`];
//! - [`datadir`]: the directory as a place (its file system, lock,
//!   directory fsync, moving strays aside), and [`fs`]: the file layer,
//!   real ([`fs::OsFs`]) or in memory with failures and crashes on demand
//!   ([`fs::MemFs`], for tests);
//! - [`recovery`]: the recovery rules of `storage-format.md`, step by step;
//! - `resolve`: key look-ups of large updates, before the writer, in parallel;
//! - [`state`] (the one apply function, for writes and replay),
//!   [`snapshot`] (what readers see), [`writer`] (planning, group commit,
//!   checkpoint scheduling), [`checkpoint`] (a snapshot into a segment).
//!
//! Files (all in the data directory; `storage-format.md` has every byte):
//! `LOCK`, `MANIFEST`, `seg-*.seg`, `wal-*.log`, and `orphaned/`.

pub mod archive;
pub mod backup;
pub mod checkpoint;
pub mod codec;
pub mod datadir;
pub mod dictionary;
pub mod feed;
pub mod fs;
pub mod history;
pub mod manifest;
pub mod merges;
pub mod meters;
pub mod record;
pub mod recovery;
mod resolve;
pub mod seen;
pub mod segment;
pub mod snapshot;
pub mod state;
pub mod versions;
pub mod wal;
pub mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::clock::SharedClock;
use crate::error::{Error, Result};
pub use checkpoint::{CheckpointInfo, CheckpointOptions, CompactionPolicy};
pub use datadir::{DataDir, LOCK_FILE, ORPHANS_DIR};
use recovery::Recovered;
pub use recovery::RecoveryReport;
pub use snapshot::{Field, FieldMap, FieldMeta, SlotMap, Snapshot, Tag, TagMap, TagMeta};
pub use writer::unmerge::{Undoable, splittable, undoable};
use writer::{Cmd, Writer};
pub use writer::{
    Combine, EventTime, IngestRecord, KeptEvent, KeyIds, MAX_AUDIENCE_QUERY_BYTES, Mutation,
    UNMERGE_REVIVED, UNMERGE_SURVIVOR, UnmergeOf, ValueWrite, WriteOp, WriteResult,
};

/// Writes naming at most this many customer keys have them checked on the
/// caller's thread: 1,000 keys take about 10 µs (a million of 16 bytes took
/// 9 ms, of 256 bytes 14 ms), less than a hand-off to the blocking pool.
pub const CHECK_INLINE_KEYS: usize = 1_000;

/// When the log is synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// fsync before every acknowledgement (concurrent writers share one). The default.
    Always,
    /// Never fsync: an acknowledged write can be lost if the machine (not just
    /// the process) crashes. For bulk loads that can be redone.
    Never,
}

/// Engine settings.
/// A write queued by [`Engine::enqueue`], not yet answered.
pub struct Queued(oneshot::Receiver<Result<WriteResult>>);

impl Queued {
    /// The write's answer. Cancel-safe: dropped before the answer comes,
    /// it can be awaited again.
    pub async fn answer(&mut self) -> Result<WriteResult> {
        (&mut self.0)
            .await
            .map_err(|_| Error::Failed("the writer stopped before answering this write".into()))?
    }
}

/// The default of [`EngineConfig::dedup_days`].
pub const DEFAULT_DEDUP_DAYS: u32 = 30;
/// The default of [`EngineConfig::event_retention_days`]: two years, so
/// that a year's facts can be rebuilt a year later.
pub const DEFAULT_EVENT_RETENTION_DAYS: u32 = 730;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    /// A checkpoint starts by itself once the log holds this many bytes.
    pub checkpoint_wal_bytes: u64,
    pub compaction: CompactionPolicy,
    /// How long the change feed is kept (`retention_bytes` 0: no feed).
    pub feed: feed::FeedConfig,
    /// What "now" and "today" are, for the engine and whoever serves it.
    pub clock: SharedClock,
    /// Where the files live: the real disk, or memory in tests.
    pub fs: Arc<dyn fs::FileSystem>,
    /// Days an ingested event's id is remembered after the day it was
    /// ingested (UTC): the same event sent again within them is not applied
    /// twice. Older days are forgotten at the next checkpoint.
    pub dedup_days: u32,
    /// Days ingested events stay in the event archive after they were
    /// ingested (a whole archive file goes once its newest event is past
    /// them, at a checkpoint); 0 keeps them for ever.
    pub event_retention_days: u32,
    /// OneID's guard rails: identity types that never merge, blocked
    /// identities, the cap per type, the priority that names a customer.
    pub oneid: writer::identify::OneIdRules,
    /// IANA time zone whose local day `TODAY` means in queries, and the
    /// zone of rules defined without one.
    pub time_zone: String,
    /// Days the store's past is kept for reads `AS OF` a day or a log
    /// position (a version a day, the segments it names and the log since
    /// the oldest); 0 keeps none (and drops what was kept at the next
    /// checkpoint).
    pub history_days: u32,
    /// A version of the store is also kept once this many bytes of log
    /// have been written since the newest (besides the first checkpoint of
    /// each local day): a read of the past replays at most about this much.
    pub history_version_bytes: u64,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            sync: SyncMode::Always,
            checkpoint_wal_bytes: 64 << 20,
            compaction: CompactionPolicy::default(),
            clock: crate::clock::system(),
            fs: fs::os(),
            dedup_days: DEFAULT_DEDUP_DAYS,
            event_retention_days: DEFAULT_EVENT_RETENTION_DAYS,
            oneid: Default::default(),
            time_zone: crate::fields::DEFAULT_TIME_ZONE.to_string(),
            history_days: versions::DEFAULT_HISTORY_DAYS,
            history_version_bytes: versions::DEFAULT_VERSION_BYTES,
            feed: feed::FeedConfig::default(),
        }
    }
}

/// What [`Engine::read_archive`] read.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchiveRead {
    /// The archive holds the events of log records up to this lsn.
    pub upto_lsn: u64,
    /// Events ingested at or before this time were dropped by retention
    /// (0: none were).
    pub dropped_to_ms: i64,
    pub files: usize,
    /// Events passed on.
    pub events: u64,
}

/// Figures the writer keeps up to date for `Stats`.
#[derive(Debug, Clone, Default)]
pub struct EngineInfo {
    pub wal_bytes: u64,
    pub last_checkpoint_lsn: u64,
    pub last_checkpoint_at_ms: i64,
    pub segment_files: u64,
    /// Dictionary sections that key look-ups probe.
    pub dictionary_sections: u64,
}

/// State shared between the engine handle, the writer thread and readers.
pub(crate) struct Shared {
    pub config: EngineConfig,
    published: RwLock<Arc<Snapshot>>,
    pub info: Mutex<EngineInfo>,
    pub failed: Mutex<Option<String>>,
    /// Where the change feed stands, for its readers.
    pub feed: Arc<feed::FeedShared>,
    /// Held while a checkpoint deletes the files its manifest no longer
    /// names, and while a backup opens the files it copies (once open,
    /// deleting them does the backup no harm).
    pub files: Mutex<()>,
    /// What the engine counts and times, for operators.
    pub meters: Arc<meters::Meters>,
    /// The kept versions of the store's past (the writer keeps them).
    pub versions: Mutex<Vec<versions::VersionMark>>,
    /// The past states read most recently.
    pub past: versions::read::PastCache,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.read().clone()
    }

    pub fn publish(&self, snap: Arc<Snapshot>) {
        *self.published.write() = snap;
        self.meters.published();
    }
}

/// The storage engine. Reads go through [`Engine::snapshot`]; writes through
/// [`Engine::write`], which returns once the write is durable.
pub struct Engine {
    shared: Arc<Shared>,
    /// The writer, for a small write to commit on its caller's thread when
    /// it is idle.
    core: Arc<writer::Core>,
    tx: mpsc::Sender<Cmd>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    recovery: RecoveryReport,
    _lock: fs::LockGuard,
}

impl Engine {
    /// Opens (or creates) the store in `config.data_dir` and recovers it.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        let started = Instant::now();
        let dir = DataDir::new(config.fs.clone(), config.data_dir.clone());
        let lock = datadir::lock(&dir)?;
        let feed_shared = feed::FeedShared::new();
        let zone = crate::fields::time::zone(&config.time_zone)
            .map_err(|e| Error::Config(format!("time_zone: {e}")))?;
        let Recovered {
            mut state,
            manifest,
            segments,
            wal,
            old_wal_bytes,
            mut report,
            feed,
            versions,
        } = recovery::recover(&dir, config.feed, feed_shared.clone())?;
        state.snap.zone = zone;
        let info = EngineInfo {
            wal_bytes: old_wal_bytes + wal.bytes(),
            last_checkpoint_lsn: manifest.checkpoint_lsn,
            last_checkpoint_at_ms: manifest.checkpoint_at_ms,
            segment_files: segments.len() as u64,
            dictionary_sections: manifest.dict_segments.len() as u64,
        };
        let shared = Arc::new(Shared {
            config,
            published: RwLock::new(Arc::new(state.snap.clone())),
            info: Mutex::new(info),
            failed: Mutex::new(None),
            feed: feed_shared,
            files: Mutex::new(()),
            meters: Arc::default(),
            versions: Mutex::new(versions.marks()),
            past: Default::default(),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(
            shared.clone(),
            state,
            wal,
            old_wal_bytes,
            manifest,
            segments,
            tx.clone(),
            feed,
            versions,
        );
        let core = Arc::new(writer::Core::new(writer));
        let runs = core.clone();
        let handle = std::thread::Builder::new()
            .name("tagstore-writer".into())
            .spawn(move || runs.run(rx))
            .map_err(|e| Error::io(dir.path(), e))?;
        report.duration = started.elapsed();
        Ok(Engine {
            shared,
            core,
            tx,
            writer: Mutex::new(Some(handle)),
            recovery: report,
            _lock: lock,
        })
    }

    /// A reader of the change feed from the write after lsn `after`;
    /// refused when the feed is off or no longer (or not yet) reaches there.
    /// Its reads block: call them off the async runtime.
    pub fn feed_reader(
        &self,
        after: u64,
    ) -> std::result::Result<feed::FeedReader, feed::ReadError> {
        let config = &self.shared.config;
        feed::FeedReader::new(
            DataDir::new(config.fs.clone(), config.data_dir.clone()),
            self.shared.feed.clone(),
            after,
        )
    }

    /// The feed's entries after lsn `after` and its end, when memory still
    /// holds all of them (no file is read): for following the feed's
    /// newest writes cheaply.
    pub fn feed_recent(&self, after: u64) -> Option<(Vec<Arc<feed::Entry>>, u64)> {
        self.shared.feed.recent(after)
    }

    /// Where the change feed stands.
    pub fn feed_view(&self) -> feed::FeedView {
        self.shared.feed.view()
    }

    /// A signal that changes whenever the change feed's end moves.
    pub fn feed_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.feed.subscribe()
    }

    /// How many follow [`Engine::feed_signal`] now: the server's watch hub
    /// while it has watchers, none otherwise (a write then wakes nobody).
    pub fn feed_followers(&self) -> usize {
        self.shared.feed.followers()
    }

    /// Opens what a backup copies: the manifest on disk, the files it
    /// names, and the log up to the newest published write (see
    /// [`backup::Source`]). Quick (files are opened, not read); writes and
    /// checkpoints go on meanwhile and after.
    pub fn backup_source(&self) -> Result<backup::Source> {
        let config = &self.shared.config;
        let dir = DataDir::new(config.fs.clone(), config.data_dir.clone());
        let _held = self.shared.files.lock();
        backup::Source::take(&dir, || self.shared.snapshot().lsn, self.now_ms())
    }

    /// The store as it was at the end of a past local day or at a past
    /// log position (see [`versions::read`]). Blocks while it reads the
    /// version and the log (call it off the async runtime).
    pub fn as_of(&self, at: versions::read::AsOf) -> Result<versions::read::Past> {
        let config = &self.shared.config;
        let dir = DataDir::new(config.fs.clone(), config.data_dir.clone());
        versions::read::open(&self.shared, &dir, at)
    }

    /// The kept versions of the store's past, oldest first, and the bytes
    /// the history holds on disk.
    pub fn history(&self) -> (Vec<versions::VersionMark>, u64) {
        let config = &self.shared.config;
        let dir = DataDir::new(config.fs.clone(), config.data_dir.clone());
        let marks = self.shared.versions.lock().clone();
        (marks, versions::disk_bytes(&dir))
    }

    /// What the engine counts and times (log syncs, checkpoints, writes,
    /// the snapshot's age), for operators.
    pub fn meters(&self) -> &meters::Meters {
        &self.shared.meters
    }

    /// The newest published state.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Bytes of the files in the data directory.
    pub fn disk_bytes(&self) -> u64 {
        let config = &self.shared.config;
        datadir::disk_bytes(&DataDir::new(config.fs.clone(), config.data_dir.clone()))
    }

    /// Reads the archived events of `customers`, as the last checkpoint
    /// left the archive, through `f(customer, event bytes)`, file by file
    /// in the order they were ingested. Blocking (it decompresses): call it
    /// off the async runtime. A file that cannot be read is an error naming
    /// it.
    pub fn read_archive(
        &self,
        customers: &roaring::RoaringBitmap,
        mut f: impl FnMut(u32, &[u8]) -> Result<()>,
    ) -> Result<ArchiveRead> {
        let list = self.snapshot().archive.clone();
        let config = &self.shared.config;
        let dir = DataDir::new(config.fs.clone(), config.data_dir.clone());
        let mut events = 0;
        for a in &list.files {
            let file = archive::ArchiveFile::open(&dir, a.no)?;
            events += file.for_each(Some(customers), &mut f)?;
        }
        Ok(ArchiveRead {
            upto_lsn: list.upto_lsn,
            dropped_to_ms: list.dropped_to_ms,
            files: list.files.len(),
            events,
        })
    }

    /// Now, by the engine's clock (Unix ms): what reads should take as the
    /// moment they are asked.
    pub fn now_ms(&self) -> i64 {
        self.shared.config.clock.now_ms()
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn info(&self) -> EngineInfo {
        self.shared.info.lock().clone()
    }

    /// Why the engine stopped accepting writes, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().clone()
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.tx.send(cmd).map_err(|_| self.gone())
    }

    /// Sends a write to the writer's thread, counted as queued until it is
    /// committed (see `writer::thread`).
    fn send_write(&self, op: WriteOp, reply: oneshot::Sender<Result<WriteResult>>) -> Result<()> {
        self.core.queue();
        self.send(Cmd::Write(op, reply))
            .inspect_err(|_| self.core.unqueue())
    }

    /// Why the writer no longer answers: the failure it recorded, or shutdown.
    fn gone(&self) -> Error {
        match self.failure() {
            Some(msg) => Error::Failed(msg),
            None => Error::ShuttingDown,
        }
    }

    /// Applies a write; returns once it is durable (per the sync mode) and visible.
    /// Customer keys are checked here, and only here
    /// ([`WriteOp::check_keys`]): on the caller's thread, or for a write of
    /// more than [`CHECK_INLINE_KEYS`] keys on the blocking pool, so that the
    /// largest update (a million keys, 9 to 14 ms) does not hold the
    /// thread that serves connections. A small update or setting of values
    /// that finds the writer idle, with nothing queued and no other writes
    /// lately, is committed on the caller's thread (on a multi-threaded
    /// runtime's worker only): no hand-off to the writer's thread and back
    /// (see `writer::thread`).
    pub async fn write(&self, op: WriteOp) -> Result<WriteResult> {
        let op = if op.key_count() > CHECK_INLINE_KEYS {
            tokio::task::spawn_blocking(move || op.check_keys().map(|()| op))
                .await
                .map_err(|e| Error::Internal(format!("key check task failed: {e}")))??
        } else {
            op.check_keys()?;
            op
        };
        if let Some(idle) = self.core.idle_for(&op) {
            return idle.commit(op);
        }
        let (tx, rx) = oneshot::channel();
        self.send_write(op, tx)?;
        rx.await.map_err(|_| self.gone())?
    }

    /// An [`WriteOp::Update`]: a large one has its keys looked up on the
    /// calling task (and a pool thread) before it reaches the writer, so that
    /// many clients' look-ups run in parallel.
    pub async fn update(
        &self,
        mutations: Vec<Mutation>,
        create_missing_tags: bool,
    ) -> Result<WriteResult> {
        let mutations = resolve::before_writer(mutations, self.snapshot()).await?;
        self.write(WriteOp::Update {
            mutations,
            create_missing_tags,
        })
        .await
    }

    /// Queues a write now and returns where its answer will arrive (await
    /// it with [`Engine::answer`]). Writes one caller queues one after
    /// another are applied in that order, whenever their answers are
    /// awaited: for streams whose batches must not overtake one another.
    /// Keys are checked here, on the caller's thread.
    pub fn enqueue(&self, op: WriteOp) -> Result<Queued> {
        op.check_keys()?;
        let (tx, rx) = oneshot::channel();
        self.send_write(op, tx)?;
        Ok(Queued(rx))
    }

    /// The answer of a write queued by [`Engine::enqueue`].
    pub async fn answer(&self, queued: Queued) -> Result<WriteResult> {
        queued.0.await.map_err(|_| self.gone())?
    }

    /// [`Engine::write`] for callers outside an async runtime.
    pub fn write_blocking(&self, op: WriteOp) -> Result<WriteResult> {
        op.check_keys()?;
        let (tx, rx) = oneshot::channel();
        self.send_write(op, tx)?;
        rx.blocking_recv().map_err(|_| self.gone())?
    }

    /// Writes a checkpoint covering every write acknowledged before the call.
    pub async fn checkpoint(&self, options: CheckpointOptions) -> Result<CheckpointInfo> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Checkpoint(options, tx))?;
        rx.await.map_err(|_| self.gone())?
    }

    /// [`Engine::checkpoint`] for callers outside an async runtime.
    pub fn checkpoint_blocking(&self, options: CheckpointOptions) -> Result<CheckpointInfo> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Checkpoint(options, tx))?;
        rx.blocking_recv().map_err(|_| self.gone())?
    }

    /// Finishes queued writes, writes a final checkpoint and stops the writer.
    /// Blocks; later writes fail with `ShuttingDown`.
    pub fn shutdown(&self) -> Result<()> {
        let Some(handle) = self.writer.lock().take() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel();
        let res = match self.send(Cmd::Shutdown(tx)) {
            Ok(()) => rx.recv().unwrap_or(Err(Error::ShuttingDown)),
            Err(e) => Err(e),
        };
        let _ = handle.join();
        res
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "shutdown after drop failed; the log keeps every write");
        }
    }
}
