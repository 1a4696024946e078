//! Planning: a request and the writer's state in, a [`Batch`] with every id
//! assigned out (or a reason to refuse it). Validates names, keys and field
//! kinds; loads every bitmap the batch will touch, so that applying it
//! cannot fail halfway. Writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::identify::Groups;
use super::ids::IdAssigner;
use super::*;
use crate::error::{Error, Result};
use crate::fields::time::{self};
use crate::fields::{FieldKind, MergeRule, written_at_field};
use crate::names::check_tag_name;
use crate::storage::record::{
    Batch, Change, ChangeOp, FieldChange, LoggedEvent, NewField, NewTag, SourceChange,
};
use crate::storage::snapshot::Field;

/// What planning reads: the writer's state, the moment of the write, and
/// the lsn of the last write that moved keys (an erasure, a merge or an
/// unmerge: keys resolved before it are looked up again). A pure function of these and the request: no thread, no file,
/// no clock of its own.
pub(crate) struct Planner<'a> {
    pub state: &'a State,
    pub at_ms: i64,
    pub last_delete_lsn: u64,
    /// OneID's guard rails.
    pub rules: &'a super::identify::OneIdRules,
    /// The zone of rules defined without one.
    pub time_zone: &'a str,
}

impl Planner<'_> {
    /// Validates a write against the current state and turns it into a batch
    /// with every id assigned. Loads every bitmap the batch will touch, so
    /// that applying it cannot fail halfway.
    pub(crate) fn plan(&self, op: WriteOp) -> Result<Planned> {
        let snap = &self.state.snap;
        let at_ms = self.at_ms;
        let mut batch = Batch {
            at_ms,
            ..Default::default()
        };
        match op {
            WriteOp::CreateTag {
                name,
                description,
                category,
                if_not_exists,
            } => {
                check_tag_name(&name)?;
                check_meta(&description, &category)?;
                if let Some(t) = snap.tag(&name) {
                    if if_not_exists {
                        return Ok(Planned::Done(WriteResult {
                            lsn: snap.lsn,
                            tag: Some(t.meta.clone()),
                            created: false,
                            ..Default::default()
                        }));
                    }
                    return Err(Error::TagExists(name));
                }
                if snap.field(&name).is_some() {
                    return Err(Error::FieldExists(name));
                }
                if snap.audiences.contains_key(name.as_str()) {
                    return Err(Error::AudienceExists(name));
                }
                batch.new_tags.push(NewTag {
                    id: snap.next_tag_id,
                    name: name.clone(),
                    description,
                    category,
                });
                Ok(Planned::Write(batch, Target::Created(name)))
            }
            WriteOp::DropTag { name } => {
                let tag = snap.tag(&name).ok_or(Error::TagNotFound(name.clone()))?;
                self.refuse_audience_rule(&name)?;
                self.refuse_if_read(&name, "tag")?;
                batch.drop_tags.push(tag.id);
                if snap.rules.get(&name).is_some() {
                    batch.rules.push(crate::storage::record::RuleChange {
                        name,
                        definition: None,
                        day: 0,
                    });
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::Update {
                mutations,
                create_missing_tags,
            } => {
                if mutations.is_empty() {
                    return Err(Error::invalid("empty update: no mutations"));
                }
                if mutations.iter().all(Mutation::is_empty) {
                    return Err(Error::invalid(
                        "empty update: the mutations name no customers",
                    ));
                }
                let mut ids = IdAssigner::new(self.state)?;
                let mut new_tags: HashMap<String, u32> = HashMap::new();
                self.plan_mutations(
                    &mutations,
                    create_missing_tags,
                    &mut ids,
                    &mut new_tags,
                    &mut batch,
                )?;
                batch.new_keys = ids.new_keys;
                if self.changes_nothing(&batch)? {
                    // Every customer already has what was asked: nothing to
                    // log or wait for. What the caller sees was made durable
                    // by the writes before it (each group is synced before
                    // the next begins, and its replies wait for that sync).
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    }));
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::Replace {
                tag,
                customers,
                create_missing_tag,
            } => {
                let mut ids = IdAssigner::new(self.state)?;
                let tag_id =
                    self.resolve_tag(&tag, create_missing_tag, &mut HashMap::new(), &mut batch)?;
                let members: RoaringBitmap =
                    ids.get_or_create_many(&customers)?.into_iter().collect();
                batch.changes.push(Change {
                    tag: tag_id,
                    op: ChangeOp::Replace,
                    ids: members,
                });
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Replaced(tag_id)))
            }
            WriteOp::DeleteCustomers { customers } => {
                if customers.is_empty() {
                    return Err(Error::invalid("empty delete: no customers named"));
                }
                let ids = IdAssigner::new(self.state)?;
                batch
                    .deletes
                    .extend(ids.get_many(&customers)?.into_iter().flatten());
                if batch.deletes.is_empty() {
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    }));
                }
                for tag in snap.tags.values() {
                    tag.bitmap.get()?;
                }
                for field in snap.fields.values() {
                    for slot in field.slots.values() {
                        slot.get()?;
                    }
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::CreateCustomers { customers } => {
                if customers.is_empty() {
                    return Err(Error::invalid("no customers named"));
                }
                let mut ids = IdAssigner::new(self.state)?;
                let found = ids.get_or_create_many(&customers)?;
                if ids.new_keys.is_empty() {
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ids: found,
                        ..Default::default()
                    }));
                }
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Ids(found)))
            }
            WriteOp::CreateField {
                name,
                description,
                category,
                kind,
                merge,
                if_not_exists,
            } => {
                check_tag_name(&name)?;
                check_meta(&description, &category)?;
                kind.validate()?;
                merge.validate(&kind)?;
                if let Some(f) = snap.field(&name) {
                    if if_not_exists && f.meta.kind == kind && f.meta.merge == merge {
                        return Ok(Planned::Done(WriteResult {
                            lsn: snap.lsn,
                            field: Some(f.meta.clone()),
                            created: false,
                            ..Default::default()
                        }));
                    }
                    return Err(Error::FieldExists(name));
                }
                if snap.tag(&name).is_some() {
                    return Err(Error::TagExists(name));
                }
                if snap.audiences.contains_key(name.as_str()) {
                    return Err(Error::AudienceExists(name));
                }
                // `latest` needs to know when each value was written: a
                // companion field, made with it.
                let companion = (merge == MergeRule::Latest).then(|| written_at_field(&name));
                if let Some(c) = &companion {
                    check_tag_name(c)?;
                    if snap.field(c).is_some() {
                        return Err(Error::FieldExists(c.clone()));
                    }
                    if snap.tag(c).is_some() {
                        return Err(Error::TagExists(c.clone()));
                    }
                    if snap.audiences.contains_key(c.as_str()) {
                        return Err(Error::AudienceExists(c.clone()));
                    }
                }
                batch.new_fields.push(NewField {
                    id: snap.next_tag_id,
                    name: name.clone(),
                    description,
                    category: category.clone(),
                    kind,
                    merge,
                });
                if let Some(c) = companion {
                    batch.new_fields.push(NewField {
                        id: snap.next_tag_id + 1,
                        name: c,
                        description: format!(
                            "when each customer's {name} was last written (Unix ms), for its merge rule latest; kept by the store"
                        ),
                        category,
                        kind: FieldKind::Int,
                        merge: MergeRule::Max,
                    });
                }
                Ok(Planned::Write(batch, Target::FieldCreated(name)))
            }
            WriteOp::DropField { name } => {
                let field = snap
                    .field(&name)
                    .ok_or(Error::FieldNotFound(name.clone()))?;
                if let Some(of) = name
                    .strip_suffix("_at_ms")
                    .and_then(|base| snap.field(base))
                    && of.meta.merge == MergeRule::Latest
                {
                    return Err(Error::invalid(format!(
                        "field {name:?} keeps when {:?} was written, for its merge rule latest; drop {:?} instead (it goes with it)",
                        of.meta.name, of.meta.name
                    )));
                }
                self.refuse_if_read(&name, "field")?;
                batch.drop_fields.push(field.id);
                if snap.rules.get(&name).is_some() {
                    batch.rules.push(crate::storage::record::RuleChange {
                        name: name.clone(),
                        definition: None,
                        day: 0,
                    });
                }
                if field.meta.merge == MergeRule::Latest
                    && let Some(c) = snap.field(&written_at_field(&name))
                {
                    batch.drop_fields.push(c.id);
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::SetValues { writes } => {
                if writes.is_empty() {
                    return Err(Error::invalid("empty write: no values or events"));
                }
                let mut ids = IdAssigner::new(self.state)?;
                let expired = plan_values(
                    snap,
                    &writes,
                    &[],
                    &mut ids,
                    at_ms,
                    &mut batch,
                    BTreeMap::new(),
                )?;
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Values { expired }))
            }
            WriteOp::PutSource {
                name,
                definition,
                replace,
            } => {
                check_tag_name(&name)?;
                if definition.len() > MAX_SOURCE_DEFINITION_BYTES {
                    return Err(Error::invalid(format!(
                        "source definition is {} bytes; at most {MAX_SOURCE_DEFINITION_BYTES}",
                        definition.len()
                    )));
                }
                let exists = snap.sources.contains_key(name.as_str());
                if exists && !replace {
                    return Err(Error::SourceExists(name));
                }
                if !exists && snap.sources.len() >= MAX_SOURCES {
                    return Err(Error::invalid(format!(
                        "the store keeps at most {MAX_SOURCES} sources; drop one first"
                    )));
                }
                batch.sources.push(SourceChange {
                    name,
                    definition: Some(definition),
                });
                Ok(Planned::Write(
                    batch,
                    Target::SourcePut { created: !exists },
                ))
            }
            WriteOp::PauseSource { name, paused } => {
                let Some(s) = snap.sources.get(name.as_str()) else {
                    return Err(Error::SourceNotFound(name));
                };
                if s.paused == paused {
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    }));
                }
                batch.pauses.push((name, paused));
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::DropSource { name } => {
                if !snap.sources.contains_key(name.as_str()) {
                    return Err(Error::SourceNotFound(name));
                }
                batch.sources.push(SourceChange {
                    name,
                    definition: None,
                });
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::PutAudience {
                name,
                definition,
                replace,
                kept_current,
            } => self.plan_put_audience(name, definition, replace, kept_current, batch),
            WriteOp::DropAudience { name } => self.plan_drop_audience(name, batch),
            WriteOp::TakeSnapshot {
                audience,
                query,
                taken_lsn,
                note,
                members,
                same_as,
            } => self.plan_take_snapshot(audience, query, taken_lsn, note, members, same_as, batch),
            WriteOp::DropSnapshot { id } => self.plan_drop_snapshot(id, batch),
            WriteOp::DefineRule {
                name,
                definition,
                description,
                category,
                replace,
            } => self.plan_define_rule(name, definition, description, category, replace, batch),
            WriteOp::DropRule { name } => self.plan_drop_rule(name, batch),
            WriteOp::TurnRuleDays => self.plan_turn_rule_days(batch),
            WriteOp::RecordHistory {
                day,
                keep_from,
                counts,
            } => {
                if let Some(last) = snap.history.last_day()
                    && day < last
                {
                    return Err(Error::invalid(format!(
                        "the history already has {}; {} is before it",
                        time::format_day(last),
                        time::format_day(day)
                    )));
                }
                batch.history = Some(crate::storage::record::HistoryDay {
                    day,
                    keep_from,
                    counts,
                });
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::RebuildFacts {
                as_of,
                customers,
                erase,
                writes,
            } => {
                let mut ids = IdAssigner::new(self.state)?;
                let found = ids.get_many(&customers)?;
                let (epoch, ingested) = &self.state.ingested;
                // The archive read is complete for a customer only if no
                // event of theirs came after it (and, when a checkpoint has
                // begun since, that cannot be told).
                let mut rebuilt = RoaringBitmap::new();
                let mut busy = Vec::new();
                for (key, id) in customers.iter().zip(found) {
                    match id {
                        None => {}
                        Some(id) if as_of != *epoch || ingested.contains(id) => {
                            busy.push(key.clone())
                        }
                        Some(id) => {
                            rebuilt.insert(id);
                        }
                    }
                }
                for name in &erase {
                    let Some(field) = snap.field(name) else {
                        continue;
                    };
                    for slot in field.slots.values() {
                        slot.get()?;
                    }
                    if !rebuilt.is_empty() {
                        batch.field_changes.push(FieldChange::Erase {
                            field: field.id,
                            ids: rebuilt.clone(),
                        });
                    }
                }
                // Due a rebuild (a refund after its order): done now.
                batch.rebuilt = &rebuilt & &*snap.rebuild_due;
                let mut kept = Vec::with_capacity(writes.len());
                for w in writes {
                    if ids
                        .get(w.customer())?
                        .is_some_and(|id| rebuilt.contains(id))
                    {
                        kept.push(w);
                    }
                }
                let expired = plan_values(
                    snap,
                    &kept,
                    &[],
                    &mut ids,
                    at_ms,
                    &mut batch,
                    BTreeMap::new(),
                )?;
                batch.new_keys = ids.new_keys;
                let target = Target::Rebuilt { expired, busy };
                if batch.is_empty() {
                    let mut r = WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    };
                    if let Target::Rebuilt { expired, busy } = target {
                        r.events_expired = expired;
                        r.busy = busy;
                    }
                    return Ok(Planned::Done(r));
                }
                Ok(Planned::Write(batch, target))
            }
            WriteOp::Unmerge {
                of,
                as_of,
                identities,
                erase,
                writes,
            } => self.plan_unmerge(of, as_of, identities, erase, writes, batch),
            WriteOp::Ingest { records } => self.plan_ingest(&records, batch),
            WriteOp::Consume {
                records,
                positions,
                rejects,
            } => {
                if !snap.sources.contains_key(positions.source.as_str()) {
                    return Err(Error::SourceNotFound(positions.source));
                }
                for r in &rejects {
                    if r.source != positions.source {
                        return Err(Error::invalid(format!(
                            "a reject of source {:?} in a batch of source {:?}",
                            r.source, positions.source
                        )));
                    }
                    if r.reason.len() > crate::storage::record::MAX_REJECT_REASON {
                        return Err(Error::invalid(format!(
                            "a reject's reason is {} bytes; at most {}",
                            r.reason.len(),
                            crate::storage::record::MAX_REJECT_REASON
                        )));
                    }
                }
                batch.positions.push(positions);
                batch.rejects = rejects;
                self.plan_ingest(&records, batch)
            }
        }
    }

    /// The batch of a [`WriteOp::Ingest`] (or [`WriteOp::Consume`]):
    /// duplicates skipped, customers identified and merged, the records'
    /// writes and kept events.
    fn plan_ingest(&self, records: &[IngestRecord], mut batch: Batch) -> Result<Planned> {
        let snap = &self.state.snap;
        let at_ms = self.at_ms;
        let mut duplicates = Vec::new();
        let mut fresh = std::collections::HashSet::new();
        let mut taken = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            if let Some(id) = r.seen {
                if self.state.seen.contains(id) || !fresh.insert(id) {
                    duplicates.push(i as u32);
                    continue;
                }
                batch.seen.push(id);
            }
            if let Some(e) = &r.event
                && e.bytes.len() > crate::storage::archive::MAX_EVENT_BYTES
            {
                return Err(Error::invalid(format!(
                    "record {i}: its event is {} bytes encoded; at most {}",
                    e.bytes.len(),
                    crate::storage::archive::MAX_EVENT_BYTES
                )));
            }
            taken.push((i as u32, r));
        }
        let mut ids = IdAssigner::new(self.state)?;
        // First, every record's customer: the identities of each
        // decide it (a new customer when they name none); customers
        // one record names together are one person.
        let mut groups = Groups::default();
        let mut customers = Vec::with_capacity(taken.len());
        for (i, r) in &taken {
            customers.push(if r.identities.is_empty() {
                None
            } else {
                Some(self.identify(&mut ids, &mut groups, *i, r, at_ms, &mut batch)?)
            });
        }
        // Then the merges, before the writes: each absorbed
        // customer's tags, values and identities move to its
        // survivor, and the records' writes build on the merged
        // values.
        let linked = batch.identities.len() as u64;
        let mut seed = BTreeMap::new();
        let merges = groups.merges();
        if merges.len() > super::identify::MAX_MERGES_PER_REQUEST {
            return Err(Error::invalid(format!(
                "these records would merge {} customers; at most {} in one request (send fewer records at once)",
                merges.len(),
                super::identify::MAX_MERGES_PER_REQUEST
            )));
        }
        if !merges.is_empty() {
            self.plan_merges(&merges, &mut seed, &mut batch)?;
        }
        let merged = batch.merges.clone();
        self.log_refused(&groups.refused(), &mut batch);
        for link in &mut batch.identities {
            link.customer = groups.find(link.customer);
        }
        let mut writes = Vec::with_capacity(taken.iter().map(|(_, r)| r.writes.len()).sum());
        // Each write's customer: the survivor of the record's, when its
        // identities decided one; else the write's own key.
        let mut resolved = Vec::with_capacity(writes.capacity());
        let mut kept = Vec::new();
        for ((_, r), customer) in taken.into_iter().zip(customers) {
            let survivor = customer.map(|c| groups.find(c));
            // An order whose refund came before it, or comes with
            // it, leaves out what only its being there gives.
            let refunded = r
                .refund
                .is_some_and(|id| self.state.seen.contains(id) || fresh.contains(&id));
            // A refund whose order an earlier request applied: only a
            // rebuild takes back the order's behaviours and days. The
            // order may be older than the de-duplication window: a
            // refund whose order is neither remembered nor in this
            // request counts as one after its order when its customer
            // was there before (the kept events may hold the order; a
            // rebuild without it changes nothing).
            if let (Some(order), Some(c)) = (r.order, customer) {
                let survivor = groups.find(c);
                if self.state.seen.contains(order)
                    || (!fresh.contains(&order) && snap.live()?.contains(survivor))
                {
                    batch.rebuild_due.insert(survivor);
                }
            }
            let unless = (!refunded).then_some(&r.unless_refunded);
            for w in r.writes.iter().chain(unless.into_iter().flatten()) {
                writes.push(w);
                resolved.push(survivor);
            }
            if let Some(e) = &r.event {
                kept.push((e, survivor));
            }
        }
        let expired = if writes.is_empty() && seed.is_empty() {
            0
        } else {
            plan_values(snap, &writes, &resolved, &mut ids, at_ms, &mut batch, seed)?
        };
        // A kept event makes its customer, as its facts would.
        let customers = kept
            .iter()
            .map(|(e, survivor)| match survivor {
                Some(id) => Ok(*id),
                None => ids.get_or_create(&e.customer),
            })
            .collect::<Result<Vec<u32>>>()?;
        batch.new_keys = ids.new_keys;
        batch.events = kept
            .into_iter()
            .zip(customers)
            .map(|((e, _), customer)| LoggedEvent {
                customer,
                bytes: e.bytes.clone(),
            })
            .collect();
        let target = Target::Ingested {
            expired,
            duplicates,
            linked,
            merges: merged,
            refusals: std::mem::take(&mut groups.refusals),
        };
        if batch.is_empty() {
            let mut r = WriteResult {
                lsn: snap.lsn,
                ..Default::default()
            };
            target.report(&mut r);
            return Ok(Planned::Done(r));
        }
        Ok(Planned::Write(batch, target))
    }

    /// The changes of an update's mutations, appended to `batch` (tags made
    /// when `create` allows, ids given to new customers by `ids`).
    pub(super) fn plan_mutations(
        &self,
        mutations: &[Mutation],
        create: bool,
        ids: &mut IdAssigner,
        new_tags: &mut HashMap<String, u32>,
        batch: &mut Batch,
    ) -> Result<()> {
        for m in mutations {
            let tag_id = self.resolve_tag(&m.tag, create, new_tags, batch)?;
            let mut add = ids.get_or_create_many(&m.add)?;
            // Found live in a snapshot no older than the last
            // deletion: still live.
            let trusted = m.resolved_at.is_some_and(|at| at >= self.last_delete_lsn);
            for (id, key) in &m.add_resolved {
                let still_live = trusted || ids.is_live(*id);
                add.push(if still_live {
                    *id
                } else {
                    ids.get_or_create(key)?
                });
            }
            if let Some(&dead) = m.add_ids.iter().find(|&&id| !ids.is_live(id)) {
                return Err(Error::CustomerIdNotFound(dead));
            }
            add.extend_from_slice(&m.add_ids);
            // Sorted, the bitmap is built by appending.
            add.sort_unstable();
            let add: RoaringBitmap = add.into_iter().collect();
            let mut remove: Vec<u32> = ids.get_many(&m.remove)?.into_iter().flatten().collect();
            remove.extend(m.remove_ids.iter().filter(|&&id| ids.is_live(id)));
            for (id, key) in &m.remove_resolved {
                if trusted || ids.is_live(*id) {
                    remove.push(*id);
                } else if let Some(id) = ids.get(key)? {
                    remove.push(id);
                }
            }
            remove.sort_unstable();
            let remove: RoaringBitmap = remove.into_iter().collect();
            if !add.is_empty() {
                batch.changes.push(Change {
                    tag: tag_id,
                    op: ChangeOp::Add,
                    ids: add,
                });
            }
            if !remove.is_empty() {
                batch.changes.push(Change {
                    tag: tag_id,
                    op: ChangeOp::Remove,
                    ids: remove,
                });
            }
        }
        Ok(())
    }

    /// True when applying the membership changes of `batch` would leave the
    /// state as it is: no new customer or tag, every id added already a
    /// member and every id removed already not one. Each change is checked
    /// against the state before the batch; if none changes that state, none
    /// changes the state the earlier ones leave. It stops at the first id
    /// that would change something.
    pub(super) fn changes_nothing(&self, batch: &Batch) -> Result<bool> {
        let only_changes = batch.new_tags.is_empty()
            && batch.new_keys.is_empty()
            && batch.deletes.is_empty()
            && batch.drop_tags.is_empty()
            && batch.new_fields.is_empty()
            && batch.field_changes.is_empty()
            && batch.drop_fields.is_empty();
        if !only_changes {
            return Ok(false);
        }
        // A few ids of every change first: a batch that changes something
        // usually shows it there, without a look-up of every id.
        for sample in [Some(SAMPLE_IDS), None] {
            for change in &batch.changes {
                let Some(tag) = self.state.tag_by_id(change.tag) else {
                    return Ok(false);
                };
                let members = tag.bitmap.get()?;
                let mut ids = change.ids.iter().take(sample.unwrap_or(usize::MAX));
                let unchanged = match change.op {
                    ChangeOp::Add => ids.all(|id| members.contains(id)),
                    ChangeOp::Remove => !ids.any(|id| members.contains(id)),
                    _ => false,
                };
                if !unchanged {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The id of an existing tag (loading its bitmap), or of one this batch creates.
    pub(super) fn resolve_tag(
        &self,
        name: &str,
        create: bool,
        new_tags: &mut HashMap<String, u32>,
        batch: &mut Batch,
    ) -> Result<u32> {
        check_tag_name(name)?;
        if let Some(t) = self.state.snap.tag(name) {
            self.refuse_rule_write(name)?;
            t.bitmap.get()?;
            return Ok(t.id);
        }
        if let Some(&id) = new_tags.get(name) {
            return Ok(id);
        }
        if self.state.snap.field(name).is_some() {
            return Err(Error::invalid(format!(
                "{name:?} is a field, not a tag: set its values with SetValues"
            )));
        }
        if self.state.snap.audiences.contains_key(name) {
            return Err(Error::invalid(format!(
                "{name:?} is a saved audience, not a tag: its members are its query's"
            )));
        }
        if !create {
            return Err(Error::TagNotFound(name.to_string()));
        }
        let id = self.state.snap.next_tag_id + new_tags.len() as u32;
        new_tags.insert(name.to_string(), id);
        batch.new_tags.push(NewTag {
            id,
            name: name.to_string(),
            description: String::new(),
            category: String::new(),
        });
        Ok(id)
    }
}

pub(super) fn check_meta(description: &str, category: &str) -> Result<()> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(Error::invalid(format!(
            "description is longer than {MAX_DESCRIPTION_BYTES} bytes"
        )));
    }
    if category.len() > MAX_CATEGORY_BYTES || category.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "category must be at most {MAX_CATEGORY_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// What one request writes to one field, before it becomes a [`FieldChange`].
pub(super) enum Pending {
    /// By customer, in no order (a request of records writes each of its
    /// fields for thousands of customers: hashed, not searched in a tree);
    /// sorted once, when it becomes a change.
    Int(hashbrown::HashMap<u32, Option<i64>>),
    Enum(BTreeMap<u32, Option<u32>>),
    Events(BTreeMap<u32, RoaringBitmap>),
}

/// Turns value writes into field changes (last write wins per customer and
/// field); returns how many events were past retention. Loads every slot
/// the changes will touch, so applying them cannot fail halfway.
///
/// `resolved`, when not empty, holds one entry per write: the customer id
/// the caller already decided for it (ingestion's records, whose customers
/// the identities decided), or `None` to look up the write's key.
pub(super) fn plan_values<'w, W: std::borrow::Borrow<ValueWrite>>(
    snap: &'w crate::storage::Snapshot,
    writes: &'w [W],
    resolved: &[Option<u32>],
    ids: &mut IdAssigner<'_>,
    now_ms: i64,
    batch: &mut Batch,
    seed: BTreeMap<u32, Pending>,
) -> Result<u64> {
    // Values decided before the writes (a merge's), which later writes of
    // the same customer and field build on.
    let mut pending: BTreeMap<u32, Pending> = seed;
    // Integer fields' slots, looked up once per request.
    let mut int_values: HashMap<u32, crate::storage::snapshot::IntValues<'_>> = HashMap::new();
    let mut todays: HashMap<u32, (jiff::tz::TimeZone, i32)> = HashMap::new();
    let mut expired = 0;
    // Values of `latest` fields written: (field, customer, set or cleared),
    // for the companion field that says when.
    let mut stamps: Vec<(&str, u32, bool)> = Vec::new();
    // Each field's definition and whether a rule keeps it, looked up once
    // per request (a batch of records names the same few fields again and
    // again).
    let mut known: hashbrown::HashMap<&str, (&Arc<Field>, bool)> = hashbrown::HashMap::new();
    let mut lookup = |name: &'w String| -> Result<(&Arc<Field>, bool)> {
        if let Some(&f) = known.get(name.as_str()) {
            return Ok(f);
        }
        let f = snap
            .field(name)
            .ok_or_else(|| Error::FieldNotFound(name.clone()))?;
        let f = (f, snap.rules.get(name.as_str()).is_some());
        known.insert(name, f);
        Ok(f)
    };
    // The values that the combining writes of decided customers start
    // from, read before the writes, all at once (ascending ids per field:
    // [`IntValues::get_sorted`]); a customer's earlier write in this
    // request still comes first.
    // By write: `Some(value before the request)` when read ahead.
    let mut read_ahead: Vec<Option<Option<i64>>> = Vec::new();
    if !resolved.is_empty() {
        // Per field, (customer, write) in the order of the writes.
        type Wanted<'f> = (&'f Arc<Field>, Vec<(u32, u32)>);
        let mut wanted: BTreeMap<u32, Wanted> = BTreeMap::new();
        for (i, (w, pre)) in writes.iter().zip(resolved).enumerate() {
            if let (ValueWrite::Combine { field, .. }, Some(id)) = (w.borrow(), pre)
                && let Ok((f, _)) = lookup(field)
                && matches!(f.meta.kind, FieldKind::Int)
            {
                wanted
                    .entry(f.id)
                    .or_insert_with(|| (f, Vec::new()))
                    .1
                    .push((*id, i as u32));
            }
        }
        if !wanted.is_empty() {
            read_ahead = vec![None; writes.len()];
        }
        for (f, mut pairs) in wanted.into_values() {
            pairs.sort_unstable();
            let mut ids: Vec<u32> = pairs.iter().map(|&(id, _)| id).collect();
            ids.dedup();
            let values = f.int_values()?.get_sorted(&ids);
            let mut at = 0;
            for (id, i) in pairs {
                while ids[at] != id {
                    at += 1;
                }
                read_ahead[i as usize] = Some(values[at]);
            }
        }
    }
    for (i, w) in writes.iter().enumerate() {
        let w: &ValueWrite = w.borrow();
        let pre = resolved.get(i).copied().flatten();
        let (name, customer) = match w {
            ValueWrite::Int {
                field, customer, ..
            }
            | ValueWrite::Enum {
                field, customer, ..
            }
            | ValueWrite::Event {
                field, customer, ..
            }
            | ValueWrite::Combine {
                field, customer, ..
            } => (field, customer),
        };
        let (field, ruled) = lookup(name)?;
        // The write's customer: decided by the caller, else its key's.
        let get_or_create = |ids: &mut IdAssigner<'_>| match pre {
            Some(id) => Ok(id),
            None => ids.get_or_create(customer),
        };
        let get = |ids: &IdAssigner<'_>| match pre {
            Some(id) => Ok(Some(id)),
            None => ids.get(customer),
        };
        if ruled {
            return Err(Error::Precondition(format!(
                "field {name:?} is a lifecycle: its values follow its stages' rules and cannot be written; redefine it with DefineRule"
            )));
        }
        let wrong = |want: &str| {
            Error::invalid(format!(
                "field {name:?} is {} ({} expected for this write)",
                field.meta.kind.name(),
                want
            ))
        };
        match (w, &field.meta.kind) {
            (ValueWrite::Int { value, .. }, FieldKind::Int) => {
                let id = match value {
                    Some(_) => Some(get_or_create(ids)?),
                    None => get(ids)?,
                };
                if let Some(id) = id {
                    let Pending::Int(m) = pending
                        .entry(field.id)
                        .or_insert_with(|| Pending::Int(Default::default()))
                    else {
                        return Err(wrong("integer"));
                    };
                    m.insert(id, *value);
                    if field.meta.merge == MergeRule::Latest {
                        stamps.push((name, id, value.is_some()));
                    }
                }
            }
            (ValueWrite::Combine { with, .. }, FieldKind::Int) => {
                let id = get_or_create(ids)?;
                let Pending::Int(m) = pending
                    .entry(field.id)
                    .or_insert_with(|| Pending::Int(Default::default()))
                else {
                    return Err(wrong("integer"));
                };
                // The newest value: this request's own earlier write of it,
                // else the state's (which every earlier request of the group
                // has already changed). One search of the request's values
                // (a batch of records writes each field of thousands of
                // customers).
                let entry = m.entry(id);
                let current = match (&entry, read_ahead.get(i).copied().flatten()) {
                    (hashbrown::hash_map::Entry::Occupied(e), _) => *e.get(),
                    (hashbrown::hash_map::Entry::Vacant(_), Some(v)) => v,
                    (hashbrown::hash_map::Entry::Vacant(_), None) => {
                        match int_values.entry(field.id) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(field.int_values()?)
                            }
                        }
                        .get(id)
                    }
                };
                let new = with.apply(current).ok_or_else(|| {
                    Error::invalid(format!(
                        "adding {} to {name:?} of {customer:?} ({}) leaves the 64-bit range",
                        match with {
                            Combine::Add(d) | Combine::Max(d) | Combine::Min(d) => d,
                        },
                        current.unwrap_or(0)
                    ))
                })?;
                let changed = Some(new) != current;
                match entry {
                    hashbrown::hash_map::Entry::Occupied(mut e) => *e.get_mut() = Some(new),
                    hashbrown::hash_map::Entry::Vacant(e) if changed => {
                        e.insert(Some(new));
                    }
                    hashbrown::hash_map::Entry::Vacant(_) => {}
                }
                if changed && field.meta.merge == MergeRule::Latest {
                    stamps.push((name, id, true));
                }
            }
            (ValueWrite::Enum { value, .. }, FieldKind::Enum { values }) => {
                let slot = match value {
                    Some(v) => Some(values.iter().position(|x| x == v).ok_or_else(|| {
                        Error::invalid(format!(
                            "{v:?} is not a value of {name:?} (its values: {})",
                            values.join(", ")
                        ))
                    })? as u32),
                    None => None,
                };
                let id = match slot {
                    Some(_) => Some(get_or_create(ids)?),
                    None => get(ids)?,
                };
                if let Some(id) = id {
                    let Pending::Enum(m) = pending
                        .entry(field.id)
                        .or_insert_with(|| Pending::Enum(BTreeMap::new()))
                    else {
                        return Err(wrong("enumerated"));
                    };
                    m.insert(id, slot);
                    if field.meta.merge == MergeRule::Latest {
                        stamps.push((name, id, slot.is_some()));
                    }
                }
            }
            (ValueWrite::Event { at, .. }, FieldKind::Behaviour(spec)) => {
                let (tz, today) = match todays.entry(field.id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let tz = time::zone(&spec.time_zone)?;
                        let today = time::day_of(now_ms, &tz)?;
                        e.insert((tz, today))
                    }
                };
                let (tz, today) = (&*tz, &*today);
                let (day, ahead) = match *at {
                    EventTime::Ms(ms) => (
                        time::day_of(ms, tz)?,
                        ms > now_ms.saturating_add(MAX_AHEAD_MS),
                    ),
                    EventTime::Day(d) => (d, d > today + 1),
                };
                if ahead {
                    return Err(Error::invalid(format!(
                        "event on {} is more than a day ahead of today ({} in {}): \
                         events from the future are refused",
                        time::format_day(day),
                        time::format_day(*today),
                        spec.time_zone
                    )));
                }
                if !(0..=time::MAX_DAY).contains(&day) {
                    return Err(Error::invalid(format!(
                        "event day {} is outside 1970-01-01 ..= {}",
                        time::format_day(day),
                        time::format_day(time::MAX_DAY)
                    )));
                }
                let Some(bucket) = spec.bucket_for(day, *today) else {
                    expired += 1;
                    continue;
                };
                let id = get_or_create(ids)?;
                let Pending::Events(m) = pending
                    .entry(field.id)
                    .or_insert_with(|| Pending::Events(BTreeMap::new()))
                else {
                    return Err(wrong("behaviour"));
                };
                m.entry(bucket.slot()).or_default().insert(id);
            }
            (ValueWrite::Int { .. }, _) => return Err(wrong("integer")),
            (ValueWrite::Enum { .. }, _) => return Err(wrong("enumerated")),
            (ValueWrite::Event { .. }, _) => return Err(wrong("behaviour")),
            (ValueWrite::Combine { with, .. }, _) => {
                return Err(wrong(&format!("integer, to {}", with.word())));
            }
        }
    }
    for (name, id, set) in stamps {
        let Some(at) = snap.field(&written_at_field(name)) else {
            continue;
        };
        if let Pending::Int(m) = pending
            .entry(at.id)
            .or_insert_with(|| Pending::Int(Default::default()))
        {
            m.insert(id, set.then_some(now_ms));
        }
    }
    let by_id: HashMap<u32, &Arc<Field>> = snap.fields.values().map(|f| (f.id, f)).collect();
    for (field_id, p) in pending {
        let field = by_id
            .get(&field_id)
            .ok_or_else(|| Error::FieldNotFound(field_id.to_string()))?;
        let change = match p {
            Pending::Int(m) => {
                for slot in field.slots.values() {
                    slot.get()?;
                }
                let mut set = Vec::with_capacity(m.len());
                let mut clear = Vec::new();
                for (id, v) in m {
                    match v {
                        Some(v) => set.push((id, v)),
                        None => clear.push(id),
                    }
                }
                set.sort_unstable_by_key(|&(id, _)| id);
                clear.sort_unstable();
                // Distinct keys of a map, sorted: in order.
                let clear = RoaringBitmap::from_sorted_iter(clear).map_err(|e| {
                    Error::Internal(format!("the values cleared of field {field_id}: {e}"))
                })?;
                FieldChange::Int {
                    field: field_id,
                    set,
                    clear,
                }
            }
            Pending::Enum(m) => {
                for slot in field.slots.values() {
                    slot.get()?;
                }
                let mut set: BTreeMap<u32, RoaringBitmap> = BTreeMap::new();
                let mut clear = RoaringBitmap::new();
                for (id, v) in m {
                    match v {
                        Some(slot) => {
                            set.entry(slot).or_default().insert(id);
                        }
                        None => {
                            clear.insert(id);
                        }
                    }
                }
                FieldChange::Enum {
                    field: field_id,
                    set: set.into_iter().collect(),
                    clear,
                }
            }
            Pending::Events(m) => {
                for slot in m.keys() {
                    if let Some(b) = field.slots.get(slot) {
                        b.get()?;
                    }
                }
                FieldChange::Events {
                    field: field_id,
                    add: m.into_iter().collect(),
                }
            }
        };
        batch.field_changes.push(change);
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    //! Planning alone: a state and a request in, a batch (or a refusal)
    //! out. No writer thread, no log, no files.

    use super::*;
    use crate::bitmap::ShardedBitmap;
    use crate::storage::Snapshot;
    use crate::storage::record::ChangeOp;

    const AT: i64 = 1_764_000_000_000;

    fn empty() -> State {
        State::new(Snapshot::in_memory(Vec::new(), ShardedBitmap::new()))
    }

    fn plan(state: &State, op: WriteOp) -> Result<Planned> {
        Planner {
            state,
            at_ms: AT,
            last_delete_lsn: 0,
            rules: &Default::default(),
            time_zone: "Asia/Shanghai",
        }
        .plan(op)
    }

    fn batch(p: Planned) -> Batch {
        match p {
            Planned::Write(b, _) => b,
            Planned::Done(r) => panic!("expected a batch, got {r:?}"),
        }
    }

    fn add(tag: &str, keys: &[&str]) -> WriteOp {
        WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: keys.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            }],
            create_missing_tags: true,
        }
    }

    /// Plans and applies, as the writer does (without the log).
    fn apply(state: &mut State, op: WriteOp) {
        let b = batch(plan(state, op).unwrap());
        let lsn = state.snap.lsn + 1;
        state.apply(lsn, &b).unwrap();
        state.snap.lsn = lsn;
    }

    #[test]
    fn an_update_names_new_tags_and_customers_with_every_id_decided() {
        let state = empty();
        let b = batch(plan(&state, add("vip", &["a", "b", "a"])).unwrap());
        assert_eq!(b.at_ms, AT);
        assert_eq!(b.new_tags.len(), 1);
        assert_eq!((b.new_tags[0].id, b.new_tags[0].name.as_str()), (0, "vip"));
        // A key named twice is one new customer.
        assert_eq!(b.new_keys, vec![(0, "a".into()), (1, "b".into())]);
        assert_eq!(b.changes.len(), 1);
        assert_eq!(b.changes[0].op, ChangeOp::Add);
        assert_eq!(b.changes[0].ids.iter().collect::<Vec<_>>(), vec![0, 1]);
        // Planning wrote nothing.
        assert!(state.snap.tag("vip").is_none());
        assert_eq!(state.snap.next_customer_id, 0);
    }

    #[test]
    fn known_customers_keep_their_ids_and_a_write_that_changes_nothing_is_not_logged() {
        let mut state = empty();
        apply(&mut state, add("vip", &["a", "b"]));
        let b = batch(plan(&state, add("vip", &["b", "c"])).unwrap());
        assert_eq!(b.new_keys, vec![(2, "c".into())]);
        assert!(b.new_tags.is_empty());
        assert_eq!(b.changes[0].ids.iter().collect::<Vec<_>>(), vec![1, 2]);
        match plan(&state, add("vip", &["a"])).unwrap() {
            Planned::Done(r) => assert_eq!((r.lsn, r.added), (state.snap.lsn, 0)),
            Planned::Write(b, _) => panic!("a no-op was planned as {b:?}"),
        }
    }

    #[test]
    fn refusals_name_the_problem() {
        let mut state = empty();
        apply(&mut state, add("vip", &["a"]));
        let unknown = WriteOp::Update {
            mutations: vec![Mutation {
                tag: "nope".into(),
                add: vec!["a".into()],
                ..Default::default()
            }],
            create_missing_tags: false,
        };
        assert!(matches!(plan(&state, unknown), Err(Error::TagNotFound(t)) if t == "nope"));
        let create = |name: &str| WriteOp::CreateTag {
            name: name.into(),
            description: String::new(),
            category: String::new(),
            if_not_exists: false,
        };
        assert!(matches!(
            plan(&state, create("vip")),
            Err(Error::TagExists(_))
        ));
        assert!(matches!(
            plan(&state, create(" padded")),
            Err(Error::InvalidArgument(_))
        ));
        let empty_update = WriteOp::Update {
            mutations: vec![Mutation {
                tag: "vip".into(),
                ..Default::default()
            }],
            create_missing_tags: false,
        };
        assert!(matches!(
            plan(&state, empty_update),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_replace_and_a_delete_name_ids_of_live_customers_only() {
        let mut state = empty();
        apply(&mut state, add("vip", &["a", "b", "c"]));
        let b = batch(
            plan(
                &state,
                WriteOp::Replace {
                    tag: "vip".into(),
                    customers: vec!["c".into(), "d".into()],
                    create_missing_tag: false,
                },
            )
            .unwrap(),
        );
        assert_eq!(b.changes[0].op, ChangeOp::Replace);
        assert_eq!(b.changes[0].ids.iter().collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(b.new_keys, vec![(3, "d".into())]);

        let delete = |keys: &[&str]| WriteOp::DeleteCustomers {
            customers: keys.iter().map(|k| k.to_string()).collect(),
        };
        let b = batch(plan(&state, delete(&["b", "nobody"])).unwrap());
        assert_eq!(b.deletes.iter().collect::<Vec<_>>(), vec![1]);
        apply(&mut state, delete(&["b"]));
        // A deleted customer's key names a new customer afterwards.
        let b = batch(plan(&state, add("vip", &["b"])).unwrap());
        assert_eq!(b.new_keys, vec![(3, "b".into())]);
    }

    #[test]
    fn keys_resolved_before_a_delete_are_looked_up_again() {
        let mut state = empty();
        apply(&mut state, add("vip", &["a"]));
        apply(&mut state, add("other", &["x"]));
        let stale = Mutation {
            tag: "other".into(),
            add_resolved: vec![(0, "a".into())],
            resolved_at: Some(state.snap.lsn),
            ..Default::default()
        };
        // "a" is deleted after it was resolved, then written again.
        let deleted_at = state.snap.lsn + 1;
        apply(
            &mut state,
            WriteOp::DeleteCustomers {
                customers: vec!["a".into()],
            },
        );
        let rules = Default::default();
        let planner = Planner {
            state: &state,
            at_ms: AT,
            last_delete_lsn: deleted_at,
            rules: &rules,
            time_zone: "Asia/Shanghai",
        };
        let op = WriteOp::Update {
            mutations: vec![stale],
            create_missing_tags: false,
        };
        let b = batch(planner.plan(op).unwrap());
        // Not id 0 (the deleted customer's): a new customer.
        assert_eq!(b.new_keys, vec![(2, "a".into())]);
        assert_eq!(b.changes[0].ids.iter().collect::<Vec<_>>(), vec![2]);
    }

    /// An integer field's values after writes of few customers and of many
    /// (which change the bit slices by sharded operations): every value,
    /// negative ones and cleared ones included, reads back as written.
    #[test]
    fn integer_values_written_few_or_many_read_back() {
        let mut state = empty();
        apply(
            &mut state,
            WriteOp::CreateField {
                name: "f".into(),
                description: String::new(),
                category: String::new(),
                kind: crate::fields::FieldKind::Int,
                merge: Default::default(),
                if_not_exists: false,
            },
        );
        let mut model: BTreeMap<String, i64> = BTreeMap::new();
        for (round, n) in [(0u64, 10usize), (1, 6_000), (2, 9_000), (3, 30), (4, 7_000)] {
            let mut writes = Vec::new();
            for i in 0..n {
                let c = (i as u64 * 7_919 + round * 13) % 8_000;
                let key = format!("c{c}");
                let value = match (c + round) % 9 {
                    0 => None,
                    1 => Some(-((c * 31 + round) as i64)),
                    _ => Some((c * 1_000_003 + round * 17) as i64),
                };
                match value {
                    Some(v) => model.insert(key.clone(), v),
                    None => model.remove(&key),
                };
                writes.push(ValueWrite::Int {
                    field: "f".into(),
                    customer: key,
                    value,
                });
            }
            apply(&mut state, WriteOp::SetValues { writes });
            let snap = &state.snap;
            let read = snap.field("f").unwrap().int_values().unwrap();
            for c in 0..8_000u64 {
                let key = format!("c{c}");
                let got = snap.customer_id(&key).unwrap().and_then(|id| read.get(id));
                assert_eq!(got, model.get(&key).copied(), "round {round}, {key}");
            }
        }
    }
}
