//! What the write-ahead log records: one [`Batch`] per acknowledged request,
//! holding everything the request changed with ids already assigned, so that
//! replay is deterministic and applying a record twice changes nothing more.
//!
//! Version 2 added fields (integer, enumerated and behaviour) after
//! the version 1 layout, version 3 sources and remembered event ids, version
//! 4 the ingested events (and the field change that erases customers),
//! version 5 identities and merges, version 6 what each merge changed (so
//! that it can be undone) and the merges undone, version 7 saved audiences,
//! version 8 audience snapshots, version 9 a day of member counts, version
//! 10 rules (defined, dropped, their days turned), version 11 the
//! positions Kafka sources have consumed to, version 12 the records they
//! consumed and did not apply, version 13 the customers whose facts are
//! due a rebuild (a refund after its order) and those rebuilt; a reader
//! takes every one and refuses versions it does not know instead of
//! guessing.

use roaring::RoaringBitmap;

use crate::fields::{FieldKind, MergeRule};
use crate::storage::codec::{Dec, DecResult, Enc};

/// Record kind of a [`Batch`] in the log framing.
pub const KIND_BATCH: u8 = 1;
/// Version byte written at the start of a batch payload.
pub const BATCH_VERSION: u8 = 13;

/// A field created by a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct NewField {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub category: String,
    pub kind: FieldKind,
    /// How its values combine when customers merge (batch version 5).
    pub merge: MergeRule,
}

/// A change to one field's bitmaps.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldChange {
    /// Integer values: each customer in `set` gets its value, each in
    /// `clear` loses its value. A customer is in at most one of them.
    Int {
        field: u32,
        set: Vec<(u32, i64)>,
        clear: RoaringBitmap,
    },
    /// Enumerated values: the customers of each `(slot, ids)` take that value
    /// (and leave any other); the customers in `clear` lose their value.
    Enum {
        field: u32,
        set: Vec<(u32, RoaringBitmap)>,
        clear: RoaringBitmap,
    },
    /// Behaviour events: the customers of each `(slot, ids)` get the bucket.
    Events {
        field: u32,
        add: Vec<(u32, RoaringBitmap)>,
    },
    /// Buckets past retention, dropped.
    DropSlots { field: u32, slots: Vec<u32> },
    /// Day buckets of a month merged into its month bucket.
    Rollup { field: u32, month: u32 },
    /// The customers lose everything they had in the field: a value, or
    /// every behaviour bucket (a rebuild of facts starts from this).
    Erase { field: u32, ids: RoaringBitmap },
}

impl FieldChange {
    pub fn field(&self) -> u32 {
        match self {
            FieldChange::Int { field, .. }
            | FieldChange::Enum { field, .. }
            | FieldChange::Events { field, .. }
            | FieldChange::DropSlots { field, .. }
            | FieldChange::Rollup { field, .. }
            | FieldChange::Erase { field, .. } => *field,
        }
    }

    fn encode(&self, e: &mut Enc) {
        match self {
            FieldChange::Int { field, set, clear } => {
                e.u8(1).u32(*field).u32(set.len() as u32);
                for (id, v) in set {
                    e.u32(*id).i64(*v);
                }
                e.bitmap(clear);
            }
            FieldChange::Enum { field, set, clear } => {
                e.u8(2).u32(*field).u32(set.len() as u32);
                for (slot, ids) in set {
                    e.u32(*slot).bitmap(ids);
                }
                e.bitmap(clear);
            }
            FieldChange::Events { field, add } => {
                e.u8(3).u32(*field).u32(add.len() as u32);
                for (slot, ids) in add {
                    e.u32(*slot).bitmap(ids);
                }
            }
            FieldChange::DropSlots { field, slots } => {
                e.u8(4).u32(*field).u32(slots.len() as u32);
                for s in slots {
                    e.u32(*s);
                }
            }
            FieldChange::Rollup { field, month } => {
                e.u8(5).u32(*field).u32(*month);
            }
            FieldChange::Erase { field, ids } => {
                e.u8(6).u32(*field).bitmap(ids);
            }
        }
    }

    fn decode(d: &mut Dec) -> DecResult<Self> {
        Ok(match d.u8()? {
            1 => {
                let field = d.u32()?;
                let mut set = Vec::new();
                for _ in 0..d.u32()? {
                    set.push((d.u32()?, d.i64()?));
                }
                FieldChange::Int {
                    field,
                    set,
                    clear: d.bitmap()?,
                }
            }
            2 => {
                let field = d.u32()?;
                let mut set = Vec::new();
                for _ in 0..d.u32()? {
                    set.push((d.u32()?, d.bitmap()?));
                }
                FieldChange::Enum {
                    field,
                    set,
                    clear: d.bitmap()?,
                }
            }
            3 => {
                let field = d.u32()?;
                let mut add = Vec::new();
                for _ in 0..d.u32()? {
                    add.push((d.u32()?, d.bitmap()?));
                }
                FieldChange::Events { field, add }
            }
            4 => {
                let field = d.u32()?;
                let mut slots = Vec::new();
                for _ in 0..d.u32()? {
                    slots.push(d.u32()?);
                }
                FieldChange::DropSlots { field, slots }
            }
            5 => FieldChange::Rollup {
                field: d.u32()?,
                month: d.u32()?,
            },
            6 => FieldChange::Erase {
                field: d.u32()?,
                ids: d.bitmap()?,
            },
            other => return d.err(format!("unknown field change {other}")),
        })
    }
}

