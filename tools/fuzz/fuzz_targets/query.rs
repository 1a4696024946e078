//! Query texts: parsed, compiled against a small store, counted and paged.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tagstore::bitmap::ShardedBitmap;
use tagstore::query::{Query, parse};
use tagstore::storage::Snapshot;

fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let t = |ids: std::ops::Range<u32>| ShardedBitmap::from_roaring(&ids.collect());
        Snapshot::in_memory(
            vec![
                ("a".into(), t(0..100)),
                ("b".into(), t(50..150)),
                ("高价值用户".into(), t(10..20)),
                ("with space".into(), t(0..1)),
                ("far".into(), t(3_000_000..3_000_010)),
            ],
            t(0..200),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(expr) = parse(text)
        && let Ok(q) = Query::from_expr_at(&expr, snapshot(), 1_794_362_400_000)
    {
        let _ = q.count();
        let _ = q.page(None, 10);
    }
});
