//! The nightshift wire: generated gRPC/protobuf code and its conversions to core types.
//!
//! The rest of the workspace converts at this crate's edge: services receive and return
//! `nightshift_core` types, and generated structs stay in handlers. [`client`] is the one
//! client of the scheduler's services, for every caller; [`auth`] (the internal token) and
//! [`tls`] (optional mutual TLS) guard them.

#![allow(clippy::unwrap_used)] // generated code

pub mod v1 {
    tonic::include_proto!("nightshift.v1");
}

pub mod auth;
pub mod client;
pub mod convert;
pub mod status;
pub mod tls;

pub use status::{api_error_from_status, status_from_api_error};
