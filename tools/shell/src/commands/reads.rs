//! Commands that read audiences and customers: `count`, `find`, `more`,
//! `export`, `profile`, `tags`, `tag`. Each one's help text sits beside its
//! parser.

use super::args::{need, rsplit_word, split_args};
use super::{Command, Spec};

pub const COUNT: Spec = Spec {
    name: "count",
    words: &["count"],
    complete: &["count"],
    usage: "count <query>",
    summary: "how many customers match a query",
    example: "count 高价值用户 AND NOT 潜在流失",
    takes_tags: true,
    parse: |rest| {
        need(rest, "a query", COUNT.usage)?;
        Ok(Command::Count(rest.into()))
    },
};

pub const FIND: Spec = Spec {
    name: "find",
    words: &["find"],
    complete: &["find"],
    usage: "find <query> [limit N] [as <identity type>]",
    summary: "a page of matching customers (default 20; `more` for the next); `as phone` names each by its phone",
    example: "find 常购护肤品 OR 尝试新品 limit 50",
    takes_tags: true,
    parse: parse_find,
};

/// Splits a trailing `as <identity type>` off `rest`.
fn split_as(rest: &str) -> (&str, String) {
    let trimmed = rest.trim_end();
    if let Some((head, kind)) = trimmed.rsplit_once(char::is_whitespace)
        && let Some(head) = head.trim_end().strip_suffix("as")
        && (head.is_empty() || head.ends_with(char::is_whitespace))
        && kind.starts_with(|c: char| c.is_ascii_lowercase())
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return (head.trim_end(), kind.to_string());
    }
    (rest, String::new())
}

fn parse_find(rest: &str) -> Result<Command, String> {
    need(rest, "a query", FIND.usage)?;
    let (rest, identity_type) = split_as(rest);
    need(rest, "a query", FIND.usage)?;
    let (query, limit) = match rsplit_word(&format!("{rest} "), "limit") {
        Some((q, n)) if !q.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
            let limit: u32 = n.parse().map_err(|_| format!("bad limit {n:?}"))?;
            if limit == 0 || limit > 100_000 {
                return Err("limit must be 1 to 100000".into());
            }
            (q.to_string(), limit)
        }
        _ => (rest.to_string(), 20),
    };
    Ok(Command::Find {
        query,
        limit,
        identity_type,
    })
}

pub const MORE: Spec = Spec {
    name: "more",
    words: &["more", "next"],
    complete: &["more"],
    usage: "more",
    summary: "the next page of the last `find`",
    example: "more",
    takes_tags: false,
    parse: |_| Ok(Command::More),
};

pub const EXPORT: Spec = Spec {
    name: "export",
    words: &["export"],
    complete: &["export"],
    usage: "export <query> to <file.csv> [as <identity type> [hashed sha256|md5 [upper]]]",
    summary: "every matching customer to a CSV file, with a progress bar; `as wechat_openid` writes each one's openid; `hashed sha256` their hashes, for ad platforms",
    example: "export 高价值用户 AND 社交活跃 to audience.csv",
    takes_tags: true,
    parse: parse_export,
};

/// A trailing `hashed <algorithm> [upper]`: the rest, the algorithm
/// (empty: none) and whether upper-case hex was asked for.
fn split_hashed(rest: &str) -> (&str, String, bool) {
    let words: Vec<&str> = rest.split_whitespace().collect();
    let (upper, n) = match words.last() {
        Some(w) if w.eq_ignore_ascii_case("upper") => (true, 1),
        _ => (false, 0),
    };
    if words.len() >= n + 2 && words[words.len() - n - 2].eq_ignore_ascii_case("hashed") {
        let algo = words[words.len() - n - 1].to_ascii_lowercase();
        // Cut the text where the word `hashed` starts.
        if let Some(at) = rest.rfind(words[words.len() - n - 2]) {
            return (rest[..at].trim_end(), algo, upper);
        }
    }
    (rest, String::new(), false)
}

