//! Identifiers in the reference SDK's formats, and the clock they are
//! stamped with.

use std::time::{SystemTime, UNIX_EPOCH};

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

/// The id of a task's `n`th call to one agent (`<message id>:c<n>`, from
/// 1): the same on every run of the task, so a run after a crash finds the
/// child the first run started and the reply it sent.
pub fn call_message_id(parent_message_id: &str, n: u32) -> String {
    format!("{parent_message_id}:c{n}")
}

/// The id of the task group a task's `n`th call sends (`<message id>:g<n>`).
pub fn call_task_group_id(parent_message_id: &str, n: u32) -> String {
    format!("{parent_message_id}:g{n}")
}

/// The id of the `k`th child (from 1) of task group `task_group_id`.
pub fn group_child_message_id(task_group_id: &str, k: usize) -> String {
    format!("{task_group_id}.{k}")
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
pub(crate) fn new_event_id() -> String {
    format!("{:032X}", fastrand::u128(..))
}

/// 32 lowercase hex: a lock token.
pub fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct EntryId {
    /// Milliseconds since the epoch when it was added.
    pub ms: u64,
    /// Its place among the entries of that millisecond.
    pub seq: u64,
}

impl EntryId {
    /// `<ms>-<seq>`; `None` for anything else.
    pub fn parse(id: &str) -> Option<EntryId> {
        let (ms, seq) = id.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The smallest id after this one.
    pub fn next(self) -> EntryId {
        match self.seq.checked_add(1) {
            Some(seq) => EntryId { ms: self.ms, seq },
            None => EntryId {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_order_and_follow_as_redis_orders_them() {
        fn id(text: &str) -> EntryId {
            EntryId::parse(text).unwrap()
        }
        assert!(id("1700000000000-9") < id("1700000000000-10"));
        assert!(id("1700000000000-10") < id("1700000000001-0"));
        assert_eq!(id("5-1").next().to_string(), "5-2");
        assert_eq!(id(&format!("5-{}", u64::MAX)).next().to_string(), "6-0");
        assert_eq!(id("0-0").next().to_string(), "0-1");
        assert_eq!(EntryId::parse("5"), None);
        assert_eq!(EntryId::parse("x-1"), None);
    }
}
