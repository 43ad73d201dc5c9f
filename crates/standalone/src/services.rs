//! Every service in this process, wired once.
//!
//! [`Services::start`] runs the gateway, the scheduler, `executors` executors and the finalizer
//! — their `serve` functions, unchanged — over whatever ports it is given. `nightshift
//! standalone` ([`crate::Standalone`]) gives it the embedded adapters; the e2e harness's
//! distributed stack gives it the real ones, built from the configuration as `nightshift
//! <service>` builds them. So the tests run the wiring the product runs.
//!
//! - The scheduler listens on an ephemeral loopback port; the gateway and the finalizers call
//!   it there over gRPC, as in the distributed deployment, in plain HTTP/2 (`[internal.tls]`
//!   is not used: nothing leaves the process). Its ops endpoints are on another ephemeral
//!   loopback port.
//! - The gateway listens where its configuration says (port 0: any free port), its API on
//!   `listen` and its ops endpoints on `ops_listen`.
//! - Every gRPC call carries the internal token: the configured one, else one generated for
//!   this run (nothing outside the process needs it).
//! - Each executor and finalizer serves its ops endpoints on an ephemeral loopback port.
//!
//! One [`CancellationToken`] stops everything, in order: the gateway and the executors (their
//! running chunks finish or are handed back), then the finalizers, then the scheduler, then
//! the auxiliary tasks of the caller ([`Services::spawn_auxiliary`]). A service that ends on
//! its own — it failed — cancels that token too, so the others stop and [`Services::join`]
//! returns its error.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nightshift_core::routing::RoutingConfig;
use nightshift_core::secret::Secret;
use nightshift_executor::{ExecutorConfig, ExecutorPorts};
use nightshift_finalizer::{FinalizerConfig, FinalizerPorts};
use nightshift_gateway::{GatewayConfig, GatewayPorts};
use nightshift_proto::client::SchedulerClient;
use nightshift_scheduler::{SchedulerConfig, SchedulerPorts};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::StandaloneError;

type Result<T, E = StandaloneError> = std::result::Result<T, E>;

/// How long [`Services::start`] waits for the scheduler to answer (it recovers the previous
/// run's work before it serves).
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The services' settings. The wiring sets the loopback addresses: the scheduler's `listen`,
/// the gateway's and the finalizers' `scheduler_url`, the executors' and the finalizers'
/// `listen`; and the internal token of all three, the scheduler's if set, else a fresh one.
#[derive(Debug, Clone)]
pub struct ServiceConfigs {
    pub gateway: GatewayConfig,
    pub scheduler: SchedulerConfig,
    pub executor: ExecutorConfig,
    pub finalizer: FinalizerConfig,
    /// Executors in the process (they share the chunk queue). At least 1.
    pub executors: usize,
    /// Start a finalizer with the others (tests may start it later with
    /// [`Services::start_finalizer`]).
    pub finalizer_enabled: bool,
}

impl Default for ServiceConfigs {
    fn default() -> Self {
        Self {
            gateway: GatewayConfig::default(),
            scheduler: SchedulerConfig::default(),
            executor: ExecutorConfig::default(),
            finalizer: FinalizerConfig::default(),
            executors: 1,
            finalizer_enabled: true,
        }
    }
}

impl ServiceConfigs {
    /// Routes models as `routing` says, for both services that read it (the scheduler
    /// validates batches against it, the executors call its upstreams).
    pub fn set_routing(&mut self, routing: RoutingConfig) {
        self.scheduler.routing = routing.clone();
        self.executor.routing = routing;
    }
}

/// Each service's view of the infrastructure (executors share theirs).
#[derive(Debug, Clone)]
pub struct ServicePorts {
    pub gateway: GatewayPorts,
    pub scheduler: SchedulerPorts,
    pub executor: ExecutorPorts,
    pub finalizer: FinalizerPorts,
}

/// The order in which the services stop.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// The gateway and the executors: no new requests, running chunks finish or are handed
    /// back.
    Front = 0,
    /// The finalizers: the jobs in hand finish (they call the scheduler).
    Finalizers = 1,
    /// The scheduler: it drains its calls and stops its background tasks.
    Scheduler = 2,
    /// What the caller added ([`Services::spawn_auxiliary`]).
    Auxiliary = 3,
}

const STAGES: usize = 4;

/// One spawned service.
struct Running {
    name: &'static str,
    task: JoinHandle<Result<()>>,
}

