//! `finalize` against the dev Garage (`make up`): which line lands in which file, in which
//! order, what is counted, what is never created, and what fails.

mod common;

use bytes::Bytes;
use common::*;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus, ResultFile, part_key};
use nightshift_core::file::FileRecord;
use nightshift_core::results::{NoResponseCode, ResultLine, ResultLineSummary, Usage};
use nightshift_finalizer::{
    AssembleSettings, BatchFiles, Ending, FinalizeError, FinalizePlan, PlannedChunk, finalize,
};
use nightshift_storage::{ObjectStore, S3Store};

fn key(file: ResultFile, batch: &BatchId) -> String {
    FileRecord::storage_key_for(&file.file_id(batch))
}

/// The plan of `batch` (whose `request_counts.total` is set from the chunks).
fn plan(batch: &BatchRecord, chunks: Vec<PlannedChunk>, ending: Ending) -> FinalizePlan {
    let mut batch = batch.clone();
    batch.request_counts.total = chunks.iter().map(|c| u64::from(c.span.line_count)).sum();
    FinalizePlan::new(batch, "files/file-input".into(), chunks, ending).expect("plan")
}

async fn run(store: &S3Store, plan: &FinalizePlan) -> Result<BatchFiles, FinalizeError> {
    finalize(plan, store, AssembleSettings::default()).await
}

/// Both stored files of `batch`: `(output, error)`.
async fn files(store: &S3Store, batch: &BatchId) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    (
        read(store, &key(ResultFile::Output, batch)).await,
        read(store, &key(ResultFile::Error, batch)).await,
    )
}

#[tokio::test]
async fn mixed_parts_are_sorted_into_both_files_in_chunk_order() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    let parts = [
        vec![
            ok_line(id, 1, 10, 5),
            http_error_line(id, 2, 400),
            ok_line(id, 3, 20, 7),
        ],
        vec![
            no_response_line(id, 4, NoResponseCode::RequestTimeout),
            ok_line(id, 5, 3, 0),
        ],
        vec![
            ok_line(id, 6, 1, 2),
            ok_line(id, 7, 4, 4),
            http_error_line(id, 8, 500),
            no_response_line(id, 9, NoResponseCode::UpstreamUnreachable),
        ],
    ];
    // Written out of order: the files follow chunk order, not write order.
    for index in [2usize, 0, 1] {
        put_part(store.as_ref(), id, index as u32, &parts[index]).await;
    }

    let got = run(
        &store,
        &plan(&b, done_chunks(&[3, 2, 4]), Ending::Completed),
    )
    .await
    .expect("finalize");

    let all: Vec<&ResultLine> = parts.iter().flatten().collect();
    let successes: Vec<&ResultLine> = all.iter().copied().filter(|l| l.is_success()).collect();
    let failures: Vec<&ResultLine> = all.iter().copied().filter(|l| !l.is_success()).collect();
    let (output, error) = files(&store, id).await;
    assert_eq!(output.as_deref(), Some(&jsonl(&successes)[..]));
    assert_eq!(error.as_deref(), Some(&jsonl(&failures)[..]));

    let expected_usage = usage_of(&[(10, 5), (20, 7), (3, 0), (1, 2), (4, 4)]);
    assert_eq!((got.completed, got.failed), (5, 4));
    assert_eq!(got.usage, expected_usage);
    let out = got.output.expect("output file");
    assert_eq!(out.id, ResultFile::Output.file_id(id));
    assert_eq!((out.lines, out.bytes), (5, jsonl(&successes).len() as u64));
    let err = got.error.expect("error file");
    assert_eq!(err.id, ResultFile::Error.file_id(id));
    assert_eq!((err.lines, err.bytes), (4, jsonl(&failures).len() as u64));

    // The numbers are the parts' own: recounting the files gives the same.
    let mut recount = Usage::default();
    for line in output.expect("output").split_inclusive(|&b| b == b'\n') {
        recount.merge(&ResultLineSummary::parse(line).expect("result line").usage);
    }
    assert_eq!(recount, expected_usage);
    cleanup(&store).await;
}

