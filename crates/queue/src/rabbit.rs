//! The RabbitMQ adapter (AMQP 0-9-1 through `lapin`), written for RabbitMQ 3.10 and later.
//!
//! Topology, declared idempotently by [`RabbitQueue::connect`] (and again after a reconnect),
//! for each [`QueueKind`], with `{prefix}` from [`QueueConfig::prefix`]:
//! - `{prefix}.{kind}`: a durable quorum queue (replicated, survives broker restarts) with
//!   `x-delivery-limit` = [`QueueConfig::delivery_limit`] (RabbitMQ 3.10 has no default limit),
//!   dead-lettering through the default exchange (`x-dead-letter-exchange = ""`) to
//!   `{prefix}.{kind}.dead`, with the `at-least-once` dead-letter strategy (RabbitMQ keeps a
//!   message in the source queue until the dead-letter queue confirmed it; that strategy needs
//!   `x-overflow = reject-publish`, harmless here since no length limit is set);
//! - `{prefix}.{kind}.dead`: a durable quorum queue that nothing consumes: poison messages wait
//!   there for an operator.
//!
//! Messages go through the default exchange straight to their queue: persistent
//! (`delivery_mode` 2), `content_type` `application/x-protobuf`, the headers as AMQP long
//! strings, `mandatory` so that a missing queue is an error rather than a silent drop. One
//! connection per [`RabbitQueue`] carries one publishing channel in confirm mode (every publish
//! waits for its own confirm) and one channel per consumer, with `basic.qos(prefetch)`.
//!
//! Connection loss: the adapter does not replay anything behind the caller's back. The call
//! that meets a dead connection fails with [`QueueError::Unavailable`], and every consumer of
//! that connection ends (`Some(Err)`, then `None`) while the broker requeues its unsettled
//! deliveries. The next call of any method reconnects (once, for all concurrent callers) and
//! redeclares the topology, so a process recovers by simply calling again (a new
//! [`WorkQueue::consume`] for consumers); [`WorkQueue::ping`] reconnects too, so readiness
//! turns green again as soon as the broker is back. A delivery of a lost connection cannot be
//! settled any more ([`QueueError::DeliveryLost`]); it is delivered again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use nightshift_core::secret::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::{
    Consumer, Delivery, Headers, QueueError, QueueKind, Result, Settle, Settlement, WorkQueue,
};

/// What every message is.
const CONTENT_TYPE: &str = "application/x-protobuf";
/// AMQP `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;
/// The header in which quorum queues count a message's returns.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// AMQP reply code of a normal channel close.
const REPLY_SUCCESS: u16 = 200;
/// Longest prefix: the longest queue name, `{prefix}.finalize-jobs.dead`, must stay within
/// AMQP's 255-byte short strings.
const MAX_PREFIX_LEN: usize = 200;

/// How to reach RabbitMQ and how to name and shape the queues.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// AMQP URL, e.g. `amqp://user:password@host:5672/%2f` (`amqps://` for TLS; append
    /// `?heartbeat=30` to tune heartbeats). Never printed.
    pub url: Secret,
    /// Queue names are `{prefix}.{kind}` and `{prefix}.{kind}.dead`, so several deployments or
    /// test runs can share a broker. ASCII letters, digits, `.`, `_`, `-`, `:`; not `amq.…`.
    pub prefix: String,
    /// How many times a message may return to its queue (requeued, or its consumer lost)
    /// before its next return dead-letters it; ≥ 1. It is a queue argument fixed when the
    /// queue is created: connecting with another value to existing queues fails with
    /// [`QueueError::Config`] (change it with a RabbitMQ policy, or drain and delete the queues).
    pub delivery_limit: u32,
    /// Bound on establishing the connection (TCP, TLS, AMQP handshake).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on every other broker round trip: a publish and its confirm, declaring queues,
    /// opening a channel, counting messages, settling a delivery. Past it the call fails with
    /// [`QueueError::Unavailable`] (e.g. while a memory or disk alarm blocks publishers).
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// The broker's `consumer_timeout`: how long it lets a delivery stay unacked before it
    /// closes the consumer's channel and redelivers everything that channel held. This is the
    /// broker's setting, not ours — **it must match the broker's** (`consumer_timeout` in
    /// `rabbitmq.conf`; RabbitMQ 3.10 only has this global setting, default 30 minutes).
    /// nightshift keeps the work done for one delivery well under it: see
    /// [`max_hold`](Self::max_hold) and the executor's chunk time budget. Default 30 min.
    #[serde(with = "humantime_serde")]
    pub consumer_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            prefix: "nightshift".into(),
            delivery_limit: 5,
            connect_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            consumer_timeout: Duration::from_secs(30 * 60),
        }
    }
}

