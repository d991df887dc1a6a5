//! The echo agent: streams its input back in three chunks (the work of the
//! reference benchmark worker) and returns it as JSON.

use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, emit, export_agent};
use serde_json::{Value, json};

struct Echo;

impl Agent for Echo {
    fn manifest() -> Manifest {
        Manifest::new("echo", env!("CARGO_PKG_VERSION"))
            .description("Streams the input text back in three chunks")
            .capability("echo")
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let text = command.text();
        let chars: Vec<char> = text.chars().collect();
        for part in 0..3 {
            let piece: String = chars[chars.len() * part / 3..chars.len() * (part + 1) / 3]
                .iter()
                .collect();
            emit::chunk(&piece);
        }
        Ok(json!({ "echo": text, "chunks": 3 }))
    }
}

export_agent!(Echo);
