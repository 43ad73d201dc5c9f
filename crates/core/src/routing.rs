//! The model routing table: which upstream inference server serves which model, and how
//! nightshift may call it.
//!
//! Pure configuration, shared by the scheduler (a batch whose model no upstream serves fails
//! validation with `model_not_found`) and the executor (which builds one HTTP upstream per
//! entry). In TOML:
//!
//! ```toml
//! [[routing.upstreams]]
//! name = "vllm-a"
//! base_url = "http://10.0.0.5:8000/v1"
//! models = ["llama-3.1-8b", "qwen2.5-7b"]
//! max_concurrency = 128
//! timeout = "5m"
//! max_response_bytes = 33554432   # 32 MiB; default 16 MiB
//! endpoints = ["/v1/rerank", "/v1/score"]   # beyond OpenAI's five; see `endpoints`
//!
//! [[routing.upstreams]]
//! name = "openai"
//! base_url = "https://api.openai.com/v1"
//! api_key_env = "OPENAI_API_KEY"
//! models = ["*"]
//! ```
//!
//! Routing is first match in file order: an upstream matches a model when its `models` list
//! names the model exactly or holds [`DEFAULT_ROUTE`] (`"*"`). [`RoutingConfig::validate`]
//! refuses tables where an entry could never match (a model listed twice, an upstream after
//! the default route), so the order only ever matters for the default route, which must be
//! last.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validation::MAX_MODEL_CHARS;

/// The `models` entry that makes an upstream the default route: it serves every model that no
/// earlier upstream lists.
pub const DEFAULT_ROUTE: &str = "*";

/// The routing table: upstreams in match order. Empty by default (no model is served).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Upstreams, in match order; see [`route`](Self::route).
    pub upstreams: Vec<UpstreamConfig>,
}

/// One OpenAI-compatible upstream (vLLM, SGLang, llama.cpp, Ollama, TGI, a hosted API) and
/// the policy nightshift calls it with.
///
/// Every field but `name`, `base_url` and `models` has a default; durations are written as
/// the rest of nightshift's configuration writes them (`humantime`'s syntax): `"250ms"`,
/// `"30s"`, `"10m"`, `"1h 30m"`; a bare number has no unit and is refused.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Operator-chosen name, unique in the table. Used in logs and as the `upstream` metric
    /// label, so it is limited to ASCII letters, digits, `-`, `_` and `.` (at most 64).
    pub name: String,

    /// Root of the upstream's OpenAI API, `http://` or `https://`, e.g.
    /// `http://127.0.0.1:8000/v1` — what an OpenAI SDK takes as `base_url`. See
    /// [`endpoint_url`](Self::endpoint_url) for how request paths are joined to it. Must not
    /// carry credentials, a query or a fragment.
    pub base_url: String,

    /// Name of the environment variable that holds the upstream's API key, sent as
    /// `Authorization: Bearer <key>`. Never the key itself. `None`: no `Authorization` header.
    #[serde(default)]
    pub api_key_env: Option<String>,

    /// Model names this upstream serves, matched exactly (case-sensitive), or
    /// [`DEFAULT_ROUTE`] for every model not listed by an earlier upstream. Not empty.
    pub models: Vec<String>,

    /// Most requests in flight to this upstream at once, from all batches and every executor
    /// together: the executors share it through permit leases in the live state (the
    /// adaptive limit of each never grows past its lease). Default 64.
    #[serde(default = "defaults::max_concurrency")]
    pub max_concurrency: u32,

    /// Where the adaptive concurrency limit starts its slow start (doubling every round trip
    /// until the first 429 or timeout, then AIMD), 1..=`max_concurrency`. `None`
    /// (default): `min(8, max_concurrency)`. See [`initial_limit`](Self::initial_limit).
    #[serde(default)]
    pub initial_concurrency: Option<u32>,

    /// Longest wait for one attempt's complete answer (headers and body). There is no total
    /// timeout besides the batch deadline. Default 10 minutes: long generations are normal.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,

    /// Most attempts per request, the first included (1 = never retry). Default 5.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,

    /// Backoff before the first retry; it doubles per retry up to `backoff_max`, and the
    /// actual wait is drawn uniformly below it (full jitter). Default 250 ms.
    #[serde(default = "defaults::backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,

    /// Ceiling of the exponential backoff. Default 30 s.
    #[serde(default = "defaults::backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,

    /// Longest wait granted to an upstream's `Retry-After` / `retry-after-ms`; a longer ask
    /// is cut to this. Bounds how long one misbehaving header can hold a request (and its
    /// chunk). Default 60 s.
    #[serde(default = "defaults::max_retry_after", with = "humantime_serde")]
    pub max_retry_after: Duration,

    /// Largest answer body read from this upstream, in bytes (at least
    /// [`MIN_MAX_RESPONSE_BYTES`]). The body is read as it arrives and never held past this;
    /// an answer that declares a larger `Content-Length` is refused before its body is read.
    /// A larger answer ends its request with a `response_too_large` error line (not retried:
    /// the same request would be answered as large again). Bounds an executor's memory: at
    /// most `max_concurrency` bodies of this size are read at once per upstream, whatever
    /// `n`, `max_tokens` or `logprobs` the requests ask for. Result lines are at most this
    /// plus the line's `custom_id` and ~200 bytes. Default 16 MiB.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: usize,

    /// Batch endpoints this upstream serves besides OpenAI's
    /// ([`SUPPORTED_ENDPOINTS`](crate::batch::SUPPORTED_ENDPOINTS), which every upstream is
    /// taken to serve), e.g. vLLM's `/v1/rerank`, `/v1/score`, `/v1/classify`. A batch may
    /// name such an endpoint only if some upstream declares it, and its model must route to an
    /// upstream that does (else validation fails with `endpoint_not_served`). Bodies are
    /// forwarded verbatim and answers kept as they are, usage summed when they carry one.
    /// Each is a path under `/v1/` of letters, digits, `_`, `-`, `.` and `/` (see
    /// [`check_endpoint_path`]). Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
}

