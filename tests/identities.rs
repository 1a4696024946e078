//! Identities at the engine's level (OneID, part 1): every identity an
//! ingested record names finds its customer, in writes and reads, across
//! checkpoints (identity sections, merged as they grow), a crash and a
//! restart; erasing a customer by any identity erases every identity of it.

use std::sync::Arc;

use tagstore::clock::ManualClock;
use tagstore::fields::{FieldKind, MergeRule};
use tagstore::storage::fs::{MemFs, Op};
use tagstore::storage::{
    CheckpointOptions, Combine, Engine, EngineConfig, IngestRecord, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
// 2026-11-12T00:00:00Z
const T0: i64 = 1_794_441_600_000;

fn open(fs: &MemFs, clock: &Arc<ManualClock>) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    Engine::open(cfg).unwrap()
}

fn setup(engine: &Engine) {
    engine
        .write_blocking(WriteOp::CreateField {
            name: "order_count".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Int,
            merge: MergeRule::Sum,
            if_not_exists: false,
        })
        .unwrap();
}

/// An order from `place` at `at_ms` by whoever `identities` name.
fn order(identities: &[&str], place: &str, at_ms: i64) -> IngestRecord {
    IngestRecord {
        refund: None,
        unless_refunded: Vec::new(),
        order: None,
        seen: None,
        identities: identities.iter().map(|s| s.to_string()).collect(),
        place: place.into(),
        at_ms,
        writes: vec![ValueWrite::Combine {
            field: "order_count".into(),
            // Aimed by the writer at the record's customer.
            customer: "ignored".into(),
            with: Combine::Add(1),
        }],
        event: None,
    }
}

fn ingest(engine: &Engine, records: Vec<IngestRecord>) -> tagstore::storage::WriteResult {
    engine
        .write_blocking(WriteOp::Ingest {
            records: records.into(),
        })
        .unwrap()
}

fn customer(engine: &Engine, key: &str) -> Option<u32> {
    engine.snapshot().customer_id(key).unwrap()
}

fn orders(engine: &Engine, key: &str) -> Option<i64> {
    let snap = engine.snapshot();
    let id = snap.customer_id(key).unwrap()?;
    snap.field("order_count").unwrap().int_value(id).unwrap()
}

