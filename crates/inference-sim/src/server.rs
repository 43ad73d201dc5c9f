//! Routing, the request pipeline (admission, directives, injected failures, latency) and the
//! `/sim/*` control endpoints.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::config::SimConfig;
use crate::conn::ConnHandle;
use crate::directive::{AttemptMemory, Directive, Failure};
use crate::generate::canonical_hash_object;
use crate::openai::{self, ApiError, Context, Endpoint, Generated};
use crate::stats::{FailureKind, SimStats, Stats};
use crate::timer::{self, PreciseTimer};
use crate::{moderation, rerank, responses};

/// Everything the handlers share.
pub(crate) struct App {
    /// The configuration served; never changes while running.
    config: SimConfig,
    /// Counters for `/sim/stats` (shared with the streamed bodies still being sent).
    stats: Arc<Stats>,
    /// `fail_times` attempt counts per request identity.
    attempts: Mutex<AttemptMemory>,
    /// Draws rate-based failures; seeded from `config.seed`, re-seeded by `/sim/reset`.
    rng: Mutex<StdRng>,
    /// Cancelled when shutdown begins: held and sleeping requests are then cut so the graceful
    /// shutdown never waits on simulated time.
    shutdown: CancellationToken,
    /// Unix seconds at start, the `created` of listed models.
    started: u64,
    /// Holds simulated latencies to a fraction of a millisecond; `None` if its thread could
    /// not start (tokio's timer then, a millisecond or so long).
    timer: Option<PreciseTimer>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent across a panic (no multi-step invariants).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The unique id of a request, set by the `x-request-id` middleware.
#[derive(Clone, Debug)]
struct RequestId(Arc<str>);

/// What the pipeline decided for a request.
enum Outcome {
    /// Send this response.
    Answer(Response),
    /// Send nothing: the connection is cut.
    Cut,
}

impl From<ApiError> for Outcome {
    fn from(error: ApiError) -> Self {
        Self::Answer(error.into_response())
    }
}

impl App {
    fn new(config: SimConfig) -> Self {
        Self {
            attempts: Mutex::new(AttemptMemory::new(config.attempt_memory)),
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            stats: Arc::new(Stats::default()),
            shutdown: CancellationToken::new(),
            started: unix_now(),
            timer: PreciseTimer::start()
                .inspect_err(|e| tracing::warn!(error = %e, "no precise timer thread: latencies use tokio's timer"))
                .ok(),
            config,
        }
    }

    /// Starts shutdown: readiness fails and every simulated wait ends in a cut connection.
    pub(crate) fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    fn shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Sleeps `duration` unless shutdown begins first; true if the full time passed.
    async fn pause(&self, duration: Duration) -> bool {
        if self.shutting_down() {
            return false;
        }
        if duration.is_zero() {
            return true;
        }
        let Some(deadline) = std::time::Instant::now().checked_add(duration) else {
            self.shutdown.cancelled().await;
            return false;
        };
        let sleep = async {
            match &self.timer {
                Some(timer) => timer.sleep_until(deadline).await,
                None => tokio::time::sleep_until(deadline.into()).await,
            }
        };
        tokio::select! {
            () = sleep => {
                self.stats.paused(timer::overshoot(deadline));
                true
            }
            () = self.shutdown.cancelled() => false,
        }
    }

    /// The latency of a successful answer with `completion_tokens` tokens.
    fn latency(&self, directive: &Directive, completion_tokens: u64) -> Duration {
        directive.latency.unwrap_or_else(|| {
            let ms = self.config.base_latency_ms as f64
                + self.config.per_token_latency_ms * completion_tokens as f64;
            Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
        })
    }

    /// The whole pipeline for one inference request.
    async fn handle(&self, endpoint: Endpoint, request: Request) -> Response {
        self.stats.received(endpoint);
        let conn = request
            .extensions()
            .get::<ConnectInfo<ConnHandle>>()
            .map(|info| info.0.clone());
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|id| Arc::clone(&id.0))
            .unwrap_or_else(|| Arc::from("unknown"));

        let outcome = match read_body(request.into_body(), self.config.max_body_bytes).await {
            Ok(Some(bytes)) => self.admit(endpoint, &bytes, &request_id).await,
            Ok(None) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            )
            .into(),
            Err(error) => {
                ApiError::invalid(format!("could not read the request body: {error}")).into()
            }
        };