/// Checks the shape of an operator-declared endpoint (or of a batch's `endpoint` before it is
/// looked up): a path starting with `/v1/`, at most 128 characters of ASCII letters, digits,
/// `_`, `-`, `.` and `/`, with no empty, `.` or `..` segment — so no query, fragment,
/// traversal or encoding trick can reach another path of the upstream than the one written.
///
/// # Errors
/// Why it is refused, for a message.
pub fn check_endpoint_path(path: &str) -> Result<(), &'static str> {
    let Some(rest) = path.strip_prefix("/v1/") else {
        return Err("must start with /v1/");
    };
    if path.len() > 128 {
        return Err("must be at most 128 characters");
    }
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
    {
        return Err(
            "may only hold ASCII letters, digits, '_', '-', '.' and '/' (no query, no fragment)",
        );
    }
    if rest
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err("must not have an empty, '.' or '..' segment");
    }
    Ok(())
}

/// The smallest [`UpstreamConfig::max_response_bytes`] accepted: 64 KiB (an ordinary answer,
/// or an error page, must fit).
pub const MIN_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Default values of [`UpstreamConfig`]'s optional fields.
pub mod defaults {
    use std::time::Duration;

    /// [`UpstreamConfig::max_concurrency`](super::UpstreamConfig::max_concurrency).
    pub fn max_concurrency() -> u32 {
        64
    }
    /// The AIMD limit's start when `initial_concurrency` is unset, before the cap by
    /// `max_concurrency`.
    pub const INITIAL_CONCURRENCY: u32 = 8;
    /// [`UpstreamConfig::timeout`](super::UpstreamConfig::timeout).
    pub fn timeout() -> Duration {
        Duration::from_secs(600)
    }
    /// [`UpstreamConfig::max_attempts`](super::UpstreamConfig::max_attempts).
    pub fn max_attempts() -> u32 {
        5
    }
    /// [`UpstreamConfig::backoff_base`](super::UpstreamConfig::backoff_base).
    pub fn backoff_base() -> Duration {
        Duration::from_millis(250)
    }
    /// [`UpstreamConfig::backoff_max`](super::UpstreamConfig::backoff_max).
    pub fn backoff_max() -> Duration {
        Duration::from_secs(30)
    }
    /// [`UpstreamConfig::max_retry_after`](super::UpstreamConfig::max_retry_after).
    pub fn max_retry_after() -> Duration {
        Duration::from_secs(60)
    }
    /// [`UpstreamConfig::max_response_bytes`](super::UpstreamConfig::max_response_bytes):
    /// 16 MiB.
    pub fn max_response_bytes() -> usize {
        16 * 1024 * 1024
    }
}

