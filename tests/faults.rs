//! Failed I/O on the in-memory file system (`storage::fs::MemFs`), with the
//! engine otherwise as it runs in the server, and crashes that keep only
//! what was synced:
//!
//! - a failed log fsync or write stops writes until a restart (never
//!   acknowledge what may not be on disk) and loses nothing acknowledged;
//! - a full disk while appending to the log refuses that write only (an
//!   audience snapshot too large for the space allocated ahead among
//!   them); the store takes writes again once space is freed;
//! - a failure at any step of a checkpoint, or a full disk during one,
//!   fails the checkpoint, not the store, and a crash or a restart finds
//!   every acknowledged write; also every step, in turn, of one that
//!   compacts, merges the dictionary and writes an event archive file.

use std::collections::BTreeSet;
use std::sync::Arc;

use tagstore::query::Query;
use tagstore::storage::fs::{MemFs, Op};
use tagstore::storage::{Engine, EngineConfig, Mutation, WriteOp};

const DIR: &str = "/mem/store";

fn open(fs: &MemFs) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    Engine::open(cfg).unwrap()
}

fn add(engine: &Engine, tag: &str, keys: Vec<String>) -> tagstore::Result<()> {
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: keys,
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .map(|_| ())
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn members(engine: &Engine, tag: &str) -> BTreeSet<String> {
    let snap = engine.snapshot();
    let (ids, _) = Query::compile(tag, &snap).unwrap().page(None, usize::MAX);
    let mut out = Vec::new();
    snap.dict.keys_of(&ids, &mut out).unwrap();
    out.into_iter().collect()
}

/// A failed fsync (by the writer for a small write, by the sync thread for
/// one of 256+ memberships) or a failed log write: the write is not
/// acknowledged, every later write is refused with the cause until the
/// store is restarted, reads go on, and both a crash and a restart find
/// every acknowledged write (and the failed one at most, whole).
#[test]
fn a_failed_log_fsync_or_write_stops_writes_until_restart_and_loses_nothing() {
    for (op, size) in [(Op::Sync, 10), (Op::Sync, 2000), (Op::Write, 10)] {
        let fs = MemFs::new();
        let engine = open(&fs);
        add(&engine, "t", keys("a", 100)).unwrap();
        let acked = members(&engine, "t");
        fs.fail(op, "wal-", 0, 1, libc::EIO);
        let failed = keys("f", size);
        let err = add(&engine, "t", failed.clone()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, tagstore::Error::Failed(_)) && msg.contains("wal-"),
            "{op:?}: {msg}"
        );
        // The disk is fine again, but the store cannot know what reached it.
        fs.clear_faults();
        let again = add(&engine, "t", keys("b", 3)).unwrap_err();
        assert!(matches!(again, tagstore::Error::Failed(_)), "{again}");
        assert!(engine.checkpoint_blocking(Default::default()).is_err());
        assert!(engine.failure().is_some());
        assert_eq!(
            members(&engine, "t"),
            acked,
            "reads go on, from what was acknowledged"
        );

        let crashed = fs.crash_image();
        drop(engine);
        for fs in [crashed, fs] {
            let engine = open(&fs);
            let found = members(&engine, "t");
            assert!(
                found.is_superset(&acked),
                "{op:?}: an acknowledged write was lost"
            );
            let extra: BTreeSet<String> = found.difference(&acked).cloned().collect();
            let failed_set: BTreeSet<String> = failed.iter().cloned().collect();
            assert!(
                extra.is_empty() || extra == failed_set,
                "{op:?}: only the failed write, whole or not at all: {} extra",
                extra.len()
            );
            add(&engine, "t", keys("after", 2)).unwrap();
        }
    }
}

