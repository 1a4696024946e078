//! Server configuration: defaults, an optional TOML file, and command-line
//! flags, in rising order of precedence. Owns no behaviour, only settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::ingest::facts::Facts;
use crate::storage::writer::identify::OneIdRules;
use crate::storage::{CompactionPolicy, EngineConfig, SyncMode};

/// Where the server listens unless told otherwise (loopback only).
pub const DEFAULT_LISTEN: &str = tagstore_proto::DEFAULT_ADDR;
/// Where the server keeps its data unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "tagstore-data";

/// Request limits the server enforces before work reaches the engine.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most customer keys (adds plus removes) in one `Update` or `DeleteCustomers`.
    pub max_keys_per_request: usize,
    /// Most members in one `ReplaceMembers` stream (checked as each message
    /// arrives). Its bytes are bounded by `max_request_memory_mb` as well.
    pub max_replace_members: usize,
    /// Most queries in one `Count`.
    pub max_count_queries: usize,
    /// Most bytes of query text in one `Count`, all queries together.
    pub max_count_bytes: usize,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// The server-wide budget, in MiB, for the bytes of requests in flight
    /// (counted as they arrive, beyond the first 64 KiB of each call, and
    /// given back when the call ends). A call that would pass it fails with
    /// `RESOURCE_EXHAUSTED`.
    pub max_request_memory_mb: u64,
    /// Most `Export` streams open at once; one more fails with
    /// `RESOURCE_EXHAUSTED`.
    pub max_concurrent_exports: usize,
    /// Most `Watch` streams open at once; one more fails with
    /// `RESOURCE_EXHAUSTED`. Each holds at most a few messages for a client
    /// that does not read, and no thread.
    pub max_concurrent_watches: usize,
    /// Seconds a client stream (`ReplaceMembers`, `Ingest`) may go without
    /// a message while the server holds nothing of it in flight; then it is
    /// ended with `DEADLINE_EXCEEDED` and what it held is freed (an upload
    /// that stalls must not keep its members in memory for ever).
    pub stream_idle_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_keys_per_request: 1_000_000,
            // 20M keys of 20 bytes are about 1 GB as strings in memory.
            max_replace_members: 20_000_000,
            max_count_queries: 1_000,
            max_count_bytes: 1 << 20,
            max_message_bytes: 64 << 20,
            // 64 clients each sending a 60 MB Update at once: peak RSS 863
            // MiB and a trivial count's p99 3.5 ms beside them with 256,
            // against 2.6 GB and 92 ms with no budget (release build here).
            max_request_memory_mb: 256,
            max_concurrent_exports: 256,
            max_concurrent_watches: 256,
            stream_idle_seconds: 60,
        }
    }
}

