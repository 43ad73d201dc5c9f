//! `run_chunk` against real storage (the dev Garage, a unique prefix per test), the in-memory
//! live state and the inference simulator in-process. Failures are scripted per request with
//! the simulator's `sim` directive; what reached the simulator is read from its stats. No
//! sleeps: server-side progress is awaited through `/sim/wait`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{
    HUGE, Input, Sim, batch_id, chat_line, cleanup, put_lines, raw_lines, read_lines, start_sim,
    storage,
};
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::results::{BatchRequestId, NoResponseCode, ResponseBody, ResultLine, Usage};
use nightshift_executor::runner::{ChunkDeps, ChunkError, ChunkOutcome, RunnerSettings, run_chunk};
use nightshift_proto::v1::ChunkTask;
use nightshift_state::{LiveState, MemoryState};
use nightshift_storage::{ObjectStore, S3Store};
use serde_json::{Value, json};

const INPUT_KEY: &str = "files/file-input";

struct Fixture {
    sim: Sim,
    store: Arc<S3Store>,
    state: Arc<MemoryState>,
    deps: ChunkDeps,
}

async fn fixture(max_attempts: u32) -> Fixture {
    let sim = start_sim().await;
    let store = Arc::new(storage().await);
    let state = Arc::new(MemoryState::new());
    let deps = ChunkDeps {
        storage: store.clone(),
        state: state.clone(),
        upstreams: sim.upstreams(&["sim-chat"], max_attempts),
        settings: RunnerSettings {
            cancel_poll: Duration::from_millis(20),
            record_interval: Duration::from_millis(20),
            ..RunnerSettings::default()
        },
    };
    Fixture {
        sim,
        store,
        state,
        deps,
    }
}

impl Fixture {
    async fn put_input(&self, input: &Input) {
        self.store
            .put(INPUT_KEY, input.bytes.clone())
            .await
            .expect("put input");
    }

    async fn part(&self, task: &ChunkTask) -> Vec<Value> {
        read_lines(self.store.as_ref(), &key_of(task)).await
    }

    /// The part's lines, as bytes without their `\n`.
    async fn raw_part(&self, task: &ChunkTask) -> Vec<Bytes> {
        raw_lines(self.store.as_ref(), &key_of(task)).await
    }
}

fn key_of(task: &ChunkTask) -> String {
    part_key(&BatchId::parse(&task.batch_id).unwrap(), task.chunk_index)
}

/// `n` plain chat lines, custom ids `{prefix}-1`...
fn plain_lines(prefix: &str, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| {
            chat_line(
                &format!("{prefix}-{i}"),
                &format!("{prefix} line {i}"),
                Value::Null,
            )
        })
        .collect()
}

/// The usage the part's successful lines report, summed as the finalizer will.
fn part_usage(lines: &[Value]) -> Usage {
    let mut usage = Usage::default();
    for line in lines {
        if line["response"]["status_code"]
            .as_u64()
            .is_some_and(|s| (200..300).contains(&s))
        {
            usage.add_response(&line["response"]["body"]);
        }
    }
    usage
}

fn error_codes(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .map(|line| line["error"]["code"].as_str().unwrap_or("-"))
        .collect()
}

