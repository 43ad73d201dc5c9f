//! The commands: `nightshift <service>` builds that service's ports from the configuration
//! ([`nightshift_cli::ports`]) and runs its `serve` until a signal; `nightshift standalone`
//! runs every service in this process ([`Standalone`]); `nightshift admin` calls the
//! scheduler. The configuration was validated before any of them runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nightshift_cli::config::Config;
use nightshift_cli::ports;
use nightshift_core::secret::Secret;
use nightshift_inference_sim::SimConfig;
use nightshift_proto::client::SchedulerClient;
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_standalone::{
    AdminAccess, ProgressSettings, ServiceConfigs, Standalone, StandaloneConfig, route_every_model,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a service without a `shutdown_grace` of its own may drain after the first
/// signal: the gateway's HTTP requests in flight, the scheduler's gRPC calls.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Time allowed past a service's drain period for its last settlements — re-publishing or
/// requeueing the work it abandoned, the acks, stopping its ops endpoints — before the
/// process exits regardless.
const SETTLE_MARGIN: Duration = Duration::from_secs(15);

/// The exit status when the process does not end on its own: a second signal, or the drain
/// period plus [`SETTLE_MARGIN`] over.
const FORCED_EXIT: i32 = 130;

/// A token cancelled at the first SIGINT/SIGTERM; the service then drains for at most `drain`
/// (its configured `shutdown_grace`, or [`DRAIN_GRACE`]). After that first signal a second one
/// ends the process at once, and so does `drain` + [`SETTLE_MARGIN`] running out — the
/// service's own grace handling (finish, then abandon and hand back) runs to its end first.
///
/// The signal handlers are installed when this is called, so no signal is lost.
fn shutdown_on_signal(drain: Duration) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let mut signals = Signals::install();
    let hard_stop = drain.saturating_add(SETTLE_MARGIN);
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        signals.recv().await;
        tracing::info!(
            drain_s = drain.as_secs_f64(),
            hard_stop_s = hard_stop.as_secs_f64(),
            "shutting down; a second signal exits at once"
        );
        cancel.cancel();
        tokio::select! {
            () = signals.recv() => tracing::warn!("second signal: exiting now"),
            () = tokio::time::sleep(hard_stop) => {
                tracing::warn!("shutdown grace period and settle margin over: exiting now");
            }
        }
        std::process::exit(FORCED_EXIT);
    });
    shutdown
}

/// SIGINT and SIGTERM, each a stream for the life of the process (a fresh `ctrl_c()` per
/// wait could miss a signal that arrives between two waits).
struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let streams = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(int), Ok(term)) => Some((int, term)),
                _ => {
                    tracing::warn!("cannot install SIGINT/SIGTERM handlers; Ctrl-C only");
                    None
                }
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((int, term)) = &mut self.streams {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How long `nightshift standalone` drains: the gateway and the executors stop together,
/// then the finalizers, then the scheduler (within the settle margin).
fn standalone_drain(config: &Config) -> Duration {
    DRAIN_GRACE
        .max(config.executor.shutdown_grace)
        .saturating_add(config.finalizer.shutdown_grace)
}

/// The internal token a distributed service needs: the scheduler refuses every call without
/// it, so a process without one (or with a weak one) stops at once, naming the setting.
fn internal_token(config: &Config) -> anyhow::Result<Secret> {
    nightshift_proto::auth::check_token(config.internal.token.as_ref())
        .cloned()
        .map_err(|e| anyhow::anyhow!("{e}: set it to the same random value for every service"))
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))
}

pub async fn gateway(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-gateway"),
    );
    internal_token(&config)?;
    let ports = ports::gateway(&config).await?;
    let listener = bind(config.gateway.listen).await?;
    let ops_listener = bind(
        config
            .gateway
            .ops_listen
            .unwrap_or(nightshift_gateway::DEFAULT_OPS_LISTEN),
    )
    .await?;
    let shutdown = shutdown_on_signal(DRAIN_GRACE);
    nightshift_gateway::serve(config.gateway, ports, listener, ops_listener, shutdown).await?;
    Ok(())
}