        match outcome {
            Outcome::Answer(response) => {
                let status = response.status().as_u16();
                self.stats.responded(status);
                tracing::debug!(endpoint = endpoint.name(), status, "request answered");
                response
            }
            Outcome::Cut => {
                tracing::debug!(endpoint = endpoint.name(), "connection cut");
                cut(conn)
            }
        }
    }

    /// Admission control: refuses at once when `max_concurrency` requests are in flight;
    /// otherwise processes the request, counted in flight until it is answered or cut.
    async fn admit(&self, endpoint: Endpoint, bytes: &Bytes, request_id: &str) -> Outcome {
        let in_flight = self.stats.enter();
        let limit = self.config.max_concurrency;
        if limit > 0 && in_flight.level > limit {
            self.stats.failed(FailureKind::Capacity429);
            return ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the server is at capacity ({limit} requests in flight); retry later"),
            )
            .code("rate_limit_exceeded")
            .retry_after(Some(self.config.retry_after_secs))
            .into();
        }
        self.process(endpoint, bytes, request_id).await
    }

    /// Parses the body, applies the directive or a drawn failure, generates and waits.
    async fn process(&self, endpoint: Endpoint, bytes: &Bytes, request_id: &str) -> Outcome {
        let body = match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(body)) => body,
            Ok(_) => return ApiError::invalid("the request body must be a JSON object").into(),
            Err(error) => {
                return ApiError::invalid(format!(
                    "We could not parse the JSON body of your request: {error}"
                ))
                .into();
            }
        };
        let directive = match Directive::from_body(&body) {
            Ok(directive) => directive,
            Err(error) => return error.into(),
        };

        let failure = match &directive.failure {
            Some(_) => self.scripted_failure(&body, &directive),
            // Scripted requests are exempt from drawn failures so scripts stay exact.
            None => self.drawn_failure(),
        };
        let Some((failure, counted_as)) = failure else {
            return match self.generate(endpoint, &body, request_id) {
                Ok(generated) => {
                    if !self
                        .pause(self.latency(&directive, generated.completion_tokens))
                        .await
                    {
                        return Outcome::Cut;
                    }
                    Outcome::Answer(self.success(generated.body, &directive))
                }
                Err(error) => error.into(),
            };
        };

        self.stats.failed(counted_as);
        tracing::debug!(
            endpoint = endpoint.name(),
            kind = counted_as.name(),
            "injecting failure"
        );
        match failure {
            Failure::Status {
                status,
                retry_after_secs,
            } => {
                if !self.pause(directive.latency.unwrap_or_default()).await {
                    return Outcome::Cut;
                }
                let message = match counted_as {
                    FailureKind::Random500 => {
                        "The server had an error while processing your request (simulated)"
                            .to_owned()
                    }
                    FailureKind::Random429 => "Rate limit reached (simulated)".to_owned(),
                    _ => format!(
                        "simulated failure: HTTP {} requested by the sim directive",
                        status.as_u16()
                    ),
                };
                let mut error = ApiError::new(status, message).retry_after(retry_after_secs);
                if status == StatusCode::TOO_MANY_REQUESTS {
                    error = error.code("rate_limit_exceeded");
                }
                error.into()
            }
            Failure::Timeout => {
                let hold = directive
                    .latency
                    .unwrap_or(Duration::ZERO)
                    .saturating_add(Duration::from_millis(self.config.timeout_hold_ms));
                self.pause(hold).await;
                Outcome::Cut
            }
            Failure::Drop => {
                self.pause(directive.latency.unwrap_or_default()).await;
                Outcome::Cut
            }
            Failure::Malformed => {
                let (full, tokens) = match self.generate(endpoint, &body, request_id) {
                    Ok(generated) => (generated.body, generated.completion_tokens),
                    Err(error) => (error.body(), 0),
                };
                if !self.pause(self.latency(&directive, tokens)).await {
                    return Outcome::Cut;
                }
                // Half of a serialized object never closes it, so this never parses.
                let mut text = full.to_string().into_bytes();
                text.truncate(text.len() / 2);
                let mut response = (StatusCode::OK, text).into_response();
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Outcome::Answer(response)
            }
        }
    }

    /// The 200 answer carrying `body`: as it is, or padded to `response_bytes` and/or sent
    /// `chunked` (directive first, then the configuration), streamed in [`PAD_PIECE`] pieces.
    fn success(&self, body: Value, directive: &Directive) -> Response {
        let pad_to = directive
            .response_bytes
            .unwrap_or(self.config.response_bytes);
        let chunked = directive.chunked.unwrap_or(self.config.chunked_responses);
        if pad_to == 0 && !chunked {
            return (StatusCode::OK, axum::Json(body)).into_response();
        }
        let body = PaddedBody::new(body.to_string(), pad_to);
        let length = body.len();
        let streaming = self.stats.stream_started();
        let shutdown = self.shutdown.clone();
        let pieces = futures::stream::unfold((body, streaming), move |(mut body, streaming)| {
            // Checked before every piece, so a huge body never holds up shutdown.
            let down = shutdown.is_cancelled();
            async move {
                if down {
                    let error = std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the simulator is shutting down",
                    );
                    return Some((Err(error), (PaddedBody::done(), streaming)));
                }
                let piece = body.next_piece()?;
                streaming.stats().streamed(piece.len());
                Some((Ok(piece), (body, streaming)))
            }
        });
        let mut response = Response::new(Body::from_stream(pieces));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !chunked {
            // hyper sends a stream of unknown size with this length, not chunked.
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        response
    }

    /// The scripted failure of this attempt, counting the attempt when `fail_times` is set.
    fn scripted_failure(
        &self,
        body: &Map<String, Value>,
        directive: &Directive,
    ) -> Option<(Failure, FailureKind)> {
        let attempt = match directive.fail_times {
            Some(_) => {
                let hash = canonical_hash_object(body);
                let mut identity = [0u8; 16];
                identity.copy_from_slice(&hash[..16]);
                lock(&self.attempts).record(identity)
            }
            None => 1,
        };
        let failure = directive.failure_for_attempt(attempt)?;
        let kind = match failure {
            Failure::Status { .. } => FailureKind::ScriptedStatus,
            Failure::Timeout => FailureKind::Timeout,
            Failure::Drop => FailureKind::Drop,
            Failure::Malformed => FailureKind::Malformed,
        };
        Some((failure, kind))
    }

    /// Draws a rate-based failure: one uniform draw against the cumulative rates, in the
    /// order 500, 429, timeout, drop, malformed.
    fn drawn_failure(&self) -> Option<(Failure, FailureKind)> {
        let rates = self.config.rates();
        if rates.iter().all(|(_, rate)| *rate <= 0.0) {
            // No draw at all, so a healthy server's RNG sequence is not consumed.
            return None;
        }
        let draw: f64 = lock(&self.rng).random();
        let mut threshold = 0.0;
        for (i, (_, rate)) in rates.iter().enumerate() {
            threshold += rate.max(0.0);
            if draw < threshold {
                let retry_after = Some(self.config.retry_after_secs);
                return Some(match i {
                    0 => (
                        Failure::Status {
                            status: StatusCode::INTERNAL_SERVER_ERROR,
                            retry_after_secs: None,
                        },
                        FailureKind::Random500,
                    ),
                    1 => (
                        Failure::Status {
                            status: StatusCode::TOO_MANY_REQUESTS,
                            retry_after_secs: retry_after,
                        },
                        FailureKind::Random429,
                    ),
                    2 => (Failure::Timeout, FailureKind::Timeout),
                    3 => (Failure::Drop, FailureKind::Drop),
                    _ => (Failure::Malformed, FailureKind::Malformed),
                });
            }
        }
        None
    }

    /// Validates the request and builds the success body.
    fn generate(
        &self,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        request_id: &str,
    ) -> Result<Generated, ApiError> {
        let model = endpoint.model(body)?;
        if self.config.strict_models && !self.config.models.iter().any(|m| m == model) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
            .param("model")
            .code("model_not_found"));
        }
        let ctx = Context {
            request_id,
            created: unix_now(),
            default_max_tokens: self.config.default_max_tokens,
            embedding_dim: self.config.embedding_dim,
        };
        match endpoint {
            Endpoint::ChatCompletions => openai::chat_completions(body, &ctx),
            Endpoint::Completions => openai::completions(body, &ctx),
            Endpoint::Embeddings => openai::embeddings(body, &ctx),
            Endpoint::Responses => responses::responses(body, &ctx),
            Endpoint::Moderations => moderation::moderations(body, &ctx),
            Endpoint::Rerank => rerank::rerank(body, &ctx),
            Endpoint::Score => rerank::score(body, &ctx),
        }
    }

    fn snapshot(&self) -> SimStats {
        let mut stats = self.stats.snapshot();
        stats.attempts_tracked = lock(&self.attempts).len() as u64;
        stats
    }
}