#[tokio::test]
async fn a_chunk_in_the_middle_of_a_file_yields_exactly_its_lines() {
    let f = fixture(3).await;
    // Lines 4..=8 of 10 are the chunk; one of its lines ends in \r\n, and a blank line
    // inside the range is skipped.
    let mut lines = plain_lines("c", 10);
    lines.insert(6, "   ".into());
    let input = Input::new(&lines, &[4]);
    f.put_input(&input).await;
    let batch = batch_id();
    let mut task = input.task(&batch, INPUT_KEY, 4, 9);
    task.line_count = 5;

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    let numbers = [4u64, 5, 6, 8, 9];
    assert_eq!(part.len(), 5);
    for (line, number) in part.iter().zip(numbers) {
        // Line 7 is the blank one; line n > 7 holds the request c-(n-1).
        let request = if number < 7 { number } else { number - 1 };
        assert_eq!(
            line["id"],
            BatchRequestId::for_line(&batch, number).as_str(),
            "{line}"
        );
        assert_eq!(line["custom_id"], format!("c-{request}"));
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["error"], Value::Null);
        assert!(line["response"]["request_id"].as_str().is_some());
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
    }
    let usage = part_usage(&part);
    assert!(usage.input_tokens > 0 && usage.output_tokens > 0);
    assert_eq!(
        outcome,
        ChunkOutcome {
            part_key: part_key(&BatchId::parse(&batch).unwrap(), 2),
            part_bytes: outcome.part_bytes,
            part_crc32: outcome.part_crc32,
            complete: true,
            kept: 0,
            succeeded: 5,
            failed: 0,
            cancelled: 0,
            expired: 0,
            usage,
        }
    );
    // The tally the DONE report carries describes the part's exact bytes.
    let mut written = Vec::new();
    for line in f.raw_part(&task).await {
        written.extend_from_slice(&line);
        written.push(b'\n');
    }
    assert_eq!(outcome.part_bytes, written.len() as u64);
    assert_eq!(outcome.part_crc32, Some(crc32fast::hash(&written)));
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (5, 0));
    assert_eq!(live.usage, usage);
    assert_eq!(f.sim.stats().await.requests.chat_completions, 5);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn mixed_outcomes_land_in_their_lines() {
    let f = fixture(3).await;
    let lines = vec![
        chat_line("ok", "fine", Value::Null),
        chat_line("bad-request", "refused", json!({"status": 400})),
        chat_line("flaky", "retried", json!({"fail_times": 1, "status": 503})),
        chat_line(
            "down",
            "exhausted",
            json!({"fail_times": 99, "status": 503}),
        ),
    ];
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 4);

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    let statuses: Vec<_> = part
        .iter()
        .map(|line| line["response"]["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 400, 200, 503]);
    let custom_ids: Vec<_> = part
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(custom_ids, ["ok", "bad-request", "flaky", "down"]);
    assert_eq!(
        part[1]["response"]["body"]["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!((outcome.succeeded, outcome.failed), (2, 2));
    assert_eq!(outcome.usage, part_usage(&part));
    // 1 + 1 + (1 failure + 1 success) + 3 attempts.
    assert_eq!(f.sim.stats().await.requests.chat_completions, 7);
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (2, 2));
    assert_eq!(live.usage, outcome.usage);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn a_cancelled_batch_sends_nothing() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("x", 4), &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    f.state.set_cancelled(&batch).await.unwrap();
    let task = input.task(&batch, INPUT_KEY, 1, 4);

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    assert_eq!(error_codes(&part), ["batch_cancelled"; 4]);
    assert!(part.iter().all(|line| line["response"].is_null()));
    assert_eq!(
        (
            outcome.succeeded,
            outcome.failed,
            outcome.cancelled,
            outcome.expired
        ),
        (0, 4, 4, 0)
    );
    assert_eq!(f.sim.stats().await.requests.total, 0);
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (0, 4));
    cleanup(&f.store).await;
}

#[tokio::test]
async fn a_cancel_while_running_stops_the_requests_not_yet_started() {
    let mut f = fixture(3).await;
    f.deps.settings.chunk_concurrency = 1;
    // The first request is held 2 s by the simulator; the cancel lands meanwhile.
    let mut lines = vec![chat_line("slow", "slow", json!({"latency_ms": 2000}))];
    lines.extend(plain_lines("later", 3));
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 4);

    let running = tokio::spawn({
        let deps = f.deps.clone();
        let task = task.clone();
        async move { run_chunk(&task, &deps).await }
    });
    f.sim.wait("requests=1").await;
    f.state.set_cancelled(&batch).await.unwrap();
    let outcome = running.await.unwrap().expect("run");

    let part = f.part(&task).await;
    // The request already sent keeps its answer.
    assert_eq!(part[0]["response"]["status_code"], 200);
    assert_eq!(error_codes(&part[1..]), ["batch_cancelled"; 3]);
    assert_eq!((outcome.succeeded, outcome.cancelled), (1, 3));
    assert_eq!(f.sim.stats().await.requests.total, 1);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn a_passed_deadline_expires_every_line() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("e", 3), &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let mut task = input.task(&batch, INPUT_KEY, 1, 3);
    task.deadline = common::unix_now() - 60;

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    assert_eq!(error_codes(&part), ["batch_expired"; 3]);
    assert_eq!(
        (
            outcome.succeeded,
            outcome.failed,
            outcome.cancelled,
            outcome.expired
        ),
        (0, 3, 0, 3)
    );
    assert_eq!(f.sim.stats().await.requests.total, 0);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn a_model_without_upstream_fails_its_lines_clearly() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("u", 2), &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let mut task = input.task(&batch, INPUT_KEY, 1, 2);
    task.model = "unrouted-model".into();

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    assert_eq!(error_codes(&part), ["upstream_unreachable"; 2]);
    let message = part[0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("unrouted-model"), "{message}");
    assert_eq!((outcome.succeeded, outcome.failed), (0, 2));
    assert_eq!(f.sim.stats().await.requests.total, 0);
    cleanup(&f.store).await;
}

