//! Online backup and restore (#22) against the real server: backups taken
//! while two clients write as fast as they can and checkpoints run (the
//! log is 1 MiB), a full one and an increment of it; `tagstore restore`
//! makes new directories from them; servers started on those answer
//! exactly as the original did at each backup's position (every tag's
//! members against a model of the acknowledged writes up to it). One
//! backup at a time; a client that goes away frees the place, and so does
//! a backup's `done` (the next may begin at once, on a busy host too); a
//! backup cut short by an error leaves no file; a bad `since` is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::proto::*;
use tagstore_proto::backup::{SaveError, save};
use tonic::Code;

const TAGS: [&str; 4] = ["t0", "t1", "t2", "t3"];

/// An acknowledged write: its lsn, whether it was logged, and what it did.
type Logged = (u64, bool, Mutation);

fn mutation(rng: &mut StdRng) -> Mutation {
    let k = |rng: &mut StdRng| format!("c{}", rng.random_range(0..40_000));
    Mutation {
        tag: TAGS[rng.random_range(0..TAGS.len())].into(),
        add: (0..rng.random_range(20..80)).map(|_| k(rng)).collect(),
        remove: (0..rng.random_range(0..30)).map(|_| k(rng)).collect(),
        ..Default::default()
    }
}

/// The tags' members after the writes up to `position`, in lsn order (a
/// write that changed nothing was not logged and changes nothing here).
fn model(log: &[Logged], position: u64) -> BTreeMap<String, BTreeSet<String>> {
    let mut writes: Vec<&Logged> = log.iter().filter(|w| w.0 <= position).collect();
    writes.sort_by_key(|w| (w.0, !w.1));
    let mut out: BTreeMap<String, BTreeSet<String>> = TAGS
        .iter()
        .map(|t| (t.to_string(), BTreeSet::new()))
        .collect();
    for (_, _, m) in writes {
        let set = out.get_mut(&m.tag).unwrap();
        // Within one request, adds come before removes.
        for k in &m.add {
            set.insert(k.clone());
        }
        for k in &m.remove {
            set.remove(k);
        }
    }
    out
}

async fn members(c: &mut common::Client) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for t in TAGS {
        out.insert(t.to_string(), common::export_set(c, t).await);
    }
    out
}

