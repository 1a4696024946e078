//! Randomized hostile input (#22, fuzzing), run by `cargo test`: every
//! parser and decoder that takes bytes from outside — query texts, source
//! definitions, channel records (CSV and JSON Lines, UTF-8 and GBK), log
//! records, and whole stores whose manifest or log was damaged — is fed
//! random and mutated input, thousands of times from a seed. Each must
//! answer with a value or a typed error; none may panic, hang or allocate
//! without bound. A panic fails the test with the seed and the input.
//!
//! `TAGSTORE_SEED=n` replays one run; `TAGSTORE_FUZZ_ROUNDS=n` runs longer.

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::bitmap::ShardedBitmap;
use tagstore::ingest::read::Reader;
use tagstore::ingest::source::Source;
use tagstore::query::{Query, parse};
use tagstore::storage::fs::{Create, FileSystem, MemFs};
use tagstore::storage::record::{Batch, Change, ChangeOp, NewTag, RuleChange, RuleDef};
use tagstore::storage::{Engine, EngineConfig, Mutation, Snapshot, WriteOp};

fn rounds(default: usize) -> usize {
    std::env::var("TAGSTORE_FUZZ_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("TAGSTORE_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_261_130)
}

/// Pieces queries are made of, well-formed and not.
const QUERY_PIECES: &[&str] = &[
    "a",
    "b",
    "高价值用户",
    "\"with space\"",
    "\"bad \\x\"",
    "AND",
    "OR",
    "NOT",
    "ALL",
    "(",
    ")",
    "(((",
    ")))",
    "=",
    "!=",
    "<",
    ">=",
    "<>",
    "!",
    "IN",
    "(1, 2)",
    "BETWEEN",
    "1",
    "-5",
    "'2026-11-11'",
    "''",
    "'",
    "\"",
    "IS",
    "NULL",
    "WITHIN",
    "7d",
    "0d",
    "99999999999d",
    "COUNT",
    "COUNT(",
    "n",
    "TODAY",
    "TODAY - 90",
    "TODAY-",
    "+",
    "-",
    "SNAPSHOT",
    "4294967296",
    "spend",
    ">= 500000",
    "bought WITHIN 30d",
    ",",
    " ",
    "\u{0}",
    "\u{202e}",
    "😀",
    "9223372036854775808",
    "-9223372036854775809",
];

fn snapshot() -> Snapshot {
    let t = |ids: std::ops::Range<u32>| ShardedBitmap::from_roaring(&ids.collect());
    Snapshot::in_memory(
        vec![
            ("a".into(), t(0..100)),
            ("b".into(), t(50..150)),
            ("高价值用户".into(), t(10..20)),
            ("with space".into(), t(0..1)),
        ],
        t(0..200),
    )
}

#[test]
fn queries_never_panic() {
    let snap = snapshot();
    let mut rng = StdRng::seed_from_u64(seed());
    for round in 0..rounds(20_000) {
        let text: String = (0..rng.random_range(0..24))
            .map(|_| {
                let p = QUERY_PIECES[rng.random_range(0..QUERY_PIECES.len())];
                if rng.random_bool(0.8) {
                    format!("{p} ")
                } else {
                    p.to_string()
                }
            })
            .collect();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(expr) = parse(&text)
                && let Ok(q) = Query::from_expr_at(&expr, &snap, 1_794_362_400_000)
            {
                let _ = q.count();
                let _ = q.page(None, 10);
            }
        }));
        assert!(outcome.is_ok(), "round {round}: query {text:?} panicked");
    }
}

/// A source definition, and records in its format.
const SOURCE: &str = r#"
format = "csv"
channel = "taobao"
event_type = "order"
time = "下单时间"
event_id = "订单编号"
amount = { column = "实付金额", unit = "yuan" }
category = "类目"
identities = [
  { type = "phone", column = "手机" },
  { type = "taobao_nick", column = "买家昵称" },
]
"#;

const CSV: &str = "订单编号,买家昵称,实付金额,下单时间,手机,类目\nT1,小美,\"1,299.00\",2026-11-11 20:00:05,+86 138-1234-5678,skincare\nT2,\"a \"\"b\"\"\",¥8,1794362400000,0086 13900001111,makeup\n";

fn mutate(rng: &mut StdRng, data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for _ in 0..rng.random_range(1..8) {
        if out.is_empty() {
            out.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..out.len());
        match rng.random_range(0..5) {
            0 => out[at] = rng.random(),
            1 => {
                out.remove(at);
            }
            2 => out.insert(at, rng.random()),
            3 => out.truncate(at),
            _ => {
                // A run of one byte: quotes, newlines, high bytes.
                let b = [b'"', b'\n', b',', 0xff, 0x81, b'{', b'\\'][rng.random_range(0..7)];
                for _ in 0..rng.random_range(1..40) {
                    out.insert(at.min(out.len()), b);
                }
            }
        }
    }
    out
}

