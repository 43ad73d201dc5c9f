//! End-to-end: `nightshift batch …`, the client people run batches with, as a user runs it (the
//! real binary, `OPENAI_BASE_URL`/`OPENAI_API_KEY` in its environment) against both
//! deployments: submit --wait and the results, download in the input's order, list / show /
//! cancel, the exit code of each ending, retry of failed lines, one-line errors, and the live
//! progress display in a real terminal (a tmux pane), Ctrl-C included.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nightshift_e2e::cluster::nightshift_bin;
use nightshift_e2e::{Deployment, Stack, StackOptions, eventually, for_both_deployments};
use serde_json::{Value, json};

/// The client pointed at `stack` as `tenant`, in `dir`.
struct Cli<'a> {
    base_url: String,
    key: String,
    dir: &'a Path,
}

impl<'a> Cli<'a> {
    async fn new(stack: &Stack, dir: &'a Path) -> Self {
        let (_, key) = stack.tenant("cli").await.expect("tenant");
        Self {
            base_url: format!("{}/v1", stack.origin),
            key,
            dir,
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(nightshift_bin().expect("binary"))
            .arg("batch")
            .args(args)
            .current_dir(self.dir)
            .env("OPENAI_BASE_URL", &self.base_url)
            .env("OPENAI_API_KEY", &self.key)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run nightshift batch")
    }

    /// Runs and expects `code`; returns stdout.
    async fn expect(&self, code: i32, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(
            out.status.code(),
            Some(code),
            "nightshift batch {args:?}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.expect(0, &args).await).expect("JSON on stdout")
    }

    /// `submit` without waiting: the batch id (the only line on stdout).
    async fn submit(&self, file: &str, extra: &[&str]) -> String {
        let mut args = vec!["submit", file];
        args.extend_from_slice(extra);
        let out = self.expect(0, &args).await;
        let id = out.trim().to_owned();
        assert!(id.starts_with("batch_"), "stdout: {out:?}");
        id
    }
}

/// A chat request line; `sim` is the simulator's directive for it.
fn line(id: &str, sim: Option<Value>) -> String {
    let mut body = json!({"model": "sim-chat", "messages": [{"role": "user", "content": format!("hello {id}")}]});
    if let Some(sim) = sim {
        body["sim"] = sim;
    }
    json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
        .to_string()
}

fn write_lines(dir: &Path, name: &str, lines: &[String]) {
    std::fs::write(dir.join(name), lines.join("\n") + "\n").expect("write input");
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read results")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["custom_id"].as_str().expect("custom_id").to_owned())
        .collect()
}

/// 24 ids in an order that is neither sorted nor the server's; every 5th line fails (400).
fn mixed_input(dir: &Path) -> (Vec<String>, Vec<String>) {
    let order: Vec<String> = (0..24).map(|i| format!("q{}", (i * 7) % 24)).collect();
    let lines: Vec<String> = order
        .iter()
        .enumerate()
        .map(|(i, id)| line(id, (i % 5 == 0).then(|| json!({"status": 400}))))
        .collect();
    write_lines(dir, "in.jsonl", &lines);
    let failed = order.iter().step_by(5).cloned().collect();
    (order, failed)
}

async fn submit_wait_downloads_results_in_input_order(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let dir = tempfile::tempdir().expect("dir");
    let cli = Cli::new(&stack, dir.path()).await;
    let (order, failed) = mixed_input(dir.path());

    let last = cli
        .json(&[
            "submit",
            "in.jsonl",
            "--wait",
            "-o",
            "all.jsonl",
            "--interval",
            "0.1",
            "--metadata",
            "team=cli",
        ])
        .await;
    assert_eq!(last["status"], "completed");
    assert_eq!(last["metadata"]["team"], "cli");
    assert_eq!(
        last["request_counts"],
        json!({"total": 24, "completed": 19, "failed": 5})
    );
    let id = last["id"].as_str().expect("id");
    let all = read_lines(&dir.path().join("all.jsonl"));
    let mut got = ids(&all);
    got.sort();
    let mut want = order.clone();
    want.sort();
    assert_eq!(got, want, "every request's result, once");
    let statuses = |lines: &[Value], code: u64| {
        lines
            .iter()
            .filter(|l| l["response"]["status_code"] == code)
            .count()
    };
    assert_eq!((statuses(&all, 200), statuses(&all, 400)), (19, 5));

    // in the input's order, every line into one file (input downloaded from the server)…
    cli.expect(
        0,
        &["download", id, "-o", "ordered.jsonl", "--in-input-order"],
    )
    .await;
    assert_eq!(ids(&read_lines(&dir.path().join("ordered.jsonl"))), order);
    // …or split, from the local input, with a sort budget of 1 MiB
    cli.expect(
        0,
        &[
            "download",
            id,
            "-o",
            "ok.jsonl",
            "--errors",
            "failed.jsonl",
            "--in-input-order",
            "--input",
            "in.jsonl",
            "--sort-memory",
            "1",
        ],
    )
    .await;
    let succeeded: Vec<String> = order
        .iter()
        .filter(|id| !failed.contains(id))
        .cloned()
        .collect();
    assert_eq!(ids(&read_lines(&dir.path().join("ok.jsonl"))), succeeded);
    assert_eq!(ids(&read_lines(&dir.path().join("failed.jsonl"))), failed);
    stack.stop().await.expect("stop");
}

async fn list_show_cancel_and_each_ending_has_its_exit_code(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let dir = tempfile::tempdir().expect("dir");
    let cli = Cli::new(&stack, dir.path()).await;
    // slow requests: the batch is still running when it is cancelled or aged below
    let slow: Vec<String> = (0..5)
        .map(|i| line(&format!("s{i}"), Some(json!({"latency_ms": 3000}))))
        .collect();
    write_lines(dir.path(), "slow.jsonl", &slow);

    let cancelled = cli.submit("slow.jsonl", &[]).await;
    let shown = cli.json(&["show", &cancelled]).await;
    assert_eq!(shown["id"], cancelled.as_str());
    assert_eq!(shown["endpoint"], "/v1/chat/completions");
    let listed = cli.json(&["list"]).await;
    assert!(
        listed
            .as_array()
            .expect("array")
            .iter()
            .any(|b| b["id"] == cancelled.as_str()),
        "{listed}"
    );
    let none = cli.json(&["list", "--status", "completed"]).await;
    assert_eq!(none, json!([]));
    let after_cancel = cli.json(&["cancel", &cancelled]).await;
    assert!(
        ["cancelling", "cancelled"].contains(&after_cancel["status"].as_str().unwrap_or("")),
        "{after_cancel}"
    );
    cli.expect(5, &["watch", &cancelled, "--interval", "0.1"])
        .await;
    let text = cli.expect(0, &["show", &cancelled]).await;
    assert!(
        text.starts_with(&format!("{cancelled}  cancelled\n")),
        "{text}"
    );
    assert!(text.contains("requests           5 total"), "{text}");
    let table = cli.expect(0, &["list", "--status", "cancelled"]).await;
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&format!("{cancelled}  cancelled")),
        "{table}"
    );

