//! Generated messages ⇄ core types.

use nightshift_core::file::{FileRecord, Purpose};
use nightshift_core::page::Order;
use nightshift_core::{ApiError, FileId, TenantId};

use crate::v1;

fn corrupt(what: &str, value: &str) -> ApiError {
    ApiError::internal(format!("control plane sent an invalid {what}: {value:?}"))
}

/// Parses a tenant id received over gRPC.
pub fn tenant_id(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(|_| corrupt("tenant id", raw))
}

impl From<&FileRecord> for v1::File {
    fn from(f: &FileRecord) -> Self {
        Self {
            id: f.id.to_string(),
            tenant_id: f.tenant_id.to_string(),
            bytes: f.bytes,
            created_at: f.created_at,
            created_at_us: f.created_at_us,
            expires_at: f.expires_at,
            filename: f.filename.clone(),
            purpose: f.purpose.as_str().to_owned(),
            storage_key: f.storage_key.clone(),
        }
    }
}

impl TryFrom<v1::File> for FileRecord {
    type Error = ApiError;
    fn try_from(f: v1::File) -> Result<Self, ApiError> {
        Ok(Self {
            id: FileId::parse(&f.id).map_err(|_| corrupt("file id", &f.id))?,
            tenant_id: tenant_id(&f.tenant_id)?,
            bytes: f.bytes,
            created_at: f.created_at,
            created_at_us: f.created_at_us,
            expires_at: f.expires_at,
            filename: f.filename,
            purpose: Purpose::parse(&f.purpose).ok_or_else(|| corrupt("purpose", &f.purpose))?,
            storage_key: f.storage_key,
        })
    }
}

impl From<Order> for v1::Order {
    fn from(o: Order) -> Self {
        match o {
            Order::Asc => Self::Asc,
            Order::Desc => Self::Desc,
        }
    }
}

impl From<v1::Order> for Order {
    fn from(o: v1::Order) -> Self {
        match o {
            v1::Order::Asc => Order::Asc,
            v1::Order::Desc | v1::Order::Unspecified => Order::Desc,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trips() {
        let rec = FileRecord {
            id: FileId::generate(),
            tenant_id: TenantId::generate(),
            bytes: 42,
            created_at: 1,
            created_at_us: 1_000_001,
            expires_at: Some(99),
            filename: "a.jsonl".into(),
            purpose: Purpose::Batch,
            storage_key: "files/x".into(),
        };
        let wire = v1::File::from(&rec);
        assert_eq!(FileRecord::try_from(wire).unwrap(), rec);
    }
}
