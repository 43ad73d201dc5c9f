//! The scheduler's errors, and their one mapping onto the shared error vocabulary.
//!
//! Every fallible step of the scheduler — a gRPC handler, a dispatch round, a sweep, a
//! validation read, a chunk result — fails with a [`SchedulerError`]. Its class is decided
//! here once: a dependency that failed (the metadata store, the queue, object storage) is
//! `unavailable` (503, retry later); a uniqueness rule the store refused is a `conflict`
//! (409); what the caller got wrong is the caller's 4xx. gRPC handlers return it through
//! [`Status::from`]; the chunk-result consumer reads [`SchedulerError::outage`] to hold a
//! delivery rather than dead-letter it.

use nightshift_core::{ApiError, ErrorKind, quota};
use nightshift_metadata::{MetadataError, Quota, QuotaExceeded};
use nightshift_proto::status::status_from_api_error;
use nightshift_queue::QueueError;
use nightshift_storage::StorageError;
use tonic::Status;

/// Why a scheduler step failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The metadata store failed (unavailable), or refused a write that breaks a uniqueness
    /// rule (a conflict).
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The queue failed: a task or job was not published (or may not have been).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Object storage failed while reading a batch's input.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// No such object, or it belongs to another tenant. `object` is OpenAI's noun
    /// (`"File"`, `"Batch"`).
    #[error("no such {object} object: {id}")]
    NotFound { object: &'static str, id: String },
    /// The object is in a state that forbids the call; retrying will not help.
    #[error("{0}")]
    Conflict(String),
    /// A request field has a value the scheduler does not accept.
    #[error("invalid {param}: {message}")]
    InvalidValue {
        param: &'static str,
        message: &'static str,
    },
    /// A required request field is absent.
    #[error("missing {0}")]
    Missing(&'static str),
    /// No tenant holds this API key.
    #[error("incorrect API key")]
    Unauthenticated,
    /// A peer service (gateway, finalizer, executor) sent what it never should: a malformed
    /// id, an unknown chunk report. The sender has a bug; asking again cannot help.
    #[error("{0}")]
    Malformed(String),
    /// A client mistake already in the shared vocabulary, with its own status and `code` (an
    /// `Idempotency-Key` reused with another request, a retry with nothing to retry).
    #[error("{}", .0.message)]
    Refused(ApiError),
}

impl SchedulerError {
    /// The dependency whose outage caused this error (`"metadata"`, `"queue"`,
    /// `"object_storage"`), or `None` when waiting for it cannot help: a store conflict (the
    /// same write conflicts again), a message the queue refuses, a missing object.
    pub fn outage(&self) -> Option<&'static str> {
        match self {
            Self::Metadata(MetadataError::Backend(_)) => Some("metadata"),
            Self::Queue(e) if e.kind() == ErrorKind::Unavailable => Some("queue"),
            Self::Storage(StorageError::Backend(_)) => Some("object_storage"),
            Self::Metadata(MetadataError::Conflict(_) | MetadataError::QuotaExceeded(_))
            | Self::Queue(_)
            | Self::Storage(_)
            | Self::NotFound { .. }
            | Self::Conflict(_)
            | Self::InvalidValue { .. }
            | Self::Missing(_)
            | Self::Unauthenticated
            | Self::Malformed(_)
            | Self::Refused(_) => None,
        }
    }
}

/// The one mapping: what a client is told. Dependency detail stays in the logs.
impl From<&SchedulerError> for ApiError {
    fn from(e: &SchedulerError) -> Self {
        match e {
            SchedulerError::Metadata(MetadataError::Conflict(_)) => {
                ApiError::new(ErrorKind::Conflict, "The object already exists.").not_retryable()
            }
            SchedulerError::Metadata(MetadataError::Backend(_)) => {
                ApiError::unavailable("The metadata store is unavailable.")
            }
            SchedulerError::Metadata(MetadataError::QuotaExceeded(e)) => quota_error(e),
            SchedulerError::Queue(e) => match e.kind() {
                ErrorKind::Unavailable => ApiError::unavailable("The work queue is unavailable."),
                _ => ApiError::internal("The work queue refused a message."),
            },
            SchedulerError::Storage(StorageError::Backend(_)) => {
                ApiError::unavailable("Object storage is unavailable.")
            }
            SchedulerError::Storage(_) => ApiError::internal("An object could not be read."),
            SchedulerError::NotFound { object, id } => ApiError::no_such(object, id),
            SchedulerError::Conflict(message) => {
                ApiError::new(ErrorKind::Conflict, message.clone()).not_retryable()
            }
            SchedulerError::InvalidValue { param, message } => {
                ApiError::invalid_value(param, *message)
            }
            SchedulerError::Missing(param) => ApiError::missing(param),
            SchedulerError::Unauthenticated => {
                ApiError::unauthenticated("Incorrect API key provided.")
            }
            SchedulerError::Malformed(message) => ApiError::internal(message.clone()),
            SchedulerError::Refused(api) => api.clone(),
        }
    }
}

/// What a client is told when a write would pass one of its tenant's quotas
/// ([`nightshift_core::quota`]).
fn quota_error(e: &QuotaExceeded) -> ApiError {
    match e.quota {
        Quota::ActiveBatches => quota::active_batch_limit_exceeded(e.held),
        Quota::EnqueuedRequests => ApiError::new(
            ErrorKind::RateLimited,
            quota::request_limit_message(e.adding, e.held, e.limit),
        )
        .with_code(quota::REQUEST_LIMIT_EXCEEDED)
        .not_retryable(),
        Quota::StoredBytes => quota::storage_quota_exceeded(e.adding, e.held, e.limit),
    }
}

