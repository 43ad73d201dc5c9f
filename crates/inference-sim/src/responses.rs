//! `POST /v1/responses`: OpenAI's Responses API, answered with a `response` object holding
//! one assistant message, its usage in the Responses shape (`input_tokens`/`output_tokens`
//! and their details), and the request's settings echoed back as OpenAI does.

use serde_json::{Map, Value, json};

use crate::generate::{self, canonical_hash};
use crate::openai::{
    ApiError, Context, Generated, NON_TEXT_PART_TOKENS, model, optional_int, reject_stream,
};

/// OpenAI's lower bound of `max_output_tokens`.
const MIN_OUTPUT_TOKENS: u64 = 16;

/// Roles an input message may have.
const ROLES: &[&str] = &["user", "assistant", "system", "developer"];

/// `POST /v1/responses`.
pub(crate) fn responses(
    body: &Map<String, Value>,
    ctx: &Context<'_>,
) -> Result<Generated, ApiError> {
    let model = model(body)?;
    reject_stream(body)?;
    if !matches!(body.get("previous_response_id"), None | Some(Value::Null)) {
        // Nothing is stored here, so there is no earlier response to continue.
        return Err(ApiError::invalid(
            "previous_response_id is not supported by this server: send the whole input",
        )
        .param("previous_response_id"));
    }
    let input = match body.get("input") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("missing required parameter: input").param("input"));
        }
        Some(input) => input,
    };
    let instructions = match body.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.as_str()),
        Some(_) => {
            return Err(ApiError::invalid("instructions must be a string").param("instructions"));
        }
    };
    let input_tokens = input_tokens(input)? + instructions.map_or(0, generate::count_tokens);
    let max_output_tokens = optional_int(
        body,
        "max_output_tokens",
        MIN_OUTPUT_TOKENS,
        u32::MAX.into(),
    )?;
    let temperature = number(body, "temperature", 0.0, 2.0, 1.0)?;
    let top_p = number(body, "top_p", 0.0, 1.0, 1.0)?;
    let parallel_tool_calls = match body.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid("parallel_tool_calls must be a boolean")
                .param("parallel_tool_calls"));
        }
    };
    let tools = match body.get("tools") {
        None | Some(Value::Null) => json!([]),
        Some(tools @ Value::Array(_)) => tools.clone(),
        Some(_) => return Err(ApiError::invalid("tools must be an array").param("tools")),
    };
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => json!({}),
        Some(metadata @ Value::Object(_)) => metadata.clone(),
        Some(_) => {
            return Err(ApiError::invalid("metadata must be an object").param("metadata"));
        }
    };
    let echo = |name: &str, default: Value| body.get(name).cloned().unwrap_or(default);

    let cap = max_output_tokens.unwrap_or(ctx.default_max_tokens);
    let hash = canonical_hash(&[
        &json!("responses"),
        &json!(model),
        input,
        &json!(instructions),
        &json!(max_output_tokens),
    ]);
    let completion = generate::completion(&hash, cap);
    let (status, incomplete_details) = match completion.finish_reason {
        "length" => ("incomplete", json!({"reason": "max_output_tokens"})),
        _ => ("completed", Value::Null),
    };
    let output_tokens = completion.tokens;

    Ok(Generated {
        body: json!({
            "id": format!("resp_{}", ctx.request_id),
            "object": "response",
            "created_at": ctx.created,
            "status": status,
            "completed_at": (status == "completed").then_some(ctx.created),
            "background": false,
            "error": null,
            "incomplete_details": incomplete_details,
            "instructions": instructions,
            "max_output_tokens": max_output_tokens,
            "max_tool_calls": echo("max_tool_calls", Value::Null),
            "model": model,
            "output": [{
                "type": "message",
                "id": format!("msg_{}", ctx.request_id),
                "status": status,
                "role": "assistant",
                "content": [{
                    "type": "output_text",
                    "text": completion.text,
                    "annotations": [],
                    "logprobs": [],
                }],
            }],
            "parallel_tool_calls": parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": echo("reasoning", json!({"effort": null, "summary": null})),
            "service_tier": "default",
            "store": echo("store", json!(true)),
            "temperature": temperature,
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": tools,
            "top_p": top_p,
            "truncation": echo("truncation", json!("disabled")),
            "usage": {
                "input_tokens": input_tokens,
                // OpenAI now reports prompt-cache writes too; the SDK requires the key.
                "input_tokens_details": { "cached_tokens": 0, "cache_write_tokens": 0 },
                "output_tokens": output_tokens,
                "output_tokens_details": { "reasoning_tokens": 0 },
                "total_tokens": input_tokens + output_tokens,
            },
            "user": echo("user", Value::Null),
            "metadata": metadata,
        }),
        completion_tokens: output_tokens,
    })
}

