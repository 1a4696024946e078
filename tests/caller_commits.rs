//! A small write that finds the writer idle is committed on its caller's
//! thread (`storage/writer/thread.rs`): it must be as durable, as ordered
//! and as refusable as one the writer's thread commits. Writes queued
//! earlier are never overtaken by a later write of the same caller; a
//! failed log sync on the caller's thread refuses that write and every
//! later one, and a crash finds every acknowledged write and not the
//! refused one; a log grown past its limit by such writes is still
//! checkpointed (by the writer's thread); writes that come together go to
//! the writer's thread.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tagstore::query::Query;
use tagstore::storage::fs::{MemFs, Op};
use tagstore::storage::{Engine, EngineConfig, Mutation, WriteOp};

const DIR: &str = "/mem/store";

/// A store that keeps no daily versions: a caller's first commit would
/// otherwise tell the writer's thread to look at the calendar (a `Tick`),
/// and the thread, holding the writer meanwhile, could send the next write
/// its way, where a test wants it on the caller.
fn open(fs: &MemFs) -> Engine {
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.history_days = 0;
    Engine::open(cfg).unwrap()
}

fn update(tag: &str, add: &[String], remove: &[String]) -> WriteOp {
    WriteOp::Update {
        mutations: vec![Mutation {
            tag: tag.into(),
            add: add.to_vec(),
            remove: remove.to_vec(),
            ..Default::default()
        }],
        create_missing_tags: true,
    }
}

fn members(engine: &Engine, tag: &str) -> BTreeSet<String> {
    let snap = engine.snapshot();
    if snap.tag(tag).is_none() {
        return BTreeSet::new();
    }
    let (ids, _) = Query::compile(tag, &snap).unwrap().page(None, usize::MAX);
    let mut out = Vec::new();
    snap.dict.keys_of(&ids, &mut out).unwrap();
    out.into_iter().collect()
}

