//! Reading a source's bytes into records: CSV (RFC 4180, a header row) or
//! JSON Lines, in UTF-8 or GBK/GB18030, and each record through
//! [`Source::event`]. Input arrives in chunks of whole records (a file, or
//! one batch of a stream); a [`Reader`] keeps the CSV header and the line
//! count from one chunk to the next, so every rejected record is reported
//! with the line it started on.
//!
//! This room owns bytes to records. It writes nothing.

use std::borrow::Cow;
use std::collections::HashMap;

use super::normalize::Refused;
use super::source::{Encoding, Format, Outcome, Record, Source};

/// Nesting a JSON record may have: deeper values are not read.
const MAX_JSON_DEPTH: usize = 4;

/// Why a whole chunk could not be read (as opposed to one record).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

/// One record read: the line it starts on (1-based, counting the header)
/// and what it became.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub line: u64,
    pub outcome: Outcome,
}

/// Reads the chunks of one input (a file, or one stream's batches), of the
/// source it holds (`&Source`, or an `Arc<Source>` to own one).
pub struct Reader<S> {
    source: S,
    /// The CSV header: column name to position.
    header: Option<HashMap<String, usize>>,
    /// Lines consumed so far.
    lines: u64,
}

impl<S: std::borrow::Borrow<Source>> Reader<S> {
    pub fn new(source: S) -> Self {
        Self {
            source,
            header: None,
            lines: 0,
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Reads one chunk of whole records. The first chunk of a CSV input
    /// starts with the header row.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Read>, ReadError> {
        let first = self.lines == 0 && self.header.is_none();
        let chunk = if first {
            chunk.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(chunk)
        } else {
            chunk
        };
        let encoding = match self.source.borrow().encoding {
            Encoding::Auto if std::str::from_utf8(chunk).is_ok() => Encoding::Utf8,
            Encoding::Auto => Encoding::Gb18030,
            e => e,
        };
        match self.source.borrow().format {
            Format::Csv => self.feed_csv(chunk, encoding),
            Format::Jsonl => Ok(self.feed_jsonl(chunk, encoding)),
        }
    }

    fn feed_csv(&mut self, chunk: &[u8], encoding: Encoding) -> Result<Vec<Read>, ReadError> {
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(chunk);
        let base = self.lines;
        let mut out = Vec::new();
        let mut record = csv::ByteRecord::new();
        let mut last_line = 0;
        loop {
            match csv.read_byte_record(&mut record) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    return Err(ReadError(format!(
                        "CSV unreadable after line {}: {e}",
                        base + last_line
                    )));
                }
            }
            let line = base + record.position().map_or(last_line + 1, |p| p.line());
            last_line = line - base;
            let Some(header) = &self.header else {
                self.header = Some(self.read_header(&record, encoding, line)?);
                continue;
            };
            let outcome = if record.len() == 1 && record.get(0).is_some_and(|f| f.is_empty()) {
                continue; // a blank line
            } else if record.len() != header.len() {
                Outcome::Rejected(Refused(format!(
                    "the row has {} fields; the header has {}",
                    record.len(),
                    header.len()
                )))
            } else {
                match decode_fields(&record, encoding, header) {
                    Ok(fields) => self.source.borrow().event(&CsvRecord { header, fields }),
                    Err(e) => Outcome::Rejected(e),
                }
            };
            out.push(Read { line, outcome });
        }
        // Lines the chunk spans, ending newline or not.
        self.lines = base + count_lines(chunk);
        Ok(out)
    }

    fn read_header(
        &self,
        record: &csv::ByteRecord,
        encoding: Encoding,
        line: u64,
    ) -> Result<HashMap<String, usize>, ReadError> {
        let mut header = HashMap::new();
        for (i, raw) in record.iter().enumerate() {
            let name = decode(raw, encoding).ok_or_else(|| {
                ReadError(format!(
                    "the header (line {line}) is not valid {} text",
                    encoding_name(encoding)
                ))
            })?;
            let name = name.trim_matches(|c: char| c.is_whitespace() || c == '\u{3000}');
            header.entry(name.to_string()).or_insert(i);
        }
        let source = self.source.borrow();
        let missing: Vec<&str> = source
            .required_columns()
            .into_iter()
            .filter(|c| !header.contains_key(*c))
            .collect();
        if !missing.is_empty() {
            let mut have: Vec<&String> = header.keys().collect();
            have.sort_by_key(|k| header[*k]);
            return Err(ReadError(format!(
                "the header lacks column{} {} that source {:?} reads; its columns are: {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                source.name,
                have.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(header)
    }

    fn feed_jsonl(&mut self, chunk: &[u8], encoding: Encoding) -> Vec<Read> {
        let mut out = Vec::new();
        if chunk.is_empty() {
            return out;
        }
        let mut lines = 0;
        for raw in chunk.split(|&b| b == b'\n') {
            lines += 1;
            let line = self.lines + lines;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let outcome = match decode(raw, encoding) {
                None => Outcome::Rejected(Refused(format!(
                    "the line is not valid {} text",
                    encoding_name(encoding)
                ))),
                Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(map)) => {
                        let mut fields = HashMap::new();
                        flatten("", &map, 0, &mut fields);
                        self.source.borrow().event(&JsonRecord { fields })
                    }
                    Ok(_) => Outcome::Rejected(Refused("the line is not a JSON object".into())),
                    Err(e) => Outcome::Rejected(Refused(format!("the line is not JSON: {e}"))),
                },
            };
            out.push(Read { line, outcome });
        }
        if chunk.ends_with(b"\n") {
            lines -= 1;
        }
        self.lines += lines;
        out
    }
}

fn count_lines(chunk: &[u8]) -> u64 {
    let n = chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    if chunk.is_empty() || chunk.ends_with(b"\n") {
        n
    } else {
        n + 1
    }
}

fn encoding_name(e: Encoding) -> &'static str {
    match e {
        Encoding::Utf8 | Encoding::Auto => "UTF-8",
        Encoding::Gbk => "GBK",
        Encoding::Gb18030 => "GB18030",
    }
}