impl QueueConfig {
    /// The queue of `kind`: `{prefix}.{kind}`.
    pub fn queue_name(&self, kind: QueueKind) -> String {
        format!("{}.{kind}", self.prefix)
    }

    /// The dead-letter queue of `kind`: `{prefix}.{kind}.dead`.
    pub fn dead_letter_queue_name(&self, kind: QueueKind) -> String {
        format!("{}.{kind}.dead", self.prefix)
    }

    /// How long a queue worker may hold a delivery through a dependency outage before it
    /// re-publishes it: a quarter of [`consumer_timeout`](Self::consumer_timeout), at most
    /// 5 minutes ([`crate::worker::max_hold_for`]).
    pub fn max_hold(&self) -> Duration {
        crate::worker::max_hold_for(Some(self.consumer_timeout))
    }

    /// Checks every field (the URL only syntactically).
    pub fn validate(&self) -> Result<()> {
        self.parse_url()?;
        let prefix = &self.prefix;
        if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN {
            return Err(QueueError::Config(format!(
                "queue.prefix must be 1 to {MAX_PREFIX_LEN} bytes long"
            )));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        {
            return Err(QueueError::Config(format!(
                "queue.prefix {prefix:?} may only hold ASCII letters, digits, '.', '_', '-', ':'"
            )));
        }
        if prefix.starts_with("amq.") {
            return Err(QueueError::Config(
                "queue.prefix must not start with \"amq.\" (reserved by RabbitMQ)".into(),
            ));
        }
        if self.delivery_limit == 0 {
            return Err(QueueError::Config(
                "queue.delivery_limit must be at least 1, or one lost consumer dead-letters \
                 its messages"
                    .into(),
            ));
        }
        if self.connect_timeout.is_zero()
            || self.operation_timeout.is_zero()
            || self.consumer_timeout.is_zero()
        {
            return Err(QueueError::Config(
                "queue.connect_timeout, queue.operation_timeout and queue.consumer_timeout \
                 must be positive"
                    .into(),
            ));
        }
        Ok(())
    }

    fn parse_url(&self) -> Result<AMQPUri> {
        // The parser's message may quote the URL, password included: never pass it on.
        self.url.expose().parse::<AMQPUri>().map_err(|_| {
            QueueError::Config("queue.url is not a valid amqp:// or amqps:// URL".into())
        })
    }
}

/// The names of one kind's queues.
#[derive(Debug)]
struct Names {
    queue: ShortString,
    dead: ShortString,
}

/// The validated configuration, shared by the adapter and its consumers.
struct Settings {
    /// Where to connect (holds the password: never printed).
    url: AMQPUri,
    prefix: String,
    delivery_limit: u32,
    connect_timeout: Duration,
    operation_timeout: Duration,
    consumer_timeout: Duration,
    /// Queue names, indexed like [`QueueKind::ALL`].
    names: [Names; 3],
}

impl Settings {
    fn names(&self, kind: QueueKind) -> &Names {
        let index = match kind {
            QueueKind::ChunkTasks => 0,
            QueueKind::ChunkResults => 1,
            QueueKind::FinalizeJobs => 2,
        };
        &self.names[index]
    }

