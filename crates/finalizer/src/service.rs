//! The finalizer service: consumes finalize jobs, assembles each batch's files, commits the
//! batch's terminal state through the scheduler, then cleans up.
//!
//! Per job (a `FinalizeJob` from the finalize-jobs queue):
//! 1. decode it — an undecodable job, or one naming a malformed batch id, is dead-lettered;
//! 2. ask the scheduler for the batch's [`FinalizePlan`] (`GetFinalizePlan`) — a batch the
//!    scheduler does not know is dead-lettered;
//! 3. if the batch is already terminal (the job was delivered again after an earlier run
//!    committed), only clean up and ack;
//! 4. otherwise [`assemble::finalize`] the files, `CommitBatch` (files, counts, usage; the
//!    scheduler records them and the terminal status in one transaction, idempotently), clean
//!    up, ack.
//!
//! Any failure before the commit requeues the job after a backoff (doubling with each earlier
//! delivery), so a re-run overwrites the same deterministic objects; the queue's delivery limit
//! dead-letters a job that keeps failing. Clean-up — deleting the batch's result parts and its
//! live state — only happens after the commit, and its failures are logged, not fatal: the
//! parts are garbage by then, not results.
//!
//! Shutdown: stop taking jobs, let the jobs in hand finish within `shutdown_grace`, then
//! interrupt the rest and requeue them (a job interrupted after its commit is harmless: its
//! next delivery finds the batch terminal).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchStatus, parts_prefix};
use nightshift_proto::v1::pipeline_client::PipelineClient;
use nightshift_proto::v1::{self, CommitBatchRequest, FinalizeJob, GetFinalizePlanRequest};
use nightshift_queue::{Consumer, Delivery, QueueKind, WorkQueue};
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use nightshift_telemetry::propagation::{self, TraceContextInterceptor};
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;

use crate::assemble::{self, AssembleSettings, BatchFiles, FinalizeError, ProducedFile};
use crate::metrics;
use crate::plan::{self, Ending, FinalizePlan, PlanError};

/// Version of the `FinalizeJob` messages this finalizer reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest `FinalizePlan` accepted from the scheduler. A plan lists every chunk (about 30
/// bytes each), so this allows batches of about two million chunks.
const MAX_PLAN_BYTES: usize = 64 * 1024 * 1024;

/// The finalizer's own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinalizerConfig {
    /// Ops endpoints: `/livez`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
    /// The scheduler's gRPC endpoint (its `Pipeline` service and gRPC health).
    pub scheduler_url: String,
    /// Finalize jobs handled at once (≥ 1). Memory grows with it: each job holds one line of
    /// at most `max_line_bytes` plus two uploads' buffers (see the storage's `part_size`).
    pub prefetch: u16,
    /// Longest line accepted in a result part or in an input file (terminator excluded); a
    /// longer line fails the job. At least the scheduler's input line limit, and the longest
    /// result line executors write.
    pub max_line_bytes: usize,
    /// Deadline of each call to the scheduler.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// After shutdown is asked, how long the jobs in hand may take to finish before they are
    /// interrupted and requeued.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Delay before a failed job is requeued, doubled for each earlier delivery of it; also
    /// the first delay before reconnecting to the queue.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of those delays.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

impl Default for FinalizerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9093)),
            scheduler_url: "http://127.0.0.1:50051".into(),
            prefetch: 2,
            max_line_bytes: AssembleSettings::default().max_line_bytes,
            control_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            retry_backoff: Duration::from_secs(2),
            retry_backoff_max: Duration::from_secs(60),
        }
    }
}

impl FinalizerConfig {
    /// Checks what serde cannot: `prefetch ≥ 1`, `max_line_bytes ≥ 1`, a usable URL.
    pub fn validate(&self) -> Result<(), ServeError> {
        if self.prefetch == 0 {
            return Err(ServeError::Config(
                "finalizer.prefetch must be at least 1".into(),
            ));
        }
        if self.max_line_bytes == 0 {
            return Err(ServeError::Config(
                "finalizer.max_line_bytes must be at least 1".into(),
            ));
        }
        Endpoint::from_shared(self.scheduler_url.clone())
            .map_err(|e| ServeError::Config(format!("finalizer.scheduler_url: {e}")))?;
        Ok(())
    }
}

/// The infrastructure the finalizer runs on; the binary picks the adapters.
#[derive(Debug, Clone)]
pub struct FinalizerPorts {
    /// Result parts (read, then deleted), batch inputs (read) and result files (written).
    pub storage: Arc<dyn ObjectStore>,
    /// Source of the finalize jobs.
    pub queue: Arc<dyn WorkQueue>,
    /// Live counts of running batches, cleared once a batch is committed.
    pub state: Arc<dyn LiveState>,
}

