//! What the daemon counts for operators, and its Prometheus exposition.
//!
//! Counters and histograms move where things happen (dispatch, the host
//! functions, the loops), only through the internal events of
//! `metrics/events.rs` (re-exported here), each of which also writes the
//! log line that explains it; the capability streams' lag, pending count
//! and oldest pending age are read from Redis when `/metrics` is scraped
//! (one pipelined round trip); lifecycle hook and history counts are read
//! from their own stats then. Labels are low-cardinality only: agent type,
//! plugin `id@version`, outcome, stream, host import — never a session or
//! message id.

mod events;

pub use events::*;

use byclaw_sandbox::{HookStats, HostImport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Label pairs of one series.
type Labels = Vec<(&'static str, String)>;

/// Upper bounds of the task duration buckets, seconds: from a 1 ms echo to
/// a 5-minute agent run.
const TASK_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 300.0,
];

/// Upper bounds of the host call duration buckets, seconds (an emit takes
/// microseconds; a call-agent waits for another agent).
const HOST_CALL_BUCKETS: [f64; 12] = [
    0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0, 10.0, 60.0,
];

/// How a task ended, for the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Completed,
    Failed,
    Cancelled,
}

impl TaskOutcome {
    fn name(self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Cancelled => "cancelled",
        }
    }
}

/// Where a Redis command failed, for the `operation` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOperation {
    /// XREADGROUP of the capability streams.
    Read,
    /// A pipelined write of events and outcomes.
    Write,
    /// XPENDING / XCLAIM of abandoned entries.
    Claim,
    /// The worker's control stream.
    Control,
    /// XINFO / XPENDING / XTRIM of capability streams.
    Trim,
}

impl RedisOperation {
    fn name(self) -> &'static str {
        match self {
            RedisOperation::Read => "read",
            RedisOperation::Write => "write",
            RedisOperation::Claim => "claim",
            RedisOperation::Control => "control",
            RedisOperation::Trim => "trim",
        }
    }
}

/// The consumer group's view of one capability stream, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamState {
    /// Entries not yet delivered to the group (`XINFO GROUPS` lag).
    pub lag: i64,
    /// Entries delivered and not acknowledged.
    pub pending: i64,
    /// Age of the oldest pending entry (from its id's timestamp), seconds.
    pub oldest_pending_s: f64,
}

