//! Host side of the `agent` world: the per-store state and the imports a
//! guest may call (`emit`, `runtime`, `tools`, `agents`, `history`,
//! `prompts`), one file per interface. What reaches past the sandbox goes
//! through the task's [`TaskPort`].
//!
//! Guest-visible failures (an unknown tool, bad arguments) are returned as the
//! WIT `error`; only a guest that breaks the contract (oversized events,
//! metadata that is not a JSON object) or a stopping daemon gets a trap.

mod agents;
mod emit;
mod history;
mod prompts;
mod runtime;
mod tools;

use crate::bindings::byclaw::gateway::types;
use crate::loader::PluginTable;
use crate::plugin::Plugin;
use crate::policy::Limits;
use crate::port::{HostImport, TaskPort};
use crate::wasi::{TaskDirs, wasi_context};
use arc_swap::ArcSwap;
use byclaw_protocol::EventOrigin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How deep tools may call tools before `call-tool` answers `denied`.
pub const MAX_TOOL_DEPTH: u8 = 4;

/// Times one host call; reports it to the task's port when dropped (every
/// return path).
pub(crate) struct HostCallTimer {
    port: Option<Arc<dyn TaskPort>>,
    import: HostImport,
    started: std::time::Instant,
}

impl Drop for HostCallTimer {
    fn drop(&mut self) {
        if let Some(port) = &self.port {
            port.host_call(self.import, self.started.elapsed());
        }
    }
}

/// What every store of one task shares (the handler's and its tool calls').
pub struct TaskContext {
    /// Trace, session, agent and message ids stamped on every event.
    pub origin: EventOrigin,
    /// Cancel requests for this task; `is-cancelled` reads it.
    pub cancel: Arc<CancelSignal>,
    /// Its label (`id@version`) for logs.
    pub plugin_label: Arc<str>,
    /// `origin.message_id`, shared for log records.
    pub message_id: Arc<str>,
    /// The task's directories; `None` when its plugin wants no workspace.
    pub dirs: Option<TaskDirs>,
    /// When the task's deadline passes; waits default to it.
    pub deadline_at: tokio::time::Instant,
    /// The CPU time its code has used, against its plugin's `cpu_ms`
    /// (tools it calls count for it).
    pub cpu: crate::cpu::CpuMeter,
    /// The plugins loaded now (swapped as a whole on reload), for the tools
    /// and prompts of other plugins.
    pub plugins: Arc<ArcSwap<PluginTable>>,
    /// Seeds the random numbers of its stores, the same on every run of
    /// the task; `None`: each store seeded by the OS.
    pub random: Option<crate::random::TaskRandom>,
    /// Keeps the times its stores read, so a run after its instance was
    /// dropped reads the same; `None`: the host's clocks as they are.
    pub clocks: Option<Arc<crate::clock::TaskClocks>>,
    /// Everything past the sandbox: events, other agents, the user, the
    /// registry, history.
    pub port: Arc<dyn TaskPort>,
}

/// A task's cancel state, shared by the dispatcher (which sets it when a
/// CANCEL_TASK arrives) and the guest (which polls `is-cancelled`).
#[derive(Debug, Default)]
pub struct CancelSignal {
    /// A cancel of any mode was requested.
    requested: AtomicBool,
    /// Why, for the CANCELLED reply.
    reason: std::sync::Mutex<String>,
    /// Fires with the request, so waits in host calls end at once.
    pub requested_token: tokio_util::sync::CancellationToken,
    /// Fires when the instance must be dropped now (force, or grace over).
    pub force: tokio_util::sync::CancellationToken,
}

impl CancelSignal {
    /// Records a cancel request (`is-cancelled` turns true).
    pub fn request(&self, reason: &str) {
        *self
            .reason
            .lock()
            .expect("cancel reason lock is never poisoned") = reason.to_owned();
        self.requested.store(true, Ordering::Relaxed);
        self.requested_token.cancel();
    }

    /// Whether a cancel was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// The reason given with the request.
    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .expect("cancel reason lock is never poisoned")
            .clone()
    }
}

/// The host context of one store.
#[derive(Clone)]
pub struct TaskHost {
    pub task: Arc<TaskContext>,
    /// The plugin whose code runs in this store: the task's, or the one
    /// whose tool is being called.
    pub plugin: Arc<Plugin>,
    /// 0 for the handler; +1 for each nested tool call.
    pub depth: u8,
}

