//! Single durable writes pipelined: one membership change per request, 64
//! requests in flight per client. tagstore takes them as batches of one
//! change on an `Ingest` stream (a sliding window of 64 unanswered
//! batches); Redis as `SETBIT`s pipelined 64 deep (`redis-benchmark -P 64`
//! style: 64 sent, 64 replies read), with `appendfsync always`. Every change
//! adds a random customer to a tag (key) that started empty, so nearly every
//! one must reach the disk on both sides. The targets: ≥ 1× Redis
//! from 1 client, ≥ 2× from 8.

use std::sync::atomic::{AtomicU64, Ordering};

use tagstore_proto::{IngestRequest, Mutation};
use tokio::sync::Semaphore;

use crate::*;

/// Requests in flight per client.
pub const DEPTH: usize = 64;

impl Bench {
    /// Changes per second on both systems, from `clients` clients.
    pub(crate) async fn pipelined_changes(
        &mut self,
        server: &ServerProcess,
        ids: &Arc<Vec<u32>>,
        clients: usize,
        seed: u64,
    ) -> Result<(), BoxError> {
        let secs = self.cli.seconds;
        let ours = {
            let done = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for k in 0..clients {
                let mut c = server.client().await?;
                let ids = ids.clone();
                let done = done.clone();
                tasks.spawn(async move {
                    let window = Arc::new(Semaphore::new(DEPTH));
                    let (tx, rx) = tokio::sync::mpsc::channel(DEPTH);
                    let mut answers = c
                        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    let sender_window = window.clone();
                    let sender = tokio::spawn(async move {
                        let mut rng = StdRng::seed_from_u64(seed ^ (k as u64) << 32);
                        let started = Instant::now();
                        let mut seq = 0u64;
                        while started.elapsed().as_secs_f64() < secs {
                            let Ok(permit) = sender_window.acquire().await else {
                                break;
                            };
                            permit.forget();
                            let id = ids[rng.random_range(0..ids.len())];
                            let batch = IngestRequest {
                                seq,
                                changes: vec![Mutation {
                                    tag: ops::FRESH_TAG.into(),
                                    add_ids: vec![id],
                                    ..Default::default()
                                }],
                                ..Default::default()
                            };
                            seq += 1;
                            if tx.send(batch).await.is_err() {
                                break;
                            }
                        }
                    });
                    while let Some(a) = answers.message().await? {
                        if !a.rejected.is_empty() {
                            return Err::<(), BoxError>(
                                format!("change refused: {}", a.rejected[0].reason).into(),
                            );
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                    sender.await?;
                    Ok(())
                });
            }
            let started = Instant::now();
            while let Some(r) = tasks.join_next().await {
                r??;
            }
            done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
        };
        let theirs = match self.redis_port() {
            None => None,
            Some(port) => {
                let customers = self.data.customers;
                let handles: Vec<_> = (0..clients)
                    .map(|k| {
                        std::thread::spawn(move || -> Result<u64, String> {
                            let mut conn = crate::redis::Conn::connect(port)?;
                            let mut rng = StdRng::seed_from_u64(seed ^ (k as u64) << 32);
                            let started = Instant::now();
                            let mut n = 0u64;
                            while started.elapsed().as_secs_f64() < secs {
                                for _ in 0..DEPTH {
                                    let offset = rng.random_range(0..customers).to_string();
                                    conn.send(&[
                                        b"SETBIT",
                                        ops::FRESH_KEY.as_bytes(),
                                        offset.as_bytes(),
                                        b"1",
                                    ])?;
                                }
                                conn.flush()?;
                                n += DEPTH as u64;
                            }
                            Ok(n)
                        })
                    })
                    .collect();
                let started = Instant::now();
                let mut n = 0;
                for h in handles {
                    n += h.join().map_err(|_| "redis client panicked")??;
                }
                Some(n as f64 / started.elapsed().as_secs_f64())
            }
        };
        self.report.add(
            "update",
            &format!(
                "batch 1, {clients} clients, {DEPTH} in flight each (Ingest stream / pipelined SETBIT), durable: changes/s"
            ),
            "/s",
            Better::Higher,
            Some(ours),
            theirs,
        );
        Ok(())
    }
}
