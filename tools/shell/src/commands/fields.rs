//! Commands on fields and analytics: `fields`, `set`, `clear`, `event`,
//! `aggregate`, `breakdown`, `top`, `overlap`. Each one's help text sits
//! beside its parser.

use super::args::{first_word, need, split_args, split_over, split_queries};
use super::{BreakdownBy, Combine, Command, Spec};

pub const FIELDS: Spec = Spec {
    name: "fields",
    words: &["fields"],
    complete: &["fields"],
    usage: "fields",
    summary: "every field (integer, enumerated, behaviour) with its definition",
    example: "fields",
    takes_tags: false,
    parse: |_| Ok(Command::Fields),
};

pub const SET: Spec = Spec {
    name: "set",
    words: &["set"],
    complete: &["set"],
    usage: "set <field> <key> <value> | set <field> <key> add|max|min <n>",
    summary: "set a customer's integer or enumerated value, or add to an integer (or keep the larger or smaller) on the server",
    example: "set order_count jd:pin_7781 add 1",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [field, key, value] => Ok(Command::SetValue {
            field: field.clone(),
            key: key.clone(),
            value: value.clone(),
        }),
        [field, key, how, n] => {
            let how = match how.as_str() {
                "add" => Combine::Add,
                "max" => Combine::Max,
                "min" => Combine::Min,
                other => {
                    return Err(format!(
                        "{other:?} is not add, max or min; usage: {}",
                        SET.usage
                    ));
                }
            };
            let n = n
                .parse()
                .map_err(|_| format!("{n:?} is not an integer (a 64-bit signed number)"))?;
            Ok(Command::CombineValue {
                field: field.clone(),
                key: key.clone(),
                how,
                n,
            })
        }
        _ => Err(format!("usage: {}", SET.usage)),
    },
};

pub const CLEAR: Spec = Spec {
    name: "clear",
    words: &["clear"],
    complete: &["clear"],
    usage: "clear <field> <key>",
    summary: "remove a customer's integer or enumerated value",
    example: "clear lifecycle jd:pin_7781",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [field, key] => Ok(Command::ClearValue {
            field: field.clone(),
            key: key.clone(),
        }),
        _ => Err(format!("usage: {}", CLEAR.usage)),
    },
};

pub const EVENT: Spec = Spec {
    name: "event",
    words: &["event"],
    complete: &["event"],
    usage: "event <field> <key> [YYYY-MM-DD]",
    summary: "record a behaviour now, or on a local date",
    example: "event bought_skincare jd:pin_7781 2026-11-20",
    takes_tags: false,
    parse: |rest| match split_args(rest)?.as_slice() {
        [field, key] => Ok(Command::Event {
            field: field.clone(),
            key: key.clone(),
            date: None,
        }),
        [field, key, date] => Ok(Command::Event {
            field: field.clone(),
            key: key.clone(),
            date: Some(date.clone()),
        }),
        _ => Err(format!("usage: {}", EVENT.usage)),
    },
};

pub const AGGREGATE: Spec = Spec {
    name: "aggregate",
    words: &["aggregate"],
    complete: &["aggregate"],
    usage: "aggregate <field> [edges a,b,...] over <query>",
    summary: "sum, min, max, mean (and a histogram) of an integer field over an audience",
    example: "aggregate total_spend edges 100000,500000 over 高价值用户",
    takes_tags: true,
    parse: parse_aggregate,
};

