//! The scheduler: nightshift's control plane.
//!
//! It alone writes the metadata store. Over gRPC it serves the gateway (`tenants`: API-key
//! authentication and tenant creation; `files`; [`batches`]) and the finalizer (the
//! [`pipeline`] service: plans, finalization leases, commits). In the background it validates
//! new batches ([`batches::Validator`]), hands chunks out fairly ([`pipeline::Dispatcher`]),
//! records chunk results ([`pipeline::consume_results`]), sweeps chunk leases, deadlines and
//! bounded endings ([`pipeline::run_sweeps`]), reclaims expired and deleted files
//! ([`sweep_once`]) and samples its gauges ([`sample_once`]); at start it picks up whatever a
//! previous run left ([`pipeline::recover`]). The background tasks stop when one
//! cancellation token is cancelled, after the server has drained.
//!
//! Every failure is a [`SchedulerError`], mapped once onto the shared error vocabulary: a
//! dependency down is `unavailable`, a uniqueness rule the store refused a `conflict`.
//!
//! gRPC is served on `listen` (HTTP/2, over mutual TLS when `[internal.tls]` is set), every
//! call guarded by the internal token; gRPC health stays there, behind the token, for the
//! scheduler's clients (their `/readyz` pings it). The ops endpoints (`/livez`, `/readyz`,
//! `/metrics`) are plain HTTP on a listener of their own, `ops_listen`, for probes and
//! Prometheus only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::apikey;
use nightshift_core::routing::RoutingConfig;
use nightshift_core::secret::Secret;
use nightshift_metadata::MetadataStore;
use nightshift_proto::tls::TlsFiles;
use nightshift_proto::v1::batches_server::BatchesServer;
use nightshift_proto::v1::files_server::FilesServer;
use nightshift_proto::v1::pipeline_server::PipelineServer;
use nightshift_proto::v1::tenants_server::TenantsServer;
use nightshift_proto::v1::webhooks_server::WebhooksServer;
use nightshift_queue::WorkQueue;
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use nightshift_telemetry::propagation::GrpcServerTraceLayer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod batches;
mod error;
mod files;
mod idempotency;
mod ids;
mod metrics;
mod page;
pub mod pipeline;
mod sampler;
mod sweeper;
mod tenants;
pub mod webhooks;

pub use error::SchedulerError;
pub use sampler::sample_once;
pub use sweeper::sweep_once;

/// The scheduler's own settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// The gRPC services (the gateway, the finalizers, `nightshift admin`).
    pub listen: SocketAddr,
    /// The ops endpoints (`/livez`, `/readyz`, `/metrics`): probes and Prometheus, so bind it
    /// where only they reach. Never on `listen`.
    pub ops_listen: SocketAddr,
    /// A key that is made to exist at start-up, owned by `bootstrap_tenant`; unset = none.
    pub bootstrap_api_key: Option<Secret>,
    pub bootstrap_tenant: String,
    /// How often expired and deleted files are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Files handled per sweep round.
    pub sweep_batch: u32,
    /// Batch input limits and chunk sizes.
    pub batches: batches::BatchSettings,
    /// Dispatch pacing, chunk leases, bounded endings and the periodic sweeps.
    pub pipeline: pipeline::PipelineSettings,
    /// How often the batch and queue gauges (`nightshift_scheduler_batches`,
    /// `nightshift_queue_ready_messages`, ...) are sampled.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Webhook delivery: timeouts, retries, and whether private addresses may be reached.
    pub webhooks: webhooks::WebhookSettings,
    /// Per-tenant quotas: the defaults of every tenant without an override
    /// (`nightshift admin quotas set`).
    pub quotas: QuotaSettings,
    /// Which upstream serves which model: a batch asking for another model fails validation.
    /// Not a key of `[scheduler]`: the binary copies the top-level `[routing]` table here when
    /// it loads the configuration.
    #[serde(skip)]
    pub routing: RoutingConfig,
    /// The secret every gRPC call must carry (`authorization: Bearer <token>`); `serve`
    /// refuses to start without one. Not a key of `[scheduler]`: the binary copies
    /// `[internal] token` here ([`nightshift_proto::auth`]).
    #[serde(skip)]
    pub internal_token: Option<Secret>,
    /// Mutual TLS on `listen`: unset, plain HTTP/2. Not a key of `[scheduler]`: the binary
    /// copies `[internal.tls]` here ([`nightshift_proto::tls`]).
    #[serde(skip)]
    pub internal_tls: Option<TlsFiles>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            ops_listen: DEFAULT_OPS_LISTEN,
            bootstrap_api_key: None,
            bootstrap_tenant: "default".into(),
            sweep_interval: Duration::from_secs(60),
            sweep_batch: 500,
            batches: batches::BatchSettings::default(),
            pipeline: pipeline::PipelineSettings::default(),
            metrics_interval: Duration::from_secs(15),
            webhooks: webhooks::WebhookSettings::default(),
            quotas: QuotaSettings::default(),
            routing: RoutingConfig::default(),
            internal_token: None,
            internal_tls: None,
        }
    }
}

