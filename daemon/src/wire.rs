//! The reference SDK's wire protocol: Redis key names, identifiers, the
//! control-entry JSON that arrives on `ctrl:*` streams and the DataMessage
//! JSON written to session data streams.
//!
//! Everything here is pure data shaping — no I/O — so that the exact bytes we
//! put on the wire are decided in one place (see `../shared/WIRE.md`).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Key prefix shared by every key of the protocol.
pub const PREFIX: &str = "byai_gateway";

/// Redis key builders, literal as the reference SDK spells them.
pub mod keys {
    use super::PREFIX;

    /// Tasks for one agent type.
    pub fn capability_stream(agent_type: &str) -> String {
        format!("{PREFIX}:ctrl:capability:{agent_type}")
    }
    /// Control commands (CANCEL_TASK) for one worker.
    pub fn worker_stream(worker_id: &str) -> String {
        format!("{PREFIX}:ctrl:worker:{worker_id}")
    }
    /// Every event of one session.
    pub fn session_data_stream(session_id: &str) -> String {
        format!("{PREFIX}:session:{session_id}:data_stream")
    }
    /// `exec:*` / `msg_map:*` hash of one session.
    pub fn session_registry(session_id: &str) -> String {
        format!("{PREFIX}:session:{session_id}:registry")
    }
    /// Heartbeats of all workers (member worker id, score ms).
    pub const ACTIVE_WORKERS: &str = "byai_gateway:registry:active_workers";
    /// The capabilities one worker serves.
    pub fn worker_capabilities(worker_id: &str) -> String {
        format!("{PREFIX}:registry:worker:capabilities:{worker_id}")
    }
    /// The workers that serve one capability.
    pub fn capability_workers(capability: &str) -> String {
        format!("{PREFIX}:registry:capability:workers:{capability}")
    }
    /// Scatter-gather counter of one task group (`total`, `completed`,
    /// `source_agent_id`).
    pub fn task_group(task_group_id: &str) -> String {
        format!("{PREFIX}:task_group:{task_group_id}")
    }
    /// One live process per worker id.
    pub fn worker_lock(worker_id: &str) -> String {
        format!("{PREFIX}:registry:worker:lock:{worker_id}")
    }
}

/// Lifetime of session streams and registries, seconds (reference default).
pub const DEFAULT_SESSION_TTL_S: u64 = 604_800;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `msg-` + 8 lowercase hex.
pub fn new_message_id() -> String {
    format!("msg-{:08x}", fastrand::u32(..))
}

/// `tg-` + 8 lowercase hex.
pub fn new_task_group_id() -> String {
    format!("tg-{:08x}", fastrand::u32(..))
}

/// `msg-cancel-` + 8 lowercase hex.
pub fn new_cancel_message_id() -> String {
    format!("msg-cancel-{:08x}", fastrand::u32(..))
}

/// 32 lowercase hex, like `uuid4().hex`.
pub fn new_trace_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// `exec-` + 8 lowercase hex.
pub fn new_execution_id() -> String {
    format!("exec-{:08x}", fastrand::u32(..))
}

/// 32 uppercase hex, like `uuid4().hex.upper()` (the SSE layout's `id`).
fn new_event_id() -> String {
    format!("{:032X}", fastrand::u128(..))
}

/// 32 lowercase hex: a lock token.
pub fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Accepts `null` (or absence) as an empty string: Python senders may write
/// `None` for optional header fields.
fn string_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// The routing header of a control entry.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
pub struct Header {
    #[serde(default, deserialize_with = "string_or_null")]
    pub message_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub session_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub trace_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub source_agent_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub target_agent_type: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub parent_message_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub task_group_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub tenant_id: String,
    /// A JSON object; `{}` when absent or null.
    #[serde(default)]
    pub metadata: Value,
}

/// The raw `data` JSON of a control entry before validation.
#[derive(Debug, Deserialize)]
struct RawControl {
    action_type: Option<String>,
    header: Option<Header>,
    #[serde(default)]
    body: Value,
}

/// What a control entry asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run the agent on new input.
    AskAgent {
        /// `body.content`: a non-empty string or a non-empty list.
        content: Value,
        /// Whether the sender waits for the reply.
        wait_for_reply: bool,
        /// `body.extra_payload`, always an object.
        extra_payload: Value,
    },
    /// Continue after a call returned or a user answered.
    Resume {
        content: Value,
        status: String,
        reply_data: Value,
        extra_payload: Value,
    },
    /// Stop a running task (worker control stream only).
    CancelTask(CancelRequest),
}

impl Action {
    /// The protocol name of the action.
    pub fn name(&self) -> &'static str {
        match self {
            Action::AskAgent { .. } => "ASK_AGENT",
            Action::Resume { .. } => "RESUME",
            Action::CancelTask(_) => "CANCEL_TASK",
        }
    }
}

