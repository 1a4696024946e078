//! Field predicates at 10 million customers: bit-sliced range evaluation of
//! an integer field and the COUNT(x WITHIN 90d) frequency (bit-sliced
//! addition over day buckets), each beside the per-customer loop a
//! straightforward implementation would run over the same data.
//! Run: `cargo bench --bench fields`.

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use roaring::RoaringBitmap;
use tagstore::bitmap::ShardedBitmap;
use tagstore::fields::time::parse_date;
use tagstore::fields::{BehaviourSpec, FieldKind, INT_EXISTS, bsi, int_slot};
use tagstore::query::Query;
use tagstore::query::analytics;
use tagstore::storage::snapshot::LazyBitmap;
use tagstore::storage::{Field, FieldMeta, SlotMap, Snapshot};

const CUSTOMERS: u32 = 10_000_000;
const DAYS: i32 = 90;

fn field(id: u32, name: &str, kind: FieldKind, slots: Vec<(u32, RoaringBitmap)>) -> Arc<Field> {
    Arc::new(Field {
        id,
        meta: FieldMeta {
            name: Arc::from(name),
            description: String::new(),
            category: String::new(),
            kind,
            created_ms: 0,
            updated_ms: 0,
            merge: Default::default(),
        },
        slots: slots
            .into_iter()
            .filter(|(_, b)| !b.is_empty())
            .map(|(s, b)| (s, LazyBitmap::loaded(ShardedBitmap::from_roaring(&b))))
            .collect::<SlotMap>(),
    })
}

struct Data {
    snap: Snapshot,
    /// Spend per customer (None: no value), for the per-customer baseline.
    spend: Vec<Option<i64>>,
    days: Vec<RoaringBitmap>,
    today: i32,
}

fn data() -> Data {
    let mut rng = StdRng::seed_from_u64(42);
    // 80% of customers have a spend, skewed: most small, a few large (fen).
    let spend: Vec<Option<i64>> = (0..CUSTOMERS)
        .map(|_| {
            rng.random_bool(0.8)
                .then(|| (rng.random_range(0f64..1.0).powi(3) * 5_000_000.0) as i64)
        })
        .collect();
    let mut exists = Vec::new();
    let mut bits: Vec<Vec<u32>> = vec![Vec::new(); bsi::BITS];
    for (id, v) in spend.iter().enumerate() {
        if let Some(v) = v {
            exists.push(id as u32);
            let u = bsi::encode(*v);
            for (k, b) in bits.iter_mut().enumerate() {
                if u >> k & 1 == 1 {
                    b.push(id as u32);
                }
            }
        }
    }
    let mut slots = vec![(INT_EXISTS, RoaringBitmap::from_sorted_iter(exists).unwrap())];
    for (k, b) in bits.into_iter().enumerate() {
        slots.push((int_slot(k), RoaringBitmap::from_sorted_iter(b).unwrap()));
    }
    let spend_field = field(1, "spend", FieldKind::Int, slots);

    // A behaviour on 90 days, each day 2% of customers.
    let today = parse_date("2026-11-28").unwrap();
    let days: Vec<RoaringBitmap> = (0..DAYS)
        .map(|_| (0..CUSTOMERS).filter(|_| rng.random_bool(0.02)).collect())
        .collect();
    let day_slots = days
        .iter()
        .enumerate()
        .map(|(i, b)| ((today - i as i32) as u32, b.clone()))
        .collect();
    let bought = field(
        2,
        "bought",
        FieldKind::Behaviour(BehaviourSpec {
            time_zone: "Asia/Shanghai".into(),
            retention_days: 365,
            daily_days: 365,
        }),
        day_slots,
    );
    let vip: RoaringBitmap = (0..CUSTOMERS).filter(|_| rng.random_bool(0.01)).collect();
    let mut all = RoaringBitmap::new();
    all.insert_range(0..CUSTOMERS);
    let mut snap = Snapshot::in_memory(
        vec![("vip".into(), ShardedBitmap::from_roaring(&vip))],
        ShardedBitmap::from_roaring(&all),
    );
    snap.fields.insert(Arc::from("spend"), spend_field);
    snap.fields.insert(Arc::from("bought"), bought);
    snap.next_tag_id = 3;
    Data {
        snap,
        spend,
        days,
        today,
    }
}

fn bench(c: &mut Criterion) {
    let d = data();
    // Noon on "today" in Shanghai.
    let now = i64::from(d.today) * 86_400_000 + 4 * 3_600_000;
    let count = |text: &str| {
        Query::compile_at(text, &d.snap, now)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .count()
    };
    let mut g = c.benchmark_group("fields_10M");
    g.sample_size(10);
    for text in [
        "spend >= 500000",
        "spend BETWEEN 100000 AND 500000",
        "spend = 0",
        "vip AND spend >= 500000",
    ] {
        g.bench_function(format!("count {text}"), |b| b.iter(|| count(text)));
    }
    g.bench_function("per-customer loop: spend >= 500000", |b| {
        b.iter(|| {
            d.spend
                .iter()
                .filter(|v| v.is_some_and(|v| v >= 500_000))
                .count()
        })
    });
    let q = Query::compile_at("ALL", &d.snap, now).unwrap();
    let spend = d.snap.field("spend").unwrap();
    let go_on = tagstore::query::eval::Abandon::default();
    g.bench_function(
        "aggregate spend over ALL (sum, min, max, 4-edge histogram)",
        |b| {
            b.iter(|| {
                analytics::aggregate(&q, spend, &[1000, 10_000, 100_000, 1_000_000], &go_on)
                    .unwrap()
            })
        },
    );
    g.bench_function("per-customer loop: sum, min, max of spend", |b| {
        b.iter(|| {
            let (mut s, mut lo, mut hi) = (0i128, i64::MAX, i64::MIN);
            for v in d.spend.iter().flatten() {
                s += i128::from(*v);
                lo = lo.min(*v);
                hi = hi.max(*v);
            }
            (s, lo, hi)
        })
    });
    for text in [
        "bought WITHIN 7d",
        "COUNT(bought WITHIN 90d) >= 3",
        "COUNT(bought WITHIN 30d) >= 2",
        "vip AND COUNT(bought WITHIN 90d) >= 3",
    ] {
        g.bench_function(format!("count {text}"), |b| b.iter(|| count(text)));
    }
    g.bench_function("per-customer loop: COUNT(bought WITHIN 90d) >= 3", |b| {
        b.iter(|| {
            let mut counts = vec![0u8; CUSTOMERS as usize];
            for day in &d.days {
                day.iter().for_each(|id| counts[id as usize] += 1);
            }
            counts.iter().filter(|c| **c >= 3).count()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