/// A tag created by a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTag {
    pub id: u32,
    pub name: String,
    pub description: String,
    pub category: String,
}

/// How a [`Change`] affects a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChangeOp {
    Add = 1,
    Remove = 2,
    Replace = 3,
}

/// A change to one tag's members.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub tag: u32,
    pub op: ChangeOp,
    pub ids: RoaringBitmap,
}

/// Everything one request changed. Applied in this order: new tags, new
/// fields, new customers, tag changes (in order), field changes (in order),
/// customer deletions, dropped tags, dropped fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Wall-clock time of the request, Unix milliseconds (becomes `updated_at`).
    pub at_ms: i64,
    pub new_tags: Vec<NewTag>,
    /// Customers seen for the first time, with the ids they were given.
    pub new_keys: Vec<(u32, String)>,
    pub changes: Vec<Change>,
    /// Customers erased: removed from every tag and from the live set.
    pub deletes: RoaringBitmap,
    pub drop_tags: Vec<u32>,
    pub new_fields: Vec<NewField>,
    pub field_changes: Vec<FieldChange>,
    pub drop_fields: Vec<u32>,
    /// Ingestion sources defined (or redefined) and dropped.
    pub sources: Vec<SourceChange>,
    /// Ingested events' de-duplication ids (see [`seen_id`](crate::storage::seen::seen_id)),
    /// remembered on the batch's day.
    pub seen: Vec<u128>,
    /// Days of remembered event ids forgotten (past retention).
    pub drop_seen_days: Vec<i32>,
    /// The ingested events, each with the customer it was applied to, for
    /// the event archive (written by the checkpoint that covers the batch;
    /// applying a batch does nothing with them).
    pub events: Vec<LoggedEvent>,
    /// Identities linked to customers (or, with
    /// [`UNLINKED`](crate::storage::dictionary::identities::UNLINKED),
    /// taken away from theirs).
    pub identities: Vec<IdentityLink>,
    /// Customers merged into others (OneID); the writer has already moved
    /// their tags, values and identities to the survivors in this batch.
    pub merges: Vec<LoggedMerge>,
    /// Merges undone (version 6): each absorbed customer is live again;
    /// the writer has already given it back its identities, tags and values
    /// in this batch.
    pub unmerges: Vec<LoggedUnmerge>,
    /// Saved audiences defined (or redefined) and dropped (version 7).
    pub audiences: Vec<AudienceChange>,
    /// Audience snapshots taken and dropped (version 8).
    pub snapshots: Vec<SnapshotChange>,
    /// A day of member counts for the history (version 9).
    pub history: Option<HistoryDay>,
    /// Rules defined (or redefined) and dropped (version 10). A rule
    /// defined here is evaluated for every customer when the batch is
    /// applied.
    pub rules: Vec<RuleChange>,
    /// Rules whose day turns (version 10): `(name, new local day)`; the
    /// customers the new day can change are evaluated again when the
    /// batch is applied.
    pub rule_days: Vec<(String, i32)>,
    /// Where sources that consume topics are now (version 11): what the
    /// batch's records were consumed from, logged with them, so that a
    /// source resumes exactly after the last record applied.
    pub positions: Vec<SourcePositions>,
    /// Sources paused (`true`) or resumed (version 11).
    pub pauses: Vec<(String, bool)>,
    /// Records sources consumed and did not apply (version 12), logged
    /// with the positions that move past them, so that the report of them
    /// outlives a restart and holds each once.
    pub rejects: Vec<SourceReject>,
    /// Customers whose facts are due a rebuild from their kept events
    /// (version 13): a refund came in a later request than its order, and
    /// only a rebuild takes back what the order gave that no sum undoes
    /// (its behaviours and days).
    pub rebuild_due: RoaringBitmap,
    /// Customers whose facts this batch rebuilt (version 13): no longer
    /// due. Applied before `rebuild_due`.
    pub rebuilt: RoaringBitmap,
}

/// A record a source consumed from a topic and did not apply, or records
/// it skipped because the brokers no longer held its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReject {
    pub source: String,
    /// Records skipped (the brokers did not hold `offset`; reading went on
    /// from the source's start), rather than one record rejected.
    pub skipped: bool,
    pub topic: String,
    pub partition: i32,
    /// The record's offset (for a skip: the position the store had; -1
    /// when it had none).
    pub offset: i64,
    /// Why, at most [`MAX_REJECT_REASON`] bytes.
    pub reason: String,
}

/// Longest reason a [`SourceReject`] may give, in bytes.
pub const MAX_REJECT_REASON: usize = 512;

/// Where a reject is, as the log and the manifest write it: `u8 kind` (1 a
/// record rejected, 2 records skipped), `str topic`, `i64 partition`,
/// `i64 offset`.
pub(crate) fn encode_reject_place(
    e: &mut Enc,
    skipped: bool,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    e.u8(if skipped { 2 } else { 1 })
        .str(topic)
        .i64(i64::from(partition))
        .i64(offset);
}

/// Reads what [`encode_reject_place`] wrote: `(skipped, topic, partition,
/// offset)`.
pub(crate) fn decode_reject_place(d: &mut Dec) -> DecResult<(bool, String, i32, i64)> {
    let skipped = match d.u8()? {
        1 => false,
        2 => true,
        other => return d.err(format!("unknown reject kind {other}")),
    };
    let topic = d.str()?.to_string();
    let partition = d.i64()?;
    let partition = i32::try_from(partition)
        .or_else(|_| d.err(format!("partition {partition} out of range")))?;
    Ok((skipped, topic, partition, d.i64()?))
}

