//! Things worth telling an operator, each one struct that writes its log
//! line and moves its counters in one call (vector's internal events), so
//! a count and the line that explains it cannot drift apart: the counters
//! of [`Metrics`] move nowhere else.
//!
//! Emit one with [`Metrics::emit`]; the log line takes the span it is
//! emitted in (a task's, a loop's), so its context comes along.

use super::{Metrics, RedisOperation, SuspendedGuard};
use byclaw_sandbox::HostImport;
use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

/// One thing that happened, logged and counted together.
pub trait InternalEvent {
    /// What emitting it hands back (a guard, for a state that lasts).
    type Output;

    /// Writes the log line and moves the counters.
    fn emit(self, metrics: &Metrics) -> Self::Output;
}

impl Metrics {
    /// Logs and counts `event`.
    pub fn emit<E: InternalEvent>(&self, event: E) -> E::Output {
        event.emit(self)
    }
}

/// A Redis command of a daemon loop failed; the loop retries.
pub struct RedisFailed<'a> {
    /// Which loop's command.
    pub operation: RedisOperation,
    /// What Redis or the connection said.
    pub error: &'a dyn Display,
}

impl InternalEvent for RedisFailed<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        let error = self.error;
        match self.operation {
            RedisOperation::Read => {
                tracing::warn!(%error, "reading capability streams failed; retrying")
            }
            RedisOperation::Claim => tracing::warn!(%error, "claiming abandoned entries failed"),
            RedisOperation::Trim => tracing::warn!(%error, "trimming a capability stream failed"),
            RedisOperation::Control => {
                tracing::warn!(%error, "reading the worker control stream failed; retrying")
            }
            RedisOperation::Write => tracing::warn!(%error, "writing to Redis failed"),
        }
        metrics
            .redis_errors
            .get_or_create(&vec![("operation", self.operation.name().to_owned())])
            .inc();
    }
}

/// Redis refused a lane's event pipeline as a whole (nothing applied);
/// the lane retries it after a backoff.
pub struct PipelineRefused<'a> {
    /// The writer lane.
    pub lane: usize,
    /// Writes in the pipeline.
    pub writes: usize,
    /// Tries so far.
    pub attempt: u32,
    /// What Redis said.
    pub error: &'a dyn Display,
}

impl InternalEvent for PipelineRefused<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::warn!(
            lane = self.lane,
            writes = self.writes,
            attempt = self.attempt,
            error = %self.error,
            "event pipeline not applied; retrying"
        );
        metrics
            .redis_errors
            .get_or_create(&vec![(
                "operation",
                RedisOperation::Write.name().to_owned(),
            )])
            .inc();
    }
}

/// Reading the capability streams works again after a failure.
pub struct RedisReadsAgain;

impl InternalEvent for RedisReadsAgain {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!("reading capability streams works again");
        metrics.redis_reconnects.inc();
    }
}

/// An abandoned entry (its consumer idle past `worker.claim_idle_ms`) was
/// taken over by this worker.
pub struct EntryTakenOver<'a> {
    /// The capability stream.
    pub stream: &'a str,
    /// The entry.
    pub entry_id: &'a str,
    /// The consumer that held it.
    pub from_consumer: &'a str,
    /// Deliveries so far, this one included.
    pub deliveries: u64,
}

impl InternalEvent for EntryTakenOver<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            stream = %self.stream,
            entry_id = %self.entry_id,
            from_consumer = %self.from_consumer,
            deliveries = self.deliveries,
            "took over an abandoned entry"
        );
        metrics.claimed.inc();
    }
}

/// Entries trimmed from a capability stream: consumed by every group, or
/// past its cap while unconsumed.
pub struct StreamTrimmed<'a> {
    /// The capability stream.
    pub stream: &'a str,
    /// Entries every group had consumed.
    pub consumed: u64,
    /// Entries cut because the stream was past `maxlen`, read or not.
    pub over_cap: u64,
    /// The cap (`streams.control_maxlen`).
    pub control_maxlen: u64,
}

impl InternalEvent for StreamTrimmed<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        let stream = self.stream;
        for (reason, count) in [("consumed", self.consumed), ("maxlen", self.over_cap)] {
            if count > 0 {
                metrics
                    .control_trimmed
                    .get_or_create(&vec![
                        ("stream", stream.to_owned()),
                        ("reason", reason.to_owned()),
                    ])
                    .inc_by(count);
            }
        }
        if self.over_cap > 0 {
            tracing::warn!(
                %stream,
                trimmed = self.over_cap,
                control_maxlen = self.control_maxlen,
                "capability stream past streams.control_maxlen; its oldest entries were trimmed, read or not"
            );
        } else if self.consumed > 0 {
            tracing::debug!(%stream, trimmed = self.consumed, "consumed entries trimmed");
        }
    }
}

