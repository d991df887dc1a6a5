//! What a browser may do with the bridge. Any page the user opens can
//! send requests to a bridge it can reach (a loopback one included), and a
//! DNS-rebinding page can make them look same-origin. Two checks stop
//! both, before any handler runs:
//!
//! - **Host.** On a loopback bridge with no `bridge.allowed_hosts`, the
//!   `Host` header must name a loopback address (`localhost`, `127.0.0.1`,
//!   `[::1]`): a rebinding page's requests carry its own name. With
//!   `allowed_hosts`, the name must be one of them.
//! - **Origin.** A request that carries `Origin` (every browser WebSocket
//!   handshake, every cross-origin request) must come from the bridge's own
//!   origin or one listed in `bridge.allowed_origins`. Requests without it
//!   (curl, servers, a same-origin EventSource) are not from another page.
//!
//! CORS answers (`Access-Control-Allow-*`) are given to the listed origins
//! only ([`cors`]); with none listed, there are none.

use super::api::ApiError;
use crate::BridgeConfig;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use std::net::IpAddr;
use std::sync::Arc;

/// The browser rules of one bridge, from `[bridge]`.
#[derive(Debug, Clone)]
pub struct BrowserGuard {
    /// `bridge.allowed_hosts`, lower case; empty: see `loopback_only`.
    allowed_hosts: Vec<String>,
    /// `Host` must be a loopback name (the bridge listens on loopback and
    /// no `allowed_hosts` are set).
    loopback_only: bool,
    /// `bridge.allowed_origins`, without a trailing `/`.
    allowed_origins: Vec<String>,
}

impl BrowserGuard {
    /// The rules of `config`.
    pub fn new(config: &BridgeConfig) -> Self {
        BrowserGuard {
            allowed_hosts: config
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            loopback_only: config.allowed_hosts.is_empty() && config.listen.ip().is_loopback(),
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_owned())
                .collect(),
        }
    }

    /// Why a request with these `Host` and `Origin` headers is refused.
    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), String> {
        if let Some(host) = host {
            let name = host_name(host).to_ascii_lowercase();
            let allowed = if !self.allowed_hosts.is_empty() {
                self.allowed_hosts.contains(&name)
            } else if self.loopback_only {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            } else {
                true
            };
            if !allowed {
                return Err(format!(
                    "host {name:?} is not allowed (bridge.allowed_hosts; a loopback bridge answers loopback names only)"
                ));
            }
        }
        if let Some(origin) = origin {
            let origin = origin.trim_end_matches('/');
            let same_origin = host.is_some_and(|host| {
                origin
                    .strip_prefix("http://")
                    .or_else(|| origin.strip_prefix("https://"))
                    .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
            });
            if !same_origin && !self.allowed_origins.iter().any(|o| o == origin) {
                return Err(format!(
                    "origin {origin:?} is not allowed (bridge.allowed_origins)"
                ));
            }
        }
        Ok(())
    }
}

/// The host name of a `Host` header value (`name`, `name:port`,
/// `[v6]:port`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The middleware: refuses with 403 what [`BrowserGuard::check`] refuses.
pub async fn enforce(
    State(guard): State<Arc<BrowserGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let refused = {
        let header = |name: http::header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
        };
        // HTTP/2 puts the host in the URI instead.
        let host =
            header(http::header::HOST).or_else(|| request.uri().authority().map(|a| a.as_str()));
        guard.check(host, header(http::header::ORIGIN)).err()
    };
    if let Some(why) = refused {
        tracing::warn!(reason = %why, path = %request.uri().path(), "bridge request refused");
        return ApiError::Forbidden(why).into_response();
    }
    next.run(request).await
}

/// CORS for `bridge.allowed_origins`; `None` when none is listed.
pub fn cors(config: &BridgeConfig) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<http::HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| http::HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([http::Method::GET, http::Method::POST])
            .allow_headers([
                http::header::AUTHORIZATION,
                http::header::CONTENT_TYPE,
                http::HeaderName::from_static("last-event-id"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(tweak: impl FnOnce(&mut BridgeConfig)) -> BrowserGuard {
        let mut config = BridgeConfig::default();
        tweak(&mut config);
        BrowserGuard::new(&config)
    }

    #[test]
    fn a_loopback_bridge_answers_loopback_names_and_its_own_origin() {
        let open = guard(|_| {});
        assert!(open.check(Some("127.0.0.1:8780"), None).is_ok());
        assert!(open.check(Some("localhost:8780"), None).is_ok());
        assert!(open.check(Some("[::1]:8780"), None).is_ok());
        assert!(open.check(None, None).is_ok());
        // A rebinding page: its name, resolving to 127.0.0.1.
        assert!(open.check(Some("evil.example:8780"), None).is_err());
        assert!(
            open.check(Some("127.0.0.1:8780"), Some("http://127.0.0.1:8780"))
                .is_ok()
        );
        assert!(
            open.check(Some("127.0.0.1:8780"), Some("http://evil.example"))
                .is_err()
        );
        assert!(open.check(Some("127.0.0.1:8780"), Some("null")).is_err());
    }

    #[test]
    fn listed_hosts_and_origins_are_let_in() {
        let listed = guard(|c| {
            c.listen = ([0, 0, 0, 0], 8780).into();
            c.allowed_hosts = vec!["Gateway.Example.com".into()];
            c.allowed_origins = vec!["https://app.example.com/".into()];
        });
        assert!(listed.check(Some("gateway.example.com"), None).is_ok());
        assert!(listed.check(Some("127.0.0.1:8780"), None).is_err());
        assert!(
            listed
                .check(Some("gateway.example.com"), Some("https://app.example.com"))
                .is_ok()
        );
        assert!(
            listed
                .check(
                    Some("gateway.example.com"),
                    Some("https://other.example.com")
                )
                .is_err()
        );
        // A public bridge without allowed_hosts takes any name.
        let public = guard(|c| c.listen = ([0, 0, 0, 0], 8780).into());
        assert!(public.check(Some("anything.example"), None).is_ok());
    }
}
