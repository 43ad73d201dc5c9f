//! `run_chunk` against real storage (the dev Garage, a unique prefix per test), the in-memory
//! live state and the inference simulator in-process. Failures are scripted per request with
//! the simulator's `sim` directive; what reached the simulator is read from its stats. No
//! sleeps: server-side progress is awaited through `/sim/wait`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Input, Sim, batch_id, chat_line, cleanup, read_lines, start_sim, storage};
use nightshift_core::BatchId;
use nightshift_core::batch::part_key;
use nightshift_core::results::{BatchRequestId, Usage};
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
        let batch = BatchId::parse(&task.batch_id).unwrap();
        read_lines(self.store.as_ref(), &part_key(&batch, task.chunk_index)).await
    }
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
            succeeded: 5,
            failed: 0,
            cancelled: 0,
            expired: 0,
            usage,
        }
    );
    assert!(outcome.part_bytes > 0);
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

#[tokio::test]
async fn running_a_chunk_twice_rewrites_its_part_and_counts_once() {
    let f = fixture(3).await;
    let input = Input::new(&plain_lines("t", 6), &[]);
    f.put_input(&input).await;
    let batch = batch_id();
    let task = input.task(&batch, INPUT_KEY, 2, 5);

    let first = run_chunk(&task, &f.deps).await.expect("first run");
    let first_part = f.part(&task).await;
    let second = run_chunk(&task, &f.deps).await.expect("second run");
    let second_part = f.part(&task).await;

    // Identical but for what the upstream varies itself (its request and completion ids,
    // its clock): same ids, same lines, same answers.
    let essentials = |lines: &[Value]| -> Vec<Value> {
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
    };
    assert_eq!(first_part.len(), 4);
    assert_eq!(essentials(&first_part), essentials(&second_part));
    assert_eq!(first, second);
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
    // A missing input may come back: not permanent.
    let mut task = input.task(&batch, INPUT_KEY, 1, 3);
    task.input_storage_key = "files/file-missing".into();
    let error = run_chunk(&task, &f.deps).await.unwrap_err();
    assert!(
        matches!(error, ChunkError::ReadInput(_)) && !error.is_permanent(),
        "{error}"
    );

    let key = part_key(&BatchId::parse(&batch).unwrap(), task.chunk_index);
    assert_eq!(f.store.head(&key).await.unwrap(), None);
    assert_eq!(f.sim.stats().await.requests.total, 0);
    assert_eq!(f.state.counts(&batch).await.unwrap().finished(), 0);
    cleanup(&f.store).await;
}
