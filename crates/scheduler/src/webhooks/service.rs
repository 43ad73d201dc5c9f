//! The Webhooks gRPC service: a tenant's endpoints.

use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_core::webhook::{
    CreateWebhookEndpoint, CreateWebhookEndpointBody, KEEP_OLD_SECRET_SECS, WebhookEndpointRecord,
    generate_secret, no_such_endpoint, secret_hint,
};
use nightshift_core::{ApiError, TenantId, WebhookEndpointId};
use nightshift_proto::status_from_api_error;
use nightshift_proto::v1::webhooks_server::Webhooks;
use nightshift_proto::v1::{
    CreateWebhookEndpointRequest, ListWebhookEndpointsRequest, ListWebhookEndpointsResponse,
    RotateWebhookSecretRequest, WebhookEndpoint, WebhookEndpointRequest,
};
use tonic::{Request, Response, Status};

use super::{WebhookSettings, ssrf};
use crate::{SchedulerError, SchedulerPorts};

pub struct WebhooksService {
    ports: SchedulerPorts,
    settings: WebhookSettings,
}

impl WebhooksService {
    pub fn new(ports: SchedulerPorts, settings: WebhookSettings) -> Self {
        Self { ports, settings }
    }
}

/// The endpoint as sent over gRPC; the secret only when asked for.
fn to_proto(e: &WebhookEndpointRecord, with_secret: bool) -> WebhookEndpoint {
    WebhookEndpoint {
        id: e.id.to_string(),
        tenant_id: e.tenant_id.to_string(),
        url: e.url.clone(),
        event_types: e.events.iter().map(|v| v.as_str().to_owned()).collect(),
        name: e.name.clone(),
        created_at_us: e.created_at_us,
        updated_at: e.updated_at,
        signing_secret: with_secret.then(|| e.secret.clone()),
        signing_secret_hint: secret_hint(&e.secret),
    }
}

fn tenant(raw: &str) -> Result<TenantId, Status> {
    TenantId::parse(raw).map_err(|_| {
        Status::from(SchedulerError::Malformed(
            "invalid tenant id from caller".into(),
        ))
    })
}

/// An endpoint id from a client: one that cannot be ours names nothing.
fn endpoint_id(raw: &str) -> Result<WebhookEndpointId, Status> {
    WebhookEndpointId::parse(raw).map_err(|_| status_from_api_error(&no_such_endpoint(raw)))
}

fn store(e: nightshift_metadata::MetadataError) -> Status {
    Status::from(SchedulerError::from(e))
}

fn found(e: Option<WebhookEndpointRecord>, id: &str) -> Result<WebhookEndpointRecord, Status> {
    e.ok_or_else(|| status_from_api_error(&no_such_endpoint(id)))
}

#[tonic::async_trait]
impl Webhooks for WebhooksService {
    async fn create_webhook_endpoint(
        &self,
        request: Request<CreateWebhookEndpointRequest>,
    ) -> Result<Response<WebhookEndpoint>, Status> {
        let req = request.into_inner();
        let tenant = tenant(&req.tenant_id)?;
        // The gateway checked the request already; checked again for every other caller
        // (the admin CLI).
        let params = CreateWebhookEndpoint::check(CreateWebhookEndpointBody {
            url: Some(req.url),
            event_types: (!req.event_types.is_empty()).then_some(req.event_types),
            name: Some(req.name),
        })
        .map_err(|e| status_from_api_error(&e))?;
        if !self.settings.allow_private_addresses {
            let url = reqwest::Url::parse(&params.url).map_err(|e| {
                status_from_api_error(&ApiError::invalid_value("url", e.to_string()))
            })?;
            ssrf::check_host(&url).await.map_err(|e| {
                status_from_api_error(
                    &ApiError::invalid_value("url", format!("Invalid webhook url: {e}"))
                        .with_code("url_not_allowed"),
                )
            })?;
        }
        let created_at_us = now_unix_micros();
        let endpoint = WebhookEndpointRecord {
            id: WebhookEndpointId::generate(),
            tenant_id: tenant,
            url: params.url,
            events: params.events,
            name: params.name,
            secret: generate_secret(),
            previous_secret: None,
            previous_secret_until: None,
            created_at_us,
            updated_at: created_at_us.div_euclid(1_000_000),
        };
        self.ports
            .metadata
            .create_webhook_endpoint(&endpoint)
            .await
            .map_err(store)?;
        tracing::info!(
            tenant_id = %endpoint.tenant_id, endpoint_id = %endpoint.id,
            "webhook endpoint created"
        );
        Ok(Response::new(to_proto(&endpoint, true)))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<ListWebhookEndpointsRequest>,
    ) -> Result<Response<ListWebhookEndpointsResponse>, Status> {
        let tenant = tenant(&request.into_inner().tenant_id)?;
        let endpoints = self
            .ports
            .metadata
            .list_webhook_endpoints(&tenant)
            .await
            .map_err(store)?;
        Ok(Response::new(ListWebhookEndpointsResponse {
            endpoints: endpoints.iter().map(|e| to_proto(e, false)).collect(),
        }))
    }

    async fn get_webhook_endpoint(
        &self,
        request: Request<WebhookEndpointRequest>,
    ) -> Result<Response<WebhookEndpoint>, Status> {
        let req = request.into_inner();
        let (tenant, id) = (tenant(&req.tenant_id)?, endpoint_id(&req.id)?);
        let e = self
            .ports
            .metadata
            .webhook_endpoint(&tenant, &id)
            .await
            .map_err(store)?;
        Ok(Response::new(to_proto(&found(e, &req.id)?, false)))
    }

    async fn delete_webhook_endpoint(
        &self,
        request: Request<WebhookEndpointRequest>,
    ) -> Result<Response<WebhookEndpoint>, Status> {
        let req = request.into_inner();
        let (tenant, id) = (tenant(&req.tenant_id)?, endpoint_id(&req.id)?);
        let e = self
            .ports
            .metadata
            .delete_webhook_endpoint(&tenant, &id)
            .await
            .map_err(store)?;
        let e = found(e, &req.id)?;
        tracing::info!(tenant_id = %e.tenant_id, endpoint_id = %e.id, "webhook endpoint deleted");
        Ok(Response::new(to_proto(&e, false)))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<RotateWebhookSecretRequest>,
    ) -> Result<Response<WebhookEndpoint>, Status> {
        let req = request.into_inner();
        let (tenant, id) = (tenant(&req.tenant_id)?, endpoint_id(&req.id)?);
        let now = now_unix();
        let keep_old_until = req
            .keep_old_secret_active_for_24_hours
            .then_some(now + KEEP_OLD_SECRET_SECS);
        let e = self
            .ports
            .metadata
            .rotate_webhook_secret(&tenant, &id, &generate_secret(), keep_old_until, now)
            .await
            .map_err(store)?;
        Ok(Response::new(to_proto(&found(e, &req.id)?, true)))
    }
}