impl UpstreamConfig {
    /// An upstream with every optional field at its default.
    pub fn new(
        name: impl Into<String>,
        base_url: impl Into<String>,
        models: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            api_key_env: None,
            models: models.into_iter().map(Into::into).collect(),
            max_concurrency: defaults::max_concurrency(),
            initial_concurrency: None,
            timeout: defaults::timeout(),
            max_attempts: defaults::max_attempts(),
            backoff_base: defaults::backoff_base(),
            backoff_max: defaults::backoff_max(),
            max_retry_after: defaults::max_retry_after(),
            max_response_bytes: defaults::max_response_bytes(),
            endpoints: Vec::new(),
        }
    }

    /// True when this upstream serves batch `endpoint`: one of OpenAI's, or one it declares.
    pub fn serves_endpoint(&self, endpoint: &str) -> bool {
        crate::batch::SUPPORTED_ENDPOINTS.contains(&endpoint)
            || self.endpoints.iter().any(|e| e == endpoint)
    }

    /// Where the adaptive concurrency limit starts: `initial_concurrency`, or
    /// `min(8, max_concurrency)` when unset; never above `max_concurrency`, never below 1.
    pub fn initial_limit(&self) -> u32 {
        let max = self.max_concurrency.max(1);
        self.initial_concurrency
            .unwrap_or(defaults::INITIAL_CONCURRENCY)
            .clamp(1, max)
    }

    /// True when this upstream is the default route (its `models` holds `"*"`).
    pub fn is_default_route(&self) -> bool {
        self.models.iter().any(|m| m == DEFAULT_ROUTE)
    }

    /// True when this upstream matches `model`: listed exactly, or the default route.
    pub fn matches(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model || m == DEFAULT_ROUTE)
    }

    /// The URL a batch endpoint (`/v1/chat/completions`, `/v1/embeddings`, ...) is sent to.
    ///
    /// `base_url` is read as an OpenAI SDK reads its `base_url`: the API root, version
    /// included. The joining rule:
    ///
    /// 1. the endpoint's leading `/v1` is removed (`/v1/chat/completions` → `/chat/completions`);
    /// 2. when `base_url` has no path at all (`http://host:8000` or `http://host:8000/`), the
    ///    standard `/v1` root is assumed and inserted;
    /// 3. otherwise the rest is appended to `base_url` with its trailing `/` trimmed.
    ///
    /// | `base_url` | `/v1/chat/completions` goes to |
    /// | --- | --- |
    /// | `http://h:8000/v1` (or `/v1/`) | `http://h:8000/v1/chat/completions` |
    /// | `http://h:8000` (or `/`) | `http://h:8000/v1/chat/completions` |
    /// | `https://h/api/openai/v1` | `https://h/api/openai/v1/chat/completions` |
    /// | `https://h/v1beta/openai` | `https://h/v1beta/openai/chat/completions` |
    ///
    /// An endpoint that does not start with `/v1/` is appended as it is (with a `/` added if
    /// it lacks one).
    pub fn endpoint_url(&self, endpoint: &str) -> String {
        let base = self.base_url.trim_end_matches('/');
        let rest = match endpoint.strip_prefix("/v1") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => endpoint,
        };
        let slash = if rest.starts_with('/') { "" } else { "/" };
        let has_path = base
            .split_once("://")
            .is_some_and(|(_, after_scheme)| after_scheme.contains('/'));
        if has_path {
            format!("{base}{slash}{rest}")
        } else {
            format!("{base}/v1{slash}{rest}")
        }
    }

    /// Checks this entry alone; see [`RoutingConfig::validate`].
    fn validate(&self) -> Result<(), String> {
        let name = &self.name;
        if name.is_empty() || name.len() > 64 {
            return Err(format!(
                "upstream name {name:?} must be 1 to 64 characters long"
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "upstream name {name:?} may only contain ASCII letters, digits, '-', '_' and '.'"
            ));
        }
        check_base_url(&self.base_url)
            .map_err(|why| format!("upstream {name:?}: base_url {:?} {why}", self.base_url))?;
        if let Some(var) = &self.api_key_env
            && (var.is_empty() || var.contains(['=', '\0']))
        {
            return Err(format!(
                "upstream {name:?}: api_key_env {var:?} is not an environment variable name"
            ));
        }
        if self.models.is_empty() {
            return Err(format!(
                "upstream {name:?} serves no model: list model names, or \"*\" for the default route"
            ));
        }
        let mut seen = HashSet::new();
        for model in &self.models {
            if model.is_empty() {
                return Err(format!("upstream {name:?} lists an empty model name"));
            }
            if model.chars().count() > MAX_MODEL_CHARS {
                return Err(format!(
                    "upstream {name:?} lists a model name longer than {MAX_MODEL_CHARS} characters"
                ));
            }
            if !seen.insert(model.as_str()) {
                return Err(format!("upstream {name:?} lists model {model:?} twice"));
            }
        }
        if self.max_concurrency == 0 {
            return Err(format!(
                "upstream {name:?}: max_concurrency must be at least 1"
            ));
        }
        if let Some(initial) = self.initial_concurrency
            && !(1..=self.max_concurrency).contains(&initial)
        {
            return Err(format!(
                "upstream {name:?}: initial_concurrency {initial} must be within 1..={}",
                self.max_concurrency
            ));
        }
        if self.timeout.is_zero() {
            return Err(format!("upstream {name:?}: timeout must be above zero"));
        }
        if self.max_attempts == 0 {
            return Err(format!(
                "upstream {name:?}: max_attempts must be at least 1"
            ));
        }
        if self.backoff_base > self.backoff_max {
            return Err(format!(
                "upstream {name:?}: backoff_base ({:?}) must not exceed backoff_max ({:?})",
                self.backoff_base, self.backoff_max
            ));
        }
        if self.max_response_bytes < MIN_MAX_RESPONSE_BYTES {
            return Err(format!(
                "upstream {name:?}: max_response_bytes ({}) must be at least {MIN_MAX_RESPONSE_BYTES}",
                self.max_response_bytes
            ));
        }
        let mut declared = HashSet::new();
        for endpoint in &self.endpoints {
            check_endpoint_path(endpoint)
                .map_err(|why| format!("upstream {name:?}: endpoint {endpoint:?} {why}"))?;
            if crate::batch::SUPPORTED_ENDPOINTS.contains(&endpoint.as_str()) {
                return Err(format!(
                    "upstream {name:?}: endpoint {endpoint:?} is one of OpenAI's, served by \
                     every upstream; list only other endpoints"
                ));
            }
            if !declared.insert(endpoint.as_str()) {
                return Err(format!(
                    "upstream {name:?} lists endpoint {endpoint:?} twice"
                ));
            }
        }
        Ok(())
    }
}

