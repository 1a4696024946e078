//! `Watch`: the change feed as a server stream. A task per watcher reads
//! the feed from its position on the watchers' thread ([`Workers`]), a
//! bounded piece at a time, keeps the changes of what it watches, names
//! each customer from the newest snapshot (the compact form instead takes
//! each subject's ids as a bitmap built once for all its watchers:
//! [`Pieces`]), and hands messages to the transport through a
//! channel of [`BUFFERED`] messages: a client that does not read stops its
//! own task there (no thread held, no more read), never a writer. Caught
//! up, the task waits for the feed's end to move, for the client to go, or
//! for the server to close; it says where it is (a progress message) at
//! most once a [`PROGRESS_EVERY`] while writes it does not watch go by.
//!
//! Owns no state beyond its watchers and the recent pieces; what the feed
//! holds and how it is read is `storage::feed`'s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::bitmap::Bitmap;
use crate::error::Error;
use crate::fields::FieldKind;
use crate::proto;
use crate::proto::membership_change::Kind;
use crate::server::budget::ExportSlot;
use crate::server::service::{Service, invalid};
use crate::server::status::to_status;
use crate::storage::Engine;
use crate::storage::feed::{Entry, FeedReader, ReadError, Subject};

pub type WatchStream = ReceiverStream<Result<proto::WatchResponse, Status>>;

/// Most tags and values one call watches.
pub const MAX_SUBJECTS: usize = 1_000;
/// Changes per message unless the client asks otherwise, and at most.
const DEFAULT_MAX_CHANGES: usize = 1_000;
const MAX_CHANGES: usize = 10_000;
/// Messages waiting for a client that does not read.
const BUFFERED: usize = 4;
/// Bytes of feed read in one trip to the blocking pool (at least one
/// write's record).
const READ_BYTES: usize = 1 << 20;
/// Changes turned into messages in one trip.
const CHANGES_PER_TRIP: usize = 16_384;
/// A watcher that has caught up says where it is at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A watcher that has caught up reads the feed again at most this often:
/// a write after a quiet spell goes out at once, writes that follow within
/// this gap go out together (one trip, one send to the client's socket).
/// 10 ms rather than 5: 100 watchers of busy tags cost the writers about
/// half as many trips and socket writes (the harness's `watch`: writes
/// with ÷ without 0.81–0.85× against 0.77–0.83×), for a light-load lag of
/// p50 5–6 ms, p99 12–13 ms instead of 3 and 7–11 ms.
const TRIP_GAP: Duration = Duration::from_millis(10);

/// What one call watches: tags, single values, fields every value of
/// which it watches, and saved audiences (kept current by a rule tag of
/// their name, whose changes the feed holds as a tag's).
#[derive(Debug, Default)]
struct Watched {
    tags: HashSet<String>,
    values: HashSet<(String, String)>,
    fields: HashSet<String>,
    audiences: HashSet<String>,
}

impl Watched {
    /// An empty group of a compact message for subject `s`.
    fn group(&self, s: &Subject) -> proto::ChangeGroup {
        match s {
            Subject::Tag(t) if self.audiences.contains(t) => proto::ChangeGroup {
                audience: t.clone(),
                ..Default::default()
            },
            Subject::Tag(t) => proto::ChangeGroup {
                tag: t.clone(),
                ..Default::default()
            },
            Subject::Value { field, value } => proto::ChangeGroup {
                field: field.clone(),
                value: value.clone(),
                ..Default::default()
            },
        }
    }

    fn wants(&self, s: &Subject) -> bool {
        match s {
            Subject::Tag(t) => self.tags.contains(t) || self.audiences.contains(t),
            Subject::Value { field, value } => {
                self.fields.contains(field) || self.values.contains(&(field.clone(), value.clone()))
            }
        }
    }
}