/// `CANCEL_TASK` body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CancelRequest {
    pub target_message_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub target_execution_id: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub reason: String,
    #[serde(default, deserialize_with = "string_or_null")]
    pub requested_by: String,
    /// `graceful` (default) or `force`.
    #[serde(default, deserialize_with = "string_or_null")]
    pub cancel_mode: String,
}

impl CancelRequest {
    /// True for `cancel_mode = "force"`.
    pub fn is_force(&self) -> bool {
        self.cancel_mode.eq_ignore_ascii_case("force")
    }
}

/// A validated control entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlCommand {
    pub header: Header,
    pub action: Action,
}

/// Why a control entry was rejected. The text goes into the dead-letter entry.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct MalformedEntry(pub String);

/// Session and message ids end up in Redis keys and in workspace paths, so
/// they must be a plain path segment.
pub fn is_safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'))
}

fn object_or_empty(value: Value, what: &str) -> Result<Value, MalformedEntry> {
    match value {
        Value::Null => Ok(Value::Object(Default::default())),
        Value::Object(_) => Ok(value),
        other => Err(MalformedEntry(format!(
            "{what} must be a JSON object, found {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Best-effort read of the session id of an entry that failed validation, so
/// the session can be told why nothing happens.
pub fn salvage_session_id(data: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(data).ok()?;
    let session = value.get("header")?.get("session_id")?.as_str()?;
    is_safe_id(session).then(|| session.to_owned())
}

/// Parses and validates the `data` field of a control entry.
pub fn parse_control(data: &[u8]) -> Result<ControlCommand, MalformedEntry> {
    let raw: RawControl = serde_json::from_slice(data)
        .map_err(|e| MalformedEntry(format!("`data` is not a valid command JSON: {e}")))?;
    let action_type = raw
        .action_type
        .ok_or_else(|| MalformedEntry("missing action_type".into()))?;
    let mut header = raw
        .header
        .ok_or_else(|| MalformedEntry("missing header".into()))?;
    for (name, value) in [
        ("message_id", &header.message_id),
        ("session_id", &header.session_id),
        ("trace_id", &header.trace_id),
    ] {
        if value.is_empty() {
            return Err(MalformedEntry(format!("header.{name} is required")));
        }
    }
    if !is_safe_id(&header.session_id) {
        return Err(MalformedEntry(format!(
            "header.session_id {:?} is not a safe identifier ([A-Za-z0-9._:@-], at most 256)",
            header.session_id
        )));
    }
    if !is_safe_id(&header.message_id) {
        return Err(MalformedEntry(format!(
            "header.message_id {:?} is not a safe identifier ([A-Za-z0-9._:@-], at most 256)",
            header.message_id
        )));
    }
    header.metadata = object_or_empty(std::mem::take(&mut header.metadata), "header.metadata")?;
    let mut body = match raw.body {
        Value::Object(map) => map,
        Value::Null => Default::default(),
        other => {
            return Err(MalformedEntry(format!(
                "body must be a JSON object, found {}",
                json_kind(&other)
            )));
        }
    };
    let extra_payload = object_or_empty(
        body.remove("extra_payload").unwrap_or(Value::Null),
        "body.extra_payload",
    )?;
    let action = match action_type.as_str() {
        "ASK_AGENT" => {
            let content = body.remove("content").unwrap_or(Value::Null);
            let valid = match &content {
                Value::String(s) => !s.is_empty(),
                Value::Array(items) => !items.is_empty(),
                _ => false,
            };
            if !valid {
                return Err(MalformedEntry(
                    "ASK_AGENT body.content must be a non-empty string or a non-empty list".into(),
                ));
            }
            let wait_for_reply = match body.remove("wait_for_reply") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => b,
                Some(other) => {
                    return Err(MalformedEntry(format!(
                        "body.wait_for_reply must be a boolean, found {}",
                        json_kind(&other)
                    )));
                }
            };
            Action::AskAgent {
                content,
                wait_for_reply,
                extra_payload,
            }
        }
        "RESUME" => {
            let content = body
                .remove("content")
                .unwrap_or(Value::String(String::new()));
            let status = match body.remove("status") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                Some(other) => {
                    return Err(MalformedEntry(format!(
                        "body.status must be a string, found {}",
                        json_kind(&other)
                    )));
                }
            };
            let has_content = !matches!(&content, Value::Null)
                && !matches!(&content, Value::String(s) if s.is_empty());
            if status.is_empty() && !has_content {
                return Err(MalformedEntry(
                    "RESUME needs body.status or body.content".into(),
                ));
            }
            Action::Resume {
                content,
                status,
                reply_data: body.remove("reply_data").unwrap_or(Value::Null),
                extra_payload,
            }
        }
        "CANCEL_TASK" => {
            let request: CancelRequest = serde_json::from_value(Value::Object(body))
                .map_err(|e| MalformedEntry(format!("CANCEL_TASK body: {e}")))?;
            if request.target_message_id.is_empty() {
                return Err(MalformedEntry(
                    "CANCEL_TASK body.target_message_id is required".into(),
                ));
            }
            Action::CancelTask(request)
        }
        other => {
            return Err(MalformedEntry(format!("unknown action_type {other:?}")));
        }
    };
    Ok(ControlCommand { header, action })
}

/// What a CANCEL_TASK names, beyond the session.
#[derive(Debug, Clone)]
pub struct CancelTarget<'a> {
    pub session_id: &'a str,
    pub message_id: &'a str,
    pub execution_id: &'a str,
    pub worker_id: &'a str,
    pub target_agent_type: &'a str,
    pub reason: &'a str,
    /// Who asked (`client`, or the cancelled caller's message id).
    pub requested_by: &'a str,
    /// `graceful` or `force`.
    pub cancel_mode: &'a str,
}

/// The `data` JSON of a CANCEL_TASK, as the reference client builds it.
pub fn cancel_task_json(target: &CancelTarget<'_>) -> String {
    let header = Header {
        message_id: new_cancel_message_id(),
        session_id: target.session_id.to_owned(),
        trace_id: new_trace_id(),
        target_agent_type: target.target_agent_type.to_owned(),
        parent_message_id: target.message_id.to_owned(),
        metadata: Value::Object(Default::default()),
        ..Header::default()
    };
    let body = serde_json::json!({
        "target_message_id": target.message_id,
        "target_execution_id": target.execution_id,
        "target_worker_id": target.worker_id,
        "reason": target.reason,
        "requested_by": target.requested_by,
        "cancel_mode": target.cancel_mode,
    });
    control_json("CANCEL_TASK", &header, &body)
}

/// Builds the `data` JSON of a control entry, as the reference client does.
pub fn control_json(action_type: &str, header: &Header, body: &Value) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        action_type: &'a str,
        header: &'a Header,
        body: &'a Value,
    }
    serde_json::to_string(&Out {
        action_type,
        header,
        body,
    })
    .expect("control JSON serializes")
}

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

