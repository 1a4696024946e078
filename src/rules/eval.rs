//! A rule evaluated over one snapshot, for every customer or for some: a
//! rule tag's members, or a lifecycle's members per stage (first match
//! wins). Evaluated at the first instant of the rule's day in its zone, so
//! that the same state and day give the same answer on every replay.

use crate::bitmap::ShardedBitmap;
use crate::error::Result;
use crate::fields::time;
use crate::query::Query;
pub use crate::query::eval::ValueCache;
use crate::query::parser::parse;
use crate::storage::Snapshot;
use crate::storage::snapshot::Rule;

/// Which customers to evaluate.
#[derive(Debug, Clone, Copy)]
pub enum Among<'a> {
    Everyone,
    Only(&'a ShardedBitmap),
}

/// A rule's members among the customers evaluated.
#[derive(Debug)]
pub enum Members {
    Tag(ShardedBitmap),
    /// Per stage, in order; a customer is in the first stage it matches.
    Stages(Vec<ShardedBitmap>),
}

/// The moment (Unix ms) rule `r` is evaluated at.
pub fn as_of_ms(r: &Rule) -> Result<i64> {
    time::day_start_ms(r.day, &super::define::zone_of(&r.def)?)
}

fn members_of(
    text: &str,
    snap: &Snapshot,
    r: &Rule,
    among: Among<'_>,
    cache: &ValueCache,
) -> Result<ShardedBitmap> {
    let zone = super::define::zone_of(&r.def)?;
    let at = time::day_start_ms(r.day, &zone)?;
    let q = Query::from_expr_in(&parse(text)?, snap, at, &zone)?;
    Ok(match among {
        Among::Everyone => q.members(),
        Among::Only(c) => q.members_among(c, cache),
    })
}

/// Rule `r`'s members among `among`, as of its day. Integer values read
/// for a few customers go into `cache`, for the next rules evaluated on
/// the same state.
pub fn evaluate(
    snap: &Snapshot,
    r: &Rule,
    among: Among<'_>,
    cache: &ValueCache,
) -> Result<Members> {
    if !r.def.is_lifecycle() {
        return Ok(Members::Tag(members_of(
            &r.def.query,
            snap,
            r,
            among,
            cache,
        )?));
    }
    let mut left = match among {
        Among::Everyone => snap.live()?.clone(),
        Among::Only(c) => c.clone(),
    };
    let mut out = Vec::with_capacity(r.def.stages.len());
    for (_, text) in &r.def.stages {
        let m = members_of(text, snap, r, Among::Only(&left), cache)?;
        left.difference_sharded(&m);
        out.push(m);
    }
    Ok(Members::Stages(out))
}
