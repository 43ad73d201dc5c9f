//! The one queue-consumer lifecycle: consume, run a handler, settle.
//!
//! Every service that consumes a queue (the executor's chunk tasks, the scheduler's chunk
//! results, the finalizer's finalize jobs) gives [`run_worker`] only its [`Handler`]; the
//! worker owns everything else, so the contract lives in one tested place:
//!
//! **Nothing is acked before it is durable; outages wait; only poison counts.**
//!
//! - **Consuming.** One consumer of [`WorkerConfig::kind`]. A failed [`WorkQueue::consume`] or a
//!   consumer that ends (connection lost, channel closed by the broker) is replaced after a
//!   backoff starting at [`RECONNECT_BASE`] and doubling up to [`WorkerConfig::retry_max`]
//!   (reset by the next delivery). At most [`WorkerConfig::prefetch`] handlers run at once,
//!   each on its own delivery in its own task, also across a consumer that broke and the one
//!   that replaced it.
//! - **Settling**, by the [`Disposition`] the handler returns. A handler decides *what*
//!   happened; it never sleeps, requeues or acks by itself.
//!   - [`Done`](Disposition::Done): ack. The handler returns it only once the effects of the
//!     message are durable.
//!   - [`Poison`](Disposition::Poison): the message can never be handled: dead-letter it at
//!     once.
//!   - [`Retry`](Disposition::Retry): the message failed on its own but may work later: hold
//!     it `retry_base × 2^delivery_count` (capped at `retry_max`), then requeue it. This is
//!     the only path that counts toward the queue's delivery limit, so a message that keeps
//!     failing ends in the dead-letter queue.
//!   - [`Outage`](Disposition::Outage): a dependency is down; the message is fine. It does not
//!     count. The delivery is held and the handler runs again on it after a backoff (1 s,
//!     doubling, capped at `outage_backoff_max`), and while any handler is in an outage the
//!     worker takes no new delivery (the held one is the probe). After holding it for
//!     `max_hold` (kept well under the broker's consumer timeout, see
//!     [`WorkerConfig::validate`]), or once the delivery is `2 × max_hold` old (a long run
//!     that met an outage at its end: its consumer-timeout clock has run a while already),
//!     the worker publishes a fresh copy (same payload and headers, `delivery_count` 0) and
//!     acks the original; the copy starts with a fresh clock.
//!   - [`Republish`](Disposition::Republish): a continuation (the executor's time budget cut a
//!     chunk short): publish a fresh copy, then ack.
//!
//!   Whenever a copy is published, the original is acked only after the copy's publish
//!   returned `Ok` (durable); if publishing fails, the original is requeued instead (which
//!   counts). A handler that panics is a [`Retry`](Disposition::Retry).
//! - **Shutdown**, when the `shutdown` token is cancelled: take nothing more ([`Job::draining`]
//!   completes; the consumer is [cancelled](Consumer::cancel), and deliveries the broker had
//!   already pushed to it are re-published untouched); handlers in an outage stop waiting and their deliveries are re-published; a
//!   [`Retry`](Disposition::Retry) waiting out its delay is requeued at once; running handlers
//!   get [`WorkerConfig::shutdown_grace`] to finish. Past it [`Job::abandoned`] completes: a
//!   handler should stop at once; whatever it returns but [`Done`](Disposition::Done) or
//!   [`Poison`](Disposition::Poison) re-publishes its delivery as a fresh copy (no count;
//!   requeued if publishing fails). A handler still running [`ABANDON_WAIT`] after that is
//!   dropped and its delivery re-published likewise. [`run_worker`] returns once every
//!   delivery is settled — at most [`SHUTDOWN_MARGIN`] after the grace period — and only then
//!   drops its consumer.
//!
//! A delivery whose consumer was lost meanwhile cannot be settled any more: whatever the
//! worker asks fails, and the broker delivers the message again (handlers are idempotent).
//!
//! Metrics ([`crate::metrics`]): `nightshift_queue_handled_total{queue, disposition}`,
//! `nightshift_queue_outage_holds{queue}`, `nightshift_queue_republished_total{queue, reason}`.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{Consumer, Delivery, Headers, QueueKind, WorkQueue, metrics};