#[test]
fn source_definitions_and_records_never_panic() {
    let mut rng = StdRng::seed_from_u64(seed());
    let source = Arc::new(Source::parse("tb", SOURCE).expect("the sample definition"));
    let jsonl = Arc::new(
        Source::parse(
            "j",
            &SOURCE.replace("format = \"csv\"", "format = \"jsonl\""),
        )
        .expect("the JSON Lines definition"),
    );
    let json_lines = "{\"订单编号\":\"T1\",\"买家昵称\":\"小美\",\"实付金额\":\"12.5\",\"下单时间\":1794362400,\"手机\":\"13812345678\",\"类目\":\"skincare\"}\n{\"a\":[1,{\"b\":null}]}\n";
    for round in 0..rounds(5_000) {
        let def = mutate(&mut rng, SOURCE.as_bytes());
        let def_text = String::from_utf8_lossy(&def).to_string();
        let csv = mutate(&mut rng, CSV.as_bytes());
        let lines = mutate(&mut rng, json_lines.as_bytes());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = Source::parse("x", &def_text);
            let mut r = Reader::new(source.clone());
            // Fed whole, then in two chunks at a line end.
            let _ = r.feed(&csv);
            let mut r = Reader::new(jsonl.clone());
            let _ = r.feed(&lines);
        }));
        assert!(
            outcome.is_ok(),
            "round {round}: panicked on definition {def_text:?}, CSV {:?}, JSON {:?}",
            String::from_utf8_lossy(&csv),
            String::from_utf8_lossy(&lines)
        );
    }
}

#[test]
fn log_records_never_panic() {
    let mut rng = StdRng::seed_from_u64(seed());
    let batch = Batch {
        at_ms: 42,
        new_tags: vec![NewTag {
            id: 3,
            name: "常购护肤品".into(),
            description: "d".into(),
            category: "c".into(),
        }],
        new_keys: vec![(10, "phone:1".into())],
        changes: vec![Change {
            tag: 3,
            op: ChangeOp::Add,
            ids: [10u32, 11, 1 << 20].into_iter().collect(),
        }],
        rules: vec![RuleChange {
            name: "r".into(),
            definition: Some(RuleDef {
                query: "a AND b".into(),
                time_zone: "UTC".into(),
                reads: vec!["a".into(), "b".into()],
                ..Default::default()
            }),
            day: 20_000,
        }],
        rule_days: vec![("r".into(), 20_001)],
        ..Default::default()
    };
    let bytes = batch.encode();
    assert_eq!(Batch::decode(&bytes).unwrap(), batch);
    for round in 0..rounds(20_000) {
        let bad = mutate(&mut rng, &bytes);
        let outcome = std::panic::catch_unwind(|| Batch::decode(&bad).map(|_| ()));
        assert!(outcome.is_ok(), "round {round}: batch {bad:?} panicked");
    }
}

/// Stores whose `MANIFEST` or newest log file was damaged at random: opening
/// one answers with a store or a typed error, never a panic.
#[test]
fn damaged_stores_never_panic_on_open() {
    let mut rng = StdRng::seed_from_u64(seed());
    let fs = MemFs::new();
    let dir = "/mem/store";
    let open = |fs: &MemFs| {
        let mut cfg = EngineConfig::new(dir);
        cfg.fs = Arc::new(fs.clone());
        Engine::open(cfg)
    };
    {
        let engine = open(&fs).unwrap();
        for i in 0..3 {
            engine
                .write_blocking(WriteOp::Update {
                    mutations: vec![Mutation {
                        tag: format!("t{i}"),
                        add: (0..50).map(|k| format!("k{k}")).collect(),
                        ..Default::default()
                    }],
                    create_missing_tags: true,
                })
                .unwrap();
            if i == 1 {
                engine.checkpoint_blocking(Default::default()).unwrap();
            }
        }
        engine.shutdown().unwrap();
    }
    let image = fs.crash_image();
    let files: Vec<String> = image
        .list(Path::new(dir))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .filter(|n| n == "MANIFEST" || n.starts_with("wal-") || n.ends_with(".seg"))
        .collect();
    assert!(files.iter().any(|n| n == "MANIFEST"), "{files:?}");
    for round in 0..rounds(300) {
        let damaged = image.crash_image();
        let name = &files[rng.random_range(0..files.len())];
        let path = Path::new(dir).join(name);
        let data = damaged.read(&path).unwrap();
        let bad = mutate(&mut rng, &data);
        let f = damaged.create(&path, Create::Truncate).unwrap();
        f.write_at(&bad, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(engine) = open(&damaged) {
                // What it serves must be readable or refused, never a panic.
                let snap = engine.snapshot();
                for t in snap.tags.values() {
                    let _ = t.bitmap.get().map(|b| b.len());
                }
                drop(engine);
            }
        }));
        assert!(
            outcome.is_ok(),
            "round {round}: opening with {name} damaged panicked"
        );
    }
}
