//! An `Ingest` stream against a server run in this process on an in-memory
//! file system, whose log syncs can be held (so that nothing is answered
//! until the test lets the writer go on) and whose disk can fill at a
//! chosen step.
//!
//! What a stream holds of the server's memory, seen from its metrics
//! (`requests_in_flight`):
//! - a stream reads batches of records no further ahead of the writer than
//!   it can use (`RECORDS_AHEAD` batches, or beyond them
//!   `RECORDS_AHEAD_BYTES` of read records): what it holds stops growing at
//!   that bound while the client has many more batches to send;
//! - a stream whose client cancels it halfway gives back every byte it
//!   held, records read included, once the batches it handed to the writer
//!   are done, and those batches are applied whole.
//!
//! A full disk while a batch is retried a record at a time (a record of it
//! was at fault): the stream answers the batches before it, then ends with
//! `RESOURCE_EXHAUSTED`; the records of that batch written before the disk
//! filled stay, and the batch sent again applies the rest, once.
//!
//! Refunds with retention (the server's clock moved by hand): once
//! retention drops some of a customer's kept events, the background
//! rebuilder leaves only that customer due and rebuilds the others, and
//! `RebuildFacts` refuses only that customer unless `allow_partial`, also
//! after a restart (which needs `serve` to leave nothing holding the store
//! when it returns); `Unmerge` likewise refuses only a merge over such a
//! customer.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tagstore::clock::ManualClock;
use tagstore::config::FileConfig;
use tagstore::proto::tag_store_client::TagStoreClient;
use tagstore::proto::{AggregateRequest, CreateSourceRequest, IngestRequest, IngestResponse};
use tagstore::server::RECORDS_AHEAD_BYTES;
use tagstore::storage::fs::{MemFs, Op};
use tonic::transport::Channel;

const HEADER: &str =
    "订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n";

/// `n` Taobao orders numbered from `from`, of 50 buyers, all skincare.
fn orders(from: usize, n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in from..from + n {
        s.push_str(&format!(
            "T{i},nick{},1.00,2026-11-11 10:00:00,,交易成功,X,skincare,B,t\n",
            i % 50
        ));
    }
    s.into_bytes()
}

