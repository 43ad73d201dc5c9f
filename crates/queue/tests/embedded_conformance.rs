//! The work-queue conformance suite against the embedded adapter, a fresh database per check;
//! then what the adapter does beyond the suite: messages and unsettled deliveries across a
//! restart (a real `abort` of a child process included), one owner per file, several consumers
//! of one kind, throughput.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use nightshift_queue::conformance::WAIT;
use nightshift_queue::{
    Consumer, Delivery, EmbeddedQueue, EmbeddedQueueConfig, Headers, QueueError, QueueKind,
    WorkQueue,
};

fn config(path: &Path) -> EmbeddedQueueConfig {
    EmbeddedQueueConfig {
        path: path.to_path_buf(),
        // Not the default, to show the configured limit is the one applied.
        delivery_limit: 3,
    }
}

async fn open(path: &Path) -> EmbeddedQueue {
    EmbeddedQueue::open(&config(path)).await.expect("open")
}

async fn run(name: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = open(&dir.path().join("queue.db")).await;
    nightshift_queue::conformance::run(name, &queue).await;
    queue.close().await.expect("close");
}

nightshift_queue::conformance_tests!(run);

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn publish(queue: &EmbeddedQueue, kind: QueueKind, payload: &str) {
    queue
        .publish(kind, text(payload), Headers::new())
        .await
        .expect("publish");
}

async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn payload_of(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.payload).into_owned()
}

#[tokio::test]
async fn published_messages_survive_dropping_and_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested/dir/queue.db");
    let queue = open(&path).await;
    let headers = Headers::from([("traceparent".to_owned(), "00-a-b-01".to_owned())]);
    for i in 0..3 {
        queue
            .publish(
                QueueKind::ChunkTasks,
                text(&format!("m{i}")),
                headers.clone(),
            )
            .await
            .expect("publish");
    }
    publish(&queue, QueueKind::FinalizeJobs, "poison").await;
    let mut consumer = queue
        .consume(QueueKind::FinalizeJobs, 1)
        .await
        .expect("consume");
    next(consumer.as_mut())
        .await
        .dead_letter()
        .await
        .expect("dead letter");
    // No close: the last handle going away releases the file.
    drop(consumer);
    drop(queue);

    let queue = open(&path).await;
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.expect("depth"), 3);
    assert_eq!(
        queue
            .dead_lettered(QueueKind::FinalizeJobs)
            .await
            .expect("dead"),
        1
    );
    let mut consumer = queue
        .consume(QueueKind::ChunkTasks, 5)
        .await
        .expect("consume");
    for i in 0..3 {
        let delivery = next(consumer.as_mut()).await;
        assert_eq!(payload_of(&delivery), format!("m{i}"), "FIFO");
        assert_eq!(delivery.headers, headers);
        assert!(!delivery.redelivered && delivery.delivery_count == 0);
        delivery.ack().await.expect("ack");
    }
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.expect("depth"), 0);
    queue.close().await.expect("close");
}

#[tokio::test]
async fn a_delivery_unsettled_at_a_crash_is_delivered_again_after_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("queue.db");
    let queue = EmbeddedQueue::open(&EmbeddedQueueConfig {
        path: path.clone(),
        delivery_limit: 1,
    })
    .await
    .expect("open");
    publish(&queue, QueueKind::ChunkTasks, "in hand").await;
    publish(&queue, QueueKind::ChunkResults, "second chance").await;
    publish(&queue, QueueKind::ChunkResults, "waiting").await;
    let mut tasks = queue
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    let in_hand = next(tasks.as_mut()).await;
    let mut results = queue
        .consume(QueueKind::ChunkResults, 1)
        .await
        .expect("consume");
    next(results.as_mut())
        .await
        .requeue()
        .await
        .expect("requeue");
    let second_chance = next(results.as_mut()).await;
    assert_eq!(
        (
            payload_of(&second_chance).as_str(),
            second_chance.delivery_count
        ),
        ("second chance", 1)
    );

    // The process dies: the database closes with both messages delivered and unsettled, and
    // nothing the process still holds reaches it any more.
    queue.close().await.expect("close");
    assert!(matches!(
        in_hand.ack().await,
        Err(QueueError::DeliveryLost(_))
    ));
    drop((second_chance, tasks, results, queue));

    let queue = EmbeddedQueue::open(&EmbeddedQueueConfig {
        path,
        delivery_limit: 1,
    })
    .await
    .expect("reopen");
    let mut tasks = queue
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    let again = next(tasks.as_mut()).await;
    assert_eq!(payload_of(&again), "in hand");
    assert!(again.redelivered);
    assert_eq!(again.delivery_count, 1);
    again.ack().await.expect("ack");
    // The other had returned once already: with a limit of 1 its second return dead-letters it.
    assert_eq!(
        queue
            .dead_lettered(QueueKind::ChunkResults)
            .await
            .expect("dead"),
        1
    );
    let mut results = queue
        .consume(QueueKind::ChunkResults, 1)
        .await
        .expect("consume");
    let waiting = next(results.as_mut()).await;
    assert_eq!(
        (payload_of(&waiting).as_str(), waiting.delivery_count),
        ("waiting", 0)
    );
    waiting.ack().await.expect("ack");
    queue.close().await.expect("close");
}