/// The TOML config file, every key optional. Example:
///
/// ```toml
/// listen = "127.0.0.1:7420"
/// data_dir = "/var/lib/tagstore"
/// sync = "always"            # or "never"
/// checkpoint_wal_mb = 64
/// max_segments = 8
/// time_zone = "Asia/Shanghai"  # of behaviour fields and rules created without one, and of TODAY
/// dedup_days = 30            # ingested events are recognised when resent within this many days
/// event_retention_days = 730 # ingested events are kept this long for rebuilding facts (0: for ever)
/// history_days = 32          # the store's past is kept this long for reads AS OF a day or position (0: none)
/// history_version_mb = 256   # and a version of it kept every this much log as well as daily (bounds a read's replay)
/// feed_retention_mb = 1024   # the change feed (`Watch`) keeps at most this much (0: no feed)
/// feed_retention_hours = 168 # and changes at most this old (0: no limit by age)
/// feed_file_mb = 64          # in files of this size (the oldest whole file goes first)
/// audit_retention_days = 400 # the audit trail (who read or changed customers) is kept this long (0: for ever)
/// refund_rebuild_seconds = 60 # a refund after its order: the customer's facts are rebuilt within this long (0: only by RebuildFacts)
/// facts = "facts.toml"       # the rules that turn ingested events into facts (default: the standard ones)
/// tokens = "tokens.toml"     # API tokens (`tagstore token add`); without one, loopback only
/// metrics_listen = "127.0.0.1:9420"  # Prometheus text at GET /metrics (default: off)
/// tls_cert = "server.pem"    # TLS: certificate chain and key (PEM), read again on SIGHUP
/// tls_key = "server.key"
/// tls_client_ca = "ca.pem"   # optional: clients must present a certificate signed by it
///
/// [limits]
/// max_keys_per_request = 1000000
///
/// [oneid]                    # identity unification's guard rails
/// never_merge = ["device"]   # identity types that never merge two customers
/// blocked = ["phone:13800000000"]  # identities never used (a default number)
/// max_per_type = 10          # identities of one type a customer may have (0: no limit)
/// priority = ["member_card", "wechat_unionid", "phone"]  # which identity names a new customer
/// ```
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub sync: Option<SyncMode>,
    pub checkpoint_wal_mb: Option<u64>,
    pub max_segments: Option<usize>,
    /// IANA time zone of behaviour fields and rules created without one, and
    /// the day `TODAY` means in queries (default Asia/Shanghai).
    pub time_zone: Option<String>,
    /// Days an ingested event's id is remembered (default 30, at least 1).
    pub dedup_days: Option<u32>,
    /// Days ingested events stay in the event archive (default 730; 0: for ever).
    pub event_retention_days: Option<u32>,
    /// Days of the store's past kept for reads as of a day or a log
    /// position (default 32; 0: none, and what was kept goes at the next
    /// checkpoint).
    pub history_days: Option<u32>,
    /// MiB of log after which a version of the store is kept even within a
    /// day (default 256, at least 16): a read of the past replays at most
    /// about this much log.
    pub history_version_mb: Option<u64>,
    /// MiB of change feed kept at most (default 1024; 0: no feed, `Watch`
    /// refused).
    pub feed_retention_mb: Option<u64>,
    /// Hours a change stays in the feed at most (default 168; 0: no limit
    /// by age).
    pub feed_retention_hours: Option<u64>,
    /// MiB of one feed file (default 64, at least 1): the retention drops
    /// whole files.
    pub feed_file_mb: Option<u64>,
    /// Days the audit trail is kept (default 400; 0: for ever).
    pub audit_retention_days: Option<u32>,
    /// Seconds between rounds of the background rebuild of customers whose
    /// refund came in a later request than its order (default 60; 0: none,
    /// they wait for `RebuildFacts`).
    pub refund_rebuild_seconds: Option<u64>,
    /// A TOML file of fact rules (`ingest::facts`), read at start; relative
    /// to the working directory. Default: the standard rules.
    pub facts: Option<PathBuf>,
    /// The tokens file (`tagstore token add|list|revoke`): every call must
    /// then carry a token of it. Without one the server serves loopback
    /// only, unless `open_without_tokens` says it is meant to be open.
    pub tokens: Option<PathBuf>,
    pub open_without_tokens: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// Where to serve metrics (Prometheus text, `GET /metrics`); none: off.
    pub metrics_listen: Option<String>,
    pub limits: Option<Limits>,
    pub oneid: Option<OneIdFile>,
}

/// The `[oneid]` section: identity unification's guard rails.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OneIdFile {
    /// Identity types that never merge two customers.
    pub never_merge: Vec<String>,
    /// Identities (`type:value`) never used; built-in types' values are
    /// normalised as ingestion does (`phone:+86 138-0000-0000` is
    /// `phone:13800000000`).
    pub blocked: Vec<String>,
    /// Identities of one type a customer may have (default 10; 0: no limit).
    pub max_per_type: Option<u32>,
    /// Identity types in the order that decides which names a new customer.
    pub priority: Vec<String>,
}

