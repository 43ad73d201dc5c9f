//! `nightshift admin quotas …` and `nightshift admin tenants`: operators' view and settings of
//! each tenant's quotas (defaults in `[scheduler.quotas]`, overrides in the metadata store).

use std::fmt;
use std::str::FromStr;

use clap::Subcommand;
use nightshift_proto::client::SchedulerClient;
use nightshift_proto::v1::{
    GetTenantQuotasRequest, ListTenantsRequest, QuotaOverrides, SetTenantQuotasRequest,
    TenantQuotas,
};

#[derive(Subcommand)]
pub enum QuotasCmd {
    /// Prints a tenant's quotas: for each, what applies, where it comes from (its override or
    /// the default) and what the tenant holds now.
    Show {
        #[arg(long)]
        tenant: String,
    },
    /// Changes a tenant's overrides; quotas not named keep theirs. Each value is a number,
    /// `unlimited`, or `default` (drop the override). What was admitted already stays.
    Set {
        #[arg(long)]
        tenant: String,
        /// Batches validating, in progress, finalizing or cancelling at once.
        #[arg(long)]
        max_active_batches: Option<Setting>,
        /// Requests (lines) of those batches together.
        #[arg(long)]
        max_enqueued_requests: Option<Setting>,
        /// Bytes of the tenant's visible files (uploads and results).
        #[arg(long)]
        max_stored_bytes: Option<Setting>,
    },
}

/// One quota's new setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// This limit (0 is unlimited too).
    Limit(u64),
    Unlimited,
    /// Drop the override: the default applies.
    Default,
}

impl FromStr for Setting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "unlimited" => Ok(Self::Unlimited),
            "default" => Ok(Self::Default),
            n => n
                .parse()
                .map(Self::Limit)
                .map_err(|_| format!("{n:?} is not a number, `unlimited` or `default`")),
        }
    }
}

impl Setting {
    /// The override after applying this setting to `current`: `None` leaves it as it is.
    fn apply(setting: Option<Self>, current: Option<u64>) -> Option<u64> {
        match setting {
            None => current,
            Some(Self::Limit(n)) => Some(n),
            Some(Self::Unlimited) => Some(0),
            Some(Self::Default) => None,
        }
    }
}

struct Limit(u64);

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("unlimited"),
            n => write!(f, "{n}"),
        }
    }
}

/// One line per quota: `name  limit  (override|default)  used=N`.
fn print(q: TenantQuotas) {
    let o = q.overrides.unwrap_or_default();
    let e = q.effective.unwrap_or_default();
    let u = q.usage.unwrap_or_default();
    println!("tenant={}", q.tenant_id);
    for (name, overridden, limit, used) in [
        (
            "max_active_batches",
            o.max_active_batches,
            e.max_active_batches,
            u.max_active_batches,
        ),
        (
            "max_enqueued_requests",
            o.max_enqueued_requests,
            e.max_enqueued_requests,
            u.max_enqueued_requests,
        ),
        (
            "max_stored_bytes",
            o.max_stored_bytes,
            e.max_stored_bytes,
            u.max_stored_bytes,
        ),
    ] {
        let from = if overridden.is_some() {
            "override"
        } else {
            "default"
        };
        println!("{name}\t{}\t{from}\tused={used}", Limit(limit));
    }
}

pub async fn run(control: &SchedulerClient, cmd: QuotasCmd) -> anyhow::Result<()> {
    match cmd {
        QuotasCmd::Show { tenant } => {
            let q = control
                .tenants()
                .get_tenant_quotas(GetTenantQuotasRequest { tenant_id: tenant })
                .await
                .map_err(|s| anyhow::anyhow!("get tenant quotas: {}", s.message()))?
                .into_inner();
            print(q);
        }
        QuotasCmd::Set {
            tenant,
            max_active_batches,
            max_enqueued_requests,
            max_stored_bytes,
        } => {
            let current = control
                .tenants()
                .get_tenant_quotas(GetTenantQuotasRequest {
                    tenant_id: tenant.clone(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("get tenant quotas: {}", s.message()))?
                .into_inner()
                .overrides
                .unwrap_or_default();
            let overrides = QuotaOverrides {
                max_active_batches: Setting::apply(max_active_batches, current.max_active_batches),
                max_enqueued_requests: Setting::apply(
                    max_enqueued_requests,
                    current.max_enqueued_requests,
                ),
                max_stored_bytes: Setting::apply(max_stored_bytes, current.max_stored_bytes),
            };
            let q = control
                .tenants()
                .set_tenant_quotas(SetTenantQuotasRequest {
                    tenant_id: tenant,
                    overrides: Some(overrides),
                })
                .await
                .map_err(|s| anyhow::anyhow!("set tenant quotas: {}", s.message()))?
                .into_inner();
            print(q);
        }
    }
    Ok(())
}

/// `nightshift admin tenants`: one line per tenant, oldest first: id, name.
pub async fn list_tenants(control: &SchedulerClient) -> anyhow::Result<()> {
    let resp = control
        .tenants()
        .list_tenants(ListTenantsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("list tenants: {}", s.message()))?
        .into_inner();
    for t in &resp.tenants {
        println!("{}\t{}", t.id, t.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_apply() {
        assert_eq!("12".parse::<Setting>(), Ok(Setting::Limit(12)));
        assert_eq!("unlimited".parse::<Setting>(), Ok(Setting::Unlimited));
        assert_eq!("default".parse::<Setting>(), Ok(Setting::Default));
        assert!("-1".parse::<Setting>().is_err());
        assert!("lots".parse::<Setting>().is_err());
        assert_eq!(Setting::apply(None, Some(4)), Some(4), "not named: kept");
        assert_eq!(Setting::apply(Some(Setting::Limit(9)), Some(4)), Some(9));
        assert_eq!(Setting::apply(Some(Setting::Unlimited), None), Some(0));
        assert_eq!(Setting::apply(Some(Setting::Default), Some(4)), None);
        assert_eq!(Limit(0).to_string(), "unlimited");
    }
}
