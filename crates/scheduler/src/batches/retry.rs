//! `RetryBatch`: a new batch of the failed lines of an ended batch.
//!
//! The call answers at once: it checks the parent (the caller's, ended, with failed lines
//! whose results are still stored), then records the new batch `validating` — with its
//! `retry_of` link (`batch_retries`), the Idempotency-Key if any, in one transaction — and
//! returns it. Its input file is built in the background ([`build_input`]), then validated
//! like any batch's.
//!
//! Building is one streamed pass, in memory bounded by the longest line, whatever the number
//! of lines: the parent's output and error files are in input-line order (the finalizer
//! writes every chunk's lines in order, chunks in index order) and each result line's `id` is
//! [`BatchRequestId::for_line`] of its input line. So the input and both result files are read
//! together, one line of each in hand, and each input line meets its result at the head of one
//! of the two result streams — no join, no sort. A result line that matches no input line in
//! that order means the files are not what the finalizer wrote: the build fails rather than
//! guess.
//!
//! The build is deterministic (the same parent files give the same bytes), its object key is
//! the new input file's id, and its record is inserted only once the bytes are stored, so a
//! build cut short (a crash, an outage) is simply run again: by the backoff loop, or by
//! [`recover`] when the scheduler starts, before the new batch is validated.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use nightshift_core::batch::{
    BatchRecord, BatchStatus, CompletionWindow, METADATA_MAX_KEYS, RequestCounts,
};
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::idempotency::IdempotentKind;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::results::{BatchRequestId, ResultLineSummary};
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::validation::BatchError;
use nightshift_core::{ApiError, BatchId, ErrorKind, FileId};
use nightshift_metadata::{Inserted, Quotas, RetryFilter, RetrySource, ValidationOutcome};
use nightshift_proto::v1::{self, RetryBatchRequest};
use nightshift_storage::{ObjectUpload, StorageError};
use serde::Deserialize;
use tracing::Instrument;

use super::Validator;
use crate::ids::{batch_id, caller_tenant, no_such};
use crate::{SchedulerError, SchedulerPorts, idempotency, metrics};

/// The metadata key naming a retry's parent.
pub const RETRY_OF: &str = "retry_of";

/// The `code` of the 400 answering a retry of a batch without a failed line, and of the
/// validation error of a retry whose filter matched none.
pub const NOTHING_TO_RETRY: &str = "nothing_to_retry";

/// The `code` of the validation error of a retry whose parent's files are gone.
pub const SOURCE_UNAVAILABLE: &str = "retry_source_unavailable";

/// Longest result line read (a response body is at most the upstream's
/// `max_response_bytes`, 16 MiB by default, plus the line's envelope).
const MAX_RESULT_LINE_BYTES: usize = 64 * 1024 * 1024;

/// Longest input line read: the parent passed validation, so its lines fit the largest limit
/// an operator may set; this only bounds memory.
const MAX_INPUT_LINE_BYTES: usize = 64 * 1024 * 1024;

/// First wait before a build that hit an outage runs again; doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

fn refused(kind: ErrorKind, code: &str, message: String) -> SchedulerError {
    SchedulerError::Refused(ApiError::new(kind, message).with_code(code).not_retryable())
}

