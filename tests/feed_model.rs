//! The change feed at the engine's level (randomized, in memory): a mirror
//! built only from the feed's entries, read from a kept position, must
//! equal the store's tags, rule tags and enumerated values after random
//! writes, erasures, a tag dropped and made again, checkpoints, clean
//! restarts and crashes (the store reopened from what was synced: the
//! feed's unsynced tail is lost and must be worked out again from the log),
//! with feed files small enough to rotate often. Every entry must be
//! possible when read (no one enters what they are in, or leaves what they
//! are not in), so nothing comes twice and nothing is missed.
//!
//! `TAGSTORE_SEED=n` replays one run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::fields::FieldKind;
use tagstore::rules::Definition;
use tagstore::storage::feed::ReadError;
use tagstore::storage::feed::{FeedConfig, Subject};
use tagstore::storage::fs::{FileSystem, MemFs};
use tagstore::storage::{
    CheckpointOptions, Engine, EngineConfig, Mutation, SyncMode, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
const TAGS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 3] = ["x", "y", "z"];

fn open(fs: &MemFs, sync: SyncMode) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.sync = sync;
    cfg.feed = FeedConfig {
        retention_bytes: 1 << 30,
        retention_ms: 0,
        file_bytes: 2048,
    };
    Engine::open(cfg).unwrap()
}

fn key(s: &Subject) -> String {
    match s {
        Subject::Tag(t) => format!("tag:{t}"),
        Subject::Value { field, value } => format!("{field}={value}"),
    }
}

/// Reads the feed from `pos` to its end into `mirror`; returns the new
/// position.
fn follow(engine: &Engine, pos: u64, mirror: &mut BTreeMap<String, BTreeSet<u32>>) -> u64 {
    let mut reader = engine
        .feed_reader(pos)
        .unwrap_or_else(|e| panic!("reader from {pos}: {e:?}"));
    loop {
        let entries = reader.next(1 << 12).unwrap();
        if entries.is_empty() {
            return reader.position();
        }
        for e in entries {
            for c in &e.changes {
                let k = key(c.subject());
                if c.dropped {
                    mirror.remove(&k);
                    continue;
                }
                let set = mirror.entry(k.clone()).or_default();
                for id in c.entered.iter() {
                    assert!(set.insert(id), "lsn {}: {id} entered {k} again", e.lsn);
                }
                for id in c.left.iter() {
                    assert!(set.remove(&id), "lsn {}: {id} left {k}, not in it", e.lsn);
                }
            }
        }
    }
}

