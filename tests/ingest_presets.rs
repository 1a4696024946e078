//! Every built-in source on sample records in its channel's format: UTF-8
//! and GBK, RFC 4180 quoting (commas, quotes and line breaks inside fields),
//! Chinese headers and values, ignored statuses, and malformed rows, each
//! reported with its line and reason while the rows around it are read.

use tagstore::ingest::event::{Event, Identity};
use tagstore::ingest::presets::{self, PRESETS};
use tagstore::ingest::read::{Read, ReadError, Reader};
use tagstore::ingest::source::{Outcome, Source};

fn source(name: &str) -> Source {
    Source::parse(name, presets::preset(name).expect("preset")).expect("valid preset")
}

fn read(name: &str, bytes: &[u8]) -> Vec<Read> {
    Reader::new(&source(name)).feed(bytes).expect("readable")
}

fn events(reads: &[Read]) -> Vec<(u64, &Event)> {
    reads
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Event(e) => Some((r.line, &**e)),
            _ => None,
        })
        .collect()
}

fn rejected(reads: &[Read]) -> Vec<(u64, String)> {
    reads
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Rejected(e) => Some((r.line, e.0.clone())),
            _ => None,
        })
        .collect()
}

fn ignored(reads: &[Read]) -> Vec<u64> {
    reads
        .iter()
        .filter(|r| r.outcome == Outcome::Ignored)
        .map(|r| r.line)
        .collect()
}

fn id(kind: &str, value: &str) -> Identity {
    Identity {
        kind: kind.into(),
        value: value.into(),
    }
}

/// Unix ms of a Shanghai local time.
fn shanghai(text: &str) -> i64 {
    let dt: jiff::civil::DateTime = text.parse().unwrap();
    jiff::tz::TimeZone::get("Asia/Shanghai")
        .unwrap()
        .to_timestamp(dt)
        .unwrap()
        .as_millisecond()
}

fn gbk(text: &str) -> Vec<u8> {
    let (bytes, _, unmappable) = encoding_rs::GBK.encode(text);
    assert!(!unmappable);
    bytes.into_owned()
}

const TAOBAO: &str = "\
订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题
T1001,小美爱护肤,\"￥1,299.00\",2026-11-11 00:00:05,+86 138-1234-5678,交易成功,SKU-9,skincare,雪花秀,\"雪花秀 滋阴水, \"\"限量\"\" 版\"
T1002,小美爱护肤,88.50,2026-11-11 23:59:59,138****5678,交易成功,SKU-2,makeup,,口红
T1003,阿强,35,2026-11-12 10:00:00,13900001111,交易关闭,SKU-3,makeup,,口红
T1004,阿强,35.555,2026-11-12 10:00:00,13900001111,交易成功,SKU-3,makeup,,口红
T1005,阿强,35
T1001,小美爱护肤,\"1,299.00\",2026-11-20 09:30:00,13812345678,退款成功,SKU-9,skincare,雪花秀,\"多行
标题\"
T1006,,10,2026-11-12 10:00:00,138****0000,交易成功,SKU-3,makeup,,口红
";

fn check_taobao(reads: &[Read]) {
    let ev = events(reads);
    assert_eq!(ev.len(), 3, "{reads:#?}");
    let (line, first) = ev[0];
    assert_eq!(line, 2);
    assert_eq!(first.source_event_id.as_deref(), Some("T1001"));
    assert_eq!(first.channel, "taobao");
    assert_eq!(first.event_type, "order");
    assert_eq!(first.amount_fen, Some(129_900));
    assert_eq!(first.at_ms, shanghai("2026-11-11T00:00:05"));
    assert_eq!(
        first.identities,
        vec![id("taobao_nick", "小美爱护肤"), id("phone", "13812345678")]
    );
    assert_eq!(first.category.as_deref(), Some("skincare"));
    assert_eq!(first.brand.as_deref(), Some("雪花秀"));
    assert_eq!(
        first.attributes.get("title").map(String::as_str),
        Some("雪花秀 滋阴水, \"限量\" 版")
    );
    // A masked phone is left out; the nick still names the customer.
    let (_, second) = ev[1];
    assert_eq!(second.identities, vec![id("taobao_nick", "小美爱护肤")]);
    assert_eq!(second.amount_fen, Some(8_850));
    assert_eq!(second.brand, None);
    // The refund: a quoted field with a line break inside.
    let (line, refund) = ev[2];
    assert_eq!(line, 7);
    assert_eq!(refund.event_type, "refund");
    assert_eq!(refund.source_event_id.as_deref(), Some("T1001"));
    assert_eq!(refund.amount_fen, Some(129_900));
    assert_eq!(
        refund.attributes.get("title").map(String::as_str),
        Some("多行\n标题")
    );
    assert_eq!(ignored(reads), vec![4]);
    let bad = rejected(reads);
    assert_eq!(bad.len(), 3, "{bad:?}");
    assert_eq!(bad[0].0, 5);
    assert!(bad[0].1.contains("two decimal places"), "{}", bad[0].1);
    assert_eq!(bad[1].0, 6);
    assert!(
        bad[1].1.contains("3 fields") && bad[1].1.contains("10"),
        "{}",
        bad[1].1
    );
    assert_eq!(bad[2].0, 9);
    assert!(
        bad[2].1.contains("no usable customer") && bad[2].1.contains("masked"),
        "{}",
        bad[2].1
    );
}

