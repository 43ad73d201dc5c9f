//! Per-tenant limits of what the gateway itself holds for a tenant: uploads in progress.
//!
//! Each upload buffers up to `part_size × (1 + upload_concurrency)` bytes on its way to object
//! storage (about 24 MiB with the defaults) and holds a connection to it, so one tenant
//! opening hundreds of uploads could take the gateway's memory and object-storage capacity
//! from everyone. A tenant may have at most `max_concurrent_uploads_per_tenant` uploads in
//! progress, declaring at most `max_upload_bytes_in_flight_per_tenant` bytes between them (an
//! upload without `Content-Length` counts as `max_upload_bytes`, its worst case). One more is
//! refused at once, before its body is read: a 429 in OpenAI's envelope (`rate_limit_error`)
//! with `retry-after`, which the SDKs honour.
//!
//! The counts are per gateway process: with N gateways a tenant can have N times as many.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use nightshift_core::{ApiError, ErrorKind, TenantId};

/// The 429's code when a tenant has too many uploads in progress.
pub const TOO_MANY_UPLOADS: &str = "too_many_concurrent_uploads";
/// The 429's code when a tenant's uploads in progress declare too many bytes.
pub const TOO_MANY_UPLOAD_BYTES: &str = "upload_bytes_in_flight_exceeded";

/// The uploads in progress of every tenant, against the limits.
#[derive(Debug)]
pub struct UploadLimits {
    max_uploads: usize,
    max_bytes: u64,
    in_flight: Mutex<HashMap<TenantId, InFlight>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct InFlight {
    uploads: usize,
    bytes: u64,
}

/// One admitted upload; dropping it (the upload finished, failed, or its client went away)
/// gives its share back.
#[derive(Debug)]
pub struct UploadSlot {
    limits: Arc<UploadLimits>,
    tenant: TenantId,
    bytes: u64,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut all = self.limits.lock();
        if let Some(f) = all.get_mut(&self.tenant) {
            f.uploads = f.uploads.saturating_sub(1);
            f.bytes = f.bytes.saturating_sub(self.bytes);
            if f.uploads == 0 {
                all.remove(&self.tenant);
            }
        }
    }
}

impl UploadLimits {
    /// At most `max_uploads` uploads and `max_bytes` declared bytes in progress per tenant.
    pub fn new(max_uploads: usize, max_bytes: u64) -> Self {
        Self {
            max_uploads,
            max_bytes,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, InFlight>> {
        // Every update is complete under the lock: a panic elsewhere cannot tear it.
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits an upload of `bytes` (declared) for `tenant`, or refuses it with a 429.
    ///
    /// # Errors
    /// The tenant is at its limit of uploads or of bytes in progress.
    pub fn admit(self: &Arc<Self>, tenant: &TenantId, bytes: u64) -> Result<UploadSlot, ApiError> {
        let mut all = self.lock();
        let now = all.get(tenant).copied().unwrap_or_default();
        if now.uploads >= self.max_uploads {
            return Err(ApiError::new(
                ErrorKind::RateLimited,
                format!(
                    "Too many uploads in progress: at most {} at once per organization. Retry \
                     once one of them has finished.",
                    self.max_uploads
                ),
            )
            .with_code(TOO_MANY_UPLOADS));
        }
        if now.bytes.saturating_add(bytes) > self.max_bytes {
            return Err(ApiError::new(
                ErrorKind::RateLimited,
                format!(
                    "Too many bytes being uploaded: the uploads in progress may declare at most \
                     {} bytes between them per organization (an upload without Content-Length \
                     counts as the largest file allowed). Retry once one of them has finished.",
                    self.max_bytes
                ),
            )
            .with_code(TOO_MANY_UPLOAD_BYTES));
        }
        let entry = all.entry(tenant.clone()).or_default();
        entry.uploads += 1;
        entry.bytes += bytes;
        Ok(UploadSlot {
            limits: self.clone(),
            tenant: tenant.clone(),
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_counted_per_tenant_and_given_back() {
        let limits = Arc::new(UploadLimits::new(2, 100));
        let (a, b) = (TenantId::generate(), TenantId::generate());
        let first = limits.admit(&a, 10).expect("room");
        let second = limits.admit(&a, 10).expect("room");
        let refused = limits.admit(&a, 10).expect_err("a third");
        assert_eq!(refused.kind, ErrorKind::RateLimited);
        assert_eq!(refused.code.as_deref(), Some(TOO_MANY_UPLOADS));
        // another tenant is not affected
        let _other = limits.admit(&b, 10).expect("b has its own limit");
        drop(first);
        let _third = limits.admit(&a, 10).expect("a slot came back");
        drop(second);
        assert!(
            limits
                .lock()
                .get(&a)
                .is_some_and(|f| f.uploads == 1 && f.bytes == 10)
        );
    }

    #[test]
    fn declared_bytes_are_bounded() {
        let limits = Arc::new(UploadLimits::new(10, 100));
        let a = TenantId::generate();
        let big = limits.admit(&a, 90).expect("room");
        let refused = limits.admit(&a, 11).expect_err("over 100");
        assert_eq!(refused.code.as_deref(), Some(TOO_MANY_UPLOAD_BYTES));
        let _fits = limits.admit(&a, 10).expect("exactly 100");
        drop(big);
        let _now = limits.admit(&a, 80).expect("room again");
        // overflow-safe
        assert!(limits.admit(&a, u64::MAX).is_err());
    }

    #[test]
    fn an_idle_tenant_leaves_no_entry() {
        let limits = Arc::new(UploadLimits::new(1, 100));
        drop(limits.admit(&TenantId::generate(), 5).expect("room"));
        assert!(limits.lock().is_empty());
    }
}
