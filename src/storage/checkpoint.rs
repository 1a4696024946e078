//! Checkpoints: turning a published snapshot into a segment file and a new
//! manifest. Runs on its own thread from an immutable snapshot, so writers
//! keep going meanwhile. Only tags changed since the last checkpoint are
//! written; an unchanged tag stays in the segment it is in, unless that
//! segment is mostly garbage or there are too many segments, in which case
//! its live contents move into the new segment (compaction).
//!
//! It also moves the events of the log records it covers into a new file
//! of the event archive (`archive`), and drops archive files past their
//! retention from the manifest.
//!
//! The job writes files and returns what the writer must install; it never
//! touches the writer's state or deletes anything itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use crate::bitmap::ShardedBitmap;
use crate::error::{Error, Result};
use crate::storage::DataDir;
use crate::storage::archive::ArchiveWriter;
use crate::storage::dictionary::identities::UNLINKED;
use crate::storage::dictionary::{DictLayer, Dictionary, encode_identity_section, encode_section};
use crate::storage::manifest::{
    Manifest, ManifestArchive, ManifestAudience, ManifestField, ManifestSeen, ManifestSnapshot,
    ManifestSource, ManifestTag,
};
use crate::storage::merges::MergeLog;
use crate::storage::record::{Batch, KIND_BATCH};
use crate::storage::seen::{self, Seen};
use crate::storage::segment::{BlobKind, Segment, SegmentWriter};
use crate::storage::snapshot::Snapshot;
use crate::storage::wal;

/// Compaction settings.
#[derive(Debug, Clone, Copy)]
pub struct CompactionPolicy {
    /// Most segment files kept before the smallest are merged.
    pub max_segments: usize,
    /// Most dictionary sections kept before they are all merged into one
    /// (see `dict_merge_from` for the merges that keep them fewer).
    pub max_dict_layers: usize,
}

/// Which dictionary sections a checkpoint rewrites, given the key counts of
/// the current sections (oldest first), the live keys added since the last
/// checkpoint, and the oldest section held by a compaction victim. `Some(i)`:
/// sections `i..` and the new keys become one section; `None`: the new keys,
/// if any, get a section of their own.
///
/// A key look-up probes every section, newest first, and each probe of a
/// large section is a cache miss, so sections are kept few by size tiers: a
/// section is merged with everything newer once the newer keys together are
/// at least as many as its own. Sizes then at least double from each section
/// to the one before it (at most log2(keys / keys per checkpoint) + 1
/// sections), and each key is rewritten about once per tier it climbs. A bulk
/// load of 10M customers, ~2.5M per checkpoint, ends in one section after
/// writing 2× its keys; 100M ends in two after 3.3× (merging all sections
/// whenever there would be more than 8 gave four and eight, after 1× and 3×).
pub(crate) fn dict_merge_from(
    sizes: &[usize],
    recent: usize,
    first_victim: Option<usize>,
    max_sections: usize,
) -> Option<usize> {
    let mut from = None;
    if recent > 0 {
        let mut newer = recent;
        for i in (0..sizes.len()).rev() {
            if sizes[i] <= newer {
                from = Some(i);
            }
            newer += sizes[i];
        }
    }
    if let Some(v) = first_victim {
        from = Some(from.map_or(v, |f: usize| f.min(v)));
    }
    let new_section = from.is_some() || recent > 0;
    let kept = from.unwrap_or(sizes.len()) + new_section as usize;
    if kept > max_sections.max(1) {
        from = Some(0);
    }
    from
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            max_segments: 8,
            max_dict_layers: 8,
        }
    }
}

/// What a caller of a checkpoint may ask for beyond the usual.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Merge the dictionary's sections (and drop deleted customers' keys
    /// from disk), as after a bulk load: each section is a cache miss in
    /// every key look-up. See `requested_merge_from` for what is
    /// rewritten: everything, unless the oldest section is clean and holds
    /// nearly every key, so that a merge of nearly nothing costs nearly
    /// nothing.
    pub merge_dictionary: bool,
}

/// A requested merge leaves the oldest section alone while the keys after
/// it (newer sections and new keys) are fewer than 1/this of all keys.
pub const MERGE_TAIL_FRACTION: usize = 64;

/// Where a requested dictionary merge starts (`None`: nothing to merge; new
/// keys, if any, form a section of their own). `sizes` are the sections'
/// key counts, oldest first; `erased[i]` says whether section i holds keys
/// of customers deleted since; `recent` counts the new keys.
///
/// Every section from the first with erased keys on is merged (that is how
/// an erased key leaves the disk). Otherwise all sections are merged into
/// one, unless the oldest holds more than 63/64 of all keys: then only the
/// ones after it are merged with the new keys. Ten merges that each add one
/// key to a million-key dictionary rewrite ten keys, not ten million; the
/// dictionary stays at most two sections, the newer under 1/64 of the keys,
/// and is merged whole once the newer one passes that.
pub(crate) fn requested_merge_from(
    sizes: &[usize],
    erased: &[bool],
    recent: usize,
    first_victim: Option<usize>,
) -> Option<usize> {
    let n = sizes.len();
    if n == 0 {
        return None;
    }
    let total: usize = sizes.iter().sum::<usize>() + recent;
    let tail = total - sizes[0];
    let clean_and_big = !erased[0] && tail.saturating_mul(MERGE_TAIL_FRACTION) < total;
    let mut from = if clean_and_big { 1 } else { 0 };
    if let Some(e) = erased.iter().position(|&e| e) {
        from = from.min(e);
    }
    if let Some(v) = first_victim {
        from = from.min(v);
    }
    // Merging one clean section with nothing would rewrite it for nothing.
    let pointless = from + 1 == n && recent == 0 && !erased[from];
    (from < n && !pointless).then_some(from)
}