/// An optional number within `min..=max`, `default` when absent.
fn number(
    body: &Map<String, Value>,
    name: &'static str,
    min: f64,
    max: f64,
    default: f64,
) -> Result<f64, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => match value.as_f64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "{name} must be a number between {min} and {max}, got {value}"
            ))
            .param(name)),
        },
    }
}

/// Input tokens of `input`: a string, or a list of input items (messages, function calls
/// and their outputs, item references). Validates the items on the way.
fn input_tokens(input: &Value) -> Result<u64, ApiError> {
    let items = match input {
        Value::String(text) => return Ok(generate::count_tokens(text)),
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid("input must not be empty").param("input"));
        }
        Value::Array(items) => items,
        _ => {
            return Err(
                ApiError::invalid("input must be a string or an array of input items")
                    .param("input"),
            );
        }
    };
    let mut tokens = 0;
    for (i, item) in items.iter().enumerate() {
        let invalid = |what: &str| ApiError::invalid(format!("input[{i}]: {what}")).param("input");
        let Some(item) = item.as_object() else {
            return Err(invalid("must be an object"));
        };
        let text_of = |key: &str| -> Result<u64, ApiError> {
            match item.get(key) {
                Some(Value::String(text)) => Ok(generate::count_tokens(text)),
                _ => Err(invalid(&format!("missing string `{key}`"))),
            }
        };
        tokens += match item.get("type").and_then(Value::as_str) {
            // A message may leave out its `type`.
            None | Some("message") => message_tokens(item).map_err(|what| invalid(&what))?,
            Some("function_call") => text_of("arguments")?,
            Some("function_call_output") => text_of("output")?,
            Some("item_reference") => 0,
            Some(other) => return Err(invalid(&format!("unsupported item type `{other}`"))),
        };
    }
    Ok(tokens)
}

/// Tokens of one input message: the words of its text parts, a flat charge per image, file
/// or audio part.
fn message_tokens(message: &Map<String, Value>) -> Result<u64, String> {
    match message.get("role").and_then(Value::as_str) {
        Some(role) if ROLES.contains(&role) => {}
        Some(role) => return Err(format!("unknown role `{role}`")),
        None => return Err("missing role".to_owned()),
    }
    let parts = match message.get("content") {
        Some(Value::String(text)) => return Ok(generate::count_tokens(text)),
        Some(Value::Array(parts)) => parts,
        _ => return Err("content must be a string or an array of content parts".to_owned()),
    };
    let mut tokens = 0;
    for part in parts {
        tokens += match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text") => match part.get("text") {
                Some(Value::String(text)) => generate::count_tokens(text),
                _ => return Err("text part without a text string".to_owned()),
            },
            Some("refusal") => match part.get("refusal") {
                Some(Value::String(text)) => generate::count_tokens(text),
                _ => return Err("refusal part without a refusal string".to_owned()),
            },
            Some("input_image" | "input_file" | "input_audio") => NON_TEXT_PART_TOKENS,
            Some(other) => return Err(format!("unsupported content part type `{other}`")),
            None => return Err("content part without a type".to_owned()),
        };
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::{ctx, object};

    #[test]
    fn input_items_are_counted() {
        let body = object(json!({
            "model": "m",
            "instructions": "be brief",
            "input": [
                {"role": "developer", "content": "answer in french"},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "what is this"},
                    {"type": "input_image", "image_url": "data:,"}
                ]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{\"a\": 1}"},
                {"type": "function_call_output", "call_id": "c", "output": "one two"},
            ]
        }));
        let generated = responses(&body, &ctx()).expect("valid");
        assert_eq!(
            generated.body["usage"]["input_tokens"],
            2 + 3 + 3 + 85 + 2 + 2
        );
    }

    #[test]
    fn bad_items_are_400s_on_input() {
        for input in [
            json!([]),
            json!(7),
            json!([1]),
            json!([{"role": "wizard", "content": "hi"}]),
            json!([{"role": "user", "content": [{"type": "video"}]}]),
            json!([{"type": "web_search_call"}]),
            json!([{"type": "function_call_output", "call_id": "c"}]),
        ] {
            let body = object(json!({"model": "m", "input": input}));
            let error = responses(&body, &ctx()).expect_err("invalid input");
            assert_eq!(error.param, Some("input"), "{input}");
        }
    }
}
