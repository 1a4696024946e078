//! Reads as of the past at the engine's level (randomized, in memory):
//! random writes (tags, enumerated values, erasures, a tag dropped and
//! made again) over three weeks of a manual clock, checkpoints (which
//! compact and move what they no longer need into the history), clean
//! restarts, and a retention of five days. Every read as of a position
//! must equal the model's state right after that write; as of a day, the
//! state after the last write made before the day ended (local time);
//! customers erased since are gone from both (an erasure is not undone by
//! reading the past).
//! A moment outside the history is refused with `OutOfRange`, and only
//! when it lies before the retention; the history's files stay bounded.
//! Half the runs keep a version every 200 bytes of log as well as daily.
//!
//! `TAGSTORE_SEED=n` replays one run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::clock::{Clock, ManualClock};
use tagstore::error::Error;
use tagstore::fields::FieldKind;
use tagstore::fields::time::{day_of, day_start_ms, days_from_civil, zone};
use tagstore::storage::fs::{FileSystem, MemFs};
use tagstore::storage::versions::read::AsOf;
use tagstore::storage::{CheckpointOptions, Engine, EngineConfig, Mutation, ValueWrite, WriteOp};

const DIR: &str = "/mem/store";
const TAGS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 3] = ["x", "y", "z"];
const DAYS_KEPT: u32 = 5;
const HOUR_MS: i64 = 3_600_000;

type State = BTreeMap<String, BTreeSet<u32>>;

/// Even seeds also keep a version every 200 bytes of log (several a day).
fn open(fs: &MemFs, clock: &Arc<ManualClock>, seed: u64) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    cfg.history_days = DAYS_KEPT;
    if seed.is_multiple_of(2) {
        cfg.history_version_bytes = 200;
    }
    Engine::open(cfg).unwrap()
}

fn state_of(snap: &tagstore::storage::Snapshot) -> State {
    let mut out = common::memberships(snap);
    out.insert("live".into(), snap.live().unwrap().iter().collect());
    out
}

fn create_tag(engine: &Engine, name: &str) {
    engine
        .write_blocking(WriteOp::CreateTag {
            name: name.into(),
            description: String::new(),
            category: String::new(),
            if_not_exists: false,
        })
        .unwrap();
}

fn random_write(engine: &Engine, rng: &mut StdRng) {
    let k = |rng: &mut StdRng| format!("k{}", rng.random_range(0..60));
    match rng.random_range(0..11) {
        0..=6 => {
            let mutations = (0..rng.random_range(1..3))
                .map(|_| Mutation {
                    tag: TAGS[rng.random_range(0..3)].into(),
                    add: (0..rng.random_range(1..6)).map(|_| k(rng)).collect(),
                    remove: (0..rng.random_range(0..3)).map(|_| k(rng)).collect(),
                    ..Default::default()
                })
                .collect();
            engine
                .write_blocking(WriteOp::Update {
                    mutations,
                    create_missing_tags: false,
                })
                .unwrap();
        }
        7..=8 => {
            let writes = (0..3)
                .map(|_| ValueWrite::Enum {
                    field: "e".into(),
                    customer: k(rng),
                    value: (!rng.random_bool(0.2)).then(|| VALUES[rng.random_range(0..3)].into()),
                })
                .collect();
            engine
                .write_blocking(WriteOp::SetValues { writes })
                .unwrap();
        }
        9 => {
            engine
                .write_blocking(WriteOp::DeleteCustomers {
                    customers: vec![k(rng)],
                })
                .unwrap();
        }
        _ => {
            engine
                .write_blocking(WriteOp::DropTag { name: "c".into() })
                .unwrap();
            create_tag(engine, "c");
        }
    }
}

