//! `agents`: calling other agents, task groups, asking the user, and the
//! worker registry. The guest's arguments are checked here; sending and
//! waiting are the task port's (the protocol and the routing of replies
//! are the daemon's business).

use super::{TaskContext, TaskState};
use crate::bindings::GuestError;
use crate::bindings::byclaw::gateway::agents::{
    AgentReply, AgentTask, AskOptions, CallOptions, Host, UserReply, WorkerInfo,
};
use crate::port::{AgentCall, HostImport};
use byclaw_protocol as wire;
use serde_json::{Value, json};
use std::time::Duration;
use tracing::Instrument as _;
use tracing::field::Empty;

/// Parses optional guest JSON that must be an object.
fn json_object(json: Option<&str>, what: &str) -> Result<Value, GuestError> {
    match json.map(serde_json::from_str::<Value>) {
        None => Ok(json!({})),
        Some(Ok(value @ Value::Object(_))) => Ok(value),
        Some(Ok(_)) => Err(GuestError::InvalidInput(format!(
            "{what} must be a JSON object"
        ))),
        Some(Err(e)) => Err(GuestError::InvalidInput(format!(
            "{what} is not valid JSON: {e}"
        ))),
    }
}

fn check_call(
    target: String,
    content: String,
    payload: Option<&str>,
    metadata: Option<&str>,
) -> Result<AgentCall, GuestError> {
    if !wire::is_safe_id(&target) || target.len() > 128 {
        return Err(GuestError::InvalidInput(format!(
            "target agent type {target:?} must be 1-128 of [A-Za-z0-9._:@-]"
        )));
    }
    if content.is_empty() {
        return Err(GuestError::InvalidInput(
            "content is empty; the protocol requires a non-empty ASK_AGENT content".into(),
        ));
    }
    Ok(AgentCall {
        target,
        content,
        payload: json_object(payload, "payload")?,
        metadata: json_object(metadata, "metadata")?,
    })
}

fn stopping() -> wasmtime::Error {
    wasmtime::Error::new(crate::port::Stopping)
}

impl TaskContext {
    /// How long a wait may last: the guest's timeout, capped by what is
    /// left of the task's deadline.
    fn wait_budget(&self, timeout_ms: Option<u64>) -> Duration {
        let left = self
            .deadline_at
            .saturating_duration_since(tokio::time::Instant::now());
        match timeout_ms {
            Some(ms) => Duration::from_millis(ms).min(left),
            None => left,
        }
    }
}

impl Host for TaskState {
    async fn call_agent(
        &mut self,
        target_agent_type: String,
        content: String,
        options: CallOptions,
    ) -> wasmtime::Result<Result<AgentReply, GuestError>> {
        let _timer = self.timed(HostImport::CallAgent);
        let task = self.host("call-agent")?.task.clone();
        let call = check_call(
            target_agent_type,
            content,
            options.payload.as_deref(),
            options.metadata.as_deref(),
        );
        // A child of the task's span in traces; the daemon records the
        // child's message id on it and sends it as the child's parent.
        let span = tracing::info_span!(
            "call-agent",
            target_agent_type = call.as_ref().map(|c| c.target.as_str()).unwrap_or_default(),
            wait_for_reply = options.wait_for_reply != Some(false),
            child_message_id = Empty,
            otel.kind = "producer",
        );
        if options.wait_for_reply == Some(false) {
            return match call {
                Ok(call) => task
                    .port
                    .send_agent(call)
                    .instrument(span)
                    .await
                    .map_err(|_| stopping()),
                Err(error) => Ok(Err(error)),
            };
        }
        if task.cancel.is_requested() {
            return Ok(Err(GuestError::Cancelled(
                "the task is being cancelled".into(),
            )));
        }
        let timeout = task.wait_budget(options.timeout_ms);
        let mut results = task
            .port
            .call_agents(vec![call], false, timeout)
            .instrument(span)
            .await
            .map_err(|_| stopping())?;
        Ok(results.pop().expect("one result per call"))
    }

    async fn dispatch_group(
        &mut self,
        tasks: Vec<AgentTask>,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<Vec<Result<AgentReply, GuestError>>> {
        let _timer = self.timed(HostImport::DispatchGroup);
        let task = self.host("dispatch-group")?.task.clone();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        if task.cancel.is_requested() {
            return Ok(tasks
                .iter()
                .map(|_| Err(GuestError::Cancelled("the task is being cancelled".into())))
                .collect());
        }
        let calls: Vec<_> = tasks
            .into_iter()
            .map(|task| {
                check_call(
                    task.target_agent_type,
                    task.content,
                    task.payload.as_deref(),
                    task.metadata.as_deref(),
                )
            })
            .collect();
        let timeout = task.wait_budget(timeout_ms);
        let span = tracing::info_span!(
            "dispatch-group",
            tasks = calls.len(),
            child_message_id = Empty,
            otel.kind = "producer",
        );
        task.port
            .call_agents(calls, true, timeout)
            .instrument(span)
            .await
            .map_err(|_| stopping())
    }

    async fn ask_user(
        &mut self,
        prompt: String,
        options: AskOptions,
    ) -> wasmtime::Result<Result<UserReply, GuestError>> {
        let _timer = self.timed(HostImport::AskUser);
        let task = self.host("ask-user")?.task.clone();
        let metadata = match json_object(options.metadata.as_deref(), "metadata") {
            Ok(metadata) => metadata,
            Err(error) => return Ok(Err(error)),
        };
        if task.cancel.is_requested() {
            return Ok(Err(GuestError::Cancelled(
                "the task is being cancelled".into(),
            )));
        }
        let timeout = task.wait_budget(options.timeout_ms);
        let span = tracing::info_span!("ask-user", timeout_ms = timeout.as_millis() as u64);
        task.port
            .ask_user(prompt, metadata, timeout)
            .instrument(span)
            .await
            .map_err(|_| stopping())
    }

    async fn active_workers(&mut self) -> wasmtime::Result<Result<Vec<WorkerInfo>, GuestError>> {
        let _timer = self.timed(HostImport::ActiveWorkers);
        let task = self.host("active-workers")?.task.clone();
        Ok(task.port.active_workers().await)
    }
}
