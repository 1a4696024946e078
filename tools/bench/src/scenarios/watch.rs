//! The `watch` scenario (#23): the change feed under the update scenario's
//! writes, over gRPC.
//! - Durable updates of 1,000 memberships and of one, from 8 clients,
//!   without watchers and with 100 watchers each watching the same 20 tags,
//!   taking turns (without, with, without, with); target: with ÷ without
//!   ≥ 0.8. The watchers are read by this process as fast as it can, on a
//!   runtime of its own whose thread runs at nice 19: they stand for
//!   services on other machines, and their decoding must not take the
//!   writers' CPU here (`--watchers-nice 0` to share it equally instead).
//!   What serving them costs the server stays in the figure. The watchers
//!   ask for the full form (a message per change with the customer's key)
//!   in some rounds and for the compact one (ids grouped by tag) in others:
//!   without, full, without, compact, twice.
//! - The feed's delivery lag: from a write's apply time (`at_ms`) to its
//!   message reaching a watcher, p50 and p99 over every message; under
//!   those writes, and under one client's single writes (a light load).
//! - What keeping the feed costs the writes: the same updates with the
//!   feed off (`feed_retention_mb = 0`) and on, servers taking turns on the
//!   same store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hdrhistogram::Histogram;

use crate::ops::TagStoreClientExt;
use crate::*;

const WATCHERS: usize = 100;
const WATCHED_TAGS: usize = 20;

/// One round's write figures: memberships/s and p50 ms.
pub(crate) type Round = (f64, f64);

