//! What an attempt's end means, and how long to wait before the next one.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use rand::Rng;

use super::limiter::Signal;

/// How one HTTP attempt ended. Its [`as_str`](Self::as_str) is the `outcome` label of
/// `nightshift_executor_upstream_requests_total` and the `reason` label of
/// `nightshift_executor_upstream_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttemptKind {
    /// 2xx with a JSON object body. Final.
    Success,
    /// 2xx whose body is not a JSON object (truncated, not JSON, or another JSON value): a
    /// server fault. Retried.
    Malformed,
    /// A non-2xx status that retrying cannot fix: 4xx other than 408 and 429, and the odd
    /// 1xx/3xx (redirects are not followed: a redirected POST would turn into a GET). Final.
    Rejected,
    /// 429 Too Many Requests. Retried; a congestion signal.
    RateLimited,
    /// 408 Request Timeout (the upstream gave up waiting for our request). Retried.
    Http408,
    /// 5xx. Retried.
    ServerError,
    /// No complete answer within the attempt's timeout. Retried; a congestion signal when the
    /// attempt had the whole configured timeout (not one cut short by the batch deadline).
    Timeout,
    /// The connection failed: refused, reset, closed before a complete response, TLS, DNS.
    /// Retried.
    ConnectionError,
    /// The answer's body is larger than the upstream's `max_response_bytes` (declared by
    /// `Content-Length`, or found while reading it). Final: the same request would be answered
    /// as large again.
    TooLarge,
}

impl AttemptKind {
    /// Every kind, for tests and dashboards.
    pub const ALL: [Self; 9] = [
        Self::Success,
        Self::Malformed,
        Self::Rejected,
        Self::RateLimited,
        Self::Http408,
        Self::ServerError,
        Self::Timeout,
        Self::ConnectionError,
        Self::TooLarge,
    ];

    /// The metric label value, e.g. `"rate_limited"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Malformed => "malformed",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::Http408 => "http_408",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::ConnectionError => "connection_error",
            Self::TooLarge => "too_large",
        }
    }

    /// Whether another attempt may fix it.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Success | Self::Rejected | Self::TooLarge)
    }

    /// Classifies an HTTP answer by status, and for a 2xx by whether the body is a JSON
    /// object.
    #[cfg(test)]
    pub fn of_answer(status: u16, body: &[u8]) -> Self {
        let object = nightshift_core::results::ResponseBody::from_json(body).is_ok();
        Self::of_checked(status, object)
    }

    /// Classifies an HTTP answer by status, and a 2xx by `object`: whether its body was found
    /// to be one JSON object (the body is read once, by the caller).
    pub fn of_checked(status: u16, object: bool) -> Self {
        match status {
            200..=299 if object => Self::Success,
            200..=299 => Self::Malformed,
            429 => Self::RateLimited,
            408 => Self::Http408,
            500..=599 => Self::ServerError,
            _ => Self::Rejected,
        }
    }

    /// What the attempt tells the concurrency limiter. `full_timeout`: the attempt was given
    /// the whole configured timeout (so a timeout is the upstream's slowness, not the batch
    /// deadline's).
    pub(crate) fn signal(self, full_timeout: bool) -> Signal {
        match self {
            Self::RateLimited => Signal::Congestion,
            Self::Timeout if full_timeout => Signal::Congestion,
            Self::Success | Self::Rejected => Signal::Success,
            Self::Timeout
            | Self::Malformed
            | Self::Http408
            | Self::ServerError
            | Self::ConnectionError
            | Self::TooLarge => Signal::Neutral,
        }
    }
}

/// Exponential backoff with full jitter: before retry `n` (1-based) the wait is drawn
/// uniformly from `[0, min(max, base × 2^(n-1))]`.
///
/// Full jitter (rather than a fixed exponential or "equal jitter") spreads the retries of
/// many requests that failed together — a typical 503 burst — over the whole window, which is
/// what keeps a recovering upstream from being hit by synchronized waves.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    /// Retries drawn so far.
    retries: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            retries: 0,
        }
    }

    /// The upper bound of the wait before retry `retry` (1-based).
    pub(crate) fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base
            .checked_mul(1 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The wait before the next retry.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.retries = self.retries.saturating_add(1);
        self.ceiling(self.retries)
            .mul_f64(rand::rng().random_range(0.0..=1.0))
    }
}

