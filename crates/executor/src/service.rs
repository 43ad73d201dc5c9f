//! The executor service: consume chunk tasks, run them, announce their results.
//!
//! [`serve`] runs until its shutdown future completes:
//!
//! - **Ops endpoints** on the listener: `/livez`, `/readyz` (object storage, queue and live
//!   state answer), `/metrics`.
//! - **Consuming.** One consumer of [`QueueKind::ChunkTasks`] holding at most `prefetch`
//!   deliveries; at most `prefetch` chunks run at once, each in its own task (even across a
//!   consumer that broke and the one that replaced it). A consumer that ends (connection
//!   lost) is replaced, after a backoff of [`CONSUME_RETRY_BASE`] doubling up to
//!   [`CONSUME_RETRY_MAX`]; so is a failed `consume`.
//! - **One delivery** ([`ChunkDisposition`] names the endings):
//!   1. decode the [`ChunkTask`]; an undecodable payload or an unknown `schema_version` is
//!      dead-lettered at once (it can never run);
//!   2. [`run_chunk`]: its part is written to object storage;
//!   3. publish the [`ChunkResult`](nightshift_proto::v1::ChunkResult) to
//!      [`QueueKind::ChunkResults`] (`schema_version` 1; headers: the `traceparent` of the
//!      chunk's span — a child of the task's — and `published-at`) and wait for the broker's
//!      confirm;
//!   4. only then ack the task (invariant 2: nothing is acked before its result is durable).
//!      A lost ack means the chunk runs again: its part is rewritten identically (modulo
//!      upstream answers) and its result published again, which the scheduler absorbs.
//!
//!   A chunk that fails for a reason retrying cannot fix
//!   ([`ChunkError::is_permanent`](crate::runner::ChunkError::is_permanent)) is
//!   dead-lettered. One that fails for an infrastructure reason (storage unreachable, the
//!   result not published) is requeued — after holding it for `requeue_delay × 2^n` (`n` =
//!   the deliveries it already had, capped at 32×), so an outage does not burn its delivery
//!   limit in a few seconds, and a held delivery keeps this executor from taking more work
//!   it cannot do. The queue's delivery limit dead-letters a chunk that keeps failing.
//! - **Shutdown.** When `shutdown` completes: stop taking deliveries; chunks waiting to be
//!   requeued are requeued at once; running chunks get `shutdown_grace` to finish (and
//!   publish, and ack). Past it, those still running stop and are requeued (their requests
//!   in flight are abandoned; the next executor runs the chunk again). Then the consumer is
//!   dropped, the ops endpoints stop, and `serve` returns.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nightshift_core::routing::RoutingConfig;
use nightshift_proto::v1::ChunkTask;
use nightshift_queue::{Consumer, Delivery, QueueKind, WorkQueue};
use nightshift_state::LiveState;
use nightshift_storage::ObjectStore;
use nightshift_telemetry::Readiness;
use nightshift_telemetry::propagation;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::metrics;
use crate::runner::{ChunkDeps, RunnerSettings, SCHEMA_VERSION, run_chunk};
use crate::upstream::{Upstreams, UpstreamsError};

/// First wait before consuming again after the consumer ended or `consume` failed.
pub const CONSUME_RETRY_BASE: Duration = Duration::from_millis(200);
/// Longest wait between two attempts to consume.
pub const CONSUME_RETRY_MAX: Duration = Duration::from_secs(10);
/// Longest wait, once the grace period is over, for the unfinished chunks to be requeued;
/// past it their tasks are aborted (their deliveries, dropped, return to the queue anyway).
pub const REQUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// The header carrying the W3C trace context, from a task to its chunk span and from that
/// span to the chunk's result.
pub const TRACEPARENT: &str = propagation::TRACEPARENT;

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
    /// On shutdown, how long running chunks may take to finish before they are requeued.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a chunk that failed for an infrastructure reason is held before it is
    /// requeued, doubled per earlier delivery (at most 32×). Default 1 s.
    #[serde(with = "humantime_serde")]
    pub requeue_delay: Duration,
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
            shutdown_grace: Duration::from_secs(60),
            requeue_delay: Duration::from_secs(1),
        }
    }
}

impl ExecutorConfig {
    /// Checks every field; the error names the bad one.
    ///
    /// # Errors
    /// A zero `prefetch`, `chunk_concurrency`, `cancel_poll` or `max_line_bytes`.
    pub fn validate(&self) -> Result<(), String> {
        if self.prefetch == 0 {
            return Err("executor.prefetch must be at least 1".into());
        }
        self.runner_settings()
            .validate()
            .map_err(|error| format!("executor.{error}"))
    }

