//! The `RebuildFacts` call: checks the request, checkpoints (so the event
//! archive holds every event so far), reads the customers' kept events off
//! the runtime, has the ingestion room fold them into facts, and logs the
//! result as one write; customers whose events arrived meanwhile are tried
//! again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;
use tonic::Status;

use crate::error::Error;
use crate::fields::FieldKind;
use crate::ingest::facts::FactKind;
use crate::ingest::facts::Facts;
use crate::ingest::rebuild::{MAX_WRITES, Rebuild, Rebuilt};
use crate::ingest::split::{merging_identities, owner};
use crate::intake::ensure_field;
use crate::proto;
use crate::server::service::{Service, invalid};
use crate::server::status::to_status;
use crate::storage::{CheckpointOptions, Engine, WriteOp};

/// Tries before customers whose events keep arriving are given up.
const ATTEMPTS: usize = 4;

pub(super) async fn rebuild_facts(
    svc: &Service,
    req: proto::RebuildFactsRequest,
) -> Result<proto::RebuildFactsResponse, Status> {
    let limit = svc.limits.max_keys_per_request;
    if req.customers.is_empty() {
        return Err(invalid("name at least one customer to rebuild"));
    }
    if req.customers.len() > limit {
        return Err(invalid(format!(
            "{} customers in one rebuild; the limit is {limit} (max_keys_per_request)",
            req.customers.len()
        )));
    }
    let mut pending: Vec<String> = req.customers;
    pending.sort();
    pending.dedup();
    let mut out = proto::RebuildFactsResponse::default();
    let mut reasons: BTreeSet<String> = BTreeSet::new();
    let partial = if req.allow_partial {
        Partial::Allow
    } else if req.skip_partial {
        Partial::Skip
    } else {
        Partial::Refuse
    };
    for attempt in 0..ATTEMPTS {
        let round = rebuild_once(&svc.engine, &svc.facts, &pending, partial).await?;
        out.events_dropped_to_ms = round.events_dropped_to_ms;
        if attempt == 0 {
            out.not_found = round.not_found;
        }
        out.rebuilt += round.rebuilt;
        out.events += round.events;
        out.refused += round.refused;
        reasons.extend(round.refusals);
        out.values_set += round.values_set;
        out.events_added += round.events_added;
        out.events_expired += round.events_expired;
        if round.lsn > 0 {
            out.lsn = round.lsn;
        }
        out.partial.extend(round.partial);
        pending = round.busy;
        if pending.is_empty() {
            break;
        }
    }
    out.refusals = reasons.into_iter().collect();
    out.partial.sort();
    out.partial.dedup();
    if !pending.is_empty() {
        return Err(Status::aborted(format!(
            "{} customers kept receiving events through {ATTEMPTS} tries and were not rebuilt \
             (first: {:?}); the {} others were; try these again",
            pending.len(),
            pending[0],
            out.rebuilt
        )));
    }
    Ok(out)
}

/// What one try at rebuilding some customers' facts did.
#[derive(Debug, Default)]
pub(super) struct Round {
    pub rebuilt: u64,
    /// Keys that named no customer (erased, or never known).
    pub not_found: Vec<String>,
    /// Customers whose events arrived while theirs were read: not rebuilt.
    pub busy: Vec<String>,
    pub events: u64,
    pub refused: u64,
    pub refusals: BTreeSet<String>,
    pub values_set: u64,
    pub events_added: u64,
    pub events_expired: u64,
    pub lsn: u64,
    pub events_dropped_to_ms: i64,
    /// With [`Partial::Skip`]: customers left alone because retention
    /// dropped some of their kept events.
    pub partial: Vec<String>,
}

/// What a rebuild does with customers some of whose kept events retention
/// dropped (a rebuild of them would lose the facts those events made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Partial {
    /// Rebuilds them from the events kept (`allow_partial`).
    Allow,
    /// Refuses the whole rebuild, naming the first (`FAILED_PRECONDITION`).
    Refuse,
    /// Leaves them out, listed in [`Round::partial`], and rebuilds the
    /// others (the background rebuilder).
    Skip,
}

