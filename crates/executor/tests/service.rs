//! `serve` over the real RabbitMQ (a unique queue prefix per test, deleted at the end), the
//! dev Garage (a unique prefix), the in-memory live state and the inference simulator
//! in-process: a chunk task goes in, a chunk result comes out, the task is acked; shutdown
//! is clean, and requeues what it interrupts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Input, POLL, WAIT, batch_id, chat_line, cleanup, read_lines, start_sim, storage};
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::results::BatchRequestId;
use nightshift_core::secret::Secret;
use nightshift_executor::service::{ExecutorConfig, ExecutorPorts, serve};
use nightshift_proto::v1::{ChunkResult, ChunkTask};
use nightshift_queue::{
    Consumer, Delivery, Headers, QueueConfig, QueueKind, RabbitQueue, WorkQueue,
};
use nightshift_state::MemoryState;
use nightshift_storage::ObjectStore;
use prost::Message;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const INPUT_KEY: &str = "files/file-service";

async fn queue() -> Arc<RabbitQueue> {
    let url = std::env::var("NIGHTSHIFT_QUEUE__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let config = QueueConfig {
        url: Secret::new(url),
        prefix: format!("test-executor-{}", uuid::Uuid::new_v4()),
        delivery_limit: 3,
        connect_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(5),
    };
    Arc::new(RabbitQueue::connect(&config).await.expect("connect"))
}

async fn next(consumer: &mut dyn Consumer) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Polls `f` until it returns true, failing the test after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

struct Running {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), nightshift_executor::ServeError>>,
}

async fn start(
    config: ExecutorConfig,
    routing: nightshift_core::routing::RoutingConfig,
    ports: ExecutorPorts,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(config, routing, ports, listener, async {
        _ = stopped.await;
    }));
    Running { addr, stop, served }
}

impl Running {
    /// Signals shutdown and waits (bounded) for `serve` to return.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
            .expect("serve ends cleanly");
    }
}

fn config() -> ExecutorConfig {
    ExecutorConfig {
        prefetch: 2,
        cancel_poll: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(10),
        requeue_delay: Duration::from_millis(50),
        ..ExecutorConfig::default()
    }
}

