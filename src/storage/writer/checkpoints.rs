//! The writer's side of checkpoints: when one starts, handing a snapshot to
//! the checkpoint thread, installing what it wrote (or cleaning up after a
//! failure), the final one at shutdown, and the maintenance batch
//! (retention drops, month roll-ups) logged before each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tokio::sync::oneshot;

use super::*;
use crate::error::{Error, Result};
use crate::fields::FieldKind;
use crate::fields::time::{self, Bucket};
use crate::storage::checkpoint::{CheckpointDone, CheckpointInfo, CheckpointJob};
use crate::storage::datadir::fsync_dir;
use crate::storage::manifest::Manifest;
use crate::storage::record::{Batch, FieldChange};
use crate::storage::segment::{BlobKind, Segment};
use crate::storage::snapshot::{ArchiveList, LazyBitmap};
use crate::storage::versions;
use crate::storage::wal::{self, WalWriter};

impl Writer {
    pub(super) fn maybe_auto_checkpoint(&mut self) {
        if self.failed.is_some() || self.running.is_some() {
            return;
        }
        let wal_bytes = self.old_wal_bytes + self.wal.bytes();
        if wal_bytes >= self.shared.config.checkpoint_wal_bytes {
            tracing::info!(wal_bytes, "log passed its size limit; checkpointing");
            self.request_checkpoint(Vec::new());
        } else if self.version_due() {
            tracing::info!("a new local day: checkpointing to keep a version of the store");
            self.request_checkpoint(Vec::new());
        }
    }

    /// Whether [`Writer::maybe_auto_checkpoint`] may start one now; cheap
    /// and changes nothing. A write committed on its caller's thread asks
    /// this and leaves the starting (the maintenance batch, which may read
    /// archive files) to the writer's thread.
    pub(super) fn checkpoint_may_be_due(&self) -> bool {
        self.failed.is_none()
            && self.running.is_none()
            && (self.old_wal_bytes + self.wal.bytes() >= self.shared.config.checkpoint_wal_bytes
                || (self.shared.config.history_days != 0 && self.now_ms() >= self.next_day_ms))
    }

    /// Whether a checkpoint now would be the first of a new local day (kept
    /// as that day's version) and the store has changed since the newest
    /// version (the first version is the first checkpoint's, whenever it
    /// comes). Looks at the calendar only once the day has turned.
    fn version_due(&mut self) -> bool {
        if self.shared.config.history_days == 0 {
            return false;
        }
        let now = self.now_ms();
        if now < self.next_day_ms {
            return false;
        }
        let zone = &self.state.snap.zone;
        let Ok(today) = time::day_of(now, zone) else {
            return false;
        };
        self.next_day_ms = time::day_start_ms(today + 1, zone).unwrap_or(i64::MAX);
        // Before the first checkpoint the log holds every write; the
        // first version is that checkpoint's.
        self.versions.newest().is_some_and(|v| {
            v.lsn < self.state.snap.lsn && time::day_of(v.at_ms, zone).is_ok_and(|day| day < today)
        })
    }

    /// Whether the checkpoint whose manifest is `m` is to be kept as a
    /// version: the first of its local day, or the first after
    /// `history_version_bytes` of log since the newest version (so that a
    /// read of the past never replays much more than that).
    fn keeps_version(&self, m: &Manifest) -> bool {
        if self.shared.config.history_days == 0 {
            return false;
        }
        let zone = &self.state.snap.zone;
        match self.versions.newest() {
            None => true,
            Some(_) if self.log_since_version >= self.shared.config.history_version_bytes => true,
            Some(v) => match (
                time::day_of(v.at_ms, zone),
                time::day_of(m.checkpoint_at_ms, zone),
            ) {
                (Ok(newest), Ok(this)) => newest < this,
                _ => false,
            },
        }
    }

