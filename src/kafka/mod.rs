//! Kafka sources: the server consumes the topics a source's `[kafka]`
//! table names (`crate::ingest::kafka`), exactly once.
//!
//! [`Consumers`] keeps one consumer thread per Kafka source of the store:
//! it looks at the store's sources every half second, starts a consumer for
//! a new one, restarts one whose definition changed and stops one that was
//! dropped. Each consumer ([`consumer`]) reads batches of messages through
//! a Kafka client process ([`process`], [`client`], [`wire`]: librdkafka
//! out of the server's process, so that its crash ends a session), turns
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

// Built without a Kafka client (the fuzz targets), the consumers' machinery
// is kept but never started.
#![cfg_attr(not(feature = "kafka"), allow(dead_code, unused_imports))]

#[cfg(feature = "kafka")]
pub mod client;
#[cfg(feature = "kafka")]
pub mod consumer;
pub mod process;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

pub use process::Program;

use crate::ingest::facts::Facts;
use crate::ingest::source::Source;
use crate::storage::Engine;
use crate::storage::record::{MAX_REJECT_REASON, SourceReject};

/// How often the store's sources are looked at.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Longest error a status keeps, in bytes (the server's log has it whole).
pub const ERROR_BYTES: usize = 2048;
/// Partitions a source's status lists: the ones furthest behind, when it
/// has more (the others are counted, and in the totals).
pub const LISTED_PARTITIONS: usize = 256;

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

/// What a consumer is doing and has done since the server started.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    /// The last problem, with when it was seen (Unix ms); empty when the
    /// consumer has not had one since it last consumed.
    pub error: String,
    pub error_at_ms: i64,
    /// `error` is about reaching the brokers (over once they answer), not
    /// a batch the store refused (over once one is applied).
    pub error_from_brokers: bool,
    /// The partitions, by topic and partition; at most
    /// [`LISTED_PARTITIONS`] (see [`Status::set_partitions`]).
    pub partitions: Vec<PartitionStatus>,
    /// Partitions left out of `partitions`.
    pub unlisted_partitions: u64,
    /// Over every partition, listed or not: records not yet applied, and
    /// the longest a partition has been behind (s).
    pub lag_records: i64,
    pub lag_seconds: f64,
    /// Records applied, skipped as duplicates, ignored (declared not to be
    /// events) and rejected, since the server started.
    pub applied: u64,
    pub duplicates: u64,
    pub ignored: u64,
    pub rejected: u64,
    /// Times the brokers did not hold a partition's position (records
    /// deleted before they were consumed, a topic recreated) and reading
    /// went on from `start`; each is also a reject.
    pub position_resets: u64,
    /// Records consumed a second over the last few seconds.
    pub records_per_second: f64,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Starting,
            error: String::new(),
            error_at_ms: 0,
            error_from_brokers: false,
            partitions: Vec::new(),
            unlisted_partitions: 0,
            lag_records: 0,
            lag_seconds: 0.0,
            applied: 0,
            duplicates: 0,
            ignored: 0,
            rejected: 0,
            position_resets: 0,
            records_per_second: 0.0,
        }
    }
}

impl Status {
    /// Takes every partition's status: keeps the totals, and lists at most
    /// [`LISTED_PARTITIONS`], the ones with the most records behind (ties
    /// by topic and partition), in topic and partition order.
    pub fn set_partitions(&mut self, mut all: Vec<PartitionStatus>) {
        self.lag_records = all.iter().map(|p| p.lag_records).sum();
        self.lag_seconds = all.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
        if all.len() > LISTED_PARTITIONS {
            all.sort_by(|a, b| {
                b.lag_records
                    .cmp(&a.lag_records)
                    .then_with(|| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)))
            });
            self.unlisted_partitions = (all.len() - LISTED_PARTITIONS) as u64;
            all.truncate(LISTED_PARTITIONS);
            all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        } else {
            self.unlisted_partitions = 0;
        }
        self.partitions = all;
    }

    /// Consuming, with nothing wrong.
    pub fn running(&mut self) {
        self.state = State::Running;
        self.error.clear();
        self.error_at_ms = 0;
        self.error_from_brokers = false;
    }

    /// A record rejected, its reject logged in the store (with the
    /// position past it): counted, and written to the server's log with
    /// the whole reason.
    fn rejected(&mut self, r: &SourceReject, reason: &str) {
        self.rejected += 1;
        log_reject(r, reason, "Kafka record rejected");
    }

    /// Records skipped where the brokers did not hold a position, logged
    /// in the store with the rejects: counted apart.
    pub fn skipped(&mut self, r: &SourceReject, reason: &str) {
        self.position_resets += 1;
        log_reject(
            r,
            reason,
            "Kafka records skipped: position not held by the brokers",
        );
    }
}

fn log_reject(r: &SourceReject, reason: &str, what: &'static str) {
    tracing::warn!(
        source = %r.source,
        topic = %r.topic,
        partition = r.partition,
        offset = r.offset,
        reason = %reason,
        "{what}"
    );
}

