//! Running shell commands against a server, over the public proto only, and
//! printing their results (as text or as JSON lines). This file holds the
//! session (connection, output, confirmation), the server and shell
//! commands (`stats`, `checkpoint`, `help`, `\timing`, `quit`) and the
//! error display; the other commands run in `session/`, by the groups of
//! `commands/`: `reads`, `tags`, `fields`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::RwLock;
use serde_json::json;
use tagstore_proto::names::{check_key, quote_tag_name};
use tagstore_proto::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::{Code, Status};

use crate::commands::{self, Command, Who};

mod fields;
mod ingest;
mod reads;
mod rules;
mod tags;
mod watch;
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
    client: tagstore_proto::auth::Client,
    pub json: bool,
    pub timing: bool,
    pub confirm: Confirm,
    /// The last `find`, for `more`: query, page size, cursor.
    /// The last `find`: query, page size, identity type, next cursor.
    last_find: Option<(String, u32, String, String)>,
    /// Tag names for completion, refreshed when tags change.
    pub tag_names: Arc<RwLock<Vec<String>>>,
    /// The moment reads are asked at (`as of`); `None`: now.
    pub as_of: Option<AsOf>,
}

pub use tagstore_proto::connect::{TlsOptions, endpoint};

impl Session {
    /// A session that connects lazily (and reconnects by itself after a drop).
    pub fn new(
        addr: &str,
        token: Option<&str>,
        tls: &TlsOptions,
        json: bool,
        confirm: Confirm,
    ) -> Result<Self, String> {
        let channel = endpoint(addr, tls)?.connect_lazy();
        let bearer = tagstore_proto::auth::Bearer::from_flag_or_env(token)?;
        Ok(Self {
            addr: addr
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_string(),
            client: tagstore_proto::auth::client(channel, bearer)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
            json,
            timing: false,
            confirm,
            last_find: None,
            tag_names: Arc::default(),
            as_of: None,
        })
    }

    /// How the prompt names the moment reads are asked at (empty: now).
    pub fn as_of_label(&self) -> String {
        match self.as_of.as_ref().and_then(|a| a.at.as_ref()) {
            None => String::new(),
            Some(as_of::At::Day(d)) => format!(" as of {d}"),
            Some(as_of::At::Position(p)) => format!(" as of position {p}"),
        }
    }

    /// `as of …`: checked with a count of every customer then, and kept
    /// for the reads that follow only when the server can read it.
    async fn set_as_of(&mut self, at: Option<as_of::At>) -> Result<(), Failure> {
        let Some(at) = at else {
            self.as_of = None;
            self.out(
                "reading the store as it is now".into(),
                json!({ "as_of": null }),
            );
            return Ok(());
        };
        let as_of = AsOf { at: Some(at) };
        let n = self
            .client
            .count(CountRequest {
                queries: vec!["ALL".into()],
                as_of: Some(as_of.clone()),
            })
            .await?
            .into_inner()
            .counts[0];
        self.as_of = Some(as_of);
        let label = self.as_of_label();
        self.out(
            format!(
                "reading the store{label} ({} customers then); `as of now` to go back",
                thousands(n)
            ),
            json!({ "as_of": label.trim_start_matches(" as of "), "customers": n }),
        );
        Ok(())
    }

    /// Fetches the tag names for completion; quietly keeps the old list on failure.
    pub async fn refresh_tags(&mut self) {
        if let Ok(tags) = self.all_tags().await {
            *self.tag_names.write() = tags.into_iter().map(|t| t.name).collect();
        }
    }

