//! A stack of real `nightshift` processes (the binary `make test` builds), so tests can
//! `kill -9` a service mid-batch, signal it, and start a fresh one. Isolated like
//! [`crate::Stack`]: its own Postgres schema, object-storage prefix, queue names and Redis key
//! prefix, written into a config file of its own; the inference simulator runs in-process.
//!
//! By default it runs on the shared dev infrastructure ([`Endpoints::shared`]); a test that
//! stops or restarts infrastructure passes the [`Endpoints`] of its own
//! [`PrivateInfra`](crate::infra::PrivateInfra) instead ([`ClusterOptions::endpoints`]).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_core::secret::Secret;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::{PgConfig, PgStore};
use nightshift_proto::client::SchedulerClient;
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_queue::{QueueConfig, RabbitQueue};
use nightshift_state::{RedisState, StateConfig};
use nightshift_storage::{ObjectStore, S3Config, S3Store};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::infra::free_port;
use crate::{eventually, pg_config, s3_config};

/// Where the infrastructure a [`Cluster`] runs on answers.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// A PostgreSQL database URL (the cluster works in a schema of its own there).
    pub postgres_url: String,
    /// `redis://host:port`.
    pub redis_url: String,
    /// `amqp://user:pass@host:port/vhost`.
    pub amqp_url: String,
    /// The S3 service and its credentials (`prefix` is ignored: each cluster has its own).
    pub s3: S3Config,
}

impl Endpoints {
    /// The shared dev stack `make infra` runs (overridable with the variables [`s3_config`]
    /// and [`pg_config`] read). Many tests use it at once: never stop it.
    pub fn shared() -> Self {
        Self {
            postgres_url: pg_config().url.expose().to_owned(),
            redis_url: StateConfig::default().url.expose().to_owned(),
            amqp_url: QueueConfig::default().url.expose().to_owned(),
            s3: s3_config(""),
        }
    }

    fn s3_config(&self, prefix: &str) -> S3Config {
        S3Config {
            prefix: prefix.to_owned(),
            ..self.s3.clone()
        }
    }

    fn pg_config(&self, schema: &str) -> PgConfig {
        PgConfig {
            url: Secret::new(self.postgres_url.clone()),
            schema: Some(schema.to_owned()),
            ..pg_config()
        }
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The in-process inference simulator's behaviour.
    pub sim: SimConfig,
    /// The infrastructure (default: the shared dev stack).
    pub endpoints: Endpoints,
    /// Configuration for every service, as `NIGHTSHIFT_<SECTION>__<KEY>` variables (they win
    /// over the harness's config file), e.g. `("NIGHTSHIFT_EXECUTOR__SHUTDOWN_GRACE", "45s")`.
    pub settings: Vec<(String, String)>,
    /// Executors started with the cluster (`executor-1` ...).
    pub executors: usize,
    /// Write each service's output (its logs, on stdout, and stderr) to `<dir>/<name>.log`
    /// (default: logs discarded, stderr to the test's).
    pub log_dir: Option<PathBuf>,
    /// The simulator upstream's `timeout` (unset: the default).
    pub upstream_timeout: Option<Duration>,
    /// Mutual TLS on the scheduler's gRPC API (`[internal.tls]`, the same files for every
    /// service; its URL is then `https://`). The harness's own client uses them too.
    pub internal_tls: Option<nightshift_proto::tls::TlsFiles>,
}

impl ClusterOptions {
    /// The defaults: `sim`, the shared infrastructure, one executor.
    pub fn new(sim: SimConfig) -> Self {
        Self {
            sim,
            endpoints: Endpoints::shared(),
            settings: Vec::new(),
            executors: 1,
            log_dir: None,
            upstream_timeout: None,
            internal_tls: None,
        }
    }

    /// Adds a `NIGHTSHIFT_<SECTION>__<KEY>` setting for every service.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.settings.push((key.to_owned(), value.to_string()));
        self
    }
}

/// The `nightshift` binary built by `make test` (or `NIGHTSHIFT_BIN`).
pub fn nightshift_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var("NIGHTSHIFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nightshift")
        });
    if !path.exists() {
        bail!(
            "{} is not built — run `make test` (it builds it) or `cargo build -p nightshift-cli`",
            path.display()
        );
    }
    Ok(path)
}

