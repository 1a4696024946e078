//! The engine's half of ingestion: sources kept in the store, and ingested
//! events applied once: across a clean restart, a restart from the log
//! alone, a crash (the in-memory file system's image of what reached the
//! disk), checkpoints and compaction; forgotten after their retention.

use std::sync::Arc;

use tagstore::clock::ManualClock;
use tagstore::fields::FieldKind;
use tagstore::storage::fs::MemFs;
use tagstore::storage::seen::seen_id;
use tagstore::storage::{Combine, Engine, EngineConfig, IngestRecord, ValueWrite, WriteOp};

const DIR: &str = "/mem/store";
const DAY_MS: i64 = 86_400_000;
// 2026-11-12T00:00:00Z
const T0: i64 = 1_794_441_600_000;

fn open(fs: &MemFs, clock: &Arc<ManualClock>) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    cfg.dedup_days = 3;
    Engine::open(cfg).unwrap()
}

/// An order of `amount` fen by `customer`, with source event id `id`.
fn order(id: &str, customer: &str, amount: i64) -> IngestRecord {
    IngestRecord {
        refund: None,
        unless_refunded: Vec::new(),
        order: None,
        identities: Vec::new(),
        place: String::new(),
        at_ms: 0,
        seen: Some(seen_id("jd_orders", "order", id)),
        writes: vec![
            ValueWrite::Combine {
                field: "order_count".into(),
                customer: customer.into(),
                with: Combine::Add(1),
            },
            ValueWrite::Combine {
                field: "total_spend_fen".into(),
                customer: customer.into(),
                with: Combine::Add(amount),
            },
        ],
        event: None,
    }
}

fn ingest(engine: &Engine, records: Vec<IngestRecord>) -> Vec<u32> {
    engine
        .write_blocking(WriteOp::Ingest {
            records: records.into(),
        })
        .unwrap()
        .duplicates
}

fn value(engine: &Engine, field: &str, customer: &str) -> Option<i64> {
    let snap = engine.snapshot();
    let id = snap.dict.lookup(customer).unwrap()?;
    snap.field(field).unwrap().int_value(id).unwrap()
}

fn setup(engine: &Engine) {
    for name in ["order_count", "total_spend_fen"] {
        engine
            .write_blocking(WriteOp::CreateField {
                name: name.into(),
                description: String::new(),
                category: String::new(),
                kind: FieldKind::Int,
                merge: Default::default(),
                if_not_exists: false,
            })
            .unwrap();
    }
    engine
        .write_blocking(WriteOp::PutSource {
            name: "jd_orders".into(),
            definition: "format = \"csv\"".into(),
            replace: false,
        })
        .unwrap();
}

#[test]
fn an_event_is_applied_once_across_restarts_checkpoints_and_crashes() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);

    // Within one request, and against what is already remembered.
    let dups = ingest(
        &engine,
        vec![
            order("J1", "a", 100),
            order("J2", "a", 50),
            order("J1", "a", 100),
        ],
    );
    assert_eq!(dups, vec![2]);
    assert_eq!(value(&engine, "order_count", "a"), Some(2));
    assert_eq!(
        ingest(&engine, vec![order("J2", "a", 50), order("J3", "b", 7)]),
        vec![0]
    );
    // A record without an id is applied each time.
    let plain = IngestRecord {
        refund: None,
        unless_refunded: Vec::new(),
        order: None,
        identities: Vec::new(),
        place: String::new(),
        at_ms: 0,
        seen: None,
        ..order("x", "c", 1)
    };
    assert!(ingest(&engine, vec![plain.clone(), plain]).is_empty());
    assert_eq!(value(&engine, "order_count", "c"), Some(2));

    // From the log alone, after a crash.
    let crashed = fs.crash_image();
    drop(engine);
    for fs in [crashed, fs.clone()] {
        let engine = open(&fs, &clock);
        assert_eq!(ingest(&engine, vec![order("J1", "a", 100)]), vec![0]);
        assert_eq!(value(&engine, "total_spend_fen", "a"), Some(150));
        assert_eq!(value(&engine, "total_spend_fen", "b"), Some(7));
    }

    // From a checkpoint (and again after compaction rewrites its segment).
    let engine = open(&fs, &clock);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert!(ingest(&engine, vec![order("J4", "b", 3)]).is_empty());
    for _ in 0..12 {
        // Checkpoints of other changes leave many small segments: the
        // compaction moves the day's ids (or the checkpoint rewrites them).
        engine
            .write_blocking(WriteOp::SetValues {
                writes: vec![ValueWrite::Int {
                    field: "order_count".into(),
                    customer: "z".into(),
                    value: Some(1),
                }],
            })
            .unwrap();
        engine.checkpoint_blocking(Default::default()).unwrap();
    }
    drop(engine);
    let crashed = fs.crash_image();
    for fs in [crashed, fs.clone()] {
        let engine = open(&fs, &clock);
        assert_eq!(
            ingest(&engine, vec![order("J1", "a", 100), order("J4", "b", 3)]),
            vec![0, 1]
        );
        assert_eq!(value(&engine, "total_spend_fen", "b"), Some(10));
        let snap = engine.snapshot();
        let src = snap.sources.get("jd_orders").unwrap();
        assert_eq!(src.definition, "format = \"csv\"");
        assert_eq!(src.created_ms, T0);
    }
}

