use super::host::emit as raw;
use super::host::types;
use serde_json::Value;

/// A piece of the answer (`answerDelta`, role `assistant`).
pub fn chunk(text: &str) {
    raw::emit_chunk(text);
}

/// A piece of the answer with more than text; see [`Chunk`].
pub fn message(chunk: Chunk) {
    raw::emit_message(&types::Chunk {
        text: chunk.text,
        role: chunk.role,
        event_type: chunk.event_type,
        tool_calls: chunk.tool_calls.map(|v| v.to_string()),
        function_call: chunk.function_call.map(|v| v.to_string()),
        metadata: chunk.metadata.map(|v| v.to_string()),
    });
}

/// A state line (`reasoningLogDelta`, contentType 3003), e.g. `SEARCHING`.
pub fn state(state: &str) {
    raw::emit_state(state);
}

/// A produced file (contentType 3010). `metadata` must be a JSON object.
pub fn artifact(url: &str, metadata: Value) {
    raw::emit_artifact(url, &metadata.to_string());
}

/// Any event: event type, content type code, optional role and content,
/// metadata object.
pub fn event(
    event_type: &str,
    content_type: &str,
    role: Option<&str>,
    content: Option<&str>,
    metadata: Option<Value>,
) {
    raw::emit_event(&types::Event {
        event_type: event_type.to_owned(),
        content_type: content_type.to_owned(),
        role: role.map(str::to_owned),
        content: content.map(str::to_owned),
        metadata: metadata.map(|v| v.to_string()),
    });
}

/// A rich chunk: text plus role, event type, tool calls, metadata.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    text: String,
    role: Option<String>,
    event_type: Option<String>,
    tool_calls: Option<Value>,
    function_call: Option<Value>,
    metadata: Option<Value>,
}

impl Chunk {
    /// A chunk of text.
    pub fn new(text: impl Into<String>) -> Self {
        Chunk {
            text: text.into(),
            ..Chunk::default()
        }
    }
    /// `delta.role` (default `assistant`).
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = Some(role.into());
        self
    }
    /// Event type (default `answerDelta`; `appStreamResponse` ends the reply).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }
    /// `delta.tool_calls` (a list in OpenAI layout).
    pub fn tool_calls(mut self, tool_calls: Value) -> Self {
        self.tool_calls = Some(tool_calls);
        self
    }
    /// `delta.function_call` (an object in OpenAI layout).
    pub fn function_call(mut self, function_call: Value) -> Self {
        self.function_call = Some(function_call);
        self
    }
    /// Event metadata (a JSON object).
    pub fn metadata(mut self, metadata: Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
}
