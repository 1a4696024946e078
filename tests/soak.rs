//! A bounded soak over loopback: writers, deletes, exports with slow (and
//! some abandoned) readers, replaces completed and replaces cancelled
//! halfway, and checkpoints, all at once for `TAGSTORE_SOAK_SECS` seconds
//! (default 60). Afterwards, and again after a kill -9 and a restart:
//! every acknowledged write is present and nothing else, every completed
//! export was complete, resident memory came back to within
//! [`RSS_MARGIN`] of where it started, and a trivial count stayed under
//! [`TRIVIAL_P99`] at the 99th percentile throughout.
//!
//! Run by `.ci/run`; by hand: `cargo test --test soak -- --ignored`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Client, client, count};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tagstore::proto::{
    CheckpointRequest, DeleteCustomersRequest, ExportRequest, Mutation, ReplaceMembersRequest,
    UpdateRequest,
};
use tokio_stream::wrappers::ReceiverStream;

/// A trivial count's 99th percentile must stay under this while the soak runs.
const TRIVIAL_P99: Duration = Duration::from_millis(250);
/// Resident memory after the soak may exceed the figure before it by this much.
const RSS_MARGIN: u64 = 256 << 20;

type Model = BTreeMap<String, BTreeSet<String>>;

fn soak_time() -> Duration {
    let secs = std::env::var("TAGSTORE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

async fn check(c: &mut Client, model: &Model) {
    for (tag, want) in model {
        let got = common::export_set(c, tag).await;
        assert_eq!(
            got.len(),
            want.len(),
            "tag {tag}: {} members, the model has {}",
            got.len(),
            want.len()
        );
        assert!(&got == want, "tag {tag} differs from the model");
    }
}

/// Random adds and removes on its own tags; the model follows each
/// acknowledged write.
async fn writer(mut c: Client, tags: Vec<String>, seed: u64, until: Instant) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model: Model = tags.iter().map(|t| (t.clone(), BTreeSet::new())).collect();
    while Instant::now() < until {
        let tag = &tags[rng.random_range(0..tags.len())];
        let add: Vec<String> = (0..rng.random_range(1..200))
            .map(|_| format!("u{}", rng.random_range(0..20_000)))
            .collect();
        let remove: Vec<String> = (0..rng.random_range(0..100))
            .map(|_| format!("u{}", rng.random_range(0..20_000)))
            .filter(|k| !add.contains(k))
            .collect();
        c.update(UpdateRequest {
            mutations: vec![Mutation {
                tag: tag.clone(),
                add: add.clone(),
                remove: remove.clone(),
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap();
        let set = model.get_mut(tag).unwrap();
        set.extend(add);
        for k in &remove {
            set.remove(k);
        }
    }
    model
}

/// Adds customers to `dz` and erases them again; returns the ones left.
async fn deleter(mut c: Client, until: Instant) -> BTreeSet<String> {
    let mut left = BTreeSet::new();
    let mut round = 0u64;
    while Instant::now() < until {
        let batch: Vec<String> = (0..2000).map(|i| format!("d{round}-{i}")).collect();
        c.update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "dz".into(),
                add: batch.clone(),
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap();
        let gone: Vec<String> = batch.iter().step_by(2).cloned().collect();
        c.delete_customers(DeleteCustomersRequest { customers: gone })
            .await
            .unwrap();
        left.extend(batch.into_iter().skip(1).step_by(2));
        round += 1;
        // Every round adds 2,000 customers for good (ids are never reused).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    left
}

/// Exports of `big OR dz` read slowly; one in four is abandoned halfway.
/// Each completed export must hold exactly `total` distinct members.
async fn exporter(mut c: Client, seed: u64, until: Instant) -> (u32, u32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut completed, mut abandoned) = (0, 0);
    while Instant::now() < until {
        let mut s = c
            .export(ExportRequest {
                query: "big OR dz".into(),
                batch_size: 2000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let abandon = rng.random_range(0..4) == 0;
        let mut seen = BTreeSet::new();
        let mut total = None;
        let mut n = 0;
        while let Some(m) = s.message().await.unwrap() {
            total = Some(m.total);
            n += m.customers.len();
            seen.extend(m.customers);
            if abandon && n > 20_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if abandon && (n as u64) < total.unwrap_or(0) {
            abandoned += 1;
            continue;
        }
        let total = total.unwrap();
        assert_eq!(n as u64, total, "an export ended short");
        assert_eq!(seen.len(), n, "an export repeated members");
        completed += 1;
    }
    (completed, abandoned)
}

/// Replaces `r`: completed ones change the model, ones cancelled halfway
/// must change nothing.
async fn replacer(mut c: Client, seed: u64, until: Instant) -> (BTreeSet<String>, u32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut current = BTreeSet::new();
    let mut cancelled = 0;
    while Instant::now() < until {
        // Drawn from 5,000 keys, so that the store does not grow without end.
        let from = rng.random_range(0..2000);
        let set: Vec<String> = (from..from + rng.random_range(100..3000))
            .map(|i| format!("r-{i}"))
            .collect();
        let half = set.len() / 2;
        let msg = |customers: &[String], last: bool, first: bool| ReplaceMembersRequest {
            tag: if first { "r".into() } else { String::new() },
            customers: customers.to_vec(),
            last,
            ..Default::default()
        };
        if rng.random_range(0..3) == 0 {
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let mut other = c.clone();
            let call =
                tokio::spawn(async move { other.replace_members(ReceiverStream::new(rx)).await });
            tx.send(msg(&set[..half], false, true)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..30))).await;
            call.abort();
            let _ = call.await;
            cancelled += 1;
        } else {
            let msgs = vec![
                msg(&set[..half], false, true),
                msg(&set[half..], true, false),
            ];
            c.replace_members(tokio_stream::iter(msgs)).await.unwrap();
            current = set.into_iter().collect();
        }
        // Whatever happened, the tag is the last completed set.
        assert_eq!(count(&mut c, "r").await, current.len() as u64);
    }
    (current, cancelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a minute long: run by .ci/run, or with --ignored"]
async fn soak() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::start(dir.path(), &["--checkpoint-wal-mb", "8"]);
    let mut c = client(&server).await;
    let write_tags: Vec<String> = (0..8).map(|i| format!("w{i}")).collect();
    for t in write_tags
        .iter()
        .chain(["dz", "r", "big"].map(String::from).iter())
    {
        c.create_tag(tagstore::proto::CreateTagRequest {
            name: t.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for chunk in 0..4 {
        let keys: Vec<String> = (0..50_000).map(|i| format!("b{chunk}-{i}")).collect();
        c.update(UpdateRequest {
            mutations: vec![Mutation {
                tag: "big".into(),
                add: keys,
                ..Default::default()
            }],
            create_missing_tags: false,
        })
        .await
        .unwrap();
    }
    c.checkpoint(CheckpointRequest::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_start = server.rss_bytes().unwrap();

    let until = Instant::now() + soak_time();
    let mut writers = Vec::new();
    for (w, tags) in write_tags.chunks(4).enumerate() {
        let c = client(&server).await;
        writers.push(tokio::spawn(writer(c, tags.to_vec(), w as u64, until)));
    }
    let deletes = tokio::spawn(deleter(client(&server).await, until));
    let mut exports = Vec::new();
    for e in 0..4 {
        exports.push(tokio::spawn(exporter(
            client(&server).await,
            100 + e,
            until,
        )));
    }
    let replaces = tokio::spawn(replacer(client(&server).await, 7, until));
    let checkpoints = {
        let mut c = client(&server).await;
        tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(3)).await;
                c.checkpoint(CheckpointRequest {
                    merge_dictionary: n % 3 == 2,
                })
                .await
                .unwrap();
                n += 1;
            }
            n
        })
    };
    let probe = {
        let mut c = client(&server).await;
        tokio::spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let _ = count(&mut c, "w0").await;
                times.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            times
        })
    };

    let mut model = Model::new();
    for w in writers {
        model.extend(w.await.unwrap());
    }
    let dz = deletes.await.unwrap();
    let mut exported = (0, 0);
    for e in exports {
        let (done, gone) = e.await.unwrap();
        exported = (exported.0 + done, exported.1 + gone);
    }
    let (r, cancelled) = replaces.await.unwrap();
    let checkpoints = checkpoints.await.unwrap();
    let mut times = probe.await.unwrap();
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    eprintln!(
        "soak: {:?}; {} exports completed, {} abandoned; {cancelled} replaces cancelled; \
         {checkpoints} checkpoints; trivial count p50 {:?} p99 {p99:?} over {} probes",
        soak_time(),
        exported.0,
        exported.1,
        times[times.len() / 2],
        times.len()
    );
    assert!(exported.0 > 0 && cancelled > 0 && checkpoints > 0);
    assert!(
        p99 < TRIVIAL_P99,
        "a trivial count took {p99:?} at p99 (limit {TRIVIAL_P99:?})"
    );

    model.insert("dz".into(), dz);
    model.insert("r".into(), r);
    check(&mut c, &model).await;
    assert_eq!(count(&mut c, "big").await, 200_000);

    // Memory comes back once the streams have ended.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_end = server.rss_bytes().unwrap();
    eprintln!(
        "soak: RSS {} MiB before, {} MiB after",
        rss_start >> 20,
        rss_end >> 20
    );
    assert!(
        rss_end < rss_start + RSS_MARGIN,
        "RSS grew from {} to {} MiB",
        rss_start >> 20,
        rss_end >> 20
    );

    // kill -9, restart: every acknowledged write is there.
    drop(c);
    server.kill();
    let server = common::start(dir.path(), &[]);
    let mut c = client(&server).await;
    check(&mut c, &model).await;
}