fn parse_export(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", EXPORT.usage);
    let (rest, hash, hash_upper) = split_hashed(rest);
    let (rest, identity_type) = split_as(rest);
    if !hash.is_empty() && identity_type.is_empty() {
        return Err(format!(
            "a hashed export names the identities to hash: `as phone hashed {hash}`"
        ));
    }
    let (query, path) = rsplit_word(rest, "to").ok_or_else(usage)?;
    need(query, "a query", EXPORT.usage)?;
    let path = split_args(path)?
        .into_iter()
        .next()
        .ok_or("a file name is missing")?;
    Ok(Command::Export {
        query: query.into(),
        path,
        identity_type,
        hash,
        hash_upper,
    })
}

pub const PROFILE: Spec = Spec {
    name: "profile",
    words: &["profile"],
    complete: &["profile"],
    usage: "profile <customer key> [days N]",
    summary: "one customer's tags and field values (behaviour dates of the last N days, default 30)",
    example: "profile phone:13800001111",
    takes_tags: false,
    parse: parse_profile,
};

fn parse_profile(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {} (N: 1 to 400)", PROFILE.usage);
    match split_args(rest)?.as_slice() {
        [key] => Ok(Command::Profile {
            key: key.clone(),
            days: 0,
        }),
        [key, kw, n] if kw.eq_ignore_ascii_case("days") => match n.parse::<u32>() {
            Ok(days @ 1..=400) => Ok(Command::Profile {
                key: key.clone(),
                days,
            }),
            _ => Err(usage()),
        },
        _ => Err(usage()),
    }
}

pub const IDENTITIES: Spec = Spec {
    name: "identities",
    words: &["identities"],
    complete: &["identities"],
    usage: "identities <customer key or identity>",
    summary: "one customer's identities (found by any of them), with where and when each was first seen",
    example: "identities jd_pin:jd_4x9k",
    takes_tags: false,
    parse: parse_identities,
};

fn parse_identities(rest: &str) -> Result<Command, String> {
    match split_args(rest)?.as_slice() {
        [key] => Ok(Command::Identities(key.clone())),
        _ => Err(format!("usage: {}", IDENTITIES.usage)),
    }
}

pub const AUDIENCES: Spec = Spec {
    name: "audiences",
    words: &["audiences"],
    complete: &["audiences"],
    usage: "audiences [<category>]",
    summary: "saved audiences with their queries and member counts now",
    example: "audiences campaigns",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [] => Ok(Command::Audiences {
            category: String::new(),
        }),
        [c] => Ok(Command::Audiences {
            category: c.clone(),
        }),
        _ => Err(format!("usage: {}", AUDIENCES.usage)),
    },
};

pub const SNAPSHOT: Spec = Spec {
    name: "snapshot",
    words: &["snapshot"],
    complete: &["snapshot"],
    usage: "snapshot <audience> [note <text>]",
    summary: "freeze a saved audience's members now; `SNAPSHOT <id>` then names them in queries (who joined: `a AND NOT SNAPSHOT 3`)",
    example: "snapshot 高价值女性 note \"approved for 11.11\"",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [a] => Ok(Command::TakeSnapshot {
            audience: a.clone(),
            note: String::new(),
        }),
        [a, kw, note] if kw.eq_ignore_ascii_case("note") => Ok(Command::TakeSnapshot {
            audience: a.clone(),
            note: note.clone(),
        }),
        _ => Err(format!("usage: {}", SNAPSHOT.usage)),
    },
};

pub const SNAPSHOTS: Spec = Spec {
    name: "snapshots",
    words: &["snapshots"],
    complete: &["snapshots"],
    usage: "snapshots [<audience>]",
    summary: "audience snapshots: when, of what, how many members, which share members",
    example: "snapshots 高价值女性",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [] => Ok(Command::Snapshots {
            audience: String::new(),
        }),
        [a] => Ok(Command::Snapshots {
            audience: a.clone(),
        }),
        _ => Err(format!("usage: {}", SNAPSHOTS.usage)),
    },
};

