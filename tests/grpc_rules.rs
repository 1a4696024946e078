//! Rule tags and lifecycles against the real server binary (#21): the
//! seed's four tags and a lifecycle defined as rules; writes move customers
//! in and out in the same write; rule tags are listed with their queries
//! and shown in profiles; writing one, dropping what a rule reads, a cycle
//! and a snapshot in a rule are refused with the status and the reason;
//! a redefinition re-evaluates everyone; everything survives kill -9 and
//! a restart; and a reader never sees a write without its rule's answer.

mod common;

use common::{Client, code, count};
use tagstore::proto::value_write::Value;
use tagstore::proto::*;
use tonic::Code;

async fn field(c: &mut Client, name: &str, kind: FieldKind) {
    common::create_field(c, name, kind, &[]).await;
}

async fn values(c: &mut Client, writes: &[(&str, &str, Value)]) {
    c.set_values(SetValuesRequest {
        writes: writes
            .iter()
            .map(|(customer, field, v)| ValueWrite {
                field: field.to_string(),
                customer: customer.to_string(),
                value: Some(v.clone()),
            })
            .collect(),
    })
    .await
    .unwrap_or_else(|e| panic!("set values: {e}"));
}

async fn define(
    c: &mut Client,
    name: &str,
    query: &str,
) -> Result<DefineRuleResponse, tonic::Status> {
    c.define_rule(DefineRuleRequest {
        name: name.into(),
        query: query.into(),
        description: format!("rule {name}"),
        category: "rules".into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

fn today_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const DAY_MS: i64 = 86_400_000;

/// Facts of four customers, the seed's rules, and a lifecycle.
async fn setup(c: &mut Client) {
    field(c, "total_spend_fen", FieldKind::Integer).await;
    field(c, "order_count", FieldKind::Integer).await;
    field(c, "last_order_day", FieldKind::Integer).await;
    field(c, "bought_skincare", FieldKind::Behaviour).await;
    field(c, "interacted_douyin", FieldKind::Behaviour).await;
    field(c, "viewed_new_arrivals", FieldKind::Behaviour).await;
    let now = today_ms();
    let day = |d: i64| Value::EventAtMs(now - d * DAY_MS);
    let mut writes = vec![
        ("ann", "total_spend_fen", Value::IntValue(620_000)),
        ("ann", "order_count", Value::IntValue(7)),
        ("bo", "total_spend_fen", Value::IntValue(90_000)),
        ("bo", "order_count", Value::IntValue(2)),
        ("cy", "viewed_new_arrivals", day(2)),
        ("dee", "order_count", Value::IntValue(1)),
    ];
    for d in [1, 10, 40] {
        writes.push(("ann", "bought_skincare", day(d)));
    }
    for d in 0..5 {
        writes.push(("cy", "interacted_douyin", day(d)));
    }
    values(c, &writes).await;
    for (name, query) in [
        ("高价值用户", "total_spend_fen >= 500000"),
        ("常购护肤品", "COUNT(bought_skincare WITHIN 90d) >= 3"),
        ("社交活跃", "COUNT(interacted_douyin WITHIN 30d) >= 5"),
        ("尝试新品", "viewed_new_arrivals WITHIN 7d"),
        (
            "潜在流失",
            "last_order_day < TODAY - 90 AND order_count >= 2",
        ),
    ] {
        let r = define(c, name, query)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.created);
        assert_eq!(r.rule.unwrap().query, query);
    }
    c.define_rule(DefineRuleRequest {
        name: "lifecycle".into(),
        stages: [
            ("prospect", "order_count IS NULL"),
            ("new", "order_count = 1"),
            ("loyal", "order_count >= 5 AND NOT 潜在流失"),
            ("churned", "潜在流失"),
            ("active", "ALL"),
        ]
        .iter()
        .map(|(v, q)| RuleStage {
            value: v.to_string(),
            query: q.to_string(),
            member_count: 0,
        })
        .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// What the store must answer after `setup`.
async fn check(c: &mut Client) {
    assert_eq!(count(c, "高价值用户").await, 1);
    assert_eq!(count(c, "常购护肤品").await, 1);
    assert_eq!(count(c, "社交活跃").await, 1);
    assert_eq!(count(c, "尝试新品").await, 1);
    assert_eq!(count(c, "潜在流失").await, 0);
    assert_eq!(count(c, "lifecycle = loyal").await, 1);
    assert_eq!(count(c, "lifecycle = prospect").await, 1);
    assert_eq!(count(c, "lifecycle = new").await, 1);
    assert_eq!(count(c, "lifecycle = active").await, 1);
    let p = common::profile(c, "ann").await;
    assert_eq!(p.rule_tags, ["常购护肤品", "高价值用户"]);
    let tags = c
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tags;
    let t = tags.iter().find(|t| t.name == "高价值用户").unwrap();
    assert_eq!(t.rule, "total_spend_fen >= 500000");
    let page = c
        .list_rules(ListRulesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!page.more);
    assert_eq!(page.total, 6);
    // A page of two, then the rest.
    let first = c
        .list_rules(ListRulesRequest {
            after: String::new(),
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.more);
    let rest = c
        .list_rules(ListRulesRequest {
            after: first.rules[1].name.clone(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!rest.more);
    assert_eq!(first.rules.len() + rest.rules.len(), 6);
    assert_eq!(rest.rules[0].name, "常购护肤品");
    let rules = page.rules;
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lifecycle",
            "尝试新品",
            "常购护肤品",
            "潜在流失",
            "社交活跃",
            "高价值用户"
        ]
    );
    let life = &rules[0];
    assert_eq!(life.kind, "lifecycle");
    assert_eq!(
        life.stages
            .iter()
            .map(|s| s.member_count)
            .collect::<Vec<_>>(),
        [1, 1, 1, 0, 1]
    );
    assert_eq!(life.reads, ["order_count", "潜在流失"]);
    assert!(rules.iter().all(|r| r.stale.is_empty()));
    let fields = c
        .list_fields(ListFieldsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .fields;
    let f = fields.iter().find(|f| f.name == "lifecycle").unwrap();
    assert_eq!(f.values, ["prospect", "new", "loyal", "churned", "active"]);
    assert_eq!(f.stages.len(), 5);
}

#[tokio::test]
async fn rules_follow_writes_refuse_what_would_break_them_and_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    setup(&mut c).await;
    check(&mut c).await;

    // Writes move customers in and out in the same write.
    values(&mut c, &[("bo", "total_spend_fen", Value::IntAdd(450_000))]).await;
    assert_eq!(count(&mut c, "高价值用户").await, 2);
    let old = (today_ms() - 120 * DAY_MS) / DAY_MS;
    values(&mut c, &[("bo", "last_order_day", Value::IntValue(old))]).await;
    assert_eq!(count(&mut c, "潜在流失").await, 1);
    assert_eq!(
        count(&mut c, "lifecycle = churned").await,
        1,
        "a lifecycle reads a rule tag"
    );
    values(
        &mut c,
        &[
            ("bo", "total_spend_fen", Value::Clear(true)),
            ("bo", "last_order_day", Value::Clear(true)),
        ],
    )
    .await;
    assert_eq!(count(&mut c, "高价值用户 OR 潜在流失").await, 1);
    assert_eq!(count(&mut c, "lifecycle = active").await, 1);
    values(
        &mut c,
        &[("bo", "total_spend_fen", Value::IntValue(90_000))],
    )
    .await;

    // What would break a rule is refused, with the reason.
    let e = c
        .update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "高价值用户".into(),
                add: vec!["dee".into()],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("rule tag"), "{}", e.message());
    let e = c
        .set_values(SetValuesRequest {
            writes: vec![ValueWrite {
                field: "lifecycle".into(),
                customer: "dee".into(),
                value: Some(Value::EnumValue("loyal".into())),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .drop_field(DropFieldRequest {
            name: "total_spend_fen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("高价值用户"), "{}", e.message());
    let e = c
        .drop_rule(DropRuleRequest {
            name: "潜在流失".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "the lifecycle reads it");
    // A cycle, through another rule.
    define(&mut c, "a", "高价值用户").await.unwrap();
    define(&mut c, "b", "a OR 尝试新品").await.unwrap();
    let e = c
        .define_rule(DefineRuleRequest {
            name: "a".into(),
            query: "b AND 高价值用户".into(),
            replace: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("a → b → a"), "{}", e.message());
    assert_eq!(
        code(define(&mut c, "s", "SNAPSHOT 1").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(define(&mut c, "w", "bought_skincare WITHIN 500d").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(define(&mut c, "u", "nothing_here >= 1").await),
        Code::NotFound
    );
    assert_eq!(
        code(define(&mut c, "高价值用户", "ALL").await),
        Code::FailedPrecondition
    );
    // The limits: a query of 16 KiB, 32 KiB of queries in all, 64 stages.
    let long = format!("ALL{}", " OR ALL".repeat(16 * 1024 / 7 + 1));
    assert!(long.len() > 16 * 1024);
    assert_eq!(
        code(define(&mut c, "long", &long).await),
        Code::InvalidArgument
    );
    let stage = |v: &str, q: &str| RuleStage {
        value: v.into(),
        query: q.into(),
        member_count: 0,
    };
    let near = format!("ALL{}", " OR ALL".repeat(15 * 1024 / 7));
    let e = c
        .define_rule(DefineRuleRequest {
            name: "wide".into(),
            stages: vec![stage("a", &near), stage("b", &near), stage("c", &near)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("in all"), "{}", e.message());
    let many = (0..65).map(|i| stage(&format!("s{i}"), "ALL")).collect();
    assert_eq!(
        code(
            c.define_rule(DefineRuleRequest {
                name: "many".into(),
                stages: many,
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(define(&mut c, "total_spend_fen", "ALL").await),
        Code::AlreadyExists
    );
    c.drop_rule(DropRuleRequest { name: "b".into() })
        .await
        .unwrap();
    c.drop_rule(DropRuleRequest { name: "a".into() })
        .await
        .unwrap();
    assert_eq!(
        code(c.drop_rule(DropRuleRequest { name: "a".into() }).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.describe_tag(DescribeTagRequest { name: "a".into() })
                .await
        ),
        Code::NotFound,
        "the rule's tag went with it"
    );
    let turned = c
        .turn_rule_days(TurnRuleDaysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(turned.rules_turned, 0, "every rule is on today");

    // A redefinition re-evaluates everyone, atomically.
    let r = c
        .define_rule(DefineRuleRequest {
            name: "高价值用户".into(),
            query: "total_spend_fen >= 50000".into(),
            replace: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    let info = r.rule.unwrap();
    assert_eq!(info.member_count, 2);
    assert_eq!(
        info.description, "rule 高价值用户",
        "a redefinition keeps the description"
    );
    c.define_rule(DefineRuleRequest {
        name: "高价值用户".into(),
        query: "total_spend_fen >= 500000".into(),
        replace: true,
        ..Default::default()
    })
    .await
    .unwrap();
    check(&mut c).await;

    // Kill -9, then a checkpoint and a clean restart.
    server.kill();
    let server2 = common::start(dir.path(), &[]);
    let mut c = common::client(&server2).await;
    check(&mut c).await;
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    drop(c);
    drop(server2);
    let server3 = common::start(dir.path(), &[]);
    let mut c = common::client(&server3).await;
    check(&mut c).await;
    values(
        &mut c,
        &[("dee", "total_spend_fen", Value::IntValue(700_000))],
    )
    .await;
    assert_eq!(count(&mut c, "高价值用户").await, 2);
}

/// A reader never sees a write without its rule's answer: while a writer
/// moves spend across the threshold, no count ever finds a customer whose
/// rule tag and fact disagree.
#[tokio::test]
async fn readers_never_see_facts_and_rule_tags_disagree() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    field(&mut c, "total_spend_fen", FieldKind::Integer).await;
    define(&mut c, "高价值用户", "total_spend_fen >= 500000")
        .await
        .unwrap();
    let mut writer = common::client(&server).await;
    let writes = tokio::spawn(async move {
        for i in 0..300i64 {
            let batch: Vec<ValueWrite> = (0..20)
                .map(|k| ValueWrite {
                    field: "total_spend_fen".into(),
                    customer: format!("c{k}"),
                    value: Some(Value::IntValue(if (i + k) % 2 == 0 {
                        600_000
                    } else {
                        1_000
                    })),
                })
                .collect();
            writer
                .set_values(SetValuesRequest { writes: batch })
                .await
                .unwrap();
        }
    });
    let mut reads = 0;
    while !writes.is_finished() {
        let disagree = count(
            &mut c,
            "(高价值用户 AND NOT total_spend_fen >= 500000) OR (total_spend_fen >= 500000 AND NOT 高价值用户)",
        )
        .await;
        assert_eq!(disagree, 0, "after {reads} reads");
        reads += 1;
    }
    writes.await.unwrap();
    assert!(
        reads > 10,
        "the reader ran alongside the writes ({reads} reads)"
    );
    assert_eq!(count(&mut c, "高价值用户").await, 10);
}

/// One event as a JSON line of the `events` source (common's
/// PIN_PHONE_CARD_SOURCE).
fn event_line(id: &str, ids: &[(&str, &str)]) -> String {
    let mut s = format!(
        "{{\"id\":\"{id}\",\"type\":\"view\",\"ch\":\"jd\",\"ts\":{},\"fen\":0,\"cat\":\"skincare\"",
        today_ms() - DAY_MS
    );
    for (col, v) in ids {
        s.push_str(&format!(",\"{col}\":\"{v}\""));
    }
    s.push_str("}\n");
    s
}

/// Merges and unmerges keep rules exact: a merge sums two customers'
/// points past a rule's threshold (and moves a rule tag's membership with
/// the absorbed customer, which the rule then decides); undoing it gives
/// each customer back its own, and the rules follow.
#[tokio::test]
async fn rules_follow_merges_and_unmerges() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    common::events_source_and_points(&mut c).await;
    define(&mut c, "rich", "points >= 100").await.unwrap();
    define(&mut c, "poor", "points < 100 AND NOT rich")
        .await
        .unwrap();
    common::ingest_batch(&mut c, "events", &event_line("e1", &[("pin", "ann")])).await;
    common::ingest_batch(
        &mut c,
        "events",
        &event_line("e2", &[("phone", "13900001111")]),
    )
    .await;
    for (who, points) in [("jd_pin:ann", 60), ("phone:13900001111", 50)] {
        values(&mut c, &[(who, "points", Value::IntValue(points))]).await;
    }
    assert_eq!(count(&mut c, "rich").await, 0);
    assert_eq!(count(&mut c, "poor").await, 2);
    // A record names both: one customer, 110 points.
    let merged = common::ingest_batch(
        &mut c,
        "events",
        &event_line("e3", &[("pin", "ann"), ("phone", "13900001111")]),
    )
    .await;
    assert_eq!(merged.merges.len(), 1, "{merged:?}");
    assert_eq!(count(&mut c, "rich").await, 1);
    assert_eq!(count(&mut c, "poor").await, 0);
    assert_eq!(
        common::profile(&mut c, "phone:13900001111").await.rule_tags,
        ["rich"]
    );
    c.unmerge(UnmergeRequest {
        merge_id: merged.merges[0].merge_id,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "rich").await, 0);
    assert_eq!(count(&mut c, "poor").await, 2);
}

/// A client that gives up on DefineRule or TurnRuleDays halfway (its
/// deadline passes, the call is dropped) leaves each rule defined whole or
/// not at all: every rule listed has exactly its query's members, and
/// every rule tag has its rule.
#[tokio::test]
async fn calls_given_up_halfway_leave_rules_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    field(&mut c, "spend", FieldKind::Integer).await;
    let writes: Vec<(String, &str, Value)> = (0..2_000)
        .map(|i| (format!("c{i}"), "spend", Value::IntValue(i)))
        .collect();
    let writes: Vec<(&str, &str, Value)> = writes
        .iter()
        .map(|(k, f, v)| (k.as_str(), *f, v.clone()))
        .collect();
    values(&mut c, &writes).await;
    for i in 0..40u64 {
        let mut quitter = common::client(&server).await;
        let call = quitter.define_rule(DefineRuleRequest {
            name: format!("r{i}"),
            query: format!("spend >= {}", i * 50),
            ..Default::default()
        });
        // Given up after 0 to 4 ms: before it is sent, while it is
        // applied, or after.
        let _ = tokio::time::timeout(std::time::Duration::from_micros(i * 100), call).await;
        let turn = quitter.turn_rule_days(TurnRuleDaysRequest {});
        let _ = tokio::time::timeout(std::time::Duration::from_micros(i * 50), turn).await;
    }
    let rules = c
        .list_rules(ListRulesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .rules;
    assert!(!rules.is_empty(), "some definitions got through");
    for r in &rules {
        assert_eq!(count(&mut c, &r.query).await, r.member_count, "{}", r.name);
        assert_eq!(count(&mut c, &r.name).await, r.member_count, "{}", r.name);
    }
    let tags = c
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tags;
    for t in tags {
        assert!(
            rules.iter().any(|r| r.name == t.name),
            "tag {} without its rule",
            t.name
        );
    }
}