/// Everything a checkpoint needs, captured by the writer at one lsn.
pub struct CheckpointJob {
    pub dir: DataDir,
    pub snap: Arc<Snapshot>,
    pub dirty_tags: HashSet<u32>,
    /// Audience snapshots' members not yet in a segment (by blob id).
    pub dirty_snapshots: HashSet<u32>,
    pub dirty_live: bool,
    pub dirty_slots: HashSet<(u32, u32)>,
    /// The remembered event ids at the snapshot's lsn, with the days changed
    /// since the previous checkpoint.
    pub seen: Seen,
    pub prev: Manifest,
    pub segments: HashMap<u64, Arc<Segment>>,
    pub dict: Arc<Dictionary>,
    pub policy: CompactionPolicy,
    /// A caller asked for the dictionary to be merged (`requested_merge_from`).
    pub merge_dictionary: bool,
    pub now_ms: i64,
    /// How long archived events are kept, ms (by the time they were
    /// ingested); `None`: for ever.
    pub event_retention_ms: Option<i64>,
    /// Customers were erased since the previous checkpoint: archive files
    /// holding their events are rewritten without them.
    pub erased: bool,
    /// The merge log at the snapshot's lsn, when it changed since the
    /// previous checkpoint (written whole into the segment).
    pub merge_log: Option<MergeLog>,
    /// The member-count history, when it changed since the previous
    /// checkpoint (written whole into the segment).
    pub history: Option<Arc<crate::storage::history::History>>,
}

/// What a finished checkpoint hands back to the writer.
pub struct CheckpointDone {
    pub manifest: Manifest,
    pub new_segment: Option<Arc<Segment>>,
    pub dict_layers: Vec<Arc<DictLayer>>,
    /// Recent dictionary keys below this id are now in a section.
    pub dict_upto: u32,
    /// The identity sections after it (recent entries up to the manifest's
    /// `checkpoint_lsn` are now in one).
    pub ident_layers: Vec<Arc<DictLayer>>,
    pub info: CheckpointInfo,
}

/// Figures of one checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub lsn: u64,
    /// Tag bitmaps and field slots written.
    pub tags_written: u64,
    pub segment_bytes: u64,
    /// Events moved into the archive, and the bytes of its new file.
    pub events_archived: u64,
    pub archive_bytes: u64,
    pub duration_ms: u64,
    /// Segments compaction emptied into the new one.
    pub segments_compacted: u64,
}

impl CheckpointJob {
    /// Where the previous manifest keeps the members of each audience
    /// snapshot blob still in use: blob id → segment.
    fn prev_snapshot_homes(&self) -> HashMap<u32, u64> {
        let used: HashSet<u32> = self.snap.snapshots.values().map(|s| s.blob).collect();
        self.prev
            .snapshots
            .iter()
            .filter(|s| used.contains(&s.blob) && s.segment != 0)
            .map(|s| (s.blob, s.segment))
            .collect()
    }

    /// Segments to empty into the new one: mostly-garbage ones first, then the
    /// smallest while there are too many.
    fn victims(&self) -> HashSet<u64> {
        let prev_tags: HashMap<u32, &ManifestTag> =
            self.prev.tags.iter().map(|t| (t.id, t)).collect();
        let mut referenced: HashMap<u64, u64> = HashMap::new();
        for tag in self.snap.tags.values() {
            if self.dirty_tags.contains(&tag.id) {
                continue;
            }
            if let Some(mt) = prev_tags.get(&tag.id)
                && let Some(seg) = self.segments.get(&mt.segment)
            {
                *referenced.entry(mt.segment).or_default() +=
                    seg.bytes_of(BlobKind::TagShard, tag.id);
            }
        }
        for (blob, no) in self.prev_snapshot_homes() {
            if self.dirty_snapshots.contains(&blob) {
                continue;
            }
            if let Some(seg) = self.segments.get(&no) {
                *referenced.entry(no).or_default() += seg.bytes_of(BlobKind::SnapshotShard, blob);
            }
        }
        let prev_slots = self.prev_slots();
        for field in self.snap.fields.values() {
            for &slot in field.slots.keys() {
                if self.dirty_slots.contains(&(field.id, slot)) {
                    continue;
                }
                if let Some(&no) = prev_slots.get(&(field.id, slot))
                    && let Some(seg) = self.segments.get(&no)
                {
                    *referenced.entry(no).or_default() += seg.slot_bytes(field.id, slot);
                }
            }
        }
        for s in &self.prev.seen {
            if self.seen.dirty.contains(&s.day) {
                continue;
            }
            if let Some(seg) = self.segments.get(&s.segment) {
                *referenced.entry(s.segment).or_default() +=
                    seg.bytes_of(BlobKind::SeenIds, s.day as u32);
            }
        }
        if !self.dirty_live
            && let Some(seg) = self.segments.get(&self.prev.live_segment)
        {
            *referenced.entry(seg.no).or_default() += seg.bytes_of(BlobKind::LiveShard, 0);
        }
        for no in &self.prev.dict_segments {
            if let Some(seg) = self.segments.get(no) {
                *referenced.entry(*no).or_default() += seg.bytes_of(BlobKind::Dictionary, 0);
            }
        }
        if self.merge_log.is_none()
            && let Some(seg) = self.segments.get(&self.prev.merge_log_segment)
        {
            *referenced.entry(seg.no).or_default() += seg.bytes_of(BlobKind::MergeLog, 0);
        }
        if self.history.is_none()
            && let Some(seg) = self.segments.get(&self.prev.history_segment)
        {
            *referenced.entry(seg.no).or_default() += seg.bytes_of(BlobKind::History, 0);
        }
        for no in &self.prev.ident_segments {
            if let Some(seg) = self.segments.get(no) {
                *referenced.entry(*no).or_default() += seg.bytes_of(BlobKind::Identities, 0);
            }
        }
        let mut victims = HashSet::new();
        let mut keep: Vec<(u64, u64)> = Vec::new();
        for (&no, &bytes) in &referenced {
            let size = self.segments.get(&no).map_or(0, |s| s.size());
            if bytes * 2 < size {
                victims.insert(no);
            } else {
                keep.push((bytes, no));
            }
        }
        keep.sort_unstable();
        let mut i = 0;
        while keep.len() - i + 1 > self.policy.max_segments.max(2) {
            victims.insert(keep[i].1);
            i += 1;
        }
        victims
    }