/// How long the upstream asked us to wait, from `retry-after-ms` (milliseconds, fractional
/// allowed; the more precise, so it wins when both are present) or `Retry-After`
/// (delta-seconds, or an HTTP-date measured against `now`; a date in the past is zero).
/// `None` when neither header is present and parsable.
pub(crate) fn server_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && let Ok(delay) = Duration::try_from_secs_f64(ms / 1000.0)
    {
        return Some(delay);
    }
    let value = text(http::header::RETRY_AFTER.as_str())?;
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // Not standard, but seen in the wild: fractional seconds.
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The wait before the next attempt: the larger of our jittered backoff and the server's ask
/// (capped at `max_retry_after`).
///
/// Why the larger: the server's ask is a floor — retrying earlier is known to fail and adds
/// load to an overloaded server. Our backoff is kept when it is longer because every client
/// that got the same `Retry-After` would otherwise come back at the same instant; the jitter
/// spreads them out, and the exponent keeps growing when the server keeps asking for the same
/// short wait.
pub(crate) fn next_wait(
    backoff: Duration,
    server_ask: Option<Duration>,
    max_retry_after: Duration,
) -> Duration {
    match server_ask {
        Some(ask) => backoff.max(ask.min(max_retry_after)),
        None => backoff,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn answers_are_classified() {
        let object = br#" {"id": "x"} "#;
        assert_eq!(AttemptKind::of_answer(200, object), AttemptKind::Success);
        assert_eq!(AttemptKind::of_answer(201, object), AttemptKind::Success);
        assert_eq!(
            AttemptKind::of_answer(200, br#"{"id": "#),
            AttemptKind::Malformed
        );
        assert_eq!(AttemptKind::of_answer(200, b"[1]"), AttemptKind::Malformed);
        assert_eq!(AttemptKind::of_answer(200, b""), AttemptKind::Malformed);
        assert_eq!(
            AttemptKind::of_answer(200, b"{} {}"),
            AttemptKind::Malformed
        );
        assert_eq!(AttemptKind::of_answer(400, object), AttemptKind::Rejected);
        assert_eq!(AttemptKind::of_answer(401, b"nope"), AttemptKind::Rejected);
        assert_eq!(AttemptKind::of_answer(404, object), AttemptKind::Rejected);
        assert_eq!(AttemptKind::of_answer(409, object), AttemptKind::Rejected);
        assert_eq!(AttemptKind::of_answer(302, b""), AttemptKind::Rejected);
        assert_eq!(AttemptKind::of_answer(408, object), AttemptKind::Http408);
        assert_eq!(
            AttemptKind::of_answer(429, object),
            AttemptKind::RateLimited
        );
        assert_eq!(
            AttemptKind::of_answer(500, b"<html>"),
            AttemptKind::ServerError
        );
        assert_eq!(
            AttemptKind::of_answer(503, object),
            AttemptKind::ServerError
        );

        let retryable: Vec<_> = AttemptKind::ALL
            .into_iter()
            .filter(|k| k.is_retryable())
            .collect();
        assert_eq!(retryable.len(), 6);
        assert!(!AttemptKind::Success.is_retryable() && !AttemptKind::Rejected.is_retryable());
        assert!(!AttemptKind::TooLarge.is_retryable());
    }

    #[test]
    fn signals() {
        assert_eq!(AttemptKind::RateLimited.signal(false), Signal::Congestion);
        assert_eq!(AttemptKind::Timeout.signal(true), Signal::Congestion);
        assert_eq!(AttemptKind::Timeout.signal(false), Signal::Neutral);
        assert_eq!(AttemptKind::Success.signal(true), Signal::Success);
        assert_eq!(AttemptKind::Rejected.signal(true), Signal::Success);
        assert_eq!(AttemptKind::ServerError.signal(true), Signal::Neutral);
        assert_eq!(AttemptKind::TooLarge.signal(true), Signal::Neutral);
        let labels: std::collections::HashSet<_> =
            AttemptKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), AttemptKind::ALL.len());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_full_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let ceilings: Vec<_> = (1..=9).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(
            ceilings,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(30));
        for retry in 1..=50 {
            let delay = backoff.next_delay();
            assert!(delay <= backoff.ceiling(retry), "retry {retry}: {delay:?}");
        }
        let mut zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.next_delay(), Duration::ZERO);
    }

    #[test]
    fn server_delay_reads_both_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert_eq!(server_delay(&headers(&[]), now), None);
        assert_eq!(
            server_delay(&headers(&[("retry-after", "3")]), now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            server_delay(
                &headers(&[("retry-after", "1"), ("retry-after-ms", "50")]),
                now
            ),
            Some(Duration::from_millis(50)),
            "retry-after-ms is the more precise"
        );
        assert_eq!(
            server_delay(&headers(&[("retry-after-ms", "12.5")]), now),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(
            server_delay(&headers(&[("retry-after", "0.25")]), now),
            Some(Duration::from_millis(250))
        );
        let in_a_minute = httpdate::fmt_http_date(now + Duration::from_secs(60));
        assert_eq!(
            server_delay(&headers(&[("retry-after", &in_a_minute)]), now),
            Some(Duration::from_secs(60))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
        assert_eq!(
            server_delay(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        for junk in ["soon", "-1", "NaN", "inf"] {
            assert_eq!(
                server_delay(&headers(&[("retry-after", junk)]), now),
                None,
                "{junk}"
            );
        }
        assert_eq!(
            server_delay(
                &headers(&[("retry-after-ms", "-5"), ("retry-after", "2")]),
                now
            ),
            Some(Duration::from_secs(2)),
            "a bad retry-after-ms falls back to Retry-After"
        );
    }

    #[test]
    fn the_wait_is_the_larger_of_backoff_and_the_capped_ask() {
        let s = Duration::from_secs;
        assert_eq!(next_wait(s(2), None, s(60)), s(2));
        assert_eq!(next_wait(s(2), Some(s(5)), s(60)), s(5));
        assert_eq!(next_wait(s(7), Some(s(5)), s(60)), s(7));
        assert_eq!(next_wait(s(2), Some(s(3600)), s(60)), s(60));
    }
}
