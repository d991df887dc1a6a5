//! `tools`: calls a tool of any loaded plugin — the caller's own first — in
//! a fresh instance of that plugin (a component instance cannot be
//! re-entered while it waits in a host call), after checking the arguments
//! against the tool's JSON Schema; and lists every tool for a model.

use super::{MAX_TOOL_DEPTH, TaskHost, TaskState};
use crate::bindings::GuestError;
use crate::bindings::byclaw::gateway::tools::Host;
use crate::bindings::byclaw::gateway::types::Tool;
use crate::plugin::{CallError, Plugin};
use std::sync::Arc;

/// Finds the plugin offering `name`: `plugin-id/tool` names one plugin;
/// a plain name is looked up in the caller's plugin, then in every loaded
/// plugin. Returns the plugin and the tool's own name.
fn resolve(host: &TaskHost, name: &str) -> Result<(Arc<Plugin>, String), GuestError> {
    let table = host.task.plugins.load();
    if let Some((plugin_id, tool)) = name.split_once('/') {
        return table
            .plugin(plugin_id)
            .filter(|plugin| plugin.tool(tool).is_some())
            .map(|plugin| (plugin.clone(), tool.to_owned()))
            .ok_or_else(|| {
                GuestError::NotFound(format!(
                    "no loaded plugin {plugin_id:?} offers tool {tool:?}"
                ))
            });
    }
    if host.plugin.tool(name).is_some() {
        return Ok((host.plugin.clone(), name.to_owned()));
    }
    table
        .tool_owner(name)
        .map(|plugin| (plugin.clone(), name.to_owned()))
        .ok_or_else(|| GuestError::NotFound(format!("no loaded plugin offers tool {name:?}")))
}

impl Host for TaskState {
    async fn call_tool(
        &mut self,
        name: String,
        args: String,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        let _timer = self.timed(crate::port::HostImport::CallTool);
        let host = self.host("call-tool")?.clone();
        let (plugin, tool) = match resolve(&host, &name) {
            Ok(found) => found,
            Err(error) => return Ok(Err(error)),
        };
        // Before anything proportional to their size: no parse, no schema
        // check of arguments the limit refuses anyway.
        if args.len() > self.max_tool_bytes {
            return Ok(Err(GuestError::InvalidInput(format!(
                "arguments of tool {name:?} are {} bytes, over the limit of {} bytes (plugins.max_result_bytes)",
                args.len(),
                self.max_tool_bytes
            ))));
        }
        let value = match serde_json::from_str::<serde_json::Value>(&args) {
            Ok(value @ serde_json::Value::Object(_)) => value,
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
        };
        if let Err(problems) = plugin.check_tool_args(&tool, &value) {
            return Ok(Err(GuestError::InvalidInput(format!(
                "arguments of tool {name:?} do not match its input schema: {problems}"
            ))));
        }
        // No confused deputy: a tool runs with its own plugin's policy (its
        // outbound hosts, its configuration values), so that plugin says
        // who may borrow them.
        let caller = host.plugin.manifest.id.as_str();
        let owner = plugin.manifest.id.as_str();
        let allowed = caller == owner || plugin.policy().lets_call_tools(caller);
        host.task.port.tool_call(caller, owner, allowed);
        if !allowed {
            tracing::warn!(caller, plugin = owner, %tool, message_id = %host.task.message_id, "tool call refused by the tool's plugin (tool_callers)");
            return Ok(Err(GuestError::Denied(format!(
                "plugin {owner:?} does not let plugin {caller:?} call its tools (plugins.{owner}.tool_callers)"
            ))));
        }
        if host.depth >= MAX_TOOL_DEPTH {
            return Ok(Err(GuestError::Denied(format!(
                "tool calls nest deeper than {MAX_TOOL_DEPTH}"
            ))));
        }
        let nested = TaskHost {
            task: host.task.clone(),
            plugin: plugin.clone(),
            depth: host.depth + 1,
        };
        tracing::debug!(caller = %host.plugin.label(), plugin = %plugin.label(), %tool, message_id = %host.task.message_id, "tool call");
        // A child of the task's span (or of the tool call this one is
        // nested in) in traces.
        let span = tracing::info_span!(
            "call-tool",
            tool = %tool,
            plugin = %plugin.label(),
            caller = %host.plugin.label(),
            otel.status_code = tracing::field::Empty,
        );
        // Boxed: the nested call may itself call tools.
        let result = tracing::Instrument::instrument(
            Box::pin(plugin.invoke_tool(nested, &tool, &args)),
            span.clone(),
        )
        .await;
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        Ok(match result {
            Ok(json) if json.len() > self.max_tool_bytes => Err(GuestError::Failed(format!(
                "tool {name:?} returned {} bytes, over the limit of {} bytes (plugins.max_result_bytes)",
                json.len(),
                self.max_tool_bytes
            ))),
            Ok(json) => Ok(json),
            Err(CallError::Guest(error)) => Err(error),
            Err(CallError::Trap(reason)) => Err(GuestError::Failed(format!(
                "tool {name:?} trapped: {reason}"
            ))),
        })
    }

    async fn list_tools(&mut self) -> wasmtime::Result<Vec<Tool>> {
        let _timer = self.timed(crate::port::HostImport::ListTools);
        let host = self.host("list-tools")?;
        let table = host.task.plugins.load();
        Ok(table
            .tools()
            .map(|(listed_name, spec)| Tool {
                name: listed_name,
                description: spec.description.clone(),
                input_schema: spec.input_schema.to_string(),
            })
            .collect())
    }
}