/// The size of the pieces a streamed body is sent in.
const PAD_PIECE: usize = 64 * 1024;

/// The padding of padded bodies, sent from this one static buffer.
static PADDING: [u8; PAD_PIECE] = [b'x'; PAD_PIECE];

/// A success body as it is sent: the answer's JSON with its closing `}` cut off, `pad` bytes
/// of `x` inside a `"sim_padding"` string, then `"}`; or the whole answer when it is not
/// padded. Never holds the padding in memory.
struct PaddedBody {
    /// The JSON before the padding (the whole answer when `pad` is 0 and `tail` empty).
    head: Option<Bytes>,
    /// Padding bytes still to send.
    pad: u64,
    /// What closes the object after the padding.
    tail: Option<Bytes>,
}

impl PaddedBody {
    /// What follows the answer's fields when it is padded, padding excluded.
    const OPEN: &'static str = ",\"sim_padding\":\"";
    const CLOSE: &'static str = "\"}";

    /// `json` (a compact JSON object) padded to `pad_to` bytes, or as it is when that is no
    /// larger than the answer with an empty padding.
    fn new(json: String, pad_to: u64) -> Self {
        // The answer's `}` is replaced by OPEN, padding, CLOSE.
        let bare = (json.len() - 1 + Self::OPEN.len() + Self::CLOSE.len()) as u64;
        if !json.ends_with('}') || pad_to < bare {
            return Self {
                head: Some(Bytes::from(json)),
                pad: 0,
                tail: None,
            };
        }
        let mut head = json.into_bytes();
        head.pop();
        head.extend_from_slice(Self::OPEN.as_bytes());
        Self {
            head: Some(Bytes::from(head)),
            pad: pad_to - bare,
            tail: Some(Bytes::from_static(Self::CLOSE.as_bytes())),
        }
    }

