//! The writer's working state and the one function that changes it:
//! [`State::apply`], used both for new writes and for replaying the log, so
//! the two can never disagree.

use crate::storage::feed::{Change as FeedChange, Subject as FeedSubject};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;

use crate::bitmap::ShardedBitmap;
use crate::error::{Error, Result};
use crate::fields::time::{self, Bucket};
use crate::fields::{INT_EXISTS, bsi, int_slot};
use crate::storage::dictionary::identities::FirstSeen;
use crate::storage::merges::MergeEntry;
use crate::storage::record::{Batch, ChangeOp, FieldChange, SnapshotChange};
use crate::storage::seen::{self, Seen};
use crate::storage::snapshot::{
    AudienceMeta, AudienceSnapshot, Field, FieldMeta, KEPT_REJECTS, KeptReject, LazyBitmap, Rule,
    SlotMap, Snapshot, SourceMeta, Tag, TagMeta,
};

/// Customers in one integer field's change from which its bit slices are
/// changed by sharded bitmap operations rather than id by id.
const MANY_VALUES: u64 = 4_096;

/// What applying a batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: u64,
    pub removed: u64,
    pub new_customers: u64,
    pub deleted: u64,
    pub dropped_members: u64,
    /// Integer and enumerated values set.
    pub values_set: u64,
    /// Integer and enumerated values cleared (customers that had one).
    pub values_cleared: u64,
    /// Behaviour buckets newly gained by customers.
    pub events_added: u64,
    /// Ingested events remembered for de-duplication.
    pub events_seen: u64,
    /// Customers merged into others.
    pub merged: u64,
    /// Rule tag memberships and lifecycle stages the rules changed.
    pub rule_changes: u64,
    /// Memberships added and removed by each of the batch's `changes`, in
    /// order (what each request of a combined batch is told).
    pub per_change: Vec<(u64, u64)>,
}

/// The writer's copy of the store: the next snapshot, plus what changed since
/// the last checkpoint.
pub struct State {
    pub snap: Snapshot,
    pub tag_names: HashMap<u32, Arc<str>>,
    /// Tags created or changed since the last checkpoint began.
    pub dirty_tags: HashSet<u32>,
    /// Audience snapshots whose members no segment holds yet (by the id
    /// that names them on disk).
    pub dirty_snapshots: HashSet<u32>,
    /// Whether the history changed since the last checkpoint began.
    pub history_dirty: bool,
    /// Whether the live set changed since the last checkpoint began.
    pub dirty_live: bool,
    pub field_names: HashMap<u32, Arc<str>>,
    /// Field slots changed since the last checkpoint began.
    pub dirty_slots: HashSet<(u32, u32)>,
    /// Ingested events remembered for de-duplication (the writer's alone:
    /// not part of the published snapshot).
    pub seen: Seen,
    /// Customers whose events were ingested after lsn `ingested.0` (the
    /// last checkpoint begun): a rebuild of facts read from the archive up
    /// to that lsn must leave them be.
    pub ingested: (u64, RoaringBitmap),
    /// Whether the merge log changed since the last checkpoint began.
    pub merges_dirty: bool,
    /// Whether applying works out the change feed's entries.
    pub feed_on: bool,
    /// The memberships the last batch applied changed, for the feed (when
    /// `feed_on`): per tag and enumerated value, who entered and left.
    pub feed: Vec<crate::storage::feed::Change>,
}

fn unknown_field(id: u32) -> Error {
    Error::BadRecord(format!(
        "record refers to field id {id}, which does not exist"
    ))
}

/// A mutable slot bitmap, created empty when missing.
fn slot_mut(slots: &mut SlotMap, slot: u32) -> Result<&mut ShardedBitmap> {
    slots
        .entry(slot)
        .or_insert_with(LazyBitmap::empty)
        .make_mut()
}

fn unknown_tag(id: u32) -> Error {
    Error::BadRecord(format!(
        "record refers to tag id {id}, which does not exist"
    ))
}

impl State {
    pub fn new(snap: Snapshot) -> Self {
        let tag_names = snap
            .tags
            .values()
            .map(|t| (t.id, t.meta.name.clone()))
            .collect();
        let field_names = snap
            .fields
            .values()
            .map(|f| (f.id, f.meta.name.clone()))
            .collect();
        Self {
            ingested: (snap.lsn, RoaringBitmap::new()),
            merges_dirty: false,
            snap,
            tag_names,
            dirty_tags: HashSet::new(),
            dirty_snapshots: HashSet::new(),
            history_dirty: false,
            dirty_live: false,
            field_names,
            dirty_slots: HashSet::new(),
            seen: Seen::default(),
            feed_on: false,
            feed: Vec::new(),
        }
    }

    pub fn field_by_id(&self, id: u32) -> Option<&Arc<Field>> {
        self.snap.fields.get(self.field_names.get(&id)?)
    }