/// The identities of the customer `key` names, without where and when.
fn identities(engine: &Engine, key: &str) -> Vec<String> {
    let snap = engine.snapshot();
    let id = snap.customer_id(key).unwrap().unwrap();
    snap.idents
        .of(id)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

#[test]
fn identities_on_one_record_find_one_customer_everywhere() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    let r = ingest(
        &engine,
        vec![
            order(&["phone:13800000001", "jd_pin:ann"], "jd", T0 - 1000),
            // The unionid arrives with the JD pin: the same person.
            order(&["wechat_unionid:u1", "jd_pin:ann"], "wechat", T0 - 500),
            order(&["phone:13800000002"], "store", T0),
        ],
    );
    assert_eq!(r.new_customers, 2);
    // Every identity, the ones customers were created with too.
    assert_eq!(r.identities_linked, 4);
    assert!(r.merges.is_empty());
    let ann = customer(&engine, "phone:13800000001").unwrap();
    assert_eq!(customer(&engine, "jd_pin:ann"), Some(ann));
    assert_eq!(customer(&engine, "wechat_unionid:u1"), Some(ann));
    assert_eq!(orders(&engine, "wechat_unionid:u1"), Some(2));
    // Where and when each was first seen.
    let snap = engine.snapshot();
    let of = snap.idents.of(ann).unwrap();
    assert_eq!(of.len(), 3);
    assert_eq!(of[0].0, "jd_pin:ann");
    assert_eq!(
        (of[0].1.first_ms, of[0].1.place.as_str()),
        (T0 - 1000, "jd")
    );
    assert_eq!(of[1].0, "phone:13800000001");
    assert_eq!(of[2].0, "wechat_unionid:u1");
    assert_eq!(of[2].1.place, "wechat");

    // Any identity is a key everywhere one is accepted.
    engine
        .write_blocking(WriteOp::SetValues {
            writes: vec![ValueWrite::Combine {
                field: "order_count".into(),
                customer: "wechat_unionid:u1".into(),
                with: Combine::Add(10),
            }],
        })
        .unwrap();
    assert_eq!(orders(&engine, "phone:13800000001"), Some(12));
    // Tags too, through the look-ups made before the writer.
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![tagstore::storage::Mutation {
                tag: "wechat_fans".into(),
                add: vec!["wechat_unionid:u1".into()],
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .unwrap();
    let snap = engine.snapshot();
    let fans = snap.tag("wechat_fans").unwrap().bitmap.get().unwrap();
    assert_eq!(
        (fans.len(), fans.contains(ann)),
        (1, true),
        "no customer was made for the identity"
    );
    drop(snap);
    let snap = engine.snapshot();
    assert_eq!(
        snap.customer_ids(&["jd_pin:ann", "phone:13800000002", "nobody"])
            .unwrap(),
        vec![Some(ann), customer(&engine, "phone:13800000002"), None]
    );

    // Through a checkpoint (an identity section), more links after it, a
    // crash, and a second checkpoint.
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(customer(&engine, "jd_pin:ann"), Some(ann));
    ingest(
        &engine,
        vec![order(
            &["douyin_uid:d1", "wechat_unionid:u1"],
            "douyin",
            T0 + 1,
        )],
    );
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(customer(&engine, "douyin_uid:d1"), Some(ann));
    assert_eq!(customer(&engine, "jd_pin:ann"), Some(ann));
    assert_eq!(orders(&engine, "jd_pin:ann"), Some(13));
    assert_eq!(
        identities(&engine, "douyin_uid:d1"),
        [
            "douyin_uid:d1",
            "jd_pin:ann",
            "phone:13800000001",
            "wechat_unionid:u1"
        ]
    );
    engine.checkpoint_blocking(Default::default()).unwrap();
    // Many at once (the sections' look-ups overlapped) agree with one by one.
    let keys = [
        "douyin_uid:d1",
        "nobody:x",
        "phone:13800000002",
        "jd_pin:ann",
        "phone:13800000001",
        "wechat_unionid:u1",
        "jd_pin:ann",
    ];
    let snap = engine.snapshot();
    let one_by_one: Vec<Option<u32>> = keys.iter().map(|k| snap.customer_id(k).unwrap()).collect();
    assert_eq!(snap.customer_ids(&keys).unwrap(), one_by_one);
    assert_eq!(one_by_one.iter().flatten().count(), 6);
    drop(snap);
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(customer(&engine, "douyin_uid:d1"), Some(ann));
    let snap = engine.snapshot();
    let of = snap.idents.of(ann).unwrap();
    assert_eq!(of.len(), 4);
    assert_eq!(
        (of[1].1.first_ms, of[1].1.place.as_str()),
        (T0 - 1000, "jd")
    );
}

#[test]
fn a_record_naming_two_customers_merges_them() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(
        &engine,
        vec![
            order(&["phone:13800000001"], "jd", T0),
            order(&["taobao_nick:bo"], "taobao", T0),
        ],
    );
    let a = customer(&engine, "phone:13800000001").unwrap();
    let b = customer(&engine, "taobao_nick:bo").unwrap();
    assert!(a < b);
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![tagstore::storage::Mutation {
                tag: "vip".into(),
                add: vec!["taobao_nick:bo".into()],
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .unwrap();
    let r = ingest(
        &engine,
        vec![order(
            &["member_card:m1", "taobao_nick:bo", "phone:13800000001"],
            "store",
            T0,
        )],
    );
    assert_eq!(r.merges.len(), 1);
    let m = &r.merges[0];
    assert_eq!((m.id, m.survivor, m.absorbed), (1, a, b));
    assert_eq!(m.via, "phone:13800000001");
    assert_eq!(m.moved, ["taobao_nick:bo"]);
    // One customer, the one known longest, with everything of both: the
    // order counts summed (1 + 1) and the record's own order on top.
    for key in ["member_card:m1", "taobao_nick:bo", "phone:13800000001"] {
        assert_eq!(customer(&engine, key), Some(a), "{key}");
    }
    assert_eq!(orders(&engine, "taobao_nick:bo"), Some(3));
    let snap = engine.snapshot();
    assert_eq!(snap.customer_count().unwrap(), 1);
    assert!(snap.tag("vip").unwrap().bitmap.get().unwrap().contains(a));
    assert!(!snap.live().unwrap().contains(b));
    assert_eq!(
        identities(&engine, "phone:13800000001"),
        ["member_card:m1", "phone:13800000001", "taobao_nick:bo"]
    );
    assert_eq!(snap.merges.read().len(), 1);
    drop(snap);

    // The merge log and everything else across a crash, a checkpoint and a
    // restart.
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(customer(&engine, "taobao_nick:bo"), Some(a));
    assert_eq!(orders(&engine, "member_card:m1"), Some(3));
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&crashed, &clock);
    let snap = engine.snapshot();
    let log = snap.merges.read();
    assert_eq!(log.entries()[0].survivor, a);
    assert_eq!(log.entries()[0].absorbed, b);
    assert_eq!(log.entries()[0].via, "phone:13800000001");
    drop(log);
    assert_eq!(customer(&engine, "taobao_nick:bo"), Some(a));
    assert_eq!(orders(&engine, "taobao_nick:bo"), Some(3));
    assert_eq!(snap.customer_count().unwrap(), 1);
}

#[test]
fn merge_chains_end_in_one_customer() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(
        &engine,
        vec![
            order(&["phone:1"], "jd", T0),
            order(&["phone:2"], "jd", T0),
            order(&["phone:3"], "jd", T0),
            order(&["phone:4"], "jd", T0),
        ],
    );
    let first = customer(&engine, "phone:1").unwrap();
    // A–B, then B–C (in one request, after a restart), then C–A.
    ingest(&engine, vec![order(&["phone:1", "phone:2"], "jd", T0)]);
    drop(engine);
    let engine = open(&fs, &clock);
    ingest(
        &engine,
        vec![
            order(&["phone:2", "phone:3"], "jd", T0),
            order(&["phone:3", "phone:1"], "jd", T0),
        ],
    );
    for key in ["phone:1", "phone:2", "phone:3"] {
        assert_eq!(customer(&engine, key), Some(first), "{key}");
    }
    // 3 orders of their own, 3 records naming them together.
    assert_eq!(orders(&engine, "phone:3"), Some(6));
    assert_eq!(orders(&engine, "phone:4"), Some(1));
    assert_eq!(engine.snapshot().customer_count().unwrap(), 2);
    assert_eq!(engine.snapshot().merges.read().len(), 2);
    // Erasing the survivor by an identity that came with a merge erases
    // them all, and the merge log forgets the identities.
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["phone:3".into()],
        })
        .unwrap();
    for key in ["phone:1", "phone:2", "phone:3"] {
        assert_eq!(customer(&engine, key), None, "{key}");
    }
    let snap = engine.snapshot();
    assert!(
        snap.merges
            .read()
            .entries()
            .iter()
            .all(|e| e.via.is_empty() && e.moved.is_empty())
    );
    drop(snap);
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&fs, &clock);
    let snap = engine.snapshot();
    assert!(
        snap.merges
            .read()
            .entries()
            .iter()
            .all(|e| e.via.is_empty() && e.moved.is_empty())
    );
    assert_eq!(snap.customer_count().unwrap(), 1);
}