    /// A body with nothing left to send.
    fn done() -> Self {
        Self {
            head: None,
            pad: 0,
            tail: None,
        }
    }

    /// Bytes left to send.
    fn len(&self) -> u64 {
        let part = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| b.len() as u64);
        part(&self.head) + self.pad + part(&self.tail)
    }

    /// The next piece to send, `None` at the end.
    fn next_piece(&mut self) -> Option<Bytes> {
        if let Some(head) = self.head.take() {
            return Some(head);
        }
        if self.pad > 0 {
            let n = usize::try_from(self.pad)
                .unwrap_or(PAD_PIECE)
                .min(PAD_PIECE);
            self.pad -= n as u64;
            return Some(Bytes::from_static(&PADDING[..n]));
        }
        self.tail.take()
    }
}

/// Reads the whole body, keeping at most `limit` bytes: `None` when it was longer. A body
/// over the limit is still read to its end, so the 413 is not lost to a TCP reset caused by
/// closing a socket with unread data.
async fn read_body(mut body: Body, limit: usize) -> Result<Option<Bytes>, axum::Error> {
    let mut kept = Vec::new();
    let mut too_large = false;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers
        };
        if !too_large && kept.len() + data.len() <= limit {
            kept.extend_from_slice(&data);
        } else {
            too_large = true;
            kept = Vec::new();
        }
    }
    Ok((!too_large).then(|| Bytes::from(kept)))
}

/// Ends a request without a response. Through `serve`, the connection is killed and hyper
/// closes it having written nothing. A router mounted elsewhere has no such handle; there
/// the response body fails instead, which makes hyper abort the connection too (though the
/// status line may already have been written).
fn cut(conn: Option<ConnHandle>) -> Response {
    match conn {
        Some(conn) => {
            conn.kill();
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        None => {
            let failing = futures::stream::once(async {
                Err::<Bytes, std::io::Error>(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "connection dropped by the simulator",
                ))
            });
            Response::new(Body::from_stream(failing))
        }
    }
}

/// The router with every endpoint, plus the shared state for shutdown.
pub(crate) fn build(config: SimConfig) -> (Router, Arc<App>) {
    let app = Arc::new(App::new(config));
    let router = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/responses", post(responses))
        .route("/responses", post(responses))
        .route("/v1/moderations", post(moderations))
        .route("/moderations", post(moderations))
        .route("/v1/rerank", post(rerank_handler))
        .route("/rerank", post(rerank_handler))
        .route("/v1/score", post(score_handler))
        .route("/score", post(score_handler))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/sim/stats", get(stats))
        .route("/sim/reset", post(reset))
        .route("/sim/wait", get(wait))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(request_id))
        .with_state(Arc::clone(&app));
    (router, app)
}

