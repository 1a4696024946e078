//! Ingestion's inputs: source definitions (TOML), and channel records in
//! CSV and JSON Lines (UTF-8 or GBK) read through a source and normalised
//! into events. The first byte picks which.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tagstore::ingest::read::Reader;
use tagstore::ingest::source::Source;

const CSV_SOURCE: &str = r#"
format = "csv"
channel = "taobao"
event_type = "order"
time = "下单时间"
event_id = "订单编号"
amount = { column = "实付金额", unit = "yuan" }
category = "类目"
identities = [
  { type = "phone", column = "手机" },
  { type = "taobao_nick", column = "买家昵称" },
]
"#;

fn sources() -> &'static (Arc<Source>, Arc<Source>) {
    static S: OnceLock<(Arc<Source>, Arc<Source>)> = OnceLock::new();
    S.get_or_init(|| {
        let csv = Source::parse("tb", CSV_SOURCE).expect("the CSV source");
        let jsonl = Source::parse(
            "j",
            &CSV_SOURCE.replace("format = \"csv\"", "format = \"jsonl\""),
        )
        .expect("the JSON Lines source");
        (Arc::new(csv), Arc::new(jsonl))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (csv, jsonl) = sources();
    match which % 3 {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = Source::parse("x", text);
            }
        }
        1 => {
            let mut r = Reader::new(csv.clone());
            // Whole, then again in two pieces.
            let _ = r.feed(rest);
            let mut r = Reader::new(csv.clone());
            let cut = rest.len() / 2;
            let _ = r.feed(&rest[..cut]);
            let _ = r.feed(&rest[cut..]);
        }
        _ => {
            let mut r = Reader::new(jsonl.clone());
            let _ = r.feed(rest);
        }
    }
});
