//! Result lines (the output and error files' JSONL) and token usage accounting.
//!
//! Executors build one [`ResultLine`] per input line that has a result and write them, one part
//! per chunk, with [`ResultLine::write_json_line`]. The finalizer concatenates the parts and
//! re-reads every line with [`ResultLineSummary::parse`] to count successes and failures and to
//! sum [`Usage`]: the parts are the authoritative record, Redis counts only a live view.
//!
//! Line shape (`docs/openai-compat.md`, "Result lines"), keys in this order:
//! ```text
//! {"id": "batch_req_…", "custom_id": "…", "response": {"status_code": 200, "request_id": "…", "body": {…}}, "error": null}
//! {"id": "batch_req_…", "custom_id": "…", "response": null, "error": {"code": "batch_expired", "message": "…"}}
//! ```
//! A line is a success (output file) when it has a response with a 2xx status; anything else
//! goes to the error file.
//!
//! # Error codes of lines without a response
//!
//! | `error.code` | when | final |
//! | --- | --- | --- |
//! | `batch_expired` | the batch's deadline passed before the request was sent | no |
//! | `batch_cancelled` | the batch was cancelled before the request was sent | no |
//! | `request_timeout` | every attempt timed out without an answer | yes |
//! | `upstream_unreachable` | no attempt reached an upstream (or none serves the model) | yes |
//! | `response_too_large` | the upstream's answer was larger than its `max_response_bytes` (the message names the limit); not retried | yes |
//! | `chunk_failed` | the chunk holding the line could not be run (the message says why and how many attempts were made) | yes |
//!
//! A *final* line ([`ResultLine::is_final`], [`NoResponseCode::is_final`]) is one a later run
//! of its chunk must keep: any upstream answer (whatever its status), or an error that says
//! what happened to the request. `batch_expired` and `batch_cancelled` are not final: the
//! request never reached an upstream, so running it again loses nothing.

use std::borrow::Cow;
use std::fmt;

use rand::Rng;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `id` of a result line: `batch_req_` followed by 32 characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchRequestId(String);

impl BatchRequestId {
    /// Prefix of every result line id, as OpenAI's.
    pub const PREFIX: &'static str = "batch_req_";

    /// A fresh random id: the prefix and 32 ASCII alphanumerics (~190 bits).
    pub fn random() -> Self {
        let suffix: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        Self(format!("{}{suffix}", Self::PREFIX))
    }

    /// The id of line `line` (1-based) of batch `batch_id`: the prefix and 32 lowercase hex
    /// digits of a SHA-256 over both. The same inputs always give the same id.
    ///
    /// Executors use this one, not [`random`](Self::random): a chunk may run twice (a
    /// redelivery after a crash or a lost ack), and its second run must rewrite its part
    /// byte-for-byte where the requests answered the same, so that which attempt's part the
    /// finalizer reads never changes a line's id, and an id a client saw in partial results
    /// stays valid in the final file.
    pub fn for_line(batch_id: &str, line: u64) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"nightshift/batch_req/v1\0");
        hasher.update(batch_id.as_bytes());
        hasher.update(b"\0");
        hasher.update(line.to_be_bytes());
        let digest = hasher.finalize();
        Self(format!("{}{}", Self::PREFIX, hex::encode(&digest[..16])))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BatchRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a line has no HTTP response to report (`error.code` of an error-file line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoResponseCode {
    /// The batch reached its deadline before this request was executed.
    BatchExpired,
    /// The batch was cancelled before this request was executed.
    BatchCancelled,
    /// Every attempt timed out without an answer.
    RequestTimeout,
    /// No attempt could reach an upstream (connection refused, DNS, TLS, reset, ...).
    UpstreamUnreachable,
    /// The upstream's answer was larger than the upstream's `max_response_bytes`: it was not
    /// read past the limit, and not retried (it would be as large again).
    ResponseTooLarge,
    /// The chunk holding this line could not be run: it was given up after its attempts.
    ChunkFailed,
}

impl NoResponseCode {
    /// The wire string, e.g. `"batch_expired"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BatchExpired => "batch_expired",
            Self::BatchCancelled => "batch_cancelled",
            Self::RequestTimeout => "request_timeout",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::ResponseTooLarge => "response_too_large",
            Self::ChunkFailed => "chunk_failed",
        }
    }

    /// Every code.
    pub const ALL: [Self; 6] = [
        Self::BatchExpired,
        Self::BatchCancelled,
        Self::RequestTimeout,
        Self::UpstreamUnreachable,
        Self::ResponseTooLarge,
        Self::ChunkFailed,
    ];

    /// True when a line with this code is a final result (see the [module docs](self)): every
    /// code but `batch_expired` and `batch_cancelled`, which mean the request was never sent.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::BatchExpired | Self::BatchCancelled)
    }

    /// A message suitable for `error.message` when the caller has nothing more specific.
    pub fn default_message(self) -> &'static str {
        match self {
            Self::BatchExpired => "This request could not be executed before the batch expired.",
            Self::BatchCancelled => {
                "This request was not executed because the batch was cancelled."
            }
            Self::RequestTimeout => {
                "The upstream did not answer this request in time, on any attempt."
            }
            Self::UpstreamUnreachable => {
                "No upstream serving this model could be reached, on any attempt."
            }
            Self::ResponseTooLarge => {
                "The upstream's answer to this request was larger than the configured limit."
            }
            Self::ChunkFailed => "The part of the batch holding this request could not be run.",
        }
    }
}

