//! The shell's read commands: `count`, `find`, `more`, `export`, `profile`,
//! `tags`, `tag`, over the proto.

use super::*;

impl Session {
    /// Runs a read command.
    pub(super) async fn exec_read(&mut self, cmd: Command) -> Result<(), Failure> {
        match cmd {
            Command::Count(query) => {
                let t0 = Instant::now();
                let n = self
                    .client
                    .count(CountRequest {
                        queries: vec![query.clone()],
                        as_of: self.as_of.clone(),
                    })
                    .await
                    .map_err(with_query(&query))?
                    .into_inner()
                    .counts[0];
                let ms = round3(t0.elapsed().as_secs_f64() * 1e3);
                self.out(
                    format!("{}  ({ms:.1} ms)", thousands(n)),
                    json!({ "count": n, "ms": ms }),
                );
            }
            Command::Find {
                query,
                limit,
                identity_type,
            } => {
                self.page(query, limit, identity_type, String::new())
                    .await?
            }
            Command::More => {
                let Some((query, limit, identity_type, cursor)) = self.last_find.clone() else {
                    return Err(Failure::Local("no more pages: run `find` first".into()));
                };
                if cursor.is_empty() {
                    return Err(Failure::Local(
                        "no more pages: the last `find` was complete".into(),
                    ));
                }
                self.page(query, limit, identity_type, cursor).await?;
            }
            Command::Export {
                query,
                path,
                identity_type,
                hash,
                hash_upper,
            } => {
                self.export(query, path, identity_type, hash, hash_upper)
                    .await?
            }
            Command::Profile { key, days } => {
                let p = self
                    .client
                    .profile(ProfileRequest {
                        customer: key,
                        recent_days: days,
                    })
                    .await?
                    .into_inner();
                let mut text = if p.tags.is_empty() {
                    format!(
                        "{} (internal id {}) carries no tags",
                        p.customer, p.internal_id
                    )
                } else {
                    let rows: Vec<Vec<String>> = p
                        .tags
                        .iter()
                        .map(|t| {
                            let kept = if p.rule_tags.contains(t) { "rule" } else { "" };
                            vec![t.clone(), kept.to_string()]
                        })
                        .collect();
                    format!(
                        "{} (internal id {}), {} tags:\n{}",
                        p.customer,
                        p.internal_id,
                        p.tags.len(),
                        table::render(&["tag", "kept by"], &[Align::Left, Align::Left], &rows)
                    )
                };
                let values: Vec<(String, String)> = p
                    .values
                    .iter()
                    .map(|v| {
                        let shown = match &v.value {
                            Some(field_value::Value::IntValue(i)) => i.to_string(),
                            Some(field_value::Value::EnumValue(e)) => e.clone(),
                            Some(field_value::Value::Recent(r)) => r.dates.join(" "),
                            None => String::new(),
                        };
                        (v.field.clone(), shown)
                    })
                    .collect();
                if !values.is_empty() {
                    let rows: Vec<Vec<String>> = values
                        .iter()
                        .map(|(f, v)| vec![f.clone(), v.clone()])
                        .collect();
                    let header = format!(
                        "value (behaviours: days in the last {})",
                        if days == 0 { 30 } else { days }
                    );
                    text.push_str(&format!(
                        "\n{}",
                        table::render(&["field", &header], &[Align::Left, Align::Left], &rows)
                    ));
                }
                if !p.identities.is_empty() {
                    text.push_str(&format!("\n{}", identity_table(&p.identities)));
                }
                let value_json: serde_json::Map<String, serde_json::Value> =
                    values.into_iter().map(|(f, v)| (f, json!(v))).collect();
                self.out(
                    text,
                    json!({ "customer": p.customer, "key": p.key, "internal_id": p.internal_id, "tags": p.tags, "rule_tags": p.rule_tags, "values": value_json, "identities": identity_json(&p.identities) }),
                );
            }
            Command::Merges { customer } => {
                let mut rows = Vec::new();
                let mut all = Vec::new();
                let mut after = 0;
                let total = loop {
                    let page = self
                        .client
                        .list_merges(ListMergesRequest {
                            after,
                            limit: 1000,
                            customer: customer.clone(),
                        })
                        .await?
                        .into_inner();
                    for m in &page.merges {
                        rows.push(vec![
                            m.merge_id.to_string(),
                            format!("{} (id {})", m.survivor, m.survivor_id),
                            format!("{} (id {})", m.absorbed, m.absorbed_id),
                            if m.refused.is_empty() {
                                m.via.clone()
                            } else {
                                format!("{} (refused: {})", m.via, m.refused)
                            },
                            m.moved.join(", "),
                            if m.split {
                                format!("identity taken off {}", fmt_time(m.undone_ms))
                            } else if m.undone_ms > 0 {
                                format!("undone {}", fmt_time(m.undone_ms))
                            } else {
                                String::new()
                            },
                        ]);
                        all.push(json!({
                            "merge_id": m.merge_id, "survivor": m.survivor, "survivor_id": m.survivor_id,
                            "absorbed": m.absorbed, "absorbed_id": m.absorbed_id, "via": m.via,
                            "refused": m.refused, "moved": m.moved, "undone_ms": m.undone_ms,
                            "split": m.split,
                        }));
                        after = m.merge_id;
                    }
                    // The shell shows at most the first 10,000.
                    if !page.more || rows.len() >= 10_000 {
                        break page.total;
                    }
                };
                let text = if rows.is_empty() {
                    "(no merges)".to_string()
                } else {
                    format!(
                        "{}\n({} shown; {} merges in all)",
                        table::render(
                            &[
                                "merge",
                                "survivor",
                                "absorbed",
                                "via",
                                "identities moved",
                                ""
                            ],
                            &[
                                Align::Right,
                                Align::Left,
                                Align::Left,
                                Align::Left,
                                Align::Left,
                                Align::Left
                            ],
                            &rows
                        ),
                        rows.len(),
                        total
                    )
                };
                self.out(text, json!({ "merges": all, "total": total }));
            }
            Command::Link {
                identities,
                channel,
            } => {
                let r = self
                    .client
                    .link(LinkRequest {
                        identities,
                        channel,
                    })
                    .await?
                    .into_inner();
                let mut text = format!(
                    "{} {} (internal id {}): {} identities linked, {} merged",
                    if r.created { "created" } else { "linked to" },
                    r.customer,
                    r.customer_id,
                    r.identities_linked,
                    r.merges.iter().filter(|m| m.refused.is_empty()).count()
                );
                for m in &r.merges {
                    text.push_str(&format!(
                        "\n  merge {}: {} joined {}",
                        m.merge_id, m.absorbed, m.survivor
                    ));
                }
                for x in &r.refused {
                    text.push_str(&format!("\n  {}: {}", x.identity, x.reason));
                }
                self.out(
                    text,
                    json!({ "customer": r.customer, "customer_id": r.customer_id, "created": r.created,
                            "identities_linked": r.identities_linked, "merges": r.merges.len(),
                            "refused": r.refused.iter().map(|x| json!({"identity": x.identity, "reason": x.reason})).collect::<Vec<_>>(),
                            "lsn": r.lsn }),
                );
            }
            Command::Unmerge {
                merge,
                identity,
                allow_partial,
            } => {
                let r = self
                    .client
                    .unmerge(UnmergeRequest {
                        merge_id: merge,
                        identity: identity.clone(),
                        allow_partial,
                    })
                    .await?
                    .into_inner();
                let head = if identity.is_empty() {
                    format!(
                        "merge {merge} undone: {} (internal id {}) is apart from {} (internal id {}) again",
                        r.revived, r.revived_id, r.survivor, r.survivor_id
                    )
                } else {
                    format!(
                        "{identity} taken off {} (internal id {}): now customer {} (internal id {})",
                        r.survivor, r.survivor_id, r.revived, r.revived_id
                    )
                };
                let mut text = format!(
                    "{head}\n  its identities: {}\n  kept events: {} read, {} of them its own",
                    r.identities.join(", "),
                    r.events,
                    r.events_revived
                );
                if r.refused > 0 {
                    text.push_str(&format!(
                        "\n  {} events refused by the fact rules: {}",
                        r.refused,
                        r.refusals.join("; ")
                    ));
                }
                self.out(
                    text,
                    json!({ "merge_id": merge, "identity": identity, "revived": r.revived,
                            "revived_id": r.revived_id, "survivor": r.survivor,
                            "survivor_id": r.survivor_id, "identities": r.identities,
                            "events": r.events, "events_revived": r.events_revived,
                            "refused": r.refused, "values_set": r.values_set, "lsn": r.lsn }),
                );
            }
            Command::Audiences { category } => {
                let mut rows = Vec::new();
                let mut all = Vec::new();
                let mut after = String::new();
                let total = loop {
                    let page = self
                        .client
                        .list_audiences(ListAudiencesRequest {
                            after: after.clone(),
                            limit: 200,
                            category: category.clone(),
                            counts: true,
                        })
                        .await?
                        .into_inner();
                    for a in &page.audiences {
                        rows.push(vec![
                            a.name.clone(),
                            thousands(a.count),
                            if a.kept_current { "yes" } else { "" }.to_string(),
                            a.query.clone(),
                            a.owner.clone(),
                            a.category.clone(),
                        ]);
                        all.push(json!({
                            "name": a.name, "count": a.count, "query": a.query,
                            "description": a.description, "owner": a.owner,
                            "category": a.category, "uses": a.uses,
                            "kept_current": a.kept_current, "error": a.error,
                            "created_at_ms": a.created_at_ms, "updated_at_ms": a.updated_at_ms,
                        }));
                        after = a.name.clone();
                    }
                    if !page.more {
                        break page.total;
                    }
                };
                let text = if rows.is_empty() {
                    "(no saved audiences)".to_string()
                } else {
                    format!(
                        "{}\n({} shown; {} saved audiences in all)",
                        table::render(
                            &["audience", "members", "kept", "query", "owner", "category"],
                            &[
                                Align::Left,
                                Align::Right,
                                Align::Left,
                                Align::Left,
                                Align::Left,
                                Align::Left
                            ],
                            &rows
                        ),
                        rows.len(),
                        total
                    )
                };
                self.out(text, json!({ "audiences": all, "total": total }));
            }
            Command::CreateAudience {
                name,
                query,
                description,
                owner,
                category,
                replace,
                kept_current,
            } => {
                let r = self
                    .client
                    .create_audience(CreateAudienceRequest {
                        name: name.clone(),
                        query,
                        description,
                        owner,
                        category,
                        replace,
                        kept_current,
                    })
                    .await?
                    .into_inner();
                let uses = r
                    .audience
                    .as_ref()
                    .map(|a| a.uses.clone())
                    .unwrap_or_default();
                let mut text = format!(
                    "{} audience {name}{}",
                    if r.created { "saved" } else { "redefined" },
                    if kept_current {
                        " (kept current: `watch audience` follows it)"
                    } else {
                        ""
                    }
                );
                if !uses.is_empty() {
                    text.push_str(&format!(" (uses {})", uses.join(", ")));
                }
                self.out(
                    text,
                    json!({ "name": name, "created": r.created, "uses": uses, "lsn": r.lsn }),
                );
            }
            Command::DropAudience { name, yes } => {
                self.confirm(
                    &format!("drop audience {name}? (its tags and customers stay)"),
                    yes,
                )
                .await?;
                self.client
                    .drop_audience(DropAudienceRequest { name: name.clone() })
                    .await?;
                self.out(format!("dropped audience {name}"), json!({"dropped": name}));
            }
            Command::TakeSnapshot { audience, note } => {
                let r = self
                    .client
                    .take_snapshot(TakeSnapshotRequest { audience, note })
                    .await?
                    .into_inner();
                let s = r.snapshot.unwrap_or_default();
                let shared = if s.shares_with > 0 {
                    format!(
                        " (unchanged since snapshot {}: shares its members)",
                        s.shares_with
                    )
                } else {
                    String::new()
                };
                self.out(
                    format!(
                        "snapshot {} of {}: {} members{shared}; `SNAPSHOT {}` in queries",
                        s.id,
                        s.audience,
                        thousands(s.count),
                        s.id
                    ),
                    json!({ "id": s.id, "audience": s.audience, "count": s.count,
                            "shares_with": s.shares_with, "taken_lsn": s.taken_lsn, "lsn": r.lsn }),
                );
            }
            Command::Snapshots { audience } => {
                let mut rows = Vec::new();
                let mut all = Vec::new();
                let mut after = 0;
                let total = loop {
                    let page = self
                        .client
                        .list_snapshots(ListSnapshotsRequest {
                            audience: audience.clone(),
                            after,
                            limit: 1000,
                        })
                        .await?
                        .into_inner();
                    for s in &page.snapshots {
                        rows.push(vec![
                            s.id.to_string(),
                            s.audience.clone(),
                            thousands(s.count),
                            fmt_time(s.taken_at_ms),
                            if s.shares_with > 0 {
                                format!("= {}", s.shares_with)
                            } else {
                                String::new()
                            },
                            s.note.clone(),
                        ]);
                        all.push(json!({
                            "id": s.id, "audience": s.audience, "query": s.query,
                            "count": s.count, "taken_lsn": s.taken_lsn,
                            "taken_at_ms": s.taken_at_ms, "note": s.note,
                            "shares_with": s.shares_with,
                        }));
                        after = s.id;
                    }
                    if !page.more {
                        break page.total;
                    }
                };
                let text = if rows.is_empty() {
                    "(no snapshots)".to_string()
                } else {
                    format!(
                        "{}\n({} shown; {} snapshots in all)",
                        table::render(
                            &[
                                "snapshot",
                                "audience",
                                "members",
                                "taken (UTC)",
                                "shares",
                                "note"
                            ],
                            &[
                                Align::Right,
                                Align::Left,
                                Align::Right,
                                Align::Left,
                                Align::Left,
                                Align::Left
                            ],
                            &rows
                        ),
                        rows.len(),
                        total
                    )
                };
                self.out(text, json!({ "snapshots": all, "total": total }));
            }
            Command::DropSnapshot { id, yes } => {
                self.confirm(&format!("drop snapshot {id}?"), yes).await?;
                self.client
                    .drop_snapshot(DropSnapshotRequest { id })
                    .await?;
                self.out(format!("dropped snapshot {id}"), json!({"dropped": id}));
            }
            Command::History { name, days } => {
                let r = self
                    .client
                    .tag_history(TagHistoryRequest {
                        name: name.clone(),
                        days,
                    })
                    .await?
                    .into_inner();
                let text = if r.points.is_empty() {
                    format!("(no points yet for {name}: the server records them once a day)")
                } else {
                    let counts: Vec<u64> = r.points.iter().map(|p| p.count).collect();
                    let (lo, hi) = (
                        counts.iter().copied().min().unwrap_or(0),
                        counts.iter().copied().max().unwrap_or(0),
                    );
                    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
                    let chart: String = counts
                        .iter()
                        .map(|&n| {
                            let k = if hi == lo {
                                BARS.len() - 1
                            } else {
                                ((n - lo) * (BARS.len() as u64 - 1) / (hi - lo)) as usize
                            };
                            BARS[k]
                        })
                        .collect();
                    let first = &r.points[0];
                    let last = &r.points[r.points.len() - 1];
                    format!(
                        "{name}  {chart}\n{} {} … {} {}  (min {}, max {}, {} days with a point)",
                        first.day,
                        thousands(first.count),
                        last.day,
                        thousands(last.count),
                        thousands(lo),
                        thousands(hi),
                        r.points.len()
                    )
                };
                self.out(
                    text,
                    json!({ "name": name, "points": r.points.iter().map(|p| json!({"day": p.day, "count": p.count})).collect::<Vec<_>>() }),
                );
            }
            Command::Identities(key) => {
                let p = self
                    .client
                    .profile(ProfileRequest {
                        customer: key,
                        recent_days: 1,
                    })
                    .await?
                    .into_inner();
                let text = if p.identities.is_empty() {
                    format!(
                        "{} (internal id {}) has no identities beside its key (it was not made by ingestion)",
                        p.key, p.internal_id
                    )
                } else {
                    format!(
                        "{} (internal id {}), {} identities:\n{}",
                        p.key,
                        p.internal_id,
                        p.identities.len(),
                        identity_table(&p.identities)
                    )
                };
                self.out(
                    text,
                    json!({ "key": p.key, "internal_id": p.internal_id, "identities": identity_json(&p.identities) }),
                );
            }
            Command::Tags => {
                let tags = self.all_tags().await?;
                *self.tag_names.write() = tags.iter().map(|t| t.name.clone()).collect();
                let rows: Vec<Vec<String>> = tags
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.category.clone(),
                            thousands(t.member_count),
                            fmt_time(t.updated_at_ms),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                let text = format!(
                    "{}\n({} tags)",
                    table::render(
                        &["tag", "category", "members", "updated", "description"],
                        &[
                            Align::Left,
                            Align::Left,
                            Align::Right,
                            Align::Left,
                            Align::Left
                        ],
                        &rows
                    ),
                    tags.len()
                );
                let value: Vec<_> = tags.iter().map(tag_json).collect();
                self.out(text, json!({ "tags": value }));
            }
            Command::Tag(name) => {
                let t = self
                    .client
                    .describe_tag(DescribeTagRequest { name })
                    .await?
                    .into_inner()
                    .tag
                    .unwrap_or_default();
                let mut rows = vec![
                    vec!["name".into(), t.name.clone()],
                    vec!["query form".into(), quote_tag_name(&t.name)],
                    vec!["category".into(), t.category.clone()],
                    vec!["description".into(), t.description.clone()],
                    vec!["members".into(), thousands(t.member_count)],
                    vec!["created".into(), fmt_time(t.created_at_ms)],
                    vec!["updated".into(), fmt_time(t.updated_at_ms)],
                ];
                if !t.rule.is_empty() {
                    rows.push(vec!["rule".into(), t.rule.clone()]);
                }
                self.out(
                    table::render(&["field", "value"], &[Align::Left, Align::Left], &rows),
                    tag_json(&t),
                );
            }
            _ => unreachable!("not a read command"),
        }
        Ok(())
    }

