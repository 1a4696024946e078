//! Backup files, as `tagstore restore` reads them: the bytes restored into
//! a new in-memory directory (the header's checksum is made to hold half
//! the time, so the entries behind it are reached).
#![no_main]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tagstore::storage::DataDir;
use tagstore::storage::backup::{HEADER_LEN, Header, restore_into};
use tagstore::storage::fs::{FileSystem, MemFs};

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if let Some(first) = bytes.first().copied()
        && first & 1 == 1
    {
        // A valid full backup's header before the fuzzer's entries.
        let h = Header {
            id: 1,
            base_id: 0,
            base_position: 0,
            position: u64::from(first >> 1),
            checkpoint_lsn: 0,
            next_segment_no: 0,
            audit_newest: 0,
            at_ms: 0,
        };
        let mut with = h.encode().to_vec();
        with.extend_from_slice(&bytes[1..]);
        bytes = with;
    }
    let fs = MemFs::new();
    let _ = fs.create_dir_all(Path::new("/r"));
    let dir = DataDir::new(Arc::new(fs), "/r");
    let input: Box<dyn Read> = Box::new(std::io::Cursor::new(bytes));
    let _ = restore_into(vec![(PathBuf::from("fuzzed.tsbak"), input)], &dir);
    let _ = HEADER_LEN;
});