/// The disk fills while the log grows: the write that needs more log space
/// is refused as a full disk (nothing applied, the store not failed), reads
/// and smaller writes go on, and once space is freed the big write goes
/// through and survives a crash.
#[test]
fn a_full_disk_during_a_log_append_refuses_that_write_only() {
    for how in ["fallocate fails", "capacity reached"] {
        let fs = MemFs::new();
        let engine = open(&fs);
        add(&engine, "t", keys("a", 10)).unwrap();
        // More than the 4 MiB allocated ahead: this write needs more space.
        let big = keys(&"x".repeat(60), 80_000);
        match how {
            "fallocate fails" => fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC),
            _ => fs.set_capacity(Some(fs.used_bytes() + 1024)),
        }
        let err = add(&engine, "t", big.clone()).unwrap_err();
        assert!(matches!(err, tagstore::Error::DiskFull(_)), "{how}: {err}");
        assert_eq!(engine.failure(), None, "{how}");
        add(&engine, "t", keys("small", 5)).unwrap();
        assert_eq!(members(&engine, "t").len(), 15, "{how}");
        fs.clear_faults();
        fs.set_capacity(None);
        add(&engine, "t", big).unwrap();
        assert_eq!(members(&engine, "t").len(), 80_015, "{how}");
        let crashed = fs.crash_image();
        drop(engine);
        assert_eq!(members(&open(&crashed), "t").len(), 80_015, "{how}");
    }
}