/// Failures that stop the finalizer from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The ops listener failed.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the finalizer until `shutdown` resolves: serves the ops endpoints on `listener` and
/// consumes finalize jobs; then stops taking jobs, finishes (or, past `shutdown_grace`,
/// requeues) the jobs in hand, and returns.
///
/// The queue and the scheduler may be down at start or at any time: the finalizer keeps
/// retrying (and `/readyz` says what is missing) rather than exiting.
pub async fn serve(
    config: FinalizerConfig,
    ports: FinalizerPorts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let scheduler = Scheduler::connect_lazy(&config.scheduler_url, config.control_timeout)
        .map_err(|e| ServeError::Config(format!("finalizer.scheduler_url: {e}")))?;
    metrics::describe();
    metrics::register();

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    // The ops endpoints stay up until every job in hand is settled.
    let addr = listener.local_addr()?;
    let (ops_stop_tx, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let ops = axum::serve(
        listener,
        nightshift_telemetry::ops_router(readiness(&ports, &scheduler)),
    )
    .with_graceful_shutdown(async move {
        let _ = ops_stop_rx.await;
    });
    let ops = tokio::spawn(async move { ops.await });

    tracing::info!(addr = %addr, scheduler = %config.scheduler_url, prefetch = config.prefetch, "finalizer listening");
    let worker = Arc::new(Worker {
        settings: AssembleSettings {
            max_line_bytes: config.max_line_bytes,
        },
        config,
        ports,
        scheduler,
    });
    worker.run(stop_rx).await;

    let _ = ops_stop_tx.send(());
    let served = ops.await.map_err(std::io::Error::other)?;
    tracing::info!("finalizer stopped");
    served.map_err(ServeError::Io)
}

fn readiness(ports: &FinalizerPorts, scheduler: &Scheduler) -> Readiness {
    let (storage, queue, state, scheduler) = (
        ports.storage.clone(),
        ports.queue.clone(),
        ports.state.clone(),
        scheduler.clone(),
    );
    Readiness::new()
        .check("object_storage", move || {
            let s = storage.clone();
            async move { s.ping().await.map_err(|e| e.to_string()) }
        })
        .check("queue", move || {
            let q = queue.clone();
            async move { q.ping().await.map_err(|e| e.to_string()) }
        })
        .check("live_state", move || {
            let s = state.clone();
            async move { s.ping().await.map_err(|e| e.to_string()) }
        })
        .check("scheduler", move || {
            let s = scheduler.clone();
            async move { s.ping().await }
        })
}

/// The scheduler's `Pipeline` service over one lazily connected channel.
#[derive(Clone, Debug)]
struct Scheduler {
    channel: Channel,
}

impl Scheduler {
    /// Connects lazily: the finalizer starts (and reports not-ready) while the scheduler is
    /// down.
    fn connect_lazy(url: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .connect_lazy();
        Ok(Self { channel })
    }

    /// The `Pipeline` client; each call carries the trace context of the span it is made in
    /// (the job's `finalize` span).
    fn pipeline(&self) -> PipelineClient<InterceptedService<Channel, TraceContextInterceptor>> {
        PipelineClient::with_interceptor(self.channel.clone(), TraceContextInterceptor)
            .max_decoding_message_size(MAX_PLAN_BYTES)
    }

    /// Whether the scheduler answers the standard gRPC health check.
    async fn ping(&self) -> Result<(), String> {
        HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("scheduler: {}", s.message()))
    }
}

/// Why a job did not finish. [`JobError::dead_letters`] says what becomes of it.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("undecodable finalize job: {0}")]
    BadPayload(String),
    #[error("the scheduler does not know the batch: {0}")]
    UnknownBatch(String),
    #[error("asking the scheduler for the finalize plan: {0}")]
    Plan(String),
    #[error("unusable finalize plan: {0}")]
    BadPlan(#[from] PlanError),
    #[error("assembling the files: {0}")]
    Assemble(#[from] FinalizeError),
    #[error("committing the batch: {0}")]
    Commit(String),
    #[error("interrupted by shutdown")]
    Abandoned,
}

impl JobError {
    /// The job can never succeed: dead-letter it rather than requeue it.
    fn dead_letters(&self) -> bool {
        matches!(self, Self::BadPayload(_) | Self::UnknownBatch(_))
    }
}

fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// How a job ended well.
enum Finished {
    /// Files assembled and committed; the scheduler answered `status`.
    Committed {
        files: BatchFiles,
        status: BatchStatus,
        total: u64,
    },
    /// The batch was already `status` (a repeated job): only cleaned up.
    AlreadyTerminal { status: BatchStatus },
}

/// What is known about a job so far, for its log line and metrics.
#[derive(Default)]
struct JobContext {
    batch_id: Option<BatchId>,
    ending: Option<Ending>,
}

impl JobContext {
    fn ending_label(&self) -> &'static str {
        self.ending.map_or("unknown", Ending::as_str)
    }
}

