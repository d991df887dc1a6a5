//! The writes that end a task, queued in order as one group fenced by the
//! task's lease: its last events, the reply to a calling agent, the
//! execution record, the XACK.

use super::*;

impl Dispatcher {
    /// The writes that end a task, in order: events, the reply to a calling
    /// agent, the execution record, the XACK.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_writes(
        &self,
        command: &ControlCommand,
        agent_type: &str,
        origin: &EventOrigin,
        delivery: &Delivery,
        execution: &mut wire::Execution,
        outcome: Outcome,
        cancel: &CancelSignal,
    ) -> Vec<Write> {
        let header = &command.header;
        let stream: Arc<str> = Arc::from(keys::session_data_stream(&header.session_id));
        // The stream's TTL counts from the task's last writes.
        let event = |data: String| Write::Event {
            stream: stream.clone(),
            data,
            refresh_ttl: true,
        };
        let caller = match command.action {
            Action::AskAgent { .. } if !header.source_agent_id.is_empty() => {
                Some(header.source_agent_id.as_str())
            }
            _ => None,
        };
        let mut writes = Vec::with_capacity(5);
        let reply_to_caller = |status: &str, reply_data: &dyn Fn() -> serde_json::Value| {
            let caller = caller?;
            let reply_data = reply_data();
            let resume_header = wire::Header {
                message_id: wire::new_message_id(),
                session_id: header.session_id.clone(),
                trace_id: header.trace_id.clone(),
                source_agent_id: if agent_type.is_empty() {
                    self.settings.worker_id.to_string()
                } else {
                    agent_type.to_owned()
                },
                target_agent_type: caller.to_owned(),
                parent_message_id: header.message_id.clone(),
                task_group_id: header.task_group_id.clone(),
                tenant_id: header.tenant_id.clone(),
                metadata: serde_json::json!({}),
            };
            let body = serde_json::json!({
                "content": "",
                "status": status,
                "reply_data": reply_data,
            });
            Some(Write::Control {
                stream: keys::capability_stream(caller),
                data: wire::control_json("RESUME", &resume_header, &body),
            })
        };
        let status = match outcome {
            Outcome::Completed(json) => {
                // Parsed only for a calling agent's RESUME.
                let result = || serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                let metadata = RawValue::from_string(format!("{{\"result\":{json}}}")).ok();
                let terminal = match caller {
                    Some(caller) => format!("QUEUED: {caller}"),
                    None => state::COMPLETED.to_owned(),
                };
                if let Some(resume) = reply_to_caller(state::COMPLETED, &result) {
                    writes.push(resume);
                }
                writes.push(event(wire::state_event(
                    origin,
                    &terminal,
                    metadata.as_deref(),
                )));
                tracing::debug!(elapsed_ms = execution_elapsed(execution), "completed");
                state::COMPLETED
            }
            Outcome::Failed(reason) => {
                if let Some(resume) =
                    reply_to_caller(state::FAILED, &|| serde_json::json!({ "error": reason }))
                {
                    writes.push(resume);
                }
                writes.push(event(wire::state_event(
                    origin,
                    &format!("FAILED: {reason}"),
                    None,
                )));
                tracing::warn!(%reason, "failed");
                state::FAILED
            }
            Outcome::Cancelled(reason) => {
                writes.push(event(wire::state_event(origin, state::CANCELLING, None)));
                if let Some(resume) = reply_to_caller(
                    state::CANCELLED,
                    &|| serde_json::json!({ "reason": reason }),
                ) {
                    writes.push(resume);
                }
                writes.push(event(wire::state_event(origin, state::CANCELLED, None)));
                tracing::info!(%reason, "cancelled");
                state::CANCELLED
            }
            Outcome::CutOff | Outcome::Unserved => {
                unreachable!("cut-off and unserved tasks write nothing")
            }
        };
        if cancel.is_requested() {
            execution.cancel_requested = true;
            execution.cancel_reason = cancel.reason();
        }
        writes.push(self.executions.finish(execution, status).into());
        writes.push(self.ack(delivery));
        writes
    }
}

/// How long the task has run, milliseconds.
fn execution_elapsed(execution: &wire::Execution) -> u64 {
    wire::now_ms().saturating_sub(execution.started_at)
}