#[tokio::test]
async fn an_all_failed_batch_has_no_output_file() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    put_part(
        store.as_ref(),
        id,
        0,
        &[
            http_error_line(id, 1, 429),
            no_response_line(id, 2, NoResponseCode::RequestTimeout),
        ],
    )
    .await;
    put_part(store.as_ref(), id, 1, &[http_error_line(id, 3, 404)]).await;

    let got = run(&store, &plan(&b, done_chunks(&[2, 1]), Ending::Completed))
        .await
        .expect("finalize");
    assert_eq!(got.output, None);
    assert_eq!((got.completed, got.failed), (0, 3));
    assert_eq!(got.usage, Usage::default());
    assert_eq!(got.error.as_ref().map(|f| f.lines), Some(3));
    let (output, error) = files(&store, id).await;
    assert_eq!(output, None, "no output object is created");
    assert!(error.is_some());
    cleanup(&store).await;
}

#[tokio::test]
async fn a_batch_without_failures_has_no_error_file() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    put_part(
        store.as_ref(),
        id,
        0,
        &[ok_line(id, 1, 1, 1), ok_line(id, 2, 2, 2)],
    )
    .await;

    let got = run(&store, &plan(&b, done_chunks(&[2]), Ending::Completed))
        .await
        .expect("finalize");
    assert_eq!(got.error, None);
    assert_eq!((got.completed, got.failed), (2, 0));
    assert_eq!(got.usage, usage_of(&[(1, 1), (2, 2)]));
    let (output, error) = files(&store, id).await;
    assert!(output.is_some());
    assert_eq!(error, None, "no error object is created");
    cleanup(&store).await;
}

#[tokio::test]
async fn chunks_that_never_ran_become_cancelled_or_expired_lines() {
    let store = store().await;
    let custom_ids = [
        "a-1",
        "b-2",
        "quote \" and \\ backslash",
        "caf\u{e9} \u{1f600}",
        "e-5",
        "f-6",
    ];
    let (input, spans) = input(&custom_ids, &[2, 3, 1]);
    store
        .put("files/file-input", Bytes::from(input))
        .await
        .expect("put input");

    for (ending, code) in [
        (Ending::Cancelled, NoResponseCode::BatchCancelled),
        (Ending::Expired, NoResponseCode::BatchExpired),
    ] {
        let b = batch(BatchStatus::Cancelling);
        let id = &b.id;
        // Chunk 0 ran; chunks 1 and 2 never did.
        let ran = [ok_line(id, 1, 5, 5), http_error_line(id, 2, 400)];
        put_part(store.as_ref(), id, 0, &ran).await;
        let chunks = spans
            .iter()
            .map(|&span| PlannedChunk {
                span,
                done: span.index == 0,
            })
            .collect();

        let got = run(&store, &plan(&b, chunks, ending))
            .await
            .expect("finalize");
        assert_eq!((got.completed, got.failed), (1, 5), "{ending}");
        assert_eq!(got.usage, usage_of(&[(5, 5)]));

        let never_ran: Vec<ResultLine> = (3..=6)
            .map(|line| {
                ResultLine::no_response(
                    nightshift_core::results::BatchRequestId::for_line(id.as_str(), line),
                    custom_ids[line as usize - 1],
                    code,
                    None,
                )
            })
            .collect();
        let mut expected_errors = vec![&ran[1]];
        expected_errors.extend(never_ran.iter());
        let (output, error) = files(&store, id).await;
        assert_eq!(output.as_deref(), Some(&jsonl(&[&ran[0]])[..]));
        let error = error.expect("error file");
        assert_eq!(
            String::from_utf8(error.clone()).expect("utf-8"),
            String::from_utf8(jsonl(&expected_errors)).expect("utf-8"),
            "{ending}"
        );
        for line in error.split_inclusive(|&b| b == b'\n').skip(1) {
            let value: serde_json::Value = serde_json::from_slice(line).expect("json");
            assert_eq!(value["response"], serde_json::Value::Null);
            assert_eq!(value["error"]["code"], code.as_str());
        }
    }
    cleanup(&store).await;
}

#[tokio::test]
async fn a_missing_part_fails_and_leaves_nothing_visible() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    put_part(
        store.as_ref(),
        id,
        0,
        &[ok_line(id, 1, 1, 1), http_error_line(id, 2, 400)],
    )
    .await;
    put_part(store.as_ref(), id, 2, &[ok_line(id, 4, 1, 1)]).await;

    let e = run(
        &store,
        &plan(&b, done_chunks(&[2, 1, 1]), Ending::Completed),
    )
    .await
    .expect_err("chunk 1 has no part");
    match e {
        FinalizeError::MissingPart { chunk, key } => {
            assert_eq!(chunk, 1);
            assert_eq!(key, part_key(id, 1));
        }
        other => panic!("expected MissingPart, got {other}"),
    }
    assert_eq!(files(&store, id).await, (None, None));
    cleanup(&store).await;
}

