use super::{Error, host};
use serde_json::Value;

/// One message of the session.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// `user`, `assistant`, `system` or `tool`.
    pub role: String,
    /// The message's text.
    pub content: String,
    /// An object (`message_id`, `trace_id`, `agent_id`, ...).
    pub metadata: Value,
}

/// The newest `limit` messages of this task's session, oldest first.
/// An ASK_AGENT also carries the newest ones (before it) in
/// `extra_payload.history`.
pub fn recent(limit: u32) -> Result<Vec<HistoryEntry>, Error> {
    host::history::recent(limit)
        .map(|entries| {
            entries
                .into_iter()
                .map(|e| HistoryEntry {
                    role: e.role,
                    content: e.content,
                    metadata: serde_json::from_str(&e.metadata).unwrap_or(Value::Null),
                })
                .collect()
        })
        .map_err(Error::from_wit)
}
