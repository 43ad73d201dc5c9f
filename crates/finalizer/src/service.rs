//! The finalizer service: consumes finalize jobs, assembles each batch's files under the
//! batch's finalization lease, commits the batch's terminal state through the scheduler, then
//! cleans up.
//!
//! The queue side — consuming with at most `prefetch` jobs at once, reconnecting, settling,
//! backoff, graceful shutdown — is the shared worker, [`nightshift_queue::run_worker`]; this
//! module is its [`Handler`]. Per job (a `FinalizeJob` from the finalize-jobs queue):
//! 1. decode it — an undecodable job, or one naming a malformed batch id, is poison;
//! 2. ask the scheduler for the batch's [`FinalizePlan`] (`GetFinalizePlan`) — a batch the
//!    scheduler does not know is poison;
//! 3. if the batch is already terminal (the job was delivered again after an earlier run
//!    committed), only clean up: done;
//! 4. take the batch's finalization lease (`LeaseFinalization`, for `lease_ttl`). Refused:
//!    another finalizer is working on the batch, and this job is a duplicate of its job — done
//!    (acked) without touching anything. One finalizer at a time assembles a batch; the
//!    scheduler publishes the job again if that finalizer dies (its lease expires);
//! 5. [`assemble::finalize`] the files, `CommitBatch` (files, counts, usage; the scheduler
//!    records them and the terminal status in one transaction, idempotently), clean up —
//!    while renewing the lease every `lease_ttl / 3`. A renewal refused means another holder
//!    took the lease over (this run was too slow to renew, and its job was published again):
//!    this run stops at once and its job is done, as a duplicate. A renewal that cannot reach
//!    the scheduler is retried until the lease would lapse, then the run stops as an outage;
//! 6. release the lease, however the run ended (done, failed, interrupted).
//!
//! The lease holder is this finalizer process (`finalizer-<random>`), and a process never
//! runs two jobs of one batch at once (the second is a duplicate): so a run that follows an
//! earlier run of this process whose release failed (the scheduler was down) takes the lease
//! back at once instead of waiting for it to lapse.
//!
//! How a job is settled (the worker's [`Disposition`]): poison (above) is dead-lettered; the
//! scheduler unreachable (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, or a scheduler that does not
//! offer leases yet: `UNIMPLEMENTED`) and object storage failing (a backend error) are
//! outages — the job is held and run again once the dependency is back, without counting
//! toward the delivery limit; anything else before the commit (an unusable plan, a missing
//! or corrupt part, a refused commit) is retried with backoff and dead-lettered when it keeps
//! failing. A re-run overwrites the same deterministic objects. Clean-up — deleting the
//! batch's result parts and its live state — only happens after the commit, and its failures
//! are logged, not fatal: the parts are garbage by then, not results.
//!
//! Shutdown: the worker stops taking jobs and lets the jobs in hand finish within
//! `shutdown_grace`; a job still running then is interrupted (its lease released) and
//! published again (a job interrupted after its commit is harmless: its next delivery finds
//! the batch terminal).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchStatus, parts_prefix};
use nightshift_proto::client::{SchedulerClient, TracedChannel};
use nightshift_proto::v1::pipeline_client::PipelineClient;
use nightshift_proto::v1::{
    self, CommitBatchRequest, FinalizeJob, GetFinalizePlanRequest, LeaseFinalizationRequest,
    LeaseFinalizationResponse,
};
use nightshift_queue::worker::DEFAULT_MAX_HOLD;
use nightshift_queue::{
    CancellationToken, Disposition, Handler, Job, QueueKind, WorkQueue, WorkerConfig, run_worker,
};
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use nightshift_telemetry::propagation;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::assemble::{self, AssembleSettings, BatchFiles, FinalizeError, ProducedFile};
use crate::metrics;
use crate::plan::{self, Ending, FinalizePlan, PlanError};

/// Version of the `FinalizeJob` messages this finalizer reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Largest `FinalizePlan` accepted from the scheduler. A plan lists every chunk (about 30
/// bytes each), so this allows batches of about two million chunks.
const MAX_PLAN_BYTES: usize = 64 * 1024 * 1024;

