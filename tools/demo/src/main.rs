//! `tagstore-demo`: a cosmetics brand's year of channel exports, for trying
//! ingestion on a laptop. People buy on Taobao, JD and Pinduoduo, follow the
//! brand on WeChat, Douyin and Weibo, and visit its stores; one person shows
//! up under different identities (the same phone on JD and at the till, a
//! WeChat unionid beside a member card). Every file is in the format of the
//! ingestion preset of the same name, some in GBK as Chinese back offices
//! write them, each with a few malformed rows (which the server rejects and
//! reports). Deterministic for a seed and an end date.
//!
//! It writes files only; loading them is the shell's job (README, "Demo").

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug)]
#[command(
    name = "tagstore-demo",
    about = "Writes a cosmetics brand's year of channel exports"
)]
struct Cli {
    /// Directory to write the files into (created if missing).
    #[arg(long, default_value = "demo")]
    out: PathBuf,
    /// People in the brand's world.
    #[arg(long, default_value_t = 20_000)]
    customers: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The last day of the year of data, YYYY-MM-DD (default: today in Shanghai).
    #[arg(long)]
    end: Option<String>,
}

const DAY_MS: i64 = 86_400_000;
const SHANGHAI_MS: i64 = 8 * 3_600_000;
const CATEGORIES: &[&str] = &["skincare", "makeup", "fragrance", "haircare", "bodycare"];
const LINES: &[&str] = &["雪肌", "焕颜", "水光", "玫瑰", "青春"];
const STORES: &[&str] = &[
    "上海南京西路店",
    "杭州湖滨店",
    "北京三里屯店",
    "成都太古里店",
];

/// One person and the identities they use.
struct Person {
    phone: Option<String>,
    taobao: Option<String>,
    jd: Option<String>,
    pdd: Option<String>,
    openid: Option<String>,
    unionid: Option<String>,
    douyin: Option<String>,
    weibo: Option<String>,
    card: Option<String>,
    /// Orders per year, on average.
    appetite: f64,
    /// The category they buy most.
    favourite: &'static str,
    /// A member who bound the card in WeChat (the card ties WeChat to the
    /// till, and through the phone to the shops).
    binds_card: bool,
}

fn person(rng: &mut StdRng, i: u32) -> Person {
    let phone = rng.random_bool(0.85).then(|| {
        format!(
            "1{}{:09}",
            rng.random_range(3..=9),
            rng.random_range(0..1_000_000_000u32)
        )
    });
    let maybe = |rng: &mut StdRng, p: f64, v: String| rng.random_bool(p).then_some(v);
    let wechat = rng.random_bool(0.5);
    Person {
        phone,
        taobao: maybe(rng, 0.45, format!("小美{i}号")),
        jd: maybe(rng, 0.35, format!("jd_{i:06}")),
        pdd: maybe(rng, 0.2, format!("pdd{i}")),
        openid: wechat.then(|| format!("oX{i:08x}")),
        unionid: (wechat && rng.random_bool(0.8)).then(|| format!("uN{i:08x}")),
        douyin: maybe(rng, 0.3, format!("dy{i}")),
        weibo: maybe(rng, 0.15, format!("wb{i}")),
        card: maybe(rng, 0.25, format!("VIP-{i:06}")),
        appetite: rng.random_range(0.2..8.0),
        favourite: CATEGORIES.choose(rng).copied().unwrap_or("skincare"),
        binds_card: rng.random_bool(0.7),
    }
}

/// A moment in the year, busier on 11.11 and 6.18.
fn moment(rng: &mut StdRng, start: i64, days: i64) -> i64 {
    let day = if rng.random_bool(0.12) {
        // The shopping festivals: 11 November and 18 June (when in range).
        let festivals: Vec<i64> = (0..days)
            .filter(|d| {
                let (m, dd) = month_day(start + d * DAY_MS);
                (m, dd) == (11, 11) || (m, dd) == (6, 18)
            })
            .collect();
        festivals.choose(rng).copied().unwrap_or(0)
    } else {
        rng.random_range(0..days)
    };
    start + day * DAY_MS + rng.random_range(0..DAY_MS)
}

/// Month and day of a Unix ms in Shanghai.
fn month_day(ms: i64) -> (i8, i8) {
    let dt = local(ms);
    (dt.month(), dt.day())
}

fn local(ms: i64) -> jiff::civil::DateTime {
    jiff::Timestamp::from_millisecond(ms + SHANGHAI_MS)
        .map(|t| jiff::tz::TimeZone::UTC.to_datetime(t))
        .unwrap_or_default()
}

fn fmt_local(ms: i64, sep: char) -> String {
    let dt = local(ms);
    format!(
        "{:04}{sep}{:02}{sep}{:02} {:02}:{:02}:{:02}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

fn yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, fen % 100)
}