/// The reject the store logs for a record (or records skipped) of
/// `source`: its reason cut to what the store keeps
/// ([`MAX_REJECT_REASON`]).
pub fn source_reject(
    source: &str,
    skipped: bool,
    topic: &str,
    partition: i32,
    offset: i64,
    reason: &str,
) -> SourceReject {
    let mut reason = reason.to_string();
    cut(&mut reason, MAX_REJECT_REASON);
    SourceReject {
        source: source.to_string(),
        skipped,
        topic: topic.to_string(),
        partition,
        offset,
        reason,
    }
}

/// Cuts `s` to at most `most` bytes, at a character's boundary, marking the
/// cut with "…".
pub(crate) fn cut(s: &mut String, most: usize) {
    if s.len() <= most {
        return;
    }
    let mut end = most - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
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
        program: Program,
    ) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            running: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            watcher: Mutex::new(None),
        });
        #[cfg(feature = "kafka")]
        me.watch(engine, facts, runtime, program)?;
        // Built without a Kafka client: sources are kept, not consumed.
        #[cfg(not(feature = "kafka"))]
        let _ = (engine, facts, runtime, program);
        Ok(me)
    }

    /// Starts the thread that looks at the store's sources.
    #[cfg(feature = "kafka")]
    fn watch(
        self: &Arc<Self>,
        engine: Arc<Engine>,
        facts: Facts,
        runtime: tokio::runtime::Handle,
        program: Program,
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
                    me.look(&engine, &facts, &runtime, &program);
                    drop(me);
                    std::thread::sleep(WATCH_EVERY);
                }
            })?;
        *self.watcher.lock() = Some(watcher);
        Ok(())
    }

    /// Starts, restarts and stops consumers to match the store's sources.
    #[cfg(feature = "kafka")]
    fn look(
        &self,
        engine: &Arc<Engine>,
        facts: &Arc<Facts>,
        runtime: &tokio::runtime::Handle,
        program: &Program,
    ) {
        let snap = engine.snapshot();
        // Stopped: dropped, or redefined (started again below). Each is
        // joined (it finishes the write it is in, which a slow disk makes
        // long) without the lock, so statuses can be read meanwhile; the
        // new one starts only after.
        let stopping: Vec<(String, Running)> = {
            let mut running = self.running.lock();
            let gone: Vec<String> = running
                .iter()
                .filter(|(name, r)| {
                    snap.sources
                        .get(name.as_str())
                        .is_none_or(|s| s.updated_ms != r.updated_ms || s.paused != r.paused)
                })
                .map(|(name, _)| name.clone())
                .collect();
            gone.into_iter()
                .filter_map(|name| running.remove(&name).map(|r| (name, r)))
                .collect()
        };
        for (name, mut r) in stopping {
            r.stop();
            tracing::info!(source = %name, "Kafka consumer stopped");
        }
        let mut running = self.running.lock();
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
                let partitions: Vec<PartitionStatus> = snap
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
                let mut status = Status {
                    state: State::Paused,
                    ..Status::default()
                };
                status.set_partitions(partitions);
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
                program: program.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn part(topic: &str, partition: i32, lag: i64) -> PartitionStatus {
        PartitionStatus {
            topic: topic.into(),
            partition,
            position: 0,
            high_watermark: lag,
            lag_records: lag,
            lag_seconds: lag as f64 / 10.0,
        }
    }

    #[test]
    fn a_status_lists_the_partitions_furthest_behind_and_totals_them_all() {
        let mut st = Status::default();
        st.set_partitions(vec![part("a", 0, 5), part("a", 1, 0)]);
        assert_eq!(st.partitions.len(), 2);
        assert_eq!((st.unlisted_partitions, st.lag_records), (0, 5));

        // Three topics' partitions, more than are listed: the most behind
        // are kept, in topic and partition order.
        let all: Vec<PartitionStatus> = (0..LISTED_PARTITIONS as i32 + 10)
            .map(|p| part(if p % 2 == 0 { "b" } else { "a" }, p, (p as i64 * 7) % 100))
            .collect();
        let total: i64 = all.iter().map(|p| p.lag_records).sum();
        let mut behind: Vec<i64> = all.iter().map(|p| p.lag_records).collect();
        behind.sort_unstable_by(|a, b| b.cmp(a));
        st.set_partitions(all);
        assert_eq!(st.partitions.len(), LISTED_PARTITIONS);
        assert_eq!(st.unlisted_partitions, 10);
        assert_eq!(st.lag_records, total);
        assert_eq!(st.lag_seconds, 9.9);
        let mut listed: Vec<i64> = st.partitions.iter().map(|p| p.lag_records).collect();
        listed.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(listed, behind[..LISTED_PARTITIONS]);
        let keys: Vec<(String, i32)> = st
            .partitions
            .iter()
            .map(|p| (p.topic.clone(), p.partition))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn a_reject_keeps_at_most_what_the_store_takes_of_the_reason() {
        let kept: Vec<String> = ["short".to_string(), "标签".repeat(400), "x".repeat(5000)]
            .iter()
            .map(|reason| source_reject("s", false, "t", 0, 1, reason).reason)
            .collect();
        assert_eq!(kept[0], "short");
        for r in &kept[1..] {
            assert!(r.len() <= MAX_REJECT_REASON && r.len() > MAX_REJECT_REASON - 8);
            assert!(r.ends_with('…'));
        }
        assert!(kept[1].starts_with("标签标签"));
    }
}
