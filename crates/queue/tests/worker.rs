//! The queue worker ([`run_worker`]) against both adapters: every test runs once over an
//! [`EmbeddedQueue`] in a temp directory and once over the dev RabbitMQ
//! (`NIGHTSHIFT_QUEUE__URL` overrides it) under its own queue prefix. Durations are shortened
//! in the worker's configuration; tests wait for states by polling with a deadline.

mod common;

use common::{Proxy, broker_url, through_proxy};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nightshift_core::secret::Secret;
use nightshift_queue::conformance::WAIT;
use nightshift_queue::worker::SHUTDOWN_MARGIN;
use nightshift_queue::{
    CancellationToken, Consumer, Delivery, Disposition, EmbeddedQueue, EmbeddedQueueConfig,
    Handler, Headers, Job, QueueConfig, QueueError, QueueKind, RabbitQueue, WorkQueue,
    WorkerConfig, run_worker,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const KIND: QueueKind = QueueKind::ChunkTasks;
/// Both adapters' delivery limit in these tests.
const DELIVERY_LIMIT: u32 = 3;
/// How often a waiting test looks again.
const POLL: Duration = Duration::from_millis(10);

fn rabbit_config(url: &str) -> QueueConfig {
    QueueConfig {
        url: Secret::new(url),
        prefix: format!("test-worker-{}", uuid::Uuid::new_v4()),
        delivery_limit: DELIVERY_LIMIT,
        connect_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(3),
        ..QueueConfig::default()
    }
}

/// A queue of one adapter, and how to dispose of it.
struct Fixture {
    queue: Arc<dyn WorkQueue>,
    owned: Owned,
}

enum Owned {
    Embedded(Arc<EmbeddedQueue>, tempfile::TempDir),
    Rabbit(Arc<RabbitQueue>),
}

impl Fixture {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let queue = Arc::new(
            EmbeddedQueue::open(&EmbeddedQueueConfig {
                path: dir.path().join("queue.db"),
                delivery_limit: DELIVERY_LIMIT,
            })
            .await
            .expect("open"),
        );
        Self {
            queue: queue.clone(),
            owned: Owned::Embedded(queue, dir),
        }
    }

    async fn rabbitmq() -> Self {
        let queue = Arc::new(
            RabbitQueue::connect(&rabbit_config(&broker_url()))
                .await
                .expect("connect to rabbitmq"),
        );
        Self {
            queue: queue.clone(),
            owned: Owned::Rabbit(queue),
        }
    }

    async fn cleanup(self) {
        match self.owned {
            Owned::Embedded(queue, _dir) => queue.close().await.expect("close"),
            Owned::Rabbit(queue) => {
                queue.delete_all().await.expect("delete queues");
                queue.close().await.expect("close");
            }
        }
    }
}

/// Declares each test once per adapter: `embedded::<name>` and `rabbitmq::<name>`.
macro_rules! on_both_adapters {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::embedded().await).await;
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Fixture::rabbitmq().await).await;
                }
            )*
        }
    };
}

on_both_adapters!(
    an_outage_holds_the_delivery_takes_nothing_new_and_burns_no_count,
    an_outage_past_max_hold_republishes_a_fresh_copy,
    retry_counts_and_dead_letters_at_the_limit,
    poison_is_dead_lettered_at_once,
    republish_delivers_a_fresh_copy,
    at_most_prefetch_handlers_run_at_once,
    shutdown_drains_then_republishes_abandoned_jobs,
    an_outage_at_shutdown_is_republished,
    a_handler_that_ignores_abandonment_is_dropped_and_its_job_republished,
    a_lost_consumer_is_replaced,
);

fn config(prefetch: u16) -> WorkerConfig {
    WorkerConfig {
        shutdown_grace: Duration::from_secs(5),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        outage_backoff_max: Duration::from_millis(20),
        max_hold: Duration::from_secs(30),
        ..WorkerConfig::new(KIND, prefetch)
    }
}

fn headers() -> Headers {
    Headers::from([
        (
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        ),
        ("test".to_owned(), "worker".to_owned()),
    ])
}

async fn publish(queue: &dyn WorkQueue, payload: &str) {
    queue
        .publish(KIND, Bytes::copy_from_slice(payload.as_bytes()), headers())
        .await
        .expect("publish");
}

/// Polls `check` until it holds; panics after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it holds; panics after [`WAIT`].
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    eventually(what, || std::future::ready(check())).await;
}

async fn depth_is(queue: &dyn WorkQueue, ready: u64, dead: u64) {
    eventually(
        &format!("{ready} ready and {dead} dead messages"),
        || async move {
            queue.depth(KIND).await.expect("depth") == ready
                && queue.dead_lettered(KIND).await.expect("dead") == dead
        },
    )
    .await;
}