pub async fn scheduler(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-scheduler"),
    );
    internal_token(&config)?;
    let ports = ports::scheduler(&config).await?;
    let listener = bind(config.scheduler.listen).await?;
    let ops_listener = bind(config.scheduler.ops_listen).await?;
    let shutdown = shutdown_on_signal(DRAIN_GRACE);
    nightshift_scheduler::serve(config.scheduler, ports, listener, ops_listener, shutdown).await?;
    Ok(())
}

pub async fn executor(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-executor"),
    );
    let ports = ports::executor(&config).await?;
    let listener = bind(config.executor.listen).await?;
    let shutdown = shutdown_on_signal(config.executor.shutdown_grace);
    nightshift_executor::serve(config.executor, ports, listener, shutdown).await?;
    Ok(())
}

pub async fn finalizer(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-finalizer"),
    );
    internal_token(&config)?;
    let ports = ports::finalizer(&config).await?;
    let listener = bind(config.finalizer.listen).await?;
    let shutdown = shutdown_on_signal(config.finalizer.shutdown_grace);
    nightshift_finalizer::serve(config.finalizer, ports, listener, shutdown).await?;
    Ok(())
}

/// `nightshift standalone`'s flags (they win over the `[standalone]` section).
#[derive(Args)]
pub struct StandaloneArgs {
    /// Where files, metadata and the queue live (default `./nightshift-data`).
    #[arg(long, env = "NIGHTSHIFT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The HTTP API's address (default 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where `/livez`, `/readyz` and `/metrics` listen (default: a free loopback port,
    /// printed at start).
    #[arg(long)]
    ops_listen: Option<SocketAddr>,
    /// An OpenAI-compatible server that serves every model, e.g. http://127.0.0.1:8000/v1
    /// (vLLM, SGLang, llama.cpp, Ollama, a hosted API). Without it, `[[routing.upstreams]]`.
    #[arg(long, conflicts_with = "simulate")]
    upstream: Option<String>,
    /// The environment variable holding the upstream's API key, sent as a bearer token.
    #[arg(long, requires = "upstream")]
    upstream_api_key_env: Option<String>,
    /// Serve the built-in inference simulator as the upstream (a first try, no GPU).
    #[arg(long)]
    simulate: bool,
    /// The API key clients use (default: generated once, kept in `<data-dir>/api-key`).
    #[arg(long, env = "NIGHTSHIFT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No progress lines, only warnings and errors.
    #[arg(long, short)]
    quiet: bool,
}

impl StandaloneArgs {
    /// Lays the flags over the configuration (file and environment): they win, and the result
    /// is validated as a whole.
    pub fn apply(&self, config: &mut Config) {
        if let Some(data_dir) = &self.data_dir {
            config.standalone.data_dir.clone_from(data_dir);
        }
        if let Some(listen) = self.listen {
            config.gateway.listen = listen;
        }
        if let Some(ops_listen) = self.ops_listen {
            config.gateway.ops_listen = Some(ops_listen);
        }
        if let Some(key) = &self.api_key {
            config.standalone.api_key = Some(Secret::new(key.clone()));
        }
        if let Some(url) = &self.upstream {
            let routing =
                route_every_model(&config.routing, url, self.upstream_api_key_env.clone());
            config.set_routing(routing);
        }
    }
}

