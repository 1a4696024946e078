//! The field and analytics calls of `tagstore.v1.TagStore`: proto in,
//! domain calls, proto out. Kept apart from `service.rs` only for size; the
//! trait implementation there delegates here.

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;

use tonic::Status;

use crate::access::Grant;
use crate::error::Error;
use crate::fields::time;
use crate::fields::{
    BehaviourSpec, DEFAULT_DAILY_DAYS, DEFAULT_RETENTION_DAYS, FieldKind, INT_EXISTS, MergeRule,
};
use crate::names::check_key;
use crate::proto;
use crate::query::analytics::{self, MAX_OVERLAP_QUERIES};
use crate::query::{Query, parse};
use crate::server::service::{blocking, blocking_until_gone};
use crate::server::status::{query_status, to_status};
use crate::storage::{
    Combine, Engine, EventTime, Field, FieldMeta, Snapshot, Tag, ValueWrite, WriteOp,
};

/// Most value writes in one `SetValues`.
pub const MAX_VALUE_WRITES: usize = 1_000_000;
/// Most days back a profile lists behaviour dates for.
pub const MAX_RECENT_DAYS: u32 = 400;

fn invalid(msg: impl Into<String>) -> Status {
    to_status(Error::invalid(msg))
}

/// A field as the proto has it, with a lifecycle's stages.
pub(super) fn field_info(f: &Field, snap: &Snapshot) -> Result<proto::FieldInfo, Error> {
    let m: &FieldMeta = &f.meta;
    let mut info = proto::FieldInfo {
        name: m.name.to_string(),
        description: m.description.clone(),
        category: m.category.clone(),
        created_at_ms: m.created_ms,
        updated_at_ms: m.updated_ms,
        merge: match m.kind {
            // Days are unioned whatever the rule says.
            FieldKind::Behaviour(_) => "union".to_string(),
            _ => m.merge.word().to_string(),
        },
        ..Default::default()
    };
    match &m.kind {
        FieldKind::Int => {
            info.kind = proto::FieldKind::Integer as i32;
            info.customers_with_value = f.slot(INT_EXISTS)?.map_or(0, |b| b.len());
        }
        FieldKind::Enum { values } => {
            info.kind = proto::FieldKind::Enum as i32;
            info.values = values.clone();
            let mut n = 0;
            for b in f.slots.values() {
                n += b.get()?.len();
            }
            info.customers_with_value = n;
            if let Some(r) = snap.rules.get(&m.name) {
                info.stages = super::rules::stages(f, r)?;
            }
        }
        FieldKind::Behaviour(s) => {
            info.kind = proto::FieldKind::Behaviour as i32;
            info.time_zone = s.time_zone.clone();
            info.retention_days = s.retention_days;
            info.daily_days = s.daily_days;
        }
    }
    Ok(info)
}

fn kind_of(r: &proto::CreateFieldRequest, default_tz: &str) -> Result<FieldKind, Status> {
    let kind = proto::FieldKind::try_from(r.kind).unwrap_or(proto::FieldKind::Unspecified);
    let only_behaviour = !r.time_zone.is_empty() || r.retention_days != 0 || r.daily_days != 0;
    match kind {
        proto::FieldKind::Unspecified => Err(invalid(
            "kind is required: FIELD_KIND_INTEGER, FIELD_KIND_ENUM or FIELD_KIND_BEHAVIOUR",
        )),
        proto::FieldKind::Integer | proto::FieldKind::Enum if only_behaviour => Err(invalid(
            "time_zone, retention_days and daily_days apply to behaviour fields only",
        )),
        proto::FieldKind::Integer if !r.values.is_empty() => {
            Err(invalid("values apply to enumerated fields only"))
        }
        proto::FieldKind::Integer => Ok(FieldKind::Int),
        proto::FieldKind::Enum => Ok(FieldKind::Enum {
            values: r.values.clone(),
        }),
        proto::FieldKind::Behaviour if !r.values.is_empty() => {
            Err(invalid("values apply to enumerated fields only"))
        }
        proto::FieldKind::Behaviour => {
            let retention_days = match r.retention_days {
                0 => DEFAULT_RETENTION_DAYS,
                n => n,
            };
            Ok(FieldKind::Behaviour(BehaviourSpec {
                time_zone: if r.time_zone.is_empty() {
                    default_tz.to_string()
                } else {
                    r.time_zone.clone()
                },
                retention_days,
                daily_days: match r.daily_days {
                    0 => DEFAULT_DAILY_DAYS.min(retention_days),
                    n => n,
                },
            }))
        }
    }
}

