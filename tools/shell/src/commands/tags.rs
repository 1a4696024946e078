//! Commands that define tags and fields and change memberships: `create`
//! (tags and fields), `drop`, `add`, `remove`, `resolve`, `import`,
//! `delete customers`. Each one's help text sits beside its parser.

use super::args::{split_args, take_flag};
use super::{Command, FieldKindArg, Spec, Who};

pub const CREATE_TAG: Spec = Spec {
    name: "create",
    words: &["create"],
    complete: &["create tag"],
    usage: "create tag <name> [category <c>] [description <d>]",
    summary: "create a tag (quote names and words with spaces)",
    example: "create tag 高价值用户 category 价值 description \"spent over ¥5,000\"",
    takes_tags: false,
    parse: parse_create,
};

/// `create tag …`, `create field …` ([`CREATE_FIELD`]), `create source …`,
/// `create audience …` ([`CREATE_AUDIENCE`]), `create rule …` or `create
/// lifecycle …` (in `rules`).
pub(super) fn parse_create(rest: &str) -> Result<Command, String> {
    let usage = format!("usage: {}", CREATE_TAG.usage);
    let t = rest.trim_start();
    let after_word = |word: &str| {
        t.get(..word.len())
            .filter(|w| w.eq_ignore_ascii_case(word))
            .map(|_| &t[word.len()..])
            .filter(|r| r.starts_with(char::is_whitespace))
    };
    if let Some(after) = after_word("audience") {
        return parse_create_audience(after);
    }
    if let Some(after) = after_word("rule") {
        return super::rules::parse_create_rule(after);
    }
    if let Some(after) = after_word("lifecycle") {
        return super::rules::parse_create_lifecycle(after);
    }
    let args = split_args(rest)?;
    let [kw, name, opts @ ..] = args.as_slice() else {
        return Err(usage);
    };
    if kw.eq_ignore_ascii_case("field") {
        return parse_create_field(name, opts);
    }
    if kw.eq_ignore_ascii_case("source") {
        return super::ingest::parse_create_source(name, opts);
    }
    if !kw.eq_ignore_ascii_case("tag") {
        return Err(usage);
    }
    let (mut category, mut description) = (String::new(), String::new());
    let mut it = opts.iter();
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| usage.clone())?;
        match k.to_ascii_lowercase().as_str() {
            "category" => category = v.clone(),
            "description" => description = v.clone(),
            _ => return Err(format!("unknown option {k:?}; {usage}")),
        }
    }
    Ok(Command::CreateTag {
        name: name.clone(),
        category,
        description,
    })
}

pub const CREATE_AUDIENCE: Spec = Spec {
    name: "create audience",
    words: &[],
    complete: &["create audience"],
    usage: "create audience <name> [category <c>] [owner <o>] [description <d>] [replace] [kept] as <query>",
    summary: "save a query under a name: the name then stands for it in any query",
    example: "create audience 高价值女性 owner marketing as 高价值用户 AND gender = female",
    takes_tags: false,
    parse: |rest| parse_create(rest),
};

/// `<words> as <query>`: the words before the first `as` outside quotes,
/// and everything after it; `None` without an `as` or a query.
pub(super) fn split_as(text: &str) -> Option<(&str, &str)> {
    let mut at = None;
    let mut quoted = false;
    let mut prev_space = true;
    for (i, ch) in text.char_indices() {
        if ch == '"' {
            quoted = !quoted;
        }
        if !quoted
            && prev_space
            && text[i..]
                .get(..2)
                .is_some_and(|w| w.eq_ignore_ascii_case("as"))
        {
            let after = &text[i + 2..];
            if after.is_empty() || after.starts_with(char::is_whitespace) {
                at = Some(i);
                break;
            }
        }
        prev_space = ch.is_whitespace();
    }
    let at = at?;
    let query = text[at + 2..].trim();
    (!query.is_empty()).then(|| (&text[..at], query))
}

/// What follows `create audience`: options, then `as` and the query.
fn parse_create_audience(text: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", CREATE_AUDIENCE.usage);
    // The query is everything after the first word `as` (quoted words
    // before it are the name and options).
    let (head, query) = split_as(text).ok_or_else(usage)?;
    let query = query.to_string();
    let args = split_args(head)?;
    let [name, opts @ ..] = args.as_slice() else {
        return Err(usage());
    };
    let (mut description, mut owner, mut category, mut replace, mut kept_current) =
        (String::new(), String::new(), String::new(), false, false);
    let mut it = opts.iter();
    while let Some(k) = it.next() {
        let k = k.to_ascii_lowercase();
        if k == "replace" {
            replace = true;
            continue;
        }
        if k == "kept" {
            kept_current = true;
            continue;
        }
        let v = it.next().ok_or_else(usage)?.clone();
        match k.as_str() {
            "category" => category = v,
            "owner" => owner = v,
            "description" => description = v,
            _ => return Err(format!("unknown option {k:?}; {}", usage())),
        }
    }
    Ok(Command::CreateAudience {
        name: name.clone(),
        query,
        description,
        owner,
        category,
        replace,
        kept_current,
    })
}