/// A source's consumed positions: for each `(topic, partition)`, the offset
/// of the next record to consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePositions {
    pub source: String,
    pub next: Vec<(String, i32, i64)>,
}

/// A rule defined (`definition`) or dropped (`None`), and the local day
/// (in its zone) it is evaluated at from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleChange {
    pub name: String,
    pub definition: Option<RuleDef>,
    pub day: i32,
}

/// What a rule is: a rule tag's query, or a lifecycle's ordered stages;
/// its time zone; what it reads (worked out by the rules layer when it was
/// defined, so that applying a batch knows which rules a change can reach
/// without reading their queries).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleDef {
    /// A rule tag's query; empty for a lifecycle.
    pub query: String,
    /// A lifecycle's stages in order, `(value, query)`: a customer's value
    /// is the first stage whose query it matches.
    pub stages: Vec<(String, String)>,
    /// IANA time zone of its `TODAY` and of the turn of its day.
    pub time_zone: String,
    /// Every tag and field its queries reach (through saved audiences),
    /// sorted, each once.
    pub reads: Vec<String>,
    /// The saved audiences its queries reach, sorted, each once.
    pub audiences: Vec<String>,
}

impl RuleDef {
    pub fn is_lifecycle(&self) -> bool {
        !self.stages.is_empty()
    }

    pub(crate) fn encode(&self, e: &mut Enc) {
        e.str(&self.query).u32(self.stages.len() as u32);
        for (value, query) in &self.stages {
            e.str(value).str(query);
        }
        e.str(&self.time_zone).u32(self.reads.len() as u32);
        for r in &self.reads {
            e.str(r);
        }
        e.u32(self.audiences.len() as u32);
        for a in &self.audiences {
            e.str(a);
        }
    }

    pub(crate) fn decode(d: &mut Dec<'_>) -> DecResult<Self> {
        let query = d.str()?.to_string();
        let stages = (0..d.u32()?)
            .map(|_| Ok((d.str()?.to_string(), d.str()?.to_string())))
            .collect::<DecResult<_>>()?;
        let time_zone = d.str()?.to_string();
        let reads = (0..d.u32()?)
            .map(|_| d.str().map(str::to_string))
            .collect::<DecResult<_>>()?;
        let audiences = (0..d.u32()?)
            .map(|_| d.str().map(str::to_string))
            .collect::<DecResult<_>>()?;
        Ok(Self {
            query,
            stages,
            time_zone,
            reads,
            audiences,
        })
    }
}

/// The member counts of tags and saved audiences on one local day, and the
/// first day the history keeps from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryDay {
    pub day: i32,
    pub keep_from: i32,
    pub counts: Vec<(String, u64)>,
}

/// An audience snapshot taken or dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotChange {
    Take(TakenSnapshot),
    Drop { id: u32 },
}

/// An audience's members frozen: what it was, when, and who.
#[derive(Debug, Clone, PartialEq)]
pub struct TakenSnapshot {
    pub id: u32,
    pub audience: String,
    /// The audience's query when it was taken.
    pub query: String,
    /// The log position (lsn) of the state its members were read from.
    pub taken_lsn: u64,
    pub note: String,
    /// The members; `None` when they are those of snapshot `same_as`
    /// (the audience had not changed): the two share one bitmap.
    pub members: Option<RoaringBitmap>,
    pub same_as: u32,
}

/// A saved audience defined (`definition`) or dropped (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceChange {
    pub name: String,
    pub definition: Option<AudienceDef>,
}

/// What a saved audience is: a query, and what people know it by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AudienceDef {
    /// The query's text (checked by the query layer before it is stored).
    pub query: String,
    pub description: String,
    pub owner: String,
    pub category: String,
    /// The saved audiences its query names (so that the writer can refuse a
    /// cycle without knowing the query language).
    pub uses: Vec<String>,
}

/// One merge undone, or one identity taken off a customer, as the log
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedUnmerge {
    /// The merge's number in the merge log; for an identity taken off, the
    /// number of the new entry that records it.
    pub merge: u64,
    /// The customer the merge absorbed, live again; or the customer the
    /// identity taken off now names (made by this batch).
    pub revived: u32,
    /// The customer it was merged into; or the one the identity was taken
    /// off.
    pub survivor: u32,
    /// Empty: merge `merge` undone. Otherwise the identity taken off
    /// `survivor`.
    pub identity: String,
    /// For an identity taken off: the identities that went with it
    /// (itself among them), for the merge log.
    pub moved: Vec<String>,
}

/// What a merge changed, kept with it so that it can be undone: what the
/// absorbed customer had that its events cannot give back (tags and values
/// written directly), and what the survivor got from it. Fields and tags by
/// id (an id is never reused, so one dropped since is simply skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MergeUndo {
    /// False for a merge logged before version 6: nothing was kept, and the
    /// merge cannot be undone.
    pub kept: bool,
    /// The absorbed customer's tags.
    pub tags: Vec<u32>,
    /// Tags the survivor did not have and got from it.
    pub gained_tags: Vec<u32>,
    /// The absorbed customer's integer values and enumerated values (the
    /// value's slot), by field id.
    pub values: Vec<(u32, i64)>,
    /// The survivor's values the merge changed: field id, the value before
    /// (`None`: it had none) and the merged one.
    pub changed: Vec<(u32, Option<i64>, i64)>,
    /// The absorbed customer's behaviour slots: field id, slot.
    pub days: Vec<(u32, u32)>,
    /// Behaviour slots the survivor did not have and got from it.
    pub gained_days: Vec<(u32, u32)>,
}

