//! Running one chunk of a batch: read its lines, call the upstream for each, write its part.
//!
//! [`run_chunk`] is the whole of an executor's work on one [`ChunkTask`], short of the queue
//! (the [`service`](crate::service) decodes the task, publishes the result and settles the
//! delivery):
//!
//! 1. **Read.** One ranged GET of the input object (`[byte_start, byte_end)`), split into
//!    lines with the file's own numbering ([`JsonlSplitter::starting_at`]). Blank lines are
//!    skipped (chunking never counts them). Each line must parse into a `custom_id` and a
//!    `body` object, and the chunk must hold exactly `line_count` of them: anything else
//!    means the task does not describe its input, and the chunk fails with
//!    [`ChunkError::InvalidInput`] before any request is sent.
//! 2. **Run.** The requests run concurrently, at most
//!    [`chunk_concurrency`](RunnerSettings::chunk_concurrency) at a time, through the
//!    upstream that serves the task's model ([`Upstream::call`]: retries, backoff, AIMD
//!    limit, deadline). The body is sent as the user wrote it, byte for byte (see
//!    [`request`](crate::request)).
//! 3. **Record.** Every finished line goes to a recorder task that calls
//!    [`LiveState::record`] in small groups ([`record_batch`](RunnerSettings::record_batch)
//!    lines or [`record_interval`](RunnerSettings::record_interval)), so live counts move
//!    while the chunk runs. The state counts each line at most once, so a redelivered chunk
//!    counts nothing twice. A state failure never fails the chunk: the group is kept and
//!    retried with the next one, and given up (logged) at the end of the chunk.
//! 4. **Write.** Every result line — output and error lines together, in line order — goes
//!    into ONE object at [`part_key`]`(batch, chunk_index)`, written whole. Ids come from
//!    [`BatchRequestId::for_line`], so a chunk that runs again rewrites the same part, with
//!    the same ids, differing at most in what the upstream answered.
//!
//! # Which error line a request gets when it never reaches the upstream
//!
//! | situation | line |
//! | --- | --- |
//! | the batch was cancelled before the request started | `batch_cancelled` |
//! | the deadline (`task.deadline`: `expires_at`) passed before it started | `batch_expired` |
//! | no upstream of this executor serves the model | `upstream_unreachable`, naming the model |
//!
//! Cancellation wins over expiry when both hold. Cancellation is learnt by polling
//! [`LiveState::is_cancelled`] once before the first request and then every
//! [`cancel_poll`](RunnerSettings::cancel_poll) while the chunk runs; requests already sent
//! finish and keep their answers.
//!
//! # Memory
//!
//! A chunk holds its input range (the parsed requests share its bytes) and its result lines
//! until the part is written. Both are bounded by the chunk's size, which the scheduler's
//! chunking bounds (`chunk_max_lines`, `chunk_max_bytes`, a few MB by default): results are
//! at most `line_count` upstream answers. An executor holds at most `prefetch` chunks.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::results::{BatchRequestId, NoResponseCode, Outcome, ResultLine, Usage};
use nightshift_proto::v1::{self, ChunkResult, ChunkTask};
use nightshift_state::{LineOutcome, LiveState, StateError};
use nightshift_storage::{ByteRange, ObjectStore, StorageError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::metrics;
use crate::request::{Request, parse_line};
use crate::upstream::{CallOutcome, CancelFlag, Upstream, Upstreams};

/// The schema version of the [`ChunkTask`]s this executor understands and of the
/// [`ChunkResult`]s it publishes.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest wait, at the end of a chunk, for the live-state recorder to flush its last lines.
/// Past it the lines are given up (the live view lags; the part is the record).
pub const RECORDER_FINISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest time a deadline is taken to be in the future; a later one is cut to this (an
/// `Instant` cannot hold arbitrary dates).
const MAX_DEADLINE_DISTANCE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How chunks are run. Part of [`ExecutorConfig`](crate::service::ExecutorConfig).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerSettings {
    /// Requests of one chunk in flight at once (≥ 1). The upstream's adaptive limit bounds
    /// the real concurrency across chunks; this only stops one chunk from queueing all its
    /// requests at the limiter at once. Default 64.
    pub chunk_concurrency: usize,
    /// How often a running chunk asks the live state whether its batch was cancelled
    /// (> 0). Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub cancel_poll: Duration,
    /// Longest input line read (its content, terminator excluded); a longer line fails the
    /// chunk. Must be at least the scheduler's `max_line_bytes` (validation refuses longer
    /// lines, so a chunk never holds one). Default 16 MiB, the scheduler's default.
    pub max_line_bytes: usize,
    /// Finished lines sent to the live state in one call, at most (≥ 1). Default 64.
    pub record_batch: usize,
    /// Longest a finished line waits before it is sent to the live state. Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub record_interval: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            chunk_concurrency: 64,
            cancel_poll: Duration::from_millis(500),
            max_line_bytes: nightshift_core::validation::ValidationLimits::default().max_line_bytes,
            record_batch: 64,
            record_interval: Duration::from_millis(200),
        }
    }
}

