//! Calling upstream inference servers well.
//!
//! [`Upstreams`] is built once per executor process from the routing table: one pooled HTTP
//! client shared by every upstream, and one [`Upstream`] per table entry with its own
//! adaptive concurrency limit. [`Upstream::call`] runs one batch request to completion —
//! permits, retries, backoff, deadline, cancellation — and returns a [`CallOutcome`], which
//! [`CallOutcome::into_result_line`] turns into the request's output or error line.
//!
//! # Retries
//!
//! Each attempt is classified as an [`AttemptKind`]:
//!
//! | answer | kind | retried |
//! | --- | --- | --- |
//! | 2xx, body a JSON object | `success` | no: done |
//! | 2xx, body not a JSON object (truncated, not JSON) | `malformed` | yes: a server fault |
//! | 429 | `rate_limited` | yes, and the concurrency limit halves |
//! | 408 | `http_408` | yes |
//! | 5xx | `server_error` | yes |
//! | other statuses (4xx, and 1xx/3xx: redirects are not followed) | `rejected` | no: returned at once |
//! | no complete answer within the attempt timeout | `timeout` | yes, and the limit halves |
//! | refused, reset, closed before a complete answer, TLS, DNS | `connection_error` | yes |
//! | a body larger than `max_response_bytes` (any status) | `too_large` | no: `response_too_large` |
//!
//! - **Attempts**: at most `max_attempts` per call, the first included.
//! - **Attempt timeout**: `min(timeout, time left to the deadline)`, covering the headers and
//!   the whole body. There is no other timeout (the client has none overall; connecting is
//!   bounded by [`CONNECT_TIMEOUT`]).
//! - **Bounded answers**: the body is read as it arrives, never past the upstream's
//!   `max_response_bytes`. An answer whose `Content-Length` exceeds it is refused before its
//!   body is read; one without a length is cut as soon as it passes the limit (the connection
//!   is then closed, not reused). Either way the call ends at once with `response_too_large`,
//!   whose message names the limit: retrying would get as large an answer again.
//! - **Backoff**: before retry `n`, a wait drawn uniformly from
//!   `[0, min(backoff_max, backoff_base × 2^(n-1))]` (full jitter). When the answer carried
//!   `retry-after-ms` (preferred: more precise) or `Retry-After` (delta-seconds or an
//!   HTTP-date), the wait is at least that, capped at `max_retry_after`: the server's ask is a
//!   floor, our jitter still spreads the clients that got the same ask.
//! - **Deadline**: no attempt starts at or after `deadline`, and no backoff is slept if the
//!   next attempt could not start before it; the call then ends with its last outcome.
//! - **Last outcome**: when the call ends without a final answer (attempts exhausted,
//!   deadline, cancel between attempts), it reports the last HTTP answer received if there
//!   was any (a 503, a 429, a malformed 200 — the most useful thing to show), else a
//!   `NoResponse` after the last failure: `request_timeout` after a timeout,
//!   `upstream_unreachable` after a connection error. With no attempt at all:
//!   `batch_cancelled` or `batch_expired`.
//!
//! # Concurrency
//!
//! An attempt holds a permit of its upstream's adaptive limiter while it is in flight, not
//! while it backs off: a sleeping retry leaves its slot to another request. The limit starts
//! at `initial_concurrency`, doubles every round trip (slow start) until the first 429 or
//! full-length timeout, then grows by one per full window of successes up to
//! `max_concurrency`; a 429 cuts it to 9/10, a full-length timeout halves it, once per
//! overload; see the `limiter` module for the exact rules. Once the executor calls
//! [`Upstreams::share_caps`], `max_concurrency` is one cap across every executor: each holds
//! a lease of permits in the live state and starts no more than it holds (the `permits`
//! module).
//!
//! # Cancellation
//!
//! The [`CancelFlag`] is read before every attempt, and wakes the call while it waits for a
//! permit or sleeps a backoff. Cancelled before the first attempt: `batch_cancelled`.
//! Cancelled later: the last outcome. An attempt already sent is never cut short: its answer
//! is finished work, kept like any other.
//!
//! [`Upstream::call_started_by`] also takes a start limit (a chunk's time budget): a call whose
//! first attempt could not start before it (waiting for a permit, say) ends without sending
//! anything and reports that it never started. A call that did start runs to its end, retries
//! included.

