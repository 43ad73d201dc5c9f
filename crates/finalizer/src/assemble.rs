//! Assembling a batch's output and error files from its result parts.
//!
//! [`finalize`] walks the plan's chunks in index order:
//! - a **done** chunk has exactly one result part (`part_key(batch, index)`), holding one
//!   result line per request of the chunk, successes and failures mixed, in line order. It is
//!   read with one GET and split into lines; each line goes to the output file if it is a
//!   success (a response with a 2xx status), to the error file otherwise. Counts and usage are
//!   recomputed from these lines: they are the authoritative numbers, Redis only a live view.
//!   Unless the chunk has a [`PartTally`] without a failed line (the common case): then the
//!   part is all output lines, and its bytes are copied to the output file as they arrive,
//!   unparsed, while their CRC-32, size and line breaks are counted; the tally's counts and
//!   usage are taken. If the bytes read are not the bytes the tally describes (another run of
//!   the chunk rewrote the part after the report that made it done), the assembly is
//!   abandoned and runs again from the start without trusting any tally — an output file
//!   being streamed cannot take back the lines already copied;
//! - a chunk that is **not done** did not finish: it never ran (the batch was cancelled or
//!   expired before it was handed out), it ran in part (a run cut short by its time budget, a
//!   shutdown, or the ending's grace period), or it was given up (failed). It may have a part
//!   holding *some* of its result lines, in line order, each with the id
//!   [`BatchRequestId::for_line`] of its line; a missing part means no line has a result. Its
//!   byte range of the input is streamed alongside its part (both in line order, one line of
//!   each in hand): each request line takes its part line when the part's next line has its
//!   id (and its `custom_id`), otherwise it becomes the error line
//!   [`FinalizePlan::missing_result`] names — `chunk_failed` with the chunk's failure message
//!   for a failed chunk, else `batch_cancelled` / `batch_expired` — carrying the line's
//!   `custom_id` and the id an executor would have given it. So every request gets exactly one
//!   line, whatever the part holds; a part line that matches no request (out of order, a
//!   duplicate, another chunk's) fails the assembly rather than being dropped.
//!
//! Both files are streamed to object storage (multipart uploads, see
//! [`ObjectStore::upload`]) under `files/<id>`, where the id is
//! [`ResultFile::file_id`] — derived from the batch id, so that running the assembly again
//! (after a crash, a redelivered job) overwrites the same objects and the commit names the same
//! files. An upload starts only when its first line arrives: a file with no line is not created
//! (an all-failed batch has no output file, a batch without failures no error file).
//!
//! Every line written ends in `\n` (a `\r\n` in a part becomes `\n`); blank lines are dropped.
//! Nothing is ever dropped silently otherwise: a done chunk's missing part, an unreadable line,
//! a part line of an unfinished chunk that matches no request, or a done chunk's part or an
//! input range whose line count differs from the chunk's fails the whole assembly, and nothing
//! becomes visible (both uploads are abandoned).
//!
//! Line length: every line read, of a part or of the input, must fit `max_line_bytes`; see
//! [`AssembleSettings::max_line_bytes`] for why the default covers every result line an
//! executor writes (an upstream answer is at most `max_response_bytes`).
//!
//! The GETs of done chunks' parts are sent a few ahead ([`PARTS_AHEAD`]), so that a batch of
//! many small parts does not wait one storage round trip per chunk; their bytes are read in
//! chunk order all the same.
//!
//! Memory: one line (at most `max_line_bytes`) of a part and one of the input, the byte-stream
//! chunks in hand (of the parts asked ahead too: what their connections buffered), a small
//! write buffer per file, and the storage adapter's upload buffers — never a whole part or
//! file.

use std::borrow::Cow;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use nightshift_core::FileId;
use nightshift_core::batch::{PartTally, ResultFile, part_key};
use nightshift_core::file::FileRecord;
use nightshift_core::jsonl::{JsonlItem, JsonlSplitter, Line};
use nightshift_core::results::{BatchRequestId, ResultLine, ResultLineSummary, Usage};
use nightshift_storage::{
    ByteRange, ByteStream, ObjectBody, ObjectStore, ObjectUpload, StorageError,
};
use serde::Deserialize;

