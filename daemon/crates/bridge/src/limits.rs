//! Per-tenant limits: how many event streams one tenant may hold open and
//! how many messages per second it may send, so that one tenant cannot take
//! every stream (`bridge.max_streams` is for the whole bridge) or flood the
//! agents. Past a limit the caller gets 429 with a `Retry-After`.
//!
//! The tenants are known from the configuration, so the table is built
//! once and never grows. An open bridge (no tokens, loopback only) has one
//! user and no per-tenant limits.

use super::api::ApiError;
use super::auth::Caller;
use crate::BridgeConfig;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One tenant's allowances.
struct Tenant {
    /// Its open event streams.
    streams: Arc<Semaphore>,
    /// `max_streams`, for the refusal's message.
    max_streams: usize,
    /// Its messages (ASK_AGENT and RESUME).
    messages: DefaultDirectRateLimiter,
    /// `messages_per_s`, for the refusal's message.
    messages_per_s: u32,
}

/// The allowances of every configured tenant.
pub struct TenantLimits {
    by_tenant: HashMap<String, Tenant>,
}

impl TenantLimits {
    /// The tenants of `[[bridge.tokens]]`, each with its own limits or the
    /// bridge's `tenant_max_streams` / `tenant_messages_per_s`.
    pub fn new(config: &BridgeConfig) -> Self {
        let mut by_tenant = HashMap::new();
        for token in &config.tokens {
            by_tenant.entry(token.tenant.clone()).or_insert_with(|| {
                let max_streams = token.max_streams.unwrap_or(config.tenant_max_streams);
                let messages_per_s = token.messages_per_s.unwrap_or(config.tenant_messages_per_s);
                let rate = NonZeroU32::new(messages_per_s).unwrap_or(NonZeroU32::MIN);
                Tenant {
                    streams: Arc::new(Semaphore::new(max_streams)),
                    max_streams,
                    messages: RateLimiter::direct(Quota::per_second(rate)),
                    messages_per_s,
                }
            });
        }
        TenantLimits { by_tenant }
    }

    fn of<'a>(&'a self, caller: &'a Caller) -> Option<(&'a str, &'a Tenant)> {
        let tenant = caller.tenant.as_deref()?;
        self.by_tenant.get(tenant).map(|limits| (tenant, limits))
    }

    /// One of the caller's tenant's streams, held while the stream is open;
    /// `None` when the caller has no tenant limits (an open bridge).
    pub fn stream(&self, caller: &Caller) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let Some((tenant, limits)) = self.of(caller) else {
            return Ok(None);
        };
        match limits.streams.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(ApiError::TooManyRequests {
                reason: format!(
                    "tenant {tenant} has {} event streams open, its limit (bridge.tenant_max_streams); close one first",
                    limits.max_streams
                ),
                retry_after_s: 1,
            }),
        }
    }

    /// Counts one message of the caller's tenant against its rate.
    pub fn message(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some((tenant, limits)) = self.of(caller) else {
            return Ok(());
        };
        limits.messages.check().map_err(|not_until| {
            use governor::clock::{Clock as _, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ApiError::TooManyRequests {
                reason: format!(
                    "tenant {tenant} sends more than {} messages per second (bridge.tenant_messages_per_s)",
                    limits.messages_per_s
                ),
                retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BridgeToken;

    fn caller(tenant: &str) -> Caller {
        Caller {
            tenant: Some(tenant.into()),
            session_prefix: format!("{tenant}-"),
        }
    }

    #[test]
    fn each_tenant_has_its_own_streams_and_rate() {
        let config = BridgeConfig {
            tokens: vec![
                BridgeToken {
                    token: "a".repeat(16),
                    tenant: "a".into(),
                    session_prefix: "a-".into(),
                    max_streams: Some(1),
                    messages_per_s: Some(2),
                },
                BridgeToken {
                    token: "b".repeat(16),
                    tenant: "b".into(),
                    session_prefix: "b-".into(),
                    max_streams: None,
                    messages_per_s: None,
                },
            ],
            tenant_max_streams: 3,
            tenant_messages_per_s: 5,
            ..BridgeConfig::default()
        };
        let limits = TenantLimits::new(&config);
        let held = limits.stream(&caller("a")).unwrap();
        assert!(held.is_some());
        let refused = limits.stream(&caller("a")).unwrap_err();
        assert!(
            matches!(refused, ApiError::TooManyRequests { .. }),
            "{refused}"
        );
        // Another tenant is not held up by the first.
        let b: Vec<_> = (0..3)
            .map(|_| limits.stream(&caller("b")).unwrap())
            .collect();
        assert!(limits.stream(&caller("b")).is_err());
        drop(held);
        assert!(limits.stream(&caller("a")).unwrap().is_some());
        drop(b);

        assert!(limits.message(&caller("a")).is_ok());
        assert!(limits.message(&caller("a")).is_ok());
        match limits.message(&caller("a")) {
            Err(ApiError::TooManyRequests { retry_after_s, .. }) => assert!(retry_after_s >= 1),
            other => panic!("a third message within a second: {other:?}"),
        }
        assert!(limits.message(&caller("b")).is_ok());
        // An open bridge's caller has no tenant limits.
        let open = Caller {
            tenant: None,
            session_prefix: String::new(),
        };
        assert!(limits.stream(&open).unwrap().is_none());
        assert!(limits.message(&open).is_ok());
    }
}