pub struct Cluster {
    /// `http://127.0.0.1:<gateway port>`.
    pub origin: String,
    /// The simulator's origin, `http://127.0.0.1:<port>` (`/sim/stats` counts its requests).
    pub sim_origin: String,
    pub storage: Arc<S3Store>,
    pub metadata: Arc<PgStore>,
    pub state: Arc<RedisState>,
    queue: Arc<RabbitQueue>,
    schema: String,
    config: PathBuf,
    _dir: tempfile::TempDir,
    /// Ops port of each service instance (executors get one each; the gateway's API is on
    /// `origin`).
    ports: HashMap<String, u16>,
    /// `http(s)://127.0.0.1:<the scheduler's gRPC port>`.
    scheduler_url: String,
    /// `[internal.tls]`, if set.
    internal_tls: Option<nightshift_proto::tls::TlsFiles>,
    /// What the scheduler's gRPC calls carry (`[internal] token`).
    internal_token: Secret,
    children: HashMap<String, Child>,
    settings: Vec<(String, String)>,
    log_dir: Option<PathBuf>,
    /// Stops the in-process simulator.
    sim_stop: CancellationToken,
}

impl Cluster {
    /// Uploads an embeddings batch of `lines` lines (`r-0`…) with the SDK and creates it
    /// (`tests/python/crash_create.py`).
    pub async fn create_embeddings_batch(
        &self,
        key: &str,
        lines: u64,
    ) -> anyhow::Result<nightshift_core::BatchId> {
        let out = crate::run_python(
            &self.origin,
            None,
            "crash_create.py",
            &[
                ("NS_API_KEY", key.to_owned()),
                ("NS_LINES", lines.to_string()),
            ],
        )
        .await
        .context("create phase")?;
        let v: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or_default()).context("result line")?;
        nightshift_core::BatchId::parse(v["batch"].as_str().context("batch id")?)
            .context("batch id")
    }

    /// Waits for the batch of [`create_embeddings_batch`](Self::create_embeddings_batch) to
    /// complete and checks every custom_id exactly once, with exact counts
    /// (`tests/python/crash_check.py`).
    pub async fn check_embeddings_batch(
        &self,
        key: &str,
        lines: u64,
        batch: &nightshift_core::BatchId,
    ) -> anyhow::Result<()> {
        crate::run_python(
            &self.origin,
            None,
            "crash_check.py",
            &[
                ("NS_API_KEY", key.to_owned()),
                ("NS_LINES", lines.to_string()),
                ("NS_BATCH", batch.to_string()),
            ],
        )
        .await
        .context("every custom_id exactly once")?;
        Ok(())
    }

    /// Starts the simulator, then scheduler, finalizer, one executor (`executor-1`) and the
    /// gateway as processes on the shared infrastructure, and waits until each answers
    /// `/readyz`.
    pub async fn start(sim: SimConfig) -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::new(sim)).await
    }

    /// Like [`Cluster::start`], as `options` say.
    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        let ClusterOptions {
            sim,
            endpoints,
            settings,
            executors,
            log_dir,
            upstream_timeout,
            internal_tls,
        } = options;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("e2e/{id}");
        let schema = format!("e2e_{id}");
        let queue_prefix = format!("e2e-{id}");
        let key_prefix = format!("e2e:{id}:");

        let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
        let sim_origin = format!("http://{}", sim_listener.local_addr()?);
        let sim_url = format!("{sim_origin}/v1");
        let sim_stop = CancellationToken::new();
        tokio::spawn(nightshift_inference_sim::serve(
            sim,
            sim_listener,
            sim_stop.clone(),
        ));

        let mut ports = HashMap::new();
        for name in ["gateway", "scheduler", "finalizer"] {
            ports.insert(name.to_owned(), free_port().await?);
        }
        let s3 = endpoints.s3_config(&prefix);
        let pg = endpoints.pg_config(&schema);
        let api_port = free_port().await?;
        let grpc_port = free_port().await?;
        let scheme = if internal_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let scheduler_url = format!("{scheme}://127.0.0.1:{grpc_port}");
        let tls_section = internal_tls
            .as_ref()
            .map(|tls| {
                format!(
                    "[internal.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                    tls.ca, tls.cert, tls.key
                )
            })
            .unwrap_or_default();
        let internal_token = nightshift_proto::auth::generate_token();
        let toml = format!(
            r#"
[telemetry]
log_format = "json"
log_filter = "warn"

[storage]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key_id = "{key_id}"
secret_access_key = "{secret}"
prefix = "{prefix}"

[metadata]
url = "{pg_url}"
schema = "{schema}"

[queue]
url = "{amqp_url}"
prefix = "{queue_prefix}"

[state]
url = "{redis_url}"
key_prefix = "{key_prefix}"
ttl = "1h"

[internal]
token = "{token}"

{tls_section}

[gateway]
listen = "127.0.0.1:{api_port}"
ops_listen = "127.0.0.1:{gw}"
scheduler_url = "{scheduler_url}"

[scheduler]
listen = "127.0.0.1:{grpc_port}"
ops_listen = "127.0.0.1:{sched}"
sweep_interval = "1h"

[scheduler.pipeline]
dispatch_interval = "100ms"
expiry_interval = "200ms"

[executor]
cancel_poll = "100ms"
shutdown_grace = "5s"

[finalizer]
listen = "127.0.0.1:{fin}"
scheduler_url = "{scheduler_url}"

[[routing.upstreams]]
name = "sim"
base_url = "{sim_url}"
models = ["*"]
max_attempts = 3
backoff_base = "5ms"
backoff_max = "50ms"
{upstream_timeout}
"#,
            endpoint = s3.endpoint.clone().unwrap_or_default(),
            region = s3.region,
            bucket = s3.bucket,
            key_id = s3.access_key_id.clone().unwrap_or_default(),
            secret = s3
                .secret_access_key
                .as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
            pg_url = pg.url.expose(),
            amqp_url = endpoints.amqp_url,
            redis_url = endpoints.redis_url,
            upstream_timeout = upstream_timeout
                .map(|t| format!("timeout = \"{}ms\"", t.as_millis()))
                .unwrap_or_default(),
            token = internal_token.expose(),
            gw = ports["gateway"],
            sched = ports["scheduler"],
            fin = ports["finalizer"],
        );
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("nightshift.toml");
        std::fs::write(&config, toml)?;

        let storage = Arc::new(S3Store::new(&s3).await?);
        let metadata = Arc::new(PgStore::connect(&pg).await?);
        let state = Arc::new(
            RedisState::connect(&StateConfig {
                url: Secret::new(endpoints.redis_url.clone()),
                key_prefix,
                ..StateConfig::default()
            })
            .await?,
        );
        let queue = Arc::new(
            RabbitQueue::connect(&QueueConfig {
                url: Secret::new(endpoints.amqp_url.clone()),
                prefix: queue_prefix,
                ..QueueConfig::default()
            })
            .await?,
        );
        if let Some(dir) = &log_dir {
            std::fs::create_dir_all(dir)?;
        }
        let mut cluster = Self {
            origin: format!("http://127.0.0.1:{api_port}"),
            sim_origin,
            storage,
            metadata,
            state,
            queue,
            schema,
            config,
            _dir: dir,
            ports,
            scheduler_url,
            internal_tls,
            internal_token,
            children: HashMap::new(),
            settings,
            log_dir,
            sim_stop,
        };
        cluster.spawn("scheduler").await?;
        cluster.spawn("finalizer").await?;
        for n in 1..=executors {
            cluster.spawn(&format!("executor-{n}")).await?;
        }
        cluster.spawn("gateway").await?;
        Ok(cluster)
    }

    /// Starts (or restarts) a service instance: `scheduler`, `gateway`, `finalizer`, or
    /// `executor-<n>`; returns once it is ready.
    pub async fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
        self.start_process(name).await?;
        self.wait_ready(name, Duration::from_secs(60)).await
    }

    /// Starts a service instance's process and returns at once (it may not be ready: its
    /// dependencies may be down).
    pub async fn start_process(&mut self, name: &str) -> anyhow::Result<()> {
        let service = name.split('-').next().unwrap_or(name);
        let port = match self.ports.get(name) {
            Some(p) => *p,
            None => {
                let p = free_port().await?;
                self.ports.insert(name.to_owned(), p);
                p
            }
        };
        let mut cmd = Command::new(nightshift_bin()?);
        cmd.arg("--config")
            .arg(&self.config)
            .arg(service)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in &self.settings {
            cmd.env(key, value);
        }
        if service == "executor" {
            cmd.env("NIGHTSHIFT_EXECUTOR__LISTEN", format!("127.0.0.1:{port}"));
        }
        match &self.log_dir {
            Some(dir) => {
                use std::io::Write;
                let mut log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{name}.log")))?;
                writeln!(log, "=== {} starting {name}", crate::infra::timestamp())?;
                // The services log to stdout; panics and start-up errors go to stderr.
                cmd.stdout(log.try_clone()?).stderr(log);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        self.children.insert(name.to_owned(), child);
        Ok(())
    }

    /// Waits until a started instance answers `/readyz`; fails if it exits first.
    pub async fn wait_ready(&mut self, name: &str, within: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port(name));
        let mut child = self.children.get_mut(name);
        // Ok(Some(status)): it exited, no use waiting on.
        let exited = eventually(&format!("{name} ready"), within, || {
            let exited = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let url = url.clone();
            async move {
                match exited {
                    Some(status) => Ok(Some(status)),
                    None if http_ok(&url).await => Ok(None),
                    None => Err("/readyz not answering 200"),
                }
            }
        })
        .await?;
        if let Some(status) = exited {
            bail!("{name} exited during start-up: {status}");
        }
        Ok(())
    }

    /// The ops port (`/livez`, `/readyz`, `/metrics`) of a service instance.
    pub fn port(&self, name: &str) -> u16 {
        self.ports.get(name).copied().unwrap_or_default()
    }

    /// `kill -9`: the process gets no chance to finish, ack, flush or clean up. Fails unless
    /// it was running and died of that signal.
    pub async fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self.children.remove(name).context("no such process")?;
        if let Some(status) = child.try_wait()? {
            bail!("{name} had already exited ({status}) before kill -9");
        }
        child.start_kill()?; // SIGKILL on unix
        let status = child.wait().await?;
        anyhow::ensure!(
            status.signal() == Some(9),
            "{name} did not die of SIGKILL: {status}"
        );
        Ok(())
    }

    /// The process id of a running instance.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name)?.id()
    }

    /// Sends `signal` (`TERM`, `INT`, ...) to an instance, like `kill -s <signal>`.
    pub fn signal(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("{name} is not running"))?;
        crate::infra::send_signal(&pid.to_string(), signal)
    }

    /// Waits up to `within` for an instance to exit; its exit status, or `None` if it still
    /// runs (it is then left running).
    pub async fn wait_exit(
        &mut self,
        name: &str,
        within: Duration,
    ) -> anyhow::Result<Option<ExitStatus>> {
        let child = self.children.get_mut(name).context("no such process")?;
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => {
                self.children.remove(name);
                Ok(Some(status?))
            }
            Err(_) => Ok(None),
        }
    }

    /// The instances that exited on their own since they were started, with their status
    /// (forgotten: [`Cluster::start_process`] starts them again).
    pub fn exited(&mut self) -> Vec<(String, ExitStatus)> {
        let mut gone = Vec::new();
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                gone.push((name.clone(), status));
            }
        }
        for (name, _) in &gone {
            self.children.remove(name);
        }
        gone
    }

    /// The names of the instances started and not known to have exited.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self.children.keys().cloned().collect();
        names.sort();
        names
    }

    /// The last `lines` lines an instance wrote to its log (with [`ClusterOptions::log_dir`]).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        self.log_dir
            .as_deref()
            .map(|dir| crate::infra::tail(&dir.join(format!("{name}.log")), lines))
            .unwrap_or_default()
    }

    /// The directory of the service logs (with [`ClusterOptions::log_dir`]).
    pub fn log_dir(&self) -> Option<&Path> {
        self.log_dir.as_deref()
    }

    /// The scheduler's gRPC endpoint (`https://` with [`ClusterOptions::internal_tls`]).
    pub fn scheduler_url(&self) -> &str {
        &self.scheduler_url
    }

    /// The token every call to the scheduler must carry.
    pub fn internal_token(&self) -> &Secret {
        &self.internal_token
    }

    /// A fresh tenant: its API key.
    pub async fn tenant(&self, name: &str) -> anyhow::Result<String> {
        let control = SchedulerClient::connect_lazy_tls(
            &self.scheduler_url,
            Duration::from_secs(10),
            self.internal_tls.as_ref(),
        )?
        .with_token(Some(&self.internal_token))?;
        Ok(control
            .tenants()
            .create_tenant(CreateTenantRequest {
                name: name.to_owned(),
                api_key: None,
            })
            .await?
            .into_inner()
            .api_key)
    }

    /// Kills every process and stops the simulator; leaves the data (for infrastructure that
    /// goes away with the test).
    pub async fn kill_all(&mut self) {
        for (_, mut child) in self.children.drain() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        self.sim_stop.cancel();
    }

    /// Stops every process and deletes what the test left.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.kill_all().await;
        self.storage.delete_prefix("").await?;
        self.queue.delete_all().await?;
        let drop = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
        sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(self.metadata.pool())
            .await?;
        Ok(())
    }
}

/// A GET that answers 2xx — a tiny HTTP/1.0 client, so the harness needs no HTTP crate.
async fn http_ok(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host)).await
    else {
        return false;
    };
    let req = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    if conn.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut head)).await,
        Ok(Ok(_)) if head.starts_with(b"HTTP/1.") && head[9] == b'2'
    )
}
