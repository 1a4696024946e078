//! The `Unmerge` call (OneID): checks that the merge can be undone,
//! checkpoints (so the event archive holds every event so far), reads the
//! merged customer's kept events off the runtime, has the ingestion room
//! split them between the two customers and fold each side into facts, and
//! logs the result as one write; if the survivor received events
//! meanwhile, it tries again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use roaring::RoaringBitmap;
use tonic::Status;

use crate::error::Error;
use crate::ingest::rebuild::Rebuild;
use crate::ingest::split::{Kept, Side, split};
use crate::proto;
use crate::server::rebuild::{check_archive, ensure_fact_fields, fact_fields};
use crate::server::service::{Service, invalid};
use crate::server::status::to_status;
use crate::storage::{CheckpointOptions, UNMERGE_REVIVED, UNMERGE_SURVIVOR, WriteOp, undoable};

/// Tries before a survivor whose events keep arriving is given up.
const ATTEMPTS: usize = 4;

/// Most bytes of kept events one unmerge holds in memory (it reads the
/// merged customer's events whole, to go through them in order twice).
pub const MAX_EVENT_BYTES: usize = 256 << 20;

pub(super) async fn unmerge(
    svc: &Service,
    req: proto::UnmergeRequest,
) -> Result<proto::UnmergeResponse, Status> {
    let merge = req.merge_id;
    if merge == 0 {
        return Err(invalid(
            "name the merge to undo: merge_id, as ListMerges gives it (0 is none)",
        ));
    }
    // Refused before the checkpoint when it cannot be done at all.
    undoable(&svc.engine.snapshot(), merge).map_err(to_status)?;
    for _ in 0..ATTEMPTS {
        svc.engine
            .checkpoint(CheckpointOptions::default())
            .await
            .map_err(to_status)?;
        let snap = svc.engine.snapshot();
        check_archive(&snap, req.allow_partial, "undoing the merge")?;
        let entry = undoable(&snap, merge).map_err(to_status)?.entry;
        let (a, s) = (entry.absorbed, entry.survivor);
        let (absorbed, family): (RoaringBitmap, RoaringBitmap) = {
            let log = snap.merges.read();
            (
                log.merged_into(a).into_iter().collect(),
                log.merged_into(s).into_iter().collect(),
            )
        };
        let fields = fact_fields(&snap);
        let as_of = snap.archive.upto_lsn;
        let dropped_to_ms = snap.archive.dropped_to_ms;
        let engine = svc.engine.clone();
        let facts = Arc::clone(&svc.facts);
        let never_merge = svc.engine.config().oneid.never_merge.clone();
        let folded = tokio::task::spawn_blocking(move || {
            read_and_split(
                &engine,
                &facts,
                &never_merge,
                Inputs {
                    absorbed,
                    family,
                    survivor: s,
                    revived: a,
                    moved: entry.moved,
                    fields,
                },
            )
        })
        .await
        .map_err(|e| Status::internal(format!("the unmerge task failed: {e}")))?
        .map_err(to_status)?;
        ensure_fact_fields(&svc.engine, &folded.kinds).await?;
        let r = svc
            .engine
            .write(WriteOp::Unmerge {
                merge,
                as_of,
                identities: folded.identities.clone(),
                erase: folded.erase,
                writes: folded.writes,
            })
            .await
            .map_err(to_status)?;
        if !r.busy.is_empty() {
            continue;
        }
        let now = svc.engine.snapshot();
        let key = |id: u32| -> Result<String, Status> {
            Ok(now.dict.key_of(id).map_err(to_status)?.unwrap_or_default())
        };
        return Ok(proto::UnmergeResponse {
            revived: key(a)?,
            revived_id: a,
            survivor: key(s)?,
            survivor_id: s,
            identities: folded.identities,
            events: folded.events,
            events_revived: folded.events_revived,
            refused: folded.refused,
            refusals: folded.refusals.into_iter().collect(),
            values_set: r.values_set,
            events_added: r.events_added,
            events_expired: r.events_expired,
            lsn: r.lsn,
            events_dropped_to_ms: dropped_to_ms,
        });
    }
    Err(Status::aborted(format!(
        "customer {:?} kept receiving events through {ATTEMPTS} tries, so merge {merge} was not undone; try again",
        svc.engine
            .snapshot()
            .merges
            .read()
            .get(merge)
            .map_or(0, |e| e.survivor)
    )))
}