/// One try at rebuilding the facts of the customers `pending` names
/// (sorted, each once): a checkpoint (so that the archive holds every event
/// so far), their kept events read off the runtime and folded by the fact
/// rules, the result logged as one write. Customers whose events arrived
/// meanwhile come back as `busy`; customers whose kept events retention
/// thinned are rebuilt, refused or left out as `partial` says.
pub(super) async fn rebuild_once(
    engine: &Arc<Engine>,
    facts: &Arc<Facts>,
    pending: &[String],
    partial: Partial,
) -> Result<Round, Status> {
    let mut out = Round::default();
    engine
        .checkpoint(CheckpointOptions::default())
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    out.events_dropped_to_ms = snap.archive.dropped_to_ms;
    let mut keys = HashMap::new();
    for key in pending {
        match snap.customer_id(key).map_err(to_status)? {
            Some(id) => {
                keys.insert(id, key.clone());
            }
            None => out.not_found.push(key.clone()),
        }
    }
    if keys.is_empty() {
        return Ok(out);
    }
    let fields = fact_fields(&snap);
    let as_of = snap.archive.upto_lsn;
    // The events of customers merged into them are theirs too (kept
    // under the absorbed customers' ids). Where a merge was undone, the
    // two customers' events are kept under either, so those of the
    // customers kept apart from them are read too, and each event goes
    // to the customer its identities name now.
    let mut kept_as: HashMap<u32, u32> = HashMap::new();
    let mut split = false;
    {
        let log = snap.merges.read();
        if !log.is_empty() {
            for &id in keys.keys() {
                for a in log.merged_into(id).into_iter().skip(1) {
                    kept_as.insert(a, id);
                }
                for other in log.apart_from(id) {
                    split = true;
                    for m in log.merged_into(other) {
                        kept_as.entry(m).or_insert(other);
                    }
                }
            }
        }
    }
    if partial != Partial::Allow {
        // A customer's events are kept under its own id and those of the
        // customers merged into it; after an undone merge, under those of
        // the customers kept apart from it as well (any of them, then).
        let mut thinned = Vec::new();
        for &id in keys.keys() {
            let reads = std::iter::once(id).chain(
                kept_as
                    .iter()
                    .filter(|&(_, &to)| split || to == id)
                    .map(|(&from, _)| from),
            );
            if snap.archive.first_partial(reads).is_some() {
                thinned.push(id);
            }
        }
        thinned.sort_unstable();
        if let Some(&first) = thinned.first()
            && partial == Partial::Refuse
        {
            check_archive(&snap, [first], false, "rebuilding")?;
        }
        for id in thinned {
            if let Some(key) = keys.remove(&id) {
                out.partial.push(key);
            }
        }
        out.partial.sort();
        if keys.is_empty() {
            return Ok(out);
        }
    }
    drop(snap);
    let reader = engine.clone();
    let facts = Arc::clone(facts);
    let customers: Vec<String> = keys.values().cloned().collect();
    let never_merge = engine.config().oneid.never_merge.clone();
    let folded = tokio::task::spawn_blocking(move || {
        let ids: RoaringBitmap = keys.keys().chain(kept_as.keys()).copied().collect();
        let mut r = Rebuild::new(&facts, keys);
        let snap = reader.snapshot();
        let mut naming: HashMap<String, u32> = HashMap::new();
        let mut unknown: HashSet<String> = HashSet::new();
        reader.read_archive(&ids, |customer, bytes| {
            let mut customer = kept_as.get(&customer).copied().unwrap_or(customer);
            if split {
                let identities = merging_identities(bytes, &never_merge)
                    .map_err(|why| Error::BadRecord(why.0))?;
                for i in &identities {
                    if naming.contains_key(i) || unknown.contains(i) {
                        continue;
                    }
                    match snap.customer_id(i)? {
                        Some(id) => naming.insert(i.clone(), id),
                        None => {
                            unknown.insert(i.clone());
                            None
                        }
                    };
                }
                match owner(&identities, customer, &naming) {
                    Some(o) => customer = o,
                    None => return Ok(()),
                }
            }
            r.add(customer, bytes)
                .map_err(|why| Error::BadRecord(why.0))?;
            if r.too_large() {
                return Err(Error::invalid(format!(
                    "these customers' kept events make more than {MAX_WRITES} writes; \
                     rebuild fewer customers at once"
                )));
            }
            Ok(())
        })?;
        let counts = std::mem::take(&mut r.counts);
        let why = std::mem::take(&mut r.reasons);
        let kinds = std::mem::take(&mut r.kinds);
        let rebuilt = r.finish(fields.iter().map(|(n, k)| (n.as_str(), *k)));
        Ok::<_, Error>((counts, why, kinds, rebuilt))
    })
    .await
    .map_err(|e| Status::internal(format!("the rebuild task failed: {e}")))?;
    let (counts, why, kinds, Rebuilt { erase, writes }) = folded.map_err(to_status)?;
    let ids: HashMap<&str, u32> = snap_ids(engine, &customers)?;
    ensure_fact_fields(engine, &kinds).await?;
    let r = engine
        .write(WriteOp::RebuildFacts {
            as_of,
            customers: customers.clone(),
            erase,
            writes,
        })
        .await
        .map_err(to_status)?;
    // Events and refusals count for the customers rebuilt: a busy
    // customer's are read again on the next try.
    for key in customers.iter().filter(|k| !r.busy.contains(k)) {
        out.rebuilt += 1;
        if let Some((events, refused)) = ids.get(key.as_str()).and_then(|id| counts.get(id)) {
            out.events += events;
            out.refused += refused;
        }
    }
    out.refusals = why;
    out.values_set = r.values_set;
    out.events_added = r.events_added;
    out.events_expired = r.events_expired;
    out.lsn = r.lsn;
    out.busy = r.busy;
    Ok(out)
}