#[tokio::test]
async fn a_chunk_task_becomes_a_part_and_a_chunk_result() {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let queue = queue().await;
    let lines: Vec<String> = (1..=6)
        .map(|i| chat_line(&format!("s-{i}"), &format!("service {i}"), Value::Null))
        .collect();
    let input = Input::new(&lines, &[]);
    store.put(INPUT_KEY, input.bytes.clone()).await.unwrap();
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 3, 6);

    // A poison message first: it must be dead-lettered, not block the chunk behind it.
    queue
        .publish(
            QueueKind::ChunkTasks,
            Bytes::from_static(b"\xff not protobuf"),
            Headers::new(),
        )
        .await
        .unwrap();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    queue
        .publish(
            QueueKind::ChunkTasks,
            Bytes::from(task.encode_to_vec()),
            Headers::from([("traceparent".to_owned(), traceparent.to_owned())]),
        )
        .await
        .unwrap();

    let running = start(
        config(),
        sim.routing(&["*"], 3),
        ExecutorPorts {
            storage: store.clone(),
            queue: queue.clone(),
            state: Arc::new(MemoryState::new()),
        },
    )
    .await;

    let mut results = queue.consume(QueueKind::ChunkResults, 1).await.unwrap();
    let delivery = next(results.as_mut()).await;
    let result = ChunkResult::decode(delivery.payload.clone()).unwrap();
    // the result is in the task's trace (the chunk's span's context when traces are set up,
    // the task's own otherwise), and says when it was published
    let trace_id = |tp: &str| tp.split('-').nth(1).map(str::to_owned);
    assert_eq!(
        delivery
            .headers
            .get("traceparent")
            .and_then(|tp| trace_id(tp)),
        trace_id(traceparent)
    );
    assert!(
        delivery.headers.contains_key("published-at"),
        "{:?}",
        delivery.headers
    );
    delivery.ack().await.unwrap();
    assert_eq!(result.schema_version, 1);
    assert_eq!(result.batch_id, batch);
    assert_eq!(result.chunk_index, task.chunk_index);
    assert_eq!((result.completed, result.failed), (4, 0));
    let usage = result.usage.unwrap();
    assert!(usage.total_tokens > 0);
    assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);

    let part = read_lines(
        store.as_ref(),
        &part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index),
    )
    .await;
    let ids: Vec<_> = part.iter().map(|line| line["id"].clone()).collect();
    let expected: Vec<_> = (3..=6)
        .map(|n| json!(BatchRequestId::for_line(&batch, n).as_str()))
        .collect();
    assert_eq!(ids, expected);
    assert!(
        part.iter()
            .all(|line| line["response"]["status_code"] == 200)
    );

    // The ops endpoints answer while it runs.
    let client = reqwest::Client::new();
    for path in ["livez", "readyz", "metrics"] {
        let response = client
            .get(format!("http://{}/{path}", running.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "/{path}");
    }

    eventually("the poison task is dead-lettered", || async {
        queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap() == 1
    })
    .await;
    running.stop().await;

    // The task was acked: nothing of it is left to deliver. A marker published now is the
    // first thing a new consumer gets (an unacked task would have returned ahead of it).
    queue
        .publish(
            QueueKind::ChunkTasks,
            Bytes::from_static(b"marker"),
            Headers::new(),
        )
        .await
        .unwrap();
    let mut tasks = queue.consume(QueueKind::ChunkTasks, 10).await.unwrap();
    let first = next(tasks.as_mut()).await;
    assert_eq!(&first.payload[..], b"marker");
    first.ack().await.unwrap();
    drop(tasks);
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 1);

    drop(results);
    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn shutdown_requeues_a_chunk_that_does_not_finish_in_time() {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let queue = queue().await;
    // The simulator holds this request far longer than the grace period.
    let lines = vec![chat_line("held", "held", json!({"latency_ms": 120_000}))];
    let input = Input::new(&lines, &[]);
    store.put(INPUT_KEY, input.bytes.clone()).await.unwrap();
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 1);
    queue
        .publish(
            QueueKind::ChunkTasks,
            Bytes::from(task.encode_to_vec()),
            Headers::new(),
        )
        .await
        .unwrap();

    let running = start(
        ExecutorConfig {
            shutdown_grace: Duration::from_millis(200),
            ..config()
        },
        sim.routing(&["*"], 3),
        ExecutorPorts {
            storage: store.clone(),
            queue: queue.clone(),
            state: Arc::new(MemoryState::new()),
        },
    )
    .await;
    sim.wait("in_flight=1").await;
    running.stop().await;

    // The chunk is back in the queue, not acked and not dead-lettered, with no result.
    let mut tasks = queue.consume(QueueKind::ChunkTasks, 1).await.unwrap();
    let again = next(tasks.as_mut()).await;
    assert!(again.redelivered);
    assert_eq!(ChunkTask::decode(again.payload.clone()).unwrap(), task);
    again.ack().await.unwrap();
    drop(tasks);
    assert_eq!(queue.depth(QueueKind::ChunkResults).await.unwrap(), 0);
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 0);
    let key = part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index);
    assert_eq!(store.head(&key).await.unwrap(), None);

    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn a_chunk_that_keeps_failing_is_requeued_until_the_delivery_limit() {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let queue = queue().await;
    // The input object does not exist: reading it fails every time, which may be transient
    // (requeue), until the queue's delivery limit dead-letters the task.
    let input = Input::new(&[chat_line("gone", "gone", Value::Null)], &[]);
    let task = input.task(&batch_id(), "files/file-missing", 1, 1);
    queue
        .publish(
            QueueKind::ChunkTasks,
            Bytes::from(task.encode_to_vec()),
            Headers::new(),
        )
        .await
        .unwrap();

    let running = start(
        config(),
        sim.routing(&["*"], 3),
        ExecutorPorts {
            storage: store.clone(),
            queue: queue.clone(),
            state: Arc::new(MemoryState::new()),
        },
    )
    .await;
    eventually("the failing task is dead-lettered", || async {
        queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap() == 1
    })
    .await;
    running.stop().await;

    assert_eq!(queue.depth(QueueKind::ChunkResults).await.unwrap(), 0);
    assert_eq!(sim.stats().await.requests.total, 0);
    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}