#[test]
fn remembered_ids_are_forgotten_after_their_retention() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    assert!(ingest(&engine, vec![order("J1", "a", 100)]).is_empty());
    // Three days later (dedup_days = 3) it is still remembered.
    clock.advance_ms(3 * DAY_MS);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(ingest(&engine, vec![order("J1", "a", 100)]), vec![0]);
    // The day after, its day is dropped at the next checkpoint, durably.
    clock.advance_ms(DAY_MS);
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&fs, &clock);
    assert!(ingest(&engine, vec![order("J1", "a", 100)]).is_empty());
    assert_eq!(value(&engine, "order_count", "a"), Some(2));
}

#[test]
fn sources_are_defined_replaced_and_dropped() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    let put = |replace: bool, def: &str| {
        engine.write_blocking(WriteOp::PutSource {
            name: "jd_orders".into(),
            definition: def.into(),
            replace,
        })
    };
    let e = put(false, "x").unwrap_err();
    assert!(matches!(e, tagstore::Error::SourceExists(_)), "{e}");
    clock.advance_ms(1_000);
    assert!(!put(true, "format = \"jsonl\"").unwrap().created);
    let e = put(true, &"#".repeat(70_000)).unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    // At most 256 sources (jd_orders is one).
    for i in 1..256 {
        engine
            .write_blocking(WriteOp::PutSource {
                name: format!("s{i}"),
                definition: "x".into(),
                replace: false,
            })
            .unwrap();
    }
    let e = engine
        .write_blocking(WriteOp::PutSource {
            name: "one_more".into(),
            definition: "x".into(),
            replace: false,
        })
        .unwrap_err();
    assert!(e.to_string().contains("at most 256"), "{e}");
    for i in 1..256 {
        engine
            .write_blocking(WriteOp::DropSource {
                name: format!("s{i}"),
            })
            .unwrap();
    }
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&fs, &clock);
    let snap = engine.snapshot();
    let s = snap.sources.get("jd_orders").unwrap();
    assert_eq!(
        (s.definition.as_str(), s.created_ms, s.updated_ms),
        ("format = \"jsonl\"", T0, T0 + 1_000)
    );
    engine
        .write_blocking(WriteOp::DropSource {
            name: "jd_orders".into(),
        })
        .unwrap();
    let e = engine
        .write_blocking(WriteOp::DropSource {
            name: "jd_orders".into(),
        })
        .unwrap_err();
    assert!(matches!(e, tagstore::Error::SourceNotFound(_)), "{e}");
    drop(engine);
    let engine = open(&fs, &clock);
    assert!(engine.snapshot().sources.is_empty());
}

/// A full disk during an ingest refuses that batch whole: no fact and no
/// remembered id lands, the store stays writable, and the same batch sent
/// once space is back is applied in full (nothing counted as a duplicate).
#[test]
fn a_full_disk_refuses_an_ingest_batch_whole() {
    use tagstore::storage::fs::Op;
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    // More than the 4 MiB the log allocates ahead: new long keys and ids.
    let batch = || -> Vec<IngestRecord> {
        (0..80_000)
            .map(|i| order(&format!("F{i}"), &format!("{}{i}", "k".repeat(60)), 1))
            .collect()
    };
    fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC);
    let err = engine
        .write_blocking(WriteOp::Ingest {
            records: batch().into(),
        })
        .unwrap_err();
    assert!(matches!(err, tagstore::Error::DiskFull(_)), "{err}");
    assert_eq!(engine.failure(), None);
    assert_eq!(
        value(&engine, "order_count", &format!("{}0", "k".repeat(60))),
        None
    );
    fs.clear_faults();
    let r = engine
        .write_blocking(WriteOp::Ingest {
            records: batch().into(),
        })
        .unwrap();
    assert!(r.duplicates.is_empty());
    assert_eq!(r.events_seen, 80_000);
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock);
    assert_eq!(
        ingest(
            &engine,
            vec![order("F7", &format!("{}7", "k".repeat(60)), 1)]
        ),
        vec![0]
    );
}