impl MergeUndo {
    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
            && self.gained_tags.is_empty()
            && self.values.is_empty()
            && self.changed.is_empty()
            && self.days.is_empty()
            && self.gained_days.is_empty()
    }

    pub fn encode(&self, e: &mut Enc) {
        e.u8(u8::from(self.kept));
        for list in [&self.tags, &self.gained_tags] {
            e.u32(list.len() as u32);
            for t in list {
                e.u32(*t);
            }
        }
        e.u32(self.values.len() as u32);
        for (f, v) in &self.values {
            e.u32(*f).i64(*v);
        }
        e.u32(self.changed.len() as u32);
        for (f, before, after) in &self.changed {
            e.u32(*f);
            match before {
                Some(v) => e.u8(1).i64(*v),
                None => e.u8(0),
            };
            e.i64(*after);
        }
        for list in [&self.days, &self.gained_days] {
            e.u32(list.len() as u32);
            for (f, slot) in list {
                e.u32(*f).u32(*slot);
            }
        }
    }

    pub fn decode(d: &mut Dec<'_>) -> DecResult<MergeUndo> {
        let kept = match d.u8()? {
            0 => false,
            1 => true,
            other => return d.err(format!("merge undo flag {other}")),
        };
        let ids = |d: &mut Dec<'_>| {
            (0..d.u32()?)
                .map(|_| d.u32())
                .collect::<DecResult<Vec<u32>>>()
        };
        let tags = ids(d)?;
        let gained_tags = ids(d)?;
        let values = (0..d.u32()?)
            .map(|_| Ok((d.u32()?, d.i64()?)))
            .collect::<DecResult<_>>()?;
        let changed = (0..d.u32()?)
            .map(|_| {
                let f = d.u32()?;
                let before = match d.u8()? {
                    0 => None,
                    1 => Some(d.i64()?),
                    other => return d.err(format!("merge undo value flag {other}")),
                };
                Ok((f, before, d.i64()?))
            })
            .collect::<DecResult<_>>()?;
        let pairs = |d: &mut Dec<'_>| {
            (0..d.u32()?)
                .map(|_| Ok((d.u32()?, d.u32()?)))
                .collect::<DecResult<Vec<(u32, u32)>>>()
        };
        let days = pairs(d)?;
        let gained_days = pairs(d)?;
        Ok(MergeUndo {
            kept,
            tags,
            gained_tags,
            values,
            changed,
            days,
            gained_days,
        })
    }
}

/// One merge as the log carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedMerge {
    /// Its number in the merge log.
    pub id: u64,
    pub survivor: u32,
    pub absorbed: u32,
    /// The identity whose record named both.
    pub via: String,
    /// Empty: merged. Otherwise why the guard rails refused the merge
    /// (logged for the record; nothing is absorbed).
    pub refused: String,
    /// The identities that moved from the absorbed customer to the
    /// survivor (its key among them).
    pub moved: Vec<String>,
    /// What the merge changed (version 6; empty for a refused one).
    pub undo: MergeUndo,
}

/// An identity (`type:value`) and the customer it now names, with where and
/// when it was first seen (kept from its first link: a later link of the
/// same identity does not change them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityLink {
    pub customer: u32,
    pub identity: String,
    pub first_ms: i64,
    pub place: String,
}

/// An ingested event as the log carries it: its customer and its bytes
/// (encoded by the ingestion room; opaque here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub customer: u32,
    pub bytes: Vec<u8>,
}

/// A source of ingestion defined (`definition` is its TOML) or dropped
/// (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChange {
    pub name: String,
    pub definition: Option<String>,
}

impl Batch {
    /// True when applying the batch would change nothing.
    pub fn is_empty(&self) -> bool {
        self.new_tags.is_empty()
            && self.new_keys.is_empty()
            && self.changes.is_empty()
            && self.deletes.is_empty()
            && self.drop_tags.is_empty()
            && self.new_fields.is_empty()
            && self.field_changes.is_empty()
            && self.drop_fields.is_empty()
            && self.sources.is_empty()
            && self.seen.is_empty()
            && self.drop_seen_days.is_empty()
            && self.events.is_empty()
            && self.identities.is_empty()
            && self.merges.is_empty()
            && self.unmerges.is_empty()
            && self.audiences.is_empty()
            && self.snapshots.is_empty()
            && self.history.is_none()
            && self.rules.is_empty()
            && self.rule_days.is_empty()
            && self.positions.is_empty()
            && self.pauses.is_empty()
            && self.rejects.is_empty()
            && self.rebuild_due.is_empty()
            && self.rebuilt.is_empty()
    }

    /// Whether a key that named a live customer before the batch may name
    /// another one (or none) after it: customers erased, merged or brought
    /// back by an unmerge. Keys looked up before such a batch are looked
    /// up again.
    pub fn moves_keys(&self) -> bool {
        !self.deletes.is_empty() || !self.merges.is_empty() || !self.unmerges.is_empty()
    }