impl RunnerSettings {
    /// Checks every field; the error names the bad one.
    ///
    /// # Errors
    /// A zero count or duration.
    pub fn validate(&self) -> Result<(), String> {
        if self.chunk_concurrency == 0 {
            return Err("chunk_concurrency must be at least 1".into());
        }
        if self.cancel_poll.is_zero() {
            return Err("cancel_poll must be more than 0".into());
        }
        if self.max_line_bytes == 0 {
            return Err("max_line_bytes must be at least 1".into());
        }
        if self.record_batch == 0 {
            return Err("record_batch must be at least 1".into());
        }
        if self.record_interval.is_zero() {
            return Err("record_interval must be more than 0".into());
        }
        Ok(())
    }
}

/// What [`run_chunk`] works with. One per executor process, shared by its chunks.
#[derive(Debug, Clone)]
pub struct ChunkDeps {
    /// Where inputs are read and parts written.
    pub storage: Arc<dyn ObjectStore>,
    /// Live counts and cancel flags.
    pub state: Arc<dyn LiveState>,
    /// The upstreams of the routing table.
    pub upstreams: Arc<Upstreams>,
    /// How chunks run.
    pub settings: RunnerSettings,
}

/// How one result line ended, for the `nightshift_executor_lines_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LineKind {
    /// A 2xx answer: an output-file line.
    Succeeded,
    /// `batch_cancelled`.
    Cancelled,
    /// `batch_expired`.
    Expired,
    /// Any other error-file line (an error status, a timeout, an unreachable upstream).
    Failed,
}

impl LineKind {
    /// Every kind.
    pub const ALL: [Self; 4] = [
        Self::Succeeded,
        Self::Cancelled,
        Self::Expired,
        Self::Failed,
    ];

    /// Classifies a result line.
    pub fn of(line: &ResultLine) -> Self {
        if line.is_success() {
            return Self::Succeeded;
        }
        match &line.outcome {
            Outcome::NoResponse(error) if error.code == NoResponseCode::BatchCancelled => {
                Self::Cancelled
            }
            Outcome::NoResponse(error) if error.code == NoResponseCode::BatchExpired => {
                Self::Expired
            }
            _ => Self::Failed,
        }
    }

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }
}

/// A chunk whose part is written: what its [`ChunkResult`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// The part's object key ([`part_key`]).
    pub part_key: String,
    /// The part's size in bytes.
    pub part_bytes: u64,
    /// Lines with a 2xx answer (the output file's).
    pub succeeded: u64,
    /// Every other line (the error file's), `cancelled` and `expired` included.
    pub failed: u64,
    /// Of `failed`: `batch_cancelled` lines.
    pub cancelled: u64,
    /// Of `failed`: `batch_expired` lines.
    pub expired: u64,
    /// Usage summed over the successful lines.
    pub usage: Usage,
}

