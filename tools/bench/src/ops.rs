//! The operations the scenarios time, each as tagstore does it (over gRPC)
//! and as a Redis user would do it, and the closed-loop driver that runs one
//! of them from many clients for a while and records latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tagstore_proto::names::quote_tag_name;
use tagstore_proto::*;
use tagstore_test_support::Client;

use crate::data::{DataSet, customer_key};
use crate::redis::{self, Conn, Expr};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A boolean expression over tags of the data set (by index).
#[derive(Debug, Clone)]
pub enum Q {
    Tag(usize),
    And(Vec<Q>),
    Or(Vec<Q>),
    AndNot(Box<Q>, Box<Q>),
}

impl Q {
    /// The query language text.
    pub fn text(&self, data: &DataSet) -> String {
        match self {
            Q::Tag(t) => quote_tag_name(&data.tags[*t].name),
            Q::And(items) => items
                .iter()
                .map(|i| i.paren(data))
                .collect::<Vec<_>>()
                .join(" AND "),
            Q::Or(items) => items
                .iter()
                .map(|i| i.paren(data))
                .collect::<Vec<_>>()
                .join(" OR "),
            Q::AndNot(a, b) => format!("{} AND NOT {}", a.paren(data), b.paren(data)),
        }
    }

    fn paren(&self, data: &DataSet) -> String {
        match self {
            Q::Tag(_) => self.text(data),
            _ => format!("({})", self.text(data)),
        }
    }

    /// The Redis form, over keys `t:<index>`.
    pub fn redis(&self) -> Expr {
        match self {
            Q::Tag(t) => Expr::Tag(redis_key(*t)),
            Q::And(items) => Expr::And(items.iter().map(Q::redis).collect()),
            Q::Or(items) => Expr::Or(items.iter().map(Q::redis).collect()),
            Q::AndNot(a, b) => Expr::AndNot(Box::new(a.redis()), Box::new(b.redis())),
        }
    }

    pub fn tags(&self, out: &mut Vec<usize>) {
        match self {
            Q::Tag(t) => out.push(*t),
            Q::And(items) | Q::Or(items) => items.iter().for_each(|i| i.tags(out)),
            Q::AndNot(a, b) => {
                a.tags(out);
                b.tags(out);
            }
        }
    }
}

pub fn redis_key(t: usize) -> String {
    format!("t:{t}")
}

/// One timed operation.
#[derive(Debug, Clone)]
pub enum Op {
    Count(Q),
    /// The lightest call each system has, for the cost of one round trip:
    /// tagstore counts `Q` (the two tiniest tags, answered on the network
    /// thread), Redis answers `PING`.
    Lightest(Q),
    /// A first page of members.
    Page(Q, u32),
    /// One random customer's tags.
    Profile,
    /// Random adds or removes of `batch` memberships on one random tag.
    Update {
        batch: usize,
    },
    /// [`Op::Update`] with customers named by internal id (`ids[i]` is the
    /// id of customer `i`, from `ResolveCustomers`): the same work Redis is
    /// given, which takes the bit offset directly. Redis runs it as `Update`.
    UpdateByIds {
        batch: usize,
        ids: Arc<Vec<u32>>,
    },
    /// One random customer, by internal id, added to [`FRESH_TAG`] (Redis:
    /// `SETBIT` to 1 in [`FRESH_KEY`]). The tag starts empty, so nearly
    /// every write changes something and must reach the disk: neither
    /// system can answer it without logging and syncing. Random adds and
    /// removes on loaded tags leave half the memberships as they were, and
    /// both systems skip those.
    AddNew {
        ids: Arc<Vec<u32>>,
    },
}

/// The tag [`Op::AddNew`] fills; the harness drops and recreates it first.
pub const FRESH_TAG: &str = "bench_fresh";
/// The Redis key [`Op::AddNew`] fills; deleted first.
pub const FRESH_KEY: &str = "bench_fresh";

/// Latencies and throughput of one closed-loop run.
pub struct Measured {
    pub requests: u64,
    pub seconds: f64,
    pub hist: Histogram<u64>,
}

