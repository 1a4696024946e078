//! Metrics against the real server binary (#22, part 7): off unless asked
//! for; `GET /metrics` in the OpenMetrics text format with every call's
//! count, failures by status code and latency histogram, the engine's
//! log-sync and checkpoint histograms, writes, and the store's numbers; nothing else served
//! (404, 405, a request head that never ends or is too long); no customer,
//! key or tag name in it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{code, count, http, sample};
use tagstore::proto::*;

#[tokio::test]
async fn metrics_count_calls_and_show_the_store_and_serve_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let off = common::start(&dir.path().join("off"), &[]);
    assert!(off.metrics_addr.is_none(), "off unless asked for");
    drop(off);
    let server = common::start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]);
    let m = server.metrics_addr.clone().expect("the metrics line");
    let mut c = common::client(&server).await;
    common::add_to_tag(&mut c, "秘密标签", &["phone:13800001111", "k2"]).await;
    assert_eq!(count(&mut c, "秘密标签").await, 2);
    let bad = c
        .count(CountRequest {
            queries: vec!["秘密标签 AND".into()],
            as_of: None,
        })
        .await;
    assert_eq!(code(bad), tonic::Code::InvalidArgument);
    c.checkpoint(CheckpointRequest::default()).await.unwrap();

    let text = http(&m, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(
        sample(body, "tagstore_requests_total{method=\"Count\"}"),
        2.0
    );
    assert_eq!(
        sample(
            body,
            "tagstore_request_failures_total{method=\"Count\",code=\"INVALID_ARGUMENT\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(body, "tagstore_requests_total{method=\"Update\"}"),
        1.0
    );
    assert!(
        sample(
            body,
            "tagstore_request_duration_seconds_sum{method=\"Count\"}"
        ) > 0.0
    );
    assert_eq!(
        sample(
            body,
            "tagstore_request_duration_seconds_count{method=\"Count\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            body,
            "tagstore_request_duration_seconds_bucket{le=\"+Inf\",method=\"Count\"}"
        ),
        2.0
    );
    // The engine's: a write synced the log, a checkpoint ran.
    assert!(sample(body, "tagstore_log_sync_duration_seconds_count") >= 1.0);
    assert_eq!(
        sample(body, "tagstore_checkpoint_duration_seconds_count"),
        1.0
    );
    assert_eq!(sample(body, "tagstore_checkpoint_failures_total"), 0.0);
    assert!(sample(body, "tagstore_writes_total") >= 1.0);
    assert!(sample(body, "tagstore_group_commits_total") >= 1.0);
    // The one small update found the writer idle: committed on its caller.
    assert!(sample(body, "tagstore_group_commits_on_caller_total") >= 1.0);
    assert!(sample(body, "tagstore_snapshot_age_seconds") >= 0.0);
    assert!(sample(body, "tagstore_memory_bytes{kind=\"tag_bitmaps\"}") >= 0.0);
    assert!(sample(body, "tagstore_memory_bytes{kind=\"dictionary\"}") >= 0.0);
    assert_eq!(
        sample(body, "tagstore_memory_bytes{kind=\"requests_in_flight\"}"),
        0.0
    );
    assert_eq!(
        sample(body, "tagstore_requests_total{method=\"Export\"}"),
        0.0
    );
    // The audit trail: the update's record is in a file, and it is written.
    assert!(sample(body, "tagstore_audit_files") >= 1.0);
    assert!(sample(body, "tagstore_audit_bytes") > 24.0);
    assert_eq!(sample(body, "tagstore_audit_failing"), 0.0);
    assert_eq!(sample(body, "tagstore_customers"), 2.0);
    assert_eq!(sample(body, "tagstore_tags"), 1.0);
    assert_eq!(sample(body, "tagstore_storage_failed"), 0.0);
    assert!(sample(body, "tagstore_lsn") >= 1.0);
    assert_eq!(sample(body, "tagstore_feed_start_lsn"), 0.0);
    assert_eq!(sample(body, "tagstore_feed_files"), 1.0);
    // The checkpoint began the history.
    assert_eq!(sample(body, "tagstore_history_versions"), 1.0);
    assert!(sample(body, "tagstore_history_begins_lsn") >= 1.0);
    assert!(sample(body, "tagstore_history_bytes") > 0.0);
    assert!(sample(body, "tagstore_memory_bytes{kind=\"resident\"}") > 0.0);
    assert!(body.contains("# TYPE tagstore_requests counter"));
    assert!(body.contains("# TYPE tagstore_request_duration_seconds histogram"));
    for secret in ["秘密标签", "13800001111", "k2"] {
        assert!(!body.contains(secret), "{secret} in the metrics");
    }

    // Nothing else.
    assert!(http(&m, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(http(&m, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let long = [b"GET /metrics HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
    assert!(http(&m, &long).starts_with("HTTP/1.1 400"));
    // A client that never ends its request head is answered and closed.
    let mut slow = TcpStream::connect(&m).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    let mut out = String::new();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // And the metrics still answer.
    assert!(http(&m, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
}
