//! The executor service: consume chunk tasks, run them, announce their results.
//!
//! [`serve`] runs until its shutdown token is cancelled:
//!
//! - **Ops endpoints** on the listener: `/livez`, `/readyz` (object storage, queue and live
//!   state answer), `/metrics`.
//! - **Consuming** through the queue worker ([`run_worker`], see its module for the whole
//!   lifecycle): one consumer of [`QueueKind::ChunkTasks`], at most `prefetch` chunks running
//!   at once, a lost consumer replaced with backoff. The executor only says what happened to
//!   each delivery (a [`Disposition`]); the worker settles it. Nothing is acked before its
//!   result is durable; outages wait; only a chunk that fails on its own counts toward the
//!   delivery limit.
//! - **One delivery** ([`ChunkDisposition`] names the endings, for metrics):
//!   1. decode the [`ChunkTask`]; an undecodable payload or an unknown `schema_version` is
//!      [`Poison`](Disposition::Poison) (it can never run; no result can be reported);
//!   2. publish a heartbeat — a [`ChunkResult`] with report `RUNNING` — at once and every
//!      [`heartbeat_interval`](ExecutorConfig::heartbeat_interval) while the chunk is held
//!      (running, or waiting out an outage between two runs), so the scheduler renews the
//!      chunk's lease. A heartbeat that cannot be published is skipped (logged);
//!   3. [`run_chunk`]: its part is written to object storage;
//!   4. a complete part: publish the `DONE` [`ChunkResult`] to [`QueueKind::ChunkResults`]
//!      (`schema_version` 1; headers: the `traceparent` of the chunk's span — a child of the
//!      task's — and `published-at`) and wait for the broker's confirm; only then is the task
//!      [`Done`](Disposition::Done) (acked). A lost ack means the chunk runs again: the run
//!      keeps every final line of its part, and its result is published again, which the
//!      scheduler absorbs.
//!
//!   The other endings:
//!   - the chunk's time budget ended the run first ([`ChunkOutcome::complete`] false): no
//!     result; [`Republish`](Disposition::Republish) — a fresh copy of the task continues
//!     from the part (a continuation, not a failure: it never counts);
//!   - the chunk can never run ([`ChunkError::is_permanent`]: an invalid task, an input that
//!     does not match it, a missing input): publish a `FAILED` result carrying the error's
//!     text (the scheduler gives the chunk up and its lines become `chunk_failed` lines),
//!     then [`Poison`](Disposition::Poison);
//!   - object storage is down ([`ChunkError::is_outage`]) or a result cannot be published
//!     (the queue is down): [`Outage`](Disposition::Outage) — the worker holds the task
//!     (heartbeats go on) and runs it again after a backoff, without counting it; a re-run
//!     keeps what the part already holds;
//!   - any other failure: [`Retry`](Disposition::Retry), requeued after `requeue_delay ×
//!     2^n` (`n`: the deliveries it already had, capped at 32×); the queue's delivery limit
//!     dead-letters a chunk that keeps failing (the scheduler's lease re-drives it).
//! - **Shutdown.** When `shutdown` is cancelled: stop taking chunks; running chunks get
//!   `shutdown_grace` to finish (and publish, and be acked). Past it, those still running
//!   stop at once (their requests in flight are abandoned, nothing is written) and their
//!   tasks are re-published as fresh copies for the next executor. `serve` returns at most
//!   `shutdown_grace` + [`SHUTDOWN_MARGIN`](nightshift_queue::worker::SHUTDOWN_MARGIN) after
//!   `shutdown`.
//!
//! **Timing.** The work done for one delivery must stay well under the broker's consumer
//! timeout (`queue.consumer_timeout`), or the broker takes every delivery of the consumer
//! back while they still run: [`ExecutorConfig::check_timing`] refuses to start when the
//! chunk time budget plus the longest upstream attempt exceeds three quarters of it. That is
//! the one check `serve` makes: it needs the queue's consumer timeout, known only once the
//! queue is open. The rest of the configuration is checked when it is loaded
//! ([`ExecutorConfig::validate`], and the routing table's own `validate`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nightshift_core::routing::RoutingConfig;
use nightshift_proto::v1::{ChunkReport, ChunkResult, ChunkTask};
use nightshift_queue::{
    CancellationToken, Disposition, Handler, Headers, Job, QueueKind, WorkQueue, WorkerConfig,
    async_trait, run_worker,
};
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use nightshift_telemetry::propagation;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics;
use crate::runner::{
    ChunkDeps, ChunkError, ChunkOutcome, LineKind, RunnerSettings, SCHEMA_VERSION, run_chunk,
};
use crate::upstream::{AttemptKind, Upstreams, UpstreamsError};

