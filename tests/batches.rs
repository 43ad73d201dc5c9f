//! End-to-end: the Batches API's control plane (create, asynchronous validation, retrieve,
//! list, cancel) through the official OpenAI Python SDK, against the real services.

use nightshift_core::BatchId;
use nightshift_e2e::{Deployment, Stack, StackOptions};

async fn create_validate_retrieve_cancel(deployment: Deployment) {
    let opts = StackOptions::on(deployment);
    let (max_lines, max_file) = (opts.batches.max_lines, opts.batches.max_file_bytes);
    let stack = Stack::start(opts).await.expect("stack");
    let (_, key) = stack.tenant("batches").await.expect("tenant");
    stack
        .python(
            "batches_api.py",
            &[
                ("NS_API_KEY", key),
                ("NS_MAX_LINES", max_lines.to_string()),
                ("NS_MAX_FILE_BYTES", max_file.to_string()),
            ],
        )
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

async fn valid_inputs_are_cut_into_contiguous_chunks(deployment: Deployment) {
    let opts = StackOptions::on(deployment);
    let per_chunk = opts.batches.chunk_max_lines as u64;
    let stack = Stack::start(opts).await.expect("stack");
    let (tenant, key) = stack.tenant("chunks").await.expect("tenant");
    let out = stack
        .python("batches_chunks.py", &[("NS_API_KEY", key)])
        .await
        .expect("script");
    let r: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    let id = BatchId::parse(r["batch"].as_str().expect("id")).expect("batch id");
    let (lines, bytes) = (
        r["lines"].as_u64().expect("n"),
        r["bytes"].as_u64().expect("n"),
    );
    let batch = stack
        .metadata
        .batch(&id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(batch.tenant_id.to_string(), tenant);
    let chunks = stack.metadata.chunks(&id).await.expect("chunks");
    assert_eq!(chunks.len() as u64, lines.div_ceil(per_chunk));
    let mut next_line = 1;
    let mut next_byte = 0;
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c.index as usize, i);
        assert_eq!(
            (c.first_line, c.byte_start),
            (next_line, next_byte),
            "chunk {i}"
        );
        assert!(c.line_count as u64 <= per_chunk);
        next_line += c.line_count as u64;
        next_byte = c.byte_end;
    }
    assert_eq!((next_line - 1, next_byte), (lines, bytes));
    stack.stop().await.expect("stop");
}

async fn pagination_visits_every_batch_once_newest_first(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let (_, key) = stack.tenant("pages").await.expect("tenant");
    stack
        .python(
            "batches_pagination.py",
            &[("NS_API_KEY", key), ("NS_BATCHES", "250".into())],
        )
        .await
        .expect("script");
    stack.stop().await.expect("stop");
}

nightshift_e2e::for_both_deployments!(
    create_validate_retrieve_cancel,
    valid_inputs_are_cut_into_contiguous_chunks,
    pagination_visits_every_batch_once_newest_first,
);
