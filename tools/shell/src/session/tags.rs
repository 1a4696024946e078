//! The shell's commands that define tags and change memberships: `create
//! tag`, `drop tag`, `add`, `remove`, `resolve`, `import`, `delete
//! customers`, over the proto; and reading keys from a file for `import`.

use super::*;

impl Session {
    /// One mutation of an existing tag, as `add` and `remove` send it.
    async fn update_one(&mut self, m: Mutation) -> Result<UpdateResponse, Failure> {
        Ok(self
            .client
            .update(UpdateRequest {
                mutations: vec![m],
                create_missing_tags: false,
            })
            .await?
            .into_inner())
    }

    /// Runs a tag or membership command.
    pub(super) async fn exec_tag(&mut self, cmd: Command) -> Result<(), Failure> {
        match cmd {
            Command::CreateTag {
                name,
                category,
                description,
            } => {
                let r = self
                    .client
                    .create_tag(CreateTagRequest {
                        name: name.clone(),
                        description,
                        category,
                        if_not_exists: false,
                    })
                    .await?
                    .into_inner();
                self.refresh_tags().await;
                self.out(
                    format!("created tag {}", quote_tag_name(&name)),
                    json!({ "created": r.created, "tag": r.tag.as_ref().map(tag_json) }),
                );
            }
            Command::DropTag { name, yes } => {
                let t = self
                    .client
                    .describe_tag(DescribeTagRequest { name: name.clone() })
                    .await?
                    .into_inner()
                    .tag
                    .unwrap_or_default();
                let question = format!(
                    "drop tag {} and its {} members?",
                    quote_tag_name(&name),
                    thousands(t.member_count)
                );
                self.confirm(&question, yes).await?;
                let r = self
                    .client
                    .drop_tag(DropTagRequest { name: name.clone() })
                    .await?
                    .into_inner();
                self.refresh_tags().await;
                self.out(
                    format!(
                        "dropped tag {} ({} members)",
                        quote_tag_name(&name),
                        thousands(r.member_count)
                    ),
                    json!({ "dropped": name, "member_count": r.member_count }),
                );
            }
            Command::Add { tag, who } | Command::Remove { tag, who } if who.len() == 0 => {
                return Err(Failure::Local(format!("no customers given for {tag}")));
            }
            Command::Add { tag, who } => {
                let mut m = Mutation {
                    tag,
                    ..Default::default()
                };
                match who {
                    Who::Keys(keys) => m.add = keys,
                    Who::Ids(ids) => m.add_ids = ids,
                }
                let r = self.update_one(m).await?;
                self.out(
                    format!(
                        "added {} ({} new customers)",
                        thousands(r.added),
                        thousands(r.new_customers)
                    ),
                    json!({ "added": r.added, "new_customers": r.new_customers, "lsn": r.lsn }),
                );
            }
            Command::Remove { tag, who } => {
                let mut m = Mutation {
                    tag,
                    ..Default::default()
                };
                match who {
                    Who::Keys(keys) => m.remove = keys,
                    Who::Ids(ids) => m.remove_ids = ids,
                }
                let r = self.update_one(m).await?;
                self.out(
                    format!("removed {}", thousands(r.removed)),
                    json!({ "removed": r.removed, "lsn": r.lsn }),
                );
            }
            Command::Resolve { keys, create } => {
                let r = self
                    .client
                    .resolve_customers(ResolveCustomersRequest {
                        customers: keys.clone(),
                        create_missing: create,
                    })
                    .await?
                    .into_inner();
                let shown = |id: i64| {
                    if id < 0 {
                        "-".to_string()
                    } else {
                        id.to_string()
                    }
                };
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .zip(&r.ids)
                    .map(|(k, &id)| vec![k.clone(), shown(id)])
                    .collect();
                let mut text = table::render(
                    &["customer", "internal id"],
                    &[Align::Left, Align::Right],
                    &rows,
                );
                if create {
                    text.push_str(&format!("\n{} new customers", thousands(r.new_customers)));
                }
                let ids: Vec<serde_json::Value> = keys
                    .iter()
                    .zip(&r.ids)
                    .map(|(k, &id)| json!({ "customer": k, "id": (id >= 0).then_some(id) }))
                    .collect();
                self.out(
                    text,
                    json!({ "ids": ids, "new_customers": r.new_customers, "lsn": r.lsn }),
                );
            }
            Command::Import {
                tag,
                path,
                column,
                create,
            } => self.import(tag, path, column, create).await?,
            Command::DeleteCustomers { keys, yes } => {
                self.confirm(
                    &format!(
                        "erase {} customers from every tag and forget their keys?",
                        keys.len()
                    ),
                    yes,
                )
                .await?;
                let r = self
                    .client
                    .delete_customers(DeleteCustomersRequest { customers: keys })
                    .await?
                    .into_inner();
                self.out(
                    format!("deleted {} customers", thousands(r.deleted)),
                    json!({ "deleted": r.deleted, "lsn": r.lsn }),
                );
            }
            _ => unreachable!("not a tag command"),
        }
        Ok(())
    }

