//! Wiring: builds each service's adapters from the configuration and runs it until a signal.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use nightshift_metadata::PgStore;
use nightshift_proto::v1::CreateTenantRequest;
use nightshift_queue::RabbitQueue;
use nightshift_state::RedisState;
use nightshift_storage::S3Store;
use tokio::net::TcpListener;

use crate::config::Config;

/// How long in-flight work may take to drain after the first signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Resolves at the first SIGINT/SIGTERM. After it, a second signal or the grace period
/// running out ends the process at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tracing::info!("shutting down; a second signal exits at once");
    tokio::spawn(async {
        tokio::select! {
            _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
            _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace period over: exiting now"),
        }
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn storage(config: &Config) -> anyhow::Result<Arc<S3Store>> {
    Ok(Arc::new(
        S3Store::new(&config.storage)
            .await
            .context("object storage")?,
    ))
}

async fn queue(config: &Config) -> anyhow::Result<Arc<RabbitQueue>> {
    Ok(Arc::new(
        RabbitQueue::connect(&config.queue)
            .await
            .context("work queue (RabbitMQ)")?,
    ))
}

async fn live_state(config: &Config) -> anyhow::Result<Arc<RedisState>> {
    Ok(Arc::new(
        RedisState::connect(&config.state)
            .await
            .context("live state (Redis)")?,
    ))
}

pub async fn gateway(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-gateway"),
    );
    let storage = storage(&config).await?;
    let live = live_state(&config).await?;
    let listener = TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("bind {}", config.gateway.listen))?;
    nightshift_gateway::serve(config.gateway, storage, live, listener, shutdown_signal()).await?;
    Ok(())
}

pub async fn scheduler(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-scheduler"),
    );
    let storage = storage(&config).await?;
    let metadata = Arc::new(
        PgStore::connect(&config.metadata)
            .await
            .context("metadata store")?,
    );
    let listener = TcpListener::bind(config.scheduler.listen)
        .await
        .with_context(|| format!("bind {}", config.scheduler.listen))?;
    let ports = nightshift_scheduler::Ports {
        metadata,
        storage,
        queue: queue(&config).await?,
        state: live_state(&config).await?,
    };
    config
        .routing
        .validate()
        .map_err(|e| anyhow::anyhow!("routing: {e}"))?;
    nightshift_scheduler::serve(
        config.scheduler,
        config.routing,
        ports,
        listener,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn executor(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-executor"),
    );
    config
        .routing
        .validate()
        .map_err(|e| anyhow::anyhow!("routing: {e}"))?;
    let ports = nightshift_executor::ExecutorPorts {
        storage: storage(&config).await?,
        queue: queue(&config).await?,
        state: live_state(&config).await?,
    };
    let listener = TcpListener::bind(config.executor.listen)
        .await
        .with_context(|| format!("bind {}", config.executor.listen))?;
    nightshift_executor::serve(
        config.executor,
        config.routing,
        ports,
        listener,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

pub async fn finalizer(config: Config) -> anyhow::Result<()> {
    let _telemetry = nightshift_telemetry::init_with(
        &config.telemetry,
        nightshift_telemetry::OtelSettings::from_env("nightshift-finalizer"),
    );
    let ports = nightshift_finalizer::FinalizerPorts {
        storage: storage(&config).await?,
        queue: queue(&config).await?,
        state: live_state(&config).await?,
    };
    let listener = TcpListener::bind(config.finalizer.listen)
        .await
        .with_context(|| format!("bind {}", config.finalizer.listen))?;
    nightshift_finalizer::serve(config.finalizer, ports, listener, shutdown_signal()).await?;
    Ok(())
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
}

pub async fn admin(config: Config, cmd: Admin) -> anyhow::Result<()> {
    let control = nightshift_gateway::ControlPlane::connect_lazy(
        &config.gateway.scheduler_url,
        config.gateway.control_timeout,
    )?;
    match cmd {
        Admin::CreateTenant { name, api_key } => {
            let resp = control
                .tenants()
                .create_tenant(CreateTenantRequest { name, api_key })
                .await
                .map_err(|s| anyhow::anyhow!("create tenant: {}", s.message()))?
                .into_inner();
            println!("tenant_id={}\napi_key={}", resp.tenant_id, resp.api_key);
        }
    }
    Ok(())
}