/// What a hook's store knows of its plugin.
pub(crate) struct HookScope {
    /// `id@version`, for its log lines.
    plugin_label: Arc<str>,
    /// What `get-config` answers.
    config: Arc<std::collections::BTreeMap<String, String>>,
}

/// The data of one `Store`.
pub struct TaskState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// `wasi:http` state, and the policy its requests pass.
    http: wasmtime_wasi_http::WasiHttpCtx,
    http_policy: crate::outbound::OutboundPolicy,
    /// Enforces the memory cap and remembers that it did.
    pub(crate) limiter: MemoryCap,
    /// `None` while reading a manifest or running a hook, when no host
    /// call but `log` (and in a hook `get-config`) is allowed.
    pub(crate) host: Option<TaskHost>,
    /// Set while a lifecycle hook runs: who logs, what `get-config` answers.
    hook: Option<HookScope>,
    /// Largest event the guest may emit.
    max_event_bytes: usize,
    /// Paces its events (`max_events_per_s`); `None` outside tasks.
    emit_pace: Option<crate::policy::EmitPace>,
    /// Largest tool arguments it may pass and tool result it may get.
    max_tool_bytes: usize,
    /// What the guest may still write to the daemon's log (stdout, stderr
    /// and `runtime.log` share it).
    pub(crate) output: Arc<crate::output::OutputBudget>,
}

