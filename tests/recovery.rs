//! Recovery from damaged files: a torn log tail is cut and reported; a flipped
//! bit in a log record before the tail, in the manifest or in a segment's
//! directory stops start-up with the file and offset; a flipped bit inside a
//! bitmap blob fails the queries that read it (never an empty answer).

mod common;

use std::fs;
use std::path::Path;

use tagstore::query::Query;
use tagstore::storage::{CheckpointOptions, Engine, EngineConfig, Mutation, WriteOp};

fn add(engine: &Engine, tag: &str, keys: &[&str]) {
    engine
        .write_blocking(WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: keys.iter().map(|k| k.to_string()).collect(),
                remove: vec![],
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .unwrap();
}

fn count(engine: &Engine, q: &str) -> tagstore::Result<u64> {
    let snap = engine.snapshot();
    Ok(Query::compile(q, &snap)?.count())
}

/// Copies a live data directory, as a crash would leave it (no final checkpoint).
fn crash_copy(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "LOCK" && e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.path().join(e.file_name())).unwrap();
        }
    }
    to
}

/// Where a log file's records end: frames are `u32 len, u32 crc, len bytes`
/// after a 24-byte header, then preallocated zeros.
fn records_end(path: &Path) -> u64 {
    let data = fs::read(path).unwrap();
    let mut pos = 24;
    while pos + 4 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        pos += 8 + len;
    }
    pos as u64
}

fn flip(path: &Path, offset: usize) {
    let mut data = fs::read(path).unwrap();
    data[offset] ^= 0x20;
    fs::write(path, data).unwrap();
}

fn open(dir: &Path) -> tagstore::Result<Engine> {
    Engine::open(EngineConfig::new(dir))
}

#[test]
fn torn_log_tail_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &["a", "b"]);
    add(&engine, "t", &["c"]);
    add(&engine, "t", &["d"]);
    let copy = crash_copy(dir.path());
    drop(engine);
    let wal = common::wal_files(copy.path()).pop().unwrap();
    // Cut into the last record (the file continues with preallocated zeros).
    let len = records_end(&wal);
    fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - 5)
        .unwrap();

    let engine = open(copy.path()).unwrap();
    let rec = engine.recovery();
    assert!(
        rec.torn_tail.as_deref().unwrap().contains("torn record"),
        "{rec:?}"
    );
    assert_eq!(rec.records_replayed, 2);
    assert_eq!(
        count(&engine, "t").unwrap(),
        3,
        "a, b, c survive; the torn write of d is gone"
    );
    // The store keeps working and the next start is clean.
    add(&engine, "t", &["e"]);
    drop(engine);
    let engine = open(copy.path()).unwrap();
    assert!(engine.recovery().torn_tail.is_none());
    assert_eq!(count(&engine, "t").unwrap(), 4);
}

#[test]
fn flipped_bit_in_an_earlier_log_record_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &["a"]);
    add(&engine, "t", &["b"]);
    let copy = crash_copy(dir.path());
    drop(engine);
    let wal = common::wal_files(copy.path()).pop().unwrap();
    flip(&wal, 24 + 20); // inside the first record, which the second follows
    let err = open(copy.path())
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(
        err.contains(&wal.file_name().unwrap().to_string_lossy().to_string()),
        "{err}"
    );
    assert!(err.contains("offset 24"), "{err}");
}

#[test]
fn flipped_bit_in_the_manifest_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &["a"]);
    drop(engine); // clean shutdown writes a checkpoint and a manifest
    flip(&dir.path().join("MANIFEST"), 40);
    let err = open(dir.path())
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(
        err.contains("MANIFEST") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn flipped_bit_in_a_segment_is_reported_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    let keys: Vec<String> = (0..2000).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    add(&engine, "big", &refs);
    add(&engine, "small", &["k1"]);
    drop(engine);
    let seg = common::files_with(dir.path(), ".seg").pop().unwrap();
    // The first blob after the 16-byte header belongs to one of the tags.
    flip(&seg, 16 + 30);
    let engine = open(dir.path()).unwrap(); // bitmaps load lazily: start-up succeeds
    let big = count(&engine, "big");
    let small = count(&engine, "small");
    let failures: Vec<String> = [big, small]
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| e.to_string())
        .collect();
    assert_eq!(failures.len(), 1, "exactly the damaged tag fails");
    assert!(
        failures[0].contains("checksum mismatch") && failures[0].contains(".seg"),
        "{}",
        failures[0]
    );
    assert!(failures[0].contains("offset 16"), "{}", failures[0]);

    // Damage to the segment's directory is found at start-up.
    drop(engine);
    let len = fs::metadata(&seg).unwrap().len() as usize;
    flip(&seg, len - 32 - 10);
    let err = open(dir.path())
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(err.contains("directory checksum mismatch"), "{err}");
}