/// First wait before consuming again after `consume` failed or the consumer ended.
pub const RECONNECT_BASE: Duration = Duration::from_millis(200);
/// First wait before running a handler in an outage again (unless `outage_backoff_max` is
/// shorter).
pub const OUTAGE_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest `max_hold` a worker uses by default, and whatever the consumer timeout.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(5 * 60);
/// How long a handler may still run once [`Job::abandoned`] completed before it is dropped.
pub const ABANDON_WAIT: Duration = Duration::from_secs(5);
/// How long the last settlements (publishing copies, acks) may take at shutdown before the
/// deliveries left are dropped (they return to the queue).
pub const SETTLE_WAIT: Duration = Duration::from_secs(10);
/// The longest [`run_worker`] takes to return after `shutdown_grace` is over: a process that
/// shuts down should wait `shutdown_grace + SHUTDOWN_MARGIN` for it.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(15);

/// How a [`run_worker`] consumes and settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// The queue consumed.
    pub kind: QueueKind,
    /// Handlers at once (= unsettled deliveries at once); ≥ 1.
    pub prefetch: u16,
    /// At shutdown, how long running handlers may take to finish before they are abandoned.
    pub shutdown_grace: Duration,
    /// [`Disposition::Retry`]: requeue after `retry_base × 2^delivery_count`...
    pub retry_base: Duration,
    /// ... capped here. Also the longest wait between two attempts to consume.
    pub retry_max: Duration,
    /// [`Disposition::Outage`]: the handler runs again after 1 s, doubling up to this.
    pub outage_backoff_max: Duration,
    /// [`Disposition::Outage`]: a delivery is held at most this long, then re-published as a
    /// fresh copy and acked. Must stay well under the broker's consumer timeout.
    pub max_hold: Duration,
}

impl WorkerConfig {
    /// Defaults for consuming `kind`, `prefetch` at once: grace 60 s, retry 1 s doubling up
    /// to 60 s, outage backoff up to 30 s, `max_hold` [`DEFAULT_MAX_HOLD`] (fit it to the
    /// broker with [`fit_to`](Self::fit_to)).
    pub fn new(kind: QueueKind, prefetch: u16) -> Self {
        Self {
            kind,
            prefetch,
            shutdown_grace: Duration::from_secs(60),
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            outage_backoff_max: Duration::from_secs(30),
            max_hold: DEFAULT_MAX_HOLD,
        }
    }

    /// Lowers `max_hold` to [`max_hold_for`]`(consumer_timeout)` if it is longer (pass
    /// [`WorkQueue::consumer_timeout`]).
    pub fn fit_to(mut self, consumer_timeout: Option<Duration>) -> Self {
        self.max_hold = self.max_hold.min(max_hold_for(consumer_timeout));
        self
    }

    /// Checks every field against each other and against the broker's consumer timeout
    /// ([`WorkQueue::consumer_timeout`]; `None`: the queue has none). The error names the bad
    /// field.
    ///
    /// # Errors
    /// A zero `prefetch`, `outage_backoff_max` or `max_hold`; `retry_max` under `retry_base`;
    /// a `max_hold` over half the consumer timeout (a held delivery would risk the broker
    /// taking it back from the consumer, and with it every other delivery of that consumer).
    pub fn validate(&self, consumer_timeout: Option<Duration>) -> Result<(), String> {
        if self.prefetch == 0 {
            return Err("prefetch must be at least 1".into());
        }
        if self.retry_max < self.retry_base {
            return Err("retry_max must be at least retry_base".into());
        }
        if self.outage_backoff_max.is_zero() || self.max_hold.is_zero() {
            return Err("outage_backoff_max and max_hold must be positive".into());
        }
        if let Some(timeout) = consumer_timeout
            && self.max_hold > timeout / 2
        {
            return Err(format!(
                "max_hold ({:?}) must stay well under the broker's consumer_timeout ({:?}): at \
                 most half of it (queue.consumer_timeout must match the broker's setting)",
                self.max_hold, timeout
            ));
        }
        Ok(())
    }

