//! Running shell commands against a server, over the public proto only, and
//! printing their results (as text or as JSON lines).

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::RwLock;
use serde_json::json;
use tagstore_proto::names::{check_key, quote_tag_name};
use tagstore_proto::tag_store_client::TagStoreClient;
use tagstore_proto::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::commands::{self, Command, Who};

mod fields;
use crate::table::{self, Align, thousands};

/// Keys sent per `Update` by `import`.
const IMPORT_BATCH: usize = 10_000;
/// Rejected lines listed in full after an import.
const SHOW_REJECTED: usize = 20;

/// What a command failed with.
pub enum Failure {
    /// An error from the server, with the query it concerned (for the caret).
    Server {
        status: Status,
        query: Option<String>,
    },
    /// A local problem (bad arguments, a file that cannot be read, ...).
    Local(String),
    Cancelled,
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Server {
            status,
            query: None,
        }
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Local(s)
    }
}

fn with_query(query: &str) -> impl FnOnce(Status) -> Failure + '_ {
    move |status| Failure::Server {
        status,
        query: Some(query.to_string()),
    }
}

/// Whether a command asks the user before acting.
pub enum Confirm {
    /// Ask on the terminal.
    Ask,
    /// Act without asking (`--yes`).
    Yes,
    /// Refuse: there is nobody to ask (`-c`, `-f` or piped input without `--yes`).
    Refuse,
}

pub struct Session {
    pub addr: String,
    client: TagStoreClient<Channel>,
    pub json: bool,
    pub timing: bool,
    pub confirm: Confirm,
    /// The last `find`, for `more`: query, page size, cursor.
    last_find: Option<(String, u32, String)>,
    /// Tag names for completion, refreshed when tags change.
    pub tag_names: Arc<RwLock<Vec<String>>>,
}

pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|e| e.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true))
        .map_err(|e| format!("bad server address {addr:?}: {e}"))
}

impl Session {
    /// A session that connects lazily (and reconnects by itself after a drop).
    pub fn new(addr: &str, json: bool, confirm: Confirm) -> Result<Self, String> {
        let channel = endpoint(addr)?.connect_lazy();
        Ok(Self {
            addr: addr.trim_start_matches("http://").to_string(),
            client: TagStoreClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            json,
            timing: false,
            confirm,
            last_find: None,
            tag_names: Arc::default(),
        })
    }

    /// Fetches the tag names for completion; quietly keeps the old list on failure.
    pub async fn refresh_tags(&mut self) {
        if let Ok(r) = self.client.list_tags(ListTagsRequest::default()).await {
            *self.tag_names.write() = r.into_inner().tags.into_iter().map(|t| t.name).collect();
        }
    }

    fn out(&self, text: String, value: serde_json::Value) {
        if self.json {
            print_line(&value);
        } else if !text.is_empty() {
            print_line(&text);
        }
    }

    /// Runs one command. `Ok(false)` means the user asked to quit.
    pub async fn run(&mut self, cmd: Command) -> Result<bool, Failure> {
        let started = Instant::now();
        let show_time =
            self.timing && !matches!(cmd, Command::Timing(_) | Command::Help(_) | Command::Quit);
        let keep_going = self.exec(cmd).await?;
        if show_time && !self.json {
            print_line(&format!(
                "Time: {:.3} ms",
                started.elapsed().as_secs_f64() * 1e3
            ));
        }
        Ok(keep_going)
    }

