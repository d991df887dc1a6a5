//! Outbound HTTP for plugins (`wasi:http/outgoing-handler`): denied unless
//! the plugin's `allowed_outbound_hosts` lets the request's scheme, host and
//! port through. Patterns are written as Spin writes them:
//! `https://api.example.com`, `http://127.0.0.1:8080`, `https://*.example.com`,
//! `*://example.com:*`, `http://localhost:*`; a missing port means the
//! scheme's default (80, 443).
//!
//! A name is checked where it really goes: it is resolved here, addresses
//! inside the host's networks (loopback, private, link-local — the cloud
//! metadata service at 169.254.169.254 among them —, shared, multicast,
//! unspecified) are refused unless the pattern that let the request through
//! names that address (or `localhost`) literally, and the connection is
//! made to the address that was checked, so a name that resolves anew
//! (DNS rebinding) cannot swap it.
//!
//! Every allowed request of a task is numbered and its response kept for
//! the task's journal (see [`TaskPort::outbound_request`]): the body streams
//! to the guest as it comes and is copied aside (`kept.rs`); once the
//! guest has read it to its end it goes to the port. A run of the task
//! after another is given the kept response and sends nothing.

mod kept;

use crate::port::{Outbound, TaskPort};
use http_body_util::BodyExt as _;
use kept::{keeping, replay};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// How long a connection may take when the guest gave no timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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
        self.reach(scheme, host, port).is_some()
    }

    /// What a request to `scheme://host:port` may reach: `None` when no
    /// pattern lets it through.
    fn reach(&self, scheme: &str, host: &str, port: u16) -> Option<Reach> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let mut reach = None;
        for p in &self.patterns {
            let matches = p.scheme.as_deref().is_none_or(|s| s == scheme)
                && p.port.is_none_or(|allowed| allowed == port)
                && p.host
                    .as_deref()
                    .is_none_or(|allowed| match allowed.strip_prefix("*.") {
                        Some(domain) => host.ends_with(&format!(".{domain}")),
                        None => allowed == host,
                    });
            if !matches {
                continue;
            }
            // Only a pattern that names this very address lets it reach
            // inside the host's networks.
            let literal = p.host.as_deref() == Some(host.as_str())
                && (host == "localhost" || host.parse::<IpAddr>().is_ok());
            if literal {
                return Some(Reach::Internal);
            }
            reach = Some(Reach::Public);
        }
        reach
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

/// Where a request that passed the allow-list may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Public addresses only.
    Public,
    /// Any address: the pattern names it literally.
    Internal,
}

/// Whether `ip` lies inside the host's own networks (or is not a unicast
/// destination at all): loopback, private, link-local (the cloud metadata
/// service), shared address space, unspecified, broadcast, multicast,
/// reserved; IPv6 unique-local and site-local; IPv4 in IPv6 by its IPv4.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            // NAT64 (64:ff9b::/96) carries an IPv4 address in its low bits.
            if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [.., c, d] = v6.segments();
                let v4 = std::net::Ipv4Addr::from(((c as u32) << 16) | d as u32);
                return is_internal(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || (first & 0xffc0) == 0xfec0
        }
    }
}

/// The hooks of one store: requests outside the allow-list are answered
/// `HTTP request denied`, and names that lead inside the host's networks
/// `destination IP prohibited`, before any connection is made.
pub struct OutboundPolicy {
    pub allowed: Arc<OutboundHosts>,
    /// For the log line of a denied request.
    pub plugin: Arc<str>,
    /// Numbers each request that may go out and keeps its response for
    /// the task's journal, or gives the response a run before kept.
    pub port: Option<Arc<dyn TaskPort>>,
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
        let Some(reach) = self.allowed.reach(&scheme, &host, port) else {
            tracing::warn!(plugin = %self.plugin, %scheme, %host, port, "outbound HTTP request denied (not in allowed_outbound_hosts)");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        let method = request.method().to_string();
        let uri = request.uri().to_string();
        let journal = self.port.clone();
        let keep = match journal.as_ref().map(|j| j.outbound_request(&method, &uri)) {
            Some(Outbound::Kept(kept)) => return Box::new(async move { replay(kept) }),
            Some(Outbound::Mismatch(why)) => {
                tracing::warn!(plugin = %self.plugin, %method, %uri, %why, "outbound HTTP request refused: the run before this one sent another");
                return Box::new(async move { Err(HttpError::InternalError(Some(why))) });
            }
            Some(Outbound::Keep(n)) => journal.map(|journal| (journal, n)),
            Some(Outbound::Unkept) | None => None,
        };
        let plugin = self.plugin.clone();
        // A child of the task's span in traces (this future runs on a task
        // of its own, so it carries the span with it).
        let span = tracing::info_span!(
            "http-request",
            otel.kind = "client",
            http.request.method = %method,
            server.address = %host,
            server.port = port,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let recorded = span.clone();
        Box::new(tracing::Instrument::instrument(
            async move {
                let sent = async {
                    let addr = checked_address(&host, port, reach).await.inspect_err(|error| {
                    tracing::warn!(plugin = %plugin, %scheme, %host, port, ?error, "outbound HTTP request refused where it would go");
                })?;
                    let connect_timeout = options
                        .and_then(|o| o.connect_timeout)
                        .unwrap_or(CONNECT_TIMEOUT);
                    send_to(request, addr, &host, scheme == "https", connect_timeout).await
                };
                let result = match (sent.await, keep) {
                    (Ok(sent), None) => Ok(sent),
                    (Err(error), keep) => {
                        if let Some((journal, n)) = keep {
                            journal.outbound_response(n, None);
                        }
                        Err(error)
                    }
                    (Ok((response, connection)), Some((journal, n))) => {
                        Ok((keeping(response, method, uri, journal, n), connection))
                    }
                };
                result
                    .inspect(|(response, _)| {
                        recorded.record("http.response.status_code", response.status().as_u16());
                    })
                    .inspect_err(|_| {
                        recorded.record("otel.status_code", "ERROR");
                    })
            },
            span,
        ))
    }
}

/// The address to connect to for `host:port`: an IP literal as it is; a
/// name resolved here. Internal addresses only when `reach` allows them.
async fn checked_address(host: &str, port: u16, reach: Reach) -> Result<SocketAddr, HttpError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let candidates: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|_| HttpError::DnsError {
                rcode: None,
                info_code: None,
            })?
            .collect(),
    };
    if candidates.is_empty() {
        return Err(HttpError::DestinationNotFound);
    }
    candidates
        .into_iter()
        .find(|addr| reach == Reach::Internal || !is_internal(addr.ip()))
        .ok_or(HttpError::DestinationIpProhibited)
}

