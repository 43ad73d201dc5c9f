//! The OpenAI wire format: the error envelope and the inference endpoints, as pure
//! functions from a parsed request body to a response body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::generate::{self, canonical_hash};

/// An error answered in OpenAI's envelope:
/// `{"error":{"message","type","param","code"}}`, `type` chosen by status.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    /// The HTTP status answered.
    pub(crate) status: StatusCode,
    /// Human-readable explanation.
    pub(crate) message: String,
    /// The offending request field, when there is one.
    pub(crate) param: Option<&'static str>,
    /// OpenAI's machine-readable code (`model_not_found`, `rate_limit_exceeded`), if any.
    pub(crate) code: Option<&'static str>,
    /// When set, the response carries `Retry-After` (whole seconds, rounded up) and
    /// `retry-after-ms`.
    pub(crate) retry_after_secs: Option<f64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    /// A 400 `invalid_request_error`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub(crate) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(crate) fn retry_after(mut self, secs: Option<f64>) -> Self {
        self.retry_after_secs = secs;
        self
    }

    /// OpenAI's error `type` for a status.
    pub(crate) fn error_type(status: StatusCode) -> &'static str {
        match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            422 => "unprocessable_entity_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub(crate) fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": Self::error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            let headers = response.headers_mut();
            // Retry-After only allows whole seconds; round up so a client never retries early.
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.ceil() as u64));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from((secs * 1000.0).round() as u64),
            );
        }
        response
    }
}

/// The inference endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Moderations,
    /// vLLM's `/v1/rerank` (not OpenAI's).
    Rerank,
    /// vLLM's `/v1/score` (not OpenAI's).
    Score,
}

impl Endpoint {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
            Self::Moderations => "moderations",
            Self::Rerank => "rerank",
            Self::Score => "score",
        }
    }

    /// The model a request names: its `model`, which only moderations may omit (OpenAI then
    /// uses its latest moderation model).
    pub(crate) fn model(self, body: &Map<String, Value>) -> Result<&str, ApiError> {
        match self {
            Self::Moderations => crate::moderation::model(body),
            _ => model(body),
        }
    }
}

/// What the handler needs besides the body to build a response.
pub(crate) struct Context<'a> {
    /// The unique id of this request, reused in `chatcmpl-…`/`cmpl-…` ids.
    pub(crate) request_id: &'a str,
    /// Unix seconds for the `created` field.
    pub(crate) created: u64,
    /// Completion cap when the request sets none.
    pub(crate) default_max_tokens: u32,
    /// Embedding length when the request sets no `dimensions`.
    pub(crate) embedding_dim: u32,
}

/// A successful answer, before latency is applied.
#[derive(Debug)]
pub(crate) struct Generated {
    /// The JSON response body.
    pub(crate) body: Value,
    /// Completion tokens across all choices: what per-token latency is charged on.
    pub(crate) completion_tokens: u64,
}

/// The `model` field: required, a non-empty string.
pub(crate) fn model(body: &Map<String, Value>) -> Result<&str, ApiError> {
    match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        None | Some(Value::Null) => {
            Err(ApiError::invalid("you must provide a model parameter").param("model"))
        }
        Some(_) => Err(ApiError::invalid("model must be a non-empty string").param("model")),
    }
}

/// Rejects `stream: true`: the batch path never streams.
pub(crate) fn reject_stream(body: &Map<String, Value>) -> Result<(), ApiError> {
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Bool(true)) => Err(ApiError::invalid(
            "streaming is not supported by this server: batch requests never stream",
        )
        .param("stream")),
        Some(_) => Err(ApiError::invalid("stream must be a boolean").param("stream")),
    }
}

/// An optional integer field within `min..=max`.
pub(crate) fn optional_int(
    body: &Map<String, Value>,
    name: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u32>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(u32::try_from(n).ok()),
            _ => Err(ApiError::invalid(format!(
                "{name} must be an integer between {min} and {max}, got {value}"
            ))
            .param(name)),
        },
    }
}

/// The completion cap a request asks for: `max_completion_tokens`, else `max_tokens`.
/// Returns the cap in force and the requested value as it enters the content hash.
fn token_cap(body: &Map<String, Value>, default: u32) -> Result<(u32, Value), ApiError> {
    let max_completion_tokens = optional_int(body, "max_completion_tokens", 1, u32::MAX.into())?;
    let max_tokens = optional_int(body, "max_tokens", 1, u32::MAX.into())?;
    Ok(match max_completion_tokens.or(max_tokens) {
        Some(cap) => (cap, json!(cap)),
        None => (default, Value::Null),
    })
}

fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": { "cached_tokens": 0 },
        "completion_tokens_details": { "reasoning_tokens": 0 },
    })
}

