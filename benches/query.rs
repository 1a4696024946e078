//! Query evaluation on in-memory bitmaps at 10 million customers: the fused
//! count against building the result and counting it, and 3–5 operand
//! expressions at dense and sparse densities, each with CRoaring (what the
//! server runs) and with roaring-rs only. Run: `cargo bench --bench query`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::bitmap::ShardedBitmap;
use tagstore::query::Query;
use tagstore::storage::Snapshot;

const CUSTOMERS: u32 = 10_000_000;

fn random_bitmap(density: f64, seed: u64) -> ShardedBitmap {
    random_bitmap_of(CUSTOMERS, density, seed)
}

fn random_bitmap_of(customers: u32, density: f64, seed: u64) -> ShardedBitmap {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut flat = roaring::RoaringBitmap::new();
    let ln_q = (1.0 - density).ln();
    let mut id = -1f64;
    loop {
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        id += 1.0 + (u.ln() / ln_q).floor();
        if id >= customers as f64 {
            break;
        }
        flat.insert(id as u32);
    }
    ShardedBitmap::from_roaring(&flat)
}

fn snapshot(tags: &[(&str, f64)]) -> Snapshot {
    let tags = tags
        .iter()
        .enumerate()
        .map(|(i, (name, density))| (name.to_string(), random_bitmap(*density, i as u64 + 1)))
        .collect();
    let mut all = roaring::RoaringBitmap::new();
    all.insert_range(0..CUSTOMERS);
    Snapshot::in_memory(tags, ShardedBitmap::from_roaring(&all))
}

fn bench(c: &mut Criterion) {
    let snap = snapshot(&[
        ("d1", 0.5),
        ("d2", 0.5),
        ("d3", 0.5),
        ("d4", 0.4),
        ("d5", 0.3),
        ("s1", 0.001),
        ("s2", 0.001),
        ("s3", 0.01),
    ]);
    let mut g = c.benchmark_group("count_10M");
    g.sample_size(20);
    let a = snap.tag("d1").unwrap().bitmap.get().unwrap().to_roaring();
    let b = snap.tag("d2").unwrap().bitmap.get().unwrap().to_roaring();
    g.bench_function("flat roaring: (a & b).len, 50%", |bench| {
        bench.iter(|| (&a & &b).len())
    });
    g.bench_function("flat roaring: a.intersection_len(b), 50%", |bench| {
        bench.iter(|| a.intersection_len(&b))
    });
    for q in [
        "d1 AND d2",
        "s1 AND s2",
        "d1 AND NOT d2",
        "NOT d1",
        "d1 OR d2",
        "d1 AND d2 AND d3",
        "d1 AND (d2 OR d3) AND NOT d4",
        "d1 AND d2 AND d3 AND d4 AND d5",
        "s1 AND d1 AND d2 AND NOT s3",
    ] {
        let query = Query::compile(q, &snap).unwrap();
        g.bench_with_input(BenchmarkId::new("tagstore", q), &query, |bench, query| {
            bench.iter(|| query.count())
        });
        g.bench_with_input(
            BenchmarkId::new("tagstore, roaring-rs only", q),
            &query,
            |bench, query| bench.iter(|| query.count_roaring()),
        );
    }
    g.finish();

    // Two 0.1% tags over 100M customers: the sharded count beside one flat
    // bitmap per tag, in both libraries (what sharding costs a sparse count).
    let mut g = c.benchmark_group("count_100M_sparse");
    g.sample_size(20);
    let s1 = random_bitmap_of(100_000_000, 0.001, 11);
    let s2 = random_bitmap_of(100_000_000, 0.001, 12);
    let (f1, f2) = (s1.to_roaring(), s2.to_roaring());
    let c1 = croaring::Bitmap::of(&f1.iter().collect::<Vec<_>>());
    let c2 = croaring::Bitmap::of(&f2.iter().collect::<Vec<_>>());
    let mut all = roaring::RoaringBitmap::new();
    all.insert_range(0..100_000_000);
    let snap = Snapshot::in_memory(
        vec![("s1".into(), s1), ("s2".into(), s2)],
        ShardedBitmap::from_roaring(&all),
    );
    let query = Query::compile("s1 AND s2", &snap).unwrap();
    g.bench_function("flat roaring-rs intersection_len", |bench| {
        bench.iter(|| f1.intersection_len(&f2))
    });
    g.bench_function("flat croaring and_cardinality", |bench| {
        bench.iter(|| c1.and_cardinality(&c2))
    });
    g.bench_function("tagstore s1 AND s2", |bench| bench.iter(|| query.count()));
    g.finish();

    let mut g = c.benchmark_group("parse");
    let text =
        "高价值用户 AND (常购护肤品 OR 尝试新品) AND NOT 潜在流失 OR \"with space\" AND channel:jd";
    g.bench_function("parse 6-tag query", |bench| {
        bench.iter(|| tagstore::query::parse(text).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
