//! An OpenAI-compatible upstream inference server simulator, standing in for vLLM, SGLang or
//! llama.cpp in nightshift's tests, benchmarks and demos. It answers real HTTP with realistic
//! latency, a concurrency limit and failures, all reproducible.
//!
//! # Endpoints
//!
//! | route | what |
//! | --- | --- |
//! | `POST /v1/chat/completions` | `chat.completion` objects |
//! | `POST /v1/completions` | `text_completion` objects; `prompt` a string, strings, or token arrays |
//! | `POST /v1/embeddings` | L2-normalised vectors; `input` a string, strings, or token arrays; `dimensions` and `encoding_format` (`float`/`base64`) honoured |
//! | `POST /v1/responses` | `response` objects holding one assistant `message`; `input` a string or a list of input items (messages, `function_call`, `function_call_output`, `item_reference`); `max_output_tokens` honoured; usage in the Responses shape |
//! | `POST /v1/moderations` | one result per input (a string, strings, or one result for an array of `text`/`image_url` parts), flagged by keyword; no usage |
//! | `POST /v1/rerank` | vLLM's rerank: `query` against `documents`, results highest `relevance_score` first, `top_n` honoured; `usage.prompt_tokens` (not an OpenAI endpoint: operators declare it per upstream) |
//! | `POST /v1/score` | vLLM's score: `text_1` (one, or as many as `text_2`) against `text_2`, a `list` of `score` objects; `usage.prompt_tokens` (not an OpenAI endpoint) |
//! | `GET /v1/models` | the configured model ids |
//! | `GET /livez`, `GET /readyz` | 200 (`/readyz` is 503 once shutdown begins) |
//! | `GET /sim/stats` | [`SimStats`] as JSON |
//! | `POST /sim/reset` | zero the counters, forget attempts, re-seed the failure RNG |
//! | `GET /sim/wait?in_flight=N&requests=N&failures=N&timeout_ms=T` | long-poll until the counters reach the given values: 200 with stats, or 408 with stats after `timeout_ms` (default 10000) |
//!
//! The inference routes and `/models` are also mounted without the `/v1` prefix. Every
//! response carries a unique `x-request-id` header. Errors use OpenAI's envelope
//! `{"error":{"message","type","param","code"}}` with `type` chosen by status (400
//! `invalid_request_error`, 401 `authentication_error`, 403 `permission_error`, 404
//! `not_found_error`, 429 `rate_limit_error`, 5xx `server_error`).
//!
//! # Answers
//!
//! Content is deterministic: it is derived from a hash of the request's semantic content
//! (endpoint, `model`, `messages`/`prompt`/`input`, the requested token cap, the choice
//! index), so the same request always gets the same text, usage and vectors. Generated text
//! begins with `sim:` and 8 hex digits of that hash, followed by words from a small built-in
//! vocabulary. Its natural length is 8..=64 tokens; it is cut to `max_completion_tokens`, else
//! `max_tokens`, else [`SimConfig::default_max_tokens`], with `finish_reason: "length"` when
//! cut and `"stop"` otherwise.
//!
//! **Responses** (`resp_…`, one `message` `msg_…` with one `output_text` part) are generated
//! the same way from `model`, `input`, `instructions` and `max_output_tokens` (at least 16,
//! as OpenAI's). A cut answer has `status: "incomplete"` and `incomplete_details: {"reason":
//! "max_output_tokens"}`. `usage` is `{input_tokens, input_tokens_details: {cached_tokens,
//! cache_write_tokens}, output_tokens, output_tokens_details: {reasoning_tokens},
//! total_tokens}`; `instructions`, `max_output_tokens`, `temperature`, `top_p`,
//! `parallel_tool_calls`, `tool_choice`, `tools`, `metadata` (and `text`, `reasoning`,
//! `store`, `truncation`, `user`) are echoed with OpenAI's defaults. `previous_response_id` is a 400: nothing is stored.
//!
//! **Moderations** (`modr-…`) report every category of `omni-moderation-latest`; `model` is
//! optional (that one by default). A text is flagged in one category when one of its words
//! (lowercased, split at anything but letters, digits and `-`) is exactly that category's
//! keyword; its score is then 0.9..1, otherwise below 0.011, both derived from the hash:
//!
//! | category | keyword |
//! | --- | --- |
//! | `harassment` | `idiot` |
//! | `harassment/threatening` | `threaten` |
//! | `hate` | `hate` |
//! | `hate/threatening` | `exterminate` |
//! | `illicit` | `shoplift` |
//! | `illicit/violent` | `gun` |
//! | `self-harm` | `self-harm` |
//! | `self-harm/intent` | `suicide` |
//! | `self-harm/instructions` | `overdose` |
//! | `sexual` | `nsfw` |
//! | `sexual/minors` | `underage` |
//! | `violence` | `kill` |
//! | `violence/graphic` | `gore` |
//!
//! Images are never flagged; `category_applied_input_types` lists `"image"` for the
//! categories OpenAI scores images in (`self-harm` and its two subcategories, `sexual`,
//! `violence`, `violence/graphic`).
//!
//! **Tokens** are whitespace-separated words: `prompt_tokens` counts the words of every
//! message's text (85 per non-text content part) or prompt/input string, and the length of
//! token-id arrays (for responses, `instructions` and the text of every input item); the
//! generated text has exactly `completion_tokens` (`output_tokens`) words.
//!
//! Requests are validated like a real server: a non-JSON body, a missing `model` (but for
//! moderations), a chat without `messages`, a response or moderation without `input`,
//! `stream: true` (batch never streams), or a `max_tokens` below 1 get 400
//! `invalid_request_error`. With [`SimConfig::strict_models`], an unknown model gets 404
//! `model_not_found`.
//!
//! # Latency, capacity, drawn failures
//!
//! A successful request takes `base_latency_ms + per_token_latency_ms * completion_tokens`,
//! held to a fraction of a millisecond by a timer thread of its own (tokio's timer rounds up
//! to its next millisecond and would add 1–3 % to a 50 ms latency: the ideal of a
//! latency-bound benchmark must not include the simulator's slack).
//! [`SimStats::latency_overshoot_micros`] sums how late each latency ended. With `max_concurrency > 0`, a request arriving while that many are in
//! flight is answered at once with 429 `rate_limit_error`, `Retry-After` (whole seconds,
//! rounded up) and `retry-after-ms`. Each request without a scripted failure then draws once
//! from an RNG seeded by [`SimConfig::seed`] against the cumulative rates, in the order
//! `rate_500`, `rate_429`, `rate_timeout`, `rate_drop`, `rate_malformed`:
//!
//! - **500**: `server_error` envelope.
//! - **429**: `rate_limit_error` with `Retry-After`.
//! - **timeout**: held for `timeout_hold_ms`, then the connection is closed unanswered.
//! - **drop**: the connection is closed at once without a single response byte; clients
//!   see a connection error, not a status.
//! - **malformed**: 200, `Content-Type: application/json`, the first half of the JSON body.
//!
//! # The `sim` directive (the contract tests script failures with)
//!
//! A request body may carry a top-level `"sim"` object. It never affects generated content.
//! Unknown keys or contradictions are rejected with 400 (`param: "sim"`) so a typo cannot
//! silently pass.
//!
//! | key | meaning |
//! | --- | --- |
//! | `status` | 400..=599: fail with this status and an OpenAI envelope |
//! | `kind` | `"status"` (default), `"timeout"`, `"drop"`, `"malformed"`, or an error code as a string (`"429"`, `"503"`) |
//! | `fail_times` | only the first N attempts fail; later attempts succeed. Absent: every attempt fails |
//! | `retry_after` | seconds (fractional allowed) for `Retry-After`/`retry-after-ms` on a status failure; absent: no such header |
//! | `latency_ms` | replaces the latency model for this request: delays its success or its scripted failure; a timeout holds this long plus `timeout_hold_ms` |
//! | `response_bytes` | pads the successful answer to exactly this many bytes (overrides [`SimConfig::response_bytes`]) |
//! | `chunked` | `true`: the successful answer is sent without `Content-Length`; `false`: with it (overrides [`SimConfig::chunked_responses`]) |
//!
//! ```json
//! {"model": "m", "messages": [...], "sim": {"status": 400}}
//! {"model": "m", "messages": [...], "sim": {"fail_times": 2, "status": 503, "retry_after": 1}}
//! {"model": "m", "messages": [...], "sim": {"fail_times": 1, "kind": "drop"}}
//! {"model": "m", "messages": [...], "sim": {"latency_ms": 250}}
//! ```
//!
//! Huge answers: `response_bytes` adds a `"sim_padding"` string to the answer's JSON object so
//! that it is exactly that long (the answer as it is when it is already as long); the padding
//! is streamed in 64 KiB pieces from a static buffer, never held, and the stream ends as soon
//! as the client's connection is gone. [`SimStats::streamed_body_bytes`] counts what was
//! handed to connections, [`SimStats::streaming_bodies`] the bodies still being sent. Without
//! `chunked`, `Content-Length` declares the full size before the body.
//!
//! `fail_times` alone fails with 500. Attempts are counted per request identity, the hash of
//! the whole body with keys sorted (so a retried identical body is the same request, whatever
//! its whitespace or key order). The attempt memory keeps [`SimConfig::attempt_memory`]
//! identities (default 100 000) and forgets the oldest first. Requests whose directive
//! scripts a failure are exempt from drawn failures, even after their `fail_times` are used
//! up, so scripts stay exact; a `latency_ms`-only directive is not. Requests refused for
//! capacity never reach the directive and do not count as attempts.
//!
//! # Shutdown
//!
//! When the shutdown token is cancelled, [`serve`] stops accepting, `/readyz` turns 503, and
//! every request still in simulated latency or a timeout hold has its connection cut, so
//! shutdown never waits on simulated time.

