//! Identities against the real server binary (OneID, part 1): a JD order
//! and a store receipt that share a phone number make one customer, found
//! by any of its identities in writes, counts' sources and profiles (which
//! list every identity with where and when it was first seen); a receipt
//! whose identities name two customers merges them (values by their merge
//! rules, the merge log); member pages and exports by identity type; all of
//! it across kill -9.

mod common;

use common::{Client, int_value, profile};
use tagstore::proto::*;

const JD: &str = "\
订单号,用户账号,下单时间,应付金额,收货人手机,订单状态,商品编号,商品名称,商品类目,品牌
J1,jd_ann,2026-11-11 20:00:05,620.00,0086 13812345678,完成,100012,精华,skincare,兰蔻
J2,jd_bo,2026-11-11 21:00:00,12.00,13900001111,完成,100013,面膜,skincare,兰蔻
";

const POS: &str = "\
小票号,会员卡号,手机号,门店,交易时间,交易类型,金额,商品编码,商品类目,品牌
R1,VIP-0042,138 1234 5678,上海南京西路店,2026-11-12 19:00:00,销售,100.00,X1,skincare,SK-II
R2,VIP-0042,139 0000 1111,上海南京西路店,2026-11-13 10:00:00,销售,50.00,X1,skincare,SK-II
";

