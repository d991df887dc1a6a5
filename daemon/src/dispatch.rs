//! From a stream entry to an acknowledged outcome: routing to the plugin,
//! concurrency permits, the task lifecycle of the reference worker
//! (replay check, workspace, run, reply to a calling agent, terminal state,
//! execution record, XACK), replies handed to the tasks awaiting them (see
//! [`crate::routing`]), dead letters, cancels and their cascade to the
//! calls a cancelled task awaits, and the loops that feed it (new entries,
//! abandoned entries, the worker's control stream).

use crate::broker::{self, Delivery};
use crate::config::HistoryBackend;
use crate::events::{Write, Writer};
use crate::history::{HistoryEntry, Role};
use crate::metrics::{RedisOperation, TaskOutcome, TaskTimer};
use crate::routing::{self, Reply, Route, WaitKey};
use crate::task_link::{AwaitedChild, Services, TaskLink};
use crate::workspace::Workspaces;
use byclaw_protocol::{self as wire, Action, ControlCommand, EventOrigin, keys, state};
use byclaw_protocol::{Begin, CancelLookup, Executions, NewExecution};
use byclaw_sandbox::TaskDirs;
use byclaw_sandbox::{CallError, CancelSignal, Hook, HookCall, TaskContext, TaskHost};
use redis::aio::ConnectionManager;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The settings dispatch needs, taken from the config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Consumer name, execution records' `worker_id`, registry identity.
    pub worker_id: Arc<str>,
    /// Consumer group of every stream read.
    pub group: Arc<str>,
    /// Wall-clock budget of one task.
    pub deadline: Duration,
    /// From a graceful cancel to dropping the instance.
    pub cancel_grace: Duration,
    /// More deliveries than this → dead letter.
    pub max_deliveries: u64,
    /// Where rejected entries go.
    pub dead_letter_stream: String,
    /// XDEL control entries after XACK.
    pub delete_acked: bool,
    /// Most entries one read may return (never more than free permits).
    pub fetch_count: usize,
    /// XREADGROUP BLOCK.
    pub block: Duration,
    /// Pending this long with another consumer → taken over.
    pub claim_idle: Duration,
    /// How often pending entries are checked and our own renewed.
    pub claim_interval: Duration,
    /// How many history entries go into `extra_payload.history`.
    pub history_inject: usize,
}

/// A task in progress on this worker.
struct Running {
    /// Where a CANCEL_TASK for it is signalled.
    cancel: Arc<CancelSignal>,
    /// Stream and entry id, for renewing the entry while the task runs long.
    stream: Arc<str>,
    entry_id: String,
    /// For the list of tasks still running at shutdown.
    agent_type: String,
    started: Instant,
}

/// Shared by every task and loop.
pub struct Dispatcher {
    settings: Settings,
    /// Every write after a task started goes through it, in task order.
    writer: Writer,
    /// Replay check and execution records.
    executions: Executions,
    /// Creates and removes task directories off the async threads.
    workspaces: Workspaces,
    /// Tasks in progress, by message id: cancels find them here, the claimer
    /// renews their entries, shutdown lists them.
    running: Mutex<HashMap<String, Running>>,
    /// Entries the reader received beyond the permits it held, with when:
    /// started before the next read, renewed like running tasks meanwhile.
    /// At most (busy streams − 1) × `fetch_count` (see [`Dispatcher::consume`]).
    backlog: Mutex<std::collections::VecDeque<(Delivery, Instant)>>,
    /// Tasks spawned; shutdown waits on it.
    tracker: TaskTracker,
    /// Fires when tasks must stop now (grace period over): they return
    /// without acknowledging, so their entries stay pending for another worker.
    force_stop: CancellationToken,
    /// Shared with the host calls: the plugin table (swapped as a whole when
    /// the plugin set changes), the Redis connection for reads, the waiters
    /// of replies, the permits.
    services: Arc<Services>,
}

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// A capability stream (new or taken over).
    Capability,
    /// This worker's control stream: a RESUME forwarded by another worker.
    Forwarded,
}

