//! What each plugin's tasks get: memory cap, deadline, concurrency limit,
//! configuration values, outbound hosts, read-only directories, hook
//! budget — resolved from `[plugins]` and `[plugins.<id>]`, and replaced
//! whole when the configuration is reloaded.

use crate::config::{PluginPolicy, PluginsConfig};
use crate::outbound::OutboundHosts;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Limits applied to every store.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Cap on the sum of a store's linear memories, bytes.
    pub memory_bytes: usize,
    /// Wall-clock budget of one task, host calls included.
    pub deadline: Duration,
    /// Largest event a guest may emit, bytes of JSON.
    pub max_event_bytes: usize,
    /// Largest tool arguments a guest may pass, and largest tool result it
    /// may get back, bytes of JSON (`plugins.max_result_bytes`): checked
    /// before anything proportional to the size is done with them.
    pub max_tool_bytes: usize,
    /// What one store's guest may write to the daemon's log.
    pub guest_log: crate::output::OutputLimits,
    /// Budget of the linear memory of all stores together, bytes; past it
    /// new tasks wait to start. 0: none (`worker.memory_budget_mb`).
    pub memory_budget_bytes: usize,
    /// Threads of the runtime guest code runs on; 0: one per CPU.
    pub guest_threads: usize,
}

/// What the tasks of one plugin get (`[plugins.<id>]`, else `[plugins]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Memory cap of one of its stores, bytes.
    pub memory_bytes: usize,
    /// Wall-clock budget of one of its tasks.
    pub deadline: Duration,
    /// CPU time one of its tasks may use (`cpu_ms`); `None`: no limit.
    pub cpu_budget: Option<Duration>,
    /// Bounds its tasks in progress; shared by every version of the plugin.
    pub concurrency: Option<Arc<tokio::sync::Semaphore>>,
    /// What `get-config(key)` answers.
    pub config: Arc<std::collections::BTreeMap<String, String>>,
    /// Where its HTTP requests may go.
    pub outbound: Arc<OutboundHosts>,
    /// Host directories it sees read-only: (host path, guest path).
    pub read_only_dirs: Arc<[(PathBuf, String)]>,
    /// Budget of one lifecycle hook call.
    pub hook_timeout: Duration,
    /// Plugin ids whose code may call its tools; `None`: any.
    pub tool_callers: Option<Arc<[String]>>,
    /// Events one of its tasks may emit per second.
    pub events_per_s: u32,
}

impl Policy {
    /// Whether code of the plugin `caller` may call this plugin's tools.
    pub fn lets_call_tools(&self, caller: &str) -> bool {
        self.tool_callers
            .as_deref()
            .is_none_or(|callers| callers.iter().any(|c| c == caller))
    }
}

/// Resolves the policy of each plugin id.
#[derive(Debug)]
pub struct Policies {
    /// `[plugins]`: most tasks of one plugin (0: no limit of its own).
    default_concurrency: usize,
    /// `[plugins] memory_limit_mb`; `None`: the sandbox's limit.
    default_memory_bytes: Option<usize>,
    /// `[plugins.<id>]` tables.
    by_id: std::collections::BTreeMap<String, PluginPolicy>,
    /// `[plugins] allowed_outbound_hosts`.
    default_outbound: Vec<String>,
    /// `[plugins] read_only_dirs`.
    default_read_only: std::collections::BTreeMap<String, PathBuf>,
    /// `[plugins] hook_timeout_ms`.
    default_hook_timeout: Duration,
    /// `[plugins] deadline_s`; `None`: the sandbox's deadline.
    default_deadline: Option<Duration>,
    /// `[plugins] max_events_per_s`.
    default_events_per_s: u32,
    /// `[plugins] cpu_ms` (0: no limit).
    default_cpu_ms: u64,
    /// One semaphore per id with the limit it was made for, kept across
    /// versions of the plugin and across configuration reloads (a new
    /// limit gets a new semaphore; tasks holding the old one finish).
    semaphores: Arc<std::sync::Mutex<std::collections::HashMap<String, ConcurrencyLimit>>>,
}

/// A plugin's concurrency limit and the semaphore enforcing it.
#[derive(Debug)]
struct ConcurrencyLimit {
    limit: usize,
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl Default for Policies {
    /// `[plugins]`'s defaults, without `[plugins.<id>]` tables; memory
    /// capped by the sandbox's limit only.
    fn default() -> Self {
        Policies {
            default_memory_bytes: None,
            default_deadline: None,
            ..Policies::from_config(&PluginsConfig::default())
        }
    }
}

impl Policies {
    /// From the `[plugins]` configuration.
    pub fn from_config(config: &PluginsConfig) -> Self {
        Policies {
            default_concurrency: config.max_concurrency,
            default_memory_bytes: Some(config.memory_limit_bytes()),
            default_outbound: config.allowed_outbound_hosts.clone(),
            default_read_only: config.read_only_dirs.clone(),
            default_hook_timeout: Duration::from_millis(config.hook_timeout_ms),
            default_deadline: Some(config.deadline()),
            default_events_per_s: config.max_events_per_s,
            default_cpu_ms: config.cpu_ms,
            by_id: config.policy.clone(),
            semaphores: Default::default(),
        }
    }

