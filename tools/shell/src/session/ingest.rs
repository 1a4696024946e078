//! The shell's ingestion commands: `sources`, `create source`, `drop
//! source`, and `ingest`, which sends a file's records on one `Ingest`
//! stream in batches of whole records (a CSV record may hold line breaks
//! inside quotes; batches never split one), with a progress bar, and
//! writes every rejected record's line and reason to a report.

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::*;
use crate::commands::SourceFrom;

/// Customers a `rebuild facts where` call names at most (a call is one
/// write; its customers' facts are bounded by the server).
const REBUILD_CHUNK: u32 = 10_000;
/// Customers left out of a `rebuild facts where` (their events thinned by
/// retention) that its answer names; the rest are counted.
const NAMED_LEFT_OUT: usize = 100;

/// Bytes of records per batch (a batch ends at the first record boundary
/// after this many).
const BATCH_BYTES: usize = 1 << 20;
/// Batches read ahead of the stream.
const AHEAD: usize = 8;

/// Where a buffer's last whole record ends: just after the last newline
/// outside quotes (CSV) or the last newline (JSON Lines, where a newline
/// is never inside a string). `in_quotes` carries the quote state of the
/// bytes scanned so far.
fn record_end(buf: &[u8], from: usize, csv: bool, in_quotes: &mut bool) -> Option<usize> {
    let mut end = None;
    for (i, &b) in buf.iter().enumerate().skip(from) {
        if csv && b == b'"' {
            *in_quotes = !*in_quotes;
        } else if b == b'\n' && !*in_quotes {
            end = Some(i + 1);
        }
    }
    end
}

