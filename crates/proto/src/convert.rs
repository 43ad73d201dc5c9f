//! Generated messages ⇄ core types.

use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally, RequestCounts};
use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::results::{InputTokensDetails, OutputTokensDetails, Usage};
use nightshift_core::validation::BatchError;
use nightshift_core::{ApiError, BatchId, FileId, TenantId};

use crate::v1;

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::internal(format!("control plane sent an invalid {what}: {value:?}"))
}

/// Parses a tenant id received over gRPC.
pub fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(|_| corrupt("tenant id", raw))
}

impl From<&FileRecord> for v1::File {
    fn from(f: &FileRecord) -> Self {
        Self {
            id: f.id.to_string(),
            tenant_id: f.tenant_id.to_string(),
            bytes: f.bytes,
            created_at: f.created_at,
            created_at_us: f.created_at_us,
            expires_at: f.expires_at,
            filename: f.filename.clone(),
            purpose: f.purpose.as_str().to_owned(),
            storage_key: f.storage_key.clone(),
        }
    }
}

impl TryFrom<v1::File> for FileRecord {
    type Error = ApiError;
    fn try_from(f: v1::File) -> Result<Self, ApiError> {
        Ok(Self {
            id: FileId::parse(&f.id).map_err(|_| corrupt("file id", &f.id))?,
            tenant_id: tenant_id(&f.tenant_id)?,
            bytes: f.bytes,
            created_at: f.created_at,
            created_at_us: f.created_at_us,
            expires_at: f.expires_at,
            filename: f.filename,
            purpose: Purpose::parse(&f.purpose).ok_or_else(|| corrupt("purpose", &f.purpose))?,
            storage_key: f.storage_key,
        })
    }
}

impl From<Order> for v1::Order {
    fn from(o: Order) -> Self {
        match o {
            Order::Asc => Self::Asc,
            Order::Desc => Self::Desc,
        }
    }
}

impl From<v1::Order> for Order {
    fn from(o: v1::Order) -> Self {
        match o {
            v1::Order::Asc => Order::Asc,
            v1::Order::Desc | v1::Order::Unspecified => Order::Desc,
        }
    }
}