#[test]
fn erasing_by_any_identity_erases_every_identity() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(
        &engine,
        vec![order(
            &["phone:13800000001", "jd_pin:ann", "wechat_openid:o1"],
            "jd",
            T0,
        )],
    );
    engine.checkpoint_blocking(Default::default()).unwrap();
    ingest(
        &engine,
        vec![order(&["weibo_uid:w1", "jd_pin:ann"], "weibo", T0)],
    );
    let ann = customer(&engine, "weibo_uid:w1").unwrap();
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["wechat_openid:o1".into()],
        })
        .unwrap();
    for key in [
        "phone:13800000001",
        "jd_pin:ann",
        "wechat_openid:o1",
        "weibo_uid:w1",
    ] {
        assert_eq!(customer(&engine, key), None, "{key}");
    }
    // A merge of every section drops them from disk; a record naming one
    // of them again makes a new customer.
    engine
        .checkpoint_blocking(CheckpointOptions {
            merge_dictionary: true,
        })
        .unwrap();
    let snap = engine.snapshot();
    assert!(snap.idents.of(ann).unwrap().is_empty());
    assert_eq!(snap.idents.recent_len(), 0);
    assert!(
        snap.idents.layers().is_empty(),
        "no entry of the erased customer is left"
    );
    drop(snap);
    ingest(&engine, vec![order(&["jd_pin:ann"], "jd", T0 + 1)]);
    let again = customer(&engine, "jd_pin:ann").unwrap();
    assert_ne!(again, ann);
    assert_eq!(orders(&engine, "jd_pin:ann"), Some(1));
    drop(engine);
    let engine = open(&fs, &clock);
    assert_eq!(customer(&engine, "jd_pin:ann"), Some(again));
    assert_eq!(customer(&engine, "weibo_uid:w1"), None);
}

