//! nightshift in one process.
//!
//! [`Standalone::start`] runs the gateway, the scheduler, executors and the finalizer through
//! the one wiring of every service in a process ([`Services`], also what the e2e harness's
//! distributed stack runs) on the embedded adapters of the four ports, all under one data
//! directory:
//!
//! | port | adapter | where |
//! | --- | --- | --- |
//! | object storage | [`LocalStore`] | `<data_dir>/objects/` |
//! | metadata | [`SqliteStore`] | `<data_dir>/metadata.db` |
//! | work queue | [`EmbeddedQueue`] (durable, same ack/redelivery contract as RabbitMQ) | `<data_dir>/queue.db` |
//! | live counts | [`MemoryState`] | memory |
//!
//! Restart safety comes from the same places as in the distributed stack: results are written
//! before their chunk task is acked, queue messages survive a crash (a delivered, unsettled
//! message is delivered again), and the scheduler's recovery at start re-publishes in-flight
//! chunks and finalize jobs. Live counts are in memory: after a restart they restart from the
//! chunks still to run, and the final counts, recomputed by the finalizer from the results, are
//! exact.
//!
//! The services still talk over loopback (the gateway and the finalizer call the scheduler's
//! gRPC API on an ephemeral `127.0.0.1` port): one code path for both deployments. Optionally
//! the inference simulator serves every model (`simulate`), and a progress reporter prints
//! batch state changes; both stop after the services.
//!
//! One process owns a data directory at a time: [`Standalone::start`] takes an exclusive lock
//! on `<data_dir>/lock` (released by the OS when the process dies, even by `kill -9`).
//!
//! While it runs, `<data_dir>/admin` (owner-readable only) holds the loopback scheduler's URL
//! and this run's internal token, so that `nightshift admin --data-dir <dir>` can administer
//! the running process (create tenants, set quotas, webhooks) as it would a deployment:
//! [`AdminAccess`]. It is removed when the process stops cleanly; a stale one (after a crash)
//! names a port nobody answers on, and the next start replaces it.

mod progress;
mod services;

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nightshift_core::apikey;
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_core::secret::Secret;
use nightshift_executor::ExecutorPorts;
use nightshift_finalizer::FinalizerPorts;
use nightshift_gateway::GatewayPorts;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::{SqliteConfig, SqliteStore};
use nightshift_queue::{EmbeddedQueue, EmbeddedQueueConfig};
use nightshift_scheduler::SchedulerPorts;
use nightshift_state::MemoryState;
use nightshift_storage::LocalStore;
use tokio_util::sync::CancellationToken;

pub use progress::{Progress, ProgressSettings};
pub use services::{ServiceConfigs, ServicePorts, Services};

/// The model pattern that routes every model to one upstream.
const ANY_MODEL: &str = "*";

/// Everything [`Standalone::start`] needs.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// Objects, metadata and queue live here (created if missing).
    pub data_dir: PathBuf,
    /// The services' settings, the routing table included (with
    /// [`simulate`](Self::simulate), every model goes to the built-in simulator instead). The
    /// scheduler's `bootstrap_api_key` is set to the [`api_key`](Self::api_key); the loopback
    /// addresses are set by the wiring.
    pub services: ServiceConfigs,
    /// Serve the built-in inference simulator on loopback and route every model to it.
    pub simulate: Option<SimConfig>,
    /// The API key of the `default` tenant. `None`: the key in `<data_dir>/api-key`, generated
    /// and saved there on the first start.
    pub api_key: Option<Secret>,
    /// How many times a queue message may return before it is dead-lettered.
    pub delivery_limit: u32,
    /// Print batch state changes and throughput on the terminal.
    pub progress: Option<ProgressSettings>,
}

impl StandaloneConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            services: ServiceConfigs::default(),
            simulate: None,
            api_key: None,
            delivery_limit: EmbeddedQueueConfig::default().delivery_limit,
            progress: None,
        }
    }
}

/// Routes every model to one OpenAI-compatible server (`base_url` ends in `/v1`), keeping the
/// tuning of `routing`'s first upstream (concurrency, timeouts, retries).
pub fn route_every_model(
    routing: &RoutingConfig,
    base_url: &str,
    api_key_env: Option<String>,
) -> RoutingConfig {
    let mut upstream = UpstreamConfig::new("upstream", base_url, [ANY_MODEL]);
    if let Some(tuned) = routing.upstreams.first() {
        upstream = UpstreamConfig {
            name: upstream.name,
            base_url: upstream.base_url,
            models: upstream.models,
            api_key_env: None,
            ..tuned.clone()
        };
    }
    upstream.api_key_env = api_key_env;
    RoutingConfig {
        upstreams: vec![upstream],
    }
}