/// Gives every request a unique id: in its extensions for the handlers, and in the
/// `x-request-id` response header.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = format!("{:032x}", rand::random::<u128>());
    request
        .extensions_mut()
        .insert(RequestId(Arc::from(id.as_str())));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn chat_completions(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::ChatCompletions, request).await
}

async fn completions(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Completions, request).await
}

async fn embeddings(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Embeddings, request).await
}

async fn responses(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Responses, request).await
}

async fn moderations(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Moderations, request).await
}

async fn rerank_handler(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Rerank, request).await
}

async fn score_handler(State(app): State<Arc<App>>, request: Request) -> Response {
    app.handle(Endpoint::Score, request).await
}

async fn models(State(app): State<Arc<App>>) -> Response {
    app.stats.received_models();
    let data: Vec<Value> = app
        .config
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": app.started, "owned_by": "nightshift-sim"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn livez() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

/// Ready until shutdown begins.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutting_down() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "shutting down"})),
        )
            .into_response()
    } else {
        axum::Json(json!({"status": "ok"})).into_response()
    }
}

async fn stats(State(app): State<Arc<App>>) -> Response {
    axum::Json(app.snapshot()).into_response()
}

/// Zeroes the counters, forgets every attempt and re-seeds the failure RNG, so a test run
/// after a reset sees the same drawn failures as one on a fresh server.
async fn reset(State(app): State<Arc<App>>) -> Response {
    app.stats.reset();
    lock(&app.attempts).clear();
    *lock(&app.rng) = StdRng::seed_from_u64(app.config.seed);
    axum::Json(app.snapshot()).into_response()
}

/// Query of `GET /sim/wait`: every given condition must hold.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// At least this many inference requests in flight.
    in_flight: Option<u64>,
    /// At least this many inference requests received in total.
    requests: Option<u64>,
    /// At least this many injected failures in total.
    failures: Option<u64>,
    /// Give up after this long; default 10 s.
    timeout_ms: Option<u64>,
}

/// Long-polls until the counters meet the query: 200 with the stats once they do, 408 with
/// the stats if the timeout passes first. Lets tests wait for server state without sleeping.
async fn wait(
    State(app): State<Arc<App>>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return ApiError::invalid(rejection.body_text()).into_response(),
    };
    let condition = |s: &SimStats| {
        query.in_flight.is_none_or(|n| s.in_flight >= n)
            && query.requests.is_none_or(|n| s.requests.total >= n)
            && query.failures.is_none_or(|n| s.failures.total >= n)
    };
    let timeout = Duration::from_millis(query.timeout_ms.unwrap_or(10_000));
    let met = tokio::select! {
        met = app.stats.wait_until(condition, timeout) => met,
        () = app.shutdown.cancelled() => false,
    };
    let status = if met {
        StatusCode::OK
    } else {
        StatusCode::REQUEST_TIMEOUT
    };
    (status, axum::Json(app.snapshot())).into_response()
}

async fn not_found(request: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", request.method(), request.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(mut body: PaddedBody) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(piece) = body.next_piece() {
            assert!(piece.len() <= PAD_PIECE.max(1000));
            out.extend_from_slice(&piece);
        }
        out
    }

    #[test]
    fn padded_bodies_are_exactly_as_long_as_asked_and_stay_json() {
        let answer = json!({"id": "x", "choices": []}).to_string();
        for pad_to in [200u64, 65_536 * 3 + 17, 1_000_001] {
            let body = PaddedBody::new(answer.clone(), pad_to);
            assert_eq!(body.len(), pad_to);
            let bytes = drain(body);
            assert_eq!(bytes.len() as u64, pad_to);
            let value: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(value["id"], "x");
            assert!(
                value["sim_padding"]
                    .as_str()
                    .is_some_and(|p| p.bytes().all(|b| b == b'x'))
            );
        }
        // Too small to pad: the answer as it is.
        for pad_to in [0, 1, answer.len() as u64] {
            let body = PaddedBody::new(answer.clone(), pad_to);
            assert_eq!(body.len(), answer.len() as u64);
            assert_eq!(drain(body), answer.as_bytes());
        }
        assert_eq!(PaddedBody::done().len(), 0);
    }
}
