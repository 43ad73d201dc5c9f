//! `finalize` against the dev Garage (`make up`): which line lands in which file, in which
//! order, what is counted, what is never created, and what fails.

mod common;

use bytes::Bytes;
use common::*;
use nightshift_core::BatchId;
use nightshift_core::batch::{BatchRecord, BatchStatus, PartTally, ResultFile, part_key};
use nightshift_core::file::FileRecord;
use nightshift_core::results::{
    BatchRequestId, NoResponseCode, ResultLine, ResultLineSummary, Usage,
};
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
            .map(|&span| {
                if span.index == 0 {
                    PlannedChunk::done(span)
                } else {
                    PlannedChunk::unfinished(span)
                }
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
                    BatchRequestId::for_line(id.as_str(), line),
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
        .map(|&span| {
            if span.index == 0 {
                PlannedChunk::done(span)
            } else {
                PlannedChunk::unfinished(span)
            }
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

/// Writes the input of `custom_ids` (chunks of `sizes` lines) and returns its chunk spans.
async fn put_input(
    store: &S3Store,
    custom_ids: &[&str],
    sizes: &[u32],
) -> Vec<nightshift_core::chunking::ChunkSpan> {
    let (bytes, spans) = input(custom_ids, sizes);
    store
        .put("files/file-input", Bytes::from(bytes))
        .await
        .expect("put input");
    spans
}

/// The error line a request without a result gets.
fn missing(
    batch: &BatchId,
    line: u64,
    custom_id: &str,
    code: NoResponseCode,
    message: Option<&str>,
) -> ResultLine {
    ResultLine::no_response(
        BatchRequestId::for_line(batch.as_str(), line),
        custom_id,
        code,
        message.map(str::to_owned),
    )
}

/// `custom_id`s of both files, sorted: each request must appear exactly once.
fn custom_ids_of(files: &(Option<Vec<u8>>, Option<Vec<u8>>)) -> Vec<String> {
    let mut ids: Vec<String> = [&files.0, &files.1]
        .into_iter()
        .flatten()
        .flat_map(|file| file.split_inclusive(|&b| b == b'\n'))
        .map(|line| {
            ResultLineSummary::parse(line)
                .expect("result line")
                .custom_id
        })
        .collect();
    ids.sort();
    ids
}

/// The output and error files of `lines` (every request's line, in line order).
fn expected_files(lines: &[ResultLine]) -> (Vec<u8>, Vec<u8>) {
    let successes: Vec<&ResultLine> = lines.iter().filter(|l| l.is_success()).collect();
    let failures: Vec<&ResultLine> = lines.iter().filter(|l| !l.is_success()).collect();
    (jsonl(&successes), jsonl(&failures))
}

#[tokio::test]
async fn partial_parts_are_merged_with_lines_for_the_requests_they_lack() {
    let store = store().await;
    // As the part lines of `ok_line` & co. name them.
    let custom_ids = [
        "req-1", "req-2", "req-3", "req-4", "req-5", "req-6", "req-7", "req-8", "req-9", "req-10",
    ];
    let spans = put_input(&store, &custom_ids, &[2, 4, 2, 2]).await;

    // (ending, chunk 1 given up?) and the code its lines without a result get.
    let given_up = "the chunk was given up after 4 attempts (its executors stopped reporting)";
    for (ending, failure, code) in [
        (Ending::Cancelled, None, NoResponseCode::BatchCancelled),
        (Ending::Expired, None, NoResponseCode::BatchExpired),
        (
            Ending::Cancelled,
            Some(given_up),
            NoResponseCode::ChunkFailed,
        ),
        (
            Ending::Completed,
            Some(given_up),
            NoResponseCode::ChunkFailed,
        ),
    ] {
        let b = batch(BatchStatus::Cancelling);
        let id = &b.id;
        // Chunk 0 (lines 1-2) done. Chunk 1 (lines 3-6): a part with lines 4 and 6 (its first
        // and a middle line lack a result). Chunk 2 (lines 7-8): no part at all. Chunk 3
        // (lines 9-10): a part with line 9 (its last line lacks a result).
        let done = [ok_line(id, 1, 1, 1), http_error_line(id, 2, 400)];
        let part1 = [ok_line(id, 4, 4, 4), http_error_line(id, 6, 500)];
        let part3 = [no_response_line(id, 9, NoResponseCode::RequestTimeout)];
        put_part(store.as_ref(), id, 0, &done).await;
        put_part(store.as_ref(), id, 1, &part1).await;
        put_part(store.as_ref(), id, 3, &part3).await;
        let chunks: Vec<PlannedChunk> = spans
            .iter()
            .map(|&span| match (span.index, failure) {
                (0, _) => PlannedChunk::done(span),
                (_, Some(failure)) => PlannedChunk::failed(span, failure),
                (_, None) => PlannedChunk::unfinished(span),
            })
            .collect();

        let got = run(&store, &plan(&b, chunks, ending))
            .await
            .expect("finalize");

        let lacking = |line: u64| missing(id, line, custom_ids[line as usize - 1], code, failure);
        // Every request, in line order, with its part line where there is one.
        let all = [
            done[0].clone(),
            done[1].clone(),
            lacking(3),
            part1[0].clone(),
            lacking(5),
            part1[1].clone(),
            lacking(7),
            lacking(8),
            part3[0].clone(),
            lacking(10),
        ];
        let (output, error) = expected_files(&all);
        let stored = files(&store, id).await;
        assert_eq!(stored.0.as_deref(), Some(&output[..]), "{ending}");
        assert_eq!(
            String::from_utf8(stored.1.clone().expect("error file")).expect("utf-8"),
            String::from_utf8(error).expect("utf-8"),
            "{ending} {failure:?}"
        );
        assert_eq!((got.completed, got.failed), (2, 8), "{ending}");
        assert_eq!(got.usage, usage_of(&[(1, 1), (4, 4)]));
        let mut expected_ids: Vec<String> = custom_ids.iter().map(|&c| c.to_owned()).collect();
        expected_ids.sort();
        assert_eq!(custom_ids_of(&stored), expected_ids, "exactly once each");
        for line in stored
            .1
            .expect("error file")
            .split_inclusive(|&b| b == b'\n')
        {
            let value: serde_json::Value = serde_json::from_slice(line).expect("json");
            if value["error"]["code"] == code.as_str() {
                let message = failure.unwrap_or(code.default_message());
                assert_eq!(value["error"]["message"], message);
            }
        }
    }
    cleanup(&store).await;
}

#[tokio::test]
async fn a_completed_batch_may_hold_a_failed_chunk_but_not_an_unfinished_one() {
    let store = store().await;
    let custom_ids = ["req-1", "req-2", "req-3", "req-4", "req-5"];
    let spans = put_input(&store, &custom_ids, &[2, 3]).await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    let done = [ok_line(id, 1, 2, 3), ok_line(id, 2, 5, 7)];
    put_part(store.as_ref(), id, 0, &done).await;
    put_part(store.as_ref(), id, 1, &[ok_line(id, 4, 1, 1)]).await;
    let failure = "the input of this chunk cannot be read: bytes 10..20 hold 2 requests, not 3";

    let got = run(
        &store,
        &plan(
            &b,
            vec![
                PlannedChunk::done(spans[0]),
                PlannedChunk::failed(spans[1], failure),
            ],
            Ending::Completed,
        ),
    )
    .await
    .expect("finalize");
    assert_eq!((got.completed, got.failed), (3, 2));
    assert_eq!(got.usage, usage_of(&[(2, 3), (5, 7), (1, 1)]));
    let failed = |line: u64| {
        missing(
            id,
            line,
            custom_ids[line as usize - 1],
            NoResponseCode::ChunkFailed,
            Some(failure),
        )
    };
    let (output, error) = expected_files(&[
        done[0].clone(),
        done[1].clone(),
        failed(3),
        ok_line(id, 4, 1, 1),
        failed(5),
    ]);
    assert_eq!(files(&store, id).await, (Some(output), Some(error)));

    // Neither done nor failed: a completed batch cannot have it.
    let mut batch = b.clone();
    batch.request_counts.total = 5;
    let e = FinalizePlan::new(
        batch,
        "files/file-input".into(),
        vec![
            PlannedChunk::done(spans[0]),
            PlannedChunk::unfinished(spans[1]),
        ],
        Ending::Completed,
    )
    .expect_err("an unfinished chunk in a completed batch");
    assert_eq!(
        e,
        nightshift_finalizer::PlanError::NotDoneChunk { index: 1 }
    );
    cleanup(&store).await;
}

#[tokio::test]
async fn an_unfinished_chunk_with_a_complete_part_keeps_every_line() {
    let store = store().await;
    let custom_ids = ["req-1", "req-2", "req-3"];
    let spans = put_input(&store, &custom_ids, &[3]).await;
    let b = batch(BatchStatus::Cancelling);
    let id = &b.id;
    // The run finished, but its report did not arrive before the batch ended.
    let part = [
        ok_line(id, 1, 1, 2),
        http_error_line(id, 2, 404),
        ok_line(id, 3, 3, 4),
    ];
    put_part(store.as_ref(), id, 0, &part).await;
    let got = run(
        &store,
        &plan(
            &b,
            vec![PlannedChunk::unfinished(spans[0])],
            Ending::Expired,
        ),
    )
    .await
    .expect("finalize");
    assert_eq!((got.completed, got.failed), (2, 1));
    let (output, error) = expected_files(&part);
    assert_eq!(files(&store, id).await, (Some(output), Some(error)));
    cleanup(&store).await;
}

#[tokio::test]
async fn a_partial_part_that_does_not_match_its_requests_fails_and_leaves_nothing_visible() {
    let store = store().await;
    let custom_ids = ["req-1", "req-2", "req-3", "req-4"];
    let spans = put_input(&store, &custom_ids, &[4]).await;
    let b = batch(BatchStatus::Cancelling);
    let id = &b.id;
    let other = BatchId::generate();
    let renamed = {
        let mut line = ok_line(id, 2, 1, 1);
        line.custom_id = "not-req-2".into();
        line
    };
    let cases: [(&str, Vec<ResultLine>, u64); 4] = [
        // Lines 3 then 2: out of line order (line 2 then matches nothing after line 3).
        (
            "out of order",
            vec![ok_line(id, 3, 1, 1), ok_line(id, 2, 1, 1)],
            2,
        ),
        (
            "a duplicate",
            vec![ok_line(id, 2, 1, 1), ok_line(id, 2, 1, 1)],
            2,
        ),
        ("another batch's line", vec![ok_line(&other, 1, 1, 1)], 1),
        ("another custom_id", vec![renamed], 1),
    ];
    for (what, part, bad_line) in cases {
        put_part(store.as_ref(), id, 0, &part).await;
        let e = run(
            &store,
            &plan(
                &b,
                vec![PlannedChunk::unfinished(spans[0])],
                Ending::Cancelled,
            ),
        )
        .await
        .expect_err(what);
        match e {
            FinalizeError::CorruptPart { chunk, line, .. } => {
                assert_eq!((chunk, line), (0, bad_line), "{what}: {e}");
            }
            other => panic!("{what}: expected CorruptPart, got {other}"),
        }
        assert_eq!(files(&store, id).await, (None, None), "{what}");
    }
    cleanup(&store).await;
}

#[tokio::test]
async fn result_lines_as_long_as_the_largest_upstream_answer_are_assembled() {
    let store = store().await;
    let max_response_bytes = nightshift_core::routing::defaults::max_response_bytes();
    let custom_ids = ["req-1", "req-2", "req-3"];
    let spans = put_input(&store, &custom_ids, &[1, 2]).await;
    let b = batch(BatchStatus::Cancelling);
    let id = &b.id;
    // A body of max_response_bytes, in a done chunk and in a chunk that ran in part.
    let filler = max_response_bytes - 200;
    let first = big_ok_line(id, 1, filler);
    let second = big_ok_line(id, 2, filler);
    assert!(first.to_json_line().len() > max_response_bytes);
    put_part(store.as_ref(), id, 0, std::slice::from_ref(&first)).await;
    put_part(store.as_ref(), id, 1, std::slice::from_ref(&second)).await;

    let got = run(
        &store,
        &plan(
            &b,
            vec![
                PlannedChunk::done(spans[0]),
                PlannedChunk::unfinished(spans[1]),
            ],
            Ending::Cancelled,
        ),
    )
    .await
    .expect("finalize with the default max_line_bytes");
    assert_eq!((got.completed, got.failed), (2, 1));
    let (output, _) = files(&store, id).await;
    assert!(output.expect("output") == jsonl(&[&first, &second]));
    cleanup(&store).await;
}

/// The tally an executor reports for the part `lines`: its bytes' size and CRC-32, and the
/// counts of its lines, with `usage` (what the executor counted).
fn tally_of(lines: &[ResultLine], usage: Usage) -> PartTally {
    let refs: Vec<&ResultLine> = lines.iter().collect();
    let bytes = jsonl(&refs);
    let completed = lines.iter().filter(|l| l.is_success()).count() as u64;
    PartTally {
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        completed,
        failed: lines.len() as u64 - completed,
        usage,
    }
}

/// Done chunks of `sizes` lines, each with its tally (`None`: unknown).
fn tallied_chunks(sizes: &[u32], tallies: Vec<Option<PartTally>>) -> Vec<PlannedChunk> {
    done_chunks(sizes)
        .into_iter()
        .zip(tallies)
        .map(|(chunk, tally)| match tally {
            Some(tally) => PlannedChunk::done_with(chunk.span, tally),
            None => chunk,
        })
        .collect()
}

#[tokio::test]
async fn parts_whose_tally_has_no_failure_are_copied_and_counted_by_their_tally() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    // Chunk 0: all successes, big lines (the copy crosses write-buffer and multipart part
    // boundaries). Chunk 1: a failure, so read line by line. Chunk 2: all successes, no tally.
    let mut line = 0u64;
    let mut next = || {
        line += 1;
        line
    };
    let copied: Vec<ResultLine> = (0..40)
        .map(|_| big_ok_line(id, next(), 150 * 1024))
        .collect();
    let mixed = vec![ok_line(id, next(), 3, 4), http_error_line(id, next(), 500)];
    let untallied = vec![ok_line(id, next(), 5, 6)];
    for (index, lines) in [&copied, &mixed, &untallied].into_iter().enumerate() {
        put_part(store.as_ref(), id, index as u32, lines).await;
    }
    // The usage the executor counted for chunk 0: unlike its lines' own (5 tokens each), so
    // the result shows which one was used.
    let counted = usage_of(&[(1000, 1)]);
    let chunks = tallied_chunks(
        &[40, 2, 1],
        vec![
            Some(tally_of(&copied, counted)),
            Some(tally_of(&mixed, usage_of(&[(3, 4)]))),
            None,
        ],
    );

    let got = run(&store, &plan(&b, chunks, Ending::Completed))
        .await
        .expect("finalize");
    let all: Vec<&ResultLine> = copied.iter().chain(&mixed).chain(&untallied).collect();
    let (successes, failures): (Vec<&ResultLine>, Vec<&ResultLine>) =
        all.iter().partition(|l| l.is_success());
    let (output, error) = files(&store, id).await;
    let output = output.expect("output");
    assert!(
        output == jsonl(&successes),
        "the output differs from the parts"
    );
    assert_eq!(error.as_deref(), Some(&jsonl(&failures)[..]));
    assert_eq!((got.completed, got.failed), (42, 1));
    assert_eq!(got.output.as_ref().map(|f| f.lines), Some(42));
    let mut usage = counted;
    usage.merge(&usage_of(&[(3, 4), (5, 6)]));
    assert_eq!(got.usage, usage, "chunk 0 counted by its tally");
    cleanup(&store).await;
}

#[tokio::test]
async fn a_part_rewritten_after_its_tally_is_assembled_again_line_by_line() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    // The run whose report made chunk 1 done wrote all successes; another run of the chunk
    // rewrote the part since, with an error. Chunk 0 is copied first, then chunk 1 found out.
    let first = vec![ok_line(id, 1, 1, 1), ok_line(id, 2, 1, 1)];
    let reported = vec![ok_line(id, 3, 2, 2), ok_line(id, 4, 2, 2)];
    let rewritten = vec![ok_line(id, 3, 2, 2), http_error_line(id, 4, 503)];
    put_part(store.as_ref(), id, 0, &first).await;
    put_part(store.as_ref(), id, 1, &rewritten).await;
    let chunks = tallied_chunks(
        &[2, 2],
        vec![
            Some(tally_of(&first, usage_of(&[(1, 1), (1, 1)]))),
            Some(tally_of(&reported, usage_of(&[(2, 2), (2, 2)]))),
        ],
    );

    let got = run(&store, &plan(&b, chunks, Ending::Completed))
        .await
        .expect("finalize");
    let (output, error) = files(&store, id).await;
    assert_eq!(
        output.as_deref(),
        Some(&jsonl(&[&first[0], &first[1], &rewritten[0]])[..])
    );
    assert_eq!(error.as_deref(), Some(&jsonl(&[&rewritten[1]])[..]));
    assert_eq!((got.completed, got.failed), (3, 1));
    assert_eq!(got.usage, usage_of(&[(1, 1), (1, 1), (2, 2)]));
    cleanup(&store).await;
}

#[tokio::test]
async fn a_tallied_part_without_a_line_per_request_fails_and_leaves_nothing_visible() {
    let store = store().await;
    let b = batch(BatchStatus::Finalizing);
    let id = &b.id;
    let lines = vec![ok_line(id, 1, 1, 1), ok_line(id, 2, 1, 1)];
    put_part(store.as_ref(), id, 0, &lines).await;
    // The part and its tally agree, but the chunk has three requests.
    let chunks = tallied_chunks(&[3], vec![Some(tally_of(&lines, Usage::default()))]);
    let e = run(&store, &plan(&b, chunks, Ending::Completed))
        .await
        .expect_err("a line short");
    assert!(
        matches!(
            e,
            FinalizeError::LineCount {
                chunk: 0,
                expected: 3,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(files(&store, id).await, (None, None));
    cleanup(&store).await;
}
