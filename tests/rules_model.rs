//! Rule tags and lifecycles against their queries evaluated from scratch
//! (randomized, at the engine's level, with a manual clock): random facts,
//! behaviour events, tag writes and erasures; rules defined and redefined;
//! days passing with and without the day turned; checkpoints, clean
//! restarts and crashes (the store reopened from what was synced). After
//! every step, every rule tag's members and every lifecycle's stages are
//! exactly their queries evaluated over the whole store at the rule's day,
//! and no rule is stale.
//!
//! `TAGSTORE_SEED=n` replays one run.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::bitmap::ShardedBitmap;
use tagstore::clock::ManualClock;
use tagstore::fields::time;
use tagstore::fields::{BehaviourSpec, FieldKind};
use tagstore::query::{Query, parse};
use tagstore::rules::Definition;
use tagstore::storage::fs::MemFs;
use tagstore::storage::{
    CheckpointOptions, Engine, EngineConfig, EventTime, Mutation, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
const DAY_MS: i64 = 86_400_000;
/// 2026-11-11 10:00 in Shanghai.
const START_MS: i64 = 1_794_362_400_000;

fn open(fs: &MemFs, clock: &Arc<ManualClock>) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    Engine::open(cfg).unwrap()
}

fn create_fields(engine: &Engine) {
    for (name, kind) in [
        ("order_count", FieldKind::Int),
        ("total_spend_fen", FieldKind::Int),
        ("last_order_day", FieldKind::Int),
        (
            "viewed",
            FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: 30,
                daily_days: 20,
            }),
        ),
        (
            "bought",
            FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: 30,
                daily_days: 20,
            }),
        ),
    ] {
        engine
            .write_blocking(WriteOp::CreateField {
                name: name.into(),
                description: String::new(),
                category: String::new(),
                kind,
                merge: Default::default(),
                if_not_exists: false,
            })
            .unwrap();
    }
}

/// The rules, in an order each can be defined in; `v` varies thresholds.
fn rule(name: &str, v: u32) -> Definition {
    let query = match name {
        "高价值用户" => format!("total_spend_fen >= {}", [3000, 5000, 8000][v as usize % 3]),
        "潜在流失" => format!(
            "last_order_day < TODAY - {} AND order_count >= 2",
            1 + v % 3
        ),
        "尝试新品" => format!("viewed WITHIN {}d", 1 + v % 3),
        "常购护肤品" => format!("COUNT(bought WITHIN {}d) >= 2", 3 + v % 3),
        "vip高价值" => "高价值用户 AND NOT vip".into(),
        "关注" => format!(
            "vip高价值 OR 尝试新品 OR bought BETWEEN TODAY - {} AND TODAY",
            v % 4
        ),
        "lifecycle" => {
            return Definition {
                stages: vec![
                    ("prospect".into(), "order_count IS NULL".into()),
                    (
                        "new".into(),
                        format!(
                            "order_count = 1 AND last_order_day >= TODAY - {}",
                            1 + v % 3
                        ),
                    ),
                    (
                        "loyal".into(),
                        "order_count >= 5 AND last_order_day >= TODAY - 4".into(),
                    ),
                    ("active".into(), "last_order_day >= TODAY - 3".into()),
                    ("churned".into(), "ALL".into()),
                ],
                ..Default::default()
            };
        }
        other => panic!("no rule {other}"),
    };
    Definition {
        query,
        ..Default::default()
    }
}

const RULES: [&str; 7] = [
    "高价值用户",
    "潜在流失",
    "尝试新品",
    "常购护肤品",
    "vip高价值",
    "关注",
    "lifecycle",
];

fn define(engine: &Engine, name: &str, v: u32, replace: bool) {
    engine
        .write_blocking(WriteOp::DefineRule {
            name: name.into(),
            definition: rule(name, v),
            description: String::new(),
            category: String::new(),
            replace,
        })
        .unwrap_or_else(|e| panic!("define {name}: {e}"));
}

