//! Where, and on how many threads, the queries of one count run. Small
//! in-memory counts run right on the calling (async) thread; a single large
//! one is shared out shard by shard between that thread and a blocking-pool
//! thread; anything that may read from disk, runs field predicates, or parses
//! long texts goes to the blocking pool. Reads one snapshot; writes nothing.
//! The server calls [`count`] and turns a [`CountFailure`] into a status.

use std::sync::Arc;

use crate::error::Error;
use crate::query::Query;
use crate::query::eval::{Abandon, ShardClaims};
use crate::storage::Snapshot;

/// Why a count failed, and which of several queries did.
#[derive(Debug)]
pub struct CountFailure {
    pub error: Error,
    /// The failing query's index when there were several.
    pub index: Option<usize>,
}

impl CountFailure {
    fn new(error: Error, index: Option<usize>) -> Self {
        Self { error, index }
    }
}

/// The counts of `queries` (at least one), all from `snap`, with "today"
/// taken at `now` (Unix ms). Dropped before it is done (the call was
/// cancelled), it stops the threads counting for it at their next shard.
pub async fn count(
    snap: Arc<Snapshot>,
    queries: Vec<String>,
    now: i64,
) -> Result<Vec<u64>, CountFailure> {
    let many = queries.len() > 1;
    let bytes: usize = queries.iter().map(String::len).sum();
    // Long texts are parsed and planned on the blocking pool, never on the
    // thread that serves the connections.
    let counting = if bytes > INLINE_TEXT_BYTES {
        Counting::Blocking
    } else {
        count_inline(&queries, &snap, many, now)?
    };
    if let Counting::Done(counts) = counting {
        return Ok(counts);
    }
    let abandon = Abandon::default();
    // Dropped with this future, whether the count is done or the call gone.
    let _stop_when_dropped = abandon.on_drop();
    match counting {
        Counting::Done(counts) => return Ok(counts),
        Counting::Halves => {
            return Ok(vec![
                count_halves(snap, &queries[0], now, abandon.clone()).await?,
            ]);
        }
        Counting::Blocking => {}
    }
    let pool = tokio::runtime::Handle::current();
    let stop = abandon.clone();
    tokio::task::spawn_blocking(move || count_all(&snap, &queries, now, &pool, &stop))
        .await
        .map_err(|e| CountFailure::new(Error::Internal(format!("query task failed: {e}")), None))?
}

/// The blocking pool's part of [`count`]: every query in turn, until
/// `abandon` is set.
fn count_all(
    snap: &Arc<Snapshot>,
    queries: &[String],
    now: i64,
    pool: &tokio::runtime::Handle,
    abandon: &Abandon,
) -> Result<Vec<u64>, CountFailure> {
    let many = queries.len() > 1;
    let gone = || CountFailure::new(Error::Abandoned, None);
    queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            if abandon.is_set() {
                return Err(gone());
            }
            let query = Query::compile_at(q, snap, now)
                .map_err(|e| CountFailure::new(e, many.then_some(i)))?;
            let counted = if many {
                query.count_until(abandon)
            } else {
                count_split(&query, snap, q, now, pool, abandon)
            };
            counted.ok_or_else(gone)
        })
        .collect()
}

/// Queries whose texts add up to more than this many bytes are
/// parsed on the blocking pool: parsing and planning 64 KiB of text takes
/// milliseconds, which the connections served by the async thread would wait.
const INLINE_TEXT_BYTES: usize = 4 << 10;

/// Queries whose bitmaps are all in memory and whose work
/// ([`Query::work`], in ids of sparse containers, a dense container counting
/// as 700) is at most this are counted on the async thread: about 30 µs
/// here, while handing them to the blocking pool costs two thread
/// wake-ups, more than the work itself. At 1M customers that is any count
/// of up to five dense tags (13 µs for three, 28 µs for five, in-process).
/// A larger single query is counted on two threads that share out its
/// shards (`count_halves`, `count_split`).
const INLINE_WORK: u64 = 100_000;

