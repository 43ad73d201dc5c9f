//! `Idempotency-Key`: the same key from the same tenant within [`IDEMPOTENCY_TTL_SECS`] gets
//! the first request's object back, without creating anything; the same key with a different
//! request is refused ([`key_reused`]).
//!
//! The gateway checks the key ([`check_key`]) and fingerprints the request ([`RequestHash`]);
//! the scheduler records `(tenant, key) → (kind, request hash, object id)` in the same
//! transaction as the object itself, so two requests racing with one key make one object and
//! both get it.

use sha2::{Digest, Sha256};

use crate::error::{ApiError, ErrorKind};

/// The request header (matched case-insensitively, as every HTTP header).
pub const HEADER: &str = "idempotency-key";

/// How long a key is remembered (24 h). An older key is ignored (a new request with it
/// creates a new object) and swept.
pub const IDEMPOTENCY_TTL_SECS: i64 = 24 * 60 * 60;

/// Longest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// The `code` of the error answering a key reused with a different request.
pub const KEY_REUSED: &str = "idempotency_key_reused";

/// What a key created: the object kinds of the routes that take one. A key names one request
/// on one route: reusing it on another route is a reuse with a different request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdempotentKind {
    /// `POST /v1/files`.
    File,
    /// `POST /v1/batches` and `POST /v1/batches/{id}/retry` (the request hash tells them
    /// apart).
    Batch,
}

impl IdempotentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Batch => "batch",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "file" => Some(Self::File),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// Checks an `Idempotency-Key` header value: 1..=255 bytes of printable ASCII (space
/// included; no control character).
///
/// # Errors
/// A 400 naming the header.
pub fn check_key(raw: &[u8]) -> Result<String, ApiError> {
    let bad = |why: &str| {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("Invalid 'Idempotency-Key' header: {why}"),
        )
        .with_param("Idempotency-Key")
        .with_code("invalid_idempotency_key")
    };
    if raw.is_empty() {
        return Err(bad("it is empty."));
    }
    if raw.len() > MAX_KEY_BYTES {
        return Err(bad(&format!(
            "it is {} bytes long; the limit is {MAX_KEY_BYTES}.",
            raw.len()
        )));
    }
    if !raw.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(bad(
            "it must be printable ASCII (no control or non-ASCII characters).",
        ));
    }
    // all printable ASCII: valid UTF-8
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// The answer to a key reused with a different request (or on another route): a 409 that a
/// retry cannot change.
pub fn key_reused() -> ApiError {
    ApiError::new(
        ErrorKind::Conflict,
        "This Idempotency-Key was already used with a different request in the last 24 hours. \
         Use a new key for a new request.",
    )
    .with_param("Idempotency-Key")
    .with_code(KEY_REUSED)
    .not_retryable()
}

/// A request's fingerprint: SHA-256 over its route and the fields that define it, fed in
/// order (a file's bytes as they stream). Every field is length-prefixed, so no two different
/// field lists hash alike.
#[derive(Clone, Default)]
pub struct RequestHash(Sha256);

impl RequestHash {
    /// A fingerprint of a request to `route` (e.g. `"POST /v1/files"`).
    pub fn new(route: &str) -> Self {
        let mut h = Self(Sha256::new());
        h.field(route.as_bytes());
        h
    }

    /// Adds a whole field (length-prefixed).
    pub fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Adds part of a streamed field; call [`RequestHash::end_stream`] after its last part.
    pub fn stream(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Ends a streamed field of `len` bytes.
    pub fn end_stream(&mut self, len: u64) {
        self.0.update(b"\x00end");
        self.0.update(len.to_le_bytes());
    }

    /// Adds a JSON value in canonical form: every object's keys sorted, no whitespace. Two bodies that differ only in key order or spacing hash alike.
    pub fn json(&mut self, value: &serde_json::Value) {
        let text = canonical_json(value);
        self.field(text.as_bytes());
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// `value` with every object's keys sorted, compact.
fn canonical_json(value: &serde_json::Value) -> String {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for k in keys {
                    out.insert(k.clone(), sorted(&map[k]));
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(sorted).collect())
            }
            other => other.clone(),
        }
    }
    sorted(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_up_to_255_bytes() {
        assert_eq!(check_key(b"abc-123 _:/").as_deref(), Ok("abc-123 _:/"));
        assert!(check_key(&[b'k'; 255]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; 256][..],
            b"a\tb",
            b"a\x7fb",
            "cl\u{e9}".as_bytes(),
        ] {
            let e = check_key(bad).expect_err("refused");
            assert_eq!(e.kind, ErrorKind::InvalidRequest);
            assert_eq!(e.code.as_deref(), Some("invalid_idempotency_key"));
        }
    }

    #[test]
    fn a_reused_key_is_a_409_that_a_retry_cannot_change() {
        let e = key_reused();
        assert_eq!(e.kind.http_status(), 409);
        assert_eq!(e.code.as_deref(), Some(KEY_REUSED));
        assert_eq!(e.retryable, Some(false));
    }

    #[test]
    fn json_bodies_hash_alike_whatever_their_key_order_and_spacing() {
        let hash = |text: &str| {
            let mut h = RequestHash::new("POST /v1/batches");
            h.json(&serde_json::from_str(text).expect("json"));
            h.finish()
        };
        let a = hash(r#"{"a": 1, "b": {"y": [1, {"q": 2, "p": 3}], "x": null}}"#);
        let b = hash(r#"{"b":{"x":null,"y":[1,{"p":3,"q":2}]},"a":1}"#);
        assert_eq!(a, b);
        assert_ne!(
            a,
            hash(r#"{"a": 2, "b": {"y": [1, {"q": 2, "p": 3}], "x": null}}"#)
        );
        let mut other_route = RequestHash::new("POST /v1/batches/batch_x/retry");
        other_route.json(&serde_json::json!({"a": 1}));
        assert_ne!(hash(r#"{"a": 1}"#), other_route.finish());
    }

    #[test]
    fn fields_are_delimited() {
        let hash = |fields: &[&str]| {
            let mut h = RequestHash::new("r");
            for f in fields {
                h.field(f.as_bytes());
            }
            h.finish()
        };
        assert_ne!(hash(&["ab", "c"]), hash(&["a", "bc"]));
        let streamed = |parts: &[&str]| {
            let mut h = RequestHash::new("r");
            let mut n = 0;
            for p in parts {
                h.stream(p.as_bytes());
                n += p.len() as u64;
            }
            h.end_stream(n);
            h.finish()
        };
        assert_eq!(streamed(&["ab", "c"]), streamed(&["a", "bc"]));
        assert_ne!(streamed(&["ab"]), streamed(&["abc"]));
    }
}
