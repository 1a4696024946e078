//! Ingestion against the real server binary over gRPC: sources created from
//! presets and definitions (and refused with the reason), the `Ingest`
//! stream's answers in order with every rejected record's line and reason,
//! facts computed by the server, and events applied once: a stream sent
//! again, and again after kill -9, changes nothing.

mod common;

use common::{Client, code, count, int_value};
use tagstore::proto::*;
use tonic::Code;

const TAOBAO_HEAD: &str = "\
订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题
T1001,小美爱护肤,\"￥1,299.00\",2026-11-11 00:00:05,+86 138-1234-5678,交易成功,SKU-9,skincare,雪花秀,\"雪花秀 滋阴水, \"\"限量\"\" 版\"
T1002,小美爱护肤,88.50,2026-11-11 23:59:59,138****5678,交易成功,SKU-2,makeup,,口红
T1003,阿强,35,2026-11-12 10:00:00,13900001111,交易关闭,SKU-3,makeup,,口红
";
const TAOBAO_TAIL: &str = "\
T1004,阿强,35.555,2026-11-12 10:00:00,13900001111,交易成功,SKU-3,makeup,,口红
T1005,阿强,35
T1001,小美爱护肤,\"1,299.00\",2026-11-20 09:30:00,13812345678,退款成功,SKU-9,skincare,雪花秀,\"多行
标题\"
T1007,阿强,12.00,2026-11-13 10:00:00,13900001111,交易成功,SKU-3,makeup,,口红
";

fn batch(source: &str, seq: u64, data: &[u8]) -> IngestRequest {
    IngestRequest {
        source: source.into(),
        seq,
        data: data.to_vec(),
        ..Default::default()
    }
}

/// Sends the batches on one stream; the answers, or the status it ended with.
async fn ingest(
    c: &mut Client,
    batches: Vec<IngestRequest>,
) -> (Vec<IngestResponse>, Option<tonic::Status>) {
    let mut answers = Vec::new();
    let mut stream = match c.ingest(tokio_stream::iter(batches)).await {
        Ok(r) => r.into_inner(),
        Err(e) => return (answers, Some(e)),
    };
    loop {
        match stream.message().await {
            Ok(Some(a)) => answers.push(a),
            Ok(None) => return (answers, None),
            Err(e) => return (answers, Some(e)),
        }
    }
}

