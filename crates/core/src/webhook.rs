//! Webhooks: batch events delivered to a tenant's endpoints, in OpenAI's wire format.
//!
//! A batch's terminal transition writes one event (`batch.completed`, `batch.failed`,
//! `batch.expired`, `batch.cancelled`) whose body is exactly OpenAI's:
//! `{"id":"evt_…","object":"event","type":"batch.completed","created_at":<unix>,"data":{"id":"batch_…"}}`.
//! Each delivery is signed as Standard Webhooks says (and the official SDKs'
//! `client.webhooks.unwrap` verifies): headers `webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the
//! base64-decoded part of the endpoint's `whsec_…` secret.
//!
//! Nothing here does I/O: the event vocabulary, the body, the signature, the endpoint object
//! and the checks of a create request. Delivery lives in the scheduler.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::{BatchId, EventId, TenantId, WebhookEndpointId};
use crate::{ApiError, ErrorKind};

/// The prefix of every endpoint secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 512;

/// The events a batch emits when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    BatchCompleted,
    BatchFailed,
    BatchExpired,
    BatchCancelled,
}

impl EventType {
    /// Every event, in the order an endpoint subscribing to all lists them.
    pub const ALL: [EventType; 4] = [
        Self::BatchCompleted,
        Self::BatchFailed,
        Self::BatchExpired,
        Self::BatchCancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BatchCompleted => "batch.completed",
            Self::BatchFailed => "batch.failed",
            Self::BatchExpired => "batch.expired",
            Self::BatchCancelled => "batch.cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == raw)
    }

    /// The event of a batch that reached terminal `status` (`completed`, `failed`, `expired`,
    /// `cancelled`); `None` for any other.
    pub fn for_status(status: &str) -> Option<Self> {
        match status {
            "completed" => Some(Self::BatchCompleted),
            "failed" => Some(Self::BatchFailed),
            "expired" => Some(Self::BatchExpired),
            "cancelled" => Some(Self::BatchCancelled),
            _ => None,
        }
    }
}

/// An event's payload, serialised in OpenAI's key order.
#[derive(Serialize)]
struct EventBody<'a> {
    id: &'a str,
    object: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    created_at: i64,
    data: EventData<'a>,
}

#[derive(Serialize)]
struct EventData<'a> {
    id: &'a str,
}

/// The exact bytes of an event: written once into the outbox and sent as they are on every
/// attempt, so each retry carries the same body (and the same `webhook-id`).
pub fn event_body(id: &EventId, kind: EventType, created_at: i64, batch: &BatchId) -> String {
    let body = EventBody {
        id: id.as_str(),
        object: "event",
        kind: kind.as_str(),
        created_at,
        data: EventData { id: batch.as_str() },
    };
    // Serialising a struct of strings and an integer cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

/// A fresh endpoint secret: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", B64.encode(key))
}

/// A secret that is not `whsec_` + base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a webhook secret is 'whsec_' followed by base64")]
pub struct BadSecret;

/// The `webhook-signature` header of a delivery: `v1,` + base64 of HMAC-SHA256, keyed with
/// the base64-decoded part of `secret` after `whsec_`, over `"{msg_id}.{timestamp}.{body}"`.
///
/// # Errors
/// `secret` is not `whsec_` + base64.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &str) -> Result<String, BadSecret> {
    let key = secret.strip_prefix(SECRET_PREFIX).ok_or(BadSecret)?;
    let key = B64.decode(key).map_err(|_| BadSecret)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| BadSecret)?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// A webhook endpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpointRecord {
    pub id: WebhookEndpointId,
    pub tenant_id: TenantId,
    pub url: String,
    /// Subscribed events, in [`EventType::ALL`] order, never empty.
    pub events: Vec<EventType>,
    /// A name for people (OpenAI's `name`); may be empty.
    pub name: String,
    /// The signing secret (`whsec_…`): stored as it is, since every delivery is signed with it.
    pub secret: String,
    /// The secret before the last rotation, still signing (a second signature) until
    /// `previous_secret_until` when the rotation asked to keep it active for 24 hours.
    pub previous_secret: Option<String>,
    pub previous_secret_until: Option<i64>,
    pub created_at_us: i64,
    /// Last change of the configuration or the secret (unix seconds).
    pub updated_at: i64,
}

/// How long a rotated-out secret keeps signing when asked to
/// (`keep_old_secret_active_for_24_hours`).
pub const KEEP_OLD_SECRET_SECS: i64 = 24 * 3600;

/// A masked hint of a secret: its prefix and last four characters.
pub fn secret_hint(secret: &str) -> String {
    let tail: String = secret
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{SECRET_PREFIX}****{tail}")
}

