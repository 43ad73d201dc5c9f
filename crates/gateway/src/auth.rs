//! API-key authentication: `Authorization: Bearer <key>` (the SDKs) or `x-api-key: <key>`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use nightshift_core::{ApiError, TenantId};
use nightshift_proto::v1::AuthenticateRequest;

use crate::AppState;
use crate::error::HttpError;

/// The authenticated caller. Every handler that touches tenant data takes one.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: TenantId,
}

fn presented_key(parts: &Parts) -> Option<String> {
    let headers = &parts.headers;
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        // `Bearer <key>` (scheme case-insensitive); a bare value is taken as the key.
        let key = match v.get(..6) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer") => v[6..].trim(),
            _ => v,
        };
        if !key.is_empty() {
            return Some(key.to_owned());
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

/// Shows the start and end of a key, as OpenAI does in its 401 message.
fn masked(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}{}{tail}", "*".repeat(chars.len().min(40) - 8))
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let Some(key) = presented_key(parts) else {
            return Err(ApiError::unauthenticated(
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), \
                 or as the x-api-key header.",
            )
            .into());
        };
        let resp = state
            .control
            .tenants()
            .authenticate(AuthenticateRequest {
                api_key: key.clone(),
            })
            .await
            .map_err(|status| {
                let mut err = HttpError::from(status);
                if err.0.kind == nightshift_core::ErrorKind::Unauthenticated {
                    err.0.message = format!("Incorrect API key provided: {}.", masked(&key));
                }
                err
            })?
            .into_inner();
        let id = nightshift_proto::convert::tenant_id(&resp.tenant_id)?;
        tracing::Span::current().record("tenant_id", tracing::field::display(&id));
        Ok(Tenant { id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = http::Request::builder();
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn finds_the_key_in_either_header() {
        assert_eq!(
            presented_key(&parts(&[("authorization", "Bearer ns-abc")])).as_deref(),
            Some("ns-abc")
        );
        assert_eq!(
            presented_key(&parts(&[("x-api-key", "ns-xyz")])).as_deref(),
            Some("ns-xyz")
        );
        assert_eq!(presented_key(&parts(&[("authorization", "Bearer ")])), None);
        assert_eq!(presented_key(&parts(&[])), None);
    }

    #[test]
    fn masks_keys() {
        assert_eq!(masked("ns-dev-key-123456"), "ns-d*********3456");
        assert_eq!(masked("short"), "*****");
    }
}
