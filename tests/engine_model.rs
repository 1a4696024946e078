//! Randomized test of the engine and the query evaluator against a simple
//! model (a map of tag name to a set of keys, and the set of live keys):
//! thousands of random updates (by key, by internal id, and by keys resolved
//! beforehand in a snapshot a few writes old), replaces,
//! customer creations, deletes, drops, checkpoints and restarts (clean and
//! abrupt), checking counts, member lists, profiles and
//! random boolean queries after every phase.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::names::quote_tag_name;
use tagstore::query::Query;
use tagstore::storage::fs::{FileSystem, MemFs};
use tagstore::storage::{CheckpointOptions, Engine, EngineConfig, Mutation, WriteOp};

#[derive(Default, Clone)]
struct Model {
    tags: BTreeMap<String, BTreeSet<String>>,
    live: BTreeSet<String>,
}

const TAG_NAMES: &[&str] = &[
    "高价值用户",
    "常购护肤品",
    "尝试新品",
    "潜在流失",
    "a",
    "b",
    "with space",
    "社交活跃",
    "and",
];

fn key(rng: &mut StdRng) -> String {
    // A small key space so that keys collide, are deleted and come back.
    match rng.random_range(0..3) {
        0 => format!("phone:1380000{:04}", rng.random_range(0..400)),
        1 => format!("wechat:o{}", rng.random_range(0..300)),
        _ => format!("jd:pin_{}", rng.random_range(0..300)),
    }
}

fn keys(rng: &mut StdRng, max: usize) -> Vec<String> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| key(rng)).collect()
}

/// The form of `op` sent to the engine: some keys of live customers in an
/// update go by internal id instead (the model applies `op` itself, by key).
/// Now and then an id that names no customer is added, and the engine must
/// refuse the whole request; the result says whether that was done.
fn by_ids(engine: &Engine, rng: &mut StdRng, op: &WriteOp) -> (WriteOp, bool) {
    let WriteOp::Update {
        mutations,
        create_missing_tags,
    } = op
    else {
        return (op.clone(), false);
    };
    let snap = engine.snapshot();
    let mut poisoned = false;
    let mutations = mutations
        .iter()
        .map(|m| {
            let mut out = Mutation {
                tag: m.tag.clone(),
                ..Default::default()
            };
            for (keys, ids, into) in [
                (&m.add, &mut out.add_ids, &mut out.add),
                (&m.remove, &mut out.remove_ids, &mut out.remove),
            ] {
                for k in keys {
                    match snap.customer_id(k).unwrap() {
                        Some(id) if rng.random_bool(0.5) => ids.push(id),
                        _ => into.push(k.clone()),
                    }
                }
            }
            if rng.random_bool(0.02) {
                out.add_ids.push(u32::MAX - 7);
                poisoned = true;
            }
            out
        })
        .collect();
    (
        WriteOp::Update {
            mutations,
            create_missing_tags: *create_missing_tags,
        },
        poisoned,
    )
}

/// Where a store lives: a directory on the real disk, or an in-memory file
/// system (whose crash image loses everything not synced).
enum Disk {
    Os(tempfile::TempDir),
    Mem(MemFs),
}

const MEM_DIR: &str = "/mem/store";

impl Disk {
    fn config(&self) -> EngineConfig {
        match self {
            Disk::Os(dir) => EngineConfig::new(dir.path()),
            Disk::Mem(fs) => {
                let mut cfg = EngineConfig::new(MEM_DIR);
                cfg.fs = Arc::new(fs.clone());
                cfg
            }
        }
    }

    /// The store as a crash at this moment would leave it: a copy of the
    /// directory (what the page cache holds survives), or the in-memory
    /// crash image (only what was synced survives).
    fn after_crash(&self) -> Disk {
        match self {
            Disk::Os(dir) => {
                let copy = tempfile::tempdir().unwrap();
                common::copy_data_dir(dir.path(), copy.path());
                Disk::Os(copy)
            }
            Disk::Mem(fs) => Disk::Mem(fs.crash_image()),
        }
    }

    fn file_names(&self) -> HashSet<String> {
        match self {
            Disk::Os(dir) => std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Disk::Mem(fs) => fs
                .list(std::path::Path::new(MEM_DIR))
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect(),
        }
    }
}