impl ChunkOutcome {
    /// The chunk-result message announcing this outcome for `task`.
    pub fn result_message(&self, task: &ChunkTask) -> ChunkResult {
        ChunkResult {
            schema_version: SCHEMA_VERSION,
            batch_id: task.batch_id.clone(),
            chunk_index: task.chunk_index,
            completed: self.succeeded,
            failed: self.failed,
            usage: Some(v1::Usage::from(&self.usage)),
        }
    }

    fn count(&mut self, line: &ResultLine) {
        match LineKind::of(line) {
            LineKind::Succeeded => {
                self.succeeded += 1;
                self.usage.merge(&line.usage());
            }
            LineKind::Cancelled => {
                self.failed += 1;
                self.cancelled += 1;
            }
            LineKind::Expired => {
                self.failed += 1;
                self.expired += 1;
            }
            LineKind::Failed => self.failed += 1,
        }
    }
}

/// Why a chunk could not be run. Nothing was written to its part.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The task itself is unusable (a malformed batch id, an empty range, no deadline...).
    /// Running it again cannot help.
    #[error("invalid chunk task: {0}")]
    InvalidTask(String),
    /// The input does not hold what the task says (a line that is not a request, another
    /// number of lines, a range past the end of the object, a line over `max_line_bytes`).
    /// Running it again cannot help.
    #[error("the chunk's input does not match its task: {0}")]
    InvalidInput(String),
    /// Reading the input failed (storage unreachable, the object missing). May work later.
    #[error("reading the chunk's input failed: {0}")]
    ReadInput(#[source] StorageError),
    /// Writing the part failed. May work later.
    #[error("writing the chunk's part failed: {0}")]
    WritePart(#[source] StorageError),
}

impl ChunkError {
    /// True when running the chunk again cannot succeed: the task should be dead-lettered,
    /// not requeued.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidTask(_) | Self::InvalidInput(_))
    }
}

/// Runs one chunk to its written part; see the [module docs](self) for every step.
///
/// Idempotent: running a chunk again (a redelivery) rewrites the same part, with the same
/// line ids, and counts no line twice in the live state. Cancel-safe: dropping the future
/// stops the chunk's requests (those in flight are abandoned) and its cancel watcher; its
/// recorder still flushes the lines that finished; no part is written.
///
/// # Errors
/// [`ChunkError`]; [`ChunkError::is_permanent`] says whether retrying can help. A live-state
/// failure is never an error.
pub async fn run_chunk(task: &ChunkTask, deps: &ChunkDeps) -> Result<ChunkOutcome, ChunkError> {
    let batch = check_task(task)?;
    let deadline = deadline_instant(task.deadline, SystemTime::now(), Instant::now());
    let requests = read_requests(task, deps).await?;
    let settings = &deps.settings;

    let cancel = CancelFlag::new();
    if is_cancelled(deps.state.as_ref(), batch.as_str()).await {
        tracing::info!("batch is cancelled: no request of this chunk will start");
        cancel.cancel();
    }
    let watcher = AbortOnDrop(tokio::spawn(watch_cancel(
        Arc::clone(&deps.state),
        batch.as_str().to_owned(),
        cancel.clone(),
        settings.cancel_poll,
    )));
    let recorder = Recorder::start(
        Arc::clone(&deps.state),
        batch.as_str().to_owned(),
        settings.record_batch,
        settings.record_interval,
    );

    let upstream = deps.upstreams.for_model(&task.model);
    if upstream.is_none() {
        tracing::warn!("no upstream serves this model: its requests fail as upstream_unreachable");
    }
    let line_count = requests.len();
    let mut results: Vec<Option<ResultLine>> = vec![None; line_count];
    {
        let context = LineContext {
            batch: batch.as_str(),
            model: &task.model,
            endpoint: &task.endpoint,
            upstream: upstream.as_deref(),
            deadline,
            cancel: &cancel,
        };
        let context = &context;
        let mut finished = futures::stream::iter(requests.into_iter().enumerate())
            .map(|(index, request)| async move { (index, context.run(request).await) })
            .buffer_unordered(settings.chunk_concurrency);
        while let Some((index, (line, result))) = finished.next().await {
            recorder.send(LineOutcome::of(line, &result));
            if let Some(slot) = results.get_mut(index) {
                *slot = Some(result);
            }
        }
    }
    drop(watcher);
    recorder.finish().await;

    let key = part_key(&batch, task.chunk_index);
    let mut outcome = ChunkOutcome {
        part_key: key.clone(),
        part_bytes: 0,
        succeeded: 0,
        failed: 0,
        cancelled: 0,
        expired: 0,
        usage: Usage::default(),
    };
    let mut part = Vec::new();
    // Each line is freed once serialised: the chunk's results are not held twice.
    for line in results.into_iter().flatten() {
        line.write_json_line(&mut part);
        outcome.count(&line);
    }
    outcome.part_bytes = part.len() as u64;
    deps.storage
        .put(&key, Bytes::from(part))
        .await
        .map_err(ChunkError::WritePart)?;
    for (kind, count) in [
        (LineKind::Succeeded, outcome.succeeded),
        (LineKind::Cancelled, outcome.cancelled),
        (LineKind::Expired, outcome.expired),
        (
            LineKind::Failed,
            outcome.failed - outcome.cancelled - outcome.expired,
        ),
    ] {
        if count > 0 {
            ::metrics::counter!(metrics::LINES_TOTAL, metrics::LABEL_OUTCOME => kind.as_str())
                .increment(count);
        }
    }
    Ok(outcome)
}