/// One call of a handler, as the handler saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    payload: String,
    headers: Headers,
    delivery_count: u32,
    redelivered: bool,
    attempt: u32,
}

/// Every call of a handler, in order.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<Call>>>);

impl Log {
    fn record(&self, job: &Job<'_>) -> Call {
        let call = Call {
            payload: String::from_utf8_lossy(job.payload).into_owned(),
            headers: job.headers.clone(),
            delivery_count: job.delivery_count,
            redelivered: job.redelivered,
            attempt: job.attempt,
        };
        self.0.lock().expect("log").push(call.clone());
        call
    }

    fn calls(&self) -> Vec<Call> {
        self.0.lock().expect("log").clone()
    }

    fn of(&self, payload: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.payload == payload)
            .collect()
    }

    async fn until(&self, what: &str, check: impl Fn(&[Call]) -> bool) {
        until(what, || check(&self.calls())).await;
    }
}

/// A worker running in the background.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

fn start(queue: &Arc<dyn WorkQueue>, config: WorkerConfig, handler: impl Handler) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_worker(
        Arc::clone(queue),
        config,
        Arc::new(handler),
        shutdown.clone(),
    ));
    Running { shutdown, task }
}

impl Running {
    /// Shuts the worker down and waits until it returned.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT + SHUTDOWN_MARGIN, self.task)
            .await
            .expect("the worker returns after shutdown")
            .expect("the worker does not panic");
    }
}

/// `Outage` until `up`, then `Done`.
struct UntilUp {
    log: Log,
    up: Arc<AtomicBool>,
}

#[async_trait]
impl Handler for UntilUp {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        self.log.record(job);
        if self.up.load(Ordering::SeqCst) {
            Disposition::Done
        } else {
            Disposition::Outage {
                dependency: "test",
                error: "down".into(),
            }
        }
    }
}

async fn an_outage_holds_the_delivery_takes_nothing_new_and_burns_no_count(fixture: Fixture) {
    let queue = &fixture.queue;
    let (log, up) = (Log::default(), Arc::new(AtomicBool::new(false)));
    let worker = start(
        queue,
        config(2),
        UntilUp {
            log: log.clone(),
            up: up.clone(),
        },
    );
    publish(queue.as_ref(), "held").await;
    log.until("the handler to run twice", |calls| calls.len() >= 2)
        .await;
    // A second message while the first is held: with a free slot, it is still not taken.
    publish(queue.as_ref(), "later").await;
    let seen = log.calls().len();
    log.until("the held delivery to be tried 3 more times", |calls| {
        calls.len() >= seen + 3
    })
    .await;
    assert!(log.of("later").is_empty(), "{:?}", log.calls());

    up.store(true, Ordering::SeqCst);
    log.until("both messages to be handled", |calls| {
        calls.iter().any(|c| c.payload == "later")
    })
    .await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;

    let calls = log.calls();
    let held = log.of("held");
    // The same delivery every time (attempts 1, 2, 3...), never returned to the queue.
    for (attempt, call) in (1..).zip(&held) {
        assert_eq!(call.attempt, attempt, "{calls:?}");
        assert_eq!((call.delivery_count, call.redelivered), (0, false));
        assert_eq!(call.headers, headers());
    }
    // "later" ran once the outage was over, once.
    let first_later = calls
        .iter()
        .position(|c| c.payload == "later")
        .expect("later");
    let last_held = calls
        .iter()
        .rposition(|c| c.payload == "held")
        .expect("held");
    assert!(last_held < first_later, "{calls:?}");
    assert_eq!(log.of("later").len(), 1);
    fixture.cleanup().await;
}

/// `Outage` until it sees a fresh delivery (attempt 1 after a later attempt), then `Done`.
struct UntilCopy {
    log: Log,
}

#[async_trait]
impl Handler for UntilCopy {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let retried_before = self.log.calls().iter().any(|c| c.attempt > 1);
        self.log.record(job);
        if job.attempt == 1 && retried_before {
            Disposition::Done
        } else {
            Disposition::Outage {
                dependency: "test",
                error: "down".into(),
            }
        }
    }
}