/// Why the standalone deployment could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error(
        "data directory {0} is in use by another nightshift process (one process per data directory)"
    )]
    Locked(PathBuf),
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: {1}")]
    Port(&'static str, String),
    #[error("bind {0}: {1}")]
    Bind(SocketAddr, io::Error),
    #[error("{service} stopped: {message}")]
    Service {
        service: &'static str,
        message: String,
    },
}

type Result<T, E = StandaloneError> = std::result::Result<T, E>;

/// The embedded adapters under one data directory.
#[derive(Debug, Clone)]
pub struct EmbeddedPorts {
    pub storage: Arc<LocalStore>,
    pub metadata: Arc<SqliteStore>,
    pub queue: Arc<EmbeddedQueue>,
    pub state: Arc<MemoryState>,
}

impl EmbeddedPorts {
    /// Opens (creating when missing) the adapters under `data_dir`.
    pub async fn open(data_dir: &Path, delivery_limit: u32) -> Result<Self> {
        let storage = LocalStore::open(data_dir.join("objects"))
            .await
            .map_err(|e| StandaloneError::Port("object storage", e.to_string()))?;
        let metadata = SqliteStore::open(&SqliteConfig {
            path: data_dir.join("metadata.db"),
            ..SqliteConfig::default()
        })
        .await
        .map_err(|e| StandaloneError::Port("metadata", e.to_string()))?;
        let queue = EmbeddedQueue::open(&EmbeddedQueueConfig {
            path: data_dir.join("queue.db"),
            delivery_limit,
        })
        .await
        .map_err(|e| StandaloneError::Port("work queue", e.to_string()))?;
        Ok(Self {
            storage: Arc::new(storage),
            metadata: Arc::new(metadata),
            queue: Arc::new(queue),
            state: Arc::new(MemoryState::new()),
        })
    }

    /// The scheduler's view of the ports.
    pub fn scheduler(&self) -> SchedulerPorts {
        SchedulerPorts {
            metadata: self.metadata.clone(),
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            state: self.state.clone(),
        }
    }

    /// Every service's view of the ports.
    pub fn services(&self) -> ServicePorts {
        ServicePorts {
            gateway: GatewayPorts {
                storage: self.storage.clone(),
                state: self.state.clone(),
            },
            scheduler: self.scheduler(),
            executor: ExecutorPorts {
                storage: self.storage.clone(),
                queue: self.queue.clone(),
                state: self.state.clone(),
            },
            finalizer: FinalizerPorts {
                storage: self.storage.clone(),
                queue: self.queue.clone(),
                state: self.state.clone(),
            },
        }
    }
}

/// The whole product, running in this process.
pub struct Standalone {
    /// `http://<gateway address>` (the OpenAI base URL is this plus `/v1`).
    pub origin: String,
    /// The `default` tenant's API key.
    pub api_key: String,
    /// The scheduler's gRPC endpoint (loopback).
    pub scheduler_url: String,
    /// `http://<scheduler ops address>` (loopback): the scheduler's own `/livez`, `/readyz`
    /// and `/metrics` (the same registry as `ops_origin`'s).
    pub scheduler_ops_origin: String,
    /// The token its calls must carry (generated for this run unless configured).
    pub internal_token: Secret,
    /// `http://<gateway ops address>`: `/livez`, `/readyz`, `/metrics` (of the whole
    /// process).
    pub ops_origin: String,
    /// The simulator's origin, with [`StandaloneConfig::simulate`].
    pub sim_origin: Option<String>,
    pub ports: EmbeddedPorts,
    pub data_dir: PathBuf,
    /// The services, the simulator and the progress reporter.
    services: Services,
    /// Held until the services have stopped.
    _lock: File,
}