/// The tags and the enumerated field the random writes use.
fn create_tags_and_field(engine: &Engine) {
    for t in TAGS {
        create_tag(engine, t);
    }
    engine
        .write_blocking(WriteOp::CreateField {
            name: "e".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Enum {
                values: VALUES.iter().map(|v| v.to_string()).collect(),
            },
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
}

/// Bytes of the files in `dir` of `fs` (0 when it does not exist).
fn bytes_in(fs: &MemFs, dir: &str) -> u64 {
    fs.list(Path::new(dir))
        .map(|l| l.iter().map(|e| e.len).sum())
        .unwrap_or(0)
}

/// A past state as it is read now: the customers erased since are gone
/// from it too (an erasure is not undone by reading the past).
fn erased_since(then: &State, now_live: &BTreeSet<u32>) -> State {
    let gone: BTreeSet<u32> = then["live"].difference(now_live).copied().collect();
    then.iter()
        .map(|(k, v)| (k.clone(), v.difference(&gone).copied().collect()))
        .collect()
}

/// Every moment of `model` the engine can be asked about, checked.
/// Returns how many reads were answered.
fn check(engine: &Engine, model: &[(u64, i64, State)], clock: &ManualClock, seed: u64) -> usize {
    let z = zone("Asia/Shanghai").unwrap();
    let now = clock.now_ms();
    let today = day_of(now, &z).unwrap();
    // Anything made since the start of this day is within the retention.
    let kept_from = day_start_ms(today - DAYS_KEPT as i32, &z).unwrap();
    let now_live: BTreeSet<u32> = engine.snapshot().live().unwrap().iter().collect();
    let mut answered = 0;
    for (lsn, at_ms, then) in model {
        let want = &erased_since(then, &now_live);
        match engine.as_of(AsOf::Position(*lsn)) {
            Ok(past) => {
                assert_eq!(past.snap.lsn, *lsn, "seed {seed}: position {lsn}");
                assert_eq!(
                    &state_of(&past.snap),
                    want,
                    "seed {seed}: as of position {lsn}"
                );
                answered += 1;
            }
            Err(Error::OutOfRange(why)) => assert!(
                *at_ms < kept_from,
                "seed {seed}: position {lsn} (made at {at_ms}, within the retention from \
                 {kept_from}) refused: {why}"
            ),
            Err(e) => panic!("seed {seed}: as of position {lsn}: {e}"),
        }
    }
    let first_day = day_of(model[0].1, &z).unwrap();
    for day in first_day..=today {
        let end = day_start_ms(day + 1, &z).unwrap();
        match engine.as_of(AsOf::Day(day)) {
            Ok(past) => {
                assert!(
                    end <= now,
                    "seed {seed}: day {day} answered before it ended"
                );
                let want = model
                    .iter()
                    .rev()
                    .find(|(_, at, _)| *at < end)
                    .map(|m| &m.2)
                    .unwrap();
                assert_eq!(
                    state_of(&past.snap),
                    erased_since(want, &now_live),
                    "seed {seed}: as of day {day}"
                );
                assert_eq!(past.now_ms, end - 1, "seed {seed}: day {day}'s now");
                answered += 1;
            }
            Err(Error::OutOfRange(why)) => assert!(
                end > now || end <= kept_from,
                "seed {seed}: day {day} (within the retention) refused: {why}"
            ),
            Err(e) => panic!("seed {seed}: as of day {day}: {e}"),
        }
    }
    // Ahead of the store: refused.
    let newest = model.last().unwrap().0;
    assert!(matches!(
        engine.as_of(AsOf::Position(newest + 1)),
        Err(Error::OutOfRange(_))
    ));
    answered
}

fn run(seed: u64) -> usize {
    let fs = MemFs::new();
    // Nine in the morning, local time, on the first of November.
    let clock = ManualClock::at(days_from_civil(2026, 11, 1) * 86_400_000 + HOUR_MS);
    let mut engine = open(&fs, &clock, seed);
    let mut rng = StdRng::seed_from_u64(seed);
    create_tags_and_field(&engine);
    // The first checkpoint is the first version: history begins there.
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let mut model: Vec<(u64, i64, State)> = Vec::new();
    let snap = engine.snapshot();
    model.push((snap.lsn, clock.now_ms(), state_of(&snap)));
    let mut answered = 0;
    let mut most_history = 0;
    for step in 0..400 {
        random_write(&engine, &mut rng);
        let snap = engine.snapshot();
        model.push((snap.lsn, clock.now_ms(), state_of(&snap)));
        // About a day every 6 steps: 400 steps cross about three weeks.
        clock.advance_ms(rng.random_range(0..8 * HOUR_MS));
        match rng.random_range(0..20) {
            0..=5 => {
                engine
                    .checkpoint_blocking(CheckpointOptions::default())
                    .unwrap();
            }
            6 => {
                engine.shutdown().unwrap();
                drop(engine);
                engine = open(&fs, &clock, seed);
            }
            _ => {}
        }
        most_history = most_history.max(bytes_in(&fs, "/mem/store/history"));
        if step % 40 == 39 {
            answered += check(&engine, &model, &clock, seed);
        }
    }
    // The history stays within its retention: about six days of a store
    // that writes three weeks, not all of it.
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let total: u64 = bytes_in(&fs, "/mem/store/history");
    assert!(
        total < most_history,
        "seed {seed}: the history holds {total} bytes, never less than its most ({most_history})"
    );
    answered += check(&engine, &model, &clock, seed);
    let (versions, _) = engine.history();
    let z = zone("Asia/Shanghai").unwrap();
    let days: BTreeSet<i32> = versions
        .iter()
        .map(|v| day_of(v.at_ms, &z).unwrap())
        .collect();
    if seed.is_multiple_of(2) {
        assert!(
            days.len() < versions.len(),
            "seed {seed}: no day has two versions"
        );
    } else {
        assert_eq!(days.len(), versions.len(), "seed {seed}: a version a day");
    }
    engine.shutdown().unwrap();
    answered
}

#[test]
fn reads_as_of_a_position_or_a_day_equal_the_model_across_checkpoints_and_restarts() {
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=4).collect(),
    };
    for seed in seeds {
        let answered = run(seed);
        eprintln!("seed {seed}: {answered} reads answered");
        assert!(
            answered > 300,
            "seed {seed}: only {answered} reads answered"
        );
    }
}

