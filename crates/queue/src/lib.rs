//! The work-queue port.
//!
//! nightshift moves work between its services through three durable queues ([`QueueKind`]):
//! chunk tasks (scheduler → executors), chunk results (executors → scheduler) and finalize jobs
//! (scheduler → finalizer). Services depend on the [`WorkQueue`] trait; binaries choose the
//! adapter: [`RabbitQueue`] (RabbitMQ quorum queues) in production; [`EmbeddedQueue`] (in the
//! process, durable in an SQLite file, same contract) for the single-process deployment and
//! tests. Every adapter must pass the conformance suite (`conformance`, built with the
//! `testsuite` feature).
//!
//! Contract shared by all adapters:
//! - **At-least-once.** A published message is delivered until a consumer settles it with
//!   [`Delivery::ack`] or [`Delivery::dead_letter`]. It may be delivered more than once (a
//!   consumer crashed, a connection dropped, an ack was lost), so consumers must be idempotent.
//!   Nothing is lost once [`WorkQueue::publish`] returned `Ok`.
//! - **Ack after durability.** A consumer acks only once the effects of the message are durable
//!   (its result written, its follow-up message published).
//! - **Redelivery.** A delivery that is not settled returns to its queue, to be delivered again
//!   (with [`Delivery::redelivered`] set and [`Delivery::delivery_count`] incremented), when it is
//!   requeued ([`Delivery::requeue`]), dropped unsettled, or when its [`Consumer`] is dropped or
//!   loses its connection.
//! - **Delivery limit.** A message that returned to its queue `delivery_limit` times goes to its
//!   kind's dead-letter queue on its next return instead of being delivered again: it is
//!   delivered at most `delivery_limit + 1` times, so a message that crashes every consumer
//!   cannot crash them forever. [`Delivery::dead_letter`] sends one there at once.
//! - **Independence.** Each kind is its own queue: a message published to one kind is only ever
//!   delivered by consumers of that kind. Order within a kind is roughly FIFO, but redeliveries
//!   and several consumers reorder messages: never rely on order.
//! - **Bounded in flight.** A consumer holds at most `prefetch` unsettled deliveries.
//!
//! Services do not drive a [`Consumer`] themselves: [`run_worker`] (module [`worker`]) consumes,
//! runs their [`Handler`] and settles each delivery by the [`Disposition`] it returns —
//! reconnecting, holding deliveries through dependency outages without counting them, and
//! draining on shutdown.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

#[cfg(feature = "testsuite")]
pub mod conformance;
mod embedded;
pub mod metrics;
mod rabbit;
pub mod worker;

/// The attribute a [`Handler`] implementation needs (re-exported so its users need no other
/// crate).
pub use async_trait::async_trait;
pub use embedded::{EmbeddedQueue, EmbeddedQueueConfig};
pub use rabbit::{QueueConfig, RabbitQueue};
/// The shutdown signal [`run_worker`] takes (re-exported so its users need no other crate).
pub use tokio_util::sync::CancellationToken;
pub use worker::{Disposition, Handler, Job, WorkerConfig, run_worker};

/// The queues nightshift uses. Each kind has its own queue and its own dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKind {
    /// Chunks of a batch to execute: published by the scheduler, consumed by executors.
    ChunkTasks,
    /// A chunk is done (counts, usage, where its part is): published by executors, consumed by
    /// the scheduler.
    ChunkResults,
    /// A batch whose chunks are all done and whose files must be assembled: published by the
    /// scheduler, consumed by the finalizer.
    FinalizeJobs,
}

impl QueueKind {
    /// Every kind, in a fixed order.
    pub const ALL: [QueueKind; 3] = [Self::ChunkTasks, Self::ChunkResults, Self::FinalizeJobs];

    /// Stable name, used in queue names and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChunkTasks => "chunk-tasks",
            Self::ChunkResults => "chunk-results",
            Self::FinalizeJobs => "finalize-jobs",
        }
    }
}

impl fmt::Display for QueueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Message headers: string names to string values (the W3C `traceparent`, the schema version…).
///
/// Names starting with `x-` are reserved for the broker and rejected by
/// [`WorkQueue::publish`]; a [`Delivery`] carries exactly the headers its publisher set.
pub type Headers = BTreeMap<String, String>;

/// Errors of the work-queue port.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The broker is unreachable, did not answer in time, or the connection or channel was lost.
    /// Retrying later may work. For a publish, the message may or may not have been enqueued.
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The broker refused a published message (a negative publisher confirm, or no queue to
    /// route it to). The message was not enqueued.
    #[error("message rejected by the queue: {0}")]
    Rejected(String),
    /// The delivery can no longer be settled: its consumer or connection is gone. Whatever was
    /// asked, the message returns to its queue and is delivered again.
    #[error("delivery can no longer be settled: {0}")]
    DeliveryLost(String),
    /// The caller passed something the port does not accept (a bug in the caller).
    #[error("invalid queue argument: {0}")]
    InvalidArgument(String),
    /// The configuration is invalid, or disagrees with the queues that already exist on the
    /// broker (e.g. another `delivery_limit`). Retrying will not help.
    #[error("queue configuration error: {0}")]
    Config(String),
}

