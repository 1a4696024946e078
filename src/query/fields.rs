//! Compiling predicates over fields (integer, enumerated, behaviour) into
//! plan nodes. Reads the snapshot's field bitmaps; writes nothing.
//!
//! Semantics (also in the README):
//! - integers: `=`, `!=`, `<`, `<=`, `>`, `>=`, `BETWEEN a AND b` (both
//!   ends included), `IN (…)`, `NOT IN (…)`, `IS [NOT] NULL`; a customer
//!   without a value matches only `IS NULL` (as in SQL, `!=` and `NOT IN` do
//!   not match missing values; `NOT (x = 1)` does);
//! - enumerated: `=`, `!=`, `IN`, `NOT IN`, `IS [NOT] NULL`, same NULL rule;
//! - behaviours: a bare name (any event within retention), `WITHIN nd` (the
//!   last n local days, today included), `BETWEEN 'YYYY-MM-DD' AND
//!   'YYYY-MM-DD'`, `IS [NOT] NULL`, and `COUNT(x WITHIN nd) op k` (distinct
//!   days with the behaviour). Windows are clamped to the field's retention;
//!   a window that cuts through a month already kept as one bucket is an
//!   error (day precision is gone there), as is a COUNT window reaching one.

use crate::bitmap::ShardedBitmap;
use crate::error::{Error, QueryErrorKind, Result};
use crate::fields::time::{self, Bucket};
use crate::fields::{BehaviourSpec, FieldKind, INT_EXISTS, bsi, int_slot};
use crate::query::eval::{Compiler, IntSlices, Plan};
use crate::query::parser::{CmpOp, Lit, Pred, TODAY, Window};
use crate::storage::Field;

fn type_err(position: usize, message: impl Into<String>) -> Error {
    Error::Query {
        kind: QueryErrorKind::Type,
        position,
        message: message.into(),
    }
}

/// The days after `TODAY` in a literal (`TODAY-90` is -90), `None` when
/// the literal is not a TODAY expression.
pub(crate) fn today_offset(lit: &Lit) -> Option<Result<i64>> {
    if lit.quoted {
        return None;
    }
    let head = lit.text.get(..TODAY.len())?;
    if !head.eq_ignore_ascii_case(TODAY) {
        return None;
    }
    let rest = &lit.text[TODAY.len()..];
    if rest.is_empty() {
        return Some(Ok(0));
    }
    let bad = || {
        type_err(
            lit.pos,
            format!(
                "expected TODAY, TODAY - n or TODAY + n (n a number of days), found {:?}",
                lit.text
            ),
        )
    };
    let (sign, digits) = match rest.as_bytes()[0] {
        b'-' => (-1, &rest[1..]),
        b'+' => (1, &rest[1..]),
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Err(bad()));
    }
    Some(match digits.parse::<i64>() {
        Ok(n) if n <= i64::from(time::MAX_DAY) => Ok(sign * n),
        _ => Err(bad()),
    })
}

/// True when the literal is a TODAY expression (its value moves with the day).
pub(crate) fn is_today(lit: &Lit) -> bool {
    today_offset(lit).is_some()
}

fn int_lit_plain(lit: &Lit) -> Result<i64> {
    if lit.quoted {
        return Err(type_err(
            lit.pos,
            format!("expected an integer, found '{}'", lit.text),
        ));
    }
    lit.text.parse().map_err(|_| {
        type_err(
            lit.pos,
            format!("expected an integer (64-bit), found {:?}", lit.text),
        )
    })
}

fn date_lit_plain(lit: &Lit) -> Result<i32> {
    time::parse_date(&lit.text).ok_or_else(|| {
        type_err(
            lit.pos,
            format!("expected a date YYYY-MM-DD, found {:?}", lit.text),
        )
    })
}

