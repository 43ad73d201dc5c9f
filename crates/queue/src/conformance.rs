//! The conformance suite every [`WorkQueue`] adapter must pass.
//!
//! Each check takes a queue whose queues are empty (give each run its own prefix) and panics
//! with a message on the first violation of the port's contract. Adapters run them from their
//! integration tests, one `#[tokio::test]` per check.
//!
//! Built with the `testsuite` feature only (an adapter's tests enable it through a
//! dev-dependency): an adapter's test file defines `async fn run(name: &str)`, which builds a
//! fresh adapter and calls [`run`], and declares one test per check with
//! [`conformance_tests!(run)`](crate::conformance_tests).
//!
//! Queues settle asynchronously, so the checks never sleep to wait for a state: they wait for
//! a delivery with a deadline ([`WAIT`]), poll counts until they match or a deadline passes,
//! and conclude that nothing more is coming after a bounded quiet period ([`QUIET`]).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::{Consumer, Delivery, Headers, QueueError, QueueKind, WorkQueue};

/// Every check of the suite, named once: calls `$then!` with `$args` followed by the checks'
/// names. Both [`run`] and each adapter's tests ([`conformance_tests!`](crate::conformance_tests))
/// are made from this list, so a check can be left out of neither, and a check written but not
/// listed is dead code.
#[doc(hidden)]
#[macro_export]
macro_rules! __queue_conformance_checks {
    ($then:path { $($args:tt)* }) => {
        $then! { $($args)*
            round_trip_with_headers,
            nothing_is_lost,
            dropped_consumer_redelivers,
            dropped_delivery_is_requeued,
            requeue_redelivers,
            dead_letter_is_not_redelivered,
            delivery_limit_dead_letters,
            prefetch_bounds_unsettled,
            cancel_stops_deliveries,
            depth_counts_ready_messages,
            queues_are_independent,
            invalid_arguments,
            ping,
        }
    };
}

macro_rules! dispatch {
    ($($check:ident,)+) => {
        /// Runs the check named `name` against `queue`.
        ///
        /// # Panics
        /// When the check fails, or no check has that name.
        pub async fn run(name: &str, queue: &dyn WorkQueue) {
            match name {
                $(stringify!($check) => $check(queue).await,)+
                other => panic!("no work-queue conformance check named {other:?}"),
            }
        }
    };
}

crate::__queue_conformance_checks!(dispatch {});

/// How long a check waits for something that must happen (a delivery, a count).
pub const WAIT: Duration = Duration::from_secs(15);
/// How long a check waits for nothing to happen before it concludes that nothing will.
pub const QUIET: Duration = Duration::from_millis(1500);
/// How often a count is polled while waiting for it.
const POLL: Duration = Duration::from_millis(50);

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn publish(queue: &dyn WorkQueue, kind: QueueKind, payload: &str) {
    queue
        .publish(kind, text(payload), Headers::new())
        .await
        .unwrap_or_else(|e| panic!("publish {payload:?} to {kind}: {e}"));
}

async fn consume(queue: &dyn WorkQueue, kind: QueueKind, prefetch: u16) -> Box<dyn Consumer> {
    queue
        .consume(kind, prefetch)
        .await
        .unwrap_or_else(|e| panic!("consume {kind}: {e}"))
}

/// The next delivery, which must come within [`WAIT`].
async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
        Ok(None) => panic!("consumer ended"),
        Err(_) => panic!("no delivery within {WAIT:?}"),
    }
}

/// Nothing is delivered for [`QUIET`].
async fn assert_quiet(consumer: &mut dyn Consumer, context: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!("{context}: expected no delivery, got {got:?}");
    }
}

async fn ack(delivery: Delivery) {
    delivery.ack().await.expect("ack");
}

fn payload_of(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.payload).into_owned()
}

