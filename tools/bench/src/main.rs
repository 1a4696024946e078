//! `tagstore-bench`: the capacity harness. It starts a real `tagstore`
//! server and, when `redis-server` is installed, a Redis of its own, loads
//! the same seeded data into both, and times the same work on each: tagstore
//! through its gRPC proto, Redis with the commands a Redis user would write.
//! Every row of the report has both figures and their ratio.
//!
//! Scenarios: `load`, `update`, `query`, `mixed`, `restart`, `sweep`, and
//! `all` (every one, in that order).

mod data;
mod ops;
mod redis;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use data::{DataSet, customer_key};
use indicatif::{ProgressBar, ProgressStyle};
use ops::{BoxError, Measured, Op, Q, redis_key, redis_loop, tagstore_alternating, tagstore_loop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::{Conn, RedisServer};
use report::{Better, Report};
use serde_json::json;
use tagstore::bitmap::ShardedBitmap;
use tagstore::query::Query;
use tagstore::storage::Snapshot;
use tagstore_proto::*;
use tagstore_test_support::ServerProcess;

#[derive(Parser)]
#[command(
    name = "tagstore-bench",
    version,
    about = "Capacity harness for tagstore, side by side with Redis bitmaps"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Customers in the data set.
    #[arg(long, global = true, default_value_t = 10_000_000)]
    customers: u32,
    /// Tags in the data set.
    #[arg(long, global = true, default_value_t = 200)]
    tags: usize,
    #[arg(long, global = true, default_value_t = 42)]
    seed: u64,
    /// Concurrent clients for the bulk load.
    #[arg(long, global = true, default_value_t = 4)]
    concurrency: usize,
    /// Memberships per request in the bulk load.
    #[arg(long, global = true, default_value_t = 10_000)]
    batch: usize,
    /// Memberships per request in the update scenario.
    #[arg(long, global = true, value_delimiter = ',', default_values_t = vec![1usize, 1000])]
    update_batches: Vec<usize>,
    /// Concurrent clients in the update scenario.
    #[arg(long, global = true, value_delimiter = ',', default_values_t = vec![1usize, 8, 50])]
    update_clients: Vec<usize>,
    /// Concurrent clients in the query and mixed scenarios.
    #[arg(long, global = true, default_value_t = 8)]
    query_clients: usize,
    /// Seconds each timed configuration runs.
    #[arg(long, global = true, default_value_t = 5.0)]
    seconds: f64,
    /// Customers in the density sweep (default: --customers).
    #[arg(long, global = true)]
    sweep_customers: Option<u32>,
    /// Densities of the sweep.
    #[arg(long, global = true, value_delimiter = ',', default_values_t = vec![0.0001, 0.001, 0.01, 0.1, 0.5])]
    sweep_densities: Vec<f64>,
    /// Keep tagstore's data here (default: a temporary directory).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Keep the density sweep's tagstore data here (default: a temporary
    /// directory). With --reuse, a store already there is not loaded again:
    /// it must come from the same --sweep-customers, --sweep-densities and --seed.
    #[arg(long, global = true)]
    sweep_data_dir: Option<PathBuf>,
    /// Skip tagstore's load when the data directory (or the sweep's) already holds a store.
    #[arg(long, global = true)]
    reuse: bool,
    /// Run tagstore alone, even when redis-server is installed.
    #[arg(long, global = true)]
    no_redis: bool,
    /// The server binary (default: `tagstore` beside this one).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Where the JSON report and the SVG plots go.
    #[arg(long, global = true, default_value = "bench-results")]
    out: PathBuf,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// Bulk load through gRPC (Redis: pipelined SETBIT).
    Load,
    /// Durable batched updates at several concurrencies.
    Update,
    /// Counts of 2–5 tag expressions, member pages, profiles.
    Query,
    /// Query latency with and without a concurrent write load.
    Mixed,
    /// Stop and start: time to the first answer; recovery after kill -9.
    Restart,
    /// count(A AND B) across densities, to find where roaring stops winning.
    Sweep,
    /// Every scenario.
    All,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:40}] {percent:>3}% {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

struct Bench {
    cli: Cli,
    bin: PathBuf,
    dir: PathBuf,
    work: PathBuf,
    data: Arc<DataSet>,
    redis_bin: Option<PathBuf>,
    redis: Option<RedisServer>,
    report: Report,
    /// The query scenario's dense two-tag count, reused by `mixed`.
    dense_pair: Q,
    /// Seeds of the timed write runs ([`Bench::write_seed`]).
    write_seeds: u64,
}

/// Tags by role: dense (≥ 30% of all customers), sparse (nearest 0.1%), and tiny (≤ 1,000 members).
struct Picks {
    dense: Vec<usize>,
    sparse: Vec<usize>,
    tiny: Vec<usize>,
}

fn picks(data: &DataSet) -> Picks {
    let mut by_density: Vec<usize> = (1..data.tags.len()).collect();
    let overall = |t: usize| data.tags[t].expected_members() as f64 / data.customers as f64;
    by_density.sort_by(|a, b| overall(*b).total_cmp(&overall(*a)));
    let dense: Vec<usize> = by_density.iter().copied().take(5).collect();
    let mut sparse = by_density.clone();
    sparse.sort_by(|a, b| {
        (overall(*a).ln() - 0.001f64.ln())
            .abs()
            .total_cmp(&(overall(*b).ln() - 0.001f64.ln()).abs())
    });
    sparse.truncate(3);
    let mut tiny = by_density.clone();
    tiny.sort_by_key(|t| data.tags[*t].expected_members());
    tiny.truncate(2);
    Picks {
        dense,
        sparse,
        tiny,
    }
}

/// The same bitmaps as the server holds, in this process: the "in-process ceiling".
fn in_process_snapshot(data: &DataSet, tags: &[usize]) -> Snapshot {
    let bitmaps = tags
        .iter()
        .map(|&t| {
            let flat = roaring::RoaringBitmap::from_sorted_iter(data.members(t))
                .expect("members are sorted");
            (
                data.tags[t].name.clone(),
                ShardedBitmap::from_roaring(&flat),
            )
        })
        .collect();
    let mut all = roaring::RoaringBitmap::new();
    all.insert_range(0..data.customers);
    Snapshot::in_memory(bitmaps, ShardedBitmap::from_roaring(&all))
}

/// Names of the tags of `snap` whose member count in the server differs
/// from the generated data's: a store kept with `--reuse` that writes have
/// changed since it was loaded.
async fn tags_changed(server: &ServerProcess, snap: &Snapshot) -> Result<Vec<String>, BoxError> {
    let mut c = server.client().await?;
    let mut changed = Vec::new();
    for (name, tag) in &snap.tags {
        let found = c
            .describe_tag(DescribeTagRequest {
                name: name.to_string(),
            })
            .await?
            .into_inner()
            .tag
            .map_or(0, |t| t.member_count);
        if found != tag.meta.count {
            changed.push(name.to_string());
        }
    }
    Ok(changed)
}

/// Median time of evaluating `text` in-process, in milliseconds.
fn in_process_ms(snap: &Snapshot, text: &str, budget: Duration) -> Result<f64, BoxError> {
    let q = Query::compile(text, snap)?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (started.elapsed() < budget && times.len() < 10_000) {
        let t0 = Instant::now();
        std::hint::black_box(q.count());
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

impl Bench {
    fn start(&self, dir: &Path, extra: &[&str]) -> Result<ServerProcess, BoxError> {
        Ok(ServerProcess::start(
            &self.bin,
            dir,
            extra,
            Duration::from_secs(3600),
        )?)
    }

    fn redis_port(&self) -> Option<u16> {
        self.redis.as_ref().map(|r| r.port)
    }

    /// A seed for the next timed run of writes, different from every other
    /// run's: a run that repeated the writes of an earlier one would find
    /// them done, and neither system logs or syncs a write that changes
    /// nothing. `nonce` is the store's lsn when the scenario starts, so that
    /// a store kept with `--reuse` (which has seen the last run's writes)
    /// gets new ones too; Redis is loaded afresh each time. Both systems get
    /// the same seed for the same row, and so the same writes.
    fn write_seed(&mut self, nonce: u64) -> u64 {
        self.write_seeds += 1;
        self.cli
            .seed
            .wrapping_add(nonce.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(self.write_seeds.wrapping_mul(0xbf58_476d_1ce4_e5b9))
    }

    /// Loads the data set into tagstore (unless reused) and into Redis.
    async fn load(&mut self, timed: bool) -> Result<(), BoxError> {
        let data = self.data.clone();
        println!(
            "load: {} customers, {} tags, ~{} memberships",
            data.customers,
            data.tags.len(),
            data.total_memberships()
        );
        let mut tagstore_rate = None;
        let mut tagstore_rate_merged = None;
        let mut tagstore_rss = None;
        let mut tagstore_rss_file = None;
        let mut tagstore_disk = None;
        if !(self.cli.reuse && self.dir.join("MANIFEST").exists()) {
            let server = self.start(&self.dir.clone(), &[])?;
            let mut c = server.client().await?;
            for t in &data.tags {
                c.create_tag(CreateTagRequest {
                    name: t.name.clone(),
                    if_not_exists: true,
                    ..Default::default()
                })
                .await?;
            }
            let started = Instant::now();
            let pb = bar(data.total_memberships(), "tagstore load");
            // Tag 0 (every customer) first and in order: it creates the customers.
            for chunk in data.members(0).chunks(self.cli.batch) {
                let add = chunk.iter().map(|&id| customer_key(id)).collect();
                c.update(UpdateRequest {
                    mutations: vec![Mutation {
                        tag: data.tags[0].name.clone(),
                        add,
                        remove: vec![],
                        ..Default::default()
                    }],
                    create_missing_tags: false,
                })
                .await?;
                pb.inc(chunk.len() as u64);
            }
            let customers_secs = started.elapsed().as_secs_f64();
            load_tags(
                &server,
                &data,
                1..data.tags.len(),
                self.cli.concurrency,
                self.cli.batch,
                &pb,
            )
            .await?;
            pb.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            // What a bulk load should end with: one dictionary section, so
            // that a key look-up probes one hash table (see the proto).
            c.checkpoint(CheckpointRequest {
                merge_dictionary: true,
            })
            .await?;
            let checkpoint_secs = started.elapsed().as_secs_f64() - secs;
            let st = c.stats(StatsRequest {}).await?.into_inner();
            tagstore_rate = Some(data.total_memberships() as f64 / secs);
            tagstore_rate_merged = Some(data.total_memberships() as f64 / (secs + checkpoint_secs));
            tagstore_rss = server.rss_bytes().map(|b| b as f64);
            tagstore_rss_file = server.rss_file_bytes().map(|b| b as f64);
            tagstore_disk = Some(st.disk_bytes as f64);
            self.report.extra.insert("tagstore_load".into(), json!({ "customers_seconds": customers_secs, "seconds": secs, "final_checkpoint_seconds": checkpoint_secs, "dictionary_sections": st.dictionary_sections, "customers": st.customers }));
            drop(c);
            let mut server = server;
            server.stop()?;
        }

        let mut redis_rate = None;
        if let Some(bin) = self.redis_bin.clone() {
            let dir = self.work.join("redis");
            let _ = std::fs::remove_dir_all(&dir);
            let server = RedisServer::start(&bin, &dir, "everysec", true)?;
            let started = Instant::now();
            let pb = bar(data.total_memberships(), "redis load");
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut threads = Vec::new();
            for _ in 0..self.cli.concurrency {
                let (data, next, pb, port, batch) = (
                    data.clone(),
                    next.clone(),
                    pb.clone(),
                    server.port,
                    self.cli.batch,
                );
                threads.push(std::thread::spawn(move || -> Result<(), String> {
                    let mut c = Conn::connect(port)?;
                    loop {
                        let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if t >= data.tags.len() {
                            return Ok(());
                        }
                        let key = redis_key(t);
                        // Full length up front, so NOT covers every customer.
                        c.cmd(&[
                            b"SETBIT",
                            key.as_bytes(),
                            (data.customers - 1).to_string().as_bytes(),
                            b"0",
                        ])?;
                        for chunk in data.members(t).chunks(batch) {
                            for id in chunk {
                                c.send(&[
                                    b"SETBIT",
                                    key.as_bytes(),
                                    id.to_string().as_bytes(),
                                    b"1",
                                ])?;
                            }
                            c.flush()?;
                            pb.inc(chunk.len() as u64);
                        }
                    }
                }));
            }
            for t in threads {
                t.join().map_err(|_| "redis load thread panicked")??;
            }
            pb.finish_and_clear();
            redis_rate = Some(data.total_memberships() as f64 / started.elapsed().as_secs_f64());
            self.redis = Some(server);
        }
        if timed {
            let batch = self.cli.batch;
            let clients = self.cli.concurrency;
            self.report.add(
                "load",
                &format!(
                    "memberships/s, batch {batch}, {clients} clients (redis: pipelined SETBIT)"
                ),
                "/s",
                Better::Higher,
                tagstore_rate,
                redis_rate,
            );
            self.report.add(
                "load",
                "memberships/s, with the final checkpoint merging the dictionary",
                "/s",
                Better::Higher,
                tagstore_rate_merged,
                redis_rate,
            );
            let redis_rss = match &self.redis {
                Some(r) => Some(r.rss()? as f64),
                None => None,
            };
            self.report.add(
                "load",
                "server memory (RSS) after load",
                "bytes",
                Better::Lower,
                tagstore_rss,
                redis_rss,
            );
            // Of that, pages of mapped segment files (mostly the customer
            // key dictionary, which Redis does not hold: its bit offsets are
            // the ids): page cache, reclaimable under memory pressure.
            self.report.add(
                "load",
                "server memory (RSS) less mapped segment files",
                "bytes",
                Better::Lower,
                tagstore_rss.zip(tagstore_rss_file).map(|(r, f)| r - f),
                redis_rss,
            );
            self.report.add(
                "load",
                "disk after load (redis: not measured)",
                "bytes",
                Better::Lower,
                tagstore_disk,
                None,
            );
            // Memory of one tag: tagstore's roaring bitmap against Redis's string.
            let p = picks(&data);
            for (label, t) in [("dense", p.dense[0]), ("~0.1%", p.sparse[0])] {
                let members = data.members(t);
                let density = members.len() as f64 / data.customers as f64 * 100.0;
                let flat =
                    roaring::RoaringBitmap::from_sorted_iter(members).map_err(|e| e.to_string())?;
                let ours = ShardedBitmap::from_roaring(&flat).serialized_size() as f64;
                let theirs = match &self.redis {
                    Some(r) => Some(
                        r.conn()?
                            .cmd(&[b"MEMORY", b"USAGE", redis_key(t).as_bytes()])?
                            .int()? as f64,
                    ),
                    None => None,
                };
                self.report.add(
                    "load",
                    &format!("memory of one {label} tag ({density:.3}% of customers)"),
                    "bytes",
                    Better::Lower,
                    Some(ours),
                    theirs,
                );
            }
        }
        Ok(())
    }

    async fn update(&mut self) -> Result<(), BoxError> {
        let server = self.start(&self.dir.clone(), &[])?;
        if let Some(r) = &self.redis {
            r.conn()?
                .cmd(&[b"CONFIG", b"SET", b"appendfsync", b"always"])?;
        }
        let mut figures = Vec::new();
        // Redis takes the customer as a bit offset; tagstore is measured both
        // ways: by key (it resolves each one) and by internal id (the same
        // work Redis is given). The Redis figure is shared by both rows.
        let ids = Arc::new(ops::resolve_ids(&server.addr, &self.data).await?);
        let nonce = store_lsn(&server).await?;
        self.write_floor(&server).await?;
        self.new_memberships(&server, &ids, nonce).await?;
        for &batch in &self.cli.update_batches.clone() {
            for &clients in &self.cli.update_clients.clone() {
                let op = Op::Update { batch };
                let by_id = Op::UpdateByIds {
                    batch,
                    ids: ids.clone(),
                };
                // By key and by id each get writes of their own: by id
                // repeating the writes just made by key would find them done.
                let seed = self.write_seed(nonce);
                let (ours, theirs) = self.on_both(&server.addr, &op, clients, seed).await?;
                let seed = self.write_seed(nonce);
                let ours_by_id = tagstore_loop(
                    &server.addr,
                    &self.data,
                    &by_id,
                    clients,
                    self.cli.seconds,
                    seed,
                )
                .await?;
                let label = format!(
                    "batch {batch}, {clients} clients (durable: fsync / appendfsync always)"
                );
                self.rows_for(
                    "update",
                    &label,
                    &ours,
                    theirs.as_ref(),
                    batch as f64,
                    "memberships/s",
                );
                self.rows_for(
                    "update",
                    &format!("batch {batch}, {clients} clients, by internal id (durable)"),
                    &ours_by_id,
                    theirs.as_ref(),
                    batch as f64,
                    "memberships/s",
                );
                figures.push(json!({ "batch": batch, "clients": clients, "tagstore": measured_json(&ours), "tagstore_by_id": measured_json(&ours_by_id), "redis": theirs.as_ref().map(measured_json) }));
            }
        }
        // The relaxed comparison: Redis fsyncs once a second.
        if let Some(r) = &self.redis {
            r.conn()?
                .cmd(&[b"CONFIG", b"SET", b"appendfsync", b"everysec"])?;
            let op = Op::Update { batch: 1000 };
            let (port, secs) = (r.port, self.cli.seconds);
            let seed = self.write_seed(nonce);
            let ours = tagstore_loop(&server.addr, &self.data, &op, 8, secs, seed).await?;
            let theirs = redis_loop(port, &self.data, &op, 8, secs, seed)?;
            self.report.add(
                "update",
                "batch 1000, 8 clients: memberships/s (redis appendfsync everysec)",
                "/s",
                Better::Higher,
                Some(ours.rate() * 1000.0),
                Some(theirs.rate() * 1000.0),
            );
        }
        self.report.extra.insert("update".into(), json!(figures));
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    /// What any durable write of one membership costs on this machine,
    /// whatever the server: one fdatasync of a small append to a file on the
    /// data directory's file system (preallocated, as tagstore's log is),
    /// and one gRPC round trip of the lightest request (a count of the two
    /// tiniest tags, answered on the network thread).
    async fn write_floor(&mut self, server: &ServerProcess) -> Result<(), BoxError> {
        use std::io::Write;
        let parent = self
            .dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut probe = tempfile::NamedTempFile::new_in(parent)?;
        {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fallocate on a file descriptor the probe owns.
            let rc = unsafe { libc::posix_fallocate(probe.as_file().as_raw_fd(), 0, 4 << 20) };
            if rc != 0 {
                probe.as_file().set_len(4 << 20)?;
            }
        }
        probe.as_file().sync_all()?;
        let record = [0x5au8; 64];
        let mut times = Vec::with_capacity(2000);
        let started = Instant::now();
        while times.len() < 2000 && started.elapsed() < Duration::from_secs_f64(self.cli.seconds) {
            let t0 = Instant::now();
            probe.write_all(&record)?;
            probe.as_file().sync_data()?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let fsync_ms = times[times.len() / 2];
        let p = picks(&self.data);
        let tiny = Op::Count(Q::And(p.tiny.iter().map(|&t| Q::Tag(t)).collect()));
        let rtt = tagstore_loop(
            &server.addr,
            &self.data,
            &tiny,
            1,
            self.cli.seconds.min(2.0),
            self.cli.seed,
        )
        .await?;
        self.report.add(
            "update",
            "floor: fdatasync of a 64-byte append, p50 (no server)",
            "ms",
            Better::Lower,
            Some(fsync_ms),
            None,
        );
        self.report.add(
            "update",
            "floor: gRPC round trip of the lightest count, 1 client, p50",
            "ms",
            Better::Lower,
            Some(rtt.ms(0.5)),
            None,
        );
        self.report.extra.insert(
            "write_floor".into(),
            json!({ "fdatasync_p50_ms": fsync_ms, "grpc_round_trip": measured_json(&rtt) }),
        );
        Ok(())
    }

    /// Single durable writes that each add a new membership (to a tag that
    /// starts empty), from 1 and 8 clients: the like-for-like cost of a write
    /// that must reach the disk on both sides.
    async fn new_memberships(
        &mut self,
        server: &ServerProcess,
        ids: &Arc<Vec<u32>>,
        nonce: u64,
    ) -> Result<(), BoxError> {
        let mut c = server.client().await?;
        let _ = c
            .drop_tag(DropTagRequest {
                name: ops::FRESH_TAG.into(),
            })
            .await;
        c.create_tag(CreateTagRequest {
            name: ops::FRESH_TAG.into(),
            ..Default::default()
        })
        .await?;
        if let Some(r) = &self.redis {
            r.conn()?.cmd(&[b"DEL", ops::FRESH_KEY.as_bytes()])?;
        }
        let op = Op::AddNew { ids: ids.clone() };
        let mut figures = Vec::new();
        for clients in [1, 8] {
            let seed = self.write_seed(nonce);
            let (ours, theirs) = self.on_both(&server.addr, &op, clients, seed).await?;
            self.rows_for(
                "update",
                &format!("batch 1, {clients} clients, each a new membership (durable)"),
                &ours,
                theirs.as_ref(),
                1.0,
                "memberships/s",
            );
            figures.push(json!({ "clients": clients, "tagstore": measured_json(&ours), "redis": theirs.as_ref().map(measured_json) }));
        }
        self.report
            .extra
            .insert("update_new_memberships".into(), json!(figures));
        Ok(())
    }

    /// `op` from `clients` connections for `--seconds`, on tagstore and (when
    /// it runs) on Redis, on this run's data set.
    async fn on_both(
        &self,
        addr: &str,
        op: &Op,
        clients: usize,
        seed: u64,
    ) -> Result<(Measured, Option<Measured>), BoxError> {
        let secs = self.cli.seconds;
        let ours = tagstore_loop(addr, &self.data, op, clients, secs, seed).await?;
        let theirs = match self.redis_port() {
            Some(port) => Some(redis_loop(port, &self.data, op, clients, secs, seed)?),
            None => None,
        };
        Ok((ours, theirs))
    }

    fn rows_for(
        &mut self,
        scenario: &str,
        label: &str,
        ours: &Measured,
        theirs: Option<&Measured>,
        per_request: f64,
        what: &str,
    ) {
        let rate_label = if what.is_empty() {
            format!("{label}: requests/s")
        } else {
            format!("{label}: {what}")
        };
        self.report.add(
            scenario,
            &rate_label,
            "/s",
            Better::Higher,
            Some(ours.rate() * per_request),
            theirs.map(|m| m.rate() * per_request),
        );
        self.report.add(
            scenario,
            &format!("{label}: p50"),
            "ms",
            Better::Lower,
            Some(ours.ms(0.5)),
            theirs.map(|m| m.ms(0.5)),
        );
        self.report.add(
            scenario,
            &format!("{label}: p99"),
            "ms",
            Better::Lower,
            Some(ours.ms(0.99)),
            theirs.map(|m| m.ms(0.99)),
        );
    }

    async fn query(&mut self) -> Result<(), BoxError> {
        let data = self.data.clone();
        let p = picks(&data);
        let d = |i: usize| Q::Tag(p.dense[i % p.dense.len()]);
        let s = |i: usize| Q::Tag(p.sparse[i % p.sparse.len()]);
        let exprs: Vec<(&str, Q)> = vec![
            ("2 dense AND", Q::And(vec![d(0), d(1)])),
            ("2 dense OR", Q::Or(vec![d(0), d(1)])),
            ("2 dense AND NOT", Q::AndNot(Box::new(d(0)), Box::new(d(1)))),
            ("3 dense AND", Q::And(vec![d(0), d(1), d(2)])),
            (
                "4 mixed: a AND (b OR c) AND NOT d",
                Q::AndNot(
                    Box::new(Q::And(vec![d(0), Q::Or(vec![d(1), s(0)])])),
                    Box::new(s(1)),
                ),
            ),
            ("5 dense AND", Q::And(vec![d(0), d(1), d(2), d(3), d(4)])),
            ("2 sparse AND", Q::And(vec![s(0), s(1)])),
            ("3 sparse/dense AND", Q::And(vec![s(0), d(0), d(1)])),
            (
                "small: 2 tags of <= 1,000 members",
                Q::And(vec![Q::Tag(p.tiny[0]), Q::Tag(p.tiny[p.tiny.len() - 1])]),
            ),
        ];
        self.dense_pair = exprs[0].1.clone();
        let mut needed = Vec::new();
        for (_, q) in &exprs {
            q.tags(&mut needed);
        }
        needed.sort_unstable();
        needed.dedup();
        let snap = Arc::new(in_process_snapshot(&data, &needed));
        let server = self.start(&self.dir.clone(), &[])?;
        let changed = tags_changed(&server, &snap).await?;
        if !changed.is_empty() {
            println!(
                "  note: {} of the queried tags no longer hold the generated members (a kept store that earlier writes changed): \
                 the in-process ceilings are for the generated data, and Redis (loaded afresh) holds that data",
                changed.len()
            );
        }
        self.report
            .extra
            .insert("query_tags_changed_since_load".into(), json!(changed));
        let clients = self.cli.query_clients;
        let mut figures = Vec::new();
        for (label, q) in &exprs {
            let text = q.text(&data);
            let op = Op::Count(q.clone());
            let (ours, theirs) = self
                .on_both(&server.addr, &op, clients, self.cli.seed)
                .await?;
            let ceiling = in_process_ms(
                &snap,
                &text,
                Duration::from_secs_f64(self.cli.seconds.min(2.0)),
            )?;
            let full = format!("count {label}, {clients} clients");
            self.rows_for("query", &full, &ours, theirs.as_ref(), 1.0, "");
            self.report.add(
                "query",
                &format!("count {label}: in-process ceiling, 1 thread"),
                "ms",
                Better::Lower,
                Some(ceiling),
                None,
            );
            // The target for 3–5 operands is latency against the one-thread
            // ceiling; with several clients on two cores the p50 also holds
            // the queueing, so one client measures what the server adds.
            let mut operands = Vec::new();
            q.tags(&mut operands);
            // The client and the in-process count take turns, so that the
            // ratio compares the same spells of load from the rest of the host.
            let single = if operands.len() >= 3 && clients != 1 {
                let local = {
                    let (snap, text) = (snap.clone(), text.clone());
                    move || match Query::compile(&text, &snap) {
                        Ok(q) => {
                            let t0 = Instant::now();
                            std::hint::black_box(q.count());
                            t0.elapsed()
                        }
                        // Compiled above already; cannot fail here.
                        Err(_) => Duration::ZERO,
                    }
                };
                let (one, here) = tagstore_alternating(
                    &server.addr,
                    &data,
                    &op,
                    self.cli.seconds,
                    self.cli.seed,
                    local,
                )
                .await?;
                let beside = here.ms(0.5);
                self.report.add(
                    "query",
                    &format!("count {label}: in-process, 1 thread, taking turns with 1 client"),
                    "ms",
                    Better::Lower,
                    Some(beside),
                    None,
                );
                self.report.add(
                    "query",
                    &format!(
                        "count {label}, 1 client: p50 ({:.2}x the in-process count beside it, {:.2}x the ceiling)",
                        one.ms(0.5) / beside,
                        one.ms(0.5) / ceiling
                    ),
                    "ms",
                    Better::Lower,
                    Some(one.ms(0.5)),
                    None,
                );
                Some(json!({ "client": measured_json(&one), "in_process_beside_ms": beside }))
            } else {
                None
            };
            figures.push(json!({
                "label": label, "query": text, "clients": clients, "tagstore": measured_json(&ours),
                "redis": theirs.as_ref().map(measured_json), "in_process_ms": ceiling,
                "tagstore_1_client": single,
            }));
        }
        // One customer's tags: Profile, against GETBIT on every tag key.
        let (ours, theirs) = self
            .on_both(&server.addr, &Op::Profile, clients, self.cli.seed)
            .await?;
        self.rows_for(
            "query",
            &format!("profile (redis: GETBIT x {} tags)", data.tags.len()),
            &ours,
            theirs.as_ref(),
            1.0,
            "",
        );
        figures.push(json!({ "label": "profile", "tagstore": measured_json(&ours), "redis": theirs.as_ref().map(measured_json) }));
        // A page of members: tagstore only (Redis has no way to list a bitmap's members a page at a time).
        let page = Op::Page(exprs[0].1.clone(), 100);
        let ours = tagstore_loop(
            &server.addr,
            &data,
            &page,
            clients,
            self.cli.seconds,
            self.cli.seed,
        )
        .await?;
        self.rows_for(
            "query",
            "members page of 100 (2 dense AND)",
            &ours,
            None,
            1.0,
            "",
        );
        figures.push(json!({ "label": "members page of 100", "tagstore": measured_json(&ours) }));
        self.report.extra.insert("query".into(), json!(figures));
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    async fn mixed(&mut self) -> Result<(), BoxError> {
        let data = self.data.clone();
        let server = self.start(&self.dir.clone(), &[])?;
        let q = Op::Count(self.dense_pair.clone());
        let clients = self.cli.query_clients;
        let secs = self.cli.seconds;
        let quiet = tagstore_loop(&server.addr, &data, &q, clients, secs, 1).await?;
        let nonce = store_lsn(&server).await?;
        let write_seed = self.write_seed(nonce);
        let writer = {
            let (addr, data) = (server.addr.clone(), data.clone());
            tokio::spawn(async move {
                tagstore_loop(
                    &addr,
                    &data,
                    &Op::Update { batch: 1000 },
                    1,
                    secs,
                    write_seed,
                )
                .await
                .map(|m| m.rate() * 1000.0)
            })
        };
        let busy = tagstore_loop(&server.addr, &data, &q, clients, secs, 3).await?;
        let ours_writes = writer.await??;
        let (mut rq, mut rb, mut rw) = (None, None, None);
        if let Some(port) = self.redis_port() {
            rq = Some(redis_loop(port, &data, &q, clients, secs, 1)?);
            let d2 = data.clone();
            let w = std::thread::spawn(move || {
                redis_loop(port, &d2, &Op::Update { batch: 1000 }, 1, secs, write_seed)
                    .map(|m| m.rate() * 1000.0)
                    .map_err(|e| e.to_string())
            });
            rb = Some(redis_loop(port, &data, &q, clients, secs, 3)?);
            rw = Some(w.join().map_err(|_| "redis writer panicked")??);
        }
        self.report.add(
            "mixed",
            "2 dense AND: p99 without writes",
            "ms",
            Better::Lower,
            Some(quiet.ms(0.99)),
            rq.as_ref().map(|m| m.ms(0.99)),
        );
        self.report.add(
            "mixed",
            "2 dense AND: p99 while 1 client writes batches of 1000",
            "ms",
            Better::Lower,
            Some(busy.ms(0.99)),
            rb.as_ref().map(|m| m.ms(0.99)),
        );
        self.report.add(
            "mixed",
            "2 dense AND: queries/s while writing",
            "/s",
            Better::Higher,
            Some(busy.rate()),
            rb.as_ref().map(Measured::rate),
        );
        self.report.add(
            "mixed",
            "memberships/s written meanwhile",
            "/s",
            Better::Higher,
            Some(ours_writes),
            rw,
        );
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    async fn restart(&mut self) -> Result<(), BoxError> {
        let data = self.data.clone();
        let probe = format!(
            "{} AND {}",
            self.dense_pair.text(&data),
            tagstore_proto::names::quote_tag_name(&data.tags[0].name)
        );
        let server = self.start(&self.dir.clone(), &[])?;
        let mut server = server;
        let t0 = Instant::now();
        server.stop()?;
        let stop = t0.elapsed();
        let (server, ours) = self.first_answer(&probe).await?;
        let mut theirs = None;
        let mut redis_stop = None;
        if let (Some(mut r), Some(bin)) = (self.redis.take(), self.redis_bin.clone()) {
            let t0 = Instant::now();
            r.stop(true);
            redis_stop = Some(t0.elapsed().as_secs_f64() * 1e3);
            let t0 = Instant::now();
            let started = RedisServer::start(&bin, &r.dir, "everysec", false)?;
            let mut c = started.conn()?;
            let idx = redis::queue_count(&mut c, &self.dense_pair.redis(), "tmp:probe")?;
            redis::count_from(&c.flush()?, idx)?;
            theirs = Some(t0.elapsed().as_secs_f64() * 1e3);
            self.redis = Some(started);
        }
        self.report.add(
            "restart",
            "graceful stop (tagstore: final checkpoint; redis: SAVE)",
            "ms",
            Better::Lower,
            Some(stop.as_secs_f64() * 1e3),
            redis_stop,
        );
        self.report.add(
            "restart",
            "process start to first answered count",
            "ms",
            Better::Lower,
            Some(ours.as_secs_f64() * 1e3),
            theirs,
        );
        // Recovery: writes after the checkpoint, then kill -9. The writes
        // differ from run to run: on a reused store, the same ones again would
        // change nothing, and such writes are not logged.
        let mut c = server.client().await?;
        let run_seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut rng = StdRng::seed_from_u64(self.cli.seed ^ run_seed);
        for _ in 0..200 {
            let keys: Vec<String> = (0..1000)
                .map(|_| customer_key(rng.random_range(0..data.customers)))
                .collect();
            let tag = data.tags[rng.random_range(1..data.tags.len())].name.clone();
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag,
                    add: keys,
                    remove: vec![],
                    ..Default::default()
                }],
                create_missing_tags: false,
            })
            .await?;
        }
        let wal = c.stats(StatsRequest {}).await?.into_inner().wal_bytes;
        drop(c);
        let mut server = server;
        server.kill();
        let (mut server, crashed) = self.first_answer(&probe).await?;
        self.report.add(
            "restart",
            &format!(
                "after kill -9 with {} KiB of log to replay: start to first answer",
                wal / 1024
            ),
            "ms",
            Better::Lower,
            Some(crashed.as_secs_f64() * 1e3),
            None,
        );
        server.stop()?;
        Ok(())
    }

    /// Time from process start to the first answered count.
    async fn first_answer(&self, probe: &str) -> Result<(ServerProcess, Duration), BoxError> {
        let t0 = Instant::now();
        let server = self.start(&self.dir, &[])?;
        let mut c = server.client().await?;
        c.count(CountRequest {
            queries: vec![probe.to_string()],
        })
        .await?;
        Ok((server, t0.elapsed()))
    }

    async fn sweep(&mut self) -> Result<(), BoxError> {
        let customers = self.cli.sweep_customers.unwrap_or(self.cli.customers);
        let densities = self.cli.sweep_densities.clone();
        let seed = self.cli.seed ^ 0x5eed;
        println!("sweep: count(A AND B) at densities {densities:?} over {customers} customers");
        // Two tags per density, over all customers.
        let mut spec = DataSet {
            customers,
            seed,
            tags: Vec::new(),
        };
        spec.tags.push(data::TagSpec {
            name: "sweep_all".into(),
            density: 1.0,
            range: (0, customers),
        });
        for d in &densities {
            for side in ["a", "b"] {
                spec.tags.push(data::TagSpec {
                    name: format!("sweep_{side}_{d}"),
                    density: *d,
                    range: (0, customers),
                });
            }
        }
        let spec = Arc::new(spec);
        let dir = self
            .cli
            .sweep_data_dir
            .clone()
            .unwrap_or_else(|| self.work.join("sweep-tagstore"));
        let reuse = self.cli.reuse && dir.join("MANIFEST").exists();
        if !reuse {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let server = self.start(&dir, &[])?;
        if !reuse {
            sweep_load(&server, &spec, self.cli.concurrency, self.cli.batch).await?;
        }
        let redis = match &self.redis_bin {
            Some(bin) => {
                let rdir = self.work.join("sweep-redis");
                let _ = std::fs::remove_dir_all(&rdir);
                let r = RedisServer::start(bin, &rdir, "everysec", false)?;
                let mut rc = r.conn()?;
                for t in 1..spec.tags.len() {
                    rc.cmd(&[
                        b"SET",
                        redis_key(t).as_bytes(),
                        &redis::bitmap_bytes(&spec.members(t), customers),
                    ])?;
                }
                Some(r)
            }
            None => None,
        };
        let tag_ids: Vec<usize> = (1..spec.tags.len()).collect();
        let snap = in_process_snapshot(&spec, &tag_ids);
        let mut series_t = Vec::new();
        let mut series_r = Vec::new();
        let mut series_c = Vec::new();
        let mut figures = Vec::new();
        let secs = self.cli.seconds.min(3.0);
        for (i, d) in densities.iter().enumerate() {
            let (a, b) = (1 + 2 * i, 2 + 2 * i);
            let q = Q::And(vec![Q::Tag(a), Q::Tag(b)]);
            let op = Op::Count(q.clone());
            let ours = tagstore_loop(&server.addr, &spec, &op, 1, secs, seed).await?;
            let theirs = match &redis {
                Some(r) => Some(redis_loop(r.port, &spec, &op, 1, secs, seed)?),
                None => None,
            };
            let ceiling = in_process_ms(&snap, &q.text(&spec), Duration::from_secs_f64(secs))?;
            let pct = d * 100.0;
            self.report.add(
                "sweep",
                &format!("count(A AND B) at {pct}%: p50, 1 client"),
                "ms",
                Better::Lower,
                Some(ours.ms(0.5)),
                theirs.as_ref().map(|m| m.ms(0.5)),
            );
            self.report.add(
                "sweep",
                &format!("count(A AND B) at {pct}%: in-process ceiling"),
                "ms",
                Better::Lower,
                Some(ceiling),
                None,
            );
            let flat = roaring::RoaringBitmap::from_sorted_iter(spec.members(a))
                .map_err(|e| e.to_string())?;
            let sharded = ShardedBitmap::from_roaring(&flat);
            let ours_mem = sharded.serialized_size() as f64;
            let theirs_mem = match &redis {
                Some(r) => Some(
                    r.conn()?
                        .cmd(&[b"MEMORY", b"USAGE", redis_key(a).as_bytes()])?
                        .int()? as f64,
                ),
                None => None,
            };
            self.report.add(
                "sweep",
                &format!("memory of one tag at {pct}%"),
                "bytes",
                Better::Lower,
                Some(ours_mem),
                theirs_mem,
            );
            series_t.push((*d, ours.ms(0.5)));
            series_c.push((*d, ceiling));
            if let Some(m) = &theirs {
                series_r.push((*d, m.ms(0.5)));
            }
            figures.push(json!({ "density": d, "tagstore": measured_json(&ours), "redis": theirs.as_ref().map(measured_json), "in_process_ms": ceiling, "tagstore_tag_bytes": ours_mem, "redis_tag_bytes": theirs_mem }));
        }
        self.report.extra.insert(
            "sweep".into(),
            json!({ "customers": customers, "points": figures }),
        );
        let mut series = vec![
            ("tagstore (gRPC)", "#1f77b4", series_t),
            ("in-process ceiling", "#2ca02c", series_c),
        ];
        if !series_r.is_empty() {
            series.push(("redis BITOP+BITCOUNT", "#d62728", series_r));
        }
        let svg = report::log_log_svg(
            &format!("count(A AND B), {customers} customers"),
            ("density of A and of B", report::percent_tick),
            ("p50 latency", report::millis_tick),
            &series,
        );
        std::fs::write(self.cli.out.join("sweep.svg"), svg)?;
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    /// Latency percentiles of the query scenario, as bars.
    fn latency_plot(&self) -> Result<(), BoxError> {
        let Some(serde_json::Value::Array(items)) = self.report.extra.get("query") else {
            return Ok(());
        };
        let mut groups = Vec::new();
        let mut series: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for it in items {
            let label = it["label"].as_str().unwrap_or("?").to_string();
            groups.push(label);
            for (sys, key) in [
                ("tagstore p50", ("tagstore", "p50_ms")),
                ("tagstore p99", ("tagstore", "p99_ms")),
                ("redis p50", ("redis", "p50_ms")),
                ("redis p99", ("redis", "p99_ms")),
            ] {
                series
                    .entry(sys)
                    .or_default()
                    .push(it[key.0][key.1].as_f64().unwrap_or(0.0));
            }
        }
        let colors = [
            ("redis p50", "#f4a6a6"),
            ("redis p99", "#d62728"),
            ("tagstore p50", "#9ecae9"),
            ("tagstore p99", "#1f77b4"),
        ];
        let s: Vec<(&str, &str, Vec<f64>)> = colors
            .iter()
            .map(|(name, color)| (*name, *color, series.get(name).cloned().unwrap_or_default()))
            .collect();
        std::fs::write(
            self.cli.out.join("latency.svg"),
            report::bars_svg("query latency", "ms", &groups, &s),
        )?;
        Ok(())
    }
}

/// Loads the members of `tags` through `Update` requests of `batch` keys from
/// `clients` concurrent connections. Requests are made as they are sent, so
/// memory stays small whatever the data set.
/// Loads the sweep's data set into a fresh tagstore and checkpoints it.
async fn sweep_load(
    server: &ServerProcess,
    spec: &Arc<DataSet>,
    clients: usize,
    batch: usize,
) -> Result<(), BoxError> {
    let mut c = server.client().await?;
    let pb = bar(spec.total_memberships(), "sweep load");
    for tag in &spec.tags {
        c.create_tag(CreateTagRequest {
            name: tag.name.clone(),
            ..Default::default()
        })
        .await?;
    }
    // The tag every customer carries first, in order: it creates the customers.
    load_tags(server, spec, 0..1, 1, batch, &pb).await?;
    load_tags(server, spec, 1..spec.tags.len(), clients, batch, &pb).await?;
    pb.finish_and_clear();
    c.checkpoint(CheckpointRequest::default()).await?;
    Ok(())
}

async fn load_tags(
    server: &ServerProcess,
    data: &Arc<DataSet>,
    tags: std::ops::Range<usize>,
    clients: usize,
    batch: usize,
    pb: &ProgressBar,
) -> Result<(), BoxError> {
    let (tx, rx) = async_channel::bounded::<UpdateRequest>(clients * 4);
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (rx, pb) = (rx.clone(), pb.clone());
        let mut c = server.client().await?;
        workers.push(tokio::spawn(async move {
            while let Ok(req) = rx.recv().await {
                let n = req.mutations[0].add.len() as u64;
                c.update(req).await?;
                pb.inc(n);
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    let d = data.clone();
    let producer = tokio::task::spawn_blocking(move || {
        for t in tags {
            for chunk in d.members(t).chunks(batch) {
                let add = chunk.iter().map(|&id| customer_key(id)).collect();
                let req = UpdateRequest {
                    mutations: vec![Mutation {
                        tag: d.tags[t].name.clone(),
                        add,
                        remove: vec![],
                        ..Default::default()
                    }],
                    create_missing_tags: false,
                };
                if tx.send_blocking(req).is_err() {
                    return;
                }
            }
        }
    });
    producer.await?;
    for w in workers {
        w.await??;
    }
    Ok(())
}

fn measured_json(m: &Measured) -> serde_json::Value {
    json!({ "requests": m.requests, "seconds": m.seconds, "per_s": m.rate(), "p50_ms": m.ms(0.5), "p99_ms": m.ms(0.99), "p999_ms": m.ms(0.999) })
}

fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({ "cores": cores, "memory": mem, "kernel": kernel.trim() })
}

/// The store's lsn: the nonce of [`Bench::write_seed`].
async fn store_lsn(server: &ServerProcess) -> Result<u64, BoxError> {
    let mut c = server.client().await?;
    Ok(c.stats(StatsRequest {}).await?.into_inner().lsn)
}

fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tagstore")))
        .unwrap_or_else(|| PathBuf::from("tagstore"))
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    std::fs::create_dir_all(&cli.out)?;
    let work = tempfile::tempdir()?;
    let dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(|| work.path().join("tagstore"));
    let data = Arc::new(DataSet::realistic(cli.customers, cli.tags.max(6), cli.seed));
    let redis_bin = if cli.no_redis {
        None
    } else {
        RedisServer::find()
    };
    if redis_bin.is_none() && !cli.no_redis {
        println!(
            "redis-server is not installed, so tagstore runs alone (Debian/Ubuntu: apt-get install redis-server)"
        );
    }
    let dense_pair = Q::Tag(1);
    let mut b = Bench {
        bin: cli.server_bin.clone().unwrap_or_else(default_server_bin),
        dir,
        work: work.path().to_path_buf(),
        data,
        redis_bin,
        redis: None,
        report: Report::default(),
        dense_pair,
        write_seeds: 0,
        cli,
    };
    let redis_version = b
        .redis_bin
        .as_ref()
        .and_then(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    b.report.extra.insert("machine".into(), machine());
    b.report
        .extra
        .insert("tagstore_version".into(), json!(env!("CARGO_PKG_VERSION")));
    b.report
        .extra
        .insert("redis_version".into(), json!(redis_version));
    b.report.extra.insert("data_set".into(), json!({ "customers": b.data.customers, "tags": b.data.tags.len(), "seed": b.data.seed, "memberships": b.data.total_memberships() }));
    println!(
        "tagstore-bench: server {}, redis {}",
        b.bin.display(),
        redis_version.as_deref().unwrap_or("none")
    );
    println!("{}", Report::header());
    let s = b.cli.scenario;
    let wants = |x: Scenario| s == x || s == Scenario::All;
    if s != Scenario::Sweep {
        b.load(wants(Scenario::Load)).await?;
    }
    // Queries first: the update scenario changes the tags (and writes more
    // to tagstore than to Redis), and the in-process ceiling is computed on
    // the generated data.
    if wants(Scenario::Query) || wants(Scenario::Mixed) {
        b.query().await?;
    }
    if wants(Scenario::Update) {
        b.update().await?;
    }
    if wants(Scenario::Mixed) {
        b.mixed().await?;
    }
    if wants(Scenario::Restart) {
        b.restart().await?;
    }
    if wants(Scenario::Sweep) {
        b.sweep().await?;
    }
    b.latency_plot()?;
    let path = b.cli.out.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&b.report.json())?)?;
    println!(
        "\n{}\n\nfigures in {}, plots in {}",
        b.report.table(),
        path.display(),
        b.cli.out.display()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tagstore-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tagstore-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
