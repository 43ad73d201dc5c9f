//! A consumer of the embedded queue and the settling of its deliveries: claims through the
//! database task, a prefetch semaphore, and the unsettled deliveries it returns when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::warn;

use super::actor::{Claimed, Command, Wakers, ask};
use crate::{Consumer, Delivery, Headers, QueueError, QueueKind, Result, Settle, Settlement};

/// A waiting consumer looks for ready messages this often even without being woken: a safety
/// net, not the delivery path.
const RECHECK: Duration = Duration::from_secs(2);

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
pub(super) struct EmbeddedConsumer {
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
    /// A consumer of `kind` with at most `prefetch` (≥ 1) unsettled deliveries.
    pub(super) fn new(
        kind: QueueKind,
        commands: mpsc::UnboundedSender<Command>,
        wakers: Arc<Wakers>,
        prefetch: u16,
    ) -> Self {
        Self {
            kind,
            commands,
            wakers,
            prefetch: Arc::new(Semaphore::new(usize::from(prefetch))),
            held: Arc::new(Held::new()),
            ended: false,
        }
    }

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