    /// How long a [`Disposition::Retry`] of a delivery with this `delivery_count` is held
    /// before it is requeued: `retry_base × 2^delivery_count`, at most `retry_max`.
    pub fn retry_delay(&self, delivery_count: u32) -> Duration {
        let factor = 1u32 << delivery_count.min(31);
        self.retry_base.saturating_mul(factor).min(self.retry_max)
    }
}

/// The `max_hold` that suits a broker whose consumer timeout is `consumer_timeout`: a quarter
/// of it, at most [`DEFAULT_MAX_HOLD`] (which is also the answer without a timeout).
pub fn max_hold_for(consumer_timeout: Option<Duration>) -> Duration {
    consumer_timeout.map_or(DEFAULT_MAX_HOLD, |timeout| {
        (timeout / 4).min(DEFAULT_MAX_HOLD)
    })
}

/// What a handler says happened to one delivery; the worker settles it accordingly (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Handled, its effects durable: ack.
    Done,
    /// The message failed on its own and may work later (the reason, for logs): requeue it
    /// after a delay. Counts toward the delivery limit.
    Retry(String),
    /// A dependency is down (`dependency`: a short fixed name such as `"object_storage"`;
    /// `error`: for logs): hold the delivery and run the handler again on it later. Never
    /// counts.
    Outage {
        dependency: &'static str,
        error: String,
    },
    /// The message can never be handled (the reason, for logs): dead-letter it.
    Poison(String),
    /// Publish a fresh copy of the message and ack this one (a continuation).
    Republish,
}

impl Disposition {
    /// A short stable name: `done`, `retry`, `outage`, `poison` or `republish`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry(_) => "retry",
            Self::Outage { .. } => "outage",
            Self::Poison(_) => "poison",
            Self::Republish => "republish",
        }
    }
}

/// What a handler gets for one delivery: the message and its delivery facts (read-only), and
/// the shutdown signals.
#[derive(Debug)]
pub struct Job<'a> {
    /// The message as published.
    pub payload: &'a Bytes,
    /// Its headers as published.
    pub headers: &'a Headers,
    /// How many times the message returned to its queue before this delivery
    /// ([`Delivery::delivery_count`]); a re-published copy starts again at 0.
    pub delivery_count: u32,
    /// The message may have been delivered before ([`Delivery::redelivered`]).
    pub redelivered: bool,
    /// How many times the handler has been called for this delivery, this call included: 1,
    /// then 2, 3... when it runs again after an [`Outage`](Disposition::Outage).
    pub attempt: u32,
    draining: CancellationToken,
    abandoned: CancellationToken,
}

impl<'a> Job<'a> {
    /// A job outside any worker (to test a handler): attempt 1 of a first delivery, never
    /// draining nor abandoned.
    pub fn new(payload: &'a Bytes, headers: &'a Headers) -> Self {
        Self {
            payload,
            headers,
            delivery_count: 0,
            redelivered: false,
            attempt: 1,
            draining: CancellationToken::new(),
            abandoned: CancellationToken::new(),
        }
    }

    /// Completes when the grace period is over: stop now (the delivery is re-published).
    pub async fn abandoned(&self) {
        self.abandoned.cancelled().await;
    }

    /// Completes when shutdown began (stop waiting for anything optional).
    pub async fn draining(&self) {
        self.draining.cancelled().await;
    }

    /// Whether shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Whether the grace period is over (see [`abandoned`](Self::abandoned)).
    pub fn is_abandoned(&self) -> bool {
        self.abandoned.is_cancelled()
    }
}

/// What a service does with one delivery.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery; may be called again for the same delivery after an
    /// [`Outage`](Disposition::Outage). Dropping the future (a handler still running
    /// [`ABANDON_WAIT`] after [`Job::abandoned`]) must leave nothing inconsistent.
    async fn handle(&self, job: &Job<'_>) -> Disposition;
}

