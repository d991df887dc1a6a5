//! `agents`: calling other agents, task groups, asking the user, and the
//! worker registry.
//!
//! A call sends what the reference SDK sends (ASK_AGENT with
//! `source_agent_id` and `parent_message_id`, the task-group hash, the 3013
//! form event) and then waits for the RESUME in process: the waiter and its
//! Redis route are registered before anything is sent (see
//! [`crate::routing`]), the task's concurrency permit is lent out while it
//! waits, and a cancel of the task ends the wait at once.

use super::{AwaitedChild, TaskShared, TaskState};
use crate::events::Write;
use crate::plugin::bindings::GuestError;
use crate::plugin::bindings::byclaw::gateway::agents::{
    AgentReply, AgentTask, AskOptions, CallOptions, Host, UserReply, WorkerInfo,
};
use crate::routing::{Reply, ReplyKind, WaitKey, Waiting};
use byclaw_protocol::{self as wire, Delta, EventSpec, content_type, event_type, keys, state};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Lifetime of a task-group hash (the reference's `TASK_GROUP_TTL_SECONDS`).
const TASK_GROUP_TTL_S: u64 = 86_400;

/// How long a route outlives the wait it serves, so a reply arriving just
/// after the timeout still finds the worker that ran the caller.
const ROUTE_SLACK: Duration = Duration::from_secs(30);

/// One ASK_AGENT to send.
struct Call {
    target: String,
    content: String,
    /// `body.extra_payload`, an object.
    payload: Value,
    /// `header.metadata`, an object.
    metadata: Value,
}

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
) -> Result<Call, GuestError> {
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
    Ok(Call {
        target,
        content,
        payload: json_object(payload, "payload")?,
        metadata: json_object(metadata, "metadata")?,
    })
}

fn stopping() -> wasmtime::Error {
    wasmtime::format_err!("the daemon is stopping; the task was cut off")
}

fn raw(value: &Value) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(value).expect("a JSON value serializes")
}

fn agent_reply(child_message_id: &str, reply: Reply) -> AgentReply {
    AgentReply {
        status: reply.status,
        message_id: child_message_id.to_owned(),
        agent_type: reply.source_agent_id,
        reply_data: reply.reply_data.to_string(),
        content: reply.content.to_string(),
    }
}

impl TaskShared {
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

    fn state_write(&self, state: &str, metadata: Option<&Value>) -> Write {
        let metadata = metadata.map(raw);
        Write::Event {
            stream: self.stream.clone(),
            data: wire::state_event(&self.origin, state, metadata.as_deref()),
        }
    }

    /// Which of `targets` some worker serves, in one round trip.
    async fn served(&self, targets: &[&str]) -> Result<Vec<bool>, GuestError> {
        let mut pipe = redis::pipe();
        for target in targets {
            pipe.cmd("SCARD").arg(keys::capability_workers(target));
        }
        let counts: Vec<u64> = pipe
            .query_async(&mut self.services.redis.clone())
            .await
            .map_err(|e| {
                GuestError::Unavailable(format!("cannot read the worker registry: {e}"))
            })?;
        Ok(counts.into_iter().map(|n| n > 0).collect())
    }

