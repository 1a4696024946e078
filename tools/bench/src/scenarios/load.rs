//! The `load` scenario: the data set into tagstore (in `Update` batches
//! from concurrent clients) and into Redis, timed, and the footprint of each.

use crate::*;

impl Bench {
    /// Loads the data set into tagstore (unless reused) and into Redis.
    pub(crate) async fn load(&mut self, timed: bool) -> Result<(), BoxError> {
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
}

/// Loads the members of `tags` through `Update` requests of `batch` keys from
/// `clients` concurrent connections. Requests are made as they are sent, so
/// memory stays small whatever the data set.
pub(super) async fn load_tags(
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