mod cancel;
mod limiter;
mod outcome;
mod permits;
mod retry;

use std::error::Error as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use nightshift_core::results::{NoResponseCode, ResponseBody, Usage};
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use rand::Rng;
use reqwest::Url;
use tokio::time::Instant;
use tracing::{Instrument, field};

pub use cancel::CancelFlag;
use limiter::{Limiter, Signal};
pub use outcome::CallOutcome;
pub use permits::{Leases, holder_id};
pub use retry::AttemptKind;

use crate::metrics;

/// Longest wait for a TCP (and TLS) connection to an upstream, whatever the attempt timeout.
/// A black-holed address then fails fast as `connection_error` and is retried, instead of
/// eating a whole (by default 10-minute) attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Failures to build [`Upstreams`] from the configuration. Each names the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamsError {
    /// [`RoutingConfig::validate`] refused the table.
    #[error("invalid routing table: {0}")]
    InvalidConfig(String),
    /// The base URL does not parse as a URL.
    #[error("upstream {upstream:?}: base_url {base_url:?} is not a valid URL: {reason}")]
    InvalidBaseUrl {
        upstream: String,
        base_url: String,
        reason: String,
    },
    /// `api_key_env` names a variable that is unset or empty.
    #[error("upstream {upstream:?}: environment variable {var} (api_key_env) is not set or empty")]
    MissingApiKey { upstream: String, var: String },
    /// The key holds characters an HTTP header cannot carry.
    #[error(
        "upstream {upstream:?}: the API key in {var} cannot be sent in an HTTP header (control characters?)"
    )]
    InvalidApiKey { upstream: String, var: String },
    /// The HTTP client could not be built (e.g. no TLS backend).
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// The upstreams of the routing table, ready to call.
#[derive(Debug)]
pub struct Upstreams {
    /// The table, for routing models.
    routing: RoutingConfig,
    /// One per table entry, in table order (so `routing.route_index` indexes it).
    upstreams: Vec<Arc<Upstream>>,
}

impl Upstreams {
    /// Builds the upstreams, reading API keys from the process environment.
    ///
    /// # Errors
    /// See [`with_env`](Self::with_env).
    pub fn new(routing: &RoutingConfig) -> Result<Self, UpstreamsError> {
        Self::with_env(routing, |var| std::env::var(var).ok())
    }