use crate::metrics;
use crate::plan::{FinalizePlan, MissingResult, PlannedChunk};

/// Bytes gathered per file before they are handed to the upload: fewer, larger writes.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Done chunks' parts asked for at once: the one being copied and the next ones.
const PARTS_AHEAD: usize = 4;

/// How [`finalize`] reads its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssembleSettings {
    /// Longest line accepted, in a result part or in the input (terminator excluded). A longer
    /// line fails the assembly, so it must be at least the scheduler's input line limit and
    /// the longest result line executors write. The longest result line is an upstream body
    /// (kept verbatim; at most the upstream's `max_response_bytes`, default 16 MiB, else the
    /// line is a short `response_too_large` error) plus its envelope: the id, the
    /// `custom_id` (at most an input line, 16 MiB by default), the request id and a few keys.
    /// The default, 64 MiB, covers 16 + 16 MiB and the envelope with room to spare; raise it
    /// with `max_response_bytes` or the input line limit (see [`DEFAULT_MAX_LINE_BYTES`]).
    pub max_line_bytes: usize,
}

/// The default [`AssembleSettings::max_line_bytes`]: 64 MiB, at least
/// `max_response_bytes` (16 MiB by default) + the input line limit (16 MiB by default) + the
/// envelope of a result line.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

impl Default for AssembleSettings {
    fn default() -> Self {
        Self {
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

/// A result file written to object storage (not yet registered: the commit does that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedFile {
    /// [`ResultFile::file_id`] of the batch; its bytes are at
    /// [`FileRecord::storage_key_for`] of it.
    pub id: FileId,
    /// Size of the stored object.
    pub bytes: u64,
    /// Lines in it (each ending in `\n`).
    pub lines: u64,
}

/// What [`finalize`] produced: the files and the numbers the commit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFiles {
    /// The output file (successes), or `None` when no request succeeded.
    pub output: Option<ProducedFile>,
    /// The error file (failures and requests that never ran), or `None` when there is none.
    pub error: Option<ProducedFile>,
    /// Output lines: `request_counts.completed`.
    pub completed: u64,
    /// Error lines: `request_counts.failed`.
    pub failed: u64,
    /// Usage summed over the successful responses.
    pub usage: Usage,
}

/// Why a batch's files could not be assembled. Nothing was made visible; running again is safe
/// (and may succeed if the cause was transient, e.g. [`FinalizeError::Storage`]).
#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    /// A done chunk has no result part: its lines would be lost.
    #[error("the result part {key} of done chunk {chunk} is missing")]
    MissingPart { chunk: u32, key: String },
    /// A chunk is neither done nor failed, yet the batch ends `completed` (a scheduler bug).
    #[error("chunk {chunk} is neither done nor failed, but the batch ends completed")]
    UnfinishedInCompletedBatch { chunk: u32 },
    /// A line of a result part is not a result line.
    #[error("line {line} of the result part of chunk {chunk} is not a result line: {reason}")]
    CorruptPart {
        chunk: u32,
        line: u64,
        reason: String,
    },
    /// A request line of the input (of a chunk that is not done) has no readable `custom_id`.
    #[error("input line {line} (chunk {chunk}) has no readable custom_id: {reason}")]
    CorruptInput {
        chunk: u32,
        line: u64,
        reason: String,
    },
    /// A line is longer than [`AssembleSettings::max_line_bytes`].
    #[error("line {line} of the {what} of chunk {chunk} is longer than max_line_bytes ({max})")]
    LineTooLong {
        chunk: u32,
        what: &'static str,
        line: u64,
        max: usize,
    },
    /// A done chunk's part is not the part its [`PartTally`] describes: another run of the
    /// chunk rewrote it. [`finalize`] then assembles again without trusting tallies; never
    /// returned by it.
    #[error(
        "the result part {key} of chunk {chunk} is not the one its tally describes \
         ({bytes} bytes, CRC-32 {crc32:08x}; the tally says {tally_bytes} bytes, {tally_crc32:08x})"
    )]
    PartRewritten {
        chunk: u32,
        key: String,
        bytes: u64,
        crc32: u32,
        tally_bytes: u64,
        tally_crc32: u32,
    },
    /// A part or input range does not hold as many lines as the chunk has requests.
    #[error("chunk {chunk} has {expected} requests but its {what} holds {found} lines")]
    LineCount {
        chunk: u32,
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// Object storage failed (reading a part or the input, or writing a file).
    #[error("object storage, {context}: {source}")]
    Storage {
        context: String,
        #[source]
        source: StorageError,
    },
}