#[test]
fn guard_rails_keep_strangers_apart_and_say_why() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    cfg.oneid.never_merge = ["device".to_string()].into_iter().collect();
    cfg.oneid.blocked = ["phone:13800000000".to_string()].into_iter().collect();
    cfg.oneid.max_per_type = 2;
    cfg.oneid.priority = vec!["member_card".into(), "phone".into()];
    let engine = Engine::open(cfg).unwrap();
    setup(&engine);
    let reasons = |r: &tagstore::storage::WriteResult| -> Vec<(u32, String, String)> {
        r.refusals
            .iter()
            .map(|x| (x.record, x.identity.clone(), x.reason.clone()))
            .collect()
    };

    // A default phone typed in at the till joins no one.
    let r = ingest(
        &engine,
        vec![
            order(&["phone:13800000000", "jd_pin:a"], "jd", T0),
            order(&["phone:13800000000", "jd_pin:b"], "jd", T0),
        ],
    );
    assert!(r.merges.is_empty());
    let got = reasons(&r);
    assert_eq!(got.len(), 2);
    assert!(got[0].2.contains("block list"), "{got:?}");
    let (a, b) = (
        customer(&engine, "jd_pin:a").unwrap(),
        customer(&engine, "jd_pin:b").unwrap(),
    );
    assert_ne!(a, b);
    assert_eq!(customer(&engine, "phone:13800000000"), None);
    // Every identity blocked: the record is refused, saying so.
    let err = engine
        .write_blocking(WriteOp::Ingest {
            records: vec![order(&["phone:13800000000"], "store", T0)].into(),
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("block list"), "{err}");

    // A shared tablet: linked to its first user, never merging the next one
    // into them, and a new person on it is a new customer.
    ingest(
        &engine,
        vec![order(&["device:t1", "jd_pin:a"], "store", T0)],
    );
    assert_eq!(customer(&engine, "device:t1"), Some(a));
    let r = ingest(
        &engine,
        vec![
            order(&["device:t1", "jd_pin:b"], "store", T0),
            order(&["jd_pin:c", "device:t1"], "store", T0),
        ],
    );
    assert!(r.merges.is_empty());
    let got = reasons(&r);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|g| g.1 == "device:t1" && g.2.contains("never merges"))
    );
    assert_eq!(orders(&engine, "jd_pin:b"), Some(2));
    let c = customer(&engine, "jd_pin:c").unwrap();
    assert!(c != a && c != b);
    assert_eq!(orders(&engine, "jd_pin:a"), Some(2));
    // The refused merge is in the merge log, with the reason.
    let snap = engine.snapshot();
    let log = snap.merges.read();
    assert_eq!(log.len(), 1);
    let e = &log.entries()[0];
    assert_eq!((e.survivor, e.absorbed), (b, a));
    assert!(e.refused.contains("never merges"), "{e:?}");
    drop(log);
    drop(snap);

    // At most two phones a customer: the third is not linked; a merge that
    // would give one customer four is not made.
    let r = ingest(
        &engine,
        vec![
            order(&["jd_pin:a", "phone:13900000001"], "jd", T0),
            order(&["jd_pin:a", "phone:13900000002"], "jd", T0),
            order(&["jd_pin:a", "phone:13900000003"], "jd", T0),
        ],
    );
    let got = reasons(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, 2);
    assert!(got[0].2.contains("max_per_type is 2"), "{got:?}");
    assert_eq!(customer(&engine, "phone:13900000003"), None);
    ingest(
        &engine,
        vec![order(&["phone:13900000004", "phone:13900000005"], "jd", T0)],
    );
    let d = customer(&engine, "phone:13900000004").unwrap();
    let r = ingest(
        &engine,
        vec![order(&["phone:13900000001", "phone:13900000004"], "jd", T0)],
    );
    assert!(r.merges.is_empty());
    assert!(reasons(&r)[0].2.contains("4 identities of type \"phone\""));
    assert_eq!(customer(&engine, "phone:13900000004"), Some(d));
    assert_eq!(engine.snapshot().merges.read().len(), 2);

    // Priority names a new customer: the member card over the phone.
    ingest(
        &engine,
        vec![order(&["phone:13912345678", "member_card:m9"], "store", T0)],
    );
    let snap = engine.snapshot();
    let m9 = snap.customer_id("phone:13912345678").unwrap().unwrap();
    assert_eq!(
        snap.dict.key_of(m9).unwrap().as_deref(),
        Some("member_card:m9")
    );
}

