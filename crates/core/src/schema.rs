//! Pieces of the gateway's OpenAPI document that derives cannot say on their own: the
//! constant strings (`"object": "file"`) the JSON objects carry. Used by `#[schema(schema_with
//! = ...)]` on the types' fields.

use utoipa::openapi::schema::{ObjectBuilder, Type};

/// A string that is always `value`.
pub fn constant(value: &'static str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([value]))
}

/// `"object": "file"`.
pub fn object_file() -> ObjectBuilder {
    constant("file")
}

/// `"object": "batch"`.
pub fn object_batch() -> ObjectBuilder {
    constant("batch")
}

/// `"object": "list"`.
pub fn object_list() -> ObjectBuilder {
    constant("list")
}