/// Identical but for what the upstream varies itself (its request and completion ids, its
/// clock): same ids, same lines, same answers.
fn essentials(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .map(|line| {
            let response = &line["response"];
            json!([
                line["id"],
                line["custom_id"],
                response["status_code"],
                response["body"]["choices"],
                response["body"]["usage"],
                line["error"],
            ])
        })
        .collect()
}

#[tokio::test]
async fn running_a_chunk_twice_keeps_its_part_and_counts_once() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("t", 6), &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 2, 5);

    let first = run_chunk(&task, &f.deps).await.expect("first run");
    let first_part = f.raw_part(&task).await;
    let second = run_chunk(&task, &f.deps).await.expect("second run");

    // Every line was final: the second run keeps them all, byte for byte, and sends nothing.
    assert_eq!(first_part.len(), 4);
    assert_eq!(f.raw_part(&task).await, first_part);
    assert_eq!(f.sim.stats().await.requests.total, 4);
    assert_eq!((first.kept, second.kept), (0, 4));
    assert!(first.complete && second.complete);
    assert_eq!(ChunkOutcome { kept: 0, ..second }, first);
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (4, 0));
    assert_eq!(live.usage, first.usage);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn a_task_that_does_not_match_its_input_writes_nothing() {
    let f = fixture(3).await;
    let mut lines = plain_lines("m", 3);
    lines.push("{\"custom_id\": \"no-body\"}".into());
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();

    // Another number of lines than the range holds.
    let mut task = input.task(&batch, INPUT_KEY, 1, 3);
    task.line_count = 2;
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(
        matches!(error, ChunkError::InvalidInput(_)) && error.is_permanent(),
        "{error}"
    );
    task.line_count = 4;
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(matches!(error, ChunkError::InvalidInput(_)), "{error}");
    // A line that is not a request.
    let task = input.task(&batch, INPUT_KEY, 3, 4);
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(error.to_string().contains("line 4"), "{error}");
    // A range past the end of the input.
    let mut task = input.task(&batch, INPUT_KEY, 1, 4);
    task.byte_end += 10;
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(error.is_permanent(), "{error}");
    // A missing input does not come back (inputs outlive their batches): permanent.
    let mut task = input.task(&batch, INPUT_KEY, 1, 3);
    task.input_storage_key = "files/file-missing".into();
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(
        matches!(error, ChunkError::InputMissing(_)) && error.is_permanent(),
        "{error}"
    );
    assert!(!error.is_outage());

    let key = part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index);
    assert_eq!(f.store.head(&key).await.unwrap(), None);
    assert_eq!(f.sim.stats().await.requests.total, 0);
    assert_eq!(f.state.counts(&batch).await.unwrap().finished(), 0);
    cleanup(&f.store).await;
}

