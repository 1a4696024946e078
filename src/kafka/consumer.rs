//! One Kafka source's consumer: a thread of its own, with librdkafka.
//!
//! A session assigns itself every partition of the source's topics (no
//! group membership: no rebalance ever moves a partition away, and the
//! store, not the group, says where each one is), starting each from the
//! position the store has logged for it, or from the start the source
//! declares when it has none. Then, in a loop: gather up to
//! `batch_records` messages or [`BATCH_BYTES`] (waiting at most [`LINGER`]
//! after the first),
//! read each as one record of the source, turn them into writes
//! (`crate::intake`), and write them with the positions after the batch
//! in one [`WriteOp::Consume`]. Only once that write is durable does the
//! session count the batch and commit the positions to the consumer group.
//!
//! When the batch's write is refused because of some of its records, each
//! message is written alone, with the position after it, so the good ones
//! are applied and the others rejected, with their topic, partition and
//! offset. Any other failure (the store failing, a full disk, brokers
//! gone, a topic missing) ends the session: it starts again after a pause
//! (doubling up to [`MAX_PAUSE`]), from the positions the store holds, so
//! nothing is applied twice and nothing is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::{PartitionStatus, State, Status, source_reject};
use crate::error::Error;
use crate::ingest::facts::Facts;
use crate::ingest::kafka::{KafkaSettings, Security, Start};
use crate::ingest::read::Reader;
use crate::ingest::source::Source;
use crate::intake::{self, is_about_records};
use crate::storage::record::{SourcePositions, SourceReject};
use crate::storage::{Engine, IngestRecord, WriteOp};

/// Bytes of messages a batch gathers at most (it ends at the message that
/// reaches it): with one batch in the writer's hands and the next being
/// read, a consumer holds about twice this, whatever `batch_records` says.
pub const BATCH_BYTES: usize = 32 << 20;
/// Longest wait for more messages once a batch has its first.
const LINGER: Duration = Duration::from_millis(20);
/// Longest a poll blocks (how soon a stop is seen).
const POLL: Duration = Duration::from_millis(100);
/// How often lag and rate are worked out again (a round trip to the
/// brokers per partition).
const REFRESH: Duration = Duration::from_secs(5);
/// Longest wait for one partition's end.
const WATERMARK_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the topics' partitions are looked up again (new partitions
/// are consumed from then on).
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);
/// Longest a metadata request waits for the brokers.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause before a session starts again.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// One source's consumer (run on its own thread by [`super::Consumers`]).
pub struct Consumer {
    pub source: Arc<Source>,
    pub engine: Arc<Engine>,
    pub facts: Arc<Facts>,
    pub runtime: tokio::runtime::Handle,
    pub stop: Arc<AtomicBool>,
    pub status: Arc<Mutex<Status>>,
}

/// How a session ended.
enum End {
    /// Told to stop, or its source is gone.
    Stop,
    /// Start again from the store's positions, after a pause when `error`.
    Again { error: Option<String> },
    /// The store refused a batch: start again, after a pause.
    Refused(String),
}

/// What librdkafka says as it works: its error events carry a reason
/// (a TLS handshake refused, a SASL login failed, a connection refused)
/// that the error codes the calls return do not; the first few since the
/// status last took them are kept for it, and its warnings go to the
/// server's log at debug.
struct Heard {
    source: String,
    reasons: Mutex<Vec<(Instant, String)>>,
    /// Its reports of a position the brokers do not hold (an offset out
    /// of range, read on from `start`), for the session to take.
    resets: Mutex<Vec<String>>,
}

/// Position resets kept between two looks of the session (a few ms).
const RESETS: usize = 64;

/// Reasons kept between two looks (the first are the telling ones: "all
/// brokers are down" follows what brought each one down), for at most
/// [`REASONS_FOR`] (an older one is not told with a new error).
const REASONS: usize = 3;
const REASONS_FOR: Duration = Duration::from_secs(60);