/// Consumes [`WorkerConfig::kind`] and runs `handler` on every delivery until `shutdown` is
/// cancelled, then drains as the [module docs](self) say; returns when every delivery is
/// settled.
///
/// A configuration that [`WorkerConfig::validate`] refuses is corrected (a `prefetch` of 1 at
/// least, `max_hold` fit to the consumer timeout) and logged: check it at start-up instead.
pub async fn run_worker(
    queue: Arc<dyn WorkQueue>,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let config = corrected(config, queue.consumer_timeout());
    metrics::describe();
    metrics::register(config.kind);
    let shared = Arc::new(Shared {
        queue,
        config,
        handler,
        draining: shutdown,
        abandoned: CancellationToken::new(),
        outages: watch::Sender::new(0),
    });
    let mut jobs = JoinSet::new();
    let consumer = take(&shared, &mut jobs).await;
    drain(&shared, &mut jobs, consumer).await;
}

fn corrected(mut config: WorkerConfig, consumer_timeout: Option<Duration>) -> WorkerConfig {
    if let Err(problem) = config.validate(consumer_timeout) {
        error!(queue = %config.kind, problem, "invalid worker configuration; correcting it");
        config.prefetch = config.prefetch.max(1);
        config.retry_max = config.retry_max.max(config.retry_base);
        if config.outage_backoff_max.is_zero() {
            config.outage_backoff_max = OUTAGE_BACKOFF_BASE;
        }
        if config.max_hold.is_zero() {
            config.max_hold = DEFAULT_MAX_HOLD;
        }
        config = config.fit_to(consumer_timeout);
    }
    config
}

/// What the worker's tasks share.
struct Shared {
    queue: Arc<dyn WorkQueue>,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    /// The caller's shutdown token: cancelled = draining.
    draining: CancellationToken,
    /// Cancelled when the grace period is over.
    abandoned: CancellationToken,
    /// Handlers in an outage right now; the worker takes nothing while it is not 0.
    outages: watch::Sender<usize>,
}

/// A capped doubling backoff.
#[derive(Debug)]
struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        let base = base.min(max);
        Self {
            base,
            max,
            next: base,
        }
    }

    /// The next wait (then doubles it, up to the maximum).
    fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.base;
    }
}

