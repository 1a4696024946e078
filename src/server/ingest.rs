//! Calls that take channel records in: `CreateSource`, `DropSource`,
//! `PauseSource`, `ResumeSource`, `ListSources` and the `Ingest` stream. Definitions are checked by
//! [`crate::ingest`] before the engine keeps them; records are read,
//! normalised and turned into facts there and in [`crate::intake`] (shared
//! with the Kafka consumers), and reach the engine as one
//! [`WriteOp::Ingest`] per batch, so a batch's records and their event ids
//! are logged together. `ListSources` adds each Kafka source's consumer
//! status (`crate::kafka`).
//!
//! An `Ingest` stream keeps at most [`IN_FLIGHT`] batches between reading
//! and answering, and holds each one's bytes (once read, its records'
//! memory, which is many times larger) against the server's request
//! memory budget until it is answered; reading stops (and HTTP/2 flow
//! control holds the client) while either is full, and while the batches
//! of records it holds are more than the writer can use: past
//! [`RECORDS_AHEAD`] batches, [`RECORDS_AHEAD_BYTES`]. Batches are read in
//! order on the blocking pool (a CSV header and the line count carry from
//! one to the next), queued to the writer in the order sent (so they are
//! applied in that order: an add and the remove after it never swap), with
//! many in flight (the writer commits them in groups), and answered in the
//! order sent. A client that goes away leaves
//! the batches already handed to the writer to finish (durably); it learns
//! nothing of them, and may resend them: their events are remembered. The
//! stream sees it gone when it next reads, or, while at the read-ahead
//! bound (every batch it holds then being the writer's), once an answer
//! cannot be sent; it gives back what it holds then.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Limits;
use crate::error::Error;
use crate::ingest::facts::Facts;
use crate::ingest::presets::{self, PRESETS};
use crate::ingest::read::Reader;
use crate::ingest::source::{Format, Source};
use crate::intake::{self, is_about_records};
use crate::proto;
use crate::server::budget::{MemoryBudget, Reservation};
use crate::server::service::{Service, idle_status, invalid};
use crate::server::status::to_status;
use crate::server::writes::mutation;
use crate::storage::merges::MergeEntry;
use crate::storage::record::LoggedMerge;
use crate::storage::snapshot::SourceMeta;
use crate::storage::writer::identify::LinkRefusal;
use crate::storage::{Engine, IngestRecord, Queued, WriteOp};

/// What an idle stream's end says of its batches.
const IDLE_NOTE: &str = "every batch answered before this was applied, none after";

/// Batches of one stream between reading and answering. A service that
/// sends one change per batch keeps many in flight (the harness: 64 per
/// client), and every one of them should reach the writer's next group;
/// their bytes are bounded by the request memory budget, not by this.
pub const IN_FLIGHT: usize = 128;
/// Batches of records one stream keeps read ahead of their answers in any
/// case: the writer applies one while the next is read.
pub const RECORDS_AHEAD: usize = 2;
/// Beyond [`RECORDS_AHEAD`] batches, the most memory (as held against the
/// request budget) one stream's read records may hold before it reads
/// another batch: enough for a service's many one-record batches to reach
/// the writer's next group, while large batches are read no further ahead
/// than the writer can use. Read any further, they only hold memory, and
/// the fresh pages they take cost more (the kernel zeroes each) than the
/// reading they overlap: 200,000 orders in 1 MiB batches were read at
/// 90–100 k records/s with all of them read ahead, 112–149 k with two.
pub const RECORDS_AHEAD_BYTES: u64 = 8 << 20;
/// Answers of one stream waiting for the client to read them (an answer
/// may list many rejected records; it holds no budget once built).
pub const ANSWERS_QUEUED: usize = 32;
/// Most records in one batch.
pub const MAX_BATCH_RECORDS: usize = 100_000;

pub type IngestStream = ReceiverStream<Result<proto::IngestResponse, Status>>;

/// Longest `description` a source is listed with, in bytes (a longer one
/// is cut, ending in "…"; the definition has it whole). Without it a
/// definition could be nearly all description, listed twice, and the
/// largest `ListSources` answer would not fit the default message limit.
pub const LISTED_DESCRIPTION_BYTES: usize = 1024;

