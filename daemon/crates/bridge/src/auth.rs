//! Bearer tokens and tenants: who is calling, and which sessions it may
//! reach. A tenant owns the sessions whose id starts with its configured
//! prefix; the configuration keeps the prefixes of different tenants from
//! overlapping, so no session belongs to two of them.

use super::AppState;
use super::api::ApiError;
use crate::BridgeToken;
use axum::extract::FromRequestParts;
use http::request::Parts;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// The configured tokens.
pub struct Tokens {
    /// SHA-256 of each token, with its entry; empty when the bridge is open.
    /// Presented tokens are compared by digest: every comparison takes the
    /// same time whatever the length or the content of the guess.
    entries: Vec<([u8; 32], BridgeToken)>,
}

/// Who made a request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant; `None` when no token is configured (open bridge).
    pub tenant: Option<String>,
    /// Sessions it may reach start with this.
    pub session_prefix: String,
}

impl Tokens {
    /// Tokens from `[[bridge.tokens]]`.
    pub fn new(entries: &[BridgeToken]) -> Self {
        Tokens {
            entries: entries
                .iter()
                .map(|entry| (digest(&entry.token), entry.clone()))
                .collect(),
        }
    }

    /// The caller presenting `token` (`None` when the bridge is open).
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        if self.entries.is_empty() {
            return Ok(Caller {
                tenant: None,
                session_prefix: String::new(),
            });
        }
        let token = token.ok_or(ApiError::Unauthorized("a bearer token is required"))?;
        // Every entry is compared, each in constant time on fixed-length
        // digests, so the time taken tells nothing about the guess.
        let presented = digest(token);
        let mut found = None;
        for (known, entry) in &self.entries {
            if bool::from(known.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(ApiError::Unauthorized("the token is not valid"))?;
        Ok(Caller {
            tenant: Some(entry.tenant.clone()),
            session_prefix: entry.session_prefix.clone(),
        })
    }
}

impl Caller {
    /// `session_id` when it is a well-formed id this caller may reach.
    pub fn session<'a>(&self, session_id: &'a str) -> Result<&'a str, ApiError> {
        if !byclaw_protocol::is_safe_id(session_id) || session_id.len() > 128 {
            return Err(ApiError::BadRequest(format!(
                "session id {session_id:?} is not a plain id (1-128 of letters, digits, - _ . : @)"
            )));
        }
        if !session_id.starts_with(&self.session_prefix) {
            return Err(ApiError::Forbidden(format!(
                "session {session_id} does not belong to tenant {}",
                self.tenant.as_deref().unwrap_or_default()
            )));
        }
        Ok(session_id)
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `path` is an event stream, where a browser cannot send an
/// `Authorization` header (EventSource, WebSocket) and `?token=` is taken.
fn is_stream_path(path: &str) -> bool {
    path.starts_with("/v1/sessions/") && (path.ends_with("/events") || path.ends_with("/ws"))
}

/// The token of a request: `Authorization: Bearer ...`, else `?token=` on
/// the event streams only (browsers cannot set headers on an EventSource
/// or a WebSocket; anywhere else a token in the URL would only end up in
/// logs and histories).
fn presented_token(parts: &Parts) -> Result<Option<String>, ApiError> {
    if let Some(value) = parts.headers.get(http::header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::Unauthorized("the Authorization header is not text"))?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ))?;
        return Ok(Some(token.trim().to_owned()));
    }
    let Some(query) = parts.uri.query() else {
        return Ok(None);
    };
    let token = query_value(query, "token");
    if token.is_some() && !is_stream_path(parts.uri.path()) {
        return Err(ApiError::Unauthorized(
            "?token= is taken on /events and /ws only; send `Authorization: Bearer <token>`",
        ));
    }
    Ok(token)
}

/// The value of `name` in a query string, percent-decoded.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let hex = |byte: u8| (byte as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', high, low]) => hex(*high).zip(hex(*low)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = presented_token(parts)?;
        state.auth.caller(token.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(token: &str, tenant: &str, prefix: &str) -> BridgeToken {
        BridgeToken {
            token: token.into(),
            tenant: tenant.into(),
            session_prefix: prefix.into(),
            max_streams: None,
            messages_per_s: None,
        }
    }

    #[test]
    fn tokens_map_to_tenants_and_their_sessions() {
        let tokens = Tokens::new(&[
            token("aaaaaaaaaaaaaaaa", "a", "a-"),
            token("bbbbbbbbbbbbbbbb", "b", "b-"),
        ]);
        assert!(matches!(
            tokens.caller(None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            tokens.caller(Some("aaaaaaaaaaaaaaab")),
            Err(ApiError::Unauthorized(_))
        ));
        let a = tokens.caller(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert_eq!(a.tenant.as_deref(), Some("a"));
        assert_eq!(a.session("a-1").unwrap(), "a-1");
        assert!(matches!(a.session("b-1"), Err(ApiError::Forbidden(_))));
        assert!(matches!(a.session("a-/x"), Err(ApiError::BadRequest(_))));
        let open = Tokens::new(&[]).caller(None).unwrap();
        assert_eq!(open.session("anything").unwrap(), "anything");
    }

    #[test]
    fn a_token_in_the_query_is_taken_on_event_streams_only() {
        let parts = |uri: &str| http::Request::get(uri).body(()).unwrap().into_parts().0;
        let token = presented_token(&parts("/v1/sessions/s-1/events?token=abc")).unwrap();
        assert_eq!(token.as_deref(), Some("abc"));
        let token = presented_token(&parts("/v1/sessions/s-1/ws?after=0&token=abc")).unwrap();
        assert_eq!(token.as_deref(), Some("abc"));
        for uri in [
            "/v1/agents?token=abc",
            "/v1/sessions/s-1/messages?token=abc",
        ] {
            assert!(
                matches!(presented_token(&parts(uri)), Err(ApiError::Unauthorized(_))),
                "{uri}"
            );
        }
        assert_eq!(presented_token(&parts("/v1/agents")).unwrap(), None);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("after=0&token=a%2Bb+c", "token").as_deref(),
            Some("a+b c")
        );
        assert_eq!(query_value("after=1-0", "token"), None);
        assert_eq!(query_value("token=%zz%", "token").as_deref(), Some("%zz%"));
    }
}