fn taobao() -> Vec<IngestRequest> {
    vec![
        batch("taobao_orders", 1, TAOBAO_HEAD.as_bytes()),
        batch("", 2, TAOBAO_TAIL.as_bytes()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_are_created_listed_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let create = |name: &str, definition: &str, preset: &str, replace: bool| CreateSourceRequest {
        name: name.into(),
        definition: definition.into(),
        preset: preset.into(),
        replace,
    };
    let r = c
        .create_source(create("tb", "", "taobao_orders", false))
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let info = r.source.unwrap();
    assert_eq!((info.name.as_str(), info.format.as_str()), ("tb", "csv"));
    assert!(info.definition.contains("订单编号"));
    assert_eq!(
        code(c.create_source(create("tb", "", "jd_orders", false)).await),
        Code::AlreadyExists
    );
    let r = c
        .create_source(create("tb", "", "jd_orders", true))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    let e = c
        .create_source(create("tb", "", "amazon_orders", false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("taobao_orders"), "{}", e.message());
    let e = c
        .create_source(create("bad", "format = \"xml\"", "", false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("bad") && e.message().contains("format"),
        "{}",
        e.message()
    );
    assert_eq!(
        code(
            c.create_source(create("Bad Name", "", "jd_orders", false))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.create_source(create("x", "a = 1", "jd_orders", false))
                .await
        ),
        Code::InvalidArgument
    );
    let list = c
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.sources.len(), 1);
    assert!(list.sources[0].definition.contains("订单号"));
    assert_eq!(list.presets.len(), 8);
    assert!(list.presets.iter().all(|p| !p.description.is_empty()));
    // A description over 1 KiB is listed cut, at a character's boundary;
    // the definition has it whole.
    let preset = tagstore::ingest::presets::preset("taobao_orders").unwrap();
    let line = preset.find("description = ").unwrap();
    let line_end = line + preset[line..].find('\n').unwrap();
    let long = "长".repeat(1000);
    let definition = format!(
        "{}description = \"{long}\"{}",
        &preset[..line],
        &preset[line_end..]
    );
    let listed = |info: &tagstore::proto::SourceInfo| {
        assert_eq!(info.definition, definition);
        assert!(info.description.len() <= 1024, "{}", info.description.len());
        let kept = info.description.strip_suffix('…').unwrap();
        assert!(long.starts_with(kept) && kept.len() > 1000, "{kept}");
    };
    let r = c
        .create_source(create("long", &definition, "", false))
        .await
        .unwrap()
        .into_inner();
    listed(&r.source.unwrap());
    let list = c
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    listed(list.sources.iter().find(|s| s.name == "long").unwrap());
    c.drop_source(DropSourceRequest { name: "tb".into() })
        .await
        .unwrap();
    assert_eq!(
        code(c.drop_source(DropSourceRequest { name: "tb".into() }).await),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingested_records_become_facts_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    c.create_source(CreateSourceRequest {
        name: "taobao_orders".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let (answers, end) = ingest(&mut c, taobao()).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(
        answers.iter().map(|a| a.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let (a, b) = (&answers[0], &answers[1]);
    assert_eq!((a.accepted, a.ignored, a.duplicates), (2, 1, 0));
    assert!(a.rejected.is_empty());
    assert_eq!(a.new_customers, 1);
    assert_eq!((b.accepted, b.ignored, b.duplicates), (2, 0, 0));
    let lines: Vec<u64> = b.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![5, 6]);
    assert!(b.rejected[0].reason.contains("two decimal places"));
    assert!(b.rejected[1].reason.contains("3 fields"));

    // The facts: 小美 ordered twice and had the first refunded.
    let xiaomei = "taobao_nick:小美爱护肤";
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(1));
    assert_eq!(
        int_value(&mut c, xiaomei, "total_spend_fen").await,
        Some(8_850)
    );
    assert_eq!(
        int_value(&mut c, xiaomei, "spend_fen:taobao").await,
        Some(8_850)
    );
    // 2026-11-11 is day 20768 in Shanghai; the refund (on the 20th) does
    // not move the order days but is activity.
    assert_eq!(
        int_value(&mut c, xiaomei, "first_order_day").await,
        Some(20_768)
    );
    assert_eq!(
        int_value(&mut c, xiaomei, "last_order_day").await,
        Some(20_768)
    );
    assert_eq!(
        int_value(&mut c, xiaomei, "last_active_day").await,
        Some(20_777)
    );
    assert_eq!(
        int_value(&mut c, "taobao_nick:阿强", "order_count").await,
        Some(1)
    );
    assert_eq!(count(&mut c, "bought:skincare").await, 1);
    assert_eq!(count(&mut c, "bought:makeup AND ordered:taobao").await, 2);

    // The same stream again: every event is remembered.
    let (again, end) = ingest(&mut c, taobao()).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(
        again
            .iter()
            .map(|a| (a.accepted, a.duplicates))
            .collect::<Vec<_>>(),
        vec![(0, 2), (0, 2)]
    );
    assert_eq!(
        int_value(&mut c, xiaomei, "total_spend_fen").await,
        Some(8_850)
    );

    // And after kill -9.
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let (again, _) = ingest(&mut c, taobao()).await;
    assert_eq!(
        again.iter().map(|a| a.duplicates).collect::<Vec<_>>(),
        vec![2, 2]
    );
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(1));
    assert_eq!(
        int_value(&mut c, "taobao_nick:阿强", "total_spend_fen").await,
        Some(1_200)
    );
}

/// A record only the writer can refuse (here an order dated years ahead:
/// events from the future are refused when they are planned) fails its
/// batch's write; the batch is then written a record at a time, so that
/// that record alone is rejected, with its line and the writer's reason,
/// and the others are applied, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_writer_refuses_is_rejected_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_preset(&mut c, "tb", "taobao_orders").await;
    let data = format!(
        "{TAOBAO_HEADER}{}{}{}",
        taobao_row("F1", "早", 11, "交易成功", "skincare"),
        "F2,晚,10.00,2099-11-11 10:00:00,,交易成功,SKU-1,skincare,,t\n",
        taobao_row("F3", "早", 12, "交易成功", "makeup"),
    );
    for round in 0..2 {
        let (answers, end) = ingest(&mut c, vec![batch("tb", 1, data.as_bytes())]).await;
        assert!(end.is_none(), "{end:?}");
        let a = &answers[0];
        let lines: Vec<u64> = a.rejected.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3], "round {round}: {:?}", a.rejected);
        assert!(
            a.rejected[0].reason.contains("from the future"),
            "{}",
            a.rejected[0].reason
        );
        // Sent again, the two applied are duplicates.
        let want = if round == 0 { (2, 0) } else { (0, 2) };
        assert_eq!((a.accepted, a.duplicates), want, "round {round}");
    }
    assert_eq!(
        int_value(&mut c, "taobao_nick:早", "order_count").await,
        Some(2)
    );
    // Applied whole or not at all: not even its customer was made.
    let none = c
        .profile(ProfileRequest {
            customer: "taobao_nick:晚".into(),
            recent_days: 0,
        })
        .await;
    assert_eq!(code(none), Code::NotFound);
    assert_eq!(count(&mut c, "bought:makeup").await, 1);
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_cannot_go_on_says_why_after_the_answers_before() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let (answers, end) = ingest(&mut c, vec![batch("", 1, b"x\n")]).await;
    assert!(answers.is_empty());
    assert_eq!(end.unwrap().code(), Code::InvalidArgument);
    let (_, end) = ingest(&mut c, vec![batch("nowhere", 1, b"x\n")]).await;
    let end = end.unwrap();
    assert_eq!(end.code(), Code::NotFound);
    assert!(end.message().contains("nowhere"));

    c.create_source(CreateSourceRequest {
        name: "visits".into(),
        preset: "store_visits".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.create_source(CreateSourceRequest {
        name: "jd".into(),
        preset: "jd_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let good = "记录ID,会员卡号,手机号,门店,到店时间\nV1,C1,,杭州湖滨店,2026-11-12 00:00:00\n";
    // A second source on the same stream is refused, after the first
    // batch's answer.
    let (answers, end) = ingest(
        &mut c,
        vec![batch("visits", 1, good.as_bytes()), batch("jd", 2, b"x\n")],
    )
    .await;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].accepted, 1);
    let end = end.unwrap();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(
        end.message().contains("one source per stream"),
        "{}",
        end.message()
    );
    // A header without the columns the source reads.
    let (_, end) = ingest(&mut c, vec![batch("visits", 1, "a,b\n1,2\n".as_bytes())]).await;
    let end = end.unwrap();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("到店时间"), "{}", end.message());
    assert_eq!(count(&mut c, "visited:store").await, 1);
}

/// Single membership changes, many in flight on one stream: answered in
/// order, each durable; a change the store refuses is answered as rejected
/// and the stream goes on; a batch with records and changes is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_stream_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let change = |seq: u64, tag: &str, key: String, create: bool| IngestRequest {
        seq,
        changes: vec![Mutation {
            tag: tag.into(),
            add: vec![key],
            ..Default::default()
        }],
        create_missing_tags: create,
        ..Default::default()
    };
    let mut batches: Vec<IngestRequest> = (0..500)
        .map(|i| change(i, "高价值用户", format!("c{i}"), true))
        .collect();
    batches.insert(250, change(1_000, "no_such_tag", "x".into(), false));
    let (answers, end) = ingest(&mut c, batches).await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers.len(), 501);
    assert_eq!(answers[250].seq, 1_000);
    assert_eq!(answers[250].rejected.len(), 1);
    assert!(answers[250].rejected[0].reason.contains("no_such_tag"));
    assert_eq!(answers[251].seq, 250, "answers in the order sent");
    assert_eq!(answers.iter().map(|a| a.added).sum::<u64>(), 500);
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(count(&mut c, "高价值用户").await, 500);

    let mut both = change(1, "高价值用户", "d".into(), true);
    both.data = b"x\n".to_vec();
    let (answers, end) = ingest(&mut c, vec![both]).await;
    assert!(answers.is_empty());
    let end = end.unwrap();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("both"), "{}", end.message());
}