#[test]
fn taobao_orders_utf8_and_gbk_read_the_same() {
    check_taobao(&read("taobao_orders", TAOBAO.as_bytes()));
    check_taobao(&read("taobao_orders", &gbk(TAOBAO)));
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(TAOBAO.as_bytes());
    check_taobao(&read("taobao_orders", &bom));
}

#[test]
fn a_header_without_a_required_column_refuses_the_file() {
    let csv = "订单编号,买家昵称,实付金额\nT1,a,1\n";
    let e: ReadError = Reader::new(&source("taobao_orders"))
        .feed(csv.as_bytes())
        .unwrap_err();
    assert!(e.0.contains("下单时间") && e.0.contains("订单状态"), "{e}");
    assert!(e.0.contains("订单编号, 买家昵称, 实付金额"), "{e}");
}

#[test]
fn chunks_keep_the_header_and_the_line_numbers() {
    let src = source("taobao_orders");
    let mut reader = Reader::new(&src);
    let (head, tail) = TAOBAO.split_at(TAOBAO.find("T1003").unwrap());
    let mut all = reader.feed(head.as_bytes()).unwrap();
    all.extend(reader.feed(tail.as_bytes()).unwrap());
    check_taobao(&all);
}

#[test]
fn jd_orders() {
    let csv = "\
订单号,用户账号,下单时间,应付金额,收货人手机,订单状态,商品编号,商品名称,商品类目,品牌
J77,JD_Pin_7781,2026/11/11 20:00:05,620.00,0086 13812345678,完成,100012,精华,skincare,兰蔻
J78,jd_pin_7781,2026-11-12 08:00,12,13812345678,已取消,100013,面膜,skincare,兰蔻
J79,,2026-11-12 08:00,12,,完成,100013,面膜,skincare,兰蔻
J80,jd_pin_1,2026-11-13 08:00,12,,退款完成,100013,面膜,skincare,兰蔻
";
    let reads = read("jd_orders", &gbk(csv));
    let ev = events(&reads);
    assert_eq!(ev.len(), 2, "{reads:#?}");
    // JD pins are case-sensitive: kept as written.
    assert_eq!(
        ev[0].1.identities,
        vec![id("jd_pin", "JD_Pin_7781"), id("phone", "13812345678")]
    );
    assert_eq!(ev[0].1.at_ms, shanghai("2026-11-11T20:00:05"));
    assert_eq!(ev[0].1.amount_fen, Some(62_000));
    assert_eq!(ev[1].1.event_type, "refund");
    assert_eq!(ignored(&reads), vec![3]);
    let bad = rejected(&reads);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, 4);
    assert!(bad[0].1.contains("names no customer"), "{}", bad[0].1);
}

