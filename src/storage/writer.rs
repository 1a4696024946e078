//! The single writer thread. It owns the mutable state, the open log file and
//! the checkpoint schedule. Requests queue on a channel; the writer takes all
//! that are waiting (group commit), plans and applies each one, appends their
//! records to the log, syncs once, publishes one new snapshot, then answers
//! every request of the group. A request that fails validation changes nothing.
//! When the group's last write is large, the log is synced on another thread
//! ([`Syncer`]) while that write is applied; nothing is published before the
//! sync returns.
//!
//! A failed log write or sync leaves memory ahead of the disk, so the writer
//! then refuses every further write until the process restarts and recovers
//! from the log (the last acknowledged state).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use roaring::RoaringBitmap;
use tokio::sync::oneshot;

use crate::columns::FieldKind;
use crate::columns::time::{self, Bucket};
use crate::error::{Error, Result};
use crate::names::{check_key, check_tag_name};
use crate::storage::checkpoint::{
    CheckpointDone, CheckpointInfo, CheckpointJob, CheckpointOptions,
};
use crate::storage::datadir::fsync_dir;
use crate::storage::manifest::Manifest;
use crate::storage::record::{Batch, Change, ChangeOp, FieldChange, KIND_BATCH, NewField, NewTag};
use crate::storage::segment::{BlobKind, Segment};
use crate::storage::snapshot::{Field, FieldMeta, LazyBitmap, Snapshot, TagMeta};
use crate::storage::state::State;
use crate::storage::wal::{self, Syncer, WalWriter};
use crate::storage::{Shared, SyncMode};

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

/// Keys looked up at once by [`Mutation::resolve_in`].
const RESOLVE_GROUP: usize = 256;
/// Ids of each change that [`Writer::changes_nothing`] looks at before all of
/// them.
const SAMPLE_IDS: usize = 8;

/// One tag's changes in an [`WriteOp::Update`], by customer key and by
/// internal id.
#[derive(Debug, Clone, Default)]
pub struct Mutation {
    pub tag: String,
    pub add: Vec<String>,
    pub remove: Vec<String>,
    /// Ids of live customers ([`Error::CustomerIdNotFound`] otherwise).
    pub add_ids: Vec<u32>,
    /// Ids that name no live customer are skipped.
    pub remove_ids: Vec<u32>,
    /// Keys of `add` already looked up in a recent snapshot, each with the id
    /// it had there ([`Mutation::resolve_in`]). They mean exactly what they
    /// would in `add`: the writer takes the id while that customer is live,
    /// and looks the key up again (or creates it) otherwise.
    pub add_resolved: Vec<(u32, String)>,
    /// Keys of `remove` looked up the same way.
    pub remove_resolved: Vec<(u32, String)>,
    /// The lsn of the snapshot in which every id of `add_resolved` and
    /// `remove_resolved` named a live customer, if known. When no customer
    /// has been deleted since, the writer takes the ids without checking
    /// them again.
    pub resolved_at: Option<u64>,
}

impl Mutation {
    fn is_empty(&self) -> bool {
        self.add.is_empty()
            && self.remove.is_empty()
            && self.add_ids.is_empty()
            && self.remove_ids.is_empty()
            && self.add_resolved.is_empty()
            && self.remove_resolved.is_empty()
    }

    /// Moves the second half of the keys of `add` and of `remove` into a new
    /// mutation of the same tag, to be resolved elsewhere and then
    /// [`Mutation::append`]ed back: a mutation is a set of changes, so the
    /// order of its customers does not matter.
    pub fn split_off_half(&mut self) -> Mutation {
        Mutation {
            tag: self.tag.clone(),
            add: self.add.split_off(self.add.len() / 2),
            remove: self.remove.split_off(self.remove.len() / 2),
            ..Default::default()
        }
    }

    fn has_resolved(&self) -> bool {
        !self.add_resolved.is_empty() || !self.remove_resolved.is_empty()
    }

    /// Adds the customers of `other` (a mutation of the same tag).
    pub fn append(&mut self, mut other: Mutation) {
        self.resolved_at = match (self.has_resolved(), other.has_resolved()) {
            (_, false) => self.resolved_at,
            (false, true) => other.resolved_at,
            (true, true) => self
                .resolved_at
                .zip(other.resolved_at)
                .map(|(a, b)| a.min(b)),
        };
        self.add.append(&mut other.add);
        self.remove.append(&mut other.remove);
        self.add_ids.append(&mut other.add_ids);
        self.remove_ids.append(&mut other.remove_ids);
        self.add_resolved.append(&mut other.add_resolved);
        self.remove_resolved.append(&mut other.remove_resolved);
    }

    /// Looks the keys of `add` and `remove` up in `snap`, a snapshot the
    /// caller holds, and moves those of live customers to `add_resolved`
    /// and `remove_resolved`: the look-ups then run on the caller's thread,
    /// not on the single writer thread. Safe against any write in between,
    /// because a key keeps its id for its customer's whole life: if the id is
    /// still live when the write is applied, it is still that key's.
    pub fn resolve_in(&mut self, snap: &Snapshot) -> Result<()> {
        let found = self.look_up(snap)?;
        self.take_resolved(found);
        Ok(())
    }

    /// The first half of [`Mutation::resolve_in`], which only reads: the
    /// ids `snap` has for the keys of `add` and of `remove` (`None` for keys
    /// of no live customer). It may run on another thread than
    /// [`Mutation::take_resolved`], and allocates little there.
    pub fn look_up(&self, snap: &Snapshot) -> Result<KeyIds> {
        fn ids(keys: &[String], snap: &Snapshot) -> Result<Vec<Option<u32>>> {
            // In groups, so that the dictionary's lock (which the writer takes
            // to add new keys) is held briefly each time.
            let mut ids = Vec::with_capacity(keys.len());
            for group in keys.chunks(RESOLVE_GROUP) {
                let refs: Vec<&str> = group.iter().map(String::as_str).collect();
                ids.extend(snap.customer_ids(&refs)?);
            }
            Ok(ids)
        }
        Ok(KeyIds {
            add: ids(&self.add, snap)?,
            remove: ids(&self.remove, snap)?,
            lsn: snap.lsn,
        })
    }

