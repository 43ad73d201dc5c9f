//! The scheduler's metrics. Names: `nightshift_scheduler_*`, and the work queues' gauges
//! (`nightshift_queue_*`, which the scheduler samples); labels have bounded values.

use nightshift_core::batch::BatchStatus;
use nightshift_core::file::Purpose;
use nightshift_core::validation::ValidationCode;

/// Files registered, by `purpose`.
pub const FILES_REGISTERED: &str = "nightshift_scheduler_files_registered_total";
pub const FILES_DELETED: &str = "nightshift_scheduler_files_deleted_total";
/// Files whose bytes the sweeper removed, by `reason` (`expired` | `deleted`).
pub const FILES_SWEPT: &str = "nightshift_scheduler_files_swept_total";
/// Sweep rounds, by `outcome` (`ok` | `error`).
pub const SWEEPS: &str = "nightshift_scheduler_sweeps_total";
/// Batch status transitions, by the status entered (`to`).
pub const BATCH_TRANSITIONS: &str = "nightshift_scheduler_batch_transitions_total";
/// Validation errors found in batch inputs, by `code`.
pub const VALIDATION_ERRORS: &str = "nightshift_scheduler_validation_errors_total";
/// Creates refused and batches failed by a tenant quota, by `quota` (`max_active_batches`,
/// `max_enqueued_requests`, `max_stored_bytes`).
pub const QUOTA_REFUSALS: &str = "nightshift_scheduler_quota_refusals_total";
/// Chunk tasks handed out to executors.
pub const CHUNKS_DISPATCHED: &str = "nightshift_scheduler_chunks_dispatched_total";
/// Chunks whose result was recorded (each counted once, redeliveries excluded).
pub const CHUNKS_DONE: &str = "nightshift_scheduler_chunks_done_total";
/// Chunk tasks published again because the chunk's lease expired without news (its task,
/// executor or result was lost).
pub const CHUNKS_REDRIVEN: &str = "nightshift_scheduler_chunks_redriven_total";
/// Chunks given up, by `reason`: `attempts` (its executors kept falling silent) or
/// `executor` (an executor reported it can never run). Their unfinished lines fail with
/// `chunk_failed`.
pub const CHUNKS_FAILED: &str = "nightshift_scheduler_chunks_failed_total";
/// Validation attempts that hit an infrastructure fault (S3 or the metadata store) and
/// will be retried.
pub const VALIDATION_RETRIES: &str = "nightshift_scheduler_validation_retries_total";

/// Gauge `{status}`: batches currently in each non-terminal status, sampled every
/// `metrics_interval`.
pub const BATCHES: &str = "nightshift_scheduler_batches";
/// Gauge `{status}`, seconds: age (now − `created_at`) of the oldest batch in each
/// non-terminal status, 0 when there is none. A batch stuck in a status shows here.
pub const BATCH_OLDEST_AGE_SECONDS: &str = "nightshift_scheduler_batch_oldest_age_seconds";
/// Gauge `{queue}`: messages ready for delivery in each work queue, as the scheduler samples
/// them every `metrics_interval`.
pub const QUEUE_READY_MESSAGES: &str = "nightshift_queue_ready_messages";
/// Gauge `{queue}`: messages in each queue's dead-letter queue (nothing consumes them: an
/// operator must look). Sampled with [`QUEUE_READY_MESSAGES`].
pub const QUEUE_DEAD_LETTERED_MESSAGES: &str = "nightshift_queue_dead_lettered_messages";

/// The statuses [`BATCHES`] and [`BATCH_OLDEST_AGE_SECONDS`] report.
pub const LIVE_STATUSES: [BatchStatus; 4] = [
    BatchStatus::Validating,
    BatchStatus::InProgress,
    BatchStatus::Finalizing,
    BatchStatus::Cancelling,
];

/// Every status a batch can enter: the `to` values of [`BATCH_TRANSITIONS`].
const ALL_STATUSES: [BatchStatus; 8] = [
    BatchStatus::Validating,
    BatchStatus::Failed,
    BatchStatus::InProgress,
    BatchStatus::Finalizing,
    BatchStatus::Completed,
    BatchStatus::Expired,
    BatchStatus::Cancelling,
    BatchStatus::Cancelled,
];

/// Every validation code: the `code` values of [`VALIDATION_ERRORS`].
const ALL_CODES: [ValidationCode; 14] = [
    ValidationCode::InvalidJsonLine,
    ValidationCode::MissingRequiredParameter,
    ValidationCode::InvalidValue,
    ValidationCode::InvalidUrl,
    ValidationCode::DuplicateCustomId,
    ValidationCode::StreamingUnsupported,
    ValidationCode::InvalidRequest,
    ValidationCode::ModelMismatch,
    ValidationCode::ModelNotFound,
    ValidationCode::EmptyFile,
    ValidationCode::TooManyTasks,
    ValidationCode::FileTooLarge,
    ValidationCode::LineTooLarge,
    ValidationCode::EndpointNotServed,
];

