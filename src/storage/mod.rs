//! The storage engine: durable per-tag bitmaps over dense customer ids.
//!
//! A write becomes a logged [`record::Batch`] (WAL, fsynced before it is
//! acknowledged), is applied to the writer's state, and is published as an
//! immutable [`Snapshot`] that readers use without locks held for long.
//! Checkpoints turn a snapshot into an immutable segment file and a new
//! manifest, then drop the log they cover. On start the engine maps the
//! segments (bitmaps decode lazily) and replays the log after the checkpoint.
//!
//! This module knows nothing of gRPC or of the query language.
//!
//! Files (all in the data directory; `storage-format.md` has every byte):
//! `LOCK`, `MANIFEST`, `seg-*.seg`, `wal-*.log`.

pub mod checkpoint;
pub mod codec;
pub mod dictionary;
pub mod faults;
pub mod manifest;
pub mod record;
pub mod segment;
pub mod snapshot;
pub mod state;
pub mod wal;
pub mod writer;

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::clock::SharedClock;
use crate::error::{Error, Result};
pub use checkpoint::{CheckpointInfo, CheckpointOptions, CompactionPolicy};
use dictionary::{DictLayer, Dictionary};
use manifest::Manifest;
use record::{Batch, KIND_BATCH};
use segment::{BlobKind, Segment};
use snapshot::LazyBitmap;
pub use snapshot::{Field, FieldMap, FieldMeta, SlotMap, Snapshot, Tag, TagMap, TagMeta};
use state::State;
use wal::WalWriter;
use writer::{Cmd, Writer};
pub use writer::{EventTime, KeyIds, Mutation, ValueWrite, WriteOp, WriteResult};

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
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub sync: SyncMode,
    /// A checkpoint starts by itself once the log holds this many bytes.
    pub checkpoint_wal_bytes: u64,
    pub compaction: CompactionPolicy,
    /// What "now" and "today" are, for the engine and whoever serves it.
    pub clock: SharedClock,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            sync: SyncMode::Always,
            checkpoint_wal_bytes: 64 << 20,
            compaction: CompactionPolicy::default(),
            clock: crate::clock::system(),
        }
    }
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

/// What recovery found when the engine opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub checkpoint_lsn: u64,
    pub last_lsn: u64,
    pub records_replayed: u64,
    pub wal_bytes_read: u64,
    pub torn_tail: Option<String>,
    /// Segment files no manifest named, moved into [`ORPHANS_DIR`] (where
    /// they now are).
    pub orphans_moved: Vec<PathBuf>,
    pub duration: Duration,
}

/// State shared between the engine handle, the writer thread and readers.
pub(crate) struct Shared {
    pub config: EngineConfig,
    published: RwLock<Arc<Snapshot>>,
    pub info: Mutex<EngineInfo>,
    pub failed: Mutex<Option<String>>,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.published.read().clone()
    }

    pub fn publish(&self, snap: Arc<Snapshot>) {
        *self.published.write() = snap;
    }
}

/// Syncs a directory, so that file creations, renames and deletions in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// The storage engine. Reads go through [`Engine::snapshot`]; writes through
/// [`Engine::write`], which returns once the write is durable.
pub struct Engine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Cmd>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    recovery: RecoveryReport,
    _lock: File,
}

pub const LOCK_FILE: &str = "LOCK";
/// Where start-up moves files of the data directory that the store does not
/// name (a segment of a checkpoint that did not finish, or one copied in by
/// hand): a subdirectory of the data directory.
pub const ORPHANS_DIR: &str = "orphaned";

/// A data directory without `MANIFEST` is a new store, or one that never
/// finished a checkpoint: then its log, if any, starts at lsn 1 and holds
/// every write. Anything else means the manifest that described the store is
/// gone, and serving would serve an empty or partial store.
fn check_store_without_manifest(dir: &Path) -> Result<()> {
    let logs = wal::list(dir)?;
    let segs = segment::list(dir)?;
    let refuse = |what: String| {
        Err(Error::Recovery(format!(
            "{} is missing, but {what}. Refusing to start: a store is never served \
             without the manifest that describes it. Restore MANIFEST from a backup \
             of this store, or move the directory aside to start an empty store",
            dir.join(manifest::MANIFEST_FILE).display()
        )))
    };
    match logs.first() {
        Some(first) if first.first_lsn != 1 => refuse(format!(
            "the log starts at lsn {} ({}): the records before it are only in segment \
             files ({} found) that the manifest described",
            first.first_lsn,
            first.path.display(),
            segs.len()
        )),
        None if !segs.is_empty() => refuse(format!(
            "the directory holds {} segment file(s) (the first {}) and no log",
            segs.len(),
            dir.join(segment::file_name(segs[0])).display()
        )),
        _ => Ok(()),
    }
}

