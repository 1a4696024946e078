//! The event archive at the engine's level: ingested events reach it
//! through the log at each checkpoint (after a crash too), exactly once,
//! without the events of customers erased before; files past retention go;
//! and a rebuild of facts leaves alone the customers whose events arrived
//! after the archive it read.

use std::sync::Arc;

use roaring::RoaringBitmap;
use tagstore::clock::ManualClock;
use tagstore::fields::FieldKind;
use tagstore::storage::archive;
use tagstore::storage::datadir::DataDir;
use tagstore::storage::fs::MemFs;
use tagstore::storage::seen::seen_id;
use tagstore::storage::{
    Combine, Engine, EngineConfig, IngestRecord, KeptEvent, ValueWrite, WriteOp,
};

const DIR: &str = "/mem/store";
const DAY_MS: i64 = 86_400_000;
// 2026-11-12T00:00:00Z
const T0: i64 = 1_794_441_600_000;

fn open(fs: &MemFs, clock: &Arc<ManualClock>, retention_days: u32) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.clock = clock.clone();
    cfg.event_retention_days = retention_days;
    Engine::open(cfg).unwrap()
}

/// An order `id` of `customer`; the archive keeps the text `event:<id>`.
fn order(id: &str, customer: &str) -> IngestRecord {
    IngestRecord {
        refund: None,
        unless_refunded: Vec::new(),
        order: None,
        identities: Vec::new(),
        place: String::new(),
        at_ms: 0,
        seen: Some(seen_id("s", "order", id)),
        writes: vec![ValueWrite::Combine {
            field: "order_count".into(),
            customer: customer.into(),
            with: Combine::Add(1),
        }],
        event: Some(KeptEvent {
            customer: customer.into(),
            bytes: format!("event:{id}").into_bytes(),
        }),
    }
}

fn ingest(engine: &Engine, records: Vec<IngestRecord>) {
    engine
        .write_blocking(WriteOp::Ingest {
            records: records.into(),
        })
        .unwrap();
}

fn id(engine: &Engine, key: &str) -> u32 {
    engine.snapshot().dict.lookup(key).unwrap().unwrap()
}

/// The archived events of the customers with `keys`, as text, sorted.
fn archived(engine: &Engine, keys: &[&str]) -> Vec<String> {
    let ids: RoaringBitmap = keys.iter().map(|k| id(engine, k)).collect();
    let mut out = Vec::new();
    engine
        .read_archive(&ids, |_, bytes| {
            out.push(String::from_utf8(bytes.to_vec()).unwrap());
            Ok(())
        })
        .unwrap();
    out.sort();
    out
}

fn setup(engine: &Engine) {
    engine
        .write_blocking(WriteOp::CreateField {
            name: "order_count".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Int,
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
}

#[test]
fn events_reach_the_archive_once_through_the_log_and_a_crash() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock, 0);
    setup(&engine);
    ingest(
        &engine,
        vec![order("1", "a"), order("2", "b"), order("3", "a")],
    );
    // Not yet checkpointed: the archive is empty, the events are in the log.
    assert!(archived(&engine, &["a", "b"]).is_empty());
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(archived(&engine, &["a"]), ["event:1", "event:3"]);
    assert_eq!(archived(&engine, &["b"]), ["event:2"]);

    // A duplicate is not archived again; a crash before the next
    // checkpoint loses nothing of the log's events.
    ingest(
        &engine,
        vec![order("3", "a"), order("4", "a"), order("5", "c")],
    );
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock, 0);
    assert_eq!(archived(&engine, &["a"]), ["event:1", "event:3"]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(
        archived(&engine, &["a", "b", "c"]),
        ["event:1", "event:2", "event:3", "event:4", "event:5"]
    );
    // A checkpoint with nothing new writes no file; another one with new
    // events writes one more.
    let files = |fs: &MemFs| archive::list(&DataDir::new(Arc::new(fs.clone()), DIR)).unwrap();
    assert_eq!(files(&crashed).len(), 2);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(files(&crashed).len(), 2);

    // An erased customer's events are not archived after the erasure.
    ingest(&engine, vec![order("6", "d"), order("7", "a")]);
    let d = id(&engine, "d");
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["d".into()],
        })
        .unwrap();
    engine.checkpoint_blocking(Default::default()).unwrap();
    let mut all = Vec::new();
    let everyone: RoaringBitmap = (0..100).collect();
    engine
        .read_archive(&everyone, |c, bytes| {
            all.push((c, String::from_utf8(bytes.to_vec()).unwrap()));
            Ok(())
        })
        .unwrap();
    assert_eq!(all.len(), 6, "{all:?}");
    assert!(all.iter().all(|(c, _)| *c != d));
    assert_eq!(files(&crashed).len(), 3);
    // After a clean restart, the same.
    drop(engine);
    let engine = open(&crashed, &clock, 0);
    assert_eq!(
        archived(&engine, &["a"]),
        ["event:1", "event:3", "event:4", "event:7"]
    );
}

