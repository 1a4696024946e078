//! The public write vocabulary: what a client may ask the writer to do
//! ([`WriteOp`] and its parts) and what it answers ([`WriteResult`]).

use super::*;
use crate::error::Result;
use crate::fields::{FieldKind, MergeRule};
use crate::names::check_key;
use crate::storage::snapshot::{FieldMeta, Snapshot, TagMeta};

/// One tag's changes in an [`WriteOp::Update`], by customer key and by
/// internal id.
#[derive(Debug, Clone, Default)]
pub struct Mutation {
    pub tag: String,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    /// Ids of live customers ([`Error::CustomerIdNotFound`] otherwise).
    pub add_ids: Vec<u32>,
    /// Ids that name no live customer are skipped.
    pub remove_ids: Vec<u32>,
    /// Keys of `add` already looked up in a recent snapshot, each with the id
    /// it had there ([`Mutation::resolve_in`]). They mean exactly what they
    /// would in `add`: the writer takes the id while that customer is live,
    /// and looks the key up again (or creates it) otherwise.
    pub add_resolved: Vec<(u32, String)>,
    /// Keys of `remove` looked up the same way.
    pub remove_resolved: Vec<(u32, String)>,
    /// The lsn of the snapshot in which every id of `add_resolved` and
    /// `remove_resolved` named a live customer, if known. When no customer
    /// has been deleted since, the writer takes the ids without checking
    /// them again.
    pub resolved_at: Option<u64>,
}

impl Mutation {
    pub(crate) fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.remove.is_empty()
            && self.add_ids.is_empty()
            && self.remove_ids.is_empty()
            && self.add_resolved.is_empty()
            && self.remove_resolved.is_empty()
    }

    /// Moves the second half of the keys of `add` and of `remove` into a new
    /// mutation of the same tag, to be resolved elsewhere and then
    /// [`Mutation::append`]ed back: a mutation is a set of changes, so the
    /// order of its customers does not matter.
    pub fn split_off_half(&mut self) -> Mutation {
        Mutation {
            tag: self.tag.clone(),
            add: self.add.split_off(self.add.len() / 2),
            remove: self.remove.split_off(self.remove.len() / 2),
            ..Default::default()
        }
    }

    pub(crate) fn has_resolved(&self) -> bool {
        !self.add_resolved.is_empty() || !self.remove_resolved.is_empty()
    }

    /// Adds the customers of `other` (a mutation of the same tag).
    pub fn append(&mut self, mut other: Mutation) {
        self.resolved_at = match (self.has_resolved(), other.has_resolved()) {
            (_, false) => self.resolved_at,
            (false, true) => other.resolved_at,
            (true, true) => self
                .resolved_at
                .zip(other.resolved_at)
                .map(|(a, b)| a.min(b)),
        };
        self.add.append(&mut other.add);
        self.remove.append(&mut other.remove);
        self.add_ids.append(&mut other.add_ids);
        self.remove_ids.append(&mut other.remove_ids);
        self.add_resolved.append(&mut other.add_resolved);
        self.remove_resolved.append(&mut other.remove_resolved);
    }

    /// Looks the keys of `add` and `remove` up in `snap`, a snapshot the
    /// caller holds, and moves those of live customers to `add_resolved`
    /// and `remove_resolved`: the look-ups then run on the caller's thread,
    /// not on the single writer thread. Safe against any write in between,
    /// because a key keeps its id for its customer's whole life: if the id is
    /// still live when the write is applied, it is still that key's.
    pub fn resolve_in(&mut self, snap: &Snapshot) -> Result<()> {
        let found = self.look_up(snap)?;
        self.take_resolved(found);
        Ok(())
    }

    /// The first half of [`Mutation::resolve_in`], which only reads: the
    /// ids `snap` has for the keys of `add` and of `remove` (`None` for keys
    /// of no live customer). It may run on another thread than
    /// [`Mutation::take_resolved`], and allocates little there.
    pub fn look_up(&self, snap: &Snapshot) -> Result<KeyIds> {
        fn ids(keys: &[String], snap: &Snapshot) -> Result<Vec<Option<u32>>> {
            // In groups, so that the dictionary's lock (which the writer takes
            // to add new keys) is held briefly each time.
            let mut ids = Vec::with_capacity(keys.len());
            for group in keys.chunks(RESOLVE_GROUP) {
                let refs: Vec<&str> = group.iter().map(String::as_str).collect();
                ids.extend(snap.customer_ids(&refs)?);
            }
            Ok(ids)
        }
        Ok(KeyIds {
            add: ids(&self.add, snap)?,
            remove: ids(&self.remove, snap)?,
            lsn: snap.lsn,
        })
    }

    /// The second half of [`Mutation::resolve_in`]: moves the keys `found`
    /// names (from [`Mutation::look_up`] of this same mutation) to
    /// `add_resolved` and `remove_resolved`.
    pub fn take_resolved(&mut self, found: KeyIds) {
        fn split(keys: &mut Vec<String>, out: &mut Vec<(u32, String)>, ids: Vec<Option<u32>>) {
            if ids.len() != keys.len() {
                return;
            }
            let mut rest = Vec::new();
            for (key, id) in std::mem::take(keys).into_iter().zip(ids) {
                match id {
                    Some(id) => out.push((id, key)),
                    None => rest.push(key),
                }
            }
            *keys = rest;
        }
        self.resolved_at = if self.has_resolved() {
            self.resolved_at.map(|at| at.min(found.lsn))
        } else {
            Some(found.lsn)
        };
        split(&mut self.add, &mut self.add_resolved, found.add);
        split(&mut self.remove, &mut self.remove_resolved, found.remove);
    }
}

