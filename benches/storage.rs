//! Storage micro-benchmarks: log append with and without fsync, segment
//! write and lazy load, dictionary look-ups both ways, and one write through
//! the engine (without fsync) as the number of tags grows.
//! Run: `cargo bench --bench storage`.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore::bitmap::ShardedBitmap;
use tagstore::storage::dictionary::{DictLayer, Dictionary, encode_section};
use tagstore::storage::record::{Batch, Change, ChangeOp};
use tagstore::storage::segment::{BlobKind, Segment, SegmentWriter};
use tagstore::storage::wal::{WalWriter, frame};
use tagstore::storage::{DataDir, Engine, EngineConfig, Mutation, SyncMode, WriteOp};

fn batch_record(n: u32) -> Vec<u8> {
    let b = Batch {
        at_ms: 1,
        changes: vec![Change {
            tag: 1,
            op: ChangeOp::Add,
            ids: (0..n).map(|i| i * 7).collect(),
        }],
        ..Default::default()
    };
    b.encode()
}

fn wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_append");
    for (name, sync) in [
        ("1k-member record, no fsync", false),
        ("1k-member record, fdatasync", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(&DataDir::os(dir.path()), 1).unwrap();
        let payload = batch_record(1000);
        let mut lsn = 1;
        let mut buf = Vec::new();
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                frame(&mut buf, lsn, 1, &payload);
                lsn += 1;
                w.append(&buf).unwrap();
                if sync {
                    w.sync().unwrap();
                }
            })
        });
    }
    g.finish();
}

fn segments(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let mut dense = ShardedBitmap::new();
    let mut sparse = ShardedBitmap::new();
    for id in 0..10_000_000u32 {
        if rng.random_bool(0.5) {
            dense.insert(id);
        }
        if rng.random_bool(0.001) {
            sparse.insert(id);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("segment_10M");
    g.sample_size(10);
    let mut no = 0u64;
    g.bench_function("write a 50% and a 0.1% tag, fsync", |b| {
        b.iter_batched(
            || {
                no += 1;
                no
            },
            |no| {
                let mut w = SegmentWriter::create(&DataDir::os(dir.path()), no).unwrap();
                w.add_bitmap(BlobKind::TagShard, 1, &dense).unwrap();
                w.add_bitmap(BlobKind::TagShard, 2, &sparse).unwrap();
                w.finish().unwrap();
                std::fs::remove_file(dir.path().join(tagstore::storage::segment::file_name(no)))
                    .unwrap();
            },
            BatchSize::PerIteration,
        )
    });
    let mut w = SegmentWriter::create(&DataDir::os(dir.path()), 1_000_000).unwrap();
    w.add_bitmap(BlobKind::TagShard, 1, &dense).unwrap();
    w.add_bitmap(BlobKind::TagShard, 2, &sparse).unwrap();
    w.finish().unwrap();
    let data_dir = DataDir::os(dir.path());
    g.bench_function("open (map, check directory)", |b| {
        b.iter(|| Segment::open(&data_dir, 1_000_000).unwrap())
    });
    let seg = Segment::open(&DataDir::os(dir.path()), 1_000_000).unwrap();
    g.bench_function("lazy load of a 50% tag (crc + decode)", |b| {
        b.iter(|| seg.load_bitmap(BlobKind::TagShard, 1, 0).unwrap())
    });
    g.bench_function("lazy load of a 0.1% tag (crc + decode)", |b| {
        b.iter(|| seg.load_bitmap(BlobKind::TagShard, 2, 0).unwrap())
    });
    g.finish();
}

fn dictionary(c: &mut Criterion) {
    let n = 2_000_000u32;
    let keys: Vec<String> = (0..n).map(|i| format!("phone:1{i:010}")).collect();
    let section = encode_section(keys.iter().enumerate().map(|(i, k)| (i as u32, k.as_str())));
    let dir = tempfile::tempdir().unwrap();
    let mut w = SegmentWriter::create(&DataDir::os(dir.path()), 1).unwrap();
    w.add_blob(BlobKind::Dictionary, 0, 0, &section).unwrap();
    w.finish().unwrap();
    let layer = DictLayer::open(Segment::open(&DataDir::os(dir.path()), 1).unwrap()).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("dictionary_2M");
    g.bench_function("key -> id, random hit", |b| {
        b.iter(|| {
            let k = &keys[rng.random_range(0..n as usize)];
            layer.find(k).unwrap()
        })
    });
    g.bench_function("key -> id, miss", |b| {
        b.iter(|| layer.find("wechat:nobody-at-all").unwrap())
    });
    g.bench_function("id -> key, random", |b| {
        b.iter(|| layer.key_of(rng.random_range(0..n)).unwrap().map(str::len))
    });
    // A request's worth of keys (fresh ones each time, so that they are not
    // in the cache): one look-up after another, or overlapped.
    let dict = Dictionary::new(vec![Arc::new(layer)], n);
    let mut batch = || -> Vec<&str> {
        (0..1000)
            .map(|_| keys[rng.random_range(0..n as usize)].as_str())
            .collect()
    };
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1000 random keys -> ids, one by one", |b| {
        b.iter_batched(
            &mut batch,
            |ks| {
                ks.iter()
                    .map(|k| dict.lookup(k).unwrap())
                    .collect::<Vec<_>>()
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("1000 random keys -> ids, lookup_many", |b| {
        b.iter_batched(
            &mut batch,
            |ks| dict.lookup_many(&ks).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// One membership written through the engine (plan, log append, apply,
/// publish; no fsync), in stores of 20 to 20,000 tags: the cost must not
/// grow with the number of tags.
fn engine_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_single_write");
    for tags in [20usize, 2_000, 20_000] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EngineConfig::new(dir.path());
        config.sync = SyncMode::Never;
        let engine = Engine::open(config).unwrap();
        let names: Vec<String> = (0..tags).map(|t| format!("tag{t}")).collect();
        for chunk in names.chunks(500) {
            let mutations = chunk
                .iter()
                .enumerate()
                .map(|(i, tag)| Mutation {
                    tag: tag.clone(),
                    add: (0..20)
                        .map(|k| format!("c{}", (i * 20 + k) % 50_000))
                        .collect(),
                    remove: vec![],
                    ..Default::default()
                })
                .collect();
            engine
                .write_blocking(WriteOp::Update {
                    mutations,
                    create_missing_tags: true,
                })
                .unwrap();
        }
        let mut i = 0usize;
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{tags} tags"), |b| {
            b.iter(|| {
                i += 1;
                let op = WriteOp::Update {
                    mutations: vec![Mutation {
                        tag: names[i % tags].clone(),
                        add: vec![format!("c{}", i % 50_000)],
                        remove: vec![],
                        ..Default::default()
                    }],
                    create_missing_tags: false,
                };
                engine.write_blocking(op).unwrap()
            })
        });
        engine.shutdown().unwrap();
    }
    g.finish();
}

criterion_group!(benches, wal, segments, dictionary, engine_write);
criterion_main!(benches);
