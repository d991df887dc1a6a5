//! Write byclaw gateway agents in Rust.
//!
//! An agent is a type implementing [`Agent`], exported with
//! [`export_agent!`], built for `wasm32-wasip2` as a `cdylib`; the resulting
//! `.wasm` component goes into `gatewayd`'s plugin directory.
//!
//! ```no_run
//! use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, emit, export_agent};
//! use serde_json::{Value, json};
//!
//! struct Echo;
//!
//! impl Agent for Echo {
//!     fn manifest() -> Manifest {
//!         Manifest::new("echo", env!("CARGO_PKG_VERSION"))
//!             .description("Sends the input back")
//!             .capability("echo")
//!     }
//!
//!     fn handle(command: Command) -> Result<Value, Error> {
//!         let text = command.text();
//!         emit::state("ECHOING");
//!         emit::chunk(&text);
//!         Ok(json!({ "echo": text }))
//!     }
//! }
//!
//! export_agent!(Echo);
//! ```
//!
//! `Cargo.toml` of the plugin:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! byclaw-plugin-sdk = { path = "../plugin-sdk" }
//! serde_json = "1"
//! ```
//!
//! and `cargo build --release --target wasm32-wasip2`.
//!
//! The handler runs in a sandbox: it sees its task's workspace
//! ([`Command::private_dir`], [`Command::public_dir`]) and nothing else of
//! the file system, no network and no environment; host calls
//! ([`emit`], [`tools`], [`agents`], [`user`], [`history`], [`prompts`], [`log`],
//! [`is_cancelled`])
//! look blocking.

#![warn(missing_docs)]

use serde_json::Value;
use std::fmt;
use std::path::PathBuf;

/// Generated bindings of the `byclaw:gateway/agent-with-hooks` world. Not
/// part of the API; use the types of the crate root.
#[doc(hidden)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "agent-with-hooks",
        pub_export_macro: true,
        default_bindings_module: "byclaw_plugin_sdk::wit",
    });
}

use wit::byclaw::gateway as host;

mod manifest;
pub use manifest::{Manifest, Prompt, Tool};
use wit::exports::byclaw::gateway::handler as guest;
use wit::exports::byclaw::gateway::hooks as guest_hooks;

/// An agent: what it serves, and how it handles a command.
pub trait Agent {
    /// Describes the plugin. Called once when the daemon loads it; only
    /// [`log`] may be used here.
    fn manifest() -> Manifest;

    /// Handles one command (`ASK_AGENT` or `RESUME`). The `Ok` value is the
    /// result: `metadata.result` of the COMPLETED event and the `reply_data`
    /// a calling agent receives. An `Err` ends the task with `FAILED: <error>`.
    fn handle(command: Command) -> Result<Value, Error>;

    /// Runs one of the tools listed in the manifest. `args` is a JSON object.
    fn invoke_tool(name: &str, args: Value) -> Result<Value, Error> {
        let _ = args;
        Err(Error::NotFound(format!("tool {name:?}")))
    }
}

/// Lifecycle hooks, as the reference SDK's plugins have them. Implement the
/// ones you need, list them in [`Hooks::IMPLEMENTED`] (the daemon calls only
/// those, so an agent pays nothing for hooks it does not have), and export
/// with `export_agent!(MyAgent, hooks)`.
///
/// Each hook runs in a fresh instance of the plugin within the daemon's
/// `hook_timeout_ms`: it may [`log`], read [`config`] and make the HTTP
/// requests the policy allows, but has no workspace and cannot emit. An
/// `Err`, a panic or a timeout is logged and counted by the daemon; it never
/// changes the task's outcome.
pub trait Hooks {
    /// The hooks implemented below.
    const IMPLEMENTED: &'static [Hook];

    /// This plugin version starts serving on worker `worker_id` (daemon
    /// start, or loaded by a reload).
    fn on_worker_startup(worker_id: &str) -> Result<(), Error> {
        let _ = worker_id;
        Ok(())
    }

