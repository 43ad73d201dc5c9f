//! `GET /v1/batches/{id}/results`: the result lines of a batch, finished so far, as JSONL — an
//! extension (`docs/api.md`, "Results while running"), readable at any status.
//!
//! Where the lines come from depends on the batch's status when the read starts:
//! - **terminal** — its output file, then its error file, streamed as stored: exactly what
//!   `GET /v1/files/{id}/content` gives for each (none for a batch that failed validation);
//! - **validating** — nothing yet (no chunk has run);
//! - **in_progress, finalizing, cancelling** — the result parts executors wrote, in chunk
//!   order (`batches/<id>/parts/<chunk:08>.jsonl`, one per chunk, its lines in line order).
//!   Only *final* lines are shown ([`ResultLineSummary::is_final`]: an upstream answer of any
//!   status, or an error that says what happened to the request). Every later run of a chunk
//!   keeps its part's final lines byte for byte, and the finalizer copies them unchanged into
//!   the output or error file, so every line shown here is in the final files as it was shown.
//!   `batch_cancelled`/`batch_expired` lines are left out while the batch runs: a later run of
//!   their chunk may still execute the request. A part is written whole (never seen half
//!   written), when its chunk is done or its run is cut short (time budget, shutdown), so a
//!   line shows up once its chunk's part — complete or partial — is written, not the moment
//!   its request returns.
//!
//! The race: the finalizer deletes the parts right after it committed the batch. A part that
//! was listed but is gone when read means the batch has ended: the read switches to the final
//! files and skips every line it already sent (by line id), so no line comes twice, and every
//! line the batch has comes once. The ids sent are kept only while parts are read (16 bytes
//! per line sent) — the one thing here that grows with the batch.
//!
//! Memory otherwise: one line at a time (a part is split as it streams, never held whole), a
//! 64 KiB write buffer, and a channel of a few such pieces towards the client; a final file
//! read whole passes through chunk by chunk. A client that stops reading stops the read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use nightshift_core::batch::{BatchRecord, BatchStatus, parts_prefix};
use nightshift_core::file::FileRecord;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter};
use nightshift_core::results::ResultLineSummary;
use nightshift_core::{ApiError, BatchId, ErrorKind, FileId};
use nightshift_proto::v1;
use nightshift_storage::{ObjectStore, StorageError};
use tokio::sync::mpsc;

use crate::AppState;
use crate::auth::Tenant;
use crate::error::{HttpError, HttpResult};

/// Response header: `true` when the batch was terminal as the read began, so the body is
/// exactly its output and error files (as `kind` selects); `false` when it holds the lines
/// finished so far.
pub const FINAL_HEADER: &str = "x-nightshift-results-final";

/// Response header: the batch's status as the read began.
pub const STATUS_HEADER: &str = "x-nightshift-batch-status";

/// Content type of the body: one JSON object per line.
pub const CONTENT_TYPE: &str = "application/jsonl";

/// Longest result line read from a part: the finalizer's own limit
/// (`nightshift_finalizer::DEFAULT_MAX_LINE_BYTES`), which covers every line an executor writes.
const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// Bytes gathered before they are handed to the client: fewer, larger writes.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Pieces in flight towards the client: with [`WRITE_BUFFER_BYTES`], what bounds memory when
/// the client reads slower than storage answers.
const CHANNEL_PIECES: usize = 4;

/// Which lines to send (`?kind=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Output and error lines (the default).
    All,
    /// Successes only: the lines of the output file.
    Output,
    /// Everything else: the lines of the error file.
    Error,
}

impl Kind {
    /// Parses `?kind=`; absent means [`Kind::All`].
    ///
    /// # Errors
    /// A 400 naming `kind` for any other value.
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("all") => Ok(Self::All),
            Some("output") => Ok(Self::Output),
            Some("error") => Ok(Self::Error),
            Some(other) => Err(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "Invalid 'kind': {other:?}. Expected one of \"all\", \"output\", \"error\"."
                ),
            )
            .with_param("kind")
            .with_code("invalid_value")),
        }
    }

    /// Whether a line that succeeded (or not) is wanted.
    fn wants(self, succeeded: bool) -> bool {
        match self {
            Self::All => true,
            Self::Output => succeeded,
            Self::Error => !succeeded,
        }
    }
}