impl ClientContext for Heard {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // A connection that failed ("FAIL": refused, a TLS handshake, a
        // SASL login) says why only here; the status tells it with the
        // error it caused, which the server's log has too.
        let failed = fac == "FAIL";
        if fac == "OFFSET"
            && matches!(
                level,
                RDKafkaLogLevel::Warning
                    | RDKafkaLogLevel::Error
                    | RDKafkaLogLevel::Critical
                    | RDKafkaLogLevel::Alert
                    | RDKafkaLogLevel::Emerg
            )
        {
            let mut resets = self.resets.lock();
            if resets.len() < RESETS {
                resets.push(message.to_string());
            }
        }
        // At debug only: it repeats itself at each reconnection, and what
        // matters reaches the log with the error it caused (`fail`).
        tracing::debug!(source = %self.source, facility = fac, "librdkafka: {message}");
        if failed
            || matches!(
                level,
                RDKafkaLogLevel::Emerg
                    | RDKafkaLogLevel::Alert
                    | RDKafkaLogLevel::Critical
                    | RDKafkaLogLevel::Error
            )
        {
            self.heard(message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(source = %self.source, %error, reason, "librdkafka error");
        self.heard(reason);
    }
}

impl ConsumerContext for Heard {}

type Kc = BaseConsumer<Heard>;

impl Heard {
    /// Keeps a reason: the first few distinct ones, without librdkafka's
    /// thread name and its "(after N ms in state …)".
    fn heard(&self, reason: &str) {
        let reason = match reason.strip_prefix("[thrd:") {
            Some(rest) => rest.split_once("]: ").map_or(reason, |(_, r)| r),
            None => reason,
        };
        let reason = reason.split(" (after ").next().unwrap_or(reason).trim();
        let mut kept = self.reasons.lock();
        kept.retain(|(at, _)| at.elapsed() < REASONS_FOR);
        if kept.len() < REASONS && !kept.iter().any(|(_, r)| r == reason) {
            kept.push((Instant::now(), reason.to_string()));
        }
    }

    /// The reasons heard, as ": reason; reason" to follow an error (taken:
    /// they are not told twice); empty when none.
    fn told(&self) -> String {
        let kept: Vec<String> = std::mem::take(&mut *self.reasons.lock())
            .into_iter()
            .filter(|(at, _)| at.elapsed() < REASONS_FOR)
            .map(|(_, r)| r)
            .collect();
        if kept.is_empty() {
            String::new()
        } else {
            format!(": {}", kept.join("; "))
        }
    }
}

/// One message, copied out of librdkafka's buffer.
struct Msg {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Consumer {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Something is wrong: with the brokers (or before consuming), or not
    /// (the store refused a batch), which only an applied batch mends.
    fn fail(&self, mut error: String, brokers: bool) {
        tracing::warn!(source = %self.source.name, %error, "Kafka consumer");
        super::cut(&mut error, super::ERROR_BYTES);
        let mut st = self.status.lock();
        st.state = State::Retrying;
        st.error_from_brokers = brokers;
        st.error = error;
        st.error_at_ms = now_ms();
    }

    /// Consumes until told to stop.
    pub fn run(self) {
        let Some(settings) = self.source.kafka.clone() else {
            return;
        };
        let mut pause = FIRST_PAUSE;
        while !self.stopped() {
            let began = Instant::now();
            let ended = self.session(&settings);
            match &ended {
                End::Stop => return,
                End::Again { error: None } => pause = FIRST_PAUSE,
                End::Again { error: Some(e) } | End::Refused(e) => {
                    let e = e.clone();
                    let brokers = !matches!(ended, End::Refused(_));
                    self.fail(e, brokers);
                    if began.elapsed() > MAX_PAUSE {
                        pause = FIRST_PAUSE;
                    }
                    let until = Instant::now() + pause;
                    while Instant::now() < until && !self.stopped() {
                        std::thread::sleep(POLL);
                    }
                    pause = (pause * 2).min(MAX_PAUSE);
                }
            }
        }
    }