/// Checks what can be checked of a task without I/O; returns its batch id.
fn check_task(task: &ChunkTask) -> Result<BatchId, ChunkError> {
    let invalid = |what: String| Err(ChunkError::InvalidTask(what));
    let batch = BatchId::parse(&task.batch_id).map_err(|error| {
        ChunkError::InvalidTask(format!("batch_id {:?}: {error}", task.batch_id))
    })?;
    if task.input_storage_key.is_empty() {
        return invalid("input_storage_key is empty".into());
    }
    if task.byte_end <= task.byte_start {
        return invalid(format!(
            "the byte range [{}, {}) is empty",
            task.byte_start, task.byte_end
        ));
    }
    if task.first_line == 0 {
        return invalid("first_line is 0 (lines are numbered from 1)".into());
    }
    if task.line_count == 0 {
        return invalid("line_count is 0".into());
    }
    if task.deadline <= 0 {
        return invalid(format!("deadline {} is not a unix time", task.deadline));
    }
    if task.endpoint.is_empty() || task.model.is_empty() {
        return invalid("endpoint or model is empty".into());
    }
    Ok(batch)
}

/// The instant matching `unix_secs`, given the wall clock and the monotonic clock read at
/// the same moment: `now` when the time is past.
fn deadline_instant(unix_secs: i64, wall_now: SystemTime, now: Instant) -> Instant {
    let deadline = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_secs).unwrap_or(0));
    let left = deadline
        .duration_since(wall_now)
        .unwrap_or(Duration::ZERO)
        .min(MAX_DEADLINE_DISTANCE);
    now.checked_add(left).unwrap_or(now)
}