pub(super) async fn create_field(
    engine: &Engine,
    r: proto::CreateFieldRequest,
    default_tz: &str,
) -> Result<proto::CreateFieldResponse, Status> {
    let kind = kind_of(&r, default_tz)?;
    let merge = MergeRule::parse(&r.merge).map_err(to_status)?;
    let res = engine
        .write(WriteOp::CreateField {
            name: r.name.clone(),
            description: r.description,
            category: r.category,
            kind,
            merge,
            if_not_exists: r.if_not_exists,
        })
        .await
        .map_err(to_status)?;
    let snap = engine.snapshot();
    let field = match snap.field(&r.name) {
        Some(f) => Some(field_info(f, &snap).map_err(to_status)?),
        None => None,
    };
    Ok(proto::CreateFieldResponse {
        field,
        created: res.created,
    })
}

pub(super) async fn drop_field(engine: &Engine, name: String) -> Result<(), Status> {
    engine
        .write(WriteOp::DropField { name })
        .await
        .map_err(to_status)?;
    Ok(())
}

/// Most bytes of fields one `ListFields` answer holds: an enumerated field
/// may declare 1,024 values of 128 bytes, and a store may have any number
/// of fields, while a client's usual receive limit is 4 MiB.
const FIELDS_PAGE_BYTES: usize = 3584 << 10;

/// `ListFields`: the fields whose category `visible` lets through (the
/// caller's scope), in name order, from after `r.after`.
pub(super) async fn list_fields(
    engine: &Engine,
    r: proto::ListFieldsRequest,
    visible: impl Fn(&str) -> bool + Send + 'static,
) -> Result<proto::ListFieldsResponse, Status> {
    let limit = match r.limit {
        0 => usize::MAX,
        n => n as usize,
    };
    let snap = engine.snapshot();
    // Counts of customers with a value may read bitmaps from segments.
    blocking(move || {
        let start = match r.after.as_str() {
            "" => Bound::Unbounded,
            after => Bound::Excluded(Arc::<str>::from(after)),
        };
        let (mut fields, mut bytes, mut more) = (Vec::new(), 0, false);
        for (_, f) in snap.fields.range((start, Bound::Unbounded)) {
            if !visible(&f.meta.category) {
                continue;
            }
            if fields.len() >= limit {
                more = true;
                break;
            }
            let info = field_info(f, &snap).map_err(to_status)?;
            let size = prost::Message::encoded_len(&info) + 4;
            if !fields.is_empty() && bytes + size > FIELDS_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += size;
            fields.push(info);
        }
        Ok(proto::ListFieldsResponse { fields, more })
    })
    .await
}

