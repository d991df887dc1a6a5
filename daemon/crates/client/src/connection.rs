//! Connections to the gateway's Redis, the same for every program that
//! talks to it: reconnecting, multiplexed, with timeouts.

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// Opens a reconnecting, multiplexed connection. `response_timeout` must
/// exceed the BLOCK time of any blocking read made on it.
pub async fn connect(
    url: &str,
    response_timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
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
