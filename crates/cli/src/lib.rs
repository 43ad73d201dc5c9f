//! The nightshift binary: every service, or all of them in one process, plus admin commands.
//!
//! The library holds what the binary and the e2e harness share, so the harness's distributed
//! stack is configured and wired as `nightshift <service>` is: the configuration chain
//! ([`config`]) and the real adapters built from it ([`ports`]).

pub mod config;
pub mod ports;