    /// Every tag, page after page (`ListTags` ends an answer early once it
    /// holds a few MiB).
    pub async fn all_tags(&mut self) -> Result<Vec<TagInfo>, Status> {
        let client = &mut self.client;
        every_page(
            async |after| {
                let page = client
                    .list_tags(ListTagsRequest {
                        after,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                Ok((page.tags, page.more))
            },
            |t: &TagInfo| &t.name,
        )
        .await
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
            cmd @ (Command::Count(_)
            | Command::Find { .. }
            | Command::More
            | Command::Export { .. }
            | Command::Profile { .. }
            | Command::Identities(_)
            | Command::Merges { .. }
            | Command::Link { .. }
            | Command::Unmerge { .. }
            | Command::Audiences { .. }
            | Command::CreateAudience { .. }
            | Command::DropAudience { .. }
            | Command::TakeSnapshot { .. }
            | Command::Snapshots { .. }
            | Command::DropSnapshot { .. }
            | Command::History { .. }
            | Command::Tags
            | Command::Tag(_)) => self.exec_read(cmd).await?,
            Command::Watch {
                tags,
                values,
                audiences,
                compact,
                after,
                seconds,
                limit,
            } => {
                let request = WatchRequest {
                    tags,
                    values: values
                        .into_iter()
                        .map(|(field, value)| WatchValue { field, value })
                        .collect(),
                    after_lsn: after,
                    max_changes: 0,
                    audiences,
                    compact,
                };
                self.watch(request, seconds, limit).await?
            }
            cmd @ (Command::CreateTag { .. }
            | Command::DropTag { .. }
            | Command::Add { .. }
            | Command::Remove { .. }
            | Command::Resolve { .. }
            | Command::Import { .. }
            | Command::DeleteCustomers { .. }) => self.exec_tag(cmd).await?,
            cmd @ (Command::Fields
            | Command::CreateField { .. }
            | Command::DropField { .. }
            | Command::SetValue { .. }
            | Command::CombineValue { .. }
            | Command::ClearValue { .. }
            | Command::Event { .. }
            | Command::Aggregate { .. }
            | Command::Breakdown { .. }
            | Command::Top { .. }
            | Command::Overlap(_)) => self.exec_field(cmd).await?,
            cmd @ (Command::Sources
            | Command::CreateSource { .. }
            | Command::DropSource { .. }
            | Command::PauseSource { .. }
            | Command::Ingest { .. }
            | Command::RebuildFacts { .. }
            | Command::RebuildFactsWhere { .. }) => self.exec_ingest(cmd).await?,
            cmd @ (Command::CreateRule { .. }
            | Command::CreateLifecycle { .. }
            | Command::DropRule { .. }
            | Command::Rules
            | Command::TurnDays) => self.exec_rule(cmd).await?,
            Command::Audit(f) => {
                let r = self
                    .client
                    .read_audit(ReadAuditRequest {
                        after: f.after,
                        limit: f.limit,
                        who: f.who,
                        method: f.method,
                        subject: f.subject,
                        since_ms: f.since_ms,
                        until_ms: f.until_ms,
                    })
                    .await?
                    .into_inner();
                let rows: Vec<Vec<String>> = r
                    .records
                    .iter()
                    .map(|x| {
                        vec![
                            x.seq.to_string(),
                            fmt_time(x.at_ms),
                            if x.who.is_empty() {
                                "-".into()
                            } else {
                                x.who.clone()
                            },
                            x.method.clone(),
                            thousands(x.customers),
                            x.outcome.clone(),
                            x.subject.clone(),
                        ]
                    })
                    .collect();
                let mut text = if rows.is_empty() {
                    "no audit records match".to_string()
                } else {
                    table::render(
                        &[
                            "seq",
                            "when (UTC)",
                            "who",
                            "call",
                            "customers",
                            "outcome",
                            "about",
                        ],
                        &[
                            Align::Right,
                            Align::Left,
                            Align::Left,
                            Align::Left,
                            Align::Right,
                            Align::Left,
                            Align::Left,
                        ],
                        &rows,
                    )
                };
                if r.more
                    && let Some(last) = r.records.last()
                {
                    text.push_str(&format!(
                        "\n… more: `audit after {}` with the same filters",
                        last.seq
                    ));
                }
                let json_rows: Vec<serde_json::Value> = r
                    .records
                    .iter()
                    .map(|x| {
                        json!({"seq": x.seq, "at_ms": x.at_ms, "who": x.who, "method": x.method,
                        "customers": x.customers, "subject": x.subject, "outcome": x.outcome})
                    })
                    .collect();
                self.out(text, json!({ "records": json_rows, "more": r.more }));
            }
            Command::AsOf(at) => self.set_as_of(at).await?,
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
                    vec![
                        "history".into(),
                        if s.history_versions == 0 {
                            "none kept".into()
                        } else {
                            format!(
                                "{} versions from lsn {} ({}), {}",
                                s.history_versions,
                                s.history_begins_position,
                                fmt_time(s.history_begins_at_ms),
                                table::bytes(s.history_bytes)
                            )
                        },
                    ],
                    vec![
                        "facts due a rebuild".into(),
                        format!("{} customers", s.facts_rebuilds_due),
                    ],
                ];
                let value = json!({
                    "customers": s.customers, "tags": s.tags, "memory_bytes": s.memory_bytes, "bitmap_bytes": s.bitmap_bytes,
                    "disk_bytes": s.disk_bytes, "wal_bytes": s.wal_bytes, "segment_files": s.segment_files, "dictionary_sections": s.dictionary_sections, "lsn": s.lsn,
                    "last_checkpoint_lsn": s.last_checkpoint_lsn, "last_checkpoint_at_ms": s.last_checkpoint_at_ms,
                    "uptime_seconds": s.uptime_seconds, "version": s.version, "data_dir": s.data_dir,
                    "history_bytes": s.history_bytes, "history_versions": s.history_versions,
                    "history_begins_position": s.history_begins_position, "history_begins_at_ms": s.history_begins_at_ms,
                    "facts_rebuilds_due": s.facts_rebuilds_due,
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
                let archived = if c.events_archived > 0 {
                    format!(
                        "; {} events archived ({})",
                        thousands(c.events_archived),
                        table::bytes(c.archive_bytes)
                    )
                } else {
                    String::new()
                };
                self.out(
                    format!("checkpoint at lsn {}: {} tags written, {} in {} ms{archived}", c.lsn, c.tags_written, table::bytes(c.segment_bytes), c.duration_ms),
                    json!({ "lsn": c.lsn, "tags_written": c.tags_written, "segment_bytes": c.segment_bytes, "duration_ms": c.duration_ms, "events_archived": c.events_archived, "archive_bytes": c.archive_bytes }),
                );
            }
            Command::Backup { file, since } => self.backup(&file, since.as_deref()).await?,
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

    /// `backup`: the stream saved to a new file, with a progress bar.
    async fn backup(
        &mut self,
        file: &std::path::Path,
        since: Option<&std::path::Path>,
    ) -> Result<(), Failure> {
        let mut bar: Option<ProgressBar> = None;
        let json = self.json;
        let res = tagstore_proto::backup::save(&mut self.client, since, file, |p| {
            if json {
                return;
            }
            let pb = bar.get_or_insert_with(|| {
                let pb = ProgressBar::new(p.bytes_estimated);
                pb.set_style(
                    ProgressStyle::with_template(
                        "backing up [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                pb
            });
            pb.set_length(p.bytes_estimated);
            pb.set_position(p.bytes_copied);
        })
        .await;
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        let d = match res {
            Ok(d) => d,
            Err(tagstore_proto::backup::SaveError::Server(status)) => return Err(status.into()),
            Err(tagstore_proto::backup::SaveError::Local(m)) => return Err(Failure::Local(m)),
        };
        let kind = if d.base_id.is_empty() {
            "full".to_string()
        } else {
            format!("an increment of {} at lsn {}", d.base_id, d.base_position)
        };
        let in_base = if d.files_in_base > 0 {
            format!(" (and {} in its base)", thousands(d.files_in_base))
        } else {
            String::new()
        };
        self.out(
            format!(
                "backup {} ({kind}) holds every write up to lsn {}: {} files{in_base}, {} log records; {} read, {} written to {}",
                d.id,
                d.position,
                thousands(d.files),
                thousands(d.log_records),
                table::bytes(d.content_bytes),
                table::bytes(d.backup_bytes),
                file.display()
            ),
            json!({ "id": d.id, "position": d.position, "checkpoint_lsn": d.checkpoint_lsn, "base_id": d.base_id, "base_position": d.base_position, "files": d.files, "files_in_base": d.files_in_base, "log_records": d.log_records, "content_bytes": d.content_bytes, "backup_bytes": d.backup_bytes, "file": file.display().to_string() }),
        );
        Ok(())
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
        "created_at_ms": t.created_at_ms, "updated_at_ms": t.updated_at_ms, "rule": t.rule,
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
    let transport = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    ) && transport_words.iter().any(|w| msg.contains(w));
    // A request sent on a connection the server closed at that moment (it
    // was killed) is cancelled by the client's transport; the server never
    // answers with this.
    let dropped = status.code() == Code::Cancelled && msg == "operation was canceled";
    transport || dropped
}

/// Every entry of a listing that comes in pages by name (`ListTags`,
/// `ListFields`): `page` is asked for the entries after the last name got
/// (empty: from the start) and answers with them and whether more follow.
pub(crate) async fn every_page<T>(
    mut page: impl AsyncFnMut(String) -> Result<(Vec<T>, bool), Status>,
    name: impl Fn(&T) -> &String,
) -> Result<Vec<T>, Status> {
    let mut all: Vec<T> = Vec::new();
    loop {
        let after = all.last().map(|t| name(t).clone()).unwrap_or_default();
        let (got, more) = page(after).await?;
        let empty = got.is_empty();
        all.extend(got);
        if !more || empty {
            return Ok(all);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by CI: a command sent just as the server died printed
    /// "error: operation was canceled" instead of saying it could not
    /// reach the server.
    #[test]
    fn a_request_cancelled_by_a_dropped_connection_is_unreachable() {
        assert!(is_unreachable(&Status::cancelled("operation was canceled")));
        assert!(is_unreachable(&Status::unavailable("transport error")));
        assert!(!is_unreachable(&Status::unavailable(
            "the server is shutting down"
        )));
        assert!(!is_unreachable(&Status::cancelled(
            "the export was abandoned"
        )));
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
