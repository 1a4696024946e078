//! `MANIFEST` files: bytes whose checksum holds are parsed (the fuzzer is
//! given a valid checksum for any body, so the body's decoder is reached).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tagstore::storage::manifest::{MANIFEST_MAGIC, MANIFEST_VERSION, Manifest};

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("MANIFEST");
    // As given, and with a header and checksum that hold around it.
    let _ = Manifest::parse(path, data);
    let (version, body) = match data.split_first() {
        Some((v, body)) => (u32::from(*v % (MANIFEST_VERSION as u8 + 1)), body),
        None => (MANIFEST_VERSION, data),
    };
    let mut file = Vec::with_capacity(body.len() + 24);
    file.extend_from_slice(MANIFEST_MAGIC);
    file.extend_from_slice(&version.to_le_bytes());
    file.extend_from_slice(&(body.len() as u64).to_le_bytes());
    file.extend_from_slice(body);
    file.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    let _ = Manifest::parse(path, &file);
});
