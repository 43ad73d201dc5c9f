//! Optional mutual TLS on the scheduler's internal gRPC API (`[internal.tls]`).
//!
//! When it is configured the scheduler serves TLS only and requires a client certificate
//! signed by `ca`; its clients (the gateway, the finalizers, `nightshift admin`) present
//! theirs and verify the scheduler's against the same `ca`. It is on top of the internal
//! token ([`crate::auth`]), not instead of it: a call needs both.
//!
//! The files are read once, when a service starts: a renewed certificate takes effect at the
//! next restart. Standalone mode never uses it (its gRPC stays on loopback, in one process).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The `[internal.tls]` section: PEM files, the same three keys on every service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The certificate authority both sides trust: the scheduler admits only clients whose
    /// certificate it signed, and the clients accept only a scheduler certificate it signed.
    pub ca: PathBuf,
    /// This process's certificate (chain), presented to the other side.
    pub cert: PathBuf,
    /// The private key of `cert`.
    pub key: PathBuf,
    /// The name the clients expect in the scheduler's certificate; unset: the host of
    /// `scheduler_url`. The scheduler ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[internal.tls] {setting} = {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the files hold, read.
struct Pems {
    ca: Certificate,
    identity: Identity,
}

impl TlsFiles {
    fn read(&self) -> Result<Pems, TlsError> {
        fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
            std::fs::read(path).map_err(|source| TlsError::Read {
                setting,
                path: path.to_owned(),
                source,
            })
        }
        use_ring_provider();
        Ok(Pems {
            ca: Certificate::from_pem(read("ca", &self.ca)?),
            identity: Identity::from_pem(read("cert", &self.cert)?, read("key", &self.key)?),
        })
    }

    /// The scheduler's side: its certificate, and client certificates required, signed by
    /// `ca`. The PEM contents are parsed when the server is built with it (`tls_config`).
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let pems = self.read()?;
        Ok(ServerTlsConfig::new()
            .identity(pems.identity)
            .client_ca_root(pems.ca))
    }

    /// The clients' side: the scheduler's certificate must be signed by `ca` (and name
    /// `server_name`, or the URL's host); this process presents its own.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        let pems = self.read()?;
        let config = ClientTlsConfig::new()
            .ca_certificate(pems.ca)
            .identity(pems.identity);
        Ok(match &self.server_name {
            Some(name) => config.domain_name(name.clone()),
            None => config,
        })
    }
}

/// Makes ring the process's rustls crypto provider, unless one is set already. rustls picks
/// one by itself only when a single one is compiled in; through other crates both ring and
/// aws-lc are, and tonic's server side asks rustls for the default.
fn use_ring_provider() {
    // Err: a provider is installed already, which is as good
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_names_its_setting() {
        let files = TlsFiles {
            ca: "/nonexistent/ca.pem".into(),
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            server_name: None,
        };
        let error = files.client_config().expect_err("no files").to_string();
        assert!(error.contains("ca = /nonexistent/ca.pem"), "{error}");
        assert!(files.server_config().is_err());
    }
}
