//! A rule's definition checked against a snapshot: its queries parse and
//! compile, its windows stay within the days its fields keep by day (so
//! that it can be kept current as the days turn), it names no audience
//! snapshot (a frozen set is not kept current), and it does not read itself
//! through other rules or saved audiences (the cycle is named). What it
//! reads is worked out here, once, and logged with it.

use std::collections::BTreeSet;

use crate::error::{Error, QueryErrorKind, Result};
use crate::fields::time;
use crate::fields::{FieldKind, MAX_ENUM_VALUE_BYTES};
use crate::query::Query;
use crate::query::parser::{Expr, Pred, Window, parse};
use crate::storage::Snapshot;
use crate::storage::record::RuleDef;
use jiff::tz::TimeZone;

/// Most rules a store keeps (the manifest holds them whole; every write
/// looks at each one's reads).
pub const MAX_RULES: usize = 1_000;
/// Longest query of a rule tag or of one stage, in bytes.
pub const MAX_RULE_QUERY_BYTES: usize = 16 * 1024;
/// Most bytes of a rule's queries and stage names in all (with
/// [`MAX_RULES`], the manifest holds at most 32 MiB of rules).
pub const MAX_RULE_DEFINITION_BYTES: usize = 32 * 1024;
/// Most stages of a lifecycle.
pub const MAX_STAGES: usize = 64;
/// Deepest chain of saved audiences a rule may reach.
const MAX_AUDIENCE_DEPTH: usize = crate::query::eval::MAX_AUDIENCE_DEPTH;

/// A rule as a caller gives it: a rule tag's query, or a lifecycle's
/// stages (value, query) in order; a time zone (empty: the store's).
#[derive(Debug, Clone, Default)]
pub struct Definition {
    pub query: String,
    pub stages: Vec<(String, String)>,
    pub time_zone: String,
}

fn in_stage(e: Error, stage: Option<&str>) -> Error {
    match (e, stage) {
        (
            Error::Query {
                kind,
                position,
                message,
            },
            Some(v),
        ) => Error::Query {
            kind,
            position,
            message: format!("in stage {v:?}: {message}"),
        },
        (e, _) => e,
    }
}

/// Checks rule `name`'s definition against `snap`, at the moment `at_ms`;
/// returns what to log: the definition with what it reads, and the local
/// day (in its zone) it is evaluated at from now on.
pub fn check(
    snap: &Snapshot,
    name: &str,
    d: Definition,
    at_ms: i64,
    default_zone: &str,
) -> Result<(RuleDef, i32)> {
    let zone_name = if d.time_zone.is_empty() {
        default_zone.to_string()
    } else {
        d.time_zone
    };
    let zone = time::zone(&zone_name)?;
    let texts: Vec<(Option<&str>, &str)> = match (d.query.is_empty(), d.stages.is_empty()) {
        (false, true) => vec![(None, d.query.as_str())],
        (true, false) => {
            if d.stages.len() > MAX_STAGES {
                return Err(Error::invalid(format!(
                    "a lifecycle has at most {MAX_STAGES} stages; {} given",
                    d.stages.len()
                )));
            }
            let mut seen = BTreeSet::new();
            for (value, _) in &d.stages {
                if value.is_empty()
                    || value.len() > MAX_ENUM_VALUE_BYTES
                    || value.chars().any(char::is_control)
                {
                    return Err(Error::invalid(format!(
                        "stage {value:?}: a stage is named by 1 to {MAX_ENUM_VALUE_BYTES} bytes without control characters"
                    )));
                }
                if !seen.insert(value.as_str()) {
                    return Err(Error::invalid(format!("stage {value:?} is named twice")));
                }
            }
            d.stages
                .iter()
                .map(|(v, q)| (Some(v.as_str()), q.as_str()))
                .collect()
        }
        (true, true) => {
            return Err(Error::invalid(
                "a rule needs a query (a rule tag) or stages (a lifecycle)",
            ));
        }
        (false, false) => {
            return Err(Error::invalid(
                "a rule has a query (a rule tag) or stages (a lifecycle), not both",
            ));
        }
    };
    let total: usize = texts
        .iter()
        .map(|(stage, text)| text.len() + stage.map_or(0, str::len))
        .sum();
    if total > MAX_RULE_DEFINITION_BYTES {
        return Err(Error::invalid(format!(
            "a rule's queries and stages are {total} bytes in all; at most {MAX_RULE_DEFINITION_BYTES}"
        )));
    }
    let day = time::day_of(at_ms, &zone)?;
    let as_of = time::day_start_ms(day, &zone)?;
    let mut reads = BTreeSet::new();
    let mut audiences = BTreeSet::new();
    for (stage, text) in &texts {
        if text.len() > MAX_RULE_QUERY_BYTES {
            return Err(Error::invalid(format!(
                "{}query is {} bytes; at most {MAX_RULE_QUERY_BYTES}",
                stage.map(|s| format!("stage {s:?}: ")).unwrap_or_default(),
                text.len()
            )));
        }
        let expr = parse(text).map_err(|e| in_stage(e, *stage))?;
        let mut walk = Walk {
            snap,
            name,
            reads: &mut reads,
            audiences: &mut audiences,
            within: Vec::new(),
        };
        walk.expr(&expr).map_err(|e| in_stage(e, *stage))?;
        Query::from_expr_in(&expr, snap, as_of, &zone).map_err(|e| in_stage(e, *stage))?;
    }
    if let Some(path) = cycle(snap, name, &reads) {
        return Err(Error::invalid(format!(
            "rule {name:?} would read itself: {}",
            path.join(" → ")
        )));
    }
    Ok((
        RuleDef {
            query: d.query,
            stages: d.stages,
            time_zone: zone_name,
            reads: reads.into_iter().collect(),
            audiences: audiences.into_iter().collect(),
        },
        day,
    ))
}