/// `lo..=hi` of the counts that satisfy `op k`; `None` when nothing can.
fn count_range(op: CmpOp, k: i64) -> Option<(u64, u64)> {
    let k_ge0 = |k: i64| u64::try_from(k.max(0)).unwrap_or(0);
    match op {
        CmpOp::Eq if k >= 0 => Some((k as u64, k as u64)),
        CmpOp::Eq => None,
        CmpOp::Ge => Some((k_ge0(k), u64::MAX)),
        CmpOp::Gt => Some((k_ge0(k.saturating_add(1)), u64::MAX)),
        CmpOp::Le if k >= 0 => Some((0, k as u64)),
        CmpOp::Lt if k >= 1 => Some((0, k as u64 - 1)),
        CmpOp::Le | CmpOp::Lt => None,
        CmpOp::Ne => unreachable!("handled by the caller"),
    }
}

impl<'s> Compiler<'s> {
    /// An integer literal: a number, or a TODAY expression (the local day
    /// number in the query's time zone).
    fn int_lit(&self, lit: &Lit) -> Result<i64> {
        match today_offset(lit) {
            Some(offset) => Ok(i64::from(time::day_of(self.now_ms, &self.zone)?) + offset?),
            None => int_lit_plain(lit),
        }
    }

    /// A date literal of a behaviour field: `'YYYY-MM-DD'`, or a TODAY
    /// expression (the field's local day).
    fn date_lit(&self, lit: &Lit, today: i32) -> Result<i32> {
        match today_offset(lit) {
            Some(offset) => {
                Ok((i64::from(today) + offset?).clamp(0, i64::from(time::MAX_DAY)) as i32)
            }
            None => date_lit_plain(lit),
        }
    }