#[tokio::test]
async fn a_part_with_a_wrong_line_count_or_a_corrupt_line_fails() {
    let store = store().await;

    // One line short.
    let b = batch(BatchStatus::Finalizing);
    put_part(store.as_ref(), &b.id, 0, &[ok_line(&b.id, 1, 1, 1)]).await;
    let e = run(&store, &plan(&b, done_chunks(&[2]), Ending::Completed))
        .await
        .expect_err("short part");
    assert!(
        matches!(
            e,
            FinalizeError::LineCount {
                chunk: 0,
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{e}"
    );

    // Not a result line.
    let b = batch(BatchStatus::Finalizing);
    let mut part = jsonl(&[&ok_line(&b.id, 1, 1, 1)]);
    part.extend_from_slice(b"{\"custom_id\": \"x\"}\n");
    store
        .put(&part_key(&b.id, 0), Bytes::from(part))
        .await
        .expect("put");
    let e = run(&store, &plan(&b, done_chunks(&[2]), Ending::Completed))
        .await
        .expect_err("corrupt part");
    assert!(
        matches!(
            e,
            FinalizeError::CorruptPart {
                chunk: 0,
                line: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(files(&store, &b.id).await, (None, None));

    // A line over the limit.
    let b = batch(BatchStatus::Finalizing);
    put_part(store.as_ref(), &b.id, 0, &[big_ok_line(&b.id, 1, 1000)]).await;
    let e = finalize(
        &plan(&b, done_chunks(&[1]), Ending::Completed),
        store.as_ref(),
        AssembleSettings {
            max_line_bytes: 500,
        },
    )
    .await
    .expect_err("line too long");
    assert!(
        matches!(e, FinalizeError::LineTooLong { chunk: 0, .. }),
        "{e}"
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn a_multi_part_output_is_byte_exact() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    // 3 chunks × 70 lines × ~60 KiB ≈ 12 MiB of output: three 5 MiB multipart parts.
    let mut expected = Vec::new();
    let mut line = 1u64;
    for index in 0..3u32 {
        let lines: Vec<ResultLine> = (0..70)
            .map(|_| {
                let l = big_ok_line(id, line, 60 * 1024 + (line as usize % 7));
                line += 1;
                l
            })
            .collect();
        for l in &lines {
            l.write_json_line(&mut expected);
        }
        put_part(store.as_ref(), id, index, &lines).await;
    }
    assert!(expected.len() > 2 * 5 * 1024 * 1024);

    let got = run(
        &store,
        &plan(&b, done_chunks(&[70, 70, 70]), Ending::Completed),
    )
    .await
    .expect("finalize");
    assert_eq!(got.completed, 210);
    assert_eq!(got.usage.total_tokens, 210 * 5);
    assert_eq!(
        got.output.as_ref().map(|f| f.bytes),
        Some(expected.len() as u64)
    );
    let output = read(store.as_ref(), &key(ResultFile::Output, id))
        .await
        .expect("output");
    assert!(output == expected, "the output differs from the parts");
    cleanup(&store).await;
}

#[tokio::test]
async fn assembling_twice_writes_identical_objects() {
    let store = store().await;
    let custom_ids = ["a", "b", "c", "d"];
    let (input, spans) = input(&custom_ids, &[2, 2]);
    store
        .put("files/file-input", Bytes::from(input))
        .await
        .expect("put input");
    let b = batch(BatchStatus::Cancelling);
    let id = &b.id;
    put_part(
        store.as_ref(),
        id,
        0,
        &[ok_line(id, 1, 3, 4), http_error_line(id, 2, 400)],
    )
    .await;
    let chunks: Vec<PlannedChunk> = spans
        .iter()
        .map(|&span| PlannedChunk {
            span,
            done: span.index == 0,
        })
        .collect();
    let plan = plan(&b, chunks, Ending::Cancelled);

    let first = run(&store, &plan).await.expect("first run");
    let first_files = files(&store, id).await;
    let second = run(&store, &plan).await.expect("second run");
    let second_files = files(&store, id).await;
    assert_eq!(first, second);
    assert_eq!(first_files, second_files);
    assert!(first_files.0.is_some() && first_files.1.is_some());
    // Nothing else was written besides the parts, the input and the two files.
    let mut keys: Vec<String> = store
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    let mut expected = vec![
        part_key(id, 0),
        "files/file-input".to_owned(),
        key(ResultFile::Output, id),
        key(ResultFile::Error, id),
    ];
    expected.sort();
    assert_eq!(keys, expected);
    cleanup(&store).await;
}
