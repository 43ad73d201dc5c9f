//! The embedded queue's configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{QueueConfig, QueueError, Result};

/// Where the database lives and how messages are redelivered.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedQueueConfig {
    /// The SQLite database file (created with its directory when missing; `-wal` and `-shm`
    /// files live next to it).
    pub path: PathBuf,
    /// How many times a message may return to its queue (requeued, dropped, or its consumer
    /// or process gone) before its next return dead-letters it; ≥ 1. Same meaning and default
    /// as [`QueueConfig::delivery_limit`]; unlike RabbitMQ, changing it applies at once.
    pub delivery_limit: u32,
}

impl Default for EmbeddedQueueConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("nightshift-queue.db"),
            delivery_limit: QueueConfig::default().delivery_limit,
        }
    }
}

impl EmbeddedQueueConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            return Err(QueueError::Config("queue.path must not be empty".into()));
        }
        if self.delivery_limit == 0 {
            return Err(QueueError::Config(
                "queue.delivery_limit must be at least 1, or one lost consumer dead-letters \
                 its messages"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_match_rabbitmq_and_are_validated() {
        let config: EmbeddedQueueConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config.delivery_limit, QueueConfig::default().delivery_limit);
        config.validate().unwrap();
        assert!(serde_json::from_str::<EmbeddedQueueConfig>(r#"{"url": "x"}"#).is_err());
        for bad in [
            EmbeddedQueueConfig {
                delivery_limit: 0,
                ..EmbeddedQueueConfig::default()
            },
            EmbeddedQueueConfig {
                path: PathBuf::new(),
                ..EmbeddedQueueConfig::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(QueueError::Config(_))));
        }
    }
}