/// Batches of one stream are applied in the order sent, though many are in
/// flight: an add and the remove after it never swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_flight_apply_in_the_order_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    for round in 0..4u64 {
        let batches: Vec<IngestRequest> = (0..301u64)
            .map(|i| {
                let mut m = Mutation {
                    tag: "t".into(),
                    ..Default::default()
                };
                let keys: Vec<String> = (0..20).map(|k| format!("c{k}")).collect();
                // Even batches add, odd ones remove; the last (300) adds in
                // rounds 0 and 2, and a final remove follows in 1 and 3.
                if i % 2 == 0 {
                    m.add = keys;
                } else {
                    m.remove = keys;
                }
                IngestRequest {
                    seq: i,
                    changes: vec![m],
                    create_missing_tags: true,
                    ..Default::default()
                }
            })
            .chain((round % 2 == 1).then(|| IngestRequest {
                seq: 301,
                changes: vec![Mutation {
                    tag: "t".into(),
                    remove: (0..20).map(|k| format!("c{k}")).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }))
            .collect();
        let (answers, end) = ingest(&mut c, batches).await;
        assert!(end.is_none(), "{end:?}");
        assert!(answers.iter().all(|a| a.rejected.is_empty()));
        let want = if round % 2 == 1 { 0 } else { 20 };
        assert_eq!(count(&mut c, "t").await, want, "round {round}");
        // Every add after a remove added all 20, and every remove removed them.
        assert!(
            answers[1..].iter().all(|a| a.added + a.removed == 20),
            "round {round}"
        );
    }
}

