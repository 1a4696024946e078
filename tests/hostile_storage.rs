//! Findings of the hostile review that live in the engine, one test each:
//! a missing `MANIFEST` must never empty the store, a file the store does
//! not name is moved aside rather than deleted, a damaged segment read
//! during log replay is blamed on the segment (not the intact log), and an
//! export's snapshot keeps naming every member while a checkpoint merges
//! deleted customers out of the dictionary.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use tagstore::query::Query;
use tagstore::storage::{CheckpointOptions, Engine, EngineConfig, Mutation, ORPHANS_DIR, WriteOp};

/// Opens the store in `dir`. Another test of this file may be starting
/// `mount` or `umount` at that moment: between its fork and its exec the
/// child holds a copy of every open file, the lock of a store just closed
/// included, for a few milliseconds; the store is opened again then.
fn open(dir: &Path) -> tagstore::Result<Engine> {
    let mut tries = 0;
    loop {
        match Engine::open(EngineConfig::new(dir)) {
            Err(tagstore::Error::Locked(_)) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn add(engine: &Engine, tag: &str, keys: &[String]) {
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: keys.to_vec(),
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .unwrap();
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn count(engine: &Engine, q: &str) -> u64 {
    let snap = engine.snapshot();
    Query::compile(q, &snap).unwrap().count()
}

/// A store with two checkpoints behind it (so its log no longer starts at
/// lsn 1), stopped cleanly.
fn checkpointed_store(dir: &Path) {
    let engine = open(dir).unwrap();
    add(&engine, "t", &keys("a", 100));
    engine.checkpoint_blocking(Default::default()).unwrap();
    add(&engine, "u", &keys("b", 50));
    drop(engine);
}

#[test]
fn a_missing_manifest_after_a_clean_stop_refuses_to_start_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    checkpointed_store(dir.path());
    let segments = common::files_with(dir.path(), ".seg");
    assert!(!segments.is_empty());
    fs::remove_file(dir.path().join("MANIFEST")).unwrap();
    let err = open(dir.path()).err().expect("must refuse").to_string();
    assert!(
        err.contains("MANIFEST is missing") && err.contains("Restore MANIFEST"),
        "{err}"
    );
    assert_eq!(
        common::files_with(dir.path(), ".seg"),
        segments,
        "start-up deleted segment files"
    );
}

#[test]
fn a_missing_manifest_after_a_crash_refuses_to_start_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &keys("a", 100));
    engine.checkpoint_blocking(Default::default()).unwrap();
    add(&engine, "t", &keys("c", 10));
    let copy = tempfile::tempdir().unwrap();
    common::copy_data_dir(dir.path(), copy.path());
    drop(engine);
    let segments = common::files_with(copy.path(), ".seg");
    let manifest = fs::read(copy.path().join("MANIFEST")).unwrap();
    fs::remove_file(copy.path().join("MANIFEST")).unwrap();
    let err = open(copy.path()).err().expect("must refuse").to_string();
    assert!(
        err.contains("MANIFEST is missing") && err.contains("the log starts at lsn"),
        "{err}"
    );
    assert_eq!(common::files_with(copy.path(), ".seg"), segments);
    // Put the manifest back: everything is there.
    fs::write(copy.path().join("MANIFEST"), manifest).unwrap();
    let engine = open(copy.path()).unwrap();
    assert_eq!(count(&engine, "t"), 110);
}

#[test]
fn segments_without_a_log_or_manifest_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    checkpointed_store(dir.path());
    fs::remove_file(dir.path().join("MANIFEST")).unwrap();
    for log in common::wal_files(dir.path()) {
        fs::remove_file(log).unwrap();
    }
    let err = open(dir.path()).err().expect("must refuse").to_string();
    assert!(err.contains("segment file"), "{err}");
}

#[test]
fn a_store_that_never_finished_a_checkpoint_still_starts_from_its_log() {
    // No manifest, a log from lsn 1, and a segment of a first checkpoint
    // that did not finish: every write is in the log.
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &keys("a", 10));
    let copy = tempfile::tempdir().unwrap();
    common::copy_data_dir(dir.path(), copy.path());
    drop(engine);
    let other = tempfile::tempdir().unwrap();
    checkpointed_store(other.path());
    let stray = common::files_with(other.path(), ".seg").pop().unwrap();
    let name = stray.file_name().unwrap().to_owned();
    fs::copy(&stray, copy.path().join(&name)).unwrap();
    let engine = open(copy.path()).unwrap();
    assert_eq!(count(&engine, "t"), 10);
    let moved = &engine.recovery().orphans_moved;
    assert_eq!(moved, &vec![copy.path().join(ORPHANS_DIR).join(&name)]);
    assert!(moved[0].exists(), "moved aside, not deleted");
    assert!(!copy.path().join(&name).exists());
}