/// What [`Mutation::look_up`] found: an id (or none) per key of `add` and
/// of `remove`, in order.
#[derive(Debug, Default)]
pub struct KeyIds {
    pub add: Vec<Option<u32>>,
    pub remove: Vec<Option<u32>>,
    /// The lsn of the snapshot they were found in.
    pub lsn: u64,
}

/// A write, in domain terms.
#[derive(Debug, Clone)]
pub enum WriteOp {
    CreateTag {
        name: String,
        description: String,
        category: String,
        if_not_exists: bool,
    },
    DropTag {
        name: String,
    },
    Update {
        mutations: Vec<Mutation>,
        create_missing_tags: bool,
    },
    Replace {
        tag: String,
        customers: Vec<String>,
        create_missing_tag: bool,
    },
    DeleteCustomers {
        customers: Vec<String>,
    },
    /// The ids of `customers`, creating the customers no live one has
    /// (their ids in [`WriteResult::ids`], in order).
    CreateCustomers {
        customers: Vec<String>,
    },
    CreateField {
        name: String,
        description: String,
        category: String,
        kind: FieldKind,
        /// How its values combine when customers merge.
        merge: MergeRule,
        if_not_exists: bool,
    },
    DropField {
        name: String,
    },
    /// Field values and events, applied together or not at all.
    SetValues {
        writes: Vec<ValueWrite>,
    },
    /// Defines a source of ingestion (its definition is TOML, checked by the
    /// ingestion layer); `replace` allows redefining one that exists.
    PutSource {
        name: String,
        definition: String,
        replace: bool,
    },
    DropSource {
        name: String,
    },
    /// Saves an audience: a named query (checked by the query layer, which
    /// also names the saved audiences it uses in `definition.uses`);
    /// `replace` allows redefining one that exists. Audiences share the
    /// name space of tags and fields; one that would use itself, directly
    /// or through others, is refused. `kept_current`: the audience's members
    /// are kept as a rule tag of its name, defined (or redefined, or
    /// dropped when no longer asked for) in the same write, so that the
    /// change feed carries them.
    PutAudience {
        name: String,
        definition: crate::storage::record::AudienceDef,
        replace: bool,
        kept_current: bool,
    },
    /// Drops a saved audience (refused while another one uses it), with the
    /// rule tag that kept it current if there is one.
    DropAudience {
        name: String,
    },
    /// Freezes an audience's members (read by the caller from the state at
    /// lsn `taken_lsn`) as a new audience snapshot; `same_as`, when not 0,
    /// is an earlier snapshot with exactly these members (checked by the
    /// caller), whose bitmap the new one shares.
    TakeSnapshot {
        audience: String,
        query: String,
        taken_lsn: u64,
        note: String,
        members: roaring::RoaringBitmap,
        same_as: u32,
    },
    /// Drops an audience snapshot.
    DropSnapshot {
        id: u32,
    },
    /// Defines a rule (checked by the rules layer): a rule tag, created with
    /// `description` and `category`, or a lifecycle, an enumerated field
    /// whose values are its stages. `replace` allows redefining one that
    /// exists (a rule tag stays a rule tag, a lifecycle a lifecycle); its
    /// members are evaluated again for everyone, in the same write.
    DefineRule {
        name: String,
        definition: crate::rules::Definition,
        description: String,
        category: String,
        replace: bool,
    },
    /// Drops a rule and its tag or field (refused while another rule reads
    /// it).
    DropRule {
        name: String,
    },
    /// Turns every rule whose local day (in its zone) has changed by the
    /// writer's clock to that day, evaluating again the customers the new
    /// day can change. Nothing to turn changes nothing.
    TurnRuleDays,
    /// Records the member counts of local day `day` in the history, and
    /// drops the points before `keep_from`. A day before the newest one
    /// recorded is refused.
    RecordHistory {
        day: i32,
        keep_from: i32,
        counts: Vec<(String, u64)>,
    },
    /// Ingested records, applied together or not at all: the value writes
    /// of every record whose event was not ingested before. Records whose
    /// event id the store remembers (or that repeat one earlier in the
    /// request) are skipped and reported ([`WriteResult::duplicates`]); the
    /// others' ids are remembered with their writes, atomically.
    /// Shared, so that the caller can keep the records (to find the one at
    /// fault when the write is refused) without a copy; the writer only
    /// reads them.
    Ingest {
        records: std::sync::Arc<Vec<IngestRecord>>,
    },
    /// Records consumed from a source's topics: applied as
    /// [`WriteOp::Ingest`] applies them, with the source's new positions
    /// logged in the same record, so that the source resumes exactly after
    /// the last record applied, and the records consumed and not applied
    /// (`rejects`, the source's) logged with them, so that the store's
    /// report of them outlives a restart and holds each once. No records:
    /// only the positions move (past records that were rejected or
    /// ignored). Refused with `SourceNotFound` when the source is gone; a
    /// reject of another source or with a reason longer than
    /// [`MAX_REJECT_REASON`](crate::storage::record::MAX_REJECT_REASON) is
    /// invalid.
    Consume {
        records: Vec<IngestRecord>,
        positions: crate::storage::record::SourcePositions,
        rejects: Vec<crate::storage::record::SourceReject>,
    },
    /// Pauses a source (`paused`) or resumes it: the server consumes a
    /// paused source's topics no more until it is resumed. A source already
    /// so changes nothing (not logged). Refused with `SourceNotFound`.
    PauseSource {
        name: String,
        paused: bool,
    },
    /// Facts rebuilt from the event archive as it was at lsn `as_of` (a
    /// checkpoint's): each of `customers` loses whatever it had in the
    /// `erase` fields, then gets `writes`, atomically. A customer with
    /// events ingested after `as_of` is left as it is and reported
    /// ([`WriteResult::busy`]): its new events are not in what was read.
    RebuildFacts {
        as_of: u64,
        customers: Vec<String>,
        erase: Vec<String>,
        writes: Vec<ValueWrite>,
    },
    /// Undoes a merge, or takes an identity off a customer (OneID), with
    /// facts rebuilt from the event archive as it was at lsn `as_of` (a
    /// checkpoint's). The customer the merge absorbed is live again (or a
    /// new customer is made of the identity), named by `identities` (those
    /// of the survivor's that its events show to be its); for a merge, with
    /// the tags and values the merge kept for it, and the survivor loses
    /// the tags, values and behaviour days it got only from the merge (ones
    /// written again since stay). Then both lose whatever they had in the `erase` fields (the
    /// facts) and get `writes`, which name them by [`UNMERGE_REVIVED`] and
    /// [`UNMERGE_SURVIVOR`]. If the survivor received events after
    /// `as_of`, nothing is written and it is reported busy
    /// ([`WriteResult::busy`]): its new events are not in what was read.
    Unmerge {
        of: UnmergeOf,
        as_of: u64,
        identities: Vec<String>,
        erase: Vec<String>,
        writes: Vec<ValueWrite>,
    },
}