#[tokio::test]
async fn an_answer_over_the_cap_is_a_response_too_large_line_and_is_not_retried() {
    let mut f = fixture(3).await;
    f.deps.upstreams = f.sim.upstreams_with(&["sim-chat"], 3, |upstream| {
        upstream.max_response_bytes = 1 << 20;
    });
    let lines = vec![
        chat_line("small", "small", Value::Null),
        chat_line(
            "declared",
            "huge, declared",
            json!({"response_bytes": HUGE}),
        ),
        chat_line(
            "streamed",
            "huge, streamed",
            json!({"response_bytes": HUGE, "chunked": true}),
        ),
        chat_line(
            "fits",
            "large",
            json!({"response_bytes": 500_000, "chunked": true}),
        ),
    ];
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 4);

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let part = f.part(&task).await;
    assert_eq!(
        error_codes(&part),
        ["-", "response_too_large", "response_too_large", "-"]
    );
    for line in &part[1..3] {
        let message = line["error"]["message"].as_str().unwrap();
        assert!(message.contains("1048576 bytes"), "{message}");
        assert_eq!(line["response"], Value::Null);
    }
    assert_eq!(part[3]["response"]["status_code"], 200);
    assert!(part[3]["response"]["body"]["sim_padding"].is_string());
    assert_eq!((outcome.succeeded, outcome.failed), (2, 2));
    assert!(outcome.complete);
    let stats = f.sim.streams_done().await;
    assert_eq!(stats.requests.total, 4, "nothing is retried");
    assert!(
        stats.streamed_body_bytes < HUGE / 2,
        "{} bytes of two 100 MB answers were sent: read whole?",
        stats.streamed_body_bytes
    );
    cleanup(&f.store).await;
}

/// Finding 8: a re-run keeps every final line of the part byte for byte (a 2xx, an upstream
/// error, a final error code) and calls the upstream only for the others.
#[tokio::test]
async fn a_rerun_keeps_every_final_line_and_runs_only_the_others() {
    let f = fixture(3).await;
    // The kept lines would fail if they reached the upstream: they must not.
    let fail = json!({"status": 500});
    let lines = vec![
        chat_line("done-ok", "one", fail.clone()),
        chat_line("done-400", "two", fail.clone()),
        chat_line("cancelled", "three", Value::Null),
        chat_line("missing", "four", Value::Null),
        chat_line("not-mine", "five", Value::Null),
        chat_line("timed-out", "six", fail),
    ];
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 6);
    let id = |line| BatchRequestId::for_line(&batch, line);
    let body = |json: &str| ResponseBody::from_json(json.as_bytes()).unwrap();
    let earlier = [
        ResultLine::response(
            id(1),
            "done-ok",
            200,
            "req-1",
            body(r#"{"kept": true, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}"#),
        ),
        ResultLine::response(
            id(2),
            "done-400",
            400,
            "req-2",
            body(r#"{"error": {"message": "no"}}"#),
        ),
        ResultLine::no_response(id(3), "cancelled", NoResponseCode::BatchCancelled, None),
        // Line 4 has no result. Line 5's is not its own (another custom_id).
        ResultLine::no_response(id(5), "someone-else", NoResponseCode::RequestTimeout, None),
        ResultLine::no_response(id(6), "timed-out", NoResponseCode::RequestTimeout, None),
        // Not a line of this chunk.
        ResultLine::response(id(99), "stray", 200, "req-9", body("{}")),
    ];
    let earlier: Vec<Bytes> = earlier
        .iter()
        .map(|line| {
            let mut json = line.to_json_line();
            json.pop();
            Bytes::from(json)
        })
        .collect();
    put_lines(f.store.as_ref(), &key_of(&task), &earlier).await;

    let outcome = run_chunk(&task, &f.deps).await.expect("run");

    let raw = f.raw_part(&task).await;
    assert_eq!(raw.len(), 6);
    assert_eq!(raw[0], earlier[0]);
    assert_eq!(raw[1], earlier[1]);
    assert_eq!(raw[5], earlier[4]);
    let part = f.part(&task).await;
    for (n, line) in part.iter().enumerate() {
        assert_eq!(line["id"], id(n as u64 + 1).as_str(), "{line}");
    }
    let custom_ids: Vec<_> = part
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        custom_ids,
        [
            "done-ok",
            "done-400",
            "cancelled",
            "missing",
            "not-mine",
            "timed-out"
        ]
    );
    for line in &part[2..5] {
        assert_eq!(line["response"]["status_code"], 200, "{line}");
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
    }
    let stats = f.sim.stats().await;
    assert_eq!(
        stats.requests.total, 3,
        "only the lines without a final result"
    );
    assert_eq!(stats.failures.total, 0);
    assert!(outcome.complete);
    assert_eq!((outcome.kept, outcome.succeeded, outcome.failed), (3, 4, 2));
    assert_eq!(outcome.usage, part_usage(&part));
    assert!(outcome.usage.input_tokens >= 3 && outcome.usage.output_tokens >= 4);
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (4, 2));
    assert_eq!(live.usage, outcome.usage);
    cleanup(&f.store).await;
}