mod config;
mod conn;
mod directive;
mod generate;
mod moderation;
mod openai;
mod rerank;
mod responses;
mod server;
mod stats;
mod timer;

use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, SimConfig};
pub use stats::{FailureCounts, RequestCounts, SimStats};

/// Serves the simulator on `listener` until `shutdown` is cancelled, then drains connections
/// (requests in simulated waits are cut at once).
///
/// Fails at once with `InvalidInput` if the configuration does not [`SimConfig::validate`].
pub async fn serve(
    config: SimConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    config
        .validate()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let (router, app) = server::build(config);
    let signal = async move {
        shutdown.cancelled().await;
        tracing::info!("shutting down: cutting simulated waits, draining connections");
        app.begin_shutdown();
    };
    axum::serve(
        conn::SimListener::new(listener),
        router.into_make_service_with_connect_info::<conn::ConnHandle>(),
    )
    .with_graceful_shutdown(signal)
    .await
}

/// The simulator as a router, to mount in another server. Everything works as under
/// [`serve`] except two things: a dropped connection is imitated by a failing response body
/// (hyper then aborts the connection, but may already have written the status line), and
/// simulated waits are not cut at shutdown. The configuration is not validated; rates
/// outside 0..=1 behave as clamped.
pub fn router(config: SimConfig) -> axum::Router {
    server::build(config).0
}
