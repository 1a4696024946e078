//! Recovery: establishes what the store in a data directory is, following
//! the recovery rules of `storage-format.md` step by step, and hands the
//! engine the state to serve from. Reads the manifest, segments and log;
//! writes only what the rules allow (a torn log tail cut off, strays moved
//! aside once the store is established, a new log file). Takes no lock
//! (the engine has taken it) and starts no thread.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::storage::archive::{self, ArchiveFile};
use crate::storage::datadir::{DataDir, fsync_dir, move_aside};
use crate::storage::dictionary::{DictLayer, Dictionary, Identities};
use crate::storage::feed::{self, FeedConfig, FeedShared, FeedWriter};
use crate::storage::manifest::{self, Manifest};
use crate::storage::merges::MergeLog;
use crate::storage::record::Batch;
use crate::storage::seen;
use crate::storage::segment::{self, BlobKind, Segment};
use crate::storage::snapshot::{
    ArchiveList, AudienceMap, AudienceMeta, AudienceSnapshot, LazyBitmap, PositionMap, RejectMap,
    SnapshotMap, SourceMap, SourceMeta,
};
use crate::storage::state::State;
use crate::storage::versions::{self, Versions};
use crate::storage::wal::{self, WalWriter};
use crate::storage::{Field, FieldMap, FieldMeta, SlotMap, Snapshot, Tag, TagMap, TagMeta};

/// What recovery found when the engine opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub checkpoint_lsn: u64,
    pub last_lsn: u64,
    pub records_replayed: u64,
    pub wal_bytes_read: u64,
    pub torn_tail: Option<String>,
    /// Segment files no manifest named, moved into [`ORPHANS_DIR`](crate::storage::ORPHANS_DIR) (where
    /// they now are).
    pub orphans_moved: Vec<PathBuf>,
    /// What recovery cut from the change feed, or why it started again.
    pub feed_note: Option<String>,
    pub duration: Duration,
}

/// What the engine starts from.
pub(crate) struct Recovered {
    pub state: State,
    pub manifest: Manifest,
    pub segments: HashMap<u64, Arc<Segment>>,
    /// The new log file, for the writes to come.
    pub wal: WalWriter,
    /// Bytes of the older log files still in the directory.
    pub old_wal_bytes: u64,
    pub report: RecoveryReport,
    pub feed: FeedWriter,
    pub versions: Versions,
}