impl OneIdFile {
    /// The rules, every name and identity checked (and normalised).
    pub fn rules(self) -> Result<OneIdRules> {
        let bad = |e: crate::ingest::normalize::Refused| Error::Config(format!("[oneid]: {}", e.0));
        for t in self.never_merge.iter().chain(&self.priority) {
            crate::ingest::event::check_name("identity type", t).map_err(bad)?;
        }
        let mut blocked = std::collections::HashSet::new();
        for b in &self.blocked {
            let key = crate::ingest::event::identity_from_text(b)
                .map_err(|e| Error::Config(format!("[oneid] blocked: {}", e.0)))?;
            blocked.insert(key);
        }
        Ok(OneIdRules {
            never_merge: self.never_merge.into_iter().collect(),
            blocked,
            max_per_type: self
                .max_per_type
                .unwrap_or(crate::storage::writer::identify::DEFAULT_MAX_PER_TYPE),
            priority: self.priority,
        })
    }
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }
}

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub engine: EngineConfig,
    pub limits: Limits,
    pub default_time_zone: String,
    /// The rules that turn ingested events into facts.
    pub facts: Facts,
    /// The tokens file; `None`: no access control.
    pub tokens: Option<PathBuf>,
    /// Serve beyond loopback without tokens (said explicitly).
    pub open_without_tokens: bool,
    /// TLS on the gRPC port; `None`: plain text.
    pub tls: Option<crate::server::tls::TlsFiles>,
    /// Where metrics are served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// How long the audit trail is kept.
    pub audit: crate::audit::AuditConfig,
    /// How often customers due a rebuild of their facts (a refund after its
    /// order) are rebuilt; `None`: never in the background.
    pub refund_rebuild_every: Option<std::time::Duration>,
}

/// Settings given on the command line (each overrides the file).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub sync: Option<SyncMode>,
    pub checkpoint_wal_mb: Option<u64>,
    pub tokens: Option<PathBuf>,
    pub open_without_tokens: bool,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub metrics_listen: Option<String>,
}

