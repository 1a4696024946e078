//! `Backup`: the engine's backup file streamed to the client as it is
//! written. A thread of its own writes it (compression and checksums are
//! CPU work that may run for minutes) into a channel of at most 4 chunks
//! of 1 MiB, so a slow client slows the backup, not the server; a client
//! that reads nothing for `stream_idle_seconds`, one that goes away, and a
//! shutdown each end it. Owns the stream and its bounds; what the file
//! holds is the storage backup room's (`storage::backup`).

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::proto;
use crate::proto::backup_response::Part;
use crate::server::service::{Service, blocking, idle_status, invalid};
use crate::server::status::to_status;
use crate::storage::backup::Header;

pub type BackupStream = ReceiverStream<Result<proto::BackupResponse, Status>>;

/// Bytes of backup file per message.
const CHUNK: usize = 1 << 20;
/// Messages the channel holds (the backup waits when it is full).
const QUEUED: usize = 4;
/// The backup thread's priority (the lowest).
const BACKUP_NICE: i32 = 19;
/// How often progress is told.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn backup(
    svc: &Service,
    req: Request<proto::BackupRequest>,
) -> Result<Response<BackupStream>, Status> {
    let since = &req.get_ref().since;
    let base = if since.is_empty() {
        None
    } else {
        Some(Header::decode(since).map_err(|why| {
            invalid(format!(
                "since must be the first 88 bytes of an earlier backup: {why}"
            ))
        })?)
    };
    let permit = svc.backups.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted("a backup is running: one at a time; try again when it ends")
    })?;
    let engine = svc.engine.clone();
    let source = blocking(move || engine.backup_source().map_err(to_status)).await?;
    let (tx, rx) = mpsc::channel(QUEUED);
    let out = Sender {
        tx,
        handle: tokio::runtime::Handle::current(),
        idle: Duration::from_secs(svc.limits.stream_idle_seconds.max(1)),
        idle_status: idle_status(&svc.limits, "the backup was abandoned"),
        closing: svc.closing.clone(),
        ended: Arc::new(Mutex::new(None)),
    };
    std::thread::Builder::new()
        .name("tagstore-backup".into())
        .spawn(move || {
            // Compression must not take the CPU from writes and reads.
            super::lower_priority(BACKUP_NICE, "the backup's thread");
            run(source, base, out, permit);
        })
        .map_err(|e| Status::internal(format!("cannot start the backup's thread: {e}")))?;
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// Writes the backup and ends the stream: with `done`, or with the status
/// of what stopped it. The place (`permit`) is freed before the last
/// message is sent, so a client that has its `done` may take the next
/// backup at once (this thread runs at the lowest priority and may wait
/// long for a core after sending).
fn run(
    source: crate::storage::backup::Source,
    base: Option<Header>,
    out: Sender,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let sent = Arc::new(AtomicU64::new(0));
    let mut chunks = Chunks {
        out: out.clone(),
        buf: Vec::with_capacity(CHUNK),
        sent: sent.clone(),
    };
    let progress_out = out.clone();
    let mut last = Instant::now();
    let mut progress = |done: u64, estimated: u64| {
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            // A failure here shows at the next chunk.
            let _ = progress_out.send(Ok(Part::Progress(proto::BackupProgress {
                bytes_copied: done,
                bytes_estimated: estimated,
                bytes_sent: sent.load(Ordering::Relaxed),
            })));
        }
    };
    let res = source
        .write(base.as_ref(), &mut chunks, &mut progress)
        .and_then(|s| {
            chunks
                .send_buffered()
                .map_err(|e| crate::error::Error::io("the backup's output", e))?;
            Ok(s)
        });
    let last = match res {
        Ok(s) => Ok(Part::Done(proto::BackupDone {
            id: format!("{:016x}", s.header.id),
            position: s.header.position,
            checkpoint_lsn: s.header.checkpoint_lsn,
            base_id: if s.header.base_id == 0 {
                String::new()
            } else {
                format!("{:016x}", s.header.base_id)
            },
            base_position: s.header.base_position,
            files: s.files,
            files_in_base: s.in_base,
            log_records: s.log_records,
            content_bytes: s.content_bytes,
            backup_bytes: s.backup_bytes,
            taken_at_ms: s.header.at_ms,
        })),
        Err(e) => {
            // When the stream ended it, say why, if anyone still listens.
            let ended = out.ended.lock().take();
            match ended {
                Some(None) => {
                    tracing::info!("a backup's client went away before it finished");
                    return;
                }
                Some(Some(status)) => Err(status),
                None => Err(to_status(e)),
            }
        }
    };
    if let Err(status) = &last {
        tracing::warn!(error = %status.message(), "a backup did not finish");
    }
    // The source's files were closed when `write` returned.
    drop(permit);
    out.send_final(last);
}

