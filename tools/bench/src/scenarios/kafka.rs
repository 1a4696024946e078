//! The `kafka` scenario: order records consumed from a Kafka topic by the
//! server (a Kafka source), against the same records sent through the
//! `Ingest` stream, each on a fresh store (the issue's target: ≥ 0.8×);
//! then, with records produced at 10,000 a second, the latency from
//! producing a record to a count that reflects it (p50, p99).
//!
//! The broker is `tansu` (as in the tests: `TAGSTORE_TANSU`, the `PATH`
//! or `~/.cargo/bin`), on a free port, its topics in memory. Records are
//! produced in batches (as producers do): the consumer here never resumes
//! mid-batch, where tansu 0.6 would skip records (see `tests/kafka.rs`).
//! Tansu's in-memory storage lists every stored batch of a partition on
//! each fetch, so the broker's own cost grows with the topic: the figures
//! are of tagstore and this broker together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tagstore_proto::{CountRequest, CreateSourceRequest, IngestRequest, ListSourcesRequest};
use tagstore_test_support::Broker;

use crate::*;

/// Partitions of the topic.
const PARTITIONS: u32 = 4;
/// Records a second while latency is measured, and a probe every this many.
const RATE: u64 = 10_000;
const PROBE_EVERY: u64 = 100;

fn definition(broker: &Broker) -> String {
    format!(
        r#"
format = "jsonl"
channel = {{ column = "ch" }}
event_type = {{ column = "type" }}
time = "ts"
time_form = "epoch_ms"
amount = {{ column = "fen", unit = "fen" }}
identities = [{{ type = "jd_pin", column = "pin" }}]

[kafka]
brokers = "{}"
topics = ["orders"]
"#,
        broker.address()
    )
}