pub(super) async fn set_values(
    engine: &Engine,
    r: proto::SetValuesRequest,
) -> Result<proto::SetValuesResponse, Status> {
    if r.writes.len() > MAX_VALUE_WRITES {
        return Err(invalid(format!(
            "{} writes in one request; the limit is {MAX_VALUE_WRITES} (split the batch)",
            r.writes.len()
        )));
    }
    let mut writes = Vec::with_capacity(r.writes.len());
    for (i, w) in r.writes.into_iter().enumerate() {
        use proto::value_write::Value;
        let (field, customer) = (w.field, w.customer);
        writes.push(match w.value {
            None => {
                return Err(invalid(format!(
                    "write {i} ({field:?} of {customer:?}) has no value: set int_value, int_add, int_max, int_min, enum_value, clear, event_at_ms or event_date"
                )));
            }
            Some(Value::IntValue(v)) => ValueWrite::Int {
                field,
                customer,
                value: Some(v),
            },
            Some(Value::EnumValue(v)) => ValueWrite::Enum {
                field,
                customer,
                value: Some(v),
            },
            Some(Value::Clear(_)) => {
                // The engine knows the field's kind; an enumerated clear and
                // an integer clear differ only there.
                let snap = engine.snapshot();
                match snap.field(&field).map(|f| &f.meta.kind) {
                    Some(FieldKind::Enum { .. }) => ValueWrite::Enum {
                        field,
                        customer,
                        value: None,
                    },
                    Some(FieldKind::Behaviour(_)) => {
                        return Err(invalid(format!(
                            "write {i}: {field:?} is a behaviour field; events cannot be cleared (delete the customer, or let them expire)"
                        )));
                    }
                    _ => ValueWrite::Int {
                        field,
                        customer,
                        value: None,
                    },
                }
            }
            Some(Value::IntAdd(v)) => ValueWrite::Combine {
                field,
                customer,
                with: Combine::Add(v),
            },
            Some(Value::IntMax(v)) => ValueWrite::Combine {
                field,
                customer,
                with: Combine::Max(v),
            },
            Some(Value::IntMin(v)) => ValueWrite::Combine {
                field,
                customer,
                with: Combine::Min(v),
            },
            Some(Value::EventAtMs(ms)) => ValueWrite::Event {
                field,
                customer,
                at: EventTime::Ms(ms),
            },
            Some(Value::EventDate(d)) => {
                let day = time::parse_date(&d).ok_or_else(|| {
                    invalid(format!("write {i}: event_date {d:?} is not a date YYYY-MM-DD"))
                })?;
                ValueWrite::Event {
                    field,
                    customer,
                    at: EventTime::Day(day),
                }
            }
        });
    }
    let res = engine
        .write(WriteOp::SetValues { writes })
        .await
        .map_err(to_status)?;
    Ok(proto::SetValuesResponse {
        values_set: res.values_set,
        values_cleared: res.values_cleared,
        events_added: res.events_added,
        events_expired: res.events_expired,
        new_customers: res.new_customers,
        lsn: res.lsn,
    })
}

fn field_named<'s>(snap: &'s Snapshot, name: &str) -> Result<&'s Field, Status> {
    snap.field(name)
        .map(|f| &**f)
        .ok_or_else(|| to_status(Error::FieldNotFound(name.to_string())))
}

pub(super) async fn aggregate(
    engine: &Arc<Engine>,
    grant: Option<Arc<Grant>>,
    mut r: proto::AggregateRequest,
) -> Result<proto::AggregateResponse, Status> {
    let (snap, now) = super::past::read_at(
        engine,
        r.as_of.take(),
        grant,
        std::slice::from_ref(&r.query),
    )
    .await?;
    blocking_until_gone(move |abandon| {
        let field = field_named(&snap, &r.field)?;
        let q = Query::compile_at(&r.query, &snap, now).map_err(to_status)?;
        let a = analytics::aggregate(&q, field, &r.histogram_edges, abandon).map_err(to_status)?;
        let sum = i64::try_from(a.sum);
        Ok(proto::AggregateResponse {
            members: a.members,
            with_value: a.with_value,
            sum: sum.unwrap_or(if a.sum < 0 { i64::MIN } else { i64::MAX }),
            sum_overflows: sum.is_err(),
            sum_decimal: a.sum.to_string(),
            min: a.min,
            max: a.max,
            mean: a.mean(),
            histogram: a.histogram,
        })
    })
    .await
}

