//! Audience snapshots against the real server binary (#23, part 2): a saved
//! audience's members frozen with an id and the log position they were
//! read at; `SNAPSHOT n` in queries (count, member pages, exports, who
//! joined and who left against the live audience or another snapshot); an
//! unchanged audience's snapshot sharing the last one's members; erased
//! customers leaving them; dropped; kept across kill -9, checkpoints (a
//! dozen, so that segments are emptied into others) and restarts.

mod common;

use common::{Client, code, count, export_set};
use tagstore::proto::*;
use tonic::Code;

async fn tag(c: &mut Client, tag: &str, keys: &[&str]) {
    common::add_to_tag(c, tag, keys).await
}

async fn take(c: &mut Client, audience: &str) -> Result<SnapshotInfo, tonic::Status> {
    c.take_snapshot(TakeSnapshotRequest {
        audience: audience.into(),
        note: "approved for 11.11".into(),
    })
    .await
    .map(|r| r.into_inner().snapshot.unwrap_or_default())
}

async fn members(c: &mut Client, query: &str) -> Vec<String> {
    c.members(MembersRequest {
        query: query.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .customers
}

/// What the store must answer after the steps below.
async fn check(c: &mut Client) {
    // Snapshot 1 is dropped; 2 shares its members (a, b; b erased since).
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec!["SNAPSHOT 1".into()],
                as_of: None,
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(members(c, "SNAPSHOT 2").await, ["a"]);
    assert_eq!(members(c, "SNAPSHOT 3").await, ["a", "c"]);
    // Who joined since snapshot 2, and who left.
    assert_eq!(members(c, "高价值女性 AND NOT SNAPSHOT 2").await, ["c"]);
    assert_eq!(count(c, "SNAPSHOT 2 AND NOT 高价值女性").await, 0);
    assert_eq!(members(c, "SNAPSHOT 3 AND NOT SNAPSHOT 2").await, ["c"]);
    let list = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let rows: Vec<(u32, u64, u32)> = list
        .snapshots
        .iter()
        .map(|s| (s.id, s.count, s.shares_with))
        .collect();
    assert_eq!(rows, [(2, 2, 1), (3, 3, 0)]);
    assert_eq!(list.snapshots[1].audience, "高价值女性");
    assert_eq!(list.snapshots[1].query, "vip AND women");
    assert_eq!(list.snapshots[1].note, "approved for 11.11");
    assert!(list.snapshots[0].taken_lsn < list.snapshots[1].taken_lsn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_freeze_an_audience_while_the_data_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    tag(&mut c, "vip", &["a", "b", "c", "d"]).await;
    tag(&mut c, "women", &["a", "b", "e"]).await;
    // A tag may still be called `snapshot`.
    tag(&mut c, "snapshot", &["f"]).await;
    assert_eq!(count(&mut c, "snapshot").await, 1);
    c.create_audience(CreateAudienceRequest {
        name: "高价值女性".into(),
        query: "vip AND women".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let one = take(&mut c, "高价值女性").await.unwrap();
    assert_eq!((one.id, one.count, one.shares_with), (1, 2, 0));
    // Unchanged: the next one shares its members.
    let two = take(&mut c, "高价值女性").await.unwrap();
    assert_eq!((two.id, two.count, two.shares_with), (2, 2, 1));
    // The data changes; the snapshots do not.
    tag(&mut c, "women", &["c"]).await;
    assert_eq!(count(&mut c, "高价值女性").await, 3);
    assert_eq!(members(&mut c, "SNAPSHOT 1").await, ["a", "b"]);
    let three = take(&mut c, "高价值女性").await.unwrap();
    assert_eq!((three.id, three.count, three.shares_with), (3, 3, 0));
    assert_eq!(
        export_set(&mut c, "SNAPSHOT 3").await,
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    );
    // An erased customer leaves every snapshot.
    c.delete_customers(DeleteCustomersRequest {
        customers: vec!["b".into()],
    })
    .await
    .unwrap();
    assert_eq!(members(&mut c, "SNAPSHOT 1").await, ["a"]);
    c.drop_snapshot(DropSnapshotRequest { id: 1 })
        .await
        .unwrap();
    check(&mut c).await;

    // Refusals.
    assert_eq!(code(take(&mut c, "nobody").await), Code::NotFound);
    assert_eq!(
        code(c.drop_snapshot(DropSnapshotRequest { id: 1 }).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.count(CountRequest {
                queries: vec!["SNAPSHOT 99".into()],
                as_of: None,
            })
            .await
        ),
        Code::NotFound
    );

    // Across kill -9 (from the log), then a dozen checkpoints with writes
    // between them (segments emptied into others) and a clean restart
    // (members read from their segment).
    server.kill();
    drop(server);
    let mut server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check(&mut c).await;
    for i in 0..12 {
        tag(&mut c, &format!("t{i}"), &["x", "y"]).await;
        c.checkpoint(CheckpointRequest::default()).await.unwrap();
    }
    check(&mut c).await;
    server.stop().unwrap();
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    check(&mut c).await;
    let s = take(&mut c, "高价值女性").await.unwrap();
    assert_eq!(s.shares_with, 3, "unchanged since snapshot 3");
    // A snapshot alone in its segment (nothing else changed since the
    // last checkpoint), then more checkpoints and a restart: its members
    // are still there.
    tag(&mut c, "women", &["d"]).await;
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    let alone = take(&mut c, "高价值女性").await.unwrap();
    assert_eq!((alone.count, alone.shares_with), (3, 0));
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    for i in 0..10 {
        tag(&mut c, &format!("u{i}"), &["x"]).await;
        c.checkpoint(CheckpointRequest::default()).await.unwrap();
    }
    drop(server);
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    assert_eq!(
        members(&mut c, &format!("SNAPSHOT {}", alone.id)).await,
        ["a", "c", "d"]
    );
    assert_eq!(members(&mut c, "SNAPSHOT 3").await, ["a", "c"]);
}

/// A TakeSnapshot whose caller gives up at any moment is whole or not
/// taken: every snapshot listed has all its members; the largest note is
/// taken and one byte more refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_cancelled_halfway_is_whole_or_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let mut c = common::client(&server).await;
    let keys: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    tag(&mut c, "vip", &refs).await;
    tag(&mut c, "women", &refs[..12_000]).await;
    c.create_audience(CreateAudienceRequest {
        name: "aud".into(),
        query: "vip AND women".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for micros in (0..40).map(|i| i * 150) {
        // Each try on a changed audience, so that it has members of its own.
        tag(&mut c, "women", &[refs[12_000 + micros as usize / 150]]).await;
        let mut caller = c.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_micros(micros),
            caller.take_snapshot(TakeSnapshotRequest {
                audience: "aud".into(),
                note: String::new(),
            }),
        )
        .await;
    }
    // Whatever reached the writer is done by the time a checkpoint is.
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    let list = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    for s in &list.snapshots {
        assert_eq!(
            count(&mut c, &format!("SNAPSHOT {}", s.id)).await,
            s.count,
            "snapshot {}",
            s.id
        );
    }
    eprintln!("{} of 40 tries were taken", list.snapshots.len());
    let note = |n: usize| TakeSnapshotRequest {
        audience: "aud".into(),
        note: "n".repeat(n),
    };
    assert!(c.take_snapshot(note(4096)).await.is_ok());
    assert_eq!(
        code(c.take_snapshot(note(4097)).await),
        Code::InvalidArgument
    );
}
