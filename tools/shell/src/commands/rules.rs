//! Commands for rules: `create rule`, `create lifecycle` (reached through
//! `create`), `rules`, `turn days`; `drop rule` is `drop`'s. Each one's help
//! text sits beside its parser.

use super::args::split_args;
use super::tags::split_as;
use super::{Command, Spec};

pub const CREATE_RULE: Spec = Spec {
    name: "create rule",
    words: &[],
    complete: &["create rule"],
    usage: "create rule <name> [category <c>] [description <d>] [zone <tz>] [replace] as <query>",
    summary: "a rule tag: a tag whose members are always the query's (TODAY is the rule's local day)",
    example: "create rule 潜在流失 as last_order_day < TODAY - 90 AND order_count >= 2",
    takes_tags: false,
    parse: |rest| super::tags::parse_create(rest),
};

pub const CREATE_LIFECYCLE: Spec = Spec {
    name: "create lifecycle",
    words: &[],
    complete: &["create lifecycle"],
    usage: "create lifecycle <name> [category <c>] [description <d>] [zone <tz>] [replace] as <stage> when <query>; <stage> when <query>; …",
    summary: "an enumerated field whose value is the first stage whose query a customer matches",
    example: "create lifecycle lifecycle as new when first_order_day >= TODAY - 30; loyal when order_count >= 5 AND last_order_day >= TODAY - 180; churned when last_order_day < TODAY - 180",
    takes_tags: false,
    parse: |rest| super::tags::parse_create(rest),
};

pub const RULES: Spec = Spec {
    name: "rules",
    words: &["rules"],
    complete: &["rules"],
    usage: "rules",
    summary: "rule tags and lifecycles: their queries, days and member counts",
    example: "rules",
    takes_tags: false,
    parse: |rest| {
        if rest.trim().is_empty() {
            Ok(Command::Rules)
        } else {
            Err(format!("usage: {}", RULES.usage))
        }
    },
};

pub const TURN_DAYS: Spec = Spec {
    name: "turn days",
    words: &["turn"],
    complete: &["turn days"],
    usage: "turn days",
    summary: "turn the rules to today now (the server does it within seconds of each local midnight)",
    example: "turn days",
    takes_tags: false,
    parse: |rest| {
        if rest.trim().eq_ignore_ascii_case("days") {
            Ok(Command::TurnDays)
        } else {
            Err(format!("usage: {}", TURN_DAYS.usage))
        }
    },
};

/// The options before `as`: the name, then category, description, zone
/// and replace.
struct Head {
    name: String,
    category: String,
    description: String,
    zone: String,
    replace: bool,
}

fn head(text: &str, usage: &str) -> Result<Head, String> {
    let args = split_args(text)?;
    let [name, opts @ ..] = args.as_slice() else {
        return Err(format!("usage: {usage}"));
    };
    let mut h = Head {
        name: name.clone(),
        category: String::new(),
        description: String::new(),
        zone: String::new(),
        replace: false,
    };
    let mut it = opts.iter();
    while let Some(k) = it.next() {
        let k = k.to_ascii_lowercase();
        if k == "replace" {
            h.replace = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("usage: {usage}"))?.clone();
        match k.as_str() {
            "category" => h.category = v,
            "description" => h.description = v,
            "zone" => h.zone = v,
            _ => return Err(format!("unknown option {k:?}; usage: {usage}")),
        }
    }
    Ok(h)
}

/// What follows `create rule`.
pub(super) fn parse_create_rule(text: &str) -> Result<Command, String> {
    let usage = CREATE_RULE.usage;
    let (before, query) = split_as(text).ok_or_else(|| format!("usage: {usage}"))?;
    let h = head(before, usage)?;
    Ok(Command::CreateRule {
        name: h.name,
        query: query.to_string(),
        category: h.category,
        description: h.description,
        zone: h.zone,
        replace: h.replace,
    })
}

/// What follows `create lifecycle`: stages separated by `;` (outside
/// quotes), each `<value> when <query>`.
pub(super) fn parse_create_lifecycle(text: &str) -> Result<Command, String> {
    let usage = CREATE_LIFECYCLE.usage;
    let (before, rest) = split_as(text).ok_or_else(|| format!("usage: {usage}"))?;
    let h = head(before, usage)?;
    let mut stages = Vec::new();
    for part in split_outside_quotes(rest, ';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let at = find_word(part, "when").ok_or_else(|| {
            format!("stage {part:?}: write it as <stage> when <query>; usage: {usage}")
        })?;
        let value = split_args(&part[..at])?;
        let [value] = value.as_slice() else {
            return Err(format!(
                "stage {part:?}: one stage name before `when` (quote one with spaces)"
            ));
        };
        let query = part[at + 4..].trim();
        if query.is_empty() {
            return Err(format!("stage {value:?} has no query after `when`"));
        }
        stages.push((value.clone(), query.to_string()));
    }
    if stages.is_empty() {
        return Err(format!("usage: {usage}"));
    }
    Ok(Command::CreateLifecycle {
        name: h.name,
        stages,
        category: h.category,
        description: h.description,
        zone: h.zone,
        replace: h.replace,
    })
}

/// `text` split at `sep` where it is outside double and single quotes.
fn split_outside_quotes(text: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quote, mut from) = (None, 0);
    for (i, ch) in text.char_indices() {
        match (quote, ch) {
            (None, '"' | '\'') => quote = Some(ch),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c == sep => {
                out.push(&text[from..i]);
                from = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&text[from..]);
    out
}

/// The byte offset of the first `word` standing alone (case-insensitive).
fn find_word(text: &str, word: &str) -> Option<usize> {
    let mut prev_space = true;
    for (i, ch) in text.char_indices() {
        if prev_space
            && text[i..]
                .get(..word.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(word))
            && text[i + word.len()..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
        {
            return Some(i);
        }
        prev_space = ch.is_whitespace();
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::commands::{Command, parse};

    fn p(s: &str) -> Command {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_rules_and_lifecycles() {
        assert_eq!(
            p(
                "create rule 潜在流失 category 生命周期 replace as last_order_day < TODAY - 90 AND order_count >= 2"
            ),
            Command::CreateRule {
                name: "潜在流失".into(),
                query: "last_order_day < TODAY - 90 AND order_count >= 2".into(),
                category: "生命周期".into(),
                description: String::new(),
                zone: String::new(),
                replace: true,
            }
        );
        assert_eq!(
            p(
                "create lifecycle lc zone UTC as new when order_count = 1; \"very loyal\" when tag = 'a;b' ;"
            ),
            Command::CreateLifecycle {
                name: "lc".into(),
                stages: vec![
                    ("new".into(), "order_count = 1".into()),
                    ("very loyal".into(), "tag = 'a;b'".into()),
                ],
                category: String::new(),
                description: String::new(),
                zone: "UTC".into(),
                replace: false,
            }
        );
        assert!(parse("create lifecycle lc as new order_count = 1").is_err());
        assert!(parse("create rule r").is_err());
        assert_eq!(p("rules"), Command::Rules);
        assert_eq!(p("turn days"), Command::TurnDays);
        assert_eq!(
            p("drop rule 潜在流失 --yes"),
            Command::DropRule {
                name: "潜在流失".into(),
                yes: true
            }
        );
    }
}
