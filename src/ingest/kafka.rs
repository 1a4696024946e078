//! A source's `[kafka]` table: the topics it consumes and how to reach
//! them. Part of the source's definition, checked with it; a source with
//! the table is consumed by the server itself (`crate::kafka`), one Kafka
//! message per record, in the source's format (a JSON object, or one CSV
//! line read under `csv_header`).
//!
//! ```toml
//! [kafka]
//! brokers = "10.0.0.5:9092,10.0.0.6:9092"
//! topics = ["douyin_events"]
//! group = "tagstore-douyin"        # default: tagstore-{source}
//! start = "earliest"               # or "latest": partitions with no stored position
//! security = "sasl_ssl"            # plaintext | ssl | sasl_plaintext | sasl_ssl
//! sasl_mechanism = "SCRAM-SHA-256" # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
//! sasl_username = "tagstore"
//! sasl_password_file = "/etc/tagstore/kafka-password"
//! ca_file = "/etc/tagstore/kafka-ca.pem"
//! batch_records = 2000             # most records logged as one write
//! ```
//!
//! Secrets are never part of the definition (which the store keeps, lists
//! and backs up): the password is read from `sasl_password_file` when the
//! consumer starts.
//!
//! This room owns the settings and their checks. It connects to nothing.

use serde::Deserialize;

use super::source::Format;

/// Most topics one source consumes.
pub const MAX_TOPICS: usize = 64;
/// Most records one consumed batch holds (and the default).
pub const MAX_BATCH_RECORDS: usize = 10_000;
pub const DEFAULT_BATCH_RECORDS: usize = 1_000;

/// Where a partition with no stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    /// The oldest record the broker still has.
    #[default]
    Earliest,
    /// Records produced after the source first sees the partition.
    Latest,
}

