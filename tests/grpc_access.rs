//! Access control against the real server: every call of the proto × every
//! role (and no token, a wrong token, a counts-only token), so that a call
//! added without a rule fails here; tokens made, revoked and read again on
//! SIGHUP; the shell with a token; and a server refusing to listen beyond
//! loopback without tokens.

mod common;

use std::path::Path;
use std::process::Command;

use prost::Message;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;

/// Runs `tagstore token …`; its stdout (the token, for `add`).
fn token_cmd(args: &[&str]) -> String {
    let out = Command::new(common::binary())
        .arg("token")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tagstore token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn add(file: &Path, name: &str, role: &str, counts_only: bool) -> String {
    let file = file.to_str().unwrap();
    let mut args = vec!["add", name, "--role", role, "--file", file];
    if counts_only {
        args.push("--counts-only");
    }
    token_cmd(&args)
}

/// Every method of `tagstore.v1.TagStore`: name, client streaming, server
/// streaming.
fn methods() -> Vec<(String, bool, bool)> {
    let set = prost_types::FileDescriptorSet::decode(tagstore::proto::FILE_DESCRIPTOR_SET).unwrap();
    set.file
        .iter()
        .flat_map(|f| &f.service)
        .filter(|s| s.name() == "TagStore")
        .flat_map(|s| &s.method)
        .map(|m| {
            (
                m.name().to_string(),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect()
}

/// A client for any path, ready to call.
async fn raw(addr: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc
}

/// Calls `method` with an empty request (or an empty stream) and `token`;
/// the status it ends with (`Ok` for success).
async fn call(addr: &str, method: &str, streams: (bool, bool), token: Option<&str>) -> Code {
    let mut grpc = raw(addr).await;
    let path = PathAndQuery::from_maybe_shared(format!("/tagstore.v1.TagStore/{method}")).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    fn with<T>(token: Option<&str>, mut req: tonic::Request<T>) -> tonic::Request<T> {
        if let Some(t) = token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    }
    let result: Result<(), tonic::Status> = match streams {
        (false, false) => grpc
            .unary(with(token, tonic::Request::new(())), path, codec)
            .await
            .map(|_| ()),
        (true, false) => grpc
            .client_streaming(
                with(token, tonic::Request::new(tokio_stream::empty::<()>())),
                path,
                codec,
            )
            .await
            .map(|_| ()),
        (false, true) => match grpc
            .server_streaming(with(token, tonic::Request::new(())), path, codec)
            .await
        {
            Ok(r) => r.into_inner().message().await.map(|_| ()),
            Err(e) => Err(e),
        },
        (true, true) => match grpc
            .streaming(
                with(token, tonic::Request::new(tokio_stream::empty::<()>())),
                path,
                codec,
            )
            .await
        {
            Ok(r) => r.into_inner().message().await.map(|_| ()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_against_every_role() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let read = add(&file, "analyst", "read", false);
    let counter = add(&file, "counter", "read", true);
    let write = add(&file, "ingest-svc", "write", false);
    let admin = add(&file, "ops", "admin", false);
    let limited = token_cmd(&[
        "add",
        "crm",
        "--role",
        "write",
        "--categories",
        "消费偏好",
        "--file",
        file.to_str().unwrap(),
    ]);
    let listed = token_cmd(&["list", "--file", file.to_str().unwrap()]);
    assert!(
        listed.contains("analyst\tread") && listed.contains("counter\tread (counts only)"),
        "{listed}"
    );
    assert!(!listed.contains(&read), "a listing shows no secret");

    let data = dir.path().join("data");
    let server = common::start(&data, &["--tokens", file.to_str().unwrap()]);
    let addr = server.addr.clone();
    let all = methods();
    assert!(all.len() > 20);
    let mut checked = 0;
    for (method, cs, ss) in &all {
        let rule = tagstore::access::rule_for(method)
            .unwrap_or_else(|| panic!("{method} has no access rule"));
        let streams = (*cs, *ss);
        assert_eq!(
            call(&addr, method, streams, None).await,
            Code::Unauthenticated,
            "{method} without a token"
        );
        assert_eq!(
            call(&addr, method, streams, Some("tst1_0011_2233")).await,
            Code::Unauthenticated,
            "{method} with an unknown token"
        );
        for (token, role, counts_only) in [
            (&read, tagstore::access::Role::Read, false),
            (&counter, tagstore::access::Role::Read, true),
            (&write, tagstore::access::Role::Write, false),
            (&admin, tagstore::access::Role::Admin, false),
        ] {
            let got = call(&addr, method, streams, Some(token)).await;
            let allowed = role >= rule.role && !(counts_only && rule.lists_customers);
            if allowed {
                assert!(
                    !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                    "{method} as {role} (counts only: {counts_only}): {got:?}"
                );
            } else {
                assert_eq!(
                    got,
                    Code::PermissionDenied,
                    "{method} as {role} (counts only: {counts_only})"
                );
            }
            checked += 1;
        }
        // Limited to a category: calls that reach every category are
        // refused, calls that reach none are not; the others check what
        // they name (tested below).
        let got = call(&addr, method, streams, Some(&limited)).await;
        use tagstore::access::{Reach, Role};
        match rule.reach {
            _ if rule.role > Role::Write => {
                assert_eq!(got, Code::PermissionDenied, "{method} limited")
            }
            Reach::Every => assert_eq!(got, Code::PermissionDenied, "{method} limited"),
            Reach::Nothing => assert!(
                !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                "{method} limited: {got:?}"
            ),
            Reach::Named => assert_ne!(got, Code::Unauthenticated, "{method} limited"),
        }
    }
    assert_eq!(checked, all.len() * 4);

    // Health checks need no token.
    let mut grpc = raw(&addr).await;
    let health = grpc
        .unary(
            tonic::Request::new(()),
            PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert!(health.is_ok(), "{health:?}");

    // The typed client with a token.
    let mut c = server.client_with_token(Some(&read)).await.unwrap();
    let n = c
        .count(tagstore::proto::CountRequest {
            queries: vec!["ALL".into()],
            as_of: None,
        })
        .await
        .unwrap();
    assert_eq!(n.into_inner().counts, [0]);
    let e = c
        .create_tag(tagstore::proto::CreateTagRequest {
            name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("admin") && e.message().contains("analyst"),
        "{}",
        e.message()
    );

    // Saving an audience takes the write role; keeping it current defines
    // a rule, which takes the admin role, and so does changing or dropping
    // an audience that is kept.
    use tagstore::proto::{CreateAudienceRequest, DropAudienceRequest};
    let mut w = server.client_with_token(Some(&write)).await.unwrap();
    let mut a = server.client_with_token(Some(&admin)).await.unwrap();
    let save = |name: &str, kept_current: bool| CreateAudienceRequest {
        name: name.into(),
        query: "ALL".into(),
        kept_current,
        replace: true,
        ..Default::default()
    };
    w.create_audience(save("plain", false)).await.unwrap();
    let e = w.create_audience(save("kept", true)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("admin"), "{e}");
    a.create_audience(save("kept", true)).await.unwrap();
    for e in [
        w.create_audience(save("kept", false)).await.unwrap_err(),
        w.drop_audience(DropAudienceRequest {
            name: "kept".into(),
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }
    w.drop_audience(DropAudienceRequest {
        name: "plain".into(),
    })
    .await
    .unwrap();
    a.drop_audience(DropAudienceRequest {
        name: "kept".into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_read_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let f = file.to_str().unwrap();
    let writer = add(&file, "svc", "write", false);
    let server = common::start(&dir.path().join("data"), &["--tokens", f]);
    let stats = |token: String| {
        let addr = server.addr.clone();
        async move { call(&addr, "Stats", (false, false), Some(&token)).await }
    };
    assert_eq!(stats(writer.clone()).await, Code::Ok);
    let later = add(&file, "later", "read", false);
    assert_eq!(stats(later.clone()).await, Code::Unauthenticated);
    token_cmd(&["revoke", "svc", "--file", f]);
    // Not read yet: the revoked token still works, the new one not yet.
    assert_eq!(stats(writer.clone()).await, Code::Ok);
    let pid = server.pid().unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stats(later.clone()).await != Code::Ok {
        assert!(std::time::Instant::now() < deadline, "SIGHUP not acted on");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stats(writer.clone()).await, Code::Unauthenticated);
    // A file that does not read leaves the tokens in force.
    std::fs::write(&file, "this is not toml [").unwrap();
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(stats(later).await, Code::Ok);
    assert!(server.stderr().contains("tokens before stay in force"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_only_with_tokens_and_the_shell_sends_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let err = common::try_start(&dir.path().join("d1"), &["--listen", "0.0.0.0:0"])
        .err()
        .expect("must refuse to start");
    assert!(err.contains("--open-without-tokens"), "{err}");
    // A tokens file that does not exist is refused too, with how to make one.
    let missing = dir.path().join("none.toml");
    let err = common::try_start(
        &dir.path().join("d2"),
        &["--tokens", missing.to_str().unwrap()],
    )
    .err()
    .expect("must refuse to start");
    assert!(err.contains("tagstore token add"), "{err}");

    let file = dir.path().join("tokens.toml");
    let admin = add(&file, "ops", "admin", false);
    let server = common::start(
        &dir.path().join("d3"),
        &["--listen", "0.0.0.0:0", "--tokens", file.to_str().unwrap()],
    );
    let port = server.addr.rsplit(':').next().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let shell = |token: Option<&str>, env: Option<&str>| {
        let mut cmd = Command::new(
            tagstore_test_support::server_binary(None)
                .parent()
                .unwrap()
                .join("tagstore-shell"),
        );
        cmd.args(["-a", &addr, "-c", "create tag vip"]);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.env_remove("TAGSTORE_TOKEN");
        if let Some(t) = env {
            cmd.env("TAGSTORE_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = shell(None, None);
    assert!(!out.status.success());
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("token"), "{said}");
    assert!(shell(Some(&admin), None).status.success());
    let out = shell(None, Some(&admin));
    // The tag exists now: refused for that, not for want of a token.
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("exists"), "{said}");
}

/// SIGHUP to a server with nothing to read again leaves it serving (before,
/// with no handler, the signal ended the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_tokens_or_tls_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let pid = server.pid().unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !server.stderr().contains("SIGHUP: no tokens file") {
        assert!(std::time::Instant::now() < deadline, "{}", server.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(&server.addr, "Stats", (false, false), None).await,
        Code::Ok
    );
}

/// A token limited to tag categories names and sees only their tags and
/// fields: directly, through saved audiences and snapshots, in listings,
/// profiles, watches and writes; calls that reach every category are
/// refused; an admin token cannot be limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_limited_to_categories_uses_only_their_tags() {
    use tagstore::proto::*;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    let f = file.to_str().unwrap();
    let admin = add(&file, "ops", "admin", false);
    let crm = token_cmd(&[
        "add",
        "crm",
        "--role",
        "write",
        "--categories",
        "消费偏好,渠道",
        "--file",
        f,
    ]);
    let refused = Command::new(common::binary())
        .args([
            "token",
            "add",
            "boss",
            "--role",
            "admin",
            "--categories",
            "x",
            "--file",
            f,
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot be limited"));
    let listed = token_cmd(&["list", "--file", f]);
    assert!(
        listed.contains("crm\twrite, categories 消费偏好, 渠道"),
        "{listed}"
    );

    let server = common::start(&dir.path().join("data"), &["--tokens", f]);
    let mut ops = server.client_with_token(Some(&admin)).await.unwrap();
    let mut c = server.client_with_token(Some(&crm)).await.unwrap();
    for (tag, category) in [("常购护肤品", "消费偏好"), ("高价值用户", "价值")] {
        ops.create_tag(CreateTagRequest {
            name: tag.into(),
            category: category.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    ops.create_field(CreateFieldRequest {
        name: "lifecycle".into(),
        category: "生命周期".into(),
        kind: FieldKind::Enum as i32,
        values: vec!["new".into(), "active".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    ops.update(UpdateRequest {
        mutations: vec![
            Mutation {
                tag: "常购护肤品".into(),
                add: vec!["u1".into(), "u2".into()],
                ..Default::default()
            },
            Mutation {
                tag: "高价值用户".into(),
                add: vec!["u1".into()],
                ..Default::default()
            },
        ],
        create_missing_tags: false,
    })
    .await
    .unwrap();
    for (name, query) in [
        ("护肤", "常购护肤品"),
        ("混合", "常购护肤品 AND 高价值用户"),
    ] {
        ops.create_audience(CreateAudienceRequest {
            name: name.into(),
            query: query.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Kept current, its rule tag in an allowed category: still judged by
    // what its query reaches.
    ops.create_audience(CreateAudienceRequest {
        name: "混合_kept".into(),
        query: "常购护肤品 AND 高价值用户".into(),
        category: "消费偏好".into(),
        kept_current: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let snap = ops
        .take_snapshot(TakeSnapshotRequest {
            audience: "混合".into(),
            note: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .id;

    // Queries: allowed tags and audiences count; others are refused,
    // however they are reached.
    let count = |q: &str| CountRequest {
        queries: vec![q.to_string()],
        as_of: None,
    };
    assert_eq!(
        c.count(count("常购护肤品 OR 护肤"))
            .await
            .unwrap()
            .into_inner()
            .counts,
        vec![2]
    );
    for q in [
        "高价值用户".to_string(),
        "常购护肤品 AND NOT 高价值用户".to_string(),
        "混合".to_string(),
        "混合_kept".to_string(),
        "护肤 AND 混合_kept".to_string(),
        format!("SNAPSHOT {snap}"),
        "lifecycle = 'active'".to_string(),
    ] {
        let got = c.count(count(&q)).await;
        assert_eq!(common::code(got), Code::PermissionDenied, "{q}");
    }
    let denied = c.count(count("高价值用户")).await.unwrap_err();
    assert!(
        denied.message().contains("crm") && denied.message().contains("高价值用户"),
        "{denied:?}"
    );
    let members = c
        .members(MembersRequest {
            query: "混合".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(common::code(members), Code::PermissionDenied);
    let export = c
        .export(ExportRequest {
            query: "高价值用户".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(common::code(export), Code::PermissionDenied);

    // Listings and profiles show only the allowed ones.
    let tags = c
        .list_tags(ListTagsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = tags.tags.into_iter().map(|t| t.name).collect();
    assert_eq!(names, vec!["常购护肤品".to_string()]);
    let fields = c
        .list_fields(ListFieldsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(fields.fields.is_empty());
    let audiences = c
        .list_audiences(ListAudiencesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = audiences.audiences.into_iter().map(|a| a.name).collect();
    assert_eq!(names, vec!["护肤".to_string()]);
    let snapshots = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(snapshots.snapshots.is_empty());
    let profile = c
        .profile(ProfileRequest {
            customer: "u1".into(),
            recent_days: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(profile.tags, vec!["常购护肤品".to_string()]);
    for got in [
        common::code(
            c.describe_tag(DescribeTagRequest {
                name: "高价值用户".into(),
            })
            .await,
        ),
        common::code(
            c.watch(WatchRequest {
                tags: vec!["高价值用户".into()],
                ..Default::default()
            })
            .await,
        ),
        common::code(
            c.watch(WatchRequest {
                audiences: vec!["混合_kept".into()],
                ..Default::default()
            })
            .await,
        ),
        common::code(
            c.top_tags(TopTagsRequest {
                query: "ALL".into(),
                k: 5,
                ..Default::default()
            })
            .await,
        ),
        common::code(
            c.breakdown(BreakdownRequest {
                query: "ALL".into(),
                by: Some(breakdown_request::By::Field("lifecycle".into())),
                as_of: None,
                ..Default::default()
            })
            .await,
        ),
        common::code(
            c.tag_history(TagHistoryRequest {
                name: "高价值用户".into(),
                days: 7,
            })
            .await,
        ),
    ] {
        assert_eq!(got, Code::PermissionDenied);
    }
    let top = c
        .top_tags(TopTagsRequest {
            query: "ALL".into(),
            k: 5,
            category: "消费偏好".into(),
            include_query_tags: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tags: Vec<&str> = top.tags.iter().map(|t| t.tag.as_str()).collect();
    assert_eq!(tags, ["常购护肤品"], "no kept audience reaching elsewhere");
    // The breakdown by category: the limited token does not see it, the
    // admin sees it where its category puts it.
    let by_category = BreakdownRequest {
        query: "ALL".into(),
        by: Some(breakdown_request::By::Category("消费偏好".into())),
        ..Default::default()
    };
    for (client, expected) in [
        (&mut c, vec!["常购护肤品"]),
        (&mut ops, vec!["常购护肤品", "混合_kept"]),
    ] {
        let rows = client
            .breakdown(by_category.clone())
            .await
            .unwrap()
            .into_inner()
            .rows;
        let mut labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
        labels.sort_unstable();
        assert_eq!(labels, expected);
    }

    // Writes: allowed tags only, no new tags, no fields of others, no
    // ingestion (it reaches every category).
    let write = |tag: &str, create: bool| UpdateRequest {
        mutations: vec![Mutation {
            tag: tag.into(),
            add: vec!["u3".into()],
            ..Default::default()
        }],
        create_missing_tags: create,
    };
    assert!(c.update(write("常购护肤品", false)).await.is_ok());
    for (tag, create) in [("高价值用户", false), ("新标签", true)] {
        assert_eq!(
            common::code(c.update(write(tag, create)).await),
            Code::PermissionDenied,
            "{tag}"
        );
    }
    let set = c
        .set_values(SetValuesRequest {
            writes: vec![ValueWrite {
                field: "lifecycle".into(),
                customer: "u1".into(),
                value: Some(value_write::Value::EnumValue("active".into())),
            }],
        })
        .await;
    assert_eq!(common::code(set), Code::PermissionDenied);
    let replace = c
        .replace_members(tokio_stream::iter(vec![ReplaceMembersRequest {
            tag: "高价值用户".into(),
            customers: vec!["u9".into()],
            last: true,
            ..Default::default()
        }]))
        .await;
    assert_eq!(common::code(replace), Code::PermissionDenied);
    let ingest = c
        .ingest(tokio_stream::iter(Vec::<IngestRequest>::new()))
        .await;
    let ingest = match ingest {
        Ok(r) => r.into_inner().message().await.map(|_| ()),
        Err(s) => Err(s),
    };
    assert_eq!(common::code(ingest), Code::PermissionDenied);
    // Nothing it could not use was changed.
    assert_eq!(
        ops.count(count("高价值用户"))
            .await
            .unwrap()
            .into_inner()
            .counts,
        vec![1]
    );
}
