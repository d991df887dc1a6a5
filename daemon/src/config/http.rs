//! `[http]`: the operator's listener.

use super::*;

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve `/healthz`, `/readyz` and `/metrics`.
    pub enabled: bool,
    /// Address and port; loopback by default (port 0 picks a free one).
    pub listen: String,
    /// PEM file of the certificate chain to serve HTTPS with; unset: plain
    /// HTTP. Needs `tls_key_file`.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM file of that certificate's private key.
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl HttpConfig {
    /// `listen` as an address (checked by validation).
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    /// The TLS setup of `tls_cert_file` and `tls_key_file` (files read and
    /// checked now); `None` for plain HTTP. The error is (key, message).
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, (String, String)> {
        byclaw_bridge::listener_tls("http", &self.tls_cert_file, &self.tls_key_file)
    }
}