/// What a [`WriteOp::Unmerge`] undoes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnmergeOf {
    /// A merge, by its number in the merge log.
    Merge(u64),
    /// An identity (`type:value`) of live customer `customer`, taken off
    /// it: a new customer is made of it, with the events that are its.
    Identity { identity: String, customer: u32 },
}

/// The customer key by which an [`WriteOp::Unmerge`]'s writes name the
/// customer it brings back (no key a client sends holds a NUL byte).
pub const UNMERGE_REVIVED: &str = "\0revived";
/// The key by which an [`WriteOp::Unmerge`]'s writes name the survivor.
pub const UNMERGE_SURVIVOR: &str = "\0survivor";

/// One ingested record: its event's de-duplication id (`None`: the source
/// gives none, and the record is applied each time it is sent) and the
/// writes its facts make.
#[derive(Debug, Clone)]
pub struct IngestRecord {
    pub seen: Option<u128>,
    /// The identities the record names (`type:value` keys), in the order
    /// that decides which one names a new customer. The record's customer
    /// is the live one they name; a new one (named by the first) when they
    /// name none. Identities not yet linked to anyone are linked to it.
    /// Empty: the writes and the event name their customer themselves.
    pub identities: Vec<String>,
    /// Where the record's identities were seen (its channel) and when (its
    /// event time, Unix ms): kept with each identity the record links first.
    pub place: String,
    pub at_ms: i64,
    /// The writes its facts make; with identities, the writer aims them at
    /// the record's customer whatever key they name.
    pub writes: Vec<ValueWrite>,
    /// For an order: the de-duplication id its refund has (`seen` of the
    /// refund). When that refund was ingested before (and is still
    /// remembered) or comes in the same request, the order's
    /// `unless_refunded` writes are left out; otherwise they are written
    /// with `writes`.
    pub refund: Option<u128>,
    /// What only the order's being there gives (behaviours, days), which
    /// no fact of its refund takes back.
    pub unless_refunded: Vec<ValueWrite>,
    /// For a refund: the de-duplication id its order has (`seen` of the
    /// order). When that order was ingested in an earlier request (still
    /// remembered, or not in this request and no longer remembered while
    /// the customer was there before it), the customer's facts are due a
    /// rebuild
    /// ([`Batch::rebuild_due`](crate::storage::record::Batch)): the refund
    /// subtracts the sums at once, the rebuild takes back the rest.
    pub order: Option<u128>,
    /// The event itself, kept in the event archive under its customer
    /// (created if new); `None`: not kept.
    pub event: Option<KeptEvent>,
}

