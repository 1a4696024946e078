//! `Export` as a stream that works only when its reader asks: batches are
//! computed on the blocking pool when the transport takes them (which it
//! does only while the client's flow-control window has room), at most one
//! trip of batches ahead, so a client that reads slowly or not at all holds
//! no thread and at most two trips' worth of batches (`IDS_PER_TRIP` ids
//! each, or one batch).
//! Every batch comes from the one snapshot taken when the call began, so
//! every row of that snapshot arrives whatever happens meanwhile; a stream
//! that cannot send them all ends with an error, never short. A stream
//! dropped by the transport (the client cancelled or went away) stops a
//! trip under way before its next shard: a sparse query may walk every
//! shard to fill one batch.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::Status;

use crate::bitmap::{Bitmap, shard_of, shard_start};
use crate::proto;
use crate::query::eval::{Abandon, AbandonOnDrop};
use crate::query::{Expr, Query};
use crate::server::budget::ExportSlot;
use crate::server::status::to_status;
use crate::storage::Snapshot;

/// Where an export is: everything needed to compute its next batch.
struct Cursor {
    snap: Arc<Snapshot>,
    expr: Arc<Expr>,
    /// "Today" for time windows, fixed when the export began.
    now_ms: i64,
    batch: usize,
    /// Customers named by their identity of this type (`None`: by key).
    identity_type: Option<String>,
    hashing: Option<Hashing>,
    total: u64,
    /// The last id sent.
    after: Option<u32>,
    sent: u64,
    /// No batch follows.
    finished: bool,
    /// The shard batches are being read from, evaluated (`None` inside: empty).
    current: Option<(usize, Option<Bitmap>)>,
    /// Set when the stream is dropped: the trip stops at its next shard.
    gone: Abandon,
}

/// One trip to the blocking pool computes batches until they hold this many
/// ids (at least one batch): small batches share the trip's thread wake-up
/// (a hop per batch of 1,000 made exporting a million members 1.5× slower),
/// and an export never holds more than two trips' worth (this many ids, or
/// one batch, each) waiting for its reader.
const IDS_PER_TRIP: usize = 16_384;

impl Cursor {
    /// The next batches (as many as [`IDS_PER_TRIP`] allows, in order), or
    /// none once every row was sent. An error ends the list and the export.
    fn next_batches(&mut self) -> VecDeque<Result<proto::ExportResponse, Status>> {
        let mut out = VecDeque::new();
        if self.finished {
            return out;
        }
        let (snap, expr) = (self.snap.clone(), self.expr.clone());
        let query = match Query::from_expr_at(&expr, &snap, self.now_ms) {
            Ok(q) => q,
            Err(e) => {
                self.finished = true;
                out.push_back(Err(to_status(e)));
                return out;
            }
        };
        let mut ids = 0;
        while !self.finished && (out.is_empty() || ids + self.batch <= IDS_PER_TRIP) {
            let res = self.compute(&query);
            match &res {
                Ok(batch) => ids += batch.customers.len(),
                Err(_) => self.finished = true,
            }
            out.push_back(res);
        }
        out
    }

    /// The members of shard `i` (evaluated once, kept while batches read
    /// it: re-evaluating an `OR` per batch cost a tenth of an export).
    fn shard<'c>(&'c mut self, query: &Query<'_>, i: usize) -> Option<&'c Bitmap> {
        if self.current.as_ref().map(|(n, _)| *n) != Some(i) {
            self.current = Some((i, query.shard(i).map(|b| b.into_owned())));
        }
        self.current.as_ref().and_then(|(_, b)| b.as_ref())
    }

    /// Up to one batch of member ids after `self.after`, and whether more
    /// follow; `None` once the stream was dropped (checked before each
    /// shard).
    fn page(&mut self, query: &Query<'_>) -> Option<(Vec<u32>, bool)> {
        let mut from = match self.after {
            None => 0,
            Some(u32::MAX) => return Some((Vec::new(), false)),
            Some(a) => a + 1,
        };
        let mut ids = Vec::with_capacity(self.batch.min(1 << 16));
        let shards = query.shard_count();
        let mut i = shard_of(from);
        while i < shards {
            if self.gone.is_set() {
                return None;
            }
            let batch = self.batch;
            if let Some(members) = self.shard(query, i) {
                let mut it = members.iter();
                it.reset_at_or_after(from);
                for id in it {
                    if ids.len() == batch {
                        return Some((ids, true));
                    }
                    ids.push(id);
                }
            }
            i += 1;
            from = shard_start(i.min(shard_of(u32::MAX)));
        }
        Some((ids, false))
    }

