//! Undoing merges (OneID, part 4) against the real server binary: a wrong
//! merge undone gives each customer back its identities (those the merge
//! moved and those its events linked since), its tags and values written
//! directly, and facts rebuilt from the events that are its; the two are
//! kept apart afterwards; chains are undone newest first; every refusal has
//! its status; all of it across kill -9, a checkpoint and a restart, and a
//! later RebuildFacts agrees with what the unmerge computed.

mod common;

use common::{Client, code, int_value, profile};
use tagstore::proto::*;
use tonic::Code;

// 2026-11-01T00:00:00+08:00
const START: i64 = 1_793_462_400_000;
const DAY_MS: i64 = 86_400_000;

/// One event as a JSON line; empty identities are left out.
fn line(id: &str, kind: &str, day: i64, fen: i64, ids: &[(&str, &str)]) -> String {
    let mut s = format!(
        "{{\"id\":\"{id}\",\"type\":\"{kind}\",\"ch\":\"jd\",\"ts\":{},\"fen\":{fen},\"cat\":\"skincare\"",
        START + day * DAY_MS
    );
    for (col, v) in ids {
        s.push_str(&format!(",\"{col}\":\"{v}\""));
    }
    s.push_str("}\n");
    s
}

async fn ingest(c: &mut Client, data: &str) -> IngestResponse {
    let answer = common::ingest_batch(c, "events", data).await;
    assert!(answer.rejected.is_empty(), "{:?}", answer.rejected);
    answer
}