    /// Runs one broker round trip under `operation_timeout`.
    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl Future<Output = lapin::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.operation_timeout, operation).await {
            Ok(result) => result.map_err(|e| classify(what, &e)),
            Err(_) => Err(QueueError::Unavailable(format!(
                "{what}: no answer from rabbitmq within {:?}",
                self.operation_timeout
            ))),
        }
    }
}

/// A lapin error as a port error: the broker refusing our topology or permissions is a
/// configuration problem; anything else (I/O, closed channel or connection…) is unavailability.
fn classify(what: &str, e: &lapin::Error) -> QueueError {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::NOTFOUND
            )
        )
    {
        return QueueError::Config(format!("{what}: {e}"));
    }
    QueueError::Unavailable(format!("{what}: {e}"))
}

/// One live connection and its publishing channel.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    /// In confirm mode; shared by every publish (lapin matches confirms to publishes).
    publisher: Channel,
}

/// [`WorkQueue`] over RabbitMQ. See the module docs for the topology and for what happens when
/// the connection drops.
pub struct RabbitQueue {
    settings: Arc<Settings>,
    /// The current connection; `None` only until the first reconnect after a loss succeeds.
    /// Held across a reconnect so concurrent callers wait for one reconnect instead of racing.
    link: Mutex<Option<Link>>,
    /// Connections established after the first one (see [`RabbitQueue::reconnects`]).
    reconnects: AtomicU64,
}

impl std::fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueue")
            .field("prefix", &self.settings.prefix)
            .field("delivery_limit", &self.settings.delivery_limit)
            .finish_non_exhaustive()
    }
}

impl RabbitQueue {
    /// Validates `config`, connects and declares the topology (idempotent: existing queues
    /// with the same arguments are kept as they are). Fails with [`QueueError::Config`] when the
    /// configuration is invalid or disagrees with existing queues, [`QueueError::Unavailable`]
    /// when the broker cannot be reached within `connect_timeout`.
    pub async fn connect(config: &QueueConfig) -> Result<Self> {
        config.validate()?;
        let names = QueueKind::ALL.map(|kind| Names {
            queue: short(config.queue_name(kind)),
            dead: short(config.dead_letter_queue_name(kind)),
        });
        let settings = Arc::new(Settings {
            url: config.parse_url()?,
            prefix: config.prefix.clone(),
            delivery_limit: config.delivery_limit,
            connect_timeout: config.connect_timeout,
            operation_timeout: config.operation_timeout,
            consumer_timeout: config.consumer_timeout,
            names,
        });
        let link = establish(&settings).await?;
        Ok(Self {
            settings,
            link: Mutex::new(Some(link)),
            reconnects: AtomicU64::new(0),
        })
    }

    /// Deletes this prefix's queues (all kinds, dead-letter queues included) with whatever
    /// they hold; their consumers end. Missing queues are fine. For tests and decommissioning:
    /// the next reconnect would declare them again.
    pub async fn delete_all(&self) -> Result<()> {
        let link = self.link().await?;
        let settings = &self.settings;
        let channel = settings
            .bounded("open a channel", link.connection.create_channel())
            .await?;
        for names in &settings.names {
            for queue in [&names.queue, &names.dead] {
                settings
                    .bounded(
                        "delete a queue",
                        channel.queue_delete(queue.clone(), QueueDeleteOptions::default()),
                    )
                    .await?;
            }
        }
        close_channel(settings, &channel).await
    }

    /// How many times this value had to connect again after losing (or closing) its
    /// connection. For metrics, and for tests to check that nothing broke the connection
    /// behind their back.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Closes the connection cleanly (part of a graceful shutdown): its consumers end and their
    /// unsettled deliveries return to their queues. A later call on this value reconnects.
    pub async fn close(&self) -> Result<()> {
        let Some(link) = self.link.lock().await.take() else {
            return Ok(());
        };
        if !link.connection.status().connected() {
            return Ok(());
        }
        self.settings
            .bounded(
                "close the connection",
                link.connection.close(REPLY_SUCCESS, "closed".into()),
            )
            .await
    }

