//! The showcase agent: reports a state, calls its own `word_count` tool,
//! writes a report into its private workspace and announces it as an
//! artifact, streams the answer and marks its end.

use byclaw_plugin_sdk::emit::Chunk;
use byclaw_plugin_sdk::{
    Agent, Command, Error, Manifest, Prompt, Tool, emit, export_agent, log, tools,
};
use serde_json::{Value, json};

struct Showcase;

impl Agent for Showcase {
    fn manifest() -> Manifest {
        Manifest::new("showcase", env!("CARGO_PKG_VERSION"))
            .description("Shows states, a tool call and an artifact")
            .capability("showcase")
            .workspace()
            .tool(Tool::new(
                "word_count",
                "Counts the words of a text",
                json!({
                    "type": "object",
                    "properties": { "text": { "type": "string" } },
                    "required": ["text"]
                }),
            ))
            .prompt(Prompt::new(
                "summarize",
                "Asks for a summary",
                "Summarize in one sentence: {text}",
            ))
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let text = command.text();
        emit::state("ANALYZING");
        log::info(&format!("analyzing {} bytes", text.len()));
        let counted = tools::call("word_count", &json!({ "text": text }))?;
        let words = counted["words"].as_u64().unwrap_or(0);
        emit::chunk(&format!("Your message has {words} words. "));

        let report = command.private_dir().join("output/report.txt");
        std::fs::write(&report, format!("words: {words}\ntext: {text}\n"))?;
        let url = format!("file://{}", report.display());
        emit::artifact(&url, json!({ "name": "report.txt" }));

        emit::message(Chunk::new("The report is attached.").event_type("appStreamResponse"));
        Ok(json!({ "words": words, "report": report.display().to_string() }))
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

export_agent!(Showcase);