pub(super) async fn breakdown(
    engine: &Arc<Engine>,
    grant: Option<Arc<Grant>>,
    mut r: proto::BreakdownRequest,
) -> Result<proto::BreakdownResponse, Status> {
    use proto::breakdown_request::By;
    let limited = grant.clone();
    let (snap, now) = super::past::read_at(
        engine,
        r.as_of.take(),
        grant,
        std::slice::from_ref(&r.query),
    )
    .await?;
    if matches!(r.by, Some(By::Field(_))) && (!r.after.is_empty() || r.limit != 0) {
        return Err(invalid(
            "after and limit page a breakdown by category; a field's values come in one answer",
        ));
    }
    blocking_until_gone(move |abandon| {
        let q = Query::compile_at(&r.query, &snap, now).map_err(to_status)?;
        let (rows, total, no_value, more) = match &r.by {
            Some(By::Field(name)) => {
                let field = field_named(&snap, name)?;
                let (rows, none, total) =
                    analytics::breakdown_by_field(&q, field, abandon).map_err(to_status)?;
                (rows, total, none, false)
            }
            Some(By::Category(c)) => {
                // The caller's scope applies while the page is picked: a
                // page is never empty while more follow.
                let visible = |t: &Tag| {
                    limited
                        .as_ref()
                        .is_none_or(|g| super::scope::visible(g, &snap, &t.meta.name, c))
                };
                let (tags, more) = category_page(&snap, c, &r.after, r.limit, visible)?;
                let (rows, total) =
                    analytics::breakdown_by_tags(&q, &tags, abandon).map_err(to_status)?;
                (rows, total, 0, more)
            }
            None => return Err(invalid("name a field or a category to break down by")),
        };
        Ok(proto::BreakdownResponse {
            rows: rows
                .into_iter()
                .map(|s| proto::BreakdownRow {
                    label: s.label,
                    count: s.count,
                })
                .collect(),
            total,
            no_value,
            more,
        })
    })
    .await
}

/// Most bytes of rows one `Breakdown` by category answers with (a client's
/// usual receive limit is 4 MiB; a tag's name is up to 200 bytes).
const BREAKDOWN_PAGE_BYTES: usize = 3584 << 10;

/// The tags of `category` a page of its breakdown counts: those `visible`
/// lets through, named after `after`, in name order, at most `limit` (0:
/// no limit by count) and about [`BREAKDOWN_PAGE_BYTES`] of rows, at least
/// one while any follows; with whether more follow. A category no tag has
/// is INVALID_ARGUMENT.
fn category_page<'s>(
    snap: &'s Snapshot,
    category: &str,
    after: &str,
    limit: u32,
    visible: impl Fn(&Tag) -> bool,
) -> Result<(Vec<&'s Tag>, bool), Status> {
    let limit = match limit {
        0 => usize::MAX,
        n => n as usize,
    };
    let start = match after {
        "" => Bound::Unbounded,
        after => Bound::Excluded(Arc::<str>::from(after)),
    };
    let (mut tags, mut bytes, mut more) = (Vec::new(), 0, false);
    for (_, t) in snap.tags.range((start, Bound::Unbounded)) {
        if t.meta.category != category || !visible(t) {
            continue;
        }
        let row = proto::BreakdownRow {
            label: t.meta.name.to_string(),
            count: u64::MAX,
        };
        let size = prost::Message::encoded_len(&row) + 4;
        if tags.len() >= limit || (!tags.is_empty() && bytes + size > BREAKDOWN_PAGE_BYTES) {
            more = true;
            break;
        }
        bytes += size;
        tags.push(&**t);
    }
    if tags.is_empty() && !snap.tags.values().any(|t| t.meta.category == category) {
        return Err(invalid(format!("no tag has the category {category:?}")));
    }
    Ok((tags, more))
}