    fn compute(&mut self, query: &Query<'_>) -> Result<proto::ExportResponse, Status> {
        let Some((ids, more)) = self.page(query) else {
            // No one reads this: it only ends the trip.
            return Err(Status::cancelled("the export's reader has gone"));
        };
        let mut customers = Vec::with_capacity(ids.len());
        let without_identity = self
            .snap
            .names_of(&ids, self.identity_type.as_deref(), &mut customers)
            .map_err(to_status)?;
        if let Some(h) = self.hashing {
            for c in &mut customers {
                *c = h.apply(c);
            }
        }
        self.sent += ids.len() as u64;
        self.after = ids.last().copied().or(self.after);
        if !more {
            self.finished = true;
            if self.sent != self.total {
                return Err(Status::internal(format!(
                    "export found {} members where it counted {}; the stream is incomplete",
                    self.sent, self.total
                )));
            }
        }
        Ok(proto::ExportResponse {
            customers,
            total: self.total,
            without_identity,
        })
    }
}

type Item = Result<proto::ExportResponse, Status>;
type Step = (Cursor, VecDeque<Item>);

/// The stream `Export` answers with.
pub struct ExportStream {
    /// Members of the whole export.
    total: u64,
    idle: Option<Cursor>,
    running: Option<JoinHandle<Step>>,
    /// Batches computed and not yet taken by the transport.
    ready: VecDeque<Item>,
    _slot: ExportSlot,
    /// Stops a trip under way when the stream is dropped.
    _gone: AbandonOnDrop,
}

impl ExportStream {
    /// An export of `expr` (already compiled once on `snap`, with `total`
    /// members) in batches of `batch`.
    pub fn new(
        snap: Arc<Snapshot>,
        expr: Expr,
        now_ms: i64,
        batch: usize,
        names: ExportNames,
        total: u64,
        slot: ExportSlot,
    ) -> Self {
        let ExportNames {
            identity_type,
            hashing,
        } = names;
        let gone = Abandon::default();
        Self {
            total,
            _gone: gone.on_drop(),
            idle: Some(Cursor {
                snap,
                expr: Arc::new(expr),
                now_ms,
                batch,
                identity_type,
                hashing,
                total,
                after: None,
                sent: 0,
                finished: false,
                current: None,
                gone,
            }),
            running: None,
            ready: VecDeque::new(),
            _slot: slot,
        }
    }
}

impl ExportStream {
    /// Members of the whole export.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Starts computing the next batches on the blocking pool, unless a
    /// trip is under way already; false when no batch is left.
    fn start_trip(&mut self) -> bool {
        if self.running.is_some() {
            return true;
        }
        let Some(mut cursor) = self.idle.take() else {
            return false;
        };
        if cursor.finished {
            return false;
        }
        self.running = Some(tokio::task::spawn_blocking(move || {
            let items = cursor.next_batches();
            (cursor, items)
        }));
        true
    }
}

impl Stream for ExportStream {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                // The next trip starts now, so that it is computed while
                // this batch is sent (at most one trip ahead of the reader).
                if self.ready.is_empty() {
                    self.start_trip();
                }
                return Poll::Ready(Some(item));
            }
            if self.running.is_none() && !self.start_trip() {
                return Poll::Ready(None);
            }
            let Some(task) = self.running.as_mut() else {
                return Poll::Ready(None);
            };
            let joined = std::task::ready!(Pin::new(task).poll(cx));
            self.running = None;
            match joined {
                Ok((cursor, items)) => {
                    self.idle = Some(cursor);
                    if items.is_empty() {
                        return Poll::Ready(None);
                    }
                    self.ready = items;
                }
                Err(e) => {
                    return Poll::Ready(Some(Err(Status::internal(format!(
                        "export task failed: {e}"
                    )))));
                }
            }
        }
    }
}

/// How an export names its customers: by key, or by an identity type,
/// hashed or not.
pub struct ExportNames {
    pub identity_type: Option<String>,
    pub hashing: Option<Hashing>,
}

