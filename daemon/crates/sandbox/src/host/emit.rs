//! `emit`: the guest's streamed output, serialized as DataMessage JSON and
//! handed to the task port, which queues it on the event writer (no round
//! trip per event).

use super::TaskState;
use crate::bindings::byclaw::gateway::emit::Host;
use crate::bindings::{Chunk, Event};
use crate::port::HostImport;
use byclaw_protocol::{self as wire, Delta, EventSpec, content_type, event_type};
use serde_json::value::RawValue;

/// Parses guest JSON that must be an object (event metadata).
fn object(json: &str, what: &str) -> wasmtime::Result<Box<RawValue>> {
    let raw = RawValue::from_string(json.to_owned())
        .map_err(|e| wasmtime::format_err!("{what} is not valid JSON: {e}"))?;
    if !raw.get().trim_start().starts_with('{') {
        wasmtime::bail!("{what} must be a JSON object");
    }
    Ok(raw)
}

/// Parses guest JSON of any shape (tool calls, function call).
fn any_json(json: &str, what: &str) -> wasmtime::Result<Box<RawValue>> {
    RawValue::from_string(json.to_owned())
        .map_err(|e| wasmtime::format_err!("{what} is not valid JSON: {e}"))
}

impl TaskState {
    async fn push_event(&mut self, event: &EventSpec<'_>) -> wasmtime::Result<()> {
        let host = self.host("emit")?;
        let at_least = event.min_json_len();
        if at_least > self.max_event_bytes {
            wasmtime::bail!(
                "event of at least {at_least} bytes exceeds the limit of {} bytes (plugins.max_event_bytes)",
                self.max_event_bytes
            );
        }
        let data = wire::data_message(&host.task.origin, event);
        if data.len() > self.max_event_bytes {
            wasmtime::bail!(
                "event of {} bytes exceeds the limit of {} bytes (plugins.max_event_bytes)",
                data.len(),
                self.max_event_bytes
            );
        }
        let port = host.task.port.clone();
        if let Some(pace) = &mut self.emit_pace {
            let wait = pace.next(std::time::Instant::now());
            if !wait.is_zero() {
                // Past its rate: the guest waits here (its deadline and a
                // cancel still stop it), costing no CPU meanwhile.
                tokio::time::sleep(wait).await;
            }
        }
        port.emit(data).await.map_err(wasmtime::Error::new)
    }
}

impl Host for TaskState {
    async fn emit_chunk(&mut self, text: String) -> wasmtime::Result<()> {
        let _timer = self.timed(HostImport::EmitChunk);
        let event = EventSpec {
            event_type: event_type::ANSWER_DELTA,
            content_type: content_type::TEXT,
            delta: Delta {
                role: Some("assistant"),
                content: Some(&text),
                ..Delta::default()
            },
            metadata: None,
        };
        self.push_event(&event).await?;
        self.host("emit")?.task.port.add_to_reply(&text, false);
        Ok(())
    }

    async fn emit_message(&mut self, chunk: Chunk) -> wasmtime::Result<()> {
        let _timer = self.timed(HostImport::EmitMessage);
        let tool_calls = chunk
            .tool_calls
            .as_deref()
            .map(|j| any_json(j, "chunk.tool-calls"))
            .transpose()?;
        let function_call = chunk
            .function_call
            .as_deref()
            .map(|j| any_json(j, "chunk.function-call"))
            .transpose()?;
        let metadata = chunk
            .metadata
            .as_deref()
            .map(|j| object(j, "chunk.metadata"))
            .transpose()?;
        let event = EventSpec {
            event_type: chunk
                .event_type
                .as_deref()
                .unwrap_or(event_type::ANSWER_DELTA),
            content_type: content_type::TEXT,
            delta: Delta {
                role: Some(chunk.role.as_deref().unwrap_or("assistant")),
                content: Some(&chunk.text),
                function_call: function_call.as_deref(),
                tool_calls: tool_calls.as_deref(),
            },
            metadata: metadata.as_deref(),
        };
        self.push_event(&event).await?;
        // `appStreamResponse` marks the end of the reply: it is saved now,
        // as the reference does.
        let end = chunk.event_type.as_deref() == Some(event_type::APP_STREAM_RESPONSE);
        self.host("emit")?.task.port.add_to_reply(&chunk.text, end);
        Ok(())
    }

    async fn emit_state(&mut self, state: String) -> wasmtime::Result<()> {
        let _timer = self.timed(HostImport::EmitState);
        let event = EventSpec {
            event_type: event_type::REASONING_LOG_DELTA,
            content_type: content_type::THINK_TITLE,
            delta: Delta {
                content: Some(&state),
                ..Delta::default()
            },
            metadata: None,
        };
        self.push_event(&event).await
    }

    async fn emit_artifact(&mut self, url: String, metadata: String) -> wasmtime::Result<()> {
        let _timer = self.timed(HostImport::EmitArtifact);
        let metadata = object(&metadata, "emit-artifact metadata")?;
        let files = serde_json::to_string(&[serde_json::json!({ "fileUrl": url })])?;
        let event = EventSpec {
            event_type: event_type::REASONING_LOG_DELTA,
            content_type: content_type::CREATE_FILE,
            delta: Delta {
                content: Some(&files),
                ..Delta::default()
            },
            metadata: Some(&metadata),
        };
        self.push_event(&event).await
    }

    async fn emit_event(&mut self, event: Event) -> wasmtime::Result<()> {
        let _timer = self.timed(HostImport::EmitEvent);
        if event.event_type.is_empty() || event.content_type.is_empty() {
            wasmtime::bail!("emit-event needs an event-type and a content-type");
        }
        let metadata = event
            .metadata
            .as_deref()
            .map(|j| object(j, "event.metadata"))
            .transpose()?;
        let spec = EventSpec {
            event_type: &event.event_type,
            content_type: &event.content_type,
            delta: Delta {
                role: event.role.as_deref(),
                content: event.content.as_deref(),
                ..Delta::default()
            },
            metadata: metadata.as_deref(),
        };
        self.push_event(&spec).await
    }
}