    /// The segment of every field slot in the previous manifest.
    fn prev_slots(&self) -> HashMap<(u32, u32), u64> {
        self.prev
            .fields
            .iter()
            .flat_map(|f| f.slots.iter().map(move |&(slot, seg)| ((f.id, slot), seg)))
            .collect()
    }

    /// Writes the segment (if there is anything to write) and the manifest.
    pub fn run(self) -> Result<CheckpointDone> {
        let started = Instant::now();
        let snap = &self.snap;
        let live = snap.live()?;
        let victims = self.victims();
        let prev_tags: HashMap<u32, &ManifestTag> =
            self.prev.tags.iter().map(|t| (t.id, t)).collect();
        let seg_no = self.prev.next_segment_no.max(1);
        let mut writer: Option<SegmentWriter> = None;
        let open = |w: &mut Option<SegmentWriter>| -> Result<()> {
            if w.is_none() {
                *w = Some(SegmentWriter::create(&self.dir, seg_no)?);
            }
            Ok(())
        };

        let mut tags = Vec::with_capacity(snap.tags.len());
        let mut tags_written = 0;
        for tag in snap.tags.values() {
            let prev = prev_tags.get(&tag.id);
            let keep = !self.dirty_tags.contains(&tag.id)
                && prev.is_some_and(|p| p.segment == 0 || !victims.contains(&p.segment));
            let segment = match prev {
                Some(p) if keep => p.segment,
                _ => {
                    let bm = tag.bitmap.get()?;
                    if bm.is_empty() {
                        0
                    } else {
                        open(&mut writer)?;
                        if let Some(w) = writer.as_mut() {
                            w.add_bitmap(BlobKind::TagShard, tag.id, bm)?;
                        }
                        tags_written += 1;
                        seg_no
                    }
                }
            };
            tags.push(ManifestTag {
                id: tag.id,
                segment,
                count: tag.meta.count,
                created_ms: tag.meta.created_ms,
                updated_ms: tag.meta.updated_ms,
                name: tag.meta.name.to_string(),
                description: tag.meta.description.clone(),
                category: tag.meta.category.clone(),
            });
        }

        // Audience snapshots: each blob of members written once (snapshots
        // of an unchanged audience share one), kept where it is unless it
        // is new or its segment is emptied.
        let prev_homes = self.prev_snapshot_homes();
        let mut homes: HashMap<u32, u64> = HashMap::new();
        let mut snapshots = Vec::with_capacity(snap.snapshots.len());
        for s in snap.snapshots.values() {
            let segment = match homes.get(&s.blob) {
                Some(&no) => no,
                None => {
                    let keep = !self.dirty_snapshots.contains(&s.blob)
                        && prev_homes
                            .get(&s.blob)
                            .is_some_and(|no| !victims.contains(no));
                    let no = match prev_homes.get(&s.blob) {
                        Some(&no) if keep => no,
                        _ => {
                            let bm = s.members.get()?;
                            if bm.is_empty() {
                                0
                            } else {
                                open(&mut writer)?;
                                if let Some(w) = writer.as_mut() {
                                    w.add_bitmap(BlobKind::SnapshotShard, s.blob, bm)?;
                                }
                                seg_no
                            }
                        }
                    };
                    homes.insert(s.blob, no);
                    no
                }
            };
            snapshots.push(ManifestSnapshot {
                id: s.id,
                audience: s.audience.clone(),
                query: s.query.clone(),
                taken_lsn: s.taken_lsn,
                at_ms: s.at_ms,
                note: s.note.clone(),
                count: s.count,
                segment,
                blob: s.blob,
            });
        }

        let prev_slots = self.prev_slots();
        let mut fields = Vec::with_capacity(snap.fields.len());
        for field in snap.fields.values() {
            let mut slots = Vec::with_capacity(field.slots.len());
            for (&slot, bitmap) in &field.slots {
                let prev = prev_slots.get(&(field.id, slot)).copied();
                let keep = !self.dirty_slots.contains(&(field.id, slot))
                    && prev.is_some_and(|p| !victims.contains(&p));
                let segment = match prev {
                    Some(p) if keep => p,
                    _ => {
                        let bm = bitmap.get()?;
                        if bm.is_empty() {
                            continue;
                        }
                        open(&mut writer)?;
                        if let Some(w) = writer.as_mut() {
                            w.add_slot(field.id, slot, bm)?;
                        }
                        tags_written += 1;
                        seg_no
                    }
                };
                slots.push((slot, segment));
            }
            fields.push(ManifestField {
                id: field.id,
                name: field.meta.name.to_string(),
                description: field.meta.description.clone(),
                category: field.meta.category.clone(),
                kind: field.meta.kind.clone(),
                created_ms: field.meta.created_ms,
                updated_ms: field.meta.updated_ms,
                slots,
                merge: field.meta.merge,
            });
        }

        let prev_seen: HashMap<i32, u64> =
            self.prev.seen.iter().map(|s| (s.day, s.segment)).collect();
        let mut seen_days = Vec::with_capacity(self.seen.days.len());
        for (&day, ids) in &self.seen.days {
            if ids.is_empty() {
                continue;
            }
            let prev = prev_seen.get(&day).copied();
            let keep =
                !self.seen.dirty.contains(&day) && prev.is_some_and(|p| !victims.contains(&p));
            let segment = match prev {
                Some(p) if keep => p,
                _ => {
                    open(&mut writer)?;
                    if let Some(w) = writer.as_mut() {
                        w.add_blob(BlobKind::SeenIds, day as u32, 0, &seen::encode_day(ids))?;
                    }
                    seg_no
                }
            };
            seen_days.push(ManifestSeen {
                day,
                segment,
                count: ids.len() as u64,
            });
        }
        let audiences = snap
            .audiences
            .values()
            .map(|a| ManifestAudience {
                name: a.name.to_string(),
                query: a.query.clone(),
                description: a.description.clone(),
                owner: a.owner.clone(),
                category: a.category.clone(),
                uses: a.uses.clone(),
                created_ms: a.created_ms,
                updated_ms: a.updated_ms,
            })
            .collect();
        let rules = snap
            .rules
            .by_name
            .values()
            .map(|r| crate::storage::manifest::ManifestRule {
                name: r.name.to_string(),
                def: r.def.clone(),
                day: r.day,
                created_ms: r.created_ms,
                updated_ms: r.updated_ms,
                stale: r.stale.clone(),
            })
            .collect();
        let sources = snap
            .sources
            .values()
            .map(|s| ManifestSource {
                name: s.name.to_string(),
                definition: s.definition.clone(),
                created_ms: s.created_ms,
                updated_ms: s.updated_ms,
                paused: s.paused,
                positions: snap.positions.get(&s.name).map_or_else(Vec::new, |at| {
                    at.iter()
                        .map(|((topic, partition), next)| (topic.clone(), *partition, *next))
                        .collect()
                }),
                rejects: snap
                    .rejects
                    .get(&s.name)
                    .map_or_else(Vec::new, |k| k.iter().cloned().collect()),
            })
            .collect();

        let live_segment = if self.dirty_live || victims.contains(&self.prev.live_segment) {
            if live.is_empty() {
                0
            } else {
                open(&mut writer)?;
                if let Some(w) = writer.as_mut() {
                    w.add_bitmap(BlobKind::LiveShard, 0, live)?;
                }
                seg_no
            }
        } else {
            self.prev.live_segment
        };

        // Whose keys the dictionary and whose events the archive keep: the
        // live customers, and those merged into one (a rebuild of the
        // survivor reads their events; an unmerge brings them back).
        let merged_keep;
        let keep = {
            let log = snap.merges.read();
            if log.is_empty() {
                live
            } else {
                let mut k = live.clone();
                k.union_with(&log.absorbed_into_live(live.members()));
                merged_keep = k;
                &merged_keep
            }
        };
        let layers = self.dict.layers();
        let recent = self
            .dict
            .recent_entries(snap.next_customer_id, keep.members());
        let sizes: Vec<usize> = layers.iter().map(|l| l.len()).collect();
        let first_victim = layers
            .iter()
            .position(|l| victims.contains(&l.segment_no()));
        let merge_from = if self.merge_dictionary {
            let erased: Vec<bool> = layers
                .iter()
                .map(|l| {
                    let (lo, hi) = l.id_range();
                    keep.range_len(lo, hi) < l.len() as u64
                })
                .collect();
            requested_merge_from(&sizes, &erased, recent.len(), first_victim)
        } else {
            dict_merge_from(
                &sizes,
                recent.len(),
                first_victim,
                self.policy.max_dict_layers,
            )
        };
        let mut dict_segments: Vec<u64> = layers.iter().map(|l| l.segment_no()).collect();
        let mut new_dict = false;
        if let Some(from) = merge_from {
            // The merged sections keep only live customers (and those merged
            // into one): that is when a deleted customer's key leaves the
            // disk.
            // Streamed from the sections into the encoder, not collected
            // first (24 bytes a key: ~2 GB at 80M keys); a damaged page
            // stops the stream, and the checkpoint fails with its error.
            let mut damaged = None;
            let members = keep.members();
            let old = layers[from..]
                .iter()
                .flat_map(|layer| layer.iter())
                .map_while(|entry| entry.map_err(|e| damaged = Some(e)).ok())
                .filter(|(id, _)| members.contains(*id));
            let section = encode_section(old.chain(recent.iter().map(|(id, k)| (*id, &**k))));
            if let Some(e) = damaged {
                return Err(e);
            }
            open(&mut writer)?;
            if let Some(w) = writer.as_mut() {
                w.add_blob(BlobKind::Dictionary, 0, 0, &section)?;
            }
            dict_segments.truncate(from);
            dict_segments.push(seg_no);
            new_dict = true;
        } else if !recent.is_empty() {
            let section = encode_section(recent.iter().map(|(id, k)| (*id, &**k)));
            open(&mut writer)?;
            if let Some(w) = writer.as_mut() {
                w.add_blob(BlobKind::Dictionary, 0, 0, &section)?;
            }
            dict_segments.push(seg_no);
            new_dict = true;
        }

        let ident_layers = snap.idents.layers();
        let mut ident_segments: Vec<u64> = ident_layers.iter().map(|l| l.segment_no()).collect();
        let ident_from = match self.identity_section(&ident_layers, &victims, live)? {
            Some((from, section)) => {
                ident_segments.truncate(from);
                // A merge that leaves nothing (every entry was of erased
                // customers) replaces the sections with none.
                let written = section.len() >= 4 && section[..4] != [0, 0, 0, 0];
                if written {
                    open(&mut writer)?;
                    if let Some(w) = writer.as_mut() {
                        w.add_blob(BlobKind::Identities, 0, 0, &section)?;
                    }
                    ident_segments.push(seg_no);
                }
                Some((from, written))
            }
            None => None,
        };

        // The merge log, whole, when it changed (or its segment is emptied).
        let merge_log_segment = match &self.merge_log {
            Some(log) if log.is_empty() => 0,
            Some(log) => {
                open(&mut writer)?;
                if let Some(w) = writer.as_mut() {
                    w.add_blob(BlobKind::MergeLog, 0, 0, &log.encode())?;
                }
                seg_no
            }
            None if victims.contains(&self.prev.merge_log_segment) => {
                let log = snap.merges.read().upto(snap.lsn);
                open(&mut writer)?;
                if let Some(w) = writer.as_mut() {
                    w.add_blob(BlobKind::MergeLog, 0, 0, &log.encode())?;
                }
                seg_no
            }
            None => self.prev.merge_log_segment,
        };
        // The member-count history likewise.
        let history = match &self.history {
            Some(h) => Some(h.clone()),
            None if victims.contains(&self.prev.history_segment) => Some(snap.history.clone()),
            None => None,
        };
        let history_segment = match history {
            Some(h) if h.is_empty() => 0,
            Some(h) => {
                open(&mut writer)?;
                if let Some(w) = writer.as_mut() {
                    w.add_blob(BlobKind::History, 0, 0, &h.encode())?;
                }
                seg_no
            }
            None => self.prev.history_segment,
        };

        // The events of the records this checkpoint covers, under the
        // segment's number (so a failed checkpoint's leftovers share its
        // clean-up); archive files past retention are no longer named.
        let new_archive = self.archive_events(seg_no, keep)?;
        let mut archives = self.prev.archives.clone();
        let mut archive_dropped_to_ms = self.prev.archive_dropped_to_ms;
        let mut archive_partial = self.prev.archive_partial.clone();
        let mut archive_partial_unknown = self.prev.archive_partial_unknown;
        if let Some(keep) = self.event_retention_ms {
            let cutoff = self.now_ms.saturating_sub(keep);
            let (expired, kept): (Vec<_>, Vec<_>) =
                archives.into_iter().partition(|a| a.last_ms < cutoff);
            archives = kept;
            for a in expired {
                archive_dropped_to_ms = archive_dropped_to_ms.max(a.last_ms);
                // Whose events go: the customers of its blocks' index. A
                // file that cannot be read still goes (retention must not
                // stop at a damaged file), and then nobody's archive counts
                // as whole.
                match crate::storage::archive::ArchiveFile::open(&self.dir, a.no) {
                    Ok(file) => {
                        for b in &file.blocks {
                            archive_partial |= &b.customers;
                        }
                    }
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            file = a.no,
                            "an event archive file past retention cannot be read: its customers \
                             are unknown, so every customer's kept events count as partial"
                        );
                        archive_partial_unknown = true;
                    }
                }
            }
        }
        // Erased customers' events leave the archive: each file holding one
        // is rewritten without them, under the next numbers.
        let mut next_no = seg_no + 1;
        if self.erased {
            let mut kept = Vec::with_capacity(archives.len());
            for a in archives {
                match self.without_erased(&a, next_no, keep)? {
                    Rewrite::Unchanged => kept.push(a),
                    Rewrite::Empty => {}
                    Rewrite::Into(b) => {
                        next_no += 1;
                        kept.push(b);
                    }
                }
            }
            archives = kept;
        }
        archives.extend(new_archive);

        let mut segment_bytes = 0;
        let new_segment = match writer {
            Some(w) => {
                segment_bytes = w.finish()?;
                Some(Segment::open(&self.dir, seg_no)?)
            }
            None => None,
        };
        let manifest = Manifest {
            generation: self.prev.generation + 1,
            checkpoint_lsn: snap.lsn,
            checkpoint_at_ms: self.now_ms,
            next_customer_id: snap.next_customer_id,
            next_tag_id: snap.next_tag_id,
            // Past every number used: the segment's (or the new archive
            // file's), then the rewritten archive files'.
            next_segment_no: if new_segment.is_some()
                || new_archive.is_some()
                || next_no > seg_no + 1
            {
                next_no
            } else {
                seg_no
            },
            live_segment,
            dict_segments,
            tags,
            fields,
            sources,
            audiences,
            snapshots,
            next_snapshot_id: snap.next_snapshot_id,
            seen: seen_days,
            archives,
            archive_dropped_to_ms,
            archive_partial,
            archive_partial_unknown,
            ident_segments,
            merge_log_segment,
            history_segment,
            rules,
            rebuild_due: (*snap.rebuild_due).clone(),
        };
        manifest.write(&self.dir)?;

        let mut dict_layers = layers;
        if new_dict {
            dict_layers.truncate(merge_from.unwrap_or(dict_layers.len()));
            dict_layers.push(Arc::new(DictLayer::open(
                new_segment
                    .clone()
                    .expect("a new dictionary section writes a segment"),
            )?));
        }
        let mut ident_layers = ident_layers;
        if let Some((from, _)) = ident_from {
            ident_layers.truncate(from);
        }
        if let Some((_, true)) = ident_from {
            ident_layers.push(Arc::new(DictLayer::open_identities(
                new_segment
                    .clone()
                    .expect("a new identity section writes a segment"),
            )?));
        }
        Ok(CheckpointDone {
            info: CheckpointInfo {
                lsn: snap.lsn,
                tags_written,
                segment_bytes,
                events_archived: new_archive.map_or(0, |a| a.events),
                archive_bytes: new_archive.map_or(0, |a| a.bytes),
                duration_ms: started.elapsed().as_millis() as u64,
                segments_compacted: victims.len() as u64,
            },
            manifest,
            new_segment,
            dict_layers,
            dict_upto: snap.next_customer_id,
            ident_layers,
        })
    }
}