/// Sleeps `wait`; true if `stop` came first.
async fn pause(stop: &CancellationToken, wait: Duration) -> bool {
    tokio::select! {
        biased;
        () = stop.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}

/// Takes deliveries and spawns their jobs until shutdown; returns the consumer in use, which
/// must outlive the settlements of its deliveries.
async fn take(shared: &Arc<Shared>, jobs: &mut JoinSet<()>) -> Option<Box<dyn Consumer>> {
    let config = &shared.config;
    let kind = config.kind;
    let stop = &shared.draining;
    let slots = Arc::new(Semaphore::new(usize::from(config.prefetch)));
    let mut outages = shared.outages.subscribe();
    let mut reconnect = Backoff::new(RECONNECT_BASE, config.retry_max);
    let mut consumer: Option<Box<dyn Consumer>> = None;
    let mut slot: Option<OwnedSemaphorePermit> = None;
    loop {
        reap(jobs);
        let Some(active) = consumer.as_mut() else {
            let started = tokio::select! {
                biased;
                () = stop.cancelled() => return None,
                started = shared.queue.consume(kind, config.prefetch) => started,
            };
            match started {
                Ok(started) => {
                    info!(queue = %kind, prefetch = config.prefetch, "consuming");
                    consumer = Some(started);
                }
                Err(e) => {
                    let wait = reconnect.next_wait();
                    warn!(
                        queue = %kind,
                        error = %e,
                        retry_in_ms = wait.as_millis(),
                        "cannot consume; retrying"
                    );
                    if pause(stop, wait).await {
                        return None;
                    }
                }
            }
            continue;
        };
        // A free slot first, then a delivery: never more than `prefetch` handlers at once.
        let permit = match slot.take() {
            Some(permit) => permit,
            None => {
                let acquired = tokio::select! {
                    biased;
                    () = stop.cancelled() => return consumer,
                    acquired = Arc::clone(&slots).acquire_owned() => acquired,
                };
                match acquired {
                    Ok(permit) => permit,
                    // Never closed.
                    Err(_) => return consumer,
                }
            }
        };
        // Nothing new while a handler waits out an outage: its delivery is the probe.
        if *outages.borrow_and_update() > 0 {
            slot = Some(permit);
            tokio::select! {
                biased;
                () = stop.cancelled() => return consumer,
                _ = outages.wait_for(|held| *held == 0) => {}
            }
            continue;
        }
        let next = tokio::select! {
            biased;
            () = stop.cancelled() => return consumer,
            _ = outages.wait_for(|held| *held > 0) => None,
            next = active.next() => Some(next),
        };
        let Some(next) = next else {
            // An outage began: stop waiting for a delivery (the consumer's `next` is
            // cancel-safe).
            slot = Some(permit);
            continue;
        };
        match next {
            Some(Ok(delivery)) => {
                reconnect.reset();
                jobs.spawn(run_job(Arc::clone(shared), delivery, permit));
            }
            Some(Err(e)) => {
                slot = Some(permit);
                warn!(queue = %kind, error = %e, "the consumer failed");
            }
            None => {
                slot = Some(permit);
                consumer = None;
                let wait = reconnect.next_wait();
                warn!(
                    queue = %kind,
                    retry_in_ms = wait.as_millis(),
                    "the consumer ended; consuming again"
                );
                if pause(stop, wait).await {
                    return None;
                }
            }
        }
    }
}

/// Logs the jobs that ended badly (a panic outside the handler: the delivery, dropped, returns
/// to the queue).
fn reap(jobs: &mut JoinSet<()>) {
    while let Some(joined) = jobs.try_join_next() {
        log_join(joined);
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        error!(error = %e, "a queue job panicked; its delivery returns to the queue");
    }
}

/// Shutdown: settles what the consumer holds, lets the jobs finish within the grace period,
/// then abandons them.
async fn drain(
    shared: &Arc<Shared>,
    jobs: &mut JoinSet<()>,
    mut consumer: Option<Box<dyn Consumer>>,
) {
    let config = &shared.config;
    let kind = config.kind;
    // Nothing new, not even the copies re-published below; deliveries the broker already
    // pushed but nobody took are given back without a count (an unsettled delivery returned
    // by dropping the consumer would count).
    if let Some(active) = consumer.as_mut() {
        if let Err(e) = active.cancel().await {
            debug!(queue = %kind, error = %e, "cancelling the consumer failed");
        }
        for _ in 0..=config.prefetch {
            let Some(Some(Ok(delivery))) = active.next().now_or_never() else {
                break;
            };
            jobs.spawn(settle(Arc::clone(shared), delivery, Ending::Abandoned));
        }
    }
    reap(jobs);
    if !jobs.is_empty() {
        info!(
            queue = %kind,
            running = jobs.len(),
            grace_s = config.shutdown_grace.as_secs_f64(),
            "shutting down: taking nothing more, letting running handlers finish"
        );
    }
    let drained = tokio::time::timeout(config.shutdown_grace, join_all(jobs)).await;
    if drained.is_err() {
        warn!(
            queue = %kind,
            running = jobs.len(),
            "shutdown grace period over: abandoning the handlers still running \
             (their messages are re-published)"
        );
        shared.abandoned.cancel();
        let settled = tokio::time::timeout(SHUTDOWN_MARGIN, join_all(jobs)).await;
        if settled.is_err() {
            warn!(
                queue = %kind,
                running = jobs.len(),
                "deliveries not settled in time: dropping them (they return to the queue)"
            );
            jobs.shutdown().await;
        }
    }
    // Every delivery is settled (or dropped): the consumer may go.
    drop(consumer);
    debug!(queue = %kind, "worker stopped");
}

async fn join_all(jobs: &mut JoinSet<()>) {
    while let Some(joined) = jobs.join_next().await {
        log_join(joined);
    }
}

/// How a delivery is settled.
#[derive(Debug)]
enum Ending {
    Done,
    Retry(String),
    Poison(String),
    /// [`Disposition::Republish`].
    Continue,
    /// Held in an outage for `max_hold` (or the delivery got too old).
    HeldTooLong,
    /// Shutdown.
    Abandoned,
}

impl Ending {
    /// The `disposition` label of [`metrics::HANDLED_TOTAL`].
    fn label(&self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Retry(_) => "retry",
            Self::Poison(_) => "poison",
            Self::Continue => "republish",
            Self::HeldTooLong => "outage",
            Self::Abandoned => "abandoned",
        }
    }
}