    async fn page(
        &mut self,
        query: String,
        limit: u32,
        identity_type: String,
        cursor: String,
    ) -> Result<(), Failure> {
        let t0 = Instant::now();
        let r = self
            .client
            .members(MembersRequest {
                query: query.clone(),
                limit,
                cursor,
                identity_type: identity_type.clone(),
                as_of: self.as_of.clone(),
            })
            .await
            .map_err(with_query(&query))?
            .into_inner();
        let ms = round3(t0.elapsed().as_secs_f64() * 1e3);
        let more = !r.next_cursor.is_empty();
        let rows: Vec<Vec<String>> = r.customers.iter().map(|c| vec![c.clone()]).collect();
        let mut text = if rows.is_empty() {
            "(no customers)".to_string()
        } else {
            table::render(&["customer"], &[Align::Left], &rows)
        };
        let without = if r.without_identity > 0 {
            format!(
                ", {} without a {identity_type} identity",
                r.without_identity
            )
        } else {
            String::new()
        };
        text.push_str(&format!(
            "\n({} shown{without}{}; {ms:.1} ms)",
            r.customers.len(),
            if more {
                ", `more` for the next page"
            } else {
                ""
            }
        ));
        self.out(
            text,
            json!({ "customers": r.customers, "without_identity": r.without_identity, "more": more, "ms": ms }),
        );
        self.last_find = Some((query, limit, identity_type, r.next_cursor));
        Ok(())
    }

