//! Evaluation of a parsed query over one snapshot.
//!
//! The expression is compiled into a [`Plan`] that borrows the snapshot's
//! bitmaps, then run shard by shard (2^20 ids at a time), so no intermediate
//! result is larger than one shard. The plan is cost-aware:
//! - `a AND b AND c` intersects from the smallest operand up and stops at the
//!   first empty shard;
//! - `a AND NOT b` is one difference; `NOT x` alone is `ALL AND NOT x`, and
//!   `ALL` is dropped from any AND that has another positive operand, so
//!   `NOT` never materialises the complement when it can be avoided;
//! - counts fuse the last operation (`and_cardinality`, `andnot_cardinality`,
//!   `or_cardinality`) instead of building the final bitmap;
//! - four or more dense operands are split into two halves that stay dense,
//!   then counted with one fused intersection;
//! - `x AND (big OR small)`, where one branch of the union dwarfs the others,
//!   is `(x AND big) OR (x AND small)`: the union, a copy of `big`, is never
//!   built;
//! - the count of `a AND b AND NOT s`, `s` tiny next to the tags, is
//!   `|a AND b|` (fused) less the few ids of `s` found in both;
//! - a field predicate after the first operand of an AND examines only the
//!   candidates left.
//!
//! The per-shard operations themselves are in `shard.rs`. Everything runs
//! on the shards' CRoaring bitmaps, whose vectorised
//! containers are several times faster than roaring-rs's (most for sparse
//! tags). The engine reads the snapshot and writes nothing.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::bitmap::{Bitmap, SHARD_SIZE, ShardedBitmap, shard_of, shard_start};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, QueryErrorKind, Result};
use crate::fields::bsi::{self, DenseCounter};
use crate::query::parser::{Expr, parse};
use crate::query::shard::{and_of, count_and, restrict, small_negatives};
use crate::storage::Snapshot;

/// The work of one dense container (a bitmap of up to 65,536 ids, used
/// when a tag holds 1/16 of a shard or more) in ids of array containers:
/// intersecting two of them costs about as much as 700 ids of sparse
/// tags. Measured with `cargo bench --bench query`: at 10M customers,
/// `d1 AND d2` (160 pairs of dense containers) took 33 µs and `s1 AND s2`
/// (20,000 ids of array containers) 6 µs.
const DENSE_CONTAINER_WORK: u64 = 700;

/// [`Plan::work`] of a stored bitmap: its ids when sparse, its containers
/// when dense.
fn leaf_work(b: &ShardedBitmap) -> u64 {
    let shards = b.shard_count() as u64;
    let containers = shards * u64::from(SHARD_SIZE >> 16);
    if b.len().saturating_mul(16) >= shards * u64::from(SHARD_SIZE) {
        b.len().min(containers * DENSE_CONTAINER_WORK)
    } else {
        b.len()
    }
}

/// Set once whoever asked for a count stops waiting for it (the call was
/// cancelled, or its deadline passed): the threads counting for it stop
/// at their next shard or query instead of finishing work no one reads.
#[derive(Debug, Clone, Default)]
pub struct Abandon(Arc<AtomicBool>);

impl Abandon {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// A guard that sets the flag when dropped: held by the future that
    /// waits for the count, it is dropped with it when the call goes.
    pub fn on_drop(&self) -> AbandonOnDrop {
        AbandonOnDrop(self.clone())
    }
}

/// Sets its [`Abandon`] when dropped.
#[derive(Debug)]
pub struct AbandonOnDrop(Abandon);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.set();
    }
}

/// Shards of one count shared out between threads ([`Query::count_claimed`]):
/// the next shard to take, how many are counted, and their total.
#[derive(Debug)]
pub struct ShardClaims {
    shards: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    sum: AtomicU64,
    /// Once set, no further shard is claimed (the total stays unknown).
    abandon: Abandon,
}

impl ShardClaims {
    /// Claims over shards `0..shards` (a query's [`Query::shard_count`]),
    /// until `abandon` is set.
    pub fn new(shards: usize, abandon: Abandon) -> Self {
        Self {
            shards,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sum: AtomicU64::new(0),
            abandon,
        }
    }

    /// True once no shard is left to claim: a thread that has not started
    /// need not compile the query.
    pub fn all_claimed(&self) -> bool {
        self.next.load(Ordering::Relaxed) >= self.shards
    }

    /// The count, once every shard has been counted; `None` while a shard
    /// is still being counted on some thread.
    pub fn total(&self) -> Option<u64> {
        (self.done.load(Ordering::Acquire) >= self.shards).then(|| self.sum.load(Ordering::Relaxed))
    }
}

