//! The sandbox's one door to the rest of the daemon: [`TaskPort`], which a
//! task's host calls use for everything past the sandbox — its events,
//! other agents, the user, the worker registry, session history — and the
//! plain types that cross it. The daemon implements it over Redis; the
//! sandbox knows nothing of streams, routes or stores.

pub use crate::bindings::GuestError;
pub use crate::bindings::byclaw::gateway::agents::{AgentReply, UserReply, WorkerInfo};
pub use crate::bindings::byclaw::gateway::history::HistoryEntry;
use serde_json::Value;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, as [`TaskPort`]'s methods return (object safe).
pub type PortFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The daemon is stopping under the task: the guest is stopped with a
/// trap and the task cut off (its entry stays pending for another worker).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the daemon is stopping; the task was cut off")]
pub struct Stopping;

/// One ASK_AGENT a guest asked for, checked.
#[derive(Debug, Clone)]
pub struct AgentCall {
    /// The agent type called.
    pub target: String,
    /// `body.content`.
    pub content: String,
    /// `body.extra_payload`, a JSON object.
    pub payload: Value,
    /// `header.metadata`, a JSON object.
    pub metadata: Value,
}

/// Most bytes of one outbound HTTP response body kept for a task's journal;
/// past them the response streams on to the guest but is not kept.
pub const MAX_KEPT_RESPONSE_BYTES: usize = 4 << 20;

/// An outbound HTTP exchange as a task's journal keeps it: a run after
/// this one is given the response without sending the request again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeptResponse {
    /// The request's method and URI, checked against the run's request.
    pub method: String,
    pub uri: String,
    /// The response's status, headers and body (base64).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// What [`TaskPort::outbound_request`] says of a request.
#[derive(Debug)]
pub enum Outbound {
    /// A run before this one had this response: given, nothing sent.
    Kept(KeptResponse),
    /// Send it; keep its response under this number.
    Keep(usize),
    /// Send it; its response is not kept.
    Unkept,
    /// A run before this one sent another request at this place: why.
    Mismatch(String),
}

/// What one task's host calls need from outside the sandbox; one per task.
///
/// Waits (for replies, for the user) happen inside the port; the durations
/// given are already capped by the task's deadline.
pub trait TaskPort: Send + Sync + 'static {
    /// Queues one event of the task (a DataMessage's JSON) in order with its
    /// other writes; waits while the writer is full.
    fn emit(&self, data: String) -> PortFuture<'_, Result<(), Stopping>>;

    /// Adds streamed text to the task's reply; `end` marks the reply
    /// complete (`appStreamResponse`).
    fn add_to_reply(&self, text: &str, end: bool);

    /// Sends `calls` (as one task group when `group`) and waits up to
    /// `timeout` for their replies: one result per call, in order. A call
    /// that failed its checks comes in as `Err` and goes out as it is.
    fn call_agents(
        &self,
        calls: Vec<Result<AgentCall, GuestError>>,
        group: bool,
        timeout: Duration,
    ) -> PortFuture<'_, Result<Vec<Result<AgentReply, GuestError>>, Stopping>>;

    /// Sends one call whose reply nobody awaits (status `QUEUED`).
    fn send_agent(
        &self,
        call: AgentCall,
    ) -> PortFuture<'_, Result<Result<AgentReply, GuestError>, Stopping>>;

    /// Shows `prompt` to the user and waits up to `timeout` for the answer.
    fn ask_user(
        &self,
        prompt: String,
        metadata: Value,
        timeout: Duration,
    ) -> PortFuture<'_, Result<Result<UserReply, GuestError>, Stopping>>;

    /// The registry's workers, capabilities and last heartbeats.
    fn active_workers(&self) -> PortFuture<'_, Result<Vec<WorkerInfo>, GuestError>>;

    /// The session's newest `limit` messages, oldest first.
    fn history_recent(&self, limit: usize)
    -> PortFuture<'_, Result<Vec<HistoryEntry>, GuestError>>;

    /// One host call of the task took `took` (for metrics).
    fn host_call(&self, import: HostImport, took: Duration);

    /// The plugin `caller`'s code called a tool of the plugin `owner`
    /// (another plugin's, or its own); `allowed` is false when `owner`'s
    /// `tool_callers` refused it (for metrics).
    fn tool_call(&self, caller: &str, owner: &str, allowed: bool) {
        let _ = (caller, owner, allowed);
    }

    /// The task learned something from outside that its journal does not
    /// keep (`what`: e.g. an outbound HTTP response not read to its end):
    /// from now on it cannot be run again from the journal, so it keeps its
    /// instance while it waits.
    fn unjournaled(&self, what: &'static str) {
        let _ = what;
    }

    /// Numbers the task's next outbound HTTP request (`method`, `uri`): the
    /// response a run before this one kept for it, or the number to keep
    /// this one's under (see [`TaskPort::outbound_response`]).
    fn outbound_request(&self, method: &str, uri: &str) -> Outbound {
        let _ = (method, uri);
        Outbound::Unkept
    }

    /// The response to request `n` of [`Outbound::Keep`], read by the guest
    /// to its end; `None` when it was not (failed, dropped before its end,
    /// past [`MAX_KEPT_RESPONSE_BYTES`]).
    fn outbound_response(&self, n: usize, response: Option<KeptResponse>) {
        let _ = (n, response);
    }

    /// The task's guest wrote `lines` lines to its log past its budget;
    /// they were dropped (for metrics).
    fn guest_output_dropped(&self, lines: u64) {
        let _ = lines;
    }
}

