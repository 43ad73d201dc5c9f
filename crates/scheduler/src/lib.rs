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
//! The same port serves gRPC and the ops endpoints (`/livez`, `/readyz`, `/metrics`), HTTP/1
//! and HTTP/2 alike.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nightshift_core::apikey;
use nightshift_core::routing::RoutingConfig;
use nightshift_core::secret::Secret;
use nightshift_metadata::MetadataStore;
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
    /// gRPC + ops endpoints.
    pub listen: SocketAddr,
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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
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
        }
    }
}

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
}

/// Runs the scheduler on `listener` until `shutdown` is cancelled, then drains in-flight calls
/// and stops the background tasks. `config` was validated when it was loaded.
///
/// In order: the bootstrap tenant is made to exist, whatever a previous run left is picked
/// up ([`recover`]), then the gRPC services and the ops endpoints are served while the
/// background tasks run ([`spawn_background`]); the scheduler answers its health check only
/// once it has recovered.
///
/// # Errors
/// The metadata store failed at start (bootstrap tenant, recovery), or the listener's I/O
/// error.
pub async fn serve(
    config: SchedulerConfig,
    ports: SchedulerPorts,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    metrics::register();
    let require_token = nightshift_proto::auth::server_layer(config.internal_token.as_ref())?;
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

    let app = grpc_router(&config, &ports, validator)
        .await
        // every gRPC call, to any service registered above, carries the internal token; the
        // ops endpoints merged below are plain HTTP and need none
        .layer(require_token)
        .merge(nightshift_telemetry::ops_router(readiness(&ports)));
    let background = spawn_background(&config, &ports, &wake, &stop);

    tracing::info!(addr = %listener.local_addr()?, "scheduler listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    stop.cancel();
    for task in background {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a scheduler background task panicked");
        }
    }
    tracing::info!("scheduler stopped");
    served.map_err(ServeError::Io)
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

/// The gRPC services (`Tenants`, `Files`, `Batches`, `Pipeline`) and gRPC health, each call
/// in a span of its caller's trace.
async fn grpc_router(
    config: &SchedulerConfig,
    ports: &SchedulerPorts,
    validator: batches::Validator,
) -> axum::Router {
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
        .prepare()
        .into_axum_router()
        // every call joins its caller's trace
        .layer(GrpcServerTraceLayer)
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
