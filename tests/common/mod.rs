//! Test harness: the real `tagstore` binary on a free loopback port.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

pub use tagstore::harness::Client;
use tagstore::harness::ServerProcess;

pub type TestServer = ServerProcess;

/// The server binary under test: this build's, or the one named by
/// `TAGSTORE_TEST_BINARY` (to run the suite against another build, such as
/// the one before a fix).
pub fn binary() -> std::path::PathBuf {
    std::env::var_os("TAGSTORE_TEST_BINARY")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_tagstore")).to_path_buf())
}

/// Starts a server on `dir` with extra arguments; panics if it does not start.
pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
    try_start(dir, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server; on failure returns what it printed on stderr.
pub fn try_start(dir: &Path, extra: &[&str]) -> Result<TestServer, String> {
    ServerProcess::start(&binary(), dir, extra, Duration::from_secs(60))
}

pub async fn client(server: &TestServer) -> Client {
    server.client().await.expect("connect")
}

/// The gRPC status code of a failed call.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// The count of one query; panics on an error.
pub async fn count(c: &mut Client, q: &str) -> u64 {
    c.count(tagstore::proto::CountRequest {
        queries: vec![q.into()],
    })
    .await
    .unwrap_or_else(|e| panic!("count {q}: {e}"))
    .into_inner()
    .counts[0]
}

/// Creates a field; panics on an error.
pub async fn create_field(
    c: &mut Client,
    name: &str,
    kind: tagstore::proto::FieldKind,
    values: &[&str],
) {
    c.create_field(tagstore::proto::CreateFieldRequest {
        name: name.into(),
        kind: kind as i32,
        values: values.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// Copies a data directory (all but its `LOCK`), as it is at this moment:
/// opening the copy is a restart without a clean shutdown.
pub fn copy_data_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        // Files only: `orphaned/` (files moved aside at start-up) is not the store.
        if entry.file_name() != "LOCK" && entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The files of `dir` whose names end with `suffix`, sorted.
pub fn files_with(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    v.sort();
    v
}

/// Every member of `query`, through `Export`; panics on an error.
pub async fn export_set(c: &mut Client, query: &str) -> std::collections::BTreeSet<String> {
    let mut s = c
        .export(tagstore::proto::ExportRequest {
            query: query.into(),
            batch_size: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("export {query}: {e}"))
        .into_inner();
    let mut out = std::collections::BTreeSet::new();
    while let Some(b) = s.message().await.unwrap() {
        out.extend(b.customers);
    }
    out
}