/// A write with changes this watcher watches, not yet wholly sent. Its
/// changes are gathered a window of [`WINDOW_IDS`] customer ids at a time,
/// in id order, so that a write that changed millions of memberships holds
/// at most one window's changes per watcher, not all of them.
struct Pending {
    entry: Arc<Entry>,
    /// The positions in `entry.changes` of the changes watched.
    watched: Vec<usize>,
    /// The dropped subjects were gathered (they come first).
    dropped_done: bool,
    /// The first customer id not gathered yet (past `u32::MAX`: none left).
    next_id: u64,
    /// The window gathered: (customer id, index into `watched`, kind), by
    /// customer then subject; and how many of them are sent.
    window: Vec<(u32, u32, Kind)>,
    sent: usize,
    /// In a compact watch, where the next message begins: the position in
    /// `watched`, the list (0: entered, 1: left) and the piece of it.
    compact_at: (usize, u8, u32),
}

impl Pending {
    /// The next message's groups of a compact watch: subject by subject in
    /// the feed's order, entered then left, each list in pieces of `max`
    /// ids taken from the shared [`Pieces`]; as many whole pieces as fit in
    /// `max` ids (at least one). Returns them, how many ids they hold, and
    /// whether the write is now wholly sent.
    fn fill_compact(
        &mut self,
        max: usize,
        watched: &Watched,
    ) -> (Vec<proto::ChangeGroup>, usize, bool) {
        let size = max.clamp(1, MAX_CHANGES) as u64;
        let mut groups: Vec<proto::ChangeGroup> = Vec::new();
        // The change the last group is of.
        let mut last_k = usize::MAX;
        let mut taken = 0usize;
        PIECES.with_borrow_mut(|pieces| {
            while self.compact_at.0 < self.watched.len() {
                let (k, list, chunk) = self.compact_at;
                let c = &self.entry.changes[self.watched[k]];
                if c.dropped {
                    let mut g = watched.group(c.subject());
                    g.dropped = true;
                    groups.push(g);
                    last_k = usize::MAX;
                    self.compact_at = (k + 1, 0, 0);
                    continue;
                }
                let b = if list == 0 { &c.entered } else { &c.left };
                let card = b.cardinality();
                let from = u64::from(chunk) * size;
                if from >= card {
                    self.compact_at = if list == 0 { (k, 1, 0) } else { (k + 1, 0, 0) };
                    continue;
                }
                let n = (card - from).min(size) as usize;
                if taken > 0 && taken + n > max {
                    break;
                }
                let key = PieceKey {
                    lsn: self.entry.lsn,
                    at_ms: self.entry.at_ms,
                    change: self.watched[k] as u32,
                    list,
                    chunk,
                    size: size as u32,
                };
                let piece = pieces.get(key, || piece_of(b, from, size));
                taken += n;
                // One group per subject and message: the left ids join the
                // group of the entered ones.
                let joined = match groups.last_mut() {
                    Some(g) if list == 1 && last_k == k && g.left_count == 0 => {
                        g.left_bitmap = piece.clone();
                        g.left_count = n as u32;
                        true
                    }
                    _ => false,
                };
                if !joined {
                    let mut g = watched.group(c.subject());
                    if list == 0 {
                        g.entered_bitmap = piece;
                        g.entered_count = n as u32;
                    } else {
                        g.left_bitmap = piece;
                        g.left_count = n as u32;
                    }
                    groups.push(g);
                    last_k = k;
                }
                self.compact_at = (k, list, chunk + 1);
            }
        });
        let complete = self.compact_at.0 >= self.watched.len();
        (groups, taken, complete)
    }
}

/// Ids `from` to `from + size` (by rank) of `b`, as a portable Roaring
/// bitmap.
fn piece_of(b: &Bitmap, from: u64, size: u64) -> bytes::Bytes {
    if from == 0 && b.cardinality() <= size {
        return b.serialize::<croaring::Portable>().into();
    }
    let Some(first) = u32::try_from(from).ok().and_then(|r| b.select(r)) else {
        return bytes::Bytes::new();
    };
    let mut it = b.iter();
    it.reset_at_or_after(first);
    let ids: Vec<u32> = it.take(size as usize).collect();
    let mut piece = Bitmap::of(&ids);
    piece.run_optimize();
    piece.serialize::<croaring::Portable>().into()
}

