//! What the scheduler tells the finalizer about a batch to end: the [`FinalizePlan`].
//!
//! The wire plan (`nightshift.v1.FinalizePlan`) is converted here, at the crate's edge, into a
//! checked domain value: chunks in index order with no gap and no duplicate, an [`Ending`], and
//! the guarantee that a batch ending `completed` has every chunk done or given up (failed). The
//! assembly code then never has to second-guess its input.
//!
//! Which error a line without a result line gets ([`FinalizePlan::missing_result`]):
//! `chunk_failed` (with the chunk's failure message) when its chunk was given up, else
//! `batch_cancelled` / `batch_expired` by the ending. A completed batch has no such line but in
//! failed chunks.

use std::fmt;

use nightshift_core::ApiError;
use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::results::NoResponseCode;
use nightshift_proto::v1;

/// The terminal status a finalization commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ending {
    /// Every chunk ran (or was given up: its lines without a result are `chunk_failed`).
    Completed,
    /// The deadline passed: lines without a result become `batch_expired` lines.
    Expired,
    /// The batch was cancelled: lines without a result become `batch_cancelled` lines.
    Cancelled,
}

impl Ending {
    /// Every ending, in a fixed order.
    pub const ALL: [Ending; 3] = [Self::Completed, Self::Expired, Self::Cancelled];

    /// The wire name, which is also the terminal status's name.
    pub fn as_str(self) -> &'static str {
        self.status().as_str()
    }

    /// Parses the wire name (`completed`, `expired`, `cancelled`).
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == raw)
    }

    /// The terminal status this ending commits.
    pub fn status(self) -> BatchStatus {
        match self {
            Self::Completed => BatchStatus::Completed,
            Self::Expired => BatchStatus::Expired,
            Self::Cancelled => BatchStatus::Cancelled,
        }
    }

    /// The `error.code` of the lines without a result of a chunk that is neither done nor
    /// failed; `None` for `completed`, where every chunk is done or failed.
    pub fn unfinished_code(self) -> Option<NoResponseCode> {
        match self {
            Self::Completed => None,
            Self::Expired => Some(NoResponseCode::BatchExpired),
            Self::Cancelled => Some(NoResponseCode::BatchCancelled),
        }
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One chunk of the batch and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChunk {
    /// The chunk's lines: its byte range in the input and its line numbers.
    pub span: ChunkSpan,
    /// Its result part is durable and complete: one result line per request. A chunk that is
    /// not done may still have a part holding some of its lines (a run cut short), or none.
    /// A done chunk's `failure` is ignored: its part has every line.
    pub done: bool,
    /// The chunk was given up (it can never run, or its attempts ran out): the message of the
    /// `chunk_failed` lines of its lines without a result line. An empty message means the
    /// code's default one.
    pub failure: Option<String>,
    /// A done chunk's part as the run that wrote it reported it, when known: the assembly
    /// copies a part whose tally has no failed line without parsing it (checking that the
    /// part it reads is the one described). Ignored for a chunk that is not done.
    pub part: Option<PartTally>,
}

impl PlannedChunk {
    /// A chunk whose part is complete.
    pub fn done(span: ChunkSpan) -> Self {
        Self {
            span,
            done: true,
            failure: None,
            part: None,
        }
    }

    /// A chunk whose part is complete, with what the run that wrote it reported.
    pub fn done_with(span: ChunkSpan, part: PartTally) -> Self {
        Self {
            part: Some(part),
            ..Self::done(span)
        }
    }

    /// A chunk that did not finish (never ran, or ran in part) and was not given up.
    pub fn unfinished(span: ChunkSpan) -> Self {
        Self {
            span,
            done: false,
            failure: None,
            part: None,
        }
    }

    /// A chunk given up with `failure` as the message of its lines without a result.
    pub fn failed(span: ChunkSpan, failure: impl Into<String>) -> Self {
        Self {
            span,
            done: false,
            failure: Some(failure.into()),
            part: None,
        }
    }
}

/// The error line a request without a result line gets: its code and message (`None`: the
/// code's default message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingResult<'a> {
    /// `error.code`.
    pub code: NoResponseCode,
    /// `error.message`, if not the code's default.
    pub message: Option<&'a str>,
}

