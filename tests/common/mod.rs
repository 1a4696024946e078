//! Shared by the integration tests: the real `tagstore` binary of this build
//! on a free loopback port, and the helpers of `tagstore-test-support`.
#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use tagstore_test_support::{
    Broker, Client, code, copy_data_dir, count, create_field, export_set, files_with, int_value,
    wal_files,
};

pub type TestServer = tagstore_test_support::ServerProcess;

/// The server binary under test: this build's, or the one named by
/// `TAGSTORE_TEST_BINARY`.
pub fn binary() -> std::path::PathBuf {
    tagstore_test_support::server_binary(Some(env!("CARGO_BIN_EXE_tagstore")))
}

/// Starts a server on `dir` with extra arguments; panics if it does not start.
pub fn start(dir: &Path, extra: &[&str]) -> TestServer {
    try_start(dir, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server; on failure returns what it printed on stderr.
pub fn try_start(dir: &Path, extra: &[&str]) -> Result<TestServer, String> {
    tagstore_test_support::try_start(&binary(), dir, extra)
}

pub async fn client(server: &TestServer) -> Client {
    server.client().await.expect("connect")
}

/// A JSON Lines source definition (for `CreateSource`) whose records name
/// customers by a JD pin, a phone and a member card (columns `pin`, `phone`
/// and `card`; one left out is not named), with an event id (`id`), type
/// (`type`), channel (`ch`), time (`ts`, Unix ms), amount (`fen`) and
/// category (`cat`).
pub const PIN_PHONE_CARD_SOURCE: &str = r#"
format = "jsonl"
channel = { column = "ch" }
event_type = { column = "type" }
time = "ts"
time_form = "epoch_ms"
event_id = "id"
amount = { column = "fen", unit = "fen" }
category = "cat"
identities = [
  { type = "jd_pin", column = "pin" },
  { type = "phone", column = "phone" },
  { type = "member_card", column = "card" },
]
"#;

/// Sends `data` to `source` as one `Ingest` batch; its answer (the stream
/// then ends).
pub async fn ingest_batch(
    c: &mut Client,
    source: &str,
    data: &str,
) -> tagstore::proto::IngestResponse {
    let batch = tagstore::proto::IngestRequest {
        source: source.into(),
        seq: 1,
        data: data.as_bytes().to_vec(),
        ..Default::default()
    };
    let mut stream = c
        .ingest(tokio_stream::iter(vec![batch]))
        .await
        .expect("ingest")
        .into_inner();
    let answer = stream.message().await.expect("answer").expect("one answer");
    assert!(stream.message().await.expect("end").is_none());
    answer
}

/// The source `events` ([`PIN_PHONE_CARD_SOURCE`]) and an integer field
/// `points` merged by `sum`, written directly (not a fact).
pub async fn events_source_and_points(c: &mut Client) {
    c.create_source(tagstore::proto::CreateSourceRequest {
        name: "events".into(),
        definition: PIN_PHONE_CARD_SOURCE.into(),
        ..Default::default()
    })
    .await
    .expect("create source");
    c.create_field(tagstore::proto::CreateFieldRequest {
        name: "points".into(),
        kind: tagstore::proto::FieldKind::Integer as i32,
        merge: "sum".into(),
        ..Default::default()
    })
    .await
    .expect("create field");
}

/// The profile of the customer `key` names (panics if none does).
pub async fn profile(c: &mut Client, key: &str) -> tagstore::proto::ProfileResponse {
    c.profile(tagstore::proto::ProfileRequest {
        customer: key.into(),
        recent_days: 0,
    })
    .await
    .unwrap_or_else(|e| panic!("profile of {key}: {e}"))
    .into_inner()
}

/// Adds `keys` to `tag` (made if missing); panics on an error.
pub async fn add_to_tag(c: &mut Client, tag: &str, keys: &[&str]) {
    c.update(tagstore::proto::UpdateRequest {
        mutations: vec![tagstore::proto::Mutation {
            tag: tag.into(),
            add: keys.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        }],
        create_missing_tags: true,
    })
    .await
    .unwrap_or_else(|e| panic!("add to {tag}: {e}"));
}

/// Every tag's and enumerated value's members in `snap`, by `tag:NAME` and
/// `FIELD=VALUE` (for the engine-level models).
pub fn memberships(
    snap: &tagstore::storage::Snapshot,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<u32>> {
    let mut out = std::collections::BTreeMap::new();
    for (name, tag) in &snap.tags {
        out.insert(
            format!("tag:{name}"),
            tag.bitmap.get().unwrap().iter().collect(),
        );
    }
    for (name, f) in &snap.fields {
        if let tagstore::fields::FieldKind::Enum { values } = &f.meta.kind {
            for (i, v) in values.iter().enumerate() {
                let ids = match f.slot(i as u32).unwrap() {
                    Some(b) => b.iter().collect(),
                    None => Default::default(),
                };
                out.insert(format!("{name}={v}"), ids);
            }
        }
    }
    out
}

/// Sends `request` raw over HTTP/1.1 to `addr` and returns the whole answer.
pub fn http(addr: &str, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// The value of the metrics sample `line_start` (a name with its labels).
pub fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {line_start} in:\n{text}"))
        .parse()
        .unwrap()
}

/// A small tmpfs, unmounted when dropped: a disk that fills. Mounting
/// needs root (CI runs as root); elsewhere `mount` says the test is skipped
/// and answers `None`.
pub struct SmallDisk {
    pub path: std::path::PathBuf,
}

impl SmallDisk {
    /// A tmpfs of `size` (`24m`) at `dir`/disk.
    pub fn mount(dir: &Path, size: &str) -> Option<SmallDisk> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: cannot mount a small file system; test skipped");
            return None;
        }
        let path = dir.join("disk");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(mounted, "mount -t tmpfs failed although running as root");
        Some(SmallDisk { path })
    }

    /// Fills what is left of it with `name`, which it returns.
    pub fn fill(&self, name: &str) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join(name);
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// A server run in this process (`tagstore::server::serve`) on an
/// in-memory file system, so that a test can make its files fail (and its
/// clock move) at chosen steps; stopped by [`InProcessServer::stop`].
pub struct InProcessServer {
    /// The gRPC address.
    pub grpc: String,
    /// The metrics address.
    pub metrics: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<tagstore::error::Result<()>>,
}

impl InProcessServer {
    /// Serves the store at `/mem/store` on `fs` (a new one, or one a
    /// server before left), with `file` as the configuration file and
    /// `clock` as the clock (`None`: the system's), on free loopback ports.
    pub async fn start(
        fs: tagstore::storage::fs::MemFs,
        file: tagstore::config::FileConfig,
        clock: Option<std::sync::Arc<tagstore::clock::ManualClock>>,
    ) -> InProcessServer {
        let mut config = tagstore::config::ServerConfig::resolve(
            file,
            tagstore::config::Overrides {
                listen: Some("127.0.0.1:0".into()),
                data_dir: Some("/mem/store".into()),
                metrics_listen: Some("127.0.0.1:0".into()),
                ..Default::default()
            },
        )
        .unwrap();
        config.engine.fs = std::sync::Arc::new(fs);
        if let Some(clock) = clock {
            config.engine.clock = clock;
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound, listening) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(tagstore::server::serve(
            config,
            async {
                let _ = stopped.await;
            },
            move |at| {
                let _ = bound.send(at);
            },
        ));
        let at = match listening.await {
            Ok(at) => at,
            Err(_) => panic!("the server did not start: {:?}", server.await),
        };
        InProcessServer {
            grpc: at.grpc.to_string(),
            metrics: at.metrics.expect("a metrics address").to_string(),
            stop,
            server,
        }
    }

    /// A client of it, taking messages up to 64 MiB.
    pub async fn client(
        &self,
    ) -> tagstore::proto::tag_store_client::TagStoreClient<tonic::transport::Channel> {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        tagstore::proto::tag_store_client::TagStoreClient::new(channel)
            .max_encoding_message_size(64 << 20)
    }

    /// Stops it and waits until it has let go of the store.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}
