//! `tools`: calls a tool of the task's own plugin in a fresh instance (a
//! component instance cannot be re-entered while it waits in a host call).

use super::{MAX_TOOL_DEPTH, TaskHost, TaskState};
use crate::plugin::CallError;
use crate::plugin::bindings::GuestError;
use crate::plugin::bindings::byclaw::gateway::tools::Host;

impl Host for TaskState {
    async fn call_tool(
        &mut self,
        name: String,
        args: String,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        let host = self.host("call-tool")?.clone();
        let plugin = host.shared.plugin.clone();
        if !plugin.manifest.tools.iter().any(|tool| tool.name == name) {
            return Ok(Err(GuestError::NotFound(format!(
                "tool {name:?} is not offered by plugin {}",
                plugin.manifest.id
            ))));
        }
        match serde_json::from_str::<serde_json::Value>(&args) {
            Ok(serde_json::Value::Object(_)) => {}
            Ok(_) => {
                return Ok(Err(GuestError::InvalidInput(
                    "tool arguments must be a JSON object".into(),
                )));
            }
            Err(e) => {
                return Ok(Err(GuestError::InvalidInput(format!(
                    "tool arguments are not valid JSON: {e}"
                ))));
            }
        }
        if host.depth >= MAX_TOOL_DEPTH {
            return Ok(Err(GuestError::Denied(format!(
                "tool calls nest deeper than {MAX_TOOL_DEPTH}"
            ))));
        }
        let nested = TaskHost {
            shared: host.shared.clone(),
            depth: host.depth + 1,
        };
        tracing::debug!(plugin = %host.shared.plugin_label, tool = %name, "tool call");
        // Boxed: the nested call may itself call tools.
        let result = Box::pin(plugin.invoke_tool(nested, &name, &args)).await;
        Ok(match result {
            Ok(json) => Ok(json),
            Err(CallError::Guest(error)) => Err(error),
            Err(CallError::Trap(reason)) => Err(GuestError::Failed(format!(
                "tool {name:?} trapped: {reason}"
            ))),
        })
    }
}
