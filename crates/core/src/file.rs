//! The File object: purposes, expiry policy, and its OpenAI JSON.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::{FileId, TenantId};

/// Shortest `expires_after[seconds]` accepted: one hour.
pub const MIN_EXPIRES_AFTER_SECS: i64 = 3_600;
/// Longest `expires_after[seconds]` accepted: 30 days.
pub const MAX_EXPIRES_AFTER_SECS: i64 = 2_592_000;
/// Default lifetime of batch inputs and outputs when the client sets none: 30 days.
pub const DEFAULT_BATCH_FILE_TTL_SECS: i64 = MAX_EXPIRES_AFTER_SECS;

/// Longest filename accepted at upload, in bytes (UTF-8): the common filesystem limit. The name
/// is only shown back (the File object, `Content-Disposition`), never used as a path.
pub const MAX_FILENAME_BYTES: usize = 255;

/// Checks an uploaded file's name: at most [`MAX_FILENAME_BYTES`] bytes and no control
/// characters (they would corrupt logs and headers). Path separators are allowed: the name is
/// never used as a path. The 400 names `file`, code `invalid_filename`.
pub fn check_filename(name: &str) -> Result<(), ApiError> {
    let invalid = |message: String| {
        ApiError::new(crate::ErrorKind::InvalidRequest, message)
            .with_param("file")
            .with_code("invalid_filename")
    };
    if name.len() > MAX_FILENAME_BYTES {
        return Err(invalid(format!(
            "The filename is {} bytes long; at most {MAX_FILENAME_BYTES} are allowed.",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid(
            "The filename contains a control character.".to_owned(),
        ));
    }
    Ok(())
}

/// What a file is for. Only `batch` inputs are read by nightshift; the other purposes are
/// stored and served so that clients written for OpenAI keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    #[serde(rename = "batch")]
    Batch,
    #[serde(rename = "batch_output")]
    BatchOutput,
    #[serde(rename = "assistants")]
    Assistants,
    #[serde(rename = "fine-tune")]
    FineTune,
    #[serde(rename = "vision")]
    Vision,
    #[serde(rename = "user_data")]
    UserData,
    #[serde(rename = "evals")]
    Evals,
}

impl Purpose {
    /// The purposes a client may upload with. `batch_output` is produced by batches only.
    pub const UPLOADABLE: [Purpose; 6] = [
        Purpose::Batch,
        Purpose::Assistants,
        Purpose::FineTune,
        Purpose::Vision,
        Purpose::UserData,
        Purpose::Evals,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::BatchOutput => "batch_output",
            Self::Assistants => "assistants",
            Self::FineTune => "fine-tune",
            Self::Vision => "vision",
            Self::UserData => "user_data",
            Self::Evals => "evals",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "batch" => Self::Batch,
            "batch_output" => Self::BatchOutput,
            "assistants" => Self::Assistants,
            "fine-tune" => Self::FineTune,
            "vision" => Self::Vision,
            "user_data" => Self::UserData,
            "evals" => Self::Evals,
            _ => return None,
        })
    }

    /// Parses the `purpose` form field of an upload: a 400 naming the accepted values
    /// otherwise.
    pub fn parse_uploadable(raw: &str) -> Result<Self, ApiError> {
        match Self::parse(raw) {
            Some(p) if p != Self::BatchOutput => Ok(p),
            _ => {
                let allowed: Vec<&str> = Self::UPLOADABLE.iter().map(|p| p.as_str()).collect();
                Err(ApiError::invalid_value(
                    "purpose",
                    format!(
                        "'{raw}' is not one of [{}] - 'purpose'",
                        allowed
                            .iter()
                            .map(|p| format!("'{p}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
        }
    }

    /// Lifetime a file of this purpose gets when the client asks for none: batch inputs and
    /// outputs expire after 30 days, everything else never.
    pub fn default_ttl_secs(self) -> Option<i64> {
        match self {
            Self::Batch | Self::BatchOutput => Some(DEFAULT_BATCH_FILE_TTL_SECS),
            _ => None,
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client's `expires_after`: seconds after `created_at` (the only anchor OpenAI defines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiresAfter {
    pub seconds: i64,
}

impl ExpiresAfter {
    /// Checks `expires_after[anchor]` and `expires_after[seconds]` as sent in a form.
    /// `field` is the parameter's name for error messages (`expires_after`).
    pub fn parse(
        field: &str,
        anchor: Option<&str>,
        seconds: Option<&str>,
    ) -> Result<Option<Self>, ApiError> {
        if anchor.is_none() && seconds.is_none() {
            return Ok(None);
        }
        let anchor_param = format!("{field}.anchor");
        let seconds_param = format!("{field}.seconds");
        match anchor {
            None => return Err(ApiError::missing(&anchor_param)),
            Some("created_at") => {}
            Some(other) => {
                return Err(ApiError::invalid_value(
                    &anchor_param,
                    format!("Invalid value '{other}' for '{anchor_param}': expected 'created_at'."),
                ));
            }
        }
        let raw = seconds.ok_or_else(|| ApiError::missing(&seconds_param))?;
        let value: i64 = raw.trim().parse().map_err(|_| {
            ApiError::new(
                crate::ErrorKind::InvalidRequest,
                format!("Invalid type for '{seconds_param}': expected an integer, got '{raw}'."),
            )
            .with_param(&seconds_param)
            .with_code("invalid_type")
        })?;
        Self::from_seconds(&seconds_param, value).map(Some)
    }

    /// Checks the range 3600..=2592000.
    pub fn from_seconds(param: &str, seconds: i64) -> Result<Self, ApiError> {
        if !(MIN_EXPIRES_AFTER_SECS..=MAX_EXPIRES_AFTER_SECS).contains(&seconds) {
            return Err(ApiError::invalid_value(
                param,
                format!(
                    "Invalid '{param}': {seconds} is not between {MIN_EXPIRES_AFTER_SECS} and {MAX_EXPIRES_AFTER_SECS} seconds."
                ),
            ));
        }
        Ok(Self { seconds })
    }
}

/// A stored file, as the metadata store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: FileId,
    pub tenant_id: TenantId,
    /// Size in bytes of the stored object.
    pub bytes: u64,
    /// Creation time, unix seconds (what clients see).
    pub created_at: i64,
    /// Creation time in microseconds: the list order, finer than `created_at` so that files
    /// created within one second still list in creation order.
    pub created_at_us: i64,
    /// When the file stops being visible, unix seconds; `None` = never.
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: Purpose,
    /// Key of the bytes in object storage (relative to the store's own prefix).
    pub storage_key: String,
}

impl FileRecord {
    /// Storage key of a file's bytes.
    pub fn storage_key_for(id: &FileId) -> String {
        format!("files/{id}")
    }

    /// Whether the file is past its expiry at `now` (unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The OpenAI JSON object.
    pub fn to_object(&self) -> FileObject {
        FileObject {
            id: self.id.to_string(),
            object: "file",
            bytes: self.bytes,
            created_at: self.created_at,
            expires_at: self.expires_at,
            filename: self.filename.clone(),
            purpose: self.purpose.as_str(),
            status: "processed",
            status_details: None,
        }
    }
}

/// OpenAI's File object. Every key is always serialised (`null` where unset): strict clients
/// require the keys to be present.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FileObject {
    pub id: String,
    #[schema(schema_with = crate::schema::object_file)]
    pub object: &'static str,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, or null: never expires.
    #[schema(required = true)]
    pub expires_at: Option<i64>,
    pub filename: String,
    #[schema(value_type = Purpose)]
    pub purpose: &'static str,
    /// Always `processed`: a file is usable as soon as its upload returns.
    #[schema(schema_with = file_status)]
    pub status: &'static str,
    /// Always null.
    #[schema(required = true)]
    pub status_details: Option<String>,
}

fn file_status() -> utoipa::openapi::schema::ObjectBuilder {
    crate::schema::constant("processed")
}

/// The body of `DELETE /v1/files/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FileDeleted {
    pub id: String,
    #[schema(schema_with = crate::schema::object_file)]
    pub object: &'static str,
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    #[test]
    fn filenames_are_bounded() {
        use super::{MAX_FILENAME_BYTES, check_filename};
        assert!(check_filename("input.jsonl").is_ok());
        assert!(check_filename("dir/sub\\ünïcode.jsonl").is_ok());
        assert!(check_filename(&"é".repeat(MAX_FILENAME_BYTES / 2)).is_ok());
        let e = check_filename(&"é".repeat(MAX_FILENAME_BYTES / 2 + 1)).unwrap_err();
        assert_eq!(
            (e.param.as_deref(), e.code.as_deref()),
            (Some("file"), Some("invalid_filename"))
        );
        for bad in [
            "a\nb",
            "a\rb",
            "nul\0",
            "bell\u{7}",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert!(check_filename(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn purposes_round_trip() {
        for p in Purpose::UPLOADABLE {
            assert_eq!(Purpose::parse(p.as_str()), Some(p));
            assert_eq!(Purpose::parse_uploadable(p.as_str()), Ok(p));
        }
        assert_eq!(Purpose::parse("batch_output"), Some(Purpose::BatchOutput));
        let err = Purpose::parse_uploadable("batch_output").unwrap_err();
        assert_eq!(err.param.as_deref(), Some("purpose"));
        assert!(Purpose::parse_uploadable("nope").is_err());
    }

    #[test]
    fn expires_after_checks_both_fields() {
        assert_eq!(ExpiresAfter::parse("expires_after", None, None), Ok(None));
        assert_eq!(
            ExpiresAfter::parse("expires_after", Some("created_at"), Some("3600")),
            Ok(Some(ExpiresAfter { seconds: 3600 }))
        );
        let e = ExpiresAfter::parse("expires_after", Some("created_at"), Some("10")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("expires_after.seconds"));
        let e = ExpiresAfter::parse("expires_after", Some("now"), Some("3600")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("expires_after.anchor"));
        let e = ExpiresAfter::parse("expires_after", None, Some("3600")).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("missing_required_parameter"));
        let e = ExpiresAfter::parse("expires_after", Some("created_at"), Some("x")).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("invalid_type"));
        let e = ExpiresAfter::parse("expires_after", Some("created_at"), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("expires_after.seconds"));
    }

    #[test]
    fn file_object_serialises_every_key() {
        let rec = FileRecord {
            id: FileId::parse("file-abc").unwrap(),
            tenant_id: TenantId::parse("tenant_t").unwrap(),
            bytes: 12,
            created_at: 100,
            created_at_us: 100_000_000,
            expires_at: None,
            filename: "in.jsonl".into(),
            purpose: Purpose::Batch,
            storage_key: "files/file-abc".into(),
        };
        let json = serde_json::to_value(rec.to_object()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "file-abc", "object": "file", "bytes": 12, "created_at": 100,
                "expires_at": null, "filename": "in.jsonl", "purpose": "batch",
                "status": "processed", "status_details": null
            })
        );
        assert!(!rec.is_expired(i64::MAX));
    }
}