/// The host functions a plugin imports, for per-import counts. Declared
/// in the order of [`HostImport::ALL`]: the discriminant indexes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostImport {
    EmitChunk,
    EmitMessage,
    EmitState,
    EmitArtifact,
    EmitEvent,
    Log,
    IsCancelled,
    GetConfig,
    CallTool,
    ListTools,
    CallAgent,
    DispatchGroup,
    AskUser,
    ActiveWorkers,
    HistoryRecent,
    RenderPrompt,
}

impl HostImport {
    /// Every import, in declaration order.
    pub const ALL: [HostImport; 16] = [
        HostImport::EmitChunk,
        HostImport::EmitMessage,
        HostImport::EmitState,
        HostImport::EmitArtifact,
        HostImport::EmitEvent,
        HostImport::Log,
        HostImport::IsCancelled,
        HostImport::GetConfig,
        HostImport::CallTool,
        HostImport::ListTools,
        HostImport::CallAgent,
        HostImport::DispatchGroup,
        HostImport::AskUser,
        HostImport::ActiveWorkers,
        HostImport::HistoryRecent,
        HostImport::RenderPrompt,
    ];

    /// `interface.function` as the WIT names it.
    pub fn name(self) -> &'static str {
        match self {
            HostImport::EmitChunk => "emit.emit-chunk",
            HostImport::EmitMessage => "emit.emit-message",
            HostImport::EmitState => "emit.emit-state",
            HostImport::EmitArtifact => "emit.emit-artifact",
            HostImport::EmitEvent => "emit.emit-event",
            HostImport::Log => "runtime.log",
            HostImport::IsCancelled => "runtime.is-cancelled",
            HostImport::GetConfig => "runtime.get-config",
            HostImport::CallTool => "tools.call-tool",
            HostImport::ListTools => "tools.list-tools",
            HostImport::CallAgent => "agents.call-agent",
            HostImport::DispatchGroup => "agents.dispatch-group",
            HostImport::AskUser => "agents.ask-user",
            HostImport::ActiveWorkers => "agents.active-workers",
            HostImport::HistoryRecent => "history.recent",
            HostImport::RenderPrompt => "prompts.render-prompt",
        }
    }
}