impl Session {
    pub(super) async fn exec_ingest(&mut self, cmd: Command) -> Result<(), Failure> {
        match cmd {
            Command::Sources => {
                let r = self
                    .client
                    .list_sources(ListSourcesRequest {})
                    .await?
                    .into_inner();
                let row =
                    |s: &SourceInfo| vec![s.name.clone(), s.format.clone(), s.description.clone()];
                let mut rows: Vec<Vec<String>> = r.sources.iter().map(row).collect();
                let mut text = String::new();
                if rows.is_empty() {
                    text.push_str("(no sources)\n");
                } else {
                    text.push_str(&table::render(
                        &["source", "format", "description"],
                        &[Align::Left, Align::Left, Align::Left],
                        &rows,
                    ));
                }
                // Kafka sources: what their consumers are doing.
                let kafka: Vec<(&str, &KafkaSourceStatus)> = r
                    .sources
                    .iter()
                    .filter_map(|s| s.kafka.as_ref().map(|k| (s.name.as_str(), k)))
                    .collect();
                if !kafka.is_empty() {
                    let rows: Vec<Vec<String>> = kafka
                        .iter()
                        .flat_map(|(name, k)| {
                            k.partitions.iter().map(move |p| {
                                vec![
                                    name.to_string(),
                                    k.state.clone(),
                                    format!("{}/{}", p.topic, p.partition),
                                    p.position.to_string(),
                                    p.lag_records.to_string(),
                                    format!("{:.1}", p.lag_seconds),
                                ]
                            })
                        })
                        .collect();
                    text.push_str("\nKafka consumers:\n");
                    text.push_str(&table::render(
                        &["source", "state", "partition", "position", "lag", "lag s"],
                        &[
                            Align::Left,
                            Align::Left,
                            Align::Left,
                            Align::Right,
                            Align::Right,
                            Align::Right,
                        ],
                        &rows,
                    ));
                    for (name, k) in &kafka {
                        text.push_str(&format!(
                            "\n{name}: {} applied, {} duplicates, {} ignored, {} rejected; {:.0} records/s; {} records behind (at most {:.1} s)",
                            k.applied, k.duplicates, k.ignored, k.rejected, k.records_per_second,
                            k.lag_records, k.lag_seconds
                        ));
                        if k.position_resets > 0 {
                            text.push_str(&format!(
                                "\n{name}: {} times the brokers did not hold a position: records skipped (see the rejects)",
                                k.position_resets
                            ));
                        }
                        if k.unlisted_partitions > 0 {
                            text.push_str(&format!(
                                "\n{name}: {} more partitions, none further behind than those listed",
                                k.unlisted_partitions
                            ));
                        }
                        if !k.error.is_empty() {
                            text.push_str(&format!("\n{name}: {} ({})", k.error, k.state));
                        }
                        // The newest five (the store keeps 100: `--json`).
                        for r in k.recent_rejects.iter().rev().take(5) {
                            text.push_str(&format!(
                                "\n{name}: {} {} {}/{} offset {}: {}",
                                fmt_time(r.at_ms),
                                if r.skipped {
                                    "skipped from"
                                } else {
                                    "rejected"
                                },
                                r.topic,
                                r.partition,
                                r.offset,
                                r.reason
                            ));
                        }
                    }
                    text.push('\n');
                }
                rows = r.presets.iter().map(row).collect();
                text.push_str("\npresets (create source <name> preset <preset>):\n");
                text.push_str(&table::render(
                    &["preset", "format", "description"],
                    &[Align::Left, Align::Left, Align::Left],
                    &rows,
                ));
                let json_of = |s: &SourceInfo| {
                    let kafka = s.kafka.as_ref().map(|k| {
                        json!({
                            "state": k.state, "error": k.error, "error_at_ms": k.error_at_ms,
                            "applied": k.applied, "duplicates": k.duplicates,
                            "ignored": k.ignored, "rejected": k.rejected,
                            "records_per_second": k.records_per_second,
                            "lag_records": k.lag_records, "lag_seconds": k.lag_seconds,
                            "unlisted_partitions": k.unlisted_partitions,
                            "position_resets": k.position_resets,
                            "partitions": k.partitions.iter().map(|p| json!({
                                "topic": p.topic, "partition": p.partition,
                                "position": p.position, "high_watermark": p.high_watermark,
                                "lag_records": p.lag_records, "lag_seconds": p.lag_seconds,
                            })).collect::<Vec<_>>(),
                            "recent_rejects": k.recent_rejects.iter().map(|r| json!({
                                "topic": r.topic, "partition": r.partition,
                                "offset": r.offset, "reason": r.reason,
                                "at_ms": r.at_ms, "skipped": r.skipped,
                            })).collect::<Vec<_>>(),
                        })
                    });
                    json!({"name": s.name, "format": s.format, "description": s.description,
                           "created_at_ms": s.created_at_ms, "updated_at_ms": s.updated_at_ms,
                           "kafka": kafka})
                };
                self.out(
                    text.trim_end().to_string(),
                    json!({
                        "sources": r.sources.iter().map(json_of).collect::<Vec<_>>(),
                        "presets": r.presets.iter().map(json_of).collect::<Vec<_>>(),
                    }),
                );
            }
            Command::CreateSource {
                name,
                from,
                replace,
            } => {
                let (definition, preset) = match from {
                    SourceFrom::Preset(p) => (String::new(), p),
                    SourceFrom::File(path) => {
                        let text = tokio::fs::read_to_string(&path)
                            .await
                            .map_err(|e| Failure::Local(format!("cannot read {path}: {e}")))?;
                        (text, String::new())
                    }
                };
                let r = self
                    .client
                    .create_source(CreateSourceRequest {
                        name: name.clone(),
                        definition,
                        preset,
                        replace,
                    })
                    .await?
                    .into_inner();
                let verb = if r.created { "created" } else { "replaced" };
                self.out(
                    format!("{verb} source {name}"),
                    json!({"source": name, "created": r.created}),
                );
            }
            Command::DropSource { name, yes } => {
                self.confirm(
                    &format!("drop source {name}? (what its records produced stays)"),
                    yes,
                )
                .await?;
                self.client
                    .drop_source(DropSourceRequest { name: name.clone() })
                    .await?;
                self.out(format!("dropped source {name}"), json!({"dropped": name}));
            }
            Command::PauseSource { name, paused } => {
                if paused {
                    self.client
                        .pause_source(PauseSourceRequest { name: name.clone() })
                        .await?;
                } else {
                    self.client
                        .resume_source(ResumeSourceRequest { name: name.clone() })
                        .await?;
                }
                let verb = if paused { "paused" } else { "resumed" };
                self.out(
                    format!("{verb} source {name}"),
                    json!({"source": name, "paused": paused}),
                );
            }
            Command::Ingest {
                source,
                path,
                rejects,
            } => self.ingest(source, path, rejects).await?,
            Command::RebuildFacts { customers, partial } => {
                let r = self
                    .client
                    .rebuild_facts(RebuildFactsRequest {
                        customers,
                        allow_partial: partial,
                        skip_partial: false,
                    })
                    .await?
                    .into_inner();
                let left_out = r.partial.len() as u64;
                self.say_rebuilt(&r, String::new(), left_out);
            }
            Command::RebuildFactsWhere { query, partial } => {
                self.rebuild_where(query, partial).await?
            }
            _ => unreachable!("not an ingestion command"),
        }
        Ok(())
    }

