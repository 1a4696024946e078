//! Reads as of the past against the real server (#23, part 4): writes
//! with checkpoints and a kill -9 between them, then every count, member
//! page and export asked as of each acknowledged write's position equals a
//! model of the writes up to it; a restart keeps it so. Moments outside the
//! history (before it, ahead of the store, a day not ended) are
//! OUT_OF_RANGE, a malformed day INVALID_ARGUMENT, a server keeping no
//! history FAILED_PRECONDITION (and one that starts keeping it begins at
//! its next checkpoint); a customer erased since is left out of reads of
//! the past, also of one read before the erasure; a token limited to
//! categories is checked
//! against the store of that moment (a tag dropped since is still its
//! category's). `Stats` says where the history begins.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::proto::*;
use tonic::Code;

const TAGS: [&str; 3] = ["a", "b", "c"];

type Model = BTreeMap<String, BTreeSet<String>>;

fn at(position: u64) -> Option<AsOf> {
    Some(AsOf {
        at: Some(as_of::At::Position(position)),
    })
}

fn on(day: &str) -> Option<AsOf> {
    Some(AsOf {
        at: Some(as_of::At::Day(day.into())),
    })
}

async fn count_at(
    c: &mut common::Client,
    q: &str,
    as_of: Option<AsOf>,
) -> Result<u64, tonic::Status> {
    c.count(CountRequest {
        queries: vec![q.into()],
        as_of,
    })
    .await
    .map(|r| r.into_inner().counts[0])
}