/// The header carrying the W3C trace context, from a task to its chunk span and from that
/// span to the chunk's results.
pub const TRACEPARENT: &str = propagation::TRACEPARENT;
/// The dependency named when a chunk result cannot be published.
pub const QUEUE_DEPENDENCY: &str = "queue";

/// The executor's settings (the `[executor]` section of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorConfig {
    /// Where the ops endpoints (`/livez`, `/readyz`, `/metrics`) listen. Default
    /// `127.0.0.1:9092`.
    pub listen: SocketAddr,
    /// Chunks held (unacked) and run at once by this process (≥ 1). Default 4.
    pub prefetch: u16,
    /// Requests of one chunk in flight at once (≥ 1). Default 64.
    pub chunk_concurrency: usize,
    /// How often a running chunk checks its batch's cancel flag. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub cancel_poll: Duration,
    /// Longest input line (content, terminator excluded); at least the scheduler's
    /// `max_line_bytes`. Default 16 MiB.
    pub max_line_bytes: usize,
    /// How long one run of a chunk may start requests; past it the run finishes the requests
    /// in flight, writes what it has and hands the rest to a fresh copy of the task. With the
    /// longest upstream `timeout` it must stay under three quarters of `queue.consumer_timeout`
    /// (checked at start). Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub chunk_time_budget: Duration,
    /// Bytes of result lines one chunk keeps in memory; the rest wait in a temporary file
    /// until the part is written. Default 32 MiB.
    pub result_memory_bytes: usize,
    /// How often a held chunk tells the scheduler it is still being worked on (a `RUNNING`
    /// chunk result renews the chunk's lease). Must be well under the scheduler's
    /// `chunk_lease` (default 120 s): a third of it at most. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// On shutdown, how long running chunks may take to finish before they are handed back
    /// (re-published). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a chunk that failed on its own (neither an outage nor a permanent error) is
    /// held before it is requeued, doubled per earlier delivery (at most 32×). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub requeue_delay: Duration,
    /// How long this executor's lease of each upstream's shared `max_concurrency` lasts
    /// without renewal (renewed every third of it): a dead executor's permits come back this
    /// long after it died. At least 1 s. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub upstream_lease_ttl: Duration,
    /// Which upstream serves which model. Not a key of `[executor]`: the binary copies the
    /// top-level `[routing]` table here when it loads the configuration.
    #[serde(skip)]
    pub routing: RoutingConfig,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        let runner = RunnerSettings::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            prefetch: 4,
            chunk_concurrency: runner.chunk_concurrency,
            cancel_poll: runner.cancel_poll,
            max_line_bytes: runner.max_line_bytes,
            chunk_time_budget: runner.chunk_time_budget,
            result_memory_bytes: runner.result_memory_bytes,
            heartbeat_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(60),
            requeue_delay: Duration::from_secs(1),
            upstream_lease_ttl: Duration::from_secs(10),
            routing: RoutingConfig::default(),
        }
    }
}

