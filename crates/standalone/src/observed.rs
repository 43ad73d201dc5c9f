//! A metadata store that tells progress about every batch created, so that a batch created and
//! ended between two looks still gets its line. Every call goes straight to the inner store.

use std::sync::Arc;

use async_trait::async_trait;
use nightshift_core::batch::{BatchRecord, BatchStatus};
use nightshift_core::chunking::ChunkSpan;
use nightshift_core::file::FileRecord;
use nightshift_core::{BatchId, FileId, TenantId};
use nightshift_metadata::{
    BatchCommit, BatchPage, CancelOutcome, ChunkState, DispatchCandidate, Ending, FilePage,
    FileQuery, FinalizationLease, LeasePolicy, LeaseSweep, LeasedChunk, MetadataStore, Result,
    Tenant, ValidationOutcome,
};
use tokio::sync::mpsc;

/// `inner`, announcing each inserted batch's id on a channel (dropped silently once nobody
/// listens).
#[derive(Debug)]
pub(crate) struct Observed {
    inner: Arc<dyn MetadataStore>,
    created: mpsc::UnboundedSender<BatchId>,
}

impl Observed {
    pub(crate) fn new(inner: Arc<dyn MetadataStore>) -> (Self, mpsc::UnboundedReceiver<BatchId>) {
        let (created, rx) = mpsc::unbounded_channel();
        (Self { inner, created }, rx)
    }
}

