//! The end-to-end harness: each test starts its own scheduler and gateway in-process, on
//! ephemeral loopback ports, over the REAL adapters (PostgreSQL and the S3 service that
//! `make up`/`make test` start), isolated by an object-storage prefix of its own and tenants
//! of its own, so tests run in parallel. Clients are the official `openai` Python SDK (run
//! from the virtualenv `make test` prepares) and direct storage/database access for the
//! checks a client cannot make ("nothing was left behind").

pub mod cluster;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_core::secret::Secret;
use nightshift_gateway::GatewayConfig;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::{PgConfig, PgStore};
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_queue::{QueueConfig, RabbitQueue};
use nightshift_scheduler::batches::BatchSettings;
use nightshift_scheduler::{Ports, SchedulerConfig};
use nightshift_state::{RedisState, StateConfig};
use nightshift_storage::{ObjectStore, S3Config, S3Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

/// S3 settings of the dev stack (overridable with the same variables the binary reads).
pub fn s3_config(prefix: &str) -> S3Config {
    S3Config {
        endpoint: Some(env_or(
            "NIGHTSHIFT_STORAGE__ENDPOINT",
            "http://127.0.0.1:3900",
        )),
        region: env_or("NIGHTSHIFT_STORAGE__REGION", "us-east-1"),
        bucket: env_or("NIGHTSHIFT_STORAGE__BUCKET", "nightshift"),
        access_key_id: Some(env_or(
            "NIGHTSHIFT_STORAGE__ACCESS_KEY_ID",
            "GK1d224b85150aaabc7eadd95e",
        )),
        secret_access_key: Some(Secret::new(env_or(
            "NIGHTSHIFT_STORAGE__SECRET_ACCESS_KEY",
            "04b99fcef4651778881fd9e7d7cab01ed1df0241b092249abb2a27e8c90516e5",
        ))),
        prefix: prefix.to_owned(),
        part_size: 5 * 1024 * 1024,
        ..S3Config::default()
    }
}

/// The test database (migrated on connect).
pub fn pg_config() -> PgConfig {
    PgConfig {
        url: Secret::new(env_or(
            "NIGHTSHIFT_TEST_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/nightshift_test",
        )),
        ..PgConfig::default()
    }
}

/// Models the test routing table serves (`model_not_found` for anything else).
pub const TEST_MODELS: [&str; 3] = [
    "sim-chat",
    "sim-embed",
    "meta-llama/Meta-Llama-3.1-8B-Instruct",
];

/// Knobs a test may turn.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub max_upload_bytes: u64,
    /// Batch input limits and chunk sizes (small by default, so limits are testable).
    pub batches: BatchSettings,
    /// Upstreams; `None` = one upstream serving [`TEST_MODELS`] at the in-process simulator.
    pub routing: Option<RoutingConfig>,
    pub completion_windows: Vec<String>,
    /// The in-process inference simulator's behaviour.
    pub sim: SimConfig,
    /// Executors sharing the chunk queue.
    pub executors: usize,
    /// Ceiling of requests in flight to the simulator, per executor.
    pub upstream_max_concurrency: u32,
    /// Start the finalizer with the stack (else [`Stack::start_finalizer`] does later).
    pub finalizer: bool,
    /// The scheduler's grace period before re-publishing an unfinished finalize job.
    pub finalize_retry_after: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            max_upload_bytes: GatewayConfig::default().max_upload_bytes,
            batches: BatchSettings {
                max_lines: 1000,
                max_file_bytes: 256 * 1024,
                chunk_max_lines: 10,
                ..BatchSettings::default()
            },
            routing: None,
            completion_windows: vec!["24h".into(), "1h".into(), "4s".into()],
            sim: SimConfig::default(),
            executors: 1,
            upstream_max_concurrency: 64,
            finalizer: true,
            finalize_retry_after: Duration::from_secs(300),
        }
    }
}

