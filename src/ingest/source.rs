//! Sources: how one channel's records map to the event model, declared in
//! TOML. A source says what its records look like (CSV with a header row,
//! or JSON Lines; UTF-8 or GBK/GB18030), which column (or JSON key) holds
//! each part of an [`Event`], how to normalise it, and which identities a
//! record names. [`Source::event`] turns one record into one event, or says
//! why it cannot.
//!
//! ```toml
//! description = "JD order export"
//! format = "csv"                  # csv | jsonl
//! encoding = "auto"               # auto | utf-8 | gbk | gb18030
//! time_zone = "Asia/Shanghai"     # for local times (the default)
//! channel = "jd"                  # a constant …
//! event_type = { column = "订单状态", map = { "完成" = "order", "退款完成" = "refund" }, ignore = ["已取消"] }
//! time = "下单时间"                # … or a column
//! event_id = "订单号"
//! amount = { column = "实付金额", unit = "yuan" }
//! category = "类目"
//! identities = [
//!   { type = "jd_pin", column = "用户账号" },
//!   { type = "phone", column = "收货人手机" },
//! ]
//! attributes = { sku = "商品编号" }
//! ```
//!
//! A value is a constant (`"jd"` where the model wants a name: channel or
//! event type) or a column (`"下单时间"`), or a table: `column`, or `value`
//! (a constant), with `map` (source values to model values), `ignore`
//! (source values whose records are not events: counted, not rejected) and
//! `default` (for an empty or missing value). In JSON Lines a column is a
//! key, with dots for nested objects (`user.openid`).
//!
//! This room owns a source's definition and applying it to one record. It
//! reads no files (see [`super::read`]) and writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use jiff::tz::TimeZone;
use serde::Deserialize;

use super::event::{self, Event, Identity, IdentityForm, MAX_ATTRIBUTES, MAX_IDENTITIES};
use super::normalize::{self, AmountUnit, Refused, TimeForm};

/// Longest source definition, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 64 * 1024;

/// What went wrong with a source's definition: the whole source is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("source {source_name:?}: {message}")]
pub struct DefinitionError {
    pub source_name: String,
    pub message: String,
}

/// How a source's records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// The character encoding of a source's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 when the bytes are valid UTF-8, else GB18030 (which reads GBK).
    #[default]
    Auto,
    #[serde(rename = "utf-8")]
    Utf8,
    Gbk,
    Gb18030,
}

/// One record, whatever its format: the text of a column (or JSON key).
pub trait Record {
    /// The value of `column`; `None` when the record has no such column, or
    /// its value is null.
    fn get(&self, column: &str) -> Option<&str>;
}

/// What one record became.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Event(Box<Event>),
    /// A value the source declares as not an event (`ignore`).
    Ignored,
    Rejected(Refused),
}

/// A source's definition as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    #[serde(default)]
    description: String,
    format: Format,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default = "shanghai")]
    time_zone: String,
    /// `auto`, `epoch_s` or `epoch_ms`.
    #[serde(default)]
    time_form: Option<String>,
    channel: Spec,
    event_type: Spec,
    /// Event types besides the built-in ones that this source may produce.
    #[serde(default)]
    event_types: Vec<String>,
    time: Spec,
    #[serde(default)]
    event_id: Option<Spec>,
    #[serde(default)]
    amount: Option<AmountSpec>,
    #[serde(default)]
    item: Option<Spec>,
    #[serde(default)]
    category: Option<Spec>,
    #[serde(default)]
    brand: Option<Spec>,
    #[serde(default)]
    store: Option<Spec>,
    identities: Vec<IdentitySpec>,
    #[serde(default)]
    attributes: BTreeMap<String, Spec>,
    /// Topics the server consumes this source's records from.
    #[serde(default)]
    kafka: Option<super::kafka::KafkaSpec>,
}

fn shanghai() -> String {
    "Asia/Shanghai".into()
}