impl IngestRecord {
    /// Bytes the record holds in memory, about: itself and what its
    /// strings and lists hold (several times the bytes of the line it was
    /// read from: the server holds this much of its request memory for it).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + (self.identities.iter())
                .map(|k| std::mem::size_of::<String>() + k.capacity())
                .sum::<usize>()
            + self.place.capacity()
            + (self.writes.iter().chain(&self.unless_refunded))
                .map(ValueWrite::memory_bytes)
                .sum::<usize>()
            + self.event.as_ref().map_or(0, |e| {
                std::mem::size_of::<KeptEvent>() + e.customer.capacity() + e.bytes.capacity()
            })
    }

    /// [`WriteOp::check_keys`] of one record.
    fn check_keys(&self) -> std::result::Result<(), crate::names::NameError> {
        self.identities.iter().try_for_each(|k| check_key(k))?;
        self.writes.iter().try_for_each(ValueWrite::check_key)?;
        self.event.iter().try_for_each(|e| check_key(&e.customer))
    }
}

/// An ingested event to keep: its customer's key and its bytes (the
/// ingestion room's encoding; at most
/// [`MAX_EVENT_BYTES`](crate::storage::archive::MAX_EVENT_BYTES)).
#[derive(Debug, Clone)]
pub struct KeptEvent {
    pub customer: String,
    pub bytes: Vec<u8>,
}

/// Most saved audiences a store keeps (the manifest holds them whole).
pub const MAX_AUDIENCES: usize = 2_048;
/// Longest saved audience's query, in bytes (with [`MAX_AUDIENCES`], the
/// manifest holds at most 32 MiB of them).
pub const MAX_AUDIENCE_QUERY_BYTES: usize = 16 * 1024;
/// Most audience snapshots a store keeps (the manifest lists them whole;
/// their members are in segments).
pub const MAX_SNAPSHOTS: usize = 10_000;
/// Longest owner of a saved audience, in bytes.
pub const MAX_OWNER_BYTES: usize = 200;

/// Longest source definition the store keeps, in bytes.
pub const MAX_SOURCE_DEFINITION_BYTES: usize = 64 * 1024;
/// Most sources a store keeps: with the longest definitions and Kafka
/// statuses, `ListSources` answers in about 55 MiB, within the default
/// message limit (a test in `server::ingest` builds that answer).
pub const MAX_SOURCES: usize = 256;