    /// Applies one change to a field's slots; returns the stats it adds.
    fn apply_field(&mut self, c: &FieldChange, at_ms: i64) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let field_id = c.field();
        let name = self
            .field_names
            .get(&field_id)
            .ok_or_else(|| unknown_field(field_id))?;
        let field = Arc::make_mut(
            self.snap
                .fields
                .get_mut(name)
                .ok_or_else(|| unknown_field(field_id))?,
        );
        field.meta.updated_ms = at_ms;
        let mut touched: Vec<u32> = Vec::new();
        let slots = &mut field.slots;
        match c {
            FieldChange::Int { set, clear, .. } => {
                // Planned in ascending id order, so each bitmap is built
                // from a sorted list (any order is still applied right).
                let bitmap = |ids: &[u32]| {
                    RoaringBitmap::from_sorted_iter(ids.iter().copied())
                        .unwrap_or_else(|_| ids.iter().copied().collect())
                };
                let mut ids = Vec::with_capacity(set.len());
                let mut per_bit = vec![Vec::new(); bsi::BITS];
                for &(id, v) in set {
                    ids.push(id);
                    let mut u = bsi::encode(v);
                    while u != 0 {
                        per_bit[u.trailing_zeros() as usize].push(id);
                        u &= u - 1;
                    }
                }
                let set_ids = bitmap(&ids);
                let ones: Vec<RoaringBitmap> = per_bit.iter().map(|v| bitmap(v)).collect();
                let all = &set_ids | clear;
                let exists = slot_mut(slots, INT_EXISTS)?;
                stats.values_cleared += exists.difference_with(clear);
                exists.union_with(&set_ids);
                stats.values_set += set_ids.len();
                touched.push(INT_EXISTS);
                // Many customers (a batch of ingested records): the
                // customers written are made a sharded bitmap once, not once
                // per bit slice.
                let all_sharded =
                    (all.len() >= MANY_VALUES).then(|| ShardedBitmap::from_roaring(&all));
                for (k, bits) in ones.iter().enumerate() {
                    let slot = int_slot(k);
                    if bits.is_empty() && !slots.contains_key(&slot) {
                        continue;
                    }
                    let b = slot_mut(slots, slot)?;
                    match (&all_sharded, bits.is_empty()) {
                        (Some(all), true) => {
                            b.difference_sharded(all);
                        }
                        (Some(all), false) => {
                            let bits = ShardedBitmap::from_roaring(bits);
                            b.difference_sharded(&all.and_not(&bits));
                            b.union_sharded(&bits);
                        }
                        (None, true) => {
                            b.difference_with(&all);
                        }
                        (None, false) => {
                            b.difference_with(&(&all - bits));
                            b.union_with(bits);
                        }
                    }
                    touched.push(slot);
                }
            }
            FieldChange::Enum { set, clear, .. } => {
                let mut moving = RoaringBitmap::new();
                for (_, ids) in set {
                    moving |= ids;
                }
                let leaving = clear | &moving;
                let existing: Vec<u32> = slots.keys().copied().collect();
                for slot in existing {
                    let b = slots.get(&slot).map(LazyBitmap::get).transpose()?;
                    if b.is_some_and(|b| b.intersects(&leaving)) {
                        let b = slot_mut(slots, slot)?;
                        stats.values_cleared += b.difference_with(clear);
                        b.difference_with(&moving);
                        touched.push(slot);
                    }
                }
                for (slot, ids) in set {
                    slot_mut(slots, *slot)?.union_with(ids);
                    stats.values_set += ids.len();
                    touched.push(*slot);
                }
            }
            FieldChange::Events { add, .. } => {
                for (slot, ids) in add {
                    stats.events_added += slot_mut(slots, *slot)?.union_with(ids);
                    touched.push(*slot);
                }
            }
            FieldChange::DropSlots { slots: drop, .. } => {
                for slot in drop {
                    slots.remove(slot);
                    touched.push(*slot);
                }
            }
            FieldChange::Erase { ids, .. } => {
                let existing: Vec<u32> = slots.keys().copied().collect();
                for slot in existing {
                    let b = slots.get(&slot).map(LazyBitmap::get).transpose()?;
                    if b.is_some_and(|b| b.intersects(ids)) {
                        let b = slot_mut(slots, slot)?;
                        b.difference_with(ids);
                        touched.push(slot);
                    }
                }
            }
            FieldChange::Rollup { month, .. } => {
                let first = time::month_first_day(*month) as u32;
                let last = time::month_last_day(*month) as u32;
                let days: Vec<u32> = slots.range(first..=last).map(|(s, _)| *s).collect();
                let mut merged = Vec::with_capacity(days.len());
                for d in &days {
                    if let Some(b) = slots.remove(d) {
                        merged.push(b);
                    }
                    touched.push(*d);
                }
                let month_slot = Bucket::Month(*month).slot();
                let month_bits = slot_mut(slots, month_slot)?;
                for b in &merged {
                    month_bits.union_sharded(b.get()?);
                }
                touched.push(month_slot);
            }
        }
        for slot in touched {
            if slots
                .get(&slot)
                .is_some_and(|b| b.is_loaded() && b.get().is_ok_and(|b| b.is_empty()))
            {
                slots.remove(&slot);
            }
            self.dirty_slots.insert((field_id, slot));
        }
        Ok(stats)
    }

    pub fn tag_by_id(&self, id: u32) -> Option<&Arc<Tag>> {
        self.snap.tags.get(self.tag_names.get(&id)?)
    }

    fn tag_mut(&mut self, id: u32) -> Result<&mut Tag> {
        let name = self.tag_names.get(&id).ok_or_else(|| unknown_tag(id))?;
        let tag = self
            .snap
            .tags
            .get_mut(name)
            .ok_or_else(|| unknown_tag(id))?;
        Ok(Arc::make_mut(tag))
    }

    /// Takes the customers `gone` out of every field slot and every tag (the
    /// live set is the caller's).
    fn remove_everywhere(&mut self, gone: &RoaringBitmap, at_ms: i64) -> Result<()> {
        let fields: Vec<u32> = self.field_names.keys().copied().collect();
        for fid in fields {
            let Some(f) = self.field_by_id(fid) else {
                continue;
            };
            let mut touched = Vec::new();
            for (slot, bm) in &f.slots {
                if bm.get()?.intersects(gone) {
                    touched.push(*slot);
                }
            }
            if touched.is_empty() {
                continue;
            }
            let name = self
                .field_names
                .get(&fid)
                .ok_or_else(|| unknown_field(fid))?;
            let field = Arc::make_mut(
                self.snap
                    .fields
                    .get_mut(name)
                    .ok_or_else(|| unknown_field(fid))?,
            );
            field.meta.updated_ms = at_ms;
            for slot in touched {
                let bm = slot_mut(&mut field.slots, slot)?;
                bm.difference_with(gone);
                if bm.is_empty() {
                    field.slots.remove(&slot);
                }
                self.dirty_slots.insert((fid, slot));
            }
        }
        let ids: Vec<u32> = self.tag_names.keys().copied().collect();
        for id in ids {
            let touched = match self.tag_by_id(id) {
                Some(t) => t.bitmap.get()?.intersects(gone),
                None => false,
            };
            if touched {
                let tag = self.tag_mut(id)?;
                let bm = tag.bitmap.make_mut()?;
                bm.difference_with(gone);
                tag.meta.count = bm.len();
                tag.meta.updated_ms = at_ms;
                self.dirty_tags.insert(id);
            }
        }
        Ok(())
    }

    /// Takes customers `gone` (erased, or merged into others) out of every
    /// audience snapshot, so that a snapshot's members are live customers
    /// as a tag's are; a merged customer's place goes to its survivor
    /// (`moved`: absorbed, survivor), as its tags do. Snapshots sharing
    /// members keep sharing them.
    fn freeze_out(&mut self, gone: &RoaringBitmap, moved: &[(u32, u32)]) -> Result<()> {
        if self.snap.snapshots.is_empty() {
            return Ok(());
        }
        let mut changed: HashMap<u32, LazyBitmap> = HashMap::new();
        for s in self.snap.snapshots.values() {
            if changed.contains_key(&s.blob) {
                continue;
            }
            let bm = s.members.get()?;
            if !bm.intersects(gone) {
                continue;
            }
            let mut new = bm.clone();
            for &(absorbed, survivor) in moved {
                if bm.contains(absorbed) {
                    new.insert(survivor);
                }
            }
            new.difference_with(gone);
            changed.insert(s.blob, LazyBitmap::loaded(new));
        }
        if changed.is_empty() {
            return Ok(());
        }
        let ids: Vec<u32> = self
            .snap
            .snapshots
            .values()
            .filter(|s| changed.contains_key(&s.blob))
            .map(|s| s.id)
            .collect();
        for id in ids {
            if let Some(s) = self.snap.snapshots.get_mut(&id) {
                let s = Arc::make_mut(s);
                if let Some(m) = changed.get(&s.blob) {
                    s.members = m.clone();
                }
            }
        }
        self.dirty_snapshots.extend(changed.into_keys());
        Ok(())
    }

    /// Applies one logged batch. Applying a batch that is already reflected
    /// changes nothing further.
    pub fn apply(&mut self, lsn: u64, b: &Batch) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        self.feed.clear();
        // The tags and fields before, for the feed. A batch that only
        // changes memberships and values of existing tags and fields keeps
        // the members of the customers it touches (taken below, once the
        // touched are known); any other keeps copies of the maps, which
        // share every entry until the batch changes it. Sharing costs a
        // copy of every shard the batch then changes, for every batch of a
        // group: a durable single write would copy its tag's shard.
        let light = self.feed_on
            && b.new_tags.is_empty()
            && b.drop_tags.is_empty()
            && b.new_fields.is_empty()
            && b.drop_fields.is_empty()
            && b.rules.is_empty()
            && b.deletes.is_empty()
            && b.merges.is_empty()
            && b.unmerges.is_empty();
        let mut before =
            (self.feed_on && !light).then(|| (self.snap.tags.clone(), self.snap.fields.clone()));
        for t in &b.new_tags {
            if self.tag_names.contains_key(&t.id) {
                continue;
            }
            let name: Arc<str> = Arc::from(t.name.as_str());
            let tag = Tag {
                id: t.id,
                meta: TagMeta {
                    name: name.clone(),
                    description: t.description.clone(),
                    category: t.category.clone(),
                    created_ms: b.at_ms,
                    updated_ms: b.at_ms,
                    count: 0,
                },
                bitmap: LazyBitmap::empty(),
            };
            self.snap.tags.insert(name.clone(), Arc::new(tag));
            self.tag_names.insert(t.id, name);
            self.snap.next_tag_id = self.snap.next_tag_id.max(t.id + 1);
            self.dirty_tags.insert(t.id);
        }
        for f in &b.new_fields {
            if self.field_names.contains_key(&f.id) {
                continue;
            }
            let name: Arc<str> = Arc::from(f.name.as_str());
            let field = Field {
                id: f.id,
                meta: FieldMeta {
                    name: name.clone(),
                    description: f.description.clone(),
                    category: f.category.clone(),
                    kind: f.kind.clone(),
                    created_ms: b.at_ms,
                    updated_ms: b.at_ms,
                    merge: f.merge,
                },
                slots: SlotMap::new(),
            };
            self.snap.fields.insert(name.clone(), Arc::new(field));
            self.field_names.insert(f.id, name);
            self.snap.next_tag_id = self.snap.next_tag_id.max(f.id + 1);
        }
        if !b.new_keys.is_empty() {
            let live = self.snap.live.make_mut()?;
            for (id, key) in &b.new_keys {
                stats.new_customers += live.insert(*id) as u64;
                self.snap.dict.insert(*id, key);
                self.snap.next_customer_id = self.snap.next_customer_id.max(id + 1);
            }
            self.dirty_live = true;
        }
        for l in &b.identities {
            let seen = FirstSeen {
                first_ms: l.first_ms,
                place: l.place.clone(),
            };
            self.snap
                .idents
                .insert(l.customer, &l.identity, &seen, lsn)?;
        }
        // What the batch changes, for the rules that read it.
        let mut touch = (self.feed_on || !self.snap.rules.is_empty() || !b.rules.is_empty())
            .then(Touch::default);
        if let Some(t) = &mut touch {
            t.all
                .union_with(&b.new_keys.iter().map(|(id, _)| *id).collect());
            for m in b.merges.iter().filter(|m| m.refused.is_empty()) {
                t.all.insert(m.survivor);
            }
            for u in &b.unmerges {
                t.all.insert(u.revived);
                t.all.insert(u.survivor);
            }
            for c in &b.changes {
                let Some(name) = self.tag_names.get(&c.tag).cloned() else {
                    continue;
                };
                let ids = if c.op == ChangeOp::Replace {
                    match self.tag_by_id(c.tag) {
                        Some(tag) => tag.bitmap.get()?.xor(&ShardedBitmap::from_roaring(&c.ids)),
                        None => ShardedBitmap::from_roaring(&c.ids),
                    }
                } else {
                    ShardedBitmap::from_roaring(&c.ids)
                };
                t.add(name, &ids);
            }
            for c in &b.field_changes {
                self.field_touch(c, t)?;
            }
            if light {
                before = Some(self.touched_before(t)?);
            }
        }
        for c in &b.changes {
            let tag = self.tag_mut(c.tag)?;
            let bm = tag.bitmap.make_mut()?;
            let (added, removed) = match c.op {
                ChangeOp::Add => (bm.union_with(&c.ids), 0),
                ChangeOp::Remove => (0, bm.difference_with(&c.ids)),
                ChangeOp::Replace => {
                    let new = ShardedBitmap::from_roaring(&c.ids);
                    let both = bm.intersection_len(&new);
                    let counts = (new.len() - both, bm.len() - both);
                    *bm = new;
                    counts
                }
            };
            stats.added += added;
            stats.removed += removed;
            stats.per_change.push((added, removed));
            tag.meta.count = bm.len();
            tag.meta.updated_ms = b.at_ms;
            self.dirty_tags.insert(c.tag);
        }
        for c in &b.field_changes {
            let st = self.apply_field(c, b.at_ms)?;
            stats.values_set += st.values_set;
            stats.values_cleared += st.values_cleared;
            stats.events_added += st.events_added;
        }
        if !b.merges.is_empty() {
            let absorbed: RoaringBitmap = b
                .merges
                .iter()
                .filter(|m| m.refused.is_empty())
                .map(|m| m.absorbed)
                .collect();
            self.remove_everywhere(&absorbed, b.at_ms)?;
            let moved: Vec<(u32, u32)> = b
                .merges
                .iter()
                .filter(|m| m.refused.is_empty())
                .map(|m| (m.absorbed, m.survivor))
                .collect();
            self.freeze_out(&absorbed, &moved)?;
            stats.merged = self.snap.live.make_mut()?.difference_with(&absorbed);
            self.dirty_live = true;
            let mut log = self.snap.merges.write();
            for m in &b.merges {
                // Its facts changed by more than its own archived events: a
                // rebuild that read the archive before now leaves it be.
                if m.refused.is_empty() {
                    self.ingested.1.insert(m.survivor);
                }
                log.push(MergeEntry {
                    id: m.id,
                    lsn,
                    at_ms: b.at_ms,
                    survivor: m.survivor,
                    absorbed: m.absorbed,
                    via: m.via.clone(),
                    refused: m.refused.clone(),
                    moved: m.moved.clone(),
                    undo: m.undo.clone(),
                    undone_lsn: 0,
                    undone_ms: 0,
                });
            }
            self.merges_dirty = true;
            // A merged customer due a rebuild: its survivor is, now.
            if b.merges
                .iter()
                .any(|m| self.snap.rebuild_due.contains(m.absorbed))
            {
                let due = Arc::make_mut(&mut self.snap.rebuild_due);
                for m in b.merges.iter().filter(|m| m.refused.is_empty()) {
                    if due.remove(m.absorbed) {
                        due.insert(m.survivor);
                    }
                }
            }
        }
        if !b.unmerges.is_empty() {
            let live = self.snap.live.make_mut()?;
            let mut log = self.snap.merges.write();
            for u in &b.unmerges {
                live.insert(u.revived);
                if u.identity.is_empty() {
                    log.undo(u.merge, lsn, b.at_ms);
                } else {
                    // An identity taken off: logged as a split, the two
                    // customers kept apart.
                    log.push(MergeEntry {
                        id: u.merge,
                        lsn,
                        at_ms: b.at_ms,
                        survivor: u.survivor,
                        absorbed: u.revived,
                        via: u.identity.clone(),
                        refused: String::new(),
                        moved: u.moved.clone(),
                        undo: Default::default(),
                        undone_lsn: lsn,
                        undone_ms: b.at_ms,
                    });
                }
                // Their facts changed by more than their archived events.
                self.ingested.1.insert(u.revived);
                self.ingested.1.insert(u.survivor);
            }
            self.dirty_live = true;
            self.merges_dirty = true;
        }
        if !b.deletes.is_empty() {
            self.snap.erased_lsn = lsn;
            self.remove_everywhere(&b.deletes, b.at_ms)?;
            self.freeze_out(&b.deletes, &[])?;
            stats.deleted = self.snap.live.make_mut()?.difference_with(&b.deletes);
            self.snap.dict.forget(b.deletes.iter());
            self.dirty_live = true;
            if self.snap.merges.write().scrub(&b.deletes) {
                self.merges_dirty = true;
            }
            if self.snap.rebuild_due.intersection_len(&b.deletes) > 0 {
                *Arc::make_mut(&mut self.snap.rebuild_due) -= &b.deletes;
            }
        }
        for id in &b.drop_tags {
            if let Some(name) = self.tag_names.remove(id) {
                if let Some(t) = self.snap.tags.remove(&name) {
                    stats.dropped_members += t.meta.count;
                }
                self.dirty_tags.remove(id);
            }
        }
        for id in &b.drop_fields {
            if let Some(name) = self.field_names.remove(id) {
                self.snap.fields.remove(&name);
                self.dirty_slots.retain(|(f, _)| f != id);
            }
        }
        for c in &b.sources {
            match &c.definition {
                Some(definition) => {
                    let name: Arc<str> = Arc::from(c.name.as_str());
                    let (created_ms, paused) = self
                        .snap
                        .sources
                        .get(&name)
                        .map_or((b.at_ms, false), |s| (s.created_ms, s.paused));
                    self.snap.sources.insert(
                        name.clone(),
                        Arc::new(SourceMeta {
                            name,
                            definition: definition.clone(),
                            created_ms,
                            updated_ms: b.at_ms,
                            paused,
                        }),
                    );
                }
                None => {
                    self.snap.sources.remove(c.name.as_str());
                    self.snap.positions.remove(c.name.as_str());
                    self.snap.rejects.remove(c.name.as_str());
                }
            }
        }
        for (name, paused) in &b.pauses {
            if let Some(s) = self.snap.sources.get(name.as_str()) {
                let s = Arc::new(SourceMeta {
                    paused: *paused,
                    ..(**s).clone()
                });
                self.snap.sources.insert(s.name.clone(), s);
            }
        }
        for p in &b.positions {
            let name: Arc<str> = Arc::from(p.source.as_str());
            let mut at = self
                .snap
                .positions
                .get(&name)
                .map(|a| (**a).clone())
                .unwrap_or_default();
            for (topic, partition, next) in &p.next {
                at.insert((topic.clone(), *partition), *next);
            }
            self.snap.positions.insert(name, Arc::new(at));
        }
        // Each source's kept rejects copied once per batch, however many
        // it rejected.
        let mut touched: BTreeMap<&str, std::collections::VecDeque<KeptReject>> = BTreeMap::new();
        for r in &b.rejects {
            let kept = touched.entry(r.source.as_str()).or_insert_with(|| {
                self.snap
                    .rejects
                    .get(r.source.as_str())
                    .map(|k| (**k).clone())
                    .unwrap_or_default()
            });
            while kept.len() >= KEPT_REJECTS {
                kept.pop_front();
            }
            kept.push_back(KeptReject {
                skipped: r.skipped,
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                at_ms: b.at_ms,
                reason: r.reason.clone(),
            });
        }
        for (name, kept) in touched {
            self.snap.rejects.insert(Arc::from(name), Arc::new(kept));
        }
        if !b.rebuilt.is_empty() || !b.rebuild_due.is_empty() {
            let due = Arc::make_mut(&mut self.snap.rebuild_due);
            *due -= &b.rebuilt;
            *due |= &b.rebuild_due;
        }
        for c in &b.audiences {
            match &c.definition {
                Some(d) => {
                    let name: Arc<str> = Arc::from(c.name.as_str());
                    let created_ms = self
                        .snap
                        .audiences
                        .get(&name)
                        .map_or(b.at_ms, |a| a.created_ms);
                    self.snap.audiences.insert(
                        name.clone(),
                        Arc::new(AudienceMeta {
                            name,
                            query: d.query.clone(),
                            description: d.description.clone(),
                            owner: d.owner.clone(),
                            category: d.category.clone(),
                            uses: d.uses.clone(),
                            created_ms,
                            updated_ms: b.at_ms,
                        }),
                    );
                }
                None => {
                    self.snap.audiences.remove(c.name.as_str());
                }
            }
        }
        for c in &b.snapshots {
            match c {
                SnapshotChange::Take(t) => {
                    if self.snap.snapshots.contains_key(&t.id) {
                        continue;
                    }
                    let (members, blob) = match &t.members {
                        Some(m) => {
                            self.dirty_snapshots.insert(t.id);
                            (LazyBitmap::loaded(ShardedBitmap::from_roaring(m)), t.id)
                        }
                        None => match self.snap.snapshots.get(&t.same_as) {
                            Some(o) => (o.members.clone(), o.blob),
                            None => {
                                return Err(Error::BadRecord(format!(
                                    "log record {lsn}: snapshot {} shares the members of snapshot {}, which is not there",
                                    t.id, t.same_as
                                )));
                            }
                        },
                    };
                    let count = members.get()?.len();
                    self.snap.snapshots.insert(
                        t.id,
                        Arc::new(AudienceSnapshot {
                            id: t.id,
                            audience: t.audience.clone(),
                            query: t.query.clone(),
                            taken_lsn: t.taken_lsn,
                            at_ms: b.at_ms,
                            note: t.note.clone(),
                            count,
                            members,
                            blob,
                        }),
                    );
                    self.snap.next_snapshot_id = self.snap.next_snapshot_id.max(t.id + 1);
                }
                SnapshotChange::Drop { id } => {
                    self.snap.snapshots.remove(id);
                }
            }
        }
        if let Some(h) = &b.history {
            Arc::make_mut(&mut self.snap.history).record(h.day, &h.counts, h.keep_from);
            self.history_dirty = true;
        }
        self.seen.insert(seen::day_of(b.at_ms), &b.seen);
        stats.events_seen = b.seen.len() as u64;
        for &day in &b.drop_seen_days {
            self.seen.drop_day(day);
        }
        for e in &b.events {
            self.ingested.1.insert(e.customer);
        }
        if let Some(mut t) = touch {
            let (changes, defined) = self.refresh_rules(b, &mut t)?;
            stats.rule_changes = changes;
            if let Some((tags, fields)) = before {
                let mut gone = ShardedBitmap::from_roaring(&b.deletes);
                for m in b.merges.iter().filter(|m| m.refused.is_empty()) {
                    gone.insert(m.absorbed);
                }
                let every = !gone.is_empty()
                    || !b.new_tags.is_empty()
                    || !b.drop_tags.is_empty()
                    || !b.new_fields.is_empty()
                    || !b.drop_fields.is_empty()
                    || !b.rules.is_empty();
                self.feed = self.feed_changes(&tags, &fields, &t, &gone, &defined, every)?;
            }
        }
        self.snap.lsn = lsn;
        Ok(stats)
    }

    /// The tags and fields before a batch that only changes memberships and
    /// values, as [`State::feed_changes`] compares them: of each tag and
    /// enumerated field the batch touches, its members among the customers
    /// it touches for that name (all the comparison reads); what rules
    /// write, as it is (a rule's tag or field is copied only where it moves
    /// someone, and whom it moves is known only once it has run).
    fn touched_before(
        &self,
        t: &Touch,
    ) -> Result<(
        crate::storage::snapshot::TagMap,
        crate::storage::snapshot::FieldMap,
    )> {
        let mut tags = crate::storage::snapshot::TagMap::new();
        let mut fields = crate::storage::snapshot::FieldMap::new();
        for name in self.snap.rules.by_name.keys() {
            if let Some(tag) = self.snap.tags.get(name) {
                tags.insert(name.clone(), tag.clone());
            }
            if let Some(field) = self.snap.fields.get(name) {
                fields.insert(name.clone(), field.clone());
            }
        }
        for (name, ids) in &t.by_name {
            let mut among = t.all.clone();
            among.union_sharded(ids);
            if let Some(tag) = self.snap.tags.get(name)
                && !tags.contains_key(name)
            {
                let members = tag.bitmap.get()?.and(&among);
                tags.insert(
                    name.clone(),
                    Arc::new(Tag {
                        id: tag.id,
                        meta: tag.meta.clone(),
                        bitmap: LazyBitmap::loaded(members),
                    }),
                );
            }
            if let Some(field) = self.snap.fields.get(name)
                && matches!(field.meta.kind, crate::fields::FieldKind::Enum { .. })
                && !fields.contains_key(name)
            {
                let mut slots = SlotMap::new();
                for (slot, bitmap) in field.slots.iter() {
                    let members = bitmap.get()?.and(&among);
                    if !members.is_empty() {
                        slots.insert(*slot, LazyBitmap::loaded(members));
                    }
                }
                fields.insert(
                    name.clone(),
                    Arc::new(Field {
                        id: field.id,
                        meta: field.meta.clone(),
                        slots,
                    }),
                );
            }
        }
        Ok((tags, fields))
    }

    /// The customers a field change touches, into `t`.
    fn field_touch(&self, c: &FieldChange, t: &mut Touch) -> Result<()> {
        let Some(field) = self.field_by_id(c.field()) else {
            return Ok(());
        };
        let mut ids = ShardedBitmap::new();
        match c {
            FieldChange::Int { set, clear, .. } => {
                ids.union_with(&set.iter().map(|(id, _)| *id).collect());
                ids.union_with(clear);
            }
            FieldChange::Enum { set, clear, .. } => {
                for (_, s) in set {
                    ids.union_with(s);
                }
                ids.union_with(clear);
            }
            FieldChange::Events { add, .. } => {
                for (_, s) in add {
                    ids.union_with(s);
                }
            }
            FieldChange::Erase { ids: e, .. } => {
                ids.union_with(e);
            }
            FieldChange::DropSlots { slots, .. } => {
                for slot in slots {
                    if let Some(b) = field.slots.get(slot) {
                        ids.union_sharded(b.get()?);
                    }
                }
            }
            FieldChange::Rollup { month, .. } => {
                let first = time::month_first_day(*month) as u32;
                let last = time::month_last_day(*month) as u32;
                for (_, b) in field.slots.range(first..=last) {
                    ids.union_sharded(b.get()?);
                }
            }
        }
        t.add(field.meta.name.clone(), &ids);
        Ok(())
    }

    /// Rules defined, dropped and turned to a new day by the batch, then
    /// every rule that can depend on what the batch changed evaluated again
    /// for the customers it touched (a rule defined by the batch, for
    /// everyone), in order, each seeing the rules before it already
    /// updated. Returns how many memberships and stage values changed.
    fn refresh_rules(&mut self, b: &Batch, touch: &mut Touch) -> Result<(u64, HashSet<Arc<str>>)> {
        let mut defined: HashSet<Arc<str>> = HashSet::new();
        if !b.rules.is_empty() {
            let rules = Arc::make_mut(&mut self.snap.rules);
            for c in &b.rules {
                let name: Arc<str> = Arc::from(c.name.as_str());
                match &c.definition {
                    Some(def) => {
                        let created_ms = rules.get(&name).map_or(b.at_ms, |r| r.created_ms);
                        rules.by_name.insert(
                            name.clone(),
                            Arc::new(Rule {
                                name: name.clone(),
                                def: def.clone(),
                                day: c.day,
                                created_ms,
                                updated_ms: b.at_ms,
                                stale: String::new(),
                            }),
                        );
                        defined.insert(name);
                    }
                    None => {
                        rules.by_name.remove(&name);
                    }
                }
            }
            rules.order = crate::rules::order(&rules.by_name);
            for name in &defined {
                self.prepare_lifecycle(name, b.at_ms)?;
            }
        }
        let mut day_candidates: HashMap<Arc<str>, ShardedBitmap> = HashMap::new();
        for (name, day) in &b.rule_days {
            let Some(rule) = self.snap.rules.get(name).cloned() else {
                continue;
            };
            if *day <= rule.day {
                continue;
            }
            let found = crate::rules::define::zone_of(&rule.def).and_then(|zone| {
                crate::rules::day::candidates(&self.snap, &rule.def, &zone, rule.day, *day)
            });
            let mut turned = (*rule).clone();
            turned.day = *day;
            match found {
                Ok(c) => {
                    day_candidates.insert(rule.name.clone(), c);
                }
                Err(e) if is_rule_error(&e) => turned.stale = e.to_string(),
                Err(e) => return Err(e),
            }
            Arc::make_mut(&mut self.snap.rules)
                .by_name
                .insert(rule.name.clone(), Arc::new(turned));
        }
        let mut total = 0;
        // Rules are evaluated level by level: a rule's level is one past
        // the highest of the rules it reads, so the rules of one level
        // read none of each other and are evaluated side by side on a
        // snapshot that already holds the levels before; their results
        // are then written in order.
        for level in levels(&self.snap.rules) {
            let mut work: Vec<(Arc<Rule>, Option<ShardedBitmap>)> = Vec::new();
            for name in level {
                let Some(rule) = self.snap.rules.get(&name).cloned() else {
                    continue;
                };
                // A rule that could not be evaluated before may have
                // missed changes since: once it can be, it is evaluated
                // for everyone.
                if defined.contains(&name) || !rule.stale.is_empty() {
                    work.push((rule, None));
                    continue;
                }
                // The customers who came, those whose data this rule reads
                // changed, those its new day can change, and those whose
                // rules it reads changed (already in `touch`: their level
                // came first).
                let mut among = touch.all.clone();
                for r in &rule.def.reads {
                    if let Some(ids) = touch.by_name.get(r.as_str()) {
                        among.union_sharded(ids);
                    }
                }
                if let Some(c) = day_candidates.get(&name) {
                    among.union_sharded(c);
                }
                // Erased and merged customers are gone from every tag and
                // field already.
                let among = among.and(self.snap.live()?);
                if !among.is_empty() {
                    work.push((rule, Some(among)));
                }
            }
            let results = evaluate_all(&self.snap, &work);
            for ((rule, _), result) in work.iter().zip(results) {
                let name = &rule.name;
                let outcome = match result {
                    Ok(o) => o,
                    Err(e) if is_rule_error(&e) => {
                        let mut stale = (**rule).clone();
                        stale.stale = e.to_string();
                        Arc::make_mut(&mut self.snap.rules)
                            .by_name
                            .insert(name.clone(), Arc::new(stale));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if !rule.stale.is_empty() {
                    let mut current = (**rule).clone();
                    current.stale.clear();
                    Arc::make_mut(&mut self.snap.rules)
                        .by_name
                        .insert(name.clone(), Arc::new(current));
                }
                let moved = self.install(name, outcome, b.at_ms)?;
                total += moved.len();
                if !moved.is_empty() {
                    touch.add(name.clone(), &moved);
                }
            }
        }
        Ok((total, defined))
    }

    /// Who entered and left each tag and each value of an enumerated field
    /// in this batch: `tags` and `fields` as they were before it, compared
    /// with now among the customers the batch touched for each (everyone
    /// for a rule it defined), shards it did not change skipped.
    fn feed_changes(
        &self,
        tags: &crate::storage::snapshot::TagMap,
        fields: &crate::storage::snapshot::FieldMap,
        t: &Touch,
        gone: &ShardedBitmap,
        defined: &HashSet<Arc<str>>,
        every: bool,
    ) -> Result<Vec<FeedChange>> {
        let mut out = Vec::new();
        let among = |name: &str| -> Option<ShardedBitmap> {
            if defined.contains(name) {
                return None;
            }
            let mut c = t.all.clone();
            c.union_sharded(gone);
            if let Some(ids) = t.by_name.get(name) {
                c.union_sharded(ids);
            }
            Some(c)
        };
        let empty = ShardedBitmap::new();
        fn push(
            out: &mut Vec<FeedChange>,
            subject: FeedSubject,
            old: &ShardedBitmap,
            new: &ShardedBitmap,
            among: Option<&ShardedBitmap>,
        ) {
            let (entered, left) = old.entered_left(new, among);
            if !entered.is_empty() || !left.is_empty() {
                out.push(FeedChange {
                    subject: Some(subject),
                    entered: entered.to_flat(),
                    left: left.to_flat(),
                    dropped: false,
                });
            }
        }
        // The names that can have changed: those the batch touched (rules
        // included) or defined; every one when customers went (erased or
        // merged: out of every tag and field) or tags, fields or rules were
        // made or dropped.
        let mut candidates: BTreeSet<Arc<str>> = t.by_name.keys().cloned().collect();
        candidates.extend(defined.iter().cloned());
        if every {
            candidates.extend(tags.keys().cloned());
            candidates.extend(self.snap.tags.keys().cloned());
        }
        for name in &candidates {
            let (Some(new), old) = (self.snap.tags.get(name), tags.get(name)) else {
                if tags.contains_key(name) {
                    out.push(FeedChange {
                        subject: Some(FeedSubject::Tag(name.to_string())),
                        dropped: true,
                        ..Default::default()
                    });
                }
                continue;
            };
            match old {
                Some(old) if Arc::ptr_eq(old, new) || old.bitmap.same(&new.bitmap) => {}
                Some(old) => push(
                    &mut out,
                    FeedSubject::Tag(name.to_string()),
                    old.bitmap.get()?,
                    new.bitmap.get()?,
                    among(name).as_ref(),
                ),
                None => push(
                    &mut out,
                    FeedSubject::Tag(name.to_string()),
                    &empty,
                    new.bitmap.get()?,
                    None,
                ),
            }
        }
        let values = |f: &Field| match &f.meta.kind {
            crate::fields::FieldKind::Enum { values } => Some(values.clone()),
            _ => None,
        };
        let mut field_names: BTreeSet<Arc<str>> = t.by_name.keys().cloned().collect();
        field_names.extend(defined.iter().cloned());
        if every {
            field_names.extend(self.snap.fields.keys().cloned());
        }
        for name in &field_names {
            let Some(new) = self.snap.fields.get(name) else {
                continue;
            };
            let old = fields.get(name);
            if old.is_some_and(|o| Arc::ptr_eq(o, new)) {
                continue;
            }
            let new_values = values(new);
            let old_values = old.and_then(|o| values(o));
            if new_values.is_none() && old_values.is_none() {
                continue;
            }
            let c = old.and(among(name));
            let mut names: Vec<&String> = new_values.iter().flatten().collect();
            for v in old_values.iter().flatten() {
                if !names.contains(&v) {
                    names.push(v);
                }
            }
            for v in names {
                fn slot_of<'f>(
                    f: &'f Field,
                    vals: &Option<Vec<String>>,
                    v: &str,
                ) -> Option<&'f LazyBitmap> {
                    vals.as_ref()
                        .and_then(|vs| vs.iter().position(|x| x == v))
                        .and_then(|i| f.slots.get(&(i as u32)))
                }
                let o = old.and_then(|o| slot_of(o, &old_values, v));
                let n = slot_of(new, &new_values, v);
                if let (Some(o), Some(n)) = (o, n)
                    && o.same(n)
                {
                    continue;
                }
                let ob = match o {
                    Some(b) => b.get()?,
                    None => &empty,
                };
                let nb = match n {
                    Some(b) => b.get()?,
                    None => &empty,
                };
                push(
                    &mut out,
                    FeedSubject::Value {
                        field: name.to_string(),
                        value: v.clone(),
                    },
                    ob,
                    nb,
                    c.as_ref(),
                );
            }
        }
        for (name, old) in fields.iter().filter(|_| every) {
            if self.snap.fields.contains_key(name) {
                continue;
            }
            for v in values(old).into_iter().flatten() {
                out.push(FeedChange {
                    subject: Some(FeedSubject::Value {
                        field: name.to_string(),
                        value: v,
                    }),
                    dropped: true,
                    ..Default::default()
                });
            }
        }
        Ok(out)
    }

    /// A lifecycle just defined: its field's values are its stages (as
    /// redefined), and it starts empty (it is evaluated for everyone next).
    fn prepare_lifecycle(&mut self, name: &Arc<str>, at_ms: i64) -> Result<()> {
        let Some(rule) = self.snap.rules.get(name).cloned() else {
            return Ok(());
        };
        if !rule.def.is_lifecycle() {
            return Ok(());
        }
        let Some(field) = self.snap.fields.get_mut(&**name) else {
            return Err(Error::BadRecord(format!(
                "lifecycle {name:?} has no field of that name"
            )));
        };
        let field = Arc::make_mut(field);
        let values: Vec<String> = rule.def.stages.iter().map(|(v, _)| v.clone()).collect();
        field.meta.kind = crate::fields::FieldKind::Enum { values };
        field.meta.updated_ms = at_ms;
        let id = field.id;
        for slot in field.slots.keys() {
            self.dirty_slots.insert((id, *slot));
        }
        field.slots.clear();
        Ok(())
    }

    /// Installs what [`prepare`] computed for rule `name`; returns the
    /// customers who entered or left.
    fn install(&mut self, name: &Arc<str>, outcome: Outcome, at_ms: i64) -> Result<ShardedBitmap> {
        match outcome {
            Outcome::Unchanged => Ok(ShardedBitmap::new()),
            Outcome::Tag { members, moved } => {
                let id = self
                    .snap
                    .tags
                    .get(&**name)
                    .map(|t| t.id)
                    .ok_or_else(|| Error::BadRecord(format!("rule tag {name:?} has no tag")))?;
                let tag = self.tag_mut(id)?;
                tag.meta.count = members.len();
                tag.meta.updated_ms = at_ms;
                tag.bitmap = LazyBitmap::loaded(members);
                self.dirty_tags.insert(id);
                Ok(moved)
            }
            Outcome::Stages { slots, moved } => {
                let field =
                    self.snap.fields.get_mut(&**name).ok_or_else(|| {
                        Error::BadRecord(format!("lifecycle {name:?} has no field"))
                    })?;
                let field = Arc::make_mut(field);
                field.meta.updated_ms = at_ms;
                let id = field.id;
                for (slot, b) in slots {
                    if b.is_empty() {
                        field.slots.remove(&slot);
                    } else {
                        field.slots.insert(slot, LazyBitmap::loaded(b));
                    }
                    self.dirty_slots.insert((id, slot));
                }
                Ok(moved)
            }
        }
    }
}

