//! Backups and restores at the engine's level (randomized, in memory):
//! random writes, erasures, dropped tags, checkpoints (which compact and
//! delete files), full backups and chains of increments taken between
//! them, and backups opened before a checkpoint deleted their files and
//! written after. Every backup chain, restored into a new directory and
//! started, must hold exactly the store's state at the backup's position;
//! a damaged, cut or misordered chain must be refused, never restored.
//!
//! `TAGSTORE_SEED=n` replays one run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::fields::FieldKind;
use tagstore::storage::backup::{self, HEADER_LEN, Header};
use tagstore::storage::fs::{FileSystem, MemFs};
use tagstore::storage::{
    CheckpointOptions, DataDir, Engine, EngineConfig, Mutation, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
const TAGS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 3] = ["x", "y", "z"];

fn open(fs: &MemFs, dir: &str) -> Engine {
    let mut cfg = EngineConfig::new(dir);
    cfg.fs = Arc::new(fs.clone());
    Engine::open(cfg).unwrap()
}

type State = BTreeMap<String, BTreeSet<u32>>;
/// A backup's bytes and the store's lsn and state when it was taken.
type Taken = (Vec<u8>, (u64, State));

/// Every tag's and enumerated value's members, the live set, and the lsn.
fn state(engine: &Engine) -> (u64, State) {
    let snap = engine.snapshot();
    let mut out = common::memberships(&snap);
    out.insert("live".into(), snap.live().unwrap().iter().collect());
    (snap.lsn, out)
}

/// A backup of `engine` (an increment of `base` when given), in memory.
fn take(engine: &Engine, base: Option<&[u8]>) -> Vec<u8> {
    let source = engine.backup_source().unwrap();
    write(source, base)
}

fn write(source: backup::Source, base: Option<&[u8]>) -> Vec<u8> {
    let base = base.map(|b| Header::decode(&b[..HEADER_LEN]).unwrap());
    let mut out = Vec::new();
    let mut last = 0;
    source
        .write(base.as_ref(), &mut out, &mut |done, total| {
            assert!(done >= last && done <= total);
            last = done;
        })
        .unwrap();
    out
}

/// Restores `chain` into a new in-memory directory and opens it.
fn restore(chain: &[&[u8]]) -> Result<(MemFs, Engine), String> {
    let fs = MemFs::new();
    fs.create_dir_all(std::path::Path::new("/mem/restored"))
        .unwrap();
    let dir = DataDir::new(Arc::new(fs.clone()), "/mem/restored");
    let inputs: Vec<(PathBuf, Box<dyn Read>)> = chain
        .iter()
        .enumerate()
        .map(|(i, b)| {
            (
                PathBuf::from(format!("backup-{i}")),
                Box::new(std::io::Cursor::new(b.to_vec())) as Box<dyn Read>,
            )
        })
        .collect();
    backup::restore_into(inputs, &dir).map_err(|e| e.to_string())?;
    backup::restore::check_restored(&dir).map_err(|e| e.to_string())?;
    let engine = open(&fs, "/mem/restored");
    Ok((fs, engine))
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
    match rng.random_range(0..12) {
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
            let customers: Vec<String> = (0..3).map(|_| k(rng)).collect();
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
        10 => {
            engine
                .write_blocking(WriteOp::DropTag { name: "c".into() })
                .unwrap();
            create_tag(engine, "c");
        }
        _ => {
            engine
                .checkpoint_blocking(CheckpointOptions::default())
                .unwrap();
        }
    }
}

fn run(seed: u64) -> usize {
    let fs = MemFs::new();
    let engine = open(&fs, DIR);
    let mut rng = StdRng::seed_from_u64(seed);
    // A backup of an empty store restores to an empty store.
    let empty = take(&engine, None);
    let (_, e) = restore(&[&empty]).unwrap();
    assert_eq!(state(&e), state(&engine), "seed {seed}: empty store");
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
    // Chains of backups (a full one, then increments), with the state at
    // each one's position.
    let mut chains: Vec<Vec<Taken>> = Vec::new();
    let mut checked = 0;
    for step in 0..200 {
        random_write(&engine, &mut rng);
        match rng.random_range(0..14) {
            0 => {
                let b = take(&engine, None);
                chains.push(vec![(b, state(&engine))]);
            }
            1..=2 if !chains.is_empty() => {
                let chain = chains.last_mut().unwrap();
                let b = take(&engine, Some(&chain.last().unwrap().0));
                chain.push((b, state(&engine)));
            }
            3 => {
                // Opened now; the files it copies are deleted by
                // checkpoints before it is written.
                let source = engine.backup_source().unwrap();
                let at = state(&engine);
                for _ in 0..rng.random_range(1..6) {
                    random_write(&engine, &mut rng);
                    engine
                        .checkpoint_blocking(CheckpointOptions::default())
                        .unwrap();
                }
                let b = write(source, None);
                chains.push(vec![(b, at)]);
            }
            _ => {}
        }
        if step % 50 == 49 {
            for chain in &chains {
                for upto in 1..=chain.len() {
                    let bytes: Vec<&[u8]> = chain[..upto].iter().map(|c| c.0.as_slice()).collect();
                    let (_, restored) = restore(&bytes)
                        .unwrap_or_else(|e| panic!("seed {seed}, step {step}: restore: {e}"));
                    assert_eq!(
                        state(&restored),
                        chain[upto - 1].1,
                        "seed {seed}, step {step}: chain of {upto}"
                    );
                    // The restored store goes on writing after the position.
                    random_write(&restored, &mut rng);
                    restored.shutdown().unwrap();
                    checked += 1;
                }
            }
        }
    }
    // Damage is refused: a byte changed anywhere, a cut, an increment
    // without its base or after the wrong one.
    if let Some(chain) = chains.iter().find(|c| c.len() >= 2) {
        let full = &chain[0].0;
        let inc = &chain[1].0;
        // (A bit zstd's frame header does not need, such as its window
        // size, may change and leave the content whole: then the restore
        // must be exact.)
        let mut refused = 0;
        for _ in 0..40 {
            let mut bad = full.clone();
            let at = rng.random_range(0..bad.len());
            bad[at] ^= 1 << rng.random_range(0..8);
            match restore(&[&bad]) {
                Err(_) => refused += 1,
                Ok((_, e)) => assert_eq!(
                    state(&e),
                    chain[0].1,
                    "seed {seed}: a changed byte at {at} of {} restored wrongly",
                    bad.len()
                ),
            }
        }
        assert!(refused >= 30, "seed {seed}: only {refused} of 40 refused");
        let cut = &full[..rng.random_range(0..full.len())];
        assert!(
            restore(&[cut]).is_err(),
            "seed {seed}: a cut backup restored"
        );
        let err = restore(&[inc]).err().unwrap();
        assert!(err.contains("is an increment"), "{err}");
        if let Some(other) = chains.iter().find(|c| c[0].0 != *full) {
            let err = restore(&[&other[0].0, inc]).err().unwrap();
            assert!(err.contains("not of the file before it"), "{err}");
        }
    }
    engine.shutdown().unwrap();
    checked
}

#[test]
fn restored_chains_hold_the_state_at_their_position() {
    let seeds: Vec<u64> = match std::env::var("TAGSTORE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=4).collect(),
    };
    let mut checked = 0;
    for seed in seeds {
        checked += run(seed);
    }
    assert!(checked >= 8, "only {checked} restores checked");
}