    async fn import(
        &mut self,
        tag: String,
        path: String,
        column: usize,
        create: bool,
    ) -> Result<(), Failure> {
        let t0 = Instant::now();
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Failure::Local(format!("cannot read {path}: {e}")))?;
        let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let pb = progress(size, "importing");
        let mut lines = BufReader::new(file).lines();
        let (mut read, mut added, mut new_customers, mut sent) = (0u64, 0u64, 0u64, 0u64);
        let mut rejected: Vec<(u64, String, String)> = Vec::new();
        let mut batch: Vec<String> = Vec::with_capacity(IMPORT_BATCH);
        let mut bytes = 0u64;
        loop {
            let line = lines
                .next_line()
                .await
                .map_err(|e| Failure::Local(format!("reading {path}: {e}")))?;
            let done = line.is_none();
            if let Some(line) = line {
                read += 1;
                bytes += line.len() as u64 + 1;
                pb.set_position(bytes.min(size));
                match key_from_line(&line, column) {
                    Ok(None) => {}
                    Ok(Some(key)) => batch.push(key),
                    Err(why) => rejected.push((read, line, why)),
                }
            }
            if batch.len() >= IMPORT_BATCH || (done && !batch.is_empty()) {
                let n = batch.len() as u64;
                let m = Mutation {
                    tag: tag.clone(),
                    add: std::mem::take(&mut batch),
                    remove: vec![],
                    ..Default::default()
                };
                let r = self
                    .client
                    .update(UpdateRequest {
                        mutations: vec![m],
                        create_missing_tags: create,
                    })
                    .await;
                let r = match r {
                    Ok(r) => r.into_inner(),
                    Err(status) => {
                        pb.finish_and_clear();
                        let msg = format!(
                            "import stopped at line {read} after {} keys were written: {}",
                            thousands(sent),
                            status.message()
                        );
                        return Err(Failure::Server {
                            status: Status::new(status.code(), msg),
                            query: None,
                        });
                    }
                };
                sent += n;
                added += r.added;
                new_customers += r.new_customers;
            }
            if done {
                break;
            }
        }
        pb.finish_and_clear();
        let secs = round3(t0.elapsed().as_secs_f64());
        let mut text = format!(
            "read {} lines, sent {} keys: {} added to {} ({} new customers, the rest already had it), {} rejected, in {secs:.2} s",
            thousands(read),
            thousands(sent),
            thousands(added),
            quote_tag_name(&tag),
            thousands(new_customers),
            thousands(rejected.len() as u64)
        );
        for (line_no, _, why) in rejected.iter().take(SHOW_REJECTED) {
            text.push_str(&format!("\n  line {line_no}: {why}"));
        }
        if rejected.len() > SHOW_REJECTED {
            text.push_str(&format!(
                "\n  ... and {} more",
                rejected.len() - SHOW_REJECTED
            ));
        }
        let rejected_json: Vec<_> = rejected
            .iter()
            .map(|(n, l, w)| json!({ "line": n, "text": l, "reason": w }))
            .collect();
        self.out(
            text,
            json!({ "read": read, "sent": sent, "added": added, "new_customers": new_customers, "rejected": rejected_json, "seconds": secs }),
        );
        Ok(())
    }
}

/// The key in one line of an import file: the whole line, or CSV column
/// `column` (1-based). `Ok(None)` for a blank line or a header row named `customer`/`key`.
pub fn key_from_line(line: &str, column: usize) -> Result<Option<String>, String> {
    let line = line.trim_end_matches('\r');
    if line.trim().is_empty() {
        return Ok(None);
    }
    let fields = csv_split(line)?;
    let field = fields
        .get(column - 1)
        .ok_or_else(|| format!("no column {column}"))?
        .trim()
        .to_string();
    if matches!(field.to_ascii_lowercase().as_str(), "customer" | "key") {
        return Ok(None);
    }
    check_key(&field).map_err(|e| e.to_string())?;
    Ok(Some(field))
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
fn csv_split(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, ',') => out.push(std::mem::take(&mut field)),
            (false, '"') if field.is_empty() => quoted = true,
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    out.push(field);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::reads::csv_field;

    #[test]
    fn import_lines() {
        assert_eq!(key_from_line("phone:1", 1).unwrap(), Some("phone:1".into()));
        assert_eq!(key_from_line("a,\"b,c\",d", 2).unwrap(), Some("b,c".into()));
        assert_eq!(key_from_line("customer", 1).unwrap(), None);
        assert_eq!(key_from_line("  ", 1).unwrap(), None);
        assert!(key_from_line("a,b", 3).is_err());
        assert!(key_from_line("a\u{1}b", 1).is_err());
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("x"), "x");
    }
}
