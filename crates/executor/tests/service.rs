//! `serve` over the real RabbitMQ (a unique queue prefix per test, deleted at the end), the
//! dev Garage (a unique prefix), the in-memory live state and the inference simulator
//! in-process: a chunk task goes in, heartbeats and a chunk result come out, the task is
//! acked; a chunk that can never run is reported failed; a chunk cut by its time budget
//! continues in a fresh copy; a storage outage is waited out; shutdown is clean, and hands
//! back what it interrupts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Input, POLL, WAIT, batch_id, chat_line, cleanup, read_lines, start_sim, storage};
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::results::BatchRequestId;
use nightshift_core::secret::Secret;
use nightshift_executor::service::{ExecutorConfig, ExecutorPorts, serve};
use nightshift_proto::v1::{ChunkReport, ChunkResult, ChunkTask};
use nightshift_queue::{
    CancellationToken, Consumer, Delivery, Headers, QueueConfig, QueueKind, RabbitQueue, WorkQueue,
};
use nightshift_state::MemoryState;
use nightshift_storage::{ObjectStore, S3Config, S3Store};
use prost::Message;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

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
        ..QueueConfig::default()
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
    stop: CancellationToken,
    served: JoinHandle<Result<(), nightshift_executor::ServeError>>,
}

async fn start(
    config: ExecutorConfig,
    routing: nightshift_core::routing::RoutingConfig,
    ports: ExecutorPorts,
) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = ExecutorConfig { routing, ..config };
    let served = tokio::spawn(serve(config, ports, listener, stop.clone()));
    Running { addr, stop, served }
}

impl Running {
    /// Signals shutdown and waits (bounded) for `serve` to return.
    async fn stop(self) {
        self.stop.cancel();
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
        heartbeat_interval: Duration::from_millis(100),
        ..ExecutorConfig::default()
    }
}

/// The next chunk result (acked) and its headers.
async fn next_result(results: &mut dyn Consumer) -> (ChunkResult, Headers) {
    let delivery = next(results).await;
    let result = ChunkResult::decode(delivery.payload.clone()).unwrap();
    let headers = delivery.headers.clone();
    delivery.ack().await.unwrap();
    (result, headers)
}

/// Chunk results until the first one that is not a heartbeat: the heartbeats before it, and
/// it with its headers.
async fn until_report(results: &mut dyn Consumer) -> (Vec<ChunkResult>, ChunkResult, Headers) {
    let mut heartbeats = Vec::new();
    loop {
        let (result, headers) = next_result(results).await;
        if result.report() == ChunkReport::Running {
            heartbeats.push(result);
        } else {
            return (heartbeats, result, headers);
        }
    }
}

/// Every chunk result waiting in the queue now (each acked).
async fn drain_results(queue: &RabbitQueue) -> Vec<ChunkResult> {
    let waiting = queue.depth(QueueKind::ChunkResults).await.unwrap();
    let mut consumer = queue.consume(QueueKind::ChunkResults, 10).await.unwrap();
    let mut results = Vec::new();
    for _ in 0..waiting {
        results.push(next_result(consumer.as_mut()).await.0);
    }
    results
}

