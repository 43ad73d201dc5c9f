//! Wall-clock helpers. Timestamps on the wire are unix seconds, as in OpenAI's API.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the unix epoch, now.
pub fn now_unix() -> i64 {
    now_unix_micros() / 1_000_000
}

/// Microseconds since the unix epoch, now. Used where creation order must be finer than a
/// second (list ordering), never on the wire.
pub fn now_unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
