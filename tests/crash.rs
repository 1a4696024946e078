//! Crash test: several clients write while the server is killed with SIGKILL
//! at random moments. After each restart every acknowledged write must be
//! there, and no request may be half-applied: each request adds one new key
//! to three tags (and removes an older key from one), so a key is in all
//! three tags or in none (from four clients, and from one, whose small
//! writes are committed on the network thread). Field writes and OneID merges get the same
//! treatment (`acknowledged_field_writes_survive_kill_9`,
//! `acknowledged_merges_survive_kill_9`).

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Client;
use rand::{Rng, SeedableRng};
use tagstore::proto::*;

const TAGS: [&str; 3] = ["crash_a", "崩溃_b", "crash c"];

async fn export(c: &mut Client, tag: &str) -> BTreeSet<String> {
    common::export_set(c, &tagstore::names::quote_tag_name(tag)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("TAGSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Acknowledged adds, and keys whose removal from TAGS[0] was acknowledged.
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let removed: Arc<Mutex<HashSet<String>>> = Arc::default();
    // Keys whose removal was in flight (sent, never acknowledged) at a kill:
    // either outcome is correct for them.
    let uncertain: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut total_acked;
    for round in 0..4 {
        // A small checkpoint threshold so that checkpoints run while we write and kill.
        let mut server = common::start(dir.path(), &["--checkpoint-wal-mb", "1"]);
        let mut c = common::client(&server).await;

        // Every acknowledged write from earlier rounds is present, and every
        // request is all-or-nothing.
        let sets: Vec<BTreeSet<String>> = {
            let mut v = Vec::new();
            for t in TAGS {
                v.push(if round == 0 {
                    BTreeSet::new()
                } else {
                    export(&mut c, t).await
                });
            }
            v
        };
        {
            let acked = acked.lock().unwrap();
            let removed = removed.lock().unwrap();
            let uncertain = uncertain.lock().unwrap();
            for k in acked.iter() {
                assert!(
                    sets[1].contains(k) && sets[2].contains(k),
                    "round {round}: acknowledged {k} lost"
                );
                if !uncertain.contains(k) {
                    assert_eq!(
                        sets[0].contains(k),
                        !removed.contains(k),
                        "round {round}: {k} in {}",
                        TAGS[0]
                    );
                }
            }
            for k in sets[1].union(&sets[2]) {
                assert!(
                    sets[1].contains(k) && sets[2].contains(k),
                    "round {round}: {k} half-applied"
                );
            }
            total_acked = acked.len();
        }

        // Odd rounds have one client: its small writes find the writer idle
        // and are committed on the network thread that received them
        // (`storage/writer/thread.rs`); with four, the writer's thread
        // commits them in groups.
        let clients = if round % 2 == 1 { 1 } else { 4 };
        let mut tasks = Vec::new();
        for client in 0..clients {
            let mut c = common::client(&server).await;
            let acked = acked.clone();
            let removed = removed.clone();
            let uncertain = uncertain.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                let mut prev: Option<String> = None;
                loop {
                    let key = format!("r{round}-c{client}-{n}");
                    let mut mutations: Vec<Mutation> = TAGS
                        .iter()
                        .map(|t| Mutation {
                            tag: t.to_string(),
                            add: vec![key.clone()],
                            remove: vec![],
                            ..Default::default()
                        })
                        .collect();
                    if let Some(p) = &prev {
                        mutations[0].remove.push(p.clone());
                    }
                    // Pad some requests so the log grows and checkpoints happen
                    // (300 memberships: synced while applied, SYNC_WHILE_APPLYING).
                    if n.is_multiple_of(5) {
                        mutations.push(Mutation {
                            tag: "filler".into(),
                            add: (0..300)
                                .map(|i| format!("f{round}-{client}-{n}-{i}"))
                                .collect(),
                            remove: vec![],
                            ..Default::default()
                        });
                    }
                    let req = UpdateRequest {
                        mutations,
                        create_missing_tags: true,
                    };
                    match c.update(req).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key.clone());
                            if let Some(p) = prev.take() {
                                removed.lock().unwrap().insert(p);
                            }
                            prev = Some(key);
                        }
                        Err(_) => {
                            if let Some(p) = prev {
                                uncertain.lock().unwrap().insert(p);
                            }
                            return n;
                        }
                    }
                    n += 1;
                }
            }));
        }
        let wait = rng.random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill();
        for t in tasks {
            let _ = t.await;
        }
        let now = acked.lock().unwrap().len();
        let log = server.stderr();
        eprintln!(
            "round {round}: killed after {wait} ms; {} writes acknowledged so far; {} checkpoints, {} torn tails seen",
            now,
            log.matches("checkpoint done").count(),
            log.matches("torn").count()
        );
        assert!(
            now > total_acked,
            "round {round}: some writes were acknowledged"
        );
    }
    // Final check after the last kill.
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let sets: Vec<BTreeSet<String>> = {
        let mut v = Vec::new();
        for t in TAGS {
            v.push(export(&mut c, t).await);
        }
        v
    };
    let acked = acked.lock().unwrap();
    let removed = removed.lock().unwrap();
    let uncertain = uncertain.lock().unwrap();
    for k in acked.iter() {
        assert!(
            sets[1].contains(k) && sets[2].contains(k),
            "acknowledged {k} lost"
        );
        if !uncertain.contains(k) {
            assert_eq!(
                sets[0].contains(k),
                !removed.contains(k),
                "{k} in {}",
                TAGS[0]
            );
        }
    }
    for k in sets[1].union(&sets[2]) {
        assert!(
            sets[1].contains(k) && sets[2].contains(k),
            "{k} half-applied"
        );
    }
    // Everything present was at least attempted; at most one unacknowledged
    // request per client per round can have landed.
    let unacked = sets[1].iter().filter(|k| !acked.contains(*k)).count();
    assert!(
        unacked <= 4 * 4,
        "{unacked} writes present that were never sent"
    );
}