#[test]
fn pdd_orders() {
    let csv = "\
订单号,商品,商品id,订单状态,用户实付金额(元),支付时间,用户ID,手机,商品类目,品牌
P1,洗面奶,55,已签收,19.9,2026-11-11 12:00:00,pdd_42,13700000000,skincare,
P2,洗面奶,55,未成团,19.9,2026-11-11 12:00:00,pdd_43,,skincare,
P3,洗面奶,55,已签收,免费,2026-11-11 12:00:00,pdd_44,,skincare,
";
    let reads = read("pdd_orders", csv.as_bytes());
    let ev = events(&reads);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1.amount_fen, Some(1_990));
    assert_eq!(ev[0].1.channel, "pdd");
    assert_eq!(ignored(&reads), vec![3]);
    let bad = rejected(&reads);
    assert!(bad[0].1.contains("not a number"), "{bad:?}");
}

#[test]
fn wechat_interactions() {
    let lines = "\
{\"openid\":\"oX9a01\",\"unionid\":\"uN1\",\"event\":\"like\",\"create_time\":1794398405,\"msg_id\":\"m1\",\"item_id\":\"a9\",\"category\":\"skincare\"}
{\"openid\":\"oX9a01\",\"event\":\"unsubscribe\",\"create_time\":1794398405}

{\"openid\":\"oX9a02\",\"event\":\"subscribe\",\"create_time\":\"1794398405\",\"unionid\":null,\"member_card\":\"VIP-7\"}
not json
[1,2]
{\"openid\":\"oX9a03\",\"event\":\"poke\",\"create_time\":1794398405}
";
    let reads = read("wechat_interactions", lines.as_bytes());
    let ev = events(&reads);
    assert_eq!(ev.len(), 2, "{reads:#?}");
    assert_eq!(
        ev[0].1.identities,
        vec![id("wechat_unionid", "uN1"), id("wechat_openid", "oX9a01")]
    );
    assert_eq!(ev[0].1.at_ms, 1_794_398_405_000);
    assert_eq!(ev[0].1.event_type, "like");
    assert_eq!((ev[1].0, ev[1].1.event_type.as_str()), (4, "follow"));
    // A member card bound in WeChat (case-insensitive, as at the till).
    assert_eq!(
        ev[1].1.identities,
        vec![id("wechat_openid", "oX9a02"), id("member_card", "vip-7")]
    );
    assert_eq!(ignored(&reads), vec![2]);
    let bad = rejected(&reads);
    assert_eq!(bad.iter().map(|b| b.0).collect::<Vec<_>>(), vec![5, 6, 7]);
    assert!(bad[0].1.contains("not JSON"));
    assert!(bad[1].1.contains("not a JSON object"));
    assert!(bad[2].1.contains("\"poke\""), "{}", bad[2].1);
}

#[test]
fn douyin_interactions() {
    let lines = "\
{\"event_id\":\"d1\",\"user\":{\"uid\":\"dy_9\",\"phone\":\"+86 139 0000 1111\"},\"action\":\"点赞\",\"create_time\":1794398405000,\"category\":\"makeup\"}
{\"event_id\":\"d2\",\"user\":{\"uid\":\"dy_9\"},\"action\":\"加购\",\"create_time\":1794398405000}
{\"event_id\":\"d3\",\"user\":{\"uid\":\"dy_9\"},\"action\":\"拉黑\",\"create_time\":1794398405000}
";
    let reads = read("douyin_interactions", &gbk(lines));
    let ev = events(&reads);
    assert_eq!(ev.len(), 2);
    assert_eq!(
        ev[0].1.identities,
        vec![id("douyin_uid", "dy_9"), id("phone", "13900001111")]
    );
    assert_eq!(ev[1].1.event_type, "add_to_cart");
    assert!(rejected(&reads)[0].1.contains("拉黑"));
}

#[test]
fn weibo_interactions() {
    let csv = "用户ID,互动类型,互动时间,互动ID,微博ID,话题类目\r\n\
               wb_1,转发,2026-11-11T20:00:05+08:00,i1,w1,beauty\r\n\
               wb_2,评论,2026-11-11 20:00:05,i2,w1,beauty\r\n";
    let reads = read("weibo_interactions", csv.as_bytes());
    let ev = events(&reads);
    assert_eq!(ev.len(), 2, "{reads:#?}");
    assert_eq!(ev[0].1.event_type, "share");
    assert_eq!(ev[0].1.at_ms, ev[1].1.at_ms);
    assert_eq!(ev[1].1.identities, vec![id("weibo_uid", "wb_2")]);
}

#[test]
fn pos_orders_and_store_visits() {
    let pos = "\
小票号,会员卡号,手机号,门店,交易时间,交易类型,金额,商品编码,商品类目,品牌
R1,VIP-0042,138 1234 5678,上海南京西路店,2026-11-11 19:00:00,销售,\"1,080.00\",X1,skincare,SK-II
R2,vip-0042,,上海南京西路店,2026-11-12 10:00:00,退货,-1080,X1,skincare,SK-II
";
    let reads = read("pos_orders", &gbk(pos));
    let ev = events(&reads);
    assert_eq!(ev.len(), 2, "{reads:#?}");
    // Member cards are case-insensitive.
    assert_eq!(
        ev[0].1.identities,
        vec![id("member_card", "vip-0042"), id("phone", "13812345678")]
    );
    assert_eq!(ev[0].1.store.as_deref(), Some("上海南京西路店"));
    assert_eq!(ev[0].1.amount_fen, Some(108_000));
    assert_eq!(ev[1].1.event_type, "refund");
    assert_eq!(ev[1].1.amount_fen, Some(-108_000));

    let visits =
        "记录ID,会员卡号,手机号,门店,到店时间\nV1,,13812345678,杭州湖滨店,2026-11-12 00:00:00\n";
    let reads = read("store_visits", visits.as_bytes());
    let ev = events(&reads);
    assert_eq!(ev[0].1.event_type, "store_visit");
    assert_eq!(ev[0].1.channel, "store");
    assert_eq!(ev[0].1.at_ms, shanghai("2026-11-12T00:00:00"));
}

#[test]
fn invalid_gbk_bytes_reject_the_row_not_the_file() {
    let mut csv = gbk("记录ID,会员卡号,手机号,门店,到店时间\nV1,C1,,");
    csv.extend_from_slice(&[0x81, 0x20]); // a lead byte without its trail
    csv.extend_from_slice(b",2026-11-12 00:00:00\n");
    csv.extend_from_slice(&gbk("V2,C2,,杭州湖滨店,2026-11-12 00:00:00\n"));
    let reads = read("store_visits", &csv);
    assert_eq!(events(&reads).len(), 1);
    let bad = rejected(&reads);
    assert_eq!(bad[0].0, 2);
    assert!(
        bad[0].1.contains("门店") && bad[0].1.contains("GB18030"),
        "{}",
        bad[0].1
    );
}

#[test]
fn user_sources_are_checked_when_defined() {
    let ok = "format = \"csv\"\nchannel = \"app\"\nevent_type = \"live_view\"\nevent_types = [\"live_view\"]\ntime = \"t\"\nidentities = [{ type = \"app_uid\", column = \"uid\", case_insensitive = true }]\n";
    let s = Source::parse("app_events", ok).unwrap();
    let reads = Reader::new(&s).feed(b"t,uid\n1794398405,ABC\n").unwrap();
    assert_eq!(events(&reads)[0].1.identities, vec![id("app_uid", "abc")]);

    for (def, want) in [
        ("format = \"xml\"", "format"),
        (
            &ok.replace("live_view\"\nevent_types", "unknown\"\nevent_types"),
            "neither built in",
        ),
        (&ok.replace("Asia", "x"), ""),
        (&ok.replace("\"app\"", "\"App Store\""), "lower-case"),
        (
            &ok.replace(
                "case_insensitive = true",
                "case_insensitive = true, extra = 1",
            ),
            "unknown field",
        ),
        (
            &ok.replace(
                "identities = [{ type = \"app_uid\", column = \"uid\", case_insensitive = true }]",
                "identities = []",
            ),
            "at least one identity",
        ),
        (
            &format!("{ok}time_zone = \"Mars/Olympus\"\n"),
            "not a known zone",
        ),
        (
            &ok.replace("type = \"app_uid\"", "type = \"phone\""),
            "built in",
        ),
    ] {
        if want.is_empty() {
            continue;
        }
        let e = Source::parse("s", def).unwrap_err();
        assert!(e.to_string().contains(want), "{def}: {e}");
    }
    assert!(Source::parse("Bad Name", ok).is_err());
    assert!(
        Source::parse("s", &"#".repeat(70_000))
            .unwrap_err()
            .to_string()
            .contains("bytes")
    );
    assert_eq!(PRESETS.len(), 8);
}