/// A single in-memory query up to this much work is counted on the async
/// thread and a pool thread together (`count_halves`): about 1.2 ms of
/// counting, of which the async thread's share is about half, all of it
/// when the pool thread is slow to start. Larger ones go to the blocking
/// pool whole, and are shared out there (`count_split`).
const HALVES_MAX_WORK: u64 = 4_000_000;

/// Counts one query whose plan touches more than [`INLINE_WORK`] ids over two
/// threads: this one and a blocking-pool thread (which compiles the same text
/// again, at the same instant), each taking the next uncounted shard until
/// none is left ([`ShardClaims`]). On an idle server this halves the latency
/// of a large count; a pool thread that wakes late takes fewer shards rather
/// than delaying the answer, and on a busy one this thread counts them all.
fn count_split(
    query: &Query,
    snap: &Arc<Snapshot>,
    text: &str,
    now: i64,
    pool: &tokio::runtime::Handle,
    abandon: &Abandon,
) -> Option<u64> {
    let shards = query.shard_count();
    if query.work() <= INLINE_WORK || shards < 2 {
        return query.count_until(abandon);
    }
    let claims = Arc::new(ShardClaims::new(shards, abandon.clone()));
    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
    {
        let (snap, text, claims) = (snap.clone(), text.to_string(), claims.clone());
        pool.spawn_blocking(move || {
            help_count(&snap, &text, now, &claims);
            let _ = tx.send(());
        });
    }
    query.count_claimed(&claims);
    if let Some(total) = claims.total() {
        return Some(total);
    }
    if abandon.is_set() {
        // No one reads the count: the helper stops at its next shard.
        return None;
    }
    // The helper is still counting a shard it took; wait for it to finish
    // (or to have dropped its sender, should it have failed).
    let _ = rx.recv();
    // A helper that died halfway through a shard leaves that shard uncounted:
    // count the whole query here instead.
    claims.total().or_else(|| query.count_until(abandon))
}

/// The second thread's part of a split count: nothing if the first thread
/// has already taken every shard, otherwise the shards it can take.
fn help_count(snap: &Snapshot, text: &str, now: i64, claims: &ShardClaims) {
    if claims.all_claimed() {
        return;
    }
    // The same text compiled a moment ago on the same snapshot; should it
    // fail, this thread takes no shard and the first counts them all.
    if let Ok(q) = Query::compile_at(text, snap, now) {
        q.count_claimed(claims);
    }
}

/// Where [`count`] counts its queries.
enum Counting {
    /// Counted already, on the async thread.
    Done(Vec<u64>),
    /// One query, all in memory, too large to count in one go on the async
    /// thread: [`count_halves`].
    Halves,
    /// On the blocking pool: bitmaps to load from disk, field predicates, or
    /// several queries that add up to too much work.
    Blocking,
}

/// Counts a single in-memory query over two threads: this async thread and a
/// blocking-pool thread share out its shards ([`ShardClaims`]), as in
/// [`count_split`]. One hand-off instead of two, and the answer in about half
/// the time on an idle server; the async thread waits for the pool thread
/// only while that is counting a shard it took.
async fn count_halves(
    snap: Arc<Snapshot>,
    text: &str,
    now: i64,
    abandon: Abandon,
) -> Result<u64, CountFailure> {
    let (claims, helper) = {
        let query = Query::compile_at(text, &snap, now).map_err(|e| CountFailure::new(e, None))?;
        let claims = Arc::new(ShardClaims::new(query.shard_count(), abandon));
        let helper = {
            let (snap, text, claims) = (snap.clone(), text.to_string(), claims.clone());
            tokio::task::spawn_blocking(move || help_count(&snap, &text, now, &claims))
        };
        query.count_claimed(&claims);
        (claims, helper)
    };
    if let Some(total) = claims.total() {
        return Ok(total);
    }
    let joined = helper.await;
    match (claims.total(), joined) {
        (Some(total), _) => Ok(total),
        (None, Err(e)) => Err(CountFailure::new(
            Error::Internal(format!("query task failed: {e}")),
            None,
        )),
        (None, Ok(())) => Err(CountFailure::new(
            Error::Internal("a shard of the count was left uncounted".into()),
            None,
        )),
    }
}

