//! Test support: the real `tagstore` server as a child process, and small
//! helpers that talk to it over gRPC or look at its data directory. Used by
//! the integration tests of every package and by the capacity harness; never
//! by the server.
//!
//! It speaks only the public contract (`tagstore-proto`) and the server's
//! command line; it must not depend on the engine.

mod broker;
mod gate;
mod process;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use broker::{Broker, BrokerOptions};
pub use gate::Gate;
pub use process::{Client, ServerProcess};
use tagstore_proto::{CountRequest, CreateFieldRequest, ExportRequest, FieldKind};

/// The server binary a test runs: the one named by `TAGSTORE_TEST_BINARY`
/// (to run a suite against another build, such as the one before a fix),
/// else `built` when the caller knows it (`env!("CARGO_BIN_EXE_tagstore")`
/// in the server's own package), else `tagstore` beside the test executable's
/// directory (`target/<profile>/`), which `cargo test` in the workspace
/// builds. Panics, saying how to build it, when there is none.
pub fn server_binary(built: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os("TAGSTORE_TEST_BINARY") {
        return p.into();
    }
    if let Some(p) = built {
        return p.into();
    }
    // target/<profile>/deps/<test>-<hash> → target/<profile>/tagstore
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("tagstore")));
    match beside {
        Some(p) if p.is_file() => p,
        _ => panic!(
            "no tagstore server binary next to this test ({beside:?}); \
             run the tests from the workspace root (`cargo test`), build it with \
             `cargo build --bin tagstore`, or name one in TAGSTORE_TEST_BINARY"
        ),
    }
}

/// Starts `binary` on `dir` with extra arguments and waits up to a minute
/// until it listens; on failure returns what it printed on stderr.
pub fn try_start(binary: &Path, dir: &Path, extra: &[&str]) -> Result<ServerProcess, String> {
    ServerProcess::start(binary, dir, extra, Duration::from_secs(60))
}

/// The gRPC status code of a failed call; panics if the call succeeded.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// The count of one query; panics on an error.
pub async fn count(c: &mut Client, q: &str) -> u64 {
    c.count(CountRequest {
        queries: vec![q.into()],
        as_of: None,
    })
    .await
    .unwrap_or_else(|e| panic!("count {q}: {e}"))
    .into_inner()
    .counts[0]
}

