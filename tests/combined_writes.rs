//! Small membership writes that reach the writer together are committed as
//! one log record (`storage/writer/coalesce.rs`). Made to happen here by
//! holding the log's sync of a first write while the others queue
//! (`MemFs::hold_syncs`): each write must still be answered as if it had
//! been committed alone, one after another — its own refusal, its own
//! counts and new customers — a write naming a customer an earlier one of
//! the run named goes to the next record, the change feed (rule tags
//! included) shows every change, and a restart and a crash find it all.
//! Once with chosen writes, once with random ones against a model, and
//! once with a run the disk has no room for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tagstore::query::Query;
use tagstore::rules::Definition;
use tagstore::storage::fs::{MemFs, Op};
use tagstore::storage::{Engine, EngineConfig, Mutation, WriteOp, WriteResult};

const DIR: &str = "/mem/store";

fn open(fs: &MemFs) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    Engine::open(cfg).unwrap()
}

fn update(tag: &str, add: &[&str], remove: &[&str]) -> WriteOp {
    WriteOp::Update {
        mutations: vec![Mutation {
            tag: tag.into(),
            add: add.iter().map(|k| k.to_string()).collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        }],
        create_missing_tags: false,
    }
}

fn create_tags(engine: &Engine, tags: &[&str]) {
    for tag in tags {
        engine
            .write_blocking(WriteOp::CreateTag {
                name: tag.to_string(),
                description: String::new(),
                category: String::new(),
                if_not_exists: false,
            })
            .unwrap();
    }
}

fn define_rule(engine: &Engine, name: &str, query: &str) {
    engine
        .write_blocking(WriteOp::DefineRule {
            name: name.into(),
            definition: Definition {
                query: query.into(),
                ..Default::default()
            },
            description: String::new(),
            category: String::new(),
            replace: false,
        })
        .unwrap();
}

fn members(engine: &Engine, tag: &str) -> BTreeSet<String> {
    let snap = engine.snapshot();
    let (ids, _) = Query::compile(tag, &snap).unwrap().page(None, usize::MAX);
    let mut out = Vec::new();
    snap.dict.keys_of(&ids, &mut out).unwrap();
    out.into_iter().collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// What the feed says after `after`: per lsn, per tag, (entered, left) keys.
type FeedSeen = BTreeMap<u64, BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>>;

fn feed_after(engine: &Engine, after: u64) -> FeedSeen {
    let snap = engine.snapshot();
    let mut reader = engine.feed_reader(after).unwrap();
    let mut out = FeedSeen::new();
    loop {
        let entries = reader.next(1 << 12).unwrap();
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            for c in &e.changes {
                let tagstore::storage::feed::Subject::Tag(tag) = c.subject() else {
                    continue;
                };
                let keys = |b: &tagstore::bitmap::Bitmap| {
                    let mut out = Vec::new();
                    snap.dict
                        .keys_of(&b.iter().collect::<Vec<u32>>(), &mut out)
                        .unwrap();
                    out.into_iter().collect::<BTreeSet<String>>()
                };
                let seen = out
                    .entry(e.lsn)
                    .or_default()
                    .entry(tag.clone())
                    .or_default();
                seen.0.extend(keys(&c.entered));
                seen.1.extend(keys(&c.left));
            }
        }
    }
}