    fn field(&self, name: &str, pos: usize) -> Result<&'s Field> {
        if self.snap.tag(name).is_some() {
            return Err(type_err(
                pos,
                format!(
                    "{name:?} is a tag; comparisons, IN, IS NULL, WITHIN and COUNT apply to fields"
                ),
            ));
        }
        self.snap
            .field(name)
            .map(|f| &**f)
            .ok_or_else(|| Error::Query {
                kind: QueryErrorKind::UnknownTag,
                position: pos,
                message: format!("unknown tag or field {name:?}"),
            })
    }

    /// A name used alone: a tag (handled by the caller) or a behaviour field
    /// (any event within retention).
    pub(crate) fn bare_field(&self, name: &str, pos: usize) -> Result<Plan<'s>> {
        let Some(field) = self.snap.field(name) else {
            return Err(Error::Query {
                kind: QueryErrorKind::UnknownTag,
                position: pos,
                message: format!("unknown tag {name:?}"),
            });
        };
        match &field.meta.kind {
            FieldKind::Behaviour(spec) => self.any_event(field, spec),
            FieldKind::Int => Err(type_err(
                pos,
                format!(
                    "{name:?} is an integer field: compare it, e.g. {name} >= 1 or {name} IS NOT NULL"
                ),
            )),
            FieldKind::Enum { values } => Err(type_err(
                pos,
                format!(
                    "{name:?} is an enumerated field: compare it, e.g. {name} = {}",
                    values.first().map_or("x", String::as_str)
                ),
            )),
        }
    }

    fn union(&self, items: Vec<&'s ShardedBitmap>) -> Plan<'s> {
        let mut plans: Vec<Plan<'s>> = items
            .into_iter()
            .filter(|b| !b.is_empty())
            .map(Plan::Leaf)
            .collect();
        match plans.len() {
            0 => Plan::Empty,
            1 => plans.remove(0),
            _ => Plan::Or(plans),
        }
    }

    fn all_slots(&self, field: &'s Field) -> Result<Vec<&'s ShardedBitmap>> {
        field.slots.values().map(|b| b.get()).collect()
    }

    fn is_null(&self, present: Plan<'s>, negated: bool) -> Plan<'s> {
        if negated {
            present
        } else {
            self.and_of(Vec::new(), vec![present])
        }
    }

    pub(crate) fn predicate(&self, name: &str, pos: usize, pred: &Pred) -> Result<Plan<'s>> {
        let field = self.field(name, pos)?;
        match &field.meta.kind {
            FieldKind::Int => self.int_pred(field, pred, pos),
            FieldKind::Enum { values } => self.enum_pred(field, values, pred, pos),
            FieldKind::Behaviour(spec) => self.events_pred(field, spec, pred, pos),
        }
    }

    fn slices(&self, field: &'s Field) -> Result<Option<IntSlices<'s>>> {
        let Some(exists) = field.slot(INT_EXISTS)? else {
            return Ok(None);
        };
        let mut bits = [None; bsi::BITS];
        for (k, b) in bits.iter_mut().enumerate() {
            *b = field.slot(int_slot(k))?;
        }
        Ok(Some(IntSlices {
            field: &field.meta.name,
            exists,
            bits,
        }))
    }

    fn int_range(&self, field: &'s Field, lo: i64, hi: i64) -> Result<Plan<'s>> {
        if lo > hi {
            return Ok(Plan::Empty);
        }
        Ok(match self.slices(field)? {
            None => Plan::Empty,
            Some(slices) => Plan::IntRange {
                slices: Box::new(slices),
                lo: bsi::encode(lo),
                hi: bsi::encode(hi),
            },
        })
    }

    fn int_pred(&self, field: &'s Field, pred: &Pred, pos: usize) -> Result<Plan<'s>> {
        let name = &field.meta.name;
        let exists =
            || -> Result<Plan<'s>> { Ok(field.slot(INT_EXISTS)?.map_or(Plan::Empty, Plan::Leaf)) };
        Ok(match pred {
            Pred::Cmp { op, value, .. } => {
                let c = self.int_lit(value)?;
                match op {
                    CmpOp::Eq => self.int_range(field, c, c)?,
                    CmpOp::Ne => {
                        let eq = self.int_range(field, c, c)?;
                        self.and_of(vec![exists()?], vec![eq])
                    }
                    CmpOp::Lt if c == i64::MIN => Plan::Empty,
                    CmpOp::Lt => self.int_range(field, i64::MIN, c - 1)?,
                    CmpOp::Le => self.int_range(field, i64::MIN, c)?,
                    CmpOp::Gt if c == i64::MAX => Plan::Empty,
                    CmpOp::Gt => self.int_range(field, c + 1, i64::MAX)?,
                    CmpOp::Ge => self.int_range(field, c, i64::MAX)?,
                }
            }
            Pred::Between { lo, hi } => {
                self.int_range(field, self.int_lit(lo)?, self.int_lit(hi)?)?
            }
            Pred::IsNull { negated } => self.is_null(exists()?, *negated),
            Pred::In { values, negated } => {
                let mut items = Vec::new();
                for v in values {
                    let c = self.int_lit(v)?;
                    match self.int_range(field, c, c)? {
                        Plan::Empty => {}
                        p => items.push(p),
                    }
                }
                let any = match items.len() {
                    0 => Plan::Empty,
                    1 => items.remove(0),
                    _ => Plan::Or(items),
                };
                if *negated {
                    self.and_of(vec![exists()?], vec![any])
                } else {
                    any
                }
            }
            Pred::Window(_) | Pred::Count { .. } => {
                return Err(type_err(
                    pos,
                    format!(
                        "{name:?} is an integer field; WITHIN and COUNT apply to behaviour fields"
                    ),
                ));
            }
        })
    }

    fn enum_slot(&self, field: &'s Field, values: &[String], v: &Lit) -> Result<u32> {
        values
            .iter()
            .position(|x| *x == v.text)
            .map(|i| i as u32)
            .ok_or_else(|| {
                type_err(
                    v.pos,
                    format!(
                        "{:?} is not a value of {:?} (its values: {})",
                        v.text,
                        &*field.meta.name,
                        values.join(", ")
                    ),
                )
            })
    }

    fn enum_pred(
        &self,
        field: &'s Field,
        values: &[String],
        pred: &Pred,
        pos: usize,
    ) -> Result<Plan<'s>> {
        let name = &field.meta.name;
        let of = |slots: &[u32], negate: bool| -> Result<Plan<'s>> {
            let mut items = Vec::new();
            for (&slot, b) in &field.slots {
                if slots.contains(&slot) != negate {
                    items.push(b.get()?);
                }
            }
            Ok(self.union(items))
        };
        Ok(match pred {
            Pred::Cmp {
                op: CmpOp::Eq,
                value,
                ..
            } => of(&[self.enum_slot(field, values, value)?], false)?,
            Pred::Cmp {
                op: CmpOp::Ne,
                value,
                ..
            } => of(&[self.enum_slot(field, values, value)?], true)?,
            Pred::In {
                values: vs,
                negated,
            } => {
                let slots = vs
                    .iter()
                    .map(|v| self.enum_slot(field, values, v))
                    .collect::<Result<Vec<u32>>>()?;
                of(&slots, *negated)?
            }
            Pred::IsNull { negated } => {
                let present = self.union(self.all_slots(field)?);
                self.is_null(present, *negated)
            }
            Pred::Cmp { op_pos, .. } => {
                return Err(type_err(
                    *op_pos,
                    format!("{name:?} is an enumerated field: use =, !=, IN or NOT IN"),
                ));
            }
            Pred::Between { .. } | Pred::Window(_) | Pred::Count { .. } => {
                return Err(type_err(
                    pos,
                    format!("{name:?} is an enumerated field: use =, !=, IN, NOT IN or IS NULL"),
                ));
            }
        })
    }

    fn today(&self, spec: &BehaviourSpec) -> Result<i32> {
        let tz = time::zone(&spec.time_zone)?;
        time::day_of(self.now_ms, &tz)
    }

    fn any_event(&self, field: &'s Field, spec: &BehaviourSpec) -> Result<Plan<'s>> {
        let items = self.any_event_slots(field, spec)?;
        Ok(self.union(self.slot_bitmaps(field, &items)?))
    }

    /// The slots that hold events still within retention.
    fn any_event_slots(&self, field: &'s Field, spec: &BehaviourSpec) -> Result<Vec<u32>> {
        let from = spec.retention_start(self.today(spec)?);
        Ok(field
            .slots
            .keys()
            .copied()
            .filter(|&slot| Bucket::of_slot(slot).last_day() >= from)
            .collect())
    }

    fn slot_bitmaps(&self, field: &'s Field, slots: &[u32]) -> Result<Vec<&'s ShardedBitmap>> {
        slots
            .iter()
            .filter_map(|s| field.slots.get(s))
            .map(|b| b.get())
            .collect()
    }

    /// The slots of behaviour field `name` that the predicate (or, with
    /// none, the bare name) reads at this compiler's moment; `None` when
    /// `name` is not a behaviour field. What a turn of the day can change
    /// is in the slots read on one day and not the other.
    pub(crate) fn behaviour_slots(
        &self,
        name: &str,
        pred: Option<&Pred>,
    ) -> Result<Option<Vec<u32>>> {
        let Some(field) = self.snap.field(name) else {
            return Ok(None);
        };
        let FieldKind::Behaviour(spec) = &field.meta.kind else {
            return Ok(None);
        };
        let slots = match pred {
            None | Some(Pred::IsNull { .. }) => self.any_event_slots(field, spec)?,
            Some(Pred::Window(w)) | Some(Pred::Count { window: w, .. }) => {
                self.window_slots(field, spec, w, matches!(pred, Some(Pred::Count { .. })))?
            }
            Some(Pred::Between { lo, hi }) => {
                let w = Window::Between {
                    lo: lo.clone(),
                    hi: hi.clone(),
                };
                self.window_slots(field, spec, &w, false)?
            }
            Some(Pred::Cmp { .. } | Pred::In { .. }) => Vec::new(),
        };
        Ok(Some(slots))
    }

    /// `lo..=hi` as local day numbers, and the position to blame.
    fn window_days(&self, w: &Window, today: i32) -> Result<(i32, i32, usize)> {
        match w {
            Window::Within { days, pos } => {
                let days = (*days).min(time::MAX_DAY as u32) as i32;
                Ok((today - days + 1, today, *pos))
            }
            Window::Between { lo, hi } => {
                Ok((self.date_lit(lo, today)?, self.date_lit(hi, today)?, lo.pos))
            }
        }
    }

    /// The buckets covering days `lo..=hi`, clamped to retention. With
    /// `days_only`, a window reaching a rolled-up month is an error.
    fn window_buckets(
        &self,
        field: &'s Field,
        spec: &BehaviourSpec,
        w: &Window,
        days_only: bool,
    ) -> Result<Vec<&'s ShardedBitmap>> {
        let slots = self.window_slots(field, spec, w, days_only)?;
        self.slot_bitmaps(field, &slots)
    }

    /// The slots of the buckets covering the window (see [`Self::window_buckets`]).
    fn window_slots(
        &self,
        field: &'s Field,
        spec: &BehaviourSpec,
        w: &Window,
        days_only: bool,
    ) -> Result<Vec<u32>> {
        let today = self.today(spec)?;
        let (lo, hi, at) = self.window_days(w, today)?;
        let keep_from = spec.retention_start(today);
        let clamped = lo < keep_from;
        let lo = lo.max(keep_from);
        if lo > hi {
            return Ok(Vec::new());
        }
        let name = &field.meta.name;
        let first_month = time::month_of(lo.max(0));
        let last_month = time::month_of(hi.clamp(0, time::MAX_DAY));
        for m in first_month..=last_month {
            if !spec.month_rolled(m, today) {
                continue;
            }
            if days_only {
                return Err(type_err(
                    at,
                    format!(
                        "COUNT needs day buckets, and {name:?} keeps days only for the last {} days (from {})",
                        spec.daily_days,
                        time::format_day(spec.daily_start(today))
                    ),
                ));
            }
            let whole = time::month_first_day(m) >= lo || (clamped && m == first_month);
            if !whole || time::month_last_day(m) > hi {
                return Err(type_err(
                    at,
                    format!(
                        "{name:?} keeps {} as one month bucket (days before {} are rolled up by month); use whole months there",
                        time::format_month(m),
                        time::format_day(spec.daily_start(today))
                    ),
                ));
            }
        }
        Ok(field
            .slots
            .keys()
            .copied()
            .filter(|&slot| match Bucket::of_slot(slot) {
                Bucket::Day(d) => (lo..=hi).contains(&d),
                Bucket::Month(m) => m >= first_month && m <= last_month,
            })
            .collect())
    }

    fn events_pred(
        &self,
        field: &'s Field,
        spec: &BehaviourSpec,
        pred: &Pred,
        pos: usize,
    ) -> Result<Plan<'s>> {
        let name = &field.meta.name;
        Ok(match pred {
            Pred::Window(w) => self.union(self.window_buckets(field, spec, w, false)?),
            Pred::Between { lo, hi } => {
                let w = Window::Between {
                    lo: lo.clone(),
                    hi: hi.clone(),
                };
                self.union(self.window_buckets(field, spec, &w, false)?)
            }
            Pred::IsNull { negated } => {
                let any = self.any_event(field, spec)?;
                self.is_null(any, *negated)
            }
            Pred::Count { window, op, value } => {
                let k = int_lit_plain(value)?;
                let days = self.window_buckets(field, spec, window, true)?;
                let count = |lo: u64, hi: u64| Plan::DayCount {
                    days: days.clone(),
                    lo,
                    hi,
                    live: self.live,
                };
                if *op == CmpOp::Ne {
                    let eq = match count_range(CmpOp::Eq, k) {
                        Some((lo, hi)) => count(lo, hi),
                        None => Plan::Empty,
                    };
                    return Ok(self.and_of(Vec::new(), vec![eq]));
                }
                match count_range(*op, k) {
                    None => Plan::Empty,
                    Some((lo, _)) if lo > days.len() as u64 => Plan::Empty,
                    Some((0, hi)) if hi >= days.len() as u64 => self.leaf(self.live),
                    Some((lo, hi)) => count(lo, hi),
                }
            }
            Pred::Cmp { .. } | Pred::In { .. } => {
                return Err(type_err(
                    pos,
                    format!(
                        "{name:?} is a behaviour field: use {name} WITHIN 7d, {name} BETWEEN 'YYYY-MM-DD' AND 'YYYY-MM-DD' or COUNT({name} WITHIN 30d) >= 2"
                    ),
                ));
            }
        })
    }
}
