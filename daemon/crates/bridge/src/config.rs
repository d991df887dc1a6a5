//! `[bridge]` of the daemon's configuration: where the bridge listens, who
//! may call it, and the limits of its event streams.

use serde::{Deserialize, Serialize};
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