#[test]
fn one_request_merges_a_bounded_number_of_customers() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    // No cap per type: one person with 10,002 phones, for the test's sake.
    cfg.oneid.max_per_type = 0;
    let engine = Engine::open(cfg).unwrap();
    setup(&engine);
    let cap = tagstore::storage::writer::identify::MAX_MERGES_PER_REQUEST;
    let phone = |i: usize| format!("phone:1380{i:07}");
    let singles: Vec<IngestRecord> = (0..=cap + 1)
        .map(|i| order(&[&phone(i)], "jd", T0))
        .collect();
    ingest(&engine, singles);
    // A chain through every one of them: cap + 1 merges in one request.
    let chain = |from: usize, to: usize| -> Vec<IngestRecord> {
        (from..to)
            .map(|i| order(&[&phone(i), &phone(i + 1)], "jd", T0))
            .collect()
    };
    let err = match engine.write_blocking(WriteOp::Ingest {
        records: chain(0, cap + 1).into(),
    }) {
        Ok(r) => panic!("{} merges in one request", r.merges.len()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&format!("would merge {}", cap + 1)), "{err}");
    assert_eq!(engine.snapshot().customer_count().unwrap(), cap as u64 + 2);
    // In two requests, all of them.
    let half = cap.div_ceil(2);
    assert_eq!(ingest(&engine, chain(0, half)).merges.len(), half);
    assert_eq!(
        ingest(&engine, chain(half, cap + 1)).merges.len(),
        cap + 1 - half
    );
    assert_eq!(engine.snapshot().customer_count().unwrap(), 1);
    // Every order counted once, plus one per linking record.
    assert_eq!(orders(&engine, &phone(cap)), Some(2 * (cap as i64 + 2) - 1));
}

#[test]
fn an_identity_moved_by_a_merge_is_found_in_the_newer_section() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    // A large first section (so that the next checkpoint's few entries
    // stay a section of their own), then a merge that moves identities.
    let people: Vec<IngestRecord> = (0..100)
        .map(|i| {
            order(
                &[&format!("phone:1390000{i:04}"), &format!("jd_pin:p{i}")],
                "jd",
                T0,
            )
        })
        .collect();
    ingest(&engine, people);
    engine.checkpoint_blocking(Default::default()).unwrap();
    let r = ingest(
        &engine,
        vec![order(&["jd_pin:p98", "phone:13900000099"], "jd", T0)],
    );
    assert_eq!(r.merges.len(), 1);
    engine.checkpoint_blocking(Default::default()).unwrap();
    let snap = engine.snapshot();
    assert_eq!(snap.idents.layers().len(), 2, "two sections");
    let keys = ["jd_pin:p99", "phone:13900000099", "jd_pin:p98", "jd_pin:p5"];
    let one_by_one: Vec<Option<u32>> = keys.iter().map(|k| snap.customer_id(k).unwrap()).collect();
    let survivor = snap.customer_id("phone:13900000098").unwrap();
    assert_eq!(&one_by_one[..3], &[survivor, survivor, survivor]);
    assert_eq!(snap.customer_ids(&keys).unwrap(), one_by_one);
}

