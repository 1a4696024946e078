//! Every call of `tagstore.v1.TagStore` against the real server binary over
//! gRPC, with the status codes and messages for bad input.

mod common;

use std::collections::BTreeSet;

use common::{code, count};
use tagstore::proto::*;
use tonic::Code;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn mutation(tag: &str, add: &[&str], remove: &[&str]) -> Mutation {
    Mutation {
        tag: tag.into(),
        add: s(add),
        remove: s(remove),
        ..Default::default()
    }
}

async fn all_members(c: &mut common::Client, q: &str, page: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = c
            .members(MembersRequest {
                query: q.into(),
                limit: page,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.customers.len() <= page as usize);
        out.extend(r.customers);
        if r.next_cursor.is_empty() {
            return out;
        }
        cursor = r.next_cursor;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagstore.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_keys_per_request = 50\nmax_count_queries = 4\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut server = common::start(&data, &["--config", cfg.to_str().unwrap()]);
    let mut c = common::client(&server).await;

    // CreateTag / DescribeTag / ListTags.
    let r = c
        .create_tag(CreateTagRequest {
            name: "高价值用户".into(),
            description: "high value".into(),
            category: "价值".into(),
            if_not_exists: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.created);
    let info = r.tag.unwrap();
    assert_eq!(info.name, "高价值用户");
    assert_eq!(info.member_count, 0);
    assert!(info.created_at_ms > 0);
    let dup = CreateTagRequest {
        name: "高价值用户".into(),
        ..Default::default()
    };
    assert_eq!(code(c.create_tag(dup.clone()).await), Code::AlreadyExists);
    let again = c
        .create_tag(CreateTagRequest {
            if_not_exists: true,
            ..dup
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.tag.unwrap().description, "high value");
    for bad in ["", " padded", "new\nline"] {
        let e = c
            .create_tag(CreateTagRequest {
                name: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains("tag name"), "{}", e.message());
    }
    for name in ["常购护肤品", "尝试新品", "潜在流失", "with space"] {
        c.create_tag(CreateTagRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let d = c
        .describe_tag(DescribeTagRequest {
            name: "高价值用户".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.tag.unwrap().category, "价值");
    assert_eq!(
        code(
            c.describe_tag(DescribeTagRequest {
                name: "nope".into()
            })
            .await
        ),
        Code::NotFound
    );
    let list = c
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(list.len(), 5);
    let by_cat = c
        .list_tags(ListTagsRequest {
            category: "价值".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tags;
    assert_eq!(by_cat.len(), 1);

    // Update.
    let r = c
        .update(UpdateRequest {
            mutations: vec![
                mutation(
                    "高价值用户",
                    &["phone:13800001111", "wechat:oX9a", "jd:pin_7781", "u4"],
                    &[],
                ),
                mutation(
                    "常购护肤品",
                    &["phone:13800001111", "jd:pin_7781", "u5"],
                    &[],
                ),
                mutation("尝试新品", &["wechat:oX9a", "u5"], &[]),
                mutation("潜在流失", &["jd:pin_7781"], &["never-seen"]),
                mutation("with space", &["u6"], &[]),
            ],
            create_missing_tags: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.added, 11);
    assert_eq!(r.removed, 0);
    assert_eq!(r.new_customers, 6);
    assert!(r.lsn > 0);
    // Removing an unknown key creates no customer.
    assert_eq!(count(&mut c, "ALL").await, 6);

    // Atomic per request: an unknown tag fails the whole request.
    let e = c
        .update(UpdateRequest {
            mutations: vec![
                mutation("高价值用户", &["u7"], &[]),
                mutation("missing", &["u8"], &[]),
            ],
            create_missing_tags: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("missing"), "{}", e.message());
    assert_eq!(
        count(&mut c, "ALL").await,
        6,
        "nothing of the failed request applied"
    );
    assert_eq!(count(&mut c, "高价值用户").await, 4);

    // Bad batches.
    assert_eq!(
        code(c.update(UpdateRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.update(UpdateRequest {
                mutations: vec![mutation("高价值用户", &[], &[])],
                create_missing_tags: false
            })
            .await
        ),
        Code::InvalidArgument
    );
    let e = c
        .update(UpdateRequest {
            mutations: vec![mutation("高价值用户", &["ok", ""], &[])],
            create_missing_tags: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("customer key"), "{}", e.message());
    let many: Vec<String> = (0..51).map(|i| format!("k{i}")).collect();
    let e = c
        .update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "高价值用户".into(),
                add: many,
                remove: vec![],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());

    // create_missing_tags.
    c.update(UpdateRequest {
        mutations: vec![mutation("社交活跃", &["u4", "u9"], &[])],
        create_missing_tags: true,
    })
    .await
    .unwrap();
    assert_eq!(count(&mut c, "社交活跃").await, 2);

    // Count: many queries in one call, and the language.
    let r = c
        .count(CountRequest {
            queries: s(&[
                "高价值用户 AND (常购护肤品 OR 尝试新品) AND NOT 潜在流失",
                "高价值用户 and not 常购护肤品",
                "NOT 高价值用户",
                "\"with space\" OR 社交活跃",
            ]),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner();
    // 高价值 = {13800001111, oX9a, pin_7781, u4}; (护肤 ∪ 新品) = {13800001111, pin_7781, u5, oX9a}; 流失 = {pin_7781}
    assert_eq!(r.counts, vec![2, 2, 3, 3]);
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec![],
                as_of: None,
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec!["ALL".into(); 5],
                as_of: None,
            })
            .await
        ),
        Code::InvalidArgument
    );

    // Query errors carry the position.
    let e = c
        .count(CountRequest {
            queries: s(&["高价值用户 AND (常购护肤品"]),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.metadata().get("tagstore-error-position").unwrap(), "16");
    assert!(e.message().contains("position 16"), "{}", e.message());
    let e = c
        .count(CountRequest {
            queries: s(&["ALL", "高价值用户 AND 不存在"]),
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.metadata().get("tagstore-error-position").unwrap(), "10");
    assert_eq!(e.metadata().get("tagstore-error-query").unwrap(), "1");
    assert!(e.message().contains("不存在"), "{}", e.message());

    // Members: pages, cursors that survive writes, bad cursors.
    let everyone = all_members(&mut c, "ALL", 2).await;
    assert_eq!(everyone.len(), 7);
    assert_eq!(
        everyone.iter().collect::<BTreeSet<_>>().len(),
        7,
        "no duplicates across pages"
    );
    let first = c
        .members(MembersRequest {
            query: "ALL".into(),
            limit: 3,
            cursor: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.customers, everyone[..3]);
    // A write between pages: remove a member already returned, add a new customer.
    c.delete_customers(DeleteCustomersRequest {
        customers: s(&[&everyone[0]]),
    })
    .await
    .unwrap();
    c.update(UpdateRequest {
        mutations: vec![mutation("社交活跃", &["late-comer"], &[])],
        create_missing_tags: false,
    })
    .await
    .unwrap();
    let mut rest = Vec::new();
    let mut cursor = first.next_cursor;
    while !cursor.is_empty() {
        let r = c
            .members(MembersRequest {
                query: "ALL".into(),
                limit: 3,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        rest.extend(r.customers);
        cursor = r.next_cursor;
    }
    let mut expect: Vec<String> = everyone[3..].to_vec();
    expect.push("late-comer".into());
    assert_eq!(rest, expect, "the cursor continued where it was");
    assert_eq!(
        code(
            c.members(MembersRequest {
                query: "ALL".into(),
                limit: 0,
                cursor: "garbage".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.members(MembersRequest {
                query: "ALL".into(),
                limit: 100_001,
                cursor: String::new(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.members(MembersRequest {
                query: "(".into(),
                limit: 0,
                cursor: String::new(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // Export streams every member with the total.
    let mut stream = c
        .export(ExportRequest {
            query: "ALL".into(),
            batch_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut exported = Vec::new();
    let mut batches = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        assert_eq!(batch.total, 7);
        assert!(batch.customers.len() <= 2);
        exported.extend(batch.customers);
        batches += 1;
    }
    assert_eq!(batches, 4);
    assert_eq!(exported, all_members(&mut c, "ALL", 1000).await);
    assert_eq!(
        code(
            c.export(ExportRequest {
                query: "nope".into(),
                batch_size: 0,
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );

    // Profile.
    let p = c
        .profile(ProfileRequest {
            customer: "jd:pin_7781".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.tags, s(&["常购护肤品", "潜在流失", "高价值用户"]));
    assert_eq!(
        code(
            c.profile(ProfileRequest {
                customer: "nobody".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.profile(ProfileRequest {
                customer: "".into(),
                ..Default::default()
            })
            .await
        ),
        Code::InvalidArgument
    );

    // ReplaceMembers: a client stream.
    let msgs = vec![
        ReplaceMembersRequest {
            tag: "尝试新品".into(),
            create_missing_tag: false,
            customers: s(&["u5", "n1"]),
            last: false,
        },
        ReplaceMembersRequest {
            tag: String::new(),
            create_missing_tag: false,
            customers: s(&["n2"]),
            last: true,
        },
    ];
    let r = c
        .replace_members(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.member_count, 3);
    assert_eq!(r.new_customers, 2);
    assert_eq!(r.removed, 1, "wechat:oX9a left the tag");
    assert_eq!(all_members(&mut c, "尝试新品", 10).await.len(), 3);
    let bad = vec![ReplaceMembersRequest {
        tag: String::new(),
        create_missing_tag: false,
        customers: s(&["x"]),
        last: true,
    }];
    assert_eq!(
        code(c.replace_members(tokio_stream::iter(bad)).await),
        Code::InvalidArgument
    );
    let unknown = vec![ReplaceMembersRequest {
        tag: "nope".into(),
        create_missing_tag: false,
        customers: s(&["x"]),
        last: true,
    }];
    assert_eq!(
        code(c.replace_members(tokio_stream::iter(unknown)).await),
        Code::NotFound
    );
    let created = vec![ReplaceMembersRequest {
        tag: "新标签".into(),
        create_missing_tag: true,
        customers: s(&["u5"]),
        last: true,
    }];
    assert_eq!(
        c.replace_members(tokio_stream::iter(created))
            .await
            .unwrap()
            .into_inner()
            .member_count,
        1
    );

    // DeleteCustomers erases from every tag; the key can come back with a new id.
    let before = c
        .profile(ProfileRequest {
            customer: "u5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = c
        .delete_customers(DeleteCustomersRequest {
            customers: s(&["u5", "never-seen"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 1);
    assert_eq!(
        code(
            c.profile(ProfileRequest {
                customer: "u5".into(),
                ..Default::default()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        count(&mut c, "常购护肤品 OR 尝试新品 OR 新标签").await,
        3,
        "pin_7781, n1, n2"
    );
    c.update(UpdateRequest {
        mutations: vec![mutation("新标签", &["u5"], &[])],
        create_missing_tags: false,
    })
    .await
    .unwrap();
    let after = c
        .profile(ProfileRequest {
            customer: "u5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.tags, s(&["新标签"]));
    assert_ne!(after.internal_id, before.internal_id, "ids are not reused");
    assert_eq!(
        code(
            c.delete_customers(DeleteCustomersRequest { customers: vec![] })
                .await
        ),
        Code::InvalidArgument
    );

    // DropTag.
    let r = c
        .drop_tag(DropTagRequest {
            name: "潜在流失".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.member_count, 1);
    assert_eq!(
        code(
            c.drop_tag(DropTagRequest {
                name: "潜在流失".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: s(&["潜在流失"]),
                as_of: None,
            })
            .await
        ),
        Code::NotFound
    );

    // Checkpoint and Stats.
    let cp = c
        .checkpoint(CheckpointRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cp.lsn > 0);
    assert!(cp.segment_bytes > 0);
    let st = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(st.customers, count(&mut c, "ALL").await);
    assert_eq!(st.tags, 6);
    assert_eq!(st.last_checkpoint_lsn, cp.lsn);
    assert!(st.memory_bytes > 0 && st.disk_bytes > 0 && st.segment_files == 1);
    assert_eq!(st.dictionary_sections, 1);

    // Health and reflection.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tagstore.v1.TagStore".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The older v1alpha, which many tools still ask.
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let req = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut resp = alpha
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let listed = format!("{:?}", resp.message().await.unwrap().unwrap());
    assert!(listed.contains("tagstore.v1.TagStore"), "{listed}");
    let mut refl =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let listed = format!("{:?}", resp.message().await.unwrap().unwrap());
    assert!(listed.contains("tagstore.v1.TagStore"), "{listed}");

    // A graceful stop exits 0, and everything is there after a restart.
    let probes = s(&[
        "高价值用户 AND NOT 常购护肤品",
        "常购护肤品 OR 新标签",
        "NOT 社交活跃",
        "ALL",
    ]);
    let expected_counts = c
        .count(CountRequest {
            queries: probes.clone(),
            as_of: None,
        })
        .await
        .unwrap()
        .into_inner()
        .counts;
    let expected_all = all_members(&mut c, "ALL", 1000).await;
    let expected_tags = c
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tags;
    drop(c);
    assert!(server.stop().unwrap().success(), "{}", server.stderr());
    let server = common::start(&data, &[]);
    let mut c = common::client(&server).await;
    // First counts after a restart read bitmaps still on disk (the blocking path), then in memory.
    for _ in 0..2 {
        let counts = c
            .count(CountRequest {
                queries: probes.clone(),
                as_of: None,
            })
            .await
            .unwrap()
            .into_inner()
            .counts;
        assert_eq!(counts, expected_counts);
    }
    assert_eq!(all_members(&mut c, "ALL", 1000).await, expected_all);
    assert_eq!(
        c.list_tags(ListTagsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .tags,
        expected_tags
    );
    let p = c
        .profile(ProfileRequest {
            customer: "jd:pin_7781".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.tags, s(&["常购护肤品", "高价值用户"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let _first = common::start(dir.path(), &[]);
    let err = common::try_start(dir.path(), &[])
        .err()
        .expect("second server must not start");
    assert!(err.contains("in use by another tagstore process"), "{err}");
}

async fn resolve(c: &mut common::Client, keys: &[&str], create_missing: bool) -> Vec<i64> {
    c.resolve_customers(ResolveCustomersRequest {
        customers: s(keys),
        create_missing,
    })
    .await
    .unwrap()
    .into_inner()
    .ids
}

fn by_id(tag: &str, add_ids: &[u32], remove_ids: &[u32]) -> Mutation {
    Mutation {
        tag: tag.into(),
        add_ids: add_ids.to_vec(),
        remove_ids: remove_ids.to_vec(),
        ..Default::default()
    }
}

async fn update(
    c: &mut common::Client,
    mutations: Vec<Mutation>,
) -> Result<UpdateResponse, tonic::Status> {
    c.update(UpdateRequest {
        mutations,
        create_missing_tags: false,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_by_internal_id() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tagstore.toml");
    std::fs::write(&cfg, "[limits]\nmax_keys_per_request = 10\n").unwrap();
    let data = dir.path().join("data");
    let args = ["--config", cfg.to_str().unwrap()];
    let mut server = common::start(&data, &args);
    let mut c = common::client(&server).await;
    for name in ["vip", "churn"] {
        c.create_tag(CreateTagRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // Resolving without create_missing creates nothing.
    assert_eq!(resolve(&mut c, &["a", "b"], false).await, vec![-1, -1]);
    assert_eq!(count(&mut c, "ALL").await, 0);
    // With it, the missing ones are created, once; a repeated key gets one id.
    let r = c
        .resolve_customers(ResolveCustomersRequest {
            customers: s(&["a", "b", "a"]),
            create_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.new_customers, 2);
    assert!(r.lsn > 0);
    let (a, b) = (r.ids[0], r.ids[1]);
    assert_eq!(r.ids[2], a);
    assert_ne!(a, b);
    assert_eq!(count(&mut c, "ALL").await, 2);
    assert_eq!(
        resolve(&mut c, &["b", "a", "zz"], false).await,
        vec![b, a, -1]
    );
    let r = c
        .resolve_customers(ResolveCustomersRequest {
            customers: s(&["a"]),
            create_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.ids, r.new_customers), (vec![a], 0));
    let (a, b) = (a as u32, b as u32);

    // Writes by id, and by key and id in one mutation.
    let r = update(&mut c, vec![by_id("vip", &[a, b], &[])])
        .await
        .unwrap();
    assert_eq!((r.added, r.new_customers), (2, 0));
    let mut m = by_id("churn", &[b], &[]);
    m.add = s(&["c"]);
    let r = update(&mut c, vec![m, by_id("vip", &[], &[b])])
        .await
        .unwrap();
    assert_eq!((r.added, r.removed, r.new_customers), (2, 1, 1));
    assert_eq!(count(&mut c, "vip").await, 1);
    assert_eq!(count(&mut c, "churn").await, 2);
    // The key and the id name the same customer.
    let p = c
        .profile(ProfileRequest {
            customer: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.internal_id, p.tags), (a, s(&["vip"])));
    // Added and removed in one mutation: removed.
    update(&mut c, vec![by_id("churn", &[a], &[a])])
        .await
        .unwrap();
    assert_eq!(count(&mut c, "churn AND vip").await, 0);

    // An id that names no customer fails the whole request with NOT_FOUND;
    // removing one is a no-op.
    let e = update(
        &mut c,
        vec![
            by_id("vip", &[b], &[]),
            by_id("churn", &[a, 4_000_000], &[]),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("4000000"), "{}", e.message());
    assert_eq!(
        count(&mut c, "vip").await,
        1,
        "nothing of the failed request applied"
    );
    let r = update(&mut c, vec![by_id("vip", &[], &[4_000_000, b])])
        .await
        .unwrap();
    assert_eq!(r.removed, 0);
    // A deleted customer's id is dead for good, even when the key comes back.
    c.delete_customers(DeleteCustomersRequest {
        customers: s(&["a"]),
    })
    .await
    .unwrap();
    let e = update(&mut c, vec![by_id("vip", &[a], &[])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let again = resolve(&mut c, &["a"], true).await[0];
    assert_ne!(again, a as i64);

    // Limits and bad input.
    let e = update(&mut c, vec![by_id("vip", &[b; 11], &[])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit"), "{}", e.message());
    let keys: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
    let e = c
        .resolve_customers(ResolveCustomersRequest {
            customers: keys,
            create_missing: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        code(
            c.resolve_customers(ResolveCustomersRequest::default())
                .await
        ),
        Code::InvalidArgument
    );
    for create_missing in [false, true] {
        let e = c
            .resolve_customers(ResolveCustomersRequest {
                customers: s(&["ok", ""]),
                create_missing,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("customer key"), "{}", e.message());
    }
    assert_eq!(
        code(update(&mut c, vec![by_id("missing", &[b], &[])]).await),
        Code::NotFound
    );

    // Ids and the customers created by a resolve survive a restart.
    let before = resolve(&mut c, &["a", "b", "c"], false).await;
    server.kill();
    let server = common::start(&data, &args);
    let mut c = common::client(&server).await;
    assert_eq!(resolve(&mut c, &["a", "b", "c"], false).await, before);
    assert_eq!(count(&mut c, "ALL").await, 3);
    assert_eq!(count(&mut c, "churn").await, 2);
}

/// An update large enough that the server looks its keys up before the
/// writer (in two halves): new and known customers, a key named twice, keys
/// to remove that are and are not members, a deleted customer named again,
/// and a bad key, which still fails the whole request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_updates_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = common::start(&data, &[]);
    let mut c = common::client(&server).await;
    for name in ["t", "u"] {
        c.create_tag(CreateTagRequest {
            name: name.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let keys = |r: std::ops::Range<u32>| -> Vec<String> { r.map(|i| format!("k{i}")).collect() };
    let add = |tag: &str, add: Vec<String>, remove: Vec<String>| Mutation {
        tag: tag.into(),
        add,
        remove,
        ..Default::default()
    };
    // 0..600 are new.
    let r = update(&mut c, vec![add("t", keys(0..600), vec![])])
        .await
        .unwrap();
    assert_eq!((r.added, r.new_customers), (600, 600));
    c.delete_customers(DeleteCustomersRequest {
        customers: keys(0..10),
    })
    .await
    .unwrap();
    // 300..900 (300 known, 300 new, one named twice), and 0..10 again: deleted,
    // so new customers now; remove 2000..2200 from u (no customers at all)
    // and 100..400 from t.
    let mut named = keys(300..900);
    named.push("k301".into());
    named.extend(keys(0..10));
    let r = update(
        &mut c,
        vec![
            add("u", named.clone(), keys(2000..2200)),
            add("t", vec![], keys(100..400)),
        ],
    )
    .await
    .unwrap();
    assert_eq!((r.added, r.removed, r.new_customers), (610, 300, 310));
    assert_eq!(count(&mut c, "u").await, 610);
    assert_eq!(count(&mut c, "t").await, 600 - 10 - 300);
    assert_eq!(count(&mut c, "ALL").await, 900);
    // The same again changes nothing.
    let again = update(&mut c, vec![add("u", named, vec![])]).await.unwrap();
    assert_eq!((again.added, again.new_customers, again.lsn), (0, 0, r.lsn));
    // One bad key among 600 fails it all.
    let mut bad = keys(1000..1600);
    bad.push(String::new());
    let err = update(&mut c, vec![add("t", bad, vec![])])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(count(&mut c, "ALL").await, 900);
    drop(c);
    server.kill();
}

/// `ListTags` pages: thousands of tags with long descriptions come in
/// answers that a client with gRPC's usual 4 MiB receive limit can read,
/// in name order, each tag once; `limit` and `category` page the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_listed_in_pages_a_default_client_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    // 1,100 tags of about 4 KiB each: 4.5 MB in all.
    let description = "描述".repeat(680);
    let names: Vec<String> = (0..1100).map(|i| format!("t{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        c.create_tag(CreateTagRequest {
            name: name.clone(),
            description: description.clone(),
            category: if i % 2 == 0 { "even" } else { "odd" }.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // A client as tonic makes it by default: 4 MiB at most per answer.
    let mut plain = tag_store_client::TagStoreClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let (seen, sizes) = tag_pages(&mut plain, "", 0, &description).await;
    assert_eq!(seen, names, "every tag once, in name order");
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s <= 3584 << 10), "{sizes:?}");
    let (seen, sizes) = tag_pages(&mut plain, "odd", 0, &description).await;
    let odd: Vec<String> = names.iter().skip(1).step_by(2).cloned().collect();
    assert_eq!((seen, sizes.len()), (odd, 1));
    let (seen, sizes) = tag_pages(&mut plain, "even", 100, &description).await;
    let even: Vec<String> = names.iter().step_by(2).cloned().collect();
    assert_eq!((seen, sizes.len()), (even, 6));
    // A request that names no page gets the first, and says more follow.
    let first = plain
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(first.more && first.tags.len() < names.len());
    // The largest request: a 1 MiB `after` and the largest `limit`.
    let page = plain
        .list_tags(ListTagsRequest {
            after: format!("t0549{}", "~".repeat(1 << 20)),
            limit: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<String> = page.tags.into_iter().map(|t| t.name).collect();
    assert_eq!((rest, page.more), (names[550..].to_vec(), false));
}

/// Every page of `ListTags` of `category` with `limit`, checking that each
/// tag has `description` and no page is empty: the names in order, and
/// each page's size in bytes.
async fn tag_pages(
    client: &mut tag_store_client::TagStoreClient<tonic::transport::Channel>,
    category: &str,
    limit: u32,
    description: &str,
) -> (Vec<String>, Vec<usize>) {
    let (mut seen, mut sizes, mut after) = (Vec::new(), Vec::new(), String::new());
    loop {
        let page = client
            .list_tags(ListTagsRequest {
                category: category.into(),
                after: after.clone(),
                limit,
            })
            .await
            .unwrap_or_else(|e| panic!("a page after {after:?}: {e}"))
            .into_inner();
        assert!(!page.tags.is_empty(), "an empty page after {after:?}");
        sizes.push(prost::Message::encoded_len(&page));
        for t in &page.tags {
            assert_eq!(t.description, description);
            seen.push(t.name.clone());
        }
        if !page.more {
            return (seen, sizes);
        }
        after = seen.last().unwrap().clone();
    }
}
