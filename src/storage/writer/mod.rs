//! The writer. It owns the mutable state, the open log file and the
//! checkpoint schedule, and one thread at a time runs it (see [`thread`]):
//! its own thread, which takes every request waiting on its channel (group
//! commit), or a caller whose small write finds it idle and nothing queued.
//! Either plans and applies each request, appends their records to the log,
//! syncs once, publishes one new snapshot, then answers every request of the
//! group. A request that fails validation changes nothing.
//! When the group's last write is large, the log is synced on another thread
//! ([`Syncer`]) while that write is applied; nothing is published before the
//! sync returns.
//!
//! A failed log write or sync leaves memory ahead of the disk, so the writer
//! then refuses every further write until the process restarts and recovers
//! from the log (the last acknowledged state).
//!
//! The rooms of the write path: [`ops`] (the public write vocabulary),
//! `thread` (who runs the writer: its thread, or a caller committing its own
//! write), `plan` (a request and the state in, a batch with every id assigned out),
//! `ids` (customer keys to ids, new ids for new keys), `coalesce`
//! (consecutive small updates of a group as one batch), `checkpoints`
//! (scheduling, installing and maintenance), and this module (group
//! commit: what one commit does, whoever runs it).

mod audiences;
mod checkpoints;
mod coalesce;
pub mod identify;
mod ids;
pub mod ops;
mod plan;
mod rules;
mod thread;
pub mod unmerge;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::Sender;

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::storage::checkpoint::{CheckpointDone, CheckpointInfo, CheckpointOptions};
use crate::storage::manifest::Manifest;
use crate::storage::record::{Batch, KIND_BATCH};
use crate::storage::segment::Segment;
use crate::storage::state::State;
use crate::storage::wal::{self, Syncer, WalWriter};
use crate::storage::{DataDir, Shared, SyncMode};
pub use ops::*;
pub(crate) use thread::Core;

/// Longest tag description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Longest tag category, in bytes.
pub const MAX_CATEGORY_BYTES: usize = 200;
/// Most requests committed together under one sync.
const MAX_GROUP: usize = 256;

/// A group whose last write changes at least this many memberships syncs
/// the log on [`Syncer`]'s thread while that write is applied to memory
/// (about 100–300 µs for 1,000 ids, as long as the sync itself). Below it
/// the hand-off to the other thread costs more than it saves.
const SYNC_WHILE_APPLYING: u64 = 256;

/// Bytes of room the log buffer keeps between groups: a group of large
/// writes (a request of 64 MiB) grows it, and it goes back to at most this
/// much once the group is logged instead of holding the largest group's
/// size for as long as the server runs.
const KEEP_LOG_BUFFER: usize = 1 << 20;

/// Keys looked up at once by [`Mutation::resolve_in`].
const RESOLVE_GROUP: usize = 256;
/// Ids of each change that [`Writer::changes_nothing`] looks at before all of
/// them.
const SAMPLE_IDS: usize = 8;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Cmd {
    Write(WriteOp, Reply<WriteResult>),
    Checkpoint(CheckpointOptions, Reply<CheckpointInfo>),
    CheckpointDone(Box<Result<CheckpointDone>>),
    /// A write committed on its caller's thread may have made a checkpoint
    /// due: the writer's thread starts it (see `thread`).
    Tick,
    Shutdown(std::sync::mpsc::Sender<Result<()>>),
}

// One per request, moved a few times on the writer's stack and never
// stored: boxing either variant would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
enum Planned {
    Write(Batch, Target),
    Done(WriteResult),
}

/// Who waits for a planned batch: one request, or the requests of a run
/// of small updates combined ([`coalesce`]).
enum Waiting {
    One(Reply<WriteResult>),
    Run(Vec<coalesce::Part>),
}

impl Waiting {
    /// Answers every request waiting with `e` (the first with `e` itself).
    fn refuse(self, e: Error, replies: &mut Vec<(Reply<WriteResult>, Result<WriteResult>)>) {
        match self {
            Waiting::One(reply) => replies.push((reply, Err(e))),
            Waiting::Run(parts) => {
                for part in parts {
                    replies.push((part.reply, Err(coalesce::again(&e))));
                }
            }
        }
    }
}

