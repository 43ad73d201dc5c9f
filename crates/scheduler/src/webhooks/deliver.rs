//! The delivery worker: claims due deliveries from the outbox, POSTs them, records how each
//! attempt ended.

use std::sync::Arc;
use std::time::Duration;

use nightshift_core::time::now_unix;
use nightshift_core::webhook::sign;
use nightshift_metadata::{DeliveryOutcome, MetadataStore, WebhookDelivery};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::WebhookSettings;
use super::ssrf;
use crate::SchedulerPorts;
use crate::metrics;

/// The wait before attempt `attempt + 1` after `attempt` failed (1 = the first attempt):
/// `base × 2^(attempt−1)`, capped at `max`, then scaled by `0.5 + jitter / 2` (`jitter` in
/// `[0, 1]`), so receivers that came back are not hit by every sender at once. At least 1 s
/// (times in the outbox are whole seconds).
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let scaled = full.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0);
    scaled.max(Duration::from_secs(1))
}

/// The HTTP client of every attempt: no redirects (a 3xx is a failed attempt), no proxy from
/// the environment (it would bypass the address check), the attempt timeout, and unless
/// private addresses are allowed, a resolver that drops non-public answers.
fn client(settings: &WebhookSettings) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .user_agent(concat!("nightshift-webhooks/", env!("CARGO_PKG_VERSION")));
    if !settings.allow_private_addresses {
        builder = builder.dns_resolver(Arc::new(ssrf::PublicOnly));
    }
    builder.build()
}

/// Drains the outbox until `stop` is cancelled: each round claims up to `concurrency` due
/// deliveries and attempts them concurrently; when a round found fewer, it waits
/// `poll_interval`. Attempts cut short by `stop` keep their lease and are claimed again once
/// it expires (here or by another scheduler).
pub async fn run(ports: SchedulerPorts, settings: WebhookSettings, stop: CancellationToken) {
    metrics::register_webhooks();
    let client = match client(&settings) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook delivery disabled: no HTTP client");
            return;
        }
    };
    let mut last_purge = 0;
    loop {
        let now = now_unix();
        let claimed = ports
            .metadata
            .claim_webhook_deliveries(now, settings.lease_secs(), settings.concurrency)
            .await;
        let full = match claimed {
            Ok(batch) => {
                let full = batch.len() >= settings.concurrency as usize;
                let attempts = futures::future::join_all(
                    batch
                        .into_iter()
                        .map(|d| attempt(&client, ports.metadata.as_ref(), &settings, d)),
                );
                tokio::select! {
                    _ = attempts => {}
                    () = stop.cancelled() => return,
                }
                full
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook outbox unavailable; retrying");
                false
            }
        };
        if let Ok(n) = ports.metadata.pending_webhook_deliveries().await {
            ::metrics::gauge!(metrics::WEBHOOK_BACKLOG).set(n as f64);
        }
        if now - last_purge >= 3600 {
            last_purge = now;
            let retention = i64::try_from(settings.history_retention.as_secs()).unwrap_or(0);
            if let Err(e) = ports.metadata.purge_webhook_history(now - retention).await {
                tracing::warn!(error = %e, "purging webhook history failed");
            }
        }
        if full {
            if stop.is_cancelled() {
                return;
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(settings.poll_interval) => {}
        }
    }
}

/// How one attempt went.
enum Attempt {
    Delivered,
    /// Failed; `result` is its metrics label.
    Failed {
        result: &'static str,
        error: String,
    },
}