    pub(super) fn request_checkpoint(&mut self, waiters: Vec<Reply<CheckpointInfo>>) {
        if self.running.is_some() {
            // The running one may have begun before these were asked for.
            self.queued.extend(waiters);
            return;
        }
        if let Some(msg) = &self.failed {
            for w in waiters {
                let _ = w.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        match maintenance(
            &self.state.snap,
            &self.state.seen,
            self.shared.config.dedup_days,
            self.now_ms(),
        ) {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => {
                if let Err(e) = self.commit_internal(&batch) {
                    tracing::error!(error = %e, "could not log the retention and roll-up changes");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention and roll-up skipped"),
        }
        if let Some(msg) = &self.failed {
            for w in waiters {
                let _ = w.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        let lsn = self.state.snap.lsn;
        // A merge request on a clean store still runs: its one section may
        // hold keys of customers deleted since (the job decides what to merge).
        let merge_dictionary = self.merge_dictionary && !self.manifest.dict_segments.is_empty();
        if lsn == self.manifest.checkpoint_lsn
            && !merge_dictionary
            && self.state.dirty_tags.is_empty()
            && self.state.dirty_slots.is_empty()
            && !self.state.dirty_live
            && !self.state.merges_dirty
            && self.state.dirty_snapshots.is_empty()
            && !self.state.history_dirty
        {
            // Nothing to write, and at most one dictionary section.
            self.merge_dictionary = false;
            // History turned on for a store that has not changed since its
            // last checkpoint: that checkpoint is where the history begins.
            if self.shared.config.history_days > 0
                && self.versions.newest().is_none()
                && self.manifest.checkpoint_lsn > 0
            {
                let _held = self.shared.files.lock();
                let kept = self.versions.keep(&self.dir, &self.manifest);
                *self.shared.versions.lock() = self.versions.marks();
                if let Err(e) = kept {
                    tracing::warn!(error = %e, "could not keep a version of the store");
                }
            }
            for w in waiters {
                let _ = w.send(Ok(CheckpointInfo {
                    lsn,
                    ..Default::default()
                }));
            }
            return;
        }
        if self.wal.first_lsn() <= lsn {
            match WalWriter::create(&self.dir, lsn + 1) {
                Ok(new) => {
                    let old = std::mem::replace(&mut self.wal, new);
                    self.old_wal_bytes += old.bytes();
                    if let Err(e) = old.seal() {
                        // Harmless: replay reads preallocated zeros as the end of a file.
                        tracing::warn!(error = %e, "could not trim a finished log file");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start a new log file for a checkpoint");
                    let msg = e.to_string();
                    for w in waiters {
                        let _ = w.send(Err(Error::Checkpoint(msg.clone())));
                    }
                    return;
                }
            }
        }
        let dirty_tags = std::mem::take(&mut self.state.dirty_tags);
        let dirty_live = std::mem::take(&mut self.state.dirty_live);
        let dirty_slots = std::mem::take(&mut self.state.dirty_slots);
        let dirty_seen = std::mem::take(&mut self.state.seen.dirty);
        let dirty_merges = std::mem::take(&mut self.state.merges_dirty);
        let dirty_snapshots = std::mem::take(&mut self.state.dirty_snapshots);
        let dirty_history = std::mem::take(&mut self.state.history_dirty);
        let job = CheckpointJob {
            dir: self.dir.clone(),
            snap: self.shared.snapshot(),
            dirty_tags: dirty_tags.clone(),
            dirty_snapshots: dirty_snapshots.clone(),
            dirty_live,
            dirty_slots: dirty_slots.clone(),
            seen: crate::storage::seen::Seen {
                days: self.state.seen.days.clone(),
                dirty: dirty_seen.clone(),
            },
            prev: self.manifest.clone(),
            segments: self.segments.clone(),
            dict: self.state.snap.dict.clone(),
            policy: self.shared.config.compaction,
            merge_dictionary: self.merge_dictionary,
            now_ms: self.now_ms(),
            event_retention_ms: match self.shared.config.event_retention_days {
                0 => None,
                days => Some(i64::from(days) * 86_400_000),
            },
            erased: self.last_delete_lsn > self.manifest.checkpoint_lsn,
            // The log as of `lsn` (it grows on after), when it changed.
            merge_log: dirty_merges.then(|| self.state.snap.merges.read().clone()),
            history: dirty_history.then(|| self.state.snap.history.clone()),
        };
        debug_assert_eq!(job.snap.lsn, lsn);
        self.merge_dictionary = false;
        // Events ingested from here on are not in this checkpoint's archive.
        self.state.ingested = (lsn, roaring::RoaringBitmap::new());
        self.running = Some(Running {
            waiters,
            rotated_first: self.wal.first_lsn(),
            dirty_tags,
            dirty_live,
            dirty_slots,
            dirty_seen,
            dirty_merges,
            dirty_snapshots,
            dirty_history,
        });
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("tagstore-checkpoint".into())
            .spawn(move || {
                let res = job.run();
                let _ = tx.send(Cmd::CheckpointDone(Box::new(res)));
            });
        if let Err(e) = spawned {
            let res = Err(Error::Checkpoint(format!(
                "could not start the checkpoint thread: {e}"
            )));
            self.complete_checkpoint(res);
        }
    }

    pub(super) fn complete_checkpoint(&mut self, res: Result<CheckpointDone>) {
        let Some(running) = self.running.take() else {
            return;
        };
        match res {
            Ok(done) => {
                let info = done.info;
                let meters = &self.shared.meters;
                meters
                    .checkpoint
                    .observe(std::time::Duration::from_millis(info.duration_ms));
                meters.segments_compacted.fetch_add(
                    info.segments_compacted,
                    std::sync::atomic::Ordering::Relaxed,
                );
                self.install(done, running.rotated_first);
                tracing::info!(
                    lsn = info.lsn,
                    tags = info.tags_written,
                    bytes = info.segment_bytes,
                    ms = info.duration_ms,
                    "checkpoint done"
                );
                for w in running.waiters {
                    let _ = w.send(Ok(info));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint failed; the log keeps every write");
                self.shared
                    .meters
                    .checkpoints_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.state.dirty_tags.extend(running.dirty_tags);
                self.state.dirty_live |= running.dirty_live;
                self.state.dirty_slots.extend(running.dirty_slots);
                self.state.seen.dirty.extend(running.dirty_seen);
                self.state.merges_dirty |= running.dirty_merges;
                self.state.dirty_snapshots.extend(running.dirty_snapshots);
                self.state.history_dirty |= running.dirty_history;
                // The failed job may have left a file under this number:
                // partial, or complete and already named by a new MANIFEST
                // (when what failed came after the rename, such as the
                // directory's fsync). Only the first may go; the second is
                // what a restart would read.
                let no = self.manifest.next_segment_no.max(1);
                let path = self.dir.join(crate::storage::segment::file_name(no));
                match Manifest::read(&self.dir) {
                    Ok(on_disk)
                        if !on_disk.as_ref().is_some_and(|m| m.segments().contains(&no)) =>
                    {
                        let _ = self.dir.fs().remove(&path);
                    }
                    Ok(_) => tracing::warn!(
                        path = %path.display(),
                        "the failed checkpoint's manifest reached the disk: its segment is kept"
                    ),
                    Err(read) => tracing::warn!(
                        path = %path.display(),
                        error = %read,
                        "cannot tell whether the failed checkpoint's manifest reached the disk: its segment is kept"
                    ),
                }
                // Its archive file, under the same number, likewise.
                let archive = self.dir.join(crate::storage::archive::file_name(no));
                let on_disk = Manifest::read(&self.dir);
                match &on_disk {
                    Ok(on_disk)
                        if !on_disk
                            .as_ref()
                            .is_some_and(|m| m.archives.iter().any(|a| a.no == no)) =>
                    {
                        let _ = self.dir.fs().remove(&archive);
                    }
                    _ => tracing::warn!(
                        path = %archive.display(),
                        "the failed checkpoint's archive file may be named by the manifest on disk: kept"
                    ),
                }
                // Archive files it rewrote took the numbers after `no`; if
                // its manifest reached the disk, none of them is used again.
                // (Unnamed ones are overwritten by the next checkpoint, or
                // moved aside at the next start.)
                let on_disk_next = match on_disk {
                    Ok(Some(m)) => m.next_segment_no,
                    _ => 0,
                };
                self.manifest.next_segment_no = (no + 1).max(on_disk_next);
                let msg = e.to_string();
                for w in running.waiters {
                    let _ = w.send(Err(Error::Checkpoint(msg.clone())));
                }
            }
        }
        if !self.queued.is_empty() {
            let waiters = std::mem::take(&mut self.queued);
            self.request_checkpoint(waiters);
        }
    }

    /// Makes a finished checkpoint current: point not-yet-loaded bitmaps at
    /// their new homes, swap the dictionary sections, and delete the log files
    /// and segments nothing needs any more.
    pub(super) fn install(&mut self, done: CheckpointDone, rotated_first: u64) {
        if let Some(seg) = &done.new_segment {
            self.segments.insert(seg.no, seg.clone());
        }
        let homes: HashMap<u32, u64> = done
            .manifest
            .tags
            .iter()
            .map(|t| (t.id, t.segment))
            .collect();
        // Tags still on disk whose bitmap the checkpoint moved to another
        // segment (a merge) now read it from there.
        let moved_tags: Vec<(Arc<str>, u32, Arc<Segment>)> = self
            .state
            .snap
            .tags
            .values()
            .filter(|t| !t.bitmap.is_loaded())
            .filter_map(|t| {
                let home = homes.get(&t.id)?;
                (t.bitmap.segment().map(|s| s.no) != Some(*home))
                    .then(|| self.segments.get(home))?
                    .map(|seg| (t.meta.name.clone(), t.id, seg.clone()))
            })
            .collect();
        for (name, id, seg) in moved_tags {
            if let Some(tag) = self.state.snap.tags.get_mut(&name) {
                Arc::make_mut(tag).bitmap = LazyBitmap::on_disk(seg, BlobKind::TagShard, id);
            }
        }
        // Audience snapshots likewise (those sharing members share the new
        // home's one bitmap).
        let snapshot_homes: HashMap<u32, u64> = done
            .manifest
            .snapshots
            .iter()
            .map(|s| (s.blob, s.segment))
            .collect();
        let mut moved_blobs: HashMap<u32, LazyBitmap> = HashMap::new();
        let moving: Vec<(u32, u32)> = self
            .state
            .snap
            .snapshots
            .values()
            .filter(|s| !s.members.is_loaded())
            .filter(|s| {
                snapshot_homes
                    .get(&s.blob)
                    .is_some_and(|home| s.members.segment().map(|g| g.no) != Some(*home))
            })
            .map(|s| (s.id, s.blob))
            .collect();
        for (id, blob) in moving {
            let Some(seg) = snapshot_homes
                .get(&blob)
                .and_then(|home| self.segments.get(home))
                .cloned()
            else {
                continue;
            };
            let members = moved_blobs
                .entry(blob)
                .or_insert_with(|| LazyBitmap::on_disk(seg, BlobKind::SnapshotShard, blob))
                .clone();
            if let Some(s) = self.state.snap.snapshots.get_mut(&id) {
                Arc::make_mut(s).members = members;
            }
        }
        let slot_homes: HashMap<(u32, u32), u64> = done
            .manifest
            .fields
            .iter()
            .flat_map(|f| f.slots.iter().map(move |&(slot, seg)| ((f.id, slot), seg)))
            .collect();
        type MovedSlots = Vec<(u32, Arc<Segment>)>;
        let moved_slots: Vec<(Arc<str>, u32, MovedSlots)> = self
            .state
            .snap
            .fields
            .values()
            .filter_map(|field| {
                let id = field.id;
                let moved: Vec<(u32, Arc<Segment>)> = field
                    .slots
                    .iter()
                    .filter(|(_, b)| !b.is_loaded())
                    .filter_map(|(&slot, b)| {
                        let home = slot_homes.get(&(id, slot))?;
                        (b.segment().map(|s| s.no) != Some(*home))
                            .then(|| self.segments.get(home).map(|s| (slot, s.clone())))?
                    })
                    .collect();
                (!moved.is_empty()).then(|| (field.meta.name.clone(), id, moved))
            })
            .collect();
        for (name, id, moved) in moved_slots {
            if let Some(field) = self.state.snap.fields.get_mut(&name) {
                let f = Arc::make_mut(field);
                for (slot, seg) in moved {
                    f.slots.insert(
                        slot,
                        LazyBitmap::on_disk_slot(seg, BlobKind::FieldSlot, id, slot),
                    );
                }
            }
        }
        if !self.state.snap.live.is_loaded()
            && let Some(seg) = self.segments.get(&done.manifest.live_segment)
            && self.state.snap.live.segment().map(|s| s.no) != Some(seg.no)
        {
            self.state.snap.live = LazyBitmap::on_disk(seg.clone(), BlobKind::LiveShard, 0);
        }
        self.state.snap.dict = Arc::new(
            self.state
                .snap
                .dict
                .successor(done.dict_layers, done.dict_upto),
        );
        self.state.snap.idents = Arc::new(
            self.state
                .snap
                .idents
                .successor(done.ident_layers, done.manifest.checkpoint_lsn),
        );
        let dropped: Vec<u64> = self
            .manifest
            .archives
            .iter()
            .filter(|a| !done.manifest.archives.iter().any(|b| b.no == a.no))
            .map(|a| a.no)
            .collect();
        self.manifest = done.manifest;
        self.state.snap.archive = Arc::new(ArchiveList::of(&self.manifest));
        // The first checkpoint of a local day is kept whole, before
        // anything it names could be moved. Should that fail, nothing is
        // lost but this version; the next checkpoint tries again.
        let history = self.shared.config.history_days > 0;
        if self.keeps_version(&self.manifest) {
            match self.versions.keep(&self.dir, &self.manifest) {
                Ok(()) => {
                    self.log_since_version = 0;
                    tracing::info!(
                        lsn = self.manifest.checkpoint_lsn,
                        "kept a version of the store for reads of the past"
                    )
                }
                Err(e) => {
                    // (A version whose file was named before the failure
                    // is in the list all the same: its files stay.)
                    tracing::warn!(error = %e, "could not keep a version of the store")
                }
            }
        }
        // Not while a backup opens the files it copies, nor a read of the
        // past opens a version's.
        let shared = self.shared.clone();
        let files_held = shared.files.lock();
        // Archive files past retention (a rebuild reading one keeps its map).
        for no in dropped {
            let path = self.dir.join(crate::storage::archive::file_name(no));
            if let Err(e) = self.dir.fs().remove(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an archive file past retention");
            }
        }

        // The feed first: once these log files are gone, it could not be
        // worked out again from them.
        self.feed.sync_to(self.state.snap.lsn);
        self.feed.expire(self.now_ms());
        // Log files wholly covered by the checkpoint.
        match wal::list(&self.dir) {
            Ok(files) => {
                for f in files.iter().filter(|f| f.first_lsn < rotated_first) {
                    let res = if history {
                        self.log_since_version += f.len;
                        versions::retire(&self.dir, &f.path)
                    } else {
                        self.dir
                            .fs()
                            .remove(&f.path)
                            .map_err(|e| Error::io(&f.path, e))
                    };
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "could not delete or keep a covered log file");
                    }
                }
                self.old_wal_bytes = files
                    .iter()
                    .filter(|f| f.first_lsn >= rotated_first && f.first_lsn != self.wal.first_lsn())
                    .map(|f| f.len)
                    .sum();
            }
            Err(e) => tracing::warn!(error = %e, "could not list log files"),
        }
        // Segments no longer referenced (readers holding old snapshots keep
        // their maps; the files' space is freed when the last map goes).
        let live: std::collections::HashSet<u64> = self.manifest.segments().into_iter().collect();
        let dead: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|no| !live.contains(no))
            .collect();
        for no in dead {
            let Some(seg) = self.segments.remove(&no) else {
                continue;
            };
            let res = if self.versions.names(no) {
                versions::retire(&self.dir, &seg.path)
            } else {
                self.dir
                    .fs()
                    .remove(&seg.path)
                    .map_err(|e| Error::io(&seg.path, e))
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "could not delete or keep an unused segment");
            }
        }
        // Versions past the retention, and what only they needed.
        let cutoff = match self.shared.config.history_days {
            0 => None,
            days => time::day_of(self.now_ms(), &self.state.snap.zone)
                .and_then(|today| time::day_start_ms(today - days as i32, &self.state.snap.zone))
                .ok(),
        };
        if history || self.versions.newest().is_some() {
            let gone = self.versions.prune(
                &self.dir,
                cutoff.or(if history { Some(i64::MIN) } else { None }),
            );
            if !gone.is_empty() {
                tracing::info!(files = gone.len(), "dropped history past its retention");
            }
            *self.shared.versions.lock() = self.versions.marks();
        }
        drop(files_held);
        if history && let Err(e) = fsync_dir(&versions::history_dir(&self.dir)) {
            tracing::warn!(error = %e, "could not sync the history directory");
        }
        if let Err(e) = fsync_dir(&self.dir) {
            tracing::warn!(error = %e, "could not sync the data directory");
        }
        // Readers move to the new dictionary and homes; the old ones (and the
        // recent keys now in a section) are freed with the last old snapshot.
        self.shared.publish(Arc::new(self.state.snap.clone()));
        release_free_memory();
        let mut info = self.shared.info.lock();
        info.last_checkpoint_lsn = self.manifest.checkpoint_lsn;
        info.last_checkpoint_at_ms = self.manifest.checkpoint_at_ms;
        info.segment_files = self.segments.len() as u64;
        info.dictionary_sections = self.manifest.dict_segments.len() as u64;
        info.wal_bytes = self.old_wal_bytes + self.wal.bytes();
    }

    /// Clean shutdown: wait for a running checkpoint, then write a final one.
    pub(super) fn finish(&mut self, commands: &Receiver<Cmd>) -> Result<()> {
        let started = Instant::now();
        self.wait_for_checkpoint(commands);
        if self.failed.is_some() {
            return Ok(());
        }
        let (tx, mut rx) = oneshot::channel();
        self.request_checkpoint(vec![tx]);
        self.wait_for_checkpoint(commands);
        let res = rx
            .try_recv()
            .map_err(|_| Error::Checkpoint("the final checkpoint did not report".into()))?;
        res?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "final checkpoint written"
        );
        Ok(())
    }

    /// Waits for the running checkpoint at shutdown, refusing the writes
    /// that come meanwhile.
    pub(super) fn wait_for_checkpoint(&mut self, rx: &Receiver<Cmd>) {
        while self.running.is_some() {
            match rx.recv() {
                Ok(Cmd::CheckpointDone(res)) => self.complete_checkpoint(*res),
                Ok(Cmd::Tick) => {}
                Ok(Cmd::Write(_, reply)) => {
                    let _ = reply.send(Err(Error::ShuttingDown));
                }
                Ok(Cmd::Checkpoint(options, reply)) => {
                    self.merge_dictionary |= options.merge_dictionary;
                    self.queued.push(reply)
                }
                Ok(Cmd::Shutdown(reply)) => {
                    let _ = reply.send(Ok(()));
                }
                Err(_) => return,
            }
        }
    }
}

/// The retention and roll-up changes due today for every behaviour field,
/// and the days of remembered event ids past `dedup_days`, as one batch
/// (empty when nothing is due). Loads the day buckets a roll-up merges.
fn maintenance(
    snap: &crate::storage::Snapshot,
    seen: &crate::storage::seen::Seen,
    dedup_days: u32,
    now_ms: i64,
) -> Result<Batch> {
    let mut batch = Batch {
        at_ms: now_ms,
        ..Default::default()
    };
    let today = crate::storage::seen::day_of(now_ms);
    let keep_from = today.saturating_sub(dedup_days.min(i32::MAX as u32) as i32);
    batch.drop_seen_days = seen.days.range(..keep_from).map(|(&d, _)| d).collect();
    for field in snap.fields.values() {
        let FieldKind::Behaviour(spec) = &field.meta.kind else {
            continue;
        };
        let tz = time::zone(&spec.time_zone)?;
        let today = time::day_of(now_ms, &tz)?;
        let keep_from = spec.retention_start(today);
        let mut drop = Vec::new();
        let mut months = std::collections::BTreeSet::new();
        for (&slot, bitmap) in &field.slots {
            let bucket = Bucket::of_slot(slot);
            if bucket.last_day() < keep_from {
                drop.push(slot);
            } else if let Bucket::Day(d) = bucket {
                let m = time::month_of(d);
                if spec.month_rolled(m, today) {
                    bitmap.get()?;
                    months.insert(m);
                }
            }
        }
        if !drop.is_empty() {
            batch.field_changes.push(FieldChange::DropSlots {
                field: field.id,
                slots: drop,
            });
        }
        for month in months {
            batch.field_changes.push(FieldChange::Rollup {
                field: field.id,
                month,
            });
        }
    }
    Ok(batch)
}

/// Hands the heap pages a write burst freed (the dictionary's recent keys,
/// copied shards, request buffers) back to the kernel. The allocator is
/// mimalloc, for Rust and C code alike (its `override` feature: linking this
/// crate makes it the process's `malloc`), and each thread's heap keeps
/// freed pages for reuse; most of a burst's memory belongs to the writer
/// thread's heap, so this runs there, after each checkpoint, when the recent
/// keys have just been dropped. After a bulk load of 3M customers it took
/// 5–9 ms and left the heap at 55 MiB instead of 143.
fn release_free_memory() {
    #[cfg(feature = "mimalloc")]
    {
        let started = Instant::now();
        // SAFETY: mi_collect takes no pointers; it only releases free memory
        // of the calling thread's heap.
        unsafe { libmimalloc_sys::mi_collect(true) };
        let us = started.elapsed().as_micros() as u64;
        tracing::debug!(us, "free heap pages released");
    }
}
