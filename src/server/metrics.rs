//! Metrics for operators, in the OpenMetrics text format (which Prometheus
//! reads) on a port of their own (`metrics_listen`; off unless given),
//! written by `prometheus-client`: every call's count, failures by status
//! code and latency histogram (a tower layer around the service counts
//! them); the engine's log-sync and checkpoint histograms, compactions,
//! writes and group commits; and the store's numbers (customers, tags,
//! rules, log, checkpoints, memory by kind, the snapshot's age) read from
//! the engine when scraped; and each Kafka source's consumer: its state,
//! records by outcome, rate, and lag per source and per partition (the
//! partitions its status lists: all, up to 256). It exposes no customer,
//! key, tag or query: call names, source and topic names, and store-wide
//! numbers only, so it needs no token.
//!
//! The endpoint is a small HTTP/1.1 server: `GET /metrics` and nothing
//! else, one request per connection, the request head at most 8 KiB and
//! read within 5 s, at most 16 connections at once; anything else is
//! answered with its status and the connection closed.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::audit::Audit;
use crate::kafka::{Consumers, State as KafkaState};
use crate::server::budget::MemoryBudget;
use crate::storage::Engine;
use crate::storage::meters::{Meters, TimingsRead};

const SERVICE: &str = "/tagstore.v1.TagStore/";
/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head.
const READ_WITHIN: Duration = Duration::from_secs(5);
/// Connections served at once (others wait to be accepted).
const MAX_CONNECTIONS: usize = 16;

/// A call's label: its method, or `other` for a path the service does not
/// have (a client cannot make labels up).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    method: &'static str,
}

/// A failed call's labels: its method and status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    method: &'static str,
    code: &'static str,
}

/// The memory gauge's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// A Kafka source's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

/// A Kafka source's state: one sample per state, 1 for the one it is in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    source: String,
    state: &'static str,
}

/// A Kafka source's records by what became of them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: String,
    outcome: &'static str,
}

/// One partition a Kafka source reads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    source: String,
    topic: String,
    partition: i32,
}

/// Call latencies' buckets: 50 µs to about 13 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
}

/// Every call's counts, failures by status code, and latencies.
pub struct Calls {
    names: Vec<&'static str>,
    requests: Family<CallLabel, Counter>,
    failures: Family<FailureLabels, Counter>,
    seconds: Family<CallLabel, Histogram, fn() -> Histogram>,
}

impl Calls {
    pub fn new() -> Arc<Self> {
        let calls = Self {
            names: crate::access::METHODS.to_vec(),
            requests: Family::default(),
            failures: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        };
        // Every method shows from the start, at 0.
        for method in calls.names.iter().copied().chain(["other"]) {
            let _ = calls.requests.get_or_create(&CallLabel { method });
            let _ = calls.seconds.get_or_create(&CallLabel { method });
        }
        Arc::new(calls)
    }

    fn name(&self, method: &str) -> &'static str {
        self.names
            .iter()
            .copied()
            .find(|n| *n == method)
            .unwrap_or("other")
    }

    fn record(&self, method: &str, code: Option<&'static str>, took: Duration) {
        let method = self.name(method);
        let label = CallLabel { method };
        self.requests.get_or_create(&label).inc();
        self.seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(code) = code {
            self.failures
                .get_or_create(&FailureLabels { method, code })
                .inc();
        }
    }
}

/// The name of a gRPC status code as its header carries it (`5` →
/// `NOT_FOUND`); `UNKNOWN` for anything else.
fn code_name(status: &[u8]) -> &'static str {
    match status {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// The layer that counts calls: around the service, so refused calls
/// (tokens, limits) count too.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Arc<Calls>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, calls: Arc<Calls>) -> Self {
        Self { inner, calls }
    }
}

impl<S: NamedService> NamedService for Counted<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower_service::Service<http::Request<Body>> for Counted<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<S::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let method = path.strip_prefix(SERVICE).unwrap_or(path).to_string();
        let calls = self.calls.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            if let Ok(resp) = &res {
                // A call that fails before its first message answers with
                // its status in the headers (trailers only); a stream that
                // fails later is counted as begun.
                let failed = resp
                    .headers()
                    .get("grpc-status")
                    .filter(|s| s.as_bytes() != b"0")
                    .map(|s| code_name(s.as_bytes()));
                calls.record(&method, failed, started.elapsed());
            }
            res
        })
    }
}

/// A histogram the engine keeps (`storage::meters::Timings`), read when
/// scraped.
struct EngineTimings {
    engine: Arc<Engine>,
    read: fn(&Meters) -> TimingsRead,
}

impl std::fmt::Debug for EngineTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineTimings")
    }
}