/// Every metric of one daemon.
pub struct Metrics {
    registry: Registry,
    tasks_started: Family<Labels, Counter>,
    tasks_finished: Family<Labels, Counter>,
    task_duration: Family<Labels, Histogram>,
    tasks_in_flight: Gauge,
    dead_letters: Counter,
    claimed: Counter,
    /// Entries another worker took over while a task ran here.
    leases_lost: Counter,
    /// RESUMEs for a call already answered, acknowledged and dropped.
    duplicate_replies: Counter,
    /// Replies kept in their task's journal for its next run, nobody
    /// waiting for them now (their task's daemon died).
    journaled_replies: Counter,
    /// Tasks run again after another run of them stopped (a daemon died,
    /// an entry taken over).
    reruns: Counter,
    /// Entries skipped because their message runs from another entry (the
    /// message sent again by a caller run again after a crash).
    copies_skipped: Counter,
    /// Waiting tasks whose instance was dropped (`worker.evict_after_ms`).
    evictions: Counter,
    /// Tasks waiting now without an instance.
    tasks_suspended: Gauge,
    /// RESUMEs refused because they came from another session or tenant
    /// than the task they name.
    foreign_replies: Counter,
    /// Guest log lines over their task's budget, dropped.
    guest_log_dropped: Counter,
    plugin_loads: Family<Labels, Counter>,
    /// Tasks that waited to start because guest memory was past
    /// `worker.memory_budget_mb`.
    memory_budget_waits: Counter,
    /// Tool calls by calling plugin, tool's plugin and outcome
    /// (`called`, `refused`): who borrows whose tools.
    tool_calls: Family<Labels, Counter>,
    config_reloads: Family<Labels, Counter>,
    redis_errors: Family<Labels, Counter>,
    redis_reconnects: Counter,
    /// Per host import (indexed like [`HostImport::ALL`]): calls, duration.
    host_calls: Vec<(Counter, Histogram)>,
    /// Entries trimmed from capability streams, by stream and reason
    /// (`consumed`: every group read and acked them; `maxlen`: past
    /// `streams.control_maxlen`, read or not).
    control_trimmed: Family<Labels, Counter>,
    stream_lag: Family<Labels, Gauge>,
    stream_pending: Family<Labels, Gauge>,
    stream_oldest_pending: Family<Labels, Gauge<f64, AtomicU64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric (prefix `gatewayd_`); `hooks` and `history`
    /// are read at each scrape.
    pub fn new(hooks: Arc<HookStats>) -> Self {
        let mut registry = Registry::with_prefix("gatewayd");
        let tasks_started = Family::<Labels, Counter>::default();
        registry.register(
            "tasks_started",
            "Tasks started, by agent type and plugin version",
            tasks_started.clone(),
        );
        let tasks_finished = Family::<Labels, Counter>::default();
        registry.register(
            "tasks_finished",
            "Tasks ended, by agent type, plugin version and outcome (completed, failed, cancelled)",
            tasks_finished.clone(),
        );
        let task_duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(TASK_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "task_duration_seconds",
            "Task duration from start to outcome, by agent type and outcome",
            task_duration.clone(),
        );
        let tasks_in_flight = Gauge::default();
        registry.register(
            "tasks_in_flight",
            "Tasks running on this worker now",
            tasks_in_flight.clone(),
        );
        let dead_letters = Counter::default();
        registry.register(
            "dead_letters",
            "Entries moved to the dead-letter stream",
            dead_letters.clone(),
        );
        let claimed = Counter::default();
        registry.register(
            "claims",
            "Abandoned entries of other consumers taken over",
            claimed.clone(),
        );
        let leases_lost = Counter::default();
        registry.register(
            "leases_lost",
            "Entries another worker took over while a task of this worker ran them (that run stopped and wrote no outcome)",
            leases_lost.clone(),
        );
        let duplicate_replies = Counter::default();
        registry.register(
            "duplicate_replies",
            "Replies to a call or prompt already answered, acknowledged and dropped",
            duplicate_replies.clone(),
        );
        let journaled_replies = Counter::default();
        registry.register(
            "journaled_replies",
            "Replies to an unfinished task that is not waiting for them now, kept in its journal for its next run",
            journaled_replies.clone(),
        );
        let reruns = Counter::default();
        registry.register(
            "task_reruns",
            "Tasks run again from their journal after another run of them stopped",
            reruns.clone(),
        );
        let copies_skipped = Counter::default();
        registry.register(
            "message_copies_skipped",
            "Entries acknowledged and skipped because their message runs, or ran, from another entry (sent again by a caller run again after a crash)",
            copies_skipped.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "task_evictions",
            "Waiting tasks whose instance was dropped after worker.evict_after_ms; each is run again from its journal when its reply comes",
            evictions.clone(),
        );
        let tasks_suspended = Gauge::default();
        registry.register(
            "tasks_suspended",
            "Tasks waiting now without an instance (under worker.max_suspended)",
            tasks_suspended.clone(),
        );
        let foreign_replies = Counter::default();
        registry.register(
            "foreign_replies",
            "Replies refused because they came from another session or tenant than the task they name",
            foreign_replies.clone(),
        );
        let guest_log_dropped = Counter::default();
        registry.register(
            "guest_log_lines_dropped",
            "Lines plugins wrote to stdout, stderr or runtime.log past their task's budget, dropped",
            guest_log_dropped.clone(),
        );
        let memory_budget_waits = Counter::default();
        registry.register(
            "memory_budget_waits",
            "Tasks that waited to start because the plugins' memory was past worker.memory_budget_mb",
            memory_budget_waits.clone(),
        );
        let tool_calls = Family::<Labels, Counter>::default();
        registry.register(
            "tool_calls",
            "Tool calls by calling plugin (caller), the tool's plugin (plugin) and outcome (called, or refused by the tool's tool_callers)",
            tool_calls.clone(),
        );
        let plugin_loads = Family::<Labels, Counter>::default();
        registry.register(
            "plugin_loads",
            "Plugin files loaded (result=loaded) or rejected (result=failed), at start and by reloads",
            plugin_loads.clone(),
        );
        let config_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration file reloads, applied or rejected",
            config_reloads.clone(),
        );
        let redis_errors = Family::<Labels, Counter>::default();
        registry.register(
            "redis_errors",
            "Failed Redis commands, by operation",
            redis_errors.clone(),
        );
        let redis_reconnects = Counter::default();
        registry.register(
            "redis_reconnects",
            "Times reading worked again after Redis had failed",
            redis_reconnects.clone(),
        );
        let host_call_count = Family::<Labels, Counter>::default();
        registry.register(
            "host_calls",
            "Host function calls by plugins, by import",
            host_call_count.clone(),
        );
        let host_call_duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(HOST_CALL_BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "host_call_duration_seconds",
            "Host function call duration (waits included), by import",
            host_call_duration.clone(),
        );
        let host_calls = HostImport::ALL
            .iter()
            .map(|import| {
                let labels = vec![("import", import.name().to_owned())];
                (
                    host_call_count.get_or_create(&labels).clone(),
                    host_call_duration.get_or_create(&labels).clone(),
                )
            })
            .collect();
        let stream_lag = Family::<Labels, Gauge>::default();
        registry.register(
            "stream_lag",
            "Entries of a capability stream not yet read by the consumer group",
            stream_lag.clone(),
        );
        let stream_pending = Family::<Labels, Gauge>::default();
        registry.register(
            "stream_pending",
            "Entries of a capability stream read and not yet acknowledged (all consumers)",
            stream_pending.clone(),
        );
        let control_trimmed = Family::<Labels, Counter>::default();
        registry.register(
            "control_entries_trimmed",
            "Entries trimmed from capability streams, by stream and reason (consumed, maxlen)",
            control_trimmed.clone(),
        );
        let stream_oldest_pending = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "stream_oldest_pending_seconds",
            "Age of the oldest unacknowledged entry of a capability stream",
            stream_oldest_pending.clone(),
        );
        registry.register_collector(Box::new(HookCollector(hooks)));
        Metrics {
            registry,
            tasks_started,
            tasks_finished,
            task_duration,
            tasks_in_flight,
            dead_letters,
            claimed,
            leases_lost,
            duplicate_replies,
            journaled_replies,
            reruns,
            copies_skipped,
            evictions,
            tasks_suspended,
            foreign_replies,
            guest_log_dropped,
            plugin_loads,
            memory_budget_waits,
            tool_calls,
            config_reloads,
            redis_errors,
            redis_reconnects,
            host_calls,
            control_trimmed,
            stream_lag,
            stream_pending,
            stream_oldest_pending,
        }
    }

    /// A task started on `plugin` (`id@version`); the returned guard counts
    /// it in flight until [`TaskTimer::finish`] or drop (cut off: counted
    /// in flight only).
    pub fn task_started(self: &Arc<Self>, agent_type: &str, plugin: &str) -> TaskTimer {
        self.tasks_started
            .get_or_create(&vec![
                ("agent_type", agent_type.to_owned()),
                ("plugin", plugin.to_owned()),
            ])
            .inc();
        self.tasks_in_flight.inc();
        TaskTimer {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }

    fn task_finished(&self, agent_type: &str, plugin: &str, outcome: TaskOutcome, took: Duration) {
        self.tasks_finished
            .get_or_create(&vec![
                ("agent_type", agent_type.to_owned()),
                ("plugin", plugin.to_owned()),
                ("outcome", outcome.name().to_owned()),
            ])
            .inc();
        self.task_duration
            .get_or_create(&vec![
                ("agent_type", agent_type.to_owned()),
                ("outcome", outcome.name().to_owned()),
            ])
            .observe(took.as_secs_f64());
    }

    /// How many waiting tasks had their instance dropped so far.
    pub fn evictions_total(&self) -> u64 {
        self.evictions.get()
    }

    /// How many tasks wait without an instance now.
    pub fn tasks_suspended(&self) -> i64 {
        self.tasks_suspended.get()
    }

    /// How many tasks waited for the memory budget so far.
    pub fn memory_budget_waits_total(&self) -> u64 {
        self.memory_budget_waits.get()
    }

    /// How many tool calls `caller` made to `owner`'s tools with this outcome.
    pub fn tool_calls_total(&self, caller: &str, owner: &str, allowed: bool) -> u64 {
        self.tool_calls
            .get_or_create(&tool_call_labels(caller, owner, allowed))
            .get()
    }

    /// How many replies from another session or tenant were refused so far.
    pub fn foreign_replies_total(&self) -> u64 {
        self.foreign_replies.get()
    }

    /// How many guest log lines were dropped so far.
    pub fn guest_log_dropped_total(&self) -> u64 {
        self.guest_log_dropped.get()
    }

    /// How many leases were lost so far.
    pub fn leases_lost_total(&self) -> u64 {
        self.leases_lost.get()
    }

    /// How many tasks ran again from their journal so far.
    pub fn reruns_total(&self) -> u64 {
        self.reruns.get()
    }

    /// How many entries were skipped as copies of a message that runs
    /// from another entry.
    pub fn copies_skipped_total(&self) -> u64 {
        self.copies_skipped.get()
    }

    /// How many duplicate replies were dropped so far.
    pub fn duplicate_replies_total(&self) -> u64 {
        self.duplicate_replies.get()
    }

    /// How many plugin files loaded so far (at start and on reloads).
    pub fn plugins_loaded_total(&self) -> u64 {
        self.plugin_loads
            .get_or_create(&vec![("result", "loaded".to_owned())])
            .get()
    }

    /// How many plugin files failed to load so far.
    pub fn plugins_failed_total(&self) -> u64 {
        self.plugin_loads
            .get_or_create(&vec![("result", "failed".to_owned())])
            .get()
    }

    /// Replaces the stream gauges with what was just read (streams no
    /// longer served disappear).
    pub fn set_streams(&self, streams: &[(String, StreamState)]) {
        self.stream_lag.clear();
        self.stream_pending.clear();
        self.stream_oldest_pending.clear();
        for (stream, state) in streams {
            let labels = vec![("stream", stream.clone())];
            self.stream_lag.get_or_create(&labels).set(state.lag);
            self.stream_pending
                .get_or_create(&labels)
                .set(state.pending);
            self.stream_oldest_pending
                .get_or_create(&labels)
                .set(state.oldest_pending_s);
        }
    }

    /// The exposition, OpenMetrics text (which Prometheus reads).
    pub fn render(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The labels of a tool call's series.
fn tool_call_labels(caller: &str, owner: &str, allowed: bool) -> Labels {
    let outcome = if allowed { "called" } else { "refused" };
    vec![
        ("caller", caller.to_owned()),
        ("plugin", owner.to_owned()),
        ("outcome", outcome.to_owned()),
    ]
}

/// A task in flight; see [`Metrics::task_started`].
pub struct TaskTimer {
    metrics: Arc<Metrics>,
    started: Instant,
}

impl TaskTimer {
    /// The task ended with `outcome`.
    pub fn finish(self, agent_type: &str, plugin: &str, outcome: TaskOutcome) {
        self.metrics
            .task_finished(agent_type, plugin, outcome, self.started.elapsed());
    }
}

impl Drop for TaskTimer {
    fn drop(&mut self) {
        self.metrics.tasks_in_flight.dec();
    }
}

/// Lifecycle hook counts, read from [`HookStats`] at each scrape.
#[derive(Debug)]
struct HookCollector(Arc<HookStats>);

impl Collector for HookCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        if snapshot.is_empty() {
            return Ok(());
        }
        {
            let mut family = encoder.encode_descriptor(
                "gatewayd_hook_calls",
                "Lifecycle hook calls, by plugin version, hook and result (succeeded, failed, timed_out)",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (plugin, hook, counts) in &snapshot {
                for (result, value) in [
                    ("succeeded", counts.succeeded),
                    ("failed", counts.failed),
                    ("timed_out", counts.timed_out),
                ] {
                    let labels: Labels = vec![
                        ("plugin", plugin.clone()),
                        ("hook", hook.name().to_owned()),
                        ("result", result.to_owned()),
                    ];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "gatewayd_hook_duration_seconds",
            "Time spent in lifecycle hook calls, by plugin version and hook",
            None,
            ConstCounter::new(0f64).metric_type(),
        )?;
        for (plugin, hook, counts) in &snapshot {
            let labels: Labels = vec![("plugin", plugin.clone()), ("hook", hook.name().to_owned())];
            ConstCounter::new(counts.total_time.as_secs_f64())
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Counts one task in `gatewayd_tasks_suspended` while it lives.
pub struct SuspendedGuard(Gauge);

impl Drop for SuspendedGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::HostImport;

    #[test]
    fn host_imports_are_declared_in_the_order_of_all() {
        for (index, import) in HostImport::ALL.iter().enumerate() {
            assert_eq!(*import as usize, index, "{}", import.name());
        }
    }
}
