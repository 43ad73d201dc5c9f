//! The Tenants gRPC service: API-key authentication and tenant creation.

use nightshift_core::apikey;
use nightshift_metadata::MetadataError;
use nightshift_proto::v1::{
    AuthenticateRequest, AuthenticateResponse, CreateTenantRequest, CreateTenantResponse,
    tenants_server::Tenants,
};
use tonic::{Request, Response, Status};

use crate::{SchedulerError, SchedulerPorts};

pub struct TenantsService {
    ports: SchedulerPorts,
}

impl TenantsService {
    pub fn new(ports: SchedulerPorts) -> Self {
        Self { ports }
    }
}

#[tonic::async_trait]
impl Tenants for TenantsService {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let key = request.into_inner().api_key;
        Ok(Response::new(self.tenant_for_key(&key).await?))
    }

    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }
}

impl TenantsService {
    async fn tenant_for_key(&self, key: &str) -> Result<AuthenticateResponse, SchedulerError> {
        let tenant = self
            .ports
            .metadata
            .tenant_by_key(&apikey::digest(key))
            .await?
            .ok_or(SchedulerError::Unauthenticated)?;
        Ok(AuthenticateResponse {
            tenant_id: tenant.id.to_string(),
            tenant_name: tenant.name,
        })
    }

    /// Creates a tenant with the given key, or a generated one. A key already in use is a
    /// conflict.
    async fn create(
        &self,
        req: CreateTenantRequest,
    ) -> Result<CreateTenantResponse, SchedulerError> {
        if req.name.trim().is_empty() {
            return Err(SchedulerError::Missing("name"));
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
                MetadataError::Conflict(_) => {
                    SchedulerError::Conflict("That API key is already in use.".into())
                }
                other => other.into(),
            })?;
        tracing::info!(tenant_id = %tenant.id, tenant = %tenant.name, "tenant created");
        Ok(CreateTenantResponse {
            tenant_id: tenant.id.to_string(),
            api_key: key,
        })
    }
}