impl CheckpointJob {
    /// The identity section this checkpoint writes, if any, and the index of
    /// the first section it replaces (sections from there on are merged
    /// into it, as dictionary sections are; a requested dictionary merge
    /// merges every identity section).
    ///
    /// An identity's newest entry wins. Entries of deleted customers are
    /// dropped, except where an older section left out of the merge has the
    /// identity (the entry hides it); an identity taken away from its
    /// customer stays taken away until a merge of every section, where it is
    /// kept only if the dictionary still names a live customer with it.
    fn identity_section(
        &self,
        layers: &[Arc<DictLayer>],
        victims: &HashSet<u64>,
        live: &ShardedBitmap,
    ) -> Result<Option<(usize, Vec<u8>)>> {
        let snap = &self.snap;
        let members = live.members();
        let recent = snap.idents.recent_entries(snap.lsn, members)?;
        let sizes: Vec<usize> = layers.iter().map(|l| l.len()).collect();
        let first_victim = layers
            .iter()
            .position(|l| victims.contains(&l.segment_no()));
        let from = if self.merge_dictionary && !layers.is_empty() {
            Some(0)
        } else {
            dict_merge_from(
                &sizes,
                recent.len(),
                first_victim,
                self.policy.max_dict_layers,
            )
        };
        let Some(from) = from else {
            if recent.is_empty() {
                return Ok(None);
            }
            let section =
                encode_identity_section(recent.iter().map(|(id, k, i)| (*id, &**k, &**i)));
            return Ok(Some((layers.len(), section)));
        };
        let recent_keys: HashSet<&str> = recent.iter().map(|(_, k, _)| &**k).collect();
        let older = &layers[..from];
        let merged = &layers[from..];
        // Whether the entry of `key` from source `src` (an index into
        // `merged`, or `merged.len()` for the recent entries) goes into the
        // new section.
        let keep = |src: usize, id: u32, key: &str| -> Result<bool> {
            if src < merged.len() {
                if recent_keys.contains(key) {
                    return Ok(false);
                }
                for newer in &merged[src + 1..] {
                    if newer.find(key)?.is_some() {
                        return Ok(false);
                    }
                }
            }
            if id == UNLINKED {
                if from > 0 {
                    return Ok(true);
                }
                return Ok(snap.dict.lookup(key)?.is_some_and(|c| members.contains(c)));
            }
            if members.contains(id) {
                return Ok(true);
            }
            for o in older {
                if o.find(key)?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        // Every source is in id order: a k-way merge keeps the section's ids
        // non-decreasing without collecting the entries first.
        let mut sources: Vec<Entries<'_>> = merged
            .iter()
            .map(|l| Box::new(l.entries()) as Box<dyn Iterator<Item = _>>)
            .collect();
        sources.push(Box::new(
            recent.iter().map(|(id, k, i)| Ok((*id, &**k, &**i))),
        ));
        let mut heads = Vec::with_capacity(sources.len());
        for s in sources.iter_mut() {
            heads.push(s.next().transpose()?);
        }
        let mut failed = None;
        let mut next = || -> Result<Option<(u32, &str, &str)>> {
            loop {
                let Some(src) = (0..heads.len())
                    .filter(|&i| heads[i].is_some())
                    .min_by_key(|&i| heads[i].map(|h| h.0))
                else {
                    return Ok(None);
                };
                let Some(head) = heads[src].take() else {
                    return Ok(None);
                };
                heads[src] = sources[src].next().transpose()?;
                if keep(src, head.0, head.1)? {
                    return Ok(Some(head));
                }
            }
        };
        // Streamed into the encoder; a damaged page stops the stream and
        // fails the checkpoint with its error.
        let section = encode_identity_section(std::iter::from_fn(|| match next() {
            Ok(entry) => entry,
            Err(e) => {
                failed = Some(e);
                None
            }
        }));
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Some((from, section)))
    }
}

/// The `(id, identity, information)` entries of one source of an identity
/// section merge, in id order.
type Entries<'a> = Box<dyn Iterator<Item = Result<(u32, &'a str, &'a str)>> + 'a>;

/// What erasure does to one archive file.
enum Rewrite {
    /// It holds no erased customer.
    Unchanged,
    /// It held only erased customers' events: gone.
    Empty,
    /// Rewritten, as this file.
    Into(ManifestArchive),
}

impl CheckpointJob {
    /// Archive file `a` without the events of customers no longer live,
    /// written as file `no` if it held any (its log range and ingest times
    /// stay, so retention treats it as before).
    fn without_erased(
        &self,
        a: &ManifestArchive,
        no: u64,
        live: &ShardedBitmap,
    ) -> Result<Rewrite> {
        // A file that cannot be read is left as it is, and said so: a
        // damaged archive must not stop checkpoints (the log would grow
        // without end). Only writing the new file fails the checkpoint.
        let unreadable = |e: &Error| {
            tracing::error!(
                error = %e,
                file = a.no,
                "an archive file holding erased customers' events cannot be read, so it is not rewritten without them"
            );
        };
        let file = match crate::storage::archive::ArchiveFile::open(&self.dir, a.no) {
            Ok(f) => f,
            Err(e) => {
                unreadable(&e);
                return Ok(Rewrite::Unchanged);
            }
        };
        let erased = file
            .blocks
            .iter()
            .any(|b| b.customers.iter().any(|c| !live.contains(c)));
        if !erased {
            return Ok(Rewrite::Unchanged);
        }
        let mut out: Option<ArchiveWriter> = None;
        let mut write_failed = None;
        let read = file.for_each(None, |customer, event| {
            if !live.contains(customer) {
                return Ok(());
            }
            let written = match out.as_mut() {
                Some(w) => w.push(customer, event),
                None => ArchiveWriter::create(&self.dir, no).and_then(|mut w| {
                    let pushed = w.push(customer, event);
                    out = Some(w);
                    pushed
                }),
            };
            written.map_err(|e| {
                let msg = e.to_string();
                write_failed = Some(e);
                Error::Checkpoint(msg)
            })
        });
        if let Some(e) = write_failed {
            return Err(e);
        }
        if let Err(e) = read {
            unreadable(&e);
            drop(out);
            let _ = self
                .dir
                .fs()
                .remove(&self.dir.join(crate::storage::archive::file_name(no)));
            return Ok(Rewrite::Unchanged);
        }
        let Some(w) = out else {
            return Ok(Rewrite::Empty);
        };
        let events = w.events();
        let bytes = w.finish()?;
        Ok(Rewrite::Into(ManifestArchive {
            no,
            events,
            bytes,
            ..*a
        }))
    }

