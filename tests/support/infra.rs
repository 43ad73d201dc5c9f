//! Private infrastructure for tests that stop it: PostgreSQL, Redis, RabbitMQ and Garage (S3)
//! started for one test on free loopback ports, with every byte of their state in a temporary
//! directory — so that a test may stop them gracefully, `kill -9` them and start them again
//! without touching the shared dev stack (Postgres 5432, Redis 6379, RabbitMQ 5672, Garage
//! 3900) that the rest of the suite uses at the same time.
//!
//! - **PostgreSQL 15**: `initdb` (trust auth, user `postgres`) and `postgres` run as the
//!   `postgres` OS user (the suite runs as root, which PostgreSQL refuses); the `postgres`
//!   database. Graceful stop = SIGINT (fast shutdown); the data survives every stop.
//! - **Redis**: `redis-server` without persistence, like the dev stack: a restart loses every
//!   key (counts, cancel flags), as a standalone Redis does.
//! - **RabbitMQ**: a second node (`<unique>@localhost`, its own AMQP and distribution ports,
//!   mnesia, logs, config and Erlang cookie under the directory; no plugins), so durable
//!   queues and persistent messages survive a restart. [`InfraOptions::consumer_timeout`]
//!   sets the broker's `consumer_timeout` (and a 1 s channel tick, so the broker enforces it
//!   within a second instead of once a minute).
//! - **Garage**: the binary `make infra` installs (`GARAGE_BIN`, `PATH` or
//!   `~/.cargo/bin/garage`), configured and bootstrapped as `deploy/dev/infra.sh` does (one
//!   node, layout, key, bucket) on ports of its own.
//!
//! Every daemon runs in a process group of its own: [`Stop::Kill`] is `kill -9` of the whole
//! group (no shutdown code runs; PostgreSQL recovers from its WAL at the next start). Each
//! [`PrivateInfra::stop`] checks the dependency really is down (a TCP connect to its port is
//! refused) and each [`PrivateInfra::start`] waits until it answers its own protocol.
//! Dropping a [`PrivateInfra`] kills every daemon and deletes the directory; the daemons of a
//! test process that died without dropping it (`kill -9`, Ctrl-C) are killed, and their
//! directory deleted, by the next [`PrivateInfra::start`] (each daemon's environment names its
//! directory, so nothing else is touched). Ports are chosen below the kernel's ephemeral
//! range, so that no other socket takes a stopped daemon's port.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use nightshift_core::secret::Secret;
use nightshift_storage::{ObjectStore, S3Config, S3Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::cluster::Endpoints;
use crate::eventually;

/// One of the four dependencies of the distributed deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dependency {
    Postgres,
    Redis,
    RabbitMq,
    Garage,
}

impl Dependency {
    pub const ALL: [Dependency; 4] = [
        Dependency::Postgres,
        Dependency::Redis,
        Dependency::RabbitMq,
        Dependency::Garage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dependency::Postgres => "postgres",
            Dependency::Redis => "redis",
            Dependency::RabbitMq => "rabbitmq",
            Dependency::Garage => "garage",
        }
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a dependency is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its own clean shutdown: SIGINT to PostgreSQL (fast shutdown), SIGTERM to the others.
    Graceful,
    /// `kill -9` of its whole process group.
    Kill,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Graceful => "stop",
            Stop::Kill => "kill-9",
        })
    }
}

/// Knobs of the private infrastructure.
#[derive(Debug, Clone, Default)]
pub struct InfraOptions {
    /// RabbitMQ's `consumer_timeout` (unset: the broker's default, 30 min on 3.10).
    pub consumer_timeout: Option<Duration>,
}

/// How long a daemon may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a graceful stop may take before the group is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const RABBIT_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const S3_REGION: &str = "us-east-1";
const S3_BUCKET: &str = "nightshift";

