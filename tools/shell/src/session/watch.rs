//! The shell's `watch`: the change feed printed as it comes, a line per
//! customer per write (a stage change shown as `from → to`), until Ctrl-C,
//! `for` seconds or `limit` changes; then where to resume from.

use std::collections::BTreeMap;

use tagstore_proto::membership_change::Kind;

use super::*;

impl Session {
    /// Watches what `request` names until `seconds` pass, `limit` changes
    /// are shown, or Ctrl-C.
    pub(super) async fn watch(
        &mut self,
        request: WatchRequest,
        seconds: Option<u64>,
        limit: Option<u64>,
    ) -> Result<(), Failure> {
        let after = request.after_lsn;
        let mut stream = self.client.watch(request).await?.into_inner();
        let deadline = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let mut position = after.unwrap_or(0);
        let mut seen = 0u64;
        let mut said_start = false;
        let end = loop {
            let next = async {
                match deadline {
                    Some(d) => tokio::time::timeout_at(d, stream.message()).await.ok(),
                    None => Some(stream.message().await),
                }
            };
            let msg = tokio::select! {
                m = next => m,
                _ = tokio::signal::ctrl_c() => break "interrupted",
            };
            let msg = match msg {
                None => break "time is up",
                Some(Ok(Some(m))) => m,
                Some(Ok(None)) => break "the server ended the feed",
                Some(Err(status)) => return Err(status.into()),
            };
            if !said_start {
                said_start = true;
                if !self.json {
                    print_line(&format!(
                        "watching from lsn {} (Ctrl-C ends)",
                        after.unwrap_or(msg.lsn)
                    ));
                }
            }
            seen += msg.changes.len() as u64;
            seen += msg
                .grouped
                .iter()
                .map(|g| u64::from(g.entered_count) + u64::from(g.left_count))
                .sum::<u64>();
            self.print_changes(&msg)?;
            if msg.write_complete {
                position = msg.lsn;
                if limit.is_some_and(|l| seen >= l) {
                    break "the limit is reached";
                }
            }
        };
        self.out(
            format!(
                "{end}: {} changes; every change up to lsn {position} shown (resume with `after {position}`)",
                thousands(seen)
            ),
            json!({ "ended": end, "changes": seen, "lsn": position }),
        );
        Ok(())
    }

    /// One message's changes: a line per customer (or, compact, a line per
    /// tag, value or audience with its ids).
    fn print_changes(&self, m: &WatchResponse) -> Result<(), String> {
        if !m.grouped.is_empty() {
            return self.print_groups(m);
        }
        if self.json {
            for c in &m.changes {
                let kind = Kind::try_from(c.kind).map_or("unknown", |k| match k {
                    Kind::Entered => "entered",
                    Kind::Left => "left",
                    Kind::Dropped => "dropped",
                    Kind::Unspecified => "unknown",
                });
                print_line(&json!({
                    "lsn": m.lsn, "at_ms": m.at_ms, "kind": kind, "tag": c.tag,
                    "field": c.field, "value": c.value, "audience": c.audience,
                    "customer_id": c.customer_id, "customer": c.customer_key,
                }));
            }
            return Ok(());
        }
        // Per customer, in the order they come: what they entered and left.
        let mut lines: Vec<(u32, String, Vec<String>)> = Vec::new();
        let mut fields: BTreeMap<(u32, String), (String, String)> = BTreeMap::new();
        for c in &m.changes {
            let kind = Kind::try_from(c.kind).unwrap_or(Kind::Unspecified);
            if kind == Kind::Dropped {
                let what = if !c.audience.is_empty() {
                    format!("audience {} (or keeping it current)", c.audience)
                } else if c.tag.is_empty() {
                    format!("{}={}", c.field, c.value)
                } else {
                    c.tag.clone()
                };
                print_line(&format!("lsn {}  {what} was dropped", m.lsn));
                continue;
            }
            if lines.last().is_none_or(|(id, _, _)| *id != c.customer_id) {
                let who = if c.customer_key.is_empty() {
                    format!("#{} (erased)", c.customer_id)
                } else {
                    c.customer_key.clone()
                };
                lines.push((c.customer_id, who, Vec::new()));
            }
            if !c.audience.is_empty() {
                if let Some((_, _, parts)) = lines.last_mut() {
                    let sign = if kind == Kind::Entered { '+' } else { '-' };
                    parts.push(format!("{sign}audience {}", c.audience));
                }
                continue;
            }
            if c.tag.is_empty() {
                let slot = fields.entry((c.customer_id, c.field.clone())).or_default();
                if kind == Kind::Left {
                    slot.0 = c.value.clone();
                } else {
                    slot.1 = c.value.clone();
                }
                continue;
            }
            if let Some((_, _, parts)) = lines.last_mut() {
                parts.push(match kind {
                    Kind::Entered => format!("+{}", c.tag),
                    _ => format!("-{}", c.tag),
                });
            }
        }
        for (id, who, mut parts) in lines {
            for ((cid, field), (from, to)) in &fields {
                if *cid == id {
                    let show = |v: &str| {
                        if v.is_empty() {
                            "-".to_string()
                        } else {
                            v.to_string()
                        }
                    };
                    parts.push(format!("{field}: {} → {}", show(from), show(to)));
                }
            }
            print_line(&format!(
                "lsn {}  {}  {who}  {}",
                m.lsn,
                fmt_time(m.at_ms),
                parts.join("  ")
            ));
        }
        Ok(())
    }

    /// A compact message: per subject, how many entered and left, and the
    /// first ids of each.
    fn print_groups(&self, m: &WatchResponse) -> Result<(), String> {
        for g in &m.grouped {
            let entered = bitmap_ids(&g.entered_bitmap, "entered", m.lsn)?;
            let left = bitmap_ids(&g.left_bitmap, "left", m.lsn)?;
            let subject = if !g.audience.is_empty() {
                format!("audience {}", g.audience)
            } else if !g.tag.is_empty() {
                g.tag.clone()
            } else {
                format!("{}={}", g.field, g.value)
            };
            if self.json {
                print_line(&json!({
                    "lsn": m.lsn, "at_ms": m.at_ms, "tag": g.tag, "field": g.field,
                    "value": g.value, "audience": g.audience, "entered": entered,
                    "left": left, "dropped": g.dropped,
                }));
                continue;
            }
            if g.dropped {
                print_line(&format!("lsn {}  {subject} was dropped", m.lsn));
                continue;
            }
            let ids = |sign: char, ids: &[u32]| -> Option<String> {
                if ids.is_empty() {
                    return None;
                }
                let shown: Vec<String> = ids.iter().take(8).map(|i| format!("#{i}")).collect();
                let more = if ids.len() > 8 { " …" } else { "" };
                Some(format!(
                    "{sign}{} ({}{more})",
                    thousands(ids.len() as u64),
                    shown.join(" ")
                ))
            };
            let parts: Vec<String> = [ids('+', &entered), ids('-', &left)]
                .into_iter()
                .flatten()
                .collect();
            print_line(&format!(
                "lsn {}  {}  {subject}  {}",
                m.lsn,
                fmt_time(m.at_ms),
                parts.join("  ")
            ));
        }
        Ok(())
    }
}

/// The ids of a compact group's bitmap (portable Roaring; empty bytes:
/// none).
fn bitmap_ids(bytes: &[u8], which: &str, lsn: u64) -> Result<Vec<u32>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    roaring::RoaringBitmap::deserialize_from(bytes)
        .map(|b| b.iter().collect())
        .map_err(|e| {
            format!("the server sent a {which} bitmap that does not read at lsn {lsn}: {e}")
        })
}