impl Measured {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    /// A latency quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e3
    }
}

fn pick_tag(rng: &mut StdRng, data: &DataSet) -> usize {
    rng.random_range(1..data.tags.len())
}

async fn tagstore_op(
    c: &mut Client,
    op: &Op,
    rng: &mut StdRng,
    data: &DataSet,
    text: &str,
) -> Result<(), tonic::Status> {
    match op {
        Op::Count(_) | Op::Lightest(_) => {
            c.count(CountRequest {
                queries: vec![text.to_string()],
                as_of: None,
            })
            .await?;
        }
        Op::Page(_, limit) => {
            c.members(MembersRequest {
                query: text.to_string(),
                limit: *limit,
                cursor: String::new(),
                ..Default::default()
            })
            .await?;
        }
        Op::Profile => {
            let customer = customer_key(rng.random_range(0..data.customers));
            c.profile(ProfileRequest {
                customer,
                recent_days: 0,
            })
            .await?;
        }
        Op::Update { batch } => {
            let tag = data.tags[pick_tag(rng, data)].name.clone();
            let keys: Vec<String> = (0..*batch)
                .map(|_| customer_key(rng.random_range(0..data.customers)))
                .collect();
            let (add, remove) = if rng.random_bool(0.5) {
                (keys, vec![])
            } else {
                (vec![], keys)
            };
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag,
                    add,
                    remove,
                    ..Default::default()
                }],
                create_missing_tags: false,
            })
            .await?;
        }
        Op::UpdateByIds { batch, ids } => {
            let tag = data.tags[pick_tag(rng, data)].name.clone();
            let picked: Vec<u32> = (0..*batch)
                .map(|_| ids[rng.random_range(0..data.customers) as usize])
                .collect();
            let (add_ids, remove_ids) = if rng.random_bool(0.5) {
                (picked, vec![])
            } else {
                (vec![], picked)
            };
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag,
                    add_ids,
                    remove_ids,
                    ..Default::default()
                }],
                create_missing_tags: false,
            })
            .await?;
        }
        Op::AddNew { ids } => {
            let id = ids[rng.random_range(0..data.customers) as usize];
            c.update(UpdateRequest {
                mutations: vec![Mutation {
                    tag: FRESH_TAG.into(),
                    add_ids: vec![id],
                    ..Default::default()
                }],
                create_missing_tags: false,
            })
            .await?;
        }
    }
    Ok(())
}

