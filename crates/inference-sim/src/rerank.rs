//! `POST /v1/rerank` and `POST /v1/score`: vLLM's cross-encoder endpoints (not OpenAI's), the
//! kind an operator declares per upstream (`[[routing.upstreams]] endpoints`). Shapes follow
//! vLLM's server:
//!
//! - rerank: `{"model", "query", "documents": [str], "top_n"?}` →
//!   `{"id": "rerank-…", "model", "usage": {"prompt_tokens", "total_tokens"}, "results":
//!   [{"index", "document": {"text"}, "relevance_score"}]}`, highest score first, at most
//!   `top_n` results (0 or absent: all);
//! - score: `{"model", "text_1": str | [str], "text_2": str | [str]}` — one `text_1` against
//!   every `text_2`, or two lists of one length paired in order →
//!   `{"id": "score-…", "object": "list", "created", "model", "data": [{"index", "object":
//!   "score", "score"}], "usage": {"prompt_tokens", "total_tokens", "completion_tokens": 0}}`.
//!
//! A score is a deterministic number in `[0, 1)` drawn from a hash of the model and the pair,
//! so the same pair always scores the same; each pair costs the words of both texts as prompt
//! tokens.

use serde_json::{Map, Value, json};

use crate::generate::{canonical_hash, count_tokens};
use crate::openai::{ApiError, Context, Generated, model};

/// The score of a (query, document) pair under `model`: in `[0, 1)`, fixed for the pair.
fn pair_score(model: &Value, query: &str, document: &str) -> f64 {
    let hash = canonical_hash(&[&json!("score"), model, &json!(query), &json!(document)]);
    let mut top = [0u8; 8];
    top.copy_from_slice(&hash[..8]);
    // 53 bits: every value exactly representable, below 1.
    (u64::from_be_bytes(top) >> 11) as f64 / (1u64 << 53) as f64
}

/// A string field, or a list of strings (not empty), as texts.
fn texts<'a>(body: &'a Map<String, Value>, key: &'static str) -> Result<Vec<&'a str>, ApiError> {
    let invalid = |message: String| ApiError::invalid(message).param(key);
    match body.get(key) {
        None | Some(Value::Null) => Err(invalid(format!("missing required parameter: {key}"))),
        Some(Value::String(text)) => Ok(vec![text]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid(format!("{key} must not be empty")))
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| invalid(format!("{key} must be a string or a list of strings")))
            })
            .collect(),
        Some(_) => Err(invalid(format!(
            "{key} must be a string or a list of strings"
        ))),
    }
}

/// `POST /v1/rerank`.
pub(crate) fn rerank(body: &Map<String, Value>, ctx: &Context<'_>) -> Result<Generated, ApiError> {
    let model = model(body)?;
    let query = match body.get("query") {
        Some(Value::String(query)) => query.as_str(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("missing required parameter: query").param("query"));
        }
        Some(_) => return Err(ApiError::invalid("query must be a string").param("query")),
    };
    if !matches!(body.get("documents"), Some(Value::Array(_))) {
        return Err(ApiError::invalid("documents must be a list of strings").param("documents"));
    }
    let documents = texts(body, "documents")?;
    let top_n = match body.get("top_n") {
        None | Some(Value::Null) => 0,
        Some(value) => value.as_u64().ok_or_else(|| {
            ApiError::invalid("top_n must be a non-negative integer").param("top_n")
        })?,
    };
    let model_value = json!(model);
    let mut results: Vec<(usize, &str, f64)> = documents
        .iter()
        .enumerate()
        .map(|(index, document)| (index, *document, pair_score(&model_value, query, document)))
        .collect();
    // Highest first; equal scores keep input order.
    results.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
    if top_n > 0 {
        results.truncate(usize::try_from(top_n).unwrap_or(usize::MAX));
    }
    let prompt_tokens: u64 = documents
        .iter()
        .map(|document| count_tokens(query) + count_tokens(document))
        .sum();
    let results: Vec<Value> = results
        .into_iter()
        .map(|(index, document, score)| {
            json!({ "index": index, "document": { "text": document }, "relevance_score": score })
        })
        .collect();
    Ok(Generated {
        body: json!({
            "id": format!("rerank-{}", ctx.request_id),
            "model": model,
            "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
            "results": results,
        }),
        completion_tokens: 0,
    })
}