fn restore(dir: &Path, backups: &[&Path]) -> std::process::Output {
    Command::new(common::binary())
        .arg("restore")
        .arg("--data-dir")
        .arg(dir)
        .args(backups)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_taken_during_heavy_writes_restore_exactly_to_their_position() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::start(&data, &["--checkpoint-wal-mb", "1"]);
    let mut c = common::client(&server).await;
    for t in TAGS {
        c.create_tag(CreateTagRequest {
            name: t.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let log: Arc<Mutex<Vec<Logged>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for seed in 0..2u64 {
        let mut wc = common::client(&server).await;
        let log = log.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = mutation(&mut rng);
                let r = wc
                    .update(UpdateRequest {
                        mutations: vec![m.clone()],
                        create_missing_tags: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let logged = r.added + r.removed + r.new_customers > 0;
                log.lock().push((r.lsn, logged, m));
                n += 1;
            }
            n
        }));
    }
    // Checkpoints come as the log passes 1 MiB, and when asked.
    let mut admin = common::client(&server).await;
    let wait_for = |n: usize| {
        let log = log.clone();
        async move {
            while log.lock().len() < n {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(600).await;
    admin
        .checkpoint(CheckpointRequest::default())
        .await
        .unwrap();
    wait_for(900).await;
    let full = dir.path().join("full.tsbak");
    let mut progress = 0;
    let done_full = save(&mut admin, None, &full, |_| progress += 1)
        .await
        .unwrap_or_else(|e| panic!("full backup: {e:?}"));
    wait_for(1500).await;
    admin
        .checkpoint(CheckpointRequest::default())
        .await
        .unwrap();
    wait_for(1800).await;
    let inc = dir.path().join("inc.tsbak");
    let done_inc = save(&mut admin, Some(&full), &inc, |_| {})
        .await
        .unwrap_or_else(|e| panic!("increment: {e:?}"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    assert!(done_full.base_id.is_empty() && done_full.position > 0);
    assert_eq!(done_inc.base_id, done_full.id);
    assert_eq!(done_inc.base_position, done_full.position);
    assert!(done_inc.position > done_full.position);
    assert!(
        done_inc.checkpoint_lsn > done_full.position,
        "a checkpoint ran between the backups ({done_full:?}, {done_inc:?})"
    );
    assert!(
        done_inc.files_in_base > 0,
        "the increment left files to its base: {done_inc:?}"
    );
    assert!(
        std::fs::metadata(&inc).unwrap().len() < std::fs::metadata(&full).unwrap().len(),
        "the increment is smaller than its base"
    );
    let log = log.lock().clone();
    let original_now = members(&mut c).await;
    assert_eq!(original_now, model(&log, u64::MAX), "the model is exact");

    // Restored: the full backup alone, and with its increment.
    for (name, chain, position) in [
        ("r-full", vec![full.as_path()], done_full.position),
        (
            "r-inc",
            vec![full.as_path(), inc.as_path()],
            done_inc.position,
        ),
    ] {
        let to = dir.path().join(name);
        let out = restore(&to, &chain);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(said.contains(&format!("lsn {position}")), "{said}");
        let restored = common::start(&to, &[]);
        let mut rc = common::client(&restored).await;
        let stats = rc.stats(StatsRequest {}).await.unwrap().into_inner();
        // (Its first checkpoint may log the day's upkeep, as any store's does.)
        assert!(
            (position..=position + 1).contains(&stats.lsn),
            "{name}: lsn {} after a backup at {position}",
            stats.lsn
        );
        assert_eq!(members(&mut rc).await, model(&log, position), "{name}");
    }

    // An increment alone, or a restore over a store, is refused.
    let out = restore(&dir.path().join("r-alone"), &[&inc]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is an increment"));
    let out = restore(&data, &[&full]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // A backup never replaces a file; a bad `since` is INVALID_ARGUMENT.
    let again = save(&mut admin, None, &full, |_| {}).await;
    assert!(matches!(again, Err(SaveError::Local(m)) if m.contains("exists")));
    let bad = admin
        .backup(BackupRequest {
            since: b"not a backup header".to_vec(),
        })
        .await;
    assert_eq!(common::code(bad), Code::InvalidArgument);

    // One at a time: a backup whose client reads nothing holds the place;
    // once that client goes, the place is free again.
    let held = admin
        .backup(BackupRequest::default())
        .await
        .unwrap()
        .into_inner();
    let second = common::client(&server)
        .await
        .backup(BackupRequest::default())
        .await;
    assert_eq!(common::code(second), Code::ResourceExhausted);
    drop(held);
    let mut freed = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let p = dir.path().join("after.tsbak");
        match save(&mut admin, None, &p, |_| {}).await {
            Ok(_) => {
                freed = true;
                break;
            }
            Err(SaveError::Server(s)) if s.code() == Code::ResourceExhausted => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(
        freed,
        "the place of a backup whose client went was not freed"
    );

    // A backup the server ends with an error leaves no file: an
    // increment of a backup "ahead" of this store.
    let mut ahead =
        tagstore::storage::backup::Header::decode(&std::fs::read(&full).unwrap()).unwrap();
    ahead.position = done_inc.position + 1_000_000;
    let future = dir.path().join("future.tsbak");
    std::fs::write(&future, ahead.encode()).unwrap();
    let cut = dir.path().join("cut.tsbak");
    let res = save(&mut admin, Some(&future), &cut, |_| {}).await;
    match res {
        Err(SaveError::Server(s)) => {
            assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
            assert!(s.message().contains("not a backup of this store"), "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!cut.exists());
    let mut partial = cut.as_os_str().to_owned();
    partial.push(".partial");
    assert!(!Path::new(&partial).exists());
    server.stop().unwrap();
}

/// A client that has its `done` may take the next backup at once: the
/// place is free before `done` is sent. (The backup's thread runs at the
/// lowest priority; with every core busy it used to be preempted between
/// sending `done` and freeing the place, and a backup taken right after
/// was refused with RESOURCE_EXHAUSTED. Found by the harness's backup
/// scenario, which takes backups back to back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_may_start_as_soon_as_the_last_one_said_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(&dir.path().join("data"), &[]);
    let mut c = common::client(&server).await;
    c.create_tag(CreateTagRequest {
        name: "t0".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        c.update(UpdateRequest {
            mutations: vec![mutation(&mut rng)],
            create_missing_tags: true,
        })
        .await
        .unwrap();
    }
    // Every core busy at a normal priority, as on a loaded host.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        })
        .collect();
    let mut refused = Vec::new();
    for i in 0..40 {
        let to = dir.path().join(format!("b{i}.tsbak"));
        match save(&mut c, None, &to, |_| {}).await {
            Ok(_) => {}
            Err(SaveError::Server(s)) if s.code() == Code::ResourceExhausted => refused.push(i),
            Err(e) => panic!("backup {i}: {e:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    assert!(
        refused.is_empty(),
        "backups refused right after the one before said done: {refused:?} of 40"
    );
    server.stop().unwrap();
}