    /// Memberships the batch names in its changes: a measure of the work
    /// of applying it.
    pub fn membership_changes(&self) -> u64 {
        self.changes.iter().map(|c| c.ids.len()).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`Batch::encode`], appended to `out` (a log record framed in place).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut e = Enc {
            buf: std::mem::take(out),
        };
        e.u8(BATCH_VERSION).i64(self.at_ms);
        e.u32(self.new_tags.len() as u32);
        for t in &self.new_tags {
            e.u32(t.id)
                .str(&t.name)
                .str(&t.description)
                .str(&t.category);
        }
        e.u32(self.new_keys.len() as u32);
        for (id, key) in &self.new_keys {
            e.u32(*id).str(key);
        }
        e.u32(self.changes.len() as u32);
        for c in &self.changes {
            e.u32(c.tag).u8(c.op as u8).bitmap(&c.ids);
        }
        e.bitmap(&self.deletes);
        e.u32(self.drop_tags.len() as u32);
        for t in &self.drop_tags {
            e.u32(*t);
        }
        e.u32(self.new_fields.len() as u32);
        for f in &self.new_fields {
            e.u32(f.id)
                .str(&f.name)
                .str(&f.description)
                .str(&f.category);
            f.kind.encode(&mut e);
            e.u8(f.merge.code());
        }
        e.u32(self.field_changes.len() as u32);
        for c in &self.field_changes {
            c.encode(&mut e);
        }
        e.u32(self.drop_fields.len() as u32);
        for f in &self.drop_fields {
            e.u32(*f);
        }
        e.u32(self.sources.len() as u32);
        for s in &self.sources {
            e.str(&s.name);
            match &s.definition {
                Some(d) => e.u8(1).str(d),
                None => e.u8(2),
            };
        }
        e.u32(self.seen.len() as u32);
        for id in &self.seen {
            e.u64(*id as u64).u64((*id >> 64) as u64);
        }
        e.u32(self.drop_seen_days.len() as u32);
        for d in &self.drop_seen_days {
            e.i64(i64::from(*d));
        }
        e.u32(self.events.len() as u32);
        for ev in &self.events {
            e.u32(ev.customer).u32(ev.bytes.len() as u32);
            e.buf.extend_from_slice(&ev.bytes);
        }
        e.u32(self.identities.len() as u32);
        for l in &self.identities {
            e.u32(l.customer)
                .str(&l.identity)
                .i64(l.first_ms)
                .str(&l.place);
        }
        e.u32(self.merges.len() as u32);
        for m in &self.merges {
            e.u64(m.id)
                .u32(m.survivor)
                .u32(m.absorbed)
                .str(&m.via)
                .str(&m.refused)
                .u32(m.moved.len() as u32);
            for i in &m.moved {
                e.str(i);
            }
            m.undo.encode(&mut e);
        }
        e.u32(self.unmerges.len() as u32);
        for u in &self.unmerges {
            e.u64(u.merge)
                .u32(u.revived)
                .u32(u.survivor)
                .str(&u.identity)
                .u32(u.moved.len() as u32);
            for i in &u.moved {
                e.str(i);
            }
        }
        e.u32(self.audiences.len() as u32);
        for a in &self.audiences {
            e.str(&a.name);
            match &a.definition {
                Some(d) => {
                    e.u8(1)
                        .str(&d.query)
                        .str(&d.description)
                        .str(&d.owner)
                        .str(&d.category)
                        .u32(d.uses.len() as u32);
                    for u in &d.uses {
                        e.str(u);
                    }
                }
                None => {
                    e.u8(2);
                }
            }
        }
        e.u32(self.snapshots.len() as u32);
        for c in &self.snapshots {
            match c {
                SnapshotChange::Take(t) => {
                    e.u8(1)
                        .u32(t.id)
                        .str(&t.audience)
                        .str(&t.query)
                        .u64(t.taken_lsn)
                        .str(&t.note)
                        .u32(t.same_as);
                    match &t.members {
                        Some(m) => e.u8(1).bitmap(m),
                        None => e.u8(0),
                    };
                }
                SnapshotChange::Drop { id } => {
                    e.u8(2).u32(*id);
                }
            }
        }
        match &self.history {
            Some(h) => {
                e.u8(1)
                    .i64(i64::from(h.day))
                    .i64(i64::from(h.keep_from))
                    .u32(h.counts.len() as u32);
                for (name, n) in &h.counts {
                    e.str(name).u64(*n);
                }
            }
            None => {
                e.u8(0);
            }
        }
        e.u32(self.rules.len() as u32);
        for r in &self.rules {
            e.str(&r.name).i64(i64::from(r.day));
            match &r.definition {
                Some(def) => {
                    e.u8(1);
                    def.encode(&mut e);
                }
                None => {
                    e.u8(2);
                }
            }
        }
        e.u32(self.rule_days.len() as u32);
        for (name, day) in &self.rule_days {
            e.str(name).i64(i64::from(*day));
        }
        e.u32(self.positions.len() as u32);
        for p in &self.positions {
            e.str(&p.source).u32(p.next.len() as u32);
            for (topic, partition, next) in &p.next {
                e.str(topic).i64(i64::from(*partition)).i64(*next);
            }
        }
        e.u32(self.pauses.len() as u32);
        for (name, paused) in &self.pauses {
            e.str(name).u8(u8::from(*paused));
        }
        e.u32(self.rejects.len() as u32);
        for r in &self.rejects {
            e.str(&r.source);
            encode_reject_place(&mut e, r.skipped, &r.topic, r.partition, r.offset);
            e.str(&r.reason);
        }
        // Nearly every batch has neither: one byte says so.
        if self.rebuild_due.is_empty() && self.rebuilt.is_empty() {
            e.u8(0);
        } else {
            e.u8(1).bitmap(&self.rebuild_due).bitmap(&self.rebuilt);
        }
        *out = e.buf;
    }

    /// The batch a log record of `kind` holds, as replay reads it: a kind
    /// other than a batch, or a payload that does not decode, is a
    /// [`Error::BadRecord`](crate::error::Error::BadRecord) (the caller
    /// names the file and offset).
    pub fn from_record(kind: u8, payload: &[u8]) -> crate::error::Result<Batch> {
        use crate::error::Error;
        if kind != KIND_BATCH {
            return Err(Error::BadRecord(format!("unknown record kind {kind}")));
        }
        Batch::decode(payload).map_err(|e| {
            Error::BadRecord(format!(
                "undecodable batch at payload offset {}: {}",
                e.offset, e.reason
            ))
        })
    }

    /// The request time of an encoded batch, without decoding the rest
    /// (`None` when the payload is too short to hold it).
    pub fn peek_at_ms(payload: &[u8]) -> Option<i64> {
        let bytes: [u8; 8] = payload.get(1..9)?.try_into().ok()?;
        Some(i64::from_le_bytes(bytes))
    }

    pub fn decode(payload: &[u8]) -> DecResult<Self> {
        let mut d = Dec::new(payload);
        let version = d.u8()?;
        if !(1..=BATCH_VERSION).contains(&version) {
            return d.err(format!("unsupported batch version {version}"));
        }
        let mut b = Batch {
            at_ms: d.i64()?,
            ..Default::default()
        };
        for _ in 0..d.u32()? {
            b.new_tags.push(NewTag {
                id: d.u32()?,
                name: d.str()?.to_string(),
                description: d.str()?.to_string(),
                category: d.str()?.to_string(),
            });
        }
        for _ in 0..d.u32()? {
            b.new_keys.push((d.u32()?, d.str()?.to_string()));
        }
        for _ in 0..d.u32()? {
            let tag = d.u32()?;
            let op = match d.u8()? {
                1 => ChangeOp::Add,
                2 => ChangeOp::Remove,
                3 => ChangeOp::Replace,
                other => return d.err(format!("unknown change op {other}")),
            };
            b.changes.push(Change {
                tag,
                op,
                ids: d.bitmap()?,
            });
        }
        b.deletes = d.bitmap()?;
        for _ in 0..d.u32()? {
            b.drop_tags.push(d.u32()?);
        }
        if version >= 2 {
            for _ in 0..d.u32()? {
                b.new_fields.push(NewField {
                    id: d.u32()?,
                    name: d.str()?.to_string(),
                    description: d.str()?.to_string(),
                    category: d.str()?.to_string(),
                    kind: FieldKind::decode(&mut d)?,
                    merge: if version >= 5 {
                        let code = d.u8()?;
                        match MergeRule::from_code(code) {
                            Some(r) => r,
                            None => return d.err(format!("unknown merge rule {code}")),
                        }
                    } else {
                        MergeRule::Keep
                    },
                });
            }
            for _ in 0..d.u32()? {
                b.field_changes.push(FieldChange::decode(&mut d)?);
            }
            for _ in 0..d.u32()? {
                b.drop_fields.push(d.u32()?);
            }
        }
        if version >= 3 {
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                let definition = match d.u8()? {
                    1 => Some(d.str()?.to_string()),
                    2 => None,
                    other => return d.err(format!("unknown source change {other}")),
                };
                b.sources.push(SourceChange { name, definition });
            }
            for _ in 0..d.u32()? {
                let (lo, hi) = (d.u64()?, d.u64()?);
                b.seen.push(u128::from(hi) << 64 | u128::from(lo));
            }
            for _ in 0..d.u32()? {
                let day = d.i64()?;
                match i32::try_from(day) {
                    Ok(day) => b.drop_seen_days.push(day),
                    Err(_) => return d.err(format!("day {day} out of range")),
                }
            }
        }
        if version >= 4 {
            for _ in 0..d.u32()? {
                let customer = d.u32()?;
                let len = d.u32()? as usize;
                let bytes = d.bytes(len)?.to_vec();
                b.events.push(LoggedEvent { customer, bytes });
            }
        }
        if version >= 5 {
            for _ in 0..d.u32()? {
                b.identities.push(IdentityLink {
                    customer: d.u32()?,
                    identity: d.str()?.to_string(),
                    first_ms: d.i64()?,
                    place: d.str()?.to_string(),
                });
            }
            for _ in 0..d.u32()? {
                b.merges.push(LoggedMerge {
                    id: d.u64()?,
                    survivor: d.u32()?,
                    absorbed: d.u32()?,
                    via: d.str()?.to_string(),
                    refused: d.str()?.to_string(),
                    moved: (0..d.u32()?)
                        .map(|_| d.str().map(str::to_string))
                        .collect::<DecResult<_>>()?,
                    undo: if version >= 6 {
                        MergeUndo::decode(&mut d)?
                    } else {
                        MergeUndo::default()
                    },
                });
            }
        }
        if version >= 6 {
            for _ in 0..d.u32()? {
                b.unmerges.push(LoggedUnmerge {
                    merge: d.u64()?,
                    revived: d.u32()?,
                    survivor: d.u32()?,
                    identity: d.str()?.to_string(),
                    moved: (0..d.u32()?)
                        .map(|_| d.str().map(str::to_string))
                        .collect::<DecResult<_>>()?,
                });
            }
        }
        if version >= 7 {
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                let definition = match d.u8()? {
                    1 => Some(AudienceDef {
                        query: d.str()?.to_string(),
                        description: d.str()?.to_string(),
                        owner: d.str()?.to_string(),
                        category: d.str()?.to_string(),
                        uses: (0..d.u32()?)
                            .map(|_| d.str().map(str::to_string))
                            .collect::<DecResult<_>>()?,
                    }),
                    2 => None,
                    op => return d.err(format!("unknown audience change {op}")),
                };
                b.audiences.push(AudienceChange { name, definition });
            }
        }
        if version >= 8 {
            for _ in 0..d.u32()? {
                let change = match d.u8()? {
                    1 => SnapshotChange::Take(TakenSnapshot {
                        id: d.u32()?,
                        audience: d.str()?.to_string(),
                        query: d.str()?.to_string(),
                        taken_lsn: d.u64()?,
                        note: d.str()?.to_string(),
                        same_as: d.u32()?,
                        members: match d.u8()? {
                            0 => None,
                            1 => Some(d.bitmap()?),
                            f => return d.err(format!("unknown snapshot members flag {f}")),
                        },
                    }),
                    2 => SnapshotChange::Drop { id: d.u32()? },
                    op => return d.err(format!("unknown snapshot change {op}")),
                };
                b.snapshots.push(change);
            }
        }
        if version >= 9 && d.u8()? == 1 {
            let day = |d: &mut Dec<'_>| -> DecResult<i32> {
                let v = d.i64()?;
                i32::try_from(v).or_else(|_| d.err(format!("day {v} out of range")))
            };
            let (day, keep_from) = (day(&mut d)?, day(&mut d)?);
            let counts = (0..d.u32()?)
                .map(|_| Ok((d.str()?.to_string(), d.u64()?)))
                .collect::<DecResult<_>>()?;
            b.history = Some(HistoryDay {
                day,
                keep_from,
                counts,
            });
        }
        if version >= 10 {
            let day = |d: &mut Dec<'_>| -> DecResult<i32> {
                let v = d.i64()?;
                i32::try_from(v).or_else(|_| d.err(format!("day {v} out of range")))
            };
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                let at = day(&mut d)?;
                let definition = match d.u8()? {
                    1 => Some(RuleDef::decode(&mut d)?),
                    2 => None,
                    op => return d.err(format!("unknown rule change {op}")),
                };
                b.rules.push(RuleChange {
                    name,
                    definition,
                    day: at,
                });
            }
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                b.rule_days.push((name, day(&mut d)?));
            }
        }
        if version >= 11 {
            for _ in 0..d.u32()? {
                let source = d.str()?.to_string();
                let mut next = Vec::new();
                for _ in 0..d.u32()? {
                    let topic = d.str()?.to_string();
                    let partition = d.i64()?;
                    let partition = i32::try_from(partition)
                        .or_else(|_| d.err(format!("partition {partition} out of range")))?;
                    next.push((topic, partition, d.i64()?));
                }
                b.positions.push(SourcePositions { source, next });
            }
            for _ in 0..d.u32()? {
                let name = d.str()?.to_string();
                let paused = match d.u8()? {
                    0 => false,
                    1 => true,
                    other => return d.err(format!("unknown pause flag {other}")),
                };
                b.pauses.push((name, paused));
            }
        }
        if version >= 12 {
            for _ in 0..d.u32()? {
                let source = d.str()?.to_string();
                let (skipped, topic, partition, offset) = decode_reject_place(&mut d)?;
                let reason = d.str()?.to_string();
                b.rejects.push(SourceReject {
                    source,
                    skipped,
                    topic,
                    partition,
                    offset,
                    reason,
                });
            }
        }
        if version >= 13 {
            match d.u8()? {
                0 => {}
                1 => {
                    b.rebuild_due = d.bitmap()?;
                    b.rebuilt = d.bitmap()?;
                }
                other => return d.err(format!("unknown rebuild flag {other}")),
            }
        }
        d.finish()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_round_trip() {
        let b = Batch {
            at_ms: 42,
            new_tags: vec![NewTag {
                id: 3,
                name: "常购护肤品".into(),
                description: "d".into(),
                category: "c".into(),
            }],
            new_keys: vec![(10, "phone:1".into()), (11, "wechat:x".into())],
            changes: vec![Change {
                tag: 3,
                op: ChangeOp::Add,
                ids: [10u32, 11].into_iter().collect(),
            }],
            deletes: [4u32].into_iter().collect(),
            drop_tags: vec![2],
            new_fields: vec![NewField {
                id: 5,
                name: "lifecycle".into(),
                description: String::new(),
                category: "stage".into(),
                kind: FieldKind::Enum {
                    values: vec!["new".into(), "active".into()],
                },
                merge: MergeRule::Last,
            }],
            field_changes: vec![
                FieldChange::Int {
                    field: 6,
                    set: vec![(10, i64::MIN), (11, -3)],
                    clear: [12u32].into_iter().collect(),
                },
                FieldChange::Enum {
                    field: 5,
                    set: vec![(1, [10u32].into_iter().collect())],
                    clear: RoaringBitmap::new(),
                },
                FieldChange::Events {
                    field: 7,
                    add: vec![(20_420, [11u32].into_iter().collect())],
                },
                FieldChange::DropSlots {
                    field: 7,
                    slots: vec![19_000],
                },
                FieldChange::Rollup {
                    field: 7,
                    month: 600,
                },
            ],
            drop_fields: vec![8],
            sources: vec![
                SourceChange {
                    name: "jd_orders".into(),
                    definition: Some("format = \"csv\"".into()),
                },
                SourceChange {
                    name: "old".into(),
                    definition: None,
                },
            ],
            seen: vec![u128::MAX, 0, 42, 1 << 70],
            drop_seen_days: vec![20_000, -1],
            events: vec![
                LoggedEvent {
                    customer: 10,
                    bytes: b"an order".to_vec(),
                },
                LoggedEvent {
                    customer: 11,
                    bytes: Vec::new(),
                },
            ],
            identities: vec![
                IdentityLink {
                    customer: 10,
                    identity: "wechat_unionid:o6_x".into(),
                    first_ms: 1_700_000_000_000,
                    place: "wechat".into(),
                },
                IdentityLink {
                    customer: u32::MAX,
                    identity: "phone:13800000000".into(),
                    first_ms: 0,
                    place: String::new(),
                },
            ],
            merges: vec![LoggedMerge {
                id: 7,
                survivor: 10,
                absorbed: 11,
                via: "phone:13800000000".into(),
                refused: String::new(),
                moved: vec!["taobao_nick:x".into(), "phone:1".into()],
                undo: MergeUndo {
                    kept: true,
                    tags: vec![3, 4],
                    gained_tags: vec![4],
                    values: vec![(5, -7), (6, 2)],
                    changed: vec![(5, None, -7), (8, Some(1), 9)],
                    days: vec![(9, 20_000)],
                    gained_days: vec![],
                },
            }],
            unmerges: vec![
                LoggedUnmerge {
                    merge: 3,
                    revived: 11,
                    survivor: 10,
                    identity: String::new(),
                    moved: vec![],
                },
                LoggedUnmerge {
                    merge: 8,
                    revived: 12,
                    survivor: 10,
                    identity: "phone:2".into(),
                    moved: vec!["phone:2".into(), "member_card:9".into()],
                },
            ],
            audiences: vec![
                AudienceChange {
                    name: "高价值".into(),
                    definition: Some(AudienceDef {
                        query: "vip AND spenders".into(),
                        description: "d".into(),
                        owner: "marketing".into(),
                        category: "c".into(),
                        uses: vec!["spenders".into()],
                    }),
                },
                AudienceChange {
                    name: "old".into(),
                    definition: None,
                },
            ],
            snapshots: vec![
                SnapshotChange::Take(TakenSnapshot {
                    id: 4,
                    audience: "高价值".into(),
                    query: "vip".into(),
                    taken_lsn: 41,
                    note: "11.11".into(),
                    members: Some([1u32, 5, 1 << 20].into_iter().collect()),
                    same_as: 0,
                }),
                SnapshotChange::Take(TakenSnapshot {
                    id: 5,
                    audience: "高价值".into(),
                    query: "vip".into(),
                    taken_lsn: 42,
                    note: String::new(),
                    members: None,
                    same_as: 4,
                }),
                SnapshotChange::Drop { id: 3 },
            ],
            history: Some(HistoryDay {
                day: 20_788,
                keep_from: 20_388,
                counts: vec![("vip".into(), 3), ("高价值".into(), 2)],
            }),
            rules: vec![
                RuleChange {
                    name: "高价值用户".into(),
                    definition: Some(RuleDef {
                        query: "total_spend_fen >= 500000".into(),
                        time_zone: "Asia/Shanghai".into(),
                        reads: vec!["total_spend_fen".into()],
                        ..Default::default()
                    }),
                    day: 20_788,
                },
                RuleChange {
                    name: "lifecycle".into(),
                    definition: Some(RuleDef {
                        stages: vec![
                            ("new".into(), "first_order_day >= TODAY - 30".into()),
                            ("active".into(), "last_order_day >= TODAY - 90".into()),
                        ],
                        time_zone: "UTC".into(),
                        reads: vec!["first_order_day".into(), "last_order_day".into()],
                        audiences: vec!["a".into()],
                        ..Default::default()
                    }),
                    day: 20_789,
                },
                RuleChange {
                    name: "old".into(),
                    definition: None,
                    day: 0,
                },
            ],
            rule_days: vec![("潜在流失".into(), 20_790)],
            positions: vec![SourcePositions {
                source: "orders_topic".into(),
                next: vec![("orders".into(), 0, 17), ("orders".into(), 2, 1 << 40)],
            }],
            pauses: vec![("orders_topic".into(), true), ("other".into(), false)],
            rejects: vec![
                SourceReject {
                    source: "orders_topic".into(),
                    skipped: false,
                    topic: "orders".into(),
                    partition: 2,
                    offset: 1 << 40,
                    reason: "line 1: 实付金额 \"abc\" is not an amount".into(),
                },
                SourceReject {
                    source: "orders_topic".into(),
                    skipped: true,
                    topic: "orders".into(),
                    partition: 0,
                    offset: -1,
                    reason: String::new(),
                },
            ],
            rebuild_due: [7, 1 << 20, 3 << 20].into_iter().collect(),
            rebuilt: [8].into_iter().collect(),
        };
        let bytes = b.encode();
        assert_eq!(Batch::decode(&bytes).unwrap(), b);
        assert!(Batch::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[0] = BATCH_VERSION + 1;
        assert!(Batch::decode(&bad).is_err());
        // Without customers due a rebuild or rebuilt: one byte, read back
        // as none.
        let plain = Batch {
            rebuild_due: RoaringBitmap::new(),
            rebuilt: RoaringBitmap::new(),
            ..b.clone()
        };
        let short = plain.encode();
        assert_eq!(
            bytes.len() - short.len(),
            2 * 4 + b.rebuild_due.serialized_size() + b.rebuilt.serialized_size()
        );
        assert_eq!(Batch::decode(&short).unwrap(), plain);
        let mut flag = short.clone();
        *flag.last_mut().unwrap() = 2;
        assert!(Batch::decode(&flag).is_err());
    }
}
