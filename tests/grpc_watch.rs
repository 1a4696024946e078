//! The change feed (`Watch`, #23) against the real server binary: a
//! watcher's mirror of every watched tag, rule tag, value and lifecycle,
//! built only from the events it receives, must equal the store after
//! random writes, across reconnects, checkpoints, a clean restart and a
//! kill -9, with every event valid when it arrives (no one enters what they
//! are in or leaves what they are not: nothing twice, nothing missed, in
//! log order); a stage change is one LEFT and one ENTERED under one lsn; a
//! watcher that does not read holds up no writer and gets everything once
//! it reads; a position the feed no longer holds is OUT_OF_RANGE; bad
//! requests get the status that names what is wrong; and a shutdown ends
//! open watches instead of waiting for them.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::{Client, code};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::proto::membership_change::Kind;
use tagstore::proto::value_write::Value;
use tagstore::proto::*;
use tonic::Code;
use tonic::Streaming;

const TAGS: [&str; 4] = ["常购护肤品", "尝试新品", "社交活跃", "t3"];
const STAGES: [&str; 3] = ["new", "active", "loyal"];
/// A saved audience kept current, watched by name; its query, and the one
/// it is redefined with half-way.
const AUDIENCE: &str = "潜在流失客户";
const AUDIENCE_QUERY: &str = "(\"社交活跃\" OR stage = 'loyal') AND NOT t3";
const AUDIENCE_QUERY_2: &str = "\"尝试新品\" OR stage = 'new' OR life = 'buyer'";