/// Finding 8, as it happens: a chunk re-run once its batch is cancelled or past its deadline
/// keeps the answers an earlier run got, and sends nothing.
#[tokio::test]
async fn a_rerun_after_cancel_or_deadline_keeps_every_answer_and_sends_nothing() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("k", 3), &[]);
    f.put_input(&input).await;

    // Cancelled, after a run whose last line's result was lost.
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 3);
    run_chunk(&task, &f.deps).await.expect("first run");
    let first = f.raw_part(&task).await;
    put_lines(f.store.as_ref(), &key_of(&task), &first[..2]).await;
    f.state.set_cancelled(&batch).await.unwrap();
    let rerun = run_chunk(&task, &f.deps).await.expect("re-run");
    let raw = f.raw_part(&task).await;
    assert_eq!(raw[..2], first[..2]);
    assert_eq!(
        error_codes(&f.part(&task).await),
        ["-", "-", "batch_cancelled"]
    );
    assert_eq!(
        (rerun.kept, rerun.succeeded, rerun.cancelled, rerun.complete),
        (2, 2, 1, true)
    );
    assert_eq!(f.sim.stats().await.requests.total, 3);

    // Past its deadline, after a complete run: the part stays as it is.
    let batch = batch_id();
    let mut task = input.task(&batch, INPUT_KEY, 1, 3);
    let done = run_chunk(&task, &f.deps).await.expect("first run");
    let first = f.raw_part(&task).await;
    task.deadline = common::unix_now() - 60;
    let rerun = run_chunk(&task, &f.deps).await.expect("re-run");
    assert_eq!(f.raw_part(&task).await, first);
    assert_eq!(
        ChunkOutcome {
            kept: 0,
            ..rerun.clone()
        },
        done
    );
    assert_eq!((rerun.kept, rerun.expired), (3, 0));
    assert_eq!(f.sim.stats().await.requests.total, 6);
    cleanup(&f.store).await;
}

/// Finding 9: past its time budget a chunk starts nothing more, writes what is done (no error
/// line for the rest) and says it is not complete; the next run continues from the part. Every
/// line is sent once and ends up in the part once.
#[tokio::test]
async fn the_time_budget_cuts_a_chunk_and_the_next_run_completes_it() {
    let mut f = fixture(3).await;
    f.deps.settings.chunk_concurrency = 1;
    f.deps.settings.chunk_time_budget = Duration::from_secs(1);
    // The first request outlasts the budget; the others are quick.
    let mut lines = vec![chat_line("slow", "slow", json!({"latency_ms": 2500}))];
    lines.extend(plain_lines("quick", 4));
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 1, 5);
    let key = key_of(&task);

    let mut runs = vec![run_chunk(&task, &f.deps).await.expect("first run")];
    let first = &runs[0];
    assert!(!first.complete);
    assert!(first.lines() < 5);
    if first.lines() > 0 {
        let partial = f.part(&task).await;
        assert_eq!(partial.len() as u64, first.lines());
        for line in &partial {
            assert_eq!(line["response"]["status_code"], 200, "{line}");
        }
    } else {
        assert_eq!(f.store.head(&key).await.unwrap(), None);
    }
    while runs.last().is_some_and(|run| !run.complete) {
        assert!(runs.len() < 5, "not complete after {} runs", runs.len());
        runs.push(run_chunk(&task, &f.deps).await.expect("next run"));
    }

    let last = runs.last().unwrap();
    let part = f.part(&task).await;
    let custom_ids: Vec<_> = part
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        custom_ids,
        ["slow", "quick-1", "quick-2", "quick-3", "quick-4"]
    );
    for (n, line) in part.iter().enumerate() {
        assert_eq!(
            line["id"],
            BatchRequestId::for_line(&batch, n as u64 + 1).as_str()
        );
        assert_eq!(line["response"]["status_code"], 200);
    }
    assert_eq!((last.succeeded, last.failed), (5, 0));
    assert_eq!(last.usage, part_usage(&part));
    assert_eq!(f.sim.stats().await.requests.total, 5, "each line sent once");
    let live = f.state.counts(&batch).await.unwrap();
    assert_eq!((live.completed, live.failed), (5, 0));
    cleanup(&f.store).await;
}

