//! The pipeline's reliability rules over the embedded adapters (SQLite metadata, the embedded
//! queue, in-memory live state, a local object store): leases and re-drives, chunk reports,
//! bounded endings, cancel flags, recovery, validation retries. Sweeps take `now` explicitly,
//! so leases and graces expire without waiting for the clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::{BatchId, FileId, TenantId, apikey};
use nightshift_metadata::{
    CancelOutcome, Ending, MetadataStore, Quotas, SqliteConfig, SqliteStore, ValidationOutcome,
};
use nightshift_proto::v1::{self, ChunkReport, ChunkResult, ChunkTask};
use nightshift_queue::{EmbeddedQueue, EmbeddedQueueConfig, QueueKind, WorkQueue};
use nightshift_state::MemoryState;
use nightshift_storage::{
    ByteRange, LocalStore, ObjectBody, ObjectMeta, ObjectStore, ObjectUpload,
};
use prost::Message;
use prost::bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::results::handle;
use super::{Dispatcher, PipelineSettings, recover, sweep_once};
use crate::batches::{BatchSettings, Validator, validate_input};
use crate::{SchedulerError, SchedulerPorts};

struct Fixture {
    _dir: tempfile::TempDir,
    ports: SchedulerPorts,
    storage: Arc<LocalStore>,
    tenant: TenantId,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let metadata = SqliteStore::open(&SqliteConfig {
        path: dir.path().join("metadata.sqlite"),
        ..SqliteConfig::default()
    })
    .await
    .expect("metadata");
    let queue = EmbeddedQueue::open(&EmbeddedQueueConfig {
        path: dir.path().join("queue.sqlite"),
        ..EmbeddedQueueConfig::default()
    })
    .await
    .expect("queue");
    let storage = Arc::new(
        LocalStore::open(dir.path().join("objects"))
            .await
            .expect("storage"),
    );
    let tenant = metadata
        .create_tenant("t", &apikey::digest(&apikey::generate()))
        .await
        .expect("tenant")
        .id;
    Fixture {
        ports: SchedulerPorts {
            metadata: Arc::new(metadata),
            storage: storage.clone(),
            queue: Arc::new(queue),
            state: Arc::new(MemoryState::new()),
        },
        storage,
        tenant,
        _dir: dir,
    }
}

fn settings() -> PipelineSettings {
    PipelineSettings {
        chunk_lease: Duration::from_secs(10),
        max_chunk_attempts: 2,
        ending_grace: Duration::from_secs(5),
        // no executor reports chunks running here: without this, every round would stop at
        // the lookahead (tested on its own below)
        max_queued_chunks_per_model: 0,
        ..PipelineSettings::default()
    }
}