    fn client(&self, s: &KafkaSettings) -> Result<Kc, String> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &s.brokers)
            .set("group.id", &s.group)
            .set("client.id", format!("tagstore-{}", self.source.name))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "100")
            .set(
                "auto.offset.reset",
                match s.start {
                    Start::Earliest => "earliest",
                    Start::Latest => "latest",
                },
            )
            .set("security.protocol", s.security.name());
        if matches!(s.security, Security::SaslPlaintext | Security::SaslSsl) {
            let file = s.sasl_password_file.as_deref().unwrap_or_default();
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("kafka.sasl_password_file {file:?}: {e}"))?;
            c.set(
                "sasl.mechanism",
                s.sasl_mechanism.as_deref().unwrap_or_default(),
            )
            .set(
                "sasl.username",
                s.sasl_username.as_deref().unwrap_or_default(),
            )
            .set("sasl.password", password.trim_end_matches(['\r', '\n']));
        }
        match &s.ca_file {
            Some(ca) => {
                c.set("ssl.ca.location", ca);
            }
            // The OpenSSL built in looks for the system's CAs where its
            // build put them, not where this system keeps them: librdkafka
            // looks in the usual places instead.
            None if matches!(s.security, Security::Ssl | Security::SaslSsl) => {
                c.set("ssl.ca.location", "probe");
            }
            None => {}
        }
        c.set_log_level(RDKafkaLogLevel::Warning);
        c.create_with_context(Heard {
            source: self.source.name.clone(),
            reasons: Mutex::new(Vec::new()),
            resets: Mutex::new(Vec::new()),
        })
        .map_err(|e| format!("cannot make a Kafka client: {e}"))
    }

    /// Every partition of the source's topics. `assigned`: the consumer
    /// reads partitions, so what librdkafka has to say waits for the next
    /// poll (which would take messages too).
    fn partitions(
        &self,
        kc: &Kc,
        s: &KafkaSettings,
        assigned: bool,
    ) -> Result<Vec<(String, i32)>, String> {
        let mut out = Vec::new();
        for topic in &s.topics {
            let md = kc
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)
                .map_err(|e| {
                    if !assigned {
                        // Its events: no message comes before an assignment.
                        // (A poll that serves a log line answers `None`.)
                        for _ in 0..256 {
                            let _ = kc.poll(Duration::ZERO);
                        }
                    }
                    format!(
                        "brokers {}: metadata of topic {topic:?}: {e}{}",
                        s.brokers,
                        kc.context().told()
                    )
                })?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Err(format!("topic {topic:?}: the brokers do not list it"));
            };
            if let Some(e) = t.error() {
                return Err(format!(
                    "topic {topic:?}: {}",
                    rdkafka::error::RDKafkaErrorCode::from(e)
                ));
            }
            if t.partitions().is_empty() {
                return Err(format!("topic {topic:?}: no partitions (does it exist?)"));
            }
            for p in t.partitions() {
                out.push((topic.clone(), p.id()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn session(&self, s: &KafkaSettings) -> End {
        {
            // After a failure it stays "retrying" until that is over.
            let mut st = self.status.lock();
            if st.error.is_empty() {
                st.state = State::Starting;
            }
        }
        let kc = match self.client(s) {
            Ok(c) => c,
            Err(e) => return End::Again { error: Some(e) },
        };
        let parts = match self.partitions(&kc, s, false) {
            Ok(p) => p,
            Err(e) => return End::Again { error: Some(e) },
        };
        // Where each partition is, as the store says.
        let stored = self
            .engine
            .snapshot()
            .positions
            .get(self.source.name.as_str())
            .cloned()
            .unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        for (topic, p) in &parts {
            let at = match (stored.get(&(topic.clone(), *p)), s.start) {
                (Some(next), _) => Offset::Offset(*next),
                (None, Start::Earliest) => Offset::Beginning,
                (None, Start::Latest) => Offset::End,
            };
            if let Err(e) = tpl.add_partition_offset(topic, *p, at) {
                return End::Again {
                    error: Some(format!("partition {topic}/{p}: {e}")),
                };
            }
        }
        if let Err(e) = kc.assign(&tpl) {
            return End::Again {
                error: Some(format!("cannot assign the partitions: {e}")),
            };
        }
        let mut tracked: BTreeMap<(String, i32), Tracked> = parts
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    Tracked {
                        position: stored.get(k).copied().unwrap_or(-1),
                        high: -1,
                        caught_up: Instant::now(),
                    },
                )
            })
            .collect();
        {
            let mut st = self.status.lock();
            if st.error_from_brokers {
                // The brokers answered and the partitions are assigned.
                st.running();
            } else if st.error.is_empty() {
                st.state = State::Running;
            }
            // Else a batch the store refused: mended (and running) only
            // once one is applied.
            st.set_partitions(status_of(&tracked));
        }
        let mut reader = self.reader();
        let mut refreshed = Instant::now();
        let mut looked = Instant::now();
        let mut consumed_since = 0u64;
        let mut in_flight: Option<InFlight> = None;
        loop {
            if self.stopped() {
                self.settle(&kc, &mut tracked, in_flight.take());
                return End::Stop;
            }
            if refreshed.elapsed() >= REFRESH {
                self.refresh(&kc, &mut tracked, consumed_since, refreshed.elapsed());
                consumed_since = 0;
                refreshed = Instant::now();
            }
            if looked.elapsed() >= PARTITIONS_EVERY {
                looked = Instant::now();
                match self.partitions(&kc, s, true) {
                    Ok(now) if now != parts => {
                        tracing::info!(source = %self.source.name, before = parts.len(), now = now.len(), "the topics' partitions changed; assigning them again");
                        self.settle(&kc, &mut tracked, in_flight.take());
                        return End::Again { error: None };
                    }
                    Ok(_) => {}
                    Err(e) => self.fail(e, true),
                }
            }
            // The next batch is gathered and read while the last one's
            // write is in the writer's hands; it is queued once that one
            // is answered, so batches are applied in order, one at a time.
            let first_wait = if in_flight.is_some() { LINGER } else { POLL };
            let batch = match self.gather(&kc, s.batch_records, first_wait) {
                Ok(b) => b,
                Err(e) => {
                    self.settle(&kc, &mut tracked, in_flight.take());
                    return End::Again { error: Some(e) };
                }
            };
            consumed_since += batch.len() as u64;
            self.note_resets(&kc, &tracked);
            let next = (!batch.is_empty()).then(|| self.prepare(&mut reader, batch));
            if let Some(w) = in_flight.take() {
                let done = match self.finish(w) {
                    Ok(done) => done,
                    Err(end) => return end,
                };
                self.done(&kc, &mut tracked, &done);
            }
            in_flight = next.map(|p| self.enqueue(p));
        }
    }

    /// Waits for the write in flight, if any, before the session ends: the
    /// next session starts from the positions the store holds, which must
    /// include it if it is applied at all.
    fn settle(&self, kc: &Kc, tracked: &mut BTreeMap<(String, i32), Tracked>, w: Option<InFlight>) {
        if let Some(w) = w
            && let Ok(batch) = self.finish(w)
        {
            self.done(kc, tracked, &batch);
        }
    }

    /// A batch applied: its positions are the consumer's, committed to the
    /// group (for monitoring tools only: never read back).
    fn done(&self, kc: &Kc, tracked: &mut BTreeMap<(String, i32), Tracked>, batch: &[Msg]) {
        for m in batch {
            let t = tracked
                .entry((m.topic.clone(), m.partition))
                .or_insert(Tracked {
                    position: -1,
                    high: -1,
                    caught_up: Instant::now(),
                });
            t.position = t.position.max(m.offset + 1);
        }
        let mut commit = TopicPartitionList::new();
        for ((topic, p), t) in tracked.iter() {
            if t.position >= 0 {
                let _ = commit.add_partition_offset(topic, *p, Offset::Offset(t.position));
            }
        }
        let _ = kc.commit(&commit, CommitMode::Async);
        let mut st = self.status.lock();
        st.running();
        st.set_partitions(status_of(tracked));
    }

    fn reader(&self) -> Reader<Arc<Source>> {
        let mut reader = Reader::new(self.source.clone());
        if let Some(h) = self
            .source
            .kafka
            .as_ref()
            .and_then(|k| k.csv_header.as_ref())
        {
            // Checked to be one line when the source was defined: the
            // header sets the columns and reads no record.
            let _ = reader.feed(format!("{h}\n").as_bytes());
        }
        reader
    }

    /// Up to `most` messages and about [`BATCH_BYTES`]: waits for the
    /// first (at most `first_wait`), then at most [`LINGER`] for more.
    fn gather(&self, kc: &Kc, most: usize, first_wait: Duration) -> Result<Vec<Msg>, String> {
        let mut out: Vec<Msg> = Vec::new();
        let mut until = Instant::now() + first_wait;
        let mut bytes = 0usize;
        while out.len() < most && bytes < BATCH_BYTES && !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match kc.poll(left) {
                None => break,
                Some(Ok(m)) => {
                    if out.is_empty() {
                        until = Instant::now() + LINGER;
                    }
                    let payload = m.payload().unwrap_or_default();
                    bytes += payload.len() + m.topic().len() + 32;
                    out.push(Msg {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        payload: payload.to_vec(),
                    });
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) if out.is_empty() => {
                    // librdkafka retries by itself (a broker away, a
                    // leader moving): say so, and keep polling.
                    self.fail(
                        format!(
                            "brokers {}: {e}{}",
                            self.source
                                .kafka
                                .as_ref()
                                .map_or("", |k| k.brokers.as_str()),
                            kc.context().told()
                        ),
                        true,
                    );
                    break;
                }
                Some(Err(e)) => {
                    tracing::debug!(source = %self.source.name, error = %e, "Kafka poll");
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads a batch's messages as records and turns them into writes.
    fn prepare(&self, reader: &mut Reader<Arc<Source>>, batch: Vec<Msg>) -> Prepared {
        let mut rejects: Vec<(usize, String)> = Vec::new();
        let mut reads = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if m.payload.iter().all(u8::is_ascii_whitespace) {
                rejects.push((i, "an empty message (a message holds one record)".into()));
                continue;
            }
            match reader.feed(&m.payload) {
                Err(e) => rejects.push((i, e.0)),
                Ok(mut v) if v.len() == 1 => {
                    let mut r = v.remove(0);
                    r.line = i as u64;
                    reads.push(r);
                }
                Ok(v) => rejects.push((
                    i,
                    format!(
                        "the message holds {} records; a message is one record",
                        v.len()
                    ),
                )),
            }
        }
        let prepared = self.runtime.block_on(intake::prepare(
            &self.engine,
            &self.facts,
            &self.source,
            reads,
        ));
        rejects.extend(
            prepared
                .rejected
                .into_iter()
                .map(|r| (r.line as usize, r.reason)),
        );
        rejects.sort_by_key(|(i, _)| *i);
        // In message order (records are prepared in the order read).
        let mut records = prepared.records;
        records.sort_by_key(|(line, _)| *line);
        Prepared {
            batch,
            rejects,
            ignored: prepared.ignored,
            records: records
                .into_iter()
                .map(|(line, r)| (line as usize, r))
                .collect(),
        }
    }

    /// Queues a prepared batch's write: its records and the positions
    /// after it. A write refused before it is queued (a customer key the
    /// engine does not take) is answered by [`Consumer::finish`] as one
    /// refused by the writer.
    fn enqueue(&self, p: Prepared) -> InFlight {
        let positions = self.positions_after(p.batch.iter());
        let with_record: Vec<usize> = p.records.iter().map(|(i, _)| *i).collect();
        let records = p.records.into_iter().map(|(_, r)| r).collect();
        let rejects = p
            .rejects
            .iter()
            .map(|(i, reason)| self.reject_of(&p.batch[*i], reason))
            .collect();
        let queued = self.engine.enqueue(WriteOp::Consume {
            records,
            positions,
            rejects,
        });
        InFlight {
            batch: p.batch,
            rejects: p.rejects,
            ignored: p.ignored,
            with_record,
            queued,
        }
    }

    /// Waits for a queued batch's write and counts it; when it was refused
    /// because of some of its records, writes its messages one at a time.
    /// The batch applied, or on a failure that is not about its records,
    /// how the session ends.
    fn finish(&self, w: InFlight) -> Result<Vec<Msg>, End> {
        let InFlight {
            batch,
            rejects,
            ignored,
            with_record,
            queued,
        } = w;
        let answer = match queued {
            Ok(q) => self.runtime.block_on(self.engine.answer(q)),
            Err(e) => Err(e),
        };
        match answer {
            Ok(r) => {
                let dup = r.duplicates.len() as u64;
                let mut st = self.status.lock();
                st.applied += with_record.len() as u64 - dup;
                st.duplicates += dup;
                st.ignored += ignored;
                for (i, reason) in rejects {
                    st.rejected(&self.reject_of(&batch[i], &reason), &reason);
                }
                drop(st);
                Ok(batch)
            }
            Err(e) if is_about_records(&e) => {
                // Each message alone, with the position after it: read and
                // prepared again (the first reading went into the refused
                // write), by a reader of its own.
                let mut reader = self.reader();
                let again = self.prepare(&mut reader, batch);
                let why: HashMap<usize, String> = again.rejects.into_iter().collect();
                let mut records: HashMap<usize, IngestRecord> = again.records.into_iter().collect();
                self.status.lock().ignored += again.ignored;
                for (i, m) in again.batch.iter().enumerate() {
                    let record = records.remove(&i);
                    let positions = self.positions_after(std::iter::once(m));
                    let had = record.is_some();
                    let reject = why
                        .get(&i)
                        .map(|reason| (self.reject_of(m, reason), reason));
                    let res = self.write(
                        record.into_iter().collect(),
                        positions.clone(),
                        reject.iter().map(|(r, _)| r.clone()).collect(),
                    );
                    let mut st = self.status.lock();
                    match res {
                        Ok(r) if had => {
                            let dup = r.duplicates.len() as u64;
                            st.applied += 1 - dup;
                            st.duplicates += dup;
                        }
                        Ok(_) => {
                            if let Some((r, reason)) = &reject {
                                st.rejected(r, reason);
                            }
                        }
                        Err(e) if is_about_records(&e) => {
                            drop(st);
                            // The position moves past it all the same.
                            let reason = e.to_string();
                            let r = self.reject_of(m, &reason);
                            if let Err(e) = self.write(Vec::new(), positions, vec![r.clone()]) {
                                return Err(self.ended(e));
                            }
                            self.status.lock().rejected(&r, &reason);
                        }
                        Err(e) => {
                            drop(st);
                            return Err(self.ended(e));
                        }
                    }
                }
                Ok(again.batch)
            }
            Err(e) => Err(self.ended(e)),
        }
    }

    fn ended(&self, e: Error) -> End {
        match e {
            Error::SourceNotFound(_) => End::Stop,
            e => End::Refused(format!("the store refused the batch: {e}")),
        }
    }

    /// The positions after `msgs`: for each partition they are of, the
    /// offset after the last one.
    fn positions_after<'a>(&self, msgs: impl Iterator<Item = &'a Msg>) -> SourcePositions {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in msgs {
            let e = next.entry((m.topic.as_str(), m.partition)).or_insert(0);
            *e = (*e).max(m.offset + 1);
        }
        SourcePositions {
            source: self.source.name.clone(),
            next: next
                .into_iter()
                .map(|((t, p), n)| (t.to_string(), p, n))
                .collect(),
        }
    }

    fn write(
        &self,
        records: Vec<IngestRecord>,
        positions: SourcePositions,
        rejects: Vec<SourceReject>,
    ) -> crate::error::Result<crate::storage::WriteResult> {
        self.runtime.block_on(self.engine.write(WriteOp::Consume {
            records,
            positions,
            rejects,
        }))
    }

    /// The reject the store logs for message `m`.
    fn reject_of(&self, m: &Msg, reason: &str) -> SourceReject {
        source_reject(
            &self.source.name,
            false,
            &m.topic,
            m.partition,
            m.offset,
            reason,
        )
    }

    /// librdkafka's reports of positions the brokers do not hold: the
    /// records from there on to where it reads (from `start`) are not
    /// applied, so each report is logged in the store as records skipped,
    /// at the store's position (the positions move with the records read
    /// next).
    fn note_resets(&self, kc: &Kc, tracked: &BTreeMap<(String, i32), Tracked>) {
        let resets = std::mem::take(&mut *kc.context().resets.lock());
        if resets.is_empty() {
            return;
        }
        let skips: Vec<(SourceReject, String)> = resets
            .into_iter()
            .map(|message| {
                let (topic, partition) = reset_partition(&message).unwrap_or_default();
                let offset = tracked
                    .get(&(topic.clone(), partition))
                    .map_or(-1, |t| t.position);
                let reason = format!(
                    "records skipped: the brokers do not hold this position (deleted by retention before they were consumed, or the topic recreated); reading on from the source's start. librdkafka: {message}"
                );
                (
                    source_reject(&self.source.name, true, &topic, partition, offset, &reason),
                    reason,
                )
            })
            .collect();
        let positions = SourcePositions {
            source: self.source.name.clone(),
            next: Vec::new(),
        };
        let logged = self.write(
            Vec::new(),
            positions,
            skips.iter().map(|(r, _)| r.clone()).collect(),
        );
        let mut st = self.status.lock();
        for (r, reason) in &skips {
            st.skipped(r, reason);
        }
        drop(st);
        if let Err(e) = logged {
            // Said in the server's log above, and in the status.
            self.fail(
                format!("the store refused the report of records skipped: {e}"),
                false,
            );
        }
    }

    /// Lag and rate, worked out again.
    fn refresh(
        &self,
        kc: &Kc,
        tracked: &mut BTreeMap<(String, i32), Tracked>,
        consumed: u64,
        over: Duration,
    ) {
        let mut answered = true;
        let mut past_end = Vec::new();
        for ((topic, p), t) in tracked.iter_mut() {
            // Brokers that do not answer one partition are not asked about
            // the next (each ask waits up to WATERMARK_TIMEOUT, and a stop
            // is seen only between them): the ends stay as last known.
            if answered && !self.stopped() {
                match kc.fetch_watermarks(topic, *p, WATERMARK_TIMEOUT) {
                    Ok((_, high)) => t.high = high,
                    Err(_) => answered = false,
                }
            }
            if t.high >= 0 && t.position > t.high {
                // A broker that truncated or remade the partition without
                // saying the position is out of range (Kafka says so, and
                // librdkafka reads on from `start`: `note_resets`).
                past_end.push(format!(
                    "partition {topic}/{p} ends at offset {}, before the store's position {}",
                    t.high, t.position
                ));
            } else if t.high >= 0 && t.position.max(0) >= t.high {
                t.caught_up = Instant::now();
            }
        }
        if !past_end.is_empty() {
            let error = format!(
                "{} (was the topic deleted and made again, or truncated?): nothing is read from such a partition until its records pass the store's position, and those before it would be skipped; drop the source and create it again to read its topics from `start`",
                past_end.join("; ")
            );
            let mut kept = error.clone();
            super::cut(&mut kept, super::ERROR_BYTES);
            // Said once, not at each look.
            if self.status.lock().error != kept {
                self.fail(error, true);
            }
        }
        let mut st = self.status.lock();
        if past_end.is_empty() && answered && st.error_from_brokers && !st.error.is_empty() {
            // The brokers answer again: what librdkafka reported while
            // they did not (it reconnects by itself) is over.
            st.running();
        }
        st.set_partitions(status_of(tracked));
        st.records_per_second = consumed as f64 / over.as_secs_f64().max(0.001);
    }
}

