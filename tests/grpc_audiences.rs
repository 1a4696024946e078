//! Saved audiences against the real server binary (#23, part 1): a named
//! query whose name stands for it in any query (counts, member pages,
//! other audiences), redefined at once, refused when it would use itself
//! (with the path), when its name is taken by a tag or field (and the other
//! way round), when it names something unknown or breaks the limits;
//! dropped unless another uses it; listed in pages with counts; kept across
//! kill -9, a checkpoint and a restart.

mod common;

use common::{Client, code, count};
use tagstore::proto::*;
use tonic::Code;

async fn tag(c: &mut Client, tag: &str, keys: &[&str]) {
    common::add_to_tag(c, tag, keys).await
}

fn audience(name: &str, query: &str) -> CreateAudienceRequest {
    CreateAudienceRequest {
        name: name.into(),
        query: query.into(),
        description: "for the 11.11 campaign".into(),
        owner: "marketing".into(),
        category: "campaigns".into(),
        replace: false,
        kept_current: false,
    }
}

async fn create(
    c: &mut Client,
    name: &str,
    query: &str,
) -> Result<CreateAudienceResponse, tonic::Status> {
    c.create_audience(audience(name, query))
        .await
        .map(|r| r.into_inner())
}

async fn list(c: &mut Client, after: &str, limit: u32, counts: bool) -> ListAudiencesResponse {
    c.list_audiences(ListAudiencesRequest {
        after: after.into(),
        limit,
        category: String::new(),
        counts,
    })
    .await
    .unwrap()
    .into_inner()
}

/// What the store must answer once the audiences below are saved.
async fn check(c: &mut Client) {
    assert_eq!(count(c, "高价值女性").await, 2);
    assert_eq!(count(c, "高价值女性 AND NOT coupon_sent").await, 1);
    assert_eq!(count(c, "top").await, 1);
    let page = c
        .members(MembersRequest {
            query: "top".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.customers, ["b"]);
    let l = list(c, "", 0, true).await;
    let rows: Vec<(&str, u64, Vec<String>)> = l
        .audiences
        .iter()
        .map(|a| (a.name.as_str(), a.count, a.uses.clone()))
        .collect();
    assert_eq!(
        rows,
        [
            ("top", 1, vec!["高价值女性".to_string()]),
            ("高价值女性", 2, vec![])
        ]
    );
    assert_eq!(l.audiences[1].owner, "marketing");
    assert_eq!(l.audiences[1].query, "vip AND women");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_audiences_stand_for_their_queries() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    tag(&mut c, "vip", &["a", "b", "c"]).await;
    tag(&mut c, "women", &["a", "b", "d"]).await;
    tag(&mut c, "coupon_sent", &["a"]).await;

    let r = create(&mut c, "高价值女性", "vip AND women").await.unwrap();
    assert!(r.created && r.lsn > 0);
    assert_eq!(r.audience.unwrap().category, "campaigns");
    create(&mut c, "top", "高价值女性 AND NOT coupon_sent")
        .await
        .unwrap();
    check(&mut c).await;

    // Refusals, each with its code.
    let cycle = c
        .create_audience(CreateAudienceRequest {
            replace: true,
            ..audience("高价值女性", "top OR vip")
        })
        .await
        .unwrap_err();
    assert_eq!(cycle.code(), Code::InvalidArgument);
    assert!(
        cycle.message().contains("高价值女性 → top → 高价值女性"),
        "{}",
        cycle.message()
    );
    let own = create(&mut c, "x", "x OR vip").await.unwrap_err();
    assert_eq!(own.code(), Code::InvalidArgument);
    assert!(own.message().contains("use itself"), "{}", own.message());
    assert_eq!(
        code(create(&mut c, "vip", "women").await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(create(&mut c, "top", "women").await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(create(&mut c, "y", "nobody AND vip").await),
        Code::NotFound
    );
    assert_eq!(
        code(create(&mut c, "y", "vip AND (").await),
        Code::InvalidArgument
    );
    assert_eq!(code(create(&mut c, "y", "").await), Code::InvalidArgument);
    assert_eq!(
        code(create(&mut c, "y", &"vip OR ".repeat(3_000)).await),
        Code::InvalidArgument,
        "a query over 16 KiB"
    );
    let long_owner = c
        .create_audience(CreateAudienceRequest {
            owner: "o".repeat(201),
            ..audience("y", "vip")
        })
        .await;
    assert_eq!(code(long_owner), Code::InvalidArgument);
    // The name space is shared the other way too.
    let t = c
        .create_tag(CreateTagRequest {
            name: "top".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(t), Code::AlreadyExists);
    let f = c
        .create_field(CreateFieldRequest {
            name: "top".into(),
            kind: FieldKind::Integer as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(code(f), Code::AlreadyExists);
    let u = c
        .update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "top".into(),
                add: vec!["z".into()],
                ..Default::default()
            }],
            create_missing_tags: true,
        })
        .await;
    assert_eq!(code(u), Code::InvalidArgument);
    let drop_used = c
        .drop_audience(DropAudienceRequest {
            name: "高价值女性".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(drop_used.code(), Code::FailedPrecondition);
    assert!(
        drop_used.message().contains("\"top\""),
        "{}",
        drop_used.message()
    );
    let unknown = c
        .drop_audience(DropAudienceRequest {
            name: "nope".into(),
        })
        .await;
    assert_eq!(code(unknown), Code::NotFound);
    check(&mut c).await;

    // Pages.
    let first = list(&mut c, "", 1, false).await;
    assert_eq!(
        (first.audiences.len(), first.more, first.total),
        (1, true, 2)
    );
    assert_eq!(first.audiences[0].count, 0, "not counted unless asked");
    let second = list(&mut c, &first.audiences[0].name, 1, false).await;
    assert_eq!((second.audiences.len(), second.more), (1, false));

    // Across kill -9, then a checkpoint and a clean restart.
    server.kill();
    drop(server);
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check(&mut c).await;
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    server.stop().unwrap();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check(&mut c).await;

    // Redefined: its members are the new query's at once, and the ones
    // using it follow.
    let r = c
        .create_audience(CreateAudienceRequest {
            replace: true,
            ..audience("高价值女性", "vip")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(count(&mut c, "高价值女性").await, 3);
    assert_eq!(count(&mut c, "top").await, 2);
    for name in ["top", "高价值女性"] {
        c.drop_audience(DropAudienceRequest { name: name.into() })
            .await
            .unwrap();
    }
    assert_eq!(list(&mut c, "", 0, false).await.total, 0);
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec!["top".into()],
                as_of: None,
            })
            .await
        ),
        Code::NotFound
    );
    // A tag dropped under a saved audience: using it says so; listing
    // counts it as an error, not a failure.
    create(&mut c, "v", "women AND coupon_sent").await.unwrap();
    c.drop_tag(DropTagRequest {
        name: "coupon_sent".into(),
    })
    .await
    .unwrap();
    let gone = c
        .count(CountRequest {
            queries: vec!["v".into()],
            as_of: None,
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        gone.message()
            .contains("in saved audience \"v\": unknown tag \"coupon_sent\""),
        "{}",
        gone.message()
    );
    let l = list(&mut c, "", 0, true).await;
    assert_eq!(l.audiences[0].count, 0);
    assert!(
        l.audiences[0].error.contains("coupon_sent"),
        "{:?}",
        l.audiences[0]
    );

    // Audiences that each use the one before twice: the expansion is
    // bounded, and the one past the bound is refused when saved.
    create(&mut c, "d0", "women").await.unwrap();
    let mut refused = None;
    for i in 1..20 {
        let q = format!("d{} OR NOT d{}", i - 1, i - 1);
        match create(&mut c, &format!("d{i}"), &q).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::InvalidArgument);
                assert!(
                    e.message().contains("expands more than 10000"),
                    "{}",
                    e.message()
                );
                refused = Some(i);
                break;
            }
        }
    }
    // d13 would expand 2^14 - 1 = 16,383 audiences; d12 expands 8,191.
    assert_eq!(refused, Some(13));
    assert_eq!(count(&mut c, "d12").await, count(&mut c, "ALL").await);
}

