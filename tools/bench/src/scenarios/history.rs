//! The `history` scenario (#23, part 4): the store's past kept for reads
//! as of a log position, on the loaded store.
//! - The load's history dropped (a start with `history_days = 0` and a
//!   checkpoint), so that the day measured holds updates only.
//! - A checkpoint (history begins: the first version), then durable updates
//!   of 1,000 memberships from 8 clients for the run's seconds (the log
//!   they write moves into `history/` at each checkpoint), then another
//!   checkpoint.
//! - What the history holds on disk against the store itself.
//! - A count of two dense tags as of the first version (the version read,
//!   no log), as of the middle of the writes and as of just before the
//!   last one (the version and the log replayed up to there): the first
//!   read of each moment, and the same again (kept in memory), against the
//!   same count now. Replay speed: records (and memberships) replayed per
//!   second between the first reads as of the first and the last moments.

use std::time::Instant;

use crate::*;

impl Bench {
    pub(crate) async fn history(&mut self) -> Result<(), BoxError> {
        let config = self.work.join("no-history.toml");
        std::fs::write(&config, "history_days = 0\n")?;
        let mut without = self.start(
            &self.dir.clone(),
            &["--config", config.to_str().unwrap_or_default()],
        )?;
        without
            .client()
            .await?
            .checkpoint(CheckpointRequest::default())
            .await?;
        without.stop()?;
        let server = self.start(&self.dir.clone(), &[])?;
        let nonce = store_lsn(&server).await?;
        let mut c = server.client().await?;
        c.checkpoint(CheckpointRequest::default()).await?;
        let before = c.stats(StatsRequest {}).await?.into_inner();
        let first = before.lsn;
        // Positions during the writes: sampled by a task as they go.
        let addr = format!("http://{}", server.addr);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut c = crate::ops::TagStoreClientExt::connect(addr)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = c.stats(StatsRequest {}).await.map_err(|e| e.to_string())?;
                    seen.push(s.into_inner().lsn);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Ok::<_, String>(seen)
            })
        };
        let (rate, _) = self.updates(&server, 1000, 8, nonce).await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = sampler.await??;
        c.checkpoint(CheckpointRequest::default()).await?;
        let after = c.stats(StatsRequest {}).await?.into_inner();
        let mid = seen.get(seen.len() / 2).copied().unwrap_or(first);
        let last = after.lsn.saturating_sub(1).max(first);
        let q = Q::And(vec![Q::Tag(0), self.dense_pair.clone()]).text(&self.data);
        let count_at = |as_of: Option<AsOf>| {
            let q = q.clone();
            let mut c = c.clone();
            async move {
                let t = Instant::now();
                let r = c
                    .count(CountRequest {
                        queries: vec![q],
                        as_of,
                    })
                    .await?;
                Ok::<_, BoxError>((t.elapsed().as_secs_f64() * 1e3, r.into_inner().counts[0]))
            }
        };
        let at = |p: u64| {
            Some(AsOf {
                at: Some(as_of::At::Position(p)),
            })
        };
        let mut now_ms = Vec::new();
        for _ in 0..20 {
            now_ms.push(count_at(None).await?.0);
        }
        now_ms.sort_by(f64::total_cmp);
        let now_p50 = now_ms[now_ms.len() / 2];
        let mut rows = Vec::new();
        for (what, p) in [
            ("the first version", first),
            ("mid-writes", mid),
            ("the last write", last),
        ] {
            let (cold, _) = count_at(at(p)).await?;
            let mut warm = Vec::new();
            for _ in 0..20 {
                warm.push(count_at(at(p)).await?.0);
            }
            warm.sort_by(f64::total_cmp);
            rows.push((what, p, cold, warm[warm.len() / 2]));
        }
        drop(c);
        let mut server = server;
        server.stop()?;

        let log_bytes = after.history_bytes.saturating_sub(before.history_bytes);
        self.report.add(
            "history",
            "updates of 1,000 while history is kept, 8 clients",
            "memberships/s",
            Better::Higher,
            Some(rate),
            None,
        );
        self.report.add(
            "history",
            "history on disk ÷ store on disk, after the writes",
            "×",
            Better::Lower,
            Some(after.history_bytes as f64 / after.disk_bytes.max(1) as f64),
            None,
        );
        for (what, p, cold, warm) in &rows {
            self.report.add(
                "history",
                &format!("count as of {what} (lsn {p}), first read"),
                "ms",
                Better::Lower,
                Some(*cold),
                None,
            );
            self.report.add(
                "history",
                &format!("count as of {what}, read again ÷ count now (p50)"),
                "×",
                Better::Lower,
                Some(warm / now_p50.max(1e-9)),
                None,
            );
        }
        // The first read as of the last write replays what the first read
        // as of the first version does not (unless a version was kept in
        // between: then less, and this understates the speed).
        let replay_s = (rows[2].2 - rows[0].2).max(1e-3) / 1e3;
        let records = rows[2].1.saturating_sub(rows[0].1) as f64;
        self.report.add(
            "history",
            "replayed by a first read, updates of 1,000",
            "memberships/s",
            Better::Higher,
            Some(records * 1000.0 / replay_s),
            None,
        );
        self.report.extra.insert(
            "history".into(),
            json!({
                "first_version_lsn": first, "mid_lsn": mid, "last_lsn": last,
                "history_bytes": after.history_bytes, "store_disk_bytes": after.disk_bytes,
                "history_versions": after.history_versions, "history_bytes_added": log_bytes,
                "count_now_p50_ms": now_p50,
                "reads": rows.iter().map(|(w, p, c, h)| json!({"at": w, "lsn": p, "first_ms": c, "again_ms": h})).collect::<Vec<_>>(),
            }),
        );
        Ok(())
    }
}