/// Records the retry batch of `req.id` and starts building its input.
pub(super) async fn create(
    ports: &SchedulerPorts,
    validator: &Validator,
    req: RetryBatchRequest,
) -> Result<v1::Batch, SchedulerError> {
    let tenant = caller_tenant(&req.tenant_id)?;
    let parent_id = batch_id(&req.id)?;
    let parent = ports
        .metadata
        .get_batch(&tenant, &parent_id)
        .await?
        .ok_or_else(|| no_such("Batch", &req.id))?;
    if !parent.status.is_terminal() {
        return Err(SchedulerError::Conflict(format!(
            "Batch {} is {}: only an ended batch (completed, expired, cancelled) can be retried.",
            parent.id, parent.status
        )));
    }
    if parent.status == BatchStatus::Failed || parent.request_counts.failed == 0 {
        let why = if parent.status == BatchStatus::Failed {
            "failed validation: none of its requests ran (fix its input and create a new batch)"
        } else {
            "has no failed request"
        };
        return Err(refused(
            ErrorKind::InvalidRequest,
            NOTHING_TO_RETRY,
            format!("Batch {} {why}: there is nothing to retry.", parent.id),
        ));
    }
    // The results say which lines failed: they must still be there.
    let now = now_unix();
    for file in [&parent.output_file_id, &parent.error_file_id]
        .into_iter()
        .flatten()
    {
        if ports.metadata.get_file(&tenant, file, now).await?.is_none() {
            return Err(refused(
                ErrorKind::Conflict,
                SOURCE_UNAVAILABLE,
                format!(
                    "The result file {file} of batch {} has expired or was deleted: its failed \
                     requests can no longer be found.",
                    parent.id
                ),
            ));
        }
    }
    let input_available = match FileId::parse(&parent.input_file_id) {
        Ok(input) => ports
            .metadata
            .file_as_of(&tenant, &input, parent.created_at())
            .await?
            .is_some_and(|f| !f.is_expired(now)),
        Err(_) => false,
    };
    if !input_available {
        return Err(refused(
            ErrorKind::Conflict,
            SOURCE_UNAVAILABLE,
            format!(
                "The input file {} of batch {} has expired or was deleted: its requests can no \
                 longer be read.",
                parent.input_file_id, parent.id
            ),
        ));
    }

    let window = match req.completion_window.as_deref() {
        // the gateway checked it against the allowed windows and computed its length
        Some(raw) => CompletionWindow {
            raw: raw.to_owned(),
            seconds: req.completion_window_seconds,
        },
        None => CompletionWindow::parse(&parent.completion_window).ok_or_else(|| {
            SchedulerError::Malformed(format!(
                "batch {} has an unreadable completion window",
                parent.id
            ))
        })?,
    };
    let mut metadata: std::collections::BTreeMap<String, String> = if req.has_metadata {
        req.metadata.into_iter().collect()
    } else {
        parent.metadata.clone().unwrap_or_default()
    };
    metadata.remove(RETRY_OF);
    if metadata.len() >= METADATA_MAX_KEYS {
        return Err(SchedulerError::Refused(ApiError::invalid_value(
            "metadata",
            format!(
                "The retry's metadata gets the key '{RETRY_OF}', so it may have at most {} \
                 other keys; pass 'metadata' with fewer keys.",
                METADATA_MAX_KEYS - 1
            ),
        )));
    }
    metadata.insert(RETRY_OF.to_owned(), parent.id.to_string());

    let id = BatchId::generate();
    let span = tracing::info_span!("create_batch", batch_id = %id, tenant_id = %tenant, retry_of = %parent.id);
    async {
        let created_at_us = now_unix_micros();
        let batch = BatchRecord {
            id,
            tenant_id: tenant.clone(),
            endpoint: parent.endpoint.clone(),
            input_file_id: FileId::generate().to_string(),
            completion_window: window.raw.clone(),
            status: BatchStatus::Validating,
            model: None,
            errors: vec![],
            metadata: Some(metadata),
            output_expires_after_secs: parent.output_expires_after_secs,
            output_file_id: None,
            error_file_id: None,
            created_at_us,
            in_progress_at: None,
            expires_at: created_at_us.div_euclid(1_000_000) + window.seconds,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            usage: Default::default(),
            traceparent: nightshift_telemetry::propagation::traceparent(&tracing::Span::current()),
        };
        let source = RetrySource {
            batch: batch.id.clone(),
            tenant: tenant.clone(),
            retry_of: parent.id.clone(),
            filter: RetryFilter {
                error_codes: req.error_codes,
                status_codes: req
                    .status_codes
                    .into_iter()
                    .filter_map(|c| u16::try_from(c).ok())
                    .collect(),
                status_classes: req
                    .status_classes
                    .into_iter()
                    .filter_map(|c| u8::try_from(c).ok())
                    .collect(),
            },
        };
        let claim = idempotency::claim(
            req.idempotency.as_ref(),
            IdempotentKind::Batch,
            batch.created_at(),
        );
        let inserted = ports
            .metadata
            .insert_batch_once(&batch, Some(&source), claim.as_ref(), validator.quotas())
            .await?;
        if let (Inserted::Replayed(earlier), Some(claim)) = (&inserted, &claim) {
            let id = idempotency::replayed(earlier, claim)?;
            let earlier = ports
                .metadata
                .get_batch(&tenant, &batch_id(id)?)
                .await?
                .ok_or_else(|| no_such("Batch", id))?;
            return Ok(v1::Batch::from(&earlier));
        }
        ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "validating").increment(1);
        tracing::info!(
            batch_id = %batch.id, tenant_id = %batch.tenant_id, retry_of = %parent.id,
            input_file_id = %batch.input_file_id, "retry batch created; building its input"
        );
        spawn_build(ports.clone(), validator.clone(), batch.clone(), source);
        Ok(v1::Batch::from(&batch))
    }
    .instrument(span)
    .await
}

