//! The README's demo, end to end against the real server: generate a small
//! year, create each file's source from its preset, ingest every file, and
//! find that every record was read: the only rejected ones are the
//! malformed rows the generator planted (a free amount, a cut-off row, a
//! masked phone alone, a day called "yesterday", a time that is a word,
//! a line that is not JSON, a fraction of a fen), and that the README's
//! queries over the facts find customers.

use std::process::Command;

use tagstore_proto::*;
use tagstore_test_support::{ServerProcess, count, server_binary, try_start};

async fn ingest_file(
    c: &mut tagstore_test_support::Client,
    source: &str,
    data: Vec<u8>,
) -> IngestResponse {
    let mut s = c
        .ingest(tokio_stream::iter(vec![IngestRequest {
            source: source.into(),
            seq: 1,
            data,
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    let answer = s.message().await.unwrap().expect("an answer");
    assert!(s.message().await.unwrap().is_none());
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_loads_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let gen_ = Command::new(env!("CARGO_BIN_EXE_tagstore-demo"))
        .args([
            "--out",
            out.to_str().unwrap(),
            "--customers",
            "400",
            "--end",
            "2026-11-29",
        ])
        .output()
        .unwrap();
    assert!(gen_.status.success(), "{gen_:?}");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server: ServerProcess = try_start(&server_binary(None), &data, &[]).unwrap();
    let mut c = server.client().await.unwrap();
    // In the README's order: WeChat first, so that store receipts (a bound
    // member card with the phone the shops know) merge customers.
    let mut merged = 0;
    for (file, planted) in [
        ("wechat_interactions.jsonl", 1),
        ("douyin_interactions.jsonl", 1),
        ("taobao_orders.csv", 3),
        ("jd_orders.csv", 1),
        ("pdd_orders.csv", 0),
        ("pos_orders.csv", 1),
        ("store_visits.csv", 0),
        ("weibo_interactions.csv", 0),
    ] {
        let source = file.split('.').next().unwrap();
        c.create_source(CreateSourceRequest {
            name: source.into(),
            preset: source.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let bytes = std::fs::read(out.join(file)).unwrap();
        let a = ingest_file(&mut c, source, bytes).await;
        assert_eq!(a.rejected.len(), planted, "{file}: {:?}", a.rejected);
        assert!(a.accepted > 0, "{file}");
        merged += a.merges.len();
        // Sent again: nothing new.
        let bytes = std::fs::read(out.join(file)).unwrap();
        let again = ingest_file(&mut c, source, bytes).await;
        assert_eq!(
            (again.accepted, again.duplicates),
            (0, a.accepted),
            "{file}"
        );
    }
    assert!(merged > 0, "the demo's people merge across channels");
    for q in [
        "order_count >= 1",
        "COUNT(bought:skincare WITHIN 365d) >= 1",
        "interacted:wechat WITHIN 365d",
        "visited:store",
        "total_spend_fen >= 100000 AND last_order_day >= 20300",
    ] {
        assert!(count(&mut c, q).await > 0, "{q}");
    }
}