#[test]
fn small_writes_queued_together_are_answered_as_if_one_after_another() {
    let fs = MemFs::new();
    let engine = open(&fs);
    create_tags(&engine, &["a", "b"]);
    for (tag, keys) in [("a", ["old1", "old2"]), ("b", ["old3", "old4"])] {
        engine.write_blocking(update(tag, &keys, &[])).unwrap();
    }
    define_rule(&engine, "both", "a AND b");
    let start = engine.snapshot().lsn;

    // A first write goes to the writer alone and waits in its sync; the
    // others queue behind it and reach the writer together.
    let hold = fs.hold_syncs("wal-");
    let mut first = engine.enqueue(update("a", &["w0"], &[])).unwrap();
    let waited = Instant::now();
    while hold.waiting() == 0 {
        assert!(waited.elapsed() < Duration::from_secs(10), "no sync came");
        std::thread::sleep(Duration::from_millis(1));
    }
    let ops = vec![
        // 0: a new customer.
        update("a", &["n1"], &[]),
        // 1: another, and one leaves b.
        update("b", &["n2"], &["old3"]),
        // 2: already a member: changes nothing.
        update("a", &["old1"], &[]),
        // 3: a rule tag is the rule's to write (n3 is not created).
        update("both", &["n3"], &[]),
        // 4: an id that names no one, beside a key (n5 is not created).
        WriteOp::Update {
            mutations: vec![Mutation {
                tag: "a".into(),
                add: vec!["n5".into()],
                add_ids: vec![999_999],
                ..Default::default()
            }],
            create_missing_tags: false,
        },
        // 5: n1 again (named by 0): the next record. n1 is then in a and b.
        update("b", &["n1"], &[]),
        // 6: in that next record too.
        update("a", &["n4"], &["old2"]),
        // 7: n3, whose write was refused, is new here.
        update("a", &["n3"], &[]),
        // 8: old4 into a: in both now.
        update("a", &["old4"], &[]),
        // 9: n5, whose write was refused, is new here.
        update("b", &["n5"], &[]),
        // 10: no such tag: refused on its own.
        update("nope", &["n6"], &[]),
    ];
    let queued: Vec<_> = ops.into_iter().map(|op| engine.enqueue(op)).collect();
    drop(hold);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let w0 = rt.block_on(first.answer()).unwrap();
    assert_eq!(w0.lsn, start + 1);
    let answers: Vec<tagstore::Result<WriteResult>> = queued
        .into_iter()
        .map(|q| rt.block_on(q.unwrap().answer()))
        .collect();
    let ok = |i: usize| -> &WriteResult {
        answers[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("write {i}: {e}"))
    };
    let counts = |i: usize| (ok(i).added, ok(i).removed, ok(i).new_customers);
    assert_eq!(counts(0), (1, 0, 1));
    assert_eq!(counts(1), (1, 1, 1));
    assert_eq!(counts(2), (0, 0, 0));
    assert!(
        matches!(answers[3], Err(tagstore::Error::Precondition(ref m)) if m.contains("both")),
        "{:?}",
        answers[3]
    );
    assert!(
        matches!(
            answers[4],
            Err(tagstore::Error::CustomerIdNotFound(999_999))
        ),
        "{:?}",
        answers[4]
    );
    assert_eq!(counts(5), (1, 0, 0));
    assert_eq!(counts(6), (1, 1, 1));
    assert_eq!(counts(7), (1, 0, 1));
    assert_eq!(counts(8), (1, 0, 0));
    assert_eq!(counts(9), (1, 0, 1));
    assert!(
        matches!(answers[10], Err(tagstore::Error::TagNotFound(ref t)) if t == "nope"),
        "{:?}",
        answers[10]
    );
    // Two records: the run until n1 comes again, then the rest.
    let run1 = ok(0).lsn;
    assert_eq!(run1, start + 2);
    assert!([1, 2].iter().all(|&i| ok(i).lsn == run1));
    assert!([5, 6, 7, 8, 9].iter().all(|&i| ok(i).lsn == run1 + 1));
    assert_eq!(engine.snapshot().lsn, run1 + 1);

    let expect = |engine: &Engine, label: &str| {
        assert_eq!(
            members(engine, "a"),
            set(&["old1", "w0", "n1", "n4", "n3", "old4"]),
            "{label}"
        );
        assert_eq!(
            members(engine, "b"),
            set(&["old4", "n2", "n1", "n5"]),
            "{label}"
        );
        assert_eq!(members(engine, "both"), set(&["n1", "old4"]), "{label}");
        // Every new customer has an id of its own.
        let snap = engine.snapshot();
        let ids: BTreeSet<u32> = ["w0", "n1", "n2", "n3", "n4", "n5"]
            .iter()
            .map(|k| snap.customer_id(k).unwrap().unwrap())
            .collect();
        assert_eq!(ids.len(), 6, "{label}");
        assert_eq!(snap.customer_id("n6").unwrap(), None, "{label}");
    };
    expect(&engine, "after the writes");

    // The feed: every change of every write, under its record's lsn.
    let feed = feed_after(&engine, start);
    let change = |entered: &[&str], left: &[&str]| (set(entered), set(left));
    let mut want = FeedSeen::new();
    want.entry(start + 1)
        .or_default()
        .insert("a".into(), change(&["w0"], &[]));
    let first_run = want.entry(run1).or_default();
    first_run.insert("a".into(), change(&["n1"], &[]));
    first_run.insert("b".into(), change(&["n2"], &["old3"]));
    let second_run = want.entry(run1 + 1).or_default();
    second_run.insert("a".into(), change(&["n4", "n3", "old4"], &["old2"]));
    second_run.insert("b".into(), change(&["n1", "n5"], &[]));
    second_run.insert("both".into(), change(&["n1", "old4"], &[]));
    assert_eq!(feed, want);

    // The log replays the combined records the same way.
    let crashed = fs.crash_image();
    drop(engine);
    for (fs, label) in [(fs, "restart"), (crashed, "crash")] {
        let engine = open(&fs);
        expect(&engine, label);
    }
}