/// The member-count history: a server that starts on a day with no point
/// counts every tag and saved audience; `TagHistory` gives the series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_counts_are_recorded_a_point_a_day() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    tag(&mut c, "vip", &["a", "b", "c"]).await;
    tag(&mut c, "women", &["a", "d"]).await;
    create(&mut c, "高价值女性", "vip AND women").await.unwrap();
    let history = |name: &str, days: u32| TagHistoryRequest {
        name: name.into(),
        days,
    };
    // Nothing was there to count when it started.
    let none = c.tag_history(history("vip", 0)).await.unwrap().into_inner();
    assert!(none.points.is_empty());
    drop(server);
    // Started again today: today's counts.
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let mut points = Vec::new();
    for _ in 0..100 {
        points = c
            .tag_history(history("vip", 7))
            .await
            .unwrap()
            .into_inner()
            .points;
        if !points.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].count, 3);
    assert_eq!(points[0].day.len(), 10, "YYYY-MM-DD: {}", points[0].day);
    let a = c
        .tag_history(history("高价值女性", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.points.len(), 1);
    assert_eq!(a.points[0].count, 1);
    assert_eq!(
        code(c.tag_history(history("nope", 0)).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.tag_history(history("vip", 401)).await),
        Code::InvalidArgument
    );
    // Kept across a checkpoint and a restart (and not recorded twice).
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let again = c.tag_history(history("vip", 0)).await.unwrap().into_inner();
    assert_eq!(again.points, points);
}

/// TopTags leaves out the tags its query names, also those inside the
/// saved audiences it names (their lift says nothing new).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_tags_leave_out_the_tags_inside_an_audience() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    tag(&mut c, "vip", &["a", "b", "c"]).await;
    tag(&mut c, "women", &["a", "b", "d"]).await;
    tag(&mut c, "other", &["a", "e"]).await;
    create(&mut c, "av", "vip AND women").await.unwrap();
    let top = |include: bool| TopTagsRequest {
        query: "av".into(),
        k: 10,
        include_query_tags: include,
        ..Default::default()
    };
    let names = |r: TopTagsResponse| {
        let mut n: Vec<String> = r.tags.into_iter().map(|t| t.tag).collect();
        n.sort();
        n
    };
    let left_out = c.top_tags(top(false)).await.unwrap().into_inner();
    assert_eq!(names(left_out), ["other"]);
    let all = c.top_tags(top(true)).await.unwrap().into_inner();
    assert_eq!(names(all), ["other", "vip", "women"]);
}