/// A client stream that goes quiet while nothing of it is in flight is
/// ended with DEADLINE_EXCEEDED after `stream_idle_seconds`, freeing what it
/// held: an `Ingest` stream after its answered batches, a `ReplaceMembers`
/// upload without changing the tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_ended() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tagstore.toml");
    std::fs::write(&config, "[limits]\nstream_idle_seconds = 1\n").unwrap();
    let data = dir.path().join("data");
    let server = common::start(&data, &["--config", config.to_str().unwrap()]);
    let mut c = common::client(&server).await;

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(IngestRequest {
        seq: 7,
        changes: vec![Mutation {
            tag: "t".into(),
            add: vec!["a".into()],
            ..Default::default()
        }],
        create_missing_tags: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut answers = c
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.message().await.unwrap().unwrap().seq, 7);
    // The client keeps the stream open and sends nothing more.
    let end = answers.message().await.unwrap_err();
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(
        end.message().contains("stream_idle_seconds"),
        "{}",
        end.message()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    drop(tx);
    assert_eq!(count(&mut c, "t").await, 1);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ReplaceMembersRequest {
        tag: "t".into(),
        customers: vec!["x".into(), "y".into()],
        last: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c
        .replace_members(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("not changed"), "{}", e.message());
    drop(tx);
    assert_eq!(count(&mut c, "t").await, 1);
}

/// `n` distinct Taobao orders of 1.00 yuan by 50 buyers, header first.
fn small_orders(from: usize, n: usize, header: bool) -> String {
    let mut s = String::new();
    if header {
        s.push_str("订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n");
    }
    for i in from..from + n {
        s.push_str(&format!(
            "T{i},nick{},1.00,2026-11-11 10:00:00,,交易成功,X,skincare,B,t\n",
            i % 50
        ));
    }
    s
}

async fn total_spend(c: &mut Client) -> i64 {
    c.aggregate(AggregateRequest {
        query: "order_count >= 1".into(),
        field: "total_spend_fen".into(),
        histogram_edges: vec![],
        as_of: None,
    })
    .await
    .unwrap()
    .into_inner()
    .sum
}

/// A client that cancels halfway: the batches it handed over finish or do
/// not start, never half; sending the whole input again applies each order
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_halfway_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_preset(&mut c, "tb", "taobao_orders").await;
    let batches = || -> Vec<IngestRequest> {
        (0..40)
            .map(|b| IngestRequest {
                source: if b == 0 { "tb".into() } else { String::new() },
                seq: b as u64,
                data: small_orders(b * 500, 500, b == 0).into_bytes(),
                ..Default::default()
            })
            .collect()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for b in batches() {
        tx.send(b).await.unwrap();
    }
    let mut answers = c
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.accepted, 500);
    // Gone: the request stream and the answers, mid-way.
    drop(answers);
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (again, end) = ingest(&mut c, batches()).await;
    assert!(end.is_none(), "{end:?}");
    let accepted: u64 = again.iter().map(|a| a.accepted).sum();
    let duplicates: u64 = again.iter().map(|a| a.duplicates).sum();
    assert_eq!(accepted + duplicates, 20_000);
    assert!(duplicates >= 500);
    assert_eq!(total_spend(&mut c).await, 20_000 * 100, "each order once");
}

/// A client that cancels a stream of single changes halfway, 64 and more
/// in flight (the writer commits them in combined records): what it handed
/// over is applied in the order sent, so the members are a prefix of what
/// it sent, never a gap; a restart finds the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_changes_cancelled_halfway_leaves_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let change = |i: u64| IngestRequest {
        seq: i,
        changes: vec![Mutation {
            tag: "t".into(),
            add: vec![format!("c{i:05}")],
            ..Default::default()
        }],
        create_missing_tags: true,
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut answers = c
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for i in 0..20_000 {
            if tx.send(change(i)).await.is_err() {
                return;
            }
        }
        // Held open: only the cancel ends the stream.
        std::future::pending::<()>().await;
    });
    for _ in 0..300 {
        answers.message().await.unwrap().unwrap();
    }
    drop(answers);
    sender.abort();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let prefix = |n: u64| -> Vec<String> { (0..n).map(|i| format!("c{i:05}")).collect() };
    let n = count(&mut c, "t").await;
    assert!((300..20_000).contains(&n), "{n} applied");
    async fn members(c: &mut Client) -> Vec<String> {
        let mut keys = c
            .members(MembersRequest {
                query: "t".into(),
                limit: 20_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .customers;
        keys.sort();
        keys
    }
    assert_eq!(
        members(&mut c).await,
        prefix(n),
        "a prefix of what was sent"
    );
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(members(&mut c).await, prefix(n), "after a kill -9");
}

/// A client that does not read its answers holds the stream (the server
/// stops reading once its answers and batches in flight are full), not the
/// server: other calls answer meanwhile, and every answer is there, in
/// order, once the client reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_answers_are_not_read_holds_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut answers = c
        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let sender = tokio::spawn(async move {
        for i in 0..1_000u64 {
            let change = IngestRequest {
                seq: i,
                changes: vec![Mutation {
                    tag: "t".into(),
                    add: vec![format!("c{i}")],
                    ..Default::default()
                }],
                create_missing_tags: true,
                ..Default::default()
            };
            if tx.send(change).await.is_err() {
                return;
            }
        }
    });
    // Nobody reads the answers for a while; another client is served.
    let mut other = common::client(&server).await;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        count(&mut other, "ALL").await;
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut seqs = Vec::new();
    while seqs.len() < 1_000 {
        seqs.push(answers.message().await.unwrap().unwrap().seq);
    }
    sender.await.unwrap();
    assert_eq!(seqs, (0..1_000).collect::<Vec<_>>());
    assert_eq!(count(&mut c, "t").await, 1_000);
}