/// Who stops what, shared by [`Services`] and the task that stops them.
struct Supervisor {
    /// Cancelled by the caller, or by a service that ended on its own: everything stops.
    shutdown: CancellationToken,
    /// Per [`Stage`]: cancelled to stop the stage's services, one stage after the other.
    stops: [CancellationToken; STAGES],
    /// Per [`Stage`]: its services, until they are stopped.
    running: [Mutex<Vec<Running>>; STAGES],
    /// The first service that ended on its own, with its error.
    failure: Mutex<Option<StandaloneError>>,
}

impl Supervisor {
    fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            stops: Default::default(),
            running: Default::default(),
            failure: Mutex::new(None),
        }
    }

    /// Runs `serve` (given its stage's stop token) as a service of `stage`. If it ends before
    /// its stage is stopped, its error is kept as the failure and everything stops.
    fn spawn<F, E>(
        self: &Arc<Self>,
        stage: Stage,
        name: &'static str,
        serve: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let stop = self.stops[stage as usize].clone();
        let served = serve(stop.clone());
        let supervisor = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = served.await.map_err(|e| StandaloneError::Service {
                service: name,
                message: e.to_string(),
            });
            if stop.is_cancelled() {
                return result;
            }
            let error = result.err().unwrap_or(StandaloneError::Service {
                service: name,
                message: "ended unexpectedly".into(),
            });
            tracing::error!(%error, "a service failed; stopping");
            supervisor.fail(error);
            Ok(())
        });
        lock(&self.running[stage as usize]).push(Running { name, task });
    }

    fn fail(&self, error: StandaloneError) {
        lock(&self.failure).get_or_insert(error);
        self.shutdown.cancel();
    }

    /// Once `shutdown` is cancelled: stops the stages in order; the first failure, else the
    /// first error a service returned while stopping.
    async fn stop_in_order(&self) -> Result<()> {
        self.shutdown.cancelled().await;
        let mut first_error = None;
        for (stop, running) in self.stops.iter().zip(&self.running) {
            stop.cancel();
            let services = std::mem::take(&mut *lock(running));
            for Running { name, task } in services {
                let result = task.await.unwrap_or_else(|e| {
                    Err(StandaloneError::Service {
                        service: name,
                        message: e.to_string(),
                    })
                });
                if let Err(e) = result {
                    first_error.get_or_insert(e);
                }
            }
        }
        match lock(&self.failure).take().or(first_error) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The services, running; see the [module docs](self).
pub struct Services {
    /// Where the gateway listens.
    pub gateway_addr: SocketAddr,
    /// Where the gateway serves its ops endpoints (`/livez`, `/readyz`, `/metrics`).
    pub gateway_ops_addr: SocketAddr,
    /// The token the scheduler's gRPC calls carry ([`SchedulerClient::with_token`]).
    pub internal_token: Secret,
    /// `http://<scheduler address>` (loopback): its gRPC services.
    pub scheduler_url: String,
    /// Where the scheduler serves its ops endpoints (`/livez`, `/readyz`, `/metrics`).
    pub scheduler_ops_addr: SocketAddr,
    supervisor: Arc<Supervisor>,
    /// Stops the stages in order once the shutdown token is cancelled; its result is the run's.
    conductor: JoinHandle<Result<()>>,
    /// What a finalizer started later runs with (`scheduler_url` set).
    finalizer: (FinalizerConfig, FinalizerPorts),
}

impl Services {
    /// Starts every service; returns once the scheduler answers its health check. Cancelling
    /// `shutdown` stops them all, in order.
    ///
    /// # Errors
    /// A listener cannot be bound, or a service failed before the scheduler answered (the
    /// others are stopped first).
    pub async fn start(
        configs: ServiceConfigs,
        ports: ServicePorts,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let supervisor = Arc::new(Supervisor::new(shutdown));
        let conductor = tokio::spawn({
            let supervisor = Arc::clone(&supervisor);
            async move { supervisor.stop_in_order().await }
        });
        let internal_token = configs
            .scheduler
            .internal_token
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(nightshift_proto::auth::generate_token);
        let mut services = Self {
            gateway_addr: loopback(),
            gateway_ops_addr: loopback(),
            internal_token,
            scheduler_url: String::new(),
            scheduler_ops_addr: loopback(),
            supervisor,
            conductor,
            finalizer: (configs.finalizer.clone(), ports.finalizer.clone()),
        };
        let launched = services.launch(configs, ports).await;
        if let Err(error) = launched {
            services.supervisor.shutdown.cancel();
            return Err(services.join().await.err().unwrap_or(error));
        }
        Ok(services)
    }

    async fn launch(&mut self, configs: ServiceConfigs, ports: ServicePorts) -> Result<()> {
        // The scheduler first: everything else talks to it.
        let listener = bind(loopback()).await?;
        let scheduler_addr = local_addr(&listener)?;
        self.scheduler_url = format!("http://{scheduler_addr}");
        let ops_listener = bind(loopback()).await?;
        self.scheduler_ops_addr = local_addr(&ops_listener)?;
        let token = Some(self.internal_token.clone());
        let config = SchedulerConfig {
            listen: scheduler_addr,
            ops_listen: self.scheduler_ops_addr,
            internal_token: token.clone(),
            internal_tls: None,
            ..configs.scheduler
        };
        self.supervisor
            .spawn(Stage::Scheduler, "scheduler", |stop| {
                nightshift_scheduler::serve(config, ports.scheduler, listener, ops_listener, stop)
            });

        let listener = bind(configs.gateway.listen).await?;
        self.gateway_addr = local_addr(&listener)?;
        let ops_listener = bind(configs.gateway.ops_listen.unwrap_or_else(loopback)).await?;
        self.gateway_ops_addr = local_addr(&ops_listener)?;
        let config = GatewayConfig {
            listen: self.gateway_addr,
            ops_listen: Some(self.gateway_ops_addr),
            scheduler_url: self.scheduler_url.clone(),
            internal_token: token.clone(),
            internal_tls: None,
            ..configs.gateway
        };
        self.supervisor.spawn(Stage::Front, "gateway", |stop| {
            nightshift_gateway::serve(config, ports.gateway, listener, ops_listener, stop)
        });

        for _ in 0..configs.executors.max(1) {
            let listener = bind(loopback()).await?;
            let config = ExecutorConfig {
                listen: local_addr(&listener)?,
                ..configs.executor.clone()
            };
            let ports = ports.executor.clone();
            self.supervisor.spawn(Stage::Front, "executor", |stop| {
                nightshift_executor::serve(config, ports, listener, stop)
            });
        }

        self.finalizer.0.scheduler_url = self.scheduler_url.clone();
        self.finalizer.0.internal_token = token;
        self.finalizer.0.internal_tls = None;
        if configs.finalizer_enabled {
            self.start_finalizer().await?;
        }
        self.wait_ready().await
    }

    /// Starts a(nother) finalizer, stopped with the others.
    ///
    /// # Errors
    /// Its ops listener cannot be bound.
    pub async fn start_finalizer(&mut self) -> Result<()> {
        let listener = bind(loopback()).await?;
        let config = FinalizerConfig {
            listen: local_addr(&listener)?,
            ..self.finalizer.0.clone()
        };
        let ports = self.finalizer.1.clone();
        self.supervisor
            .spawn(Stage::Finalizers, "finalizer", |stop| {
                nightshift_finalizer::serve(config, ports, listener, stop)
            });
        Ok(())
    }

    /// Runs `run` (given its stop token) alongside the services; it is stopped after them. If
    /// it ends before, it has failed, and everything stops.
    pub fn spawn_auxiliary<F, E>(
        &self,
        name: &'static str,
        run: impl FnOnce(CancellationToken) -> F,
    ) where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.supervisor.spawn(Stage::Auxiliary, name, run);
    }

    /// Waits until the scheduler answers (it recovers before it serves), a service fails, or
    /// the services are asked to stop.
    async fn wait_ready(&self) -> Result<()> {
        let scheduler = SchedulerClient::connect_lazy(&self.scheduler_url, Duration::from_secs(5))
            .map_err(|e| StandaloneError::Config(format!("scheduler url: {e}")))?
            .with_token(Some(&self.internal_token))
            .map_err(|e| StandaloneError::Config(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        loop {
            if scheduler.ping().await.is_ok() {
                return Ok(());
            }
            if self.supervisor.shutdown.is_cancelled() {
                return Err(StandaloneError::Service {
                    service: "scheduler",
                    message: "stopped before it answered".into(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StandaloneError::Service {
                    service: "scheduler",
                    message: format!("did not answer within {READY_WITHIN:?} of starting"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the services have stopped — after the shutdown token was cancelled, or a
    /// service failed — and returns the failure, or the first error a service returned.
    ///
    /// # Errors
    /// As said.
    pub async fn join(self) -> Result<()> {
        self.conductor.await.unwrap_or_else(|e| {
            Err(StandaloneError::Service {
                service: "services",
                message: e.to_string(),
            })
        })
    }

    /// Cancels the shutdown token and [joins](Self::join).
    ///
    /// # Errors
    /// As [`Services::join`].
    pub async fn stop(self) -> Result<()> {
        self.supervisor.shutdown.cancel();
        self.join().await
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| StandaloneError::Bind(addr, e))
}

pub(crate) fn local_addr(listener: &TcpListener) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| StandaloneError::Bind(loopback(), e))
}