struct Inputs {
    /// The absorbed customer and those merged into it before.
    absorbed: RoaringBitmap,
    /// The survivor and every customer merged into it.
    family: RoaringBitmap,
    survivor: u32,
    revived: u32,
    moved: Vec<String>,
    fields: Vec<(String, crate::ingest::facts::FactKind)>,
}

struct Folded {
    identities: Vec<String>,
    erase: Vec<String>,
    writes: Vec<crate::storage::ValueWrite>,
    kinds: std::collections::BTreeMap<
        String,
        (crate::ingest::facts::FactKind, crate::fields::MergeRule),
    >,
    events: u64,
    events_revived: u64,
    refused: u64,
    refusals: BTreeSet<String>,
}

/// Reads the family's kept events (in log order), splits them, and folds
/// each side into facts. Blocking: archive reads and decompression.
fn read_and_split(
    engine: &crate::storage::Engine,
    facts: &crate::ingest::facts::Facts,
    never_merge: &HashSet<String>,
    input: Inputs,
) -> Result<Folded, Error> {
    let mut kept: Vec<Kept> = Vec::new();
    let mut bytes = 0usize;
    engine.read_archive(&input.family, |customer, event| {
        bytes += event.len();
        if bytes > MAX_EVENT_BYTES {
            return Err(Error::invalid(format!(
                "the merged customer's kept events pass {} MiB; an unmerge reads them whole",
                MAX_EVENT_BYTES >> 20
            )));
        }
        let k = Kept::new(customer, event.to_vec(), never_merge)
            .map_err(|why| Error::BadRecord(why.0))?;
        kept.push(k);
        Ok(())
    })?;
    // What every identity the events name names now.
    let mut all: Vec<&str> = kept
        .iter()
        .flat_map(|k| k.identities.iter().map(String::as_str))
        .chain(input.moved.iter().map(String::as_str))
        .collect();
    all.sort_unstable();
    all.dedup();
    let snap = engine.snapshot();
    let found = snap.customer_ids(&all)?;
    let naming: HashMap<String, u32> = all
        .iter()
        .zip(found)
        .filter_map(|(k, id)| id.map(|id| (k.to_string(), id)))
        .collect();
    let out = split(
        &kept,
        &input.absorbed,
        input.survivor,
        &input.moved,
        &naming,
    );
    let keys: HashMap<u32, String> = [
        (input.revived, UNMERGE_REVIVED.to_string()),
        (input.survivor, UNMERGE_SURVIVOR.to_string()),
    ]
    .into();
    let mut r = Rebuild::new(facts, keys);
    let mut events_revived = 0;
    for (k, side) in kept.iter().zip(&out.sides) {
        let customer = match side {
            Side::Revived => {
                events_revived += 1;
                input.revived
            }
            Side::Survivor => input.survivor,
            Side::Other => continue,
        };
        r.add(customer, &k.bytes)
            .map_err(|why| Error::BadRecord(why.0))?;
        if r.too_large() {
            return Err(Error::invalid(format!(
                "the merged customer's kept events make more than {} writes",
                crate::ingest::rebuild::MAX_WRITES
            )));
        }
    }
    let counts = std::mem::take(&mut r.counts);
    let refusals = std::mem::take(&mut r.reasons);
    let kinds = std::mem::take(&mut r.kinds);
    let rebuilt = r.finish(input.fields.iter().map(|(n, k)| (n.as_str(), *k)));
    Ok(Folded {
        identities: out.revived,
        erase: rebuilt.erase,
        writes: rebuilt.writes,
        kinds,
        events: kept.len() as u64,
        events_revived,
        refused: counts.values().map(|c| c.1).sum(),
        refusals,
    })
}