impl ExecutorConfig {
    /// Checks every field; the error names the bad one.
    ///
    /// # Errors
    /// A zero `prefetch`, `chunk_concurrency`, `cancel_poll`, `max_line_bytes`,
    /// `chunk_time_budget` or `heartbeat_interval`.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefetch == 0 {
            return Err("executor.prefetch must be at least 1".into());
        }
        if self.heartbeat_interval.is_zero() {
            return Err("executor.heartbeat_interval must be more than 0".into());
        }
        if self.upstream_lease_ttl < Duration::from_secs(1) {
            return Err("executor.upstream_lease_ttl must be at least 1s".into());
        }
        self.runner_settings()
            .validate()
            .map_err(|error| format!("executor.{error}"))
    }

    /// Checks that one run of a chunk stays well under the broker's consumer timeout
    /// (`consumer_timeout`; `None`: the queue has none): the time budget plus the longest
    /// attempt of any upstream must be at most three quarters of it. A request retried past
    /// the budget may still take longer (`max_attempts` × `timeout`): that is logged.
    ///
    /// # Errors
    /// The run can outlast the consumer timeout; the message names the settings.
    pub fn check_timing(
        &self,
        upstreams: &Upstreams,
        consumer_timeout: Option<Duration>,
    ) -> Result<(), String> {
        let Some(consumer_timeout) = consumer_timeout else {
            return Ok(());
        };
        let longest_attempt = upstreams
            .iter()
            .map(|upstream| upstream.config().timeout)
            .max()
            .unwrap_or_default();
        let run = self.chunk_time_budget.saturating_add(longest_attempt);
        let allowed = consumer_timeout / 4 * 3;
        if run > allowed {
            return Err(format!(
                "executor.chunk_time_budget ({:?}) plus the longest upstream timeout ({:?}) \
                 must stay under three quarters of queue.consumer_timeout ({:?}), or the \
                 broker takes chunks back while they run: lower them, or raise the broker's \
                 consumer_timeout and queue.consumer_timeout with it",
                self.chunk_time_budget, longest_attempt, consumer_timeout
            ));
        }
        let longest_request = upstreams
            .iter()
            .map(|upstream| {
                let config = upstream.config();
                config
                    .timeout
                    .saturating_mul(config.max_attempts)
                    .saturating_add(
                        config
                            .backoff_max
                            .max(config.max_retry_after)
                            .saturating_mul(config.max_attempts.saturating_sub(1)),
                    )
            })
            .max()
            .unwrap_or_default();
        if self.chunk_time_budget.saturating_add(longest_request) > consumer_timeout {
            tracing::warn!(
                chunk_time_budget_s = self.chunk_time_budget.as_secs(),
                longest_request_s = longest_request.as_secs(),
                consumer_timeout_s = consumer_timeout.as_secs(),
                "a request retried to its last attempt could keep a chunk past the broker's \
                 consumer timeout"
            );
        }
        Ok(())
    }

    /// The settings [`run_chunk`] takes (live-state grouping at its defaults).
    pub fn runner_settings(&self) -> RunnerSettings {
        RunnerSettings {
            chunk_concurrency: self.chunk_concurrency,
            cancel_poll: self.cancel_poll,
            max_line_bytes: self.max_line_bytes,
            chunk_time_budget: self.chunk_time_budget,
            result_memory_bytes: self.result_memory_bytes,
            ..RunnerSettings::default()
        }
    }

    /// How the queue worker consumes chunk tasks for this executor (`max_hold` fit to
    /// `consumer_timeout`).
    pub fn worker_config(&self, consumer_timeout: Option<Duration>) -> WorkerConfig {
        WorkerConfig {
            shutdown_grace: self.shutdown_grace,
            retry_base: self.requeue_delay,
            retry_max: self.requeue_delay.saturating_mul(32),
            ..WorkerConfig::new(QueueKind::ChunkTasks, self.prefetch)
        }
        .fit_to(consumer_timeout)
    }
}

/// The infrastructure the executor runs on; the binary picks the adapters.
#[derive(Debug, Clone)]
pub struct ExecutorPorts {
    /// Inputs are read and parts written here.
    pub storage: Arc<dyn ObjectStore>,
    /// Chunk tasks come from here; chunk results go here.
    pub queue: Arc<dyn WorkQueue>,
    /// Live counts and cancel flags.
    pub state: Arc<dyn LiveState>,
}

/// Failures that stop the executor from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// [`ExecutorConfig::check_timing`] (or the queue worker's settings) refused the
    /// configuration against the queue's consumer timeout.
    #[error("invalid executor configuration: {0}")]
    Config(String),
    /// The routing table cannot be turned into upstreams (bad URL, missing API key...).
    #[error(transparent)]
    Upstreams(#[from] UpstreamsError),
    /// The ops endpoints failed.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// How one run of a chunk delivery ended: the `outcome` label of the chunk metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkDisposition {
    /// Part complete, `DONE` published: the task is acked.
    Completed,
    /// The time budget ended the run: a fresh copy of the task continues it.
    Continued,
    /// A dependency is down (object storage, the queue): the task is held, to run again.
    Held,
    /// Failed on its own: requeued after a delay (counts toward the delivery limit).
    Requeued,
    /// It can never run: `FAILED` published, the task dead-lettered.
    Failed,
    /// Undecodable (no result can be reported): dead-lettered.
    DeadLettered,
    /// Shutdown interrupted it: the task is re-published for another executor.
    Abandoned,
}

