//! The finalizer service end to end, in process: real Garage and RabbitMQ (`make up`), the
//! in-memory live state, and a fake scheduler — a tonic server implementing `Pipeline` that
//! serves a plan, keeps a finalization lease (one holder at a time, until released or taken
//! away by the test) and records the commits. The queue is wrapped to record how each
//! delivery is settled.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use nightshift_core::batch::{BatchRecord, BatchStatus, ResultFile, parts_prefix};
use nightshift_core::file::FileRecord;
use nightshift_core::results::{NoResponseCode, Usage};
use nightshift_core::secret::Secret;
use nightshift_finalizer::{FinalizerConfig, FinalizerPorts, PlannedChunk, ServeError, serve};
use nightshift_proto::v1::pipeline_server::{Pipeline, PipelineServer};
use nightshift_proto::v1::{
    self, CommitBatchRequest, FinalizeJob, GetFinalizePlanRequest, LeaseFinalizationRequest,
    LeaseFinalizationResponse,
};
use nightshift_queue::{
    CancellationToken, Consumer, Delivery, Headers, QueueConfig, QueueKind, RabbitQueue, Settle,
    Settlement, WorkQueue,
};
use nightshift_state::{LineOutcome, LiveCounts, LiveState, MemoryState};
use nightshift_storage::{ObjectStore, S3Store};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// How long a test waits for something that must happen.
const WAIT: Duration = Duration::from_secs(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("lock")
}

/// Polls `check` until it returns `Some`, or fails the test after [`WAIT`].
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A fake scheduler

#[derive(Default)]
struct SchedulerState {
    /// The plan served, for its batch only (others are NOT_FOUND).
    plan: Option<v1::FinalizePlan>,
    plan_calls: u32,
    commits: Vec<CommitBatchRequest>,
    /// Commits to fail with `fail_commits_with` (after recording them) before succeeding.
    fail_commits: u32,
    fail_commits_with: Option<tonic::Code>,
    /// Set: each commit (after being recorded) waits for a permit of it.
    commit_gate: Option<Arc<Notify>>,
    /// GetFinalizePlan never answers.
    hang_plan: bool,
    /// Who holds the batch's finalization lease (expiry is not modelled: it is held until
    /// released, or given to another holder by the test).
    lease_holder: Option<String>,
    /// Every LeaseFinalization call, and whether it was granted.
    leases: Vec<(LeaseFinalizationRequest, bool)>,
    /// LeaseFinalization calls to fail with UNIMPLEMENTED (an older scheduler) first.
    unimplemented_leases: u32,
}

impl SchedulerState {
    /// The holders that asked for the lease (not a release) and were refused it.
    fn refused(&self) -> Vec<String> {
        self.leases
            .iter()
            .filter(|(r, granted)| !r.release && !granted)
            .map(|(r, _)| r.holder.clone())
            .collect()
    }

    /// The holders that took or renewed the lease, in call order, without repeats.
    fn holders(&self) -> Vec<String> {
        let mut holders: Vec<String> = Vec::new();
        for (request, granted) in &self.leases {
            if *granted && !request.release && holders.last() != Some(&request.holder) {
                holders.push(request.holder.clone());
            }
        }
        holders
    }
}

#[derive(Clone, Default)]
struct FakeScheduler(Arc<Mutex<SchedulerState>>);

