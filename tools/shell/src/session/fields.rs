//! The shell's field and analytics commands: `fields`, `set`, `clear`,
//! `event`, `aggregate`, `breakdown`, `top` and `overlap`, over the proto.

use serde_json::json;
use tagstore_proto::value_write::Value;
use tagstore_proto::*;

use super::{Failure, Session, with_query};
use crate::commands::{BreakdownBy, Combine, Command, FieldKindArg};
use crate::table::{self, Align, thousands};

fn kind_name(kind: i32) -> &'static str {
    match FieldKind::try_from(kind) {
        Ok(FieldKind::Integer) => "integer",
        Ok(FieldKind::Enum) => "enumerated",
        Ok(FieldKind::Behaviour) => "behaviour",
        _ => "unknown",
    }
}

impl Session {
    /// Every field, page after page (`ListFields` ends an answer early once
    /// it holds a few MiB).
    async fn all_fields(&mut self) -> Result<Vec<FieldInfo>, Failure> {
        let client = &mut self.client;
        let fields = super::every_page(
            async |after| {
                let page = client
                    .list_fields(ListFieldsRequest {
                        after,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok((page.fields, page.more))
            },
            |f: &FieldInfo| &f.name,
        )
        .await?;
        Ok(fields)
    }

    async fn field_kind(&mut self, name: &str) -> Result<FieldKind, Failure> {
        let fields = self.all_fields().await?;
        fields
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| FieldKind::try_from(f.kind).ok())
            .ok_or_else(|| Failure::Local(format!("no field named {name:?} (see `fields`)")))
    }

    async fn write_values(&mut self, writes: Vec<ValueWrite>) -> Result<(), Failure> {
        let r = self
            .client
            .set_values(SetValuesRequest { writes })
            .await?
            .into_inner();
        let text = match (
            r.values_set,
            r.values_cleared,
            r.events_added,
            r.events_expired,
        ) {
            (_, _, 0, 1) => "the event is older than the field's retention: not stored".to_string(),
            (0, 0, 0, 0) => "nothing changed".to_string(),
            (s, c, e, _) => format!(
                "{s} set, {c} cleared, {e} new behaviour days{}",
                if r.new_customers > 0 {
                    format!(", {} new customers", r.new_customers)
                } else {
                    String::new()
                }
            ),
        };
        self.out(
            text,
            json!({ "values_set": r.values_set, "values_cleared": r.values_cleared,
                    "events_added": r.events_added, "events_expired": r.events_expired,
                    "new_customers": r.new_customers, "lsn": r.lsn }),
        );
        Ok(())
    }

    /// Runs a field or analytics command.
    pub(super) async fn exec_field(&mut self, cmd: Command) -> Result<(), Failure> {
        match cmd {
            Command::Fields => {
                let fields = self.all_fields().await?;
                let rows: Vec<Vec<String>> = fields
                    .iter()
                    .map(|f| {
                        let detail = match FieldKind::try_from(f.kind) {
                            Ok(FieldKind::Enum) => f.values.join(", "),
                            Ok(FieldKind::Behaviour) => format!(
                                "{}, kept {} days ({} by day)",
                                f.time_zone, f.retention_days, f.daily_days
                            ),
                            _ => String::new(),
                        };
                        let with = match FieldKind::try_from(f.kind) {
                            Ok(FieldKind::Behaviour) => String::new(),
                            _ => thousands(f.customers_with_value),
                        };
                        vec![
                            f.name.clone(),
                            kind_name(f.kind).into(),
                            with,
                            f.merge.clone(),
                            detail,
                        ]
                    })
                    .collect();
                let value: Vec<_> = fields
                    .iter()
                    .map(|f| {
                        json!({ "name": f.name, "kind": kind_name(f.kind), "values": f.values,
                                "time_zone": f.time_zone, "retention_days": f.retention_days,
                                "daily_days": f.daily_days, "customers_with_value": f.customers_with_value,
                                "category": f.category, "description": f.description, "merge": f.merge })
                    })
                    .collect();
                self.out(
                    format!(
                        "{}\n({} fields)",
                        table::render(
                            &["field", "kind", "with value", "on merge", "definition"],
                            &[
                                Align::Left,
                                Align::Left,
                                Align::Right,
                                Align::Left,
                                Align::Left
                            ],
                            &rows
                        ),
                        fields.len()
                    ),
                    json!({ "fields": value }),
                );
            }
            Command::CreateField {
                name,
                kind,
                category,
                description,
                merge,
            } => {
                let mut req = CreateFieldRequest {
                    name: name.clone(),
                    category,
                    description,
                    merge,
                    ..Default::default()
                };
                match kind {
                    FieldKindArg::Integer => req.kind = FieldKind::Integer as i32,
                    FieldKindArg::Enum(values) => {
                        req.kind = FieldKind::Enum as i32;
                        req.values = values;
                    }
                    FieldKindArg::Behaviour {
                        retention_days,
                        daily_days,
                        time_zone,
                    } => {
                        req.kind = FieldKind::Behaviour as i32;
                        req.retention_days = retention_days;
                        req.daily_days = daily_days;
                        req.time_zone = time_zone;
                    }
                }
                let r = self.client.create_field(req).await?.into_inner();
                let f = r.field.unwrap_or_default();
                self.out(
                    format!("created {} field {}", kind_name(f.kind), f.name),
                    json!({ "created": f.name, "kind": kind_name(f.kind) }),
                );
            }
            Command::DropField { name, yes } => {
                self.confirm(&format!("drop field {name} and all its values?"), yes)
                    .await?;
                self.client
                    .drop_field(DropFieldRequest { name: name.clone() })
                    .await?;
                self.out(format!("dropped field {name}"), json!({ "dropped": name }));
            }
            Command::SetValue { field, key, value } => {
                let v = match self.field_kind(&field).await? {
                    FieldKind::Integer => Value::IntValue(value.parse().map_err(|_| {
                        Failure::Local(format!(
                            "{field:?} is an integer field; {value:?} is not an integer"
                        ))
                    })?),
                    FieldKind::Enum => Value::EnumValue(value),
                    _ => {
                        return Err(Failure::Local(format!(
                            "{field:?} is a behaviour field: use `event {field} {key} [YYYY-MM-DD]`"
                        )));
                    }
                };
                self.write_values(vec![ValueWrite {
                    field,
                    customer: key,
                    value: Some(v),
                }])
                .await?;
            }
            Command::CombineValue { field, key, how, n } => {
                let value = match how {
                    Combine::Add => Value::IntAdd(n),
                    Combine::Max => Value::IntMax(n),
                    Combine::Min => Value::IntMin(n),
                };
                self.write_values(vec![ValueWrite {
                    field,
                    customer: key,
                    value: Some(value),
                }])
                .await?;
            }
            Command::ClearValue { field, key } => {
                self.write_values(vec![ValueWrite {
                    field,
                    customer: key,
                    value: Some(Value::Clear(true)),
                }])
                .await?;
            }
            Command::Event { field, key, date } => {
                let value = match date {
                    Some(d) => Value::EventDate(d),
                    None => Value::EventAtMs(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64),
                    ),
                };
                self.write_values(vec![ValueWrite {
                    field,
                    customer: key,
                    value: Some(value),
                }])
                .await?;
            }
            Command::Aggregate {
                field,
                edges,
                query,
            } => {
                let a = self
                    .client
                    .aggregate(AggregateRequest {
                        query: query.clone(),
                        field: field.clone(),
                        histogram_edges: edges.clone(),
                        as_of: self.as_of.clone(),
                    })
                    .await
                    .map_err(with_query(&query))?
                    .into_inner();
                let opt = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
                let mut rows = vec![
                    vec!["audience".into(), thousands(a.members)],
                    vec!["with a value".into(), thousands(a.with_value)],
                    vec!["sum".into(), a.sum_decimal.clone()],
                    vec!["min".into(), opt(a.min)],
                    vec!["max".into(), opt(a.max)],
                    vec![
                        "mean".into(),
                        a.mean.map_or("-".into(), |m| format!("{m:.2}")),
                    ],
                ];
                for (i, c) in a.histogram.iter().enumerate() {
                    let label = match (i.checked_sub(1).and_then(|j| edges.get(j)), edges.get(i)) {
                        (None, Some(hi)) => format!("< {hi}"),
                        (Some(lo), Some(hi)) => format!("{lo} ..< {hi}"),
                        (Some(lo), None) => format!(">= {lo}"),
                        (None, None) => String::new(),
                    };
                    rows.push(vec![label, thousands(*c)]);
                }
                self.out(
                    table::render(&[&field, ""], &[Align::Left, Align::Right], &rows),
                    json!({ "members": a.members, "with_value": a.with_value, "sum": a.sum_decimal,
                            "min": a.min, "max": a.max, "mean": a.mean, "edges": edges, "histogram": a.histogram }),
                );
            }
            Command::Breakdown { by, query } => {
                let (label, by) = match by {
                    BreakdownBy::Field(f) => (f.clone(), breakdown_request::By::Field(f)),
                    BreakdownBy::Category(c) => (c.clone(), breakdown_request::By::Category(c)),
                };
                // A category's tags come in pages; the rows are gathered
                // and the total is the last page's.
                let mut b = BreakdownResponse::default();
                loop {
                    let after = b.rows.last().map(|r| r.label.clone()).unwrap_or_default();
                    let page = self
                        .client
                        .breakdown(BreakdownRequest {
                            query: query.clone(),
                            by: Some(by.clone()),
                            as_of: self.as_of.clone(),
                            after,
                            limit: 0,
                        })
                        .await
                        .map_err(with_query(&query))?
                        .into_inner();
                    let last = !page.more || page.rows.is_empty();
                    b.rows.extend(page.rows);
                    (b.total, b.no_value) = (page.total, page.no_value);
                    if last {
                        break;
                    }
                }
                let share = |n: u64| {
                    if b.total == 0 {
                        "-".to_string()
                    } else {
                        format!("{:.1}%", n as f64 * 100.0 / b.total as f64)
                    }
                };
                let mut rows: Vec<Vec<String>> = b
                    .rows
                    .iter()
                    .map(|r| vec![r.label.clone(), thousands(r.count), share(r.count)])
                    .collect();
                if b.no_value > 0 {
                    rows.push(vec![
                        "(no value)".into(),
                        thousands(b.no_value),
                        share(b.no_value),
                    ]);
                }
                let value: Vec<_> = b
                    .rows
                    .iter()
                    .map(|r| json!({ "label": r.label, "count": r.count }))
                    .collect();
                self.out(
                    format!(
                        "{}\n(audience {})",
                        table::render(
                            &[&label, "customers", "share"],
                            &[Align::Left, Align::Right, Align::Right],
                            &rows
                        ),
                        thousands(b.total)
                    ),
                    json!({ "rows": value, "total": b.total, "no_value": b.no_value }),
                );
            }
            Command::Top {
                k,
                query,
                category,
                min_count,
                include_query_tags,
            } => {
                let t = self
                    .client
                    .top_tags(TopTagsRequest {
                        query: query.clone(),
                        k,
                        category,
                        min_count,
                        include_query_tags,
                        as_of: self.as_of.clone(),
                    })
                    .await
                    .map_err(with_query(&query))?
                    .into_inner();
                let rows: Vec<Vec<String>> = t
                    .tags
                    .iter()
                    .map(|l| {
                        vec![
                            l.tag.clone(),
                            format!("{:.2}×", l.lift),
                            thousands(l.in_audience),
                            thousands(l.overall),
                        ]
                    })
                    .collect();
                let value: Vec<_> = t
                    .tags
                    .iter()
                    .map(|l| json!({ "tag": l.tag, "lift": l.lift, "in_audience": l.in_audience, "overall": l.overall }))
                    .collect();
                self.out(
                    format!(
                        "{}\n(audience {} of {} customers)",
                        table::render(
                            &["tag", "lift", "in audience", "overall"],
                            &[Align::Left, Align::Right, Align::Right, Align::Right],
                            &rows
                        ),
                        thousands(t.audience),
                        thousands(t.customers)
                    ),
                    json!({ "tags": value, "audience": t.audience, "customers": t.customers }),
                );
            }
            Command::Overlap(queries) => {
                let o = self
                    .client
                    .overlap(OverlapRequest {
                        queries: queries.clone(),
                        as_of: self.as_of.clone(),
                    })
                    .await
                    .map_err(|status| {
                        let failed = status
                            .metadata()
                            .get("tagstore-error-query")
                            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                        Failure::Server {
                            status,
                            query: failed.and_then(|i| queries.get(i).cloned()),
                        }
                    })?
                    .into_inner();
                let n = o.size as usize;
                let mut headers: Vec<String> = vec![String::new()];
                headers.extend((1..=n).map(|i| format!("#{i}")));
                let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
                let mut aligns = vec![Align::Left];
                aligns.extend(std::iter::repeat_n(Align::Right, n));
                let rows: Vec<Vec<String>> = (0..n)
                    .map(|i| {
                        let mut row = vec![format!("#{} {}", i + 1, queries[i])];
                        row.extend((0..n).map(|j| thousands(o.counts[i * n + j])));
                        row
                    })
                    .collect();
                self.out(
                    table::render(&header_refs, &aligns, &rows),
                    json!({ "queries": queries, "counts": o.counts }),
                );
            }
            _ => unreachable!("not a field command"),
        }
        Ok(())
    }
}