impl FinalizeError {
    /// Object storage itself failed (unreachable, 5xx...): running again later will work, and
    /// it is not the job's fault. A missing object or an unusable range is not an outage.
    pub fn is_storage_outage(&self) -> bool {
        matches!(
            self,
            Self::Storage {
                source: StorageError::Backend(_),
                ..
            }
        )
    }

    fn storage(context: impl Into<String>) -> impl FnOnce(StorageError) -> Self {
        let context = context.into();
        move |source| Self::Storage { context, source }
    }
}

/// Assembles the output and error files of `plan`'s batch and returns what to commit.
///
/// Contract: reads exactly one part per done chunk (asked for a few ahead), and the input range
/// and the part (if any) of each chunk that is not done, in chunk order; writes
/// `files/<output id>` and `files/<error id>` (each only if it has a line), overwriting what an
/// earlier attempt left there. A part found rewritten since its tally (see the module docs)
/// makes it assemble once more, from the start, reading every part line by line. On error the
/// unfinished uploads are aborted, so nothing half-written is ever visible — only, if
/// completing the error file is what failed, a complete output file, which the next attempt
/// rewrites identically. Objects of an earlier attempt stay until overwritten.
pub async fn finalize(
    plan: &FinalizePlan,
    storage: &dyn ObjectStore,
    settings: AssembleSettings,
) -> Result<BatchFiles, FinalizeError> {
    match assemble(plan, storage, settings, Tallies::Trusted).await {
        Err(FinalizeError::PartRewritten {
            chunk,
            key,
            bytes,
            tally_bytes,
            ..
        }) => {
            ::metrics::counter!(metrics::PARTS_READ, metrics::LABEL_READ => metrics::READ_REWRITTEN)
                .increment(1);
            tracing::warn!(
                batch_id = %plan.batch().id, chunk, key, bytes, tally_bytes,
                "a result part was rewritten after its chunk was done (another run of the chunk): \
                 assembling again, reading every part line by line"
            );
            assemble(plan, storage, settings, Tallies::Ignored).await
        }
        other => other,
    }
}

/// Whether an assembly copies the parts whose tally has no failed line unparsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tallies {
    Trusted,
    Ignored,
}

async fn assemble(
    plan: &FinalizePlan,
    storage: &dyn ObjectStore,
    settings: AssembleSettings,
    tallies: Tallies,
) -> Result<BatchFiles, FinalizeError> {
    let batch = &plan.batch().id;
    let mut assembly = Assembly {
        storage,
        settings,
        tallies,
        output: ResultWriter::new(ResultFile::Output.file_id(batch)),
        error: ResultWriter::new(ResultFile::Error.file_id(batch)),
        usage: Usage::default(),
    };
    let walked = assembly.walk(plan).await;
    let Assembly {
        output,
        error,
        usage,
        ..
    } = assembly;
    if let Err(e) = walked {
        output.abort().await;
        error.abort().await;
        return Err(e);
    }
    let output = match output.finish().await {
        Ok(file) => file,
        Err(e) => {
            error.abort().await;
            return Err(e);
        }
    };
    let error = error.finish().await?;
    for (file, label) in [(&output, "output"), (&error, "error")] {
        if let Some(f) = file {
            ::metrics::counter!(metrics::LINES_WRITTEN, metrics::LABEL_FILE => label)
                .increment(f.lines);
        }
    }
    Ok(BatchFiles {
        completed: output.as_ref().map_or(0, |f| f.lines),
        failed: error.as_ref().map_or(0, |f| f.lines),
        output,
        error,
        usage,
    })
}