impl WebhookEndpointRecord {
    /// The API object; `with_secret` only when it is created or its secret rotated (the secret
    /// is shown once).
    pub fn to_object(&self, with_secret: bool) -> WebhookEndpointObject {
        WebhookEndpointObject {
            id: self.id.to_string(),
            object: "webhook_endpoint",
            created_at: self.created_at_us.div_euclid(1_000_000),
            event_types: self.events.iter().map(|e| e.as_str().to_owned()).collect(),
            name: self.name.clone(),
            url: self.url.clone(),
            signing_secret_hint: Some(secret_hint(&self.secret)),
            updated_at: Some(self.updated_at),
            signing_secret: with_secret.then(|| self.secret.clone()),
        }
    }
}

/// `"object": "webhook_endpoint"`.
fn object_webhook_endpoint() -> utoipa::openapi::schema::ObjectBuilder {
    crate::schema::constant("webhook_endpoint")
}

/// `"object": "webhook_endpoint.deleted"`.
fn object_webhook_endpoint_deleted() -> utoipa::openapi::schema::ObjectBuilder {
    crate::schema::constant("webhook_endpoint.deleted")
}

/// A webhook endpoint: OpenAI's `WebhookEndpoint` (and `WebhookEndpointWithSecret` when
/// `signing_secret` is present).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WebhookEndpointObject {
    pub id: String,
    #[schema(schema_with = object_webhook_endpoint)]
    pub object: &'static str,
    pub created_at: i64,
    /// `batch.completed`, `batch.failed`, `batch.expired`, `batch.cancelled`.
    pub event_types: Vec<String>,
    pub name: String,
    pub url: String,
    /// The secret's prefix and last four characters.
    #[schema(required = true)]
    pub signing_secret_hint: Option<String>,
    #[schema(required = true)]
    pub updated_at: Option<i64>,
    /// The signing secret (`whsec_…`): only in the answer of a create or a rotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<String>,
}

/// The answer to a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct WebhookEndpointDeleted {
    pub id: String,
    #[schema(schema_with = object_webhook_endpoint_deleted)]
    pub object: &'static str,
    pub deleted: bool,
}

/// The body of `POST /v1/webhook_endpoints` (OpenAI's fields).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpointBody {
    /// Where events are POSTed: an `http` or `https` URL.
    pub url: Option<String>,
    /// Events to deliver; every batch event when absent.
    pub event_types: Option<Vec<String>>,
    /// A name for people.
    pub name: Option<String>,
}

/// The body of `POST /v1/webhook_endpoints/{id}/rotate_secret`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecretBody {
    /// Keep signing with the previous secret too (a second signature) for 24 hours.
    #[serde(default)]
    pub keep_old_secret_active_for_24_hours: Option<bool>,
}

/// A checked create request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateWebhookEndpoint {
    pub url: String,
    pub events: Vec<EventType>,
    pub name: String,
}

