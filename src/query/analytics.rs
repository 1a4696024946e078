//! Audience analytics over one snapshot: aggregates of an integer field,
//! breakdowns by enumerated value or by the tags of a category, the tags
//! most over-represented in an audience, and pairwise overlaps of queries.
//! Everything runs shard by shard on bitmaps (bit-sliced sums and
//! comparisons, fused intersection counts); nothing visits customers one by
//! one, and nothing is written. Each stops before its next shard once its
//! caller has gone ([`Abandon`]).

use std::borrow::Cow;
use std::collections::HashSet;

use crate::bitmap::Bitmap;

use crate::error::{Error, Result};
use crate::fields::{FieldKind, INT_EXISTS, bsi, int_slot};
use crate::query::eval::{Abandon, Query};
use crate::storage::{Field, Snapshot, Tag};

/// Most bucket edges of a histogram.
pub const MAX_HISTOGRAM_EDGES: usize = 256;
/// Most queries of one overlap matrix.
pub const MAX_OVERLAP_QUERIES: usize = 20;

/// Figures of an integer field over an audience.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregate {
    /// Members of the audience.
    pub members: u64,
    /// Members with a value (the others are NULL and take no part below).
    pub with_value: u64,
    pub sum: i128,
    pub min: Option<i64>,
    pub max: Option<i64>,
    /// With edges `e0 < e1 < … < en`: counts of `< e0`, `[e0, e1)`, …, `>= en`.
    pub histogram: Vec<u64>,
}

impl Aggregate {
    pub fn mean(&self) -> Option<f64> {
        (self.with_value > 0).then(|| self.sum as f64 / self.with_value as f64)
    }
}

fn int_field(field: &Field) -> Result<&Field> {
    match field.meta.kind {
        FieldKind::Int => Ok(field),
        ref k => Err(Error::invalid(format!(
            "{:?} is {} field; aggregates need an integer field",
            &*field.meta.name,
            k.name()
        ))),
    }
}

/// Sum, min, max, mean and histogram of an integer field over `q`'s members.
pub fn aggregate(q: &Query, field: &Field, edges: &[i64], abandon: &Abandon) -> Result<Aggregate> {
    let field = int_field(field)?;
    if edges.len() > MAX_HISTOGRAM_EDGES {
        return Err(Error::invalid(format!(
            "{} histogram edges; the limit is {MAX_HISTOGRAM_EDGES}",
            edges.len()
        )));
    }
    if edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::invalid(
            "histogram edges must be strictly increasing",
        ));
    }
    let exists = field.slot(INT_EXISTS)?;
    let mut bits = [None; bsi::BITS];
    for (k, b) in bits.iter_mut().enumerate() {
        *b = field.slot(int_slot(k))?;
    }
    let mut out = Aggregate {
        histogram: if edges.is_empty() {
            Vec::new()
        } else {
            vec![0; edges.len() + 1]
        },
        ..Default::default()
    };
    let mut sum_encoded: u128 = 0;
    let (mut lo, mut hi): (Option<u64>, Option<u64>) = (None, None);
    for i in 0..q.shard_count() {
        stop_if(abandon)?;
        let Some(members) = q.shard(i) else { continue };
        out.members += members.cardinality();
        let Some(ex) = exists.and_then(|e| e.shard(i)) else {
            continue;
        };
        let within = &*members & ex;
        if within.is_empty() {
            continue;
        }
        out.with_value += within.cardinality();
        let refs: [Option<&Bitmap>; bsi::BITS] =
            std::array::from_fn(|k| bits[k].and_then(|b| b.shard(i)));
        sum_encoded += bsi::sum_encoded(&within, &refs);
        if let Some(m) = bsi::min(&within, &refs) {
            lo = Some(lo.map_or(m, |x| x.min(m)));
        }
        if let Some(m) = bsi::max(&within, &refs) {
            hi = Some(hi.map_or(m, |x| x.max(m)));
        }
        // below[j] = members with value < edges[j]
        let mut prev = 0u64;
        for (j, &e) in edges.iter().enumerate() {
            let below = if e == i64::MIN {
                0
            } else {
                bsi::le(within.clone(), &refs, bsi::encode(e - 1)).cardinality()
            };
            out.histogram[j] += below - prev;
            prev = below;
        }
        if !edges.is_empty() {
            out.histogram[edges.len()] += within.cardinality() - prev;
        }
    }
    out.sum = sum_encoded as i128 - (i128::from(out.with_value as i64) << 63);
    out.min = lo.map(bsi::decode);
    out.max = hi.map(bsi::decode);
    Ok(out)
}

/// `Error::Abandoned` once `abandon` is set: checked before each shard, so
/// that work for a caller who left stops within a shard.
fn stop_if(abandon: &Abandon) -> Result<()> {
    if abandon.is_set() {
        return Err(Error::Abandoned);
    }
    Ok(())
}

/// Intersection sizes of `q`'s members with each of `targets`.
fn counts_against(
    q: &Query,
    targets: &[&crate::bitmap::ShardedBitmap],
    abandon: &Abandon,
) -> Result<(u64, Vec<u64>)> {
    let mut total = 0;
    let mut counts = vec![0u64; targets.len()];
    for i in 0..q.shard_count() {
        stop_if(abandon)?;
        let Some(members) = q.shard(i) else { continue };
        total += members.cardinality();
        for (c, t) in counts.iter_mut().zip(targets) {
            if let Some(s) = t.shard(i) {
                *c += members.and_cardinality(s);
            }
        }
    }
    Ok((total, counts))
}

