//! Request messages as the server receives them: the bytes decoded as one
//! of the service's requests (the first byte picks which: every unary call
//! and the server streams, whose requests are checked before their first
//! message; the client streams' messages are records and keys, which the
//! `ingest` target and the key rules cover) and, when they
//! decode, handed to the real service (in-process, on an in-memory store
//! with a few tags, fields, a source and an audience), which converts them
//! into domain types and runs them. Writes change the store as they would
//! a server's; a long run grows it (give libFuzzer `-rss_limit_mb`).
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tagstore::config::Limits;
use tagstore::proto::tag_store_server::TagStore;
use tagstore::proto::*;
use tagstore::server::Service;
use tagstore::server::budget::MemoryBudget;
use tagstore::storage::fs::{FileSystem, MemFs};
use tagstore::storage::{DataDir, Engine, EngineConfig};
use tonic::Request;

struct World {
    rt: tokio::runtime::Runtime,
    svc: Service,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let fs = MemFs::new();
        fs.create_dir_all(Path::new("/store")).expect("a directory");
        let mut cfg = EngineConfig::new("/store");
        cfg.fs = Arc::new(fs.clone());
        let engine = Arc::new(Engine::open(cfg).expect("an in-memory store"));
        let audit = tagstore::audit::Audit::open(
            DataDir::new(Arc::new(fs), "/store"),
            Default::default(),
            tagstore::clock::system(),
        )
        .expect("an audit trail");
        let (_closing_tx, closing) = tokio::sync::watch::channel(false);
        std::mem::forget(_closing_tx);
        let limits = Limits {
            max_keys_per_request: 1000,
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // The service starts its watchers' hub on the runtime.
        let entered = rt.enter();
        let svc = Service::new(
            engine,
            limits,
            "Asia/Shanghai".into(),
            MemoryBudget::new(256 << 20),
            tagstore::ingest::facts::Facts::standard(),
            closing,
            audit,
        );
        drop(entered);
        rt.block_on(async {
            for (tag, category) in [("a", "x"), ("b", "x"), ("高价值用户", "价值")] {
                let _ = svc
                    .create_tag(Request::new(CreateTagRequest {
                        name: tag.into(),
                        category: category.into(),
                        ..Default::default()
                    }))
                    .await;
            }
            let _ = svc
                .create_field(Request::new(CreateFieldRequest {
                    name: "lifecycle".into(),
                    kind: FieldKind::Enum as i32,
                    values: vec!["new".into(), "active".into()],
                    ..Default::default()
                }))
                .await;
            let _ = svc
                .create_field(Request::new(CreateFieldRequest {
                    name: "spend".into(),
                    kind: FieldKind::Integer as i32,
                    ..Default::default()
                }))
                .await;
            let _ = svc
                .update(Request::new(UpdateRequest {
                    mutations: vec![Mutation {
                        tag: "a".into(),
                        add: (0..50).map(|i| format!("k{i}")).collect(),
                        ..Default::default()
                    }],
                    create_missing_tags: false,
                }))
                .await;
            let _ = svc
                .create_audience(Request::new(CreateAudienceRequest {
                    name: "aud".into(),
                    query: "a AND NOT b".into(),
                    ..Default::default()
                }))
                .await;
        });
        World { rt, svc }
    })
}

/// Decodes `bytes` as `T` and runs `call` with it, if they decode.
macro_rules! run {
    ($w:expr, $bytes:expr, $ty:ty, $method:ident) => {
        if let Ok(m) = <$ty>::decode($bytes) {
            let _ = $w.rt.block_on($w.svc.$method(Request::new(m)));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let w = world();
    match which % 27 {
        0 => run!(w, bytes, CountRequest, count),
        1 => run!(w, bytes, MembersRequest, members),
        2 => run!(w, bytes, ProfileRequest, profile),
        3 => run!(w, bytes, DescribeTagRequest, describe_tag),
        4 => run!(w, bytes, ListTagsRequest, list_tags),
        5 => run!(w, bytes, UpdateRequest, update),
        6 => run!(w, bytes, SetValuesRequest, set_values),
        7 => run!(w, bytes, DeleteCustomersRequest, delete_customers),
        8 => run!(w, bytes, ResolveCustomersRequest, resolve_customers),
        9 => run!(w, bytes, CreateTagRequest, create_tag),
        10 => run!(w, bytes, CreateFieldRequest, create_field),
        11 => run!(w, bytes, CreateSourceRequest, create_source),
        12 => run!(w, bytes, CreateAudienceRequest, create_audience),
        13 => run!(w, bytes, DefineRuleRequest, define_rule),
        14 => run!(w, bytes, AggregateRequest, aggregate),
        15 => run!(w, bytes, BreakdownRequest, breakdown),
        16 => run!(w, bytes, TopTagsRequest, top_tags),
        17 => run!(w, bytes, OverlapRequest, overlap),
        18 => run!(w, bytes, TagHistoryRequest, tag_history),
        19 => run!(w, bytes, LinkRequest, link),
        20 => run!(w, bytes, TakeSnapshotRequest, take_snapshot),
        21 => run!(w, bytes, ListMergesRequest, list_merges),
        22 => run!(w, bytes, UnmergeRequest, unmerge),
        23 => run!(w, bytes, ReadAuditRequest, read_audit),
        // Streams: the request is checked and converted before the first
        // message; the stream is dropped at once (a backup's thread then
        // ends at its first chunk).
        24 => run!(w, bytes, ExportRequest, export),
        25 => run!(w, bytes, WatchRequest, watch),
        _ => run!(w, bytes, BackupRequest, backup),
    }
});
