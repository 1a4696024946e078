//! The shell's command language: parsing a line into a [`Command`], and the
//! help texts. Knows nothing of the server.

use crate::table;

/// One shell command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Count(String),
    Find {
        query: String,
        limit: u32,
    },
    More,
    Export {
        query: String,
        path: String,
    },
    Profile {
        key: String,
        /// Days back behaviour dates are listed (0: the server's default, 30).
        days: u32,
    },
    Tags,
    Tag(String),
    CreateTag {
        name: String,
        category: String,
        description: String,
    },
    DropTag {
        name: String,
        yes: bool,
    },
    Add {
        tag: String,
        who: Who,
    },
    Remove {
        tag: String,
        who: Who,
    },
    Resolve {
        keys: Vec<String>,
        create: bool,
    },
    Import {
        tag: String,
        path: String,
        column: usize,
        create: bool,
    },
    DeleteCustomers {
        keys: Vec<String>,
        yes: bool,
    },
    Fields,
    CreateField {
        name: String,
        kind: FieldKindArg,
        category: String,
        description: String,
    },
    DropField {
        name: String,
        yes: bool,
    },
    /// `set <field> <key> <value>`: the session picks integer or enumerated
    /// from the field's kind.
    SetValue {
        field: String,
        key: String,
        value: String,
    },
    ClearValue {
        field: String,
        key: String,
    },
    /// A behaviour event now, or on a local date.
    Event {
        field: String,
        key: String,
        date: Option<String>,
    },
    Aggregate {
        field: String,
        edges: Vec<i64>,
        query: String,
    },
    Breakdown {
        by: BreakdownBy,
        query: String,
    },
    Top {
        k: u32,
        query: String,
        /// Only tags of this category (empty: all).
        category: String,
        /// Leave out tags with fewer audience members (0: the server's 1).
        min_count: u64,
        /// Keep the tags the query names.
        include_query_tags: bool,
    },
    Overlap(Vec<String>),
    Stats,
    /// `true`: also merge the dictionary sections into one.
    Checkpoint(bool),
    Help(Option<String>),
    Timing(Option<bool>),
    Quit,
}

/// The kind given to `create field`.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldKindArg {
    Integer,
    Enum(Vec<String>),
    Behaviour {
        retention_days: u32,
        daily_days: u32,
        time_zone: String,
    },
}

/// What a breakdown counts by.
#[derive(Debug, Clone, PartialEq)]
pub enum BreakdownBy {
    Field(String),
    Category(String),
}

/// A command's name, usage and description, for `help`.
/// Customers named by key, or by internal id (after `--ids`).
#[derive(Debug, Clone, PartialEq)]
pub enum Who {
    Keys(Vec<String>),
    Ids(Vec<u32>),
}

impl Who {
    pub fn len(&self) -> usize {
        match self {
            Who::Keys(k) => k.len(),
            Who::Ids(i) => i.len(),
        }
    }
}

pub struct Doc {
    pub name: &'static str,
    pub usage: &'static str,
    pub summary: &'static str,
    pub example: &'static str,
}

