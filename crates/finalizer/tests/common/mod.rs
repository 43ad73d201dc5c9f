//! Shared fixtures: a store on the dev Garage under a fresh prefix, batches, result lines,
//! parts and inputs. Each test binary uses a subset.
#![allow(dead_code)]

use std::sync::Arc;

use bytes::Bytes;
use nightshift_core::batch::{BatchRecord, BatchStatus, RequestCounts, part_key};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::results::{BatchRequestId, NoResponseCode, ResponseBody, ResultLine, Usage};
use nightshift_core::{BatchId, TenantId};
use nightshift_finalizer::PlannedChunk;
use nightshift_storage::{ObjectStore, S3Config, S3Store, StorageError};
use serde_json::json;

/// The dev Garage (`NIGHTSHIFT_STORAGE__*` override it), under a prefix of this test's own.
pub fn s3_config() -> S3Config {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    S3Config {
        endpoint: Some(env("NIGHTSHIFT_STORAGE__ENDPOINT", "http://127.0.0.1:3900")),
        region: env("NIGHTSHIFT_STORAGE__REGION", "us-east-1"),
        bucket: env("NIGHTSHIFT_STORAGE__BUCKET", "nightshift"),
        access_key_id: Some(env(
            "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID",
            "GK1d224b85150aaabc7eadd95e",
        )),
        secret_access_key: Some(nightshift_core::secret::Secret::new(env(
            "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY",
            "04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5",
        ))),
        prefix: format!("test/finalizer-{}", uuid::Uuid::new_v4()),
        part_size: 5 * 1024 * 1024,
        ..S3Config::default()
    }
}

pub async fn store() -> Arc<S3Store> {
    Arc::new(S3Store::new(&s3_config()).await.expect("s3 client"))
}

/// Removes everything the test wrote.
pub async fn cleanup(store: &S3Store) {
    store.delete_prefix("").await.expect("cleanup");
}

/// A batch in `status`, with a fresh id.
pub fn batch(status: BatchStatus) -> BatchRecord {
    BatchRecord {
        id: BatchId::generate(),
        tenant_id: TenantId::generate(),
        endpoint: "/v1/chat/completions".into(),
        input_file_id: "file-input".into(),
        completion_window: "24h".into(),
        status,
        model: Some("m".into()),
        errors: Vec::new(),
        metadata: None,
        output_expires_after_secs: 3600,
        output_file_id: None,
        error_file_id: None,
        created_at_us: 1_000_000,
        in_progress_at: Some(1),
        expires_at: 86_401,
        finalizing_at: Some(2),
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        request_counts: RequestCounts::default(),
        usage: Usage::default(),
        traceparent: None,
    }
}

/// A 200 chat completion for line `line`, reporting `prompt` + `completion` tokens (and one
/// cached, one reasoning token).
pub fn ok_line(batch: &BatchId, line: u64, prompt: u64, completion: u64) -> ResultLine {
    let body = ResponseBody::from_value(&json!({
        "id": format!("chatcmpl-{line}"),
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {line}")}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 1},
            "completion_tokens_details": {"reasoning_tokens": 1},
        },
    }))
    .expect("object body");
    ResultLine::response(
        BatchRequestId::for_line(batch.as_str(), line),
        format!("req-{line}"),
        200,
        format!("upstream-{line}"),
        body,
    )
}

/// A 200 whose body carries `filler` bytes of text (for large files).
pub fn big_ok_line(batch: &BatchId, line: u64, filler: usize) -> ResultLine {
    let body = ResponseBody::from_value(&json!({
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "z".repeat(filler)}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
    }))
    .expect("object body");
    ResultLine::response(
        BatchRequestId::for_line(batch.as_str(), line),
        format!("req-{line}"),
        200,
        "upstream",
        body,
    )
}