    async fn export(
        &mut self,
        query: String,
        path: String,
        identity_type: String,
        hash: String,
        hash_upper: bool,
    ) -> Result<(), Failure> {
        let t0 = Instant::now();
        let mut stream = self
            .client
            .export(ExportRequest {
                query: query.clone(),
                batch_size: 0,
                identity_type: identity_type.clone(),
                hash: hash.clone(),
                hash_upper,
                as_of: self.as_of.clone(),
            })
            .await
            .map_err(with_query(&query))?
            .into_inner();
        let tmp = format!("{path}.part");
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| Failure::Local(format!("cannot write {tmp}: {e}")))?;
        let mut out = tokio::io::BufWriter::new(file);
        let io = |e: std::io::Error| Failure::Local(format!("writing {tmp}: {e}"));
        let header = if identity_type.is_empty() {
            "customer\n".to_string()
        } else if !hash.is_empty() {
            format!("{identity_type}_{hash}\n")
        } else {
            format!("{identity_type}\n")
        };
        out.write_all(header.as_bytes()).await.map_err(io)?;
        let mut written = 0u64;
        let mut without = 0u64;
        let mut bar: Option<ProgressBar> = None;
        while let Some(batch) = stream.message().await? {
            let pb = bar.get_or_insert_with(|| progress(batch.total, "exporting"));
            let mut buf = String::new();
            for c in &batch.customers {
                // Under an identity type's header, its values alone.
                let c = c
                    .strip_prefix(identity_type.as_str())
                    .and_then(|v| v.strip_prefix(':'))
                    .filter(|_| !identity_type.is_empty())
                    .unwrap_or(c);
                buf.push_str(&csv_field(c));
                buf.push('\n');
            }
            out.write_all(buf.as_bytes()).await.map_err(io)?;
            written += batch.customers.len() as u64;
            without += batch.without_identity;
            pb.set_position(written + without);
        }
        out.flush().await.map_err(io)?;
        drop(out);
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| Failure::Local(format!("cannot rename {tmp} to {path}: {e}")))?;
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        let secs = round3(t0.elapsed().as_secs_f64());
        let left_out = if without > 0 {
            format!(
                " ({} without a {identity_type} identity left out)",
                thousands(without)
            )
        } else {
            String::new()
        };
        self.out(
            format!(
                "exported {} customers to {path} in {secs:.2} s{left_out}",
                thousands(written)
            ),
            json!({ "exported": written, "without_identity": without, "path": path, "seconds": secs }),
        );
        Ok(())
    }
}

/// A CSV field, quoted when it must be.
pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A customer's identities as a table: identity, first channel, first seen
/// (UTC).
fn identity_table(identities: &[CustomerIdentity]) -> String {
    let rows: Vec<Vec<String>> = identities
        .iter()
        .map(|i| {
            vec![
                i.identity.clone(),
                i.first_channel.clone(),
                utc(i.first_seen_ms),
            ]
        })
        .collect();
    table::render(
        &["identity", "first channel", "first seen (UTC)"],
        &[Align::Left, Align::Left, Align::Left],
        &rows,
    )
}

fn identity_json(identities: &[CustomerIdentity]) -> serde_json::Value {
    identities
        .iter()
        .map(|i| {
            json!({
                "identity": i.identity,
                "first_channel": i.first_channel,
                "first_seen_ms": i.first_seen_ms,
            })
        })
        .collect()
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC ("unknown" for 0).
fn utc(ms: i64) -> String {
    if ms == 0 {
        return "unknown".into();
    }
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => format!("{ms} ms"),
    }
}
