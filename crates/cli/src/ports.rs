//! The distributed deployment's adapters, built from the configuration: object storage (S3),
//! the metadata store (PostgreSQL), the work queue (RabbitMQ) and live state (Redis).
//!
//! `nightshift <service>` builds the ports of the service it runs, connecting only what that
//! service uses; the e2e harness's distributed stack builds every service's ports with the
//! same functions, from a configuration of its own (its prefixes, its schema).

use std::sync::Arc;

use anyhow::Context;
use nightshift_executor::ExecutorPorts;
use nightshift_finalizer::FinalizerPorts;
use nightshift_gateway::GatewayPorts;
use nightshift_metadata::PgStore;
use nightshift_queue::RabbitQueue;
use nightshift_scheduler::SchedulerPorts;
use nightshift_state::RedisState;
use nightshift_storage::S3Store;

use crate::config::Config;

/// The gateway's: object storage and live state.
///
/// # Errors
/// An adapter cannot be built or connected.
pub async fn gateway(config: &Config) -> anyhow::Result<GatewayPorts> {
    Ok(GatewayPorts {
        storage: storage(config).await?,
        state: live_state(config).await?,
    })
}

/// The scheduler's: all four.
///
/// # Errors
/// An adapter cannot be built or connected.
pub async fn scheduler(config: &Config) -> anyhow::Result<SchedulerPorts> {
    Ok(SchedulerPorts {
        metadata: metadata(config).await?,
        storage: storage(config).await?,
        queue: queue(config).await?,
        state: live_state(config).await?,
    })
}

/// An executor's: object storage, the work queue and live state.
///
/// # Errors
/// An adapter cannot be built or connected.
pub async fn executor(config: &Config) -> anyhow::Result<ExecutorPorts> {
    Ok(ExecutorPorts {
        storage: storage(config).await?,
        queue: queue(config).await?,
        state: live_state(config).await?,
    })
}

/// A finalizer's: object storage, the work queue and live state.
///
/// # Errors
/// An adapter cannot be built or connected.
pub async fn finalizer(config: &Config) -> anyhow::Result<FinalizerPorts> {
    Ok(FinalizerPorts {
        storage: storage(config).await?,
        queue: queue(config).await?,
        state: live_state(config).await?,
    })
}

/// `[storage]`: the S3 client (no I/O yet).
///
/// # Errors
/// The client cannot be built from the settings.
pub async fn storage(config: &Config) -> anyhow::Result<Arc<S3Store>> {
    Ok(Arc::new(
        S3Store::new(&config.storage)
            .await
            .context("object storage")?,
    ))
}

/// `[metadata]`: connects to PostgreSQL and migrates the schema.
///
/// # Errors
/// PostgreSQL cannot be reached or migrated.
pub async fn metadata(config: &Config) -> anyhow::Result<Arc<PgStore>> {
    Ok(Arc::new(
        PgStore::connect(&config.metadata)
            .await
            .context("metadata store (PostgreSQL)")?,
    ))
}

/// `[queue]`: connects to RabbitMQ and declares the queues.
///
/// # Errors
/// RabbitMQ cannot be reached.
pub async fn queue(config: &Config) -> anyhow::Result<Arc<RabbitQueue>> {
    Ok(Arc::new(
        RabbitQueue::connect(&config.queue)
            .await
            .context("work queue (RabbitMQ)")?,
    ))
}

/// `[state]`: connects to Redis.
///
/// # Errors
/// Redis cannot be reached.
pub async fn live_state(config: &Config) -> anyhow::Result<Arc<RedisState>> {
    Ok(Arc::new(
        RedisState::connect(&config.state)
            .await
            .context("live state (Redis)")?,
    ))
}
