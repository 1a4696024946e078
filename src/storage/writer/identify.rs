//! OneID in the write path: which customer an ingested record belongs to,
//! given every identity it names; when customers one record names together
//! merge; and the guard rails that keep a shared or bad identity from
//! merging strangers ([`OneIdRules`]). Planning only: what it decides goes
//! into the batch, which `state::apply` applies like any other.

use std::collections::{BTreeMap, HashMap, HashSet};

use roaring::RoaringBitmap;

use super::ids::IdAssigner;
use super::plan::{Pending, Planner};
use super::*;
use crate::error::{Error, Result};
use crate::fields::{FieldKind, MergeRule, written_at_field};
use crate::storage::record::{Batch, Change, ChangeOp, IdentityLink, LoggedMerge, MergeUndo};

/// Most merges one request may make: each reads every tag and field slot
/// of the customer it absorbs on the writer's thread, so a batch that would
/// merge more is refused (the `Ingest` stream then applies its records one
/// by one) instead of holding every other write for minutes.
pub const MAX_MERGES_PER_REQUEST: usize = 10_000;

/// Identities of one type a customer may have by default (a person has a
/// few phones, not 500).
pub const DEFAULT_MAX_PER_TYPE: u32 = 10;

/// The guard rails of identity unification, from the server's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneIdRules {
    /// Identity types that never merge customers (a store's shared tablet, a
    /// device id): such an identity finds its customer only when no other
    /// identity of the record does, and a record where it names another
    /// customer is applied without the merge.
    pub never_merge: HashSet<String>,
    /// Identities (`type:value`, in normal form) that are not used at all:
    /// a default phone number typed in at the till, a test account.
    pub blocked: HashSet<String>,
    /// Most identities of one type a customer may have; 0: no limit. A link
    /// or merge past it is not made.
    pub max_per_type: u32,
    /// Identity types in the order that decides which identity names a new
    /// customer (types not listed come after, in the record's order).
    pub priority: Vec<String>,
}

impl Default for OneIdRules {
    fn default() -> Self {
        OneIdRules {
            never_merge: HashSet::new(),
            blocked: HashSet::new(),
            max_per_type: DEFAULT_MAX_PER_TYPE,
            priority: Vec::new(),
        }
    }
}

/// The type of identity `key` (`phone` of `phone:138…`).
fn type_of(key: &str) -> &str {
    key.split_once(':').map_or(key, |(t, _)| t)
}

/// An identity of an ingested record that was not used as it would have
/// been, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRefusal {
    /// The record's index in the request.
    pub record: u32,
    pub identity: String,
    pub reason: String,
}

/// Customers that records show to be one person: a union-find over their
/// ids, each group's survivor its lowest id (the customer known longest),
/// with the number of identities of each type each group has.
#[derive(Default)]
pub(super) struct Groups {
    parent: HashMap<u32, u32>,
    /// For each absorbed customer, the identity that joined it.
    via: HashMap<u32, String>,
    /// Identities per type of each group (by its survivor), once asked.
    counts: HashMap<u32, HashMap<String, u32>>,
    /// Joins the rules refused: `(one, other, identity, reason)`.
    refused: Vec<(u32, u32, String, String)>,
    /// Every identity the rules kept from being used as asked.
    pub(super) refusals: Vec<LinkRefusal>,
    /// Customers joined into each survivor by this request.
    joined: HashMap<u32, Vec<u32>>,
}

impl Groups {
    /// The survivor of `id`'s group.
    pub(super) fn find(&self, mut id: u32) -> u32 {
        while let Some(&p) = self.parent.get(&id) {
            id = p;
        }
        id
    }