/// A compiled query, borrowing the bitmaps of one snapshot.
#[derive(Debug)]
pub enum Plan<'s> {
    Empty,
    Leaf(&'s ShardedBitmap),
    /// Intersection of `pos` (ascending estimated size) minus every `neg`.
    And {
        pos: Vec<Plan<'s>>,
        neg: Vec<Plan<'s>>,
    },
    Or(Vec<Plan<'s>>),
    /// Customers whose integer value (offset binary) lies in `lo..=hi`,
    /// evaluated with the bit-sliced walk shard by shard.
    IntRange {
        slices: Box<IntSlices<'s>>,
        lo: u64,
        hi: u64,
    },
    /// Live customers whose number of days with a behaviour, over the given
    /// day buckets, lies in `lo..=hi` (bit-sliced addition, then the walk).
    DayCount {
        days: Vec<&'s ShardedBitmap>,
        lo: u64,
        hi: u64,
        live: &'s ShardedBitmap,
    },
}

/// The bitmaps of an integer field.
#[derive(Debug)]
pub struct IntSlices<'s> {
    /// The field's name (what [`ValueCache`] keys its values by).
    pub field: &'s str,
    pub exists: &'s ShardedBitmap,
    pub bits: [Option<&'s ShardedBitmap>; bsi::BITS],
}

impl<'s> IntSlices<'s> {
    fn shard_slices(&self, i: usize) -> [Option<&'s Bitmap>; bsi::BITS] {
        std::array::from_fn(|k| self.bits[k].and_then(|b| b.shard(i)))
    }
}

/// Candidates up to which a stored bitmap is probed id by id rather than
/// intersected (measured with `tagstore-bench rules`: 24 candidates
/// against a day bucket of 2,000 ids, a probe each took a third of the
/// intersection's time).
const PROBE_CANDIDATES: u64 = 64;

/// Candidates up to which an integer comparison reads each candidate's
/// value (once, into a [`ValueCache`]) instead of walking the bit slices.
const FEW_CANDIDATES: u64 = 4096;

/// Integer values of some customers, read from their fields' bit slices
/// once and shared by every rule evaluated for the same write (ten rules
/// over `total_spend_fen` read each touched customer's spend once). Valid
/// while the fields do not change: one write's rule evaluation.
#[derive(Default)]
pub struct ValueCache {
    /// Per field, per shard: each id read, with its offset-binary value
    /// (`None`: no value).
    values: std::cell::RefCell<hashbrown::HashMap<String, hashbrown::HashMap<usize, FieldValues>>>,
}

type FieldValues = hashbrown::HashMap<u32, Option<u64>>;

impl ValueCache {
    /// The ids of `within` whose value lies in `lo..=hi`.
    fn in_range(
        &self,
        slices: &IntSlices<'_>,
        i: usize,
        within: &Bitmap,
        lo: u64,
        hi: u64,
    ) -> Bitmap {
        let mut all = self.values.borrow_mut();
        if !all.contains_key(slices.field) {
            all.insert(slices.field.to_string(), Default::default());
        }
        let Some(by_shard) = all.get_mut(slices.field) else {
            return Bitmap::new();
        };
        let known = by_shard.entry(i).or_default();
        let missing: Vec<u32> = within.iter().filter(|id| !known.contains_key(id)).collect();
        if !missing.is_empty() {
            let m = Bitmap::of(&missing);
            let exists = slices.exists.shard(i).map(|e| &m & e).unwrap_or_default();
            let mut read: FieldValues = missing.iter().map(|&id| (id, None)).collect();
            for id in exists.iter() {
                read.insert(id, Some(0));
            }
            for (k, s) in slices.shard_slices(i).iter().enumerate() {
                if let Some(s) = s {
                    crate::bitmap::for_each_id(&(&exists & *s), |id| {
                        if let Some(Some(v)) = read.get_mut(&id) {
                            *v |= 1 << k;
                        }
                    });
                }
            }
            known.extend(read);
        }
        let hits: Vec<u32> = within
            .iter()
            .filter(|id| {
                known
                    .get(id)
                    .copied()
                    .flatten()
                    .is_some_and(|v| (lo..=hi).contains(&v))
            })
            .collect();
        Bitmap::of(&hits)
    }
}

/// The ids of `within` (a few, of shard `i`) found on `lo..=hi` of the
/// `days`: counted one candidate at a time (a counter per candidate, not
/// per id of the shard).
fn count_days_among(
    within: &Bitmap,
    days: &[&ShardedBitmap],
    i: usize,
    lo: u64,
    hi: u64,
) -> Bitmap {
    let ids: Vec<u32> = within.iter().collect();
    let mut counts = vec![0u64; ids.len()];
    let probe = ids.len() as u64 <= PROBE_CANDIDATES;
    for d in days {
        if let Some(s) = d.shard(i) {
            if probe {
                for (k, id) in ids.iter().enumerate() {
                    counts[k] += u64::from(s.contains(*id));
                }
            } else {
                crate::bitmap::for_each_id(&(within & s), |id| {
                    if let Ok(k) = ids.binary_search(&id) {
                        counts[k] += 1;
                    }
                });
            }
        }
    }
    let hits: Vec<u32> = ids
        .iter()
        .zip(&counts)
        .filter(|(_, n)| (lo..=hi).contains(*n))
        .map(|(id, _)| *id)
        .collect();
    Bitmap::of(&hits)
}

fn owned<'s>(b: Bitmap) -> Option<Cow<'s, Bitmap>> {
    (!b.is_empty()).then_some(Cow::Owned(b))
}

impl<'s> Plan<'s> {
    pub(super) fn is_pred(&self) -> bool {
        matches!(self, Plan::IntRange { .. } | Plan::DayCount { .. })
    }

    /// The members of shard `i` that are also in `within` (for predicates,
    /// which then only examine `within`).
    pub(super) fn eval_within(&self, i: usize, within: &Bitmap) -> Option<Cow<'s, Bitmap>> {
        match self {
            Plan::IntRange { slices, lo, hi } => {
                let exists = slices.exists.shard(i)?;
                let refs = slices.shard_slices(i);
                owned(bsi::range(within & exists, &refs, *lo, *hi))
            }
            Plan::DayCount { days, lo, hi, .. } => {
                // Few candidates: intersect each day first and count only
                // those; many: count whole days through a word mask.
                let sparse = within.cardinality() < u64::from(SHARD_SIZE / 1024);
                if sparse {
                    return owned(count_days_among(within, days, i, *lo, *hi));
                }
                let mask = (!sparse).then_some(within);
                let mut counter = DenseCounter::new(shard_start(i), SHARD_SIZE, mask);
                for d in days {
                    if let Some(s) = d.shard(i) {
                        if sparse {
                            counter.add(&(within & s));
                        } else {
                            counter.add(s);
                        }
                    }
                }
                let counts = counter.finish();
                let refs: Vec<Option<&Bitmap>> = counts.iter().map(Some).collect();
                owned(bsi::range(within.clone(), &refs, *lo, *hi))
            }
            other => {
                let s = other.eval(i)?;
                owned(within & &*s)
            }
        }
    }

    /// The members of shard `i` among `within`, every part of the plan
    /// examining only the candidates left (a rule re-evaluated for the few
    /// customers a write touched costs about those customers, not the
    /// shard).
    pub(crate) fn eval_among(
        &self,
        i: usize,
        within: &Bitmap,
        cache: &ValueCache,
    ) -> Option<Cow<'s, Bitmap>> {
        if within.is_empty() {
            return None;
        }
        match self {
            Plan::Empty => None,
            Plan::Leaf(b) => {
                let s = b.shard(i)?;
                if within.cardinality() <= PROBE_CANDIDATES {
                    // A handful: a look-up each beats building the
                    // intersection container by container.
                    let hits: Vec<u32> = within.iter().filter(|&id| s.contains(id)).collect();
                    owned(Bitmap::of(&hits))
                } else {
                    owned(within & s)
                }
            }
            Plan::IntRange { slices, lo, hi } if within.cardinality() <= FEW_CANDIDATES => {
                owned(cache.in_range(slices, i, within, *lo, *hi))
            }
            Plan::IntRange { .. } | Plan::DayCount { .. } => self.eval_within(i, within),
            Plan::And { pos, neg } => {
                let (first, rest) = pos.split_first()?;
                let mut left = first.eval_among(i, within, cache)?;
                for p in rest {
                    left = p.eval_among(i, &left, cache)?;
                }
                for n in neg {
                    if let Some(out) = n.eval_among(i, &left, cache) {
                        left = owned(&*left - &*out)?;
                    }
                }
                Some(left)
            }
            Plan::Or(items) => {
                let parts: Vec<Cow<'s, Bitmap>> = items
                    .iter()
                    .filter_map(|p| p.eval_among(i, within, cache))
                    .collect();
                let refs: Vec<&Bitmap> = parts.iter().map(|c| &**c).collect();
                match refs.len() {
                    0 => None,
                    1 => Some(parts.into_iter().next()?),
                    _ => owned(Bitmap::fast_or(&refs)),
                }
            }
        }
    }

    pub(super) fn estimate(&self) -> u64 {
        match self {
            Plan::Empty => 0,
            Plan::IntRange { slices, .. } => slices.exists.len(),
            Plan::DayCount { days, lo, live, .. } => {
                if *lo == 0 {
                    live.len()
                } else {
                    days.iter()
                        .map(|d| d.len())
                        .fold(0, u64::saturating_add)
                        .min(live.len())
                }
            }
            Plan::Leaf(b) => b.len(),
            Plan::And { pos, .. } => pos.iter().map(Plan::estimate).min().unwrap_or(0),
            Plan::Or(items) => items
                .iter()
                .map(Plan::estimate)
                .fold(0, u64::saturating_add),
        }
    }

    /// An estimate of the work of evaluation, in ids of sparse (array)
    /// containers: the sum of the leaves' work, except that an
    /// intersection of stored bitmaps costs about its smallest operand per
    /// operand (CRoaring probes the smaller container into the larger one,
    /// or gallops through it). A dense leaf costs per container, not per id
    /// ([`DENSE_CONTAINER_WORK`]).
    fn work(&self) -> u64 {
        if let Plan::And { pos, neg } = self
            && self.stored_only()
        {
            let smallest = pos.iter().map(Plan::work).min().unwrap_or(0);
            let driven = smallest.saturating_mul((pos.len() + neg.len()) as u64);
            let total = pos
                .iter()
                .chain(neg)
                .map(Plan::work)
                .fold(0, u64::saturating_add);
            return driven.min(total);
        }
        match self {
            Plan::Empty => 0,
            Plan::IntRange { slices, .. } => slices
                .bits
                .iter()
                .flatten()
                .map(|b| b.len())
                .fold(slices.exists.len(), u64::saturating_add),
            Plan::DayCount { days, live, .. } => days
                .iter()
                .map(|d| d.len())
                .fold(live.len(), u64::saturating_add),
            Plan::Leaf(b) => leaf_work(b),
            Plan::And { pos, neg } => pos
                .iter()
                .chain(neg)
                .map(Plan::work)
                .fold(0, u64::saturating_add),
            Plan::Or(items) => items.iter().map(Plan::work).fold(0, u64::saturating_add),
        }
    }

    fn shard_count(&self) -> usize {
        match self {
            Plan::Empty => 0,
            Plan::IntRange { slices, .. } => slices.exists.shard_count(),
            Plan::DayCount { days, lo, live, .. } => {
                if *lo == 0 {
                    live.shard_count()
                } else {
                    days.iter().map(|d| d.shard_count()).max().unwrap_or(0)
                }
            }
            Plan::Leaf(b) => b.shard_count(),
            Plan::And { pos, .. } => pos.iter().map(Plan::shard_count).min().unwrap_or(0),
            Plan::Or(items) => items.iter().map(Plan::shard_count).max().unwrap_or(0),
        }
    }

    /// True for a tag with at least 1/16 of shard `i`'s ids: its containers
    /// are mostly bitmaps there.
    pub(super) fn dense_in(&self, i: usize) -> bool {
        matches!(self, Plan::Leaf(b) if b.shard(i).is_some_and(|s| s.cardinality() >= u64::from(SHARD_SIZE / 16)))
    }

    fn is_leaf(&self, b: &ShardedBitmap) -> bool {
        matches!(self, Plan::Leaf(x) if std::ptr::eq(*x, b))
    }

    /// The members of shard `i`; `None` when there are none.
    pub fn eval(&self, i: usize) -> Option<Cow<'s, Bitmap>> {
        match self {
            Plan::Empty => None,
            Plan::IntRange { slices, lo, hi } => {
                let exists = slices.exists.shard(i)?.clone();
                owned(bsi::range(exists, &slices.shard_slices(i), *lo, *hi))
            }
            Plan::DayCount { days, lo, hi, live } => {
                // Every day bucket is a subset of both candidate sets below,
                // so the counters need no filtering.
                let mut counter = DenseCounter::new(shard_start(i), SHARD_SIZE, None);
                for d in days {
                    if let Some(s) = d.shard(i) {
                        counter.add(s);
                    }
                }
                let (counts, within) = if *lo == 0 {
                    (counter.finish(), live.shard(i)?.clone())
                } else {
                    counter.finish_with_any()
                };
                let refs: Vec<Option<&Bitmap>> = counts.iter().map(Some).collect();
                owned(bsi::range(within, &refs, *lo, *hi))
            }
            Plan::Leaf(b) => b.shard(i).map(Cow::Borrowed),
            Plan::And { pos, neg } => and_of(
                &pos.iter().collect::<Vec<_>>(),
                &neg.iter().collect::<Vec<_>>(),
                i,
            ),
            Plan::Or(items) => {
                let mut parts: Vec<Cow<'s, Bitmap>> =
                    items.iter().filter_map(|p| p.eval(i)).collect();
                if parts.len() <= 1 {
                    return parts.pop();
                }
                let refs: Vec<&Bitmap> = parts.iter().map(|c| &**c).collect();
                Some(Cow::Owned(Bitmap::fast_or(&refs)))
            }
        }
    }

    /// True when the plan reads stored bitmaps only (tags and `ALL`, no
    /// field predicates): its cost follows the sizes of those bitmaps.
    pub fn stored_only(&self) -> bool {
        match self {
            Plan::Empty | Plan::Leaf(_) => true,
            Plan::And { pos, neg } => pos.iter().chain(neg).all(Plan::stored_only),
            Plan::Or(items) => items.iter().all(Plan::stored_only),
            Plan::IntRange { .. } | Plan::DayCount { .. } => false,
        }
    }

    /// The number of members in shard `i`, the last operation fused into a
    /// count (`and_cardinality`, `andnot_cardinality`, `or_cardinality`)
    /// instead of building the final bitmap.
    pub fn count(&self, i: usize) -> u64 {
        match self {
            Plan::And { pos, neg } => match neg.split_last() {
                None => count_and(pos, i),
                Some(_) if small_negatives(pos, neg) => {
                    // |P AND NOT N| = |P| - |P AND N|: P counted fused, and
                    // P AND N worked out from the few ids of N up.
                    let mut few = Bitmap::new();
                    for n in neg {
                        if let Some(s) = n.eval(i) {
                            few.or_inplace(&s);
                        }
                    }
                    if few.is_empty() {
                        return count_and(pos, i);
                    }
                    let hit = pos.iter().fold(few, |acc, p| restrict(p, acc, i));
                    count_and(pos, i) - hit.cardinality()
                }
                Some((last, init)) => match (
                    and_of(
                        &pos.iter().collect::<Vec<_>>(),
                        &init.iter().collect::<Vec<_>>(),
                        i,
                    ),
                    last.eval(i),
                ) {
                    (Some(acc), Some(l)) => acc.andnot_cardinality(&l),
                    (Some(acc), None) => acc.cardinality(),
                    (None, _) => 0,
                },
            },
            Plan::Or(items) if items.len() == 2 => match (items[0].eval(i), items[1].eval(i)) {
                (Some(a), Some(b)) => a.or_cardinality(&b),
                (Some(a), None) | (None, Some(a)) => a.cardinality(),
                (None, None) => 0,
            },
            Plan::Leaf(b) => b.shard(i).map_or(0, Bitmap::cardinality),
            _ => self.eval(i).map_or(0, |b| b.cardinality()),
        }
    }
}