fn redis_op(
    c: &mut Conn,
    op: &Op,
    rng: &mut StdRng,
    data: &DataSet,
    tmp: &str,
) -> redis::Result<()> {
    match op {
        Op::Count(q) => {
            let idx = redis::queue_count(c, &q.redis(), tmp)?;
            let replies = c.flush()?;
            redis::count_from(&replies, idx)?;
        }
        Op::Lightest(_) => {
            c.cmd(&[b"PING"])?;
        }
        Op::Page(..) => return Err("redis has no member pages".into()),
        Op::Profile => {
            // GETBIT on every tag, pipelined: what a Redis user would do.
            let id = rng.random_range(0..data.customers).to_string();
            for t in 0..data.tags.len() {
                c.send(&[b"GETBIT", redis_key(t).as_bytes(), id.as_bytes()])?;
            }
            c.flush()?;
        }
        Op::AddNew { .. } => {
            let id = rng.random_range(0..data.customers).to_string();
            c.cmd(&[b"SETBIT", FRESH_KEY.as_bytes(), id.as_bytes(), b"1"])?;
        }
        Op::Update { batch } | Op::UpdateByIds { batch, .. } => {
            let key = redis_key(pick_tag(rng, data));
            let bit: &[u8] = if rng.random_bool(0.5) { b"1" } else { b"0" };
            if *batch == 1 {
                let id = rng.random_range(0..data.customers).to_string();
                c.cmd(&[b"SETBIT", key.as_bytes(), id.as_bytes(), bit])?;
            } else {
                c.send(&[b"MULTI"])?;
                for _ in 0..*batch {
                    let id = rng.random_range(0..data.customers).to_string();
                    c.send(&[b"SETBIT", key.as_bytes(), id.as_bytes(), bit])?;
                }
                c.send(&[b"EXEC"])?;
                for r in c.flush()? {
                    if let redis::Reply::Error(e) = r {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs `op` on tagstore from `clients` connections for `secs` seconds.
pub async fn tagstore_loop(
    addr: &str,
    data: &Arc<DataSet>,
    op: &Op,
    clients: usize,
    secs: f64,
    seed: u64,
) -> Result<Measured, BoxError> {
    let text = match op {
        Op::Count(q) | Op::Lightest(q) | Op::Page(q, _) => q.text(data),
        _ => String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    // One OS thread per client (`client_thread`).
    let mut threads = Vec::new();
    for w in 0..clients {
        let endpoint = format!("http://{addr}");
        let (data, op, text) = (data.clone(), op.clone(), text.clone());
        threads.push(client_thread(endpoint, move |mut c| async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64 * 7919));
            let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                tagstore_op(&mut c, &op, &mut rng, &data, &text)
                    .await
                    .map_err(|e| e.to_string())?;
                hist.record(t0.elapsed().as_micros().max(1) as u64).ok();
            }
            Ok(hist)
        }));
    }
    let hists = tokio::task::spawn_blocking(move || {
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a tagstore client thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })
    .await??;
    let mut hist = Histogram::<u64>::new(3)?;
    for h in hists {
        hist.add(&h)?;
    }
    Ok(Measured {
        requests: hist.len(),
        seconds: started.elapsed().as_secs_f64(),
        hist,
    })
}

/// The same work done in this process, timed: returns how long it took.
pub type Local = Box<dyn FnMut() -> Duration + Send>;

/// Runs `op` from one client for `secs` seconds, taking turns with each of
/// `locals` (the same work done in this process, in different ways) in
/// blocks of [`ALTERNATION`]; returns the client's latencies and each
/// local's, in order. A ratio between them then compares moments of the
/// same load on this shared machine, rather than one block of seconds
/// against another.
pub async fn tagstore_alternating(
    addr: &str,
    data: &Arc<DataSet>,
    op: &Op,
    secs: f64,
    seed: u64,
    mut locals: Vec<Local>,
) -> Result<(Measured, Vec<Measured>), BoxError> {
    let text = match op {
        Op::Count(q) | Op::Lightest(q) | Op::Page(q, _) => q.text(data),
        _ => String::new(),
    };
    let endpoint = format!("http://{addr}");
    let (data, op) = (data.clone(), op.clone());
    let thread = client_thread(endpoint, move |mut c| async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let sides = 1 + locals.len();
        let mut hists = (0..sides)
            .map(|_| Histogram::<u64>::new(3).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut spent = vec![Duration::ZERO; sides];
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < deadline {
            for (side, hist) in hists.iter_mut().enumerate() {
                let block = Instant::now();
                while block.elapsed() < ALTERNATION {
                    let took = if side == 0 {
                        let t0 = Instant::now();
                        tagstore_op(&mut c, &op, &mut rng, &data, &text)
                            .await
                            .map_err(|e| e.to_string())?;
                        t0.elapsed()
                    } else {
                        (locals[side - 1])()
                    };
                    hist.record(took.as_micros().max(1) as u64).ok();
                }
                spent[side] += block.elapsed();
            }
        }
        Ok(hists
            .into_iter()
            .zip(spent)
            .map(|(hist, spent)| Measured {
                requests: hist.len(),
                seconds: spent.as_secs_f64(),
                hist,
            })
            .collect::<Vec<_>>())
    });
    let mut all = tokio::task::spawn_blocking(move || {
        thread
            .join()
            .map_err(|_| "the alternating client thread panicked".to_string())?
    })
    .await??;
    let ours = all.remove(0);
    Ok((ours, all))
}

/// How long each side of [`tagstore_alternating`] runs before the other
/// takes its turn: long enough that each side works on warm caches, short
/// enough that both see the same spells of load from the rest of the host.
const ALTERNATION: Duration = Duration::from_millis(100);

/// Starts an OS thread with its own single-threaded runtime, connects one
/// client there, and runs `work` with it. Each client is a plain thread, as
/// each Redis client is: the connection's I/O and the caller share one
/// thread, with no cross-thread wake-up per call (a multi-threaded client
/// runtime added ~90 µs to every call here).
fn client_thread<T, F, Fut>(endpoint: String, work: F) -> std::thread::JoinHandle<Result<T, String>>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let c = TagStoreClientExt::connect(endpoint)
                .await
                .map_err(|e| e.to_string())?;
            work(c).await
        })
    })
}