    /// The identities per type of the group whose survivor is `root`.
    fn counts(&mut self, planner: &Planner<'_>, root: u32) -> Result<&mut HashMap<String, u32>> {
        match self.counts.entry(root) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut c: HashMap<String, u32> = HashMap::new();
                for (identity, _) in planner.state.snap.idents.of(root)? {
                    *c.entry(type_of(&identity).to_string()).or_default() += 1;
                }
                Ok(e.insert(c))
            }
        }
    }

    /// Joins the groups of `a` and `b` (`via`: the identity that named
    /// `b`); the survivor of the joined group.
    fn join(&mut self, a: u32, b: u32, via: &str) -> u32 {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return ra;
        }
        let (survivor, absorbed) = (ra.min(rb), ra.max(rb));
        self.parent.insert(absorbed, survivor);
        let mut moving = self.joined.remove(&absorbed).unwrap_or_default();
        moving.push(absorbed);
        self.joined.entry(survivor).or_default().extend(moving);
        self.via.insert(absorbed, via.to_string());
        if let Some(gone) = self.counts.remove(&absorbed) {
            let into = self.counts.entry(survivor).or_default();
            for (t, n) in gone {
                *into.entry(t).or_default() += n;
            }
        }
        survivor
    }

    /// `(survivor, absorbed, via)` of every absorbed customer, in id order.
    pub(super) fn merges(&self) -> Vec<(u32, u32, String)> {
        let mut out: Vec<(u32, u32, String)> = self
            .parent
            .keys()
            .map(|&a| {
                (
                    self.find(a),
                    a,
                    self.via.get(&a).cloned().unwrap_or_default(),
                )
            })
            .collect();
        out.sort_unstable_by_key(|m| m.1);
        out
    }

    /// Joins the rules refused, as `(survivor, other, identity, reason)`
    /// with both customers as they end up.
    pub(super) fn refused(&self) -> Vec<(u32, u32, String, String)> {
        self.refused
            .iter()
            .map(|(a, b, k, why)| (self.find(*a), self.find(*b), k.clone(), why.clone()))
            .filter(|(a, b, _, _)| a != b)
            .collect()
    }
}