fn record(tenant: &TenantId, input: &FileId, expires_at: i64) -> BatchRecord {
    BatchRecord {
        id: BatchId::generate(),
        tenant_id: tenant.clone(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: input.to_string(),
        completion_window: "24h".into(),
        status: BatchStatus::Validating,
        model: None,
        errors: vec![],
        metadata: None,
        output_expires_after_secs: 3600,
        output_file_id: None,
        error_file_id: None,
        created_at_us: now_unix_micros(),
        in_progress_at: None,
        expires_at,
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: Default::default(),
        traceparent: None,
    }
}

/// An `in_progress` batch of `n` one-line chunks whose deadline is `expires_at`.
async fn running_until(fx: &Fixture, n: u32, expires_at: i64) -> BatchRecord {
    running_on(fx, &fx.tenant, "m", n, expires_at).await
}

/// An `in_progress` batch of `tenant` for `model` of `n` one-line chunks whose deadline is
/// `expires_at`.
async fn running_on(
    fx: &Fixture,
    tenant: &TenantId,
    model: &str,
    n: u32,
    expires_at: i64,
) -> BatchRecord {
    let b = record(tenant, &FileId::generate(), expires_at);
    fx.ports.metadata.insert_batch(&b).await.expect("insert");
    let chunks = (0..n)
        .map(|i| ChunkSpan {
            index: i,
            byte_start: u64::from(i) * 10,
            byte_end: u64::from(i) * 10 + 10,
            first_line: u64::from(i) + 1,
            line_count: 1,
        })
        .collect();
    let ready = ValidationOutcome::Ready {
        model: model.into(),
        total: u64::from(n),
        chunks,
    };
    fx.ports
        .metadata
        .finish_validation(&b.id, &ready, now_unix(), &Quotas::UNLIMITED)
        .await
        .expect("finish")
        .expect("moved")
}

async fn running(fx: &Fixture, n: u32) -> BatchRecord {
    running_until(fx, n, now_unix() + 3600).await
}

/// Takes the next chunk task off the queue (acked: whatever it asked is now lost).
async fn take_task(queue: &dyn WorkQueue) -> ChunkTask {
    let mut consumer = queue
        .consume(QueueKind::ChunkTasks, 1)
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a chunk task within 10 s")
        .expect("consumer open")
        .expect("delivery");
    let task = ChunkTask::decode(delivery.payload.as_ref()).expect("a chunk task");
    delivery.ack().await.expect("ack");
    task
}

fn report(batch: &BatchId, chunk: u32, report: ChunkReport, error: &str) -> ChunkResult {
    ChunkResult {
        schema_version: 1,
        batch_id: batch.to_string(),
        chunk_index: chunk,
        report: report as i32,
        error: error.into(),
        ..ChunkResult::default()
    }
}

async fn status(fx: &Fixture, id: &BatchId) -> BatchStatus {
    fx.ports
        .metadata
        .batch(id)
        .await
        .expect("get")
        .expect("exists")
        .status
}

#[tokio::test]
async fn a_lost_task_is_published_again_and_a_silent_chunk_is_given_up() {
    let fx = fixture().await;
    let settings = settings();
    let b = running(&fx, 1).await;
    let t0 = now_unix();
    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(dispatcher.round().await.expect("round"), 1);
    let task = take_task(fx.ports.queue.as_ref()).await;
    assert_eq!((task.chunk_index, task.attempt), (0, 1));
    // The task is gone (taken and acked: as if dead-lettered) and nobody reports the chunk.
    let early = sweep_once(&fx.ports, &settings, t0 + 5).await;
    assert_eq!(early.redriven, 0, "the lease is still live");
    // Its lease expires: nothing waits in the queue, so the task was lost: published again,
    // the attempt not counted.
    let lost = sweep_once(&fx.ports, &settings, t0 + 11).await;
    assert_eq!(lost.redriven, 1);
    let task = take_task(fx.ports.queue.as_ref()).await;
    assert_eq!((task.chunk_index, task.attempt), (0, 1));
    // An executor starts it, then falls silent: re-driven as attempt 2.
    handle(
        &fx.ports,
        &settings,
        &report(&b.id, 0, ChunkReport::Running, ""),
    )
    .await
    .expect("running");
    let silent = sweep_once(&fx.ports, &settings, t0 + 30).await;
    assert_eq!(silent.redriven, 1);
    let task = take_task(fx.ports.queue.as_ref()).await;
    assert_eq!(task.attempt, 2);
    // Attempt 2 falls silent too: max_chunk_attempts reached, the chunk is given up and the
    // batch, with nothing left to run, is finalized.
    handle(
        &fx.ports,
        &settings,
        &report(&b.id, 0, ChunkReport::Running, ""),
    )
    .await
    .expect("running");
    let given_up = sweep_once(&fx.ports, &settings, t0 + 60).await;
    assert_eq!((given_up.given_up, given_up.redriven), (1, 0));
    assert!(given_up.freed_slots);
    let states = fx.ports.metadata.chunk_states(&b.id).await.expect("states");
    assert_eq!(
        states[0].failure.as_deref(),
        Some("the chunk was given up after 2 attempts (its executors stopped reporting)")
    );
    assert_eq!(status(&fx, &b.id).await, BatchStatus::Finalizing);
    assert_eq!(
        fx.ports.metadata.ending(&b.id).await.expect("ending"),
        Some(Ending::Completed)
    );
    assert_eq!(
        fx.ports
            .queue
            .depth(QueueKind::FinalizeJobs)
            .await
            .expect("depth"),
        1
    );
    // a late heartbeat changes nothing
    handle(
        &fx.ports,
        &settings,
        &report(&b.id, 0, ChunkReport::Running, ""),
    )
    .await
    .expect("late heartbeat");
    assert!(
        fx.ports
            .metadata
            .dispatched_chunks(&b.id)
            .await
            .expect("dispatched")
            .is_empty()
    );
}

#[tokio::test]
async fn a_task_waiting_in_the_queue_only_gets_its_lease_extended() {
    let fx = fixture().await;
    let settings = settings();
    let b = running(&fx, 2).await;
    let t0 = now_unix();
    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(dispatcher.round().await.expect("round"), 2);
    // both tasks wait in the queue (executors busy or down): no re-drive, however long
    for later in [11, 30, 300] {
        let sweep = sweep_once(&fx.ports, &settings, t0 + later).await;
        assert_eq!((sweep.redriven, sweep.given_up), (0, 0));
    }
    assert_eq!(
        fx.ports
            .queue
            .depth(QueueKind::ChunkTasks)
            .await
            .expect("depth"),
        2
    );
    assert_eq!(status(&fx, &b.id).await, BatchStatus::InProgress);
}

#[tokio::test]
async fn reports_renew_fail_and_complete_chunks() {
    let fx = fixture().await;
    let settings = settings();
    let b = running(&fx, 3).await;

    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(dispatcher.round().await.expect("round"), 3);
    for chunk in 0..3 {
        handle(
            &fx.ports,
            &settings,
            &report(&b.id, chunk, ChunkReport::Running, ""),
        )
        .await
        .expect("running");
    }
    handle(
        &fx.ports,
        &settings,
        &report(
            &b.id,
            1,
            ChunkReport::Failed,
            "the input does not match the task",
        ),
    )
    .await
    .expect("failed");
    handle(
        &fx.ports,
        &settings,
        &report(&b.id, 0, ChunkReport::Done, ""),
    )
    .await
    .expect("done");
    assert_eq!(status(&fx, &b.id).await, BatchStatus::InProgress);
    // the run that wrote chunk 2's part says what it holds
    let written = ChunkResult {
        completed: 4,
        failed: 1,
        usage: Some(v1::Usage {
            input_tokens: 9,
            total_tokens: 9,
            ..v1::Usage::default()
        }),
        part_crc32: Some(0xdead_beef),
        part_bytes: 2048,
        ..report(&b.id, 2, ChunkReport::Done, "")
    };
    handle(&fx.ports, &settings, &written).await.expect("done");
    // redelivered, or another run's report: nothing changes
    handle(
        &fx.ports,
        &settings,
        &report(&b.id, 2, ChunkReport::Done, ""),
    )
    .await
    .expect("done again");
    assert_eq!(status(&fx, &b.id).await, BatchStatus::Finalizing);
    let states = fx.ports.metadata.chunk_states(&b.id).await.expect("states");
    assert_eq!(
        states
            .iter()
            .map(|c| (c.done, c.failure.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            (true, None),
            (false, Some("the input does not match the task")),
            (true, None)
        ]
    );
    assert_eq!(
        states.iter().map(|c| c.part).collect::<Vec<_>>(),
        vec![None, None, written.part_tally()]
    );
    assert_eq!(
        written.part_tally().map(|t| (t.bytes, t.crc32, t.lines())),
        Some((2048, 0xdead_beef, 5))
    );
    // bad messages are told apart from outages
    let mut bad = report(&b.id, 0, ChunkReport::Done, "");
    bad.batch_id = "not-a-batch".into();
    assert!(matches!(
        handle(&fx.ports, &settings, &bad).await,
        Err(e @ SchedulerError::Malformed(_)) if e.outage().is_none()
    ));
    let mut unknown = report(&b.id, 0, ChunkReport::Done, "");
    unknown.report = 42;
    assert!(matches!(
        handle(&fx.ports, &settings, &unknown).await,
        Err(e @ SchedulerError::Malformed(_)) if e.outage().is_none()
    ));
}

#[tokio::test]
async fn a_cancelled_batch_ends_within_the_grace_and_keeps_its_flag() {
    let fx = fixture().await;
    let settings = settings();
    let b = running(&fx, 2).await;
    // chunk 0 is held by an executor that hangs (a live lease it never gives back)
    let now = now_unix();
    fx.ports
        .metadata
        .claim_next_chunk(&b.id, now, 3600)
        .await
        .expect("claim")
        .expect("a chunk");
    let cancelled = fx
        .ports
        .metadata
        .cancel_batch(&fx.tenant, &b.id, now)
        .await
        .expect("cancel");
    assert!(matches!(cancelled, Some(CancelOutcome::Cancelling(_))));
    let id = b.id.as_str();
    // The flag was never raised (the scheduler died after the commit): the sweep raises it,
    // and again after the live state lost it.
    assert!(!fx.ports.state.is_cancelled(id).await.expect("flag"));
    let sweep = sweep_once(&fx.ports, &settings, now).await;
    assert_eq!(
        sweep.finalizing, 0,
        "the hung chunk holds it within the grace"
    );
    assert!(fx.ports.state.is_cancelled(id).await.expect("flag"));
    fx.ports.state.clear(id).await.expect("lose the flag");
    sweep_once(&fx.ports, &settings, now + 1).await;
    assert!(fx.ports.state.is_cancelled(id).await.expect("flag"));
    assert_eq!(status(&fx, &b.id).await, BatchStatus::Cancelling);
    // the grace is over: it is finalized whatever the hung chunk does
    let sweep = sweep_once(&fx.ports, &settings, now + 5).await;
    assert_eq!(sweep.finalizing, 1);
    assert_eq!(
        fx.ports.metadata.ending(&b.id).await.expect("ending"),
        Some(Ending::Cancelled)
    );
    assert_eq!(
        fx.ports
            .queue
            .depth(QueueKind::FinalizeJobs)
            .await
            .expect("depth"),
        1
    );
}

#[tokio::test]
async fn an_expiring_batch_with_a_stuck_chunk_ends_after_the_grace() {
    let fx = fixture().await;
    let settings = settings();
    let deadline = now_unix() + 100;
    let b = running_until(&fx, 2, deadline).await;
    fx.ports
        .metadata
        .claim_next_chunk(&b.id, now_unix(), 3600)
        .await
        .expect("claim")
        .expect("a chunk");
    let at_deadline = sweep_once(&fx.ports, &settings, deadline).await;
    assert_eq!((at_deadline.expired, at_deadline.finalizing), (1, 0));
    let after_grace = sweep_once(&fx.ports, &settings, deadline + 5).await;
    assert_eq!(after_grace.finalizing, 1);
    assert_eq!(status(&fx, &b.id).await, BatchStatus::Finalizing);
    assert_eq!(
        fx.ports.metadata.ending(&b.id).await.expect("ending"),
        Some(Ending::Expired)
    );
}

#[tokio::test]
async fn a_stalled_finalization_is_published_again_only_without_a_lease() {
    let fx = fixture().await;
    let settings = settings(); // finalize_retry_after: 60 s
    let b = running(&fx, 1).await;
    let now = now_unix();
    fx.ports
        .metadata
        .cancel_batch(&fx.tenant, &b.id, now)
        .await
        .expect("cancel");
    assert_eq!(sweep_once(&fx.ports, &settings, now).await.finalizing, 1);
    // a finalizer holds the lease and renews it: never duplicated
    let lease = fx
        .ports
        .metadata
        .lease_finalization(&b.id, "finalizer-1", now + 100, 60)
        .await
        .expect("lease");
    assert!(lease.granted);
    assert_eq!(
        sweep_once(&fx.ports, &settings, now + 120)
            .await
            .republished,
        0
    );
    // it died: once the lease expired, the job is published again
    assert_eq!(
        sweep_once(&fx.ports, &settings, now + 161)
            .await
            .republished,
        1
    );
}

/// Another tenant in the fixture's store.
async fn other_tenant(fx: &Fixture) -> TenantId {
    fx.ports
        .metadata
        .create_tenant("other", &apikey::digest(&apikey::generate()))
        .await
        .expect("tenant")
        .id
}

/// How many of the batch's chunks are handed out and not done.
async fn in_flight(fx: &Fixture, id: &BatchId) -> usize {
    fx.ports
        .metadata
        .dispatched_chunks(id)
        .await
        .expect("dispatched")
        .len()
}

/// Marks every handed-out chunk of the batch done (their executors finished them).
async fn finish_in_flight(fx: &Fixture, id: &BatchId) {
    for leased in fx
        .ports
        .metadata
        .dispatched_chunks(id)
        .await
        .expect("dispatched")
    {
        fx.ports
            .metadata
            .complete_chunk(id, leased.span.index, None)
            .await
            .expect("complete");
    }
}

#[tokio::test]
async fn dispatch_fairness_survives_a_scheduler_restart() {
    let fx = fixture().await;
    let settings = PipelineSettings {
        max_in_flight_chunks_per_model: 3,
        ..settings()
    };
    let later = other_tenant(&fx).await;
    let now = now_unix();
    // two tenants with work on one model; the first one's batch is due earlier, so it wins
    // every tie
    let first = running_until(&fx, 10, now + 3600).await;
    let second = running_on(&fx, &later, "m", 10, now + 7200).await;
    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(dispatcher.round().await.expect("round"), 3);
    // first, second, first: the second tenant is one line behind
    assert_eq!(in_flight(&fx, &first.id).await, 2);
    assert_eq!(in_flight(&fx, &second.id).await, 1);

    // the scheduler stops; one of the first tenant's chunks finishes meanwhile
    drop(dispatcher);
    let done = fx
        .ports
        .metadata
        .dispatched_chunks(&first.id)
        .await
        .expect("dispatched")[0]
        .span
        .index;
    fx.ports
        .metadata
        .complete_chunk(&first.id, done, None)
        .await
        .expect("complete");

    // a new scheduler over the same store gives the free slot to the tenant that was behind
    // (one that forgot would start both even and give it to the earlier deadline)
    let mut restarted = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(restarted.round().await.expect("round"), 1);
    assert_eq!(in_flight(&fx, &first.id).await, 1);
    assert_eq!(in_flight(&fx, &second.id).await, 2);
}

#[tokio::test]
async fn dispatch_fairness_is_per_model() {
    let fx = fixture().await;
    let settings = PipelineSettings {
        max_in_flight_chunks_per_model: 2,
        ..settings()
    };
    let light = other_tenant(&fx).await;
    let now = now_unix();
    // the heavy tenant runs model "a" alone, the light one model "b" alone, until the heavy
    // one has been served three times as many lines
    let heavy_a = running_on(&fx, &fx.tenant, "a", 20, now + 3600).await;
    let light_b = running_on(&fx, &light, "b", 20, now + 7200).await;
    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    assert_eq!(dispatcher.round().await.expect("round"), 4);
    for _ in 0..2 {
        finish_in_flight(&fx, &heavy_a.id).await;
        assert_eq!(dispatcher.round().await.expect("round"), 2);
    }
    assert_eq!(in_flight(&fx, &heavy_a.id).await, 2);
    assert_eq!(in_flight(&fx, &light_b.id).await, 2);

    // now the heavy tenant sends work for model "b" too (due earlier), and both "b" slots
    // free up: its lines on model "a" do not count against it there, so the tenants share
    // them (counting across models, the light tenant would take both)
    let heavy_b = running_on(&fx, &fx.tenant, "b", 20, now + 3600).await;
    finish_in_flight(&fx, &light_b.id).await;
    assert_eq!(dispatcher.round().await.expect("round"), 2);
    assert_eq!(in_flight(&fx, &heavy_b.id).await, 1);
    assert_eq!(in_flight(&fx, &light_b.id).await, 1);
    // and model "a" was left alone: both its slots are still taken
    assert_eq!(in_flight(&fx, &heavy_a.id).await, 2);
}

#[tokio::test]
async fn recovery_picks_up_every_unfinished_batch() {
    let fx = fixture().await;
    let settings = settings();
    let now = now_unix();
    // running, both chunks dispatched (their tasks may never have been published)
    let a = running(&fx, 2).await;
    for _ in 0..2 {
        fx.ports
            .metadata
            .claim_next_chunk(&a.id, now, 1)
            .await
            .expect("claim")
            .expect("a chunk");
    }
    // cancelled, its flag lost with the live state
    let c = running(&fx, 1).await;
    fx.ports
        .metadata
        .cancel_batch(&fx.tenant, &c.id, now)
        .await
        .expect("cancel");
    // asked to finalize
    let f = running(&fx, 1).await;
    fx.ports
        .metadata
        .claim_next_chunk(&f.id, now, 10)
        .await
        .expect("claim")
        .expect("a chunk");
    assert!(
        fx.ports
            .metadata
            .complete_chunk(&f.id, 0, None)
            .await
            .expect("done")
    );
    assert!(
        fx.ports
            .metadata
            .request_finalize(&f.id, now, 5)
            .await
            .expect("ask")
            .is_some()
    );

    let recovery = recover(&fx.ports, &settings).await;
    assert_eq!(
        (
            recovery.chunks,
            recovery.cancel_flags,
            recovery.finalize_jobs,
            recovery.errors
        ),
        (2, 1, 1, 0)
    );
    assert!(
        fx.ports
            .state
            .is_cancelled(c.id.as_str())
            .await
            .expect("flag")
    );
    assert_eq!(
        fx.ports
            .queue
            .depth(QueueKind::ChunkTasks)
            .await
            .expect("depth"),
        2
    );
    // the re-published chunks got a whole lease to be reported on again
    let sweep = sweep_once(&fx.ports, &settings, now + 5).await;
    assert_eq!(sweep.redriven, 0);
}

const LINE: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}"#;

fn routing() -> RoutingConfig {
    RoutingConfig {
        upstreams: vec![UpstreamConfig::new("u", "http://127.0.0.1:9/v1", ["m"])],
    }
}

/// A batch input whose bytes cannot be read (a symlink loop: an I/O error that is not "not
/// found"), as object storage that is down.
async fn unreadable_input(fx: &Fixture) -> FileRecord {
    let id = FileId::generate();
    let file = FileRecord {
        storage_key: FileRecord::storage_key_for(&id),
        id,
        tenant_id: fx.tenant.clone(),
        bytes: LINE.len() as u64 + 1,
        created_at: now_unix(),
        created_at_us: now_unix_micros(),
        expires_at: None,
        filename: "input.jsonl".into(),
        purpose: Purpose::Batch,
    };
    fx.ports.metadata.insert_file(&file).await.expect("file");
    let path = fx.storage.root().join(&file.storage_key);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::os::unix::fs::symlink(&path, &path).expect("symlink loop");
    file
}

async fn repair(fx: &Fixture, file: &FileRecord) {
    // atomically (a rename over the symlink): a read never finds the input missing
    let path = fx.storage.root().join(&file.storage_key);
    let fixed = path.with_extension("fixed");
    std::fs::write(&fixed, format!("{LINE}\n")).expect("write");
    std::fs::rename(&fixed, &path).expect("rename");
}

/// Object storage that counts the reads that came back, so a test knows one happened.
#[derive(Debug)]
struct CountedReads {
    inner: Arc<LocalStore>,
    reads: AtomicUsize,
}

#[nightshift_queue::async_trait]
impl ObjectStore for CountedReads {
    async fn put(&self, key: &str, body: Bytes) -> nightshift_storage::Result<()> {
        self.inner.put(key, body).await
    }
    async fn upload(&self, key: &str) -> nightshift_storage::Result<Box<dyn ObjectUpload>> {
        self.inner.upload(key).await
    }
    async fn get(
        &self,
        key: &str,
        range: Option<ByteRange>,
    ) -> nightshift_storage::Result<ObjectBody> {
        let body = self.inner.get(key, range).await;
        self.reads.fetch_add(1, Ordering::SeqCst);
        body
    }
    async fn head(&self, key: &str) -> nightshift_storage::Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn delete(&self, key: &str) -> nightshift_storage::Result<()> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> nightshift_storage::Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }
    async fn delete_prefix(&self, prefix: &str) -> nightshift_storage::Result<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn ping(&self) -> nightshift_storage::Result<()> {
        self.inner.ping().await
    }
}

