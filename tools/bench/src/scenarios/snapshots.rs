//! The `snapshots` scenario (#23, part 2): audience snapshots on the loaded
//! store, over gRPC.
//! - A saved audience of the dense tag nearest 50% of the customers; a
//!   snapshot of it: the time `TakeSnapshot` takes, and the disk it adds
//!   (the store's files after a checkpoint, against before it).
//! - A second snapshot of the unchanged audience (it shares the first's
//!   members): time and disk.
//! - Durable updates of 1,000 memberships from 8 clients for the run's
//!   seconds, then a third snapshot: time and disk.
//! - The diff of the first and third: who joined and who left, as two
//!   counts in one call (p50 of 10), and the members who joined as an
//!   `Export` stream.
//!
//! The audience and its snapshots are dropped at the end, so the store is
//! left as it was found (but for the updates).

use std::time::Instant;

use crate::*;

const AUDIENCE: &str = "bench_snapshot_audience";

impl Bench {
    pub(crate) async fn snapshots(&mut self) -> Result<(), BoxError> {
        let server = self.start(&self.dir.clone(), &[])?;
        let nonce = store_lsn(&server).await?;
        let mut c = server.client().await?;
        // The dense tag nearest half the customers.
        let p = picks(&self.data);
        let data = self.data.clone();
        let share =
            |t: usize| data.tags[t].expected_members() as f64 / data.customers.max(1) as f64;
        let tag = p
            .dense
            .iter()
            .copied()
            .min_by(|a, b| (share(*a) - 0.5).abs().total_cmp(&(share(*b) - 0.5).abs()))
            .ok_or("no dense tag in the data set")?;
        let query = Q::Tag(tag).text(&self.data);
        c.create_audience(CreateAudienceRequest {
            name: AUDIENCE.into(),
            query: query.clone(),
            replace: true,
            ..Default::default()
        })
        .await?;
        // One snapshot: its time, and the disk the next checkpoint adds.
        let snap = async |c: &mut tagstore_test_support::Client| -> Result<(u32, u64, f64, u64), BoxError> {
            c.checkpoint(CheckpointRequest::default()).await?;
            let before = c.stats(StatsRequest {}).await?.into_inner().disk_bytes;
            let t = Instant::now();
            let s = c
                .take_snapshot(TakeSnapshotRequest {
                    audience: AUDIENCE.into(),
                    note: String::new(),
                })
                .await?
                .into_inner()
                .snapshot
                .ok_or("TakeSnapshot answered no snapshot")?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            c.checkpoint(CheckpointRequest::default()).await?;
            let after = c.stats(StatsRequest {}).await?.into_inner().disk_bytes;
            Ok((s.id, s.count, ms, after.saturating_sub(before)))
        };
        let first = snap(&mut c).await?;
        let unchanged = snap(&mut c).await?;
        let (rate, _) = self.updates(&server, 1000, 8, nonce).await?;
        let changed = snap(&mut c).await?;
        // The diff: joined and left counted in one call, then the joined
        // members streamed.
        let joined = format!("SNAPSHOT {} AND NOT SNAPSHOT {}", changed.0, first.0);
        let left = format!("SNAPSHOT {} AND NOT SNAPSHOT {}", first.0, changed.0);
        let mut diff_ms = Vec::new();
        let mut counts = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            counts = c
                .count(CountRequest {
                    queries: vec![joined.clone(), left.clone()],
                    as_of: None,
                })
                .await?
                .into_inner()
                .counts;
            diff_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        diff_ms.sort_by(f64::total_cmp);
        let t = Instant::now();
        let mut stream = c
            .export(ExportRequest {
                query: joined.clone(),
                batch_size: 0,
                identity_type: String::new(),
                hash: String::new(),
                hash_upper: false,
                as_of: None,
            })
            .await?
            .into_inner();
        let mut exported = 0u64;
        while let Some(m) = stream.message().await? {
            exported += m.customers.len() as u64;
        }
        let export_ms = t.elapsed().as_secs_f64() * 1e3;
        for id in [first.0, unchanged.0, changed.0] {
            c.drop_snapshot(DropSnapshotRequest { id }).await?;
        }
        c.drop_audience(DropAudienceRequest {
            name: AUDIENCE.into(),
        })
        .await?;
        drop(c);
        let mut server = server;
        server.stop()?;

        let pct = (share(tag) * 100.0).round();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        for (what, (_, _, ms, disk)) in [
            (
                format!(
                    "snapshot of a {pct}% audience ({members} members)",
                    members = first.1
                ),
                first,
            ),
            ("snapshot of it again, unchanged".to_string(), unchanged),
            ("snapshot of it after the updates".to_string(), changed),
        ] {
            self.report.add(
                "snapshots",
                &format!("{what}: taken"),
                "ms",
                Better::Lower,
                Some(ms),
                None,
            );
            self.report.add(
                "snapshots",
                &format!("{what}: disk added (after a checkpoint)"),
                "MiB",
                Better::Lower,
                Some(mib(disk)),
                None,
            );
        }
        self.report.add(
            "snapshots",
            "diff of two snapshots: joined and left counted, p50",
            "ms",
            Better::Lower,
            Some(diff_ms[diff_ms.len() / 2]),
            None,
        );
        self.report.add(
            "snapshots",
            &format!("diff of two snapshots: the {exported} who joined, exported"),
            "ms",
            Better::Lower,
            Some(export_ms),
            None,
        );
        let taken: Vec<_> = [first, unchanged, changed]
            .iter()
            .map(|(id, n, ms, disk)| json!({"id": id, "members": n, "ms": ms, "disk_bytes": disk}))
            .collect();
        self.report.extra.insert(
            "snapshots".into(),
            json!({
                "tag": self.data.tags[tag].name, "share": share(tag),
                "members": first.1, "updates_memberships_per_s": rate,
                "snapshots": taken,
                "joined": counts.first(), "left": counts.get(1), "exported": exported,
                "diff_p50_ms": diff_ms[diff_ms.len() / 2], "export_ms": export_ms,
            }),
        );
        Ok(())
    }
}