pub(crate) struct Compiler<'s> {
    pub snap: &'s Snapshot,
    pub live: &'s ShardedBitmap,
    /// The time "today" and WITHIN windows are taken at, Unix milliseconds.
    pub now_ms: i64,
    /// The zone whose local day `TODAY` is (a behaviour field's windows
    /// use the field's own zone).
    pub zone: jiff::tz::TimeZone,
    /// Saved audiences being compiled, outermost first (a guard: the store
    /// refuses an audience that uses itself).
    pub within: std::cell::RefCell<Vec<String>>,
    /// Saved audiences expanded so far (an audience named twice is
    /// expanded twice).
    pub expanded: std::cell::Cell<usize>,
}

/// Most saved audiences one inside another a query may reach.
pub const MAX_AUDIENCE_DEPTH: usize = 32;
/// Most saved audiences one query may expand in all (audiences that each
/// use the one before twice would otherwise double the work at each step).
pub const MAX_AUDIENCE_EXPANSIONS: usize = 10_000;

impl<'s> Compiler<'s> {
    pub fn new(snap: &'s Snapshot, now_ms: i64, zone: &jiff::tz::TimeZone) -> Result<Self> {
        Ok(Compiler {
            snap,
            live: snap.live()?,
            now_ms,
            zone: zone.clone(),
            within: Default::default(),
            expanded: Default::default(),
        })
    }

