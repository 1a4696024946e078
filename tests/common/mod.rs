//! Shared by the integration tests: the real `tagstore` binary of this build
//! on a free loopback port, and the helpers of `tagstore-test-support`.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use tagstore_test_support::{
    Client, code, copy_data_dir, count, create_field, export_set, files_with, int_value,
};

pub type TestServer = tagstore_test_support::ServerProcess;

/// The server binary under test: this build's, or the one named by
/// `TAGSTORE_TEST_BINARY`.
pub fn binary() -> std::path::PathBuf {
    tagstore_test_support::server_binary(Some(env!("CARGO_BIN_EXE_tagstore")))
}

/// Starts a server on `dir` with extra arguments; panics if it does not start.
pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
    try_start(dir, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server; on failure returns what it printed on stderr.
pub fn try_start(dir: &Path, extra: &[&str]) -> Result<TestServer, String> {
    tagstore_test_support::try_start(&binary(), dir, extra)
}

pub async fn client(server: &TestServer) -> Client {
    server.client().await.expect("connect")
}
