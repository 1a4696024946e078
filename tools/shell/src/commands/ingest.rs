//! Commands on ingestion: `sources`, `create source`, `pause source`,
//! `resume source`, `ingest`, `rebuild`.
//! (`drop source` is part of `drop`.) Each one's help text sits beside its parser.

use super::args::split_args;
use super::{Command, SourceFrom, Spec};

pub const SOURCES: Spec = Spec {
    name: "sources",
    words: &["sources"],
    complete: &["sources"],
    usage: "sources",
    summary: "the sources of ingestion, and the built-in presets",
    example: "sources",
    takes_tags: false,
    parse: |_| Ok(Command::Sources),
};

/// `create source …` (the first word `create` is `create tag`'s).
pub const CREATE_SOURCE: Spec = Spec {
    name: "create source",
    words: &[],
    complete: &["create source"],
    usage: "create source <name> preset <preset> | from <file.toml> [replace]",
    summary: "define a source: a built-in preset, or a TOML mapping from a file",
    example: "create source jd preset jd_orders",
    takes_tags: false,
    parse: |rest| parse_create_source(rest.split_whitespace().nth(1).unwrap_or(""), &[]),
};

pub const PAUSE_SOURCE: Spec = Spec {
    name: "pause source",
    words: &["pause"],
    complete: &["pause source"],
    usage: "pause source <name>",
    summary: "stop consuming a Kafka source's topics (kept across restarts) until it is resumed",
    example: "pause source douyin",
    takes_tags: false,
    parse: |rest| parse_pause(rest, true),
};

pub const RESUME_SOURCE: Spec = Spec {
    name: "resume source",
    words: &["resume"],
    complete: &["resume source"],
    usage: "resume source <name>",
    summary: "consume a paused Kafka source's topics again, from where it was",
    example: "resume source douyin",
    takes_tags: false,
    parse: |rest| parse_pause(rest, false),
};

fn parse_pause(rest: &str, paused: bool) -> Result<Command, String> {
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        [kw, name] if kw.eq_ignore_ascii_case("source") => Ok(Command::PauseSource {
            name: name.to_string(),
            paused,
        }),
        _ => Err(format!(
            "usage: {}",
            if paused {
                PAUSE_SOURCE.usage
            } else {
                RESUME_SOURCE.usage
            }
        )),
    }
}

/// The arguments after `create source <name>`.
pub fn parse_create_source(name: &str, opts: &[String]) -> Result<Command, String> {
    let usage = format!("usage: {}", CREATE_SOURCE.usage);
    let mut opts: Vec<&String> = opts.iter().collect();
    let replace = match opts.iter().position(|o| o.eq_ignore_ascii_case("replace")) {
        Some(i) => {
            opts.remove(i);
            true
        }
        None => false,
    };
    let from = match opts.as_slice() {
        [kw, p] if kw.eq_ignore_ascii_case("preset") => SourceFrom::Preset(p.to_string()),
        [kw, f] if kw.eq_ignore_ascii_case("from") => SourceFrom::File(f.to_string()),
        _ => return Err(usage),
    };
    if name.is_empty() {
        return Err(usage);
    }
    Ok(Command::CreateSource {
        name: name.to_string(),
        from,
        replace,
    })
}

pub const INGEST: Spec = Spec {
    name: "ingest",
    words: &["ingest"],
    complete: &["ingest"],
    usage: "ingest <source> <file> [rejects <report.csv>]",
    summary: "send a file of a source's records; rejected records go to a report (default <file>.rejects.csv)",
    example: "ingest jd jd-orders-2026-11.csv",
    takes_tags: false,
    parse: |rest| {
        let usage = format!("usage: {}", INGEST.usage);
        match split_args(rest)?.as_slice() {
            [source, path] => Ok(Command::Ingest {
                source: source.clone(),
                path: path.clone(),
                rejects: None,
            }),
            [source, path, kw, report] if kw.eq_ignore_ascii_case("rejects") => {
                Ok(Command::Ingest {
                    source: source.clone(),
                    path: path.clone(),
                    rejects: Some(report.clone()),
                })
            }
            _ => Err(usage),
        }
    },
};

pub const REBUILD: Spec = Spec {
    name: "rebuild",
    words: &["rebuild"],
    complete: &["rebuild facts"],
    usage: "rebuild facts <customer>... [partial] | rebuild facts where <query> [partial]",
    summary: "rebuild customers' facts from the events the server keeps, by its fact rules now (partial: even if old events were dropped by retention); `where`: every customer the query selects (`where ALL`: the whole store), 10,000 a call, leaving out (without `partial`) those whose events retention thinned",
    example: "rebuild facts phone:13812345678 jd_pin:小王",
    takes_tags: false,
    parse: |rest| {
        let usage = format!("usage: {}", REBUILD.usage);
        if let Some((query, partial)) = rebuild_where(rest) {
            if query.is_empty() {
                return Err(usage);
            }
            return Ok(Command::RebuildFactsWhere { query, partial });
        }
        let mut words = split_args(rest)?;
        if words.is_empty() || !words.remove(0).eq_ignore_ascii_case("facts") {
            return Err(usage);
        }
        let partial = match words.last() {
            Some(w) if w.eq_ignore_ascii_case("partial") => {
                words.pop();
                true
            }
            _ => false,
        };
        if words.is_empty() {
            return Err(usage);
        }
        Ok(Command::RebuildFacts {
            customers: words,
            partial,
        })
    },
};

/// `facts where <query> [partial]`: the query's text and the flag; `None`
/// when `rest` is not of that form.
fn rebuild_where(rest: &str) -> Option<(String, bool)> {
    let rest = rest.trim_start();
    let (first, rest) = rest.split_at(rest.find(char::is_whitespace)?);
    if !first.eq_ignore_ascii_case("facts") {
        return None;
    }
    let rest = rest.trim_start();
    let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    if !rest[..word_end].eq_ignore_ascii_case("where") {
        return None;
    }
    let mut query = rest[word_end..].trim();
    let mut partial = false;
    if let Some(at) = query.rfind(char::is_whitespace)
        && query[at..].trim().eq_ignore_ascii_case("partial")
    {
        query = query[..at].trim_end();
        partial = true;
    }
    Some((query.to_string(), partial))
}