    pub fn leaf(&self, b: &'s ShardedBitmap) -> Plan<'s> {
        if b.is_empty() {
            Plan::Empty
        } else {
            Plan::Leaf(b)
        }
    }

    /// A saved audience named at `pos`: its query, compiled here. An error
    /// in it says which audience, at the position where it was named.
    fn audience(&self, name: &str, query: &str, pos: usize) -> Result<Plan<'s>> {
        {
            let within = self.within.borrow();
            if within.len() >= MAX_AUDIENCE_DEPTH || within.iter().any(|w| w == name) {
                return Err(Error::Query {
                    kind: QueryErrorKind::Type,
                    position: pos,
                    message: format!(
                        "saved audience {name:?} reaches itself or more than {MAX_AUDIENCE_DEPTH} audiences deep: {} → {name}",
                        within.join(" → ")
                    ),
                });
            }
        }
        let expanded = self.expanded.get() + 1;
        if expanded > MAX_AUDIENCE_EXPANSIONS {
            return Err(Error::Query {
                kind: QueryErrorKind::Type,
                position: pos,
                message: format!(
                    "the query expands more than {MAX_AUDIENCE_EXPANSIONS} saved audiences"
                ),
            });
        }
        self.expanded.set(expanded);
        self.within.borrow_mut().push(name.to_string());
        let plan = parse(query).and_then(|e| self.compile(&e));
        self.within.borrow_mut().pop();
        plan.map_err(|e| match e {
            Error::Query { kind, message, .. } => Error::Query {
                kind,
                position: pos,
                message: format!("in saved audience {name:?}: {message}"),
            },
            other => other,
        })
    }

