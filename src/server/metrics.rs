//! Metrics for operators, in the Prometheus text format on a port of their
//! own (`metrics_listen`; off unless given): every call's count, failures
//! and time (a tower layer around the service counts them), and the
//! store's numbers (customers, tags, rules, log, checkpoints, memory)
//! read from the engine when scraped. It exposes no customer, key, tag or
//! query: call names and store-wide numbers only, so it needs no token.
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
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::storage::Engine;

const SERVICE: &str = "/tagstore.v1.TagStore/";
/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head.
const READ_WITHIN: Duration = Duration::from_secs(5);
/// Connections served at once (others wait to be accepted).
const MAX_CONNECTIONS: usize = 16;

/// Counts of one call.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    failures: AtomicU64,
    micros: AtomicU64,
}

/// Every call's counts, by name (the calls the service has; others are
/// counted as `other`).
pub struct Calls {
    names: Vec<&'static str>,
    counts: Vec<Counts>,
}

impl Calls {
    pub fn new() -> Arc<Self> {
        let names: Vec<&'static str> = crate::access::METHODS.to_vec();
        let counts = (0..=names.len()).map(|_| Counts::default()).collect();
        Arc::new(Self { names, counts })
    }

    fn slot(&self, method: &str) -> &Counts {
        let i = self
            .names
            .iter()
            .position(|n| *n == method)
            .unwrap_or(self.names.len());
        &self.counts[i]
    }

    fn record(&self, method: &str, failed: bool, took: Duration) {
        let c = self.slot(method);
        c.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            c.failures.fetch_add(1, Ordering::Relaxed);
        }
        c.micros.fetch_add(
            took.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
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
                    .is_some_and(|s| s.as_bytes() != b"0");
                calls.record(&method, failed, started.elapsed());
            }
            res
        })
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The metrics as Prometheus text.
fn render(engine: &Engine, calls: &Calls, started: Instant) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(16 << 10);
    let names = calls.names.iter().copied().chain(std::iter::once("other"));
    let rows: Vec<(&str, &Counts)> = names.zip(calls.counts.iter()).collect();
    type Read = fn(&Counts) -> String;
    let per_call: [(&str, &str, Read); 3] = [
        (
            "tagstore_requests_total",
            "gRPC calls answered, by method (refused ones included).",
            |c| c.requests.load(Ordering::Relaxed).to_string(),
        ),
        (
            "tagstore_request_failures_total",
            "gRPC calls that failed before their first message, by method.",
            |c| c.failures.load(Ordering::Relaxed).to_string(),
        ),
        (
            "tagstore_request_seconds_total",
            "Time from a call's arrival to its answer (for streams, to the answer's start), by method.",
            |c| format!("{:.6}", c.micros.load(Ordering::Relaxed) as f64 / 1e6),
        ),
    ];
    for (name, help, read) in per_call {
        family(&mut out, name, "counter", help);
        for (method, c) in &rows {
            let _ = writeln!(out, "{name}{{method=\"{method}\"}} {}", read(c));
        }
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
    let gauges: [(&str, &str, f64); 17] = [
        (
            "tagstore_customers",
            "Live customers.",
            snap.customer_count().unwrap_or(0) as f64,
        ),
        (
            "tagstore_tags",
            "Tags (rule tags included).",
            snap.tags.len() as f64,
        ),
        ("tagstore_fields", "Fields.", snap.fields.len() as f64),
        (
            "tagstore_rules",
            "Rule tags and lifecycles.",
            snap.rules.len() as f64,
        ),
        (
            "tagstore_rules_stale",
            "Rules that could not be evaluated the last time.",
            stale as f64,
        ),
        (
            "tagstore_saved_audiences",
            "Saved audiences.",
            snap.audiences.len() as f64,
        ),
        (
            "tagstore_audience_snapshots",
            "Audience snapshots.",
            snap.snapshots.len() as f64,
        ),
        (
            "tagstore_lsn",
            "Log position of the newest write.",
            snap.lsn as f64,
        ),
        (
            "tagstore_wal_bytes",
            "Bytes of log since the last checkpoint.",
            info.wal_bytes as f64,
        ),
        (
            "tagstore_last_checkpoint_lsn",
            "Log position the last checkpoint covers.",
            info.last_checkpoint_lsn as f64,
        ),
        (
            "tagstore_last_checkpoint_timestamp_seconds",
            "When the last checkpoint was taken (Unix seconds; 0: never).",
            info.last_checkpoint_at_ms as f64 / 1e3,
        ),
        (
            "tagstore_segment_files",
            "Segment files.",
            info.segment_files as f64,
        ),
        (
            "tagstore_storage_failed",
            "1 when storage stopped after a fatal error and refuses writes until restart.",
            if engine.failure().is_some() { 1.0 } else { 0.0 },
        ),
        (
            "tagstore_resident_memory_bytes",
            "Resident memory of the process.",
            super::admin::resident_bytes().unwrap_or(0) as f64,
        ),
        (
            "tagstore_feed_start_lsn",
            "The change feed holds every write after this log position (watchers may resume from it).",
            feed.start.saturating_sub(1) as f64,
        ),
        (
            "tagstore_feed_files",
            "Files of the change feed (0: the feed is off).",
            feed.files.len() as f64,
        ),
        (
            "tagstore_uptime_seconds",
            "Seconds since the server started.",
            started.elapsed().as_secs_f64(),
        ),
    ];
    for (name, help, value) in gauges {
        family(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
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
                    let text =
                        tokio::task::spawn_blocking(move || render(&engine2, &calls, started))
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
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(READ_WITHIN, stream.write_all(reply.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Serves the metrics on `listener` while the runtime runs.
pub fn start(listener: TcpListener, engine: Arc<Engine>, calls: Arc<Calls>) {
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (engine, calls) = (engine.clone(), calls.clone());
            tokio::spawn(async move {
                answer(stream, engine, calls, started).await;
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
