//! Segment files: the bytes as a whole file (header, trailer, directory
//! checked), and as a blob inside a well-formed segment, read as a tag's
//! bitmap shard (CRoaring's checked portable reader), as a dictionary
//! section and as an identity section (keys looked up and listed).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tagstore::storage::DataDir;
use tagstore::storage::dictionary::DictLayer;
use tagstore::storage::fs::{Create, FileSystem, MemFs};
use tagstore::storage::segment::{BlobKind, Segment, SegmentWriter, file_name};

fuzz_target!(|data: &[u8]| {
    let fs = MemFs::new();
    let _ = fs.create_dir_all(Path::new("/s"));
    let dir = DataDir::new(Arc::new(fs.clone()), "/s");
    // The bytes as a segment file.
    if let Ok(f) = fs.create(&dir.join(file_name(1)), Create::New) {
        let _ = f.write_at(data, 0);
    }
    if let Ok(seg) = Segment::open(&dir, 1) {
        let _ = seg.check_blobs();
        let _ = seg.load_bitmap(BlobKind::TagShard, 0, 0);
    }
    // The bytes as one blob of a well-formed segment.
    let Some((&which, blob)) = data.split_first() else {
        return;
    };
    let kind = match which % 3 {
        0 => BlobKind::TagShard,
        1 => BlobKind::Dictionary,
        _ => BlobKind::Identities,
    };
    let shard = u32::from(which >> 2) % 4;
    let Ok(mut w) = SegmentWriter::create(&dir, 2) else {
        return;
    };
    if w.add_blob(kind, 7, shard, blob).is_err() || w.finish().is_err() {
        return;
    }
    let Ok(seg) = Segment::open(&dir, 2) else {
        return;
    };
    match kind {
        BlobKind::TagShard => {
            if let Ok(b) = seg.load_bitmap(kind, 7, 0) {
                let _ = b.len();
                let _ = b.iter().take(1000).count();
            }
        }
        BlobKind::Dictionary => {
            if let Ok(d) = DictLayer::open(seg) {
                let _ = d.find("phone:13800001111");
                let _ = d.key_of(0);
                let _ = d.iter().take(1000).count();
            }
        }
        _ => {
            if let Ok(d) = DictLayer::open_identities(seg) {
                let _ = d.info_of("phone:13800001111");
                let _ = d.entries().take(1000).count();
                let _ = d.entries_of(0);
            }
        }
    }
});