/// One assembly in progress.
struct Assembly<'a> {
    storage: &'a dyn ObjectStore,
    settings: AssembleSettings,
    tallies: Tallies,
    output: ResultWriter,
    error: ResultWriter,
    /// Usage of the successes so far.
    usage: Usage,
}

impl Assembly<'_> {
    async fn walk(&mut self, plan: &FinalizePlan) -> Result<(), FinalizeError> {
        let batch = &plan.batch().id;
        let storage = self.storage;
        // Done chunks' parts are asked for a few ahead: each GET is a round trip to object
        // storage, and a batch of small parts would otherwise spend its finalization waiting.
        let keys: Vec<String> = plan
            .chunks()
            .iter()
            .filter(|c| c.done)
            .map(|c| part_key(batch, c.span.index))
            .collect();
        let parts = futures::stream::iter(keys)
            .map(|key| get_part(storage, key))
            .buffered(PARTS_AHEAD);
        let mut parts = std::pin::pin!(parts);
        for chunk in plan.chunks() {
            if chunk.done {
                let Some((key, got)) = parts.next().await else {
                    // One GET per done chunk, in the same order: never short.
                    return Err(FinalizeError::MissingPart {
                        chunk: chunk.span.index,
                        key: part_key(batch, chunk.span.index),
                    });
                };
                self.copy_part(chunk, key, got).await?;
            } else {
                // FinalizePlan::new already refuses an unfinished chunk in a completed batch.
                let missing = plan.missing_result(chunk).ok_or(
                    FinalizeError::UnfinishedInCompletedBatch {
                        chunk: chunk.span.index,
                    },
                )?;
                self.merge_unfinished(plan, chunk, missing).await?;
            }
        }
        Ok(())
    }

    /// Sorts the lines of a done chunk's part into the two files.
    async fn copy_part(
        &mut self,
        chunk: &PlannedChunk,
        key: String,
        got: Result<ObjectBody, StorageError>,
    ) -> Result<(), FinalizeError> {
        let index = chunk.span.index;
        let body = match got {
            Ok(body) => body,
            Err(StorageError::NotFound(_)) => {
                return Err(FinalizeError::MissingPart { chunk: index, key });
            }
            Err(e) => return Err(FinalizeError::storage(format!("reading {key}"))(e)),
        };
        if let Some(tally) = chunk.part
            && self.tallies == Tallies::Trusted
            && tally.failed == 0
        {
            return self.copy_verbatim(chunk, &key, body.stream, &tally).await;
        }
        ::metrics::counter!(metrics::PARTS_READ, metrics::LABEL_READ => metrics::READ_PARSED)
            .increment(1);
        let lines = JsonlSplitter::new(self.settings.max_line_bytes).split_stream(body.stream);
        let mut lines = std::pin::pin!(lines);
        let mut found = 0u64;
        while let Some(item) = lines.next().await {
            let item = item.map_err(FinalizeError::storage(format!("reading {key}")))?;
            let line = self.line_of(item, index, "result part")?;
            if line.is_blank() {
                continue;
            }
            found += 1;
            let summary =
                ResultLineSummary::parse(&line.bytes).map_err(|e| FinalizeError::CorruptPart {
                    chunk: index,
                    line: line.number,
                    reason: e.to_string(),
                })?;
            self.write_part_line(&line.bytes, &summary).await?;
        }
        check_count(chunk, "result part", found)
    }

    /// Copies the part of a done chunk whose tally says every line is a success to the output
    /// file as it is read, checking that it is the part the tally describes (its size and
    /// CRC-32) and that it holds a line per request (its line breaks: the executor ends every
    /// line with one and writes no blank line).
    async fn copy_verbatim(
        &mut self,
        chunk: &PlannedChunk,
        key: &str,
        mut body: ByteStream,
        tally: &PartTally,
    ) -> Result<(), FinalizeError> {
        let mut crc = crc32fast::Hasher::new();
        let mut bytes = 0u64;
        let mut breaks = 0u64;
        let mut last = None;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(FinalizeError::storage(format!("reading {key}")))?;
            if piece.is_empty() {
                continue;
            }
            crc.update(&piece);
            bytes += piece.len() as u64;
            let ended = memchr::memchr_iter(b'\n', &piece).count() as u64;
            breaks += ended;
            last = piece.last().copied();
            self.output.write_lines(self.storage, &piece, ended).await?;
        }
        let crc32 = crc.finalize();
        if (bytes, crc32) != (tally.bytes, tally.crc32) {
            return Err(FinalizeError::PartRewritten {
                chunk: chunk.span.index,
                key: key.to_owned(),
                bytes,
                crc32,
                tally_bytes: tally.bytes,
                tally_crc32: tally.crc32,
            });
        }
        if last != Some(b'\n') {
            return Err(FinalizeError::CorruptPart {
                chunk: chunk.span.index,
                line: breaks + 1,
                reason: "the part does not end with a line break".into(),
            });
        }
        check_count(chunk, "result part", breaks)?;
        if tally.completed != breaks {
            return Err(FinalizeError::CorruptPart {
                chunk: chunk.span.index,
                line: breaks,
                reason: format!(
                    "its tally counts {} successes and no failure, but it holds {breaks} lines",
                    tally.completed
                ),
            });
        }
        self.usage.merge(&tally.usage);
        ::metrics::counter!(metrics::PARTS_READ, metrics::LABEL_READ => metrics::READ_COPIED)
            .increment(1);
        Ok(())
    }

    /// Writes a line of a part to the file it belongs in, counting its usage if a success.
    async fn write_part_line(
        &mut self,
        line: &[u8],
        summary: &ResultLineSummary,
    ) -> Result<(), FinalizeError> {
        if summary.succeeded {
            self.usage.merge(&summary.usage);
            self.output.write_line(self.storage, line).await
        } else {
            self.error.write_line(self.storage, line).await
        }
    }

    /// Writes one line per request of a chunk that is not done: its part line if its part has
    /// one, else a `missing` error line. The input range and the part are read side by side.
    async fn merge_unfinished(
        &mut self,
        plan: &FinalizePlan,
        chunk: &PlannedChunk,
        missing: MissingResult<'_>,
    ) -> Result<(), FinalizeError> {
        let span = &chunk.span;
        let batch = plan.batch().id.as_str();
        let mut part = PartLines::open(
            self.storage,
            part_key(&plan.batch().id, span.index),
            span.index,
            self.settings.max_line_bytes,
        )
        .await?;

        let key = plan.input_storage_key();
        let range = ByteRange::Bounded {
            start: span.byte_start,
            end: span.byte_end,
        };
        let context = || {
            format!(
                "reading bytes {}..{} of {key}",
                span.byte_start, span.byte_end
            )
        };
        let body = self
            .storage
            .get(key, Some(range))
            .await
            .map_err(FinalizeError::storage(context()))?;
        let lines = span
            .splitter(self.settings.max_line_bytes)
            .split_stream(body.stream);
        let mut lines = std::pin::pin!(lines);
        // The part's next line, not yet matched to a request.
        let mut pending = part.next().await?;
        let mut found = 0u64;
        while let Some(item) = lines.next().await {
            let item = item.map_err(FinalizeError::storage(context()))?;
            let line = self.line_of(item, span.index, "input range")?;
            if line.is_blank() {
                continue;
            }
            found += 1;
            let custom_id = custom_id(&line.bytes).map_err(|e| FinalizeError::CorruptInput {
                chunk: span.index,
                line: line.number,
                reason: e.to_string(),
            })?;
            let id = BatchRequestId::for_line(batch, line.number);
            match pending.take() {
                Some(result) if result.summary.id == id => {
                    if result.summary.custom_id != custom_id {
                        return Err(FinalizeError::CorruptPart {
                            chunk: span.index,
                            line: result.number,
                            reason: format!(
                                "it is the line of request {} but its custom_id {:?} is not the \
                                 request's {custom_id:?}",
                                line.number, result.summary.custom_id
                            ),
                        });
                    }
                    self.write_part_line(&result.bytes, &result.summary).await?;
                    pending = part.next().await?;
                }
                not_this_one => {
                    pending = not_this_one;
                    let result = ResultLine::no_response(
                        id,
                        custom_id,
                        missing.code,
                        missing.message.map(str::to_owned),
                    );
                    self.error.write_result(self.storage, &result).await?;
                }
            }
        }
        check_count(chunk, "input range", found)?;
        match pending {
            None => Ok(()),
            Some(result) => Err(FinalizeError::CorruptPart {
                chunk: span.index,
                line: result.number,
                reason: format!(
                    "its id {} is the id of no request of the chunk after the lines before it \
                     (out of line order, a duplicate, or another chunk's line)",
                    result.summary.id
                ),
            }),
        }
    }

    fn line_of(
        &self,
        item: JsonlItem,
        chunk: u32,
        what: &'static str,
    ) -> Result<Line, FinalizeError> {
        match item {
            JsonlItem::Line(line) => Ok(line),
            JsonlItem::Oversized(o) => Err(FinalizeError::LineTooLong {
                chunk,
                what,
                line: o.number,
                max: self.settings.max_line_bytes,
            }),
        }
    }
}

