//! The Kafka client process: `tagstore kafka-client`, started by the
//! server for each consuming session of a Kafka source
//! ([`super::process`]), holds librdkafka and does what the server asks
//! ([`super::wire`]) on its standard input and output.
//!
//! librdkafka is C: a fault in it (a crash on a broker's answer it did not
//! expect, as 2.12.1 crashes on the answer a test broker gives for a topic
//! deleted while it is read) ends this process, and the server's consumer
//! sees the pipe close, says so in the source's status and starts another
//! from the positions the store holds.
//!
//! This room owns librdkafka and nothing else: no store, no records (the
//! messages go to the server as bytes), no files but what librdkafka's
//! settings name (a CA file).

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::wire::{
    Answer, At, FrameError, MAX_MESSAGE, METADATA_TIMEOUT, Msg, Request, VERSION, read_frame,
    write_frame,
};

/// What librdkafka says as it works: its error events carry a reason
/// (a TLS handshake refused, a SASL login failed, a connection refused)
/// that the error codes the calls return do not; the first few since the
/// last answer that told them are kept, and its warnings go to the log at
/// debug.
struct Heard {
    source: String,
    reasons: Mutex<Vec<(Instant, String)>>,
    /// Its reports of a position the brokers do not hold (an offset out
    /// of range, read on from `start`), for the next batch to carry.
    resets: Mutex<Vec<String>>,
    /// Its last report of a fetch answered with more bytes than a source
    /// takes ([`MAX_MESSAGE`]), and when: a message too long for the
    /// source. librdkafka says so at most every 30 s, then only that the
    /// broker is down; every error within [`OVERSIZED_FOR`] of it names
    /// the cause.
    oversized: Mutex<Option<(Instant, String)>>,
}

/// How long a fetch answered with too many bytes is named in the errors
/// that follow (librdkafka repeats it at most every 30 s).
const OVERSIZED_FOR: Duration = Duration::from_secs(75);

/// What librdkafka says when a broker's answer is longer than
/// `receive.message.max.bytes`.
const OVERSIZED_SAYS: &str = "Invalid response size";

/// Position resets kept between two batches (a few ms).
const RESETS: usize = 64;

/// Reasons kept between two answers that tell them (the first are the
/// telling ones: "all brokers are down" follows what brought each one
/// down), for at most [`REASONS_FOR`] (an older one is not told with a new
/// error).
const REASONS: usize = 3;
const REASONS_FOR: Duration = Duration::from_secs(60);

impl ClientContext for Heard {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let serious = matches!(
            level,
            RDKafkaLogLevel::Emerg
                | RDKafkaLogLevel::Alert
                | RDKafkaLogLevel::Critical
                | RDKafkaLogLevel::Error
        );
        if fac == "OFFSET" && (serious || matches!(level, RDKafkaLogLevel::Warning)) {
            let mut resets = self.resets.lock();
            if resets.len() < RESETS {
                resets.push(message.to_string());
            }
        }
        // At debug only: it repeats itself at each reconnection, and what
        // matters reaches the server's log with the error it caused.
        tracing::debug!(source = %self.source, facility = fac, "librdkafka: {message}");
        // A connection that failed ("FAIL": refused, a TLS handshake, a
        // SASL login) says why only here.
        if fac == "FAIL" || serious {
            self.heard(message);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(source = %self.source, %error, reason, "librdkafka error");
        self.heard(reason);
    }
}

impl ConsumerContext for Heard {}

impl Heard {
    /// Keeps a reason: the first few distinct ones, without librdkafka's
    /// thread name and its "(after N ms in state …)".
    fn heard(&self, reason: &str) {
        let reason = match reason.strip_prefix("[thrd:") {
            Some(rest) => rest.split_once("]: ").map_or(reason, |(_, r)| r),
            None => reason,
        };
        let reason = reason.split(" (after ").next().unwrap_or(reason).trim();
        if reason.contains(OVERSIZED_SAYS) {
            // Without its advice to raise the limit: the source sets it.
            let what = reason.split(": increase ").next().unwrap_or(reason);
            *self.oversized.lock() = Some((Instant::now(), what.to_string()));
        }
        let mut kept = self.reasons.lock();
        kept.retain(|(at, _)| at.elapsed() < REASONS_FOR);
        if kept.len() < REASONS && !kept.iter().any(|(_, r)| r == reason) {
            kept.push((Instant::now(), reason.to_string()));
        }
    }