/// The largest batches: more records, more customers or more bytes than
/// the limits allow (as sent, or as read: records take more memory than
/// their lines) end the stream with the limit named, after the answers
/// before them; a source definition over 64 KiB is refused; a batch of
/// exactly the most records is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_over_the_limits_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tagstore.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_keys_per_request = 10\nmax_request_memory_mb = 1\n",
    )
    .unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut c = common::client(&server).await;
    create_preset(&mut c, "tb", "taobao_orders").await;
    let e = c
        .create_source(CreateSourceRequest {
            name: "big".into(),
            definition: format!("format = \"csv\"\n{}", "#".repeat(70_000)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("bytes"), "{}", e.message());

    // 11 customers in one change batch, after one that fits.
    let change = |seq: u64, n: usize| IngestRequest {
        seq,
        changes: vec![Mutation {
            tag: "t".into(),
            add: (0..n).map(|i| format!("c{i}")).collect(),
            ..Default::default()
        }],
        create_missing_tags: true,
        ..Default::default()
    };
    let (answers, end) = ingest(&mut c, vec![change(1, 10), change(2, 11)]).await;
    assert_eq!(answers.len(), 1);
    let end = end.unwrap();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("limit is 10"), "{}", end.message());

    // A batch of 2 MB against a 1 MiB budget, with nothing in flight.
    let big = IngestRequest {
        source: "tb".into(),
        seq: 1,
        data: small_orders(0, 50_000, true).into_bytes(),
        ..Default::default()
    };
    assert!(big.data.len() > 2 << 20);
    let (_, end) = ingest(&mut c, vec![big]).await;
    let end = end.unwrap();
    assert_eq!(end.code(), Code::ResourceExhausted);
    assert!(
        end.message().contains("max_request_memory_mb"),
        "{}",
        end.message()
    );
    // A batch of 650 KB fits the budget as bytes, but its 10,000 records
    // take several times that once read: refused the same way, and the
    // budget is whole again for a small batch after it.
    let read_large = IngestRequest {
        source: "tb".into(),
        seq: 1,
        data: small_orders(0, 10_000, true).into_bytes(),
        ..Default::default()
    };
    assert!(read_large.data.len() < 1 << 20);
    let (answers, end) = ingest(&mut c, vec![read_large]).await;
    assert!(answers.is_empty(), "{answers:?}");
    let end = end.expect("a batch larger once read than the budget was taken");
    assert_eq!(end.code(), Code::ResourceExhausted);
    assert!(
        end.message().contains("max_request_memory_mb"),
        "{}",
        end.message()
    );
    let (answers, end) = ingest(
        &mut c,
        vec![IngestRequest {
            source: "tb".into(),
            seq: 1,
            data: small_orders(0, 100, true).into_bytes(),
            ..Default::default()
        }],
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers[0].accepted, 100);
    drop(c);
    drop(server);

    // More than 100,000 records in one batch (default limits).
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create_preset(&mut c, "tb", "taobao_orders").await;
    let (_, end) = ingest(
        &mut c,
        vec![IngestRequest {
            source: "tb".into(),
            seq: 1,
            data: small_orders(0, 100_001, true).into_bytes(),
            ..Default::default()
        }],
    )
    .await;
    let end = end.unwrap();
    assert_eq!(end.code(), Code::InvalidArgument);
    assert!(end.message().contains("100000"), "{}", end.message());
    assert_eq!(count(&mut c, "ALL").await, 0, "nothing of it applied");

    // Exactly 100,000 records: taken whole (read, they hold about 160 MB of
    // the default 256 MiB budget).
    let (answers, end) = ingest(
        &mut c,
        vec![IngestRequest {
            source: "tb".into(),
            seq: 2,
            data: small_orders(0, 100_000, true).into_bytes(),
            ..Default::default()
        }],
    )
    .await;
    assert!(end.is_none(), "{end:?}");
    assert_eq!(answers.len(), 1);
    assert_eq!(
        answers[0].accepted,
        100_000,
        "{:?}",
        answers[0].rejected.first()
    );
}