/// One random small write and what the model says of it.
struct Planned {
    op: WriteOp,
    /// The customers it names (keys), for the run rule.
    keys: BTreeSet<String>,
}

/// The store as a model: members of each written tag by key.
#[derive(Default, Clone, PartialEq, Debug)]
struct Model {
    tags: BTreeMap<String, BTreeSet<String>>,
    customers: BTreeSet<String>,
}

/// A mutation as the model sees it: the tag, keys added, keys removed, and
/// the keys of the customers added by id (`""`: an id that names no one).
type ModelMutation = (String, Vec<String>, Vec<String>, Vec<String>);

/// What a write did in the model: `Ok((added, removed, new_customers))`
/// or the refusal's kind.
type Outcome = Result<(u64, u64, u64), &'static str>;

impl Model {
    fn apply(&mut self, muts: &[ModelMutation]) -> Outcome {
        for (tag, _, _, ids) in muts {
            if tag == "r" {
                return Err("precondition");
            }
            if !self.tags.contains_key(tag) {
                return Err("tag not found");
            }
            if ids
                .iter()
                .any(|k| k.is_empty() || !self.customers.contains(k))
            {
                return Err("id not found");
            }
        }
        let (mut added, mut removed, mut new) = (0, 0, 0);
        for (tag, add, remove, ids) in muts {
            for k in add.iter().chain(ids) {
                if self.customers.insert(k.clone()) {
                    new += 1;
                }
                added += self.tags.get_mut(tag).unwrap().insert(k.clone()) as u64;
            }
            for k in remove {
                removed += self.tags.get_mut(tag).unwrap().remove(k) as u64;
            }
        }
        Ok((added, removed, new))
    }

    /// The rule tag `r = a AND NOT b`.
    fn rule(&self) -> BTreeSet<String> {
        self.tags["a"]
            .difference(&self.tags["b"])
            .cloned()
            .collect()
    }
}

fn kind(e: &tagstore::Error) -> &'static str {
    match e {
        tagstore::Error::Precondition(_) => "precondition",
        tagstore::Error::TagNotFound(_) => "tag not found",
        tagstore::Error::CustomerIdNotFound(_) => "id not found",
        other => panic!("unexpected refusal: {other}"),
    }
}

