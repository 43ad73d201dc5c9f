//! Counters behind `GET /sim/stats`, and the change signal behind `GET /sim/wait`.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::openai::Endpoint;

/// A snapshot of the simulator's counters, as served by `GET /sim/stats`. All counts are since
/// start or the last `POST /sim/reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests received, per endpoint.
    pub requests: RequestCounts,
    /// Responses sent by the inference endpoints, by HTTP status (JSON keys are the codes as
    /// strings). Requests cut by a timeout or drop have no response and are not here;
    /// malformed bodies are counted under 200.
    pub responses: BTreeMap<u16, u64>,
    /// Failures injected, by kind and source.
    pub failures: FailureCounts,
    /// Inference requests being handled right now (including held "timeout" requests).
    pub in_flight: u64,
    /// The most inference requests ever handled at once. An arrival that is then refused for
    /// capacity counts too, so a value above `max_concurrency` proves the client sent more
    /// concurrent requests than allowed.
    pub max_in_flight: u64,
    /// Request identities in the `fail_times` attempt memory.
    pub attempts_tracked: u64,
    /// Bytes of streamed success bodies (padded by `response_bytes`, or `chunked`) handed to
    /// their connections so far. A client that stops reading a body stops this count within
    /// its socket buffers: what a test checks to prove a huge body was not read whole.
    pub streamed_body_bytes: u64,
    /// Streamed success bodies being sent right now: one ends when its last byte is handed
    /// over or its connection is gone. (`in_flight` ends when the response starts.)
    pub streaming_bodies: u64,
    /// Simulated latencies that ran to their end (a success's, a scripted failure's delay, a
    /// timeout hold).
    pub latency_waits: u64,
    /// How far past its deadline each of them ended, summed, in microseconds: the
    /// simulator's own timing error (its mean is this over `latency_waits`).
    pub latency_overshoot_micros: u64,
}

/// Requests received, per endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// `POST /v1/chat/completions`.
    pub chat_completions: u64,
    /// `POST /v1/completions`.
    pub completions: u64,
    /// `POST /v1/embeddings`.
    pub embeddings: u64,
    /// `POST /v1/responses`.
    pub responses: u64,
    /// `POST /v1/moderations`.
    pub moderations: u64,
    /// `POST /v1/rerank` (vLLM's).
    pub rerank: u64,
    /// `POST /v1/score` (vLLM's).
    pub score: u64,
    /// `GET /v1/models`.
    pub models: u64,
    /// The inference endpoints together.
    pub total: u64,
}

/// Failures injected, by kind and source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCounts {
    /// HTTP errors scripted by a `sim` directive (`status`, or a numeric `kind`).
    pub scripted_status: u64,
    /// 500s drawn by `rate_500`.
    pub random_500: u64,
    /// 429s drawn by `rate_429`.
    pub random_429: u64,
    /// 429s because `max_concurrency` requests were already in flight.
    pub capacity_429: u64,
    /// Requests held and then cut, scripted or drawn.
    pub timeout: u64,
    /// Connections closed without a response, scripted or drawn.
    pub drop: u64,
    /// Truncated JSON bodies, scripted or drawn.
    pub malformed: u64,
    /// All of the above.
    pub total: u64,
}

/// What an injected failure is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    ScriptedStatus,
    Random500,
    Random429,
    Capacity429,
    Timeout,
    Drop,
    Malformed,
}

impl FailureKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::ScriptedStatus => "scripted_status",
            Self::Random500 => "random_500",
            Self::Random429 => "random_429",
            Self::Capacity429 => "capacity_429",
            Self::Timeout => "timeout",
            Self::Drop => "drop",
            Self::Malformed => "malformed",
        }
    }
}

/// The live counters. Every change bumps a generation number so waiters can re-check.
#[derive(Debug)]
pub(crate) struct Stats {
    /// The counters; `attempts_tracked` is filled in by the caller of `snapshot`.
    counters: Mutex<SimStats>,
    /// Generation number, bumped after every change.
    changed: watch::Sender<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            counters: Mutex::new(SimStats::default()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Stats {
    fn lock(&self) -> MutexGuard<'_, SimStats> {
        // Counters stay meaningful even if a holder panicked mid-update.
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut SimStats)) {
        change(&mut self.lock());
        self.changed.send_modify(|generation| *generation += 1);
    }

    pub(crate) fn received(&self, endpoint: Endpoint) {
        self.update(|s| {
            s.requests.total += 1;
            match endpoint {
                Endpoint::ChatCompletions => s.requests.chat_completions += 1,
                Endpoint::Completions => s.requests.completions += 1,
                Endpoint::Embeddings => s.requests.embeddings += 1,
                Endpoint::Responses => s.requests.responses += 1,
                Endpoint::Moderations => s.requests.moderations += 1,
                Endpoint::Rerank => s.requests.rerank += 1,
                Endpoint::Score => s.requests.score += 1,
            }
        });
    }

    pub(crate) fn received_models(&self) {
        self.update(|s| s.requests.models += 1);
    }

    pub(crate) fn responded(&self, status: u16) {
        self.update(|s| *s.responses.entry(status).or_default() += 1);
    }

