//! The member-count history over gRPC: the daily recorder (a task that,
//! once a minute, sees whether the local day has a point yet and, if not,
//! counts every tag and saved audience and logs them as one write) and the
//! `TagHistory` call.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::fields::time;
use crate::names::quote_tag_name;
use crate::proto;
use crate::query::Query;
use crate::server::service::{blocking, invalid};
use crate::server::status::to_status;
use crate::storage::{Engine, WriteOp};

/// Days of points kept.
pub const HISTORY_DAYS: i32 = 400;
/// How often the recorder looks at the clock.
const EVERY: Duration = Duration::from_secs(60);

/// Starts the recorder; it runs while the runtime does.
pub fn start_recorder(
    engine: Arc<Engine>,
    time_zone: String,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let tz = match time::zone(&time_zone) {
            Ok(tz) => tz,
            Err(e) => {
                tracing::warn!(error = %e, "no member-count history: the time zone is not known");
                return;
            }
        };
        loop {
            if let Err(e) = record_today(&engine, &tz).await {
                tracing::warn!(error = %e, "could not record today's member counts; trying again in a minute");
            }
            if !super::sleep_unless_closing(EVERY, &mut closing).await {
                return;
            }
        }
    });
}

/// Records today's counts unless the history has them.
pub async fn record_today(engine: &Arc<Engine>, tz: &jiff::tz::TimeZone) -> Result<(), Status> {
    let now = engine.now_ms();
    let today = time::day_of(now, tz).map_err(to_status)?;
    let snap = engine.snapshot();
    if snap.history.last_day().is_some_and(|d| d >= today) {
        return Ok(());
    }
    let counts = blocking(move || {
        let mut counts: Vec<(String, u64)> = snap
            .tags
            .values()
            .map(|t| (t.meta.name.to_string(), t.meta.count))
            .collect();
        for a in snap.audiences.values() {
            // An audience whose tag was dropped has no count today.
            if let Ok(q) = Query::compile_at(&quote_tag_name(&a.name), &snap, now) {
                counts.push((a.name.to_string(), q.count()));
            }
        }
        Ok(counts)
    })
    .await?;
    if counts.is_empty() {
        // Nothing to count yet: no point, and no log record.
        return Ok(());
    }
    engine
        .write(WriteOp::RecordHistory {
            day: today,
            keep_from: today - (HISTORY_DAYS - 1),
            counts,
        })
        .await
        .map_err(to_status)?;
    Ok(())
}

pub(super) fn tag_history(
    engine: &Engine,
    time_zone: &str,
    r: proto::TagHistoryRequest,
) -> Result<proto::TagHistoryResponse, Status> {
    let days = match r.days {
        0 => 30,
        n if n > HISTORY_DAYS as u32 => {
            return Err(invalid(format!(
                "days {n} is over the {HISTORY_DAYS} days kept"
            )));
        }
        n => n as i32,
    };
    let tz = time::zone(time_zone).map_err(to_status)?;
    let today = time::day_of(engine.now_ms(), &tz).map_err(to_status)?;
    let snap = engine.snapshot();
    let points = snap.history.series(&r.name, today - (days - 1));
    if points.is_empty()
        && snap.tag(&r.name).is_none()
        && !snap.audiences.contains_key(r.name.as_str())
    {
        return Err(Status::not_found(format!(
            "no tag or saved audience {:?} has a member-count history",
            r.name
        )));
    }
    Ok(proto::TagHistoryResponse {
        points: points
            .into_iter()
            .map(|(d, count)| proto::HistoryPoint {
                day: time::format_day(d),
                count,
            })
            .collect(),
    })
}
