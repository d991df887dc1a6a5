//! Outbound HTTP for plugins (`wasi:http/outgoing-handler`): denied unless
//! the plugin's `allowed_outbound_hosts` lets the request's scheme, host and
//! port through. Patterns are written as Spin writes them:
//! `https://api.example.com`, `http://127.0.0.1:8080`, `https://*.example.com`,
//! `*://example.com:*`, `http://localhost:*`; a missing port means the
//! scheme's default (80, 443).

use std::sync::Arc;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// `http`, `https`, or `None` for any.
    scheme: Option<String>,
    /// `None` for any host; a leading `*.` allows subdomains.
    host: Option<String>,
    /// `None` for any port.
    port: Option<u16>,
}

/// A plugin's allow-list; empty denies everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundHosts {
    patterns: Vec<Pattern>,
}

impl OutboundHosts {
    /// Parses patterns; the error names the first bad one and why.
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        let mut parsed = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            parsed.push(parse_pattern(pattern).map_err(|why| format!("{pattern:?}: {why}"))?);
        }
        Ok(OutboundHosts { patterns: parsed })
    }

    /// Whether a request to `scheme://host:port` may go out.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.patterns.iter().any(|p| {
            p.scheme.as_deref().is_none_or(|s| s == scheme)
                && p.port.is_none_or(|allowed| allowed == port)
                && p.host
                    .as_deref()
                    .is_none_or(|allowed| match allowed.strip_prefix("*.") {
                        Some(domain) => host.ends_with(&format!(".{domain}")),
                        None => allowed == host,
                    })
        })
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

fn parse_pattern(pattern: &str) -> Result<Pattern, &'static str> {
    let (scheme, rest) = pattern
        .split_once("://")
        .ok_or("expected scheme://host[:port], e.g. https://api.example.com")?;
    let scheme = match scheme {
        "*" => None,
        "http" | "https" => Some(scheme.to_owned()),
        _ => return Err("the scheme must be http, https or *"),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') {
        return Err("a path is not allowed here");
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => (host, Some(port)),
        _ => (rest, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the host is empty");
    }
    let port = match port {
        Some("*") => None,
        Some(port) => Some(
            port.parse::<u16>()
                .map_err(|_| "the port must be a number or *")?,
        ),
        None => match scheme.as_deref() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => return Err("with scheme * the port must be given (a number or *)"),
        },
    };
    Ok(Pattern {
        scheme,
        host: (host != "*").then(|| host.to_ascii_lowercase()),
        port,
    })
}

/// The hooks of one store: requests outside the allow-list are answered
/// `HTTP request denied` before any connection is made.
pub struct OutboundPolicy {
    pub allowed: Arc<OutboundHosts>,
    /// For the log line of a denied request.
    pub plugin: Arc<str>,
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<WasiBody>,
                        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                    ),
                    HttpError,
                >,
            > + Send,
    > {
        drop(fut);
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_owned();
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "http" { 80 } else { 443 });
        if !self.allowed.allows(&scheme, &host, port) {
            tracing::warn!(plugin = %self.plugin, %scheme, %host, port, "outbound HTTP request denied (not in allowed_outbound_hosts)");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::OutboundHosts;

    fn hosts(patterns: &[&str]) -> OutboundHosts {
        OutboundHosts::parse(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn patterns_allow_what_they_name_and_nothing_else() {
        let allowed = hosts(&[
            "https://api.example.com",
            "http://127.0.0.1:8080",
            "https://*.models.test",
            "*://any-port.test:*",
        ]);
        assert!(allowed.allows("https", "api.example.com", 443));
        assert!(allowed.allows("https", "API.example.com", 443));
        assert!(!allowed.allows("http", "api.example.com", 80));
        assert!(!allowed.allows("https", "api.example.com", 8443));
        assert!(allowed.allows("http", "127.0.0.1", 8080));
        assert!(!allowed.allows("http", "127.0.0.1", 8081));
        assert!(allowed.allows("https", "eu.models.test", 443));
        assert!(!allowed.allows("https", "models.test", 443));
        assert!(allowed.allows("http", "any-port.test", 1234));
        assert!(!OutboundHosts::default().allows("https", "api.example.com", 443));
    }

    #[test]
    fn bad_patterns_say_why() {
        for (bad, why) in [
            ("api.example.com", "expected scheme://host"),
            ("ftp://x", "scheme must be http, https or *"),
            ("https://x/path", "a path is not allowed"),
            ("https://x:port", "port must be a number or *"),
            ("*://x", "port must be given"),
        ] {
            let error = OutboundHosts::parse(&[bad.to_owned()]).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