    /// Sends `calls` (as one task group when `group`) and waits for their
    /// replies; one result per call, in order.
    async fn call_and_wait(
        &self,
        calls: Vec<Result<Call, GuestError>>,
        group: bool,
        timeout: Duration,
    ) -> wasmtime::Result<Vec<Result<AgentReply, GuestError>>> {
        let mut results: Vec<Option<Result<AgentReply, GuestError>>> = Vec::new();
        results.resize_with(calls.len(), || None);
        if self.cancel.is_requested() {
            return Ok(calls
                .into_iter()
                .map(|_| Err(GuestError::Cancelled("the task is being cancelled".into())))
                .collect());
        }

        // Fail fast on agent types nobody serves: a wait for them could only
        // time out.
        let mut targets: Vec<&str> = calls
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.target.as_str()))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let served: BTreeMap<String, Result<bool, GuestError>> = match self.served(&targets).await {
            Ok(flags) => targets
                .iter()
                .zip(flags)
                .map(|(t, f)| (t.to_string(), Ok(f)))
                .collect(),
            Err(error) => targets
                .iter()
                .map(|t| (t.to_string(), Err(error.clone())))
                .collect(),
        };
        let mut to_send: Vec<(usize, Call)> = Vec::new();
        for (index, call) in calls.into_iter().enumerate() {
            let call = match call {
                Ok(call) => call,
                Err(error) => {
                    results[index] = Some(Err(error));
                    continue;
                }
            };
            match &served[&call.target] {
                Ok(true) => to_send.push((index, call)),
                Ok(false) => {
                    results[index] = Some(Err(GuestError::NotFound(format!(
                        "no worker serves agent type {:?}",
                        call.target
                    ))))
                }
                Err(error) => results[index] = Some(Err(error.clone())),
            }
        }
        if to_send.is_empty() {
            return Ok(results
                .into_iter()
                .map(|r| r.expect("every call has a result"))
                .collect());
        }

        let services = &self.services;
        let origin = &self.origin;
        let task_group_id = group.then(wire::new_task_group_id).unwrap_or_default();
        let route_ttl = timeout + ROUTE_SLACK;
        let mut writes = Vec::with_capacity(4 + 2 * to_send.len());
        let mut waits: Vec<(usize, String, String, Waiting)> = Vec::with_capacity(to_send.len());
        let mut awaited = Vec::with_capacity(to_send.len());
        let calling = if group {
            json!({
                "task_group_id": task_group_id,
                "target_agent_types": to_send.iter().map(|(_, c)| c.target.as_str()).collect::<Vec<_>>(),
            })
        } else {
            json!({ "target_agent_type": to_send[0].1.target })
        };
        writes.push(self.state_write(state::CALLING_AGENT, Some(&calling)));
        if group {
            let key = keys::task_group(&task_group_id);
            let mut hset = redis::cmd("HSET");
            hset.arg(&key)
                .arg("total")
                .arg(to_send.len().to_string())
                .arg("completed")
                .arg("0")
                .arg("source_agent_id")
                .arg(&origin.agent_id);
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(&key).arg(TASK_GROUP_TTL_S);
            writes.push(Write::Command(hset));
            writes.push(Write::Command(expire));
        }
        let mut children = Vec::with_capacity(to_send.len());
        let mut sent_ids: Vec<String> = Vec::with_capacity(to_send.len());
        for (index, call) in to_send {
            let child = wire::new_message_id();
            let key = WaitKey {
                capability: origin.agent_id.clone(),
                kind: ReplyKind::Agent,
                message_id: child.clone(),
            };
            writes.push(key.route(&services.worker_id, route_ttl));
            let header = wire::Header {
                message_id: child.clone(),
                session_id: origin.session_id.clone(),
                trace_id: origin.trace_id.clone(),
                source_agent_id: origin.agent_id.clone(),
                target_agent_type: call.target.clone(),
                parent_message_id: origin.message_id.clone(),
                task_group_id: task_group_id.clone(),
                tenant_id: self.tenant_id.clone(),
                metadata: call.metadata,
            };
            let body = json!({
                "content": call.content,
                "wait_for_reply": true,
                "extra_payload": call.payload,
            });
            writes.push(Write::Control {
                stream: keys::capability_stream(&call.target),
                data: wire::control_json("ASK_AGENT", &header, &body),
            });
            awaited.push(AwaitedChild {
                key: key.clone(),
                child_message_id: Some(child.clone()),
            });
            children.push(json!({ "target_agent_type": call.target, "message_id": child }));
            sent_ids.push(child.clone());
            waits.push((index, child, call.target, services.waiters.register(key)));
        }
        let waiting = if group {
            json!({ "task_group_id": task_group_id, "children": children })
        } else {
            children.pop().expect("one call was sent")
        };
        writes.push(self.state_write(state::WAITING_AGENT, Some(&waiting)));
        self.awaiting
            .lock()
            .expect("awaiting lock is never poisoned")
            .extend(awaited);
        self.writer
            .commit(&origin.session_id, writes)
            .await
            .map_err(|_| stopping())?;

        let slot = self.lend_permit();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: FuturesUnordered<_> = waits
            .into_iter()
            .map(|(index, child, target, mut waiting)| async move {
                let reply = waiting.recv().await;
                (index, child, target, reply)
            })
            .collect();
        let mut answered: Vec<(usize, String, String, Option<Reply>)> = Vec::new();
        let mut cancelled = false;
        loop {
            tokio::select! {
                next = pending.next() => match next {
                    Some(done) => answered.push(done),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.cancel.requested_token.cancelled() => {
                    cancelled = true;
                    break;
                }
            }
        }
        // Replies that raced the timeout or the cancel.
        while let Some(Some(done)) = pending.next().now_or_never() {
            answered.push(done);
        }
        // Dropping the rest unregisters them: a later reply is an orphan.
        drop(pending);
        self.resume_permit(slot).await;

        {
            // Forget this wait's children, except unanswered ones of a
            // cancelled task: the dispatcher cancels those with the task.
            let answered_ids: Vec<&str> = answered
                .iter()
                .map(|(_, child, _, _)| child.as_str())
                .collect();
            let mut awaiting = self
                .awaiting
                .lock()
                .expect("awaiting lock is never poisoned");
            awaiting.retain(|a| match a.child_message_id.as_deref() {
                Some(child) if sent_ids.iter().any(|id| id == child) => {
                    cancelled && !answered_ids.contains(&child)
                }
                _ => true,
            });
        }
        let any_answered = answered.iter().any(|(_, _, _, reply)| reply.is_some());
        for (index, child, _target, reply) in answered {
            results[index] = Some(match reply {
                Some(reply) => Ok(agent_reply(&child, reply)),
                None => Err(GuestError::Failed(format!(
                    "the wait for {child} was replaced by another"
                ))),
            });
        }
        let timeout_ms = timeout.as_millis();
        let unanswered = |result: &mut Option<Result<AgentReply, GuestError>>| {
            if result.is_none() {
                *result = Some(Err(if cancelled {
                    GuestError::Cancelled(
                        "the task was cancelled while waiting; the called agent is cancelled too"
                            .into(),
                    )
                } else {
                    GuestError::Timeout(format!(
                        "no reply within {timeout_ms} ms; a later reply reaches the handler as a RESUME command"
                    ))
                }));
            }
        };
        results.iter_mut().for_each(unanswered);
        if any_answered {
            let resumed = self.state_write(state::RESUMED, None);
            self.writer
                .send(&origin.session_id, vec![resumed])
                .await
                .map_err(|_| stopping())?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every call has a result"))
            .collect())
    }
}

