//! The end-to-end harness. Each test starts a whole deployment of its own in-process, on
//! ephemeral loopback ports, once per [`Deployment`] ([`for_both_deployments!`]), both through
//! the product's one wiring ([`nightshift_standalone::Services`]):
//! - distributed: every service over the REAL adapters (PostgreSQL, the S3 service, RabbitMQ
//!   and Redis that `make up`/`make test` start), built from a configuration as `nightshift
//!   <service>` builds them ([`nightshift_cli::ports`]), isolated by a Postgres schema, an
//!   object-storage prefix, queue names and a Redis key prefix of its own;
//! - standalone: `nightshift standalone` itself ([`Standalone`]) over the embedded adapters,
//!   in a temporary data directory.
//!
//! Tests run in parallel. Clients are the official `openai` Python SDK (run from the
//! virtualenv `make test` prepares) and direct port access (through the traits, so the same
//! check runs on both deployments) for what a client cannot see ("nothing was left behind").

pub mod cluster;
mod eventually;
pub mod http;
pub mod infra;

pub use eventually::eventually;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_cli::config::Config;
use nightshift_cli::ports;
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_core::secret::Secret;
use nightshift_executor::ExecutorConfig;
use nightshift_gateway::GatewayConfig;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::{MetadataStore, PgConfig, PgStore};
use nightshift_proto::client::SchedulerClient;
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_queue::{QueueConfig, RabbitQueue, WorkQueue};
use nightshift_scheduler::batches::BatchSettings;
use nightshift_scheduler::{SchedulerConfig, SchedulerPorts};
use nightshift_standalone::{ServiceConfigs, ServicePorts, Services, Standalone, StandaloneConfig};
use nightshift_state::{LiveState, StateConfig};
use nightshift_storage::{ObjectStore, S3Config};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// Which deployment a test runs against. The suite runs every test against both, so they
/// cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// Each service on its own, on the real adapters: PostgreSQL, S3 (Garage), RabbitMQ, Redis.
    Distributed,
    /// `nightshift standalone`'s wiring ([`nightshift_standalone::Standalone`]): one process,
    /// the embedded adapters (a directory, SQLite, the in-process queue, in-memory counts) in a
    /// temporary data directory.
    Standalone,
}

/// Declares the listed `async fn name(deployment: Deployment)` tests once per deployment:
/// `distributed::name` and `standalone::name`.
#[macro_export]
macro_rules! for_both_deployments {
    ($($name:ident),+ $(,)?) => {
        mod distributed {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Deployment::Distributed).await
                }
            )+
        }
        mod standalone {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Deployment::Standalone).await
                }
            )+
        }
    };
}

/// Knobs a test may turn.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub deployment: Deployment,
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
    /// Ceiling of requests in flight to the simulator (`max_concurrency`: one cap shared by
    /// every executor).
    pub upstream_max_concurrency: u32,
    /// Start the finalizer with the stack (else [`Stack::start_finalizer`] does later).
    pub finalizer: bool,
    /// The scheduler's grace period before re-publishing an unfinished finalize job.
    pub finalize_retry_after: Duration,
    /// Webhook delivery: by default private addresses are allowed (receivers in tests listen
    /// on loopback) and retries come within seconds.
    pub webhooks: nightshift_scheduler::webhooks::WebhookSettings,
    /// The gateway's HTTP/1 header-read (and keep-alive idle) timeout.
    pub header_read_timeout: Duration,
    /// Distributed only: Redis at this URL instead of the shared one (a private instance a
    /// test stops).
    pub state_url: Option<String>,
    /// The scheduler's default per-tenant quotas (`[scheduler.quotas]`).
    pub quotas: nightshift_scheduler::QuotaSettings,
}

impl StackOptions {
    /// The defaults, on `deployment`.
    pub fn on(deployment: Deployment) -> Self {
        Self {
            deployment,
            ..Self::default()
        }
    }
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            deployment: Deployment::Distributed,
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
            webhooks: nightshift_scheduler::webhooks::WebhookSettings {
                allow_private_addresses: true,
                backoff_base: Duration::from_secs(1),
                backoff_max: Duration::from_secs(2),
                poll_interval: Duration::from_millis(100),
                timeout: Duration::from_secs(5),
                ..Default::default()
            },
            header_read_timeout: GatewayConfig::default().header_read_timeout,
            state_url: None,
            quotas: nightshift_scheduler::QuotaSettings::default(),
        }
    }
}