impl Standalone {
    /// Opens the data directory and starts every service; returns once the scheduler answers.
    /// Cancelling `shutdown` stops everything, in order (see [`Services`]).
    ///
    /// # Errors
    /// The data directory is unusable or locked, an adapter cannot be opened, or a service
    /// failed to start (the others are stopped first).
    pub async fn start(mut config: StandaloneConfig, shutdown: CancellationToken) -> Result<Self> {
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir).map_err(|source| StandaloneError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let lock = lock_data_dir(&data_dir)?;
        let api_key = match config.api_key.take().filter(|k| !k.is_empty()) {
            Some(key) => key.expose().to_owned(),
            None => saved_api_key(&data_dir)?,
        };
        let ports = EmbeddedPorts::open(&data_dir, config.delivery_limit).await?;

        let mut simulator = None;
        if let Some(sim) = config.simulate.take() {
            let listener = services::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
            let origin = format!("http://{}", services::local_addr(&listener)?);
            let routing = route_every_model(
                &config.services.executor.routing,
                &format!("{origin}/v1"),
                None,
            );
            config.services.set_routing(routing);
            simulator = Some((sim, listener, origin));
        }
        config.services.scheduler.bootstrap_api_key = Some(Secret::new(api_key.clone()));
        // Subscribed before the scheduler starts, so no batch is missed.
        let created = config
            .progress
            .is_some()
            .then(|| ports.metadata.subscribe_created());

        let services = Services::start(config.services, ports.services(), shutdown).await?;
        let sim_origin = simulator.map(|(sim, listener, origin)| {
            services.spawn_auxiliary("inference simulator", |stop| {
                nightshift_inference_sim::serve(sim, listener, stop)
            });
            origin
        });
        if let Some(settings) = config.progress {
            let mut progress = Progress::new(
                settings,
                ports.metadata.clone(),
                ports.state.clone(),
                Box::new(io::stdout()),
            );
            if let Some(created) = created {
                progress = progress.follow_created(created);
            }
            services.spawn_auxiliary("progress", |stop| async move {
                progress.run(stop).await;
                Ok::<(), std::convert::Infallible>(())
            });
        }

        AdminAccess {
            scheduler_url: services.scheduler_url.clone(),
            internal_token: services.internal_token.clone(),
        }
        .save(&data_dir)?;

        Ok(Self {
            origin: format!("http://{}", services.gateway_addr),
            api_key,
            scheduler_url: services.scheduler_url.clone(),
            scheduler_ops_origin: format!("http://{}", services.scheduler_ops_addr),
            internal_token: services.internal_token.clone(),
            ops_origin: format!("http://{}", services.gateway_ops_addr),
            sim_origin,
            ports,
            data_dir,
            services,
            _lock: lock,
        })
    }

    /// `http://<gateway>/v1`, what an OpenAI client's `base_url` is set to.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin)
    }

    /// Starts a(nother) finalizer on this process's queues.
    ///
    /// # Errors
    /// Its ops listener cannot be bound.
    pub async fn start_finalizer(&mut self) -> Result<()> {
        self.services.start_finalizer().await
    }

    /// Runs until the shutdown token is cancelled or a service fails; everything is stopped in
    /// order by then.
    ///
    /// # Errors
    /// The failure, or the first error a service returned while stopping.
    pub async fn join(self) -> Result<()> {
        let data_dir = self.data_dir.clone();
        let result = self.services.join().await;
        AdminAccess::remove(&data_dir);
        result
    }

    /// Cancels the shutdown token and [joins](Self::join).
    ///
    /// # Errors
    /// As [`Standalone::join`].
    pub async fn stop(self) -> Result<()> {
        let data_dir = self.data_dir.clone();
        let result = self.services.stop().await;
        AdminAccess::remove(&data_dir);
        result
    }
}

/// How to reach the scheduler of the `nightshift standalone` running on a data directory:
/// what `<data_dir>/admin` holds while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAccess {
    /// The scheduler's loopback gRPC endpoint.
    pub scheduler_url: String,
    /// The internal token its calls must carry.
    pub internal_token: Secret,
}

impl AdminAccess {
    const FILE: &str = "admin";

