//! Saved audiences over gRPC: `CreateAudience` (the query checked and
//! compiled against the current snapshot, the saved audiences it uses
//! named, then one logged write), `DropAudience`, `ListAudiences` (pages,
//! with member counts on the blocking pool when asked); and their
//! snapshots: `TakeSnapshot` (members read on the blocking pool, compared
//! with the audience's last snapshot, one logged write), `ListSnapshots`,
//! `DropSnapshot`.

use std::sync::Arc;

use tonic::Status;

use crate::access::{Grant, Role};

use crate::names::quote_tag_name;
use crate::proto;
use crate::query::{Query, parse, saved_audiences_in};
use crate::server::service::{blocking, invalid};
use crate::server::status::to_status;
use crate::storage::Snapshot;
use crate::storage::record::AudienceDef;
use crate::storage::snapshot::AudienceMeta;
use crate::storage::{Engine, MAX_AUDIENCE_QUERY_BYTES, WriteOp};

/// Most audiences counted by one `ListAudiences`.
const MAX_COUNTED: usize = 1_000;
/// A page of audiences ends once it holds about this many bytes.
const PAGE_BYTES: usize = 4 << 20;

pub(super) async fn create_audience(
    engine: &Engine,
    r: proto::CreateAudienceRequest,
) -> Result<proto::CreateAudienceResponse, Status> {
    if r.query.trim().is_empty() || r.query.len() > MAX_AUDIENCE_QUERY_BYTES {
        return Err(invalid(format!(
            "an audience's query is 1 to {MAX_AUDIENCE_QUERY_BYTES} bytes; this one is {}",
            r.query.len()
        )));
    }
    let (snap, now) = (engine.snapshot(), engine.now_ms());
    let (name, query) = (r.name.clone(), r.query.clone());
    // The query must compile now (every name it uses known, every
    // predicate fitting its field); then the audiences it uses are named
    // for the writer, which refuses a cycle.
    let uses = blocking(move || {
        let expr = parse(&query).map_err(to_status)?;
        let uses = saved_audiences_in(&expr, &snap);
        let mut named = Vec::new();
        expr.tag_names(&mut named);
        if named.contains(&name.as_str()) {
            return Err(invalid(format!(
                "audience {name:?} would use itself: {name} → {name}"
            )));
        }
        Query::from_expr_at(&expr, &snap, now).map_err(to_status)?;
        Ok(uses)
    })
    .await?;
    let res = engine
        .write(WriteOp::PutAudience {
            name: r.name.clone(),
            definition: AudienceDef {
                query: r.query,
                description: r.description,
                owner: r.owner,
                category: r.category,
                uses,
            },
            replace: r.replace,
            kept_current: r.kept_current,
        })
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    let audience = snap
        .audiences
        .get(r.name.as_str())
        .map(|a| info(&snap, a, 0))
        .unwrap_or_default();
    Ok(proto::CreateAudienceResponse {
        audience: Some(audience),
        created: res.created,
        lsn: res.lsn,
    })
}

pub(super) async fn drop_audience(
    engine: &Engine,
    r: proto::DropAudienceRequest,
) -> Result<proto::DropAudienceResponse, Status> {
    let res = engine
        .write(WriteOp::DropAudience { name: r.name })
        .await
        .map_err(to_status)?;
    Ok(proto::DropAudienceResponse { lsn: res.lsn })
}

pub(super) async fn list_audiences(
    engine: &Engine,
    r: proto::ListAudiencesRequest,
) -> Result<proto::ListAudiencesResponse, Status> {
    let limit = match r.limit {
        0 => 100,
        n if n > 1_000 => {
            return Err(invalid(format!(
                "limit {n} is over the page size limit of 1000"
            )));
        }
        n => n as usize,
    };
    if r.counts && limit > MAX_COUNTED {
        return Err(invalid(format!(
            "at most {MAX_COUNTED} audiences are counted at once"
        )));
    }
    let (snap, now) = (engine.snapshot(), engine.now_ms());
    let total = snap.audiences.len() as u64;
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    let after = r.after.as_str();
    for a in snap.audiences.values() {
        if !after.is_empty() && &*a.name <= after {
            continue;
        }
        if !r.category.is_empty() && a.category != r.category {
            continue;
        }
        if page.len() >= limit || bytes > PAGE_BYTES {
            more = true;
            break;
        }
        bytes += a.name.len() + a.query.len() + a.description.len() + a.owner.len();
        page.push(a.clone());
    }
    let counts = if r.counts {
        let snap = snap.clone();
        let names: Vec<String> = page.iter().map(|a| a.name.to_string()).collect();
        blocking(move || {
            let counted = names
                .iter()
                .map(
                    |n| match Query::compile_at(&quote_tag_name(n), &snap, now) {
                        Ok(q) => (q.count(), String::new()),
                        Err(e) => (0, e.to_string()),
                    },
                )
                .collect::<Vec<(u64, String)>>();
            Ok(counted)
        })
        .await?
    } else {
        vec![(0, String::new()); page.len()]
    };
    Ok(proto::ListAudiencesResponse {
        audiences: page
            .iter()
            .zip(counts)
            .map(|(a, (n, error))| {
                let i = info(&snap, a, n);
                proto::AudienceInfo {
                    // A kept audience that its rule could not evaluate
                    // says why (its members stay as they were).
                    error: if error.is_empty() { i.error } else { error },
                    ..i
                }
            })
            .collect(),
        more,
        total,
    })
}