fn open(disk: &Disk, wal_bytes: u64) -> Engine {
    let mut cfg = disk.config();
    cfg.checkpoint_wal_bytes = wal_bytes;
    cfg.compaction.max_segments = 3;
    cfg.compaction.max_dict_layers = 3;
    Engine::open(cfg).expect("open engine")
}

fn random_op(rng: &mut StdRng, model: &mut Model) -> WriteOp {
    let existing: Vec<String> = model.tags.keys().cloned().collect();
    let pick_tag = |rng: &mut StdRng| TAG_NAMES[rng.random_range(0..TAG_NAMES.len())].to_string();
    match rng.random_range(0..100) {
        0..=4 => WriteOp::CreateTag {
            name: pick_tag(rng),
            description: "d".into(),
            category: "c".into(),
            if_not_exists: rng.random_bool(0.5),
        },
        5..=7 if !existing.is_empty() => WriteOp::DropTag {
            name: existing[rng.random_range(0..existing.len())].clone(),
        },
        8..=14 => WriteOp::Replace {
            tag: pick_tag(rng),
            customers: keys(rng, 60),
            create_missing_tag: rng.random_bool(0.7),
        },
        15..=22 => WriteOp::DeleteCustomers {
            customers: keys(rng, 8),
        },
        23..=25 => WriteOp::CreateCustomers {
            customers: keys(rng, 5),
        },
        _ => {
            let n = rng.random_range(0..4);
            let mutations = (0..n)
                .map(|_| Mutation {
                    tag: pick_tag(rng),
                    add: keys(rng, 30),
                    remove: keys(rng, 10),
                    ..Default::default()
                })
                .collect();
            WriteOp::Update {
                mutations,
                create_missing_tags: rng.random_bool(0.8),
            }
        }
    }
}

/// Applies `op` to the model, if the engine accepted it.
fn apply_model(model: &mut Model, op: &WriteOp, accepted: bool) {
    if !accepted {
        return;
    }
    match op {
        WriteOp::CreateTag { name, .. } => {
            model.tags.entry(name.clone()).or_default();
        }
        WriteOp::DropTag { name } => {
            model.tags.remove(name);
        }
        WriteOp::Update { mutations, .. } => {
            for m in mutations {
                let set = model.tags.entry(m.tag.clone()).or_default();
                for k in &m.add {
                    set.insert(k.clone());
                    model.live.insert(k.clone());
                }
                for k in &m.remove {
                    set.remove(k);
                }
            }
        }
        WriteOp::Replace { tag, customers, .. } => {
            let set: BTreeSet<String> = customers.iter().cloned().collect();
            model.live.extend(set.iter().cloned());
            model.tags.insert(tag.clone(), set);
        }
        WriteOp::CreateCustomers { customers } => {
            model.live.extend(customers.iter().cloned());
        }
        WriteOp::DeleteCustomers { customers } => {
            for k in customers {
                model.live.remove(k);
                for set in model.tags.values_mut() {
                    set.remove(k);
                }
            }
        }
        other => unreachable!("not generated here (fields: tests/fields_model.rs): {other:?}"),
    }
}

/// Whether the engine should accept `op` given the model.
fn should_accept(model: &Model, op: &WriteOp) -> bool {
    match op {
        WriteOp::CreateTag {
            name,
            if_not_exists,
            ..
        } => *if_not_exists || !model.tags.contains_key(name),
        WriteOp::DropTag { name } => model.tags.contains_key(name),
        WriteOp::Update {
            mutations,
            create_missing_tags,
        } => {
            !mutations.is_empty()
                && mutations
                    .iter()
                    .any(|m| !m.add.is_empty() || !m.remove.is_empty())
                && (*create_missing_tags
                    || mutations.iter().all(|m| model.tags.contains_key(&m.tag)))
        }
        WriteOp::Replace {
            tag,
            create_missing_tag,
            ..
        } => *create_missing_tag || model.tags.contains_key(tag),
        WriteOp::DeleteCustomers { customers } | WriteOp::CreateCustomers { customers } => {
            !customers.is_empty()
        }
        other => unreachable!("not generated here: {other:?}"),
    }
}

#[derive(Debug)]
enum Q {
    Tag(String),
    All,
    Not(Box<Q>),
    And(Box<Q>, Box<Q>),
    Or(Box<Q>, Box<Q>),
}

