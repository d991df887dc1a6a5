//! Calls to other agents: one call or a task group sent as the reference
//! sends them, waited for in process (the waiter and its route registered
//! before anything is sent, the permit lent out meanwhile), and the
//! reference's fire-and-forget call.

use super::*;

impl TaskLink {
    /// Sends `calls` (as one task group when `group`) and waits for their
    /// replies; one result per call, in order.
    pub(super) async fn call_and_wait(
        &self,
        calls: Vec<Result<AgentCall, GuestError>>,
        group: bool,
        timeout: Duration,
    ) -> Result<Vec<Result<AgentReply, GuestError>>, Stopping> {
        // Numbered whatever becomes of the call, so every run of the task
        // gives each call the same ids.
        let call_number = self.next_call();
        if self.is_closed() {
            return Err(Stopping);
        }
        let mut results: Vec<Option<Result<AgentReply, GuestError>>> = Vec::new();
        results.resize_with(calls.len(), || None);
        if self.cancel.is_requested() {
            return Ok(calls
                .into_iter()
                .map(|_| Err(GuestError::Cancelled("the task is being cancelled".into())))
                .collect());
        }
        let depth = match self.child_depth() {
            Ok(depth) => depth,
            Err(denied) => return Ok(calls.into_iter().map(|_| Err(denied.clone())).collect()),
        };

        // Fail fast on agent types nobody serves: a wait for them could only
        // time out.
        let mut targets: Vec<&str> = calls
            .iter()
            .filter_map(|c| c.as_ref().ok().map(|c| c.target.as_str()))
            .collect();
        targets.sort_unstable();
        targets.dedup();
        // A run after another does not ask: a call the run before made was
        // served then, and must be made (or found answered) the same way.
        let served = if self.rerun {
            Ok(vec![true; targets.len()])
        } else {
            self.served(&targets).await
        };
        let served: BTreeMap<String, Result<bool, GuestError>> = match served {
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
        let mut to_send: Vec<(usize, AgentCall)> = Vec::new();
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
        let task_group_id = if group {
            wire::call_task_group_id(&origin.message_id, call_number)
        } else {
            String::new()
        };
        let route_ttl = timeout + ROUTE_SLACK;
        let expect = Expect {
            session_id: origin.session_id.clone(),
            tenant_id: self.tenant_id.clone(),
            ..Expect::default()
        };
        // Each child's id and wait, registered before any route names
        // this worker.
        let children_ids: Vec<String> = to_send
            .iter()
            .map(|(index, _)| {
                if group {
                    wire::group_child_message_id(&task_group_id, index + 1)
                } else {
                    wire::call_message_id(&origin.message_id, call_number)
                }
            })
            .collect();
        // The host call's span (call-agent, dispatch-group), in traces.
        tracing::Span::current().record("child_message_id", children_ids.join(",").as_str());
        let wait_keys: Vec<WaitKey> = children_ids
            .iter()
            .map(|child| WaitKey {
                capability: origin.agent_id.clone(),
                kind: ReplyKind::Agent,
                message_id: child.clone(),
            })
            .collect();
        let registered: Vec<Waiting> = wait_keys
            .iter()
            .map(|key| {
                services
                    .waiters
                    .register_expecting(key.clone(), expect.clone())
            })
            .collect();
        // A run after another: what the runs before learned (in memory when
        // this daemon ran them, else from the journal).
        let mut journaled: Vec<Option<Known>> =
            children_ids.iter().map(|child| self.known(child)).collect();
        let from_memory = journaled.iter().all(Option::is_some);
        if self.rerun && !from_memory {
            let routes = wait_keys
                .iter()
                .map(|key| key.route_cmd(&services.worker_id, None, route_ttl))
                .collect();
            let read = routing::route_then_read_journal(
                &mut services.redis.clone(),
                routes,
                &origin.session_id,
                &origin.message_id,
                &children_ids,
            )
            .await;
            match read {
                Ok(found) => {
                    for (known, entry) in journaled.iter_mut().zip(found) {
                        if known.is_none() {
                            *known = Known::from_journal(entry, &expect);
                        }
                    }
                }
                Err(error) => {
                    // Not knowing what the first run was told, nothing is
                    // sent: the entry stays pending and is run again.
                    tracing::warn!(%error, "cannot read the task's journal; run stopped, entry left pending");
                    return Err(Stopping);
                }
            }
        }

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
        if group && !from_memory {
            let key = keys::task_group(&task_group_id);
            let fields = [
                ("total", to_send.len().to_string()),
                ("completed", "0".to_owned()),
                ("source_agent_id", origin.agent_id.clone()),
            ];
            if self.rerun {
                // The group may exist already, its replies counted: kept.
                for (field, value) in fields {
                    let mut hsetnx = redis::cmd("HSETNX");
                    hsetnx.arg(&key).arg(field).arg(value);
                    writes.push(Write::Command(hsetnx));
                }
            } else {
                let mut hset = redis::cmd("HSET");
                hset.arg(&key);
                for (field, value) in fields {
                    hset.arg(field).arg(value);
                }
                writes.push(Write::Command(hset));
            }
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(&key).arg(TASK_GROUP_TTL_S);
            writes.push(Write::Command(expire));
        }
        let mut children = Vec::with_capacity(to_send.len());
        // Each call sent (its index among `calls`, its id).
        let mut sent_ids: Vec<(usize, String)> = Vec::with_capacity(to_send.len());
        let mut any_journaled = false;
        let sends = to_send
            .into_iter()
            .zip(children_ids)
            .zip(wait_keys)
            .zip(registered)
            .zip(journaled);
        for (((((index, call), child), key), waiting), journaled) in sends {
            children.push(json!({ "target_agent_type": call.target, "message_id": child }));
            if let Some(Known::TimedOut) = journaled {
                // Timed out on a run before this one: not sent again.
                drop(waiting);
                results[index] = Some(Err(GuestError::Timeout(format!(
                    "no reply within {} ms; a reply after the task ended reaches the handler as a RESUME command",
                    timeout.as_millis()
                ))));
                continue;
            }
            if let Some(Known::Reply(reply)) = journaled {
                // Answered before this run: not sent again.
                drop(waiting);
                if !from_memory {
                    writes.push(key.answered());
                }
                self.learn(&child, Some(&reply));
                results[index] = Some(if reply.source_agent_id == call.target {
                    Ok(agent_reply(&child, *reply))
                } else {
                    // Another plugin version, or a guest that depends on
                    // what is not journaled yet, took another path.
                    Err(GuestError::Failed(format!(
                        "nondeterminism: call {child} went to {:?} on the run before this one, to {:?} now",
                        reply.source_agent_id, call.target
                    )))
                });
                any_journaled = true;
                continue;
            }
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
                metadata: with_call_depth(call.metadata, depth),
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
                key,
                child_message_id: Some(child.clone()),
            });
            sent_ids.push((index, child.clone()));
            waits.push((index, child, call.target, waiting));
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
        self.commit(writes).await?;

        let slot = if waits.is_empty() {
            None
        } else {
            self.lend_permit()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut evict_at = if waits.is_empty() {
            None
        } else {
            self.evict_at()
        };
        let mut got: Vec<(usize, Option<Reply>)> = Vec::new();
        let mut cancelled = false;
        let mut evicted = None;
        {
            let mut pending: FuturesUnordered<_> = waits
                .iter_mut()
                .enumerate()
                .map(|(at, (_, _, _, waiting))| async move { (at, waiting.recv().await) })
                .collect();
            loop {
                tokio::select! {
                    // A reply already in is taken before the instance is dropped.
                    biased;
                    next = pending.next() => match next {
                        Some(done) => got.push(done),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = self.cancel.requested_token.cancelled() => {
                        cancelled = true;
                        break;
                    }
                    _ = tokio::time::sleep_until(evict_at.unwrap_or(deadline)), if evict_at.is_some() => {
                        match self.suspended_slot() {
                            Some(slot) => {
                                evicted = Some(slot);
                                break;
                            }
                            // No room: the task keeps its instance.
                            None => evict_at = None,
                        }
                    }
                }
            }
            // Replies that raced the timeout or the cancel.
            while let Some(Some(done)) = pending.next().now_or_never() {
                got.push(done);
            }
        }
        if let Some(suspended_slot) = evicted {
            // The instance goes; the waits stay registered for the next run,
            // which is given what came in already.
            let mut still = Vec::with_capacity(waits.len());
            for (at, (_, child, _, waiting)) in waits.into_iter().enumerate() {
                match got.iter_mut().find(|(done, _)| *done == at) {
                    Some((_, Some(reply))) => self.learn(&child, Some(reply)),
                    Some((_, None)) => self.learn(&child, None),
                    None => still.push((child, waiting)),
                }
            }
            drop(slot);
            return Err(self.suspend(still, expect, deadline, suspended_slot));
        }
        // Dropping the rest unregisters them: a later reply is an orphan.
        let answered: Vec<(usize, String, String, Option<Reply>)> = got
            .into_iter()
            .map(|(at, reply)| {
                let (index, child, target, _) = &waits[at];
                (*index, child.clone(), target.clone(), reply)
            })
            .collect();
        drop(waits);
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
                Some(child) if sent_ids.iter().any(|(_, id)| id == child) => {
                    cancelled && !answered_ids.contains(&child)
                }
                _ => true,
            });
        }
        let mut any_answered =
            any_journaled || answered.iter().any(|(_, _, _, reply)| reply.is_some());
        for (index, child, _target, reply) in answered {
            results[index] = Some(match reply {
                Some(reply) => {
                    self.learn(&child, Some(&reply));
                    Ok(agent_reply(&child, reply))
                }
                None => Err(GuestError::Failed(format!(
                    "the wait for {child} was replaced by another"
                ))),
            });
        }
        let timeout_ms = timeout.as_millis();
        if !cancelled {
            // Timed out: so says the journal from now on, unless a reply
            // got there first (then it is this call's reply after all).
            let unanswered: Vec<(usize, String)> = sent_ids
                .into_iter()
                .filter(|(_, child)| self.known(child).is_none())
                .collect();
            if !unanswered.is_empty() {
                let ids: Vec<String> = unanswered.iter().map(|(_, id)| id.clone()).collect();
                let won = self.journal_timeouts(&ids, &expect).await?;
                for ((index, child), reply) in unanswered.into_iter().zip(won) {
                    self.learn(&child, reply.as_ref());
                    if let Some(reply) = reply {
                        any_answered = true;
                        results[index] = Some(Ok(agent_reply(&child, reply)));
                    }
                }
            }
        }
        let unanswered = |result: &mut Option<Result<AgentReply, GuestError>>| {
            if result.is_none() {
                *result = Some(Err(if cancelled {
                    GuestError::Cancelled(
                        "the task was cancelled while waiting; the called agent is cancelled too"
                            .into(),
                    )
                } else {
                    GuestError::Timeout(format!(
                        "no reply within {timeout_ms} ms; a reply after the task ended reaches the handler as a RESUME command"
                    ))
                }));
            }
        };
        results.iter_mut().for_each(unanswered);
        if any_answered {
            let resumed = self.state_write(state::RESUMED, None);
            self.send(vec![resumed]).await?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every call has a result"))
            .collect())
    }
}