/// One piece of a compact watch: one write's entered or left ids of one
/// subject, the `chunk`th run of `size` of them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PieceKey {
    lsn: u64,
    at_ms: i64,
    change: u32,
    list: u8,
    chunk: u32,
    size: u32,
}

/// The pieces the watchers' thread built lately, each built once and sent
/// (shared, not copied) to every compact watcher of its subject that asks
/// pieces of the same size: watchers of the same things at the same place
/// cost one piece, not one each. At most [`PIECES_BYTES`] and
/// [`PIECES_MAX`] pieces, the oldest built going first.
#[derive(Default)]
struct Pieces {
    map: HashMap<PieceKey, bytes::Bytes>,
    order: VecDeque<PieceKey>,
    bytes: usize,
}

const PIECES_BYTES: usize = 64 << 20;
const PIECES_MAX: usize = 1 << 16;

/// Pieces built and sent since the server started (the metrics show them;
/// their ratio is how many watchers each piece served).
pub static PIECES_BUILT: AtomicU64 = AtomicU64::new(0);
pub static PIECES_SENT: AtomicU64 = AtomicU64::new(0);

impl Pieces {
    fn get(&mut self, key: PieceKey, build: impl FnOnce() -> bytes::Bytes) -> bytes::Bytes {
        PIECES_SENT.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = self.map.get(&key) {
            return p.clone();
        }
        PIECES_BUILT.fetch_add(1, Ordering::Relaxed);
        let p = build();
        self.bytes += p.len();
        self.map.insert(key, p.clone());
        self.order.push_back(key);
        while self.bytes > PIECES_BYTES || self.order.len() > PIECES_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.map.remove(&old) {
                self.bytes -= gone.len();
            }
        }
        p
    }
}

/// Customer ids gathered at a time from one write: a watcher holds at most
/// this many ids' changes per watched subject changed by the write.
const WINDOW_IDS: u64 = 16_384;

impl Pending {
    /// Gathers the next window when the one before is sent; false when
    /// nothing is left.
    fn fill(&mut self) -> bool {
        if self.sent < self.window.len() {
            return true;
        }
        self.window.clear();
        self.sent = 0;
        if !self.dropped_done {
            self.dropped_done = true;
            for (i, &k) in self.watched.iter().enumerate() {
                if self.entry.changes[k].dropped {
                    self.window.push((0, i as u32, Kind::Dropped));
                }
            }
            if !self.window.is_empty() {
                return true;
            }
        }
        while self.next_id <= u64::from(u32::MAX) {
            let from = self.next_id as u32;
            // Skip to the smallest id changed at or after `from`.
            let mut lo: Option<u32> = None;
            for &k in &self.watched {
                let c = &self.entry.changes[k];
                for b in [&c.entered, &c.left] {
                    let mut it = b.iter();
                    it.reset_at_or_after(from);
                    if let Some(id) = it.next() {
                        lo = Some(lo.map_or(id, |l: u32| l.min(id)));
                    }
                }
            }
            let Some(lo) = lo else {
                self.next_id = u64::from(u32::MAX) + 1;
                break;
            };
            let hi = u64::from(lo) + WINDOW_IDS;
            for (i, &k) in self.watched.iter().enumerate() {
                let c = &self.entry.changes[k];
                for (b, kind) in [(&c.entered, Kind::Entered), (&c.left, Kind::Left)] {
                    let mut it = b.iter();
                    it.reset_at_or_after(lo);
                    for id in it.take_while(|&id| u64::from(id) < hi) {
                        self.window.push((id, i as u32, kind));
                    }
                }
            }
            self.next_id = hi;
            if !self.window.is_empty() {
                // By customer (a customer's leaving one stage and entering
                // the next side by side), then by subject.
                self.window.sort_unstable_by_key(|&(id, s, _)| (id, s));
                return true;
            }
        }
        false
    }
}