/// A plan the scheduler sent that cannot be finalized as it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The plan has no batch.
    #[error("the plan has no batch")]
    MissingBatch,
    /// The batch does not convert (a corrupt id, status, ...).
    #[error("the plan's batch is invalid: {0}")]
    Batch(String),
    /// The plan is for another batch than the one asked for.
    #[error("asked for the plan of {asked}, got the plan of {got}")]
    WrongBatch { asked: String, got: String },
    /// The ending is not `completed`, `expired` or `cancelled`.
    #[error("the plan's ending {0:?} is not completed, expired or cancelled")]
    Ending(String),
    /// Chunk indices are not exactly `0..n`.
    #[error("chunk indices are not 0..{count}: {detail}")]
    ChunkIndices { count: usize, detail: String },
    /// A chunk's byte range or line count is impossible.
    #[error("chunk {index} is malformed: {detail}")]
    Chunk { index: u32, detail: String },
    /// The batch ends `completed` but a chunk is neither done nor failed: a scheduler bug,
    /// since completion means every chunk is done or given up.
    #[error("chunk {index} is neither done nor failed, but the batch ends completed")]
    NotDoneChunk { index: u32 },
    /// The chunks do not hold as many requests as the batch has: lines would be lost (or
    /// invented).
    #[error("the chunks hold {chunks} requests but the batch has {batch}")]
    LineTotal { chunks: u64, batch: u64 },
    /// Some chunk is not done but the plan says nowhere to read its input lines from.
    #[error("chunks are not done but the plan has no input storage key")]
    MissingInputKey,
}

impl From<ApiError> for PlanError {
    fn from(e: ApiError) -> Self {
        Self::Batch(e.message)
    }
}

/// Everything needed to assemble a batch's files, checked.
///
/// Invariants (enforced by [`FinalizePlan::new`]): chunks are in index order with indices
/// exactly `0..n`; each has a non-empty byte range holding at least one line; together they
/// hold the batch's `request_counts.total` requests; if the ending is `completed` every chunk
/// is done or failed; if some chunk is not done the input key is set.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalizePlan {
    /// The batch (not terminal: a terminal batch has nothing left to assemble).
    batch: BatchRecord,
    /// Object key of the batch's input file, to read the lines of chunks that are not done.
    input_storage_key: String,
    /// Every chunk of the batch, in index order.
    chunks: Vec<PlannedChunk>,
    /// The terminal status the commit sets.
    ending: Ending,
}

impl FinalizePlan {
    /// Checks and builds a plan; `chunks` may come in any order.
    pub fn new(
        batch: BatchRecord,
        input_storage_key: String,
        mut chunks: Vec<PlannedChunk>,
        ending: Ending,
    ) -> Result<Self, PlanError> {
        chunks.sort_by_key(|c| c.span.index);
        let count = chunks.len();
        for (position, chunk) in chunks.iter().enumerate() {
            let index = chunk.span.index;
            if usize::try_from(index).ok() != Some(position) {
                let detail = if position > 0 && chunks[position - 1].span.index == index {
                    format!("chunk {index} appears twice")
                } else {
                    format!("chunk {position} is missing")
                };
                return Err(PlanError::ChunkIndices { count, detail });
            }
            let span = &chunk.span;
            if span.byte_end <= span.byte_start || span.line_count == 0 || span.first_line == 0 {
                return Err(PlanError::Chunk {
                    index,
                    detail: format!(
                        "bytes {}..{}, {} lines from line {}",
                        span.byte_start, span.byte_end, span.line_count, span.first_line
                    ),
                });
            }
            if !chunk.done {
                if ending == Ending::Completed && chunk.failure.is_none() {
                    return Err(PlanError::NotDoneChunk { index });
                }
                if input_storage_key.is_empty() {
                    return Err(PlanError::MissingInputKey);
                }
            }
        }
        let plan = Self {
            batch,
            input_storage_key,
            chunks,
            ending,
        };
        let (chunks, batch) = (plan.total_lines(), plan.batch.request_counts.total);
        if chunks != batch {
            return Err(PlanError::LineTotal { chunks, batch });
        }
        Ok(plan)
    }