/// Reads and parses the chunk's lines.
async fn read_requests(task: &ChunkTask, deps: &ChunkDeps) -> Result<Vec<Request>, ChunkError> {
    let range = ByteRange::Bounded {
        start: task.byte_start,
        end: task.byte_end,
    };
    let body = deps
        .storage
        .get(&task.input_storage_key, Some(range))
        .await
        .map_err(|error| match error {
            StorageError::InvalidRange { size, .. } => ChunkError::InvalidInput(format!(
                "the range [{}, {}) starts past the end of the {size}-byte input",
                task.byte_start, task.byte_end
            )),
            error => ChunkError::ReadInput(error),
        })?;
    if (body.start, body.end) != (task.byte_start, task.byte_end) {
        return Err(ChunkError::InvalidInput(format!(
            "asked for bytes [{}, {}) of the input, got [{}, {}) of {}",
            task.byte_start, task.byte_end, body.start, body.end, body.object_size
        )));
    }
    let expected = usize::try_from(task.line_count).unwrap_or(usize::MAX);
    let mut requests = Vec::with_capacity(expected.min(1 << 16));
    let mut items = pin!(
        JsonlSplitter::new(deps.settings.max_line_bytes)
            .starting_at(task.first_line, task.byte_start)
            .split_stream(body.stream)
    );
    while let Some(item) = items.next().await {
        match item.map_err(ChunkError::ReadInput)? {
            JsonlItem::Line(line) if line.is_blank() => {}
            JsonlItem::Line(line) => {
                let request = parse_line(line.number, &line.bytes).map_err(|error| {
                    ChunkError::InvalidInput(format!("line {}: {error}", line.number))
                })?;
                requests.push(request);
            }
            JsonlItem::Oversized(line) => {
                return Err(ChunkError::InvalidInput(format!(
                    "line {} is longer than max_line_bytes ({})",
                    line.number, deps.settings.max_line_bytes
                )));
            }
        }
        if requests.len() > expected {
            break;
        }
    }
    if requests.len() != expected {
        return Err(ChunkError::InvalidInput(format!(
            "the range holds {}{} requests, the task says {expected}",
            requests.len(),
            if requests.len() > expected {
                " or more"
            } else {
                ""
            },
        )));
    }
    Ok(requests)
}

/// What every request of a chunk shares.
struct LineContext<'a> {
    batch: &'a str,
    model: &'a str,
    endpoint: &'a str,
    upstream: Option<&'a Upstream>,
    deadline: Instant,
    cancel: &'a CancelFlag,
}

impl LineContext<'_> {
    /// Runs one request to its result line; returns its line number too.
    async fn run(&self, request: Request) -> (u64, ResultLine) {
        let Request {
            line,
            custom_id,
            body,
        } = request;
        // `Upstream::call` makes the same checks before its first attempt; they are repeated
        // here so that a line that never reaches it (no upstream) gets the same codes.
        let outcome = if self.cancel.is_cancelled() {
            not_started(NoResponseCode::BatchCancelled, None)
        } else if Instant::now() >= self.deadline {
            not_started(NoResponseCode::BatchExpired, None)
        } else if let Some(upstream) = self.upstream {
            upstream
                .call(self.model, self.endpoint, body, self.deadline, self.cancel)
                .await
        } else {
            not_started(
                NoResponseCode::UpstreamUnreachable,
                Some(format!(
                    "No upstream serving the model {:?} is configured on this executor.",
                    self.model
                )),
            )
        };
        let id = BatchRequestId::for_line(self.batch, line);
        (line, outcome.into_result_line(id, &custom_id))
    }
}

fn not_started(code: NoResponseCode, message: Option<String>) -> CallOutcome {
    CallOutcome::NoResponse {
        code,
        message: message.unwrap_or_else(|| code.default_message().to_owned()),
        attempts: 0,
    }
}

/// Asks the live state once; a failure reads as "not cancelled" (and is counted).
async fn is_cancelled(state: &dyn LiveState, batch: &str) -> bool {
    match state.is_cancelled(batch).await {
        Ok(cancelled) => cancelled,
        Err(error) => {
            state_error("is_cancelled", &error);
            tracing::warn!(error = %error, "cannot read the batch's cancel flag; running on");
            false
        }
    }
}