    // expired: its deadline moved into the past while it runs
    let expired = cli.submit("slow.jsonl", &[]).await;
    let running = eventually("the batch runs", Duration::from_secs(30), || async {
        let b = cli.json(&["show", &expired]).await;
        if b["status"] == "in_progress" {
            Ok(())
        } else {
            Err(b["status"].to_string())
        }
    });
    running.await.expect("in progress");
    stack.age_batch(&expired, 86_400 * 2).await.expect("age");
    cli.expect(4, &["watch", &expired, "--interval", "0.1"])
        .await;

    // failed: validation rejects an unknown model
    write_lines(
        dir.path(),
        "bad.jsonl",
        &[json!({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}})
        .to_string()],
    );
    let failed = cli.submit("bad.jsonl", &[]).await;
    cli.expect(3, &["watch", &failed, "--interval", "0.1"])
        .await;
    let text = cli.expect(0, &["show", &failed]).await;
    assert!(text.contains("model_not_found"), "{text}");

    // errors: one line, the server's message and status; exit 1
    let out = cli.run(&["show", "batch_doesnotexist"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("(HTTP 404"),
        "{stderr}"
    );
    let out = cli.run(&["cancel", &failed]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Cannot cancel a batch with status 'failed'. (HTTP 409"),
        "{stderr}"
    );
    // a bad key is the server's 401, on one line
    let out = Cli {
        key: "wrong".into(),
        ..cli
    }
    .run(&["list"])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("(HTTP 401") && stderr.lines().count() == 1,
        "{stderr}"
    );
    stack.stop().await.expect("stop");
}

