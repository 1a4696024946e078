//! The engine's one clock, moved by hand across a local midnight and a month
//! end in Asia/Shanghai: behaviour days, `WITHIN` windows, events from the
//! future, month roll-ups and retention all follow it, and so do the times
//! writes record. Nothing here reads the machine's clock.

use std::path::Path;
use std::sync::Arc;

use tagstore::clock::{Clock, ManualClock};
use tagstore::error::QueryErrorKind;
use tagstore::fields::time::days_from_civil;
use tagstore::fields::{BehaviourSpec, FieldKind};
use tagstore::query::Query;
use tagstore::storage::{Engine, EngineConfig, EventTime, ValueWrite, WriteOp};

const DAY_MS: i64 = 86_400_000;
/// Asia/Shanghai is UTC+8 all year (no daylight saving time).
const SHANGHAI_MS: i64 = 8 * 3_600_000;

/// Unix ms of the local time `y-m-d hh:mm` in Asia/Shanghai.
fn shanghai(y: i64, m: u32, d: u32, hh: i64, mm: i64) -> i64 {
    days_from_civil(y, m, d) * DAY_MS + (hh * 60 + mm) * 60_000 - SHANGHAI_MS
}

fn open(dir: &Path, clock: &Arc<ManualClock>) -> Engine {
    let mut config = EngineConfig::new(dir);
    config.clock = clock.clone();
    Engine::open(config).unwrap()
}

fn count(engine: &Engine, q: &str) -> tagstore::Result<u64> {
    let snap = engine.snapshot();
    Ok(Query::compile_at(q, &snap, engine.now_ms())?.count())
}

fn event(engine: &Engine, customer: &str, at: EventTime) -> tagstore::Result<()> {
    engine
        .write_blocking(WriteOp::SetValues {
            writes: vec![ValueWrite::Event {
                field: "viewed".into(),
                customer: customer.into(),
                at,
            }],
        })
        .map(|_| ())
}

#[test]
fn days_windows_roll_ups_and_retention_follow_the_engines_clock() {
    let dir = tempfile::tempdir().unwrap();
    // One minute before midnight on the last day of November, local time.
    let clock = ManualClock::at(shanghai(2026, 11, 30, 23, 59));
    let engine = open(dir.path(), &clock);
    engine
        .write_blocking(WriteOp::CreateField {
            name: "viewed".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Behaviour(BehaviourSpec {
                time_zone: "Asia/Shanghai".into(),
                retention_days: 60,
                daily_days: 3,
            }),
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
    let r = engine
        .write_blocking(WriteOp::CreateTag {
            name: "t".into(),
            description: String::new(),
            category: String::new(),
            if_not_exists: false,
        })
        .unwrap();
    assert_eq!(
        r.tag.unwrap().created_ms,
        clock.now_ms(),
        "writes record the clock's time"
    );

    // An event now falls on November 30.
    event(&engine, "a", EventTime::Ms(clock.now_ms())).unwrap();
    assert_eq!(count(&engine, "viewed WITHIN 1d").unwrap(), 1);
    assert_eq!(
        count(&engine, "viewed BETWEEN '2026-11-30' AND '2026-11-30'").unwrap(),
        1
    );

    // Two minutes later it is December 1: yesterday's event left `WITHIN 1d`.
    clock.advance_ms(2 * 60_000);
    assert_eq!(count(&engine, "viewed WITHIN 1d").unwrap(), 0);
    assert_eq!(count(&engine, "viewed WITHIN 2d").unwrap(), 1);
    event(&engine, "b", EventTime::Ms(clock.now_ms())).unwrap();
    assert_eq!(
        count(&engine, "viewed BETWEEN '2026-12-01' AND '2026-12-01'").unwrap(),
        1
    );

    // "A day ahead" is measured by this clock too.
    let tomorrow = days_from_civil(2026, 12, 2) as i32;
    event(&engine, "c", EventTime::Day(tomorrow)).unwrap();
    assert!(event(&engine, "c", EventTime::Day(tomorrow + 1)).is_err());
    assert!(event(&engine, "c", EventTime::Ms(clock.now_ms() + 2 * DAY_MS)).is_err());

    // December 5: November is older than the 3 daily days. The checkpoint
    // rolls it up into one month bucket; a window that cuts it is refused,
    // and whole-month questions still answer.
    clock.set(shanghai(2026, 12, 5, 0, 1));
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(
        count(&engine, "viewed BETWEEN '2026-11-01' AND '2026-11-30'").unwrap(),
        1
    );
    match count(&engine, "COUNT(viewed WITHIN 10d) >= 1") {
        Err(tagstore::Error::Query { kind, .. }) => assert_eq!(kind, QueryErrorKind::Type),
        other => panic!("a window cutting a rolled-up month must be refused: {other:?}"),
    }
    assert_eq!(count(&engine, "viewed WITHIN 5d").unwrap(), 2, "b and c");

    // The same after a restart, on the same clock.
    drop(engine);
    let engine = open(dir.path(), &clock);
    assert_eq!(count(&engine, "viewed").unwrap(), 3);
    assert_eq!(count(&engine, "viewed WITHIN 5d").unwrap(), 2);

    // January 30, 2027: the first day kept (60 days, today counting) is
    // December 2. November and December 1 have expired, before any
    // checkpoint drops them and after.
    clock.set(shanghai(2027, 1, 30, 12, 0));
    assert_eq!(count(&engine, "viewed").unwrap(), 1, "only c (December 2)");
    // This checkpoint rolls December up as well: from now on c is kept for
    // as long as the month's last day is, December 31.
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(count(&engine, "viewed").unwrap(), 1);
    // February 28, 2027: the first day kept is December 31.
    clock.set(shanghai(2027, 2, 28, 23, 59));
    assert_eq!(count(&engine, "viewed").unwrap(), 1);
    // Two minutes later, March 1: the first day kept is January 1.
    clock.advance_ms(2 * 60_000);
    assert_eq!(count(&engine, "viewed").unwrap(), 0);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(count(&engine, "viewed").unwrap(), 0);
}
