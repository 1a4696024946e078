//! Randomized test of fields (integer, enumerated, behaviour) against a
//! simple model, across checkpoints (with retention and month roll-ups),
//! clean restarts and abrupt ones: range predicates at the edges (negative,
//! zero, i64::MIN/MAX, NULL), enumerated exclusivity, WITHIN/BETWEEN at
//! Asia/Shanghai day boundaries, COUNT(... WITHIN ...) frequencies,
//! aggregates, breakdowns and profiles.
//!
//! The model computes local days on its own (Shanghai is UTC+8 all year),
//! so a mistake in the engine's calendar code shows up as a mismatch.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::fields::{BehaviourSpec, FieldKind};
use tagstore::query::Query;
use tagstore::query::analytics;
use tagstore::query::eval::Abandon;
use tagstore::storage::{Combine, Engine, EngineConfig, EventTime, Mutation, ValueWrite, WriteOp};

const DAY_MS: i64 = 86_400_000;
const SHANGHAI_MS: i64 = 8 * 3_600_000;
const RETENTION: i32 = 60;
const DAILY: i32 = 20;
const VALUES: &[&str] = &["prospect", "new", "active", "loyal", "churned"];
const INTS: &[&str] = &["spend", "age"];

fn local_day(ms: i64) -> i32 {
    (ms + SHANGHAI_MS).div_euclid(DAY_MS) as i32
}

fn now_ms() -> i64 {
    tagstore::clock::Clock::now_ms(&tagstore::clock::SystemClock)
}

#[derive(Default, Clone, Debug)]
struct Model {
    live: BTreeSet<String>,
    ints: BTreeMap<&'static str, BTreeMap<String, i64>>,
    stage: BTreeMap<String, usize>,
    /// Local days with the behaviour, per customer.
    bought: BTreeMap<String, BTreeSet<i32>>,
}

impl Model {
    fn delete(&mut self, k: &str) {
        self.live.remove(k);
        for m in self.ints.values_mut() {
            m.remove(k);
        }
        self.stage.remove(k);
        self.bought.remove(k);
    }

    fn days_in(&self, k: &str, lo: i32, hi: i32, today: i32) -> usize {
        let keep_from = today - RETENTION + 1;
        self.bought
            .get(k)
            .map_or(0, |d| d.range(lo.max(keep_from)..=hi).count())
    }
}

fn key(rng: &mut StdRng) -> String {
    format!("c{}", rng.random_range(0..150))
}

fn int_value(rng: &mut StdRng) -> i64 {
    match rng.random_range(0..10) {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => 0,
        3 => -1,
        4 => rng.random(),
        _ => rng.random_range(-50..50),
    }
}

fn open(dir: &std::path::Path) -> Engine {
    let mut cfg = EngineConfig::new(dir);
    cfg.checkpoint_wal_bytes = 32 << 10;
    cfg.compaction.max_segments = 3;
    Engine::open(cfg).expect("open engine")
}

