//! The Tenants gRPC service: API-key authentication, tenant creation, and the operators' view
//! and settings of each tenant's quotas (`nightshift admin quotas`).

use nightshift_core::TenantId;
use nightshift_core::apikey;
use nightshift_core::time::{now_unix, now_unix_micros};
use nightshift_metadata::{MetadataError, QuotaOverrides, QuotaUsage, Quotas};
use nightshift_proto::v1::{
    self, AuthenticateRequest, AuthenticateResponse, CreateTenantRequest, CreateTenantResponse,
    GetTenantQuotasRequest, ListTenantsRequest, ListTenantsResponse, SetTenantQuotasRequest,
    TenantQuotas, TenantSummary, tenants_server::Tenants,
};
use tonic::{Request, Response, Status};

use crate::{SchedulerError, SchedulerPorts};

pub struct TenantsService {
    ports: SchedulerPorts,
    /// The default quotas (`[scheduler.quotas]`), reported with each tenant's.
    quotas: Quotas,
}

impl TenantsService {
    pub fn new(ports: SchedulerPorts, quotas: Quotas) -> Self {
        Self { ports, quotas }
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

    async fn list_tenants(
        &self,
        _request: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let tenants = self
            .ports
            .metadata
            .list_tenants()
            .await
            .map_err(SchedulerError::from)?;
        Ok(Response::new(ListTenantsResponse {
            tenants: tenants
                .into_iter()
                .map(|t| TenantSummary {
                    id: t.id.to_string(),
                    name: t.name,
                })
                .collect(),
        }))
    }

    async fn get_tenant_quotas(
        &self,
        request: Request<GetTenantQuotasRequest>,
    ) -> Result<Response<TenantQuotas>, Status> {
        Ok(Response::new(
            self.quotas_of(&request.into_inner().tenant_id).await?,
        ))
    }

    async fn set_tenant_quotas(
        &self,
        request: Request<SetTenantQuotasRequest>,
    ) -> Result<Response<TenantQuotas>, Status> {
        let req = request.into_inner();
        Ok(Response::new(
            self.set_quotas(&req.tenant_id, req.overrides.unwrap_or_default())
                .await?,
        ))
    }
}

fn overrides_from(o: v1::QuotaOverrides) -> QuotaOverrides {
    QuotaOverrides {
        max_active_batches: o.max_active_batches,
        max_enqueued_requests: o.max_enqueued_requests,
        max_stored_bytes: o.max_stored_bytes,
    }
}

fn values(q: &Quotas) -> v1::QuotaValues {
    v1::QuotaValues {
        max_active_batches: q.max_active_batches,
        max_enqueued_requests: q.max_enqueued_requests,
        max_stored_bytes: q.max_stored_bytes,
    }
}

fn usage(u: &QuotaUsage) -> v1::QuotaValues {
    v1::QuotaValues {
        max_active_batches: u.active_batches,
        max_enqueued_requests: u.enqueued_requests,
        max_stored_bytes: u.stored_bytes,
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

    /// The tenant's overrides, the defaults, what applies and what it holds.
    async fn quotas_of(&self, raw: &str) -> Result<TenantQuotas, SchedulerError> {
        let tenant = TenantId::parse(raw).map_err(|_| no_tenant(raw))?;
        let overrides = self
            .ports
            .metadata
            .tenant_quotas(&tenant)
            .await?
            .ok_or_else(|| no_tenant(raw))?;
        let held = self.ports.metadata.quota_usage(&tenant, now_unix()).await?;
        Ok(TenantQuotas {
            tenant_id: tenant.to_string(),
            overrides: Some(v1::QuotaOverrides {
                max_active_batches: overrides.max_active_batches,
                max_enqueued_requests: overrides.max_enqueued_requests,
                max_stored_bytes: overrides.max_stored_bytes,
            }),
            defaults: Some(values(&self.quotas)),
            effective: Some(values(&overrides.over(&self.quotas))),
            usage: Some(usage(&held)),
        })
    }

    async fn set_quotas(
        &self,
        raw: &str,
        overrides: v1::QuotaOverrides,
    ) -> Result<TenantQuotas, SchedulerError> {
        let tenant = TenantId::parse(raw).map_err(|_| no_tenant(raw))?;
        let overrides = overrides_from(overrides);
        let found = self
            .ports
            .metadata
            .set_tenant_quotas(&tenant, &overrides, now_unix_micros())
            .await?;
        if !found {
            return Err(no_tenant(raw));
        }
        tracing::info!(
            tenant_id = %tenant,
            max_active_batches = ?overrides.max_active_batches,
            max_enqueued_requests = ?overrides.max_enqueued_requests,
            max_stored_bytes = ?overrides.max_stored_bytes,
            "tenant quotas set"
        );
        self.quotas_of(raw).await
    }
}

fn no_tenant(id: &str) -> SchedulerError {
    SchedulerError::NotFound {
        object: "Tenant",
        id: id.to_owned(),
    }
}