impl fmt::Display for NoResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An upstream body that [`ResponseBody::from_json`] refuses.
#[derive(Debug, thiserror::Error)]
pub enum InvalidResponseBody {
    /// Not UTF-8, or not JSON.
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object.
    #[error("the body is JSON but not an object")]
    NotAnObject,
}

/// The `response.body` of a result line: a JSON object as compact one-line text.
///
/// Kept as text rather than a `serde_json::Value` so the upstream's bytes (and key order) pass
/// through untouched and the hot path allocates one string per response, not a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseBody(Box<str>);

impl ResponseBody {
    /// Most characters of a non-JSON upstream body quoted by [`from_upstream`](Self::from_upstream).
    pub const NON_JSON_PREVIEW_CHARS: usize = 1000;

    /// Takes an upstream body that must be a JSON object.
    ///
    /// The bytes are kept as they are, except that line breaks — which in valid JSON can only
    /// be whitespace between tokens — become spaces, and surrounding whitespace is trimmed, so
    /// a pretty-printed body still fits on one JSONL line.
    pub fn from_json(bytes: &[u8]) -> Result<Self, InvalidResponseBody> {
        Self::from_json_with_usage(bytes).map(|(body, _)| body)
    }

    /// [`from_json`](Self::from_json) and [`usage`](Self::usage) in one pass over the bytes:
    /// an executor's hot path reads every answer once, whatever its size.
    pub fn from_json_with_usage(bytes: &[u8]) -> Result<(Self, Usage), InvalidResponseBody> {
        let text =
            std::str::from_utf8(bytes).map_err(|e| InvalidResponseBody::NotJson(e.to_string()))?;
        // Parsing the usage checks the whole text is one JSON value (trailing bytes included).
        let UsageOnly(usage) = serde_json::from_str::<UsageOnly>(text)
            .map_err(|e| InvalidResponseBody::NotJson(e.to_string()))?;
        let text = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
        if !text.starts_with('{') {
            return Err(InvalidResponseBody::NotAnObject);
        }
        // memchr: `contains` with a set of chars decodes the text char by char, a visible
        // share of an executor's CPU on large answers.
        let one_line = if memchr::memchr2(b'\n', b'\r', text.as_bytes()).is_some() {
            text.replace(['\n', '\r'], " ")
        } else {
            text.to_owned()
        };
        let usage = usage.map_or_else(Usage::default, |usage| Usage::from_usage_object(&usage));
        Ok((Self(one_line.into_boxed_str()), usage))
    }

    /// Takes any upstream body: a JSON object as [`from_json`](Self::from_json) does; anything
    /// else (an HTML error page, plain text, a JSON array) wrapped in an OpenAI-style error
    /// object, `{"error": {"message": …, "type": "upstream_error", "param": null, "code": null}}`,
    /// whose message quotes up to [`NON_JSON_PREVIEW_CHARS`](Self::NON_JSON_PREVIEW_CHARS)
    /// characters of the body.
    pub fn from_upstream(status_code: u16, bytes: &[u8]) -> Self {
        if let Ok(body) = Self::from_json(bytes) {
            return body;
        }
        let text = String::from_utf8_lossy(bytes);
        let preview = match text.char_indices().nth(Self::NON_JSON_PREVIEW_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text.into_owned(),
        };
        let message = format!(
            "The upstream answered HTTP {status_code} with a body that is not a JSON object: {preview}"
        );
        let json = serde_json::json!({"error": {
            "message": message,
            "type": "upstream_error",
            "param": null,
            "code": null,
        }});
        Self(json.to_string().into_boxed_str())
    }

