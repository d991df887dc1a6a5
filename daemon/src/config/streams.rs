//! `[streams]`: lifetime and size of the streams we write, and the event writer.

use super::*;

/// `[streams]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// EXPIRE of session data streams and registries, seconds (reference: 7 days).
    pub session_ttl_s: u64,
    /// Approximate MAXLEN of session data streams; 0 keeps everything.
    pub session_maxlen: u64,
    /// XDEL control entries once acked, so control streams do not grow forever.
    pub delete_acked: bool,
    /// How often each capability stream served here is trimmed of what
    /// every consumer group has read and acknowledged (entries Python
    /// workers ack without deleting), milliseconds; 0: never.
    pub trim_interval_ms: u64,
    /// Most entries kept in each capability stream served here, read or
    /// not; past it the oldest are trimmed (tasks nobody ran are lost, and
    /// counted). 0: no cap, only consumed entries are trimmed.
    pub control_maxlen: u64,
    /// Approximate MAXLEN of the dead-letter stream; 0 keeps everything.
    pub dead_letter_maxlen: u64,
    /// Bound of each event-writer queue, in batches; a full queue slows emitting plugins.
    pub writer_queue: usize,
    /// Most writes in one pipeline.
    pub writer_batch: usize,
    /// Most bytes of writes queued or in flight (all lanes); past it,
    /// whoever writes waits: a plugin emitting big events is slowed to
    /// Redis' pace instead of growing the daemon.
    pub writer_queue_bytes: usize,
}

impl StreamsConfig {
    /// `session_ttl_s`.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_s)
    }

    /// `trim_interval_ms`; `None` when trimming is off.
    pub fn trim_interval(&self) -> Option<Duration> {
        (self.trim_interval_ms > 0).then(|| Duration::from_millis(self.trim_interval_ms))
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            session_ttl_s: 604_800,
            session_maxlen: 10_000,
            delete_acked: true,
            trim_interval_ms: 60_000,
            control_maxlen: 0,
            dead_letter_maxlen: 100_000,
            writer_queue: 8192,
            writer_batch: 512,
            writer_queue_bytes: 64 << 20,
        }
    }
}
