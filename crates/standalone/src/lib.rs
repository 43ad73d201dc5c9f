//! nightshift in one process.
//!
//! [`Standalone::start`] runs the gateway, the scheduler, executors and the finalizer — the same
//! `serve` functions the distributed deployment runs, unchanged — on the embedded adapters of
//! the four ports, all under one data directory:
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
//! gRPC API on an ephemeral `127.0.0.1` port): one code path for both deployments.
//!
//! One process owns a data directory at a time: [`Standalone::start`] takes an exclusive lock
//! on `<data_dir>/lock` (released by the OS when the process dies, even by `kill -9`).

mod progress;

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nightshift_core::apikey;
use nightshift_core::routing::{RoutingConfig, UpstreamConfig};
use nightshift_core::secret::Secret;
use nightshift_executor::{ExecutorConfig, ExecutorPorts};
use nightshift_finalizer::{FinalizerConfig, FinalizerPorts};
use nightshift_gateway::GatewayConfig;
use nightshift_inference_sim::SimConfig;
use nightshift_metadata::{SqliteConfig, SqliteStore};
use nightshift_queue::{EmbeddedQueue, EmbeddedQueueConfig};
use nightshift_scheduler::{Ports, SchedulerConfig};
use nightshift_state::MemoryState;
use nightshift_storage::LocalStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use progress::{Progress, ProgressSettings};

/// The model pattern that routes every model to one upstream.
const ANY_MODEL: &str = "*";

/// Everything [`Standalone::start`] needs.
#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    /// Objects, metadata and queue live here (created if missing).
    pub data_dir: PathBuf,
    /// The HTTP API (`listen`; `scheduler_url` is set by [`Standalone::start`]).
    pub gateway: GatewayConfig,
    /// `listen` and `bootstrap_api_key` are set by [`Standalone::start`].
    pub scheduler: SchedulerConfig,
    /// `listen` (ops endpoints) is set by [`Standalone::start`].
    pub executor: ExecutorConfig,
    /// `listen` and `scheduler_url` are set by [`Standalone::start`].
    pub finalizer: FinalizerConfig,
    /// Which upstream serves which model. With [`simulate`](Self::simulate), every model goes
    /// to the built-in simulator instead.
    pub routing: RoutingConfig,
    /// Serve the built-in inference simulator on loopback and route every model to it.
    pub simulate: Option<SimConfig>,
    /// Executors in the process (they share the chunk queue). At least 1.
    pub executors: usize,
    /// Start the finalizer (tests may start it later with [`Standalone::start_finalizer`]).
    pub finalizer_enabled: bool,
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
            gateway: GatewayConfig::default(),
            scheduler: SchedulerConfig::default(),
            executor: ExecutorConfig::default(),
            finalizer: FinalizerConfig::default(),
            routing: RoutingConfig::default(),
            simulate: None,
            executors: 1,
            finalizer_enabled: true,
            api_key: None,
            delivery_limit: EmbeddedQueueConfig::default().delivery_limit,
            progress: None,
        }
    }

    /// Routes every model to one OpenAI-compatible server (`base_url` ends in `/v1`), keeping
    /// the configured routing's tuning of its first upstream (concurrency, timeouts, retries).
    pub fn with_upstream(mut self, base_url: &str, api_key_env: Option<String>) -> Self {
        let mut upstream = UpstreamConfig::new("upstream", base_url, [ANY_MODEL]);
        if let Some(tuned) = self.routing.upstreams.first() {
            upstream = UpstreamConfig {
                name: upstream.name,
                base_url: upstream.base_url,
                models: upstream.models,
                api_key_env: None,
                ..tuned.clone()
            };
        }
        upstream.api_key_env = api_key_env;
        self.routing = RoutingConfig {
            upstreams: vec![upstream],
        };
        self
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
    pub fn scheduler(&self) -> Ports {
        Ports {
            metadata: self.metadata.clone(),
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            state: self.state.clone(),
        }
    }

    fn executor(&self) -> ExecutorPorts {
        ExecutorPorts {
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            state: self.state.clone(),
        }
    }

    fn finalizer(&self) -> FinalizerPorts {
        FinalizerPorts {
            storage: self.storage.clone(),
            queue: self.queue.clone(),
            state: self.state.clone(),
        }
    }
}