/// Sends `request` over a connection to `addr` (TLS for `host` when
/// `tls`): the address that was checked, never one resolved again.
async fn send_to(
    mut request: http::Request<WasiBody>,
    addr: SocketAddr,
    host: &str,
    tls: bool,
    connect_timeout: Duration,
) -> Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
> {
    use wasmtime_wasi_http::io::TokioIo;
    let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)?
        .map_err(HttpError::Connect)?;
    // The request line carries the path only (no proxy here).
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = path.parse().map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let (response, connection) = if tls {
        let server_name = rustls::pki_types::ServerName::try_from(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        )
        .map_err(|_| HttpError::DnsError {
            rcode: Some("invalid server name".to_owned()),
            info_code: None,
        })?;
        let stream = tls_connector()
            .connect(server_name, tcp)
            .await
            .map_err(HttpError::Tls)?;
        exchange(TokioIo::new(stream), request, connect_timeout).await?
    } else {
        exchange(TokioIo::new(tcp), request, connect_timeout).await?
    };
    Ok((
        response.map(|body| body.map_err(HttpError::from).boxed_unsync()),
        connection,
    ))
}

/// One HTTP/1 exchange on `io`: the response head, and the future that
/// ends with the connection (its body streams while that runs).
async fn exchange<T>(
    io: T,
    request: http::Request<WasiBody>,
    handshake_timeout: Duration,
) -> Result<
    (
        http::Response<hyper::body::Incoming>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>
where
    T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (mut sender, connection) =
        tokio::time::timeout(handshake_timeout, hyper::client::conn::http1::handshake(io))
            .await
            .map_err(|_| HttpError::ConnectionTimeout)??;
    // The connection runs beside the exchange; dropped (the guest gone),
    // it is aborted.
    let driver = crate::plugin::AbortOnDrop(tokio::spawn(connection));
    let response = sender.send_request(request).await?;
    Ok((
        response,
        Box::new(async move {
            let mut driver = driver;
            match (&mut driver.0).await {
                Ok(result) => result.map_err(HttpError::from),
                Err(_) => Err(HttpError::ConnectionTerminated),
            }
        }),
    ))
}

/// The TLS client of outbound requests: the Mozilla root certificates.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    });
    tokio_rustls::TlsConnector::from(config.clone())
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
    fn internal_addresses_need_a_pattern_that_names_them() {
        use super::{Reach, is_internal};
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:1.1.1.1",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
        let allowed = hosts(&[
            "http://127.0.0.1:8080",
            "https://*.example.com",
            "http://localhost:*",
            "*://*:*",
        ]);
        assert_eq!(
            allowed.reach("http", "127.0.0.1", 8080),
            Some(Reach::Internal)
        );
        assert_eq!(allowed.reach("http", "localhost", 9), Some(Reach::Internal));
        // A wildcard lets a name through, never to an internal address.
        assert_eq!(
            allowed.reach("https", "evil.example.com", 443),
            Some(Reach::Public)
        );
        assert_eq!(
            allowed.reach("http", "169.254.169.254", 80),
            Some(Reach::Public)
        );
    }

    #[tokio::test]
    async fn a_name_is_checked_by_the_addresses_it_resolves_to() {
        use super::{Reach, checked_address};
        use wasmtime_wasi_http::Error;
        // localhost resolves to loopback only.
        let refused = checked_address("localhost", 80, Reach::Public).await;
        assert!(
            matches!(refused, Err(Error::DestinationIpProhibited)),
            "{refused:?}"
        );
        let literal = checked_address("127.0.0.1", 80, Reach::Public).await;
        assert!(
            matches!(literal, Err(Error::DestinationIpProhibited)),
            "{literal:?}"
        );
        let named = checked_address("localhost", 80, Reach::Internal)
            .await
            .unwrap();
        assert!(named.ip().is_loopback());
        assert_eq!(
            checked_address("[::1]", 443, Reach::Internal)
                .await
                .unwrap(),
            "[::1]:443".parse().unwrap()
        );
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
