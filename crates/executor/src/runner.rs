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
//! 2. **Keep.** The chunk's part, if an earlier run wrote one, is read and its *final* lines
//!    are kept (see "Re-runs" below). Only the other lines are run.
//! 3. **Run.** The requests run concurrently, at most
//!    [`chunk_concurrency`](RunnerSettings::chunk_concurrency) at a time, through the
//!    upstream that serves the task's model ([`Upstream::call_started_by`]: retries, backoff,
//!    AIMD limit, deadline, time budget). The body is sent as the user wrote it, byte for byte
//!    (see [`request`](crate::request)).
//! 4. **Record.** Every finished line (and every kept one) goes to a recorder task that calls
//!    [`LiveState::record`] in small groups ([`record_batch`](RunnerSettings::record_batch)
//!    lines or [`record_interval`](RunnerSettings::record_interval)), so live counts move
//!    while the chunk runs. The state counts each line at most once, so a redelivered chunk
//!    counts nothing twice. A state failure never fails the chunk: the group is kept and
//!    retried with the next one, and given up (logged) at the end of the chunk.
//! 5. **Write.** Every result line — kept and new, output and error lines together, in line
//!    order — goes into ONE object at [`part_key`]`(batch, chunk_index)`, streamed through
//!    [`ObjectStore::upload`] (one PUT when small, a multipart upload when large). Ids come
//!    from [`BatchRequestId::for_line`], so a reader matches part lines to input lines by id
//!    alone. A run that changed nothing (no new line, every earlier line kept) writes
//!    nothing.
//!
//! # Which error line a request gets when it never reaches the upstream
//!
//! | situation | line |
//! | --- | --- |
//! | the batch was cancelled before the request started | `batch_cancelled` |
//! | the deadline (`task.deadline`: `expires_at`) passed before it started | `batch_expired` |
//! | no upstream of this executor serves the model | `upstream_unreachable`, naming the model |
//! | the chunk's time budget was spent before it started | none: the line is left out of the part |
//!
//! Cancellation wins over expiry, and both over the time budget, when several hold.
//! Cancellation is learnt by polling [`LiveState::is_cancelled`] once before the first
//! request and then every [`cancel_poll`](RunnerSettings::cancel_poll) while the chunk runs;
//! requests already sent finish and keep their answers. An upstream answer larger than the
//! upstream's `max_response_bytes` becomes a `response_too_large` line (see
//! [`upstream`](crate::upstream)).
//!
//! # Re-runs
//!
//! A chunk may run again: a redelivery after a crash or a lost ack, a continuation after the
//! time budget, a re-drive after its lease expired — also once its batch is cancelled or past
//! its deadline. A re-run never loses a result: before running anything, [`run_chunk`] reads
//! the chunk's existing part (none: every line runs) and keeps every line that is *final*
//! ([`ResultLine::is_final`]: an upstream answer of any status, or an error other than
//! `batch_cancelled` / `batch_expired`) and belongs to the chunk (its `id` is one of the
//! chunk's lines and its `custom_id` matches). Only the other lines are run, and the part
//! written holds the kept lines, byte for byte, and the new ones, in line order. So a 2xx is
//! never overwritten, and a re-run after cancel or deadline sends nothing for lines already
//! done. A part line that cannot be read (not a result line, or longer than
//! `4 × max_response_bytes + 6 × max_line_bytes + 1 MiB`) is not kept: its request runs again.
//! Kept lines are sent to the live state again (it counts each line once) and counted in the
//! [`ChunkOutcome`], which always describes the whole part.
//!
//! # Time budget
//!
//! A chunk's wall clock must stay well under the broker's consumer timeout, whatever its size
//! and however slow the upstream. Once [`chunk_time_budget`](RunnerSettings::chunk_time_budget)
//! has passed since [`run_chunk`] began, no new request of the chunk starts (a request still
//! waiting for a permit of the upstream's limiter does not start either); requests in flight
//! finish, retries included. The part then holds what is done — lines never started are left
//! out, not written as errors — and [`ChunkOutcome::complete`] is false: the service publishes
//! the task again, and the next run continues from the part (see "Re-runs"). The longest a
//! run takes is thus about the budget plus one request's longest life (`max_attempts` ×
//! `timeout` plus backoffs), plus reading and writing.
//!
//! # Memory
//!
//! A chunk holds its input range (the parsed requests share its bytes), bounded by the
//! scheduler's chunking (`chunk_max_lines`, `chunk_max_bytes`, a few MB by default). Each
//! upstream answer is read up to the upstream's `max_response_bytes` (default 16 MiB), and at
//! most `chunk_concurrency` are read at once (and the upstream's limit, `max_concurrency`,
//! bounds them across chunks). A finished line is serialised at once; result lines are held
//! in memory up to [`result_memory_bytes`](RunnerSettings::result_memory_bytes) per chunk
//! (default 32 MiB), and the rest go to an anonymous temporary file (in `$TMPDIR`, deleted
//! when the chunk ends, however it ends). The part is uploaded from there in line order, in
//! pieces of at most 1 MiB besides the storage adapter's own part buffers. An executor holds
//! at most `prefetch` chunks.
//!
//! # Errors
//!
//! | error | means | service |
//! | --- | --- | --- |
//! | [`InvalidTask`](ChunkError::InvalidTask), [`InvalidInput`](ChunkError::InvalidInput) | the task does not describe its input | permanent: report the chunk failed |
//! | [`InputMissing`](ChunkError::InputMissing) | the input object does not exist | permanent: report the chunk failed |
//! | [`ReadInput`](ChunkError::ReadInput), [`ReadPart`](ChunkError::ReadPart), [`WritePart`](ChunkError::WritePart) with a `Backend` error | object storage is down | [`is_outage`](ChunkError::is_outage): wait and run it again |
//! | [`Spill`](ChunkError::Spill), and the storage errors above that are not `Backend` | this run failed on its own | retry later (counts toward the delivery limit) |
//!
//! A live-state failure is never an error (see step 4), and an upstream failure is a result
//! line, never an error.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::results::{
    BatchRequestId, NoResponseCode, Outcome, ResultLine, ResultLineSummary, Usage,
};
use nightshift_proto::v1::{self, ChunkResult, ChunkTask};
use nightshift_state::{LineOutcome, LiveState, StateError};
use nightshift_storage::{ByteRange, ObjectStore, ObjectUpload, StorageError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
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

/// Largest piece a part is written in: small lines are gathered up to it, spilled lines are
/// read back in pieces of at most this.
const WRITE_PIECE: usize = 1 << 20;

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
    /// How long one run of a chunk may start requests (> 0); past it the run ends with the
    /// requests in flight and writes a partial part (see the module docs, "Time budget").
    /// Together with the longest request (`max_attempts` × `timeout` of the upstreams) it
    /// must stay well under the broker's consumer timeout. Default 10 minutes.
    #[serde(with = "humantime_serde")]
    pub chunk_time_budget: Duration,
    /// Bytes of result lines one chunk keeps in memory; the rest wait in a temporary file
    /// until the part is written. 0 sends every line to the file. Default 32 MiB.
    pub result_memory_bytes: usize,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        Self {
            chunk_concurrency: 64,
            cancel_poll: Duration::from_millis(500),
            max_line_bytes: nightshift_core::validation::ValidationLimits::default().max_line_bytes,
            record_batch: 64,
            record_interval: Duration::from_millis(200),
            chunk_time_budget: Duration::from_secs(600),
            result_memory_bytes: 32 * 1024 * 1024,
        }
    }
}