/// The store's memberships of every tag and enumerated value.
fn truth(engine: &Engine) -> BTreeMap<String, BTreeSet<u32>> {
    let mut out = common::memberships(&engine.snapshot());
    out.retain(|_, v| !v.is_empty());
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

fn run(seed: u64, sync: SyncMode) -> u32 {
    let mut fs = MemFs::new();
    let mut engine = open(&fs, sync);
    let start = engine.feed_view().end;
    for t in TAGS {
        create_tag(&engine, t);
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
    engine
        .write_blocking(WriteOp::DefineRule {
            name: "r".into(),
            definition: Definition {
                query: "a AND NOT b OR e = 'x'".into(),
                ..Default::default()
            },
            description: String::new(),
            category: String::new(),
            replace: false,
        })
        .unwrap();
    // The set-up is durable, with or without syncs.
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mirror = BTreeMap::new();
    let mut pos = start;
    let mut resyncs = 0;
    let k = |rng: &mut StdRng| format!("k{}", rng.random_range(0..50));
    for step in 0..300 {
        let label = format!("seed {seed}, sync {sync:?}, step {step}");
        match rng.random_range(0..20) {
            0..=8 => {
                let mutations = (0..rng.random_range(1..3))
                    .map(|_| Mutation {
                        tag: TAGS[rng.random_range(0..3)].into(),
                        add: (0..rng.random_range(1..5)).map(|_| k(&mut rng)).collect(),
                        remove: (0..rng.random_range(0..3)).map(|_| k(&mut rng)).collect(),
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
            9..=11 => {
                let customers: Vec<String> = (0..3).map(|_| k(&mut rng)).collect();
                engine
                    .write_blocking(WriteOp::CreateCustomers {
                        customers: customers.clone(),
                    })
                    .unwrap();
                let writes = customers
                    .into_iter()
                    .map(|customer| ValueWrite::Enum {
                        field: "e".into(),
                        customer,
                        value: (!rng.random_bool(0.2))
                            .then(|| VALUES[rng.random_range(0..3)].to_string()),
                    })
                    .collect();
                engine
                    .write_blocking(WriteOp::SetValues { writes })
                    .unwrap();
            }
            12 => {
                engine
                    .write_blocking(WriteOp::Replace {
                        tag: TAGS[rng.random_range(0..3)].into(),
                        customers: (0..rng.random_range(0..8)).map(|_| k(&mut rng)).collect(),
                        create_missing_tag: false,
                    })
                    .unwrap();
            }
            13 => {
                engine
                    .write_blocking(WriteOp::DeleteCustomers {
                        customers: vec![k(&mut rng)],
                    })
                    .unwrap();
            }
            14 => {
                // `c` is read by no rule: it may go and come back.
                engine
                    .write_blocking(WriteOp::DropTag { name: "c".into() })
                    .unwrap();
                create_tag(&engine, "c");
            }
            15 | 16 => {
                engine
                    .checkpoint_blocking(CheckpointOptions::default())
                    .unwrap();
            }
            17 => {
                drop(engine);
                engine = open(&fs, sync);
            }
            _ => {
                // A crash: what was synced survives, the feed's tail may not.
                let image = fs.crash_image();
                drop(engine);
                fs = image;
                engine = open(&fs, sync);
                // The feed never claims a write the log lost.
                assert_eq!(engine.feed_view().end, engine.snapshot().lsn, "{label}");
                if sync == SyncMode::Never {
                    // Without syncs a crash may lose acknowledged writes
                    // (and their positions are given again): a watcher of
                    // such a store resynchronises after every crash. One
                    // that is ahead of the store is told so.
                    if pos > engine.feed_view().end {
                        let Err(ReadError::Expired(why)) = engine.feed_reader(pos) else {
                            panic!("{label}: a reader ahead of the store");
                        };
                        assert!(why.contains("ahead of the store"), "{label}: {why}");
                        resyncs += 1;
                    }
                    mirror = truth(&engine);
                    pos = engine.feed_view().end;
                }
            }
        }
        if rng.random_bool(0.3) || step == 299 {
            pos = follow(&engine, pos, &mut mirror);
            assert_eq!(
                mirror
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
                truth(&engine),
                "{label}"
            );
        }
    }
    assert!(engine.feed_view().files.len() > 2, "the feed never rotated");
    resyncs
}

#[test]
fn a_mirror_of_the_feed_equals_the_store_across_restarts_and_crashes() {
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().expect("TAGSTORE_SEED is a number")],
        Err(_) => (1..=6).collect(),
    };
    for seed in &seeds {
        run(*seed, SyncMode::Always);
    }
    // Without syncs (bulk loads): a crash may lose acknowledged writes; the
    // feed never claims one the log lost, and a watcher that saw one is
    // told to resynchronise.
    let resyncs: u32 = seeds.iter().map(|s| run(*s, SyncMode::Never)).sum();
    if std::env::var("TAGSTORE_SEED").is_err() {
        assert!(resyncs > 0, "no crash lost a write the watcher had seen");
    }
}

fn add(engine: &Engine, tag: &str, customer: &str) -> u64 {
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: vec![customer.into()],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .unwrap()
        .lsn
}

/// The entries a reader from `after` finds now, as (lsn, who entered `a`).
fn entered_a(engine: &Engine, after: u64) -> Vec<(u64, Vec<u32>)> {
    let mut reader = engine.feed_reader(after).unwrap();
    let mut out = Vec::new();
    loop {
        let entries = reader.next(1 << 20).unwrap();
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            for c in &e.changes {
                if key(c.subject()) == "tag:a" {
                    out.push((e.lsn, c.entered.iter().collect()));
                }
            }
        }
    }
}

/// A write's feed entry goes to its file while the log's record is synced,
/// before the sync returns: no reader sees it until the write is
/// acknowledged, and a crash that keeps the entry (its page written back)
/// but loses the log's record has it cut, so that the position goes to the
/// next write with that write's entry and no other.
#[test]
fn an_entry_written_before_its_logs_sync_is_shown_after_it_and_cut_if_the_log_lost_it() {
    let fs = MemFs::new();
    let engine = Arc::new(open(&fs, SyncMode::Always));
    create_tag(&engine, "a");
    let first = add(&engine, "a", "x");
    let x = engine.snapshot().dict.lookup("x").unwrap().unwrap();
    let hold = fs.hold_syncs("wal-");
    let writer = {
        let engine = engine.clone();
        std::thread::spawn(move || add(&engine, "a", "y"))
    };
    while hold.waiting() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The write of y waits for its log's sync: its entry is in the feed's
    // file, and no reader is shown it.
    assert_eq!(engine.feed_view().end, first);
    assert!(entered_a(&engine, first).is_empty());
    let image = fs.crash_image_written_back("feed-");
    drop(hold);
    let second = writer.join().unwrap();
    assert_eq!(second, first + 1);
    let y = engine.snapshot().dict.lookup("y").unwrap().unwrap();
    assert_eq!(entered_a(&engine, first), vec![(second, vec![y])]);
    drop(engine);

    // The crash kept y's entry and lost y's record in the log.
    let engine = open(&image, SyncMode::Always);
    assert_eq!(engine.snapshot().lsn, first, "the log lost y's write");
    let note = engine.recovery().feed_note.clone().unwrap_or_default();
    assert!(
        note.contains(&format!("records from lsn {second} cut")),
        "{note:?}"
    );
    assert_eq!(engine.feed_view().end, first);
    let z_lsn = add(&engine, "a", "z");
    assert_eq!(z_lsn, second, "the lost position goes to the next write");
    let z = engine.snapshot().dict.lookup("z").unwrap().unwrap();
    assert_eq!(entered_a(&engine, first), vec![(z_lsn, vec![z])]);
    assert_eq!(entered_a(&engine, 0).first(), Some(&(first, vec![x])));
}

/// A start checks the files of older writes frame by frame (their
/// checksums), without decoding their changes: undamaged, every entry
/// reads back after the restart; a flipped byte in the oldest file is
/// still found, and the feed starts again naming it.
#[test]
fn a_start_checks_every_feed_file_and_finds_a_flipped_byte_in_an_old_one() {
    let fs = MemFs::new();
    let engine = open(&fs, SyncMode::Always);
    create_tag(&engine, "a");
    let first = add(&engine, "a", "k0");
    for i in 1..120 {
        add(&engine, "a", &format!("k{i}"));
    }
    let files = engine.feed_view().files.clone();
    assert!(files.len() > 2, "the feed never rotated: {files:?}");
    drop(engine);
    let engine = open(&fs, SyncMode::Always);
    assert_eq!(engine.recovery().feed_note, None);
    assert_eq!(entered_a(&engine, first - 1).len(), 120);
    drop(engine);
    let path = std::path::Path::new(DIR).join(format!("feed-{:016x}.log", files[0]));
    let mut data = fs.read(&path).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x40;
    fs.create(&path, tagstore::storage::fs::Create::Truncate)
        .unwrap()
        .write_at(&data, 0)
        .unwrap();
    let engine = open(&fs, SyncMode::Always);
    let note = engine.recovery().feed_note.clone().unwrap_or_default();
    assert!(
        note.contains("the feed starts again")
            && note.contains(&format!("feed-{:016x}.log", files[0])),
        "{note:?}"
    );
}