    fn compile(&self, e: &Expr) -> Result<Plan<'s>> {
        Ok(match e {
            Expr::Tag { name, pos } => match self.snap.tag(name) {
                Some(tag) => self.leaf(tag.bitmap.get()?),
                None => match self.snap.audiences.get(name.as_str()) {
                    Some(a) => self.audience(&a.name, &a.query, *pos)?,
                    None => self.bare_field(name, *pos)?,
                },
            },
            Expr::Pred { field, pos, pred } => self.predicate(field, *pos, pred)?,
            Expr::All => self.leaf(self.live),
            Expr::Snapshot { id, pos } => match self.snap.snapshots.get(id) {
                Some(s) => self.leaf(s.members.get()?),
                None => {
                    return Err(Error::Query {
                        kind: QueryErrorKind::UnknownTag,
                        position: *pos,
                        message: format!("no audience snapshot {id}"),
                    });
                }
            },
            Expr::Not(inner) => match &**inner {
                Expr::Not(x) => self.compile(x)?,
                other => self.and_of(Vec::new(), vec![self.compile(other)?]),
            },
            Expr::And(items) => {
                let (mut pos, mut neg) = (Vec::new(), Vec::new());
                for item in items {
                    match item {
                        Expr::Not(x) if !matches!(**x, Expr::Not(_)) => neg.push(self.compile(x)?),
                        other => match self.compile(other)? {
                            Plan::And { pos: p, neg: n } => {
                                pos.extend(p);
                                neg.extend(n);
                            }
                            plan => pos.push(plan),
                        },
                    }
                }
                self.and_of(pos, neg)
            }
            Expr::Or(items) => {
                let mut out = Vec::new();
                for item in items {
                    match self.compile(item)? {
                        Plan::Or(inner) => out.extend(inner),
                        Plan::Empty => {}
                        plan => out.push(plan),
                    }
                }
                if out.iter().any(|p| p.is_leaf(self.live)) {
                    return Ok(self.leaf(self.live));
                }
                match out.len() {
                    0 => Plan::Empty,
                    1 => out.remove(0),
                    _ => Plan::Or(out),
                }
            }
        })
    }

    pub fn and_of(&self, mut pos: Vec<Plan<'s>>, mut neg: Vec<Plan<'s>>) -> Plan<'s> {
        if pos.iter().any(|p| matches!(p, Plan::Empty)) {
            return Plan::Empty;
        }
        neg.retain(|n| !matches!(n, Plan::Empty));
        if neg.iter().any(|n| n.is_leaf(self.live)) {
            return Plan::Empty;
        }
        if pos.len() > 1 {
            // Every tag member is live, so ALL adds nothing beside another operand.
            pos.retain(|p| !p.is_leaf(self.live));
        }
        if pos.is_empty() {
            if self.live.is_empty() {
                return Plan::Empty;
            }
            pos.push(Plan::Leaf(self.live));
        }
        pos.sort_by_key(Plan::estimate);
        if pos.len() == 1 && neg.is_empty() {
            return pos.remove(0);
        }
        Plan::And { pos, neg }
    }
}

