//! Query evaluation on in-memory bitmaps at 10 million customers: flat
//! roaring-rs and CRoaring bitmaps (building the result and counting it, and
//! the fused count) beside tagstore's sharded counts of 2–5 operand
//! expressions at dense and sparse densities. Run: `cargo bench --bench query`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::bitmap::ShardedBitmap;
use tagstore::query::Query;
use tagstore::storage::Snapshot;

const CUSTOMERS: u32 = 10_000_000;

fn random_bitmap(density: f64, seed: u64) -> ShardedBitmap {
    ShardedBitmap::from_roaring(&random_flat(CUSTOMERS, density, seed))
}

/// Each id in `0..customers` with probability `density`, from `seed`.
fn random_flat(customers: u32, density: f64, seed: u64) -> roaring::RoaringBitmap {
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
    flat
}

fn to_croaring(flat: &roaring::RoaringBitmap) -> croaring::Bitmap {
    croaring::Bitmap::of(&flat.iter().collect::<Vec<_>>())
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
        ("d6", 0.45),
        ("d7", 0.35),
    ]);
    let mut g = c.benchmark_group("count_10M");
    g.sample_size(20);
    // The same seeds as d1 and d2 above.
    let (a, b) = (
        random_flat(CUSTOMERS, 0.5, 1),
        random_flat(CUSTOMERS, 0.5, 2),
    );
    let (ca, cb) = (to_croaring(&a), to_croaring(&b));
    g.bench_function("flat roaring-rs: (a & b).len, 50%", |bench| {
        bench.iter(|| (&a & &b).len())
    });
    g.bench_function("flat roaring-rs: a.intersection_len(b), 50%", |bench| {
        bench.iter(|| a.intersection_len(&b))
    });
    g.bench_function("flat croaring: a.and_cardinality(b), 50%", |bench| {
        bench.iter(|| ca.and_cardinality(&cb))
    });
    for q in [
        "d1 AND d2",
        "s1 AND s2",
        "d1 AND NOT d2",
        "NOT d1",
        "d1 OR d2",
        "d1 AND d2 AND d3",
        "d1 AND (d2 OR d3) AND NOT d4",
        // A union of a dense tag and a sparse one, intersected.
        "d1 AND (d2 OR s1) AND NOT s2",
        "d1 AND (d2 OR s1)",
        "d1 AND d2 AND d3 AND d4 AND d5",
        // 50/45/40/35/30%: split alternately, one half falls under 4,096
        // ids per container and turns into arrays.
        "d1 AND d6 AND d4 AND d7 AND d5",
        "s1 AND d1 AND d2 AND NOT s3",
    ] {
        let query = Query::compile(q, &snap).unwrap();
        g.bench_with_input(BenchmarkId::new("tagstore", q), &query, |bench, query| {
            bench.iter(|| query.count())
        });
    }
    g.finish();

    // Two 0.1% tags over 100M customers: the sharded count beside one flat
    // bitmap per tag, in both libraries (what sharding costs a sparse count).
    let mut g = c.benchmark_group("count_100M_sparse");
    g.sample_size(20);
    let f1 = random_flat(100_000_000, 0.001, 11);
    let f2 = random_flat(100_000_000, 0.001, 12);
    let (c1, c2) = (to_croaring(&f1), to_croaring(&f2));
    let (s1, s2) = (
        ShardedBitmap::from_roaring(&f1),
        ShardedBitmap::from_roaring(&f2),
    );
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