fn random_query(rng: &mut StdRng, tags: &[String], depth: u32) -> Q {
    if depth == 0 || rng.random_bool(0.3) {
        if tags.is_empty() || rng.random_bool(0.1) {
            return Q::All;
        }
        return Q::Tag(tags[rng.random_range(0..tags.len())].clone());
    }
    match rng.random_range(0..3) {
        0 => Q::Not(Box::new(random_query(rng, tags, depth - 1))),
        1 => Q::And(
            Box::new(random_query(rng, tags, depth - 1)),
            Box::new(random_query(rng, tags, depth - 1)),
        ),
        _ => Q::Or(
            Box::new(random_query(rng, tags, depth - 1)),
            Box::new(random_query(rng, tags, depth - 1)),
        ),
    }
}

fn render(q: &Q) -> String {
    match q {
        Q::Tag(t) => quote_tag_name(t),
        Q::All => "all".into(),
        Q::Not(x) => format!("NOT ({})", render(x)),
        Q::And(a, b) => format!("({}) AND ({})", render(a), render(b)),
        Q::Or(a, b) => format!("({}) or ({})", render(a), render(b)),
    }
}

fn eval_model(model: &Model, q: &Q) -> BTreeSet<String> {
    match q {
        Q::Tag(t) => model.tags[t].clone(),
        Q::All => model.live.clone(),
        Q::Not(x) => model
            .live
            .difference(&eval_model(model, x))
            .cloned()
            .collect(),
        Q::And(a, b) => eval_model(model, a)
            .intersection(&eval_model(model, b))
            .cloned()
            .collect(),
        Q::Or(a, b) => eval_model(model, a)
            .union(&eval_model(model, b))
            .cloned()
            .collect(),
    }
}

fn members(engine: &Engine, text: &str) -> BTreeSet<String> {
    let snap = engine.snapshot();
    let q = Query::compile(text, &snap).unwrap_or_else(|e| panic!("{text}: {e}"));
    // Page through with a small page size to exercise cursors.
    let mut out = BTreeSet::new();
    let mut after = None;
    loop {
        let (ids, more) = q.page(after, 7);
        let mut keys = Vec::new();
        snap.dict.keys_of(&ids, &mut keys).unwrap();
        assert_eq!(keys.len(), ids.len(), "every member id has a key");
        out.extend(keys);
        after = ids.last().copied();
        if !more {
            break;
        }
    }
    assert_eq!(
        q.count(),
        out.len() as u64,
        "count agrees with members for {text}"
    );
    out
}

fn check(engine: &Engine, model: &Model, rng: &mut StdRng) {
    let snap = engine.snapshot();
    let names: Vec<String> = snap.tags.keys().map(|k| k.to_string()).collect();
    let model_names: Vec<String> = model.tags.keys().cloned().collect();
    assert_eq!(names, model_names, "tag names");
    for (name, set) in &model.tags {
        assert_eq!(
            snap.tag(name).unwrap().meta.count,
            set.len() as u64,
            "count of {name}"
        );
        assert_eq!(
            &members(engine, &quote_tag_name(name)),
            set,
            "members of {name}"
        );
    }
    assert_eq!(members(engine, "ALL"), model.live, "ALL");
    assert_eq!(snap.customer_count().unwrap(), model.live.len() as u64);
    for _ in 0..40 {
        let q = random_query(rng, &model_names, 4);
        let text = render(&q);
        assert_eq!(
            members(engine, &text),
            eval_model(model, &q),
            "query {text}"
        );
    }
    // Profiles: a sample of keys, live or not.
    for _ in 0..30 {
        let k = key(rng);
        match snap.customer_id(&k).unwrap() {
            Some(id) => {
                assert!(model.live.contains(&k), "{k} should not be live");
                let tags: Vec<String> = snap
                    .tags_of(id)
                    .unwrap()
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                let expect: Vec<String> = model
                    .tags
                    .iter()
                    .filter(|(_, s)| s.contains(&k))
                    .map(|(n, _)| n.clone())
                    .collect();
                assert_eq!(tags, expect, "profile of {k}");
            }
            None => assert!(!model.live.contains(&k), "{k} should be live"),
        }
    }
}

#[test]
fn random_operations_match_the_model_across_restarts() {
    model_across_restarts(Disk::Os(tempfile::tempdir().unwrap()));
}

/// The same on the in-memory file system, where an abrupt restart keeps
/// only what was synced (file content and directory entries): every
/// acknowledged write must have been.
#[test]
fn random_operations_match_the_model_across_restarts_in_memory() {
    model_across_restarts(Disk::Mem(MemFs::new()));
}

