//! Connections to the gateway's Redis, the same for every program that
//! talks to it: reconnecting, multiplexed, with timeouts, over TLS when the
//! URL says `rediss://` (with the system's trust store, or a CA file and a
//! client certificate: [`Endpoint`]).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where the gateway's Redis is and how to trust it: a URL, and for TLS
/// (`rediss://`) optionally the CA that signed the server's certificate and
/// a client certificate. Built once, cloned into every connection.
#[derive(Clone)]
pub struct Endpoint {
    /// `redis://`, `rediss://` or `unix://` URL.
    url: String,
    /// PEM files read at start; `None`: the system's trust store, no client
    /// certificate.
    tls: Option<Arc<TlsFiles>>,
}

/// The PEM contents of the TLS files of an [`Endpoint`].
struct TlsFiles {
    /// CA certificates that may sign the server's (instead of the system's).
    ca: Option<Vec<u8>>,
    /// Client certificate chain and key, for servers that ask for one.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

/// The files of a TLS connection, as the configuration names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM file of the CA(s) to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain).
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

/// A TLS file that cannot be used: which, and why.
#[derive(Debug, thiserror::Error)]
#[error("{which} {path}: {reason}")]
pub struct TlsFileError {
    /// `ca_file`, `cert_file` or `key_file`.
    pub which: &'static str,
    /// The file as configured.
    pub path: PathBuf,
    /// What was wrong with it (unreadable, not PEM, no key in it, ...).
    pub reason: String,
}

impl Endpoint {
    /// The Redis at `url`, trusted by the system's certificates when it is
    /// `rediss://`.
    pub fn new(url: impl Into<String>) -> Self {
        Endpoint {
            url: url.into(),
            tls: None,
        }
    }

    /// The Redis at `url` with these TLS files (read now). Without any file
    /// it is [`Endpoint::new`].
    pub fn with_tls(url: impl Into<String>, paths: &TlsPaths) -> Result<Self, TlsFileError> {
        let read = |which: &'static str, path: &Path| {
            let bytes = std::fs::read(path).map_err(|e| TlsFileError {
                which,
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(TlsFileError {
                    which,
                    path: path.to_owned(),
                    reason: "is not a PEM file (no -----BEGIN line)".into(),
                });
            }
            Ok(bytes)
        };
        let ca = paths
            .ca_file
            .as_deref()
            .map(|p| read("ca_file", p))
            .transpose()?;
        let client = match (&paths.cert_file, &paths.key_file) {
            (Some(cert), Some(key)) => Some((read("cert_file", cert)?, read("key_file", key)?)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(TlsFileError {
                    which: "key_file",
                    path: cert.clone(),
                    reason: "a client certificate needs its key_file".into(),
                });
            }
            (None, Some(key)) => {
                return Err(TlsFileError {
                    which: "cert_file",
                    path: key.clone(),
                    reason: "a client key needs its cert_file".into(),
                });
            }
        };
        let tls = (ca.is_some() || client.is_some()).then(|| Arc::new(TlsFiles { ca, client }));
        Ok(Endpoint {
            url: url.into(),
            tls,
        })
    }

    /// The URL (with its password: never log it; see [`redact_password`]).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this endpoint.
    pub fn client(&self) -> Result<redis::Client, redis::RedisError> {
        if self.url.starts_with("rediss://") {
            // rustls picks its provider from crate features; make the choice
            // explicit so that another crate enabling a second one cannot
            // make it ambiguous.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        match &self.tls {
            None => redis::Client::open(self.url.as_str()),
            Some(files) => redis::Client::build_with_tls(
                self.url.as_str(),
                redis::TlsCertificates {
                    client_tls: files
                        .client
                        .as_ref()
                        .map(|(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert.clone(),
                            client_key: key.clone(),
                        }),
                    root_cert: files.ca.clone(),
                },
            ),
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &redact_password(&self.url))
            .field("tls_files", &self.tls.is_some())
            .finish()
    }
}

impl From<&str> for Endpoint {
    fn from(url: &str) -> Self {
        Endpoint::new(url)
    }
}

impl From<String> for Endpoint {
    fn from(url: String) -> Self {
        Endpoint::new(url)
    }
}

impl From<&String> for Endpoint {
    fn from(url: &String) -> Self {
        Endpoint::new(url.as_str())
    }
}

impl From<&Endpoint> for Endpoint {
    fn from(endpoint: &Endpoint) -> Self {
        endpoint.clone()
    }
}

/// Opens a reconnecting, multiplexed connection. `response_timeout` must
/// exceed the BLOCK time of any blocking read made on it.
pub async fn connect(
    endpoint: impl Into<Endpoint>,
    response_timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = endpoint.into().client()?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config).await
}

/// The URL as logs and errors may show it: a password becomes `***`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials
                .split_once(':')
                .map_or(credentials, |(user, _)| user);
            if credentials.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_password;

    #[test]
    fn passwords_never_reach_errors() {
        assert_eq!(
            redact_password("redis://app:s3cr3t@cache:6379/2"),
            "redis://app:***@cache:6379/2"
        );
        assert_eq!(
            redact_password("redis://:s3cr3t@cache"),
            "redis://:***@cache"
        );
        assert_eq!(
            redact_password("redis://cache:6379/0"),
            "redis://cache:6379/0"
        );
        assert_eq!(redact_password("redis://user@cache"), "redis://user@cache");
    }
}