#[tonic::async_trait]
impl Pipeline for FakeScheduler {
    async fn get_finalize_plan(
        &self,
        request: Request<GetFinalizePlanRequest>,
    ) -> Result<Response<v1::FinalizePlan>, Status> {
        let (plan, hang) = {
            let mut s = lock(&self.0);
            s.plan_calls += 1;
            (s.plan.clone(), s.hang_plan)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let asked = request.into_inner().batch_id;
        match plan {
            Some(plan) if plan.batch.as_ref().is_some_and(|b| b.id == asked) => {
                Ok(Response::new(plan))
            }
            _ => Err(Status::not_found(format!("no batch {asked}"))),
        }
    }

    /// Records the commit and, like the real one, makes the batch terminal (idempotently).
    async fn commit_batch(
        &self,
        request: Request<CommitBatchRequest>,
    ) -> Result<Response<v1::Batch>, Status> {
        let req = request.into_inner();
        let gate = {
            let mut s = lock(&self.0);
            s.commits.push(req.clone());
            s.commit_gate.clone()
        };
        if let Some(gate) = gate {
            gate.notified().await;
        }
        let mut s = lock(&self.0);
        if s.fail_commits > 0 {
            s.fail_commits -= 1;
            let code = s.fail_commits_with.unwrap_or(tonic::Code::Unavailable);
            return Err(Status::new(code, "the metadata store is restarting"));
        }
        let plan = s
            .plan
            .as_mut()
            .ok_or_else(|| Status::not_found("no batch"))?;
        let ending = std::mem::take(&mut plan.ending);
        let batch = plan
            .batch
            .as_mut()
            .ok_or_else(|| Status::internal("no batch"))?;
        if !BatchStatus::parse(&batch.status).is_some_and(BatchStatus::is_terminal) {
            batch.status = ending;
            batch.output_file_id = req.output_file.map(|f| f.id);
            batch.error_file_id = req.error_file.map(|f| f.id);
            batch.completed = req.completed;
            batch.failed = req.failed;
            batch.usage = req.usage;
        }
        Ok(Response::new(batch.clone()))
    }

    /// Grants the lease to its holder or to anyone when free, while the batch is not
    /// terminal; a release by the holder frees it.
    async fn lease_finalization(
        &self,
        request: Request<LeaseFinalizationRequest>,
    ) -> Result<Response<LeaseFinalizationResponse>, Status> {
        let req = request.into_inner();
        let mut s = lock(&self.0);
        if s.unimplemented_leases > 0 {
            s.unimplemented_leases -= 1;
            return Err(Status::unimplemented("LeaseFinalization"));
        }
        let finalizing = s.plan.as_ref().is_some_and(|p| {
            p.batch.as_ref().is_some_and(|b| {
                b.id == req.batch_id
                    && !BatchStatus::parse(&b.status).is_some_and(BatchStatus::is_terminal)
            })
        });
        let granted = if req.release {
            if s.lease_holder.as_deref() == Some(req.holder.as_str()) {
                s.lease_holder = None;
            }
            false
        } else if finalizing
            && s.lease_holder
                .as_ref()
                .is_none_or(|holder| *holder == req.holder)
        {
            s.lease_holder = Some(req.holder.clone());
            true
        } else {
            false
        };
        let holder = if granted {
            String::new()
        } else {
            s.lease_holder.clone().unwrap_or_default()
        };
        s.leases.push((req, granted));
        Ok(Response::new(LeaseFinalizationResponse {
            granted,
            expires_at: 0,
            holder,
        }))
    }
}

/// Serves `fake` (and gRPC health) on a fresh port; returns its URL.
async fn start_scheduler(fake: FakeScheduler) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (reporter, health) = tonic_health::server::health_reporter();
    let app = tonic::service::Routes::new(health)
        .add_service(PipelineServer::new(fake))
        .prepare()
        .into_axum_router();
    tokio::spawn(async move {
        let _reporter = reporter;
        axum::serve(listener, app).await.expect("fake scheduler");
    });
    format!("http://{addr}")
}

