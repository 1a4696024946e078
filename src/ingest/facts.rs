//! Facts from events: which fields an event changes, and how. An order adds
//! to `order_count` and `total_spend_fen` (overall and per channel), moves
//! `first_order_day` and `last_order_day`, and records the behaviour
//! `bought:{category}`; a refund takes back the count and the money; a like
//! on Douyin records `interacted:douyin`; a store visit `visited:store`.
//! Every change is a server-side combine ([`Combine`]) or a behaviour
//! event, so facts stay exact however events are split into requests and
//! whatever order orders and their refunds arrive in: sums commute, and
//! minimum and maximum days do too.
//!
//! The rules are data: [`Facts::standard`] is the set above; a deployment
//! may declare its own in TOML ([`Facts::parse`]):
//!
//! ```toml
//! time_zone = "Asia/Shanghai"     # which local day an event falls on
//! [[behaviours]]
//! events = ["order"]
//! field = "bought:{category}"     # {channel} {event} {category} {brand} {store} {item}
//! [[counters]]
//! events = ["order"]
//! field = "total_spend_fen"
//! add = "amount"                  # 1, -1, amount or -amount
//! [[days]]
//! events = ["*"]
//! field = "last_active_day"
//! keep = "max"                    # min or max
//! ```
//!
//! A rule whose field name needs a part the event lacks (a category) does
//! not apply to that event. Days are local days in the facts' time zone,
//! counted from 1970-01-01 (day 0), as the query language's day arithmetic
//! takes them.
//!
//! A refund takes its order back. Its own rules subtract what sums (the
//! count, the money; a refund's amount counts as money returned whatever
//! its sign in the source). What nothing subtracts — the order's behaviours
//! and days, such as `bought:{category}` and `last_order_day` — is taken
//! back by leaving the order out: a refund that names its order (the same
//! source and source event id, as marketplace exports do) and comes before
//! it or in the same request makes the order write only its sums; and a
//! rebuild of a customer's facts pairs every refund with its order, in
//! whatever order they came. (A refund that comes in a later request than
//! its order subtracts the sums at once and makes the customer's facts due
//! a rebuild; the order's behaviours and days stay until the server's
//! rebuilder, or a `RebuildFacts`, rebuilds them.)
//!
//! This room owns turning one event into writes. It writes nothing.

use std::collections::BTreeSet;

use jiff::tz::TimeZone;
use serde::Deserialize;

use super::event::Event;
use super::normalize::Refused;
use crate::fields::{MergeRule, time};
use crate::storage::{Combine, EventTime, ValueWrite};

/// Longest facts definition, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;
/// Most rules of each kind.
pub const MAX_RULES: usize = 256;

/// The standard rules (the module's documentation describes them).
const STANDARD: &str = r#"
time_zone = "Asia/Shanghai"

[[behaviours]]
events = ["order"]
field = "bought:{category}"
[[behaviours]]
events = ["order"]
field = "ordered:{channel}"
[[behaviours]]
events = ["view", "like", "comment", "share", "follow", "add_to_cart"]
field = "interacted:{channel}"
[[behaviours]]
events = ["view"]
field = "viewed:{category}"
[[behaviours]]
events = ["add_to_cart"]
field = "carted:{category}"
[[behaviours]]
events = ["store_visit"]
field = "visited:store"

[[counters]]
events = ["order"]
field = "order_count"
add = "1"
[[counters]]
events = ["refund"]
field = "order_count"
add = "-1"
[[counters]]
events = ["order"]
field = "order_count:{channel}"
add = "1"
[[counters]]
events = ["refund"]
field = "order_count:{channel}"
add = "-1"
[[counters]]
events = ["order"]
field = "total_spend_fen"
add = "amount"
[[counters]]
events = ["refund"]
field = "total_spend_fen"
add = "-amount"
[[counters]]
events = ["order"]
field = "spend_fen:{channel}"
add = "amount"
[[counters]]
events = ["refund"]
field = "spend_fen:{channel}"
add = "-amount"