/// Answers a gRPC call with the error; a failure on the scheduler's side (a dependency, a
/// caller's bug) is logged here, once, and a quota refusal counted.
impl From<SchedulerError> for Status {
    fn from(e: SchedulerError) -> Self {
        if let SchedulerError::Metadata(MetadataError::QuotaExceeded(q)) = &e {
            ::metrics::counter!(crate::metrics::QUOTA_REFUSALS, "quota" => q.quota.setting())
                .increment(1);
            tracing::info!(
                quota = q.quota.setting(),
                limit = q.limit,
                held = q.held,
                adding = q.adding,
                "refused by a tenant quota"
            );
        }
        let api = ApiError::from(&e);
        if matches!(api.kind, ErrorKind::Unavailable | ErrorKind::Internal) {
            tracing::error!(error = %e, "call failed");
        }
        status_from_api_error(&api)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: SchedulerError) -> ErrorKind {
        ApiError::from(&e).kind
    }

    #[test]
    fn a_store_outage_is_unavailable_and_a_store_conflict_is_a_conflict() {
        let outage = SchedulerError::from(MetadataError::Backend("connection refused".into()));
        assert_eq!(outage.outage(), Some("metadata"));
        assert_eq!(kind(outage), ErrorKind::Unavailable);
        let conflict = SchedulerError::from(MetadataError::Conflict("duplicate key".into()));
        assert_eq!(conflict.outage(), None);
        let api = ApiError::from(&conflict);
        assert_eq!(api.kind, ErrorKind::Conflict);
        assert_eq!(api.retryable, Some(false));
        // the database's own words stay in the logs
        assert!(!api.message.contains("duplicate key"), "{}", api.message);
    }

    #[test]
    fn dependency_failures_are_outages_and_client_mistakes_are_not() {
        let queue = SchedulerError::from(QueueError::Unavailable("closed".into()));
        assert_eq!(queue.outage(), Some("queue"));
        assert_eq!(kind(queue), ErrorKind::Unavailable);
        let refused = SchedulerError::from(QueueError::Rejected("nack".into()));
        assert_eq!(refused.outage(), None);
        assert_eq!(kind(refused), ErrorKind::Internal);
        let storage = SchedulerError::from(StorageError::Backend("timeout".into()));
        assert_eq!(storage.outage(), Some("object_storage"));
        assert_eq!(kind(storage), ErrorKind::Unavailable);
        for (e, expected) in [
            (
                SchedulerError::NotFound {
                    object: "Batch",
                    id: "batch_x".into(),
                },
                ErrorKind::NotFound,
            ),
            (
                SchedulerError::Conflict("Cannot cancel.".into()),
                ErrorKind::Conflict,
            ),
            (
                SchedulerError::InvalidValue {
                    param: "purpose",
                    message: "unknown purpose",
                },
                ErrorKind::InvalidRequest,
            ),
            (SchedulerError::Missing("name"), ErrorKind::InvalidRequest),
            (SchedulerError::Unauthenticated, ErrorKind::Unauthenticated),
            (
                SchedulerError::Malformed("invalid tenant id from caller".into()),
                ErrorKind::Internal,
            ),
        ] {
            assert_eq!(e.outage(), None, "{e}");
            assert_eq!(kind(e), expected);
        }
    }

    #[test]
    fn quota_refusals_are_final_client_errors() {
        let refused = |quota| {
            let e = SchedulerError::from(MetadataError::QuotaExceeded(QuotaExceeded {
                quota,
                limit: 2,
                held: 2,
                adding: 1,
            }));
            assert_eq!(e.outage(), None);
            ApiError::from(&e)
        };
        let api = refused(Quota::ActiveBatches);
        assert_eq!(api.kind, ErrorKind::RateLimited);
        assert_eq!(
            api.code.as_deref(),
            Some(quota::ACTIVE_BATCH_LIMIT_EXCEEDED)
        );
        assert_eq!(api.retryable, Some(false));
        let api = refused(Quota::StoredBytes);
        assert_eq!(api.kind, ErrorKind::InvalidRequest);
        assert_eq!(api.code.as_deref(), Some(quota::STORAGE_QUOTA_EXCEEDED));
        assert_eq!(api.param.as_deref(), Some("file"));
        assert_eq!(api.retryable, Some(false));
        let api = refused(Quota::EnqueuedRequests);
        assert_eq!(api.code.as_deref(), Some(quota::REQUEST_LIMIT_EXCEEDED));
    }

    #[test]
    fn client_fields_survive_the_mapping() {
        let api = ApiError::from(&SchedulerError::NotFound {
            object: "File",
            id: "file-1".into(),
        });
        assert_eq!(api, ApiError::no_such("File", "file-1"));
        let api = ApiError::from(&SchedulerError::InvalidValue {
            param: "holder",
            message: "a lease needs a holder",
        });
        assert_eq!(
            api,
            ApiError::invalid_value("holder", "a lease needs a holder")
        );
        let api = ApiError::from(&SchedulerError::Unauthenticated);
        assert_eq!(api.code.as_deref(), Some("invalid_api_key"));
    }
}