/// Polls `count` until it returns `expected`; panics with the last value after [`WAIT`].
async fn eventually<F, Fut>(what: &str, expected: u64, count: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<u64, QueueError>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = count().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        if got == expected {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{what}: expected {expected}, still {got} after {WAIT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn depth_is(queue: &dyn WorkQueue, kind: QueueKind, expected: u64) {
    eventually(&format!("depth of {kind}"), expected, || queue.depth(kind)).await;
}

async fn dead_lettered_is(queue: &dyn WorkQueue, kind: QueueKind, expected: u64) {
    eventually(&format!("dead-lettered of {kind}"), expected, || {
        queue.dead_lettered(kind)
    })
    .await;
}

/// A message comes back as published: payload (binary is fine), headers, first-delivery flags.
async fn round_trip_with_headers(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    let payload = Bytes::from_static(b"\x00\x01proto\xff\xfe bytes\n");
    let headers = Headers::from([
        (
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        ),
        ("schema-version".to_owned(), "1".to_owned()),
        ("empty".to_owned(), String::new()),
    ]);
    queue
        .publish(kind, payload.clone(), headers.clone())
        .await
        .expect("publish");
    let mut consumer = consume(queue, kind, 1).await;
    let delivery = next(consumer.as_mut()).await;
    assert_eq!(delivery.payload, payload);
    assert_eq!(delivery.headers, headers, "exactly the published headers");
    assert!(!delivery.redelivered, "a first delivery is not redelivered");
    assert_eq!(delivery.delivery_count, 0);
    ack(delivery).await;
    assert_quiet(consumer.as_mut(), "after the only message was acked").await;
    depth_is(queue, kind, 0).await;
    dead_lettered_is(queue, kind, 0).await;
}

/// Every one of many messages, published concurrently, is delivered exactly once.
async fn nothing_is_lost(queue: &dyn WorkQueue) {
    const N: usize = 200;
    let kind = QueueKind::ChunkResults;
    futures::stream::iter(0..N)
        .map(|i| queue.publish(kind, text(&format!("message-{i}")), Headers::new()))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .expect("publish");
    let mut consumer = consume(queue, kind, 10).await;
    let mut seen = BTreeSet::new();
    while seen.len() < N {
        let delivery = next(consumer.as_mut()).await;
        let payload = payload_of(&delivery);
        assert!(!delivery.redelivered, "{payload} redelivered in a calm run");
        assert!(seen.insert(payload.clone()), "{payload} delivered twice");
        ack(delivery).await;
    }
    let expected: BTreeSet<String> = (0..N).map(|i| format!("message-{i}")).collect();
    assert_eq!(seen, expected);
    assert_quiet(consumer.as_mut(), "after every message was acked").await;
    depth_is(queue, kind, 0).await;
}

/// Dropping a consumer returns its unsettled deliveries (still held by the caller) to the
/// queue: another consumer gets them, marked as redelivered.
async fn dropped_consumer_redelivers(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    for i in 0..3 {
        publish(queue, kind, &format!("m{i}")).await;
    }
    let mut first = consume(queue, kind, 10).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(first.as_mut()).await);
    }
    assert!(held.iter().all(|d| !d.redelivered && d.delivery_count == 0));
    drop(first);

    let mut second = consume(queue, kind, 10).await;
    let mut again = BTreeSet::new();
    for _ in 0..3 {
        let delivery = next(second.as_mut()).await;
        assert!(
            delivery.redelivered,
            "{delivery:?} must be marked redelivered"
        );
        assert!(delivery.delivery_count >= 1, "{delivery:?} must be counted");
        again.insert(payload_of(&delivery));
        ack(delivery).await;
    }
    assert_eq!(
        again,
        BTreeSet::from(["m0".into(), "m1".into(), "m2".into()])
    );
    // Whatever settling the stale deliveries does, it must not bring the messages back.
    drop(held);
    assert_quiet(second.as_mut(), "after the redeliveries were acked").await;
    depth_is(queue, kind, 0).await;
}

/// A delivery dropped unsettled, its consumer alive, is delivered again.
async fn dropped_delivery_is_requeued(queue: &dyn WorkQueue) {
    let kind = QueueKind::FinalizeJobs;
    publish(queue, kind, "dropped").await;
    let mut consumer = consume(queue, kind, 1).await;
    drop(next(consumer.as_mut()).await);
    let delivery = next(consumer.as_mut()).await;
    assert_eq!(payload_of(&delivery), "dropped");
    assert!(
        delivery.redelivered && delivery.delivery_count >= 1,
        "{delivery:?}"
    );
    ack(delivery).await;
    assert_quiet(consumer.as_mut(), "after the redelivery was acked").await;
    depth_is(queue, kind, 0).await;
}

/// A requeued message is delivered again, counted once.
async fn requeue_redelivers(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    let headers = Headers::from([("traceparent".to_owned(), "t".to_owned())]);
    queue
        .publish(kind, text("again"), headers.clone())
        .await
        .expect("publish");
    let mut consumer = consume(queue, kind, 1).await;
    next(consumer.as_mut())
        .await
        .requeue()
        .await
        .expect("requeue");
    let delivery = next(consumer.as_mut()).await;
    assert_eq!(payload_of(&delivery), "again");
    assert_eq!(delivery.headers, headers, "a redelivery keeps its headers");
    assert!(delivery.redelivered);
    assert_eq!(delivery.delivery_count, 1);
    ack(delivery).await;
    assert_quiet(consumer.as_mut(), "after the redelivery was acked").await;
    depth_is(queue, kind, 0).await;
    dead_lettered_is(queue, kind, 0).await;
}

/// A dead-lettered message lands in its kind's dead-letter queue and is never delivered again.
async fn dead_letter_is_not_redelivered(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    publish(queue, kind, "poison").await;
    publish(queue, kind, "fine").await;
    let mut consumer = consume(queue, kind, 1).await;
    for _ in 0..2 {
        let delivery = next(consumer.as_mut()).await;
        match payload_of(&delivery).as_str() {
            "poison" => delivery.dead_letter().await.expect("dead_letter"),
            "fine" => ack(delivery).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    dead_lettered_is(queue, kind, 1).await;
    assert_quiet(consumer.as_mut(), "after dead-lettering").await;
    depth_is(queue, kind, 0).await;
    for other in [QueueKind::ChunkResults, QueueKind::FinalizeJobs] {
        dead_lettered_is(queue, other, 0).await;
    }
}

/// A message requeued at every delivery is delivered `delivery_limit + 1` times, then lands
/// in the dead-letter queue.
async fn delivery_limit_dead_letters(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    let limit = queue.delivery_limit();
    publish(queue, kind, "crashes everyone").await;
    let mut consumer = consume(queue, kind, 1).await;
    for attempt in 0..=limit {
        let delivery = next(consumer.as_mut()).await;
        assert_eq!(delivery.delivery_count, attempt, "{delivery:?}");
        assert_eq!(delivery.redelivered, attempt > 0, "{delivery:?}");
        delivery.requeue().await.expect("requeue");
    }
    dead_lettered_is(queue, kind, 1).await;
    assert_quiet(consumer.as_mut(), "past the delivery limit").await;
    depth_is(queue, kind, 0).await;
}

/// A consumer that settles nothing gets exactly `prefetch` deliveries; settling one lets the
/// next one through.
async fn prefetch_bounds_unsettled(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    for i in 0..10 {
        publish(queue, kind, &format!("m{i}")).await;
    }
    let mut consumer = consume(queue, kind, 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(consumer.as_mut()).await);
    }
    assert_quiet(
        consumer.as_mut(),
        "with 3 unsettled deliveries and prefetch 3",
    )
    .await;
    ack(held.remove(0)).await;
    held.push(next(consumer.as_mut()).await);
    assert_quiet(consumer.as_mut(), "with 3 unsettled deliveries again").await;
    depth_is(queue, kind, 6).await;
    for delivery in held {
        ack(delivery).await;
    }
}

/// `depth` counts ready messages: not the delivered-but-unsettled ones, not the acked ones.
async fn depth_counts_ready_messages(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkResults;
    depth_is(queue, kind, 0).await;
    for i in 0..5 {
        publish(queue, kind, &format!("m{i}")).await;
    }
    depth_is(queue, kind, 5).await;
    let mut consumer = consume(queue, kind, 2).await;
    let first = next(consumer.as_mut()).await;
    let second = next(consumer.as_mut()).await;
    depth_is(queue, kind, 3).await;
    ack(first).await;
    second.requeue().await.expect("requeue");
    // Both slots are free again: the consumer takes two more (perhaps the requeued one).
    let third = next(consumer.as_mut()).await;
    let fourth = next(consumer.as_mut()).await;
    depth_is(queue, kind, 2).await;
    ack(third).await;
    ack(fourth).await;
    drop(consumer);
    depth_is(queue, kind, 2).await;
    for other in [QueueKind::ChunkTasks, QueueKind::FinalizeJobs] {
        depth_is(queue, other, 0).await;
    }
}

/// A message of one kind is only ever delivered to consumers of that kind.
async fn queues_are_independent(queue: &dyn WorkQueue) {
    for kind in QueueKind::ALL {
        publish(queue, kind, kind.as_str()).await;
    }
    for kind in QueueKind::ALL {
        depth_is(queue, kind, 1).await;
    }
    for kind in QueueKind::ALL {
        let mut consumer = consume(queue, kind, 5).await;
        let delivery = next(consumer.as_mut()).await;
        assert_eq!(payload_of(&delivery), kind.as_str());
        ack(delivery).await;
        assert_quiet(consumer.as_mut(), kind.as_str()).await;
    }
    for kind in QueueKind::ALL {
        depth_is(queue, kind, 0).await;
        dead_lettered_is(queue, kind, 0).await;
    }
}

/// Prefetch 0 (unbounded) and broker-reserved header names are refused; nothing is enqueued.
async fn invalid_arguments(queue: &dyn WorkQueue) {
    let kind = QueueKind::FinalizeJobs;
    assert!(
        matches!(
            queue.consume(kind, 0).await,
            Err(QueueError::InvalidArgument(_))
        ),
        "prefetch 0 must be refused"
    );
    for name in ["x-delivery-count", "X-Death"] {
        let headers = Headers::from([(name.to_owned(), "1".to_owned())]);
        match queue.publish(kind, text("m"), headers).await {
            Err(QueueError::InvalidArgument(_)) => {}
            other => panic!("header {name}: expected InvalidArgument, got {other:?}"),
        }
    }
    depth_is(queue, kind, 0).await;
}

/// A cancelled consumer gets nothing new: what was already on its way still comes, then it
/// ends; the deliveries in hand can still be settled; the messages it never got are delivered
/// to the next consumer as first deliveries.
async fn cancel_stops_deliveries(queue: &dyn WorkQueue) {
    let kind = QueueKind::ChunkTasks;
    for payload in ["c1", "c2", "c3"] {
        publish(queue, kind, payload).await;
    }
    let mut consumer = consume(queue, kind, 2).await;
    let mut in_hand = vec![next(consumer.as_mut()).await];
    consumer.cancel().await.expect("cancel");
    loop {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(Ok(delivery))) => in_hand.push(delivery),
            Ok(None) => break,
            Ok(Some(Err(e))) => panic!("cancelled consumer failed: {e}"),
            Err(_) => panic!("the cancelled consumer did not end within {WAIT:?}"),
        }
    }
    assert!(in_hand.len() <= 2, "more than prefetch: {in_hand:?}");
    let taken: BTreeSet<String> = in_hand.iter().map(payload_of).collect();
    for delivery in in_hand {
        ack(delivery).await;
    }
    drop(consumer);
    let mut other = consume(queue, kind, 10).await;
    let mut rest = BTreeSet::new();
    while taken.len() + rest.len() < 3 {
        let delivery = next(other.as_mut()).await;
        assert_eq!(
            (delivery.delivery_count, delivery.redelivered),
            (0, false),
            "a message the cancelled consumer never got: {delivery:?}"
        );
        rest.insert(payload_of(&delivery));
        ack(delivery).await;
    }
    assert!(taken.is_disjoint(&rest), "{taken:?} and {rest:?}");
    assert_quiet(other.as_mut(), "every message was acked").await;
}

async fn ping(queue: &dyn WorkQueue) {
    queue.ping().await.expect("ping");
    queue.ping().await.expect("ping again");
}

/// Declares the suite in an adapter's integration tests: one `#[tokio::test]` per check, each
/// calling `$run(name)` — an `async fn(&str)` of the test file that builds a fresh adapter and
/// gives it to [`run`](crate::conformance::run) with the check's name.
#[macro_export]
macro_rules! conformance_tests {
    ($run:path) => {
        $crate::__queue_conformance_checks!($crate::conformance_tests { @declare $run; });
    };
    (@declare $run:path; $($check:ident,)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $run(stringify!($check)).await
            }
        )+
    };
}