#[async_trait]
impl MetadataStore for Observed {
    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }
    async fn create_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant> {
        self.inner.create_tenant(name, key_hash).await
    }
    async fn ensure_tenant(&self, name: &str, key_hash: &str) -> Result<Tenant> {
        self.inner.ensure_tenant(name, key_hash).await
    }
    async fn tenant_by_key(&self, key_hash: &str) -> Result<Option<Tenant>> {
        self.inner.tenant_by_key(key_hash).await
    }
    async fn insert_file(&self, file: &FileRecord) -> Result<()> {
        self.inner.insert_file(file).await
    }
    async fn get_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>> {
        self.inner.get_file(tenant, id, now).await
    }
    async fn file_as_of(
        &self,
        tenant: &TenantId,
        id: &FileId,
        at: i64,
    ) -> Result<Option<FileRecord>> {
        self.inner.file_as_of(tenant, id, at).await
    }
    async fn list_files(&self, tenant: &TenantId, query: &FileQuery, now: i64) -> Result<FilePage> {
        self.inner.list_files(tenant, query, now).await
    }
    async fn delete_file(
        &self,
        tenant: &TenantId,
        id: &FileId,
        now: i64,
    ) -> Result<Option<FileRecord>> {
        self.inner.delete_file(tenant, id, now).await
    }
    async fn sweepable_files(&self, now: i64, limit: u32) -> Result<Vec<FileRecord>> {
        self.inner.sweepable_files(now, limit).await
    }
    async fn input_in_use(&self, id: &FileId) -> Result<bool> {
        self.inner.input_in_use(id).await
    }
    async fn purge_file(&self, id: &FileId) -> Result<()> {
        self.inner.purge_file(id).await
    }
    async fn insert_batch(&self, batch: &BatchRecord) -> Result<()> {
        self.inner.insert_batch(batch).await?;
        let _ = self.created.send(batch.id.clone());
        Ok(())
    }
    async fn get_batch(&self, tenant: &TenantId, id: &BatchId) -> Result<Option<BatchRecord>> {
        self.inner.get_batch(tenant, id).await
    }
    async fn batch(&self, id: &BatchId) -> Result<Option<BatchRecord>> {
        self.inner.batch(id).await
    }
    async fn list_batches(
        &self,
        tenant: &TenantId,
        limit: u32,
        after: Option<&BatchId>,
    ) -> Result<BatchPage> {
        self.inner.list_batches(tenant, limit, after).await
    }
    async fn batches_with_status(&self, statuses: &[BatchStatus]) -> Result<Vec<BatchRecord>> {
        self.inner.batches_with_status(statuses).await
    }
    async fn finish_validation(
        &self,
        id: &BatchId,
        outcome: &ValidationOutcome,
        now: i64,
    ) -> Result<Option<BatchRecord>> {
        self.inner.finish_validation(id, outcome, now).await
    }
    async fn cancel_batch(
        &self,
        tenant: &TenantId,
        id: &BatchId,
        now: i64,
    ) -> Result<Option<CancelOutcome>> {
        self.inner.cancel_batch(tenant, id, now).await
    }
    async fn chunks(&self, id: &BatchId) -> Result<Vec<ChunkSpan>> {
        self.inner.chunks(id).await
    }
    async fn chunk_states(&self, id: &BatchId) -> Result<Vec<ChunkState>> {
        self.inner.chunk_states(id).await
    }
    async fn dispatch_candidates(&self) -> Result<Vec<DispatchCandidate>> {
        self.inner.dispatch_candidates().await
    }
    async fn claim_next_chunk(
        &self,
        id: &BatchId,
        now: i64,
        lease_secs: i64,
    ) -> Result<Option<LeasedChunk>> {
        self.inner.claim_next_chunk(id, now, lease_secs).await
    }
    async fn release_chunk(&self, id: &BatchId, index: u32) -> Result<()> {
        self.inner.release_chunk(id, index).await
    }
    async fn dispatched_chunks(&self, id: &BatchId) -> Result<Vec<LeasedChunk>> {
        self.inner.dispatched_chunks(id).await
    }
    async fn renew_chunk_lease(
        &self,
        id: &BatchId,
        index: u32,
        now: i64,
        lease_secs: i64,
    ) -> Result<bool> {
        self.inner
            .renew_chunk_lease(id, index, now, lease_secs)
            .await
    }
    async fn extend_chunk_lease(&self, id: &BatchId, index: u32, until: i64) -> Result<bool> {
        self.inner.extend_chunk_lease(id, index, until).await
    }
    async fn complete_chunk(&self, id: &BatchId, index: u32) -> Result<bool> {
        self.inner.complete_chunk(id, index).await
    }
    async fn fail_chunk(&self, id: &BatchId, index: u32, failure: &str) -> Result<bool> {
        self.inner.fail_chunk(id, index, failure).await
    }
    async fn sweep_chunk_leases(&self, now: i64, policy: &LeasePolicy) -> Result<LeaseSweep> {
        self.inner.sweep_chunk_leases(now, policy).await
    }
    async fn expire_due(&self, now: i64) -> Result<Vec<BatchRecord>> {
        self.inner.expire_due(now).await
    }
    async fn request_finalize(
        &self,
        id: &BatchId,
        now: i64,
        ending_grace_secs: i64,
    ) -> Result<Option<BatchRecord>> {
        self.inner
            .request_finalize(id, now, ending_grace_secs)
            .await
    }
    async fn finalize_requested(&self) -> Result<Vec<BatchRecord>> {
        self.inner.finalize_requested().await
    }
    async fn claim_stalled_finalizations(
        &self,
        asked_before: i64,
        now: i64,
    ) -> Result<Vec<BatchRecord>> {
        self.inner
            .claim_stalled_finalizations(asked_before, now)
            .await
    }
    async fn lease_finalization(
        &self,
        id: &BatchId,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<FinalizationLease> {
        self.inner
            .lease_finalization(id, holder, now, ttl_secs)
            .await
    }
    async fn release_finalization(&self, id: &BatchId, holder: &str) -> Result<bool> {
        self.inner.release_finalization(id, holder).await
    }
    async fn ending(&self, id: &BatchId) -> Result<Option<Ending>> {
        self.inner.ending(id).await
    }
    async fn commit_batch(&self, commit: &BatchCommit, now: i64) -> Result<Option<BatchRecord>> {
        self.inner.commit_batch(commit, now).await
    }
}