/// What evaluating a rule changes, computed beside the writer: the rule
/// tag's members as they become, or the lifecycle's changed stages as they
/// become (the copy of each changed shard made there), and who moved.
enum Outcome {
    Unchanged,
    Tag {
        members: ShardedBitmap,
        moved: ShardedBitmap,
    },
    Stages {
        slots: Vec<(u32, ShardedBitmap)>,
        moved: ShardedBitmap,
    },
}

/// Rule `rule`'s new members among `among` (everyone when `None`), as
/// [`State::install`] will install them.
fn prepare(
    snap: &Snapshot,
    rule: &Rule,
    among: Option<&ShardedBitmap>,
    members: crate::rules::Members,
) -> Result<Outcome> {
    let restrict = |b: &ShardedBitmap| match among {
        Some(c) => b.and(c),
        None => b.clone(),
    };
    match members {
        crate::rules::Members::Tag(new) => {
            let old = snap
                .tag(&rule.name)
                .ok_or_else(|| Error::BadRecord(format!("rule tag {:?} has no tag", rule.name)))?
                .bitmap
                .get()?;
            let before = restrict(old);
            let entered = new.and_not(&before);
            let left = before.and_not(&new);
            if entered.is_empty() && left.is_empty() {
                return Ok(Outcome::Unchanged);
            }
            let mut members = old.clone();
            members.union_sharded(&entered);
            members.difference_sharded(&left);
            let mut moved = entered;
            moved.union_sharded(&left);
            Ok(Outcome::Tag { members, moved })
        }
        crate::rules::Members::Stages(stages) => {
            let field = snap.field(&rule.name).ok_or_else(|| {
                Error::BadRecord(format!("lifecycle {:?} has no field", rule.name))
            })?;
            let mut slots = Vec::new();
            let mut moved = ShardedBitmap::new();
            for (slot, new) in stages.into_iter().enumerate() {
                let slot = slot as u32;
                let old = match field.slots.get(&slot) {
                    Some(b) => b.get()?.clone(),
                    None => ShardedBitmap::new(),
                };
                let before = restrict(&old);
                let entered = new.and_not(&before);
                let left = before.and_not(&new);
                if entered.is_empty() && left.is_empty() {
                    continue;
                }
                let mut b = old;
                b.union_sharded(&entered);
                b.difference_sharded(&left);
                moved.union_sharded(&entered);
                moved.union_sharded(&left);
                slots.push((slot, b));
            }
            Ok(if slots.is_empty() {
                Outcome::Unchanged
            } else {
                Outcome::Stages { slots, moved }
            })
        }
    }
}

