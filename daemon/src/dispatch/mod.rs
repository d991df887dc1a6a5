//! From a stream entry to an acknowledged outcome: routing to the plugin,
//! concurrency permits, the task lifecycle of the reference worker
//! (replay check, workspace, run, reply to a calling agent, terminal state,
//! execution record, XACK), replies handed to the tasks awaiting them (see
//! [`crate::routing`]), dead letters, cancels and their cascade to the
//! calls a cancelled task awaits, and the loops that feed it (new entries,
//! abandoned entries, the worker's control stream).

//!
//! Modules: `task` (one task, from the replay check to the XACK), `finish`
//! (the writes that end it), `rerun` (a task run again, and the wait of one
//! without its instance), `replies` (RESUMEs handed to the tasks awaiting
//! them, cancels), `readers` (the loops reading capability streams,
//! abandoned entries and the worker's control stream), `dead_letter`.

mod dead_letter;
mod finish;
mod readers;
mod replies;
mod rerun;
mod task;

use crate::broker::{self, Delivery};
use crate::config::HistoryBackend;
use crate::events::{Committed, Lease, Write, Writer};
use crate::history::{HistoryEntry, Role};
use crate::metrics::{
    CopySkipped, DeadLettered, EntryTakenOver, LeaseLost, MemoryBudgetWaited, RedisFailed,
    RedisOperation, RedisReadsAgain, ReplyDropped, ReplyJournaled, ReplyRefused, StreamTrimmed,
    TaskEvicted, TaskOutcome, TaskRerun, TaskTimer,
};
use crate::routing::{self, Delivered, Reply, ReplyKind, Route, Routed, WaitKey};
use crate::task_link::{AwaitedChild, Learned, Services, Suspension, TaskLink};
use crate::workspace::Workspaces;
use byclaw_client::connection::Connection;
use byclaw_protocol::{self as wire, Action, ControlCommand, EventOrigin, keys, state};
use byclaw_protocol::{Begin, CancelLookup, Executions, NewExecution};
use byclaw_sandbox::TaskDirs;
use byclaw_sandbox::{CallError, CancelSignal, Hook, HookCall, TaskContext, TaskHost};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    /// Approximate MAXLEN of the dead-letter stream (0: none).
    pub dead_letter_maxlen: u64,
    /// How often capability streams are trimmed of consumed entries
    /// (`None`: never).
    pub trim_interval: Option<Duration>,
    /// Hard cap of each capability stream at a trim (0: none).
    pub control_maxlen: u64,
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
    /// Largest handler result written (`plugins.max_result_bytes`).
    pub max_result_bytes: usize,
}

/// A task in progress on this worker.
struct Running {
    /// Where a CANCEL_TASK for it is signalled.
    cancel: Arc<CancelSignal>,
    /// Fired when renewing its entry found another consumer holding it:
    /// the run stops and writes nothing.
    lease_lost: CancellationToken,
    /// Stream and entry id, for renewing the entry while the task runs long.
    stream: Arc<str>,
    entry_id: String,
    /// For the list of tasks still running at shutdown.
    agent_type: String,
    started: Instant,
    /// When its entry's idle time was last reset (read, or renewed): it is
    /// renewed a third of `claim_idle` later, so a task that waits long
    /// costs Redis one renewal per third of `claim_idle`, not one per pass.
    renewed: Instant,
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

    pub(super) fn spawn(self: &Arc<Self>, delivery: Delivery, permit: OwnedSemaphorePermit) {
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
            plugin.id = tracing::field::Empty,
            plugin.version = tracing::field::Empty,
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        );
        crate::telemetry::join_trace(
            &span,
            &command.header.trace_id,
            command
                .header
                .metadata
                .get(crate::telemetry::TRACEPARENT)
                .and_then(serde_json::Value::as_str),
        );
        self.run(delivery, agent_type, command, permit)
            .instrument(span)
            .await;
    }

    /// The entry as this worker holds it.
    pub(super) fn lease(&self, delivery: &Delivery) -> Lease {
        Lease {
            stream: delivery.stream.clone(),
            group: self.settings.group.clone(),
            consumer: self.settings.worker_id.clone(),
            id: delivery.id.clone(),
        }
    }

    pub(super) fn ack(&self, delivery: &Delivery) -> Write {
        Write::Ack {
            stream: delivery.stream.clone(),
            group: self.settings.group.clone(),
            id: delivery.id.clone(),
            delete: self.settings.delete_acked,
        }
    }
}