impl ServerConfig {
    pub fn resolve(file: FileConfig, over: Overrides) -> Result<Self> {
        let listen_text = over
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|e| Error::Config(format!("listen address {listen_text:?}: {e}")))?;
        let data_dir = over
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let mut engine = EngineConfig::new(data_dir);
        engine.sync = over.sync.or(file.sync).unwrap_or(SyncMode::Always);
        let mb = over
            .checkpoint_wal_mb
            .or(file.checkpoint_wal_mb)
            .unwrap_or(64);
        if mb == 0 {
            return Err(Error::Config("checkpoint_wal_mb must be at least 1".into()));
        }
        engine.checkpoint_wal_bytes = mb << 20;
        engine.compaction = CompactionPolicy {
            max_segments: file.max_segments.unwrap_or(8).max(2),
            ..CompactionPolicy::default()
        };
        engine.dedup_days = file
            .dedup_days
            .unwrap_or(crate::storage::DEFAULT_DEDUP_DAYS);
        if engine.dedup_days == 0 {
            return Err(Error::Config(
                "dedup_days must be at least 1 (a resent event would be applied twice)".into(),
            ));
        }
        engine.event_retention_days = file
            .event_retention_days
            .unwrap_or(crate::storage::DEFAULT_EVENT_RETENTION_DAYS);
        engine.history_days = file
            .history_days
            .unwrap_or(crate::storage::versions::DEFAULT_HISTORY_DAYS);
        if engine.history_days > 3660 {
            return Err(Error::Config(format!(
                "history_days {} is over the limit of 3660 (ten years)",
                engine.history_days
            )));
        }
        let version_mb = file.history_version_mb.unwrap_or(256);
        if version_mb < 16 {
            return Err(Error::Config(
                "history_version_mb must be at least 16".into(),
            ));
        }
        engine.history_version_bytes = version_mb.saturating_mul(1 << 20);
        engine.oneid = file.oneid.unwrap_or_default().rules()?;
        let feed_file_mb = file.feed_file_mb.unwrap_or(64);
        if feed_file_mb == 0 {
            return Err(Error::Config("feed_file_mb must be at least 1".into()));
        }
        engine.feed = crate::storage::feed::FeedConfig {
            retention_bytes: file
                .feed_retention_mb
                .unwrap_or(1024)
                .saturating_mul(1 << 20),
            retention_ms: file
                .feed_retention_hours
                .unwrap_or(168)
                .saturating_mul(3_600_000)
                .min(i64::MAX as u64) as i64,
            file_bytes: feed_file_mb.saturating_mul(1 << 20),
        };
        let default_time_zone = file
            .time_zone
            .unwrap_or_else(|| crate::fields::DEFAULT_TIME_ZONE.to_string());
        crate::fields::time::zone(&default_time_zone)
            .map_err(|e| Error::Config(format!("time_zone: {e}")))?;
        engine.time_zone = default_time_zone.clone();
        let facts = match &file.facts {
            None => Facts::standard(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                Facts::parse(&text)
                    .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.0)))?
            }
        };
        let tokens = over.tokens.or(file.tokens);
        let open_without_tokens =
            over.open_without_tokens || file.open_without_tokens.unwrap_or(false);
        if tokens.is_none() && !listen.ip().is_loopback() && !open_without_tokens {
            return Err(Error::Config(format!(
                "listening on {listen} without tokens would let anyone who reaches the port \
                 read, change and erase every customer: give a tokens file (--tokens, made \
                 with `tagstore token add`), listen on loopback, or say it is meant to be \
                 open with --open-without-tokens"
            )));
        }
        let tls = match (
            over.tls_cert.or(file.tls_cert),
            over.tls_key.or(file.tls_key),
            over.tls_client_ca.or(file.tls_client_ca),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), client_ca) => Some(crate::server::tls::TlsFiles {
                cert,
                key,
                client_ca,
            }),
            _ => {
                return Err(Error::Config(
                    "TLS needs both tls_cert and tls_key (--tls-cert, --tls-key); \
                     tls_client_ca is for client certificates, beside them"
                        .into(),
                ));
            }
        };
        let metrics_listen = over
            .metrics_listen
            .or(file.metrics_listen)
            .map(|text| {
                text.parse::<SocketAddr>()
                    .map_err(|e| Error::Config(format!("metrics address {text:?}: {e}")))
            })
            .transpose()?;
        Ok(Self {
            listen,
            engine,
            limits: file.limits.unwrap_or_default(),
            default_time_zone,
            facts,
            tokens,
            open_without_tokens,
            tls,
            metrics_listen,
            audit: crate::audit::AuditConfig {
                retention_days: file.audit_retention_days.unwrap_or(400),
                ..Default::default()
            },
            refund_rebuild_every: match file.refund_rebuild_seconds.unwrap_or(60) {
                0 => None,
                secs => Some(std::time::Duration::from_secs(secs.min(86_400 * 366))),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: FileConfig = toml::from_str("listen = \"127.0.0.1:9000\"\nsync = \"never\"\ncheckpoint_wal_mb = 8\n[limits]\nmax_count_queries = 5\n").unwrap();
        let cfg = ServerConfig::resolve(
            file,
            Overrides {
                listen: Some("127.0.0.1:9001".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9001);
        assert_eq!(cfg.engine.sync, SyncMode::Never);
        assert_eq!(cfg.engine.checkpoint_wal_bytes, 8 << 20);
        assert_eq!(cfg.limits.max_count_queries, 5);
        assert_eq!(cfg.limits.max_keys_per_request, 1_000_000);
        assert_eq!(cfg.engine.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(toml::from_str::<FileConfig>("nonsense = 1").is_err());
    }

    #[test]
    fn beyond_loopback_only_with_tokens_or_when_said_open() {
        let over = |listen: &str, tokens: Option<&str>, open| Overrides {
            listen: Some(listen.into()),
            tokens: tokens.map(PathBuf::from),
            open_without_tokens: open,
            ..Default::default()
        };
        let resolve = |o| ServerConfig::resolve(FileConfig::default(), o);
        let e = resolve(over("0.0.0.0:7420", None, false)).unwrap_err();
        assert!(e.to_string().contains("--open-without-tokens"), "{e}");
        assert!(resolve(over("[::]:7420", None, false)).is_err());
        assert!(resolve(over("127.0.0.1:7420", None, false)).is_ok());
        assert!(resolve(over("[::1]:7420", None, false)).is_ok());
        assert!(resolve(over("0.0.0.0:7420", Some("t.toml"), false)).is_ok());
        let open = resolve(over("0.0.0.0:7420", None, true)).unwrap();
        assert!(open.open_without_tokens && open.tokens.is_none());
    }

    #[test]
    fn ingestion_settings() {
        let dir = tempfile::tempdir().unwrap();
        let facts = dir.path().join("facts.toml");
        std::fs::write(
            &facts,
            "[[counters]]\nevents = [\"order\"]\nfield = \"orders:{brand}\"\nadd = \"1\"\n",
        )
        .unwrap();
        let file = FileConfig {
            dedup_days: Some(7),
            facts: Some(facts.clone()),
            ..Default::default()
        };
        let cfg = ServerConfig::resolve(file, Overrides::default()).unwrap();
        assert_eq!(cfg.engine.dedup_days, 7);
        assert!(cfg.facts.definition.contains("orders:{brand}"));
        let zero = FileConfig {
            dedup_days: Some(0),
            ..Default::default()
        };
        let e = ServerConfig::resolve(zero, Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("dedup_days"), "{e}");
        std::fs::write(
            &facts,
            "[[counters]]\nevents = [\"order\"]\nfield = \"x\"\nadd = \"2\"\n",
        )
        .unwrap();
        let bad = FileConfig {
            facts: Some(facts),
            ..Default::default()
        };
        let e = ServerConfig::resolve(bad, Overrides::default()).unwrap_err();
        assert!(
            e.to_string().contains("facts.toml") && e.to_string().contains("amount"),
            "{e}"
        );
    }

    #[test]
    fn oneid_guard_rails() {
        let file: FileConfig = toml::from_str(
            "[oneid]\nnever_merge = [\"device\"]\nblocked = [\"phone:+86 138-0000-0000\", \"store_tablet:T1 \"]\nmax_per_type = 3\npriority = [\"member_card\"]\n",
        )
        .unwrap();
        let cfg = ServerConfig::resolve(file, Overrides::default()).unwrap();
        let r = &cfg.engine.oneid;
        assert!(r.never_merge.contains("device"));
        assert!(r.blocked.contains("phone:13800000000"), "{r:?}");
        assert!(r.blocked.contains("store_tablet:T1"), "{r:?}");
        assert_eq!(
            (r.max_per_type, r.priority.as_slice()),
            (3, &["member_card".to_string()][..])
        );
        let default = ServerConfig::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(default.engine.oneid.max_per_type, 10);
        for bad in [
            "[oneid]\nblocked = [\"nocolon\"]",
            "[oneid]\nblocked = [\"phone:12\"]",
            "[oneid]\nnever_merge = [\"Device!\"]",
            "[oneid]\nmax_per_typo = 3",
        ] {
            let parsed: std::result::Result<FileConfig, _> = toml::from_str(bad);
            let err = match parsed {
                Ok(file) => ServerConfig::resolve(file, Overrides::default())
                    .unwrap_err()
                    .to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains("oneid") || err.contains("max_per_typo"),
                "{bad}: {err}"
            );
        }
    }
}