    /// What an error of the brokers means when they lately answered a
    /// fetch with more than a source takes: a message too long, which the
    /// source cannot read past (librdkafka itself says only that the
    /// broker went down); empty otherwise.
    fn oversized(&self) -> String {
        let kept = self.oversized.lock();
        match &*kept {
            Some((at, reason)) if at.elapsed() < OVERSIZED_FOR => format!(
                "a message is longer than a source takes ({} MiB): the brokers answered a \
                 fetch with more bytes than that ({reason}); the source cannot read past \
                 it, at the position of one of its partitions (see its partitions), \
                 until the topic no longer holds it (deleted with kafka-delete-records \
                 or past the topic's retention: the source then goes on from its \
                 `start`, as from any position the brokers no longer hold, and says \
                 so); ",
                MAX_MESSAGE >> 20
            ),
            _ => String::new(),
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

type Kc = BaseConsumer<Heard>;

/// Runs the client process until the server closes its end of the pipe:
/// the exit code is 0 then, 2 when the conversation went wrong (said on
/// standard error, which is the server's log).
pub fn run(source: &str) -> u8 {
    // Ends with the server, however it ends: a server killed with -9 has
    // no chance to close the pipe while librdkafka waits on a broker.
    // Named for `top` (it was started as /proc/self/exe: "exe").
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number, and with
    // PR_SET_NAME reads a NUL-terminated string that outlives the call.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        libc::prctl(libc::PR_SET_NAME, c"tagstore-kafka".as_ptr());
    }
    let _span = tracing::info_span!("kafka-client", source).entered();
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    match serve(&mut input, &mut output) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "Kafka client process ends");
            2
        }
    }
}

fn serve(input: &mut impl Read, output: &mut impl Write) -> Result<(), String> {
    let first = match read_frame(input) {
        Ok(b) => b,
        Err(FrameError::Closed) => return Ok(()),
        Err(e) => return Err(format!("reading the first request: {e}")),
    };
    let (kc, brokers) = match Request::decode(&first) {
        Ok(Request::Hello {
            version,
            source,
            settings,
        }) if version == VERSION => {
            let brokers = settings
                .iter()
                .find(|(k, _)| k == "bootstrap.servers")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            match consumer(source, settings) {
                Ok(kc) => {
                    answer(output, &Answer::Done)?;
                    (kc, brokers)
                }
                Err(e) => {
                    answer(output, &Answer::Failed(e))?;
                    return Ok(());
                }
            }
        }
        Ok(Request::Hello { version, .. }) => {
            let why = format!("protocol version {version}; this client speaks {VERSION}");
            answer(output, &Answer::Failed(why.clone()))?;
            return Err(why);
        }
        Ok(other) => return Err(format!("a first request that is not a hello: {other:?}")),
        Err(e) => return Err(format!("the first request: {e}")),
    };
    loop {
        let body = match read_frame(input) {
            Ok(b) => b,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(format!("reading a request: {e}")),
        };
        let request = Request::decode(&body).map_err(|e| format!("a request: {e}"))?;
        let a = match request {
            Request::Hello { .. } => return Err("a second hello".into()),
            Request::Partitions { topic, assigned } => partitions(&kc, &brokers, &topic, assigned),
            Request::Assign { at } => assign(&kc, at),
            Request::Gather {
                most,
                bytes,
                first_wait_ms,
                linger_ms,
            } => gather(
                &kc,
                &brokers,
                most as usize,
                bytes as usize,
                Duration::from_millis(first_wait_ms.into()),
                Duration::from_millis(linger_ms.into()),
            ),
            Request::Commit { next } => {
                let mut commit = TopicPartitionList::new();
                for (topic, p, n) in next {
                    let _ = commit.add_partition_offset(&topic, p, Offset::Offset(n));
                }
                // For monitoring tools only: never read back, so a failure
                // is no one's concern but theirs.
                let _ = kc.commit(&commit, CommitMode::Async);
                Answer::Done
            }
            Request::Ends {
                partitions,
                timeout_ms,
            } => {
                let mut highs = Vec::with_capacity(partitions.len());
                for (topic, p) in partitions {
                    match kc.fetch_watermarks(&topic, p, Duration::from_millis(timeout_ms.into())) {
                        Ok((_, high)) => highs.push(high),
                        Err(_) => break,
                    }
                }
                Answer::Ends(highs)
            }
        };
        answer(output, &a)?;
    }
}