fn order(pin: &str, channel: &str, fen: u32) -> String {
    format!(r#"{{"pin":"{pin}","ch":"{channel}","type":"order","ts":1764547200000,"fen":{fen}}}"#)
}

fn producer(broker: &Broker) -> Result<BaseProducer, BoxError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Sends one record, waiting while the producer's queue is full.
fn send(p: &BaseProducer, partition: i32, payload: &str) -> Result<(), BoxError> {
    let mut rec: BaseRecord<(), str> = BaseRecord::to("orders")
        .partition(partition)
        .payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                p.poll(Duration::from_millis(1));
                rec = back;
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

impl Bench {
    pub(crate) async fn kafka(&mut self) -> Result<(), BoxError> {
        let Some(broker) = Broker::start("tagstore-bench kafka") else {
            println!("kafka: skipped (no tansu broker)");
            return Ok(());
        };
        broker.create_topic("orders", PARTITIONS);
        let n = (self.data.customers as usize * 2).clamp(20_000, 200_000);
        let customers = (n as u32 / 4).max(1_000);
        let mut rng = StdRng::seed_from_u64(self.cli.seed);
        let lines: Vec<String> = (0..n)
            .map(|_| {
                order(
                    &format!("p{}", rng.random_range(0..customers)),
                    "shop",
                    rng.random_range(1..200_000),
                )
            })
            .collect();

        // Produced before either store reads them.
        let p = producer(&broker)?;
        let t = Instant::now();
        for (i, line) in lines.iter().enumerate() {
            send(&p, (i % PARTITIONS as usize) as i32, line)?;
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(120))?;
        let produce_secs = t.elapsed().as_secs_f64();

        // From the topic: from the moment the consumer reports its first
        // status to every partition's end.
        let dir = self.work.join("kafka-source");
        std::fs::create_dir_all(&dir)?;
        let server = self.start(&dir, &[])?;
        let mut c = server.client().await?;
        c.create_source(CreateSourceRequest {
            name: "orders".into(),
            definition: definition(&broker),
            ..Default::default()
        })
        .await?;
        let mut started = None;
        let until = Instant::now() + Duration::from_secs(600);
        let kafka_secs = loop {
            let st = c
                .list_sources(ListSourcesRequest {})
                .await?
                .into_inner()
                .sources
                .into_iter()
                .find_map(|s| s.kafka);
            if let Some(st) = st {
                let t0 = *started.get_or_insert_with(Instant::now);
                let at: i64 = st.partitions.iter().map(|p| p.position.max(0)).sum();
                if at >= n as i64 {
                    if st.applied != n as u64 {
                        return Err(format!("the source applied {} of {n}", st.applied).into());
                    }
                    break t0.elapsed().as_secs_f64();
                }
            }
            if Instant::now() > until {
                return Err("the Kafka source did not catch up in 10 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };

        // The same records through Ingest, on a fresh store.
        let ingest_secs = {
            let dir = self.work.join("kafka-ingest");
            std::fs::create_dir_all(&dir)?;
            let mut server = self.start(&dir, &[])?;
            let mut c = server.client().await?;
            let plain = definition(&broker);
            let plain = plain
                .split("[kafka]")
                .next()
                .unwrap_or_default()
                .to_string();
            c.create_source(CreateSourceRequest {
                name: "orders".into(),
                definition: plain,
                ..Default::default()
            })
            .await?;
            let requests: Vec<IngestRequest> = lines
                .chunks(1_000)
                .enumerate()
                .map(|(i, chunk)| IngestRequest {
                    source: if i == 0 {
                        "orders".into()
                    } else {
                        String::new()
                    },
                    seq: i as u64,
                    data: (chunk.join("\n") + "\n").into_bytes(),
                    ..Default::default()
                })
                .collect();
            let t0 = Instant::now();
            let mut stream = c.ingest(tokio_stream::iter(requests)).await?.into_inner();
            let mut accepted = 0;
            while let Some(a) = stream.message().await? {
                accepted += a.accepted;
            }
            let secs = t0.elapsed().as_secs_f64();
            if accepted != n as u64 {
                return Err(format!("Ingest accepted {accepted} of {n}").into());
            }
            server.stop()?;
            secs
        };

        // Produce to count: records at RATE a second for the scenario's
        // seconds, every PROBE_EVERY-th one a probe (a new customer on
        // channel "probe"); a client counts `order_count:probe >= 1` in a
        // loop and takes each probe's latency when the count covers it.
        let seconds = self.cli.seconds.max(3.0);
        let total = (RATE as f64 * seconds) as u64;
        let probes = total / PROBE_EVERY;
        let sent_at: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
        let produced = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let producing = {
            let sent_at = sent_at.clone();
            let produced = produced.clone();
            let failed = failed.clone();
            let p = producer(&broker)?;
            let seed = self.cli.seed;
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x51);
                let t0 = Instant::now();
                for i in 0..total {
                    // Paced: record i leaves at i / RATE seconds.
                    let due = t0 + Duration::from_secs_f64(i as f64 / RATE as f64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let line = if i % PROBE_EVERY == 0 {
                        order(&format!("probe{}", i / PROBE_EVERY), "probe", 1)
                    } else {
                        order(
                            &format!("p{}", rng.random_range(0..customers)),
                            "shop",
                            rng.random_range(1..200_000),
                        )
                    };
                    if send(&p, (i % PARTITIONS as u64) as i32, &line).is_err() {
                        failed.store(true, Ordering::Relaxed);
                        return;
                    }
                    if i % PROBE_EVERY == 0
                        && let Ok(mut at) = sent_at.lock()
                    {
                        at.push(Instant::now());
                    }
                    p.poll(Duration::ZERO);
                    produced.store(i + 1, Ordering::Relaxed);
                }
                let _ = p.flush(Duration::from_secs(60));
            })
        };
        // Beside it, the broker's own part: a bare consumer of the topic
        // (librdkafka, the same fetch settings as the server's) noting when
        // each probe reaches it.
        let received: Arc<std::sync::Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let bare_stop = Arc::new(AtomicBool::new(false));
        let bare = {
            let kc: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", broker.address())
                .set("group.id", "bench-bare")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "100")
                .create()?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS as i32 {
                tpl.add_partition_offset("orders", p, Offset::End)?;
            }
            kc.assign(&tpl)?;
            let received = received.clone();
            let stop = bare_stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(Ok(m)) = kc.poll(Duration::from_millis(50)) {
                        let payload = m.payload().unwrap_or_default();
                        let text = String::from_utf8_lossy(payload);
                        if let Some(k) = text
                            .strip_prefix(r#"{"pin":"probe"#)
                            .and_then(|r| r.split('"').next())
                            .and_then(|k| k.parse::<u64>().ok())
                            && let Ok(mut r) = received.lock()
                        {
                            r.push((k, Instant::now()));
                        }
                    }
                }
            })
        };
        let mut latencies = Vec::with_capacity(probes as usize);
        let until = Instant::now() + Duration::from_secs_f64(seconds + 60.0);
        while (latencies.len() as u64) < probes {
            if failed.load(Ordering::Relaxed) {
                return Err("producing to the broker failed".into());
            }
            if Instant::now() > until {
                return Err(format!(
                    "{} of {probes} probes counted a minute after the last was produced",
                    latencies.len()
                )
                .into());
            }
            let seen = match c
                .count(CountRequest {
                    queries: vec!["\"order_count:probe\" >= 1".into()],
                    ..Default::default()
                })
                .await
            {
                Ok(r) => r.into_inner().counts.first().copied().unwrap_or(0),
                // Not a field until the first probe is applied.
                Err(e) if e.code() == tonic::Code::NotFound => 0,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            {
                let sent = sent_at.lock().map_err(|_| "the producer thread panicked")?;
                while (latencies.len() as u64) < seen.min(sent.len() as u64) {
                    latencies.push((now - sent[latencies.len()]).as_secs_f64() * 1e3);
                }
            }
            // A count a millisecond: the resolution of the figure, without
            // taking the machine's two cores from the server.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = producing.join();
        bare_stop.store(true, Ordering::Relaxed);
        let _ = bare.join();
        let pct = |mut v: Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        let (p50, p99) = (pct(latencies.clone(), 0.5), pct(latencies.clone(), 0.99));
        let broker_part: Vec<f64> = {
            let sent = sent_at.lock().map_err(|_| "the producer thread panicked")?;
            let got = received.lock().map_err(|_| "the bare consumer panicked")?;
            got.iter()
                .filter_map(|(k, at)| {
                    sent.get(*k as usize)
                        .map(|s| at.saturating_duration_since(*s).as_secs_f64() * 1e3)
                })
                .collect()
        };
        let (b50, b99) = (
            pct(broker_part.clone(), 0.5),
            pct(broker_part.clone(), 0.99),
        );

        let label =
            format!("{n} orders ({customers} buyers) in a topic of {PARTITIONS} partitions");
        self.report.add(
            "kafka",
            &format!("{label}: consumed by a Kafka source, records/s"),
            "/s",
            Better::Higher,
            Some(n as f64 / kafka_secs),
            None,
        );
        self.report.add(
            "kafka",
            "the same records through Ingest (1,000 a batch, one stream), records/s",
            "/s",
            Better::Higher,
            Some(n as f64 / ingest_secs),
            None,
        );
        self.report.add(
            "kafka",
            "Kafka source records/s ÷ Ingest records/s (target ≥ 0.8)",
            "×",
            Better::Higher,
            Some(ingest_secs / kafka_secs),
            None,
        );
        self.report.add(
            "kafka",
            &format!("produce to count at {RATE} records/s: p50"),
            "ms",
            Better::Lower,
            p50,
            None,
        );
        self.report.add(
            "kafka",
            &format!("produce to count at {RATE} records/s: p99"),
            "ms",
            Better::Lower,
            p99,
            None,
        );
        self.report.add(
            "kafka",
            "the broker's part: produce to a bare consumer's receipt, p50",
            "ms",
            Better::Lower,
            b50,
            None,
        );
        self.report.add(
            "kafka",
            "the broker's part: produce to a bare consumer's receipt, p99",
            "ms",
            Better::Lower,
            b99,
            None,
        );
        self.report.extra.insert(
            "kafka".into(),
            json!({ "records": n, "customers": customers, "partitions": PARTITIONS,
                    "produce_seconds": produce_secs, "kafka_seconds": kafka_secs,
                    "ingest_seconds": ingest_secs, "latency_rate_per_s": RATE,
                    "probes": latencies.len(), "latency_p50_ms": p50, "latency_p99_ms": p99,
                    "bare_consumer_p50_ms": b50, "bare_consumer_p99_ms": b99 }),
        );
        drop(server);
        Ok(())
    }
}