/// One delivery, from its first handling to its settlement; holds `_slot` meanwhile.
async fn run_job(shared: Arc<Shared>, delivery: Delivery, _slot: OwnedSemaphorePermit) {
    let ending = handle(&shared, &delivery).await;
    settle(shared, delivery, ending).await;
}

/// Runs the handler on `delivery` until it says something other than an outage (or the
/// outage lasted `max_hold`, or shutdown).
async fn handle(shared: &Shared, delivery: &Delivery) -> Ending {
    let config = &shared.config;
    let kind = config.kind;
    let taken = Instant::now();
    let mut hold: Option<Hold<'_>> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let job = Job {
            payload: &delivery.payload,
            headers: &delivery.headers,
            delivery_count: delivery.delivery_count,
            redelivered: delivery.redelivered,
            attempt,
            draining: shared.draining.clone(),
            abandoned: shared.abandoned.clone(),
        };
        let handled = AssertUnwindSafe(shared.handler.handle(&job)).catch_unwind();
        let disposition = tokio::select! {
            biased;
            handled = handled => handled.unwrap_or_else(|panic| {
                Disposition::Retry(format!("the handler panicked: {}", panic_text(&*panic)))
            }),
            () = past_abandon(&shared.abandoned) => {
                warn!(queue = %kind, "the handler did not stop once abandoned: dropping it");
                return Ending::Abandoned;
            }
        };
        let settled = match disposition {
            Disposition::Outage { dependency, error } => Err((dependency, error)),
            Disposition::Done => Ok(Ending::Done),
            Disposition::Poison(reason) => Ok(Ending::Poison(reason)),
            _ if shared.abandoned.is_cancelled() => Ok(Ending::Abandoned),
            Disposition::Retry(reason) => Ok(Ending::Retry(reason)),
            Disposition::Republish => Ok(Ending::Continue),
        };
        let (dependency, error) = match settled {
            Err(outage) => outage,
            Ok(ending) => {
                if let Some(hold) = &hold {
                    info!(
                        queue = %kind,
                        dependency = hold.dependency,
                        held_s = hold.since.elapsed().as_secs_f64(),
                        attempts = attempt,
                        "dependency back: the held delivery went through"
                    );
                }
                return ending;
            }
        };
        if shared.draining.is_cancelled() {
            info!(
                queue = %kind,
                dependency,
                error,
                "dependency unavailable during shutdown: re-publishing the delivery"
            );
            return Ending::Abandoned;
        }
        let hold = hold.get_or_insert_with(|| {
            warn!(
                queue = %kind,
                dependency,
                error,
                "dependency unavailable: holding the delivery and taking no new ones"
            );
            Hold::start(shared, dependency)
        });
        let held = hold.since.elapsed();
        let age = taken.elapsed();
        if held >= config.max_hold || age >= config.max_hold.saturating_mul(2) {
            warn!(
                queue = %kind,
                dependency,
                error,
                held_s = held.as_secs_f64(),
                "dependency still unavailable: re-publishing the held delivery"
            );
            return Ending::HeldTooLong;
        }
        let wait = hold
            .backoff
            .next_wait()
            .min(config.max_hold - held)
            .min(config.max_hold.saturating_mul(2).saturating_sub(age));
        debug!(
            queue = %kind,
            dependency,
            error,
            attempt,
            retry_in_ms = wait.as_millis(),
            "dependency unavailable"
        );
        if pause(&shared.draining, wait).await {
            return Ending::Abandoned;
        }
    }
}

/// Completes [`ABANDON_WAIT`] after the grace period is over.
async fn past_abandon(abandoned: &CancellationToken) {
    abandoned.cancelled().await;
    tokio::time::sleep(ABANDON_WAIT).await;
}

fn panic_text(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

/// A delivery held in an outage: counted in [`Shared::outages`] (and the gauge) while it lives.
struct Hold<'a> {
    outages: &'a watch::Sender<usize>,
    kind: QueueKind,
    dependency: &'static str,
    since: Instant,
    backoff: Backoff,
}

