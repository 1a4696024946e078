//! The `tagstore.v1.TagStore` service: proto in, domain calls, proto out.
//! Checks request limits here; everything else is the engine's or the query
//! engine's job. CPU-heavy reads run on the blocking pool so that one large
//! query does not stall the connections served by the async workers.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};

use crate::config::Limits;
use crate::error::Error;
use crate::names::check_key;
use crate::proto;
use crate::proto::tag_store_server::TagStore;
use crate::query::Query;
use crate::query::eval::ShardClaims;
use crate::server::budget::ExportSlots;
use crate::server::export::ExportStream;
use crate::server::fields;
use crate::server::status::{query_status, to_status};
use crate::storage::{CheckpointOptions, Engine, Mutation, Snapshot, TagMeta, WriteOp};

/// Page size of `Members` when the request gives none.
pub const DEFAULT_PAGE: u32 = 1_000;
/// Largest page of `Members` and batch of `Export`.
pub const MAX_PAGE: u32 = 100_000;
/// Batch size of `Export` when the request gives none.
pub const DEFAULT_EXPORT_BATCH: u32 = 10_000;

pub struct Service {
    engine: Arc<Engine>,
    limits: Limits,
    started: Instant,
    /// Time zone of behaviour fields created without one.
    default_time_zone: String,
    exports: Arc<ExportSlots>,
}

impl Service {
    pub fn new(engine: Arc<Engine>, limits: Limits, default_time_zone: String) -> Self {
        Self {
            engine,
            limits,
            started: Instant::now(),
            default_time_zone,
            exports: ExportSlots::new(limits.max_concurrent_exports),
        }
    }
}

fn tag_info(m: &TagMeta) -> proto::TagInfo {
    proto::TagInfo {
        name: m.name.to_string(),
        description: m.description.clone(),
        category: m.category.clone(),
        created_at_ms: m.created_ms,
        updated_at_ms: m.updated_ms,
        member_count: m.count,
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    to_status(Error::invalid(msg))
}

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

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("query task failed: {e}")))?
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

