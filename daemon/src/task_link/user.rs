//! `ask-user`: the form and WAITING_USER, then the wait for the user's
//! RESUME on a numbered prompt.

use super::*;

impl TaskLink {
    /// Emits the form and WAITING_USER, then waits for the user's RESUME.
    pub(super) async fn wait_for_user(
        &self,
        prompt: String,
        metadata: Value,
        timeout: Duration,
    ) -> Result<Result<UserReply, GuestError>, Stopping> {
        if self.is_closed() {
            return Err(Stopping);
        }
        if self.cancel.is_requested() {
            return Ok(Err(GuestError::Cancelled(
                "the task is being cancelled".into(),
            )));
        }
        let origin = &self.origin;
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
        // This task's prompts are numbered from 1; the id goes out with
        // the form so a client can name the prompt it answers.
        let taken = self
            .answers
            .lock()
            .expect("answers lock is never poisoned")
            .clone();
        let prompt_id = format!("{}:u{}", origin.message_id, taken.len() + 1);
        let metadata = match metadata {
            Value::Object(mut fields) => {
                fields.insert("prompt_id".into(), Value::String(prompt_id.clone()));
                Value::Object(fields)
            }
            Value::Null => json!({ "prompt_id": prompt_id }),
            other => json!({ "prompt_id": prompt_id, "metadata": other }),
        };
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
        let expect = Expect {
            session_id: self.origin.session_id.clone(),
            tenant_id: self.tenant_id.clone(),
            prompt_id: Some(prompt_id.clone()),
            taken,
        };
        let route = key.route_cmd(
            &self.services.worker_id,
            Some(&prompt_id),
            timeout + ROUTE_SLACK,
        );
        let mut waiting = self
            .services
            .waiters
            .register_expecting(key.clone(), expect.clone());
        // A run after another: the answer a run before was given, if any
        // (in memory when this daemon ran it, else from the journal).
        let known = self.known(&prompt_id);
        let journaled = if known.is_some() {
            known
        } else if self.rerun {
            let read = routing::route_then_read_journal(
                &mut self.services.redis.clone(),
                vec![route.clone()],
                &origin.session_id,
                &origin.message_id,
                std::slice::from_ref(&prompt_id),
            )
            .await;
            match read {
                Ok(found) => Known::from_journal(found.into_iter().next().flatten(), &expect),
                Err(error) => {
                    tracing::warn!(%error, "cannot read the task's journal; run stopped, entry left pending");
                    return Err(Stopping);
                }
            }
        } else {
            None
        };
        let mut writes = vec![
            Write::Command(route),
            Write::Event {
                stream: self.stream.clone(),
                data: form_event,
                refresh_ttl: true,
            },
            self.state_write(
                state::WAITING_USER,
                Some(&json!({ "prompt_id": prompt_id })),
            ),
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
        if journaled.is_some() {
            // Its route was answered on the run that learned it.
            writes.remove(0);
        }
        self.commit(writes).await?;

        let mut cancelled = false;
        let reply = match journaled {
            Some(Known::Reply(reply)) => {
                drop(waiting);
                self.learn(&prompt_id, Some(&reply));
                Some(*reply)
            }
            Some(Known::TimedOut) => {
                drop(waiting);
                None
            }
            None => {
                let slot = self.lend_permit();
                let until = tokio::time::Instant::now() + timeout;
                let mut evict_at = self.evict_at();
                let received = loop {
                    tokio::select! {
                        // A reply already in is taken before the instance is dropped.
                        biased;
                        reply = waiting.recv() => break reply,
                        _ = tokio::time::sleep_until(until) => break None,
                        _ = self.cancel.requested_token.cancelled() => {
                            cancelled = true;
                            break None;
                        }
                        _ = tokio::time::sleep_until(evict_at.unwrap_or(until)), if evict_at.is_some() => {
                            match self.suspended_slot() {
                                Some(suspended_slot) => {
                                    // The instance goes; the wait stays
                                    // registered for the next run.
                                    drop(slot);
                                    let waits = vec![(prompt_id, waiting)];
                                    return Err(self.suspend(waits, expect, until, suspended_slot));
                                }
                                None => evict_at = None,
                            }
                        }
                    }
                };
                let mut reply = received.or_else(|| waiting.close());
                self.resume_permit(slot).await;
                if !cancelled {
                    if reply.is_none() {
                        // Timed out: so says the journal from now on, unless
                        // an answer got there first.
                        let ids = std::slice::from_ref(&prompt_id);
                        reply = self.journal_timeouts(ids, &expect).await?.pop().flatten();
                    }
                    self.learn(&prompt_id, reply.as_ref());
                }
                reply
            }
        };
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
                    "the user did not answer within {} ms; an answer after the task ended reaches the handler as a RESUME command",
                    timeout.as_millis()
                ))
            }));
        };
        self.answers
            .lock()
            .expect("answers lock is never poisoned")
            .push(reply.message_id.clone());
        // Marked on this task's lane, so before the route of a next prompt:
        // a second answer to this one, once the task is over, is dropped.
        let answered = WaitKey {
            capability: origin.agent_id.clone(),
            kind: ReplyKind::User,
            message_id: origin.message_id.clone(),
        }
        .answered();
        let resumed = self.state_write(state::RESUMED, None);
        self.send(vec![answered, resumed]).await?;
        Ok(Ok(UserReply {
            status: reply.status,
            message_id: reply.message_id,
            content: reply.content.to_string(),
            reply_data: reply.reply_data.to_string(),
            extra_payload: reply.extra_payload.to_string(),
        }))
    }
}