impl ChunkDisposition {
    /// Every disposition.
    pub const ALL: [Self; 7] = [
        Self::Completed,
        Self::Continued,
        Self::Held,
        Self::Requeued,
        Self::Failed,
        Self::DeadLettered,
        Self::Abandoned,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Continued => "continued",
            Self::Held => "held",
            Self::Requeued => "requeued",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Makes every executor counter appear at zero, with the label values of `upstreams` and of
/// the kinds that classify attempts, chunk runs and result lines.
fn register_metrics(upstreams: &Upstreams) {
    let names: Vec<&str> = upstreams.iter().map(|upstream| upstream.name()).collect();
    metrics::register(metrics::KnownLabels {
        upstreams: &names,
        attempts: &AttemptKind::ALL.map(|kind| (kind.as_str(), kind.is_retryable())),
        chunks: &ChunkDisposition::ALL.map(ChunkDisposition::as_str),
        lines: &LineKind::ALL.map(LineKind::as_str),
    });
}

/// Runs the executor until `shutdown` is cancelled, then shuts down as the [module
/// docs](self) say, and returns. `config` was validated when it was loaded.
///
/// Upstream API keys are read from the process environment (see [`Upstreams::new`]).
///
/// # Errors
/// At start: upstreams that cannot be built (an API key missing from the environment...), or
/// timings the broker's consumer timeout cannot hold. At the end: the ops server's I/O error.
/// Infrastructure outages while running are never errors: they are waited out, logged and
/// shown by `/readyz`.
pub async fn serve(
    config: ExecutorConfig,
    ports: ExecutorPorts,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let upstreams = Arc::new(Upstreams::new(&config.routing)?);
    let consumer_timeout = ports.queue.consumer_timeout();
    config
        .check_timing(&upstreams, consumer_timeout)
        .map_err(ServeError::Config)?;
    let worker_config = config.worker_config(consumer_timeout);
    worker_config
        .validate(consumer_timeout)
        .map_err(|e| ServeError::Config(format!("executor: {e}")))?;
    metrics::describe();
    register_metrics(&upstreams);
    // From here on each upstream's max_concurrency is one cap across every executor.
    let holder = crate::upstream::holder_id();
    let leases = upstreams.share_caps(Arc::clone(&ports.state), &holder, config.upstream_lease_ttl);

    let readiness = {
        let (storage, queue, state) = (
            Arc::clone(&ports.storage),
            Arc::clone(&ports.queue),
            Arc::clone(&ports.state),
        );
        Readiness::new()
            .check("object_storage", move || {
                let storage = Arc::clone(&storage);
                async move { storage.ping().await.map_err(|e| e.to_string()) }
            })
            .check("queue", move || {
                let queue = Arc::clone(&queue);
                async move { queue.ping().await.map_err(|e| e.to_string()) }
            })
            .check("live_state", move || {
                let state = Arc::clone(&state);
                async move { state.ping().await.map_err(|e| e.to_string()) }
            })
    };
    // The ops endpoints stay up until every delivery is settled.
    let stop_ops = CancellationToken::new();
    let addr = listener.local_addr()?;
    let ops = tokio::spawn(
        axum::serve(listener, nightshift_telemetry::ops_router(readiness))
            .with_graceful_shutdown(stop_ops.clone().cancelled_owned())
            .into_future(),
    );
    tracing::info!(
        addr = %addr,
        prefetch = config.prefetch,
        chunk_concurrency = config.chunk_concurrency,
        chunk_time_budget_s = config.chunk_time_budget.as_secs(),
        upstreams = upstreams.iter().count(),
        "executor listening"
    );

    let handler = Arc::new(ChunkHandler {
        deps: Arc::new(ChunkDeps {
            storage: Arc::clone(&ports.storage),
            state: Arc::clone(&ports.state),
            upstreams,
            settings: config.runner_settings(),
        }),
        queue: Arc::clone(&ports.queue),
        heartbeat_interval: config.heartbeat_interval,
        // A held chunk's heartbeat outlives the hold by one beat at most, so that a task the
        // worker re-published stops renewing the lease soon after.
        heartbeat_linger: worker_config.max_hold,
        heartbeats: Heartbeats::default(),
    });
    let heartbeats = handler.heartbeats.clone();
    let announce = async {
        shutdown.cancelled().await;
        tracing::info!(
            grace_s = config.shutdown_grace.as_secs_f64(),
            "shutting down: taking no more chunks, letting running ones finish"
        );
    };
    tokio::join!(
        run_worker(
            Arc::clone(&ports.queue),
            worker_config,
            handler,
            shutdown.clone()
        ),
        announce
    );

    // Every delivery is settled: no chunk is held any more.
    heartbeats.stop_all();
    leases.release().await;
    stop_ops.cancel();
    let served = match ops.await {
        Ok(served) => served,
        Err(error) => Err(std::io::Error::other(error)),
    };
    tracing::info!("executor stopped");
    served.map_err(ServeError::Io)
}

/// Runs the chunk of each delivery (see the [module docs](self)).
struct ChunkHandler {
    deps: Arc<ChunkDeps>,
    queue: Arc<dyn WorkQueue>,
    heartbeat_interval: Duration,
    heartbeat_linger: Duration,
    heartbeats: Heartbeats,
}

#[async_trait]
impl Handler for ChunkHandler {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let started = Instant::now();
        ::metrics::gauge!(metrics::CHUNKS_IN_PROGRESS).increment(1.0);
        let _in_progress = InProgress;
        if job.attempt == 1 {
            propagation::observe_delivery(QueueKind::ChunkTasks.as_str(), job.headers);
        }
        let disposition = match ChunkTask::decode(job.payload.clone()) {
            Ok(task) if task.schema_version == SCHEMA_VERSION => {
                // A span of the batch's trace: its parent is the scheduler's dispatch.
                let span = tracing::info_span!(
                    "chunk",
                    batch_id = %task.batch_id,
                    chunk_index = task.chunk_index,
                    model = %task.model,
                    tenant_id = %task.tenant_id,
                    first_line = task.first_line,
                    line_count = task.line_count,
                    attempt = task.attempt,
                    delivery_count = job.delivery_count,
                );
                propagation::set_parent_from_headers(&span, job.headers);
                self.process(task, job).instrument(span).await
            }
            Ok(task) => {
                tracing::error!(
                    batch_id = %task.batch_id,
                    chunk_index = task.chunk_index,
                    schema_version = task.schema_version,
                    supported = SCHEMA_VERSION,
                    "chunk task of an unknown schema version: dead-lettering it"
                );
                Disposition::Poison(format!(
                    "chunk task schema version {} (this executor runs {SCHEMA_VERSION})",
                    task.schema_version
                ))
            }
            Err(error) => {
                tracing::error!(
                    error = %error,
                    bytes = job.payload.len(),
                    "undecodable chunk task: dead-lettering it"
                );
                Disposition::Poison(format!("undecodable chunk task: {error}"))
            }
        };
        let labels = [(
            metrics::LABEL_OUTCOME,
            ChunkDisposition::of(&disposition, job).as_str(),
        )];
        ::metrics::counter!(metrics::CHUNKS_TOTAL, &labels).increment(1);
        ::metrics::histogram!(metrics::CHUNK_DURATION_SECONDS, &labels).record(started.elapsed());
        disposition
    }
}

impl ChunkDisposition {
    /// The label of a run that ended with `disposition`.
    fn of(disposition: &Disposition, job: &Job<'_>) -> Self {
        match disposition {
            Disposition::Done => Self::Completed,
            Disposition::Republish if job.is_abandoned() => Self::Abandoned,
            Disposition::Republish => Self::Continued,
            Disposition::Outage { .. } => Self::Held,
            Disposition::Retry(_) => Self::Requeued,
            Disposition::Poison(reason) if reason.starts_with(FAILED_PREFIX) => Self::Failed,
            Disposition::Poison(_) => Self::DeadLettered,
        }
    }
}

/// How the reason of a chunk reported `FAILED` starts (tells it apart in the metrics).
const FAILED_PREFIX: &str = "chunk reported failed: ";

impl ChunkHandler {
    async fn process(&self, task: ChunkTask, job: &Job<'_>) -> Disposition {
        let started = Instant::now();
        if job.attempt == 1 && job.redelivered {
            tracing::info!("running a redelivered chunk");
        } else if job.attempt > 1 {
            tracing::info!(
                attempt = job.attempt,
                "running the chunk again after an outage"
            );
        }
        let heartbeat = self.heartbeats.beat(self, &task, job.headers);
        let run = tokio::select! {
            biased;
            () = job.abandoned() => {
                tracing::warn!("shutdown: abandoning the chunk; it is handed back");
                return Disposition::Republish;
            }
            run = run_chunk(&task, &self.deps) => run,
        };
        let outcome = match run {
            Ok(outcome) => outcome,
            Err(error) if error.is_permanent() => {
                tracing::error!(error = %error, "the chunk can never run: reporting it failed");
                let report = failed_message(&task, &error);
                if let Err(error) = self.publish_result(report, job.headers).await {
                    heartbeat.hold(self.heartbeat_linger);
                    return error;
                }
                return Disposition::Poison(format!("{FAILED_PREFIX}{error}"));
            }
            Err(error) if error.is_outage() => {
                tracing::warn!(error = %error, "object storage unavailable: the chunk waits");
                heartbeat.hold(self.heartbeat_linger);
                return Disposition::Outage {
                    dependency: ChunkError::OUTAGE_DEPENDENCY,
                    error: error.to_string(),
                };
            }
            Err(error) => {
                tracing::warn!(error = %error, "the chunk failed; it will be requeued");
                return Disposition::Retry(error.to_string());
            }
        };
        if !outcome.complete {
            log_outcome(
                &outcome,
                started,
                "time budget spent: a fresh copy continues the chunk",
            );
            return Disposition::Republish;
        }
        if let Err(error) = self
            .publish_result(outcome.result_message(&task), job.headers)
            .await
        {
            heartbeat.hold(self.heartbeat_linger);
            return error;
        }
        log_outcome(&outcome, started, "chunk done");
        Disposition::Done
    }