/// A data directory without `MANIFEST` is a new store, or one that never
/// finished a checkpoint: then its log, if any, starts at lsn 1 and holds
/// every write. Anything else means the manifest that described the store is
/// gone, and serving would serve an empty or partial store.
fn check_store_without_manifest(dir: &DataDir) -> Result<()> {
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

/// Recovers the store in `dir` (locked by the caller), by the rules of
/// `storage-format.md`.
pub(crate) fn recover(
    dir: &DataDir,
    feed_config: FeedConfig,
    feed_shared: Arc<FeedShared>,
) -> Result<Recovered> {
    let dir = dir.clone();
    let mut report = RecoveryReport::default();
    // Step 1, the lock, is the engine's. Step 2: a manifest write that did not finish.
    let _ = dir.fs().remove(&dir.join(manifest::MANIFEST_TMP));

    // Step 3: the manifest, or proof that the store never had one.
    let found = Manifest::read(&dir)?;
    if found.is_none() {
        check_store_without_manifest(&dir)?;
    }
    let mut manifest = found.unwrap_or_default();
    manifest.next_segment_no = manifest.next_segment_no.max(1);
    report.checkpoint_lsn = manifest.checkpoint_lsn;
    let mut segments = HashMap::new();
    // Step 4: every segment the manifest names, checked; strays noted.
    for no in manifest.segments() {
        segments.insert(no, Segment::open(&dir, no)?);
    }
    // Segment files the manifest does not name; moved aside once the
    // store has recovered (never deleted: see `move_aside`).
    let strays: Vec<u64> = segment::list(&dir)?
        .into_iter()
        .filter(|no| !segments.contains_key(no))
        .collect();
    // Archive files: those named are opened (their index checked), so a
    // damaged or missing one is known from the start; the store serves
    // without them (only a rebuild of facts reads them, and it names the
    // file). Those not named are strays too.
    for a in &manifest.archives {
        if let Err(e) = ArchiveFile::open(&dir, a.no) {
            tracing::error!(error = %e, "an event archive file the manifest names cannot be read; facts of its events cannot be rebuilt");
        }
    }
    // The kept versions of the past (never needed to start: one that
    // cannot be read is logged and passed over).
    let versions = Versions::load(&dir)?;
    let archive_strays: Vec<u64> = archive::list(&dir)?
        .into_iter()
        .filter(|no| !manifest.archives.iter().any(|a| a.no == *no))
        .collect();
    let manifest_path = dir.join(manifest::MANIFEST_FILE);
    let mut state = state_of(&manifest, &manifest_path, &segments, true)?;

    // Steps 6 to 8: the log replayed after the checkpoint, in lsn order, a
    // torn tail cut, any other damage a hard error naming its file.
    let files = wal::list(&dir)?;
    state.feed_on = feed_config.enabled();
    let mut entries: Vec<feed::Entry> = Vec::new();
    let outcome = wal::replay(
        &dir,
        &files,
        manifest.checkpoint_lsn,
        |lsn, kind, payload| {
            let batch = Batch::from_record(kind, payload)?;
            state.apply(lsn, &batch)?;
            if !state.feed.is_empty() {
                entries.push(feed::Entry {
                    lsn,
                    at_ms: batch.at_ms,
                    changes: std::mem::take(&mut state.feed),
                });
            }
            Ok(())
        },
    )?;
    if let Some(t) = &outcome.truncated {
        tracing::warn!("recovery cut a torn log tail: {t}");
    }
    let last_lsn = outcome.last_lsn.unwrap_or(0).max(manifest.checkpoint_lsn);
    state.snap.lsn = last_lsn;
    report.last_lsn = last_lsn;
    report.records_replayed = outcome.applied;
    report.wal_bytes_read = outcome.bytes;
    report.torn_tail = outcome.truncated;

    // Step 8½: the store is established (manifest, segments and the whole
    // log agree); only now is anything it does not name moved out of the way.
    for no in strays {
        let name = segment::file_name(no);
        if versions.names(no) {
            // Left by a checkpoint that ended before moving it into the
            // history, where a kept version needs it.
            versions::retire(&dir, &dir.join(&name))?;
            fsync_dir(&versions::history_dir(&dir))?;
            fsync_dir(&dir)?;
            continue;
        }
        report.orphans_moved.push(move_aside(&dir, &name)?);
    }
    for no in archive_strays {
        report
            .orphans_moved
            .push(move_aside(&dir, &archive::file_name(no))?);
    }

    // Step 8¾: the change feed, its torn tail cut and the writes it lacks
    // appended again from the log.
    let (feed, feed_report) = FeedWriter::recover(
        &dir,
        feed_config,
        feed_shared,
        manifest.checkpoint_lsn,
        last_lsn,
        &entries,
    )?;
    drop(entries);
    if let Some(note) = &feed_report.note {
        tracing::warn!("change feed: {note}");
    }
    report.feed_note = feed_report.note;

    // Step 9: a new log file for the writes to come.
    let wal = WalWriter::create(&dir, last_lsn + 1)?;
    let old_wal_bytes: u64 = wal::list(&dir)?
        .iter()
        .filter(|f| f.first_lsn != wal.first_lsn())
        .map(|f| f.len)
        .sum();
    Ok(Recovered {
        state,
        manifest,
        segments,
        wal,
        old_wal_bytes,
        report,
        feed,
        versions,
    })
}

/// The state a manifest describes (its segments open in `segments`, the
/// manifest read from `manifest_path`, named in errors): tags, fields and
/// the rest named, bitmaps left on disk until first use. With `seen`, the
/// remembered event ids too (the writer's; a past version read for `AS OF`
/// needs none).
pub(crate) fn state_of(
    manifest: &Manifest,
    manifest_path: &std::path::Path,
    segments: &HashMap<u64, Arc<Segment>>,
    seen: bool,
) -> Result<State> {
    let seg = |no: u64| -> Result<Arc<Segment>> {
        segments.get(&no).cloned().ok_or_else(|| {
            Error::corrupt(
                manifest_path,
                0,
                format!("refers to segment {no}, which is not open"),
            )
        })
    };
    // Step 5: dictionary sections opened (pages checked on use); bitmaps
    // named, not read.
    let mut layers = Vec::new();
    for &no in &manifest.dict_segments {
        layers.push(Arc::new(DictLayer::open(seg(no)?)?));
    }
    let dict = Arc::new(Dictionary::new(layers, manifest.next_customer_id));
    let mut ident_layers = Vec::new();
    for &no in &manifest.ident_segments {
        ident_layers.push(Arc::new(DictLayer::open_identities(seg(no)?)?));
    }
    let idents = Arc::new(Identities::new(ident_layers));
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
            merge: f.merge,
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
    let mut sources = SourceMap::new();
    let mut positions = PositionMap::new();
    let mut rejects = RejectMap::new();
    for s in &manifest.sources {
        let name: Arc<str> = Arc::from(s.name.as_str());
        if !s.rejects.is_empty() {
            rejects.insert(name.clone(), Arc::new(s.rejects.iter().cloned().collect()));
        }
        if !s.positions.is_empty() {
            positions.insert(
                name.clone(),
                Arc::new(
                    s.positions
                        .iter()
                        .map(|(topic, partition, next)| ((topic.clone(), *partition), *next))
                        .collect(),
                ),
            );
        }
        sources.insert(
            name.clone(),
            Arc::new(SourceMeta {
                name,
                definition: s.definition.clone(),
                created_ms: s.created_ms,
                updated_ms: s.updated_ms,
                paused: s.paused,
            }),
        );
    }
    let mut audiences = AudienceMap::new();
    for a in &manifest.audiences {
        let name: Arc<str> = Arc::from(a.name.as_str());
        audiences.insert(
            name.clone(),
            Arc::new(AudienceMeta {
                name,
                query: a.query.clone(),
                description: a.description.clone(),
                owner: a.owner.clone(),
                category: a.category.clone(),
                uses: a.uses.clone(),
                created_ms: a.created_ms,
                updated_ms: a.updated_ms,
            }),
        );
    }
    let mut rules = crate::storage::snapshot::RuleSet::default();
    for r in &manifest.rules {
        let name: Arc<str> = Arc::from(r.name.as_str());
        rules.by_name.insert(
            name.clone(),
            Arc::new(crate::storage::snapshot::Rule {
                name,
                def: r.def.clone(),
                day: r.day,
                created_ms: r.created_ms,
                updated_ms: r.updated_ms,
                stale: r.stale.clone(),
            }),
        );
    }
    rules.order = crate::rules::order(&rules.by_name);
    // Audience snapshots: members read from their segment when first used;
    // snapshots sharing members share one bitmap.
    let mut snapshots = SnapshotMap::new();
    let mut blobs: HashMap<(u64, u32), LazyBitmap> = HashMap::new();
    for m in &manifest.snapshots {
        let members = match blobs.get(&(m.segment, m.blob)) {
            Some(b) => b.clone(),
            None if m.segment == 0 => LazyBitmap::empty(),
            None => {
                let b = LazyBitmap::on_disk(seg(m.segment)?, BlobKind::SnapshotShard, m.blob);
                blobs.insert((m.segment, m.blob), b.clone());
                b
            }
        };
        snapshots.insert(
            m.id,
            Arc::new(AudienceSnapshot {
                id: m.id,
                audience: m.audience.clone(),
                query: m.query.clone(),
                taken_lsn: m.taken_lsn,
                at_ms: m.at_ms,
                note: m.note.clone(),
                count: m.count,
                members,
                blob: m.blob,
            }),
        );
    }
    let live = if manifest.live_segment == 0 {
        LazyBitmap::empty()
    } else {
        LazyBitmap::on_disk(seg(manifest.live_segment)?, BlobKind::LiveShard, 0)
    };
    // The member-count history is read now, whole (a few bytes a point).
    let history = if manifest.history_segment == 0 {
        crate::storage::history::History::default()
    } else {
        let s = seg(manifest.history_segment)?;
        let entries = s.entries_of(BlobKind::History, 0);
        let [entry] = entries else {
            return Err(Error::corrupt(
                &s.path,
                0,
                format!(
                    "segment holds {} histories where the manifest names one",
                    entries.len()
                ),
            ));
        };
        crate::storage::history::History::decode(s.blob(entry)?).map_err(|e| {
            Error::corrupt(
                &s.path,
                entry.offset + e.offset as u64,
                format!("history: {}", e.reason),
            )
        })?
    };
    // The merge log is read now, whole (a few dozen bytes a merge).
    let merges = if manifest.merge_log_segment == 0 {
        MergeLog::default()
    } else {
        let s = seg(manifest.merge_log_segment)?;
        let entries = s.entries_of(BlobKind::MergeLog, 0);
        let [entry] = entries else {
            return Err(Error::corrupt(
                &s.path,
                0,
                format!(
                    "segment holds {} merge logs where the manifest names one",
                    entries.len()
                ),
            ));
        };
        MergeLog::decode(s.blob(entry)?).map_err(|e| {
            Error::corrupt(
                &s.path,
                entry.offset + e.offset as u64,
                format!("merge log: {}", e.reason),
            )
        })?
    };
    let snap = Snapshot {
        lsn: manifest.checkpoint_lsn,
        tags,
        fields,
        live,
        next_customer_id: manifest.next_customer_id,
        next_tag_id: manifest.next_tag_id,
        dict,
        idents,
        sources,
        positions,
        rejects,
        rebuild_due: Arc::new(manifest.rebuild_due.clone()),
        audiences,
        snapshots,
        next_snapshot_id: manifest.next_snapshot_id.max(1),
        history: Arc::new(history),
        archive: Arc::new(ArchiveList::of(manifest)),
        merges: Arc::new(parking_lot::RwLock::new(merges)),
        zone: crate::fields::time::default_zone(),
        rules: Arc::new(rules),
        erased_lsn: 0,
    };
    let mut state = State::new(snap);
    // Remembered event ids are read now, whole: the writer checks every
    // ingested event against them.
    for day in manifest.seen.iter().filter(|_| seen) {
        let s = seg(day.segment)?;
        let entries = s.entries_of(BlobKind::SeenIds, day.day as u32);
        let [entry] = entries else {
            return Err(Error::corrupt(
                &s.path,
                0,
                format!(
                    "segment holds {} blobs of event ids of day {} named by the manifest (one expected)",
                    entries.len(),
                    day.day
                ),
            ));
        };
        let ids = seen::decode_day(s.blob(entry)?).ok_or_else(|| {
            Error::corrupt(
                &s.path,
                entry.offset,
                format!(
                    "the event ids of day {} are not ascending 16-byte ids",
                    day.day
                ),
            )
        })?;
        if ids.len() as u64 != day.count {
            return Err(Error::corrupt(
                &s.path,
                entry.offset,
                format!(
                    "day {} holds {} event ids; the manifest says {}",
                    day.day,
                    ids.len(),
                    day.count
                ),
            ));
        }
        state.seen.days.insert(day.day, Arc::new(ids));
    }
    Ok(state)
}
