//! The gRPC server: owns the network side (listening, the `tagstore.v1`
//! service, health and reflection, graceful shutdown). Requests become domain
//! operations here; the storage engine never sees a proto type.

mod admin;
mod audiences;
mod audit;
pub mod auth;
mod backup;
pub mod budget;
mod export;
mod fields;
pub mod history;
mod ingest;
mod metrics;
mod past;
mod reads;
mod rebuild;
mod rules;
mod scope;
pub mod service;
pub mod status;
pub mod tls;
mod unmerge;
mod watch;
mod writes;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::proto::tag_store_server::TagStoreServer;
use crate::storage::Engine;
use budget::{MemoryBudget, Metered};
pub use ingest::{RECORDS_AHEAD, RECORDS_AHEAD_BYTES};
pub use service::Service;

/// Lowers the calling thread's priority to `nice` (19: the lowest), for
/// work that must yield the CPU to writes and reads (the watchers' thread,
/// a backup's); a refusal is logged, naming `what`, and the work runs at
/// the server's priority.
pub(crate) fn lower_priority(nice: i32, what: &str) {
    // SAFETY: setpriority on this thread's own id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "{what} runs at the server's priority"
        );
    }
}

/// Reads the tokens file and the TLS files again on each SIGHUP, for as
/// long as the process runs.
fn reload_on_hangup(keys: Option<Arc<auth::Keys>>, tls: Option<Arc<tls::Tls>>) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if keys.is_none() && tls.is_none() {
                        tracing::info!("SIGHUP: no tokens file and no TLS files to read again");
                    }
                    if let Some(k) = &keys {
                        k.reload();
                    }
                    if let Some(t) = &tls {
                        t.reload();
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: tokens and certificates are read at start only")
        }
    }
}

/// Where the server listens, once bound.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub grpc: SocketAddr,
    /// The metrics endpoint, when there is one.
    pub metrics: Option<SocketAddr>,
}

/// Sleeps for `wait`; false, at once, when the server starts closing (or
/// has closed) instead: a background task then ends.
async fn sleep_unless_closing(
    wait: std::time::Duration,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    if *closing.borrow() {
        return false;
    }
    let slept = tokio::select! {
        _ = tokio::time::sleep(wait) => true,
        _ = closing.wait_for(|c| *c) => false,
    };
    slept && !*closing.borrow()
}

