//! Saved audiences against a simple model (randomized, at the engine's
//! level): random tags over a small key space; random saved audiences whose
//! queries combine tags and earlier audiences with AND, OR and NOT; random
//! redefinitions, membership changes and restarts (from what was synced).
//! After every step, each audience's members are exactly the model's: its
//! definition evaluated over sets, following the audiences it uses as they
//! are defined now.
//!
//! `TAGSTORE_SEED=n` replays one run.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::names::quote_tag_name;
use tagstore::query::{Query, parse, saved_audiences_in};
use tagstore::storage::fs::MemFs;
use tagstore::storage::record::AudienceDef;
use tagstore::storage::{Engine, EngineConfig, Mutation, WriteOp};

const DIR: &str = "/mem/store";
const TAGS: [&str; 5] = ["高价值用户", "常购护肤品", "a", "with space", "社交活跃"];

/// A query as a tree, for the model.
#[derive(Clone, Debug)]
enum Q {
    Name(String),
    Not(Box<Q>),
    And(Box<Q>, Box<Q>),
    Or(Box<Q>, Box<Q>),
}

impl Q {
    fn text(&self) -> String {
        match self {
            Q::Name(n) => quote_tag_name(n),
            Q::Not(x) => format!("NOT ({})", x.text()),
            Q::And(a, b) => format!("({}) AND ({})", a.text(), b.text()),
            Q::Or(a, b) => format!("({}) OR ({})", a.text(), b.text()),
        }
    }
}

#[derive(Default)]
struct Model {
    tags: BTreeMap<String, BTreeSet<String>>,
    live: BTreeSet<String>,
    audiences: BTreeMap<String, Q>,
    /// The audiences kept current (by a rule tag of their name).
    kept: BTreeSet<String>,
}

impl Model {
    fn eval(&self, q: &Q) -> BTreeSet<String> {
        match q {
            Q::Name(n) => match self.audiences.get(n) {
                Some(def) => self.eval(def),
                None => self.tags.get(n).cloned().unwrap_or_default(),
            },
            Q::Not(x) => self.live.difference(&self.eval(x)).cloned().collect(),
            Q::And(a, b) => self.eval(a).intersection(&self.eval(b)).cloned().collect(),
            Q::Or(a, b) => self.eval(a).union(&self.eval(b)).cloned().collect(),
        }
    }

    /// Whether audience `name` is used by `by` (directly or not).
    fn reaches(&self, q: &Q, name: &str) -> bool {
        match q {
            Q::Name(n) if n == name => true,
            Q::Name(n) => self.audiences.get(n).is_some_and(|d| self.reaches(d, name)),
            Q::Not(x) => self.reaches(x, name),
            Q::And(a, b) | Q::Or(a, b) => self.reaches(a, name) || self.reaches(b, name),
        }
    }
}

fn open(fs: &MemFs) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = std::sync::Arc::new(fs.clone());
    Engine::open(cfg).unwrap()
}

fn random_q(rng: &mut StdRng, names: &[String], depth: u32) -> Q {
    if depth == 0 || rng.random_bool(0.3) {
        return Q::Name(names[rng.random_range(0..names.len())].clone());
    }
    match rng.random_range(0..3) {
        0 => Q::Not(Box::new(random_q(rng, names, depth - 1))),
        1 => Q::And(
            Box::new(random_q(rng, names, depth - 1)),
            Box::new(random_q(rng, names, depth - 1)),
        ),
        _ => Q::Or(
            Box::new(random_q(rng, names, depth - 1)),
            Box::new(random_q(rng, names, depth - 1)),
        ),
    }
}

fn members(engine: &Engine, text: &str) -> BTreeSet<String> {
    let snap = engine.snapshot();
    let q = Query::compile(text, &snap).unwrap_or_else(|e| panic!("{text}: {e}"));
    let (ids, more) = q.page(None, 100_000);
    assert!(!more);
    let mut keys = Vec::new();
    snap.dict.keys_of(&ids, &mut keys).unwrap();
    keys.into_iter().collect()
}