    /// Publishes a chunk result from within the chunk's span; an error is the
    /// [`Outage`](Disposition::Outage) to return.
    async fn publish_result(
        &self,
        message: ChunkResult,
        task_headers: &Headers,
    ) -> Result<(), Disposition> {
        let headers = result_headers(&tracing::Span::current(), task_headers);
        self.queue
            .publish(
                QueueKind::ChunkResults,
                Bytes::from(message.encode_to_vec()),
                headers,
            )
            .await
            .map_err(|error| {
                tracing::warn!(
                    error = %error,
                    "publishing the chunk result failed; the chunk waits and runs again"
                );
                Disposition::Outage {
                    dependency: QUEUE_DEPENDENCY,
                    error: error.to_string(),
                }
            })
    }
}

fn log_outcome(outcome: &ChunkOutcome, started: Instant, what: &'static str) {
    tracing::info!(
        complete = outcome.complete,
        kept = outcome.kept,
        succeeded = outcome.succeeded,
        failed = outcome.failed,
        cancelled = outcome.cancelled,
        expired = outcome.expired,
        total_tokens = outcome.usage.total_tokens,
        part_bytes = outcome.part_bytes,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "{what}"
    );
}

/// The headers of a chunk result published from within `span`: its trace context (or,
/// without a trace pipeline, the task's own) and `published-at`.
fn result_headers(span: &tracing::Span, task_headers: &Headers) -> Headers {
    let mut headers = propagation::message_headers(span);
    if !headers.contains_key(TRACEPARENT)
        && let Some(traceparent) = task_headers.get(TRACEPARENT)
    {
        headers.insert(TRACEPARENT.to_owned(), traceparent.clone());
    }
    headers
}

/// The `RUNNING` heartbeat of `task`.
fn running_message(task: &ChunkTask) -> ChunkResult {
    ChunkResult {
        schema_version: SCHEMA_VERSION,
        batch_id: task.batch_id.clone(),
        chunk_index: task.chunk_index,
        report: ChunkReport::Running.into(),
        ..ChunkResult::default()
    }
}

/// The `FAILED` report of `task`, carrying `error`'s text.
fn failed_message(task: &ChunkTask, error: &ChunkError) -> ChunkResult {
    ChunkResult {
        schema_version: SCHEMA_VERSION,
        batch_id: task.batch_id.clone(),
        chunk_index: task.chunk_index,
        report: ChunkReport::Failed.into(),
        error: error.to_string(),
        ..ChunkResult::default()
    }
}

/// The heartbeats of the chunks this executor holds. A heartbeat runs while its chunk runs;
/// when the chunk waits out an outage between two runs, it is parked here (by batch and
/// chunk) and taken back by the next run, so the lease is renewed throughout the hold. A
/// parked heartbeat stops by itself once its linger is over (the worker re-published the
/// task: the run of the copy, here or elsewhere, has its own).
#[derive(Debug, Default, Clone)]
struct Heartbeats(Arc<Mutex<HashMap<(String, u32), Beating>>>);

/// A heartbeat task.
#[derive(Debug)]
struct Beating {
    task: AbortHandle,
    /// When it stops by itself; `None` while its chunk runs.
    until: Arc<Mutex<Option<Instant>>>,
}

impl Heartbeats {
    /// The heartbeat of `task` for this run: the parked one, or a new one (its first beat at
    /// once). It stops when the returned guard is dropped, unless [held](Heartbeat::hold).
    fn beat(&self, handler: &ChunkHandler, task: &ChunkTask, task_headers: &Headers) -> Heartbeat {
        let key = (task.batch_id.clone(), task.chunk_index);
        let resumed = {
            let mut parked = lock(&self.0);
            parked.retain(|_, beating| !beating.task.is_finished());
            parked.remove(&key)
        };
        let beating = match resumed {
            Some(beating) => {
                *lock(&beating.until) = None;
                beating
            }
            None => {
                let until = Arc::new(Mutex::new(None));
                let task = tokio::spawn(
                    beat(
                        Arc::clone(&handler.queue),
                        Bytes::from(running_message(task).encode_to_vec()),
                        task_headers.clone(),
                        handler.heartbeat_interval,
                        Arc::clone(&until),
                    )
                    .in_current_span(),
                )
                .abort_handle();
                Beating { task, until }
            }
        };
        Heartbeat {
            beating: Some(beating),
            key,
            parked: self.clone(),
        }
    }
}

impl Heartbeats {
    /// Stops the parked heartbeats (at shutdown, once nothing is held).
    fn stop_all(&self) {
        for (_, beating) in lock(&self.0).drain() {
            beating.task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned value is still consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One run's hold on its chunk's heartbeat.
#[derive(Debug)]
struct Heartbeat {
    beating: Option<Beating>,
    key: (String, u32),
    parked: Heartbeats,
}

impl Heartbeat {
    /// The chunk waits out an outage: keep beating, at most `linger` more unless a run takes
    /// the heartbeat back.
    fn hold(mut self, linger: Duration) {
        if let Some(beating) = self.beating.take() {
            *lock(&beating.until) = Some(Instant::now() + linger);
            lock(&self.parked.0).insert(self.key.clone(), beating);
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        if let Some(beating) = self.beating.take() {
            beating.task.abort();
        }
    }
}

/// Publishes `message` (a `RUNNING` report) now and every `interval`, until aborted or past
/// `until`. A failed publish is skipped: the next beat may get through.
async fn beat(
    queue: Arc<dyn WorkQueue>,
    message: Bytes,
    task_headers: Headers,
    interval: Duration,
    until: Arc<Mutex<Option<Instant>>>,
) {
    loop {
        if lock(&until).is_some_and(|until| Instant::now() >= until) {
            return;
        }
        let headers = result_headers(&tracing::Span::current(), &task_headers);
        if let Err(error) = queue
            .publish(QueueKind::ChunkResults, message.clone(), headers)
            .await
        {
            tracing::debug!(error = %error, "a chunk heartbeat could not be published");
        }
        tokio::time::sleep(interval).await;
    }
}

/// Decrements the in-progress gauge when a chunk run ends, however it ends.
struct InProgress;

impl Drop for InProgress {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CHUNKS_IN_PROGRESS).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let config = ExecutorConfig::default();
        assert_eq!(config.listen.port(), 9092);
        assert_eq!(config.prefetch, 4);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(config.chunk_time_budget, Duration::from_secs(600));
        assert!(config.validate().is_ok());
        let parsed: ExecutorConfig = serde_json::from_value(serde_json::json!({
            "prefetch": 2, "cancel_poll": "1s", "heartbeat_interval": "10s",
            "chunk_time_budget": "5m"
        }))
        .unwrap();
        assert_eq!(parsed.prefetch, 2);
        assert_eq!(parsed.cancel_poll, Duration::from_secs(1));
        assert_eq!(parsed.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(
            parsed.runner_settings().chunk_time_budget,
            Duration::from_secs(300)
        );
        assert!(
            serde_json::from_value::<ExecutorConfig>(serde_json::json!({"prefech": 2})).is_err()
        );
        for bad in [
            ExecutorConfig {
                prefetch: 0,
                ..ExecutorConfig::default()
            },
            ExecutorConfig {
                chunk_concurrency: 0,
                ..ExecutorConfig::default()
            },
            ExecutorConfig {
                cancel_poll: Duration::ZERO,
                ..ExecutorConfig::default()
            },
            ExecutorConfig {
                heartbeat_interval: Duration::ZERO,
                ..ExecutorConfig::default()
            },
            ExecutorConfig {
                chunk_time_budget: Duration::ZERO,
                ..ExecutorConfig::default()
            },
            ExecutorConfig {
                upstream_lease_ttl: Duration::from_millis(999),
                ..ExecutorConfig::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    #[test]
    fn the_worker_settles_as_the_executor_config_says() {
        let config = ExecutorConfig {
            prefetch: 3,
            shutdown_grace: Duration::from_secs(7),
            requeue_delay: Duration::from_millis(100),
            ..ExecutorConfig::default()
        };
        let worker = config.worker_config(Some(Duration::from_secs(30 * 60)));
        assert_eq!(worker.kind, QueueKind::ChunkTasks);
        assert_eq!(worker.prefetch, 3);
        assert_eq!(worker.shutdown_grace, Duration::from_secs(7));
        assert_eq!(worker.retry_delay(0), Duration::from_millis(100));
        assert_eq!(worker.retry_delay(10), Duration::from_millis(3200));
        assert_eq!(worker.max_hold, Duration::from_secs(300));
        worker.validate(Some(Duration::from_secs(30 * 60))).unwrap();
        // A broker that takes deliveries back after a minute: held at most 15 s.
        assert_eq!(
            config.worker_config(Some(Duration::from_secs(60))).max_hold,
            Duration::from_secs(15)
        );
    }

    #[test]
    fn a_run_must_fit_well_under_the_consumer_timeout() {
        let routing: RoutingConfig = serde_json::from_value(serde_json::json!({
            "upstreams": [{"name": "u", "base_url": "http://127.0.0.1:1/v1", "models": ["*"],
                           "timeout": "2m"}]
        }))
        .unwrap();
        let upstreams = Upstreams::new(&routing).unwrap();
        let config = ExecutorConfig {
            chunk_time_budget: Duration::from_secs(10 * 60),
            ..ExecutorConfig::default()
        };
        // 10 + 2 minutes against 30: fine; without a consumer timeout: fine.
        config
            .check_timing(&upstreams, Some(Duration::from_secs(30 * 60)))
            .unwrap();
        config.check_timing(&upstreams, None).unwrap();
        // Against 15 minutes (three quarters: 11¼): refused, naming the settings.
        let message = config
            .check_timing(&upstreams, Some(Duration::from_secs(15 * 60)))
            .unwrap_err();
        assert!(message.contains("chunk_time_budget"), "{message}");
        assert!(message.contains("consumer_timeout"), "{message}");
    }

    #[test]
    fn dispositions_map_to_meaningful_labels() {
        let payload = Bytes::from_static(b"");
        let headers = Headers::new();
        let job = Job::new(&payload, &headers);
        let label = |d: Disposition| ChunkDisposition::of(&d, &job).as_str();
        assert_eq!(label(Disposition::Done), "completed");
        assert_eq!(label(Disposition::Republish), "continued");
        assert_eq!(
            label(Disposition::Outage {
                dependency: QUEUE_DEPENDENCY,
                error: String::new()
            }),
            "held"
        );
        assert_eq!(label(Disposition::Retry(String::new())), "requeued");
        assert_eq!(
            label(Disposition::Poison(format!("{FAILED_PREFIX}gone"))),
            "failed"
        );
        assert_eq!(
            label(Disposition::Poison("undecodable".into())),
            "dead_lettered"
        );
    }
}
