//! Calls for operators: `Stats` and `Checkpoint`.

use tonic::{Request, Response, Status};

use crate::proto;
use crate::server::service::{Service, blocking};
use crate::server::status::to_status;
use crate::storage::CheckpointOptions;

pub(super) async fn stats(
    svc: &Service,
    _req: Request<proto::StatsRequest>,
) -> Result<Response<proto::StatsResponse>, Status> {
    let snap = svc.engine.snapshot();
    let info = svc.engine.info();
    let engine = svc.engine.clone();
    let dir = svc.engine.config().data_dir.clone();
    let uptime = svc.started.elapsed().as_secs();
    let resp = blocking(move || {
        let disk_bytes = engine.disk_bytes();
        let (versions, history_bytes) = engine.history();
        let oldest = versions.first().copied();
        let bitmap_bytes = snap.decoded_tag_bytes();
        Ok(proto::StatsResponse {
            customers: snap.customer_count().map_err(to_status)?,
            tags: snap.tags.len() as u64,
            memory_bytes: resident_bytes().unwrap_or(0),
            disk_bytes,
            wal_bytes: info.wal_bytes,
            last_checkpoint_at_ms: info.last_checkpoint_at_ms,
            last_checkpoint_lsn: info.last_checkpoint_lsn,
            lsn: snap.lsn,
            segment_files: info.segment_files,
            dictionary_sections: info.dictionary_sections,
            bitmap_bytes,
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: dir.display().to_string(),
            uptime_seconds: uptime,
            history_bytes,
            history_versions: versions.len() as u32,
            history_begins_position: oldest.map_or(0, |v| v.lsn),
            history_begins_at_ms: oldest.map_or(0, |v| v.at_ms),
            facts_rebuilds_due: snap.rebuild_due.len(),
        })
    })
    .await?;
    Ok(Response::new(resp))
}

pub(super) async fn checkpoint(
    svc: &Service,
    req: Request<proto::CheckpointRequest>,
) -> Result<Response<proto::CheckpointResponse>, Status> {
    let options = CheckpointOptions {
        merge_dictionary: req.get_ref().merge_dictionary,
    };
    let info = svc.engine.checkpoint(options).await.map_err(to_status)?;
    Ok(Response::new(proto::CheckpointResponse {
        lsn: info.lsn,
        tags_written: info.tags_written,
        segment_bytes: info.segment_bytes,
        duration_ms: info.duration_ms,
        events_archived: info.events_archived,
        archive_bytes: info.archive_bytes,
    }))
}

/// Resident set size of this process, from `/proc/self/status` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
