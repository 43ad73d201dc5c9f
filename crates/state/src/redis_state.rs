//! The Redis adapter.
//!
//! See [`RedisState`] for the key layout, the record script and deployment notes.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use nightshift_core::secret::Secret;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script};
use serde::{Deserialize, Serialize};

use crate::{
    LineOutcome, LiveCounts, LiveState, PermitGrant, PermitLease, Result, StateError,
    check_batch_id, check_lease, check_outcomes, usage_fields, usage_from_fields,
};

/// Fields of the counts hash, in the order [`parse_counts`] reads them: `completed`, `failed`,
/// then the usage fields in the order of [`usage_fields`]. The record script writes the same
/// names.
const COUNT_FIELDS: [&str; 7] = [
    "completed",
    "failed",
    "input_tokens",
    "cached_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
];

/// The record script; see `record.lua` for its contract.
static RECORD: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("record.lua")));

/// The permit-lease script; see `lease.lua` for its contract.
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lease.lua")));

/// Longest wait between two connection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Shortest accepted TTL: anything shorter would expire keys under a running batch.
const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest accepted TTL (about ten years): keeps `PEXPIRE` far from its overflow limit.
const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// How to reach Redis and how to name and expire the keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// `redis://[[user]:password@]host[:port][/db]`. A secret: it may hold a password, so it
    /// is never printed.
    pub url: Secret,
    /// Prepended to every key, so several deployments or test runs can share one Redis.
    /// Must not contain `{` or `}`: the batch id is the keys' hash tag.
    pub key_prefix: String,
    /// Every key of a batch expires this long after the batch's last write (at least 1 s).
    /// Must exceed the longest completion window, so that keys of a running batch never
    /// expire; bounds how long a batch that was never cleared keeps its keys.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("redis://127.0.0.1:6379"),
            key_prefix: "nightshift:".into(),
            // A day beyond the longest completion window (7 days).
            ttl: Duration::from_secs(8 * 24 * 3600),
        }
    }
}

impl StateConfig {
    /// Checks what can be checked without connecting.
    pub fn validate(&self) -> Result<()> {
        if self.url.is_empty() {
            return Err(StateError::Config("state.url is empty".into()));
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err(StateError::Config(
                "state.key_prefix must not contain '{' or '}': the batch id is the keys' hash tag"
                    .into(),
            ));
        }
        if !(MIN_TTL..=MAX_TTL).contains(&self.ttl) {
            return Err(StateError::Config(
                "state.ttl must be between 1 second and 10 years".into(),
            ));
        }
        Ok(())
    }
}

/// The Redis keys of one batch (see [`RedisState`] for what each holds). For
/// operators and tests; services go through [`LiveState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchKeys {
    /// The bitmap of counted lines.
    pub done: String,
    /// The hash of counts and usage.
    pub counts: String,
    /// The cancel flag.
    pub cancelled: String,
}

