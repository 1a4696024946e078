//! Identities against the real server binary (OneID, part 1): a JD order
//! and a store receipt that share a phone number make one customer, found
//! by any of its identities in writes, counts' sources and profiles (which
//! list every identity with where and when it was first seen); member
//! pages and exports by identity type; a receipt whose identities name two
//! customers is reported; all of it across kill -9.

mod common;

use common::{Client, int_value};
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
    let batch = IngestRequest {
        source: source.into(),
        seq: 1,
        data: data.as_bytes().to_vec(),
        ..Default::default()
    };
    let mut stream = c
        .ingest(tokio_stream::iter(vec![batch]))
        .await
        .unwrap()
        .into_inner();
    let answer = stream.message().await.unwrap().unwrap();
    assert!(stream.message().await.unwrap().is_none());
    answer
}

async fn profile(c: &mut Client, key: &str) -> ProfileResponse {
    c.profile(ProfileRequest {
        customer: key.into(),
        recent_days: 0,
    })
    .await
    .unwrap()
    .into_inner()
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
    assert!(jd.conflicts.is_empty());

    // R1: the member card is new, the phone is Ann's: the receipt is hers.
    // R2: the card is now Ann's, the phone Bo's: applied to Ann (the card
    // comes first), reported, and the phone stays with Bo.
    let pos = ingest(&mut c, "pos_orders", POS).await;
    assert_eq!((pos.accepted, pos.new_customers), (2, 0));
    assert_eq!(pos.identities_linked, 1);
    assert_eq!(pos.conflicts.len(), 1);
    let conflict = &pos.conflicts[0];
    assert_eq!(conflict.line, 3);
    assert_eq!(conflict.customer, "jd_pin:jd_ann");
    assert_eq!(conflict.others.len(), 1);
    assert_eq!(conflict.others[0].identity, "phone:13900001111");
    assert_eq!(conflict.others[0].customer, "jd_pin:jd_bo");

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
                ("member_card:vip-0042", "store"),
                ("phone:13812345678", "jd")
            ]
        );
        // 2026-11-11 20:00:05 in Shanghai.
        assert_eq!(p.identities[0].first_seen_ms, 1_794_398_405_000);
        p.internal_id
    };
    let ann = check(profile(&mut c, "member_card:vip-0042").await);
    assert_eq!(profile(&mut c, "phone:13812345678").await.internal_id, ann);
    assert_eq!(
        int_value(&mut c, "member_card:vip-0042", "order_count").await,
        Some(3)
    );
    assert_eq!(
        int_value(&mut c, "phone:13900001111", "order_count").await,
        Some(1)
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
        int_value(&mut c, "jd_pin:jd_ann", "order_count").await,
        Some(13)
    );

    // Member pages and exports by identity type: the phones of everyone;
    // the member cards of those who have one, the others counted.
    let page = |t: &str| MembersRequest {
        query: "ALL".into(),
        identity_type: t.into(),
        ..Default::default()
    };
    let phones = c.members(page("phone")).await.unwrap().into_inner();
    assert_eq!(phones.customers, ["phone:13812345678", "phone:13900001111"]);
    assert_eq!(phones.without_identity, 0);
    let cards = c.members(page("member_card")).await.unwrap().into_inner();
    assert_eq!(cards.customers, ["member_card:vip-0042"]);
    assert_eq!(cards.without_identity, 1);
    let keys = c.members(page("")).await.unwrap().into_inner();
    assert_eq!(keys.customers, ["jd_pin:jd_ann", "jd_pin:jd_bo"]);
    let err = c.members(page("Phone!")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("identity type"), "{err:?}");
    let mut export = c
        .export(ExportRequest {
            query: "ALL".into(),
            identity_type: "member_card".into(),
            batch_size: 1,
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
        Some(13)
    );
}
