//! The `mixed` scenario: reads and writes at once, as a busy tag platform
//! sees them.

use crate::*;

impl Bench {
    pub(crate) async fn mixed(&mut self) -> Result<(), BoxError> {
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
}