/// Where the scheduler serves its ops endpoints unless `ops_listen` says otherwise.
pub const DEFAULT_OPS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9094);

/// `[scheduler.quotas]`: the quotas of every tenant that has no override of its own. 0 =
/// unlimited. Generous by default: they stop a runaway client, not ordinary use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaSettings {
    /// Batches validating, in progress, finalizing or cancelling at once; one more is refused
    /// at create (429 `active_batch_limit_exceeded`).
    pub max_active_batches: u64,
    /// Requests (lines) of those batches together; a batch that would pass it fails at
    /// validation (`errors.data[].code` `request_limit_exceeded`).
    pub max_enqueued_requests: u64,
    /// Bytes of the tenant's visible files (uploads and results); an upload that would pass it
    /// is refused and not stored (400 `storage_quota_exceeded`).
    pub max_stored_bytes: u64,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            max_active_batches: 1_000,
            // 1,000 batches of OpenAI's 50,000 lines.
            max_enqueued_requests: 50_000_000,
            // OpenAI's organization file storage limit.
            max_stored_bytes: 100 << 30,
        }
    }
}

impl From<QuotaSettings> for nightshift_metadata::Quotas {
    fn from(q: QuotaSettings) -> Self {
        Self {
            max_active_batches: q.max_active_batches,
            max_enqueued_requests: q.max_enqueued_requests,
            max_stored_bytes: q.max_stored_bytes,
        }
    }
}

/// The infrastructure the scheduler runs on; the binary picks the adapters.
#[derive(Debug, Clone)]
pub struct SchedulerPorts {
    pub metadata: Arc<dyn MetadataStore>,
    pub storage: Arc<dyn ObjectStore>,
    /// Chunk tasks out, chunk results in, finalize jobs out.
    pub queue: Arc<dyn WorkQueue>,
    /// Cancel flags for executors (Postgres stays the truth).
    pub state: Arc<dyn LiveState>,
}