/// A daemon of ours: how to start it and the process group it runs in.
struct Daemon {
    dep: Dependency,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// `(uid, gid)` to run as (PostgreSQL).
    user: Option<(u32, u32)>,
    /// The port that answers when it is up.
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        ensure!(self.child.is_none(), "{} is already running", self.dep);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(log, "=== {} starting {}", timestamp(), self.dep)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        if let Some(root) = self.log.parent() {
            cmd.env(MARKER, root);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} ({})", self.dep, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    async fn stop(&mut self, how: Stop) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} is not running", self.dep);
        };
        let group = format!("-{pid}");
        match how {
            Stop::Graceful => {
                let signal = if self.dep == Dependency::Postgres {
                    "INT"
                } else {
                    "TERM"
                };
                send_signal(&pid.to_string(), signal)?;
                let child = self.child.as_mut().context("no child")?;
                if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                    .await
                    .is_err()
                {
                    eprintln!(
                        "[infra] {} did not stop within {STOP_TIMEOUT:?}: kill -9",
                        self.dep
                    );
                    send_signal(&group, "KILL")?;
                }
            }
            Stop::Kill => send_signal(&group, "KILL")?,
        }
        if let Some(mut child) = self.child.take() {
            child.wait().await?;
        }
        // Every process of the group is gone (PostgreSQL's backends, Erlang's helpers).
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while group_alive(pid) {
            if tokio::time::Instant::now() > deadline {
                send_signal(&group, "KILL")?;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    fn kill_now(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = send_signal(&format!("-{pid}"), "KILL");
        }
        self.child = None;
    }
}

/// PostgreSQL, Redis, RabbitMQ and Garage of one test (see the module doc).
pub struct PrivateInfra {
    dir: tempfile::TempDir,
    daemons: Vec<Daemon>,
    endpoints: Endpoints,
    garage_bin: PathBuf,
    garage_conf: PathBuf,
    rabbit_log: PathBuf,
}

