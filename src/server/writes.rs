//! Calls that change tags and memberships: `CreateTag`, `DropTag`,
//! `Update`, `ReplaceMembers`, `DeleteCustomers`, `ResolveCustomers`. Proto
//! in, a write to the engine, proto out; checks request limits on the way.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::names::check_key;
use crate::proto;
use crate::server::service::{Service, blocking, invalid, tag_info};
use crate::server::status::to_status;
use crate::storage::{Mutation, Snapshot, WriteOp};

pub(super) async fn create_tag(
    svc: &Service,
    req: Request<proto::CreateTagRequest>,
) -> Result<Response<proto::CreateTagResponse>, Status> {
    let r = req.into_inner();
    let res = svc
        .engine
        .write(WriteOp::CreateTag {
            name: r.name,
            description: r.description,
            category: r.category,
            if_not_exists: r.if_not_exists,
        })
        .await
        .map_err(to_status)?;
    Ok(Response::new(proto::CreateTagResponse {
        tag: res.tag.as_ref().map(tag_info),
        created: res.created,
    }))
}

pub(super) async fn drop_tag(
    svc: &Service,
    req: Request<proto::DropTagRequest>,
) -> Result<Response<proto::DropTagResponse>, Status> {
    let name = req.into_inner().name;
    let res = svc
        .engine
        .write(WriteOp::DropTag { name })
        .await
        .map_err(to_status)?;
    Ok(Response::new(proto::DropTagResponse {
        member_count: res.member_count,
    }))
}

pub(super) async fn update(
    svc: &Service,
    req: Request<proto::UpdateRequest>,
) -> Result<Response<proto::UpdateResponse>, Status> {
    let r = req.into_inner();
    let keys: usize = r
        .mutations
        .iter()
        .map(|m| m.add.len() + m.remove.len() + m.add_ids.len() + m.remove_ids.len())
        .sum();
    if keys > svc.limits.max_keys_per_request {
        return Err(invalid(format!(
            "update names {keys} customer keys; the limit is {} per request (split the batch)",
            svc.limits.max_keys_per_request
        )));
    }
    let by_key: usize = r
        .mutations
        .iter()
        .map(|m| m.add.len() + m.remove.len())
        .sum();
    let mut mutations: Vec<Mutation> = r
        .mutations
        .into_iter()
        .map(|m| Mutation {
            tag: m.tag,
            add: m.add,
            remove: m.remove,
            add_ids: m.add_ids,
            remove_ids: m.remove_ids,
            ..Default::default()
        })
        .collect();
    if by_key >= RESOLVE_BEFORE_WRITER {
        // Key look-ups are most of a large batch's cost. Done here, the
        // single writer thread only checks the ids, and requests from
        // many clients resolve their keys in parallel.
        let snap = svc.engine.snapshot();
        mutations = if snap.live.is_loaded() {
            resolve_in_halves(mutations, snap).await?
        } else {
            // The live set must first be read from disk: on the blocking pool.
            blocking(move || {
                for m in &mut mutations {
                    m.resolve_in(&snap).map_err(to_status)?;
                }
                Ok(mutations)
            })
            .await?
        };
    }
    let res = svc
        .engine
        .write(WriteOp::Update {
            mutations,
            create_missing_tags: r.create_missing_tags,
        })
        .await
        .map_err(to_status)?;
    Ok(Response::new(proto::UpdateResponse {
        added: res.added,
        removed: res.removed,
        new_customers: res.new_customers,
        lsn: res.lsn,
    }))
}

pub(super) async fn replace_members(
    svc: &Service,
    req: Request<Streaming<proto::ReplaceMembersRequest>>,
) -> Result<Response<proto::ReplaceMembersResponse>, Status> {
    let mut stream = req.into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| invalid("empty stream: the first message must name the tag"))?;
    if first.tag.is_empty() {
        return Err(invalid("the first message must name the tag"));
    }
    // Refused before the upload, not after it.
    if first.create_missing_tag {
        crate::names::check_tag_name(&first.tag).map_err(to_status)?;
    } else if svc.engine.snapshot().tag(&first.tag).is_none() {
        return Err(to_status(Error::TagNotFound(first.tag)));
    }
    let (tag, create_missing_tag) = (first.tag, first.create_missing_tag);
    let limit = svc.limits.max_replace_members;
    let mut customers: Vec<String> = Vec::new();
    let mut msg = proto::ReplaceMembersRequest {
        customers: first.customers,
        last: first.last,
        ..Default::default()
    };
    loop {
        if customers.len() + msg.customers.len() > limit {
            return Err(invalid(format!(
                "replace stream passed the limit of {limit} members (`max_replace_members`); nothing was changed"
            )));
        }
        // Each key is checked as it arrives: a bad one (say 60 MB long)
        // fails the call at once, not after the whole upload.
        for key in &msg.customers {
            check_key(key).map_err(to_status)?;
        }
        customers.extend(msg.customers);
        if msg.last {
            break;
        }
        // A stream that ends without `last` was abandoned (a client that
        // cancelled or crashed, a deadline that passed: the transport may
        // report any of them as a plain end of stream). Nothing changes.
        msg = stream.message().await?.ok_or_else(|| {
            invalid(
                "the stream ended without a message with last = true: it is taken as \
                 abandoned, and the tag was not changed",
            )
        })?;
    }
    let res = svc
        .engine
        .write(WriteOp::Replace {
            tag,
            customers,
            create_missing_tag,
        })
        .await
        .map_err(to_status)?;
    Ok(Response::new(proto::ReplaceMembersResponse {
        member_count: res.member_count,
        added: res.added,
        removed: res.removed,
        new_customers: res.new_customers,
        lsn: res.lsn,
    }))
}