/// Bytes the server's calls hold in flight, from its metrics.
fn in_flight(metrics: &str) -> f64 {
    let text = common::http(
        metrics,
        format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    common::sample(&text, "tagstore_memory_bytes{kind=\"requests_in_flight\"}")
}

/// A server in this process on a new in-memory file system, with a
/// Taobao orders source `tb` whose fact fields exist (so that batches only
/// wait for the writer), and a client of it.
struct InProcess {
    fs: MemFs,
    metrics: String,
    client: TagStoreClient<Channel>,
    server: common::InProcessServer,
}

impl InProcess {
    async fn start() -> InProcess {
        InProcess::start_with(FileConfig::default()).await
    }

    /// A server in this process on `fs` (a new store, or one a server
    /// before left), with `file` as its configuration file and `clock` as
    /// its clock (`None`: the system's), and a client of it.
    async fn serve(fs: MemFs, file: FileConfig, clock: Option<Arc<ManualClock>>) -> InProcess {
        let server = common::InProcessServer::start(fs.clone(), file, clock).await;
        InProcess {
            fs,
            metrics: server.metrics.clone(),
            client: server.client().await,
            server,
        }
    }

    /// The same, with `file` as the server's configuration file.
    async fn start_with(file: FileConfig) -> InProcess {
        let mut server = InProcess::serve(MemFs::default(), file, None).await;
        let client = &mut server.client;
        client
            .create_source(CreateSourceRequest {
                name: "tb".into(),
                definition: tagstore::ingest::presets::preset("taobao_orders")
                    .unwrap()
                    .into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut first = HEADER.as_bytes().to_vec();
        first.extend(orders(0, 10));
        let mut s = client
            .ingest(tokio_stream::iter(vec![IngestRequest {
                source: "tb".into(),
                seq: 0,
                data: first,
                ..Default::default()
            }]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.message().await.unwrap().unwrap().accepted, 10);
        server
    }

    /// Bytes the server's calls hold in flight.
    fn in_flight(&self) -> f64 {
        in_flight(&self.metrics)
    }

    /// Waits until what the calls hold has stood still for a second (and
    /// is not `zero_ok` or above zero); returns it.
    async fn settled(&self, zero_ok: bool) -> f64 {
        let started = Instant::now();
        let (mut last, mut still_since) = (-1.0, Instant::now());
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the held memory never stood still"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.in_flight();
            if now != last {
                (last, still_since) = (now, Instant::now());
            } else if (zero_ok || now > 0.0) && still_since.elapsed() > Duration::from_secs(1) {
                return now;
            }
        }
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

/// The first batch of a stream (the CSV header and one order), then
/// `batches` of `per_batch` orders, numbered from `from`.
fn stream_of(from: usize, batches: usize, per_batch: usize) -> Vec<IngestRequest> {
    let mut out = vec![IngestRequest {
        source: "tb".into(),
        seq: 0,
        data: [HEADER.as_bytes(), &orders(from, 1)].concat(),
        ..Default::default()
    }];
    for b in 0..batches {
        out.push(IngestRequest {
            seq: b as u64 + 1,
            data: orders(from + 1 + b * per_batch, per_batch),
            ..Default::default()
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reads_records_no_further_ahead_than_the_writer_can_use() {
    let server = InProcess::start().await;
    // The log's syncs are held: the first batch waits in the writer's sync
    // and nothing is answered. 20 batches of 2,000 orders follow it, each
    // some megabytes once read: all of them are within the request budget
    // (256 MiB), so only the read-ahead bound stops the stream reading.
    let hold = server.fs.hold_syncs("wal-");
    let per_batch = 2_000;
    let batches = stream_of(1_000, 20, per_batch);
    let sent = batches.len();
    let stream = tokio::spawn({
        let mut c = server.client.clone();
        async move {
            let mut s = c.ingest(tokio_stream::iter(batches)).await?.into_inner();
            let mut answers: Vec<IngestResponse> = Vec::new();
            while let Some(a) = s.message().await? {
                answers.push(a);
            }
            Ok::<_, tonic::Status>(answers)
        }
    });
    // Once what the stream holds has stood still for a second, it reads no
    // more. A batch of 2,000 of these orders reads into about 3 MB (each
    // order about 1.5 KB), so the stream holds about three, and without the
    // bound all twenty (60 MB).
    let held = server.settled(false).await;
    assert!(
        held >= 2e6,
        "{held} bytes held: the stream read too little to tell"
    );
    assert!(
        held <= (RECORDS_AHEAD_BYTES + (6 << 20)) as f64,
        "the stream holds {held} bytes of read records; at most {RECORDS_AHEAD_BYTES} and a batch"
    );
    assert!(
        !stream.is_finished(),
        "nothing can be answered while the log's syncs are held"
    );

    drop(hold);
    let answers = stream.await.unwrap().unwrap();
    assert_eq!(answers.len(), sent);
    let accepted: u64 = answers.iter().map(|a| a.accepted).sum();
    assert_eq!(accepted, 1 + 20 * per_batch as u64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_halfway_gives_back_what_it_held() {
    let server = InProcess::start().await;
    let hold = server.fs.hold_syncs("wal-");
    let per_batch = 2_000;
    // The client sends its batches and never reads an answer; it goes away
    // once the server has read what it will read while nothing is answered.
    let (give_up, given_up) = tokio::sync::oneshot::channel::<()>();
    let stream = tokio::spawn({
        let mut c = server.client.clone();
        let batches = stream_of(1_000, 20, per_batch);
        async move {
            let mut answers = c
                .ingest(tokio_stream::iter(batches))
                .await
                .unwrap()
                .into_inner();
            tokio::select! {
                _ = answers.message() => {
                    panic!("the stream was answered while the log's syncs were held")
                }
                _ = given_up => {}
            }
            // Dropped: the call is cancelled.
        }
    });
    let held = server.settled(false).await;
    assert!(
        held >= 2e6,
        "{held} bytes held: the stream read too little to tell"
    );
    give_up.send(()).unwrap();
    stream.await.unwrap();
    // Every batch the stream read is in the writer's hands (a batch is
    // queued to it once read): their memory is in use until the writer is
    // done with them, and then all of it is given back, though nobody reads
    // their answers.
    drop(hold);
    let after = server.settled(true).await;
    assert_eq!(after, 0.0, "a cancelled stream still holds {after} bytes");

    // The batches the writer had finished: the first one and the ones
    // queued behind it, whole, and nothing of the batches never read.
    let mut c = server.client.clone();
    let waited = Instant::now();
    let orders = loop {
        let r = c
            .aggregate(AggregateRequest {
                query: "order_count >= 1".into(),
                field: "order_count".into(),
                histogram_edges: vec![],
                as_of: None,
            })
            .await
            .unwrap()
            .into_inner();
        let n = r.sum;
        if n > 10 || waited.elapsed() > Duration::from_secs(30) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(orders > 10, "the batches handed to the writer were lost");
    assert_eq!(
        (orders - 11) % per_batch as i64,
        0,
        "{orders} orders: batches are applied whole"
    );
    assert!(
        orders < 11 + 20 * per_batch as i64,
        "{orders} orders: every batch was read, though nothing was answered"
    );
    server.stop().await;
}

/// The orders written so far (the sum of `order_count`).
async fn orders_written(c: &mut TagStoreClient<Channel>) -> i64 {
    c.aggregate(AggregateRequest {
        query: "order_count >= 1".into(),
        field: "order_count".into(),
        histogram_edges: vec![],
        as_of: None,
    })
    .await
    .unwrap()
    .into_inner()
    .sum
}

/// Sends `batches` on one stream; the answers and how the stream ended.
async fn send(
    c: &mut TagStoreClient<Channel>,
    batches: Vec<IngestRequest>,
) -> (Vec<IngestResponse>, Option<tonic::Status>) {
    let mut answers = c
        .ingest(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    loop {
        match answers.message().await {
            Ok(Some(a)) => got.push(a),
            Ok(None) => return (got, None),
            Err(s) => return (got, Some(s)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_while_a_batch_is_retried_a_record_at_a_time_ends_the_stream() {
    // A record whose one identity is on the block list is at fault only
    // in the writer's eyes (the block list is the writer's to apply), so
    // its batch is refused whole and retried a record at a time to find it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagstore.toml");
    std::fs::write(&path, "[oneid]\nblocked = [\"phone:13800000000\"]\n").unwrap();
    let server = InProcess::start_with(FileConfig::load(&path).unwrap()).await;
    let mut c = server.client.clone();
    let good = 30_000;
    let mut big = orders(1_000, good / 2);
    big.extend(
        "BAD1,,1.00,2026-11-11 10:00:00,13800000000,交易成功,X,skincare,B,t\n"
            .as_bytes()
            .iter(),
    );
    big.extend(orders(1_000 + good / 2, good - good / 2));
    let batches = || {
        vec![
            IngestRequest {
                source: "tb".into(),
                seq: 0,
                data: [HEADER.as_bytes(), &orders(500, 1)].concat(),
                ..Default::default()
            },
            IngestRequest {
                seq: 1,
                data: big.clone(),
                ..Default::default()
            },
        ]
    };
    // The log has room for a few megabytes more: the next extension of it
    // (the retry's records pass its end) finds the disk full.
    server.fs.fail(Op::Allocate, "wal-", 0, 1, libc::ENOSPC);
    let (answers, end) = send(&mut c, batches()).await;
    assert_eq!(server.fs.faults_pending(), 0, "the disk never filled");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!((answers[0].seq, answers[0].accepted), (0, 1));
    let end = end.expect("the stream ends with an error");
    assert_eq!(end.code(), tonic::Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("no space"), "{end:?}");
    // The records written before the disk filled stay; not all of them.
    let first = orders_written(&mut c).await;
    let applied = first - 11;
    assert!(
        applied > 0 && applied < good as i64,
        "{applied} of the batch's {good} good orders applied"
    );

    // Sent again (the disk has room now): what was applied is a duplicate,
    // the rest is applied once, and the record at fault is rejected.
    let (answers, end) = send(&mut c, batches()).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].duplicates, 1);
    let a = &answers[1];
    assert_eq!(a.duplicates as i64, applied);
    assert_eq!(a.accepted as i64, good as i64 - applied);
    assert_eq!(a.rejected.len(), 1, "{:?}", a.rejected);
    // Line 1 is the header, 2 the first batch's order.
    assert_eq!(a.rejected[0].line, 3 + good as u64 / 2);
    assert!(
        a.rejected[0].reason.contains("block list"),
        "{:?}",
        a.rejected
    );
    assert_eq!(orders_written(&mut c).await, 11 + good as i64);
    server.stop().await;
}

/// Customers in `query`.
async fn count_of(c: &mut TagStoreClient<Channel>, query: &str) -> u64 {
    c.count(tagstore::proto::CountRequest {
        queries: vec![query.into()],
        as_of: None,
    })
    .await
    .unwrap()
    .into_inner()
    .counts[0]
}

/// Customers due a rebuild of facts (from `Stats`).
async fn due(c: &mut TagStoreClient<Channel>) -> u64 {
    c.stats(tagstore::proto::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .facts_rebuilds_due
}

/// One Taobao order row (`status` 交易成功, or 退款成功 for its refund).
fn row(id: &str, nick: &str, status: &str, category: &str) -> String {
    format!("{id},{nick},10.00,2026-11-11 10:00:00,,{status},X,{category},B,t\n")
}

/// Once retention has dropped some of a customer's kept events, the
/// background rebuilder leaves that customer due (a rebuild would lose what
/// the dropped events made) and goes on rebuilding the others after their
/// refunds; `RebuildFacts` refuses only that customer, by name, unless
/// `allow_partial`, or leaves it out, by name, with `skip_partial`; who is
/// thinned is kept across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_holds_back_only_the_rebuilds_of_customers_whose_events_it_dropped() {
    // 2026-11-12T00:00:00Z
    const T0: i64 = 1_794_441_600_000;
    const DAY_MS: i64 = 86_400_000;
    let clock = ManualClock::at(T0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagstore.toml");
    std::fs::write(
        &path,
        "event_retention_days = 10\nrefund_rebuild_seconds = 1\n",
    )
    .unwrap();
    let server = InProcess::serve(
        MemFs::default(),
        FileConfig::load(&path).unwrap(),
        Some(clock.clone()),
    )
    .await;
    let mut c = server.client.clone();
    c.create_source(CreateSourceRequest {
        name: "tb".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut seq = 0;
    let mut batch = |rows: &[String]| {
        seq += 1;
        vec![IngestRequest {
            source: "tb".into(),
            seq,
            data: format!("{HEADER}{}", rows.concat()).into_bytes(),
            ..Default::default()
        }]
    };
    let checkpoint = |c: &mut TagStoreClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.checkpoint(tagstore::proto::CheckpointRequest::default())
                .await
                .unwrap();
        }
    };
    // 甲's first order (perfume), in an archive file of its own.
    let (_, end) = send(&mut c, batch(&[row("A1", "甲", "交易成功", "perfume")])).await;
    assert!(end.is_none(), "{end:?}");
    checkpoint(&mut c).await;
    // 11 days on: 甲's second order and 丙's, both makeup; the checkpoint
    // drops the first file (past 10 days): some of 甲's events are gone.
    clock.advance_ms(11 * DAY_MS);
    let (_, end) = send(
        &mut c,
        batch(&[
            row("A2", "甲", "交易成功", "makeup"),
            row("C1", "丙", "交易成功", "makeup"),
        ]),
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    checkpoint(&mut c).await;
    assert_eq!(count_of(&mut c, "bought:makeup").await, 2);
    // Both makeup orders refunded in a later batch: both customers due.
    let (answers, end) = send(
        &mut c,
        batch(&[
            row("A2", "甲", "退款成功", "makeup"),
            row("C1", "丙", "退款成功", "makeup"),
        ]),
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers[0].accepted, 2, "{answers:?}");
    // The rebuilder takes 丙's makeup back; 甲 waits.
    let waited = Instant::now();
    while due(&mut c).await != 1 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "{} customers still due after 60 s",
            due(&mut c).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count_of(&mut c, "bought:makeup").await, 1, "甲's stays");
    assert_eq!(count_of(&mut c, "bought:perfume").await, 1);
    // By hand: 甲 refused by name, 丙 rebuilt.
    let rebuild = |who: &str, allow_partial: bool| tagstore::proto::RebuildFactsRequest {
        customers: vec![format!("taobao_nick:{who}")],
        allow_partial,
        skip_partial: false,
    };
    let e = c.rebuild_facts(rebuild("甲", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("taobao_nick:甲"), "{e:?}");
    let r = c.rebuild_facts(rebuild("丙", false)).await.unwrap();
    assert_eq!(r.into_inner().rebuilt, 1);
    // Both, skipping: 丙 rebuilt, 甲 left out and named.
    let r = c
        .rebuild_facts(tagstore::proto::RebuildFactsRequest {
            customers: vec!["taobao_nick:甲".into(), "taobao_nick:丙".into()],
            allow_partial: false,
            skip_partial: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.rebuilt, r.partial.as_slice()),
        (1, &["taobao_nick:甲".to_string()][..])
    );
    assert_eq!(count_of(&mut c, "bought:makeup").await, 1, "甲's stays");

    // Across a restart, the same.
    let fs = server.fs.clone();
    server.stop().await;
    let server = InProcess::serve(fs, FileConfig::load(&path).unwrap(), Some(clock.clone())).await;
    let mut c = server.client.clone();
    let e = c.rebuild_facts(rebuild("甲", false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(due(&mut c).await, 1);
    // Allowed: rebuilt from the events kept (her perfume order is gone
    // with its file, so is what it made).
    let r = c.rebuild_facts(rebuild("甲", true)).await.unwrap();
    assert_eq!(r.into_inner().rebuilt, 1);
    assert_eq!(due(&mut c).await, 0);
    assert_eq!(count_of(&mut c, "bought:makeup").await, 0);
    server.stop().await;
}

/// Once `serve` has returned, nothing of it holds the store: a server
/// started again on the same directory in the same process opens it (its
/// background tasks, the feed's dispatcher and the metrics endpoint end
/// when it starts closing), and finds what the first one wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_returned_leaves_its_store_to_the_next() {
    let server = InProcess::start().await;
    let fs = server.fs.clone();
    server.stop().await;
    let mut server = InProcess::serve(fs, FileConfig::default(), None).await;
    assert_eq!(orders_written(&mut server.client).await, 10);
    server.stop().await;
}

/// `Unmerge` refuses to undo a merge whose customers' kept events
/// retention thinned, naming the customer, unless `allow_partial`; a merge
/// of customers whose events are all kept is undone without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmerge_is_refused_only_over_thinned_customers() {
    // 2026-11-12T00:00:00Z
    const T0: i64 = 1_794_441_600_000;
    const DAY_MS: i64 = 86_400_000;
    let clock = ManualClock::at(T0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tagstore.toml");
    std::fs::write(&path, "event_retention_days = 10\n").unwrap();
    let server = InProcess::serve(
        MemFs::default(),
        FileConfig::load(&path).unwrap(),
        Some(clock.clone()),
    )
    .await;
    let mut c = server.client.clone();
    c.create_source(CreateSourceRequest {
        name: "tb".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let row = |id: &str, nick: &str, phone: &str| {
        format!("{id},{nick},10.00,2026-11-11 10:00:00,{phone},交易成功,X,makeup,B,t\n")
    };
    let mut seq = 0;
    let mut batch = |rows: &[String]| {
        seq += 1;
        vec![IngestRequest {
            source: "tb".into(),
            seq,
            data: format!("{HEADER}{}", rows.concat()).into_bytes(),
            ..Default::default()
        }]
    };
    // 甲 (with her phone) in a file retention will drop; 11 days on, 乙
    // and 丙 without phones, then an order naming 乙's nick with 甲's
    // phone (merging them) and one naming 丙's with a phone of 丁, who
    // orders first (merging 丙 and 丁, all within retention).
    let (_, end) = send(&mut c, batch(&[row("A1", "甲", "13800000001")])).await;
    assert!(end.is_none(), "{end:?}");
    c.checkpoint(tagstore::proto::CheckpointRequest::default())
        .await
        .unwrap();
    clock.advance_ms(11 * DAY_MS);
    let (_, end) = send(
        &mut c,
        batch(&[
            row("B1", "乙", ""),
            row("C1", "丙", ""),
            row("D1", "丁", "13800000004"),
        ]),
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    let (answers, end) = send(
        &mut c,
        batch(&[
            row("B2", "乙", "13800000001"),
            row("C2", "丙", "13800000004"),
        ]),
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    let merges = &answers[0].merges;
    assert_eq!(merges.len(), 2, "{answers:?}");
    c.checkpoint(tagstore::proto::CheckpointRequest::default())
        .await
        .unwrap();
    let undo = |merge_id: u64, allow_partial: bool| tagstore::proto::UnmergeRequest {
        merge_id,
        allow_partial,
        ..Default::default()
    };
    // The merge with 甲: refused, by her name; allowed, undone.
    let with_jia = merges
        .iter()
        .find(|m| format!("{m:?}").contains("甲"))
        .expect("a merge with 甲");
    let e = c.unmerge(undo(with_jia.merge_id, false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("甲"), "{e:?}");
    c.unmerge(undo(with_jia.merge_id, true)).await.unwrap();
    // The merge of 丙 and 丁: undone without allow_partial.
    let other = merges
        .iter()
        .find(|m| m.merge_id != with_jia.merge_id)
        .unwrap();
    c.unmerge(undo(other.merge_id, false)).await.unwrap();
    server.stop().await;
}
