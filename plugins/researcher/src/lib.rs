//! The researcher agent: looks at one aspect of a topic and reports a
//! finding. A stand-in for an agent that would search or call a model; the
//! planner fans out to several of them with `dispatch-group`.
//! `extra_payload.aspect` names the aspect; `extra_payload.delay_ms` makes
//! it work that long (checking for a cancel every 10 ms).

use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, emit, export_agent, is_cancelled};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

struct Researcher;

impl Agent for Researcher {
    fn manifest() -> Manifest {
        Manifest::new("researcher", env!("CARGO_PKG_VERSION"))
            .description("Reports a finding on one aspect of a topic")
            .capability("researcher")
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let topic = command.text();
        let aspect = command.extra_payload["aspect"]
            .as_str()
            .unwrap_or("overview")
            .to_owned();
        emit::state(&format!("RESEARCHING: {aspect}"));
        let delay = command.extra_payload["delay_ms"].as_u64().unwrap_or(0);
        let until = Instant::now() + Duration::from_millis(delay);
        while Instant::now() < until {
            if is_cancelled() {
                return Err(Error::Cancelled("stopped on request".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let finding = format!(
            "The {aspect} of {topic} deserve a closer look ({} words considered)",
            topic.split_whitespace().count()
        );
        emit::chunk(&finding);
        Ok(json!({ "aspect": aspect, "topic": topic, "finding": finding }))
    }
}

export_agent!(Researcher);
