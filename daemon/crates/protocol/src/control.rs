//! Control entries: what arrives on `ctrl:capability:*` and
//! `ctrl:worker:*` streams (ASK_AGENT, RESUME, CANCEL_TASK), parsed and
//! validated as the reference worker does, and built as the reference
//! client does.

use crate::ids::{new_cancel_message_id, new_trace_id};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

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

#[cfg(test)]
mod tests {
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
}