/// `POST /v1/score`.
pub(crate) fn score(body: &Map<String, Value>, ctx: &Context<'_>) -> Result<Generated, ApiError> {
    let model = model(body)?;
    let left = texts(body, "text_1")?;
    let right = texts(body, "text_2")?;
    let pairs: Vec<(&str, &str)> = match (left.len(), right.len()) {
        (1, _) => right.iter().map(|r| (left[0], *r)).collect(),
        (l, r) if l == r => left.iter().copied().zip(right.iter().copied()).collect(),
        (l, r) => {
            return Err(ApiError::invalid(format!(
                "text_1 has {l} texts and text_2 {r}: give one text_1, or as many as text_2"
            ))
            .param("text_1"));
        }
    };
    let model_value = json!(model);
    let prompt_tokens: u64 = pairs
        .iter()
        .map(|(a, b)| count_tokens(a) + count_tokens(b))
        .sum();
    let data: Vec<Value> = pairs
        .iter()
        .enumerate()
        .map(|(index, (a, b))| {
            json!({ "index": index, "object": "score", "score": pair_score(&model_value, a, b) })
        })
        .collect();
    Ok(Generated {
        body: json!({
            "id": format!("score-{}", ctx.request_id),
            "object": "list",
            "created": ctx.created,
            "model": model,
            "data": data,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens,
                "completion_tokens": 0,
            },
        }),
        completion_tokens: 0,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::openai::test_support::{ctx, object};

    #[test]
    fn rerank_orders_by_score_keeps_indexes_and_counts_every_pair() {
        let body = object(json!({
            "model": "bge-reranker",
            "query": "what is a night shift",
            "documents": ["work done at night", "a shift key", "the moon", "sleep"],
        }));
        let out = rerank(&body, &ctx()).unwrap().body;
        assert_eq!(out["id"], "rerank-test");
        assert_eq!(out["model"], "bge-reranker");
        let results = out["results"].as_array().unwrap();
        assert_eq!(results.len(), 4);
        let scores: Vec<f64> = results
            .iter()
            .map(|r| r["relevance_score"].as_f64().unwrap())
            .collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert!(scores.iter().all(|s| (0.0..1.0).contains(s)));
        let mut indexes: Vec<u64> = results
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        for r in results {
            let i = r["index"].as_u64().unwrap() as usize;
            assert_eq!(r["document"]["text"], body["documents"][i]);
        }
        indexes.sort_unstable();
        assert_eq!(indexes, [0, 1, 2, 3]);
        // 5 query words against 4 + 3 + 2 + 1 document words
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 30, "total_tokens": 30})
        );
        // the same request scores the same; top_n keeps the best
        let again = rerank(&body, &ctx()).unwrap().body;
        assert_eq!(again["results"], out["results"]);
        let mut top = body.clone();
        top.insert("top_n".into(), json!(2));
        let best = rerank(&top, &ctx()).unwrap().body;
        assert_eq!(best["results"].as_array().unwrap()[..], results[..2]);
    }

    #[test]
    fn rerank_refuses_what_vllm_refuses() {
        for (body, param) in [
            (json!({"model": "m", "documents": ["d"]}), "query"),
            (json!({"model": "m", "query": "q"}), "documents"),
            (
                json!({"model": "m", "query": "q", "documents": "d"}),
                "documents",
            ),
            (
                json!({"model": "m", "query": "q", "documents": []}),
                "documents",
            ),
            (
                json!({"model": "m", "query": "q", "documents": [1]}),
                "documents",
            ),
            (
                json!({"model": "m", "query": "q", "documents": ["d"], "top_n": -1}),
                "top_n",
            ),
            (json!({"query": "q", "documents": ["d"]}), "model"),
        ] {
            let e = rerank(&object(body.clone()), &ctx()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{body}");
        }
    }

    #[test]
    fn score_pairs_one_against_many_or_in_order() {
        let one = object(json!({"model": "m", "text_1": "a b", "text_2": ["c", "d e"]}));
        let out = score(&one, &ctx()).unwrap().body;
        assert_eq!(out["object"], "list");
        assert_eq!(out["id"], "score-test");
        let data = out["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(data[1]["object"], "score");
        assert_eq!(out["usage"]["prompt_tokens"], 7);
        assert_eq!(out["usage"]["completion_tokens"], 0);
        // the pair (a b, d e) scores the same however it is asked
        let paired = object(json!({"model": "m", "text_1": ["x", "a b"], "text_2": ["c", "d e"]}));
        let out2 = score(&paired, &ctx()).unwrap().body;
        assert_eq!(out2["data"][1]["score"], data[1]["score"]);
        let bad = object(json!({"model": "m", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}));
        assert_eq!(
            score(&bad, &ctx()).unwrap_err().body()["error"]["param"],
            "text_1"
        );
        let missing = object(json!({"model": "m", "text_1": "a"}));
        assert_eq!(
            score(&missing, &ctx()).unwrap_err().body()["error"]["param"],
            "text_2"
        );
    }
}