/// The execution record kept in the session registry hash (`exec:{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    pub execution_id: String,
    pub message_id: String,
    pub session_id: String,
    pub worker_id: String,
    pub target_agent_type: String,
    pub stream_name: String,
    pub redis_message_id: String,
    pub status: String,
    pub cancel_requested: bool,
    pub cancel_reason: String,
    pub created_at: u64,
    pub started_at: u64,
    pub finished_at: u64,
    pub updated_at: u64,
}

#[cfg(test)]
mod tests {

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

    use super::*;

    fn entry(json: &str) -> Result<ControlCommand, MalformedEntry> {
        parse_control(json.as_bytes())
    }

    #[test]
    fn parses_ask_agent_like_the_python_client_writes_it() {
        let cmd = entry(
            r#"{"action_type": "ASK_AGENT", "header": {"message_id": "msg-1a2b3c4d", "session_id": "s1",
                "trace_id": "0123456789abcdef0123456789abcdef", "source_agent_id": "", "target_agent_type": "echo",
                "parent_message_id": "", "task_group_id": "", "tenant_id": "", "metadata": {}},
                "body": {"content": "hi", "wait_for_reply": false}}"#,
        )
        .unwrap();
        assert_eq!(cmd.header.target_agent_type, "echo");
        assert_eq!(
            cmd.action,
            Action::AskAgent {
                content: Value::String("hi".into()),
                wait_for_reply: false,
                extra_payload: serde_json::json!({}),
            }
        );
    }

    #[test]
    fn rejects_what_the_reference_rejects_with_a_reason() {
        let cases = [
            ("not json", "not a valid command JSON"),
            (r#"{"header": {}}"#, "missing action_type"),
            (
                r#"{"action_type": "ASK_AGENT", "header": {"message_id": "m", "session_id": "s"}, "body": {"content": "x"}}"#,
                "header.trace_id is required",
            ),
            (
                r#"{"action_type": "ASK_AGENT", "header": {"message_id": "m", "session_id": "../x", "trace_id": "t"}, "body": {"content": "x"}}"#,
                "not a safe identifier",
            ),
            (
                r#"{"action_type": "ASK_AGENT", "header": {"message_id": "m", "session_id": "s", "trace_id": "t"}, "body": {"content": ""}}"#,
                "non-empty string",
            ),
            (
                r#"{"action_type": "RESUME", "header": {"message_id": "m", "session_id": "s", "trace_id": "t"}, "body": {}}"#,
                "needs body.status or body.content",
            ),
            (
                r#"{"action_type": "FLY", "header": {"message_id": "m", "session_id": "s", "trace_id": "t"}}"#,
                "unknown action_type",
            ),
        ];
        for (json, expected) in cases {
            let err = entry(json).unwrap_err();
            assert!(err.0.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn salvages_the_session_of_a_bad_entry() {
        let data = br#"{"action_type": "ASK_AGENT", "header": {"session_id": "s-9"}, "body": {}}"#;
        assert_eq!(salvage_session_id(data).as_deref(), Some("s-9"));
        assert_eq!(salvage_session_id(b"{"), None);
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