/// Every tag and field name `expr` reaches, through the saved audiences it
/// names (whose own names are not listed, unless one is kept current: then
/// its rule tag is listed as well as what its query reaches, since the
/// query reads the tag, which holds what the tags under it say), appended
/// to `names`, and every
/// audience snapshot it reaches to `snapshots`; false if it reaches more
/// audiences than a query may expand, or one whose query does not parse
/// (compiling the query will say why).
pub fn names_reached(
    expr: &Expr,
    snap: &Snapshot,
    names: &mut Vec<String>,
    snapshots: &mut Vec<u32>,
) -> bool {
    fn walk(
        expr: &Expr,
        snap: &Snapshot,
        names: &mut Vec<String>,
        snapshots: &mut Vec<u32>,
        depth: usize,
        expanded: &mut usize,
    ) -> bool {
        expr.snapshot_ids(snapshots);
        let mut direct = Vec::new();
        expr.tag_names(&mut direct);
        for n in direct {
            match snap.audiences.get(n) {
                Some(a) => {
                    if snap.tag(n).is_some() {
                        names.push(n.to_string());
                    }
                    *expanded += 1;
                    if depth >= MAX_AUDIENCE_DEPTH || *expanded > MAX_AUDIENCE_EXPANSIONS {
                        return false;
                    }
                    let Ok(inner) = parse(&a.query) else {
                        return false;
                    };
                    if !walk(&inner, snap, names, snapshots, depth + 1, expanded) {
                        return false;
                    }
                }
                None => names.push(n.to_string()),
            }
        }
        true
    }
    walk(expr, snap, names, snapshots, 0, &mut 0)
}

/// The saved audiences `expr` names (not counting those they use in turn),
/// ordered, each once; an audience kept current counts although its name
/// also finds its rule tag.
pub fn saved_audiences_in(expr: &Expr, snap: &Snapshot) -> Vec<String> {
    let mut names = Vec::new();
    expr.tag_names(&mut names);
    let mut out: Vec<String> = names
        .into_iter()
        .filter(|n| snap.audiences.contains_key(*n))
        .map(str::to_string)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A query compiled against one snapshot.
pub struct Query<'s> {
    pub(crate) plan: Plan<'s>,
    shards: usize,
}

impl<'s> Query<'s> {
    /// Parses and compiles `text`, with "today" taken from the system clock.
    /// Unknown tags are errors with their position. For tools and tests: the
    /// server passes the engine's clock to [`Query::compile_at`].
    pub fn compile(text: &str, snap: &'s Snapshot) -> Result<Self> {
        let expr = parse(text)?;
        Self::from_expr_at(&expr, snap, Clock::now_ms(&SystemClock))
    }

    /// Parses and compiles `text` with "today" taken at `now_ms` (Unix ms).
    pub fn compile_at(text: &str, snap: &'s Snapshot, now_ms: i64) -> Result<Self> {
        Self::from_expr_at(&parse(text)?, snap, now_ms)
    }

    pub fn from_expr_at(expr: &Expr, snap: &'s Snapshot, now_ms: i64) -> Result<Self> {
        Self::from_expr_in(expr, snap, now_ms, &snap.zone)
    }

    /// Compiles `expr` with "today" taken at `now_ms`, `TODAY` being the
    /// local day in `zone` (a rule's zone; a behaviour field's windows keep
    /// their field's).
    pub fn from_expr_in(
        expr: &Expr,
        snap: &'s Snapshot,
        now_ms: i64,
        zone: &jiff::tz::TimeZone,
    ) -> Result<Self> {
        let c = Compiler::new(snap, now_ms, zone)?;
        let plan = c.compile(expr)?;
        let shards = plan.shard_count();
        Ok(Self { plan, shards })
    }