impl Host for TaskState {
    async fn call_agent(
        &mut self,
        target_agent_type: String,
        content: String,
        options: CallOptions,
    ) -> wasmtime::Result<Result<AgentReply, GuestError>> {
        let _timer = self.timed(crate::metrics::HostImport::CallAgent);
        let shared = self.host("call-agent")?.shared.clone();
        let call = check_call(
            target_agent_type,
            content,
            options.payload.as_deref(),
            options.metadata.as_deref(),
        );
        if options.wait_for_reply == Some(false) {
            return Ok(match call {
                Ok(call) => shared.send_without_reply(call).await?,
                Err(error) => Err(error),
            });
        }
        let timeout = shared.wait_budget(options.timeout_ms);
        let mut results = shared.call_and_wait(vec![call], false, timeout).await?;
        Ok(results.pop().expect("one result per call"))
    }

    async fn dispatch_group(
        &mut self,
        tasks: Vec<AgentTask>,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<Vec<Result<AgentReply, GuestError>>> {
        let _timer = self.timed(crate::metrics::HostImport::DispatchGroup);
        let shared = self.host("dispatch-group")?.shared.clone();
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let calls = tasks
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
        let timeout = shared.wait_budget(timeout_ms);
        shared.call_and_wait(calls, true, timeout).await
    }

    async fn ask_user(
        &mut self,
        prompt: String,
        options: AskOptions,
    ) -> wasmtime::Result<Result<UserReply, GuestError>> {
        let _timer = self.timed(crate::metrics::HostImport::AskUser);
        let shared = self.host("ask-user")?.shared.clone();
        let metadata = match json_object(options.metadata.as_deref(), "metadata") {
            Ok(metadata) => metadata,
            Err(error) => return Ok(Err(error)),
        };
        shared.ask_user(prompt, metadata, options.timeout_ms).await
    }

    async fn active_workers(&mut self) -> wasmtime::Result<Result<Vec<WorkerInfo>, GuestError>> {
        let _timer = self.timed(crate::metrics::HostImport::ActiveWorkers);
        let shared = self.host("active-workers")?.shared.clone();
        let workers =
            byclaw_protocol::workers::active_workers(&mut shared.services.redis.clone()).await;
        Ok(workers
            .map(|workers| {
                workers
                    .into_iter()
                    .map(|w| WorkerInfo {
                        worker_id: w.worker_id,
                        capabilities: w.capabilities,
                        last_seen_ms: w.last_seen,
                    })
                    .collect()
            })
            .map_err(|e| GuestError::Unavailable(format!("cannot read the worker registry: {e}"))))
    }
}

impl TaskShared {
    /// The reference's fire-and-forget call: no `source_agent_id`, so the
    /// callee sends no reply.
    async fn send_without_reply(
        &self,
        call: Call,
    ) -> wasmtime::Result<Result<AgentReply, GuestError>> {
        match self.served(&[call.target.as_str()]).await {
            Ok(flags) if flags.first() == Some(&true) => {}
            Ok(_) => {
                return Ok(Err(GuestError::NotFound(format!(
                    "no worker serves agent type {:?}",
                    call.target
                ))));
            }
            Err(error) => return Ok(Err(error)),
        }
        let origin = &self.origin;
        let child = wire::new_message_id();
        let header = wire::Header {
            message_id: child.clone(),
            session_id: origin.session_id.clone(),
            trace_id: origin.trace_id.clone(),
            source_agent_id: String::new(),
            target_agent_type: call.target.clone(),
            parent_message_id: origin.message_id.clone(),
            task_group_id: String::new(),
            tenant_id: self.tenant_id.clone(),
            metadata: call.metadata,
        };
        let body = json!({
            "content": call.content,
            "wait_for_reply": false,
            "extra_payload": call.payload,
        });
        let calling = json!({ "target_agent_type": call.target, "message_id": child });
        let writes = vec![
            self.state_write(state::CALLING_AGENT, Some(&calling)),
            Write::Control {
                stream: keys::capability_stream(&call.target),
                data: wire::control_json("ASK_AGENT", &header, &body),
            },
        ];
        self.writer
            .commit(&origin.session_id, writes)
            .await
            .map_err(|_| stopping())?;
        Ok(Ok(AgentReply {
            status: "QUEUED".into(),
            message_id: child,
            agent_type: call.target,
            reply_data: "null".into(),
            content: "\"\"".into(),
        }))
    }

