//! Reads as of the past over gRPC: a request's `as_of` turned into the
//! engine's moment, the store read at that moment (off the runtime: the
//! first read of a moment may replay up to a day of log), and a token
//! limited to categories checked again against what the store held then
//! (a tag dropped since kept its category there). Never writes.

use std::sync::Arc;

use tonic::Status;

use crate::access::Grant;
use crate::fields::time;
use crate::proto;
use crate::server::scope;
use crate::server::service::{blocking, invalid};
use crate::server::status::to_status;
use crate::storage::versions::read::AsOf;
use crate::storage::{Engine, Snapshot};

/// The engine's moment for a request's `as_of` (`None`: now).
pub(super) fn moment(as_of: Option<&proto::AsOf>) -> Result<Option<AsOf>, Status> {
    use proto::as_of::At;
    match as_of.and_then(|a| a.at.as_ref()) {
        None => Ok(None),
        Some(At::Day(d)) => time::parse_date(d.trim())
            .map(|day| Some(AsOf::Day(day)))
            .ok_or_else(|| {
                invalid(format!(
                    "as_of.day {:?} is not a date: write it as YYYY-MM-DD",
                    crate::names::shown(d)
                ))
            }),
        Some(At::Position(p)) => Ok(Some(AsOf::Position(*p))),
    }
}

/// An audit record's subject for a read as of the past: the query, then
/// `as of <day>` or `as of position <n>`.
pub(super) fn in_subject(subject: String, as_of: Option<&proto::AsOf>) -> String {
    use proto::as_of::At;
    match as_of.and_then(|a| a.at.as_ref()) {
        None => subject,
        Some(At::Day(d)) => format!("{subject} as of {d}"),
        Some(At::Position(p)) => format!("{subject} as of position {p}"),
    }
}

/// The store to read and what "now" is for its queries: the newest
/// snapshot and the clock without `as_of`; the store at that moment with
/// it. With a token limited to categories, `queries` are checked against
/// the store of that moment as they were against the newest.
pub(super) async fn read_at(
    engine: &Arc<Engine>,
    as_of: Option<proto::AsOf>,
    grant: Option<Arc<Grant>>,
    queries: &[String],
) -> Result<(Arc<Snapshot>, i64), Status> {
    let Some(at) = moment(as_of.as_ref())? else {
        return Ok((engine.snapshot(), engine.now_ms()));
    };
    let engine = engine.clone();
    let past = blocking(move || engine.as_of(at).map_err(to_status)).await?;
    if let Some(g) = grant {
        for q in queries {
            scope::check_query(&g, &past.snap, q)?;
        }
    }
    Ok((past.snap, past.now_ms))
}
