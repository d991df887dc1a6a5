//! Lifecycle hooks (`byclaw:gateway/hooks`): the calls there are, running one
//! in an instance of its own under the plugin's `hook_timeout`, and counting
//! how each went per plugin version and hook.
//!
//! A hook never decides anything: its error, trap or timeout is logged,
//! counted and otherwise ignored, so a broken hook cannot fail a task or
//! keep a plugin from serving.

use crate::bindings::{TaskInfo, WitHook};
use crate::host::TaskState;
use crate::plugin::{Plugin, describe_trap, guest_error_text, to_wit_header};
use byclaw_protocol::ControlCommand;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One of the hooks a plugin may export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    WorkerStartup,
    WorkerShutdown,
    TaskStart,
    TaskComplete,
    TaskError,
    TaskCancel,
}

impl Hook {
    /// Every hook.
    pub const ALL: [Hook; 6] = [
        Hook::WorkerStartup,
        Hook::WorkerShutdown,
        Hook::TaskStart,
        Hook::TaskComplete,
        Hook::TaskError,
        Hook::TaskCancel,
    ];

    fn from_wit(hook: WitHook) -> Hook {
        match hook {
            WitHook::WorkerStartup => Hook::WorkerStartup,
            WitHook::WorkerShutdown => Hook::WorkerShutdown,
            WitHook::TaskStart => Hook::TaskStart,
            WitHook::TaskComplete => Hook::TaskComplete,
            WitHook::TaskError => Hook::TaskError,
            WitHook::TaskCancel => Hook::TaskCancel,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// Its WIT name, as logged.
    pub fn name(self) -> &'static str {
        match self {
            Hook::WorkerStartup => "on-worker-startup",
            Hook::WorkerShutdown => "on-worker-shutdown",
            Hook::TaskStart => "on-task-start",
            Hook::TaskComplete => "on-task-complete",
            Hook::TaskError => "on-task-error",
            Hook::TaskCancel => "on-task-cancel",
        }
    }
}

/// The hooks a plugin implements (its `implemented-hooks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookSet(u8);

impl HookSet {
    pub(super) fn from_wit(hooks: &[WitHook]) -> HookSet {
        HookSet(
            hooks
                .iter()
                .fold(0, |set, hook| set | Hook::from_wit(*hook).bit()),
        )
    }

    /// Whether it has `hook`.
    pub fn contains(self, hook: Hook) -> bool {
        self.0 & hook.bit() != 0
    }

    /// The WIT names of its hooks.
    pub fn names(self) -> Vec<&'static str> {
        Hook::ALL
            .into_iter()
            .filter(|hook| self.contains(*hook))
            .map(Hook::name)
            .collect()
    }
}

/// A hook call with its arguments, owned: it runs on the guest runtime.
#[derive(Debug, Clone)]
pub enum HookCall {
    WorkerStartup { worker_id: String },
    WorkerShutdown { worker_id: String },
    TaskStart(TaskInfo),
    TaskComplete(TaskInfo, String),
    TaskError(TaskInfo, String),
    TaskCancel(TaskInfo, String),
}

impl HookCall {
    /// Which hook it calls.
    pub fn hook(&self) -> Hook {
        match self {
            HookCall::WorkerStartup { .. } => Hook::WorkerStartup,
            HookCall::WorkerShutdown { .. } => Hook::WorkerShutdown,
            HookCall::TaskStart(_) => Hook::TaskStart,
            HookCall::TaskComplete(..) => Hook::TaskComplete,
            HookCall::TaskError(..) => Hook::TaskError,
            HookCall::TaskCancel(..) => Hook::TaskCancel,
        }
    }

    /// The message id of the task it is about, for logs.
    fn message_id(&self) -> &str {
        match self {
            HookCall::WorkerStartup { .. } | HookCall::WorkerShutdown { .. } => "-",
            HookCall::TaskStart(task)
            | HookCall::TaskComplete(task, _)
            | HookCall::TaskError(task, _)
            | HookCall::TaskCancel(task, _) => &task.header.message_id,
        }
    }
}

/// What a hook is told about its task.
pub fn task_info(command: &ControlCommand, agent_type: &str) -> TaskInfo {
    TaskInfo {
        action_type: command.action.name().to_owned(),
        agent_type: agent_type.to_owned(),
        header: to_wit_header(&command.header),
    }
}

/// How one hook call went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    /// The plugin does not implement the hook; nothing ran, nothing is
    /// counted.
    NotExported,
    Succeeded,
    /// It returned an error or trapped; the reason.
    Failed(String),
    /// It did not return within the plugin's `hook_timeout`.
    TimedOut,
}

/// Counts of one hook of one plugin version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Time spent in calls of every outcome.
    pub total_time: Duration,
    /// The longest call.
    pub slowest: Duration,
}

impl HookCounts {
    /// Calls of every outcome.
    pub fn calls(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out
    }
}

/// Hook counts of every plugin version that ran a hook. One lock per hook
/// call: hooks are per task, not per event.
#[derive(Debug, Default)]
pub struct HookStats {
    /// By (plugin `id@version`, hook).
    counts: Mutex<BTreeMap<(String, Hook), HookCounts>>,
}

impl HookStats {
    fn record(&self, plugin: &str, hook: Hook, outcome: &HookOutcome, took: Duration) {
        let mut counts = self
            .counts
            .lock()
            .expect("hook stats lock is never poisoned");
        let entry = counts.entry((plugin.to_owned(), hook)).or_default();
        match outcome {
            HookOutcome::NotExported => return,
            HookOutcome::Succeeded => entry.succeeded += 1,
            HookOutcome::Failed(_) => entry.failed += 1,
            HookOutcome::TimedOut => entry.timed_out += 1,
        }
        entry.total_time += took;
        entry.slowest = entry.slowest.max(took);
    }

