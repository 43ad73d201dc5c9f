//! Rows to records, the same for every adapter.
//!
//! Both schemas store the same columns in the same units — ids and enums as text, times as
//! `i64` (seconds, or microseconds for `created_at_us`), counts as non-negative `i64`, errors,
//! metadata and usage as JSON documents (`JSONB` in Postgres, `TEXT` in SQLite: sqlx's JSON
//! type reads and writes both) — so decoding is written once, over [`Columns`], and both
//! adapters return identical records.

use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::results::Usage;
use nightshift_core::validation::BatchError;
use nightshift_core::{BatchId, FileId, TenantId};
use sqlx::{ColumnIndex, Decode, Row, Type};

use nightshift_core::idempotency::IdempotentKind;

use crate::{
    DispatchAccount, IdempotencyRecord, LeasedChunk, MetadataError, Result, RetrySource, Tenant,
};

/// Columns of a batch, as [`batch_from_row`] reads them.
pub(crate) const BATCH_COLUMNS: &str = "id, tenant_id, endpoint, input_file_id, \
     completion_window, status, model, errors, metadata, output_expires_after, \
     output_file_id, error_file_id, created_at_us, in_progress_at, expires_at, \
     finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at, \
     total, completed, failed, usage, traceparent";

/// Columns of a file, as [`file_from_row`] reads them.
pub(crate) const FILE_COLUMNS: &str =
    "id, tenant_id, bytes, created_at_us, expires_at, filename, purpose, storage_key";

/// Columns of a chunk's span, as [`span_from_row`] reads them.
pub(crate) const SPAN_COLUMNS: &str = "idx, byte_start, byte_end, first_line, line_count";

/// Reading one column of a row, by name, as the type the schema gives it.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> Result<String>;
    fn opt_text(&self, col: &str) -> Result<Option<String>>;
    /// A 64-bit integer column (times, sizes, counts).
    fn int(&self, col: &str) -> Result<i64>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>>;
    /// A 32-bit integer column (chunk index and line count).
    fn int4(&self, col: &str) -> Result<i32>;
    /// A boolean expression (`EXISTS`).
    fn flag(&self, col: &str) -> Result<bool>;
    /// A JSON document.
    fn json(&self, col: &str) -> Result<serde_json::Value>;
    /// A JSON document or NULL.
    fn opt_json(&self, col: &str) -> Result<Option<serde_json::Value>>;
}

/// Any sqlx row whose database decodes the schema's column types.
impl<R> Columns for R
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i32: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> serde_json::Value: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, col: &str) -> Result<String> {
        self.try_get(col).map_err(backend)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>> {
        self.try_get(col).map_err(backend)
    }
    fn int(&self, col: &str) -> Result<i64> {
        self.try_get(col).map_err(backend)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>> {
        self.try_get(col).map_err(backend)
    }
    fn int4(&self, col: &str) -> Result<i32> {
        self.try_get(col).map_err(backend)
    }
    fn flag(&self, col: &str) -> Result<bool> {
        self.try_get(col).map_err(backend)
    }
    fn json(&self, col: &str) -> Result<serde_json::Value> {
        self.try_get(col).map_err(backend)
    }
    fn opt_json(&self, col: &str) -> Result<Option<serde_json::Value>> {
        self.try_get(col).map_err(backend)
    }
}

/// A database error as the port's error: a unique violation is a [`MetadataError::Conflict`],
/// anything else a [`MetadataError::Backend`].
pub(crate) fn backend(e: sqlx::Error) -> MetadataError {
    if let sqlx::Error::Database(db) = &e
        && db.is_unique_violation()
    {
        return MetadataError::Conflict(db.message().to_owned());
    }
    MetadataError::Backend(e.to_string())
}

pub(crate) fn corrupt(what: &str, value: &str) -> MetadataError {
    MetadataError::Backend(format!("corrupt {what} in the database: {value:?}"))
}

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| MetadataError::Backend(format!("{what} out of range")))
}