/// Another worker took over an entry of ours.
pub enum LeaseLost<'a> {
    /// It was read here and still waiting for a permit: dropped.
    WhileQueued {
        /// The capability stream.
        stream: &'a str,
        /// The entry.
        entry_id: &'a str,
    },
    /// Its task was running: the run stopped, no outcome written.
    WhileRunning,
    /// Its task had ended here, but the outcome came too late to be
    /// written: the other run's stands.
    BeforeOutcome,
}

impl InternalEvent for LeaseLost<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        match self {
            LeaseLost::WhileQueued { stream, entry_id } => tracing::warn!(
                %stream,
                %entry_id,
                "another worker took over an entry waiting here; dropped"
            ),
            LeaseLost::WhileRunning => tracing::warn!(
                "another worker took the entry over; this run stopped and wrote no outcome"
            ),
            LeaseLost::BeforeOutcome => tracing::warn!(
                "another worker took the entry over before the outcome was written; nothing written, the other run's outcome stands"
            ),
        }
        metrics.leases_lost.inc();
    }
}

/// A reply was kept in its task's journal; its task is not waiting here.
pub struct ReplyJournaled<'a> {
    /// The task it answers.
    pub parent_message_id: &'a str,
    /// The reply's own message id.
    pub resume_id: &'a str,
}

impl InternalEvent for ReplyJournaled<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            parent_message_id = %self.parent_message_id,
            resume_id = %self.resume_id,
            "reply kept in its task's journal; the task is not waiting here"
        );
        metrics.journaled_replies.inc();
    }
}

/// A reply naming a task of another session or tenant was refused.
pub struct ReplyRefused<'a> {
    /// The task it names.
    pub parent_message_id: &'a str,
    /// The reply's own message id.
    pub resume_id: &'a str,
    /// The session it came from.
    pub session_id: &'a str,
    /// The tenant it came from.
    pub tenant_id: &'a str,
}

impl InternalEvent for ReplyRefused<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::warn!(
            parent_message_id = %self.parent_message_id,
            resume_id = %self.resume_id,
            session_id = %self.session_id,
            tenant_id = %self.tenant_id,
            "reply refused: it comes from another session or tenant than the task it names"
        );
        metrics.foreign_replies.inc();
    }
}

/// A reply nobody may take (a duplicate, a late answer, a reply to a
/// cancelled task or a call that timed out) was acknowledged and dropped.
pub struct ReplyDropped<'a> {
    /// The task it answers.
    pub parent_message_id: &'a str,
    /// The reply's own message id.
    pub resume_id: &'a str,
    /// Why nobody may take it.
    pub why: &'a str,
}

impl InternalEvent for ReplyDropped<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            parent_message_id = %self.parent_message_id,
            resume_id = %self.resume_id,
            why = self.why,
            "reply dropped"
        );
        metrics.duplicate_replies.inc();
    }
}

/// An entry was skipped: its message already runs from another entry (sent
/// again by a caller that ran again after its daemon died).
pub struct CopySkipped<'a> {
    /// The execution the message runs as.
    pub execution_id: &'a str,
    /// The entry it runs from.
    pub runs_from: &'a str,
}

impl InternalEvent for CopySkipped<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            execution_id = %self.execution_id,
            runs_from = %self.runs_from,
            "already running from another entry; this copy acknowledged and skipped"
        );
        metrics.copies_skipped.inc();
    }
}

/// A task runs again after another run of it stopped.
pub struct TaskRerun {
    /// Events the stopped runs had emitted (not emitted again).
    pub events_emitted: usize,
}

impl InternalEvent for TaskRerun {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::info!(
            events_emitted = self.events_emitted,
            "run again after another run stopped; replies from its journal, emitted events not repeated"
        );
        metrics.reruns.inc();
    }
}

/// A waiting task's instance was dropped; it waits without one until the
/// returned guard is dropped.
pub struct TaskEvicted {
    /// The calls it waits on.
    pub waits: usize,
}

impl InternalEvent for TaskEvicted {
    type Output = SuspendedGuard;

    fn emit(self, metrics: &Metrics) -> SuspendedGuard {
        tracing::debug!(
            waits = self.waits,
            "instance dropped while waiting; the task runs again when the reply comes"
        );
        metrics.evictions.inc();
        metrics.tasks_suspended.inc();
        SuspendedGuard(metrics.tasks_suspended.clone())
    }
}