impl<'a> Hold<'a> {
    fn start(shared: &'a Shared, dependency: &'static str) -> Self {
        shared.outages.send_modify(|held| *held += 1);
        ::metrics::gauge!(metrics::OUTAGE_HOLDS, metrics::LABEL_QUEUE => shared.config.kind.as_str())
            .increment(1.0);
        Self {
            outages: &shared.outages,
            kind: shared.config.kind,
            dependency,
            since: Instant::now(),
            backoff: Backoff::new(OUTAGE_BACKOFF_BASE, shared.config.outage_backoff_max),
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.outages
            .send_modify(|held| *held = held.saturating_sub(1));
        ::metrics::gauge!(metrics::OUTAGE_HOLDS, metrics::LABEL_QUEUE => self.kind.as_str())
            .decrement(1.0);
    }
}

/// Settles `delivery` as `ending` says.
async fn settle(shared: Arc<Shared>, delivery: Delivery, ending: Ending) {
    let kind = shared.config.kind;
    let delivery_count = delivery.delivery_count;
    ::metrics::counter!(
        metrics::HANDLED_TOTAL,
        metrics::LABEL_QUEUE => kind.as_str(),
        metrics::LABEL_DISPOSITION => ending.label()
    )
    .increment(1);
    match ending {
        Ending::Done => {
            if let Err(e) = delivery.ack().await {
                warn!(queue = %kind, error = %e, "ack failed: the message will be delivered again");
            }
        }
        Ending::Poison(reason) => {
            error!(queue = %kind, reason, delivery_count, "poison message: dead-lettering it");
            if let Err(e) = delivery.dead_letter().await {
                warn!(
                    queue = %kind,
                    error = %e,
                    "dead-lettering failed: the message will be delivered again"
                );
            }
        }
        Ending::Retry(reason) => {
            let wait = shared.config.retry_delay(delivery_count);
            warn!(
                queue = %kind,
                reason,
                delivery_count,
                requeue_in_ms = wait.as_millis(),
                "the message failed: requeueing it after a delay"
            );
            // Shutdown requeues at once.
            pause(&shared.draining, wait).await;
            requeue(kind, delivery).await;
        }
        Ending::Continue => republish(&shared, delivery, "continuation").await,
        Ending::HeldTooLong => republish(&shared, delivery, "outage").await,
        Ending::Abandoned => republish(&shared, delivery, "shutdown").await,
    }
}

/// Publishes a fresh copy of the delivery's message, then acks it; requeues it if publishing
/// fails.
/// The header in which publishers stamp when a message was published (unix milliseconds),
/// read by consumers for the delivery-lag histogram (`nightshift_telemetry::propagation`).
const PUBLISHED_AT: &str = "published-at";

/// The headers of a fresh copy: the original's, with a `published-at` of now when the
/// original had one, so a continuation's delivery lag counts its own wait, not every run
/// before it.
fn fresh_headers(headers: &Headers) -> Headers {
    let mut headers = headers.clone();
    if let Some(stamp) = headers.get_mut(PUBLISHED_AT) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        *stamp = now.as_millis().to_string();
    }
    headers
}

async fn republish(shared: &Shared, delivery: Delivery, reason: &'static str) {
    let kind = shared.config.kind;
    let published = shared
        .queue
        .publish(
            kind,
            delivery.payload.clone(),
            fresh_headers(&delivery.headers),
        )
        .await;
    match published {
        Ok(()) => {
            ::metrics::counter!(
                metrics::REPUBLISHED_TOTAL,
                metrics::LABEL_QUEUE => kind.as_str(),
                metrics::LABEL_REASON => reason
            )
            .increment(1);
            debug!(queue = %kind, reason, "re-published the message as a fresh copy");
            if let Err(e) = delivery.ack().await {
                warn!(
                    queue = %kind,
                    error = %e,
                    "acking a re-published message failed: it will be delivered twice"
                );
            }
        }
        Err(e) => {
            warn!(
                queue = %kind,
                reason,
                error = %e,
                "re-publishing the message failed: requeueing it instead"
            );
            requeue(kind, delivery).await;
        }
    }
}

