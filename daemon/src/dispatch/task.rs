//! One task on this worker: the replay check, the run in the sandbox
//! with its permit and the plugin's own limit, then the writes that end it
//! in order (events, reply to a calling agent, execution record, XACK).

use super::rerun::Rerun;
use super::*;

/// Tries of the replay check after the first, when Redis could not take
/// it (about 3 s in all, paced from 50 ms up to 1 s).
const BEGIN_RETRIES: usize = 6;

impl Dispatcher {
    pub(super) async fn run(
        &self,
        delivery: Delivery,
        agent_type: String,
        command: ControlCommand,
        permit: OwnedSemaphorePermit,
    ) {
        let history = &self.services.history;
        let inject = matches!(command.action, Action::AskAgent { .. })
            && history.backend() != HistoryBackend::Off;
        let header = &command.header;
        // Registered before the replay check writes the execution record: a
        // client cancels only a task whose record it can read, so its
        // CANCEL_TASK always finds the task here.
        let cancel = Arc::new(CancelSignal::default());
        let lease_lost = CancellationToken::new();
        let registered = {
            let mut running = self.running.lock().expect("running lock is never poisoned");
            if running.contains_key(&header.message_id) {
                false
            } else {
                running.insert(
                    header.message_id.clone(),
                    Running {
                        cancel: cancel.clone(),
                        lease_lost: lease_lost.clone(),
                        stream: delivery.stream.clone(),
                        entry_id: delivery.id.clone(),
                        agent_type: agent_type.clone(),
                        started: Instant::now(),
                        renewed: Instant::now(),
                    },
                );
                true
            }
        };
        let unregister = || {
            if registered {
                self.running
                    .lock()
                    .expect("running lock is never poisoned")
                    .remove(&command.header.message_id);
            }
        };
        // The version this task runs on, whatever is swapped in meanwhile.
        let plugin = self.services.plugins.load().get(&agent_type).cloned();
        let plugin_sha256 = plugin
            .as_ref()
            .map(|plugin| plugin.sha256.clone())
            .unwrap_or_else(|| Arc::from(""));
        let random_seed = byclaw_sandbox::random::new_seed();
        // The session's history is read alongside the replay check: no
        // round trip of its own on the way to the plugin.
        let mut conn = self.services.redis.clone();
        let new_execution = NewExecution {
            message_id: &header.message_id,
            session_id: &header.session_id,
            worker_id: &self.settings.worker_id,
            target_agent_type: &header.target_agent_type,
            stream_name: &delivery.stream,
            redis_message_id: &delivery.id,
            plugin_sha256: &plugin_sha256,
            random_seed: &random_seed,
            tenant_id: &header.tenant_id,
        };
        let (mut begin, recent) =
            tokio::join!(self.executions.begin(&mut conn, new_execution), async {
                if inject {
                    history
                        .recent_json(&header.session_id, self.settings.history_inject)
                        .await
                } else {
                    Default::default()
                }
            });
        // A failover (or a dropped connection) fails the first command on
        // a connection that has not moved yet, though the entry was just
        // read from the new master: tried again a few times, paced, rather
        // than left pending for `worker.claim_idle_ms`. Running the check
        // twice is safe: a record the first try wrote makes it a rerun.
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        for _ in 0..BEGIN_RETRIES {
            match &begin {
                Err(error) if crate::events::refused_whole(error) => {
                    tracing::debug!(%error, "cannot record the execution yet; trying again");
                    tokio::time::sleep(backoff.next_wait()).await;
                    begin = self.executions.begin(&mut conn, new_execution).await;
                }
                _ => break,
            }
        }
        let (mut execution, rerun) = match begin {
            Ok(Begin::Run { execution, rerun }) => (execution, rerun),
            Ok(Begin::Elsewhere {
                execution_id,
                entry,
            }) => {
                // The message sent again (by a caller run again after its
                // daemon died): it runs from the entry that started it.
                self.services.metrics.emit(CopySkipped {
                    execution_id: &execution_id,
                    runs_from: &entry,
                });
                self.ack_skipped(&delivery, &header.session_id).await;
                unregister();
                return;
            }
            Ok(Begin::Terminal {
                execution_id,
                status,
            }) => {
                tracing::info!(%execution_id, %status, "already finished; redelivery acknowledged and skipped");
                self.ack_skipped(&delivery, &header.session_id).await;
                unregister();
                return;
            }
            Err(error) => {
                // Redis is still failing, or refused the script; leave the
                // entry pending. It is retried when claimed again after
                // worker.claim_idle_ms.
                tracing::warn!(%error, "cannot record the execution; entry left pending");
                unregister();
                return;
            }
        };

        // A run after another stopped: the events that run emitted are not
        // emitted again (it was given the same replies, from the journal).
        let replayed = if rerun {
            let (emitted, journal) = tokio::join!(
                self.events_emitted(&header.session_id, &header.message_id),
                self.journaled_reads(&header.session_id, &header.message_id)
            );
            match emitted.and_then(|emitted| Ok((emitted, journal?))) {
                Ok(emitted) => {
                    self.services.metrics.emit(TaskRerun {
                        events_emitted: emitted.0,
                    });
                    Some(emitted)
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the events of the run before; entry left pending");
                    unregister();
                    return;
                }
            }
        } else {
            None
        };
        let mut recent = recent;
        if rerun {
            // The first run saved this message already.
            recent.without_message(&header.message_id);
        }

        // As the reference: history before this message is injected (into
        // `extra_payload.history`, when the payload is an object), then the
        // message is saved.
        let injected_history = inject.then(|| recent.to_json());
        if let Action::AskAgent { content, .. } = &command.action
            && inject
        {
            let text = match content {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let header = &command.header;
            if !rerun {
                history.record(
                    &header.session_id,
                    HistoryEntry::new(Role::User, text).with_metadata(serde_json::json!({
                        "message_id": header.message_id,
                        "trace_id": header.trace_id,
                    })),
                );
            }
        }
        let header = &command.header;
        if execution.cancel_requested {
            cancel.request(&execution.cancel_reason);
        }

        let origin = EventOrigin {
            trace_id: header.trace_id.clone(),
            session_id: header.session_id.clone(),
            agent_id: agent_type.clone(),
            message_id: header.message_id.clone(),
            plugin: plugin.as_ref().map(|p| p.stamp.clone()),
        };
        let dirs = self.workspaces.dirs(&header.session_id, &header.message_id);
        let mut leftovers = Leftovers::default();
        let awaiting = Arc::new(Mutex::new(Vec::new()));
        let outcome = self
            .execute(
                plugin,
                &command,
                &agent_type,
                &origin,
                &dirs,
                &cancel,
                &lease_lost,
                &mut leftovers,
                permit,
                awaiting.clone(),
                replayed.map(|(events, (clocks, reads))| Rerun {
                    events,
                    plugin_sha256: &execution.plugin_sha256,
                    clocks,
                    reads,
                }),
                &execution.random_seed,
                injected_history.as_deref(),
            )
            .await;
        if lease_lost.is_cancelled() {
            self.services.metrics.emit(LeaseLost::WhileRunning);
        } else if let Outcome::CutOff = outcome {
            tracing::warn!("cut off by shutdown; entry left pending for another worker");
        } else if let Outcome::Unserved = outcome {
            // Read just before its plugin was removed: hand it to the
            // workers that serve the type (this one too, if it comes back).
            let released = broker::release(
                &mut self.services.redis.clone(),
                &delivery.stream,
                &self.settings.group,
                &self.settings.worker_id,
                &delivery.id,
                self.settings.claim_idle,
            )
            .await;
            match released {
                Ok(()) => tracing::warn!(
                    "no plugin serves this agent type any more; entry released for the workers that do"
                ),
                Err(error) => {
                    tracing::warn!(%error, "no plugin serves this agent type any more; entry left pending")
                }
            }
        } else {
            let end_hook = leftovers.hooks_of.take().and_then(|plugin| {
                let task = byclaw_sandbox::hooks::task_info(&command, &agent_type);
                let call = match &outcome {
                    Outcome::Completed(json) => HookCall::TaskComplete(task, json.clone()),
                    Outcome::Failed(reason) => HookCall::TaskError(task, reason.clone()),
                    Outcome::Cancelled(reason) => HookCall::TaskCancel(task, reason.clone()),
                    Outcome::CutOff | Outcome::Unserved => return None,
                };
                Some((plugin, call))
            });
            if let Some((timer, plugin)) = leftovers.timer.take() {
                let ended = match &outcome {
                    Outcome::Completed(_) => Some(TaskOutcome::Completed),
                    Outcome::Failed(_) => Some(TaskOutcome::Failed),
                    Outcome::Cancelled(_) => Some(TaskOutcome::Cancelled),
                    Outcome::CutOff | Outcome::Unserved => None,
                };
                if let Some(ended) = ended {
                    timer.finish(&agent_type, &plugin, ended);
                }
                if let Outcome::Failed(reason) = &outcome {
                    // The task's span, for traces: a failed task is an error.
                    let span = tracing::Span::current();
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_description", reason.as_str());
                }
            }
            let mut writes = Vec::new();
            // A task that ends while calls are still awaited (cancelled, or
            // failed mid-wait: deadline, trap) cancels them, so a failed
            // chain stops growing.
            if let Outcome::Cancelled(reason) | Outcome::Failed(reason) = &outcome {
                let awaited =
                    std::mem::take(&mut *awaiting.lock().expect("awaiting lock is never poisoned"));
                if !awaited.is_empty() {
                    writes = self.cancel_awaited(&origin, awaited, reason).await;
                }
            }
            writes.extend(self.finish_writes(
                &command,
                &agent_type,
                &origin,
                &delivery,
                &mut execution,
                outcome,
                &cancel,
            ));
            // All of it, or — when another worker took the entry over
            // meanwhile — none of it: one owner writes the outcome.
            let owned = Write::Owned {
                lease: self.lease(&delivery),
                writes,
            };
            match self.writer.commit(&header.session_id, vec![owned]).await {
                Ok(Committed::Applied) => {}
                Ok(Committed::NotOwner) => {
                    self.services.metrics.emit(LeaseLost::BeforeOutcome);
                }
                Ok(Committed::Gone) => tracing::info!(
                    "entry no longer pending when the outcome was written; nothing written"
                ),
                Err(_) => tracing::warn!(
                    "writer stopped before the outcome was written; entry left pending"
                ),
            }
            if let Some((plugin, call)) = end_hook {
                plugin.run_hook(call).await;
            }
            drop(leftovers.permit.take());
        }
        unregister();
        if leftovers.created_workspace {
            self.workspaces.remove_private(dirs);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn execute(
        &self,
        plugin: Option<Arc<byclaw_sandbox::Plugin>>,
        command: &ControlCommand,
        agent_type: &str,
        origin: &EventOrigin,
        dirs: &TaskDirs,
        cancel: &Arc<CancelSignal>,
        lease_lost: &CancellationToken,
        leftovers: &mut Leftovers,
        permit: OwnedSemaphorePermit,
        awaiting: Arc<Mutex<Vec<AwaitedChild>>>,
        rerun: Option<Rerun<'_>>,
        random_seed: &str,
        history: Option<&serde_json::value::RawValue>,
    ) -> Outcome {
        if cancel.is_requested() {
            return Outcome::Cancelled(cancel.reason());
        }
        let Some(plugin) = plugin else {
            return Outcome::Unserved;
        };
        if let Some(first) = rerun.as_ref().map(|rerun| rerun.plugin_sha256)
            && !first.is_empty()
            && first != &*plugin.sha256
        {
            // Its journal answers the calls of the code it ran on.
            return Outcome::Failed(format!(
                "the plugin changed since this task started (sha256 {} then, {} now): a task is never run again on other code",
                &first[..first.len().min(12)],
                &plugin.sha256[..12]
            ));
        }
        let (replayed, journaled_clocks, mut learned) = match rerun {
            Some(rerun) => (
                Some(rerun.events),
                rerun.clocks,
                Learned::from_journal(rerun.reads),
            ),
            None => (None, None, Learned::default()),
        };
        let label = plugin.label();
        let span = tracing::Span::current();
        span.record("plugin", &label);
        span.record("plugin.id", plugin.manifest.id.as_str());
        span.record("plugin.version", plugin.manifest.version.as_str());
        leftovers.timer = Some((
            self.services.metrics.task_started(agent_type, &label),
            label,
        ));
        // The plugin's own limit (`[plugins.<id>] max_concurrency`); the
        // reader skips its streams while it is reached, so this rarely waits.
        // The policy when the task starts; a reload changes later tasks.
        let policy = plugin.policy();
        let _plugin_slot = match &policy.concurrency {
            Some(limit) => tokio::select! {
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(PluginSlot {
                        _permit: permit,
                        freed: self.services.plugin_slot_freed.clone(),
                    }),
                    Err(_) => None,
                },
                _ = self.force_stop.cancelled() => return Outcome::CutOff,
            },
            None => None,
        };
        let dirs = if plugin.manifest.workspace {
            leftovers.created_workspace = true;
            if let Err(error) = self.workspaces.create(dirs).await {
                return Outcome::Failed(format!("cannot create the workspace: {error}"));
            }
            Some(dirs.clone())
        } else {
            None
        };
        let stream: Arc<str> = Arc::from(keys::session_data_stream(&origin.session_id));
        // What outlives one run of the task: a run ends early when its
        // instance is dropped in a wait, and the next run, once the reply
        // is in, is given what the runs before learned.
        let clocks = match journaled_clocks {
            Some(journal) => byclaw_sandbox::TaskClocks::from_journal(&journal),
            None => byclaw_sandbox::TaskClocks::new(),
        };
        let mut permit = Some(permit);
        let mut rerun = replayed.is_some();
        let mut replayed_events = replayed.unwrap_or(0);
        let mut deadline_at = None;
        let mut first_run = true;
        loop {
            let link = Arc::new(TaskLink {
                origin: origin.clone(),
                stream: stream.clone(),
                writer: self.writer.clone(),
                cancel: cancel.clone(),
                tenant_id: command.header.tenant_id.clone(),
                permit: Mutex::new(permit.take()),
                awaiting: awaiting.clone(),
                reply: Mutex::new(
                    (self.services.history.backend() != HistoryBackend::Off)
                        .then(crate::task_link::ReplyBuffer::default),
                ),
                answers: Mutex::new(Vec::new()),
                closed: Default::default(),
                call_depth: crate::task_link::call_depth(&command.header.metadata),
                rerun,
                replayed_events: replayed_events.into(),
                calls: Default::default(),
                reads: Default::default(),
                learned: Mutex::new(std::mem::take(&mut learned)),
                produced: Default::default(),
                clocks: clocks.clone(),
                unjournaled_by: Default::default(),
                ttl_refreshed: Mutex::new(None),
                suspension: Mutex::new(None),
                services: self.services.clone(),
            });
            // However this run ends, its writes end here: the final writes
            // queued after this cannot be followed by a late chunk.
            let close = CloseOnReturn(link.clone());
            // Past worker.memory_budget_mb new work waits, before its
            // deadline starts, until running tasks give memory back.
            tokio::select! {
                waited = plugin.guest_memory().admit() => {
                    if waited {
                        self.services.metrics.emit(MemoryBudgetWaited);
                    }
                }
                _ = cancel.requested_token.cancelled() => return Outcome::Cancelled(cancel.reason()),
                _ = self.force_stop.cancelled() => return Outcome::CutOff,
                _ = lease_lost.cancelled() => return Outcome::CutOff,
            }
            let deadline_at =
                *deadline_at.get_or_insert_with(|| tokio::time::Instant::now() + policy.deadline);
            let context = Arc::new(TaskContext {
                origin: origin.clone(),
                cancel: cancel.clone(),
                plugin_label: Arc::from(plugin.label()),
                message_id: Arc::from(origin.message_id.as_str()),
                dirs: dirs.clone(),
                deadline_at,
                cpu: byclaw_sandbox::CpuMeter::new(policy.cpu_budget),
                plugins: self.services.plugins.clone(),
                random: byclaw_sandbox::TaskRandom::from_seed(random_seed),
                clocks: Some(clocks.clone()),
                port: link.clone(),
            });
            if let Action::Resume { .. } = command.action {
                link.produced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !link.replayed() {
                    let resumed = wire::state_event(origin, state::RESUMED, None);
                    // Written past the task's link (which paces the
                    // stream's TTL): it refreshes the TTL itself.
                    let write = Write::Event {
                        stream: stream.clone(),
                        data: resumed,
                        refresh_ttl: true,
                    };
                    if self
                        .writer
                        .send(&origin.session_id, vec![write])
                        .await
                        .is_err()
                    {
                        return Outcome::CutOff;
                    }
                }
            }
            if first_run && plugin.has_hook(Hook::TaskStart) {
                let task = byclaw_sandbox::hooks::task_info(command, agent_type);
                tokio::select! {
                    _ = plugin.run_hook(HookCall::TaskStart(task)) => {}
                    _ = self.force_stop.cancelled() => return Outcome::CutOff,
                }
            }
            if [Hook::TaskComplete, Hook::TaskError, Hook::TaskCancel]
                .into_iter()
                .any(|hook| plugin.has_hook(hook))
            {
                leftovers.hooks_of = Some(plugin.clone());
            }
            let host = TaskHost {
                task: context,
                plugin: plugin.clone(),
                depth: 0,
            };
            let call = tokio::time::timeout_at(
                deadline_at,
                plugin.handle(host, command, agent_type, history),
            );
            let result = tokio::select! {
                result = call => result,
                _ = cancel.force.cancelled() => {
                    return Outcome::Cancelled(cancel.reason());
                }
                _ = self.force_stop.cancelled() => return Outcome::CutOff,
                // Another worker owns the entry now: stop the guest, write nothing.
                _ = lease_lost.cancelled() => return Outcome::CutOff,
            };
            if let Some(suspension) = link.take_suspension() {
                // The run stopped in a wait and its instance is gone: the
                // task waits here without one, its entry pending under its
                // lease, and runs again once the reply is in.
                drop(result);
                drop(close);
                let waited = self
                    .wait_suspended(
                        suspension,
                        &link,
                        &awaiting,
                        cancel,
                        lease_lost,
                        deadline_at,
                        policy.deadline,
                    )
                    .await;
                (learned, permit) = match waited {
                    Ok((learned, permit)) => (learned, Some(permit)),
                    Err(outcome) => return outcome,
                };
                replayed_events = link.produced.load(std::sync::atomic::Ordering::Relaxed);
                rerun = true;
                first_run = false;
                clocks.rewind();
                if let Some(dirs) = &dirs {
                    // The run starts from a clean private directory, as the first did.
                    if let Err(error) = self.workspaces.create(dirs).await {
                        return Outcome::Failed(format!("cannot create the workspace: {error}"));
                    }
                }
                continue;
            }
            if leftovers.hooks_of.is_some() {
                leftovers.permit = link
                    .permit
                    .lock()
                    .expect("permit lock is never poisoned")
                    .take();
            }
            if cancel.is_requested() {
                return Outcome::Cancelled(cancel.reason());
            }
            return match result {
                Ok(Ok(json)) if json.len() > self.settings.max_result_bytes => {
                    Outcome::Failed(format!(
                        "result of {} bytes exceeds the limit of {} bytes (plugins.max_result_bytes)",
                        json.len(),
                        self.settings.max_result_bytes
                    ))
                }
                Ok(Ok(json)) => {
                    link.finish_reply();
                    Outcome::Completed(json)
                }
                Ok(Err(error @ CallError::Guest(_))) => Outcome::Failed(error.to_string()),
                Ok(Err(CallError::Trap(reason))) => {
                    if reason.contains("the daemon is stopping") {
                        Outcome::CutOff
                    } else {
                        Outcome::Failed(reason)
                    }
                }
                Err(_) => Outcome::Failed(format!(
                    "deadline of {} s exceeded",
                    policy.deadline.as_secs_f64()
                )),
            };
        }
    }
}

impl Dispatcher {
    /// Acknowledges an entry that is not run (its message finished, or runs
    /// from another entry).
    async fn ack_skipped(&self, delivery: &Delivery, session_id: &str) {
        let _ = self
            .writer
            .commit(session_id, vec![self.ack(delivery)])
            .await;
    }
}

/// Closes a task's link when dropped.
struct CloseOnReturn(Arc<TaskLink>);

impl Drop for CloseOnReturn {
    fn drop(&mut self) {
        self.0.close();
    }
}