/// A running scheduler + gateway pair.
pub struct Stack {
    /// `http://127.0.0.1:<port>` (no `/v1`).
    pub origin: String,
    /// The object store under this test's prefix.
    pub storage: Arc<S3Store>,
    pub metadata: Arc<PgStore>,
    pub queue: Arc<RabbitQueue>,
    pub state: Arc<RedisState>,
    pub ports: Ports,
    /// The simulator's base URL (`http://127.0.0.1:<port>`).
    pub sim_origin: String,
    pub scheduler_url: String,
    /// Unique per test: object-storage prefix and tenant names.
    pub prefix: String,
    /// This test's Postgres schema (dropped at the end).
    pub schema: String,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stack {
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        nightshift_telemetry::init(&nightshift_telemetry::TelemetryConfig {
            log_format: nightshift_telemetry::LogFormat::Pretty,
            log_filter: "warn".into(),
        });
        let prefix = format!("e2e/{}", uuid::Uuid::new_v4());
        let storage = Arc::new(
            S3Store::new(&s3_config(&prefix))
                .await
                .context("s3 client")?,
        );
        storage
            .ping()
            .await
            .context("object storage is not reachable: run `make up` (or `make test`)")?;
        // Each test has a schema of its own: its scheduler must see only its own batches.
        let schema = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let metadata = Arc::new(
            PgStore::connect(&PgConfig {
                schema: Some(schema.clone()),
                ..pg_config()
            })
            .await
            .context("postgres is not reachable: run `make up` (or `make test`)")?,
        );
        let queue = Arc::new(
            RabbitQueue::connect(&QueueConfig {
                prefix: format!("e2e-{}", uuid::Uuid::new_v4()),
                ..QueueConfig::default()
            })
            .await
            .context("rabbitmq is not reachable: run `make up` (or `make test`)")?,
        );
        let state = Arc::new(
            RedisState::connect(&StateConfig {
                key_prefix: format!("e2e:{}:", uuid::Uuid::new_v4()),
                ttl: Duration::from_secs(3600),
                ..StateConfig::default()
            })
            .await
            .context("redis is not reachable: run `make up` (or `make test`)")?,
        );
        let ports = Ports {
            metadata: metadata.clone(),
            storage: storage.clone(),
            queue: queue.clone(),
            state: state.clone(),
        };
        let mut stops = Vec::new();
        let mut tasks = Vec::new();

        let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
        let sim_origin = format!("http://{}", sim_listener.local_addr()?);
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        let sim_config = opts.sim.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = nightshift_inference_sim::serve(sim_config, sim_listener, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("inference simulator failed: {e}");
            }
        }));
        let routing = opts.routing.clone().unwrap_or_else(|| RoutingConfig {
            upstreams: vec![UpstreamConfig {
                max_attempts: 3,
                max_concurrency: opts.upstream_max_concurrency,
                initial_concurrency: Some(opts.upstream_max_concurrency.min(8)),
                backoff_base: Duration::from_millis(5),
                backoff_max: Duration::from_millis(50),
                ..UpstreamConfig::new("sim", format!("{sim_origin}/v1"), TEST_MODELS)
            }],
        });

        let sched_listener = TcpListener::bind("127.0.0.1:0").await?;
        let sched_addr = sched_listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        let sched_config = SchedulerConfig {
            listen: sched_addr,
            // tests drive sweeps themselves (sweep_once) so nothing races them
            sweep_interval: Duration::from_secs(3600),
            batches: opts.batches.clone(),
            pipeline: nightshift_scheduler::pipeline::PipelineSettings {
                dispatch_interval: Duration::from_millis(100),
                expiry_interval: Duration::from_millis(200),
                finalize_retry_after: opts.finalize_retry_after,
                ..Default::default()
            },
            ..SchedulerConfig::default()
        };
        let sched_routing = routing.clone();
        let sched_ports = ports.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = nightshift_scheduler::serve(
                sched_config,
                sched_routing,
                sched_ports,
                sched_listener,
                async {
                    let _ = rx.await;
                },
            )
            .await
            {
                panic!("scheduler failed: {e}");
            }
        }));

        let gw_listener = TcpListener::bind("127.0.0.1:0").await?;
        let gw_addr = gw_listener.local_addr()?;
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        let gw_config = GatewayConfig {
            listen: gw_addr,
            scheduler_url: format!("http://{sched_addr}"),
            max_upload_bytes: opts.max_upload_bytes,
            completion_windows: opts.completion_windows.clone(),
            ..GatewayConfig::default()
        };
        let gw_storage: Arc<dyn ObjectStore> = storage.clone();
        let gw_state: Arc<dyn nightshift_state::LiveState> = state.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) =
                nightshift_gateway::serve(gw_config, gw_storage, gw_state, gw_listener, async {
                    let _ = rx.await;
                })
                .await
            {
                panic!("gateway failed: {e}");
            }
        }));

        for _ in 0..opts.executors {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let (tx, rx) = oneshot::channel::<()>();
            stops.push(tx);
            let ports = nightshift_executor::ExecutorPorts {
                storage: storage.clone(),
                queue: queue.clone(),
                state: state.clone(),
            };
            let routing = routing.clone();
            tasks.push(tokio::spawn(async move {
                let config = nightshift_executor::ExecutorConfig {
                    cancel_poll: Duration::from_millis(100),
                    ..Default::default()
                };
                if let Err(e) =
                    nightshift_executor::serve(config, routing, ports, listener, async {
                        let _ = rx.await;
                    })
                    .await
                {
                    panic!("executor failed: {e}");
                }
            }));
        }
        let stack = Self {
            origin: format!("http://{gw_addr}"),
            storage,
            metadata,
            queue,
            state,
            ports,
            sim_origin,
            scheduler_url: format!("http://{sched_addr}"),
            prefix,
            schema,
            stops,
            tasks,
        };
        let mut stack = stack;
        if opts.finalizer {
            stack.start_finalizer().await?;
        }
        stack.wait_ready().await?;
        Ok(stack)
    }

    /// Polls the gateway's `/readyz` (which checks the scheduler and storage) with a deadline.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let control = self.control()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if control.ping().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the scheduler did not become ready within 30s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a finalizer on this stack's queues.
    pub async fn start_finalizer(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (tx, rx) = oneshot::channel::<()>();
        self.stops.push(tx);
        let ports = nightshift_finalizer::FinalizerPorts {
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            state: self.state.clone(),
        };
        let config = nightshift_finalizer::FinalizerConfig {
            scheduler_url: self.scheduler_url.clone(),
            ..Default::default()
        };
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = nightshift_finalizer::serve(config, ports, listener, async {
                let _ = rx.await;
            })
            .await
            {
                panic!("finalizer failed: {e}");
            }
        }));
        Ok(())
    }

    pub fn control(&self) -> anyhow::Result<nightshift_gateway::ControlPlane> {
        Ok(nightshift_gateway::ControlPlane::connect_lazy(
            &self.scheduler_url,
            Duration::from_secs(10),
        )?)
    }

    /// A fresh tenant of this test: `(tenant id, api key)`.
    pub async fn tenant(&self, name: &str) -> anyhow::Result<(String, String)> {
        let resp = self
            .control()?
            .tenants()
            .create_tenant(CreateTenantRequest {
                name: format!("{}-{name}", self.prefix),
                api_key: None,
            })
            .await?
            .into_inner();
        Ok((resp.tenant_id, resp.api_key))
    }

    /// Like [`Stack::python`], run from `tests/python/<dir>` (scripts that open relative
    /// paths, like seed 001's).
    pub async fn python_in(
        &self,
        dir: &str,
        script: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<String> {
        self.run_python(Some(dir), script, env).await
    }

    /// Runs a Python script of `tests/python/` with the SDK virtualenv, this stack's URLs in
    /// `NS_ORIGIN` / `NS_BASE_URL`, and `env`. Fails with its output unless it exits 0.
    pub async fn python(&self, script: &str, env: &[(&str, String)]) -> anyhow::Result<String> {
        self.run_python(None, script, env).await
    }

    async fn run_python(
        &self,
        dir: Option<&str>,
        script: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<String> {
        run_python(&self.origin, dir, script, env).await
    }

    /// Keys of every object under this test's prefix.
    pub async fn object_keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .storage
            .list(prefix)
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect())
    }

    /// Stops both services and deletes what the test stored.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        for task in self.tasks.drain(..) {
            task.await?;
        }
        self.storage.delete_prefix("").await?;
        self.queue.delete_all().await?;
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(self.metadata.pool())
            .await?;
        Ok(())
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn python_dir() -> PathBuf {
    repo_root().join("tests/python")
}

