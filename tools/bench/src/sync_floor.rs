//! The least a durable single write can cost over gRPC on this machine: a
//! server that knows nothing of tags. Its only call, `TagStore/Update`,
//! decodes the request, appends a record of the size of tagstore's log
//! record of one membership to a file allocated ahead (as tagstore's log
//! is), runs `fdatasync` on the network thread that received the call (as
//! tagstore does when its writer is idle) and answers. The `update`
//! scenario runs it as a child process (`tagstore-bench sync-floor
//! --data-dir DIR`, this binary) on the data directory's file system and
//! times one client's writes against it, so that a single write's cost is
//! read against what any gRPC server with a synced log pays here, not only
//! against a round trip plus an `fdatasync` measured apart.
//!
//! What it owns: the child process, its file and its one call. It must not
//! touch the store, and it is never used outside the harness.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tagstore_proto::codec::TagstoreCodec;
use tagstore_proto::{UpdateRequest, UpdateResponse};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::server::TcpIncoming;

use crate::ops::BoxError;

/// Bytes appended per write: tagstore's log record of one new membership
/// by internal id, as traced on its log file.
const RECORD: usize = 151;
/// The file is allocated to this size up front; writes past it wrap to the
/// start (a timed run of a few seconds stays far below it).
const FILE_BYTES: u64 = 64 << 20;
/// The line the child prints once it listens.
const LISTENING: &str = "sync floor listening on ";

/// The child process, stopped when dropped. Its stdin is held open: the
/// child exits when it closes, so that it does not outlive a harness that
/// is killed.
pub struct SyncFloor {
    child: Child,
    _stdin: Option<ChildStdin>,
    /// `host:port` it listens on.
    pub addr: String,
}

impl SyncFloor {
    /// Starts `tagstore-bench sync-floor --data-dir DIR` and waits until it
    /// listens (at most 30 s).
    pub fn start(dir: &Path) -> Result<Self, BoxError> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("sync-floor")
            .arg("--data-dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.strip_prefix(LISTENING) {
                        let _ = tx.send(addr.to_string());
                    }
                }
            });
        }
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(Self {
                child,
                _stdin: stdin,
                addr,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err("the sync-floor server did not start (see its stderr above)".into())
            }
        }
    }
}

impl Drop for SyncFloor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's body: serves until its stdin closes (the harness dropped
/// [`SyncFloor`] or died). The runtime is built as tagstore's server builds
/// its own (all cores, default settings).
pub fn serve(dir: &Path) -> Result<(), BoxError> {
    std::thread::spawn(|| {
        use std::io::Read;
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let path = dir.join(format!("sync-floor-{}.log", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    // The file is removed at once; the descriptor keeps it until exit.
    let _ = std::fs::remove_file(&path);
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fallocate on a descriptor this function owns.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, FILE_BYTES as libc::off_t) };
        if rc != 0 {
            file.set_len(FILE_BYTES)?;
        }
    }
    file.sync_all()?;
    let log = Arc::new(Log {
        file,
        next: AtomicU64::new(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{LISTENING}{addr}")?;
            out.flush()?;
        }
        tonic::transport::Server::builder()
            .add_service(FloorService { log })
            // As tagstore's server: no Nagle delay on small answers.
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await?;
        Ok(())
    })
}

struct Log {
    file: std::fs::File,
    next: AtomicU64,
}

impl Log {
    fn append_and_sync(&self) -> std::io::Result<()> {
        let at =
            self.next.fetch_add(RECORD as u64, Ordering::Relaxed) % (FILE_BYTES - RECORD as u64);
        self.file.write_all_at(&[0x5a; RECORD], at)?;
        self.file.sync_data()
    }
}

#[derive(Clone)]
struct FloorService {
    log: Arc<Log>,
}

impl NamedService for FloorService {
    const NAME: &'static str = "tagstore.v1.TagStore";
}

impl Service<http::Request<Body>> for FloorService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != "/tagstore.v1.TagStore/Update" {
            let status = tonic::Status::unimplemented("the sync floor answers Update only");
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let method = UpdateCall {
            log: self.log.clone(),
        };
        Box::pin(async move {
            let mut grpc = Grpc::new(TagstoreCodec::<UpdateResponse, UpdateRequest>::default());
            Ok(grpc.unary(method, req).await)
        })
    }
}

struct UpdateCall {
    log: Arc<Log>,
}

impl UnaryService<UpdateRequest> for UpdateCall {
    type Response = UpdateResponse;
    type Future = BoxFuture<tonic::Response<UpdateResponse>, tonic::Status>;

    fn call(&mut self, req: tonic::Request<UpdateRequest>) -> Self::Future {
        let log = self.log.clone();
        Box::pin(async move {
            let added: u64 = req
                .into_inner()
                .mutations
                .iter()
                .map(|m| (m.add.len() + m.add_ids.len()) as u64)
                .sum();
            log.append_and_sync()
                .map_err(|e| tonic::Status::internal(format!("sync floor log: {e}")))?;
            Ok(tonic::Response::new(UpdateResponse {
                added,
                ..Default::default()
            }))
        })
    }
}