impl Planner<'_> {
    /// Whether the groups of `a` and `b` hold customers that an undone
    /// merge keeps apart: the reason, if so.
    fn apart_refusal(&self, groups: &Groups, a: u32, b: u32) -> Option<String> {
        let log = self.state.snap.merges.read();
        if !log.keeps_any_apart() {
            return None;
        }
        let members = |root: u32| {
            let mut m = vec![root];
            m.extend(groups.joined.get(&root).into_iter().flatten().copied());
            m
        };
        let (ma, mb) = (members(a), members(b));
        for &x in &ma {
            for &y in &mb {
                if let Some(merge) = log.kept_apart(x, y) {
                    return Some(format!(
                        "customers {x} and {y} are kept apart since merge {merge} was undone"
                    ));
                }
            }
        }
        None
    }

    /// Whether joining the groups of `a` and `b` would give one customer
    /// more identities of a type than the rules allow: the reason, if so.
    fn cap_refusal(&self, groups: &mut Groups, a: u32, b: u32) -> Result<Option<String>> {
        let cap = self.rules.max_per_type;
        if cap == 0 {
            return Ok(None);
        }
        let ca = groups.counts(self, a)?.clone();
        let cb = groups.counts(self, b)?;
        for (t, n) in cb.iter() {
            let total = n + ca.get(t).copied().unwrap_or(0);
            if total > cap {
                return Ok(Some(format!(
                    "merging would give one customer {total} identities of type {t:?} (max_per_type is {cap})"
                )));
            }
        }
        Ok(None)
    }

    /// The customer of an ingested record with identities: the live
    /// customer its identities name, or a new one named by the identity the
    /// rules' priority puts first. When they name several, the customers
    /// are joined in `groups` (merged once every record is read), unless a
    /// guard rail says no: then the record goes to the first, and the
    /// refusal is reported. Identities that name no one are linked to it
    /// in `batch` (within the cap per type).
    pub(super) fn identify(
        &self,
        ids: &mut IdAssigner<'_>,
        groups: &mut Groups,
        record: u32,
        r: &IngestRecord,
        at_ms: i64,
        batch: &mut Batch,
    ) -> Result<u32> {
        let rules = &self.rules;
        let mut refusals = Vec::new();
        let mut refuse = |identity: &str, reason: String| {
            refusals.push(LinkRefusal {
                record,
                identity: identity.to_string(),
                reason,
            });
        };
        let keys: Vec<&str> = r
            .identities
            .iter()
            .map(String::as_str)
            .filter(|k| {
                let blocked = rules.blocked.contains(*k);
                if blocked {
                    refuse(k, "on the block list: not used".into());
                }
                !blocked
            })
            .collect();
        if keys.is_empty() {
            return Err(Error::invalid(format!(
                "every identity of the record is on the block list ({})",
                r.identities.join(", ")
            )));
        }
        let found = ids.get_many(&keys)?;
        let trusted = |k: &str| !rules.never_merge.contains(type_of(k));
        let mut customer: Option<u32> = None;
        // Trusted identities decide, joining the customers they name.
        for (k, id) in keys.iter().zip(&found) {
            let Some(id) = *id else { continue };
            if !trusted(k) {
                continue;
            }
            let g = groups.find(id);
            match customer {
                None => customer = Some(g),
                Some(c) if c == g => {}
                Some(c) => match self
                    .apart_refusal(groups, c, g)
                    .map_or_else(|| self.cap_refusal(groups, c, g), |why| Ok(Some(why)))?
                {
                    Some(why) => {
                        groups.refused.push((c, g, k.to_string(), why.clone()));
                        refuse(k, format!("names another customer; not merged: {why}"));
                    }
                    None => customer = Some(groups.join(c, g, k)),
                },
            }
        }
        // The others find the customer only for a record that has no
        // trusted identity at all (a new person on a shared tablet is a new
        // customer, not the tablet's first user).
        let only_untrusted = keys.iter().all(|k| !trusted(k));
        for (k, id) in keys.iter().zip(&found) {
            let Some(id) = *id else { continue };
            if trusted(k) {
                continue;
            }
            let g = groups.find(id);
            match customer {
                None if only_untrusted => customer = Some(g),
                None => {
                    refuse(
                        k,
                        format!(
                            "identity type {:?} never merges customers: the record's other identities name someone else",
                            type_of(k)
                        ),
                    );
                }
                Some(c) if c == g => {}
                Some(c) => {
                    let why = format!("identity type {:?} never merges customers", type_of(k));
                    groups.refused.push((c, g, k.to_string(), why.clone()));
                    refuse(k, format!("names another customer; not merged: {why}"));
                }
            }
        }
        let created = customer.is_none();
        let (customer, creating_key) = match customer {
            Some(c) => (c, None),
            None => {
                // By the rules' priority, then the record's order.
                let rank = |k: &str| {
                    rules
                        .priority
                        .iter()
                        .position(|t| t == type_of(k))
                        .unwrap_or(rules.priority.len())
                };
                // Among the identities that name no one: one that names
                // another customer (of a type that never merges) stays
                // with it.
                let key = keys
                    .iter()
                    .zip(&found)
                    .enumerate()
                    .filter(|(_, (_, id))| id.is_none())
                    .min_by_key(|(j, (k, _))| (rank(k), *j))
                    .map(|(_, (k, _))| *k)
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "the record's identities ({}) name customers it cannot be applied to",
                            keys.join(", ")
                        ))
                    })?;
                (ids.create(key)?, Some(key))
            }
        };
        let first_ms = if r.at_ms > 0 { r.at_ms } else { at_ms };
        for (key, id) in keys.iter().zip(&found) {
            // The identity a new customer is created with is linked too, so
            // that every identity says where and when it was first seen.
            let creating = created && creating_key == Some(*key);
            if id.is_some() && !creating {
                continue;
            }
            // Named twice in one record, or linked by an earlier record of
            // this request.
            if !creating && ids.get(key)?.is_some() {
                continue;
            }
            let cap = rules.max_per_type;
            let root = groups.find(customer);
            let n = groups
                .counts(self, root)?
                .entry(type_of(key).to_string())
                .or_default();
            if cap > 0 && *n >= cap && !creating {
                refuse(
                    key,
                    format!(
                        "not linked: the customer already has {n} identities of type {:?} (max_per_type is {cap})",
                        type_of(key)
                    ),
                );
                continue;
            }
            *n += 1;
            ids.link(key, customer);
            batch.identities.push(IdentityLink {
                customer,
                identity: key.to_string(),
                first_ms,
                place: r.place.clone(),
            });
        }
        groups.refusals.extend(refusals);
        Ok(customer)
    }

    /// Moves each absorbed customer's tags, values and identities to its
    /// survivor, into `batch` (tags and identities) and `seed` (values, for
    /// `plan_values`), and logs the merges. Values combine by each
    /// field's merge rule, over the survivor and then the absorbed customers
    /// in id order; behaviours take the union.
    pub(super) fn plan_merges(
        &self,
        merges: &[(u32, u32, String)],
        seed: &mut BTreeMap<u32, Pending>,
        batch: &mut Batch,
    ) -> Result<()> {
        let snap = &self.state.snap;
        let mut next_id = snap.merges.read().next_id();
        let mut tag_adds: BTreeMap<u32, RoaringBitmap> = BTreeMap::new();
        for (survivor, absorbed, via) in merges {
            let (s, b) = (*survivor, *absorbed);
            // Fields merged by `latest` whose value the absorbed customer
            // wrote later: decided before any field (their companions
            // among them) changes.
            let mut later_fields = HashSet::new();
            for field in snap.fields.values() {
                if field.meta.merge == MergeRule::Latest && self.written_later(field, b, s, seed)? {
                    later_fields.insert(field.id);
                }
            }
            // What the merge changes, kept with it for undoing it.
            let mut undo = MergeUndo {
                kept: true,
                ..MergeUndo::default()
            };
            for tag in snap.tags.values() {
                if tag.meta.count == 0 {
                    continue;
                }
                let members = tag.bitmap.get()?;
                if members.contains(b) {
                    undo.tags.push(tag.id);
                    let adds = tag_adds.entry(tag.id).or_default();
                    if !members.contains(s) && !adds.contains(s) {
                        undo.gained_tags.push(tag.id);
                    }
                    adds.insert(s);
                }
            }
            for field in snap.fields.values() {
                match &field.meta.kind {
                    FieldKind::Int => {
                        let Some(vb) = field.int_value(b)? else {
                            continue;
                        };
                        let later = later_fields.contains(&field.id);
                        let Pending::Int(m) = seed
                            .entry(field.id)
                            .or_insert_with(|| Pending::Int(Default::default()))
                        else {
                            continue;
                        };
                        let va = match m.get(&s) {
                            Some(v) => *v,
                            None => field.int_value(s)?,
                        };
                        undo.values.push((field.id, vb));
                        let merged = match (field.meta.merge, va) {
                            (_, None) => vb,
                            (MergeRule::Latest, Some(a)) => {
                                if later {
                                    vb
                                } else {
                                    a
                                }
                            }
                            (MergeRule::Sum, Some(a)) => a.checked_add(vb).ok_or_else(|| {
                                Error::invalid(format!(
                                    "merging customers {s} and {b}: the sum of their {:?} values ({a} and {vb}) leaves the 64-bit range",
                                    field.meta.name
                                ))
                            })?,
                            (MergeRule::Min, Some(a)) => a.min(vb),
                            (MergeRule::Max, Some(a)) => a.max(vb),
                            (_, Some(a)) => a,
                        };
                        if va != Some(merged) {
                            undo.changed.push((field.id, va, merged));
                        }
                        m.insert(s, Some(merged));
                    }
                    FieldKind::Enum { .. } => {
                        let Some(vb) = field.enum_value(b)? else {
                            continue;
                        };
                        let later = later_fields.contains(&field.id);
                        let Pending::Enum(m) = seed
                            .entry(field.id)
                            .or_insert_with(|| Pending::Enum(BTreeMap::new()))
                        else {
                            continue;
                        };
                        let va = match m.get(&s) {
                            Some(v) => *v,
                            None => field.enum_value(s)?,
                        };
                        undo.values.push((field.id, i64::from(vb)));
                        let merged = match (field.meta.merge, va) {
                            (_, None) => vb,
                            (MergeRule::Latest, Some(a)) => {
                                if later {
                                    vb
                                } else {
                                    a
                                }
                            }
                            (MergeRule::First, Some(a)) => a.min(vb),
                            (MergeRule::Last, Some(a)) => a.max(vb),
                            (_, Some(a)) => a,
                        };
                        if va != Some(merged) {
                            undo.changed
                                .push((field.id, va.map(i64::from), i64::from(merged)));
                        }
                        m.insert(s, Some(merged));
                    }
                    FieldKind::Behaviour(_) => {
                        for (&slot, bm) in &field.slots {
                            let bm = bm.get()?;
                            if !bm.contains(b) {
                                continue;
                            }
                            undo.days.push((field.id, slot));
                            if let Pending::Events(m) = seed
                                .entry(field.id)
                                .or_insert_with(|| Pending::Events(BTreeMap::new()))
                            {
                                let adds = m.entry(slot).or_default();
                                if !bm.contains(s) && !adds.contains(s) {
                                    undo.gained_days.push((field.id, slot));
                                }
                                adds.insert(s);
                            }
                        }
                    }
                }
            }
            // Every identity of the absorbed customer (and the key it was
            // created with) names the survivor from now on.
            let mut moved = Vec::new();
            for (identity, seen) in snap.idents.of(b)? {
                moved.push(identity.clone());
                batch.identities.push(IdentityLink {
                    customer: s,
                    identity,
                    first_ms: seen.first_ms,
                    place: seen.place,
                });
            }
            if let Some(key) = snap.dict.key_of(b)?
                && !moved.contains(&key)
            {
                moved.push(key.clone());
                batch.identities.push(IdentityLink {
                    customer: s,
                    identity: key,
                    first_ms: 0,
                    place: String::new(),
                });
            }
            // Identities this request linked to the absorbed customer.
            for link in batch.identities.iter().filter(|l| l.customer == b) {
                if !moved.contains(&link.identity) {
                    moved.push(link.identity.clone());
                }
            }
            moved.sort();
            batch.merges.push(LoggedMerge {
                id: next_id,
                survivor: s,
                absorbed: b,
                via: via.clone(),
                refused: String::new(),
                moved,
                undo,
            });
            next_id += 1;
        }
        for (tag, ids) in tag_adds {
            batch.changes.push(Change {
                tag,
                op: ChangeOp::Add,
                ids,
            });
        }
        Ok(())
    }

    /// Whether customer `b`'s value of `field` (merge rule `latest`) was
    /// written after customer `s`'s: by the companion field that says when
    /// (this request's merges so far included). A value without a time
    /// counts as oldest.
    fn written_later(
        &self,
        field: &crate::storage::Field,
        b: u32,
        s: u32,
        seed: &BTreeMap<u32, Pending>,
    ) -> Result<bool> {
        let Some(at) = self.state.snap.field(&written_at_field(&field.meta.name)) else {
            return Ok(false);
        };
        let tb = at.int_value(b)?;
        let ts = match seed.get(&at.id) {
            Some(Pending::Int(m)) if m.contains_key(&s) => m.get(&s).copied().flatten(),
            _ => at.int_value(s)?,
        };
        Ok(tb > ts)
    }

    /// Logs the joins the rules refused, in the merge log, with the reason
    /// (`refused` set, nothing absorbed).
    pub(super) fn log_refused(&self, refused: &[(u32, u32, String, String)], batch: &mut Batch) {
        let next_id = batch
            .merges
            .last()
            .map_or_else(|| self.state.snap.merges.read().next_id(), |m| m.id + 1);
        for (id, (survivor, other, via, why)) in (next_id..).zip(refused) {
            batch.merges.push(LoggedMerge {
                id,
                survivor: *survivor,
                absorbed: *other,
                via: via.clone(),
                refused: why.clone(),
                moved: Vec::new(),
                undo: MergeUndo::default(),
            });
        }
    }
}
