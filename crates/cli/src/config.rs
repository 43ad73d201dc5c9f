//! The configuration chain: defaults → TOML file → `NIGHTSHIFT_<SECTION>__<KEY>` environment
//! variables → command-line flags, then [`Config::validate`], once. One file configures every
//! service; each service reads its sections.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use nightshift_core::routing::RoutingConfig;
use nightshift_core::secret::Secret;
use nightshift_executor::ExecutorConfig;
use nightshift_finalizer::FinalizerConfig;
use nightshift_gateway::GatewayConfig;
use nightshift_metadata::PgConfig;
use nightshift_queue::QueueConfig;
use nightshift_scheduler::SchedulerConfig;
use nightshift_state::StateConfig;
use nightshift_storage::S3Config;
use nightshift_telemetry::TelemetryConfig;
use serde::{Deserialize, Serialize};

/// Everything configurable, by section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub telemetry: TelemetryConfig,
    /// Object storage (S3 or compatible).
    pub storage: S3Config,
    /// PostgreSQL (the scheduler's only).
    pub metadata: PgConfig,
    /// RabbitMQ: chunk tasks, chunk results, finalize jobs.
    pub queue: QueueConfig,
    /// Redis: live counts and cancel flags.
    pub state: StateConfig,
    pub gateway: GatewayConfig,
    pub scheduler: SchedulerConfig,
    pub executor: ExecutorConfig,
    pub finalizer: FinalizerConfig,
    /// Which upstream serves which model (the scheduler validates against it; executors call
    /// the upstreams). [`Config::load`] copies it into `scheduler` and `executor`; change it
    /// with [`Config::set_routing`].
    pub routing: RoutingConfig,
    /// `nightshift standalone` (everything in one process; ignores `storage`, `metadata`,
    /// `queue` and `state`).
    pub standalone: StandaloneSection,
    /// What nightshift's own processes share: the token of the scheduler's gRPC API.
    /// [`Config::load`] copies it into `gateway`, `scheduler` and `finalizer`; change it with
    /// [`Config::set_internal_token`].
    pub internal: InternalSection,
}

/// The `[internal]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InternalSection {
    /// The shared secret every call to the scheduler carries (`authorization: Bearer
    /// <token>`), at least 16 printable characters. Required by `nightshift scheduler`,
    /// `gateway`, `finalizer` and `admin`; `nightshift standalone` generates one per run
    /// (its gRPC is on loopback, inside the process).
    pub token: Option<Secret>,
    /// Mutual TLS on the scheduler's gRPC API, in addition to the token: the scheduler
    /// requires client certificates signed by `ca`, its clients present theirs and check the
    /// scheduler's (their `scheduler_url` must then be `https://`). Unset: plain HTTP/2.
    /// `nightshift standalone` ignores it. Read at start: a renewed certificate needs a
    /// restart.
    pub tls: Option<nightshift_proto::tls::TlsFiles>,
}

/// The settings only `nightshift standalone` reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandaloneSection {
    /// Objects, metadata and queue live here.
    pub data_dir: PathBuf,
    /// The `default` tenant's API key; unset = generated on the first start and kept in
    /// `<data_dir>/api-key`.
    pub api_key: Option<Secret>,
    /// Executors in the process.
    pub executors: usize,
}

impl Default for StandaloneSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("nightshift-data"),
            api_key: None,
            executors: 1,
        }
    }
}

impl Config {
    /// Loads the chain. `env` is the process environment in production and a map in tests.
    /// Only `NIGHTSHIFT_` variables with a `__` (a section and a key) are configuration;
    /// others (`NIGHTSHIFT_DEV_DIR`, ...) belong to the scripts around the binary.
    pub fn load(file: Option<&Path>, env: Env) -> Result<Self, Box<figment::Error>> {
        // Defaults come from the structs' `#[serde(default)]`, not from serializing
        // `Config::default()`: secrets serialize redacted, which would replace every default
        // secret (the AMQP URL, say) with "<redacted>".
        let mut figment = Figment::new();
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        let mut config: Self = figment
            .merge(env.filter(|k| k.as_str().contains("__")).split("__"))
            .extract()
            .map_err(Box::new)?;
        config.set_routing(config.routing.clone());
        config.set_internal_token(config.internal.token.clone());
        config.set_internal_tls(config.internal.tls.clone());
        Ok(config)
    }

