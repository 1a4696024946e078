//! Who runs the writer. One thread at a time holds it, behind a lock:
//! - its own thread (`tagstore-writer`), woken by the channel, which takes
//!   every command waiting (group commit), checkpoints and shutdown among
//!   them;
//! - or a caller whose small write finds the writer idle, no write queued
//!   and no writes come together in the last 100 ms ([`Core::idle_for`]):
//!   it commits that one write on its own thread. A single write from one
//!   client then costs no hand-off to the writer's thread and none back,
//!   each a thread wake-up that on a virtual machine can cost more than
//!   the write itself. Starting a checkpoint such a write made due is left
//!   to the thread ([`Cmd::Tick`]).
//!
//! Writes queued one after another are applied in that order: while any
//! write sent to the thread is not yet committed, no caller commits its
//! own, so a later write cannot overtake an earlier one of the same
//! stream. Owns the lock, the count of queued writes and the thread's
//! loop; what a commit does is the writer's (`mod.rs`).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;

use super::{Cmd, MAX_GROUP, WriteOp, WriteResult, Writer};
use crate::error::{Error, Result};

/// Most keys a write may name to be committed on its caller's thread: a
/// write this small is planned and applied in microseconds, so the caller
/// holds the writer about as long as the log's sync.
pub const COMMIT_INLINE_KEYS: usize = 64;

/// How long callers leave every write to the writer's thread once writes
/// were seen coming together: a caller committing its own write holds a
/// network thread through the log's sync, which costs more than the
/// hand-off when other writes (and their clients' requests) wait on it.
const CONTENDED_FOR: Duration = Duration::from_millis(100);

/// The writer and what decides who runs it.
pub(crate) struct Core {
    writer: Mutex<Writer>,
    /// Writes sent to the thread that it has not yet committed. While any
    /// is, callers send theirs too, behind it.
    queued: AtomicUsize,
    /// The thread has stopped (shut down, or panicked): writes go to the
    /// channel, which says why.
    stopped: AtomicBool,
    /// Until when (nanoseconds after `epoch`) writes go to the thread
    /// whatever: set when writes came together (a group of more than one,
    /// or a write sent while a caller committed its own).
    contended_until: AtomicU64,
    epoch: Instant,
    /// A [`Cmd::Tick`] is on its way to the thread: callers send no other
    /// until it has been taken.
    ticked: AtomicBool,
}