/// One attempt of a claimed delivery, and its outcome recorded.
async fn attempt(
    client: &reqwest::Client,
    store: &dyn MetadataStore,
    settings: &WebhookSettings,
    d: WebhookDelivery,
) {
    let sent = send(client, settings, &d).await;
    let now = now_unix();
    let outcome = match sent {
        Attempt::Delivered => {
            ::metrics::counter!(metrics::WEBHOOK_ATTEMPTS, "result" => "delivered").increment(1);
            ::metrics::counter!(metrics::WEBHOOK_DELIVERIES, "outcome" => "delivered").increment(1);
            DeliveryOutcome::Delivered
        }
        Attempt::Failed { result, error } => {
            ::metrics::counter!(metrics::WEBHOOK_ATTEMPTS, "result" => result).increment(1);
            let max_age = i64::try_from(settings.max_age.as_secs()).unwrap_or(i64::MAX / 4);
            let wait = backoff(
                d.attempts,
                settings.backoff_base,
                settings.backoff_max,
                rand::rng().random::<f64>(),
            );
            let at = now + i64::try_from(wait.as_secs()).unwrap_or(i64::MAX / 4);
            if at - d.event_created_at > max_age {
                ::metrics::counter!(metrics::WEBHOOK_DELIVERIES, "outcome" => "gave_up")
                    .increment(1);
                tracing::warn!(
                    event_id = %d.event_id, endpoint_id = %d.endpoint_id, attempts = d.attempts,
                    error = %error, "webhook delivery given up"
                );
                DeliveryOutcome::GaveUp { error }
            } else {
                tracing::info!(
                    event_id = %d.event_id, endpoint_id = %d.endpoint_id, attempts = d.attempts,
                    error = %error, retry_in_secs = wait.as_secs(), "webhook delivery failed"
                );
                DeliveryOutcome::Retry { at, error }
            }
        }
    };
    // If this fails the lease expires and the delivery is attempted again (at-least-once).
    if let Err(e) = store.finish_webhook_delivery(&d, &outcome, now).await {
        tracing::warn!(error = %e, event_id = %d.event_id, "recording a webhook attempt failed");
    }
}

/// POSTs the event, signed with the endpoint's current secret at the current time.
async fn send(
    client: &reqwest::Client,
    settings: &WebhookSettings,
    d: &WebhookDelivery,
) -> Attempt {
    let url = match reqwest::Url::parse(&d.url) {
        Ok(u) => u,
        Err(e) => {
            return Attempt::Failed {
                result: "refused",
                error: format!("invalid url: {e}"),
            };
        }
    };
    if !settings.allow_private_addresses && !ssrf::literal_host_allowed(&url) {
        return Attempt::Failed {
            result: "refused",
            error: format!(
                "{} is not a public address (refused)",
                url.host_str().unwrap_or_default()
            ),
        };
    }
    let timestamp = now_unix();
    let msg_id = d.event_id.as_str();
    // While a rotated-out secret is kept active, a second signature is made with it: the
    // header lists both, space-separated, and a receiver accepts either.
    let signed = std::iter::once(&d.secret)
        .chain(d.previous_secret.as_ref())
        .map(|secret| sign(secret, msg_id, timestamp, &d.body))
        .collect::<Result<Vec<_>, _>>();
    let signature = match signed {
        Ok(s) => s.join(" "),
        Err(e) => {
            return Attempt::Failed {
                result: "refused",
                error: e.to_string(),
            };
        }
    };
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(d.body.clone())
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => Attempt::Delivered,
        Ok(resp) if resp.status().is_redirection() => Attempt::Failed {
            result: "http_error",
            error: format!(
                "HTTP {} (redirects are not followed)",
                resp.status().as_u16()
            ),
        },
        Ok(resp) => Attempt::Failed {
            result: "http_error",
            error: format!("HTTP {}", resp.status().as_u16()),
        },
        Err(e) if e.is_timeout() => Attempt::Failed {
            result: "timeout",
            error: "timed out".into(),
        },
        Err(e) => {
            // the resolver's refusal surfaces as a connect error naming it
            let text = error_chain(&e);
            let result = if text.contains("not a public address") {
                "refused"
            } else {
                "network_error"
            };
            Attempt::Failed {
                result,
                error: text,
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let (base, max) = (Duration::from_secs(10), Duration::from_secs(3600));
        assert_eq!(backoff(1, base, max, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(2, base, max, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(4, base, max, 1.0), Duration::from_secs(80));
        assert_eq!(backoff(1, base, max, 0.0), Duration::from_secs(5));
        // capped, whatever the attempt count
        assert_eq!(backoff(20, base, max, 1.0), max);
        assert_eq!(backoff(u32::MAX, base, max, 1.0), max);
        assert_eq!(backoff(20, base, max, 0.0), max / 2);
        for attempt in 1..40 {
            for jitter in [0.0, 0.3, 0.99, 1.0] {
                let d = backoff(attempt, base, max, jitter);
                assert!(
                    d >= Duration::from_secs(1) && d <= max,
                    "{attempt} {jitter}"
                );
            }
        }
        // never below a second
        assert_eq!(
            backoff(1, Duration::from_millis(10), max, 0.0),
            Duration::from_secs(1)
        );
    }
}