    /// Emits the form and WAITING_USER, then waits for the user's RESUME.
    async fn ask_user(
        &self,
        prompt: String,
        metadata: Value,
        timeout_ms: Option<u64>,
    ) -> wasmtime::Result<Result<UserReply, GuestError>> {
        if self.cancel.is_requested() {
            return Ok(Err(GuestError::Cancelled(
                "the task is being cancelled".into(),
            )));
        }
        let origin = &self.origin;
        let timeout = self.wait_budget(timeout_ms);
        let key = WaitKey {
            capability: origin.agent_id.clone(),
            kind: ReplyKind::User,
            message_id: origin.message_id.clone(),
        };
        let form = json!({
            "formStatus": 0,
            "pluginMachineFields": [{
                "formType": "textarea",
                "fieldName": "用户输入",
                "fieldCode": "user_input",
                "description": prompt,
                "required": true,
            }],
        })
        .to_string();
        let metadata = raw(&metadata);
        let form_event = wire::data_message(
            origin,
            &EventSpec {
                event_type: event_type::REASONING_LOG_DELTA,
                content_type: content_type::USER_INPUT,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(&form),
                    ..Delta::default()
                },
                metadata: Some(&metadata),
            },
        );
        let mut waiting = self.services.waiters.register(key.clone());
        let writes = vec![
            key.route(&self.services.worker_id, timeout + ROUTE_SLACK),
            Write::Event {
                stream: self.stream.clone(),
                data: form_event,
            },
            self.state_write(state::WAITING_USER, None),
        ];
        let waiting_key = key.clone();
        let awaited = AwaitedChild {
            key,
            child_message_id: None,
        };
        self.awaiting
            .lock()
            .expect("awaiting lock is never poisoned")
            .push(awaited);
        self.writer
            .commit(&origin.session_id, writes)
            .await
            .map_err(|_| stopping())?;

        let slot = self.lend_permit();
        let mut cancelled = false;
        let received = tokio::select! {
            reply = waiting.recv() => reply,
            _ = tokio::time::sleep(timeout) => None,
            _ = self.cancel.requested_token.cancelled() => {
                cancelled = true;
                None
            }
        };
        let reply = received.or_else(|| waiting.close());
        self.resume_permit(slot).await;
        if !cancelled || reply.is_some() {
            let key = waiting_key;
            self.awaiting
                .lock()
                .expect("awaiting lock is never poisoned")
                .retain(|a| a.key != key);
        }
        let Some(reply) = reply else {
            return Ok(Err(if cancelled {
                GuestError::Cancelled("the task was cancelled while waiting for the user".into())
            } else {
                GuestError::Timeout(format!(
                    "the user did not answer within {} ms; a later answer reaches the handler as a RESUME command",
                    timeout.as_millis()
                ))
            }));
        };
        let resumed = self.state_write(state::RESUMED, None);
        self.writer
            .send(&origin.session_id, vec![resumed])
            .await
            .map_err(|_| stopping())?;
        Ok(Ok(UserReply {
            status: reply.status,
            message_id: reply.message_id,
            content: reply.content.to_string(),
            reply_data: reply.reply_data.to_string(),
            extra_payload: reply.extra_payload.to_string(),
        }))
    }
}