    /// Sets the internal token: `[internal]`, and the copies the scheduler (which requires
    /// it) and its clients, the gateway and the finalizer, read from their own sections.
    pub fn set_internal_token(&mut self, token: Option<Secret>) {
        self.gateway.internal_token = token.clone();
        self.scheduler.internal_token = token.clone();
        self.finalizer.internal_token = token.clone();
        self.internal.token = token;
    }

    /// Sets mutual TLS on the internal API: `[internal.tls]`, and the copies the scheduler
    /// and its clients, the gateway and the finalizer, read from their own sections.
    pub fn set_internal_tls(&mut self, tls: Option<nightshift_proto::tls::TlsFiles>) {
        self.gateway.internal_tls = tls.clone();
        self.scheduler.internal_tls = tls.clone();
        self.finalizer.internal_tls = tls.clone();
        self.internal.tls = tls;
    }

    /// Sets the routing table: `[routing]`, and the copies the scheduler and the executors
    /// read from their own sections.
    pub fn set_routing(&mut self, routing: RoutingConfig) {
        self.scheduler.routing = routing.clone();
        self.executor.routing = routing.clone();
        self.routing = routing;
    }

    /// Checks every section — what serde cannot: ranges, URLs, names, the routing table — once,
    /// right after loading. A service's `serve` then checks only what needs facts known at run
    /// time (the queue's consumer timeout, the upstreams' API keys in the environment);
    /// `[storage]` and `[metadata]` are checked when their adapters are built.
    ///
    /// # Errors
    /// The first problem found, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.routing
            .validate()
            .map_err(|e| format!("routing: {e}"))?;
        self.gateway.validate()?;
        self.executor.validate()?;
        self.finalizer.validate()?;
        self.scheduler.webhooks.validate()?;
        self.queue.validate().map_err(|e| e.to_string())?;
        self.state.validate().map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn dump(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// The process environment's `NIGHTSHIFT_` variables.
pub fn process_env() -> Env {
    Env::prefixed("NIGHTSHIFT_")
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn file_then_env_override_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ns.toml",
                r#"
                [gateway]
                listen = "127.0.0.1:9000"
                max_upload_bytes = 1000
                [storage]
                bucket = "from-file"
                secret_access_key = "s3cr3t"
                "#,
            )?;
            jail.set_env("NIGHTSHIFT_STORAGE__BUCKET", "from-env");
            jail.set_env("NIGHTSHIFT_SCHEDULER__SWEEP_INTERVAL", "5s");
            jail.set_env("NIGHTSHIFT_DEV_DIR", "/not/config");
            let c = Config::load(Some(Path::new("ns.toml")), process_env()).map_err(|e| *e)?;
            assert_eq!(c.gateway.listen.port(), 9000);
            assert_eq!(c.gateway.max_upload_bytes, 1000);
            assert_eq!(c.storage.bucket, "from-env");
            assert_eq!(
                c.scheduler.sweep_interval,
                std::time::Duration::from_secs(5)
            );
            // untouched sections keep their defaults
            assert_eq!(
                c.metadata.max_connections,
                PgConfig::default().max_connections
            );
            let dump = c.dump();
            assert!(!dump.contains("s3cr3t"), "{dump}");
            assert!(dump.contains("<redacted>"), "{dump}");
            // the dump loads back
            jail.create_file("dump.toml", &dump)?;
            Config::load(Some(Path::new("dump.toml")), Env::prefixed("NONE_")).map_err(|e| *e)?;
            Ok(())
        });
    }

    #[test]
    fn default_secrets_are_real_values_not_their_redaction() {
        Jail::expect_with(|_| {
            let c = Config::load(None, Env::prefixed("NONE_")).map_err(|e| *e)?;
            assert_eq!(
                c.queue.url.expose(),
                "amqp://guest:guest@127.0.0.1:5672/%2f"
            );
            assert_eq!(c.state.url.expose(), "redis://127.0.0.1:6379");
            assert!(c.metadata.url.expose().starts_with("postgres://"));
            Ok(())
        });
    }

    #[test]
    fn the_internal_token_reaches_the_scheduler_and_its_clients_and_is_never_dumped() {
        Jail::expect_with(|jail| {
            jail.set_env("NIGHTSHIFT_INTERNAL__TOKEN", "tok-0123456789abcdef");
            let c = Config::load(None, process_env()).map_err(|e| *e)?;
            for copy in [
                &c.internal.token,
                &c.gateway.internal_token,
                &c.scheduler.internal_token,
                &c.finalizer.internal_token,
            ] {
                assert_eq!(
                    copy.as_ref().map(Secret::expose),
                    Some("tok-0123456789abcdef")
                );
            }
            let dump = c.dump();
            assert!(!dump.contains("tok-0123456789abcdef"), "{dump}");
            assert!(dump.contains("[internal]"), "{dump}");
            // not a key of the services' own sections
            jail.create_file("bad.toml", "[gateway]\ninternal_token = \"x\"\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), Env::prefixed("NONE_")).is_err());
            Ok(())
        });
    }

    #[test]
    fn internal_tls_reaches_the_scheduler_and_its_clients() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ns.toml",
                r#"
                [internal.tls]
                ca = "/etc/nightshift/tls/ca.crt"
                cert = "/etc/nightshift/tls/tls.crt"
                key = "/etc/nightshift/tls/tls.key"
                "#,
            )?;
            let c =
                Config::load(Some(Path::new("ns.toml")), Env::prefixed("NONE_")).map_err(|e| *e)?;
            let tls = c.internal.tls.clone().expect("tls");
            assert_eq!(tls.cert, Path::new("/etc/nightshift/tls/tls.crt"));
            assert_eq!(c.scheduler.internal_tls.as_ref(), Some(&tls));
            assert_eq!(c.gateway.internal_tls.as_ref(), Some(&tls));
            assert_eq!(c.finalizer.internal_tls.as_ref(), Some(&tls));
            // the scheduler's pod has a default (http) gateway URL it never uses: not an error
            // here; a client refuses a URL that does not fit when it connects
            c.validate().expect("valid");
            assert!(c.dump().contains("[internal.tls]"), "{}", c.dump());
            // every path is required
            jail.create_file("partial.toml", "[internal.tls]\nca = \"/ca.pem\"\n")?;
            assert!(Config::load(Some(Path::new("partial.toml")), Env::prefixed("NONE_")).is_err());
            Ok(())
        });
    }

    #[test]
    fn the_routing_table_reaches_the_services_that_read_it() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "ns.toml",
                r#"
                [[routing.upstreams]]
                name = "vllm"
                base_url = "http://127.0.0.1:8000/v1"
                models = ["m"]
                "#,
            )?;
            let c =
                Config::load(Some(Path::new("ns.toml")), Env::prefixed("NONE_")).map_err(|e| *e)?;
            assert_eq!(c.routing.upstreams.len(), 1);
            assert_eq!(c.scheduler.routing, c.routing);
            assert_eq!(c.executor.routing, c.routing);
            // it is not a key of the services' own sections, nor dumped there
            assert!(!c.dump().contains("[scheduler.routing"), "{}", c.dump());
            jail.create_file("bad.toml", "[scheduler.routing]\nupstreams = []\n")?;
            assert!(Config::load(Some(Path::new("bad.toml")), Env::prefixed("NONE_")).is_err());
            Ok(())
        });
    }

    #[test]
    fn validation_covers_every_section() {
        Config::default().validate().unwrap();
        let mut bad_routing = Config::default();
        bad_routing.set_routing(RoutingConfig {
            upstreams: vec![nightshift_core::routing::UpstreamConfig::new(
                "u",
                "not a url",
                ["m"],
            )],
        });
        let mut bad_gateway = Config::default();
        bad_gateway.gateway.scheduler_url = "not a url".into();
        let mut bad_executor = Config::default();
        bad_executor.executor.prefetch = 0;
        let mut bad_finalizer = Config::default();
        bad_finalizer.finalizer.prefetch = 0;
        let mut bad_queue = Config::default();
        bad_queue.queue.prefix = String::new();
        let mut bad_state = Config::default();
        bad_state.state.key_prefix = "{x}".into();
        for (section, config) in [
            ("routing", bad_routing),
            ("gateway", bad_gateway),
            ("executor", bad_executor),
            ("finalizer", bad_finalizer),
            ("queue", bad_queue),
            ("state", bad_state),
        ] {
            let error = config.validate().expect_err(section);
            assert!(error.contains(section), "{section}: {error}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("ns.toml", "[gateway]\nlisten_port = 1\n")?;
            assert!(Config::load(Some(Path::new("ns.toml")), Env::prefixed("NONE_")).is_err());
            jail.set_env("NIGHTSHIFT_GATEWAY__NOPE", "1");
            assert!(Config::load(None, process_env()).is_err());
            Ok(())
        });
    }
}
