//! The simulator's configuration: one struct, read from CLI flags, `INFERENCE_SIM_*`
//! environment variables or serde (TOML/JSON) alike.

use serde::{Deserialize, Serialize};

/// How the simulator behaves. `Default` is a fast, perfectly healthy server that accepts any
/// model name; every knob below makes it slower, smaller or less reliable.
///
/// The clap defaults are the `Default` values (a unit test keeps them in step), so the binary
/// without flags behaves exactly like `SimConfig::default()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Fixed part of every successful request's simulated latency, in milliseconds.
    #[arg(long, env = "INFERENCE_SIM_BASE_LATENCY_MS", default_value_t = 0)]
    pub base_latency_ms: u64,

    /// Latency added per completion token of a successful response, in milliseconds
    /// (fractional values allowed). Embeddings have no completion tokens, so they only pay
    /// `base_latency_ms`.
    #[arg(
        long,
        env = "INFERENCE_SIM_PER_TOKEN_LATENCY_MS",
        default_value_t = 0.0
    )]
    pub per_token_latency_ms: f64,

    /// Most inference requests handled at once; an arrival beyond it is answered at once with
    /// 429 and `Retry-After`. 0 means unlimited.
    #[arg(long, env = "INFERENCE_SIM_MAX_CONCURRENCY", default_value_t = 0)]
    pub max_concurrency: u64,

    /// Seconds advertised in `Retry-After` (rounded up to whole seconds) and `retry-after-ms`
    /// on capacity and rate-injected 429s.
    #[arg(long, env = "INFERENCE_SIM_RETRY_AFTER_SECS", default_value_t = 1.0)]
    pub retry_after_secs: f64,

    /// Probability (0.0..=1.0) that a request is answered 500 with a `server_error` envelope.
    #[arg(
        long = "rate-500",
        env = "INFERENCE_SIM_RATE_500",
        default_value_t = 0.0
    )]
    pub rate_500: f64,

    /// Probability that a request is answered 429 `rate_limit_error` with `Retry-After`.
    #[arg(
        long = "rate-429",
        env = "INFERENCE_SIM_RATE_429",
        default_value_t = 0.0
    )]
    pub rate_429: f64,

    /// Probability that a request is held open for `timeout_hold_ms` and then has its
    /// connection closed, never answered.
    #[arg(long, env = "INFERENCE_SIM_RATE_TIMEOUT", default_value_t = 0.0)]
    pub rate_timeout: f64,

    /// Probability that the TCP connection is closed without any response bytes.
    #[arg(long, env = "INFERENCE_SIM_RATE_DROP", default_value_t = 0.0)]
    pub rate_drop: f64,

    /// Probability of a 200 with `Content-Type: application/json` and a truncated JSON body.
    #[arg(long, env = "INFERENCE_SIM_RATE_MALFORMED", default_value_t = 0.0)]
    pub rate_malformed: f64,

    /// Seed of the RNG that draws rate-based failures; the same seed and the same request
    /// order give the same failures. `POST /sim/reset` re-seeds it.
    #[arg(long, env = "INFERENCE_SIM_SEED", default_value_t = 0)]
    pub seed: u64,

    /// How long a "timeout" failure holds the request before closing the connection
    /// unanswered, in milliseconds. Default 10 minutes: longer than any sane client timeout.
    #[arg(long, env = "INFERENCE_SIM_TIMEOUT_HOLD_MS", default_value_t = 600_000)]
    pub timeout_hold_ms: u64,

    /// Length of embedding vectors when the request has no `dimensions` field.
    #[arg(long, env = "INFERENCE_SIM_EMBEDDING_DIM", default_value_t = 384)]
    pub embedding_dim: u32,

    /// Completion-token cap when a request gives neither `max_tokens` nor
    /// `max_completion_tokens`. Natural completion lengths are 8..=64 tokens.
    #[arg(long, env = "INFERENCE_SIM_DEFAULT_MAX_TOKENS", default_value_t = 64)]
    pub default_max_tokens: u32,

    /// Model ids listed by `GET /v1/models` (comma-separated on the command line).
    #[arg(
        long,
        env = "INFERENCE_SIM_MODELS",
        value_delimiter = ',',
        default_values_t = default_models()
    )]
    pub models: Vec<String>,

    /// When true, a request naming a model not in `models` gets 404 `model_not_found`;
    /// when false (default) any model name is accepted.
    #[arg(long, env = "INFERENCE_SIM_STRICT_MODELS", default_value_t = false)]
    pub strict_models: bool,

    /// How many request identities the `fail_times` attempt memory keeps; the oldest is
    /// forgotten first (its next attempt counts as the first again). 0 disables the memory.
    #[arg(long, env = "INFERENCE_SIM_ATTEMPT_MEMORY", default_value_t = 100_000)]
    pub attempt_memory: usize,

    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, env = "INFERENCE_SIM_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Pads every successful answer to this many bytes (a `sim_padding` string key is added
    /// to the JSON object), to stand in for huge answers (`n`, `logprobs`, long generations).
    /// The padding is streamed in 64 KiB pieces, never held whole. 0 (default), or a size
    /// below the answer's own: the answer as it is. A `sim` directive's `response_bytes`
    /// overrides it.
    #[arg(long, env = "INFERENCE_SIM_RESPONSE_BYTES", default_value_t = 0)]
    pub response_bytes: u64,

    /// Sends successful answers without `Content-Length` (chunked transfer encoding), so a
    /// client learns their size only by reading them. A `sim` directive's `chunked`
    /// overrides it.
    #[arg(long, env = "INFERENCE_SIM_CHUNKED_RESPONSES", default_value_t = false)]
    pub chunked_responses: bool,
}

