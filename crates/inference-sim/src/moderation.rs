//! `POST /v1/moderations`: one moderation result per input, flagged by keyword so tests can
//! choose what is flagged, with every category OpenAI's current models report. Moderations
//! carry no usage.

use serde_json::{Map, Value, json};

use crate::generate::{Hash, canonical_hash};
use crate::openai::{ApiError, Context, Generated};

/// The model OpenAI uses when a moderation request names none.
const DEFAULT_MODEL: &str = "omni-moderation-latest";

/// One moderation category: its wire name, the word that flags it, and whether OpenAI scores
/// it on images too (else on text only).
struct Category {
    name: &'static str,
    keyword: &'static str,
    images: bool,
}

/// Every category of `omni-moderation-latest`, in OpenAI's order. A text is flagged in a
/// category when one of its words (lowercased, split at anything but letters, digits and
/// `-`) is exactly the category's keyword.
#[rustfmt::skip]
const CATEGORIES: [Category; 13] = [
    Category { name: "harassment", keyword: "idiot", images: false },
    Category { name: "harassment/threatening", keyword: "threaten", images: false },
    Category { name: "hate", keyword: "hate", images: false },
    Category { name: "hate/threatening", keyword: "exterminate", images: false },
    Category { name: "illicit", keyword: "shoplift", images: false },
    Category { name: "illicit/violent", keyword: "gun", images: false },
    Category { name: "self-harm", keyword: "self-harm", images: true },
    Category { name: "self-harm/intent", keyword: "suicide", images: true },
    Category { name: "self-harm/instructions", keyword: "overdose", images: true },
    Category { name: "sexual", keyword: "nsfw", images: true },
    Category { name: "sexual/minors", keyword: "underage", images: false },
    Category { name: "violence", keyword: "kill", images: true },
    Category { name: "violence/graphic", keyword: "gore", images: true },
];

/// The `model` of a moderation request: optional, [`DEFAULT_MODEL`] when absent.
pub(crate) fn model(body: &Map<String, Value>) -> Result<&str, ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(DEFAULT_MODEL),
        Some(Value::String(model)) if !model.is_empty() => Ok(model),
        Some(_) => Err(ApiError::invalid("model must be a non-empty string").param("model")),
    }
}

/// What one result is computed from.
struct Subject<'a> {
    /// The input as sent (a string, or the whole multi-modal array): enters the score hash.
    value: &'a Value,
    /// The text parts.
    texts: Vec<&'a str>,
    /// True when an image part is present.
    image: bool,
}

/// Parses `input`: a string, an array of strings (one result each), or an array of
/// multi-modal parts `{"type": "text", "text"}` / `{"type": "image_url", "image_url":
/// {"url"}}` (one result for all of them).
fn subjects(body: &Map<String, Value>) -> Result<Vec<Subject<'_>>, ApiError> {
    let invalid = |message: &str| ApiError::invalid(message.to_owned()).param("input");
    let input = match body.get("input") {
        None | Some(Value::Null) => return Err(invalid("missing required parameter: input")),
        Some(input) => input,
    };
    match input {
        Value::String(text) => Ok(vec![Subject {
            value: input,
            texts: vec![text],
            image: false,
        }]),
        Value::Array(items) if items.is_empty() => Err(invalid("input must not be empty")),
        Value::Array(items) if items[0].is_string() => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(Subject {
                    value: item,
                    texts: vec![text],
                    image: false,
                }),
                _ => Err(invalid("input mixes strings and other values")),
            })
            .collect(),
        Value::Array(parts) => {
            let mut subject = Subject {
                value: input,
                texts: Vec::new(),
                image: false,
            };
            for (i, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text") {
                        Some(Value::String(text)) => subject.texts.push(text),
                        _ => {
                            return Err(invalid(&format!(
                                "input[{i}]: text part without a text string"
                            )));
                        }
                    },
                    Some("image_url") => match part.pointer("/image_url/url") {
                        Some(Value::String(_)) => subject.image = true,
                        _ => {
                            return Err(invalid(&format!(
                                "input[{i}]: image_url part without image_url.url"
                            )));
                        }
                    },
                    _ => {
                        return Err(invalid(&format!(
                            "input[{i}]: must be a string, or a part of type `text` or `image_url`"
                        )));
                    }
                }
            }
            Ok(vec![subject])
        }
        _ => Err(invalid(
            "input must be a string, an array of strings or an array of multi-modal parts",
        )),
    }
}