impl TaskState {
    pub(crate) fn new(host: TaskHost, limits: &Limits) -> std::io::Result<Self> {
        let policy = host.plugin.policy();
        let output = crate::output::OutputBudget::new(
            limits.guest_log,
            host.task.plugin_label.clone(),
            host.task.message_id.clone(),
            Some(host.task.port.clone()),
        );
        let wasi = wasi_context(
            host.task.dirs.as_ref(),
            &policy.read_only_dirs,
            host.task.plugin_label.clone(),
            host.task.message_id.clone(),
            output.clone(),
            host.task.random.as_ref().map(|random| random.next_store()),
            host.task.clocks.as_ref(),
        )?;
        let http_policy = crate::outbound::OutboundPolicy {
            allowed: policy.outbound.clone(),
            plugin: host.task.plugin_label.clone(),
            port: Some(host.task.port.clone()),
        };
        let memory_bytes = policy.memory_bytes;
        Ok(TaskState {
            wasi,
            table: ResourceTable::new(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_policy,
            limiter: MemoryCap::new(memory_bytes, host.plugin.sandbox.guest_memory.clone()),
            host: Some(host),
            hook: None,
            max_event_bytes: limits.max_event_bytes,
            emit_pace: Some(crate::policy::EmitPace::new(
                policy.events_per_s,
                std::time::Instant::now(),
            )),
            max_tool_bytes: limits.max_tool_bytes,
            output,
        })
    }

    pub(crate) fn for_manifest(limits: &Limits, budget: Arc<GuestMemory>) -> Self {
        let output = crate::output::OutputBudget::new(
            limits.guest_log,
            Arc::from("loader"),
            Arc::from("-"),
            None,
        );
        TaskState {
            wasi: wasi_context(
                None,
                &[],
                Arc::from("loader"),
                Arc::from("-"),
                output.clone(),
                None,
                None,
            )
            .expect("a WASI context without directories cannot fail"),
            table: ResourceTable::new(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_policy: crate::outbound::OutboundPolicy {
                allowed: Arc::default(),
                plugin: Arc::from("loader"),
                port: None,
            },
            limiter: MemoryCap::new(limits.memory_bytes, budget),
            host: None,
            hook: None,
            max_event_bytes: limits.max_event_bytes,
            emit_pace: None,
            max_tool_bytes: limits.max_tool_bytes,
            output,
        }
    }

    /// The state of a lifecycle hook's store: no workspace and no task, but
    /// the plugin's read-only directories, outbound hosts, memory cap and
    /// configuration values.
    pub(crate) fn for_hook(plugin: &Plugin, limits: &Limits) -> std::io::Result<Self> {
        let label: Arc<str> = Arc::from(plugin.label());
        let policy = plugin.policy();
        let output =
            crate::output::OutputBudget::new(limits.guest_log, label.clone(), Arc::from("-"), None);
        Ok(TaskState {
            wasi: wasi_context(
                None,
                &policy.read_only_dirs,
                label.clone(),
                Arc::from("-"),
                output.clone(),
                None,
                None,
            )?,
            table: ResourceTable::new(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_policy: crate::outbound::OutboundPolicy {
                allowed: policy.outbound.clone(),
                plugin: label.clone(),
                port: None,
            },
            limiter: MemoryCap::new(policy.memory_bytes, plugin.sandbox.guest_memory.clone()),
            host: None,
            hook: Some(HookScope {
                plugin_label: label,
                config: policy.config.clone(),
            }),
            max_event_bytes: limits.max_event_bytes,
            emit_pace: None,
            max_tool_bytes: limits.max_tool_bytes,
            output,
        })
    }

    /// Starts timing a host call of a task (manifest and hook stores are
    /// not counted).
    pub(crate) fn timed(&self, import: HostImport) -> HostCallTimer {
        HostCallTimer {
            port: self.host.as_ref().map(|host| host.task.port.clone()),
            import,
            started: std::time::Instant::now(),
        }
    }

    fn host(&self, function: &str) -> wasmtime::Result<&TaskHost> {
        self.host.as_ref().ok_or_else(|| match self.hook {
            Some(_) => wasmtime::format_err!("{function} may not be called from a lifecycle hook"),
            None => wasmtime::format_err!("{function} may not be called from manifest()"),
        })
    }
}

impl WasiView for TaskState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_http::WasiHttpView for TaskState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

impl types::Host for TaskState {}

/// The trap raised when a store outgrows its memory cap.
#[derive(Debug, Clone, thiserror::Error)]
#[error("memory limit of {limit_mib} MiB exceeded (tried to grow to {wanted_mib} MiB)")]
pub struct MemoryCapExceeded {
    limit_mib: usize,
    wanted_mib: usize,
}

/// The linear memory of every store of a sandbox, against the daemon's
/// budget (`worker.memory_budget_mb`): past it, new tasks wait to start
/// ([`GuestMemory::admit`]) until stores that end give memory back. Tasks
/// already running keep growing up to their own caps, so nothing fails.
#[derive(Debug, Default)]
pub struct GuestMemory {
    /// Bytes of linear memory all live stores hold.
    in_use: std::sync::atomic::AtomicUsize,
    /// The budget, bytes; 0: none.
    limit: usize,
    /// Woken when a store ends and gives its memory back.
    released: tokio::sync::Notify,
}

impl GuestMemory {
    /// A budget of `limit` bytes (0: none).
    pub fn new(limit: usize) -> Self {
        GuestMemory {
            limit,
            ..GuestMemory::default()
        }
    }

    /// Bytes of linear memory held now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// The budget, bytes (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Returns once the memory in use is under the budget (at once without
    /// one). True when it had to wait.
    pub async fn admit(&self) -> bool {
        if self.limit == 0 {
            return false;
        }
        let mut waited = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between wakes it.
            released.as_mut().enable();
            if self.in_use() < self.limit {
                return waited;
            }
            waited = true;
            released.await;
        }
    }

    fn grew(&self, bytes: usize) {
        self.in_use.fetch_add(bytes, Ordering::Relaxed);
    }

    fn released(&self, bytes: usize) {
        if bytes > 0 {
            self.in_use.fetch_sub(bytes, Ordering::Relaxed);
            self.released.notify_waiters();
        }
    }
}

/// Caps the sum of all linear memories of a store, and counts them in the
/// sandbox's [`GuestMemory`] until the store is dropped.
pub(crate) struct MemoryCap {
    limit: usize,
    used: usize,
    exceeded: Option<MemoryCapExceeded>,
    budget: Arc<GuestMemory>,
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        self.budget.released(self.used);
    }
}

impl MemoryCap {
    fn new(limit: usize, budget: Arc<GuestMemory>) -> Self {
        MemoryCap {
            limit,
            used: 0,
            exceeded: None,
            budget,
        }
    }

    /// The reason, if the cap was hit.
    pub(crate) fn exceeded(&self) -> Option<String> {
        self.exceeded.as_ref().map(ToString::to_string)
    }
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let wanted = self.used.saturating_add(desired.saturating_sub(current));
        if wanted > self.limit {
            let error = MemoryCapExceeded {
                limit_mib: self.limit >> 20,
                wanted_mib: wanted >> 20,
            };
            self.exceeded = Some(error.clone());
            return Err(error.into());
        }
        self.budget.grew(wanted - self.used);
        self.used = wanted;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