impl QueueError {
    /// The shared error class of this error.
    pub fn kind(&self) -> nightshift_core::ErrorKind {
        match self {
            Self::Unavailable(_) | Self::DeliveryLost(_) => nightshift_core::ErrorKind::Unavailable,
            Self::Rejected(_) | Self::InvalidArgument(_) | Self::Config(_) => {
                nightshift_core::ErrorKind::Internal
            }
        }
    }
}

impl From<QueueError> for nightshift_core::ApiError {
    fn from(e: QueueError) -> Self {
        nightshift_core::ApiError::new(e.kind(), e.to_string())
    }
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

/// The work-queue port.
///
/// One value is shared by a whole process (it is `Sync`; methods take `&self`).
#[async_trait]
pub trait WorkQueue: Send + Sync + fmt::Debug + 'static {
    /// Enqueues a persistent message. Returns only once the queue has durably accepted it (for
    /// RabbitMQ: a positive publisher confirm): after `Ok`, the message survives a broker
    /// restart and is delivered at least once.
    ///
    /// `Err` means the message may or may not be enqueued (see [`QueueError`]); publishing
    /// again is safe because consumers are idempotent. Header names starting with `x-` are
    /// rejected with [`QueueError::InvalidArgument`].
    async fn publish(&self, kind: QueueKind, payload: Bytes, headers: Headers) -> Result<()>;

    /// Starts a consumer of `kind` holding at most `prefetch` unsettled deliveries (≥ 1; `0` is
    /// [`QueueError::InvalidArgument`]). Consumers of one kind share its messages between them.
    async fn consume(&self, kind: QueueKind, prefetch: u16) -> Result<Box<dyn Consumer>>;

    /// Messages of `kind` ready to be delivered: neither delivered and unsettled, nor
    /// dead-lettered. For metrics and tests; the count may lag a moment behind reality.
    async fn depth(&self, kind: QueueKind) -> Result<u64>;

    /// Messages in the dead-letter queue of `kind`. Nothing consumes them: they wait for an
    /// operator. May lag a moment behind reality, like [`depth`](Self::depth).
    async fn dead_lettered(&self, kind: QueueKind) -> Result<u64>;

    /// How many times a message may return to its queue before the next return dead-letters
    /// it (see the crate docs): a message is delivered at most `delivery_limit() + 1` times.
    fn delivery_limit(&self) -> u32;

    /// How long the broker lets a delivery stay unsettled before it takes it back from its
    /// consumer (closing the consumer, which redelivers all its deliveries): RabbitMQ's
    /// `consumer_timeout`, as configured in [`QueueConfig::consumer_timeout`]. `None`: no such
    /// limit (the embedded queue). Work held for one delivery must stay well under it.
    fn consumer_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the queue answers (readiness). Never hangs past the adapter's timeouts.
    async fn ping(&self) -> Result<()>;
}

/// A stream of deliveries of one kind.
///
/// Dropping a consumer stops its deliveries and returns every delivery it handed out and that
/// is still unsettled to the queue: settling them afterwards is unreliable (it may fail with
/// [`QueueError::DeliveryLost`]; the message is delivered again either way). So a graceful
/// shutdown [`cancel`](Consumer::cancel)s the consumer, takes what [`next`](Consumer::next)
/// still returns, settles the deliveries in hand (ack the finished, requeue or re-publish the
/// abandoned), and only then drops the consumer.
#[async_trait]
pub trait Consumer: Send {
    /// The next delivery. Waits while the consumer holds `prefetch` unsettled deliveries or the
    /// queue is empty.
    ///
    /// `Some(Err(_))` reports why the consumer broke (connection lost, queue deleted…); it is
    /// followed by `None`. `None` means the consumer has ended for good: start a new one with
    /// [`WorkQueue::consume`] (its unsettled deliveries are delivered again).
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stops deliveries: the queue hands this consumer nothing new. The deliveries it already
    /// handed out stay settleable, and those already on their way (RabbitMQ pushes up to
    /// `prefetch` ahead) are still returned by [`next`](Self::next), at once, before it
    /// returns `None`. Without it, a delivery pushed ahead but never taken returns to its
    /// queue when the consumer is dropped, which counts toward its delivery limit.
    ///
    /// `Err` means the consumer is broken anyway (its deliveries return to the queue).
    async fn cancel(&mut self) -> Result<()> {
        Ok(())
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove the message from the queue.
    Ack,
    /// Not done: return the message to its queue to be delivered again (counts towards the
    /// delivery limit).
    Requeue,
    /// Never deliverable: move the message to the dead-letter queue at once.
    DeadLetter,
}

/// The adapter's side of a [`Delivery`]: settles it with the queue. Adapters (and test doubles)
/// implement it; everybody else goes through [`Delivery`]'s methods.
#[async_trait]
pub trait Settle: Send + Sync + fmt::Debug {
    /// Settles the delivery (exactly once: it consumes the settler).
    async fn settle(self: Box<Self>, how: Settlement) -> Result<()>;