async fn an_outage_past_max_hold_republishes_a_fresh_copy(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        WorkerConfig {
            max_hold: Duration::from_millis(200),
            ..config(1)
        },
        UntilCopy { log: log.clone() },
    );
    publish(queue.as_ref(), "held").await;
    log.until("the copy to be handled", |calls| {
        calls.len() > 2 && calls.last().is_some_and(|c| c.attempt == 1)
    })
    .await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;

    let calls = log.calls();
    let copy = calls.last().expect("a call");
    // A fresh copy: same message, and no delivery counted.
    assert_eq!(copy.payload, "held");
    assert_eq!(copy.headers, headers());
    assert_eq!((copy.delivery_count, copy.redelivered), (0, false));
    // The original: attempts 1, 2, ... on one delivery, then no more.
    let original = &calls[..calls.len() - 1];
    for (attempt, call) in (1..).zip(original) {
        assert_eq!(call.attempt, attempt, "{calls:?}");
        assert_eq!(call.delivery_count, 0);
    }
    fixture.cleanup().await;
}

/// Always the same disposition.
struct Always {
    log: Log,
    disposition: Disposition,
}

#[async_trait]
impl Handler for Always {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        self.log.record(job);
        self.disposition.clone()
    }
}

async fn retry_counts_and_dead_letters_at_the_limit(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        config(1),
        Always {
            log: log.clone(),
            disposition: Disposition::Retry("fails on its own".into()),
        },
    );
    publish(queue.as_ref(), "bad").await;
    depth_is(queue.as_ref(), 0, 1).await;
    worker.stop().await;
    let counts: Vec<_> = log.calls().iter().map(|c| c.delivery_count).collect();
    assert_eq!(counts, [0, 1, 2, 3], "delivered delivery_limit + 1 times");
    assert!(log.calls().iter().all(|c| c.attempt == 1));
    fixture.cleanup().await;
}

async fn poison_is_dead_lettered_at_once(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        config(1),
        Always {
            log: log.clone(),
            disposition: Disposition::Poison("never works".into()),
        },
    );
    publish(queue.as_ref(), "poison").await;
    depth_is(queue.as_ref(), 0, 1).await;
    worker.stop().await;
    assert_eq!(log.calls().len(), 1);
    fixture.cleanup().await;
}

/// `Republish` on the first call, `Done` after.
struct RepublishOnce {
    log: Log,
}

#[async_trait]
impl Handler for RepublishOnce {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let first = self.log.calls().is_empty();
        self.log.record(job);
        if first {
            Disposition::Republish
        } else {
            Disposition::Done
        }
    }
}

async fn republish_delivers_a_fresh_copy(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(queue, config(1), RepublishOnce { log: log.clone() });
    publish(queue.as_ref(), "continued").await;
    log.until("the copy to be handled", |calls| calls.len() == 2)
        .await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;
    let calls = log.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        assert_eq!(call.payload, "continued");
        assert_eq!(call.headers, headers());
        assert_eq!(
            (call.delivery_count, call.redelivered, call.attempt),
            (0, false, 1)
        );
    }
    fixture.cleanup().await;
}

/// Counts handlers running at once; each waits for the gate to open.
struct Gated {
    log: Log,
    running: AtomicUsize,
    most: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    gate: watch::Receiver<bool>,
}

#[async_trait]
impl Handler for Gated {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.now.store(running, Ordering::SeqCst);
        self.most.fetch_max(running, Ordering::SeqCst);
        let _ = self.gate.clone().wait_for(|open| *open).await;
        let running = self.running.fetch_sub(1, Ordering::SeqCst) - 1;
        self.now.store(running, Ordering::SeqCst);
        self.log.record(job);
        Disposition::Done
    }
}

async fn at_most_prefetch_handlers_run_at_once(fixture: Fixture) {
    let queue = &fixture.queue;
    let (log, most, now) = (
        Log::default(),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let (open, gate) = watch::channel(false);
    let worker = start(
        queue,
        config(2),
        Gated {
            log: log.clone(),
            running: AtomicUsize::new(0),
            most: most.clone(),
            now: now.clone(),
            gate,
        },
    );
    for i in 0..5 {
        publish(queue.as_ref(), &format!("m{i}")).await;
    }
    until("2 handlers running", || now.load(Ordering::SeqCst) == 2).await;
    // The rest wait in the queue (RabbitMQ may count the ones it pushed as not ready).
    assert!(queue.depth(KIND).await.expect("depth") <= 3);
    open.send_replace(true);
    log.until("every message to be handled", |calls| calls.len() == 5)
        .await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;
    assert_eq!(most.load(Ordering::SeqCst), 2);
    fixture.cleanup().await;
}

/// "quick" finishes once shutdown began; "stuck" runs until abandoned, then gives up.
struct AtShutdown {
    log: Log,
}

#[async_trait]
impl Handler for AtShutdown {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let call = self.log.record(job);
        if call.payload == "quick" {
            job.draining().await;
            Disposition::Done
        } else {
            job.abandoned().await;
            // Whatever it says but Done or Poison, an abandoned job is re-published.
            Disposition::Retry("stopped".into())
        }
    }
}