    /// These policies, replacing `previous`: plugins whose concurrency
    /// limit stays keep their semaphore (and the tasks holding it count).
    pub fn succeeding(mut self, previous: &Policies) -> Self {
        self.semaphores = previous.semaphores.clone();
        self
    }

    /// The SHA-256 the plugin `id` is pinned to, if any.
    pub(crate) fn pinned_sha256(&self, id: &str) -> Option<&str> {
        self.by_id.get(id).and_then(|p| p.sha256.as_deref())
    }

    pub(crate) fn resolve(&self, id: &str, limits: &Limits) -> Policy {
        let own = self.by_id.get(id);
        let memory_bytes = own
            .and_then(|p| p.memory_limit_mb)
            .map_or(
                self.default_memory_bytes.unwrap_or(limits.memory_bytes),
                |mb| usize::try_from(mb << 20).unwrap_or(usize::MAX),
            )
            // The pool was sized for the largest cap configured at start.
            .min(limits.memory_bytes);
        let deadline = own.and_then(|p| p.deadline_s).map_or(
            self.default_deadline.unwrap_or(limits.deadline),
            Duration::from_secs,
        );
        let limit = own
            .and_then(|p| p.max_concurrency)
            .unwrap_or(self.default_concurrency);
        let concurrency = (limit > 0).then(|| {
            let mut semaphores = self
                .semaphores
                .lock()
                .expect("semaphores lock is never poisoned");
            let entry = semaphores
                .entry(id.to_owned())
                .or_insert_with(|| ConcurrencyLimit {
                    limit,
                    semaphore: Arc::new(tokio::sync::Semaphore::new(limit)),
                });
            if entry.limit != limit {
                *entry = ConcurrencyLimit {
                    limit,
                    semaphore: Arc::new(tokio::sync::Semaphore::new(limit)),
                };
            }
            entry.semaphore.clone()
        });
        let patterns = own
            .and_then(|p| p.allowed_outbound_hosts.as_deref())
            .unwrap_or(&self.default_outbound);
        // Checked when the configuration was loaded; a bad list denies all.
        let outbound = OutboundHosts::parse(patterns).unwrap_or_default();
        let read_only_dirs = own
            .and_then(|p| p.read_only_dirs.as_ref())
            .unwrap_or(&self.default_read_only)
            .iter()
            .map(|(guest, host)| (host.clone(), guest.clone()))
            .collect();
        let hook_timeout = own
            .and_then(|p| p.hook_timeout_ms)
            .map_or(self.default_hook_timeout, Duration::from_millis);
        Policy {
            read_only_dirs,
            hook_timeout,
            outbound: Arc::new(outbound),
            memory_bytes,
            deadline,
            concurrency,
            config: Arc::new(own.map(|p| p.config.clone()).unwrap_or_default()),
            tool_callers: own.and_then(|p| p.tool_callers.as_deref()).map(Arc::from),
            events_per_s: own
                .and_then(|p| p.max_events_per_s)
                .unwrap_or(self.default_events_per_s),
            cpu_budget: Some(own.and_then(|p| p.cpu_ms).unwrap_or(self.default_cpu_ms))
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        }
    }
}

/// Paces one task's events to its plugin's `max_events_per_s`: a burst of
/// one second's worth, then one event every `1 / rate`. A guest past it
/// waits in its emit call — nothing is dropped and nothing fails — so a
/// plugin emitting in a loop costs Redis and the daemon no more than its
/// rate, however fast its guest runs.
#[derive(Debug)]
pub(crate) struct EmitPace {
    per_s: f64,
    /// Events that may go now; negative: owed, each waits its turn.
    tokens: f64,
    refilled: std::time::Instant,
}

impl EmitPace {
    pub(crate) fn new(per_s: u32, now: std::time::Instant) -> Self {
        let per_s = f64::from(per_s.max(1));
        EmitPace {
            per_s,
            tokens: per_s,
            refilled: now,
        }
    }

    /// Takes the next event's turn: how long it must wait from `now`.
    pub(crate) fn next(&mut self, now: std::time::Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.per_s);
        self.refilled = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_s)
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_burst_goes_at_once_then_events_wait_their_turn() {
        let start = Instant::now();
        let mut pace = EmitPace::new(100, start);
        for _ in 0..100 {
            assert_eq!(pace.next(start), Duration::ZERO);
        }
        // The burst spent: the next ones are 10 ms apart.
        let waits: Vec<u128> = (0..3).map(|_| pace.next(start).as_millis()).collect();
        assert_eq!(waits, [10, 20, 30]);
        // A second later the three owed are paid and 97 events are free.
        let later = start + Duration::from_secs(1);
        for _ in 0..97 {
            assert_eq!(pace.next(later), Duration::ZERO);
        }
        assert!(pace.next(later) > Duration::ZERO);
        // Idle never earns more than the burst.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..100 {
            assert_eq!(pace.next(much_later), Duration::ZERO);
        }
        assert!(pace.next(much_later) > Duration::ZERO);
    }
}