/// Decides where `queries` are counted, and counts them right here when that
/// is cheap and cannot block on disk.
fn count_inline(
    queries: &[String],
    snap: &Snapshot,
    many: bool,
    now: i64,
) -> Result<Counting, CountFailure> {
    if !snap.live.is_loaded() {
        return Ok(Counting::Blocking);
    }
    let mut exprs = Vec::with_capacity(queries.len());
    for (i, q) in queries.iter().enumerate() {
        let expr = crate::query::parse(q).map_err(|e| CountFailure::new(e, many.then_some(i)))?;
        // Through saved audiences, to the tags, fields and snapshots they
        // use; snapshots not yet read from their segment are read off this
        // thread.
        let (mut names, mut snapshots) = (Vec::new(), Vec::new());
        if !crate::query::eval::names_reached(&expr, snap, &mut names, &mut snapshots)
            || snapshots.iter().any(|id| {
                snap.snapshots
                    .get(id)
                    .is_some_and(|s| !s.members.is_loaded())
            })
        {
            return Ok(Counting::Blocking);
        }
        // Unknown tags are reported by compile; unloaded ones must not be decoded here.
        // Field predicates run the bit-sliced walk: not for the async thread.
        if names
            .iter()
            .any(|n| snap.field(n).is_some() || snap.tag(n).is_some_and(|t| !t.bitmap.is_loaded()))
        {
            return Ok(Counting::Blocking);
        }
        exprs.push(expr);
    }
    let mut compiled = Vec::with_capacity(exprs.len());
    let mut work = 0u64;
    for (i, e) in exprs.iter().enumerate() {
        let q = Query::from_expr_at(e, snap, now)
            .map_err(|e| CountFailure::new(e, many.then_some(i)))?;
        work = work.saturating_add(q.work());
        if work > INLINE_WORK {
            return Ok(
                if many || q.shard_count() < 2 || q.work() > HALVES_MAX_WORK {
                    Counting::Blocking
                } else {
                    Counting::Halves
                },
            );
        }
        compiled.push(q);
    }
    Ok(Counting::Done(compiled.iter().map(Query::count).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count big enough to be split over two threads gives the same answer
    /// as counting it in one go.
    #[test]
    fn a_split_count_adds_up() {
        use crate::bitmap::{SHARD_SIZE, ShardedBitmap};
        use roaring::RoaringBitmap;
        // Dense tags over 8 shards: more work than the async thread does alone.
        let n = 8 * SHARD_SIZE;
        let every = |k: u32| -> RoaringBitmap { (0..n).step_by(k as usize).collect() };
        let (a, b) = (every(3), every(5));
        let expect = (&a & &b).len();
        let snap = Arc::new(Snapshot::in_memory(
            vec![
                ("a".into(), ShardedBitmap::from_roaring(&a)),
                ("b".into(), ShardedBitmap::from_roaring(&b)),
            ],
            ShardedBitmap::from_roaring(&every(1)),
        ));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let query = Query::compile_at("a AND b", &snap, now).unwrap();
        assert!(query.work() > INLINE_WORK && query.shard_count() == 8);
        let go_on = Abandon::default();
        assert_eq!(
            count_split(&query, &snap, "a AND b", now, rt.handle(), &go_on),
            Some(expect)
        );
        // The caller went: nothing more is counted, and no count is made up.
        let gone = Abandon::default();
        gone.set();
        assert_eq!(
            count_split(&query, &snap, "a AND b", now, rt.handle(), &gone),
            None
        );
        let texts = ["a AND b".to_string(), "a OR b".to_string()];
        let all = count_all(&snap, &texts, now, rt.handle(), &go_on).unwrap();
        assert_eq!(all, vec![expect, (&a | &b).len()]);
        let left = count_all(&snap, &texts, now, rt.handle(), &gone).unwrap_err();
        assert!(matches!(left.error, Error::Abandoned), "{:?}", left.error);
        assert_eq!(query.count_until(&gone), None);
        // The same query as the service sees it: counted in halves, one of
        // them on the async thread.
        let text = ["a AND b".to_string()];
        assert!(matches!(
            count_inline(&text, &snap, false, now),
            Ok(Counting::Halves)
        ));
        let halves = rt.block_on(count_halves(snap.clone(), "a AND b", now, go_on.clone()));
        assert_eq!(halves.unwrap(), expect);
        // Two such queries in one call go to the blocking pool whole.
        let two = ["a AND b".to_string(), "a OR b".to_string()];
        assert!(matches!(
            count_inline(&two, &snap, true, now),
            Ok(Counting::Blocking)
        ));
        let unknown = rt.block_on(count_halves(snap, "a AND nope", now, go_on));
        assert!(matches!(unknown.unwrap_err().error, Error::Query { .. }));
    }

    /// A saved audience is counted where its query would be: right on the
    /// async thread when its tags are in memory (not sent to the blocking
    /// pool for being an audience), through audiences that use others.
    #[test]
    fn a_saved_audience_is_counted_where_its_query_would_be() {
        use crate::bitmap::ShardedBitmap;
        use crate::storage::snapshot::AudienceMeta;
        use roaring::RoaringBitmap;
        let small: RoaringBitmap = (0..1000).collect();
        let mut snap = Snapshot::in_memory(
            vec![
                ("a".into(), ShardedBitmap::from_roaring(&small)),
                ("b".into(), ShardedBitmap::from_roaring(&small)),
            ],
            ShardedBitmap::from_roaring(&small),
        );
        let audience = |name: &str, query: &str| {
            Arc::new(AudienceMeta {
                name: Arc::from(name),
                query: query.into(),
                description: String::new(),
                owner: String::new(),
                category: String::new(),
                uses: Vec::new(),
                created_ms: 0,
                updated_ms: 0,
            })
        };
        snap.audiences
            .insert(Arc::from("both"), audience("both", "a AND b"));
        snap.audiences
            .insert(Arc::from("either"), audience("either", "both OR NOT a"));
        let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        let text = ["either".to_string()];
        match count_inline(&text, &snap, false, now) {
            Ok(Counting::Done(n)) => assert_eq!(n, [1000]),
            _ => panic!("not counted inline"),
        }
        snap.audiences
            .insert(Arc::from("deep"), audience("deep", "either AND nope"));
        let deep = ["deep".to_string()];
        assert!(
            count_inline(&deep, &snap, false, now).is_err(),
            "an unknown tag inside"
        );
    }

    /// Dense tags cost per container, not per id: five of them over one
    /// shard (a 1M-customer store) are counted right on the async thread,
    /// two over ten shards are shared out.
    #[test]
    fn dense_counts_are_placed_by_their_containers() {
        use crate::bitmap::{SHARD_SIZE, ShardedBitmap};
        use roaring::RoaringBitmap;
        let tags = |n: u32, k: usize| -> Vec<(String, ShardedBitmap)> {
            (0..k)
                .map(|t| {
                    let b: RoaringBitmap = (0..n)
                        .filter(|i| (i + t as u32).is_multiple_of(2))
                        .collect();
                    (format!("d{t}"), ShardedBitmap::from_roaring(&b))
                })
                .collect()
        };
        let all = |n: u32| ShardedBitmap::from_roaring(&(0..n).collect());
        let now = 0;
        let small = Snapshot::in_memory(tags(1_000_000, 5), all(1_000_000));
        let five = ["d0 AND d1 AND d2 AND d3 AND d4".to_string()];
        assert!(matches!(
            count_inline(&five, &small, false, now),
            Ok(Counting::Done(_))
        ));
        let n = 10 * SHARD_SIZE;
        let large = Snapshot::in_memory(tags(n, 2), all(n));
        let two = ["d0 AND d1".to_string()];
        assert!(matches!(
            count_inline(&two, &large, false, now),
            Ok(Counting::Halves)
        ));
    }
}
