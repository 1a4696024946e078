//! One Kafka source's consumer: a thread of its own, and for each session
//! a Kafka client process that holds librdkafka ([`super::process`]).
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
//! gone, a topic missing, the client process crashing or not answering)
//! ends the session: it starts again after a pause
//! (doubling up to [`MAX_PAUSE`]), from the positions the store holds, so
//! nothing is applied twice and nothing is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::process::{ClientProcess, Program};
use super::wire::{At, Msg};
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
/// Partitions whose ends are asked in one request.
const ENDS_AT_ONCE: usize = 16;
/// How often the topics' partitions are looked up again (new partitions
/// are consumed from then on).
const PARTITIONS_EVERY: Duration = Duration::from_secs(30);
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
    /// What runs librdkafka for each session.
    pub program: Program,
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

type Kc = ClientProcess;

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

    /// A client process with librdkafka's settings for the source.
    fn client(&self, s: &KafkaSettings) -> Result<Kc, String> {
        let mut c: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: &str| c.push((k.to_string(), v.to_string()));
        set("bootstrap.servers", &s.brokers);
        set("group.id", &s.group);
        set("client.id", &format!("tagstore-{}", self.source.name));
        set("enable.auto.commit", "false");
        set("enable.auto.offset.store", "false");
        set("enable.partition.eof", "false");
        set("fetch.wait.max.ms", "100");
        set(
            "auto.offset.reset",
            match s.start {
                Start::Earliest => "earliest",
                Start::Latest => "latest",
            },
        );
        set("security.protocol", s.security.name());
        if matches!(s.security, Security::SaslPlaintext | Security::SaslSsl) {
            // Read here and handed over the pipe: never on a command line.
            let file = s.sasl_password_file.as_deref().unwrap_or_default();
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("kafka.sasl_password_file {file:?}: {e}"))?;
            set(
                "sasl.mechanism",
                s.sasl_mechanism.as_deref().unwrap_or_default(),
            );
            set(
                "sasl.username",
                s.sasl_username.as_deref().unwrap_or_default(),
            );
            set("sasl.password", password.trim_end_matches(['\r', '\n']));
        }
        match &s.ca_file {
            Some(ca) => set("ssl.ca.location", ca),
            // The OpenSSL built in looks for the system's CAs where its
            // build put them, not where this system keeps them: librdkafka
            // looks in the usual places instead.
            None if matches!(s.security, Security::Ssl | Security::SaslSsl) => {
                set("ssl.ca.location", "probe")
            }
            None => {}
        }
        ClientProcess::start(&self.program, &self.source.name, c)
    }

    /// Every partition of the source's topics. `assigned`: the consumer
    /// reads partitions already.
    fn partitions(
        &self,
        kc: &mut Kc,
        s: &KafkaSettings,
        assigned: bool,
    ) -> Result<Vec<(String, i32)>, String> {
        let mut out = Vec::new();
        for topic in &s.topics {
            for p in kc.partitions(topic, assigned)? {
                out.push((topic.clone(), p));
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
        let mut kc = match self.client(s) {
            Ok(c) => c,
            Err(e) => return End::Again { error: Some(e) },
        };
        let parts = match self.partitions(&mut kc, s, false) {
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
        let at = parts
            .iter()
            .map(|(topic, p)| {
                let at = match (stored.get(&(topic.clone(), *p)), s.start) {
                    (Some(next), _) => At::Offset(*next),
                    (None, Start::Earliest) => At::Beginning,
                    (None, Start::Latest) => At::End,
                };
                (topic.clone(), *p, at)
            })
            .collect();
        if let Err(e) = kc.assign(at) {
            return End::Again { error: Some(e) };
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
                self.settle(&mut kc, &mut tracked, in_flight.take());
                return End::Stop;
            }
            if refreshed.elapsed() >= REFRESH {
                self.refresh(&mut kc, &mut tracked, consumed_since, refreshed.elapsed());
                consumed_since = 0;
                refreshed = Instant::now();
            }
            if looked.elapsed() >= PARTITIONS_EVERY {
                looked = Instant::now();
                match self.partitions(&mut kc, s, true) {
                    Ok(now) if now != parts => {
                        tracing::info!(source = %self.source.name, before = parts.len(), now = now.len(), "the topics' partitions changed; assigning them again");
                        self.settle(&mut kc, &mut tracked, in_flight.take());
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
            let (batch, resets) = match kc.gather(s.batch_records, BATCH_BYTES, first_wait, LINGER)
            {
                Ok(b) => {
                    if !b.error.is_empty() {
                        // librdkafka retries by itself (a broker away, a
                        // leader moving): say so, and keep polling.
                        self.fail(b.error, true);
                    }
                    (b.msgs, b.resets)
                }
                Err(e) => {
                    self.settle(&mut kc, &mut tracked, in_flight.take());
                    return End::Again { error: Some(e) };
                }
            };
            consumed_since += batch.len() as u64;
            self.note_resets(resets, &tracked);
            let next = (!batch.is_empty()).then(|| self.prepare(&mut reader, batch));
            if let Some(w) = in_flight.take() {
                let done = match self.finish(w) {
                    Ok(done) => done,
                    Err(end) => return end,
                };
                self.done(&mut kc, &mut tracked, &done);
            }
            in_flight = next.map(|p| self.enqueue(p));
        }
    }

    /// Waits for the write in flight, if any, before the session ends: the
    /// next session starts from the positions the store holds, which must
    /// include it if it is applied at all.
    fn settle(
        &self,
        kc: &mut Kc,
        tracked: &mut BTreeMap<(String, i32), Tracked>,
        w: Option<InFlight>,
    ) {
        if let Some(w) = w
            && let Ok(batch) = self.finish(w)
        {
            self.done(kc, tracked, &batch);
        }
    }

    /// A batch applied: its positions are the consumer's, committed to the
    /// group (for monitoring tools only: never read back).
    fn done(&self, kc: &mut Kc, tracked: &mut BTreeMap<(String, i32), Tracked>, batch: &[Msg]) {
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
        let commit = tracked
            .iter()
            .filter(|(_, t)| t.position >= 0)
            .map(|((topic, p), t)| (topic.clone(), *p, t.position))
            .collect();
        // A process that fails here fails the next poll too, which ends
        // the session: the batch is applied and its positions logged.
        let _ = kc.commit(commit);
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
    fn note_resets(&self, resets: Vec<String>, tracked: &BTreeMap<(String, i32), Tracked>) {
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
        kc: &mut Kc,
        tracked: &mut BTreeMap<(String, i32), Tracked>,
        consumed: u64,
        over: Duration,
    ) {
        // Brokers that do not answer one partition are not asked about the
        // next (each ask waits up to WATERMARK_TIMEOUT): the ends stay as
        // last known. Asked [`ENDS_AT_ONCE`] at a time, so that a stop is
        // seen between them.
        let keys: Vec<(String, i32)> = tracked.keys().cloned().collect();
        let mut answered = true;
        for chunk in keys.chunks(ENDS_AT_ONCE) {
            if !answered || self.stopped() {
                break;
            }
            // A process that fails here fails the next poll too, which
            // ends the session.
            let highs = kc
                .ends(chunk.to_vec(), WATERMARK_TIMEOUT)
                .unwrap_or_default();
            answered = highs.len() == chunk.len();
            for (k, high) in chunk.iter().zip(highs) {
                if let Some(t) = tracked.get_mut(k) {
                    t.high = high;
                }
            }
        }
        let mut past_end = Vec::new();
        for ((topic, p), t) in tracked.iter_mut() {
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
