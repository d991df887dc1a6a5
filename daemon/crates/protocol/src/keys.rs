//! Redis key builders, literal as the reference SDK spells them.

use crate::PREFIX;

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
/// The children of a task group whose reply was counted (a set; ours, not
/// the reference's): a redelivered reply is not counted twice.
pub fn task_group_replied(task_group_id: &str) -> String {
    format!("{PREFIX}:task_group:{task_group_id}:replied")
}
/// The journal of one task (a hash, ours, not the reference's): each
/// reply or answer the task received, under the id of the call or prompt it
/// answers (`<message id>:c<n>`, `:g<n>.<k>`, `:u<n>`), so that a run of the
/// task after its daemon died finds what the first run was told. A task is
/// its message id in its session (the session registry maps message ids
/// per session): a client that sends another task under the same message id
/// in another session has a journal of its own, and can neither read nor
/// fill this one. The message id is the key's hash tag: a cluster keeps a
/// task's journal keys on one node.
pub fn task_journal(session_id: &str, message_id: &str) -> String {
    format!("{PREFIX}:journal:{{{message_id}}}:calls:{session_id}")
}
/// What one task read from outside besides replies (a list, ours, not the
/// reference's): each `history-recent`, `active-workers` or outbound HTTP
/// result, in the order the task read them, so that a run of the task after
/// its daemon died reads the same. Beside [`task_journal`], in its slot.
pub fn task_journal_reads(session_id: &str, message_id: &str) -> String {
    format!("{PREFIX}:journal:{{{message_id}}}:reads:{session_id}")
}
/// The clock readings of one task (a string, ours), appended with each batch
/// of its writes; beside [`task_journal`], in its slot.
pub fn task_journal_clocks(session_id: &str, message_id: &str) -> String {
    format!("{PREFIX}:journal:{{{message_id}}}:clocks:{session_id}")
}
/// One live process per worker id.
pub fn worker_lock(worker_id: &str) -> String {
    format!("{PREFIX}:registry:worker:lock:{worker_id}")
}