    /// The second half of [`Mutation::resolve_in`]: moves the keys `found`
    /// names (from [`Mutation::look_up`] of this same mutation) to
    /// `add_resolved` and `remove_resolved`.
    pub fn take_resolved(&mut self, found: KeyIds) {
        fn split(keys: &mut Vec<String>, out: &mut Vec<(u32, String)>, ids: Vec<Option<u32>>) {
            if ids.len() != keys.len() {
                return;
            }
            let mut rest = Vec::new();
            for (key, id) in std::mem::take(keys).into_iter().zip(ids) {
                match id {
                    Some(id) => out.push((id, key)),
                    None => rest.push(key),
                }
            }
            *keys = rest;
        }
        self.resolved_at = if self.has_resolved() {
            self.resolved_at.map(|at| at.min(found.lsn))
        } else {
            Some(found.lsn)
        };
        split(&mut self.add, &mut self.add_resolved, found.add);
        split(&mut self.remove, &mut self.remove_resolved, found.remove);
    }
}

/// What [`Mutation::look_up`] found: an id (or none) per key of `add` and
/// of `remove`, in order.
#[derive(Debug, Default)]
pub struct KeyIds {
    pub add: Vec<Option<u32>>,
    pub remove: Vec<Option<u32>>,
    /// The lsn of the snapshot they were found in.
    pub lsn: u64,
}

/// A write, in domain terms.
#[derive(Debug, Clone)]
pub enum WriteOp {
    CreateTag {
        name: String,
        description: String,
        category: String,
        if_not_exists: bool,
    },
    DropTag {
        name: String,
    },
    Update {
        mutations: Vec<Mutation>,
        create_missing_tags: bool,
    },
    Replace {
        tag: String,
        customers: Vec<String>,
        create_missing_tag: bool,
    },
    DeleteCustomers {
        customers: Vec<String>,
    },
    /// The ids of `customers`, creating the customers no live one has
    /// (their ids in [`WriteResult::ids`], in order).
    CreateCustomers {
        customers: Vec<String>,
    },
    CreateField {
        name: String,
        description: String,
        category: String,
        kind: FieldKind,
        if_not_exists: bool,
    },
    DropField {
        name: String,
    },
    /// Field values and events, applied together or not at all.
    SetValues {
        writes: Vec<ValueWrite>,
    },
}

/// When a behaviour happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTime {
    /// An instant, Unix milliseconds; its local day comes from the field's time zone.
    Ms(i64),
    /// A local day number (days since 1970-01-01).
    Day(i32),
}

/// One value written by [`WriteOp::SetValues`].
#[derive(Debug, Clone)]
pub enum ValueWrite {
    /// Sets (or with `None`, clears) a customer's value of an integer field.
    Int {
        field: String,
        customer: String,
        value: Option<i64>,
    },
    /// Sets (or with `None`, clears) a customer's value of an enumerated
    /// field; setting one value leaves any other.
    Enum {
        field: String,
        customer: String,
        value: Option<String>,
    },
    /// Records a behaviour of a customer at a time.
    Event {
        field: String,
        customer: String,
        at: EventTime,
    },
}