    /// This plugin version stops serving on worker `worker_id`.
    fn on_worker_shutdown(worker_id: &str) -> Result<(), Error> {
        let _ = worker_id;
        Ok(())
    }

    /// A task is about to be handled.
    fn on_task_start(task: &TaskInfo) -> Result<(), Error> {
        let _ = task;
        Ok(())
    }

    /// A task completed with `output` (what [`Agent::handle`] returned).
    fn on_task_complete(task: &TaskInfo, output: Value) -> Result<(), Error> {
        let _ = (task, output);
        Ok(())
    }

    /// A task failed with `error`.
    fn on_task_error(task: &TaskInfo, error: &str) -> Result<(), Error> {
        let _ = (task, error);
        Ok(())
    }

    /// A task was cancelled for `reason`.
    fn on_task_cancel(task: &TaskInfo, reason: &str) -> Result<(), Error> {
        let _ = (task, reason);
        Ok(())
    }
}

/// One of the [`Hooks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// The worker loaded this plugin (at start or on a reload).
    WorkerStartup,
    /// The worker is stopping (after its tasks ended), or this version was
    /// replaced or removed.
    WorkerShutdown,
    /// A task is about to be handled (its workspace ready).
    TaskStart,
    /// A task of this plugin completed.
    TaskComplete,
    /// A task failed (its error, a trap, the deadline).
    TaskError,
    /// A task of this plugin was cancelled.
    TaskCancel,
}

impl Hook {
    fn into_wit(self) -> guest_hooks::Hook {
        match self {
            Hook::WorkerStartup => guest_hooks::Hook::WorkerStartup,
            Hook::WorkerShutdown => guest_hooks::Hook::WorkerShutdown,
            Hook::TaskStart => guest_hooks::Hook::TaskStart,
            Hook::TaskComplete => guest_hooks::Hook::TaskComplete,
            Hook::TaskError => guest_hooks::Hook::TaskError,
            Hook::TaskCancel => guest_hooks::Hook::TaskCancel,
        }
    }
}

/// The task a hook is about.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// `ASK_AGENT` or `RESUME`.
    pub action_type: String,
    /// The agent type it was routed to.
    pub agent_type: String,
    /// The task's routing header.
    pub header: Header,
}

/// Exports a type implementing [`Agent`] as the plugin's handler:
/// `export_agent!(MyAgent)`, or `export_agent!(MyAgent, hooks)` when it
/// also implements [`Hooks`].
///
/// Use it once per plugin crate, with the name of a type defined in it.
#[macro_export]
macro_rules! export_agent {
    ($agent:ident) => {
        $crate::__export_agent!($agent, $crate::__private::NoHooks);
    };
    ($agent:ident, hooks) => {
        $crate::__export_agent!($agent, $agent);
    };
}

