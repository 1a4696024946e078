//! The `backup` scenario (#22): online backups of the loaded store, over
//! gRPC, and restores by `tagstore restore`.
//! - A full backup after a checkpoint: the store's bytes copied per second,
//!   and the backup file's size against them.
//! - `tagstore restore` of it into a new directory (checks, a start of the
//!   store and its shutdown included): bytes per second.
//! - Durable updates of 1,000 memberships and of one, from 8 clients,
//!   without and with backups running back to back on the same server,
//!   taking turns (without, with, without, with): with ÷ without.
//! - An increment of the full backup after those writes: its size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tagstore_proto::backup::save;

use crate::scenarios::watch::Round;
use crate::*;

impl Bench {
    pub(crate) async fn backup(&mut self) -> Result<(), BoxError> {
        let mut server = self.start(&self.dir.clone(), &[])?;
        let nonce = store_lsn(&server).await?;
        let mut c = server.client().await?;
        c.checkpoint(CheckpointRequest::default()).await?;
        let full = self.work.join("full.tsbak");
        let _ = std::fs::remove_file(&full);
        let started = Instant::now();
        let done = save(&mut c, None, &full, |_| {})
            .await
            .map_err(|e| format!("backup: {e:?}"))?;
        let backup_s = started.elapsed().as_secs_f64();
        let restored = self.work.join("restored");
        let _ = std::fs::remove_dir_all(&restored);
        let started = Instant::now();
        let out = std::process::Command::new(&self.bin)
            .arg("restore")
            .arg("--data-dir")
            .arg(&restored)
            .arg(&full)
            .output()?;
        if !out.status.success() {
            return Err(format!("restore: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let restore_s = started.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&restored)?;

        // Writes without and with backups running back to back.
        let batches = [1000usize, 1];
        let mut without: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let mut with: Vec<Vec<Round>> = vec![Vec::new(); batches.len()];
        let backups_during = Arc::new(AtomicU64::new(0));
        for round in 0..4 {
            let backing_up = round % 2 == 1;
            let stop = Arc::new(AtomicBool::new(false));
            let looper = backing_up.then(|| {
                let stop = stop.clone();
                let n = backups_during.clone();
                let endpoint = format!("http://{}", server.addr);
                let path = self.work.join("during.tsbak");
                tokio::spawn(async move {
                    let mut c = crate::ops::TagStoreClientExt::connect(endpoint)
                        .await
                        .map_err(|e| e.to_string())?;
                    while !stop.load(Ordering::Relaxed) {
                        let _ = std::fs::remove_file(&path);
                        save(&mut c, None, &path, |_| {})
                            .await
                            .map_err(|e| format!("{e:?}"))?;
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = std::fs::remove_file(&path);
                    Ok::<_, String>(())
                })
            });
            for (k, &batch) in batches.iter().enumerate() {
                let r = self.updates(&server, batch, 8, nonce).await?;
                if backing_up {
                    with[k].push(r);
                } else {
                    without[k].push(r);
                }
            }
            stop.store(true, Ordering::Relaxed);
            if let Some(t) = looper {
                t.await??;
            }
        }
        let inc = self.work.join("inc.tsbak");
        let _ = std::fs::remove_file(&inc);
        let inc_done = save(&mut c, Some(&full), &inc, |_| {})
            .await
            .map_err(|e| format!("increment: {e:?}"))?;
        server.stop()?;
        let _ = std::fs::remove_file(&full);
        let _ = std::fs::remove_file(&inc);

        let mb = |b: u64| b as f64 / 1e6;
        let rows: [(&str, &str, Better, f64); 4] = [
            (
                "full backup, store bytes copied",
                "MB/s",
                Better::Higher,
                mb(done.content_bytes) / backup_s.max(1e-9),
            ),
            (
                "full backup, file ÷ store bytes",
                "×",
                Better::Lower,
                done.backup_bytes as f64 / done.content_bytes.max(1) as f64,
            ),
            (
                "tagstore restore (checked, started, shut down)",
                "MB/s",
                Better::Higher,
                mb(done.content_bytes) / restore_s.max(1e-9),
            ),
            (
                "increment after the writes, file ÷ full file",
                "×",
                Better::Lower,
                inc_done.backup_bytes as f64 / done.backup_bytes.max(1) as f64,
            ),
        ];
        for (what, unit, better, v) in rows {
            self.report.add("backup", what, unit, better, Some(v), None);
        }
        let best = |v: &Vec<Round>| v.iter().map(|r| r.0).fold(0.0, f64::max);
        let mut rounds = Vec::new();
        for (k, &batch) in batches.iter().enumerate() {
            self.report.add(
                "backup",
                &format!("batch {batch}, 8 clients: with ÷ without backups running"),
                "×",
                Better::Higher,
                Some(best(&with[k]) / best(&without[k]).max(1e-9)),
                None,
            );
            rounds.push(json!({ "batch": batch, "without": without[k], "with": with[k] }));
        }
        self.report.extra.insert(
            "backup".into(),
            json!({
                "store_bytes": done.content_bytes,
                "backup_bytes": done.backup_bytes,
                "backup_seconds": backup_s,
                "restore_seconds": restore_s,
                "files": done.files,
                "increment": { "bytes": inc_done.backup_bytes, "files": inc_done.files, "files_in_base": inc_done.files_in_base, "log_records": inc_done.log_records },
                "backups_during_writes": backups_during.load(Ordering::Relaxed),
                "writes": rounds,
            }),
        );
        Ok(())
    }
}