#[test]
fn server_refuses_to_start_on_a_damaged_store_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &["a"]);
    drop(engine);
    flip(&dir.path().join("MANIFEST"), 40);
    let err = common::try_start(dir.path(), &[])
        .err()
        .expect("must not start");
    assert!(
        err.contains("MANIFEST") && err.contains("checksum"),
        "{err}"
    );
}

#[test]
fn missing_log_after_the_checkpoint_is_an_error_not_a_silent_gap() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    add(&engine, "t", &["a"]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    add(&engine, "t", &["b"]);
    add(&engine, "t", &["c"]);
    let copy = crash_copy(dir.path());
    drop(engine);
    // Remove the log file that holds the writes after the checkpoint, but
    // leave a later (empty) one: the store must notice the hole.
    let logs = common::wal_files(copy.path());
    assert!(!logs.is_empty());
    let data = fs::read(&logs[0]).unwrap();
    // Rewrite the log so that it starts one record late: drop the first record.
    let first_len = u32::from_le_bytes(data[24..28].try_into().unwrap()) as usize;
    let mut cut = data[..24].to_vec();
    cut.extend_from_slice(&data[24 + 8 + first_len..]);
    // The header's first lsn must match the file name, so keep it: the gap is
    // then between the checkpoint and the first record.
    fs::write(&logs[0], cut).unwrap();
    let err = open(copy.path())
        .err()
        .expect("must refuse to start")
        .to_string();
    assert!(err.contains("log gap"), "{err}");
}

#[test]
fn flipped_bit_in_a_field_slot_fails_the_queries_that_read_it() {
    use tagstore::fields::FieldKind;
    use tagstore::storage::ValueWrite;
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    engine
        .write_blocking(WriteOp::CreateField {
            name: "spend".into(),
            description: String::new(),
            category: String::new(),
            kind: FieldKind::Int,
            merge: Default::default(),
            if_not_exists: false,
        })
        .unwrap();
    let writes = (0..2000)
        .map(|i| ValueWrite::Int {
            field: "spend".into(),
            customer: format!("k{i}"),
            value: Some(i * 3),
        })
        .collect();
    engine
        .write_blocking(WriteOp::SetValues { writes })
        .unwrap();
    drop(engine);
    // No tags: the first blob after the header is the field's first slot.
    let seg = common::files_with(dir.path(), ".seg").pop().unwrap();
    flip(&seg, 16 + 30);
    let engine = open(dir.path()).unwrap();
    assert_eq!(
        count(&engine, "ALL").unwrap(),
        2000,
        "other data still serves"
    );
    let err = count(&engine, "spend >= 0").unwrap_err().to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("FieldSlot") && err.contains("offset 16"),
        "{err}"
    );
}

/// A flipped bit inside a dictionary section fails a checkpoint that merges
/// it (with the file named), and nothing else: the old sections stay in use,
/// writes go on, and the next clean checkpoint works.
#[test]
fn flipped_bit_in_a_dictionary_section_fails_its_merge_not_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path()).unwrap();
    let create = |keys: Vec<String>| {
        engine
            .write_blocking(WriteOp::CreateCustomers { customers: keys })
            .unwrap();
    };
    create((0..8000).map(|i| format!("customer-{i}")).collect());
    engine.checkpoint_blocking(Default::default()).unwrap();
    create(vec!["late".into()]);
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(engine.info().dictionary_sections, 2);
    // An erased customer in the big section: a requested merge must then
    // rewrite it (otherwise it would keep it and merge only the small one).
    engine
        .write_blocking(WriteOp::DeleteCustomers {
            customers: vec!["customer-5".into()],
        })
        .unwrap();
    drop(engine);
    // The larger segment is mostly the first dictionary section (8,000
    // keys, ~300 KB, against a few bytes of live set), and its key bytes
    // come last: 20 KB before the end is a key, in a page that opening the
    // section does not read (it reads the first). The merge reads every key.
    let seg = common::files_with(dir.path(), ".seg")
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let len = fs::metadata(&seg).unwrap().len() as usize;
    flip(&seg, len - 20_000);

    let engine = open(dir.path()).unwrap(); // sections are checked page by page, lazily
    let merge = CheckpointOptions {
        merge_dictionary: true,
    };
    let err = engine
        .checkpoint_blocking(merge)
        .expect_err("the merge reads the damaged page")
        .to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains(".seg"),
        "{err}"
    );
    assert_eq!(engine.info().dictionary_sections, 2);
    assert_eq!(engine.snapshot().customer_id("late").unwrap(), Some(8000));
    add(&engine, "t", &["late", "new"]);
    assert_eq!(count(&engine, "t").unwrap(), 2);
    // The next checkpoint merges the two small sections (one key each),
    // without reading the damaged one.
    engine.checkpoint_blocking(Default::default()).unwrap();
    assert_eq!(engine.info().dictionary_sections, 2);
    assert_eq!(engine.snapshot().customer_id("new").unwrap(), Some(8001));
}
