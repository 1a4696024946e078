//! Fields: values beyond yes/no tags, still on bitmaps: what a field is, and the
//! arithmetic that reads and writes its bitmaps.
//!
//! - **Integer fields**: signed 64-bit values as bit-sliced indexes
//!   ([`bsi`]): slot 0 is the existence set, slot `1 + k` holds bit `k` of the
//!   offset-binary value.
//! - **Enumerated fields**: mutually exclusive values (`lifecycle` ∈ {new,
//!   active, …}); slot `i` holds the customers whose value is the `i`-th
//!   declared value.
//! - **Behaviour fields**: time-bucketed events; slot = local day number for
//!   day buckets, [`time::MONTH_BASE`] + month number once a month is rolled
//!   up ([`time`]).
//!
//! A field's bitmaps ("slots") live in the snapshot and in segment files like
//! tags do; this module owns their meaning, not their storage, and it knows
//! nothing of the server or the query text.

pub mod bsi;
pub mod time;

use crate::error::{Error, Result};
use crate::storage::codec::{Dec, DecResult, Enc};

/// Slot of an integer field's existence set.
pub const INT_EXISTS: u32 = 0;
/// Most declared values of an enumerated field.
pub const MAX_ENUM_VALUES: usize = 1024;
/// Longest enumerated value, in bytes.
pub const MAX_ENUM_VALUE_BYTES: usize = 128;
/// Default number of days a behaviour is kept.
pub const DEFAULT_RETENTION_DAYS: u32 = 730;
/// Default number of recent days kept at day precision.
pub const DEFAULT_DAILY_DAYS: u32 = 400;
/// Longest retention accepted (100 years).
pub const MAX_RETENTION_DAYS: u32 = 36_500;
/// Default time zone of behaviour fields.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Shanghai";

/// Slot of bit `k` of an integer field.
pub fn int_slot(k: usize) -> u32 {
    1 + k as u32
}

/// How a behaviour field buckets and keeps its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BehaviourSpec {
    /// IANA time zone that decides which local day an event falls on.
    pub time_zone: String,
    /// Events older than this many days (today counting as one) are dropped.
    pub retention_days: u32,
    /// Days within this many days of today keep day buckets; whole months
    /// older than that are rolled up into one month bucket.
    pub daily_days: u32,
}

impl BehaviourSpec {
    /// The first day still kept, given today's local day number.
    pub fn retention_start(&self, today: i32) -> i32 {
        today - self.retention_days as i32 + 1
    }

    /// The first day that is always kept at day precision.
    pub fn daily_start(&self, today: i32) -> i32 {
        today - self.daily_days as i32 + 1
    }

    /// True when month `m` is kept as one bucket (all its days are older
    /// than the daily window).
    pub fn month_rolled(&self, m: u32, today: i32) -> bool {
        time::month_last_day(m) < self.daily_start(today)
    }

    /// The bucket an event on `day` goes into, or `None` when it is already
    /// past retention.
    pub fn bucket_for(&self, day: i32, today: i32) -> Option<time::Bucket> {
        if day < self.retention_start(today) {
            return None;
        }
        let m = time::month_of(day);
        Some(if self.month_rolled(m, today) {
            time::Bucket::Month(m)
        } else {
            time::Bucket::Day(day)
        })
    }
}

/// How a field's values combine when two customers merge into one (OneID):
/// the survivor's value becomes the rule applied to both values. A
/// behaviour field always takes the union of both customers' days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeRule {
    /// The survivor's value; the absorbed customer's if the survivor has none.
    #[default]
    Keep,
    /// Integers: the sum (a counter: orders, spend).
    Sum,
    /// Integers: the smaller (a first day).
    Min,
    /// Integers: the larger (a last day, a highest level).
    Max,
    /// Enumerated: the value declared first of the two.
    First,
    /// Enumerated: the value declared last of the two (a lifecycle stage
    /// declared in order).
    Last,
    /// Integers and enumerated: the value written last (by the store's
    /// clock). The store keeps when each customer's value was written in
    /// a companion integer field, [`written_at_field`] (Unix ms, merged by
    /// `max`), created and dropped with the field.
    Latest,
}

/// The companion field of a field whose merge rule is
/// [`MergeRule::Latest`]: when each customer's value was last written.
pub fn written_at_field(name: &str) -> String {
    format!("{name}_at_ms")
}

impl MergeRule {
    pub const ALL: [MergeRule; 7] = [
        MergeRule::Keep,
        MergeRule::Sum,
        MergeRule::Min,
        MergeRule::Max,
        MergeRule::First,
        MergeRule::Last,
        MergeRule::Latest,
    ];