/// Creates the fields that rebuilt facts write and the store lacks.
pub(super) async fn ensure_fact_fields(
    engine: &crate::storage::Engine,
    kinds: &std::collections::BTreeMap<String, (FactKind, crate::fields::MergeRule)>,
) -> Result<(), Status> {
    for (field, (kind, merge)) in kinds {
        ensure_field(engine, field, *kind, *merge)
            .await
            .map_err(|why| Status::failed_precondition(format!("fact {field:?}: {why}")))?;
    }
    Ok(())
}

/// Refuses to rebuild facts from the kept events of customers (`ids`, as
/// their events are kept) some of whose events retention dropped, unless
/// the caller allows it (`doing`: what would lose them). The refusal names
/// the first such customer.
pub(super) fn check_archive(
    snap: &crate::storage::Snapshot,
    ids: impl IntoIterator<Item = u32>,
    allow_partial: bool,
    doing: &str,
) -> Result<(), Status> {
    if allow_partial {
        return Ok(());
    }
    match snap.archive.first_partial(ids) {
        None => Ok(()),
        Some(id) => Err(Status::failed_precondition(format!(
            "the event archive no longer holds every event of {} (events ingested up to {} \
             were dropped: event_retention_days): {doing} would lose the facts they made; \
             set allow_partial to use the events kept",
            customer_name(snap, id),
            crate::fields::time::format_ms(snap.archive.dropped_to_ms)
        ))),
    }
}

/// A customer's key for messages, or its number when it has none.
fn customer_name(snap: &crate::storage::Snapshot, id: u32) -> String {
    match snap.dict.key_of(id) {
        Ok(Some(k)) => format!("{k:?}"),
        _ => format!("customer #{id}"),
    }
}

/// The store's fields that facts may be: integer and behaviour ones, with
/// the kind of fact each would be.
pub(super) fn fact_fields(snap: &crate::storage::Snapshot) -> Vec<(String, FactKind)> {
    snap.fields
        .values()
        .filter_map(|f| match f.meta.kind {
            FieldKind::Int => Some((f.meta.name.to_string(), FactKind::Integer)),
            FieldKind::Behaviour(_) => Some((f.meta.name.to_string(), FactKind::Behaviour)),
            FieldKind::Enum { .. } => None,
        })
        .collect()
}