impl WriteOp {
    /// Customer keys the write names (not counting ids).
    pub fn key_count(&self) -> usize {
        match self {
            WriteOp::Update { mutations, .. } => {
                mutations.iter().map(|m| m.add.len() + m.remove.len()).sum()
            }
            WriteOp::Replace { customers, .. }
            | WriteOp::DeleteCustomers { customers }
            | WriteOp::CreateCustomers { customers } => customers.len(),
            WriteOp::SetValues { writes } => writes.len(),
            WriteOp::Ingest { records } => records.iter().map(|r| r.writes.len()).sum(),
            WriteOp::Consume { records, .. } => records.iter().map(|r| r.writes.len()).sum(),
            WriteOp::RebuildFacts { customers, .. } => customers.len(),
            WriteOp::Unmerge { identities, .. } => identities.len(),
            WriteOp::PutSource { .. }
            | WriteOp::PauseSource { .. }
            | WriteOp::DropSource { .. }
            | WriteOp::PutAudience { .. }
            | WriteOp::DropAudience { .. }
            | WriteOp::TakeSnapshot { .. }
            | WriteOp::DropSnapshot { .. }
            | WriteOp::RecordHistory { .. }
            | WriteOp::DefineRule { .. }
            | WriteOp::DropRule { .. }
            | WriteOp::TurnRuleDays => 0,
            WriteOp::CreateTag { .. }
            | WriteOp::DropTag { .. }
            | WriteOp::CreateField { .. }
            | WriteOp::DropField { .. } => 0,
        }
    }

    /// Checks every customer key the write names by [`check_key`]: the one
    /// check of a key on its way in, made by [`Engine::write`](crate::storage::Engine::write)
    /// on the caller's thread before the write is queued. The writer trusts
    /// it. Keys already resolved to ids were found in the dictionary, so
    /// they passed it when their customer was created.
    pub fn check_keys(&self) -> Result<()> {
        let all = |keys: &[String]| keys.iter().try_for_each(|k| check_key(k));
        match self {
            WriteOp::Update { mutations, .. } => mutations
                .iter()
                .try_for_each(|m| all(&m.add).and_then(|_| all(&m.remove))),
            WriteOp::Replace { customers, .. }
            | WriteOp::DeleteCustomers { customers }
            | WriteOp::CreateCustomers { customers } => all(customers),
            WriteOp::SetValues { writes } => writes.iter().try_for_each(ValueWrite::check_key),
            WriteOp::RebuildFacts {
                customers, writes, ..
            } => all(customers).and_then(|_| writes.iter().try_for_each(ValueWrite::check_key)),
            WriteOp::Ingest { records } => records.iter().try_for_each(IngestRecord::check_keys),
            WriteOp::Consume { records, .. } => {
                records.iter().try_for_each(IngestRecord::check_keys)
            }
            // Identities are checked keys (the survivor's); the writes name
            // the two customers by the writer's own handles.
            WriteOp::Unmerge { identities, .. } => all(identities),
            WriteOp::CreateTag { .. }
            | WriteOp::DropTag { .. }
            | WriteOp::CreateField { .. }
            | WriteOp::DropField { .. }
            | WriteOp::PutSource { .. }
            | WriteOp::PauseSource { .. }
            | WriteOp::DropSource { .. }
            | WriteOp::PutAudience { .. }
            | WriteOp::DropAudience { .. }
            | WriteOp::TakeSnapshot { .. }
            | WriteOp::DropSnapshot { .. }
            | WriteOp::RecordHistory { .. }
            | WriteOp::DefineRule { .. }
            | WriteOp::DropRule { .. }
            | WriteOp::TurnRuleDays => Ok(()),
        }
        .map_err(Into::into)
    }
}

/// When a behaviour happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTime {
    /// An instant, Unix milliseconds; its local day comes from the field's time zone.
    Ms(i64),
    /// A local day number (days since 1970-01-01).
    Day(i32),
}

/// One value written by [`WriteOp::SetValues`].
#[derive(Debug, Clone)]
pub enum ValueWrite {
    /// Sets (or with `None`, clears) a customer's value of an integer field.
    Int {
        field: String,
        customer: String,
        value: Option<i64>,
    },
    /// Sets (or with `None`, clears) a customer's value of an enumerated
    /// field; setting one value leaves any other.
    Enum {
        field: String,
        customer: String,
        value: Option<String>,
    },
    /// Records a behaviour of a customer at a time.
    Event {
        field: String,
        customer: String,
        at: EventTime,
    },
    /// Combines a number with a customer's value of an integer field, on the
    /// writer: against the newest value, so that no client has to read,
    /// modify and write (and two such writes never lose one another).
    Combine {
        field: String,
        customer: String,
        with: Combine,
    },
}

