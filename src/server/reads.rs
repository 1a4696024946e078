//! Calls that read: `ListTags`, `DescribeTag`, `Count`, `Members`,
//! `Export`, `Profile`. Proto in, a query on one snapshot, proto out; page
//! sizes and cursors live here.

use std::ops::Bound;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto;
use crate::query::Query;
use crate::query::parallel;
use crate::server::export::{ExportNames, ExportStream, Hashing};
use crate::server::fields;
use crate::server::service::{Service, blocking, blocking_until_gone, invalid, tag_info};
use crate::server::status::{query_status, to_status};
use crate::storage::Snapshot;
use crate::storage::merges::MergeEntry;

/// Page size of `Members` when the request gives none.
pub const DEFAULT_PAGE: u32 = 1_000;
/// Largest page of `Members` and batch of `Export`.
pub const MAX_PAGE: u32 = 100_000;
/// Batch size of `Export` when the request gives none.
pub const DEFAULT_EXPORT_BATCH: u32 = 10_000;

/// A cursor names the last id returned: `v1.` then the id in hex.
fn encode_cursor(id: u32) -> String {
    format!("v1.{id:x}")
}

fn decode_cursor(c: &str) -> Result<Option<u32>, Status> {
    if c.is_empty() {
        return Ok(None);
    }
    c.strip_prefix("v1.")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .map(Some)
        .ok_or_else(|| {
            invalid(format!(
                "bad cursor {c:?}: pass back a next_cursor exactly as received"
            ))
        })
}

fn page_size(requested: u32, default: u32, what: &str) -> Result<usize, Status> {
    match requested {
        0 => Ok(default as usize),
        n if n > MAX_PAGE => Err(invalid(format!(
            "{what} {n} is over the limit of {MAX_PAGE}"
        ))),
        n => Ok(n as usize),
    }
}

/// Most bytes of tags one `ListTags` answer holds: a tag may be 4 KiB of
/// description and 16 KiB of rule, and a store may have any number, while
/// a client's usual receive limit is 4 MiB.
const TAGS_PAGE_BYTES: usize = 3584 << 10;

/// `ListTags`: the tags `visible` lets through (the caller's scope), in
/// name order, from after `after`.
pub(super) async fn list_tags(
    svc: &Service,
    req: Request<proto::ListTagsRequest>,
    visible: impl Fn(&Snapshot, &str, &str) -> bool,
) -> Result<Response<proto::ListTagsResponse>, Status> {
    let r = req.into_inner();
    let limit = match r.limit {
        0 => usize::MAX,
        n => n as usize,
    };
    let snap = svc.engine.snapshot();
    let (mut tags, mut bytes, mut more) = (Vec::new(), 0, false);
    let start = match r.after.as_str() {
        "" => Bound::Unbounded,
        after => Bound::Excluded(Arc::<str>::from(after)),
    };
    for (_, t) in snap.tags.range((start, Bound::Unbounded)) {
        if (!r.category.is_empty() && t.meta.category != r.category)
            || !visible(&snap, &t.meta.name, &t.meta.category)
        {
            continue;
        }
        let info = tag_info(&t.meta, &snap);
        let size = prost::Message::encoded_len(&info) + 4;
        if tags.len() >= limit || (!tags.is_empty() && bytes + size > TAGS_PAGE_BYTES) {
            more = true;
            break;
        }
        bytes += size;
        tags.push(info);
    }
    Ok(Response::new(proto::ListTagsResponse { tags, more }))
}

pub(super) async fn describe_tag(
    svc: &Service,
    req: Request<proto::DescribeTagRequest>,
) -> Result<Response<proto::DescribeTagResponse>, Status> {
    let name = req.into_inner().name;
    let snap = svc.engine.snapshot();
    let tag = snap
        .tag(&name)
        .ok_or_else(|| to_status(Error::TagNotFound(name.clone())))?;
    Ok(Response::new(proto::DescribeTagResponse {
        tag: Some(tag_info(&tag.meta, &snap)),
    }))
}