async fn unmerge(c: &mut Client, merge_id: u64) -> Result<UnmergeResponse, tonic::Status> {
    c.unmerge(UnmergeRequest {
        merge_id,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn set_points(c: &mut Client, key: &str, v: i64) {
    c.set_values(SetValuesRequest {
        writes: vec![ValueWrite {
            field: "points".into(),
            customer: key.into(),
            value: Some(value_write::Value::IntValue(v)),
        }],
    })
    .await
    .unwrap();
}

async fn tag(c: &mut Client, tag: &str, key: &str) {
    c.update(UpdateRequest {
        mutations: vec![Mutation {
            tag: tag.into(),
            add: vec![key.into()],
            ..Default::default()
        }],
        create_missing_tags: true,
    })
    .await
    .unwrap();
}

const ANN_PIN: &str = "jd_pin:ann";
const BO_PIN: &str = "jd_pin:bo";
const BO_PHONE: &str = "phone:13900001111";

/// What Ann and Bo must have once the wrong merge is undone.
async fn check_apart(c: &mut Client) {
    let ann = profile(c, ANN_PIN).await;
    let bo = profile(c, BO_PIN).await;
    assert_ne!(ann.internal_id, bo.internal_id);
    let ids = |p: &ProfileResponse| {
        p.identities
            .iter()
            .map(|i| i.identity.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&ann),
        [ANN_PIN, "member_card:vip-0042", "phone:13812345678"]
    );
    assert_eq!(ids(&bo), [BO_PIN, "member_card:vip-0077", BO_PHONE]);
    assert_eq!(ann.key, ANN_PIN);
    assert_eq!(bo.key, BO_PIN);
    // Tags written directly: each its own again.
    assert_eq!(ann.tags, ["store_fan"]);
    assert_eq!(bo.tags, ["vip"]);
    // Ann: her JD order, R1 and R2 (which named both: it stays with her,
    // the survivor). Bo: his JD order, R3 and R4 (after the merge, naming
    // only his identities).
    for (who, orders, spend) in [
        (ANN_PIN, 3, 62_000 + 10_000 + 5_000),
        (BO_PIN, 3, 1_200 + 700 + 300),
    ] {
        assert_eq!(
            int_value(c, who, "order_count").await,
            Some(orders),
            "{who}"
        );
        assert_eq!(
            int_value(c, who, "total_spend_fen").await,
            Some(spend),
            "{who}"
        );
    }
    // Points were not written after the merge: back to each one's own. Bo's
    // last order day is day 5 (R4), not Ann's.
    assert_eq!(int_value(c, ANN_PIN, "points").await, Some(5));
    assert_eq!(int_value(c, BO_PIN, "points").await, Some(7));
    let (ann_last, bo_last) = (
        int_value(c, ANN_PIN, "last_order_day").await.unwrap(),
        int_value(c, BO_PIN, "last_order_day").await.unwrap(),
    );
    assert_eq!(bo_last - ann_last, 3, "R4 on day 5, R2 on day 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_merge_undone_gives_each_customer_back_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    // Ann and Bo, each with a JD order, a tag and points written directly.
    let jd = line(
        "J1",
        "order",
        0,
        62_000,
        &[("pin", "ann"), ("phone", "13812345678")],
    ) + &line(
        "J2",
        "order",
        0,
        1_200,
        &[("pin", "bo"), ("phone", "13900001111")],
    );
    assert_eq!(ingest(&mut c, &jd).await.new_customers, 2);
    tag(&mut c, "store_fan", ANN_PIN).await;
    tag(&mut c, "vip", BO_PIN).await;
    set_points(&mut c, ANN_PIN, 5).await;
    set_points(&mut c, BO_PIN, 7).await;
    // R1: Ann's card with her phone. R2: the clerk typed Ann's card for
    // Bo: it names Bo's phone too, and the two merge (wrongly).
    let pos = line(
        "R1",
        "order",
        1,
        10_000,
        &[("card", "VIP-0042"), ("phone", "13812345678")],
    ) + &line(
        "R2",
        "order",
        2,
        5_000,
        &[("card", "VIP-0042"), ("phone", "13900001111")],
    );
    let merged = ingest(&mut c, &pos).await;
    assert_eq!(merged.merges.len(), 1);
    let m = merged.merges[0].clone();
    assert_eq!(
        (m.survivor.as_str(), m.absorbed.as_str()),
        (ANN_PIN, BO_PIN)
    );
    // After the merge: Bo's own orders (R3 by his phone; R4 by his phone
    // and a new card of his, linked to the merged customer).
    let after = line("R3", "order", 4, 700, &[("phone", "13900001111")])
        + &line(
            "R4",
            "order",
            5,
            300,
            &[("card", "VIP-0077"), ("phone", "13900001111")],
        );
    ingest(&mut c, &after).await;
    assert_eq!(int_value(&mut c, BO_PIN, "order_count").await, Some(6));
    assert_eq!(int_value(&mut c, ANN_PIN, "points").await, Some(12));
    assert_eq!(profile(&mut c, BO_PIN).await.tags, ["store_fan", "vip"]);

    // Refusals first.
    assert_eq!(code(unmerge(&mut c, 0).await), Code::InvalidArgument);
    assert_eq!(code(unmerge(&mut c, 99).await), Code::NotFound);

    let u = unmerge(&mut c, m.merge_id).await.unwrap();
    assert_eq!((u.revived.as_str(), u.survivor.as_str()), (BO_PIN, ANN_PIN));
    assert_eq!(
        u.identities,
        [BO_PIN, "member_card:vip-0077", BO_PHONE],
        "the merge's and those Bo's events linked since"
    );
    assert_eq!(u.events, 6);
    assert_eq!(u.events_revived, 3);
    assert!(u.lsn > 0);
    check_apart(&mut c).await;
    assert_eq!(
        code(unmerge(&mut c, m.merge_id).await),
        Code::FailedPrecondition,
        "undone twice"
    );
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(log.merges[0].undone_ms > 0);

    // Kept apart: a receipt naming both again is applied to one, not
    // merged, and the refusal says why.
    let again = ingest(
        &mut c,
        &line(
            "R5",
            "view",
            6,
            0,
            &[("card", "VIP-0042"), ("phone", "13900001111")],
        ),
    )
    .await;
    assert!(again.merges.is_empty());
    assert!(
        again.refused_links[0].reason.contains("kept apart"),
        "{:?}",
        again.refused_links
    );
    // The refused merge is in the log.
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        code(unmerge(&mut c, log.merges[1].merge_id).await),
        Code::FailedPrecondition
    );

    // Across kill -9, then a checkpoint and a clean restart.
    server.kill();
    drop(server);
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check_apart(&mut c).await;
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    server.stop().unwrap();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check_apart(&mut c).await;
    // Rebuilding both from the archive gives the same facts: each kept
    // event goes to the customer its identities name now.
    let r = c
        .rebuild_facts(RebuildFactsRequest {
            customers: vec![ANN_PIN.into(), BO_PIN.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rebuilt, 2);
    check_apart(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_undone_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    // Three people; A–B merge (1), then C's card joins them (2).
    let data = line(
        "1",
        "order",
        0,
        100,
        &[("pin", "a"), ("phone", "13800000001")],
    ) + &line(
        "2",
        "order",
        0,
        200,
        &[("pin", "b"), ("phone", "13800000002")],
    ) + &line("3", "order", 0, 400, &[("pin", "c"), ("card", "C")]);
    ingest(&mut c, &data).await;
    let one = ingest(
        &mut c,
        &line("4", "view", 1, 0, &[("pin", "a"), ("phone", "13800000002")]),
    )
    .await;
    assert_eq!(one.merges.len(), 1);
    let two = ingest(
        &mut c,
        &line("5", "view", 2, 0, &[("card", "C"), ("pin", "b")]),
    )
    .await;
    assert_eq!(two.merges.len(), 1);
    let (m1, m2) = (one.merges[0].clone(), two.merges[0].clone());
    assert_eq!(m2.survivor, m1.survivor);
    // A merge into a survivor absorbed since is undone after that one.
    assert_eq!(
        int_value(&mut c, "jd_pin:c", "total_spend_fen").await,
        Some(700)
    );
    let s = c.checkpoint(CheckpointRequest::default()).await;
    assert!(s.is_ok());
    // Undo 1 first: the survivor is live (2 absorbed C into it), so it can
    // be; then undo 2.
    let u1 = unmerge(&mut c, m1.merge_id).await.unwrap();
    assert_eq!(u1.revived, "jd_pin:b");
    assert_eq!(
        int_value(&mut c, "jd_pin:b", "total_spend_fen").await,
        Some(200)
    );
    assert_eq!(
        int_value(&mut c, "jd_pin:a", "total_spend_fen").await,
        Some(500)
    );
    let u2 = unmerge(&mut c, m2.merge_id).await.unwrap();
    assert_eq!(u2.revived, "jd_pin:c");
    for (who, spend) in [("jd_pin:a", 100), ("jd_pin:b", 200), ("jd_pin:c", 400)] {
        assert_eq!(
            int_value(&mut c, who, "total_spend_fen").await,
            Some(spend),
            "{who}"
        );
    }
    // A merge whose survivor was absorbed since waits for that one: T, S
    // and X in that order; S absorbs X (3), then T absorbs S (4).
    let data = line("6", "view", 3, 0, &[("pin", "t"), ("phone", "13800000007")])
        + &line("7", "view", 3, 0, &[("pin", "s"), ("phone", "13800000008")])
        + &line(
            "8",
            "order",
            3,
            900,
            &[("pin", "x"), ("phone", "13800000009")],
        );
    ingest(&mut c, &data).await;
    let sx = ingest(
        &mut c,
        &line("9", "view", 4, 0, &[("pin", "s"), ("phone", "13800000009")]),
    )
    .await;
    let ts = ingest(
        &mut c,
        &line(
            "10",
            "view",
            4,
            0,
            &[("pin", "t"), ("phone", "13800000008")],
        ),
    )
    .await;
    let (m3, m4) = (sx.merges[0].clone(), ts.merges[0].clone());
    assert_eq!(
        (m3.survivor.as_str(), m3.absorbed.as_str()),
        ("jd_pin:s", "jd_pin:x")
    );
    assert_eq!(
        (m4.survivor.as_str(), m4.absorbed.as_str()),
        ("jd_pin:t", "jd_pin:s")
    );
    let early = unmerge(&mut c, m3.merge_id).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert!(
        early
            .message()
            .contains(&format!("undo merge {} first", m4.merge_id)),
        "{}",
        early.message()
    );
    // S comes back with X still in it, then X on its own.
    unmerge(&mut c, m4.merge_id).await.unwrap();
    assert_eq!(
        int_value(&mut c, "jd_pin:s", "total_spend_fen").await,
        Some(900)
    );
    assert_eq!(int_value(&mut c, "jd_pin:t", "total_spend_fen").await, None);
    unmerge(&mut c, m3.merge_id).await.unwrap();
    assert_eq!(int_value(&mut c, "jd_pin:s", "total_spend_fen").await, None);
    assert_eq!(
        int_value(&mut c, "jd_pin:x", "total_spend_fen").await,
        Some(900)
    );
    let ids: Vec<u32> = {
        let mut v = Vec::new();
        for k in ["jd_pin:t", "jd_pin:s", "jd_pin:x"] {
            v.push(profile(&mut c, k).await.internal_id);
        }
        v
    };
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
}

async fn take_off(c: &mut Client, identity: &str) -> Result<UnmergeResponse, tonic::Status> {
    c.unmerge(UnmergeRequest {
        merge_id: 0,
        identity: identity.into(),
        allow_partial: false,
    })
    .await
    .map(|r| r.into_inner())
}

/// What Ann and Carl must have once Carl's phone is taken off Ann.
async fn check_taken_off(c: &mut Client) {
    let ann = profile(c, ANN_PIN).await;
    let carl = profile(c, "phone:13700000003").await;
    assert_ne!(ann.internal_id, carl.internal_id);
    assert_eq!(carl.key, "phone:13700000003");
    let ids = |p: &ProfileResponse| {
        p.identities
            .iter()
            .map(|i| i.identity.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&ann), [ANN_PIN, "phone:13812345678"]);
    assert_eq!(ids(&carl), ["member_card:vip-0333", "phone:13700000003"]);
    // Ann: her two orders and the one naming her pin with Carl's phone.
    // Carl: his order by phone, and the one with his new card.
    assert_eq!(int_value(c, ANN_PIN, "order_count").await, Some(3));
    assert_eq!(
        int_value(c, ANN_PIN, "total_spend_fen").await,
        Some(100 + 200 + 300)
    );
    assert_eq!(
        int_value(c, "member_card:vip-0333", "order_count").await,
        Some(2)
    );
    assert_eq!(
        int_value(c, "member_card:vip-0333", "total_spend_fen").await,
        Some(4_000 + 5_000)
    );
    // Ann keeps her tag and points; Carl starts with none.
    assert_eq!(ann.tags, ["store_fan"]);
    assert!(carl.tags.is_empty());
    assert_eq!(int_value(c, ANN_PIN, "points").await, Some(5));
    assert_eq!(int_value(c, "phone:13700000003", "points").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_taken_off_becomes_a_customer_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    let data = line("1", "order", 0, 100, &[("pin", "ann"), ("phone", "13812345678")])
        + &line("2", "order", 1, 200, &[("pin", "ann")])
        // Carl's phone typed on Ann's order: it is linked to her.
        + &line("3", "order", 2, 300, &[("pin", "ann"), ("phone", "13700000003")])
        // Then Carl's own orders land on Ann.
        + &line("4", "order", 3, 4_000, &[("phone", "13700000003")])
        + &line("5", "order", 4, 5_000, &[("phone", "13700000003"), ("card", "VIP-0333")]);
    ingest(&mut c, &data).await;
    tag(&mut c, "store_fan", ANN_PIN).await;
    set_points(&mut c, ANN_PIN, 5).await;
    assert_eq!(int_value(&mut c, ANN_PIN, "order_count").await, Some(5));
    // Bo, merged into Ann by a shared phone: his key is not an identity to
    // take off (undo the merge instead).
    ingest(
        &mut c,
        &line(
            "6",
            "view",
            5,
            0,
            &[("pin", "bo"), ("phone", "13900000009")],
        ),
    )
    .await;
    let m = ingest(
        &mut c,
        &line(
            "7",
            "view",
            6,
            0,
            &[("pin", "ann"), ("phone", "13900000009")],
        ),
    )
    .await
    .merges[0]
        .clone();
    let bo = take_off(&mut c, BO_PIN).await.unwrap_err();
    assert_eq!(bo.code(), Code::FailedPrecondition);
    assert!(
        bo.message()
            .contains(&format!("undo merge {} instead", m.merge_id)),
        "{}",
        bo.message()
    );
    unmerge(&mut c, m.merge_id).await.unwrap();
    // Refusals.
    let own = take_off(&mut c, ANN_PIN).await.unwrap_err();
    assert_eq!(own.code(), Code::FailedPrecondition);
    assert!(own.message().contains("created with"), "{}", own.message());
    assert_eq!(
        code(take_off(&mut c, "phone:13600000000").await),
        Code::NotFound
    );
    assert_eq!(
        code(take_off(&mut c, "nocolon").await),
        Code::InvalidArgument
    );
    let both = c
        .unmerge(UnmergeRequest {
            merge_id: m.merge_id,
            identity: "phone:13700000003".into(),
            allow_partial: false,
        })
        .await;
    assert_eq!(code(both), Code::InvalidArgument);

    // Carl's phone taken off Ann (written in another form: normalised).
    let u = take_off(&mut c, "phone:137-0000-0003").await.unwrap();
    assert_eq!(u.revived, "phone:13700000003");
    assert_eq!(u.survivor, ANN_PIN);
    assert_eq!(u.identities, ["member_card:vip-0333", "phone:13700000003"]);
    assert_eq!(u.events_revived, 2);
    check_taken_off(&mut c).await;
    let log = c
        .list_merges(ListMergesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let split = log.merges.last().unwrap();
    assert!(split.split && split.undone_ms > 0, "{split:?}");
    assert_eq!(split.via, "phone:13700000003");
    // Kept apart: Ann's pin with Carl's phone again merges no one.
    let again = ingest(
        &mut c,
        &line(
            "8",
            "view",
            7,
            0,
            &[("pin", "ann"), ("phone", "13700000003")],
        ),
    )
    .await;
    assert!(again.merges.is_empty());
    assert!(again.refused_links[0].reason.contains("kept apart"));
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check_taken_off(&mut c).await;
    c.rebuild_facts(RebuildFactsRequest {
        customers: vec![ANN_PIN.into(), "phone:13700000003".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    check_taken_off(&mut c).await;
}

/// An unmerge whose caller gives up at any moment is whole or not done:
/// after each try either Bo is still part of Ann (and her facts count
/// his orders) or everything is as `check_apart` wants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmerge_cancelled_halfway_is_whole_or_not_done() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    let jd = line(
        "J1",
        "order",
        0,
        62_000,
        &[("pin", "ann"), ("phone", "13812345678")],
    ) + &line(
        "J2",
        "order",
        0,
        1_200,
        &[("pin", "bo"), ("phone", "13900001111")],
    );
    ingest(&mut c, &jd).await;
    tag(&mut c, "store_fan", ANN_PIN).await;
    tag(&mut c, "vip", BO_PIN).await;
    set_points(&mut c, ANN_PIN, 5).await;
    set_points(&mut c, BO_PIN, 7).await;
    let pos = line(
        "R1",
        "order",
        1,
        10_000,
        &[("card", "VIP-0042"), ("phone", "13812345678")],
    ) + &line(
        "R2",
        "order",
        2,
        5_000,
        &[("card", "VIP-0042"), ("phone", "13900001111")],
    );
    let m = ingest(&mut c, &pos).await.merges[0].clone();
    let after = line("R3", "order", 4, 700, &[("phone", "13900001111")])
        + &line(
            "R4",
            "order",
            5,
            300,
            &[("card", "VIP-0077"), ("phone", "13900001111")],
        );
    ingest(&mut c, &after).await;
    let mut undone = false;
    for micros in (0..60).map(|i| i * 200) {
        let mut caller = c.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_micros(micros),
            caller.unmerge(UnmergeRequest {
                merge_id: m.merge_id,
                ..Default::default()
            }),
        )
        .await;
        // An unmerge the server had not yet seen cancelled may still land
        // later: the merged state is read from one snapshot (one profile).
        c.checkpoint(CheckpointRequest::default()).await.unwrap();
        let ann = profile(&mut c, ANN_PIN).await;
        if ann.identities.iter().any(|i| i.identity == BO_PIN) {
            // Still one: all of Bo is in Ann.
            assert_eq!(ann.tags, ["store_fan", "vip"], "after {micros} µs");
            let int = |name: &str| {
                ann.values.iter().find_map(|v| match (&v.field, &v.value) {
                    (f, Some(field_value::Value::IntValue(i))) if f == name => Some(*i),
                    _ => None,
                })
            };
            assert_eq!(
                (int("order_count"), int("points")),
                (Some(6), Some(12)),
                "after {micros} µs"
            );
            continue;
        }
        // Undone, whole (nothing else changes the store meanwhile).
        check_apart(&mut c).await;
        undone = true;
        eprintln!("undone by the try cancelled after {micros} µs");
        break;
    }
    if !undone {
        unmerge(&mut c, m.merge_id).await.unwrap();
    }
    check_apart(&mut c).await;
}