/// What a batch changes, as rules see it: per tag and field, the customers
/// whose membership or value it touched (and, as rules are evaluated, per
/// rule the customers it moved); and in `all`, the customers who came (new,
/// brought back by an unmerge) or took another in (a merge's survivor),
/// whom every rule evaluates (`NOT x` and `ALL` reach a new customer
/// whatever it was given). Customers who went (erased, absorbed) are out of
/// every tag and field already.
#[derive(Default)]
struct Touch {
    by_name: HashMap<Arc<str>, ShardedBitmap>,
    all: ShardedBitmap,
}

impl Touch {
    fn add(&mut self, name: Arc<str>, ids: &ShardedBitmap) {
        if !ids.is_empty() {
            self.by_name.entry(name).or_default().union_sharded(ids);
        }
    }
}

/// The rules in levels: a rule's level is one past the highest level of the
/// rules it reads; within a level, in evaluation order.
fn levels(rules: &crate::storage::snapshot::RuleSet) -> Vec<Vec<Arc<str>>> {
    let mut level_of: HashMap<&str, usize> = HashMap::new();
    let mut out: Vec<Vec<Arc<str>>> = Vec::new();
    for name in &rules.order {
        let Some(rule) = rules.get(name) else {
            continue;
        };
        let level = rule
            .def
            .reads
            .iter()
            .filter_map(|r| level_of.get(r.as_str()))
            .map(|l| l + 1)
            .max()
            .unwrap_or(0);
        level_of.insert(name, level);
        if out.len() <= level {
            out.resize_with(level + 1, Vec::new);
        }
        out[level].push(name.clone());
    }
    out
}