async fn ingest(c: &mut Client, source: &str, data: &str) -> IngestResponse {
    common::ingest_batch(c, source, data).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_phone_makes_one_customer_found_by_every_identity() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    for preset in ["jd_orders", "pos_orders"] {
        c.create_source(CreateSourceRequest {
            name: preset.into(),
            preset: preset.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let jd = ingest(&mut c, "jd_orders", JD).await;
    assert_eq!((jd.accepted, jd.new_customers), (2, 2));
    assert_eq!(jd.identities_linked, 4);
    assert!(jd.merges.is_empty());

    // R1: the member card is new, the phone is Ann's: the receipt is hers.
    // R2: the card is now Ann's, the phone Bo's: they are one person, and
    // Bo (the newer customer) joins Ann.
    let pos = ingest(&mut c, "pos_orders", POS).await;
    assert_eq!((pos.accepted, pos.new_customers), (2, 0));
    assert_eq!(pos.identities_linked, 1);
    assert_eq!(pos.merges.len(), 1);
    let m = &pos.merges[0];
    assert_eq!(m.merge_id, 1);
    assert_eq!(
        (m.survivor.as_str(), m.absorbed.as_str()),
        ("jd_pin:jd_ann", "jd_pin:jd_bo")
    );
    assert_eq!(m.via, "phone:13900001111");
    assert_eq!(m.moved, ["jd_pin:jd_bo", "phone:13900001111"]);

    let check = |p: ProfileResponse| {
        assert_eq!(p.key, "jd_pin:jd_ann");
        let ids: Vec<(&str, &str)> = p
            .identities
            .iter()
            .map(|i| (i.identity.as_str(), i.first_channel.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("jd_pin:jd_ann", "jd"),
                ("jd_pin:jd_bo", "jd"),
                ("member_card:vip-0042", "store"),
                ("phone:13812345678", "jd"),
                ("phone:13900001111", "jd")
            ]
        );
        // 2026-11-11 20:00:05 in Shanghai.
        assert_eq!(p.identities[0].first_seen_ms, 1_794_398_405_000);
        p.internal_id
    };
    let ann = check(profile(&mut c, "member_card:vip-0042").await);
    assert_eq!(profile(&mut c, "jd_pin:jd_bo").await.internal_id, ann);
    // Both JD orders and both receipts.
    assert_eq!(
        int_value(&mut c, "member_card:vip-0042", "order_count").await,
        Some(4)
    );
    assert_eq!(
        int_value(&mut c, "phone:13900001111", "total_spend_fen").await,
        Some(62_000 + 1_200 + 10_000 + 5_000)
    );
    // A direct write by a secondary identity lands on the same customer.
    c.set_values(SetValuesRequest {
        writes: vec![ValueWrite {
            field: "order_count".into(),
            customer: "phone:13812345678".into(),
            value: Some(value_write::Value::IntAdd(10)),
        }],
    })
    .await
    .unwrap();
    assert_eq!(
        int_value(&mut c, "jd_pin:jd_bo", "order_count").await,
        Some(14)
    );

    // The merge log, whole and for one customer.
    let merges = |after: u64, customer: &str| ListMergesRequest {
        after,
        limit: 0,
        customer: customer.into(),
    };
    let log = c.list_merges(merges(0, "")).await.unwrap().into_inner();
    assert_eq!((log.merges.len(), log.more, log.total), (1, false, 1));
    assert_eq!(log.merges[0].absorbed_id, m.absorbed_id);
    let mine = c
        .list_merges(merges(0, "phone:13900001111"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.merges.len(), 1);
    assert!(
        c.list_merges(merges(1, ""))
            .await
            .unwrap()
            .into_inner()
            .merges
            .is_empty()
    );
    let err = c.list_merges(merges(0, "nobody")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Member pages and exports by identity type: one customer now, named by
    // the phone seen first; member cards likewise.
    let page = |t: &str| MembersRequest {
        query: "ALL".into(),
        identity_type: t.into(),
        ..Default::default()
    };
    let phones = c.members(page("phone")).await.unwrap().into_inner();
    assert_eq!(phones.customers, ["phone:13812345678"]);
    assert_eq!(phones.without_identity, 0);
    let keys = c.members(page("")).await.unwrap().into_inner();
    assert_eq!(keys.customers, ["jd_pin:jd_ann"]);
    let err = c.members(page("Phone!")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("identity type"), "{err:?}");
    // A customer without a member card, for the export.
    let jd = ingest(
        &mut c,
        "jd_orders",
        "订单号,用户账号,下单时间,应付金额,收货人手机,订单状态,商品编号,商品名称,商品类目,品牌\n\
         J3,jd_cy,2026-11-12 20:00:05,1.00,,完成,100012,精华,skincare,兰蔻\n",
    )
    .await;
    assert_eq!(jd.new_customers, 1);
    let mut export = c
        .export(ExportRequest {
            query: "ALL".into(),
            identity_type: "member_card".into(),
            batch_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut got, mut without, mut total) = (Vec::new(), 0, 0);
    while let Some(m) = export.message().await.unwrap() {
        got.extend(m.customers);
        without += m.without_identity;
        total = m.total;
    }
    assert_eq!(got, ["member_card:vip-0042"]);
    assert_eq!((without, total), (1, 2));
    // Hashed for an ad platform: MD5 of the card's value, upper-case hex
    // (as `printf vip-0042 | md5sum` gives it, upper-cased).
    let mut hashed = c
        .export(ExportRequest {
            query: "ALL".into(),
            identity_type: "member_card".into(),
            hash: "md5".into(),
            hash_upper: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let m = hashed.message().await.unwrap().unwrap();
    assert_eq!(m.customers, ["864C0141B72A8BF0C702FDE8062904AC"]);
    for bad in [
        ExportRequest {
            query: "ALL".into(),
            hash: "sha256".into(),
            ..Default::default()
        },
        ExportRequest {
            query: "ALL".into(),
            identity_type: "phone".into(),
            hash: "sha1".into(),
            ..Default::default()
        },
    ] {
        assert_eq!(
            c.export(bad).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    // Across kill -9 (from the log), then a checkpoint and a restart (from
    // an identity section).
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(check(profile(&mut c, "member_card:vip-0042").await), ann);
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(check(profile(&mut c, "phone:13812345678").await), ann);
    let cards = c.members(page("member_card")).await.unwrap().into_inner();
    assert_eq!(cards.customers, ["member_card:vip-0042"]);
    assert_eq!(
        int_value(&mut c, "member_card:vip-0042", "order_count").await,
        Some(14)
    );
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.merges[0].via, "phone:13900001111");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rails_from_the_config_are_reported_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("tagstore.toml");
    std::fs::write(
        &cfg,
        "[oneid]\nblocked = [\"phone:138 0000 0000\"]\nnever_merge = [\"member_card\"]\n",
    )
    .unwrap();
    let server = common::start(&data, &["--config", cfg.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    c.create_source(CreateSourceRequest {
        name: "pos".into(),
        preset: "pos_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Two people typed in with the till's default number, and a member card
    // lent to a friend: no merges, each refusal said on its line.
    let receipts = "\
小票号,会员卡号,手机号,门店,交易时间,交易类型,金额,商品编码,商品类目,品牌
R1,VIP-1,13800000000,上海南京西路店,2026-11-12 19:00:00,销售,100.00,X1,skincare,SK-II
R2,VIP-2,13800000000,上海南京西路店,2026-11-12 19:10:00,销售,100.00,X1,skincare,SK-II
R3,VIP-1,13912345678,上海南京西路店,2026-11-12 19:20:00,销售,100.00,X1,skincare,SK-II
R4,VIP-1,13700000001,上海南京西路店,2026-11-12 19:30:00,销售,100.00,X1,skincare,SK-II
";
    let a = ingest(&mut c, "pos", receipts).await;
    assert_eq!(a.accepted, 4);
    assert!(a.merges.is_empty(), "{:?}", a.merges);
    let lines: Vec<(u64, &str)> = a
        .refused_links
        .iter()
        .map(|r| (r.line, r.identity.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (2, "phone:13800000000"),
            (3, "phone:13800000000"),
            (4, "member_card:vip-1"),
            (5, "member_card:vip-1")
        ],
        "{:?}",
        a.refused_links
    );
    assert!(a.refused_links[0].reason.contains("block list"));
    assert!(a.refused_links[2].reason.contains("never merges"));
    // R3 and R4 name new phones beside a card that never merges: each is a
    // customer of its own.
    assert_eq!(a.new_customers, 4);
    let key = |p: ProfileResponse| p.key;
    assert_eq!(
        key(profile(&mut c, "member_card:vip-1").await),
        "member_card:vip-1"
    );
    assert_eq!(
        profile(&mut c, "member_card:vip-1").await.identities.len(),
        1,
        "the card stays with its first customer"
    );
    assert_eq!(
        key(profile(&mut c, "phone:13912345678").await),
        "phone:13912345678"
    );
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(log.merges.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_says_identities_are_one_person() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let link = |ids: &[&str], channel: &str| LinkRequest {
        identities: ids.iter().map(|s| s.to_string()).collect(),
        channel: channel.into(),
    };
    // New: a customer made, named by the first identity, each normalised.
    let a = c
        .link(link(
            &["phone:+86 138-1234-5678", "wechat_unionid:U1"],
            "app",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(a.created);
    assert_eq!(a.customer, "phone:13812345678");
    assert_eq!(a.identities_linked, 2);
    assert!(a.lsn > 0);
    // Another person, then the link that shows they are one: merged.
    let b = c
        .link(link(&["jd_pin:jd_bo"], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(b.created);
    let ab = c
        .link(link(&["jd_pin:jd_bo", "phone:13812345678"], ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!ab.created);
    assert_eq!(ab.customer, "phone:13812345678");
    assert_eq!(ab.customer_id, a.customer_id);
    assert_eq!(ab.merges.len(), 1);
    assert_eq!(ab.merges[0].absorbed, "jd_pin:jd_bo");
    // Already one: nothing changes.
    let again = c
        .link(link(&["jd_pin:jd_bo", "wechat_unionid:U1"], ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.identities_linked, again.merges.len()), (0, 0));
    assert_eq!(again.lsn, ab.lsn, "not logged");
    let p = c
        .profile(ProfileRequest {
            customer: "jd_pin:jd_bo".into(),
            recent_days: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let channels: Vec<(&str, &str)> = p
        .identities
        .iter()
        .map(|i| (i.identity.as_str(), i.first_channel.as_str()))
        .collect();
    assert_eq!(
        channels,
        [
            ("jd_pin:jd_bo", "link"),
            ("phone:13812345678", "app"),
            ("wechat_unionid:U1", "app")
        ]
    );
    // Refused, naming what is wrong.
    for (bad, why) in [
        (link(&[], ""), "1 to 16"),
        (link(&["nocolon"], ""), "type:value"),
        (link(&["phone:12"], ""), "phone"),
        (link(&["phone:13812345678"], "Bad Channel"), "channel"),
    ] {
        let err = c.link(bad).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{why}: {err:?}");
    }
}

/// `n` Taobao orders of 1.00 yuan from `from` on: 50 buyers; from the
/// 501st order on, buyers 2k and 2k+1 give the same phone (one person with
/// two nicks, 50 customers until then: they merge).
fn paired_orders(from: usize, n: usize, header: bool) -> String {
    let mut s = String::new();
    if header {
        s.push_str("订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n");
    }
    for i in from..from + n {
        let b = i % 50;
        let phone = if i >= 500 {
            format!("1390000{:04}", b / 2)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "T{i},nick{b},1.00,2026-11-11 10:00:00,{phone},交易成功,X,skincare,B,t\n"
        ));
    }
    s
}

/// A client that cancels a stream whose batches merge customers, halfway:
/// each batch (merges included) is applied whole or not at all, and the
/// whole input sent again ends with each person one customer, each merge
/// made once and each order counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_merges_cancelled_halfway_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    c.create_source(CreateSourceRequest {
        name: "tb".into(),
        preset: "taobao_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let batches = || -> Vec<IngestRequest> {
        (0..40)
            .map(|b| IngestRequest {
                source: if b == 0 { "tb".into() } else { String::new() },
                seq: b as u64,
                data: paired_orders(b * 500, 500, b == 0).into_bytes(),
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
    assert_eq!((first.accepted, first.merges.len()), (500, 0));
    drop(answers);
    drop(tx);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut stream = c
        .ingest(tokio_stream::iter(batches()))
        .await
        .unwrap()
        .into_inner();
    let (mut accepted, mut duplicates) = (0, 0);
    while let Some(a) = stream.message().await.unwrap() {
        accepted += a.accepted;
        duplicates += a.duplicates;
    }
    assert_eq!(accepted + duplicates, 20_000);
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.customers, 25, "one customer per person");
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(log.total, 25, "each merge once");
    let total = c
        .aggregate(AggregateRequest {
            query: "order_count >= 1".into(),
            field: "total_spend_fen".into(),
            histogram_edges: vec![],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .sum;
    assert_eq!(total, 20_000 * 100, "each order once");
}

/// The largest requests: a link of 17 identities or of a 20 KB one, a
/// merge-log page over 10,000, an identity type of 20 KB; and an answer
/// whose refusals pass 10,000 lists 10,000 and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_requests_are_refused_by_name_and_answers_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("tagstore.toml");
    std::fs::write(&cfg, "[oneid]\nblocked = [\"phone:13800000000\"]\n").unwrap();
    let server = common::start(&data, &["--config", cfg.to_str().unwrap()]);
    let mut c = common::client(&server).await;
    let many: Vec<String> = (0..17).map(|i| format!("jd_pin:p{i}")).collect();
    let big = format!("jd_pin:{}", "x".repeat(20_000));
    for (ids, why) in [(many, "1 to 16"), (vec![big.clone()], "bytes long")] {
        let err = c
            .link(LinkRequest {
                identities: ids,
                channel: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{why}: {}", err.message());
        assert!(err.message().len() <= 2048, "the message repeats the 20 KB");
    }
    let err = c
        .list_merges(ListMergesRequest {
            limit: 10_001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = c
        .members(MembersRequest {
            query: "ALL".into(),
            identity_type: "x".repeat(20_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() <= 2048);

    // 10,001 receipts with the till's default number.
    c.create_source(CreateSourceRequest {
        name: "pos".into(),
        preset: "pos_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut csv =
        String::from("小票号,会员卡号,手机号,门店,交易时间,交易类型,金额,商品编码,商品类目,品牌\n");
    for i in 0..10_001 {
        csv.push_str(&format!(
            "R{i},VIP-{i},13800000000,店,2026-11-12 19:00:00,销售,1.00,X1,skincare,B\n"
        ));
    }
    let a = ingest(&mut c, "pos", &csv).await;
    assert_eq!(a.accepted, 10_001);
    assert_eq!(a.refused_links.len(), 10_000);
    assert_eq!(a.refused_links_omitted, 1);
}

/// An export by identity type whose reader stops after the first message
/// holds only itself: links and merges go on meanwhile, and the rest of the
/// export, read later, is of the moment it began (customers plus those
/// without a phone add up to its total).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_export_by_identity_type_holds_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    for i in 0..3_000 {
        let mut ids = vec![format!("jd_pin:p{i}")];
        if i % 3 != 0 {
            ids.push(format!("phone:1391{i:07}"));
        }
        if i % 500 == 0 {
            // Batched through Link one by one is slow; a few are enough to
            // check the call, the rest come in one ingest below.
            c.link(LinkRequest {
                identities: ids,
                channel: String::new(),
            })
            .await
            .unwrap();
        }
    }
    c.create_source(CreateSourceRequest {
        name: "jd".into(),
        preset: "jd_orders".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut csv = String::from(
        "订单号,用户账号,下单时间,应付金额,收货人手机,订单状态,商品编号,商品名称,商品类目,品牌\n",
    );
    for i in 0..3_000 {
        let phone = if i % 3 != 0 {
            format!("1391{i:07}")
        } else {
            String::new()
        };
        csv.push_str(&format!(
            "J{i},p{i},2026-11-12 20:00:05,1.00,{phone},完成,1,x,skincare,b\n"
        ));
    }
    assert_eq!(ingest(&mut c, "jd", &csv).await.accepted, 3_000);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut slow = tagstore::proto::tag_store_client::TagStoreClient::new(channel);
    let mut export = slow
        .export(ExportRequest {
            query: "ALL".into(),
            identity_type: "phone".into(),
            batch_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = export.message().await.unwrap().unwrap();
    let total = first.total;
    assert_eq!(total, 3_000);
    // Meanwhile: merges and profiles answer.
    for k in 0..20 {
        let t = std::time::Instant::now();
        let r = c
            .link(LinkRequest {
                identities: vec![
                    format!("jd_pin:p{}", 3 * k),
                    format!("jd_pin:p{}", 3 * k + 1),
                ],
                channel: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.merges.len(), 1);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }
    let (mut named, mut without) = (first.customers.len() as u64, first.without_identity);
    while let Some(m) = export.message().await.unwrap() {
        named += m.customers.len() as u64;
        without += m.without_identity;
    }
    assert_eq!((named, without), (2_000, 1_000), "the export's own moment");
    let now = c
        .stats(StatsRequest {})
        .await
        .unwrap()
        .into_inner()
        .customers;
    assert_eq!(now, 3_000 - 20);
}
