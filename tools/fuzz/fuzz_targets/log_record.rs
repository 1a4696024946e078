//! Log record payloads (what replay decodes after a record's checksum
//! passed): decoded, and a decoded batch encoded again must decode equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tagstore::storage::record::Batch;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = Batch::decode(data) {
        let again = batch.encode();
        assert_eq!(Batch::decode(&again).ok().as_ref(), Some(&batch));
    }
});