[[days]]
events = ["order"]
field = "first_order_day"
keep = "min"
[[days]]
events = ["order"]
field = "last_order_day"
keep = "max"
[[days]]
events = ["*"]
field = "last_active_day"
keep = "max"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    #[serde(default = "shanghai")]
    time_zone: String,
    #[serde(default)]
    behaviours: Vec<BehaviourDef>,
    #[serde(default)]
    counters: Vec<CounterDef>,
    #[serde(default)]
    days: Vec<DayDef>,
}

fn shanghai() -> String {
    "Asia/Shanghai".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourDef {
    events: Vec<String>,
    field: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterDef {
    events: Vec<String>,
    field: String,
    add: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DayDef {
    events: Vec<String>,
    field: String,
    keep: String,
}

/// What a counter adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adds {
    One,
    MinusOne,
    Money,
    MinusMoney,
}

/// Which events a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Events {
    All,
    These(BTreeSet<String>),
}

impl Events {
    fn new(list: Vec<String>) -> Result<Events, String> {
        if list.is_empty() {
            return Err("events is empty (\"*\" means every event)".into());
        }
        if list.iter().any(|e| e == "*") {
            return Ok(Events::All);
        }
        Ok(Events::These(list.into_iter().collect()))
    }

    fn matches(&self, event_type: &str) -> bool {
        match self {
            Events::All => true,
            Events::These(s) => s.contains(event_type),
        }
    }
}

/// A field name with `{part}` placeholders, split once into literal text
/// and parts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Part(Part),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Channel,
    Event,
    Category,
    Brand,
    Store,
    Item,
}

const PARTS: &[(&str, Part)] = &[
    ("channel", Part::Channel),
    ("event", Part::Event),
    ("category", Part::Category),
    ("brand", Part::Brand),
    ("store", Part::Store),
    ("item", Part::Item),
];

impl Pattern {
    fn new(text: String) -> Result<Pattern, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("field {text:?} has a {{ without its }}"))?;
            let name = &rest[open + 1..open + close];
            let part = PARTS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| *p)
                .ok_or_else(|| {
                    format!(
                        "field {text:?} names {{{name}}}; the parts are {}",
                        PARTS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    )
                })?;
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            literal.push_str(&rest[..open]);
            literal.push('x');
            pieces.push(Piece::Part(part));
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        literal.push_str(rest);
        crate::names::check_tag_name(&literal).map_err(|e| e.to_string())?;
        Ok(Pattern(pieces))
    }

    /// The field's name for this event; `None` if a part is missing.
    fn name(&self, e: &Event) -> Option<String> {
        let mut out = String::with_capacity(32);
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Part(p) => out.push_str(match p {
                    Part::Channel => e.channel.as_str(),
                    Part::Event => e.event_type.as_str(),
                    Part::Category => e.category.as_deref()?,
                    Part::Brand => e.brand.as_deref()?,
                    Part::Store => e.store.as_deref()?,
                    Part::Item => e.item.as_deref()?,
                }),
            }
        }
        Some(out)
    }

    /// True when some event could give this field `name`: the texts in
    /// order, each part standing for one or more characters.
    fn matches(&self, name: &str) -> bool {
        fn rest(pieces: &[Piece], name: &str) -> bool {
            match pieces.split_first() {
                None => name.is_empty(),
                Some((Piece::Text(t), more)) => {
                    name.strip_prefix(t.as_str()).is_some_and(|n| rest(more, n))
                }
                Some((Piece::Part(_), more)) => name
                    .char_indices()
                    .skip(1)
                    .map(|(i, _)| i)
                    .chain(std::iter::once(name.len()))
                    .filter(|&i| i > 0)
                    .any(|i| rest(more, &name[i..])),
            }
        }
        rest(&self.0, name)
    }
}

/// The kind of field a fact writes, for creating it when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactKind {
    Integer,
    Behaviour,
}

/// One field an event changes, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub field: String,
    pub kind: FactKind,
    pub write: FactWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactWrite {
    Combine(Combine),
    Event(i64),
}

/// The event type a refund takes back.
pub const ORDER: &str = "order";
/// The event type that takes an order back.
pub const REFUND: &str = "refund";

impl Fact {
    /// True for a sum (a count, money), which a refund's own rules
    /// subtract; false for a behaviour or a day, which only leaving the
    /// order out takes back.
    pub fn is_sum(&self) -> bool {
        matches!(self.write, FactWrite::Combine(Combine::Add(_)))
    }

