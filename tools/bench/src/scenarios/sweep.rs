//! The `sweep` scenario: `count(A AND B)` across tag densities, on a data
//! set of its own, and the sweep plot.

use super::load::load_tags;
use crate::*;

impl Bench {
    pub(crate) async fn sweep(&mut self) -> Result<(), BoxError> {
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
}

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
