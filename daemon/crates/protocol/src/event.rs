//! DataMessages: the events written to `session:{id}:data_stream`, in the
//! reference's SSE layout, with the content types, event types and states
//! the host emits.

use crate::ids::{new_event_id, now_ms};
use serde::Serialize;
use serde_json::value::RawValue;
use std::sync::Arc;

/// SSE content type codes (strings on the wire).
pub mod content_type {
    pub const TEXT: &str = "1002";
    pub const THINK_TITLE: &str = "3003";
    pub const CREATE_FILE: &str = "3010";
    pub const USER_INPUT: &str = "3013";
}

/// Event types.
pub mod event_type {
    pub const ANSWER_DELTA: &str = "answerDelta";
    pub const REASONING_LOG_DELTA: &str = "reasoningLogDelta";
    /// Marks the end of the streamed reply (saved to history then).
    pub const APP_STREAM_RESPONSE: &str = "appStreamResponse";
}

/// Lifecycle states the host emits.
pub mod state {
    pub const COMPLETED: &str = "COMPLETED";
    pub const FAILED: &str = "FAILED";
    pub const CANCELLING: &str = "CANCELLING";
    pub const CANCELLED: &str = "CANCELLED";
    pub const RESUMED: &str = "RESUMED";
    pub const CALLING_AGENT: &str = "CALLING_AGENT";
    pub const WAITING_AGENT: &str = "WAITING_AGENT";
    pub const WAITING_USER: &str = "WAITING_USER";
    /// Execution statuses after which a redelivered entry is skipped.
    pub fn is_terminal(status: &str) -> bool {
        matches!(status, COMPLETED | FAILED | CANCELLED)
    }
}

/// Who an event is from; the same for every event of one task.
#[derive(Debug, Clone)]
pub struct EventOrigin {
    pub trace_id: String,
    pub session_id: String,
    /// The agent type that runs the task (`source_agent_id` of its events).
    pub agent_id: String,
    /// The command being handled.
    pub message_id: String,
    /// `{"plugin_id": ..., "plugin_version": ...}` of the plugin version
    /// running the task, merged into every event's metadata.
    pub plugin: Option<Arc<RawValue>>,
}

/// The metadata stamp of a plugin version (see [`EventOrigin::plugin`]).
pub fn plugin_stamp(id: &str, version: &str) -> Arc<RawValue> {
    let json = serde_json::json!({ "plugin_id": id, "plugin_version": version }).to_string();
    Arc::from(RawValue::from_string(json).expect("a JSON object is valid JSON"))
}

/// Event metadata: the guest's object with the plugin stamp merged in
/// (unless the guest set `plugin_version` itself).
fn stamped_metadata<'a>(
    metadata: Option<&'a RawValue>,
    stamp: Option<&'a RawValue>,
) -> std::borrow::Cow<'a, RawValue> {
    use std::borrow::Cow;
    let empty: &'static RawValue =
        EMPTY_OBJECT.get_or_init(|| RawValue::from_string("{}".into()).expect("static JSON"));
    match (metadata, stamp) {
        (None, None) => Cow::Borrowed(empty),
        (Some(metadata), None) => Cow::Borrowed(metadata),
        (None, Some(stamp)) => Cow::Borrowed(stamp),
        (Some(metadata), Some(stamp)) => {
            let text = metadata.get().trim();
            let Some(inner) = text.strip_prefix('{') else {
                return Cow::Borrowed(metadata);
            };
            if text.contains("\"plugin_version\"") {
                return Cow::Borrowed(metadata);
            }
            let fields = &stamp.get()[1..stamp.get().len() - 1];
            let inner = inner.trim_start();
            let merged = if inner.starts_with('}') {
                format!("{{{fields}}}")
            } else {
                format!("{{{fields},{inner}")
            };
            match RawValue::from_string(merged) {
                Ok(merged) => Cow::Owned(merged),
                Err(_) => Cow::Borrowed(metadata),
            }
        }
    }
}

static EMPTY_OBJECT: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();

/// The `delta` of one event, borrowed from the caller.
#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    pub role: Option<&'a str>,
    pub content: Option<&'a str>,
    pub function_call: Option<&'a RawValue>,
    pub tool_calls: Option<&'a RawValue>,
}

/// One event, ready to be serialized into a DataMessage.
#[derive(Debug)]
pub struct EventSpec<'a> {
    pub event_type: &'a str,
    pub content_type: &'a str,
    pub delta: Delta<'a>,
    /// Event `metadata`: a JSON object (`{}` when `None`).
    pub metadata: Option<&'a RawValue>,
}

impl EventSpec<'_> {
    /// A lower bound of the event's JSON size, known without serializing:
    /// the texts it carries (escaping only adds). Checked first, so an
    /// oversized event costs no work proportional to its size.
    pub fn min_json_len(&self) -> usize {
        self.delta.content.map_or(0, str::len)
            + self.delta.function_call.map_or(0, |v| v.get().len())
            + self.delta.tool_calls.map_or(0, |v| v.get().len())
            + self.metadata.map_or(0, |v| v.get().len())
    }
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    finish_reason: &'static str,
    delta: &'a Delta<'a>,
}