/// A task's place under its plugin's concurrency limit; freeing it wakes
/// the reader, which may be skipping the plugin's streams.
struct PluginSlot {
    _permit: OwnedSemaphorePermit,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for PluginSlot {
    fn drop(&mut self) {
        self.freed.notify_waiters();
    }
}

/// What running a task left for its end: the workspace to remove, the
/// plugin whose end hook is due.
#[derive(Default)]
struct Leftovers {
    /// The private directory was created: remove it.
    created_workspace: bool,
    /// The handler was started on this plugin, which exports hooks: its
    /// `on-task-complete` / `-error` / `-cancel` hook runs after the outcome
    /// is written.
    hooks_of: Option<Arc<byclaw_sandbox::Plugin>>,
    /// The task's permit, kept through the end hook so hook instances
    /// never outnumber the instance pool's slots.
    permit: Option<OwnedSemaphorePermit>,
    /// Counts the task in flight from its start; finished with its outcome.
    timer: Option<(TaskTimer, String)>,
}

/// How a task ended.
enum Outcome {
    Completed(String),
    Failed(String),
    Cancelled(String),
    /// The daemon stopped under it; nothing written, entry stays pending.
    CutOff,
    /// Its plugin was removed between the read and the start; nothing
    /// written, the entry stays pending for a worker that serves the type.
    Unserved,
}

impl Dispatcher {
    pub fn new(
        settings: Settings,
        writer: Writer,
        executions: Executions,
        workspaces: Workspaces,
        force_stop: CancellationToken,
        services: Arc<Services>,
    ) -> Arc<Self> {
        Arc::new(Dispatcher {
            settings,
            writer,
            executions,
            workspaces,
            running: Mutex::new(HashMap::new()),
            backlog: Mutex::new(std::collections::VecDeque::new()),
            tracker: TaskTracker::new(),
            force_stop,
            services,
        })
    }

    /// The task tracker, for shutdown.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// One line per task still running, for shutdown logs.
    pub fn running_summary(&self) -> Vec<String> {
        let running = self.running.lock().expect("running lock is never poisoned");
        running
            .iter()
            .map(|(message_id, r)| {
                format!(
                    "{message_id} ({}, {:.1} s)",
                    r.agent_type,
                    r.started.elapsed().as_secs_f64()
                )
            })
            .collect()
    }

    fn spawn(self: &Arc<Self>, delivery: Delivery, permit: OwnedSemaphorePermit) {
        let this = self.clone();
        let agent_type = delivery
            .stream
            .strip_prefix(&keys::capability_stream(""))
            .unwrap_or(&delivery.stream)
            .to_owned();
        self.tracker.spawn(async move {
            this.handle(delivery, agent_type, Source::Capability, permit)
                .await;
        });
    }

    /// The permit is held until the task ends, except while the task waits
    /// for a reply (see [`TaskLink`]).
    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        agent_type: String,
        source: Source,
        permit: OwnedSemaphorePermit,
    ) {
        let Some(data) = delivery.field("data") else {
            let reason = "entry has no `data` field".to_owned();
            return self.dead_letter(&delivery, &agent_type, reason, None).await;
        };
        let command = match wire::parse_control(data) {
            Ok(command) => command,
            Err(malformed) => {
                let session = wire::salvage_session_id(data);
                return self
                    .dead_letter(&delivery, &agent_type, malformed.0, session)
                    .await;
            }
        };
        if matches!(command.action, Action::CancelTask(_)) {
            let reason = "CANCEL_TASK belongs on a worker control stream, not a capability stream";
            let session = Some(command.header.session_id.clone());
            return self
                .dead_letter(&delivery, &agent_type, reason.into(), session)
                .await;
        }
        if let Action::Resume { .. } = command.action
            && !command.header.parent_message_id.is_empty()
        {
            if self
                .route_resume(&delivery, &agent_type, &command, source)
                .await
            {
                return;
            }
            if !command.header.task_group_id.is_empty()
                && !self.group_complete(&delivery, &command).await
            {
                return;
            }
        }
        if delivery.deliveries > self.settings.max_deliveries {
            let reason = format!(
                "delivered {} times without finishing (worker.max_deliveries = {})",
                delivery.deliveries, self.settings.max_deliveries
            );
            let header = &command.header;
            // Earlier attempts left the execution RUNNING; a client must not
            // wait for it (cancel_task would answer as if it were alive).
            let marked = self
                .executions
                .fail_message(
                    &mut self.services.redis.clone(),
                    &header.session_id,
                    &header.message_id,
                )
                .await;
            if let Err(error) = marked {
                tracing::warn!(%error, "cannot mark the abandoned execution FAILED");
            }
            let session = Some(header.session_id.clone());
            return self
                .dead_letter(&delivery, &agent_type, reason, session)
                .await;
        }
        let span = tracing::info_span!(
            "task",
            message_id = %command.header.message_id,
            session_id = %command.header.session_id,
            trace_id = %command.header.trace_id,
            agent_type = %agent_type,
            action = command.action.name(),
            plugin = tracing::field::Empty,
        );
        self.run(delivery, agent_type, command, permit)
            .instrument(span)
            .await;
    }

