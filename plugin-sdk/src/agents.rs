use super::{Error, host};
use host::agents as wit;
use serde_json::Value;
use std::time::Duration;

/// The reply of a called agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReply {
    /// `COMPLETED`, `FAILED` or `CANCELLED` (`QUEUED` for [`send`]).
    pub status: String,
    /// Message id of the child task this call created.
    pub message_id: String,
    /// The agent type that answered.
    pub agent_type: String,
    /// Its result on COMPLETED; `{"error"}` on FAILED; `{"reason"}` on CANCELLED.
    pub reply_data: Value,
    /// `body.content` of its reply (usually `""`).
    pub content: Value,
}

impl AgentReply {
    /// True when the called agent completed.
    pub fn is_completed(&self) -> bool {
        self.status == "COMPLETED"
    }

    /// The result of a completed call; the failure or cancel as an error.
    pub fn into_result(self) -> Result<Value, Error> {
        match self.status.as_str() {
            "COMPLETED" => Ok(self.reply_data),
            "CANCELLED" => Err(Error::Cancelled(format!(
                "{} was cancelled: {}",
                self.agent_type, self.reply_data["reason"]
            ))),
            _ => Err(Error::Failed(format!(
                "{} {}: {}",
                self.agent_type,
                self.status.to_lowercase(),
                self.reply_data.get("error").unwrap_or(&self.reply_data)
            ))),
        }
    }

    fn from_wit(reply: wit::AgentReply) -> Self {
        AgentReply {
            status: reply.status,
            message_id: reply.message_id,
            agent_type: reply.agent_type,
            reply_data: serde_json::from_str(&reply.reply_data).unwrap_or(Value::Null),
            content: serde_json::from_str(&reply.content).unwrap_or(Value::Null),
        }
    }
}

/// Options of [`call_with`].
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// `body.extra_payload` (a JSON object).
    pub payload: Option<Value>,
    /// `header.metadata` (a JSON object).
    pub metadata: Option<Value>,
    /// Longest wait; default: the rest of the task's deadline.
    pub timeout: Option<Duration>,
}

/// One task of [`dispatch_group`].
#[derive(Debug, Clone)]
pub struct AgentTask {
    /// The agent type to run it.
    pub target_agent_type: String,
    /// Its text (`body.content`).
    pub content: String,
    /// `body.extra_payload`, an object.
    pub payload: Option<Value>,
    /// Header metadata for the child, an object.
    pub metadata: Option<Value>,
}

impl AgentTask {
    /// A task with just a target and a text.
    pub fn new(target_agent_type: impl Into<String>, content: impl Into<String>) -> Self {
        AgentTask {
            target_agent_type: target_agent_type.into(),
            content: content.into(),
            payload: None,
            metadata: None,
        }
    }

    /// Sets `body.extra_payload`.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = Some(payload);
        self
    }
}

/// A worker of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// Its worker id.
    pub worker_id: String,
    /// The agent types it serves.
    pub capabilities: Vec<String>,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

fn millis(timeout: Option<Duration>) -> Option<u64> {
    timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

/// Asks another agent type and waits for its reply.
pub fn call(target_agent_type: &str, content: &str) -> Result<AgentReply, Error> {
    call_with(target_agent_type, content, CallOptions::default())
}

/// [`call`] with payload, metadata or a timeout.
pub fn call_with(
    target_agent_type: &str,
    content: &str,
    options: CallOptions,
) -> Result<AgentReply, Error> {
    let options = wit::CallOptions {
        payload: options.payload.map(|v| v.to_string()),
        metadata: options.metadata.map(|v| v.to_string()),
        wait_for_reply: Some(true),
        timeout_ms: millis(options.timeout),
    };
    wit::call_agent(target_agent_type, content, &options)
        .map(AgentReply::from_wit)
        .map_err(Error::from_wit)
}

/// Fire and forget: sends without waiting; the callee sends no reply.
/// Returns the child's message id.
pub fn send(target_agent_type: &str, content: &str) -> Result<String, Error> {
    let options = wit::CallOptions {
        payload: None,
        metadata: None,
        wait_for_reply: Some(false),
        timeout_ms: None,
    };
    wit::call_agent(target_agent_type, content, &options)
        .map(|reply| reply.message_id)
        .map_err(Error::from_wit)
}

/// Sends every task at once and waits for all; results in task order.
pub fn dispatch_group(
    tasks: Vec<AgentTask>,
    timeout: Option<Duration>,
) -> Vec<Result<AgentReply, Error>> {
    let tasks: Vec<wit::AgentTask> = tasks
        .into_iter()
        .map(|task| wit::AgentTask {
            target_agent_type: task.target_agent_type,
            content: task.content,
            payload: task.payload.map(|v| v.to_string()),
            metadata: task.metadata.map(|v| v.to_string()),
        })
        .collect();
    wit::dispatch_group(&tasks, millis(timeout))
        .into_iter()
        .map(|result| result.map(AgentReply::from_wit).map_err(Error::from_wit))
        .collect()
}

/// The workers in the registry.
pub fn active_workers() -> Result<Vec<WorkerInfo>, Error> {
    wit::active_workers()
        .map(|workers| {
            workers
                .into_iter()
                .map(|w| WorkerInfo {
                    worker_id: w.worker_id,
                    capabilities: w.capabilities,
                    last_seen_ms: w.last_seen_ms,
                })
                .collect()
        })
        .map_err(Error::from_wit)
}