/// Every rule equals its query evaluated from scratch at its day.
fn check(engine: &Engine, seed: u64, step: &str) {
    let snap = engine.snapshot();
    for r in snap.rules.by_name.values() {
        assert!(
            r.stale.is_empty(),
            "seed {seed}, {step}: {} is stale: {}",
            r.name,
            r.stale
        );
        let zone = time::zone(&r.def.time_zone).unwrap();
        let at = time::day_start_ms(r.day, &zone).unwrap();
        let eval = |text: &str| {
            Query::from_expr_in(&parse(text).unwrap(), &snap, at, &zone)
                .unwrap()
                .members()
        };
        if r.def.is_lifecycle() {
            let field = snap.field(&r.name).unwrap();
            let mut left = snap.live().unwrap().clone();
            for (i, (value, text)) in r.def.stages.iter().enumerate() {
                let mut want = eval(text);
                want = want.and(&left);
                left.difference_sharded(&want);
                let got = match field.slots.get(&(i as u32)) {
                    Some(b) => b.get().unwrap().clone(),
                    None => ShardedBitmap::new(),
                };
                assert_eq!(
                    got.iter().collect::<Vec<_>>(),
                    want.iter().collect::<Vec<_>>(),
                    "seed {seed}, {step}: {} = {value}",
                    r.name
                );
            }
        } else {
            let got = snap.tag(&r.name).unwrap().bitmap.get().unwrap().clone();
            let want = eval(&r.def.query);
            assert_eq!(
                got.iter().collect::<Vec<_>>(),
                want.iter().collect::<Vec<_>>(),
                "seed {seed}, {step}: {} = {}",
                r.name,
                r.def.query
            );
            assert_eq!(snap.tag(&r.name).unwrap().meta.count, want.len());
        }
    }
}

fn today(clock: &ManualClock) -> i32 {
    time::day_of(
        tagstore::clock::Clock::now_ms(clock),
        &time::zone("Asia/Shanghai").unwrap(),
    )
    .unwrap()
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let clock = ManualClock::at(START_MS);
    let mut fs = MemFs::new();
    let mut engine = open(&fs, &clock);
    create_fields(&engine);
    engine
        .write_blocking(WriteOp::CreateTag {
            name: "vip".into(),
            description: String::new(),
            category: String::new(),
            if_not_exists: false,
        })
        .unwrap();
    let key = |rng: &mut StdRng| format!("k{}", rng.random_range(0..40));
    let mut defined = 0;
    for step in 0..120 {
        let what = rng.random_range(0..14);
        let label = format!("step {step} ({what})");
        // Rules come one at a time, between writes, in an order each can
        // be defined in.
        if defined < RULES.len() && rng.random_bool(0.25) {
            define(&engine, RULES[defined], rng.random(), false);
            defined += 1;
            check(
                &engine,
                seed,
                &format!("{label}: {} defined", RULES[defined - 1]),
            );
        }
        let day = today(&clock);
        match what {
            0..=3 => {
                let mut writes = Vec::new();
                for _ in 0..rng.random_range(1..5) {
                    let customer = key(&mut rng);
                    let clear = rng.random_bool(0.1);
                    writes.push(ValueWrite::Int {
                        field: "order_count".into(),
                        customer: customer.clone(),
                        value: (!clear).then(|| rng.random_range(1..8)),
                    });
                    writes.push(ValueWrite::Int {
                        field: "total_spend_fen".into(),
                        customer: customer.clone(),
                        value: Some(rng.random_range(0..10_000)),
                    });
                    writes.push(ValueWrite::Int {
                        field: "last_order_day".into(),
                        customer,
                        value: (!clear).then(|| i64::from(day - rng.random_range(0..7))),
                    });
                }
                engine
                    .write_blocking(WriteOp::SetValues { writes })
                    .unwrap();
            }
            4 | 5 => {
                let writes = (0..rng.random_range(1..6))
                    .map(|_| ValueWrite::Event {
                        field: ["viewed", "bought"][rng.random_range(0..2)].into(),
                        customer: key(&mut rng),
                        at: EventTime::Day(day - rng.random_range(0..6)),
                    })
                    .collect();
                engine
                    .write_blocking(WriteOp::SetValues { writes })
                    .unwrap();
            }
            6 => {
                let m = Mutation {
                    tag: "vip".into(),
                    add: (0..rng.random_range(0..4)).map(|_| key(&mut rng)).collect(),
                    ..Default::default()
                };
                let remove: Vec<String> = (0..rng.random_range(0..3))
                    .map(|_| key(&mut rng))
                    .filter(|k| !m.add.contains(k))
                    .collect();
                let m = Mutation { remove, ..m };
                if !m.add.is_empty() || !m.remove.is_empty() {
                    engine
                        .write_blocking(WriteOp::Update {
                            mutations: vec![m],
                            create_missing_tags: false,
                        })
                        .unwrap();
                }
            }
            7 if rng.random_bool(0.5) => {
                engine
                    .write_blocking(WriteOp::DeleteCustomers {
                        customers: vec![key(&mut rng)],
                    })
                    .unwrap();
            }
            // vip's members replaced whole: those who left it and those who
            // joined are the touched ones.
            7 => {
                engine
                    .write_blocking(WriteOp::Replace {
                        tag: "vip".into(),
                        customers: (0..rng.random_range(0..6)).map(|_| key(&mut rng)).collect(),
                        create_missing_tag: false,
                    })
                    .unwrap();
            }
            // Days pass and the rules turn to the new day.
            8 => {
                clock.advance_ms(rng.random_range(0..3) * DAY_MS + rng.random_range(0..DAY_MS / 2));
                engine.write_blocking(WriteOp::TurnRuleDays).unwrap();
                let d = today(&clock);
                for r in engine.snapshot().rules.by_name.values() {
                    assert_eq!(r.day, d, "seed {seed}, {label}: {} turned", r.name);
                }
            }
            // The same, and the machine crashes while the day turns: the
            // store comes back with the rules on the old day or the new
            // one, either way equal to their queries, and turns again.
            9 => {
                clock.advance_ms(DAY_MS + rng.random_range(0..DAY_MS / 2));
                let image = std::thread::scope(|scope| {
                    let crash = scope.spawn(|| {
                        std::thread::sleep(std::time::Duration::from_micros(
                            rng.random_range(0..300),
                        ));
                        fs.crash_image()
                    });
                    engine.write_blocking(WriteOp::TurnRuleDays).unwrap();
                    crash.join().unwrap()
                });
                drop(engine);
                fs = image;
                engine = open(&fs, &clock);
                check(
                    &engine,
                    seed,
                    &format!("{label}: crashed while the day turned"),
                );
                engine.write_blocking(WriteOp::TurnRuleDays).unwrap();
                let d = today(&clock);
                for r in engine.snapshot().rules.by_name.values() {
                    assert_eq!(
                        r.day, d,
                        "seed {seed}, {label}: {} turned after the crash",
                        r.name
                    );
                }
            }
            // A day passes and writes come before the turn: they are
            // evaluated at the rules' day, which has not turned yet.
            10 => clock.advance_ms(DAY_MS),
            11 if defined > 0 => {
                let name = RULES[rng.random_range(0..defined)];
                define(&engine, name, rng.random(), true);
            }
            12 => {
                engine
                    .checkpoint_blocking(CheckpointOptions::default())
                    .unwrap();
            }
            _ => {
                // A clean restart, or a crash: what was synced survives.
                if rng.random_bool(0.5) {
                    engine.shutdown().unwrap();
                    drop(engine);
                } else {
                    let image = fs.crash_image();
                    drop(engine);
                    fs = image;
                }
                engine = open(&fs, &clock);
            }
        }
        check(&engine, seed, &label);
    }
    assert_eq!(defined, RULES.len().min(defined));
}

