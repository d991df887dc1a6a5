//! RESUMEs handed to the tasks awaiting them (here, on another worker, or
//! run as orphans), task-group counting, and cancels with their cascade to
//! the calls a cancelled task awaits.

use super::*;

/// Counts a child's reply into its task group once per child: KEYS[1] the
/// group hash, KEYS[2] the set of children counted, ARGV[1] the child's
/// message id. Returns {1 if newly counted else 0, completed, total}, or
/// total -1 when the group hash is gone.
/// `completed` stays the reference's counter, now of distinct children.
const COUNT_GROUP_REPLY: &str = r#"
local total = redis.call('HGET', KEYS[1], 'total')
if not total then return {0, 0, -1} end
local new = redis.call('SADD', KEYS[2], ARGV[1])
local completed
if new == 1 then
  completed = redis.call('HINCRBY', KEYS[1], 'completed', 1)
  local ttl = redis.call('TTL', KEYS[1])
  redis.call('EXPIRE', KEYS[2], ttl > 0 and ttl or 86400)
else
  completed = tonumber(redis.call('HGET', KEYS[1], 'completed') or '0')
end
return {new, completed, tonumber(total)}
"#;

/// The script call counting `header`'s reply into its task group (the
/// child is the RESUME's `parent_message_id`).
fn count_group_reply(header: &wire::Header) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(COUNT_GROUP_REPLY)
        .arg(2)
        .arg(keys::task_group(&header.task_group_id))
        .arg(keys::task_group_replied(&header.task_group_id))
        .arg(&header.parent_message_id);
    cmd
}