fn info(snap: &Snapshot, a: &AudienceMeta, count: u64) -> proto::AudienceInfo {
    let mut uses = a.uses.clone();
    uses.sort();
    let rule = kept_rule(snap, &a.name);
    proto::AudienceInfo {
        kept_current: rule.is_some(),
        name: a.name.to_string(),
        query: a.query.clone(),
        description: a.description.clone(),
        owner: a.owner.clone(),
        category: a.category.clone(),
        uses,
        created_at_ms: a.created_ms,
        updated_at_ms: a.updated_ms,
        count,
        error: rule
            .filter(|r| !r.stale.is_empty())
            .map(|r| format!("not kept current since: {}", r.stale))
            .unwrap_or_default(),
    }
}

/// The rule that keeps saved audience `name` current, if it is kept.
pub(super) fn kept_rule<'a>(
    snap: &'a Snapshot,
    name: &str,
) -> Option<&'a crate::storage::snapshot::Rule> {
    snap.audiences
        .contains_key(name)
        .then(|| snap.rules.get(name).map(|r| &**r))
        .flatten()
}

/// Keeping an audience current defines, redefines or drops a rule, which
/// takes the admin role (as DefineRule does): refused to a lesser token
/// when `kept_current` is asked or audience `name` is kept now.
pub(super) fn check_kept_role<T>(
    req: &tonic::Request<T>,
    snap: &Snapshot,
    name: &str,
    kept_current: bool,
) -> Result<(), Status> {
    let Some(g) = req.extensions().get::<Arc<Grant>>() else {
        return Ok(());
    };
    if g.role >= Role::Admin || !(kept_current || kept_rule(snap, name).is_some()) {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "saved audience {name:?} kept current is kept by a rule, which needs the admin role; token {:?} has {}",
        g.name, g.role
    )))
}

pub(super) async fn take_snapshot(
    engine: &Engine,
    r: proto::TakeSnapshotRequest,
) -> Result<proto::TakeSnapshotResponse, Status> {
    let (snap, now) = (engine.snapshot(), engine.now_ms());
    let audience = snap
        .audiences
        .get(r.audience.as_str())
        .cloned()
        .ok_or_else(|| to_status(crate::error::Error::AudienceNotFound(r.audience.clone())))?;
    // Its members now, and whether its last snapshot has exactly them.
    // (The query as it was when the members were read.)
    let (members, same_as, taken_lsn, query) = blocking(move || {
        let q =
            Query::compile_at(&quote_tag_name(&audience.name), &snap, now).map_err(to_status)?;
        // Bitmaps whole, container by container: no id is visited one by
        // one (a 50% audience of 10M took 135 ms id by id).
        let sharded = q.members();
        let last = snap
            .snapshots
            .values()
            .rev()
            .find(|s| s.audience == *audience.name);
        let same_as = match last {
            Some(s) if *s.members.get().map_err(to_status)? == sharded => s.id,
            _ => 0,
        };
        let flat = sharded.to_flat().serialize::<croaring::Portable>();
        let members = roaring::RoaringBitmap::deserialize_from(&flat[..]).map_err(|e| {
            Status::internal(format!("the audience's members did not convert: {e}"))
        })?;
        Ok((members, same_as, snap.lsn, audience.query.clone()))
    })
    .await?;
    let res = engine
        .write(WriteOp::TakeSnapshot {
            audience: r.audience,
            query,
            taken_lsn,
            note: r.note,
            members,
            same_as,
        })
        .await
        .map_err(to_status)?;
    let id = res.ids.first().copied().unwrap_or_default();
    let snap = engine.snapshot();
    let snapshot = snap.snapshots.get(&id).map(|s| snapshot_info(s));
    Ok(proto::TakeSnapshotResponse {
        snapshot,
        lsn: res.lsn,
    })
}

pub(super) fn list_snapshots(
    engine: &Engine,
    r: proto::ListSnapshotsRequest,
) -> Result<proto::ListSnapshotsResponse, Status> {
    let limit = match r.limit {
        0 => 100,
        n if n > 10_000 => {
            return Err(invalid(format!(
                "limit {n} is over the page size limit of 10000"
            )));
        }
        n => n as usize,
    };
    let snap = engine.snapshot();
    let mut out = Vec::new();
    let mut more = false;
    let mut bytes = 0;
    for s in snap.snapshots.values() {
        if s.id <= r.after || (!r.audience.is_empty() && s.audience != r.audience) {
            continue;
        }
        if out.len() >= limit || bytes > PAGE_BYTES {
            more = true;
            break;
        }
        bytes += s.audience.len() + s.query.len() + s.note.len() + 64;
        out.push(snapshot_info(s));
    }
    Ok(proto::ListSnapshotsResponse {
        snapshots: out,
        more,
        total: snap.snapshots.len() as u64,
    })
}

pub(super) async fn drop_snapshot(
    engine: &Engine,
    r: proto::DropSnapshotRequest,
) -> Result<proto::DropSnapshotResponse, Status> {
    let res = engine
        .write(WriteOp::DropSnapshot { id: r.id })
        .await
        .map_err(to_status)?;
    Ok(proto::DropSnapshotResponse { lsn: res.lsn })
}

fn snapshot_info(s: &crate::storage::snapshot::AudienceSnapshot) -> proto::SnapshotInfo {
    proto::SnapshotInfo {
        id: s.id,
        audience: s.audience.clone(),
        query: s.query.clone(),
        taken_lsn: s.taken_lsn,
        taken_at_ms: s.at_ms,
        note: s.note.clone(),
        count: s.count,
        shares_with: if s.blob == s.id { 0 } else { s.blob },
    }
}