    /// The live connection, reconnecting first if it was lost.
    async fn link(&self) -> Result<Link> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_mut() {
            if link.connection.status().connected() {
                if !link.publisher.status().connected() {
                    // The broker closed the publishing channel alone (a channel-level error):
                    // the connection is fine, replace the channel.
                    warn!(
                        prefix = %self.settings.prefix,
                        "rabbitmq publishing channel closed; opening a new one"
                    );
                    link.publisher = open_publisher(&self.settings, &link.connection).await?;
                }
                return Ok(link.clone());
            }
            warn!(prefix = %self.settings.prefix, "rabbitmq connection lost; reconnecting");
        }
        *current = None;
        let link = establish(&self.settings).await?;
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        *current = Some(link.clone());
        Ok(link)
    }

    /// The number of ready messages in `queue` (a passive declare on a throwaway channel: a
    /// missing queue closes the channel it is asked on).
    async fn count(&self, queue: &ShortString) -> Result<u64> {
        let link = self.link().await?;
        let settings = &self.settings;
        let channel = settings
            .bounded("open a channel", link.connection.create_channel())
            .await?;
        let declared = settings
            .bounded(
                "count messages",
                channel.queue_declare(
                    queue.clone(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await?;
        close_channel(settings, &channel).await?;
        Ok(u64::from(declared.message_count()))
    }
}

/// Connects, declares the topology, opens the publishing channel.
async fn establish(settings: &Settings) -> Result<Link> {
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("nightshift ({})", settings.prefix).into());
    let connection = match tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri(settings.url.clone(), properties),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => return Err(classify("connect to rabbitmq", &e)),
        Err(_) => {
            return Err(QueueError::Unavailable(format!(
                "connect to rabbitmq: no answer within {:?}",
                settings.connect_timeout
            )));
        }
    };
    let channel = settings
        .bounded("open a channel", connection.create_channel())
        .await?;
    for names in &settings.names {
        declare(settings, &channel, &names.dead, FieldTable::default()).await?;
        declare(
            settings,
            &channel,
            &names.queue,
            work_queue_arguments(&names.dead, settings.delivery_limit),
        )
        .await?;
    }
    close_channel(settings, &channel).await?;
    let publisher = open_publisher(settings, &connection).await?;
    info!(prefix = %settings.prefix, "connected to rabbitmq, queues declared");
    Ok(Link {
        connection: Arc::new(connection),
        publisher,
    })
}

/// Closes a throwaway channel, unless the broker already did. Explicitly: lapin would close a
/// dropped channel in the background, and should that race with closing the connection, lapin
/// marks the whole connection as failed.
async fn close_channel(settings: &Settings, channel: &Channel) -> Result<()> {
    if !channel.status().connected() {
        return Ok(());
    }
    settings
        .bounded("close a channel", channel.close(REPLY_SUCCESS, "OK".into()))
        .await
}

async fn open_publisher(settings: &Settings, connection: &Connection) -> Result<Channel> {
    let channel = settings
        .bounded("open a channel", connection.create_channel())
        .await?;
    settings
        .bounded(
            "enable publisher confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
    Ok(channel)
}

/// Declares a durable quorum queue with `arguments` (plus its type).
async fn declare(
    settings: &Settings,
    channel: &Channel,
    queue: &ShortString,
    mut arguments: FieldTable,
) -> Result<()> {
    arguments.insert("x-queue-type".into(), long_string("quorum"));
    let what = format!("declare queue {queue}");
    settings
        .bounded(
            &what,
            channel.queue_declare(
                queue.clone(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            ),
        )
        .await
        .map_err(|e| match e {
            QueueError::Config(message) => QueueError::Config(format!(
                "{message} (a queue of that name exists with other arguments, e.g. another \
                 delivery_limit: keep the old value, set a policy, or delete the queue)"
            )),
            other => other,
        })?;
    Ok(())
}

/// The arguments of a work queue: delivery limit and dead-lettering to `dead`.
fn work_queue_arguments(dead: &ShortString, delivery_limit: u32) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(i64::from(delivery_limit)),
    );
    arguments.insert("x-dead-letter-exchange".into(), long_string(""));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        long_string(dead.as_str()),
    );
    arguments.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    arguments.insert("x-overflow".into(), long_string("reject-publish"));
    arguments
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// A name validated by [`QueueConfig::validate`] (short enough by construction).
fn short(name: String) -> ShortString {
    ShortString::try_new(name).unwrap_or_default()
}

