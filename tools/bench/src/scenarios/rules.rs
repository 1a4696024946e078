//! The `rules` scenario (#21), on the engine in-process with a manual
//! clock (the day must turn on demand): facts of `--customers` customers
//! (spend, orders, last order day, ten behaviours), then
//! - durable writes of 1,000 facts each, without rules and with 50 rules
//!   of realistic shapes defined, taking turns (off, on, off, on: the rules
//!   are dropped and defined again between rounds); target: with ÷ without
//!   ≥ 0.5;
//! - the time to define the 50 rules (each evaluated for everyone);
//! - the turn of the day with the 50 rules, and the latency of counts read
//!   on another thread while it runs against the same counts before it
//!   (reads take published snapshots: the turn must not block them).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::clock::ManualClock;
use tagstore::fields::{BehaviourSpec, FieldKind};
use tagstore::query::Query;
use tagstore::rules::Definition;
use tagstore::storage::{Engine, EngineConfig, EventTime, ValueWrite, WriteOp};

use crate::*;

/// 2026-11-11 10:00 in Shanghai.
const START_MS: i64 = 1_794_362_400_000;
const DAY_MS: i64 = 86_400_000;
/// Facts per write in the timed rounds.
const WRITE_BATCH: usize = 1_000;
/// Facts per write while loading.
const LOAD_BATCH: usize = 200_000;
const BEHAVIOURS: usize = 10;

struct Figures {
    customers: u32,
    load_secs: f64,
    define_secs: Vec<f64>,
    /// Facts/s and p50 µs of a write, per round.
    off: Vec<(f64, f64)>,
    on: Vec<(f64, f64)>,
    turn_secs: f64,
    turned_rules: usize,
    idle_p50: f64,
    idle_p99: f64,
    turn_p50: f64,
    turn_p99: f64,
    turn_max: f64,
    reads_during_turn: u64,
}

fn behaviour(i: usize) -> String {
    if i < 5 {
        format!("bought_cat{i}")
    } else {
        format!("interacted_ch{}", i - 5)
    }
}

/// The 50 rules: thresholds over spend and orders, `TODAY` bounds over the
/// last order day, counts and windows over behaviours, rules over rules,
/// and a lifecycle.
fn rule_set() -> Vec<(String, Definition)> {
    let tag = |q: String| Definition {
        query: q,
        ..Default::default()
    };
    let mut out = Vec::new();
    for k in 0..10 {
        out.push((
            format!("spend_{k}"),
            tag(format!("spend >= {}", 50_000 * (k + 1))),
        ));
    }
    for k in 0..5 {
        out.push((
            format!("orders_{k}"),
            tag(format!("orders >= {}", 2 * k + 2)),
        ));
    }
    for k in 0..10 {
        out.push((
            format!("lapsing_{k}"),
            tag(format!(
                "last_order_day < TODAY - {} AND orders >= 2",
                30 * (k + 1)
            )),
        ));
    }
    for k in 0..10 {
        let (days, n) = if k < 5 { (90, 3) } else { (30, 2) };
        out.push((
            format!("often_{k}"),
            tag(format!("COUNT({} WITHIN {days}d) >= {n}", behaviour(k % 5))),
        ));
    }
    for k in 0..5 {
        out.push((
            format!("active_{k}"),
            tag(format!("{} WITHIN 7d", behaviour(5 + k))),
        ));
    }
    for k in 0..5 {
        out.push((
            format!("engaged_{k}"),
            tag(format!(
                "{} WITHIN 30d OR {} WITHIN 30d",
                behaviour(5 + k),
                behaviour(k)
            )),
        ));
    }
    for k in 0..4 {
        out.push((
            format!("vip_{k}"),
            tag(format!(
                "spend_{} AND NOT lapsing_{} AND active_{k}",
                k + 5,
                k
            )),
        ));
    }
    out.push((
        "lifecycle".into(),
        Definition {
            stages: [
                ("prospect", "orders IS NULL"),
                ("new", "orders = 1 AND last_order_day >= TODAY - 30"),
                ("loyal", "orders >= 5 AND last_order_day >= TODAY - 180"),
                ("active", "last_order_day >= TODAY - 90"),
                ("churned", "ALL"),
            ]
            .iter()
            .map(|(v, q)| (v.to_string(), q.to_string()))
            .collect(),
            ..Default::default()
        },
    ));
    out
}

fn key(c: u32) -> String {
    format!("c{c}")
}

/// `n` random facts of random customers, at local day `today`.
fn facts(rng: &mut StdRng, n: usize, customers: u32, today: i32) -> Vec<ValueWrite> {
    (0..n)
        .map(|_| {
            let customer = key(rng.random_range(0..customers));
            match rng.random_range(0..4) {
                0 => ValueWrite::Int {
                    field: "spend".into(),
                    customer,
                    value: Some(rng.random_range(0..600_000)),
                },
                1 => ValueWrite::Int {
                    field: "orders".into(),
                    customer,
                    value: Some(rng.random_range(1..12)),
                },
                2 => ValueWrite::Int {
                    field: "last_order_day".into(),
                    customer,
                    value: Some(i64::from(today - rng.random_range(0..400))),
                },
                _ => ValueWrite::Event {
                    field: behaviour(rng.random_range(0..BEHAVIOURS)),
                    customer,
                    at: EventTime::Day(today - rng.random_range(0..90)),
                },
            }
        })
        .collect()
}