impl CreateWebhookEndpoint {
    /// Checks a create request: a usable URL, known events (every batch event when absent,
    /// at least one), a name of bounded length.
    ///
    /// # Errors
    /// A 400 naming the field.
    pub fn check(body: CreateWebhookEndpointBody) -> Result<Self, ApiError> {
        let url = body.url.ok_or_else(|| ApiError::missing("url"))?;
        let url = check_url(&url)?.to_string();
        let events = parse_events(body.event_types.as_deref())?;
        let name = body.name.unwrap_or_default();
        if name.chars().count() > MAX_NAME_LEN {
            return Err(ApiError::invalid_value(
                "name",
                format!("name is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        Ok(Self { url, events, name })
    }
}

/// The events of a create request, deduplicated in [`EventType::ALL`] order: all four when
/// `None`.
///
/// # Errors
/// An unknown event, or an empty list: a 400 on `events`.
pub fn parse_events<S: AsRef<str>>(raw: Option<&[S]>) -> Result<Vec<EventType>, ApiError> {
    let Some(raw) = raw else {
        return Ok(EventType::ALL.to_vec());
    };
    let mut events = Vec::new();
    for r in raw {
        let e = EventType::parse(r.as_ref()).ok_or_else(|| {
            ApiError::invalid_value(
                "event_types",
                format!(
                    "Unsupported event type '{}': expected one of batch.completed, \
                     batch.failed, batch.expired, batch.cancelled",
                    r.as_ref()
                ),
            )
        })?;
        events.push(e);
    }
    if events.is_empty() {
        return Err(ApiError::invalid_value(
            "event_types",
            "event_types must name at least one event type",
        ));
    }
    events.sort();
    events.dedup();
    Ok(events)
}

/// Checks an endpoint URL's form: absolute, `http` or `https`, with a host, no credentials,
/// at most [`MAX_URL_LEN`] bytes. Where the host points is checked by the scheduler (SSRF).
///
/// # Errors
/// A 400 on `url`.
pub fn check_url(raw: &str) -> Result<url::Url, ApiError> {
    let bad = |why: &str| ApiError::invalid_value("url", format!("Invalid webhook url: {why}"));
    if raw.len() > MAX_URL_LEN {
        return Err(bad(&format!("longer than {MAX_URL_LEN} bytes")));
    }
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host().is_none() {
        return Err(bad("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("credentials in the url are not allowed"));
    }
    Ok(url)
}

/// The comma-framed form events are stored in (`,batch.completed,batch.failed,`), so one
/// `LIKE '%,<event>,%'` finds the subscribers of an event in either database.
pub fn events_column(events: &[EventType]) -> String {
    let mut s = String::from(",");
    for e in events {
        s.push_str(e.as_str());
        s.push(',');
    }
    s
}

/// The events of a stored [`events_column`]; unknown names (from a newer version) are skipped.
pub fn events_from_column(raw: &str) -> Vec<EventType> {
    let mut events: Vec<EventType> = raw.split(',').filter_map(EventType::parse).collect();
    events.sort();
    events.dedup();
    events
}

/// Not found, in OpenAI's words.
pub fn no_such_endpoint(id: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("No such webhook endpoint object: {id}"),
    )
    .with_param("id")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently with Python's `hmac`/`hashlib`/`base64`:
    /// key = b"nightshift-webhook-test-key-0001", message = "evt_test.1700000000.<body>".
    #[test]
    fn the_signature_matches_an_independent_computation() {
        let secret = "whsec_bmlnaHRzaGlmdC13ZWJob29rLXRlc3Qta2V5LTAwMDE=";
        let body = event_body(
            &EventId::parse("evt_test").unwrap(),
            EventType::BatchCompleted,
            1_700_000_000,
            &BatchId::parse("batch_abc").unwrap(),
        );
        assert_eq!(
            body,
            r#"{"id":"evt_test","object":"event","type":"batch.completed","created_at":1700000000,"data":{"id":"batch_abc"}}"#
        );
        assert_eq!(
            sign(secret, "evt_test", 1_700_000_000, &body).unwrap(),
            "v1,eOvmd4frgIYD4UWX/mBRzbYpFGoch3dIzRfI6MU2EaU="
        );
        // another id, timestamp or body signs differently
        assert_ne!(
            sign(secret, "evt_tesu", 1_700_000_000, &body).unwrap(),
            sign(secret, "evt_test", 1_700_000_000, &body).unwrap()
        );
        assert_eq!(sign("nope", "evt_test", 1, "{}"), Err(BadSecret));
        assert_eq!(sign("whsec_***", "evt_test", 1, "{}"), Err(BadSecret));
    }

    #[test]
    fn hints_show_only_the_end_of_a_secret() {
        assert_eq!(secret_hint("whsec_abcdefgh1234"), "whsec_****1234");
        assert_eq!(secret_hint("ab"), "whsec_****ab");
    }

    #[test]
    fn generated_secrets_sign() {
        let s = generate_secret();
        assert!(s.starts_with(SECRET_PREFIX));
        assert_eq!(B64.decode(&s[SECRET_PREFIX.len()..]).unwrap().len(), 32);
        assert!(sign(&s, "evt_x", 1, "{}").is_ok());
        assert_ne!(s, generate_secret());
    }

    #[test]
    fn events_default_to_all_and_refuse_unknown_ones() {
        assert_eq!(parse_events::<&str>(None).unwrap(), EventType::ALL.to_vec());
        assert_eq!(
            parse_events(Some(
                &["batch.failed", "batch.completed", "batch.failed"][..]
            ))
            .unwrap(),
            vec![EventType::BatchCompleted, EventType::BatchFailed]
        );
        let e = parse_events(Some(&["batch.done"][..])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("event_types"));
        assert!(parse_events::<&str>(Some(&[])).is_err());
        let col = events_column(&EventType::ALL);
        assert_eq!(
            col,
            ",batch.completed,batch.failed,batch.expired,batch.cancelled,"
        );
        assert_eq!(events_from_column(&col), EventType::ALL.to_vec());
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.as_str()), Some(e));
            assert_eq!(
                EventType::for_status(e.as_str().trim_start_matches("batch.")),
                Some(e)
            );
        }
    }

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "not a url",
            "https://user:pw@example.com/",
            "/relative",
        ] {
            let e = check_url(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("url"), "{bad}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(MAX_URL_LEN))).is_err());
    }
}