    /// The word clients use (`keep`, `sum`, `min`, `max`, `first`, `last`,
    /// `latest`).
    pub fn word(self) -> &'static str {
        match self {
            MergeRule::Keep => "keep",
            MergeRule::Sum => "sum",
            MergeRule::Min => "min",
            MergeRule::Max => "max",
            MergeRule::First => "first",
            MergeRule::Last => "last",
            MergeRule::Latest => "latest",
        }
    }

    /// The rule a word names; the empty word is the default, `keep`.
    pub fn parse(word: &str) -> Result<MergeRule> {
        if word.is_empty() {
            return Ok(MergeRule::Keep);
        }
        MergeRule::ALL
            .into_iter()
            .find(|r| r.word() == word)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown merge rule {word:?}: keep, latest, sum, min, max (integers), first or last (enumerated)"
                ))
            })
    }

    /// Its byte in the log and the manifest.
    pub fn code(self) -> u8 {
        match self {
            MergeRule::Keep => 0,
            MergeRule::Sum => 1,
            MergeRule::Min => 2,
            MergeRule::Max => 3,
            MergeRule::First => 4,
            MergeRule::Last => 5,
            MergeRule::Latest => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<MergeRule> {
        MergeRule::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Checks that the rule fits a field of `kind`.
    pub fn validate(self, kind: &FieldKind) -> Result<()> {
        let fits = match kind {
            FieldKind::Int => matches!(
                self,
                MergeRule::Keep
                    | MergeRule::Sum
                    | MergeRule::Min
                    | MergeRule::Max
                    | MergeRule::Latest
            ),
            FieldKind::Enum { .. } => matches!(
                self,
                MergeRule::Keep | MergeRule::First | MergeRule::Last | MergeRule::Latest
            ),
            FieldKind::Behaviour(_) => self == MergeRule::Keep,
        };
        if fits {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "merge rule {:?} does not fit a {} field (integers: keep, latest, sum, min, max; enumerated: keep, latest, first, last; behaviours always take the union of both customers' days)",
                self.word(),
                kind.name()
            )))
        }
    }
}

/// What kind of field a field is: integer, enumerated or behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldKind {
    Int,
    Enum { values: Vec<String> },
    Behaviour(BehaviourSpec),
}

impl FieldKind {
    pub fn name(&self) -> &'static str {
        match self {
            FieldKind::Int => "integer",
            FieldKind::Enum { .. } => "enumerated",
            FieldKind::Behaviour(_) => "behaviour",
        }
    }

    /// Checks a kind given by a client.
    pub fn validate(&self) -> Result<()> {
        match self {
            FieldKind::Int => Ok(()),
            FieldKind::Enum { values } => {
                if values.is_empty() || values.len() > MAX_ENUM_VALUES {
                    return Err(Error::invalid(format!(
                        "an enumerated field needs 1 to {MAX_ENUM_VALUES} values, got {}",
                        values.len()
                    )));
                }
                let mut seen = std::collections::HashSet::new();
                for v in values {
                    check_enum_value(v)?;
                    if !seen.insert(v.as_str()) {
                        return Err(Error::invalid(format!("value {v:?} is declared twice")));
                    }
                }
                Ok(())
            }
            FieldKind::Behaviour(s) => {
                time::zone(&s.time_zone)?;
                if s.retention_days == 0 || s.retention_days > MAX_RETENTION_DAYS {
                    return Err(Error::invalid(format!(
                        "retention_days must be 1 to {MAX_RETENTION_DAYS}, got {}",
                        s.retention_days
                    )));
                }
                if s.daily_days == 0 || s.daily_days > s.retention_days {
                    return Err(Error::invalid(format!(
                        "daily_days must be 1 to retention_days ({}), got {}",
                        s.retention_days, s.daily_days
                    )));
                }
                Ok(())
            }
        }
    }

    pub fn encode(&self, e: &mut Enc) {
        match self {
            FieldKind::Int => {
                e.u8(1);
            }
            FieldKind::Enum { values } => {
                e.u8(2).u32(values.len() as u32);
                for v in values {
                    e.str(v);
                }
            }
            FieldKind::Behaviour(s) => {
                e.u8(3)
                    .str(&s.time_zone)
                    .u32(s.retention_days)
                    .u32(s.daily_days);
            }
        }
    }

    pub fn decode(d: &mut Dec) -> DecResult<Self> {
        Ok(match d.u8()? {
            1 => FieldKind::Int,
            2 => {
                let n = d.u32()? as usize;
                if n > MAX_ENUM_VALUES {
                    return d.err(format!("{n} enumerated values"));
                }
                let mut values = Vec::with_capacity(n);
                for _ in 0..n {
                    values.push(d.str()?.to_string());
                }
                FieldKind::Enum { values }
            }
            3 => FieldKind::Behaviour(BehaviourSpec {
                time_zone: d.str()?.to_string(),
                retention_days: d.u32()?,
                daily_days: d.u32()?,
            }),
            other => return d.err(format!("unknown field kind {other}")),
        })
    }
}

/// Checks an enumerated value's text.
pub fn check_enum_value(v: &str) -> Result<()> {
    if v.is_empty() || v.len() > MAX_ENUM_VALUE_BYTES || v.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "enumerated value {v:?} must be 1 to {MAX_ENUM_VALUE_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}