/// An upstream error answer (`status` non-2xx) for line `line`.
pub fn http_error_line(batch: &BatchId, line: u64, status: u16) -> ResultLine {
    let body = ResponseBody::from_value(&json!({
        "error": {"message": "nope", "type": "invalid_request_error", "param": null, "code": null},
        // usage of a failed answer is never counted
        "usage": {"prompt_tokens": 1000, "completion_tokens": 1000},
    }))
    .expect("object body");
    ResultLine::response(
        BatchRequestId::for_line(batch.as_str(), line),
        format!("req-{line}"),
        status,
        "upstream",
        body,
    )
}

/// A line without an answer (timeout, unreachable, ...).
pub fn no_response_line(batch: &BatchId, line: u64, code: NoResponseCode) -> ResultLine {
    ResultLine::no_response(
        BatchRequestId::for_line(batch.as_str(), line),
        format!("req-{line}"),
        code,
        None,
    )
}

/// The JSONL of `lines`.
pub fn jsonl(lines: &[&ResultLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        line.write_json_line(&mut out);
    }
    out
}

/// Writes the result part of chunk `index`.
pub async fn put_part(store: &dyn ObjectStore, batch: &BatchId, index: u32, lines: &[ResultLine]) {
    let refs: Vec<&ResultLine> = lines.iter().collect();
    store
        .put(&part_key(batch, index), Bytes::from(jsonl(&refs)))
        .await
        .expect("put part");
}

/// The whole object at `key`, or `None` if there is none.
pub async fn read(store: &dyn ObjectStore, key: &str) -> Option<Vec<u8>> {
    match store.get(key, None).await {
        Ok(body) => Some(body.collect().await.expect("read object").to_vec()),
        Err(StorageError::NotFound(_)) => None,
        Err(e) => panic!("reading {key}: {e}"),
    }
}

/// Chunks of `sizes` lines each, numbered from line 1, with made-up byte ranges (only chunks
/// that are not done have their input read).
pub fn done_chunks(sizes: &[u32]) -> Vec<PlannedChunk> {
    let mut first_line = 1u64;
    sizes
        .iter()
        .enumerate()
        .map(|(index, &count)| {
            let span = ChunkSpan {
                index: u32::try_from(index).expect("few chunks"),
                byte_start: (first_line - 1) * 100,
                byte_end: (first_line - 1 + u64::from(count)) * 100,
                first_line,
                line_count: count,
            };
            first_line += u64::from(count);
            PlannedChunk::done(span)
        })
        .collect()
}

/// An input file of request lines with the given `custom_id`s (CRLF-terminated for every
/// third line, a trailing blank line at the end) and its chunks of `sizes` lines each.
pub fn input(custom_ids: &[&str], sizes: &[u32]) -> (Vec<u8>, Vec<ChunkSpan>) {
    assert_eq!(
        sizes.iter().map(|&s| s as usize).sum::<usize>(),
        custom_ids.len()
    );
    let mut bytes = Vec::new();
    let mut offsets = Vec::new();
    for (i, custom_id) in custom_ids.iter().enumerate() {
        offsets.push(bytes.len() as u64);
        let line = json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": format!("q{i}")}]},
        });
        bytes.extend_from_slice(line.to_string().as_bytes());
        bytes.extend_from_slice(if i % 3 == 2 { b"\r\n" } else { b"\n" });
    }
    offsets.push(bytes.len() as u64);
    bytes.extend_from_slice(b"\n");

    let mut spans = Vec::new();
    let mut first = 0usize;
    for (index, &count) in sizes.iter().enumerate() {
        let last = first + count as usize;
        spans.push(ChunkSpan {
            index: u32::try_from(index).expect("few chunks"),
            byte_start: offsets[first],
            byte_end: offsets[last],
            first_line: first as u64 + 1,
            line_count: count,
        });
        first = last;
    }
    (bytes, spans)
}

/// The usage `ok_line(_, _, prompt, completion)` lines add up to.
pub fn usage_of(pairs: &[(u64, u64)]) -> Usage {
    let mut usage = Usage::default();
    for &(prompt, completion) in pairs {
        usage.input_tokens += prompt;
        usage.output_tokens += completion;
        usage.total_tokens += prompt + completion;
        usage.input_tokens_details.cached_tokens += 1;
        usage.output_tokens_details.reasoning_tokens += 1;
    }
    usage
}
