//! `Watch` against a server run in this process on an in-memory file
//! system whose change-feed file fails (a write error, a full disk).
//!
//! The feed is derived data: a feed file that cannot be written fails no
//! write, and the feed starts again after that write. Over gRPC that must
//! never reach a watcher as a hole:
//! - a watcher following live when the feed starts again is given every
//!   write in order or ends with OUT_OF_RANGE (resynchronise), never the
//!   writes after the failed one without it;
//! - a new watch from before the new start is OUT_OF_RANGE;
//! - one from the write the feed missed on sees every later write, also
//!   after a restart.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use tagstore::config::FileConfig;
use tagstore::proto::membership_change::Kind;
use tagstore::proto::tag_store_client::TagStoreClient;
use tagstore::proto::{CreateTagRequest, Mutation, UpdateRequest, WatchRequest, WatchResponse};
use tagstore::storage::fs::{MemFs, Op};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type Client = TagStoreClient<Channel>;

/// Adds `keys` to tag `t`; the write's lsn.
async fn add(c: &mut Client, keys: &[&str]) -> u64 {
    c.update(UpdateRequest {
        mutations: vec![Mutation {
            tag: "t".into(),
            add: keys.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        }],
        create_missing_tags: false,
    })
    .await
    .unwrap()
    .into_inner()
    .lsn
}

async fn watch(c: &mut Client, after: u64) -> Result<Streaming<WatchResponse>, tonic::Status> {
    c.watch(WatchRequest {
        tags: vec!["t".into()],
        after_lsn: Some(after),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

/// Reads until the write at `lsn` is complete: each write's lsn and the
/// keys it entered, in order (a message naming no change, the position a
/// stream starts from, is left out); or the status the stream ended with.
async fn read_to(
    s: &mut Streaming<WatchResponse>,
    lsn: u64,
) -> Result<Vec<(u64, BTreeSet<String>)>, tonic::Status> {
    let mut out: Vec<(u64, BTreeSet<String>)> = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| panic!("no message for 30 s, waiting for lsn {lsn}: {out:?}"))?
            .unwrap_or_else(|| panic!("the stream ended without a status: {out:?}"));
        if out.last().is_none_or(|(l, _)| *l != msg.lsn) {
            out.push((msg.lsn, BTreeSet::new()));
        }
        let keys = &mut out.last_mut().unwrap().1;
        for ch in &msg.changes {
            assert_eq!(ch.kind(), Kind::Entered, "{ch:?}");
            keys.insert(ch.customer_key.clone());
        }
        if msg.write_complete && msg.lsn >= lsn {
            out.retain(|(_, keys)| !keys.is_empty());
            return Ok(out);
        }
    }
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_file_that_fails_never_gives_a_watcher_a_hole() {
    for errno in [libc::EIO, libc::ENOSPC] {
        let label = format!("errno {errno}");
        let fs = MemFs::default();
        let server = common::InProcessServer::start(fs.clone(), FileConfig::default(), None).await;
        let mut c = server.client().await;
        c.create_tag(CreateTagRequest {
            name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let start = add(&mut c, &["a0"]).await;
        let mut live = watch(&mut c, start).await.unwrap();
        let a = add(&mut c, &["a1", "a2", "a3"]).await;
        assert_eq!(
            read_to(&mut live, a).await.unwrap(),
            vec![(a, set(&["a1", "a2", "a3"]))],
            "{label}"
        );

        // The feed's next write fails; the store's write goes through.
        fs.fail(Op::Write, "feed-", 0, 1, errno);
        let b = add(&mut c, &["b1", "b2"]).await;
        assert_eq!(fs.faults_pending(), 0, "{label}: the fault was not reached");
        let d = add(&mut c, &["d1", "d2", "d3", "d4"]).await;

        // The live watcher: every write in order, or OUT_OF_RANGE.
        match read_to(&mut live, d).await {
            Ok(seen) => assert_eq!(
                seen,
                vec![(b, set(&["b1", "b2"])), (d, set(&["d1", "d2", "d3", "d4"]))],
                "{label}: the live watcher"
            ),
            Err(e) => {
                assert_eq!(e.code(), Code::OutOfRange, "{label}: {e}");
                assert!(e.message().contains("resynchronise"), "{label}: {e}");
            }
        }
        // A new watch from before the new start is refused.
        let e = watch(&mut c, a).await.unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{label}: {e}");
        // From the write the feed missed on: everything after it.
        let mut s = watch(&mut c, b).await.unwrap();
        assert_eq!(
            read_to(&mut s, d).await.unwrap(),
            vec![(d, set(&["d1", "d2", "d3", "d4"]))],
            "{label}"
        );
        drop((s, live, c));
        server.stop().await;

        // Also after a restart on what the server left.
        let server = common::InProcessServer::start(fs, FileConfig::default(), None).await;
        let mut c = server.client().await;
        let mut s = watch(&mut c, b).await.unwrap();
        assert_eq!(
            read_to(&mut s, d).await.unwrap(),
            vec![(d, set(&["d1", "d2", "d3", "d4"]))],
            "{label}: after a restart"
        );
        let e = add(&mut c, &["e1"]).await;
        assert_eq!(
            read_to(&mut s, e).await.unwrap(),
            vec![(e, set(&["e1"]))],
            "{label}: after a restart, a write more"
        );
        drop((s, c));
        server.stop().await;
    }
}