/// Runs `op` on Redis from `clients` connections (threads) for `secs` seconds.
pub fn redis_loop(
    port: u16,
    data: &Arc<DataSet>,
    op: &Op,
    clients: usize,
    secs: f64,
    seed: u64,
) -> Result<Measured, BoxError> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let mut threads = Vec::new();
    for w in 0..clients {
        let (data, op) = (data.clone(), op.clone());
        threads.push(std::thread::spawn(
            move || -> Result<Histogram<u64>, String> {
                let mut c = Conn::connect(port)?;
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64 * 7919));
                let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
                let tmp = format!("tmp:{w}");
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    redis_op(&mut c, &op, &mut rng, &data, &tmp)?;
                    hist.record(t0.elapsed().as_micros().max(1) as u64).ok();
                }
                Ok(hist)
            },
        ));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in threads {
        let h = t.join().map_err(|_| "a redis client thread panicked")??;
        hist.add(&h)?;
    }
    Ok(Measured {
        requests: hist.len(),
        seconds: started.elapsed().as_secs_f64(),
        hist,
    })
}

/// The internal id of every customer of the data set, in order, from
/// `ResolveCustomers` (the data set must be loaded).
pub async fn resolve_ids(addr: &str, data: &DataSet) -> Result<Vec<u32>, BoxError> {
    const CHUNK: u32 = 10_000;
    let mut c = TagStoreClientExt::connect(format!("http://{addr}")).await?;
    let mut ids = Vec::with_capacity(data.customers as usize);
    for first in (0..data.customers).step_by(CHUNK as usize) {
        let customers = (first..data.customers.min(first + CHUNK))
            .map(customer_key)
            .collect();
        let r = c
            .resolve_customers(ResolveCustomersRequest {
                customers,
                create_missing: false,
            })
            .await?
            .into_inner();
        for (i, id) in r.ids.into_iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| {
                format!(
                    "customer {} is not in the store: load the data set first",
                    customer_key(first + i as u32)
                )
            })?;
            ids.push(id);
        }
    }
    Ok(ids)
}

/// A connected client with large message limits.
pub struct TagStoreClientExt;

impl TagStoreClientExt {
    /// Connects to `endpoint` (`http://host:port`), over TLS when
    /// `TAGSTORE_CACERT` names the CA to trust (the server's name in
    /// `TAGSTORE_SERVERNAME`, default `localhost`), as the test support's
    /// client does.
    pub async fn connect(endpoint: String) -> Result<Client, BoxError> {
        let channel = match std::env::var_os("TAGSTORE_CACERT") {
            None => tonic::transport::Endpoint::from_shared(endpoint)?,
            Some(path) => {
                let pem = std::fs::read(&path).map_err(|e| {
                    format!(
                        "TAGSTORE_CACERT {}: {e}",
                        std::path::Path::new(&path).display()
                    )
                })?;
                let name =
                    std::env::var("TAGSTORE_SERVERNAME").unwrap_or_else(|_| "localhost".into());
                let https = endpoint.replacen("http://", "https://", 1);
                tonic::transport::Endpoint::from_shared(https)?.tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                        .domain_name(name),
                )?
            }
        }
        .connect()
        .await?;
        // The harness runs its own server on loopback; a token in
        // TAGSTORE_TOKEN is sent all the same.
        let bearer = tagstore_proto::auth::Bearer::from_flag_or_env(None)?;
        Ok(tagstore_proto::auth::client(channel, bearer)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }
}