fn model_across_restarts(dir: Disk) {
    let seed: u64 = std::env::var("TAGSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261128);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    // A tiny checkpoint threshold makes automatic checkpoints and compaction happen often.
    let mut engine = open(&dir, 16 << 10);
    let mut stale = engine.snapshot();
    for phase in 0..12 {
        for i in 0..250 {
            let op = random_op(&mut rng, &mut model);
            let (mut sent, poisoned) = by_ids(&engine, &mut rng, &op);
            // Keys resolved before the writer, as the server does for large
            // updates: in a snapshot up to 25 writes old, so that some of
            // those customers were deleted (or deleted and created again)
            // since.
            if i % 25 == 0 {
                stale = engine.snapshot();
            }
            if let WriteOp::Update { mutations, .. } = &mut sent {
                for m in mutations.iter_mut() {
                    match rng.random_range(0..3) {
                        0 => m.resolve_in(&stale).unwrap(),
                        1 => {
                            let mut half = m.split_off_half();
                            let found = half.look_up(&stale).unwrap();
                            half.take_resolved(found);
                            m.resolve_in(&stale).unwrap();
                            m.append(half);
                        }
                        _ => {}
                    }
                }
            }
            let expect = should_accept(&model, &op) && !poisoned;
            let res = engine.write_blocking(sent.clone());
            assert_eq!(res.is_ok(), expect, "phase {phase}: {sent:?} gave {res:?}");
            apply_model(&mut model, &op, res.is_ok());
        }
        check(&engine, &model, &mut rng);
        match phase % 3 {
            0 => {
                engine.checkpoint_blocking(Default::default()).unwrap();
            }
            1 => {
                // Clean restart: shutdown writes a final checkpoint.
                drop(engine);
                engine = open(&dir, 16 << 10);
                assert_eq!(engine.recovery().records_replayed, 0);
            }
            _ => {
                // Abrupt restart: leave the engine running, without a final
                // checkpoint, and open what a crash now would leave.
                let crashed = dir.after_crash();
                let other = open(&crashed, 16 << 10);
                check(&other, &model, &mut rng);
                drop(other);
            }
        }
        check(&engine, &model, &mut rng);
    }
    let files = dir.file_names();
    let segments = files.iter().filter(|f| f.ends_with(".seg")).count();
    assert!(
        segments <= 4,
        "compaction keeps segment files few: {files:?}"
    );
}

#[test]
fn second_engine_on_the_same_directory_is_refused() {
    let dir = Disk::Os(tempfile::tempdir().unwrap());
    let _a = open(&dir, 1 << 20);
    let err = Engine::open(dir.config()).err().expect("must be refused");
    assert!(err.to_string().contains("in use"), "{err}");
}

/// A write that changes nothing (every customer already in, or already out)
/// is answered without a log record and keeps the lsn; one customer that
/// would change makes the whole write logged. The state survives a crash
/// either way.
#[test]
fn writes_that_change_nothing_are_not_logged() {
    let dir = Disk::Mem(MemFs::new());
    let engine = open(&dir, 1 << 30);
    let update = |tag: &str, add: &[&str], remove: &[&str], create: bool| {
        engine.write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: add.iter().map(|k| k.to_string()).collect(),
                remove: remove.iter().map(|k| k.to_string()).collect(),
                ..Default::default()
            }],
            create_missing_tags: create,
        })
    };
    update("t", &["a", "b"], &[], true).unwrap();
    update("u", &["c"], &[], true).unwrap();
    let lsn = engine.snapshot().lsn;
    let bytes = engine.info().wal_bytes;

    // Already members; not members (one of them no customer at all).
    for (add, remove) in [(&["a", "b"][..], &[][..]), (&[], &["c", "nobody"])] {
        let r = update("t", add, remove, false).unwrap();
        assert_eq!((r.lsn, r.added, r.removed, r.new_customers), (lsn, 0, 0, 0));
    }
    // By id, too.
    let a = engine.snapshot().customer_id("a").unwrap().unwrap();
    let r = engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: "t".into(),
                add_ids: vec![a],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .unwrap();
    assert_eq!((r.lsn, r.added), (lsn, 0));
    assert_eq!(engine.info().wal_bytes, bytes, "nothing was logged");

    // A new customer, a new tag, or one real change: logged.
    let r = update("t", &["a", "d"], &[], false).unwrap();
    assert_eq!((r.lsn, r.added, r.new_customers), (lsn + 1, 1, 1));
    let r = update("v", &["a"], &[], true).unwrap();
    assert_eq!((r.lsn, r.added), (lsn + 2, 1));
    // The same customer added and removed: the add changes nothing, the
    // remove does.
    let r = update("t", &["b"], &["b"], false).unwrap();
    assert_eq!((r.lsn, r.removed), (lsn + 3, 1));
    let r = update("t", &["nobody"], &[], false).unwrap();
    assert_eq!((r.lsn, r.added, r.new_customers), (lsn + 4, 1, 1));
    // An unknown tag is still an error.
    assert!(update("nope", &["a"], &[], false).is_err());

    // A crash (no checkpoint): the acknowledged state comes back.
    let crashed = dir.after_crash();
    drop(engine);
    let engine = open(&crashed, 1 << 30);
    assert_eq!(engine.snapshot().lsn, lsn + 4);
    assert_eq!(
        members(&engine, "t"),
        ["a", "d", "nobody"].map(String::from).into()
    );
    assert_eq!(members(&engine, "u"), ["c"].map(String::from).into());
    assert_eq!(members(&engine, "v"), ["a"].map(String::from).into());
}

