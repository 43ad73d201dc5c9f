//! Chunk results: an executor reports a chunk whose part is durable; the chunk is marked
//! done (idempotently) and, when nothing of the batch is left in flight, finalization is
//! requested. The message is acked only after both are recorded.

use std::time::Duration;

use nightshift_core::BatchId;
use nightshift_proto::v1::ChunkResult;
use nightshift_queue::{Consumer, QueueKind};
use nightshift_telemetry::propagation;
use prost::Message;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::finalize_if_ready;
use crate::{Ports, metrics};

/// Consumes chunk results until `stop` turns true. `wake` is notified whenever a chunk
/// completes, so the dispatcher hands out the freed slot at once.
pub async fn consume_results(
    ports: Ports,
    wake: std::sync::Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let consumer = tokio::select! {
            c = ports.queue.consume(QueueKind::ChunkResults, 64) => c,
            _ = stop.changed() => return,
        };
        let mut consumer: Box<dyn Consumer> = match consumer {
            Ok(c) => {
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot consume chunk results; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = stop.changed() => return,
            };
            let Some(Ok(delivery)) = next else {
                tracing::warn!("chunk result consumer ended; reconnecting");
                break;
            };
            propagation::observe_delivery(QueueKind::ChunkResults.as_str(), &delivery.headers);
            let result = match ChunkResult::decode(delivery.payload.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "undecodable chunk result; dead-lettering");
                    let _ = delivery.dead_letter().await;
                    continue;
                }
            };
            // A child of the executor's chunk span, in the batch's trace.
            let span = tracing::info_span!(
                "chunk_result",
                batch_id = %result.batch_id,
                chunk_index = result.chunk_index,
                completed = result.completed,
                failed = result.failed,
            );
            propagation::set_parent_from_headers(&span, &delivery.headers);
            match handle(&ports, &result).instrument(span).await {
                Ok(()) => {
                    wake.notify_one();
                    if let Err(e) = delivery.ack().await {
                        tracing::warn!(error = %e, "could not ack a chunk result (it will be redelivered)");
                    }
                }
                Err(e) => {
                    tracing::warn!(batch_id = %result.batch_id, chunk = result.chunk_index, error = %e, "chunk result not recorded; requeued");
                    let _ = delivery.requeue().await;
                }
            }
        }
    }
}

async fn handle(ports: &Ports, result: &ChunkResult) -> Result<(), String> {
    let Ok(batch) = BatchId::parse(&result.batch_id) else {
        return Err(format!("invalid batch id {:?}", result.batch_id));
    };
    let newly = ports
        .metadata
        .complete_chunk(&batch, result.chunk_index)
        .await
        .map_err(|e| e.to_string())?;
    if newly {
        ::metrics::counter!(metrics::CHUNKS_DONE).increment(1);
        tracing::debug!(batch_id = %batch, chunk = result.chunk_index, completed = result.completed, failed = result.failed, "chunk done");
    }
    finalize_if_ready(ports, &batch).await.map(|_| ())
}