fn create_fields(engine: &Engine) {
    for name in INTS {
        engine
            .write_blocking(WriteOp::CreateField {
                name: name.to_string(),
                description: String::new(),
                category: "numbers".into(),
                kind: FieldKind::Int,
                merge: Default::default(),
                if_not_exists: false,
            })
            .unwrap();
    }
    engine
        .write_blocking(WriteOp::CreateField {
            name: "lifecycle".into(),
            description: "stage".into(),
            category: String::new(),
            kind: FieldKind::Enum {
                values: VALUES.iter().map(|v| v.to_string()).collect(),
            },
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
    engine
        .write_blocking(WriteOp::CreateField {
            name: "bought".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: RETENTION as u32,
                daily_days: DAILY as u32,
            }),
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
}

/// A random write, applied to the model when the engine accepts it.
fn step(rng: &mut StdRng, engine: &Engine, model: &mut Model) {
    let now = now_ms();
    let today = local_day(now);
    if rng.random_bool(0.08) {
        let ks: Vec<String> = (0..rng.random_range(1..4)).map(|_| key(rng)).collect();
        engine
            .write_blocking(WriteOp::DeleteCustomers {
                customers: ks.clone(),
            })
            .unwrap();
        for k in &ks {
            model.delete(k);
        }
        return;
    }
    if rng.random_bool(0.05) {
        let ks: Vec<String> = (0..rng.random_range(1..5)).map(|_| key(rng)).collect();
        engine
            .write_blocking(WriteOp::Update {
                mutations: vec![Mutation {
                    tag: "seen".into(),
                    add: ks.clone(),
                    remove: Vec::new(),
                    ..Default::default()
                }],
                create_missing_tags: true,
            })
            .unwrap();
        model.live.extend(ks);
        return;
    }
    let mut writes = Vec::new();
    for _ in 0..rng.random_range(1..12) {
        let customer = key(rng);
        writes.push(match rng.random_range(0..4) {
            3 => {
                // Mostly small amounts; sometimes an edge, so that a sum
                // leaves the 64-bit range and the whole request is refused.
                let n = if rng.random_bool(0.9) {
                    rng.random_range(-1_000..100_000)
                } else {
                    int_value(rng)
                };
                ValueWrite::Combine {
                    field: INTS[rng.random_range(0..INTS.len())].into(),
                    customer,
                    with: match rng.random_range(0..3) {
                        0 => Combine::Add(n),
                        1 => Combine::Max(n),
                        _ => Combine::Min(n),
                    },
                }
            }
            0 => ValueWrite::Int {
                field: INTS[rng.random_range(0..INTS.len())].into(),
                customer,
                value: (!rng.random_bool(0.2)).then(|| int_value(rng)),
            },
            1 => ValueWrite::Enum {
                field: "lifecycle".into(),
                customer,
                value: (!rng.random_bool(0.2))
                    .then(|| VALUES[rng.random_range(0..VALUES.len())].to_string()),
            },
            _ => {
                // Around local midnights, over the last 80 days.
                let day = today - rng.random_range(0..80);
                let midnight = i64::from(day) * DAY_MS - SHANGHAI_MS;
                let at = match rng.random_range(0..4) {
                    0 => midnight,
                    1 => midnight - 1,
                    2 => midnight + DAY_MS - 1,
                    _ => midnight + rng.random_range(0..DAY_MS),
                };
                ValueWrite::Event {
                    field: "bought".into(),
                    customer,
                    at: EventTime::Ms(at.min(now)),
                }
            }
        });
    }
    // The model's answer first: a sum out of range refuses the whole request.
    let mut next = model.clone();
    let in_range = apply_values(&mut next, writes.clone(), now);
    let res = engine.write_blocking(WriteOp::SetValues { writes });
    if in_range {
        res.unwrap();
        *model = next;
    } else {
        let e = res.expect_err("a sum out of the 64-bit range must be refused");
        assert!(e.to_string().contains("64-bit range"), "{e}");
    }
}

/// Applies value writes to the model in order; false if a sum leaves the
/// 64-bit range (the model is then to be thrown away).
fn apply_values(model: &mut Model, writes: Vec<ValueWrite>, now: i64) -> bool {
    for w in writes {
        match w {
            ValueWrite::Int {
                field,
                customer,
                value,
            } => {
                let f = INTS.iter().find(|x| **x == field).unwrap();
                let m = model.ints.entry(f).or_default();
                match value {
                    Some(v) => {
                        model.live.insert(customer.clone());
                        m.insert(customer, v);
                    }
                    None => {
                        m.remove(&customer);
                    }
                }
            }
            ValueWrite::Combine {
                field,
                customer,
                with,
            } => {
                let f = INTS.iter().find(|x| **x == field).unwrap();
                let m = model.ints.entry(f).or_default();
                let current = m.get(&customer).copied();
                let new = match with {
                    Combine::Add(d) => match current.unwrap_or(0).checked_add(d) {
                        Some(v) => v,
                        None => return false,
                    },
                    Combine::Max(v) => current.map_or(v, |c| c.max(v)),
                    Combine::Min(v) => current.map_or(v, |c| c.min(v)),
                };
                model.live.insert(customer.clone());
                m.insert(customer, new);
            }
            ValueWrite::Enum {
                customer, value, ..
            } => match value {
                Some(v) => {
                    model.live.insert(customer.clone());
                    let i = VALUES.iter().position(|x| *x == v).unwrap();
                    model.stage.insert(customer, i);
                }
                None => {
                    model.stage.remove(&customer);
                }
            },
            ValueWrite::Event { customer, at, .. } => {
                let EventTime::Ms(ms) = at else {
                    unreachable!()
                };
                let day = local_day(ms);
                if day > local_day(now) - RETENTION {
                    model.live.insert(customer.clone());
                    model.bought.entry(customer).or_default().insert(day);
                }
            }
        }
    }
    true
}

fn members(engine: &Engine, text: &str, now: i64) -> BTreeSet<String> {
    let snap = engine.snapshot();
    let q = Query::compile_at(text, &snap, now).unwrap_or_else(|e| panic!("{text}: {e}"));
    let (ids, _) = q.page(None, usize::MAX);
    let mut keys = Vec::new();
    snap.dict.keys_of(&ids, &mut keys).unwrap();
    assert_eq!(q.count(), keys.len() as u64, "count of {text}");
    keys.into_iter().collect()
}

fn date(day: i32) -> String {
    tagstore::fields::time::format_day(day)
}

/// A random predicate as text, and the model's answer.
fn predicate(rng: &mut StdRng, model: &Model, today: i32) -> (String, BTreeSet<String>) {
    let live = &model.live;
    let filter = |f: &dyn Fn(&String) -> bool| -> BTreeSet<String> {
        live.iter().filter(|k| f(k)).cloned().collect()
    };
    match rng.random_range(0..8) {
        0 | 1 => {
            let field = INTS[rng.random_range(0..INTS.len())];
            let empty = BTreeMap::new();
            let vals = model.ints.get(field).unwrap_or(&empty);
            let c = if !vals.is_empty() && rng.random_bool(0.5) {
                *vals.values().nth(rng.random_range(0..vals.len())).unwrap()
            } else {
                int_value(rng)
            };
            let v = |k: &String| vals.get(k).copied();
            match rng.random_range(0..9) {
                0 => (format!("{field} = {c}"), filter(&|k| v(k) == Some(c))),
                1 => (
                    format!("{field} != {c}"),
                    filter(&|k| v(k).is_some_and(|x| x != c)),
                ),
                2 => (
                    format!("{field} < {c}"),
                    filter(&|k| v(k).is_some_and(|x| x < c)),
                ),
                3 => (
                    format!("{field} <= {c}"),
                    filter(&|k| v(k).is_some_and(|x| x <= c)),
                ),
                4 => (
                    format!("{field} > {c}"),
                    filter(&|k| v(k).is_some_and(|x| x > c)),
                ),
                5 => (
                    format!("{field} >= {c}"),
                    filter(&|k| v(k).is_some_and(|x| x >= c)),
                ),
                6 => {
                    let d = int_value(rng);
                    let (lo, hi) = (c.min(d), c.max(d));
                    (
                        format!("{field} BETWEEN {lo} AND {hi}"),
                        filter(&|k| v(k).is_some_and(|x| x >= lo && x <= hi)),
                    )
                }
                7 => (format!("{field} IS NULL"), filter(&|k| v(k).is_none())),
                _ => {
                    let d = int_value(rng);
                    (
                        format!("{field} NOT IN ({c}, {d})"),
                        filter(&|k| v(k).is_some_and(|x| x != c && x != d)),
                    )
                }
            }
        }
        2 => {
            let a = rng.random_range(0..VALUES.len());
            let b = rng.random_range(0..VALUES.len());
            let s = |k: &String| model.stage.get(k).copied();
            match rng.random_range(0..5) {
                0 => (
                    format!("lifecycle = {}", VALUES[a]),
                    filter(&|k| s(k) == Some(a)),
                ),
                1 => (
                    format!("lifecycle != '{}'", VALUES[a]),
                    filter(&|k| s(k).is_some_and(|x| x != a)),
                ),
                2 => (
                    format!("lifecycle IN ({}, {})", VALUES[a], VALUES[b]),
                    filter(&|k| s(k).is_some_and(|x| x == a || x == b)),
                ),
                3 => (
                    format!("lifecycle NOT IN ({})", VALUES[a]),
                    filter(&|k| s(k).is_some_and(|x| x != a)),
                ),
                _ => ("lifecycle IS NOT NULL".into(), filter(&|k| s(k).is_some())),
            }
        }
        3 | 4 => {
            let n = rng.random_range(1..=DAILY);
            (
                format!("bought WITHIN {n}d"),
                filter(&|k| model.days_in(k, today - n + 1, today, today) > 0),
            )
        }
        5 => {
            // Day precision inside the daily window.
            let a = today - rng.random_range(0..DAILY - 1);
            let b = today - rng.random_range(0..DAILY - 1);
            let (lo, hi) = (a.min(b), a.max(b));
            (
                format!("bought BETWEEN '{}' AND {}", date(lo), date(hi)),
                filter(&|k| model.days_in(k, lo, hi, today) > 0),
            )
        }
        6 => {
            let n = rng.random_range(1..=DAILY);
            let c = rng.random_range(0..5i64);
            let op = [">=", ">", "=", "<=", "<", "!="][rng.random_range(0..6)];
            let cmp = |x: i64| match op {
                ">=" => x >= c,
                ">" => x > c,
                "=" => x == c,
                "<=" => x <= c,
                "<" => x < c,
                _ => x != c,
            };
            (
                format!("COUNT(bought WITHIN {n}d) {op} {c}"),
                filter(&|k| cmp(model.days_in(k, today - n + 1, today, today) as i64)),
            )
        }
        _ => (
            "bought".into(),
            filter(&|k| model.days_in(k, i32::MIN, i32::MAX, today) > 0),
        ),
    }
}

fn check(engine: &Engine, model: &Model, rng: &mut StdRng) {
    let now = now_ms();
    let today = local_day(now);
    assert_eq!(members(engine, "ALL", now), model.live, "ALL");
    for _ in 0..60 {
        let (a, ma) = predicate(rng, model, today);
        let (text, expect) = match rng.random_range(0..4) {
            0 => (a, ma),
            1 => {
                let (b, mb) = predicate(rng, model, today);
                (
                    format!("{a} AND {b}"),
                    ma.intersection(&mb).cloned().collect(),
                )
            }
            2 => {
                let (b, mb) = predicate(rng, model, today);
                (format!("{a} OR ({b})"), ma.union(&mb).cloned().collect())
            }
            _ => (
                format!("NOT ({a})"),
                model.live.difference(&ma).cloned().collect(),
            ),
        };
        assert_eq!(members(engine, &text, now), expect, "query {text}");
    }
    // Whole months that are rolled up answer BETWEEN at month precision.
    let rolled_last = today - DAILY;
    let (y, m, _) = tagstore::fields::time::civil_from_days(i64::from(rolled_last));
    let month_start = tagstore::fields::time::days_from_civil(y, m, 1) as i32;
    let last_whole_month_end = month_start - 1;
    let (py, pm, _) = tagstore::fields::time::civil_from_days(i64::from(last_whole_month_end));
    let prev_start = tagstore::fields::time::days_from_civil(py, pm, 1) as i32;
    let text = format!(
        "bought BETWEEN '{}' AND '{}'",
        date(prev_start),
        date(last_whole_month_end)
    );
    let expect: BTreeSet<String> = model
        .live
        .iter()
        .filter(|k| model.days_in(k, prev_start, last_whole_month_end, today) > 0)
        .cloned()
        .collect();
    assert_eq!(members(engine, &text, now), expect, "{text}");

    let snap = engine.snapshot();
    // Aggregates over a random audience.
    let (audience_text, audience) = predicate(rng, model, today);
    let q = Query::compile_at(&audience_text, &snap, now).unwrap();
    let go_on = Abandon::default();
    // A caller that has gone gets nothing computed: each analytic stops
    // before its first shard (a query that compiles to no shard at all,
    // such as `COUNT(…) < 0`, has none to stop before).
    let gone = Abandon::default();
    gone.set();
    let lifecycle = snap.field("lifecycle").unwrap();
    if q.shard_count() > 0 {
        assert!(matches!(
            analytics::aggregate(&q, snap.field(INTS[0]).unwrap(), &[0], &gone),
            Err(tagstore::Error::Abandoned)
        ));
        assert!(matches!(
            analytics::breakdown_by_field(&q, lifecycle, &gone),
            Err(tagstore::Error::Abandoned)
        ));
        assert!(matches!(
            analytics::overlap(std::slice::from_ref(&q), &gone),
            Err(tagstore::Error::Abandoned)
        ));
    }
    for field in INTS {
        let edges = [-10, 0, 1, 40];
        let agg = analytics::aggregate(&q, snap.field(field).unwrap(), &edges, &go_on).unwrap();
        let empty = BTreeMap::new();
        let vals: Vec<i64> = audience
            .iter()
            .filter_map(|k| model.ints.get(field).unwrap_or(&empty).get(k).copied())
            .collect();
        assert_eq!(agg.members, audience.len() as u64, "{audience_text}");
        assert_eq!(agg.with_value, vals.len() as u64);
        assert_eq!(agg.sum, vals.iter().map(|v| i128::from(*v)).sum::<i128>());
        assert_eq!(agg.min, vals.iter().min().copied());
        assert_eq!(agg.max, vals.iter().max().copied());
        let mut hist = vec![0u64; edges.len() + 1];
        for v in &vals {
            hist[edges.iter().filter(|e| **e <= *v).count()] += 1;
        }
        assert_eq!(
            agg.histogram, hist,
            "histogram of {field} over {audience_text}"
        );
    }
    let (rows, none, total) =
        analytics::breakdown_by_field(&q, snap.field("lifecycle").unwrap(), &go_on).unwrap();
    assert_eq!(total, audience.len() as u64);
    for (i, row) in rows.iter().enumerate() {
        let expect = audience
            .iter()
            .filter(|k| model.stage.get(*k) == Some(&i))
            .count();
        assert_eq!(row.count, expect as u64, "breakdown {}", row.label);
    }
    assert_eq!(rows.iter().map(|r| r.count).sum::<u64>() + none, total);

    // Profiles: values and enumerated value of a sample of customers.
    for _ in 0..30 {
        let k = key(rng);
        let Some(id) = snap.customer_id(&k).unwrap() else {
            assert!(!model.live.contains(&k));
            continue;
        };
        for field in INTS {
            let expect = model.ints.get(field).and_then(|m| m.get(&k)).copied();
            assert_eq!(snap.field(field).unwrap().int_value(id).unwrap(), expect);
        }
        let stage = snap.field("lifecycle").unwrap().enum_value(id).unwrap();
        assert_eq!(stage.map(|s| s as usize), model.stage.get(&k).copied());
    }
}

#[test]
fn random_field_writes_match_the_model_across_restarts() {
    let seed: u64 = std::env::var("TAGSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let mut engine = open(dir.path());
    create_fields(&engine);
    for phase in 0..9 {
        for _ in 0..250 {
            step(&mut rng, &engine, &mut model);
        }
        check(&engine, &model, &mut rng);
        match phase % 3 {
            0 => {
                engine.checkpoint_blocking(Default::default()).unwrap();
                // The checkpoint rolled old days into months and dropped expired ones.
                let snap = engine.snapshot();
                let slots: Vec<u32> = snap
                    .field("bought")
                    .unwrap()
                    .slots
                    .keys()
                    .copied()
                    .collect();
                let today = local_day(now_ms());
                for s in slots {
                    match tagstore::fields::time::Bucket::of_slot(s) {
                        tagstore::fields::time::Bucket::Day(d) => {
                            assert!(d > today - RETENTION, "expired day {d} kept");
                            let m = tagstore::fields::time::month_of(d);
                            assert!(
                                tagstore::fields::time::month_last_day(m) > today - DAILY,
                                "day {d} of a rolled month kept"
                            );
                        }
                        tagstore::fields::time::Bucket::Month(m) => assert!(
                            tagstore::fields::time::month_last_day(m) > today - RETENTION,
                            "expired month {m} kept"
                        ),
                    }
                }
            }
            1 => {
                drop(engine);
                engine = open(dir.path());
                assert_eq!(engine.recovery().records_replayed, 0);
            }
            _ => {
                let copy = tempfile::tempdir().unwrap();
                common::copy_data_dir(dir.path(), copy.path());
                let other = open(copy.path());
                check(&other, &model, &mut rng);
                drop(other);
            }
        }
        check(&engine, &model, &mut rng);
    }
}

#[test]
fn field_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    create_fields(&engine);
    let snap = engine.snapshot();
    for (text, pos, needle) in [
        ("lifecycle >= new", 10, "enumerated"),
        ("lifecycle = vip", 12, "not a value"),
        ("spend", 0, "integer field"),
        ("spend >= 'x'", 9, "integer"),
        ("spend WITHIN 7d", 0, "integer field"),
        ("bought = 3", 0, "behaviour field"),
        ("seen >= 3", 0, "unknown tag or field"),
        ("bought BETWEEN '2026-02-30' AND '2026-03-01'", 15, "date"),
        (
            "COUNT(bought WITHIN 59d) >= 2",
            20,
            "COUNT needs day buckets",
        ),
    ] {
        match Query::compile(text, &snap) {
            Err(tagstore::error::Error::Query {
                position, message, ..
            }) => {
                assert_eq!(position, pos, "{text}: {message}");
                assert!(message.contains(needle), "{text}: {message}");
            }
            Err(e) => panic!("{text}: unexpected error {e}"),
            Ok(_) => panic!("{text} should fail"),
        }
    }
    let bad = engine.write_blocking(WriteOp::SetValues {
        writes: vec![ValueWrite::Enum {
            field: "lifecycle".into(),
            customer: "c1".into(),
            value: Some("vip".into()),
        }],
    });
    assert!(bad.unwrap_err().to_string().contains("not a value"));
    let bad = engine.write_blocking(WriteOp::SetValues {
        writes: vec![ValueWrite::Int {
            field: "lifecycle".into(),
            customer: "c1".into(),
            value: Some(1),
        }],
    });
    assert!(bad.unwrap_err().to_string().contains("enumerated"));
    let bad = engine.write_blocking(WriteOp::CreateField {
        name: "spend".into(),
        description: String::new(),
        category: String::new(),
        kind: FieldKind::Int,
        merge: Default::default(),
        if_not_exists: false,
    });
    assert!(matches!(bad, Err(tagstore::error::Error::FieldExists(_))));
    let bad = engine.write_blocking(WriteOp::CreateField {
        name: "x".into(),
        description: String::new(),
        category: String::new(),
        kind: FieldKind::Behaviour(BehaviourSpec {
            time_zone: "Mars/Olympus".into(),
            retention_days: 10,
            daily_days: 5,
        }),
        merge: Default::default(),
        if_not_exists: false,
    });
    assert!(bad.unwrap_err().to_string().contains("time zone"));
    // Events past retention are counted, not stored.
    let old = engine
        .write_blocking(WriteOp::SetValues {
            writes: vec![ValueWrite::Event {
                field: "bought".into(),
                customer: "c1".into(),
                at: EventTime::Ms(now_ms() - 400 * DAY_MS),
            }],
        })
        .unwrap();
    assert_eq!((old.events_expired, old.events_added), (1, 0));
}
