//! Failed I/O at each named fail point of the storage engine
//! (`storage::faults`), with everything else real: a failed log fsync or
//! write stops writes until a restart and loses nothing acknowledged; a
//! full disk while allocating log space refuses that write only; a failure
//! at any step of a checkpoint fails the checkpoint, not the store, and a
//! restart finds every acknowledged write.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use tagstore::query::Query;
use tagstore::storage::faults::{self, FailPoint};
use tagstore::storage::{Engine, EngineConfig, Mutation, WriteOp};

fn open(dir: &Path) -> Engine {
    Engine::open(EngineConfig::new(dir)).unwrap()
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

/// The store after a crash: a copy of the directory as it is now.
fn crash_copy(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    common::copy_data_dir(dir, copy.path());
    copy
}

/// A failed fsync (by the writer for a small write, by the sync thread for
/// one of 256+ memberships) or a failed log write: the write is not
/// acknowledged, every later write is refused with the cause until the
/// store is restarted, reads go on, and the restart finds every
/// acknowledged write (and the failed one at most).
#[test]
fn a_failed_log_fsync_or_write_stops_writes_until_restart_and_loses_nothing() {
    for (point, size) in [
        (FailPoint::LogSync, 10),
        (FailPoint::LogSync, 2000),
        (FailPoint::LogWrite, 10),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        add(&engine, "t", keys("a", 100)).unwrap();
        let acked = members(&engine, "t");
        faults::arm(dir.path(), point, 0, 1, libc::EIO);
        let failed = keys("f", size);
        let err = add(&engine, "t", failed.clone()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, tagstore::Error::Failed(_)) && msg.contains("wal-"),
            "{point:?}: {msg}"
        );
        // The disk is fine again, but the store cannot know what reached it.
        faults::disarm(dir.path());
        let again = add(&engine, "t", keys("b", 3)).unwrap_err();
        assert!(matches!(again, tagstore::Error::Failed(_)), "{again}");
        assert!(engine.checkpoint_blocking(Default::default()).is_err());
        assert!(engine.failure().is_some());
        assert_eq!(
            members(&engine, "t"),
            acked,
            "reads go on, from what was acknowledged"
        );

        let copy = crash_copy(dir.path());
        drop(engine);
        for d in [copy.path(), dir.path()] {
            let engine = open(d);
            let found = members(&engine, "t");
            assert!(
                found.is_superset(&acked),
                "{point:?}: an acknowledged write was lost"
            );
            let extra: BTreeSet<String> = found.difference(&acked).cloned().collect();
            let failed_set: BTreeSet<String> = failed.iter().cloned().collect();
            assert!(
                extra.is_empty() || extra == failed_set,
                "{point:?}: only the failed write, whole or not at all: {} extra",
                extra.len()
            );
            add(&engine, "t", keys("after", 2)).unwrap();
        }
    }
}

#[test]
fn a_full_disk_while_allocating_log_space_refuses_that_write_only() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path());
    add(&engine, "t", keys("a", 10)).unwrap();
    // More than the 4 MiB allocated ahead: this write needs more space.
    let big = keys(&"x".repeat(60), 80_000);
    faults::arm(
        dir.path(),
        FailPoint::LogAllocate,
        0,
        u64::MAX,
        libc::ENOSPC,
    );
    let err = add(&engine, "t", big.clone()).unwrap_err();
    assert!(matches!(err, tagstore::Error::DiskFull(_)), "{err}");
    assert_eq!(engine.failure(), None);
    add(&engine, "t", keys("small", 5)).unwrap();
    assert_eq!(members(&engine, "t").len(), 15);
    faults::disarm(dir.path());
    add(&engine, "t", big).unwrap();
    assert_eq!(members(&engine, "t").len(), 80_015);
    let copy = crash_copy(dir.path());
    drop(engine);
    assert_eq!(members(&open(copy.path()), "t").len(), 80_015);
}

/// Every step of a checkpoint, failed in turn: the checkpoint fails, the
/// store goes on taking writes, a later checkpoint succeeds, and both a
/// crash and a clean restart find every acknowledged write.
#[test]
fn a_failure_at_any_step_of_a_checkpoint_fails_the_checkpoint_not_the_store() {
    for (point, errno) in [
        (FailPoint::SegmentWrite, libc::ENOSPC),
        (FailPoint::SegmentSync, libc::EIO),
        (FailPoint::ManifestSync, libc::EIO),
        (FailPoint::ManifestRename, libc::EIO),
        // After the rename: the new MANIFEST is on disk and names the new
        // segment, which must not be deleted as a leftover.
        (FailPoint::ManifestDirSync, libc::EIO),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(dir.path());
        add(&engine, "t", keys("a", 3000)).unwrap();
        engine.checkpoint_blocking(Default::default()).unwrap();
        add(&engine, "t", keys("b", 3000)).unwrap();
        faults::arm(dir.path(), point, 0, 1, errno);
        let err = engine
            .checkpoint_blocking(Default::default())
            .expect_err("the checkpoint must fail");
        faults::disarm(dir.path());
        assert!(
            err.to_string().contains("checkpoint failed"),
            "{point:?}: {err}"
        );
        assert_eq!(engine.failure(), None, "{point:?}");
        add(&engine, "t", keys("c", 10)).unwrap();
        assert_eq!(members(&engine, "t").len(), 6010);

        // A crash now: the directory as the failed checkpoint left it.
        let copy = crash_copy(dir.path());
        assert_eq!(members(&open(copy.path()), "t").len(), 6010, "{point:?}");

        engine.checkpoint_blocking(Default::default()).unwrap();
        add(&engine, "t", keys("d", 10)).unwrap();
        drop(engine);
        assert_eq!(members(&open(dir.path()), "t").len(), 6020, "{point:?}");
    }
}
