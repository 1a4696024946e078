//! Unmerge against a simple model (randomized), through the real server
//! binary. Generated people each have a JD pin, a phone and later a member
//! card; their own orders name some of these (so a person's customers merge
//! as their records link them), and each person gets a tag and points
//! written directly. Then, for random pairs of people, one record names one
//! person's pin with the other's phone: a wrong merge. More orders follow,
//! landing on the merged customers (some naming only the absorbed person's
//! identities, some linking a new card). Then every wrong merge is undone,
//! in random order, with a kill -9 at a random moment of one of them.
//!
//! Afterwards each person is exactly one customer again, all their
//! identities naming it and no one else's; their orders and spend equal the
//! model's over their own records; their tag and points are their own;
//! after a restart, and after RebuildFacts of everyone.
//!
//! `TAGSTORE_SEED=n` replays one run.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{Client, int_value};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tagstore::proto::*;

// 2026-11-01T00:00:00+08:00
const START: i64 = 1_793_462_400_000;
const DAY_MS: i64 = 86_400_000;

struct Person {
    pin: String,
    phone: String,
    card: String,
    card_used: bool,
    orders: i64,
    spend: i64,
}

impl Person {
    fn keys(&self) -> Vec<String> {
        let mut k = vec![
            format!("jd_pin:{}", self.pin),
            format!("phone:{}", self.phone),
        ];
        if self.card_used {
            k.push(format!("member_card:{}", self.card.to_lowercase()));
        }
        k
    }
}

struct Gen {
    rng: StdRng,
    next: u64,
}

impl Gen {
    /// An event naming the given identity columns.
    fn line(&mut self, kind: &str, fen: i64, ids: &[(&str, &str)]) -> String {
        self.next += 1;
        let ts = START + self.rng.random_range(0..30 * DAY_MS);
        let mut s = format!(
            "{{\"id\":\"e{}\",\"type\":\"{kind}\",\"ch\":\"jd\",\"ts\":{ts},\"fen\":{fen},\"cat\":\"skincare\"",
            self.next
        );
        for (col, v) in ids {
            s.push_str(&format!(",\"{col}\":\"{v}\""));
        }
        s.push_str("}\n");
        s
    }

    /// An order by `p`, naming some of its identities (`card`: the card may
    /// be among them, never alone).
    fn order(&mut self, p: &mut Person, card: bool) -> String {
        let fen = self.rng.random_range(1..100_000);
        p.orders += 1;
        p.spend += fen;
        let (pin, phone, c) = (p.pin.clone(), p.phone.clone(), p.card.clone());
        let mut ids: Vec<(&str, &str)> = match self.rng.random_range(0..3) {
            0 => vec![("pin", &pin)],
            1 => vec![("phone", &phone)],
            _ => vec![("pin", &pin), ("phone", &phone)],
        };
        if card && self.rng.random_bool(0.5) {
            ids.push(("card", &c));
            p.card_used = true;
        }
        self.line("order", fen, &ids)
    }
}

/// Sends `lines` in random batches; returns the merges they made.
async fn send(c: &mut Client, rng: &mut StdRng, lines: Vec<String>) -> Vec<CustomerMerge> {
    let mut merges = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let n = rng.random_range(1..=8).min(lines.len() - i);
        let data: String = lines[i..i + n].concat();
        i += n;
        let answer = common::ingest_batch(c, "events", &data).await;
        assert!(answer.rejected.is_empty(), "{:?}", answer.rejected);
        merges.extend(answer.merges);
    }
    merges
}

async fn check(c: &mut Client, people: &[Person], seed: u64) {
    let mut owners: BTreeMap<u32, usize> = BTreeMap::new();
    for (i, p) in people.iter().enumerate() {
        let mut ids = HashSet::new();
        for k in p.keys() {
            let prof = c
                .profile(ProfileRequest {
                    customer: k.clone(),
                    recent_days: 0,
                })
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {k}: {e}"))
                .into_inner();
            ids.insert(prof.internal_id);
            let even = prof.tags.iter().any(|t| t == "even");
            assert_eq!(
                even,
                i % 2 == 0,
                "seed {seed}: person {i}'s tags {:?}",
                prof.tags
            );
            let mut mine: Vec<String> =
                prof.identities.iter().map(|x| x.identity.clone()).collect();
            mine.sort();
            let mut want = p.keys();
            want.sort();
            assert_eq!(mine, want, "seed {seed}: person {i}'s identities");
        }
        assert_eq!(ids.len(), 1, "seed {seed}: person {i} is {ids:?}");
        let id = ids.into_iter().next().unwrap_or_default();
        if let Some(other) = owners.insert(id, i) {
            panic!("seed {seed}: persons {other} and {i} share customer {id}");
        }
        let key = &p.keys()[0];
        assert_eq!(
            int_value(c, key, "order_count").await,
            Some(p.orders),
            "seed {seed}: person {i}'s orders"
        );
        assert_eq!(
            int_value(c, key, "total_spend_fen").await,
            Some(p.spend),
            "seed {seed}: person {i}'s spend"
        );
        assert_eq!(
            int_value(c, key, "points").await,
            Some(i as i64 + 1),
            "seed {seed}: person {i}'s points"
        );
    }
}

