//! Bounds on what calls in flight may hold: a server-wide budget for the
//! bytes of request bodies, counted as each frame arrives and given back when
//! the call ends, and a cap on the exports streaming at once. Owns only the
//! accounting; it never looks inside a message (the service does that) and
//! never touches the engine.
//!
//! Worst case: the bytes received by calls in progress never exceed the
//! budget plus [`FREE_BYTES`] for each call; decoded, a request takes about
//! one to three times its wire size (a customer key is a `String`), so the
//! requests in flight hold at most about three times the budget. A call that
//! would pass the budget fails with `RESOURCE_EXHAUSTED` and frees what it
//! held; the others go on.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

/// The first bytes of every request are not counted against the budget, so
/// that small calls (a count, a profile) keep working while large uploads
/// hold all of it.
pub const FREE_BYTES: u64 = 64 << 10;

/// The server-wide budget for request bytes in flight.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held now by calls in flight.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes held of the budget by one message of a stream that gives them back
/// as it goes (`Ingest`), until dropped.
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: u64,
}

impl Reservation {
    /// `bytes` of the budget, or `None` if it cannot hold them now.
    pub fn take(budget: &Arc<MemoryBudget>, bytes: u64) -> Option<Reservation> {
        budget.try_take(bytes).then(|| Reservation {
            budget: budget.clone(),
            bytes,
        })
    }

    /// Holds `more`'s bytes as well (both of the same budget), until this
    /// reservation is dropped.
    pub fn absorb(&mut self, mut more: Reservation) {
        debug_assert!(Arc::ptr_eq(&self.budget, &more.budget));
        self.bytes += std::mem::take(&mut more.bytes);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Calls whose streams hold their bytes by [`Reservation`] per message
/// instead of for the whole call: a long stream must not hold all it ever
/// sent.
const SELF_METERED: &[&str] = &["/tagstore.v1.TagStore/Ingest"];

/// What one call holds of the budget; given back when the last of the call's
/// future and its request body is dropped.
struct Held {
    budget: Arc<MemoryBudget>,
    /// Bytes received so far (counted ones and free ones).
    received: AtomicU64,
    /// Bytes taken from the budget.
    taken: AtomicU64,
}

impl Held {
    /// Counts `n` more bytes; false if the budget cannot hold them.
    fn receive(&self, n: u64) -> bool {
        let before = self.received.fetch_add(n, Ordering::Relaxed);
        let counted = (before + n).saturating_sub(FREE_BYTES) - before.saturating_sub(FREE_BYTES);
        if counted == 0 {
            return true;
        }
        if self.budget.try_take(counted) {
            self.taken.fetch_add(counted, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(*self.taken.get_mut());
    }
}

/// A request body whose frames are counted against the budget as they arrive.
struct MeteredBody {
    inner: Body,
    held: Arc<Held>,
    failed: bool,
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && !self.held.receive(data.len() as u64)
        {
            self.failed = true;
            let budget = &self.held.budget;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "the server's memory for requests in flight ({} MiB, `max_request_memory_mb`) \
                 is in use by other calls; send a smaller request or retry later",
                budget.limit() >> 20
            )))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a gRPC service so that every call's request body is metered.
#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    budget: Arc<MemoryBudget>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, budget: Arc<MemoryBudget>) -> Self {
        Self { inner, budget }
    }
}

impl<S: NamedService> NamedService for Metered<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower_service::Service<http::Request<Body>> for Metered<S>
where
    S: tower_service::Service<http::Request<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<S::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if SELF_METERED.contains(&req.uri().path()) {
            let call = self.inner.call(req);
            return Box::pin(call);
        }
        let held = Arc::new(Held {
            budget: self.budget.clone(),
            received: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        });
        let (parts, body) = req.into_parts();
        let body = Body::new(MeteredBody {
            inner: body,
            held: held.clone(),
            failed: false,
        });
        let call = self.inner.call(http::Request::from_parts(parts, body));
        Box::pin(async move {
            let res = call.await;
            // The handler is done with the decoded request.
            drop(held);
            res
        })
    }
}

/// The exports streaming now, under a cap.
#[derive(Debug)]
pub struct ExportSlots {
    cap: usize,
    open: AtomicUsize,
    /// What a slot is for, and the setting that caps them, for the refusal.
    what: &'static str,
    setting: &'static str,
}

impl ExportSlots {
    pub fn new(cap: usize) -> Arc<Self> {
        Self::named(cap, "exports are streaming", "max_concurrent_exports")
    }

    /// Slots of another kind of stream (`Watch`).
    pub fn named(cap: usize, what: &'static str, setting: &'static str) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: AtomicUsize::new(0),
            what,
            setting,
        })
    }

    /// A slot for one more export, or `RESOURCE_EXHAUSTED` when all are taken.
    pub fn take(self: &Arc<Self>) -> Result<ExportSlot, Status> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok();
        if taken {
            Ok(ExportSlot(self.clone()))
        } else {
            Err(Status::resource_exhausted(format!(
                "{} {} already (`{}`); retry when one ends",
                self.cap, self.what, self.setting
            )))
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// One export's slot, given back when its stream is dropped (finished,
/// failed or abandoned by the client).
#[derive(Debug)]
pub struct ExportSlot(Arc<ExportSlots>);

impl Drop for ExportSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_are_free_and_the_rest_is_given_back() {
        let budget = MemoryBudget::new(1 << 20);
        let a = Held {
            budget: budget.clone(),
            received: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        };
        assert!(a.receive(FREE_BYTES - 1));
        assert_eq!(budget.used(), 0);
        assert!(a.receive(2));
        assert_eq!(budget.used(), 1);
        assert!(a.receive((1 << 20) - 1));
        assert_eq!(budget.used(), 1 << 20);
        assert!(!a.receive(1), "over the budget");
        let b = Held {
            budget: budget.clone(),
            received: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        };
        assert!(b.receive(1000), "small calls still pass");
        drop(a);
        assert_eq!(budget.used(), 0);
        drop(b);
    }

    #[test]
    fn export_slots_are_capped_and_come_back() {
        let slots = ExportSlots::new(2);
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        assert_eq!(
            slots.take().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        drop(a);
        assert!(slots.take().is_ok());
    }
}