/// Where one watcher is: moved to the blocking pool and back for each trip.
struct Cursor {
    engine: Arc<Engine>,
    reader: FeedReader,
    watched: Arc<Watched>,
    max_changes: usize,
    /// Ids grouped by subject, no keys (`WatchRequest.compact`).
    compact: bool,
    pending: VecDeque<Pending>,
}

/// What one trip produced.
struct Trip {
    messages: Vec<proto::WatchResponse>,
    /// Nothing more to read for now: the feed's end is the position.
    caught_up: bool,
}

impl Cursor {
    fn trip(&mut self) -> Result<Trip, Status> {
        let mut read = 0usize;
        while self.pending.is_empty() {
            let entries = self.reader.next(READ_BYTES).map_err(read_status)?;
            if entries.is_empty() {
                return Ok(Trip {
                    messages: Vec::new(),
                    caught_up: true,
                });
            }
            for e in &entries {
                read += e.changes.len();
                if let Some(p) = self.keep(e) {
                    self.pending.push_back(p);
                }
            }
            if self.pending.is_empty() && read >= CHANGES_PER_TRIP * 16 {
                // A long stretch of writes this watcher does not watch: let
                // the caller look at its client before reading on.
                return Ok(Trip {
                    messages: Vec::new(),
                    caught_up: false,
                });
            }
        }
        // Keys are named from the newest snapshot (the full form only).
        let snap = (!self.compact).then(|| self.engine.snapshot());
        let mut messages = Vec::new();
        let mut budget = CHANGES_PER_TRIP;
        while budget > 0 {
            let Some(p) = self.pending.front_mut() else {
                break;
            };
            if self.compact {
                let (grouped, taken, complete) = p.fill_compact(self.max_changes, &self.watched);
                budget = budget.saturating_sub(taken.max(1));
                messages.push(proto::WatchResponse {
                    lsn: p.entry.lsn,
                    at_ms: p.entry.at_ms,
                    changes: Vec::new(),
                    write_complete: complete,
                    grouped,
                });
                if complete {
                    self.pending.pop_front();
                }
                continue;
            }
            let Some(snap) = &snap else {
                break;
            };
            let live = snap.live().map_err(to_status)?;
            let mut changes = Vec::new();
            let mut taken = 0usize;
            // A message takes up to `max_changes`, across windows.
            while taken < self.max_changes && p.fill() {
                let n = (p.window.len() - p.sent).min(self.max_changes - taken);
                taken += n;
                for &(id, i, kind) in &p.window[p.sent..p.sent + n] {
                    let subject = p.entry.changes[p.watched[i as usize]].subject();
                    let (mut tag, field, value) = match subject {
                        Subject::Tag(t) => (t.clone(), String::new(), String::new()),
                        Subject::Value { field, value } => {
                            (String::new(), field.clone(), value.clone())
                        }
                    };
                    let audience = if self.watched.audiences.contains(&tag) {
                        std::mem::take(&mut tag)
                    } else {
                        String::new()
                    };
                    let customer_key = if kind == Kind::Dropped {
                        String::new()
                    } else if live.contains(id) {
                        KEYS.with_borrow_mut(|keys| keys.key(id, snap))?
                    } else {
                        // Erased or merged since: the store may hold no key.
                        snap.dict.key_of(id).map_err(to_status)?.unwrap_or_default()
                    };
                    changes.push(proto::MembershipChange {
                        kind: kind as i32,
                        tag,
                        field,
                        value,
                        customer_id: if kind == Kind::Dropped { 0 } else { id },
                        customer_key,
                        audience,
                    });
                }
                p.sent += n;
            }
            budget = budget.saturating_sub(taken.max(1));
            let complete = !p.fill();
            messages.push(proto::WatchResponse {
                lsn: p.entry.lsn,
                at_ms: p.entry.at_ms,
                changes,
                write_complete: complete,
                grouped: Vec::new(),
            });
            if complete {
                self.pending.pop_front();
            }
        }
        Ok(Trip {
            messages,
            caught_up: false,
        })
    }