/// Bytes as text in `encoding`; `None` if they are not valid in it.
fn decode(raw: &[u8], encoding: Encoding) -> Option<Cow<'_, str>> {
    match encoding {
        Encoding::Utf8 | Encoding::Auto => std::str::from_utf8(raw).ok().map(Cow::Borrowed),
        // GBK is a subset of GB18030, and GB18030 decoders read it.
        Encoding::Gbk | Encoding::Gb18030 => {
            encoding_rs::GB18030.decode_without_bom_handling_and_without_replacement(raw)
        }
    }
}

fn decode_fields(
    record: &csv::ByteRecord,
    encoding: Encoding,
    header: &HashMap<String, usize>,
) -> Result<Vec<String>, Refused> {
    let mut fields = Vec::with_capacity(record.len());
    for (i, raw) in record.iter().enumerate() {
        match decode(raw, encoding) {
            Some(t) => fields.push(t.into_owned()),
            None => {
                let column = header
                    .iter()
                    .find(|(_, j)| **j == i)
                    .map_or("?", |(k, _)| k.as_str());
                return Err(Refused(format!(
                    "column {column:?} is not valid {} text",
                    encoding_name(encoding)
                )));
            }
        }
    }
    Ok(fields)
}

struct CsvRecord<'h> {
    header: &'h HashMap<String, usize>,
    fields: Vec<String>,
}

impl Record for CsvRecord<'_> {
    fn get(&self, column: &str) -> Option<&str> {
        self.header
            .get(column)
            .and_then(|&i| self.fields.get(i))
            .map(String::as_str)
    }
}

/// A JSON object's scalars by key path (`user.openid`).
struct JsonRecord {
    fields: HashMap<String, String>,
}

impl Record for JsonRecord {
    fn get(&self, column: &str) -> Option<&str> {
        self.fields.get(column).map(String::as_str)
    }
}

fn flatten(
    prefix: &str,
    map: &serde_json::Map<String, serde_json::Value>,
    depth: usize,
    out: &mut HashMap<String, String>,
) {
    for (k, v) in map {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            serde_json::Value::String(s) => {
                out.insert(key, s.clone());
            }
            serde_json::Value::Number(n) => {
                out.insert(key, n.to_string());
            }
            serde_json::Value::Bool(b) => {
                out.insert(key, b.to_string());
            }
            serde_json::Value::Object(inner) if depth + 1 < MAX_JSON_DEPTH => {
                flatten(&key, inner, depth + 1, out)
            }
            // Null is no value; arrays and deeper objects are not read.
            _ => {}
        }
    }
}