/// History turned on for a store that then changes nothing: it begins at
/// the next checkpoint all the same (one with nothing to write), and the
/// writes after it are read as of it.
#[test]
fn history_turned_on_begins_at_the_next_checkpoint_even_with_nothing_to_write() {
    let fs = MemFs::new();
    let clock = ManualClock::at(days_from_civil(2026, 11, 1) * 86_400_000 + HOUR_MS);
    let open_with = |days: u32| {
        let mut cfg = EngineConfig::new(DIR);
        cfg.fs = Arc::new(fs.clone());
        cfg.clock = clock.clone();
        cfg.history_days = days;
        Engine::open(cfg).unwrap()
    };
    let engine = open_with(0);
    create_tag(&engine, "a");
    let mut rng = StdRng::seed_from_u64(7);
    random_write(&engine, &mut rng);
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    engine.shutdown().unwrap();
    drop(engine);
    assert!(!fs.exists(Path::new("/mem/store/history")));

    let engine = open_with(DAYS_KEPT);
    let before = engine.snapshot();
    let info = engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    assert_eq!(info.lsn, before.lsn);
    let (versions, _) = engine.history();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].lsn, before.lsn);
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: "a".into(),
                add: vec!["new".into()],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .unwrap();
    let past = engine.as_of(AsOf::Position(before.lsn)).unwrap();
    assert_eq!(state_of(&past.snap), state_of(&before));
    engine.shutdown().unwrap();
}