/// The publisher's headers as an AMQP table; `x-` names are the broker's.
fn header_table(headers: Headers) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        if name
            .get(..2)
            .is_some_and(|start| start.eq_ignore_ascii_case("x-"))
        {
            return Err(QueueError::InvalidArgument(format!(
                "header {name:?}: names starting with \"x-\" are reserved for the broker"
            )));
        }
        let name = ShortString::try_new(name).map_err(|_| {
            QueueError::InvalidArgument("header names are at most 255 bytes long".into())
        })?;
        table.insert(name, AMQPValue::LongString(value.into()));
    }
    Ok(table)
}

/// The publisher's headers and the quorum queue's delivery count from a delivery's table.
/// Other broker headers (`x-…`) and non-string values (only a foreign publisher sets those)
/// are left out.
fn read_headers(table: Option<&FieldTable>) -> (Headers, u32) {
    let mut headers = Headers::new();
    let mut delivery_count = 0;
    for (name, value) in table.into_iter().flat_map(FieldTable::inner) {
        let name = name.as_str();
        if name == DELIVERY_COUNT_HEADER {
            delivery_count = integer(value).map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        } else if !name.starts_with("x-") {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_owned(),
                _ => continue,
            };
            headers.insert(name.to_owned(), text);
        }
    }
    (headers, delivery_count)
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(n) => Some(n.into()),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}