fn json_col<T: serde::de::DeserializeOwned>(row: &impl Columns, col: &str) -> Result<T> {
    serde_json::from_value(row.json(col)?).map_err(|e| corrupt(col, &e.to_string()))
}

/// A nullable JSON column as `T`; NULL is `None`.
pub(crate) fn opt_json_col<T: serde::de::DeserializeOwned>(
    row: &impl Columns,
    col: &str,
) -> Result<Option<T>> {
    row.opt_json(col)?
        .map(|v| serde_json::from_value(v).map_err(|e| corrupt(col, &e.to_string())))
        .transpose()
}

fn count_col(row: &impl Columns, col: &str) -> Result<u64> {
    let v = row.int(col)?;
    u64::try_from(v).map_err(|_| corrupt(col, &v.to_string()))
}

pub(crate) fn batch_from_row(row: &impl Columns) -> Result<BatchRecord> {
    let id = row.text("id")?;
    let tenant = row.text("tenant_id")?;
    let status = row.text("status")?;
    let file_id = |col: &str| -> Result<Option<FileId>> {
        row.opt_text(col)?
            .map(|v| FileId::parse(&v).map_err(|_| corrupt(col, &v)))
            .transpose()
    };
    let errors: Vec<BatchError> = json_col(row, "errors")?;
    let metadata: Option<std::collections::BTreeMap<String, String>> = json_col(row, "metadata")?;
    let usage: Usage = json_col(row, "usage")?;
    Ok(BatchRecord {
        id: BatchId::parse(&id).map_err(|_| corrupt("batch id", &id))?,
        tenant_id: TenantId::parse(&tenant).map_err(|_| corrupt("tenant id", &tenant))?,
        endpoint: row.text("endpoint")?,
        input_file_id: row.text("input_file_id")?,
        completion_window: row.text("completion_window")?,
        status: BatchStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        model: row.opt_text("model")?,
        errors,
        metadata,
        output_expires_after_secs: row.int("output_expires_after")?,
        output_file_id: file_id("output_file_id")?,
        error_file_id: file_id("error_file_id")?,
        created_at_us: row.int("created_at_us")?,
        in_progress_at: row.opt_int("in_progress_at")?,
        expires_at: row.int("expires_at")?,
        finalizing_at: row.opt_int("finalizing_at")?,
        completed_at: row.opt_int("completed_at")?,
        failed_at: row.opt_int("failed_at")?,
        expired_at: row.opt_int("expired_at")?,
        cancelling_at: row.opt_int("cancelling_at")?,
        cancelled_at: row.opt_int("cancelled_at")?,
        request_counts: RequestCounts {
            total: count_col(row, "total")?,
            completed: count_col(row, "completed")?,
            failed: count_col(row, "failed")?,
        },
        usage,
        traceparent: row.opt_text("traceparent")?,
    })
}

pub(crate) fn span_from_row(r: &impl Columns) -> Result<ChunkSpan> {
    Ok(ChunkSpan {
        index: r.int4("idx")? as u32,
        byte_start: r.int("byte_start")? as u64,
        byte_end: r.int("byte_end")? as u64,
        first_line: r.int("first_line")? as u64,
        line_count: r.int4("line_count")? as u32,
    })
}

/// Columns of a leased chunk, as [`leased_from_row`] reads them.
pub(crate) const LEASED_COLUMNS: &str =
    "batch_id, idx, byte_start, byte_end, first_line, line_count, attempts";

/// A dispatched chunk: its batch, span and attempt number (at least 1: a chunk dispatched
/// before attempts were counted is on its first).
pub(crate) fn leased_from_row(r: &impl Columns) -> Result<LeasedChunk> {
    let batch = r.text("batch_id")?;
    Ok(LeasedChunk {
        batch: BatchId::parse(&batch).map_err(|_| corrupt("batch id", &batch))?,
        span: span_from_row(r)?,
        attempt: r.int4("attempts")?.max(1) as u32,
    })
}

