//! Every metric the queue [worker](crate::worker) exports, by name, and their descriptions.
//!
//! Names follow `nightshift_<subsystem>_<name>_<unit>`, counters end in `_total`. Label values
//! are bounded: `queue` is a [`QueueKind`] name, `disposition` one of [`DISPOSITIONS`],
//! `reason` one of [`REASONS`].

use crate::QueueKind;

/// Label: the queue, a [`QueueKind::as_str`] name.
pub const LABEL_QUEUE: &str = "queue";
/// Label: how a delivery was settled, one of [`DISPOSITIONS`].
pub const LABEL_DISPOSITION: &str = "disposition";
/// Label: why a fresh copy of a message was published, one of [`REASONS`].
pub const LABEL_REASON: &str = "reason";

/// Counter `{queue, disposition}`: deliveries settled by a worker: `done` (acked), `retry`
/// (requeued after a delay; counts toward the delivery limit), `poison` (dead-lettered),
/// `republish` (a continuation: copy published, original acked), `outage` (held in a
/// dependency outage for `max_hold`, then copied and acked), `abandoned` (shutdown: copied
/// and acked, or requeued if publishing failed).
pub const HANDLED_TOTAL: &str = "nightshift_queue_handled_total";
/// Gauge `{queue}`: deliveries held right now because a dependency of their handler is down
/// (while it is above 0, that worker takes no new delivery).
pub const OUTAGE_HOLDS: &str = "nightshift_queue_outage_holds";
/// Counter `{queue, reason}`: fresh copies of messages published by workers: `continuation`
/// (the handler asked for it), `outage` (held for `max_hold`), `shutdown` (abandoned at
/// shutdown).
pub const REPUBLISHED_TOTAL: &str = "nightshift_queue_republished_total";

/// Every value of [`LABEL_DISPOSITION`].
pub const DISPOSITIONS: [&str; 6] = [
    "done",
    "retry",
    "poison",
    "republish",
    "outage",
    "abandoned",
];
/// Every value of [`LABEL_REASON`].
pub const REASONS: [&str; 3] = ["continuation", "outage", "shutdown"];

/// Registers units and help texts with the installed recorder (the worker calls it when it
/// starts; calling it again is harmless).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        HANDLED_TOTAL,
        Unit::Count,
        "Queue deliveries settled by a worker, by disposition."
    );
    describe_gauge!(
        OUTAGE_HOLDS,
        Unit::Count,
        "Queue deliveries held while a dependency of their handler is down."
    );
    describe_counter!(
        REPUBLISHED_TOTAL,
        Unit::Count,
        "Fresh copies of queue messages published by workers, by reason."
    );
}

/// Makes the series of `kind` appear at zero, so "nothing yet" reads 0.
pub fn register(kind: QueueKind) {
    use metrics::{counter, gauge};
    let queue = kind.as_str();
    for disposition in DISPOSITIONS {
        counter!(HANDLED_TOTAL, LABEL_QUEUE => queue, LABEL_DISPOSITION => disposition)
            .increment(0);
    }
    for reason in REASONS {
        counter!(REPUBLISHED_TOTAL, LABEL_QUEUE => queue, LABEL_REASON => reason).increment(0);
    }
    gauge!(OUTAGE_HOLDS, LABEL_QUEUE => queue).increment(0.0);
}
