//! The field and analytics calls against the real server binary over gRPC:
//! CreateField / ListFields / DropField / SetValues, field predicates in
//! Count with their status codes and error positions, Aggregate,
//! Breakdown, TopTags, Overlap, profile values, persistence across a
//! restart, and enumerated exclusivity under concurrent writers.

mod common;

use common::{code, count, create_field as create, int_value};
use tagstore::proto::value_write::Value;
use tagstore::proto::*;
use tonic::Code;

const DAY_MS: i64 = 86_400_000;
const SHANGHAI_MS: i64 = 8 * 3_600_000;

fn int(field: &str, customer: &str, v: i64) -> ValueWrite {
    ValueWrite {
        field: field.into(),
        customer: customer.into(),
        value: Some(Value::IntValue(v)),
    }
}

fn en(field: &str, customer: &str, v: &str) -> ValueWrite {
    ValueWrite {
        field: field.into(),
        customer: customer.into(),
        value: Some(Value::EnumValue(v.into())),
    }
}

fn event(field: &str, customer: &str, at_ms: i64) -> ValueWrite {
    ValueWrite {
        field: field.into(),
        customer: customer.into(),
        value: Some(Value::EventAtMs(at_ms)),
    }
}

fn now_ms() -> i64 {
    tagstore::clock::Clock::now_ms(&tagstore::clock::SystemClock)
}