impl From<&Usage> for v1::Usage {
    fn from(u: &Usage) -> Self {
        Self {
            input_tokens: u.input_tokens,
            cached_tokens: u.input_tokens_details.cached_tokens,
            output_tokens: u.output_tokens,
            reasoning_tokens: u.output_tokens_details.reasoning_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

impl From<&v1::Usage> for Usage {
    fn from(u: &v1::Usage) -> Self {
        Usage {
            input_tokens: u.input_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            output_tokens: u.output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: u.reasoning_tokens,
            },
            total_tokens: u.total_tokens,
        }
    }
}

impl From<&PartTally> for v1::PartTally {
    fn from(t: &PartTally) -> Self {
        Self {
            bytes: t.bytes,
            crc32: t.crc32,
            completed: t.completed,
            failed: t.failed,
            usage: Some(v1::Usage::from(&t.usage)),
        }
    }
}

impl From<&v1::PartTally> for PartTally {
    fn from(t: &v1::PartTally) -> Self {
        Self {
            bytes: t.bytes,
            crc32: t.crc32,
            completed: t.completed,
            failed: t.failed,
            usage: t.usage.as_ref().map(Usage::from).unwrap_or_default(),
        }
    }
}

impl v1::ChunkResult {
    /// The tally of the part a `DONE` report announces, when the run that sent it wrote the
    /// part (`part_crc32` is set).
    pub fn part_tally(&self) -> Option<PartTally> {
        self.part_crc32.map(|crc32| PartTally {
            bytes: self.part_bytes,
            crc32,
            completed: self.completed,
            failed: self.failed,
            usage: self.usage.as_ref().map(Usage::from).unwrap_or_default(),
        })
    }
}

impl From<&BatchRecord> for v1::Batch {
    fn from(b: &BatchRecord) -> Self {
        Self {
            id: b.id.to_string(),
            tenant_id: b.tenant_id.to_string(),
            endpoint: b.endpoint.clone(),
            input_file_id: b.input_file_id.clone(),
            completion_window: b.completion_window.clone(),
            status: b.status.as_str().to_owned(),
            model: b.model.clone(),
            errors: b
                .errors
                .iter()
                .map(|e| v1::BatchErrorEntry {
                    code: e.code.clone(),
                    line: e.line,
                    message: e.message.clone(),
                    param: e.param.clone(),
                })
                .collect(),
            metadata: b
                .metadata
                .clone()
                .map(|m| m.into_iter().collect())
                .unwrap_or_default(),
            has_metadata: b.metadata.is_some(),
            output_expires_after_seconds: b.output_expires_after_secs,
            output_file_id: b.output_file_id.as_ref().map(ToString::to_string),
            error_file_id: b.error_file_id.as_ref().map(ToString::to_string),
            created_at_us: b.created_at_us,
            in_progress_at: b.in_progress_at,
            expires_at: b.expires_at,
            finalizing_at: b.finalizing_at,
            completed_at: b.completed_at,
            failed_at: b.failed_at,
            expired_at: b.expired_at,
            cancelling_at: b.cancelling_at,
            cancelled_at: b.cancelled_at,
            total: b.request_counts.total,
            completed: b.request_counts.completed,
            failed: b.request_counts.failed,
            usage: Some(v1::Usage::from(&b.usage)),
        }
    }
}

impl TryFrom<v1::Batch> for BatchRecord {
    type Error = ApiError;
    fn try_from(b: v1::Batch) -> Result<Self, ApiError> {
        let file_id = |v: Option<String>| -> Result<Option<FileId>, ApiError> {
            v.map(|v| FileId::parse(&v).map_err(|_| corrupt("file id", &v)))
                .transpose()
        };
        Ok(Self {
            id: BatchId::parse(&b.id).map_err(|_| corrupt("batch id", &b.id))?,
            tenant_id: tenant_id(&b.tenant_id)?,
            endpoint: b.endpoint,
            input_file_id: b.input_file_id,
            completion_window: b.completion_window,
            status: BatchStatus::parse(&b.status).ok_or_else(|| corrupt("status", &b.status))?,
            model: b.model,
            errors: b
                .errors
                .into_iter()
                .map(|e| BatchError {
                    code: e.code,
                    line: e.line,
                    message: e.message,
                    param: e.param,
                })
                .collect(),
            metadata: b.has_metadata.then(|| b.metadata.into_iter().collect()),
            output_expires_after_secs: b.output_expires_after_seconds,
            output_file_id: file_id(b.output_file_id)?,
            error_file_id: file_id(b.error_file_id)?,
            created_at_us: b.created_at_us,
            in_progress_at: b.in_progress_at,
            expires_at: b.expires_at,
            finalizing_at: b.finalizing_at,
            completed_at: b.completed_at,
            failed_at: b.failed_at,
            expired_at: b.expired_at,
            cancelling_at: b.cancelling_at,
            cancelled_at: b.cancelled_at,
            request_counts: RequestCounts {
                total: b.total,
                completed: b.completed,
                failed: b.failed,
            },
            usage: b.usage.as_ref().map(Usage::from).unwrap_or_default(),
            // The scheduler keeps the batch's trace context; it never crosses the API.
            traceparent: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trips() {
        let rec = FileRecord {
            id: FileId::generate(),
            tenant_id: TenantId::generate(),
            bytes: 42,
            created_at: 1,
            created_at_us: 1_000_001,
            expires_at: Some(99),
            filename: "a.jsonl".into(),
            purpose: Purpose::Batch,
            storage_key: "files/x".into(),
        };
        let wire = v1::File::from(&rec);
        assert_eq!(FileRecord::try_from(wire).unwrap(), rec);
    }

    #[test]
    fn batch_round_trips() {
        let usage = Usage {
            input_tokens: 5,
            input_tokens_details: InputTokensDetails { cached_tokens: 1 },
            output_tokens: 7,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 2,
            },
            total_tokens: 12,
        };
        let rec = BatchRecord {
            id: BatchId::generate(),
            tenant_id: TenantId::generate(),
            endpoint: "/v1/embeddings".into(),
            input_file_id: "file-abc".into(),
            completion_window: "24h".into(),
            status: BatchStatus::Failed,
            model: Some("m".into()),
            errors: vec![BatchError {
                code: "invalid_json_line".into(),
                line: Some(3),
                message: "bad".into(),
                param: None,
            }],
            metadata: Some([("k".to_string(), "v".to_string())].into()),
            output_expires_after_secs: 3600,
            output_file_id: Some(FileId::generate()),
            error_file_id: None,
            created_at_us: 10,
            in_progress_at: None,
            expires_at: 20,
            finalizing_at: None,
            completed_at: None,
            failed_at: Some(11),
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts {
                total: 3,
                completed: 1,
                failed: 2,
            },
            usage,
            traceparent: None,
        };
        assert_eq!(BatchRecord::try_from(v1::Batch::from(&rec)).unwrap(), rec);
        let empty_meta = BatchRecord {
            metadata: Some(Default::default()),
            ..rec.clone()
        };
        assert_eq!(
            BatchRecord::try_from(v1::Batch::from(&empty_meta)).unwrap(),
            empty_meta
        );
        let no_meta = BatchRecord {
            metadata: None,
            ..rec
        };
        assert_eq!(
            BatchRecord::try_from(v1::Batch::from(&no_meta)).unwrap(),
            no_meta
        );
    }
}