/// Signals a job watches.
#[derive(Clone)]
struct JobSignals {
    /// Shutdown was asked: a job waiting to be requeued requeues now.
    stop: watch::Receiver<bool>,
    /// The grace period is over: a job still working stops and requeues.
    abandon: watch::Receiver<bool>,
}

/// Resolves once the flag is raised (or its sender is gone, which means the same).
async fn raised(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|raised| *raised).await;
}

/// Doubling delays between `initial` and `max`.
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next.min(self.max);
        self.next = delay.saturating_mul(2).max(self.initial);
        delay
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Consumes finalize jobs and handles each.
struct Worker {
    config: FinalizerConfig,
    settings: AssembleSettings,
    ports: FinalizerPorts,
    scheduler: Scheduler,
}

impl Worker {
    /// The consume loop, until `stop` is raised; then the drain.
    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (abandon_tx, abandon_rx) = watch::channel(false);
        let signals = JobSignals {
            stop: stop.clone(),
            abandon: abandon_rx,
        };
        let prefetch = usize::from(self.config.prefetch);
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut consumer: Option<Box<dyn Consumer>> = None;
        let mut reconnect = Backoff::new(self.config.retry_backoff, self.config.retry_backoff_max);

        loop {
            let Some(current) = consumer.as_mut() else {
                tokio::select! {
                    biased;
                    () = raised(&mut stop) => break,
                    Some(joined) = jobs.join_next(), if !jobs.is_empty() => log_join(joined),
                    started = self.ports.queue.consume(QueueKind::FinalizeJobs, self.config.prefetch) => {
                        match started {
                            Ok(c) => {
                                tracing::info!("consuming finalize jobs");
                                consumer = Some(c);
                            }
                            Err(e) => {
                                let delay = reconnect.next_delay();
                                tracing::warn!(error = %e, retry_in = ?delay, "cannot consume finalize jobs");
                                tokio::select! {
                                    () = raised(&mut stop) => break,
                                    () = tokio::time::sleep(delay) => {}
                                }
                            }
                        }
                    }
                }
                continue;
            };
            let mut ended = false;
            tokio::select! {
                biased;
                () = raised(&mut stop) => break,
                Some(joined) = jobs.join_next(), if !jobs.is_empty() => log_join(joined),
                next = current.next(), if jobs.len() < prefetch => match next {
                    Some(Ok(delivery)) => {
                        reconnect.reset();
                        jobs.spawn(self.clone().handle(delivery, signals.clone()));
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "the finalize-job consumer failed"),
                    None => ended = true,
                },
            }
            if ended {
                // Its unsettled deliveries come back to the queue; the jobs holding them
                // settle into the void, and the next deliveries redo them idempotently.
                consumer = None;
                let delay = reconnect.next_delay();
                tracing::warn!(retry_in = ?delay, "the finalize-job consumer ended; reconnecting");
                tokio::select! {
                    () = raised(&mut stop) => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }

        if !jobs.is_empty() {
            tracing::info!(jobs = jobs.len(), grace = ?self.config.shutdown_grace, "finishing the finalize jobs in hand");
        }
        let grace = tokio::time::sleep(self.config.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                joined = jobs.join_next() => match joined {
                    Some(joined) => log_join(joined),
                    None => break,
                },
                () = &mut grace => {
                    tracing::warn!(jobs = jobs.len(), "shutdown grace period over; requeueing the jobs in hand");
                    let _ = abandon_tx.send(true);
                    while let Some(joined) = jobs.join_next().await {
                        log_join(joined);
                    }
                    break;
                }
            }
        }
        // Only now: dropping the consumer earlier would make settling the jobs unreliable.
        drop(consumer);
    }

    /// Handles one delivery and settles it, in a `finalize` span of the batch's trace (its
    /// parent is the scheduler's request to finalize, from the job's headers).
    async fn handle(self: Arc<Self>, delivery: Delivery, signals: JobSignals) {
        propagation::observe_delivery(QueueKind::FinalizeJobs.as_str(), &delivery.headers);
        let span = tracing::info_span!(
            "finalize",
            batch_id = tracing::field::Empty,
            delivery_count = delivery.delivery_count
        );
        propagation::set_parent_from_headers(&span, &delivery.headers);
        self.handle_in_span(delivery, signals)
            .instrument(span)
            .await;
    }

