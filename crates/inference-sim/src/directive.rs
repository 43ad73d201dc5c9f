//! The `sim` directive: a top-level object in a request body that scripts this request's
//! fate. The format is documented in the crate docs; this module parses it strictly so a typo
//! in a test script is a 400, not a silently healthy request.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::openai::ApiError;

/// The directive as written in the body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirective {
    status: Option<u16>,
    fail_times: Option<u32>,
    kind: Option<String>,
    retry_after: Option<f64>,
    latency_ms: Option<u64>,
    response_bytes: Option<u64>,
    chunked: Option<bool>,
}

/// How a request fails.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure {
    /// An HTTP error answered in OpenAI's envelope.
    Status {
        status: StatusCode,
        /// Seconds for `Retry-After`/`retry-after-ms`; absent means no such header.
        retry_after_secs: Option<f64>,
    },
    /// Held open, then the connection is closed unanswered.
    Timeout,
    /// The connection is closed at once, unanswered.
    Drop,
    /// 200 with a truncated JSON body.
    Malformed,
}

/// A parsed `sim` directive.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Directive {
    /// The scripted failure, if the directive asks for one.
    pub(crate) failure: Option<Failure>,
    /// How many attempts fail; `None` means every attempt.
    pub(crate) fail_times: Option<u32>,
    /// Overrides the latency model for this request.
    pub(crate) latency: Option<Duration>,
    /// Overrides [`SimConfig::response_bytes`](crate::SimConfig::response_bytes): the success
    /// body is padded to this many bytes.
    pub(crate) response_bytes: Option<u64>,
    /// Overrides [`SimConfig::chunked_responses`](crate::SimConfig::chunked_responses): the
    /// success body is sent without `Content-Length`.
    pub(crate) chunked: Option<bool>,
}

impl Directive {
    /// Reads the `sim` key of a request body; no key gives the empty directive.
    pub(crate) fn from_body(body: &Map<String, Value>) -> Result<Self, ApiError> {
        let value = match body.get("sim") {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(value) => value,
        };
        let invalid = |message: String| {
            ApiError::invalid(format!("invalid sim directive: {message}")).param("sim")
        };
        let raw: RawDirective =
            serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;

        let status = raw
            .status
            .map(|code| match StatusCode::from_u16(code) {
                Ok(status) if status.is_client_error() || status.is_server_error() => Ok(status),
                _ => Err(invalid(format!(
                    "status must be within 400..=599, got {code}"
                ))),
            })
            .transpose()?;

        let failure = match raw.kind.as_deref() {
            None | Some("status") | Some("error") => match (status, raw.fail_times) {
                (Some(status), _) => Some(status),
                // `fail_times` alone fails with a plain 500.
                (None, Some(_)) => Some(StatusCode::INTERNAL_SERVER_ERROR),
                (None, None) if raw.kind.is_some() => Some(StatusCode::INTERNAL_SERVER_ERROR),
                (None, None) => None,
            }
            .map(|status| Failure::Status {
                status,
                retry_after_secs: raw.retry_after,
            }),
            Some(kind @ ("timeout" | "drop" | "malformed")) => {
                if status.is_some() || raw.retry_after.is_some() {
                    return Err(invalid(format!(
                        "status and retry_after do not apply to kind `{kind}`"
                    )));
                }
                Some(match kind {
                    "timeout" => Failure::Timeout,
                    "drop" => Failure::Drop,
                    _ => Failure::Malformed,
                })
            }
            Some(kind) => match kind
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(code) if code.is_client_error() || code.is_server_error() => {
                    if status.is_some_and(|s| s != code) {
                        return Err(invalid(format!("kind `{kind}` contradicts status")));
                    }
                    Some(Failure::Status {
                        status: code,
                        retry_after_secs: raw.retry_after,
                    })
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown kind `{kind}`: expected status, timeout, drop, malformed or an HTTP error code"
                    )));
                }
            },
        };
        if let Some(secs) = raw.retry_after
            && (!secs.is_finite() || secs < 0.0)
        {
            return Err(invalid(format!("retry_after must be >= 0, got {secs}")));
        }
        if raw.retry_after.is_some() && failure.is_none() {
            return Err(invalid("retry_after needs a status or kind".to_owned()));
        }

        Ok(Self {
            failure,
            fail_times: raw.fail_times,
            latency: raw.latency_ms.map(Duration::from_millis),
            response_bytes: raw.response_bytes,
            chunked: raw.chunked,
        })
    }

    /// The failure this attempt suffers, given it is attempt number `attempt` (1-based) of
    /// its request identity.
    pub(crate) fn failure_for_attempt(&self, attempt: u32) -> Option<Failure> {
        match self.fail_times {
            Some(times) if attempt > times => None,
            _ => self.failure.clone(),
        }
    }
}