/// What only one deployment has.
enum Backend {
    Distributed {
        services: Box<Services>,
        /// The harness's own connection to this test's schema: time travel, and the clean-up.
        pg: Arc<PgStore>,
        /// The harness's own connection to this test's queues, to delete them at the end.
        rabbit: Arc<RabbitQueue>,
        /// This test's Postgres schema (dropped at the end).
        schema: String,
    },
    Standalone {
        running: Box<Standalone>,
        _data_dir: tempfile::TempDir,
    },
}

/// A running deployment: gateway, scheduler, executors, finalizer, and the simulator they call.
pub struct Stack {
    pub deployment: Deployment,
    /// `http://127.0.0.1:<port>` (no `/v1`).
    pub origin: String,
    /// The object store (under this test's prefix).
    pub storage: Arc<dyn ObjectStore>,
    pub metadata: Arc<dyn MetadataStore>,
    pub queue: Arc<dyn WorkQueue>,
    pub state: Arc<dyn LiveState>,
    /// The scheduler's ports (for the sweeps a test drives itself).
    pub ports: SchedulerPorts,
    /// The simulator's base URL (`http://127.0.0.1:<port>`).
    pub sim_origin: String,
    /// `http://127.0.0.1:<port>` of the gateway's ops endpoints (`/livez`, `/readyz`,
    /// `/metrics` — of the whole process: every service of the stack shares its registry).
    pub ops_origin: String,
    pub scheduler_url: String,
    /// `http://127.0.0.1:<port>` of the scheduler's ops endpoints (its `/readyz`).
    pub scheduler_ops_origin: String,
    /// The token the scheduler's gRPC calls must carry ([`Stack::control`] sends it).
    pub internal_token: Secret,
    /// Unique per test: object-storage prefix and tenant names.
    pub prefix: String,
    backend: Backend,
    /// Stops the simulator, once the deployment has stopped.
    sim_stop: CancellationToken,
    sim_task: Option<JoinHandle<()>>,
}

/// The in-process simulator every test stack calls.
async fn start_sim(
    config: SimConfig,
    stop: CancellationToken,
) -> anyhow::Result<(String, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        if let Err(e) = nightshift_inference_sim::serve(config, listener, stop).await {
            panic!("inference simulator failed: {e}");
        }
    });
    Ok((origin, task))
}

fn gateway_config(opts: &StackOptions) -> GatewayConfig {
    GatewayConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_upload_bytes: opts.max_upload_bytes,
        completion_windows: opts.completion_windows.clone(),
        header_read_timeout: opts.header_read_timeout,
        ..GatewayConfig::default()
    }
}

fn scheduler_config(opts: &StackOptions) -> SchedulerConfig {
    SchedulerConfig {
        // tests drive sweeps themselves (sweep_once) so nothing races them
        sweep_interval: Duration::from_secs(3600),
        batches: opts.batches.clone(),
        pipeline: nightshift_scheduler::pipeline::PipelineSettings {
            dispatch_interval: Duration::from_millis(100),
            expiry_interval: Duration::from_millis(200),
            finalize_retry_after: opts.finalize_retry_after,
            ..Default::default()
        },
        webhooks: opts.webhooks.clone(),
        quotas: opts.quotas,
        ..SchedulerConfig::default()
    }
}

fn executor_config() -> ExecutorConfig {
    ExecutorConfig {
        cancel_poll: Duration::from_millis(100),
        ..Default::default()
    }
}

impl Stack {
    pub async fn start(opts: StackOptions) -> anyhow::Result<Self> {
        nightshift_telemetry::init(&nightshift_telemetry::TelemetryConfig {
            log_format: nightshift_telemetry::LogFormat::Pretty,
            log_filter: "warn".into(),
        });
        let sim_stop = CancellationToken::new();
        let (sim_origin, sim_task) = start_sim(opts.sim.clone(), sim_stop.clone()).await?;
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
        // Both return once the scheduler answers.
        let mut stack = match opts.deployment {
            Deployment::Distributed => Self::distributed(&opts, routing, sim_origin).await?,
            Deployment::Standalone => Self::standalone(&opts, routing, sim_origin).await?,
        };
        stack.sim_stop = sim_stop;
        stack.sim_task = Some(sim_task);
        Ok(stack)
    }