/// Tokens charged for a non-text content part (image, audio, file), like OpenAI's flat
/// low-detail image cost.
pub(crate) const NON_TEXT_PART_TOKENS: u64 = 85;

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Prompt tokens of a chat request; validates the messages on the way.
fn chat_prompt_tokens(messages: &[Value]) -> Result<u64, ApiError> {
    let mut tokens = 0;
    for (i, message) in messages.iter().enumerate() {
        let invalid =
            |what: &str| ApiError::invalid(format!("messages[{i}]: {what}")).param("messages");
        let Some(message) = message.as_object() else {
            return Err(invalid("must be an object"));
        };
        match message.get("role").and_then(Value::as_str) {
            Some(role) if ROLES.contains(&role) => {}
            Some(role) => return Err(invalid(&format!("unknown role `{role}`"))),
            None => return Err(invalid("missing role")),
        }
        match message.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => tokens += generate::count_tokens(text),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text").and_then(Value::as_str) {
                            Some(text) => tokens += generate::count_tokens(text),
                            None => return Err(invalid("text part without a text string")),
                        },
                        Some(_) => tokens += NON_TEXT_PART_TOKENS,
                        None => return Err(invalid("content part without a type")),
                    }
                }
            }
            Some(_) => return Err(invalid("content must be a string, an array or null")),
        }
    }
    Ok(tokens)
}

/// `POST /v1/chat/completions`.
pub(crate) fn chat_completions(
    body: &Map<String, Value>,
    ctx: &Context<'_>,
) -> Result<Generated, ApiError> {
    let model = model(body)?;
    reject_stream(body)?;
    let messages = match body.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("messages must not be empty").param("messages"));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("missing required parameter: messages").param("messages"));
        }
        Some(_) => return Err(ApiError::invalid("messages must be an array").param("messages")),
    };
    let prompt_tokens = chat_prompt_tokens(messages)?;
    let (cap, cap_value) = token_cap(body, ctx.default_max_tokens)?;
    let n = optional_int(body, "n", 1, 128)?.unwrap_or(1);

    let model_value = json!(model);
    let messages_value = &body["messages"];
    let mut completion_tokens = 0;
    let choices: Vec<Value> = (0..n)
        .map(|index| {
            let hash = canonical_hash(&[
                &json!("chat"),
                &model_value,
                messages_value,
                &cap_value,
                &json!(index),
            ]);
            let completion = generate::completion(&hash, cap);
            completion_tokens += completion.tokens;
            json!({
                "index": index,
                "message": { "role": "assistant", "content": completion.text, "refusal": null },
                "finish_reason": completion.finish_reason,
                "logprobs": null,
            })
        })
        .collect();

    Ok(Generated {
        body: json!({
            "id": format!("chatcmpl-{}", ctx.request_id),
            "object": "chat.completion",
            "created": ctx.created,
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": null,
        }),
        completion_tokens,
    })
}

/// One item of a `prompt` or `input` array, with its token count.
struct InputItem {
    /// The item as sent: a string or an array of token ids. Enters the content hash.
    value: Value,
    tokens: u64,
}

/// Parses `prompt`/`input`: a string, an array of strings, an array of token ids, or an
/// array of token-id arrays.
fn input_items(
    body: &Map<String, Value>,
    name: &'static str,
    allow_empty_text: bool,
) -> Result<Vec<InputItem>, ApiError> {
    let invalid = |message: &str| ApiError::invalid(message.to_owned()).param(name);
    let text = |s: &str| -> Result<InputItem, ApiError> {
        if s.is_empty() && !allow_empty_text {
            return Err(invalid(&format!("{name} must not contain empty strings")));
        }
        Ok(InputItem {
            value: json!(s),
            tokens: generate::count_tokens(s),
        })
    };
    let tokens = |ids: &[Value]| -> Result<InputItem, ApiError> {
        if ids.is_empty() {
            return Err(invalid(&format!(
                "{name} must not contain empty token arrays"
            )));
        }
        if !ids.iter().all(|id| id.as_u64().is_some()) {
            return Err(invalid(&format!(
                "{name} must be a string, an array of strings, an array of token ids or an array of token-id arrays"
            )));
        }
        Ok(InputItem {
            value: Value::Array(ids.to_vec()),
            tokens: ids.len() as u64,
        })
    };
    match body.get(name) {
        None | Some(Value::Null) => Err(invalid(&format!("missing required parameter: {name}"))),
        Some(Value::String(s)) => Ok(vec![text(s)?]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid(&format!("{name} must not be empty")))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => text(s),
                    _ => Err(invalid(&format!("{name} mixes strings and other values"))),
                })
                .collect(),
            Value::Number(_) => Ok(vec![tokens(items)?]),
            Value::Array(_) => items
                .iter()
                .map(|item| match item {
                    Value::Array(ids) => tokens(ids),
                    _ => Err(invalid(&format!(
                        "{name} mixes token arrays and other values"
                    ))),
                })
                .collect(),
            _ => Err(invalid(&format!(
                "{name} must be a string, an array of strings, an array of token ids or an array of token-id arrays"
            ))),
        },
        Some(_) => Err(invalid(&format!(
            "{name} must be a string, an array of strings, an array of token ids or an array of token-id arrays"
        ))),
    }
}