    pub(crate) fn failed(&self, kind: FailureKind) {
        self.update(|s| {
            let f = &mut s.failures;
            f.total += 1;
            match kind {
                FailureKind::ScriptedStatus => f.scripted_status += 1,
                FailureKind::Random500 => f.random_500 += 1,
                FailureKind::Random429 => f.random_429 += 1,
                FailureKind::Capacity429 => f.capacity_429 += 1,
                FailureKind::Timeout => f.timeout += 1,
                FailureKind::Drop => f.drop += 1,
                FailureKind::Malformed => f.malformed += 1,
            }
        });
    }

    /// Counts a simulated latency that ended `overshoot` after its deadline.
    pub(crate) fn paused(&self, overshoot: Duration) {
        let micros = u64::try_from(overshoot.as_micros()).unwrap_or(u64::MAX);
        self.update(|s| {
            s.latency_waits += 1;
            s.latency_overshoot_micros = s.latency_overshoot_micros.saturating_add(micros);
        });
    }

    /// Counts a request in flight until the returned guard is dropped; the guard knows how
    /// many were in flight including this one.
    pub(crate) fn enter(&self) -> InFlight<'_> {
        let mut level = 0;
        self.update(|s| {
            s.in_flight += 1;
            s.max_in_flight = s.max_in_flight.max(s.in_flight);
            level = s.in_flight;
        });
        InFlight { stats: self, level }
    }

    /// Counts a streamed body being sent until the returned guard is dropped.
    pub(crate) fn stream_started(self: &std::sync::Arc<Self>) -> Streaming {
        self.update(|s| s.streaming_bodies += 1);
        Streaming {
            stats: std::sync::Arc::clone(self),
        }
    }

    /// Counts `bytes` of a streamed body handed to its connection.
    pub(crate) fn streamed(&self, bytes: usize) {
        self.update(|s| s.streamed_body_bytes += bytes as u64);
    }

    pub(crate) fn snapshot(&self) -> SimStats {
        self.lock().clone()
    }

    /// Zeroes every counter but the live `in_flight` (which also restarts `max_in_flight`) and
    /// `streaming_bodies`.
    pub(crate) fn reset(&self) {
        self.update(|s| {
            *s = SimStats {
                in_flight: s.in_flight,
                max_in_flight: s.in_flight,
                streaming_bodies: s.streaming_bodies,
                ..SimStats::default()
            };
        });
    }

    /// Waits until `condition` holds for the counters or `timeout` passes; true if it held.
    pub(crate) async fn wait_until(
        &self,
        condition: impl Fn(&SimStats) -> bool,
        timeout: Duration,
    ) -> bool {
        // Subscribing before the first check means no change can slip in between.
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                if condition(&self.lock()) {
                    return;
                }
                if changes.changed().await.is_err() {
                    // Unreachable while `self` holds the sender; never spin.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// An inference request in flight; dropping it ends the request's count.
pub(crate) struct InFlight<'a> {
    /// The counters to decrement on drop.
    stats: &'a Stats,
    /// Requests in flight when this one arrived, itself included.
    pub(crate) level: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.stats
            .update(|s| s.in_flight = s.in_flight.saturating_sub(1));
    }
}

/// A streamed body being sent; dropping it ends its count.
pub(crate) struct Streaming {
    stats: std::sync::Arc<Stats>,
}

impl Streaming {
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.stats
            .update(|s| s.streaming_bodies = s.streaming_bodies.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_tracks_guards() {
        let stats = Stats::default();
        let a = stats.enter();
        let b = stats.enter();
        assert_eq!((a.level, b.level), (1, 2));
        drop(a);
        assert_eq!(stats.snapshot().in_flight, 1);
        assert_eq!(stats.snapshot().max_in_flight, 2);
        stats.reset();
        assert_eq!(stats.snapshot().max_in_flight, 1);
        drop(b);
        assert_eq!(stats.snapshot().in_flight, 0);
    }

    #[test]
    fn stats_json_keys_statuses_as_strings() {
        let stats = Stats::default();
        stats.responded(200);
        stats.responded(200);
        stats.failed(FailureKind::Drop);
        let json = serde_json::to_value(stats.snapshot()).expect("serializable");
        assert_eq!(json["responses"]["200"], 2);
        assert_eq!(json["failures"]["drop"], 1);
        assert_eq!(json["failures"]["total"], 1);
        let back: SimStats = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, stats.snapshot());
    }

    #[tokio::test]
    async fn wait_until_sees_later_changes() {
        let stats = std::sync::Arc::new(Stats::default());
        let waiter = {
            let stats = std::sync::Arc::clone(&stats);
            tokio::spawn(async move {
                stats
                    .wait_until(|s| s.requests.total >= 2, Duration::from_secs(30))
                    .await
            })
        };
        stats.received(Endpoint::Embeddings);
        stats.received(Endpoint::Completions);
        assert!(waiter.await.expect("waiter task"));
        assert!(
            !stats
                .wait_until(|s| s.requests.total >= 3, Duration::ZERO)
                .await
        );
    }
}