/// A heartbeat of `task`: a RUNNING report with no counts.
fn assert_heartbeat(result: &ChunkResult, task: &ChunkTask) {
    assert_eq!(result.report(), ChunkReport::Running, "{result:?}");
    assert_eq!(result.schema_version, 1);
    assert_eq!(result.batch_id, task.batch_id);
    assert_eq!(result.chunk_index, task.chunk_index);
    assert_eq!((result.completed, result.failed), (0, 0));
    assert!(result.error.is_empty());
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
    let (heartbeats, result, headers) = until_report(results.as_mut()).await;
    // A heartbeat went out when the chunk started, before its result.
    assert!(!heartbeats.is_empty());
    for heartbeat in &heartbeats {
        assert_heartbeat(heartbeat, &task);
    }
    // the result is in the task's trace (the chunk's span's context when traces are set up,
    // the task's own otherwise), and says when it was published
    let trace_id = |tp: &str| tp.split('-').nth(1).map(str::to_owned);
    assert_eq!(
        headers.get("traceparent").and_then(|tp| trace_id(tp)),
        trace_id(traceparent)
    );
    assert!(headers.contains_key("published-at"), "{headers:?}");
    assert_eq!(result.report(), ChunkReport::Done);
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
    drop(results);
    // Nothing but heartbeats after the result.
    for late in drain_results(&queue).await {
        assert_heartbeat(&late, &task);
    }

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

    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn shutdown_hands_back_a_chunk_that_does_not_finish_in_time() {
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

    // The chunk is back in the queue as a fresh copy (its delivery count untouched), not
    // dead-lettered, with no result: only heartbeats.
    let mut tasks = queue.consume(QueueKind::ChunkTasks, 1).await.unwrap();
    let again = next(tasks.as_mut()).await;
    assert_eq!((again.redelivered, again.delivery_count), (false, 0));
    assert_eq!(ChunkTask::decode(again.payload.clone()).unwrap(), task);
    again.ack().await.unwrap();
    drop(tasks);
    let results = drain_results(&queue).await;
    assert!(!results.is_empty(), "a heartbeat when the chunk started");
    for result in &results {
        assert_heartbeat(result, &task);
    }
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 0);
    let key = part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index);
    assert_eq!(store.head(&key).await.unwrap(), None);

    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn a_chunk_whose_input_is_missing_is_reported_failed_and_dead_lettered() {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let queue = queue().await;
    // The input object does not exist (inputs outlive their batches: it will not come back).
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
    let mut results = queue.consume(QueueKind::ChunkResults, 1).await.unwrap();
    let (_, failed, _) = until_report(results.as_mut()).await;
    assert_eq!(failed.report(), ChunkReport::Failed, "{failed:?}");
    assert_eq!(
        (failed.batch_id.as_str(), failed.chunk_index),
        (task.batch_id.as_str(), task.chunk_index)
    );
    assert!(failed.error.contains("files/file-missing"), "{failed:?}");
    // At once, not after the delivery limit.
    eventually("the task is dead-lettered", || async {
        queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap() == 1
    })
    .await;
    running.stop().await;
    drop(results);

    for late in drain_results(&queue).await {
        assert_heartbeat(&late, &task);
    }
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.unwrap(), 0);
    assert_eq!(sim.stats().await.requests.total, 0);
    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

#[tokio::test]
async fn a_chunk_cut_by_its_time_budget_continues_in_a_fresh_copy() {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let queue = queue().await;
    // Each request takes longer than the whole budget: a run ends after its first one.
    let lines: Vec<String> = (1..=3)
        .map(|i| {
            chat_line(
                &format!("b-{i}"),
                &format!("budget {i}"),
                json!({"latency_ms": 300}),
            )
        })
        .collect();
    let input = Input::new(&lines, &[]);
    store.put(INPUT_KEY, input.bytes.clone()).await.unwrap();
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 3);
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
            chunk_concurrency: 1,
            chunk_time_budget: Duration::from_millis(100),
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
    let mut results = queue.consume(QueueKind::ChunkResults, 1).await.unwrap();
    let (heartbeats, done, _) = until_report(results.as_mut()).await;
    assert_eq!(done.report(), ChunkReport::Done, "{done:?}");
    assert_eq!((done.completed, done.failed), (3, 0));
    // Several runs (each starts with a heartbeat), one DONE, every request sent once.
    assert!(heartbeats.len() >= 2, "{heartbeats:?}");
    assert_eq!(sim.stats().await.requests.total, 3);
    running.stop().await;
    drop(results);
    for late in drain_results(&queue).await {
        assert_heartbeat(&late, &task);
    }

    let part = read_lines(
        store.as_ref(),
        &part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index),
    )
    .await;
    let ids: Vec<_> = part.iter().map(|line| line["id"].clone()).collect();
    let expected: Vec<_> = (1..=3)
        .map(|n| json!(BatchRequestId::for_line(&batch, n).as_str()))
        .collect();
    assert_eq!(ids, expected);
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.unwrap(), 0);
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 0);
    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}