#[test]
fn a_full_disk_refuses_a_merge_whole_and_it_applies_once_there_is_room() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(
        &engine,
        vec![
            order(&["phone:13800000001"], "jd", T0),
            order(&["taobao_nick:bo"], "taobao", T0),
        ],
    );
    // The merge, with 40,000 new customers in the same request: more log
    // than the 4 MiB allocated ahead, and no room for more.
    let merge = || {
        let mut records = vec![order(
            &["taobao_nick:bo", "phone:13800000001", "member_card:m1"],
            "store",
            T0,
        )];
        records.extend((0..40_000).map(|i| {
            order(
                &[
                    &format!("jd_pin:{i:060}"),
                    &format!("wechat_openid:{i:060}"),
                ],
                "jd",
                T0,
            )
        }));
        records
    };
    fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC);
    let err = engine
        .write_blocking(WriteOp::Ingest {
            records: merge().into(),
        })
        .unwrap_err();
    assert!(matches!(err, tagstore::Error::DiskFull(_)), "{err}");
    // Nothing of it: two customers, no merge, no new identity, facts as before.
    let snap = engine.snapshot();
    assert_eq!(snap.customer_count().unwrap(), 2);
    assert!(snap.merges.read().is_empty());
    assert_eq!(
        snap.customer_id(&format!("jd_pin:{:060}", 0)).unwrap(),
        None,
        "none of the request's new customers"
    );
    assert_eq!(snap.customer_id("member_card:m1").unwrap(), None);
    drop(snap);
    assert_eq!(orders(&engine, "taobao_nick:bo"), Some(1));
    assert_eq!(
        engine.failure(),
        None,
        "a full disk does not stop the store"
    );
    fs.clear_faults();
    assert_eq!(ingest(&engine, merge()).merges.len(), 1);
    assert_eq!(orders(&engine, "member_card:m1"), Some(3));
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(engine.snapshot().customer_count().unwrap(), 40_001);
    assert_eq!(orders(&engine, "phone:13800000001"), Some(3));
    assert_eq!(engine.snapshot().merges.read().len(), 1);
}