    /// Serialises a JSON object value.
    ///
    /// # Errors
    /// [`InvalidResponseBody::NotAnObject`] if `value` is not an object.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, InvalidResponseBody> {
        if !value.is_object() {
            return Err(InvalidResponseBody::NotAnObject);
        }
        Ok(Self(value.to_string().into_boxed_str()))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The body parsed into a value.
    pub fn to_value(&self) -> serde_json::Value {
        // The text was checked to be a JSON object on construction.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }

    /// The token usage this body reports (all zeros if it has no `usage`), see [`Usage`].
    pub fn usage(&self) -> Usage {
        match serde_json::from_str::<UsageOnly>(&self.0) {
            Ok(UsageOnly(Some(usage))) => Usage::from_usage_object(&usage),
            _ => Usage::default(),
        }
    }
}

/// An HTTP answer from the upstream (after retries, where the status was retryable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The upstream's HTTP status.
    pub status_code: u16,
    /// The upstream's request id (its `x-request-id` header), or one of ours if it sent none.
    pub request_id: String,
    /// The upstream's body: its answer on 2xx, its error object otherwise.
    pub body: ResponseBody,
}

/// The reason a line has no HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoResponse {
    /// Machine-readable reason.
    pub code: NoResponseCode,
    /// Human-readable detail.
    pub message: String,
}

/// What happened to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (any status).
    Response(HttpResponse),
    /// There is no answer to report.
    NoResponse(NoResponse),
}

/// One line of the output or error file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultLine {
    /// `batch_req_…`; see [`BatchRequestId::for_line`].
    pub id: BatchRequestId,
    /// The input line's `custom_id`, unescaped (it is re-escaped on output).
    pub custom_id: String,
    /// The upstream's answer, or why there is none.
    pub outcome: Outcome,
}

impl ResultLine {
    /// A line for an upstream answer: a success when `status_code` is 2xx, otherwise an
    /// error-file line carrying the upstream's error body.
    pub fn response(
        id: BatchRequestId,
        custom_id: impl Into<String>,
        status_code: u16,
        request_id: impl Into<String>,
        body: ResponseBody,
    ) -> Self {
        Self {
            id,
            custom_id: custom_id.into(),
            outcome: Outcome::Response(HttpResponse {
                status_code,
                request_id: request_id.into(),
                body,
            }),
        }
    }

    /// An error-file line without an HTTP answer; `message: None` uses the code's
    /// [`default_message`](NoResponseCode::default_message).
    pub fn no_response(
        id: BatchRequestId,
        custom_id: impl Into<String>,
        code: NoResponseCode,
        message: Option<String>,
    ) -> Self {
        Self {
            id,
            custom_id: custom_id.into(),
            outcome: Outcome::NoResponse(NoResponse {
                code,
                message: message.unwrap_or_else(|| code.default_message().to_owned()),
            }),
        }
    }

    /// True for an output-file line: an upstream answer with a 2xx status.
    pub fn is_success(&self) -> bool {
        matches!(&self.outcome, Outcome::Response(r) if (200..300).contains(&r.status_code))
    }

    /// True for a final line (see the [module docs](self)): an upstream answer of any status,
    /// or an error whose code [`is_final`](NoResponseCode::is_final).
    pub fn is_final(&self) -> bool {
        match &self.outcome {
            Outcome::Response(_) => true,
            Outcome::NoResponse(error) => error.code.is_final(),
        }
    }

    /// Usage to account for this line: the body's for a success, zero otherwise.
    pub fn usage(&self) -> Usage {
        match &self.outcome {
            Outcome::Response(response) if self.is_success() => response.body.usage(),
            _ => Usage::default(),
        }
    }

