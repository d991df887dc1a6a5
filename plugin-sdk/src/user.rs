use super::{Error, host};
use host::agents as wit;
use serde_json::Value;
use std::time::Duration;

/// The user's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct UserReply {
    /// `body.status` as the client sent it.
    pub status: String,
    /// Message id of the RESUME.
    pub message_id: String,
    /// `body.content`.
    pub content: Value,
    /// `body.reply_data`.
    pub reply_data: Value,
    /// `body.extra_payload`.
    pub extra_payload: Value,
}

impl UserReply {
    /// The answer as text: `content` when it is a non-empty string, else
    /// the form field `reply_data.user_input`, else the content as JSON.
    pub fn text(&self) -> String {
        match (&self.content, self.reply_data.get("user_input")) {
            (Value::String(text), _) if !text.is_empty() => text.clone(),
            (_, Some(Value::String(input))) => input.clone(),
            (Value::Null, _) => String::new(),
            (other, _) => other.to_string(),
        }
    }
}

/// Shows the user a question (the reference's form event) and waits for
/// the answer until the task's deadline.
pub fn ask(prompt: &str) -> Result<UserReply, Error> {
    ask_with(prompt, None)
}

/// [`ask`] with a timeout; an answer after the task ended reaches the handler as a RESUME.
pub fn ask_with(prompt: &str, timeout: Option<Duration>) -> Result<UserReply, Error> {
    let options = wit::AskOptions {
        timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        metadata: None,
    };
    wit::ask_user(prompt, &options)
        .map(|reply| UserReply {
            status: reply.status,
            message_id: reply.message_id,
            content: serde_json::from_str(&reply.content).unwrap_or(Value::Null),
            reply_data: serde_json::from_str(&reply.reply_data).unwrap_or(Value::Null),
            extra_payload: serde_json::from_str(&reply.extra_payload).unwrap_or(Value::Null),
        })
        .map_err(Error::from_wit)
}