/// Results past the memory budget wait in a temporary file: the part is the same, in line
/// order, and kept lines go through the file byte for byte.
#[tokio::test]
async fn a_spilled_chunk_writes_the_same_part() {
    let mut f = fixture(3).await;
    f.deps.settings.chunk_concurrency = 4;
    // Varied latencies: lines finish out of order.
    let lines: Vec<String> = (1..=20u64)
        .map(|i| {
            chat_line(
                &format!("s-{i}"),
                &format!("spill {i}"),
                json!({"latency_ms": (i * 7 % 5) * 10}),
            )
        })
        .collect();
    let input = Input::new(&lines, &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    // Two chunks over the same lines: same ids, two parts.
    let in_memory = input.task(&batch, INPUT_KEY, 1, 20);
    let mut spilled = in_memory.clone();
    spilled.chunk_index = 3;
    let mut spilling = f.deps.clone();
    spilling.settings.result_memory_bytes = 0;

    let a = run_chunk(&in_memory, &f.deps).await.expect("in memory");
    let b = run_chunk(&spilled, &spilling).await.expect("spilled");

    let part_a = f.part(&in_memory).await;
    let part_b = f.part(&spilled).await;
    assert_eq!(part_b.len(), 20);
    assert_eq!(essentials(&part_a), essentials(&part_b));
    assert_eq!(
        (b.succeeded, b.failed, b.usage, b.complete),
        (a.succeeded, a.failed, a.usage, a.complete)
    );

    // A re-run that must rewrite the part (its last line lost its result) keeps the others
    // byte for byte, a few in memory and the rest through the file.
    let raw = f.raw_part(&spilled).await;
    let mut damaged = raw[..19].to_vec();
    let mut cancelled = ResultLine::no_response(
        BatchRequestId::for_line(&batch, 20),
        "s-20",
        NoResponseCode::BatchCancelled,
        None,
    )
    .to_json_line();
    cancelled.pop();
    damaged.push(Bytes::from(cancelled));
    put_lines(f.store.as_ref(), &key_of(&spilled), &damaged).await;
    spilling.settings.result_memory_bytes = raw[0].len() * 5;
    let c = run_chunk(&spilled, &spilling).await.expect("re-run");
    let rewritten = f.raw_part(&spilled).await;
    assert_eq!(rewritten[..19], raw[..19]);
    assert_eq!(
        essentials(&f.part(&spilled).await[19..]),
        essentials(&part_b[19..])
    );
    assert_eq!((c.kept, c.succeeded, c.complete), (19, 20, true));
    assert_eq!(f.sim.stats().await.requests.total, 41);
    cleanup(&f.store).await;
}

/// Object storage down: the error says it is an outage (wait), not a failure of the task.
#[tokio::test]
async fn an_unreachable_store_is_an_outage() {
    let mut f = fixture(3).await;
    let input = Input::new(&plain_lines("o", 2), &[]);
    let task = input.task(&batch_id(), INPUT_KEY, 1, 2);
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    f.deps.storage = Arc::new(common::storage_at(&endpoint).await);

    let error = run_chunk(&task, &f.deps).await.unwrap_err();

    assert!(
        matches!(error, ChunkError::ReadInput(_)) && error.is_outage() && !error.is_permanent(),
        "{error}"
    );
    assert_eq!(f.sim.stats().await.requests.total, 0);
}
