//! Every metric the executor exports, by name, and their descriptions.
//!
//! Names follow `nightshift_<subsystem>_<name>_<unit>`, counters end in `_total`. Label values
//! are bounded: `upstream` is an operator-configured name from the routing table, `outcome`
//! and `reason` come from [`upstream::AttemptKind`](crate::upstream::AttemptKind),
//! [`ChunkDisposition`](crate::service::ChunkDisposition) or [`LineKind`](crate::runner::LineKind),
//! `operation` is one of two fixed names. Never a batch, tenant or request id.
//!
//! A leaf: the modules that record metrics import this one, never the other way round. The
//! label values known at start-up are handed to [`register`] by the service.

/// Label: the upstream's configured name.
pub const LABEL_UPSTREAM: &str = "upstream";
/// Label: how one HTTP attempt ended, an [`AttemptKind`](crate::upstream::AttemptKind) name.
pub const LABEL_OUTCOME: &str = "outcome";
/// Label: why an attempt is retried, an [`AttemptKind`](crate::upstream::AttemptKind) name.
pub const LABEL_REASON: &str = "reason";

/// Counter `{upstream, outcome}`: HTTP attempts sent to upstreams, by how they ended. A
/// request retried twice counts three times.
pub const UPSTREAM_REQUESTS_TOTAL: &str = "nightshift_executor_upstream_requests_total";
/// Histogram `{upstream}`, seconds: one attempt, from sending to the last body byte (or the
/// failure).
pub const UPSTREAM_REQUEST_DURATION_SECONDS: &str =
    "nightshift_executor_upstream_request_duration_seconds";
/// Histogram `{upstream}`, seconds: one attempt, from sending until the response headers
/// arrived.
pub const UPSTREAM_TIME_TO_FIRST_BYTE_SECONDS: &str =
    "nightshift_executor_upstream_time_to_first_byte_seconds";
/// Counter `{upstream, reason}`: retries scheduled, by the failure that caused them.
pub const UPSTREAM_RETRIES_TOTAL: &str = "nightshift_executor_upstream_retries_total";
/// Gauge `{upstream}`: attempts in flight right now (holding a concurrency permit).
pub const UPSTREAM_IN_FLIGHT: &str = "nightshift_executor_upstream_in_flight";
/// Gauge `{upstream}`: the adaptive concurrency limit right now (under the lease's ceiling).
pub const UPSTREAM_LIMIT: &str = "nightshift_executor_upstream_limit";
/// Gauge `{upstream}`: permits of the upstream's shared `max_concurrency` this executor's
/// lease holds (or its equal split while the live state is unavailable).
pub const UPSTREAM_LEASE_PERMITS: &str = "nightshift_executor_upstream_lease_permits";

/// Counter `{outcome}`: chunk runs (one per handling of a delivery; a delivery held through
/// an outage runs several times), by how they ended: `completed` (`DONE` published, task
/// acked), `continued` (the time budget ended the run; a fresh copy continues it), `held` (a
/// dependency is down: the task waits and runs again, uncounted), `requeued` (failed on its
/// own; requeued after a delay), `failed` (it can never run: `FAILED` published, task
/// dead-lettered), `dead_lettered` (undecodable task), `abandoned` (shutdown interrupted it;
/// re-published).
pub const CHUNKS_TOTAL: &str = "nightshift_executor_chunks_total";
/// Histogram `{outcome}`, seconds: one chunk run, from decoding the task to its outcome;
/// `outcome` as for [`CHUNKS_TOTAL`].
pub const CHUNK_DURATION_SECONDS: &str = "nightshift_executor_chunk_duration_seconds";
/// Gauge: chunks being handled right now.
pub const CHUNKS_IN_PROGRESS: &str = "nightshift_executor_chunks_in_progress";
/// Counter `{outcome}`: result lines written to parts: `succeeded` (2xx, output file),
/// `cancelled` (`batch_cancelled`), `expired` (`batch_expired`), `failed` (every other error
/// line). A chunk that runs twice counts its lines twice.
pub const LINES_TOTAL: &str = "nightshift_executor_lines_total";
/// Counter `{operation}`: failed calls to the live state (`record`, `is_cancelled`,
/// `lease_permits`). The chunk goes on regardless: live counts are a view, the parts are the
/// record; a lease that cannot be renewed falls back to an equal split of the cap.
pub const STATE_ERRORS_TOTAL: &str = "nightshift_executor_state_errors_total";
/// Label: which live-state call failed.
pub const LABEL_OPERATION: &str = "operation";
/// [`LABEL_OPERATION`] of a failed permit-lease call (the upstream's shared cap).
pub const OPERATION_LEASE_PERMITS: &str = "lease_permits";
/// Every value of [`LABEL_OPERATION`].
pub const OPERATIONS: [&str; 3] = ["record", "is_cancelled", OPERATION_LEASE_PERMITS];