/// The words a keyword is looked for among, lowercased.
fn words(texts: &[&str]) -> Vec<String> {
    texts
        .iter()
        .flat_map(|text| text.split(|c: char| !(c.is_alphanumeric() || c == '-')))
        .filter(|word| !word.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// A score in `low..low + span`, drawn from two bytes of `hash`.
fn score(hash: &Hash, i: usize, low: f64, span: f64) -> f64 {
    let draw = f64::from(u16::from_le_bytes([hash[2 * i], hash[2 * i + 1]])) / 65_536.0;
    // Rounded to 6 digits so the JSON reads like OpenAI's.
    ((low + draw * span) * 1e6).round() / 1e6
}

/// One moderation result.
fn result(subject: &Subject<'_>, model: &Value) -> Value {
    let found = words(&subject.texts);
    let hash = canonical_hash(&[&json!("moderations"), model, subject.value]);
    let mut categories = Map::new();
    let mut scores = Map::new();
    let mut applied = Map::new();
    let mut flagged = false;
    for (i, category) in CATEGORIES.iter().enumerate() {
        let hit = found.iter().any(|word| word == category.keyword);
        flagged |= hit;
        let score = if hit {
            score(&hash, i, 0.9, 0.099)
        } else {
            score(&hash, i, 0.000_001, 0.01)
        };
        let mut types = Vec::new();
        if !subject.texts.is_empty() {
            types.push("text");
        }
        if subject.image && category.images {
            types.push("image");
        }
        categories.insert(category.name.to_owned(), json!(hit));
        scores.insert(category.name.to_owned(), json!(score));
        applied.insert(category.name.to_owned(), json!(types));
    }
    json!({
        "flagged": flagged,
        "categories": categories,
        "category_scores": scores,
        "category_applied_input_types": applied,
    })
}

/// `POST /v1/moderations`.
pub(crate) fn moderations(
    body: &Map<String, Value>,
    ctx: &Context<'_>,
) -> Result<Generated, ApiError> {
    let model = model(body)?;
    let model_value = json!(model);
    let results: Vec<Value> = subjects(body)?
        .iter()
        .map(|subject| result(subject, &model_value))
        .collect();
    Ok(Generated {
        body: json!({
            "id": format!("modr-{}", ctx.request_id),
            "model": model,
            "results": results,
        }),
        completion_tokens: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::{ctx, object};

    #[test]
    fn keywords_flag_their_category_only() {
        for category in &CATEGORIES {
            let text = format!("I say: {}!", category.keyword.to_uppercase());
            let body = object(json!({"input": text}));
            let generated = moderations(&body, &ctx()).expect("valid");
            let result = &generated.body["results"][0];
            assert_eq!(result["flagged"], true, "{text}");
            for other in &CATEGORIES {
                let hit = other.name == category.name;
                assert_eq!(result["categories"][other.name], hit, "{text}");
                let score = result["category_scores"][other.name]
                    .as_f64()
                    .expect("score");
                assert_eq!(score >= 0.9, hit, "{text}: {score}");
            }
        }
        // A keyword inside another word is not that word.
        let body = object(json!({"input": "skill and hatever"}));
        let generated = moderations(&body, &ctx()).expect("valid");
        assert_eq!(generated.body["results"][0]["flagged"], false);
    }

    #[test]
    fn multi_modal_input_is_one_result_with_image_types() {
        let body = object(json!({"model": "omni-moderation-2024-09-26", "input": [
            {"type": "text", "text": "kill"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        ]}));
        let generated = moderations(&body, &ctx()).expect("valid");
        let results = generated.body["results"].as_array().expect("results");
        assert_eq!(results.len(), 1);
        let applied = &results[0]["category_applied_input_types"];
        assert_eq!(applied["violence"], json!(["text", "image"]));
        assert_eq!(applied["hate"], json!(["text"]));
        assert_eq!(generated.body["model"], "omni-moderation-2024-09-26");

        let body = object(json!({"input": [{"type": "image_url", "image_url": {"url": "x"}}]}));
        let generated = moderations(&body, &ctx()).expect("valid");
        let applied = &generated.body["results"][0]["category_applied_input_types"];
        assert_eq!(applied["sexual"], json!(["image"]));
        assert_eq!(applied["harassment"], json!([]));
        assert_eq!(generated.body["model"], DEFAULT_MODEL);
    }
}
