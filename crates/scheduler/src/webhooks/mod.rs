//! Webhooks: the tenant API over its endpoints ([`WebhooksService`]) and the delivery worker
//! ([`run`]) that drains the outbox.
//!
//! Durable and at-least-once: the metadata store writes each batch event into the outbox in
//! the transaction of the batch's terminal transition, with one pending delivery per
//! subscribed endpoint. The worker claims due deliveries with a lease (so several schedulers,
//! or a restart after `kill -9`, never lose one: an unfinished attempt's lease expires and the
//! delivery is claimed again), POSTs each, signed (Standard Webhooks), with a timeout, never
//! following redirects, and records the outcome: delivered (2xx), due again after an
//! exponential backoff with jitter, or given up once the event is older than `max_age`. Every
//! attempt of a delivery carries the same `webhook-id` (the event id) and body, so a receiver
//! that got a duplicate can drop it. The worker is a task of its own with bounded concurrency:
//! a slow or dead receiver never delays a batch.
//!
//! SSRF: unless `allow_private_addresses` is set, a URL whose host is (or resolves to) a
//! loopback, private, link-local (cloud metadata), shared or otherwise non-public address is
//! refused when the endpoint is registered and again at every attempt, after DNS resolution
//! ([`ssrf`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod deliver;
mod service;
pub mod ssrf;

pub use deliver::{backoff, run};
pub use service::WebhooksService;

/// `scheduler.webhooks`: how deliveries are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Deliver to loopback, private and link-local addresses too (tests, trusted networks).
    /// Off by default: such URLs are refused at registration and at delivery (SSRF).
    pub allow_private_addresses: bool,
    /// Each attempt's deadline (connect + request + answer).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A delivery failing for longer than this after its event is given up (`failed`).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The first retry waits about this long; each next one twice as long (with jitter).
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Attempts in flight at once (per scheduler).
    pub concurrency: u32,
    /// How often the outbox is looked at when it had nothing due.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Ended deliveries (and their events) are forgotten after this long.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_private_addresses: false,
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(72 * 3600),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            concurrency: 16,
            poll_interval: Duration::from_secs(1),
            history_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl WebhookSettings {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// A message naming the bad setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.timeout.is_zero() {
            return Err("scheduler.webhooks.timeout must be more than 0".into());
        }
        if self.concurrency == 0 {
            return Err("scheduler.webhooks.concurrency must be at least 1".into());
        }
        if self.poll_interval.is_zero() {
            return Err("scheduler.webhooks.poll_interval must be more than 0".into());
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_max {
            return Err(
                "scheduler.webhooks.backoff_base must be more than 0 and at most backoff_max"
                    .into(),
            );
        }
        Ok(())
    }

    /// How long a claimed attempt owns its delivery: well past its timeout, so only a dead
    /// worker's delivery is claimed again.
    pub(crate) fn lease_secs(&self) -> i64 {
        i64::try_from(self.timeout.as_secs()).unwrap_or(i64::MAX / 4) * 2 + 30
    }
}