/// Checks the shape of an upstream base URL without a URL library: `http://` or `https://`,
/// a host (optionally `:port`), an optional path; no credentials, query, fragment, whitespace
/// or control characters. The executor parses it fully again when it builds its client.
fn check_base_url(url: &str) -> Result<(), &'static str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("must start with http:// or https://");
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err("must start with http:// or https://");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    if url.contains(['?', '#']) {
        return Err("must not have a query or a fragment");
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.contains('@') {
        return Err("must not carry credentials; use api_key_env");
    }
    let host = match authority.rsplit_once(':') {
        // `[::1]:8000` splits at the port; a bare `[::1]` ends with `]`.
        Some((host, port)) if !authority.ends_with(']') => {
            if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
                return Err("has an invalid port");
            }
            if port.parse::<u16>().is_err() {
                return Err("has a port above 65535");
            }
            host
        }
        _ => authority,
    };
    if host.is_empty() {
        return Err("has no host");
    }
    Ok(())
}

impl RoutingConfig {
    /// The upstream serving `model`: the first whose `models` lists it exactly or is the
    /// default route. `None`: no upstream serves it (a batch for it fails validation with
    /// `model_not_found`).
    pub fn route(&self, model: &str) -> Option<&UpstreamConfig> {
        self.route_index(model).map(|i| &self.upstreams[i])
    }

    /// The position in [`upstreams`](Self::upstreams) of [`route`](Self::route)'s answer.
    pub fn route_index(&self, model: &str) -> Option<usize> {
        self.upstreams.iter().position(|u| u.matches(model))
    }