/// A value as written: a bare string, or a table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Spec {
    Bare(String),
    Table(SpecTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecTable {
    #[serde(default)]
    column: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    map: BTreeMap<String, String>,
    #[serde(default)]
    ignore: Vec<String>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AmountSpec {
    column: String,
    /// `yuan` (the default) or `fen`.
    #[serde(default)]
    unit: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentitySpec {
    #[serde(rename = "type")]
    kind: String,
    column: String,
    /// For a declared (not built-in) type: whether `Ab` and `ab` are one
    /// identity. Built-in types have their own rule.
    #[serde(default)]
    case_insensitive: Option<bool>,
}

/// Where a part of the event comes from.
#[derive(Debug, Clone, PartialEq)]
enum Getter {
    Const(String),
    Column {
        column: String,
        map: BTreeMap<String, String>,
        ignore: BTreeSet<String>,
        default: Option<String>,
    },
}

/// What a getter found in a record.
enum Got<'r> {
    Value(std::borrow::Cow<'r, str>),
    Missing,
    Ignored,
}

impl Getter {
    /// A bare string is a constant where the model wants a name, else a column.
    fn from_spec(spec: Spec, bare_is_const: bool) -> Result<Getter, String> {
        match spec {
            Spec::Bare(s) if bare_is_const => Ok(Getter::Const(s)),
            Spec::Bare(column) => Ok(Getter::Column {
                column,
                map: BTreeMap::new(),
                ignore: BTreeSet::new(),
                default: None,
            }),
            Spec::Table(t) => match (t.column, t.value) {
                (Some(_), Some(_)) => Err("give either column or value, not both".into()),
                (None, Some(v)) => Ok(Getter::Const(v)),
                (Some(column), None) => Ok(Getter::Column {
                    column,
                    map: t.map,
                    ignore: t.ignore.into_iter().collect(),
                    default: t.default,
                }),
                (None, None) => Err("a table needs column or value".into()),
            },
        }
    }

    fn get<'r>(&'r self, rec: &'r dyn Record) -> Got<'r> {
        match self {
            Getter::Const(v) => Got::Value(v.as_str().into()),
            Getter::Column {
                column,
                map,
                ignore,
                default,
            } => {
                let raw = rec
                    .get(column)
                    .map(|v| v.trim_matches(|c: char| c.is_whitespace() || c == '\u{3000}'))
                    .filter(|v| !v.is_empty());
                let Some(raw) = raw else {
                    return match default {
                        Some(d) => Got::Value(d.as_str().into()),
                        None => Got::Missing,
                    };
                };
                if ignore.contains(raw) {
                    return Got::Ignored;
                }
                match map.get(raw) {
                    Some(v) => Got::Value(v.as_str().into()),
                    None => Got::Value(raw.into()),
                }
            }
        }
    }

    fn column(&self) -> Option<&str> {
        match self {
            Getter::Const(_) => None,
            Getter::Column { column, .. } => Some(column),
        }
    }

    fn describe(&self) -> String {
        match self {
            Getter::Const(v) => format!("{v:?}"),
            Getter::Column { column, .. } => format!("column {column:?}"),
        }
    }
}

/// A source, checked and ready to read records.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub description: String,
    pub format: Format,
    pub encoding: Encoding,
    /// The definition as registered (returned by describe calls).
    pub definition: String,
    zone: TimeZone,
    time_form: TimeForm,
    channel: Getter,
    event_type: Getter,
    event_types: BTreeSet<String>,
    time: Getter,
    event_id: Option<Getter>,
    amount: Option<(Getter, AmountUnit)>,
    item: Option<Getter>,
    category: Option<Getter>,
    brand: Option<Getter>,
    store: Option<Getter>,
    identities: Vec<(String, IdentityForm, Getter)>,
    attributes: Vec<(String, Getter)>,
    /// The topics the server consumes the source's records from, if any.
    pub kafka: Option<super::kafka::KafkaSettings>,
}

impl Source {
    /// Parses and checks a definition.
    pub fn parse(name: &str, definition: &str) -> Result<Source, DefinitionError> {
        let err = |message: String| DefinitionError {
            source_name: name.to_string(),
            message,
        };
        event::check_name("source name", name).map_err(|e| err(e.0))?;
        if definition.len() > MAX_DEFINITION_BYTES {
            return Err(err(format!(
                "the definition is {} bytes; at most {MAX_DEFINITION_BYTES}",
                definition.len()
            )));
        }
        let d: Definition = toml::from_str(definition).map_err(|e| err(e.to_string()))?;
        let zone = TimeZone::get(&d.time_zone)
            .map_err(|_| err(format!("time_zone {:?} is not a known zone", d.time_zone)))?;
        let time_form = match d.time_form.as_deref() {
            None | Some("auto") => TimeForm::Auto,
            Some("epoch_s") => TimeForm::EpochSeconds,
            Some("epoch_ms") => TimeForm::EpochMillis,
            Some(other) => {
                return Err(err(format!(
                    "time_form {other:?} is not auto, epoch_s or epoch_ms"
                )));
            }
        };
        let named = |what: &str, spec: Spec| {
            Getter::from_spec(spec, true).map_err(|m| err(format!("{what}: {m}")))
        };
        let column = |what: &str, spec: Spec| {
            Getter::from_spec(spec, false).map_err(|m| err(format!("{what}: {m}")))
        };
        let optional = |what: &str, spec: Option<Spec>| spec.map(|s| column(what, s)).transpose();
        let mut event_types: BTreeSet<String> =
            event::EVENT_TYPES.iter().map(|s| s.to_string()).collect();
        for t in d.event_types {
            event::check_name("event type", &t).map_err(|e| err(e.0))?;
            event_types.insert(t);
        }
        let channel = named("channel", d.channel)?;
        let event_type = named("event_type", d.event_type)?;
        // Constants and mapped values are checked now, not per record.
        for (what, g) in [("channel", &channel), ("event_type", &event_type)] {
            let fixed: Vec<&String> = match g {
                Getter::Const(v) => vec![v],
                Getter::Column { map, default, .. } => map.values().chain(default).collect(),
            };
            for v in fixed {
                event::check_name(what, v).map_err(|e| err(e.0))?;
                if what == "event_type" && !event_types.contains(v) {
                    return Err(err(format!(
                        "event type {v:?} is neither built in ({}) nor declared in event_types",
                        event::EVENT_TYPES.join(", ")
                    )));
                }
            }
        }
        let amount = match d.amount {
            None => None,
            Some(a) => {
                let unit = match a.unit.as_deref() {
                    None | Some("yuan") => AmountUnit::Yuan,
                    Some("fen") => AmountUnit::Fen,
                    Some(other) => {
                        return Err(err(format!("amount unit {other:?} is not yuan or fen")));
                    }
                };
                Some((column("amount", Spec::Bare(a.column))?, unit))
            }
        };
        if d.identities.is_empty() {
            return Err(err(
                "a source must name at least one identity (identities = [{ type = …, column = … }])"
                    .into(),
            ));
        }
        if d.identities.len() > MAX_IDENTITIES {
            return Err(err(format!(
                "{} identities; at most {MAX_IDENTITIES}",
                d.identities.len()
            )));
        }
        let mut identities = Vec::new();
        for i in d.identities {
            event::check_name("identity type", &i.kind).map_err(|e| err(e.0))?;
            let form = match (event::builtin_identity(&i.kind), i.case_insensitive) {
                (Some(_), Some(_)) => {
                    return Err(err(format!(
                        "identity type {:?} is built in: its case rule cannot be changed",
                        i.kind
                    )));
                }
                (Some(f), None) => f,
                (None, ci) => IdentityForm::Plain {
                    case_insensitive: ci.unwrap_or(false),
                },
            };
            identities.push((i.kind, form, column("identity", Spec::Bare(i.column))?));
        }
        if d.attributes.len() > MAX_ATTRIBUTES {
            return Err(err(format!(
                "{} attributes; at most {MAX_ATTRIBUTES}",
                d.attributes.len()
            )));
        }
        let mut attributes = Vec::new();
        for (k, spec) in d.attributes {
            event::check_name("attribute", &k).map_err(|e| err(e.0))?;
            let g = column(&format!("attribute {k}"), spec)?;
            attributes.push((k, g));
        }
        let kafka = d
            .kafka
            .map(|k| k.check(name, d.format))
            .transpose()
            .map_err(err)?;
        Ok(Source {
            kafka,
            name: name.to_string(),
            description: d.description,
            format: d.format,
            encoding: d.encoding,
            definition: definition.to_string(),
            zone,
            time_form,
            channel,
            event_type,
            event_types,
            time: column("time", d.time)?,
            event_id: optional("event_id", d.event_id)?,
            amount,
            item: optional("item", d.item)?,
            category: optional("category", d.category)?,
            brand: optional("brand", d.brand)?,
            store: optional("store", d.store)?,
            identities,
            attributes,
        })
    }

    /// The columns a record of this source must have (the header must name
    /// them): the time's, and the channel's and event type's when they are
    /// read from a column without a default.
    pub fn required_columns(&self) -> Vec<&str> {
        let mut v = Vec::new();
        for g in [&self.time, &self.channel, &self.event_type] {
            if let Getter::Column {
                column,
                default: None,
                ..
            } = g
            {
                v.push(column.as_str());
            }
        }
        v
    }

    /// Every column the source reads.
    pub fn columns(&self) -> BTreeSet<&str> {
        let mut v: BTreeSet<&str> = BTreeSet::new();
        let optional = [
            &self.event_id,
            &self.item,
            &self.category,
            &self.brand,
            &self.store,
        ];
        for g in [&self.time, &self.channel, &self.event_type]
            .into_iter()
            .chain(optional.into_iter().flatten())
            .chain(self.amount.iter().map(|(g, _)| g))
            .chain(self.identities.iter().map(|(_, _, g)| g))
            .chain(self.attributes.iter().map(|(_, g)| g))
        {
            v.extend(g.column());
        }
        v
    }

    /// The event one record describes.
    pub fn event(&self, rec: &dyn Record) -> Outcome {
        match self.try_event(rec) {
            Ok(e) => Outcome::Event(Box::new(e)),
            Err(Skip::Ignored) => Outcome::Ignored,
            Err(Skip::Refused(e)) => Outcome::Rejected(e),
        }
    }

    fn try_event(&self, rec: &dyn Record) -> Result<Event, Skip> {
        // A value in an `ignore` list anywhere makes the record not an event.
        let value = |g: &Getter| -> Result<Option<String>, Skip> {
            match g.get(rec) {
                Got::Value(v) => Ok(Some(v.into_owned())),
                Got::Missing => Ok(None),
                Got::Ignored => Err(Skip::Ignored),
            }
        };
        let required = |what: &str, g: &Getter| -> Result<String, Skip> {
            value(g)?.ok_or_else(|| Refused(format!("{what} ({}) is empty", g.describe())).into())
        };
        let text = |g: &Option<Getter>, what: &str| -> Result<Option<String>, Skip> {
            match g {
                None => Ok(None),
                Some(g) => match value(g)? {
                    Some(v) => Ok(Some(normalize::identifier(&v, what, false)?)),
                    None => Ok(None),
                },
            }
        };
        let event_type = required("event type", &self.event_type)?;
        if !self.event_types.contains(&event_type) {
            return Err(Refused(format!(
                "event type {event_type:?} ({}) is not one the source knows (map it, ignore it, or declare it in event_types)",
                self.event_type.describe()
            ))
            .into());
        }
        let channel = required("channel", &self.channel)?;
        event::check_name("channel", &channel)?;
        let at_ms = normalize::time_ms(&required("time", &self.time)?, self.time_form, &self.zone)?;
        let mut identities = Vec::new();
        let mut refusals = Vec::new();
        for (kind, form, g) in &self.identities {
            if let Some(v) = value(g)? {
                match Identity::new(kind, *form, &v) {
                    Ok(id) => {
                        if !identities.contains(&id) {
                            identities.push(id)
                        }
                    }
                    // An unusable identity does not end the record while
                    // another one names the customer.
                    Err(e) => refusals.push(e.0),
                }
            }
        }
        if identities.is_empty() {
            return Err(Refused(if refusals.is_empty() {
                "the record names no customer (every identity column is empty)".into()
            } else {
                format!(
                    "the record names no usable customer: {}",
                    refusals.join("; ")
                )
            })
            .into());
        }
        let amount_fen = match &self.amount {
            None => None,
            Some((g, unit)) => match value(g)? {
                Some(v) => Some(normalize::amount_fen(&v, *unit)?),
                None => None,
            },
        };
        let mut attributes = BTreeMap::new();
        for (k, g) in &self.attributes {
            if let Some(v) = value(g)? {
                attributes.insert(k.clone(), normalize::text(&v, k)?);
            }
        }
        Ok(Event {
            source_event_id: text(&self.event_id, "event id")?,
            identities,
            channel,
            event_type,
            at_ms,
            amount_fen,
            item: text(&self.item, "item")?,
            category: text(&self.category, "category")?,
            brand: text(&self.brand, "brand")?,
            store: text(&self.store, "store")?,
            attributes,
        })
    }
}

/// Why a record is not an event.
enum Skip {
    Ignored,
    Refused(Refused),
}

impl From<Refused> for Skip {
    fn from(e: Refused) -> Self {
        Skip::Refused(e)
    }
}