/// Checkpoints that each add the same number of customers keep the
/// dictionary sections to about log2(checkpoints), merging the newest ones as
/// they add up; through those merges (and a restart) every live key keeps its
/// id, deleted keys stay deleted, and a deleted key created again gets a new id.
#[test]
fn dictionary_sections_stay_few_through_merges() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EngineConfig::new(dir.path());
    cfg.checkpoint_wal_bytes = 1 << 30;
    let engine = Engine::open(cfg.clone()).unwrap();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut dead: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    let rounds = 24;
    for round in 0..rounds {
        let keys: Vec<String> = (0..40).map(|i| format!("r{round}-{i}")).collect();
        let r = engine
            .write_blocking(WriteOp::CreateCustomers {
                customers: keys.clone(),
            })
            .unwrap();
        for (k, id) in keys.iter().zip(&r.ids) {
            assert!(seen.insert(*id), "id {id} given twice");
            ids.insert(k.clone(), *id);
        }
        if round > 0 {
            // Delete a customer of the previous round, and bring back one
            // deleted two rounds ago (a new id for the same key).
            let gone = format!("r{}-{}", round - 1, round % 40);
            engine
                .write_blocking(WriteOp::DeleteCustomers {
                    customers: vec![gone.clone()],
                })
                .unwrap();
            ids.remove(&gone);
            dead.insert(gone);
            if round > 2 {
                let back = format!("r{}-{}", round - 3, (round - 2) % 40);
                let r = engine
                    .write_blocking(WriteOp::CreateCustomers {
                        customers: vec![back.clone()],
                    })
                    .unwrap();
                assert!(seen.insert(r.ids[0]), "a key created again gets a new id");
                dead.remove(&back);
                ids.insert(back, r.ids[0]);
            }
        }
        engine.checkpoint_blocking(Default::default()).unwrap();
        let sections = engine.info().dictionary_sections;
        let bound = ((round + 1) as f64).log2().floor() as u64 + 1;
        assert!(
            sections <= bound,
            "round {round}: {sections} sections, more than {bound}"
        );
    }
    let check = |engine: &Engine| {
        let snap = engine.snapshot();
        for (k, id) in &ids {
            assert_eq!(snap.customer_id(k).unwrap(), Some(*id), "{k}");
        }
        for k in &dead {
            assert_eq!(snap.customer_id(k).unwrap(), None, "{k} was deleted");
        }
    };
    check(&engine);
    drop(engine);
    let engine = Engine::open(cfg).unwrap();
    assert!(engine.info().dictionary_sections >= 2);
    check(&engine);
    // Merged into one on request, even with nothing else to write.
    let merge = CheckpointOptions {
        merge_dictionary: true,
    };
    engine.checkpoint_blocking(merge).unwrap();
    assert_eq!(engine.info().dictionary_sections, 1);
    check(&engine);
    let lsn = engine.snapshot().lsn;
    assert_eq!(engine.checkpoint_blocking(merge).unwrap().lsn, lsn);
    assert_eq!(engine.info().dictionary_sections, 1);
}
