//! `[bridge]` of the daemon's configuration: where the bridge listens, who
//! may call it, and the limits of its event streams.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `[bridge]`: the HTTP API, event streams and chat page for front ends
/// (see the [crate docs](crate)).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BridgeConfig {
    /// Run the bridge inside the daemon; `gatewayd bridge` runs it alone
    /// whatever this says.
    pub enabled: bool,
    /// Address the bridge listens on. A non-loopback address needs tokens.
    pub listen: std::net::SocketAddr,
    /// Who may call the bridge; empty: anyone who can reach `listen`, with
    /// every session (allowed on a loopback address only).
    pub tokens: Vec<BridgeToken>,
    /// Events queued for one SSE or WebSocket client; when its queue stays
    /// full for `stall_timeout_ms` the client is disconnected (it resumes
    /// from its last event id).
    pub buffer: usize,
    /// How long a client's full queue may stay full, milliseconds. Not 0: a
    /// client catching up on a long backlog always fills its queue for a
    /// moment, since Redis serves faster than a socket drains.
    pub stall_timeout_ms: u64,
    /// Most SSE and WebSocket streams open at once (each holds a Redis
    /// connection for its blocking reads); past it new ones get 503.
    pub max_streams: usize,
    /// Seconds between keep-alive comments (SSE) or pings (WebSocket), so
    /// proxies do not close an idle stream.
    pub keep_alive_s: u64,
    /// Host names the bridge answers to (the `Host` header, without the
    /// port). Empty: on a loopback address, loopback names only (so a
    /// DNS-rebinding page is refused); elsewhere, any.
    pub allowed_hosts: Vec<String>,
    /// Origins of other pages that may call the bridge from a browser
    /// (`https://app.example.com`): they get CORS answers and may open the
    /// WebSocket. Empty: only the bridge's own page.
    pub allowed_origins: Vec<String>,
    /// Most event streams one tenant may hold open (a token's
    /// `max_streams` overrides it); past it, 429.
    pub tenant_max_streams: usize,
    /// Messages (new tasks and answers) one tenant may send per second, in
    /// bursts of as many (a token's `messages_per_s` overrides it); past
    /// it, 429 with a Retry-After.
    pub tenant_messages_per_s: u32,
    /// PEM file of the certificate chain to serve HTTPS (and `wss://`)
    /// with; unset: plain HTTP. Needs `tls_key_file`.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM file of that certificate's private key.
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// One `[[bridge.tokens]]` entry: a bearer token and the sessions it reaches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeToken {
    /// The secret a caller presents (`Authorization: Bearer ...` or
    /// `?token=`). Never logged.
    pub token: String,
    /// Tenant name, for logs and for the page.
    pub tenant: String,
    /// The tenant owns the sessions whose id starts with this; empty: every
    /// session (only when it is the only tenant).
    #[serde(default)]
    pub session_prefix: String,
    /// This tenant's most open event streams, instead of
    /// `bridge.tenant_max_streams`.
    #[serde(default)]
    pub max_streams: Option<usize>,
    /// This tenant's messages per second, instead of
    /// `bridge.tenant_messages_per_s`.
    #[serde(default)]
    pub messages_per_s: Option<u32>,
}

impl BridgeConfig {
    /// `keep_alive_s`.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_s)
    }

    /// `stall_timeout_ms`.
    pub fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.stall_timeout_ms)
    }

    /// The TLS setup of `tls_cert_file` and `tls_key_file` (files read and
    /// checked now); `None` for plain HTTP. The error names the key.
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, (String, String)> {
        listener_tls("bridge", &self.tls_cert_file, &self.tls_key_file)
    }
}