impl PrivateInfra {
    /// Starts all four (in parallel) and bootstraps Garage; returns once each answers.
    pub async fn start(options: InfraOptions) -> anyhow::Result<Self> {
        let garage_bin = garage_bin()?;
        reap_orphans();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        let root = dir.path().to_path_buf();
        std::fs::write(root.join("owner"), std::process::id().to_string())?;
        // PostgreSQL runs as `postgres`: it must reach its directories.
        set_mode(&root, 0o755)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let id = &id[..12];

        let pg = postgres(&root).await?;
        let redis = redis(&root).await?;
        let (rabbit, rabbit_log) = rabbitmq(&root, id, &options).await?;
        let (garage, garage_conf, s3_port) = garage(&root, &garage_bin).await?;
        let key_id = format!("GK{}", &uuid::Uuid::new_v4().simple().to_string()[..24]);
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let endpoints = Endpoints {
            postgres_url: format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port),
            redis_url: format!("redis://127.0.0.1:{}", redis.port),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", rabbit.port),
            s3: S3Config {
                endpoint: Some(format!("http://127.0.0.1:{s3_port}")),
                region: S3_REGION.into(),
                bucket: S3_BUCKET.into(),
                access_key_id: Some(key_id),
                secret_access_key: Some(Secret::new(secret)),
                prefix: String::new(),
                part_size: 5 * 1024 * 1024,
                ..S3Config::default()
            },
        };
        let mut infra = Self {
            dir,
            daemons: vec![pg, redis, rabbit, garage],
            endpoints,
            garage_bin,
            garage_conf,
            rabbit_log,
        };
        for daemon in &mut infra.daemons {
            daemon.spawn()?;
        }
        let (a, b, c, d) = tokio::join!(
            infra.await_ready(Dependency::Postgres),
            infra.await_ready(Dependency::Redis),
            infra.await_ready(Dependency::RabbitMq),
            infra.bootstrap_garage(),
        );
        a.and(b).and(c).and(d)?;
        Ok(infra)
    }

    /// Where the services reach them: pass it to [`ClusterOptions::endpoints`](crate::cluster::ClusterOptions).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The temporary directory (daemon logs are `<dir>/<dependency>.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn daemon(&self, dep: Dependency) -> &Daemon {
        self.daemons
            .iter()
            .find(|d| d.dep == dep)
            .expect("every dependency has a daemon")
    }

    fn daemon_mut(&mut self, dep: Dependency) -> &mut Daemon {
        self.daemons
            .iter_mut()
            .find(|d| d.dep == dep)
            .expect("every dependency has a daemon")
    }

    /// The port a dependency serves its protocol on.
    pub fn port(&self, dep: Dependency) -> u16 {
        self.daemon(dep).port
    }

    /// Whether its daemon process runs (it may not answer yet).
    pub fn is_running(&self, dep: Dependency) -> bool {
        self.daemon(dep).child.is_some()
    }

    /// Stops a dependency and checks it is down: its process group is gone and a TCP connect
    /// to its port is refused.
    pub async fn stop(&mut self, dep: Dependency, how: Stop) -> anyhow::Result<()> {
        self.daemon_mut(dep).stop(how).await?;
        ensure!(
            !self.reachable(dep).await,
            "{dep} was stopped but its port {} still accepts connections",
            self.port(dep)
        );
        Ok(())
    }

    /// Starts a stopped dependency again (same data, same ports) and waits until it answers.
    pub async fn start_again(&mut self, dep: Dependency) -> anyhow::Result<()> {
        let daemon = self.daemon_mut(dep);
        daemon.spawn()?;
        self.await_ready(dep).await
    }

    /// Whether something accepts a TCP connection on the dependency's port.
    pub async fn reachable(&self, dep: Dependency) -> bool {
        tcp_open(self.port(dep)).await
    }

    /// Whether the RabbitMQ node's log holds `needle` (e.g. a consumer-timeout error).
    pub fn rabbit_log_contains(&self, needle: &str) -> bool {
        std::fs::read_to_string(&self.rabbit_log)
            .map(|log| log.contains(needle))
            .unwrap_or(false)
    }

    /// Copies every dependency's whole log into `dir` (`<dependency>.log`).
    pub fn copy_logs(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for dep in Dependency::ALL {
            let from = if dep == Dependency::RabbitMq {
                &self.rabbit_log
            } else {
                &self.daemon(dep).log
            };
            if from.exists() {
                std::fs::copy(from, dir.join(format!("{dep}.log")))?;
            }
        }
        Ok(())
    }

    /// The last `lines` lines of a dependency's log.
    pub fn log_tail(&self, dep: Dependency, lines: usize) -> String {
        let path = if dep == Dependency::RabbitMq {
            &self.rabbit_log
        } else {
            &self.daemon(dep).log
        };
        tail(path, lines)
    }

    /// Polls the dependency's own protocol until it answers.
    async fn await_ready(&self, dep: Dependency) -> anyhow::Result<()> {
        // Ok(false): the daemon is gone, no use waiting on.
        let answered = eventually(&format!("{dep} answering"), START_TIMEOUT, || async move {
            if self.answers(dep).await {
                return Ok(true);
            }
            match self.daemon(dep).pid() {
                Some(pid) if group_alive(pid) => Err("no answer yet"),
                _ => Ok(false),
            }
        })
        .await
        .with_context(|| format!("its log ends with:\n{}", self.log_tail(dep, 30)))?;
        ensure!(
            answered,
            "{dep} exited during start-up; its log ends with:\n{}",
            self.log_tail(dep, 30)
        );
        Ok(())
    }

    async fn answers(&self, dep: Dependency) -> bool {
        let port = self.port(dep);
        match dep {
            Dependency::Postgres => {
                use sqlx::Connection;
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    sqlx::PgConnection::connect(&self.endpoints.postgres_url),
                )
                .await
                {
                    Ok(Ok(mut conn)) => sqlx::query("SELECT 1").execute(&mut conn).await.is_ok(),
                    _ => false,
                }
            }
            Dependency::Redis => exchange(port, b"PING\r\n", b"+PONG").await,
            // The protocol header; a broker that finished booting answers Connection.Start
            // (a method frame: type 1).
            Dependency::RabbitMq => exchange(port, b"AMQP\x00\x00\x09\x01", &[1]).await,
            Dependency::Garage => match S3Store::new(&self.endpoints.s3).await {
                Ok(store) => store.ping().await.is_ok(),
                Err(_) => false,
            },
        }
    }

    /// First start of Garage: wait for its RPC, then layout, key, bucket and grants as
    /// `deploy/dev/infra.sh` does; then wait until S3 answers with our key.
    async fn bootstrap_garage(&self) -> anyhow::Result<()> {
        eventually("garage RPC answering", START_TIMEOUT, || {
            self.garage_cli(&["status"])
        })
        .await
        .with_context(|| {
            format!(
                "its log ends with:\n{}",
                self.log_tail(Dependency::Garage, 30)
            )
        })?;
        let node = self.garage_cli(&["node", "id", "-q"]).await?;
        let node = node.trim().split('@').next().unwrap_or_default().to_owned();
        self.garage_cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])
            .await?;
        self.garage_cli(&["layout", "apply", "--version", "1"])
            .await?;
        let s3 = &self.endpoints.s3;
        let key_id = s3.access_key_id.clone().unwrap_or_default();
        let secret = s3
            .secret_access_key
            .as_ref()
            .map(|s| s.expose().to_owned())
            .unwrap_or_default();
        self.garage_cli(&["key", "import", "--yes", "-n", "chaos", &key_id, &secret])
            .await?;
        self.garage_cli(&["bucket", "create", S3_BUCKET]).await?;
        self.garage_cli(&[
            "bucket", "allow", "--read", "--write", "--owner", S3_BUCKET, "--key", &key_id,
        ])
        .await?;
        self.await_ready(Dependency::Garage).await
    }

    async fn garage_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            Command::new(&self.garage_bin)
                .arg("-c")
                .arg(&self.garage_conf)
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("garage {args:?} timed out"))??;
        if !out.status.success() {
            bail!(
                "garage {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for PrivateInfra {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            daemon.kill_now();
        }
    }
}