#[async_trait]
impl WorkQueue for RabbitQueue {
    async fn publish(&self, kind: QueueKind, payload: Bytes, headers: Headers) -> Result<()> {
        let headers = header_table(headers)?;
        let link = self.link().await?;
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(CONTENT_TYPE.into())
            .with_headers(headers);
        let queue = self.settings.names(kind).queue.clone();
        let confirmation = self
            .settings
            .bounded("publish", async {
                link.publisher
                    .basic_publish(
                        ShortString::default(),
                        queue,
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &payload,
                        properties,
                    )
                    .await?
                    .await
            })
            .await?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(QueueError::Rejected(format!(
                    "{kind}: returned by rabbitmq ({} {}): does its queue exist?",
                    returned.reply_code, returned.reply_text
                )))
            }
            Confirmation::Nack(None) => Err(QueueError::Rejected(format!(
                "{kind}: rabbitmq nacked the message"
            ))),
            Confirmation::NotRequested => Err(QueueError::Unavailable(
                "publish: the channel is not in confirm mode".into(),
            )),
        }
    }

    async fn consume(&self, kind: QueueKind, prefetch: u16) -> Result<Box<dyn Consumer>> {
        if prefetch == 0 {
            return Err(QueueError::InvalidArgument(
                "prefetch must be at least 1 (0 would mean unbounded)".into(),
            ));
        }
        let link = self.link().await?;
        let settings = &self.settings;
        let channel = settings
            .bounded("open a channel", link.connection.create_channel())
            .await?;
        // Per consumer (`global: false`), the only mode quorum queues support.
        settings
            .bounded(
                "set prefetch",
                channel.basic_qos(prefetch, BasicQosOptions { global: false }),
            )
            .await?;
        let inner = settings
            .bounded(
                "start consuming",
                channel.basic_consume(
                    settings.names(kind).queue.clone(),
                    ShortString::default(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        debug!(%kind, prefetch, "consumer started");
        Ok(Box::new(RabbitConsumer {
            kind,
            inner,
            channel,
            operation_timeout: settings.operation_timeout,
        }))
    }

    async fn depth(&self, kind: QueueKind) -> Result<u64> {
        self.count(&self.settings.names(kind).queue).await
    }

    async fn dead_lettered(&self, kind: QueueKind) -> Result<u64> {
        self.count(&self.settings.names(kind).dead).await
    }

    fn delivery_limit(&self) -> u32 {
        self.settings.delivery_limit
    }

    fn consumer_timeout(&self) -> Option<Duration> {
        Some(self.settings.consumer_timeout)
    }

    async fn ping(&self) -> Result<()> {
        let link = self.link().await?;
        // A channel round trip proves the broker answers, not just that the socket is open.
        let channel = self
            .settings
            .bounded("ping", link.connection.create_channel())
            .await?;
        close_channel(&self.settings, &channel).await
    }
}

/// A consumer on its own channel: closing the channel is what returns its unsettled
/// deliveries to the queue.
///
/// Dropping it needs no code of ours: lapin cancels the consumer (`basic.cancel`) when its
/// handle is dropped, and closes the channel once the cancel is confirmed and no handle of the
/// channel is left (the deliveries' ackers hold none). Closing the channel ourselves in `Drop`
/// would race with that cancel, and lapin marks the whole connection as failed when a cancel
/// fails.
struct RabbitConsumer {
    kind: QueueKind,
    /// Holds the channel open (lapin's consumer owns a handle to it).
    inner: lapin::Consumer,
    /// The consumer's channel, to cancel the consumer (`basic.cancel`) without closing it.
    channel: Channel,
    operation_timeout: Duration,
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let delivery = match self.inner.next().await? {
            Ok(delivery) => delivery,
            Err(e) => {
                return Some(Err(QueueError::Unavailable(format!(
                    "consumer of {}: {e}",
                    self.kind
                ))));
            }
        };
        let (headers, delivery_count) = read_headers(delivery.properties.headers().as_ref());
        Some(Ok(Delivery::new(
            Bytes::from(delivery.data),
            headers,
            delivery.redelivered,
            delivery_count,
            Box::new(RabbitSettler {
                acker: delivery.acker,
                timeout: self.operation_timeout,
            }),
        )))
    }

    async fn cancel(&mut self) -> Result<()> {
        // The broker answers `cancel-ok` after every delivery it sent before: once it is
        // here, what is left is in lapin's buffer, and the stream ends after it.
        let cancelled = tokio::time::timeout(
            self.operation_timeout,
            self.channel
                .basic_cancel(self.inner.tag(), BasicCancelOptions::default()),
        )
        .await;
        match cancelled {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Unavailable(format!(
                "cancel the consumer of {}: {e}",
                self.kind
            ))),
            Err(_) => Err(QueueError::Unavailable(format!(
                "cancel the consumer of {}: no answer within {:?}",
                self.kind, self.operation_timeout
            ))),
        }
    }
}

/// Settles one RabbitMQ delivery on its consumer's channel.
#[derive(Debug)]
struct RabbitSettler {
    acker: Acker,
    timeout: Duration,
}

