//! Test harness: the real `tagstore` binary on a free loopback port.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

pub use tagstore::harness::Client;
use tagstore::harness::ServerProcess;

pub type TestServer = ServerProcess;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tagstore"))
}

/// Starts a server on `dir` with extra arguments; panics if it does not start.
pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
    try_start(dir, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server; on failure returns what it printed on stderr.
pub fn try_start(dir: &Path, extra: &[&str]) -> Result<TestServer, String> {
    ServerProcess::start(binary(), dir, extra, Duration::from_secs(60))
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