/// Where `name`, defined to read `reads`, would reach itself through other
/// rules: the path `name → … → name`.
fn cycle(snap: &Snapshot, name: &str, reads: &BTreeSet<String>) -> Option<Vec<String>> {
    fn reach(
        snap: &Snapshot,
        from: &str,
        target: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        if from == target {
            return true;
        }
        if !seen.insert(from.to_string()) {
            return false;
        }
        let Some(rule) = snap.rules.get(from) else {
            return false;
        };
        for next in &rule.def.reads {
            path.push(next.clone());
            if reach(snap, next, target, path, seen) {
                return true;
            }
            path.pop();
        }
        false
    }
    let mut seen = BTreeSet::new();
    for r in reads {
        let mut path = vec![name.to_string(), r.clone()];
        if reach(snap, r, name, &mut path, &mut seen) {
            return Some(path);
        }
    }
    None
}

/// A walk over a rule's query (and the saved audiences it names).
struct Walk<'a> {
    snap: &'a Snapshot,
    name: &'a str,
    reads: &'a mut BTreeSet<String>,
    audiences: &'a mut BTreeSet<String>,
    /// Saved audiences being walked, outermost first.
    within: Vec<String>,
}

fn type_err(position: usize, message: String) -> Error {
    Error::Query {
        kind: QueryErrorKind::Type,
        position,
        message,
    }
}

impl Walk<'_> {
    fn expr(&mut self, e: &Expr) -> Result<()> {
        match e {
            Expr::All => Ok(()),
            Expr::Snapshot { id, pos } => Err(type_err(
                *pos,
                format!(
                    "a rule cannot read audience snapshot {id}: a snapshot is frozen, a rule is kept current"
                ),
            )),
            Expr::Not(x) => self.expr(x),
            Expr::And(items) | Expr::Or(items) => items.iter().try_for_each(|i| self.expr(i)),
            Expr::Tag { name, pos } => self.name(name, *pos),
            Expr::Pred { field, pos, pred } => {
                self.window(field, pred)?;
                self.name(field, *pos)
            }
        }
    }

    fn name(&mut self, n: &str, pos: usize) -> Result<()> {
        if n == self.name {
            return Err(Error::invalid(format!(
                "rule {:?} would read itself: {} → {n}",
                self.name,
                self.within
                    .iter()
                    .map(String::as_str)
                    .chain(std::iter::once(self.name))
                    .collect::<Vec<_>>()
                    .join(" → ")
            )));
        }
        if self.snap.tag(n).is_none()
            && self.snap.field(n).is_none()
            && let Some(a) = self.snap.audiences.get(n)
        {
            if self.within.len() >= MAX_AUDIENCE_DEPTH || self.within.iter().any(|w| w == n) {
                return Err(type_err(
                    pos,
                    format!(
                        "saved audience {n:?} reaches itself or more than {MAX_AUDIENCE_DEPTH} audiences deep"
                    ),
                ));
            }
            self.audiences.insert(n.to_string());
            let inner = parse(&a.query)?;
            self.within.push(n.to_string());
            let res = self.expr(&inner);
            self.within.pop();
            return res.map_err(|e| match e {
                Error::Query { kind, message, .. } => Error::Query {
                    kind,
                    position: pos,
                    message: format!("in saved audience {n:?}: {message}"),
                },
                other => other,
            });
        }
        self.reads.insert(n.to_string());
        Ok(())
    }

    /// A window over a behaviour field must stay within the days the field
    /// keeps by day: older days are rolled up into months as time passes,
    /// and the rule could not be evaluated then.
    fn window(&self, field: &str, pred: &Pred) -> Result<()> {
        let Some(f) = self.snap.field(field) else {
            return Ok(());
        };
        let FieldKind::Behaviour(spec) = &f.meta.kind else {
            return Ok(());
        };
        let within = match pred {
            Pred::Window(Window::Within { days, pos })
            | Pred::Count {
                window: Window::Within { days, pos },
                ..
            } => Some((*days, *pos)),
            _ => None,
        };
        if let Some((days, pos)) = within
            && days > spec.daily_days
        {
            return Err(type_err(
                pos,
                format!(
                    "a rule's window over {field:?} must stay within the {} days it keeps by day (older days are rolled up into months); {days}d is longer",
                    spec.daily_days
                ),
            ));
        }
        Ok(())
    }
}

/// The zone of a rule's definition (checked when it was defined).
pub fn zone_of(def: &RuleDef) -> Result<TimeZone> {
    time::zone(&def.time_zone)
}