    /// The settings [`run_chunk`] takes (live-state grouping at its defaults).
    pub fn runner_settings(&self) -> RunnerSettings {
        RunnerSettings {
            chunk_concurrency: self.chunk_concurrency,
            cancel_poll: self.cancel_poll,
            max_line_bytes: self.max_line_bytes,
            ..RunnerSettings::default()
        }
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
    /// [`ExecutorConfig::validate`] refused the configuration.
    #[error("invalid executor configuration: {0}")]
    Config(String),
    /// The routing table cannot be turned into upstreams (bad URL, missing API key...).
    #[error(transparent)]
    Upstreams(#[from] UpstreamsError),
    /// The ops endpoints failed.
    #[error("serve: {0}")]
    Io(#[from] std::io::Error),
}

/// How one chunk delivery ended: the `outcome` label of the chunk metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkDisposition {
    /// Part written, result published, task acked (or the ack was lost: it comes back).
    Completed,
    /// An infrastructure failure: returned to the queue, to run again.
    Requeued,
    /// It can never run: moved to the dead-letter queue.
    DeadLettered,
    /// Shutdown interrupted it: returned to the queue.
    Abandoned,
}

impl ChunkDisposition {
    /// Every disposition.
    pub const ALL: [Self; 4] = [
        Self::Completed,
        Self::Requeued,
        Self::DeadLettered,
        Self::Abandoned,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Requeued => "requeued",
            Self::DeadLettered => "dead_lettered",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Where the service is in its life; every chunk task watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Taking and running chunks.
    Running,
    /// Shutdown began: no new chunks; chunks waiting to be requeued requeue now.
    Draining,
    /// The grace period is over: running chunks stop and requeue.
    Abandoning,
}

/// Runs the executor until `shutdown` completes, then shuts down as the [module
/// docs](self) say, and returns.
///
/// Upstream API keys are read from the process environment (see [`Upstreams::new`]).
///
/// # Errors
/// At start: an invalid `config` or `routing`. At the end: the ops server's I/O error.
/// Infrastructure outages while running are never errors: they are logged, retried and
/// shown by `/readyz`.
pub async fn serve(
    config: ExecutorConfig,
    routing: RoutingConfig,
    ports: ExecutorPorts,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    let upstreams = Arc::new(Upstreams::new(&routing)?);
    metrics::describe();
    metrics::register(&upstreams);

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
    let (stop_ops, ops_stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = listener.local_addr()?;
    let ops = tokio::spawn(async move {
        axum::serve(listener, nightshift_telemetry::ops_router(readiness))
            .with_graceful_shutdown(async {
                _ = ops_stopped.await;
            })
            .await
    });
    tracing::info!(
        addr = %addr,
        prefetch = config.prefetch,
        chunk_concurrency = config.chunk_concurrency,
        upstreams = upstreams.iter().count(),
        "executor listening"
    );

    let worker = Worker {
        deps: Arc::new(ChunkDeps {
            storage: Arc::clone(&ports.storage),
            state: Arc::clone(&ports.state),
            upstreams,
            settings: config.runner_settings(),
        }),
        queue: Arc::clone(&ports.queue),
        requeue_delay: config.requeue_delay,
    };
    let (phase, phase_rx) = watch::channel(Phase::Running);
    let mut chunks = JoinSet::new();
    let consumer = consume(&worker, &phase_rx, config.prefetch, &mut chunks, shutdown).await;

    // Drain: no new chunks; running ones get the grace period.
    phase.send_replace(Phase::Draining);
    while let Some(joined) = chunks.try_join_next() {
        log_join(joined);
    }
    tracing::info!(
        running = chunks.len(),
        grace_s = config.shutdown_grace.as_secs_f64(),
        "shutting down: taking no more chunks, letting running ones finish"
    );
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while let Some(joined) = chunks.join_next().await {
            log_join(joined);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            running = chunks.len(),
            "shutdown grace period over: requeueing unfinished chunks"
        );
        phase.send_replace(Phase::Abandoning);
        let requeued = tokio::time::timeout(REQUEUE_TIMEOUT, async {
            while let Some(joined) = chunks.join_next().await {
                log_join(joined);
            }
        })
        .await;
        if requeued.is_err() {
            tracing::warn!(
                running = chunks.len(),
                "chunks not requeued in time: dropping them (they return to the queue)"
            );
            chunks.shutdown().await;
        }
    }
    // Every delivery is settled (or dropped): the consumer may go.
    drop(consumer);

    _ = stop_ops.send(());
    let served = match ops.await {
        Ok(served) => served,
        Err(error) => Err(std::io::Error::other(error)),
    };
    tracing::info!("executor stopped");
    served.map_err(ServeError::Io)
}

/// Takes deliveries and spawns their chunks into `chunks` until `shutdown` completes; returns
/// the consumer in use, which must outlive the chunks' settlements.
async fn consume(
    worker: &Worker,
    phase: &watch::Receiver<Phase>,
    prefetch: u16,
    chunks: &mut JoinSet<()>,
    shutdown: impl Future<Output = ()>,
) -> Option<Box<dyn Consumer>> {
    let mut shutdown = std::pin::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(usize::from(prefetch)));
    let mut consumer: Option<Box<dyn Consumer>> = None;
    let mut retry = CONSUME_RETRY_BASE;
    loop {
        while let Some(joined) = chunks.try_join_next() {
            log_join(joined);
        }
        let Some(active) = consumer.as_mut() else {
            let started = tokio::select! {
                biased;
                () = &mut shutdown => return None,
                started = worker.queue.consume(QueueKind::ChunkTasks, prefetch) => started,
            };
            match started {
                Ok(started) => {
                    tracing::info!(prefetch, "consuming chunk tasks");
                    consumer = Some(started);
                }
                Err(error) => {
                    tracing::warn!(
                        error = %error,
                        retry_in_ms = retry.as_millis(),
                        "cannot consume chunk tasks; retrying"
                    );
                    if pause(&mut shutdown, &mut retry).await {
                        return None;
                    }
                }
            }
            continue;
        };
        // A free slot first, then a delivery: never more than `prefetch` chunks running.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => return consumer,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else {
            // The semaphore is never closed.
            return consumer;
        };
        let next = tokio::select! {
            biased;
            () = &mut shutdown => return consumer,
            next = active.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                retry = CONSUME_RETRY_BASE;
                chunks.spawn(worker.clone().handle(delivery, phase.clone(), slot));
            }
            Some(Err(error)) => {
                tracing::warn!(error = %error, "the chunk-task consumer failed");
            }
            None => {
                tracing::warn!(
                    retry_in_ms = retry.as_millis(),
                    "the chunk-task consumer ended; consuming again"
                );
                consumer = None;
                if pause(&mut shutdown, &mut retry).await {
                    return None;
                }
            }
        }
    }
}