/// Rounds of random small writes queued together behind a held sync:
/// each answer equals the model's, applying the writes one after another
/// in the order sent; writes that share an lsn name different customers;
/// the store (rule tag included), the change feed's mirror, a restart and
/// a crash all equal the model. `TAGSTORE_SEED=n` replays one run.
#[test]
fn random_small_writes_queued_together_equal_a_model() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().expect("TAGSTORE_SEED is a number")],
        Err(_) => (1..=4).collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut shared_lsns = 0;
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut fs = MemFs::new();
        let mut engine = open(&fs);
        let mut model = Model::default();
        create_tags(&engine, &["a", "b", "c"]);
        for tag in ["a", "b", "c"] {
            model.tags.insert(tag.into(), BTreeSet::new());
        }
        define_rule(&engine, "r", "a AND NOT b");
        let feed_start = engine.snapshot().lsn;
        let mut mirror: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut pos = feed_start;
        for round in 0..30 {
            let label = format!("seed {seed} round {round}");
            let snap = engine.snapshot();
            // The first adds a new customer: it is logged, and synced.
            let first = format!("f{round}");
            let mut writes = vec![(
                Planned {
                    op: update("c", &[first.as_str()], &[]),
                    keys: set(&[first.as_str()]),
                },
                vec![("c".to_string(), vec![first.clone()], vec![], vec![])],
            )];
            for _ in 0..rng.random_range(2..60) {
                let mut muts = Vec::new();
                let mut m = Vec::new();
                for _ in 0..rng.random_range(1..=2) {
                    let tag = ["a", "b", "c", "a", "b", "c", "r", "nope"][rng.random_range(0..8)];
                    let key = |rng: &mut StdRng| format!("k{}", rng.random_range(0..40));
                    let add: Vec<String> =
                        (0..rng.random_range(0..3)).map(|_| key(&mut rng)).collect();
                    let remove: Vec<String> =
                        (0..rng.random_range(0..2)).map(|_| key(&mut rng)).collect();
                    // By id: a customer live before the round, or no one.
                    let mut ids = Vec::new();
                    let mut id_keys = Vec::new();
                    if rng.random_bool(0.15) {
                        let k = key(&mut rng);
                        match snap.customer_id(&k).unwrap() {
                            Some(id) if rng.random_bool(0.8) => {
                                ids.push(id);
                                id_keys.push(k);
                            }
                            _ => {
                                ids.push(999_999);
                                id_keys.push(String::new());
                            }
                        }
                    }
                    if add.is_empty() && remove.is_empty() && ids.is_empty() {
                        continue;
                    }
                    m.push(Mutation {
                        tag: tag.into(),
                        add: add.clone(),
                        remove: remove.clone(),
                        add_ids: ids,
                        ..Default::default()
                    });
                    muts.push((tag.to_string(), add, remove, id_keys));
                }
                if m.is_empty() {
                    continue;
                }
                let keys = muts
                    .iter()
                    .flat_map(|(_, a, r, i)| a.iter().chain(r).chain(i).cloned())
                    .collect();
                writes.push((
                    Planned {
                        op: WriteOp::Update {
                            mutations: m,
                            create_missing_tags: false,
                        },
                        keys,
                    },
                    muts,
                ));
            }
            // The first write waits in its sync; the rest queue behind it.
            let hold = fs.hold_syncs("wal-");
            let mut queued = Vec::new();
            for (i, (w, _)) in writes.iter().enumerate() {
                queued.push(engine.enqueue(w.op.clone()).unwrap());
                if i == 0 {
                    let waited = Instant::now();
                    while hold.waiting() == 0 {
                        assert!(waited.elapsed() < Duration::from_secs(10), "no sync came");
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            }
            drop(hold);
            let mut by_lsn: BTreeMap<u64, Vec<BTreeSet<String>>> = BTreeMap::new();
            let mut last_lsn = 0;
            for (i, (mut q, (w, muts))) in queued.into_iter().zip(&writes).enumerate() {
                let got = rt.block_on(q.answer());
                // The customers it names: a key removed that names no one
                // (yet) names no customer.
                let named: BTreeSet<String> = w
                    .keys
                    .iter()
                    .filter(|k| {
                        model.customers.contains(*k)
                            || muts.iter().any(|(_, add, _, _)| add.contains(k))
                    })
                    .cloned()
                    .collect();
                let want = model.apply(muts);
                match (&got, want) {
                    (Ok(r), Ok(counts)) => {
                        assert_eq!(
                            (r.added, r.removed, r.new_customers),
                            counts,
                            "{label}, write {i}"
                        );
                        assert!(r.lsn >= last_lsn, "{label}, write {i}: lsn went back");
                        last_lsn = r.lsn;
                        if counts != (0, 0, 0) {
                            by_lsn.entry(r.lsn).or_default().push(named);
                        }
                    }
                    (Err(e), Err(k)) => assert_eq!(kind(e), k, "{label}, write {i}"),
                    (got, want) => panic!("{label}, write {i}: got {got:?}, the model {want:?}"),
                }
            }
            // Writes logged as one name different customers.
            for (lsn, keys) in &by_lsn {
                shared_lsns += (keys.len() > 1) as usize;
                let mut seen = BTreeSet::new();
                for k in keys.iter().flat_map(|s| s.iter()) {
                    assert!(seen.insert(k), "{label}: {k} named twice at lsn {lsn}");
                }
            }
            let check = |engine: &Engine, what: &str| {
                for (tag, keys) in &model.tags {
                    assert_eq!(&members(engine, tag), keys, "{label} ({what}): {tag}");
                }
                assert_eq!(members(engine, "r"), model.rule(), "{label} ({what}): r");
            };
            check(&engine, "after the writes");
            // The feed's mirror.
            let seen = feed_after(&engine, pos);
            pos = engine.snapshot().lsn;
            for changes in seen.values() {
                for (tag, (entered, left)) in changes {
                    let set = mirror.entry(tag.clone()).or_default();
                    for k in entered {
                        assert!(set.insert(k.clone()), "{label}: {k} entered {tag} twice");
                    }
                    for k in left {
                        assert!(set.remove(k), "{label}: {k} left {tag}, not in it");
                    }
                }
            }
            for (tag, keys) in model.tags.iter().chain([(&"r".to_string(), &model.rule())]) {
                assert_eq!(
                    mirror.get(tag).cloned().unwrap_or_default(),
                    *keys,
                    "{label}: the feed's {tag}"
                );
            }
            if round % 10 == 9 {
                let crashed = fs.crash_image();
                drop(engine);
                check(&open(&crashed), "crash");
                fs = if rng.random_bool(0.5) { crashed } else { fs };
                engine = open(&fs);
                check(&engine, "restart");
                pos = engine.snapshot().lsn;
            }
        }
    }
    assert!(shared_lsns > 0, "no writes were logged together");
}