/// Moves `name` (a file of the data directory) into [`ORPHANS_DIR`], under a
/// name not taken there yet, and syncs both directories. Returns where it is.
fn move_aside(dir: &Path, name: &str) -> Result<PathBuf> {
    let from = dir.join(name);
    let aside = dir.join(ORPHANS_DIR);
    fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    let mut to = aside.join(name);
    let mut n = 1;
    while to.exists() {
        to = aside.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
    fsync_dir(&aside)?;
    fsync_dir(dir)?;
    tracing::warn!(
        from = %from.display(),
        to = %to.display(),
        "moved aside a segment file the manifest does not name (left by a checkpoint \
         that did not finish, or copied in); delete it once you know it is not needed"
    );
    Ok(to)
}

impl Engine {
    /// Opens (or creates) the store in `config.data_dir` and recovers it.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        let started = Instant::now();
        let dir = config.data_dir.clone();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked(dir)),
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        let mut report = RecoveryReport::default();
        let _ = fs::remove_file(dir.join(manifest::MANIFEST_TMP));

        let found = Manifest::read(&dir)?;
        if found.is_none() {
            check_store_without_manifest(&dir)?;
        }
        let mut manifest = found.unwrap_or_default();
        manifest.next_segment_no = manifest.next_segment_no.max(1);
        report.checkpoint_lsn = manifest.checkpoint_lsn;
        let mut segments = HashMap::new();
        for no in manifest.segments() {
            segments.insert(no, Segment::open(&dir, no)?);
        }
        // Segment files the manifest does not name; moved aside once the
        // store has recovered (never deleted: see `move_aside`).
        let strays: Vec<u64> = segment::list(&dir)?
            .into_iter()
            .filter(|no| !segments.contains_key(no))
            .collect();
        let manifest_path = dir.join(manifest::MANIFEST_FILE);
        let seg = |no: u64| -> Result<Arc<Segment>> {
            segments.get(&no).cloned().ok_or_else(|| {
                Error::corrupt(
                    &manifest_path,
                    0,
                    format!("refers to segment {no}, which is not open"),
                )
            })
        };
        let mut layers = Vec::new();
        for &no in &manifest.dict_segments {
            layers.push(Arc::new(DictLayer::open(seg(no)?)?));
        }
        let dict = Arc::new(Dictionary::new(layers, manifest.next_customer_id));
        let mut tags = TagMap::new();
        for t in &manifest.tags {
            let bitmap = if t.segment == 0 {
                LazyBitmap::empty()
            } else {
                let s = seg(t.segment)?;
                if !s.contains(BlobKind::TagShard, t.id) {
                    return Err(Error::corrupt(
                        &s.path,
                        0,
                        format!(
                            "segment holds no bitmap for tag {:?} (id {}) named by the manifest",
                            t.name, t.id
                        ),
                    ));
                }
                LazyBitmap::on_disk(s, BlobKind::TagShard, t.id)
            };
            let name: Arc<str> = Arc::from(t.name.as_str());
            let meta = TagMeta {
                name: name.clone(),
                description: t.description.clone(),
                category: t.category.clone(),
                created_ms: t.created_ms,
                updated_ms: t.updated_ms,
                count: t.count,
            };
            tags.insert(
                name,
                Arc::new(Tag {
                    id: t.id,
                    meta,
                    bitmap,
                }),
            );
        }
        let mut fields = FieldMap::new();
        for f in &manifest.fields {
            let mut slots = SlotMap::new();
            for &(slot, no) in &f.slots {
                let s = seg(no)?;
                if s.slot_entries(f.id, slot).is_empty() {
                    return Err(Error::corrupt(
                        &s.path,
                        0,
                        format!(
                            "segment holds no slot {slot} of field {:?} (id {}) named by the manifest",
                            f.name, f.id
                        ),
                    ));
                }
                slots.insert(
                    slot,
                    LazyBitmap::on_disk_slot(s, BlobKind::FieldSlot, f.id, slot),
                );
            }
            let name: Arc<str> = Arc::from(f.name.as_str());
            let meta = FieldMeta {
                name: name.clone(),
                description: f.description.clone(),
                category: f.category.clone(),
                kind: f.kind.clone(),
                created_ms: f.created_ms,
                updated_ms: f.updated_ms,
            };
            fields.insert(
                name,
                Arc::new(Field {
                    id: f.id,
                    meta,
                    slots,
                }),
            );
        }
        let live = if manifest.live_segment == 0 {
            LazyBitmap::empty()
        } else {
            LazyBitmap::on_disk(seg(manifest.live_segment)?, BlobKind::LiveShard, 0)
        };
        let snap = Snapshot {
            lsn: manifest.checkpoint_lsn,
            tags,
            fields,
            live,
            next_customer_id: manifest.next_customer_id,
            next_tag_id: manifest.next_tag_id,
            dict,
        };
        let mut state = State::new(snap);

        let files = wal::list(&dir)?;
        let outcome = wal::replay(&files, manifest.checkpoint_lsn, |lsn, kind, payload| {
            if kind != KIND_BATCH {
                return Err(Error::BadRecord(format!("unknown record kind {kind}")));
            }
            let batch = Batch::decode(payload).map_err(|e| {
                Error::BadRecord(format!(
                    "undecodable batch at payload offset {}: {}",
                    e.offset, e.reason
                ))
            })?;
            state.apply(lsn, &batch).map(|_| ())
        })?;
        if let Some(t) = &outcome.truncated {
            tracing::warn!("recovery cut a torn log tail: {t}");
        }
        let last_lsn = outcome.last_lsn.unwrap_or(0).max(manifest.checkpoint_lsn);
        state.snap.lsn = last_lsn;
        report.last_lsn = last_lsn;
        report.records_replayed = outcome.applied;
        report.wal_bytes_read = outcome.bytes;
        report.torn_tail = outcome.truncated;

        // The store is established (manifest, segments and the whole log
        // agree): only now is anything it does not name moved out of the way.
        for no in strays {
            report
                .orphans_moved
                .push(move_aside(&dir, &segment::file_name(no))?);
        }

        let wal = WalWriter::create(&dir, last_lsn + 1)?;
        let old_wal_bytes: u64 = wal::list(&dir)?
            .iter()
            .filter(|f| f.first_lsn != wal.first_lsn())
            .filter_map(|f| fs::metadata(&f.path).ok())
            .map(|m| m.len())
            .sum();
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
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer::new(
            shared.clone(),
            state,
            wal,
            old_wal_bytes,
            manifest,
            segments,
            rx,
            tx.clone(),
        );
        let watched = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tagstore-writer".into())
            .spawn(move || {
                // Should the writer ever panic, later writes must say so, not
                // that the server is shutting down.
                let run = std::panic::AssertUnwindSafe(|| writer.run());
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown cause".into());
                    let msg = format!("the writer thread stopped: {why}");
                    watched.failed.lock().get_or_insert(msg);
                }
            })
            .map_err(|e| Error::io(&dir, e))?;
        report.duration = started.elapsed();
        Ok(Engine {
            shared,
            tx,
            writer: Mutex::new(Some(handle)),
            recovery: report,
            _lock: lock,
        })
    }

    /// The newest published state.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
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

    /// Why the writer no longer answers: the failure it recorded, or shutdown.
    fn gone(&self) -> Error {
        match self.failure() {
            Some(msg) => Error::Failed(msg),
            None => Error::ShuttingDown,
        }
    }

    /// Applies a write; returns once it is durable (per the sync mode) and visible.
    pub async fn write(&self, op: WriteOp) -> Result<WriteResult> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Write(op, tx))?;
        rx.await.map_err(|_| self.gone())?
    }

    /// [`Engine::write`] for callers outside an async runtime.
    pub fn write_blocking(&self, op: WriteOp) -> Result<WriteResult> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Write(op, tx))?;
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
