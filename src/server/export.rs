//! `Export` as a stream that works only when its reader asks: each batch is
//! computed on the blocking pool when the transport polls for it (which it
//! does only while the client's flow-control window has room), so a client
//! that reads slowly or not at all holds no thread and at most one batch.
//! Every batch comes from the one snapshot taken when the call began, so
//! every row of that snapshot arrives whatever happens meanwhile; a stream
//! that cannot send them all ends with an error, never short.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::Status;

use crate::proto;
use crate::query::{Expr, Query};
use crate::server::budget::ExportSlot;
use crate::server::status::to_status;
use crate::storage::Snapshot;

/// Where an export is: everything needed to compute its next batch.
struct Cursor {
    snap: Arc<Snapshot>,
    expr: Arc<Expr>,
    /// "Today" for time windows, fixed when the export began.
    now_ms: i64,
    batch: usize,
    total: u64,
    /// The last id sent.
    after: Option<u32>,
    sent: u64,
    /// No batch follows.
    finished: bool,
}

impl Cursor {
    /// The next batch, or `None` once every row was sent.
    fn next_batch(&mut self) -> Option<Result<proto::ExportResponse, Status>> {
        if self.finished {
            return None;
        }
        let res = self.compute();
        if res.is_err() {
            self.finished = true;
        }
        Some(res)
    }

    fn compute(&mut self) -> Result<proto::ExportResponse, Status> {
        let query = Query::from_expr_at(&self.expr, &self.snap, self.now_ms).map_err(to_status)?;
        let (ids, more) = query.page(self.after, self.batch);
        let mut customers = Vec::with_capacity(ids.len());
        self.snap
            .dict
            .keys_of(&ids, &mut customers)
            .map_err(to_status)?;
        self.sent += ids.len() as u64;
        self.after = ids.last().copied().or(self.after);
        if !more {
            self.finished = true;
            if self.sent != self.total {
                return Err(Status::internal(format!(
                    "export found {} members where it counted {}; the stream is incomplete",
                    self.sent, self.total
                )));
            }
        }
        Ok(proto::ExportResponse {
            customers,
            total: self.total,
        })
    }
}

type Step = (Cursor, Option<Result<proto::ExportResponse, Status>>);

/// The stream `Export` answers with.
pub struct ExportStream {
    idle: Option<Cursor>,
    running: Option<JoinHandle<Step>>,
    _slot: ExportSlot,
}

impl ExportStream {
    /// An export of `expr` (already compiled once on `snap`, with `total`
    /// members) in batches of `batch`.
    pub fn new(
        snap: Arc<Snapshot>,
        expr: Expr,
        now_ms: i64,
        batch: usize,
        total: u64,
        slot: ExportSlot,
    ) -> Self {
        Self {
            idle: Some(Cursor {
                snap,
                expr: Arc::new(expr),
                now_ms,
                batch,
                total,
                after: None,
                sent: 0,
                finished: false,
            }),
            running: None,
            _slot: slot,
        }
    }
}

impl Stream for ExportStream {
    type Item = Result<proto::ExportResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.running.is_none() {
            let Some(mut cursor) = self.idle.take() else {
                return Poll::Ready(None);
            };
            if cursor.finished {
                return Poll::Ready(None);
            }
            self.running = Some(tokio::task::spawn_blocking(move || {
                let item = cursor.next_batch();
                (cursor, item)
            }));
        }
        let Some(task) = self.running.as_mut() else {
            return Poll::Ready(None);
        };
        let joined = std::task::ready!(Pin::new(task).poll(cx));
        self.running = None;
        Poll::Ready(match joined {
            Ok((cursor, item)) => {
                self.idle = Some(cursor);
                item
            }
            Err(e) => Some(Err(Status::internal(format!("export task failed: {e}")))),
        })
    }
}
