//! OneID against a simple model (randomized): generated people, each with a
//! few identities on several channels; records name one or two identities
//! of one person. Identities named together on a record belong together, so
//! the model's customers are the connected groups of identities. After the
//! records are ingested in random batches, between checkpoints, restarts and
//! crash images (only what was synced), the store must have exactly one live
//! customer per group, every identity of a group naming it, no two groups
//! sharing one, and every fact (counts and sums added up, first and last
//! days) equal to the model's over the group's records. Guard rails are
//! among them: shared store tablets (`device:…`, a type that never merges)
//! on many people's records, and a blocked default phone number; neither
//! ever joins two groups, the phone names no one, and a tablet names the
//! customer of the first record that carried it.
//!
//! `TAGSTORE_SEED=n` replays one run.

use std::collections::HashMap;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::clock::ManualClock;
use tagstore::fields::{FieldKind, MergeRule};
use tagstore::storage::fs::MemFs;
use tagstore::storage::{
    CheckpointOptions, Combine, Engine, EngineConfig, IngestRecord, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
const T0: i64 = 1_794_441_600_000;
const DAY_MS: i64 = 86_400_000;

/// A phone number typed in at the till for anyone: on the block list.
const BLOCKED: &str = "phone:13800000000";

fn open(fs: &MemFs, clock: &Arc<ManualClock>) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    // Shared store tablets never merge anyone; the default phone is blocked.
    cfg.oneid.never_merge = ["device".to_string()].into_iter().collect();
    cfg.oneid.blocked = [BLOCKED.to_string()].into_iter().collect();
    Engine::open(cfg).unwrap()
}

const FIELDS: [(&str, MergeRule); 4] = [
    ("orders", MergeRule::Sum),
    ("spend", MergeRule::Sum),
    ("first_day", MergeRule::Min),
    ("last_day", MergeRule::Max),
];

/// Union-find over identity indexes.
struct Components(Vec<usize>);

impl Components {
    fn find(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }
    fn join(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        self.0[ra] = rb;
    }
}

#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Facts {
    orders: i64,
    spend: i64,
    first_day: i64,
    last_day: i64,
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let mut engine = open(&fs, &clock);
    for (name, merge) in FIELDS {
        engine
            .write_blocking(WriteOp::CreateField {
                name: name.into(),
                description: String::new(),
                category: String::new(),
                kind: FieldKind::Int,
                merge,
                if_not_exists: false,
            })
            .unwrap();
    }
    // People and their identities.
    let kinds = [
        "phone",
        "jd_pin",
        "taobao_nick",
        "wechat_unionid",
        "member_card",
    ];
    let people = rng.random_range(20..60);
    let mut identities: Vec<String> = Vec::new();
    let mut of_person: Vec<Vec<usize>> = Vec::new();
    for p in 0..people {
        let n = rng.random_range(1..=4);
        let mut mine = Vec::new();
        for k in 0..n {
            mine.push(identities.len());
            identities.push(format!("{}:p{p}_{k}", kinds[(p + k) % kinds.len()]));
        }
        of_person.push(mine);
    }
    let mut comps = Components((0..identities.len()).collect());
    // (identities named, day, amount) per record, in the order ingested.
    let mut records: Vec<(Vec<usize>, i64, i64)> = Vec::new();
    let mut pending: Vec<IngestRecord> = Vec::new();
    // Each tablet, and an identity of the first record that carried it.
    let mut devices: HashMap<usize, usize> = HashMap::new();
    let total = rng.random_range(100..300);
    for r in 0..total {
        let p = rng.random_range(0..people);
        let mine = &of_person[p];
        let a = mine[rng.random_range(0..mine.len())];
        let mut named = vec![a];
        if mine.len() > 1 && rng.random_bool(0.4) {
            let b = mine[rng.random_range(0..mine.len())];
            if b != a {
                named.push(b);
                comps.join(a, b);
            }
        }
        let day = 20_000 + rng.random_range(0..300);
        let amount = rng.random_range(1..100_000);
        records.push((named.clone(), day, amount));
        // Guard-railed identities ride along on some records.
        let mut extra = Vec::new();
        if rng.random_bool(0.2) {
            let d = rng.random_range(0..3usize);
            extra.push(format!("device:t{d}"));
            devices.entry(d).or_insert(a);
        }
        if rng.random_bool(0.1) {
            extra.push(BLOCKED.to_string());
        }
        let writes = vec![
            ValueWrite::Combine {
                field: "orders".into(),
                customer: "x".into(),
                with: Combine::Add(1),
            },
            ValueWrite::Combine {
                field: "spend".into(),
                customer: "x".into(),
                with: Combine::Add(amount),
            },
            ValueWrite::Combine {
                field: "first_day".into(),
                customer: "x".into(),
                with: Combine::Min(day),
            },
            ValueWrite::Combine {
                field: "last_day".into(),
                customer: "x".into(),
                with: Combine::Max(day),
            },
        ];
        pending.push(IngestRecord {
            refund: None,
            unless_refunded: Vec::new(),
            order: None,
            seen: None,
            identities: named
                .iter()
                .map(|&i| identities[i].clone())
                .chain(extra)
                .collect(),
            place: "jd".into(),
            at_ms: T0 - DAY_MS + r as i64,
            writes,
            event: None,
        });
        // Send a batch now and then; then maybe a checkpoint, a restart or
        // a crash.
        if pending.len() >= rng.random_range(1..12) || r + 1 == total {
            engine
                .write_blocking(WriteOp::Ingest {
                    records: std::mem::take(&mut pending).into(),
                })
                .unwrap();
            match rng.random_range(0..20) {
                0 => {
                    engine
                        .checkpoint_blocking(CheckpointOptions {
                            merge_dictionary: rng.random_bool(0.5),
                        })
                        .unwrap();
                }
                1 => {
                    drop(engine);
                    engine = open(&fs, &clock);
                }
                2 => {
                    let image = fs.crash_image();
                    drop(engine);
                    // Everything acknowledged was synced: the image holds it.
                    fs = image;
                    engine = open(&fs, &clock);
                }
                _ => {}
            }
        }
    }
    check(&engine, &identities, &mut comps, &records, &devices, seed);
    drop(engine);
    let engine = open(&fs, &clock);
    check(&engine, &identities, &mut comps, &records, &devices, seed);
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&fs.crash_image(), &clock);
    check(&engine, &identities, &mut comps, &records, &devices, seed);
}

