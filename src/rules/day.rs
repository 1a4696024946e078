//! What a turn of a rule's day can change: the customers whose answer to
//! some part of its queries differs between the old day and the new one.
//! - a behaviour window (`WITHIN 30d`, `COUNT(… WITHIN 90d)`, a bare name
//!   or `IS NULL`, which look back over the retention, a `BETWEEN` with
//!   `TODAY`): the customers in the day buckets read on one day and not
//!   the other, those that entered or left the window, not everyone;
//! - an integer compared with `TODAY` (`last_order_day < TODAY - 90`): the
//!   customers whose value lies between the two days' bounds (the
//!   comparison evaluated on both days, the difference taken);
//! - another rule: its own changes, which the caller passes on.
//!
//! Everything else in a query (tags, enumerated values, integers compared
//! with numbers) does not move with the calendar.

use std::collections::BTreeSet;

use jiff::tz::TimeZone;

use crate::bitmap::ShardedBitmap;
use crate::error::Result;
use crate::fields::time;
use crate::query::Query;
use crate::query::eval::Compiler;
use crate::query::fields::is_today;
use crate::query::parser::{Expr, Pred, parse};
use crate::storage::Snapshot;
use crate::storage::record::RuleDef;

/// The customers whose answer to `def`'s queries can differ between local
/// days `old` and `new` (in `zone`), other rules aside.
pub fn candidates(
    snap: &Snapshot,
    def: &RuleDef,
    zone: &TimeZone,
    old: i32,
    new: i32,
) -> Result<ShardedBitmap> {
    let old_ms = time::day_start_ms(old, zone)?;
    let new_ms = time::day_start_ms(new, zone)?;
    let mut w = Walk {
        snap,
        zone,
        old: Compiler::new(snap, old_ms, zone)?,
        new: Compiler::new(snap, new_ms, zone)?,
        old_ms,
        new_ms,
        out: ShardedBitmap::new(),
        audiences: BTreeSet::new(),
    };
    let texts: Vec<&str> = if def.is_lifecycle() {
        def.stages.iter().map(|(_, q)| q.as_str()).collect()
    } else {
        vec![def.query.as_str()]
    };
    for t in texts {
        w.expr(&parse(t)?)?;
    }
    Ok(w.out)
}

struct Walk<'s> {
    snap: &'s Snapshot,
    zone: &'s TimeZone,
    old: Compiler<'s>,
    new: Compiler<'s>,
    old_ms: i64,
    new_ms: i64,
    out: ShardedBitmap,
    /// Saved audiences already walked (each once).
    audiences: BTreeSet<String>,
}

impl Walk<'_> {
    fn expr(&mut self, e: &Expr) -> Result<()> {
        match e {
            Expr::All | Expr::Snapshot { .. } => Ok(()),
            Expr::Not(x) => self.expr(x),
            Expr::And(items) | Expr::Or(items) => items.iter().try_for_each(|i| self.expr(i)),
            Expr::Tag { name, .. } => {
                if self.snap.tag(name).is_some() {
                    return Ok(());
                }
                if let Some(a) = self.snap.audiences.get(name.as_str())
                    && self.snap.field(name).is_none()
                {
                    if self.audiences.insert(name.clone()) {
                        let inner = parse(&a.query)?;
                        self.expr(&inner)?;
                    }
                    return Ok(());
                }
                self.slots(name, None)
            }
            Expr::Pred { field, pred, .. } => {
                if self.is_behaviour(field) {
                    return self.slots(field, Some(pred));
                }
                let moves = match pred {
                    Pred::Cmp { value, .. } => is_today(value),
                    Pred::Between { lo, hi } => is_today(lo) || is_today(hi),
                    Pred::In { values, .. } => values.iter().any(is_today),
                    _ => false,
                };
                if moves {
                    let before =
                        Query::from_expr_in(e, self.snap, self.old_ms, self.zone)?.members();
                    let after =
                        Query::from_expr_in(e, self.snap, self.new_ms, self.zone)?.members();
                    self.out.union_sharded(&before.xor(&after));
                }
                Ok(())
            }
        }
    }

    fn is_behaviour(&self, name: &str) -> bool {
        self.snap
            .field(name)
            .is_some_and(|f| matches!(f.meta.kind, crate::fields::FieldKind::Behaviour(_)))
    }

    /// The members of the buckets read on one day and not the other.
    fn slots(&mut self, field: &str, pred: Option<&Pred>) -> Result<()> {
        let (Some(before), Some(after)) = (
            self.old.behaviour_slots(field, pred)?,
            self.new.behaviour_slots(field, pred)?,
        ) else {
            return Ok(());
        };
        let Some(f) = self.snap.field(field) else {
            return Ok(());
        };
        let before: BTreeSet<u32> = before.into_iter().collect();
        let after: BTreeSet<u32> = after.into_iter().collect();
        for slot in before.symmetric_difference(&after) {
            if let Some(b) = f.slots.get(slot) {
                self.out.union_sharded(b.get()?);
            }
        }
        Ok(())
    }
}