#[test]
fn files_past_retention_go_whole_and_are_recorded() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock, 10);
    setup(&engine);
    ingest(&engine, vec![order("1", "a")]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    clock.advance_ms(5 * DAY_MS);
    ingest(&engine, vec![order("2", "a")]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(archived(&engine, &["a"]), ["event:1", "event:2"]);
    assert_eq!(engine.snapshot().archive.dropped_to_ms, 0);
    // Day 11: the first file's newest event is past 10 days; the second's not.
    clock.advance_ms(6 * DAY_MS);
    ingest(&engine, vec![order("3", "a")]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(archived(&engine, &["a"]), ["event:2", "event:3"]);
    let archive = engine.snapshot().archive.clone();
    assert_eq!(archive.dropped_to_ms, T0);
    assert_eq!(archive.files.len(), 2);
    let on_disk = archive::list(&DataDir::new(Arc::new(fs.clone()), DIR)).unwrap();
    assert_eq!(on_disk.len(), 2, "the dropped file is deleted");
    // Recorded across a restart, and facts are untouched by it.
    drop(engine);
    let engine = open(&fs, &clock, 10);
    assert_eq!(engine.snapshot().archive.dropped_to_ms, T0);
    let snap = engine.snapshot();
    let a = id(&engine, "a");
    assert_eq!(
        snap.field("order_count").unwrap().int_value(a).unwrap(),
        Some(3)
    );
}

#[test]
fn a_rebuild_leaves_customers_with_newer_events_alone() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock, 0);
    setup(&engine);
    ingest(&engine, vec![order("1", "a"), order("2", "b")]);
    let info = engine.checkpoint_blocking(Default::default()).unwrap();
    let as_of = engine.snapshot().archive.upto_lsn;
    assert_eq!(as_of, info.lsn);
    // b orders again after the archive was read.
    ingest(&engine, vec![order("3", "b")]);
    let rebuild = |as_of| WriteOp::RebuildFacts {
        as_of,
        customers: vec!["a".into(), "b".into(), "nobody".into()],
        erase: vec!["order_count".into()],
        writes: ["a", "b"]
            .iter()
            .map(|k| ValueWrite::Int {
                field: "order_count".into(),
                customer: (*k).into(),
                value: Some(10),
            })
            .collect(),
    };
    let r = engine.write_blocking(rebuild(as_of)).unwrap();
    assert_eq!(r.busy, ["b"]);
    let value = |k: &str| {
        engine
            .snapshot()
            .field("order_count")
            .unwrap()
            .int_value(id(&engine, k))
            .unwrap()
    };
    assert_eq!(value("a"), Some(10));
    assert_eq!(value("b"), Some(2));
    // Once a newer checkpoint began, an older archive can vouch for nobody.
    engine.checkpoint_blocking(Default::default()).unwrap();
    let r = engine.write_blocking(rebuild(as_of)).unwrap();
    assert_eq!(r.busy, ["a", "b"]);
    // With the new one, both; and the erase leaves no stale value behind.
    let as_of = engine.snapshot().archive.upto_lsn;
    let r = engine
        .write_blocking(WriteOp::RebuildFacts {
            as_of,
            customers: vec!["a".into(), "b".into()],
            erase: vec!["order_count".into()],
            writes: vec![ValueWrite::Int {
                field: "order_count".into(),
                customer: "b".into(),
                value: Some(7),
            }],
        })
        .unwrap();
    assert!(r.busy.is_empty());
    assert_eq!(value("a"), None);
    assert_eq!(value("b"), Some(7));
    // The same after a crash (the rebuild is one logged write).
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed, &clock, 0);
    let snap = engine.snapshot();
    let f = snap.field("order_count").unwrap();
    assert_eq!(f.int_value(id(&engine, "a")).unwrap(), None);
    assert_eq!(f.int_value(id(&engine, "b")).unwrap(), Some(7));
}

