//! `/v1/files`: the upload path (`upload.rs`: multipart, streamed to object storage, sniffed,
//! registered with the scheduler) and the read paths (`read.rs`: list, retrieve, download,
//! delete).

use std::collections::HashMap;

pub(crate) mod read;
pub(crate) mod upload;

pub use read::{content, delete, list, parse_range, retrieve};
pub use upload::create;

/// Query of a list route (`GET /v1/files`, `GET /v1/batches`). Values are kept raw and checked
/// by the handler, so every mistake gets an OpenAI error naming its parameter.
pub type RawQuery = HashMap<String, String>;
