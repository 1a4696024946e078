//! The `restart` scenario: time to the first answer after a clean stop and
//! after a `kill -9`.

use crate::*;

impl Bench {
    pub(crate) async fn restart(&mut self) -> Result<(), BoxError> {
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
            as_of: None,
        })
        .await?;
        Ok((server, t0.elapsed()))
    }
}
