//! `[redis]`: where the gateway's Redis is, how to authenticate and trust it.

use super::*;

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Full URL (`redis://`, `rediss://`, `unix://`); wins over the parts below when set.
    pub url: Option<String>,
    /// Host, as the reference SDK's REDIS_HOST.
    pub host: String,
    /// Port, as REDIS_PORT.
    pub port: u16,
    /// Database number, as REDIS_DB.
    pub db: i64,
    /// ACL user name, as REDIS_USERNAME.
    pub username: Option<String>,
    /// Password, as REDIS_PASSWORD.
    pub password: Option<String>,
    /// TLS with the parts above (`rediss://`); a `url` says it by its scheme.
    pub tls: bool,
    /// TLS: PEM file of the CA(s) that sign the server's certificate, instead
    /// of the system's trust store.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS: PEM file of a client certificate, for a server that asks for one
    /// (`tls-auth-clients`); with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS: PEM file of the client certificate's private key.
    pub tls_key_file: Option<PathBuf>,
    /// Redis Sentinel: the name the sentinels monitor the master under.
    /// With `sentinel_nodes`, the master is the one they name, followed
    /// across failovers; `url`, `host` and `port` are then not used (the
    /// user name, password, `db` and TLS settings above are the master's).
    pub sentinel_master: Option<String>,
    /// Redis Sentinel: `redis://host:port` (or `rediss://`) of each
    /// sentinel, with the sentinels' own user name and password if they ask
    /// for one. In the environment: comma-separated.
    pub sentinel_nodes: Vec<String>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            host: "127.0.0.1".into(),
            port: 6379,
            db: 0,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            sentinel_master: None,
            sentinel_nodes: Vec::new(),
        }
    }
}

impl RedisConfig {
    /// The URL to connect with: `url`, or one built from the parts, the user
    /// name and password percent-encoded. An empty user name or password is
    /// no user name or password (as the reference treats `REDIS_PASSWORD=`).
    pub fn connection_url(&self) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let given = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(encode);
        let auth = match (given(&self.username), given(&self.password)) {
            (Some(user), Some(pass)) => format!("{user}:{pass}@"),
            (None, Some(pass)) => format!(":{pass}@"),
            (Some(user), None) => format!("{user}@"),
            (None, None) => String::new(),
        };
        let host = &self.host;
        let scheme = if self.tls { "rediss" } else { "redis" };
        if host.contains(':') && !host.starts_with('[') {
            // An IPv6 address.
            format!("{scheme}://{auth}[{host}]:{}/{}", self.port, self.db)
        } else {
            format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db)
        }
    }

    /// The Redis to connect to: [`RedisConfig::connection_url`] with the TLS
    /// files read. The error names the key of the file that is unusable.
    pub fn endpoint(&self) -> Result<byclaw_client::connection::Endpoint, ConfigError> {
        let paths = byclaw_client::connection::TlsPaths {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        };
        let endpoint = byclaw_client::connection::Endpoint::with_tls(self.connection_url(), &paths)
            .map_err(|error| ConfigError {
                key: format!("redis.tls_{}", error.which),
                message: format!("{}: {}", error.path.display(), error.reason),
                source: None,
            })?;
        Ok(match &self.sentinel_master {
            Some(master_name) => {
                endpoint.through_sentinel(byclaw_client::connection::SentinelNodes {
                    master_name: master_name.clone(),
                    nodes: self.sentinel_nodes.clone(),
                })
            }
            None => endpoint,
        })
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}