/// A part's GET, with its key.
async fn get_part(
    storage: &dyn ObjectStore,
    key: String,
) -> (String, Result<ObjectBody, StorageError>) {
    let got = storage.get(&key, None).await;
    (key, got)
}

fn check_count(chunk: &PlannedChunk, what: &'static str, found: u64) -> Result<(), FinalizeError> {
    let expected = u64::from(chunk.span.line_count);
    if found == expected {
        Ok(())
    } else {
        Err(FinalizeError::LineCount {
            chunk: chunk.span.index,
            what,
            expected,
            found,
        })
    }
}

/// A line of the part of a chunk that is not done, read.
struct PartLine {
    /// Its line number in the part.
    number: u64,
    /// The line (without terminator).
    bytes: Bytes,
    summary: ResultLineSummary,
}

/// The lines of the part of a chunk that is not done, one at a time; none if it has no part.
struct PartLines {
    lines: BoxStream<'static, Result<JsonlItem, StorageError>>,
    key: String,
    chunk: u32,
    max_line_bytes: usize,
}

impl PartLines {
    async fn open(
        storage: &dyn ObjectStore,
        key: String,
        chunk: u32,
        max_line_bytes: usize,
    ) -> Result<Self, FinalizeError> {
        let lines = match storage.get(&key, None).await {
            Ok(body) => JsonlSplitter::new(max_line_bytes)
                .split_stream(body.stream)
                .boxed(),
            // No run of the chunk wrote a line yet.
            Err(StorageError::NotFound(_)) => futures::stream::empty().boxed(),
            Err(e) => return Err(FinalizeError::storage(format!("reading {key}"))(e)),
        };
        Ok(Self {
            lines,
            key,
            chunk,
            max_line_bytes,
        })
    }