#[derive(Serialize)]
struct SseLayout<'a> {
    id: String,
    created: u64,
    model: &'static str,
    object: &'static str,
    #[serde(rename = "contentType")]
    content_type: &'a str,
    #[serde(rename = "agentId")]
    agent_id: Option<&'a str>,
    choices: [Choice<'a>; 1],
}

#[derive(Serialize)]
struct DataMessage<'a> {
    trace_id: &'a str,
    session_id: &'a str,
    event_type: &'a str,
    source_agent_id: &'a str,
    message_id: &'a str,
    timestamp: u64,
    data: SseLayout<'a>,
    state_msg: &'static str,
    artifact_url: &'static str,
    metadata: &'a RawValue,
}

/// Serializes one event as the `data` field value of a session stream entry.
pub fn data_message(origin: &EventOrigin, event: &EventSpec<'_>) -> String {
    let now = now_ms();
    let metadata = stamped_metadata(event.metadata, origin.plugin.as_deref());
    let message = DataMessage {
        trace_id: &origin.trace_id,
        session_id: &origin.session_id,
        event_type: event.event_type,
        source_agent_id: &origin.agent_id,
        message_id: &origin.message_id,
        timestamp: now,
        data: SseLayout {
            id: new_event_id(),
            created: now / 1000,
            model: "",
            object: "",
            content_type: event.content_type,
            agent_id: (!origin.agent_id.is_empty()).then_some(origin.agent_id.as_str()),
            choices: [Choice {
                index: 0,
                finish_reason: "",
                delta: &event.delta,
            }],
        },
        state_msg: "",
        artifact_url: "",
        metadata: &metadata,
    };
    serde_json::to_string(&message).expect("event JSON serializes")
}

/// A state event (`reasoningLogDelta`, 3003).
pub fn state_event(origin: &EventOrigin, state: &str, metadata: Option<&RawValue>) -> String {
    data_message(
        origin,
        &EventSpec {
            event_type: event_type::REASONING_LOG_DELTA,
            content_type: content_type::THINK_TITLE,
            delta: Delta {
                content: Some(state),
                ..Delta::default()
            },
            metadata,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn events_carry_the_plugin_version_merged_into_their_metadata() {
        let stamp = plugin_stamp("echo", "0.2.0");
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        let merged = |m: Option<&RawValue>| -> Value {
            serde_json::from_str(stamped_metadata(m, Some(&stamp)).get()).unwrap()
        };
        assert_eq!(
            merged(None),
            serde_json::json!({"plugin_id": "echo", "plugin_version": "0.2.0"})
        );
        assert_eq!(
            merged(Some(&raw(r#" { "result": [1, 2] }"#))),
            serde_json::json!({"plugin_id": "echo", "plugin_version": "0.2.0", "result": [1, 2]})
        );
        assert_eq!(
            merged(Some(&raw("{ }"))),
            serde_json::json!({"plugin_id": "echo", "plugin_version": "0.2.0"})
        );
        // A guest that stamps its own version keeps it.
        assert_eq!(
            merged(Some(&raw(r#"{"plugin_version": "mine"}"#))),
            serde_json::json!({"plugin_version": "mine"})
        );
        assert_eq!(stamped_metadata(None, None).get(), "{}");
    }

    #[test]
    fn the_size_bound_never_exceeds_the_serialized_event() {
        let origin = EventOrigin {
            trace_id: "t".into(),
            session_id: "s".into(),
            agent_id: "echo".into(),
            message_id: "m".into(),
            plugin: None,
        };
        let metadata = RawValue::from_string(r#"{"k":"v"}"#.to_owned()).unwrap();
        for text in ["", "plain", "\u{1}\u{2}\"quoted\"\n", "日本語"] {
            let event = EventSpec {
                event_type: "answerDelta",
                content_type: "1002",
                delta: Delta {
                    content: Some(text),
                    ..Delta::default()
                },
                metadata: Some(&metadata),
            };
            let json = data_message(&origin, &event);
            assert!(event.min_json_len() <= json.len(), "{text:?}");
            assert!(event.min_json_len() >= text.len() + metadata.get().len());
        }
    }

    #[test]
    fn data_message_has_the_reference_layout() {
        let origin = EventOrigin {
            trace_id: "t".into(),
            session_id: "s".into(),
            agent_id: "echo".into(),
            message_id: "msg-00000001".into(),
            plugin: None,
        };
        let json = state_event(&origin, "COMPLETED", None);
        let v: Value = serde_json::from_str(&json).unwrap();
        let order = [
            "trace_id",
            "session_id",
            "event_type",
            "source_agent_id",
            "message_id",
            "timestamp",
            "data",
            "state_msg",
            "artifact_url",
            "metadata",
        ];
        let positions: Vec<usize> = order
            .iter()
            .map(|k| json.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{json}");
        assert_eq!(v["data"]["contentType"], "3003");
        assert_eq!(v["data"]["agentId"], "echo");
        assert_eq!(v["data"]["choices"][0]["delta"]["content"], "COMPLETED");
        assert_eq!(v["data"]["choices"][0]["delta"]["role"], Value::Null);
        assert_eq!(v["data"]["id"].as_str().unwrap().len(), 32);
        assert_eq!(v["metadata"], serde_json::json!({}));
    }
}