/// The ids of `keys` in the current snapshot (the rebuild's customers were
/// all live when it read them; one erased since has no id and no counts).
fn snap_ids<'k>(
    engine: &crate::storage::Engine,
    keys: &'k [String],
) -> Result<HashMap<&'k str, u32>, Status> {
    let snap = engine.snapshot();
    let mut out = HashMap::with_capacity(keys.len());
    for k in keys {
        if let Some(id) = snap.customer_id(k).map_err(to_status)? {
            out.insert(k.as_str(), id);
        }
    }
    Ok(out)
}

/// Most customers the background rebuilder takes in one round.
const DUE_PER_ROUND: usize = 1_000;

/// Starts the background rebuilder: every `every`, the facts of customers
/// due a rebuild ([`Snapshot::rebuild_due`](crate::storage::Snapshot),
/// a refund that came in a later request than its order) are rebuilt from
/// their kept events, at most [`DUE_PER_ROUND`] at a time (taken in id
/// order from where the last round stopped, so that customers who cannot
/// be rebuilt do not hold back the others). A customer some of whose kept
/// events retention dropped is left due (a rebuild would lose the facts
/// those events made; `RebuildFacts` with `allow_partial` clears it); the
/// log says how many wait whenever that number changes.
pub fn start_refund_rebuilder(
    engine: Arc<Engine>,
    facts: Arc<Facts>,
    every: std::time::Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut after: Option<u32> = None;
        let mut per_round = DUE_PER_ROUND;
        let mut said_waiting = 0;
        loop {
            if !super::sleep_unless_closing(every, &mut closing).await {
                return;
            }
            let snap = engine.snapshot();
            if snap.rebuild_due.is_empty() {
                said_waiting = 0;
                continue;
            }
            // Those whose own kept events are thinned wait; the rest (the
            // customers merged into them are checked by the rebuild).
            let due: RoaringBitmap = if snap.archive.partial_unknown {
                RoaringBitmap::new()
            } else {
                &*snap.rebuild_due - &*snap.archive.partial
            };
            let waiting = snap.rebuild_due.len() - due.len();
            if waiting != said_waiting {
                if waiting > 0 {
                    tracing::warn!(
                        waiting,
                        "customers' facts are due a rebuild after refunds, and the event archive \
                         no longer holds every event of theirs (event_retention_days): they wait \
                         for a RebuildFacts with allow_partial"
                    );
                }
                said_waiting = waiting;
            }
            if due.is_empty() {
                continue;
            }
            let start = after.map_or(0, |a| a.saturating_add(1));
            let mut ids: Vec<u32> = due.range(start..).take(per_round).collect();
            if ids.len() < per_round {
                ids.extend(due.range(..start).take(per_round - ids.len()));
            }
            after = ids.last().copied();
            let mut keys = Vec::with_capacity(ids.len());
            for &id in &ids {
                match snap.dict.key_of(id) {
                    Ok(Some(k)) => keys.push(k),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, id, "the key of a customer due a rebuild"),
                }
            }
            drop(snap);
            if keys.is_empty() {
                continue;
            }
            keys.sort();
            keys.dedup();
            match rebuild_once(&engine, &facts, &keys, Partial::Skip).await {
                Ok(r) => {
                    per_round = DUE_PER_ROUND;
                    tracing::info!(
                        rebuilt = r.rebuilt,
                        busy = r.busy.len(),
                        waiting = r.partial.len(),
                        events = r.events,
                        lsn = r.lsn,
                        "facts rebuilt after refunds"
                    );
                }
                Err(s) if s.code() == tonic::Code::Unavailable => return,
                Err(s) => {
                    // Too many writes at once, most likely: fewer next time.
                    per_round = (per_round / 2).max(1);
                    tracing::warn!(
                        error = s.message(),
                        customers = keys.len(),
                        "could not rebuild facts after refunds; trying again shortly"
                    );
                }
            }
        }
    });
}