    /// The next (non-blank) line, read; `None` at the end.
    async fn next(&mut self) -> Result<Option<PartLine>, FinalizeError> {
        while let Some(item) = self.lines.next().await {
            let item = item.map_err(FinalizeError::storage(format!("reading {}", self.key)))?;
            let line = match item {
                JsonlItem::Line(line) => line,
                JsonlItem::Oversized(o) => {
                    return Err(FinalizeError::LineTooLong {
                        chunk: self.chunk,
                        what: "result part",
                        line: o.number,
                        max: self.max_line_bytes,
                    });
                }
            };
            if line.is_blank() {
                continue;
            }
            let summary =
                ResultLineSummary::parse(&line.bytes).map_err(|e| FinalizeError::CorruptPart {
                    chunk: self.chunk,
                    line: line.number,
                    reason: e.to_string(),
                })?;
            return Ok(Some(PartLine {
                number: line.number,
                bytes: line.bytes,
                summary,
            }));
        }
        Ok(None)
    }
}

/// The `custom_id` of a (validated) input line; the rest of the line is skipped.
fn custom_id(line: &[u8]) -> Result<String, serde_json::Error> {
    #[derive(Deserialize)]
    struct CustomIdOnly<'a> {
        #[serde(borrow)]
        custom_id: Cow<'a, str>,
    }
    serde_json::from_slice::<CustomIdOnly<'_>>(line).map(|l| l.custom_id.into_owned())
}

