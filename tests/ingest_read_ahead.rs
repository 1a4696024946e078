//! An `Ingest` stream reads batches of records no further ahead of the
//! writer than it can use (`RECORDS_AHEAD` batches, or beyond them
//! `RECORDS_AHEAD_BYTES` of read records): the server runs in this process
//! on an in-memory file system whose log syncs are held, so that nothing is
//! answered, and the memory the stream holds (the `requests_in_flight`
//! metric) must stop growing at that bound while the client has many more
//! batches to send. Then the syncs go on and every batch is answered.

mod common;

use std::time::{Duration, Instant};

use tagstore::config::{FileConfig, Overrides, ServerConfig};
use tagstore::proto::{CreateSourceRequest, IngestRequest, IngestResponse};
use tagstore::server::RECORDS_AHEAD_BYTES;
use tagstore::storage::fs::MemFs;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reads_records_no_further_ahead_than_the_writer_can_use() {
    let fs = MemFs::default();
    let mut config = ServerConfig::resolve(
        FileConfig::default(),
        Overrides {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some("/mem/store".into()),
            metrics_listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    config.engine.fs = std::sync::Arc::new(fs.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound, listening) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(tagstore::server::serve(
        config,
        async {
            let _ = stopped.await;
        },
        move |at| {
            let _ = bound.send(at);
        },
    ));
    let at = listening.await.expect("the server listens");
    let metrics = at.metrics.expect("a metrics address").to_string();
    let channel = Channel::from_shared(format!("http://{}", at.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = tagstore::proto::tag_store_client::TagStoreClient::new(channel)
        .max_encoding_message_size(64 << 20);
    c.create_source(CreateSourceRequest {
        name: "tb".into(),
        definition: tagstore::ingest::presets::preset("taobao_orders")
            .unwrap()
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // A first stream makes the facts' fields (a write of their own), so that
    // the next stream's batches only wait for the writer.
    let mut first = HEADER.as_bytes().to_vec();
    first.extend(orders(0, 10));
    let mut s = c
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

    // The log's syncs are held: the first batch waits in the writer's sync
    // and nothing is answered. 20 batches of 2,000 orders follow it, each
    // some megabytes once read: all of them are within the request budget
    // (256 MiB), so only the read-ahead bound stops the stream reading.
    let hold = fs.hold_syncs("wal-");
    let per_batch = 2_000;
    let mut batches = vec![IngestRequest {
        source: "tb".into(),
        seq: 0,
        data: [HEADER.as_bytes(), &orders(100, 1)].concat(),
        ..Default::default()
    }];
    for b in 0..20 {
        batches.push(IngestRequest {
            seq: b + 1,
            data: orders(1_000 + b as usize * per_batch, per_batch),
            ..Default::default()
        });
    }
    let sent = batches.len();
    let stream = tokio::spawn({
        let mut c = c.clone();
        async move {
            let mut s = c.ingest(tokio_stream::iter(batches)).await?.into_inner();
            let mut answers: Vec<IngestResponse> = Vec::new();
            while let Some(a) = s.message().await? {
                answers.push(a);
            }
            Ok::<_, tonic::Status>(answers)
        }
    });
    // Held bytes grow as batches are read; once they have stood still for a
    // second, the stream reads no more.
    let started = Instant::now();
    let (mut last, mut still_since) = (0.0, Instant::now());
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the held memory never stood still"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = in_flight(&metrics);
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if now > 0.0 && still_since.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    // Two batches' records and the bytes beyond them: a batch of 2,000 of
    // these orders reads into about 3 MB (each order about 1.5 KB), so the
    // stream holds about three, and without the bound all twenty (60 MB).
    eprintln!("held: {last} bytes");
    assert!(
        last >= 2e6,
        "{last} bytes held: the stream read too little to tell"
    );
    assert!(
        last <= (RECORDS_AHEAD_BYTES + (6 << 20)) as f64,
        "the stream holds {last} bytes of read records; at most {RECORDS_AHEAD_BYTES} and a batch"
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
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