    /// Writes archive file `no` with the events of the log records after
    /// the previous checkpoint up to the snapshot's lsn, leaving out those
    /// of customers deleted since. `None` when there are none.
    fn archive_events(&self, no: u64, live: &ShardedBitmap) -> Result<Option<ManifestArchive>> {
        let (from, to) = (self.prev.checkpoint_lsn, self.snap.lsn);
        if to <= from {
            return Ok(None);
        }
        // The writer began a new log file at `to + 1`: these are finished.
        let files: Vec<wal::WalFile> = wal::list(&self.dir)?
            .into_iter()
            .filter(|f| f.first_lsn <= to)
            .collect();
        let mut out: Option<ArchiveWriter> = None;
        let (mut first_ms, mut last_ms) = (i64::MAX, i64::MIN);
        wal::read_finished(&self.dir, &files, from, to, |lsn, kind, payload| {
            if kind != KIND_BATCH {
                return Err(Error::BadRecord(format!("unknown record kind {kind}")));
            }
            let batch = Batch::decode(payload).map_err(|e| {
                Error::BadRecord(format!(
                    "record lsn {lsn}: undecodable batch at payload offset {}: {}",
                    e.offset, e.reason
                ))
            })?;
            for e in batch.events.iter().filter(|e| live.contains(e.customer)) {
                if out.is_none() {
                    out = Some(ArchiveWriter::create(&self.dir, no)?);
                }
                if let Some(w) = out.as_mut() {
                    w.push(e.customer, &e.bytes)?;
                }
                first_ms = first_ms.min(batch.at_ms);
                last_ms = last_ms.max(batch.at_ms);
            }
            Ok(())
        })?;
        let Some(w) = out else {
            return Ok(None);
        };
        let events = w.events();
        let bytes = w.finish()?;
        Ok(Some(ManifestArchive {
            no,
            from_lsn: from,
            to_lsn: to,
            first_ms,
            last_ms,
            events,
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{dict_merge_from, requested_merge_from};

    #[test]
    fn a_requested_merge_rewrites_only_what_it_must() {
        // One clean section and a few new keys: only the new keys.
        assert_eq!(requested_merge_from(&[1_000_000], &[false], 1, None), None);
        assert_eq!(
            requested_merge_from(&[1_000_000, 9], &[false, false], 1, None),
            Some(1)
        );
        // Nothing new, one clean section: nothing at all.
        assert_eq!(requested_merge_from(&[1_000_000], &[false], 0, None), None);
        // Erased keys in the oldest: everything.
        assert_eq!(
            requested_merge_from(&[1_000_000], &[true], 0, None),
            Some(0)
        );
        assert_eq!(
            requested_merge_from(&[1_000_000, 9], &[true, false], 0, None),
            Some(0)
        );
        // Erased keys only in the newer one: from there.
        assert_eq!(
            requested_merge_from(&[1_000_000, 9], &[false, true], 0, None),
            Some(1)
        );
        // A tail of 1/64 or more: everything, into one section.
        assert_eq!(
            requested_merge_from(&[630_000, 10_000], &[false, false], 0, None),
            Some(0)
        );
        assert_eq!(
            requested_merge_from(&[1000, 800, 400], &[false; 3], 5, None),
            Some(0)
        );
        // A compaction victim's section is merged too.
        assert_eq!(
            requested_merge_from(&[1_000_000, 5], &[false, false], 0, Some(0)),
            Some(0)
        );
        assert_eq!(requested_merge_from(&[], &[], 7, None), None);
    }

    /// Runs `checkpoints` checkpoints of `per` new keys each through the
    /// policy; returns the section sizes and the keys written in all.
    fn load(checkpoints: usize, per: usize, max: usize) -> (Vec<usize>, usize) {
        let (mut sizes, mut written) = (Vec::new(), 0);
        for _ in 0..checkpoints {
            match dict_merge_from(&sizes, per, None, max) {
                Some(from) => {
                    let merged = sizes.drain(from..).sum::<usize>() + per;
                    written += merged;
                    sizes.push(merged);
                }
                None => {
                    written += per;
                    sizes.push(per);
                }
            }
        }
        (sizes, written)
    }

    #[test]
    fn sections_double_in_size_from_newest_to_oldest() {
        let (sizes, written) = load(4, 2_500_000, 8);
        assert_eq!(sizes, vec![10_000_000]);
        assert_eq!(written, 20_000_000);
        let (sizes, written) = load(40, 2_500_000, 8);
        assert_eq!(sizes, vec![80_000_000, 20_000_000]);
        assert_eq!(written, 330_000_000);
        for n in 1..200 {
            let (sizes, _) = load(n, 1000, 64);
            for w in sizes.windows(2) {
                assert!(w[0] > w[1], "{n}: {sizes:?}");
            }
            let sum: usize = sizes.iter().sum();
            for (i, s) in sizes.iter().enumerate() {
                assert!(*s > sizes[i + 1..].iter().sum::<usize>(), "{n}: {sizes:?}");
            }
            assert_eq!(sum, n * 1000);
            assert!(
                sizes.len() <= (n as f64).log2() as usize + 1,
                "{n}: {sizes:?}"
            );
        }
    }

    #[test]
    fn no_new_keys_no_merge_unless_a_victim_or_too_many() {
        assert_eq!(dict_merge_from(&[8, 4, 2], 0, None, 8), None);
        assert_eq!(dict_merge_from(&[], 0, None, 8), None);
        // A section in a compaction victim is rewritten, with all newer ones.
        assert_eq!(dict_merge_from(&[8, 4, 2], 0, Some(1), 8), Some(1));
        assert_eq!(dict_merge_from(&[8, 4, 2], 1, Some(1), 8), Some(1));
        assert_eq!(dict_merge_from(&[8, 4, 2], 1, Some(2), 8), Some(2));
        assert_eq!(dict_merge_from(&[8, 4, 2], 2, Some(2), 8), Some(0));
        // The cap merges everything.
        assert_eq!(dict_merge_from(&[64, 32, 16, 8], 1, None, 4), Some(0));
        assert_eq!(dict_merge_from(&[64, 32, 16, 8], 1, None, 5), None);
        assert_eq!(dict_merge_from(&[64, 32, 16, 8], 0, None, 4), None);
    }

    #[test]
    fn new_keys_merge_the_tiers_they_reach() {
        assert_eq!(dict_merge_from(&[100], 10, None, 8), None);
        assert_eq!(dict_merge_from(&[100], 100, None, 8), Some(0));
        assert_eq!(dict_merge_from(&[100, 40], 40, None, 8), Some(1));
        assert_eq!(dict_merge_from(&[100, 40], 60, None, 8), Some(0));
        assert_eq!(dict_merge_from(&[100, 40, 10], 5, None, 8), None);
        assert_eq!(dict_merge_from(&[100, 40, 10], 30, None, 8), Some(1));
    }
}
