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
