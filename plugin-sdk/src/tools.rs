use super::{Error, host};
use serde_json::{Value, json};

/// A tool as [`list`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolInfo {
    /// The name to pass to [`call`].
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
}

/// Calls a tool by name — this plugin's own first, then any loaded
/// plugin's (`plugin-id/name` picks one) — in a fresh sandbox. The host
/// checks `args` against the tool's input schema first: a mismatch is
/// [`Error::InvalidInput`], an unknown tool [`Error::NotFound`].
pub fn call(name: &str, args: &Value) -> Result<Value, Error> {
    let result = host::tools::call_tool(name, &args.to_string()).map_err(Error::from_wit)?;
    Ok(serde_json::from_str(&result)?)
}

/// Every tool the loaded plugins offer.
pub fn list() -> Vec<ToolInfo> {
    host::tools::list_tools()
        .into_iter()
        .map(|tool| ToolInfo {
            name: tool.name,
            description: tool.description,
            input_schema: serde_json::from_str(&tool.input_schema).unwrap_or(Value::Null),
        })
        .collect()
}

/// [`list`] as the result of MCP `tools/list`:
/// `{"tools": [{"name", "description", "inputSchema"}]}`.
pub fn list_mcp() -> Value {
    let tools: Vec<Value> = list()
        .into_iter()
        .map(|tool| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "inputSchema": tool.input_schema,
            })
        })
        .collect();
    json!({ "tools": tools })
}