/// A run whose one record needs more log space than the disk has is
/// refused whole as a full disk, every request of it told so: nothing of
/// it applied, the store not failed; once there is room the same writes go
/// through, and a crash keeps them.
#[test]
fn a_run_the_disk_has_no_room_for_is_refused_whole() {
    let fs = MemFs::new();
    let engine = open(&fs);
    create_tags(&engine, &["t"]);
    engine.write_blocking(update("t", &["a"], &[])).unwrap();
    // 256 writes of 64 new customers with the longest keys: one record of
    // more than the 4 MiB the log allocates ahead.
    let writes: Vec<Vec<String>> = (0..256)
        .map(|w| {
            (0..64)
                .map(|k| format!("{w:03}-{k:02}-{}", "x".repeat(249)))
                .collect()
        })
        .collect();
    let op = |keys: &Vec<String>| WriteOp::Update {
        mutations: vec![Mutation {
            tag: "t".into(),
            add: keys.clone(),
            ..Default::default()
        }],
        create_missing_tags: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let run = |full: bool| -> Vec<tagstore::Result<WriteResult>> {
        let hold = fs.hold_syncs("wal-");
        let mut first = engine
            .enqueue(update("t", &[if full { "b" } else { "c" }], &[]))
            .unwrap();
        let waited = Instant::now();
        while hold.waiting() == 0 {
            assert!(waited.elapsed() < Duration::from_secs(10), "no sync came");
            std::thread::sleep(Duration::from_millis(1));
        }
        if full {
            fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC);
        }
        let queued: Vec<_> = writes
            .iter()
            .map(|k| engine.enqueue(op(k)).unwrap())
            .collect();
        drop(hold);
        rt.block_on(first.answer()).unwrap();
        queued
            .into_iter()
            .map(|mut q| rt.block_on(q.answer()))
            .collect()
    };
    let answers = run(true);
    for (i, a) in answers.iter().enumerate() {
        assert!(
            matches!(a, Err(tagstore::Error::DiskFull(_))),
            "write {i}: {a:?}"
        );
    }
    assert_eq!(engine.failure(), None);
    assert_eq!(members(&engine, "t"), set(&["a", "b"]));
    assert_eq!(engine.snapshot().customer_id(&writes[0][0]).unwrap(), None);

    fs.clear_faults();
    let answers = run(false);
    let lsn = answers[0].as_ref().unwrap().lsn;
    for a in &answers {
        let a = a.as_ref().unwrap();
        assert_eq!((a.added, a.new_customers, a.lsn), (64, 64, lsn));
    }
    assert_eq!(members(&engine, "t").len(), 3 + 256 * 64);
    let crashed = fs.crash_image();
    drop(engine);
    assert_eq!(members(&open(&crashed), "t").len(), 3 + 256 * 64);
}