    /// How the field combines when customers merge: counters add up, days
    /// keep the extreme their write keeps, behaviours take the union.
    pub fn merge_rule(&self) -> MergeRule {
        match self.write {
            FactWrite::Combine(Combine::Add(_)) => MergeRule::Sum,
            FactWrite::Combine(Combine::Max(_)) => MergeRule::Max,
            FactWrite::Combine(Combine::Min(_)) => MergeRule::Min,
            FactWrite::Event(_) => MergeRule::Keep,
        }
    }

    /// The write for the customer with `key`.
    pub fn value_write(&self, key: &str) -> ValueWrite {
        self.clone().into_value_write(key)
    }

    /// [`Fact::value_write`], taking the fact's field name instead of a copy.
    pub fn into_value_write(self, key: &str) -> ValueWrite {
        match self.write {
            FactWrite::Combine(with) => ValueWrite::Combine {
                field: self.field,
                customer: key.to_string(),
                with,
            },
            FactWrite::Event(ms) => ValueWrite::Event {
                field: self.field,
                customer: key.to_string(),
                at: EventTime::Ms(ms),
            },
        }
    }
}

/// The rules that turn events into facts.
#[derive(Debug, Clone)]
pub struct Facts {
    pub definition: String,
    zone: TimeZone,
    behaviours: Vec<(Events, Pattern)>,
    counters: Vec<(Events, Pattern, Adds)>,
    days: Vec<(Events, Pattern, bool)>,
}

impl Facts {
    /// The standard rules.
    pub fn standard() -> Facts {
        Facts::parse(STANDARD).unwrap_or_else(|e| unreachable!("the standard facts: {e}"))
    }

    /// Parses and checks a definition.
    pub fn parse(definition: &str) -> Result<Facts, Refused> {
        let err = |m: String| Refused(format!("facts: {m}"));
        if definition.len() > MAX_DEFINITION_BYTES {
            return Err(err(format!(
                "the definition is {} bytes; at most {MAX_DEFINITION_BYTES}",
                definition.len()
            )));
        }
        let d: Definition = toml::from_str(definition).map_err(|e| err(e.to_string()))?;
        if d.behaviours.len().max(d.counters.len()).max(d.days.len()) > MAX_RULES {
            return Err(err(format!("more than {MAX_RULES} rules of one kind")));
        }
        let zone = TimeZone::get(&d.time_zone)
            .map_err(|_| err(format!("time_zone {:?} is not a known zone", d.time_zone)))?;
        let mut behaviours = Vec::new();
        for b in d.behaviours {
            behaviours.push((
                Events::new(b.events).map_err(err)?,
                Pattern::new(b.field).map_err(err)?,
            ));
        }
        let mut counters = Vec::new();
        for c in d.counters {
            let amount = match c.add.as_str() {
                "1" => Adds::One,
                "-1" => Adds::MinusOne,
                "amount" => Adds::Money,
                "-amount" => Adds::MinusMoney,
                other => {
                    return Err(err(format!(
                        "counter {:?} adds {other:?}; it may add 1, -1, amount or -amount",
                        c.field
                    )));
                }
            };
            counters.push((
                Events::new(c.events).map_err(err)?,
                Pattern::new(c.field).map_err(err)?,
                amount,
            ));
        }
        let mut days = Vec::new();
        for dd in d.days {
            let max = match dd.keep.as_str() {
                "max" => true,
                "min" => false,
                other => {
                    return Err(err(format!(
                        "day {:?} keeps {other:?}; it may keep min or max",
                        dd.field
                    )));
                }
            };
            days.push((
                Events::new(dd.events).map_err(err)?,
                Pattern::new(dd.field).map_err(err)?,
                max,
            ));
        }
        Ok(Facts {
            definition: definition.to_string(),
            zone,
            behaviours,
            counters,
            days,
        })
    }

    /// The kind of field a rule could write under `name`, if one could:
    /// the fields a rebuild of facts starts afresh.
    pub fn may_write(&self, name: &str) -> Option<FactKind> {
        if self.behaviours.iter().any(|(_, p)| p.matches(name)) {
            return Some(FactKind::Behaviour);
        }
        let counters = self.counters.iter().map(|(_, p, _)| p);
        let days = self.days.iter().map(|(_, p, _)| p);
        counters
            .chain(days)
            .any(|p| p.matches(name))
            .then_some(FactKind::Integer)
    }