impl Bench {
    pub(crate) async fn watch_feed(&mut self) -> Result<(), BoxError> {
        let batches = [1000usize, 1];
        // The feed's cost: off and on, taking turns (a server each time).
        let off_cfg = self.work.join("feed-off.toml");
        std::fs::write(&off_cfg, "feed_retention_mb = 0\n")?;
        let off_arg = off_cfg.to_string_lossy().into_owned();
        let mut feed_off: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let mut feed_on: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let nonce = {
            let server = self.start(&self.dir.clone(), &[])?;
            let n = store_lsn(&server).await?;
            let mut server = server;
            server.stop()?;
            n
        };
        for round in 0..4 {
            let on = round % 2 == 1;
            let extra: Vec<&str> = if on {
                vec![]
            } else {
                vec!["--config", &off_arg]
            };
            let mut server = self.start(&self.dir.clone(), &extra)?;
            for (k, &batch) in batches.iter().enumerate() {
                let r = self.updates(&server, batch, 8, nonce).await?;
                if on {
                    feed_on[k].push(r);
                } else {
                    feed_off[k].push(r);
                }
            }
            server.stop()?;
        }
        // Watchers: none and 100, taking turns on one server.
        let server = self.start(&self.dir.clone(), &[])?;
        let p = picks(&self.data);
        let mut watched: Vec<String> = Vec::new();
        for t in p.dense.iter().chain(&p.sparse).chain(&p.tiny) {
            watched.push(self.data.tags[*t].name.clone());
        }
        for t in 1..self.data.tags.len() {
            if watched.len() >= WATCHED_TAGS {
                break;
            }
            let name = self.data.tags[t].name.clone();
            if !watched.contains(&name) {
                watched.push(name);
            }
        }
        let mut without: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let mut with: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let mut with_compact: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let mut lag = Histogram::<u64>::new(3)?;
        let mut delivered = 0u64;
        let nice = self.cli.watchers_nice;
        let consumers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-watchers")
            .on_thread_start(move || {
                // SAFETY: setpriority on this thread's own id.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice);
                }
            })
            .enable_all()
            .build()?;
        // Round 0 measures the lag at a light load (one client's single
        // writes) with the watchers, before any backlog; rounds 1 to 8 take
        // turns (with, without, with compact, without, twice).
        let mut light_lag = Histogram::<u64>::new(3)?;
        for round in 0..9 {
            let light = round == 0;
            let watching = round % 2 == 1 || light;
            let compact = round % 4 == 3;
            let stop = Arc::new(AtomicBool::new(false));
            let mut tasks = Vec::new();
            if watching {
                let mut ready = Vec::new();
                for _ in 0..WATCHERS {
                    // Connected from the consumers' runtime: the connection's
                    // own task runs there too.
                    let endpoint = format!("http://{}", server.addr);
                    let tags = watched.clone();
                    let stop = stop.clone();
                    let (up, is_up) = tokio::sync::oneshot::channel();
                    ready.push(is_up);
                    tasks.push(consumers.spawn(async move {
                        let mut c = TagStoreClientExt::connect(endpoint)
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut stream = c
                            .watch(WatchRequest {
                                tags,
                                values: Vec::new(),
                                after_lsn: None,
                                max_changes: 0,
                                audiences: Vec::new(),
                                compact,
                            })
                            .await
                            .map_err(|e| e.to_string())?
                            .into_inner();
                        // The first message says where it starts: watching.
                        stream.message().await.map_err(|e| e.to_string())?;
                        let _ = up.send(());
                        let mut h = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
                        let mut changes = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let next =
                                tokio::time::timeout(Duration::from_millis(200), stream.message())
                                    .await;
                            let m = match next {
                                Err(_) => continue,
                                Ok(Ok(Some(m))) => m,
                                Ok(Ok(None)) => break,
                                Ok(Err(e)) => return Err(e.to_string()),
                            };
                            if m.at_ms > 0 {
                                let now = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis() as i64);
                                h.record((now - m.at_ms).max(0) as u64).ok();
                                changes += m.changes.len() as u64;
                                for g in &m.grouped {
                                    // Read as a consumer would, and checked
                                    // against the counts the server gives.
                                    for (bytes, count) in [
                                        (&g.entered_bitmap, g.entered_count),
                                        (&g.left_bitmap, g.left_count),
                                    ] {
                                        let n = if bytes.is_empty() {
                                            0
                                        } else {
                                            roaring::RoaringBitmap::deserialize_from(&bytes[..])
                                                .map_err(|e| e.to_string())?
                                                .len()
                                        };
                                        if n != u64::from(count) {
                                            return Err(format!(
                                                "lsn {}: a bitmap of {n} ids said {count}",
                                                m.lsn
                                            ));
                                        }
                                        changes += n;
                                    }
                                }
                            }
                        }
                        Ok::<_, String>((h, changes))
                    }));
                }
                for r in ready {
                    r.await.map_err(|_| "a watcher did not start")?;
                }
            }
            for (k, &batch) in batches.iter().enumerate() {
                if light {
                    if batch == 1 {
                        self.updates(&server, batch, 1, nonce).await?;
                    }
                    continue;
                }
                let r = self.updates(&server, batch, 8, nonce).await?;
                if watching && compact {
                    with_compact[k].push(r);
                } else if watching {
                    with[k].push(r);
                } else {
                    without[k].push(r);
                }
            }
            // Let the watchers catch up with the last writes, then stop them.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let (h, n) = t.await??;
                if light {
                    light_lag.add(&h)?;
                } else {
                    lag.add(&h)?;
                }
                delivered += n;
            }
        }
        let mut server = server;
        server.stop()?;
        consumers.shutdown_background();

        let best = |v: &Vec<Round>| v.iter().map(|r| r.0).fold(0.0, f64::max);
        let mut figures = Vec::new();
        for (k, &batch) in batches.iter().enumerate() {
            let ratio_watch = best(&with[k]) / best(&without[k]).max(1e-9);
            let ratio_compact = best(&with_compact[k]) / best(&without[k]).max(1e-9);
            let ratio_feed = best(&feed_on[k]) / best(&feed_off[k]).max(1e-9);
            self.report.add(
                "watch",
                &format!(
                    "batch {batch}, 8 clients: with ÷ without {WATCHERS} watchers of {WATCHED_TAGS} tags (target ≥ 0.8)"
                ),
                "×",
                Better::Higher,
                Some(ratio_watch),
                None,
            );
            self.report.add(
                "watch",
                &format!(
                    "batch {batch}, 8 clients: with ÷ without {WATCHERS} compact watchers of {WATCHED_TAGS} tags (target ≥ 0.8)"
                ),
                "×",
                Better::Higher,
                Some(ratio_compact),
                None,
            );
            self.report.add(
                "watch",
                &format!("batch {batch}, 8 clients: feed on ÷ feed off"),
                "×",
                Better::Higher,
                Some(ratio_feed),
                None,
            );
            figures.push(json!({
                "batch": batch,
                "clients": 8,
                "without_watchers": without[k],
                "with_watchers": with[k],
                "with_compact_watchers": with_compact[k],
                "feed_off": feed_off[k],
                "feed_on": feed_on[k],
            }));
        }
        self.report.add(
            "watch",
            "delivery lag (apply to watcher), p50",
            "ms",
            Better::Lower,
            Some(lag.value_at_quantile(0.5) as f64),
            None,
        );
        self.report.add(
            "watch",
            "delivery lag (apply to watcher), p99",
            "ms",
            Better::Lower,
            Some(lag.value_at_quantile(0.99) as f64),
            None,
        );
        for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
            self.report.add(
                "watch",
                &format!("delivery lag at a light load (1 client, single writes), {name}"),
                "ms",
                Better::Lower,
                Some(light_lag.value_at_quantile(q) as f64),
                None,
            );
        }
        self.report.extra.insert(
            "watch".into(),
            json!({
                "rounds": figures,
                "watched_tags": watched,
                "changes_delivered": delivered,
                "messages": lag.len(),
                "lag_ms": { "p50": lag.value_at_quantile(0.5), "p99": lag.value_at_quantile(0.99), "max": lag.max() },
                "light_lag_ms": { "p50": light_lag.value_at_quantile(0.5), "p99": light_lag.value_at_quantile(0.99), "max": light_lag.max(), "messages": light_lag.len() },
            }),
        );
        Ok(())
    }

    /// Durable updates of `batch` memberships from `clients` clients for the run's
    /// seconds: memberships/s and p50 ms.
    pub(crate) async fn updates(
        &mut self,
        server: &ServerProcess,
        batch: usize,
        clients: usize,
        nonce: u64,
    ) -> Result<Round, BoxError> {
        let seed = self.write_seed(nonce);
        let m = tagstore_loop(
            &server.addr,
            &self.data,
            &Op::Update { batch },
            clients,
            self.cli.seconds,
            seed,
        )
        .await?;
        Ok((m.rate() * batch as f64, m.ms(0.5)))
    }
}