/// An entry went to the dead-letter stream (written and acknowledged).
pub struct DeadLettered<'a> {
    /// The stream it came from.
    pub stream: &'a str,
    /// Its id there.
    pub entry_id: &'a str,
    /// How many times it was delivered.
    pub deliveries: u64,
    /// Why it cannot run.
    pub reason: &'a str,
}

impl InternalEvent for DeadLettered<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::warn!(
            stream = %self.stream,
            entry_id = %self.entry_id,
            deliveries = self.deliveries,
            reason = %self.reason,
            "entry dead-lettered"
        );
        metrics.dead_letters.inc();
    }
}

/// A task waited for `worker.memory_budget_mb` before it started.
pub struct MemoryBudgetWaited;

impl InternalEvent for MemoryBudgetWaited {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::debug!("waited for the memory budget before starting");
        metrics.memory_budget_waits.inc();
    }
}

/// A plugin loaded from its file (at start or on a reload).
pub struct PluginLoaded<'a> {
    /// `id@version`.
    pub plugin: &'a dyn Display,
    /// Its file.
    pub path: &'a Path,
}

impl InternalEvent for PluginLoaded<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::debug!(plugin = %self.plugin, path = %self.path.display(), "plugin loaded");
        metrics
            .plugin_loads
            .get_or_create(&vec![("result", "loaded".to_owned())])
            .inc();
    }
}

/// A plugin file did not load (at start or on a reload).
pub struct PluginRejected<'a> {
    /// Why, naming the file.
    pub error: &'a dyn Display,
}

impl InternalEvent for PluginRejected<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::error!(error = %self.error, "plugin file not loaded");
        metrics
            .plugin_loads
            .get_or_create(&vec![("result", "failed".to_owned())])
            .inc();
    }
}

/// The configuration file was read again and is invalid: the running
/// configuration stays.
pub struct ConfigRejected<'a> {
    /// The file.
    pub file: &'a Path,
    /// Every error found in it.
    pub errors: &'a dyn Display,
}

impl InternalEvent for ConfigRejected<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        tracing::error!(
            file = %self.file.display(),
            "configuration not reloaded; the running one stays:\n{}",
            self.errors
        );
        metrics
            .config_reloads
            .get_or_create(&vec![("result", "rejected".to_owned())])
            .inc();
    }
}

/// The configuration file was read again and what changed applied.
pub struct ConfigApplied<'a> {
    /// Keys applied now.
    pub live: &'a [String],
    /// Keys that take effect at the next restart.
    pub at_restart: &'a [String],
}

impl InternalEvent for ConfigApplied<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        if !self.live.is_empty() {
            tracing::info!(keys = ?self.live, "plugin policies reloaded; tasks started from now on get them");
        }
        if !self.at_restart.is_empty() {
            tracing::warn!(keys = ?self.at_restart, "changed in the configuration file; takes effect at the next restart");
        }
        if self.live.is_empty() && self.at_restart.is_empty() {
            tracing::debug!("configuration file read again; nothing changed");
        }
        metrics
            .config_reloads
            .get_or_create(&vec![("result", "applied".to_owned())])
            .inc();
    }
}

/// A host function call ended (counted and timed; not logged: this is the
/// hot path, every emitted chunk).
pub struct HostCallEnded {
    /// Which import.
    pub import: HostImport,
    /// How long it took, waits included.
    pub took: Duration,
}

impl InternalEvent for HostCallEnded {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        let (calls, duration) = &metrics.host_calls[self.import as usize];
        calls.inc();
        duration.observe(self.took.as_secs_f64());
    }
}

/// A task's guest wrote log lines past its budget; they were dropped (the
/// sandbox logs the line that says so, once per task).
pub struct GuestLogDropped {
    /// How many lines.
    pub lines: u64,
}

impl InternalEvent for GuestLogDropped {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        metrics.guest_log_dropped.inc_by(self.lines);
    }
}

/// Code of one plugin called, or was refused, a tool of another (the
/// sandbox logs a refusal with the policy that refused it).
pub struct ToolCalled<'a> {
    /// The calling plugin's id.
    pub caller: &'a str,
    /// The tool's plugin id.
    pub owner: &'a str,
    /// Whether policy let the call through.
    pub allowed: bool,
}

impl InternalEvent for ToolCalled<'_> {
    type Output = ();

    fn emit(self, metrics: &Metrics) {
        metrics
            .tool_calls
            .get_or_create(&super::tool_call_labels(
                self.caller,
                self.owner,
                self.allowed,
            ))
            .inc();
    }
}