fn source_info(meta: &SourceMeta) -> proto::SourceInfo {
    // A stored definition was checked when it was created; should it ever
    // not parse (a later version's stricter rule), it is still listed.
    let parsed = Source::parse(&meta.name, &meta.definition).ok();
    let mut description = parsed
        .as_ref()
        .map_or_else(String::new, |s| s.description.clone());
    crate::kafka::cut(&mut description, LISTED_DESCRIPTION_BYTES);
    proto::SourceInfo {
        name: meta.name.to_string(),
        description,
        format: parsed.map_or_else(String::new, |s| format_name(s.format).into()),
        definition: meta.definition.clone(),
        created_at_ms: meta.created_ms,
        updated_at_ms: meta.updated_ms,
        kafka: None,
        paused: meta.paused,
    }
}

/// A consumer's status, with the rejects the store keeps for its source.
fn kafka_status(
    s: crate::kafka::Status,
    rejects: Option<&Arc<std::collections::VecDeque<crate::storage::snapshot::KeptReject>>>,
) -> proto::KafkaSourceStatus {
    proto::KafkaSourceStatus {
        state: s.state.name().into(),
        error: s.error,
        error_at_ms: s.error_at_ms,
        partitions: s
            .partitions
            .into_iter()
            .map(|p| proto::KafkaPartitionStatus {
                topic: p.topic,
                partition: p.partition,
                position: p.position,
                high_watermark: p.high_watermark,
                lag_records: p.lag_records,
                lag_seconds: p.lag_seconds,
            })
            .collect(),
        unlisted_partitions: s.unlisted_partitions,
        lag_records: s.lag_records,
        lag_seconds: s.lag_seconds,
        position_resets: s.position_resets,
        applied: s.applied,
        duplicates: s.duplicates,
        ignored: s.ignored,
        rejected: s.rejected,
        records_per_second: s.records_per_second,
        recent_rejects: rejects
            .iter()
            .flat_map(|k| k.iter())
            .map(|r| proto::KafkaReject {
                topic: r.topic.clone(),
                partition: r.partition,
                offset: r.offset,
                reason: r.reason.clone(),
                at_ms: r.at_ms,
                skipped: r.skipped,
            })
            .collect(),
    }
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Csv => "csv",
        Format::Jsonl => "jsonl",
    }
}