/// A large `Update` looks its keys up before it reaches the writer; a merge
/// (or an unmerge) logged in between moves a key to another customer, so
/// the writer must look it up again instead of trusting the id it had: the
/// tag lands on the survivor, never on the customer the merge absorbed.
#[test]
fn keys_looked_up_before_a_merge_are_looked_up_again() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(&engine, vec![order(&["phone:13800000001"], "jd", T0)]);
    ingest(&engine, vec![order(&["jd_pin:bo"], "jd", T0)]);
    let bo = customer(&engine, "jd_pin:bo").unwrap();
    let looked_up_at = engine.snapshot().lsn;
    // Bo's pin shows up with the phone: Bo is absorbed.
    let r = ingest(
        &engine,
        vec![order(&["phone:13800000001", "jd_pin:bo"], "jd", T0)],
    );
    assert_eq!(r.merges.len(), 1);
    let survivor = customer(&engine, "jd_pin:bo").unwrap();
    assert_ne!(survivor, bo);
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![tagstore::storage::Mutation {
                tag: "vip".into(),
                add_resolved: vec![(bo, "jd_pin:bo".into())],
                resolved_at: Some(looked_up_at),
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .unwrap();
    let snap = engine.snapshot();
    let members = snap.tag("vip").unwrap().bitmap.get().unwrap().clone();
    let ids: Vec<u32> = members.iter().collect();
    assert_eq!(ids, [survivor], "the tag went to the absorbed customer");
}

/// A field merged by `latest` takes the value written last, whichever
/// customer survives: the store keeps when each value was written in a
/// companion field, made and dropped with it.
#[test]
fn latest_takes_the_value_written_last() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    for (name, kind) in [
        ("score", FieldKind::Int),
        (
            "stage",
            FieldKind::Enum {
                values: vec!["new".into(), "active".into(), "lapsed".into()],
            },
        ),
    ] {
        engine
            .write_blocking(WriteOp::CreateField {
                name: name.into(),
                description: String::new(),
                category: String::new(),
                kind,
                merge: MergeRule::Latest,
                if_not_exists: false,
            })
            .unwrap();
    }
    let snap = engine.snapshot();
    let at = snap.field("score_at_ms").expect("the companion field");
    assert_eq!(at.meta.merge, MergeRule::Max);
    drop(snap);
    let set = |key: &str, score: i64, stage: &str| {
        engine
            .write_blocking(WriteOp::SetValues {
                writes: vec![
                    ValueWrite::Int {
                        field: "score".into(),
                        customer: key.into(),
                        value: Some(score),
                    },
                    ValueWrite::Enum {
                        field: "stage".into(),
                        customer: key.into(),
                        value: Some(stage.into()),
                    },
                ],
            })
            .unwrap();
    };
    // Two pairs: in the first the absorbed customer wrote last, in the
    // second the survivor did ("active" is declared after "new", so `last`
    // would not tell these apart from `latest`: "lapsed" is after both).
    ingest(&engine, vec![order(&["phone:13800000001"], "jd", T0)]);
    ingest(&engine, vec![order(&["jd_pin:b"], "jd", T0)]);
    ingest(&engine, vec![order(&["phone:13800000002"], "jd", T0)]);
    ingest(&engine, vec![order(&["jd_pin:d"], "jd", T0)]);
    set("phone:13800000001", 1, "lapsed");
    set("jd_pin:d", 4, "lapsed");
    clock.advance_ms(1_000);
    set("jd_pin:b", 2, "new");
    set("phone:13800000002", 3, "active");
    let r = ingest(
        &engine,
        vec![
            order(&["phone:13800000001", "jd_pin:b"], "jd", T0),
            order(&["phone:13800000002", "jd_pin:d"], "jd", T0),
        ],
    );
    assert_eq!(r.merges.len(), 2);
    let snap = engine.snapshot();
    let value = |key: &str| {
        let id = snap.customer_id(key).unwrap().unwrap();
        let score = snap.field("score").unwrap().int_value(id).unwrap();
        let stage = snap.field("stage").unwrap().enum_value(id).unwrap();
        let at = snap.field("score_at_ms").unwrap().int_value(id).unwrap();
        (score, stage, at)
    };
    // b (absorbed) wrote last: its values; the time is the later one.
    assert_eq!(value("jd_pin:b"), (Some(2), Some(0), Some(T0 + 1_000)));
    // The survivor (phone 2) wrote last: its values.
    assert_eq!(value("jd_pin:d"), (Some(3), Some(1), Some(T0 + 1_000)));
    drop(snap);
    // The companion goes with its field, and not alone.
    let err = engine
        .write_blocking(WriteOp::DropField {
            name: "score_at_ms".into(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("drop \"score\""), "{err}");
    engine
        .write_blocking(WriteOp::DropField {
            name: "score".into(),
        })
        .unwrap();
    assert!(engine.snapshot().field("score_at_ms").is_none());
    // Across a restart the rule is `latest` still.
    drop(engine);
    let engine = open(&fs.crash_image(), &clock);
    assert_eq!(
        engine.snapshot().field("stage").unwrap().meta.merge,
        MergeRule::Latest
    );
}

/// Order `n` of `who` (source `tb`), naming its refund.
fn placed(who: &str, n: &str) -> IngestRecord {
    IngestRecord {
        seen: Some(tagstore::storage::seen::seen_id("tb", "order", n)),
        refund: Some(tagstore::storage::seen::seen_id("tb", "refund", n)),
        ..order(&[who], "taobao", T0)
    }
}

/// The refund of order `n` of `who`, naming the order.
fn refunded(who: &str, n: &str) -> IngestRecord {
    IngestRecord {
        seen: Some(tagstore::storage::seen::seen_id("tb", "refund", n)),
        order: Some(tagstore::storage::seen::seen_id("tb", "order", n)),
        writes: Vec::new(),
        ..order(&[who], "taobao", T0)
    }
}

/// The customers due a rebuild of facts.
fn due(engine: &Engine) -> Vec<u32> {
    engine.snapshot().rebuild_due.iter().collect()
}

/// A refund whose order an earlier request applied makes its customer due
/// a rebuild of facts; one in the same request as its order, or resent,
/// does not. The set follows a merge to the survivor, loses an erased
/// customer, and outlives a crash (the log) and a checkpoint (the
/// manifest); a rebuild of the customer clears it.
#[test]
fn a_refund_after_its_order_makes_its_customer_due_a_rebuild() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    // Order and refund in one request: nothing due.
    ingest(
        &engine,
        vec![
            placed("taobao_nick:a", "A1"),
            refunded("taobao_nick:a", "A1"),
        ],
    );
    // A refund before its order: nothing due either.
    ingest(&engine, vec![refunded("taobao_nick:b", "B1")]);
    ingest(&engine, vec![placed("taobao_nick:b", "B1")]);
    assert_eq!(due(&engine), Vec::<u32>::new());
    // An order, then its refund in a later request: due.
    ingest(&engine, vec![placed("taobao_nick:c", "C1")]);
    ingest(&engine, vec![refunded("taobao_nick:c", "C1")]);
    let c = customer(&engine, "taobao_nick:c").unwrap();
    assert_eq!(due(&engine), [c]);
    // Resent: a duplicate, nothing more.
    let r = ingest(&engine, vec![refunded("taobao_nick:c", "C1")]);
    assert_eq!(r.duplicates, [0]);
    assert_eq!(due(&engine), [c]);
    // Merged into an older customer: the survivor is due.
    let a = customer(&engine, "taobao_nick:a").unwrap();
    let r = ingest(
        &engine,
        vec![order(&["taobao_nick:a", "taobao_nick:c"], "taobao", T0)],
    );
    assert_eq!(r.merges.len(), 1);
    assert_eq!(due(&engine), [a]);
    // Across a crash, then a checkpoint and a restart.
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(due(&engine), [a]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(due(&engine), [a]);
    // A rebuild of the customer (here with nothing to write) clears it.
    let r = engine
        .write_blocking(WriteOp::RebuildFacts {
            as_of: engine.snapshot().archive.upto_lsn,
            customers: vec!["taobao_nick:a".into()],
            erase: Vec::new(),
            writes: Vec::new(),
        })
        .unwrap();
    assert!(r.busy.is_empty(), "{:?}", r.busy);
    assert_eq!(due(&engine), Vec::<u32>::new());
    // Due again, then erased: gone from the set.
    ingest(&engine, vec![placed("taobao_nick:d", "D1")]);
    ingest(&engine, vec![refunded("taobao_nick:d", "D1")]);
    assert_eq!(due(&engine).len(), 1);
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["taobao_nick:d".into()],
        })
        .unwrap();
    assert_eq!(due(&engine), Vec::<u32>::new());
}

/// A refund whose order is no longer remembered (older than `dedup_days`)
/// still makes its customer due a rebuild when the customer was there
/// before the request: the kept events may hold the order, and only a
/// rebuild takes back its behaviours and days. A refund that makes a new
/// customer (its order not seen yet) makes no one due.
#[test]
fn a_refund_of_an_order_older_than_the_dedup_window_makes_its_customer_due() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    ingest(&engine, vec![placed("taobao_nick:e", "E1")]);
    // 31 days on (dedup_days = 30), a checkpoint forgets the order.
    clock.advance_ms(31 * 86_400_000);
    engine.checkpoint_blocking(Default::default()).unwrap();
    let e = customer(&engine, "taobao_nick:e").unwrap();
    ingest(&engine, vec![refunded("taobao_nick:e", "E1")]);
    assert_eq!(due(&engine), [e]);
    // A refund that makes its customer: nothing of hers to take back.
    ingest(&engine, vec![refunded("taobao_nick:f", "F1")]);
    assert_eq!(due(&engine), [e]);
}