    /// Appends the line's JSON and a `\n` to `out`.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(br#"{"id":"#);
        push_json_string(out, self.id.as_str());
        out.extend_from_slice(br#","custom_id":"#);
        push_json_string(out, &self.custom_id);
        match &self.outcome {
            Outcome::Response(response) => {
                out.extend_from_slice(br#","response":{"status_code":"#);
                out.extend_from_slice(response.status_code.to_string().as_bytes());
                out.extend_from_slice(br#","request_id":"#);
                push_json_string(out, &response.request_id);
                out.extend_from_slice(br#","body":"#);
                out.extend_from_slice(response.body.as_str().as_bytes());
                out.extend_from_slice(br#"},"error":null}"#);
            }
            Outcome::NoResponse(error) => {
                out.extend_from_slice(br#","response":null,"error":{"code":"#);
                push_json_string(out, error.code.as_str());
                out.extend_from_slice(br#","message":"#);
                push_json_string(out, &error.message);
                out.extend_from_slice(b"}}");
            }
        }
        out.push(b'\n');
    }

    /// The line's JSON followed by `\n`.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_json_line(&mut out);
        out
    }
}

/// Appends `value` as a JSON string literal. Escapes `"`, `\` and control characters; copies
/// every other byte as is (UTF-8 stays UTF-8; U+2028 and U+2029 are valid in JSON strings).
fn push_json_string(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in value.as_bytes() {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x00..=0x1f => {
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'"');
}

/// `usage.input_tokens_details` of the Batch object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the upstream's prompt cache.
    #[schema(required = true)]
    pub cached_tokens: u64,
}

/// `usage.output_tokens_details` of the Batch object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct OutputTokensDetails {
    /// Completion tokens spent on reasoning.
    #[schema(required = true)]
    pub reasoning_tokens: u64,
}

/// A batch's token usage, summed over its successful responses: the Batch object's `usage`.
/// Serialises with every key, zeros included (so the schema marks every key required, though
/// reading one back defaults the missing ones).
///
/// Sums saturate at `u64::MAX` rather than overflow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Usage {
    /// Sum of `prompt_tokens` (or `input_tokens`).
    #[schema(required = true)]
    pub input_tokens: u64,
    /// Details of the input tokens.
    #[schema(required = true)]
    pub input_tokens_details: InputTokensDetails,
    /// Sum of `completion_tokens` (or `output_tokens`); 0 for embeddings.
    #[schema(required = true)]
    pub output_tokens: u64,
    /// Details of the output tokens.
    #[schema(required = true)]
    pub output_tokens_details: OutputTokensDetails,
    /// `input_tokens + output_tokens`, whatever total the upstreams reported.
    #[schema(required = true)]
    pub total_tokens: u64,
}

impl Usage {
    /// Reads the `usage` object of an upstream response. Both shapes are understood:
    /// chat/completions/embeddings (`prompt_tokens`, `completion_tokens`,
    /// `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`) and
    /// responses (`input_tokens`, `output_tokens`, `input_tokens_details`,
    /// `output_tokens_details`). Missing, `null` or non-integer counts read as 0;
    /// `total_tokens` is always input + output. A usage that reports only `total_tokens`
    /// (vLLM's rerank and score answers) counts that total as input: every token of a
    /// scoring request is read, none generated.
    pub fn from_usage_object(usage: &serde_json::Value) -> Self {
        let find = |keys: &[&str]| -> Option<u64> {
            keys.iter()
                .find_map(|key| usage.pointer(key).and_then(serde_json::Value::as_u64))
        };
        let count = |keys: &[&str]| find(keys).unwrap_or(0);
        let output_tokens = count(&["/completion_tokens", "/output_tokens"]);
        let input_tokens = find(&["/prompt_tokens", "/input_tokens"])
            .unwrap_or_else(|| count(&["/total_tokens"]).saturating_sub(output_tokens));
        Self {
            input_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: count(&[
                    "/prompt_tokens_details/cached_tokens",
                    "/input_tokens_details/cached_tokens",
                ]),
            },
            output_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: count(&[
                    "/completion_tokens_details/reasoning_tokens",
                    "/output_tokens_details/reasoning_tokens",
                ]),
            },
            total_tokens: input_tokens.saturating_add(output_tokens),
        }
    }

    /// The usage reported by a response body (its `usage` key; zeros if absent).
    pub fn from_response(body: &serde_json::Value) -> Self {
        body.get("usage")
            .map(Self::from_usage_object)
            .unwrap_or_default()
    }

    /// Adds the usage of one successful response body.
    pub fn add_response(&mut self, body: &serde_json::Value) {
        self.merge(&Self::from_response(body));
    }

    /// Adds another sum (e.g. a chunk's) to this one.
    pub fn merge(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.input_tokens_details.cached_tokens = self
            .input_tokens_details
            .cached_tokens
            .saturating_add(other.input_tokens_details.cached_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.output_tokens_details.reasoning_tokens = self
            .output_tokens_details
            .reasoning_tokens
            .saturating_add(other.output_tokens_details.reasoning_tokens);
        self.total_tokens = self.total_tokens.saturating_add(other.total_tokens);
    }
}

/// A result line that [`ResultLineSummary::parse`] cannot read.
#[derive(Debug, thiserror::Error)]
pub enum ResultLineError {
    /// Not JSON, or missing/mistyped keys.
    #[error("result line is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// Both or neither of `response` and `error` are set.
    #[error("result line must have exactly one of `response` and `error`")]
    Ambiguous,
}

/// What the finalizer (and an executor re-running a chunk) needs from a result line: whose it
/// is, how it ended, and its usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultLineSummary {
    /// The line's `id`: [`BatchRequestId::for_line`] of its input line, so a reader matches
    /// result lines to input lines without any other index.
    pub id: BatchRequestId,
    /// The line's `custom_id`.
    pub custom_id: String,
    /// True when the line has a response with a 2xx status (an output-file line).
    pub succeeded: bool,
    /// `response.status_code`, when the line has a response.
    pub status_code: Option<u16>,
    /// `error.code`, when the line has no response.
    pub no_response_code: Option<NoResponseCode>,
    /// The body's usage for a success; zero otherwise.
    pub usage: Usage,
}

impl ResultLineSummary {
    /// Reads one result line (a trailing `\n` is allowed). Only `id`, `custom_id`, the status
    /// or error code, and the body's `usage` are extracted; the rest of the body is skipped
    /// without being built.
    pub fn parse(line: &[u8]) -> Result<Self, ResultLineError> {
        let raw: RawResultLine<'_> = serde_json::from_slice(line)?;
        match (raw.response, raw.error) {
            (Some(response), None) => {
                let succeeded = (200..300).contains(&response.status_code);
                let usage = match (succeeded, response.body) {
                    (true, UsageOnly(Some(usage))) => Usage::from_usage_object(&usage),
                    _ => Usage::default(),
                };
                Ok(Self {
                    id: raw.id,
                    custom_id: raw.custom_id.into_owned(),
                    succeeded,
                    status_code: Some(response.status_code),
                    no_response_code: None,
                    usage,
                })
            }
            (None, Some(error)) => Ok(Self {
                id: raw.id,
                custom_id: raw.custom_id.into_owned(),
                succeeded: false,
                status_code: None,
                no_response_code: Some(error.code),
                usage: Usage::default(),
            }),
            _ => Err(ResultLineError::Ambiguous),
        }
    }