/// Failures that stop the scheduler from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("metadata store: {0}")]
    Bootstrap(#[from] nightshift_metadata::MetadataError),
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
    /// No usable internal token: the gRPC API would be open to anyone who reaches the port.
    #[error("{0}")]
    Token(#[from] nightshift_proto::auth::TokenError),
    /// `[internal.tls]` is set but its files cannot be read.
    #[error("{0}")]
    Tls(#[from] nightshift_proto::tls::TlsError),
    /// The gRPC server failed: its TLS material does not parse, or serving failed.
    #[error("grpc: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs the scheduler — gRPC on `listener`, the ops endpoints on `ops_listener` — until
/// `shutdown` is cancelled, then drains in-flight calls and stops the background tasks.
/// `config` was validated when it was loaded.
///
/// In order: the bootstrap tenant is made to exist, whatever a previous run left is picked
/// up ([`recover`]), then the gRPC services and the ops endpoints are served while the
/// background tasks run ([`spawn_background`]); the scheduler answers its health check and
/// `/readyz` only once it has recovered.
///
/// # Errors
/// No usable internal token, unreadable or unparsable TLS files, the metadata store failed at
/// start (bootstrap tenant, recovery), or a listener's I/O error.
pub async fn serve(
    config: SchedulerConfig,
    ports: SchedulerPorts,
    listener: TcpListener,
    ops_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    metrics::register();
    let require_token = nightshift_proto::auth::server_layer(config.internal_token.as_ref())?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &config.internal_tls {
        // parsed here: a bad certificate or key stops the start, not the first call
        server = server.tls_config(tls.server_config()?)?;
    }
    bootstrap_tenant(&config, &ports).await?;

    let wake = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    // the background tasks stop however serve ends: returned, failed or dropped
    let _stop_on_exit = stop.clone().drop_guard();
    let validator = batches::Validator::new(
        ports.clone(),
        config.batches.clone(),
        config.routing.clone(),
        config.quotas.into(),
        wake.clone(),
        stop.clone(),
    );
    recover(&config, &ports, &validator).await?;

    let routes = grpc_routes(&config, &ports, validator).await;
    let background = spawn_background(&config, &ports, &wake, &stop);

    // The ops endpoints stay up until the gRPC calls have drained.
    let stop_ops = CancellationToken::new();
    tracing::info!(
        addr = %listener.local_addr()?,
        ops = %ops_listener.local_addr()?,
        tls = config.internal_tls.is_some(),
        "scheduler listening"
    );
    let ops = tokio::spawn(
        axum::serve(
            ops_listener,
            nightshift_telemetry::ops_router(readiness(&ports)),
        )
        .with_graceful_shutdown(stop_ops.clone().cancelled_owned())
        .into_future(),
    );
    let served = server
        // every gRPC call, to any service registered, gRPC health included, carries the
        // internal token; each call joins its caller's trace
        .layer(require_token)
        .layer(GrpcServerTraceLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown.cancelled_owned(),
        )
        .await;
    stop_ops.cancel();
    let ops = ops.await.map_err(std::io::Error::other);
    stop.cancel();
    for task in background {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a scheduler background task panicked");
        }
    }
    tracing::info!("scheduler stopped");
    served?;
    ops??;
    Ok(())
}

/// Makes the configured bootstrap key exist, owned by `bootstrap_tenant` (if a key is set).
async fn bootstrap_tenant(
    config: &SchedulerConfig,
    ports: &SchedulerPorts,
) -> Result<(), ServeError> {
    if let Some(key) = config.bootstrap_api_key.as_ref().filter(|k| !k.is_empty()) {
        let tenant = ports
            .metadata
            .ensure_tenant(&config.bootstrap_tenant, &apikey::digest(key.expose()))
            .await?;
        tracing::info!(tenant_id = %tenant.id, tenant = %tenant.name, "bootstrap tenant ready");
    }
    Ok(())
}

/// Picks up what a previous run left: batches still validating are validated again; chunks
/// in flight, pending finalize jobs and cancel flags are published again.
async fn recover(
    config: &SchedulerConfig,
    ports: &SchedulerPorts,
    validator: &batches::Validator,
) -> Result<(), ServeError> {
    // Retries whose input is not built yet are built first (`batches::recover`).
    let recovered = batches::recover(ports, validator)
        .await
        .map_err(ServeError::Bootstrap)?;
    if recovered > 0 {
        tracing::info!(
            batches = recovered,
            "resuming validation of batches left validating"
        );
    }
    let recovery = pipeline::recover(ports, &config.pipeline).await;
    if recovery != pipeline::Recovery::default() {
        tracing::info!(
            chunks = recovery.chunks,
            finalize_jobs = recovery.finalize_jobs,
            cancel_flags = recovery.cancel_flags,
            errors = recovery.errors,
            "picked up the work of a previous run"
        );
    }
    Ok(())
}

/// The gRPC services (`Tenants`, `Files`, `Batches`, `Pipeline`, `Webhooks`) and gRPC health.
async fn grpc_routes(
    config: &SchedulerConfig,
    ports: &SchedulerPorts,
    validator: batches::Validator,
) -> tonic::service::Routes {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FilesServer<files::FilesService>>()
        .await;
    tonic::service::Routes::new(health_service)
        .add_service(TenantsServer::new(tenants::TenantsService::new(
            ports.clone(),
            config.quotas.into(),
        )))
        .add_service(FilesServer::new(files::FilesService::new(
            ports.clone(),
            config.quotas.into(),
        )))
        .add_service(BatchesServer::new(batches::BatchesService::new(
            ports.clone(),
            validator,
            config.pipeline.clone(),
        )))
        .add_service(PipelineServer::new(pipeline::PipelineService::new(
            ports.clone(),
        )))
        .add_service(WebhooksServer::new(webhooks::WebhooksService::new(
            ports.clone(),
            config.webhooks.clone(),
        )))
}

/// `/readyz`: whether this scheduler can do its main job — the metadata store (every call
/// and transition) and the queue (dispatch, results, finalize jobs) answer. Redis is a view
/// (live counts, cancel flags re-raised at recovery) and object storage is shared by every
/// replica: an outage of either degrades the work but taking this pod out of its Service
/// would not help, so neither is checked here.
fn readiness(ports: &SchedulerPorts) -> Readiness {
    let (m, q) = (ports.metadata.clone(), ports.queue.clone());
    Readiness::new()
        .check("queue", move || {
            let q = q.clone();
            async move { q.ping().await.map_err(|e| e.to_string()) }
        })
        .check("metadata", move || {
            let m = m.clone();
            async move { m.ping().await.map_err(|e| e.to_string()) }
        })
}

/// The background tasks, until `stop` is cancelled: the file sweeper, the gauge sampler, the
/// dispatcher, the chunk-result consumer and the pipeline sweeps (`wake` makes the dispatcher
/// look for work at once).
fn spawn_background(
    config: &SchedulerConfig,
    ports: &SchedulerPorts,
    wake: &Arc<tokio::sync::Notify>,
    stop: &CancellationToken,
) -> [tokio::task::JoinHandle<()>; 6] {
    let dispatcher = pipeline::Dispatcher::new(ports.clone(), config.pipeline.clone());
    [
        tokio::spawn(sweeper::run(
            ports.clone(),
            config.sweep_interval,
            config.sweep_batch,
            stop.clone(),
        )),
        tokio::spawn(sampler::run(
            ports.clone(),
            config.metrics_interval,
            stop.clone(),
        )),
        tokio::spawn(dispatcher.run(wake.clone(), stop.clone())),
        tokio::spawn(pipeline::consume_results(
            ports.clone(),
            config.pipeline.clone(),
            wake.clone(),
            stop.clone(),
        )),
        tokio::spawn(pipeline::run_sweeps(
            ports.clone(),
            config.pipeline.clone(),
            wake.clone(),
            stop.clone(),
        )),
        tokio::spawn(webhooks::run(
            ports.clone(),
            config.webhooks.clone(),
            stop.clone(),
        )),
    ]
}
