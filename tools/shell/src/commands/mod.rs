//! The shell's command language: parsing a line into a [`Command`], and the
//! help texts. Knows nothing of the server.
//!
//! Every command is a [`Spec`]: its help text and its parser side by side,
//! in the file of its group ([`reads`], [`tags`], [`fields`], [`admin`]).
//! [`SPECS`] lists them in the order `help` shows them; [`args`] splits a
//! line into words, and [`help`](mod@help) lays the texts out.

pub mod admin;
pub mod args;
pub mod fields;
mod help;
pub mod ingest;
pub mod reads;
pub mod rules;
pub mod tags;

pub use args::{is_incomplete, join_lines};
pub use help::help;

use args::first_word;

/// Where `create source` takes its definition from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceFrom {
    Preset(String),
    File(String),
}

/// One shell command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Sources,
    CreateSource {
        name: String,
        from: SourceFrom,
        replace: bool,
    },
    DropSource {
        name: String,
        yes: bool,
    },
    /// `pause source` (`paused`) or `resume source`.
    PauseSource {
        name: String,
        paused: bool,
    },
    /// Saved audiences, with their counts (of one category, or all).
    Audiences {
        category: String,
    },
    CreateAudience {
        name: String,
        query: String,
        description: String,
        owner: String,
        category: String,
        replace: bool,
        /// Kept current by the store, so that `watch audience` can follow it.
        kept_current: bool,
    },
    DropAudience {
        name: String,
        yes: bool,
    },
    /// Freeze a saved audience's members now.
    TakeSnapshot {
        audience: String,
        note: String,
    },
    /// Audience snapshots (of one audience, or all).
    Snapshots {
        audience: String,
    },
    DropSnapshot {
        id: u32,
        yes: bool,
    },
    /// A rule tag.
    CreateRule {
        name: String,
        query: String,
        category: String,
        description: String,
        zone: String,
        replace: bool,
    },
    /// A lifecycle: stages `(value, query)` in order.
    CreateLifecycle {
        name: String,
        stages: Vec<(String, String)>,
        category: String,
        description: String,
        zone: String,
        replace: bool,
    },
    DropRule {
        name: String,
        yes: bool,
    },
    Rules,
    /// Turn the rules' days now.
    TurnDays,
    /// The change feed: who enters and leaves tags and values, as it
    /// happens.
    Watch {
        tags: Vec<String>,
        /// `(field, value)`; an empty value: every value of the field.
        values: Vec<(String, String)>,
        /// Saved audiences (kept current).
        audiences: Vec<String>,
        /// Ids grouped by what changed, no keys.
        compact: bool,
        /// Resume after this lsn (default: from now).
        after: Option<u64>,
        /// Stop after this many seconds.
        seconds: Option<u64>,
        /// Stop after this many changes.
        limit: Option<u64>,
    },
    /// A tag's or audience's member counts, a point a day.
    History {
        name: String,
        days: u32,
    },
    Ingest {
        source: String,
        path: String,
        /// Where the rejected records' report goes (default: beside the file).
        rejects: Option<String>,
    },
    RebuildFacts {
        customers: Vec<String>,
        /// Rebuild even if the archive dropped old events.
        partial: bool,
    },
    /// Every customer a query selects, a call per 10,000.
    RebuildFactsWhere {
        query: String,
        partial: bool,
    },
    Count(String),
    Find {
        query: String,
        limit: u32,
        /// Name customers by their identity of this type (empty: by key).
        identity_type: String,
    },
    More,
    Export {
        query: String,
        path: String,
        /// Name customers by their identity of this type (empty: by key).
        identity_type: String,
        /// Hash those identities (`sha256`, `md5`; empty: not hashed).
        hash: String,
        hash_upper: bool,
    },
    Profile {
        key: String,
        /// Days back behaviour dates are listed (0: the server's default, 30).
        days: u32,
    },
    /// One customer's identities, found by any of them.
    Identities(String),
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
        /// How values combine when customers merge (empty: keep).
        merge: String,
    },
    /// The merge log, or the merges into one customer.
    Merges {
        customer: String,
    },
    /// Identities of one person.
    Link {
        identities: Vec<String>,
        channel: String,
    },
    /// Undo merge `merge`, or (merge 0) take `identity` off its customer.
    Unmerge {
        merge: u64,
        identity: String,
        allow_partial: bool,
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
    /// `set <field> <key> add|max|min <n>`: combined on the server.
    CombineValue {
        field: String,
        key: String,
        how: Combine,
        n: i64,
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
    /// Read the store as of a past day or log position (`None`: now).
    AsOf(Option<tagstore_proto::as_of::At>),
    Stats,
    /// The audit trail, filtered.
    Audit(AuditFilter),
    /// `true`: also merge the dictionary sections into one.
    Checkpoint(bool),
    /// A backup into a new file, an increment of `since` when given.
    Backup {
        file: std::path::PathBuf,
        since: Option<std::path::PathBuf>,
    },
    Help(Option<String>),
    Timing(Option<bool>),
    Quit,
}

/// What `audit` asks for (empty: everything).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub who: String,
    pub method: String,
    pub subject: String,
    /// From the start of this UTC day (Unix ms; 0: from the oldest).
    pub since_ms: i64,
    /// Before the start of this UTC day (Unix ms; 0: to the newest).
    pub until_ms: i64,
    pub after: u64,
    pub limit: u32,
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

/// How `set … add|max|min` combines a number with an integer value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combine {
    Add,
    Max,
    Min,
}