/// [`LiveState`] over Redis. Cheap to clone: clones share one connection.
///
/// # Record script
///
/// [`record`](LiveState::record) is one `EVALSHA` of `record.lua` per call, whatever the number
/// of lines: keys `done`, `counts`, `cancelled`; arguments the TTL, then seven per line (line,
/// succeeded, the five usage fields). For each line it `SETBIT`s the line's bit and, only when
/// the old bit was 0, adds the line to the call's sums; then it `HINCRBY`s the sums into the
/// counts hash and `PEXPIRE`s the three keys. Redis runs scripts atomically, which gives the
/// exactly-once and atomic-per-call guarantees; inputs are validated before the call because
/// Redis does not roll back a script that fails halfway. The script is loaded at connect and
/// reloaded transparently after a Redis restart or `SCRIPT FLUSH` (on `NOSCRIPT`).
///
/// Redis serves nothing else while a script runs: about 3.5 µs per line (measured on a
/// shared dev machine), so ~3.5 ms for a 1000-line call. Keep calls to chunk size (hundreds to a few thousand lines);
/// a call of hundreds of thousands of lines would stall Redis and outlast the 500 ms response
/// timeout (it would still be applied once, and retrying it would count nothing twice).
///
/// # Key layout
///
/// Every key of a batch lives under the configured prefix and carries the batch id as a Redis
/// Cluster hash tag (`{…}`), so all keys of one batch hash to the same slot and the record
/// script, which touches three of them, stays valid on a cluster:
///
/// | key | type | holds |
/// | --- | --- | --- |
/// | `{prefix}batch:{<id>}:done` | string used as a bitmap | bit `n` set = line `n` (1-based) was counted |
/// | `{prefix}batch:{<id>}:counts` | hash | `completed`, `failed`, `input_tokens`, `cached_tokens`, `output_tokens`, `reasoning_tokens`, `total_tokens` (absent field = 0) |
/// | `{prefix}batch:{<id>}:cancelled` | string `"1"` | present = cancel flag raised |
/// | `{prefix}upstream:{<name>}:leases` | hash | per executor (holder id): `granted:want:expires_ms` of its permit lease ([`LiveState::lease_permits`], one `EVALSHA` of `lease.lua`); the hash expires a lease TTL after the last call |
///
/// The bitmap is as long as the highest line recorded: one bit per line, so ~1.25 MB for a
/// 10-million-line batch (and up to 512 MB at [`MAX_LINE`](crate::MAX_LINE), Redis' own
/// limit). Redis allocates it up to the highest offset at once, whatever order chunks finish in.
///
/// Every `record` gives all three keys the configured TTL again (even when it counts nothing
/// new), and `set_cancelled` gives the flag its TTL, so the keys of a batch that nobody clears
/// (a finalizer that crashed after committing) vanish `ttl` after the last write. The TTL must exceed the longest time a batch may run without a write to its keys
/// (the longest completion window is a safe bound).
///
/// # Deployment notes
///
/// - The adapter talks to one Redis server through a [`ConnectionManager`] (one multiplexed
///   connection, reconnected in the background after a failure). Commands that fail during an
///   outage return [`StateError::Backend`]; retrying `record` is always safe.
/// - Run Redis with `maxmemory-policy noeviction` (its default): under any evicting policy
///   Redis may drop a batch's bitmap (every key here has a TTL, so even `volatile-*` policies
///   qualify), after which redelivered lines would be counted twice.
/// - Persistence is optional. After a restart without it the live counts restart from zero
///   (counts and marks vanish together, so nothing is counted twice; the final numbers, which
///   the finalizer recounts from the result parts, are not affected) and so do cancel flags,
///   which must then be raised again from Postgres.
#[derive(Clone)]
pub struct RedisState {
    /// Multiplexed connection, reconnected in the background after failures.
    conn: ConnectionManager,
    /// `StateConfig::key_prefix`.
    prefix: Arc<str>,
    /// `StateConfig::ttl` in milliseconds, as `PEXPIRE` and `SET … PX` take it.
    ttl_ms: u64,
}

impl fmt::Debug for RedisState {
    // Not derived: the connection's Debug would print the URL, password included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

/// Connection attempts back off exponentially from 100 ms, with jitter, capped at
/// [`MAX_RECONNECT_DELAY`], six times in a row: `connect` gives up after a few seconds, and
/// after an outage the connection is back within about a second of Redis. Each attempt times out
/// after 1 s and each command after 500 ms (the crate's defaults; a 1000-line record takes a
/// few milliseconds).
fn connection_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(MAX_RECONNECT_DELAY)
        .set_number_of_retries(6)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_millis(500)))
}

fn backend(error: RedisError) -> StateError {
    StateError::Backend(error.to_string())
}