/// One result file being written: its upload starts with its first line.
struct ResultWriter {
    /// The file's id ([`ResultFile::file_id`]).
    id: FileId,
    /// Started on the first line; `None` while the file is empty.
    upload: Option<Box<dyn ObjectUpload>>,
    /// Lines not yet handed to the upload (at most about [`WRITE_BUFFER_BYTES`] plus a line).
    buffer: Vec<u8>,
    /// Lines written so far.
    lines: u64,
}

impl ResultWriter {
    fn new(id: FileId) -> Self {
        Self {
            id,
            upload: None,
            buffer: Vec::new(),
            lines: 0,
        }
    }

    fn key(&self) -> String {
        FileRecord::storage_key_for(&self.id)
    }

    /// Appends `line` (without terminator) and a `\n`.
    async fn write_line(
        &mut self,
        storage: &dyn ObjectStore,
        line: &[u8],
    ) -> Result<(), FinalizeError> {
        self.start(storage).await?;
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
        self.wrote(1).await
    }

    /// Appends `bytes`, which end `lines` whole lines (and may begin or end inside one: the
    /// pieces of a part as they are read).
    async fn write_lines(
        &mut self,
        storage: &dyn ObjectStore,
        bytes: &[u8],
        lines: u64,
    ) -> Result<(), FinalizeError> {
        self.start(storage).await?;
        self.buffer.extend_from_slice(bytes);
        self.wrote(lines).await
    }

    /// Appends a result line (its JSON and a `\n`).
    async fn write_result(
        &mut self,
        storage: &dyn ObjectStore,
        line: &ResultLine,
    ) -> Result<(), FinalizeError> {
        self.start(storage).await?;
        line.write_json_line(&mut self.buffer);
        self.wrote(1).await
    }

    async fn start(&mut self, storage: &dyn ObjectStore) -> Result<(), FinalizeError> {
        if self.upload.is_none() {
            let key = self.key();
            let upload = storage
                .upload(&key)
                .await
                .map_err(FinalizeError::storage(format!(
                    "starting the upload of {key}"
                )))?;
            self.upload = Some(upload);
        }
        Ok(())
    }

    async fn wrote(&mut self, lines: u64) -> Result<(), FinalizeError> {
        self.lines += lines;
        if self.buffer.len() >= WRITE_BUFFER_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FinalizeError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(WRITE_BUFFER_BYTES + 1024),
        ));
        let key = self.key();
        if let Some(upload) = self.upload.as_mut() {
            upload
                .write(chunk)
                .await
                .map_err(FinalizeError::storage(format!("writing {key}")))?;
        }
        Ok(())
    }

    /// Makes the file visible; `None` if it has no line (nothing was created).
    async fn finish(mut self) -> Result<Option<ProducedFile>, FinalizeError> {
        if self.upload.is_none() {
            return Ok(None);
        }
        if let Err(e) = self.flush().await {
            self.abort().await;
            return Err(e);
        }
        let key = self.key();
        let Some(upload) = self.upload.take() else {
            return Ok(None);
        };
        let bytes = upload
            .finish()
            .await
            .map_err(FinalizeError::storage(format!("completing {key}")))?;
        Ok(Some(ProducedFile {
            id: self.id,
            bytes,
            lines: self.lines,
        }))
    }

    /// Abandons the upload, if any: nothing becomes visible. Best effort (the adapter also
    /// aborts an upload dropped unfinished).
    async fn abort(mut self) {
        if let Some(upload) = self.upload.take()
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(key = %self.key(), error = %e, "could not abort an unfinished upload");
        }
    }
}