/// Longest wait for the release of a lease: the run is over, and an unreleased lease only
/// lapses `lease_ttl` later.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// The finalizer's own settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinalizerConfig {
    /// Ops endpoints: `/livez`, `/readyz`, `/metrics`.
    pub listen: SocketAddr,
    /// The scheduler's gRPC endpoint (its `Pipeline` service and gRPC health).
    pub scheduler_url: String,
    /// Finalize jobs handled at once (≥ 1). Memory grows with it: each job holds a line of
    /// its input and one of a part, each at most `max_line_bytes`, plus two uploads' buffers
    /// (see the storage's `part_size`).
    pub prefetch: u16,
    /// Longest line accepted in a result part or in an input file (terminator excluded); a
    /// longer line fails the job. At least the scheduler's input line limit, and the longest
    /// result line executors write: an upstream answer of up to its `max_response_bytes`
    /// (16 MiB by default) plus the envelope, whose `custom_id` may be as long as an input
    /// line (16 MiB by default). The default, 64 MiB, covers both defaults; raise it with them.
    pub max_line_bytes: usize,
    /// Deadline of each call to the scheduler.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// After shutdown is asked, how long the jobs in hand may take to finish before they are
    /// interrupted and published again.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A job that failed on its own (an unusable plan, a corrupt part, a refused commit) is
    /// requeued after this, doubled for each earlier delivery of it.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Cap of those delays; also of the wait before consuming again after the queue failed.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// A job that met an outage (the scheduler or object storage unreachable) runs again
    /// after 1 s, doubling up to this; meanwhile no other job is taken.
    #[serde(with = "humantime_serde")]
    pub outage_backoff_max: Duration,
    /// A job held in an outage longer than this is published again (and the held delivery
    /// acked), so the broker never reclaims it. At most a quarter of `queue.consumer_timeout`
    /// is used.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// How long the finalization lease of a batch lasts; the job working on the batch renews
    /// it every `lease_ttl / 3`. A finalizer that dies keeps its batches from being finalized
    /// again for at most this long (whole seconds, at least 3 s).
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The secret sent with every call to the scheduler. Not a key of `[finalizer]`: the
    /// binary copies `[internal] token` here ([`nightshift_proto::auth`]).
    #[serde(skip)]
    pub internal_token: Option<nightshift_core::secret::Secret>,
    /// Mutual TLS to the scheduler (then `scheduler_url` is `https://`). Not a key of
    /// `[finalizer]`: the binary copies `[internal.tls]` here ([`nightshift_proto::tls`]).
    #[serde(skip)]
    pub internal_tls: Option<nightshift_proto::tls::TlsFiles>,
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
            outage_backoff_max: Duration::from_secs(30),
            max_hold: DEFAULT_MAX_HOLD,
            lease_ttl: Duration::from_secs(60),
            internal_token: None,
            internal_tls: None,
        }
    }
}