pub const DOCS: &[Doc] = &[
    Doc {
        name: "count",
        usage: "count <query>",
        summary: "how many customers match a query",
        example: "count 高价值用户 AND NOT 潜在流失",
    },
    Doc {
        name: "find",
        usage: "find <query> [limit N]",
        summary: "a page of matching customers (default 20; `more` for the next)",
        example: "find 常购护肤品 OR 尝试新品 limit 50",
    },
    Doc {
        name: "more",
        usage: "more",
        summary: "the next page of the last `find`",
        example: "more",
    },
    Doc {
        name: "export",
        usage: "export <query> to <file.csv>",
        summary: "every matching customer to a CSV file, with a progress bar",
        example: "export 高价值用户 AND 社交活跃 to audience.csv",
    },
    Doc {
        name: "profile",
        usage: "profile <customer key> [days N]",
        summary: "one customer's tags and field values (behaviour dates of the last N days, default 30)",
        example: "profile phone:13800001111",
    },
    Doc {
        name: "tags",
        usage: "tags",
        summary: "every tag with its category and member count",
        example: "tags",
    },
    Doc {
        name: "tag",
        usage: "tag <name>",
        summary: "one tag's metadata",
        example: "tag 高价值用户",
    },
    Doc {
        name: "create",
        usage: "create tag <name> [category <c>] [description <d>]",
        summary: "create a tag (quote names and words with spaces)",
        example: "create tag 高价值用户 category 价值 description \"spent over ¥5,000\"",
    },
    Doc {
        name: "create field",
        usage: "create field <name> integer | enum <v1,v2,...> | behaviour [retention N] [daily N] [zone Z]",
        summary: "create an integer, enumerated or behaviour field (retention and daily in days)",
        example: "create field lifecycle enum prospect,new,active,loyal,churned",
    },
    Doc {
        name: "drop",
        usage: "drop tag|field <name> [--yes]",
        summary: "drop a tag or a field and its data (asks first)",
        example: "drop tag 潜在流失",
    },
    Doc {
        name: "add",
        usage: "add <tag> <key>... | add <tag> --ids <id>...",
        summary: "add customers to a tag, by key (unknown keys become customers) or by internal id",
        example: "add 高价值用户 phone:13800001111 jd:pin_7781",
    },
    Doc {
        name: "remove",
        usage: "remove <tag> <key>... | remove <tag> --ids <id>...",
        summary: "remove customers from a tag, by key or by internal id",
        example: "remove 高价值用户 jd:pin_7781",
    },
    Doc {
        name: "resolve",
        usage: "resolve <key>... [--create]",
        summary: "internal ids of customers; --create makes the missing ones",
        example: "resolve phone:13800001111 jd:pin_7781",
    },
    Doc {
        name: "import",
        usage: "import <tag> from <file> [column N] [create]",
        summary: "add every key in a file (one per line, or CSV column N) to a tag",
        example: "import 高价值用户 from vip.csv column 2",
    },
    Doc {
        name: "delete",
        usage: "delete customers <key>... [--yes]",
        summary: "erase customers from every tag and forget their keys (asks first)",
        example: "delete customers phone:13800001111",
    },
    Doc {
        name: "fields",
        usage: "fields",
        summary: "every field (integer, enumerated, behaviour) with its definition",
        example: "fields",
    },
    Doc {
        name: "set",
        usage: "set <field> <key> <value>",
        summary: "set a customer's integer or enumerated value",
        example: "set total_spend jd:pin_7781 620000",
    },
    Doc {
        name: "clear",
        usage: "clear <field> <key>",
        summary: "remove a customer's integer or enumerated value",
        example: "clear lifecycle jd:pin_7781",
    },
    Doc {
        name: "event",
        usage: "event <field> <key> [YYYY-MM-DD]",
        summary: "record a behaviour now, or on a local date",
        example: "event bought_skincare jd:pin_7781 2026-11-20",
    },
    Doc {
        name: "aggregate",
        usage: "aggregate <field> [edges a,b,...] over <query>",
        summary: "sum, min, max, mean (and a histogram) of an integer field over an audience",
        example: "aggregate total_spend edges 100000,500000 over 高价值用户",
    },
    Doc {
        name: "breakdown",
        usage: "breakdown <field> over <query> | breakdown category <c> over <query>",
        summary: "an audience counted per enumerated value, or per tag of a category",
        example: "breakdown lifecycle over bought_skincare WITHIN 30d",
    },
    Doc {
        name: "top",
        usage: "top [N] <query> | top [N] [category <c>] [min <n>] [with query tags] over <query>",
        summary: "the N tags (default 10) most over-represented in an audience",
        example: "top 5 COUNT(bought_skincare WITHIN 90d) >= 3",
    },
    Doc {
        name: "overlap",
        usage: "overlap <query> ; <query> ; ...",
        summary: "pairwise overlaps of up to 20 audiences, as a matrix",
        example: "overlap 高价值用户 ; 社交活跃 ; lifecycle = active",
    },
    Doc {
        name: "stats",
        usage: "stats",
        summary: "server figures: customers, tags, memory, disk, log, last checkpoint, dictionary sections",
        example: "stats",
    },
    Doc {
        name: "checkpoint",
        usage: "checkpoint [--merge-dictionary]",
        summary: "write a checkpoint now; --merge-dictionary also merges the customer dictionary into one section (after a bulk load)",
        example: "checkpoint --merge-dictionary",
    },
    Doc {
        name: "help",
        usage: "help [command]",
        summary: "this list, or one command in detail",
        example: "help find",
    },
    Doc {
        name: "\\timing",
        usage: "\\timing [on|off]",
        summary: "show how long each command takes",
        example: "\\timing on",
    },
    Doc {
        name: "quit",
        usage: "quit",
        summary: "leave the shell (also `exit`, `\\q`, Ctrl-D)",
        example: "quit",
    },
];