async fn postgres(root: &Path) -> anyhow::Result<Daemon> {
    let (uid, gid) = user_ids("postgres")?;
    let base = root.join("postgres");
    let data = base.join("data");
    let sock = base.join("sock");
    for d in [&base, &data, &sock] {
        std::fs::create_dir_all(d)?;
        std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
    }
    set_mode(&data, 0o700)?;
    let log = root.join("postgres.log");
    let initdb = Command::new(format!("{PG_BIN}/initdb"))
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        .arg("--no-instructions")
        .arg("-D")
        .arg(&data)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .output()
        .await
        .context("initdb")?;
    if !initdb.status.success() {
        bail!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
    }
    let port = free_port().await?;
    Ok(Daemon {
        dep: Dependency::Postgres,
        program: format!("{PG_BIN}/postgres").into(),
        args: vec![
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-k".into(),
            sock.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "max_connections=200".into(),
            // Durability against a process crash needs the WAL, not fsync (no OS crash here).
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "logging_collector=off".into(),
        ],
        env: vec![],
        user: Some((uid, gid)),
        port,
        log,
        child: None,
    })
}

async fn redis(root: &Path) -> anyhow::Result<Daemon> {
    let dir = root.join("redis");
    std::fs::create_dir_all(&dir)?;
    let port = free_port().await?;
    Ok(Daemon {
        dep: Dependency::Redis,
        program: "redis-server".into(),
        args: [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        env: vec![],
        user: None,
        port,
        log: root.join("redis.log"),
        child: None,
    })
}

async fn rabbitmq(
    root: &Path,
    id: &str,
    options: &InfraOptions,
) -> anyhow::Result<(Daemon, PathBuf)> {
    let base = root.join("rabbitmq");
    let home = base.join("home");
    let logs = base.join("log");
    for d in [&base, &home, &logs, &base.join("mnesia")] {
        std::fs::create_dir_all(d)?;
    }
    let port = free_port().await?;
    let dist_port = free_port().await?;
    let mut conf = format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n");
    let mut advanced = "[].\n".to_owned();
    if let Some(timeout) = options.consumer_timeout {
        conf.push_str(&format!("consumer_timeout = {}\n", timeout.as_millis()));
        // The broker looks for timed-out consumers on every channel tick (default 60 s).
        advanced = "[{rabbit, [{channel_tick_interval, 1000}]}].\n".to_owned();
    }
    std::fs::write(base.join("rabbitmq.conf"), conf)?;
    std::fs::write(base.join("advanced.config"), advanced)?;
    std::fs::write(base.join("enabled_plugins"), "[].\n")?;
    std::fs::write(base.join("rabbitmq-env.conf"), "")?;
    let node = format!("nschaos{id}@localhost");
    let path = |p: PathBuf| p.display().to_string();
    let env = vec![
        ("HOME".into(), path(home)),
        (
            "RABBITMQ_CONF_ENV_FILE".into(),
            path(base.join("rabbitmq-env.conf")),
        ),
        ("RABBITMQ_NODENAME".into(), node.clone()),
        ("RABBITMQ_NODE_IP_ADDRESS".into(), "127.0.0.1".into()),
        ("RABBITMQ_NODE_PORT".into(), port.to_string()),
        ("RABBITMQ_DIST_PORT".into(), dist_port.to_string()),
        ("RABBITMQ_MNESIA_BASE".into(), path(base.join("mnesia"))),
        ("RABBITMQ_LOG_BASE".into(), path(logs.clone())),
        (
            "RABBITMQ_CONFIG_FILE".into(),
            path(base.join("rabbitmq.conf")),
        ),
        (
            "RABBITMQ_ADVANCED_CONFIG_FILE".into(),
            path(base.join("advanced.config")),
        ),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
            path(base.join("enabled_plugins")),
        ),
        ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
        (
            "ERL_FLAGS".into(),
            "-kernel inet_dist_use_interface {127,0,0,1}".into(),
        ),
    ];
    let daemon = Daemon {
        dep: Dependency::RabbitMq,
        program: RABBIT_SERVER.into(),
        args: vec![],
        env,
        user: None,
        port,
        log: root.join("rabbitmq.log"),
        child: None,
    };
    Ok((daemon, logs.join(format!("{node}.log"))))
}