    /// True for a final line (see the [module docs](self)): a response of any status, or an
    /// error whose code [`is_final`](NoResponseCode::is_final).
    pub fn is_final(&self) -> bool {
        self.status_code.is_some() || self.no_response_code.is_some_and(NoResponseCode::is_final)
    }
}

#[derive(Deserialize)]
struct RawResultLine<'a> {
    id: BatchRequestId,
    #[serde(borrow)]
    custom_id: Cow<'a, str>,
    response: Option<RawResponse>,
    error: Option<RawNoResponse>,
}

#[derive(Deserialize)]
struct RawResponse {
    status_code: u16,
    #[serde(default)]
    body: UsageOnly,
}

#[derive(Deserialize)]
struct RawNoResponse {
    code: NoResponseCode,
}

/// The `usage` value of a JSON object, the object's other keys skipped; `None` for an object
/// without `usage` or a value that is not an object.
#[derive(Default)]
struct UsageOnly(Option<serde_json::Value>);

/// A map key, reduced to "is it `usage`?".
struct IsUsageKey(bool);

impl<'de> Deserialize<'de> for IsUsageKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = IsUsageKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IsUsageKey, E> {
                Ok(IsUsageKey(v == "usage"))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for UsageOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = UsageOnly;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageOnly, A::Error> {
                let mut usage = None;
                while let Some(IsUsageKey(is_usage)) = map.next_key()? {
                    if is_usage {
                        usage = map.next_value::<Option<serde_json::Value>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(UsageOnly(usage))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UsageOnly, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(UsageOnly(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<UsageOnly, E> {
                Ok(UsageOnly(None))
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::{Value, json};

    fn chat_body() -> ResponseBody {
        ResponseBody::from_json(
            br#"{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
 "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
   "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}}}"#,
        )
        .unwrap()
    }

    fn id() -> BatchRequestId {
        BatchRequestId::for_line("batch_abc", 7)
    }

    #[test]
    fn success_line_has_the_exact_shape_and_key_order() {
        let line = ResultLine::response(id(), "req-1", 200, "req_123", chat_body());
        let text = String::from_utf8(line.to_json_line()).unwrap();
        assert!(text.ends_with("}\n"));
        assert_eq!(text.matches('\n').count(), 1, "one line: {text}");
        assert_eq!(
            text,
            format!(
                "{{\"id\":\"{}\",\"custom_id\":\"req-1\",\"response\":{{\"status_code\":200,\"request_id\":\"req_123\",\"body\":{}}},\"error\":null}}\n",
                id(),
                chat_body().as_str()
            )
        );
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["response"]["body"]["choices"][0]["message"]["content"],
            "hi"
        );
        assert!(line.is_success());
    }

    #[test]
    fn upstream_key_order_is_preserved() {
        let body = ResponseBody::from_json(br#"{"z": 1, "a": {"y": 2, "b": 3}}"#).unwrap();
        assert_eq!(body.as_str(), r#"{"z": 1, "a": {"y": 2, "b": 3}}"#);
    }

    #[test]
    fn upstream_error_line_keeps_status_and_body() {
        let body = ResponseBody::from_json(
            br#"{"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}}"#,
        )
        .unwrap();
        let line = ResultLine::response(id(), "req-2", 400, "req_9", body);
        assert!(!line.is_success());
        assert_eq!(line.usage(), Usage::default());
        let value: Value = serde_json::from_slice(&line.to_json_line()).unwrap();
        assert_eq!(value["response"]["status_code"], 400);
        assert_eq!(value["response"]["body"]["error"]["message"], "bad");
        assert_eq!(value["error"], Value::Null);
    }

    #[test]
    fn no_response_lines_for_every_code() {
        for (code, name) in [
            (NoResponseCode::BatchExpired, "batch_expired"),
            (NoResponseCode::BatchCancelled, "batch_cancelled"),
            (NoResponseCode::RequestTimeout, "request_timeout"),
            (NoResponseCode::UpstreamUnreachable, "upstream_unreachable"),
            (NoResponseCode::ResponseTooLarge, "response_too_large"),
            (NoResponseCode::ChunkFailed, "chunk_failed"),
        ] {
            let line = ResultLine::no_response(id(), "r", code, None);
            assert!(!line.is_success());
            assert_eq!(
                line.is_final(),
                !matches!(
                    code,
                    NoResponseCode::BatchExpired | NoResponseCode::BatchCancelled
                )
            );
            assert_eq!(
                ResultLineSummary::parse(&line.to_json_line())
                    .unwrap()
                    .is_final(),
                line.is_final()
            );
            let text = String::from_utf8(line.to_json_line()).unwrap();
            assert_eq!(
                text,
                format!(
                    "{{\"id\":\"{}\",\"custom_id\":\"r\",\"response\":null,\"error\":{{\"code\":\"{name}\",\"message\":\"{}\"}}}}\n",
                    id(),
                    code.default_message()
                )
            );
            assert_eq!(code.to_string(), name);
            assert_eq!(serde_json::to_value(code).unwrap(), json!(name));
        }
        let custom = ResultLine::no_response(
            id(),
            "r",
            NoResponseCode::RequestTimeout,
            Some("timed out after 3 attempts".to_owned()),
        );
        let value: Value = serde_json::from_slice(&custom.to_json_line()).unwrap();
        assert_eq!(value["error"]["message"], "timed out after 3 attempts");
    }

    #[test]
    fn custom_ids_are_escaped_and_round_trip() {
        let tricky = "caf\u{e9} \"q\" \\ \n\r\t\u{1}\u{8}\u{c}\u{1f}\u{7f} \u{2028} 😀";
        let line = ResultLine::no_response(id(), tricky, NoResponseCode::BatchCancelled, None);
        let bytes = line.to_json_line();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["custom_id"], tricky);
        assert_eq!(ResultLineSummary::parse(&bytes).unwrap().custom_id, tricky);
    }

    #[test]
    fn pretty_printed_and_crlf_bodies_fit_on_one_line() {
        let body =
            ResponseBody::from_json(b"\r\n{\r\n  \"a\": \"x\\ny\",\r\n  \"b\": [1,\n2]\r\n}\n")
                .unwrap();
        assert!(!body.as_str().contains('\n') && !body.as_str().contains('\r'));
        assert_eq!(body.to_value(), json!({"a": "x\ny", "b": [1, 2]}));
    }

    #[test]
    fn from_json_rejects_non_objects_and_garbage() {
        assert!(matches!(
            ResponseBody::from_json(b"[1]"),
            Err(InvalidResponseBody::NotAnObject)
        ));
        assert!(matches!(
            ResponseBody::from_json(b"<html>"),
            Err(InvalidResponseBody::NotJson(_))
        ));
        assert!(matches!(
            ResponseBody::from_json(b"{\"a\": \"\xff\"}"),
            Err(InvalidResponseBody::NotJson(_))
        ));
        assert!(matches!(
            ResponseBody::from_json(b"{} {}"),
            Err(InvalidResponseBody::NotJson(_))
        ));
        assert!(matches!(
            ResponseBody::from_value(&json!("text")),
            Err(InvalidResponseBody::NotAnObject)
        ));
        assert_eq!(
            ResponseBody::from_value(&json!({"a": 1})).unwrap().as_str(),
            r#"{"a":1}"#
        );
    }

    #[test]
    fn from_upstream_wraps_non_json_bodies() {
        let body = ResponseBody::from_upstream(502, b"<html>Bad \"Gateway\"</html>\n");
        assert_eq!(
            body.to_value(),
            json!({"error": {
                "message": "The upstream answered HTTP 502 with a body that is not a JSON object: <html>Bad \"Gateway\"</html>\n",
                "type": "upstream_error", "param": null, "code": null
            }})
        );
        assert!(!body.as_str().contains('\n'));

        let long = "x".repeat(5000);
        let body = ResponseBody::from_upstream(500, long.as_bytes()).to_value();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.ends_with(&format!("{}…", "x".repeat(10))));
        assert!(message.chars().count() < 1100);

        let json_body = ResponseBody::from_upstream(429, br#"{"error": {"message": "slow down"}}"#);
        assert_eq!(json_body.as_str(), r#"{"error": {"message": "slow down"}}"#);
    }

    #[test]
    fn deterministic_ids_are_stable_and_distinct() {
        let a = BatchRequestId::for_line("batch_1", 1);
        assert_eq!(a, BatchRequestId::for_line("batch_1", 1));
        assert_ne!(a, BatchRequestId::for_line("batch_1", 2));
        assert_ne!(a, BatchRequestId::for_line("batch_2", 1));
        assert!(a.as_str().starts_with("batch_req_"));
        let suffix = &a.as_str()[BatchRequestId::PREFIX.len()..];
        assert_eq!(suffix.len(), 32);
        assert!(
            suffix
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        // Pinned: changing the derivation would change ids of batches in flight.
        assert_eq!(
            BatchRequestId::for_line("batch_abc", 1).to_string(),
            "batch_req_172a4a0bc8b40f4129a67e4c874a0be6"
        );
    }

    #[test]
    fn random_ids_are_long_alphanumerics() {
        let a = BatchRequestId::random();
        let b = BatchRequestId::random();
        assert_ne!(a, b);
        let suffix = &a.as_str()[BatchRequestId::PREFIX.len()..];
        assert!(suffix.len() >= 24);
        assert!(suffix.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(serde_json::to_value(&a).unwrap(), json!(a.as_str()));
    }

    #[test]
    fn usage_serialises_every_key() {
        assert_eq!(
            serde_json::to_value(Usage::default()).unwrap(),
            json!({
                "input_tokens": 0,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 0,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 0
            })
        );
        let text = serde_json::to_string(&Usage::default()).unwrap();
        assert_eq!(
            text,
            r#"{"input_tokens":0,"input_tokens_details":{"cached_tokens":0},"output_tokens":0,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":0}"#
        );
        let partial: Usage = serde_json::from_str(r#"{"input_tokens": 3}"#).unwrap();
        assert_eq!(partial.input_tokens, 3);
    }

    #[test]
    fn usage_maps_chat_embeddings_and_responses_shapes() {
        let mut usage = Usage::default();
        usage.add_response(&chat_body().to_value());
        assert_eq!(
            usage,
            Usage {
                input_tokens: 12,
                input_tokens_details: InputTokensDetails { cached_tokens: 4 },
                output_tokens: 5,
                output_tokens_details: OutputTokensDetails {
                    reasoning_tokens: 2
                },
                total_tokens: 17,
            }
        );

        // Embeddings: no completion tokens; the upstream total is not trusted.
        usage.add_response(
            &json!({"object": "list", "usage": {"prompt_tokens": 8, "total_tokens": 999}}),
        );
        assert_eq!(usage.input_tokens, 20);
        assert_eq!(usage.output_tokens, 5);
        assert_eq!(usage.total_tokens, 25);

        // Responses API naming.
        let responses = Usage::from_response(&json!({"usage": {
            "input_tokens": 10, "input_tokens_details": {"cached_tokens": 1},
            "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 13
        }}));
        assert_eq!(
            (
                responses.input_tokens,
                responses.input_tokens_details.cached_tokens
            ),
            (10, 1)
        );
        assert_eq!(
            (
                responses.output_tokens,
                responses.output_tokens_details.reasoning_tokens
            ),
            (3, 2)
        );
        assert_eq!(responses.total_tokens, 13);

        // Null details, no usage, garbage values: zeros.
        let odd = Usage::from_response(&json!({"usage": {
            "prompt_tokens": 2, "completion_tokens": null, "prompt_tokens_details": null,
            "completion_tokens_details": {"reasoning_tokens": -1}
        }}));
        assert_eq!(odd.input_tokens, 2);
        assert_eq!(odd.total_tokens, 2);
        assert_eq!(Usage::from_response(&json!({"id": "x"})), Usage::default());
        assert_eq!(Usage::from_response(&json!("text")), Usage::default());

        // Rerank and score (vLLM): only a total, all of it read.
        let rerank = Usage::from_response(&json!({"usage": {"total_tokens": 41}}));
        assert_eq!((rerank.input_tokens, rerank.output_tokens), (41, 0));
        assert_eq!(rerank.total_tokens, 41);
        let with_output =
            Usage::from_response(&json!({"usage": {"completion_tokens": 4, "total_tokens": 10}}));
        assert_eq!(
            (with_output.input_tokens, with_output.total_tokens),
            (6, 10)
        );
    }

    #[test]
    fn merge_adds_every_field_and_saturates() {
        let mut a = Usage::from_response(&chat_body().to_value());
        let b = a;
        a.merge(&b);
        assert_eq!(a.input_tokens, 24);
        assert_eq!(a.input_tokens_details.cached_tokens, 8);
        assert_eq!(a.output_tokens, 10);
        assert_eq!(a.output_tokens_details.reasoning_tokens, 4);
        assert_eq!(a.total_tokens, 34);

        let mut big = Usage {
            input_tokens: u64::MAX,
            ..Usage::default()
        };
        big.merge(&b);
        assert_eq!(big.input_tokens, u64::MAX);
    }

    #[test]
    fn response_body_usage_reads_only_the_usage_key() {
        assert_eq!(
            chat_body().usage(),
            Usage::from_response(&chat_body().to_value())
        );
        let no_usage =
            ResponseBody::from_json(br#"{"data": [{"embedding": [0.1, 0.2]}]}"#).unwrap();
        assert_eq!(no_usage.usage(), Usage::default());
        let escaped_key =
            ResponseBody::from_json(br#"{"us\u0061ge": {"prompt_tokens": 1}}"#).unwrap();
        assert_eq!(escaped_key.usage().input_tokens, 1);
    }

    #[test]
    fn summary_reads_back_what_we_write() {
        let ok = ResultLine::response(id(), "a", 200, "r1", chat_body());
        let summary = ResultLineSummary::parse(&ok.to_json_line()).unwrap();
        assert_eq!(
            summary,
            ResultLineSummary {
                id: id(),
                custom_id: "a".to_owned(),
                succeeded: true,
                status_code: Some(200),
                no_response_code: None,
                usage: ok.usage(),
            }
        );
        assert_eq!(summary.usage.total_tokens, 17);
        assert!(summary.is_final());

        // A failed response's usage is not counted, even if its body has one.
        let failed = ResultLine::response(id(), "b", 500, "r2", chat_body());
        assert!(failed.is_final());
        let summary = ResultLineSummary::parse(&failed.to_json_line()).unwrap();
        assert!(!summary.succeeded);
        assert!(summary.is_final());
        assert_eq!(summary.status_code, Some(500));
        assert_eq!(summary.usage, Usage::default());

        let expired = ResultLine::no_response(id(), "c", NoResponseCode::BatchExpired, None);
        let summary = ResultLineSummary::parse(&expired.to_json_line()).unwrap();
        assert!(!summary.succeeded);
        assert_eq!(summary.no_response_code, Some(NoResponseCode::BatchExpired));
        assert_eq!(summary.status_code, None);
    }

    #[test]
    fn summary_accepts_non_object_bodies_and_rejects_malformed_lines() {
        let string_body =
            br#"{"id": "x", "custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": "ok"}, "error": null}"#;
        let summary = ResultLineSummary::parse(string_body).unwrap();
        assert!(summary.succeeded);
        assert_eq!(summary.usage, Usage::default());

        let both = br#"{"id": "x", "custom_id": "a", "response": {"status_code": 200}, "error": {"code": "batch_expired", "message": "m"}}"#;
        assert!(matches!(
            ResultLineSummary::parse(both),
            Err(ResultLineError::Ambiguous)
        ));
        let neither = br#"{"id": "x", "custom_id": "a", "response": null, "error": null}"#;
        assert!(matches!(
            ResultLineSummary::parse(neither),
            Err(ResultLineError::Ambiguous)
        ));
        assert!(matches!(
            ResultLineSummary::parse(b"{\"id\": \"x\", \"custom_id\": 1}"),
            Err(ResultLineError::Json(_))
        ));
        let no_id = br#"{"custom_id": "a", "response": null, "error": {"code": "batch_expired", "message": "m"}}"#;
        assert!(matches!(
            ResultLineSummary::parse(no_id),
            Err(ResultLineError::Json(_))
        ));
        assert!(matches!(
            ResultLineSummary::parse(b"not json"),
            Err(ResultLineError::Json(_))
        ));
        let unknown_code = br#"{"id": "x", "custom_id": "a", "response": null, "error": {"code": "nope", "message": "m"}}"#;
        assert!(ResultLineSummary::parse(unknown_code).is_err());
    }
}