pub const CREATE_FIELD: Spec = Spec {
    name: "create field",
    // Reached through `create`.
    words: &[],
    complete: &["create field"],
    usage: "create field <name> integer | enum <v1,v2,...> | behaviour [retention N] [daily N] [zone Z] [merge keep|sum|min|max|first|last]",
    summary: "create an integer, enumerated or behaviour field (retention and daily in days; merge: how two customers' values combine when they merge)",
    example: "create field lifecycle enum prospect,new,active,loyal,churned",
    takes_tags: false,
    parse: parse_create,
};

fn parse_create_field(name: &str, opts: &[String]) -> Result<Command, String> {
    let usage = format!(
        "usage: {} [category <c>] [description <d>]",
        CREATE_FIELD.usage
    );
    let (kind_word, rest) = opts.split_first().ok_or_else(|| usage.clone())?;
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
        _ => return Err(usage),
    };
    let (mut category, mut description, mut merge) = (String::new(), String::new(), String::new());
    while let Some(k) = rest.next() {
        let v = rest.next().ok_or_else(|| usage.clone())?;
        let days = || {
            v.parse::<u32>()
                .map_err(|_| format!("bad number of days {v:?}"))
        };
        match (k.to_ascii_lowercase().as_str(), &mut kind) {
            ("category", _) => category = v.clone(),
            ("description", _) => description = v.clone(),
            ("merge", _) => merge = v.to_ascii_lowercase(),
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
        merge,
    })
}

pub const LINK: Spec = Spec {
    name: "link",
    words: &["link"],
    complete: &["link"],
    usage: "link <identity> <identity>… [channel C]",
    summary: "say that identities belong to one person (linked, and their customers merged, under the guard rails)",
    example: "link phone:13812345678 wechat_unionid:o6_bmjrPTlm6_2sgVt7hMZOPfL2M",
    takes_tags: false,
    parse: |rest| {
        let mut args = split_args(rest)?;
        let mut channel = String::new();
        if args.len() >= 2 && args[args.len() - 2].eq_ignore_ascii_case("channel") {
            channel = args.pop().unwrap_or_default();
            args.pop();
        }
        if args.is_empty() {
            return Err(format!("usage: {}", LINK.usage));
        }
        Ok(Command::Link {
            identities: args,
            channel,
        })
    },
};

pub const UNMERGE: Spec = Spec {
    name: "unmerge",
    words: &["unmerge"],
    complete: &["unmerge"],
    usage: "unmerge <merge id> | <identity> [allow-partial]",
    summary: "undo a wrong merge (ids from `merges`), or take one identity off its customer: each side gets back its own identities, tags, values and facts, and they are kept apart",
    example: "unmerge 17",
    takes_tags: false,
    parse: |rest| {
        let usage = || format!("usage: {}", UNMERGE.usage);
        let args = split_args(rest)?;
        let (what, allow_partial) = match args.as_slice() {
            [w] => (w, false),
            [w, kw] if kw.eq_ignore_ascii_case("allow-partial") => (w, true),
            _ => return Err(usage()),
        };
        if what.contains(':') {
            return Ok(Command::Unmerge {
                merge: 0,
                identity: what.clone(),
                allow_partial,
            });
        }
        match what.parse::<u64>() {
            Ok(merge) if merge > 0 => Ok(Command::Unmerge {
                merge,
                identity: String::new(),
                allow_partial,
            }),
            _ => Err(format!(
                "{what:?} is neither a merge id (1, 2, … as `merges` lists them) nor an identity (type:value)"
            )),
        }
    },
};

pub const DROP: Spec = Spec {
    name: "drop",
    words: &["drop"],
    complete: &[
        "drop tag",
        "drop field",
        "drop source",
        "drop audience",
        "drop rule",
        "drop snapshot",
    ],
    usage: "drop tag|field|source|audience|rule <name> [--yes] | drop snapshot <id> [--yes]",
    summary: "drop a tag or a field and its data, a source, a saved audience, a rule (with its tag or lifecycle) or a snapshot (asks first)",
    example: "drop tag 潜在流失",
    takes_tags: true,
    parse: |rest| {
        let mut args = split_args(rest)?;
        let yes = take_flag(&mut args, "--yes");
        match args.as_slice() {
            [kw, name] if kw.eq_ignore_ascii_case("tag") => Ok(Command::DropTag {
                name: name.clone(),
                yes,
            }),
            [kw, name] if kw.eq_ignore_ascii_case("field") => Ok(Command::DropField {
                name: name.clone(),
                yes,
            }),
            [kw, name] if kw.eq_ignore_ascii_case("source") => Ok(Command::DropSource {
                name: name.clone(),
                yes,
            }),
            [kw, name] if kw.eq_ignore_ascii_case("audience") => Ok(Command::DropAudience {
                name: name.clone(),
                yes,
            }),
            [kw, name] if kw.eq_ignore_ascii_case("rule") => Ok(Command::DropRule {
                name: name.clone(),
                yes,
            }),
            [kw, id] if kw.eq_ignore_ascii_case("snapshot") => Ok(Command::DropSnapshot {
                id: id.parse().map_err(|_| {
                    format!("{id:?} is not a snapshot id (1, 2, … as `snapshots` lists them)")
                })?,
                yes,
            }),
            _ => Err(format!("usage: {}", DROP.usage)),
        }
    },
};