pub const HISTORY: Spec = Spec {
    name: "history",
    words: &["history"],
    complete: &["history"],
    usage: "history <tag or audience> [days N]",
    summary: "member counts a day over the last N days (default 30, at most 400), with a small chart",
    example: "history 高价值用户 days 90",
    takes_tags: true,
    parse: |rest| {
        let usage = || format!("usage: {}", HISTORY.usage);
        match split_args(rest)?.as_slice() {
            [name] => Ok(Command::History {
                name: name.clone(),
                days: 0,
            }),
            [name, kw, n] if kw.eq_ignore_ascii_case("days") => Ok(Command::History {
                name: name.clone(),
                days: n.parse().map_err(|_| usage())?,
            }),
            _ => Err(usage()),
        }
    },
};

pub const WATCH: Spec = Spec {
    name: "watch",
    words: &["watch"],
    complete: &["watch"],
    usage: "watch <tag | field=value | field=* | audience <name>> … [compact] [after <lsn>] [for <seconds>] [limit <changes>]",
    summary: "who enters and leaves tags, rule tags, enumerated values (lifecycles) and saved audiences kept current, as writes happen, until Ctrl-C",
    example: "watch 潜在流失 高价值用户 lifecycle=* for 60",
    takes_tags: true,
    parse: parse_watch,
};

fn parse_watch(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", WATCH.usage);
    let args = split_args(rest)?;
    let mut tags = Vec::new();
    let mut values = Vec::new();
    let mut audiences = Vec::new();
    let mut compact = false;
    let mut after = None;
    let mut seconds = None;
    let mut limit = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let number = |v: Option<&String>, what: &str| -> Result<u64, String> {
            v.and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("`{what}` takes a number; {}", usage()))
        };
        match a.to_ascii_lowercase().as_str() {
            "after" => after = Some(number(it.next(), "after")?),
            "for" => {
                let v = it.next().map(|v| v.trim_end_matches('s').to_string());
                seconds = Some(number(v.as_ref(), "for")?);
            }
            "limit" => limit = Some(number(it.next(), "limit")?),
            "compact" => compact = true,
            "audience" => audiences.push(
                it.next()
                    .ok_or_else(|| {
                        format!("`audience` takes a saved audience's name; {}", usage())
                    })?
                    .clone(),
            ),
            _ => match a.split_once('=') {
                Some((field, value)) if !field.is_empty() => {
                    let value = if value == "*" { "" } else { value };
                    values.push((field.to_string(), value.to_string()));
                }
                _ => tags.push(a.clone()),
            },
        }
    }
    if tags.is_empty() && values.is_empty() && audiences.is_empty() {
        return Err(usage());
    }
    Ok(Command::Watch {
        tags,
        values,
        audiences,
        compact,
        after,
        seconds,
        limit,
    })
}

pub const MERGES: Spec = Spec {
    name: "merges",
    words: &["merges"],
    complete: &["merges"],
    usage: "merges [<customer key or identity>]",
    summary: "the merge log: customers found to be one person and merged (or only those merged into one customer)",
    example: "merges member_card:vip-0042",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [] => Ok(Command::Merges {
            customer: String::new(),
        }),
        [key] => Ok(Command::Merges {
            customer: key.clone(),
        }),
        _ => Err(format!("usage: {}", MERGES.usage)),
    },
};

pub const TAGS: Spec = Spec {
    name: "tags",
    words: &["tags"],
    complete: &["tags"],
    usage: "tags",
    summary: "every tag with its category and member count",
    example: "tags",
    takes_tags: false,
    parse: |_| Ok(Command::Tags),
};

pub const TAG: Spec = Spec {
    name: "tag",
    words: &["tag"],
    complete: &["tag"],
    usage: "tag <name>",
    summary: "one tag's metadata",
    example: "tag 高价值用户",
    takes_tags: true,
    parse: |rest| match split_args(rest)?.as_slice() {
        [name] => Ok(Command::Tag(name.clone())),
        _ => Err(format!("usage: {} (quote names with spaces)", TAG.usage)),
    },
};