#[test]
fn rules_equal_their_queries_through_writes_days_and_restarts() {
    if let Ok(seed) = std::env::var("TAGSTORE_SEED") {
        run(seed.parse().unwrap());
        return;
    }
    for seed in 0..12 {
        run(seed);
    }
}

/// A rule whose fixed-date window comes to cut through a month kept as one
/// bucket cannot be evaluated any more: it keeps its members and says why
/// (stale), writes go on, and it is evaluated for everyone once redefined.
#[test]
fn a_rule_that_cannot_be_evaluated_goes_stale_and_recovers() {
    let clock = ManualClock::at(START_MS);
    let fs = MemFs::new();
    let engine = open(&fs, &clock);
    engine
        .write_blocking(WriteOp::CreateField {
            name: "viewed".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: 200,
                daily_days: 3,
            }),
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
    let view = |customer: &str, date: &str| {
        engine
            .write_blocking(WriteOp::SetValues {
                writes: vec![ValueWrite::Event {
                    field: "viewed".into(),
                    customer: customer.into(),
                    at: EventTime::Day(time::parse_date(date).unwrap()),
                }],
            })
            .unwrap();
    };
    view("k1", "2026-11-05");
    let define = |query: &str, replace: bool| {
        engine.write_blocking(WriteOp::DefineRule {
            name: "early_nov".into(),
            definition: Definition {
                query: query.into(),
                ..Default::default()
            },
            description: String::new(),
            category: String::new(),
            replace,
        })
    };
    define("viewed BETWEEN '2026-11-01' AND '2026-11-15'", false).unwrap();
    let members = |e: &Engine| -> Vec<u32> {
        e.snapshot()
            .tag("early_nov")
            .unwrap()
            .bitmap
            .get()
            .unwrap()
            .iter()
            .collect()
    };
    assert_eq!(members(&engine).len(), 1);
    // Forty days on, November is kept as one bucket.
    clock.advance_ms(40 * DAY_MS);
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    engine.write_blocking(WriteOp::TurnRuleDays).unwrap();
    view("k2", "2026-12-20");
    let snap = engine.snapshot();
    let rule = snap.rules.get("early_nov").unwrap();
    assert!(
        rule.stale.contains("one month bucket"),
        "stale: {:?}",
        rule.stale
    );
    assert_eq!(members(&engine).len(), 1, "its members are kept");
    // Redefined over whole months, it is current again.
    define("viewed BETWEEN '2026-11-01' AND '2026-11-30'", true).unwrap();
    assert!(
        engine
            .snapshot()
            .rules
            .get("early_nov")
            .unwrap()
            .stale
            .is_empty()
    );
    assert_eq!(members(&engine).len(), 1);
    check(&engine, 0, "redefined");
}

