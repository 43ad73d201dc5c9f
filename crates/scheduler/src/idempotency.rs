//! `Idempotency-Key` on the scheduler's side: the gateway checks the key and fingerprints the
//! request; the scheduler claims the key in the transaction that records the object
//! ([`MetadataStore::insert_file_once`](nightshift_metadata::MetadataStore::insert_file_once),
//! [`insert_batch_once`](nightshift_metadata::MetadataStore::insert_batch_once)), and when the
//! key is already live answers with the earlier request's object — or refuses a key reused
//! with another request.

use nightshift_core::idempotency::{IdempotentKind, key_reused};
use nightshift_metadata::{IdempotencyClaim, IdempotencyRecord};
use nightshift_proto::v1;

use crate::SchedulerError;

/// The claim a request makes with its key, at `now` (unix seconds).
pub(crate) fn claim(
    idempotency: Option<&v1::Idempotency>,
    kind: IdempotentKind,
    now: i64,
) -> Option<IdempotencyClaim> {
    idempotency.map(|i| IdempotencyClaim {
        key: i.key.clone(),
        kind,
        request_hash: i.request_hash.clone(),
        created_at: now,
    })
}

/// The id of the object the earlier request created, if this request is the same one (same
/// route, same fingerprint); the 409 `idempotency_key_reused` otherwise.
pub(crate) fn replayed<'a>(
    earlier: &'a IdempotencyRecord,
    claim: &IdempotencyClaim,
) -> Result<&'a str, SchedulerError> {
    if earlier.kind == claim.kind && earlier.request_hash == claim.request_hash {
        Ok(&earlier.object_id)
    } else {
        Err(SchedulerError::Refused(key_reused()))
    }
}