impl EncodeMetric for EngineTimings {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = (self.read)(self.engine.meters());
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A gauge of the value given.
fn gauge(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

/// A counter at the value given.
fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// Each Kafka source's consumer, as its status says.
fn register_kafka(r: &mut Registry, consumers: &Consumers) {
    type GaugeF = Gauge<f64, AtomicU64>;
    let state = Family::<StateLabels, Gauge>::default();
    let records = Family::<OutcomeLabels, Counter>::default();
    let resets = Family::<SourceLabel, Counter>::default();
    let rate = Family::<SourceLabel, GaugeF>::default();
    let lag = Family::<SourceLabel, Gauge>::default();
    let lag_seconds = Family::<SourceLabel, GaugeF>::default();
    let part_lag = Family::<PartitionLabels, Gauge>::default();
    let part_lag_seconds = Family::<PartitionLabels, GaugeF>::default();
    let part_position = Family::<PartitionLabels, Gauge>::default();
    for (source, st) in consumers.statuses() {
        for s in [
            KafkaState::Paused,
            KafkaState::Starting,
            KafkaState::Running,
            KafkaState::Retrying,
        ] {
            state
                .get_or_create(&StateLabels {
                    source: source.clone(),
                    state: s.name(),
                })
                .set(i64::from(st.state == s));
        }
        resets
            .get_or_create(&SourceLabel {
                source: source.clone(),
            })
            .inc_by(st.position_resets);
        for (outcome, n) in [
            ("applied", st.applied),
            ("duplicate", st.duplicates),
            ("ignored", st.ignored),
            ("rejected", st.rejected),
        ] {
            records
                .get_or_create(&OutcomeLabels {
                    source: source.clone(),
                    outcome,
                })
                .inc_by(n);
        }
        let label = SourceLabel {
            source: source.clone(),
        };
        rate.get_or_create(&label).set(st.records_per_second);
        lag.get_or_create(&label).set(st.lag_records);
        lag_seconds.get_or_create(&label).set(st.lag_seconds);
        for p in &st.partitions {
            let label = PartitionLabels {
                source: source.clone(),
                topic: p.topic.clone(),
                partition: p.partition,
            };
            part_lag.get_or_create(&label).set(p.lag_records);
            part_lag_seconds.get_or_create(&label).set(p.lag_seconds);
            part_position.get_or_create(&label).set(p.position);
        }
    }
    r.register(
        "tagstore_kafka_source_state",
        "A Kafka source's consumer: 1 for the state it is in (paused, starting, running, retrying)",
        state,
    );
    r.register(
        "tagstore_kafka_records",
        "A Kafka source's records since its consumer started, by outcome (applied, duplicate, ignored, rejected)",
        records,
    );
    r.register(
        "tagstore_kafka_position_resets",
        "Times the brokers did not hold a Kafka source's position and it read on from its start (records skipped)",
        resets,
    );
    r.register(
        "tagstore_kafka_records_per_second",
        "A Kafka source's records consumed a second, over the last 5 s",
        rate,
    );
    r.register(
        "tagstore_kafka_lag_records",
        "A Kafka source's records produced and not yet applied, over all its partitions",
        lag,
    );
    r.register_with_unit(
        "tagstore_kafka_lag",
        "The longest any of a Kafka source's partitions has been behind (0: all caught up)",
        Unit::Seconds,
        lag_seconds,
    );
    r.register(
        "tagstore_kafka_partition_lag_records",
        "A partition's records produced and not yet applied (the partitions a source's status lists: all, up to 256)",
        part_lag,
    );
    r.register_with_unit(
        "tagstore_kafka_partition_lag",
        "Time since a partition was last caught up (0: it is)",
        Unit::Seconds,
        part_lag_seconds,
    );
    r.register(
        "tagstore_kafka_partition_position",
        "The offset of a partition's next record to consume, as logged in the store (-1: none consumed yet)",
        part_position,
    );
}

/// The metrics as OpenMetrics text.
fn render(
    engine: &Arc<Engine>,
    calls: &Calls,
    budget: &MemoryBudget,
    kafka: Option<&Consumers>,
    audit: &Audit,
    started: Instant,
) -> String {
    let mut r = Registry::default();
    r.register(
        "tagstore_requests",
        "gRPC calls answered, by method (refused ones included)",
        calls.requests.clone(),
    );
    r.register(
        "tagstore_request_failures",
        "gRPC calls that failed before their first message, by method and status code",
        calls.failures.clone(),
    );
    r.register_with_unit(
        "tagstore_request_duration",
        "Time from a call's arrival to its answer (for streams, to the answer's start), by method",
        Unit::Seconds,
        calls.seconds.clone(),
    );
    let meters = engine.meters();
    r.register_with_unit(
        "tagstore_log_sync_duration",
        "fdatasync of the write-ahead log (one per group commit with sync = always)",
        Unit::Seconds,
        EngineTimings {
            engine: engine.clone(),
            read: |m| m.log_sync.read(),
        },
    );
    r.register_with_unit(
        "tagstore_checkpoint_duration",
        "Checkpoints that finished, from their start to their manifest (compaction included)",
        Unit::Seconds,
        EngineTimings {
            engine: engine.clone(),
            read: |m| m.checkpoint.read(),
        },
    );
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, value) in [
        (
            "tagstore_checkpoint_failures",
            "Checkpoints that failed (the log kept every write)",
            load(&meters.checkpoints_failed),
        ),
        (
            "tagstore_compacted_segments",
            "Segments compaction emptied into a checkpoint's new one",
            load(&meters.segments_compacted),
        ),
        (
            "tagstore_writes",
            "Write requests the writer took (each call's writes: Update, SetValues, an Ingest batch...)",
            load(&meters.writes),
        ),
        (
            "tagstore_group_commits",
            "Group commits (writes logged and synced together)",
            load(&meters.commits),
        ),
        (
            "tagstore_group_commits_on_caller",
            "Of the group commits, those made on the calling network thread (a small write that found the writer idle and no other writes lately)",
            load(&meters.commits_on_caller),
        ),
        (
            "tagstore_watch_pieces_built",
            "Bitmaps of compact watches built (one write's ids of one tag, value or audience, or a piece of them)",
            load(&crate::server::watch::PIECES_BUILT),
        ),
        (
            "tagstore_watch_pieces_sent",
            "Bitmaps sent to compact watchers (each built one goes to every watcher of it that asks it soon enough)",
            load(&crate::server::watch::PIECES_SENT),
        ),
    ] {
        r.register(name, help, counter(value));
    }
    let snap = engine.snapshot();
    let info = engine.info();
    let stale = snap
        .rules
        .by_name
        .values()
        .filter(|r| !r.stale.is_empty())
        .count();
    let feed = engine.feed_view();
    let (versions, history_bytes) = engine.history();
    let memory = Family::<KindLabel, Gauge<f64, AtomicU64>>::default();
    for (kind, bytes) in [
        ("resident", super::admin::resident_bytes().unwrap_or(0)),
        ("tag_bitmaps", snap.decoded_tag_bytes()),
        ("dictionary", snap.dict.recent_bytes() as u64),
        ("requests_in_flight", budget.used()),
    ] {
        memory.get_or_create(&KindLabel { kind }).set(bytes as f64);
    }
    r.register_with_unit(
        "tagstore_memory",
        "Memory by kind: the process's resident set, the tag bitmaps decoded in memory (their portable size), the customer keys held in memory since the last checkpoint (about; older ones are read in place from segments), request bytes held by calls in flight",
        Unit::Bytes,
        memory,
    );
    let gauges: [(&str, &str, f64); 21] = [
        (
            "tagstore_customers",
            "Live customers",
            snap.customer_count().unwrap_or(0) as f64,
        ),
        (
            "tagstore_tags",
            "Tags (rule tags included)",
            snap.tags.len() as f64,
        ),
        ("tagstore_fields", "Fields", snap.fields.len() as f64),
        (
            "tagstore_facts_rebuilds_due",
            "Customers whose facts are due a rebuild (a refund came after its order)",
            snap.rebuild_due.len() as f64,
        ),
        (
            "tagstore_rules",
            "Rule tags and lifecycles",
            snap.rules.len() as f64,
        ),
        (
            "tagstore_rules_stale",
            "Rules that could not be evaluated the last time",
            stale as f64,
        ),
        (
            "tagstore_saved_audiences",
            "Saved audiences",
            snap.audiences.len() as f64,
        ),
        (
            "tagstore_audience_snapshots",
            "Audience snapshots",
            snap.snapshots.len() as f64,
        ),
        (
            "tagstore_lsn",
            "Log position of the newest write",
            snap.lsn as f64,
        ),
        (
            "tagstore_wal_bytes",
            "Bytes of log since the last checkpoint",
            info.wal_bytes as f64,
        ),
        (
            "tagstore_last_checkpoint_lsn",
            "Log position the last checkpoint covers",
            info.last_checkpoint_lsn as f64,
        ),
        (
            "tagstore_last_checkpoint_timestamp_seconds",
            "When the last checkpoint was taken (Unix seconds; 0: never)",
            info.last_checkpoint_at_ms as f64 / 1e3,
        ),
        (
            "tagstore_segment_files",
            "Segment files",
            info.segment_files as f64,
        ),
        (
            "tagstore_storage_failed",
            "1 when storage stopped after a fatal error and refuses writes until restart",
            if engine.failure().is_some() { 1.0 } else { 0.0 },
        ),
        (
            "tagstore_snapshot_age_seconds",
            "Seconds since readers last got a new snapshot (a write or checkpoint published one)",
            meters.snapshot_age().as_secs_f64(),
        ),
        (
            "tagstore_dictionary_recent_keys",
            "Customer keys held in memory since the last checkpoint (the rest are read in place from segments)",
            snap.dict.recent_len() as f64,
        ),
        (
            "tagstore_feed_start_lsn",
            "The change feed holds every write after this log position (watchers may resume from it)",
            feed.start.saturating_sub(1) as f64,
        ),
        (
            "tagstore_feed_files",
            "Files of the change feed (0: the feed is off)",
            feed.files.len() as f64,
        ),
        (
            "tagstore_history_bytes",
            "Bytes of the store's kept past (history/: daily versions, the segments only they name, the log since the oldest)",
            history_bytes as f64,
        ),
        (
            "tagstore_history_versions",
            "Versions of the store kept for reads as of the past",
            versions.len() as f64,
        ),
        (
            "tagstore_history_begins_lsn",
            "Reads as of a log position before this one are out of range (0: no history)",
            versions.first().map_or(0.0, |v| v.lsn as f64),
        ),
    ];
    for (name, help, value) in gauges {
        r.register(name, help, gauge(value));
    }
    if let Some(k) = kafka {
        register_kafka(&mut r, k);
    }
    match audit.stats() {
        Ok(a) => {
            for (name, help, value) in [
                (
                    "tagstore_audit_bytes",
                    "Bytes of the audit trail's files (audit-*.log), kept for audit_retention_days",
                    a.bytes as f64,
                ),
                (
                    "tagstore_audit_files",
                    "Files of the audit trail",
                    a.files as f64,
                ),
                (
                    "tagstore_audit_failing",
                    "1 while the audit trail cannot be written (calls that read customers are refused until it can)",
                    if a.failing { 1.0 } else { 0.0 },
                ),
            ] {
                r.register(name, help, gauge(value));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the audit trail's files could not be listed")
        }
    }
    r.register(
        "tagstore_uptime_seconds",
        "Seconds since the server started",
        gauge(started.elapsed().as_secs_f64()),
    );
    let mut out = String::with_capacity(32 << 10);
    if let Err(e) = encode(&mut out, &r) {
        out = format!("# metrics could not be written: {e}\n");
    }
    out
}

/// Reads the request head: `None` when it does not end within the limits.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
            if head.len() > MAX_HEAD {
                return None;
            }
        }
    };
    tokio::time::timeout(READ_WITHIN, read).await.ok()??;
    Some(head)
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    engine: Arc<Engine>,
    calls: Arc<Calls>,
    budget: Arc<MemoryBudget>,
    kafka: Option<Arc<Consumers>>,
    audit: Arc<Audit>,
    started: Instant,
) {
    let (status, body) = match read_head(&mut stream).await {
        None => (
            "400 Bad Request",
            "the request head did not end within 8 KiB and 5 s\n".to_string(),
        ),
        Some(head) => {
            let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
            let mut words = line.split(|&b| b == b' ');
            match (words.next(), words.next()) {
                (Some(b"GET"), Some(b"/metrics")) => {
                    let engine2 = engine.clone();
                    let text = tokio::task::spawn_blocking(move || {
                        render(&engine2, &calls, &budget, kafka.as_deref(), &audit, started)
                    })
                    .await
                    .unwrap_or_else(|e| format!("# metrics could not be gathered: {e}\n"));
                    ("200 OK", text)
                }
                (Some(b"GET"), _) => ("404 Not Found", "only /metrics is served here\n".into()),
                _ => (
                    "405 Method Not Allowed",
                    "only GET /metrics is served here\n".into(),
                ),
            }
        }
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(READ_WITHIN, stream.write_all(reply.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Serves the metrics on `listener` until the server starts closing
/// (`closing` turns true).
pub fn start(
    listener: TcpListener,
    engine: Arc<Engine>,
    calls: Arc<Calls>,
    budget: Arc<MemoryBudget>,
    kafka: Option<Arc<Consumers>>,
    audit: Arc<Audit>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = closing.wait_for(|c| *c) => return,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (engine, calls, budget, kafka, audit) = (
                engine.clone(),
                calls.clone(),
                budget.clone(),
                kafka.clone(),
                audit.clone(),
            );
            tokio::spawn(async move {
                answer(stream, engine, calls, budget, kafka, audit, started).await;
                drop(permit);
            });
        }
    });
}

/// Binds the metrics address.
pub async fn bind(addr: SocketAddr) -> crate::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| crate::Error::io(format!("metrics address {addr}"), e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| crate::Error::io(format!("metrics address {addr}"), e))?;
    Ok((listener, bound))
}