/// What a Kafka source consumed and did not apply is kept with its
/// positions: the newest 100 per source, across a crash (the log), a
/// checkpoint and a restart; redefining the source keeps them, dropping it
/// drops them; a reject of another source or with an overlong reason is
/// refused whole.
#[test]
fn rejects_are_kept_with_positions_bounded_and_dropped_with_their_source() {
    use tagstore::storage::record::{MAX_REJECT_REASON, SourcePositions, SourceReject};
    use tagstore::storage::snapshot::KEPT_REJECTS;

    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock);
    setup(&engine);
    let reject = |offset: i64, reason: String| SourceReject {
        source: "jd_orders".into(),
        skipped: offset % 7 == 0,
        topic: "orders".into(),
        partition: (offset % 3) as i32,
        offset,
        reason,
    };
    let consume = |engine: &Engine, from: i64, n: i64| {
        engine.write_blocking(WriteOp::Consume {
            records: Vec::new(),
            positions: SourcePositions {
                source: "jd_orders".into(),
                next: vec![("orders".into(), 0, from + n)],
            },
            rejects: (from..from + n)
                .map(|o| reject(o, format!("record {o}: 不是 JSON")))
                .collect(),
        })
    };
    // 130 over three batches, the last in one batch of 60.
    consume(&engine, 0, 30).unwrap();
    clock.advance_ms(1_000);
    consume(&engine, 30, 40).unwrap();
    clock.advance_ms(1_000);
    consume(&engine, 70, 60).unwrap();
    let kept = |engine: &Engine| {
        let snap = engine.snapshot();
        snap.rejects
            .get("jd_orders")
            .map(|k| k.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let check = |engine: &Engine| {
        let k = kept(engine);
        assert_eq!(k.len(), KEPT_REJECTS);
        let offsets: Vec<i64> = k.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (30..130).collect::<Vec<_>>());
        for r in &k {
            assert_eq!(r.reason, format!("record {}: 不是 JSON", r.offset));
            assert_eq!(r.skipped, r.offset % 7 == 0);
            assert_eq!(r.partition, (r.offset % 3) as i32);
            assert_eq!(
                r.at_ms,
                if r.offset < 70 {
                    T0 + 1_000
                } else {
                    T0 + 2_000
                }
            );
        }
        let snap = engine.snapshot();
        assert_eq!(snap.positions["jd_orders"][&("orders".to_string(), 0)], 130);
    };
    check(&engine);

    // Refused whole: nothing kept, the position not moved.
    let e = engine
        .write_blocking(WriteOp::Consume {
            records: Vec::new(),
            positions: SourcePositions {
                source: "jd_orders".into(),
                next: vec![("orders".into(), 0, 500)],
            },
            rejects: vec![reject(200, "x".repeat(MAX_REJECT_REASON + 1))],
        })
        .unwrap_err();
    assert!(e.to_string().contains("at most 512"), "{e}");
    let e = engine
        .write_blocking(WriteOp::Consume {
            records: Vec::new(),
            positions: SourcePositions {
                source: "jd_orders".into(),
                next: vec![("orders".into(), 0, 500)],
            },
            rejects: vec![SourceReject {
                source: "other".into(),
                ..reject(200, "r".into())
            }],
        })
        .unwrap_err();
    assert!(e.to_string().contains("\"other\""), "{e}");
    check(&engine);

    // From the log alone, after a crash; then from a checkpoint.
    let crashed = fs.crash_image();
    drop(engine);
    check(&open(&crashed, &clock));
    let engine = open(&fs, &clock);
    check(&engine);
    engine.checkpoint_blocking(Default::default()).unwrap();
    drop(engine);
    let engine = open(&fs, &clock);
    check(&engine);
    // One more after the checkpoint: the oldest goes.
    consume(&engine, 130, 1).unwrap();
    assert_eq!(kept(&engine).first().map(|r| r.offset), Some(31));

    // Redefined: kept. Dropped: gone, also after a restart, and a source
    // of the same name starts with none.
    engine
        .write_blocking(WriteOp::PutSource {
            name: "jd_orders".into(),
            definition: "format = \"jsonl\"".into(),
            replace: true,
        })
        .unwrap();
    assert_eq!(kept(&engine).len(), KEPT_REJECTS);
    engine
        .write_blocking(WriteOp::DropSource {
            name: "jd_orders".into(),
        })
        .unwrap();
    assert!(kept(&engine).is_empty());
    let e = consume(&engine, 131, 1).unwrap_err();
    assert!(matches!(e, tagstore::Error::SourceNotFound(_)), "{e}");
    engine
        .write_blocking(WriteOp::PutSource {
            name: "jd_orders".into(),
            definition: "format = \"csv\"".into(),
            replace: false,
        })
        .unwrap();
    drop(engine);
    let engine = open(&fs, &clock);
    assert!(kept(&engine).is_empty());
}
