//! Kafka sources against a real Kafka-protocol broker (`tansu`, see
//! `tagstore_test_support::Broker`) and the real server binary: topics
//! consumed into facts equal to a model, two sources on one topic each
//! consuming all of it, malformed records rejected with their partition and
//! offset, the consumer group's offsets committed, and kill -9 at random
//! moments while consuming applying every record exactly once (the events
//! carry no event id, so a record applied twice would show); a paused
//! source consuming nothing, also after a kill -9, until resumed; the
//! broker gone mid-stream (cut off behind a gate) and back, every record
//! applied once; the metrics endpoint saying what the status says; TLS to
//! a broker that serves it (a TLS front before tansu, which does not serve
//! TLS itself), and a certificate not trusted reported in librdkafka's
//! words; SASL (PLAIN and SCRAM-SHA-256) to a broker that asks for it (a
//! SASL front before tansu), a wrong password and a mechanism not offered
//! reported; messages of 40 MiB and of the largest size a source takes
//! applied or rejected alone, and one over it stopping its source with a
//! status that says why.
#![cfg(feature = "kafka")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Client, int_value};
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tagstore::proto::*;

/// Held by the tests that move 100 MiB or more through the broker and by
/// the one whose check depends on the consumer lagging behind the producer
/// (`redefining_…`): run beside each other on two cores, the big ones can
/// slow the producer until the consumer never lags.
static APART: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where each message produced went: its index, partition and offset.
type Delivered = Arc<std::sync::Mutex<Vec<(usize, i32, i64)>>>;

/// Where each message went, and the ones not delivered, with why.
struct Reports(Delivered, Arc<std::sync::Mutex<Vec<String>>>);

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, r: &rdkafka::message::DeliveryResult<'_>, i: Box<usize>) {
        match r {
            Ok(m) => self.0.lock().unwrap().push((*i, m.partition(), m.offset())),
            Err((e, _)) => self.1.lock().unwrap().push(format!("message {i}: {e}")),
        }
    }
}

/// Produces `payloads` to `topic`, message i to partition `part(i)`;
/// where each one went, by index.
fn produce(
    broker: &Broker,
    topic: &str,
    payloads: &[(i32, Vec<u8>)],
    first: usize,
) -> Vec<(usize, i32, i64)> {
    produce_with(broker, topic, payloads, first, &[])
}

/// [`produce`], with more client settings (security).
fn produce_with(
    broker: &Broker,
    topic: &str,
    payloads: &[(i32, Vec<u8>)],
    first: usize,
    settings: &[(&str, &str)],
) -> Vec<(usize, i32, i64)> {
    let delivered: Delivered = Arc::default();
    let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut config = ClientConfig::new();
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let p: BaseProducer<Reports> = config
        .set("bootstrap.servers", broker.address())
        .set("linger.ms", "5")
        // One record per produced batch: tansu 0.6's in-memory storage
        // serves a fetch from the first batch whose base offset is at or
        // after the offset asked for (skipping the rest of the batch that
        // holds it), and reports a wrong end for partitions written in
        // batches of many. Real Kafka does neither; a consumer resuming
        // mid-batch is exactly what these tests exercise.
        .set("batch.num.messages", "1")
        .create_with_context(Reports(delivered.clone(), failed.clone()))
        .expect("producer");
    for (i, (part, payload)) in payloads.iter().enumerate() {
        let mut rec: BaseRecord<(), Vec<u8>, Box<usize>> =
            BaseRecord::with_opaque_to(topic, Box::new(first + i))
                .partition(*part)
                .payload(payload);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, back)) => {
                    // The queue is full: let it drain.
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce: {e}"
                    );
                    p.poll(Duration::from_millis(10));
                    rec = back;
                }
            }
        }
        p.poll(Duration::ZERO);
    }
    // One request per message: on a busy machine tens of thousands take
    // a while.
    p.flush(Duration::from_secs(300)).expect("flush");
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} messages not delivered, the first: {:?}",
        failed.len(),
        failed.first()
    );
    let mut out = delivered.lock().unwrap().clone();
    out.sort();
    assert_eq!(out.len(), payloads.len(), "every message delivered");
    out
}

/// A JSON Lines source of orders on `topic`, with channel `channel`.
fn definition(broker: &Broker, topic: &str, channel: &str, group: &str, batch: usize) -> String {
    format!(
        r#"
format = "jsonl"
channel = "{channel}"
event_type = {{ column = "type" }}
time = "ts"
time_form = "epoch_ms"
amount = {{ column = "fen", unit = "fen" }}
identities = [{{ type = "jd_pin", column = "pin" }}]

[kafka]
brokers = "{}"
topics = ["{topic}"]
group = "{group}"
batch_records = {batch}
"#,
        broker.address()
    )
}