/// Facts rebuilt from the events the server keeps: values written by hand
/// over them are replaced by what the events give (and a behaviour no event
/// gave is erased), other customers are untouched, the result survives
/// kill -9, and after the fact rules change a rebuild follows the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn facts_are_rebuilt_from_the_kept_events() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::start(&data, &[]);
    let mut c = common::client(&server).await;
    c.create_source(CreateSourceRequest {
        name: "taobao_orders".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, end) = ingest(&mut c, taobao()).await;
    assert!(end.is_none(), "{end:?}");
    let xiaomei = "taobao_nick:小美爱护肤";
    let aqiang = "taobao_nick:阿强";

    // Facts written over by hand, and a behaviour no event gave.
    c.create_field(CreateFieldRequest {
        name: "bought:perfume".into(),
        kind: FieldKind::Behaviour as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let w = |field: &str, who: &str, value: value_write::Value| ValueWrite {
        field: field.into(),
        customer: who.into(),
        value: Some(value),
    };
    c.set_values(SetValuesRequest {
        writes: vec![
            w("order_count", xiaomei, value_write::Value::IntValue(999)),
            w("total_spend_fen", xiaomei, value_write::Value::IntAdd(5)),
            w("order_count", aqiang, value_write::Value::IntValue(7)),
            w(
                "bought:perfume",
                xiaomei,
                value_write::Value::EventDate("2026-11-12".into()),
            ),
        ],
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "bought:perfume").await, 1);

    let rebuild = |customers: &[&str], allow_partial| RebuildFactsRequest {
        customers: customers.iter().map(|s| s.to_string()).collect(),
        allow_partial,
        skip_partial: false,
    };
    let r = c
        .rebuild_facts(rebuild(&[xiaomei, "taobao_nick:nobody"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rebuilt, 1);
    assert_eq!(r.not_found, ["taobao_nick:nobody"]);
    // Her three events: two orders and the refund.
    assert_eq!(r.events, 3);
    assert_eq!(r.refused, 0);
    assert_eq!(r.events_dropped_to_ms, 0);
    assert!(r.lsn > 0);
    // Only unknown customers: nothing to do, and said so (was ABORTED).
    let r = c
        .rebuild_facts(rebuild(&["taobao_nick:nobody"], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.rebuilt, r.not_found.len()), (0, 1));
    let facts = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            (
                int_value(&mut c, xiaomei, "order_count").await,
                int_value(&mut c, xiaomei, "total_spend_fen").await,
                int_value(&mut c, xiaomei, "last_active_day").await,
                int_value(&mut c, aqiang, "order_count").await,
            )
        }
    };
    let rebuilt = (Some(1), Some(8_850), Some(20_777), Some(7));
    assert_eq!(facts(&mut c).await, rebuilt);
    assert_eq!(count(&mut c, "bought:perfume").await, 0);
    // Her skincare order (T1001) was refunded in a later batch: live, the
    // refund took back its count and money; rebuilt, it takes back the
    // order's behaviour too (she is the only one who bought skincare).
    assert_eq!(count(&mut c, "bought:skincare").await, 0);
    assert_eq!(count(&mut c, "bought:makeup").await, 2);

    // Durable, and the archive outlives the process.
    server.kill();
    drop(server);
    let server = common::start(&data, &[]);
    let mut c = common::client(&server).await;
    assert_eq!(facts(&mut c).await, rebuilt);
    let r = c
        .rebuild_facts(rebuild(&[aqiang], false))
        .await
        .unwrap()
        .into_inner();
    // His one order (his other rows were a closed order and two rejects,
    // never events).
    assert_eq!((r.rebuilt, r.events), (1, 1));
    assert_eq!(int_value(&mut c, aqiang, "order_count").await, Some(1));
    // Refused: nobody to rebuild, or too many.
    assert_eq!(
        code(c.rebuild_facts(rebuild(&[], false)).await),
        Code::InvalidArgument
    );
    drop(c);
    drop(server);

    // New rules: orders count, refunds no longer take one back; spend is
    // no longer a fact (its values stay as they are).
    let rules = dir.path().join("facts.toml");
    std::fs::write(
        &rules,
        r#"
time_zone = "Asia/Shanghai"
[[counters]]
events = ["order"]
field = "order_count"
add = "1"
"#,
    )
    .unwrap();
    let config = dir.path().join("tagstore.toml");
    std::fs::write(
        &config,
        format!(
            "facts = {:?}\n[limits]\nmax_keys_per_request = 2\n",
            rules.to_str().unwrap()
        ),
    )
    .unwrap();
    let server = common::start(&data, &["--config", config.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    let r = c
        .rebuild_facts(rebuild(&[xiaomei], false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rebuilt, 1);
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(2));
    assert_eq!(
        int_value(&mut c, xiaomei, "total_spend_fen").await,
        Some(8_850)
    );
    let e = c
        .rebuild_facts(rebuild(&[xiaomei, aqiang, "x:y"], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("max_keys_per_request"),
        "{}",
        e.message()
    );

    // An archive file gone: DATA_LOSS naming it, and nothing written.
    c.set_values(SetValuesRequest {
        writes: vec![w("order_count", xiaomei, value_write::Value::IntValue(5))],
    })
    .await
    .unwrap();
    let files = common::files_with(&data, ".tev");
    assert!(!files.is_empty());
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    let e = c
        .rebuild_facts(rebuild(&[xiaomei], false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(
        e.message().contains("events-") && e.message().contains("missing"),
        "{}",
        e.message()
    );
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(5));

    // The server starts without it (saying so), serves, and keeps refusing
    // the rebuild by name rather than rebuilding from what is left.
    drop(c);
    drop(server);
    let server = common::start(&data, &["--config", config.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(5));
    assert!(
        server.stderr().contains("cannot be read"),
        "{}",
        server.stderr()
    );
    assert_eq!(
        code(c.rebuild_facts(rebuild(&[xiaomei], false)).await),
        Code::DataLoss
    );
}

/// A client that gives up on `RebuildFacts` halfway (at many points, by a
/// deadline of its own) leaves the customer's facts either as they were or
/// wholly rebuilt, never half; the server goes on, and a rebuild after it
/// completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_cancelled_halfway_is_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    c.create_source(CreateSourceRequest {
        name: "taobao_orders".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, end) = ingest(&mut c, taobao()).await;
    assert!(end.is_none(), "{end:?}");
    let xiaomei = "taobao_nick:小美爱护肤";
    let request = || RebuildFactsRequest {
        customers: vec![xiaomei.into()],
        ..Default::default()
    };
    let mut outcomes = [0, 0];
    for micros in (0..40).map(|i| i * 250) {
        // Two facts written over by hand; a rebuild sets both back.
        c.set_values(SetValuesRequest {
            writes: ["order_count", "total_spend_fen"]
                .iter()
                .map(|f| ValueWrite {
                    field: f.to_string(),
                    customer: xiaomei.into(),
                    value: Some(value_write::Value::IntValue(999)),
                })
                .collect(),
        })
        .await
        .unwrap();
        let mut caller = c.clone();
        let call = tokio::time::timeout(
            std::time::Duration::from_micros(micros),
            caller.rebuild_facts(request()),
        )
        .await;
        // Whatever reached the writer is done by the time a checkpoint is
        // (a rebuild the server had not yet seen cancelled may still land
        // later: both facts are read from one snapshot, in one profile).
        c.checkpoint(CheckpointRequest::default()).await.unwrap();
        let p = c
            .profile(ProfileRequest {
                customer: xiaomei.into(),
                recent_days: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let int = |name: &str| {
            p.values.iter().find_map(|v| match (&v.field, &v.value) {
                (f, Some(field_value::Value::IntValue(i))) if f == name => Some(*i),
                _ => None,
            })
        };
        let facts = (int("order_count"), int("total_spend_fen"));
        match facts {
            (Some(999), Some(999)) => outcomes[0] += 1,
            (Some(1), Some(8_850)) => outcomes[1] += 1,
            other => panic!("half a rebuild after {micros} µs ({call:?}): {other:?}"),
        }
    }
    eprintln!(
        "cancelled before the write: {}, after: {}",
        outcomes[0], outcomes[1]
    );
    let r = c.rebuild_facts(request()).await.unwrap().into_inner();
    assert_eq!(r.rebuilt, 1);
    assert_eq!(int_value(&mut c, xiaomei, "order_count").await, Some(1));
}

/// A Taobao order export's header row.
const TAOBAO_HEADER: &str =
    "订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n";

/// A row of [`TAOBAO_HEADER`]: 10 yuan on 2026-11-`day` at 10:00.
fn taobao_row(id: &str, nick: &str, day: u32, status: &str, category: &str) -> String {
    format!("{id},{nick},10.00,2026-11-{day} 10:00:00,,{status},SKU-1,{category},,t\n")
}

/// Creates the source `name` from a built-in preset.
async fn create_preset(c: &mut Client, name: &str, preset: &str) {
    c.create_source(CreateSourceRequest {
        name: name.into(),
        preset: preset.into(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("source {name}: {e}"));
}

async fn stats(c: &mut Client) -> StatsResponse {
    c.stats(StatsRequest {}).await.unwrap().into_inner()
}

/// A refund takes back its order: the count and the money always; the
/// order's behaviours and days when the refund comes before the order or in
/// the same batch (a Taobao export names both by the order number), and a
/// refund in a later batch once the customer's facts are rebuilt (here only
/// by `RebuildFacts`: the background rebuilder is off). A POS return names
/// no order (its receipt number is its own): the count and the money only,
/// even rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_takes_back_its_order_whichever_comes_first() {
    let row = taobao_row;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagstore.toml");
    std::fs::write(&cfg, "refund_rebuild_seconds = 0\n").unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let mut c = common::client(&server).await;
    for (name, preset) in [("tb", "taobao_orders"), ("pos", "pos_orders")] {
        c.create_source(CreateSourceRequest {
            name: name.into(),
            preset: preset.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let csv = |rows: &[String]| format!("{TAOBAO_HEADER}{}", rows.concat()).into_bytes();
    // 甲: the refund of her perfume order in the batch before the order.
    // 乙: her perfume order and its refund in one batch, refund last.
    // 丙: the refund of his perfume order in the batch after it.
    // Each also has a makeup order on the 12th, kept.
    let batches = vec![
        batch(
            "tb",
            1,
            &csv(&[
                row("A1", "甲", 14, "退款成功", "perfume"),
                row("B1", "乙", 14, "交易成功", "perfume"),
                row("B1", "乙", 14, "退款成功", "perfume"),
                row("C1", "丙", 14, "交易成功", "perfume"),
            ]),
        ),
        // The same file, continued: no header again.
        batch(
            "",
            2,
            &[
                row("A1", "甲", 14, "交易成功", "perfume"),
                row("C1", "丙", 14, "退款成功", "perfume"),
                row("A2", "甲", 12, "交易成功", "makeup"),
                row("B2", "乙", 12, "交易成功", "makeup"),
                row("C2", "丙", 12, "交易成功", "makeup"),
            ]
            .concat()
            .into_bytes(),
        ),
    ];
    let (answers, end) = ingest(&mut c, batches).await;
    assert!(end.is_none(), "{end:?}");
    assert!(answers.iter().all(|a| a.rejected.is_empty()), "{answers:?}");
    let key = |nick: &str| format!("taobao_nick:{nick}");
    // 2026-11-12 is day 20769 in Shanghai, the 14th 20771.
    for nick in ["甲", "乙", "丙"] {
        assert_eq!(int_value(&mut c, &key(nick), "order_count").await, Some(1));
        assert_eq!(
            int_value(&mut c, &key(nick), "total_spend_fen").await,
            Some(1_000)
        );
        assert_eq!(
            int_value(&mut c, &key(nick), "first_order_day").await,
            Some(20_769)
        );
    }
    for (nick, last) in [("甲", 20_769), ("乙", 20_769), ("丙", 20_771)] {
        assert_eq!(
            int_value(&mut c, &key(nick), "last_order_day").await,
            Some(last),
            "{nick}"
        );
    }
    assert_eq!(
        count(&mut c, "bought:perfume").await,
        1,
        "丙's, until rebuilt"
    );
    assert_eq!(count(&mut c, "bought:makeup").await, 3);
    assert_eq!(stats(&mut c).await.facts_rebuilds_due, 1, "丙");

    let r = c
        .rebuild_facts(RebuildFactsRequest {
            customers: ["甲", "乙", "丙"].iter().map(|n| key(n)).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rebuilt, 3);
    assert_eq!(count(&mut c, "bought:perfume").await, 0);
    assert_eq!(
        int_value(&mut c, &key("丙"), "last_order_day").await,
        Some(20_769)
    );
    assert_eq!(int_value(&mut c, &key("丙"), "order_count").await, Some(1));
    assert_eq!(stats(&mut c).await.facts_rebuilds_due, 0);

    // A store sale and a return of it on another receipt: the return names
    // no order.
    const POS_HEAD: &str =
        "小票号,会员卡号,手机号,交易类型,金额,交易时间,商品编码,商品类目,品牌,门店\n";
    let pos = format!(
        "{POS_HEAD}R1,vip-1,,销售,20.00,2026-11-12 10:00:00,SKU-1,perfume,,上海店\n\
         R2,vip-1,,退货,20.00,2026-11-13 10:00:00,SKU-1,perfume,,上海店\n"
    );
    let (answers, end) = ingest(&mut c, vec![batch("pos", 1, pos.as_bytes())]).await;
    assert!(end.is_none(), "{end:?}");
    assert!(answers[0].rejected.is_empty(), "{:?}", answers[0].rejected);
    let card = "member_card:vip-1";
    c.rebuild_facts(RebuildFactsRequest {
        customers: vec![card.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(int_value(&mut c, card, "order_count").await, Some(0));
    assert_eq!(int_value(&mut c, card, "total_spend_fen").await, Some(0));
    assert_eq!(count(&mut c, "bought:perfume").await, 1);
}

/// A refund in a later request than its order: the count and the money at
/// once, and the order's behaviours and days once the server's rebuilder
/// has run. Which customers are due a rebuild is kept in the store: it
/// outlives a kill -9 (the log) and a checkpoint and restart (the
/// manifest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_after_its_order_is_taken_back_by_the_rebuilder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let off = dir.path().join("off.toml");
    std::fs::write(&off, "refund_rebuild_seconds = 0\n").unwrap();
    let on = dir.path().join("on.toml");
    std::fs::write(&on, "refund_rebuild_seconds = 1\n").unwrap();
    let mut server = common::start(&data, &["--config", off.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    create_preset(&mut c, "tb", "taobao_orders").await;
    let send = |rows: Vec<String>| {
        vec![batch(
            "tb",
            1,
            format!("{TAOBAO_HEADER}{}", rows.concat()).as_bytes(),
        )]
    };
    // 丙: a makeup order on the 12th and a perfume order on the 14th; then,
    // in a later request, the perfume order's refund.
    let (answers, end) = ingest(
        &mut c,
        send(vec![
            taobao_row("C1", "丙", 14, "交易成功", "perfume"),
            taobao_row("C2", "丙", 12, "交易成功", "makeup"),
        ]),
    )
    .await;
    assert!(
        end.is_none() && answers[0].rejected.is_empty(),
        "{answers:?}"
    );
    let (answers, end) = ingest(
        &mut c,
        send(vec![taobao_row("C1", "丙", 14, "退款成功", "perfume")]),
    )
    .await;
    assert!(
        end.is_none() && answers[0].rejected.is_empty(),
        "{answers:?}"
    );
    let key = "taobao_nick:丙";
    assert_eq!(int_value(&mut c, key, "order_count").await, Some(1));
    assert_eq!(int_value(&mut c, key, "total_spend_fen").await, Some(1_000));
    // Not yet: the rebuilder is off.
    assert_eq!(count(&mut c, "bought:perfume").await, 1);
    assert_eq!(int_value(&mut c, key, "last_order_day").await, Some(20_771));
    assert_eq!(stats(&mut c).await.facts_rebuilds_due, 1);

    // Still due after a kill -9 (read back from the log) ...
    drop(c);
    server.kill();
    let mut server = common::start(&data, &["--config", off.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    assert_eq!(stats(&mut c).await.facts_rebuilds_due, 1, "after kill -9");
    // ... and after a checkpoint and a restart (read from the manifest).
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    drop(c);
    server.stop().unwrap();
    let mut server = common::start(&data, &["--config", off.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    assert_eq!(stats(&mut c).await.facts_rebuilds_due, 1, "after a restart");
    assert_eq!(count(&mut c, "bought:perfume").await, 1);
    drop(c);
    server.stop().unwrap();

    // With the rebuilder on, the order's behaviour and day go.
    let server = common::start(&data, &["--config", on.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while stats(&mut c).await.facts_rebuilds_due > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not rebuilt in 60 s; the server said:\n{}",
            server.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(count(&mut c, "bought:perfume").await, 0);
    assert_eq!(count(&mut c, "bought:makeup").await, 1);
    assert_eq!(int_value(&mut c, key, "last_order_day").await, Some(20_769));
    assert_eq!(
        int_value(&mut c, key, "first_order_day").await,
        Some(20_769)
    );
    assert_eq!(int_value(&mut c, key, "order_count").await, Some(1));
    assert_eq!(int_value(&mut c, key, "total_spend_fen").await, Some(1_000));

    // A second customer, while it runs: an order, its refund later, and a
    // resent refund (a duplicate: nothing more is due).
    let (answers, _) = ingest(
        &mut c,
        send(vec![taobao_row("D1", "丁", 13, "交易成功", "perfume")]),
    )
    .await;
    assert_eq!(answers[0].accepted, 1);
    for _ in 0..2 {
        ingest(
            &mut c,
            send(vec![taobao_row("D1", "丁", 13, "退款成功", "perfume")]),
        )
        .await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while count(&mut c, "bought:perfume").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "丁 not rebuilt in 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        int_value(&mut c, "taobao_nick:丁", "order_count").await,
        Some(0)
    );
    assert_eq!(
        int_value(&mut c, "taobao_nick:丁", "last_order_day").await,
        None
    );
    assert!(
        server.stderr().contains("facts rebuilt after refunds"),
        "{}",
        server.stderr()
    );
}
