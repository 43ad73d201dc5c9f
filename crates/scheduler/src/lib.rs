//! The scheduler: nightshift's control plane.
//!
//! It alone owns the metadata store. Over gRPC it serves the gateway (tenants, API keys,
//! files, batches) and the finalizer (plans, finalization leases, commits); in the
//! background it validates batches, dispatches chunks, tracks their results and leases,
//! applies deadlines and bounded endings, and sweeps expired and deleted files. The same port serves gRPC
//! and the ops endpoints (`/livez`, `/readyz`, `/metrics`), HTTP/1 and HTTP/2 alike.

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
mod ids;
mod metrics;
pub mod pipeline;
mod sampler;
mod sweeper;
mod tenants;

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
        }
    }
}

/// The infrastructure the scheduler runs on; the binary picks the adapters.
#[derive(Debug, Clone)]
pub struct Ports {
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
}

/// Runs the scheduler on `listener` until `shutdown` resolves, then drains in-flight calls
/// and stops the background tasks.
pub async fn serve(
    config: SchedulerConfig,
    routing: RoutingConfig,
    ports: Ports,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    metrics::register();
    if let Some(key) = config.bootstrap_api_key.as_ref().filter(|k| !k.is_empty()) {
        let tenant = ports
            .metadata
            .ensure_tenant(&config.bootstrap_tenant, &apikey::digest(key.expose()))
            .await?;
        tracing::info!(tenant_id = %tenant.id, tenant = %tenant.name, "bootstrap tenant ready");
    }

    let wake = Arc::new(tokio::sync::Notify::new());
    let stop = CancellationToken::new();
    // the background tasks stop however serve ends: returned, failed or dropped
    let _stop_on_exit = stop.clone().drop_guard();
    let validator = batches::Validator::new(
        ports.clone(),
        config.batches.clone(),
        routing,
        wake.clone(),
        stop.clone(),
    );
    let recovered = validator.recover().await.map_err(ServeError::Bootstrap)?;
    if recovered > 0 {
        tracing::info!(
            batches = recovered,
            "resuming validation of batches left validating"
        );
    }

    let recovery = pipeline::recover(&ports, &config.pipeline).await;
    if recovery != pipeline::Recovery::default() {
        tracing::info!(
            chunks = recovery.chunks,
            finalize_jobs = recovery.finalize_jobs,
            cancel_flags = recovery.cancel_flags,
            errors = recovery.errors,
            "picked up the work of a previous run"
        );
    }
    let dispatcher = pipeline::Dispatcher::new(ports.clone(), config.pipeline.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<FilesServer<files::FilesService>>()
        .await;
    let grpc = tonic::service::Routes::new(health_service)
        .add_service(TenantsServer::new(tenants::TenantsService::new(
            ports.clone(),
        )))
        .add_service(FilesServer::new(files::FilesService::new(ports.clone())))
        .add_service(BatchesServer::new(batches::BatchesService::new(
            ports.clone(),
            validator,
            config.pipeline.clone(),
        )))
        .add_service(PipelineServer::new(pipeline::PipelineService::new(
            ports.clone(),
        )))
        .prepare()
        .into_axum_router()
        // every call joins its caller's trace
        .layer(GrpcServerTraceLayer);

    let readiness = {
        let (m, s) = (ports.metadata.clone(), ports.storage.clone());
        let (q, st) = (ports.queue.clone(), ports.state.clone());
        Readiness::new()
            .check("queue", move || {
                let q = q.clone();
                async move { q.ping().await.map_err(|e| e.to_string()) }
            })
            .check("live_state", move || {
                let st = st.clone();
                async move { st.ping().await.map_err(|e| e.to_string()) }
            })
            .check("metadata", move || {
                let m = m.clone();
                async move { m.ping().await.map_err(|e| e.to_string()) }
            })
            .check("object_storage", move || {
                let s = s.clone();
                async move { s.ping().await.map_err(|e| e.to_string()) }
            })
    };
    let app = grpc.merge(nightshift_telemetry::ops_router(readiness));

    let sweeper = tokio::spawn(sweeper::run(
        ports.clone(),
        config.sweep_interval,
        config.sweep_batch,
        stop.clone(),
    ));
    let background = [
        sweeper,
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
    ];

    tracing::info!(addr = %listener.local_addr()?, "scheduler listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.cancel();
    for task in background {
        let _ = task.await;
    }
    tracing::info!("scheduler stopped");
    served.map_err(ServeError::Io)
}