/// How the consumer talks to the brokers (librdkafka's
/// `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl Security {
    pub fn name(self) -> &'static str {
        match self {
            Security::Plaintext => "plaintext",
            Security::Ssl => "ssl",
            Security::SaslPlaintext => "sasl_plaintext",
            Security::SaslSsl => "sasl_ssl",
        }
    }

    fn sasl(self) -> bool {
        matches!(self, Security::SaslPlaintext | Security::SaslSsl)
    }

    fn tls(self) -> bool {
        matches!(self, Security::Ssl | Security::SaslSsl)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KafkaSpec {
    brokers: String,
    topics: Vec<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    start: Start,
    #[serde(default)]
    csv_header: Option<String>,
    #[serde(default)]
    security: Security,
    #[serde(default)]
    sasl_mechanism: Option<String>,
    #[serde(default)]
    sasl_username: Option<String>,
    #[serde(default)]
    sasl_password_file: Option<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    batch_records: Option<usize>,
}

/// A Kafka source's settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `host:port` of bootstrap brokers, comma-separated.
    pub brokers: String,
    pub topics: Vec<String>,
    /// The consumer group its offsets are committed under (for monitoring
    /// tools; the store's own positions are what it resumes from).
    pub group: String,
    pub start: Start,
    /// For CSV: the header row every message's line is read under.
    pub csv_header: Option<String>,
    pub security: Security,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`, with SASL.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    pub sasl_password_file: Option<String>,
    /// CA certificates (PEM) the brokers' certificates are checked
    /// against, with TLS; none: the system's.
    pub ca_file: Option<String>,
    /// Most records logged as one write.
    pub batch_records: usize,
}

/// A topic name as Kafka allows it: 1 to 249 ASCII letters, digits, `.`,
/// `_` or `-`, not `.` or `..`.
fn check_topic(t: &str) -> Result<(), String> {
    let ok = !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "topic {t:?} is not a Kafka topic name (1 to 249 ASCII letters, digits, '.', '_' or '-')"
        ))
    }
}

impl KafkaSpec {
    pub(super) fn check(self, source: &str, format: Format) -> Result<KafkaSettings, String> {
        let brokers: Vec<&str> = self
            .brokers
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .collect();
        if brokers.is_empty() {
            return Err("kafka.brokers names no broker (host:port, comma-separated)".into());
        }
        for b in &brokers {
            let port = b.rsplit_once(':').map(|(_, p)| p);
            if port.is_none_or(|p| p.parse::<u16>().is_err()) {
                return Err(format!("kafka.brokers: {b:?} is not host:port"));
            }
        }
        if self.topics.is_empty() || self.topics.len() > MAX_TOPICS {
            return Err(format!(
                "kafka.topics names {} topics; 1 to {MAX_TOPICS}",
                self.topics.len()
            ));
        }
        let mut topics = Vec::new();
        for t in self.topics {
            check_topic(&t).map_err(|e| format!("kafka.topics: {e}"))?;
            if topics.contains(&t) {
                return Err(format!("kafka.topics names {t:?} twice"));
            }
            topics.push(t);
        }
        let group = self.group.unwrap_or_else(|| format!("tagstore-{source}"));
        if group.is_empty() || group.len() > 255 || group.chars().any(char::is_control) {
            return Err("kafka.group must be 1 to 255 bytes without control characters".into());
        }
        match (format, &self.csv_header) {
            (Format::Csv, None) => {
                return Err(
                    "a CSV source read from Kafka needs kafka.csv_header (the header row its lines are read under)"
                        .into(),
                );
            }
            (Format::Jsonl, Some(_)) => {
                return Err("kafka.csv_header is for CSV sources; this one is jsonl".into());
            }
            _ => {}
        }
        if let Some(h) = &self.csv_header
            && (h.trim().is_empty() || h.contains(['\n', '\r']))
        {
            return Err("kafka.csv_header must be one non-empty line".into());
        }
        let sasl_set = self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password_file.is_some();
        if self.security.sasl() {
            match self.sasl_mechanism.as_deref() {
                Some("PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") => {}
                Some(m) => {
                    return Err(format!(
                        "kafka.sasl_mechanism {m:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
                    ));
                }
                None => {
                    return Err(format!(
                        "security {:?} needs kafka.sasl_mechanism",
                        self.security.name()
                    ));
                }
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty)
                || self.sasl_password_file.as_deref().is_none_or(str::is_empty)
            {
                return Err(format!(
                    "security {:?} needs kafka.sasl_username and kafka.sasl_password_file",
                    self.security.name()
                ));
            }
        } else if sasl_set {
            return Err(format!(
                "kafka.sasl_* settings need security \"sasl_plaintext\" or \"sasl_ssl\", not {:?}",
                self.security.name()
            ));
        }
        if self.ca_file.is_some() && !self.security.tls() {
            return Err(format!(
                "kafka.ca_file needs security \"ssl\" or \"sasl_ssl\", not {:?}",
                self.security.name()
            ));
        }
        let batch_records = self.batch_records.unwrap_or(DEFAULT_BATCH_RECORDS);
        if !(1..=MAX_BATCH_RECORDS).contains(&batch_records) {
            return Err(format!(
                "kafka.batch_records is {batch_records}; 1 to {MAX_BATCH_RECORDS}"
            ));
        }
        Ok(KafkaSettings {
            brokers: brokers.join(","),
            topics,
            group,
            start: self.start,
            csv_header: self.csv_header,
            security: self.security,
            sasl_mechanism: self.sasl_mechanism,
            sasl_username: self.sasl_username,
            sasl_password_file: self.sasl_password_file,
            ca_file: self.ca_file,
            batch_records,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ingest::source::Source;

    const MAPPING: &str = r#"
format = "jsonl"
channel = "douyin"
event_type = { column = "type" }
time = "ts"
identities = [{ type = "douyin_uid", column = "uid" }]
"#;

    fn parse(kafka: &str) -> Result<Source, String> {
        Source::parse(
            "dy",
            &format!("{MAPPING}\n[kafka]\n{}", kafka.replace("; ", "\n")),
        )
        .map_err(|e| e.message)
    }

    #[test]
    fn settings_are_checked_with_the_definition() {
        let s = parse(r#"brokers = " a:9092 , b:9093 "; topics = ["t1", "t.2"]"#).unwrap();
        let k = s.kafka.unwrap();
        assert_eq!(k.brokers, "a:9092,b:9093");
        assert_eq!(k.group, "tagstore-dy");
        assert_eq!(k.batch_records, super::DEFAULT_BATCH_RECORDS);
        assert!(Source::parse("dy", MAPPING).unwrap().kafka.is_none());
        for (bad, says) in [
            (r#"brokers = ""; topics = ["t"]"#, "names no broker"),
            (r#"brokers = "a"; topics = ["t"]"#, "not host:port"),
            (r#"brokers = "a:1"; topics = []"#, "0 topics"),
            (r#"brokers = "a:1"; topics = ["t", "t"]"#, "twice"),
            (
                r#"brokers = "a:1"; topics = ["a b"]"#,
                "not a Kafka topic name",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; csv_header = "a,b""#,
                "for CSV sources",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; security = "sasl_ssl""#,
                "needs kafka.sasl_mechanism",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; security = "sasl_ssl"; sasl_mechanism = "GSSAPI""#,
                "not PLAIN",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; security = "sasl_plaintext"; sasl_mechanism = "PLAIN""#,
                "needs kafka.sasl_username",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; sasl_username = "u""#,
                "need security",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; ca_file = "/x""#,
                "needs security",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; batch_records = 0"#,
                "1 to 10000",
            ),
            (
                r#"brokers = "a:1"; topics = ["t"]; password = "x""#,
                "unknown field",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let csv = MAPPING.replace("jsonl", "csv");
        let e = Source::parse(
            "dy",
            &format!("{csv}\n[kafka]\nbrokers = \"a:1\"\ntopics = [\"t\"]"),
        )
        .unwrap_err();
        assert!(e.message.contains("csv_header"), "{e}");
    }
}