pub(super) async fn count(
    svc: &Service,
    req: Request<proto::CountRequest>,
) -> Result<Response<proto::CountResponse>, Status> {
    let grant = super::scope::limited(&req);
    let r = req.into_inner();
    let queries = r.queries;
    if queries.is_empty() {
        return Err(invalid("no queries to count"));
    }
    if queries.len() > svc.limits.max_count_queries {
        return Err(invalid(format!(
            "{} queries in one call; the limit is {}",
            queries.len(),
            svc.limits.max_count_queries
        )));
    }
    let bytes: usize = queries.iter().map(String::len).sum();
    if bytes > svc.limits.max_count_bytes {
        return Err(invalid(format!(
            "the queries add up to {bytes} bytes; the limit is {} per Count (`max_count_bytes`)",
            svc.limits.max_count_bytes
        )));
    }
    let (snap, now) = super::past::read_at(&svc.engine, r.as_of, grant, &queries).await?;
    let counts = parallel::count(snap, queries, now)
        .await
        .map_err(|f| query_status(f.error, f.index))?;
    Ok(Response::new(proto::CountResponse { counts }))
}

pub(super) async fn members(
    svc: &Service,
    req: Request<proto::MembersRequest>,
) -> Result<Response<proto::MembersResponse>, Status> {
    let grant = super::scope::limited(&req);
    let mut r = req.into_inner();
    let limit = page_size(r.limit, DEFAULT_PAGE, "limit")?;
    let after = decode_cursor(&r.cursor)?;
    let identity_type = identity_type(std::mem::take(&mut r.identity_type))?;
    let (snap, now) = super::past::read_at(
        &svc.engine,
        r.as_of.take(),
        grant,
        std::slice::from_ref(&r.query),
    )
    .await?;
    let (customers, next, without_identity) = blocking_until_gone(move |abandon| {
        let q = Query::compile_at(&r.query, &snap, now).map_err(to_status)?;
        let (ids, more) = q
            .page_until(after, limit, abandon)
            .ok_or_else(|| to_status(Error::Abandoned))?;
        let mut keys = Vec::with_capacity(ids.len());
        let without = snap
            .names_of(&ids, identity_type.as_deref(), &mut keys)
            .map_err(to_status)?;
        let next = if more {
            ids.last().map(|&id| encode_cursor(id))
        } else {
            None
        };
        Ok((keys, next, without))
    })
    .await?;
    Ok(Response::new(proto::MembersResponse {
        customers,
        next_cursor: next.unwrap_or_default(),
        without_identity,
    }))
}

/// An identity type a member page or an export names customers by (`None`:
/// by their keys).
pub(super) fn identity_type(t: String) -> Result<Option<String>, Status> {
    if t.is_empty() {
        return Ok(None);
    }
    crate::ingest::event::check_name("identity type", &t).map_err(|e| invalid(e.0))?;
    Ok(Some(t))
}

pub(super) async fn export(
    svc: &Service,
    req: Request<proto::ExportRequest>,
) -> Result<Response<ExportStream>, Status> {
    let grant = super::scope::limited(&req);
    let mut r = req.into_inner();
    let batch = page_size(r.batch_size, DEFAULT_EXPORT_BATCH, "batch_size")?;
    let identity_type = identity_type(r.identity_type)?;
    let hashing = Hashing::parse(&r.hash, r.hash_upper).map_err(invalid)?;
    if hashing.is_some() && identity_type.is_none() {
        return Err(invalid(
            "a hashed export needs identity_type: the identities whose values are hashed (phone, …)",
        ));
    }
    super::past::moment(r.as_of.as_ref())?;
    let slot = svc.exports.take()?;
    let (snap, now): (Arc<Snapshot>, i64) = super::past::read_at(
        &svc.engine,
        r.as_of.take(),
        grant,
        std::slice::from_ref(&r.query),
    )
    .await?;
    // Compile and count first, so that a bad query is the call's status,
    // not a stream item.
    let query = r.query;
    // A caller gone meanwhile stops the count at its next shard.
    let (snap, expr, total) = blocking_until_gone(move |abandon| {
        let expr = crate::query::parse(&query).map_err(to_status)?;
        let total = Query::from_expr_at(&expr, &snap, now)
            .map_err(to_status)?
            .count_until(abandon)
            .ok_or_else(|| to_status(Error::Abandoned))?;
        Ok((snap, expr, total))
    })
    .await?;
    Ok(Response::new(ExportStream::new(
        snap,
        expr,
        now,
        batch,
        ExportNames {
            identity_type,
            hashing,
        },
        total,
        slot,
    )))
}