    /// Converts the wire plan of a batch already converted (and found not terminal) by the
    /// caller; `wire.batch` is ignored.
    pub fn from_wire(batch: BatchRecord, wire: v1::FinalizePlan) -> Result<Self, PlanError> {
        let ending = Ending::parse(&wire.ending).ok_or(PlanError::Ending(wire.ending))?;
        let chunks = wire
            .chunks
            .into_iter()
            .map(|c| PlannedChunk {
                span: ChunkSpan {
                    index: c.index,
                    byte_start: c.byte_start,
                    byte_end: c.byte_end,
                    first_line: c.first_line,
                    line_count: c.line_count,
                },
                done: c.done,
                failure: c.failure,
                part: c.part.as_ref().map(PartTally::from),
            })
            .collect();
        Self::new(batch, wire.input_storage_key, chunks, ending)
    }

    /// The batch being finalized.
    pub fn batch(&self) -> &BatchRecord {
        &self.batch
    }

    /// Object key of the batch's input file.
    pub fn input_storage_key(&self) -> &str {
        &self.input_storage_key
    }

    /// Every chunk, in index order.
    pub fn chunks(&self) -> &[PlannedChunk] {
        &self.chunks
    }

    /// How the batch ends.
    pub fn ending(&self) -> Ending {
        self.ending
    }

    /// The error line of a request of `chunk` that has no result line: `chunk_failed` with
    /// the chunk's failure when it was given up, else the ending's
    /// [`unfinished_code`](Ending::unfinished_code). `None` for a done chunk (every request
    /// has its line) and for an unfinished one in a completed batch (which
    /// [`FinalizePlan::new`] refuses).
    pub fn missing_result<'a>(&self, chunk: &'a PlannedChunk) -> Option<MissingResult<'a>> {
        if chunk.done {
            return None;
        }
        match chunk.failure.as_deref() {
            Some(failure) => Some(MissingResult {
                code: NoResponseCode::ChunkFailed,
                message: Some(failure).filter(|m| !m.is_empty()),
            }),
            None => self.ending.unfinished_code().map(|code| MissingResult {
                code,
                message: None,
            }),
        }
    }

    /// Requests in the batch: the sum of the chunks' line counts.
    pub fn total_lines(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| u64::from(c.span.line_count))
            .sum()
    }
}

