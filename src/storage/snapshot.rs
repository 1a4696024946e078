//! Immutable snapshots: what a reader sees. A snapshot is one consistent
//! state (every write up to `lsn`, none after); the writer builds the next one
//! and publishes it, readers never wait for writers. Tag bitmaps that are
//! still on disk are decoded from the segment map on first use.

use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use roaring::RoaringBitmap;

use crate::bitmap::ShardedBitmap;
use crate::error::Result;
use crate::fields::{FieldKind, INT_EXISTS, MergeRule, bsi, int_slot};
use crate::storage::dictionary::identities::Found;
use crate::storage::dictionary::{Dictionary, Identities};
use crate::storage::merges::MergeLog;
use crate::storage::segment::{BlobKind, Segment};

/// A bitmap that is either in memory or still in a segment file.
#[derive(Clone)]
pub struct LazyBitmap {
    inner: Arc<LazyInner>,
}

struct LazyInner {
    cell: OnceLock<ShardedBitmap>,
    /// Segment, blob kind, owner, and slot (for field slots; else 0).
    source: Option<(Arc<Segment>, BlobKind, u32, u32)>,
}

impl LazyBitmap {
    /// True when both are the same bitmap (one copy shared).
    pub fn same(&self, other: &LazyBitmap) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn loaded(bitmap: ShardedBitmap) -> Self {
        Self {
            inner: Arc::new(LazyInner {
                cell: OnceLock::from(bitmap),
                source: None,
            }),
        }
    }

    pub fn empty() -> Self {
        Self::loaded(ShardedBitmap::new())
    }

    pub fn on_disk(segment: Arc<Segment>, kind: BlobKind, owner: u32) -> Self {
        Self::on_disk_slot(segment, kind, owner, 0)
    }

    /// One slot of a field, still in its segment.
    pub fn on_disk_slot(segment: Arc<Segment>, kind: BlobKind, owner: u32, slot: u32) -> Self {
        Self {
            inner: Arc::new(LazyInner {
                cell: OnceLock::new(),
                source: Some((segment, kind, owner, slot)),
            }),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.inner.cell.get().is_some()
    }

    /// The segment the bitmap comes from, if it has not been changed in memory.
    pub fn segment(&self) -> Option<&Arc<Segment>> {
        self.inner.source.as_ref().map(|(s, _, _, _)| s)
    }

    /// The bitmap, decoding it from its segment the first time. A damaged
    /// blob is an error every time it is asked for, never an empty set.
    pub fn get(&self) -> Result<&ShardedBitmap> {
        if let Some(b) = self.inner.cell.get() {
            return Ok(b);
        }
        let b = match &self.inner.source {
            Some((seg, kind, owner, slot)) => seg.load_bitmap(*kind, *owner, *slot)?,
            None => ShardedBitmap::new(),
        };
        Ok(self.inner.cell.get_or_init(|| b))
    }

    /// A mutable bitmap for the writer: copies the shard table (not the
    /// shards) unless nobody else holds this one.
    pub fn make_mut(&mut self) -> Result<&mut ShardedBitmap> {
        let unique_and_loaded = Arc::get_mut(&mut self.inner)
            .is_some_and(|i| i.cell.get().is_some() && i.source.is_none());
        if !unique_and_loaded {
            let copy = self.get()?.clone();
            *self = Self::loaded(copy);
        }
        let inner = Arc::get_mut(&mut self.inner).expect("just made unique");
        Ok(inner.cell.get_mut().expect("just loaded"))
    }
}

/// A tag's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TagMeta {
    pub name: Arc<str>,
    pub description: String,
    pub category: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub count: u64,
}

/// A tag: stable id, metadata, members.
#[derive(Clone)]
pub struct Tag {
    pub id: u32,
    pub meta: TagMeta,
    pub bitmap: LazyBitmap,
}