impl Core {
    pub fn new(writer: Writer) -> Self {
        Self {
            writer: Mutex::new(writer),
            queued: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            contended_until: AtomicU64::new(0),
            epoch: Instant::now(),
            ticked: AtomicBool::new(false),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Writes came together: leave them to the thread for a while.
    fn contended(&self) {
        let until = self.now_ns() + CONTENDED_FOR.as_nanos() as u64;
        self.contended_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Counts a write about to be sent to the thread (before it is sent).
    pub fn queue(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes back [`Core::queue`] for a write that could not be sent.
    pub fn unqueue(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// The writer, to commit `op` on this thread, when it is a small update
    /// or setting of values, called on a worker of a multi-threaded tokio
    /// runtime, the writer is idle, no write is queued for its thread and
    /// writes have not come together lately; `None` when `op` must be sent.
    /// Committing here blocks the worker for one log sync, as a count
    /// computed on the network thread blocks it for its work: one worker at
    /// a time (the writer's lock), never for a large write, never while
    /// other writes wait. Handing the worker's other tasks to another
    /// thread first (`block_in_place`) was measured and cost what it saved.
    /// Elsewhere (a current-thread runtime, which a sync would stop; a
    /// plain thread) it never commits here.
    pub fn idle_for(&self, op: &WriteOp) -> Option<Idle<'_>> {
        let small = matches!(op, WriteOp::Update { .. } | WriteOp::SetValues { .. })
            && op.key_count() <= COMMIT_INLINE_KEYS;
        if !small
            || self.stopped.load(Ordering::SeqCst)
            || self.now_ns() < self.contended_until.load(Ordering::Relaxed)
        {
            return None;
        }
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if !multi_thread {
            return None;
        }
        let writer = self.writer.try_lock()?;
        // Under the lock: the thread counts a write down only once it is
        // committed, so nothing sent before this is still waiting.
        if self.queued.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(Idle { core: self, writer })
    }

    /// The writer's thread: takes the commands waiting on `rx`, runs them
    /// holding the writer, until shutdown or until every sender is gone.
    pub fn run(&self, rx: Receiver<Cmd>) {
        let stopped = AssertUnwindSafe(|| self.serve(&rx));
        let res = catch_unwind(stopped);
        self.stopped.store(true, Ordering::SeqCst);
        if let Err(panic) = res {
            // Should the writer ever panic, later writes must say so, not
            // that the server is shutting down.
            let msg = format!("the writer thread stopped: {}", panic_message(&*panic));
            let mut writer = self.writer.lock();
            writer.fail(&Error::Failed(msg));
        }
    }

    fn serve(&self, rx: &Receiver<Cmd>) {
        loop {
            let Ok(first) = rx.recv() else { return };
            let mut writer = self.writer.lock();
            let mut writes = Vec::new();
            let mut checkpoints = Vec::new();
            let mut shutdown = None;
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Cmd::Write(op, reply) => writes.push((op, reply)),
                    Cmd::Checkpoint(options, reply) => {
                        writer.merge_dictionary |= options.merge_dictionary;
                        checkpoints.push(reply)
                    }
                    Cmd::CheckpointDone(res) => writer.complete_checkpoint(*res),
                    // Below, after the group (callers hold off while the
                    // thread holds the writer, so no due checkpoint is missed).
                    Cmd::Tick => self.ticked.store(false, Ordering::SeqCst),
                    Cmd::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                next = if writes.len() < MAX_GROUP {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            if !writes.is_empty() {
                let n = writes.len();
                if n > 1 {
                    self.contended();
                }
                writer.commit_group(writes);
                self.queued.fetch_sub(n, Ordering::SeqCst);
            }
            if !checkpoints.is_empty() {
                writer.request_checkpoint(checkpoints);
            }
            writer.maybe_auto_checkpoint();
            if let Some(reply) = shutdown {
                // No caller commits from here on; writes still coming are
                // refused by the channel.
                self.stopped.store(true, Ordering::SeqCst);
                let res = writer.finish(rx);
                let _ = reply.send(res);
                return;
            }
        }
    }
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into())
}

/// The writer, idle, held by a caller to commit one write of its own.
pub(crate) struct Idle<'a> {
    core: &'a Core,
    writer: MutexGuard<'a, Writer>,
}

impl Idle<'_> {
    /// Commits `op` here and answers it, as the writer's thread would.
    pub fn commit(mut self, op: WriteOp) -> Result<WriteResult> {
        let (tx, mut rx) = oneshot::channel();
        let meters = self.writer.shared.meters.clone();
        meters.commits_on_caller.fetch_add(1, Ordering::Relaxed);
        let writer = &mut *self.writer;
        let ticked = &self.core.ticked;
        let done = catch_unwind(AssertUnwindSafe(|| {
            writer.commit_group(vec![(op, tx)]);
            // Starting a checkpoint may read archive files: not on a
            // network thread. One tick at a time.
            if writer.checkpoint_may_be_due() && !ticked.swap(true, Ordering::SeqCst) {
                let _ = writer.tx.send(Cmd::Tick);
            }
        }));
        // Another write came meanwhile: leave the next ones to the thread.
        if self.core.queued.load(Ordering::SeqCst) > 0 {
            self.core.contended();
        }
        if let Err(panic) = done {
            // Memory may be half changed: no write may follow it.
            let e = Error::Failed(format!("the writer stopped: {}", panic_message(&*panic)));
            self.writer.fail(&e);
            return Err(e);
        }
        drop(self);
        rx.try_recv().unwrap_or_else(|_| {
            Err(Error::Internal(
                "a write committed on its caller's thread was not answered".into(),
            ))
        })
    }
}