    /// The write `e` if this watcher watches something it changed.
    fn keep(&self, e: &Arc<Entry>) -> Option<Pending> {
        let watched: Vec<usize> = e
            .changes
            .iter()
            .enumerate()
            .filter(|(_, c)| self.watched.wants(c.subject()))
            .map(|(k, _)| k)
            .collect();
        if watched.is_empty() {
            return None;
        }
        Some(Pending {
            entry: e.clone(),
            watched,
            dropped_done: false,
            next_id: 0,
            window: Vec::new(),
            sent: 0,
            compact_at: (0, 0, 0),
        })
    }
}

/// Keys of live customers the watchers' thread named lately: watchers of
/// the same tags name the same customers, and a live customer's key never
/// changes (a customer erased or merged is no longer live, and is looked
/// up again).
struct KeyCache {
    keys: HashMap<u32, String>,
}

/// Keys the cache holds at most; it starts again empty beyond.
const KEY_CACHE: usize = 1 << 16;

thread_local! {
    static PIECES: std::cell::RefCell<Pieces> = std::cell::RefCell::new(Pieces::default());
    static KEYS: std::cell::RefCell<KeyCache> = std::cell::RefCell::new(KeyCache {
        keys: HashMap::new(),
    });
}

impl KeyCache {
    fn key(&mut self, id: u32, snap: &crate::storage::Snapshot) -> Result<String, Status> {
        if let Some(k) = self.keys.get(&id) {
            return Ok(k.clone());
        }
        let k = snap.dict.key_of(id).map_err(to_status)?.unwrap_or_default();
        if self.keys.len() >= KEY_CACHE {
            self.keys.clear();
        }
        self.keys.insert(id, k.clone());
        Ok(k)
    }
}

fn read_status(e: ReadError) -> Status {
    match e {
        ReadError::Expired(msg) => Status::out_of_range(msg),
        ReadError::Off => Status::failed_precondition(
            "this server keeps no change feed (feed_retention_mb = 0); turn it on and restart",
        ),
        ReadError::Failed(msg) => {
            Status::internal(format!("the change feed cannot be read: {msg}"))
        }
    }
}

/// Checks what a request watches against the store as it is now.
fn watched(engine: &Engine, r: &proto::WatchRequest) -> Result<Watched, Status> {
    if r.tags.is_empty() && r.values.is_empty() && r.audiences.is_empty() {
        return Err(invalid(
            "name at least one tag, field value or saved audience to watch (`tags`, `values`, `audiences`)",
        ));
    }
    let named = r.tags.len() + r.values.len() + r.audiences.len();
    if named > MAX_SUBJECTS {
        return Err(invalid(format!(
            "a watch names at most {MAX_SUBJECTS} tags, values and audiences; {named} given"
        )));
    }
    let snap = engine.snapshot();
    let mut w = Watched::default();
    for t in &r.tags {
        if snap.tag(t).is_none() {
            return Err(to_status(Error::TagNotFound(t.clone())));
        }
        w.tags.insert(t.clone());
    }
    for a in &r.audiences {
        if !snap.audiences.contains_key(a.as_str()) {
            return Err(to_status(Error::AudienceNotFound(a.clone())));
        }
        if crate::server::audiences::kept_rule(&snap, a).is_none() {
            return Err(Status::failed_precondition(format!(
                "saved audience {a:?} is not kept current, so the change feed has no changes of it: save it again with kept_current (CreateAudience, replace) to watch it"
            )));
        }
        if w.tags.contains(a) {
            return Err(invalid(format!(
                "{a:?} is named both as a tag and as an audience; name it once"
            )));
        }
        w.audiences.insert(a.clone());
    }
    for v in &r.values {
        let field = snap
            .field(&v.field)
            .ok_or_else(|| to_status(Error::FieldNotFound(v.field.clone())))?;
        let FieldKind::Enum { values } = &field.meta.kind else {
            return Err(invalid(format!(
                "field {:?} is {}: only the values of enumerated fields (and lifecycles) are watched",
                v.field,
                field.meta.kind.name()
            )));
        };
        if v.value.is_empty() {
            w.fields.insert(v.field.clone());
        } else if values.contains(&v.value) {
            w.values.insert((v.field.clone(), v.value.clone()));
        } else {
            return Err(invalid(format!(
                "field {:?} has no value {:?}; its values: {}",
                v.field,
                v.value,
                values.join(", ")
            )));
        }
    }
    Ok(w)
}

