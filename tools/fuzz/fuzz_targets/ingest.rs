//! Ingestion's inputs: source definitions (TOML), and channel records in
//! CSV and JSON Lines (UTF-8 or GBK) read through each built-in source and
//! normalised into events. The first byte picks which.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tagstore::ingest::presets;
use tagstore::ingest::read::Reader;
use tagstore::ingest::source::Source;

/// Every built-in source (CSV and JSON Lines presets).
fn sources() -> &'static Vec<Arc<Source>> {
    static S: OnceLock<Vec<Arc<Source>>> = OnceLock::new();
    S.get_or_init(|| {
        presets::PRESETS
            .iter()
            .map(|(name, text)| Arc::new(Source::parse(name, text).expect("a built-in preset")))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let sources = sources();
    match which as usize % (sources.len() + 1) {
        0 => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = Source::parse("x", text);
            }
        }
        n => {
            let source = &sources[n - 1];
            let mut r = Reader::new(source.clone());
            // Whole, then again in two pieces.
            let _ = r.feed(rest);
            let mut r = Reader::new(source.clone());
            let cut = rest.len() / 2;
            let _ = r.feed(&rest[..cut]);
            let _ = r.feed(&rest[cut..]);
        }
    }
});