/// One row of a breakdown.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub label: String,
    pub count: u64,
}

/// Counts of `q`'s members per value of an enumerated field, in declared
/// order; returns the rows, the members with no value, and the total.
pub fn breakdown_by_field(
    q: &Query,
    field: &Field,
    abandon: &Abandon,
) -> Result<(Vec<Share>, u64, u64)> {
    let FieldKind::Enum { values } = &field.meta.kind else {
        return Err(Error::invalid(format!(
            "{:?} is {} field; a breakdown needs an enumerated field (or a tag category)",
            &*field.meta.name,
            field.meta.kind.name()
        )));
    };
    let empty = crate::bitmap::ShardedBitmap::new();
    let mut targets = Vec::with_capacity(values.len());
    for slot in 0..values.len() as u32 {
        targets.push(field.slot(slot)?.unwrap_or(&empty));
    }
    let (total, counts) = counts_against(q, &targets, abandon)?;
    let with: u64 = counts.iter().sum();
    let rows = values
        .iter()
        .zip(counts)
        .map(|(v, count)| Share {
            label: v.clone(),
            count,
        })
        .collect();
    Ok((rows, total - with, total))
}

/// Counts of `q`'s members per tag of `tags` (a page of a category's
/// tags, as the caller picked them); returns the rows, in the order given,
/// and the total.
pub fn breakdown_by_tags(q: &Query, tags: &[&Tag], abandon: &Abandon) -> Result<(Vec<Share>, u64)> {
    let mut targets = Vec::with_capacity(tags.len());
    for t in tags {
        targets.push(t.bitmap.get()?);
    }
    let (total, counts) = counts_against(q, &targets, abandon)?;
    let rows = tags
        .iter()
        .zip(counts)
        .map(|(t, count)| Share {
            label: t.meta.name.to_string(),
            count,
        })
        .collect();
    Ok((rows, total))
}

/// A tag's presence in an audience against all customers.
#[derive(Debug, Clone, PartialEq)]
pub struct Lift {
    pub tag: String,
    /// Members of the audience with the tag.
    pub in_audience: u64,
    /// Customers with the tag.
    pub overall: u64,
    /// (in_audience / audience) / (overall / customers).
    pub lift: f64,
}

/// The `k` tags most over-represented in `q`'s members: highest lift first
/// (ties: more members first, then name). Tags in `exclude`, tags outside
/// `category` (when given) and tags with fewer than `min_count` members in
/// the audience are left out. Returns the rows, the audience size and the
/// number of customers.
pub fn top_tags(
    q: &Query,
    snap: &Snapshot,
    k: usize,
    category: Option<&str>,
    exclude: &HashSet<&str>,
    min_count: u64,
    abandon: &Abandon,
) -> Result<(Vec<Lift>, u64, u64)> {
    let tags: Vec<_> = snap
        .tags
        .values()
        .filter(|t| t.meta.count > 0)
        .filter(|t| category.is_none_or(|c| t.meta.category == c))
        .filter(|t| !exclude.contains(&*t.meta.name))
        .collect();
    let mut targets = Vec::with_capacity(tags.len());
    for t in &tags {
        targets.push(t.bitmap.get()?);
    }
    let (audience, counts) = counts_against(q, &targets, abandon)?;
    let customers = snap.customer_count()?;
    let mut rows: Vec<Lift> = tags
        .iter()
        .zip(counts)
        .filter(|(_, c)| *c >= min_count.max(1))
        .map(|(t, c)| Lift {
            tag: t.meta.name.to_string(),
            in_audience: c,
            overall: t.meta.count,
            lift: (c as f64 / audience.max(1) as f64)
                / (t.meta.count as f64 / customers.max(1) as f64),
        })
        .collect();
    rows.sort_by(|a, b| {
        b.lift
            .total_cmp(&a.lift)
            .then(b.in_audience.cmp(&a.in_audience))
            .then_with(|| a.tag.cmp(&b.tag))
    });
    rows.truncate(k);
    Ok((rows, audience, customers))
}

/// The n × n matrix (row-major) of pairwise intersection sizes of the
/// queries' members; the diagonal holds each query's own count.
pub fn overlap(queries: &[Query], abandon: &Abandon) -> Result<Vec<u64>> {
    let n = queries.len();
    let mut m = vec![0u64; n * n];
    let shards = queries.iter().map(Query::shard_count).max().unwrap_or(0);
    for i in 0..shards {
        stop_if(abandon)?;
        let members: Vec<Option<Cow<Bitmap>>> = queries.iter().map(|q| q.shard(i)).collect();
        for a in 0..n {
            let Some(x) = &members[a] else { continue };
            m[a * n + a] += x.cardinality();
            for b in a + 1..n {
                if let Some(y) = &members[b] {
                    let c = x.and_cardinality(y);
                    m[a * n + b] += c;
                    m[b * n + a] += c;
                }
            }
        }
    }
    Ok(m)
}