fn check(
    engine: &Engine,
    identities: &[String],
    comps: &mut Components,
    records: &[(Vec<usize>, i64, i64)],
    devices: &HashMap<usize, usize>,
    seed: u64,
) {
    let snap = engine.snapshot();
    let mut model: HashMap<usize, Facts> = HashMap::new();
    for (named, day, amount) in records {
        let c = comps.find(named[0]);
        let f = model.entry(c).or_insert(Facts {
            first_day: i64::MAX,
            last_day: i64::MIN,
            ..Default::default()
        });
        f.orders += 1;
        f.spend += amount;
        f.first_day = f.first_day.min(*day);
        f.last_day = f.last_day.max(*day);
    }
    // Many at once (the sections' look-ups overlapped, newest first) agree
    // with one by one.
    let refs: Vec<&str> = identities.iter().map(String::as_str).collect();
    let one_by_one: Vec<Option<u32>> = refs.iter().map(|k| snap.customer_id(k).unwrap()).collect();
    assert_eq!(snap.customer_ids(&refs).unwrap(), one_by_one, "seed {seed}");
    let mut customer_of: HashMap<usize, u32> = HashMap::new();
    for (i, identity) in identities.iter().enumerate() {
        let c = comps.find(i);
        let got = snap.customer_id(identity).unwrap();
        if !model.contains_key(&c) {
            assert_eq!(got, None, "seed {seed}: {identity} was never ingested");
            continue;
        }
        let got = got.unwrap_or_else(|| panic!("seed {seed}: {identity} names no one"));
        match customer_of.get(&c) {
            Some(&want) => assert_eq!(got, want, "seed {seed}: {identity} split off"),
            None => {
                customer_of.insert(c, got);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for &id in customer_of.values() {
        assert!(
            seen.insert(id),
            "seed {seed}: two groups share customer {id}"
        );
    }
    assert_eq!(
        snap.customer_count().unwrap(),
        model.len() as u64,
        "seed {seed}: one live customer per group"
    );
    assert_eq!(snap.customer_id(BLOCKED).unwrap(), None, "seed {seed}");
    for (d, first) in devices {
        let want = customer_of[&comps.find(*first)];
        assert_eq!(
            snap.customer_id(&format!("device:t{d}")).unwrap(),
            Some(want),
            "seed {seed}: tablet {d}"
        );
    }
    let value = |name: &str, id: u32| snap.field(name).unwrap().int_value(id).unwrap();
    for (c, want) in &model {
        let id = customer_of[c];
        let got = Facts {
            orders: value("orders", id).unwrap_or(0),
            spend: value("spend", id).unwrap_or(0),
            first_day: value("first_day", id).unwrap_or(i64::MAX),
            last_day: value("last_day", id).unwrap_or(i64::MIN),
        };
        assert_eq!(got, *want, "seed {seed}: facts of customer {id}");
    }
}

#[test]
fn one_customer_per_linked_group_with_its_facts() {
    if let Ok(seed) = std::env::var("TAGSTORE_SEED") {
        run(seed.parse().expect("TAGSTORE_SEED is a number"));
        return;
    }
    for seed in 0..40 {
        run(seed);
    }
}