/// Takes the one message left in the queue and checks it is a fresh copy of `payload`.
async fn take_fresh_copy(queue: &dyn WorkQueue, payload: &str) {
    let mut consumer = queue.consume(KIND, 1).await.expect("consume");
    let delivery = next(consumer.as_mut()).await;
    assert_eq!(delivery.payload, payload.as_bytes());
    assert_eq!(delivery.headers, headers());
    assert_eq!(delivery.delivery_count, 0, "{delivery:?}");
    delivery.ack().await.expect("ack");
}

async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

async fn shutdown_drains_then_republishes_abandoned_jobs(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        WorkerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..config(2)
        },
        AtShutdown { log: log.clone() },
    );
    publish(queue.as_ref(), "quick").await;
    publish(queue.as_ref(), "stuck").await;
    log.until("both handlers to run", |calls| calls.len() == 2)
        .await;
    worker.stop().await;
    // "quick" was acked; "stuck" is back in the queue as a fresh copy.
    depth_is(queue.as_ref(), 1, 0).await;
    take_fresh_copy(queue.as_ref(), "stuck").await;
    depth_is(queue.as_ref(), 0, 0).await;
    fixture.cleanup().await;
}

async fn an_outage_at_shutdown_is_republished(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        config(1),
        UntilUp {
            log: log.clone(),
            up: Arc::new(AtomicBool::new(false)),
        },
    );
    publish(queue.as_ref(), "held").await;
    log.until("the handler to be retried", |calls| calls.len() >= 2)
        .await;
    worker.stop().await;
    depth_is(queue.as_ref(), 1, 0).await;
    take_fresh_copy(queue.as_ref(), "held").await;
    fixture.cleanup().await;
}

/// Never returns.
struct Deaf {
    log: Log,
}

#[async_trait]
impl Handler for Deaf {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        self.log.record(job);
        std::future::pending().await
    }
}

async fn a_handler_that_ignores_abandonment_is_dropped_and_its_job_republished(fixture: Fixture) {
    let queue = &fixture.queue;
    let log = Log::default();
    let worker = start(
        queue,
        WorkerConfig {
            shutdown_grace: Duration::from_millis(100),
            ..config(1)
        },
        Deaf { log: log.clone() },
    );
    publish(queue.as_ref(), "deaf").await;
    log.until("the handler to run", |calls| calls.len() == 1)
        .await;
    worker.stop().await;
    depth_is(queue.as_ref(), 1, 0).await;
    take_fresh_copy(queue.as_ref(), "deaf").await;
    fixture.cleanup().await;
}

/// A real queue whose consumers the test can break (they fail, then end) and whose next
/// `consume` calls it can refuse: a lost consumer on demand, on either adapter.
#[derive(Debug)]
struct Breakable {
    inner: Arc<dyn WorkQueue>,
    cut: Mutex<CancellationToken>,
    refuse: AtomicU32,
    consumes: AtomicU32,
}

impl Breakable {
    fn new(inner: Arc<dyn WorkQueue>) -> Self {
        Self {
            inner,
            cut: Mutex::new(CancellationToken::new()),
            refuse: AtomicU32::new(0),
            consumes: AtomicU32::new(0),
        }
    }

    /// Breaks every consumer, and refuses the next `refuse` calls to `consume`.
    fn break_consumers(&self, refuse: u32) {
        self.refuse.store(refuse, Ordering::SeqCst);
        let old = std::mem::take(&mut *self.cut.lock().expect("cut"));
        old.cancel();
    }
}

#[async_trait]
impl WorkQueue for Breakable {
    async fn publish(
        &self,
        kind: QueueKind,
        payload: Bytes,
        headers: Headers,
    ) -> nightshift_queue::Result<()> {
        self.inner.publish(kind, payload, headers).await
    }

    async fn consume(
        &self,
        kind: QueueKind,
        prefetch: u16,
    ) -> nightshift_queue::Result<Box<dyn Consumer>> {
        self.consumes.fetch_add(1, Ordering::SeqCst);
        let refused = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if refused.is_ok() {
            return Err(QueueError::Unavailable("refused by the test".into()));
        }
        let inner = self.inner.consume(kind, prefetch).await?;
        Ok(Box::new(BreakableConsumer {
            inner: Some(inner),
            cut: self.cut.lock().expect("cut").clone(),
        }))
    }

    async fn depth(&self, kind: QueueKind) -> nightshift_queue::Result<u64> {
        self.inner.depth(kind).await
    }