pub(crate) fn account_from_row(r: &impl Columns) -> Result<DispatchAccount> {
    let tenant = r.text("tenant_id")?;
    let served = r.int("served")?;
    Ok(DispatchAccount {
        model: r.text("model")?,
        tenant: TenantId::parse(&tenant).map_err(|_| corrupt("tenant id", &tenant))?,
        served: u64::try_from(served).map_err(|_| corrupt("served", &served.to_string()))?,
    })
}

pub(crate) fn file_from_row(row: &impl Columns) -> Result<FileRecord> {
    let id = row.text("id")?;
    let tenant = row.text("tenant_id")?;
    let purpose = row.text("purpose")?;
    let bytes = row.int("bytes")?;
    let created_at_us = row.int("created_at_us")?;
    Ok(FileRecord {
        id: FileId::parse(&id).map_err(|_| corrupt("file id", &id))?,
        tenant_id: TenantId::parse(&tenant).map_err(|_| corrupt("tenant id", &tenant))?,
        bytes: u64::try_from(bytes).map_err(|_| corrupt("size", &bytes.to_string()))?,
        created_at: created_at_us.div_euclid(1_000_000),
        created_at_us,
        expires_at: row.opt_int("expires_at")?,
        filename: row.text("filename")?,
        purpose: Purpose::parse(&purpose).ok_or_else(|| corrupt("purpose", &purpose))?,
        storage_key: row.text("storage_key")?,
    })
}

pub(crate) fn tenant_from_row(row: &impl Columns) -> Result<Tenant> {
    let id = row.text("id")?;
    Ok(Tenant {
        id: TenantId::parse(&id).map_err(|_| corrupt("tenant id", &id))?,
        name: row.text("name")?,
    })
}

pub(crate) fn idempotency_from_row(row: &impl Columns) -> Result<IdempotencyRecord> {
    let kind = row.text("kind")?;
    Ok(IdempotencyRecord {
        key: row.text("idem_key")?,
        kind: IdempotentKind::parse(&kind).ok_or_else(|| corrupt("idempotency kind", &kind))?,
        request_hash: row.text("request_hash")?,
        object_id: row.text("object_id")?,
        created_at: row.int("created_at")?,
    })
}

pub(crate) fn retry_from_row(row: &impl Columns) -> Result<RetrySource> {
    let id = row.text("batch_id")?;
    let tenant = row.text("tenant_id")?;
    let parent = row.text("retry_of")?;
    Ok(RetrySource {
        batch: BatchId::parse(&id).map_err(|_| corrupt("batch id", &id))?,
        tenant: TenantId::parse(&tenant).map_err(|_| corrupt("tenant id", &tenant))?,
        retry_of: BatchId::parse(&parent).map_err(|_| corrupt("batch id", &parent))?,
        filter: json_col(row, "filter")?,
    })
}

/// Where a list page starts.
pub(crate) enum Cursor {
    /// No `after`: from the first row.
    Start,
    /// Strictly after this `(created_at_us, id)`.
    After(i64, String),
    /// `after` names no row of the tenant: the page is empty.
    Unknown,
}

impl Cursor {
    pub(crate) fn bounds(self) -> (Option<i64>, Option<String>) {
        match self {
            Cursor::After(us, id) => (Some(us), Some(id)),
            Cursor::Start | Cursor::Unknown => (None, None),
        }
    }
}

/// Cuts a page fetched with `limit + 1` rows down to `limit`; whether a row was left over.
pub(crate) fn split_page<T>(mut rows: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    (rows, has_more)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_page_reports_the_row_left_over() {
        assert_eq!(split_page(vec![1, 2, 3], 2), (vec![1, 2], true));
        assert_eq!(split_page(vec![1, 2], 2), (vec![1, 2], false));
        assert_eq!(split_page(Vec::<u8>::new(), 2), (vec![], false));
    }
}