fn parse_aggregate(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", AGGREGATE.usage);
    let (head, query) = split_over(rest).ok_or_else(usage)?;
    let head = split_args(head)?;
    let (field, edges) = match head.as_slice() {
        [field] => (field.clone(), Vec::new()),
        [field, kw, list @ ..] if kw.eq_ignore_ascii_case("edges") && !list.is_empty() => {
            let edges = list
                .concat()
                .split(',')
                .map(|e| {
                    e.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("bad edge {e:?}: edges are integers"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (field.clone(), edges)
        }
        _ => return Err(usage()),
    };
    Ok(Command::Aggregate {
        field,
        edges,
        query: query.into(),
    })
}

pub const BREAKDOWN: Spec = Spec {
    name: "breakdown",
    words: &["breakdown"],
    complete: &["breakdown"],
    usage: "breakdown <field> over <query> | breakdown category <c> over <query>",
    summary: "an audience counted per enumerated value, or per tag of a category",
    example: "breakdown lifecycle over bought_skincare WITHIN 30d",
    takes_tags: true,
    parse: |rest| {
        let usage = || format!("usage: {}", BREAKDOWN.usage);
        let (head, query) = split_over(rest).ok_or_else(usage)?;
        let by = match split_args(head)?.as_slice() {
            [field] => BreakdownBy::Field(field.clone()),
            [kw, c] if kw.eq_ignore_ascii_case("category") => BreakdownBy::Category(c.clone()),
            _ => return Err(usage()),
        };
        Ok(Command::Breakdown {
            by,
            query: query.into(),
        })
    },
};

pub const TOP: Spec = Spec {
    name: "top",
    words: &["top"],
    complete: &["top"],
    usage: "top [N] <query> | top [N] [category <c>] [min <n>] [with query tags] over <query>",
    summary: "the N tags (default 10) most over-represented in an audience",
    example: "top 5 COUNT(bought_skincare WITHIN 90d) >= 3",
    takes_tags: true,
    parse: parse_top,
};

/// `top`: N alone may precede the query; the options need `over` before it.
fn parse_top(rest: &str) -> Result<Command, String> {
    need(rest, "a query", TOP.usage)?;
    let parse_k = |n: &str| match n.parse::<u32>() {
        Ok(k @ 1..=1000) => Ok(k),
        _ => Err("N must be 1 to 1000".to_string()),
    };
    let (mut k, mut category, mut min_count, mut include_query_tags) =
        (10, String::new(), 0, false);
    let query = match split_over(rest) {
        Some((head, query)) => {
            let args = split_args(head)?;
            let mut words = args.iter().map(String::as_str).peekable();
            if let Some(n) = words.next_if(|w| w.bytes().all(|b| b.is_ascii_digit())) {
                k = parse_k(n)?;
            }
            while let Some(w) = words.next() {
                match w.to_ascii_lowercase().as_str() {
                    "category" => category = words.next().ok_or("category needs a name")?.into(),
                    "min" => {
                        min_count = words
                            .next()
                            .and_then(|n| n.parse().ok())
                            .filter(|n| *n >= 1)
                            .ok_or("min needs a count of at least 1")?;
                    }
                    "with" => {
                        let next: Vec<String> = words
                            .by_ref()
                            .take(2)
                            .map(str::to_ascii_lowercase)
                            .collect();
                        if next != ["query", "tags"] {
                            return Err(format!("usage: {}", TOP.usage));
                        }
                        include_query_tags = true;
                    }
                    _ => return Err(format!("unknown option {w:?}; usage: {}", TOP.usage)),
                }
            }
            query
        }
        None => match first_word(rest) {
            (n, q) if !q.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                k = parse_k(n)?;
                q
            }
            _ => rest,
        },
    };
    Ok(Command::Top {
        k,
        query: query.into(),
        category,
        min_count,
        include_query_tags,
    })
}

pub const OVERLAP: Spec = Spec {
    name: "overlap",
    words: &["overlap"],
    complete: &["overlap"],
    usage: "overlap <query> ; <query> ; ...",
    summary: "pairwise overlaps of up to 20 audiences, as a matrix",
    example: "overlap 高价值用户 ; 社交活跃 ; lifecycle = active",
    takes_tags: true,
    parse: |rest| {
        let queries = split_queries(rest);
        if queries.is_empty() || queries.len() > 20 {
            return Err(format!("usage: {} (1 to 20 queries)", OVERLAP.usage));
        }
        Ok(Command::Overlap(queries))
    },
};