    async fn handle_in_span(&self, delivery: Delivery, mut signals: JobSignals) {
        let started = Instant::now();
        let mut ctx = JobContext::default();
        let payload = delivery.payload.clone();
        let result = tokio::select! {
            result = self.process(payload, &mut ctx) => result,
            () = raised(&mut signals.abandon) => Err(JobError::Abandoned),
        };
        let batch_id = ctx.batch_id.as_ref().map(BatchId::as_str).unwrap_or("");
        let ending = ctx.ending_label();
        let outcome = match result {
            Ok(Finished::Committed {
                files,
                status,
                total,
            }) => {
                let elapsed = started.elapsed();
                ::metrics::histogram!(metrics::FINALIZE_DURATION_SECONDS, metrics::LABEL_ENDING => ending)
                    .record(elapsed.as_secs_f64());
                tracing::info!(
                    batch_id,
                    ending,
                    status = %status,
                    total,
                    completed = files.completed,
                    failed = files.failed,
                    output_file_id = files.output.as_ref().map(|f| f.id.to_string()),
                    error_file_id = files.error.as_ref().map(|f| f.id.to_string()),
                    input_tokens = files.usage.input_tokens,
                    output_tokens = files.usage.output_tokens,
                    duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                    "batch finalized"
                );
                settle_ack(delivery, batch_id).await;
                metrics::OUTCOME_COMMITTED
            }
            Ok(Finished::AlreadyTerminal { status }) => {
                tracing::info!(batch_id, status = %status, "batch already terminal: cleaned up after a repeated finalize job");
                settle_ack(delivery, batch_id).await;
                metrics::OUTCOME_ALREADY_TERMINAL
            }
            Err(e) if e.dead_letters() => {
                tracing::error!(batch_id, error = %e, "finalize job can never succeed; dead-lettering it");
                if let Err(e) = delivery.dead_letter().await {
                    tracing::warn!(batch_id, error = %e, "could not dead-letter the finalize job; it will be delivered again");
                }
                metrics::OUTCOME_DEAD_LETTERED
            }
            Err(JobError::Abandoned) => {
                tracing::warn!(
                    batch_id,
                    "finalize job interrupted by shutdown; requeueing it"
                );
                settle_requeue(delivery, batch_id).await;
                metrics::OUTCOME_ABANDONED
            }
            Err(e) => {
                let delay = self.retry_delay(delivery.delivery_count);
                tracing::warn!(batch_id, ending, error = %e, retry_in = ?delay, "finalize job failed; requeueing it");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = raised(&mut signals.stop) => {}
                }
                settle_requeue(delivery, batch_id).await;
                metrics::OUTCOME_RETRIED
            }
        };
        ::metrics::counter!(
            metrics::FINALIZATIONS_TOTAL,
            metrics::LABEL_ENDING => ending,
            metrics::LABEL_OUTCOME => outcome
        )
        .increment(1);
    }

    /// Delay before requeueing a job delivered `delivery_count` times before.
    fn retry_delay(&self, delivery_count: u32) -> Duration {
        let factor = 1u32 << delivery_count.min(20);
        self.config
            .retry_backoff
            .saturating_mul(factor)
            .min(self.config.retry_backoff_max)
    }

    /// Everything a job does before it is settled; `ctx` learns the batch and ending on the
    /// way.
    async fn process(&self, payload: Bytes, ctx: &mut JobContext) -> Result<Finished, JobError> {
        let job = FinalizeJob::decode(payload).map_err(|e| JobError::BadPayload(e.to_string()))?;
        if job.schema_version != SCHEMA_VERSION {
            return Err(JobError::BadPayload(format!(
                "schema version {} (this finalizer reads {SCHEMA_VERSION})",
                job.schema_version
            )));
        }
        let batch_id = BatchId::parse(&job.batch_id)
            .map_err(|_| JobError::BadPayload(format!("batch id {:?}", job.batch_id)))?;
        tracing::Span::current().record("batch_id", batch_id.as_str());
        ctx.batch_id = Some(batch_id.clone());

        let mut wire = self
            .scheduler
            .pipeline()
            .get_finalize_plan(GetFinalizePlanRequest {
                batch_id: batch_id.to_string(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => JobError::UnknownBatch(status_text(&s)),
                _ => JobError::Plan(status_text(&s)),
            })?
            .into_inner();
        let batch = plan::batch_of(&mut wire, batch_id.as_str())?;
        if batch.status.is_terminal() {
            ctx.ending = Ending::parse(batch.status.as_str());
            self.clean_up(&batch_id).await;
            return Ok(Finished::AlreadyTerminal {
                status: batch.status,
            });
        }
        let plan = FinalizePlan::from_wire(batch, wire)?;
        ctx.ending = Some(plan.ending());

        let files = assemble::finalize(&plan, self.ports.storage.as_ref(), self.settings).await?;
        let status = self.commit(&batch_id, &files).await?;
        self.clean_up(&batch_id).await;
        Ok(Finished::Committed {
            files,
            status,
            total: plan.total_lines(),
        })
    }

    /// Commits the files, counts and usage; returns the terminal status the scheduler reports.
    async fn commit(&self, batch: &BatchId, files: &BatchFiles) -> Result<BatchStatus, JobError> {
        fn produced(file: &ProducedFile) -> v1::ProducedFile {
            v1::ProducedFile {
                id: file.id.to_string(),
                bytes: file.bytes,
            }
        }
        let committed = self
            .scheduler
            .pipeline()
            .commit_batch(CommitBatchRequest {
                batch_id: batch.to_string(),
                output_file: files.output.as_ref().map(produced),
                error_file: files.error.as_ref().map(produced),
                completed: files.completed,
                failed: files.failed,
                usage: Some(v1::Usage::from(&files.usage)),
            })
            .await
            .map_err(|s| JobError::Commit(status_text(&s)))?
            .into_inner();
        BatchStatus::parse(&committed.status)
            .filter(|s| s.is_terminal())
            .ok_or_else(|| {
                JobError::Commit(format!(
                    "the scheduler answered status {:?}, not a terminal one",
                    committed.status
                ))
            })
    }

    /// Deletes the batch's result parts and live state. Failures are logged: by now the parts
    /// are garbage, not results, and the live state expires on its own.
    async fn clean_up(&self, batch: &BatchId) {
        match self.ports.storage.delete_prefix(&parts_prefix(batch)).await {
            Ok(parts) => tracing::debug!(batch_id = %batch, parts, "result parts deleted"),
            Err(e) => {
                tracing::warn!(batch_id = %batch, error = %e, "could not delete the result parts; they are left behind");
            }
        }
        if let Err(e) = self.ports.state.clear(batch.as_str()).await {
            tracing::warn!(batch_id = %batch, error = %e, "could not clear the live state; it will expire");
        }
    }
}

