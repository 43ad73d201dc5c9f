//! The embedded adapter: the work queue inside the process, durable in an SQLite file, for the
//! single-process deployment (`nightshift standalone`) and tests.
//!
//! Storage: one table, one row per message that is not yet acked:
//!
//! | column | what |
//! | --- | --- |
//! | `id` | `AUTOINCREMENT`: delivery order within a kind (FIFO, but for redeliveries) |
//! | `kind` | [`QueueKind::as_str`] |
//! | `payload`, `headers` | the message as published (headers as a JSON object) |
//! | `delivery_count` | how many times the message returned to its queue |
//! | `state` | `ready`, `delivered` (to a consumer, unsettled) or `dead` (dead-lettered) |
//! | `lease` | while `delivered`: which delivery, so a stale settle never touches a newer one |
//!
//! One task owns the one connection and applies every operation, in batches of whatever is
//! waiting, one transaction per batch: a burst of publishes costs one commit. The file is in WAL
//! mode with `synchronous = FULL` for batches that publish, so [`WorkQueue::publish`] returns
//! `Ok` only once the message is on disk (it survives `kill -9` and a power cut, like a
//! RabbitMQ confirm), and `NORMAL` for the others: losing a claim or a settlement to a power cut
//! only means a message is delivered again, which at-least-once allows. The connection holds
//! SQLite's exclusive lock: one [`EmbeddedQueue`] per file, the one that knows about the
//! consumers (a second open waits for the lock a few seconds, then fails).
//!
//! Delivery: a consumer claims the oldest ready message of its kind (one `UPDATE … RETURNING`,
//! so no two consumers get the same message) and, when there is none, waits on its kind's
//! [`Notify`], woken by every commit that makes a message of that kind ready (with a slow
//! re-check as a safety net). A semaphore bounds its unsettled deliveries to `prefetch`.
//!
//! Settling: ack deletes the row; requeue, a delivery dropped unsettled, or a dropped consumer
//! returns it to `ready` with `delivery_count + 1`, or to `dead` when it had already returned
//! `delivery_limit` times; dead-lettering sets `dead` at once. A delivery dropped unsettled (and
//! a dropped consumer) only sends its return to the task, so `Drop` never blocks.
//!
//! Restart: [`EmbeddedQueue::open`] returns every message left `delivered` (its consumer died
//! with the process) to `ready` with `delivery_count + 1`, or to `dead` past the limit, as
//! RabbitMQ does for a consumer whose connection vanished.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteLockingMode, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{
    Consumer, Delivery, Headers, QueueConfig, QueueError, QueueKind, Result, Settle, Settlement,
    WorkQueue,
};

/// How long `open` waits for another connection to release the file.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most operations applied in one transaction.
const MAX_BATCH: usize = 256;
/// A waiting consumer looks for ready messages this often even without being woken: a safety
/// net, not the delivery path.
const RECHECK: Duration = Duration::from_secs(2);
/// The longest header name RabbitQueue accepts (an AMQP short string), kept here so that a
/// message the embedded queue accepts is one the real one accepts too.
const MAX_HEADER_NAME_LEN: usize = 255;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    headers        TEXT    NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    state          TEXT    NOT NULL DEFAULT 'ready'
                   CHECK (state IN ('ready', 'delivered', 'dead')),
    lease          INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_kind_state ON messages (kind, state, id);
";

/// Returns a message to its queue, or dead-letters it when it already returned `?limit` times.
/// `RETURNING kind, state` tells which queue to wake.
const RETURN_DELIVERED: &str = "
UPDATE messages
SET state = CASE WHEN delivery_count >= ?3 THEN 'dead' ELSE 'ready' END,
    delivery_count = delivery_count + 1,
    lease = NULL
WHERE id = ?1 AND lease = ?2 AND state = 'delivered'
RETURNING kind, state";

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

/// [`WorkQueue`] in the process, durable in an SQLite file. See the module docs.
pub struct EmbeddedQueue {
    /// To the task that owns the database.
    commands: mpsc::UnboundedSender<Command>,
    /// Shared with the task and the consumers.
    wakers: Arc<Wakers>,
    delivery_limit: u32,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedQueue")
            .field("path", &self.path)
            .field("delivery_limit", &self.delivery_limit)
            .finish_non_exhaustive()
    }
}

/// One [`Notify`] per kind, woken when messages of that kind become ready.
#[derive(Debug, Default)]
struct Wakers([Notify; 3]);