async fn save_audience(c: &mut Client, query: &str, replace: bool) {
    c.create_audience(CreateAudienceRequest {
        name: AUDIENCE.into(),
        query: query.into(),
        replace,
        kept_current: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// What a watcher has seen: per subject, the customer ids in it; the key
/// of each id; and the last lsn whose write was complete.
#[derive(Default)]
struct Mirror {
    sets: BTreeMap<String, BTreeSet<u32>>,
    keys: HashMap<u32, String>,
    last: u64,
    /// Lsns of the writes seen, to check they rise.
    writes: u64,
    /// Writes in which one customer both left and entered a value of the
    /// lifecycle (a transition).
    transitions: u64,
    /// Changes of saved audiences seen.
    audience_changes: u64,
    /// Messages in the compact form seen.
    compact_messages: u64,
}

fn subject(c: &MembershipChange) -> String {
    if !c.audience.is_empty() {
        assert!(
            c.tag.is_empty() && c.field.is_empty(),
            "one subject a change"
        );
        format!("audience:{}", c.audience)
    } else if c.tag.is_empty() {
        format!("{}={}", c.field, c.value)
    } else {
        format!("tag:{}", c.tag)
    }
}

impl Mirror {
    /// Applies one message; panics on an event that cannot be true.
    fn apply(&mut self, m: &WatchResponse, current: &mut Option<u64>) {
        if !m.grouped.is_empty() {
            assert!(m.changes.is_empty(), "a compact message has groups only");
            self.compact_messages += 1;
            let as_changes = self.ungroup(m);
            return self.apply(&as_changes, current);
        }
        match *current {
            Some(lsn) => assert_eq!(m.lsn, lsn, "a write's messages share one lsn"),
            None => assert!(
                m.lsn >= self.last,
                "lsn {} after complete lsn {}",
                m.lsn,
                self.last
            ),
        }
        if !m.changes.is_empty() {
            assert!(
                current.is_some() || m.lsn > self.last,
                "write {} seen twice",
                m.lsn
            );
        }
        let mut lifecycle: HashMap<u32, (bool, bool)> = HashMap::new();
        let mut prev_id = 0;
        for c in &m.changes {
            let s = subject(c);
            self.audience_changes += u64::from(!c.audience.is_empty());
            match Kind::try_from(c.kind) {
                Ok(Kind::Entered) => {
                    assert!(c.customer_id >= prev_id, "ordered by customer");
                    prev_id = c.customer_id;
                    let fresh = self
                        .sets
                        .entry(s.clone())
                        .or_default()
                        .insert(c.customer_id);
                    assert!(fresh, "lsn {}: {} entered {s} again", m.lsn, c.customer_id);
                    if !c.customer_key.is_empty() {
                        self.keys.insert(c.customer_id, c.customer_key.clone());
                    }
                    if c.field == "life" {
                        lifecycle.entry(c.customer_id).or_default().1 = true;
                    }
                }
                Ok(Kind::Left) => {
                    assert!(c.customer_id >= prev_id, "ordered by customer");
                    prev_id = c.customer_id;
                    let was = self
                        .sets
                        .entry(s.clone())
                        .or_default()
                        .remove(&c.customer_id);
                    assert!(
                        was,
                        "lsn {}: {} left {s}, which it was not in",
                        m.lsn, c.customer_id
                    );
                    if c.field == "life" {
                        lifecycle.entry(c.customer_id).or_default().0 = true;
                    }
                }
                other => panic!("unexpected change kind {other:?}"),
            }
        }
        if lifecycle.values().any(|&(l, e)| l && e) {
            self.transitions += 1;
        }
        if m.write_complete {
            if !m.changes.is_empty() || current.is_some() {
                self.writes += 1;
            }
            self.last = m.lsn;
            *current = None;
        } else {
            *current = Some(m.lsn);
        }
    }

    /// A compact message as the same changes one by one (by customer, then
    /// subject, as the full form orders them), checking each group's ids
    /// ascend; the keys are learnt later ([`Self::learn_keys`]).
    fn ungroup(&self, m: &WatchResponse) -> WatchResponse {
        let mut changes = Vec::new();
        for (k, g) in m.grouped.iter().enumerate() {
            let named = [&g.tag, &g.field, &g.audience]
                .iter()
                .filter(|s| !s.is_empty())
                .count();
            assert_eq!(named, 1, "a group names one subject: {g:?}");
            assert!(!g.dropped, "nothing is dropped here");
            let entered = group_ids(&g.entered_bitmap, g.entered_count);
            let left = group_ids(&g.left_bitmap, g.left_count);
            assert!(
                !entered.is_empty() || !left.is_empty(),
                "a group has ids: {g:?}"
            );
            for (ids, kind) in [(&entered, Kind::Entered), (&left, Kind::Left)] {
                for &id in ids {
                    changes.push((
                        id,
                        k,
                        MembershipChange {
                            kind: kind as i32,
                            tag: g.tag.clone(),
                            field: g.field.clone(),
                            value: g.value.clone(),
                            audience: g.audience.clone(),
                            customer_id: id,
                            customer_key: String::new(),
                        },
                    ));
                }
            }
        }
        changes.sort_by_key(|(id, k, _)| (*id, *k));
        WatchResponse {
            changes: changes.into_iter().map(|(_, _, c)| c).collect(),
            grouped: Vec::new(),
            ..m.clone()
        }
    }

    /// Learns the keys of the live customers the mirror holds without one
    /// (a compact watch names none).
    async fn learn_keys(&mut self, c: &mut Client) {
        let keys: Vec<String> = common::export_set(c, "ALL").await.into_iter().collect();
        if keys.is_empty() {
            return;
        }
        let ids = c
            .resolve_customers(ResolveCustomersRequest {
                customers: keys.clone(),
                create_missing: false,
            })
            .await
            .unwrap()
            .into_inner()
            .ids;
        for (key, id) in keys.into_iter().zip(ids) {
            if let Ok(id) = u32::try_from(id) {
                self.keys.entry(id).or_insert(key);
            }
        }
    }

    /// The keys in each subject.
    fn by_key(&self) -> BTreeMap<String, BTreeSet<String>> {
        self.sets
            .iter()
            .map(|(s, ids)| {
                let keys = ids
                    .iter()
                    .map(|id| {
                        self.keys
                            .get(id)
                            .cloned()
                            .unwrap_or_else(|| format!("#{id}"))
                    })
                    .collect();
                (s.clone(), keys)
            })
            .filter(|(_, k): &(String, BTreeSet<String>)| !k.is_empty())
            .collect()
    }
}

async fn watch(
    c: &mut Client,
    after: Option<u64>,
) -> Result<Streaming<WatchResponse>, tonic::Status> {
    watch_as(c, after, false).await
}

/// A watch of everything `setup` made, in the full or the compact form.
async fn watch_as(
    c: &mut Client,
    after: Option<u64>,
    compact: bool,
) -> Result<Streaming<WatchResponse>, tonic::Status> {
    c.watch(WatchRequest {
        tags: TAGS
            .iter()
            .map(|t| t.to_string())
            .chain(["高价值用户".to_string()])
            .collect(),
        values: vec![
            WatchValue {
                field: "stage".into(),
                value: String::new(),
            },
            WatchValue {
                field: "life".into(),
                value: String::new(),
            },
        ],
        after_lsn: after,
        max_changes: 7,
        audiences: vec![AUDIENCE.into()],
        compact,
    })
    .await
    .map(|r| r.into_inner())
}

/// Reads until the mirror is complete up to `lsn`, or the stream ends (then
/// false).
async fn follow(s: &mut Streaming<WatchResponse>, m: &mut Mirror, lsn: u64) -> bool {
    let mut current = None;
    while m.last < lsn || current.is_some() {
        let next = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no message for 30 s; mirror at lsn {}, waiting for {lsn}",
                    m.last
                )
            });
        match next {
            Ok(Some(msg)) => m.apply(&msg, &mut current),
            Ok(None) | Err(_) => return false,
        }
    }
    true
}

