//! Commands about the server and the shell itself: `stats`, `audit`,
//! `checkpoint`, `backup`, `help`, `\timing`, `quit`. Each one's help text sits beside its parser.

use super::args::{split_args, take_flag};
use super::{AuditFilter, Command, Spec};

pub const AS_OF: Spec = Spec {
    name: "as of",
    words: &["as"],
    complete: &["as of"],
    usage: "as of <YYYY-MM-DD> | as of position <n> | as of now",
    summary: "read the store as it was at the end of a past day or at a log position (count, find, export, aggregate, breakdown, top, overlap) until `as of now`",
    example: "as of 2026-11-11",
    takes_tags: false,
    parse: parse_as_of,
};

fn parse_as_of(rest: &str) -> Result<Command, String> {
    use tagstore_proto::as_of::At;
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        [of, "now"] if of.eq_ignore_ascii_case("of") => Ok(Command::AsOf(None)),
        [of, word, n] if of.eq_ignore_ascii_case("of") && word.eq_ignore_ascii_case("position") => {
            n.parse()
                .map(|p| Command::AsOf(Some(At::Position(p))))
                .map_err(|_| format!("{n:?} is not a log position (a whole number)"))
        }
        [of, day]
            if of.eq_ignore_ascii_case("of")
                && day.len() == 10
                && day.char_indices().all(|(i, c)| {
                    if i == 4 || i == 7 {
                        c == '-'
                    } else {
                        c.is_ascii_digit()
                    }
                }) =>
        {
            Ok(Command::AsOf(Some(At::Day(day.to_string()))))
        }
        _ => Err(format!("usage: {}", AS_OF.usage)),
    }
}

pub const STATS: Spec = Spec {
    name: "stats",
    words: &["stats"],
    complete: &["stats"],
    usage: "stats",
    summary: "server figures: customers, tags, memory, disk, log, last checkpoint, dictionary sections",
    example: "stats",
    takes_tags: false,
    parse: |_| Ok(Command::Stats),
};

pub const AUDIT: Spec = Spec {
    name: "audit",
    words: &["audit"],
    complete: &["audit"],
    usage: "audit [who <token>] [call <Method>] [about <text>] [since <YYYY-MM-DD>] [before <YYYY-MM-DD>] [after <seq>] [limit N]",
    summary: "the audit trail: who read or changed customers, with which call, when, how many (admin)",
    example: "audit about phone:13800001111",
    takes_tags: false,
    parse: parse_audit,
};

fn parse_audit(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", AUDIT.usage);
    let args = split_args(rest)?;
    let mut filter = AuditFilter::default();
    let mut it = args.iter();
    while let Some(word) = it.next() {
        let value = it.next().ok_or_else(usage)?;
        match word.to_ascii_lowercase().as_str() {
            "who" => filter.who = value.clone(),
            "call" => filter.method = value.clone(),
            "about" => filter.subject = value.clone(),
            "since" => filter.since_ms = utc_day_ms(value)?,
            "before" => filter.until_ms = utc_day_ms(value)?,
            "after" => filter.after = value.parse().map_err(|_| usage())?,
            "limit" => filter.limit = value.parse().map_err(|_| usage())?,
            _ => return Err(usage()),
        }
    }
    Ok(Command::Audit(filter))
}

/// The start of a day in UTC (the audit trail's times are shown in UTC),
/// Unix ms.
fn utc_day_ms(day: &str) -> Result<i64, String> {
    let date: jiff::civil::Date = day
        .parse()
        .map_err(|e| format!("{day:?} is not a day (YYYY-MM-DD): {e}"))?;
    jiff::tz::TimeZone::UTC
        .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
        .map(|t| t.as_millisecond())
        .map_err(|e| format!("{day:?}: {e}"))
}

pub const CHECKPOINT: Spec = Spec {
    name: "checkpoint",
    words: &["checkpoint"],
    complete: &["checkpoint"],
    usage: "checkpoint [--merge-dictionary]",
    summary: "write a checkpoint now; --merge-dictionary also merges the customer dictionary into one section (after a bulk load)",
    example: "checkpoint --merge-dictionary",
    takes_tags: false,
    parse: |rest| {
        let mut args = split_args(rest)?;
        let merge = take_flag(&mut args, "--merge-dictionary");
        if !args.is_empty() {
            return Err(format!("usage: {}", CHECKPOINT.usage));
        }
        Ok(Command::Checkpoint(merge))
    },
};

pub const BACKUP: Spec = Spec {
    name: "backup",
    words: &["backup"],
    complete: &["backup"],
    usage: "backup <file> [since <earlier backup file>]",
    summary: "a consistent copy of the whole store, taken while writes go on, into a new file; `since` makes an increment of an earlier backup (admin; `tagstore restore` makes a data directory of it)",
    example: "backup /backups/store-1130.tsbak since /backups/store-1101.tsbak",
    takes_tags: false,
    parse: parse_backup,
};

fn parse_backup(rest: &str) -> Result<Command, String> {
    let usage = || format!("usage: {}", BACKUP.usage);
    let args = split_args(rest)?;
    match args.as_slice() {
        [file] => Ok(Command::Backup {
            file: file.into(),
            since: None,
        }),
        [file, word, base] if word.eq_ignore_ascii_case("since") => Ok(Command::Backup {
            file: file.into(),
            since: Some(base.into()),
        }),
        _ => Err(usage()),
    }
}

pub const HELP: Spec = Spec {
    name: "help",
    words: &["help", "\\?", "?"],
    complete: &["help"],
    usage: "help [command]",
    summary: "this list, or one command in detail",
    example: "help find",
    takes_tags: false,
    parse: |rest| Ok(Command::Help((!rest.is_empty()).then(|| rest.to_string()))),
};

pub const TIMING: Spec = Spec {
    name: "\\timing",
    words: &["\\timing"],
    complete: &["\\timing"],
    usage: "\\timing [on|off]",
    summary: "show how long each command takes",
    example: "\\timing on",
    takes_tags: false,
    parse: |rest| match rest.to_ascii_lowercase().as_str() {
        "" => Ok(Command::Timing(None)),
        "on" => Ok(Command::Timing(Some(true))),
        "off" => Ok(Command::Timing(Some(false))),
        _ => Err(format!("usage: {}", TIMING.usage)),
    },
};

pub const QUIT: Spec = Spec {
    name: "quit",
    words: &["quit", "exit", "\\q"],
    complete: &["quit"],
    usage: "quit",
    summary: "leave the shell (also `exit`, `\\q`, Ctrl-D)",
    example: "quit",
    takes_tags: false,
    parse: |_| Ok(Command::Quit),
};