impl Wakers {
    fn of(&self, kind: QueueKind) -> &Notify {
        &self.0[index(kind)]
    }
}

fn index(kind: QueueKind) -> usize {
    match kind {
        QueueKind::ChunkTasks => 0,
        QueueKind::ChunkResults => 1,
        QueueKind::FinalizeJobs => 2,
    }
}

fn kind_named(name: &str) -> Option<QueueKind> {
    QueueKind::ALL.into_iter().find(|k| k.as_str() == name)
}

/// What the database task is asked to do. A command whose reply sender is dropped unanswered
/// (the task stopped) reads as "the queue is closed".
#[derive(Debug)]
enum Command {
    Publish {
        kind: QueueKind,
        payload: Bytes,
        /// JSON object.
        headers: String,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Claim the oldest ready message of `kind`, if any.
    Claim {
        kind: QueueKind,
        reply: oneshot::Sender<Result<Option<Claimed>>>,
    },
    /// Settle a delivery; `reply` is `None` when nobody waits (a dropped delivery or consumer).
    Settle {
        id: i64,
        lease: i64,
        how: Settlement,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    Count {
        kind: QueueKind,
        state: &'static str,
        reply: oneshot::Sender<Result<u64>>,
    },
    Ping {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Apply what came before, close the database, stop.
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// A message claimed for a consumer.
#[derive(Debug)]
struct Claimed {
    id: i64,
    lease: i64,
    payload: Vec<u8>,
    headers: String,
    delivery_count: i64,
}

/// What one command did, inside the batch's transaction.
enum Outcome {
    Done,
    Claimed(Option<Claimed>),
    Count(u64),
    /// The delivery was not (any more) the one delivered: nothing changed.
    NotDelivered,
}

fn closed() -> QueueError {
    QueueError::Unavailable("the embedded queue is closed".into())
}

/// An SQLite error as a port error. SQLite failing is the local equivalent of a broker that
/// does not answer: retrying later may work (disk full, file locked).
fn database(what: &str, e: &sqlx::Error) -> QueueError {
    QueueError::Unavailable(format!("{what}: {e}"))
}

impl EmbeddedQueue {
    /// Validates `config`, opens (creating when missing) the database, returns the messages
    /// that were delivered and unsettled when the last process using it stopped, and starts the
    /// task that owns it. Fails with [`QueueError::Config`] for an invalid configuration and
    /// [`QueueError::Unavailable`] when the file cannot be opened or is in use by another
    /// [`EmbeddedQueue`] (in this process or another one).
    pub async fn open(config: &EmbeddedQueueConfig) -> Result<Self> {
        config.validate()?;
        let path = config.path.clone();
        let opening = |e: &dyn std::fmt::Display| {
            QueueError::Unavailable(format!("open the queue database {}: {e}", path.display()))
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| opening(&e))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            // Set before WAL, so that WAL needs no shared memory and the lock is ours alone.
            .locking_mode(SqliteLockingMode::Exclusive)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(OPEN_TIMEOUT);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| opening(&in_use_hint(e)))?;
        // Takes the exclusive lock now (held until the connection closes), rather than at the
        // first write.
        sqlx::raw_sql("BEGIN EXCLUSIVE; COMMIT;")
            .execute(&mut conn)
            .await
            .map_err(|e| opening(&in_use_hint(e)))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&mut conn)
            .await
            .map_err(|e| opening(&e))?;
        let limit = i64::from(config.delivery_limit);
        let returned = sqlx::query(
            "UPDATE messages
             SET state = CASE WHEN delivery_count >= ?1 THEN 'dead' ELSE 'ready' END,
                 delivery_count = delivery_count + 1,
                 lease = NULL
             WHERE state = 'delivered'",
        )
        .bind(limit)
        .execute(&mut conn)
        .await
        .map_err(|e| opening(&e))?
        .rows_affected();
        if returned > 0 {
            info!(
                path = %path.display(),
                messages = returned,
                "returned the deliveries left unsettled by the last run to their queues"
            );
        }
        let (commands, receiver) = mpsc::unbounded_channel();
        let wakers = Arc::new(Wakers::default());
        let actor = Actor {
            conn,
            commands: receiver,
            wakers: wakers.clone(),
            delivery_limit: limit,
            next_lease: 1,
            full_sync: true,
            unclaimed: Vec::new(),
            woken: [false; 3],
        };
        tokio::spawn(actor.run());
        Ok(Self {
            commands,
            wakers,
            delivery_limit: config.delivery_limit,
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Applies what was asked before, closes the database and releases its lock (part of a
    /// graceful shutdown). Afterwards every call fails with [`QueueError::Unavailable`],
    /// consumers end, and deliveries can no longer be settled: the next open delivers them
    /// again. Closing a closed queue is fine.
    pub async fn close(&self) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close { reply }).is_ok() {
            // An error means the task stopped already: closed either way.
            let _ = done.await;
        }
        Ok(())
    }

    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        ask(&self.commands, command).await
    }
}

async fn ask<T>(
    commands: &mpsc::UnboundedSender<Command>,
    command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
) -> Result<T> {
    let (reply, answer) = oneshot::channel();
    commands.send(command(reply)).map_err(|_| closed())?;
    answer.await.map_err(|_| closed())?
}

/// Adds a hint to the error of a file that another connection holds.
fn in_use_hint(e: sqlx::Error) -> String {
    let busy = matches!(&e, sqlx::Error::Database(db)
        if db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| matches!(c & 0xff, 5 | 6)));
    if busy {
        format!("{e} (is another nightshift process, or another EmbeddedQueue, using it?)")
    } else {
        e.to_string()
    }
}

/// The publisher's headers as JSON; `x-` names are the broker's.
fn encode_headers(headers: &Headers) -> Result<String> {
    for name in headers.keys() {
        if name
            .get(..2)
            .is_some_and(|start| start.eq_ignore_ascii_case("x-"))
        {
            return Err(QueueError::InvalidArgument(format!(
                "header {name:?}: names starting with \"x-\" are reserved for the broker"
            )));
        }
        if name.len() > MAX_HEADER_NAME_LEN {
            return Err(QueueError::InvalidArgument(format!(
                "header names are at most {MAX_HEADER_NAME_LEN} bytes long"
            )));
        }
    }
    serde_json::to_string(headers).map_err(|e| QueueError::InvalidArgument(format!("headers: {e}")))
}

#[async_trait]
impl WorkQueue for EmbeddedQueue {
    async fn publish(&self, kind: QueueKind, payload: Bytes, headers: Headers) -> Result<()> {
        let headers = encode_headers(&headers)?;
        self.ask(|reply| Command::Publish {
            kind,
            payload,
            headers,
            reply,
        })
        .await
    }

    async fn consume(&self, kind: QueueKind, prefetch: u16) -> Result<Box<dyn Consumer>> {
        if prefetch == 0 {
            return Err(QueueError::InvalidArgument(
                "prefetch must be at least 1 (0 would mean unbounded)".into(),
            ));
        }
        if self.commands.is_closed() {
            return Err(closed());
        }
        debug!(%kind, prefetch, "consumer started");
        Ok(Box::new(EmbeddedConsumer {
            kind,
            commands: self.commands.clone(),
            wakers: self.wakers.clone(),
            prefetch: Arc::new(Semaphore::new(usize::from(prefetch))),
            held: Arc::new(Held::new()),
            ended: false,
        }))
    }

    async fn depth(&self, kind: QueueKind) -> Result<u64> {
        self.ask(|reply| Command::Count {
            kind,
            state: "ready",
            reply,
        })
        .await
    }

    async fn dead_lettered(&self, kind: QueueKind) -> Result<u64> {
        self.ask(|reply| Command::Count {
            kind,
            state: "dead",
            reply,
        })
        .await
    }

    fn delivery_limit(&self) -> u32 {
        self.delivery_limit
    }

    async fn ping(&self) -> Result<()> {
        self.ask(|reply| Command::Ping { reply }).await
    }
}

/// The task that owns the database connection and applies every command.
struct Actor {
    conn: SqliteConnection,
    commands: mpsc::UnboundedReceiver<Command>,
    wakers: Arc<Wakers>,
    delivery_limit: i64,
    /// The lease of the next claim. The database is ours alone, so a counter is unique.
    next_lease: i64,
    /// Whether the connection's `synchronous` is `FULL` (else `NORMAL`).
    full_sync: bool,
    /// Claims whose consumer stopped waiting before the answer came (its `next` was
    /// cancelled): put back, uncounted, in the next batch. `(id, lease)`.
    unclaimed: Vec<(i64, i64)>,
    /// Kinds of which the current batch made messages ready, indexed like [`index`].
    woken: [bool; 3],
}

impl Actor {
    async fn run(mut self) {
        let mut batch = Vec::new();
        let close = loop {
            if self.unclaimed.is_empty() {
                match self.commands.recv().await {
                    Some(command) => batch.push(command),
                    // Every handle (queue, consumers, deliveries) is gone.
                    None => break None,
                }
            }
            while batch.len() < MAX_BATCH {
                match self.commands.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            let close_at = batch
                .iter()
                .position(|c| matches!(c, Command::Close { .. }));
            // Commands queued behind a close are dropped unanswered: "closed".
            let rest = close_at.map(|at| batch.split_off(at));
            self.apply(std::mem::take(&mut batch)).await;
            if let Some(mut rest) = rest
                && let Command::Close { reply } = rest.swap_remove(0)
            {
                break Some(reply);
            }
        };
        // Any claim still to put back stays `delivered`: the next open returns it.
        if let Err(e) = self.conn.close().await {
            warn!(error = %e, "closing the queue database");
        }
        if let Some(reply) = close {
            let _ = reply.send(());
        }
        // Waiting consumers look again, find the queue closed, and end.
        drop(self.commands);
        for kind in QueueKind::ALL {
            self.wakers.of(kind).notify_waiters();
        }
    }

    /// Applies a batch in one transaction, then answers.
    async fn apply(&mut self, batch: Vec<Command>) {
        let publishes = batch.iter().any(|c| matches!(c, Command::Publish { .. }));
        let unclaimed = std::mem::take(&mut self.unclaimed);
        self.woken = [false; 3];
        let outcomes = match self.transaction(&batch, &unclaimed, publishes).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await;
                warn!(error = %e, commands = batch.len(), "queue database operation failed");
                // Put back with the next batch.
                self.unclaimed = unclaimed;
                // Deliveries dropped meanwhile stay `delivered` until the next open: their
                // consumer no longer holds them, so nothing else would return them.
                for command in batch {
                    answer(command, Err(database("queue database", &e)));
                }
                return;
            }
        };
        for (command, outcome) in batch.into_iter().zip(outcomes) {
            if let Some(lost) = answer(command, Ok(outcome)) {
                self.unclaimed.push(lost);
            }
        }
        for kind in QueueKind::ALL {
            if self.woken[index(kind)] {
                self.wakers.of(kind).notify_waiters();
            }
        }
    }

    async fn transaction(
        &mut self,
        batch: &[Command],
        unclaimed: &[(i64, i64)],
        publishes: bool,
    ) -> sqlx::Result<Vec<Outcome>> {
        if publishes != self.full_sync {
            let pragma = if publishes {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            sqlx::raw_sql(pragma).execute(&mut self.conn).await?;
            self.full_sync = publishes;
        }
        sqlx::raw_sql("BEGIN").execute(&mut self.conn).await?;
        for &(id, lease) in unclaimed {
            let row = sqlx::query(
                "UPDATE messages SET state = 'ready', lease = NULL
                 WHERE id = ?1 AND lease = ?2 AND state = 'delivered'
                 RETURNING kind",
            )
            .bind(id)
            .bind(lease)
            .fetch_optional(&mut self.conn)
            .await?;
            self.wake(row.as_ref().map(|r| r.get("kind")));
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for command in batch {
            outcomes.push(self.execute(command).await?);
        }
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
        Ok(outcomes)
    }

    fn wake(&mut self, kind: Option<&str>) {
        if let Some(kind) = kind.and_then(kind_named) {
            self.woken[index(kind)] = true;
        }
    }

    async fn execute(&mut self, command: &Command) -> sqlx::Result<Outcome> {
        let conn = &mut self.conn;
        Ok(match command {
            Command::Publish {
                kind,
                payload,
                headers,
                ..
            } => {
                sqlx::query("INSERT INTO messages (kind, payload, headers) VALUES (?1, ?2, ?3)")
                    .bind(kind.as_str())
                    .bind(payload.as_ref())
                    .bind(headers.as_str())
                    .execute(conn)
                    .await?;
                self.woken[index(*kind)] = true;
                Outcome::Done
            }
            Command::Claim { kind, .. } => {
                let lease = self.next_lease;
                let row = sqlx::query(
                    "UPDATE messages SET state = 'delivered', lease = ?2
                     WHERE id = (SELECT id FROM messages WHERE kind = ?1 AND state = 'ready'
                                 ORDER BY id LIMIT 1)
                     RETURNING id, payload, headers, delivery_count",
                )
                .bind(kind.as_str())
                .bind(lease)
                .fetch_optional(conn)
                .await?;
                let claimed = match row {
                    Some(row) => {
                        self.next_lease += 1;
                        Some(Claimed {
                            id: row.try_get("id")?,
                            lease,
                            payload: row.try_get("payload")?,
                            headers: row.try_get("headers")?,
                            delivery_count: row.try_get("delivery_count")?,
                        })
                    }
                    None => None,
                };
                Outcome::Claimed(claimed)
            }
            Command::Settle { id, lease, how, .. } => {
                let (id, lease) = (*id, *lease);
                match how {
                    Settlement::Ack => {
                        let deleted = sqlx::query(
                            "DELETE FROM messages
                             WHERE id = ?1 AND lease = ?2 AND state = 'delivered'",
                        )
                        .bind(id)
                        .bind(lease)
                        .execute(conn)
                        .await?
                        .rows_affected();
                        settled(deleted > 0)
                    }
                    Settlement::DeadLetter => {
                        let updated = sqlx::query(
                            "UPDATE messages SET state = 'dead', lease = NULL
                             WHERE id = ?1 AND lease = ?2 AND state = 'delivered'",
                        )
                        .bind(id)
                        .bind(lease)
                        .execute(conn)
                        .await?
                        .rows_affected();
                        settled(updated > 0)
                    }
                    Settlement::Requeue => {
                        let row = sqlx::query(RETURN_DELIVERED)
                            .bind(id)
                            .bind(lease)
                            .bind(self.delivery_limit)
                            .fetch_optional(conn)
                            .await?;
                        match row {
                            Some(row) => {
                                let state: &str = row.try_get("state")?;
                                if state == "ready" {
                                    self.wake(Some(row.try_get("kind")?));
                                }
                                Outcome::Done
                            }
                            None => Outcome::NotDelivered,
                        }
                    }
                }
            }
            Command::Count { kind, state, .. } => {
                let count: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM messages WHERE kind = ?1 AND state = ?2",
                )
                .bind(kind.as_str())
                .bind(*state)
                .fetch_one(conn)
                .await?;
                Outcome::Count(u64::try_from(count).unwrap_or(0))
            }
            Command::Ping { .. } => {
                sqlx::query("SELECT 1").execute(conn).await?;
                Outcome::Done
            }
            // Split off before the batch is applied.
            Command::Close { .. } => Outcome::Done,
        })
    }
}

fn settled(changed: bool) -> Outcome {
    if changed {
        Outcome::Done
    } else {
        Outcome::NotDelivered
    }
}

/// Answers a command. Returns the `(id, lease)` of a claim nobody took, to be put back.
fn answer(command: Command, outcome: Result<Outcome>) -> Option<(i64, i64)> {
    let lost = || QueueError::DeliveryLost("it is no longer delivered to this consumer".into());
    match command {
        Command::Publish { reply, .. } | Command::Ping { reply } => {
            let _ = reply.send(outcome.map(|_| ()));
        }
        Command::Settle { reply, .. } => {
            let result = match outcome {
                Ok(Outcome::NotDelivered) => Err(lost()),
                other => other.map(|_| ()),
            };
            match reply {
                Some(reply) => {
                    let _ = reply.send(result);
                }
                None => {
                    if let Err(e) = result {
                        debug!(error = %e, "returning a dropped delivery to its queue");
                    }
                }
            }
        }
        Command::Count { reply, .. } => {
            let _ = reply.send(outcome.map(|o| match o {
                Outcome::Count(n) => n,
                _ => 0,
            }));
        }
        Command::Claim { reply, .. } => {
            let claimed = match outcome {
                Ok(Outcome::Claimed(claimed)) => claimed,
                Ok(_) => None,
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return None;
                }
            };
            let back = claimed.as_ref().map(|c| (c.id, c.lease));
            if reply.send(Ok(claimed)).is_err() {
                return back;
            }
        }
        Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
    None
}

/// A consumer's unsettled deliveries: id → lease; `None` once the consumer is gone (its
/// deliveries were returned to their queue).
#[derive(Debug)]
struct Held(Mutex<Option<HashMap<i64, i64>>>);

impl Held {
    fn new() -> Self {
        Self(Mutex::new(Some(HashMap::new())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<HashMap<i64, i64>>> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery handed out by the (live) consumer.
    fn hold(&self, id: i64, lease: i64) {
        if let Some(map) = self.lock().as_mut() {
            map.insert(id, lease);
        }
    }

    /// Takes a delivery out of the consumer's hands, to settle it; `false` when the consumer
    /// already returned it.
    fn release(&self, id: i64) -> bool {
        self.lock()
            .as_mut()
            .is_some_and(|map| map.remove(&id).is_some())
    }
}

/// Deliveries of one kind to one consumer.
struct EmbeddedConsumer {
    kind: QueueKind,
    commands: mpsc::UnboundedSender<Command>,
    wakers: Arc<Wakers>,
    /// One permit per delivery that may be unsettled at once; a delivery holds its permit
    /// until settled.
    prefetch: Arc<Semaphore>,
    held: Arc<Held>,
    /// The queue closed or failed, or the consumer was cancelled: `next` returns `None`.
    ended: bool,
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        if self.ended {
            return None;
        }
        // Never closed, so this only waits.
        let permit = self.prefetch.clone().acquire_owned().await.ok()?;
        let waker = self.wakers.clone();
        let kind = self.kind;
        loop {
            // Registered before looking, so a message made ready meanwhile wakes us.
            let woken = waker.of(kind).notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match ask(&self.commands, |reply| Command::Claim { kind, reply }).await {
                Ok(Some(claimed)) => return Some(Ok(self.deliver(claimed, permit))),
                Ok(None) => {}
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    async fn cancel(&mut self) -> Result<()> {
        // Messages are claimed only by `next`: nothing is on its way.
        self.ended = true;
        Ok(())
    }
}

impl EmbeddedConsumer {
    fn deliver(&self, claimed: Claimed, permit: OwnedSemaphorePermit) -> Delivery {
        self.held.hold(claimed.id, claimed.lease);
        let headers = serde_json::from_str(&claimed.headers).unwrap_or_else(|e| {
            warn!(id = claimed.id, error = %e, "unreadable headers of a queued message");
            Headers::new()
        });
        let delivery_count = u32::try_from(claimed.delivery_count).unwrap_or(0);
        Delivery::new(
            Bytes::from(claimed.payload),
            headers,
            delivery_count > 0,
            delivery_count,
            Box::new(EmbeddedSettler {
                id: claimed.id,
                lease: claimed.lease,
                held: self.held.clone(),
                commands: self.commands.clone(),
                _permit: permit,
            }),
        )
    }
}

impl Drop for EmbeddedConsumer {
    /// Returns every delivery still unsettled to its queue (settling one afterwards fails with
    /// [`QueueError::DeliveryLost`]).
    fn drop(&mut self) {
        let held = self.held.lock().take().unwrap_or_default();
        for (id, lease) in held {
            let _ = self.commands.send(Command::Settle {
                id,
                lease,
                how: Settlement::Requeue,
                reply: None,
            });
        }
    }
}

/// Settles one delivery through the database task.
#[derive(Debug)]
struct EmbeddedSettler {
    id: i64,
    lease: i64,
    held: Arc<Held>,
    commands: mpsc::UnboundedSender<Command>,
    /// Frees the consumer's prefetch slot when the delivery is settled (or dropped).
    _permit: OwnedSemaphorePermit,
}

#[async_trait]
impl Settle for EmbeddedSettler {
    async fn settle(self: Box<Self>, how: Settlement) -> Result<()> {
        if !self.held.release(self.id) {
            return Err(QueueError::DeliveryLost(
                "its consumer is gone and returned it to its queue".into(),
            ));
        }
        let (id, lease) = (self.id, self.lease);
        ask(&self.commands, |reply| Command::Settle {
            id,
            lease,
            how,
            reply: Some(reply),
        })
        .await
        .map_err(|e| match e {
            QueueError::Unavailable(message) => QueueError::DeliveryLost(message),
            other => other,
        })
    }

    fn abandon(self: Box<Self>) {
        if self.held.release(self.id) {
            // A closed queue leaves it `delivered`: the next open returns it.
            let _ = self.commands.send(Command::Settle {
                id: self.id,
                lease: self.lease,
                how: Settlement::Requeue,
                reply: None,
            });
        }
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

    #[test]
    fn reserved_and_oversized_header_names_are_refused() {
        for name in ["x-death", "X-Delivery-Count", &"h".repeat(256)] {
            let headers = Headers::from([(name.to_owned(), "v".to_owned())]);
            assert!(matches!(
                encode_headers(&headers),
                Err(QueueError::InvalidArgument(_))
            ));
        }
        let headers = Headers::from([("traceparent".to_owned(), "00-a-b-01".to_owned())]);
        let json = encode_headers(&headers).unwrap();
        assert_eq!(serde_json::from_str::<Headers>(&json).unwrap(), headers);
    }
}