/// Start of today in Shanghai, Unix ms.
fn shanghai_midnight_today() -> i64 {
    let now = now_ms();
    (now + SHANGHAI_MS).div_euclid(DAY_MS) * DAY_MS - SHANGHAI_MS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;

    create(&mut c, "total_spend", FieldKind::Integer, &[]).await;
    create(&mut c, "age", FieldKind::Integer, &[]).await;
    create(
        &mut c,
        "lifecycle",
        FieldKind::Enum,
        &["prospect", "new", "active", "loyal", "churned"],
    )
    .await;
    let r = c
        .create_field(CreateFieldRequest {
            name: "bought_skincare".into(),
            kind: FieldKind::Behaviour as i32,
            retention_days: 365,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let info = r.field.unwrap();
    assert!(r.created);
    assert_eq!(
        (
            info.time_zone.as_str(),
            info.retention_days,
            info.daily_days
        ),
        ("Asia/Shanghai", 365, 365)
    );
    // Errors of CreateField.
    let dup = c
        .create_field(CreateFieldRequest {
            name: "age".into(),
            kind: FieldKind::Integer as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(code(dup), Code::AlreadyExists);
    let same = c
        .create_field(CreateFieldRequest {
            name: "age".into(),
            kind: FieldKind::Integer as i32,
            if_not_exists: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!same.created);
    for bad in [
        CreateFieldRequest {
            name: "x".into(),
            ..Default::default()
        },
        CreateFieldRequest {
            name: "x".into(),
            kind: FieldKind::Enum as i32,
            ..Default::default()
        },
        CreateFieldRequest {
            name: "x".into(),
            kind: FieldKind::Behaviour as i32,
            time_zone: "Nowhere/City".into(),
            ..Default::default()
        },
        CreateFieldRequest {
            name: "x".into(),
            kind: FieldKind::Integer as i32,
            retention_days: 5,
            ..Default::default()
        },
    ] {
        assert_eq!(code(c.create_field(bad).await), Code::InvalidArgument);
    }
    // A tag and a field cannot share a name.
    c.create_tag(CreateTagRequest {
        name: "高价值用户".into(),
        category: "价值".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        code(
            c.create_field(CreateFieldRequest {
                name: "高价值用户".into(),
                kind: FieldKind::Integer as i32,
                ..Default::default()
            })
            .await
        ),
        Code::AlreadyExists
    );

    let midnight = shanghai_midnight_today();
    let writes = vec![
        int("total_spend", "u1", 600_000),
        int("total_spend", "u2", 500_000),
        int("total_spend", "u3", -20),
        int("total_spend", "u4", i64::MAX),
        int("age", "u1", 30),
        int("age", "u2", 25),
        int("age", "u3", 40),
        en("lifecycle", "u1", "active"),
        en("lifecycle", "u2", "new"),
        en("lifecycle", "u3", "churned"),
        en("lifecycle", "u2", "active"),          // last write wins
        event("bought_skincare", "u1", midnight), // today
        event("bought_skincare", "u2", midnight - 1), // yesterday, 23:59:59.999
        event("bought_skincare", "u3", midnight - 7 * DAY_MS),
        event("bought_skincare", "u1", midnight - DAY_MS),
        event("bought_skincare", "u1", midnight - 2 * DAY_MS + 5),
        event("bought_skincare", "u1", midnight - 2 * DAY_MS + 9), // same day again
    ];
    let r = c
        .set_values(SetValuesRequest { writes })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.new_customers, 4);
    assert_eq!(r.values_set, 10);
    assert_eq!(r.events_added, 5);
    c.update(UpdateRequest {
        mutations: vec![Mutation {
            tag: "高价值用户".into(),
            add: vec!["u1".into(), "u4".into()],
            remove: vec![],
            ..Default::default()
        }],
        create_missing_tags: false,
    })
    .await
    .unwrap();

    for (q, n) in [
        ("total_spend >= 500000", 3),
        ("total_spend > 500000", 2),
        ("total_spend < 0", 1),
        ("total_spend = 9223372036854775807", 1),
        ("total_spend IS NULL", 0),
        ("age IS NULL", 1),
        ("age BETWEEN 25 AND 34", 2),
        ("age != 30", 2),
        ("NOT age = 30", 3),
        ("age IN (25, 40, 99)", 2),
        ("lifecycle = active", 2),
        ("lifecycle IN (new, churned)", 1),
        ("lifecycle != churned", 2),
        ("lifecycle IS NULL", 1),
        ("bought_skincare WITHIN 1d", 1),
        ("bought_skincare WITHIN 2d", 2),
        ("bought_skincare WITHIN 7d", 2),
        ("bought_skincare WITHIN 8d", 3),
        ("COUNT(bought_skincare WITHIN 7d) >= 3", 1),
        ("COUNT(bought_skincare WITHIN 7d) = 0", 2),
        (
            "高价值用户 AND total_spend >= 500000 AND lifecycle = active",
            1,
        ),
        ("bought_skincare AND NOT 高价值用户", 2),
    ] {
        assert_eq!(count(&mut c, q).await, n, "{q}");
    }

    // Bad queries: INVALID_ARGUMENT with the position; unknown names NOT_FOUND.
    for (q, want, pos) in [
        ("lifecycle >= new", Code::InvalidArgument, "10"),
        ("lifecycle = vip", Code::InvalidArgument, "12"),
        ("age > 'x'", Code::InvalidArgument, "6"),
        ("高价值用户 AND spend > 1", Code::NotFound, "10"),
        ("高价值用户 >= 1", Code::InvalidArgument, "0"),
    ] {
        let err = c
            .count(CountRequest {
                queries: vec![q.into()],
                as_of: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), want, "{q}: {}", err.message());
        assert_eq!(
            err.metadata()
                .get("tagstore-error-position")
                .and_then(|v| v.to_str().ok()),
            Some(pos),
            "{q}: {}",
            err.message()
        );
    }

    // SetValues errors: unknown field, wrong kind, undeclared value, no value.
    for (w, want) in [
        (int("nope", "u1", 1), Code::NotFound),
        (int("lifecycle", "u1", 1), Code::InvalidArgument),
        (en("lifecycle", "u1", "vip"), Code::InvalidArgument),
        (
            ValueWrite {
                field: "age".into(),
                customer: "u1".into(),
                value: None,
            },
            Code::InvalidArgument,
        ),
    ] {
        let r = c.set_values(SetValuesRequest { writes: vec![w] }).await;
        assert_eq!(code(r), want);
    }

    // Analytics.
    let a = c
        .aggregate(AggregateRequest {
            query: "ALL".into(),
            field: "age".into(),
            histogram_edges: vec![26, 35],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.members, a.with_value, a.sum), (4, 3, 95));
    assert_eq!((a.min, a.max), (Some(25), Some(40)));
    assert_eq!(a.histogram, vec![1, 1, 1]);
    let a = c
        .aggregate(AggregateRequest {
            query: "total_spend > 0".into(),
            field: "total_spend".into(),
            histogram_edges: vec![],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(a.sum_overflows);
    assert_eq!(
        a.sum_decimal,
        (600_000i128 + 500_000 + i128::from(i64::MAX)).to_string()
    );
    assert_eq!(
        code(
            c.aggregate(AggregateRequest {
                query: "ALL".into(),
                field: "lifecycle".into(),
                histogram_edges: vec![],
                as_of: None,
            })
            .await
        ),
        Code::InvalidArgument
    );
    let b = c
        .breakdown(BreakdownRequest {
            query: "ALL".into(),
            by: Some(breakdown_request::By::Field("lifecycle".into())),
            as_of: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<(String, u64)> = b.rows.into_iter().map(|r| (r.label, r.count)).collect();
    assert_eq!(
        rows,
        vec![
            ("prospect".to_string(), 0),
            ("new".into(), 0),
            ("active".into(), 2),
            ("loyal".into(), 0),
            ("churned".into(), 1)
        ]
    );
    assert_eq!((b.total, b.no_value), (4, 1));
    let b = c
        .breakdown(BreakdownRequest {
            query: "total_spend > 0".into(),
            by: Some(breakdown_request::By::Category("价值".into())),
            as_of: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.rows.len(), 1);
    assert_eq!((b.rows[0].count, b.total), (2, 3));
    c.update(UpdateRequest {
        mutations: vec![Mutation {
            tag: "common".into(),
            add: vec!["u1".into(), "u2".into(), "u3".into(), "u4".into()],
            remove: vec![],
            ..Default::default()
        }],
        create_missing_tags: true,
    })
    .await
    .unwrap();
    let t = c
        .top_tags(TopTagsRequest {
            query: "lifecycle = active".into(),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.audience, t.customers), (2, 4));
    // Both lifts are 1.0; ties go to the tag with more audience members.
    assert_eq!(t.tags[0].tag, "common");
    assert_eq!(t.tags[1].tag, "高价值用户");
    assert_eq!((t.tags[1].in_audience, t.tags[1].overall), (1, 2));
    assert!((t.tags[0].lift - 1.0).abs() < 1e-9 && (t.tags[1].lift - 1.0).abs() < 1e-9);
    let t = c
        .top_tags(TopTagsRequest {
            query: "高价值用户".into(),
            k: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        t.tags.iter().all(|l| l.tag != "高价值用户"),
        "query tags left out"
    );
    let o = c
        .overlap(OverlapRequest {
            queries: vec![
                "lifecycle = active".into(),
                "高价值用户".into(),
                "age >= 30".into(),
            ],
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(o.size, 3);
    assert_eq!(o.counts, vec![2, 1, 1, 1, 2, 1, 1, 1, 2]);
    let too_many = c
        .overlap(OverlapRequest {
            queries: vec!["ALL".into(); 21],
            as_of: None,
        })
        .await;
    assert_eq!(code(too_many), Code::InvalidArgument);
    let bad = c
        .overlap(OverlapRequest {
            queries: vec!["ALL".into(), "lifecycle >= new".into()],
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        bad.metadata()
            .get("tagstore-error-query")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );

    // Profile values.
    let p = c
        .profile(ProfileRequest {
            customer: "u1".into(),
            recent_days: 7,
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<(String, Option<field_value::Value>)> =
        p.values.into_iter().map(|v| (v.field, v.value)).collect();
    let day =
        |ms: i64| tagstore::fields::time::format_day((ms + SHANGHAI_MS).div_euclid(DAY_MS) as i32);
    assert_eq!(
        values,
        vec![
            ("age".to_string(), Some(field_value::Value::IntValue(30))),
            (
                "bought_skincare".into(),
                Some(field_value::Value::Recent(RecentDays {
                    dates: vec![
                        day(midnight),
                        day(midnight - DAY_MS),
                        day(midnight - 2 * DAY_MS)
                    ]
                }))
            ),
            (
                "lifecycle".into(),
                Some(field_value::Value::EnumValue("active".into()))
            ),
            (
                "total_spend".into(),
                Some(field_value::Value::IntValue(600_000))
            ),
        ]
    );

    // Clearing values.
    c.set_values(SetValuesRequest {
        writes: vec![
            ValueWrite {
                field: "lifecycle".into(),
                customer: "u1".into(),
                value: Some(Value::Clear(true)),
            },
            ValueWrite {
                field: "age".into(),
                customer: "u1".into(),
                value: Some(Value::Clear(true)),
            },
        ],
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "lifecycle = active").await, 1);
    assert_eq!(count(&mut c, "age IS NULL").await, 2);

    // Everything survives a restart (clean: the final checkpoint writes the fields).
    drop(c);
    let mut server = server;
    server.stop().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let fields = c
        .list_fields(ListFieldsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .fields;
    let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["age", "bought_skincare", "lifecycle", "total_spend"]
    );
    assert_eq!(fields[0].customers_with_value, 2);
    assert_eq!(count(&mut c, "total_spend >= 500000").await, 3);
    assert_eq!(
        count(&mut c, "COUNT(bought_skincare WITHIN 7d) >= 3").await,
        1
    );
    assert_eq!(count(&mut c, "lifecycle = active").await, 1);
    c.drop_field(DropFieldRequest { name: "age".into() })
        .await
        .unwrap();
    assert_eq!(
        code(c.drop_field(DropFieldRequest { name: "age".into() }).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec!["age > 1".into()],
                as_of: None,
            })
            .await
        ),
        Code::NotFound
    );
}

/// Many clients set the same customers' lifecycle at once: afterwards every
/// customer has at most one value, and the values account for every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enumerated_values_stay_exclusive_under_concurrent_writers() {
    const VALUES: &[&str] = &["prospect", "new", "active", "loyal", "churned"];
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &["--checkpoint-wal-mb", "1"]);
    let mut c = common::client(&server).await;
    create(&mut c, "lifecycle", FieldKind::Enum, VALUES).await;
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let mut c = common::client(&server).await;
        tasks.push(tokio::spawn(async move {
            let mut x = w * 7919 + 1;
            for _ in 0..60 {
                let mut writes = Vec::new();
                for _ in 0..50 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let customer = format!("c{}", (x >> 33) % 300);
                    let v = VALUES[((x >> 20) % VALUES.len() as u64) as usize];
                    writes.push(if (x >> 40) % 10 == 0 {
                        ValueWrite {
                            field: "lifecycle".into(),
                            customer,
                            value: Some(Value::Clear(true)),
                        }
                    } else {
                        en("lifecycle", &customer, v)
                    });
                }
                c.set_values(SetValuesRequest { writes }).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let queries: Vec<String> = VALUES.iter().map(|v| format!("lifecycle = {v}")).collect();
    let o = c
        .overlap(OverlapRequest {
            queries: queries.clone(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    let n = VALUES.len();
    for (i, a) in VALUES.iter().enumerate() {
        for (j, b) in VALUES.iter().enumerate() {
            if i != j {
                assert_eq!(o.counts[i * n + j], 0, "{a} and {b}");
            }
        }
    }
    let with = count(&mut c, "lifecycle IS NOT NULL").await;
    let sum: u64 = (0..n).map(|i| o.counts[i * n + i]).sum();
    assert_eq!(sum, with);
    assert!(with > 0);
    // Each customer's profile shows the one value its bitmaps say.
    for k in 0..300 {
        let key = format!("c{k}");
        let Ok(p) = c
            .profile(ProfileRequest {
                customer: key.clone(),
                recent_days: 0,
            })
            .await
        else {
            continue;
        };
        let stage = p
            .into_inner()
            .values
            .into_iter()
            .find(|v| v.field == "lifecycle");
        if let Some(FieldValue {
            value: Some(field_value::Value::EnumValue(v)),
            ..
        }) = stage
        {
            assert!(VALUES.contains(&v.as_str()));
        }
    }
}

fn combine(field: &str, customer: &str, value: Value) -> ValueWrite {
    ValueWrite {
        field: field.into(),
        customer: customer.into(),
        value: Some(value),
    }
}

/// `int_add`, `int_max` and `int_min` combine on the server against the
/// newest value: eight clients adding to the same customers at once lose
/// nothing, a request sees its own earlier writes, a sum out of range
/// refuses the whole request, and the values survive a kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_combine_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    create(&mut c, "order_count", FieldKind::Integer, &[]).await;
    create(&mut c, "first_order_day", FieldKind::Integer, &[]).await;
    create(&mut c, "last_order_day", FieldKind::Integer, &[]).await;
    create(&mut c, "lifecycle", FieldKind::Enum, &["new", "loyal"]).await;

    let mut tasks = Vec::new();
    for w in 0..8i64 {
        let mut c = common::client(&server).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..50i64 {
                let day = 20_000 + (w * 50 + i) % 97;
                let writes = (0..4)
                    .flat_map(|k| {
                        let customer = format!("c{k}");
                        [
                            combine("order_count", &customer, Value::IntAdd(1)),
                            combine("first_order_day", &customer, Value::IntMin(day)),
                            combine("last_order_day", &customer, Value::IntMax(day)),
                        ]
                    })
                    .collect();
                c.set_values(SetValuesRequest { writes }).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for k in 0..4 {
        let customer = format!("c{k}");
        assert_eq!(int_value(&mut c, &customer, "order_count").await, Some(400));
        assert_eq!(
            int_value(&mut c, &customer, "first_order_day").await,
            Some(20_000)
        );
        assert_eq!(
            int_value(&mut c, &customer, "last_order_day").await,
            Some(20_096)
        );
    }

    // In order within a request: a set, then an add, then a max.
    let r = c
        .set_values(SetValuesRequest {
            writes: vec![
                int("order_count", "d1", 10),
                combine("order_count", "d1", Value::IntAdd(-3)),
                combine("order_count", "d1", Value::IntMax(5)),
                combine("order_count", "d2", Value::IntAdd(2)),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.new_customers, 2);
    assert_eq!(int_value(&mut c, "d1", "order_count").await, Some(7));
    assert_eq!(int_value(&mut c, "d2", "order_count").await, Some(2));
    assert_eq!(count(&mut c, "order_count >= 400").await, 4);

    // A sum out of range refuses the request, naming what overflowed; the
    // request's other writes are not applied either.
    let e = c
        .set_values(SetValuesRequest {
            writes: vec![
                combine("order_count", "d2", Value::IntAdd(1)),
                int("order_count", "d3", i64::MAX),
                combine("order_count", "d3", Value::IntAdd(1)),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("order_count") && e.message().contains("d3"));
    assert!(e.message().contains("64-bit range"), "{}", e.message());
    assert_eq!(int_value(&mut c, "d2", "order_count").await, Some(2));
    assert_eq!(
        code(
            c.profile(ProfileRequest {
                customer: "d3".into(),
                recent_days: 0
            })
            .await
        ),
        Code::NotFound
    );

    // Only integer fields combine.
    let e = c
        .set_values(SetValuesRequest {
            writes: vec![combine("lifecycle", "d1", Value::IntAdd(1))],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("enumerated"), "{}", e.message());

    // Acknowledged increments are durable: kill -9 and start again.
    server.kill();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(int_value(&mut c, "c3", "order_count").await, Some(400));
    assert_eq!(int_value(&mut c, "d1", "order_count").await, Some(7));
    assert_eq!(
        int_value(&mut c, "c0", "last_order_day").await,
        Some(20_096)
    );
}

/// `ListFields` pages: enumerated fields declaring the most values of the
/// longest length come in answers that a client with gRPC's usual 4 MiB
/// receive limit can read, in name order, each field once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_are_listed_in_pages_a_default_client_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    // 40 fields of 1,024 values of 128 bytes: 5.3 MB in all.
    let values: Vec<String> = (0..1024)
        .map(|i| format!("{i:04}{}", "v".repeat(124)))
        .collect();
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let names: Vec<String> = (0..40).map(|i| format!("f{i:02}")).collect();
    for name in &names {
        create(&mut c, name, FieldKind::Enum, &values).await;
    }
    // A client as tonic makes it by default: 4 MiB at most per answer.
    let mut plain = tag_store_client::TagStoreClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    for limit in [0, 7] {
        let (mut seen, mut pages, mut after) = (Vec::new(), 0, String::new());
        loop {
            let page = plain
                .list_fields(ListFieldsRequest {
                    after: after.clone(),
                    limit,
                })
                .await
                .unwrap_or_else(|e| panic!("limit {limit}: a page after {after:?}: {e}"))
                .into_inner();
            assert!(!page.fields.is_empty(), "an empty page after {after:?}");
            assert!(prost::Message::encoded_len(&page) <= 3584 << 10);
            pages += 1;
            for f in &page.fields {
                assert_eq!(f.values, values, "{}", f.name);
                seen.push(f.name.clone());
            }
            if !page.more {
                break;
            }
            after = seen.last().unwrap().clone();
        }
        assert_eq!(
            seen, names,
            "limit {limit}: every field once, in name order"
        );
        assert_eq!(pages, if limit == 0 { 2 } else { 6 }, "limit {limit}");
    }
    // The largest request: a 1 MiB `after` and the largest `limit`.
    let page = plain
        .list_fields(ListFieldsRequest {
            after: format!("f19{}", "~".repeat(1 << 20)),
            limit: u32::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.fields.first().map(|f| f.name.as_str()), Some("f20"));
    assert!(prost::Message::encoded_len(&page) <= 3584 << 10);
}

/// A breakdown by a category of 21,000 tags with 200-byte names (about
/// 4.4 MB of rows, over the 4 MiB a client as tonic makes it by default
/// accepts) comes in pages such a client reads; `limit` pages by count; a
/// page after the last tag is empty; the largest request (1 MiB `after`,
/// the largest `limit`) answers one bounded page; `after` or `limit` with a
/// field is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_breakdown_by_a_large_category_comes_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let names: Vec<String> = (0..21_000)
        .map(|i| format!("{i:05}{}", "t".repeat(195)))
        .collect();
    // Tags made by an update have no category (""); tag i holds customer
    // k(i mod 7).
    c.update(UpdateRequest {
        mutations: names
            .iter()
            .enumerate()
            .map(|(i, tag)| Mutation {
                tag: tag.clone(),
                add: vec![format!("k{}", i % 7)],
                ..Default::default()
            })
            .collect(),
        create_missing_tags: true,
    })
    .await
    .unwrap();
    let mut plain = tag_store_client::TagStoreClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let by = Some(breakdown_request::By::Category(String::new()));
    for (limit, expect_pages) in [(0u32, 2usize), (6_000, 4)] {
        let (mut seen, mut pages, mut after) = (Vec::new(), 0, String::new());
        loop {
            let page = plain
                .breakdown(BreakdownRequest {
                    query: "ALL".into(),
                    by: by.clone(),
                    after: after.clone(),
                    limit,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("limit {limit}: a page after {after:?}: {e}"))
                .into_inner();
            assert!(!page.rows.is_empty(), "an empty page after {after:?}");
            assert!(prost::Message::encoded_len(&page) <= 3584 << 10);
            assert_eq!(page.total, 7);
            pages += 1;
            for row in &page.rows {
                assert_eq!(row.count, 1, "{}", row.label);
            }
            seen.extend(page.rows.iter().map(|r| r.label.clone()));
            if !page.more {
                break;
            }
            after = seen.last().unwrap().clone();
        }
        assert_eq!(seen, names, "limit {limit}: every tag once, in name order");
        assert_eq!(pages, expect_pages, "limit {limit}");
    }
    let past = plain
        .breakdown(BreakdownRequest {
            query: "ALL".into(),
            by: by.clone(),
            after: names.last().unwrap().clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(past.rows.is_empty() && !past.more);
    // The largest page asked for: a 1 MiB `after` (before every tag) and
    // the largest `limit` still answer one page of at most 3.5 MiB.
    let largest = plain
        .breakdown(BreakdownRequest {
            query: "ALL".into(),
            by: by.clone(),
            after: "0".repeat(1 << 20),
            limit: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(largest.more && !largest.rows.is_empty());
    assert_eq!(largest.rows[0].label, names[0]);
    assert!(prost::Message::encoded_len(&largest) <= 3584 << 10);
    for (after, limit) in [("a", 0), ("", 5)] {
        let refused = plain
            .breakdown(BreakdownRequest {
                query: "ALL".into(),
                by: Some(breakdown_request::By::Field("f".into())),
                after: after.into(),
                limit,
                ..Default::default()
            })
            .await;
        assert_eq!(code(refused), Code::InvalidArgument);
    }
    let unknown = plain
        .breakdown(BreakdownRequest {
            query: "ALL".into(),
            by: Some(breakdown_request::By::Category("nope".into())),
            ..Default::default()
        })
        .await;
    assert_eq!(code(unknown), Code::InvalidArgument);
}
