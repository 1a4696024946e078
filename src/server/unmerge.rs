//! The `Unmerge` call (OneID): checks that the merge can be undone (or the
//! identity taken off its customer),
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
use crate::storage::{
    CheckpointOptions, UNMERGE_REVIVED, UNMERGE_SURVIVOR, UnmergeOf, WriteOp, splittable, undoable,
};

/// Tries before a survivor whose events keep arriving is given up.
const ATTEMPTS: usize = 4;

/// Most bytes of kept events one unmerge holds in memory (it reads the
/// merged customer's events whole, to go through them in order twice).
pub const MAX_EVENT_BYTES: usize = 256 << 20;

pub(super) async fn unmerge(
    svc: &Service,
    req: proto::UnmergeRequest,
) -> Result<proto::UnmergeResponse, Status> {
    // What to undo, refused before the checkpoint when it cannot be done.
    let what = match (req.merge_id, req.identity.is_empty()) {
        (0, true) => {
            return Err(invalid(
                "name the merge to undo (merge_id, as ListMerges gives it) or an identity to take off its customer",
            ));
        }
        (merge, true) => Undo::Merge(merge),
        (0, false) => Undo::Identity(
            crate::ingest::event::identity_from_text(&req.identity).map_err(|e| invalid(e.0))?,
        ),
        _ => {
            return Err(invalid(
                "name a merge_id or an identity to take off, not both",
            ));
        }
    };
    match &what {
        Undo::Merge(merge) => {
            undoable(&svc.engine.snapshot(), *merge).map_err(to_status)?;
        }
        Undo::Identity(identity) => {
            splittable(&svc.engine.snapshot(), identity).map_err(to_status)?;
        }
    }
    for _ in 0..ATTEMPTS {
        svc.engine
            .checkpoint(CheckpointOptions::default())
            .await
            .map_err(to_status)?;
        let snap = svc.engine.snapshot();
        // The two sides: the customer that comes back (or is made of the
        // identity) and the one it leaves, with the identities that go
        // back for sure.
        let (of, revived, survivor, moved, absorbed) = match &what {
            Undo::Merge(merge) => {
                let e = undoable(&snap, *merge).map_err(to_status)?.entry;
                let absorbed: RoaringBitmap = snap
                    .merges
                    .read()
                    .merged_into(e.absorbed)
                    .into_iter()
                    .collect();
                (
                    UnmergeOf::Merge(*merge),
                    Some(e.absorbed),
                    e.survivor,
                    e.moved,
                    absorbed,
                )
            }
            Undo::Identity(identity) => {
                let customer = splittable(&snap, identity).map_err(to_status)?;
                (
                    UnmergeOf::Identity {
                        identity: identity.clone(),
                        customer,
                    },
                    None,
                    customer,
                    vec![identity.clone()],
                    RoaringBitmap::new(),
                )
            }
        };
        let family: RoaringBitmap = snap
            .merges
            .read()
            .merged_into(survivor)
            .into_iter()
            .collect();
        check_archive(
            &snap,
            family.iter().chain(absorbed.iter()),
            req.allow_partial,
            "undoing the merge",
        )?;
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
                    survivor,
                    moved,
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
                of,
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
        let a = revived
            .or_else(|| r.ids.first().copied())
            .unwrap_or_default();
        let now = svc.engine.snapshot();
        let key = |id: u32| -> Result<String, Status> {
            Ok(now.dict.key_of(id).map_err(to_status)?.unwrap_or_default())
        };
        return Ok(proto::UnmergeResponse {
            revived: key(a)?,
            revived_id: a,
            survivor: key(survivor)?,
            survivor_id: survivor,
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
        "the customer kept receiving events through {ATTEMPTS} tries, so {} was not undone; try again",
        match &what {
            Undo::Merge(m) => format!("merge {m}"),
            Undo::Identity(i) => format!("taking {i:?} off it"),
        }
    )))
}

/// What a call asks to undo.
enum Undo {
    Merge(u64),
    Identity(String),
}

struct Inputs {
    /// The absorbed customer and those merged into it before (none for an
    /// identity taken off).
    absorbed: RoaringBitmap,
    /// The survivor and every customer merged into it.
    family: RoaringBitmap,
    survivor: u32,
    /// The identities that go back for sure.
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
    // The customer that comes back may have no id yet (one made of an
    // identity): the fold names it by a stand-in id the survivor cannot
    // have, and the writes by the writer's handle.
    let revived = if input.survivor == u32::MAX {
        0
    } else {
        u32::MAX
    };
    let keys: HashMap<u32, String> = [
        (revived, UNMERGE_REVIVED.to_string()),
        (input.survivor, UNMERGE_SURVIVOR.to_string()),
    ]
    .into();
    let mut r = Rebuild::new(facts, keys);
    let mut events_revived = 0;
    for (k, side) in kept.iter().zip(&out.sides) {
        let customer = match side {
            Side::Revived => {
                events_revived += 1;
                revived
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
