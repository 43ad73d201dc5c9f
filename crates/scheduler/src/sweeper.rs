//! The file sweeper: deletes the bytes of expired and deleted files, then their records.
//!
//! Records go only after their bytes, so a crash in between leaves a record the next round
//! retries, never an orphaned object. Expired files are already invisible to clients (the
//! metadata store filters on `expires_at`); the sweeper only reclaims space. A file that an
//! unfinished batch reads is not sweepable until every such batch is terminal: inputs
//! outlive their batches.

use std::time::Duration;

use nightshift_core::time::now_unix;
use tokio_util::sync::CancellationToken;

use crate::{SchedulerError, SchedulerPorts, metrics};

/// Runs sweep rounds every `interval` until `stop` is cancelled.
pub async fn run(ports: SchedulerPorts, interval: Duration, batch: u32, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        match sweep_once(&ports, now_unix(), batch).await {
            Ok(n) => {
                ::metrics::counter!(metrics::SWEEPS, "outcome" => "ok").increment(1);
                if n > 0 {
                    tracing::info!(files = n, "swept files");
                }
            }
            Err(e) => {
                ::metrics::counter!(metrics::SWEEPS, "outcome" => "error").increment(1);
                tracing::warn!(error = %e, "file sweep failed; retrying next round");
            }
        }
        // Idempotency-Keys past their 24 hours are already ignored; this reclaims their rows.
        match ports
            .metadata
            .sweep_idempotency_keys(now_unix(), batch)
            .await
        {
            Ok(n) if n > 0 => tracing::info!(keys = n, "swept expired idempotency keys"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "idempotency key sweep failed; retrying next round")
            }
        }
    }
}

/// One round at `now`: returns how many files were reclaimed.
pub async fn sweep_once(
    ports: &SchedulerPorts,
    now: i64,
    batch: u32,
) -> Result<usize, SchedulerError> {
    let files = ports.metadata.sweepable_files(now, batch).await?;
    let mut swept = 0;
    for file in files {
        let reason = if file.is_expired(now) {
            "expired"
        } else {
            "deleted"
        };
        if let Err(e) = ports.storage.delete(&file.storage_key).await {
            tracing::warn!(file_id = %file.id, error = %e, "could not delete file bytes");
            continue;
        }
        ports.metadata.purge_file(&file.id).await?;
        ::metrics::counter!(metrics::FILES_SWEPT, "reason" => reason).increment(1);
        tracing::info!(file_id = %file.id, tenant_id = %file.tenant_id, reason, "file swept");
        swept += 1;
    }
    Ok(swept)
}