/// Attempt counts per request identity (a hash of the whole body), for `fail_times`.
///
/// Bounded: at most `capacity` identities are remembered; inserting beyond that forgets the
/// oldest-inserted first, whose next attempt then counts as the first again. Only requests
/// with a `fail_times` directive are remembered.
#[derive(Debug)]
pub(crate) struct AttemptMemory {
    /// Most identities kept.
    capacity: usize,
    /// Attempts seen so far per identity.
    counts: HashMap<[u8; 16], u32>,
    /// Identities in insertion order, oldest first, for eviction.
    order: VecDeque<[u8; 16]>,
}

impl AttemptMemory {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            counts: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records one more attempt of `identity` and returns its 1-based number.
    pub(crate) fn record(&mut self, identity: [u8; 16]) -> u32 {
        if let Some(count) = self.counts.get_mut(&identity) {
            *count = count.saturating_add(1);
            return *count;
        }
        if self.capacity == 0 {
            return 1;
        }
        while self.counts.len() >= self.capacity {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.counts.remove(&oldest);
                }
                None => break,
            }
        }
        self.counts.insert(identity, 1);
        self.order.push_back(identity);
        1
    }

    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }

    pub(crate) fn clear(&mut self) {
        self.counts.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(sim: Value) -> Result<Directive, ApiError> {
        let mut body = Map::new();
        body.insert("sim".to_owned(), sim);
        Directive::from_body(&body)
    }

    #[test]
    fn absent_is_empty() {
        assert_eq!(Directive::from_body(&Map::new()), Ok(Directive::default()));
    }

    #[test]
    fn status_and_fail_times() {
        let d = parse(json!({"status": 503, "fail_times": 2, "retry_after": 2})).expect("valid");
        let failure = Failure::Status {
            status: StatusCode::SERVICE_UNAVAILABLE,
            retry_after_secs: Some(2.0),
        };
        assert_eq!(d.failure_for_attempt(1), Some(failure.clone()));
        assert_eq!(d.failure_for_attempt(2), Some(failure));
        assert_eq!(d.failure_for_attempt(3), None);
    }

    #[test]
    fn kinds() {
        assert_eq!(
            parse(json!({"kind": "drop"})).expect("valid").failure,
            Some(Failure::Drop)
        );
        assert_eq!(
            parse(json!({"kind": "429", "retry_after": 0.5}))
                .expect("valid")
                .failure,
            Some(Failure::Status {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after_secs: Some(0.5)
            })
        );
        assert_eq!(
            parse(json!({"fail_times": 1})).expect("valid").failure,
            Some(Failure::Status {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                retry_after_secs: None
            })
        );
        let latency_only = parse(json!({"latency_ms": 5})).expect("valid");
        assert_eq!(latency_only.failure, None);
        assert_eq!(latency_only.latency, Some(Duration::from_millis(5)));
        let big = parse(json!({"response_bytes": 1_000_000, "chunked": true})).expect("valid");
        assert_eq!(big.failure, None);
        assert_eq!(
            (big.response_bytes, big.chunked),
            (Some(1_000_000), Some(true))
        );
    }

    #[test]
    fn rejects_nonsense() {
        for sim in [
            json!({"status": 200}),
            json!({"kind": "explode"}),
            json!({"kind": "drop", "status": 500}),
            json!({"kind": "429", "status": 500}),
            json!({"typo": 1}),
            json!({"retry_after": 1}),
            json!({"response_bytes": -1}),
            json!({"chunked": "yes"}),
            json!("drop"),
        ] {
            let error = parse(sim.clone()).expect_err("invalid directive");
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{sim}");
            assert_eq!(error.param, Some("sim"));
        }
    }

    #[test]
    fn memory_is_bounded() {
        let mut memory = AttemptMemory::new(2);
        assert_eq!(memory.record([1; 16]), 1);
        assert_eq!(memory.record([1; 16]), 2);
        assert_eq!(memory.record([2; 16]), 1);
        assert_eq!(memory.record([3; 16]), 1);
        assert_eq!(memory.len(), 2);
        // [1] was the oldest and is forgotten.
        assert_eq!(memory.record([1; 16]), 1);
        assert_eq!(memory.record([3; 16]), 2);
        let mut none = AttemptMemory::new(0);
        assert_eq!(none.record([1; 16]), 1);
        assert_eq!(none.record([1; 16]), 1);
    }
}
