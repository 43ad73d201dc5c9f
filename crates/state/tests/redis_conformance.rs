//! The live-state conformance suite against a real Redis (`redis://127.0.0.1:6379` unless
//! `NIGHTSHIFT_STATE__URL` says otherwise; `make up` or `deploy/dev/infra.sh up` starts one),
//! plus what only Redis has: key layout, TTLs, several connections, reconnection.
//!
//! Each test uses its own key prefix and deletes its keys at the end, after checking that every
//! key it left has a TTL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nightshift_core::secret::Secret;
use nightshift_state::conformance;
use nightshift_state::{LiveState, RedisState, StateConfig, StateError};
use redis::aio::MultiplexedConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const TTL: Duration = Duration::from_secs(3600);

fn url() -> String {
    std::env::var("NIGHTSHIFT_STATE__URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(url: &str) -> StateConfig {
    StateConfig {
        url: Secret::new(url),
        key_prefix: format!("test:state-{}:", uuid::Uuid::new_v4()),
        ttl: TTL,
    }
}

async fn raw() -> MultiplexedConnection {
    redis::Client::open(url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection")
}

async fn pttl(con: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(con)
        .await
        .expect("PTTL")
}

/// Deletes every key under `prefix`, first asserting that each one expires within [`TTL`].
async fn check_ttls_and_clean_up(prefix: &str) {
    let mut con = raw().await;
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await
            .expect("SCAN");
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    for key in &keys {
        let ttl = pttl(&mut con, key).await;
        assert!(
            ttl > 0 && ttl <= TTL.as_millis() as i64,
            "key {key} has PTTL {ttl}: every key must expire"
        );
    }
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(&keys)
            .exec_async(&mut con)
            .await
            .expect("DEL");
    }
}

async fn run(name: &str) {
    let config = config(&url());
    let state = RedisState::connect(&config).await.expect("connect");
    conformance::run(name, Arc::new(state)).await;
    check_ttls_and_clean_up(&config.key_prefix).await;
}

nightshift_state::conformance_tests!(run);

#[tokio::test]
async fn key_layout_shares_one_hash_tag() {
    let config = config(&url());
    let state = RedisState::connect(&config).await.expect("connect");
    let keys = state.keys("batch_abc").expect("keys");
    let p = &config.key_prefix;
    assert_eq!(keys.done, format!("{p}batch:{{batch_abc}}:done"));
    assert_eq!(keys.counts, format!("{p}batch:{{batch_abc}}:counts"));
    assert_eq!(keys.cancelled, format!("{p}batch:{{batch_abc}}:cancelled"));
    // Redis Cluster hashes the first `{…}` of a key: the batch id, for all three keys
    for key in [&keys.done, &keys.counts, &keys.cancelled] {
        let open = key.find('{').expect("a hash tag");
        let close = open + key[open..].find('}').expect("a closed hash tag");
        assert_eq!(&key[open + 1..close], "batch_abc", "{key}");
    }
    assert!(matches!(
        state.keys("batch_{x}"),
        Err(StateError::InvalidInput(_))
    ));
}

#[tokio::test]
async fn every_write_sets_the_ttl_of_every_key() {
    let config = config(&url());
    let state = RedisState::connect(&config).await.expect("connect");
    let keys = state.keys("batch_ttl").expect("keys");
    let all = [&keys.done, &keys.counts, &keys.cancelled];
    let mut con = raw().await;
    let ttl_ms = TTL.as_millis() as i64;
    // within a minute of the full TTL: set just now
    let fresh = |ttl: i64| ttl > ttl_ms - 60_000 && ttl <= ttl_ms;

    state
        .record("batch_ttl", &conformance::outcomes(1..=10))
        .await
        .expect("record");
    for key in &all[..2] {
        assert!(fresh(pttl(&mut con, key).await), "{key} after record");
    }
    state.set_cancelled("batch_ttl").await.expect("cancel");
    assert!(fresh(pttl(&mut con, &keys.cancelled).await));

    // a record call refreshes every key, even when it counts nothing new
    for key in all {
        redis::cmd("PEXPIRE")
            .arg(key)
            .arg(5_000)
            .exec_async(&mut con)
            .await
            .expect("PEXPIRE");
    }
    let fresh_lines = state
        .record("batch_ttl", &conformance::outcomes(1..=10))
        .await
        .expect("record again");
    assert_eq!(fresh_lines, 0);
    for key in all {
        assert!(fresh(pttl(&mut con, key).await), "{key} after a redelivery");
    }
    check_ttls_and_clean_up(&config.key_prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_across_connections() {
    let config = config(&url());
    let mut states: Vec<Arc<dyn LiveState>> = Vec::new();
    for _ in 0..8 {
        states.push(Arc::new(
            RedisState::connect(&config).await.expect("connect"),
        ));
    }
    conformance::concurrent_records(&states, "batch_many_connections").await;
    check_ttls_and_clean_up(&config.key_prefix).await;
}

/// A TCP proxy in front of Redis whose connections the test can cut.
struct Proxy {
    url: String,
    connections: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Self {
        let target = url()
            .strip_prefix("redis://")
            .expect("a redis:// url")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("redis://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let accept = tokio::spawn({
            let connections = Arc::clone(&connections);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let target = target.clone();
                    connections.lock().expect("proxy lock").spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        Self {
            url,
            connections,
            accept,
        }
    }

    /// Closes every proxied connection (new ones are still accepted).
    fn cut(&self) {
        self.connections.lock().expect("proxy lock").abort_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test]
async fn reconnects_after_the_connection_drops() {
    let proxy = Proxy::start().await;
    let config = config(&proxy.url);
    let state = RedisState::connect(&config).await.expect("connect");
    let lines = conformance::outcomes(1..=100);
    assert_eq!(state.record("batch_rc", &lines).await.expect("record"), 100);

    proxy.cut();
    // Calls may fail while the connection is re-established in the background; a retried
    // record is safe. Poll until one succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counted = loop {
        match state.record("batch_rc", &lines).await {
            Ok(counted) => break counted,
            Err(StateError::Backend(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no reconnection within 10 s: {e}"),
        }
    };
    assert_eq!(counted, 0, "the lines were counted before the cut");
    assert_eq!(
        state.counts("batch_rc").await.expect("counts"),
        conformance::expected(1..=100)
    );
    drop(proxy);
    check_ttls_and_clean_up(&config.key_prefix).await;
}

#[tokio::test]
async fn connect_fails_when_redis_is_unreachable() {
    // port 9 (discard) on loopback: nothing listens there
    let started = Instant::now();
    let result = RedisState::connect(&config("redis://127.0.0.1:9")).await;
    assert!(
        matches!(result, Err(StateError::Backend(_))),
        "expected a backend error, got {result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "connect must give up within seconds, took {:?}",
        started.elapsed()
    );
}
