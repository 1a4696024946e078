//! The per-shard set operations a [`Plan`] runs: intersections from the
//! smallest operand up with the last step fused into a count, dense halves
//! for four or more dense operands, few negatives subtracted after the
//! count, lopsided unions distributed over the branches. Each works on one
//! shard (`i`) of CRoaring bitmaps and allocates at most one shard's result.
//! Reads the plans, writes nothing; what to run is [`Plan`]'s decision.

use std::borrow::Cow;

use super::eval::Plan;
use crate::bitmap::{Bitmap, SHARD_SIZE};

/// The members of the intersection of `pos` in shard `i`, the last step fused
/// into a count.
pub(super) fn count_and(pos: &[Plan<'_>], i: usize) -> u64 {
    if pos.len() >= 4 && pos.iter().all(|p| p.dense_in(i)) {
        // Two halves, each kept as dense as it can be, and the last step a
        // popcount of their AND. A chain would shrink the result below 4,096
        // per container, where CRoaring turns it into sorted arrays (a scalar
        // bit extraction, then probes one value at a time): 4–7× slower at 5
        // operands.
        let (left, right) = dense_halves(pos, i);
        return match (and_of(&left, &[], i), and_of(&right, &[], i)) {
            (Some(l), Some(r)) => l.and_cardinality(&r),
            _ => 0,
        };
    }
    let Some((last, init)) = last_for_count(pos) else {
        return 0;
    };
    if init.is_empty() {
        return last.count(i);
    }
    let Some(acc) = and_of(&init, &[], i) else {
        return 0;
    };
    if last.is_pred() {
        // A predicate only needs to examine the candidates left.
        return last.eval_within(i, &acc).map_or(0, |b| b.cardinality());
    }
    if let Some((big, others)) = lopsided(last) {
        // |acc AND (big OR others)| = |acc AND big| plus the few of acc AND
        // others that are not in big.
        let few = union_within(&acc, &others, i);
        return match big.eval(i) {
            Some(b) => acc.and_cardinality(&b) + few.andnot_cardinality(&b),
            None => few.cardinality(),
        };
    }
    last.eval(i).map_or(0, |l| acc.and_cardinality(&l))
}

/// True when an intersection of two or more tags has negated operands that
/// are stored bitmaps holding, together and times the number of tags, at
/// most 1/[`LOPSIDED`] of its smallest tag: the count then subtracts the few
/// members they remove instead of building the intersection to take them
/// out of. Probing each removed id costs a few nanoseconds per tag, so it
/// only pays while they are that few (`d1 AND d2 AND NOT s`, `s` at 0.1%:
/// 200 → 153 µs at 10M). With one tag, CRoaring's `andnot_cardinality`
/// already counts this way.
pub(super) fn small_negatives(pos: &[Plan<'_>], neg: &[Plan<'_>]) -> bool {
    if pos.len() < 2 || !pos.iter().all(|p| matches!(p, Plan::Leaf(_))) {
        return false;
    }
    let Some(smallest) = pos.iter().map(Plan::estimate).min() else {
        return false;
    };
    let removed = neg.iter().map(Plan::estimate).fold(0, u64::saturating_add);
    neg.iter().all(Plan::stored_only)
        && removed
            .saturating_mul(LOPSIDED)
            .saturating_mul(pos.len() as u64)
            <= smallest
}

/// `within AND p` in shard `i`, for a small `within`: worked out from the ids
/// of `within`, without building any large part of `p`.
pub(super) fn restrict(p: &Plan<'_>, within: Bitmap, i: usize) -> Bitmap {
    if within.is_empty() {
        return within;
    }
    match p {
        Plan::Empty => Bitmap::new(),
        Plan::Leaf(b) => match b.shard(i) {
            Some(s) => {
                let mut w = within;
                w.and_inplace(s);
                w
            }
            None => Bitmap::new(),
        },
        Plan::Or(items) => {
            let mut out = Bitmap::new();
            for item in items {
                out.or_inplace(&restrict(item, within.clone(), i));
            }
            out
        }
        Plan::And { pos, neg } => {
            let mut w = pos.iter().fold(within, |w, q| restrict(q, w, i));
            for n in neg {
                let hit = restrict(n, w.clone(), i);
                w.andnot_inplace(&hit);
            }
            w
        }
        Plan::IntRange { .. } | Plan::DayCount { .. } => p
            .eval_within(i, &within)
            .map_or_else(Bitmap::new, Cow::into_owned),
    }
}

/// Splits the dense operands of an intersection into two groups whose
/// expected densities in shard `i` (the product of their members' densities,
/// as if independent) have the largest minimum, so that both halves stay
/// above CRoaring's 4,096 ids per container, where its results turn into
/// sorted arrays, for as long as any split allows. 50/45/40/35/30% tags split
/// alternately give 6.0% and 15.8%, one side under the line (6.25%); the best
/// split gives 7.9% and 12%. Up to 8 operands are tried exhaustively
/// (128 splits, about a microsecond); beyond that they alternate.
pub(super) fn dense_halves<'p, 's>(
    pos: &'p [Plan<'s>],
    i: usize,
) -> (Vec<&'p Plan<'s>>, Vec<&'p Plan<'s>>) {
    let n = pos.len();
    let alternate = || {
        (
            pos.iter().step_by(2).collect(),
            pos.iter().skip(1).step_by(2).collect(),
        )
    };
    if n > 8 {
        return alternate();
    }
    let density: Vec<f64> = pos
        .iter()
        .map(|p| match p {
            Plan::Leaf(b) => b.shard(i).map_or(0.0, |s| s.cardinality() as f64) / SHARD_SIZE as f64,
            _ => 0.0,
        })
        .collect();
    // Operand 0 always on the left; each mask picks the rest of the left.
    let best = (0u32..1 << (n - 1))
        .map(|m| (m << 1) | 1)
        .filter(|&m| m != (1 << n) - 1)
        .max_by(|&a, &b| {
            let score = |m: u32| {
                let (mut l, mut r) = (1.0, 1.0);
                for (k, d) in density.iter().enumerate() {
                    if m >> k & 1 == 1 { l *= d } else { r *= d }
                }
                f64::min(l, r)
            };
            score(a).total_cmp(&score(b))
        });
    let Some(m) = best else {
        return alternate();
    };
    let (left, right): (Vec<_>, Vec<_>) =
        pos.iter().enumerate().partition(|(k, _)| m >> k & 1 == 1);
    (
        left.into_iter().map(|(_, p)| p).collect(),
        right.into_iter().map(|(_, p)| p).collect(),
    )
}