/// Polls `done` every 50 ms until it holds, for at most `secs`.
async fn eventually<F: Future<Output = bool>>(secs: u64, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unreadable_input_is_retried_not_failed_and_a_missing_one_fails() {
    let fx = fixture().await;
    let settings = BatchSettings::default();
    let file = unreadable_input(&fx).await;
    let b = record(&fx.tenant, &file.id, now_unix() + 3600);
    assert!(
        validate_input(&fx.ports, &settings, &routing(), &b)
            .await
            .is_err(),
        "an I/O error is an infrastructure fault"
    );
    repair(&fx, &file).await;
    let ok = validate_input(&fx.ports, &settings, &routing(), &b)
        .await
        .expect("readable");
    assert!(
        matches!(ok, ValidationOutcome::Ready { total: 1, .. }),
        "{ok:?}"
    );
    fx.ports
        .storage
        .delete(&file.storage_key)
        .await
        .expect("delete");
    let missing = validate_input(&fx.ports, &settings, &routing(), &b)
        .await
        .expect("a missing input is the input's problem");
    assert!(
        matches!(&missing, ValidationOutcome::Failed { errors } if errors[0].message.contains("does not exist")),
        "{missing:?}"
    );
}

#[tokio::test]
async fn validation_retries_until_the_input_can_be_read() {
    let fx = fixture().await;
    let file = unreadable_input(&fx).await;
    let b = record(&fx.tenant, &file.id, now_unix() + 3600);
    fx.ports.metadata.insert_batch(&b).await.expect("insert");
    let storage = Arc::new(CountedReads {
        inner: fx.storage.clone(),
        reads: AtomicUsize::new(0),
    });
    let validator = Validator::new(
        SchedulerPorts {
            storage: storage.clone(),
            ..fx.ports.clone()
        },
        BatchSettings::default(),
        routing(),
        Quotas::UNLIMITED,
        Arc::new(tokio::sync::Notify::new()),
        CancellationToken::new(),
    );
    validator.spawn(b.clone());
    // the outage lasts until the first attempt failed; a retry succeeds
    eventually(15, || async { storage.reads.load(Ordering::SeqCst) > 0 }).await;
    repair(&fx, &file).await;
    eventually(15, || async {
        status(&fx, &b.id).await == BatchStatus::InProgress
    })
    .await;
}

#[tokio::test]
async fn a_batch_that_cannot_be_validated_expires_at_its_deadline() {
    let fx = fixture().await;
    let file = unreadable_input(&fx).await;
    let b = record(&fx.tenant, &file.id, now_unix() + 2);
    fx.ports.metadata.insert_batch(&b).await.expect("insert");
    let validator = Validator::new(
        fx.ports.clone(),
        BatchSettings::default(),
        routing(),
        Quotas::UNLIMITED,
        Arc::new(tokio::sync::Notify::new()),
        CancellationToken::new(),
    );
    validator.spawn(b.clone());
    // it stays validating through its retries, and the deadline sweep expires it
    eventually(15, || async {
        sweep_once(&fx.ports, &settings(), now_unix()).await;
        status(&fx, &b.id).await != BatchStatus::Validating
    })
    .await;
    assert_eq!(status(&fx, &b.id).await, BatchStatus::Expired);
}

/// An input whose lines would take its tenant past `max_enqueued_requests` fails at
/// validation with `request_limit_exceeded` and no chunk is dispatched; under the limit, the
/// same input runs.
#[tokio::test]
async fn the_validator_fails_a_batch_over_the_enqueued_request_quota() {
    let fx = fixture().await;
    let file = unreadable_input(&fx).await;
    repair(&fx, &file).await; // one good line
    let validator = |max_enqueued_requests| {
        Validator::new(
            fx.ports.clone(),
            BatchSettings::default(),
            routing(),
            Quotas {
                max_enqueued_requests,
                ..Quotas::UNLIMITED
            },
            Arc::new(tokio::sync::Notify::new()),
            CancellationToken::new(),
        )
    };
    let running = running_until(&fx, 2, now_unix() + 3600).await; // holds 2 lines
    assert_eq!(running.status, BatchStatus::InProgress);
    let over = record(&fx.tenant, &file.id, now_unix() + 3600);
    fx.ports.metadata.insert_batch(&over).await.expect("insert");
    validator(2).spawn(over.clone());
    eventually(15, || async {
        status(&fx, &over.id).await == BatchStatus::Failed
    })
    .await;
    let failed = fx
        .ports
        .metadata
        .batch(&over.id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(failed.errors.len(), 1);
    assert_eq!(
        failed.errors[0].code,
        nightshift_metadata::REQUEST_LIMIT_EXCEEDED
    );
    assert!(
        fx.ports
            .metadata
            .chunks(&over.id)
            .await
            .expect("chunks")
            .is_empty()
    );
    let fits = record(&fx.tenant, &file.id, now_unix() + 3600);
    fx.ports.metadata.insert_batch(&fits).await.expect("insert");
    validator(3).spawn(fits.clone());
    eventually(15, || async {
        status(&fx, &fits.id).await == BatchStatus::InProgress
    })
    .await;
}

#[tokio::test]
async fn dispatch_looks_ahead_a_bounded_number_of_chunks() {
    let fx = fixture().await;
    let settings = PipelineSettings {
        max_in_flight_chunks_per_model: 8,
        max_queued_chunks_per_model: 2,
        ..settings()
    };
    let now = now_unix();
    let big = running_until(&fx, 20, now + 3600).await;
    let mut dispatcher = Dispatcher::new(fx.ports.clone(), settings.clone());
    // nothing started yet: two tasks wait in the queue, no more
    assert_eq!(dispatcher.round().await.expect("round"), 2);
    assert_eq!(dispatcher.round().await.expect("round"), 0);

    // an executor starts one: one more goes out
    let started = fx
        .ports
        .metadata
        .dispatched_chunks(&big.id)
        .await
        .expect("dispatched")[0]
        .span
        .index;
    assert!(
        fx.ports
            .metadata
            .renew_chunk_lease(&big.id, started, now_unix(), settings.chunk_lease_secs())
            .await
            .expect("running")
    );
    assert_eq!(dispatcher.round().await.expect("round"), 1);
    assert_eq!(in_flight(&fx, &big.id).await, 3);

    // another tenant's batch arrives while two tasks wait: the next start hands its first
    // chunk out, and it waits behind two tasks, not behind every chunk in flight
    let other = other_tenant(&fx).await;
    let small = running_on(&fx, &other, "m", 1, now + 7200).await;
    assert_eq!(dispatcher.round().await.expect("round"), 0);
    for chunk in fx
        .ports
        .metadata
        .dispatched_chunks(&big.id)
        .await
        .expect("dispatched")
    {
        fx.ports
            .metadata
            .renew_chunk_lease(
                &big.id,
                chunk.span.index,
                now_unix(),
                settings.chunk_lease_secs(),
            )
            .await
            .expect("running");
    }
    assert_eq!(dispatcher.round().await.expect("round"), 2);
    assert_eq!(in_flight(&fx, &small.id).await, 1);
    assert_eq!(in_flight(&fx, &big.id).await, 4);
}