/// Every step of a checkpoint, failed in turn, and a disk that fills
/// during one: the checkpoint fails, the store goes on taking writes, a
/// later checkpoint succeeds, and both a crash and a clean restart find
/// every acknowledged write.
#[test]
fn a_failure_at_any_step_of_a_checkpoint_fails_the_checkpoint_not_the_store() {
    /// The operation, the file name prefix, and how many such operations
    /// to let through first; `None` for a full disk instead.
    type Fault = Option<(Op, &'static str, u64)>;
    let cases: [(Fault, i32); 8] = [
        // Starting the next log file.
        (Some((Op::Create, "wal-", 0)), libc::EIO),
        (Some((Op::SyncDir, "", 0)), libc::EIO),
        (Some((Op::Write, "seg-", 0)), libc::ENOSPC),
        (Some((Op::Sync, "seg-", 0)), libc::EIO),
        (Some((Op::Sync, "MANIFEST.tmp", 0)), libc::EIO),
        (Some((Op::Rename, "MANIFEST", 0)), libc::EIO),
        // After the rename (the new log file's directory sync came first):
        // the new MANIFEST may be on disk and name the new segment, which
        // must not be deleted as a leftover.
        (Some((Op::SyncDir, "", 1)), libc::EIO),
        (None, libc::ENOSPC),
    ];
    for (fault, errno) in cases {
        let fs = MemFs::new();
        let engine = open(&fs);
        add(&engine, "t", keys("a", 3000)).unwrap();
        engine.checkpoint_blocking(Default::default()).unwrap();
        // For a full disk, more than the log's 4 MiB steps (sealing the old
        // log frees its unused tail): the segment cannot fit in what is left.
        let second = match fault {
            Some(_) => keys("b", 3000),
            None => keys(&"b".repeat(60), 80_000),
        };
        let n = 3000 + second.len();
        add(&engine, "t", second).unwrap();
        match fault {
            Some((op, prefix, skip)) => fs.fail(op, prefix, skip, 1, errno),
            // Room for the next log file, not for the segment.
            None => fs.set_capacity(Some(fs.used_bytes() + (4 << 20) + 4096)),
        }
        let Err(err) = engine.checkpoint_blocking(Default::default()) else {
            panic!("{fault:?}: the checkpoint must fail");
        };
        fs.clear_faults();
        fs.set_capacity(None);
        let msg = err.to_string();
        assert!(msg.contains("checkpoint failed"), "{fault:?}: {msg}");
        if fault.is_none() {
            assert!(msg.contains("seg-") && msg.contains("os error 28"), "{msg}");
        }
        assert_eq!(engine.failure(), None, "{fault:?}");
        add(&engine, "t", keys("c", 10)).unwrap();
        assert_eq!(members(&engine, "t").len(), n + 10);

        // A crash now: what the failed checkpoint left on disk.
        let crashed = fs.crash_image();
        assert_eq!(members(&open(&crashed), "t").len(), n + 10, "{fault:?}");

        engine
            .checkpoint_blocking(Default::default())
            .unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        add(&engine, "t", keys("d", 10)).unwrap();
        drop(engine);
        assert_eq!(members(&open(&fs), "t").len(), n + 20, "{fault:?}");
        let crashed = fs.crash_image();
        assert_eq!(members(&open(&crashed), "t").len(), n + 20, "{fault:?}");
    }
}

/// The state every step of [`every_step_of_a_checkpoint_with_compaction_and_a_merge`]
/// starts from: three checkpoints (three segments and dictionary sections,
/// the last with an event archive file), then erased customers (a merge has
/// keys to drop, and the archive file holds events of some: it is
/// rewritten). Returns the engine and the members
/// of "t" acknowledged so far.
fn every_step_scene(fs: &MemFs) -> (Engine, usize) {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.compaction = tagstore::storage::CompactionPolicy {
        max_segments: 2,
        max_dict_layers: 8,
    };
    let engine = Engine::open(cfg).unwrap();
    engine
        .write_blocking(WriteOp::CreateField {
            name: "n".into(),
            description: String::new(),
            category: String::new(),
            kind: tagstore::fields::FieldKind::Int,
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
    for round in 0..3 {
        add(&engine, "t", keys(&format!("r{round}-"), 300)).unwrap();
        add(
            &engine,
            &format!("u{round}"),
            keys(&format!("r{round}-"), 50),
        )
        .unwrap();
        if round == 2 {
            ingest_scene_events(&engine);
        }
        identity_scene(&engine, round);
        engine.checkpoint_blocking(Default::default()).unwrap();
    }
    // Erased: customers of the oldest section, and some with archived
    // events (their archive file is rewritten without them).
    let mut erased = keys("r0-", 100);
    erased.extend(keys("r1-", 10));
    erased.push("jd_pin:j0".into());
    engine
        .write_blocking(WriteOp::DeleteCustomers { customers: erased })
        .unwrap();
    add(&engine, "t", keys("late-", 100)).unwrap();
    (engine, 890)
}

/// Identities (OneID) in the scene: round 1 makes 20 customers with a phone
/// and an openid each (an identity section), round 2 links a JD pin to each
/// and merges them in pairs (10 merges: the merge log), and the last erases
/// the survivor of the first pair by its JD pin.
fn identity_scene(engine: &Engine, round: usize) {
    let record = |identities: Vec<String>| tagstore::storage::IngestRecord {
        refund: None,
        unless_refunded: Vec::new(),
        order: None,
        identities,
        place: "jd".into(),
        at_ms: 0,
        seen: None,
        writes: Vec::new(),
        event: None,
    };
    let records: Vec<_> = match round {
        1 => (0..20)
            .map(|i| record(vec![phone(i), format!("wechat_openid:o{i}")]))
            .collect(),
        2 => (0..20)
            .map(|i| record(vec![phone(i), format!("jd_pin:j{i}")]))
            .chain((0..10).map(|k| record(vec![phone(2 * k), phone(2 * k + 1)])))
            .collect(),
        _ => return,
    };
    engine
        .write_blocking(WriteOp::Ingest {
            records: records.into(),
        })
        .unwrap();
    if round == 2 {
        assert_eq!(engine.snapshot().merges.read().len(), 10);
    }
}

fn phone(i: usize) -> String {
    format!("phone:139{i:08}")
}

/// The scene's identities, as they must be after any fault: each pair one
/// customer found by any of its six identities, the erased pair found by
/// none, and the merge log whole.
fn check_identities(engine: &Engine, at: &str) {
    let snap = engine.snapshot();
    for k in 1..10 {
        let c = snap.customer_id(&phone(2 * k)).unwrap();
        assert!(c.is_some(), "{at}: pair {k}");
        for key in [
            phone(2 * k + 1),
            format!("wechat_openid:o{}", 2 * k + 1),
            format!("jd_pin:j{}", 2 * k),
        ] {
            assert_eq!(snap.customer_id(&key).unwrap(), c, "{at}: {key}");
        }
    }
    for key in [
        phone(0),
        phone(1),
        "wechat_openid:o1".into(),
        "jd_pin:j0".into(),
    ] {
        assert_eq!(snap.customer_id(&key).unwrap(), None, "{at}: erased {key}");
    }
    let log = snap.merges.read();
    assert_eq!(log.len(), 10, "{at}: the merge log");
    assert!(
        log.entries()[0].via.is_empty(),
        "{at}: an erased identity in the merge log"
    );
}

/// 50 orders of customers r1-0 … r1-49, each adding 1 to `n`, with their
/// events kept.
fn ingest_scene_events(engine: &Engine) {
    let records: Vec<_> = (0..50)
        .map(|i| tagstore::storage::IngestRecord {
            refund: None,
            unless_refunded: Vec::new(),
            order: None,
            identities: Vec::new(),
            place: String::new(),
            at_ms: 0,
            seen: Some(tagstore::storage::seen::seen_id(
                "s",
                "order",
                &i.to_string(),
            )),
            writes: vec![tagstore::storage::ValueWrite::Combine {
                field: "n".into(),
                customer: format!("r1-{i}"),
                with: tagstore::storage::Combine::Add(1),
            }],
            event: Some(tagstore::storage::KeptEvent {
                customer: format!("r1-{i}"),
                bytes: vec![7; 40],
            }),
        })
        .collect();
    engine
        .write_blocking(WriteOp::Ingest {
            records: records.into(),
        })
        .unwrap();
}

/// Every write, sync, rename, removal, creation, allocation and directory
/// sync of a checkpoint that compacts segments, merges the dictionary and
/// rewrites an event archive file without erased customers, failed in turn (the Nth of its kind, for
/// every N until none is left): the checkpoint fails or goes on without the
/// step, the store never stops taking writes, and both a crash right after
/// (only what was synced survives) and a clean restart find every
/// acknowledged write. Prints how many fault points it went through.
#[test]
fn every_step_of_a_checkpoint_with_compaction_and_a_merge() {
    let ops = [
        Op::Create,
        Op::Write,
        Op::Allocate,
        Op::SetLen,
        Op::Sync,
        Op::Rename,
        Op::Remove,
        Op::SyncDir,
    ];
    let mut points = 0;
    let mut failed_checkpoints = 0;
    for op in ops {
        for skip in 0.. {
            let fs = MemFs::new();
            let (engine, mut acked) = every_step_scene(&fs);
            fs.fail(op, "", skip, 1, libc::EIO);
            let res = engine.checkpoint_blocking(tagstore::storage::CheckpointOptions {
                merge_dictionary: true,
            });
            let fired = fs.faults_pending() == 0;
            fs.clear_faults();
            if !fired {
                // Past the last step of this kind: the checkpoint succeeded,
                // and it did compact and archive.
                assert!(res.is_ok(), "{op:?} #{skip}: {res:?}");
                let dir = tagstore::storage::datadir::DataDir::new(Arc::new(fs.clone()), DIR);
                let segments = tagstore::storage::segment::list(&dir).unwrap();
                assert!(segments.len() <= 2, "not compacted: {segments:?}");
                let files = tagstore::storage::archive::list(&dir).unwrap();
                assert_eq!(files.len(), 1, "{files:?}");
                let mut events = 0;
                let everyone: roaring::RoaringBitmap = (0..10_000).collect();
                engine
                    .read_archive(&everyone, |_, _| {
                        events += 1;
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(events, 40, "the erased customers' events are gone");
                check_identities(&engine, &format!("{op:?} #{skip}"));
                break;
            }
            points += 1;
            failed_checkpoints += res.is_err() as usize;
            let at = format!("{op:?} #{skip} ({res:?})");
            assert_eq!(engine.failure(), None, "{at}");
            add(&engine, "t", keys("after-", 10)).unwrap();
            acked += 10;
            assert_eq!(members(&engine, "t").len(), acked, "{at}");
            let n = |engine: &Engine| {
                let snap = engine.snapshot();
                let id = snap.dict.lookup("r1-17").unwrap().unwrap();
                snap.field("n").unwrap().int_value(id).unwrap()
            };
            assert_eq!(n(&engine), Some(1), "{at}");
            let crashed = fs.crash_image();
            let after_crash = open(&crashed);
            assert_eq!(
                members(&after_crash, "t").len(),
                acked,
                "{at}: after a crash"
            );
            assert_eq!(n(&after_crash), Some(1), "{at}: after a crash");
            check_identities(&after_crash, &format!("{at}: after a crash"));
            assert_eq!(
                after_crash.snapshot().customer_id("r0-5").unwrap(),
                None,
                "{at}: an erased key is back"
            );
            drop(after_crash);
            drop(engine);
            let restarted = open(&fs);
            assert_eq!(
                members(&restarted, "t").len(),
                acked,
                "{at}: after a restart"
            );
            check_identities(&restarted, &format!("{at}: after a restart"));
            // And the next checkpoint works.
            restarted
                .checkpoint_blocking(Default::default())
                .unwrap_or_else(|e| panic!("{at}: the next checkpoint: {e}"));
            check_identities(&restarted, &format!("{at}: after the next checkpoint"));
        }
    }
    eprintln!(
        "fault points exercised: {points} ({failed_checkpoints} failed the checkpoint, \
         the others were steps it goes on without)"
    );
    assert!(
        points >= 15,
        "only {points} fault points: the scene lost its steps"
    );
}

/// A full disk refuses an audience snapshot whose members need more log
/// than is allocated, whole: no snapshot, the store goes on; once there is
/// room it is taken with every member and survives a crash.
#[test]
fn a_full_disk_refuses_a_large_snapshot_whole() {
    for how in ["fallocate fails", "capacity reached"] {
        let fs = MemFs::new();
        let engine = open(&fs);
        add(&engine, "t", keys("a", 10)).unwrap();
        // Every other id of 64M: ~1,000 dense containers, about 8 MiB in
        // the log, more than the 4 MiB allocated ahead.
        let members: roaring::RoaringBitmap = (0..64u32 << 20).step_by(2).collect();
        let take = |engine: &Engine| {
            engine.write_blocking(WriteOp::TakeSnapshot {
                audience: "aud".into(),
                query: "t".into(),
                taken_lsn: engine.snapshot().lsn,
                note: String::new(),
                members: members.clone(),
                same_as: 0,
            })
        };
        match how {
            "fallocate fails" => fs.fail(Op::Allocate, "wal-", 0, u64::MAX, libc::ENOSPC),
            _ => fs.set_capacity(Some(fs.used_bytes() + 1024)),
        }
        let err = take(&engine).unwrap_err();
        assert!(matches!(err, tagstore::Error::DiskFull(_)), "{how}: {err}");
        assert_eq!(engine.failure(), None, "{how}");
        assert!(engine.snapshot().snapshots.is_empty(), "{how}");
        add(&engine, "t", keys("small", 5)).unwrap();
        fs.clear_faults();
        fs.set_capacity(None);
        let id = take(&engine).unwrap().ids[0];
        let crashed = fs.crash_image();
        drop(engine);
        let engine = open(&crashed);
        let snap = engine.snapshot();
        let s = snap.snapshots.get(&id).expect("the snapshot");
        assert_eq!(s.members.get().unwrap().len(), members.len(), "{how}");
    }
}

/// Every change the feed holds from `after`, as (tag, entered, left) counts
/// of ids; panics when the feed no longer reaches back there.
fn feed_from(engine: &Engine, after: u64) -> Vec<(String, u64, u64)> {
    let mut r = engine
        .feed_reader(after)
        .unwrap_or_else(|e| panic!("reader from {after}: {e:?}"));
    let mut out = Vec::new();
    loop {
        let entries = r.next(1 << 20).unwrap();
        if entries.is_empty() {
            return out;
        }
        for e in entries {
            for c in &e.changes {
                let name = match c.subject() {
                    tagstore::storage::feed::Subject::Tag(t) => t.clone(),
                    other => format!("{other:?}"),
                };
                out.push((name, c.entered.cardinality(), c.left.cardinality()));
            }
        }
    }
}

/// The change feed is derived data: a feed file that cannot be written (a
/// failed write, a full disk) or synced before the log is cut fails no
/// write and no checkpoint; the feed starts again after that write, a
/// reader from before is told the feed no longer reaches back (never
/// handed a feed with a hole), and one from the new start sees every later
/// change, also after a crash.
#[test]
fn a_feed_file_that_cannot_be_written_starts_the_feed_again_and_fails_no_write() {
    for (op, errno) in [
        (Op::Write, libc::EIO),
        (Op::Write, libc::ENOSPC),
        (Op::Sync, libc::EIO),
    ] {
        let label = format!("{op:?} errno {errno}");
        let mut fs = MemFs::new();
        let engine = open(&fs);
        let before = engine.feed_view().end;
        add(&engine, "t", keys("a", 3)).unwrap();
        assert_eq!(
            feed_from(&engine, before),
            vec![("t".into(), 3, 0)],
            "{label}"
        );
        fs.fail(op, "feed-", 0, 1, errno);
        add(&engine, "t", keys("b", 2)).unwrap();
        if op == Op::Sync {
            // Syncs of the feed come before a checkpoint cuts the log.
            engine.checkpoint_blocking(Default::default()).unwrap();
        }
        assert_eq!(fs.faults_pending(), 0, "{label}: the fault was not reached");
        // The write and the checkpoint went through; the feed started again.
        assert_eq!(members(&engine, "t").len(), 5, "{label}");
        let view = engine.feed_view();
        assert!(view.restarted.is_some(), "{label}: {view:?}");
        assert!(
            matches!(
                engine.feed_reader(before),
                Err(tagstore::storage::feed::ReadError::Expired(_))
            ),
            "{label}: a reader from before the new start"
        );
        let from = view.start - 1;
        add(&engine, "t", keys("c", 4)).unwrap();
        assert_eq!(
            feed_from(&engine, from),
            vec![("t".into(), 4, 0)],
            "{label}"
        );
        // A crash keeps what was synced; the log gives back the rest.
        let image = fs.crash_image();
        drop(engine);
        fs = image;
        let engine = open(&fs);
        assert_eq!(members(&engine, "t").len(), 9, "{label}");
        assert_eq!(
            feed_from(&engine, from),
            vec![("t".into(), 4, 0)],
            "{label}: after the crash"
        );
        add(&engine, "t", keys("d", 1)).unwrap();
        assert_eq!(
            feed_from(&engine, from),
            vec![("t".into(), 4, 0), ("t".into(), 1, 0)],
            "{label}: after the crash, a write more"
        );
    }
}

/// Keeping an audience current is one logged write with the audience: a
/// log sync that fails under it acknowledges nothing and stops writes, and
/// a crash then finds the audience and its rule tag both or neither (never
/// an audience that says it is kept without its rule, or a rule tag
/// without its audience); once the store is open again the same write
/// goes through and the rule holds the audience's members after a crash.
#[test]
fn a_failed_sync_under_a_kept_audience_leaves_both_or_neither() {
    use tagstore::storage::record::AudienceDef;
    let save = |engine: &Engine| {
        engine.write_blocking(WriteOp::PutAudience {
            name: "kept".into(),
            definition: AudienceDef {
                query: "t AND NOT u".into(),
                ..Default::default()
            },
            replace: false,
            kept_current: true,
        })
    };
    for errno in [libc::EIO, libc::ENOSPC] {
        let fs = MemFs::new();
        let engine = open(&fs);
        add(&engine, "t", keys("a", 100)).unwrap();
        add(&engine, "u", keys("a", 10)).unwrap();
        fs.fail(Op::Sync, "wal-", 0, 1, errno);
        assert!(save(&engine).is_err(), "{errno}: not acknowledged");
        assert!(engine.failure().is_some(), "{errno}: writes stop");
        fs.clear_faults();
        let crashed = fs.crash_image();
        drop(engine);
        let engine = open(&crashed);
        let snap = engine.snapshot();
        let (audience, rule, tag) = (
            snap.audiences.contains_key("kept"),
            snap.rules.get("kept").is_some(),
            snap.tag("kept").is_some(),
        );
        assert!(
            audience == rule && rule == tag,
            "{errno}: audience {audience}, rule {rule}, tag {tag}"
        );
        if !audience {
            save(&engine).unwrap();
        }
        let crashed = crashed.crash_image();
        drop(engine);
        let engine = open(&crashed);
        assert_eq!(members(&engine, "kept").len(), 90, "{errno}");
        assert!(engine.snapshot().rules.get("kept").is_some(), "{errno}");
    }
}