/// Polls the cancel flag every `every` until it is raised, then sets `cancel`. Runs until
/// aborted or the flag is seen. Logs a failing state once per outage, not once per poll.
async fn watch_cancel(
    state: Arc<dyn LiveState>,
    batch: String,
    cancel: CancelFlag,
    every: Duration,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        match state.is_cancelled(&batch).await {
            Ok(true) => {
                tracing::info!("batch cancelled: no further request of this chunk will start");
                cancel.cancel();
                return;
            }
            Ok(false) => {
                if failing {
                    tracing::info!("the batch's cancel flag is readable again");
                    failing = false;
                }
            }
            Err(error) => {
                state_error("is_cancelled", &error);
                if !failing {
                    tracing::warn!(
                        error = %error,
                        "cannot read the batch's cancel flag; running on"
                    );
                    failing = true;
                }
            }
        }
    }
}

fn state_error(operation: &'static str, _error: &StateError) {
    ::metrics::counter!(metrics::STATE_ERRORS_TOTAL, metrics::LABEL_OPERATION => operation)
        .increment(1);
}

/// Aborts a background task when dropped, so no task outlives the chunk that spawned it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends finished lines to the live state in groups, off the chunk's path: a slow state never
/// slows the requests down.
///
/// Dropped without [`finish`](Self::finish) (the chunk was abandoned), its task still flushes
/// the lines it holds, then ends.
struct Recorder {
    lines: mpsc::UnboundedSender<LineOutcome>,
    task: JoinHandle<()>,
}