impl Dispatcher {
    /// Hands a RESUME to the task awaiting it, here or on another worker.
    /// False when nobody awaits it: it then runs as an orphan RESUME.
    pub(super) async fn route_resume(
        &self,
        delivery: &Delivery,
        agent_type: &str,
        command: &ControlCommand,
        source: Source,
    ) -> bool {
        let header = &command.header;
        let Action::Resume {
            content,
            status,
            reply_data,
            extra_payload,
        } = &command.action
        else {
            return false;
        };
        let key = WaitKey::for_resume(agent_type, header);
        let reply = Reply {
            message_id: header.message_id.clone(),
            source_agent_id: header.source_agent_id.clone(),
            session_id: header.session_id.clone(),
            tenant_id: header.tenant_id.clone(),
            status: status.clone(),
            content: content.clone(),
            reply_data: reply_data.clone(),
            extra_payload: extra_payload.clone(),
        };
        let (delivered, prompt_id) = self.services.waiters.deliver_to_prompt(&key, reply.clone());
        match delivered {
            Delivered::Taken => {
                let mut writes = Vec::with_capacity(4);
                // Kept for a run of the task after this daemon dies, with
                // the XACK: acknowledged, it is in the journal.
                if let Some((task, field)) = key.journal_entry(prompt_id.as_deref()) {
                    writes.extend(routing::journal_write(&task, &field, &reply));
                }
                // A second reply to this call finds the route answered. (A
                // user's answer is marked by the task itself, in order with
                // the route of its next prompt, which reuses the key.)
                if key.kind == ReplyKind::Agent {
                    writes.push(key.answered());
                }
                if !header.task_group_id.is_empty() {
                    // Keep the reference's group counter true for observers.
                    writes.push(Write::Command(count_group_reply(header)));
                }
                writes.push(self.ack(delivery));
                tracing::debug!(
                    parent_message_id = %header.parent_message_id,
                    resume_id = %header.message_id,
                    "reply handed to the task awaiting it"
                );
                let _ = self.writer.commit(&header.session_id, writes).await;
                return true;
            }
            Delivered::Stale => {
                self.drop_duplicate(
                    delivery,
                    header,
                    "the awaiting task took this reply, or an answer to that prompt, before",
                )
                .await;
                return true;
            }
            Delivered::Foreign => {
                self.refuse_foreign(delivery, header).await;
                return true;
            }
            Delivered::NoWaiter => {}
        }
        let routed = routing::route_reply(
            &mut self.services.redis.clone(),
            &key,
            &reply,
            &self.settings.worker_id,
        )
        .await;
        match routed {
            Ok(Routed {
                route: Route::Dropped,
                ..
            }) => {
                self.drop_duplicate(
                    delivery,
                    header,
                    "its call was answered or cancelled before, or has another answer",
                )
                .await;
                true
            }
            Ok(Routed {
                route: Route::Foreign,
                ..
            }) => {
                self.refuse_foreign(delivery, header).await;
                true
            }
            Ok(Routed {
                route: Route::Forward(worker),
                ..
            }) if source != Source::Forwarded => {
                let mut fields: Vec<(String, Vec<u8>)> = delivery.fields.clone();
                fields.retain(|(name, _)| name != "capability");
                fields.push(("capability".into(), agent_type.as_bytes().to_vec()));
                let writes = vec![
                    Write::Fields {
                        stream: keys::worker_stream(&worker),
                        fields,
                        maxlen: 0,
                    },
                    self.ack(delivery),
                ];
                tracing::debug!(
                    parent_message_id = %header.parent_message_id,
                    to_worker = %worker,
                    "reply forwarded to the worker whose task awaits it"
                );
                let _ = self.writer.commit(&header.session_id, writes).await;
                true
            }
            Ok(Routed {
                journaled: true, ..
            }) => {
                // Its task is unfinished and the reply is in its journal.
                // A waiter registered here since the first try takes it;
                // else the task is not waiting for it now (its daemon died:
                // its next run reads it from the journal).
                if let Delivered::Taken = self.services.waiters.deliver(&key, reply) {
                    tracing::debug!(
                        parent_message_id = %header.parent_message_id,
                        "reply handed to the task awaiting it"
                    );
                } else {
                    self.services.metrics.emit(ReplyJournaled {
                        parent_message_id: &header.parent_message_id,
                        resume_id: &header.message_id,
                    });
                }
                let mut writes = Vec::with_capacity(2);
                if !header.task_group_id.is_empty() {
                    // The reference's group counter, true for observers.
                    writes.push(Write::Command(count_group_reply(header)));
                }
                writes.push(self.ack(delivery));
                let _ = self.writer.commit(&header.session_id, writes).await;
                true
            }
            // Forwarded here, but the waiter went meanwhile: run it here.
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "cannot look up the reply route; entry left pending");
                true
            }
        }
    }

    /// Acknowledges a reply that names a task of another session or
    /// tenant, and counts it: it reaches neither the task nor its journal.
    async fn refuse_foreign(&self, delivery: &Delivery, header: &wire::Header) {
        self.services.metrics.emit(ReplyRefused {
            parent_message_id: &header.parent_message_id,
            resume_id: &header.message_id,
            session_id: &header.session_id,
            tenant_id: &header.tenant_id,
        });
        let _ = self
            .writer
            .commit(&header.session_id, vec![self.ack(delivery)])
            .await;
    }

    /// Acknowledges a reply nobody may take (a duplicate, a late answer, a
    /// reply to a cancelled task or to a call that timed out) and counts it.
    /// A task group's reply is still counted into the reference's group
    /// counter, in the same pipeline: once per child (a set), so a
    /// redelivery adds nothing while a reply that came too late still shows.
    async fn drop_duplicate(&self, delivery: &Delivery, header: &wire::Header, why: &str) {
        self.services.metrics.emit(ReplyDropped {
            parent_message_id: &header.parent_message_id,
            resume_id: &header.message_id,
            why,
        });
        let mut writes = Vec::with_capacity(2);
        if !header.task_group_id.is_empty() {
            writes.push(Write::Command(count_group_reply(header)));
        }
        writes.push(self.ack(delivery));
        let _ = self.writer.commit(&header.session_id, writes).await;
    }

    /// For an orphan RESUME of a task group: counts it in, as the reference
    /// does; true when it completes the group (then the handler runs it),
    /// false when the group still waits (the entry is acknowledged).
    pub(super) async fn group_complete(
        &self,
        delivery: &Delivery,
        command: &ControlCommand,
    ) -> bool {
        let header = &command.header;
        let mut conn = self.services.redis.clone();
        let counted: Result<(i64, i64, i64), _> =
            count_group_reply(header).query_async(&mut conn).await;
        match counted {
            Ok((_, _, -1)) => true,
            Ok((0, _, _)) => {
                // This child's reply was counted before: a redelivery.
                self.drop_duplicate(delivery, header, "this child's reply was counted before")
                    .await;
                false
            }
            Ok((_, completed, total)) if completed < total => {
                tracing::info!(
                    task_group_id = %header.task_group_id,
                    completed,
                    total,
                    "task group reply counted; waiting for the rest"
                );
                let _ = self
                    .writer
                    .commit(&header.session_id, vec![self.ack(delivery)])
                    .await;
                false
            }
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%error, "cannot count the task group reply; entry left pending");
                false
            }
        }
    }

    /// Cancels what a cancelled task still awaited: each route gets a
    /// tombstone (late replies are dropped, not run as orphans) and each
    /// child task the reference client's cancel (CANCELLING + CANCEL_TASK to
    /// its worker; a child not started yet gets a CANCELLED record instead).
    /// Returns the writes, to go out before the caller's own outcome.
    pub(super) async fn cancel_awaited(
        &self,
        origin: &EventOrigin,
        awaited: Vec<AwaitedChild>,
        reason: &str,
    ) -> Vec<Write> {
        let mut writes = Vec::with_capacity(awaited.len() * 2);
        let reason = format!("caller {} ended: {reason}", origin.message_id);
        for child in awaited {
            writes.push(child.key.tombstone());
            let Some(message_id) = child.child_message_id else {
                continue;
            };
            let lookup = self
                .executions
                .request_cancel(
                    &mut self.services.redis.clone(),
                    &origin.session_id,
                    &message_id,
                    &reason,
                    true,
                )
                .await;
            match lookup {
                Ok(CancelLookup::Requested {
                    execution_id,
                    worker_id,
                    target_agent_type,
                }) => {
                    tracing::info!(child_message_id = %message_id, %worker_id, "cancelling a call the cancelled task awaited");
                    writes.push(Write::Control {
                        stream: keys::worker_stream(&worker_id),
                        data: wire::cancel_task_json(&wire::CancelTarget {
                            session_id: &origin.session_id,
                            message_id: &message_id,
                            execution_id: &execution_id,
                            worker_id: &worker_id,
                            target_agent_type: &target_agent_type,
                            reason: &reason,
                            requested_by: &origin.message_id,
                            cancel_mode: "graceful",
                        }),
                    });
                }
                Ok(CancelLookup::Precancelled { .. }) => {
                    tracing::info!(child_message_id = %message_id, "a call the cancelled task awaited had not started; it never will");
                }
                Ok(other) => {
                    tracing::debug!(child_message_id = %message_id, lookup = ?other, "awaited call needs no cancel");
                }
                Err(error) => {
                    tracing::warn!(child_message_id = %message_id, %error, "cannot cancel a call the cancelled task awaited");
                }
            }
        }
        writes
    }

    /// Applies a CANCEL_TASK to a task running here.
    pub(super) fn cancel(self: &Arc<Self>, request: &wire::CancelRequest) -> bool {
        let running = self.running.lock().expect("running lock is never poisoned");
        let Some(task) = running.get(&request.target_message_id) else {
            return false;
        };
        let reason = if request.reason.is_empty() {
            "cancelled by request".to_owned()
        } else {
            request.reason.clone()
        };
        task.cancel.request(&reason);
        if request.is_force() {
            task.cancel.force.cancel();
        } else {
            let force = task.cancel.force.clone();
            let grace = self.settings.cancel_grace;
            self.tracker.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => force.cancel(),
                    _ = force.cancelled() => {}
                }
            });
        }
        true
    }
}

impl Dispatcher {
    /// A RESUME another worker forwarded here because a task of ours awaited
    /// it. When the waiter has gone meanwhile it runs through the handler as
    /// its own task, which needs a permit the control loop must not wait for.
    pub(super) async fn forwarded_resume(
        self: &Arc<Self>,
        delivery: Delivery,
        command: ControlCommand,
        stop: &CancellationToken,
    ) {
        let agent_type = delivery
            .field("capability")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
            .unwrap_or_else(|| command.header.target_agent_type.clone());
        if self
            .route_resume(&delivery, &agent_type, &command, Source::Forwarded)
            .await
        {
            return;
        }
        let this = self.clone();
        let stop = stop.clone();
        let permits = self.services.permits.clone();
        self.tracker.spawn(async move {
            let permit = tokio::select! {
                permit = permits.acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
                _ = this.force_stop.cancelled() => return,
            };
            this.handle(delivery, agent_type, Source::Forwarded, permit)
                .await;
        });
    }
}