    pub fn plan(&self) -> &Plan<'s> {
        &self.plan
    }

    /// An upper bound of the ids evaluating the query touches.
    pub fn work(&self) -> u64 {
        self.plan.work()
    }

    /// Number of members.
    pub fn count(&self) -> u64 {
        (0..self.shards).map(|i| self.plan.count(i)).sum()
    }

    /// [`Query::count`], shard by shard, until `abandon` is set (`None`
    /// then).
    pub fn count_until(&self, abandon: &Abandon) -> Option<u64> {
        let mut sum = 0;
        for i in 0..self.shards {
            if abandon.is_set() {
                return None;
            }
            sum += self.plan.count(i);
        }
        Some(sum)
    }

    /// Counts the shards it claims from `claims` one at a time, until none
    /// is left, adding each to the shared total. Several threads may count
    /// the same query this way, each with its own compiled copy: whichever
    /// is free takes the next shard, so a thread that starts late (a woken
    /// pool thread) simply takes fewer, instead of the whole count waiting
    /// for its fixed half.
    pub fn count_claimed(&self, claims: &ShardClaims) {
        loop {
            if claims.abandon.is_set() {
                return;
            }
            let i = claims.next.fetch_add(1, Ordering::Relaxed);
            if i >= claims.shards {
                return;
            }
            let n = if i < self.shards {
                self.plan.count(i)
            } else {
                0
            };
            claims.sum.fetch_add(n, Ordering::Relaxed);
            claims.done.fetch_add(1, Ordering::Release);
        }
    }

    /// Up to `limit` member ids greater than `after`, ascending, and whether
    /// more follow.
    pub fn page(&self, after: Option<u32>, limit: usize) -> (Vec<u32>, bool) {
        self.page_until(after, limit, &Abandon::default())
            .unwrap_or_default()
    }

    /// [`Query::page`], shard by shard until `abandon` is set (`None` then):
    /// a sparse query may walk every shard to fill a page.
    pub fn page_until(
        &self,
        after: Option<u32>,
        limit: usize,
        abandon: &Abandon,
    ) -> Option<(Vec<u32>, bool)> {
        let from = match after {
            None => 0,
            Some(u32::MAX) => return Some((Vec::new(), false)),
            Some(a) => a + 1,
        };
        let mut out = Vec::with_capacity(limit.min(1 << 16));
        for i in shard_of(from)..self.shards {
            if abandon.is_set() {
                return None;
            }
            let Some(members) = self.plan.eval(i) else {
                continue;
            };
            let lo = from.max(shard_start(i));
            let mut it = members.iter();
            it.reset_at_or_after(lo);
            for id in it {
                if out.len() == limit {
                    return Some((out, true));
                }
                out.push(id);
            }
        }
        Some((out, false))
    }

    /// The members among `candidates`, evaluated only there; integer
    /// values of a few candidates are read once into `cache` and shared by
    /// every query evaluated with it.
    pub fn members_among(&self, candidates: &ShardedBitmap, cache: &ValueCache) -> ShardedBitmap {
        let mut out = ShardedBitmap::new();
        for i in 0..candidates.shard_count() {
            if let Some(c) = candidates.shard(i)
                && let Some(m) = self.plan.eval_among(i, c, cache)
            {
                out.set_shard(i, m.into_owned());
            }
        }
        out
    }

    /// Every member.
    pub fn members(&self) -> ShardedBitmap {
        let mut out = ShardedBitmap::new();
        for i in 0..self.shards {
            if let Some(m) = self.plan.eval(i) {
                out.set_shard(i, m.into_owned());
            }
        }
        out
    }

    /// How many shards evaluation visits.
    pub fn shard_count(&self) -> usize {
        self.shards
    }

    /// The members in shard `i`.
    pub fn shard(&self, i: usize) -> Option<Cow<'s, Bitmap>> {
        self.plan.eval(i)
    }

    /// Calls `f` with each non-empty shard's members, in id order, until it returns false.
    pub fn for_each_shard(&self, mut f: impl FnMut(&Bitmap) -> bool) {
        for i in 0..self.shards {
            if let Some(members) = self.plan.eval(i)
                && !f(&members)
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::shard::{dense_halves, lopsided};
    use rand::rngs::StdRng;

    /// The split keeps both halves as dense as any split can.
    #[test]
    fn dense_halves_keep_both_sides_above_the_array_line() {
        let n = SHARD_SIZE;
        let tags: Vec<(String, ShardedBitmap)> = [50u32, 45, 40, 35, 30]
            .iter()
            .map(|pct| {
                let keep = |id: &u32| (id.wrapping_mul(2_654_435_761) % 100) < *pct;
                let b: RoaringBitmap = (0..n).filter(keep).collect();
                (format!("t{pct}"), ShardedBitmap::from_roaring(&b))
            })
            .collect();
        let plans: Vec<Plan> = tags.iter().map(|(_, b)| Plan::Leaf(b)).collect();
        let (l, r) = dense_halves(&plans, 0);
        assert_eq!(l.len() + r.len(), 5);
        let product = |side: &[&Plan]| -> f64 {
            side.iter()
                .map(|p| p.estimate() as f64 / f64::from(n))
                .product()
        };
        let worst = product(&l).min(product(&r));
        assert!(worst > 0.07, "the weaker half is {worst}");
    }
    use rand::{Rng, SeedableRng};
    use roaring::RoaringBitmap;

    /// Counts over dense and sparse tags (taking the balanced and the chained
    /// paths) agree with flat roaring arithmetic.
    #[test]
    fn counts_match_flat_roaring_for_dense_and_sparse_operands() {
        let mut rng = StdRng::seed_from_u64(9);
        let n = 3 * SHARD_SIZE;
        let densities = [0.6, 0.5, 0.45, 0.4, 0.35, 0.002, 0.05];
        let flats: Vec<RoaringBitmap> = densities
            .iter()
            .map(|d| (0..n).filter(|_| rng.random_bool(*d)).collect())
            .collect();
        let names = ["a", "b", "c", "d", "e", "s", "m"];
        let tags = names
            .iter()
            .zip(&flats)
            .map(|(n, f)| (n.to_string(), ShardedBitmap::from_roaring(f)))
            .collect();
        let mut all = RoaringBitmap::new();
        all.insert_range(0..n);
        let snap = Snapshot::in_memory(tags, ShardedBitmap::from_roaring(&all));
        let f = |name: &str| &flats[names.iter().position(|x| *x == name).unwrap()];
        let and = |xs: &[&str]| {
            xs.iter()
                .skip(1)
                .fold(f(xs[0]).clone(), |acc, x| acc & f(x))
        };
        // Which unions count as lopsided: a 60% tag OR a 0.2% one is; OR a
        // 5% one (more than 1/16 of 60%) is not.
        let plan_of = |q: &str| Query::compile(q, &snap).unwrap();
        assert!(lopsided(plan_of("a OR s").plan()).is_some());
        assert!(lopsided(plan_of("a OR m").plan()).is_none());
        assert!(lopsided(plan_of("a AND s").plan()).is_none());
        // Which negated operands are small enough to subtract.
        let small = |q: &str| match plan_of(q).plan() {
            Plan::And { pos, neg } => small_negatives(pos, neg),
            _ => panic!("{q} is not an intersection"),
        };
        assert!(small("a AND b AND NOT s"));
        assert!(
            !small("a AND NOT s"),
            "one tag: andnot_cardinality already subtracts"
        );
        assert!(!small("a AND b AND NOT m"));
        assert!(!small("s AND b AND NOT a"));
        for (q, expect) in [
            ("a AND b", and(&["a", "b"]).len()),
            ("s AND m", and(&["s", "m"]).len()),
            ("a AND NOT s", (f("a") - f("s")).len()),
            ("s AND NOT a", (f("s") - f("a")).len()),
            ("a OR s", (f("a") | f("s")).len()),
            ("a OR s OR m", (f("a") | f("s") | f("m")).len()),
            ("NOT a", n as u64 - f("a").len()),
            ("(a OR s) AND b", ((f("a") | f("s")) & f("b")).len()),
            (
                "m AND (a OR s) AND NOT (b OR c)",
                ((f("m") & (f("a") | f("s"))) - (f("b") | f("c"))).len(),
            ),
            ("s AND m AND NOT a", (and(&["s", "m"]) - f("a")).len()),
            // Intersections with a union whose one branch dwarfs the others.
            ("m AND (a OR s)", (f("m") & (f("a") | f("s"))).len()),
            ("(b OR s) AND a", ((f("b") | f("s")) & f("a")).len()),
            (
                "(a OR s) AND b AND NOT c",
                (((f("a") | f("s")) & f("b")) - f("c")).len(),
            ),
            (
                "(b OR s) AND (a OR s) AND NOT m",
                (((f("b") | f("s")) & (f("a") | f("s"))) - f("m")).len(),
            ),
            (
                "s AND (a OR m OR b)",
                (f("s") & (f("a") | f("m") | f("b"))).len(),
            ),
            // Negated operands small enough to subtract.
            ("a AND b AND NOT s", (and(&["a", "b"]) - f("s")).len()),
            ("NOT s", n as u64 - f("s").len()),
            (
                "a AND b AND c AND d AND NOT s",
                (and(&["a", "b", "c", "d"]) - f("s")).len(),
            ),
            (
                "a AND (b OR s) AND NOT (s AND m)",
                ((f("a") & (f("b") | f("s"))) - (f("s") & f("m"))).len(),
            ),
            (
                "(a OR s) AND NOT s AND NOT (s AND b)",
                ((f("a") | f("s")) - f("s")).len(),
            ),
            ("a AND b AND c AND d", and(&["a", "b", "c", "d"]).len()),
            (
                "a AND b AND c AND d AND e",
                and(&["a", "b", "c", "d", "e"]).len(),
            ),
            ("s AND a AND b AND c", and(&["s", "a", "b", "c"]).len()),
            (
                "m AND a AND b AND c AND d",
                and(&["m", "a", "b", "c", "d"]).len(),
            ),
            (
                "a AND b AND c AND d AND NOT e",
                (and(&["a", "b", "c", "d"]) - f("e")).len(),
            ),
        ] {
            let query = Query::compile(q, &snap).unwrap();
            assert_eq!(query.count(), expect, "{q}");
            // Shared out between this thread and another, shard by shard.
            let claims = ShardClaims::new(query.shard_count(), Abandon::default());
            assert_eq!(claims.total(), None, "{q}: nothing counted yet");
            std::thread::scope(|s| {
                s.spawn(|| Query::compile(q, &snap).unwrap().count_claimed(&claims));
                query.count_claimed(&claims);
            });
            assert!(claims.all_claimed());
            assert_eq!(claims.total(), Some(expect), "{q} on two threads");
            // A thread that comes late finds nothing left and changes nothing.
            query.count_claimed(&claims);
            assert_eq!(claims.total(), Some(expect), "{q} after a late thread");
            let mut listed = 0;
            query.for_each_shard(|b| {
                listed += b.cardinality();
                true
            });
            assert_eq!(listed, expect, "{q} listed");
            // Abandoned (the caller went): no further shard is taken, and
            // the total stays unknown rather than short.
            let abandon = Abandon::default();
            let claims = ShardClaims::new(query.shard_count(), abandon.clone());
            drop(abandon.on_drop());
            query.count_claimed(&claims);
            assert!(
                !claims.all_claimed(),
                "{q}: a shard taken after the caller went"
            );
            assert_eq!(claims.total(), None, "{q}: abandoned");
            assert_eq!(query.page_until(None, 10, &abandon), None, "{q}: a page");
        }
    }
}