#[async_trait]
impl Settle for RabbitSettler {
    async fn settle(self: Box<Self>, how: Settlement) -> Result<()> {
        let settled = match how {
            Settlement::Ack => {
                tokio::time::timeout(self.timeout, self.acker.ack(BasicAckOptions::default())).await
            }
            Settlement::Requeue => {
                tokio::time::timeout(
                    self.timeout,
                    self.acker.nack(BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    }),
                )
                .await
            }
            Settlement::DeadLetter => {
                tokio::time::timeout(
                    self.timeout,
                    self.acker.reject(BasicRejectOptions { requeue: false }),
                )
                .await
            }
        };
        match settled {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(QueueError::DeliveryLost(
                "its consumer's channel is closed".into(),
            )),
            Ok(Err(e)) => Err(QueueError::DeliveryLost(e.to_string())),
            Err(_) => Err(QueueError::DeliveryLost(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    fn abandon(self: Box<Self>) {
        if !self.acker.usable() {
            // The channel is gone: the broker requeues the message by itself.
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            if let Err(e) = self.acker.nack(requeue).await {
                debug!(error = %e, "requeueing a dropped delivery");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_names() {
        let config: QueueConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config.prefix, "nightshift");
        assert_eq!(config.delivery_limit, 5);
        assert_eq!(config.connect_timeout, Duration::from_secs(10));
        assert_eq!(config.consumer_timeout, Duration::from_secs(30 * 60));
        assert_eq!(config.max_hold(), Duration::from_secs(5 * 60));
        config.validate().unwrap();
        assert_eq!(
            config.queue_name(QueueKind::ChunkTasks),
            "nightshift.chunk-tasks"
        );
        assert_eq!(
            config.dead_letter_queue_name(QueueKind::FinalizeJobs),
            "nightshift.finalize-jobs.dead"
        );
    }

    #[test]
    fn config_parses_durations_and_hides_the_url() {
        let config: QueueConfig = serde_json::from_str(
            r#"{"url": "amqp://u:hunter2@mq:5672/%2f", "connect_timeout": "3s",
                "operation_timeout": "1m 30s", "delivery_limit": 2,
                "consumer_timeout": "1m"}"#,
        )
        .unwrap();
        assert_eq!(config.consumer_timeout, Duration::from_secs(60));
        assert_eq!(config.max_hold(), Duration::from_secs(15));
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
        assert_eq!(config.operation_timeout, Duration::from_secs(90));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&config).unwrap().contains("hunter2"));
        assert!(serde_json::from_str::<QueueConfig>(r#"{"urll": "x"}"#).is_err());
    }

    #[test]
    fn invalid_configs_are_refused() {
        let ok = QueueConfig::default();
        let cases = [
            QueueConfig {
                url: Secret::new("http://u:hunter2@mq"),
                ..ok.clone()
            },
            QueueConfig {
                prefix: String::new(),
                ..ok.clone()
            },
            QueueConfig {
                prefix: "has space".into(),
                ..ok.clone()
            },
            QueueConfig {
                prefix: "amq.mine".into(),
                ..ok.clone()
            },
            QueueConfig {
                prefix: "p".repeat(MAX_PREFIX_LEN + 1),
                ..ok.clone()
            },
            QueueConfig {
                delivery_limit: 0,
                ..ok.clone()
            },
            QueueConfig {
                operation_timeout: Duration::ZERO,
                ..ok.clone()
            },
            QueueConfig {
                consumer_timeout: Duration::ZERO,
                ..ok.clone()
            },
        ];
        for config in cases {
            match config.validate() {
                Err(QueueError::Config(message)) => assert!(!message.contains("hunter2")),
                other => panic!("{config:?}: expected a config error, got {other:?}"),
            }
        }
        // The longest accepted prefix still makes valid AMQP names.
        let longest = QueueConfig {
            prefix: "p".repeat(MAX_PREFIX_LEN),
            ..ok
        };
        longest.validate().unwrap();
        assert!(
            ShortString::try_new(longest.dead_letter_queue_name(QueueKind::FinalizeJobs)).is_ok()
        );
    }

    #[test]
    fn headers_round_trip_without_broker_headers() {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-abc-def-01".into());
        headers.insert("schema".into(), "1".into());
        let mut table = header_table(headers.clone()).unwrap();
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        table.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        table.insert("foreign-number".into(), AMQPValue::LongInt(7));
        assert_eq!(read_headers(Some(&table)), (headers, 3));
        assert_eq!(read_headers(None), (Headers::new(), 0));
    }

    #[test]
    fn reserved_and_oversized_header_names_are_refused() {
        for name in ["x-death", "X-Delivery-Count", &"h".repeat(256)] {
            let headers = Headers::from([(name.to_owned(), "v".to_owned())]);
            assert!(matches!(
                header_table(headers),
                Err(QueueError::InvalidArgument(_))
            ));
        }
    }
}
