//! `nightshift standalone` as a user runs it: the real binary, one process, no infrastructure.
//! Seed 001's script against `--simulate`; `kill -9` in the middle of a 10,000-line batch and a
//! restart on the same data directory — the batch completes with every custom_id exactly once.
//! (The rest of the suite runs against the standalone wiring in-process, see
//! `for_both_deployments!`.)

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_e2e::cluster::nightshift_bin;
use nightshift_e2e::http::upload_batch_file_id;
use nightshift_e2e::{eventually, run_python};
use nightshift_inference_sim::SimConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// A `nightshift standalone` process and what it printed.
struct Process {
    child: Child,
    origin: String,
    api_key: String,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts the binary on `data_dir` with `args` and waits for its banner.
    async fn start(data_dir: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(nightshift_bin()?)
            .arg("standalone")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            // only what the test passes: no config file, no NIGHTSHIFT_* from the environment
            .env_remove("NIGHTSHIFT_CONFIG")
            .env_remove("NIGHTSHIFT_API_KEY")
            .env_remove("NIGHTSHIFT_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn nightshift standalone")?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("stdout lines").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let (mut origin, mut api_key) = (None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while origin.is_none() || api_key.is_none() {
            let line = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .context("no banner within 60s")?
                .context("the process ended before printing its banner")?;
            if let Some(url) = line.trim().strip_prefix("API key") {
                api_key = Some(url.trim().to_owned());
            } else if let Some(url) = line.trim().strip_prefix("API") {
                origin = Some(url.trim().trim_end_matches("/v1").to_owned());
            }
        }
        Ok(Self {
            child,
            origin: origin.unwrap_or_default(),
            api_key: api_key.unwrap_or_default(),
            stdout,
        })
    }

    fn printed(&self) -> Vec<String> {
        self.stdout.lock().expect("stdout lines").clone()
    }

    async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("no pid")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("no exit within 60s of SIGTERM")??;
        if !exit.success() {
            bail!("exited with {exit}");
        }
        Ok(())
    }
}

#[tokio::test]
async fn seed_001_runs_against_the_simulate_quick_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Process::start(dir.path(), &["--simulate"])
        .await
        .expect("start");
    let out = run_python(
        &process.origin,
        Some("fixtures"),
        "seed_001.py",
        &[("DEEPINFRA_TOKEN", process.api_key.clone())],
    )
    .await
    .expect("seed 001's script");
    for id in ["request-0: ", "request-1: "] {
        assert_eq!(out.matches(id).count(), 1, "{id} in {out}");
    }
    // One line per state change, ending with the batch's outcome; no log flood.
    eventually("a completed line", Duration::from_secs(10), || async {
        let printed = process.printed();
        if printed.iter().any(|l| l.contains(" completed ")) {
            return Ok(());
        }
        Err(format!("{printed:#?}"))
    })
    .await
    .expect("no completed line");
    let printed = process.printed();
    assert!(printed.len() < 40, "too chatty: {printed:#?}");
    process.stop().await.expect("clean exit on SIGTERM");
    // The key is kept for the next start.
    let key = std::fs::read_to_string(dir.path().join("api-key")).expect("api-key file");
    assert!(key.starts_with("ns-"));
}