/// Names the completer offers at the start of a line.
pub const COMMAND_WORDS: &[&str] = &[
    "count",
    "find",
    "more",
    "export",
    "profile",
    "tags",
    "tag",
    "create tag",
    "create field",
    "drop tag",
    "drop field",
    "add",
    "remove",
    "import",
    "resolve",
    "delete customers",
    "fields",
    "set",
    "clear",
    "event",
    "aggregate",
    "breakdown",
    "top",
    "overlap",
    "stats",
    "checkpoint",
    "help",
    "\\timing",
    "quit",
];

/// Commands whose arguments are (or contain) a query or tag names.
pub fn takes_tags(first_word: &str) -> bool {
    matches!(
        first_word.to_ascii_lowercase().as_str(),
        "count"
            | "find"
            | "export"
            | "tag"
            | "drop"
            | "add"
            | "remove"
            | "import"
            | "aggregate"
            | "breakdown"
            | "top"
            | "overlap"
    )
}

/// Splits arguments on white space; double quotes group, with `\"` and `\\`.
pub fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else {
            return Ok(out);
        };
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quote".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(e @ ('"' | '\\')) => word.push(e),
                        _ => {
                            return Err(
                                "bad escape: only \\\" and \\\\ are allowed in quotes".into()
                            );
                        }
                    },
                    Some(ch) => word.push(ch),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
}

fn first_word(line: &str) -> (&str, &str) {
    let line = line.trim();
    match line.find(char::is_whitespace) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    }
}

fn need(rest: &str, what: &str, usage: &str) -> Result<(), String> {
    if rest.is_empty() {
        Err(format!("{what} is missing; usage: {usage}"))
    } else {
        Ok(())
    }
}

/// Splits `text` at the last case-insensitive ` word ` (surrounded by white space).
fn rsplit_word<'a>(text: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let lower = text.to_lowercase();
    let pat = format!(" {word} ");
    // Lowercasing keeps byte offsets for ASCII words; find on the original when it does not.
    if lower.len() != text.len() {
        let i = text.rfind(&pat)?;
        return Some((text[..i].trim(), text[i + pat.len()..].trim()));
    }
    let i = lower.rfind(&pat)?;
    Some((text[..i].trim(), text[i + pat.len()..].trim()))
}