/// What a breakdown counts by.
#[derive(Debug, Clone, PartialEq)]
pub enum BreakdownBy {
    Field(String),
    Category(String),
}

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

/// One command: what `help` says about it and how a line becomes it.
pub struct Spec {
    /// How `help` names it (`help create field`).
    pub name: &'static str,
    /// The first words of a line that run [`Spec::parse`] (none: reached
    /// through another command's parser, as `create field` through `create`).
    pub words: &'static [&'static str],
    /// What tab completion offers at the start of a line.
    pub complete: &'static [&'static str],
    pub usage: &'static str,
    pub summary: &'static str,
    pub example: &'static str,
    /// Its arguments are (or contain) a query or tag names: completion
    /// offers tag names.
    pub takes_tags: bool,
    /// The rest of the line, after the first word, into the command.
    pub parse: fn(&str) -> Result<Command, String>,
}

/// Every command, in the order `help` lists them.
pub const SPECS: &[&Spec] = &[
    &reads::COUNT,
    &reads::FIND,
    &reads::MORE,
    &reads::EXPORT,
    &reads::PROFILE,
    &reads::IDENTITIES,
    &reads::MERGES,
    &tags::LINK,
    &tags::UNMERGE,
    &reads::AUDIENCES,
    &reads::SNAPSHOT,
    &reads::SNAPSHOTS,
    &reads::HISTORY,
    &reads::WATCH,
    &reads::TAGS,
    &reads::TAG,
    &tags::CREATE_TAG,
    &tags::CREATE_FIELD,
    &tags::CREATE_AUDIENCE,
    &rules::CREATE_RULE,
    &rules::CREATE_LIFECYCLE,
    &rules::RULES,
    &rules::TURN_DAYS,
    &tags::DROP,
    &tags::ADD,
    &tags::REMOVE,
    &tags::RESOLVE,
    &tags::IMPORT,
    &tags::DELETE,
    &fields::FIELDS,
    &fields::SET,
    &fields::CLEAR,
    &fields::EVENT,
    &fields::AGGREGATE,
    &fields::BREAKDOWN,
    &fields::TOP,
    &fields::OVERLAP,
    &ingest::SOURCES,
    &ingest::CREATE_SOURCE,
    &ingest::PAUSE_SOURCE,
    &ingest::RESUME_SOURCE,
    &ingest::INGEST,
    &ingest::REBUILD,
    &admin::AS_OF,
    &admin::STATS,
    &admin::AUDIT,
    &admin::CHECKPOINT,
    &admin::BACKUP,
    &admin::HELP,
    &admin::TIMING,
    &admin::QUIT,
];

/// The command a line's first word runs.
fn spec_of(first_word: &str) -> Option<&'static Spec> {
    let word = first_word.to_ascii_lowercase();
    SPECS
        .iter()
        .copied()
        .find(|s| s.words.contains(&word.as_str()))
}

/// What tab completion offers at the start of a line.
pub fn command_words() -> impl Iterator<Item = &'static str> {
    SPECS.iter().flat_map(|s| s.complete.iter().copied())
}

/// Commands whose arguments are (or contain) a query or tag names.
pub fn takes_tags(first_word: &str) -> bool {
    spec_of(first_word).is_some_and(|s| s.takes_tags)
}

