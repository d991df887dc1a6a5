//! A loaded plugin: its checked manifest, its compiled component, and
//! running one call of it — `handle` or `invoke-tool` — in a fresh store on
//! the guest runtime.

use crate::bindings::{AgentPre, Command, GuestError, Header, Workspace};
use crate::engine::Sandbox;
use crate::hooks::HookSet;
use crate::host::{TaskHost, TaskState};
use crate::policy::{Limits, Policy};
use crate::wasi::{GUEST_PRIVATE_DIR, GUEST_PUBLIC_DIR};
use byclaw_protocol::{Action, ControlCommand};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use wasmtime::Store;

/// What a plugin declares about itself, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub id: String,
    pub version: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub tools: Vec<ToolSpec>,
    pub prompts: Vec<PromptSpec>,
    /// Whether tasks get a workspace (directories created, preopened).
    pub workspace: bool,
}

/// One tool of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: serde_json::Value,
}

/// One prompt template of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PromptSpec {
    pub name: String,
    pub description: String,
    pub template: String,
}

impl Manifest {
    pub(crate) fn validate(raw: crate::bindings::Manifest) -> Result<Manifest, String> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !id_ok(&raw.id) {
            return Err(format!("id {:?} must be 1-64 of [a-z0-9_-]", raw.id));
        }
        if raw.capabilities.is_empty() {
            return Err("capabilities is empty; a plugin serves at least one agent type".into());
        }
        for capability in &raw.capabilities {
            if !byclaw_protocol::is_safe_id(capability) || capability.len() > 128 {
                return Err(format!(
                    "capability {capability:?} must be 1-128 of [A-Za-z0-9._:@-]"
                ));
            }
        }
        let mut capabilities = raw.capabilities.clone();
        capabilities.sort();
        if let Some(pair) = capabilities.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("capability {:?} listed twice", pair[0]));
        }
        let mut tools = Vec::with_capacity(raw.tools.len());
        for tool in raw.tools {
            if tool.name.is_empty() {
                return Err("a tool has an empty name".into());
            }
            if tools.iter().any(|t: &ToolSpec| t.name == tool.name) {
                return Err(format!("tool {:?} listed twice", tool.name));
            }
            let input_schema = serde_json::from_str(&tool.input_schema)
                .map_err(|e| format!("tool {:?}: input-schema is not JSON: {e}", tool.name))?;
            tools.push(ToolSpec {
                name: tool.name,
                description: tool.description,
                input_schema,
            });
        }
        Ok(Manifest {
            id: raw.id,
            version: raw.version,
            description: raw.description,
            capabilities: raw.capabilities,
            tools,
            workspace: raw.workspace,
            prompts: raw
                .prompts
                .into_iter()
                .map(|p| PromptSpec {
                    name: p.name,
                    description: p.description,
                    template: p.template,
                })
                .collect(),
        })
    }
}

/// A compiled, linked plugin, ready to instantiate.
pub struct Plugin {
    pub manifest: Manifest,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// SHA-256 of the file's bytes: an unchanged file is not compiled again.
    pub digest: FileDigest,
    /// `digest` in lower-case hex, made once: what a pin names and what a
    /// task's execution record keeps.
    pub sha256: Arc<str>,
    /// Whether the compiled code came from the compile cache.
    pub from_cache: bool,
    /// Its limits and settings; swapped when the configuration is reloaded
    /// (a task keeps the one it started with).
    pub(crate) policy: arc_swap::ArcSwap<Policy>,
    /// `{"plugin_id", "plugin_version"}`, merged into its tasks' event metadata.
    pub stamp: Arc<serde_json::value::RawValue>,
    /// The lifecycle hooks it implements (none when it exports no hooks).
    pub hooks: HookSet,
    pub(crate) pre: AgentPre<TaskState>,
    /// Compiled input schema of each tool, by tool name.
    pub(crate) validators: std::collections::HashMap<String, jsonschema::Validator>,
    pub(crate) sandbox: Arc<Sandbox>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("id", &self.manifest.id)
            .field("version", &self.manifest.version)
            .field("path", &self.path)
            .finish()
    }
}

/// The SHA-256 of a plugin file.
pub type FileDigest = [u8; 32];

/// The SHA-256 of a plugin file: notices whether it changed, names its
/// compiled code in the cache, and is what `[plugins.<id>] sha256` pins.
pub fn file_digest(bytes: &[u8]) -> FileDigest {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

/// Aborts a spawned guest task when the caller stops waiting for it
/// (deadline, cancel, shutdown), so the guest stops at its next yield.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a call into a plugin ended, when it did not return normally.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The guest returned its own `error`.
    #[error("{}", guest_error_text(.0))]
    Guest(GuestError),
    /// The guest trapped (panic, memory cap, invalid host call...).
    #[error("{0}")]
    Trap(String),
}