#[test]
fn a_stray_segment_copied_in_is_moved_aside_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    checkpointed_store(dir.path());
    let stray = dir.path().join("seg-00000000000000ff.seg");
    fs::write(&stray, b"an operator's file").unwrap();
    let engine = open(dir.path()).unwrap();
    assert_eq!(count(&engine, "t"), 100);
    let aside = dir
        .path()
        .join(ORPHANS_DIR)
        .join("seg-00000000000000ff.seg");
    assert_eq!(engine.recovery().orphans_moved, vec![aside.clone()]);
    assert_eq!(fs::read(&aside).unwrap(), b"an operator's file");
}

#[test]
fn a_damaged_segment_read_by_log_replay_names_the_segment_not_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &keys("a", 3000));
    engine.checkpoint_blocking(Default::default()).unwrap();
    // After the checkpoint, a write to the same tag: replay must load its bitmap.
    add(&engine, "t", &keys("z", 1));
    let copy = tempfile::tempdir().unwrap();
    common::copy_data_dir(dir.path(), copy.path());
    drop(engine);
    let seg = common::files_with(copy.path(), ".seg").pop().unwrap();
    // The first blob after the 16-byte header is the tag's only shard.
    let mut data = fs::read(&seg).unwrap();
    data[16 + 30] ^= 0x20;
    fs::write(&seg, data).unwrap();
    let err = open(copy.path()).err().expect("must refuse").to_string();
    let seg_name = seg.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        err.starts_with(&format!("corrupt data in {}", seg.display())),
        "the error must name {seg_name} first: {err}"
    );
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(err.contains("which is intact"), "{err}");
}