/// Registers units and help texts with the installed recorder. Call once at start-up, after
/// installing the recorder; recording works without it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        UPSTREAM_REQUESTS_TOTAL,
        Unit::Count,
        "HTTP attempts sent to upstreams, by outcome."
    );
    describe_histogram!(
        UPSTREAM_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one upstream attempt, to the last body byte or the failure."
    );
    describe_histogram!(
        UPSTREAM_TIME_TO_FIRST_BYTE_SECONDS,
        Unit::Seconds,
        "Time from sending an upstream attempt to its response headers."
    );
    describe_counter!(
        UPSTREAM_RETRIES_TOTAL,
        Unit::Count,
        "Upstream retries scheduled, by the failure that caused them."
    );
    describe_gauge!(
        UPSTREAM_IN_FLIGHT,
        Unit::Count,
        "Upstream attempts in flight."
    );
    describe_gauge!(
        UPSTREAM_LIMIT,
        Unit::Count,
        "Adaptive (AIMD) concurrency limit of each upstream."
    );
    describe_gauge!(
        UPSTREAM_LEASE_PERMITS,
        Unit::Count,
        "Permits of each upstream's shared max_concurrency held by this executor's lease."
    );
    describe_counter!(
        CHUNKS_TOTAL,
        Unit::Count,
        "Chunk deliveries handled, by how they were settled."
    );
    describe_histogram!(
        CHUNK_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one chunk delivery, from decoding to settlement."
    );
    describe_gauge!(CHUNKS_IN_PROGRESS, Unit::Count, "Chunks being handled.");
    describe_counter!(
        LINES_TOTAL,
        Unit::Count,
        "Result lines written to parts, by outcome."
    );
    describe_counter!(
        STATE_ERRORS_TOTAL,
        Unit::Count,
        "Failed live-state calls (the chunk goes on)."
    );
}

/// The label values known at start-up, for [`register`].
#[derive(Debug, Clone, Copy)]
pub struct KnownLabels<'a> {
    /// Every upstream name of the routing table.
    pub upstreams: &'a [&'a str],
    /// Every `outcome` of an upstream attempt, with whether it is retried (then it is also a
    /// `reason` of [`UPSTREAM_RETRIES_TOTAL`]).
    pub attempts: &'a [(&'static str, bool)],
    /// Every `outcome` of a chunk run.
    pub chunks: &'a [&'static str],
    /// Every `outcome` of a result line.
    pub lines: &'a [&'static str],
}

/// Makes every counter appear at zero with the label values known up front (each upstream of
/// the routing table × every outcome, ...), so "no failure yet" reads as 0 rather than as no
/// series.
pub fn register(labels: KnownLabels<'_>) {
    use metrics::{counter, gauge};
    for &upstream in labels.upstreams {
        let name = upstream.to_owned();
        for &(outcome, retried) in labels.attempts {
            counter!(UPSTREAM_REQUESTS_TOTAL, LABEL_UPSTREAM => name.clone(), LABEL_OUTCOME => outcome)
                .increment(0);
            if retried {
                counter!(UPSTREAM_RETRIES_TOTAL, LABEL_UPSTREAM => name.clone(), LABEL_REASON => outcome)
                    .increment(0);
            }
        }
    }
    for &outcome in labels.chunks {
        counter!(CHUNKS_TOTAL, LABEL_OUTCOME => outcome).increment(0);
    }
    for &outcome in labels.lines {
        counter!(LINES_TOTAL, LABEL_OUTCOME => outcome).increment(0);
    }
    for operation in OPERATIONS {
        counter!(STATE_ERRORS_TOTAL, LABEL_OPERATION => operation).increment(0);
    }
    gauge!(CHUNKS_IN_PROGRESS).increment(0.0);
}
