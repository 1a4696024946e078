//! Running a `tagstore` server as a child process, for the integration tests
//! and the benchmark harness. The server itself never uses this module; it
//! talks to the child only through its command line, stdout line
//! `tagstore listening on ADDR`, signals, and gRPC.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tagstore_proto::auth::Bearer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A client that sends a token when it was given one.
pub type Client = tagstore_proto::auth::Client;

/// A server process on a free loopback port.
pub struct ServerProcess {
    child: Option<Child>,
    /// `host:port` it listens on.
    pub addr: String,
    /// `host:port` of its metrics, when started with `--metrics-listen`.
    pub metrics_addr: Option<String>,
    pub data_dir: PathBuf,
    /// Time from spawning to the "listening" line.
    pub startup: Duration,
    stderr: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `binary serve --listen 127.0.0.1:0 --data-dir DIR extra...` (no
    /// `--listen` of its own when `extra` has one) and waits (up to `timeout`)
    /// until it listens. On failure, returns what the
    /// process printed on stderr.
    pub fn start(
        binary: &Path,
        data_dir: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<Self, String> {
        let started = Instant::now();
        let mut cmd = Command::new(binary);
        cmd.arg("serve");
        if !extra.contains(&"--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        let mut child = cmd
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    // The metrics line comes first.
                    if let Some(addr) = line.strip_prefix("tagstore metrics on ") {
                        let _ = tx.send((true, addr.to_string()));
                    }
                    if let Some(addr) = line.strip_prefix("tagstore listening on ") {
                        let _ = tx.send((false, addr.to_string()));
                    }
                }
            });
        }
        let mut metrics_addr = None;
        let listening = loop {
            match rx.recv_timeout(timeout.saturating_sub(started.elapsed())) {
                Ok((true, addr)) => metrics_addr = Some(addr),
                Ok((false, addr)) => break Some(addr),
                Err(_) => break None,
            }
        };
        match listening {
            Some(addr) => Ok(Self {
                child: Some(child),
                addr,
                metrics_addr,
                data_dir: data_dir.to_path_buf(),
                startup: started.elapsed(),
                stderr,
            }),
            None => {
                let _ = child.kill();
                let status = child.wait().ok();
                std::thread::sleep(Duration::from_millis(100));
                let log = stderr.lock().map(|s| s.clone()).unwrap_or_default();
                Err(format!(
                    "server did not start (exit {status:?}); stderr:\n{log}"
                ))
            }
        }
    }

    /// A gRPC client with large message limits, sending the token in
    /// `TAGSTORE_TOKEN` if there is one (a server without tokens ignores it),
    /// over TLS when `TAGSTORE_CACERT` names the CA to trust (PEM; the
    /// server's name is `TAGSTORE_SERVERNAME`, default `localhost`), as the
    /// shell does. A CA file that cannot be read is a panic naming it.
    pub async fn client(&self) -> Result<Client, tonic::transport::Error> {
        let token = std::env::var("TAGSTORE_TOKEN").ok();
        match std::env::var_os("TAGSTORE_CACERT") {
            None => self.client_with_token(token.as_deref()).await,
            Some(path) => {
                let pem = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("TAGSTORE_CACERT {}: {e}", Path::new(&path).display())
                });
                let name =
                    std::env::var("TAGSTORE_SERVERNAME").unwrap_or_else(|_| "localhost".into());
                self.client_over_tls(&pem, &name, token.as_deref()).await
            }
        }
    }

    /// A gRPC client with large message limits that sends `token`.
    pub async fn client_with_token(
        &self,
        token: Option<&str>,
    ) -> Result<Client, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("a host:port is a valid URI")
            .connect()
            .await?;
        Ok(Self::with_limits(channel, token))
    }

    /// A gRPC client over TLS, trusting the CA `ca_pem` for a server named
    /// `server_name`, that sends `token`.
    pub async fn client_over_tls(
        &self,
        ca_pem: &[u8],
        server_name: &str,
        token: Option<&str>,
    ) -> Result<Client, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(server_name);
        let channel = Channel::from_shared(format!("https://{}", self.addr))
            .expect("a host:port is a valid URI")
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(Self::with_limits(channel, token))
    }

    fn with_limits(channel: Channel, token: Option<&str>) -> Client {
        let bearer = Bearer::new(token).expect("a test token is ASCII");
        tagstore_proto::auth::client(channel, bearer)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process, from /proc (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        self.status_bytes("VmRSS:")
    }

    /// The part of [`ServerProcess::rss_bytes`] that is pages of mapped
    /// files (segments): page cache the kernel can reclaim and read again.
    pub fn rss_file_bytes(&self) -> Option<u64> {
        self.status_bytes("RssFile:")
    }

    /// A `kB` figure of /proc/PID/status, in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    }

    /// SIGKILL: the process gets no chance to flush or checkpoint.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn stop(&mut self) -> std::io::Result<ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| std::io::Error::other("server already stopped"))?;
        let pid = libc::pid_t::try_from(c.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) on the pid of a child that has not been reaped yet.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        c.wait()
    }

    /// Everything the process printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
