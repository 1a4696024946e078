//! `tagstore-bench`: the capacity harness. Starts a real `tagstore` server
//! on a temporary (or given) data directory, loads a seeded data set through
//! gRPC, and measures. It talks to the server only through the proto.
//!
//! Scenarios: `load` (bulk load), `update` (durable batched updates at several
//! concurrencies), `restart` (graceful stop, start to first answer, and
//! recovery after kill -9), `all` (every one, in that order).

mod data;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use data::{DataSet, customer_key};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tagstore::harness::ServerProcess;
use tagstore::proto::*;

#[derive(Parser)]
#[command(
    name = "tagstore-bench",
    version,
    about = "Capacity harness for tagstore"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Customers in the data set.
    #[arg(long, global = true, default_value_t = 1_000_000)]
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
    /// Memberships per request in the update scenario (comma-separated).
    #[arg(long, global = true, value_delimiter = ',', default_values_t = vec![10_000usize])]
    update_batches: Vec<usize>,
    /// Concurrent clients in the update scenario (comma-separated).
    #[arg(long, global = true, value_delimiter = ',', default_values_t = vec![1usize, 8])]
    update_clients: Vec<usize>,
    /// Seconds each update configuration runs.
    #[arg(long, global = true, default_value_t = 10)]
    seconds: u64,
    /// Keep the data here (default: a temporary directory, removed at the end).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Skip the load when the data directory already holds a store.
    #[arg(long, global = true)]
    reuse: bool,
    /// The server binary (default: `tagstore` beside this one).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// Write every figure here as JSON.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    /// Bulk load through gRPC.
    Load,
    /// Load, then durable batched updates.
    Update,
    /// Load, then stop/start and kill -9/recover timings.
    Restart,
    /// Every scenario.
    All,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Bench {
    cli: Cli,
    bin: PathBuf,
    dir: PathBuf,
    data: DataSet,
    report: serde_json::Map<String, Value>,
    rows: Vec<(String, String)>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {percent:>3}% {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn fmt_rate(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} M/s", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} k/s", n / 1e3)
    } else {
        format!("{n:.1} /s")
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

impl Bench {
    fn row(&mut self, k: &str, v: String) {
        println!("  {k:<48} {v}");
        self.rows.push((k.into(), v));
    }

    fn start(&self, extra: &[&str]) -> Result<ServerProcess, BoxError> {
        Ok(ServerProcess::start(
            &self.bin,
            &self.dir,
            extra,
            Duration::from_secs(600),
        )?)
    }

    async fn load(&mut self) -> Result<(), BoxError> {
        println!(
            "load: {} customers, {} tags, ~{} memberships",
            self.data.customers,
            self.data.tags.len(),
            self.data.total_memberships()
        );
        let server = self.start(&[])?;
        let mut c = server.client().await?;
        for t in &self.data.tags {
            c.create_tag(CreateTagRequest {
                name: t.name.clone(),
                if_not_exists: true,
                ..Default::default()
            })
            .await?;
        }
        // Phase 1: the tag every customer carries, in id order, creates the customers.
        let started = Instant::now();
        let pb = bar(self.data.customers as u64, "customers");
        let members = self.data.members(0);
        for chunk in members.chunks(self.cli.batch) {
            let add = chunk.iter().map(|&id| customer_key(id)).collect();
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag: self.data.tags[0].name.clone(),
                    add,
                    remove: vec![],
                }],
                create_missing_tags: false,
            })
            .await?;
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        let phase1 = started.elapsed();
        let customers_per_s = self.data.customers as f64 / phase1.as_secs_f64();

        // Phase 2: every other tag, from concurrent clients.
        let started = Instant::now();
        let (tx, rx) = async_channel::bounded::<UpdateRequest>(self.cli.concurrency * 4);
        let total: u64 = (1..self.data.tags.len())
            .map(|t| self.data.tags[t].expected_members())
            .sum();
        let pb = bar(total, "memberships");
        let mut workers = Vec::new();
        for _ in 0..self.cli.concurrency {
            let rx = rx.clone();
            let mut c = server.client().await?;
            let pb = pb.clone();
            workers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while let Ok(req) = rx.recv().await {
                    let k = req.mutations[0].add.len() as u64;
                    c.update(req).await?;
                    pb.inc(k);
                    n += k;
                }
                Ok::<u64, tonic::Status>(n)
            }));
        }
        let data = self.data.clone();
        let batch = self.cli.batch;
        let producer = tokio::task::spawn_blocking(move || {
            for t in 1..data.tags.len() {
                for chunk in data.members(t).chunks(batch) {
                    let add = chunk.iter().map(|&id| customer_key(id)).collect();
                    let req = UpdateRequest {
                        mutations: vec![Mutation {
                            tag: data.tags[t].name.clone(),
                            add,
                            remove: vec![],
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
        let mut assigned = 0;
        for w in workers {
            assigned += w.await??;
        }
        pb.finish_and_clear();
        let phase2 = started.elapsed();
        let started = Instant::now();
        let cp = c.checkpoint(CheckpointRequest {}).await?.into_inner();
        let checkpoint = started.elapsed();
        let st = c.stats(StatsRequest {}).await?.into_inner();
        let rss = server.rss_bytes().unwrap_or(0);

        self.row(
            "load: customers created",
            format!(
                "{} in {:.1} s ({})",
                st.customers,
                phase1.as_secs_f64(),
                fmt_rate(customers_per_s)
            ),
        );
        let per_s = assigned as f64 / phase2.as_secs_f64();
        self.row(
            &format!(
                "load: tag assignments (batch {}, {} clients)",
                self.cli.batch, self.cli.concurrency
            ),
            format!(
                "{assigned} in {:.1} s ({})",
                phase2.as_secs_f64(),
                fmt_rate(per_s)
            ),
        );
        self.row(
            "load: final checkpoint",
            format!("{} ms, {}", checkpoint.as_millis(), mib(cp.segment_bytes)),
        );
        self.row("load: disk", mib(st.disk_bytes));
        self.row("load: server RSS", mib(rss));
        self.report.insert(
            "load".into(),
            json!({
                "customers": st.customers, "customers_seconds": phase1.as_secs_f64(), "customers_per_s": customers_per_s,
                "assignments": assigned, "assignments_seconds": phase2.as_secs_f64(), "assignments_per_s": per_s,
                "batch": self.cli.batch, "clients": self.cli.concurrency,
                "checkpoint_ms": checkpoint.as_millis() as u64, "segment_bytes": cp.segment_bytes,
                "disk_bytes": st.disk_bytes, "rss_bytes": rss,
            }),
        );
        drop(c);
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    async fn update(&mut self) -> Result<(), BoxError> {
        let server = self.start(&[])?;
        let tags: Vec<String> = self
            .data
            .tags
            .iter()
            .skip(1)
            .map(|t| t.name.clone())
            .collect();
        let mut results = Vec::new();
        for &batch in &self.cli.update_batches.clone() {
            for &clients in &self.cli.update_clients.clone() {
                let deadline = Instant::now() + Duration::from_secs(self.cli.seconds);
                let mut tasks = Vec::new();
                for w in 0..clients {
                    let mut c = server.client().await?;
                    let tags = tags.clone();
                    let customers = self.data.customers;
                    let seed = self.cli.seed ^ (w as u64 + 1) ^ ((batch as u64) << 20);
                    tasks.push(tokio::spawn(async move {
                        let mut rng = StdRng::seed_from_u64(seed);
                        let mut hist = Histogram::<u64>::new(3).expect("histogram");
                        let mut memberships = 0u64;
                        while Instant::now() < deadline {
                            let tag = tags[rng.random_range(0..tags.len())].clone();
                            let keys: Vec<String> = (0..batch)
                                .map(|_| customer_key(rng.random_range(0..customers)))
                                .collect();
                            let (add, remove) = if rng.random_bool(0.5) {
                                (keys, vec![])
                            } else {
                                (vec![], keys)
                            };
                            let req = UpdateRequest {
                                mutations: vec![Mutation { tag, add, remove }],
                                create_missing_tags: false,
                            };
                            let t0 = Instant::now();
                            c.update(req).await?;
                            hist.record(t0.elapsed().as_micros() as u64).ok();
                            memberships += batch as u64;
                        }
                        Ok::<_, tonic::Status>((hist, memberships))
                    }));
                }
                let started = Instant::now();
                let mut hist = Histogram::<u64>::new(3)?;
                let mut memberships = 0;
                for t in tasks {
                    let (h, m) = t.await??;
                    hist.add(&h)?;
                    memberships += m;
                }
                let secs = started.elapsed().as_secs_f64();
                let reqs = hist.len();
                let line = format!(
                    "{} ({} req/s); p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms",
                    fmt_rate(memberships as f64 / secs),
                    (reqs as f64 / secs).round(),
                    hist.value_at_quantile(0.5) as f64 / 1e3,
                    hist.value_at_quantile(0.99) as f64 / 1e3,
                    hist.value_at_quantile(0.999) as f64 / 1e3
                );
                self.row(
                    &format!("update: batch {batch}, {clients} clients, durable"),
                    line,
                );
                results.push(json!({
                    "batch": batch, "clients": clients, "seconds": secs, "requests": reqs,
                    "memberships_per_s": memberships as f64 / secs, "requests_per_s": reqs as f64 / secs,
                    "p50_us": hist.value_at_quantile(0.5), "p99_us": hist.value_at_quantile(0.99), "p999_us": hist.value_at_quantile(0.999),
                }));
            }
        }
        self.report.insert("update".into(), Value::Array(results));
        let mut server = server;
        server.stop()?;
        Ok(())
    }

    /// Time from spawning the server to the first answered count.
    async fn first_answer(&self) -> Result<(ServerProcess, Duration, Duration, u64), BoxError> {
        let t0 = Instant::now();
        let server = self.start(&[])?;
        let listening = t0.elapsed();
        let mut c = server.client().await?;
        let q = format!(
            "{} AND NOT {}",
            tagstore::names::quote_tag_name(&self.data.tags[0].name),
            tagstore::names::quote_tag_name(&self.data.tags[1.min(self.data.tags.len() - 1)].name)
        );
        let n = c
            .count(CountRequest { queries: vec![q] })
            .await?
            .into_inner()
            .counts[0];
        Ok((server, listening, t0.elapsed(), n))
    }

    async fn restart(&mut self) -> Result<(), BoxError> {
        // Clean stop and start.
        let server = self.start(&[])?;
        let mut c = server.client().await?;
        let before = c
            .count(CountRequest {
                queries: vec!["ALL".into()],
            })
            .await?
            .into_inner()
            .counts[0];
        drop(c);
        let mut server = server;
        let t0 = Instant::now();
        server.stop()?;
        let stop = t0.elapsed();
        let (server, listening, answer, _) = self.first_answer().await?;
        let rss = server.rss_bytes().unwrap_or(0);
        self.row(
            "restart: graceful stop (final checkpoint)",
            format!("{} ms", stop.as_millis()),
        );
        self.row(
            "restart: start to listening",
            format!("{} ms", listening.as_millis()),
        );
        self.row(
            "restart: start to first answered count",
            format!("{} ms (RSS then {})", answer.as_millis(), mib(rss)),
        );

        // Writes after the checkpoint, then kill -9: start-up replays the log.
        let mut c = server.client().await?;
        let mut rng = StdRng::seed_from_u64(self.cli.seed);
        let tags: Vec<String> = self
            .data
            .tags
            .iter()
            .skip(1)
            .map(|t| t.name.clone())
            .collect();
        let mut logged = 0u64;
        for _ in 0..200 {
            let keys: Vec<String> = (0..1000)
                .map(|_| customer_key(rng.random_range(0..self.data.customers)))
                .collect();
            let tag = tags[rng.random_range(0..tags.len())].clone();
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag,
                    add: keys,
                    remove: vec![],
                }],
                create_missing_tags: false,
            })
            .await?;
            logged += 1000;
        }
        let wal = c.stats(StatsRequest {}).await?.into_inner().wal_bytes;
        drop(c);
        let mut server = server;
        server.kill();
        let (server, listening2, answer2, _) = self.first_answer().await?;
        let mut c = server.client().await?;
        let after = c
            .count(CountRequest {
                queries: vec!["ALL".into()],
            })
            .await?
            .into_inner()
            .counts[0];
        if after != before {
            return Err(format!("customers changed across restarts: {before} then {after}").into());
        }
        self.row(
            &format!(
                "restart: after kill -9 ({logged} memberships, {} of log)",
                mib(wal)
            ),
            format!(
                "listening {} ms, first answer {} ms",
                listening2.as_millis(),
                answer2.as_millis()
            ),
        );
        self.report.insert(
            "restart".into(),
            json!({
                "stop_ms": stop.as_millis() as u64, "listening_ms": listening.as_millis() as u64,
                "first_answer_ms": answer.as_millis() as u64, "rss_after_first_answer": rss,
                "crash_wal_bytes": wal, "crash_listening_ms": listening2.as_millis() as u64,
                "crash_first_answer_ms": answer2.as_millis() as u64,
            }),
        );
        drop(c);
        let mut server = server;
        server.stop()?;
        Ok(())
    }
}

fn machine() -> Value {
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

fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tagstore")))
        .unwrap_or_else(|| PathBuf::from("tagstore"))
}

fn has_store(dir: &Path) -> bool {
    dir.join("MANIFEST").exists()
}

async fn run(cli: Cli) -> Result<(), BoxError> {
    let temp = match &cli.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir()?),
    };
    let dir = cli.data_dir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    let data = DataSet::realistic(cli.customers, cli.tags.max(2), cli.seed);
    let bin = cli.server_bin.clone().unwrap_or_else(default_server_bin);
    let mut b = Bench {
        bin,
        dir,
        data,
        report: Default::default(),
        rows: Vec::new(),
        cli,
    };
    b.report.insert("machine".into(), machine());
    b.report
        .insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    b.report.insert(
        "data_set".into(),
        json!({ "customers": b.data.customers, "tags": b.data.tags.len(), "seed": b.data.seed, "memberships": b.data.total_memberships() }),
    );
    println!(
        "tagstore-bench: server {}, data in {}",
        b.bin.display(),
        b.dir.display()
    );
    let scenario = b.cli.scenario;
    if !(b.cli.reuse && has_store(&b.dir)) {
        b.load().await?;
    }
    if matches!(scenario, Scenario::Update | Scenario::All) {
        b.update().await?;
    }
    if matches!(scenario, Scenario::Restart | Scenario::All) {
        b.restart().await?;
    }
    if let Some(path) = &b.cli.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&Value::Object(b.report.clone()))?,
        )?;
        println!("figures written to {}", path.display());
    }
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
