//! TLS of a [`BalancedChannel`](super::BalancedChannel) towards `https`
//! instances.

use std::fmt;
use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, ErrorKind, Result};
use crate::secret::Secret;

/// TLS towards the instances of a balanced channel: the CA that signs their
/// certificates, optionally a client certificate and key (for servers that
/// require mutual TLS), and optionally the name to verify when it is not
/// the host of the instance's address.
///
/// ```
/// use im_infra::registry::grpc::{GrpcOptions, GrpcTls};
///
/// # fn pems() -> (String, String, String) { (String::new(), String::new(), String::new()) }
/// let (ca, cert, key) = pems();
/// let opts = GrpcOptions::default().tls(
///     GrpcTls::new(ca).identity(cert, key).domain_name("logic.internal"),
/// );
/// assert!(opts.tls.is_some());
/// ```
#[derive(Clone)]
pub struct GrpcTls {
    ca_pem: String,
    identity: Option<(String, Secret)>,
    domain_name: Option<String>,
}

impl fmt::Debug for GrpcTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

fn read(what: &str, path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("grpc tls: cannot read the {what} file {}", path.display()),
        )
        .with_source(e)
    })
}

impl GrpcTls {
    /// Trusts the CA certificate(s) in `ca_pem` (PEM) and no other.
    pub fn new(ca_pem: impl Into<String>) -> Self {
        GrpcTls {
            ca_pem: ca_pem.into(),
            identity: None,
            domain_name: None,
        }
    }

    /// [`GrpcTls::new`] with the CA read from a PEM file; `InvalidConfig`
    /// naming the file when it cannot be read.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self> {
        Ok(GrpcTls::new(read("CA", path.as_ref())?))
    }

    /// Presents this client certificate and key (PEM) to the servers.
    #[must_use]
    pub fn identity(mut self, cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        self.identity = Some((cert_pem.into(), Secret::new(key_pem.into())));
        self
    }

    /// [`GrpcTls::identity`] read from PEM files.
    pub fn identity_files(self, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> Result<Self> {
        let cert_pem = read("client certificate", cert.as_ref())?;
        let key_pem = read("client key", key.as_ref())?;
        Ok(self.identity(cert_pem, key_pem))
    }

    /// Verifies every server's certificate against this name instead of the
    /// host of the instance's address.
    #[must_use]
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    fn client_config(&self) -> ClientTlsConfig {
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            cfg = cfg.identity(Identity::from_pem(cert, key.expose()));
        }
        if let Some(name) = &self.domain_name {
            cfg = cfg.domain_name(name.clone());
        }
        cfg
    }

    /// `endpoint` speaking TLS with these settings; `InvalidConfig` when a
    /// certificate or key does not parse.
    pub(super) fn apply(&self, endpoint: Endpoint) -> Result<Endpoint> {
        endpoint.tls_config(self.client_config()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                "grpc tls: the CA, client certificate or key is not valid PEM",
            )
            .with_source(e)
        })
    }

    /// Checks that the certificates and key parse, before any instance is
    /// dialled.
    pub(super) fn validate(&self) -> Result<()> {
        if !self.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "grpc tls: the CA holds no PEM certificate",
            ));
        }
        if let Some(name) = &self.domain_name {
            if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!("grpc tls: {name:?} is not a DNS name or IP address"),
                ));
            }
        }
        self.apply(Endpoint::from_static("https://localhost"))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_ca_or_server_name_is_invalid_config_and_the_key_is_never_printed() {
        let err = GrpcTls::new("not a certificate").validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let tls = GrpcTls::new("x").identity("cert", "-----BEGIN PRIVATE KEY----- secret");
        let shown = format!("{tls:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let ca = "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n";
        for bad in ["", "has space", "a..b"] {
            let err = GrpcTls::new(ca).domain_name(bad).validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad:?}");
        }
        let err = GrpcTls::from_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(err.message().contains("/nonexistent/ca.pem"), "{err}");
    }
}