/// Erasing a customer takes their archived events out of the archive at the
/// next checkpoint: a file holding them is rewritten without them (or goes,
/// when nothing else is left), also across a crash and a restart.
#[test]
fn erased_customers_events_leave_the_archive() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock, 0);
    setup(&engine);
    ingest(
        &engine,
        vec![order("1", "a"), order("2", "b"), order("3", "a")],
    );
    engine.checkpoint_blocking(Default::default()).unwrap();
    ingest(&engine, vec![order("4", "a")]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    let files = |fs: &MemFs| archive::list(&DataDir::new(Arc::new(fs.clone()), DIR)).unwrap();
    let before = files(&fs);
    assert_eq!(before.len(), 2);
    let everyone: RoaringBitmap = (0..100).collect();
    let all = |engine: &Engine| {
        let mut out = Vec::new();
        engine
            .read_archive(&everyone, |_, bytes| {
                out.push(String::from_utf8(bytes.to_vec()).unwrap());
                Ok(())
            })
            .unwrap();
        out.sort();
        out
    };
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["a".into()],
        })
        .unwrap();
    engine.checkpoint_blocking(Default::default()).unwrap();
    // The first file rewritten with b's event only; the second, a's alone, gone.
    assert_eq!(all(&engine), ["event:2"]);
    let after = files(&fs);
    assert_eq!(after.len(), 1);
    assert!(!before.contains(&after[0]), "{before:?} {after:?}");
    let crashed = fs.crash_image();
    drop(engine);
    for fs in [crashed, fs] {
        let engine = open(&fs, &clock, 0);
        assert_eq!(all(&engine), ["event:2"]);
        assert_eq!(files(&fs).len(), 1);
    }
}

/// An archive file that cannot be read (damaged, or gone) when customers
/// are erased is left as it is and said so: checkpoints go on (before, each
/// one failed on it, and the log would have grown without end).
#[test]
fn an_unreadable_archive_file_does_not_stop_checkpoints_after_an_erasure() {
    use tagstore::storage::fs::{Create, FileSystem};
    for damage in ["flipped", "gone"] {
        let fs = MemFs::new();
        let clock = ManualClock::at(T0);
        let engine = open(&fs, &clock, 0);
        setup(&engine);
        ingest(&engine, vec![order("1", "a"), order("2", "b")]);
        engine.checkpoint_blocking(Default::default()).unwrap();
        let dir = DataDir::new(Arc::new(fs.clone()), DIR);
        let [no] = archive::list(&dir).unwrap()[..] else {
            panic!("one archive file expected")
        };
        let path = dir.join(archive::file_name(no));
        if damage == "gone" {
            fs.remove(&path).unwrap();
        } else {
            let mut bytes = fs.read(&path).unwrap();
            bytes[20] ^= 0xff;
            fs.create(&path, Create::Truncate)
                .unwrap()
                .write_at(&bytes, 0)
                .unwrap();
        }
        engine
            .write_blocking(WriteOp::DeleteCustomers {
                customers: vec!["a".into()],
            })
            .unwrap();
        ingest(&engine, vec![order("3", "b")]);
        engine
            .checkpoint_blocking(Default::default())
            .unwrap_or_else(|e| panic!("{damage}: {e}"));
        // Still named (a rebuild will say it is damaged); the new events
        // have their own file; the next checkpoint works too.
        assert_eq!(engine.snapshot().archive.files.len(), 2, "{damage}");
        ingest(&engine, vec![order("4", "b")]);
        engine.checkpoint_blocking(Default::default()).unwrap();
    }
}

/// A full disk refuses a rebuild's write whole (no value erased, none set)
/// and leaves the store writable; with space back, the same rebuild applies.
#[test]
fn a_full_disk_refuses_a_rebuild_whole() {
    let fs = MemFs::new();
    let clock = ManualClock::at(T0);
    let engine = open(&fs, &clock, 0);
    setup(&engine);
    ingest(&engine, vec![order("1", "a")]);
    // Enough customers that the rebuild's record passes the log's 4 MiB
    // allocated ahead.
    let many: Vec<String> = (0..400_000).map(|i| format!("c{i}")).collect();
    engine
        .write_blocking(WriteOp::CreateCustomers {
            customers: many.clone(),
        })
        .unwrap();
    engine.checkpoint_blocking(Default::default()).unwrap();
    let as_of = engine.snapshot().archive.upto_lsn;
    let value = |engine: &Engine, k: &str| {
        engine
            .snapshot()
            .field("order_count")
            .unwrap()
            .int_value(id(engine, k))
            .unwrap()
    };
    let mut customers = many.clone();
    customers.push("a".into());
    let rebuild = || WriteOp::RebuildFacts {
        as_of,
        customers: customers.clone(),
        erase: vec!["order_count".into()],
        writes: customers
            .iter()
            .map(|k| ValueWrite::Int {
                field: "order_count".into(),
                customer: k.clone(),
                value: Some(7),
            })
            .collect(),
    };
    fs.set_capacity(Some(fs.used_bytes() + 4096));
    let err = engine.write_blocking(rebuild()).unwrap_err();
    assert!(matches!(err, tagstore::Error::DiskFull(_)), "{err}");
    assert_eq!(engine.failure(), None);
    assert_eq!(value(&engine, "a"), Some(1));
    assert_eq!(value(&engine, "c5"), None);
    fs.set_capacity(None);
    let r = engine.write_blocking(rebuild()).unwrap();
    assert!(r.busy.is_empty());
    assert_eq!(value(&engine, "a"), Some(7));
    assert_eq!(value(&engine, "c399999"), Some(7));
}