async fn garage(root: &Path, bin: &Path) -> anyhow::Result<(Daemon, PathBuf, u16)> {
    let base = root.join("garage");
    std::fs::create_dir_all(base.join("meta"))?;
    std::fs::create_dir_all(base.join("data"))?;
    let s3_port = free_port().await?;
    let rpc_port = free_port().await?;
    let admin_port = free_port().await?;
    let rpc_secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let conf = format!(
        r#"# A private single-node Garage of one test (tests/support/infra.rs).
metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{S3_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
admin_token = "{rpc_secret}"
"#,
        meta = base.join("meta").display(),
        data = base.join("data").display(),
    );
    let conf_path = base.join("garage.toml");
    std::fs::write(&conf_path, conf)?;
    set_mode(&conf_path, 0o600)?;
    let daemon = Daemon {
        dep: Dependency::Garage,
        program: bin.to_path_buf(),
        args: vec![
            "-c".into(),
            conf_path.display().to_string(),
            "server".into(),
        ],
        env: vec![("NO_COLOR".into(), "1".into())],
        user: None,
        port: s3_port,
        log: root.join("garage.log"),
        child: None,
    };
    Ok((daemon, conf_path, s3_port))
}

/// The prefix of the temporary directories (in the system's temp dir).
const DIR_PREFIX: &str = "ns-infra-";
/// Set in each daemon's environment to its infrastructure's directory: how [`reap_orphans`]
/// recognises our daemons.
const MARKER: &str = "NS_PRIVATE_INFRA";

/// Kills the daemons of private infrastructures whose test process died without dropping
/// them (`kill -9`, Ctrl-C) and deletes their directories. Only processes whose environment
/// names that directory are killed.
fn reap_orphans() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_ours = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours {
            continue;
        }
        let owner = std::fs::read_to_string(dir.join("owner")).unwrap_or_default();
        let owner = owner.trim();
        if owner.is_empty() || Path::new(&format!("/proc/{owner}")).exists() {
            continue; // its test still runs (or is starting)
        }
        let marker = format!("{MARKER}={}", dir.display());
        for pid in processes_marked(&marker) {
            eprintln!("[infra] killing pid {pid}, orphaned by {}", dir.display());
            let _ = send_signal(&pid.to_string(), "KILL");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The processes whose environment holds `var` (`NAME=value`).
fn processes_marked(var: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|v| v == var.as_bytes())
        })
        .collect()
}

