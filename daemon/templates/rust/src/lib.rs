//! {{name}}: a gatewayd agent made from the Rust template.
//!
//! It counts the words of what it is told with its own tool `word_count`
//! (declared with a JSON Schema in the manifest; other agents may call it
//! too), then answers "You said: …" word by word, one chunk per word.

use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, Tool, emit, export_agent, tools};
use serde_json::{Value, json};

/// The plugin id, and the agent type it serves.
const NAME: &str = "{{name}}";

struct Plugin;

impl Agent for Plugin {
    fn manifest() -> Manifest {
        Manifest::new(NAME, env!("CARGO_PKG_VERSION"))
            .description(env!("CARGO_PKG_DESCRIPTION"))
            .capability(NAME)
            .tool(Tool::new(
                "word_count",
                "Counts the words of a text",
                json!({
                    "type": "object",
                    "properties": {
                        "text": { "type": "string", "description": "The text to count the words of" }
                    },
                    "required": ["text"],
                    "additionalProperties": false
                }),
            ))
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let text = command.text();
        emit::state("COUNTING");
        // Through the host, as any agent calls a tool: it checks the
        // arguments against the schema and runs the tool in a sandbox of its
        // own. An error ends the task with FAILED.
        let counted = tools::call("word_count", &json!({ "text": text }))?;
        let words = counted["words"].as_u64().unwrap_or_default();
        let answer = format!("You said: {text}");
        // Each word with the spaces after it: the chunks add up to the answer.
        for word in answer.split_inclusive(char::is_whitespace) {
            emit::chunk(word);
        }
        Ok(json!({ "answer": answer, "words": words }))
    }

    fn invoke_tool(name: &str, args: Value) -> Result<Value, Error> {
        match name {
            "word_count" => {
                let text = args["text"]
                    .as_str()
                    .ok_or_else(|| Error::InvalidInput("`text` (a string) is required".into()))?;
                Ok(json!({ "words": text.split_whitespace().count() }))
            }
            other => Err(Error::NotFound(format!("tool {other:?}"))),
        }
    }
}

export_agent!(Plugin);