/// The stream's sending end, as the backup's thread sees it.
#[derive(Clone)]
struct Sender {
    tx: mpsc::Sender<Result<proto::BackupResponse, Status>>,
    handle: tokio::runtime::Handle,
    idle: Duration,
    idle_status: Status,
    closing: tokio::sync::watch::Receiver<bool>,
    /// Set when the stream ended the backup: `Some(status)` to send,
    /// `None` when the client went away (nobody to tell).
    ended: Arc<Mutex<Option<Option<Status>>>>,
}

impl Sender {
    /// Sends one message, waiting at most `idle` for room; an error once
    /// the stream cannot go on (and `ended` says why).
    fn send(&self, part: Result<Part, Status>) -> io::Result<()> {
        let msg = part.map(|p| proto::BackupResponse { part: Some(p) });
        let mut closing = self.closing.clone();
        let outcome = self.handle.block_on(async {
            tokio::select! {
                r = self.tx.send_timeout(msg, self.idle) => Some(r),
                _ = closing.wait_for(|c| *c) => None,
            }
        });
        let ended = match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(mpsc::error::SendTimeoutError::Timeout(_))) => Some(self.idle_status.clone()),
            Some(Err(mpsc::error::SendTimeoutError::Closed(_))) => None,
            None => Some(Status::unavailable(
                "the server is shutting down: the backup did not finish; take it again",
            )),
        };
        self.ended.lock().get_or_insert(ended);
        Err(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "the backup's stream ended",
        ))
    }

    /// The last message: `done` waits as long as a chunk would; an error
    /// goes only if there is room (a client that stopped reading gets no
    /// `done`, which tells it the file is not whole).
    fn send_final(&self, part: Result<Part, Status>) {
        match part {
            Ok(p) => {
                let _ = self.send(Ok(p));
            }
            Err(status) => {
                let _ = self.tx.try_send(Err(status));
            }
        }
    }
}

/// The backup file's bytes, cut into chunks.
struct Chunks {
    out: Sender,
    buf: Vec<u8>,
    sent: Arc<AtomicU64>,
}

impl Chunks {
    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let n = chunk.len() as u64;
        self.out.send(Ok(Part::Chunk(chunk)))?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go when full and at the end: a flush inside the stream
        // (zstd's) need not send a small one.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn sender(
        rt: &tokio::runtime::Runtime,
    ) -> (
        Sender,
        mpsc::Receiver<Result<proto::BackupResponse, Status>>,
        tokio::sync::watch::Sender<bool>,
    ) {
        let (tx, rx) = mpsc::channel(QUEUED);
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let out = Sender {
            tx,
            handle: rt.handle().clone(),
            idle: Duration::from_millis(100),
            idle_status: Status::deadline_exceeded("idle"),
            closing,
            ended: Arc::default(),
        };
        (out, rx, closing_tx)
    }

    /// Writes whole chunks until a write fails; the chunks that went.
    fn fill(out: &Sender) -> usize {
        let mut chunks = Chunks {
            out: out.clone(),
            buf: Vec::new(),
            sent: Arc::default(),
        };
        let data = vec![0u8; CHUNK];
        (0..QUEUED + 2)
            .take_while(|_| chunks.write_all(&data).is_ok())
            .count()
    }

    fn ended(out: &Sender) -> Option<Option<Code>> {
        out.ended
            .lock()
            .as_ref()
            .map(|s| s.as_ref().map(Status::code))
    }

    #[test]
    fn a_client_that_reads_nothing_ends_it_after_the_idle_time() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (out, _rx, _closing) = sender(&rt);
        assert_eq!(fill(&out), QUEUED, "the channel holds {QUEUED} chunks");
        assert_eq!(ended(&out), Some(Some(Code::DeadlineExceeded)));
    }

    #[test]
    fn a_client_gone_ends_it_with_nobody_to_tell() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (out, rx, _closing) = sender(&rt);
        drop(rx);
        assert_eq!(fill(&out), 0);
        assert_eq!(ended(&out), Some(None));
    }

    #[test]
    fn a_shutdown_ends_a_backup_waiting_for_its_client() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut out, _rx, closing) = sender(&rt);
        out.idle = Duration::from_secs(3600);
        let waiting = std::thread::spawn({
            let out = out.clone();
            move || fill(&out)
        });
        std::thread::sleep(Duration::from_millis(100));
        closing.send(true).unwrap();
        assert_eq!(waiting.join().unwrap(), QUEUED);
        assert_eq!(ended(&out), Some(Some(Code::Unavailable)));
    }
}