/// A field's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldMeta {
    pub name: Arc<str>,
    pub description: String,
    pub category: String,
    pub kind: FieldKind,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// How its values combine when customers merge.
    pub merge: MergeRule,
}

/// An integer field's bitmaps, ready to read values ([`Field::int_values`]).
pub struct IntValues<'f> {
    exists: Option<&'f ShardedBitmap>,
    bits: Vec<Option<&'f ShardedBitmap>>,
}

impl IntValues<'_> {
    /// The customer's value, if it has one.
    pub fn get(&self, id: u32) -> Option<i64> {
        if !self.exists.is_some_and(|e| e.contains(id)) {
            return None;
        }
        let mut u = 0u64;
        for (k, b) in self.bits.iter().enumerate() {
            if b.is_some_and(|b| b.contains(id)) {
                u |= 1 << k;
            }
        }
        Some(bsi::decode(u))
    }

    /// The values of many customers, `ids` in ascending order: the same as
    /// [`IntValues::get`] of each, read a bit slice at a time, so that
    /// neighbouring ids share the slices' cache lines instead of every id
    /// visiting every slice.
    pub fn get_sorted(&self, ids: &[u32]) -> Vec<Option<i64>> {
        let Some(exists) = self.exists else {
            return vec![None; ids.len()];
        };
        let has: Vec<bool> = ids.iter().map(|&id| exists.contains(id)).collect();
        let mut raw = vec![0u64; ids.len()];
        for (k, b) in self.bits.iter().enumerate() {
            let Some(b) = b else { continue };
            for ((u, &id), &h) in raw.iter_mut().zip(ids).zip(&has) {
                if h && b.contains(id) {
                    *u |= 1 << k;
                }
            }
        }
        raw.iter()
            .zip(&has)
            .map(|(&u, &h)| h.then(|| bsi::decode(u)))
            .collect()
    }
}

/// A source of ingestion as the store keeps it: its name and definition
/// (TOML, checked by the ingestion layer before it is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMeta {
    pub name: Arc<str>,
    pub definition: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Paused: the server does not consume its topics until it is resumed
    /// (kept across redefinitions and restarts).
    pub paused: bool,
}

/// Sources by name.
pub type SourceMap = imbl::OrdMap<Arc<str>, Arc<SourceMeta>>;

/// Where a source that consumes topics is: `(topic, partition)` to the
/// offset of the next record to consume.
pub type Positions = std::collections::BTreeMap<(String, i32), i64>;

/// Consumed positions by source name (sources that never consumed a topic
/// have none).
pub type PositionMap = imbl::OrdMap<Arc<str>, Arc<Positions>>;

/// Records a source consumed and did not apply that the store keeps: the
/// newest of them, at most this many per source.
pub const KEPT_REJECTS: usize = 100;

/// A record a source consumed and did not apply (or records it skipped),
/// as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptReject {
    /// Records skipped because the brokers did not hold the position.
    pub skipped: bool,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// When it was logged (the batch's time, Unix ms).
    pub at_ms: i64,
    pub reason: String,
}

/// The newest rejects by source name, oldest first (at most
/// [`KEPT_REJECTS`] each; sources without any have none).
pub type RejectMap = imbl::OrdMap<Arc<str>, Arc<std::collections::VecDeque<KeptReject>>>;

/// A saved audience as the store keeps it: a named query, with what people
/// know it by. The store keeps the query's text; the query layer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceMeta {
    pub name: Arc<str>,
    pub query: String,
    pub description: String,
    pub owner: String,
    pub category: String,
    /// The saved audiences the query names.
    pub uses: Vec<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A rule: a tag whose members are a query's, or an enumerated field
/// (a lifecycle) whose value is the first stage a customer matches; kept
/// current by the one apply function.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule tag's or lifecycle field's name.
    pub name: Arc<str>,
    pub def: crate::storage::record::RuleDef,
    /// The local day (in its zone) its `TODAY` and windows are evaluated at.
    pub day: i32,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Why it could not be evaluated the last time (its members then stay
    /// as they were); empty while it is current.
    pub stale: String,
}

