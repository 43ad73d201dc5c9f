//! Metrics that belong to no single service: the work queues as their consumers see them.
//! Names follow `nightshift_<subsystem>_<name>_<unit>`; `queue` is a queue kind's stable name
//! (`chunk-tasks`, `chunk-results`, `finalize-jobs`).

/// Label: the queue kind.
pub const LABEL_QUEUE: &str = "queue";

/// Histogram `{queue}`, seconds: from a message's publication (its `published-at` header) to
/// its delivery to a consumer — how far behind the consumers are. A redelivered message
/// counts again, from its first publication.
pub const QUEUE_DELIVERY_LAG_SECONDS: &str = "nightshift_queue_delivery_lag_seconds";

/// Buckets of [`QUEUE_DELIVERY_LAG_SECONDS`]: milliseconds (an idle queue) to an hour (a
/// backlog, or redeliveries after a consumer timeout).
pub const DELIVERY_LAG_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    1800.0, 3600.0,
];

/// Registers units and help texts with the installed recorder.
pub(crate) fn describe() {
    ::metrics::describe_histogram!(
        QUEUE_DELIVERY_LAG_SECONDS,
        ::metrics::Unit::Seconds,
        "Time from a message's publication to its delivery to a consumer."
    );
}