pub async fn standalone(config: Config, args: StandaloneArgs) -> anyhow::Result<()> {
    // A person reads this terminal: pretty warnings only, next to the progress lines.
    let _telemetry = nightshift_telemetry::init_with(
        &nightshift_telemetry::TelemetryConfig {
            log_format: nightshift_telemetry::LogFormat::Pretty,
            log_filter: "warn".into(),
        },
        nightshift_telemetry::OtelSettings::from_env("nightshift-standalone"),
    );
    let drain = standalone_drain(&config);
    let upstream = if args.simulate {
        "the built-in simulator (every model)".to_owned()
    } else if let Some(url) = &args.upstream {
        format!("{url} (every model)")
    } else if config.routing.upstreams.is_empty() {
        anyhow::bail!(
            "no upstream: pass --upstream http://HOST:PORT/v1 (any OpenAI-compatible server), \
             --simulate (the built-in simulator), or configure [[routing.upstreams]]"
        );
    } else {
        config
            .routing
            .upstreams
            .iter()
            .map(|u| format!("{} {} ({})", u.name, u.base_url, u.models.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut settings = StandaloneConfig::new(config.standalone.data_dir);
    settings.services = ServiceConfigs {
        gateway: config.gateway,
        scheduler: config.scheduler,
        executor: config.executor,
        finalizer: config.finalizer,
        executors: config.standalone.executors,
        finalizer_enabled: true,
    };
    settings.api_key = config.standalone.api_key;
    if args.simulate {
        settings.simulate = Some(simulator_from_env()?);
    }
    if !args.quiet {
        settings.progress = Some(ProgressSettings::default());
    }
    let data_dir = settings.data_dir.clone();
    let running = Standalone::start(settings, shutdown_on_signal(drain))
        .await
        .context("nightshift standalone")?;
    println!(
        "nightshift {} — standalone, data in {}\n\
         \n  API      {}\n  API key  {}\n  upstream {upstream}\n  metrics  {}/metrics\n\
         \n  from openai import OpenAI\n  client = OpenAI(base_url=\"{}\", api_key=\"{}\")\n\
         \nCtrl-C stops; unfinished batches carry on at the next start on this data directory.\n",
        env!("CARGO_PKG_VERSION"),
        data_dir.display(),
        running.base_url(),
        running.api_key,
        running.ops_origin,
        running.base_url(),
        running.api_key,
    );
    running.join().await?;
    Ok(())
}

/// The simulator of `--simulate`, tuned by the same `INFERENCE_SIM_*` variables as the
/// `inference-sim` binary (latency, failure rates...).
fn simulator_from_env() -> anyhow::Result<SimConfig> {
    #[derive(clap::Parser)]
    struct FromEnv {
        #[command(flatten)]
        config: SimConfig,
    }
    use clap::Parser;
    Ok(FromEnv::try_parse_from(["simulate"])
        .context("INFERENCE_SIM_* variables")?
        .config)
}

/// `nightshift admin`: a deployment's scheduler (from the configuration), or the running
/// `nightshift standalone` of a data directory.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Administer the `nightshift standalone` running on this data directory (its scheduler's
    /// loopback address and token are in `<dir>/admin` while it runs) instead of the
    /// configured scheduler.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Admin,
}

#[derive(Subcommand)]
pub enum Admin {
    /// Creates a tenant and prints its API key (shown only this once).
    CreateTenant {
        /// A name for people; need not be unique.
        #[arg(long)]
        name: String,
        /// Use this key instead of generating one.
        #[arg(long)]
        api_key: Option<String>,
    },
    /// A tenant's webhook endpoints: list, create, delete.
    #[command(subcommand)]
    Webhooks(crate::admin_webhooks::WebhooksCmd),
    /// Lists every tenant (id, name), oldest first.
    Tenants,
    /// A tenant's quotas: show, set (overrides of `[scheduler.quotas]`).
    #[command(subcommand)]
    Quotas(crate::admin_quotas::QuotasCmd),
}

pub async fn admin(config: Config, args: AdminArgs) -> anyhow::Result<()> {
    let control = match &args.data_dir {
        Some(data_dir) => {
            let access = AdminAccess::load(data_dir).with_context(|| {
                format!(
                    "is `nightshift standalone --data-dir {}` running?",
                    data_dir.display()
                )
            })?;
            // One process, loopback: the scheduler never serves TLS there.
            SchedulerClient::connect_lazy(&access.scheduler_url, config.gateway.control_timeout)?
                .with_token(Some(&access.internal_token))?
        }
        None => {
            let token = internal_token(&config)?;
            SchedulerClient::connect_lazy_tls(
                &config.gateway.scheduler_url,
                config.gateway.control_timeout,
                config.internal.tls.as_ref(),
            )?
            .with_token(Some(&token))?
        }
    };
    match args.command {
        Admin::CreateTenant { name, api_key } => {
            let resp = control
                .tenants()
                .create_tenant(CreateTenantRequest { name, api_key })
                .await
                .map_err(|s| anyhow::anyhow!("create tenant: {}", s.message()))?
                .into_inner();
            println!("tenant_id={}\napi_key={}", resp.tenant_id, resp.api_key);
        }
        Admin::Webhooks(cmd) => crate::admin_webhooks::run(&control, cmd).await?,
        Admin::Tenants => crate::admin_quotas::list_tenants(&control).await?,
        Admin::Quotas(cmd) => crate::admin_quotas::run(&control, cmd).await?,
    }
    Ok(())
}