/// Creates a field; panics on an error.
pub async fn create_field(c: &mut Client, name: &str, kind: FieldKind, values: &[&str]) {
    c.create_field(CreateFieldRequest {
        name: name.into(),
        kind: kind as i32,
        values: values.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// A customer's value of an integer field, from their profile (`None`:
/// no value). Panics on an error, or if the field's value is not an integer.
pub async fn int_value(c: &mut Client, customer: &str, field: &str) -> Option<i64> {
    let p = c
        .profile(tagstore_proto::ProfileRequest {
            customer: customer.into(),
            recent_days: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("profile {customer}: {e}"))
        .into_inner();
    p.values.into_iter().find(|v| v.field == field).map(|v| {
        let Some(tagstore_proto::field_value::Value::IntValue(n)) = v.value else {
            panic!("{field} of {customer} is not an integer: {v:?}");
        };
        n
    })
}

/// Every member of `query`, through `Export`; panics on an error.
pub async fn export_set(c: &mut Client, query: &str) -> BTreeSet<String> {
    let mut s = c
        .export(ExportRequest {
            query: query.into(),
            batch_size: 0,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("export {query}: {e}"))
        .into_inner();
    let mut out = BTreeSet::new();
    while let Some(b) = s
        .message()
        .await
        .unwrap_or_else(|e| panic!("export {query}: {e}"))
    {
        out.extend(b.customers);
    }
    out
}

/// Copies a data directory (its files but `LOCK`), as it is at this moment:
/// opening the copy is a restart without a clean shutdown.
///
/// The store may be running: a checkpoint can install a new `MANIFEST` and
/// delete the files it no longer names while the copy is made. A copy that
/// mixes the manifest before with the files after is no state a crash can
/// leave, so the copy is taken again until one is made in which no file
/// vanished and neither the list of files nor `MANIFEST` changed from its
/// start to its end (the other files only grow while they are named).
pub fn copy_data_dir(from: &Path, to: &Path) {
    const ATTEMPTS: usize = 1000;
    for _ in 0..ATTEMPTS {
        let before = dir_state(from);
        let mut whole = true;
        for name in &before.0 {
            match std::fs::copy(from.join(name), to.join(name)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    whole = false;
                    break;
                }
                Err(e) => panic!("copy data file {name}: {e}"),
            }
        }
        if whole && dir_state(from) == before {
            return;
        }
        for entry in std::fs::read_dir(to).expect("read the copy") {
            let path = entry.expect("read the copy").path();
            std::fs::remove_file(&path)
                .unwrap_or_else(|e| panic!("clear the copy {}: {e}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!(
        "no consistent copy of {} in {ATTEMPTS} attempts: its files kept changing",
        from.display()
    );
}

/// The names of a data directory's files (but `LOCK`), sorted, and the bytes
/// of its `MANIFEST` (none when it has none).
fn dir_state(dir: &Path) -> (Vec<String>, Option<Vec<u8>>) {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read data dir") {
        let entry = entry.expect("read data dir");
        // Files only: `orphaned/` (files moved aside at start-up) is not the store.
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "LOCK" && is_file {
            names.push(name);
        }
    }
    names.sort();
    let manifest = match std::fs::read(dir.join("MANIFEST")) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {}/MANIFEST: {e}", dir.display()),
    };
    (names, manifest)
}

/// The files of `dir` whose names end with `suffix`, sorted.
pub fn files_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// The write-ahead log files of a data directory (`wal-*.log`), oldest
/// first: not the change feed's `feed-*.log`.
pub fn wal_files(dir: &Path) -> Vec<PathBuf> {
    files_with(dir, ".log")
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("wal-"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A fresh empty directory under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        dir
    }

    /// While a thread checkpoints the way the store does (a new segment, a
    /// new `MANIFEST` naming it put in place by a rename, the old segment
    /// deleted), every copy holds the segment its manifest names. The
    /// thread checkpoints in bursts of 20 with 2 ms between them: a store
    /// never checkpoints without pause, and with no pause at all a copy on
    /// a busy host may never find the directory still (CI: "no consistent
    /// copy in 1000 attempts"), while the bursts still catch a copy that
    /// does not check.
    #[test]
    fn a_copy_of_a_changing_directory_is_one_a_crash_could_leave() {
        let from = scratch("copy-from");
        std::fs::write(from.join("seg-0.seg"), b"0").unwrap();
        std::fs::write(from.join("MANIFEST"), b"seg-0.seg").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let checkpoints = {
            let (from, stop) = (from.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let seg = format!("seg-{n}.seg");
                    std::fs::write(from.join(&seg), vec![b'x'; 4096]).unwrap();
                    std::fs::write(from.join("MANIFEST.tmp"), seg.as_bytes()).unwrap();
                    std::fs::rename(from.join("MANIFEST.tmp"), from.join("MANIFEST")).unwrap();
                    std::fs::remove_file(from.join(format!("seg-{}.seg", n - 1))).unwrap();
                    if n.is_multiple_of(20) {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        };
        for i in 0..50 {
            let to = scratch(&format!("copy-to-{i}"));
            copy_data_dir(&from, &to);
            let named = String::from_utf8(std::fs::read(to.join("MANIFEST")).unwrap()).unwrap();
            assert!(
                to.join(&named).exists(),
                "copy {i}: MANIFEST names {named}, not copied"
            );
            std::fs::remove_dir_all(&to).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        checkpoints.join().unwrap();
        std::fs::remove_dir_all(&from).unwrap();
    }
}
