//! The audit trail (#22) against the real server with tokens: reads of
//! customers and changes to them are recorded with the token's name, the
//! call, how many customers and about what, failed calls with their
//! status, counts not at all; `ReadAudit` filters by token, call, subject
//! (a customer's key) and pages; the trail survives a restart and kill -9;
//! a damaged file does not stop the server, and reading through it is
//! DATA_LOSS naming the file.

mod common;

use std::path::Path;
use std::process::Command;

use tagstore::proto::*;
use tonic::Code;

fn token(file: &Path, name: &str, role: &str) -> String {
    let out = Command::new(common::binary())
        .args(["token", "add", name, "--role", role, "--file"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

async fn read(c: &mut common::Client, req: ReadAuditRequest) -> Vec<AuditRecord> {
    c.read_audit(req).await.unwrap().into_inner().records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_read_or_changed_which_customers_is_recorded_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let ops = token(&tokens, "ops", "admin");
    let analyst = token(&tokens, "analyst", "read");
    let loader = token(&tokens, "loader", "write");
    let data = dir.path().join("data");
    let args = ["--tokens", tokens.to_str().unwrap()];
    let mut server = common::start(&data, &args);
    let mut ops_c = server_client(&server, &ops).await;
    let mut analyst_c = server_client(&server, &analyst).await;
    let mut loader_c = server_client(&server, &loader).await;
    ops_c
        .create_tag(CreateTagRequest {
            name: "vip".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    loader_c
        .update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "vip".into(),
                add: vec!["phone:13800001111".into(), "phone:13900002222".into()],
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap();
    analyst_c
        .profile(ProfileRequest {
            customer: "phone:13800001111".into(),
            recent_days: 0,
        })
        .await
        .unwrap();
    let missing = analyst_c
        .profile(ProfileRequest {
            customer: "phone:10000000000".into(),
            recent_days: 0,
        })
        .await;
    assert_eq!(common::code(missing), Code::NotFound);
    analyst_c
        .members(MembersRequest {
            query: "vip".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut export = analyst_c
        .export(ExportRequest {
            query: "vip".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while export.message().await.unwrap().is_some() {}
    // Counts name no one: not recorded.
    analyst_c
        .count(CountRequest {
            queries: vec!["vip".into()],
            as_of: None,
        })
        .await
        .unwrap();
    ops_c
        .delete_customers(DeleteCustomersRequest {
            customers: vec!["phone:13900002222".into()],
        })
        .await
        .unwrap();

    let all = read(&mut ops_c, ReadAuditRequest::default()).await;
    let rows: Vec<(&str, &str, u64, &str, &str)> = all
        .iter()
        .map(|r| {
            (
                r.who.as_str(),
                r.method.as_str(),
                r.customers,
                r.subject.as_str(),
                r.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("loader", "Update", 2, "tags vip", "OK"),
            ("analyst", "Profile", 1, "phone:13800001111", "OK"),
            ("analyst", "Profile", 0, "phone:10000000000", "NotFound"),
            ("analyst", "Members", 2, "vip", "OK"),
            ("analyst", "Export", 2, "vip", "OK"),
            ("ops", "DeleteCustomers", 1, "phone:13900002222", "OK"),
        ]
    );
    assert!(
        all.windows(2)
            .all(|w| w[0].seq < w[1].seq && w[0].at_ms <= w[1].at_ms)
    );
    // Who looked at this person?
    let about = read(
        &mut ops_c,
        ReadAuditRequest {
            subject: "13800001111".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(about.len(), 1);
    assert_eq!(
        (about[0].who.as_str(), about[0].method.as_str()),
        ("analyst", "Profile")
    );
    let by_analyst = read(
        &mut ops_c,
        ReadAuditRequest {
            who: "analyst".into(),
            limit: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_analyst.len(), 2);
    let rest = ops_c
        .read_audit(ReadAuditRequest {
            who: "analyst".into(),
            after: by_analyst[1].seq,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rest.records.len(), rest.more), (2, false));
    // Only an admin reads the trail.
    let denied = analyst_c.read_audit(ReadAuditRequest::default()).await;
    assert_eq!(common::code(denied), Code::PermissionDenied);
    let bad = ops_c
        .read_audit(ReadAuditRequest {
            limit: 10_001,
            ..Default::default()
        })
        .await;
    assert_eq!(common::code(bad), Code::InvalidArgument);

    // kill -9: what was recorded before the answer is still there, and the
    // numbers go on.
    server.kill();
    server = common::start(&data, &args);
    let mut ops_c = server_client(&server, &ops).await;
    let mut analyst_c = server_client(&server, &analyst).await;
    analyst_c
        .profile(ProfileRequest {
            customer: "phone:13800001111".into(),
            recent_days: 0,
        })
        .await
        .unwrap();
    let all2 = read(&mut ops_c, ReadAuditRequest::default()).await;
    assert_eq!(all2.len(), all.len() + 1, "{all2:?}");
    assert!(all2.last().unwrap().seq > all.last().unwrap().seq);

    // A damaged file: the server starts, says so when read through it.
    server.stop().unwrap();
    // (A file per start: the first holds the records before the kill.)
    let first = data.join("audit-0000000000000001.log");
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[40] ^= 0x55;
    std::fs::write(&first, &bytes).unwrap();
    let server = common::start(&data, &args);
    let mut ops_c = server_client(&server, &ops).await;
    let err = ops_c
        .read_audit(ReadAuditRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err}");
    assert!(
        err.message().contains("audit-0000000000000001.log"),
        "{err}"
    );
}

async fn server_client(server: &common::TestServer, token: &str) -> common::Client {
    server.client_with_token(Some(token)).await.unwrap()
}