pub(super) async fn profile(
    svc: &Service,
    req: Request<proto::ProfileRequest>,
) -> Result<Response<proto::ProfileResponse>, Status> {
    let r = req.into_inner();
    let (customer, recent_days) = (r.customer, r.recent_days);
    fields::check_customer(&customer)?;
    let (snap, now) = (svc.engine.snapshot(), svc.engine.now_ms());
    let resp = blocking(move || {
        let id = snap
            .customer_id(&customer)
            .map_err(to_status)?
            .ok_or_else(|| to_status(Error::CustomerNotFound(customer.clone())))?;
        let tags = snap.tags_of(id).map_err(to_status)?;
        let values = fields::profile_values(&snap, id, recent_days, now)?;
        let key = snap
            .dict
            .key_of(id)
            .map_err(to_status)?
            .ok_or_else(|| to_status(Error::MissingKey(id)))?;
        let identities = snap
            .idents
            .of(id)
            .map_err(to_status)?
            .into_iter()
            .map(|(identity, seen)| proto::CustomerIdentity {
                identity,
                first_channel: seen.place,
                first_seen_ms: seen.first_ms,
            })
            .collect();
        let rule_tags = tags
            .iter()
            .filter(|t| snap.rules.get(t).is_some())
            .map(|t| t.to_string())
            .collect();
        Ok(proto::ProfileResponse {
            customer,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            internal_id: id,
            values,
            key,
            identities,
            rule_tags,
        })
    })
    .await?;
    Ok(Response::new(resp))
}

/// Most merges one `ListMerges` page holds.
const MAX_MERGE_PAGE: u32 = 10_000;
/// About the most bytes one `ListMerges` page holds.
const MAX_MERGE_PAGE_BYTES: usize = 4 << 20;

pub(super) async fn list_merges(
    svc: &Service,
    req: Request<proto::ListMergesRequest>,
) -> Result<Response<proto::ListMergesResponse>, Status> {
    let r = req.into_inner();
    let limit = match r.limit {
        0 => 100,
        n if n > MAX_MERGE_PAGE => {
            return Err(invalid(format!(
                "limit {n} is over the limit of {MAX_MERGE_PAGE}"
            )));
        }
        n => n as usize,
    };
    if !r.customer.is_empty() {
        fields::check_customer(&r.customer)?;
    }
    let snap = svc.engine.snapshot();
    let resp = blocking(move || {
        let only = if r.customer.is_empty() {
            None
        } else {
            Some(
                snap.customer_id(&r.customer)
                    .map_err(to_status)?
                    .ok_or_else(|| to_status(Error::CustomerNotFound(r.customer.clone())))?,
            )
        };
        // Copied out under the lock, which writers take to log merges:
        // a page's worth, found without scanning the log.
        let (page, more, total) = {
            let log = snap.merges.read();
            let total = log.len() as u64;
            let (page, more): (Vec<MergeEntry>, bool) = match only {
                Some(c) => {
                    let (entries, more) = log.entries_into(c, r.after, limit);
                    (entries.into_iter().cloned().collect(), more)
                }
                None => {
                    // Entries are in id order: start past `after`.
                    let from = log.entries().partition_point(|e| e.id <= r.after);
                    let rest = &log.entries()[from..];
                    (
                        rest.iter().take(limit).cloned().collect(),
                        rest.len() > limit,
                    )
                }
            };
            (page, more, total)
        };
        // Far below the message limit whatever the merges moved.
        let mut page = page;
        let mut more = more;
        let mut bytes = 0;
        if let Some(cut) = page.iter().position(|e| {
            bytes += 64
                + e.via.len()
                + e.refused.len()
                + e.moved.iter().map(|m| m.len() + 2).sum::<usize>();
            bytes > MAX_MERGE_PAGE_BYTES
        }) {
            let keep = cut.max(1);
            if keep < page.len() {
                page.truncate(keep);
                more = true;
            }
        }
        let mut merges = Vec::with_capacity(page.len());
        for e in &page {
            merges.push(super::ingest::merge_info(&snap, e)?);
        }
        Ok(proto::ListMergesResponse {
            merges,
            more,
            total,
        })
    })
    .await?;
    Ok(Response::new(resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(0)).unwrap(), Some(0));
        assert_eq!(
            decode_cursor(&encode_cursor(u32::MAX)).unwrap(),
            Some(u32::MAX)
        );
        assert_eq!(decode_cursor("").unwrap(), None);
        assert!(decode_cursor("v2.1").is_err());
        assert!(decode_cursor("v1.zz").is_err());
    }
}