async fn retry_reruns_only_the_failed_lines(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let dir = tempfile::tempdir().expect("dir");
    let cli = Cli::new(&stack, dir.path()).await;
    // r1 and r4 fail on their first attempt only (400 is not retried within the batch)
    let lines: Vec<String> = (0..6)
        .map(|i| {
            let sim = [1, 4]
                .contains(&i)
                .then(|| json!({"status": 400, "fail_times": 1}));
            line(&format!("r{i}"), sim)
        })
        .collect();
    write_lines(dir.path(), "in.jsonl", &lines);
    let first = cli
        .json(&["submit", "in.jsonl", "--wait", "--interval", "0.1"])
        .await;
    assert_eq!(first["request_counts"]["failed"], 2, "{first}");
    let first_id = first["id"].as_str().expect("id");

    let retry = cli.json(&["retry", first_id]).await;
    assert_eq!(retry["metadata"], json!({"retry_of": first_id}));
    assert_eq!(retry["endpoint"], "/v1/chat/completions");
    let retry_id = retry["id"].as_str().expect("id");
    // The server made it (`POST /batches/{id}/retry`): the original lists it as its retry,
    // which a client-side retry (a plain new batch) would not be.
    let listed: Value = reqwest::Client::new()
        .get(format!("{}/batches", cli.base_url))
        .query(&[("retry_of", first_id)])
        .bearer_auth(&cli.key)
        .send()
        .await
        .expect("list retries")
        .json()
        .await
        .expect("a page");
    assert_eq!(listed["data"][0]["id"], retry_id, "{listed}");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    let done = cli.json(&["watch", retry_id, "--interval", "0.1"]).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 2, "completed": 2, "failed": 0})
    );
    cli.expect(
        0,
        &[
            "download",
            retry_id,
            "-o",
            "retried.jsonl",
            "--in-input-order",
        ],
    )
    .await;
    assert_eq!(
        ids(&read_lines(&dir.path().join("retried.jsonl"))),
        ["r1", "r4"]
    );
    // nothing failed the second time: nothing to retry, nothing created
    let nothing = cli.json(&["retry", retry_id]).await;
    assert_eq!(nothing, Value::Null);
    stack.stop().await.expect("stop");
}

/// A tmux server of this test's own.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux (make test installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "cli"]).stdout).into_owned()
    }

    async fn until(&self, what: &str, needle: &str) -> String {
        eventually(what, Duration::from_secs(60), || async {
            let screen = self.screen();
            if screen.contains(needle) {
                Ok(screen)
            } else {
                Err(screen)
            }
        })
        .await
        .expect("screen")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

async fn watch_draws_a_live_progress_bar_in_a_terminal(deployment: Deployment) {
    let stack = Stack::start(StackOptions::on(deployment))
        .await
        .expect("stack");
    let dir = tempfile::tempdir().expect("dir");
    let cli = Cli::new(&stack, dir.path()).await;
    // 20 requests of 1.5 s, 10 per chunk: the bar is seen part-way
    let lines: Vec<String> = (0..20)
        .map(|i| line(&format!("t{i}"), Some(json!({"latency_ms": 1500}))))
        .collect();
    write_lines(dir.path(), "in.jsonl", &lines);
    let id = cli.submit("in.jsonl", &[]).await;

    let tmux = Tmux {
        socket: format!("nightshift-cli-{}", uuid::Uuid::new_v4().simple()),
    };
    let command = format!(
        "OPENAI_BASE_URL={} OPENAI_API_KEY={} {} batch watch {id} --interval 0.2; echo EXIT=$?; sleep 600",
        cli.base_url,
        cli.key,
        nightshift_bin().expect("binary").display()
    );
    let started = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "cli",
        "-x",
        "200",
        "-y",
        "10",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    // the bar: the batch id, counters over the total, the status
    let screen = tmux.until("the progress bar", "/20 done").await;
    assert!(screen.contains(&id), "{screen}");
    assert!(
        screen.contains(" failed · ") && screen.contains("req/s"),
        "{screen}"
    );
    // Ctrl-C ends the watch, not the batch
    tmux.cmd(&["send-keys", "-t", "cli", "C-c"]);
    let screen = tmux.until("the watch stops", "EXIT=").await;
    assert!(
        screen.contains(&format!(
            "batch {id} keeps running; resume with: nightshift batch watch {id}"
        )),
        "{screen}"
    );
    assert!(screen.contains("EXIT=130"), "{screen}");
    let batch = cli.json(&["show", &id]).await;
    assert_ne!(batch["status"], "cancelling", "{batch}");
    assert_ne!(batch["status"], "cancelled", "{batch}");

    // resumed, it follows the batch to its end
    tmux.cmd(&["respawn-pane", "-k", "-t", "cli", &command]);
    let screen = tmux.until("the batch ends", "EXIT=").await;
    assert!(screen.contains("20/20 done"), "{screen}");
    assert!(
        screen.contains(&format!(
            "batch {id} completed: 20 completed, 0 failed of 20"
        )),
        "{screen}"
    );
    assert!(screen.contains("EXIT=0"), "{screen}");
    stack.stop().await.expect("stop");
}

for_both_deployments!(
    submit_wait_downloads_results_in_input_order,
    list_show_cancel_and_each_ending_has_its_exit_code,
    retry_reruns_only_the_failed_lines,
    watch_draws_a_live_progress_bar_in_a_terminal,
);