/// The rules, and the order they are evaluated in (a rule after every
/// rule it reads).
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub by_name: std::collections::BTreeMap<Arc<str>, Arc<Rule>>,
    pub order: Vec<Arc<str>>,
}

impl RuleSet {
    pub fn get(&self, name: &str) -> Option<&Arc<Rule>> {
        self.by_name.get(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The rules that read `name` (a tag, field or saved audience).
    pub fn readers_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Arc<Rule>> + 'a {
        self.by_name.values().filter(move |r| {
            r.def.reads.iter().any(|x| x == name) || r.def.audiences.iter().any(|x| x == name)
        })
    }
}

/// Saved audiences by name.
pub type AudienceMap = imbl::OrdMap<Arc<str>, Arc<AudienceMeta>>;

/// An audience's members frozen at a moment (an audience snapshot): what
/// it was, from which state, and who. Two snapshots of an unchanged
/// audience share one bitmap (`blob`: the snapshot whose members these
/// first were, which names them on disk).
#[derive(Clone)]
pub struct AudienceSnapshot {
    pub id: u32,
    pub audience: String,
    pub query: String,
    /// The lsn of the state its members were read from.
    pub taken_lsn: u64,
    pub at_ms: i64,
    pub note: String,
    /// Members when it was taken.
    pub count: u64,
    pub members: LazyBitmap,
    pub blob: u32,
}

/// Audience snapshots by id.
pub type SnapshotMap = imbl::OrdMap<u32, Arc<AudienceSnapshot>>;

/// A field (integer, enumerated or behaviour column): stable id, metadata,
/// and its non-empty bitmaps by slot (see [`crate::fields`] for what a slot
/// means for each kind).
#[derive(Clone)]
pub struct Field {
    pub id: u32,
    pub meta: FieldMeta,
    pub slots: SlotMap,
}

impl Field {
    /// The bitmap of a slot, if it has members.
    pub fn slot(&self, slot: u32) -> Result<Option<&ShardedBitmap>> {
        match self.slots.get(&slot) {
            Some(b) => Ok(Some(b.get()?).filter(|b| !b.is_empty())),
            None => Ok(None),
        }
    }

    /// The value of an integer field for one customer.
    pub fn int_value(&self, id: u32) -> Result<Option<i64>> {
        if !self.slot(INT_EXISTS)?.is_some_and(|e| e.contains(id)) {
            return Ok(None);
        }
        Ok(self.int_values()?.get(id))
    }

    /// An integer field's slots, looked up once, for reading many
    /// customers' values (a slot look-up costs more than a bit test).
    pub fn int_values(&self) -> Result<IntValues<'_>> {
        let mut bits = Vec::with_capacity(bsi::BITS);
        for k in 0..bsi::BITS {
            bits.push(self.slot(int_slot(k))?);
        }
        Ok(IntValues {
            exists: self.slot(INT_EXISTS)?,
            bits,
        })
    }