/// Sleeps `retry` (then doubles it, up to the maximum); true if shutdown came first.
async fn pause(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    retry: &mut Duration,
) -> bool {
    let wait = *retry;
    *retry = (*retry * 2).min(CONSUME_RETRY_MAX);
    tokio::select! {
        biased;
        () = shutdown.as_mut() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined
        && error.is_panic()
    {
        // The delivery was dropped while unwinding: it returns to the queue.
        tracing::error!(error = %error, "a chunk task panicked; its chunk returns to the queue");
    }
}

/// What every chunk task shares.
#[derive(Clone)]
struct Worker {
    deps: Arc<ChunkDeps>,
    queue: Arc<dyn WorkQueue>,
    requeue_delay: Duration,
}

impl Worker {
    /// Handles one delivery to its settlement; holds `_slot` (one of `prefetch`) meanwhile.
    async fn handle(
        self,
        delivery: Delivery,
        phase: watch::Receiver<Phase>,
        _slot: OwnedSemaphorePermit,
    ) {
        let started = Instant::now();
        ::metrics::gauge!(metrics::CHUNKS_IN_PROGRESS).increment(1.0);
        let _in_progress = InProgress;
        propagation::observe_delivery(QueueKind::ChunkTasks.as_str(), &delivery.headers);
        let disposition = match ChunkTask::decode(delivery.payload.clone()) {
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
                    delivery_count = delivery.delivery_count,
                );
                propagation::set_parent_from_headers(&span, &delivery.headers);
                self.process(task, delivery, phase).instrument(span).await
            }
            Ok(task) => {
                tracing::error!(
                    batch_id = %task.batch_id,
                    chunk_index = task.chunk_index,
                    schema_version = task.schema_version,
                    supported = SCHEMA_VERSION,
                    "chunk task of an unknown schema version: dead-lettering it"
                );
                dead_letter(delivery).await
            }
            Err(error) => {
                tracing::error!(
                    error = %error,
                    bytes = delivery.payload.len(),
                    "undecodable chunk task: dead-lettering it"
                );
                dead_letter(delivery).await
            }
        };
        let labels = [(metrics::LABEL_OUTCOME, disposition.as_str())];
        ::metrics::counter!(metrics::CHUNKS_TOTAL, &labels).increment(1);
        ::metrics::histogram!(metrics::CHUNK_DURATION_SECONDS, &labels).record(started.elapsed());
    }

    async fn process(
        &self,
        task: ChunkTask,
        delivery: Delivery,
        mut phase: watch::Receiver<Phase>,
    ) -> ChunkDisposition {
        let started = Instant::now();
        if delivery.redelivered {
            tracing::info!("running a redelivered chunk");
        }
        let run = tokio::select! {
            biased;
            () = reached(&mut phase, Phase::Abandoning) => {
                tracing::warn!("shutdown: abandoning the chunk, requeueing it");
                return requeue(delivery, ChunkDisposition::Abandoned).await;
            }
            run = run_chunk(&task, &self.deps) => run,
        };
        let outcome = match run {
            Ok(outcome) => outcome,
            Err(error) if error.is_permanent() => {
                tracing::error!(error = %error, "the chunk can never run: dead-lettering it");
                return dead_letter(delivery).await;
            }
            Err(error) => {
                tracing::warn!(error = %error, "the chunk failed; it will be requeued");
                return self.requeue_later(delivery, phase, &error).await;
            }
        };

        let message = outcome.result_message(&task).encode_to_vec();
        // The result continues the trace from this chunk's span; without a trace pipeline,
        // the task's own context is passed on.
        let mut headers = propagation::message_headers(&tracing::Span::current());
        if !headers.contains_key(TRACEPARENT)
            && let Some(traceparent) = delivery.headers.get(TRACEPARENT)
        {
            headers.insert(TRACEPARENT.to_owned(), traceparent.clone());
        }
        if let Err(error) = self
            .queue
            .publish(QueueKind::ChunkResults, Bytes::from(message), headers)
            .await
        {
            tracing::warn!(
                error = %error,
                "publishing the chunk result failed; \
                 the chunk will be requeued (its part is rewritten)"
            );
            return self.requeue_later(delivery, phase, &error).await;
        }
        if let Err(error) = delivery.ack().await {
            // Result durable and announced; the chunk comes back and is redone idempotently.
            tracing::warn!(error = %error, "acking the chunk task failed; it will run again");
        }
        tracing::info!(
            succeeded = outcome.succeeded,
            failed = outcome.failed,
            cancelled = outcome.cancelled,
            expired = outcome.expired,
            total_tokens = outcome.usage.total_tokens,
            part_bytes = outcome.part_bytes,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "chunk done"
        );
        ChunkDisposition::Completed
    }

    /// Holds the delivery `requeue_delay × 2^min(delivery_count, 5)` (less if shutdown
    /// begins), then requeues it.
    async fn requeue_later(
        &self,
        delivery: Delivery,
        mut phase: watch::Receiver<Phase>,
        error: &(dyn std::error::Error + Send + Sync),
    ) -> ChunkDisposition {
        let wait = self.requeue_delay * (1u32 << delivery.delivery_count.min(5));
        tracing::debug!(
            error = %error,
            wait_ms = wait.as_millis(),
            "holding the chunk before requeueing it"
        );
        tokio::select! {
            biased;
            () = reached(&mut phase, Phase::Draining) => {}
            () = tokio::time::sleep(wait) => {}
        }
        requeue(delivery, ChunkDisposition::Requeued).await
    }
}

/// Completes once the service's phase is `at_least` (never if the service is gone).
async fn reached(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    if phase.wait_for(|phase| *phase >= at_least).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn requeue(delivery: Delivery, disposition: ChunkDisposition) -> ChunkDisposition {
    if let Err(error) = delivery.requeue().await {
        // Its consumer is gone: the message returns to the queue anyway.
        tracing::warn!(
            error = %error,
            "requeueing the chunk task failed; it returns to the queue anyway"
        );
    }
    disposition
}

async fn dead_letter(delivery: Delivery) -> ChunkDisposition {
    if let Err(error) = delivery.dead_letter().await {
        tracing::warn!(
            error = %error,
            "dead-lettering the chunk task failed; it will be delivered again"
        );
    }
    ChunkDisposition::DeadLettered
}

/// Decrements the in-progress gauge when a chunk task ends, however it ends.
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
        assert!(config.validate().is_ok());
        let parsed: ExecutorConfig =
            serde_json::from_value(serde_json::json!({"prefetch": 2, "cancel_poll": "1s"}))
                .unwrap();
        assert_eq!(parsed.prefetch, 2);
        assert_eq!(parsed.cancel_poll, Duration::from_secs(1));
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
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