/// `TODAY` is the local day number of the moment a query is evaluated at,
/// in the store's zone (Shanghai here): at 23:30 on 2026-11-11 in Shanghai
/// (15:30 UTC) it is that day, half an hour later the next.
#[test]
fn today_is_the_local_day_number() {
    // 2026-11-11 23:30 in Shanghai.
    let clock = ManualClock::at(START_MS + 13 * 3_600_000 + 30 * 60_000);
    let fs = MemFs::new();
    let engine = open(&fs, &clock);
    create_fields(&engine);
    let nov11 = time::parse_date("2026-11-11").unwrap();
    let writes = [("k1", nov11), ("k2", nov11 - 1), ("k3", nov11 - 90)]
        .iter()
        .map(|(k, d)| ValueWrite::Int {
            field: "last_order_day".into(),
            customer: k.to_string(),
            value: Some(i64::from(*d)),
        })
        .collect();
    engine
        .write_blocking(WriteOp::SetValues { writes })
        .unwrap();
    let count = |q: &str| {
        let snap = engine.snapshot();
        Query::compile_at(q, &snap, tagstore::clock::Clock::now_ms(&*clock))
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .count()
    };
    assert_eq!(count("last_order_day = TODAY"), 1);
    assert_eq!(count("last_order_day = TODAY - 1"), 1);
    assert_eq!(count("last_order_day <= TODAY - 90"), 1);
    assert_eq!(count("last_order_day BETWEEN TODAY - 1 AND TODAY"), 2);
    clock.advance_ms(30 * 60_000);
    assert_eq!(count("last_order_day = TODAY"), 0);
    assert_eq!(count("last_order_day = TODAY - 1"), 1);
    assert_eq!(count("last_order_day IN (TODAY - 2, TODAY - 91)"), 2);
}

/// A full disk refuses a rule's definition before it is applied: no rule,
/// no tag, the store not failed; once there is room it is defined and
/// survives a crash.
#[test]
fn a_full_disk_refuses_a_definition_whole() {
    use tagstore::storage::fs::Op;
    let clock = ManualClock::at(START_MS);
    let fs = MemFs::new();
    let engine = open(&fs, &clock);
    create_fields(&engine);
    engine
        .write_blocking(WriteOp::SetValues {
            writes: vec![ValueWrite::Int {
                field: "order_count".into(),
                customer: "k1".into(),
                value: Some(3),
            }],
        })
        .unwrap();
    // Lifecycles of about 30 KiB each, until the log needs more room than
    // the disk gives.
    let stage = format!("order_count >= 1{}", " OR order_count >= 1".repeat(700));
    let lifecycle = |name: &str| WriteOp::DefineRule {
        name: name.into(),
        definition: Definition {
            stages: vec![("a".into(), stage.clone()), ("b".into(), stage.clone())],
            ..Default::default()
        },
        description: String::new(),
        category: String::new(),
        replace: false,
    };
    fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC);
    let mut refused = None;
    for i in 0..1_000 {
        let name = format!("life{i}");
        match engine.write_blocking(lifecycle(&name)) {
            Ok(_) => {}
            Err(e) => {
                assert!(matches!(e, tagstore::Error::DiskFull(_)), "{name}: {e}");
                refused = Some(name);
                break;
            }
        }
    }
    let name = refused.expect("the log ran out of room");
    assert_eq!(engine.failure(), None);
    let snap = engine.snapshot();
    assert!(snap.rules.get(&name).is_none() && snap.field(&name).is_none());
    check(&engine, 0, "after the refusal");
    fs.clear_faults();
    engine.write_blocking(lifecycle(&name)).unwrap();
    let life = engine.snapshot().field(&name).unwrap().slots.len();
    assert_eq!(life, 1, "k1 is at stage a");
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert!(engine.snapshot().rules.get(&name).is_some());
    check(&engine, 0, "after the crash");
}