    async fn dead_lettered(&self, kind: QueueKind) -> nightshift_queue::Result<u64> {
        self.inner.dead_lettered(kind).await
    }

    fn delivery_limit(&self) -> u32 {
        self.inner.delivery_limit()
    }

    fn consumer_timeout(&self) -> Option<Duration> {
        self.inner.consumer_timeout()
    }

    async fn ping(&self) -> nightshift_queue::Result<()> {
        self.inner.ping().await
    }
}

struct BreakableConsumer {
    inner: Option<Box<dyn Consumer>>,
    cut: CancellationToken,
}

#[async_trait]
impl Consumer for BreakableConsumer {
    async fn next(&mut self) -> Option<nightshift_queue::Result<Delivery>> {
        let inner = self.inner.as_mut()?;
        tokio::select! {
            biased;
            () = self.cut.cancelled() => {
                self.inner = None;
                Some(Err(QueueError::Unavailable("broken by the test".into())))
            }
            next = inner.next() => next,
        }
    }

    async fn cancel(&mut self) -> nightshift_queue::Result<()> {
        match self.inner.as_mut() {
            Some(inner) => inner.cancel().await,
            None => Ok(()),
        }
    }
}

async fn a_lost_consumer_is_replaced(fixture: Fixture) {
    let breakable = Arc::new(Breakable::new(Arc::clone(&fixture.queue)));
    let queue: Arc<dyn WorkQueue> = breakable.clone();
    let log = Log::default();
    let worker = start(
        &queue,
        config(1),
        Always {
            log: log.clone(),
            disposition: Disposition::Done,
        },
    );
    publish(queue.as_ref(), "before").await;
    log.until("the first message", |calls| calls.len() == 1)
        .await;
    breakable.break_consumers(2);
    until("the worker to consume again", || {
        breakable.consumes.load(Ordering::SeqCst) >= 4
    })
    .await;
    publish(queue.as_ref(), "after").await;
    log.until("the message after the break", |calls| calls.len() == 2)
        .await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;
    let payloads: Vec<_> = log.calls().into_iter().map(|c| c.payload).collect();
    assert_eq!(payloads, ["before", "after"]);
    fixture.cleanup().await;
}

/// The first call of "first" waits for the gate; every other call is done at once.
struct FirstWaits {
    log: Log,
    gate: watch::Receiver<bool>,
}

#[async_trait]
impl Handler for FirstWaits {
    async fn handle(&self, job: &Job<'_>) -> Disposition {
        let first = self.log.calls().is_empty();
        self.log.record(job);
        if first {
            let _ = self.gate.clone().wait_for(|open| *open).await;
        }
        Disposition::Done
    }
}

/// RabbitMQ only: the connection dies under a running handler and the broker stays out of
/// reach for a while. The worker consumes again once it is back; the delivery in hand could
/// not be acked, so the broker delivers it again (at least once), and later messages flow.
#[tokio::test]
async fn rabbitmq_a_lost_connection_is_reestablished() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (upstream, url) = through_proxy(listener.local_addr().expect("addr"));
    let proxy = Proxy::start(listener, upstream);
    let rabbit = Arc::new(
        RabbitQueue::connect(&rabbit_config(&url))
            .await
            .expect("connect"),
    );
    let queue: Arc<dyn WorkQueue> = rabbit.clone();
    let log = Log::default();
    let (open, gate) = watch::channel(false);
    let worker = start(
        &queue,
        config(2),
        FirstWaits {
            log: log.clone(),
            gate,
        },
    );
    publish(queue.as_ref(), "first").await;
    log.until("the first call", |calls| calls.len() == 1).await;

    proxy.set_open(false);
    proxy.cut();
    // Out of reach for a moment.
    let reach = queue.as_ref();
    eventually("the broker to be out of reach", || async move {
        reach.ping().await.is_err()
    })
    .await;
    proxy.set_open(true);
    log.until("the redelivery of the lost delivery", |calls| {
        calls.len() == 2
    })
    .await;
    open.send_replace(true);
    publish(queue.as_ref(), "second").await;
    log.until("a later message", |calls| calls.len() == 3).await;
    depth_is(queue.as_ref(), 0, 0).await;
    worker.stop().await;

    let calls = log.calls();
    assert_eq!(calls[1].payload, "first");
    assert!(calls[1].redelivered, "{calls:?}");
    assert_eq!(calls[2].payload, "second");
    assert!(rabbit.reconnects() >= 1);
    rabbit.delete_all().await.expect("delete queues");
    rabbit.close().await.expect("close");
}
