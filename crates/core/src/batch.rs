//! The Batch object: create parameters, the status machine and its OpenAI JSON.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorKind};
use crate::file::{DEFAULT_BATCH_FILE_TTL_SECS, ExpiresAfter};
use crate::ids::{FileId, TenantId};
use crate::results::Usage;
use crate::validation::BatchError;

/// OpenAI's batch endpoints: every deployment accepts them. Operators may declare more per
/// upstream (`[[routing.upstreams]] endpoints`, [`crate::routing::UpstreamConfig::endpoints`]);
/// the scheduler, which knows the routing table, refuses any other. Each input line's `url`
/// must equal the batch's.
pub const SUPPORTED_ENDPOINTS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
];

/// Metadata limits (OpenAI's).
pub const METADATA_MAX_KEYS: usize = 16;
pub const METADATA_MAX_KEY_CHARS: usize = 64;
pub const METADATA_MAX_VALUE_CHARS: usize = 512;

/// A batch id (`batch_…`).
pub type BatchId = crate::ids::BatchId;

/// Where a batch is in its life. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "validating" => Self::Validating,
            "failed" => Self::Failed,
            "in_progress" => Self::InProgress,
            "finalizing" => Self::Finalizing,
            "completed" => Self::Completed,
            "expired" => Self::Expired,
            "cancelling" => Self::Cancelling,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// States from which a cancel moves the batch to `cancelling`.
    pub fn is_cancellable(self) -> bool {
        matches!(self, Self::Validating | Self::InProgress | Self::Finalizing)
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A completion window such as `24h`: a number and a unit (`s`, `m`, `h`, `d`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionWindow {
    pub raw: String,
    pub seconds: i64,
}

impl CompletionWindow {
    pub fn parse(raw: &str) -> Option<Self> {
        let (num, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit())?);
        let n: i64 = num.parse().ok().filter(|n| *n > 0)?;
        let mult = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return None,
        };
        Some(Self {
            raw: raw.to_owned(),
            seconds: n.checked_mul(mult)?,
        })
    }
}

/// The JSON body of `POST /v1/batches`, before checking.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBatchBody {
    pub input_file_id: Option<serde_json::Value>,
    pub endpoint: Option<serde_json::Value>,
    pub completion_window: Option<serde_json::Value>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub output_expires_after: Option<serde_json::Value>,
}

/// Checked create parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateBatch {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: CompletionWindow,
    pub metadata: Option<BTreeMap<String, String>>,
    /// Lifetime of the output and error files, seconds after their creation.
    pub output_expires_after_secs: i64,
}

fn required_string(value: Option<serde_json::Value>, param: &str) -> Result<String, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Err(ApiError::missing(param)),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(serde_json::Value::String(_)) => Err(ApiError::missing(param)),
        Some(other) => Err(invalid_type(param, "a string", &other)),
    }
}

