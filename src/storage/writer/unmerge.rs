//! Undoing a merge (OneID) in the write path: a [`WriteOp::Unmerge`] and
//! the writer's state into a batch that brings the absorbed customer back
//! and takes from the survivor what it got only from the merge. Planning
//! only; the facts both customers should have come from the caller (folded
//! from the event archive), and `state::apply` applies the batch like any
//! other.
//!
//! What comes back, and what cannot (the documented rules, also in the
//! README): the absorbed customer gets the identities the caller names,
//! the tags, values and behaviour days the merge kept for it (as they were
//! at the merge), and its facts. The survivor loses the tags and behaviour
//! days it had only from the merge, unless a customer merged into it since
//! also had them; a value the merge changed goes back to what it was before,
//! unless it was written since (then it stays). Writes made to the merged
//! customer after the merge stay with the survivor: the store keeps no
//! record of which side a direct write meant.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use roaring::RoaringBitmap;

use super::ids::IdAssigner;
use super::plan::{Pending, Planner, plan_values};
use super::*;
use crate::error::{Error, Result};
use crate::fields::FieldKind;
use crate::storage::Snapshot;
use crate::storage::merges::MergeEntry;
use crate::storage::record::{Batch, Change, ChangeOp, FieldChange, IdentityLink, LoggedUnmerge};

/// A merge that can be undone, with what the survivor keeps because
/// customers merged into it since brought it too.
pub struct Undoable {
    pub entry: MergeEntry,
    later_tags: BTreeSet<u32>,
    later_days: BTreeSet<(u32, u32)>,
}

/// Merge `merge` if it can be undone in `snap`; otherwise why not: no such
/// merge, one the guard rails refused, one undone already, one made before
/// merges kept what they changed, or one whose survivor was merged again
/// since (that merge is to be undone first) or erased.
pub fn undoable(snap: &Snapshot, merge: u64) -> Result<Undoable> {
    let log = snap.merges.read();
    let e = log.get(merge).cloned().ok_or(Error::MergeNotFound(merge))?;
    if !e.refused.is_empty() {
        return Err(Error::Precondition(format!(
            "merge {merge} was refused by the guard rails ({}): nothing was merged, so there is nothing to undo",
            e.refused
        )));
    }
    if e.undone_lsn != 0 {
        return Err(Error::Precondition(format!(
            "merge {merge} was already undone (log record {})",
            e.undone_lsn
        )));
    }
    if !e.undo.kept {
        return Err(Error::Precondition(format!(
            "merge {merge} was made by a version of tagstore that kept no record of what it changed; it cannot be undone"
        )));
    }
    let now = log.survivor_of(e.survivor);
    if now != e.survivor {
        let later = log
            .entries()
            .iter()
            .rev()
            .find(|x| x.in_force() && x.absorbed == e.survivor)
            .map_or(0, |x| x.id);
        return Err(Error::Precondition(format!(
            "customer {} (merge {merge}'s survivor) was merged into customer {now} since, by merge {later}: undo merge {later} first",
            e.survivor
        )));
    }
    let live = snap.live()?;
    if !live.contains(e.survivor) {
        return Err(Error::Precondition(format!(
            "customer {} (merge {merge}'s survivor) was erased: there is nothing to undo",
            e.survivor
        )));
    }
    if live.contains(e.absorbed) {
        return Err(Error::Internal(format!(
            "customer {}, absorbed by merge {merge}, is live",
            e.absorbed
        )));
    }
    // What customers merged into the survivor since brought: the survivor
    // keeps it.
    let mut later_tags = BTreeSet::new();
    let mut later_days = BTreeSet::new();
    for later in log
        .entries()
        .iter()
        .filter(|x| x.id > merge && x.in_force() && log.survivor_of(x.survivor) == e.survivor)
    {
        later_tags.extend(later.undo.tags.iter().copied());
        later_days.extend(later.undo.days.iter().copied());
    }
    Ok(Undoable {
        entry: e,
        later_tags,
        later_days,
    })
}

/// The live customer identity `identity` can be taken off (a split):
/// the one it names, unless it is the key a customer was created with
/// (that customer's, or one merged into it: then the merge is to be
/// undone instead).
pub fn splittable(snap: &Snapshot, identity: &str) -> Result<u32> {
    let customer = snap
        .customer_id(identity)?
        .ok_or_else(|| Error::CustomerNotFound(identity.to_string()))?;
    if let Some(created) = snap.dict.lookup(identity)? {
        if created == customer {
            return Err(Error::Precondition(format!(
                "{identity:?} is the key customer {customer} was created with (its name in member pages and exports); it cannot be taken off"
            )));
        }
        let log = snap.merges.read();
        if log.survivor_of(created) == customer {
            let merge = log
                .entries()
                .iter()
                .find(|e| e.in_force() && e.absorbed == created)
                .map_or(0, |e| e.id);
            return Err(Error::Precondition(format!(
                "{identity:?} is the key of customer {created}, merged into customer {customer}: undo merge {merge} instead"
            )));
        }
    }
    if !snap.idents.of(customer)?.iter().any(|(i, _)| i == identity) {
        return Err(Error::Precondition(format!(
            "{identity:?} is not one of customer {customer}'s identities"
        )));
    }
    Ok(customer)
}