    /// The delivery was dropped unsettled: return the message to its queue, as
    /// [`Settlement::Requeue`] would, without blocking (it runs in `Drop`). Best effort: if it
    /// cannot be done now, the message still returns when its consumer goes away.
    fn abandon(self: Box<Self>);
}

/// One message handed to a consumer. Settle it exactly once: [`ack`](Self::ack),
/// [`requeue`](Self::requeue) or [`dead_letter`](Self::dead_letter). Dropping it unsettled
/// requeues it (best effort, see [`Settle::abandon`]).
///
/// RabbitMQ closes a consumer's channel when one of its deliveries stays unsettled for longer
/// than its `consumer_timeout` (30 minutes by default; RabbitMQ 3.10 has no per-queue setting):
/// every unsettled delivery of that consumer is then delivered again and the consumer ends. So
/// work done for one delivery must be bounded in time well under 30 minutes.
pub struct Delivery {
    /// The message as published.
    pub payload: Bytes,
    /// The headers as published (never the broker's own `x-` headers).
    pub headers: Headers,
    /// The message may have been delivered before (to this or another consumer).
    pub redelivered: bool,
    /// How many times the message returned to its queue before this delivery (requeued,
    /// dropped, or its consumer lost): `0` on a first delivery, `≥ 1` on a redelivery.
    pub delivery_count: u32,
    /// Settles the delivery with the queue; `None` once settled.
    settler: Option<Box<dyn Settle>>,
}

impl Delivery {
    /// A delivery of an adapter (or a test double); `settler` settles it with the queue.
    pub fn new(
        payload: Bytes,
        headers: Headers,
        redelivered: bool,
        delivery_count: u32,
        settler: Box<dyn Settle>,
    ) -> Self {
        Self {
            payload,
            headers,
            redelivered,
            delivery_count,
            settler: Some(settler),
        }
    }

    /// The message is done: it leaves the queue for good. Call only once its effects are
    /// durable. `Err` ([`QueueError::DeliveryLost`]) means it will be delivered again.
    pub async fn ack(self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }

    /// The message is not done (e.g. a graceful shutdown): it returns to its queue and is
    /// delivered again, counting towards the delivery limit.
    pub async fn requeue(self) -> Result<()> {
        self.settle(Settlement::Requeue).await
    }

    /// The message can never be processed (a poison message): it moves to its kind's
    /// dead-letter queue and is never delivered again.
    pub async fn dead_letter(self) -> Result<()> {
        self.settle(Settlement::DeadLetter).await
    }

    async fn settle(mut self, how: Settlement) -> Result<()> {
        match self.settler.take() {
            Some(settler) => settler.settle(how).await,
            // Unreachable: settling consumes the delivery, and only settling takes the settler.
            None => Err(QueueError::DeliveryLost("already settled".into())),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(settler) = self.settler.take() {
            settler.abandon();
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers)
            .field("redelivered", &self.redelivered)
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Debug, Default)]
    struct Recorder(Arc<Mutex<Vec<&'static str>>>);

    #[async_trait]
    impl Settle for Recorder {
        async fn settle(self: Box<Self>, how: Settlement) -> Result<()> {
            self.0.lock().unwrap().push(match how {
                Settlement::Ack => "ack",
                Settlement::Requeue => "requeue",
                Settlement::DeadLetter => "dead_letter",
            });
            Ok(())
        }

        fn abandon(self: Box<Self>) {
            self.0.lock().unwrap().push("abandon");
        }
    }

    fn delivery(log: &Arc<Mutex<Vec<&'static str>>>) -> Delivery {
        Delivery::new(
            Bytes::from_static(b"x"),
            Headers::new(),
            false,
            0,
            Box::new(Recorder(log.clone())),
        )
    }

    #[tokio::test]
    async fn a_delivery_is_settled_once_and_dropping_it_unsettled_abandons_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        delivery(&log).ack().await.unwrap();
        delivery(&log).requeue().await.unwrap();
        delivery(&log).dead_letter().await.unwrap();
        drop(delivery(&log));
        assert_eq!(
            *log.lock().unwrap(),
            ["ack", "requeue", "dead_letter", "abandon"]
        );
    }

    #[test]
    fn kind_names_are_stable() {
        let names: Vec<_> = QueueKind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(names, ["chunk-tasks", "chunk-results", "finalize-jobs"]);
    }
}