async fn run(seed: u64) {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        next: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    let n = g.rng.random_range(8..20);
    let mut people: Vec<Person> = (0..n)
        .map(|i| Person {
            pin: format!("p{i}"),
            phone: format!("1390000{i:04}"),
            card: format!("C{i}"),
            card_used: false,
            orders: 0,
            spend: 0,
        })
        .collect();
    // Own orders: at least one naming pin and phone together.
    let mut lines = Vec::new();
    for p in people.iter_mut() {
        for _ in 0..g.rng.random_range(0..4) {
            lines.push(g.order(p, false));
        }
        let fen = g.rng.random_range(1..100_000);
        p.orders += 1;
        p.spend += fen;
        let (pin, phone) = (p.pin.clone(), p.phone.clone());
        lines.push(g.line("order", fen, &[("pin", &pin), ("phone", &phone)]));
    }
    lines.shuffle(&mut g.rng);
    send(&mut c, &mut g.rng, lines).await;
    for (i, p) in people.iter().enumerate() {
        let key = format!("jd_pin:{}", p.pin);
        if i % 2 == 0 {
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag: "even".into(),
                    add: vec![key.clone()],
                    ..Default::default()
                }],
                create_missing_tags: true,
            })
            .await
            .unwrap();
        }
        c.set_values(SetValuesRequest {
            writes: vec![ValueWrite {
                field: "points".into(),
                customer: key,
                value: Some(value_write::Value::IntValue(i as i64 + 1)),
            }],
        })
        .await
        .unwrap();
    }
    // Wrong links between random pairs of people.
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut g.rng);
    let pairs: Vec<(usize, usize)> = order
        .chunks(2)
        .filter(|p| p.len() == 2 && g.rng.random_bool(0.8))
        .map(|p| (p[0], p[1]))
        .collect();
    let cross: Vec<String> = pairs
        .iter()
        .map(|&(a, b)| {
            let (pin, phone) = (people[a].pin.clone(), people[b].phone.clone());
            g.line("view", 0, &[("pin", &pin), ("phone", &phone)])
        })
        .collect();
    let wrong = send(&mut c, &mut g.rng, cross).await;
    assert_eq!(
        wrong.len(),
        pairs.len(),
        "seed {seed}: one merge per wrong link"
    );
    // Orders after the merges, on the merged customers; new cards.
    let mut lines = Vec::new();
    for p in people.iter_mut() {
        for _ in 0..g.rng.random_range(0..4) {
            lines.push(g.order(p, true));
        }
    }
    lines.shuffle(&mut g.rng);
    send(&mut c, &mut g.rng, lines).await;
    // Undo the wrong merges in random order; kill -9 among them.
    let mut undo: Vec<u64> = wrong.iter().map(|m| m.merge_id).collect();
    undo.shuffle(&mut g.rng);
    let kill_at = g.rng.random_range(0..=undo.len());
    for (i, id) in undo.iter().enumerate() {
        let request = UnmergeRequest {
            merge_id: *id,
            ..Default::default()
        };
        if i == kill_at {
            // Killed while this unmerge may be anywhere (reading, logging,
            // answering): after the restart it is whole or not done.
            let mut caller = c.clone();
            let sent = request.clone();
            let call = tokio::spawn(async move { caller.unmerge(sent).await });
            let micros = g.rng.random_range(0..4_000);
            tokio::time::sleep(std::time::Duration::from_micros(micros)).await;
            server.kill();
            drop(server);
            let _ = call.await;
            server = common::start(dir.path(), &[]);
            c = common::client(&server).await;
            let log = c
                .list_merges(ListMergesRequest {
                    after: id - 1,
                    limit: 1,
                    customer: String::new(),
                })
                .await
                .unwrap()
                .into_inner();
            if log.merges[0].undone_ms > 0 {
                continue;
            }
        }
        c.unmerge(request)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: unmerge {id}: {e}"));
    }
    check(&mut c, &people, seed).await;
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check(&mut c, &people, seed).await;
    let everyone: Vec<String> = people.iter().map(|p| format!("jd_pin:{}", p.pin)).collect();
    let r = c
        .rebuild_facts(RebuildFactsRequest {
            customers: everyone,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.rebuilt, n as u64);
    check(&mut c, &people, seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_wrong_merge_undone_leaves_each_person_their_own() {
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().expect("TAGSTORE_SEED is a number")],
        Err(_) => (1..=6).collect(),
    };
    for seed in seeds {
        run(seed).await;
    }
}