pub(super) async fn delete_customers(
    svc: &Service,
    req: Request<proto::DeleteCustomersRequest>,
) -> Result<Response<proto::DeleteCustomersResponse>, Status> {
    let customers = req.into_inner().customers;
    if customers.len() > svc.limits.max_keys_per_request {
        return Err(invalid(format!(
            "delete names {} customers; the limit is {} per request",
            customers.len(),
            svc.limits.max_keys_per_request
        )));
    }
    let res = svc
        .engine
        .write(WriteOp::DeleteCustomers { customers })
        .await
        .map_err(to_status)?;
    Ok(Response::new(proto::DeleteCustomersResponse {
        deleted: res.deleted,
        lsn: res.lsn,
    }))
}

pub(super) async fn resolve_customers(
    svc: &Service,
    req: Request<proto::ResolveCustomersRequest>,
) -> Result<Response<proto::ResolveCustomersResponse>, Status> {
    let r = req.into_inner();
    if r.customers.is_empty() {
        return Err(invalid("no customers named"));
    }
    if r.customers.len() > svc.limits.max_keys_per_request {
        return Err(invalid(format!(
            "resolve names {} customers; the limit is {} per request",
            r.customers.len(),
            svc.limits.max_keys_per_request
        )));
    }
    if r.create_missing {
        let res = svc
            .engine
            .write(WriteOp::CreateCustomers {
                customers: r.customers,
            })
            .await
            .map_err(to_status)?;
        return Ok(Response::new(proto::ResolveCustomersResponse {
            ids: res.ids.into_iter().map(i64::from).collect(),
            new_customers: res.new_customers,
            lsn: res.lsn,
        }));
    }
    let snap = svc.engine.snapshot();
    let keys = r.customers;
    let ids = blocking(move || {
        let mut refs = Vec::with_capacity(keys.len());
        for key in &keys {
            check_key(key).map_err(to_status)?;
            refs.push(key.as_str());
        }
        snap.customer_ids(&refs)
            .map(|ids| (ids, snap.lsn))
            .map_err(to_status)
    })
    .await?;
    Ok(Response::new(proto::ResolveCustomersResponse {
        ids: ids
            .0
            .into_iter()
            .map(|id| id.map_or(-1, i64::from))
            .collect(),
        new_customers: 0,
        lsn: ids.1,
    }))
}

/// Resolves the keys of `mutations` in `snap` in two halves at once: one on
/// the blocking pool, the other on this thread (a few hundred microseconds
/// for a batch of 1,000 keys).
async fn resolve_in_halves(
    mut mutations: Vec<Mutation>,
    snap: Arc<Snapshot>,
) -> Result<Vec<Mutation>, Status> {
    // The other thread only reads and returns ids; what is kept is allocated
    // here, so that its memory is not stranded in an idle thread's heap.
    let upper: Vec<Mutation> = mutations.iter_mut().map(Mutation::split_off_half).collect();
    let upper = Arc::new(upper);
    let (theirs, keys) = (snap.clone(), upper.clone());
    let other = tokio::task::spawn_blocking(move || {
        keys.iter()
            .map(|m| m.look_up(&theirs))
            .collect::<crate::error::Result<Vec<_>>>()
    });
    for m in &mut mutations {
        m.resolve_in(&snap).map_err(to_status)?;
    }
    let found = other
        .await
        .map_err(|e| Status::internal(format!("key look-up task failed: {e}")))?
        .map_err(to_status)?;
    let upper = Arc::try_unwrap(upper).unwrap_or_else(|shared| (*shared).clone());
    for ((m, mut u), f) in mutations.iter_mut().zip(upper).zip(found) {
        u.take_resolved(f);
        m.append(u);
    }
    Ok(mutations)
}

/// An update naming at least this many customers by key has them looked up
/// on the blocking pool before it reaches the writer thread
/// ([`Mutation::resolve_in`]); below it, the hand-off costs more than the
/// look-ups.
const RESOLVE_BEFORE_WRITER: usize = 256;
