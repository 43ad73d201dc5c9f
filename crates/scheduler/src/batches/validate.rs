//! Validation: reads a batch's input once, as a stream, checks every line, finds the model,
//! and cuts the file into chunks — in memory bounded by configuration (the longest line, a
//! 16-byte hash per `custom_id`, and the chunk list), never by the file's size.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::{ChunkPlanner, ChunkSpan};
use nightshift_core::file::Purpose;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::routing::RoutingConfig;
use nightshift_core::time::now_unix;
use nightshift_core::validation::{BatchError, LineValidator, ModelRoute, ValidationLimits};
use nightshift_core::{FileId, TenantId};
use nightshift_metadata::{Quota, Quotas, REQUEST_LIMIT_EXCEEDED, ValidationOutcome};
use nightshift_storage::StorageError;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::BatchSettings;
use crate::{SchedulerError, SchedulerPorts, metrics};

/// Validates batches in the background, a bounded number at a time, shared fairly between
/// tenants ([`FairSlots`]).
#[derive(Clone)]
pub struct Validator {
    ports: SchedulerPorts,
    settings: Arc<BatchSettings>,
    routing: Arc<RoutingConfig>,
    slots: Arc<FairSlots>,
    /// The default quotas (`[scheduler.quotas]`): creates and validations check them.
    quotas: Quotas,
    /// Wakes the dispatcher when a batch becomes runnable.
    wake: Arc<tokio::sync::Notify>,
    /// Cancelled when the scheduler stops: validations waiting to retry give up.
    stop: CancellationToken,
}

/// Chunks of input read ahead of the line checker (each as large as object storage hands them).
const CHECK_QUEUE_CHUNKS: usize = 8;

/// The first wait before a validation that hit an infrastructure fault is retried.
pub const VALIDATION_RETRY_BASE: Duration = Duration::from_secs(1);

impl Validator {
    pub fn new(
        ports: SchedulerPorts,
        settings: BatchSettings,
        routing: RoutingConfig,
        quotas: Quotas,
        wake: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) -> Self {
        let slots = Arc::new(FairSlots::new(
            settings.validation_concurrency,
            settings.validation_concurrency_per_tenant,
        ));
        Self {
            ports,
            settings: Arc::new(settings),
            routing: Arc::new(routing),
            slots,
            quotas,
            wake,
            stop,
        }
    }

    /// The default quotas, which tenants' overrides replace.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Refuses, at create, a batch `endpoint` that is neither one of OpenAI's nor declared by
    /// an upstream of the routing table (`[[routing.upstreams]] endpoints`): a 400 naming
    /// `endpoint`. The gateway checked its shape already; only here is the table known.
    pub fn check_endpoint(&self, endpoint: &str) -> Result<(), SchedulerError> {
        if self.routing.accepts_endpoint(endpoint) {
            return Ok(());
        }
        Err(SchedulerError::InvalidValue {
            param: "endpoint",
            message: "This endpoint is not served: a batch may target one of OpenAI's batch \
                      endpoints, or an endpoint an upstream of this deployment declares.",
        })
    }

    /// Validates `batch` in a background task and records the outcome. An infrastructure
    /// fault (S3 or the metadata store unreachable) never fails the batch: the read, or the
    /// recording of the outcome, is retried after a backoff starting at
    /// [`VALIDATION_RETRY_BASE`] and doubling up to `validation_retry_max`, while the batch
    /// is still `validating` and before its deadline (past it, the expiry sweep ends it
    /// `expired`) and until the scheduler stops (a restart validates it again).
    ///
    /// Runs in a `validate` span of the batch's trace.
    pub fn spawn(&self, batch: BatchRecord) {
        let me = self.clone();
        let span = tracing::info_span!("validate", batch_id = %batch.id, input_file_id = %batch.input_file_id);
        nightshift_telemetry::propagation::set_parent(&span, crate::pipeline::batch_trace(&batch));
        tokio::spawn(async move { me.run(batch).await }.instrument(span));
    }