#[tonic::async_trait]
impl TagStore for Service {
    async fn create_tag(
        &self,
        req: Request<proto::CreateTagRequest>,
    ) -> Result<Response<proto::CreateTagResponse>, Status> {
        let r = req.into_inner();
        let res = self
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

    async fn drop_tag(
        &self,
        req: Request<proto::DropTagRequest>,
    ) -> Result<Response<proto::DropTagResponse>, Status> {
        let name = req.into_inner().name;
        let res = self
            .engine
            .write(WriteOp::DropTag { name })
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DropTagResponse {
            member_count: res.member_count,
        }))
    }

    async fn list_tags(
        &self,
        req: Request<proto::ListTagsRequest>,
    ) -> Result<Response<proto::ListTagsResponse>, Status> {
        let category = req.into_inner().category;
        let snap = self.engine.snapshot();
        let tags = snap
            .tags
            .values()
            .filter(|t| category.is_empty() || t.meta.category == category)
            .map(|t| tag_info(&t.meta))
            .collect();
        Ok(Response::new(proto::ListTagsResponse { tags }))
    }

    async fn describe_tag(
        &self,
        req: Request<proto::DescribeTagRequest>,
    ) -> Result<Response<proto::DescribeTagResponse>, Status> {
        let name = req.into_inner().name;
        let snap = self.engine.snapshot();
        let tag = snap
            .tag(&name)
            .ok_or_else(|| to_status(Error::TagNotFound(name.clone())))?;
        Ok(Response::new(proto::DescribeTagResponse {
            tag: Some(tag_info(&tag.meta)),
        }))
    }

    async fn update(
        &self,
        req: Request<proto::UpdateRequest>,
    ) -> Result<Response<proto::UpdateResponse>, Status> {
        let r = req.into_inner();
        let keys: usize = r
            .mutations
            .iter()
            .map(|m| m.add.len() + m.remove.len() + m.add_ids.len() + m.remove_ids.len())
            .sum();
        if keys > self.limits.max_keys_per_request {
            return Err(invalid(format!(
                "update names {keys} customer keys; the limit is {} per request (split the batch)",
                self.limits.max_keys_per_request
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
            let snap = self.engine.snapshot();
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
        let res = self
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

    async fn replace_members(
        &self,
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
        } else if self.engine.snapshot().tag(&first.tag).is_none() {
            return Err(to_status(Error::TagNotFound(first.tag)));
        }
        let (tag, create_missing_tag) = (first.tag, first.create_missing_tag);
        let limit = self.limits.max_replace_members;
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
        let res = self
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

    async fn delete_customers(
        &self,
        req: Request<proto::DeleteCustomersRequest>,
    ) -> Result<Response<proto::DeleteCustomersResponse>, Status> {
        let customers = req.into_inner().customers;
        if customers.len() > self.limits.max_keys_per_request {
            return Err(invalid(format!(
                "delete names {} customers; the limit is {} per request",
                customers.len(),
                self.limits.max_keys_per_request
            )));
        }
        let res = self
            .engine
            .write(WriteOp::DeleteCustomers { customers })
            .await
            .map_err(to_status)?;
        Ok(Response::new(proto::DeleteCustomersResponse {
            deleted: res.deleted,
            lsn: res.lsn,
        }))
    }

    async fn resolve_customers(
        &self,
        req: Request<proto::ResolveCustomersRequest>,
    ) -> Result<Response<proto::ResolveCustomersResponse>, Status> {
        let r = req.into_inner();
        if r.customers.is_empty() {
            return Err(invalid("no customers named"));
        }
        if r.customers.len() > self.limits.max_keys_per_request {
            return Err(invalid(format!(
                "resolve names {} customers; the limit is {} per request",
                r.customers.len(),
                self.limits.max_keys_per_request
            )));
        }
        if r.create_missing {
            let res = self
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
        let snap = self.engine.snapshot();
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

    async fn count(
        &self,
        req: Request<proto::CountRequest>,
    ) -> Result<Response<proto::CountResponse>, Status> {
        let queries = req.into_inner().queries;
        if queries.is_empty() {
            return Err(invalid("no queries to count"));
        }
        if queries.len() > self.limits.max_count_queries {
            return Err(invalid(format!(
                "{} queries in one call; the limit is {}",
                queries.len(),
                self.limits.max_count_queries
            )));
        }
        let bytes: usize = queries.iter().map(String::len).sum();
        if bytes > self.limits.max_count_bytes {
            return Err(invalid(format!(
                "the queries add up to {bytes} bytes; the limit is {} per Count (`max_count_bytes`)",
                self.limits.max_count_bytes
            )));
        }
        let snap = self.engine.snapshot();
        let many = queries.len() > 1;
        let now = self.engine.now_ms();
        // Long texts are parsed and planned on the blocking pool, never on
        // the thread that serves the connections.
        let counting = if bytes > INLINE_TEXT_BYTES {
            Counting::Blocking
        } else {
            count_inline(&queries, &snap, many, now)?
        };
        match counting {
            Counting::Done(counts) => return Ok(Response::new(proto::CountResponse { counts })),
            Counting::Halves => {
                let count = count_halves(snap, &queries[0], now).await?;
                return Ok(Response::new(proto::CountResponse {
                    counts: vec![count],
                }));
            }
            Counting::Blocking => {}
        }
        let pool = tokio::runtime::Handle::current();
        let counts = blocking(move || {
            queries
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let query = Query::compile_at(q, &snap, now)
                        .map_err(|e| query_status(e, many.then_some(i)))?;
                    Ok(if many {
                        query.count()
                    } else {
                        count_split(&query, &snap, q, now, &pool)
                    })
                })
                .collect::<Result<Vec<u64>, Status>>()
        })
        .await?;
        Ok(Response::new(proto::CountResponse { counts }))
    }

    async fn members(
        &self,
        req: Request<proto::MembersRequest>,
    ) -> Result<Response<proto::MembersResponse>, Status> {
        let r = req.into_inner();
        let limit = page_size(r.limit, DEFAULT_PAGE, "limit")?;
        let after = decode_cursor(&r.cursor)?;
        let (snap, now) = (self.engine.snapshot(), self.engine.now_ms());
        let (customers, next) = blocking(move || {
            let q = Query::compile_at(&r.query, &snap, now).map_err(to_status)?;
            let (ids, more) = q.page(after, limit);
            let mut keys = Vec::with_capacity(ids.len());
            snap.dict.keys_of(&ids, &mut keys).map_err(to_status)?;
            let next = if more {
                ids.last().map(|&id| encode_cursor(id))
            } else {
                None
            };
            Ok((keys, next))
        })
        .await?;
        Ok(Response::new(proto::MembersResponse {
            customers,
            next_cursor: next.unwrap_or_default(),
        }))
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        req: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let r = req.into_inner();
        let batch = page_size(r.batch_size, DEFAULT_EXPORT_BATCH, "batch_size")?;
        let slot = self.exports.take()?;
        let snap: Arc<Snapshot> = self.engine.snapshot();
        let now = self.engine.now_ms();
        // Compile and count first, so that a bad query is the call's status,
        // not a stream item.
        let query = r.query;
        let (snap, expr, total) = blocking(move || {
            let expr = crate::query::parse(&query).map_err(to_status)?;
            let total = Query::from_expr_at(&expr, &snap, now)
                .map_err(to_status)?
                .count();
            Ok((snap, expr, total))
        })
        .await?;
        Ok(Response::new(ExportStream::new(
            snap, expr, now, batch, total, slot,
        )))
    }

    async fn profile(
        &self,
        req: Request<proto::ProfileRequest>,
    ) -> Result<Response<proto::ProfileResponse>, Status> {
        let r = req.into_inner();
        let (customer, recent_days) = (r.customer, r.recent_days);
        fields::check_customer(&customer)?;
        let (snap, now) = (self.engine.snapshot(), self.engine.now_ms());
        let resp = blocking(move || {
            let id = snap
                .customer_id(&customer)
                .map_err(to_status)?
                .ok_or_else(|| to_status(Error::CustomerNotFound(customer.clone())))?;
            let tags = snap.tags_of(id).map_err(to_status)?;
            let values = fields::profile_values(&snap, id, recent_days, now)?;
            Ok(proto::ProfileResponse {
                customer,
                tags: tags.iter().map(|t| t.to_string()).collect(),
                internal_id: id,
                values,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn create_field(
        &self,
        req: Request<proto::CreateFieldRequest>,
    ) -> Result<Response<proto::CreateFieldResponse>, Status> {
        fields::create_field(&self.engine, req.into_inner(), &self.default_time_zone)
            .await
            .map(Response::new)
    }

    async fn drop_field(
        &self,
        req: Request<proto::DropFieldRequest>,
    ) -> Result<Response<proto::DropFieldResponse>, Status> {
        fields::drop_field(&self.engine, req.into_inner().name).await?;
        Ok(Response::new(proto::DropFieldResponse {}))
    }

    async fn list_fields(
        &self,
        _req: Request<proto::ListFieldsRequest>,
    ) -> Result<Response<proto::ListFieldsResponse>, Status> {
        fields::list_fields(&self.engine).await.map(Response::new)
    }

    async fn set_values(
        &self,
        req: Request<proto::SetValuesRequest>,
    ) -> Result<Response<proto::SetValuesResponse>, Status> {
        let r = req.into_inner();
        if r.writes.len() > self.limits.max_keys_per_request {
            return Err(invalid(format!(
                "{} writes in one request; the limit is {} (split the batch)",
                r.writes.len(),
                self.limits.max_keys_per_request
            )));
        }
        fields::set_values(&self.engine, r).await.map(Response::new)
    }

    async fn aggregate(
        &self,
        req: Request<proto::AggregateRequest>,
    ) -> Result<Response<proto::AggregateResponse>, Status> {
        fields::aggregate(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn breakdown(
        &self,
        req: Request<proto::BreakdownRequest>,
    ) -> Result<Response<proto::BreakdownResponse>, Status> {
        fields::breakdown(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn top_tags(
        &self,
        req: Request<proto::TopTagsRequest>,
    ) -> Result<Response<proto::TopTagsResponse>, Status> {
        fields::top_tags(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn overlap(
        &self,
        req: Request<proto::OverlapRequest>,
    ) -> Result<Response<proto::OverlapResponse>, Status> {
        fields::overlap(&self.engine, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn stats(
        &self,
        _req: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        let snap = self.engine.snapshot();
        let info = self.engine.info();
        let engine = self.engine.clone();
        let dir = self.engine.config().data_dir.clone();
        let uptime = self.started.elapsed().as_secs();
        let resp = blocking(move || {
            let disk_bytes = engine.disk_bytes();
            let bitmap_bytes = snap
                .tags
                .values()
                .filter(|t| t.bitmap.is_loaded())
                .filter_map(|t| t.bitmap.get().ok())
                .map(|b| b.serialized_size() as u64)
                .sum();
            Ok(proto::StatsResponse {
                customers: snap.customer_count().map_err(to_status)?,
                tags: snap.tags.len() as u64,
                memory_bytes: resident_bytes().unwrap_or(0),
                disk_bytes,
                wal_bytes: info.wal_bytes,
                last_checkpoint_at_ms: info.last_checkpoint_at_ms,
                last_checkpoint_lsn: info.last_checkpoint_lsn,
                lsn: snap.lsn,
                segment_files: info.segment_files,
                dictionary_sections: info.dictionary_sections,
                bitmap_bytes,
                version: env!("CARGO_PKG_VERSION").to_string(),
                data_dir: dir.display().to_string(),
                uptime_seconds: uptime,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn checkpoint(
        &self,
        req: Request<proto::CheckpointRequest>,
    ) -> Result<Response<proto::CheckpointResponse>, Status> {
        let options = CheckpointOptions {
            merge_dictionary: req.get_ref().merge_dictionary,
        };
        let info = self.engine.checkpoint(options).await.map_err(to_status)?;
        Ok(Response::new(proto::CheckpointResponse {
            lsn: info.lsn,
            tags_written: info.tags_written,
            segment_bytes: info.segment_bytes,
            duration_ms: info.duration_ms,
        }))
    }
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

/// A `Count` whose query texts add up to more than this many bytes is
/// parsed on the blocking pool: parsing and planning 64 KiB of text takes
/// milliseconds, which the connections served by the async thread would wait.
const INLINE_TEXT_BYTES: usize = 4 << 10;

/// Queries whose bitmaps are all in memory and touch at most this many ids
/// are counted on the async thread: handing them to the blocking pool costs
/// two thread wake-ups, far more than the work itself. A larger single query
/// is counted on two threads that share out its shards (`count_halves`,
/// `count_split`).
const INLINE_WORK: u64 = 100_000;

/// A single in-memory query up to this many ids is counted on the async
/// thread and a pool thread together (`count_halves`): the async thread's
/// share is about half, all of it when the pool thread is slow to start, so
/// at most a few hundred microseconds to a millisecond. Larger ones go to the
/// blocking pool whole, and are shared out there (`count_split`).
const HALVES_MAX_WORK: u64 = 32_000_000;

/// Counts one query whose plan touches more than [`INLINE_WORK`] ids over two
/// threads: this one and a blocking-pool thread (which compiles the same text
/// again, at the same instant), each taking the next uncounted shard until
/// none is left ([`ShardClaims`]). On an idle server this halves the latency
/// of a large count; a pool thread that wakes late takes fewer shards rather
/// than delaying the answer, and on a busy one this thread counts them all.
fn count_split(
    query: &Query,
    snap: &Arc<Snapshot>,
    text: &str,
    now: i64,
    pool: &tokio::runtime::Handle,
) -> u64 {
    let shards = query.shard_count();
    if query.work() <= INLINE_WORK || shards < 2 {
        return query.count();
    }
    let claims = Arc::new(ShardClaims::new(shards));
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    {
        let (snap, text, claims) = (snap.clone(), text.to_string(), claims.clone());
        pool.spawn_blocking(move || {
            help_count(&snap, &text, now, &claims);
            let _ = tx.send(());
        });
    }
    query.count_claimed(&claims);
    if let Some(total) = claims.total() {
        return total;
    }
    // The helper is still counting a shard it took; wait for it to finish
    // (or to have dropped its sender, should it have failed).
    let _ = rx.recv();
    // A helper that died halfway through a shard leaves that shard uncounted:
    // count the whole query here instead.
    claims.total().unwrap_or_else(|| query.count())
}

/// The second thread's part of a split count: nothing if the first thread
/// has already taken every shard, otherwise the shards it can take.
fn help_count(snap: &Snapshot, text: &str, now: i64, claims: &ShardClaims) {
    if claims.all_claimed() {
        return;
    }
    // The same text compiled a moment ago on the same snapshot; should it
    // fail, this thread takes no shard and the first counts them all.
    if let Ok(q) = Query::compile_at(text, snap, now) {
        q.count_claimed(claims);
    }
}

/// Where [`TagStore::count`] counts its queries.
enum Counting {
    /// Counted already, on the async thread.
    Done(Vec<u64>),
    /// One query, all in memory, too large to count in one go on the async
    /// thread: [`count_halves`].
    Halves,
    /// On the blocking pool: bitmaps to load from disk, field predicates, or
    /// several queries that add up to too much work.
    Blocking,
}

/// Counts a single in-memory query over two threads: this async thread and a
/// blocking-pool thread share out its shards ([`ShardClaims`]), as in
/// [`count_split`]. One hand-off instead of two, and the answer in about half
/// the time on an idle server; the async thread waits for the pool thread
/// only while that is counting a shard it took.
async fn count_halves(snap: Arc<Snapshot>, text: &str, now: i64) -> Result<u64, Status> {
    let (claims, helper) = {
        let query = Query::compile_at(text, &snap, now).map_err(|e| query_status(e, None))?;
        let claims = Arc::new(ShardClaims::new(query.shard_count()));
        let helper = {
            let (snap, text, claims) = (snap.clone(), text.to_string(), claims.clone());
            tokio::task::spawn_blocking(move || help_count(&snap, &text, now, &claims))
        };
        query.count_claimed(&claims);
        (claims, helper)
    };
    if let Some(total) = claims.total() {
        return Ok(total);
    }
    let joined = helper.await;
    match (claims.total(), joined) {
        (Some(total), _) => Ok(total),
        (None, Err(e)) => Err(Status::internal(format!("query task failed: {e}"))),
        (None, Ok(())) => Err(Status::internal("a shard of the count was left uncounted")),
    }
}

/// Decides where `queries` are counted, and counts them right here when that
/// is cheap and cannot block on disk.
fn count_inline(
    queries: &[String],
    snap: &Snapshot,
    many: bool,
    now: i64,
) -> Result<Counting, Status> {
    if !snap.live.is_loaded() {
        return Ok(Counting::Blocking);
    }
    let mut exprs = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let expr = crate::query::parse(q).map_err(|e| query_status(e, many.then_some(i)))?;
        let mut names = Vec::new();
        expr.tag_names(&mut names);
        // Unknown tags are reported by compile; unloaded ones must not be decoded here.
        // Field predicates run the bit-sliced walk: not for the async thread.
        if names
            .iter()
            .any(|n| snap.field(n).is_some() || snap.tag(n).is_some_and(|t| !t.bitmap.is_loaded()))
        {
            return Ok(Counting::Blocking);
        }
        exprs.push(expr);
    }
    let mut compiled = Vec::with_capacity(exprs.len());
    let mut work = 0u64;
    for (i, e) in exprs.iter().enumerate() {
        let q =
            Query::from_expr_at(e, snap, now).map_err(|e| query_status(e, many.then_some(i)))?;
        work = work.saturating_add(q.work());
        if work > INLINE_WORK {
            return Ok(
                if many || q.shard_count() < 2 || q.work() > HALVES_MAX_WORK {
                    Counting::Blocking
                } else {
                    Counting::Halves
                },
            );
        }
        compiled.push(q);
    }
    Ok(Counting::Done(compiled.iter().map(Query::count).collect()))
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

    /// A count big enough to be split over two threads gives the same answer
    /// as counting it in one go.
    #[test]
    fn a_split_count_adds_up() {
        use crate::bitmap::{SHARD_SIZE, ShardedBitmap};
        use roaring::RoaringBitmap;
        let n = 3 * SHARD_SIZE;
        let every = |k: u32| -> RoaringBitmap { (0..n).step_by(k as usize).collect() };
        let (a, b) = (every(3), every(5));
        let expect = (&a & &b).len();
        let snap = Arc::new(Snapshot::in_memory(
            vec![
                ("a".into(), ShardedBitmap::from_roaring(&a)),
                ("b".into(), ShardedBitmap::from_roaring(&b)),
            ],
            ShardedBitmap::from_roaring(&every(1)),
        ));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let query = Query::compile_at("a AND b", &snap, now).unwrap();
        assert!(query.work() > INLINE_WORK && query.shard_count() == 3);
        assert_eq!(
            count_split(&query, &snap, "a AND b", now, rt.handle()),
            expect
        );
        // The same query as the service sees it: counted in halves, one of
        // them on the async thread.
        let text = ["a AND b".to_string()];
        assert!(matches!(
            count_inline(&text, &snap, false, now),
            Ok(Counting::Halves)
        ));
        let halves = rt.block_on(count_halves(snap.clone(), "a AND b", now));
        assert_eq!(halves.unwrap(), expect);
        // Two such queries in one call go to the blocking pool whole.
        let two = ["a AND b".to_string(), "a OR b".to_string()];
        assert!(matches!(
            count_inline(&two, &snap, true, now),
            Ok(Counting::Blocking)
        ));
        let unknown = rt.block_on(count_halves(snap, "a AND nope", now));
        assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    }
}