pub(super) async fn watch(
    svc: &Service,
    req: Request<proto::WatchRequest>,
) -> Result<Response<WatchStream>, Status> {
    let r = req.into_inner();
    let max_changes = match r.max_changes as usize {
        0 => DEFAULT_MAX_CHANGES,
        n if n <= MAX_CHANGES => n,
        n => {
            return Err(invalid(format!(
                "max_changes is 1 to {MAX_CHANGES} (0: {DEFAULT_MAX_CHANGES}); {n} given"
            )));
        }
    };
    let watched = Arc::new(watched(&svc.engine, &r)?);
    let slot = svc.watches.take()?;
    let after = match r.after_lsn {
        Some(lsn) => lsn,
        None => svc.engine.feed_view().end,
    };
    let reader = svc.engine.feed_reader(after).map_err(read_status)?;
    // Registered before the first read: a write after that read wakes it.
    let registration = svc.feed.hub.register(&watched);
    let (tx, rx) = mpsc::channel(BUFFERED);
    let cursor = Cursor {
        engine: svc.engine.clone(),
        reader,
        watched,
        max_changes,
        compact: r.compact,
        pending: VecDeque::new(),
    };
    tokio::spawn(run(
        cursor,
        tx,
        slot,
        registration,
        svc.feed.workers.clone(),
        svc.closing.clone(),
    ));
    Ok(Response::new(ReceiverStream::new(rx)))
}

fn progress(lsn: u64) -> proto::WatchResponse {
    proto::WatchResponse {
        lsn,
        at_ms: 0,
        changes: Vec::new(),
        write_complete: true,
        grouped: Vec::new(),
    }
}

/// One watcher's task, until its client goes or the server closes.
async fn run(
    mut cursor: Cursor,
    tx: mpsc::Sender<Result<proto::WatchResponse, Status>>,
    _slot: ExportSlot,
    registration: Registration,
    workers: Arc<Workers>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let mut said = cursor.reader.position();
    if tx.send(Ok(progress(said))).await.is_err() {
        return;
    }
    let mut said_at = Instant::now();
    let mut tripped;
    loop {
        if *closing.borrow() {
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "the server is shutting down; watch again with after_lsn {said}"
                ))))
                .await;
            return;
        }
        tripped = Instant::now();
        // A client gone while the job waited for the thread costs nothing.
        let gone = tx.clone();
        let (back, trip) = match workers
            .run(move || {
                if gone.is_closed() {
                    return (cursor, Err(Status::cancelled("the client went away")));
                }
                let trip = cursor.trip();
                (cursor, trip)
            })
            .await
        {
            Some(t) => t,
            None => {
                let _ = tx
                    .send(Err(Status::internal("the change feed's worker stopped")))
                    .await;
                return;
            }
        };
        cursor = back;
        let trip = match trip {
            Ok(t) => t,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        for m in trip.messages {
            let complete = m.write_complete.then_some(m.lsn);
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
            if let Some(lsn) = complete {
                said = lsn;
                said_at = Instant::now();
            }
        }
        if !trip.caught_up {
            if tx.is_closed() {
                return;
            }
            continue;
        }
        let at = cursor.reader.position();
        if at > said && said_at.elapsed() >= PROGRESS_EVERY {
            if tx.send(Ok(progress(at))).await.is_err() {
                return;
            }
            said = at;
            said_at = Instant::now();
        }
        // Caught up: until a write changes what it watches (the hub says
        // so), or it is time to say where it is.
        let nudge = PROGRESS_EVERY.saturating_sub(said_at.elapsed());
        tokio::select! {
            _ = registration.notify.notified() => {
                // Writes that come close together are taken in one trip: a
                // watcher costs at most one trip per `TRIP_GAP`, however
                // fast the writes it watches come.
                let wait = TRIP_GAP.saturating_sub(tripped.elapsed());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            _ = closing.changed() => {}
            _ = tx.closed() => return,
            _ = tokio::time::sleep(nudge) => {}
        }
    }
}