pub(super) async fn top_tags(
    engine: &Arc<Engine>,
    grant: Option<Arc<Grant>>,
    mut r: proto::TopTagsRequest,
) -> Result<proto::TopTagsResponse, Status> {
    let k = match r.k {
        0 => 10,
        n if n > 1000 => return Err(invalid(format!("k {n} is over the limit of 1000"))),
        n => n as usize,
    };
    let limited = grant.clone();
    let (snap, now) = super::past::read_at(
        engine,
        r.as_of.take(),
        grant,
        std::slice::from_ref(&r.query),
    )
    .await?;
    blocking_until_gone(move |abandon| {
        let expr = parse(&r.query).map_err(to_status)?;
        let q = Query::from_expr_at(&expr, &snap, now).map_err(to_status)?;
        // The tags the query names, also through the saved audiences it
        // names (a lift of those says nothing new).
        let mut named = Vec::new();
        if !crate::query::eval::names_reached(&expr, &snap, &mut named, &mut Vec::new()) {
            let mut direct = Vec::new();
            expr.tag_names(&mut direct);
            named = direct.into_iter().map(str::to_string).collect();
        }
        let mut exclude: HashSet<&str> = if r.include_query_tags {
            HashSet::new()
        } else {
            named.iter().map(String::as_str).collect()
        };
        if let Some(g) = &limited {
            // The rule tags of audiences kept current that reach other
            // categories (a limited token names its own category).
            exclude.extend(
                snap.audiences
                    .keys()
                    .map(|a| &**a)
                    .filter(|a| !super::scope::visible(g, &snap, a, &r.category)),
            );
        }
        let category = (!r.category.is_empty()).then_some(r.category.as_str());
        let (rows, audience, customers) =
            analytics::top_tags(&q, &snap, k, category, &exclude, r.min_count, abandon)
                .map_err(to_status)?;

        Ok(proto::TopTagsResponse {
            tags: rows
                .into_iter()
                .map(|l| proto::TagLift {
                    tag: l.tag,
                    in_audience: l.in_audience,
                    overall: l.overall,
                    lift: l.lift,
                })
                .collect(),
            audience,
            customers,
        })
    })
    .await
}

pub(super) async fn overlap(
    engine: &Arc<Engine>,
    grant: Option<Arc<Grant>>,
    mut r: proto::OverlapRequest,
) -> Result<proto::OverlapResponse, Status> {
    let n = r.queries.len();
    if n == 0 || n > MAX_OVERLAP_QUERIES {
        return Err(invalid(format!(
            "overlap takes 1 to {MAX_OVERLAP_QUERIES} queries, got {n}"
        )));
    }
    let (snap, now): (Arc<Snapshot>, i64) =
        super::past::read_at(engine, r.as_of.take(), grant, &r.queries).await?;
    blocking_until_gone(move |abandon| {
        let queries = r
            .queries
            .iter()
            .enumerate()
            .map(|(i, q)| Query::compile_at(q, &snap, now).map_err(|e| query_status(e, Some(i))))
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(proto::OverlapResponse {
            size: n as u32,
            counts: analytics::overlap(&queries, abandon).map_err(to_status)?,
        })
    })
    .await
}

/// The field values of one customer, for `Profile`.
pub(super) fn profile_values(
    snap: &Snapshot,
    id: u32,
    recent_days: u32,
    now_ms: i64,
) -> Result<Vec<proto::FieldValue>, Status> {
    use proto::field_value::Value;
    let recent = match recent_days {
        0 => 30,
        n if n > MAX_RECENT_DAYS => {
            return Err(invalid(format!(
                "recent_days {n} is over the limit of {MAX_RECENT_DAYS}"
            )));
        }
        n => n,
    };
    let mut out = Vec::new();
    for f in snap.fields.values() {
        let value = match &f.meta.kind {
            FieldKind::Int => f.int_value(id).map_err(to_status)?.map(Value::IntValue),
            FieldKind::Enum { values } => f
                .enum_value(id)
                .map_err(to_status)?
                .and_then(|s| values.get(s as usize))
                .map(|v| Value::EnumValue(v.clone())),
            FieldKind::Behaviour(spec) => {
                let tz = time::zone(&spec.time_zone).map_err(to_status)?;
                let today = time::day_of(now_ms, &tz).map_err(to_status)?;
                let from = (today - recent as i32 + 1).max(spec.retention_start(today));
                let mut dates = Vec::new();
                for (&slot, b) in f
                    .slots
                    .range(from.max(0) as u32..=today.max(0) as u32)
                    .rev()
                {
                    if b.get().map_err(to_status)?.contains(id) {
                        dates.push(time::format_day(slot as i32));
                    }
                }
                (!dates.is_empty()).then_some(Value::Recent(proto::RecentDays { dates }))
            }
        };
        if let Some(value) = value {
            out.push(proto::FieldValue {
                field: f.meta.name.to_string(),
                value: Some(value),
            });
        }
    }
    Ok(out)
}

/// Checks a customer key given to `Profile`.
pub(super) fn check_customer(key: &str) -> Result<(), Status> {
    check_key(key).map_err(|e| to_status(e.into()))
}