/// What to report back after a planned write is applied.
enum Target {
    Plain,
    Created(String),
    Replaced(u32),
    FieldCreated(String),
    Values {
        expired: u64,
    },
    Ids(Vec<u32>),
    SourcePut {
        created: bool,
    },
    Ingested {
        expired: u64,
        duplicates: Vec<u32>,
        linked: u64,
        merges: Vec<crate::storage::record::LoggedMerge>,
        refusals: Vec<identify::LinkRefusal>,
    },
    Rebuilt {
        expired: u64,
        busy: Vec<String>,
    },
    Snapshot {
        id: u32,
        count: u64,
    },
    Unmerged {
        expired: u64,
        identities: u64,
        revived: u32,
        survivor: u32,
    },
}

impl Target {
    /// Fills in what an ingest reports that applying does not count.
    fn report(self, r: &mut WriteResult) {
        if let Target::Ingested {
            expired,
            duplicates,
            linked,
            merges,
            refusals,
        } = self
        {
            r.events_expired = expired;
            r.duplicates = duplicates;
            r.identities_linked = linked;
            r.merges = merges;
            r.refusals = refusals;
        }
    }
}

struct Running {
    waiters: Vec<Reply<CheckpointInfo>>,
    /// First lsn of the log file opened when the checkpoint began: every log
    /// file before it is covered once the checkpoint is done.
    rotated_first: u64,
    dirty_tags: std::collections::HashSet<u32>,
    dirty_live: bool,
    dirty_slots: std::collections::HashSet<(u32, u32)>,
    dirty_seen: std::collections::BTreeSet<i32>,
    dirty_merges: bool,
    dirty_snapshots: std::collections::HashSet<u32>,
    dirty_history: bool,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub state: State,
    pub wal: WalWriter,
    /// Bytes in log files older than the one being appended to.
    pub old_wal_bytes: u64,
    pub manifest: Manifest,
    pub segments: HashMap<u64, Arc<Segment>>,
    pub tx: Sender<Cmd>,
    pub dir: DataDir,
    running: Option<Running>,
    queued: Vec<Reply<CheckpointInfo>>,
    /// A caller asked for the dictionary to be merged: the next checkpoint
    /// to start does it.
    merge_dictionary: bool,
    failed: Option<String>,
    buf: Vec<u8>,
    /// The lsn of the newest write that deleted customers (the lsn at start
    /// before any): ids found live in a snapshot at least this new are live.
    last_delete_lsn: u64,
    /// The lsn of the newest write after which a key may name another
    /// customer than before (erased, merged, unmerged): keys looked up in
    /// an older snapshot are looked up again.
    keys_moved_lsn: u64,
    /// Syncs the log while a large write is applied (`None` if its thread
    /// could not be started: the writer then syncs everything itself).
    syncer: Option<Syncer>,
    /// The change feed's files.
    pub feed: crate::storage::feed::FeedWriter,
    /// The feed entries of the group being committed.
    feed_entries: Vec<crate::storage::feed::Entry>,
    /// The kept versions of the store's past (`history/`).
    versions: crate::storage::versions::Versions,
    /// When the next local day begins (a version is due then, if the store
    /// has changed since the newest).
    next_day_ms: i64,
    /// Bytes of log moved into the history since the newest version (a
    /// version is also kept once they pass `history_version_bytes`).
    log_since_version: u64,
}

