//! Domain types shared by every nightshift service.
//!
//! Nothing in here does I/O: ids, the File and Batch objects and their OpenAI JSON, the
//! error-code vocabulary that both transports (HTTP and gRPC) speak, upload sniffing, JSONL
//! validation, result lines and usage accounting.

pub mod apikey;
pub mod batch;
pub mod chunking;
pub mod error;
pub mod file;
pub mod idempotency;
pub mod ids;
pub mod jsonl;
pub mod page;
pub mod quota;
pub mod results;
pub mod routing;
pub mod schema;
pub mod sniff;
pub mod time;
pub mod validation;
pub mod webhook;

pub use error::{ApiError, ErrorKind};
pub use ids::{BatchId, EventId, FileId, IdError, TenantId, WebhookEndpointId};
pub mod secret;