impl RunnerSettings {
    /// Checks every field; the error names the bad one.
    ///
    /// # Errors
    /// A zero count or duration (`result_memory_bytes` may be 0).
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
        if self.chunk_time_budget.is_zero() {
            return Err("chunk_time_budget must be more than 0".into());
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
    /// Any other error-file line (an error status, a timeout, an unreachable upstream, an
    /// answer too large).
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
            Outcome::NoResponse(error) => Self::of_code(error.code),
            Outcome::Response(_) => Self::Failed,
        }
    }

    /// Classifies a line read back from a part.
    fn of_summary(line: &ResultLineSummary) -> Self {
        if line.succeeded {
            return Self::Succeeded;
        }
        line.no_response_code.map_or(Self::Failed, Self::of_code)
    }

    fn of_code(code: NoResponseCode) -> Self {
        match code {
            NoResponseCode::BatchCancelled => Self::Cancelled,
            NoResponseCode::BatchExpired => Self::Expired,
            _ => Self::Failed,
        }
    }

    /// Its position in [`ALL`](Self::ALL).
    fn index(self) -> usize {
        match self {
            Self::Succeeded => 0,
            Self::Cancelled => 1,
            Self::Expired => 2,
            Self::Failed => 3,
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

/// A chunk whose part is written: what its [`ChunkResult`] reports. The counts cover every
/// line of the part, kept ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// The part's object key ([`part_key`]).
    pub part_key: String,
    /// The part's size in bytes (0: no part, when a run finished no line at all).
    pub part_bytes: u64,
    /// CRC-32 (IEEE) of the part (`None`: there is none).
    pub part_crc32: Option<u32>,
    /// True when the part holds a line for every request of the chunk: the chunk is done.
    /// False when the time budget ended the run first: the task must run again (a
    /// continuation), which keeps these lines and runs the rest.
    pub complete: bool,
    /// Of the lines below: final lines kept from the part of an earlier run.
    pub kept: u64,
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
    /// The chunk-result message announcing this outcome for `task` (a `DONE` report: send it
    /// only for a [`complete`](Self::complete) outcome).
    pub fn result_message(&self, task: &ChunkTask) -> ChunkResult {
        ChunkResult {
            schema_version: SCHEMA_VERSION,
            batch_id: task.batch_id.clone(),
            chunk_index: task.chunk_index,
            completed: self.succeeded,
            failed: self.failed,
            usage: Some(v1::Usage::from(&self.usage)),
            part_crc32: self.part_crc32,
            part_bytes: self.part_bytes,
            ..ChunkResult::default()
        }
    }

    /// Lines in the part.
    pub fn lines(&self) -> u64 {
        self.succeeded + self.failed
    }

    fn count(&mut self, kind: LineKind, usage: &Usage) {
        match kind {
            LineKind::Succeeded => {
                self.succeeded += 1;
                self.usage.merge(usage);
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
    /// The input object does not exist (inputs outlive their batches, so it will not come
    /// back). Running it again cannot help.
    #[error("the chunk's input {0} does not exist")]
    InputMissing(String),
    /// Reading the input failed.
    #[error("reading the chunk's input failed: {0}")]
    ReadInput(#[source] StorageError),
    /// Reading the part of an earlier run failed (a missing part is not an error).
    #[error("reading the chunk's earlier part failed: {0}")]
    ReadPart(#[source] StorageError),
    /// Writing the part failed.
    #[error("writing the chunk's part failed: {0}")]
    WritePart(#[source] StorageError),
    /// The temporary file holding result lines failed (the disk is full, `$TMPDIR` is not
    /// writable).
    #[error("the chunk's temporary result file failed: {0}")]
    Spill(#[source] std::io::Error),
}

impl ChunkError {
    /// The dependency named by [`is_outage`](Self::is_outage) errors.
    pub const OUTAGE_DEPENDENCY: &'static str = "object storage";

    /// True when running the chunk again cannot succeed: report the chunk failed and
    /// dead-letter the task, do not retry.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::InvalidTask(_) | Self::InvalidInput(_) | Self::InputMissing(_)
        )
    }

    /// True when object storage failed ([`StorageError::Backend`] reading the input or the
    /// earlier part, or writing the part): the dependency is down, not the task at fault.
    /// Wait and run it again, without counting the failure against the task.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::ReadInput(StorageError::Backend(_))
                | Self::ReadPart(StorageError::Backend(_))
                | Self::WritePart(StorageError::Backend(_))
        )
    }
}

/// Runs one chunk to its written part; see the [module docs](self) for every step.
///
/// Idempotent and never losing a result: running a chunk again keeps every final line of its
/// part (see "Re-runs"), rewrites the others with the same ids, and counts no line twice in
/// the live state. Cancel-safe: dropping the future stops the chunk's requests (those in
/// flight are abandoned), its cancel watcher, its temporary file and any upload under way;
/// its recorder still flushes the lines that finished; no part is written.
///
/// # Errors
/// [`ChunkError`]; [`ChunkError::is_permanent`] and [`ChunkError::is_outage`] say what to do
/// with the task. A live-state failure is never an error.
pub async fn run_chunk(task: &ChunkTask, deps: &ChunkDeps) -> Result<ChunkOutcome, ChunkError> {
    let started = Instant::now();
    let settings = &deps.settings;
    let batch = check_task(task)?;
    let deadline = deadline_instant(task.deadline, SystemTime::now(), started);
    let start_by = started
        .checked_add(settings.chunk_time_budget)
        .unwrap_or_else(|| started + MAX_DEADLINE_DISTANCE);
    let requests = read_requests(task, deps).await?;
    let line_count = requests.len();
    let key = part_key(&batch, task.chunk_index);

    let recorder = Recorder::start(
        Arc::clone(&deps.state),
        batch.as_str().to_owned(),
        settings.record_batch,
        settings.record_interval,
    );
    let mut results = Results::new(line_count, settings.result_memory_bytes);
    let mut outcome = ChunkOutcome {
        part_key: key.clone(),
        part_bytes: 0,
        part_crc32: None,
        complete: false,
        kept: 0,
        succeeded: 0,
        failed: 0,
        cancelled: 0,
        expired: 0,
        usage: Usage::default(),
    };
    let earlier = keep_earlier_lines(
        &key,
        &batch,
        &requests,
        deps,
        &mut results,
        &recorder,
        &mut outcome,
    )
    .await?;

    let pending: Vec<(usize, Request)> = requests
        .into_iter()
        .enumerate()
        .filter(|(index, _)| !results.has(*index))
        .collect();
    let mut new = [0u64; LineKind::ALL.len()];
    if !pending.is_empty() {
        let cancel = CancelFlag::new();
        if is_cancelled(deps.state.as_ref(), batch.as_str()).await {
            tracing::info!("batch is cancelled: no request of this chunk will start");
            cancel.cancel();
        }
        let _watcher = AbortOnDrop(tokio::spawn(watch_cancel(
            Arc::clone(&deps.state),
            batch.as_str().to_owned(),
            cancel.clone(),
            settings.cancel_poll,
        )));
        let upstream = deps.upstreams.for_model(&task.model);
        if upstream.is_none() {
            tracing::warn!(
                "no upstream serves this model: its requests fail as upstream_unreachable"
            );
        }
        let context = LineContext {
            batch: batch.as_str(),
            model: &task.model,
            endpoint: &task.endpoint,
            upstream: upstream.as_deref(),
            deadline,
            start_by,
            cancel: &cancel,
        };
        let context = &context;
        let mut finished = futures::stream::iter(pending)
            .map(|(index, request)| async move { (index, context.run(request).await) })
            .buffer_unordered(settings.chunk_concurrency);
        while let Some((index, ran)) = finished.next().await {
            // Not started: the time budget was spent first.
            let Some((line, result, usage)) = ran else {
                continue;
            };
            recorder.send(if result.is_success() {
                LineOutcome::succeeded(line, usage)
            } else {
                LineOutcome::failed(line)
            });
            let kind = LineKind::of(&result);
            outcome.count(kind, &usage);
            new[kind.index()] += 1;
            let mut json = result.to_json_line();
            // The line break is written with the part.
            json.pop();
            results
                .put(index, Bytes::from(json))
                .await
                .map_err(ChunkError::Spill)?;
        }
    }
    recorder.finish().await;

    let done = results.filled();
    outcome.complete = done == line_count;
    let new_lines: u64 = new.iter().sum();
    if new_lines == 0 && earlier.lines == outcome.kept {
        // Nothing changed: the part (or its absence) already says all this run knows.
        outcome.part_bytes = earlier.size;
        outcome.part_crc32 = (earlier.size > 0).then_some(earlier.crc32);
    } else {
        let (bytes, crc32) = results.write(deps.storage.as_ref(), &key).await?;
        outcome.part_bytes = bytes;
        outcome.part_crc32 = Some(crc32);
    }
    for (kind, count) in LineKind::ALL.into_iter().zip(new) {
        if count > 0 {
            ::metrics::counter!(metrics::LINES_TOTAL, metrics::LABEL_OUTCOME => kind.as_str())
                .increment(count);
        }
    }
    if !outcome.complete {
        tracing::info!(
            lines = line_count,
            done,
            budget_s = settings.chunk_time_budget.as_secs_f64(),
            "the chunk's time budget is spent: its part holds the lines done, \
             the next run does the rest"
        );
    }
    Ok(outcome)
}

/// What the part of an earlier run held.
#[derive(Debug, Default)]
struct EarlierPart {
    /// Its size in bytes (0: there was none).
    size: u64,
    /// Its lines (blank ones aside), kept or not.
    lines: u64,
    /// CRC-32 of its bytes (0 when there was none).
    crc32: u32,
}

/// Reads the chunk's part, if an earlier run wrote one, and keeps its final lines in
/// `results` (recorded, and counted in `outcome`); see the module docs, "Re-runs".
async fn keep_earlier_lines(
    key: &str,
    batch: &BatchId,
    requests: &[Request],
    deps: &ChunkDeps,
    results: &mut Results,
    recorder: &Recorder,
    outcome: &mut ChunkOutcome,
) -> Result<EarlierPart, ChunkError> {
    let body = match deps.storage.get(key, None).await {
        Ok(body) => body,
        Err(StorageError::NotFound(_)) => return Ok(EarlierPart::default()),
        Err(error) => return Err(ChunkError::ReadPart(error)),
    };
    let mut earlier = EarlierPart {
        size: body.object_size,
        lines: 0,
        crc32: 0,
    };
    let mut crc = crc32fast::Hasher::new();
    let by_id: HashMap<BatchRequestId, usize> = requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            (
                BatchRequestId::for_line(batch.as_str(), request.line),
                index,
            )
        })
        .collect();
    let limit = deps
        .upstreams
        .largest_max_response_bytes()
        .saturating_mul(4)
        .saturating_add(deps.settings.max_line_bytes.saturating_mul(6))
        .saturating_add(1 << 20);
    let mut unreadable = 0u64;
    let bytes = body.stream.inspect_ok(|piece| crc.update(piece));
    let mut items = Box::pin(JsonlSplitter::new(limit).split_stream(bytes));
    while let Some(item) = items.next().await {
        let line = match item.map_err(ChunkError::ReadPart)? {
            JsonlItem::Line(line) if line.is_blank() => continue,
            JsonlItem::Line(line) => line,
            JsonlItem::Oversized(_) => {
                earlier.lines += 1;
                unreadable += 1;
                continue;
            }
        };
        earlier.lines += 1;
        let summary = match ResultLineSummary::parse(&line.bytes) {
            Ok(summary) => summary,
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        if !summary.is_final() {
            continue;
        }
        let Some(&index) = by_id.get(&summary.id) else {
            unreadable += 1;
            continue;
        };
        let Some(request) = requests.get(index) else {
            continue;
        };
        if request.custom_id != summary.custom_id || results.has(index) {
            unreadable += 1;
            continue;
        }
        recorder.send(LineOutcome {
            line: request.line,
            succeeded: summary.succeeded,
            usage: summary.usage,
        });
        outcome.count(LineKind::of_summary(&summary), &summary.usage);
        outcome.kept += 1;
        results
            .put(index, Bytes::copy_from_slice(&line.bytes))
            .await
            .map_err(ChunkError::Spill)?;
    }
    drop(items);
    earlier.crc32 = crc.finalize();
    if unreadable > 0 {
        tracing::warn!(
            lines = unreadable,
            "the chunk's earlier part holds lines that are not this chunk's results; \
             their requests run again"
        );
    }
    if outcome.kept > 0 {
        tracing::info!(
            kept = outcome.kept,
            of = requests.len(),
            "kept the final lines of an earlier run of this chunk"
        );
    }
    Ok(earlier)
}

/// A chunk's result lines by request index, as JSON without the line break: in memory while
/// they fit in the budget, then in an anonymous temporary file (deleted when dropped).
struct Results {
    slots: Vec<Slot>,
    /// Bytes of lines memory may still take.
    memory_left: usize,
    /// Created on the first line that does not fit in memory.
    spill: Option<Spill>,
    /// Slots holding a line.
    filled: usize,
}

enum Slot {
    Empty,
    Memory(Bytes),
    Spilled { offset: u64, len: usize },
}

struct Spill {
    file: tokio::fs::File,
    /// Bytes written so far: where the next line goes.
    end: u64,
}

impl Results {
    fn new(lines: usize, memory: usize) -> Self {
        Self {
            slots: (0..lines).map(|_| Slot::Empty).collect(),
            memory_left: memory,
            spill: None,
            filled: 0,
        }
    }

    fn has(&self, index: usize) -> bool {
        matches!(
            self.slots.get(index),
            Some(Slot::Memory(_) | Slot::Spilled { .. })
        )
    }

    fn filled(&self) -> usize {
        self.filled
    }

    /// Stores the line of request `index` (replacing any).
    async fn put(&mut self, index: usize, line: Bytes) -> std::io::Result<()> {
        let slot = if line.len() <= self.memory_left {
            self.memory_left -= line.len();
            Slot::Memory(line)
        } else {
            let spill = match &mut self.spill {
                Some(spill) => spill,
                None => {
                    let file = tokio::fs::File::from_std(tempfile::tempfile()?);
                    self.spill.insert(Spill { file, end: 0 })
                }
            };
            spill.file.write_all(&line).await?;
            let offset = spill.end;
            spill.end += line.len() as u64;
            Slot::Spilled {
                offset,
                len: line.len(),
            }
        };
        if let Some(old) = self.slots.get_mut(index) {
            if matches!(old, Slot::Empty) {
                self.filled += 1;
            }
            *old = slot;
        }
        Ok(())
    }

    /// Uploads the lines, in order, each followed by `\n`, as the object `key`; returns its
    /// size and CRC-32. Nothing is visible under `key` unless it all succeeds.
    async fn write(self, storage: &dyn ObjectStore, key: &str) -> Result<(u64, u32), ChunkError> {
        let mut upload = storage.upload(key).await.map_err(ChunkError::WritePart)?;
        let mut crc = crc32fast::Hasher::new();
        match self.write_into(upload.as_mut(), &mut crc).await {
            Ok(()) => {
                let size = upload.finish().await.map_err(ChunkError::WritePart)?;
                Ok((size, crc.finalize()))
            }
            Err(error) => {
                if let Err(abort) = upload.abort().await {
                    tracing::debug!(error = %abort, "abandoning the part's upload failed");
                }
                Err(error)
            }
        }
    }

    async fn write_into(
        self,
        upload: &mut dyn ObjectUpload,
        crc: &mut crc32fast::Hasher,
    ) -> Result<(), ChunkError> {
        let Self {
            slots, mut spill, ..
        } = self;
        if let Some(spill) = &mut spill {
            spill.file.flush().await.map_err(ChunkError::Spill)?;
        }
        let mut piece = BytesMut::with_capacity(WRITE_PIECE);
        // Consumed in order: each line's memory is freed once it is written.
        for slot in slots {
            match slot {
                Slot::Empty => continue,
                Slot::Memory(line) if line.len() >= WRITE_PIECE => {
                    send(upload, &mut piece, crc).await?;
                    crc.update(&line);
                    upload.write(line).await.map_err(ChunkError::WritePart)?;
                }
                Slot::Memory(line) => {
                    if piece.len() + line.len() >= WRITE_PIECE {
                        send(upload, &mut piece, crc).await?;
                    }
                    piece.extend_from_slice(&line);
                }
                Slot::Spilled { offset, len } => {
                    let Some(spill) = &mut spill else {
                        continue;
                    };
                    spill
                        .file
                        .seek(SeekFrom::Start(offset))
                        .await
                        .map_err(ChunkError::Spill)?;
                    let mut left = len;
                    while left > 0 {
                        if piece.len() >= WRITE_PIECE {
                            send(upload, &mut piece, crc).await?;
                        }
                        let take = left.min(WRITE_PIECE - piece.len());
                        let start = piece.len();
                        piece.resize(start + take, 0);
                        spill
                            .file
                            .read_exact(&mut piece[start..])
                            .await
                            .map_err(ChunkError::Spill)?;
                        left -= take;
                    }
                }
            }
            piece.extend_from_slice(b"\n");
            if piece.len() >= WRITE_PIECE {
                send(upload, &mut piece, crc).await?;
            }
        }
        send(upload, &mut piece, crc).await
    }
}

/// Writes out `piece` (if it holds anything) and starts a new one.
async fn send(
    upload: &mut dyn ObjectUpload,
    piece: &mut BytesMut,
    crc: &mut crc32fast::Hasher,
) -> Result<(), ChunkError> {
    if piece.is_empty() {
        return Ok(());
    }
    crc.update(piece);
    let full = std::mem::replace(piece, BytesMut::with_capacity(WRITE_PIECE));
    upload
        .write(full.freeze())
        .await
        .map_err(ChunkError::WritePart)
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
            StorageError::NotFound(_) => ChunkError::InputMissing(task.input_storage_key.clone()),
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
    /// No request starts at or after this: the chunk's time budget.
    start_by: Instant,
    cancel: &'a CancelFlag,
}

impl LineContext<'_> {
    /// Runs one request to its result line; returns its line number and its usage
    /// ([`ResultLine::usage`]) too. `None`: the time budget was spent before it started
    /// (nothing was sent; the line has no result).
    async fn run(&self, request: Request) -> Option<(u64, ResultLine, Usage)> {
        let Request {
            line,
            custom_id,
            body,
        } = request;
        // `Upstream::call_started_by` makes the same checks before its first attempt; they
        // are repeated here so that a line that never reaches it (no upstream) gets the same
        // codes.
        let now = Instant::now();
        let outcome = if self.cancel.is_cancelled() {
            not_started(NoResponseCode::BatchCancelled, None)
        } else if now >= self.deadline {
            not_started(NoResponseCode::BatchExpired, None)
        } else if now >= self.start_by {
            return None;
        } else if let Some(upstream) = self.upstream {
            upstream
                .call_started_by(
                    self.model,
                    self.endpoint,
                    body,
                    self.deadline,
                    self.start_by,
                    self.cancel,
                )
                .await?
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
        let (result, usage) = outcome.into_result(id, &custom_id);
        Some((line, result, usage))
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
            attempt: 1,
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
            part_crc32: None,
            complete: true,
            kept: 0,
            succeeded: 0,
            failed: 0,
            cancelled: 0,
            expired: 0,
            usage: Usage::default(),
        };
        for line in &lines {
            outcome.count(LineKind::of(line), &line.usage());
            let summary = ResultLineSummary::parse(&line.to_json_line()).unwrap();
            assert_eq!(LineKind::of_summary(&summary), LineKind::of(line));
        }
        assert_eq!(outcome.lines(), 5);
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
        // no part: no tally
        assert_eq!(message.part_tally(), None);
        outcome.part_crc32 = Some(7);
        outcome.part_bytes = 100;
        let tally = outcome.result_message(&task()).part_tally().unwrap();
        assert_eq!(
            (tally.bytes, tally.crc32, tally.completed, tally.failed),
            (100, 7, 1, 4)
        );
        assert_eq!(tally.usage, outcome.usage);
        let kinds: Vec<_> = lines.iter().map(|l| LineKind::of(l).as_str()).collect();
        assert_eq!(
            kinds,
            ["succeeded", "failed", "cancelled", "expired", "failed"]
        );
        for (at, kind) in LineKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), at);
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let backend = || StorageError::Backend("down".into());
        let missing = || StorageError::NotFound("k".into());
        for error in [
            ChunkError::ReadInput(backend()),
            ChunkError::ReadPart(backend()),
            ChunkError::WritePart(backend()),
        ] {
            assert!(error.is_outage() && !error.is_permanent(), "{error}");
        }
        for error in [
            ChunkError::InvalidTask("t".into()),
            ChunkError::InvalidInput("i".into()),
            ChunkError::InputMissing("files/x".into()),
        ] {
            assert!(error.is_permanent() && !error.is_outage(), "{error}");
        }
        for error in [
            ChunkError::WritePart(missing()),
            ChunkError::Spill(std::io::Error::other("disk full")),
        ] {
            assert!(!error.is_permanent() && !error.is_outage(), "{error}");
        }
        assert!(
            RunnerSettings {
                chunk_time_budget: Duration::ZERO,
                ..RunnerSettings::default()
            }
            .validate()
            .is_err()
        );
        let defaults = RunnerSettings::default();
        defaults.validate().unwrap();
        assert_eq!(defaults.chunk_time_budget, Duration::from_secs(600));
    }

    /// Lines of every size, finished out of order, written with memory budgets from "all in
    /// memory" to "all spilled": the same object every time.
    #[tokio::test]
    async fn results_are_written_in_order_whatever_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = nightshift_storage::LocalStore::open(dir.path())
            .await
            .unwrap();
        let lines: Vec<Bytes> = (0..40usize)
            .map(|i| {
                let size = match i % 4 {
                    0 => 10,
                    1 => 5_000,
                    2 => WRITE_PIECE - 1 + i,
                    _ => 3 * WRITE_PIECE + i,
                };
                Bytes::from(vec![b'a' + (i % 26) as u8; size])
            })
            .collect();
        let mut expected = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            // Line 7 never finishes: it is left out.
            if i != 7 {
                expected.extend_from_slice(line);
                expected.push(b'\n');
            }
        }
        let total: usize = lines.iter().map(Bytes::len).sum();
        for budget in [usize::MAX, total / 2, 6_000, 0] {
            let mut results = Results::new(lines.len(), budget);
            // Out of order: odd indexes first, then even ones backwards.
            let order = (0..lines.len())
                .filter(|i| i % 2 == 1)
                .chain((0..lines.len()).filter(|i| i % 2 == 0).rev())
                .filter(|i| *i != 7);
            for i in order {
                results.put(i, lines[i].clone()).await.unwrap();
            }
            assert_eq!(results.filled(), lines.len() - 1);
            assert!(results.has(0) && !results.has(7) && !results.has(99));
            assert_eq!(results.spill.is_some(), budget < total, "budget {budget}");
            let key = format!("parts/{budget}.jsonl");
            let (size, crc32) = results.write(&store, &key).await.unwrap();
            assert_eq!(size, expected.len() as u64);
            assert_eq!(crc32, crc32fast::hash(&expected), "budget {budget}");
            let written = store
                .get(&key, None)
                .await
                .unwrap()
                .collect()
                .await
                .unwrap();
            assert!(written == expected, "budget {budget}: the part differs");
        }
    }
}