    /// Reads `<data_dir>/admin`.
    ///
    /// # Errors
    /// The file is missing (no standalone process has run there, or it stopped), unreadable
    /// or not what a standalone process writes.
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| StandaloneError::DataDir {
            path: path.clone(),
            source,
        })?;
        let mut scheduler_url = None;
        let mut internal_token = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("scheduler_url", value)) => scheduler_url = Some(value.trim().to_owned()),
                Some(("internal_token", value)) => {
                    internal_token = Some(Secret::new(value.trim().to_owned()));
                }
                _ => {}
            }
        }
        match (scheduler_url, internal_token) {
            (Some(scheduler_url), Some(internal_token))
                if !scheduler_url.is_empty() && !internal_token.expose().is_empty() =>
            {
                Ok(Self {
                    scheduler_url,
                    internal_token,
                })
            }
            _ => Err(StandaloneError::Config(format!(
                "{} does not name a scheduler_url and an internal_token",
                path.display()
            ))),
        }
    }

    /// Writes `<data_dir>/admin`, owner-readable only, replacing any earlier one atomically.
    fn save(&self, data_dir: &Path) -> Result<()> {
        write_private(
            data_dir,
            Self::FILE,
            &format!(
                "scheduler_url={}\ninternal_token={}\n",
                self.scheduler_url,
                self.internal_token.expose()
            ),
        )
    }

    /// Removes `<data_dir>/admin`; a failure only leaves a stale file the next start replaces.
    fn remove(data_dir: &Path) {
        let path = data_dir.join(Self::FILE);
        if let Err(error) = std::fs::remove_file(&path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %error, "could not remove the admin file");
        }
    }
}

/// Takes `<data_dir>/lock` exclusively for the life of the returned file.
fn lock_data_dir(data_dir: &Path) -> Result<File> {
    let path = data_dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StandaloneError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StandaloneError::Locked(data_dir.to_path_buf()))
        }
        Err(std::fs::TryLockError::Error(source)) => Err(StandaloneError::DataDir { path, source }),
    }
}

/// The key saved in `<data_dir>/api-key`, generated (and saved, owner-readable only) on first
/// use.
fn saved_api_key(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("api-key");
    let err = |source| StandaloneError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let key = apikey::generate();
    write_private(data_dir, "api-key", &format!("{key}\n"))?;
    Ok(key)
}

/// Writes `<data_dir>/<name>` durably and owner-readable only: a temp file, fsynced, renamed
/// over the old one.
fn write_private(data_dir: &Path, name: &str, contents: &str) -> Result<()> {
    use std::io::Write;
    let path = data_dir.join(name);
    let tmp = data_dir.join(format!("{name}.tmp"));
    let err = |source| StandaloneError::DataDir {
        path: path.clone(),
        source,
    };
    let mut options = OpenOptions::new();
    options.create(true).truncate(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `path` is readable and writable by its owner only (on Unix).
    fn assert_owner_only(path: &Path) {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        #[cfg(not(unix))]
        let _ = path;
    }

    #[test]
    fn the_api_key_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = saved_api_key(dir.path()).unwrap();
        assert!(first.starts_with(apikey::KEY_PREFIX));
        assert_eq!(saved_api_key(dir.path()).unwrap(), first);
        assert_owner_only(&dir.path().join("api-key"));
    }

    #[test]
    fn the_admin_access_is_saved_private_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(AdminAccess::load(dir.path()).is_err());
        let access = AdminAccess {
            scheduler_url: "http://127.0.0.1:4242".into(),
            internal_token: Secret::new("t0ken".to_owned()),
        };
        access.save(dir.path()).unwrap();
        assert_eq!(AdminAccess::load(dir.path()).unwrap(), access);
        assert_owner_only(&dir.path().join("admin"));
        AdminAccess::remove(dir.path());
        assert!(AdminAccess::load(dir.path()).is_err());
        std::fs::write(dir.path().join("admin"), "scheduler_url=http://x\n").unwrap();
        assert!(matches!(
            AdminAccess::load(dir.path()),
            Err(StandaloneError::Config(_))
        ));
    }

    #[test]
    fn a_data_dir_is_locked_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        assert!(matches!(
            lock_data_dir(dir.path()),
            Err(StandaloneError::Locked(_))
        ));
        drop(held);
        lock_data_dir(dir.path()).unwrap();
    }

    #[test]
    fn one_upstream_serves_every_model_and_keeps_the_configured_tuning() {
        let routing = RoutingConfig {
            upstreams: vec![UpstreamConfig {
                max_concurrency: 7,
                ..UpstreamConfig::new("vllm", "http://a/v1", ["m"])
            }],
        };
        let routing = route_every_model(&routing, "http://b:8000/v1", Some("KEY".into()));
        let [upstream] = routing.upstreams.as_slice() else {
            panic!("one upstream");
        };
        assert_eq!(upstream.base_url, "http://b:8000/v1");
        assert_eq!(upstream.models, [ANY_MODEL]);
        assert_eq!(upstream.max_concurrency, 7);
        assert_eq!(upstream.api_key_env.as_deref(), Some("KEY"));
    }
}
