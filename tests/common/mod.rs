//! Test harness: starts the real `tagstore` binary on a free loopback port
//! and connects a gRPC client to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tagstore::proto::tag_store_client::TagStoreClient;
use tonic::transport::Channel;

pub type Client = TagStoreClient<Channel>;

pub struct TestServer {
    child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl TestServer {
    /// Starts a server on `dir` with extra command-line arguments.
    pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
        Self::try_start(dir, extra).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    /// Starts a server; on failure returns what it printed on stderr.
    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<TestServer, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tagstore"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tagstore");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("tagstore listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Ok(TestServer {
                child: Some(child),
                addr,
                dir: dir.to_path_buf(),
                stderr,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                std::thread::sleep(Duration::from_millis(100));
                Err(format!(
                    "exit {status:?}; stderr:\n{}",
                    stderr.lock().unwrap()
                ))
            }
        }
    }

    pub async fn client(&self) -> Client {
        let endpoint = format!("http://{}", self.addr);
        TagStoreClient::connect(endpoint)
            .await
            .expect("connect")
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no chance to flush or checkpoint.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a graceful exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        c.wait().expect("wait")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gRPC status code of a failed call.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}