fn on_caller(engine: &Engine) -> u64 {
    engine.meters().commits_on_caller.load(Ordering::Relaxed)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

#[test]
fn one_clients_writes_commit_on_its_thread_and_survive_a_crash() {
    let fs = MemFs::new();
    let engine = Arc::new(open(&fs));
    let acked = runtime().block_on({
        let engine = engine.clone();
        async move {
            let mut acked = BTreeSet::new();
            for i in 0..50 {
                let key = format!("c{i}");
                engine
                    .write(update("t", std::slice::from_ref(&key), &[]))
                    .await
                    .unwrap();
                acked.insert(key);
            }
            acked
        }
    });
    assert!(
        on_caller(&engine) >= 45,
        "{} of 50 single writes from one caller were committed on its thread",
        on_caller(&engine)
    );
    assert_eq!(members(&engine, "t"), acked);
    let crashed = fs.crash_image();
    drop(engine);
    let engine = open(&crashed);
    assert_eq!(members(&engine, "t"), acked, "after a crash");
}

/// A stream queues its batches (`Engine::enqueue`) and may write the next
/// before the first is answered: the later write must not be applied
/// first, even though it finds the writer's lock free before the writer's
/// thread has woken for the queued one. (Without the count of queued
/// writes, the removal overtook the addition.)
#[test]
fn a_later_write_does_not_overtake_one_queued_before_it() {
    let fs = MemFs::new();
    let engine = Arc::new(open(&fs));
    let overtaken = runtime().block_on({
        let engine = engine.clone();
        async move {
            engine.write(update("t", &["x".into()], &[])).await.unwrap();
            let mut overtaken = Vec::new();
            for i in 0..300 {
                let key = vec![format!("c{i}")];
                let queued = engine.enqueue(update("t", &key, &[])).unwrap();
                engine.write(update("t", &[], &key)).await.unwrap();
                engine.answer(queued).await.unwrap();
                if members(&engine, "t").contains(&key[0]) {
                    overtaken.push(i);
                }
            }
            overtaken
        }
    });
    assert!(
        overtaken.is_empty(),
        "a removal applied before the addition queued ahead of it in rounds {overtaken:?}"
    );
}

#[test]
fn a_failed_sync_on_the_callers_thread_refuses_that_write_and_every_later_one() {
    for errno in [libc::EIO, libc::ENOSPC] {
        let fs = MemFs::new();
        let engine = Arc::new(open(&fs));
        let rt = runtime();
        let key = |s: &str| vec![s.to_string()];
        rt.block_on(engine.write(update("t", &key("a"), &[])))
            .unwrap();
        let before = on_caller(&engine);
        fs.fail(Op::Sync, "wal-", 0, 1, errno);
        let refused = rt.block_on(engine.write(update("t", &key("b"), &[])));
        assert_eq!(on_caller(&engine), before + 1, "{errno}: on the caller");
        let e = refused.expect_err("a write whose sync failed is not acknowledged");
        assert!(engine.failure().is_some(), "{errno}: writes stop ({e})");
        fs.clear_faults();
        let later = rt.block_on(engine.write(update("t", &key("c"), &[])));
        assert!(
            matches!(later, Err(tagstore::Error::Failed(_))),
            "{errno}: {later:?}"
        );
        let crashed = fs.crash_image();
        drop(rt);
        drop(engine);
        let engine = open(&crashed);
        let now = members(&engine, "t");
        assert!(now.contains("a") && !now.contains("c"), "{errno}: {now:?}");
        // "b" reached the log before its sync failed: the crash may keep it
        // or not, as with the writer's thread; it was never acknowledged.
    }
}

/// Eight callers writing at once: the writer's thread commits them in
/// groups, and callers stop committing their own once writes come
/// together (trying again at most every 100 ms).
#[test]
fn writes_that_come_together_go_to_the_writers_thread() {
    let fs = MemFs::new();
    let engine = Arc::new(open(&fs));
    let rt = runtime();
    rt.block_on(engine.write(update("t", &["x".into()], &[])))
        .unwrap();
    let commits = |e: &Engine| e.meters().commits.load(Ordering::Relaxed);
    let (before, caller_before) = (commits(&engine), on_caller(&engine));
    let hold = fs.hold_syncs("wal-");
    let tasks: Vec<_> = (0..8)
        .map(|c| {
            let engine = engine.clone();
            rt.spawn(async move {
                for i in 0..25 {
                    let key = vec![format!("c{c}-{i}")];
                    engine.write(update("t", &key, &[])).await.unwrap();
                }
            })
        })
        .collect();
    // The first write holds its sync until the others have queued.
    while hold.waiting() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(hold);
    let released = std::time::Instant::now();
    for t in tasks {
        rt.block_on(t).unwrap();
    }
    // Every 100 ms callers may try once more (and step back again at once):
    // a slow run is allowed a few more commits on callers.
    let tries = 1 + released.elapsed().as_millis() as u64 / 100;
    assert_eq!(members(&engine, "t").len(), 201);
    let (groups, on_caller) = (
        commits(&engine) - before,
        on_caller(&engine) - caller_before,
    );
    assert!(
        groups < 200,
        "{groups} commits for 200 writes: none grouped"
    );
    assert!(
        on_caller <= 8 * tries,
        "{on_caller} of {groups} commits on a caller's thread while eight wrote at once \
         ({tries} periods of 100 ms)"
    );
}

/// Writes committed on their callers' threads grow the log like any
/// others: once it passes its limit, the writer's thread is told and
/// checkpoints, with no other command to wake it.
///
/// The store keeps no daily versions, so before the log passes its limit
/// nothing sends the thread a command and every write finds the writer
/// idle: each is committed on its caller. Writing stops with the one that
/// passes the limit; only what that write tells the thread can start the
/// checkpoint. (Counting caller commits over a fixed run of writes after
/// the limit failed on a slow host: while the thread held the writer to
/// start and finish checkpoints, the writes that came went to it.)
#[test]
fn a_log_grown_by_callers_writes_is_checkpointed() {
    let fs = MemFs::new();
    let mut cfg = EngineConfig::new(DIR);
    cfg.fs = Arc::new(fs.clone());
    cfg.history_days = 0;
    cfg.checkpoint_wal_bytes = 16 << 10;
    let engine = Arc::new(Engine::open(cfg).unwrap());
    let rt = runtime();
    let written = rt.block_on(async {
        let mut written = 0u64;
        while engine.info().wal_bytes < 16 << 10 {
            assert!(
                written < 10_000,
                "the log did not grow: {:?}",
                engine.info()
            );
            let key = vec![format!("customer-{written:06}")];
            engine.write(update("t", &key, &[])).await.unwrap();
            written += 1;
            assert_eq!(
                on_caller(&engine),
                written,
                "write {written} was not committed on its caller's thread"
            );
        }
        written
    });
    let waited = std::time::Instant::now();
    while engine.info().last_checkpoint_lsn == 0 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(20),
            "no checkpoint after {written} writes passed a 16 KiB log's limit: {:?}",
            engine.info()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(members(&engine, "t").len() as u64, written);
}