    async fn standalone(
        opts: &StackOptions,
        routing: RoutingConfig,
        sim_origin: String,
    ) -> anyhow::Result<Self> {
        let data_dir = tempfile::tempdir()?;
        let mut config = StandaloneConfig::new(data_dir.path());
        config.services = ServiceConfigs {
            gateway: gateway_config(opts),
            scheduler: scheduler_config(opts),
            executor: executor_config(),
            finalizer: Default::default(),
            executors: opts.executors,
            finalizer_enabled: opts.finalizer,
        };
        config.services.set_routing(routing);
        let running = Standalone::start(config, CancellationToken::new())
            .await
            .context("standalone deployment")?;
        let ports = running.ports.clone();
        Ok(Self {
            deployment: Deployment::Standalone,
            origin: running.origin.clone(),
            storage: ports.storage.clone(),
            metadata: ports.metadata.clone(),
            queue: ports.queue.clone(),
            state: ports.state.clone(),
            ports: ports.scheduler(),
            sim_origin,
            ops_origin: running.ops_origin.clone(),
            scheduler_url: running.scheduler_url.clone(),
            scheduler_ops_origin: running.scheduler_ops_origin.clone(),
            internal_token: running.internal_token.clone(),
            prefix: format!("e2e/{}", uuid::Uuid::new_v4()),
            backend: Backend::Standalone {
                running: Box::new(running),
                _data_dir: data_dir,
            },
            sim_stop: CancellationToken::new(),
            sim_task: None,
        })
    }

    /// The distributed deployment: a configuration of this test's own (its S3 prefix, schema,
    /// queue names and Redis prefix), validated, each service's ports built from it as
    /// `nightshift <service>` builds them, and the services started by the product's wiring.
    async fn distributed(
        opts: &StackOptions,
        routing: RoutingConfig,
        sim_origin: String,
    ) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("e2e/{id}");
        let schema = format!("e2e_{id}");
        let mut config = Config {
            storage: s3_config(&prefix),
            metadata: PgConfig {
                schema: Some(schema.clone()),
                ..pg_config()
            },
            queue: QueueConfig {
                prefix: format!("e2e-{id}"),
                ..QueueConfig::default()
            },
            state: StateConfig {
                key_prefix: format!("e2e:{id}:"),
                ttl: Duration::from_secs(3600),
                url: opts
                    .state_url
                    .clone()
                    .map_or_else(|| StateConfig::default().url, Secret::new),
            },
            gateway: gateway_config(opts),
            scheduler: scheduler_config(opts),
            executor: executor_config(),
            ..Config::default()
        };
        config.set_routing(routing);
        config.validate().map_err(anyhow::Error::msg)?;

