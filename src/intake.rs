//! Intake: records read from a source become the engine's writes. The
//! facts' fields are made when missing, each event becomes an
//! [`IngestRecord`] (its identities, its facts' writes, its de-duplication
//! id, its refund's, the event to keep), and records whose facts cannot be
//! written are rejected, each with its reason.
//!
//! Shared by the ways records come in: the `Ingest` stream
//! (`crate::server`) and the Kafka consumers (`crate::kafka`). This room
//! knows nothing of gRPC or of Kafka; it writes nothing but the fields
//! facts need (`CreateField`).

use std::collections::{BTreeMap, HashMap};

use crate::error::Error;
use crate::fields::{
    BehaviourSpec, DEFAULT_DAILY_DAYS, DEFAULT_RETENTION_DAYS, FieldKind, MergeRule,
};
use crate::ingest::facts::{Fact, FactKind, Facts, ORDER, REFUND};
use crate::ingest::read::Read;
use crate::ingest::source::{Outcome, Source};
use crate::storage::seen::seen_id;
use crate::storage::{Engine, IngestRecord, KeptEvent, WriteOp};

/// A record that cannot be applied: where it starts (its line, or the
/// caller's own position of it) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub line: u64,
    pub reason: String,
}

/// A batch of read records, ready to write.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Records the source declares not to be events (`ignore`).
    pub ignored: u64,
    /// Records that cannot be applied, in the order read.
    pub rejected: Vec<Rejected>,
    /// The others, each with its line.
    pub records: Vec<(u64, IngestRecord)>,
}

/// Turns records read from `source` into writes.
pub async fn prepare(
    engine: &Engine,
    facts: &Facts,
    source: &Source,
    reads: Vec<Read>,
) -> Prepared {
    let mut answer = Prepared::default();
    let mut events = Vec::new();
    for r in reads {
        match r.outcome {
            Outcome::Event(e) => events.push((r.line, e)),
            Outcome::Ignored => answer.ignored += 1,
            Outcome::Rejected(why) => answer.rejected.push(Rejected {
                line: r.line,
                reason: why.0,
            }),
        }
    }
    // The facts' fields, created when missing; a record whose fact names a
    // field of another kind (or a tag) is rejected, saying which.
    let mut unusable: HashMap<String, String> = HashMap::new();
    let mut needed: BTreeMap<String, (FactKind, MergeRule)> = BTreeMap::new();
    let mut records = Vec::with_capacity(events.len());
    for (line, e) in events {
        let fs = match facts.of(&e) {
            Ok(fs) => fs,
            Err(why) => {
                answer.rejected.push(Rejected {
                    line,
                    reason: why.0,
                });
                continue;
            }
        };
        for f in &fs {
            if !needed.contains_key(&f.field) {
                needed.insert(f.field.clone(), (f.kind, f.merge_rule()));
            }
        }
        records.push((line, e, fs));
    }
    for (field, (kind, merge)) in needed {
        if let Err(why) = ensure_field(engine, &field, kind, merge).await {
            unusable.insert(field, why);
        }
    }
    answer.records.reserve(records.len());
    for (line, e, fs) in records {
        if let Some((field, why)) = fs
            .iter()
            .filter(|_| !unusable.is_empty())
            .find_map(|f| unusable.get(&f.field).map(|w| (&f.field, w)))
        {
            answer.rejected.push(Rejected {
                line,
                reason: format!("its fact {field:?} cannot be written: {why}"),
            });
            continue;
        }
        // The writer decides the customer from every identity the record
        // names; the first names a new one.
        let identities: Vec<String> = e.identities.iter().map(|i| i.key()).collect();
        let key = identities[0].clone();
        let seen = e
            .source_event_id
            .as_deref()
            .map(|id| seen_id(&source.name, &e.event_type, id));
        // An order's behaviours and days are left out if its refund comes
        // first (`crate::ingest::facts`, on refunds).
        let refund = e
            .source_event_id
            .as_deref()
            .filter(|_| e.event_type == ORDER)
            .map(|id| seen_id(&source.name, REFUND, id));
        // A refund whose order came in an earlier request makes its
        // customer's facts due a rebuild (what the order gave that no sum
        // takes back).
        let order = e
            .source_event_id
            .as_deref()
            .filter(|_| e.event_type == REFUND)
            .map(|id| seen_id(&source.name, ORDER, id));
        let (sums, rest): (Vec<Fact>, Vec<Fact>) =
            fs.into_iter().partition(|f| refund.is_none() || f.is_sum());
        answer.records.push((
            line,
            IngestRecord {
                refund,
                order,
                unless_refunded: rest.into_iter().map(|f| f.into_value_write(&key)).collect(),
                seen,
                identities,
                place: e.channel.clone(),
                at_ms: e.at_ms,
                writes: sums.into_iter().map(|f| f.into_value_write(&key)).collect(),
                event: Some(KeptEvent {
                    bytes: e.encode(&source.name),
                    customer: key,
                }),
            },
        ));
    }
    answer
}

/// Creates a fact's field if it is missing (with the merge rule its fact
/// implies); says why not if it cannot be.
pub async fn ensure_field(
    engine: &Engine,
    name: &str,
    kind: FactKind,
    merge: MergeRule,
) -> Result<(), String> {
    let snap = engine.snapshot();
    match (snap.field(name).map(|f| &f.meta.kind), kind) {
        (Some(FieldKind::Int), FactKind::Integer) => return Ok(()),
        (Some(FieldKind::Behaviour(_)), FactKind::Behaviour) => return Ok(()),
        (Some(other), _) => {
            return Err(format!("{name:?} is a field of kind {}", other.name()));
        }
        (None, _) if snap.tag(name).is_some() => return Err(format!("{name:?} is a tag")),
        (None, _) => {}
    }
    let want = kind;
    let kind = match kind {
        FactKind::Integer => FieldKind::Int,
        FactKind::Behaviour => FieldKind::Behaviour(BehaviourSpec {
            time_zone: "Asia/Shanghai".into(),
            retention_days: DEFAULT_RETENTION_DAYS,
            daily_days: DEFAULT_DAILY_DAYS,
        }),
    };
    match engine
        .write(WriteOp::CreateField {
            name: name.to_string(),
            description: "a fact kept by ingestion".into(),
            category: "facts".into(),
            kind,
            merge,
            if_not_exists: true,
        })
        .await
    {
        Ok(_) => Ok(()),
        // Made meanwhile by another stream, of the same kind: fine.
        Err(Error::FieldExists(_)) if snap_kind_matches(engine, name, want) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn snap_kind_matches(engine: &Engine, name: &str, want: FactKind) -> bool {
    let snap = engine.snapshot();
    match snap.field(name).map(|f| &f.meta.kind) {
        Some(FieldKind::Int) => want == FactKind::Integer,
        Some(FieldKind::Behaviour(_)) => want == FactKind::Behaviour,
        _ => false,
    }
}

/// Whether an engine error is about the records written (so that, written
/// one by one, only the records at fault are rejected) rather than about
/// the store (which fails the stream).
pub fn is_about_records(e: &Error) -> bool {
    matches!(
        e,
        Error::InvalidArgument(_) | Error::FieldNotFound(_) | Error::TagExists(_)
    )
}