/// Rules of one level evaluated for at least this many candidates in all
/// are shared out between two threads (below it, starting the second
/// costs more than it saves).
const SIDE_BY_SIDE_FROM: u64 = 256;

/// Each rule of `work` evaluated on `snap` (for everyone when its
/// candidates are `None`), on this thread and, when the work is large
/// enough, one more: whichever is free takes the next rule. Integer values
/// read for one rule serve the next ones on the same thread (fields do not
/// change while rules are evaluated).
fn evaluate_all(
    snap: &Snapshot,
    work: &[(Arc<Rule>, Option<ShardedBitmap>)],
) -> Vec<Result<Outcome>> {
    let run = |k: usize, cache: &crate::rules::eval::ValueCache| {
        let (rule, among) = &work[k];
        let which = match among {
            Some(c) => crate::rules::Among::Only(c),
            None => crate::rules::Among::Everyone,
        };
        crate::rules::evaluate(snap, rule, which, cache)
            .and_then(|m| prepare(snap, rule, among.as_ref(), m))
    };
    let size: u64 = work
        .iter()
        .map(|(_, a)| a.as_ref().map_or(SIDE_BY_SIDE_FROM, ShardedBitmap::len))
        .sum();
    if work.len() < 2 || size < SIDE_BY_SIDE_FROM {
        let cache = crate::rules::eval::ValueCache::default();
        return (0..work.len()).map(|k| run(k, &cache)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let take = |out: &mut Vec<(usize, Result<Outcome>)>| {
        let cache = crate::rules::eval::ValueCache::default();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if k >= work.len() {
                return;
            }
            out.push((k, run(k, &cache)));
        }
    };
    let mut mine = Vec::new();
    let theirs = std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name("tagstore-rules".into())
            .spawn_scoped(scope, || {
                let mut out = Vec::new();
                take(&mut out);
                out
            });
        take(&mut mine);
        match helper {
            Ok(h) => h.join().ok(),
            Err(_) => None,
        }
    });
    let mut results: Vec<Option<Result<Outcome>>> = (0..work.len()).map(|_| None).collect();
    for (k, r) in mine.into_iter().chain(theirs.into_iter().flatten()) {
        results[k] = Some(r);
    }
    // A rule the helper took and did not finish (it could not start, or it
    // panicked) is evaluated here.
    let cache = crate::rules::eval::ValueCache::default();
    results
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.unwrap_or_else(|| run(k, &cache)))
        .collect()
}

/// Errors of a rule's own making (a window that reaches a month kept as one
/// bucket, say): the rule goes stale, the write goes on. Others (a file
/// that cannot be read) stop the writer as any failed apply does.
fn is_rule_error(e: &Error) -> bool {
    matches!(e, Error::Query { .. } | Error::InvalidArgument(_))
}