/// Set in the environment of the child process of [`a_killed_process_loses_nothing`].
const CHILD_DB: &str = "NIGHTSHIFT_TEST_EMBEDDED_QUEUE_CHILD_DB";

/// Not a test on its own: the child process of [`a_killed_process_loses_nothing`] (a no-op
/// when run normally). Publishes, takes one delivery, and aborts without unwinding.
#[tokio::test]
async fn child_publishes_takes_a_delivery_and_aborts() {
    let Some(path) = std::env::var_os(CHILD_DB) else {
        return;
    };
    let queue = open(Path::new(&path)).await;
    for i in 0..3 {
        publish(&queue, QueueKind::ChunkTasks, &format!("m{i}")).await;
    }
    let mut consumer = queue
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    let delivery = next(consumer.as_mut()).await;
    assert_eq!(payload_of(&delivery), "m0");
    std::process::abort();
}

#[tokio::test]
async fn a_killed_process_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path: PathBuf = dir.path().join("queue.db");
    let status = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_publishes_takes_a_delivery_and_aborts",
            "--nocapture",
        ])
        .env(CHILD_DB, &path)
        .status()
        .await
        .expect("run the child");
    assert!(!status.success(), "the child must have aborted: {status}");

    let queue = open(&path).await;
    let mut consumer = queue
        .consume(QueueKind::ChunkTasks, 3)
        .await
        .expect("consume");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let delivery = next(consumer.as_mut()).await;
        seen.push((payload_of(&delivery), delivery.delivery_count));
        delivery.ack().await.expect("ack");
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("m0".to_owned(), 1),
            ("m1".to_owned(), 0),
            ("m2".to_owned(), 0)
        ]
    );
    queue.close().await.expect("close");
}

#[tokio::test]
async fn one_queue_per_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("queue.db");
    let first = open(&path).await;
    match EmbeddedQueue::open(&config(&path)).await {
        Err(QueueError::Unavailable(message)) => {
            assert!(message.contains("another"), "{message}");
        }
        other => panic!("a second open must fail, got {other:?}"),
    }
    first.ping().await.expect("the first still works");
    first.close().await.expect("close");
    first.close().await.expect("closing twice");
    assert!(matches!(
        first.ping().await,
        Err(QueueError::Unavailable(_))
    ));
    let second = open(&path).await;
    second.ping().await.expect("ping");
    second.close().await.expect("close");
}

#[tokio::test]
async fn a_closed_queue_ends_its_consumers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = open(&dir.path().join("queue.db")).await;
    let mut consumer = queue
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    let waiting = tokio::spawn(async move {
        let first = consumer.next().await;
        let second = consumer.next().await;
        (first.map(|r| r.map(drop)), second.is_none())
    });
    queue.close().await.expect("close");
    // The consumer notices at its next look at the queue (at the latest after its re-check).
    let (first, ended) = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the consumer ends")
        .expect("join");
    assert!(matches!(first, Some(Err(QueueError::Unavailable(_)))));
    assert!(ended);
    assert!(matches!(
        queue
            .publish(QueueKind::ChunkTasks, text("late"), Headers::new())
            .await,
        Err(QueueError::Unavailable(_))
    ));
    assert!(queue.consume(QueueKind::ChunkTasks, 1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_one_kind_share_its_messages_without_duplicates() {
    const N: usize = 500;
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = open(&dir.path().join("queue.db")).await;
    let kind = QueueKind::ChunkTasks;
    futures::stream::iter(0..N)
        .map(|i| queue.publish(kind, text(&format!("m{i}")), Headers::new()))
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .expect("publish");
    let consumers = (0..4).map(|_| async {
        let mut consumer = queue.consume(kind, 4).await.expect("consume");
        let mut got = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next()).await
        {
            got.push(payload_of(&delivery));
            delivery.ack().await.expect("ack");
        }
        got
    });
    let all: Vec<String> = futures::future::join_all(consumers)
        .await
        .into_iter()
        .flatten()
        .collect();
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), N, "every message once");
    assert_eq!(distinct.len(), N, "no message twice");
    assert_eq!(queue.depth(kind).await.expect("depth"), 0);
    queue.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_small_messages_go_through() {
    const N: usize = 10_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = open(&dir.path().join("queue.db")).await;
    let kind = QueueKind::ChunkResults;
    let publishing = futures::stream::iter(0..N)
        .map(|i| queue.publish(kind, text(&format!("m{i}")), Headers::new()))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>();
    let consuming = async {
        let mut consumer = queue.consume(kind, 64).await.expect("consume");
        let mut seen = BTreeSet::new();
        while seen.len() < N {
            let delivery = next(consumer.as_mut()).await;
            assert!(seen.insert(payload_of(&delivery)), "delivered twice");
            delivery.ack().await.expect("ack");
        }
        seen.len()
    };
    let (published, consumed) = tokio::join!(publishing, consuming);
    published.expect("publish");
    assert_eq!(consumed, N);
    assert_eq!(queue.depth(kind).await.expect("depth"), 0);
    queue.close().await.expect("close");
}