/// `¥1,299.00`, as some exports write it.
fn yuan_with_sign(fen: i64) -> String {
    let whole = (fen / 100).to_string();
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("￥{grouped}.{:02}", fen % 100)
}

/// A phone number as different back offices write it.
fn phone_form(rng: &mut StdRng, p: &str) -> String {
    match rng.random_range(0..4) {
        0 => format!("+86 {}-{}-{}", &p[..3], &p[3..7], &p[7..]),
        1 => format!("0086{p}"),
        2 => format!("{} {} {}", &p[..3], &p[3..7], &p[7..]),
        _ => p.to_string(),
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn row(fields: &[String]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// An order's essentials.
struct Order {
    at: i64,
    fen: i64,
    category: &'static str,
    line: &'static str,
    sku: u32,
    refunded: Option<i64>,
}

fn order(rng: &mut StdRng, p: &Person, start: i64, days: i64) -> Order {
    let category = if rng.random_bool(0.6) {
        p.favourite
    } else {
        CATEGORIES.choose(rng).copied().unwrap_or("skincare")
    };
    let at = moment(rng, start, days);
    Order {
        at,
        fen: rng.random_range(2_900..160_000),
        category,
        line: LINES.choose(rng).copied().unwrap_or("雪肌"),
        sku: rng.random_range(1000..1100),
        refunded: rng
            .random_bool(0.07)
            .then(|| at + rng.random_range(DAY_MS..10 * DAY_MS)),
    }
}

/// Orders of one person on one channel this year.
fn orders_of(rng: &mut StdRng, p: &Person, share: f64, start: i64, days: i64) -> Vec<Order> {
    let mean = p.appetite * share;
    let n = (mean + rng.random_range(-1.0..1.0) * mean.sqrt())
        .round()
        .max(0.0) as usize;
    (0..n).map(|_| order(rng, p, start, days)).collect()
}

struct Files {
    dir: PathBuf,
    written: Vec<(String, usize, &'static str)>,
}

impl Files {
    fn write(&mut self, name: &str, text: &str, gbk: bool) -> std::io::Result<()> {
        let bytes = if gbk {
            encoding_rs::GBK.encode(text).0.into_owned()
        } else {
            text.as_bytes().to_vec()
        };
        std::fs::write(self.dir.join(name), &bytes)?;
        let rows = text.lines().count();
        self.written
            .push((name.to_string(), rows, if gbk { "GBK" } else { "UTF-8" }));
        Ok(())
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("tagstore-demo: {e}");
        std::process::exit(1);
    }
}

fn end_day(cli: &Cli) -> Result<i64, String> {
    let date: jiff::civil::Date = match &cli.end {
        Some(s) => s
            .parse()
            .map_err(|e| format!("--end {s:?} is not a date YYYY-MM-DD: {e}"))?,
        None => local(jiff::Timestamp::now().as_millisecond()).date(),
    };
    let midnight = jiff::tz::TimeZone::UTC
        .to_timestamp(date.at(0, 0, 0, 0))
        .map_err(|e| e.to_string())?
        .as_millisecond();
    Ok(midnight - SHANGHAI_MS)
}

fn run(cli: &Cli) -> Result<(), String> {
    let days = 365;
    let start = end_day(cli)? - (days - 1) * DAY_MS;
    let mut rng = StdRng::seed_from_u64(cli.seed);
    let people: Vec<Person> = (0..cli.customers).map(|i| person(&mut rng, i)).collect();
    std::fs::create_dir_all(&cli.out).map_err(|e| format!("{}: {e}", cli.out.display()))?;
    let mut files = Files {
        dir: cli.out.clone(),
        written: Vec::new(),
    };
    let io = |e: std::io::Error| e.to_string();

    // Taobao (GBK): refunds as a second row of the same order.
    let mut tb = String::from(
        "订单编号,买家昵称,实付金额,下单时间,收货人手机,订单状态,商品编码,商品类目,品牌,宝贝标题\n",
    );
    let mut n = 0;
    for p in &people {
        let Some(nick) = &p.taobao else { continue };
        for o in orders_of(&mut rng, p, 0.45, start, days) {
            n += 1;
            let phone = p
                .phone
                .as_deref()
                .map(|ph| phone_form(&mut rng, ph))
                .unwrap_or_default();
            let status = if rng.random_bool(0.03) {
                "交易关闭"
            } else {
                "交易成功"
            };
            let amount = if rng.random_bool(0.5) {
                yuan_with_sign(o.fen)
            } else {
                yuan(o.fen)
            };
            let title = format!(
                "{}{} {}ml, \"限定\"",
                o.line,
                o.category,
                30 + o.sku % 5 * 10
            );
            let base = |time: i64, status: &str, amount: String| {
                row(&[
                    format!("TB{n:08}"),
                    nick.clone(),
                    amount,
                    fmt_local(time, '-'),
                    phone.clone(),
                    status.into(),
                    format!("SKU-{}", o.sku),
                    o.category.into(),
                    o.line.into(),
                    title.clone(),
                ])
            };
            tb.push_str(&base(o.at, status, amount.clone()));
            if let Some(r) = o.refunded.filter(|_| status == "交易成功") {
                tb.push_str(&base(r, "退款成功", amount));
            }
        }
    }
    tb.push_str("TB-BAD-1,小美0号,免费,2026-11-11 10:00:00,,交易成功,SKU-1000,skincare,雪肌,x\n");
    tb.push_str("TB-BAD-2,小美0号,99.00\n");
    tb.push_str(
        "TB-BAD-3,,99.00,2026-11-11 10:00:00,138****0000,交易成功,SKU-1000,skincare,雪肌,x\n",
    );
    files.write("taobao_orders.csv", &tb, true).map_err(io)?;

    // JD (UTF-8): slashes in dates.
    let mut jd = String::from(
        "订单号,用户账号,下单时间,应付金额,收货人手机,订单状态,商品编号,商品名称,商品类目,品牌\n",
    );
    for p in &people {
        let Some(pin) = &p.jd else { continue };
        for o in orders_of(&mut rng, p, 0.35, start, days) {
            n += 1;
            let phone = p.phone.clone().unwrap_or_default();
            let status = if rng.random_bool(0.04) {
                "已取消"
            } else {
                "完成"
            };
            let name = format!("{}{}", o.line, o.category);
            let mk = |time: i64, status: &str| {
                row(&[
                    format!("JD{n:09}"),
                    pin.clone(),
                    fmt_local(time, '/'),
                    yuan(o.fen),
                    phone.clone(),
                    status.into(),
                    o.sku.to_string(),
                    name.clone(),
                    o.category.into(),
                    o.line.into(),
                ])
            };
            jd.push_str(&mk(o.at, status));
            if let Some(r) = o.refunded.filter(|_| status == "完成") {
                jd.push_str(&mk(r, "退款完成"));
            }
        }
    }
    jd.push_str("JD-BAD-1,jd_000001,昨天,12.00,,完成,1000,x,skincare,雪肌\n");
    files.write("jd_orders.csv", &jd, false).map_err(io)?;

    // Pinduoduo (UTF-8).
    let mut pdd = String::from(
        "订单号,商品,商品id,订单状态,用户实付金额(元),支付时间,用户ID,手机,商品类目,品牌\n",
    );
    for p in &people {
        let Some(uid) = &p.pdd else { continue };
        for o in orders_of(&mut rng, p, 0.2, start, days) {
            n += 1;
            let status = if rng.random_bool(0.05) {
                "未成团"
            } else {
                "已签收"
            };
            let mk = |time: i64, status: &str| {
                row(&[
                    format!("PDD{n:09}"),
                    format!("{}{}", o.line, o.category),
                    o.sku.to_string(),
                    status.into(),
                    yuan(o.fen / 2),
                    fmt_local(time, '-'),
                    uid.clone(),
                    p.phone.clone().unwrap_or_default(),
                    o.category.into(),
                    o.line.into(),
                ])
            };
            pdd.push_str(&mk(o.at, status));
            if let Some(r) = o.refunded.filter(|_| status == "已签收") {
                pdd.push_str(&mk(r, "售后完成"));
            }
        }
    }
    files.write("pdd_orders.csv", &pdd, false).map_err(io)?;

    // WeChat (JSON Lines, Unix seconds).
    let mut wx = String::new();
    for p in &people {
        let Some(openid) = &p.openid else { continue };
        let k = rng.random_range(0..(p.appetite * 3.0) as u32 + 2);
        for _ in 0..k {
            n += 1;
            let event = [
                "view",
                "view",
                "like",
                "share",
                "comment",
                "subscribe",
                "add_to_cart",
            ]
            .choose(&mut rng)
            .copied()
            .unwrap_or("view");
            let union = p
                .unionid
                .as_ref()
                .map_or(String::new(), |u| format!(",\"unionid\":\"{u}\""));
            // Members who bound their card in WeChat.
            let card = match (&p.card, p.unionid.is_some() && p.binds_card) {
                (Some(c), true) => format!(",\"member_card\":\"{c}\""),
                _ => String::new(),
            };
            let _ = writeln!(
                wx,
                "{{\"openid\":\"{openid}\"{union}{card},\"event\":\"{event}\",\"create_time\":{},\"msg_id\":\"wx{n}\",\"item_id\":\"a{}\",\"category\":\"{}\"}}",
                moment(&mut rng, start, days) / 1000,
                rng.random_range(1..300),
                p.favourite
            );
        }
    }
    wx.push_str("{\"openid\":\"oXbad\",\"event\":\"like\",\"create_time\":\"soon\"}\n");
    files
        .write("wechat_interactions.jsonl", &wx, false)
        .map_err(io)?;

    // Douyin (JSON Lines, Chinese actions, ms).
    let mut dy = String::new();
    for p in &people {
        let Some(uid) = &p.douyin else { continue };
        let k = rng.random_range(0..(p.appetite * 4.0) as u32 + 2);
        for _ in 0..k {
            n += 1;
            let action = ["观看", "观看", "点赞", "评论", "分享", "关注", "加购"]
                .choose(&mut rng)
                .copied()
                .unwrap_or("观看");
            let _ = writeln!(
                dy,
                "{{\"event_id\":\"dy{n}\",\"user\":{{\"uid\":\"{uid}\"}},\"action\":\"{action}\",\"create_time\":{},\"item_id\":\"v{}\",\"category\":\"{}\"}}",
                moment(&mut rng, start, days),
                rng.random_range(1..500),
                CATEGORIES.choose(&mut rng).copied().unwrap_or("makeup")
            );
        }
    }
    dy.push_str("not json at all\n");
    files
        .write("douyin_interactions.jsonl", &dy, false)
        .map_err(io)?;

    // Weibo (GBK CSV).
    let mut wb = String::from("用户ID,互动类型,互动时间,互动ID,微博ID,话题类目\n");
    for p in &people {
        let Some(uid) = &p.weibo else { continue };
        for _ in 0..rng.random_range(1..6) {
            n += 1;
            let kind = ["转发", "评论", "点赞", "关注"]
                .choose(&mut rng)
                .copied()
                .unwrap_or("点赞");
            wb.push_str(&row(&[
                uid.clone(),
                kind.into(),
                fmt_local(moment(&mut rng, start, days), '-'),
                format!("wb{n}"),
                format!("w{}", rng.random_range(1..100)),
                p.favourite.into(),
            ]));
        }
    }
    files
        .write("weibo_interactions.csv", &wb, true)
        .map_err(io)?;

    // Stores (GBK receipts, UTF-8 visits): the phone a person gave online,
    // or the member card (cards tie WeChat and the till together).
    let mut pos =
        String::from("小票号,会员卡号,手机号,门店,交易时间,交易类型,金额,商品编码,商品类目,品牌\n");
    let mut visits = String::from("记录ID,会员卡号,手机号,门店,到店时间\n");
    for p in &people {
        if p.card.is_none() && !rng.random_bool(0.1) {
            continue;
        }
        let card = p.card.clone().unwrap_or_default();
        let phone = p.phone.clone().unwrap_or_default();
        if card.is_empty() && phone.is_empty() {
            continue;
        }
        let store = STORES.choose(&mut rng).copied().unwrap_or("杭州湖滨店");
        for o in orders_of(&mut rng, p, 0.3, start, days) {
            n += 1;
            let mk = |time: i64, kind: &str, fen: i64| {
                row(&[
                    format!("R{n:09}"),
                    card.clone(),
                    phone.clone(),
                    store.into(),
                    fmt_local(time, '-'),
                    kind.into(),
                    if fen < 0 {
                        format!("-{}", yuan(-fen))
                    } else {
                        yuan(fen)
                    },
                    format!("X{}", o.sku),
                    o.category.into(),
                    o.line.into(),
                ])
            };
            pos.push_str(&mk(o.at, "销售", o.fen));
            if let Some(r) = o.refunded {
                pos.push_str(&mk(r, "退货", -o.fen));
            }
            visits.push_str(&row(&[
                format!("V{n:09}"),
                card.clone(),
                phone.clone(),
                store.into(),
                fmt_local(o.at - rng.random_range(0..3_600_000), '-'),
            ]));
        }
    }
    pos.push_str(
        "R-BAD-1,VIP-000001,,杭州湖滨店,2026-11-11 10:00:00,销售,12.345,X1,skincare,雪肌\n",
    );
    files.write("pos_orders.csv", &pos, true).map_err(io)?;
    files
        .write("store_visits.csv", &visits, false)
        .map_err(io)?;

    println!(
        "{} people; files in {} (a year ending {}):",
        cli.customers,
        cli.out.display(),
        fmt_local(start + (days - 1) * DAY_MS, '-')
            .split(' ')
            .next()
            .unwrap_or("")
    );
    for (name, rows, enc) in &files.written {
        println!("  {name:<28} {rows:>9} lines  {enc}");
    }
    println!("\nload them (each file's source is the preset of the same name):");
    for (name, _, _) in &files.written {
        let stem = Path::new(name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(name);
        println!(
            "  tagstore-shell -c \"create source {stem} preset {stem}\" && tagstore-shell -c \"ingest {stem} {}\"",
            cli.out.join(name).display()
        );
    }
    Ok(())
}