impl Planner<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan_unmerge(
        &self,
        of: UnmergeOf,
        as_of: u64,
        identities: Vec<String>,
        erase: Vec<String>,
        writes: Vec<ValueWrite>,
        mut batch: Batch,
    ) -> Result<Planned> {
        let snap = &self.state.snap;
        let mut ids = IdAssigner::new(self.state)?;
        // The customer that comes back (or is made), the one it leaves, and
        // for an undone merge what the merge kept.
        let (a, s, undone) = match of {
            UnmergeOf::Merge(merge) => {
                let u = undoable(snap, merge)?;
                let (a, s) = (u.entry.absorbed, u.entry.survivor);
                // The dictionary keeps an absorbed customer's key while its
                // survivor lives (a checkpoint keeps it, as it keeps its
                // events).
                if snap.dict.key_of(a)?.is_none() {
                    return Err(Error::Precondition(format!(
                        "the store no longer has the key customer {a} was created with (merge {merge} was made before absorbed customers' keys were kept); it cannot be brought back"
                    )));
                }
                batch.unmerges.push(LoggedUnmerge {
                    merge,
                    revived: a,
                    survivor: s,
                    identity: String::new(),
                    moved: Vec::new(),
                });
                (a, s, Some(u))
            }
            UnmergeOf::Identity { identity, customer } => {
                let s = splittable(snap, &identity)?;
                if s != customer {
                    return Err(Error::Precondition(format!(
                        "{identity:?} names customer {s} now, not customer {customer}: try again"
                    )));
                }
                let a = ids.create(&identity)?;
                batch.unmerges.push(LoggedUnmerge {
                    merge: snap.merges.read().next_id(),
                    revived: a,
                    survivor: s,
                    identity,
                    moved: identities.clone(),
                });
                (a, s, None)
            }
        };
        let (epoch, ingested) = &self.state.ingested;
        if as_of != *epoch || ingested.contains(s) {
            // Events came after the archive the caller read: try again.
            return Ok(Planned::Done(WriteResult {
                lsn: snap.lsn,
                busy: vec![s.to_string()],
                ..Default::default()
            }));
        }
        // Identities: those named that still name the survivor go over,
        // with where and when they were first seen.
        let mut seen: HashMap<String, crate::storage::dictionary::identities::FirstSeen> =
            snap.idents.of(s)?.into_iter().collect();
        for identity in identities {
            let Some(first) = seen.remove(&identity) else {
                continue;
            };
            batch.identities.push(IdentityLink {
                customer: a,
                identity,
                first_ms: first.first_ms,
                place: first.place,
            });
        }
        let moved = batch.identities.len() as u64;
        let mut seed: BTreeMap<u32, Pending> = BTreeMap::new();
        let mut days: BTreeMap<u32, BTreeMap<u32, RoaringBitmap>> = BTreeMap::new();
        // Fields: the facts are erased for both and written again from the
        // events.
        let mut erased: BTreeSet<u32> = BTreeSet::new();
        let both: RoaringBitmap = [a, s].into_iter().collect();
        for name in &erase {
            let Some(field) = snap.field(name) else {
                continue;
            };
            for slot in field.slots.values() {
                slot.get()?;
            }
            erased.insert(field.id);
            batch.field_changes.push(FieldChange::Erase {
                field: field.id,
                ids: both.clone(),
            });
        }
        if let Some(Undoable {
            entry,
            later_tags,
            later_days,
        }) = undone
        {
            self.give_back(
                &entry,
                &later_tags,
                &later_days,
                &erased,
                &mut seed,
                &mut days,
                &mut batch,
            )?;
        }
        for (fid, slots) in days {
            seed.insert(fid, Pending::Events(slots));
        }
        ids.link(UNMERGE_REVIVED, a);
        ids.link(UNMERGE_SURVIVOR, s);
        for w in &writes {
            let c = w.customer();
            if c != UNMERGE_REVIVED && c != UNMERGE_SURVIVOR {
                return Err(Error::Internal(format!(
                    "an unmerge's write names {c:?}, not one of its two customers"
                )));
            }
        }
        let expired = plan_values(snap, &writes, &[], &mut ids, self.at_ms, &mut batch, seed)?;
        batch.new_keys = ids.new_keys;
        Ok(Planned::Write(
            batch,
            Target::Unmerged {
                expired,
                identities: moved,
                revived: a,
                survivor: s,
            },
        ))
    }

    /// What an undone merge gives back: the absorbed customer's tags,
    /// values and days as the merge kept them; the survivor's tags and
    /// days it had only from the merge taken away, its values the merge
    /// changed put back (where no write changed them since).
    #[allow(clippy::too_many_arguments)]
    fn give_back(
        &self,
        entry: &MergeEntry,
        later_tags: &BTreeSet<u32>,
        later_days: &BTreeSet<(u32, u32)>,
        erased: &BTreeSet<u32>,
        seed: &mut BTreeMap<u32, Pending>,
        days: &mut BTreeMap<u32, BTreeMap<u32, RoaringBitmap>>,
        batch: &mut Batch,
    ) -> Result<()> {
        let (a, s) = (entry.absorbed, entry.survivor);
        // Tags: back to the absorbed customer; the survivor loses those it
        // had only from it.
        let one = |id: u32| -> RoaringBitmap { [id].into_iter().collect() };
        for &t in &entry.undo.tags {
            if let Some(tag) = self.state.tag_by_id(t) {
                tag.bitmap.get()?;
                batch.changes.push(Change {
                    tag: t,
                    op: ChangeOp::Add,
                    ids: one(a),
                });
            }
        }
        for &t in &entry.undo.gained_tags {
            if later_tags.contains(&t) {
                continue;
            }
            if let Some(tag) = self.state.tag_by_id(t)
                && tag.bitmap.get()?.contains(s)
            {
                batch.changes.push(Change {
                    tag: t,
                    op: ChangeOp::Remove,
                    ids: one(s),
                });
            }
        }
        // Fields other than facts: what the merge kept.
        for &(fid, v) in &entry.undo.values {
            let Some(field) = self.state.field_by_id(fid) else {
                continue;
            };
            if erased.contains(&fid) {
                continue;
            }
            match &field.meta.kind {
                FieldKind::Int => set_int(seed, fid, a, Some(v)),
                FieldKind::Enum { values } => {
                    if let Ok(slot) = u32::try_from(v)
                        && (slot as usize) < values.len()
                    {
                        set_enum(seed, fid, a, Some(slot));
                    }
                }
                FieldKind::Behaviour(_) => {}
            }
        }
        for &(fid, before, after) in &entry.undo.changed {
            let Some(field) = self.state.field_by_id(fid) else {
                continue;
            };
            if erased.contains(&fid) {
                continue;
            }
            match &field.meta.kind {
                FieldKind::Int => {
                    // Written since the merge: it stays.
                    if field.int_value(s)? == Some(after) {
                        set_int(seed, fid, s, before);
                    }
                }
                FieldKind::Enum { .. } => {
                    if field.enum_value(s)?.map(i64::from) == Some(after) {
                        let before = before.and_then(|b| u32::try_from(b).ok());
                        set_enum(seed, fid, s, before);
                    }
                }
                FieldKind::Behaviour(_) => {}
            }
        }
        // Behaviour days: the absorbed customer's back; the survivor's
        // gained ones taken away by erasing it from the field and giving
        // back the rest (the log has no change that removes one day).
        for &(fid, slot) in &entry.undo.days {
            if erased.contains(&fid) || self.state.field_by_id(fid).is_none() {
                continue;
            }
            days.entry(fid)
                .or_default()
                .entry(slot)
                .or_default()
                .insert(a);
        }
        let mut losing: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for &(fid, slot) in &entry.undo.gained_days {
            if erased.contains(&fid) || later_days.contains(&(fid, slot)) {
                continue;
            }
            losing.entry(fid).or_default().insert(slot);
        }
        for (fid, gone) in losing {
            let Some(field) = self.state.field_by_id(fid) else {
                continue;
            };
            let mut kept = Vec::new();
            let mut had = false;
            for (&slot, bm) in &field.slots {
                if bm.get()?.contains(s) {
                    if gone.contains(&slot) {
                        had = true;
                    } else {
                        kept.push(slot);
                    }
                }
            }
            if !had {
                continue;
            }
            batch.field_changes.push(FieldChange::Erase {
                field: fid,
                ids: one(s),
            });
            let d = days.entry(fid).or_default();
            for slot in kept {
                d.entry(slot).or_default().insert(s);
            }
        }
        Ok(())
    }
}

/// Plans customer `id`'s value of integer field `field` (`None`: none).
fn set_int(seed: &mut BTreeMap<u32, Pending>, field: u32, id: u32, v: Option<i64>) {
    if let Pending::Int(m) = seed
        .entry(field)
        .or_insert_with(|| Pending::Int(Default::default()))
    {
        m.insert(id, v);
    }
}

/// Plans customer `id`'s value (slot) of enumerated field `field`.
fn set_enum(seed: &mut BTreeMap<u32, Pending>, field: u32, id: u32, v: Option<u32>) {
    if let Pending::Enum(m) = seed
        .entry(field)
        .or_insert_with(|| Pending::Enum(BTreeMap::new()))
    {
        m.insert(id, v);
    }
}