/// A batch read and turned into writes.
struct Prepared {
    batch: Vec<Msg>,
    /// Messages that are not applied, by index, with the reason.
    rejects: Vec<(usize, String)>,
    ignored: u64,
    /// Each record with its message's index, in order.
    records: Vec<(usize, IngestRecord)>,
}

/// A batch whose write is queued.
struct InFlight {
    batch: Vec<Msg>,
    rejects: Vec<(usize, String)>,
    ignored: u64,
    /// Messages with a record in the write.
    with_record: Vec<usize>,
    queued: crate::error::Result<crate::storage::Queued>,
}

struct Tracked {
    position: i64,
    high: i64,
    caught_up: Instant,
}

fn status_of(tracked: &BTreeMap<(String, i32), Tracked>) -> Vec<PartitionStatus> {
    tracked
        .iter()
        .map(|((topic, p), t)| {
            let lag = if t.high < 0 {
                0
            } else {
                (t.high - t.position.max(0)).max(0)
            };
            PartitionStatus {
                topic: topic.clone(),
                partition: *p,
                position: t.position,
                high_watermark: t.high,
                lag_records: lag,
                lag_seconds: if lag == 0 {
                    0.0
                } else {
                    t.caught_up.elapsed().as_secs_f64()
                },
            }
        })
        .collect()
}

/// The topic and partition a librdkafka offset message is about: it
/// starts "topic [partition]: ", after its thread's name.
fn reset_partition(message: &str) -> Option<(String, i32)> {
    let m = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ")?.1,
        None => message,
    };
    let (topic, rest) = m.split_once(" [")?;
    let (partition, _) = rest.split_once(']')?;
    Some((topic.to_string(), partition.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::reset_partition;

    #[test]
    fn a_reset_message_names_its_topic_and_partition() {
        assert_eq!(
            reset_partition(
                "[thrd:main]: events [1]: offset reset (at offset 5000 (leader epoch -1), broker 0) to BEGINNING: fetch failed due to requested offset not available on the broker: Broker: Offset out of range"
            ),
            Some(("events".to_string(), 1))
        );
        assert_eq!(
            reset_partition("orders.cn [12]: offset reset (at offset 7, broker 1) to END"),
            Some(("orders.cn".to_string(), 12))
        );
        assert_eq!(reset_partition("something else"), None);
        assert_eq!(reset_partition("t [x]: offset reset"), None);
    }
}