async fn settle_ack(delivery: Delivery, batch_id: &str) {
    if let Err(e) = delivery.ack().await {
        tracing::warn!(batch_id, error = %e, "could not ack the finalize job; it will be delivered again");
    }
}

async fn settle_requeue(delivery: Delivery, batch_id: &str) {
    if let Err(e) = delivery.requeue().await {
        tracing::warn!(batch_id, error = %e, "could not requeue the finalize job; it returns to the queue anyway");
    }
}

fn log_join(joined: Result<(), JoinError>) {
    if let Err(e) = joined {
        // A panicking job dropped its delivery unsettled: it returns to the queue.
        tracing::error!(error = %e, "a finalize job panicked");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let config = FinalizerConfig::default();
        assert_eq!(config.listen.port(), 9093);
        assert_eq!(config.scheduler_url, "http://127.0.0.1:50051");
        assert_eq!(config.prefetch, 2);
        config.validate().unwrap();
        let zero = FinalizerConfig {
            prefetch: 0,
            ..FinalizerConfig::default()
        };
        assert!(matches!(zero.validate(), Err(ServeError::Config(_))));
        let bad_url = FinalizerConfig {
            scheduler_url: "not a url".into(),
            ..FinalizerConfig::default()
        };
        assert!(matches!(bad_url.validate(), Err(ServeError::Config(_))));
    }

    #[test]
    fn config_reads_partial_documents_and_refuses_unknown_keys() {
        let config: FinalizerConfig = serde_json::from_value(serde_json::json!({
            "prefetch": 4,
            "shutdown_grace": "5s",
            "retry_backoff": "250ms",
        }))
        .unwrap();
        assert_eq!(config.prefetch, 4);
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.retry_backoff, Duration::from_millis(250));
        assert_eq!(
            config.max_line_bytes,
            FinalizerConfig::default().max_line_bytes
        );
        let unknown = serde_json::from_value::<FinalizerConfig>(serde_json::json!({"prefech": 4}));
        assert!(unknown.is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }
}