/// The garage binary: `GARAGE_BIN`, else `garage` on `PATH`, else `~/.cargo/bin/garage`.
pub fn garage_bin() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("GARAGE_BIN") {
        return Ok(bin.into());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("garage");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    let candidate = home.join("bin/garage");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!("no garage binary (GARAGE_BIN, PATH, ~/.cargo/bin): run `make infra`, which installs it")
}

/// `(uid, gid)` of an OS user, from `/etc/passwd`.
fn user_ids(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 3 && fields[0] == user {
            return Ok((fields[2].parse()?, fields[3].parse()?));
        }
    }
    bail!("no OS user {user} (PostgreSQL's server package creates it)")
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Ports [`free_port`] gave out in this process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// A free loopback port for a daemon, below the kernel's ephemeral range: while the daemon
/// is stopped, no outgoing connection and no `bind(0)` of another test can take its port, so
/// it can always listen there again. Never one of the shared stack's fixed ports.
pub async fn free_port() -> anyhow::Result<u16> {
    const SHARED: [u16; 6] = [5432, 6379, 5672, 25672, 15672, 4369];
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    anyhow::ensure!(
        ephemeral_low > low + 1000,
        "ephemeral ports start at {ephemeral_low}"
    );
    for _ in 0..1000 {
        let r = uuid::Uuid::new_v4().as_u128();
        let port = low + (r % u128::from(ephemeral_low - low)) as u16;
        if SHARED.contains(&port) || (3900..3910).contains(&port) {
            continue;
        }
        // Never twice in this process (two lanes starting their daemons at once).
        if TcpListener::bind(("127.0.0.1", port)).await.is_ok()
            && HANDED_OUT
                .lock()
                .map(|mut ports| ports.insert(port))
                .unwrap_or(false)
        {
            return Ok(port);
        }
    }
    bail!("no free port below {ephemeral_low}")
}

/// Whether something accepts a TCP connection on a loopback port (bounded to 2 s).
pub async fn tcp_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Sends `request` and checks the answer begins with `expect` (bounded to 5 s).
async fn exchange(port: u16, request: &[u8], expect: &[u8]) -> bool {
    let attempt = async {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        conn.write_all(request).await.ok()?;
        let mut head = vec![0u8; expect.len()];
        conn.read_exact(&mut head).await.ok()?;
        Some(head == expect)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}

/// `kill -s <signal> -- <target>` (a pid, or `-<pgid>` for a whole process group).
pub fn send_signal(target: &str, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-s", signal, "--", target])
        .stderr(Stdio::null())
        .status()
        .context("run kill")?;
    ensure!(status.success(), "kill -s {signal} {target} failed");
    Ok(())
}

/// Whether any process of the group `pgid` still exists.
fn group_alive(pgid: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-s", "0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The last `lines` lines of a file (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Wall-clock seconds since the epoch, for log markers.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}
