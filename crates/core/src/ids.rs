//! Identifiers. Each is a newtype so a file id can never be passed where a tenant id is meant,
//! and each parses before it is trusted: ids arrive in URLs and JSON bodies.

use std::fmt;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

/// Length of the random part of generated ids: 24 alphanumerics ≈ 143 bits.
const RANDOM_LEN: usize = 24;
/// Longest id we accept from a client; anything longer is certainly not ours.
const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("expected an id starting with '{prefix}'")]
    WrongPrefix { prefix: &'static str },
    #[error("id has invalid characters or length")]
    Malformed,
}

fn random_suffix() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(RANDOM_LEN)
        .map(char::from)
        .collect()
}

fn check(raw: &str, prefix: &'static str) -> Result<(), IdError> {
    let rest = raw
        .strip_prefix(prefix)
        .ok_or(IdError::WrongPrefix { prefix })?;
    let ok = !rest.is_empty()
        && raw.len() <= MAX_ID_LEN
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(IdError::Malformed) }
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The prefix every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// A fresh random id.
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, random_suffix()))
            }

            /// Parses an id received from outside (URL, JSON, gRPC).
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check(raw, $prefix)?;
                Ok(Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(raw: String) -> Result<Self, IdError> {
                check(&raw, $prefix)?;
                Ok(Self(raw))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

prefixed_id!(
    /// A file (`file-…`), as OpenAI spells it.
    FileId,
    "file-"
);
prefixed_id!(
    /// A batch (`batch_…`), as OpenAI spells it.
    BatchId,
    "batch_"
);
prefixed_id!(
    /// A tenant (`tenant_…`): the unit of isolation. Every file and batch belongs to one.
    TenantId,
    "tenant_"
);
prefixed_id!(
    /// A webhook endpoint (`we_…`): where a tenant's batch events are delivered.
    WebhookEndpointId,
    "we_"
);
prefixed_id!(
    /// A webhook event (`evt_…`), as OpenAI spells it: one per batch terminal transition.
    EventId,
    "evt_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = FileId::generate();
        assert!(id.as_str().starts_with("file-"));
        assert_eq!(FileId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn rejects_foreign_and_malformed_ids() {
        assert_eq!(
            FileId::parse("batch_abc"),
            Err(IdError::WrongPrefix { prefix: "file-" })
        );
        assert_eq!(FileId::parse("file-"), Err(IdError::Malformed));
        assert_eq!(FileId::parse("file-a/b"), Err(IdError::Malformed));
        assert_eq!(FileId::parse("file-a b"), Err(IdError::Malformed));
        let long = format!("file-{}", "a".repeat(200));
        assert_eq!(FileId::parse(&long), Err(IdError::Malformed));
    }

    #[test]
    fn serde_validates() {
        let ok: Result<TenantId, _> = serde_json::from_str("\"tenant_x1\"");
        assert!(ok.is_ok());
        let bad: Result<TenantId, _> = serde_json::from_str("\"file-x1\"");
        assert!(bad.is_err());
    }
}
