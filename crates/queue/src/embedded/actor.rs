//! The task that owns the database: it opens it, then applies every command sent by the queue,
//! its consumers and their deliveries, in batches of whatever is waiting, one transaction per
//! batch (see the [module docs](super)).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteLockingMode, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::{QueueError, QueueKind, Result, Settlement};

/// How long `open` waits for another connection to release the file.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most operations applied in one transaction.
const MAX_BATCH: usize = 256;

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

/// One [`Notify`] per kind, woken when messages of that kind become ready.
#[derive(Debug, Default)]
pub(super) struct Wakers([Notify; 3]);

impl Wakers {
    pub(super) fn of(&self, kind: QueueKind) -> &Notify {
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

pub(super) fn kind_named(name: &str) -> Option<QueueKind> {
    QueueKind::ALL.into_iter().find(|k| k.as_str() == name)
}

/// What the database task is asked to do. A command whose reply sender is dropped unanswered
/// (the task stopped) reads as "the queue is closed".
#[derive(Debug)]
pub(super) enum Command {
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
pub(super) struct Claimed {
    pub(super) id: i64,
    pub(super) lease: i64,
    pub(super) payload: Vec<u8>,
    pub(super) headers: String,
    pub(super) delivery_count: i64,
}

/// What one command did, inside the batch's transaction.
enum Outcome {
    Done,
    Claimed(Option<Claimed>),
    Count(u64),
    /// The delivery was not (any more) the one delivered: nothing changed.
    NotDelivered,
}

pub(super) fn closed() -> QueueError {
    QueueError::Unavailable("the embedded queue is closed".into())
}

/// An SQLite error as a port error. SQLite failing is the local equivalent of a broker that
/// does not answer: retrying later may work (disk full, file locked).
fn database(what: &str, e: &sqlx::Error) -> QueueError {
    QueueError::Unavailable(format!("{what}: {e}"))
}

/// Sends a command to the database task and waits for its answer.
pub(super) async fn ask<T>(
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

/// The task that owns the database connection and applies every command.
pub(super) struct Actor {
    /// The one connection to the file, holding its exclusive lock.
    conn: SqliteConnection,
    /// From the queue, its consumers and their deliveries; ends when all of them are gone.
    commands: mpsc::UnboundedReceiver<Command>,
    /// Rung after each commit for the kinds it made ready.
    wakers: Arc<Wakers>,
    /// [`EmbeddedQueueConfig::delivery_limit`](super::EmbeddedQueueConfig::delivery_limit).
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
    /// Opens (creating when missing) the database at `path` and takes its lock, returns the
    /// messages left delivered and unsettled by the last process to their queues (or
    /// dead-letters them past `delivery_limit`), and spawns the task that owns the database.
    /// Returns the sender of its commands and the wakers it rings.
    pub(super) async fn start(
        path: &Path,
        delivery_limit: u32,
    ) -> Result<(mpsc::UnboundedSender<Command>, Arc<Wakers>)> {
        let opening = |e: &dyn std::fmt::Display| {
            QueueError::Unavailable(format!("open the queue database {}: {e}", path.display()))
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| opening(&e))?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
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
        let limit = i64::from(delivery_limit);
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
        Ok((commands, wakers))
    }

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