    /// Every fact one event gives, in rule order.
    pub fn of(&self, e: &Event) -> Result<Vec<Fact>, Refused> {
        let mut out =
            Vec::with_capacity(self.behaviours.len() + self.counters.len() + self.days.len());
        for (events, pattern) in &self.behaviours {
            if let Some(field) = events
                .matches(&e.event_type)
                .then(|| pattern.name(e))
                .flatten()
            {
                out.push(Fact {
                    field,
                    kind: FactKind::Behaviour,
                    write: FactWrite::Event(e.at_ms),
                });
            }
        }
        // Money returned counts as returned whatever its sign in the source.
        let amount = e
            .amount_fen
            .map(|a| if e.event_type == "refund" { a.abs() } else { a });
        for (events, pattern, add) in &self.counters {
            if !events.matches(&e.event_type) {
                continue;
            }
            let Some(field) = pattern.name(e) else {
                continue;
            };
            let n = match add {
                Adds::One => 1,
                Adds::MinusOne => -1,
                Adds::Money => match amount {
                    Some(a) => a,
                    None => continue,
                },
                Adds::MinusMoney => match amount {
                    Some(a) => a
                        .checked_neg()
                        .ok_or_else(|| Refused(format!("amount {a} fen cannot be taken back")))?,
                    None => continue,
                },
            };
            out.push(Fact {
                field,
                kind: FactKind::Integer,
                write: FactWrite::Combine(Combine::Add(n)),
            });
        }
        if !self.days.is_empty() {
            let day = i64::from(
                time::day_of(e.at_ms, &self.zone).map_err(|err| Refused(err.to_string()))?,
            );
            for (events, pattern, max) in &self.days {
                if !events.matches(&e.event_type) {
                    continue;
                }
                let Some(field) = pattern.name(e) else {
                    continue;
                };
                out.push(Fact {
                    field,
                    kind: FactKind::Integer,
                    write: FactWrite::Combine(if *max {
                        Combine::Max(day)
                    } else {
                        Combine::Min(day)
                    }),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::Identity;
    use std::collections::BTreeMap;

    fn event(event_type: &str, channel: &str, at_ms: i64, amount: Option<i64>) -> Event {
        Event {
            source_event_id: Some("e1".into()),
            identities: vec![Identity {
                kind: "phone".into(),
                value: "13812345678".into(),
            }],
            channel: channel.into(),
            event_type: event_type.into(),
            at_ms,
            amount_fen: amount,
            item: None,
            category: Some("skincare".into()),
            brand: None,
            store: None,
            attributes: BTreeMap::new(),
        }
    }

    fn names(facts: &[Fact]) -> Vec<(&str, FactWrite)> {
        facts.iter().map(|f| (f.field.as_str(), f.write)).collect()
    }

    // 2026-11-12 00:00:00 in Shanghai; day 20769 there.
    const MIDNIGHT: i64 = 1_794_412_800_000;
    const DAY: i64 = 20_769;

    #[test]
    fn an_order_and_its_refund() {
        let f = Facts::standard();
        let order = f
            .of(&event("order", "jd", MIDNIGHT, Some(129_900)))
            .unwrap();
        assert_eq!(
            names(&order),
            vec![
                ("bought:skincare", FactWrite::Event(MIDNIGHT)),
                ("ordered:jd", FactWrite::Event(MIDNIGHT)),
                ("order_count", FactWrite::Combine(Combine::Add(1))),
                ("order_count:jd", FactWrite::Combine(Combine::Add(1))),
                ("total_spend_fen", FactWrite::Combine(Combine::Add(129_900))),
                ("spend_fen:jd", FactWrite::Combine(Combine::Add(129_900))),
                ("first_order_day", FactWrite::Combine(Combine::Min(DAY))),
                ("last_order_day", FactWrite::Combine(Combine::Max(DAY))),
                ("last_active_day", FactWrite::Combine(Combine::Max(DAY))),
            ]
        );
        // A refund written as a negative amount (a POS return) or a positive
        // one (a marketplace refund) takes back the same money.
        for amount in [129_900, -129_900] {
            let refund = f
                .of(&event("refund", "jd", MIDNIGHT + 1, Some(amount)))
                .unwrap();
            assert_eq!(
                names(&refund),
                vec![
                    ("order_count", FactWrite::Combine(Combine::Add(-1))),
                    ("order_count:jd", FactWrite::Combine(Combine::Add(-1))),
                    (
                        "total_spend_fen",
                        FactWrite::Combine(Combine::Add(-129_900))
                    ),
                    ("spend_fen:jd", FactWrite::Combine(Combine::Add(-129_900))),
                    ("last_active_day", FactWrite::Combine(Combine::Max(DAY))),
                ]
            );
        }
        // One millisecond before midnight is the day before.
        let late = f.of(&event("like", "douyin", MIDNIGHT - 1, None)).unwrap();
        assert_eq!(
            names(&late),
            vec![
                ("interacted:douyin", FactWrite::Event(MIDNIGHT - 1)),
                ("last_active_day", FactWrite::Combine(Combine::Max(DAY - 1))),
            ]
        );
    }

    #[test]
    fn rules_missing_a_part_do_not_apply() {
        let f = Facts::standard();
        let mut e = event("order", "store", MIDNIGHT, None);
        e.category = None;
        let got = f.of(&e).unwrap();
        assert!(got.iter().all(|x| !x.field.starts_with("bought:")));
        // Without an amount, the count still moves; the money does not.
        assert!(got.iter().any(|x| x.field == "order_count"));
        assert!(got.iter().all(|x| x.field != "total_spend_fen"));
    }

    #[test]
    fn the_fields_a_rule_could_write_are_known_by_name() {
        let f = Facts::standard();
        assert_eq!(f.may_write("bought:skincare"), Some(FactKind::Behaviour));
        assert_eq!(f.may_write("bought:护肤"), Some(FactKind::Behaviour));
        assert_eq!(f.may_write("visited:store"), Some(FactKind::Behaviour));
        assert_eq!(f.may_write("order_count"), Some(FactKind::Integer));
        assert_eq!(f.may_write("order_count:jd"), Some(FactKind::Integer));
        assert_eq!(f.may_write("spend_fen:tmall"), Some(FactKind::Integer));
        assert_eq!(f.may_write("last_active_day"), Some(FactKind::Integer));
        // A part stands for at least one character; other names are not facts'.
        assert_eq!(f.may_write("bought:"), None);
        assert_eq!(f.may_write("order_count:"), None);
        assert_eq!(f.may_write("lifetime_value"), None);
        assert_eq!(f.may_write("vip"), None);
        let two = Facts::parse(
            r#"
            time_zone = "UTC"
            [[behaviours]]
            events = ["order"]
            field = "{channel}:{category}:x"
            "#,
        )
        .unwrap();
        assert_eq!(two.may_write("jd:a:b:x"), Some(FactKind::Behaviour));
        assert_eq!(two.may_write("jd::x"), None);
        assert_eq!(two.may_write("jd:a:y"), None);
    }

    #[test]
    fn declared_rules_are_checked() {
        let ok = "[[counters]]\nevents = [\"order\"]\nfield = \"orders:{brand}\"\nadd = \"1\"\n";
        let f = Facts::parse(ok).unwrap();
        let mut e = event("order", "jd", MIDNIGHT, None);
        e.brand = Some("兰蔻".into());
        assert_eq!(f.of(&e).unwrap()[0].field, "orders:兰蔻");
        for (def, want) in [
            (ok.replace("\"1\"", "\"2\""), "1, -1, amount or -amount"),
            (ok.replace("{brand}", "{colour}"), "{colour}"),
            (ok.replace("{brand}", "{brand"), "without its"),
            (ok.replace("[\"order\"]", "[]"), "events is empty"),
            (format!("time_zone = \"Nowhere\"\n{ok}"), "not a known zone"),
            (
                format!("{ok}[[days]]\nevents = [\"*\"]\nfield = \"d\"\nkeep = \"first\"\n"),
                "min or max",
            ),
            (ok.replace("add", "plus"), "unknown field"),
        ] {
            let e = Facts::parse(&def).unwrap_err();
            assert!(e.0.contains(want), "{def}: {e}");
        }
    }
}