async fn requeue(kind: QueueKind, delivery: Delivery) {
    if let Err(e) = delivery.requeue().await {
        // Its consumer is gone: the message returns to the queue anyway.
        warn!(queue = %kind, error = %e, "requeueing failed: the message returns anyway");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_copy_is_stamped_now_and_keeps_every_other_header() {
        let mut original = Headers::new();
        original.insert("traceparent".into(), "00-abc-def-01".into());
        original.insert(PUBLISHED_AT.into(), "1000".into());
        let copy = fresh_headers(&original);
        assert_eq!(copy["traceparent"], "00-abc-def-01");
        let stamp: u128 = copy[PUBLISHED_AT].parse().unwrap();
        assert!(
            stamp > 1_000_000_000_000,
            "stamped with the current time: {stamp}"
        );
        let unstamped = fresh_headers(&Headers::new());
        assert!(unstamped.is_empty(), "no stamp is invented");
    }

    #[test]
    fn retry_delays_double_and_are_capped() {
        let config = WorkerConfig {
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(10),
            ..WorkerConfig::new(QueueKind::ChunkTasks, 1)
        };
        let delays: Vec<_> = (0..6).map(|n| config.retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        assert_eq!(config.retry_delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let waits: Vec<_> = (0..5).map(|_| backoff.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_secs(1));
        // A cap under the base wins.
        let mut short = Backoff::new(Duration::from_secs(1), Duration::from_millis(50));
        assert_eq!(short.next_wait(), Duration::from_millis(50));
    }

    #[test]
    fn max_hold_is_a_quarter_of_the_consumer_timeout_at_most_five_minutes() {
        assert_eq!(max_hold_for(None), DEFAULT_MAX_HOLD);
        assert_eq!(
            max_hold_for(Some(Duration::from_secs(30 * 60))),
            DEFAULT_MAX_HOLD
        );
        assert_eq!(
            max_hold_for(Some(Duration::from_secs(60))),
            Duration::from_secs(15)
        );
        let config = WorkerConfig::new(QueueKind::FinalizeJobs, 1);
        assert_eq!(
            config.clone().fit_to(Some(Duration::from_secs(8))).max_hold,
            Duration::from_secs(2)
        );
        assert_eq!(config.fit_to(None).max_hold, DEFAULT_MAX_HOLD);
    }

    #[test]
    fn invalid_configs_are_refused_and_corrected() {
        let ok = WorkerConfig::new(QueueKind::ChunkResults, 4);
        ok.validate(None).unwrap();
        ok.validate(Some(Duration::from_secs(30 * 60))).unwrap();
        let bad = [
            WorkerConfig {
                prefetch: 0,
                ..ok.clone()
            },
            WorkerConfig {
                retry_max: Duration::from_millis(10),
                ..ok.clone()
            },
            WorkerConfig {
                max_hold: Duration::ZERO,
                ..ok.clone()
            },
            WorkerConfig {
                outage_backoff_max: Duration::ZERO,
                ..ok.clone()
            },
        ];
        for config in bad {
            assert!(config.validate(None).is_err(), "{config:?}");
            corrected(config, None).validate(None).unwrap();
        }
        // Five minutes of hold against a 6-minute consumer timeout: refused, then fit.
        let timeout = Some(Duration::from_secs(6 * 60));
        let message = ok.validate(timeout).unwrap_err();
        assert!(message.contains("consumer_timeout"), "{message}");
        let fixed = corrected(ok, timeout);
        fixed.validate(timeout).unwrap();
        assert_eq!(fixed.max_hold, Duration::from_secs(90));
    }

    #[test]
    fn disposition_names_are_stable() {
        let names: Vec<_> = [
            Disposition::Done,
            Disposition::Retry(String::new()),
            Disposition::Outage {
                dependency: "x",
                error: String::new(),
            },
            Disposition::Poison(String::new()),
            Disposition::Republish,
        ]
        .iter()
        .map(Disposition::as_str)
        .collect();
        assert_eq!(names, ["done", "retry", "outage", "poison", "republish"]);
    }

    #[tokio::test]
    async fn a_job_outside_a_worker_never_drains() {
        let payload = Bytes::from_static(b"p");
        let headers = Headers::new();
        let job = Job::new(&payload, &headers);
        assert_eq!((job.attempt, job.delivery_count), (1, 0));
        assert!(!job.is_draining() && !job.is_abandoned());
        assert!(job.draining().now_or_never().is_none());
        assert!(job.abandoned().now_or_never().is_none());
    }
}