pub(super) async fn create_source(
    engine: &Engine,
    r: proto::CreateSourceRequest,
) -> Result<proto::CreateSourceResponse, Status> {
    let definition = match (r.definition.is_empty(), r.preset.is_empty()) {
        (false, true) => r.definition,
        (true, false) => presets::preset(&r.preset)
            .ok_or_else(|| {
                invalid(format!(
                    "there is no preset {:?}; the presets are {}",
                    r.preset,
                    PRESETS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?
            .to_string(),
        (false, false) => return Err(invalid("give a definition or a preset, not both")),
        (true, true) => return Err(invalid("a source needs a definition (TOML) or a preset")),
    };
    Source::parse(&r.name, &definition).map_err(|e| invalid(e.to_string()))?;
    let res = engine
        .write(WriteOp::PutSource {
            name: r.name.clone(),
            definition,
            replace: r.replace,
        })
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    let meta = snap
        .sources
        .get(r.name.as_str())
        .ok_or_else(|| to_status(Error::SourceNotFound(r.name.clone())))?;
    Ok(proto::CreateSourceResponse {
        source: Some(source_info(meta)),
        created: res.created,
    })
}

/// `PauseSource` and `ResumeSource`: only a source that reads topics.
pub(super) async fn pause_source(
    engine: &Engine,
    name: String,
    paused: bool,
) -> Result<(), Status> {
    let snap = engine.snapshot();
    let meta = snap
        .sources
        .get(name.as_str())
        .ok_or_else(|| to_status(Error::SourceNotFound(name.clone())))?;
    let reads_topics = Source::parse(&meta.name, &meta.definition)
        .map(|s| s.kafka.is_some())
        .unwrap_or(false);
    if !reads_topics {
        return Err(Status::failed_precondition(format!(
            "source {name:?} reads no topics (its definition has no [kafka] table): there is nothing to {}",
            if paused { "pause" } else { "resume" }
        )));
    }
    engine
        .write(WriteOp::PauseSource { name, paused })
        .await
        .map(|_| ())
        .map_err(to_status)
}

pub(super) async fn drop_source(engine: &Engine, name: String) -> Result<(), Status> {
    engine
        .write(WriteOp::DropSource { name })
        .await
        .map(|_| ())
        .map_err(to_status)
}

pub(super) fn list_sources(
    engine: &Engine,
    kafka: Option<&crate::kafka::Consumers>,
) -> proto::ListSourcesResponse {
    let snap = engine.snapshot();
    let mut statuses = kafka.map(|k| k.statuses()).unwrap_or_default();
    proto::ListSourcesResponse {
        sources: snap
            .sources
            .values()
            .map(|m| proto::SourceInfo {
                kafka: statuses
                    .remove(&*m.name)
                    .map(|s| kafka_status(s, snap.rejects.get(&m.name))),
                ..source_info(m)
            })
            .collect(),
        presets: presets_info(),
    }
}

/// The built-in presets, as `ListSources` lists them.
fn presets_info() -> Vec<proto::SourceInfo> {
    PRESETS
        .iter()
        .map(|(name, def)| {
            source_info(&SourceMeta {
                name: Arc::from(*name),
                definition: def.to_string(),
                created_ms: 0,
                updated_ms: 0,
                paused: false,
            })
        })
        .collect()
}

/// A batch read and turned into writes, waiting for the engine.
struct Prepared {
    answer: proto::IngestResponse,
    /// Records to apply, and each one's line: shared with the write, so
    /// that the records at fault can be found when it is refused.
    records: Arc<Vec<IngestRecord>>,
    lines: Vec<u64>,
}

pub(super) async fn ingest(
    svc: &Service,
    req: Request<Streaming<proto::IngestRequest>>,
) -> Result<Response<IngestStream>, Status> {
    let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
    let engine = svc.engine.clone();
    let budget = svc.budget.clone();
    let facts = svc.facts.clone();
    let limits = svc.limits;
    tokio::spawn(drive(engine, budget, facts, limits, req.into_inner(), tx));
    Ok(Response::new(ReceiverStream::new(rx)))
}

type Pending = VecDeque<(Work, Reservation)>;

/// A batch in flight: records are read and prepared by a task of their own;
/// a batch of changes is only waited for (its answer is built when it is at
/// the front), so one change costs no task.
enum Work {
    Records(JoinHandle<Result<proto::IngestResponse, Status>>),
    Changes {
        seq: u64,
        queued: crate::error::Result<Queued>,
    },
}

/// What the stream waits for next.
enum Next {
    Answered(Result<proto::IngestResponse, Status>),
    Batch(Result<Option<proto::IngestRequest>, Status>),
}

/// The answer of the batch at the front, once it is ready (never, if none).
/// Cancel-safe: dropped before it finishes, it leaves the batch as it was.
async fn front_answer(pending: &mut Pending) -> Result<proto::IngestResponse, Status> {
    match pending.front_mut() {
        Some((Work::Records(handle), _)) => handle
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("ingest task failed: {e}")))),
        Some((Work::Changes { seq, queued }, _)) => {
            let res = match queued {
                Ok(q) => q.answer().await,
                Err(e) => Err(std::mem::replace(e, Error::ShuttingDown)),
            };
            change_answer(*seq, res)
        }
        None => std::future::pending().await,
    }
}

/// Reads the stream's batches, hands them to the engine, answers in order.
async fn drive(
    engine: Arc<Engine>,
    budget: Arc<MemoryBudget>,
    facts: Arc<Facts>,
    limits: Limits,
    mut input: Streaming<proto::IngestRequest>,
    tx: mpsc::Sender<Result<proto::IngestResponse, Status>>,
) {
    let mut reader: Option<(String, Reader<Arc<Source>>)> = None;
    let mut pending = Pending::new();
    let max_keys = limits.max_keys_per_request;
    let idle = std::time::Duration::from_secs(limits.stream_idle_seconds.max(1));
    let mut open = true;
    loop {
        if !open && pending.is_empty() {
            return;
        }
        let take = open && pending.len() < IN_FLIGHT && may_read_ahead(&pending);
        // Idle time counts only while nothing is in flight: a client waiting
        // for answers before it sends more is not idle.
        let idle = pending.is_empty().then_some(idle);
        let next = {
            let answered = front_answer(&mut pending);
            let batch = async {
                match (take, idle) {
                    (false, _) => std::future::pending().await,
                    (true, None) => input.message().await,
                    (true, Some(idle)) => tokio::time::timeout(idle, input.message())
                        .await
                        .unwrap_or_else(|_| Err(idle_status(&limits, IDLE_NOTE))),
                }
            };
            tokio::select! {
                biased;
                a = answered => Next::Answered(a),
                b = batch => Next::Batch(b),
            }
        };
        match next {
            Next::Answered(answer) => {
                pending.pop_front();
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
            Next::Batch(Ok(None)) => open = false,
            // Idle for too long: said to the client, if it still listens.
            Next::Batch(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            // The client went away or sent something broken: what is in
            // flight finishes; nobody is left to answer.
            Next::Batch(Err(_)) => return,
            Next::Batch(Ok(Some(batch))) if !batch.changes.is_empty() => {
                let Some(held) = hold(&budget, &mut pending, &tx, change_bytes(&batch)).await
                else {
                    return;
                };
                match changes(&batch, max_keys) {
                    Ok(()) => {
                        // Queued now, so that batches are applied in the
                        // order sent (an add and a later remove of the same
                        // membership must not swap).
                        let seq = batch.seq;
                        let queued = engine.enqueue(WriteOp::Update {
                            mutations: batch.changes.into_iter().map(mutation).collect(),
                            create_missing_tags: batch.create_missing_tags,
                        });
                        pending.push_back((Work::Changes { seq, queued }, held));
                    }
                    Err(status) => return end_with(&mut pending, &tx, status).await,
                }
            }
            Next::Batch(Ok(Some(batch))) => {
                let Some(mut held) = hold(&budget, &mut pending, &tx, batch.data.len()).await
                else {
                    return;
                };
                match prepare(&engine, &facts, &mut reader, batch).await {
                    Ok(prepared) => {
                        // Read, its records hold several times the bytes
                        // they came from: held as well until answered.
                        let parsed: u64 = (prepared.records.iter())
                            .map(|r| r.memory_bytes() as u64)
                            .sum();
                        if let Some(more) = parsed.checked_sub(held.bytes()).filter(|&n| n > 0) {
                            let Some(extra) = hold(&budget, &mut pending, &tx, more as usize).await
                            else {
                                return;
                            };
                            held.absorb(extra);
                        }
                        // Queued now, in the order sent (see above).
                        let queued = (!prepared.records.is_empty()).then(|| {
                            engine.enqueue(WriteOp::Ingest {
                                records: prepared.records.clone(),
                            })
                        });
                        let task = apply(engine.clone(), prepared, queued);
                        pending.push_back((Work::Records(tokio::spawn(task)), held));
                    }
                    Err(status) => return end_with(&mut pending, &tx, status).await,
                }
            }
        }
    }
}

/// Whether the stream may read another batch beside the batches of records
/// it holds unanswered: fewer than [`RECORDS_AHEAD`] of them, or less
/// memory held than [`RECORDS_AHEAD_BYTES`].
fn may_read_ahead(pending: &Pending) -> bool {
    let (mut batches, mut bytes) = (0, 0);
    for (work, held) in pending {
        if let Work::Records(_) = work {
            batches += 1;
            bytes += held.bytes();
        }
    }
    batches < RECORDS_AHEAD || bytes < RECORDS_AHEAD_BYTES
}

/// Answers the batches in flight, in order, then ends the stream with
/// `status`: the client learns what became of everything before the batch
/// that ended it.
async fn end_with(
    pending: &mut Pending,
    tx: &mpsc::Sender<Result<proto::IngestResponse, Status>>,
    status: Status,
) {
    while !pending.is_empty() {
        let answer = front_answer(pending).await;
        pending.pop_front();
        if tx.send(answer).await.is_err() {
            return;
        }
    }
    let _ = tx.send(Err(status)).await;
}

/// [`reserve`], ending the stream when it cannot: `None` means stop.
async fn hold(
    budget: &Arc<MemoryBudget>,
    pending: &mut Pending,
    tx: &mpsc::Sender<Result<proto::IngestResponse, Status>>,
    bytes: usize,
) -> Option<Reservation> {
    match reserve(budget, pending, tx, bytes).await {
        Ok(r) => r,
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            None
        }
    }
}

/// Bytes a batch of changes holds in memory, about.
fn change_bytes(batch: &proto::IngestRequest) -> usize {
    batch
        .changes
        .iter()
        .map(|m| {
            m.tag.len()
                + m.add
                    .iter()
                    .chain(&m.remove)
                    .map(|k| k.len() + 24)
                    .sum::<usize>()
                + 4 * (m.add_ids.len() + m.remove_ids.len())
        })
        .sum()
}

/// Checks a batch of changes before it goes to the engine.
fn changes(batch: &proto::IngestRequest, max_keys: usize) -> Result<(), Status> {
    if !batch.data.is_empty() {
        return Err(invalid(format!(
            "batch {} carries both records (data) and changes; send them in separate batches",
            batch.seq
        )));
    }
    let keys: usize = batch
        .changes
        .iter()
        .map(|m| m.add.len() + m.remove.len() + m.add_ids.len() + m.remove_ids.len())
        .sum();
    if keys > max_keys {
        return Err(invalid(format!(
            "batch {} names {keys} customers; the limit is {max_keys} per batch",
            batch.seq
        )));
    }
    Ok(())
}

/// Completes the answer of a batch of membership changes queued as one
/// `Update`.
fn change_answer(
    seq: u64,
    res: crate::error::Result<crate::storage::WriteResult>,
) -> Result<proto::IngestResponse, Status> {
    let mut answer = proto::IngestResponse {
        seq,
        ..Default::default()
    };
    match res {
        Ok(r) => {
            answer.accepted = 1;
            answer.added = r.added;
            answer.removed = r.removed;
            answer.new_customers = r.new_customers;
            answer.lsn = r.lsn;
            Ok(answer)
        }
        Err(e) if is_about_records(&e) || is_about_changes(&e) => {
            answer.rejected.push(proto::RejectedRecord {
                line: 0,
                reason: e.to_string(),
            });
            Ok(answer)
        }
        Err(e) => Err(to_status(e)),
    }
}

/// Errors of a batch of changes that concern the changes, not the store.
fn is_about_changes(e: &Error) -> bool {
    matches!(
        e,
        Error::TagNotFound(_) | Error::CustomerIdNotFound(_) | Error::FieldExists(_)
    )
}

/// Holds `bytes` of the request budget for a batch until it is answered.
/// While the budget is full, answers this stream's batches in flight (which
/// gives their bytes back) and tries again; with none in flight it gives up
/// with `RESOURCE_EXHAUSTED`. `Ok(None)`: the client went away meanwhile.
async fn reserve(
    budget: &Arc<MemoryBudget>,
    pending: &mut Pending,
    tx: &mpsc::Sender<Result<proto::IngestResponse, Status>>,
    bytes: usize,
) -> Result<Option<Reservation>, Status> {
    loop {
        if let Some(r) = Reservation::take(budget, bytes as u64) {
            return Ok(Some(r));
        }
        if pending.is_empty() {
            return Err(Status::resource_exhausted(format!(
                "a batch needs {} KiB of the server's memory for requests in flight \
                 ({} MiB, `max_request_memory_mb`, with what other calls hold) and cannot have \
                 it; send smaller batches or retry later",
                bytes.div_ceil(1024),
                budget.limit() >> 20
            )));
        }
        let answer = front_answer(pending).await;
        pending.pop_front();
        let failed = answer.is_err();
        if tx.send(answer).await.is_err() || failed {
            return Ok(None);
        }
    }
}

/// Reads one batch (on the blocking pool) and turns its events into writes.
async fn prepare(
    engine: &Engine,
    facts: &Facts,
    reader: &mut Option<(String, Reader<Arc<Source>>)>,
    batch: proto::IngestRequest,
) -> Result<Prepared, Status> {
    let name = match (reader.as_ref(), batch.source.is_empty()) {
        (None, true) => return Err(invalid("the stream's first batch must name its source")),
        (None, false) => batch.source.clone(),
        (Some((current, _)), true) => current.clone(),
        (Some((current, _)), false) if *current == batch.source => current.clone(),
        (Some((current, _)), false) => {
            return Err(invalid(format!(
                "batch {} names source {:?}; this stream is of {current:?} (one source per stream)",
                batch.seq, batch.source
            )));
        }
    };
    let mut current = match reader.take() {
        Some((_, r)) => r,
        None => {
            let snap = engine.snapshot();
            let meta = snap
                .sources
                .get(name.as_str())
                .ok_or_else(|| to_status(Error::SourceNotFound(name.clone())))?;
            let source = Source::parse(&name, &meta.definition).map_err(|e| {
                Status::failed_precondition(format!("the stored definition no longer checks: {e}"))
            })?;
            Reader::new(Arc::new(source))
        }
    };
    let data = batch.data;
    let (current, reads) = tokio::task::spawn_blocking(move || {
        let reads = current.feed(&data);
        (current, reads)
    })
    .await
    .map_err(|e| Status::internal(format!("ingest read task failed: {e}")))?;
    let reads = reads.map_err(|e| invalid(format!("batch {}: {e}", batch.seq)))?;
    if reads.len() > MAX_BATCH_RECORDS {
        return Err(invalid(format!(
            "batch {} holds {} records; at most {MAX_BATCH_RECORDS} (send smaller batches)",
            batch.seq,
            reads.len()
        )));
    }
    let source = current.source().clone();
    *reader = Some((name.clone(), current));

    let prepared = intake::prepare(engine, facts, &source, reads).await;
    let answer = proto::IngestResponse {
        seq: batch.seq,
        ignored: prepared.ignored,
        rejected: prepared
            .rejected
            .into_iter()
            .map(|r| proto::RejectedRecord {
                line: r.line,
                reason: r.reason,
            })
            .collect(),
        ..Default::default()
    };
    let (lines, records) = prepared.records.into_iter().unzip();
    Ok(Prepared {
        answer,
        records: Arc::new(records),
        lines,
    })
}

/// `Link`: one ingested record with the identities and nothing else, so
/// that linking, merges and guard rails are ingestion's own.
pub(super) async fn link(
    svc: &Service,
    req: Request<proto::LinkRequest>,
) -> Result<Response<proto::LinkResponse>, Status> {
    let r = req.into_inner();
    if r.identities.is_empty() || r.identities.len() > crate::ingest::event::MAX_IDENTITIES {
        return Err(invalid(format!(
            "a link names 1 to {} identities, not {}",
            crate::ingest::event::MAX_IDENTITIES,
            r.identities.len()
        )));
    }
    let mut identities = Vec::with_capacity(r.identities.len());
    for text in &r.identities {
        let key = crate::ingest::event::identity_from_text(text).map_err(|e| invalid(e.0))?;
        if !identities.contains(&key) {
            identities.push(key);
        }
    }
    let place = if r.channel.is_empty() {
        "link".to_string()
    } else {
        crate::ingest::event::check_name("channel", &r.channel).map_err(|e| invalid(e.0))?;
        r.channel
    };
    let engine = &svc.engine;
    let res = engine
        .write(WriteOp::Ingest {
            records: vec![IngestRecord {
                refund: None,
                unless_refunded: Vec::new(),
                order: None,
                seen: None,
                identities: identities.clone(),
                place,
                at_ms: engine.now_ms(),
                writes: Vec::new(),
                event: None,
            }]
            .into(),
        })
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    let mut customer_id = None;
    for key in &identities {
        if let Some(id) = snap.customer_id(key).map_err(to_status)? {
            customer_id = Some(id);
            break;
        }
    }
    let customer_id =
        customer_id.ok_or_else(|| Status::aborted("the customer was erased as it was linked"))?;
    let mut answer = proto::IngestResponse::default();
    report_merges(engine, &res.merges, &mut answer, &mut 0)?;
    report_refusals(&res.refusals, |_| 0, &mut answer);
    Ok(Response::new(proto::LinkResponse {
        customer: snap
            .dict
            .key_of(customer_id)
            .map_err(to_status)?
            .unwrap_or_default(),
        customer_id,
        created: res.new_customers > 0,
        identities_linked: res.identities_linked,
        merges: answer.merges,
        refused: answer.refused_links,
        lsn: res.lsn,
    }))
}

/// Most merges, and most refusals, one answer lists (the rest are counted).
const MAX_LISTED: usize = 10_000;
/// About the most bytes of merges one answer lists (a merge lists the
/// identities it moved).
const MAX_LISTED_BYTES: usize = 4 << 20;

fn merge_bytes(m: &proto::CustomerMerge) -> usize {
    64 + m.survivor.len()
        + m.absorbed.len()
        + m.via.len()
        + m.refused.len()
        + m.moved.iter().map(|i| i.len() + 2).sum::<usize>()
}

/// Adds the guard rails' refusals to the answer (`line` gives a record's
/// line from its index in the write).
fn report_refusals(
    refusals: &[LinkRefusal],
    line: impl Fn(u32) -> u64,
    answer: &mut proto::IngestResponse,
) {
    for r in refusals {
        if answer.refused_links.len() >= MAX_LISTED {
            answer.refused_links_omitted += 1;
            continue;
        }
        answer.refused_links.push(proto::RefusedLink {
            line: line(r.record),
            identity: r.identity.clone(),
            reason: r.reason.clone(),
        });
    }
    // Records are planned in line order, so refusals come in line order.
}

/// Adds `merges` to the answer, naming customers by their keys.
fn report_merges(
    engine: &Engine,
    merges: &[LoggedMerge],
    answer: &mut proto::IngestResponse,
    bytes: &mut usize,
) -> Result<(), Status> {
    if merges.is_empty() {
        return Ok(());
    }
    let snap = engine.snapshot();
    for m in merges {
        if answer.merges.len() >= MAX_LISTED || *bytes > MAX_LISTED_BYTES {
            answer.merges_omitted += 1;
            continue;
        }
        answer.merges.push(merge_info(
            &snap,
            &MergeEntry {
                id: m.id,
                lsn: 0,
                at_ms: 0,
                survivor: m.survivor,
                absorbed: m.absorbed,
                via: m.via.clone(),
                refused: m.refused.clone(),
                moved: m.moved.clone(),
                undo: Default::default(),
                undone_lsn: 0,
                undone_ms: 0,
            },
        )?);
        *bytes += answer.merges.last().map_or(0, merge_bytes);
    }
    Ok(())
}

/// A merge as clients see it: customers by their keys (an absorbed
/// customer keeps its key in the dictionary until a merge of its sections).
pub(super) fn merge_info(
    snap: &crate::storage::Snapshot,
    m: &MergeEntry,
) -> Result<proto::CustomerMerge, Status> {
    let key = |id: u32| -> Result<String, Status> {
        Ok(snap.dict.key_of(id).map_err(to_status)?.unwrap_or_default())
    };
    Ok(proto::CustomerMerge {
        merge_id: m.id,
        survivor: key(m.survivor)?,
        survivor_id: m.survivor,
        absorbed: key(m.absorbed)?,
        absorbed_id: m.absorbed,
        via: m.via.clone(),
        refused: m.refused.clone(),
        moved: m.moved.clone(),
        undone_ms: m.undone_ms,
        split: m.is_split(),
    })
}

/// Writes a prepared batch and completes its answer.
async fn apply(
    engine: Arc<Engine>,
    p: Prepared,
    queued: Option<crate::error::Result<Queued>>,
) -> Result<proto::IngestResponse, Status> {
    let Prepared {
        mut answer,
        records,
        lines,
    } = p;
    let Some(queued) = queued else {
        return Ok(answer);
    };
    let n = records.len() as u64;
    let res = match queued {
        Ok(q) => engine.answer(q).await,
        Err(e) => Err(e),
    };
    match res {
        Ok(r) => {
            answer.duplicates = r.duplicates.len() as u64;
            answer.accepted = n - answer.duplicates;
            answer.new_customers = r.new_customers;
            answer.lsn = r.lsn;
            answer.identities_linked = r.identities_linked;
            report_merges(&engine, &r.merges, &mut answer, &mut 0)?;
            report_refusals(&r.refusals, |i| lines[i as usize], &mut answer);
            Ok(answer)
        }
        Err(e) if is_about_records(&e) => {
            // One at a time, to find the records at fault.
            let mut listed = 0;
            for (line, record) in lines.into_iter().zip(records.iter()) {
                match engine
                    .write(WriteOp::Ingest {
                        records: Arc::new(vec![record.clone()]),
                    })
                    .await
                {
                    Ok(r) => {
                        let dup = r.duplicates.len() as u64;
                        answer.duplicates += dup;
                        answer.accepted += 1 - dup;
                        answer.new_customers += r.new_customers;
                        answer.lsn = answer.lsn.max(r.lsn);
                        answer.identities_linked += r.identities_linked;
                        report_merges(&engine, &r.merges, &mut answer, &mut listed)?;
                        report_refusals(&r.refusals, |_| line, &mut answer);
                    }
                    Err(e) if is_about_records(&e) => answer.rejected.push(proto::RejectedRecord {
                        line,
                        reason: e.to_string(),
                    }),
                    Err(e) => return Err(to_status(e)),
                }
            }
            answer.rejected.sort_by_key(|r| r.line);
            Ok(answer)
        }
        Err(e) => Err(to_status(e)),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// `ListSources` is not paged: with every source as large as the store
    /// lets it be (the longest name; a definition of the longest length,
    /// nearly all of it description; a Kafka status listing the most
    /// partitions, each of a topic of the longest name, the longest error
    /// and the most kept rejects with the longest reasons), the answer must
    /// still fit the server's default message limit.
    #[test]
    fn the_largest_list_of_sources_fits_the_default_message_limit() {
        use crate::storage::writer::ops::{MAX_SOURCE_DEFINITION_BYTES, MAX_SOURCES};
        let preset = presets::preset("taobao_orders").unwrap();
        let start = preset.find("description = ").unwrap();
        let end = start + preset[start..].find('\n').unwrap();
        let rest = preset.len() - (end - start);
        let filler = MAX_SOURCE_DEFINITION_BYTES - rest - "description = \"\"".len();
        let definition = format!(
            "{}description = \"{}\"{}",
            &preset[..start],
            "说".repeat(filler / 3),
            &preset[end..]
        );
        let name = "s".repeat(crate::ingest::event::MAX_NAME_BYTES);
        Source::parse(&name, &definition).unwrap();
        assert!(definition.len() > MAX_SOURCE_DEFINITION_BYTES - 3);
        let meta = SourceMeta {
            name: Arc::from(name.as_str()),
            definition,
            created_ms: i64::MAX,
            updated_ms: i64::MAX,
            paused: true,
        };
        let topic = |i: usize| format!("{i:03}{}", "t".repeat(246));
        let status = crate::kafka::Status {
            state: crate::kafka::State::Retrying,
            error: "e".repeat(crate::kafka::ERROR_BYTES),
            error_at_ms: i64::MAX,
            error_from_brokers: true,
            partitions: (0..crate::kafka::LISTED_PARTITIONS)
                .map(|i| crate::kafka::PartitionStatus {
                    topic: topic(i % crate::ingest::kafka::MAX_TOPICS),
                    partition: i32::MAX,
                    position: i64::MAX,
                    high_watermark: i64::MAX,
                    lag_records: i64::MAX,
                    lag_seconds: f64::MAX,
                })
                .collect(),
            unlisted_partitions: u64::MAX,
            lag_records: i64::MAX,
            lag_seconds: f64::MAX,
            applied: u64::MAX,
            duplicates: u64::MAX,
            ignored: u64::MAX,
            rejected: u64::MAX,
            position_resets: u64::MAX,
            records_per_second: f64::MAX,
        };
        let rejects = Arc::new(
            (0..crate::storage::snapshot::KEPT_REJECTS)
                .map(|i| crate::storage::snapshot::KeptReject {
                    skipped: true,
                    topic: topic(i),
                    partition: i32::MAX,
                    offset: i64::MAX,
                    at_ms: i64::MAX,
                    reason: "r".repeat(crate::storage::record::MAX_REJECT_REASON),
                })
                .collect::<std::collections::VecDeque<_>>(),
        );
        let one = proto::SourceInfo {
            kafka: Some(kafka_status(status, Some(&rejects))),
            ..source_info(&meta)
        };
        assert_eq!(one.definition, meta.definition, "the definition whole");
        assert!(one.description.len() <= LISTED_DESCRIPTION_BYTES);
        assert!(one.description.ends_with('…'), "{}", one.description);
        let answer = proto::ListSourcesResponse {
            sources: vec![one; MAX_SOURCES],
            presets: presets_info(),
        };
        let bytes = answer.encoded_len();
        let limit = crate::config::Limits::default().max_message_bytes;
        assert!(
            bytes <= limit,
            "the largest ListSources answer is {bytes} bytes, over the default limit of {limit}"
        );
    }
}