        ports::storage(&config)
            .await?
            .ping()
            .await
            .context("object storage is not reachable: run `make up` (or `make test`)")?;
        let pg = ports::metadata(&config)
            .await
            .context("postgres is not reachable: run `make up` (or `make test`)")?;
        let rabbit = ports::queue(&config)
            .await
            .context("rabbitmq is not reachable: run `make up` (or `make test`)")?;
        let service_ports = ServicePorts {
            gateway: ports::gateway(&config).await?,
            scheduler: ports::scheduler(&config).await?,
            executor: ports::executor(&config).await?,
            finalizer: ports::finalizer(&config).await?,
        };
        let scheduler = service_ports.scheduler.clone();
        let services = Services::start(
            ServiceConfigs {
                gateway: config.gateway,
                scheduler: config.scheduler,
                executor: config.executor,
                finalizer: config.finalizer,
                executors: opts.executors,
                finalizer_enabled: opts.finalizer,
            },
            service_ports,
            CancellationToken::new(),
        )
        .await
        .context("distributed deployment")?;
        Ok(Self {
            deployment: Deployment::Distributed,
            origin: format!("http://{}", services.gateway_addr),
            storage: scheduler.storage.clone(),
            metadata: scheduler.metadata.clone(),
            queue: scheduler.queue.clone(),
            state: scheduler.state.clone(),
            ports: scheduler,
            sim_origin,
            ops_origin: format!("http://{}", services.gateway_ops_addr),
            scheduler_url: services.scheduler_url.clone(),
            scheduler_ops_origin: format!("http://{}", services.scheduler_ops_addr),
            internal_token: services.internal_token.clone(),
            prefix,
            backend: Backend::Distributed {
                services: Box::new(services),
                pg,
                rabbit,
                schema,
            },
            sim_stop: CancellationToken::new(),
            sim_task: None,
        })
    }

    /// Starts a finalizer on this stack's queues.
    pub async fn start_finalizer(&mut self) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::Standalone { running, .. } => running.start_finalizer().await?,
            Backend::Distributed { services, .. } => services.start_finalizer().await?,
        }
        Ok(())
    }

    /// A client of the scheduler, with the internal token.
    pub fn control(&self) -> anyhow::Result<SchedulerClient> {
        Ok(
            SchedulerClient::connect_lazy(&self.scheduler_url, Duration::from_secs(10))?
                .with_token(Some(&self.internal_token))?,
        )
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

    /// Moves a file's expiry `secs` into the past, straight in the metadata database (time
    /// travel for expiry tests; no API does it).
    pub async fn age_file(&self, id: &str, secs: i64) -> anyhow::Result<()> {
        let changed = match &self.backend {
            Backend::Distributed { pg, .. } => {
                sqlx::query("UPDATE files SET expires_at = expires_at - $1 WHERE id = $2")
                    .bind(secs)
                    .bind(id)
                    .execute(pg.pool())
                    .await?
                    .rows_affected()
            }
            Backend::Standalone { running, .. } => {
                sqlx::query("UPDATE files SET expires_at = expires_at - ?1 WHERE id = ?2")
                    .bind(secs)
                    .bind(id)
                    .execute(running.ports.metadata.pool())
                    .await?
                    .rows_affected()
            }
        };
        anyhow::ensure!(changed == 1, "no file {id} with an expiry");
        Ok(())
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

    /// Standalone only: the data directory (objects, metadata, queue) of the deployment.
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        match &self.backend {
            Backend::Standalone { running, .. } => Some(&running.data_dir),
            Backend::Distributed { .. } => None,
        }
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

    /// Stops every service and deletes what the test stored.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        match self.backend {
            Backend::Distributed {
                services,
                pg,
                rabbit,
                schema,
            } => {
                services.stop().await?;
                self.storage.delete_prefix("").await?;
                rabbit.delete_all().await?;
                let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(pg.pool())
                    .await?;
            }
            // The data directory goes with the TempDir.
            Backend::Standalone { running, .. } => running.stop().await?,
        }
        self.sim_stop.cancel();
        if let Some(task) = self.sim_task.take() {
            task.await?;
        }
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

/// Time travel and fault injection for the reliability tests, straight in the metadata
/// database (as [`Stack::age_file`]: no API does these).
impl Stack {
    /// Runs one update on this stack's metadata database: `postgres` (`$n` parameters) on the
    /// distributed deployment, `sqlite` (`?n`) on the standalone one, with `text` bound first
    /// and `number` second. Returns the rows changed.
    async fn update_metadata(
        &self,
        postgres: &'static str,
        sqlite: &'static str,
        text: &str,
        number: i64,
    ) -> anyhow::Result<u64> {
        Ok(match &self.backend {
            Backend::Distributed { pg, .. } => sqlx::query(postgres)
                .bind(text)
                .bind(number)
                .execute(pg.pool())
                .await?
                .rows_affected(),
            Backend::Standalone { running, .. } => sqlx::query(sqlite)
                .bind(text)
                .bind(number)
                .execute(running.ports.metadata.pool())
                .await?
                .rows_affected(),
        })
    }

    /// Ends the lease of a dispatched chunk now, as if its executor had been silent for a
    /// whole `chunk_lease`: the scheduler's next lease sweep deals with it.
    pub async fn expire_chunk_lease(&self, batch: &str, chunk: u32) -> anyhow::Result<()> {
        let changed = self
            .update_metadata(
                "UPDATE chunks SET lease_until = 0 WHERE batch_id = $1 AND idx = $2 \
                 AND state = 'dispatched'",
                "UPDATE chunks SET lease_until = 0 WHERE batch_id = ?1 AND idx = ?2 \
                 AND state = 'dispatched'",
                batch,
                i64::from(chunk),
            )
            .await?;
        anyhow::ensure!(changed == 1, "chunk {chunk} of {batch} is not dispatched");
        Ok(())
    }

    /// Moves a batch's deadline (`expires_at`) and cancel time (`cancelling_at`, if set)
    /// `secs` into the past, as if its life had begun that much earlier: a deadline or an
    /// ending grace passes at once.
    pub async fn age_batch(&self, batch: &str, secs: i64) -> anyhow::Result<()> {
        let changed = self
            .update_metadata(
                "UPDATE batches SET expires_at = expires_at - $2, \
                 cancelling_at = cancelling_at - $2 WHERE id = $1",
                "UPDATE batches SET expires_at = expires_at - ?2, \
                 cancelling_at = cancelling_at - ?2 WHERE id = ?1",
                batch,
                secs,
            )
            .await?;
        anyhow::ensure!(changed == 1, "no batch {batch}");
        Ok(())
    }
}
