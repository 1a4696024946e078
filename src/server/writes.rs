//! Calls that change tags and memberships: `CreateTag`, `DropTag`,
//! `Update`, `ReplaceMembers`, `DeleteCustomers`, `ResolveCustomers`. Proto
//! in, a write to the engine, proto out; checks request limits on the way.

use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::names::{MAX_KEY_BYTES, check_key};
use crate::proto;
use crate::server::service::{Service, blocking, invalid, next_message, tag_info};
use crate::server::status::to_status;
use crate::storage::{Mutation, WriteOp};

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
    let snap = svc.engine.snapshot();
    Ok(Response::new(proto::CreateTagResponse {
        tag: res.tag.as_ref().map(|m| tag_info(m, &snap)),
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

/// A proto mutation as the engine takes it.
pub(super) fn mutation(m: proto::Mutation) -> Mutation {
    Mutation {
        tag: m.tag,
        add: m.add,
        remove: m.remove,
        add_ids: m.add_ids,
        remove_ids: m.remove_ids,
        ..Default::default()
    }
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
    let mutations: Vec<Mutation> = r.mutations.into_iter().map(mutation).collect();
    let res = svc
        .engine
        .update(mutations, r.create_missing_tags)
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
    let limited = super::scope::limited(&req);
    let mut stream = req.into_inner();
    const UNCHANGED: &str = "the tag was not changed";
    let first = next_message(&mut stream, &svc.limits, UNCHANGED)
        .await?
        .ok_or_else(|| invalid("empty stream: the first message must name the tag"))?;
    if first.tag.is_empty() {
        return Err(invalid("the first message must name the tag"));
    }
    if let Some(g) = limited {
        super::scope::no_new_tags(&g, first.create_missing_tag)?;
        super::scope::check_names(&g, &svc.engine.snapshot(), [first.tag.as_str()])?;
    }
    // Refused before the upload, not after it.
    if first.create_missing_tag {
        crate::names::check_tag_name(&first.tag).map_err(|e| to_status(e.into()))?;
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
        // A key over the length limit (say 60 MB long) fails the call as it
        // arrives, not after the whole upload is buffered; the engine checks
        // every key fully, once, when the write reaches it.
        let too_long = msg.customers.iter().filter(|k| k.len() > MAX_KEY_BYTES);
        if let Some(Err(e)) = too_long.map(|k| check_key(k)).next() {
            return Err(to_status(e.into()));
        }
        customers.extend(msg.customers);
        if msg.last {
            break;
        }
        // A stream that ends without `last` was abandoned (a client that
        // cancelled or crashed, a deadline that passed: the transport may
        // report any of them as a plain end of stream). Nothing changes.
        msg = next_message(&mut stream, &svc.limits, UNCHANGED)
            .await?
            .ok_or_else(|| {
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
            check_key(key).map_err(|e| to_status(e.into()))?;
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
