//! The planner agent: a small orchestration that uses every way an agent
//! can reach beyond itself.
//!
//! 1. `call-agent`: has the `translator` translate the topic;
//! 2. `dispatch-group`: asks three `researcher` tasks at once (history,
//!    applications, risks) and waits for all of them;
//! 3. `call-tool`: `word_stats`, a tool of the separate `tools` plugin;
//! 4. `ask-user`: asks which aspect to focus on;
//!
//! then streams a summary. A RESUME it receives directly (the user answered
//! after the question timed out) is acknowledged as a late answer.
//!
//! `extra_payload` knobs, for demos and tests: `language` (translator,
//! default `fr`), `translate_delay_ms`, `research_delay_ms`,
//! `call_timeout_ms`, `ask_timeout_ms`, `skip_ask` (focus on history).

use byclaw_plugin_sdk::agents::{self, AgentTask, CallOptions};
use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, emit, export_agent, tools, user};
use serde_json::{Value, json};
use std::time::Duration;

const ASPECTS: [&str; 3] = ["history", "applications", "risks"];

struct Planner;

fn millis(options: &Value, key: &str) -> Option<Duration> {
    options[key].as_u64().map(Duration::from_millis)
}

impl Agent for Planner {
    fn manifest() -> Manifest {
        Manifest::new("planner", env!("CARGO_PKG_VERSION"))
            .description(
                "Plans a short report with a translator, three researchers, a tool and the user",
            )
            .capability("planner")
    }

    fn handle(command: Command) -> Result<Value, Error> {
        if command.is_resume() {
            let answer = match &command.content {
                Value::String(text) if !text.is_empty() => text.clone(),
                _ => command.reply_data.to_string(),
            };
            emit::chunk(&format!("Thanks, noted your answer: {answer}"));
            return Ok(json!({ "late_answer": answer, "status": command.status }));
        }
        let topic = command.text();
        let options = &command.extra_payload;
        emit::state("PLANNING");

        let translated = agents::call_with(
            "translator",
            &topic,
            CallOptions {
                payload: Some(json!({
                    "language": options["language"].as_str().unwrap_or("fr"),
                    "delay_ms": options["translate_delay_ms"].as_u64().unwrap_or(0),
                })),
                timeout: millis(options, "call_timeout_ms"),
                ..CallOptions::default()
            },
        )?
        .into_result()?;
        let title = translated["translation"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        emit::chunk(&format!("# {title}\n"));

        let tasks = ASPECTS
            .iter()
            .map(|aspect| {
                AgentTask::new("researcher", topic.clone()).payload(json!({
                    "aspect": aspect,
                    "delay_ms": options["research_delay_ms"].as_u64().unwrap_or(0),
                }))
            })
            .collect();
        let mut findings = Vec::with_capacity(ASPECTS.len());
        for reply in agents::dispatch_group(tasks, millis(options, "call_timeout_ms")) {
            let result = reply?.into_result()?;
            findings.push(result["finding"].as_str().unwrap_or_default().to_owned());
        }
        for finding in &findings {
            emit::chunk(&format!("- {finding}\n"));
        }

        let stats = tools::call(
            "word_stats",
            &json!({ "text": findings.join(" "), "min_length": 8 }),
        )?;

        let focus = if options["skip_ask"].as_bool().unwrap_or(false) {
            "history".to_owned()
        } else {
            user::ask_with(
                "Which aspect should the summary focus on: history, applications or risks?",
                millis(options, "ask_timeout_ms"),
            )?
            .text()
        };
        emit::chunk(&format!(
            "Focus: {focus}. {} words in the findings, {} of them long.",
            stats["words"], stats["long_words"]
        ));
        Ok(json!({
            "topic": topic,
            "title": title,
            "findings": findings,
            "stats": stats,
            "focus": focus,
        }))
    }
}

export_agent!(Planner);