    async fn run(&self, batch: BatchRecord) {
        let mut backoff = VALIDATION_RETRY_BASE;
        let outcome = loop {
            let attempt = {
                // The slot is held while reading only, not while waiting to retry.
                let Some(_slot) = self.slots.acquire(&batch.tenant_id).await else {
                    return;
                };
                validate_input(&self.ports, &self.settings, &self.routing, &batch).await
            };
            match attempt {
                Ok(outcome) => break outcome,
                Err(e) => {
                    ::metrics::counter!(metrics::VALIDATION_RETRIES).increment(1);
                    tracing::warn!(batch_id = %batch.id, error = %e, retry_in = ?backoff, "could not read the input; the batch stays validating and is retried");
                    if !self.wait_to_retry(&batch, &mut backoff).await {
                        return;
                    }
                }
            }
        };
        loop {
            match self
                .ports
                .metadata
                .finish_validation(&batch.id, &outcome, now_unix(), &self.quotas)
                .await
            {
                Ok(Some(done)) => {
                    let status = done.status.as_str();
                    ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => status).increment(1);
                    match &outcome {
                        ValidationOutcome::Failed { errors } => {
                            for e in errors {
                                ::metrics::counter!(metrics::VALIDATION_ERRORS, "code" => e.code.clone()).increment(1);
                            }
                            tracing::info!(batch_id = %done.id, errors = errors.len(), "batch failed validation");
                        }
                        ValidationOutcome::Ready { total, .. }
                            if done.status == BatchStatus::Failed =>
                        {
                            ::metrics::counter!(metrics::VALIDATION_ERRORS, "code" => REQUEST_LIMIT_EXCEEDED).increment(1);
                            ::metrics::counter!(metrics::QUOTA_REFUSALS, "quota" => Quota::EnqueuedRequests.setting()).increment(1);
                            tracing::info!(batch_id = %done.id, tenant_id = %done.tenant_id, total, "batch failed: over the tenant's enqueued request quota");
                        }
                        ValidationOutcome::Ready {
                            total,
                            chunks,
                            model,
                        } => {
                            tracing::info!(batch_id = %done.id, total, chunks = chunks.len(), model = %model, "batch validated");
                            self.wake.notify_one();
                        }
                    }
                    return;
                }
                Ok(None) => {
                    tracing::info!(batch_id = %batch.id, "batch left validating meanwhile (cancelled or expired); outcome dropped");
                    return;
                }
                Err(e) => {
                    ::metrics::counter!(metrics::VALIDATION_RETRIES).increment(1);
                    tracing::warn!(batch_id = %batch.id, error = %e, retry_in = ?backoff, "could not record the validation outcome; retrying");
                    if !self.wait_to_retry(&batch, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Waits `backoff` (never past the batch's deadline), then doubles it up to the cap.
    /// `false` when retrying is pointless: the deadline has passed (the expiry sweep ends the
    /// batch), it is no longer `validating` (cancelled, expired), or the scheduler stops.
    async fn wait_to_retry(&self, batch: &BatchRecord, backoff: &mut Duration) -> bool {
        let left = batch.expires_at.saturating_sub(now_unix());
        if left <= 0 {
            tracing::warn!(batch_id = %batch.id, "validation gave up at the batch's deadline; it expires");
            return false;
        }
        let wait = (*backoff).min(Duration::from_secs(left.unsigned_abs()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = self.stop.cancelled() => return false,
        }
        *backoff = (*backoff * 2).min(
            self.settings
                .validation_retry_max
                .max(VALIDATION_RETRY_BASE),
        );
        match self.ports.metadata.batch(&batch.id).await {
            Ok(Some(b)) => b.status == BatchStatus::Validating,
            Ok(None) => false,
            // the store is down: try again (the next attempt finds out)
            Err(e) => {
                tracing::debug!(batch_id = %batch.id, error = %e, "cannot check the batch's status before retrying");
                true
            }
        }
    }

    /// Re-validates every batch left `validating` (after a restart).
    pub async fn recover(&self) -> Result<usize, nightshift_metadata::MetadataError> {
        let pending = self
            .ports
            .metadata
            .batches_with_status(&[BatchStatus::Validating])
            .await?;
        let n = pending.len();
        for b in pending {
            self.spawn(b);
        }
        Ok(n)
    }
}

fn input_error(message: String) -> ValidationOutcome {
    ValidationOutcome::Failed {
        errors: vec![BatchError {
            code: "invalid_request".into(),
            line: None,
            message,
            param: Some("input_file_id".into()),
        }],
    }
}

/// Validates a batch's input. `Err` only for infrastructure faults (the batch should be
/// retried); every problem with the input itself is a `Failed` outcome — a file whose bytes
/// are missing from object storage included.
pub async fn validate_input(
    ports: &SchedulerPorts,
    settings: &BatchSettings,
    routing: &RoutingConfig,
    batch: &BatchRecord,
) -> Result<ValidationOutcome, SchedulerError> {
    let Ok(file_id) = FileId::parse(&batch.input_file_id) else {
        return Ok(input_error(format!(
            "Input file {} does not exist.",
            batch.input_file_id
        )));
    };
    // The file as it was when the batch was created: deleting or expiring it since hides it
    // from the API, not from the batch.
    let file = ports
        .metadata
        .file_as_of(&batch.tenant_id, &file_id, batch.created_at())
        .await?;
    let Some(file) = file else {
        return Ok(input_error(format!(
            "Input file {} does not exist.",
            batch.input_file_id
        )));
    };
    if file.purpose != Purpose::Batch {
        return Ok(input_error(format!(
            "Input file {} has purpose '{}'; batch inputs must be uploaded with purpose 'batch'.",
            file.id, file.purpose
        )));
    }
    let limits = ValidationLimits {
        max_lines: settings.max_lines,
        max_errors: settings.max_errors,
        max_line_bytes: settings.max_line_bytes,
        max_file_bytes: settings.max_file_bytes,
    };
    let mut validator = LineValidator::new(&batch.endpoint, limits);
    let mut planner = ChunkPlanner::new(settings.chunk_max_lines, settings.chunk_max_bytes);
    let mut chunks = Vec::new();
    // A file over the size limit is not read at all: the report says file_too_large.
    if file.bytes <= settings.max_file_bytes {
        let body = match ports.storage.get(&file.storage_key, None).await {
            Ok(body) => body,
            Err(StorageError::NotFound(_)) => {
                return Ok(input_error(format!(
                    "Input file {} does not exist.",
                    batch.input_file_id
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // Checking lines is CPU work (the bytes come faster than they are checked): it runs on
        // a thread of the blocking pool, fed through a short queue, never on the runtime's
        // threads, which must keep answering the API (creating a batch, listing them) while
        // huge inputs are checked. One such thread per validation slot at most.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHECK_QUEUE_CHUNKS);
        let max_line_bytes = settings.max_line_bytes;
        let checker = tokio::task::spawn_blocking(move || {
            check_lines(
                rx,
                max_line_bytes,
                &mut validator,
                &mut planner,
                &mut chunks,
            );
            (validator, planner, chunks)
        });
        let mut stream = body.stream;
        while let Some(bytes) = stream.next().await {
            // A read error abandons the check (the checker stops at the end of its queue).
            let bytes = bytes?;
            if tx.send(bytes).await.is_err() {
                break;
            }
        }
        drop(tx);
        (validator, planner, chunks) = checker.await.map_err(|e| {
            SchedulerError::Storage(StorageError::Backend(format!("input check task: {e}")))
        })?;
    }
    if let Some(span) = planner.finish() {
        chunks.push(span);
    }
    let report = validator.finish_routed(file.bytes, |model| match routing.route(model) {
        None => ModelRoute::NotFound,
        Some(upstream) if !upstream.serves_endpoint(&batch.endpoint) => {
            ModelRoute::EndpointNotServed
        }
        Some(_) => ModelRoute::Served,
    });
    if !report.ok() {
        // The first `max_errors` errors, and one saying how many more: bounded, so a failed
        // batch (and a page of them) always fits a gRPC message.
        return Ok(ValidationOutcome::Failed {
            errors: report.listed_errors(),
        });
    }
    let Some(model) = report.model else {
        // ok() implies a model was found in a non-empty file; be safe anyway.
        return Ok(input_error("No model found in the input file.".into()));
    };
    Ok(ValidationOutcome::Ready {
        model,
        total: report.total_lines,
        chunks,
    })
}

/// Splits the bytes received on `rx` into lines and checks each (off the async runtime: it
/// blocks on `rx`), cutting chunks while the input still looks valid.
fn check_lines(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    max_line_bytes: usize,
    validator: &mut LineValidator,
    planner: &mut ChunkPlanner,
    chunks: &mut Vec<ChunkSpan>,
) {
    let mut splitter = JsonlSplitter::new(max_line_bytes);
    let mut check = |item: JsonlItem| {
        validator.push_item(&item);
        // Chunks are only kept while the input still looks valid; a failing batch needs
        // none, and this bounds their memory to valid inputs' (≤ max_lines).
        if let JsonlItem::Line(line) = &item
            && !validator.is_over_line_limit()
            && let Some(span) = planner.push(line)
        {
            chunks.push(span);
        }
    };
    while let Some(bytes) = rx.blocking_recv() {
        splitter.feed(bytes);
        while let Some(item) = splitter.next_item() {
            check(item);
        }
    }
    splitter.finish();
    while let Some(item) = splitter.next_item() {
        check(item);
    }
}

/// The validation slots, shared fairly between tenants: one FIFO queue per tenant, and each
/// slot that frees goes to the waiting tenant running the fewest validations (the longest
/// unserved first among equals), never past `per_tenant` at once. So a tenant with 50 huge
/// inputs queued delays another's one-line batch by at most one validation — by none while
/// `per_tenant` is below `total`, which keeps a slot for the others.
#[derive(Debug)]
pub(crate) struct FairSlots {
    state: Mutex<SlotState>,
    per_tenant: usize,
}

#[derive(Debug)]
struct SlotState {
    free: usize,
    running: HashMap<TenantId, usize>,
    /// Waiters per tenant, in arrival order.
    waiting: HashMap<TenantId, VecDeque<oneshot::Sender<SlotPermit>>>,
    /// Tenants with waiters, least recently served first.
    order: VecDeque<TenantId>,
}

/// One validation slot; dropping it hands the slot to the next tenant in line.
#[derive(Debug)]
pub(crate) struct SlotPermit {
    /// `None` once disarmed (a grant that could not be delivered, already undone).
    slots: Option<Arc<FairSlots>>,
    tenant: TenantId,
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            let mut state = slots.lock();
            state.free += 1;
            if let Some(n) = state.running.get_mut(&self.tenant) {
                *n -= 1;
                if *n == 0 {
                    state.running.remove(&self.tenant);
                }
            }
            slots.grant(&mut state);
        }
    }
}

impl FairSlots {
    /// `total` slots (at least 1), at most `per_tenant` (at least 1) held by one tenant.
    pub(crate) fn new(total: usize, per_tenant: usize) -> Self {
        let total = total.max(1);
        Self {
            state: Mutex::new(SlotState {
                free: total,
                running: HashMap::new(),
                waiting: HashMap::new(),
                order: VecDeque::new(),
            }),
            per_tenant: per_tenant.clamp(1, total),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // The state is consistent between statements: a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot for `tenant`, behind its own earlier waiters. `None` only if the
    /// slots are gone (the scheduler stops). Dropping the future gives up its place (or the
    /// slot it was just granted).
    pub(crate) async fn acquire(self: &Arc<Self>, tenant: &TenantId) -> Option<SlotPermit> {
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.lock();
            let queue = state.waiting.entry(tenant.clone()).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                state.order.push_back(tenant.clone());
            }
            self.grant(&mut state);
        }
        rx.await.ok()
    }

    /// Hands free slots to waiters: each to the eligible tenant (below `per_tenant`) running
    /// the fewest, the earliest in `order` among equals; that tenant then goes to the back.
    fn grant(self: &Arc<Self>, state: &mut SlotState) {
        while state.free > 0 {
            let pick = state
                .order
                .iter()
                .enumerate()
                .map(|(i, t)| (state.running.get(t).copied().unwrap_or(0), i))
                .filter(|(running, _)| *running < self.per_tenant)
                .min();
            let Some((_, at)) = pick else { return };
            let Some(tenant) = state.order.remove(at) else {
                return;
            };
            let Some(queue) = state.waiting.get_mut(&tenant) else {
                continue;
            };
            let Some(tx) = queue.pop_front() else {
                state.waiting.remove(&tenant);
                continue;
            };
            let more = !queue.is_empty();
            if more {
                state.order.push_back(tenant.clone());
            } else {
                state.waiting.remove(&tenant);
            }
            state.free -= 1;
            *state.running.entry(tenant.clone()).or_default() += 1;
            let permit = SlotPermit {
                slots: Some(self.clone()),
                tenant: tenant.clone(),
            };
            if let Err(mut undelivered) = tx.send(permit) {
                // The waiter left: undo the grant here (the lock is held) and go on.
                undelivered.slots = None;
                state.free += 1;
                if let Some(n) = state.running.get_mut(&tenant) {
                    *n -= 1;
                    if *n == 0 {
                        state.running.remove(&tenant);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::Poll;

    use nightshift_core::TenantId;

    use super::{FairSlots, SlotPermit};

    type Waiter<'a> = Pin<Box<dyn Future<Output = Option<SlotPermit>> + 'a>>;

    /// Asks for a slot and polls once: the permit, or the pending waiter.
    async fn ask<'a>(
        slots: &'a Arc<FairSlots>,
        tenant: &'a TenantId,
    ) -> Result<SlotPermit, Waiter<'a>> {
        let mut waiter: Waiter<'a> = Box::pin(slots.acquire(tenant));
        match futures::poll!(waiter.as_mut()) {
            Poll::Ready(permit) => Ok(permit.expect("slots alive")),
            Poll::Pending => Err(waiter),
        }
    }

    async fn poll(waiter: &mut Waiter<'_>) -> Option<SlotPermit> {
        match futures::poll!(waiter.as_mut()) {
            Poll::Ready(permit) => permit,
            Poll::Pending => None,
        }
    }

    #[tokio::test]
    async fn a_slot_is_kept_for_other_tenants() {
        let slots = Arc::new(FairSlots::new(4, 3));
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let (mut held, mut queued) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            match ask(&slots, &a).await {
                Ok(p) => held.push(p),
                Err(w) => queued.push(w),
            }
        }
        assert_eq!((held.len(), queued.len()), (3, 47));
        // B's one batch starts at once, behind none of A's 47.
        let b_slot = ask(&slots, &b).await.ok().expect("B served at once");
        // A's next starts when one of A's ends, in A's order.
        assert!(poll(&mut queued[0]).await.is_none());
        held.pop();
        let a_fourth = poll(&mut queued[0]).await;
        assert!(a_fourth.is_some());
        assert!(poll(&mut queued[1]).await.is_none());
        drop(b_slot);
        // B's slot is free but A is at its cap: it stays free for the next tenant.
        assert!(poll(&mut queued[1]).await.is_none());
        assert!(ask(&slots, &TenantId::generate()).await.is_ok());
    }

    #[tokio::test]
    async fn freed_slots_go_to_the_tenant_running_fewest() {
        let slots = Arc::new(FairSlots::new(2, 2));
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let mut held = vec![
            ask(&slots, &a).await.ok().expect("free"),
            ask(&slots, &a).await.ok().expect("free"),
        ];
        let Err(mut a_next) = ask(&slots, &a).await else {
            panic!("full")
        };
        let Err(mut b_next) = ask(&slots, &b).await else {
            panic!("full")
        };
        // A asked first, but B runs nothing: the freed slot is B's.
        held.pop();
        assert!(poll(&mut a_next).await.is_none());
        assert!(poll(&mut b_next).await.is_some());
    }

    #[tokio::test]
    async fn waiters_that_leave_lose_no_slot() {
        let slots = Arc::new(FairSlots::new(1, 1));
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let first = ask(&slots, &a).await.ok().expect("free");
        // a waiter that gives up before its turn, and one granted but never polled again
        let Err(gone) = ask(&slots, &b).await else {
            panic!("full")
        };
        drop(gone);
        let Err(granted_unclaimed) = ask(&slots, &a).await else {
            panic!("full")
        };
        drop(first);
        drop(granted_unclaimed);
        assert!(ask(&slots, &b).await.is_ok(), "the slot came back");
    }
}