/// Opens the engine, serves until `shutdown` resolves, then finishes the
/// requests in flight and writes a final checkpoint. `on_listening` is called
/// with the bound addresses (useful with port 0).
pub async fn serve(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(Listening),
) -> Result<()> {
    let engine_config = config.engine.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::open(engine_config))
        .await
        .map_err(|e| Error::Config(format!("engine start-up task failed: {e}")))??;
    let engine = Arc::new(engine);
    let rec = engine.recovery();
    let snap = engine.snapshot();
    tracing::info!(
        data_dir = %config.engine.data_dir.display(),
        tags = snap.tags.len(),
        checkpoint_lsn = rec.checkpoint_lsn,
        last_lsn = rec.last_lsn,
        replayed = rec.records_replayed,
        ms = rec.duration.as_millis() as u64,
        "storage recovered"
    );
    if let Some(t) = &rec.torn_tail {
        tracing::warn!("{t}");
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::io(format!("listen address {}", config.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("listen address {}", config.listen), e))?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TagStoreServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Config(format!("reflection service: {e}")))?;
    // Many tools (older grpcurl, some IDE plugins) still ask v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Config(format!("reflection service (v1alpha): {e}")))?;
    let limit = config.limits.max_message_bytes;
    let budget = MemoryBudget::new(config.limits.max_request_memory_mb.saturating_mul(1 << 20));
    let audit = {
        let cfg = &config.engine;
        crate::audit::Audit::open(
            crate::storage::DataDir::new(cfg.fs.clone(), cfg.data_dir.clone()),
            config.audit,
            cfg.clock.clone(),
        )?
    };
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        closing_tx.send_replace(true);
    };
    let consumers = crate::kafka::Consumers::start(
        engine.clone(),
        config.facts.clone(),
        tokio::runtime::Handle::current(),
        crate::kafka::Program::this_executable(),
    )
    .map_err(|e| Error::io("the Kafka consumers' thread", e))?;
    let service = TagStoreServer::new(
        Service::new(
            engine.clone(),
            config.limits,
            config.default_time_zone.clone(),
            budget.clone(),
            config.facts.clone(),
            closing.clone(),
            audit.clone(),
        )
        .with_kafka(consumers.clone()),
    )
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let service = Metered::new(service, budget.clone());
    // The background tasks end when the server starts closing, so that
    // once `serve` returns nothing holds the engine (or its lock).
    history::start_recorder(
        engine.clone(),
        config.default_time_zone.clone(),
        closing.clone(),
    );
    rules::start_day_turner(engine.clone(), closing.clone());
    if let Some(every) = config.refund_rebuild_every {
        rebuild::start_refund_rebuilder(
            engine.clone(),
            Arc::new(config.facts.clone()),
            every,
            closing.clone(),
        );
    }
    let tls = match &config.tls {
        Some(files) => {
            let tls = tls::Tls::load(files.clone())?;
            tracing::info!(cert = %files.cert.display(), client_certificates = files.client_ca.is_some(), "TLS on");
            Some(tls)
        }
        None => {
            if config.tokens.is_some() && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "no TLS: tokens and customer data cross the network in plain text (give --tls-cert and --tls-key, or put a TLS proxy in front)");
            }
            None
        }
    };
    let keys = match &config.tokens {
        Some(path) => {
            let keys = auth::Keys::load(path.clone())?;
            tracing::info!(path = %path.display(), tokens = keys.count(), "access control: every call needs a token");
            Some(keys)
        }
        None if config.open_without_tokens => {
            tracing::warn!(%addr, "no tokens file, and told to be open: anyone who reaches the port may read, change and erase every customer");
            None
        }
        None => {
            tracing::warn!(%addr, "no tokens file: serving without access control, on loopback only (give --tokens to serve beyond it)");
            None
        }
    };
    // Always: without a handler SIGHUP would end the process.
    reload_on_hangup(keys.clone(), tls.clone());
    let service = auth::Guarded::new(service, keys);
    let calls = metrics::Calls::new();
    let service = metrics::Counted::new(service, calls.clone());
    let metrics_addr = match config.metrics_listen {
        None => None,
        Some(at) => {
            let (listener, bound) = metrics::bind(at).await?;
            if !bound.ip().is_loopback() {
                tracing::warn!(%bound, "metrics beyond loopback: anyone who reaches the port sees the store's size and its calls (no customer data)");
            }
            metrics::start(
                listener,
                engine.clone(),
                calls,
                budget.clone(),
                Some(consumers.clone()),
                audit.clone(),
                closing.clone(),
            );
            tracing::info!(%bound, "metrics at GET /metrics");
            Some(bound)
        }
    };

    on_listening(Listening {
        grpc: addr,
        metrics: metrics_addr,
    });
    tracing::info!(%addr, "serving tagstore.v1.TagStore");
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let served = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    // Small responses must not wait for Nagle's algorithm (a 40 ms stall per call).
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await
        }
    };
    health.set_not_serving::<TagStoreServer<Service>>().await;
    tracing::info!("stopped accepting requests; writing the final checkpoint");
    let closing = engine.clone();
    let trail = audit.clone();
    let closed = tokio::task::spawn_blocking(move || {
        // Consumers finish the batch they are writing, and stop.
        consumers.shutdown();
        trail.close();
        closing.shutdown()
    })
    .await
    .map_err(|e| Error::Config(format!("shutdown task failed: {e}")))?;
    served.map_err(|e| Error::io(format!("gRPC server on {addr}"), std::io::Error::other(e)))?;
    closed
}
