//! Ids as they arrive over gRPC, parsed once for every service.
//!
//! A tenant id comes from the gateway, which authenticated the caller: one that does not
//! parse is the gateway's bug. A file or batch id comes from a client (through the gateway)
//! or from the finalizer: one that cannot be ours names nothing, so it is simply not found.

use nightshift_core::{BatchId, FileId, TenantId};

use crate::SchedulerError;

/// The caller's tenant, as the gateway authenticated it.
pub(crate) fn caller_tenant(raw: &str) -> Result<TenantId, SchedulerError> {
    TenantId::parse(raw)
        .map_err(|_| SchedulerError::Malformed("invalid tenant id from caller".into()))
}

/// A file id that must be ours; not found otherwise.
pub(crate) fn file_id(raw: &str) -> Result<FileId, SchedulerError> {
    FileId::parse(raw).map_err(|_| no_such("File", raw))
}

/// A batch id that must be ours; not found otherwise.
pub(crate) fn batch_id(raw: &str) -> Result<BatchId, SchedulerError> {
    BatchId::parse(raw).map_err(|_| no_such("Batch", raw))
}

/// No such `object` (OpenAI's noun: `"File"`, `"Batch"`) for this caller.
pub(crate) fn no_such(object: &'static str, id: &str) -> SchedulerError {
    SchedulerError::NotFound {
        object,
        id: id.to_owned(),
    }
}