/// How an export hashes the identities it sends (ad platforms match
/// audiences by hashed phones or device ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashing {
    pub md5: bool,
    pub upper: bool,
}

impl Hashing {
    /// From a request's `hash` and `hash_upper`: `None` for no hashing.
    pub fn parse(hash: &str, upper: bool) -> Result<Option<Hashing>, String> {
        match hash {
            "" => Ok(None),
            "sha256" => Ok(Some(Hashing { md5: false, upper })),
            "md5" => Ok(Some(Hashing { md5: true, upper })),
            other => Err(format!("unknown hash {other:?}: sha256 or md5")),
        }
    }

    /// The hash of an identity's value (`type:value` → hex of `value`).
    pub fn apply(self, identity: &str) -> String {
        use md5::Digest as _;
        let value = identity.split_once(':').map_or(identity, |(_, v)| v);
        let digest: Vec<u8> = if self.md5 {
            md5::Md5::digest(value.as_bytes()).to_vec()
        } else {
            sha2::Sha256::digest(value.as_bytes()).to_vec()
        };
        let mut out = String::with_capacity(digest.len() * 2);
        for b in digest {
            let hex = if self.upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            };
            out.push_str(&hex);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::budget::ExportSlots;
    use crate::storage::{Engine, EngineConfig, Mutation, WriteOp};

    /// A store with tag `t` of three members, and an export of `t` in
    /// batches of one.
    async fn export_of_t(dir: &std::path::Path) -> (Engine, ExportStream) {
        let engine = Engine::open(EngineConfig::new(dir)).expect("open the engine");
        let op = WriteOp::Update {
            mutations: vec![Mutation {
                tag: "t".into(),
                add: vec!["a".into(), "b".into(), "c".into()],
                ..Default::default()
            }],
            create_missing_tags: true,
        };
        engine.write(op).await.expect("write");
        let snap = engine.snapshot();
        let expr = crate::query::parse("t").expect("parse");
        let names = ExportNames {
            identity_type: None,
            hashing: None,
        };
        let slot = ExportSlots::new(1).take().expect("a slot");
        let stream = ExportStream::new(snap, expr, 0, 1, names, 3, slot);
        (engine, stream)
    }

    /// A dropped stream (the client cancelled or went away) tells the trip
    /// it handed to the blocking pool, which then stops before its next
    /// shard and reads no member.
    #[tokio::test]
    async fn a_dropped_export_stops_the_trip_it_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_engine, mut stream) = export_of_t(dir.path()).await;
        let mut cursor = stream.idle.take().expect("a cursor");
        let gone = cursor.gone.clone();
        assert!(!gone.is_set());
        drop(stream);
        assert!(gone.is_set(), "dropping the stream did not tell its trip");
        let items = cursor.next_batches();
        assert_eq!(items.len(), 1, "{items:?}");
        let code = items[0].as_ref().map(|_| ()).unwrap_err().code();
        assert_eq!(code, tonic::Code::Cancelled);
        assert_eq!(cursor.sent, 0, "a trip for no one read members");
        assert!(cursor.finished);
    }

    /// The same stream, read to its end, sends every member.
    #[tokio::test]
    async fn an_export_read_to_its_end_sends_every_member() {
        use tokio_stream::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (_engine, mut stream) = export_of_t(dir.path()).await;
        let mut got = Vec::new();
        while let Some(item) = stream.next().await {
            got.extend(item.expect("a batch").customers);
        }
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn identities_hash_as_ad_platforms_expect() {
        let sha = Hashing::parse("sha256", false).unwrap().unwrap();
        // SHA-256 and MD5 of "13800138000", as sha256sum and md5sum give them.
        assert_eq!(
            sha.apply("phone:13800138000"),
            "a6942f9771d67f34034d2f1926988ed3fad3bf1b4e7cedb9a31f31398dea43bc"
        );
        let md5 = Hashing::parse("md5", true).unwrap().unwrap();
        assert_eq!(
            md5.apply("phone:13800138000"),
            "7945BD83237335E5376FF44D62E4F0AE"
        );
        assert!(Hashing::parse("sha1", false).is_err());
        assert_eq!(Hashing::parse("", true).unwrap(), None);
    }
}
