//! How much a guest may write to the daemon's log: one budget per store (a
//! task, a hook call, a manifest read), shared by its stdout, stderr and
//! `runtime.log` — lines per second from a token bucket (bursts of one
//! second's worth) and bytes in all. What is over it is dropped and counted;
//! the count is logged once, when the store ends, and reported to the task's
//! port for the daemon's metrics. A plugin cannot fill the disk.

use crate::port::TaskPort;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// `plugins.guest_log_lines_per_s` and `plugins.guest_log_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    pub lines_per_s: u32,
    pub bytes: u64,
}

impl Default for OutputLimits {
    /// The configuration's defaults: 100 lines/s, 1 MiB.
    fn default() -> Self {
        OutputLimits {
            lines_per_s: 100,
            bytes: 1 << 20,
        }
    }
}

/// One store's budget.
pub struct OutputBudget {
    limits: OutputLimits,
    state: Mutex<Bucket>,
    /// Who writes, for the report at the end.
    plugin: Arc<str>,
    message_id: Arc<str>,
    /// Where the dropped lines are counted; `None` outside a task.
    port: Option<Arc<dyn TaskPort>>,
}

struct Bucket {
    /// Lines that may be written now.
    tokens: f64,
    /// When `tokens` was last topped up.
    at: Instant,
    /// Bytes left of the store's allowance.
    bytes_left: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl OutputBudget {
    pub fn new(
        limits: OutputLimits,
        plugin: Arc<str>,
        message_id: Arc<str>,
        port: Option<Arc<dyn TaskPort>>,
    ) -> Arc<Self> {
        Arc::new(OutputBudget {
            limits,
            state: Mutex::new(Bucket {
                tokens: f64::from(limits.lines_per_s),
                at: Instant::now(),
                bytes_left: limits.bytes,
                dropped_lines: 0,
                dropped_bytes: 0,
            }),
            plugin,
            message_id,
            port,
        })
    }

    /// Whether a line of `bytes` may be written; counts it as dropped if not.
    pub fn admit(&self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        let mut bucket = self
            .state
            .lock()
            .expect("output budget lock is never poisoned");
        let now = Instant::now();
        let rate = f64::from(self.limits.lines_per_s);
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 && bucket.bytes_left >= bytes {
            bucket.tokens -= 1.0;
            bucket.bytes_left -= bytes;
            true
        } else {
            bucket.dropped_lines += 1;
            bucket.dropped_bytes += bytes;
            false
        }
    }

    /// Lines dropped so far.
    pub fn dropped_lines(&self) -> u64 {
        self.state
            .lock()
            .expect("output budget lock is never poisoned")
            .dropped_lines
    }
}

impl Drop for OutputBudget {
    fn drop(&mut self) {
        let bucket = self
            .state
            .get_mut()
            .expect("output budget lock is never poisoned");
        if bucket.dropped_lines == 0 {
            return;
        }
        tracing::warn!(
            plugin = %self.plugin,
            message_id = %self.message_id,
            dropped_lines = bucket.dropped_lines,
            dropped_bytes = bucket.dropped_bytes,
            lines_per_s = self.limits.lines_per_s,
            bytes = self.limits.bytes,
            "guest output over its budget was dropped (plugins.guest_log_lines_per_s, plugins.guest_log_bytes)"
        );
        if let Some(port) = &self.port {
            port.guest_output_dropped(bucket.dropped_lines);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(lines_per_s: u32, bytes: u64) -> Arc<OutputBudget> {
        OutputBudget::new(
            OutputLimits { lines_per_s, bytes },
            Arc::from("p@1"),
            Arc::from("m"),
            None,
        )
    }

    #[test]
    fn a_burst_past_the_rate_is_dropped_and_counted() {
        let budget = budget(10, 1 << 20);
        let admitted = (0..1000).filter(|_| budget.admit(10)).count();
        // One second's worth at once (a little more if the loop was slow).
        assert!((10..=11).contains(&admitted), "{admitted}");
        assert_eq!(budget.dropped_lines(), 1000 - admitted as u64);
    }

    #[test]
    fn the_byte_allowance_is_for_the_whole_store() {
        let budget = budget(100_000, 100);
        assert!(budget.admit(60));
        assert!(!budget.admit(60), "over the bytes left");
        assert!(budget.admit(40));
        assert!(!budget.admit(1));
        assert_eq!(budget.dropped_lines(), 2);
    }
}