fn run(dir: PathBuf, customers: u32, seconds: f64, seed: u64) -> Result<Figures, BoxError> {
    let clock = ManualClock::at(START_MS);
    let mut cfg = EngineConfig::new(&dir);
    cfg.clock = clock.clone();
    let engine = Arc::new(Engine::open(cfg)?);
    let zone = tagstore::fields::time::default_zone();
    let today = || tagstore::fields::time::day_of(clock_now(&clock), &zone).unwrap_or(0);
    for (name, kind) in [
        ("spend", FieldKind::Int),
        ("orders", FieldKind::Int),
        ("last_order_day", FieldKind::Int),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_string(), k))
    .chain((0..BEHAVIOURS).map(|i| {
        (
            behaviour(i),
            FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: 730,
                daily_days: 400,
            }),
        )
    })) {
        engine.write_blocking(WriteOp::CreateField {
            name,
            description: String::new(),
            category: String::new(),
            kind,
            merge: Default::default(),
            if_not_exists: false,
        })?;
    }
    // Facts: every customer has a spend and an order count, most a last
    // order day; a behaviour on about two days in five a customer.
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let pb = bar(u64::from(customers), "rules: facts");
    let mut writes = Vec::with_capacity(LOAD_BATCH);
    let day = today();
    for c in 0..customers {
        let customer = key(c);
        writes.push(ValueWrite::Int {
            field: "spend".into(),
            customer: customer.clone(),
            value: Some(rng.random_range(0..600_000)),
        });
        writes.push(ValueWrite::Int {
            field: "orders".into(),
            customer: customer.clone(),
            value: Some(rng.random_range(1..12)),
        });
        if rng.random_bool(0.9) {
            writes.push(ValueWrite::Int {
                field: "last_order_day".into(),
                customer: customer.clone(),
                value: Some(i64::from(day - rng.random_range(0..400))),
            });
        }
        for _ in 0..rng.random_range(0..5u32) {
            writes.push(ValueWrite::Event {
                field: behaviour(rng.random_range(0..BEHAVIOURS)),
                customer: customer.clone(),
                at: EventTime::Day(day - rng.random_range(0..90)),
            });
        }
        if writes.len() >= LOAD_BATCH {
            engine.write_blocking(WriteOp::SetValues {
                writes: std::mem::take(&mut writes),
            })?;
            pb.set_position(u64::from(c));
        }
    }
    if !writes.is_empty() {
        engine.write_blocking(WriteOp::SetValues { writes })?;
    }
    pb.finish_and_clear();
    let load_secs = t0.elapsed().as_secs_f64();

    let rules = rule_set();
    let define = |engine: &Engine| -> Result<f64, BoxError> {
        let t0 = Instant::now();
        for (name, definition) in &rules {
            engine.write_blocking(WriteOp::DefineRule {
                name: name.clone(),
                definition: definition.clone(),
                description: String::new(),
                category: String::new(),
                replace: false,
            })?;
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let drop_all = |engine: &Engine| -> Result<(), BoxError> {
        // Readers of other rules first.
        for (name, _) in rules.iter().rev() {
            engine.write_blocking(WriteOp::DropRule { name: name.clone() })?;
        }
        Ok(())
    };
    // Facts/s, and the p50 of one write (µs).
    let timed = |engine: &Engine, rng: &mut StdRng| -> Result<(f64, f64), BoxError> {
        let t0 = Instant::now();
        let mut n = 0u64;
        let mut h = Histogram::<u64>::new(3)?;
        while t0.elapsed().as_secs_f64() < seconds {
            let writes = facts(rng, WRITE_BATCH, customers, day);
            let w = Instant::now();
            engine.write_blocking(WriteOp::SetValues { writes })?;
            h.record((w.elapsed().as_micros() as u64).max(1))?;
            n += 1;
        }
        Ok((
            n as f64 * WRITE_BATCH as f64 / t0.elapsed().as_secs_f64(),
            h.value_at_quantile(0.5) as f64,
        ))
    };
    let (mut off, mut on, mut define_secs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..2 {
        off.push(timed(&engine, &mut rng)?);
        define_secs.push(define(&engine)?);
        on.push(timed(&engine, &mut rng)?);
        if round == 0 {
            drop_all(&engine)?;
        }
    }

    // The day turns; counts are read on another thread before and while.
    let reading = Arc::new(AtomicBool::new(true));
    let during = Arc::new(AtomicBool::new(false));
    let reader = {
        let (engine, reading, during) = (engine.clone(), reading.clone(), during.clone());
        std::thread::spawn(move || -> (Histogram<u64>, Histogram<u64>) {
            let mut idle = Histogram::<u64>::new(3).expect("histogram");
            let mut turn = Histogram::<u64>::new(3).expect("histogram");
            while reading.load(Ordering::Relaxed) {
                let in_turn = during.load(Ordering::Relaxed);
                let t0 = Instant::now();
                let snap = engine.snapshot();
                if let Ok(q) = Query::compile("spend_3 AND NOT lapsing_2 AND active_1", &snap) {
                    std::hint::black_box(q.count());
                }
                let us = t0.elapsed().as_micros() as u64;
                let h = if in_turn { &mut turn } else { &mut idle };
                let _ = h.record(us.max(1));
            }
            (idle, turn)
        })
    };
    std::thread::sleep(std::time::Duration::from_secs_f64(seconds.min(3.0)));
    let before = engine.snapshot();
    clock.advance_ms(DAY_MS);
    during.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    engine.write_blocking(WriteOp::TurnRuleDays)?;
    let turn_secs = t0.elapsed().as_secs_f64();
    during.store(false, Ordering::Relaxed);
    reading.store(false, Ordering::Relaxed);
    let (idle, turn) = reader.join().map_err(|_| "the reader thread panicked")?;
    let after = engine.snapshot();
    let turned_rules = after
        .rules
        .by_name
        .values()
        .filter(|r| before.rules.get(&r.name).is_some_and(|b| b.day < r.day))
        .count();
    engine.shutdown()?;
    Ok(Figures {
        customers,
        load_secs,
        define_secs,
        off,
        on,
        turn_secs,
        turned_rules,
        idle_p50: idle.value_at_quantile(0.5) as f64,
        idle_p99: idle.value_at_quantile(0.99) as f64,
        turn_p50: turn.value_at_quantile(0.5) as f64,
        turn_p99: turn.value_at_quantile(0.99) as f64,
        turn_max: turn.max() as f64,
        reads_during_turn: turn.len(),
    })
}

fn clock_now(clock: &ManualClock) -> i64 {
    tagstore::clock::Clock::now_ms(clock)
}

impl Bench {
    pub(crate) async fn rules(&mut self) -> Result<(), BoxError> {
        let dir = self.work.join("rules");
        let (customers, seconds, seed) = (self.data.customers, self.cli.seconds, self.cli.seed);
        let f = tokio::task::spawn_blocking(move || run(dir, customers, seconds, seed)).await??;
        let r = &mut self.report;
        let m = |n: u32| format!("{:.1}M", f64::from(n) / 1e6);
        r.add(
            "rules",
            &format!("load facts of {} customers (in-process): s", m(f.customers)),
            "s",
            Better::Lower,
            Some(f.load_secs),
            None,
        );
        for (i, (((off, off_p50), (on, on_p50)), define)) in
            f.off.iter().zip(&f.on).zip(&f.define_secs).enumerate()
        {
            r.add(
                "rules",
                &format!("round {}: facts/s in writes of 1,000, no rules", i + 1),
                "/s",
                Better::Higher,
                Some(*off),
                None,
            );
            r.add(
                "rules",
                &format!("round {}: the same with 50 rules", i + 1),
                "/s",
                Better::Higher,
                Some(*on),
                None,
            );
            r.add(
                "rules",
                &format!("round {}: one write, p50: no rules", i + 1),
                "µs",
                Better::Lower,
                Some(*off_p50),
                None,
            );
            r.add(
                "rules",
                &format!("round {}: one write, p50: with 50 rules", i + 1),
                "µs",
                Better::Lower,
                Some(*on_p50),
                None,
            );
            r.add(
                "rules",
                &format!("round {}: with ÷ without (target ≥ 0.5)", i + 1),
                "×",
                Better::Higher,
                Some(on / off),
                None,
            );
            r.add(
                "rules",
                &format!("round {}: define the 50 rules (everyone evaluated)", i + 1),
                "s",
                Better::Lower,
                Some(*define),
                None,
            );
        }
        r.add(
            "rules",
            &format!("turn of the day, {} rules turned", f.turned_rules),
            "s",
            Better::Lower,
            Some(f.turn_secs),
            None,
        );
        r.add(
            "rules",
            "a 3-rule count before the turn: p50",
            "µs",
            Better::Lower,
            Some(f.idle_p50),
            None,
        );
        r.add(
            "rules",
            "… p99",
            "µs",
            Better::Lower,
            Some(f.idle_p99),
            None,
        );
        r.add(
            "rules",
            &format!("… while the day turns: p50 ({} reads)", f.reads_during_turn),
            "µs",
            Better::Lower,
            Some(f.turn_p50),
            None,
        );
        r.add(
            "rules",
            "… while the day turns: p99",
            "µs",
            Better::Lower,
            Some(f.turn_p99),
            None,
        );
        r.add(
            "rules",
            "… while the day turns: max",
            "µs",
            Better::Lower,
            Some(f.turn_max),
            None,
        );
        Ok(())
    }
}