#[tokio::test]
async fn killed_mid_batch_and_restarted_it_completes_every_line_once() {
    const LINES: u64 = 10_000;
    let sim = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = format!("http://{}/v1", sim.local_addr().expect("addr"));
    tokio::spawn(nightshift_inference_sim::serve(
        // slow enough that the batch is still running when the test strikes
        SimConfig {
            base_latency_ms: 15,
            ..SimConfig::default()
        },
        sim,
        tokio_util::sync::CancellationToken::new(),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let args = ["--upstream", upstream.as_str(), "--quiet"];
    let first = Process::start(dir.path(), &args).await.expect("start");
    let key = first.api_key.clone();
    let out = run_python(
        &first.origin,
        None,
        "crash_create.py",
        &[("NS_API_KEY", key.clone()), ("NS_LINES", LINES.to_string())],
    )
    .await
    .expect("create phase");
    let created: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or_default()).expect("result line");
    let batch = created["batch"].as_str().expect("batch id").to_owned();

    // Strike once part of the batch is done.
    let client = api::Client::new(&first.origin, &key);
    eventually("progress", Duration::from_secs(120), || async {
        let b = client.batch(&batch).await.expect("retrieve");
        let done = b["request_counts"]["completed"].as_u64().unwrap_or(0);
        assert_ne!(
            b["status"], "completed",
            "the batch finished before the kill"
        );
        if done >= 1_000 {
            return Ok(());
        }
        Err(b)
    })
    .await
    .expect("no progress");
    first.kill9().await.expect("kill -9");

    let second = Process::start(dir.path(), &args).await.expect("restart");
    assert_eq!(second.api_key, key, "the same key after a restart");
    run_python(
        &second.origin,
        None,
        "crash_check.py",
        &[
            ("NS_API_KEY", key),
            ("NS_LINES", LINES.to_string()),
            ("NS_BATCH", batch),
        ],
    )
    .await
    .expect("every custom_id exactly once after the restart");
    second.stop().await.expect("clean exit");
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// 24 upstream answers of 100 MB each (half without Content-Length) through the real binary:
/// each is cut at the default `max_response_bytes` (16 MiB) and becomes a
/// `response_too_large` line, the others go through, and the whole process — gateway,
/// scheduler, executor, finalizer — stays far below what even one such body would take.
#[tokio::test]
async fn huge_upstream_answers_are_cut_and_memory_stays_bounded() {
    let sim = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = format!("http://{}/v1", sim.local_addr().expect("addr"));
    // the simulator runs in the test process: its bytes are not the product's
    tokio::spawn(nightshift_inference_sim::serve(
        SimConfig::default(),
        sim,
        tokio_util::sync::CancellationToken::new(),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Process::start(dir.path(), &["--upstream", upstream.as_str(), "--quiet"])
        .await
        .expect("start");
    let out = run_python(
        &process.origin,
        None,
        "huge_bodies.py",
        &[("NS_API_KEY", process.api_key.clone())],
    )
    .await
    .expect("every huge answer is a response_too_large line");
    assert!(out.contains("\"too_large\": 24"), "{out}");
    let peak = peak_rss(process.child.id().expect("pid")).expect("peak rss");
    eprintln!(
        "peak RSS of nightshift standalone: {} MiB",
        peak / 1024 / 1024
    );
    // 24 × 100 MB were offered; a process that read them would hold gigabytes.
    assert!(
        peak < 300 * 1024 * 1024,
        "peak RSS {} MiB",
        peak / 1024 / 1024
    );
    process.stop().await.expect("clean exit");
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Process::start(dir.path(), &["--simulate", "--quiet"])
        .await
        .expect("start");
    let out = Command::new(nightshift_bin().expect("bin"))
        .args([
            "standalone",
            "--simulate",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env_remove("NIGHTSHIFT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another nightshift process"),
        "{stderr}"
    );
    first.stop().await.expect("clean exit");
}

/// `nightshift admin --data-dir` on the data directory of a running process.
async fn admin(data_dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(nightshift_bin().expect("bin"))
        .arg("admin")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("NIGHTSHIFT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run nightshift admin")
}

#[tokio::test]
async fn admin_through_the_data_dir_makes_a_second_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let process = Process::start(dir.path(), &["--simulate", "--quiet"])
        .await
        .expect("start");
    let out = admin(dir.path(), &["create-tenant", "--name", "second"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("api_key="))
        .expect("an api_key= line")
        .to_owned();
    assert_ne!(key, process.api_key);

    // The new key is a tenant of its own: it sees its own (empty) lists, not the first one's.
    let first = api::Client::new(&process.origin, &process.api_key);
    let second = api::Client::new(&process.origin, &key);
    let file = upload_batch_file_id(
        &reqwest::Client::new(),
        &process.origin,
        &process.api_key,
        br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#,
    )
    .await;
    assert_eq!(first.files().await.expect("first's files"), [file]);
    assert!(second.files().await.expect("second's files").is_empty());

    let out = admin(dir.path(), &["tenants"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("second"),
        "{listed}"
    );

    process.stop().await.expect("clean exit");
    // Stopped: the access file is gone, and admin says what to check.
    assert!(!dir.path().join("admin").exists());
    let out = admin(dir.path(), &["tenants"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nightshift standalone --data-dir"),
        "{stderr}"
    );
}

/// The few HTTP calls the test makes itself (the SDK runs in the Python scripts).
mod api {
    pub struct Client {
        origin: String,
        key: String,
        http: reqwest::Client,
    }

    impl Client {
        pub fn new(origin: &str, key: &str) -> Self {
            Self {
                origin: origin.to_owned(),
                key: key.to_owned(),
                http: reqwest::Client::new(),
            }
        }

        /// The ids of the tenant's files.
        pub async fn files(&self) -> anyhow::Result<Vec<String>> {
            let list = self.get("/v1/files").await?;
            Ok(list["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f["id"].as_str().map(str::to_owned))
                .collect())
        }

        pub async fn batch(&self, id: &str) -> anyhow::Result<serde_json::Value> {
            self.get(&format!("/v1/batches/{id}")).await
        }

        /// `GET <origin><path>` as the tenant; its JSON answer, which must be a 2xx.
        async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
            Ok(self
                .http
                .get(format!("{}{path}", self.origin))
                .bearer_auth(&self.key)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?)
        }
    }
}