impl ValueWrite {
    /// The customer the write names.
    pub fn customer(&self) -> &str {
        match self {
            ValueWrite::Int { customer, .. }
            | ValueWrite::Enum { customer, .. }
            | ValueWrite::Event { customer, .. }
            | ValueWrite::Combine { customer, .. } => customer,
        }
    }

    /// Aims the write at another customer key.
    pub fn set_customer(&mut self, key: &str) {
        match self {
            ValueWrite::Int { customer, .. }
            | ValueWrite::Enum { customer, .. }
            | ValueWrite::Event { customer, .. }
            | ValueWrite::Combine { customer, .. } => {
                customer.clear();
                customer.push_str(key);
            }
        }
    }

    fn check_key(&self) -> std::result::Result<(), crate::names::NameError> {
        check_key(self.customer())
    }

    /// Bytes the write holds in memory, about (see
    /// [`IngestRecord::memory_bytes`]).
    fn memory_bytes(&self) -> usize {
        let strings = match self {
            ValueWrite::Int {
                field, customer, ..
            }
            | ValueWrite::Event {
                field, customer, ..
            }
            | ValueWrite::Combine {
                field, customer, ..
            } => field.capacity() + customer.capacity(),
            ValueWrite::Enum {
                field,
                customer,
                value,
            } => {
                field.capacity() + customer.capacity() + value.as_ref().map_or(0, String::capacity)
            }
        };
        std::mem::size_of::<Self>() + strings
    }
}

/// How a [`ValueWrite::Combine`] changes an integer value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Adds the number (negative to subtract); a customer without a value
    /// starts from 0.
    Add(i64),
    /// The larger of the value and the number (the number, without a value).
    Max(i64),
    /// The smaller of the value and the number (the number, without a value).
    Min(i64),
}

impl Combine {
    /// The value after combining with `current`; `None` when a sum leaves
    /// the 64-bit range.
    pub fn apply(self, current: Option<i64>) -> Option<i64> {
        match (self, current) {
            (Combine::Add(d), c) => c.unwrap_or(0).checked_add(d),
            (Combine::Max(v), Some(c)) => Some(c.max(v)),
            (Combine::Min(v), Some(c)) => Some(c.min(v)),
            (Combine::Max(v) | Combine::Min(v), None) => Some(v),
        }
    }

    /// The word clients use for it (`add`, `max`, `min`).
    pub fn word(self) -> &'static str {
        match self {
            Combine::Add(_) => "add",
            Combine::Max(_) => "max",
            Combine::Min(_) => "min",
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, Default)]
pub struct WriteResult {
    /// The lsn the write was logged at (or the current one, when nothing changed).
    pub lsn: u64,
    pub added: u64,
    pub removed: u64,
    pub new_customers: u64,
    pub deleted: u64,
    /// Members of the tag after a replace, or when it was dropped.
    pub member_count: u64,
    /// The tag after a create.
    pub tag: Option<TagMeta>,
    /// False when a create found the tag or field already there.
    pub created: bool,
    /// The field after a field create.
    pub field: Option<FieldMeta>,
    pub values_set: u64,
    pub values_cleared: u64,
    /// Behaviour buckets newly gained (an event on a day the customer
    /// already has counts once).
    pub events_added: u64,
    /// Events older than their field's retention, not stored.
    pub events_expired: u64,
    /// Customer ids, one per key ([`WriteOp::CreateCustomers`]).
    pub ids: Vec<u32>,
    /// Records of a [`WriteOp::Ingest`] skipped as already ingested, by
    /// index.
    pub duplicates: Vec<u32>,
    /// Event ids remembered by a [`WriteOp::Ingest`].
    pub events_seen: u64,
    /// Customers a [`WriteOp::RebuildFacts`] left as they were, because
    /// events of theirs were ingested after the archive it was given.
    pub busy: Vec<String>,
    /// Identities a [`WriteOp::Ingest`] linked to customers.
    pub identities_linked: u64,
    /// Customers a [`WriteOp::Ingest`] merged: records named identities
    /// of both.
    pub merges: Vec<crate::storage::record::LoggedMerge>,
    /// Identities of a [`WriteOp::Ingest`]'s records the guard rails kept
    /// from linking or merging, with why.
    pub refusals: Vec<super::identify::LinkRefusal>,
}