pub(crate) fn guest_error_text(error: &GuestError) -> String {
    match error {
        GuestError::InvalidInput(m) => format!("invalid input: {m}"),
        GuestError::NotFound(m) => format!("not found: {m}"),
        GuestError::Denied(m) => format!("denied: {m}"),
        GuestError::Timeout(m) => format!("timeout: {m}"),
        GuestError::Cancelled(m) => format!("cancelled: {m}"),
        GuestError::Unavailable(m) => format!("unavailable: {m}"),
        GuestError::Failed(m) => m.clone(),
    }
}

/// Turns a wasmtime error into one line an operator understands.
pub(crate) fn describe_trap(error: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(limit) = error.downcast_ref::<crate::host::MemoryCapExceeded>() {
        return limit.to_string();
    }
    if let Some(limit) = error.downcast_ref::<crate::cpu::CpuBudgetExceeded>() {
        return limit.to_string();
    }
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return format!("deadline of {} s exceeded", limits.deadline.as_secs_f64());
        }
        let root = error.root_cause().to_string();
        return format!("plugin trapped: {trap}{}", trap_detail(error, &root));
    }
    format!("plugin trapped: {error:#}")
}

fn trap_detail(error: &wasmtime::Error, root: &str) -> String {
    // The wasm backtrace names the guest function, which is what a plugin
    // author needs; keep the first frame only to stay on one line.
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| {
            bt.frames()
                .first()
                .and_then(|f| f.func_name().map(str::to_owned))
        });
    match frame {
        Some(func) if !root.is_empty() => format!(" in {func}"),
        _ => String::new(),
    }
}

impl Plugin {
    /// The linear memory of every store of its sandbox, and the budget.
    pub fn guest_memory(&self) -> &Arc<crate::host::GuestMemory> {
        &self.sandbox.guest_memory
    }

    /// Its limits and settings now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The plugin's id and version, for logs.
    pub fn label(&self) -> String {
        format!("{}@{}", self.manifest.id, self.manifest.version)
    }

    /// The tool of this plugin with that name.
    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        self.manifest.tools.iter().find(|tool| tool.name == name)
    }

    /// Checks tool arguments against the tool's input schema; the error
    /// lists each violation with where it is (`/path: problem`).
    pub fn check_tool_args(&self, tool: &str, args: &serde_json::Value) -> Result<(), String> {
        let Some(validator) = self.validators.get(tool) else {
            return Ok(());
        };
        let problems: Vec<String> = validator
            .iter_errors(args)
            .take(8)
            .map(|error| {
                let at = error.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at}: {error}")
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn instantiate_store(&self, host: TaskHost) -> Result<Store<TaskState>, CallError> {
        let state = TaskState::new(host, &self.sandbox.limits)
            .map_err(|e| CallError::Trap(format!("cannot prepare the sandbox: {e}")))?;
        Ok(self.sandbox.store(state))
    }

    /// Runs `handle(command)` in a fresh instance on the guest runtime.
    /// Deadline and cancellation are the caller's: drop the future to stop
    /// the guest (it yields at every epoch tick, so it stops within
    /// [`EPOCH_TICK`](crate::EPOCH_TICK)).
    pub async fn handle(
        self: &Arc<Self>,
        host: TaskHost,
        command: &ControlCommand,
        agent_type: &str,
        history: Option<&serde_json::value::RawValue>,
    ) -> Result<String, CallError> {
        let command = to_wit_command(command, agent_type, host.task.dirs.is_some(), history);
        let plugin = self.clone();
        let mut task = self.on_guest_runtime(async move {
            let task = host.task.clone();
            task.cpu.measure(plugin.run_handle(host, command)).await
        });
        match (&mut task.0).await {
            Ok(result) => result,
            Err(error) => Err(CallError::Trap(format!(
                "the plugin's task failed: {error}"
            ))),
        }
    }

    /// Runs a call into the guest on the guest runtime, in the caller's
    /// span (the task's: what the host functions log, and the spans they
    /// open for traces, belong to it); dropping the handle stops it at its
    /// next yield.
    pub(crate) fn on_guest_runtime<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = T> + Send + 'static,
    ) -> AbortOnDrop<T> {
        let guests = self
            .sandbox
            .guests
            .as_ref()
            .expect("guest runtime lives as long as the sandbox");
        AbortOnDrop(guests.spawn(tracing::Instrument::in_current_span(call)))
    }

    async fn run_handle(&self, host: TaskHost, command: Command) -> Result<String, CallError> {
        let mut store = self.instantiate_store(host)?;
        let result = async {
            let instance = self.pre.instantiate(&mut store).await?;
            self.pre
                .handler(&mut store, &instance)?
                .call_handle(&mut store, &command)
                .await
        }
        .await;
        self.finish(&mut store, result)
    }

    /// Runs `invoke-tool(name, args)` in a fresh instance.
    pub async fn invoke_tool(
        &self,
        host: TaskHost,
        name: &str,
        args: &str,
    ) -> Result<String, CallError> {
        let mut store = self.instantiate_store(host)?;
        let result = async {
            let instance = self.pre.instantiate(&mut store).await?;
            self.pre
                .handler(&mut store, &instance)?
                .call_invoke_tool(&mut store, name, &args.to_owned())
                .await
        }
        .await;
        self.finish(&mut store, result)
    }

    fn finish(
        &self,
        store: &mut Store<TaskState>,
        result: wasmtime::Result<Result<String, GuestError>>,
    ) -> Result<String, CallError> {
        match result {
            Ok(Ok(json)) => {
                if serde_json::from_str::<serde::de::IgnoredAny>(&json).is_err() {
                    return Err(CallError::Guest(GuestError::InvalidInput(
                        "the plugin returned text that is not JSON".into(),
                    )));
                }
                Ok(json)
            }
            Ok(Err(guest)) => Err(CallError::Guest(guest)),
            Err(trap) => {
                if let Some(reason) = store.data().limiter.exceeded() {
                    return Err(CallError::Trap(reason));
                }
                Err(CallError::Trap(describe_trap(&trap, &self.sandbox.limits)))
            }
        }
    }
}