/// The body of [`export_agent!`]; not part of the API.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_agent {
    ($agent:ident, $hooks:ty) => {
        impl $crate::wit::exports::byclaw::gateway::hooks::Guest for $agent {
            fn implemented_hooks()
            -> ::std::vec::Vec<$crate::wit::exports::byclaw::gateway::hooks::Hook> {
                $crate::__private::implemented_hooks::<$hooks>()
            }
            fn on_worker_startup(
                worker_id: ::std::string::String,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::hook_result(<$hooks as $crate::Hooks>::on_worker_startup(
                    &worker_id,
                ))
            }
            fn on_worker_shutdown(
                worker_id: ::std::string::String,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::hook_result(<$hooks as $crate::Hooks>::on_worker_shutdown(
                    &worker_id,
                ))
            }
            fn on_task_start(
                task: $crate::wit::exports::byclaw::gateway::hooks::TaskInfo,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::on_task_start::<$hooks>(task)
            }
            fn on_task_complete(
                task: $crate::wit::exports::byclaw::gateway::hooks::TaskInfo,
                output: ::std::string::String,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::on_task_complete::<$hooks>(task, output)
            }
            fn on_task_error(
                task: $crate::wit::exports::byclaw::gateway::hooks::TaskInfo,
                error: ::std::string::String,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::on_task_error::<$hooks>(task, error)
            }
            fn on_task_cancel(
                task: $crate::wit::exports::byclaw::gateway::hooks::TaskInfo,
                reason: ::std::string::String,
            ) -> ::core::result::Result<(), $crate::wit::exports::byclaw::gateway::hooks::Error>
            {
                $crate::__private::on_task_cancel::<$hooks>(task, reason)
            }
        }
        impl $crate::wit::exports::byclaw::gateway::handler::Guest for $agent {
            fn describe() -> $crate::wit::exports::byclaw::gateway::handler::Manifest {
                $crate::__private::describe::<$agent>()
            }
            fn handle(
                command: $crate::wit::exports::byclaw::gateway::handler::Command,
            ) -> ::core::result::Result<
                ::std::string::String,
                $crate::wit::exports::byclaw::gateway::handler::Error,
            > {
                $crate::__private::handle::<$agent>(command)
            }
            fn invoke_tool(
                name: ::std::string::String,
                args: ::std::string::String,
            ) -> ::core::result::Result<
                ::std::string::String,
                $crate::wit::exports::byclaw::gateway::handler::Error,
            > {
                $crate::__private::invoke_tool::<$agent>(name, args)
            }
        }
        $crate::wit::export!($agent with_types_in $crate::wit);
    };
}

/// Glue called by [`export_agent!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// The hooks of an agent exported without any.
    pub struct NoHooks;

    impl Hooks for NoHooks {
        const IMPLEMENTED: &'static [Hook] = &[];
    }

    pub fn implemented_hooks<H: Hooks>() -> Vec<guest_hooks::Hook> {
        H::IMPLEMENTED.iter().map(|hook| hook.into_wit()).collect()
    }

    pub fn hook_result(result: Result<(), Error>) -> Result<(), guest::Error> {
        result.map_err(Error::into_wit)
    }

    fn task_info(task: guest_hooks::TaskInfo) -> Result<TaskInfo, guest::Error> {
        Ok(TaskInfo {
            action_type: task.action_type,
            agent_type: task.agent_type,
            header: Header::from_wit(task.header).map_err(Error::into_wit)?,
        })
    }

    pub fn on_task_start<H: Hooks>(task: guest_hooks::TaskInfo) -> Result<(), guest::Error> {
        hook_result(H::on_task_start(&task_info(task)?))
    }

    pub fn on_task_complete<H: Hooks>(
        task: guest_hooks::TaskInfo,
        output: String,
    ) -> Result<(), guest::Error> {
        let output: Value = serde_json::from_str(&output)
            .map_err(|e| Error::InvalidInput(format!("task output: {e}")).into_wit())?;
        hook_result(H::on_task_complete(&task_info(task)?, output))
    }

    pub fn on_task_error<H: Hooks>(
        task: guest_hooks::TaskInfo,
        error: String,
    ) -> Result<(), guest::Error> {
        hook_result(H::on_task_error(&task_info(task)?, &error))
    }

    pub fn on_task_cancel<H: Hooks>(
        task: guest_hooks::TaskInfo,
        reason: String,
    ) -> Result<(), guest::Error> {
        hook_result(H::on_task_cancel(&task_info(task)?, &reason))
    }

    pub fn describe<A: Agent>() -> guest::Manifest {
        A::manifest().into_wit()
    }

    pub fn handle<A: Agent>(command: guest::Command) -> Result<String, guest::Error> {
        let command = Command::from_wit(command).map_err(Error::into_wit)?;
        let value = A::handle(command).map_err(Error::into_wit)?;
        Ok(value.to_string())
    }

    pub fn invoke_tool<A: Agent>(name: String, args: String) -> Result<String, guest::Error> {
        let args: Value = serde_json::from_str(&args)
            .map_err(|e| Error::InvalidInput(format!("tool arguments: {e}")).into_wit())?;
        let value = A::invoke_tool(&name, args).map_err(Error::into_wit)?;
        Ok(value.to_string())
    }
}