#[test]
fn an_old_snapshot_names_every_member_after_deletes_and_a_dictionary_merge() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    let all = keys("k", 4000);
    add(&engine, "t", &all);
    engine.checkpoint_blocking(Default::default()).unwrap();
    let recent = keys("r", 1000);
    add(&engine, "t", &recent);
    // The export's snapshot.
    let snap = engine.snapshot();
    let q = Query::compile("t", &snap).unwrap();
    let (ids, more) = q.page(None, 10_000);
    assert!(!more);
    assert_eq!(ids.len(), 5000);
    // Meanwhile: delete a quarter of the old and the recent customers, and
    // merge the dictionary (which keeps only live keys).
    let gone: Vec<String> = all.iter().chain(&recent).step_by(4).cloned().collect();
    engine
        .write_blocking(WriteOp::DeleteCustomers { customers: gone })
        .unwrap();
    engine
        .checkpoint_blocking(CheckpointOptions {
            merge_dictionary: true,
        })
        .unwrap();
    let mut names = Vec::new();
    snap.dict.keys_of(&ids, &mut names).unwrap();
    assert_eq!(names.len(), 5000, "the old snapshot lost keys");
    let mut expect: Vec<String> = all.iter().chain(&recent).cloned().collect();
    expect.sort();
    names.sort();
    assert_eq!(names, expect);
    // The new state has forgotten the deleted keys.
    assert_eq!(count(&engine, "t"), 3750);
    let now = engine.snapshot();
    assert_eq!(now.dict.lookup("k0").unwrap(), None);
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` when this process may not mount (not root): the test then says
    /// so and does nothing. CI runs as root.
    fn mount(mib: u64) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: cannot mount a small file system; disk-full test skipped");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        fs::create_dir(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed although running as root");
        Some(SmallDisk { path, _dir: dir })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(path).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn a_full_disk_refuses_writes_cleanly_and_the_store_recovers_when_space_is_freed() {
    let Some(disk) = SmallDisk::mount(24) else {
        return;
    };
    let data = disk.path.join("data");
    let engine = open(&data).unwrap();
    add(&engine, "t", &keys("a", 10));
    engine.checkpoint_blocking(Default::default()).unwrap();
    let filler = disk.path.join("filler");
    fill(&filler);
    // Each write is about 1.3 MB of log: the space allocated ahead runs out.
    let mut acknowledged = 10;
    let mut refused = None;
    for i in 0..20 {
        let batch = keys(&format!("w{i}-"), 50_000);
        let res = engine.write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: "t".into(),
                add: batch,
                ..Default::default()
            }],
            create_missing_tags: false,
        });
        match res {
            Ok(_) => acknowledged += 50_000,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the disk never filled");
    assert!(
        matches!(err, tagstore::Error::DiskFull(_)),
        "expected disk full, got {err}"
    );
    assert_eq!(
        engine.failure(),
        None,
        "a full disk must not stop the store"
    );
    // Reads go on; a checkpoint fails cleanly and changes nothing.
    assert_eq!(count(&engine, "t"), acknowledged);
    assert!(engine.checkpoint_blocking(Default::default()).is_err());
    assert_eq!(engine.failure(), None);
    assert_eq!(count(&engine, "t"), acknowledged);
    // Space comes back: writes are accepted again, without a restart.
    fs::remove_file(&filler).unwrap();
    add(&engine, "t", &keys("after", 100));
    acknowledged += 100;
    assert_eq!(count(&engine, "t"), acknowledged);
    engine.checkpoint_blocking(Default::default()).unwrap();
    // After a crash, exactly the acknowledged writes are there.
    add(&engine, "t", &keys("late", 5));
    acknowledged += 5;
    let copy = tempfile::tempdir().unwrap();
    common::copy_data_dir(&data, copy.path());
    drop(engine);
    let engine = open(copy.path()).unwrap();
    assert_eq!(count(&engine, "t"), acknowledged);
}

#[test]
fn a_dictionary_merge_of_nearly_nothing_costs_nearly_nothing_and_still_erases() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    let merge = || {
        engine
            .checkpoint_blocking(CheckpointOptions {
                merge_dictionary: true,
            })
            .unwrap()
    };
    // Two sections (150,000 and 50,000 keys): a merge rewrites them all.
    add(&engine, "t", &["erase-me-now".to_string()]);
    add(&engine, "t", &keys("bulk0-", 150_000));
    engine.checkpoint_blocking(Default::default()).unwrap();
    add(&engine, "t", &keys("bulk1-", 50_000));
    engine.checkpoint_blocking(Default::default()).unwrap();
    let full = merge();
    assert!(full.segment_bytes > 4 << 20, "{full:?}");
    // Ten times one new key and a merge: the key and the tag's bitmap each
    // time, not the dictionary (before: ten times the dictionary).
    let mut written = 0;
    for i in 0..10 {
        add(&engine, "t", &[format!("new{i}")]);
        written += merge().segment_bytes;
    }
    assert!(
        written < full.segment_bytes / 4,
        "ten merges of one key wrote {written} bytes; one whole merge wrote {}",
        full.segment_bytes
    );
    // Erasing a customer and merging takes its key off the disk.
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["erase-me-now".into()],
        })
        .unwrap();
    merge();
    for seg in common::files_with(dir.path(), ".seg") {
        let bytes = fs::read(&seg).unwrap();
        assert!(
            !bytes.windows(12).any(|w| w == b"erase-me-now"),
            "{} still holds an erased key",
            seg.display()
        );
    }
    drop(engine);
    let engine = open(dir.path()).unwrap();
    assert_eq!(count(&engine, "t"), 200_010);
    assert!(engine.snapshot().dict.lookup("new9").unwrap().is_some());
}

/// A restore onto a disk that fills fails whole: an error naming the file
/// it could not write, and neither the new directory nor its
/// `.restoring` one left behind; with the space freed, the same backup
/// restores.
#[test]
fn a_restore_onto_a_full_disk_fails_and_leaves_nothing() {
    let Some(disk) = SmallDisk::mount(4) else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    let engine = open(src.path()).unwrap();
    for chunk in 0..10 {
        engine
            .write_blocking(WriteOp::Update {
                mutations: vec![Mutation {
                    tag: format!("t{chunk}"),
                    add: (0..20_000)
                        .map(|i| format!("customer-key-{chunk}-{i:08}"))
                        .collect(),
                    ..Default::default()
                }],
                create_missing_tags: true,
            })
            .unwrap();
    }
    engine
        .checkpoint_blocking(CheckpointOptions::default())
        .unwrap();
    let backup = src.path().join("full.tsbak");
    let mut out = fs::File::create(&backup).unwrap();
    let summary = engine
        .backup_source()
        .unwrap()
        .write(None, &mut out, &mut |_, _| {})
        .unwrap();
    drop(out);
    engine.shutdown().unwrap();
    assert!(
        summary.content_bytes > 4 << 20,
        "the store ({} bytes) must not fit the 4 MiB disk",
        summary.content_bytes
    );
    let to = disk.path.join("restored");
    let err = tagstore::storage::backup::restore_dir(std::slice::from_ref(&backup), &to)
        .expect_err("a restore onto a full disk fails");
    let msg = err.to_string();
    assert!(msg.contains("restored.restoring"), "{msg}");
    assert!(!to.exists());
    assert!(!disk.path.join("restored.restoring").exists());
    // Room again (a bigger disk): the same file restores.
    drop(disk);
    let roomy = tempfile::tempdir().unwrap();
    let to = roomy.path().join("restored");
    let report = tagstore::storage::backup::restore_dir(&[backup], &to).unwrap();
    assert_eq!(report.tags, 10);
    assert_eq!(report.customers, 200_000);
}