/// The storage keys of a terminal batch's files that `kind` asks for, output first. A file the
/// batch does not have (no success, no failure) is simply absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalFiles {
    pub keys: Vec<String>,
}

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The batch is validating: no result yet.
    Nothing,
    /// The batch runs: read its parts.
    Parts,
    /// The batch is terminal: read these files.
    Final(FinalFiles),
}

/// Looks the batch up again once its parts vanished: its final files if it is terminal now,
/// `None` if it is not (the read then ends with what it sent). An `Err` aborts the response.
pub type Reload =
    Box<dyn FnOnce() -> BoxFuture<'static, Result<Option<FinalFiles>, String>> + Send>;

/// Why a read stopped before its end. The response is then cut off (no clean end of the
/// chunked body), so a client never takes a partial read for a whole one.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client went away: nothing to report.
    #[error("the client stopped reading")]
    Closed,
    #[error("object storage, {context}: {source}")]
    Storage {
        context: String,
        #[source]
        source: StorageError,
    },
    /// A part line is not a result line, or is longer than any executor writes.
    #[error("{0}")]
    Corrupt(String),
    /// Looking the batch up again (after its parts vanished) failed.
    #[error("looking the batch up again: {0}")]
    Reload(String),
}

/// Sends lines to the client in pieces of about [`WRITE_BUFFER_BYTES`].
struct Out {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: BytesMut,
}

impl Out {
    fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>) -> Self {
        Self {
            tx,
            buf: BytesMut::new(),
        }
    }

    async fn line(&mut self, content: &[u8]) -> Result<(), ReadError> {
        self.buf.extend_from_slice(content);
        self.buf.extend_from_slice(b"\n");
        if self.buf.len() >= WRITE_BUFFER_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Bytes as stored (a final file read whole: its lines already end in `\n`).
    async fn raw(&mut self, bytes: Bytes) -> Result<(), ReadError> {
        self.flush().await?;
        self.send(bytes).await
    }

    async fn flush(&mut self) -> Result<(), ReadError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = self.buf.split().freeze();
        self.send(piece).await
    }

    async fn send(&self, bytes: Bytes) -> Result<(), ReadError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.tx.send(Ok(bytes)).await.map_err(|_| ReadError::Closed)
    }
}

/// The ids of the lines sent from parts, so a switch to the final files skips them: a
/// 128-bit hash per line (ids are already 128 bits of a SHA-256; this only makes them fixed
/// size), sorted once when needed.
#[derive(Default)]
struct Sent {
    ids: Vec<u128>,
    sorted: bool,
}

impl Sent {
    fn key(id: &str) -> u128 {
        xxhash_rust::xxh3::xxh3_128(id.as_bytes())
    }

    fn insert(&mut self, id: &str) {
        self.ids.push(Self::key(id));
        self.sorted = false;
    }