/// Makes every counter appear at zero with the label values known up front, so "nothing
/// yet" reads as 0 rather than as no series; and describes the families.
pub fn register() {
    use metrics::{Unit, counter, describe_gauge};
    for name in [
        FILES_DELETED,
        CHUNKS_DISPATCHED,
        CHUNKS_DONE,
        CHUNKS_REDRIVEN,
        VALIDATION_RETRIES,
    ] {
        counter!(name).increment(0);
    }
    for reason in ["attempts", "executor"] {
        counter!(CHUNKS_FAILED, "reason" => reason).increment(0);
    }
    for purpose in Purpose::UPLOADABLE {
        counter!(FILES_REGISTERED, "purpose" => purpose.as_str()).increment(0);
    }
    for reason in ["expired", "deleted"] {
        counter!(FILES_SWEPT, "reason" => reason).increment(0);
    }
    for outcome in ["ok", "error"] {
        counter!(SWEEPS, "outcome" => outcome).increment(0);
    }
    for status in ALL_STATUSES {
        counter!(BATCH_TRANSITIONS, "to" => status.as_str()).increment(0);
    }
    for code in ALL_CODES {
        counter!(VALIDATION_ERRORS, "code" => code.as_str()).increment(0);
    }
    counter!(VALIDATION_ERRORS, "code" => nightshift_metadata::REQUEST_LIMIT_EXCEEDED).increment(0);
    for quota in nightshift_metadata::Quota::ALL {
        counter!(QUOTA_REFUSALS, "quota" => quota.setting()).increment(0);
    }
    describe_gauge!(BATCHES, Unit::Count, "Batches in each non-terminal status.");
    describe_gauge!(
        BATCH_OLDEST_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest batch in each non-terminal status (0: none)."
    );
    describe_gauge!(
        QUEUE_READY_MESSAGES,
        Unit::Count,
        "Messages ready for delivery in each work queue."
    );
    describe_gauge!(
        QUEUE_DEAD_LETTERED_MESSAGES,
        Unit::Count,
        "Messages in each work queue's dead-letter queue."
    );
}

/// Webhook delivery attempts, by `result`: `delivered`, `http_error` (a non-2xx answer,
/// redirects included), `timeout`, `network_error`, `refused` (a non-public address).
pub const WEBHOOK_ATTEMPTS: &str = "nightshift_scheduler_webhook_attempts_total";
/// Webhook deliveries that ended, by `outcome`: `delivered`, or `gave_up` (still failing at
/// `scheduler.webhooks.max_age`).
pub const WEBHOOK_DELIVERIES: &str = "nightshift_scheduler_webhook_deliveries_total";
/// Gauge: webhook deliveries pending in the outbox (due now or waiting for a retry).
pub const WEBHOOK_BACKLOG: &str = "nightshift_scheduler_webhook_backlog_deliveries";

/// The webhook families at zero, with their label values.
pub fn register_webhooks() {
    use metrics::{Unit, counter, describe_gauge, gauge};
    for result in [
        "delivered",
        "http_error",
        "timeout",
        "network_error",
        "refused",
    ] {
        counter!(WEBHOOK_ATTEMPTS, "result" => result).increment(0);
    }
    for outcome in ["delivered", "gave_up"] {
        counter!(WEBHOOK_DELIVERIES, "outcome" => outcome).increment(0);
    }
    gauge!(WEBHOOK_BACKLOG).set(0.0);
    describe_gauge!(
        WEBHOOK_BACKLOG,
        Unit::Count,
        "Webhook deliveries pending in the outbox."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new status or code fails to compile here until the lists above have it.
    #[test]
    fn the_label_lists_are_complete() {
        for status in ALL_STATUSES {
            match status {
                BatchStatus::Validating
                | BatchStatus::Failed
                | BatchStatus::InProgress
                | BatchStatus::Finalizing
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelling
                | BatchStatus::Cancelled => {}
            }
        }
        for code in ALL_CODES {
            match code {
                ValidationCode::InvalidJsonLine
                | ValidationCode::MissingRequiredParameter
                | ValidationCode::InvalidValue
                | ValidationCode::InvalidUrl
                | ValidationCode::DuplicateCustomId
                | ValidationCode::StreamingUnsupported
                | ValidationCode::InvalidRequest
                | ValidationCode::ModelMismatch
                | ValidationCode::ModelNotFound
                | ValidationCode::EmptyFile
                | ValidationCode::TooManyTasks
                | ValidationCode::FileTooLarge
                | ValidationCode::LineTooLarge
                | ValidationCode::EndpointNotServed => {}
            }
        }
        let unique =
            |names: Vec<&str>| names.iter().collect::<std::collections::HashSet<_>>().len();
        assert_eq!(unique(ALL_STATUSES.map(BatchStatus::as_str).to_vec()), 8);
        assert_eq!(unique(ALL_CODES.map(ValidationCode::as_str).to_vec()), 14);
    }
}