/// Builds the input of a retry batch in the background (retrying outages until its deadline
/// or until the scheduler stops), then validates it; or fails it when there is nothing to
/// run.
fn spawn_build(
    ports: SchedulerPorts,
    validator: Validator,
    batch: BatchRecord,
    source: RetrySource,
) {
    let span =
        tracing::info_span!("build_retry_input", batch_id = %batch.id, retry_of = %source.retry_of);
    nightshift_telemetry::propagation::set_parent(&span, crate::pipeline::batch_trace(&batch));
    tokio::spawn(
        async move {
            let mut backoff = RETRY_BASE;
            let outcome = loop {
                match build_input(&ports, &batch, &source).await {
                    Ok(outcome) => break outcome,
                    Err(e) => {
                        tracing::warn!(batch_id = %batch.id, error = %e, retry_in = ?backoff, "could not build the retry's input; retrying");
                        let left = batch.expires_at.saturating_sub(now_unix());
                        if left <= 0 {
                            // the expiry sweep ends it
                            return;
                        }
                        tokio::time::sleep(backoff.min(Duration::from_secs(left.unsigned_abs())))
                            .await;
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            };
            match outcome {
                Built::Ready => validator.spawn(batch),
                Built::Failed(error) => {
                    match ports
                        .metadata
                        .finish_validation(
                            &batch.id,
                            &ValidationOutcome::Failed {
                                errors: vec![error],
                            },
                            now_unix(),
                            validator.quotas(),
                        )
                        .await
                    {
                        Ok(Some(_)) => {
                            ::metrics::counter!(metrics::BATCH_TRANSITIONS, "to" => "failed")
                                .increment(1);
                            tracing::info!(batch_id = %batch.id, "retry batch failed: nothing to run");
                        }
                        Ok(None) => {}
                        // The next start builds (and fails) it again.
                        Err(e) => {
                            tracing::warn!(batch_id = %batch.id, error = %e, "could not fail the retry batch")
                        }
                    }
                }
            }
        }
        .instrument(span),
    );
}

/// Picks up every batch left `validating` (at start): a retry whose input is not built yet is
/// built first, every other batch validated again. Returns how many were picked up.
pub async fn recover(
    ports: &SchedulerPorts,
    validator: &Validator,
) -> Result<usize, nightshift_metadata::MetadataError> {
    let pending = ports
        .metadata
        .batches_with_status(&[BatchStatus::Validating])
        .await?;
    let n = pending.len();
    for batch in pending {
        match ports.metadata.retry_source(&batch.id).await? {
            Some(source) => spawn_build(ports.clone(), validator.clone(), batch, source),
            None => validator.spawn(batch),
        }
    }
    Ok(n)
}

/// How a build ended.
#[derive(Debug)]
enum Built {
    /// The input file exists: validate the batch.
    Ready,
    /// The batch fails with this error (nothing matched, the parent's files are gone).
    Failed(BatchError),
}

fn failed(code: &str, message: String) -> Built {
    Built::Failed(BatchError {
        code: code.to_owned(),
        line: None,
        message,
        param: None,
    })
}

/// The `code` of the error object in an upstream's error body (`{"error": {"code": ...}}`).
#[derive(Deserialize)]
struct ErrorBody {
    error: Option<ErrorObject>,
}

#[derive(Deserialize)]
struct ErrorObject {
    code: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ResponseOnly {
    response: Option<ResponseBodyOnly>,
}

#[derive(Deserialize)]
struct ResponseBodyOnly {
    body: Option<ErrorBody>,
}

/// How a failed line failed, as a filter sees it.
struct Failure {
    status: Option<u16>,
    code: Option<String>,
}

fn selects(filter: &RetryFilter, failure: &Failure) -> bool {
    if filter.is_empty() {
        return true;
    }
    failure
        .code
        .as_ref()
        .is_some_and(|c| filter.error_codes.iter().any(|f| f == c))
        || failure.status.is_some_and(|s| {
            filter.status_codes.contains(&s)
                || filter
                    .status_classes
                    .iter()
                    .any(|c| u16::from(*c) == s / 100)
        })
}

/// How a result line ended: `None` for a success (2xx), else its failure.
fn failure_of(summary: &ResultLineSummary, line: &[u8]) -> Option<Failure> {
    if summary.succeeded {
        return None;
    }
    if let Some(code) = summary.no_response_code {
        return Some(Failure {
            status: None,
            code: Some(code.as_str().to_owned()),
        });
    }
    // An upstream answer with a non-2xx status: its error object may carry a code.
    let code = serde_json::from_slice::<ResponseOnly>(line)
        .ok()
        .and_then(|l| l.response?.body?.error?.code)
        .and_then(|c| match c {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    Some(Failure {
        status: summary.status_code,
        code,
    })
}

/// Lines of a file, as they stream from object storage.
type Lines = BoxStream<'static, Result<JsonlItem, StorageError>>;

/// One result file read line by line, one parsed line in hand.
struct Results {
    name: &'static str,
    lines: Lines,
    head: Option<(ResultLineSummary, Bytes)>,
}

impl Results {
    async fn open(name: &'static str, lines: Lines) -> Result<Self, SchedulerError> {
        let mut r = Self {
            name,
            lines,
            head: None,
        };
        r.advance().await?;
        Ok(r)
    }

    async fn advance(&mut self) -> Result<(), SchedulerError> {
        self.head = None;
        while let Some(item) = self.lines.next().await {
            match item? {
                JsonlItem::Line(line) if line.is_blank() => continue,
                JsonlItem::Line(line) => {
                    let summary = ResultLineSummary::parse(&line.bytes).map_err(|e| {
                        SchedulerError::Malformed(format!(
                            "{} file line {}: {e}",
                            self.name, line.number
                        ))
                    })?;
                    self.head = Some((summary, line.bytes));
                    return Ok(());
                }
                JsonlItem::Oversized(line) => {
                    return Err(SchedulerError::Malformed(format!(
                        "{} file line {} is over {MAX_RESULT_LINE_BYTES} bytes",
                        self.name, line.number
                    )));
                }
            }
        }
        Ok(())
    }

    /// Takes the head if it is the result of `id`: `Some(None)` for a success, `Some(Some)`
    /// for a failure, `None` if the head is another line's (or there is none).
    async fn take(
        &mut self,
        id: &BatchRequestId,
    ) -> Result<Option<Option<Failure>>, SchedulerError> {
        match &self.head {
            Some((summary, line)) if &summary.id == id => {
                let failure = failure_of(summary, line);
                self.advance().await?;
                Ok(Some(failure))
            }
            _ => Ok(None),
        }
    }
}

/// The lines of the object `key`, `NotFound` included.
async fn lines_of(
    ports: &SchedulerPorts,
    key: &str,
    max_line_bytes: usize,
) -> Result<Lines, StorageError> {
    let body = ports.storage.get(key, None).await?;
    Ok(JsonlSplitter::new(max_line_bytes)
        .split_stream(body.stream)
        .boxed())
}

/// Builds the retry batch's input file (unless a previous run did): the parent's input lines
/// whose result failed and matches the filter, in input order. `Err` only for outages (the
/// build runs again); a parent whose files are gone, or a filter matching nothing, is a
/// [`Built::Failed`].
async fn build_input(
    ports: &SchedulerPorts,
    batch: &BatchRecord,
    source: &RetrySource,
) -> Result<Built, SchedulerError> {
    let input_id = FileId::parse(&batch.input_file_id).map_err(|_| {
        SchedulerError::Malformed(format!("retry batch {} has no input id", batch.id))
    })?;
    if ports
        .metadata
        .file_as_of(&batch.tenant_id, &input_id, batch.created_at())
        .await?
        .is_some()
    {
        return Ok(Built::Ready);
    }
    let gone = |what: &str| {
        failed(
            SOURCE_UNAVAILABLE,
            format!(
                "The {what} of batch {} is no longer stored: its failed requests cannot be \
                 read.",
                source.retry_of
            ),
        )
    };
    let Some(parent) = ports.metadata.batch(&source.retry_of).await? else {
        return Ok(gone("record"));
    };
    let Ok(parent_input) = FileId::parse(&parent.input_file_id) else {
        return Ok(gone("input file"));
    };
    let mut input = match lines_of(
        ports,
        &FileRecord::storage_key_for(&parent_input),
        MAX_INPUT_LINE_BYTES,
    )
    .await
    {
        Ok(lines) => lines,
        Err(StorageError::NotFound(_)) => return Ok(gone("input file")),
        Err(e) => return Err(e.into()),
    };
    let mut results = Vec::with_capacity(2);
    for (name, file) in [
        ("output", parent.output_file_id.as_ref()),
        ("error", parent.error_file_id.as_ref()),
    ] {
        let lines = match file {
            None => futures::stream::empty().boxed(),
            Some(file) => {
                match lines_of(
                    ports,
                    &FileRecord::storage_key_for(file),
                    MAX_RESULT_LINE_BYTES,
                )
                .await
                {
                    Ok(lines) => lines,
                    Err(StorageError::NotFound(_)) => {
                        return Ok(gone(&format!("{name} file")));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        results.push(Results::open(name, lines).await?);
    }

    let key = FileRecord::storage_key_for(&input_id);
    let mut upload: Box<dyn ObjectUpload> = ports.storage.upload(&key).await?;
    let copied: Result<(u64, u64), SchedulerError> = async {
        let (mut lines, mut bytes) = (0u64, 0u64);
        while let Some(item) = input.next().await {
            let line = match item? {
                JsonlItem::Line(line) if line.is_blank() => continue,
                JsonlItem::Line(line) => line,
                JsonlItem::Oversized(line) => {
                    return Err(SchedulerError::Malformed(format!(
                        "input line {} of batch {} is over {MAX_INPUT_LINE_BYTES} bytes",
                        line.number, parent.id
                    )));
                }
            };
            let id = BatchRequestId::for_line(parent.id.as_str(), line.number);
            let mut outcome = None;
            for r in &mut results {
                if let Some(o) = r.take(&id).await? {
                    outcome = Some(o);
                    break;
                }
            }
            let selected = match outcome {
                // a success
                Some(None) => false,
                Some(Some(failure)) => selects(&source.filter, &failure),
                // No result at all: the finalizer gives every request one, so this line was
                // lost; only a retry of every failed line takes it.
                None => source.filter.is_empty(),
            };
            if selected {
                let mut out = Vec::with_capacity(line.bytes.len() + 1);
                out.extend_from_slice(&line.bytes);
                out.push(b'\n');
                bytes += out.len() as u64;
                lines += 1;
                upload.write(Bytes::from(out)).await?;
            }
        }
        for r in &results {
            if let Some((summary, _)) = &r.head {
                return Err(SchedulerError::Malformed(format!(
                    "{} file of batch {}: line {} matches no input line in order",
                    r.name,
                    parent.id,
                    summary.id.as_str()
                )));
            }
        }
        Ok((lines, bytes))
    }
    .await;
    let (lines, bytes) = match copied {
        Ok(v) => v,
        Err(e) => {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(key = %key, error = %abort, "could not abort the retry input upload");
            }
            return Err(e);
        }
    };
    if lines == 0 {
        upload.abort().await?;
        return Ok(failed(
            NOTHING_TO_RETRY,
            format!(
                "No failed request of batch {} matches the retry's filter: there is nothing to \
                 retry.",
                parent.id
            ),
        ));
    }
    upload.finish().await?;
    let created_at_us = now_unix_micros();
    let created_at = created_at_us.div_euclid(1_000_000);
    let file = FileRecord {
        id: input_id,
        tenant_id: batch.tenant_id.clone(),
        bytes,
        created_at,
        created_at_us,
        expires_at: Purpose::Batch
            .default_ttl_secs()
            .map(|ttl| created_at + ttl),
        filename: format!("{}_retry.jsonl", parent.id),
        purpose: Purpose::Batch,
        storage_key: key,
    };
    // Built by nightshift, not uploaded: it counts toward the tenant's stored bytes but is
    // never refused (the retry batch was admitted already).
    match ports
        .metadata
        .insert_file_once(&file, None, &Quotas::UNLIMITED)
        .await
    {
        // a concurrent build (a second scheduler) recorded the same bytes first
        Ok(_) | Err(nightshift_metadata::MetadataError::Conflict(_)) => {}
        Err(e) => return Err(e.into()),
    }
    ::metrics::counter!(metrics::FILES_REGISTERED, "purpose" => Purpose::Batch.as_str())
        .increment(1);
    tracing::info!(
        batch_id = %batch.id, retry_of = %parent.id, file_id = %file.id, lines, bytes,
        "retry input built"
    );
    Ok(Built::Ready)
}
