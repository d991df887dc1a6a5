//! The tools plugin: offers tools to every other agent (`call-tool` reaches
//! the tools of any loaded plugin, with the arguments checked against the
//! tool's input schema first). Asked directly (capability `tools`) it is a
//! small console onto the host API:
//!
//! - any text: the catalog of all loaded tools, MCP `tools/list` shape;
//! - `{"call": NAME, "args": {...}}`: calls a tool, answers
//!   `{"ok": result}` or `{"error": {"kind", "message"}}`;
//! - `{"workers": true}`: the cluster's active workers;
//! - `{"render": PROMPT, "variables": {...}}`: renders a prompt template,
//!   answers `{"ok": text}` or `{"error": ...}`;
//! - `{"config": KEY}`: the plugin's configuration value, `{"value": ...}`;
//! - `{"allocate_mb": N}`: grows its memory by N MiB (to show the cap).

use byclaw_plugin_sdk::{
    Agent, Command, Error, Manifest, Prompt, Tool, agents, emit, export_agent, prompts, tools,
};
use serde_json::{Value, json};

struct Tools;

impl Agent for Tools {
    fn manifest() -> Manifest {
        Manifest::new("tools", env!("CARGO_PKG_VERSION"))
            .description("Arithmetic and text statistics tools for other agents")
            .capability("tools")
            .prompt(Prompt::new(
                "explain",
                "Asks a model to explain a tool result",
                "Explain to {audience} what {tool} returned: {result}",
            ))
            .tool(Tool::new(
                "add",
                "Adds two numbers",
                json!({
                    "type": "object",
                    "properties": {
                        "a": { "type": "number" },
                        "b": { "type": "number" }
                    },
                    "required": ["a", "b"],
                    "additionalProperties": false
                }),
            ))
            .tool(Tool::new(
                "word_stats",
                "Counts the words of a text, and those at least min_length characters long",
                json!({
                    "type": "object",
                    "properties": {
                        "text": { "type": "string" },
                        "min_length": { "type": "integer", "minimum": 1 }
                    },
                    "required": ["text"],
                    "additionalProperties": false
                }),
            ))
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let request: Value = serde_json::from_str(&command.text()).unwrap_or(Value::Null);
        let answer = if let Some(name) = request["call"].as_str() {
            let args = request.get("args").cloned().unwrap_or_else(|| json!({}));
            match tools::call(name, &args) {
                Ok(result) => json!({ "ok": result }),
                Err(error) => {
                    json!({ "error": { "kind": kind(&error), "message": error.to_string() } })
                }
            }
        } else if let Some(prompt) = request["render"].as_str() {
            let variables: Vec<(String, String)> = request["variables"]
                .as_object()
                .map(|vars| {
                    vars.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let pairs: Vec<(&str, &str)> = variables
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match prompts::render(prompt, &pairs) {
                Ok(text) => json!({ "ok": text }),
                Err(error) => {
                    json!({ "error": { "kind": kind(&error), "message": error.to_string() } })
                }
            }
        } else if let Some(key) = request["config"].as_str() {
            json!({ "value": byclaw_plugin_sdk::config(key) })
        } else if let Some(mb) = request["allocate_mb"].as_u64() {
            let block = vec![1u8; (mb as usize) << 20];
            json!({ "allocated_mb": mb, "checksum": block.iter().map(|b| *b as u64).sum::<u64>() >> 20 })
        } else if request["workers"] == json!(true) {
            let workers: Vec<Value> = agents::active_workers()?
                .into_iter()
                .map(|w| {
                    json!({
                        "worker_id": w.worker_id,
                        "capabilities": w.capabilities,
                        "last_seen": w.last_seen_ms,
                    })
                })
                .collect();
            json!({ "workers": workers })
        } else {
            tools::list_mcp()
        };
        emit::chunk(&answer.to_string());
        Ok(answer)
    }

    fn invoke_tool(name: &str, args: Value) -> Result<Value, Error> {
        match name {
            "add" => {
                let a = args["a"].as_f64().unwrap_or_default();
                let b = args["b"].as_f64().unwrap_or_default();
                Ok(json!({ "sum": a + b }))
            }
            "word_stats" => {
                let text = args["text"].as_str().unwrap_or_default();
                let min_length = args["min_length"].as_u64().unwrap_or(6) as usize;
                let words: Vec<&str> = text.split_whitespace().collect();
                let long_words = words
                    .iter()
                    .filter(|w| w.chars().count() >= min_length)
                    .count();
                Ok(json!({
                    "words": words.len(),
                    "long_words": long_words,
                    "characters": text.chars().count()
                }))
            }
            other => Err(Error::NotFound(format!("tool {other:?}"))),
        }
    }
}

fn kind(error: &Error) -> &'static str {
    match error {
        Error::InvalidInput(_) => "invalid-input",
        Error::NotFound(_) => "not-found",
        Error::Denied(_) => "denied",
        Error::Timeout(_) => "timeout",
        Error::Cancelled(_) => "cancelled",
        Error::Unavailable(_) => "unavailable",
        Error::Failed(_) => "failed",
    }
}

export_agent!(Tools);