/// Saves `name` as `q` through the engine, as the server does (the query
/// layer names the audiences it uses).
fn save(engine: &Engine, name: &str, q: &Q, kept_current: bool) -> tagstore::Result<()> {
    let text = q.text();
    let uses = saved_audiences_in(&parse(&text)?, &engine.snapshot());
    engine
        .write_blocking(WriteOp::PutAudience {
            name: name.into(),
            definition: AudienceDef {
                query: text,
                uses,
                ..Default::default()
            },
            replace: true,
            kept_current,
        })
        .map(|_| ())
}

fn check(engine: &Engine, m: &Model, seed: u64, step: &str) {
    let snap = engine.snapshot();
    for (name, def) in &m.audiences {
        // A kept audience is read from its rule tag (the name finds the
        // tag first), so what is compared below is what the rule kept.
        assert_eq!(
            snap.tag(name).is_some() && snap.rules.get(name).is_some(),
            m.kept.contains(name),
            "seed {seed}, {step}: audience {name} kept current"
        );
        assert_eq!(
            members(engine, &quote_tag_name(name)),
            m.eval(def),
            "seed {seed}, {step}: audience {name} = {}",
            def.text()
        );
    }
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fs = MemFs::new();
    let mut engine = open(&fs);
    let mut m = Model::default();
    let key = |rng: &mut StdRng| format!("k{}", rng.random_range(0..60));
    for step in 0..60 {
        match rng.random_range(0..10) {
            // Memberships change (the audiences follow).
            0..=3 => {
                let tag = TAGS[rng.random_range(0..TAGS.len())];
                let add: Vec<String> = (0..rng.random_range(1..8)).map(|_| key(&mut rng)).collect();
                // A key both added and removed in one mutation is left out:
                // this model is about audiences, not that rule.
                let remove: Vec<String> = (0..rng.random_range(0..4))
                    .map(|_| key(&mut rng))
                    .filter(|k| !add.contains(k))
                    .collect();
                engine
                    .write_blocking(WriteOp::Update {
                        mutations: vec![Mutation {
                            tag: tag.into(),
                            add: add.clone(),
                            remove: remove.clone(),
                            ..Default::default()
                        }],
                        create_missing_tags: true,
                    })
                    .unwrap();
                let set = m.tags.entry(tag.into()).or_default();
                for k in &remove {
                    set.remove(k);
                }
                for k in add {
                    m.live.insert(k.clone());
                    set.insert(k);
                }
            }
            // A new audience, or a redefinition (refused when it would use
            // itself).
            4..=8 => {
                let mut names: Vec<String> = m.tags.keys().cloned().collect();
                if names.is_empty() {
                    continue;
                }
                names.extend(m.audiences.keys().cloned());
                let name = if m.audiences.is_empty() || rng.random_bool(0.7) {
                    format!("aud{step}")
                } else {
                    let all: Vec<&String> = m.audiences.keys().collect();
                    all[rng.random_range(0..all.len())].clone()
                };
                let q = random_q(&mut rng, &names, 3);
                let cycle = m.reaches(&q, &name);
                let kept = rng.random_bool(0.5);
                // A kept audience reads what the audiences it uses are
                // now: they cannot be redefined under it.
                let read_by_kept = m.audiences.contains_key(&name)
                    && m.kept.iter().any(|k| {
                        k != &name && m.audiences.get(k).is_some_and(|d| m.reaches(d, &name))
                    });
                match save(&engine, &name, &q, kept) {
                    Ok(()) => {
                        assert!(!cycle, "seed {seed}: {name} = {} was saved", q.text());
                        assert!(!read_by_kept, "seed {seed}: {name} redefined under a rule");
                        if kept {
                            m.kept.insert(name.clone());
                        } else {
                            m.kept.remove(&name);
                        }
                        m.audiences.insert(name, q);
                    }
                    Err(e) => assert!(
                        (cycle && e.to_string().contains("would use itself"))
                            || (read_by_kept && e.to_string().contains("is read by rule")),
                        "seed {seed}: {name} = {}: {e}",
                        q.text()
                    ),
                }
            }
            // A restart from what was synced.
            _ => {
                fs = fs.crash_image();
                drop(engine);
                engine = open(&fs);
            }
        }
        check(&engine, &m, seed, &format!("step {step}"));
    }
}