const STAGES: [&str; 5] = ["prospect", "new", "active", "loyal", "churned"];

/// What a customer's fields should hold: (seq, stage).
type Expected = std::collections::HashMap<String, (i64, &'static str)>;

/// Every acknowledged field write is there (a key whose overwrite was in
/// flight at a kill may hold either version) and every request is
/// all-or-nothing across the integer, enumerated and behaviour fields.
async fn check_fields(c: &mut Client, expected: &Expected, uncertain: &HashSet<String>) {
    let seq = common::export_set(c, "seq IS NOT NULL").await;
    let stage = common::export_set(c, "stage IS NOT NULL").await;
    let act = common::export_set(c, "act WITHIN 2d").await;
    assert_eq!(
        seq, stage,
        "integer and enumerated writes are applied together"
    );
    assert_eq!(seq, act, "value writes and events are applied together");
    for (k, (v, st)) in expected {
        assert!(seq.contains(k), "acknowledged field write of {k} lost");
        let p = c
            .profile(ProfileRequest {
                customer: k.clone(),
                recent_days: 2,
            })
            .await
            .unwrap()
            .into_inner();
        let mut got_seq = None;
        let mut got_stage = None;
        for fv in p.values {
            match fv.value {
                Some(field_value::Value::IntValue(x)) if fv.field == "seq" => got_seq = Some(x),
                Some(field_value::Value::EnumValue(x)) if fv.field == "stage" => {
                    got_stage = Some(x)
                }
                _ => {}
            }
        }
        let now = (Some(*v), Some(st.to_string()));
        let got = (got_seq, got_stage);
        if uncertain.contains(k) {
            // The in-flight overwrite may or may not have landed.
            let overwritten = (Some(-*v), Some("churned".to_string()));
            assert!(got == now || got == overwritten, "{k}: {got:?}");
        } else {
            assert_eq!(got, now, "{k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_field_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Acknowledged state per key, and the keys whose overwrite was in
    // flight at a kill.
    let expected: Arc<Mutex<Expected>> = Arc::default();
    let uncertain: Arc<Mutex<HashSet<String>>> = Arc::default();
    for round in 0..3 {
        let mut server = common::start(dir.path(), &["--checkpoint-wal-mb", "1"]);
        let mut c = common::client(&server).await;
        if round == 0 {
            for (name, kind, values) in [
                ("seq", FieldKind::Integer, vec![]),
                ("stage", FieldKind::Enum, STAGES.to_vec()),
                ("act", FieldKind::Behaviour, vec![]),
                ("pad", FieldKind::Integer, vec![]),
            ] {
                common::create_field(&mut c, name, kind, &values).await;
            }
        } else {
            let e = expected.lock().unwrap().clone();
            let u = uncertain.lock().unwrap().clone();
            check_fields(&mut c, &e, &u).await;
        }
        let acked_before = expected.lock().unwrap().len();
        let mut tasks = Vec::new();
        for client in 0..4i64 {
            let mut c = common::client(&server).await;
            let expected = expected.clone();
            let uncertain = uncertain.clone();
            tasks.push(tokio::spawn(async move {
                let mut prev: Option<(String, i64)> = None;
                for n in 0i64.. {
                    let key = format!("f{round}-c{client}-{n}");
                    let v = n * 10 + client;
                    let st = STAGES[(n % 4) as usize];
                    let mut writes = vec![
                        ValueWrite {
                            field: "seq".into(),
                            customer: key.clone(),
                            value: Some(value_write::Value::IntValue(v)),
                        },
                        ValueWrite {
                            field: "stage".into(),
                            customer: key.clone(),
                            value: Some(value_write::Value::EnumValue(st.into())),
                        },
                        ValueWrite {
                            field: "act".into(),
                            customer: key.clone(),
                            value: Some(value_write::Value::EventAtMs(
                                tagstore::clock::Clock::now_ms(&tagstore::clock::SystemClock),
                            )),
                        },
                    ];
                    // Pad some requests so the log grows and checkpoints happen
                    // (300 memberships: synced while applied, SYNC_WHILE_APPLYING).
                    if n % 5 == 0 {
                        writes.extend((0..200).map(|i| ValueWrite {
                            field: "pad".into(),
                            customer: format!("p{round}-{client}-{n}-{i}"),
                            value: Some(value_write::Value::IntValue(i)),
                        }));
                    }
                    // Overwrite the previous key: a negative value, the last stage.
                    if let Some((p, pv)) = &prev {
                        writes.push(ValueWrite {
                            field: "seq".into(),
                            customer: p.clone(),
                            value: Some(value_write::Value::IntValue(-pv)),
                        });
                        writes.push(ValueWrite {
                            field: "stage".into(),
                            customer: p.clone(),
                            value: Some(value_write::Value::EnumValue("churned".into())),
                        });
                    }
                    match c.set_values(SetValuesRequest { writes }).await {
                        Ok(_) => {
                            let mut e = expected.lock().unwrap();
                            e.insert(key.clone(), (v, st));
                            if let Some((p, pv)) = prev.take() {
                                e.insert(p, (-pv, "churned"));
                            }
                            prev = Some((key, v));
                        }
                        Err(_) => {
                            if let Some((p, _)) = prev {
                                uncertain.lock().unwrap().insert(p);
                            }
                            return;
                        }
                    }
                }
            }));
        }
        let wait = rng.random_range(300..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill();
        for t in tasks {
            let _ = t.await;
        }
        let now = expected.lock().unwrap().len();
        let log = server.stderr();
        eprintln!(
            "field round {round}: killed after {wait} ms; {now} keys acknowledged; {} checkpoints",
            log.matches("checkpoint done").count()
        );
        assert!(
            now > acked_before,
            "round {round}: some writes were acknowledged"
        );
    }
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let e = expected.lock().unwrap().clone();
    let u = uncertain.lock().unwrap().clone();
    check_fields(&mut c, &e, &u).await;
}

/// A person's three identities in the merge crash test.
fn person_ids(p: &str) -> [String; 3] {
    [
        format!("phone:139{p}"),
        format!("jd_pin:j{p}"),
        format!("wechat_unionid:u{p}"),
    ]
}

/// The customer an identity names, if any.
async fn customer_of(c: &mut Client, identity: &str) -> Option<u32> {
    match c
        .profile(ProfileRequest {
            customer: identity.into(),
            recent_days: 0,
        })
        .await
    {
        Ok(p) => Some(p.into_inner().internal_id),
        Err(e) if e.code() == tonic::Code::NotFound => None,
        Err(e) => panic!("profile {identity}: {e}"),
    }
}

/// OneID under kill -9: clients link a person's phone and JD pin (one new
/// customer), then the WeChat unionid alone (another), then the unionid with
/// the phone (a merge), while the server is killed at random moments. After
/// each restart, every acknowledged step is there, and no merge is half
/// applied: when the unionid and the phone name one customer, so does the JD
/// pin, and that customer lists all three identities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_merges_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var("TAGSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Person → the last step acknowledged (1: phone+pin, 2: unionid, 3: merged).
    let acked: Arc<Mutex<std::collections::HashMap<String, u8>>> = Arc::default();
    for round in 0..4 {
        let mut server = common::start(dir.path(), &["--checkpoint-wal-mb", "1"]);
        let mut c = common::client(&server).await;
        let snapshot = acked.lock().unwrap().clone();
        verify_people(&mut c, &snapshot, round).await;
        let before = acked.lock().unwrap().values().filter(|&&s| s == 3).count();
        let mut tasks = Vec::new();
        for client in 0..3 {
            let mut c = common::client(&server).await;
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0.. {
                    let p = format!("{round}{client}{n:06}");
                    let [phone, pin, union] = person_ids(&p);
                    for (step, ids) in [
                        (1u8, vec![phone.clone(), pin.clone()]),
                        (2, vec![union.clone()]),
                        (3, vec![union.clone(), phone.clone()]),
                    ] {
                        let req = LinkRequest {
                            identities: ids,
                            channel: String::new(),
                        };
                        if c.link(req).await.is_err() {
                            return;
                        }
                        acked.lock().unwrap().insert(p.clone(), step);
                    }
                }
            }));
        }
        let wait = rng.random_range(300..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill();
        for t in tasks {
            let _ = t.await;
        }
        let merged = acked.lock().unwrap().values().filter(|&&s| s == 3).count();
        eprintln!("round {round}: killed after {wait} ms; {merged} merges acknowledged so far");
        assert!(
            merged > before,
            "round {round}: some merges were acknowledged"
        );
    }
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let snapshot = acked.lock().unwrap().clone();
    verify_people(&mut c, &snapshot, 4).await;
}

/// Every person's acknowledged step is there, and no merge is half applied
/// (checked for every person, acknowledged or not).
async fn verify_people(c: &mut Client, acked: &std::collections::HashMap<String, u8>, round: u32) {
    for (p, &step) in acked {
        let [phone, pin, union] = person_ids(p);
        let (a, b, u) = (
            customer_of(c, &phone).await,
            customer_of(c, &pin).await,
            customer_of(c, &union).await,
        );
        let at = format!("round {round}, person {p} (acknowledged step {step})");
        assert!(a.is_some() && a == b, "{at}: phone and pin {a:?} {b:?}");
        if step >= 2 {
            assert!(u.is_some(), "{at}: the unionid is lost");
        }
        if step >= 3 {
            assert_eq!(u, a, "{at}: the merge is lost");
        }
        if u.is_some() && u == a {
            let p = c
                .profile(ProfileRequest {
                    customer: union.clone(),
                    recent_days: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let ids: Vec<&str> = p.identities.iter().map(|i| i.identity.as_str()).collect();
            for id in [&phone, &pin, &union] {
                assert!(ids.contains(&id.as_str()), "{at}: half a merge: {ids:?}");
            }
        }
    }
}