    /// What a rebuild did; `calls` says how it was split, when it was;
    /// `left_out` customers were skipped for their dropped events (the
    /// first of them named in `r.partial`).
    fn say_rebuilt(&self, r: &RebuildFactsResponse, calls: String, left_out: u64) {
        let mut text = format!(
            "rebuilt the facts of {} customers from {} kept events: {} values set, {} behaviour buckets{calls}",
            thousands(r.rebuilt),
            thousands(r.events),
            thousands(r.values_set),
            thousands(r.events_added)
        );
        if r.events_expired > 0 {
            text.push_str(&format!(
                " ({} behaviour events past their field's retention)",
                thousands(r.events_expired)
            ));
        }
        if !r.not_found.is_empty() {
            text.push_str(&format!("\nno such customer: {}", r.not_found.join(", ")));
        }
        if r.refused > 0 {
            text.push_str(&format!(
                "\n{} events the fact rules refuse now: {}",
                thousands(r.refused),
                r.refusals.join("; ")
            ));
        }
        if r.events_dropped_to_ms > 0 {
            text.push_str(&format!(
                "\nevents ingested up to {} are no longer kept: their facts are gone",
                fmt_time(r.events_dropped_to_ms)
            ));
        }
        if let Some(first) = r.partial.first() {
            text.push_str(&format!(
                "\n{} customers left out, since retention dropped some of their events (first: {first}); \
                 add `partial` to rebuild them from the events kept",
                thousands(left_out),
            ));
        }
        self.out(
            text,
            json!({"rebuilt": r.rebuilt, "events": r.events, "values_set": r.values_set,
                   "events_added": r.events_added, "events_expired": r.events_expired,
                   "not_found": r.not_found, "refused": r.refused, "refusals": r.refusals,
                   "events_dropped_to_ms": r.events_dropped_to_ms, "lsn": r.lsn,
                   "left_out": left_out, "partial": r.partial}),
        );
    }