/// Every member of `q` as of `as_of`, by pages of 7.
async fn pages_at(c: &mut common::Client, q: &str, as_of: Option<AsOf>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let r = c
            .members(MembersRequest {
                query: q.into(),
                limit: 7,
                cursor,
                identity_type: String::new(),
                as_of: as_of.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(r.customers);
        if r.next_cursor.is_empty() {
            return out;
        }
        cursor = r.next_cursor;
    }
}

async fn export_at(c: &mut common::Client, q: &str, as_of: Option<AsOf>) -> BTreeSet<String> {
    let mut s = c
        .export(ExportRequest {
            query: q.into(),
            batch_size: 5,
            as_of,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = BTreeSet::new();
    while let Some(m) = s.message().await.unwrap() {
        out.extend(m.customers);
    }
    out
}

fn token(file: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(common::binary())
        .arg("token")
        .arg("add")
        .args(args)
        .arg("--file")
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

/// Checks every recorded position against the model.
async fn check_all(c: &mut common::Client, history: &[(u64, Model)]) {
    for (lsn, want) in history {
        for t in TAGS {
            let n = count_at(c, t, at(*lsn)).await.unwrap();
            assert_eq!(n, want[t].len() as u64, "count {t} as of {lsn}");
        }
        let a_not_b: BTreeSet<String> = want["a"].difference(&want["b"]).cloned().collect();
        assert_eq!(
            pages_at(c, "a AND NOT b", at(*lsn)).await,
            a_not_b,
            "pages as of {lsn}"
        );
        assert_eq!(
            export_at(c, "b OR c", at(*lsn)).await,
            &want["b"] | &want["c"],
            "export as of {lsn}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_as_of_every_position_equal_the_model_across_checkpoints_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let tokens = dir.path().join("tokens.toml");
    let admin = token(&tokens, &["ops", "--role", "admin"]);
    let crm = token(&tokens, &["crm", "--role", "read", "--categories", "seg"]);
    let mut server = common::start(&data, &["--tokens", tokens.to_str().unwrap()]);
    let mut c = server.client_with_token(Some(&admin)).await.unwrap();
    for t in TAGS.iter().chain(&["secret"]) {
        let category = if *t == "secret" { "vip" } else { "seg" };
        c.create_tag(CreateTagRequest {
            name: t.to_string(),
            category: category.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    c.update(UpdateRequest {
        mutations: vec![Mutation {
            tag: "secret".into(),
            add: vec!["s1".into(), "s2".into()],
            ..Default::default()
        }],
        create_missing_tags: false,
    })
    .await
    .unwrap();
    // History begins at the first checkpoint.
    let first = c
        .checkpoint(CheckpointRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut model: Model = TAGS
        .iter()
        .map(|t| (t.to_string(), BTreeSet::new()))
        .collect();
    let mut history: Vec<(u64, Model)> = Vec::new();
    let mut rng = StdRng::seed_from_u64(23);
    let mut secret_at = 0;
    for step in 0..60 {
        let m = Mutation {
            tag: TAGS[rng.random_range(0..3)].into(),
            add: (0..rng.random_range(1..8))
                .map(|_| format!("k{}", rng.random_range(0..50)))
                .collect(),
            remove: (0..rng.random_range(0..4))
                .map(|_| format!("k{}", rng.random_range(0..50)))
                .collect(),
            ..Default::default()
        };
        let r = c
            .update(UpdateRequest {
                mutations: vec![m.clone()],
                create_missing_tags: false,
            })
            .await
            .unwrap()
            .into_inner();
        let set = model.get_mut(&m.tag).unwrap();
        set.extend(m.add.iter().cloned());
        for k in &m.remove {
            set.remove(k);
        }
        history.push((r.lsn, model.clone()));
        match step {
            15 | 40 => {
                c.checkpoint(CheckpointRequest::default()).await.unwrap();
            }
            25 => {
                // The tag a limited token may not read goes: it stays in the past.
                secret_at = r.lsn;
                c.drop_tag(DropTagRequest {
                    name: "secret".into(),
                })
                .await
                .unwrap();
            }
            30 => {
                server.kill();
                server = common::start(&data, &["--tokens", tokens.to_str().unwrap()]);
                c = server.client_with_token(Some(&admin)).await.unwrap();
            }
            _ => {}
        }
    }
    check_all(&mut c, &history).await;

    // Where the history begins, and moments outside it.
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert!(stats.history_versions >= 1, "{stats:?}");
    assert_eq!(stats.history_begins_position, first.lsn, "{stats:?}");
    assert!(stats.history_bytes > 0, "{stats:?}");
    let newest = stats.lsn;
    let e = count_at(&mut c, "a", at(newest + 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("ahead"), "{}", e.message());
    let e = count_at(&mut c, "a", at(first.lsn - 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("history begins"), "{}", e.message());
    let e = count_at(&mut c, "a", on("2020-01-01")).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let z = tagstore::fields::time::zone("Asia/Shanghai").unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let today =
        tagstore::fields::time::format_day(tagstore::fields::time::day_of(now_ms, &z).unwrap());
    let e = count_at(&mut c, "a", on(&today)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("has not ended"), "{}", e.message());
    for bad in ["2026-13-01", "yesterday", ""] {
        let e = count_at(&mut c, "a", on(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    // Analytics as of a position too.
    let (lsn, want) = &history[20];
    let o = c
        .overlap(OverlapRequest {
            queries: vec!["a".into(), "b".into()],
            as_of: at(*lsn),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(o.counts[0], want["a"].len() as u64);
    assert_eq!(o.counts[1], (&want["a"] & &want["b"]).len() as u64);
    assert_eq!(o.counts[3], want["b"].len() as u64);

    // A token limited to `seg`: the tags of `seg` then, yes; `secret`
    // (of `vip` then, dropped now), no.
    let mut limited = server.client_with_token(Some(&crm)).await.unwrap();
    assert_eq!(
        count_at(&mut limited, "a", at(secret_at)).await.unwrap(),
        history.iter().find(|h| h.0 == secret_at).unwrap().1["a"].len() as u64
    );
    assert_eq!(count_at(&mut c, "secret", at(secret_at)).await.unwrap(), 2);
    let e = count_at(&mut limited, "secret", at(secret_at))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The audit trail says which moment an export read.
    let audit = c
        .read_audit(ReadAuditRequest {
            method: "Export".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let last = audit.records.last().unwrap();
    assert!(
        last.subject.starts_with("b OR c as of position "),
        "{:?}",
        last.subject
    );

    // A clean restart: the same answers.
    drop((c, limited));
    assert!(server.stop().unwrap().success(), "{}", server.stderr());
    let server = common::start(&data, &["--tokens", tokens.to_str().unwrap()]);
    let mut c = server.client_with_token(Some(&admin)).await.unwrap();
    check_all(&mut c, &history).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_keeping_no_history_refuses_reads_as_of_the_past() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tagstore.toml");
    std::fs::write(&config, "history_days = 0\n").unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let mut c = common::client(&server).await;
    common::add_to_tag(&mut c, "t", &["x"]).await;
    let lsn = c.stats(StatsRequest {}).await.unwrap().into_inner().lsn;
    common::add_to_tag(&mut c, "t", &["y"]).await;
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    let e = count_at(&mut c, "t", at(lsn)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("history_days"), "{}", e.message());
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!((stats.history_versions, stats.history_bytes), (0, 0));
    assert!(!dir.path().join("data/history").exists());

    // History turned on: it begins at the next checkpoint, even one with
    // nothing new to write.
    drop(c);
    let mut server = server;
    assert!(server.stop().unwrap().success());
    let server = common::start(&dir.path().join("data"), &[]);
    let mut c = common::client(&server).await;
    let checkpointed = c
        .checkpoint(CheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .lsn;
    let stats = c.stats(StatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.history_versions, 1, "{stats:?}");
    assert_eq!(stats.history_begins_position, checkpointed, "{stats:?}");
    common::add_to_tag(&mut c, "t", &["z"]).await;
    assert_eq!(count_at(&mut c, "t", at(checkpointed)).await.unwrap(), 2);
    assert_eq!(count_at(&mut c, "t", None).await.unwrap(), 3);
    // An erasure is not undone by reading the past, even a past read (and
    // kept in memory) before it.
    c.delete_customers(DeleteCustomersRequest {
        customers: vec!["x".into()],
    })
    .await
    .unwrap();
    assert_eq!(count_at(&mut c, "t", at(checkpointed)).await.unwrap(), 1);
    assert_eq!(
        export_at(&mut c, "t", at(checkpointed)).await,
        BTreeSet::from(["y".to_string()])
    );
}