/// What a write did.
#[derive(Debug, Clone, Default)]
pub struct WriteResult {
    /// The lsn the write was logged at (or the current one, when nothing changed).
    pub lsn: u64,
    pub added: u64,
    pub removed: u64,
    pub new_customers: u64,
    pub deleted: u64,
    /// Members of the tag after a replace, or when it was dropped.
    pub member_count: u64,
    /// The tag after a create.
    pub tag: Option<TagMeta>,
    /// False when a create found the tag or field already there.
    pub created: bool,
    /// The field after a field create.
    pub field: Option<FieldMeta>,
    pub values_set: u64,
    pub values_cleared: u64,
    /// Behaviour buckets newly gained (an event on a day the customer
    /// already has counts once).
    pub events_added: u64,
    /// Events older than their field's retention, not stored.
    pub events_expired: u64,
    /// Customer ids, one per key ([`WriteOp::CreateCustomers`]).
    pub ids: Vec<u32>,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

pub(crate) enum Cmd {
    Write(WriteOp, Reply<WriteResult>),
    Checkpoint(CheckpointOptions, Reply<CheckpointInfo>),
    CheckpointDone(Box<Result<CheckpointDone>>),
    Shutdown(std::sync::mpsc::Sender<Result<()>>),
}

enum Planned {
    Write(Batch, Target),
    Done(WriteResult),
}

/// What to report back after a planned write is applied.
enum Target {
    Plain,
    Created(String),
    Replaced(u32),
    FieldCreated(String),
    Values { expired: u64 },
    Ids(Vec<u32>),
}

struct Running {
    waiters: Vec<Reply<CheckpointInfo>>,
    /// First lsn of the log file opened when the checkpoint began: every log
    /// file before it is covered once the checkpoint is done.
    rotated_first: u64,
    dirty_tags: std::collections::HashSet<u32>,
    dirty_live: bool,
    dirty_slots: std::collections::HashSet<(u32, u32)>,
}

pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub state: State,
    pub wal: WalWriter,
    /// Bytes in log files older than the one being appended to.
    pub old_wal_bytes: u64,
    pub manifest: Manifest,
    pub segments: HashMap<u64, Arc<Segment>>,
    pub rx: Receiver<Cmd>,
    pub tx: Sender<Cmd>,
    pub dir: PathBuf,
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
    /// Syncs the log while a large write is applied (`None` if its thread
    /// could not be started: the writer then syncs everything itself).
    syncer: Option<Syncer>,
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
        rx: Receiver<Cmd>,
        tx: Sender<Cmd>,
    ) -> Self {
        let dir = shared.config.data_dir.clone();
        let state_lsn = state.snap.lsn;
        let syncer = Syncer::start()
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
            rx,
            tx,
            dir,
            running: None,
            queued: Vec::new(),
            merge_dictionary: false,
            failed: None,
            buf: Vec::new(),
            last_delete_lsn: state_lsn,
            syncer,
        }
    }

    pub fn run(mut self) {
        loop {
            let Ok(first) = self.rx.recv() else { return };
            let mut writes = Vec::new();
            let mut checkpoints = Vec::new();
            let mut shutdown = None;
            let mut next = Some(first);
            while let Some(cmd) = next {
                match cmd {
                    Cmd::Write(op, reply) => writes.push((op, reply)),
                    Cmd::Checkpoint(options, reply) => {
                        self.merge_dictionary |= options.merge_dictionary;
                        checkpoints.push(reply)
                    }
                    Cmd::CheckpointDone(res) => self.complete_checkpoint(*res),
                    Cmd::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                next = if writes.len() < MAX_GROUP {
                    self.rx.try_recv().ok()
                } else {
                    None
                };
            }
            if !writes.is_empty() {
                self.commit_group(writes);
            }
            if !checkpoints.is_empty() {
                self.request_checkpoint(checkpoints);
            }
            self.maybe_auto_checkpoint();
            if let Some(reply) = shutdown {
                let res = self.finish();
                let _ = reply.send(res);
                return;
            }
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
        if let Some(msg) = &self.failed {
            for (_, reply) in writes {
                let _ = reply.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        self.buf.clear();
        let mut replies = Vec::with_capacity(writes.len());
        let last = writes.len().saturating_sub(1);
        // The log's sync, when it runs while the group's last write is applied.
        let mut syncing = None;
        for (k, (op, reply)) in writes.into_iter().enumerate() {
            let planned = match self.plan(op) {
                Ok(p) => p,
                Err(e) => {
                    replies.push((reply, Err(e)));
                    continue;
                }
            };
            let (batch, target) = match planned {
                Planned::Done(r) => {
                    replies.push((reply, Ok(r)));
                    continue;
                }
                Planned::Write(b, t) => (b, t),
            };
            let lsn = self.state.snap.lsn + 1;
            let framed_from = self.buf.len();
            wal::frame(&mut self.buf, lsn, KIND_BATCH, &batch.encode());
            // Room in the log first: a full disk refuses this write before
            // it is applied, and the store stays writable.
            if let Err(e) = self.wal.reserve(self.buf.len() as u64) {
                self.buf.truncate(framed_from);
                if !matches!(e, Error::DiskFull(_)) {
                    self.fail(&e);
                    replies.push((reply, Err(e)));
                    break;
                }
                tracing::warn!(error = %e, "write refused");
                replies.push((reply, Err(e)));
                continue;
            }
            if !batch.deletes.is_empty() {
                self.last_delete_lsn = lsn;
            }
            // The group's records are complete: the disk can work while this
            // write is applied. Nothing is published or answered before the
            // sync is done, so no reader sees a write the log could lose.
            if k == last
                && self.shared.config.sync == SyncMode::Always
                && batch.membership_changes() >= SYNC_WHILE_APPLYING
                && let Some(syncer) = &self.syncer
            {
                if let Err(e) = self.wal.append(&self.buf) {
                    self.fail(&e);
                    replies.push((reply, Err(e)));
                    break;
                }
                self.buf.clear();
                syncing = Some(self.wal.start_sync(syncer));
            }
            match self.state.apply(lsn, &batch) {
                Ok(stats) => {
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
                    }
                    replies.push((reply, Ok(r)));
                }
                Err(e) => {
                    self.fail(&e);
                    replies.push((reply, Err(e)));
                    break;
                }
            }
        }
        if let Some(pending) = syncing
            && let Err(e) = pending.wait()
            && self.failed.is_none()
        {
            self.fail(&e);
        }
        if self.failed.is_none() && !self.buf.is_empty() {
            let res = self
                .wal
                .append(&self.buf)
                .and_then(|_| match self.shared.config.sync {
                    SyncMode::Always => self.wal.sync(),
                    SyncMode::Never => Ok(()),
                });
            if let Err(e) = res {
                self.fail(&e);
            }
        }
        if let Some(msg) = &self.failed {
            for (reply, _) in replies {
                let _ = reply.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        self.shared.publish(Arc::new(self.state.snap.clone()));
        self.shared.info.lock().wal_bytes = self.old_wal_bytes + self.wal.bytes();
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
        wal::frame(&mut self.buf, lsn, KIND_BATCH, &batch.encode());
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
        let res = self.state.apply(lsn, batch).and_then(|_| {
            self.wal.append(&self.buf)?;
            match self.shared.config.sync {
                SyncMode::Always => self.wal.sync(),
                SyncMode::Never => Ok(()),
            }
        });
        if let Err(e) = res {
            self.fail(&e);
            return Err(e);
        }
        self.shared.publish(Arc::new(self.state.snap.clone()));
        self.shared.info.lock().wal_bytes = self.old_wal_bytes + self.wal.bytes();
        Ok(())
    }

    /// Validates a write against the current state and turns it into a batch
    /// with every id assigned. Loads every bitmap the batch will touch, so
    /// that applying it cannot fail halfway.
    fn plan(&self, op: WriteOp) -> Result<Planned> {
        let snap = &self.state.snap;
        let at_ms = self.now_ms();
        let mut batch = Batch {
            at_ms,
            ..Default::default()
        };
        match op {
            WriteOp::CreateTag {
                name,
                description,
                category,
                if_not_exists,
            } => {
                check_tag_name(&name)?;
                check_meta(&description, &category)?;
                if let Some(t) = snap.tag(&name) {
                    if if_not_exists {
                        return Ok(Planned::Done(WriteResult {
                            lsn: snap.lsn,
                            tag: Some(t.meta.clone()),
                            created: false,
                            ..Default::default()
                        }));
                    }
                    return Err(Error::TagExists(name));
                }
                if snap.field(&name).is_some() {
                    return Err(Error::FieldExists(name));
                }
                batch.new_tags.push(NewTag {
                    id: snap.next_tag_id,
                    name: name.clone(),
                    description,
                    category,
                });
                Ok(Planned::Write(batch, Target::Created(name)))
            }
            WriteOp::DropTag { name } => {
                let tag = snap.tag(&name).ok_or(Error::TagNotFound(name))?;
                batch.drop_tags.push(tag.id);
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::Update {
                mutations,
                create_missing_tags,
            } => {
                if mutations.is_empty() {
                    return Err(Error::invalid("empty update: no mutations"));
                }
                if mutations.iter().all(Mutation::is_empty) {
                    return Err(Error::invalid(
                        "empty update: the mutations name no customers",
                    ));
                }
                let mut ids = IdAssigner::new(self)?;
                let mut new_tags: HashMap<String, u32> = HashMap::new();
                for m in &mutations {
                    let tag_id =
                        self.resolve_tag(&m.tag, create_missing_tags, &mut new_tags, &mut batch)?;
                    let mut add = ids.get_or_create_many(&m.add)?;
                    // Found live in a snapshot no older than the last
                    // deletion: still live.
                    let trusted = m.resolved_at.is_some_and(|at| at >= self.last_delete_lsn);
                    for (id, key) in &m.add_resolved {
                        let still_live = trusted || ids.live.contains(*id);
                        add.push(if still_live {
                            *id
                        } else {
                            ids.get_or_create(key)?
                        });
                    }
                    if let Some(&dead) = m.add_ids.iter().find(|&&id| !ids.live.contains(id)) {
                        return Err(Error::CustomerIdNotFound(dead));
                    }
                    add.extend_from_slice(&m.add_ids);
                    // Sorted, the bitmap is built by appending.
                    add.sort_unstable();
                    let add: RoaringBitmap = add.into_iter().collect();
                    let mut remove: Vec<u32> =
                        ids.get_many(&m.remove)?.into_iter().flatten().collect();
                    remove.extend(m.remove_ids.iter().filter(|&&id| ids.live.contains(id)));
                    for (id, key) in &m.remove_resolved {
                        if trusted || ids.live.contains(*id) {
                            remove.push(*id);
                        } else if let Some(id) = ids.get(key)? {
                            remove.push(id);
                        }
                    }
                    remove.sort_unstable();
                    let remove: RoaringBitmap = remove.into_iter().collect();
                    if !add.is_empty() {
                        batch.changes.push(Change {
                            tag: tag_id,
                            op: ChangeOp::Add,
                            ids: add,
                        });
                    }
                    if !remove.is_empty() {
                        batch.changes.push(Change {
                            tag: tag_id,
                            op: ChangeOp::Remove,
                            ids: remove,
                        });
                    }
                }
                batch.new_keys = ids.new_keys;
                if self.changes_nothing(&batch)? {
                    // Every customer already has what was asked: nothing to
                    // log or wait for. What the caller sees was made durable
                    // by the writes before it (each group is synced before
                    // the next begins, and its replies wait for that sync).
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    }));
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::Replace {
                tag,
                customers,
                create_missing_tag,
            } => {
                let mut ids = IdAssigner::new(self)?;
                let tag_id =
                    self.resolve_tag(&tag, create_missing_tag, &mut HashMap::new(), &mut batch)?;
                let members: RoaringBitmap =
                    ids.get_or_create_many(&customers)?.into_iter().collect();
                batch.changes.push(Change {
                    tag: tag_id,
                    op: ChangeOp::Replace,
                    ids: members,
                });
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Replaced(tag_id)))
            }
            WriteOp::DeleteCustomers { customers } => {
                if customers.is_empty() {
                    return Err(Error::invalid("empty delete: no customers named"));
                }
                let ids = IdAssigner::new(self)?;
                batch
                    .deletes
                    .extend(ids.get_many(&customers)?.into_iter().flatten());
                if batch.deletes.is_empty() {
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ..Default::default()
                    }));
                }
                for tag in snap.tags.values() {
                    tag.bitmap.get()?;
                }
                for field in snap.fields.values() {
                    for slot in field.slots.values() {
                        slot.get()?;
                    }
                }
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::CreateCustomers { customers } => {
                if customers.is_empty() {
                    return Err(Error::invalid("no customers named"));
                }
                let mut ids = IdAssigner::new(self)?;
                let found = ids.get_or_create_many(&customers)?;
                if ids.new_keys.is_empty() {
                    return Ok(Planned::Done(WriteResult {
                        lsn: snap.lsn,
                        ids: found,
                        ..Default::default()
                    }));
                }
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Ids(found)))
            }
            WriteOp::CreateField {
                name,
                description,
                category,
                kind,
                if_not_exists,
            } => {
                check_tag_name(&name)?;
                check_meta(&description, &category)?;
                kind.validate()?;
                if let Some(f) = snap.field(&name) {
                    if if_not_exists && f.meta.kind == kind {
                        return Ok(Planned::Done(WriteResult {
                            lsn: snap.lsn,
                            field: Some(f.meta.clone()),
                            created: false,
                            ..Default::default()
                        }));
                    }
                    return Err(Error::FieldExists(name));
                }
                if snap.tag(&name).is_some() {
                    return Err(Error::TagExists(name));
                }
                batch.new_fields.push(NewField {
                    id: snap.next_tag_id,
                    name: name.clone(),
                    description,
                    category,
                    kind,
                });
                Ok(Planned::Write(batch, Target::FieldCreated(name)))
            }
            WriteOp::DropField { name } => {
                let field = snap.field(&name).ok_or(Error::FieldNotFound(name))?;
                batch.drop_fields.push(field.id);
                Ok(Planned::Write(batch, Target::Plain))
            }
            WriteOp::SetValues { writes } => {
                if writes.is_empty() {
                    return Err(Error::invalid("empty write: no values or events"));
                }
                let mut ids = IdAssigner::new(self)?;
                let expired = plan_values(snap, &writes, &mut ids, at_ms, &mut batch)?;
                batch.new_keys = ids.new_keys;
                Ok(Planned::Write(batch, Target::Values { expired }))
            }
        }
    }

    /// The id of an existing tag (loading its bitmap), or of one this batch creates.
    /// True when applying the membership changes of `batch` would leave the
    /// state as it is: no new customer or tag, every id added already a
    /// member and every id removed already not one. Each change is checked
    /// against the state before the batch; if none changes that state, none
    /// changes the state the earlier ones leave. It stops at the first id
    /// that would change something.
    fn changes_nothing(&self, batch: &Batch) -> Result<bool> {
        let only_changes = batch.new_tags.is_empty()
            && batch.new_keys.is_empty()
            && batch.deletes.is_empty()
            && batch.drop_tags.is_empty()
            && batch.new_fields.is_empty()
            && batch.field_changes.is_empty()
            && batch.drop_fields.is_empty();
        if !only_changes {
            return Ok(false);
        }
        // A few ids of every change first: a batch that changes something
        // usually shows it there, without a look-up of every id.
        for sample in [Some(SAMPLE_IDS), None] {
            for change in &batch.changes {
                let Some(tag) = self.state.tag_by_id(change.tag) else {
                    return Ok(false);
                };
                let members = tag.bitmap.get()?;
                let mut ids = change.ids.iter().take(sample.unwrap_or(usize::MAX));
                let unchanged = match change.op {
                    ChangeOp::Add => ids.all(|id| members.contains(id)),
                    ChangeOp::Remove => !ids.any(|id| members.contains(id)),
                    _ => false,
                };
                if !unchanged {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn resolve_tag(
        &self,
        name: &str,
        create: bool,
        new_tags: &mut HashMap<String, u32>,
        batch: &mut Batch,
    ) -> Result<u32> {
        check_tag_name(name)?;
        if let Some(t) = self.state.snap.tag(name) {
            t.bitmap.get()?;
            return Ok(t.id);
        }
        if let Some(&id) = new_tags.get(name) {
            return Ok(id);
        }
        if self.state.snap.field(name).is_some() {
            return Err(Error::invalid(format!(
                "{name:?} is a field, not a tag: set its values with SetValues"
            )));
        }
        if !create {
            return Err(Error::TagNotFound(name.to_string()));
        }
        let id = self.state.snap.next_tag_id + new_tags.len() as u32;
        new_tags.insert(name.to_string(), id);
        batch.new_tags.push(NewTag {
            id,
            name: name.to_string(),
            description: String::new(),
            category: String::new(),
        });
        Ok(id)
    }

    fn maybe_auto_checkpoint(&mut self) {
        let wal_bytes = self.old_wal_bytes + self.wal.bytes();
        if self.failed.is_none()
            && self.running.is_none()
            && wal_bytes >= self.shared.config.checkpoint_wal_bytes
        {
            tracing::info!(wal_bytes, "log passed its size limit; checkpointing");
            self.request_checkpoint(Vec::new());
        }
    }

    fn request_checkpoint(&mut self, waiters: Vec<Reply<CheckpointInfo>>) {
        if self.running.is_some() {
            // The running one may have begun before these were asked for.
            self.queued.extend(waiters);
            return;
        }
        if let Some(msg) = &self.failed {
            for w in waiters {
                let _ = w.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        match maintenance(&self.state.snap, self.now_ms()) {
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => {
                if let Err(e) = self.commit_internal(&batch) {
                    tracing::error!(error = %e, "could not log the retention and roll-up changes");
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention and roll-up skipped"),
        }
        if let Some(msg) = &self.failed {
            for w in waiters {
                let _ = w.send(Err(Error::Failed(msg.clone())));
            }
            return;
        }
        let lsn = self.state.snap.lsn;
        // A merge request on a clean store still runs: its one section may
        // hold keys of customers deleted since (the job decides what to merge).
        let merge_dictionary = self.merge_dictionary && !self.manifest.dict_segments.is_empty();
        if lsn == self.manifest.checkpoint_lsn
            && !merge_dictionary
            && self.state.dirty_tags.is_empty()
            && self.state.dirty_slots.is_empty()
            && !self.state.dirty_live
        {
            // Nothing to write, and at most one dictionary section.
            self.merge_dictionary = false;
            for w in waiters {
                let _ = w.send(Ok(CheckpointInfo {
                    lsn,
                    ..Default::default()
                }));
            }
            return;
        }
        if self.wal.first_lsn() <= lsn {
            match WalWriter::create(&self.dir, lsn + 1) {
                Ok(new) => {
                    let old = std::mem::replace(&mut self.wal, new);
                    self.old_wal_bytes += old.bytes();
                    if let Err(e) = old.seal() {
                        // Harmless: replay reads preallocated zeros as the end of a file.
                        tracing::warn!(error = %e, "could not trim a finished log file");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start a new log file for a checkpoint");
                    let msg = e.to_string();
                    for w in waiters {
                        let _ = w.send(Err(Error::Checkpoint(msg.clone())));
                    }
                    return;
                }
            }
        }
        let dirty_tags = std::mem::take(&mut self.state.dirty_tags);
        let dirty_live = std::mem::take(&mut self.state.dirty_live);
        let dirty_slots = std::mem::take(&mut self.state.dirty_slots);
        let job = CheckpointJob {
            dir: self.dir.clone(),
            snap: self.shared.snapshot(),
            dirty_tags: dirty_tags.clone(),
            dirty_live,
            dirty_slots: dirty_slots.clone(),
            prev: self.manifest.clone(),
            segments: self.segments.clone(),
            dict: self.state.snap.dict.clone(),
            policy: self.shared.config.compaction,
            merge_dictionary: self.merge_dictionary,
            now_ms: self.now_ms(),
        };
        debug_assert_eq!(job.snap.lsn, lsn);
        self.merge_dictionary = false;
        self.running = Some(Running {
            waiters,
            rotated_first: self.wal.first_lsn(),
            dirty_tags,
            dirty_live,
            dirty_slots,
        });
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("tagstore-checkpoint".into())
            .spawn(move || {
                let res = job.run();
                let _ = tx.send(Cmd::CheckpointDone(Box::new(res)));
            });
        if let Err(e) = spawned {
            let res = Err(Error::Checkpoint(format!(
                "could not start the checkpoint thread: {e}"
            )));
            self.complete_checkpoint(res);
        }
    }

    fn complete_checkpoint(&mut self, res: Result<CheckpointDone>) {
        let Some(running) = self.running.take() else {
            return;
        };
        match res {
            Ok(done) => {
                let info = done.info;
                self.install(done, running.rotated_first);
                tracing::info!(
                    lsn = info.lsn,
                    tags = info.tags_written,
                    bytes = info.segment_bytes,
                    ms = info.duration_ms,
                    "checkpoint done"
                );
                for w in running.waiters {
                    let _ = w.send(Ok(info));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "checkpoint failed; the log keeps every write");
                self.state.dirty_tags.extend(running.dirty_tags);
                self.state.dirty_live |= running.dirty_live;
                self.state.dirty_slots.extend(running.dirty_slots);
                // The failed job may have left a file under this number:
                // partial, or complete and already named by a new MANIFEST
                // (when what failed came after the rename, such as the
                // directory's fsync). Only the first may go; the second is
                // what a restart would read.
                let no = self.manifest.next_segment_no.max(1);
                let path = self.dir.join(crate::storage::segment::file_name(no));
                match Manifest::read(&self.dir) {
                    Ok(on_disk)
                        if !on_disk.as_ref().is_some_and(|m| m.segments().contains(&no)) =>
                    {
                        let _ = std::fs::remove_file(&path);
                    }
                    Ok(_) => tracing::warn!(
                        path = %path.display(),
                        "the failed checkpoint's manifest reached the disk: its segment is kept"
                    ),
                    Err(read) => tracing::warn!(
                        path = %path.display(),
                        error = %read,
                        "cannot tell whether the failed checkpoint's manifest reached the disk: its segment is kept"
                    ),
                }
                self.manifest.next_segment_no = no + 1;
                let msg = e.to_string();
                for w in running.waiters {
                    let _ = w.send(Err(Error::Checkpoint(msg.clone())));
                }
            }
        }
        if !self.queued.is_empty() {
            let waiters = std::mem::take(&mut self.queued);
            self.request_checkpoint(waiters);
        }
    }

    /// Makes a finished checkpoint current: point not-yet-loaded bitmaps at
    /// their new homes, swap the dictionary sections, and delete the log files
    /// and segments nothing needs any more.
    fn install(&mut self, done: CheckpointDone, rotated_first: u64) {
        if let Some(seg) = &done.new_segment {
            self.segments.insert(seg.no, seg.clone());
        }
        let homes: HashMap<u32, u64> = done
            .manifest
            .tags
            .iter()
            .map(|t| (t.id, t.segment))
            .collect();
        // Tags still on disk whose bitmap the checkpoint moved to another
        // segment (a merge) now read it from there.
        let moved_tags: Vec<(Arc<str>, u32, Arc<Segment>)> = self
            .state
            .snap
            .tags
            .values()
            .filter(|t| !t.bitmap.is_loaded())
            .filter_map(|t| {
                let home = homes.get(&t.id)?;
                (t.bitmap.segment().map(|s| s.no) != Some(*home))
                    .then(|| self.segments.get(home))?
                    .map(|seg| (t.meta.name.clone(), t.id, seg.clone()))
            })
            .collect();
        for (name, id, seg) in moved_tags {
            if let Some(tag) = self.state.snap.tags.get_mut(&name) {
                Arc::make_mut(tag).bitmap = LazyBitmap::on_disk(seg, BlobKind::TagShard, id);
            }
        }
        let slot_homes: HashMap<(u32, u32), u64> = done
            .manifest
            .fields
            .iter()
            .flat_map(|f| f.slots.iter().map(move |&(slot, seg)| ((f.id, slot), seg)))
            .collect();
        type MovedSlots = Vec<(u32, Arc<Segment>)>;
        let moved_slots: Vec<(Arc<str>, u32, MovedSlots)> = self
            .state
            .snap
            .fields
            .values()
            .filter_map(|field| {
                let id = field.id;
                let moved: Vec<(u32, Arc<Segment>)> = field
                    .slots
                    .iter()
                    .filter(|(_, b)| !b.is_loaded())
                    .filter_map(|(&slot, b)| {
                        let home = slot_homes.get(&(id, slot))?;
                        (b.segment().map(|s| s.no) != Some(*home))
                            .then(|| self.segments.get(home).map(|s| (slot, s.clone())))?
                    })
                    .collect();
                (!moved.is_empty()).then(|| (field.meta.name.clone(), id, moved))
            })
            .collect();
        for (name, id, moved) in moved_slots {
            if let Some(field) = self.state.snap.fields.get_mut(&name) {
                let f = Arc::make_mut(field);
                for (slot, seg) in moved {
                    f.slots.insert(
                        slot,
                        LazyBitmap::on_disk_slot(seg, BlobKind::FieldSlot, id, slot),
                    );
                }
            }
        }
        if !self.state.snap.live.is_loaded()
            && let Some(seg) = self.segments.get(&done.manifest.live_segment)
            && self.state.snap.live.segment().map(|s| s.no) != Some(seg.no)
        {
            self.state.snap.live = LazyBitmap::on_disk(seg.clone(), BlobKind::LiveShard, 0);
        }
        self.state.snap.dict = Arc::new(
            self.state
                .snap
                .dict
                .successor(done.dict_layers, done.dict_upto),
        );
        self.manifest = done.manifest;

        // Log files wholly covered by the checkpoint.
        match wal::list(&self.dir) {
            Ok(files) => {
                for f in files.iter().filter(|f| f.first_lsn < rotated_first) {
                    if let Err(e) = std::fs::remove_file(&f.path) {
                        tracing::warn!(path = %f.path.display(), error = %e, "could not delete a covered log file");
                    }
                }
                self.old_wal_bytes = files
                    .iter()
                    .filter(|f| f.first_lsn >= rotated_first && f.first_lsn != self.wal.first_lsn())
                    .filter_map(|f| std::fs::metadata(&f.path).ok())
                    .map(|m| m.len())
                    .sum();
            }
            Err(e) => tracing::warn!(error = %e, "could not list log files"),
        }
        // Segments no longer referenced (readers holding old snapshots keep
        // their maps; the files' space is freed when the last map goes).
        let live: std::collections::HashSet<u64> = self.manifest.segments().into_iter().collect();
        let dead: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|no| !live.contains(no))
            .collect();
        for no in dead {
            if let Some(seg) = self.segments.remove(&no)
                && let Err(e) = std::fs::remove_file(&seg.path)
            {
                tracing::warn!(path = %seg.path.display(), error = %e, "could not delete an unused segment");
            }
        }
        if let Err(e) = fsync_dir(&self.dir) {
            tracing::warn!(error = %e, "could not sync the data directory");
        }
        // Readers move to the new dictionary and homes; the old ones (and the
        // recent keys now in a section) are freed with the last old snapshot.
        self.shared.publish(Arc::new(self.state.snap.clone()));
        release_free_memory();
        let mut info = self.shared.info.lock();
        info.last_checkpoint_lsn = self.manifest.checkpoint_lsn;
        info.last_checkpoint_at_ms = self.manifest.checkpoint_at_ms;
        info.segment_files = self.segments.len() as u64;
        info.dictionary_sections = self.manifest.dict_segments.len() as u64;
        info.wal_bytes = self.old_wal_bytes + self.wal.bytes();
    }

    /// Clean shutdown: wait for a running checkpoint, then write a final one.
    fn finish(&mut self) -> Result<()> {
        let started = Instant::now();
        self.wait_for_checkpoint();
        if self.failed.is_some() {
            return Ok(());
        }
        let (tx, mut rx) = oneshot::channel();
        self.request_checkpoint(vec![tx]);
        self.wait_for_checkpoint();
        let res = rx
            .try_recv()
            .map_err(|_| Error::Checkpoint("the final checkpoint did not report".into()))?;
        res?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "final checkpoint written"
        );
        Ok(())
    }

    fn wait_for_checkpoint(&mut self) {
        while self.running.is_some() {
            match self.rx.recv() {
                Ok(Cmd::CheckpointDone(res)) => self.complete_checkpoint(*res),
                Ok(Cmd::Write(_, reply)) => {
                    let _ = reply.send(Err(Error::ShuttingDown));
                }
                Ok(Cmd::Checkpoint(options, reply)) => {
                    self.merge_dictionary |= options.merge_dictionary;
                    self.queued.push(reply)
                }
                Ok(Cmd::Shutdown(reply)) => {
                    let _ = reply.send(Ok(()));
                }
                Err(_) => return,
            }
        }
    }
}

fn check_meta(description: &str, category: &str) -> Result<()> {
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(Error::invalid(format!(
            "description is longer than {MAX_DESCRIPTION_BYTES} bytes"
        )));
    }
    if category.len() > MAX_CATEGORY_BYTES || category.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "category must be at most {MAX_CATEGORY_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// What one request writes to one field, before it becomes a [`FieldChange`].
enum Pending {
    Int(BTreeMap<u32, Option<i64>>),
    Enum(BTreeMap<u32, Option<u32>>),
    Events(BTreeMap<u32, RoaringBitmap>),
}

/// Turns value writes into field changes (last write wins per customer and
/// field); returns how many events were past retention. Loads every slot
/// the changes will touch, so applying them cannot fail halfway.
fn plan_values<'k>(
    snap: &crate::storage::Snapshot,
    writes: &'k [ValueWrite],
    ids: &mut IdAssigner<'_, 'k>,
    now_ms: i64,
    batch: &mut Batch,
) -> Result<u64> {
    let mut pending: BTreeMap<u32, Pending> = BTreeMap::new();
    let mut todays: HashMap<u32, (jiff::tz::TimeZone, i32)> = HashMap::new();
    let mut expired = 0;
    for w in writes {
        let (name, customer) = match w {
            ValueWrite::Int {
                field, customer, ..
            }
            | ValueWrite::Enum {
                field, customer, ..
            }
            | ValueWrite::Event {
                field, customer, ..
            } => (field, customer),
        };
        let field = snap
            .field(name)
            .ok_or_else(|| Error::FieldNotFound(name.clone()))?;
        let wrong = |want: &str| {
            Error::invalid(format!(
                "field {name:?} is {} ({} expected for this write)",
                field.meta.kind.name(),
                want
            ))
        };
        match (w, &field.meta.kind) {
            (ValueWrite::Int { value, .. }, FieldKind::Int) => {
                let id = match value {
                    Some(_) => Some(ids.get_or_create(customer)?),
                    None => ids.get(customer)?,
                };
                if let Some(id) = id {
                    let Pending::Int(m) = pending
                        .entry(field.id)
                        .or_insert_with(|| Pending::Int(BTreeMap::new()))
                    else {
                        return Err(wrong("integer"));
                    };
                    m.insert(id, *value);
                }
            }
            (ValueWrite::Enum { value, .. }, FieldKind::Enum { values }) => {
                let slot = match value {
                    Some(v) => Some(values.iter().position(|x| x == v).ok_or_else(|| {
                        Error::invalid(format!(
                            "{v:?} is not a value of {name:?} (its values: {})",
                            values.join(", ")
                        ))
                    })? as u32),
                    None => None,
                };
                let id = match slot {
                    Some(_) => Some(ids.get_or_create(customer)?),
                    None => ids.get(customer)?,
                };
                if let Some(id) = id {
                    let Pending::Enum(m) = pending
                        .entry(field.id)
                        .or_insert_with(|| Pending::Enum(BTreeMap::new()))
                    else {
                        return Err(wrong("enumerated"));
                    };
                    m.insert(id, slot);
                }
            }
            (ValueWrite::Event { at, .. }, FieldKind::Events(spec)) => {
                let (tz, today) = match todays.entry(field.id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let tz = time::zone(&spec.time_zone)?;
                        let today = time::day_of(now_ms, &tz)?;
                        e.insert((tz, today))
                    }
                };
                let (tz, today) = (&*tz, &*today);
                let (day, ahead) = match *at {
                    EventTime::Ms(ms) => (
                        time::day_of(ms, tz)?,
                        ms > now_ms.saturating_add(MAX_AHEAD_MS),
                    ),
                    EventTime::Day(d) => (d, d > today + 1),
                };
                if ahead {
                    return Err(Error::invalid(format!(
                        "event on {} is more than a day ahead of today ({} in {}): \
                         events from the future are refused",
                        time::format_day(day),
                        time::format_day(*today),
                        spec.time_zone
                    )));
                }
                if !(0..=time::MAX_DAY).contains(&day) {
                    return Err(Error::invalid(format!(
                        "event day {} is outside 1970-01-01 ..= {}",
                        time::format_day(day),
                        time::format_day(time::MAX_DAY)
                    )));
                }
                let Some(bucket) = spec.bucket_for(day, *today) else {
                    expired += 1;
                    continue;
                };
                let id = ids.get_or_create(customer)?;
                let Pending::Events(m) = pending
                    .entry(field.id)
                    .or_insert_with(|| Pending::Events(BTreeMap::new()))
                else {
                    return Err(wrong("behaviour"));
                };
                m.entry(bucket.slot()).or_default().insert(id);
            }
            (ValueWrite::Int { .. }, _) => return Err(wrong("integer")),
            (ValueWrite::Enum { .. }, _) => return Err(wrong("enumerated")),
            (ValueWrite::Event { .. }, _) => return Err(wrong("behaviour")),
        }
    }
    let by_id: HashMap<u32, &Arc<Field>> = snap.fields.values().map(|f| (f.id, f)).collect();
    for (field_id, p) in pending {
        let field = by_id
            .get(&field_id)
            .ok_or_else(|| Error::FieldNotFound(field_id.to_string()))?;
        let change = match p {
            Pending::Int(m) => {
                for slot in field.slots.values() {
                    slot.get()?;
                }
                let mut set = Vec::new();
                let mut clear = RoaringBitmap::new();
                for (id, v) in m {
                    match v {
                        Some(v) => set.push((id, v)),
                        None => {
                            clear.insert(id);
                        }
                    }
                }
                FieldChange::Int {
                    field: field_id,
                    set,
                    clear,
                }
            }
            Pending::Enum(m) => {
                for slot in field.slots.values() {
                    slot.get()?;
                }
                let mut set: BTreeMap<u32, RoaringBitmap> = BTreeMap::new();
                let mut clear = RoaringBitmap::new();
                for (id, v) in m {
                    match v {
                        Some(slot) => {
                            set.entry(slot).or_default().insert(id);
                        }
                        None => {
                            clear.insert(id);
                        }
                    }
                }
                FieldChange::Enum {
                    field: field_id,
                    set: set.into_iter().collect(),
                    clear,
                }
            }
            Pending::Events(m) => {
                for slot in m.keys() {
                    if let Some(b) = field.slots.get(slot) {
                        b.get()?;
                    }
                }
                FieldChange::Events {
                    field: field_id,
                    add: m.into_iter().collect(),
                }
            }
        };
        batch.field_changes.push(change);
    }
    Ok(expired)
}

/// The retention and roll-up changes due today for every behaviour field,
/// as one batch (empty when nothing is due). Loads the day buckets a
/// roll-up merges.
fn maintenance(snap: &crate::storage::Snapshot, now_ms: i64) -> Result<Batch> {
    let mut batch = Batch {
        at_ms: now_ms,
        ..Default::default()
    };
    for field in snap.fields.values() {
        let FieldKind::Events(spec) = &field.meta.kind else {
            continue;
        };
        let tz = time::zone(&spec.time_zone)?;
        let today = time::day_of(now_ms, &tz)?;
        let keep_from = spec.retention_start(today);
        let mut drop = Vec::new();
        let mut months = std::collections::BTreeSet::new();
        for (&slot, bitmap) in &field.slots {
            let bucket = Bucket::of_slot(slot);
            if bucket.last_day() < keep_from {
                drop.push(slot);
            } else if let Bucket::Day(d) = bucket {
                let m = time::month_of(d);
                if spec.month_rolled(m, today) {
                    bitmap.get()?;
                    months.insert(m);
                }
            }
        }
        if !drop.is_empty() {
            batch.field_changes.push(FieldChange::DropSlots {
                field: field.id,
                slots: drop,
            });
        }
        for month in months {
            batch.field_changes.push(FieldChange::Rollup {
                field: field.id,
                month,
            });
        }
    }
    Ok(batch)
}

/// Hands the heap pages a write burst freed (the dictionary's recent keys,
/// copied shards, request buffers) back to the kernel. The allocator is
/// mimalloc, for Rust and C code alike (its `override` feature: linking this
/// crate makes it the process's `malloc`), and each thread's heap keeps
/// freed pages for reuse; most of a burst's memory belongs to the writer
/// thread's heap, so this runs there, after each checkpoint, when the recent
/// keys have just been dropped. After a bulk load of 3M customers it took
/// 5–9 ms and left the heap at 55 MiB instead of 143.
fn release_free_memory() {
    let started = Instant::now();
    // SAFETY: mi_collect takes no pointers; it only releases free memory of
    // the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
    let us = started.elapsed().as_micros() as u64;
    tracing::debug!(us, "free heap pages released");
}

/// Looks up customer keys for one request, giving new ids to new keys.
struct IdAssigner<'a, 'k> {
    writer: &'a Writer,
    live: crate::bitmap::Members<'a>,
    fresh: HashMap<&'k str, u32>,
    new_keys: Vec<(u32, String)>,
    next: u32,
}

impl<'a, 'k> IdAssigner<'a, 'k> {
    fn new(writer: &'a Writer) -> Result<Self> {
        Ok(Self {
            writer,
            live: writer.state.snap.live()?.members(),
            fresh: HashMap::new(),
            new_keys: Vec::new(),
            next: writer.state.snap.next_customer_id,
        })
    }

    /// The id of a live customer, if the key names one.
    fn get(&self, key: &str) -> Result<Option<u32>> {
        check_key(key)?;
        if let Some(&id) = self.fresh.get(key) {
            return Ok(Some(id));
        }
        Ok(self
            .writer
            .state
            .snap
            .dict
            .lookup(key)?
            .filter(|&id| self.live.contains(id)))
    }

    /// [`IdAssigner::get`] of many keys, with the dictionary look-ups
    /// overlapped: the ids of live customers, in order.
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<u32>>> {
        let mut refs = Vec::with_capacity(keys.len());
        for key in keys {
            check_key(key)?;
            refs.push(key.as_str());
        }
        let mut ids = self.writer.state.snap.dict.lookup_many(&refs)?;
        for (id, key) in ids.iter_mut().zip(keys) {
            if let Some(&fresh) = self.fresh.get(key.as_str()) {
                *id = Some(fresh);
            } else if id.is_some_and(|id| !self.live.contains(id)) {
                *id = None;
            }
        }
        Ok(ids)
    }

    /// The ids of `keys`, new ids for keys no live customer has.
    fn get_or_create_many(&mut self, keys: &'k [String]) -> Result<Vec<u32>> {
        let found = self.get_many(keys)?;
        keys.iter()
            .zip(found)
            .map(|(key, id)| match id {
                Some(id) => Ok(id),
                // A key named twice in one request is new only the first time.
                None => match self.fresh.get(key.as_str()) {
                    Some(&id) => Ok(id),
                    None => self.create(key),
                },
            })
            .collect()
    }

    fn get_or_create(&mut self, key: &'k str) -> Result<u32> {
        if let Some(id) = self.get(key)? {
            return Ok(id);
        }
        self.create(key)
    }

    /// A new id for `key`, which no live customer has.
    fn create(&mut self, key: &'k str) -> Result<u32> {
        let id = self.next;
        self.next = self
            .next
            .checked_add(1)
            .ok_or_else(|| Error::invalid("the store has used every customer id (2^32)"))?;
        self.fresh.insert(key, id);
        self.new_keys.push((id, key.to_string()));
        Ok(id)
    }
}