/// The TLS setup of a listener's `<table>.tls_cert_file` and
/// `<table>.tls_key_file`: both or neither; `None` for plain HTTP. The error
/// is (key, message).
pub fn listener_tls(
    table: &str,
    cert_file: &Option<PathBuf>,
    key_file: &Option<PathBuf>,
) -> Result<Option<Arc<rustls::ServerConfig>>, (String, String)> {
    match (cert_file, key_file) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => crate::tls::server_config(table, cert, key)
            .map(Some)
            .map_err(|e| (e.key.clone(), format!("{}: {}", e.path.display(), e.reason))),
        (Some(_), None) => Err((
            format!("{table}.tls_key_file"),
            format!("must be set with {table}.tls_cert_file"),
        )),
        (None, Some(_)) => Err((
            format!("{table}.tls_cert_file"),
            format!("must be set with {table}.tls_key_file"),
        )),
    }
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            enabled: false,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8780)),
            tokens: Vec::new(),
            buffer: 256,
            stall_timeout_ms: 5000,
            max_streams: 1000,
            keep_alive_s: 15,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            tenant_max_streams: 100,
            tenant_messages_per_s: 20,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl BridgeConfig {
    /// Checks the rules of `[bridge]`: `check(ok, key, message)` is called
    /// for each rule, with the dotted key it is about (the daemon's
    /// configuration collects every failed one before it reports).
    pub fn validate(&self, check: &mut impl FnMut(bool, &str, &str)) {
        let b = self;
        check(
            !b.tokens.is_empty() || b.listen.ip().is_loopback(),
            "bridge.listen",
            "is not a loopback address and bridge.tokens is empty: anyone could read every session; add [[bridge.tokens]] or listen on 127.0.0.1",
        );
        check(
            (1..=100_000).contains(&b.buffer),
            "bridge.buffer",
            "must be between 1 and 100000",
        );
        check(
            (1..=600_000).contains(&b.stall_timeout_ms),
            "bridge.stall_timeout_ms",
            "must be between 1 and 600000",
        );
        check(
            (1..=1_000_000).contains(&b.max_streams),
            "bridge.max_streams",
            "must be between 1 and 1000000",
        );
        check(
            (1..=3600).contains(&b.keep_alive_s),
            "bridge.keep_alive_s",
            "must be between 1 and 3600",
        );
        check(
            (1..=1_000_000).contains(&b.tenant_max_streams),
            "bridge.tenant_max_streams",
            "must be between 1 and 1000000",
        );
        check(
            (1..=1_000_000).contains(&b.tenant_messages_per_s),
            "bridge.tenant_messages_per_s",
            "must be between 1 and 1000000",
        );
        if let Err((key, message)) = b.tls() {
            check(false, &key, &message);
        }
        for (i, host) in b.allowed_hosts.iter().enumerate() {
            check(
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-.:[]".contains(&c)),
                &format!("bridge.allowed_hosts[{i}]"),
                "must be a host name or address, without scheme or port (e.g. gateway.example.com)",
            );
        }
        for (i, origin) in b.allowed_origins.iter().enumerate() {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            check(
                rest.is_some_and(|rest| {
                    let rest = rest.trim_end_matches('/');
                    !rest.is_empty() && !rest.contains('/') && !rest.contains('*')
                }),
                &format!("bridge.allowed_origins[{i}]"),
                "must be an origin: http(s)://host[:port], without a path or wildcards",
            );
        }
        for (i, entry) in b.tokens.iter().enumerate() {
            let at = format!("bridge.tokens[{i}]");
            check(
                entry.token.len() >= 16 && entry.token.bytes().all(|c| c.is_ascii_graphic()),
                &format!("{at}.token"),
                "must be at least 16 printable ASCII characters, without spaces",
            );
            check(
                b.tokens[..i].iter().all(|other| other.token != entry.token),
                &format!("{at}.token"),
                "is listed twice",
            );
            check(
                !entry.tenant.trim().is_empty(),
                &format!("{at}.tenant"),
                "must not be empty",
            );
            check(
                entry.session_prefix.is_empty()
                    || byclaw_protocol::is_safe_id(&entry.session_prefix),
                &format!("{at}.session_prefix"),
                "must be a plain id prefix (letters, digits, - _ . : @)",
            );
            check(
                entry
                    .max_streams
                    .is_none_or(|n| (1..=1_000_000).contains(&n)),
                &format!("{at}.max_streams"),
                "must be between 1 and 1000000",
            );
            check(
                entry
                    .messages_per_s
                    .is_none_or(|n| (1..=1_000_000).contains(&n)),
                &format!("{at}.messages_per_s"),
                "must be between 1 and 1000000",
            );
            // The limits are the tenant's: its tokens must agree on them.
            let disagrees = b.tokens[..i].iter().any(|other| {
                other.tenant == entry.tenant
                    && (other.max_streams != entry.max_streams
                        || other.messages_per_s != entry.messages_per_s)
            });
            check(
                !disagrees,
                &format!("{at}.max_streams"),
                "another token of this tenant sets different limits (max_streams, messages_per_s); they are the tenant's",
            );
            // Tenants apart: no session may belong to two of them.
            let overlaps = b.tokens[..i].iter().any(|other| {
                other.tenant != entry.tenant
                    && (other.session_prefix.starts_with(&entry.session_prefix)
                        || entry.session_prefix.starts_with(&other.session_prefix))
            });
            check(
                !overlaps,
                &format!("{at}.session_prefix"),
                "overlaps the prefix of another tenant, whose sessions it would reach",
            );
        }
    }
}