/// What the server keeps for its watchers: the hub that wakes them, and
/// the thread that reads the feed and builds their messages.
pub struct Feed {
    pub(super) hub: Arc<Hub>,
    pub(super) workers: Arc<Workers>,
}

impl Feed {
    /// Starts the hub's task (on the current runtime; it ends when the
    /// server starts closing) and the worker thread.
    pub fn start(engine: Arc<Engine>, closing: tokio::sync::watch::Receiver<bool>) -> Arc<Feed> {
        let hub = Arc::new(Hub::default());
        tokio::spawn(dispatch(engine, hub.clone(), closing));
        Arc::new(Feed {
            hub,
            workers: Workers::start(),
        })
    }
}

/// Which watcher watches what, so that a write wakes only the watchers of
/// what it changed.
#[derive(Default)]
pub struct Hub {
    inner: Mutex<HubInner>,
    /// Told when a watcher registers: the hub's task follows the feed only
    /// while there are watchers (see [`dispatch`]).
    joined: tokio::sync::Notify,
}

#[derive(Default)]
struct HubInner {
    next: u64,
    watchers: HashMap<u64, Arc<tokio::sync::Notify>>,
    /// Watchers by tag, and by field (of a value or all values).
    tags: HashMap<String, HashSet<u64>>,
    fields: HashMap<String, HashSet<u64>>,
}

/// A watcher's place in the hub; it leaves the hub when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    id: u64,
    notify: Arc<tokio::sync::Notify>,
}

impl Hub {
    fn register(self: &Arc<Self>, w: &Watched) -> Registration {
        let notify = Arc::new(tokio::sync::Notify::new());
        let mut h = self.inner.lock();
        h.next += 1;
        let id = h.next;
        h.watchers.insert(id, notify.clone());
        for t in w.tags.iter().chain(&w.audiences) {
            h.tags.entry(t.clone()).or_default().insert(id);
        }
        for f in w.fields.iter().chain(w.values.iter().map(|(f, _)| f)) {
            h.fields.entry(f.clone()).or_default().insert(id);
        }
        drop(h);
        self.joined.notify_one();
        Registration {
            hub: self.clone(),
            id,
            notify,
        }
    }

    fn is_empty(&self) -> bool {
        self.inner.lock().watchers.is_empty()
    }

