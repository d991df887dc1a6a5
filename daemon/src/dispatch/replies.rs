//! RESUMEs handed to the tasks awaiting them (here, on another worker, or
//! run as orphans), task-group counting, and cancels with their cascade to
//! the calls a cancelled task awaits.

use super::*;

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
            status: status.clone(),
            content: content.clone(),
            reply_data: reply_data.clone(),
            extra_payload: extra_payload.clone(),
        };
        if self.services.waiters.deliver(&key, reply) {
            let mut writes = Vec::with_capacity(2);
            if !header.task_group_id.is_empty() {
                // Keep the reference's group counter true for observers.
                let mut incr = redis::cmd("HINCRBY");
                incr.arg(keys::task_group(&header.task_group_id))
                    .arg("completed")
                    .arg(1);
                writes.push(Write::Command(incr));
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
        if source == Source::Forwarded {
            return false;
        }
        match routing::lookup(
            &mut self.services.redis.clone(),
            &key,
            &self.settings.worker_id,
        )
        .await
        {
            Ok(Route::Orphan) => false,
            Ok(Route::Dropped) => {
                tracing::info!(
                    parent_message_id = %header.parent_message_id,
                    resume_id = %header.message_id,
                    "reply to a cancelled task dropped"
                );
                let _ = self
                    .writer
                    .commit(&header.session_id, vec![self.ack(delivery)])
                    .await;
                true
            }
            Ok(Route::Forward(worker)) => {
                let mut fields: Vec<(String, Vec<u8>)> = delivery.fields.clone();
                fields.retain(|(name, _)| name != "capability");
                fields.push(("capability".into(), agent_type.as_bytes().to_vec()));
                let writes = vec![
                    Write::Fields {
                        stream: keys::worker_stream(&worker),
                        fields,
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
            Err(error) => {
                tracing::warn!(%error, "cannot look up the reply route; entry left pending");
                true
            }
        }
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
        let key = keys::task_group(&header.task_group_id);
        let mut conn = self.services.redis.clone();
        let total: Result<Option<u64>, _> = redis::cmd("HGET")
            .arg(&key)
            .arg("total")
            .query_async(&mut conn)
            .await;
        let total = match total {
            Ok(Some(total)) => total,
            Ok(None) => return true,
            Err(error) => {
                tracing::warn!(%error, "cannot read the task group; entry left pending");
                return false;
            }
        };
        let completed: Result<u64, _> = redis::cmd("HINCRBY")
            .arg(&key)
            .arg("completed")
            .arg(1)
            .query_async(&mut conn)
            .await;
        match completed {
            Ok(completed) if completed < total => {
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
        let reason = format!("caller {} was cancelled: {reason}", origin.message_id);
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