    /// Hands a RESUME to the task awaiting it, here or on another worker.
    /// False when nobody awaits it: it then runs as an orphan RESUME.
    async fn route_resume(
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
    async fn group_complete(&self, delivery: &Delivery, command: &ControlCommand) -> bool {
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

    async fn run(
        &self,
        delivery: Delivery,
        agent_type: String,
        mut command: ControlCommand,
        permit: OwnedSemaphorePermit,
    ) {
        let history = &self.services.history;
        let inject = matches!(command.action, Action::AskAgent { .. })
            && history.backend() != HistoryBackend::Off;
        let header = &command.header;
        // The session's history is read alongside the replay check: no
        // round trip of its own on the way to the plugin.
        let mut conn = self.services.redis.clone();
        let (begin, recent) = tokio::join!(
            self.executions.begin(
                &mut conn,
                NewExecution {
                    message_id: &header.message_id,
                    session_id: &header.session_id,
                    worker_id: &self.settings.worker_id,
                    target_agent_type: &header.target_agent_type,
                    stream_name: &delivery.stream,
                    redis_message_id: &delivery.id,
                },
            ),
            async {
                if inject {
                    history
                        .recent(&header.session_id, self.settings.history_inject)
                        .await
                } else {
                    Vec::new()
                }
            }
        );
        let mut execution = match begin {
            Ok(Begin::Run(execution)) => execution,
            Ok(Begin::Terminal {
                execution_id,
                status,
            }) => {
                tracing::info!(%execution_id, %status, "already finished; redelivery acknowledged and skipped");
                let _ = self
                    .writer
                    .commit(&header.session_id, vec![self.ack(&delivery)])
                    .await;
                return;
            }
            Err(error) => {
                // Redis is failing; leave the entry pending. It is retried
                // when claimed again after worker.claim_idle_ms.
                tracing::warn!(%error, "cannot record the execution; entry left pending");
                return;
            }
        };

        if let Action::AskAgent {
            content,
            extra_payload,
            ..
        } = &mut command.action
            && inject
        {
            // As the reference: history before this message is injected,
            // then the message is saved.
            if let Some(payload) = extra_payload.as_object_mut() {
                payload.insert(
                    "history".into(),
                    serde_json::to_value(&recent).expect("history entries serialize"),
                );
            }
            let text = match content {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let header = &command.header;
            history.record(
                &header.session_id,
                HistoryEntry::new(Role::User, text).with_metadata(serde_json::json!({
                    "message_id": header.message_id,
                    "trace_id": header.trace_id,
                })),
            );
        }
        let header = &command.header;
        let cancel = Arc::new(CancelSignal::default());
        if execution.cancel_requested {
            cancel.request(&execution.cancel_reason);
        }
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .entry(header.message_id.clone())
            .or_insert_with(|| Running {
                cancel: cancel.clone(),
                stream: delivery.stream.clone(),
                entry_id: delivery.id.clone(),
                agent_type: agent_type.clone(),
                started: Instant::now(),
            });

        // The version this task runs on, whatever is swapped in meanwhile.
        let plugin = self.services.plugins.load().get(&agent_type).cloned();
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
                &mut leftovers,
                permit,
                awaiting.clone(),
            )
            .await;
        if let Outcome::CutOff = outcome {
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
            }
            let mut writes = Vec::new();
            if let Outcome::Cancelled(reason) = &outcome {
                let awaited =
                    std::mem::take(&mut *awaiting.lock().expect("awaiting lock is never poisoned"));
                writes = self.cancel_awaited(&origin, awaited, reason).await;
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
            if self
                .writer
                .commit(&header.session_id, writes)
                .await
                .is_err()
            {
                tracing::warn!("writer stopped before the outcome was written; entry left pending");
            }
            if let Some((plugin, call)) = end_hook {
                plugin.run_hook(call).await;
            }
            drop(leftovers.permit.take());
        }
        self.running
            .lock()
            .expect("running lock is never poisoned")
            .remove(&header.message_id);
        if leftovers.created_workspace {
            self.workspaces.remove_private(dirs);
        }
    }

    /// Cancels what a cancelled task still awaited: each route gets a
    /// tombstone (late replies are dropped, not run as orphans) and each
    /// child task the reference client's cancel (CANCELLING + CANCEL_TASK to
    /// its worker; a child not started yet gets a CANCELLED record instead).
    /// Returns the writes, to go out before the caller's own outcome.
    async fn cancel_awaited(
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

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        plugin: Option<Arc<byclaw_sandbox::Plugin>>,
        command: &ControlCommand,
        agent_type: &str,
        origin: &EventOrigin,
        dirs: &TaskDirs,
        cancel: &Arc<CancelSignal>,
        leftovers: &mut Leftovers,
        permit: OwnedSemaphorePermit,
        awaiting: Arc<Mutex<Vec<AwaitedChild>>>,
    ) -> Outcome {
        if cancel.is_requested() {
            return Outcome::Cancelled(cancel.reason());
        }
        let Some(plugin) = plugin else {
            return Outcome::Unserved;
        };
        let label = plugin.label();
        tracing::Span::current().record("plugin", &label);
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
        let link = Arc::new(TaskLink {
            origin: origin.clone(),
            stream: stream.clone(),
            writer: self.writer.clone(),
            cancel: cancel.clone(),
            tenant_id: command.header.tenant_id.clone(),
            permit: Mutex::new(Some(permit)),
            awaiting,
            reply: Mutex::new(
                (self.services.history.backend() != HistoryBackend::Off).then(String::new),
            ),
            services: self.services.clone(),
        });
        let context = Arc::new(TaskContext {
            origin: origin.clone(),
            cancel: cancel.clone(),
            plugin_label: Arc::from(plugin.label()),
            message_id: Arc::from(origin.message_id.as_str()),
            dirs,
            deadline_at: tokio::time::Instant::now() + policy.deadline,
            plugins: self.services.plugins.clone(),
            port: link.clone(),
        });
        if let Action::Resume { .. } = command.action {
            let resumed = wire::state_event(origin, state::RESUMED, None);
            let write = Write::Event {
                stream,
                data: resumed,
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
        if plugin.has_hook(Hook::TaskStart) {
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
        let call = tokio::time::timeout(policy.deadline, plugin.handle(host, command, agent_type));
        let result = tokio::select! {
            result = call => result,
            _ = cancel.force.cancelled() => {
                return Outcome::Cancelled(cancel.reason());
            }
            _ = self.force_stop.cancelled() => return Outcome::CutOff,
        };
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
        match result {
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
        }
    }

    /// The writes that end a task, in order: events, the reply to a calling
    /// agent, the execution record, the XACK.
    #[allow(clippy::too_many_arguments)]
    fn finish_writes(
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
        let event = |data: String| Write::Event {
            stream: stream.clone(),
            data,
        };
        let caller = match command.action {
            Action::AskAgent { .. } if !header.source_agent_id.is_empty() => {
                Some(header.source_agent_id.as_str())
            }
            _ => None,
        };
        let mut writes = Vec::with_capacity(5);
        let reply_to_caller = |status: &str, reply_data: serde_json::Value| {
            let caller = caller?;
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
                let result: serde_json::Value =
                    serde_json::from_str(&json).unwrap_or(serde_json::Value::Null);
                let metadata = RawValue::from_string(format!("{{\"result\":{json}}}")).ok();
                let terminal = match caller {
                    Some(caller) => format!("QUEUED: {caller}"),
                    None => state::COMPLETED.to_owned(),
                };
                if let Some(resume) = reply_to_caller(state::COMPLETED, result) {
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
                    reply_to_caller(state::FAILED, serde_json::json!({ "error": reason }))
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
                if let Some(resume) =
                    reply_to_caller(state::CANCELLED, serde_json::json!({ "reason": reason }))
                {
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

    fn ack(&self, delivery: &Delivery) -> Write {
        Write::Ack {
            stream: delivery.stream.clone(),
            group: self.settings.group.clone(),
            id: delivery.id.clone(),
            delete: self.settings.delete_acked,
        }
    }

    /// Moves an entry to the dead-letter stream with the reason and its
    /// original fields, tells its session (when known), and acks it.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        agent_type: &str,
        reason: String,
        session: Option<String>,
    ) {
        tracing::warn!(
            stream = %delivery.stream,
            entry_id = %delivery.id,
            deliveries = delivery.deliveries,
            %reason,
            "entry dead-lettered"
        );
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("reason".into(), reason.clone().into_bytes()),
            ("source_stream".into(), delivery.stream.as_bytes().to_vec()),
            ("source_id".into(), delivery.id.clone().into_bytes()),
            (
                "consumer_group".into(),
                self.settings.group.as_bytes().to_vec(),
            ),
            (
                "worker_id".into(),
                self.settings.worker_id.as_bytes().to_vec(),
            ),
            (
                "delivery_count".into(),
                delivery.deliveries.to_string().into_bytes(),
            ),
            (
                "dead_lettered_at".into(),
                wire::now_ms().to_string().into_bytes(),
            ),
        ];
        for (name, value) in &delivery.fields {
            let name = if fields.iter().any(|(n, _)| n == name) {
                format!("original_{name}")
            } else {
                name.clone()
            };
            fields.push((name, value.clone()));
        }
        let mut writes = vec![Write::Fields {
            stream: self.settings.dead_letter_stream.clone(),
            fields,
        }];
        if let Some(session_id) = &session {
            let (trace_id, message_id) = delivery
                .field("data")
                .and_then(|d| serde_json::from_slice::<serde_json::Value>(d).ok())
                .map(|v| {
                    let h = &v["header"];
                    (
                        h["trace_id"].as_str().unwrap_or_default().to_owned(),
                        h["message_id"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .unwrap_or_default();
            let origin = EventOrigin {
                trace_id,
                session_id: session_id.clone(),
                agent_id: agent_type.to_owned(),
                message_id,
                plugin: None,
            };
            writes.push(Write::Event {
                stream: Arc::from(keys::session_data_stream(session_id)),
                data: wire::state_event(&origin, &format!("FAILED: {reason}"), None),
            });
        }
        writes.push(self.ack(delivery));
        let lane = session.as_deref().unwrap_or(&delivery.id);
        if self.writer.commit(lane, writes).await.is_err() {
            tracing::warn!(entry_id = %delivery.id, "writer stopped; dead-letter entry left pending");
        } else {
            self.services.metrics.dead_lettered();
        }
    }

    /// Applies a CANCEL_TASK to a task running here.
    fn cancel(self: &Arc<Self>, request: &wire::CancelRequest) -> bool {
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

    /// Reads new entries of the capability streams while permits are free,
    /// until `stop` fires. The streams are those of the plugin table at each
    /// read, so plugins that come and go are followed from the next fetch.
    ///
    /// Every read covers every servable stream, so an idle stream never
    /// delays a busy one: `COUNT` is the permits held, and what comes back
    /// beyond them (several streams busy at once) waits in the backlog and
    /// starts first as permits free. A read in flight is finished, not abandoned, and the
    /// backlog is started at shutdown, so no entry is delivered to this
    /// consumer and then forgotten.
    pub async fn consume(
        self: Arc<Self>,
        mut conn: ConnectionManager,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let mut rotation = 0usize;
        let mut backoff = Duration::from_millis(100);
        let mut held: Vec<OwnedSemaphorePermit> = Vec::with_capacity(self.settings.fetch_count);
        loop {
            // What an earlier read returned beyond its permits goes first.
            if self.backlog_len() > 0 {
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    _ = stop.cancelled() => break,
                };
                if let Some(delivery) = self.backlog_pop() {
                    self.spawn(delivery, permit);
                }
                continue;
            }
            let changed = self.services.plugins_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let slot_freed = self.services.plugin_slot_freed.notified();
            tokio::pin!(slot_freed);
            slot_freed.as_mut().enable();
            let table = self.services.plugins.load_full();
            // Streams of plugins at their own concurrency limit wait.
            let mut streams: Vec<Arc<str>> = table
                .by_capability
                .values()
                .zip(table.streams())
                .filter(|(plugin, _)| {
                    plugin
                        .policy()
                        .concurrency
                        .as_ref()
                        .is_none_or(|limit| limit.available_permits() > 0)
                })
                .map(|(_, stream)| stream.clone())
                .collect();
            if streams.is_empty() {
                // Nothing to serve (yet), or every plugin at its limit.
                tokio::select! {
                    _ = changed => continue,
                    _ = slot_freed => continue,
                    _ = stop.cancelled() => break,
                }
            }
            let first = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = stop.cancelled() => break,
            };
            held.push(first);
            while held.len() < self.settings.fetch_count {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            // COUNT applies per stream: each may return as many entries as
            // permits are held, so a busy stream is served in batches
            // however many idle ones are read beside it. What comes back
            // beyond the permits waits in the backlog; with B streams busy
            // at once that is at most (B - 1) × fetch_count entries. The
            // first streams of the list get the first permits, so the list
            // turns by one each read.
            let count = held.len();
            let turn = rotation % streams.len();
            streams.rotate_left(turn);
            rotation = rotation.wrapping_add(1);
            let read = broker::read_group(
                &mut conn,
                &self.settings.group,
                &self.settings.worker_id,
                &streams,
                count,
                self.settings.block,
            )
            .await;
            match read {
                Ok(deliveries) => {
                    if backoff > Duration::from_millis(100) {
                        self.services.metrics.redis_reconnected();
                        tracing::info!("reading capability streams works again");
                    }
                    backoff = Duration::from_millis(100);
                    for delivery in interleave_streams(deliveries) {
                        match held.pop() {
                            Some(permit) => self.spawn(delivery, permit),
                            None => self.backlog_push(delivery),
                        }
                    }
                }
                Err(error) => {
                    self.services.metrics.redis_error(RedisOperation::Read);
                    tracing::warn!(%error, "reading capability streams failed; retrying");
                    if error.is_missing_group() {
                        self.recreate_groups(&mut conn, table.streams()).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            held.clear();
            if stop.is_cancelled() {
                break;
            }
        }
        self.start_backlog_at_shutdown();
    }

    fn backlog_len(&self) -> usize {
        self.backlog
            .lock()
            .expect("backlog lock is never poisoned")
            .len()
    }

    fn backlog_pop(&self) -> Option<Delivery> {
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        backlog.pop_front().map(|(delivery, _)| delivery)
    }

    fn backlog_push(&self, delivery: Delivery) {
        let mut backlog = self.backlog.lock().expect("backlog lock is never poisoned");
        backlog.push_back((delivery, Instant::now()));
    }

    /// The reader stopped with entries in the backlog: each starts when a
    /// permit frees (the shutdown grace covers it like any task), or stays
    /// pending for another worker if the daemon is cut off first.
    fn start_backlog_at_shutdown(self: &Arc<Self>) {
        while let Some(delivery) = self.backlog_pop() {
            let this = self.clone();
            let permits = self.services.permits.clone();
            self.tracker.spawn(async move {
                let permit = tokio::select! {
                    permit = permits.acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    _ = this.force_stop.cancelled() => return,
                };
                this.spawn(delivery, permit);
            });
        }
    }

    /// Every `claim_interval`: renews the entries of long tasks running here
    /// and takes over entries other consumers left pending longer than
    /// `claim_idle` (those past `max_deliveries` are dead-lettered).
    pub async fn reclaim(
        self: Arc<Self>,
        mut conn: ConnectionManager,
        permits: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.settings.claim_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            if let Err(error) = self.renew_leases(&mut conn).await {
                tracing::warn!(%error, "renewing in-flight entries failed");
            }
            let table = self.services.plugins.load_full();
            for stream in table.streams() {
                if stop.is_cancelled() {
                    return;
                }
                if let Err(error) = self.claim_stream(&mut conn, stream, &permits).await {
                    self.services.metrics.redis_error(RedisOperation::Claim);
                    tracing::warn!(%error, "claiming abandoned entries failed");
                }
            }
        }
    }

    async fn renew_leases(&self, conn: &mut ConnectionManager) -> Result<(), broker::BrokerError> {
        let half_idle = self.settings.claim_idle / 2;
        let mut by_stream: HashMap<Arc<str>, Vec<String>> = HashMap::new();
        {
            let running = self.running.lock().expect("running lock is never poisoned");
            for task in running.values() {
                if task.started.elapsed() >= half_idle {
                    by_stream
                        .entry(task.stream.clone())
                        .or_default()
                        .push(task.entry_id.clone());
                }
            }
            let backlog = self.backlog.lock().expect("backlog lock is never poisoned");
            for (delivery, read_at) in backlog.iter() {
                if read_at.elapsed() >= half_idle {
                    by_stream
                        .entry(delivery.stream.clone())
                        .or_default()
                        .push(delivery.id.clone());
                }
            }
        }
        for (stream, ids) in by_stream {
            broker::renew(
                conn,
                &stream,
                &self.settings.group,
                &self.settings.worker_id,
                &ids,
            )
            .await?;
        }
        Ok(())
    }

    async fn claim_stream(
        self: &Arc<Self>,
        conn: &mut ConnectionManager,
        stream: &Arc<str>,
        permits: &Arc<Semaphore>,
    ) -> Result<(), broker::BrokerError> {
        let free = permits.available_permits().min(100);
        if free == 0 {
            return Ok(());
        }
        let pending = broker::pending_idle(
            conn,
            stream,
            &self.settings.group,
            self.settings.claim_idle,
            free,
        )
        .await?;
        let in_flight: Vec<String> = {
            let running = self.running.lock().expect("running lock is never poisoned");
            let backlog = self.backlog.lock().expect("backlog lock is never poisoned");
            running
                .values()
                .map(|r| r.entry_id.clone())
                .chain(backlog.iter().map(|(d, _)| d.id.clone()))
                .collect()
        };
        let mut candidates = Vec::new();
        let mut held = Vec::new();
        for entry in pending {
            if in_flight.contains(&entry.id) {
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break;
            };
            held.push(permit);
            candidates.push(entry);
        }
        if candidates.is_empty() {
            return Ok(());
        }
        let claimed = broker::claim(
            conn,
            stream,
            &self.settings.group,
            &self.settings.worker_id,
            self.settings.claim_idle,
            &candidates,
        )
        .await?;
        self.services.metrics.claimed(claimed.len() as u64);
        for delivery in claimed {
            let from = candidates
                .iter()
                .find(|c| c.id == delivery.id)
                .map(|c| c.consumer.clone())
                .unwrap_or_default();
            tracing::info!(
                stream = %delivery.stream,
                entry_id = %delivery.id,
                from_consumer = %from,
                deliveries = delivery.deliveries,
                "took over an abandoned entry"
            );
            let permit = held.pop().expect("one permit per candidate");
            self.spawn(delivery, permit);
        }
        Ok(())
    }

    /// Creates the consumer group of `streams` again, after Redis lost it
    /// (a restart without persistence): new entries are read from then on.
    async fn recreate_groups(&self, conn: &mut ConnectionManager, streams: &[Arc<str>]) {
        for stream in streams {
            match broker::ensure_group(conn, stream, &self.settings.group).await {
                Ok(()) => {
                    tracing::warn!(%stream, group = %self.settings.group, "consumer group was missing; created again")
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot create the consumer group again yet")
                }
            }
        }
    }

    /// Reads the worker's control stream (CANCEL_TASK, forwarded RESUMEs) until `stop` fires.
    /// Control entries need no permit: a cancel must get through when every
    /// permit is taken.
    pub async fn control(
        self: Arc<Self>,
        mut conn: ConnectionManager,
        stream: Arc<str>,
        stop: CancellationToken,
    ) {
        let streams = [stream.clone()];
        let mut backoff = Duration::from_millis(100);
        // First what this worker id left unacknowledged when it last stopped
        // (forwarded replies in particular), then new entries.
        let mut own_pending = true;
        let mut pending_after = "0".to_owned();
        loop {
            let read = tokio::select! {
                read = async {
                    if own_pending {
                        broker::read_own_pending(&mut conn, &self.settings.group, &self.settings.worker_id, &stream, &pending_after, 16).await
                    } else {
                        broker::read_group(&mut conn, &self.settings.group, &self.settings.worker_id, &streams, 16, self.settings.block).await
                    }
                } => read,
                _ = stop.cancelled() => return,
            };
            if own_pending && let Ok(deliveries) = &read {
                match deliveries.last() {
                    Some(last) => pending_after = last.id.clone(),
                    None => {
                        own_pending = false;
                        continue;
                    }
                }
            }
            let deliveries = match read {
                Ok(deliveries) => {
                    backoff = Duration::from_millis(100);
                    deliveries
                }
                Err(error) => {
                    self.services.metrics.redis_error(RedisOperation::Control);
                    tracing::warn!(%error, "reading the worker control stream failed; retrying");
                    if error.is_missing_group() {
                        self.recreate_groups(&mut conn, &streams).await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            for delivery in deliveries {
                let parsed = delivery
                    .field("data")
                    .ok_or_else(|| wire::MalformedEntry("entry has no `data` field".into()))
                    .and_then(wire::parse_control);
                match parsed {
                    Ok(ControlCommand {
                        action: Action::CancelTask(request),
                        ..
                    }) => {
                        let found = self.cancel(&request);
                        tracing::info!(
                            target_message_id = %request.target_message_id,
                            mode = if request.is_force() { "force" } else { "graceful" },
                            found,
                            "cancel requested"
                        );
                        let _ = self
                            .writer
                            .commit(&delivery.id, vec![self.ack(&delivery)])
                            .await;
                    }
                    Ok(
                        command @ ControlCommand {
                            action: Action::Resume { .. },
                            ..
                        },
                    ) => {
                        self.forwarded_resume(delivery, command, &stop).await;
                    }
                    Ok(other) => {
                        let reason =
                            format!("{} is not a worker control command", other.action.name());
                        self.dead_letter(&delivery, "", reason, None).await;
                    }
                    Err(malformed) => {
                        self.dead_letter(&delivery, "", malformed.0, None).await;
                    }
                }
            }
        }
    }
}

impl Dispatcher {
    /// A RESUME another worker forwarded here because a task of ours awaited
    /// it. When the waiter has gone meanwhile it runs through the handler as
    /// its own task, which needs a permit the control loop must not wait for.
    async fn forwarded_resume(
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

fn execution_elapsed(execution: &wire::Execution) -> u64 {
    wire::now_ms().saturating_sub(execution.started_at)
}

/// Entries of one read, taken one per stream in turn (streams in the order
/// the read named them), so the permits held go round the busy streams
/// rather than to the first one.
fn interleave_streams(deliveries: Vec<Delivery>) -> Vec<Delivery> {
    let mut by_stream: Vec<std::collections::VecDeque<Delivery>> = Vec::new();
    for delivery in deliveries {
        match by_stream
            .iter_mut()
            .find(|queue| queue.front().is_some_and(|d| d.stream == delivery.stream))
        {
            Some(queue) => queue.push_back(delivery),
            None => by_stream.push(std::collections::VecDeque::from([delivery])),
        }
    }
    let mut out = Vec::with_capacity(by_stream.iter().map(|q| q.len()).sum());
    while !by_stream.is_empty() {
        by_stream.retain_mut(|queue| match queue.pop_front() {
            Some(delivery) => {
                out.push(delivery);
                true
            }
            None => false,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(stream: &str, id: &str) -> Delivery {
        Delivery {
            stream: Arc::from(stream),
            id: id.to_owned(),
            fields: Vec::new(),
            deliveries: 1,
        }
    }

    #[test]
    fn one_entry_per_stream_in_turn() {
        let read = vec![
            delivery("a", "1"),
            delivery("a", "2"),
            delivery("a", "3"),
            delivery("b", "4"),
            delivery("c", "5"),
            delivery("c", "6"),
        ];
        let order: Vec<String> = interleave_streams(read)
            .into_iter()
            .map(|d| format!("{}{}", d.stream, d.id))
            .collect();
        assert_eq!(order, ["a1", "b4", "c5", "a2", "c6", "a3"]);
    }
}