/// The WIT view of a command. `history`, a JSON array, goes into
/// `extra_payload.history` (replacing what the sender put there) when the
/// payload is an object.
fn to_wit_command(
    command: &ControlCommand,
    agent_type: &str,
    workspace: bool,
    history: Option<&serde_json::value::RawValue>,
) -> Command {
    let header = to_wit_header(&command.header);
    let (content, extra_payload, wait_for_reply, status, reply_data) = match &command.action {
        Action::AskAgent {
            content,
            wait_for_reply,
            extra_payload,
        } => (
            content,
            extra_payload,
            *wait_for_reply,
            String::new(),
            "null".to_owned(),
        ),
        Action::Resume {
            content,
            status,
            reply_data,
            extra_payload,
        } => (
            content,
            extra_payload,
            false,
            status.clone(),
            reply_data.to_string(),
        ),
        Action::CancelTask(_) => unreachable!("dispatch never hands a cancel to a plugin"),
    };
    Command {
        action_type: command.action.name().to_owned(),
        agent_type: agent_type.to_owned(),
        header,
        content: content.to_string(),
        extra_payload: match (history, extra_payload.as_object()) {
            (Some(history), Some(payload)) => with_history(payload, history),
            _ => extra_payload.to_string(),
        },
        wait_for_reply,
        status,
        reply_data,
        workspace: match workspace {
            true => Workspace {
                private_dir: GUEST_PRIVATE_DIR.to_owned(),
                public_dir: GUEST_PUBLIC_DIR.to_owned(),
            },
            false => Workspace {
                private_dir: String::new(),
                public_dir: String::new(),
            },
        },
    }
}

/// `payload` as a JSON object with `history` in it, the history's text
/// copied as it is (no tree of it is built).
fn with_history(
    payload: &serde_json::Map<String, serde_json::Value>,
    history: &serde_json::value::RawValue,
) -> String {
    use serde::ser::{SerializeMap, Serializer};
    let mut out = Vec::with_capacity(history.get().len() + 64);
    let mut serializer = serde_json::Serializer::new(&mut out);
    let written = (|| {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in payload.iter().filter(|(key, _)| *key != "history") {
            map.serialize_entry(key, value)?;
        }
        map.serialize_entry("history", history)?;
        map.end()
    })();
    written.expect("a JSON object serializes into memory");
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

/// The WIT view of a command's header.
pub(crate) fn to_wit_header(h: &byclaw_protocol::Header) -> Header {
    Header {
        message_id: h.message_id.clone(),
        session_id: h.session_id.clone(),
        trace_id: h.trace_id.clone(),
        source_agent_id: h.source_agent_id.clone(),
        target_agent_type: h.target_agent_type.clone(),
        parent_message_id: h.parent_message_id.clone(),
        task_group_id: h.task_group_id.clone(),
        tenant_id: h.tenant_id.clone(),
        metadata: h.metadata.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::with_history;
    use serde_json::{Value, json, value::RawValue};

    #[test]
    fn injected_history_replaces_the_senders_and_keeps_the_rest() {
        let payload = json!({"history": "the sender's", "tone": "dry", "n": [1, {"a": null}]});
        let history =
            RawValue::from_string(r#"[{"role":"user","content":"hi","metadata":{}}]"#.into())
                .unwrap();
        let text = with_history(payload.as_object().unwrap(), &history);
        let injected: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            injected,
            json!({
                "tone": "dry",
                "n": [1, {"a": null}],
                "history": [{"role": "user", "content": "hi", "metadata": {}}],
            })
        );
        let empty = RawValue::from_string("[]".into()).unwrap();
        assert_eq!(
            with_history(&serde_json::Map::new(), &empty),
            r#"{"history":[]}"#
        );
    }
}