fn answer(output: &mut impl Write, a: &Answer) -> Result<(), String> {
    write_frame(output, &a.encode()).map_err(|e| format!("answering the server: {e}"))
}

fn consumer(source: String, settings: Vec<(String, String)>) -> Result<Kc, String> {
    let mut c = ClientConfig::new();
    for (k, v) in settings {
        c.set(k, v);
    }
    c.set("receive.message.max.bytes", MAX_MESSAGE.to_string());
    c.set_log_level(RDKafkaLogLevel::Warning);
    c.create_with_context(Heard {
        source,
        reasons: Mutex::new(Vec::new()),
        resets: Mutex::new(Vec::new()),
        oversized: Mutex::new(None),
    })
    .map_err(|e| format!("cannot make a Kafka client: {e}"))
}

fn partitions(kc: &Kc, brokers: &str, topic: &str, assigned: bool) -> Answer {
    let md = match kc.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
        Ok(md) => md,
        Err(e) => {
            if !assigned {
                // Its events: no message comes before an assignment. (A
                // poll that serves a log line answers `None`.)
                for _ in 0..256 {
                    let _ = kc.poll(Duration::ZERO);
                }
            }
            return Answer::Failed(format!(
                "brokers {brokers}: metadata of topic {topic:?}: {e}{}",
                kc.context().told()
            ));
        }
    };
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Answer::Failed(format!("topic {topic:?}: the brokers do not list it"));
    };
    if let Some(e) = t.error() {
        return Answer::Failed(format!(
            "topic {topic:?}: {}",
            rdkafka::error::RDKafkaErrorCode::from(e)
        ));
    }
    if t.partitions().is_empty() {
        return Answer::Failed(format!("topic {topic:?}: no partitions (does it exist?)"));
    }
    Answer::Partitions(t.partitions().iter().map(|p| p.id()).collect())
}

fn assign(kc: &Kc, at: Vec<(String, i32, At)>) -> Answer {
    let mut tpl = TopicPartitionList::new();
    for (topic, p, at) in at {
        let offset = match at {
            At::Beginning => Offset::Beginning,
            At::End => Offset::End,
            At::Offset(n) => Offset::Offset(n),
        };
        if let Err(e) = tpl.add_partition_offset(&topic, p, offset) {
            return Answer::Failed(format!("partition {topic}/{p}: {e}"));
        }
    }
    match kc.assign(&tpl) {
        Ok(()) => Answer::Done,
        Err(e) => Answer::Failed(format!("cannot assign the partitions: {e}")),
    }
}

/// Up to `most` messages and about `bytes`: waits for the first (at most
/// `first_wait`), then at most `linger` for more.
fn gather(
    kc: &Kc,
    brokers: &str,
    most: usize,
    bytes: usize,
    first_wait: Duration,
    linger: Duration,
) -> Answer {
    let mut msgs: Vec<Msg> = Vec::new();
    let mut error = String::new();
    let mut until = Instant::now() + first_wait;
    let mut held = 0usize;
    while msgs.len() < most && held < bytes {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match kc.poll(left) {
            None => break,
            Some(Ok(m)) => {
                if msgs.is_empty() {
                    until = Instant::now() + linger;
                }
                let payload = m.payload().unwrap_or_default();
                held += payload.len() + m.topic().len() + 32;
                msgs.push(Msg {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    payload: payload.to_vec(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
            Some(Err(e)) if msgs.is_empty() => {
                // librdkafka retries by itself (a broker away, a leader
                // moving): the server says so, and asks again.
                let heard = kc.context();
                error = format!(
                    "{}brokers {brokers}: {e}{}",
                    heard.oversized(),
                    heard.told()
                );
                break;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "Kafka poll");
                break;
            }
        }
    }
    let resets = std::mem::take(&mut *kc.context().resets.lock());
    Answer::Batch {
        msgs,
        error,
        resets,
    }
}