/// One running service: a stop signal and its task.
struct Service {
    name: &'static str,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), String>>,
}

impl Service {
    fn spawn<F, E>(name: &'static str, run: impl FnOnce(BoxFuture<'static, ()>) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let (stop, mut rx) = watch::channel(false);
        let shutdown = async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        .boxed();
        let fut = run(shutdown);
        let task = tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) });
        Self { name, stop, task }
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.join().await
    }

    async fn join(self) -> Result<()> {
        let name = self.name;
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StandaloneError::Service {
                service: name,
                message,
            }),
            Err(e) => Err(StandaloneError::Service {
                service: name,
                message: e.to_string(),
            }),
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
    /// The simulator's origin, with [`StandaloneConfig::simulate`].
    pub sim_origin: Option<String>,
    pub ports: EmbeddedPorts,
    pub data_dir: PathBuf,
    finalizer_config: FinalizerConfig,
    /// In stop order: gateway, executors, finalizer, progress, scheduler, simulator.
    front: Vec<Service>,
    finalizers: Vec<Service>,
    back: Vec<Service>,
    _lock: File,
}

impl Standalone {
    /// Opens the data directory and starts every service; returns once the scheduler answers.
    pub async fn start(mut config: StandaloneConfig) -> Result<Self> {
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

        let mut back = Vec::new();
        let mut sim_origin = None;
        if let Some(sim) = config.simulate.take() {
            let listener = bind(loopback()).await?;
            let origin = format!("http://{}", local_addr(&listener)?);
            back.push(Service::spawn("inference simulator", |stop| {
                nightshift_inference_sim::serve(sim, listener, stop)
            }));
            config = config.with_upstream(&format!("{origin}/v1"), None);
            sim_origin = Some(origin);
        }
        config
            .routing
            .validate()
            .map_err(|e| StandaloneError::Config(format!("routing: {e}")))?;

        // The scheduler first: everything else talks to it.
        let listener = bind(loopback()).await?;
        let scheduler_addr = local_addr(&listener)?;
        let scheduler_url = format!("http://{scheduler_addr}");
        let scheduler_config = SchedulerConfig {
            listen: scheduler_addr,
            bootstrap_api_key: Some(Secret::new(api_key.clone())),
            ..config.scheduler.clone()
        };
        let sched_ports = ports.scheduler();
        let created = config
            .progress
            .is_some()
            .then(|| ports.metadata.subscribe_created());
        let routing = config.routing.clone();
        back.insert(
            0,
            Service::spawn("scheduler", |stop| {
                nightshift_scheduler::serve(scheduler_config, routing, sched_ports, listener, stop)
            }),
        );

        let mut front = Vec::new();
        let listener = bind(config.gateway.listen).await?;
        let origin = format!("http://{}", local_addr(&listener)?);
        let gateway_config = GatewayConfig {
            scheduler_url: scheduler_url.clone(),
            ..config.gateway.clone()
        };
        let (storage, state) = (ports.storage.clone(), ports.state.clone());
        front.push(Service::spawn("gateway", |stop| {
            nightshift_gateway::serve(gateway_config, storage, state, listener, stop)
        }));

        for _ in 0..config.executors.max(1) {
            let listener = bind(loopback()).await?;
            let executor_config = ExecutorConfig {
                listen: local_addr(&listener)?,
                ..config.executor.clone()
            };
            let (routing, exec_ports) = (config.routing.clone(), ports.executor());
            front.push(Service::spawn("executor", |stop| {
                nightshift_executor::serve(executor_config, routing, exec_ports, listener, stop)
            }));
        }

        if let Some(settings) = config.progress.take() {
            let mut progress = Progress::new(
                settings,
                ports.metadata.clone(),
                ports.state.clone(),
                Box::new(io::stdout()),
            );
            if let Some(created) = created {
                progress = progress.follow_created(created);
            }
            back.insert(
                0,
                Service::spawn("progress", |stop| async move {
                    progress.run(stop).await;
                    Ok::<(), std::convert::Infallible>(())
                }),
            );
        }

        let mut standalone = Self {
            origin,
            api_key,
            scheduler_url: scheduler_url.clone(),
            sim_origin,
            ports,
            data_dir,
            finalizer_config: FinalizerConfig {
                scheduler_url,
                ..config.finalizer.clone()
            },
            front,
            finalizers: Vec::new(),
            back,
            _lock: lock,
        };
        if config.finalizer_enabled {
            standalone.start_finalizer().await?;
        }
        standalone.wait_ready().await?;
        Ok(standalone)
    }