/// Parses one line (already joined if it spanned several). `Ok(None)` for a blank line or a comment.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with("--") || line.starts_with('#') {
        return Ok(None);
    }
    let (word, rest) = first_word(line);
    let cmd = match word.to_ascii_lowercase().as_str() {
        "count" => {
            need(rest, "a query", "count <query>")?;
            Command::Count(rest.into())
        }
        "find" => {
            need(rest, "a query", "find <query> [limit N]")?;
            let (query, limit) = match rsplit_word(&format!("{rest} "), "limit") {
                Some((q, n))
                    if !q.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() =>
                {
                    let limit: u32 = n.parse().map_err(|_| format!("bad limit {n:?}"))?;
                    if limit == 0 || limit > 100_000 {
                        return Err("limit must be 1 to 100000".into());
                    }
                    (q.to_string(), limit)
                }
                _ => (rest.to_string(), 20),
            };
            Command::Find { query, limit }
        }
        "more" | "next" => Command::More,
        "export" => {
            let (query, path) =
                rsplit_word(rest, "to").ok_or("usage: export <query> to <file.csv>")?;
            need(query, "a query", "export <query> to <file.csv>")?;
            let path = split_args(path)?
                .into_iter()
                .next()
                .ok_or("a file name is missing")?;
            Command::Export {
                query: query.into(),
                path,
            }
        }
        "profile" => {
            let usage = "usage: profile <customer key> [days N] (N: 1 to 400)";
            let args = split_args(rest)?;
            match args.as_slice() {
                [key] => Command::Profile {
                    key: key.clone(),
                    days: 0,
                },
                [key, kw, n] if kw.eq_ignore_ascii_case("days") => match n.parse::<u32>() {
                    Ok(days @ 1..=400) => Command::Profile {
                        key: key.clone(),
                        days,
                    },
                    _ => return Err(usage.into()),
                },
                _ => return Err(usage.into()),
            }
        }
        "tags" => Command::Tags,
        "tag" => {
            let args = split_args(rest)?;
            match args.as_slice() {
                [name] => Command::Tag(name.clone()),
                _ => return Err("usage: tag <name> (quote names with spaces)".into()),
            }
        }
        "create" => {
            let args = split_args(rest)?;
            let usage = "usage: create tag <name> [category <c>] [description <d>]";
            let [kw, name, opts @ ..] = args.as_slice() else {
                return Err(usage.into());
            };
            if kw.eq_ignore_ascii_case("field") {
                return parse_create_field(name, opts).map(Some);
            }
            if !kw.eq_ignore_ascii_case("tag") {
                return Err(usage.into());
            }
            let (mut category, mut description) = (String::new(), String::new());
            let mut it = opts.iter();
            while let Some(k) = it.next() {
                let v = it.next().ok_or(usage)?;
                match k.to_ascii_lowercase().as_str() {
                    "category" => category = v.clone(),
                    "description" => description = v.clone(),
                    _ => return Err(format!("unknown option {k:?}; {usage}")),
                }
            }
            Command::CreateTag {
                name: name.clone(),
                category,
                description,
            }
        }
        "drop" => {
            let mut args = split_args(rest)?;
            let yes = take_flag(&mut args, "--yes");
            match args.as_slice() {
                [kw, name] if kw.eq_ignore_ascii_case("tag") => Command::DropTag {
                    name: name.clone(),
                    yes,
                },
                [kw, name] if kw.eq_ignore_ascii_case("field") => Command::DropField {
                    name: name.clone(),
                    yes,
                },
                _ => return Err("usage: drop tag|field <name> [--yes]".into()),
            }
        }
        "add" | "remove" => {
            let args = split_args(rest)?;
            let usage = format!("usage: {word} <tag> <key>... or {word} <tag> --ids <id>...");
            let [tag, names @ ..] = args.as_slice() else {
                return Err(usage);
            };
            let who = match names {
                [] => return Err(format!("no customers given; {usage}")),
                [flag, ids @ ..] if flag.eq_ignore_ascii_case("--ids") => {
                    if ids.is_empty() {
                        return Err(format!("no ids given; {usage}"));
                    }
                    Who::Ids(
                        ids.iter()
                            .map(|i| {
                                i.parse().map_err(|_| {
                                    format!("bad id {i:?}: an internal id is a whole number from 0 to 4294967295")
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    )
                }
                keys => Who::Keys(keys.to_vec()),
            };
            let tag = tag.clone();
            if word.eq_ignore_ascii_case("add") {
                Command::Add { tag, who }
            } else {
                Command::Remove { tag, who }
            }
        }
        "resolve" => {
            let mut args = split_args(rest)?;
            let create = take_flag(&mut args, "--create");
            if args.is_empty() {
                return Err("usage: resolve <key>... [--create]".into());
            }
            Command::Resolve { keys: args, create }
        }
        "import" => {
            let mut args = split_args(rest)?;
            let usage = "usage: import <tag> from <file> [column N] [create]";
            let create = take_flag(&mut args, "create");
            let mut column = 1;
            if let Some(i) = args.iter().position(|a| a.eq_ignore_ascii_case("column")) {
                let n = args.get(i + 1).ok_or(usage)?;
                column = n
                    .parse()
                    .ok()
                    .filter(|&c: &usize| c >= 1)
                    .ok_or_else(|| format!("bad column {n:?}: columns count from 1"))?;
                args.drain(i..i + 2);
            }
            match args.as_slice() {
                [tag, kw, path] if kw.eq_ignore_ascii_case("from") => Command::Import {
                    tag: tag.clone(),
                    path: path.clone(),
                    column,
                    create,
                },
                _ => return Err(usage.into()),
            }
        }
        "delete" => {
            let mut args = split_args(rest)?;
            let yes = take_flag(&mut args, "--yes");
            match args.split_first() {
                Some((kw, keys)) if kw.eq_ignore_ascii_case("customers") && !keys.is_empty() => {
                    Command::DeleteCustomers {
                        keys: keys.to_vec(),
                        yes,
                    }
                }
                _ => return Err("usage: delete customers <key>... [--yes]".into()),
            }
        }
        "fields" => Command::Fields,
        "set" => match split_args(rest)?.as_slice() {
            [field, key, value] => Command::SetValue {
                field: field.clone(),
                key: key.clone(),
                value: value.clone(),
            },
            _ => return Err("usage: set <field> <key> <value>".into()),
        },
        "clear" => match split_args(rest)?.as_slice() {
            [field, key] => Command::ClearValue {
                field: field.clone(),
                key: key.clone(),
            },
            _ => return Err("usage: clear <field> <key>".into()),
        },
        "event" => match split_args(rest)?.as_slice() {
            [field, key] => Command::Event {
                field: field.clone(),
                key: key.clone(),
                date: None,
            },
            [field, key, date] => Command::Event {
                field: field.clone(),
                key: key.clone(),
                date: Some(date.clone()),
            },
            _ => return Err("usage: event <field> <key> [YYYY-MM-DD]".into()),
        },
        "aggregate" => {
            let usage = "usage: aggregate <field> [edges a,b,...] over <query>";
            let (head, query) = split_over(rest).ok_or(usage)?;
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
                _ => return Err(usage.into()),
            };
            Command::Aggregate {
                field,
                edges,
                query: query.into(),
            }
        }
        "breakdown" => {
            let usage =
                "usage: breakdown <field> over <query> | breakdown category <c> over <query>";
            let (head, query) = split_over(rest).ok_or(usage)?;
            let by = match split_args(head)?.as_slice() {
                [field] => BreakdownBy::Field(field.clone()),
                [kw, c] if kw.eq_ignore_ascii_case("category") => BreakdownBy::Category(c.clone()),
                _ => return Err(usage.into()),
            };
            Command::Breakdown {
                by,
                query: query.into(),
            }
        }
        "top" => {
            need(rest, "a query", TOP_USAGE)?;
            parse_top(rest)?
        }
        "overlap" => {
            let queries = split_queries(rest);
            if queries.is_empty() || queries.len() > 20 {
                return Err("usage: overlap <query> ; <query> ; ... (1 to 20 queries)".into());
            }
            Command::Overlap(queries)
        }
        "stats" => Command::Stats,
        "checkpoint" => {
            let mut args = split_args(rest)?;
            let merge = take_flag(&mut args, "--merge-dictionary");
            if !args.is_empty() {
                return Err("usage: checkpoint [--merge-dictionary]".into());
            }
            Command::Checkpoint(merge)
        }
        "help" | "\\?" | "?" => Command::Help((!rest.is_empty()).then(|| rest.to_string())),
        "\\timing" => match rest.to_ascii_lowercase().as_str() {
            "" => Command::Timing(None),
            "on" => Command::Timing(Some(true)),
            "off" => Command::Timing(Some(false)),
            _ => return Err("usage: \\timing [on|off]".into()),
        },
        "quit" | "exit" | "\\q" => Command::Quit,
        other => {
            return Err(format!(
                "unknown command {other:?}; type `help` for the list"
            ));
        }
    };
    Ok(Some(cmd))
}

fn parse_create_field(name: &str, opts: &[String]) -> Result<Command, String> {
    let usage = "usage: create field <name> integer | enum <v1,v2,...> | behaviour [retention N] [daily N] [zone Z] [category <c>] [description <d>]";
    let (kind_word, rest) = opts.split_first().ok_or(usage)?;
    let mut rest = rest.iter();
    let mut kind = match kind_word.to_ascii_lowercase().as_str() {
        "integer" | "int" => FieldKindArg::Integer,
        "enum" | "enumerated" => {
            let list = rest.next().ok_or("enum needs its values: enum a,b,c")?;
            FieldKindArg::Enum(
                list.split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect(),
            )
        }
        "behaviour" | "behavior" => FieldKindArg::Behaviour {
            retention_days: 0,
            daily_days: 0,
            time_zone: String::new(),
        },
        _ => return Err(usage.into()),
    };
    let (mut category, mut description) = (String::new(), String::new());
    while let Some(k) = rest.next() {
        let v = rest.next().ok_or(usage)?;
        let days = || {
            v.parse::<u32>()
                .map_err(|_| format!("bad number of days {v:?}"))
        };
        match (k.to_ascii_lowercase().as_str(), &mut kind) {
            ("category", _) => category = v.clone(),
            ("description", _) => description = v.clone(),
            ("retention", FieldKindArg::Behaviour { retention_days, .. }) => {
                *retention_days = days()?
            }
            ("daily", FieldKindArg::Behaviour { daily_days, .. }) => *daily_days = days()?,
            ("zone", FieldKindArg::Behaviour { time_zone, .. }) => *time_zone = v.clone(),
            _ => return Err(format!("unknown option {k:?}; {usage}")),
        }
    }
    Ok(Command::CreateField {
        name: name.to_string(),
        kind,
        category,
        description,
    })
}

/// Splits `head over query` at the first ` over ` (case-insensitive).
const TOP_USAGE: &str =
    "top [N] <query> | top [N] [category <c>] [min <n>] [with query tags] over <query>";

/// `top`: N alone may precede the query; the options need `over` before it.
fn parse_top(rest: &str) -> Result<Command, String> {
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
                            return Err(format!("usage: {TOP_USAGE}"));
                        }
                        include_query_tags = true;
                    }
                    _ => return Err(format!("unknown option {w:?}; usage: {TOP_USAGE}")),
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

fn split_over(text: &str) -> Option<(&str, &str)> {
    let lower = text.to_ascii_lowercase();
    let i = lower.find(" over ")?;
    let (head, query) = (text[..i].trim(), text[i + 6..].trim());
    (!head.is_empty() && !query.is_empty()).then_some((head, query))
}

/// Splits at `;` outside quotes; drops empty parts.
fn split_queries(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in text.chars() {
        match (quote, c) {
            (Some('"'), '\\') if !escaped => {
                escaped = true;
                cur.push(c);
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, ';') => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        escaped = false;
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect()
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    match args.iter().position(|a| a.eq_ignore_ascii_case(flag)) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
}

/// Widest usage column of the command list; longer usages put their
/// summary on the next line.
const USAGE_COLUMN: usize = 34;

/// `text` broken at spaces into lines of at most `width` display columns
/// (a word longer than that stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if !line.is_empty() && table::width(&line) + 1 + table::width(word) > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// `text` wrapped to `columns`, every line after the first indented by
/// `indent` spaces, appended to `out` with a newline after each line.
fn push_wrapped(out: &mut String, first: &str, text: &str, indent: usize, columns: usize) {
    let room = columns.saturating_sub(indent).max(20);
    for (i, line) in wrap(text, room).into_iter().enumerate() {
        if i == 0 {
            out.push_str(first);
        } else {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&line);
        out.push('\n');
    }
}

/// The help text, every command or one in detail, wrapped to `columns`
/// (the terminal's width; at least 40 are used).
pub fn help(topic: Option<&str>, columns: usize) -> Result<String, String> {
    let columns = columns.max(40);
    match topic {
        None => {
            let usage_col = DOCS
                .iter()
                .map(|d| table::width(d.usage))
                .filter(|&w| w <= USAGE_COLUMN)
                .max()
                .unwrap_or(USAGE_COLUMN);
            let mut out = String::new();
            push_wrapped(
                &mut out,
                "",
                "Commands (a query uses AND, OR, NOT, parentheses and ALL; quote tag names with spaces):",
                0,
                columns,
            );
            let indent = 2 + usage_col + 2;
            // Too narrow for two columns: each usage on its own line.
            let two_columns = columns >= indent + 30;
            for d in DOCS {
                let usage_width = table::width(d.usage);
                if !two_columns {
                    push_wrapped(&mut out, "  ", d.usage, 6, columns);
                    push_wrapped(&mut out, "      ", d.summary, 6, columns);
                } else if usage_width <= usage_col {
                    let first = format!("  {}{}  ", d.usage, " ".repeat(usage_col - usage_width));
                    push_wrapped(&mut out, &first, d.summary, indent, columns);
                } else {
                    push_wrapped(&mut out, "  ", d.usage, 6, columns);
                    push_wrapped(&mut out, &" ".repeat(indent), d.summary, indent, columns);
                }
            }
            push_wrapped(
                &mut out,
                "",
                "A line that leaves a parenthesis or quote open, or ends with \\, continues on the next.",
                0,
                columns,
            );
            Ok(out.trim_end().to_string())
        }
        Some(t) => {
            let t = t.trim().to_ascii_lowercase();
            let d = DOCS
                .iter()
                .find(|d| d.name == t || d.usage.starts_with(&t))
                .ok_or_else(|| format!("no command {t:?}; type `help` for the list"))?;
            let mut out = String::new();
            push_wrapped(&mut out, "", d.usage, 4, columns);
            push_wrapped(&mut out, "  ", d.summary, 2, columns);
            push_wrapped(&mut out, "  example: ", d.example, 11, columns);
            Ok(out.trim_end().to_string())
        }
    }
}

/// True when a line leaves a parenthesis or a double quote open, or ends with `\`.
pub fn is_incomplete(text: &str) -> bool {
    if text.trim_end().ends_with('\\') {
        return true;
    }
    let (mut depth, mut in_quote, mut escaped) = (0i64, false, false);
    for c in text.chars() {
        if in_quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_quote = false,
                _ => {}
            }
        } else {
            match c {
                '"' => in_quote = true,
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
        }
    }
    in_quote || depth > 0
}

/// Joins continuation lines: a trailing `\` is dropped, lines are joined by a space.
pub fn join_lines(text: &str) -> String {
    text.lines()
        .map(|l| l.trim_end().strip_suffix('\\').unwrap_or(l).trim())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Command {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_every_command() {
        assert_eq!(
            p("count 高价值用户 AND NOT 潜在流失"),
            Command::Count("高价值用户 AND NOT 潜在流失".into())
        );
        assert_eq!(
            p("find a OR b limit 5"),
            Command::Find {
                query: "a OR b".into(),
                limit: 5
            }
        );
        assert_eq!(
            p("find a OR b"),
            Command::Find {
                query: "a OR b".into(),
                limit: 20
            }
        );
        assert_eq!(
            p("export a AND \"b c\" to out.csv"),
            Command::Export {
                query: "a AND \"b c\"".into(),
                path: "out.csv".into()
            }
        );
        assert_eq!(
            p("profile phone:1"),
            Command::Profile {
                key: "phone:1".into(),
                days: 0
            }
        );
        assert_eq!(
            p("profile phone:1 days 90"),
            Command::Profile {
                key: "phone:1".into(),
                days: 90
            }
        );
        assert!(parse("profile phone:1 days 0").is_err());
        assert!(parse("profile phone:1 weeks 2").is_err());
        assert_eq!(
            p("create tag \"a b\" category 价值 description \"x y\""),
            Command::CreateTag {
                name: "a b".into(),
                category: "价值".into(),
                description: "x y".into()
            }
        );
        assert_eq!(p("checkpoint"), Command::Checkpoint(false));
        assert_eq!(
            p("checkpoint --merge-dictionary"),
            Command::Checkpoint(true)
        );
        assert!(parse("checkpoint now").is_err());
        assert_eq!(
            p("drop tag x --yes"),
            Command::DropTag {
                name: "x".into(),
                yes: true
            }
        );
        assert_eq!(
            p("add t k1 k2"),
            Command::Add {
                tag: "t".into(),
                who: Who::Keys(vec!["k1".into(), "k2".into()])
            }
        );
        assert_eq!(
            p("remove t --ids 7 0 4294967295"),
            Command::Remove {
                tag: "t".into(),
                who: Who::Ids(vec![7, 0, u32::MAX])
            }
        );
        assert!(parse("add t --ids").is_err());
        assert!(parse("add t --ids 1 x").is_err());
        assert!(parse("add t --ids -1").is_err());
        assert!(parse("add t").is_err());
        assert_eq!(
            p("resolve a b --create"),
            Command::Resolve {
                keys: vec!["a".into(), "b".into()],
                create: true
            }
        );
        assert!(parse("resolve --create").is_err());
        assert_eq!(
            p("import t from f.csv column 2 create"),
            Command::Import {
                tag: "t".into(),
                path: "f.csv".into(),
                column: 2,
                create: true
            }
        );
        assert_eq!(
            p("delete customers a b"),
            Command::DeleteCustomers {
                keys: vec!["a".into(), "b".into()],
                yes: false
            }
        );
        assert_eq!(p("\\timing on"), Command::Timing(Some(true)));
        assert_eq!(p("HELP find"), Command::Help(Some("find".into())));
        assert_eq!(parse("  -- a comment").unwrap(), None);
        assert!(parse("frobnicate").is_err());
        assert!(parse("find x limit 0").is_err());
        assert!(parse("add t").is_err());
        assert!(parse("create tag").is_err());
        assert!(parse("profile \"unterminated").is_err());
    }

    #[test]
    fn parses_field_commands() {
        assert_eq!(p("fields"), Command::Fields);
        assert_eq!(
            p("create field lifecycle enum new,active category 阶段"),
            Command::CreateField {
                name: "lifecycle".into(),
                kind: FieldKindArg::Enum(vec!["new".into(), "active".into()]),
                category: "阶段".into(),
                description: String::new()
            }
        );
        assert_eq!(
            p("create field seen behaviour retention 90 daily 30 zone UTC"),
            Command::CreateField {
                name: "seen".into(),
                kind: FieldKindArg::Behaviour {
                    retention_days: 90,
                    daily_days: 30,
                    time_zone: "UTC".into()
                },
                category: String::new(),
                description: String::new()
            }
        );
        assert!(parse("create field x integer retention 5").is_err());
        assert_eq!(
            p("drop field x --yes"),
            Command::DropField {
                name: "x".into(),
                yes: true
            }
        );
        assert_eq!(
            p("set total_spend jd:1 -5"),
            Command::SetValue {
                field: "total_spend".into(),
                key: "jd:1".into(),
                value: "-5".into()
            }
        );
        assert_eq!(
            p("event bought jd:1 2026-11-20"),
            Command::Event {
                field: "bought".into(),
                key: "jd:1".into(),
                date: Some("2026-11-20".into())
            }
        );
        assert_eq!(
            p("aggregate spend edges 0,100, 500 over a OR b"),
            Command::Aggregate {
                field: "spend".into(),
                edges: vec![0, 100, 500],
                query: "a OR b".into()
            }
        );
        assert!(parse("aggregate spend edges x over a").is_err());
        assert_eq!(
            p("breakdown category 价值 over lifecycle = active"),
            Command::Breakdown {
                by: BreakdownBy::Category("价值".into()),
                query: "lifecycle = active".into()
            }
        );
        let top =
            |k: u32, query: &str, category: &str, min_count: u64, include: bool| Command::Top {
                k,
                query: query.into(),
                category: category.into(),
                min_count,
                include_query_tags: include,
            };
        assert_eq!(p("top 5 a AND b"), top(5, "a AND b", "", 0, false));
        assert_eq!(p("top 高价值用户"), top(10, "高价值用户", "", 0, false));
        assert_eq!(
            p("top 3 category 价值 min 20 with query tags over a AND b"),
            top(3, "a AND b", "价值", 20, true)
        );
        assert_eq!(
            p("top category \"with space\" over a"),
            top(10, "a", "with space", 0, false)
        );
        assert!(parse("top 0 a").is_err());
        assert!(parse("top min 0 over a").is_err());
        assert!(parse("top sideways over a").is_err());
        assert!(parse("top with tags over a").is_err());
        assert_eq!(
            p("overlap a ; \"x;y\" AND b; lifecycle IN ('a;b') ;"),
            Command::Overlap(vec![
                "a".into(),
                "\"x;y\" AND b".into(),
                "lifecycle IN ('a;b')".into()
            ])
        );
        assert!(parse("overlap ;").is_err());
    }

    #[test]
    fn continuation() {
        assert!(is_incomplete("count a AND (b OR"));
        assert!(is_incomplete("count \"open"));
        assert!(is_incomplete("count a \\"));
        assert!(!is_incomplete("count a AND (b OR c)"));
        assert!(!is_incomplete("count \"(\""));
        assert_eq!(join_lines("count a AND (b OR\nc)"), "count a AND (b OR c)");
        assert_eq!(join_lines("count a \\\nAND b"), "count a AND b");
    }

    #[test]
    fn every_documented_command_completes() {
        for d in DOCS {
            assert!(
                COMMAND_WORDS
                    .iter()
                    .any(|w| *w == d.name || w.starts_with(&format!("{} ", d.name))),
                "{} is documented but not offered by tab completion",
                d.name
            );
        }
    }

    #[test]
    fn help_texts() {
        assert!(
            help(None, 100)
                .unwrap()
                .contains("export <query> to <file.csv>")
        );
        assert!(help(Some("find"), 100).unwrap().contains("example"));
        assert!(help(Some("nope"), 100).is_err());
        // Every line fits the terminal, whatever its width.
        for columns in [40, 60, 80, 120] {
            for topic in [None, Some("create"), Some("top")] {
                let text = help(topic, columns).unwrap();
                for line in text.lines() {
                    assert!(
                        table::width(line) <= columns,
                        "{columns} columns: {line:?} is {} wide",
                        table::width(line)
                    );
                }
            }
        }
    }
}
