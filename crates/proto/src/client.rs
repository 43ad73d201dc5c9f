//! The one client of the scheduler's gRPC services, for every caller: the gateway (tenants,
//! files, batches), the finalizer (the pipeline), the `nightshift admin` commands and the
//! end-to-end tests.
//!
//! Every call carries the trace context of the span it is made in, so the scheduler's work
//! joins the caller's trace, and the internal token ([`SchedulerClient::with_token`]), without
//! which the scheduler refuses it ([`crate::auth`]).

use std::time::Duration;

use nightshift_core::secret::Secret;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::auth::{ClientInterceptor, TokenError};
use crate::tls::{TlsError, TlsFiles};
use crate::v1::batches_client::BatchesClient;
use crate::v1::files_client::FilesClient;
use crate::v1::pipeline_client::PipelineClient;
use crate::v1::tenants_client::TenantsClient;
use crate::v1::webhooks_client::WebhooksClient;

/// A channel to the scheduler whose calls carry the caller's trace context and the internal
/// token.
pub type TracedChannel = InterceptedService<Channel, ClientInterceptor>;

/// How long a connection attempt to the scheduler may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a [`SchedulerClient`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("scheduler url: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Scheme(&'static str),
    #[error("{0}")]
    Tls(#[from] TlsError),
}

/// Clients of the scheduler's services, sharing one lazily connected channel. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SchedulerClient {
    channel: Channel,
    interceptor: ClientInterceptor,
}

impl SchedulerClient {
    /// Connects lazily: the caller starts (and reports not-ready) while the scheduler is down.
    /// Every call is cut after `timeout` unless the request sets a deadline of its own.
    /// Needs a Tokio runtime.
    ///
    /// # Errors
    /// `url` is not a URI.
    pub fn connect_lazy(url: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        Ok(Self::over(Endpoint::from_shared(url.to_owned())?, timeout))
    }

    /// The lazily connected client over `endpoint`, with the timeouts every caller gets.
    fn over(endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            channel: endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(timeout)
                .connect_lazy(),
            interceptor: ClientInterceptor::default(),
        }
    }

    /// Like [`connect_lazy`](Self::connect_lazy), over mutual TLS when `tls` is set
    /// ([`crate::tls`]): then `url` must be `https://` — tonic would otherwise connect in
    /// plain text, certificates configured or not — and without it `http://`.
    ///
    /// # Errors
    /// `url` is not a URI or has the wrong scheme, or a TLS file cannot be read or parsed.
    pub fn connect_lazy_tls(
        url: &str,
        timeout: Duration,
        tls: Option<&TlsFiles>,
    ) -> Result<Self, ConnectError> {
        Self::check_scheme(url, tls.is_some())?;
        let Some(tls) = tls else {
            return Ok(Self::connect_lazy(url, timeout)?);
        };
        let endpoint = Endpoint::from_shared(url.to_owned())?.tls_config(tls.client_config()?)?;
        Ok(Self::over(endpoint, timeout))
    }

    /// Checks that `url`'s scheme fits the transport: `https` with TLS, `http` without.
    ///
    /// # Errors
    /// What to change.
    pub fn check_scheme(url: &str, tls: bool) -> Result<(), ConnectError> {
        let https = url.starts_with("https://");
        if tls && !https {
            return Err(ConnectError::Scheme(
                "with [internal.tls] the scheduler url must start with https://",
            ));
        }
        if !tls && https {
            return Err(ConnectError::Scheme(
                "an https:// scheduler url needs [internal.tls] (ca, cert, key)",
            ));
        }
        Ok(())
    }

    /// Sends the internal token with every call (`None`: none is sent, and the scheduler
    /// refuses the calls).
    ///
    /// # Errors
    /// The token is unusable ([`crate::auth::check_token`]).
    pub fn with_token(mut self, token: Option<&Secret>) -> Result<Self, TokenError> {
        self.interceptor = ClientInterceptor::new(token)?;
        Ok(self)
    }

    /// Checks a scheduler URL without connecting (configuration validation).
    ///
    /// # Errors
    /// `url` is not a URI, with the parser's reason.
    pub fn check_url(url: &str) -> Result<(), String> {
        Endpoint::from_shared(url.to_owned())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    pub fn tenants(&self) -> TenantsClient<TracedChannel> {
        TenantsClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    pub fn files(&self) -> FilesClient<TracedChannel> {
        FilesClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    pub fn batches(&self) -> BatchesClient<TracedChannel> {
        BatchesClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    pub fn pipeline(&self) -> PipelineClient<TracedChannel> {
        PipelineClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    pub fn webhooks(&self) -> WebhooksClient<TracedChannel> {
        WebhooksClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
    }

    /// Whether the scheduler answers the standard gRPC health check (tonic-health).
    ///
    /// # Errors
    /// The check failed: `scheduler: <reason>`, for a `/readyz` answer.
    pub async fn ping(&self) -> Result<(), String> {
        HealthClient::with_interceptor(self.channel.clone(), self.interceptor.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("scheduler: {}", s.message()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_scheme_must_fit_the_transport() {
        assert!(SchedulerClient::check_scheme("http://s:50051", false).is_ok());
        assert!(SchedulerClient::check_scheme("https://s:50051", true).is_ok());
        // certificates configured but a plain URL: tonic would connect in plain text
        assert!(SchedulerClient::check_scheme("http://s:50051", true).is_err());
        assert!(SchedulerClient::check_scheme("https://s:50051", false).is_err());
    }
}