#[test]
fn saved_audiences_follow_their_definitions() {
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().expect("TAGSTORE_SEED is a number")],
        Err(_) => (1..=30).collect(),
    };
    for seed in seeds {
        run(seed);
    }
}

/// An audience snapshot whose members are alone in their segment (nothing
/// else changed before the checkpoint that wrote them) survives the
/// checkpoints after it, compaction and a restart; one sharing its members
/// reads the same blob; an erased customer leaves both.
#[test]
fn snapshot_members_survive_checkpoints_and_restarts() {
    use tagstore::storage::CheckpointOptions;
    let fs = MemFs::new();
    let engine = open(&fs);
    let update = |engine: &Engine, tag: &str, keys: &[&str]| {
        engine
            .write_blocking(WriteOp::Update {
                mutations: vec![Mutation {
                    tag: tag.into(),
                    add: keys.iter().map(|k| k.to_string()).collect(),
                    ..Default::default()
                }],
                create_missing_tags: true,
            })
            .unwrap();
    };
    update(&engine, "vip", &["a", "b", "c"]);
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let ids: roaring::RoaringBitmap = {
        let snap = engine.snapshot();
        let q = Query::compile("vip", &snap).unwrap();
        q.page(None, 100).0.into_iter().collect()
    };
    let take = |engine: &Engine, same_as: u32| {
        engine
            .write_blocking(WriteOp::TakeSnapshot {
                audience: "x".into(),
                query: "vip".into(),
                taken_lsn: engine.snapshot().lsn,
                note: String::new(),
                members: ids.clone(),
                same_as,
            })
            .unwrap()
            .ids[0]
    };
    let first = take(&engine, 0);
    let second = take(&engine, first);
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    for i in 0..12 {
        update(&engine, &format!("t{i}"), &["z"]);
        engine
            .checkpoint_blocking(CheckpointOptions::default())
            .unwrap();
    }
    let image = fs.crash_image();
    let restarted = open(&image);
    for id in [first, second] {
        assert_eq!(
            members(&restarted, &format!("SNAPSHOT {id}")),
            ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            "snapshot {id}"
        );
    }
    restarted
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["b".into()],
        })
        .unwrap();
    restarted
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    drop(restarted);
    let again = open(&image.crash_image());
    for id in [first, second] {
        assert_eq!(
            members(&again, &format!("SNAPSHOT {id}")),
            ["a", "c"].iter().map(|s| s.to_string()).collect(),
            "snapshot {id} after an erasure"
        );
    }
}

/// The member-count history at the engine's level: days recorded in order
/// (an earlier one refused), a day recorded again replaced, points past
/// the retention dropped, all of it across checkpoints and restarts.
#[test]
fn member_count_history_keeps_its_days() {
    use tagstore::storage::CheckpointOptions;
    let fs = MemFs::new();
    let engine = open(&fs);
    let record = |engine: &Engine, day: i32, keep_from: i32, n: u64| {
        engine.write_blocking(WriteOp::RecordHistory {
            day,
            keep_from,
            counts: vec![("vip".into(), n), ("高价值".into(), n / 2)],
        })
    };
    record(&engine, 20_000, 19_000, 10).unwrap();
    record(&engine, 20_001, 19_001, 12).unwrap();
    record(&engine, 20_001, 19_001, 14).unwrap();
    assert!(
        record(&engine, 19_999, 19_000, 1).is_err(),
        "a day before the newest"
    );
    let first = fs.crash_image();
    let restarted = open(&first);
    assert_eq!(
        restarted.snapshot().history.series("vip", 0),
        [(20_000, 10), (20_001, 14)]
    );
    restarted
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    record(&restarted, 20_400, 20_001, 20).unwrap();
    restarted
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let image = first.crash_image();
    drop(restarted);
    let again = open(&image);
    let h = again.snapshot().history.clone();
    assert_eq!(h.series("vip", 0), [(20_001, 14), (20_400, 20)]);
    assert_eq!(h.series("高价值", 20_002), [(20_400, 10)]);
    assert_eq!(h.last_day(), Some(20_400));
}
