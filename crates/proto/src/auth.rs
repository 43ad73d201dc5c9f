//! Authentication of the scheduler's internal gRPC API by one shared secret, the internal
//! token.
//!
//! The scheduler's services mint API keys (`Tenants.CreateTenant`), read and delete any
//! tenant's files and commit batches; only nightshift's own processes (the gateway, the
//! finalizers, `nightshift admin`) may call them. Every call carries
//! `authorization: Bearer <token>` ([`ClientInterceptor`], used by
//! [`SchedulerClient`](crate::client::SchedulerClient)); the scheduler refuses any other call
//! with `UNAUTHENTICATED` before it reaches a service ([`server_layer`], applied to every gRPC
//! service it serves, gRPC health included — Kubernetes probes use the HTTP `/readyz`).
//!
//! The token is compared in constant time, as SHA-256 digests (so neither its bytes nor its
//! length leak through timing). It is a [`Secret`]: configured once (`[internal] token`,
//! `NIGHTSHIFT_INTERNAL__TOKEN`), redacted in `--dump-config`, never logged.

use nightshift_core::secret::Secret;
use nightshift_telemetry::propagation::TraceContextInterceptor;
use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::{Interceptor, InterceptorLayer};

/// The metadata key carrying the token, as `Bearer <token>`.
pub const HEADER: &str = "authorization";

/// Shortest token accepted: a guessable secret is no door.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the internal token is not set (`[internal] token`, NIGHTSHIFT_INTERNAL__TOKEN)")]
    Missing,
    #[error("the internal token must be at least {MIN_TOKEN_LEN} characters")]
    TooShort,
    #[error("the internal token must be printable ASCII without spaces")]
    NotPrintable,
}

/// Checks that `token` is set and usable as a header value.
///
/// # Errors
/// What is wrong with it.
pub fn check_token(token: Option<&Secret>) -> Result<&Secret, TokenError> {
    let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
    let bytes = token.expose().as_bytes();
    if !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(TokenError::NotPrintable);
    }
    if bytes.len() < MIN_TOKEN_LEN {
        return Err(TokenError::TooShort);
    }
    Ok(token)
}

/// A fresh random token (43 alphanumerics, about 256 bits), for a process whose scheduler
/// and clients all live in it (standalone mode, the e2e harness).
pub fn generate_token() -> Secret {
    Secret::new(
        rand::rng()
            .sample_iter(&Alphanumeric)
            .take(43)
            .map(char::from)
            .collect::<String>(),
    )
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The scheduler's side: refuses every call whose `authorization` is not `Bearer <token>`.
#[derive(Clone)]
pub struct RequireToken {
    expected: [u8; 32],
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(<redacted>)")
    }
}

impl RequireToken {
    /// # Errors
    /// The token is missing or unusable ([`check_token`]).
    pub fn new(token: Option<&Secret>) -> Result<Self, TokenError> {
        let token = check_token(token)?;
        Ok(Self {
            expected: digest(token.expose().as_bytes()),
        })
    }

    /// Whether `request` carries the token.
    pub fn admits<T>(&self, request: &tonic::Request<T>) -> bool {
        let Some(presented) = request
            .metadata()
            .get(HEADER)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        digest(presented).ct_eq(&self.expected).into()
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.admits(&request) {
            Ok(request)
        } else {
            // No hint of what was wrong: missing and wrong tokens look the same.
            Err(tonic::Status::unauthenticated(
                "this internal API needs the internal token",
            ))
        }
    }
}

/// The tower layer the scheduler puts in front of all its gRPC services (an axum router of
/// them: a service added later is covered too).
///
/// # Errors
/// The token is missing or unusable ([`check_token`]).
pub fn server_layer(token: Option<&Secret>) -> Result<InterceptorLayer<RequireToken>, TokenError> {
    RequireToken::new(token).map(InterceptorLayer::new)
}

/// The clients' side: every call carries the caller's trace context and, when a token is
/// configured, `authorization: Bearer <token>`.
#[derive(Clone, Default)]
pub struct ClientInterceptor {
    authorization: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for ClientInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientInterceptor")
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ClientInterceptor {
    /// Sends `token` (nothing without one: the scheduler will refuse the calls).
    ///
    /// # Errors
    /// The token is not usable as a header value ([`check_token`]).
    pub fn new(token: Option<&Secret>) -> Result<Self, TokenError> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Ok(Self::default());
        };
        let token = check_token(Some(token))?;
        let mut value: AsciiMetadataValue =
            MetadataValue::try_from(format!("Bearer {}", token.expose()))
                .map_err(|_| TokenError::NotPrintable)?;
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
        })
    }
}

impl Interceptor for ClientInterceptor {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut request = TraceContextInterceptor.call(request)?;
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert(HEADER, value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: Option<&str>) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        if let Some(v) = value {
            request
                .metadata_mut()
                .insert(HEADER, v.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn only_the_exact_token_is_admitted() {
        let token = Secret::new("0123456789abcdefXYZ");
        let mut check = RequireToken::new(Some(&token)).expect("usable");
        assert!(
            check
                .call(with_header(Some("Bearer 0123456789abcdefXYZ")))
                .is_ok()
        );
        for refused in [
            None,
            Some(""),
            Some("Bearer "),
            Some("0123456789abcdefXYZ"),
            Some("bearer 0123456789abcdefXYZ"),
            Some("Bearer 0123456789abcdefXY"),
            Some("Bearer 0123456789abcdefXYZ0"),
            Some("Bearer 0123456789abcdefXYz"),
        ] {
            let status = check.call(with_header(refused)).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
    }

    #[test]
    fn the_client_sends_what_the_server_admits() {
        let token = generate_token();
        assert_eq!(token.expose().len(), 43);
        let mut client = ClientInterceptor::new(Some(&token)).expect("usable");
        let sent = client.call(tonic::Request::new(())).expect("sent");
        assert!(
            RequireToken::new(Some(&token))
                .expect("usable")
                .admits(&sent)
        );
        let other = RequireToken::new(Some(&generate_token())).expect("usable");
        assert!(!other.admits(&sent));
        // no token configured: nothing sent
        let sent = ClientInterceptor::new(None)
            .expect("none")
            .call(tonic::Request::new(()))
            .expect("sent");
        assert!(sent.metadata().get(HEADER).is_none());
    }

    #[test]
    fn unusable_tokens_are_refused_at_start() {
        assert_eq!(RequireToken::new(None).err(), Some(TokenError::Missing));
        let empty = Secret::new("");
        assert_eq!(
            RequireToken::new(Some(&empty)).err(),
            Some(TokenError::Missing)
        );
        let short = Secret::new("short");
        assert_eq!(
            RequireToken::new(Some(&short)).err(),
            Some(TokenError::TooShort)
        );
        let spaced = Secret::new("has a space in the middle");
        assert_eq!(
            ClientInterceptor::new(Some(&spaced)).err(),
            Some(TokenError::NotPrintable)
        );
        // and never printed
        let token = Secret::new("0123456789abcdefXYZ");
        let printed = format!(
            "{:?} {:?}",
            RequireToken::new(Some(&token)).expect("usable"),
            ClientInterceptor::new(Some(&token)).expect("usable")
        );
        assert!(!printed.contains("0123456789"), "{printed}");
    }
}
