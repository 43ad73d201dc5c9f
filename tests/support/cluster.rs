//! A stack of real `nightshift` processes (the binary `make test` builds), so tests can
//! `kill -9` a service mid-batch and start a fresh one. Isolated like [`crate::Stack`]: its own
//! Postgres schema, object-storage prefix, queue names and Redis key prefix, written into a
//! config file of its own; the inference simulator runs in-process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::PgStore;
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_queue::{QueueConfig, RabbitQueue};
use nightshift_state::{RedisState, StateConfig};
use nightshift_storage::{ObjectStore, S3Store};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::{pg_config, s3_config};

/// A free loopback port (bound and released: fine for tests on one machine).
async fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
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
    pub storage: Arc<S3Store>,
    pub metadata: Arc<PgStore>,
    pub state: Arc<RedisState>,
    queue: Arc<RabbitQueue>,
    schema: String,
    config: PathBuf,
    _dir: tempfile::TempDir,
    /// Ops port of each service instance (executors get one each).
    ports: HashMap<String, u16>,
    scheduler_url: String,
    children: HashMap<String, Child>,
    sim_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Cluster {
    /// Starts the simulator, then scheduler, finalizer, one executor (`executor-1`) and the
    /// gateway as processes, and waits until each answers `/readyz`.
    pub async fn start(sim: SimConfig) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("e2e/{id}");
        let schema = format!("e2e_{id}");
        let queue_prefix = format!("e2e-{id}");
        let key_prefix = format!("e2e:{id}:");

        let sim_listener = TcpListener::bind("127.0.0.1:0").await?;
        let sim_url = format!("http://{}/v1", sim_listener.local_addr()?);
        let (sim_stop, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = nightshift_inference_sim::serve(sim, sim_listener, async {
                let _ = rx.await;
            })
            .await;
        });

        let mut ports = HashMap::new();
        for name in ["gateway", "scheduler", "finalizer"] {
            ports.insert(name.to_owned(), free_port().await?);
        }
        let s3 = s3_config(&prefix);
        let pg = pg_config();
        let scheduler_url = format!("http://127.0.0.1:{}", ports["scheduler"]);
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
prefix = "{queue_prefix}"

[state]
key_prefix = "{key_prefix}"
ttl = "1h"

[gateway]
listen = "127.0.0.1:{gw}"
scheduler_url = "{scheduler_url}"

[scheduler]
listen = "127.0.0.1:{sched}"
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
            gw = ports["gateway"],
            sched = ports["scheduler"],
            fin = ports["finalizer"],
        );
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("nightshift.toml");
        std::fs::write(&config, toml)?;

        let storage = Arc::new(S3Store::new(&s3).await?);
        let metadata = Arc::new(
            PgStore::connect(&nightshift_metadata::PgConfig {
                schema: Some(schema.clone()),
                ..pg
            })
            .await?,
        );
        let state = Arc::new(
            RedisState::connect(&StateConfig {
                key_prefix,
                ..StateConfig::default()
            })
            .await?,
        );
        let queue = Arc::new(
            RabbitQueue::connect(&QueueConfig {
                prefix: queue_prefix,
                ..QueueConfig::default()
            })
            .await?,
        );
        let mut cluster = Self {
            origin: format!("http://127.0.0.1:{}", ports["gateway"]),
            storage,
            metadata,
            state,
            queue,
            schema,
            config,
            _dir: dir,
            ports,
            scheduler_url,
            children: HashMap::new(),
            sim_stop: Some(sim_stop),
        };
        for name in ["scheduler", "finalizer", "executor-1", "gateway"] {
            cluster.spawn(name).await?;
        }
        Ok(cluster)
    }

    /// Starts (or restarts) a service instance: `scheduler`, `gateway`, `finalizer`, or
    /// `executor-<n>`; returns once it is ready.
    pub async fn spawn(&mut self, name: &str) -> anyhow::Result<()> {
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
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if service == "executor" {
            cmd.env("NIGHTSHIFT_EXECUTOR__LISTEN", format!("127.0.0.1:{port}"));
        }
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        self.children.insert(name.to_owned(), child);
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if http_ok(&url).await {
                return Ok(());
            }
            if let Some(child) = self.children.get_mut(name)
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!("{name} exited during start-up: {status}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} not ready within 60s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ops port (`/livez`, `/readyz`, `/metrics`) of a service instance.
    pub fn port(&self, name: &str) -> u16 {
        self.ports.get(name).copied().unwrap_or_default()
    }

    /// `kill -9`: the process gets no chance to finish, ack, flush or clean up.
    pub async fn kill9(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self.children.remove(name).context("no such process")?;
        child.start_kill()?; // SIGKILL on unix
        child.wait().await?;
        Ok(())
    }

    /// A fresh tenant: its API key.
    pub async fn tenant(&self, name: &str) -> anyhow::Result<String> {
        let control = nightshift_gateway::ControlPlane::connect_lazy(
            &self.scheduler_url,
            Duration::from_secs(10),
        )?;
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

    /// Stops every process and deletes what the test left.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for (_, mut child) in self.children.drain() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        if let Some(tx) = self.sim_stop.take() {
            let _ = tx.send(());
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