    /// The index of an enumerated field's value for one customer.
    pub fn enum_value(&self, id: u32) -> Result<Option<u32>> {
        for (&slot, b) in &self.slots {
            if b.get()?.contains(id) {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }
}

/// A field's slot bitmaps by slot number: persistent, so that a write to one
/// day of a behaviour field does not copy the other days' entries.
pub type SlotMap = imbl::OrdMap<u32, LazyBitmap>;

/// Tags by name: a persistent map, so that cloning it to publish a snapshot
/// costs the same for 20 tags as for 20,000, and changing one tag copies
/// only the path to it, not the map.
pub type TagMap = imbl::OrdMap<Arc<str>, Arc<Tag>>;
/// Fields by name, persistent for the same reason as [`TagMap`].
pub type FieldMap = imbl::OrdMap<Arc<str>, Arc<Field>>;

/// One consistent state of the store. Cloning one is cheap whatever the
/// number of tags: the writer clones its working copy for every publish.
#[derive(Clone)]
pub struct Snapshot {
    /// Every write with an lsn up to this one is visible, none after.
    pub lsn: u64,
    /// Tags by name.
    pub tags: TagMap,
    /// Fields by name (tags and fields share one namespace).
    pub fields: FieldMap,
    /// Every live customer (the query language's `ALL`).
    pub live: LazyBitmap,
    pub next_customer_id: u32,
    pub next_tag_id: u32,
    /// Shared with the writer; look-ups are checked against `live`.
    pub dict: Arc<Dictionary>,
    /// Identities beside the customers' keys, shared with the writer like
    /// the dictionary (see [`Snapshot::customer_id`]).
    pub idents: Arc<Identities>,
    /// Sources of ingestion by name.
    pub sources: SourceMap,
    /// Where each Kafka source has consumed to, logged with the records.
    pub positions: PositionMap,
    /// The records each source consumed and did not apply, newest kept.
    pub rejects: RejectMap,
    /// Customers whose facts are due a rebuild from their kept events (a
    /// refund came in a later request than its order); the server's
    /// rebuilder takes them, and any rebuild of a customer's facts clears
    /// them.
    pub rebuild_due: Arc<RoaringBitmap>,
    /// Saved audiences: named queries (they share the name space of tags
    /// and fields).
    pub audiences: AudienceMap,
    /// Audience snapshots, and the id the next one gets.
    pub snapshots: SnapshotMap,
    pub next_snapshot_id: u32,
    /// Member counts of tags and saved audiences, a point a day.
    pub history: Arc<crate::storage::history::History>,
    /// The event archive as of the last checkpoint.
    pub archive: Arc<ArchiveList>,
    /// The merge log, shared with the writer like the dictionary (it only
    /// grows, but for erased customers' identities, which it forgets).
    pub merges: Arc<RwLock<MergeLog>>,
    /// The time zone whose local day a query's `TODAY` is (the engine's
    /// setting; not kept in the store).
    pub zone: jiff::tz::TimeZone,
    /// Rule tags and lifecycles.
    pub rules: Arc<RuleSet>,
    /// The lsn of the newest write that erased customers (0: none since
    /// the store opened); reads of the past kept in memory are built again
    /// after it (they leave out who was erased).
    pub erased_lsn: u64,
}

/// Turns dictionary answers `ids` for `keys` into the live customers the
/// keys name: an identity's entry wins over the dictionary, unless it names
/// a deleted customer (see [`Snapshot::customer_id`]).
pub(crate) fn resolve_identities(
    idents: &Identities,
    live: crate::bitmap::Members<'_>,
    keys: &[&str],
    ids: &mut [Option<u32>],
) -> Result<()> {
    if !idents.is_empty() {
        for (id, found) in ids.iter_mut().zip(idents.lookup_many(keys)?) {
            match found {
                Found::Customer(c) if live.contains(c) => *id = Some(c),
                Found::Unlinked => *id = None,
                _ => {}
            }
        }
    }
    for id in ids.iter_mut() {
        if id.is_some_and(|id| !live.contains(id)) {
            *id = None;
        }
    }
    Ok(())
}

/// The event archive's files as the last checkpoint left them.
#[derive(Debug, Clone, Default)]
pub struct ArchiveList {
    /// The events of every log record up to this lsn are in `files`, but
    /// for those past retention and those of customers deleted before
    /// their checkpoint.
    pub upto_lsn: u64,
    pub files: Vec<crate::storage::manifest::ManifestArchive>,
    /// Events ingested at or before this time (Unix ms) were dropped by
    /// retention; 0 when none were.
    pub dropped_to_ms: i64,
    /// Customers (by the id their events are kept under) some of whose
    /// events retention dropped.
    pub partial: Arc<RoaringBitmap>,
    /// Events were dropped without a record of whose: every customer
    /// counts as partial.
    pub partial_unknown: bool,
}

impl ArchiveList {
    pub fn of(m: &crate::storage::manifest::Manifest) -> ArchiveList {
        ArchiveList {
            upto_lsn: m.checkpoint_lsn,
            files: m.archives.clone(),
            dropped_to_ms: m.archive_dropped_to_ms,
            partial: Arc::new(m.archive_partial.clone()),
            partial_unknown: m.archive_partial_unknown,
        }
    }

    /// Of `ids` (customers as their events are kept), the first whose kept
    /// events are not all its events: some were dropped by retention.
    pub fn first_partial(&self, ids: impl IntoIterator<Item = u32>) -> Option<u32> {
        let mut ids = ids.into_iter();
        if self.partial_unknown {
            return ids.next();
        }
        ids.find(|id| self.partial.contains(*id))
    }
}

impl Snapshot {
    /// A snapshot held only in memory, not backed by any file: for measuring
    /// query evaluation on given bitmaps (benchmarks, the harness's
    /// in-process ceiling). Tags get ids in the order given.
    pub fn in_memory(tags: Vec<(String, ShardedBitmap)>, live: ShardedBitmap) -> Snapshot {
        let next_customer_id = live.max().map_or(0, |id| id + 1);
        let mut map = TagMap::new();
        for (i, (name, bitmap)) in tags.into_iter().enumerate() {
            let name: Arc<str> = Arc::from(name.as_str());
            let meta = TagMeta {
                name: name.clone(),
                description: String::new(),
                category: String::new(),
                created_ms: 0,
                updated_ms: 0,
                count: bitmap.len(),
            };
            map.insert(
                name,
                Arc::new(Tag {
                    id: i as u32,
                    meta,
                    bitmap: LazyBitmap::loaded(bitmap),
                }),
            );
        }
        let next_tag_id = map.len() as u32;
        Snapshot {
            lsn: 0,
            tags: map,
            fields: FieldMap::new(),
            live: LazyBitmap::loaded(live),
            next_customer_id,
            next_tag_id,
            dict: Arc::new(Dictionary::new(Vec::new(), next_customer_id)),
            idents: Arc::new(Identities::new(Vec::new())),
            sources: SourceMap::new(),
            positions: PositionMap::new(),
            rejects: RejectMap::new(),
            rebuild_due: Arc::default(),
            audiences: AudienceMap::new(),
            snapshots: SnapshotMap::new(),
            next_snapshot_id: 1,
            history: Arc::default(),
            archive: Arc::default(),
            merges: Arc::default(),
            zone: crate::fields::time::default_zone(),
            rules: Arc::default(),
            erased_lsn: 0,
        }
    }

    pub fn tag(&self, name: &str) -> Option<&Arc<Tag>> {
        self.tags.get(name)
    }

    pub fn field(&self, name: &str) -> Option<&Arc<Field>> {
        self.fields.get(name)
    }

    pub fn live(&self) -> Result<&ShardedBitmap> {
        self.live.get()
    }

    /// The live customer `key` names: the customer an identity's newest
    /// entry names, if alive; otherwise the customer created with that key,
    /// if alive. An identity taken away from its customer names no one.
    pub fn customer_id(&self, key: &str) -> Result<Option<u32>> {
        let live = self.live()?.members();
        match self.idents.lookup(key)? {
            Found::Customer(id) if live.contains(id) => return Ok(Some(id)),
            Found::Unlinked => return Ok(None),
            _ => {}
        }
        let Some(id) = self.dict.lookup(key)? else {
            return Ok(None);
        };
        Ok(live.contains(id).then_some(id))
    }

    /// The ids of many live customers at once (`None` for keys no live
    /// customer has), with the dictionary look-ups overlapped.
    pub fn customer_ids(&self, keys: &[&str]) -> Result<Vec<Option<u32>>> {
        let live = self.live()?.members();
        let mut ids = self.dict.lookup_many(keys)?;
        resolve_identities(&self.idents, live, keys, &mut ids)?;
        Ok(ids)
    }

    /// Appends to `out` how member pages and exports name the customers
    /// `ids`: their keys, or with `identity_type`, their identity of that
    /// type (`type:value`, the earliest seen). Customers without one are
    /// left out; returns how many.
    pub fn names_of(
        &self,
        ids: &[u32],
        identity_type: Option<&str>,
        out: &mut Vec<String>,
    ) -> Result<u64> {
        let Some(kind) = identity_type else {
            self.dict.keys_of(ids, out)?;
            return Ok(0);
        };
        let mut without = 0;
        for &id in ids {
            match self.idents.of_type(id, kind)? {
                Some(identity) => out.push(identity),
                None => without += 1,
            }
        }
        Ok(without)
    }

    /// The number of live customers.
    /// Bytes of the tag bitmaps decoded in memory now (their portable
    /// size; tags not read since the start take none).
    pub fn decoded_tag_bytes(&self) -> u64 {
        self.tags
            .values()
            .filter(|t| t.bitmap.is_loaded())
            .filter_map(|t| t.bitmap.get().ok())
            .map(|b| b.serialized_size() as u64)
            .sum()
    }

    pub fn customer_count(&self) -> Result<u64> {
        Ok(self.live()?.len())
    }

    /// Names of the tags `id` carries, ordered by name.
    pub fn tags_of(&self, id: u32) -> Result<Vec<Arc<str>>> {
        let mut out = Vec::new();
        for (name, tag) in &self.tags {
            if tag.meta.count > 0 && tag.bitmap.get()?.contains(id) {
                out.push(name.clone());
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading many values a slice at a time gives what reading each does:
    /// customers with and without values, negative ones, ids across shards.
    #[test]
    fn values_read_together_are_the_values_read_alone() {
        let values: Vec<(u32, i64)> = (0..3_000u32)
            .filter(|id| id % 7 != 3)
            .map(|id| {
                let id = id * 977 % 3_000_000;
                let v = i64::from(id % 1_000) * if id % 5 == 0 { -13 } else { 4_099 };
                (id, v)
            })
            .collect();
        let mut slots: SlotMap = SlotMap::new();
        let mut exists = ShardedBitmap::new();
        let mut bits = vec![ShardedBitmap::new(); bsi::BITS];
        for &(id, v) in &values {
            exists.insert(id);
            let u = bsi::encode(v);
            for (k, b) in bits.iter_mut().enumerate() {
                if u >> k & 1 == 1 {
                    b.insert(id);
                }
            }
        }
        slots.insert(INT_EXISTS, LazyBitmap::loaded(exists));
        for (k, b) in bits.into_iter().enumerate() {
            if !b.is_empty() {
                slots.insert(int_slot(k), LazyBitmap::loaded(b));
            }
        }
        let field = Field {
            id: 1,
            meta: FieldMeta {
                name: "f".into(),
                description: String::new(),
                category: String::new(),
                kind: FieldKind::Int,
                created_ms: 0,
                updated_ms: 0,
                merge: Default::default(),
            },
            slots,
        };
        let read = field.int_values().unwrap();
        let mut ids: Vec<u32> = (0..4_000u32).map(|i| i * 977 % 3_000_000).collect();
        ids.sort_unstable();
        ids.dedup();
        let together = read.get_sorted(&ids);
        let alone: Vec<Option<i64>> = ids.iter().map(|&id| read.get(id)).collect();
        assert_eq!(together, alone);
        assert_eq!(alone.iter().flatten().count(), values.len());
        assert!(alone.iter().flatten().any(|&v| v < 0));
        let empty = Field {
            slots: SlotMap::new(),
            ..field
        };
        assert_eq!(
            empty.int_values().unwrap().get_sorted(&ids[..3]),
            vec![None; 3]
        );
    }
}