    /// True when some upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.route_index(model).is_some()
    }

    /// True when a batch may name `endpoint`: one of OpenAI's, or one an upstream declares
    /// ([`UpstreamConfig::endpoints`]).
    pub fn accepts_endpoint(&self, endpoint: &str) -> bool {
        crate::batch::SUPPORTED_ENDPOINTS.contains(&endpoint)
            || self
                .upstreams
                .iter()
                .any(|u| u.endpoints.iter().any(|e| e == endpoint))
    }

    /// Every endpoint a batch may name: OpenAI's, then the declared ones (each once, in
    /// table order).
    pub fn endpoints(&self) -> Vec<&str> {
        let mut all: Vec<&str> = crate::batch::SUPPORTED_ENDPOINTS.to_vec();
        for endpoint in self.upstreams.iter().flat_map(|u| &u.endpoints) {
            if !all.contains(&endpoint.as_str()) {
                all.push(endpoint);
            }
        }
        all
    }

    /// The largest [`max_response_bytes`](UpstreamConfig::max_response_bytes) of the table
    /// (the default when it is empty): no result line an executor with this table writes
    /// holds a larger body, so a reader of result parts sizes its line limit from it.
    pub fn largest_max_response_bytes(&self) -> usize {
        self.upstreams
            .iter()
            .map(|upstream| upstream.max_response_bytes)
            .max()
            .unwrap_or_else(defaults::max_response_bytes)
    }

    /// Checks the table: every entry is well formed (see [`UpstreamConfig`]'s fields), names
    /// are unique, and every entry can match something — a model is listed by one upstream
    /// only, there is at most one default route, and it is the last upstream.
    ///
    /// # Errors
    /// A message naming the offending upstream, for the operator.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = HashSet::new();
        let mut listed_by: HashMap<&str, &str> = HashMap::new();
        let mut default_route: Option<&str> = None;
        for upstream in &self.upstreams {
            upstream.validate()?;
            if !names.insert(upstream.name.as_str()) {
                return Err(format!(
                    "two upstreams are named {:?}; names must be unique",
                    upstream.name
                ));
            }
            if let Some(default) = default_route {
                return Err(format!(
                    "upstream {:?} comes after {default:?}, the default route (\"*\"), so it \
                     would never be used; put the default route last",
                    upstream.name
                ));
            }
            for model in upstream.models.iter().filter(|m| *m != DEFAULT_ROUTE) {
                if let Some(first) = listed_by.insert(model, &upstream.name) {
                    return Err(format!(
                        "model {model:?} is listed by upstreams {first:?} and {:?}; only the \
                         first would be used",
                        upstream.name
                    ));
                }
            }
            if upstream.is_default_route() {
                default_route = Some(&upstream.name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn declared_endpoints_are_checked_and_widen_what_batches_may_name() {
        for good in ["/v1/rerank", "/v1/score", "/v1/classify", "/v1/x/y-z_1.2"] {
            check_endpoint_path(good).unwrap();
        }
        for bad in [
            "/rerank",
            "v1/rerank",
            "/v1/",
            "/v1/rerank?x=1",
            "/v1/rerank#f",
            "/v1/../admin",
            "/v1/a/./b",
            "/v1//rerank",
            "/v1/rerank/",
            "/v1/re rank",
            "/v1/r%2e%2e",
            "/v2/rerank",
        ] {
            assert!(check_endpoint_path(bad).is_err(), "{bad}");
        }
        assert!(check_endpoint_path(&format!("/v1/{}", "a".repeat(125))).is_err());

        let mut rerank = upstream("vllm", &["bge"]);
        rerank.endpoints = vec!["/v1/rerank".into(), "/v1/score".into()];
        let routing = table(vec![rerank.clone(), upstream("rest", &["*"])]);
        routing.validate().unwrap();
        assert!(routing.accepts_endpoint("/v1/rerank"));
        assert!(routing.accepts_endpoint("/v1/chat/completions"));
        assert!(!routing.accepts_endpoint("/v1/classify"));
        assert!(routing.route("bge").unwrap().serves_endpoint("/v1/score"));
        assert!(!routing.route("llama").unwrap().serves_endpoint("/v1/score"));
        assert!(
            routing
                .route("llama")
                .unwrap()
                .serves_endpoint("/v1/embeddings")
        );
        let all = routing.endpoints();
        assert_eq!(all.len(), crate::batch::SUPPORTED_ENDPOINTS.len() + 2);
        assert_eq!(&all[all.len() - 2..], ["/v1/rerank", "/v1/score"]);

        for (endpoints, why) in [
            (vec!["/v1/rerank", "/v1/rerank"], "twice"),
            (vec!["/v1/embeddings"], "one of OpenAI's"),
            (vec!["/v1/rerank?top_n=1"], "no query"),
        ] {
            let mut u = upstream("vllm", &["bge"]);
            u.endpoints = endpoints.into_iter().map(str::to_owned).collect();
            let e = table(vec![u]).validate().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // TOML: the key is optional, and round-trips
        let parsed: UpstreamConfig = toml_like(
            r#"{"name":"v","base_url":"http://h/v1","models":["m"],"endpoints":["/v1/score"]}"#,
        );
        assert_eq!(parsed.endpoints, ["/v1/score"]);
        let parsed: UpstreamConfig =
            toml_like(r#"{"name":"v","base_url":"http://h/v1","models":["m"]}"#);
        assert!(parsed.endpoints.is_empty());
    }

    fn toml_like(json: &str) -> UpstreamConfig {
        serde_json::from_str(json).unwrap()
    }

    fn upstream(name: &str, models: &[&str]) -> UpstreamConfig {
        UpstreamConfig::new(name, "http://127.0.0.1:8000/v1", models.iter().copied())
    }

    fn table(upstreams: Vec<UpstreamConfig>) -> RoutingConfig {
        RoutingConfig { upstreams }
    }

    #[test]
    fn first_match_wins_and_the_default_route_catches_the_rest() {
        let routing = table(vec![
            upstream("a", &["llama", "qwen"]),
            upstream("b", &["mistral"]),
            upstream("c", &["*"]),
        ]);
        routing.validate().unwrap();
        assert_eq!(routing.route("llama").unwrap().name, "a");
        assert_eq!(routing.route("qwen").unwrap().name, "a");
        assert_eq!(routing.route("mistral").unwrap().name, "b");
        assert_eq!(routing.route("gpt-4o-mini").unwrap().name, "c");
        assert_eq!(routing.route_index("mistral"), Some(1));
        assert!(routing.serves("anything"));

        let no_default = table(vec![upstream("a", &["llama"])]);
        assert!(no_default.route("Llama").is_none(), "matching is exact");
        assert!(!no_default.serves("qwen"));
        assert!(!RoutingConfig::default().serves("llama"));
        RoutingConfig::default().validate().unwrap();
    }

    #[test]
    fn toml_like_input_gets_defaults() {
        let routing: RoutingConfig = serde_json::from_value(serde_json::json!({
            "upstreams": [{"name": "vllm", "base_url": "http://h:8000/v1", "models": ["m"]}]
        }))
        .unwrap();
        let u = &routing.upstreams[0];
        assert_eq!(u.max_concurrency, 64);
        assert_eq!(u.initial_limit(), 8);
        assert_eq!(u.timeout, Duration::from_secs(600));
        assert_eq!(u.max_attempts, 5);
        assert_eq!(u.backoff_base, Duration::from_millis(250));
        assert_eq!(u.backoff_max, Duration::from_secs(30));
        assert_eq!(u.max_retry_after, Duration::from_secs(60));
        assert_eq!(u.max_response_bytes, 16 * 1024 * 1024);
        assert_eq!(routing.largest_max_response_bytes(), 16 * 1024 * 1024);
        assert_eq!(u.api_key_env, None);
        assert_eq!(u, &UpstreamConfig::new("vllm", "http://h:8000/v1", ["m"]));

        let empty: RoutingConfig = serde_json::from_str("{}").unwrap();
        assert!(empty.upstreams.is_empty());
    }

    #[test]
    fn durations_and_overrides_parse_and_round_trip() {
        let routing: RoutingConfig = serde_json::from_value(serde_json::json!({
            "upstreams": [{
                "name": "vllm", "base_url": "http://h:8000/v1", "models": ["m"],
                "api_key_env": "VLLM_KEY", "max_concurrency": 4, "initial_concurrency": 2,
                "timeout": "1m 30s", "max_attempts": 3, "backoff_base": "10ms",
                "backoff_max": "2s", "max_retry_after": "5m", "max_response_bytes": 1048576
            }]
        }))
        .unwrap();
        routing.validate().unwrap();
        let u = &routing.upstreams[0];
        assert_eq!(u.timeout, Duration::from_secs(90));
        assert_eq!(u.backoff_base, Duration::from_millis(10));
        assert_eq!(u.max_retry_after, Duration::from_secs(300));
        assert_eq!(u.initial_limit(), 2);
        assert_eq!(u.api_key_env.as_deref(), Some("VLLM_KEY"));
        assert_eq!(u.max_response_bytes, 1 << 20);

        let text = serde_json::to_value(&routing).unwrap();
        assert_eq!(text["upstreams"][0]["timeout"], "1m 30s");
        assert_eq!(text["upstreams"][0]["backoff_base"], "10ms");
        let back: RoutingConfig = serde_json::from_value(text).unwrap();
        assert_eq!(back, routing);
    }

    #[test]
    fn unknown_fields_and_bad_durations_are_refused() {
        let unknown = serde_json::json!({"upstreams": [
            {"name": "a", "base_url": "http://h/v1", "models": ["m"], "max_conurrency": 3}
        ]});
        assert!(serde_json::from_value::<RoutingConfig>(unknown).is_err());
        let top = serde_json::json!({"upstream": []});
        assert!(serde_json::from_value::<RoutingConfig>(top).is_err());
        let bad = serde_json::json!({"upstreams": [
            {"name": "a", "base_url": "http://h/v1", "models": ["m"], "timeout": "10"}
        ]});
        let error = serde_json::from_value::<RoutingConfig>(bad)
            .unwrap_err()
            .to_string();
        // The same words as every other duration in nightshift's configuration.
        assert!(error.contains("\"10\", expected a duration"), "{error}");
    }

    /// The duration syntax config files use: every form written before humantime took over
    /// the parsing still reads the same, and what is written reads back.
    #[test]
    fn durations_parse_and_format_as_text() {
        let timeout = |text: &str| {
            serde_json::from_value::<UpstreamConfig>(serde_json::json!({
                "name": "a", "base_url": "http://h/v1", "models": ["m"], "timeout": text
            }))
            .map(|u| u.timeout)
        };
        for (text, expected) in [
            ("0s", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("10m", Duration::from_secs(600)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1h30m", Duration::from_secs(5400)),
            ("2 days", Duration::from_secs(172_800)),
            ("1s 500ms", Duration::from_millis(1500)),
            ("15us", Duration::from_micros(15)),
            ("7ns", Duration::from_nanos(7)),
            (" 5 min ", Duration::from_secs(300)),
        ] {
            assert_eq!(timeout(text).unwrap(), expected, "{text}");
        }
        for bad in ["", "10", "ms", "5 parsecs", "-1s", "99999999999999999999s"] {
            assert!(timeout(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(timeout(&format!("{}d", u64::MAX / 10)).is_err());
        for value in [
            Duration::ZERO,
            Duration::from_millis(250),
            Duration::from_secs(5400),
            Duration::new(90_061, 1_001_001),
        ] {
            let u = UpstreamConfig {
                timeout: value,
                ..UpstreamConfig::new("a", "http://h/v1", ["m"])
            };
            let text = serde_json::to_value(&u).unwrap()["timeout"].clone();
            assert_eq!(timeout(text.as_str().unwrap()).unwrap(), value, "{text}");
        }
        let text = |value| humantime_serde::re::humantime::format_duration(value).to_string();
        assert_eq!(text(Duration::from_secs(5400)), "1h 30m");
        assert_eq!(text(Duration::from_millis(1500)), "1s 500ms");
    }

    #[test]
    fn endpoint_urls_follow_the_joining_rule() {
        let url = |base: &str, endpoint: &str| {
            UpstreamConfig::new("u", base, ["m"]).endpoint_url(endpoint)
        };
        let chat = "/v1/chat/completions";
        assert_eq!(
            url("http://h:8000/v1", chat),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            url("http://h:8000/v1/", chat),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            url("http://h:8000", chat),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            url("http://h:8000/", chat),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            url("https://h/api/openai/v1", "/v1/embeddings"),
            "https://h/api/openai/v1/embeddings"
        );
        assert_eq!(
            url("https://h/v1beta/openai", chat),
            "https://h/v1beta/openai/chat/completions"
        );
        assert_eq!(url("http://h/v1", "/v1"), "http://h/v1/v1");
        assert_eq!(url("http://h/v1", "/v1beta/x"), "http://h/v1/v1beta/x");
        assert_eq!(url("http://h/v1", "custom"), "http://h/v1/custom");
    }

    #[test]
    fn validate_refuses_ambiguous_or_dead_tables() {
        let error = |routing: RoutingConfig| routing.validate().unwrap_err();

        let e = error(table(vec![upstream("a", &["m"]), upstream("a", &["n"])]));
        assert!(e.contains("unique"), "{e}");
        let e = error(table(vec![upstream("a", &["*"]), upstream("b", &["*"])]));
        assert!(e.contains("default route"), "{e}");
        let e = error(table(vec![upstream("a", &["*"]), upstream("b", &["m"])]));
        assert!(e.contains("never be used"), "{e}");
        let e = error(table(vec![
            upstream("a", &["m"]),
            upstream("b", &["m", "n"]),
        ]));
        assert!(
            e.contains("\"m\" is listed by upstreams \"a\" and \"b\""),
            "{e}"
        );
        let e = error(table(vec![upstream("a", &["m", "m"])]));
        assert!(e.contains("twice"), "{e}");
        let e = error(table(vec![upstream("a", &[])]));
        assert!(e.contains("serves no model"), "{e}");
        let e = error(table(vec![upstream("a", &[""])]));
        assert!(e.contains("empty model"), "{e}");

        table(vec![upstream("a", &["m", "*"])]).validate().unwrap();
        assert_eq!(
            table(vec![upstream("a", &["m", "*"])])
                .route("z")
                .unwrap()
                .name,
            "a"
        );
    }

    #[test]
    fn validate_checks_each_field() {
        let check = |edit: fn(&mut UpstreamConfig)| {
            let mut u = upstream("a", &["m"]);
            edit(&mut u);
            table(vec![u]).validate()
        };
        assert!(check(|_| {}).is_ok());
        assert!(check(|u| u.name = String::new()).is_err());
        assert!(check(|u| u.name = "has space".into()).is_err());
        assert!(check(|u| u.name = "x".repeat(65)).is_err());
        assert!(check(|u| u.name = "vllm-a_1.eu".into()).is_ok());
        assert!(check(|u| u.max_concurrency = 0).is_err());
        assert!(check(|u| u.initial_concurrency = Some(0)).is_err());
        assert!(check(|u| u.initial_concurrency = Some(65)).is_err());
        assert!(check(|u| u.initial_concurrency = Some(64)).is_ok());
        assert!(check(|u| u.timeout = Duration::ZERO).is_err());
        assert!(check(|u| u.max_attempts = 0).is_err());
        assert!(check(|u| u.backoff_base = Duration::from_secs(31)).is_err());
        assert!(check(|u| u.backoff_base = Duration::ZERO).is_ok());
        assert!(check(|u| u.api_key_env = Some(String::new())).is_err());
        assert!(check(|u| u.api_key_env = Some("A=B".into())).is_err());
        assert!(check(|u| u.api_key_env = Some("OPENAI_API_KEY".into())).is_ok());
        assert!(check(|u| u.max_response_bytes = MIN_MAX_RESPONSE_BYTES - 1).is_err());
        assert!(check(|u| u.max_response_bytes = MIN_MAX_RESPONSE_BYTES).is_ok());
        assert!(check(|u| u.models = vec!["m".repeat(MAX_MODEL_CHARS)]).is_ok());
        assert!(check(|u| u.models = vec!["m".repeat(MAX_MODEL_CHARS + 1)]).is_err());

        let small = UpstreamConfig {
            max_concurrency: 4,
            ..upstream("a", &["m"])
        };
        assert_eq!(
            small.initial_limit(),
            4,
            "the default start is capped by the max"
        );
    }

    #[test]
    fn base_urls_are_checked() {
        for good in [
            "http://127.0.0.1:8000/v1",
            "https://api.openai.com/v1",
            "http://vllm",
            "HTTP://host:1/",
            "http://[::1]:8000/v1",
            "http://[::1]",
        ] {
            assert_eq!(check_base_url(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1:8000/v1",
            "ftp://h/v1",
            "http://",
            "http:///v1",
            "http://h:port/v1",
            "http://h:99999",
            "http://h:/v1",
            "http://user:pw@h/v1",
            "http://h/v1?x=1",
            "http://h/v1#x",
            "http://h /v1",
        ] {
            assert!(check_base_url(bad).is_err(), "{bad} should be refused");
        }
        let e = table(vec![UpstreamConfig::new("a", "h:8000", ["m"])])
            .validate()
            .unwrap_err();
        assert!(e.contains("\"a\"") && e.contains("http://"), "{e}");
    }
}