/// An error the agent reports, or a host call returned. Each variant carries
/// a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input was rejected (malformed JSON, schema violation, bad argument).
    InvalidInput(String),
    /// The named thing (tool, agent, key) does not exist.
    NotFound(String),
    /// Policy forbids it.
    Denied(String),
    /// It did not finish in time.
    Timeout(String),
    /// The task was cancelled.
    Cancelled(String),
    /// A backing service is unreachable; trying again later may work.
    Unavailable(String),
    /// It ran and failed.
    Failed(String),
}

impl Error {
    /// A [`Error::Failed`] with a message.
    pub fn failed(message: impl Into<String>) -> Self {
        Error::Failed(message.into())
    }

    fn into_wit(self) -> guest::Error {
        match self {
            Error::InvalidInput(m) => guest::Error::InvalidInput(m),
            Error::NotFound(m) => guest::Error::NotFound(m),
            Error::Denied(m) => guest::Error::Denied(m),
            Error::Timeout(m) => guest::Error::Timeout(m),
            Error::Cancelled(m) => guest::Error::Cancelled(m),
            Error::Unavailable(m) => guest::Error::Unavailable(m),
            Error::Failed(m) => guest::Error::Failed(m),
        }
    }

    fn from_wit(error: host::types::Error) -> Self {
        use host::types::Error as E;
        match error {
            E::InvalidInput(m) => Error::InvalidInput(m),
            E::NotFound(m) => Error::NotFound(m),
            E::Denied(m) => Error::Denied(m),
            E::Timeout(m) => Error::Timeout(m),
            E::Cancelled(m) => Error::Cancelled(m),
            E::Unavailable(m) => Error::Unavailable(m),
            E::Failed(m) => Error::Failed(m),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::NotFound(m) => write!(f, "not found: {m}"),
            Error::Denied(m) => write!(f, "denied: {m}"),
            Error::Timeout(m) => write!(f, "timeout: {m}"),
            Error::Cancelled(m) => write!(f, "cancelled: {m}"),
            Error::Unavailable(m) => write!(f, "unavailable: {m}"),
            Error::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::InvalidInput(error.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(error: std::io::Error) -> Self {
        Error::Failed(error.to_string())
    }
}

/// The routing header of a command; absent fields are empty.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// This command's id (a RESUME's own id, not the task's it answers).
    pub message_id: String,
    /// The conversation it belongs to: events, history and answers are
    /// per session.
    pub session_id: String,
    /// The W3C trace id (32 hex) of the request that led here.
    pub trace_id: String,
    /// The calling agent type when another agent sent this and waits.
    pub source_agent_id: String,
    /// The agent type it was sent to.
    pub target_agent_type: String,
    /// A RESUME: the task it answers (a child's id for an agent's reply).
    pub parent_message_id: String,
    /// The task group of a `dispatch-group` child, else empty.
    pub task_group_id: String,
    /// The tenant it runs for, passed on to the agents it calls.
    pub tenant_id: String,
    /// A JSON object.
    pub metadata: Value,
}

impl Header {
    fn from_wit(h: host::types::Header) -> Result<Self, Error> {
        Ok(Header {
            metadata: serde_json::from_str(&h.metadata)
                .map_err(|e| Error::InvalidInput(format!("header.metadata is not JSON: {e}")))?,
            message_id: h.message_id,
            session_id: h.session_id,
            trace_id: h.trace_id,
            source_agent_id: h.source_agent_id,
            target_agent_type: h.target_agent_type,
            parent_message_id: h.parent_message_id,
            task_group_id: h.task_group_id,
            tenant_id: h.tenant_id,
        })
    }
}

/// One command to handle.
#[derive(Debug, Clone)]
pub struct Command {
    /// `ASK_AGENT` or `RESUME`.
    pub action_type: String,
    /// The agent type it was routed to.
    pub agent_type: String,
    /// Its routing header.
    pub header: Header,
    /// `body.content`: a JSON string, or a list of message objects.
    pub content: Value,
    /// `body.extra_payload` (an object).
    pub extra_payload: Value,
    /// ASK_AGENT: whether the sender waits for the reply.
    pub wait_for_reply: bool,
    /// RESUME: the status of the reply (`COMPLETED`, `FAILED`, ...).
    pub status: String,
    /// RESUME: the reply's data.
    pub reply_data: Value,
    private_dir: String,
    public_dir: String,
}

impl Command {
    fn from_wit(command: guest::Command) -> Result<Self, Error> {
        let parse = |what: &str, text: &str| {
            serde_json::from_str::<Value>(text)
                .map_err(|e| Error::InvalidInput(format!("{what} is not JSON: {e}")))
        };
        Ok(Command {
            header: Header::from_wit(command.header)?,
            content: parse("content", &command.content)?,
            extra_payload: parse("extra_payload", &command.extra_payload)?,
            reply_data: parse("reply_data", &command.reply_data)?,
            action_type: command.action_type,
            agent_type: command.agent_type,
            wait_for_reply: command.wait_for_reply,
            status: command.status,
            private_dir: command.workspace.private_dir,
            public_dir: command.workspace.public_dir,
        })
    }

    /// True for a RESUME (a reply from another agent or the user).
    pub fn is_resume(&self) -> bool {
        self.action_type == "RESUME"
    }

    /// The content as plain text: a string as it is; for a list of messages
    /// the last user message's text (its `content` string, or `content.text`).
    pub fn text(&self) -> String {
        fn message_text(content: &Value) -> Option<String> {
            match content {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("text").and_then(Value::as_str).map(str::to_owned),
                _ => None,
            }
        }
        match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(messages) => messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
                .or_else(|| messages.last())
                .and_then(|m| message_text(m.get("content").unwrap_or(m)))
                .unwrap_or_default(),
            Value::Null => String::new(),
            other => other.to_string(),
        }
    }

    /// The task's private workspace (`input/`, `temp/`, `output/`,
    /// `system/`): writable, removed when the task ends. Empty unless the
    /// manifest asked for a [`Manifest::workspace`].
    pub fn private_dir(&self) -> PathBuf {
        PathBuf::from(&self.private_dir)
    }

    /// The session's public workspace (`session/`, `memory/local_db/`,
    /// `agent_skills/`): kept as long as the session. Empty unless the
    /// manifest asked for a [`Manifest::workspace`].
    pub fn public_dir(&self) -> PathBuf {
        PathBuf::from(&self.public_dir)
    }
}

/// Streaming output to the session.
pub mod emit;

/// Tools offered by plugins.
pub mod tools;

/// Other agents and the cluster. Calls look blocking; the host waits for
/// the reply without holding a thread (or the task's concurrency slot).
pub mod agents;

/// Questions to the user.
pub mod user;

/// The session's history (shared by every worker of the cluster).
pub mod history;

/// Prompt templates of plugin manifests.
pub mod prompts;

/// Lines in the daemon's log, tagged with the plugin and the task.
pub mod log;

/// A value of this plugin's `[plugins.<id>.config]` table in the daemon's
/// configuration (an endpoint, an API key); `None` when unset.
pub fn config(key: &str) -> Option<String> {
    host::runtime::get_config(key)
}

/// True once a cancel was requested: return early (the host stops the task
/// after a grace period anyway).
pub fn is_cancelled() -> bool {
    host::runtime::is_cancelled()
}