/// The intersection of `pos` minus every `neg` in shard `i`, smallest
/// operand first, stopping at the first empty result. A predicate after the
/// first operand examines only the candidates left.
pub(super) fn and_of<'s>(
    pos: &[&Plan<'s>],
    neg: &[&Plan<'s>],
    i: usize,
) -> Option<Cow<'s, Bitmap>> {
    // Start from the smallest operand that is not a lopsided union: those
    // are cheaper to intersect into a result than to build (`lopsided`).
    let start = pos.iter().position(|p| lopsided(p).is_none()).unwrap_or(0);
    let first = pos.get(start)?;
    let rest = pos
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != start)
        .map(|(_, p)| p);
    let mut acc = first.eval(i)?;
    let steps = rest
        .map(|p| (p, false))
        .chain(neg.iter().map(|n| (n, true)));
    for (p, not) in steps {
        if !not && p.is_pred() {
            acc = p.eval_within(i, &acc)?;
            continue;
        }
        if !not && let Some((big, others)) = lopsided(p) {
            // acc AND (big OR others) = (acc AND big) OR (acc AND others).
            let few = union_within(&acc, &others, i);
            let mut out = match big.eval(i) {
                Some(b) => match acc {
                    Cow::Owned(mut a) => {
                        a.and_inplace(&b);
                        a
                    }
                    Cow::Borrowed(a) => a.and(&b),
                },
                None => Bitmap::new(),
            };
            out.or_inplace(&few);
            if out.is_empty() {
                return None;
            }
            acc = Cow::Owned(out);
            continue;
        }
        let Some(s) = p.eval(i) else {
            // An empty operand empties an AND and leaves an AND NOT alone.
            if not {
                continue;
            }
            return None;
        };
        acc = Cow::Owned(match (acc, not) {
            (Cow::Borrowed(a), false) => a.and(&s),
            (Cow::Borrowed(a), true) => a.andnot(&s),
            (Cow::Owned(mut a), false) => {
                a.and_inplace(&s);
                a
            }
            (Cow::Owned(mut a), true) => {
                a.andnot_inplace(&s);
                a
            }
        });
        if acc.is_empty() {
            return None;
        }
    }
    Some(acc)
}

/// How many times larger than all its other branches together the largest
/// branch of a union must be for an intersection with it to be distributed
/// over the branches ([`lopsided`]).
pub(super) const LOPSIDED: u64 = 16;

/// For a union whose largest branch is [`LOPSIDED`] times all the others
/// together (a dense tag OR a few sparse ones), that branch and the others.
/// `x AND (big OR small)` is then `(x AND big) OR (x AND small)`: one
/// intersection the size of `x AND big`, plus a few ids, instead of first
/// building the union, which copies the whole of `big`.
pub(super) fn lopsided<'p, 's>(p: &'p Plan<'s>) -> Option<(&'p Plan<'s>, Vec<&'p Plan<'s>>)> {
    let Plan::Or(items) = p else {
        return None;
    };
    let (k, big) = items
        .iter()
        .enumerate()
        .max_by_key(|(_, item)| item.estimate())?;
    if big.is_pred() {
        return None;
    }
    let others: Vec<&Plan<'s>> = items
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != k)
        .map(|(_, item)| item)
        .collect();
    let rest = others
        .iter()
        .map(|item| item.estimate())
        .fold(0, u64::saturating_add);
    (rest.saturating_mul(LOPSIDED) <= big.estimate()).then_some((big, others))
}

/// The operand of an intersection to fuse into its count, and the others: a
/// lopsided union if there is one (so that it is never built), otherwise the
/// largest operand (the last, as the compiler sorts them).
pub(super) fn last_for_count<'p, 's>(
    pos: &'p [Plan<'s>],
) -> Option<(&'p Plan<'s>, Vec<&'p Plan<'s>>)> {
    let k = pos
        .iter()
        .position(|p| lopsided(p).is_some())
        .unwrap_or(pos.len().checked_sub(1)?);
    let others = pos
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != k)
        .map(|(_, p)| p)
        .collect();
    Some((&pos[k], others))
}

/// The union of `within AND p` over `plans`, in shard `i`.
pub(super) fn union_within(within: &Bitmap, plans: &[&Plan<'_>], i: usize) -> Bitmap {
    let mut out = Bitmap::new();
    for p in plans {
        let part = if p.is_pred() {
            p.eval_within(i, within)
        } else {
            p.eval(i).map(|s| Cow::Owned(within.and(&s)))
        };
        if let Some(part) = part {
            out.or_inplace(&part);
        }
    }
    out
}