fn invalid_type(param: &str, expected: &str, got: &serde_json::Value) -> ApiError {
    let kind = match got {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    ApiError::new(
        ErrorKind::InvalidRequest,
        format!("Invalid type for '{param}': expected {expected}, but got {kind} instead."),
    )
    .with_param(param)
    .with_code("invalid_type")
}

impl CreateBatch {
    /// Checks a create request. `windows` are the completion windows the operator allows.
    pub fn check(body: CreateBatchBody, windows: &[String]) -> Result<Self, ApiError> {
        let input_file_id = required_string(body.input_file_id, "input_file_id")?;
        let endpoint = required_string(body.endpoint, "endpoint")?;
        // OpenAI's endpoints, or a path an upstream may declare: whether one does is the
        // scheduler's to say (it has the routing table).
        if !SUPPORTED_ENDPOINTS.contains(&endpoint.as_str())
            && crate::routing::check_endpoint_path(&endpoint).is_err()
        {
            return Err(ApiError::invalid_value(
                "endpoint",
                format!(
                    "Invalid value '{endpoint}' for 'endpoint': supported endpoints are {}, and \
                     those the operator declares.",
                    SUPPORTED_ENDPOINTS.join(", ")
                ),
            ));
        }
        let window_raw = required_string(body.completion_window, "completion_window")?;
        let completion_window = windows
            .contains(&window_raw)
            .then(|| CompletionWindow::parse(&window_raw))
            .flatten()
            .ok_or_else(|| {
                ApiError::invalid_value(
                    "completion_window",
                    format!(
                        "Invalid value '{window_raw}' for 'completion_window': supported values are {}.",
                        windows
                            .iter()
                            .map(|w| format!("'{w}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
        let metadata = match body.metadata {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(map)) => Some(check_metadata(map)?),
            Some(other) => return Err(invalid_type("metadata", "an object", &other)),
        };
        let output_expires_after_secs = match body.output_expires_after {
            None | Some(serde_json::Value::Null) => DEFAULT_BATCH_FILE_TTL_SECS,
            Some(serde_json::Value::Object(map)) => check_output_expiry(map)?,
            Some(other) => return Err(invalid_type("output_expires_after", "an object", &other)),
        };
        Ok(Self {
            input_file_id,
            endpoint,
            completion_window,
            metadata,
            output_expires_after_secs,
        })
    }
}

/// Checks a `metadata` object against OpenAI's limits (16 keys, 64-character keys,
/// 512-character string values).
///
/// # Errors
/// A 400 naming the offending key.
pub fn check_metadata(
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, String>, ApiError> {
    if map.len() > METADATA_MAX_KEYS {
        return Err(ApiError::invalid_value(
            "metadata",
            format!(
                "Invalid 'metadata': too many keys ({}); at most {METADATA_MAX_KEYS} are allowed.",
                map.len()
            ),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let param = format!("metadata.{k}");
        if k.chars().count() > METADATA_MAX_KEY_CHARS {
            return Err(ApiError::invalid_value(
                &param,
                format!(
                    "Invalid 'metadata': key '{k}' is longer than {METADATA_MAX_KEY_CHARS} characters."
                ),
            ));
        }
        let serde_json::Value::String(v) = v else {
            return Err(invalid_type(&param, "a string", &v));
        };
        if v.chars().count() > METADATA_MAX_VALUE_CHARS {
            return Err(ApiError::invalid_value(
                &param,
                format!(
                    "Invalid '{param}': string too long; at most {METADATA_MAX_VALUE_CHARS} characters are allowed."
                ),
            ));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn check_output_expiry(map: serde_json::Map<String, serde_json::Value>) -> Result<i64, ApiError> {
    for key in map.keys() {
        if key != "anchor" && key != "seconds" {
            return Err(ApiError::invalid_value(
                &format!("output_expires_after.{key}"),
                format!("Unknown parameter 'output_expires_after.{key}'."),
            ));
        }
    }
    match map.get("anchor") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(a)) if a == "created_at" => {}
        Some(other) => {
            return Err(ApiError::invalid_value(
                "output_expires_after.anchor",
                format!(
                    "Invalid value {other} for 'output_expires_after.anchor': expected 'created_at'."
                ),
            ));
        }
    }
    match map.get("seconds") {
        None | Some(serde_json::Value::Null) => Ok(DEFAULT_BATCH_FILE_TTL_SECS),
        Some(serde_json::Value::Number(n)) => {
            let secs = n.as_i64().ok_or_else(|| {
                invalid_type(
                    "output_expires_after.seconds",
                    "an integer",
                    &serde_json::Value::Number(n.clone()),
                )
            })?;
            ExpiresAfter::from_seconds("output_expires_after.seconds", secs).map(|e| e.seconds)
        }
        Some(other) => Err(invalid_type(
            "output_expires_after.seconds",
            "an integer",
            other,
        )),
    }
}

/// Object key of a chunk's result part: one object per chunk, holding its output and error
/// lines together, written whole. A redelivered chunk overwrites it, so the finalizer, which
/// reads exactly one part per chunk, never sees a line twice.
pub fn part_key(batch: &BatchId, chunk_index: u32) -> String {
    format!("{}{chunk_index:08}.jsonl", parts_prefix(batch))
}

/// What the run that wrote a done chunk's result part says it holds, reported with the
/// chunk's `DONE` and kept with the chunk: the part's exact size and CRC-32 (IEEE) and the
/// counts and usage of its lines.
///
/// The finalizer trusts a tally only for the bytes it describes: it copies a part whose tally
/// has no failed line straight into the output file, without parsing it, computing the CRC
/// as it goes, and falls back to reading every line if the part it read is not the part the
/// tally describes (another run of the chunk rewrote it since).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartTally {
    /// The part's size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE 802.3) of the part's bytes.
    pub crc32: u32,
    /// Its lines with a 2xx response (output-file lines).
    pub completed: u64,
    /// Its other lines (error-file lines).
    pub failed: u64,
    /// Usage summed over the `completed` lines.
    pub usage: Usage,
}

impl PartTally {
    /// Lines in the part.
    pub fn lines(&self) -> u64 {
        self.completed.saturating_add(self.failed)
    }
}

/// Prefix of every result part of a batch.
pub fn parts_prefix(batch: &BatchId) -> String {
    format!("batches/{batch}/parts/")
}

/// Which of a batch's two result files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultFile {
    Output,
    Error,
}

impl ResultFile {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Output => "output",
            Self::Error => "error",
        }
    }

    /// The file's id, derived from the batch's: a finalizer that crashes and runs again
    /// rewrites the same objects and commits the same ids, leaving no orphan behind.
    pub fn file_id(self, batch: &BatchId) -> FileId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{batch}:{}", self.as_str()).as_bytes());
        let id = format!("file-{}", &hex::encode(digest)[..24]);
        FileId::parse(&id).unwrap_or_else(|_| FileId::generate())
    }

    /// `batch_<batch id>_output.jsonl` / `batch_<batch id>_error.jsonl` (the batch id already
    /// starts with `batch_`).
    pub fn filename(self, batch: &BatchId) -> String {
        format!("{batch}_{}.jsonl", self.as_str())
    }
}

/// The request counts of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// A batch as the metadata store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: BatchId,
    pub tenant_id: TenantId,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// Read from the input by validation.
    pub model: Option<String>,
    pub errors: Vec<BatchError>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub output_expires_after_secs: i64,
    pub output_file_id: Option<FileId>,
    pub error_file_id: Option<FileId>,
    pub created_at_us: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    /// Final counts once terminal; `total` from validation on.
    pub request_counts: RequestCounts,
    /// Final usage once terminal.
    pub usage: Usage,
    /// The W3C `traceparent` of the span that created the batch: every later step of its
    /// life (validation, chunk dispatch, results, finalization) is a span of that trace, even
    /// after a restart. `None` when traces were not set up; never shown to clients.
    pub traceparent: Option<String>,
}

impl BatchRecord {
    pub fn created_at(&self) -> i64 {
        self.created_at_us.div_euclid(1_000_000)
    }

    /// The OpenAI JSON object. `live` replaces counts and usage while the batch runs.
    pub fn to_object(&self, live: Option<(RequestCounts, Usage)>) -> BatchObject {
        let (request_counts, usage) = match live {
            Some((c, u)) if !self.status.is_terminal() => (c, u),
            _ => (self.request_counts, self.usage),
        };
        BatchObject {
            id: self.id.to_string(),
            object: "batch",
            endpoint: self.endpoint.clone(),
            model: self.model.clone(),
            errors: (!self.errors.is_empty()).then(|| BatchErrors {
                object: "list",
                data: self.errors.clone(),
            }),
            input_file_id: self.input_file_id.clone(),
            completion_window: self.completion_window.clone(),
            status: self.status,
            output_file_id: self.output_file_id.as_ref().map(ToString::to_string),
            error_file_id: self.error_file_id.as_ref().map(ToString::to_string),
            created_at: self.created_at(),
            in_progress_at: self.in_progress_at,
            expires_at: self.expires_at,
            finalizing_at: self.finalizing_at,
            completed_at: self.completed_at,
            failed_at: self.failed_at,
            expired_at: self.expired_at,
            cancelling_at: self.cancelling_at,
            cancelled_at: self.cancelled_at,
            request_counts,
            metadata: self.metadata.clone(),
            usage,
        }
    }
}

/// `errors` of a Batch object.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BatchErrors {
    #[schema(schema_with = crate::schema::object_list)]
    pub object: &'static str,
    pub data: Vec<BatchError>,
}

/// OpenAI's Batch object; every key always serialised.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BatchObject {
    pub id: String,
    #[schema(schema_with = crate::schema::object_batch)]
    pub object: &'static str,
    pub endpoint: String,
    #[schema(required = true)]
    pub model: Option<String>,
    #[schema(required = true)]
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    #[schema(required = true)]
    pub output_file_id: Option<String>,
    #[schema(required = true)]
    pub error_file_id: Option<String>,
    pub created_at: i64,
    #[schema(required = true)]
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    #[schema(required = true)]
    pub finalizing_at: Option<i64>,
    #[schema(required = true)]
    pub completed_at: Option<i64>,
    #[schema(required = true)]
    pub failed_at: Option<i64>,
    #[schema(required = true)]
    pub expired_at: Option<i64>,
    #[schema(required = true)]
    pub cancelling_at: Option<i64>,
    #[schema(required = true)]
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    #[schema(required = true)]
    pub metadata: Option<BTreeMap<String, String>>,
    pub usage: Usage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: serde_json::Value) -> Result<CreateBatch, ApiError> {
        let body: CreateBatchBody = serde_json::from_value(body).unwrap();
        CreateBatch::check(body, &["24h".to_string(), "5s".to_string()])
    }

    fn base() -> serde_json::Value {
        json!({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    }

    fn with(k: &str, v: serde_json::Value) -> serde_json::Value {
        let mut b = base();
        b[k] = v;
        b
    }

    #[test]
    fn accepts_a_good_request_with_defaults() {
        let c = check(base()).unwrap();
        assert_eq!(c.completion_window.seconds, 86_400);
        assert_eq!(c.output_expires_after_secs, DEFAULT_BATCH_FILE_TTL_SECS);
        assert_eq!(c.metadata, None);
        let c = check(with(
            "output_expires_after",
            json!({"anchor": "created_at", "seconds": 604800}),
        ))
        .unwrap();
        assert_eq!(c.output_expires_after_secs, 604_800);
        let c = check(with("metadata", json!({"description": "nightly eval run"}))).unwrap();
        assert_eq!(c.metadata.unwrap()["description"], "nightly eval run");
    }

    #[test]
    fn a_well_formed_endpoint_beyond_openais_is_left_to_the_routing_table() {
        // Whether an upstream declares it is the scheduler's check; here only its shape.
        let c = check(with("endpoint", json!("/v1/rerank"))).unwrap();
        assert_eq!(c.endpoint, "/v1/rerank");
    }

    #[test]
    fn names_the_field_at_fault() {
        for (body, param, code) in [
            (
                json!({"endpoint": "/v1/chat/completions", "completion_window": "24h"}),
                "input_file_id",
                "missing_required_parameter",
            ),
            (
                json!({"input_file_id": "f", "completion_window": "24h"}),
                "endpoint",
                "missing_required_parameter",
            ),
            (
                json!({"input_file_id": "f", "endpoint": "/v1/chat/completions"}),
                "completion_window",
                "missing_required_parameter",
            ),
            (
                with("endpoint", json!("/images")),
                "endpoint",
                "invalid_value",
            ),
            (
                with("endpoint", json!("/v1/rerank?top_n=1")),
                "endpoint",
                "invalid_value",
            ),
            (
                with("completion_window", json!("48h")),
                "completion_window",
                "invalid_value",
            ),
            (
                with("input_file_id", json!(5)),
                "input_file_id",
                "invalid_type",
            ),
            (with("metadata", json!("x")), "metadata", "invalid_type"),
            (
                with("metadata", json!({"team": 5})),
                "metadata.team",
                "invalid_type",
            ),
            (
                with("metadata", json!({"team": "x".repeat(513)})),
                "metadata.team",
                "invalid_value",
            ),
            (
                with("output_expires_after", json!({"seconds": 60})),
                "output_expires_after.seconds",
                "invalid_value",
            ),
            (
                with("output_expires_after", json!({"anchor": "now"})),
                "output_expires_after.anchor",
                "invalid_value",
            ),
            (
                with("output_expires_after", json!({"seconds": "soon"})),
                "output_expires_after.seconds",
                "invalid_type",
            ),
        ] {
            let e = check(body.clone()).unwrap_err();
            assert_eq!(
                (e.param.as_deref(), e.code.as_deref()),
                (Some(param), Some(code)),
                "{body}: {e:?}"
            );
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
        }
        let many: serde_json::Map<_, _> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        let e = check(with("metadata", serde_json::Value::Object(many))).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("metadata"));
        let long_key = json!({"k".repeat(65): "v"});
        assert!(check(with("metadata", long_key)).is_err());
        let e = serde_json::from_value::<CreateBatchBody>(with("surprise", json!(1))).unwrap_err();
        assert!(e.to_string().contains("surprise"));
    }

    #[test]
    fn result_files_are_deterministic_per_batch() {
        let b = BatchId::parse("batch_abc").unwrap();
        assert_eq!(
            ResultFile::Output.file_id(&b),
            ResultFile::Output.file_id(&b)
        );
        assert_ne!(
            ResultFile::Output.file_id(&b),
            ResultFile::Error.file_id(&b)
        );
        let other = BatchId::parse("batch_abd").unwrap();
        assert_ne!(
            ResultFile::Output.file_id(&b),
            ResultFile::Output.file_id(&other)
        );
        assert_eq!(ResultFile::Error.filename(&b), "batch_abc_error.jsonl");
        assert_eq!(part_key(&b, 7), "batches/batch_abc/parts/00000007.jsonl");
        assert!(part_key(&b, 7).starts_with(&parts_prefix(&b)));
    }

    #[test]
    fn windows_and_statuses() {
        assert_eq!(CompletionWindow::parse("24h").unwrap().seconds, 86_400);
        assert_eq!(CompletionWindow::parse("7d").unwrap().seconds, 604_800);
        assert_eq!(CompletionWindow::parse("5s").unwrap().seconds, 5);
        assert!(CompletionWindow::parse("h").is_none());
        assert!(CompletionWindow::parse("0h").is_none());
        assert!(CompletionWindow::parse("3w").is_none());
        for s in [
            "validating",
            "failed",
            "in_progress",
            "finalizing",
            "completed",
            "expired",
            "cancelling",
            "cancelled",
        ] {
            let st = BatchStatus::parse(s).unwrap();
            assert_eq!(st.as_str(), s);
            assert_eq!(serde_json::to_value(st).unwrap(), json!(s));
        }
        assert!(BatchStatus::Completed.is_terminal() && !BatchStatus::Cancelling.is_terminal());
        assert!(
            BatchStatus::Finalizing.is_cancellable() && !BatchStatus::Cancelling.is_cancellable()
        );
    }
}