    /// `rebuild facts where <query>`: the query's members as one export,
    /// rebuilt [`REBUILD_CHUNK`] at a time as they come, each call one
    /// write of the server's (whole or not at all). Without `partial`,
    /// customers some of whose events retention dropped are left out and
    /// counted (`skip_partial`), not the end of the run. Stopped half-way, the
    /// calls before stay done and it says how far it came; running it again
    /// rebuilds them again to the same facts.
    async fn rebuild_where(&mut self, query: String, partial: bool) -> Result<(), Failure> {
        let mut stream = self
            .client
            .export(ExportRequest {
                query: query.clone(),
                batch_size: REBUILD_CHUNK,
                identity_type: String::new(),
                hash: String::new(),
                hash_upper: false,
                as_of: None,
            })
            .await
            .map_err(with_query(&query))?
            .into_inner();
        let mut sum = RebuildFactsResponse::default();
        let mut calls = 0u64;
        let mut left_out = 0u64;
        let mut bar: Option<ProgressBar> = None;
        let stopped = |sum: &RebuildFactsResponse, calls: u64| {
            format!(
                "stopped after {calls} calls: the facts of {} customers were rebuilt (each call whole); `rebuild facts where` again finishes the job (a rebuild gives the same facts again)",
                thousands(sum.rebuilt)
            )
        };
        loop {
            let batch = tokio::select! {
                m = stream.message() => m,
                _ = tokio::signal::ctrl_c() => {
                    if let Some(pb) = bar { pb.finish_and_clear(); }
                    print_line(&stopped(&sum, calls));
                    return Err(Failure::Cancelled);
                }
            };
            let batch = match batch {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(status) => {
                    if let Some(pb) = bar {
                        pb.finish_and_clear();
                    }
                    if calls > 0 {
                        print_line(&stopped(&sum, calls));
                    }
                    return Err(status.into());
                }
            };
            let pb = bar.get_or_insert_with(|| progress(batch.total, "rebuilding"));
            if batch.customers.is_empty() {
                continue;
            }
            let n = batch.customers.len() as u64;
            let answer = self
                .client
                .rebuild_facts(RebuildFactsRequest {
                    customers: batch.customers,
                    allow_partial: partial,
                    // Without `partial`, a customer some of whose events
                    // retention dropped is left out, not the end of it.
                    skip_partial: !partial,
                })
                .await;
            let r = match answer {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    pb.finish_and_clear();
                    if calls > 0 {
                        print_line(&stopped(&sum, calls));
                    }
                    return Err(status.into());
                }
            };
            calls += 1;
            sum.rebuilt += r.rebuilt;
            sum.events += r.events;
            sum.refused += r.refused;
            for why in r.refusals {
                if !sum.refusals.contains(&why) {
                    sum.refusals.push(why);
                }
            }
            sum.values_set += r.values_set;
            sum.events_added += r.events_added;
            sum.events_expired += r.events_expired;
            // Erased between the export and the rebuild.
            sum.not_found.extend(r.not_found);
            left_out += r.partial.len() as u64;
            let room = NAMED_LEFT_OUT.saturating_sub(sum.partial.len());
            sum.partial.extend(r.partial.into_iter().take(room));
            sum.events_dropped_to_ms = sum.events_dropped_to_ms.max(r.events_dropped_to_ms);
            sum.lsn = sum.lsn.max(r.lsn);
            pb.inc(n);
        }
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        let split = if calls > 1 {
            format!(
                " ({calls} calls of at most {})",
                thousands(REBUILD_CHUNK.into())
            )
        } else {
            String::new()
        };
        self.say_rebuilt(&sum, split, left_out);
        Ok(())
    }

    async fn ingest(
        &mut self,
        source: String,
        path: String,
        rejects: Option<String>,
    ) -> Result<(), Failure> {
        let t0 = Instant::now();
        let list = self
            .client
            .list_sources(ListSourcesRequest {})
            .await?
            .into_inner();
        let info = list
            .sources
            .iter()
            .find(|s| s.name == source)
            .ok_or_else(|| {
                Failure::Local(format!(
                    "there is no source {source:?} (`sources` lists them; `create source` makes one)"
                ))
            })?;
        let csv = info.format == "csv";
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Failure::Local(format!("cannot read {path}: {e}")))?;
        let size = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        let report_path = rejects.unwrap_or_else(|| format!("{path}.rejects.csv"));
        let pb = progress(size, "ingesting");

        // The reader: batches of whole records onto the stream.
        let (tx, rx) = mpsc::channel::<IngestRequest>(AHEAD);
        let reading_path = path.clone();
        let reader = tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::with_capacity(2 * BATCH_BYTES);
            let mut scanned = 0;
            let mut in_quotes = false;
            let mut seq = 0u64;
            let mut chunk = vec![0u8; 256 << 10];
            let mut eof = false;
            while !eof {
                let n = file
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("reading {reading_path}: {e}"))?;
                if n == 0 {
                    eof = true;
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
                if buf.len() < BATCH_BYTES && !eof {
                    continue;
                }
                let end = if eof {
                    Some(buf.len()).filter(|&l| l > 0)
                } else {
                    let end = record_end(&buf, scanned, csv, &mut in_quotes);
                    scanned = buf.len();
                    end
                };
                let Some(end) = end else { continue };
                let rest = buf.split_off(end);
                seq += 1;
                let batch = IngestRequest {
                    source: if seq == 1 {
                        source.clone()
                    } else {
                        String::new()
                    },
                    seq,
                    data: std::mem::replace(&mut buf, rest),
                    ..Default::default()
                };
                // Quote state restarts at the new buffer's start: the bytes
                // after the last boundary are rescanned from there.
                scanned = 0;
                in_quotes = false;
                if tx.send(batch).await.is_err() {
                    break;
                }
            }
            Ok::<u64, String>(seq)
        });

        let mut stream = self
            .client
            .ingest(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let (mut accepted, mut duplicates, mut ignored, mut new_customers) =
            (0u64, 0u64, 0u64, 0u64);
        let mut rejected: Vec<RejectedRecord> = Vec::new();
        let (mut linked, mut merged) = (0u64, 0u64);
        // The first few merges, shown.
        let mut shown: Vec<CustomerMerge> = Vec::new();
        let mut refused = 0u64;
        let mut shown_refused: Vec<RefusedLink> = Vec::new();
        let ended = loop {
            match stream.message().await {
                Ok(Some(a)) => {
                    accepted += a.accepted;
                    duplicates += a.duplicates;
                    ignored += a.ignored;
                    new_customers += a.new_customers;
                    rejected.extend(a.rejected);
                    linked += a.identities_linked;
                    merged += a.merges.len() as u64 + a.merges_omitted;
                    let room = SHOWN_MERGES.saturating_sub(shown.len());
                    shown.extend(a.merges.into_iter().take(room));
                    refused += a.refused_links.len() as u64 + a.refused_links_omitted;
                    let room = SHOWN_MERGES.saturating_sub(shown_refused.len());
                    shown_refused.extend(a.refused_links.into_iter().take(room));
                    // Batches are about BATCH_BYTES each: close enough for a bar.
                    pb.set_position(a.seq.saturating_mul(BATCH_BYTES as u64).min(size));
                }
                Ok(None) => break None,
                Err(status) => break Some(status),
            }
        };
        pb.finish_and_clear();
        let read = reader
            .await
            .map_err(|e| Failure::Local(format!("file reader failed: {e}")))?;
        if !rejected.is_empty() {
            let mut out = String::from("line,reason\n");
            for r in &rejected {
                out.push_str(&format!(
                    "{},\"{}\"\n",
                    r.line,
                    r.reason.replace('"', "\"\"")
                ));
            }
            tokio::fs::write(&report_path, out)
                .await
                .map_err(|e| Failure::Local(format!("cannot write {report_path}: {e}")))?;
        }
        if let Some(status) = ended {
            return Err(Failure::Server {
                status,
                query: None,
            });
        }
        read.map_err(Failure::Local)?;
        let records = accepted + duplicates + ignored + rejected.len() as u64;
        let secs = t0.elapsed().as_secs_f64();
        let mut text = format!(
            "{} records: {} accepted, {} duplicates, {} ignored, {} rejected; {} new customers, {} identities linked, {} merged; {:.1} s ({}/s)",
            thousands(records),
            thousands(accepted),
            thousands(duplicates),
            thousands(ignored),
            thousands(rejected.len() as u64),
            thousands(new_customers),
            thousands(linked),
            thousands(merged),
            secs,
            thousands((records as f64 / secs.max(1e-9)) as u64),
        );
        if !rejected.is_empty() {
            text.push_str(&format!("\nrejected records: {report_path}"));
        }
        for m in &shown {
            text.push_str(&format!(
                "\n  merge {}: {} joined {} (both named by {})",
                m.merge_id, m.absorbed, m.survivor, m.via
            ));
        }
        if merged > shown.len() as u64 {
            text.push_str("\n  … `merges` lists them all");
        }
        if refused > 0 {
            text.push_str(&format!(
                "\n{} identities kept out by the guard rails:",
                thousands(refused)
            ));
            for r in &shown_refused {
                text.push_str(&format!(
                    "\n  line {}: {}: {}",
                    r.line, r.identity, r.reason
                ));
            }
        }
        self.out(
            text,
            json!({
                "records": records, "accepted": accepted, "duplicates": duplicates,
                "ignored": ignored, "rejected": rejected.len(), "new_customers": new_customers,
                "identities_linked": linked, "merged": merged, "refused_links": refused,
                "rejects_file": if rejected.is_empty() { None } else { Some(&report_path) },
                "seconds": round3(secs),
            }),
        );
        Ok(())
    }
}

/// Merges that `ingest` lists.
const SHOWN_MERGES: usize = 5;

#[cfg(test)]
mod tests {
    use super::record_end;

    #[test]
    fn batches_end_at_record_boundaries() {
        let csv = b"a,b\n1,\"x\ny\"\n2,\"q\"\"\"\n3";
        let mut q = false;
        assert_eq!(record_end(csv, 0, true, &mut q), Some(csv.len() - 1));
        let mut q = false;
        // Inside the quoted line break: the boundary is the header's.
        assert_eq!(record_end(&csv[..8], 0, true, &mut q), Some(4));
        assert!(q);
        let json = b"{\"a\":\"x\\\"\"}\n{\"b\":1}";
        let mut q = false;
        assert_eq!(record_end(json, 0, false, &mut q), Some(12));
    }
}
