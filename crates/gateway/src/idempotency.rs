//! `Idempotency-Key` on `POST /v1/files`, `POST /v1/batches` and
//! `POST /v1/batches/{id}/retry` (docs/api.md, "Idempotency-Key").
//!
//! The gateway checks the header ([`key`]) and fingerprints the request
//! ([`RequestHash`]): a batch body as canonical JSON, an upload by its purpose, filename,
//! `expires_after` and the SHA-256 of its bytes (hashed while they stream). The scheduler
//! claims the key in the transaction that records the object and answers a live key with the
//! earlier request's object (same fingerprint) or a 409 `idempotency_key_reused`.

use axum::http::HeaderMap;
use nightshift_core::ApiError;
use nightshift_core::idempotency::{HEADER, RequestHash, check_key};
use nightshift_proto::v1;

use crate::error::HttpResult;

/// The request's `Idempotency-Key`, checked; `None` without one. Sent twice, it is refused.
pub fn key(headers: &HeaderMap) -> HttpResult<Option<String>> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_value(
            "Idempotency-Key",
            "Send one 'Idempotency-Key' header, not several.",
        )
        .into());
    }
    Ok(Some(check_key(value.as_bytes())?))
}

/// The fingerprint of a JSON request to `route`: its body in canonical form (key order and
/// spacing do not matter). A body that is not JSON is refused by the handler anyway; it is
/// fingerprinted by its bytes.
pub fn json_request_hash(route: &str, body: &[u8]) -> String {
    let mut hash = RequestHash::new(route);
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => hash.json(&value),
        Err(_) => hash.field(body),
    }
    hash.finish()
}

/// The key and fingerprint as the scheduler takes them.
pub fn claim(key: String, request_hash: String) -> v1::Idempotency {
    v1::Idempotency { key, request_hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_checked_key_or_none() {
        let mut headers = HeaderMap::new();
        assert_eq!(key(&headers).expect("no key"), None);
        headers.insert("Idempotency-Key", "k-1".parse().expect("value"));
        assert_eq!(key(&headers).expect("a key").as_deref(), Some("k-1"));
        headers.append("idempotency-key", "k-2".parse().expect("value"));
        assert_eq!(
            key(&headers).expect_err("two keys").0.kind.http_status(),
            400
        );
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", "a\tb".parse().expect("value"));
        assert_eq!(key(&headers).expect_err("a tab").0.kind.http_status(), 400);
    }

    #[test]
    fn json_bodies_differing_only_in_layout_are_one_request() {
        let a = json_request_hash("POST /v1/batches", br#"{"a":1,"b":[1,2]}"#);
        let b = json_request_hash("POST /v1/batches", b"{ \"b\": [1, 2],\n \"a\": 1 }");
        assert_eq!(a, b);
        assert_ne!(
            a,
            json_request_hash("POST /v1/batches", br#"{"a":1,"b":[2,1]}"#)
        );
        assert_ne!(
            a,
            json_request_hash("POST /v1/files", br#"{"a":1,"b":[1,2]}"#)
        );
    }
}