impl FinalizerConfig {
    /// Checks what serde cannot: `prefetch ≥ 1`, `max_line_bytes ≥ 1`, `lease_ttl ≥ 3 s`, a
    /// usable URL, and the worker's settings (see [`WorkerConfig::validate`]).
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefetch == 0 {
            return Err("finalizer.prefetch must be at least 1".into());
        }
        if self.max_line_bytes == 0 {
            return Err("finalizer.max_line_bytes must be at least 1".into());
        }
        if self.lease_ttl < Duration::from_secs(3) {
            return Err("finalizer.lease_ttl must be at least 3s".into());
        }
        SchedulerClient::check_url(&self.scheduler_url)
            .map_err(|e| format!("finalizer.scheduler_url: {e}"))?;
        self.worker(None)
            .validate(None)
            .map_err(|e| format!("finalizer: {e}"))
    }

    /// The queue worker's settings, `max_hold` fit to the broker's `consumer_timeout`.
    fn worker(&self, consumer_timeout: Option<Duration>) -> WorkerConfig {
        WorkerConfig {
            kind: QueueKind::FinalizeJobs,
            prefetch: self.prefetch,
            shutdown_grace: self.shutdown_grace,
            retry_base: self.retry_backoff,
            retry_max: self.retry_backoff_max,
            outage_backoff_max: self.outage_backoff_max,
            max_hold: self.max_hold,
        }
        .fit_to(consumer_timeout)
    }

    /// `lease_ttl` in whole seconds (rounded up).
    fn lease_ttl_seconds(&self) -> u32 {
        let secs = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        u32::try_from(secs).unwrap_or(u32::MAX)
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
    /// The configuration cannot work with this queue (its consumer timeout), or the scheduler
    /// URL is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The ops listener failed.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the finalizer until `shutdown` is cancelled: serves the ops endpoints on `listener`
/// and consumes finalize jobs; then stops taking jobs, finishes (or, past `shutdown_grace`,
/// interrupts and publishes again) the jobs in hand, and returns — at most
/// `shutdown_grace` + [`nightshift_queue::worker::SHUTDOWN_MARGIN`] after `shutdown`.
///
/// `config` was validated when it was loaded ([`FinalizerConfig::validate`]); `serve` checks
/// only what needs the queue: the worker's settings against its consumer timeout. The queue
/// and the scheduler may be down at start or at any time: the finalizer keeps retrying (and
/// `/readyz` says what is missing) rather than exiting.
pub async fn serve(
    config: FinalizerConfig,
    ports: FinalizerPorts,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let consumer_timeout = ports.queue.consumer_timeout();
    let worker = config.worker(consumer_timeout);
    worker
        .validate(consumer_timeout)
        .map_err(|e| ServeError::Config(format!("finalizer: {e}")))?;
    let scheduler = SchedulerClient::connect_lazy_tls(
        &config.scheduler_url,
        config.control_timeout,
        config.internal_tls.as_ref(),
    )
    .map_err(|e| ServeError::Config(format!("finalizer.scheduler_url: {e}")))?
    .with_token(config.internal_token.as_ref())
    .map_err(|e| ServeError::Config(e.to_string()))?;
    metrics::describe();
    metrics::register();

    // The ops endpoints stay up until every job in hand is settled.
    let stop_ops = CancellationToken::new();
    let addr = listener.local_addr()?;
    let ops = tokio::spawn(
        axum::serve(
            listener,
            nightshift_telemetry::ops_router(readiness(&ports, &scheduler)),
        )
        .with_graceful_shutdown(stop_ops.clone().cancelled_owned())
        .into_future(),
    );

    let handler = Arc::new(FinalizeHandler {
        settings: AssembleSettings {
            max_line_bytes: config.max_line_bytes,
        },
        lease_ttl: config.lease_ttl,
        lease_ttl_seconds: config.lease_ttl_seconds(),
        holder: format!("finalizer-{}", uuid::Uuid::new_v4().simple()),
        active: Mutex::default(),
        queue: ports.queue.clone(),
        ports,
        scheduler,
    });
    tracing::info!(
        addr = %addr,
        scheduler = %config.scheduler_url,
        prefetch = config.prefetch,
        holder = %handler.holder,
        "finalizer listening"
    );
    run_worker(handler.queue.clone(), worker, handler, shutdown).await;

    stop_ops.cancel();
    let served = ops.await.map_err(std::io::Error::other)?;
    tracing::info!("finalizer stopped");
    served.map_err(ServeError::Io)
}

fn readiness(ports: &FinalizerPorts, scheduler: &SchedulerClient) -> Readiness {
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

/// Why a job did not finish. [`JobError::disposition`] says what becomes of it.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("undecodable finalize job: {0}")]
    BadPayload(String),
    #[error("the scheduler does not know the batch: {0}")]
    UnknownBatch(String),
    #[error("the scheduler's {call} failed: {code:?}: {message}")]
    Scheduler {
        call: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("unusable finalize plan: {0}")]
    BadPlan(#[from] PlanError),
    #[error("assembling the files: {0}")]
    Assemble(#[from] FinalizeError),
    #[error("committing the batch: {0}")]
    Commit(String),
    #[error("the finalization lease could not be renewed before it lapsed: {0}")]
    LeaseLapsed(String),
    #[error("interrupted by shutdown")]
    Abandoned,
}

impl JobError {
    fn scheduler(call: &'static str) -> impl FnOnce(tonic::Status) -> Self {
        move |status| Self::Scheduler {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// How the worker settles a job that ended so.
    fn disposition(&self) -> Disposition {
        match self {
            Self::BadPayload(_) | Self::UnknownBatch(_) => Disposition::Poison(self.to_string()),
            // The scheduler is down or cannot answer in time, or it is an older one that does
            // not offer leases yet (during an upgrade): wait for it.
            Self::Scheduler {
                code:
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unimplemented,
                ..
            }
            | Self::LeaseLapsed(_) => Disposition::Outage {
                dependency: "scheduler",
                error: self.to_string(),
            },
            Self::Assemble(e) if e.is_storage_outage() => Disposition::Outage {
                dependency: "object_storage",
                error: self.to_string(),
            },
            _ => Disposition::Retry(self.to_string()),
        }
    }
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
    /// Another finalizer (`holder`) holds the batch's lease: this job is a duplicate.
    Duplicate { holder: String },
    /// Another finalizer (`holder`) took the lease over while this job worked: this job
    /// stopped, its work is that finalizer's now.
    TakenOver { holder: String },
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

/// The finalizer's handler of finalize jobs.
struct FinalizeHandler {
    settings: AssembleSettings,
    ports: FinalizerPorts,
    /// `ports.queue`, as the worker takes it.
    queue: Arc<dyn WorkQueue>,
    /// The scheduler's `Pipeline` service (plans, leases, commits).
    scheduler: SchedulerClient,
    lease_ttl: Duration,
    lease_ttl_seconds: u32,
    /// This process's name as a lease holder.
    holder: String,
    /// Batches a job of this process is working on now.
    active: Mutex<HashSet<String>>,
}

#[async_trait]
impl Handler for FinalizeHandler {
    /// Handles one job in a `finalize` span of the batch's trace (its parent is the
    /// scheduler's request to finalize, from the job's headers).
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        if job.attempt == 1 {
            propagation::observe_delivery(QueueKind::FinalizeJobs.as_str(), job.headers);
        }
        let span = tracing::info_span!(
            "finalize",
            batch_id = tracing::field::Empty,
            delivery_count = job.delivery_count,
            attempt = job.attempt
        );
        propagation::set_parent_from_headers(&span, job.headers);
        self.handle_in_span(job).instrument(span).await
    }
}

impl FinalizeHandler {
    async fn handle_in_span(&self, job: &Job<'_>) -> Disposition {
        let started = Instant::now();
        let mut ctx = JobContext::default();
        let result = self.process(job, &mut ctx).await;
        let batch_id = ctx.batch_id.as_ref().map(BatchId::as_str).unwrap_or("");
        let ending = ctx.ending_label();
        let (outcome, disposition) = match result {
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
                (metrics::OUTCOME_COMMITTED, Disposition::Done)
            }
            Ok(Finished::AlreadyTerminal { status }) => {
                tracing::info!(batch_id, status = %status, "batch already terminal: cleaned up after a repeated finalize job");
                (metrics::OUTCOME_ALREADY_TERMINAL, Disposition::Done)
            }
            Ok(Finished::Duplicate { holder }) => {
                tracing::info!(
                    batch_id,
                    holder,
                    "another finalizer is finalizing the batch: dropping this duplicate job"
                );
                (metrics::OUTCOME_DUPLICATE, Disposition::Done)
            }
            Ok(Finished::TakenOver { holder }) => {
                tracing::warn!(
                    batch_id,
                    holder,
                    "another finalizer took the batch's lease over: stopped, dropping this job"
                );
                (metrics::OUTCOME_DUPLICATE, Disposition::Done)
            }
            Err(e) => {
                let disposition = e.disposition();
                let outcome = match &disposition {
                    Disposition::Poison(_) => {
                        tracing::error!(batch_id, error = %e, "finalize job can never succeed; dead-lettering it");
                        metrics::OUTCOME_DEAD_LETTERED
                    }
                    Disposition::Outage { dependency, .. } => {
                        tracing::warn!(batch_id, ending, dependency, error = %e, "finalize job waits for a dependency");
                        metrics::OUTCOME_OUTAGE
                    }
                    _ if matches!(e, JobError::Abandoned) => {
                        tracing::warn!(
                            batch_id,
                            "finalize job interrupted by shutdown; it will run again"
                        );
                        metrics::OUTCOME_ABANDONED
                    }
                    _ => {
                        tracing::warn!(batch_id, ending, error = %e, "finalize job failed; it will be retried");
                        metrics::OUTCOME_RETRIED
                    }
                };
                (outcome, disposition)
            }
        };
        ::metrics::counter!(
            metrics::FINALIZATIONS_TOTAL,
            metrics::LABEL_ENDING => ending,
            metrics::LABEL_OUTCOME => outcome
        )
        .increment(1);
        disposition
    }

    /// Everything a job does; `ctx` learns the batch and ending on the way. Stops when the
    /// job is abandoned (releasing the lease if it holds it).
    async fn process(&self, job: &Job<'_>, ctx: &mut JobContext) -> Result<Finished, JobError> {
        let prepared = tokio::select! {
            biased;
            prepared = self.prepare(job.payload, ctx) => prepared?,
            () = job.abandoned() => return Err(JobError::Abandoned),
        };
        let plan = match prepared {
            Prepared::Finished(finished) => return Ok(finished),
            Prepared::Plan(plan) => plan,
        };
        let batch = &plan.batch().id;

        // The lease holder is this process: two of its jobs must not work on one batch.
        let Some(_active) = Active::enter(&self.active, batch.as_str()) else {
            return Ok(Finished::Duplicate {
                holder: format!("{} (another job of this process)", self.holder),
            });
        };
        let valid_until = tokio::select! {
            biased;
            taken = self.take_lease(batch) => match taken? {
                Ok(valid_until) => valid_until,
                Err(holder) => return Ok(Finished::Duplicate { holder }),
            },
            () = job.abandoned() => return Err(JobError::Abandoned),
        };
        // Work done is preferred to a lease lost or an interruption noticed at the same time.
        let committed = tokio::select! {
            biased;
            committed = self.assemble_and_commit(&plan) => committed,
            lost = self.keep_lease(batch, valid_until) => match lost {
                LeaseLost::TakenOver(holder) => return Ok(Finished::TakenOver { holder }),
                LeaseLost::Lapsed(error) => Err(JobError::LeaseLapsed(error)),
            },
            () = job.abandoned() => Err(JobError::Abandoned),
        };
        self.release_lease(batch).await;
        let (files, status) = committed?;
        self.clean_up(batch).await;
        Ok(Finished::Committed {
            files,
            status,
            total: plan.total_lines(),
        })
    }

    /// Decodes the job and gets its batch's plan: the plan to run, or how the job ended
    /// already (the batch is terminal).
    async fn prepare(&self, payload: &Bytes, ctx: &mut JobContext) -> Result<Prepared, JobError> {
        let job = FinalizeJob::decode(payload.clone())
            .map_err(|e| JobError::BadPayload(e.to_string()))?;
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
            .pipeline()
            .get_finalize_plan(GetFinalizePlanRequest {
                batch_id: batch_id.to_string(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    JobError::UnknownBatch(format!("{:?}: {}", s.code(), s.message()))
                }
                _ => JobError::scheduler("GetFinalizePlan")(s),
            })?
            .into_inner();
        let batch = plan::batch_of(&mut wire, batch_id.as_str())?;
        if batch.status.is_terminal() {
            ctx.ending = Ending::parse(batch.status.as_str());
            self.clean_up(&batch_id).await;
            return Ok(Prepared::Finished(Finished::AlreadyTerminal {
                status: batch.status,
            }));
        }
        let plan = FinalizePlan::from_wire(batch, wire)?;
        ctx.ending = Some(plan.ending());
        Ok(Prepared::Plan(Box::new(plan)))
    }

    /// Assembles the files and commits them; returns them and the terminal status the
    /// scheduler reports.
    async fn assemble_and_commit(
        &self,
        plan: &FinalizePlan,
    ) -> Result<(BatchFiles, BatchStatus), JobError> {
        let files = assemble::finalize(plan, self.ports.storage.as_ref(), self.settings).await?;
        let status = self.commit(&plan.batch().id, &files).await?;
        Ok((files, status))
    }

    /// The scheduler's `Pipeline` service; each call carries the trace context of the span it
    /// is made in (the job's `finalize` span).
    fn pipeline(&self) -> PipelineClient<TracedChannel> {
        self.scheduler
            .pipeline()
            .max_decoding_message_size(MAX_PLAN_BYTES)
    }

    /// Takes, renews or (`release`) gives up a batch's finalization lease, within `timeout`.
    async fn lease(
        &self,
        request: LeaseFinalizationRequest,
        timeout: Duration,
    ) -> Result<LeaseFinalizationResponse, tonic::Status> {
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        self.pipeline()
            .lease_finalization(request)
            .await
            .map(tonic::Response::into_inner)
    }

    fn lease_request(&self, batch: &BatchId, release: bool) -> LeaseFinalizationRequest {
        LeaseFinalizationRequest {
            batch_id: batch.to_string(),
            holder: self.holder.clone(),
            ttl_seconds: self.lease_ttl_seconds,
            release,
        }
    }

    /// Takes the batch's lease: `Ok(until when it holds)`, or `Err(the holder keeping it)`.
    async fn take_lease(&self, batch: &BatchId) -> Result<Result<Instant, String>, JobError> {
        let asked = Instant::now();
        let answer = self
            .lease(self.lease_request(batch, false), self.lease_ttl / 3)
            .await
            .map_err(JobError::scheduler("LeaseFinalization"))?;
        if answer.granted {
            tracing::debug!(batch_id = %batch, holder = %self.holder, "finalization lease taken");
            Ok(Ok(asked + self.lease_ttl))
        } else {
            Ok(Err(answer.holder))
        }
    }

    /// Renews the lease every `lease_ttl / 3` until it is lost: never returns otherwise. A
    /// failed renewal is tried again at the next tick, unless the lease would lapse first.
    async fn keep_lease(&self, batch: &BatchId, mut valid_until: Instant) -> LeaseLost {
        let every = self.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let asked = Instant::now();
            match self.lease(self.lease_request(batch, false), every).await {
                Ok(answer) if answer.granted => valid_until = asked + self.lease_ttl,
                Ok(answer) => return LeaseLost::TakenOver(answer.holder),
                Err(status) => {
                    let error = format!("{:?}: {}", status.code(), status.message());
                    if Instant::now() + every >= valid_until {
                        return LeaseLost::Lapsed(error);
                    }
                    tracing::warn!(batch_id = %batch, error, "could not renew the finalization lease; trying again");
                }
            }
        }
    }

    /// Gives the lease up. Best effort: an unreleased lease lapses `lease_ttl` later (or is
    /// taken back by this process's next job of the batch).
    async fn release_lease(&self, batch: &BatchId) {
        match self
            .lease(self.lease_request(batch, true), RELEASE_TIMEOUT)
            .await
        {
            Ok(_) => tracing::debug!(batch_id = %batch, "finalization lease released"),
            Err(status) => tracing::warn!(
                batch_id = %batch,
                error = %format!("{:?}: {}", status.code(), status.message()),
                "could not release the finalization lease; it will lapse"
            ),
        }
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
            .map_err(JobError::scheduler("CommitBatch"))?
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

/// What [`FinalizeHandler::prepare`] found.
enum Prepared {
    /// The job is over already.
    Finished(Finished),
    /// The batch to assemble.
    Plan(Box<FinalizePlan>),
}

/// Why a lease stopped being held.
enum LeaseLost {
    /// A renewal was refused: `holder` has it now (empty: the batch is not being finalized
    /// any more).
    TakenOver(String),
    /// The scheduler could not be reached to renew it before it lapsed (the last error).
    Lapsed(String),
}

/// A batch a job of this process works on, until dropped.
struct Active<'a> {
    set: &'a Mutex<HashSet<String>>,
    batch: String,
}

impl<'a> Active<'a> {
    /// Marks `batch` active; `None` if another job of this process already works on it.
    fn enter(set: &'a Mutex<HashSet<String>>, batch: &str) -> Option<Self> {
        let inserted = set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(batch.to_owned());
        inserted.then(|| Self {
            set,
            batch: batch.to_owned(),
        })
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.batch);
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
        assert_eq!(config.lease_ttl, Duration::from_secs(60));
        assert_eq!(config.lease_ttl_seconds(), 60);
        config.validate().unwrap();
        for bad in [
            FinalizerConfig {
                prefetch: 0,
                ..FinalizerConfig::default()
            },
            FinalizerConfig {
                scheduler_url: "not a url".into(),
                ..FinalizerConfig::default()
            },
            FinalizerConfig {
                lease_ttl: Duration::from_secs(2),
                ..FinalizerConfig::default()
            },
            FinalizerConfig {
                retry_backoff_max: Duration::from_millis(1),
                ..FinalizerConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let fractional = FinalizerConfig {
            lease_ttl: Duration::from_millis(4500),
            ..FinalizerConfig::default()
        };
        assert_eq!(fractional.lease_ttl_seconds(), 5);
    }

    #[test]
    fn the_worker_gets_the_settings_with_max_hold_fit_to_the_broker() {
        let config = FinalizerConfig::default();
        let worker = config.worker(None);
        assert_eq!(worker.kind, QueueKind::FinalizeJobs);
        assert_eq!(worker.prefetch, config.prefetch);
        assert_eq!(worker.shutdown_grace, config.shutdown_grace);
        assert_eq!(worker.retry_base, config.retry_backoff);
        assert_eq!(worker.retry_max, config.retry_backoff_max);
        assert_eq!(worker.outage_backoff_max, config.outage_backoff_max);
        assert_eq!(worker.max_hold, DEFAULT_MAX_HOLD);
        let fit = config.worker(Some(Duration::from_secs(60)));
        assert_eq!(fit.max_hold, Duration::from_secs(15));
        fit.validate(Some(Duration::from_secs(60))).unwrap();
    }

    #[test]
    fn the_default_line_limit_covers_the_longest_result_line() {
        // An upstream answer of max_response_bytes (16 MiB by default) and a custom_id as long
        // as an input line may be, in one result line with its envelope.
        let max_response_bytes = nightshift_core::routing::defaults::max_response_bytes();
        let input_line = nightshift_core::validation::ValidationLimits::default().max_line_bytes;
        let envelope = 64 * 1024;
        assert!(
            FinalizerConfig::default().max_line_bytes >= max_response_bytes + input_line + envelope
        );
    }

    #[test]
    fn config_reads_partial_documents_and_refuses_unknown_keys() {
        let config: FinalizerConfig = serde_json::from_value(serde_json::json!({
            "prefetch": 4,
            "shutdown_grace": "5s",
            "retry_backoff": "250ms",
            "lease_ttl": "90s",
        }))
        .unwrap();
        assert_eq!(config.prefetch, 4);
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));
        assert_eq!(config.retry_backoff, Duration::from_millis(250));
        assert_eq!(config.lease_ttl, Duration::from_secs(90));
        assert_eq!(
            config.max_line_bytes,
            FinalizerConfig::default().max_line_bytes
        );
        let unknown = serde_json::from_value::<FinalizerConfig>(serde_json::json!({"prefech": 4}));
        assert!(unknown.is_err());
    }

    #[test]
    fn errors_settle_as_poison_outage_or_retry() {
        let scheduler = |code| JobError::Scheduler {
            call: "CommitBatch",
            code,
            message: "m".into(),
        };
        let storage = |source| {
            JobError::Assemble(FinalizeError::Storage {
                context: "reading".into(),
                source,
            })
        };
        use nightshift_storage::StorageError;
        let cases = [
            (JobError::BadPayload("x".into()), "poison"),
            (JobError::UnknownBatch("x".into()), "poison"),
            (scheduler(tonic::Code::Unavailable), "outage"),
            (scheduler(tonic::Code::DeadlineExceeded), "outage"),
            (scheduler(tonic::Code::Unimplemented), "outage"),
            (scheduler(tonic::Code::Internal), "retry"),
            (scheduler(tonic::Code::FailedPrecondition), "retry"),
            (JobError::LeaseLapsed("x".into()), "outage"),
            (storage(StorageError::Backend("down".into())), "outage"),
            (storage(StorageError::NotFound("files/x".into())), "retry"),
            (JobError::BadPlan(PlanError::MissingBatch), "retry"),
            (JobError::Commit("x".into()), "retry"),
            (JobError::Abandoned, "retry"),
        ];
        for (error, expected) in cases {
            assert_eq!(error.disposition().as_str(), expected, "{error}");
        }
        match scheduler(tonic::Code::Unavailable).disposition() {
            Disposition::Outage { dependency, .. } => assert_eq!(dependency, "scheduler"),
            other => panic!("{other:?}"),
        }
        match storage(StorageError::Backend("down".into())).disposition() {
            Disposition::Outage { dependency, .. } => assert_eq!(dependency, "object_storage"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_process_works_on_a_batch_in_one_job_at_a_time() {
        let set = Mutex::default();
        let first = Active::enter(&set, "batch_a").unwrap();
        assert!(Active::enter(&set, "batch_a").is_none());
        let other = Active::enter(&set, "batch_b").unwrap();
        drop(first);
        let again = Active::enter(&set, "batch_a").unwrap();
        drop((again, other));
        assert!(set.lock().unwrap().is_empty());
    }
}