    /// Builds the upstreams, reading each `api_key_env` through `env` (tests pass a map).
    ///
    /// # Errors
    /// The table does not [`validate`](RoutingConfig::validate), a base URL does not parse,
    /// an API key variable is unset, empty or not header-safe, or the client cannot be built.
    /// A missing key fails here, at start-up, rather than as 401s on every request.
    pub fn with_env(
        routing: &RoutingConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, UpstreamsError> {
        routing.validate().map_err(UpstreamsError::InvalidConfig)?;
        // One client for every upstream: one connection pool, one TLS configuration. No
        // overall timeout here; each attempt gets its own.
        let client = reqwest::Client::builder()
            .user_agent(concat!("nightshift/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .tcp_keepalive(Duration::from_secs(60))
            .build()
            .map_err(UpstreamsError::Client)?;
        let upstreams = routing
            .upstreams
            .iter()
            .map(|config| Upstream::new(config, client.clone(), &env).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            routing: routing.clone(),
            upstreams,
        })
    }

    /// The upstream serving `model` (see [`RoutingConfig::route`]), or `None`.
    pub fn for_model(&self, model: &str) -> Option<Arc<Upstream>> {
        let index = self.routing.route_index(model)?;
        self.upstreams.get(index).cloned()
    }

    /// The largest `max_response_bytes` of the table (see
    /// [`RoutingConfig::largest_max_response_bytes`]): no answer read from any upstream is
    /// larger.
    pub fn largest_max_response_bytes(&self) -> usize {
        self.routing.largest_max_response_bytes()
    }

    /// Every upstream, in table order (for metrics and readiness).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.upstreams.iter()
    }
}

/// One upstream: where to send requests, how to authenticate, and its concurrency limiter.
#[derive(Debug)]
pub struct Upstream {
    /// The configured name: logs and the metric label.
    name: Arc<str>,
    /// Its table entry: URL joining, timeouts, retry policy.
    config: UpstreamConfig,
    /// `Bearer <key>`, marked sensitive (never printed), when a key is configured.
    authorization: Option<HeaderValue>,
    /// The shared client.
    client: reqwest::Client,
    /// Admission of attempts.
    limiter: Limiter,
    /// The latency histograms of its attempts, looked up once (a registry lookup per
    /// attempt was a visible share of an executor's CPU at thousands of requests a second).
    time_to_first_byte: ::metrics::Histogram,
    request_duration: ::metrics::Histogram,
}

impl Upstream {
    fn new(
        config: &UpstreamConfig,
        client: reqwest::Client,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, UpstreamsError> {
        let upstream = config.name.clone();
        Url::parse(&config.endpoint_url("/v1/chat/completions")).map_err(|error| {
            UpstreamsError::InvalidBaseUrl {
                upstream: upstream.clone(),
                base_url: config.base_url.clone(),
                reason: error.to_string(),
            }
        })?;
        let authorization = match &config.api_key_env {
            None => None,
            Some(var) => {
                let key = env(var).filter(|key| !key.is_empty()).ok_or_else(|| {
                    UpstreamsError::MissingApiKey {
                        upstream: upstream.clone(),
                        var: var.clone(),
                    }
                })?;
                let mut value = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
                    UpstreamsError::InvalidApiKey {
                        upstream: upstream.clone(),
                        var: var.clone(),
                    }
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let name: Arc<str> = Arc::from(config.name.as_str());
        let labels = [(metrics::LABEL_UPSTREAM, Arc::clone(&name))];
        Ok(Self {
            time_to_first_byte: ::metrics::histogram!(
                metrics::UPSTREAM_TIME_TO_FIRST_BYTE_SECONDS,
                &labels
            ),
            request_duration: ::metrics::histogram!(
                metrics::UPSTREAM_REQUEST_DURATION_SECONDS,
                &labels
            ),
            limiter: Limiter::new(
                Arc::clone(&name),
                config.initial_limit(),
                config.max_concurrency,
            ),
            name,
            config: config.clone(),
            authorization,
            client,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table entry this upstream was built from.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The adaptive concurrency limit right now (also the `nightshift_executor_upstream_limit`
    /// gauge).
    pub fn limit(&self) -> u32 {
        self.limiter.limit()
    }

    /// Attempts in flight right now (also the `nightshift_executor_upstream_in_flight` gauge).
    pub fn in_flight(&self) -> u32 {
        self.limiter.in_flight()
    }

    /// The permits this executor may use right now: its lease of the shared cap once
    /// [`Upstreams::share_caps`] runs, else `max_concurrency`.
    pub fn ceiling(&self) -> u32 {
        self.limiter.ceiling()
    }

    /// Runs one batch request to completion and returns what its result line needs.
    ///
    /// `body` is the input line's `body`, as raw JSON bytes; it is POSTed verbatim to
    /// `endpoint` (e.g. `/v1/chat/completions`, joined to the base URL as
    /// [`UpstreamConfig::endpoint_url`] says) with `Content-Type: application/json` and, when
    /// configured, `Authorization: Bearer <key>`. Each attempt waits for a permit of this
    /// upstream's limiter; retryable failures are retried with backoff, never past
    /// `deadline`; `cancel` stops it between attempts. The module docs give every rule.
    ///
    /// Never fails and never panics on anything the network does: every ending is a
    /// [`CallOutcome`]. Runs in an `upstream_request` span (a span of the batch's trace:
    /// `upstream`, `model` — for observability only, the body says what is asked —
    /// `endpoint`, then `attempts`, `retries`, `http.response.status_code` and `outcome`: the
    /// no-response code, or `response`); the caller's span should carry the batch.
    /// Cancel-safe: dropping the future releases its permit.
    pub async fn call(
        &self,
        model: &str,
        endpoint: &str,
        body: Bytes,
        deadline: Instant,
        cancel: &CancelFlag,
    ) -> CallOutcome {
        match self
            .call_within(model, endpoint, body, deadline, None, cancel)
            .await
        {
            Some(outcome) => outcome,
            // Unreachable without a start limit; stay total anyway.
            None => CallOutcome::NoResponse {
                code: NoResponseCode::BatchExpired,
                message: NoResponseCode::BatchExpired.default_message().to_owned(),
                attempts: 0,
            },
        }
    }

    /// [`call`](Self::call), but no first attempt starts at or after `start_by`: `None` when
    /// the call had not started by then (it was waiting for a permit; nothing was sent), which
    /// a chunk past its time budget reports by leaving the line without a result. Once its
    /// first attempt is sent, a call runs to its end as [`call`](Self::call) does, retries
    /// included. Checked after the cancel flag and the deadline: a cancelled or expired
    /// batch still gets its `batch_cancelled` / `batch_expired` outcome.
    pub async fn call_started_by(
        &self,
        model: &str,
        endpoint: &str,
        body: Bytes,
        deadline: Instant,
        start_by: Instant,
        cancel: &CancelFlag,
    ) -> Option<CallOutcome> {
        self.call_within(model, endpoint, body, deadline, Some(start_by), cancel)
            .await
    }

    async fn call_within(
        &self,
        model: &str,
        endpoint: &str,
        body: Bytes,
        deadline: Instant,
        start_by: Option<Instant>,
        cancel: &CancelFlag,
    ) -> Option<CallOutcome> {
        let span = tracing::info_span!(
            "upstream_request",
            otel.kind = "client",
            upstream = %self.name,
            model,
            endpoint,
            attempts = field::Empty,
            retries = field::Empty,
            http.response.status_code = field::Empty,
            outcome = field::Empty,
        );
        let Some(outcome) = self
            .run(endpoint, body, deadline, start_by, cancel)
            .instrument(span.clone())
            .await
        else {
            span.record("attempts", 0);
            span.record("outcome", "not_started");
            return None;
        };
        span.record("attempts", outcome.attempts());
        span.record("retries", outcome.attempts().saturating_sub(1));
        match &outcome {
            CallOutcome::Response { status, .. } => {
                span.record("http.response.status_code", status);
                span.record("outcome", "response");
            }
            CallOutcome::NoResponse { code, .. } => {
                span.record("outcome", code.as_str());
            }
        }
        Some(outcome)
    }

    /// The call's loop; `None`: not started by `start_by`.
    async fn run(
        &self,
        endpoint: &str,
        body: Bytes,
        deadline: Instant,
        start_by: Option<Instant>,
        cancel: &CancelFlag,
    ) -> Option<CallOutcome> {
        let url = match Url::parse(&self.config.endpoint_url(endpoint)) {
            Ok(url) => url,
            Err(error) => {
                return Some(CallOutcome::NoResponse {
                    code: NoResponseCode::UpstreamUnreachable,
                    message: format!(
                        "The endpoint {endpoint:?} cannot be called on this upstream: {error}."
                    ),
                    attempts: 0,
                });
            }
        };
        let mut history = History::default();
        let mut backoff = retry::Backoff::new(self.config.backoff_base, self.config.backoff_max);
        loop {
            // Only the first attempt is held to the start limit.
            let start_by = start_by.filter(|_| history.attempts == 0);
            let permit = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    return Some(history.finish(NoResponseCode::BatchCancelled));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Some(history.finish(NoResponseCode::BatchExpired));
                }
                () = sleep_until_some(start_by) => return None,
                permit = self.limiter.acquire() => permit,
            };
            let Some(permit) = permit else {
                // The limiter's semaphore is never closed; stay total anyway.
                return Some(history.finish(NoResponseCode::UpstreamUnreachable));
            };
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Some(history.finish(NoResponseCode::BatchExpired));
            }
            if start_by.is_some_and(|start_by| now >= start_by) {
                return None;
            }
            let timeout = self.config.timeout.min(left);
            let attempt = self.attempt(&url, body.clone(), timeout).await;
            history.attempts += 1;
            let kind = attempt.kind;
            let full_timeout = timeout == self.config.timeout;
            permit.finish(match kind.signal(full_timeout) {
                // A server that stopped answering is overloaded, not just full: the limiter
                // halves on it, where a 429 only steps back a tenth.
                Signal::Congestion if kind == AttemptKind::Timeout => Signal::Overload,
                signal => signal,
            });
            ::metrics::counter!(
                metrics::UPSTREAM_REQUESTS_TOTAL,
                metrics::LABEL_UPSTREAM => Arc::clone(&self.name),
                metrics::LABEL_OUTCOME => kind.as_str(),
            )
            .increment(1);

            let server_ask = attempt.server_ask;
            if matches!(kind, AttemptKind::Timeout) && timeout < self.config.timeout {
                // Cut short by the batch deadline, not by a slow upstream: the request did not
                // time out, the batch expired while it was in flight.
                return Some(history.finish(NoResponseCode::BatchExpired));
            }
            if !kind.is_retryable() {
                return Some(history.finish_with(attempt.result));
            }
            history.record(attempt.result);
            if history.attempts >= self.config.max_attempts {
                tracing::debug!(
                    attempts = history.attempts,
                    last = kind.as_str(),
                    "upstream attempts exhausted"
                );
                return Some(history.finish(NoResponseCode::UpstreamUnreachable));
            }
            let wait = retry::next_wait(
                backoff.next_delay(),
                server_ask,
                self.config.max_retry_after,
            );
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|next| next >= deadline)
            {
                tracing::debug!(
                    attempts = history.attempts,
                    last = kind.as_str(),
                    "no time left for another upstream attempt"
                );
                return Some(history.finish(NoResponseCode::UpstreamUnreachable));
            }
            ::metrics::counter!(
                metrics::UPSTREAM_RETRIES_TOTAL,
                metrics::LABEL_UPSTREAM => Arc::clone(&self.name),
                metrics::LABEL_REASON => kind.as_str(),
            )
            .increment(1);
            tracing::debug!(
                attempt = history.attempts,
                reason = kind.as_str(),
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "retrying upstream request"
            );
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    return Some(history.finish(NoResponseCode::BatchCancelled));
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sends one attempt and reads its whole answer, at most `max_response_bytes` of it,
    /// within `timeout`.
    async fn attempt(&self, url: &Url, body: Bytes, timeout: Duration) -> Attempt {
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body);
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let started = Instant::now();
        let limit = self.config.max_response_bytes;
        let exchange = async {
            let mut response = request.send().await?;
            self.time_to_first_byte.record(started.elapsed());
            let status = response.status().as_u16();
            let request_id = request_id(response.headers());
            let server_ask = retry::server_delay(response.headers(), SystemTime::now());
            let declared = response.content_length();
            if declared.is_some_and(|length| length > limit as u64) {
                // Refused before a byte of the body is read; dropping the response closes
                // the connection.
                return Ok(Answer::TooLarge { status });
            }
            let capacity = declared.map_or(0, |length| usize::try_from(length).unwrap_or(limit));
            let mut body = BytesMut::with_capacity(capacity.min(limit));
            while let Some(chunk) = response.chunk().await? {
                if chunk.len() > limit - body.len() {
                    return Ok(Answer::TooLarge { status });
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>(Answer::Complete {
                status,
                request_id,
                server_ask,
                body: body.freeze(),
            })
        };
        let result = tokio::time::timeout(timeout, exchange).await;
        self.request_duration.record(started.elapsed());
        match result {
            Ok(Ok(Answer::Complete {
                status,
                request_id,
                server_ask,
                body,
            })) => {
                // A 2xx body is read here, once: whether it is a JSON object decides a retry,
                // and the result line and the usage come from the same pass.
                let checked = (200..300)
                    .contains(&status)
                    .then(|| ResponseBody::from_json_with_usage(&body).ok())
                    .flatten();
                Attempt {
                    kind: AttemptKind::of_checked(status, checked.is_some()),
                    result: AttemptResult::Answer {
                        status,
                        request_id,
                        body,
                        checked,
                    },
                    server_ask,
                }
            }
            Ok(Ok(Answer::TooLarge { status })) => {
                tracing::debug!(status, limit, "upstream answer over max_response_bytes");
                Attempt {
                    kind: AttemptKind::TooLarge,
                    result: AttemptResult::TooLarge { status, limit },
                    server_ask: None,
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "upstream connection failed");
                Attempt {
                    kind: AttemptKind::ConnectionError,
                    result: AttemptResult::Connection(describe(error)),
                    server_ask: None,
                }
            }
            Err(_elapsed) => {
                tracing::debug!(
                    timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    "upstream attempt timed out"
                );
                Attempt {
                    kind: AttemptKind::Timeout,
                    result: AttemptResult::Timeout(timeout),
                    server_ask: None,
                }
            }
        }
    }
}

/// Resolves at `at`, or never.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What reading an answer gave.
enum Answer {
    /// The whole answer, within `max_response_bytes`.
    Complete {
        status: u16,
        request_id: String,
        server_ask: Option<Duration>,
        body: Bytes,
    },
    /// The body is larger than `max_response_bytes`; it was not read (further).
    TooLarge { status: u16 },
}

/// One attempt's end.
struct Attempt {
    kind: AttemptKind,
    result: AttemptResult,
    /// The server's `retry-after-ms` / `Retry-After`, if it sent one.
    server_ask: Option<Duration>,
}

enum AttemptResult {
    /// An HTTP answer.
    Answer {
        status: u16,
        request_id: String,
        body: Bytes,
        /// A 2xx body read as a JSON object, with its usage.
        checked: Option<(ResponseBody, Usage)>,
    },
    /// An HTTP answer whose body is larger than `limit` (`max_response_bytes`).
    TooLarge { status: u16, limit: usize },
    /// No answer within this timeout.
    Timeout(Duration),
    /// The connection failed; a description without the URL.
    Connection(String),
}

/// What a call has seen so far, to report its last outcome.
#[derive(Default)]
struct History {
    attempts: u32,
    /// The last HTTP answer, preferred over any later failure without an answer.
    last_answer: Option<AttemptResult>,
    /// The last failure without an answer.
    last_failure: Option<AttemptResult>,
}

impl History {
    fn record(&mut self, result: AttemptResult) {
        match result {
            AttemptResult::Answer { .. } | AttemptResult::TooLarge { .. } => {
                self.last_answer = Some(result);
            }
            AttemptResult::Timeout(_) | AttemptResult::Connection(_) => {
                self.last_failure = Some(result);
            }
        }
    }

    /// The outcome of a call that ends now: the last answer, else the last failure, else
    /// `no_attempt` (which only matters when no attempt was made).
    fn finish(mut self, no_attempt: NoResponseCode) -> CallOutcome {
        match self.last_answer.take().or_else(|| self.last_failure.take()) {
            Some(result) => self.finish_with(result),
            None => CallOutcome::NoResponse {
                code: no_attempt,
                message: no_attempt.default_message().to_owned(),
                attempts: self.attempts,
            },
        }
    }

    fn finish_with(self, result: AttemptResult) -> CallOutcome {
        let attempts = self.attempts;
        let tries = if attempts == 1 {
            "1 attempt".to_owned()
        } else {
            format!("{attempts} attempts")
        };
        match result {
            AttemptResult::Answer {
                status,
                request_id,
                body,
                checked,
            } => CallOutcome::Response {
                status,
                request_id,
                body,
                checked,
                attempts,
            },
            AttemptResult::TooLarge { status, limit } => CallOutcome::NoResponse {
                code: NoResponseCode::ResponseTooLarge,
                message: format!(
                    "The upstream's answer (HTTP {status}) is larger than its \
                     max_response_bytes limit of {limit} bytes ({}); it was not kept. \
                     Ask for less output (max_tokens, n, logprobs), or have the operator \
                     raise the limit.",
                    byte_size(limit)
                ),
                attempts,
            },
            AttemptResult::Timeout(timeout) => CallOutcome::NoResponse {
                code: NoResponseCode::RequestTimeout,
                message: format!(
                    "The upstream did not answer in time ({tries}; the last one waited {}).",
                    humantime_serde::re::humantime::format_duration(round_to_millis(timeout))
                ),
                attempts,
            },
            AttemptResult::Connection(detail) => CallOutcome::NoResponse {
                code: NoResponseCode::UpstreamUnreachable,
                message: format!(
                    "The upstream could not be reached ({tries}; last error: {detail})."
                ),
                attempts,
            },
        }
    }
}

/// `bytes` in the largest binary unit that divides it, e.g. `16 MiB`, `1536 KiB`, `1000 B`.
fn byte_size(bytes: usize) -> String {
    for (unit, size) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} B")
}

fn round_to_millis(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

/// The upstream's `x-request-id`, or a fresh id of ours: `nightshift-` and 24 alphanumerics.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map_or_else(
            || {
                let suffix: String = rand::rng()
                    .sample_iter(rand::distr::Alphanumeric)
                    .take(24)
                    .map(char::from)
                    .collect();
                format!("nightshift-{suffix}")
            },
            str::to_owned,
        )
}

/// A connection error as text for users: the error chain without the URL (an upstream's
/// address is the operator's business), e.g. `error sending request: client error (Connect):
/// tcp connect error: Connection refused (os error 111)`.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_come_from_the_header_or_are_generated() {
        let mut headers = HeaderMap::new();
        let generated = request_id(&headers);
        assert!(generated.starts_with("nightshift-") && generated.len() == 35);
        assert_ne!(generated, request_id(&headers));
        headers.insert("x-request-id", HeaderValue::from_static("req_abc"));
        assert_eq!(request_id(&headers), "req_abc");
        headers.insert("x-request-id", HeaderValue::from_static(" "));
        assert!(request_id(&headers).starts_with("nightshift-"));
    }

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(byte_size(16 << 20), "16 MiB");
        assert_eq!(byte_size(1536 << 10), "1536 KiB");
        assert_eq!(byte_size(1 << 30), "1 GiB");
        assert_eq!(byte_size(1000), "1000 B");
        assert_eq!(byte_size(0), "0 B");
    }

    #[test]
    fn missing_or_bad_keys_fail_at_build_time() {
        let mut config = UpstreamConfig::new("u", "http://127.0.0.1:1/v1", ["m"]);
        config.api_key_env = Some("KEY".into());
        let routing = RoutingConfig {
            upstreams: vec![config],
        };
        let error = Upstreams::with_env(&routing, |_| None).unwrap_err();
        assert!(
            matches!(error, UpstreamsError::MissingApiKey { .. }),
            "{error}"
        );
        let error = Upstreams::with_env(&routing, |_| Some(String::new())).unwrap_err();
        assert!(
            matches!(error, UpstreamsError::MissingApiKey { .. }),
            "{error}"
        );
        let error = Upstreams::with_env(&routing, |_| Some("a\nb".into())).unwrap_err();
        assert!(
            matches!(error, UpstreamsError::InvalidApiKey { .. }),
            "{error}"
        );
        let upstreams = Upstreams::with_env(&routing, |var| {
            (var == "KEY").then(|| "sk-secret".to_owned())
        })
        .unwrap();
        let debug = format!("{upstreams:?}");
        assert!(!debug.contains("sk-secret"), "{debug}");
    }

    #[test]
    fn invalid_tables_are_refused() {
        let routing = RoutingConfig {
            upstreams: vec![
                UpstreamConfig::new("a", "http://h/v1", ["m"]),
                UpstreamConfig::new("a", "http://h/v1", ["n"]),
            ],
        };
        assert!(matches!(
            Upstreams::new(&routing),
            Err(UpstreamsError::InvalidConfig(_))
        ));
        let routing = RoutingConfig {
            upstreams: vec![UpstreamConfig::new("a", "http://[::1/v1", ["m"])],
        };
        let error = Upstreams::new(&routing).unwrap_err();
        assert!(
            matches!(error, UpstreamsError::InvalidBaseUrl { .. }),
            "{error}"
        );
    }

    #[test]
    fn models_route_to_their_upstream() {
        let routing = RoutingConfig {
            upstreams: vec![
                UpstreamConfig::new("a", "http://h/v1", ["m"]),
                UpstreamConfig::new("b", "http://h:81", ["*"]),
            ],
        };
        let upstreams = Upstreams::new(&routing).unwrap();
        assert_eq!(upstreams.for_model("m").unwrap().name(), "a");
        assert_eq!(upstreams.for_model("other").unwrap().name(), "b");
        assert_eq!(upstreams.iter().count(), 2);
        let b = upstreams.for_model("x").unwrap();
        assert_eq!(b.limit(), 8);
        assert_eq!(b.in_flight(), 0);
        let no_default = Upstreams::new(&RoutingConfig {
            upstreams: vec![UpstreamConfig::new("a", "http://h/v1", ["m"])],
        })
        .unwrap();
        assert!(no_default.for_model("other").is_none());
    }
}