    /// `http://<gateway>/v1`, what an OpenAI client's `base_url` is set to.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin)
    }

    /// Starts a(nother) finalizer on this process's queues.
    pub async fn start_finalizer(&mut self) -> Result<()> {
        let listener = bind(loopback()).await?;
        let config = FinalizerConfig {
            listen: local_addr(&listener)?,
            ..self.finalizer_config.clone()
        };
        let ports = self.ports.finalizer();
        self.finalizers.push(Service::spawn("finalizer", |stop| {
            nightshift_finalizer::serve(config, ports, listener, stop)
        }));
        Ok(())
    }

    /// Waits until the scheduler answers (it runs its recovery before serving).
    async fn wait_ready(&mut self) -> Result<()> {
        let control = nightshift_proto::client::SchedulerClient::connect_lazy(
            &self.scheduler_url,
            Duration::from_secs(5),
        )
        .map_err(|e| StandaloneError::Config(format!("scheduler url: {e}")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if control.ping().await.is_ok() {
                return Ok(());
            }
            if let Some(failed) = self.failed_service().await {
                return Err(failed);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StandaloneError::Service {
                    service: "scheduler",
                    message: "did not answer within 60s of starting".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first service that ended on its own, with its error.
    async fn failed_service(&mut self) -> Option<StandaloneError> {
        for list in [&mut self.front, &mut self.finalizers, &mut self.back] {
            if let Some(i) = list.iter().position(|s| s.task.is_finished()) {
                let service = list.remove(i);
                let name = service.name;
                return Some(match service.join().await {
                    Err(e) => e,
                    Ok(()) => StandaloneError::Service {
                        service: name,
                        message: "ended unexpectedly".into(),
                    },
                });
            }
        }
        None
    }

    /// Runs until `shutdown` resolves (then stops in order) or a service fails (then stops the
    /// others and returns its error).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                () = &mut shutdown => return self.stop().await,
                _ = tick.tick() => {
                    if let Some(failed) = self.failed_service().await {
                        tracing::error!(error = %failed, "a service failed; stopping");
                        let _ = self.stop().await;
                        return Err(failed);
                    }
                }
            }
        }
    }

    /// Stops in order: the gateway and executors (in-flight chunks finish or are requeued),
    /// the finalizers, then the scheduler and the simulator. Returns the first error.
    pub async fn stop(mut self) -> Result<()> {
        let mut first_error = None;
        for group in [
            std::mem::take(&mut self.front),
            std::mem::take(&mut self.finalizers),
            std::mem::take(&mut self.back),
        ] {
            for service in &group {
                let _ = service.stop.send(true);
            }
            for service in group {
                if let Err(e) = service.stop().await {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StandaloneError::Bind(addr, e))
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| StandaloneError::Bind(loopback(), e))
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
    let tmp = data_dir.join("api-key.tmp");
    {
        use std::io::Write;
        let mut options = OpenOptions::new();
        options.create(true).truncate(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(err)?;
        writeln!(file, "{key}").map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = saved_api_key(dir.path()).unwrap();
        assert!(first.starts_with(apikey::KEY_PREFIX));
        assert_eq!(saved_api_key(dir.path()).unwrap(), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("api-key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
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
        let mut config = StandaloneConfig::new("/tmp/x");
        config.routing.upstreams = vec![UpstreamConfig {
            max_concurrency: 7,
            ..UpstreamConfig::new("vllm", "http://a/v1", ["m"])
        }];
        let config = config.with_upstream("http://b:8000/v1", Some("KEY".into()));
        let [upstream] = config.routing.upstreams.as_slice() else {
            panic!("one upstream");
        };
        assert_eq!(upstream.base_url, "http://b:8000/v1");
        assert_eq!(upstream.models, [ANY_MODEL]);
        assert_eq!(upstream.max_concurrency, 7);
        assert_eq!(upstream.api_key_env.as_deref(), Some("KEY"));
    }
}