/// `POST /v1/completions`: one choice per prompt and `n`, indexed `prompt * n + j`.
pub(crate) fn completions(
    body: &Map<String, Value>,
    ctx: &Context<'_>,
) -> Result<Generated, ApiError> {
    let model = model(body)?;
    reject_stream(body)?;
    let prompts = input_items(body, "prompt", true)?;
    let (cap, cap_value) = token_cap(body, ctx.default_max_tokens)?;
    let n = optional_int(body, "n", 1, 128)?.unwrap_or(1);

    let model_value = json!(model);
    let prompt_tokens = prompts.iter().map(|p| p.tokens).sum();
    let mut completion_tokens = 0;
    let mut choices = Vec::with_capacity(prompts.len() * n as usize);
    for prompt in &prompts {
        for j in 0..n {
            let hash = canonical_hash(&[
                &json!("completions"),
                &model_value,
                &prompt.value,
                &cap_value,
                &json!(j),
            ]);
            let completion = generate::completion(&hash, cap);
            completion_tokens += completion.tokens;
            choices.push(json!({
                "index": choices.len(),
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "logprobs": null,
            }));
        }
    }

    Ok(Generated {
        body: json!({
            "id": format!("cmpl-{}", ctx.request_id),
            "object": "text_completion",
            "created": ctx.created,
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": null,
        }),
        completion_tokens,
    })
}

/// `POST /v1/embeddings`. Vectors depend on model and input only, so a shorter
/// `dimensions` is the renormalised prefix of a longer one, like OpenAI's shortened
/// embeddings.
pub(crate) fn embeddings(
    body: &Map<String, Value>,
    ctx: &Context<'_>,
) -> Result<Generated, ApiError> {
    let model = model(body)?;
    let inputs = input_items(body, "input", false)?;
    let dim = optional_int(body, "dimensions", 1, 65_536)?.unwrap_or(ctx.embedding_dim);
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "encoding_format must be \"float\" or \"base64\", got {other}"
            ))
            .param("encoding_format"));
        }
    };

    let model_value = json!(model);
    let prompt_tokens: u64 = inputs.iter().map(|i| i.tokens).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let hash = canonical_hash(&[&json!("embeddings"), &model_value, &input.value]);
            let vector = generate::embedding(&hash, dim);
            let embedding = if base64 {
                json!(generate::base64_f32(&vector))
            } else {
                json!(
                    vector
                        .iter()
                        .map(|x| generate::f32_for_json(*x))
                        .collect::<Vec<_>>()
                )
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();

    Ok(Generated {
        body: json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
        }),
        completion_tokens: 0,
    })
}

/// What the endpoint modules' unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use serde_json::{Map, Value};

    use super::Context;

    /// A request context with small, fixed values.
    pub(crate) fn ctx() -> Context<'static> {
        Context {
            request_id: "test",
            created: 1,
            default_max_tokens: 64,
            embedding_dim: 8,
        }
    }

    /// `value`'s members (empty unless it is an object).
    pub(crate) fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::{ctx, object};

    #[test]
    fn error_types_follow_status() {
        assert_eq!(
            ApiError::error_type(StatusCode::BAD_REQUEST),
            "invalid_request_error"
        );
        assert_eq!(
            ApiError::error_type(StatusCode::UNAUTHORIZED),
            "authentication_error"
        );
        assert_eq!(
            ApiError::error_type(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_error"
        );
        assert_eq!(
            ApiError::error_type(StatusCode::SERVICE_UNAVAILABLE),
            "server_error"
        );
    }

    #[test]
    fn chat_prompt_tokens_count_parts() {
        let body = object(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:,"}}
                ]},
                {"role": "assistant", "content": null}
            ]
        }));
        let generated = chat_completions(&body, &ctx()).expect("valid chat");
        assert_eq!(generated.body["usage"]["prompt_tokens"], 2 + 3 + 85);
    }

    #[test]
    fn chat_rejects_unknown_role() {
        let body = object(json!({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}));
        let error = chat_completions(&body, &ctx()).expect_err("invalid role");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert_eq!(error.param, Some("messages"));
    }

    #[test]
    fn completions_index_prompts_times_n() {
        let body = object(json!({"model": "m", "prompt": ["a b", "c"], "n": 2}));
        let generated = completions(&body, &ctx()).expect("valid completions");
        let choices = generated.body["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 4);
        for (i, choice) in choices.iter().enumerate() {
            assert_eq!(choice["index"], i);
        }
        assert_eq!(generated.body["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn input_shapes() {
        for (input, count, tokens) in [
            (json!("one two"), 1, 2),
            (json!(["a", "b c"]), 2, 3),
            (json!([1, 2, 3]), 1, 3),
            (json!([[1, 2], [3]]), 2, 3),
        ] {
            let body = object(json!({"model": "m", "input": input}));
            let generated = embeddings(&body, &ctx()).expect("valid embeddings");
            assert_eq!(generated.body["data"].as_array().map(Vec::len), Some(count));
            assert_eq!(generated.body["usage"]["prompt_tokens"], tokens);
        }
        for input in [
            json!(""),
            json!([]),
            json!([[]]),
            json!(["a", 1]),
            json!({}),
        ] {
            let body = object(json!({"model": "m", "input": input}));
            let error = embeddings(&body, &ctx()).expect_err("invalid input");
            assert_eq!(error.param, Some("input"));
        }
    }
}