fn default_models() -> Vec<String> {
    [
        "sim-chat",
        "sim-embed",
        "gpt-4o-mini",
        "text-embedding-3-small",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            base_latency_ms: 0,
            per_token_latency_ms: 0.0,
            max_concurrency: 0,
            retry_after_secs: 1.0,
            rate_500: 0.0,
            rate_429: 0.0,
            rate_timeout: 0.0,
            rate_drop: 0.0,
            rate_malformed: 0.0,
            seed: 0,
            timeout_hold_ms: 600_000,
            embedding_dim: 384,
            default_max_tokens: 64,
            models: default_models(),
            strict_models: false,
            attempt_memory: 100_000,
            max_body_bytes: 32 * 1024 * 1024,
            response_bytes: 0,
            chunked_responses: false,
        }
    }
}

/// A configuration that cannot be served.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A failure rate outside 0.0..=1.0 (or NaN).
    #[error("{name} must be within 0.0..=1.0, got {value}")]
    RateOutOfRange { name: &'static str, value: f64 },
    /// The failure rates together exceed certainty.
    #[error("failure rates add up to {sum}, more than 1.0")]
    RatesExceedOne { sum: f64 },
    /// A negative, infinite or NaN duration.
    #[error("{name} must be a finite number >= 0, got {value}")]
    InvalidDuration { name: &'static str, value: f64 },
    /// A field that must be at least 1.
    #[error("{name} must be at least 1")]
    Zero { name: &'static str },
}

impl SimConfig {
    /// The failure rates in the order they are drawn: 500, 429, timeout, drop, malformed.
    pub(crate) fn rates(&self) -> [(&'static str, f64); 5] {
        [
            ("rate_500", self.rate_500),
            ("rate_429", self.rate_429),
            ("rate_timeout", self.rate_timeout),
            ("rate_drop", self.rate_drop),
            ("rate_malformed", self.rate_malformed),
        ]
    }

    /// Checks what the types cannot: rates are probabilities, durations are sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut sum = 0.0;
        for (name, value) in self.rates() {
            if !(0.0..=1.0).contains(&value) {
                return Err(ConfigError::RateOutOfRange { name, value });
            }
            sum += value;
        }
        // A little slack so that e.g. 0.7 + 0.2 + 0.1 is not rejected for rounding.
        if sum > 1.0 + 1e-9 {
            return Err(ConfigError::RatesExceedOne { sum });
        }
        for (name, value) in [
            ("per_token_latency_ms", self.per_token_latency_ms),
            ("retry_after_secs", self.retry_after_secs),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ConfigError::InvalidDuration { name, value });
            }
        }
        if self.embedding_dim == 0 {
            return Err(ConfigError::Zero {
                name: "embedding_dim",
            });
        }
        if self.default_max_tokens == 0 {
            return Err(ConfigError::Zero {
                name: "default_max_tokens",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: SimConfig,
    }

    #[test]
    fn clap_defaults_match_default() {
        let cli = Cli::parse_from(["inference-sim"]);
        assert_eq!(cli.config, SimConfig::default());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::parse_from([
            "inference-sim",
            "--rate-500",
            "0.25",
            "--rate-429",
            "0.5",
            "--models",
            "a,b",
            "--max-concurrency",
            "4",
            "--strict-models",
            "--response-bytes",
            "1000000",
            "--chunked-responses",
        ]);
        assert_eq!(cli.config.rate_500, 0.25);
        assert_eq!(cli.config.rate_429, 0.5);
        assert_eq!(cli.config.models, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(cli.config.max_concurrency, 4);
        assert!(cli.config.strict_models);
        assert_eq!(cli.config.response_bytes, 1_000_000);
        assert!(cli.config.chunked_responses);
    }

    #[test]
    fn serde_fills_defaults() {
        let config: SimConfig =
            serde_json::from_str(r#"{"rate_drop": 0.5}"#).expect("valid config json");
        assert_eq!(config.rate_drop, 0.5);
        assert_eq!(config.timeout_hold_ms, 600_000);
    }

    #[test]
    fn validate_rejects_bad_rates() {
        assert_eq!(SimConfig::default().validate(), Ok(()));
        let config = SimConfig {
            rate_500: 1.5,
            ..SimConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RateOutOfRange {
                name: "rate_500",
                ..
            })
        ));
        let config = SimConfig {
            rate_500: 0.7,
            rate_drop: 0.7,
            ..SimConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::RatesExceedOne { .. })
        ));
        let config = SimConfig {
            rate_500: 0.7,
            rate_429: 0.2,
            rate_drop: 0.1,
            ..SimConfig::default()
        };
        assert_eq!(config.validate(), Ok(()));
    }
}
