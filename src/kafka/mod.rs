//! Kafka sources: the server consumes the topics a source's `[kafka]`
//! table names (`crate::ingest::kafka`), exactly once.
//!
//! [`Consumers`] keeps one consumer thread per Kafka source of the store:
//! it looks at the store's sources every half second, starts a consumer for
//! a new one, restarts one whose definition changed and stops one that was
//! dropped. Each consumer ([`consumer`]) reads batches of messages, turns
//! them into writes by the same path as the `Ingest` stream
//! (`crate::intake`), and logs each batch together with the positions it
//! consumed to ([`WriteOp::Consume`](crate::storage::WriteOp::Consume)).
//! It starts every partition from the position the store has logged, so
//! after a crash it resumes exactly after the last record applied, whatever
//! the consumer group's offsets in Kafka say (those are committed too, for
//! the monitoring tools people already use, and never read).
//!
//! This room owns the consumers and their status. It knows nothing of gRPC
//! (the server reads [`Consumers::status`]) and writes to the store only
//! through the engine's write calls.

#[cfg(feature = "kafka")]
pub mod consumer;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::ingest::facts::Facts;
use crate::ingest::source::Source;
use crate::storage::Engine;

/// How often the store's sources are looked at.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Rejected records a source's status lists (the newest; every one is also
/// logged as a warning, and counted).
pub const RECENT_REJECTS: usize = 100;

/// What a consumer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Paused by a call: not consuming until resumed.
    Paused,
    /// Connecting, or finding its topics' partitions.
    Starting,
    /// Consuming (and caught up when every lag is 0).
    Running,
    /// Something is wrong (`error` says what); it retries by itself.
    Retrying,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Paused => "paused",
            State::Starting => "starting",
            State::Running => "running",
            State::Retrying => "retrying",
        }
    }
}

/// One partition a consumer reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// Offset of the next record to consume, as logged in the store; -1
    /// when none has been consumed (it starts where `start` says).
    pub position: i64,
    /// The partition's end (the offset the next record produced gets), as
    /// last asked of the broker; -1 when not known yet.
    pub high_watermark: i64,
    /// Records produced and not yet applied (`high_watermark - position`).
    pub lag_records: i64,
    /// Seconds since the partition was last caught up (0 when it is).
    pub lag_seconds: f64,
}

/// A record that was not applied, where it is in its topic, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
}

/// What a consumer is doing and has done since the server started.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// The last problem, with when it was seen (Unix ms); empty when the
    /// consumer has not had one since it last consumed.
    pub error: String,
    pub error_at_ms: i64,
    pub partitions: Vec<PartitionStatus>,
    /// Records applied, skipped as duplicates, ignored (declared not to be
    /// events) and rejected, since the server started.
    pub applied: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub rejected: u64,
    /// Records consumed a second over the last few seconds.
    pub records_per_second: f64,
    /// The newest rejected records, oldest first.
    pub recent_rejects: VecDeque<Reject>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Starting,
            error: String::new(),
            error_at_ms: 0,
            partitions: Vec::new(),
            applied: 0,
            duplicates: 0,
            ignored: 0,
            rejected: 0,
            records_per_second: 0.0,
            recent_rejects: VecDeque::new(),
        }
    }
}

impl Status {
    fn reject(&mut self, r: Reject) {
        tracing::warn!(
            topic = %r.topic,
            partition = r.partition,
            offset = r.offset,
            reason = %r.reason,
            "Kafka record rejected"
        );
        self.rejected += 1;
        if self.recent_rejects.len() == RECENT_REJECTS {
            self.recent_rejects.pop_front();
        }
        self.recent_rejects.push_back(r);
    }
}

struct Running {
    /// The definition it was started with (`updated_ms` of the source).
    updated_ms: i64,
    /// Paused: no thread, a status that says so.
    paused: bool,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    status: Arc<Mutex<Status>>,
}

impl Running {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The consumers of the store's Kafka sources.
pub struct Consumers {
    running: Mutex<BTreeMap<String, Running>>,
    stop: AtomicBool,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Consumers {
    /// Starts watching `engine`'s sources (writes go through `runtime`).
    pub fn start(
        engine: Arc<Engine>,
        facts: Facts,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            running: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            watcher: Mutex::new(None),
        });
        #[cfg(feature = "kafka")]
        me.watch(engine, facts, runtime)?;
        // Built without a Kafka client: sources are kept, not consumed.
        #[cfg(not(feature = "kafka"))]
        let _ = (engine, facts, runtime);
        Ok(me)
    }