    async fn exec(&mut self, cmd: Command) -> Result<bool, Failure> {
        match cmd {
            Command::Count(query) => {
                let t0 = Instant::now();
                let n = self
                    .client
                    .count(CountRequest {
                        queries: vec![query.clone()],
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
            Command::Find { query, limit } => self.page(query, limit, String::new()).await?,
            Command::More => {
                let Some((query, limit, cursor)) = self.last_find.clone() else {
                    return Err(Failure::Local("no more pages: run `find` first".into()));
                };
                if cursor.is_empty() {
                    return Err(Failure::Local(
                        "no more pages: the last `find` was complete".into(),
                    ));
                }
                self.page(query, limit, cursor).await?;
            }
            Command::Export { query, path } => self.export(query, path).await?,
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
                    let rows: Vec<Vec<String>> = p.tags.iter().map(|t| vec![t.clone()]).collect();
                    format!(
                        "{} (internal id {}), {} tags:\n{}",
                        p.customer,
                        p.internal_id,
                        p.tags.len(),
                        table::render(&["tag"], &[Align::Left], &rows)
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
                let value_json: serde_json::Map<String, serde_json::Value> =
                    values.into_iter().map(|(f, v)| (f, json!(v))).collect();
                self.out(
                    text,
                    json!({ "customer": p.customer, "internal_id": p.internal_id, "tags": p.tags, "values": value_json }),
                );
            }
            Command::Tags => {
                let tags = self
                    .client
                    .list_tags(ListTagsRequest::default())
                    .await?
                    .into_inner()
                    .tags;
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
                let rows = vec![
                    vec!["name".into(), t.name.clone()],
                    vec!["query form".into(), quote_tag_name(&t.name)],
                    vec!["category".into(), t.category.clone()],
                    vec!["description".into(), t.description.clone()],
                    vec!["members".into(), thousands(t.member_count)],
                    vec!["created".into(), fmt_time(t.created_at_ms)],
                    vec!["updated".into(), fmt_time(t.updated_at_ms)],
                ];
                self.out(
                    table::render(&["field", "value"], &[Align::Left, Align::Left], &rows),
                    tag_json(&t),
                );
            }
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
                let r = self
                    .client
                    .update(UpdateRequest {
                        mutations: vec![m],
                        create_missing_tags: false,
                    })
                    .await?
                    .into_inner();
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
                let r = self
                    .client
                    .update(UpdateRequest {
                        mutations: vec![m],
                        create_missing_tags: false,
                    })
                    .await?
                    .into_inner();
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
            cmd @ (Command::Fields
            | Command::CreateField { .. }
            | Command::DropField { .. }
            | Command::SetValue { .. }
            | Command::ClearValue { .. }
            | Command::Event { .. }
            | Command::Aggregate { .. }
            | Command::Breakdown { .. }
            | Command::Top { .. }
            | Command::Overlap(_)) => self.exec_field(cmd).await?,
            Command::Stats => {
                let s = self.client.stats(StatsRequest {}).await?.into_inner();
                let rows = vec![
                    vec!["customers".into(), thousands(s.customers)],
                    vec!["tags".into(), thousands(s.tags)],
                    vec!["memory (RSS)".into(), table::bytes(s.memory_bytes)],
                    vec!["bitmaps in memory".into(), table::bytes(s.bitmap_bytes)],
                    vec!["disk".into(), table::bytes(s.disk_bytes)],
                    vec!["log since checkpoint".into(), table::bytes(s.wal_bytes)],
                    vec!["segment files".into(), s.segment_files.to_string()],
                    vec![
                        "dictionary sections".into(),
                        s.dictionary_sections.to_string(),
                    ],
                    vec!["lsn".into(), s.lsn.to_string()],
                    vec![
                        "last checkpoint".into(),
                        format!(
                            "lsn {} at {}",
                            s.last_checkpoint_lsn,
                            fmt_time(s.last_checkpoint_at_ms)
                        ),
                    ],
                    vec!["uptime".into(), format!("{} s", s.uptime_seconds)],
                    vec!["version".into(), s.version.clone()],
                    vec!["data directory".into(), s.data_dir.clone()],
                ];
                let value = json!({
                    "customers": s.customers, "tags": s.tags, "memory_bytes": s.memory_bytes, "bitmap_bytes": s.bitmap_bytes,
                    "disk_bytes": s.disk_bytes, "wal_bytes": s.wal_bytes, "segment_files": s.segment_files, "dictionary_sections": s.dictionary_sections, "lsn": s.lsn,
                    "last_checkpoint_lsn": s.last_checkpoint_lsn, "last_checkpoint_at_ms": s.last_checkpoint_at_ms,
                    "uptime_seconds": s.uptime_seconds, "version": s.version, "data_dir": s.data_dir,
                });
                self.out(
                    table::render(&["stat", "value"], &[Align::Left, Align::Right], &rows),
                    value,
                );
            }
            Command::Checkpoint(merge_dictionary) => {
                let c = self
                    .client
                    .checkpoint(CheckpointRequest { merge_dictionary })
                    .await?
                    .into_inner();
                self.out(
                    format!("checkpoint at lsn {}: {} tags written, {} in {} ms", c.lsn, c.tags_written, table::bytes(c.segment_bytes), c.duration_ms),
                    json!({ "lsn": c.lsn, "tags_written": c.tags_written, "segment_bytes": c.segment_bytes, "duration_ms": c.duration_ms }),
                );
            }
            Command::Help(topic) => {
                let text = commands::help(topic.as_deref(), terminal_columns())?;
                self.out(text.clone(), json!({ "help": text }));
            }
            Command::Timing(on) => {
                self.timing = on.unwrap_or(!self.timing);
                let state = if self.timing { "on" } else { "off" };
                self.out(
                    format!("Timing is {state}."),
                    json!({ "timing": self.timing }),
                );
            }
            Command::Quit => return Ok(false),
        }
        Ok(true)
    }

    async fn confirm(&self, question: &str, yes: bool) -> Result<(), Failure> {
        if yes {
            return Ok(());
        }
        match self.confirm {
            Confirm::Yes => Ok(()),
            Confirm::Refuse => Err(Failure::Local(format!(
                "{question} Not confirmed: add --yes to run it without asking"
            ))),
            Confirm::Ask => {
                let mut stdout = tokio::io::stdout();
                let _ = stdout
                    .write_all(format!("{question} [y/N] ").as_bytes())
                    .await;
                let _ = stdout.flush().await;
                let mut line = String::new();
                BufReader::new(tokio::io::stdin())
                    .read_line(&mut line)
                    .await
                    .map_err(|e| Failure::Local(e.to_string()))?;
                if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                    Ok(())
                } else {
                    Err(Failure::Local("not done".into()))
                }
            }
        }
    }

    async fn page(&mut self, query: String, limit: u32, cursor: String) -> Result<(), Failure> {
        let t0 = Instant::now();
        let r = self
            .client
            .members(MembersRequest {
                query: query.clone(),
                limit,
                cursor,
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
        text.push_str(&format!(
            "\n({} shown{}; {ms:.1} ms)",
            r.customers.len(),
            if more {
                ", `more` for the next page"
            } else {
                ""
            }
        ));
        self.out(
            text,
            json!({ "customers": r.customers, "more": more, "ms": ms }),
        );
        self.last_find = Some((query, limit, r.next_cursor));
        Ok(())
    }

    async fn export(&mut self, query: String, path: String) -> Result<(), Failure> {
        let t0 = Instant::now();
        let mut stream = self
            .client
            .export(ExportRequest {
                query: query.clone(),
                batch_size: 0,
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
        out.write_all(b"customer\n").await.map_err(io)?;
        let mut written = 0u64;
        let mut bar: Option<ProgressBar> = None;
        while let Some(batch) = stream.message().await? {
            let pb = bar.get_or_insert_with(|| progress(batch.total, "exporting"));
            let mut buf = String::new();
            for c in &batch.customers {
                buf.push_str(&csv_field(c));
                buf.push('\n');
            }
            out.write_all(buf.as_bytes()).await.map_err(io)?;
            written += batch.customers.len() as u64;
            pb.set_position(written);
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
        self.out(
            format!(
                "exported {} customers to {path} in {secs:.2} s",
                thousands(written)
            ),
            json!({ "exported": written, "path": path, "seconds": secs }),
        );
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

/// A CSV field, quoted when it must be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn tag_json(t: &TagInfo) -> serde_json::Value {
    json!({
        "name": t.name, "category": t.category, "description": t.description, "member_count": t.member_count,
        "created_at_ms": t.created_at_ms, "updated_at_ms": t.updated_at_ms,
    })
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn fmt_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One line describing a failure, with a caret under a query error's position.
pub fn describe(f: &Failure, addr: &str) -> String {
    match f {
        Failure::Cancelled => "cancelled".into(),
        Failure::Local(msg) => format!("error: {msg}"),
        Failure::Server { status, query } => {
            let unreachable = is_unreachable(status);
            if unreachable {
                return format!(
                    "error: cannot reach the server at {addr} ({}); it will be tried again on the next command",
                    status.message()
                );
            }
            let mut out = format!("error: {}", status.message());
            let pos = status
                .metadata()
                .get("tagstore-error-position")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if let (Some(pos), Some(q)) = (pos, query) {
                let prefix: String = q.chars().take(pos).collect();
                out.push_str(&format!(
                    "\n  {q}\n  {}^",
                    " ".repeat(table::width(&prefix))
                ));
            }
            out
        }
    }
}

/// Prints one line of output. When whoever reads it has gone (the shell's
/// output piped into `head`, say), the shell ends quietly, as other Unix
/// tools do, instead of panicking inside `println!`.
fn print_line(line: &dyn std::fmt::Display) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("tagstore-shell: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Columns of the terminal on standard output; `COLUMNS`, or 100, when it
/// is not a terminal.
fn terminal_columns() -> usize {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills a winsize we own; on failure it is left as is.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    if rc == 0 && size.ws_col > 0 {
        return usize::from(size.ws_col);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(100)
}

/// True when a call failed because the connection did not work (refused,
/// reset, closed by a server that went away), not because the server
/// answered with an error. Tonic reports a dead connection as UNAVAILABLE,
/// or, depending on when the connection broke, as UNKNOWN, CANCELLED or
/// INTERNAL, always with the transport's words in the message.
fn is_unreachable(status: &Status) -> bool {
    let msg = status.message().to_ascii_lowercase();
    let transport_words = [
        "transport",
        "connect",
        "connection",
        "h2 protocol",
        "broken pipe",
        "reset",
    ];
    // The server's own UNAVAILABLE (a store that stopped taking writes, a
    // shutdown) names no transport: it is an answer, shown as one.
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    ) && transport_words.iter().any(|w| msg.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn times() {
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(1_764_288_000_000), "2025-11-28 00:00:00");
    }

    #[test]
    fn caret_under_the_position() {
        let mut status = Status::invalid_argument("expected ... at position 8");
        status
            .metadata_mut()
            .insert("tagstore-error-position", "8".parse().unwrap());
        let text = describe(
            &Failure::Server {
                status,
                query: Some("高价值 AND (".into()),
            },
            "x",
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "  高价值 AND (");
        // Two columns for each of 高价值, one for each of " AND ", then the caret under "(".
        assert_eq!(lines[2], format!("  {}^", " ".repeat(11)));
    }

    #[test]
    fn a_dead_connection_is_unreachable_but_a_server_answer_is_not() {
        use tonic::{Code, Status};
        for s in [
            Status::unavailable("error trying to connect: tcp connect error: Connection refused"),
            Status::unknown("transport error"),
            Status::cancelled("operation was canceled: connection closed"),
            Status::internal("h2 protocol error: error reading a body from connection"),
        ] {
            assert!(is_unreachable(&s), "{s:?}");
        }
        for s in [
            Status::unavailable(
                "storage stopped after a fatal error and accepts no more writes: x",
            ),
            Status::unavailable("the server is shutting down"),
            Status::new(Code::NotFound, "tag not found: \"connect\""),
        ] {
            assert!(!is_unreachable(&s), "{s:?}");
        }
    }
}
