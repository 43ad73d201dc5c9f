//! The Tenants gRPC service: API-key authentication and tenant creation.

use nightshift_core::{ApiError, apikey};
use nightshift_proto::status::status_from_api_error;
use nightshift_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CreateTenantRequest, CreateTenantResponse,
    tenants_server::Tenants,
};
use tonic::{Request, Response, Status};

use crate::Ports;

pub struct TenantsService {
    ports: Ports,
}

impl TenantsService {
    pub fn new(ports: Ports) -> Self {
        Self { ports }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "metadata store failed");
    status_from_api_error(&ApiError::unavailable("The metadata store is unavailable."))
}

#[tonic::async_trait]
impl Tenants for TenantsService {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let key = request.into_inner().api_key;
        let tenant = self
            .ports
            .metadata
            .tenant_by_key(&apikey::digest(&key))
            .await
            .map_err(internal)?
            .ok_or_else(|| {
                status_from_api_error(&ApiError::unauthenticated("Incorrect API key provided."))
            })?;
        Ok(Response::new(AuthenticateResponse {
            tenant_id: tenant.id.to_string(),
            tenant_name: tenant.name,
        }))
    }

    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let req = request.into_inner();
        if req.name.trim().is_empty() {
            return Err(status_from_api_error(&ApiError::missing("name")));
        }
        let key = req
            .api_key
            .filter(|k| !k.is_empty())
            .unwrap_or_else(apikey::generate);
        let tenant = self
            .ports
            .metadata
            .create_tenant(&req.name, &apikey::digest(&key))
            .await
            .map_err(|e| match e {
                nightshift_metadata::MetadataError::Conflict(_) => status_from_api_error(
                    &ApiError::new(
                        nightshift_core::ErrorKind::Conflict,
                        "That API key is already in use.",
                    )
                    .not_retryable(),
                ),
                other => internal(other),
            })?;
        tracing::info!(tenant_id = %tenant.id, tenant = %tenant.name, "tenant created");
        Ok(Response::new(CreateTenantResponse {
            tenant_id: tenant.id.to_string(),
            api_key: key,
        }))
    }
}
