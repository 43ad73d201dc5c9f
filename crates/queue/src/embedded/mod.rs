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
//! [`Notify`](tokio::sync::Notify), woken by every commit that makes a message of that kind
//! ready (with a slow re-check as a safety net). A semaphore bounds its unsettled deliveries to
//! `prefetch`.
//!
//! By idea: [`config`] (where the file is, the delivery limit), [`actor`] (the task that owns
//! the database and every SQL statement), [`consumer`] (deliveries, prefetch, settling); this
//! module is the [`WorkQueue`] handle.
//!
//! Settling: ack deletes the row; requeue, a delivery dropped unsettled, or a dropped consumer
//! returns it to `ready` with `delivery_count + 1`, or to `dead` when it had already returned
//! `delivery_limit` times; dead-lettering sets `dead` at once. A delivery dropped unsettled (and
//! a dropped consumer) only sends its return to the task, so `Drop` never blocks.
//!
//! Restart: [`EmbeddedQueue::open`] returns every message left `delivered` (its consumer died
//! with the process) to `ready` with `delivery_count + 1`, or to `dead` past the limit, as
//! RabbitMQ does for a consumer whose connection vanished.

mod actor;
mod config;
mod consumer;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use self::actor::{Actor, Command, Wakers, ask, closed};
pub use self::config::EmbeddedQueueConfig;
use self::consumer::EmbeddedConsumer;
use crate::{Consumer, Headers, QueueError, QueueKind, Result, WorkQueue};

/// The longest header name RabbitQueue accepts (an AMQP short string), kept here so that a
/// message the embedded queue accepts is one the real one accepts too.
const MAX_HEADER_NAME_LEN: usize = 255;

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

impl EmbeddedQueue {
    /// Validates `config`, opens (creating when missing) the database, returns the messages
    /// that were delivered and unsettled when the last process using it stopped, and starts the
    /// task that owns it. Fails with [`QueueError::Config`] for an invalid configuration and
    /// [`QueueError::Unavailable`] when the file cannot be opened or is in use by another
    /// [`EmbeddedQueue`] (in this process or another one).
    pub async fn open(config: &EmbeddedQueueConfig) -> Result<Self> {
        config.validate()?;
        let (commands, wakers) = Actor::start(&config.path, config.delivery_limit).await?;
        Ok(Self {
            commands,
            wakers,
            delivery_limit: config.delivery_limit,
            path: config.path.clone(),
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
        Ok(Box::new(EmbeddedConsumer::new(
            kind,
            self.commands.clone(),
            self.wakers.clone(),
            prefetch,
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

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