    /// Wakes the watchers of what `entries` changed (all of them when
    /// `None`: the hub fell behind and cannot tell).
    fn wake(&self, entries: Option<&[Arc<Entry>]>) {
        let h = self.inner.lock();
        let Some(entries) = entries else {
            for n in h.watchers.values() {
                n.notify_one();
            }
            return;
        };
        let mut woken: HashSet<u64> = HashSet::new();
        for e in entries {
            for c in &e.changes {
                let ids = match c.subject() {
                    Subject::Tag(t) => h.tags.get(t),
                    Subject::Value { field, .. } => h.fields.get(field),
                };
                for id in ids.into_iter().flatten() {
                    if woken.insert(*id)
                        && let Some(n) = h.watchers.get(id)
                    {
                        n.notify_one();
                    }
                }
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut guard = self.hub.inner.lock();
        let h = &mut *guard;
        h.watchers.remove(&self.id);
        for set in h.tags.values_mut().chain(h.fields.values_mut()) {
            set.remove(&self.id);
        }
        h.tags.retain(|_, s| !s.is_empty());
        h.fields.retain(|_, s| !s.is_empty());
    }
}

/// The hub's task: follows the feed's newest entries (from memory) and
/// wakes the watchers each one concerns. With no watcher it does not
/// follow the feed at all (it holds no subscription to it), so a write
/// wakes no task here: with one client writing, that wake-up cost a
/// thread hand-off on every write. When a watcher registers, it
/// subscribes again from the feed's end and wakes every watcher once, so
/// that one that registered while it was idle reads what came meanwhile.
async fn dispatch(
    engine: Arc<Engine>,
    hub: Arc<Hub>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        while hub.is_empty() {
            tokio::select! {
                _ = hub.joined.notified() => {}
                _ = closing.wait_for(|c| *c) => return,
            }
        }
        let mut signal = engine.feed_signal();
        let mut at = engine.feed_view().end;
        hub.wake(None);
        while !hub.is_empty() {
            let changed = tokio::select! {
                c = signal.changed() => c.is_ok(),
                _ = closing.wait_for(|c| *c) => false,
            };
            if !changed {
                return;
            }
            match engine.feed_recent(at) {
                Some((entries, end)) => {
                    if !entries.is_empty() {
                        hub.wake(Some(&entries));
                    }
                    at = end;
                }
                None => {
                    // Behind what memory holds (or the feed started again):
                    // every watcher looks for itself.
                    hub.wake(None);
                    at = engine.feed_view().end;
                }
            }
        }
    }
}

/// The thread that does the watchers' work (reading the feed, building
/// messages), one job at a time in the order asked, at a lower CPU
/// priority than the rest of the server: under a load that takes every
/// core, watchers fall behind (within the feed's retention) rather than
/// slow writers and readers down.
pub struct Workers {
    tx: parking_lot::Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

/// The niceness of the watchers' thread (0 is the server's).
const WORKER_NICE: i32 = 19;

impl Workers {
    fn start() -> Arc<Workers> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("tagstore-watch".into())
            .spawn(move || {
                super::lower_priority(WORKER_NICE, "the watchers' thread");
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread for watchers: Watch calls will fail");
        }
        Arc::new(Workers {
            tx: parking_lot::Mutex::new(tx),
        })
    }

    /// Runs `f` on the watchers' thread; `None` if that thread is gone.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        self.tx.lock().send(job).ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{EngineConfig, Mutation, WriteOp};

    async fn add(engine: &Engine, tag: &str, key: &str) {
        let op = WriteOp::Update {
            mutations: vec![Mutation {
                tag: tag.into(),
                add: vec![key.into()],
                ..Default::default()
            }],
            create_missing_tags: true,
        };
        engine.write(op).await.expect("write");
    }

    /// Waits (at most 10 s) until the feed has `n` followers.
    async fn followers(engine: &Engine, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while engine.feed_followers() != n {
            assert!(
                Instant::now() < deadline,
                "the feed has {} followers, not {n}",
                engine.feed_followers()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn woken(r: &Registration, what: &str) {
        tokio::time::timeout(Duration::from_secs(10), r.notify.notified())
            .await
            .unwrap_or_else(|_| panic!("the watcher was not woken {what}"));
    }

    /// With no watcher the hub does not follow the feed, so a write wakes
    /// no task of its; a watcher that registers is woken once (to read
    /// what came while the hub was idle) and by the writes it watches; once
    /// the last watcher has left, the hub lets go of the feed again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hub_follows_the_feed_only_while_someone_watches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine =
            Arc::new(Engine::open(EngineConfig::new(dir.path())).expect("open the engine"));
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let feed = Feed::start(engine.clone(), closing);
        tokio::task::yield_now().await;
        add(&engine, "a", "k1").await;
        followers(&engine, 0).await;
        for round in 0..3 {
            let watched = Watched {
                tags: ["a".to_string()].into(),
                values: HashSet::new(),
                fields: HashSet::new(),
                audiences: HashSet::new(),
            };
            let registration = feed.hub.register(&watched);
            woken(&registration, "when it registered").await;
            followers(&engine, 1).await;
            add(&engine, "a", &format!("k{}", round + 2)).await;
            woken(&registration, "by a write it watches").await;
            drop(registration);
            // The hub notices that nobody watches at the next write.
            add(&engine, "b", &format!("k{}", round + 2)).await;
            followers(&engine, 0).await;
        }
        let _ = closing_tx.send(true);
        let engine = Arc::try_unwrap(engine).ok();
        drop(feed);
        if let Some(engine) = engine {
            engine.shutdown().expect("shutdown");
        }
    }
}