async fn lsn(c: &mut Client) -> u64 {
    c.stats(StatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .lsn
}

/// The store as it is: every watched subject's members by key (the saved
/// audience's by its query `audience`, evaluated afresh).
async fn actual(c: &mut Client, audience: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    out.insert(
        format!("audience:{AUDIENCE}"),
        common::export_set(c, audience).await,
    );
    for t in TAGS.iter().chain(["高价值用户"].iter()) {
        out.insert(
            format!("tag:{t}"),
            common::export_set(c, &format!("\"{t}\"")).await,
        );
    }
    for v in STAGES {
        out.insert(
            format!("stage={v}"),
            common::export_set(c, &format!("stage = '{v}'")).await,
        );
    }
    for v in ["buyer", "browser"] {
        out.insert(
            format!("life={v}"),
            common::export_set(c, &format!("life = '{v}'")).await,
        );
    }
    out.retain(|_, v| !v.is_empty());
    out
}

async fn setup(c: &mut Client) {
    for t in TAGS {
        c.create_tag(CreateTagRequest {
            name: t.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    common::create_field(c, "stage", FieldKind::Enum, &STAGES).await;
    c.define_rule(DefineRuleRequest {
        name: "高价值用户".into(),
        query: "\"常购护肤品\" AND NOT \"尝试新品\"".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.define_rule(DefineRuleRequest {
        name: "life".into(),
        stages: vec![
            RuleStage {
                value: "buyer".into(),
                query: "\"常购护肤品\"".into(),
                ..Default::default()
            },
            RuleStage {
                value: "browser".into(),
                query: "\"社交活跃\" OR stage = 'new'".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    save_audience(c, AUDIENCE_QUERY, false).await;
}

/// `n` random writes: tag adds and removes, stage values, erasures.
async fn writes(c: &mut Client, rng: &mut StdRng, n: usize) {
    for _ in 0..n {
        let key = |rng: &mut StdRng| format!("c{}", rng.random_range(0..60));
        match rng.random_range(0..10) {
            0..=5 => {
                let mutations = (0..rng.random_range(1..4))
                    .map(|_| Mutation {
                        tag: TAGS[rng.random_range(0..TAGS.len())].into(),
                        add: (0..rng.random_range(1..6)).map(|_| key(rng)).collect(),
                        remove: (0..rng.random_range(0..4)).map(|_| key(rng)).collect(),
                        ..Default::default()
                    })
                    .collect();
                c.update(UpdateRequest {
                    mutations,
                    create_missing_tags: false,
                })
                .await
                .unwrap();
            }
            6..=8 => {
                let writes: Vec<ValueWrite> = (0..rng.random_range(1..5))
                    .map(|_| ValueWrite {
                        field: "stage".into(),
                        customer: key(rng),
                        value: Some(if rng.random_bool(0.2) {
                            Value::Clear(true)
                        } else {
                            Value::EnumValue(STAGES[rng.random_range(0..3)].into())
                        }),
                    })
                    .collect();
                // A customer not created yet cannot take a value: create
                // them first.
                let customers: Vec<String> = writes.iter().map(|v| v.customer.clone()).collect();
                c.resolve_customers(ResolveCustomersRequest {
                    customers,
                    create_missing: true,
                })
                .await
                .unwrap();
                c.set_values(SetValuesRequest { writes }).await.unwrap();
            }
            _ => {
                c.delete_customers(DeleteCustomersRequest {
                    customers: vec![key(rng)],
                })
                .await
                .unwrap();
            }
        }
    }
}

fn config(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("watch.toml");
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_of_the_feed_equals_the_store_across_reconnects_restarts_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let start = lsn(&mut c).await;
    setup(&mut c).await;
    let mut rng = StdRng::seed_from_u64(23);
    let mut mirror = Mirror::default();
    // From before the tags existed: the feed holds everything since.
    let mut s = watch(&mut c, Some(start))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut audience = AUDIENCE_QUERY;
    // Each watch after a disconnect in the other form: full after the
    // disconnects, compact after the clean restart and the kill -9.
    let mut compact = true;
    for round in 0..8 {
        writes(&mut c, &mut rng, 25).await;
        if round % 3 == 1 {
            c.checkpoint(CheckpointRequest::default()).await.unwrap();
        }
        if round == 4 {
            // Redefined: its members evaluated again, the difference in
            // the feed under one lsn.
            audience = AUDIENCE_QUERY_2;
            save_audience(&mut c, audience, true).await;
        }
        let at = lsn(&mut c).await;
        match round {
            // Caught up, then a disconnect and a resume.
            2 | 5 => {
                assert!(follow(&mut s, &mut mirror, at).await);
                drop(s);
                writes(&mut c, &mut rng, 10).await;
                compact = !compact;
                s = watch_as(&mut c, Some(mirror.last), compact).await.unwrap();
            }
            // Half-way through a stream, the server restarts cleanly.
            3 => {
                drop(s);
                server.stop().unwrap();
                server = common::start(dir.path(), &[]);
                c = common::client(&server).await;
                compact = !compact;
                s = watch_as(&mut c, Some(mirror.last), compact).await.unwrap();
            }
            // kill -9 with the watcher behind (what a power cut does to the
            // feed's unsynced tail is `feed_model`'s and `faults`' to show).
            6 => {
                drop(s);
                server.kill();
                server = common::start(dir.path(), &[]);
                c = common::client(&server).await;
                compact = !compact;
                s = watch_as(&mut c, Some(mirror.last), compact).await.unwrap();
            }
            _ => {}
        }
        let at = lsn(&mut c).await;
        assert!(
            follow(&mut s, &mut mirror, at).await,
            "round {round}: stream ended"
        );
        mirror.learn_keys(&mut c).await;
        assert_eq!(
            mirror.by_key(),
            actual(&mut c, audience).await,
            "round {round}"
        );
    }
    assert!(mirror.writes > 100, "{} writes seen", mirror.writes);
    assert!(mirror.transitions > 0, "no lifecycle transition seen");
    assert!(
        mirror.compact_messages > 20,
        "{} compact messages",
        mirror.compact_messages
    );
    assert!(
        mirror.audience_changes > 50,
        "{} audience changes seen",
        mirror.audience_changes
    );
    server.stop().unwrap();
}

/// The next message with changes (progress messages passed over).
async fn next_changes(s: &mut Streaming<WatchResponse>) -> WatchResponse {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .expect("a message within 30 s")
            .unwrap()
            .expect("the stream goes on");
        if !m.changes.is_empty() {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_audience_is_watched_by_name_while_it_is_kept_current() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let by_name = |tags: Vec<String>, audiences: &[&str]| WatchRequest {
        tags,
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    // An audience that is not kept has no changes in the feed.
    c.create_audience(CreateAudienceRequest {
        name: "plain".into(),
        query: "t3".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = c.watch(by_name(vec![], &["plain"])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("kept_current"), "{e}");
    let e = c.watch(by_name(vec![], &["nobody"])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = c
        .watch(by_name(vec![AUDIENCE.into()], &[AUDIENCE]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // The rule that keeps it is the audience's own.
    let e = c
        .define_rule(DefineRuleRequest {
            name: AUDIENCE.into(),
            query: "t3".into(),
            replace: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    for e in [
        c.drop_rule(DropRuleRequest {
            name: AUDIENCE.into(),
        })
        .await
        .unwrap_err(),
        c.drop_tag(DropTagRequest {
            name: AUDIENCE.into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("CreateAudience"), "{e}");
    }
    // A query a rule cannot keep is refused, saying why, and nothing is
    // saved.
    let e = c
        .create_audience(CreateAudienceRequest {
            name: "frozen".into(),
            query: "t3 AND NOT SNAPSHOT 1".into(),
            kept_current: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::InvalidArgument | Code::NotFound),
        "{e}"
    );
    // Watched: a customer entering, then the audience no longer kept.
    let mut s = c
        .watch(by_name(vec!["t3".into()], &[AUDIENCE]))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(first.changes.is_empty());
    common::add_to_tag(&mut c, "社交活跃", &["ada"]).await;
    let m = next_changes(&mut s).await;
    assert_eq!(m.changes.len(), 1, "{m:?}");
    let ch = &m.changes[0];
    assert_eq!(
        (
            ch.kind(),
            ch.audience.as_str(),
            ch.tag.as_str(),
            ch.customer_key.as_str()
        ),
        (Kind::Entered, AUDIENCE, "", "ada")
    );
    let listed = |c: &mut Client| {
        let mut c = c.clone();
        async move {
            c.list_audiences(ListAudiencesRequest {
                counts: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .audiences
            .into_iter()
            .map(|a| (a.name, a.kept_current, a.count))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        listed(&mut c).await,
        vec![
            ("plain".to_string(), false, 0),
            (AUDIENCE.to_string(), true, 1)
        ]
    );
    c.create_audience(CreateAudienceRequest {
        name: AUDIENCE.into(),
        query: AUDIENCE_QUERY.into(),
        replace: true,
        kept_current: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let m = next_changes(&mut s).await;
    assert_eq!(m.changes.len(), 1, "{m:?}");
    assert_eq!(
        (m.changes[0].kind(), m.changes[0].audience.as_str()),
        (Kind::Dropped, AUDIENCE)
    );
    // Still an audience, evaluated when used; its tag is gone.
    assert_eq!(common::count(&mut c, AUDIENCE).await, 1);
    assert_eq!(
        listed(&mut c).await,
        vec![
            ("plain".to_string(), false, 0),
            (AUDIENCE.to_string(), false, 1)
        ]
    );
    let e = c.watch(by_name(vec![], &[AUDIENCE])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // The stream goes on with the tag it also watches.
    common::add_to_tag(&mut c, "t3", &["bo"]).await;
    let m = next_changes(&mut s).await;
    assert_eq!(m.changes.len(), 1, "{m:?}");
    assert_eq!(m.changes[0].tag, "t3");
    // Kept again, then dropped: its rule and tag go with it.
    save_audience(&mut c, AUDIENCE_QUERY, true).await;
    let m = next_changes(&mut s).await;
    assert_eq!(
        m.changes
            .iter()
            .map(|c| (c.kind(), c.audience.as_str(), c.customer_key.as_str()))
            .collect::<Vec<_>>(),
        vec![(Kind::Entered, AUDIENCE, "ada")],
        "keeping it again lists its members"
    );
    c.drop_audience(DropAudienceRequest {
        name: AUDIENCE.into(),
    })
    .await
    .unwrap();
    let m = next_changes(&mut s).await;
    assert_eq!(m.changes[0].kind(), Kind::Dropped);
    let rules = c
        .list_rules(ListRulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        rules.rules.iter().all(|r| r.name != AUDIENCE),
        "the rule went with the audience"
    );
    let e = c
        .describe_tag(DescribeTagRequest {
            name: AUDIENCE.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_does_not_read_holds_up_no_writer() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let mut s = watch(&mut c, None).await.unwrap();
    // And one in the compact form, reading nothing either.
    let mut compact = watch_as(&mut c, None, true).await.unwrap();
    // Many writes, each a change, while the watchers read nothing.
    let mut rng = StdRng::seed_from_u64(7);
    let mut w = common::client(&server).await;
    let started = std::time::Instant::now();
    for i in 0..400 {
        w.update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "t3".into(),
                add: vec![format!("k{i}")],
                remove: vec![format!("k{}", rng.random_range(0..i + 1))],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(60));
    let at = lsn(&mut c).await;
    let mut mirror = Mirror::default();
    let first = s.message().await.unwrap().unwrap();
    assert!(
        first.changes.is_empty() && first.write_complete,
        "a progress message first"
    );
    mirror.last = first.lsn;
    assert!(follow(&mut s, &mut mirror, at).await);
    assert_eq!(mirror.by_key(), actual(&mut c, AUDIENCE_QUERY).await);
    assert!(mirror.writes >= 200, "{}", mirror.writes);
    // The compact watcher gets the same, once it reads.
    let mut other = Mirror::default();
    let first = compact.message().await.unwrap().unwrap();
    other.last = first.lsn;
    assert!(follow(&mut compact, &mut other, at).await);
    other.learn_keys(&mut c).await;
    assert_eq!(other.by_key(), mirror.by_key());
    assert!(other.compact_messages >= 200, "{}", other.compact_messages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_past_the_retention_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "feed_retention_mb = 1\nfeed_file_mb = 1\n");
    let data = dir.path().join("data");
    let server = common::start(&data, &["--config", &cfg]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let start = lsn(&mut c).await;
    let mut s = watch(&mut c, Some(start)).await.unwrap();
    // Scattered ids: about 40 KB of feed a write, until the first file goes.
    let mut rng = StdRng::seed_from_u64(1);
    let keys: Vec<String> = (0..300_000).map(|i| format!("x{i}")).collect();
    c.resolve_customers(ResolveCustomersRequest {
        customers: keys.clone(),
        create_missing: true,
    })
    .await
    .unwrap();
    for _ in 0..80 {
        let some: Vec<String> = (0..20_000)
            .map(|_| keys[rng.random_range(0..keys.len())].clone())
            .collect();
        for (add, remove) in [(some.clone(), vec![]), (vec![], some)] {
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag: "t3".into(),
                    add,
                    remove,
                    ..Default::default()
                }],
                create_missing_tags: false,
            })
            .await
            .unwrap();
        }
    }
    assert!(
        common::files_with(&data, ".log")
            .iter()
            .filter(|p| p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("feed-"))
            .count()
            <= 3,
        "the retention keeps about 1 MiB"
    );
    let err = watch(&mut c, Some(start)).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("resynchronise"), "{err}");
    // The watcher that never read is told the same once it reads past what
    // is gone.
    let mut ended = None;
    while ended.is_none() {
        match s.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => ended = Some(e),
        }
    }
    assert_eq!(ended.unwrap().code(), Code::OutOfRange);
    // From now works.
    let now = lsn(&mut c).await;
    let mut s = watch(&mut c, Some(now)).await.unwrap();
    let m = s.message().await.unwrap().unwrap();
    assert_eq!(m.lsn, now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_watches_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    common::create_field(&mut c, "spend", FieldKind::Integer, &[]).await;
    let req = |tags: &[&str], values: &[(&str, &str)], after: Option<u64>| WatchRequest {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        values: values
            .iter()
            .map(|(f, v)| WatchValue {
                field: f.to_string(),
                value: v.to_string(),
            })
            .collect(),
        after_lsn: after,
        max_changes: 0,
        audiences: Vec::new(),
        compact: false,
    };
    let status = |r: Result<tonic::Response<Streaming<WatchResponse>>, tonic::Status>| {
        r.map(|_| ()).unwrap_err()
    };
    let e = status(c.watch(req(&[], &[], None)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = status(c.watch(req(&["nope"], &[], None)).await);
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert!(e.message().contains("nope"));
    let e = status(c.watch(req(&[], &[("spend", "")], None)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("enumerated"), "{e}");
    let e = status(c.watch(req(&[], &[("stage", "gold")], None)).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("new, active, loyal"), "{e}");
    let e = status(c.watch(req(&[], &[("nofield", "")], None)).await);
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let ahead = lsn(&mut c).await + 1000;
    let e = status(c.watch(req(&["t3"], &[], Some(ahead))).await);
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    let mut r = req(&["t3"], &[], None);
    r.max_changes = 10_001;
    assert_eq!(code(c.watch(r).await.map(|_| ())), Code::InvalidArgument);
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        code(c.watch(req(&refs, &[], None)).await.map(|_| ())),
        Code::InvalidArgument
    );
    // Audiences count toward the same 1,000 names.
    let mut r = req(&refs[..999], &[], None);
    r.audiences = vec![AUDIENCE.into(), "another".into()];
    let e = status(c.watch(r).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("1001 given"), "{e}");
    // A 20 KB name: NOT_FOUND, with the name cut in the message.
    let long = "长".repeat(7_000);
    let e = status(c.watch(req(&[long.as_str()], &[], None)).await);
    assert_eq!(e.code(), Code::NotFound, "{}", e.code());
    assert!(e.message().len() < 2_000, "{} bytes", e.message().len());
    server.stop().unwrap();

    // At most `max_concurrent_watches` at once; one ends, another may start.
    let cfg = config(dir.path(), "[limits]\nmax_concurrent_watches = 2\n");
    let mut server = common::start(dir.path(), &["--config", &cfg]);
    let mut c = common::client(&server).await;
    // `a` is cancelled half-way through a write's messages (compact, one
    // id a message).
    let before = lsn(&mut c).await;
    common::add_to_tag(
        &mut c,
        "t3",
        &(0..50)
            .map(|i| format!("half{i}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let mut a = c
        .watch(WatchRequest {
            tags: vec!["t3".into()],
            after_lsn: Some(before),
            max_changes: 1,
            compact: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut halfway = 0;
    while halfway < 3 {
        let m = a.message().await.unwrap().unwrap();
        if !m.grouped.is_empty() {
            assert!(!m.write_complete, "50 ids in messages of 1");
            halfway += 1;
        }
    }
    let _b = c.watch(req(&["t3"], &[], None)).await.unwrap();
    let e = status(c.watch(req(&["t3"], &[], None)).await);
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_concurrent_watches"), "{e}");
    drop(a);
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if c.watch(req(&["t3"], &[], None)).await.is_ok() {
            freed = true;
            break;
        }
    }
    assert!(freed, "a watch that ended did not give its place back");
    server.stop().unwrap();

    // Without a feed.
    let cfg = config(dir.path(), "feed_retention_mb = 0\n");
    let server = common::start(dir.path(), &["--config", &cfg]);
    let mut c = common::client(&server).await;
    let e = status(c.watch(req(&["t3"], &[], None)).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_open_watches_and_they_resume_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let mut s = watch(&mut c, None).await.unwrap();
    let mut mirror = Mirror::default();
    let first = s.message().await.unwrap().unwrap();
    mirror.last = first.lsn;
    let mut rng = StdRng::seed_from_u64(3);
    writes(&mut c, &mut rng, 20).await;
    let at = lsn(&mut c).await;
    assert!(follow(&mut s, &mut mirror, at).await);
    // The watch is open and idle: the server still stops, and says why.
    let stopping = std::thread::spawn(move || {
        let status = server.stop();
        (server, status)
    });
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.message().await {
                Ok(Some(m)) => assert!(m.changes.is_empty()),
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("the watch did not end at shutdown");
    if let Some(e) = end {
        assert_eq!(e.code(), Code::Unavailable, "{e}");
    }
    let (_, status) = stopping.join().unwrap();
    assert!(status.unwrap().success());
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    writes(&mut c, &mut rng, 20).await;
    let mut s = watch(&mut c, Some(mirror.last)).await.unwrap();
    let at = lsn(&mut c).await;
    assert!(follow(&mut s, &mut mirror, at).await);
    assert_eq!(mirror.by_key(), actual(&mut c, AUDIENCE_QUERY).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_many_changes_comes_whole_in_order_in_several_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let keys: Vec<String> = (0..200_000).map(|i| format!("m{i}")).collect();
    c.resolve_customers(ResolveCustomersRequest {
        customers: keys.clone(),
        create_missing: true,
    })
    .await
    .unwrap();
    let before = lsn(&mut c).await;
    // One write: 60,000 customers spread over ids far apart enter one tag,
    // 5,000 of them enter another.
    let mut rng = StdRng::seed_from_u64(9);
    let mut picked: Vec<String> = keys.clone();
    for i in (1..picked.len()).rev() {
        picked.swap(i, rng.random_range(0..=i));
    }
    picked.truncate(60_000);
    c.update(UpdateRequest {
        mutations: vec![
            Mutation {
                tag: "t3".into(),
                add: picked.clone(),
                ..Default::default()
            },
            Mutation {
                tag: "社交活跃".into(),
                add: picked[..5_000].to_vec(),
                ..Default::default()
            },
        ],
        create_missing_tags: false,
    })
    .await
    .unwrap();
    let mut s = c
        .watch(WatchRequest {
            tags: vec!["t3".into(), "社交活跃".into()],
            values: Vec::new(),
            after_lsn: Some(before),
            max_changes: 10_000,
            audiences: Vec::new(),
            compact: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<(u32, String)> = Vec::new();
    let mut messages = 0;
    loop {
        let m = s.message().await.unwrap().unwrap();
        if m.changes.is_empty() && m.lsn == before {
            continue;
        }
        assert!(m.changes.len() <= 10_000);
        messages += 1;
        for ch in &m.changes {
            assert_eq!(Kind::try_from(ch.kind).unwrap(), Kind::Entered);
            seen.push((ch.customer_id, ch.tag.clone()));
        }
        if m.write_complete {
            break;
        }
    }
    assert!(messages >= 7, "{messages} messages");
    assert_eq!(seen.len(), 65_000);
    assert!(
        seen.windows(2)
            .all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)),
        "ordered by customer, each change once"
    );
    let t3: std::collections::BTreeSet<u32> =
        seen.iter().filter(|x| x.1 == "t3").map(|x| x.0).collect();
    assert_eq!(t3.len(), 60_000);

    // The same write in the compact form: the same customers, by tag, in
    // messages of at most 10,000 ids, each tag's ids ascending and each
    // message naming a tag once.
    let mut s = c
        .watch(WatchRequest {
            tags: vec!["t3".into(), "社交活跃".into()],
            after_lsn: Some(before),
            max_changes: 10_000,
            compact: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut by_tag: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut messages = 0;
    loop {
        let m = s.message().await.unwrap().unwrap();
        if m.grouped.is_empty() && m.lsn == before {
            continue;
        }
        assert!(m.changes.is_empty());
        let ids: usize = m
            .grouped
            .iter()
            .map(|g| (g.entered_count + g.left_count) as usize)
            .sum();
        assert!(ids <= 10_000 && ids > 0, "{ids} ids in a message");
        let tags: BTreeSet<&str> = m.grouped.iter().map(|g| g.tag.as_str()).collect();
        assert_eq!(tags.len(), m.grouped.len(), "a tag once a message");
        messages += 1;
        for g in &m.grouped {
            assert!(g.left_bitmap.is_empty() && g.left_count == 0 && !g.dropped);
            by_tag
                .entry(g.tag.clone())
                .or_default()
                .extend(group_ids(&g.entered_bitmap, g.entered_count));
        }
        if m.write_complete {
            break;
        }
    }
    assert_eq!(messages, 7, "65,000 ids in messages of 10,000");
    let mut full: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (id, tag) in seen {
        full.entry(tag).or_default().push(id);
    }
    for ids in full.values_mut() {
        ids.sort_unstable();
    }
    assert_eq!(by_tag, full, "ascending ids, each once, as the full form");
}

/// A compact group's ids: its bitmap read as any Roaring library reads the
/// portable format, holding as many ids as the group says.
fn group_ids(bytes: &[u8], count: u32) -> Vec<u32> {
    let ids: Vec<u32> = if bytes.is_empty() {
        Vec::new()
    } else {
        roaring::RoaringBitmap::deserialize_from(bytes)
            .expect("a portable Roaring bitmap")
            .iter()
            .collect()
    };
    assert_eq!(
        ids.len(),
        count as usize,
        "the count says what the bitmap holds"
    );
    ids
}

/// What one compact watcher read of a run of writes: per message, its
/// groups as (subject, entered ids, left ids), with the message's lsn.
async fn read_compact(
    s: &mut Streaming<WatchResponse>,
    before: u64,
    writes: usize,
    max: usize,
) -> Vec<(u64, Vec<(String, Vec<u32>, Vec<u32>)>)> {
    let mut out = Vec::new();
    let mut complete = 0;
    while complete < writes {
        let m = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .expect("the writes come")
            .unwrap()
            .unwrap();
        if m.grouped.is_empty() {
            assert!(m.lsn == before || m.at_ms == 0, "only progress is empty");
            continue;
        }
        let mut groups = Vec::new();
        let mut ids = 0;
        for g in &m.grouped {
            let entered = group_ids(&g.entered_bitmap, g.entered_count);
            let left = group_ids(&g.left_bitmap, g.left_count);
            ids += entered.len() + left.len();
            groups.push((g.tag.clone(), entered, left));
        }
        assert!(ids <= max, "{ids} ids in a message of at most {max}");
        out.push((m.lsn, groups));
        if m.write_complete {
            complete += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_watchers_of_the_same_writes_each_get_pieces_of_their_own_size() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    let keys: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
    let ids = c
        .resolve_customers(ResolveCustomersRequest {
            customers: keys.clone(),
            create_missing: true,
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    let before = lsn(&mut c).await;
    // Write 1: 25 enter t3, 3 of them enter 社交活跃. Write 2: 7 of them
    // leave t3 and 5 more enter it.
    let update = |tag: &str, add: &[String], remove: &[String]| Mutation {
        tag: tag.into(),
        add: add.to_vec(),
        remove: remove.to_vec(),
        ..Default::default()
    };
    for mutations in [
        vec![
            update("t3", &keys[..25], &[]),
            update("社交活跃", &keys[..3], &[]),
        ],
        vec![update("t3", &keys[25..30], &keys[..7])],
    ] {
        c.update(UpdateRequest {
            mutations,
            create_missing_tags: false,
        })
        .await
        .unwrap();
    }
    // Three watchers of those writes at once: two alike (pieces of 10) and
    // one with pieces of 1,000 and another tag.
    let mut streams = Vec::new();
    for (tags, max) in [
        (vec!["t3"], 10u32),
        (vec!["t3", "社交活跃"], 1000),
        (vec!["t3"], 10),
    ] {
        let s = c
            .watch(WatchRequest {
                tags: tags.into_iter().map(String::from).collect(),
                after_lsn: Some(before),
                max_changes: max,
                compact: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        streams.push((s, max as usize));
    }
    let mut read = Vec::new();
    for (s, max) in &mut streams {
        read.push(read_compact(s, before, 2, *max).await);
    }
    let id = |k: usize| u32::try_from(ids[k]).unwrap();
    let range = |r: std::ops::Range<usize>| -> Vec<u32> {
        let mut v: Vec<u32> = r.map(id).collect();
        v.sort_unstable();
        v
    };
    let entered_1 = range(0..25);
    let entered_2 = range(25..30);
    let left_2 = range(0..7);
    // Pieces of 10: the first 10 ids, the next 10, the last 5; then the 5
    // entered and the 7 left, which do not fit in one message together.
    let small = |lsn1: u64, lsn2: u64| {
        vec![
            (
                lsn1,
                vec![("t3".to_string(), entered_1[..10].to_vec(), vec![])],
            ),
            (
                lsn1,
                vec![("t3".to_string(), entered_1[10..20].to_vec(), vec![])],
            ),
            (
                lsn1,
                vec![("t3".to_string(), entered_1[20..].to_vec(), vec![])],
            ),
            (lsn2, vec![("t3".to_string(), entered_2.clone(), vec![])]),
            (lsn2, vec![("t3".to_string(), vec![], left_2.clone())]),
        ]
    };
    let (lsn1, lsn2) = (read[0][0].0, read[0][4].0);
    assert!(before < lsn1 && lsn1 < lsn2);
    assert_eq!(read[0], small(lsn1, lsn2));
    assert_eq!(read[2], small(lsn1, lsn2));
    // Pieces of 1,000: each write in one message, the entered and left ids
    // of t3 in one group.
    assert_eq!(read[1].len(), 2, "{:?}", read[1]);
    let mut first = read[1][0].1.clone();
    first.sort();
    assert_eq!(
        first,
        vec![
            ("t3".to_string(), entered_1.clone(), vec![]),
            ("社交活跃".to_string(), range(0..3), vec![]),
        ]
    );
    assert_eq!(
        read[1][1],
        (lsn2, vec![("t3".to_string(), entered_2, left_2)])
    );
    // The two alike shared their pieces: 5 pieces of 10 built once for
    // both, 4 pieces of 1,000 (t3 and 社交活跃, then t3's entered and left).
    let text = common::http(
        server.metrics_addr.as_deref().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let built = common::sample(&text, "tagstore_watch_pieces_built_total");
    let sent = common::sample(&text, "tagstore_watch_pieces_sent_total");
    assert_eq!((built, sent), (9.0, 14.0), "built and sent");
}