impl RedisState {
    /// Validates the configuration, connects, and loads the record script: fails fast when
    /// Redis is unreachable or refuses scripts. Later outages are survived: the connection is
    /// re-established in the background and calls fail with [`StateError::Backend`] meanwhile.
    pub async fn connect(config: &StateConfig) -> Result<Self> {
        config.validate()?;
        // The error text of an unparsable URL never quotes the URL (which may hold a password).
        let client = redis::Client::open(config.url.expose())
            .map_err(|e| StateError::Config(format!("state.url is not a Redis URL: {e}")))?;
        let mut conn = ConnectionManager::new_with_config(client, connection_config())
            .await
            .map_err(backend)?;
        RECORD.load_async(&mut conn).await.map_err(backend)?;
        LEASE.load_async(&mut conn).await.map_err(backend)?;
        Ok(Self {
            conn,
            prefix: config.key_prefix.as_str().into(),
            ttl_ms: u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The keys holding `batch`'s state. Fails only for an invalid batch id.
    pub fn keys(&self, batch: &str) -> Result<BatchKeys> {
        Ok(BatchKeys {
            done: self.key(batch, "done")?,
            counts: self.key(batch, "counts")?,
            cancelled: self.key(batch, "cancelled")?,
        })
    }

    /// The hash of `upstream`'s permit leases: `{prefix}upstream:{<upstream>}:leases`. The name
    /// is not checked here ([`LiveState::lease_permits`] does).
    pub fn leases_key(&self, upstream: &str) -> String {
        format!("{}upstream:{{{upstream}}}:leases", self.prefix)
    }

    /// `{prefix}batch:{<batch>}:<kind>`, after checking the batch id (which keeps `{`, `}`
    /// and `:` out of it, so the hash tag and the layout cannot be subverted).
    fn key(&self, batch: &str, kind: &str) -> Result<String> {
        check_batch_id(batch)?;
        Ok(format!("{}batch:{{{batch}}}:{kind}", self.prefix))
    }
}

/// Reads an `HMGET` of [`COUNT_FIELDS`]; missing fields (or a missing hash) are zeros.
fn parse_counts(values: &[Option<u64>]) -> Result<LiveCounts> {
    let [completed, failed, input, cached, output, reasoning, total] =
        <[Option<u64>; 7]>::try_from(values)
            .map_err(|_| {
                StateError::Backend(format!(
                    "HMGET of the counts hash returned {} values instead of 7",
                    values.len()
                ))
            })?
            .map(Option::unwrap_or_default);
    Ok(LiveCounts {
        completed,
        failed,
        usage: usage_from_fields([input, cached, output, reasoning, total]),
    })
}

#[async_trait]
impl LiveState for RedisState {
    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch, lines = outcomes.len()))]
    async fn record(&self, batch: &str, outcomes: &[LineOutcome]) -> Result<u64> {
        let keys = self.keys(batch)?;
        check_outcomes(outcomes)?;
        if outcomes.is_empty() {
            return Ok(0);
        }
        let mut call = RECORD.prepare_invoke();
        call.key(&keys.done)
            .key(&keys.counts)
            .key(&keys.cancelled)
            .arg(self.ttl_ms);
        for outcome in outcomes {
            call.arg(outcome.line).arg(u8::from(outcome.succeeded));
            for value in usage_fields(&outcome.usage) {
                call.arg(value);
            }
        }
        call.invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn counts(&self, batch: &str) -> Result<LiveCounts> {
        let values: Vec<Option<u64>> = redis::cmd("HMGET")
            .arg(self.key(batch, "counts")?)
            .arg(&COUNT_FIELDS[..])
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        parse_counts(&values)
    }

    async fn counts_many(&self, batches: &[&str]) -> Result<Vec<LiveCounts>> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for batch in batches {
            pipe.cmd("HMGET")
                .arg(self.key(batch, "counts")?)
                .arg(&COUNT_FIELDS[..]);
        }
        let rows: Vec<Vec<Option<u64>>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        if rows.len() != batches.len() {
            return Err(StateError::Backend(format!(
                "pipeline of {} HMGETs returned {} replies",
                batches.len(),
                rows.len()
            )));
        }
        rows.iter().map(|row| parse_counts(row)).collect()
    }

    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch))]
    async fn set_cancelled(&self, batch: &str) -> Result<()> {
        redis::cmd("SET")
            .arg(self.key(batch, "cancelled")?)
            .arg("1")
            .arg("PX")
            .arg(self.ttl_ms)
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn is_cancelled(&self, batch: &str) -> Result<bool> {
        redis::cmd("EXISTS")
            .arg(self.key(batch, "cancelled")?)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(batch_id = %batch))]
    async fn clear(&self, batch: &str) -> Result<()> {
        let keys = self.keys(batch)?;
        redis::cmd("DEL")
            .arg(&keys.done)
            .arg(&keys.counts)
            .arg(&keys.cancelled)
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(backend)
    }

    async fn lease_permits(&self, lease: &PermitLease<'_>) -> Result<PermitGrant> {
        check_lease(lease)?;
        let ttl_ms = u64::try_from(lease.ttl.as_millis()).unwrap_or(u64::MAX);
        let (granted, share, holders): (u32, u32, u32) = LEASE
            .key(self.leases_key(lease.upstream))
            .arg(lease.holder)
            .arg(lease.want)
            .arg(lease.keep)
            .arg(lease.cap)
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(backend)?;
        Ok(PermitGrant {
            granted,
            share,
            holders,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let config = StateConfig::default();
        config.validate().unwrap();
        assert_eq!(config.url.expose(), "redis://127.0.0.1:6379");
        assert_eq!(config.key_prefix, "nightshift:");
        assert_eq!(config.ttl, Duration::from_secs(8 * 24 * 3600));

        let bad = |edit: fn(&mut StateConfig)| {
            let mut config = StateConfig::default();
            edit(&mut config);
            matches!(config.validate(), Err(StateError::Config(_)))
        };
        assert!(bad(|c| c.url = Secret::new("")));
        assert!(bad(|c| c.key_prefix = "ns:{x}:".into()));
        assert!(bad(|c| c.ttl = Duration::from_millis(999)));
        assert!(bad(|c| c.ttl = Duration::MAX));
    }

    #[test]
    fn config_from_toml() {
        let config: StateConfig = toml::from_str(
            r#"
            url = "redis://:hunter2@redis:6379/2"
            ttl = "3days 12h"
            "#,
        )
        .unwrap();
        assert_eq!(config.url.expose(), "redis://:hunter2@redis:6379/2");
        assert_eq!(config.key_prefix, "nightshift:");
        assert_eq!(config.ttl, Duration::from_secs(84 * 3600));
        // the URL is a secret
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!toml::to_string(&config).unwrap().contains("hunter2"));
        assert!(toml::from_str::<StateConfig>("urll = \"redis://x\"").is_err());
    }

    #[test]
    fn counts_parse_missing_fields_as_zero() {
        assert_eq!(parse_counts(&[None; 7]).unwrap(), LiveCounts::default());
        let counts =
            parse_counts(&[Some(1), Some(2), Some(3), None, Some(5), Some(6), Some(7)]).unwrap();
        assert_eq!((counts.completed, counts.failed), (1, 2));
        assert_eq!(usage_fields(&counts.usage), [3, 0, 5, 6, 7]);
        assert!(matches!(
            parse_counts(&[None; 3]),
            Err(StateError::Backend(_))
        ));
    }

    #[tokio::test]
    async fn bad_url_is_a_config_error_without_the_password() {
        let config = StateConfig {
            url: Secret::new("http://:hunter2@nowhere"),
            ..StateConfig::default()
        };
        match RedisState::connect(&config).await {
            Err(StateError::Config(message)) => assert!(!message.contains("hunter2"), "{message}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