    /// Starts the thread that looks at the store's sources.
    #[cfg(feature = "kafka")]
    fn watch(
        self: &Arc<Self>,
        engine: Arc<Engine>,
        facts: Facts,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let weak = Arc::downgrade(self);
        let facts = Arc::new(facts);
        let watcher = std::thread::Builder::new()
            .name("tagstore-kafka".into())
            .spawn(move || {
                loop {
                    let Some(me) = weak.upgrade() else { return };
                    if me.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    me.look(&engine, &facts, &runtime);
                    drop(me);
                    std::thread::sleep(WATCH_EVERY);
                }
            })?;
        *self.watcher.lock() = Some(watcher);
        Ok(())
    }

    /// Starts, restarts and stops consumers to match the store's sources.
    #[cfg(feature = "kafka")]
    fn look(&self, engine: &Arc<Engine>, facts: &Arc<Facts>, runtime: &tokio::runtime::Handle) {
        let snap = engine.snapshot();
        let mut running = self.running.lock();
        // Stopped: dropped, or redefined (started again below).
        let gone: Vec<String> = running
            .iter()
            .filter(|(name, r)| {
                snap.sources
                    .get(name.as_str())
                    .is_none_or(|s| s.updated_ms != r.updated_ms || s.paused != r.paused)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(mut r) = running.remove(&name) {
                r.stop();
                tracing::info!(source = %name, "Kafka consumer stopped");
            }
        }
        for meta in snap.sources.values() {
            if running.contains_key(&*meta.name) {
                continue;
            }
            let Ok(source) = Source::parse(&meta.name, &meta.definition) else {
                continue;
            };
            if source.kafka.is_none() {
                continue;
            }
            if meta.paused {
                // Where it is, as the store says; nothing runs.
                let partitions = snap
                    .positions
                    .get(&meta.name)
                    .map(|at| {
                        at.iter()
                            .map(|((topic, partition), next)| PartitionStatus {
                                topic: topic.clone(),
                                partition: *partition,
                                position: *next,
                                high_watermark: -1,
                                lag_records: 0,
                                lag_seconds: 0.0,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let status = Status {
                    state: State::Paused,
                    partitions,
                    ..Status::default()
                };
                tracing::info!(source = %meta.name, "Kafka source paused");
                running.insert(
                    meta.name.to_string(),
                    Running {
                        updated_ms: meta.updated_ms,
                        paused: true,
                        stop: Arc::new(AtomicBool::new(true)),
                        thread: None,
                        status: Arc::new(Mutex::new(status)),
                    },
                );
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let status = Arc::new(Mutex::new(Status::default()));
            let c = consumer::Consumer {
                source: Arc::new(source),
                engine: engine.clone(),
                facts: facts.clone(),
                runtime: runtime.clone(),
                stop: stop.clone(),
                status: status.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("kafka-{}", meta.name))
                .spawn(move || c.run());
            match thread {
                Ok(t) => {
                    tracing::info!(source = %meta.name, "Kafka consumer started");
                    running.insert(
                        meta.name.to_string(),
                        Running {
                            updated_ms: meta.updated_ms,
                            paused: false,
                            stop,
                            thread: Some(t),
                            status,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(source = %meta.name, error = %e, "cannot start a Kafka consumer thread")
                }
            }
        }
    }

    /// The status of source `name`'s consumer; `None` when it has none
    /// (not a Kafka source, or not started yet).
    pub fn status(&self, name: &str) -> Option<Status> {
        let running = self.running.lock();
        running.get(name).map(|r| r.status.lock().clone())
    }

    /// Every consumer's status, by source name.
    pub fn statuses(&self) -> BTreeMap<String, Status> {
        let running = self.running.lock();
        running
            .iter()
            .map(|(n, r)| (n.clone(), r.status.lock().clone()))
            .collect()
    }

    /// Stops every consumer (at shutdown): each finishes the write it is
    /// in, and consumes nothing more.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.lock().take() {
            let _ = w.join();
        }
        let mut running = std::mem::take(&mut *self.running.lock());
        for r in running.values_mut() {
            r.stop.store(true, Ordering::Relaxed);
        }
        for r in running.values_mut() {
            r.stop();
        }
    }
}
