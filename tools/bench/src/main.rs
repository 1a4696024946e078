//! `tagstore-bench`: the capacity harness. It starts a real `tagstore`
//! server and, when `redis-server` is installed, a Redis of its own, loads
//! the same seeded data into both, and times the same work on each: tagstore
//! through its gRPC proto, Redis with the commands a Redis user would write.
//! Every row of the report has both figures and their ratio.
//!
//! Scenarios: `load`, `update`, `query`, `mixed`, `restart`, `sweep`, and
//! `all` (every one, in that order), one file each under `scenarios/`. This
//! file holds the command line, the run ([`Bench`]: settings, data set,
//! report) and the helpers the scenarios share. `sync_floor.rs` is the bare
//! server the `update` scenario starts (the hidden `sync-floor` command) to
//! measure what a durable write costs with no engine behind it.

mod data;
mod ops;
mod redis;
mod report;
mod scenarios;
mod sync_floor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use data::{DataSet, customer_key};
use indicatif::{ProgressBar, ProgressStyle};
use ops::{
    BoxError, Local, Measured, Op, Q, redis_key, redis_loop, tagstore_alternating, tagstore_loop,
};
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
    /// A flag for every server the harness starts, as `serve` takes it
    /// (repeat for more: `--server-arg=--sync --server-arg=never`, or
    /// `--server-arg=--tokens=t.toml` with the token in TAGSTORE_TOKEN, or
    /// `--server-arg=--tls-cert=s.pem --server-arg=--tls-key=s.key` with the
    /// CA to trust in TAGSTORE_CACERT and the server's name in
    /// TAGSTORE_SERVERNAME, default localhost).
    #[arg(long, global = true, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Where the JSON report and the SVG plots go.
    /// The niceness of the `watch` scenario's watchers (they stand for
    /// services on other machines: 19 keeps their decoding off the
    /// writers' CPU here; 0 shares it equally).
    #[arg(long, global = true, default_value_t = 19)]
    watchers_nice: i32,
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
    /// Channel records through the Ingest stream, against the same facts by SetValues.
    Ingest,
    /// Writes with 50 rules against none, and the turn of the day (in-process).
    Rules,
    /// Records from a Kafka topic (a Kafka source) against Ingest, and produce-to-count latency (needs tansu).
    Kafka,
    /// Writes with 100 change-feed watchers against none, the feed's lag, and the feed off against on.
    Watch,
    /// Online backups (full and increment) and `tagstore restore`, and writes with backups running against none.
    Backup,
    /// Reads as of the past: the history's disk, the first read of a moment (version and log replay) and again.
    History,
    /// Audience snapshots: a 50% audience's snapshot taken (time, disk), again unchanged, after updates; the diff of two.
    Snapshots,
    /// Every scenario.
    All,
    /// The `update` scenario's floor server (run by the harness itself, on
    /// --data-dir's file system): an `Update` that only appends to a file
    /// and syncs it.
    #[command(hide = true)]
    SyncFloor,
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

/// One run of the harness: what every scenario reads and reports into.
struct Bench {
    cli: Cli,
    bin: PathBuf,
    /// Flags for every server started (`--server-arg`).
    server_args: Vec<String>,
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
        let args: Vec<&str> = extra
            .iter()
            .copied()
            .chain(self.server_args.iter().map(String::as_str))
            .collect();
        Ok(ServerProcess::start(
            &self.bin,
            dir,
            &args,
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
        server_args: cli.server_arg.clone(),
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
    if s != Scenario::Sweep && s != Scenario::Ingest && s != Scenario::Rules && s != Scenario::Kafka
    {
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
    if wants(Scenario::Ingest) {
        b.ingest().await?;
    }
    if wants(Scenario::Kafka) {
        b.kafka().await?;
    }
    if wants(Scenario::Rules) {
        b.rules().await?;
    }
    if wants(Scenario::Watch) {
        b.watch_feed().await?;
    }
    if wants(Scenario::Backup) {
        b.backup().await?;
    }
    if wants(Scenario::History) {
        b.history().await?;
    }
    if wants(Scenario::Snapshots) {
        b.snapshots().await?;
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
    if cli.scenario == Scenario::SyncFloor {
        let dir = cli.data_dir.unwrap_or_else(|| PathBuf::from("."));
        return match sync_floor::serve(&dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tagstore-bench sync-floor: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
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
