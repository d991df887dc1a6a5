//! `[history]`: where session history is kept and how it is written.

use super::*;

/// `[history]`: the store of session messages (see [`crate::history`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Which store: Redis (shared by every worker of the cluster), the
    /// reference's PostgreSQL table, or none.
    pub backend: HistoryBackend,
    /// Redis: newest entries kept per session; older ones are trimmed.
    pub max_entries: usize,
    /// Redis: EXPIRE of a session's history list, refreshed on every write, seconds.
    pub ttl_s: u64,
    /// Most entries injected into a task as `extra_payload.history`.
    pub inject_limit: usize,
    /// Most bytes of one task's streamed reply kept as its history entry;
    /// the rest is left out and the entry's metadata says `truncated`.
    pub max_entry_bytes: usize,
    /// Bound of the write queue, in entries; when full, entries are dropped
    /// (counted and logged) rather than slowing a task down.
    pub queue: usize,
    /// Most entries written in one round trip (pipeline or INSERT).
    pub write_batch: usize,
    /// Deadline of one write attempt, milliseconds.
    pub write_timeout_ms: u64,
    /// Attempts at one batch before its entries are dropped (counted and logged).
    pub write_attempts: u32,
    /// First wait between attempts, milliseconds; doubled each time, at most 5 s.
    pub write_backoff_ms: u64,
    /// Deadline of one read, milliseconds; a read that fails or is late
    /// yields no history (counted and logged), never a failed task.
    pub read_timeout_ms: u64,
    /// PostgreSQL connection string (URL or `key=value` form); required by
    /// the postgres backend. Reference name: BYAI_HISTORY_PG_DSN.
    pub postgres_dsn: Option<String>,
    /// Most pooled PostgreSQL connections.
    pub postgres_pool: usize,
    /// With `sslmode=require` in the DSN: PEM file of the CA(s) that sign
    /// the server's certificate (else the Mozilla roots). The certificate
    /// and the host name are always checked.
    pub postgres_ca_file: Option<PathBuf>,
}

impl HistoryConfig {
    /// `ttl_s`.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    /// `write_timeout_ms`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `write_backoff_ms`.
    pub fn write_backoff(&self) -> Duration {
        Duration::from_millis(self.write_backoff_ms)
    }

    /// `read_timeout_ms`.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            backend: HistoryBackend::Redis,
            max_entries: 200,
            ttl_s: 604_800,
            inject_limit: 10,
            max_entry_bytes: 256 * 1024,
            queue: 10_000,
            write_batch: 500,
            write_timeout_ms: 5000,
            write_attempts: 5,
            write_backoff_ms: 200,
            read_timeout_ms: 2000,
            postgres_dsn: None,
            postgres_pool: 8,
            postgres_ca_file: None,
        }
    }
}

/// Where session history is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryBackend {
    /// A capped list per session in the Redis of the streams.
    Redis,
    /// The reference SDK's `gateway_session_messages` table.
    Postgres,
    /// Nothing is stored; tasks get no history.
    Off,
}