/// Converts the batch of a wire plan, checking it is the one asked for.
pub fn batch_of(wire: &mut v1::FinalizePlan, asked: &str) -> Result<BatchRecord, PlanError> {
    let batch = BatchRecord::try_from(wire.batch.take().ok_or(PlanError::MissingBatch)?)?;
    if batch.id.as_str() != asked {
        return Err(PlanError::WrongBatch {
            asked: asked.to_owned(),
            got: batch.id.to_string(),
        });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use nightshift_core::batch::RequestCounts;
    use nightshift_core::results::Usage;
    use nightshift_core::{BatchId, TenantId};

    use super::*;

    /// A finalizing batch of `total` requests.
    fn batch_of_total(total: u64) -> BatchRecord {
        BatchRecord {
            id: BatchId::generate(),
            tenant_id: TenantId::generate(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-abc".into(),
            completion_window: "24h".into(),
            status: BatchStatus::Finalizing,
            model: Some("m".into()),
            errors: Vec::new(),
            metadata: None,
            output_expires_after_secs: 3600,
            output_file_id: None,
            error_file_id: None,
            created_at_us: 1,
            in_progress_at: Some(1),
            expires_at: 100,
            finalizing_at: Some(2),
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts {
                total,
                completed: 0,
                failed: 0,
            },
            usage: Usage::default(),
            traceparent: None,
        }
    }

    /// A finalizing batch of 4 requests (two chunks of [`chunk`]).
    fn batch() -> BatchRecord {
        batch_of_total(4)
    }

    fn chunk(index: u32, done: bool) -> PlannedChunk {
        let i = u64::from(index);
        let span = ChunkSpan {
            index,
            byte_start: i * 10,
            byte_end: i * 10 + 10,
            first_line: i * 2 + 1,
            line_count: 2,
        };
        if done {
            PlannedChunk::done(span)
        } else {
            PlannedChunk::unfinished(span)
        }
    }

    fn failed_chunk(index: u32, failure: &str) -> PlannedChunk {
        PlannedChunk::failed(chunk(index, false).span, failure)
    }

    #[test]
    fn endings_round_trip_and_name_their_codes() {
        for ending in Ending::ALL {
            assert_eq!(Ending::parse(ending.as_str()), Some(ending));
            assert!(ending.status().is_terminal());
        }
        assert_eq!(Ending::parse(""), None);
        assert_eq!(Ending::parse("failed"), None);
        assert_eq!(Ending::Completed.unfinished_code(), None);
        assert_eq!(
            Ending::Expired.unfinished_code(),
            Some(NoResponseCode::BatchExpired)
        );
        assert_eq!(
            Ending::Cancelled.unfinished_code(),
            Some(NoResponseCode::BatchCancelled)
        );
    }

    #[test]
    fn chunks_are_sorted_and_must_be_exactly_zero_to_n() {
        let plan = FinalizePlan::new(
            batch_of_total(6),
            "files/x".into(),
            vec![chunk(2, true), chunk(0, true), chunk(1, true)],
            Ending::Completed,
        )
        .unwrap();
        let order: Vec<u32> = plan.chunks().iter().map(|c| c.span.index).collect();
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(plan.total_lines(), 6);

        for chunks in [
            vec![chunk(0, true), chunk(2, true)],
            vec![chunk(1, true)],
            vec![chunk(0, true), chunk(0, true)],
        ] {
            let e = FinalizePlan::new(batch(), "k".into(), chunks, Ending::Completed).unwrap_err();
            assert!(matches!(e, PlanError::ChunkIndices { .. }), "{e}");
        }
        let mut empty = chunk(0, true);
        empty.span.byte_end = empty.span.byte_start;
        let e = FinalizePlan::new(batch(), "k".into(), vec![empty], Ending::Completed).unwrap_err();
        assert!(matches!(e, PlanError::Chunk { index: 0, .. }));
    }

    #[test]
    fn the_chunks_hold_exactly_the_batch_s_requests() {
        for total in [3, 5] {
            let e = FinalizePlan::new(
                batch_of_total(total),
                "k".into(),
                vec![chunk(0, true), chunk(1, true)],
                Ending::Completed,
            )
            .unwrap_err();
            assert_eq!(
                e,
                PlanError::LineTotal {
                    chunks: 4,
                    batch: total
                }
            );
        }
        // A batch cancelled before it had chunks.
        let plan =
            FinalizePlan::new(batch_of_total(0), String::new(), vec![], Ending::Cancelled).unwrap();
        assert_eq!(plan.total_lines(), 0);
    }

    #[test]
    fn a_completed_batch_has_every_chunk_done() {
        let e = FinalizePlan::new(
            batch(),
            "files/x".into(),
            vec![chunk(0, true), chunk(1, false)],
            Ending::Completed,
        )
        .unwrap_err();
        assert_eq!(e, PlanError::NotDoneChunk { index: 1 });
        // A chunk given up is allowed: its lines without a result become chunk_failed.
        let plan = FinalizePlan::new(
            batch(),
            "files/x".into(),
            vec![chunk(0, true), failed_chunk(1, "gave up")],
            Ending::Completed,
        )
        .unwrap();
        assert_eq!(plan.missing_result(&plan.chunks()[0]), None);
        assert_eq!(
            plan.missing_result(&plan.chunks()[1]),
            Some(MissingResult {
                code: NoResponseCode::ChunkFailed,
                message: Some("gave up")
            })
        );
        // ... but it needs the input, to name its lines.
        let e = FinalizePlan::new(
            batch_of_total(2),
            String::new(),
            vec![failed_chunk(0, "gave up")],
            Ending::Completed,
        )
        .unwrap_err();
        assert_eq!(e, PlanError::MissingInputKey);
        for ending in [Ending::Expired, Ending::Cancelled] {
            FinalizePlan::new(
                batch(),
                "files/x".into(),
                vec![chunk(0, true), chunk(1, false)],
                ending,
            )
            .unwrap();
            let e = FinalizePlan::new(
                batch_of_total(2),
                String::new(),
                vec![chunk(0, false)],
                ending,
            )
            .unwrap_err();
            assert_eq!(e, PlanError::MissingInputKey);
        }
    }

    #[test]
    fn lines_without_a_result_get_the_chunk_s_failure_else_the_ending_s_code() {
        for (ending, code) in [
            (Ending::Expired, NoResponseCode::BatchExpired),
            (Ending::Cancelled, NoResponseCode::BatchCancelled),
        ] {
            let mut done_but_failed = chunk(2, true);
            done_but_failed.failure = Some("ignored".into());
            let plan = FinalizePlan::new(
                batch_of_total(8),
                "files/x".into(),
                vec![
                    chunk(0, false),
                    failed_chunk(1, "no upstream"),
                    done_but_failed,
                    failed_chunk(3, ""),
                ],
                ending,
            )
            .unwrap();
            let missing: Vec<_> = plan
                .chunks()
                .iter()
                .map(|c| plan.missing_result(c))
                .collect();
            assert_eq!(
                missing,
                [
                    Some(MissingResult {
                        code,
                        message: None
                    }),
                    Some(MissingResult {
                        code: NoResponseCode::ChunkFailed,
                        message: Some("no upstream")
                    }),
                    None,
                    Some(MissingResult {
                        code: NoResponseCode::ChunkFailed,
                        message: None
                    }),
                ],
                "{ending}"
            );
        }
    }

    #[test]
    fn wire_plans_convert() {
        let b = batch_of_total(2);
        let mut wire = v1::FinalizePlan {
            batch: Some(v1::Batch::from(&b)),
            input_storage_key: "files/file-abc".into(),
            chunks: vec![v1::Chunk {
                index: 0,
                byte_start: 0,
                byte_end: 20,
                first_line: 1,
                line_count: 2,
                done: false,
                failure: Some("lost".into()),
                part: None,
            }],
            ending: "cancelled".into(),
        };
        let got = batch_of(&mut wire, b.id.as_str()).unwrap();
        assert_eq!(got, b);
        let plan = FinalizePlan::from_wire(got, wire.clone()).unwrap();
        assert_eq!(plan.ending(), Ending::Cancelled);
        assert_eq!(plan.input_storage_key(), "files/file-abc");
        assert_eq!(plan.chunks()[0].span.byte_end, 20);
        assert!(!plan.chunks()[0].done);
        assert_eq!(plan.chunks()[0].failure.as_deref(), Some("lost"));
        assert_eq!(plan.chunks()[0].part, None);

        // a done chunk's part tally comes through whole
        let tally = PartTally {
            bytes: 300,
            crc32: 0x0102_0304,
            completed: 2,
            failed: 0,
            usage: nightshift_core::results::Usage {
                input_tokens: 5,
                total_tokens: 5,
                ..Default::default()
            },
        };
        let mut done = wire.clone();
        done.chunks[0].done = true;
        done.chunks[0].part = Some(v1::PartTally::from(&tally));
        let plan = FinalizePlan::from_wire(b.clone(), done).unwrap();
        assert_eq!(plan.chunks()[0].part, Some(tally));

        wire.ending = String::new();
        let e = FinalizePlan::from_wire(b.clone(), wire).unwrap_err();
        assert_eq!(e, PlanError::Ending(String::new()));

        let mut other = v1::FinalizePlan {
            batch: Some(v1::Batch::from(&b)),
            ..Default::default()
        };
        assert!(matches!(
            batch_of(&mut other, "batch_other"),
            Err(PlanError::WrongBatch { .. })
        ));
        assert_eq!(
            batch_of(&mut v1::FinalizePlan::default(), "batch_x"),
            Err(PlanError::MissingBatch)
        );
    }
}