/// Parses one line (already joined if it spanned several). `Ok(None)` for a
/// blank line or a comment.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with("--") || line.starts_with('#') {
        return Ok(None);
    }
    let (word, rest) = first_word(line);
    match spec_of(word) {
        Some(spec) => (spec.parse)(rest).map(Some),
        None => Err(format!(
            "unknown command {word:?}; type `help` for the list"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table;

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
                limit: 5,
                identity_type: String::new()
            }
        );
        assert_eq!(
            p("find a OR b"),
            Command::Find {
                query: "a OR b".into(),
                limit: 20,
                identity_type: String::new()
            }
        );
        assert_eq!(
            p("find a OR b limit 5 as phone"),
            Command::Find {
                query: "a OR b".into(),
                limit: 5,
                identity_type: "phone".into()
            }
        );
        assert_eq!(
            p("find a as wechat_openid"),
            Command::Find {
                query: "a".into(),
                limit: 20,
                identity_type: "wechat_openid".into()
            }
        );
        assert_eq!(
            p("export a to out.csv as phone"),
            Command::Export {
                query: "a".into(),
                path: "out.csv".into(),
                identity_type: "phone".into(),
                hash: String::new(),
                hash_upper: false
            }
        );
        assert_eq!(
            p("export a to out.csv as phone hashed md5 upper"),
            Command::Export {
                query: "a".into(),
                path: "out.csv".into(),
                identity_type: "phone".into(),
                hash: "md5".into(),
                hash_upper: true
            }
        );
        assert!(parse("export a to out.csv hashed sha256").is_err());
        assert_eq!(
            p("export a AND \"b c\" to out.csv"),
            Command::Export {
                query: "a AND \"b c\"".into(),
                path: "out.csv".into(),
                identity_type: String::new(),
                hash: String::new(),
                hash_upper: false
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
        assert_eq!(
            p("identities jd_pin:ann"),
            Command::Identities("jd_pin:ann".into())
        );
        assert!(parse("identities").is_err());
        assert!(parse("identities a b").is_err());
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
            p("backup b.tsbak since \"a b.tsbak\""),
            Command::Backup {
                file: "b.tsbak".into(),
                since: Some("a b.tsbak".into()),
            }
        );
        assert!(parse("backup").is_err());
        assert!(parse("backup a b").is_err());
        use tagstore_proto::as_of::At;
        assert_eq!(
            p("as of 2026-11-11"),
            Command::AsOf(Some(At::Day("2026-11-11".into())))
        );
        assert_eq!(
            p("AS OF position 1234"),
            Command::AsOf(Some(At::Position(1234)))
        );
        assert_eq!(p("as of now"), Command::AsOf(None));
        for bad in [
            "as of",
            "as of 2026-1-11",
            "as of position",
            "as of position -3",
            "as 2026-11-11",
            "as of yesterday",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
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
                description: String::new(),
                merge: String::new()
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
                description: String::new(),
                merge: String::new()
            }
        );
        assert!(parse("create field x integer retention 5").is_err());
        assert_eq!(
            p("create field orders integer merge sum"),
            Command::CreateField {
                name: "orders".into(),
                kind: FieldKindArg::Integer,
                category: String::new(),
                description: String::new(),
                merge: "sum".into()
            }
        );
        assert_eq!(
            p("merges"),
            Command::Merges {
                customer: String::new()
            }
        );
        assert_eq!(
            p("merges phone:1"),
            Command::Merges {
                customer: "phone:1".into()
            }
        );
        assert!(parse("merges a b").is_err());
        assert_eq!(
            p("link phone:1 jd_pin:a channel app"),
            Command::Link {
                identities: vec!["phone:1".into(), "jd_pin:a".into()],
                channel: "app".into()
            }
        );
        assert_eq!(
            p("link phone:1"),
            Command::Link {
                identities: vec!["phone:1".into()],
                channel: String::new()
            }
        );
        assert!(parse("link").is_err());
        assert_eq!(
            p("unmerge 17"),
            Command::Unmerge {
                merge: 17,
                identity: String::new(),
                allow_partial: false
            }
        );
        assert_eq!(
            p("unmerge 3 allow-partial"),
            Command::Unmerge {
                merge: 3,
                identity: String::new(),
                allow_partial: true
            }
        );
        assert_eq!(
            p("unmerge phone:13800000001"),
            Command::Unmerge {
                merge: 0,
                identity: "phone:13800000001".into(),
                allow_partial: false
            }
        );
        assert!(parse("unmerge").is_err());
        assert_eq!(
            p(
                "create audience 高价值女性 owner marketing replace as vip AND (women OR \"new arrivals\")"
            ),
            Command::CreateAudience {
                name: "高价值女性".into(),
                query: "vip AND (women OR \"new arrivals\")".into(),
                description: String::new(),
                owner: "marketing".into(),
                category: String::new(),
                replace: true,
                kept_current: false,
            }
        );
        assert_eq!(
            p("create audience 潜在流失 kept as 潜在流失 AND vip"),
            Command::CreateAudience {
                name: "潜在流失".into(),
                query: "潜在流失 AND vip".into(),
                description: String::new(),
                owner: String::new(),
                category: String::new(),
                replace: false,
                kept_current: true,
            }
        );
        assert!(parse("create audience x vip").is_err());
        assert!(parse("create audience x as").is_err());
        assert_eq!(
            p("drop audience x --yes"),
            Command::DropAudience {
                name: "x".into(),
                yes: true
            }
        );
        assert_eq!(
            p("snapshot 高价值女性 note \"approved by Li\""),
            Command::TakeSnapshot {
                audience: "高价值女性".into(),
                note: "approved by Li".into()
            }
        );
        assert_eq!(
            p("snapshots"),
            Command::Snapshots {
                audience: String::new()
            }
        );
        assert_eq!(
            p("drop snapshot 7 --yes"),
            Command::DropSnapshot { id: 7, yes: true }
        );
        assert!(parse("drop snapshot x").is_err());
        assert!(parse("snapshot").is_err());
        assert_eq!(
            p("history 高价值用户 days 90"),
            Command::History {
                name: "高价值用户".into(),
                days: 90
            }
        );
        assert_eq!(
            p("history vip"),
            Command::History {
                name: "vip".into(),
                days: 0
            }
        );
        assert!(parse("history vip days x").is_err());
        assert_eq!(
            p("audiences campaigns"),
            Command::Audiences {
                category: "campaigns".into()
            }
        );
        assert!(parse("unmerge 0").is_err());
        assert!(parse("unmerge x").is_err());
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
            p("create source jd preset jd_orders"),
            Command::CreateSource {
                name: "jd".into(),
                from: SourceFrom::Preset("jd_orders".into()),
                replace: false
            }
        );
        assert_eq!(
            p("create source app from app.toml replace"),
            Command::CreateSource {
                name: "app".into(),
                from: SourceFrom::File("app.toml".into()),
                replace: true
            }
        );
        assert!(parse("create source app").is_err());
        assert_eq!(
            p("drop source jd --yes"),
            Command::DropSource {
                name: "jd".into(),
                yes: true
            }
        );
        assert_eq!(
            p("ingest jd \"orders 11.csv\" rejects bad.csv"),
            Command::Ingest {
                source: "jd".into(),
                path: "orders 11.csv".into(),
                rejects: Some("bad.csv".into())
            }
        );
        assert_eq!(p("sources"), Command::Sources);
        assert_eq!(
            p("pause source douyin"),
            Command::PauseSource {
                name: "douyin".into(),
                paused: true
            }
        );
        assert_eq!(
            p("RESUME source douyin"),
            Command::PauseSource {
                name: "douyin".into(),
                paused: false
            }
        );
        assert!(parse("pause douyin").is_err());
        assert!(parse("resume source").is_err());
        assert_eq!(
            p("rebuild facts phone:13812345678 \"jd_pin:小 王\" partial"),
            Command::RebuildFacts {
                customers: vec!["phone:13812345678".into(), "jd_pin:小 王".into()],
                partial: true
            }
        );
        assert_eq!(
            p("rebuild facts where 护肤 AND order_count >= 1 partial"),
            Command::RebuildFactsWhere {
                query: "护肤 AND order_count >= 1".into(),
                partial: true
            }
        );
        assert_eq!(
            p("REBUILD FACTS WHERE ALL"),
            Command::RebuildFactsWhere {
                query: "ALL".into(),
                partial: false
            }
        );
        assert!(parse("rebuild facts where").is_err());
        assert!(parse("rebuild facts").is_err());
        assert!(parse("rebuild phone:1").is_err());
        assert_eq!(
            p("set order_count jd:1 add -2"),
            Command::CombineValue {
                field: "order_count".into(),
                key: "jd:1".into(),
                how: Combine::Add,
                n: -2
            }
        );
        assert_eq!(
            p("set last_order_day jd:1 max 20405"),
            Command::CombineValue {
                field: "last_order_day".into(),
                key: "jd:1".into(),
                how: Combine::Max,
                n: 20405
            }
        );
        assert!(parse("set order_count jd:1 add lots").is_err());
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
        let words: Vec<&str> = command_words().collect();
        for d in SPECS {
            assert!(
                words
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
