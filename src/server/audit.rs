//! The audit trail at the door: which calls are recorded, with what, and
//! `ReadAudit`. A call that reads individual customers (profiles, member
//! pages, exports, the merge log, the change feed, key look-ups) is
//! answered only once its record is handed to the trail (the trail that
//! cannot take it refuses the call with `UNAVAILABLE`); a call that
//! changes customers is recorded once applied (it is durable in the log
//! whatever happens to its record; a record that cannot be taken is
//! logged as an error). Failed calls are recorded with their status.
//! The trail itself is `crate::audit`'s.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::access::Grant;
use crate::audit::{Filter, MAX_READ, MAX_SUBJECT_BYTES, Record, cut};
use crate::proto;
use crate::server::service::{Service, blocking_until_gone, invalid};
use crate::server::status::to_status;

/// The caller's token name (empty without tokens).
pub(super) fn who<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Arc<Grant>>()
        .map(|g| g.name.clone())
        .unwrap_or_default()
}

/// Whether a call reads customers (its answer is held until recorded) or
/// changes them.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Reads,
    Changes,
}

impl Service {
    /// Records a call: `customers` and `subject` as the call counts and
    /// names them; the outcome from `res`. A read whose record cannot be
    /// taken is refused instead of answered.
    pub(super) async fn audited<T>(
        &self,
        kind: Kind,
        who: String,
        method: &str,
        subject: &str,
        res: Result<T, Status>,
        customers: impl FnOnce(&T) -> u64,
    ) -> Result<T, Status> {
        let (n, outcome) = match &res {
            Ok(v) => (customers(v), "OK".to_string()),
            Err(s) => (0, format!("{:?}", s.code())),
        };
        let record = Record {
            at_ms: self.engine.now_ms(),
            who,
            method: method.to_string(),
            customers: n,
            subject: cut(subject, MAX_SUBJECT_BYTES),
            outcome,
            ..Default::default()
        };
        match self.audit.record(record) {
            Ok(()) => res,
            Err(e) if kind == Kind::Reads && res.is_ok() => Err(Status::unavailable(format!(
                "{method} reads customers and is answered only once recorded: {e}"
            ))),
            Err(e) => {
                tracing::error!(error = %e, method, "a change was applied and not recorded in the audit trail");
                res
            }
        }
    }
}

pub(super) async fn read_audit(
    svc: &Service,
    req: Request<proto::ReadAuditRequest>,
) -> Result<Response<proto::ReadAuditResponse>, Status> {
    let r = req.into_inner();
    let limit = match r.limit as usize {
        0 => 1_000,
        n if n <= MAX_READ => n,
        n => {
            return Err(invalid(format!(
                "limit is 1 to {MAX_READ} (0: 1,000); {n} given"
            )));
        }
    };
    for (what, v) in [
        ("who", &r.who),
        ("method", &r.method),
        ("subject", &r.subject),
    ] {
        if v.len() > MAX_SUBJECT_BYTES {
            return Err(invalid(format!(
                "{what} is at most {MAX_SUBJECT_BYTES} bytes; {} given",
                v.len()
            )));
        }
    }
    let filter = Filter {
        who: r.who,
        method: r.method,
        subject: r.subject,
        since_ms: r.since_ms,
        until_ms: r.until_ms,
    };
    let audit = svc.audit.clone();
    // A caller gone stops the read before its next file.
    let (records, more) = blocking_until_gone(move |abandon| {
        audit
            .read(&filter, r.after, limit, &|| abandon.is_set())
            .map_err(to_status)
    })
    .await?;
    Ok(Response::new(proto::ReadAuditResponse {
        records: records
            .into_iter()
            .map(|x| proto::AuditRecord {
                seq: x.seq,
                at_ms: x.at_ms,
                who: x.who,
                method: x.method,
                customers: x.customers,
                subject: x.subject,
                outcome: x.outcome,
            })
            .collect(),
        more,
    }))
}