impl TaskLink {
    /// The reference's fire-and-forget call: no `source_agent_id`, so the
    /// callee sends no reply.
    pub(super) async fn send_without_reply(
        &self,
        call: AgentCall,
    ) -> Result<Result<AgentReply, GuestError>, Stopping> {
        let call_number = self.next_call();
        let served = if self.rerun {
            Ok(vec![true])
        } else {
            self.served(&[call.target.as_str()]).await
        };
        match served {
            Ok(flags) if flags.first() == Some(&true) => {}
            Ok(_) => {
                return Ok(Err(GuestError::NotFound(format!(
                    "no worker serves agent type {:?}",
                    call.target
                ))));
            }
            Err(error) => return Ok(Err(error)),
        }
        let depth = match self.child_depth() {
            Ok(depth) => depth,
            Err(denied) => return Ok(Err(denied)),
        };
        let origin = &self.origin;
        let child = wire::call_message_id(&origin.message_id, call_number);
        tracing::Span::current().record("child_message_id", child.as_str());
        let header = wire::Header {
            message_id: child.clone(),
            session_id: origin.session_id.clone(),
            trace_id: origin.trace_id.clone(),
            source_agent_id: String::new(),
            target_agent_type: call.target.clone(),
            parent_message_id: origin.message_id.clone(),
            task_group_id: String::new(),
            tenant_id: self.tenant_id.clone(),
            metadata: with_call_depth(call.metadata, depth),
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
        self.commit(writes).await?;
        Ok(Ok(AgentReply {
            status: "QUEUED".into(),
            message_id: child,
            agent_type: call.target,
            reply_data: "null".into(),
            content: "\"\"".into(),
        }))
    }
}