    /// The counts of one hook of one plugin (`id@version`).
    pub fn get(&self, plugin: &str, hook: Hook) -> HookCounts {
        self.counts
            .lock()
            .expect("hook stats lock is never poisoned")
            .get(&(plugin.to_owned(), hook))
            .copied()
            .unwrap_or_default()
    }

    /// Every (plugin, hook, counts), ordered by plugin then hook.
    pub fn snapshot(&self) -> Vec<(String, Hook, HookCounts)> {
        self.counts
            .lock()
            .expect("hook stats lock is never poisoned")
            .iter()
            .map(|((plugin, hook), counts)| (plugin.clone(), *hook, *counts))
            .collect()
    }

    /// One log line per plugin and hook that ran, as the reference SDK
    /// reports its hooks when the worker stops.
    pub fn log_summary(&self) {
        for (plugin, hook, counts) in self.snapshot() {
            let mean_ms = counts.total_time.as_secs_f64() * 1000.0 / counts.calls().max(1) as f64;
            tracing::info!(
                %plugin,
                hook = hook.name(),
                succeeded = counts.succeeded,
                failed = counts.failed,
                timed_out = counts.timed_out,
                mean_ms = format!("{mean_ms:.2}"),
                slowest_ms = format!("{:.2}", counts.slowest.as_secs_f64() * 1000.0),
                "hook statistics"
            );
        }
    }
}

impl Plugin {
    /// Whether the plugin implements `hook`.
    pub fn has_hook(&self, hook: Hook) -> bool {
        self.hooks.contains(hook)
    }

    /// Runs one hook in a fresh instance on the guest runtime, within the
    /// plugin's `hook_timeout`; logs and counts how it went. Never fails.
    pub async fn run_hook(self: &Arc<Self>, call: HookCall) -> HookOutcome {
        let hook = call.hook();
        if !self.has_hook(hook) {
            return HookOutcome::NotExported;
        }
        let timeout = self.policy().hook_timeout;
        let started = Instant::now();
        let plugin = self.clone();
        let message_id = call.message_id().to_owned();
        let mut task = self.on_guest_runtime(async move { plugin.call_hook(call).await });
        let outcome = match tokio::time::timeout(timeout, &mut task.0).await {
            Ok(Ok(Ok(()))) => HookOutcome::Succeeded,
            Ok(Ok(Err(reason))) => HookOutcome::Failed(reason),
            Ok(Err(join)) => HookOutcome::Failed(format!("the hook's task failed: {join}")),
            // Dropping `task` aborts the guest at its next yield.
            Err(_) => HookOutcome::TimedOut,
        };
        drop(task);
        let took = started.elapsed();
        let plugin = self.label();
        match &outcome {
            HookOutcome::Succeeded => {
                tracing::debug!(%plugin, hook = hook.name(), %message_id, took_ms = took.as_millis() as u64, "hook ran")
            }
            HookOutcome::Failed(reason) => {
                tracing::warn!(%plugin, hook = hook.name(), %message_id, %reason, "hook failed; ignored")
            }
            HookOutcome::TimedOut => tracing::warn!(
                %plugin,
                hook = hook.name(),
                %message_id,
                timeout_ms = timeout.as_millis() as u64,
                "hook did not return in time; stopped and ignored"
            ),
            HookOutcome::NotExported => {}
        }
        self.sandbox
            .hook_stats
            .record(&plugin, hook, &outcome, took);
        outcome
    }

    async fn call_hook(&self, call: HookCall) -> Result<(), String> {
        let limits = &self.sandbox.limits;
        let state = TaskState::for_hook(self, limits)
            .map_err(|e| format!("cannot prepare the sandbox: {e}"))?;
        let mut store = self.sandbox.store(state);
        let result = async {
            let instance = self.pre.instantiate(&mut store).await?;
            let hooks = self
                .pre
                .hooks(&mut store, &instance)?
                .expect("only a plugin exporting hooks implements one");
            match &call {
                HookCall::WorkerStartup { worker_id } => {
                    hooks.call_on_worker_startup(&mut store, worker_id).await
                }
                HookCall::WorkerShutdown { worker_id } => {
                    hooks.call_on_worker_shutdown(&mut store, worker_id).await
                }
                HookCall::TaskStart(task) => hooks.call_on_task_start(&mut store, task).await,
                HookCall::TaskComplete(task, result) => {
                    hooks.call_on_task_complete(&mut store, task, result).await
                }
                HookCall::TaskError(task, error) => {
                    hooks.call_on_task_error(&mut store, task, error).await
                }
                HookCall::TaskCancel(task, reason) => {
                    hooks.call_on_task_cancel(&mut store, task, reason).await
                }
            }
        }
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(guest_error_text(&error)),
            Err(trap) => Err(store
                .data()
                .limiter
                .exceeded()
                .unwrap_or_else(|| describe_trap(&trap, limits))),
        }
    }
}

/// Runs `on-worker-startup` or `on-worker-shutdown` (`starting`) of each of
/// `plugins` that exports hooks, all at once; returns when all have ended.
pub async fn worker_hooks<'a>(
    plugins: impl IntoIterator<Item = &'a Arc<Plugin>>,
    starting: bool,
    worker_id: &str,
) {
    let calls = plugins
        .into_iter()
        .filter(|plugin| {
            plugin.has_hook(match starting {
                true => Hook::WorkerStartup,
                false => Hook::WorkerShutdown,
            })
        })
        .map(|plugin| {
            let worker_id = worker_id.to_owned();
            plugin.run_hook(match starting {
                true => HookCall::WorkerStartup { worker_id },
                false => HookCall::WorkerShutdown { worker_id },
            })
        });
    futures::future::join_all(calls).await;
}