    fn contains(&mut self, id: &str) -> bool {
        if !self.sorted {
            self.ids.sort_unstable();
            self.sorted = true;
        }
        self.ids.binary_search(&Self::key(id)).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// One read of a batch's results into `tx`; see the [module docs](self).
pub struct ResultsRead {
    pub storage: Arc<dyn ObjectStore>,
    pub batch: BatchId,
    pub kind: Kind,
}

impl ResultsRead {
    /// Sends every wanted line from `start` (switching to the final files through `reload` if
    /// the parts vanish mid-read), then returns. Each line is sent whole or not at all.
    ///
    /// # Errors
    /// See [`ReadError`]; the caller cuts the response off.
    pub async fn run(
        &self,
        start: Start,
        reload: Reload,
        tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) -> Result<(), ReadError> {
        let mut out = Out::new(tx);
        match start {
            Start::Nothing => {}
            Start::Final(files) => self.send_final(&files, None, &mut out).await?,
            Start::Parts => {
                let mut sent = Sent::default();
                if !self.send_parts(&mut sent, &mut out).await? {
                    match reload().await.map_err(ReadError::Reload)? {
                        Some(files) => self.send_final(&files, Some(&mut sent), &mut out).await?,
                        None => tracing::warn!(
                            batch_id = %self.batch,
                            "a result part vanished but the batch is not terminal"
                        ),
                    }
                }
            }
        }
        out.flush().await
    }

    /// Sends the final lines of every part; `false` when a listed part is gone (the batch was
    /// finalized meanwhile).
    async fn send_parts(&self, sent: &mut Sent, out: &mut Out) -> Result<bool, ReadError> {
        let prefix = parts_prefix(&self.batch);
        let parts = self
            .storage
            .list(&prefix)
            .await
            .map_err(|source| ReadError::Storage {
                context: format!("listing {prefix}"),
                source,
            })?;
        for part in parts {
            let body = match self.storage.get(&part.key, None).await {
                Ok(body) => body,
                Err(StorageError::NotFound(_)) => return Ok(false),
                Err(source) => {
                    return Err(ReadError::Storage {
                        context: format!("reading {}", part.key),
                        source,
                    });
                }
            };
            let mut lines =
                std::pin::pin!(JsonlSplitter::new(MAX_LINE_BYTES).split_stream(body.stream));
            while let Some(item) = lines.next().await {
                let line = match item.map_err(|source| ReadError::Storage {
                    context: format!("reading {}", part.key),
                    source,
                })? {
                    JsonlItem::Line(line) if line.is_blank() => continue,
                    JsonlItem::Line(line) => line,
                    JsonlItem::Oversized(o) => {
                        return Err(ReadError::Corrupt(format!(
                            "line {} of {} is longer than {MAX_LINE_BYTES} bytes",
                            o.number, part.key
                        )));
                    }
                };
                let summary = ResultLineSummary::parse(&line.bytes).map_err(|e| {
                    ReadError::Corrupt(format!(
                        "line {} of {} is not a result line: {e}",
                        line.number, part.key
                    ))
                })?;
                if !summary.is_final() || !self.kind.wants(summary.succeeded) {
                    continue;
                }
                sent.insert(summary.id.as_str());
                out.line(&line.bytes).await?;
            }
        }
        Ok(true)
    }

    /// Sends the final files; with `skip`, every line whose id it holds is left out (and the
    /// files are split into lines to check), else they pass through as stored.
    async fn send_final(
        &self,
        files: &FinalFiles,
        mut skip: Option<&mut Sent>,
        out: &mut Out,
    ) -> Result<(), ReadError> {
        for key in &files.keys {
            let body = self
                .storage
                .get(key, None)
                .await
                .map_err(|source| ReadError::Storage {
                    context: format!("reading {key}"),
                    source,
                })?;
            let storage_error = |source| ReadError::Storage {
                context: format!("reading {key}"),
                source,
            };
            match skip.as_deref_mut().filter(|s| !s.is_empty()) {
                None => {
                    let mut stream = body.stream;
                    while let Some(piece) = stream.next().await {
                        out.raw(piece.map_err(storage_error)?).await?;
                    }
                }
                Some(sent) => {
                    let mut lines = std::pin::pin!(
                        JsonlSplitter::new(MAX_LINE_BYTES).split_stream(body.stream)
                    );
                    while let Some(item) = lines.next().await {
                        let line = match item.map_err(storage_error)? {
                            JsonlItem::Line(line) if line.is_blank() => continue,
                            JsonlItem::Line(line) => line,
                            JsonlItem::Oversized(o) => {
                                return Err(ReadError::Corrupt(format!(
                                    "line {} of {key} is longer than {MAX_LINE_BYTES} bytes",
                                    o.number
                                )));
                            }
                        };
                        let summary = ResultLineSummary::parse(&line.bytes).map_err(|e| {
                            ReadError::Corrupt(format!(
                                "line {} of {key} is not a result line: {e}",
                                line.number
                            ))
                        })?;
                        if !sent.contains(summary.id.as_str()) {
                            out.line(&line.bytes).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The storage keys of the files `kind` asks for, of a terminal batch; a file its owner
/// deleted (or that expired) is a 404, since its lines are no longer the tenant's to read.
async fn final_files(
    state: &AppState,
    tenant_id: &str,
    batch: &BatchRecord,
    kind: Kind,
) -> Result<FinalFiles, ApiError> {
    let wanted: [(bool, &Option<FileId>, &str); 2] = [
        (kind != Kind::Error, &batch.output_file_id, "output"),
        (kind != Kind::Output, &batch.error_file_id, "error"),
    ];
    let mut keys = Vec::new();
    for (want, id, which) in wanted {
        let Some(id) = id.as_ref().filter(|_| want) else {
            continue;
        };
        let file = state
            .control
            .files()
            .get_file(v1::GetFileRequest {
                tenant_id: tenant_id.to_owned(),
                id: id.to_string(),
            })
            .await
            .map_err(|status| {
                let e = nightshift_proto::api_error_from_status(&status);
                if e.kind == ErrorKind::NotFound {
                    ApiError::new(
                        ErrorKind::NotFound,
                        format!(
                            "The {which} file {id} of batch {} was deleted or has expired: its \
                             results are no longer available.",
                            batch.id
                        ),
                    )
                    .with_param("id")
                } else {
                    e
                }
            })?
            .into_inner();
        keys.push(FileRecord::try_from(file)?.storage_key);
    }
    Ok(FinalFiles { keys })
}

/// `GET /v1/batches/{id}/results`.
#[utoipa::path(
    get,
    path = "/batches/{id}/results",
    tag = "Batches",
    operation_id = "batchResults",
    summary = "Stream the result lines finished so far (extension)",
    description = "A nightshift extension. JSONL: one result line (the output and error files' \
                   shape) per finished request, at any status. While the batch runs: the final \
                   lines of the chunks whose result part is written, in chunk order, each \
                   exactly as it will be in the output or error file (`batch_cancelled` and \
                   `batch_expired` lines only once the batch has ended). Once it is terminal: \
                   its output file then its error file, as stored.",
    params(
        ("id" = String, Path, description = "The batch's id (`batch_…`)."),
        ("kind" = Option<String>, Query, description = "`all` (default), `output` (successes: output-file lines) or `error` (error-file lines)."),
    ),
    responses(
        (status = 200, description = "The lines, as JSONL.", content_type = "application/jsonl", body = String,
         headers(
             ("x-nightshift-results-final" = String, description = "`true`: the batch was terminal when the read began and the body is its output and error files; `false`: the lines finished so far."),
             ("x-nightshift-batch-status" = String, description = "The batch's status when the read began."),
         )),
        (status = 400, description = "A bad `kind` or an unknown query parameter.", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such batch, or another tenant's; or a terminal batch whose requested result file was deleted or has expired.", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn results(
    State(state): State<AppState>,
    tenant: Tenant,
    Path(id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> HttpResult<Response> {
    let Query(q) = query.map_err(|e| {
        HttpError(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Invalid query string: {}", e.body_text()),
        ))
    })?;
    if let Some(name) = q.keys().find(|k| k.as_str() != "kind") {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Unrecognized query parameter: {name}"),
        )
        .with_param(name.as_str())
        .with_code("unknown_parameter")
        .into());
    }
    let kind = Kind::parse(q.get("kind").map(String::as_str))?;
    let tenant_id = tenant.id.to_string();
    let batch = get_batch(&state, &tenant_id, &id).await?;
    tracing::Span::current().record("batch_id", batch.id.as_str());
    let start = match batch.status {
        s if s.is_terminal() => Start::Final(final_files(&state, &tenant_id, &batch, kind).await?),
        BatchStatus::Validating => Start::Nothing,
        _ => Start::Parts,
    };
    let is_final = matches!(start, Start::Final(_));
    let reload: Reload = {
        let (state, id) = (state.clone(), id.clone());
        Box::new(move || {
            Box::pin(async move {
                let batch = get_batch(&state, &tenant_id, &id)
                    .await
                    .map_err(|e| e.0.message)?;
                if !batch.status.is_terminal() {
                    return Ok(None);
                }
                final_files(&state, &tenant_id, &batch, kind)
                    .await
                    .map(Some)
                    .map_err(|e| e.message)
            })
        })
    };
    let read = ResultsRead {
        storage: state.storage.clone(),
        batch: batch.id.clone(),
        kind,
    };
    let (tx, mut rx) = mpsc::channel(CHANNEL_PIECES);
    tokio::spawn(async move {
        let failed = tx.clone();
        match read.run(start, reload, tx).await {
            Ok(()) | Err(ReadError::Closed) => {}
            Err(e) => {
                tracing::error!(batch_id = %read.batch, error = %e, "reading a batch's results failed");
                // The body ends in an error: the client sees a cut-off response, not a short one.
                let _ = failed.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .header(
            FINAL_HEADER,
            HeaderValue::from_static(if is_final { "true" } else { "false" }),
        )
        .header(STATUS_HEADER, batch.status.as_str())
        .body(body)
        .map_err(|e| ApiError::internal(format!("building the response: {e}")).into())
}

async fn get_batch(state: &AppState, tenant_id: &str, id: &str) -> HttpResult<BatchRecord> {
    let batch = state
        .control
        .batches()
        .get_batch(v1::GetBatchRequest {
            tenant_id: tenant_id.to_owned(),
            id: id.to_owned(),
        })
        .await?
        .into_inner();
    Ok(BatchRecord::try_from(batch)?)
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use nightshift_core::batch::part_key;
    use nightshift_core::results::BatchRequestId;
    use nightshift_storage::{ByteRange, LocalStore, ObjectBody, ObjectMeta, ObjectUpload};

    use super::*;

    const BATCH: &str = "batch_results_test";

    fn batch() -> BatchId {
        BatchId::parse(BATCH).expect("batch id")
    }

    /// A result line of input line `n`: a 200 with usage, an upstream 400, or an error line.
    fn line(n: u64, outcome: &str) -> String {
        let id = BatchRequestId::for_line(BATCH, n);
        match outcome {
            "ok" => format!(
                r#"{{"id":"{id}","custom_id":"c{n}","response":{{"status_code":200,"request_id":"r{n}","body":{{"usage":{{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}}}},"error":null}}"#
            ),
            "400" => format!(
                r#"{{"id":"{id}","custom_id":"c{n}","response":{{"status_code":400,"request_id":"r{n}","body":{{"error":{{"message":"no"}}}}}},"error":null}}"#
            ),
            code => format!(
                r#"{{"id":"{id}","custom_id":"c{n}","response":null,"error":{{"code":"{code}","message":"m"}}}}"#
            ),
        }
    }

    fn jsonl(lines: &[String]) -> Bytes {
        Bytes::from(lines.iter().map(|l| format!("{l}\n")).collect::<String>())
    }

    async fn store() -> (tempfile::TempDir, Arc<LocalStore>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path()).await.expect("store");
        (dir, Arc::new(store))
    }

    async fn read(
        storage: Arc<dyn ObjectStore>,
        kind: Kind,
        start: Start,
        reload: Option<FinalFiles>,
    ) -> Result<Vec<String>, ReadError> {
        let read = ResultsRead {
            storage,
            batch: batch(),
            kind,
        };
        let (tx, mut rx) = mpsc::channel(CHANNEL_PIECES);
        let reload: Reload = Box::new(move || Box::pin(async move { Ok(reload) }));
        let (run, body) = tokio::join!(read.run(start, reload, tx), async move {
            let mut body = Vec::new();
            while let Some(piece) = rx.recv().await {
                body.extend_from_slice(&piece.expect("piece"));
            }
            body
        });
        run?;
        let text = String::from_utf8(body).expect("utf-8");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "a torn last line: {text}"
        );
        Ok(text.lines().map(str::to_owned).collect())
    }

    #[test]
    fn kind_parses_its_three_values_and_names_itself_otherwise() {
        assert_eq!(Kind::parse(None).unwrap(), Kind::All);
        assert_eq!(Kind::parse(Some("all")).unwrap(), Kind::All);
        assert_eq!(Kind::parse(Some("output")).unwrap(), Kind::Output);
        assert_eq!(Kind::parse(Some("error")).unwrap(), Kind::Error);
        let e = Kind::parse(Some("errors")).unwrap_err();
        assert_eq!(e.kind.http_status(), 400);
        assert_eq!(e.param.as_deref(), Some("kind"));
    }

    #[tokio::test]
    async fn parts_give_their_final_lines_in_chunk_order_filtered_by_kind() {
        let (_dir, storage) = store().await;
        let b = batch();
        // chunk 1 is partial (line 5 not run yet), chunk 0 complete with a cancelled line.
        let part0 = [line(1, "ok"), line(2, "400"), line(3, "batch_cancelled")];
        let part1 = [line(4, "request_timeout"), line(6, "ok")];
        storage.put(&part_key(&b, 1), jsonl(&part1)).await.unwrap();
        storage.put(&part_key(&b, 0), jsonl(&part0)).await.unwrap();
        // another batch's parts are not this one's
        let other = BatchId::parse("batch_other").unwrap();
        storage
            .put(&part_key(&other, 0), jsonl(&[line(9, "ok")]))
            .await
            .unwrap();

        let all = read(storage.clone(), Kind::All, Start::Parts, None)
            .await
            .unwrap();
        assert_eq!(all, [&*part0[0], &part0[1], &part1[0], &part1[1]]);
        let output = read(storage.clone(), Kind::Output, Start::Parts, None)
            .await
            .unwrap();
        assert_eq!(output, [&*part0[0], &part1[1]]);
        let error = read(storage.clone(), Kind::Error, Start::Parts, None)
            .await
            .unwrap();
        assert_eq!(error, [&*part0[1], &part1[0]]);
        let nothing = read(storage, Kind::All, Start::Nothing, None)
            .await
            .unwrap();
        assert!(nothing.is_empty());
    }

    #[tokio::test]
    async fn a_terminal_batch_gives_its_files_as_stored() {
        let (_dir, storage) = store().await;
        let out = jsonl(&[line(1, "ok"), line(3, "ok")]);
        let err = jsonl(&[line(2, "batch_expired")]);
        storage.put("files/out", out.clone()).await.unwrap();
        storage.put("files/err", err.clone()).await.unwrap();
        let files = FinalFiles {
            keys: vec!["files/out".into(), "files/err".into()],
        };
        let all = read(storage.clone(), Kind::All, Start::Final(files), None)
            .await
            .unwrap();
        let expected: Vec<String> = String::from_utf8([out, err].concat())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(all, expected);
    }

    #[tokio::test]
    async fn a_broken_part_cuts_the_read_off() {
        let (_dir, storage) = store().await;
        let b = batch();
        storage
            .put(
                &part_key(&b, 0),
                Bytes::from_static(b"{\"not\":\"a result\"}\n"),
            )
            .await
            .unwrap();
        let e = read(storage, Kind::All, Start::Parts, None)
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Corrupt(_)), "{e}");
    }

    /// The real store, except that the first read of `vanish_at` finds the finalizer has just
    /// deleted every part (as it does right after its commit).
    #[derive(Debug)]
    struct FinalizedMidRead {
        inner: Arc<LocalStore>,
        vanish_at: String,
    }

    #[async_trait]
    impl ObjectStore for FinalizedMidRead {
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
            if key == self.vanish_at {
                self.inner.delete_prefix(&parts_prefix(&batch())).await?;
            }
            self.inner.get(key, range).await
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

    #[tokio::test]
    async fn parts_vanishing_mid_read_switch_to_the_final_files_without_a_repeat() {
        let (_dir, local) = store().await;
        let b = batch();
        // chunk 0 done, chunk 1 partial (line 4 final, line 5 still to run), chunk 2 done
        let part0 = [line(1, "ok"), line(2, "400")];
        let part1 = [line(4, "ok")];
        let part2 = [line(7, "ok"), line(8, "ok")];
        local.put(&part_key(&b, 0), jsonl(&part0)).await.unwrap();
        local.put(&part_key(&b, 1), jsonl(&part1)).await.unwrap();
        local.put(&part_key(&b, 2), jsonl(&part2)).await.unwrap();
        // the finalizer's files: the parts' lines, chunk 1 finished by a later run, and
        // chunk 1's line 3 and 6 never run (the batch expired)
        let output = [
            line(1, "ok"),
            line(4, "ok"),
            line(5, "ok"),
            line(7, "ok"),
            line(8, "ok"),
        ];
        let error = [
            line(2, "400"),
            line(3, "batch_expired"),
            line(6, "batch_expired"),
        ];
        local.put("files/out", jsonl(&output)).await.unwrap();
        local.put("files/err", jsonl(&error)).await.unwrap();
        let files = FinalFiles {
            keys: vec!["files/out".into(), "files/err".into()],
        };
        for kind in [Kind::All, Kind::Output, Kind::Error] {
            // restore the parts the previous round's finalizer deleted
            local.put(&part_key(&b, 0), jsonl(&part0)).await.unwrap();
            local.put(&part_key(&b, 1), jsonl(&part1)).await.unwrap();
            local.put(&part_key(&b, 2), jsonl(&part2)).await.unwrap();
            let storage = Arc::new(FinalizedMidRead {
                inner: local.clone(),
                vanish_at: part_key(&b, 2),
            });
            let files = FinalFiles {
                keys: match kind {
                    Kind::All => files.keys.clone(),
                    Kind::Output => vec!["files/out".into()],
                    Kind::Error => vec!["files/err".into()],
                },
            };
            let got = read(storage, kind, Start::Parts, Some(files))
                .await
                .unwrap();
            // parts 0 and 1 as read, then the final files without what was sent
            let sent: Vec<&String> = part0
                .iter()
                .chain(&part1)
                .filter(|l| kind.wants(ResultLineSummary::parse(l.as_bytes()).unwrap().succeeded))
                .collect();
            let mut expected: Vec<&String> = sent.clone();
            let finals: Vec<&String> = match kind {
                Kind::All => output.iter().chain(&error).collect(),
                Kind::Output => output.iter().collect(),
                Kind::Error => error.iter().collect(),
            };
            expected.extend(finals.iter().filter(|l| !sent.contains(l)));
            assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{kind:?}");
            // exactly the final files' lines, each once
            let mut got_sorted = got.clone();
            got_sorted.sort();
            let mut finals_sorted: Vec<String> = finals.into_iter().cloned().collect();
            finals_sorted.sort();
            assert_eq!(got_sorted, finals_sorted, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn vanished_parts_of_a_batch_not_yet_terminal_end_the_read_with_what_was_sent() {
        let (_dir, local) = store().await;
        let b = batch();
        let part0 = [line(1, "ok")];
        local.put(&part_key(&b, 0), jsonl(&part0)).await.unwrap();
        local
            .put(&part_key(&b, 1), jsonl(&[line(2, "ok")]))
            .await
            .unwrap();
        let storage = Arc::new(FinalizedMidRead {
            inner: local,
            vanish_at: part_key(&b, 1),
        });
        let got = read(storage, Kind::All, Start::Parts, None).await.unwrap();
        assert_eq!(got, part0);
    }
}