pub const ADD: Spec = Spec {
    name: "add",
    words: &["add"],
    complete: &["add"],
    usage: "add <tag> <key>... | add <tag> --ids <id>...",
    summary: "add customers to a tag, by key (unknown keys become customers) or by internal id",
    example: "add 高价值用户 phone:13800001111 jd:pin_7781",
    takes_tags: true,
    parse: |rest| {
        let (tag, who) = tag_and_who("add", rest)?;
        Ok(Command::Add { tag, who })
    },
};

pub const REMOVE: Spec = Spec {
    name: "remove",
    words: &["remove"],
    complete: &["remove"],
    usage: "remove <tag> <key>... | remove <tag> --ids <id>...",
    summary: "remove customers from a tag, by key or by internal id",
    example: "remove 高价值用户 jd:pin_7781",
    takes_tags: true,
    parse: |rest| {
        let (tag, who) = tag_and_who("remove", rest)?;
        Ok(Command::Remove { tag, who })
    },
};

/// `<tag> <key>...` or `<tag> --ids <id>...`, for `add` and `remove`.
fn tag_and_who(word: &str, rest: &str) -> Result<(String, Who), String> {
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
                            format!(
                                "bad id {i:?}: an internal id is a whole number from 0 to 4294967295"
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            )
        }
        keys => Who::Keys(keys.to_vec()),
    };
    Ok((tag.clone(), who))
}

pub const RESOLVE: Spec = Spec {
    name: "resolve",
    words: &["resolve"],
    complete: &["resolve"],
    usage: "resolve <key>... [--create]",
    summary: "internal ids of customers; --create makes the missing ones",
    example: "resolve phone:13800001111 jd:pin_7781",
    takes_tags: false,
    parse: |rest| {
        let mut args = split_args(rest)?;
        let create = take_flag(&mut args, "--create");
        if args.is_empty() {
            return Err(format!("usage: {}", RESOLVE.usage));
        }
        Ok(Command::Resolve { keys: args, create })
    },
};

pub const IMPORT: Spec = Spec {
    name: "import",
    words: &["import"],
    complete: &["import"],
    usage: "import <tag> from <file> [column N] [create]",
    summary: "add every key in a file (one per line, or CSV column N) to a tag",
    example: "import 高价值用户 from vip.csv column 2",
    takes_tags: true,
    parse: parse_import,
};

fn parse_import(rest: &str) -> Result<Command, String> {
    let usage = format!("usage: {}", IMPORT.usage);
    let mut args = split_args(rest)?;
    let create = take_flag(&mut args, "create");
    let mut column = 1;
    if let Some(i) = args.iter().position(|a| a.eq_ignore_ascii_case("column")) {
        let n = args.get(i + 1).ok_or_else(|| usage.clone())?;
        column = n
            .parse()
            .ok()
            .filter(|&c: &usize| c >= 1)
            .ok_or_else(|| format!("bad column {n:?}: columns count from 1"))?;
        args.drain(i..i + 2);
    }
    match args.as_slice() {
        [tag, kw, path] if kw.eq_ignore_ascii_case("from") => Ok(Command::Import {
            tag: tag.clone(),
            path: path.clone(),
            column,
            create,
        }),
        _ => Err(usage),
    }
}

pub const DELETE: Spec = Spec {
    name: "delete",
    words: &["delete"],
    complete: &["delete customers"],
    usage: "delete customers <key>... [--yes]",
    summary: "erase customers from every tag and forget their keys (asks first)",
    example: "delete customers phone:13800001111",
    takes_tags: false,
    parse: |rest| {
        let mut args = split_args(rest)?;
        let yes = take_flag(&mut args, "--yes");
        match args.split_first() {
            Some((kw, keys)) if kw.eq_ignore_ascii_case("customers") && !keys.is_empty() => {
                Ok(Command::DeleteCustomers {
                    keys: keys.to_vec(),
                    yes,
                })
            }
            _ => Err(format!("usage: {}", DELETE.usage)),
        }
    },
};