fn plan_for(batch: &BatchRecord, chunks: &[PlannedChunk], ending: &str) -> v1::FinalizePlan {
    let mut batch = v1::Batch::from(batch);
    batch.total = chunks.iter().map(|c| u64::from(c.span.line_count)).sum();
    v1::FinalizePlan {
        batch: Some(batch),
        input_storage_key: "files/file-input".into(),
        chunks: chunks
            .iter()
            .map(|c| v1::Chunk {
                index: c.span.index,
                byte_start: c.span.byte_start,
                byte_end: c.span.byte_end,
                first_line: c.span.first_line,
                line_count: c.span.line_count,
                done: c.done,
                failure: c.failure.clone(),
                part: c.part.as_ref().map(v1::PartTally::from),
            })
            .collect(),
        ending: ending.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// A queue that records settlements

type Log = Arc<Mutex<Vec<&'static str>>>;

/// The real queue, with every delivery's settlement recorded in `log`.
#[derive(Debug)]
struct Recording {
    inner: Arc<RabbitQueue>,
    log: Log,
}

#[async_trait]
impl WorkQueue for Recording {
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
        Ok(Box::new(RecordingConsumer {
            inner: self.inner.consume(kind, prefetch).await?,
            log: self.log.clone(),
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

struct RecordingConsumer {
    inner: Box<dyn Consumer>,
    log: Log,
}

#[async_trait]
impl Consumer for RecordingConsumer {
    async fn next(&mut self) -> Option<nightshift_queue::Result<Delivery>> {
        Some(self.inner.next().await?.map(|d| {
            Delivery::new(
                d.payload.clone(),
                d.headers.clone(),
                d.redelivered,
                d.delivery_count,
                Box::new(RecordingSettler {
                    inner: d,
                    log: self.log.clone(),
                }),
            )
        }))
    }
}

#[derive(Debug)]
struct RecordingSettler {
    inner: Delivery,
    log: Log,
}

#[async_trait]
impl Settle for RecordingSettler {
    async fn settle(self: Box<Self>, how: Settlement) -> nightshift_queue::Result<()> {
        let result = match how {
            Settlement::Ack => self.inner.ack().await,
            Settlement::Requeue => self.inner.requeue().await,
            Settlement::DeadLetter => self.inner.dead_letter().await,
        };
        let entry = match (how, result.is_ok()) {
            (Settlement::Ack, true) => "ack",
            (Settlement::Requeue, true) => "requeue",
            (Settlement::DeadLetter, true) => "dead_letter",
            (_, false) => "settle_failed",
        };
        lock(&self.log).push(entry);
        result
    }

    fn abandon(self: Box<Self>) {
        lock(&self.log).push("abandon");
        drop(self.inner);
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

struct Harness {
    store: Arc<S3Store>,
    queue: Arc<RabbitQueue>,
    state: Arc<MemoryState>,
    scheduler: FakeScheduler,
    scheduler_url: String,
    log: Log,
}

impl Harness {
    async fn new() -> Self {
        let queue_config = QueueConfig {
            url: Secret::new(
                std::env::var("NIGHTSHIFT_QUEUE__URL")
                    .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
            ),
            prefix: format!("test-finalizer-{}", uuid::Uuid::new_v4()),
            delivery_limit: 3,
            connect_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(3),
            ..QueueConfig::default()
        };
        let scheduler = FakeScheduler::default();
        Self {
            store: store().await,
            queue: Arc::new(RabbitQueue::connect(&queue_config).await.expect("rabbitmq")),
            state: Arc::new(MemoryState::new()),
            scheduler_url: start_scheduler(scheduler.clone()).await,
            scheduler,
            log: Log::default(),
        }
    }

    fn config(&self) -> FinalizerConfig {
        FinalizerConfig {
            scheduler_url: self.scheduler_url.clone(),
            retry_backoff: Duration::from_millis(10),
            retry_backoff_max: Duration::from_millis(50),
            outage_backoff_max: Duration::from_millis(50),
            shutdown_grace: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(3),
            ..FinalizerConfig::default()
        }
    }

    async fn start(&self, config: FinalizerConfig) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let ops = listener.local_addr().expect("addr");
        let ports = FinalizerPorts {
            storage: self.store.clone(),
            queue: Arc::new(Recording {
                inner: self.queue.clone(),
                log: self.log.clone(),
            }),
            state: self.state.clone(),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(config, ports, listener, stop.clone()));
        Running { stop, task, ops }
    }

    async fn publish(&self, payload: Vec<u8>) {
        self.queue
            .publish(QueueKind::FinalizeJobs, payload.into(), Headers::new())
            .await
            .expect("publish");
    }

    async fn publish_job(&self, batch: &BatchRecord) {
        let job = FinalizeJob {
            schema_version: 1,
            batch_id: batch.id.to_string(),
        };
        self.publish(job.encode_to_vec()).await;
    }

    fn scheduler(&self) -> MutexGuard<'_, SchedulerState> {
        lock(&self.scheduler.0)
    }

    /// Waits until `n` deliveries are settled; returns the settlements.
    async fn settled(&self, n: usize) -> Vec<&'static str> {
        let log = self.log.clone();
        eventually(&format!("{n} settlements"), async || {
            let log = lock(&log).clone();
            (log.len() >= n).then_some(log)
        })
        .await
    }

    async fn cleanup(self) {
        self.queue.delete_all().await.expect("delete queues");
        self.queue.close().await.expect("close");
        cleanup(&self.store).await;
    }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), ServeError>>,
    ops: SocketAddr,
}

impl Running {
    async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the finalizer stops in time")
            .expect("no panic")
            .expect("serve returns Ok");
    }

    /// `GET path` on the ops port: the status code.
    async fn get(&self, path: &str) -> u16 {
        let mut stream = TcpStream::connect(self.ops).await.expect("connect ops");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
    }
}

/// A batch of two done chunks (two successes, one failure) with its parts written and live
/// counts recorded.
async fn finished_batch(h: &Harness, status: BatchStatus) -> (BatchRecord, Vec<PlannedChunk>) {
    let b = batch(status);
    let id = &b.id;
    put_part(
        h.store.as_ref(),
        id,
        0,
        &[ok_line(id, 1, 7, 3), http_error_line(id, 2, 400)],
    )
    .await;
    put_part(h.store.as_ref(), id, 1, &[ok_line(id, 3, 11, 13)]).await;
    h.state
        .record(
            id.as_str(),
            &[
                LineOutcome::succeeded(1, Usage::default()),
                LineOutcome::failed(2),
            ],
        )
        .await
        .expect("record");
    (b, done_chunks(&[2, 1]))
}

async fn parts_left(h: &Harness, b: &BatchRecord) -> usize {
    h.store
        .list(&parts_prefix(&b.id))
        .await
        .expect("list parts")
        .len()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_batch_is_assembled_committed_cleaned_up_and_acked() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    h.scheduler().plan = Some(plan_for(&b, &chunks, "completed"));
    let running = h.start(h.config()).await;
    assert_eq!(running.get("/livez").await, 200);

    h.publish_job(&b).await;
    assert_eq!(h.settled(1).await, ["ack"]);

    let commit = {
        let s = h.scheduler();
        assert_eq!(s.commits.len(), 1);
        s.commits[0].clone()
    };
    let output = commit.output_file.expect("an output file");
    let error = commit.error_file.expect("an error file");
    assert_eq!(output.id, ResultFile::Output.file_id(&b.id).to_string());
    assert_eq!(error.id, ResultFile::Error.file_id(&b.id).to_string());
    for file in [&output, &error] {
        let key =
            FileRecord::storage_key_for(&nightshift_core::FileId::parse(&file.id).expect("id"));
        let stored = read(h.store.as_ref(), &key).await.expect("file stored");
        assert_eq!(stored.len() as u64, file.bytes);
    }
    assert_eq!(
        (commit.batch_id.as_str(), commit.completed, commit.failed),
        (b.id.as_str(), 2, 1)
    );
    assert_eq!(
        commit.usage,
        Some(v1::Usage::from(&usage_of(&[(7, 3), (11, 13)])))
    );

    assert_eq!(parts_left(&h, &b).await, 0, "parts are deleted");
    assert_eq!(
        h.state.counts(b.id.as_str()).await.expect("counts"),
        LiveCounts::default(),
        "live state is cleared"
    );
    assert_eq!(running.get("/readyz").await, 200);
    running.shutdown().await;
    assert_eq!(*lock(&h.log), ["ack"]);
    h.cleanup().await;
}

#[tokio::test]
async fn a_job_for_an_already_terminal_batch_is_cleaned_up_and_acked_without_a_commit() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Completed).await;
    // A terminal batch has no ending left to apply.
    h.scheduler().plan = Some(plan_for(&b, &chunks, ""));
    let running = h.start(h.config()).await;

    h.publish_job(&b).await;
    assert_eq!(h.settled(1).await, ["ack"]);
    {
        let s = h.scheduler();
        assert_eq!(s.plan_calls, 1);
        assert!(s.commits.is_empty(), "no commit for a terminal batch");
    }
    assert_eq!(parts_left(&h, &b).await, 0, "leftover parts are deleted");
    assert_eq!(
        h.state.counts(b.id.as_str()).await.expect("counts"),
        LiveCounts::default()
    );
    running.shutdown().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_commit_refused_on_its_own_requeues_the_job_and_its_next_delivery_commits_the_same() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    {
        let mut s = h.scheduler();
        s.plan = Some(plan_for(&b, &chunks, "completed"));
        s.fail_commits = 1;
        s.fail_commits_with = Some(tonic::Code::Internal);
    }
    let running = h.start(h.config()).await;

    h.publish_job(&b).await;
    assert_eq!(h.settled(2).await, ["requeue", "ack"]);
    {
        let s = h.scheduler();
        assert_eq!(s.commits.len(), 2);
        assert_eq!(
            s.commits[0], s.commits[1],
            "a re-run commits exactly the same"
        );
        assert_eq!(s.lease_holder, None, "each run released the lease");
    }
    assert_eq!(parts_left(&h, &b).await, 0);
    running.shutdown().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_scheduler_outage_holds_the_job_without_counting_it_and_it_then_commits() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    {
        let mut s = h.scheduler();
        s.plan = Some(plan_for(&b, &chunks, "completed"));
        // The commit meets a restarting scheduler twice; before that, the lease call meets
        // one that does not offer leases yet.
        s.fail_commits = 2;
        s.fail_commits_with = Some(tonic::Code::Unavailable);
        s.unimplemented_leases = 1;
    }
    let running = h.start(h.config()).await;

    h.publish_job(&b).await;
    // One delivery, held through the outages: never requeued, never counted.
    assert_eq!(h.settled(1).await, ["ack"]);
    {
        let s = h.scheduler();
        assert_eq!(s.commits.len(), 3);
        assert!(s.commits.iter().all(|c| *c == s.commits[0]));
        assert_eq!(s.lease_holder, None);
    }
    assert_eq!(parts_left(&h, &b).await, 0);
    running.shutdown().await;
    assert_eq!(*lock(&h.log), ["ack"]);
    h.cleanup().await;
}

#[tokio::test]
async fn a_cancelled_batch_commits_the_lines_without_a_result_as_errors() {
    let h = Harness::new().await;
    let (input, spans) = input(&["req-1", "req-2", "req-3", "req-4", "req-5"], &[1, 2, 2]);
    h.store
        .put("files/file-input", Bytes::from(input))
        .await
        .expect("put input");
    let b = batch(BatchStatus::Cancelling);
    // Chunk 0 done; chunk 1 ran in part (line 3 has its result); chunk 2 was given up.
    put_part(h.store.as_ref(), &b.id, 0, &[ok_line(&b.id, 1, 2, 2)]).await;
    put_part(h.store.as_ref(), &b.id, 1, &[ok_line(&b.id, 3, 1, 1)]).await;
    let chunks = vec![
        PlannedChunk::done(spans[0]),
        PlannedChunk::unfinished(spans[1]),
        PlannedChunk::failed(spans[2], "no executor could run it"),
    ];
    h.scheduler().plan = Some(plan_for(&b, &chunks, "cancelled"));
    let running = h.start(h.config()).await;

    h.publish_job(&b).await;
    assert_eq!(h.settled(1).await, ["ack"]);
    let commit = h.scheduler().commits[0].clone();
    assert_eq!((commit.completed, commit.failed), (2, 3));
    let error = commit.error_file.expect("error file");
    let key = FileRecord::storage_key_for(&ResultFile::Error.file_id(&b.id));
    let stored = read(h.store.as_ref(), &key)
        .await
        .expect("error file stored");
    let codes: Vec<String> = stored
        .split_inclusive(|&c| c == b'\n')
        .map(|line| {
            let v: serde_json::Value = serde_json::from_slice(line).expect("json");
            format!(
                "{} {}: {}",
                v["custom_id"].as_str().unwrap_or("?"),
                v["error"]["code"].as_str().unwrap_or("?"),
                v["error"]["message"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let cancelled = NoResponseCode::BatchCancelled.default_message();
    assert_eq!(
        codes,
        [
            format!("req-2 batch_cancelled: {cancelled}"),
            "req-4 chunk_failed: no executor could run it".to_owned(),
            "req-5 chunk_failed: no executor could run it".to_owned(),
        ]
    );
    assert_eq!(stored.len() as u64, error.bytes);
    running.shutdown().await;
    h.cleanup().await;
}

#[tokio::test]
async fn undecodable_jobs_and_unknown_batches_are_dead_lettered() {
    let h = Harness::new().await;
    let running = h.start(h.config()).await;

    // Truncated protobuf; a schema version this finalizer does not read; a malformed batch
    // id; a batch the scheduler does not know.
    h.publish(vec![0x12, 0xff]).await;
    h.publish(
        FinalizeJob {
            schema_version: 2,
            batch_id: "batch_abc".into(),
        }
        .encode_to_vec(),
    )
    .await;
    h.publish(
        FinalizeJob {
            schema_version: 1,
            batch_id: "not a batch id".into(),
        }
        .encode_to_vec(),
    )
    .await;
    h.publish_job(&batch(BatchStatus::Finalizing)).await;

    assert_eq!(h.settled(4).await, ["dead_letter"; 4]);
    assert!(h.scheduler().commits.is_empty());
    let queue = h.queue.clone();
    eventually("4 dead-lettered jobs", async || {
        (queue.dead_lettered(QueueKind::FinalizeJobs).await.ok()? == 4).then_some(())
    })
    .await;
    running.shutdown().await;
    h.cleanup().await;
}

#[tokio::test]
async fn shutdown_publishes_again_a_job_still_in_hand_after_the_grace_period() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    {
        let mut s = h.scheduler();
        s.plan = Some(plan_for(&b, &chunks, "completed"));
        s.hang_plan = true;
    }
    let running = h
        .start(FinalizerConfig {
            shutdown_grace: Duration::from_millis(200),
            ..h.config()
        })
        .await;

    h.publish_job(&b).await;
    let scheduler = h.scheduler.clone();
    eventually("the job in hand", async || {
        (lock(&scheduler.0).plan_calls == 1).then_some(())
    })
    .await;
    running.shutdown().await;

    // Published again as a fresh copy, then acked.
    assert_eq!(*lock(&h.log), ["ack"]);
    assert!(h.scheduler().commits.is_empty());
    assert_eq!(parts_left(&h, &b).await, 2, "nothing is cleaned up");
    let queue = h.queue.clone();
    eventually("the job back in its queue", async || {
        (queue.depth(QueueKind::FinalizeJobs).await.ok()? == 1).then_some(())
    })
    .await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_second_finalizer_is_refused_the_lease_and_leaves_the_batch_alone() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    let gate = Arc::new(Notify::new());
    {
        let mut s = h.scheduler();
        s.plan = Some(plan_for(&b, &chunks, "completed"));
        s.commit_gate = Some(gate.clone());
    }
    // One job at a time each, so that the second job goes to the second finalizer.
    let config = FinalizerConfig {
        prefetch: 1,
        ..h.config()
    };
    let first = h.start(config.clone()).await;
    h.publish_job(&b).await;
    let scheduler = h.scheduler.clone();
    eventually("the first finalizer committing", async || {
        (lock(&scheduler.0).commits.len() == 1).then_some(())
    })
    .await;
    let owner = h.scheduler().holders();
    assert_eq!(owner.len(), 1);

    // The same job again (the scheduler re-published it, or the broker redelivered it).
    let second = h.start(config).await;
    h.publish_job(&b).await;
    assert_eq!(h.settled(1).await, ["ack"], "the duplicate is dropped");
    {
        let s = h.scheduler();
        assert_eq!(s.plan_calls, 2);
        assert_eq!(s.refused().len(), 1);
        assert_ne!(s.refused()[0], owner[0], "a finalizer of its own");
        assert_eq!(s.commits.len(), 1, "the second finalizer commits nothing");
        assert_eq!(s.lease_holder.as_ref(), Some(&owner[0]));
    }
    assert_eq!(parts_left(&h, &b).await, 2, "nor does it clean anything up");

    // The first one goes on (renewing its lease meanwhile), commits, and releases the lease.
    gate.notify_one();
    assert_eq!(h.settled(2).await, ["ack", "ack"]);
    {
        let s = h.scheduler();
        assert_eq!(s.commits.len(), 1);
        assert_eq!(s.lease_holder, None, "released after the commit");
        assert_eq!(s.holders(), owner, "nobody else ever held it");
        let last = s.leases.last().expect("a release");
        assert!(last.0.release && last.0.holder == owner[0]);
    }
    assert_eq!(parts_left(&h, &b).await, 0);
    first.shutdown().await;
    second.shutdown().await;
    h.cleanup().await;
}

#[tokio::test]
async fn a_finalizer_whose_lease_is_taken_over_stops_and_drops_its_job() {
    let h = Harness::new().await;
    let (b, chunks) = finished_batch(&h, BatchStatus::Finalizing).await;
    let gate = Arc::new(Notify::new());
    {
        let mut s = h.scheduler();
        s.plan = Some(plan_for(&b, &chunks, "completed"));
        s.commit_gate = Some(gate.clone());
    }
    let running = h.start(h.config()).await;
    h.publish_job(&b).await;
    let scheduler = h.scheduler.clone();
    eventually("the finalizer committing", async || {
        (lock(&scheduler.0).commits.len() == 1).then_some(())
    })
    .await;

    // Its lease lapsed and another finalizer took it: its next renewal is refused.
    h.scheduler().lease_holder = Some("finalizer-other".into());
    assert_eq!(
        h.settled(1).await,
        ["ack"],
        "the job is dropped as a duplicate"
    );
    {
        let s = h.scheduler();
        let (request, granted) = s.leases.last().expect("a renewal").clone();
        assert!(!granted && !request.release, "refused, and not released");
        assert_eq!(s.lease_holder.as_deref(), Some("finalizer-other"));
    }
    assert_eq!(
        parts_left(&h, &b).await,
        2,
        "the new holder cleans up, not this one"
    );
    gate.notify_one();
    running.shutdown().await;
    h.cleanup().await;
}