/// An order of `fen` by customer `pin`, as a message.
fn order(pin: &str, fen: i64) -> Vec<u8> {
    format!(r#"{{"pin":"{pin}","type":"order","ts":1764547200000,"fen":{fen}}}"#).into_bytes()
}

async fn create_source(c: &mut Client, name: &str, definition: String) {
    c.create_source(CreateSourceRequest {
        name: name.into(),
        definition,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create source {name}: {e}"));
}

async fn status(c: &mut Client, name: &str) -> Option<KafkaSourceStatus> {
    let all = c
        .list_sources(ListSourcesRequest {})
        .await
        .expect("list sources")
        .into_inner();
    all.sources
        .into_iter()
        .find(|s| s.name == name)
        .and_then(|s| s.kafka)
}

/// The end of each partition, from where the messages went.
fn ends(delivered: &[(usize, i32, i64)]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for (_, p, o) in delivered {
        let e = out.entry(*p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    out
}

/// Orders of 30 customers over two partitions, of random amounts, added
/// to `model` (per customer: orders, fen).
fn random_orders(
    rng: &mut rand::rngs::StdRng,
    model: &mut BTreeMap<String, (i64, i64)>,
    n: usize,
) -> Vec<(i32, Vec<u8>)> {
    (0..n)
        .map(|_| {
            let pin = format!("p{}", rng.random_range(0..30));
            let fen = rng.random_range(1..10_000);
            let m = model.entry(pin.clone()).or_default();
            m.0 += 1;
            m.1 += fen;
            (rng.random_range(0..2), order(&pin, fen))
        })
        .collect()
}

/// Every customer's orders and spend as `model` says: each record applied
/// once.
async fn facts_equal_the_model(c: &mut Client, model: &BTreeMap<String, (i64, i64)>) {
    for (pin, (n, fen)) in model {
        let key = format!("jd_pin:{pin}");
        assert_eq!(
            int_value(c, &key, "order_count").await,
            Some(*n),
            "orders of {pin}: each record applied once"
        );
        assert_eq!(int_value(c, &key, "total_spend_fen").await, Some(*fen));
    }
}

/// Waits until `name` has consumed every partition to `ends`; its status.
async fn caught_up(c: &mut Client, name: &str, ends: &BTreeMap<i32, i64>) -> KafkaSourceStatus {
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let st = status(c, name).await;
        if let Some(st) = &st {
            let at: BTreeMap<i32, i64> = st
                .partitions
                .iter()
                .map(|p| (p.partition, p.position))
                .collect();
            if ends.iter().all(|(p, e)| at.get(p) == Some(e)) {
                return st.clone();
            }
        }
        assert!(
            Instant::now() < until,
            "{name} did not catch up to {ends:?} in 90 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_is_consumed_into_facts_equal_to_a_model() {
    let Some(broker) = Broker::start("a_topic_is_consumed_into_facts_equal_to_a_model") else {
        return;
    };
    broker.create_topic("orders", 3);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut c = common::client(&server).await;

    // Orders of 40 customers over three partitions, and among them
    // records that cannot be applied.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut payloads = Vec::new();
    let mut bad = Vec::new();
    for i in 0..1_500 {
        let part = rng.random_range(0..3);
        if i % 200 == 17 {
            let long = order(&"x".repeat(300), 5);
            let (payload, why): (&[u8], &str) = match (i / 250) % 5 {
                0 => (b"{not json", "JSON"),
                1 => (br#"{"type":"order","ts":1764547200000,"fen":5}"#, "identity"),
                2 => (b"   ", "empty message"),
                // Read and mapped, then refused by the engine (a customer
                // key of 300 bytes): the batch is written message by message.
                3 => (&long, "customer key"),
                _ => (
                    b"{\"pin\":\"a\",\"type\":\"order\",\"ts\":1,\"fen\":1}\n{\"pin\":\"b\",\"type\":\"order\",\"ts\":1,\"fen\":1}",
                    "holds 2 records",
                ),
            };
            bad.push((payloads.len(), why));
            payloads.push((part, payload.to_vec()));
            continue;
        }
        let pin = format!("p{}", rng.random_range(0..40));
        let fen = rng.random_range(1..100_000);
        let m = model.entry(pin.clone()).or_default();
        m.0 += 1;
        m.1 += fen;
        payloads.push((part, order(&pin, fen)));
    }
    // Half before the sources exist, half after.
    let mut delivered = produce(&broker, "orders", &payloads[..700], 0);
    create_source(
        &mut c,
        "shop_a",
        definition(&broker, "orders", "shop_a", "group_a", 100),
    )
    .await;
    create_source(
        &mut c,
        "shop_b",
        definition(&broker, "orders", "shop_b", "group_b", 7),
    )
    .await;
    delivered.extend(produce(&broker, "orders", &payloads[700..], 700));
    let ends = ends(&delivered);

    for (source, channel) in [("shop_a", "shop_a"), ("shop_b", "shop_b")] {
        let st = caught_up(&mut c, source, &ends).await;
        assert_eq!(st.state, "running", "{st:?}");
        assert_eq!(
            st.applied,
            (payloads.len() - bad.len()) as u64,
            "{source}: {st:?}"
        );
        assert_eq!(st.rejected, bad.len() as u64, "{source}: {st:?}");
        assert!(
            st.partitions
                .iter()
                .all(|p| p.lag_records == 0 || p.high_watermark < 0)
        );
        assert_eq!(st.unlisted_partitions, 0);
        assert_eq!(
            st.lag_records,
            st.partitions.iter().map(|p| p.lag_records).sum::<i64>()
        );
        // The metrics endpoint says what the status says.
        let text = common::http(
            server.metrics_addr.as_deref().expect("metrics address"),
            b"GET /metrics HTTP/1.1\r\n\r\n",
        );
        let m = |name: &str, labels: &str| common::sample(&text, &format!("{name}{{{labels}}}"));
        let src = format!("source=\"{source}\"");
        assert_eq!(
            m(
                "tagstore_kafka_records_total",
                &format!("{src},outcome=\"applied\"")
            ),
            st.applied as f64
        );
        assert_eq!(
            m(
                "tagstore_kafka_records_total",
                &format!("{src},outcome=\"rejected\"")
            ),
            bad.len() as f64
        );
        assert_eq!(
            m(
                "tagstore_kafka_source_state",
                &format!("{src},state=\"running\"")
            ),
            1.0
        );
        assert_eq!(
            m(
                "tagstore_kafka_source_state",
                &format!("{src},state=\"retrying\"")
            ),
            0.0
        );
        for (p, end) in &ends {
            assert_eq!(
                m(
                    "tagstore_kafka_partition_position",
                    &format!("{src},topic=\"orders\",partition=\"{p}\"")
                ),
                *end as f64,
                "{text}"
            );
        }
        assert!(m("tagstore_kafka_lag_records", &src) >= 0.0);
        // Every rejected record named by its partition and offset.
        let rejects: Vec<(i32, i64, &str)> = st
            .recent_rejects
            .iter()
            .map(|r| (r.partition, r.offset, r.reason.as_str()))
            .collect();
        assert_eq!(rejects.len(), bad.len(), "{rejects:?}");
        for (i, why) in &bad {
            let (_, p, o) = delivered[*i];
            assert!(
                rejects
                    .iter()
                    .any(|(rp, ro, reason)| *rp == p && *ro == o && reason.contains(why)),
                "record {i} ({why}) at {p}/{o} not among {rejects:?}"
            );
        }
        for (pin, (n, fen)) in &model {
            let key = format!("jd_pin:{pin}");
            assert_eq!(
                int_value(&mut c, &key, &format!("order_count:{channel}")).await,
                Some(*n),
                "{source}: orders of {pin}"
            );
            assert_eq!(
                int_value(&mut c, &key, &format!("spend_fen:{channel}")).await,
                Some(*fen),
                "{source}: spend of {pin}"
            );
        }
    }
    for (pin, (n, _)) in &model {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:{pin}"), "order_count").await,
            Some(2 * n),
            "both sources' orders of {pin}"
        );
    }

    // The groups' offsets in Kafka say the same (for monitoring tools).
    for group in ["group_a", "group_b"] {
        let kc: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", broker.address())
            .set("group.id", group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in ends.keys() {
            tpl.add_partition("orders", *p);
        }
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let got = kc
                .committed_offsets(tpl.clone(), Duration::from_secs(10))
                .unwrap();
            let at: BTreeMap<i32, i64> = got
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect();
            if at == ends {
                break;
            }
            assert!(
                Instant::now() < until,
                "{group}: committed {at:?}, want {ends:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Dropping a source stops its consumer; the other goes on.
    c.drop_source(DropSourceRequest {
        name: "shop_b".into(),
    })
    .await
    .unwrap();
    let more = vec![(0, order("p0", 10))];
    let d = produce(&broker, "orders", &more, payloads.len());
    let mut ends2 = ends.clone();
    ends2.insert(0, d[0].2 + 1);
    caught_up(&mut c, "shop_a", &ends2).await;
    assert_eq!(
        int_value(&mut c, "jd_pin:p0", "order_count:shop_a").await,
        Some(model["p0"].0 + 1)
    );
    assert!(status(&mut c, "shop_b").await.is_none());
    assert_eq!(
        int_value(&mut c, "jd_pin:p0", "order_count:shop_b").await,
        Some(model["p0"].0)
    );
    let _ = dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_consuming_applies_every_record_once() {
    let Some(broker) = Broker::start("kill_9_while_consuming_applies_every_record_once") else {
        return;
    };
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "tagstore-orders", 13),
    )
    .await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut delivered = Vec::new();
    // Records that cannot be applied, by their index among those sent:
    // rejected whether a batch is written whole or message by message.
    let mut bad = Vec::new();
    let mut sent = 0;
    let mut mid_stream = 0;
    for round in 0..8 {
        // Records produced while the server consumes, then a kill -9 at a
        // random moment.
        let mut payloads = random_orders(&mut rng, &mut model, 3_000);
        let mut picked = std::collections::BTreeSet::new();
        while picked.len() < 4 {
            picked.insert(rng.random_range(0..payloads.len()));
        }
        for (k, at) in picked.into_iter().enumerate() {
            let payload = if k % 2 == 0 {
                b"{not json".to_vec()
            } else {
                order(&"x".repeat(300), 5)
            };
            // In place of an order: taken out of the model.
            let (_, was) = std::mem::replace(&mut payloads[at], (rng.random_range(0..2), payload));
            let was: serde_json::Value = serde_json::from_slice(&was).unwrap();
            let pin = was["pin"].as_str().unwrap();
            let m = model.get_mut(pin).unwrap();
            m.0 -= 1;
            m.1 -= was["fen"].as_i64().unwrap();
            bad.push(sent + at);
        }
        model.retain(|_, m| m.0 > 0);
        delivered.extend(produce(&broker, "events", &payloads, sent));
        sent += payloads.len();
        // Once its consumer runs (it starts within a second of the
        // server), a random moment later.
        let until = Instant::now() + Duration::from_secs(30);
        while status(&mut c, "orders")
            .await
            .is_none_or(|s| s.state != "running")
        {
            assert!(Instant::now() < until, "the consumer did not start in 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Killed while it consumes, in most rounds (counted below): once it
        // has applied a random part of this round's records (a moment
        // taken by time alone missed the stream on a quick day).
        let target = (sent - payloads.len() + rng.random_range(300..2700)) as i64;
        let applied = |st: &Option<_>| {
            st.as_ref().map_or(0, |st: &KafkaSourceStatus| {
                st.partitions.iter().map(|p| p.position.max(0)).sum::<i64>()
            })
        };
        let until = Instant::now() + Duration::from_secs(30);
        while applied(&status(&mut c, "orders").await) < target && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if applied(&status(&mut c, "orders").await) < sent as i64 {
            mid_stream += 1;
        }
        let clients = children_of(server.pid().expect("a pid"));
        server.kill();
        // Its Kafka client process ends with it (the parent's death
        // signal), not left reading the topic.
        let until = Instant::now() + Duration::from_secs(10);
        for client in &clients {
            while std::fs::read_to_string(format!("/proc/{client}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(
                    Instant::now() < until,
                    "Kafka client process {client} outlives the server killed with -9"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        server = common::start(dir.path(), &[]);
        c = common::client(&server).await;
        let _ = round;
    }
    assert!(
        mid_stream >= 4,
        "killed mid-stream in {mid_stream} of 8 rounds"
    );
    let ends = ends(&delivered);
    let st = caught_up(&mut c, "orders", &ends).await;
    facts_equal_the_model(&mut c, &model).await;
    // Every record that could not be applied is reported once, whichever
    // server consumed it: the report is kept in the store with the
    // positions.
    let mut want: Vec<(i32, i64)> = bad
        .iter()
        .map(|i| {
            let (_, p, o) = delivered.iter().find(|d| d.0 == *i).unwrap();
            (*p, *o)
        })
        .collect();
    want.sort_unstable();
    let listed = |st: &KafkaSourceStatus| {
        let mut got: Vec<(i32, i64)> = st
            .recent_rejects
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect();
        got.sort_unstable();
        got
    };
    assert_eq!(listed(&st), want, "{:?}", st.recent_rejects);
    assert!(st.recent_rejects.iter().all(|r| r.at_ms > 0 && !r.skipped));
    // And once more after a clean restart.
    server.stop().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let st = caught_up(&mut c, "orders", &ends).await;
    assert_eq!(listed(&st), want);
    for (pin, (n, _)) in &model {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:{pin}"), "order_count").await,
            Some(*n)
        );
    }
}

/// Redefining a source while it consumes stops its consumer once the
/// write in flight is done and starts the new one from the store's
/// positions: every record applied once, whatever the batch size in
/// between.
/// The live processes whose parent is `pid` (from /proc; not one that has
/// ended and is not yet waited for).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: the name may hold spaces, not ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().take(2).collect())
            .unwrap_or_default();
        if fields.len() == 2 && fields[0] != "Z" && fields[1].parse::<u32>().ok() == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// The Kafka client (librdkafka) runs in a process of its own: when it
/// crashes (here: a SIGSEGV sent to it, as a fault in the C library would
/// end it), the server goes on, the status says what happened, a new
/// process takes over from the positions the store holds, and every record
/// is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_client_process_that_crashes_ends_a_session_not_the_server() {
    let Some(broker) =
        Broker::start("a_kafka_client_process_that_crashes_ends_a_session_not_the_server")
    else {
        return;
    };
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let pid = server.pid().expect("the server's pid");
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "g", 50),
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(53);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut delivered = Vec::new();
    let mut sent = 0;
    let mut crashed = 0;
    let mut seen = false;
    let mut killed: Vec<u32> = Vec::new();
    for _ in 0..5 {
        let payloads = random_orders(&mut rng, &mut model, 2_000);
        delivered.extend(produce(&broker, "events", &payloads, sent));
        sent += payloads.len();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        let until = Instant::now() + Duration::from_secs(30);
        let clients = loop {
            let clients = children_of(pid);
            if !clients.is_empty() && !clients.iter().any(|c| killed.contains(c)) {
                break clients;
            }
            assert!(
                Instant::now() < until,
                "no Kafka client process in 30 s: {}",
                server.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(clients.len(), 1, "one client process per consuming source");
        // A SIGSEGV sent (not a fault) is taken the first time by Rust's
        // stack overflow handler, which only puts back the default: sent
        // until the process is gone.
        let until = Instant::now() + Duration::from_secs(10);
        while children_of(pid).contains(&clients[0]) {
            assert!(Instant::now() < until, "{} outlives SIGSEGV", clients[0]);
            // SAFETY: kill(2) with a pid and a signal number.
            unsafe { libc::kill(clients[0] as libc::pid_t, libc::SIGSEGV) };
            std::thread::sleep(Duration::from_millis(20));
        }
        killed.push(clients[0]);
        crashed += 1;
        // The status says so until the next session reads again.
        let until = Instant::now() + Duration::from_secs(5);
        while !seen && Instant::now() < until {
            let st = status(&mut c, "orders").await.expect("a status");
            if st.state == "retrying" && st.error.contains("killed by signal 11") {
                assert!(st.error.contains("Kafka client process"), "{st:?}");
                seen = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(seen, "no status said the client process crashed");
    let st = caught_up(&mut c, "orders", &ends(&delivered)).await;
    assert_eq!((st.state.as_str(), st.rejected), ("running", 0), "{st:?}");
    assert_eq!(st.error, "", "{st:?}");
    facts_equal_the_model(&mut c, &model).await;
    let log = server.stderr();
    assert!(
        log.matches("killed by signal 11").count() >= crashed,
        "each crash in the server's log: {log}"
    );
    // Dropped: its process ends with it.
    c.drop_source(DropSourceRequest {
        name: "orders".into(),
    })
    .await
    .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !children_of(pid).is_empty() {
        assert!(
            Instant::now() < until,
            "a client process outlives its source"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redefining_a_source_while_it_consumes_applies_every_record_once() {
    let _apart = APART.lock().await;
    let Some(broker) =
        Broker::start("redefining_a_source_while_it_consumes_applies_every_record_once")
    else {
        return;
    };
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "tagstore-orders", 7),
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut delivered = Vec::new();
    let mut sent = 0;
    let mut mid_stream = 0;
    for round in 0..6 {
        let payloads = random_orders(&mut rng, &mut model, 3_000);
        delivered.extend(produce(&broker, "events", &payloads, sent));
        sent += payloads.len();
        tokio::time::sleep(Duration::from_millis(rng.random_range(10..200))).await;
        if let Some(st) = status(&mut c, "orders").await {
            let at: i64 = st.partitions.iter().map(|p| p.position.max(0)).sum();
            if at < sent as i64 {
                mid_stream += 1;
            }
        }
        // Another batch size each time: a new definition.
        let batch = [3, 50, 11, 400, 5, 1000][round];
        c.create_source(CreateSourceRequest {
            name: "orders".into(),
            definition: definition(&broker, "events", "shop", "tagstore-orders", batch),
            replace: true,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert!(
        mid_stream >= 3,
        "redefined mid-stream in {mid_stream} of 6 rounds"
    );
    let st = caught_up(&mut c, "orders", &ends(&delivered)).await;
    assert_eq!(st.rejected, 0, "{st:?}");
    facts_equal_the_model(&mut c, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_gone_mid_stream_is_reported_and_every_record_applied_once_when_back() {
    let Some(broker) = Broker::start_gated(
        "the_broker_gone_mid_stream_is_reported_and_every_record_applied_once_when_back",
    ) else {
        return;
    };
    let gate = broker.gate().expect("a gated broker");
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "tagstore-orders", 10),
    )
    .await;

    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut delivered = Vec::new();
    let mut sent = 0;
    for round in 0..3 {
        let payloads = random_orders(&mut rng, &mut model, 3_000);
        delivered.extend(produce(&broker, "events", &payloads, sent));
        sent += payloads.len();
        // The broker goes away while the consumer is in this round's
        // records (or, should it be quick, soon after), for 3 s.
        let until = Instant::now() + Duration::from_secs(30);
        let before = sent - payloads.len();
        loop {
            let at: i64 = status(&mut c, "orders")
                .await
                .map_or(0, |s| s.partitions.iter().map(|p| p.position.max(0)).sum());
            if at > before as i64 {
                break;
            }
            assert!(
                Instant::now() < until,
                "round {round}: nothing consumed in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.close();
        // The consumer says what is wrong, naming the brokers.
        let until = Instant::now() + Duration::from_secs(30);
        let seen = loop {
            let st = status(&mut c, "orders").await.expect("a status");
            if st.state == "retrying" && st.error.contains(&broker.address()) {
                break st;
            }
            assert!(
                Instant::now() < until,
                "round {round}: the broker gone 30 s and the status does not say so: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(seen.error_at_ms > 0, "{seen:?}");
        let text = common::http(
            server.metrics_addr.as_deref().expect("metrics address"),
            b"GET /metrics HTTP/1.1\r\n\r\n",
        );
        assert_eq!(
            common::sample(
                &text,
                "tagstore_kafka_source_state{source=\"orders\",state=\"retrying\"}"
            ),
            1.0
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        gate.open();
    }
    let ends = ends(&delivered);
    let st = caught_up(&mut c, "orders", &ends).await;
    assert_eq!(st.rejected, 0, "{st:?}");
    // What was wrong is over once the brokers answer (lag is asked every
    // 5 s), even with nothing more to consume.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&mut c, "orders").await.expect("a status");
        if (st.state.as_str(), st.error.as_str(), st.error_at_ms) == ("running", "", 0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the broker back 30 s and the status still says: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    facts_equal_the_model(&mut c, &model).await;
    let _ = dir;
}

/// A topic deleted while its source consumes it: the status says so,
/// naming the topic, and nothing is applied twice; made again (its offsets
/// starting at 0 again), the status says its partitions end before the
/// store's positions, and what to do.
///
/// tansu 0.6 answers a fetch of a deleted topic with a zero topic id and a
/// current leader, and librdkafka 2.12.1 takes that for a leader change of
/// a topic it then looks up by a null name (`rd_kafka_metadata_update_op`):
/// a segmentation fault. Before the Kafka client ran in a process of its
/// own, that took the server down (this test failed at the next call);
/// now it ends the client process, and the session starts another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_while_consumed_is_reported() {
    let Some(broker) = Broker::start("a_topic_deleted_while_consumed_is_reported") else {
        return;
    };
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "g", 100),
    )
    .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let payloads = random_orders(&mut rng, &mut model, 2_000);
    let delivered = produce(&broker, "events", &payloads, 0);
    caught_up(&mut c, "orders", &ends(&delivered)).await;

    broker.delete_topic("events");
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let st = status(&mut c, "orders").await.expect("a status");
        if st.state == "retrying" && st.error.contains("events") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the topic deleted 90 s ago and the status does not say so: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.create_topic("events", 2);
    let again: Vec<(i32, Vec<u8>)> = (0..5).map(|i| (i % 2, order("p1", 1))).collect();
    produce(&broker, "events", &again, 0);
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let st = status(&mut c, "orders").await.expect("a status");
        if st.error.contains("before the store's position") {
            assert!(st.error.contains("drop the source"), "{st:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "the topic made again 90 s ago and the status does not say what is wrong: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    facts_equal_the_model(&mut c, &model).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_and_unreachable_brokers_are_reported_then_recovered_from() {
    let Some(broker) =
        Broker::start("a_missing_topic_and_unreachable_brokers_are_reported_then_recovered_from")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    // Brokers nobody listens at.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let away =
        definition(&broker, "t", "shop", "g", 10).replace(&broker.address(), &nobody.to_string());
    create_source(&mut c, "away", away).await;
    create_source(
        &mut c,
        "later",
        definition(&broker, "later_topic", "shop", "g2", 10),
    )
    .await;

    let wait_for = |name: &'static str, says: String| {
        let mut c = c.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(60);
            loop {
                let st = status(&mut c, name).await;
                if let Some(st) = &st
                    && st.state == "retrying"
                    && st.error.contains(&says)
                {
                    return st.clone();
                }
                assert!(
                    Instant::now() < until,
                    "{name}: no error naming {says:?}: {st:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let st = wait_for("later", "later_topic".into()).await;
    assert!(st.error_at_ms > 0, "{st:?}");
    wait_for("away", nobody.to_string()).await;

    // The topic appears: the consumer finds it and consumes, and the error
    // is gone.
    broker.create_topic("later_topic", 1);
    let d = produce(&broker, "later_topic", &[(0, order("p1", 250))], 0);
    let st = caught_up(&mut c, "later", &ends(&d)).await;
    assert_eq!(
        (st.state.as_str(), st.error.as_str()),
        ("running", ""),
        "{st:?}"
    );
    assert_eq!(
        int_value(&mut c, "jd_pin:p1", "total_spend_fen").await,
        Some(250)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_source_consumes_nothing_until_resumed_also_across_a_kill_9() {
    let Some(broker) =
        Broker::start("a_paused_source_consumes_nothing_until_resumed_also_across_a_kill_9")
    else {
        return;
    };
    broker.create_topic("t", 2);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_source(&mut c, "s", definition(&broker, "t", "shop", "g", 50)).await;
    let mut model: BTreeMap<String, i64> = BTreeMap::new();
    let batch = |from: usize, model: &mut BTreeMap<String, i64>| -> Vec<(i32, Vec<u8>)> {
        (from..from + 100)
            .map(|i| {
                let pin = format!("p{}", i % 7);
                *model.entry(pin.clone()).or_default() += 1;
                ((i % 2) as i32, order(&pin, 1))
            })
            .collect()
    };
    let first = batch(0, &mut model);
    let mut delivered = produce(&broker, "t", &first, 0);
    caught_up(&mut c, "s", &ends(&delivered)).await;
    let after_first = model.clone();

    c.pause_source(PauseSourceRequest { name: "s".into() })
        .await
        .unwrap();
    // Again: nothing changes.
    c.pause_source(PauseSourceRequest { name: "s".into() })
        .await
        .unwrap();
    let paused_at = ends(&delivered);
    let wait_paused = |mut c: Client| async move {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let st = status(&mut c, "s").await;
            if st.as_ref().is_some_and(|s| s.state == "paused") {
                return st.unwrap();
            }
            assert!(Instant::now() < until, "not paused: {st:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_paused(c.clone()).await;
    let second = batch(100, &mut model);
    delivered.extend(produce(&broker, "t", &second, 100));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let check_paused = |st: KafkaSourceStatus| {
        let at: BTreeMap<i32, i64> = st
            .partitions
            .iter()
            .map(|p| (p.partition, p.position))
            .collect();
        assert_eq!(at, paused_at, "positions moved while paused: {st:?}");
    };
    check_paused(wait_paused(c.clone()).await);
    for (pin, n) in &after_first {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:{pin}"), "order_count").await,
            Some(*n),
            "{pin} while paused"
        );
    }
    let listed = c
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sources.iter().any(|s| s.name == "s" && s.paused));

    // Still paused after a kill -9.
    server.kill();
    server = common::start(dir.path(), &[]);
    c = common::client(&server).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    check_paused(wait_paused(c.clone()).await);

    c.resume_source(ResumeSourceRequest { name: "s".into() })
        .await
        .unwrap();
    caught_up(&mut c, "s", &ends(&delivered)).await;
    for (pin, n) in &model {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:{pin}"), "order_count").await,
            Some(*n),
            "{pin} after resuming"
        );
    }

    // Only a source that reads topics, and only one that exists.
    c.create_source(CreateSourceRequest {
        name: "files".into(),
        preset: "jd_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c
        .pause_source(PauseSourceRequest {
            name: "files".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("reads no topics"), "{e}");
    let e = c
        .resume_source(ResumeSourceRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
}

/// A TLS front for `upstream` on `listener`, serving `cert` and `key`
/// (PEM): what a broker with TLS listeners is to its clients (tansu 0.6
/// takes a certificate but does not serve TLS itself).
fn tls_front(listener: std::net::TcpListener, upstream: String, cert: &str, key: &str) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::ServerConfig;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client that fails its handshake (one that does not
                // trust the certificate, or speaks no TLS) is dropped.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
}

/// A CA's PEM and a certificate it signed for 127.0.0.1 (PEM, key PEM).
fn ca_and_leaf() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: OpenSSL looks for a certificate's issuer by name.
    params
        .distinguished_name
        .push(DnType::CommonName, "tagstore test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_reaches_a_broker_that_serves_it_and_a_certificate_not_trusted_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_leaf();
    // The front's port first: the broker advertises it.
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front_port = front.local_addr().unwrap().port();
    let Some(broker) = Broker::start_with(
        "tls_reaches_a_broker_that_serves_it_and_a_certificate_not_trusted_is_reported",
        tagstore_test_support::BrokerOptions {
            advertised_port: Some(front_port),
            ..Default::default()
        },
    ) else {
        return;
    };
    tls_front(front, broker.own_address(), &cert, &key);
    let files = dir.path();
    let ca_path = files.join("ca.pem").display().to_string();
    std::fs::write(&ca_path, &ca).unwrap();
    let other_ca_path = files.join("other-ca.pem").display().to_string();
    std::fs::write(&other_ca_path, ca_and_leaf().0).unwrap();

    broker.create_topic("secure", 2);
    let payloads: Vec<(i32, Vec<u8>)> = (0..200)
        .map(|i| (i % 2, order(&format!("p{}", i % 10), 100)))
        .collect();
    let delivered = produce_with(
        &broker,
        "secure",
        &payloads,
        0,
        &[("security.protocol", "ssl"), ("ssl.ca.location", &ca_path)],
    );

    let server = common::start(&files.join("data"), &[]);
    let mut c = common::client(&server).await;
    let with = |name: &str, extra: String| {
        definition(&broker, "secure", "shop", &format!("g-{name}"), 50) + &extra
    };
    create_source(
        &mut c,
        "good",
        with(
            "good",
            format!("security = \"ssl\"\nca_file = {ca_path:?}\n"),
        ),
    )
    .await;
    // TLS, trusting another CA: the handshake fails.
    create_source(
        &mut c,
        "wrong_ca",
        with(
            "wrong_ca",
            format!("security = \"ssl\"\nca_file = {other_ca_path:?}\n"),
        ),
    )
    .await;
    // No TLS at a port that serves only TLS.
    create_source(&mut c, "plain", with("plain", String::new())).await;

    let st = caught_up(&mut c, "good", &ends(&delivered)).await;
    assert_eq!((st.applied, st.rejected), (200, 0), "{st:?}");
    for i in 0..10 {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:p{i}"), "order_count").await,
            Some(20)
        );
    }
    // The others say what is wrong, in librdkafka's words, and apply
    // nothing.
    say_what_is_wrong(
        &mut c,
        &server,
        &[("wrong_ca", "certificate verify failed"), ("plain", "")],
    )
    .await;
    assert_eq!(
        int_value(&mut c, "jd_pin:p0", "order_count").await,
        Some(20),
        "nothing applied by the sources that cannot read"
    );
}

/// Waits until each source's status has an error containing its text
/// (any error for an empty one), and checks that it applied nothing and
/// is not running.
async fn say_what_is_wrong(c: &mut Client, server: &common::TestServer, cases: &[(&str, &str)]) {
    for (name, says) in cases {
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let st = status(c, name).await;
            if let Some(st) = &st
                && !st.error.is_empty()
                && st.error.contains(says)
            {
                assert_eq!(st.applied, 0, "{st:?}");
                assert_ne!(st.state, "running", "{st:?}");
                break;
            }
            assert!(
                Instant::now() < until,
                "{name}: no error naming {says:?} in 60 s: {st:?}\n{}",
                server.stderr()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The one login a [`sasl_front`] takes.
#[derive(Clone, Copy, PartialEq)]
enum Login {
    Plain,
    ScramSha256,
}

impl Login {
    fn mechanism(self) -> &'static [u8] {
        match self {
            Login::Plain => b"PLAIN",
            Login::ScramSha256 => b"SCRAM-SHA-256",
        }
    }
}

/// The server's side of a SCRAM-SHA-256 login (RFC 5802, RFC 7677) for
/// `password`: the answer to the client's first message, then to its
/// last (`None`: the proof is wrong).
struct Scram {
    password: String,
    first_bare: String,
    server_first: String,
}

impl Scram {
    const SALT: &[u8] = b"tagstore test salt";
    const ROUNDS: u32 = 4096;

    fn first(password: &str, client_first: &str) -> Option<Self> {
        use base64::Engine as _;
        let bare = client_first.strip_prefix("n,,")?;
        let nonce = bare.split(',').find_map(|a| a.strip_prefix("r="))?;
        let server_first = format!(
            "r={nonce}tagstore-front,s={},i={}",
            base64::engine::general_purpose::STANDARD.encode(Self::SALT),
            Self::ROUNDS
        );
        Some(Self {
            password: password.to_string(),
            first_bare: bare.to_string(),
            server_first,
        })
    }

    fn last(&self, client_final: &str) -> Option<String> {
        use base64::Engine as _;
        use ring::{digest, hmac, pbkdf2};
        let b64 = base64::engine::general_purpose::STANDARD;
        let (without_proof, proof) = client_final.rsplit_once(",p=")?;
        let proof = b64.decode(proof).ok()?;
        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            std::num::NonZeroU32::new(Self::ROUNDS)?,
            Self::SALT,
            self.password.as_bytes(),
            &mut salted,
        );
        let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored = digest::digest(&digest::SHA256, client_key.as_ref());
        let message = format!("{},{},{without_proof}", self.first_bare, self.server_first);
        let signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored.as_ref()),
            message.as_bytes(),
        );
        let expected: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        if proof != expected {
            return None;
        }
        let server_key = hmac::sign(&salted, b"Server Key");
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            message.as_bytes(),
        );
        Some(format!("v={}", b64.encode(server_signature.as_ref())))
    }
}

/// A SASL front for `upstream` on `listener`: what a broker that asks for
/// SASL logins is to its clients. Each connection is answered by the front
/// until it has logged in (ApiVersions passed to the broker, SaslHandshake
/// and SaslAuthenticate answered by the front: only the `login` mechanism,
/// only `user` with `password`), then joined to the broker. A client that
/// sends anything else first, or fails to log in, is told so and cut off.
/// (tansu 0.6 with `--authentication` takes no PLAIN logins, and its SCRAM
/// users can only be made by a tool that cannot log in to it.)
fn sasl_front(
    listener: std::net::TcpListener,
    upstream: String,
    login: Login,
    user: &str,
    password: &str,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn frame(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.ok()?;
        let len = i32::from_be_bytes(len);
        if !(0..=1 << 20).contains(&len) {
            return None;
        }
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await.ok()?;
        Some(body)
    }
    async fn answer(s: &mut tokio::net::TcpStream, correlation: &[u8], body: &[u8]) -> bool {
        let mut out = ((4 + body.len()) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(correlation);
        out.extend_from_slice(body);
        s.write_all(&out).await.is_ok()
    }
    /// A SaslAuthenticate answer (v0-v1): error 0 or 58 (authentication
    /// failed), with the server's bytes.
    fn authenticated(version: i16, ok: bool, bytes: &[u8]) -> Vec<u8> {
        let mut b = if ok { 0i16 } else { 58 }.to_be_bytes().to_vec();
        if ok {
            b.extend_from_slice(&(-1i16).to_be_bytes());
        } else {
            let m = b"Authentication failed: invalid username or password";
            b.extend_from_slice(&(m.len() as i16).to_be_bytes());
            b.extend_from_slice(m);
        }
        b.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        b.extend_from_slice(bytes);
        if version == 1 {
            b.extend_from_slice(&0i64.to_be_bytes());
        }
        b
    }
    let (user, password) = (user.to_string(), password.to_string());
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let (upstream, user, password) = (upstream.clone(), user.clone(), password.clone());
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let mut scram: Option<Scram> = None;
                loop {
                    let Some(req) = frame(&mut tcp).await else {
                        return;
                    };
                    if req.len() < 10 {
                        return;
                    }
                    let key = i16::from_be_bytes([req[0], req[1]]);
                    let version = i16::from_be_bytes([req[2], req[3]]);
                    let correlation = req[4..8].to_vec();
                    // Header v1: the client id (a nullable string) ends it.
                    let id_len = i16::from_be_bytes([req[8], req[9]]).max(0) as usize;
                    let body = &req[(10 + id_len).min(req.len())..];
                    match key {
                        // ApiVersions: the broker's own answer.
                        18 => {
                            let mut out = (req.len() as i32).to_be_bytes().to_vec();
                            out.extend_from_slice(&req);
                            if up.write_all(&out).await.is_err() {
                                return;
                            }
                            let Some(resp) = frame(&mut up).await else {
                                return;
                            };
                            let mut out = (resp.len() as i32).to_be_bytes().to_vec();
                            out.extend_from_slice(&resp);
                            if tcp.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                        // SaslHandshake v0-v1: the one mechanism (error
                        // 33, unsupported mechanism, for any other).
                        17 => {
                            let n = body
                                .get(..2)
                                .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize);
                            let mechanism = body.get(2..2 + n).unwrap_or_default();
                            let error: i16 = if mechanism == login.mechanism() {
                                0
                            } else {
                                33
                            };
                            let mut b = error.to_be_bytes().to_vec();
                            b.extend_from_slice(&1i32.to_be_bytes());
                            b.extend_from_slice(&(login.mechanism().len() as i16).to_be_bytes());
                            b.extend_from_slice(login.mechanism());
                            if !answer(&mut tcp, &correlation, &b).await || error != 0 {
                                return;
                            }
                        }
                        // SaslAuthenticate v0-v1.
                        36 if version <= 1 => {
                            let n = body.get(..4).map_or(0, |b| {
                                i32::from_be_bytes([b[0], b[1], b[2], b[3]]).max(0) as usize
                            });
                            let given = body.get(4..4 + n).unwrap_or_default();
                            let given = String::from_utf8_lossy(given);
                            let (ok, done, bytes) = match (login, scram.take()) {
                                (Login::Plain, _) => {
                                    let ok = given == format!("\0{user}\0{password}");
                                    (ok, true, String::new())
                                }
                                (Login::ScramSha256, None) => {
                                    let named = given.contains(&format!(",n={user},"));
                                    match Scram::first(&password, &given) {
                                        Some(s) if named => {
                                            let first = s.server_first.clone();
                                            scram = Some(s);
                                            (true, false, first)
                                        }
                                        _ => (false, true, String::new()),
                                    }
                                }
                                (Login::ScramSha256, Some(s)) => match s.last(&given) {
                                    Some(last) => (true, true, last),
                                    None => (false, true, String::new()),
                                },
                            };
                            let b = authenticated(version, ok, bytes.as_bytes());
                            if !answer(&mut tcp, &correlation, &b).await || !ok {
                                return;
                            }
                            if done {
                                // Logged in: the broker from here on.
                                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
                                return;
                            }
                        }
                        // Anything else before logging in: cut off, as a
                        // broker that asks for SASL does.
                        _ => return,
                    }
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_logs_in_to_a_broker_that_asks_for_it_and_a_wrong_password_is_reported() {
    sasl_logs_in(
        "sasl_plain_logs_in_to_a_broker_that_asks_for_it_and_a_wrong_password_is_reported",
        Login::Plain,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_logs_in_to_a_broker_that_asks_for_it_and_a_wrong_password_is_reported() {
    sasl_logs_in(
        "sasl_scram_logs_in_to_a_broker_that_asks_for_it_and_a_wrong_password_is_reported",
        Login::ScramSha256,
    )
    .await;
}

/// A source logs in with `login` to a broker that asks for it and
/// consumes; one with a wrong password, one with the other mechanism and
/// one without SASL say what is wrong and apply nothing.
async fn sasl_logs_in(test: &str, login: Login) {
    let (mechanism, other) = match login {
        Login::Plain => ("PLAIN", "SCRAM-SHA-256"),
        Login::ScramSha256 => ("SCRAM-SHA-256", "PLAIN"),
    };
    let dir = tempfile::tempdir().unwrap();
    // The front's port first: the broker advertises it.
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front_port = front.local_addr().unwrap().port();
    let Some(broker) = Broker::start_with(
        test,
        tagstore_test_support::BrokerOptions {
            advertised_port: Some(front_port),
            ..Default::default()
        },
    ) else {
        return;
    };
    sasl_front(
        front,
        broker.own_address(),
        login,
        "tagstore",
        "s3cret 密码",
    );
    let files = dir.path();
    let write = |name: &str, text: &str| {
        let path = files.join(name).display().to_string();
        std::fs::write(&path, text).unwrap();
        path
    };
    // As an operator writes it: with a line end (not part of the password).
    let good = write("good.pw", "s3cret 密码\n");
    let bad = write("bad.pw", "s3cret\n");

    broker.create_topic("logins", 2);
    let payloads: Vec<(i32, Vec<u8>)> = (0..200)
        .map(|i| (i % 2, order(&format!("p{}", i % 10), 100)))
        .collect();
    let delivered = produce_with(
        &broker,
        "logins",
        &payloads,
        0,
        &[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", "tagstore"),
            ("sasl.password", "s3cret 密码"),
        ],
    );

    let server = common::start(&files.join("data"), &[]);
    let mut c = common::client(&server).await;
    let with = |name: &str, mechanism: &str, password_file: &str| {
        definition(&broker, "logins", "shop", &format!("g-{name}"), 50)
            + &format!(
                "security = \"sasl_plaintext\"\nsasl_mechanism = {mechanism:?}\nsasl_username = \"tagstore\"\nsasl_password_file = {password_file:?}\n"
            )
    };
    create_source(&mut c, "good", with("good", mechanism, &good)).await;
    create_source(
        &mut c,
        "wrong_password",
        with("wrong_password", mechanism, &bad),
    )
    .await;
    // A mechanism the brokers do not offer.
    create_source(&mut c, "other", with("other", other, &good)).await;
    // No SASL at a port that asks for it.
    create_source(
        &mut c,
        "plain",
        definition(&broker, "logins", "shop", "g-plain", 50),
    )
    .await;

    let st = caught_up(&mut c, "good", &ends(&delivered)).await;
    assert_eq!((st.applied, st.rejected), (200, 0), "{st:?}");
    for i in 0..10 {
        assert_eq!(
            int_value(&mut c, &format!("jd_pin:p{i}"), "order_count").await,
            Some(20)
        );
    }
    // The others say what is wrong, in librdkafka's words, and apply
    // nothing.
    say_what_is_wrong(
        &mut c,
        &server,
        &[
            ("wrong_password", "Authentication failed"),
            ("other", "Unsupported SASL mechanism"),
            ("plain", ""),
        ],
    )
    .await;
    assert_eq!(
        int_value(&mut c, "jd_pin:p0", "order_count").await,
        Some(20),
        "nothing applied by the sources that cannot log in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_ends_before_the_stores_position_is_reported() {
    let Some(broker) =
        Broker::start("a_partition_that_ends_before_the_stores_position_is_reported")
    else {
        return;
    };
    broker.create_topic("t", 1);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut c = common::client(&server).await;
    create_source(&mut c, "orders", definition(&broker, "t", "shop", "g", 10)).await;
    let first: Vec<(i32, Vec<u8>)> = (0..50).map(|_| (0, order("p1", 1))).collect();
    let d = produce(&broker, "t", &first, 0);
    caught_up(&mut c, "orders", &ends(&d)).await;

    // The topic made again while the server is down: its records start
    // at 0 again, and the store's position (50) is past their end.
    server.stop().unwrap();
    broker.delete_topic("t");
    broker.create_topic("t", 1);
    let again: Vec<(i32, Vec<u8>)> = (0..5).map(|_| (0, order("p2", 1))).collect();
    let d = produce(&broker, "t", &again, 0);
    assert_eq!(d.last().map(|x| x.2), Some(4), "{d:?}");
    server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut c = common::client(&server).await;
    // tansu serves nothing past a partition's end without saying that the
    // position is out of range (Kafka says so, and librdkafka reads on from
    // `start`, which the status lists as a reset): the consumer says what
    // is wrong, and what to do.
    let until = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&mut c, "orders").await;
        if let Some(st) = &st
            && st
                .error
                .contains("partition t/0 ends at offset 5, before the store's position 50")
        {
            break st.clone();
        }
        assert!(
            Instant::now() < until,
            "the position past the partition's end not reported in 60 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((st.state.as_str(), st.applied), ("retrying", 0), "{st:?}");
    let text = common::http(
        server.metrics_addr.as_deref().expect("metrics address"),
        b"GET /metrics HTTP/1.1\r\n\r\n",
    );
    assert_eq!(
        common::sample(
            &text,
            "tagstore_kafka_source_state{source=\"orders\",state=\"retrying\"}"
        ),
        1.0
    );
    // As it says: the source made again reads the topic from its start.
    c.drop_source(DropSourceRequest {
        name: "orders".into(),
    })
    .await
    .unwrap();
    create_source(&mut c, "orders", definition(&broker, "t", "shop", "g", 10)).await;
    let st = caught_up(&mut c, "orders", &ends(&d)).await;
    assert_eq!((st.applied, st.error.as_str()), (5, ""), "{st:?}");
    assert_eq!(int_value(&mut c, "jd_pin:p2", "order_count").await, Some(5));
    assert_eq!(
        int_value(&mut c, "jd_pin:p1", "order_count").await,
        Some(50)
    );
}

/// A full data disk under a consuming source: the batch that finds no room
/// is refused, the status says so, and once there is room again the
/// consumer goes on from the store's positions, every record applied
/// once and every record that cannot be applied reported once. Needs a small tmpfs, so root (CI runs as root); elsewhere it says
/// so and does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_a_source_which_goes_on_exactly_once_when_there_is_room() {
    let Some(broker) =
        Broker::start("a_full_disk_stops_a_source_which_goes_on_exactly_once_when_there_is_room")
    else {
        return;
    };
    broker.create_topic("events", 2);
    let dir = tempfile::tempdir().unwrap();
    let Some(small) = common::SmallDisk::mount(dir.path(), "24m") else {
        return;
    };
    let disk = small.path.clone();
    let server = common::start(&disk.join("data"), &[]);
    let mut c = common::client(&server).await;
    create_source(
        &mut c,
        "orders",
        definition(&broker, "events", "shop", "g", 100),
    )
    .await;
    // Each record a customer of its own, with one order: applied once,
    // every customer has order_count 1 (and each needs room in the log).
    let batch = |n: usize, from: usize| -> Vec<(i32, Vec<u8>)> {
        (from..from + n)
            .map(|i| ((i % 2) as i32, order(&format!("c{i}"), 1)))
            .collect()
    };
    let first = batch(500, 0);
    let mut delivered = produce(&broker, "events", &first, 0);
    caught_up(&mut c, "orders", &ends(&delivered)).await;

    // Fill what is left of the disk, then more records.
    let filler = small.fill("filler");
    let mut second = batch(40_000, 500);
    // Among them 20 records that are not JSON: rejected in batches the
    // full disk refuses, read again, and reported once each in the end.
    let bad: Vec<usize> = (0..second.len()).filter(|i| i % 2_000 == 7).collect();
    for i in &bad {
        second[*i].1 = b"{not json".to_vec();
    }
    delivered.extend(produce(&broker, "events", &second, 500));
    let until = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&mut c, "orders").await.expect("a status");
        if st.error.contains("the store refused the batch") {
            break st;
        }
        assert!(
            Instant::now() < until,
            "the full disk not reported in 60 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(st.error.contains("disk full"), "{st:?}");
    assert_eq!(st.state, "retrying", "{st:?}");

    // Room again: on from the store's positions.
    std::fs::remove_file(&filler).unwrap();
    let st = caught_up(&mut c, "orders", &ends(&delivered)).await;
    let mut want: Vec<(i32, i64)> = bad
        .iter()
        .map(|i| {
            let (_, p, o) = delivered.iter().find(|d| d.0 == 500 + i).unwrap();
            (*p, *o)
        })
        .collect();
    want.sort_unstable();
    let mut listed: Vec<(i32, i64)> = st
        .recent_rejects
        .iter()
        .map(|r| (r.partition, r.offset))
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, want, "each reject once: {:?}", st.recent_rejects);
    let n = (first.len() + second.len() - bad.len()) as u64;
    assert_eq!(common::count(&mut c, "ALL").await, n);
    assert_eq!(common::count(&mut c, "order_count = 1").await, n);
    assert_eq!(
        common::count(&mut c, "order_count >= 2").await,
        0,
        "no record applied twice"
    );
    let until = Instant::now() + Duration::from_secs(30);
    while status(&mut c, "orders")
        .await
        .is_some_and(|s| !s.error.is_empty())
    {
        assert!(
            Instant::now() < until,
            "the error stayed after the disk had room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages of most of a megabyte each, 44 MB of them (more than a
/// batch's 32 MiB): every one applied, once. (That a batch stops at
/// 32 MiB is not seen from outside.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_most_of_a_megabyte_are_each_applied_once() {
    let Some(broker) = Broker::start("messages_of_most_of_a_megabyte_are_each_applied_once") else {
        return;
    };
    broker.create_topic("big", 1);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let note = "备".repeat(230_000); // 690 KB of UTF-8
    let payloads: Vec<(i32, Vec<u8>)> = (0..64)
        .map(|i| {
            let m = format!(
                r#"{{"pin":"b{i}","type":"order","ts":1764547200000,"fen":7,"note":"{note}"}}"#
            );
            (0, m.into_bytes())
        })
        .collect();
    let delivered = produce_with(
        &broker,
        "big",
        &payloads,
        0,
        &[("message.max.bytes", "2000000")],
    );
    create_source(&mut c, "big", definition(&broker, "big", "shop", "g", 1000)).await;
    let st = caught_up(&mut c, "big", &ends(&delivered)).await;
    assert_eq!((st.applied, st.rejected), (64, 0), "{st:?}");
    assert_eq!(common::count(&mut c, "order_count = 1").await, 64);
}

/// Messages of tens of MiB, larger than the consumer's batch of about
/// 32 MiB: one of the largest size a source takes (64 MiB less 4 KiB), a
/// valid order carrying a field the mapping does not read (applied), one
/// whose customer identity is 40 MiB long (rejected, its reason cut to the
/// documented bound); the orders around them are applied once, and the
/// server goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_tens_of_mib_are_applied_or_rejected_alone() {
    let _apart = APART.lock().await;
    let Some(broker) = Broker::start("messages_of_tens_of_mib_are_applied_or_rejected_alone")
    else {
        return;
    };
    broker.create_topic("big", 1);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    const BIG: usize = 40 << 20;
    // The largest a source takes: 64 MiB less room for the brokers'
    // framing of the fetch that carries it (4 KiB is ample).
    const LARGEST: usize = (64 << 20) - 4096;
    let mut unread = br#"{"pin":"big","type":"order","ts":1764547200000,"fen":7,"note":""#.to_vec();
    unread.resize(LARGEST - 2, b'n');
    unread.extend_from_slice(br#""}"#);
    let huge_pin = order(&"p".repeat(BIG), 9);
    let mut model: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut payloads = Vec::new();
    for (i, fen) in [(0, 100), (1, 200), (2, 300)] {
        let pin = format!("q{i}");
        let m = model.entry(pin.clone()).or_default();
        m.0 += 1;
        m.1 += fen;
        payloads.push((0, order(&pin, fen)));
        if i == 0 {
            payloads.push((0, unread.clone()));
            model.insert("big".into(), (1, 7));
        }
        if i == 1 {
            payloads.push((0, huge_pin.clone()));
        }
    }
    let delivered = produce_with(
        &broker,
        "big",
        &payloads,
        0,
        &[("message.max.bytes", "100000000")],
    );
    create_source(
        &mut c,
        "big_shop",
        definition(&broker, "big", "big_shop", "group_big", 100),
    )
    .await;
    let st = caught_up(&mut c, "big_shop", &ends(&delivered)).await;
    assert_eq!(st.state, "running", "{st:?}");
    assert_eq!((st.applied, st.rejected), (4, 1), "{st:?}");
    let reject = st.recent_rejects.first().expect("the reject");
    let (_, p, o) = delivered[3];
    assert_eq!((reject.partition, reject.offset), (p, o), "{reject:?}");
    assert!(
        reject.reason.len() <= 512 && reject.reason.contains("jd_pin is 41943040 bytes long"),
        "{} bytes: {:.200}",
        reject.reason.len(),
        reject.reason
    );
    facts_equal_the_model(&mut c, &model).await;
    // The server goes on answering a write after them.
    common::add_to_tag(&mut c, "after", &["k"]).await;
}

/// A message longer than a source takes (64 MiB): the source cannot read
/// past it, and its status says that, naming the cause, instead of only
/// that the broker went down; nothing past it is applied, and the server
/// goes on answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_64_mib_stops_its_source_which_says_why() {
    let _apart = APART.lock().await;
    let Some(broker) = Broker::start("a_message_over_64_mib_stops_its_source_which_says_why")
    else {
        return;
    };
    broker.create_topic("huge", 1);
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let huge = order(&"p".repeat(70 << 20), 9);
    let payloads = vec![(0, order("q0", 100)), (0, huge), (0, order("q1", 200))];
    let delivered = produce_with(
        &broker,
        "huge",
        &payloads,
        0,
        &[("message.max.bytes", "100000000")],
    );
    let (_, _, huge_at) = delivered[1];
    create_source(
        &mut c,
        "huge_shop",
        definition(&broker, "huge", "huge_shop", "group_huge", 100),
    )
    .await;
    let until = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = status(&mut c, "huge_shop").await;
        if let Some(st) = st
            .as_ref()
            .filter(|s| s.error.contains("longer than a source takes"))
        {
            break st.clone();
        }
        assert!(
            Instant::now() < until,
            "no status names the message too long in 60 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(st.state, "retrying", "{st:?}");
    assert!(st.error.contains("64 MiB"), "{}", st.error);
    assert!(st.error.contains("Invalid response size"), "{}", st.error);
    // Nothing at or past the message was applied (a broker may or may not
    // answer the order before it alone).
    let at = st.partitions.first().map_or(-1, |p| p.position);
    assert!(at <= huge_at, "{st:?}");
    assert_eq!(st.rejected, 0, "{st:?}");
    let after = c
        .profile(ProfileRequest {
            customer: "jd_pin:q1".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        after.map(|_| ()).unwrap_err().code(),
        tonic::Code::NotFound,
        "the order after the message was applied"
    );
    common::add_to_tag(&mut c, "after", &["k"]).await;
}