/// The virtualenv with the `openai` SDK: `NIGHTSHIFT_E2E_PYTHON`, else the one `make test`
/// creates under `target/`.
pub fn python_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var("NIGHTSHIFT_E2E_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/e2e-venv/bin/python"));
    if !path.exists() {
        bail!(
            "no Python with the openai SDK at {} — run `make test` (it creates it) or set NIGHTSHIFT_E2E_PYTHON",
            path.display()
        );
    }
    Ok(path)
}

/// Runs a Python script of `tests/python/` (from `dir` if given) with the SDK virtualenv,
/// the stack at `origin` in `NS_ORIGIN` / `NS_BASE_URL`, and `env`. Fails with its output
/// unless it exits 0.
pub async fn run_python(
    origin: &str,
    dir: Option<&str>,
    script: &str,
    env: &[(&str, String)],
) -> anyhow::Result<String> {
    let path = python_dir().join(script);
    let mut cmd = tokio::process::Command::new(python_bin()?);
    if let Some(dir) = dir {
        cmd.current_dir(python_dir().join(dir));
    }
    cmd.arg(&path)
        .env("PYTHONPATH", python_dir())
        .env("NS_ORIGIN", origin)
        .env("NS_BASE_URL", format!("{}/v1", origin))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .context("python script timed out after 300s")??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{script} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            out.status
        );
    }
    Ok(stdout)
}