/// A history that lost or damaged a file: reads that need it fail with
/// `Corrupt` naming what is wrong (never a wrong answer), reads that do not
/// still work, and the store starts and writes all the same.
#[test]
fn a_damaged_or_missing_history_file_fails_only_the_reads_that_need_it() {
    let fs = MemFs::new();
    let clock = ManualClock::at(days_from_civil(2026, 11, 1) * 86_400_000 + HOUR_MS);
    let mut engine = open(&fs, &clock, 1);
    create_tags_and_field(&engine);
    let mut rng = StdRng::seed_from_u64(11);
    let mut model: Vec<(u64, State)> = Vec::new();
    // Three days, a version each, and log between them.
    for _day in 0..3 {
        engine
            .checkpoint_blocking(CheckpointOptions::default())
            .unwrap();
        for _ in 0..5 {
            random_write(&engine, &mut rng);
            let snap = engine.snapshot();
            model.push((snap.lsn, state_of(&snap)));
            engine
                .checkpoint_blocking(CheckpointOptions::default())
                .unwrap();
        }
        clock.advance_ms(24 * HOUR_MS);
    }
    let (versions, _) = engine.history();
    assert_eq!(versions.len(), 3, "{versions:?}");
    let hist = Path::new("/mem/store/history");
    // A log file of the history gone: reads after the version before it
    // fail naming the gap; a read of a version's own position does not.
    let logs: Vec<_> = fs
        .list(hist)
        .unwrap()
        .into_iter()
        .filter(|e| e.name.starts_with("wal-"))
        .collect();
    let (first_version, second) = (versions[0].lsn, versions[1].lsn);
    let victim = logs
        .iter()
        .find(|e| {
            let n = u64::from_str_radix(&e.name[4..20], 16).unwrap();
            n > first_version + 1 && n <= second
        })
        .expect("a log file between the first two versions");
    fs.remove(&hist.join(&victim.name)).unwrap();
    let needing = model
        .iter()
        .find(|(lsn, _)| {
            *lsn > first_version && *lsn < second && {
                let n = u64::from_str_radix(&victim.name[4..20], 16).unwrap();
                *lsn >= n
            }
        })
        .expect("a position the missing file holds");
    match engine.as_of(AsOf::Position(needing.0)) {
        Err(Error::Corrupt { reason, .. }) => assert!(
            reason.contains("a log file of the history is missing") || reason.contains("log gap"),
            "{reason}"
        ),
        other => panic!("as of {}: {:?}", needing.0, other.map(|p| p.snap.lsn)),
    }
    for v in &versions {
        assert!(
            engine.as_of(AsOf::Position(v.lsn)).is_ok(),
            "as of version {}",
            v.lsn
        );
    }
    // The newest version damaged: reads from it fail naming its file; the
    // store restarts (passing it over) and writes.
    let newest = hist.join(format!("version-{:016x}.man", versions[2].lsn));
    let f = fs.open_write(&newest).unwrap();
    f.write_at(&[0xff], 30).unwrap();
    drop(f);
    // (A position before the newest write: the newest is read without
    // any version.)
    let later = model
        .iter()
        .find(|(lsn, _)| *lsn > versions[2].lsn)
        .unwrap();
    assert!(later.0 < engine.snapshot().lsn);
    match engine.as_of(AsOf::Position(later.0)) {
        Err(Error::Corrupt { path, .. }) => assert_eq!(path, newest),
        other => panic!("{:?}", other.map(|p| p.snap.lsn)),
    }
    engine.shutdown().unwrap();
    drop(engine);
    engine = open(&fs, &clock, 1);
    random_write(&engine, &mut rng);
    let (kept, _) = engine.history();
    assert!(kept.iter().all(|v| v.lsn != versions[2].lsn), "{kept:?}");
    // Read from the version before it instead: still exact.
    let past = engine
        .as_of(AsOf::Position(later.0))
        .unwrap_or_else(|e| panic!("{e}"));
    let now_live: BTreeSet<u32> = engine.snapshot().live().unwrap().iter().collect();
    assert_eq!(state_of(&past.snap), erased_since(&later.1, &now_live));
    engine.shutdown().unwrap();
}

/// Keeping a version fails at each of its steps (the `.tmp` file's
/// creation, write and sync, the rename, the directory sync; a full disk
/// among them): the checkpoint still completes, the store writes on and
/// restarts whole, no damaged version is left behind, and the next
/// checkpoint of the day keeps the version.
#[test]
fn a_version_that_cannot_be_written_costs_only_itself() {
    use tagstore::storage::fs::Op;
    for (op, errno) in [
        (Op::Create, libc::ENOSPC),
        (Op::Write, libc::ENOSPC),
        (Op::Sync, libc::EIO),
        (Op::Rename, libc::EIO),
        (Op::SyncDir, libc::EIO),
    ] {
        let fs = MemFs::new();
        let clock = ManualClock::at(days_from_civil(2026, 11, 1) * 86_400_000 + HOUR_MS);
        let engine = open(&fs, &clock, 1);
        create_tags_and_field(&engine);
        let mut rng = StdRng::seed_from_u64(5);
        random_write(&engine, &mut rng);
        let on = if op == Op::SyncDir {
            "history"
        } else {
            "version-"
        };
        fs.fail(op, on, 0, 1, errno);
        let first = engine
            .checkpoint_blocking(CheckpointOptions::default())
            .unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert_eq!(fs.faults_pending(), 0, "{op:?}: the fault was not reached");
        let kept = engine.history().0;
        assert!(
            kept.iter().all(|v| v.lsn != first.lsn) || op == Op::SyncDir,
            "{op:?}: {kept:?}"
        );
        random_write(&engine, &mut rng);
        let want = state_of(&engine.snapshot());
        engine
            .checkpoint_blocking(CheckpointOptions::default())
            .unwrap();
        assert!(
            !engine.history().0.is_empty(),
            "{op:?}: the next checkpoint keeps one"
        );
        engine.shutdown().unwrap();
        drop(engine);
        let engine = open(&fs, &clock, 1);
        assert_eq!(state_of(&engine.snapshot()), want, "{op:?}");
        for v in engine.history().0 {
            engine
                .as_of(AsOf::Position(v.lsn))
                .unwrap_or_else(|e| panic!("{op:?}: as of version {}: {e}", v.lsn));
        }
        engine.shutdown().unwrap();
    }
}