impl Recorder {
    fn start(state: Arc<dyn LiveState>, batch: String, group: usize, interval: Duration) -> Self {
        // Unbounded, yet bounded by the chunk's line count: every line is sent once.
        let (lines, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(record_lines(state, batch, received, group, interval));
        Self { lines, task }
    }

    fn send(&self, line: LineOutcome) {
        // Fails only if the recorder task is gone (it never ends before the channel closes).
        _ = self.lines.send(line);
    }

    /// Closes the channel and waits (at most [`RECORDER_FINISH_TIMEOUT`]) for the last flush.
    async fn finish(self) {
        let Self { lines, mut task } = self;
        drop(lines);
        if tokio::time::timeout(RECORDER_FINISH_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!(
                timeout_s = RECORDER_FINISH_TIMEOUT.as_secs(),
                "the live state did not take the chunk's last lines in time; live counts lag"
            );
        }
    }
}

async fn record_lines(
    state: Arc<dyn LiveState>,
    batch: String,
    mut received: mpsc::UnboundedReceiver<LineOutcome>,
    group: usize,
    interval: Duration,
) {
    let mut pending: Vec<LineOutcome> = Vec::new();
    // When the oldest pending line must be sent.
    let mut due = Instant::now();
    let mut failing = false;
    loop {
        tokio::select! {
            line = received.recv() => match line {
                Some(line) => {
                    if pending.is_empty() {
                        due = Instant::now() + interval;
                    }
                    pending.push(line);
                    // While the state fails, only the timer retries: not one call per line.
                    if pending.len() < group || failing {
                        continue;
                    }
                }
                None => break,
            },
            () = tokio::time::sleep_until(due), if !pending.is_empty() => {}
        }
        flush(state.as_ref(), &batch, &mut pending, &mut failing).await;
        // Lines kept after a failure wait a full interval before the next try.
        due = Instant::now() + interval;
    }
    flush(state.as_ref(), &batch, &mut pending, &mut failing).await;
    if !pending.is_empty() {
        tracing::warn!(
            lines = pending.len(),
            "live counts of some lines could not be recorded; \
             they show in the batch's final counts only"
        );
    }
}

/// Records `pending`; empties it unless the state failed in a way a retry may fix.
async fn flush(
    state: &dyn LiveState,
    batch: &str,
    pending: &mut Vec<LineOutcome>,
    failing: &mut bool,
) {
    if pending.is_empty() {
        return;
    }
    match state.record(batch, pending).await {
        Ok(_) => {
            pending.clear();
            if *failing {
                tracing::info!("recording live counts works again");
                *failing = false;
            }
        }
        Err(error) => {
            state_error("record", &error);
            if matches!(error, StateError::InvalidInput(_)) {
                // A bug of ours; retrying the same input cannot help.
                tracing::error!(
                    error = %error,
                    lines = pending.len(),
                    "live state refused finished lines"
                );
                pending.clear();
            } else if !*failing {
                tracing::warn!(
                    error = %error,
                    lines = pending.len(),
                    "cannot record live counts; will retry"
                );
                *failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> ChunkTask {
        ChunkTask {
            schema_version: 1,
            batch_id: "batch_abc".into(),
            tenant_id: "tenant_x".into(),
            chunk_index: 3,
            input_storage_key: "files/file-1".into(),
            byte_start: 10,
            byte_end: 20,
            first_line: 2,
            line_count: 1,
            endpoint: "/v1/chat/completions".into(),
            model: "m".into(),
            deadline: 1_900_000_000,
        }
    }

    #[test]
    fn tasks_are_checked() {
        assert!(check_task(&task()).is_ok());
        let bad: [fn(&mut ChunkTask); 7] = [
            |t| t.batch_id = "nope".into(),
            |t| t.input_storage_key.clear(),
            |t| t.byte_end = t.byte_start,
            |t| t.first_line = 0,
            |t| t.line_count = 0,
            |t| t.deadline = 0,
            |t| t.model.clear(),
        ];
        for change in bad {
            let mut task = task();
            change(&mut task);
            let error = check_task(&task).unwrap_err();
            assert!(error.is_permanent(), "{error}");
        }
    }

    #[test]
    fn deadlines_convert_to_instants() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(
            deadline_instant(1_030, wall, now),
            now + Duration::from_secs(30)
        );
        assert_eq!(deadline_instant(999, wall, now), now);
        assert_eq!(deadline_instant(-5, wall, now), now);
        assert_eq!(
            deadline_instant(i64::MAX, wall, now),
            now + MAX_DEADLINE_DISTANCE
        );
    }

    #[test]
    fn outcomes_count_lines_by_kind() {
        let id = |n| BatchRequestId::for_line("batch_abc", n);
        let body = nightshift_core::results::ResponseBody::from_json(
            br#"{"usage": {"prompt_tokens": 2, "completion_tokens": 3}}"#,
        )
        .unwrap();
        let lines = [
            ResultLine::response(id(1), "a", 200, "r", body.clone()),
            ResultLine::response(id(2), "b", 400, "r", body),
            ResultLine::no_response(id(3), "c", NoResponseCode::BatchCancelled, None),
            ResultLine::no_response(id(4), "d", NoResponseCode::BatchExpired, None),
            ResultLine::no_response(id(5), "e", NoResponseCode::RequestTimeout, None),
        ];
        let mut outcome = ChunkOutcome {
            part_key: String::new(),
            part_bytes: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            expired: 0,
            usage: Usage::default(),
        };
        for line in &lines {
            outcome.count(line);
        }
        assert_eq!(
            (
                outcome.succeeded,
                outcome.failed,
                outcome.cancelled,
                outcome.expired
            ),
            (1, 4, 1, 1)
        );
        assert_eq!(outcome.usage.total_tokens, 5);
        let message = outcome.result_message(&task());
        assert_eq!(message.schema_version, SCHEMA_VERSION);
        assert_eq!((message.completed, message.failed), (1, 4));
        assert_eq!(message.chunk_index, 3);
        assert_eq!(message.usage.unwrap().output_tokens, 3);
        let kinds: Vec<_> = lines.iter().map(|l| LineKind::of(l).as_str()).collect();
        assert_eq!(
            kinds,
            ["succeeded", "failed", "cancelled", "expired", "failed"]
        );
    }
}