/// How far ahead of now an event may be dated (clocks differ; a day more
/// is a mistake, such as milliseconds sent as microseconds).
pub const MAX_AHEAD_MS: i64 = 86_400_000;

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shared: Arc<Shared>,
        state: State,
        wal: WalWriter,
        old_wal_bytes: u64,
        manifest: Manifest,
        segments: HashMap<u64, Arc<Segment>>,
        tx: Sender<Cmd>,
        feed: crate::storage::feed::FeedWriter,
        versions: crate::storage::versions::Versions,
    ) -> Self {
        let dir = DataDir::new(shared.config.fs.clone(), shared.config.data_dir.clone());
        let log_since_version = versions.log_bytes_since_newest(&dir);
        let state_lsn = state.snap.lsn;
        let syncer = Syncer::start(shared.meters.clone())
            .map_err(
                |e| tracing::warn!(error = %e, "no sync thread; the writer syncs the log itself"),
            )
            .ok();
        Self {
            shared,
            state,
            wal,
            old_wal_bytes,
            manifest,
            segments,
            tx,
            dir,
            running: None,
            queued: Vec::new(),
            merge_dictionary: false,
            failed: None,
            buf: Vec::new(),
            last_delete_lsn: state_lsn,
            keys_moved_lsn: state_lsn,
            syncer,
            feed,
            feed_entries: Vec::new(),
            versions,
            next_day_ms: i64::MIN,
            log_since_version,
        }
    }

    /// Now, by the engine's clock.
    fn now_ms(&self) -> i64 {
        self.shared.config.clock.now_ms()
    }

    fn fail(&mut self, e: &Error) {
        let msg = e.to_string();
        tracing::error!(error = %msg, "storage failed; refusing further writes");
        *self.shared.failed.lock() = Some(msg.clone());
        self.failed = Some(msg);
    }

    fn commit_group(&mut self, writes: Vec<(WriteOp, Reply<WriteResult>)>) {
        let meters = &self.shared.meters;
        meters
            .writes
            .fetch_add(writes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        meters
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(msg) = &self.failed {
            for (_, reply) in writes {
                let _ = reply.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        self.buf.clear();
        self.feed_entries.clear();
        let mut replies = Vec::with_capacity(writes.len());
        let mut queue: VecDeque<(WriteOp, Reply<WriteResult>)> = writes.into();
        // The log's sync, when it runs while the group's last write is applied.
        let mut syncing = None;
        while let Some((op, reply)) = queue.pop_front() {
            let planner = plan::Planner {
                state: &self.state,
                at_ms: self.now_ms(),
                last_delete_lsn: self.keys_moved_lsn,
                rules: &self.shared.config.oneid,
                time_zone: &self.shared.config.time_zone,
            };
            let joins = |op: &WriteOp| coalesce::joins(op, &self.state);
            let (batch, target, waiting) = if joins(&op)
                && queue.front().is_some_and(|w| joins(&w.0))
            {
                // Small updates one after another: one batch (see `coalesce`).
                let mut run = vec![(op, reply)];
                while run.len() < coalesce::MAX_RUN && queue.front().is_some_and(|w| joins(&w.0)) {
                    run.extend(queue.pop_front());
                }
                let plan = planner.plan_run(run);
                for (reply, e) in plan.refused {
                    replies.push((reply, Err(e)));
                }
                for w in plan.rest.into_iter().rev() {
                    queue.push_front(w);
                }
                match plan.batch {
                    Some(batch) => (batch, Target::Plain, Waiting::Run(plan.parts)),
                    None => {
                        let lsn = self.state.snap.lsn;
                        for part in plan.parts {
                            let r = WriteResult {
                                lsn,
                                ..Default::default()
                            };
                            replies.push((part.reply, Ok(r)));
                        }
                        continue;
                    }
                }
            } else {
                match planner.plan(op) {
                    Err(e) => {
                        replies.push((reply, Err(e)));
                        continue;
                    }
                    Ok(Planned::Done(r)) => {
                        replies.push((reply, Ok(r)));
                        continue;
                    }
                    Ok(Planned::Write(batch, target)) => (batch, target, Waiting::One(reply)),
                }
            };
            let lsn = self.state.snap.lsn + 1;
            let framed_from = self.buf.len();
            wal::frame_with(&mut self.buf, lsn, KIND_BATCH, |out| batch.encode_into(out));
            // Room in the log first: a full disk refuses this write before
            // it is applied, and the store stays writable.
            if let Err(e) = self.wal.reserve(self.buf.len() as u64) {
                self.buf.truncate(framed_from);
                if !matches!(e, Error::DiskFull(_)) {
                    self.fail(&e);
                    waiting.refuse(e, &mut replies);
                    break;
                }
                tracing::warn!(error = %e, "write refused");
                waiting.refuse(e, &mut replies);
                continue;
            }
            if !batch.deletes.is_empty() {
                self.last_delete_lsn = lsn;
            }
            if batch.moves_keys() {
                self.keys_moved_lsn = lsn;
            }
            // The group's records are complete: the disk can work while this
            // write is applied. Nothing is published or answered before the
            // sync is done, so no reader sees a write the log could lose.
            if queue.is_empty()
                && self.shared.config.sync == SyncMode::Always
                && batch.membership_changes() >= SYNC_WHILE_APPLYING
                && let Some(syncer) = &self.syncer
            {
                if let Err(e) = self.wal.append(&self.buf) {
                    self.fail(&e);
                    waiting.refuse(e, &mut replies);
                    break;
                }
                self.buf.clear();
                syncing = Some(self.wal.start_sync(syncer));
            }
            match self.state.apply(lsn, &batch) {
                Ok(stats) => {
                    self.take_feed(lsn, batch.at_ms);
                    let reply = match waiting {
                        Waiting::One(reply) => reply,
                        Waiting::Run(parts) => {
                            for part in parts {
                                let r = part.result(lsn, &stats);
                                replies.push((part.reply, Ok(r)));
                            }
                            continue;
                        }
                    };
                    let mut r = WriteResult {
                        lsn,
                        added: stats.added,
                        removed: stats.removed,
                        new_customers: stats.new_customers,
                        deleted: stats.deleted,
                        member_count: stats.dropped_members,
                        ..Default::default()
                    };
                    match target {
                        Target::Plain => {}
                        Target::Created(name) => {
                            r.tag = self.state.snap.tag(&name).map(|t| t.meta.clone());
                            r.created = true;
                        }
                        Target::Replaced(id) => {
                            r.member_count = self.state.tag_by_id(id).map_or(0, |t| t.meta.count);
                        }
                        Target::FieldCreated(name) => {
                            r.field = self.state.snap.field(&name).map(|f| f.meta.clone());
                            r.created = true;
                        }
                        Target::Values { expired } => {
                            r.values_set = stats.values_set;
                            r.values_cleared = stats.values_cleared;
                            r.events_added = stats.events_added;
                            r.events_expired = expired;
                        }
                        Target::Ids(ids) => r.ids = ids,
                        Target::SourcePut { created } => r.created = created,
                        Target::Rebuilt { expired, busy } => {
                            r.values_set = stats.values_set;
                            r.values_cleared = stats.values_cleared;
                            r.events_added = stats.events_added;
                            r.events_expired = expired;
                            r.busy = busy;
                        }
                        Target::Snapshot { id, count } => {
                            r.ids = vec![id];
                            r.member_count = count;
                        }
                        Target::Unmerged {
                            expired,
                            identities,
                            revived,
                            survivor,
                        } => {
                            r.values_set = stats.values_set;
                            r.values_cleared = stats.values_cleared;
                            r.events_added = stats.events_added;
                            r.events_expired = expired;
                            r.identities_linked = identities;
                            r.ids = vec![revived, survivor];
                        }
                        t @ Target::Ingested { .. } => {
                            r.values_set = stats.values_set;
                            r.values_cleared = stats.values_cleared;
                            r.events_added = stats.events_added;
                            r.events_seen = stats.events_seen;
                            t.report(&mut r);
                        }
                    }
                    replies.push((reply, Ok(r)));
                }
                Err(e) => {
                    self.fail(&e);
                    waiting.refuse(e, &mut replies);
                    break;
                }
            }
        }
        // A failure stopped the group: the writes it did not reach are
        // refused with it below, as the others are.
        if let Some(msg) = &self.failed {
            for (_, reply) in queue {
                replies.push((reply, Err(Error::Failed(msg.clone()))));
            }
        }
        // Records the sync thread did not take are logged (and synced below).
        let logged_here = self.failed.is_none() && !self.buf.is_empty();
        if logged_here && let Err(e) = self.wal.append(&self.buf) {
            self.fail(&e);
        }
        // The group's feed entries go to their file before the log's sync
        // (or while the sync thread runs it): out of the answer's way. They
        // are shown to readers only after the sync (`advance` below);
        // recovery cuts those of writes the log lost.
        if self.failed.is_none() {
            let entries = std::mem::take(&mut self.feed_entries);
            self.feed.write_ahead(entries);
        }
        if let Some(pending) = syncing
            && let Err(e) = pending.wait()
            && self.failed.is_none()
        {
            self.fail(&e);
        }
        if logged_here
            && self.failed.is_none()
            && self.shared.config.sync == SyncMode::Always
            && let Err(e) = timed_sync(&mut self.wal, &self.shared.meters)
        {
            self.fail(&e);
        }
        recycle(&mut self.buf);
        if let Some(msg) = &self.failed {
            for (reply, _) in replies {
                let _ = reply.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        self.shared.publish(Arc::new(self.state.snap.clone()));
        self.shared.info.lock().wal_bytes = self.old_wal_bytes + self.wal.bytes();
        // After the snapshot: a watcher woken by the feed finds the keys of
        // the customers it names.
        self.feed.advance(self.state.snap.lsn, self.now_ms());
        for (reply, res) in replies {
            let _ = reply.send(res);
        }
    }

    /// Logs, applies and publishes a batch the writer made itself (retention
    /// and roll-ups), exactly as a client's write would be.
    fn commit_internal(&mut self, batch: &Batch) -> Result<()> {
        if let Some(msg) = &self.failed {
            return Err(Error::Failed(msg.clone()));
        }
        let lsn = self.state.snap.lsn + 1;
        self.buf.clear();
        wal::frame_with(&mut self.buf, lsn, KIND_BATCH, |out| batch.encode_into(out));
        match self.wal.reserve(self.buf.len() as u64) {
            Ok(()) => {}
            Err(e @ Error::DiskFull(_)) => return Err(e),
            Err(e) => {
                self.fail(&e);
                return Err(e);
            }
        }
        if !batch.deletes.is_empty() {
            self.last_delete_lsn = lsn;
        }
        if batch.moves_keys() {
            self.keys_moved_lsn = lsn;
        }
        self.feed_entries.clear();
        let res = self.state.apply(lsn, batch).and_then(|_| {
            self.take_feed(lsn, batch.at_ms);
            self.wal.append(&self.buf)?;
            let entries = std::mem::take(&mut self.feed_entries);
            self.feed.write_ahead(entries);
            match self.shared.config.sync {
                SyncMode::Always => timed_sync(&mut self.wal, &self.shared.meters),
                SyncMode::Never => Ok(()),
            }
        });
        recycle(&mut self.buf);
        if let Err(e) = res {
            self.fail(&e);
            return Err(e);
        }
        self.shared.publish(Arc::new(self.state.snap.clone()));
        self.shared.info.lock().wal_bytes = self.old_wal_bytes + self.wal.bytes();
        self.feed.advance(lsn, self.now_ms());
        Ok(())
    }

    /// The feed entry of the batch just applied, if it changed memberships.
    fn take_feed(&mut self, lsn: u64, at_ms: i64) {
        if !self.state.feed.is_empty() {
            self.feed_entries.push(crate::storage::feed::Entry {
                lsn,
                at_ms,
                changes: std::mem::take(&mut self.state.feed),
            });
        }
    }
}

/// Empties the log buffer once its records are written, keeping at most
/// [`KEEP_LOG_BUFFER`] bytes of room.
fn recycle(buf: &mut Vec<u8>) {
    buf.clear();
    buf.shrink_to(KEEP_LOG_BUFFER);
}

/// The log's `fdatasync`, timed into the engine's meters.
fn timed_sync(wal: &mut WalWriter, meters: &crate::storage::meters::Meters) -> Result<()> {
    let started = std::time::Instant::now();
    let res = wal.sync();
    meters.log_sync.observe(started.elapsed());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_group_leaves_no_large_log_buffer() {
        let mut buf = vec![7u8; 64 << 20];
        recycle(&mut buf);
        assert!(buf.is_empty());
        assert!(buf.capacity() <= KEEP_LOG_BUFFER, "{}", buf.capacity());
        // A usual group's room is kept for the next one.
        let mut small = Vec::with_capacity(64 << 10);
        small.extend_from_slice(&[1, 2, 3]);
        recycle(&mut small);
        assert!(small.is_empty());
        assert_eq!(small.capacity(), 64 << 10);
    }
}