/// A TCP proxy that the test can cut (every open connection dies) and close (new
/// connections are dropped at once, and counted): an outage on demand.
struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    /// Forwards to `upstream` (`host:port`).
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let refused = Arc::new(AtomicUsize::new(0));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (open2, refused2, links2) = (open.clone(), refused.clone(), links.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    refused2.fetch_add(1, Ordering::SeqCst);
                    continue; // dropped: closed at once
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links2.lock().unwrap().push(link.abort_handle());
            }
        })
        .abort_handle();
        Self {
            addr,
            open,
            refused,
            links,
            accept,
        }
    }

    /// Closes it (and kills what is open) or opens it again.
    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_open(false);
    }
}

#[tokio::test]
async fn a_chunk_waits_out_a_storage_outage_and_completes() {
    let sim = start_sim().await;
    let queue = queue().await;
    // The executor reaches object storage through a proxy the test closes: the same bucket
    // and prefix as the test's own `store`.
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let endpoint = env("NIGHTSHIFT_STORAGE__ENDPOINT", "http://127.0.0.1:3900");
    let garage = endpoint.split("://").nth(1).unwrap().trim_end_matches('/');
    let proxy = Proxy::start(garage.to_owned()).await;
    let config_for = |endpoint: String| S3Config {
        endpoint: Some(endpoint),
        region: env("NIGHTSHIFT_STORAGE__REGION", "us-east-1"),
        bucket: env("NIGHTSHIFT_STORAGE__BUCKET", "nightshift"),
        access_key_id: Some(env(
            "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID",
            "GK1d224b85150aaabc7eadd95e",
        )),
        secret_access_key: Some(Secret::new(env(
            "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY",
            "04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5",
        ))),
        prefix: format!("test/executor-outage-{}", uuid::Uuid::new_v4()),
        ..S3Config::default()
    };
    let direct = config_for(endpoint.clone());
    let store = Arc::new(S3Store::new(&direct).await.unwrap());
    let proxied = Arc::new(
        S3Store::new(&S3Config {
            endpoint: Some(format!("http://{}", proxy.addr)),
            ..direct.clone()
        })
        .await
        .unwrap(),
    );
    let lines: Vec<String> = (1..=2)
        .map(|i| chat_line(&format!("o-{i}"), &format!("outage {i}"), Value::Null))
        .collect();
    let input = Input::new(&lines, &[]);
    store.put(INPUT_KEY, input.bytes.clone()).await.unwrap();
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 2);

    proxy.set_open(false);
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
            storage: proxied,
            queue: queue.clone(),
            state: Arc::new(MemoryState::new()),
        },
    )
    .await;
    // Storage is refused again and again while heartbeats keep the chunk's lease.
    let mut results = queue.consume(QueueKind::ChunkResults, 1).await.unwrap();
    let mut beats = 0;
    while beats < 10 || proxy.refused.load(Ordering::SeqCst) < 3 {
        let (result, _) = next_result(results.as_mut()).await;
        assert_heartbeat(&result, &task);
        beats += 1;
    }
    // Held: neither back in the queue nor dead-lettered (a requeueing executor would have
    // burnt the delivery limit by now).
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.unwrap(), 0);
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 0);

    proxy.set_open(true);
    let (_, done, _) = until_report(results.as_mut()).await;
    assert_eq!(done.report(), ChunkReport::Done, "{done:?}");
    assert_eq!((done.completed, done.failed), (2, 0));
    running.stop().await;
    drop(results);
    assert_eq!(queue.depth(QueueKind::ChunkTasks).await.unwrap(), 0);
    assert_eq!(queue.dead_lettered(QueueKind::ChunkTasks).await.unwrap(), 0);
    assert_eq!(sim.stats().await.requests.total, 2);
    queue.delete_all().await.unwrap();
    queue.close().await.unwrap();
    cleanup(&store).await;
}
