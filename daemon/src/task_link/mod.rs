//! The daemon's side of a task's host calls: [`TaskLink`] implements the
//! sandbox's [`TaskPort`] over Redis.
//!
//! Events go to the event writer, on the task's lane. A call to another
//! agent sends what the reference SDK sends (ASK_AGENT with
//! `source_agent_id` and `parent_message_id`, the task-group hash, the 3013
//! form event) and then waits for the RESUME in process: the waiter and its
//! Redis route are registered before anything is sent (see
//! [`crate::routing`]), the task's concurrency permit is lent out while it
//! waits, and a cancel of the task ends the wait at once. The streamed
//! reply is kept for the session history.

mod agents;
mod learned;
mod reads;
mod user;

use learned::Known;
pub use learned::{Learned, Suspension};

use crate::events::{Write, Writer};
use crate::routing::{self, Expect, Reply, ReplyKind, WaitKey, Waiters, Waiting};
use arc_swap::ArcSwap;
use byclaw_client::connection::Connection;
use byclaw_protocol::{
    self as wire, Delta, EventOrigin, EventSpec, content_type, event_type, keys, state,
};
use byclaw_sandbox::port::{AgentReply, GuestError, HistoryEntry, UserReply, WorkerInfo};
use byclaw_sandbox::{
    AgentCall, CancelSignal, HostImport, PluginTable, PortFuture, Stopping, TaskPort,
};
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Lifetime of a task-group hash (the reference's `TASK_GROUP_TTL_SECONDS`).
const TASK_GROUP_TTL_S: u64 = 86_400;

/// How long a route outlives the wait it serves, so a reply arriving just
/// after the timeout still finds the worker that ran the caller.
const ROUTE_SLACK: Duration = Duration::from_secs(30);

/// What every task of this daemon shares, for the host calls that reach
/// past the task (other agents, the registry, history).
pub struct Services {
    /// This worker: the route of every reply awaited here names it.
    pub worker_id: Arc<str>,
    /// Registry lookups and reads (`active-workers`, target checks).
    pub redis: Connection,
    /// The plugins loaded now (swapped as a whole on reload), for routing
    /// and for tools of other plugins.
    pub plugins: Arc<ArcSwap<PluginTable>>,
    /// Woken when `plugins` was swapped.
    pub plugins_changed: Arc<tokio::sync::Notify>,
    /// Woken when a task under a plugin's own concurrency limit ends.
    pub plugin_slot_freed: Arc<tokio::sync::Notify>,
    /// Replies awaited by tasks running here.
    pub waiters: Arc<Waiters>,
    /// The daemon's concurrency permits; a task waiting for a reply gives
    /// its permit back and takes one again when the reply is in.
    pub permits: Arc<Semaphore>,
    /// Bounds how many tasks may wait without holding a permit
    /// (`worker.max_waiting`); past it a waiting task keeps its permit.
    pub waiting_slots: Arc<Semaphore>,
    /// `worker.evict_after_ms`: how long a waiting task keeps its instance.
    pub evict_after: Duration,
    /// Bounds how many tasks wait with their instance dropped
    /// (`worker.max_suspended`); past it a waiting task keeps it.
    pub suspended_slots: Arc<Semaphore>,
    /// `worker.max_call_depth`.
    pub max_call_depth: u32,
    /// `history.max_entry_bytes`: most of a streamed reply kept for the
    /// session history.
    pub max_reply_bytes: usize,
    /// The session history store (`history.recent`, replies saved).
    pub history: crate::history::History,
    /// Counts host calls (and, in dispatch, tasks).
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The reply a task streams, kept for the session history up to a bound:
/// what a guest streams past it is not held in the daemon's memory.
#[derive(Debug, Default)]
pub struct ReplyBuffer {
    /// The text so far, at most the bound.
    text: String,
    /// Some text was left out.
    truncated: bool,
}

impl ReplyBuffer {
    /// Appends what fits under `max_bytes` (cut at a character boundary).
    fn push(&mut self, text: &str, max_bytes: usize) {
        let room = max_bytes.saturating_sub(self.text.len());
        if text.len() <= room {
            self.text.push_str(text);
            return;
        }
        let mut cut = room;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.text.push_str(&text[..cut]);
        self.truncated = true;
    }
}

/// A reply this task still waits for; when the task is cancelled the
/// route is tombstoned and the child task cancelled too.
#[derive(Debug, Clone)]
pub struct AwaitedChild {
    /// The route of the reply.
    pub key: WaitKey,
    /// The child task's message id (for its CANCEL_TASK); `None` when the
    /// user is awaited.
    pub child_message_id: Option<String>,
}

/// One task's link to the daemon: what its host calls need beyond the
/// sandbox, and what the dispatcher reads back when the task ends.
pub struct TaskLink {
    /// Trace, session, agent and message ids stamped on every event.
    pub origin: EventOrigin,
    /// `byai_gateway:session:{id}:data_stream`, shared by every event.
    pub stream: Arc<str>,
    /// Where events go.
    pub writer: Writer,
    /// Cancel requests for this task; waits end when one arrives.
    pub cancel: Arc<CancelSignal>,
    /// `header.tenant_id`, passed on to the agents this task calls.
    pub tenant_id: String,
    /// The task's concurrency permit while it holds one.
    pub permit: Mutex<Option<OwnedSemaphorePermit>>,
    /// Calls awaiting a reply; the dispatcher cancels them when the task is
    /// cancelled.
    pub awaiting: Arc<Mutex<Vec<AwaitedChild>>>,
    /// The streamed reply so far, for the session history; `None` once saved
    /// or when history is off. Bounded by `history.max_entry_bytes`.
    pub reply: Mutex<Option<ReplyBuffer>>,
    /// The user's answers this task took (RESUME message ids, in order):
    /// numbers its prompts, and none is taken twice.
    pub answers: Mutex<Vec<String>>,
    /// Set when the task's outcome is decided (returned, deadline, cancel,
    /// lease lost), before its final writes are queued: whatever its guest
    /// or its host calls still try to write is dropped, so nothing lands
    /// after the terminal event.
    pub closed: std::sync::atomic::AtomicBool,
    /// How many calls led to this task (`header.metadata.call_depth`; 0
    /// for a task a client sent).
    pub call_depth: u32,
    /// This run follows another that stopped (its daemon died): each wait
    /// reads the task's journal for the replies the first run was sent.
    pub rerun: bool,
    /// Events the run before this one emitted already: this run's first
    /// that many are not written again (a guest given the same replies
    /// emits the same events).
    pub replayed_events: std::sync::atomic::AtomicUsize,
    /// Calls to agents made so far: the `n` of the next call's id
    /// (`<message id>:c<n>`), the same on every run.
    pub calls: std::sync::atomic::AtomicU32,
    /// Reads past the task (`history-recent`, `active-workers`, outbound
    /// HTTP) made so far by this run: the index of the next in
    /// `learned.reads`.
    pub reads: std::sync::atomic::AtomicUsize,
    /// What the task's runs learned from outside so far, handed to the
    /// next run when this one is evicted.
    pub learned: Mutex<Learned>,
    /// Events of the task written (or, on a run after another, counted
    /// off as written before) so far: the next run's `replayed_events`.
    pub produced: std::sync::atomic::AtomicUsize,
    /// The task's clock readings, replayed by a next run.
    pub clocks: Arc<byclaw_sandbox::TaskClocks>,
    /// Why the task can no longer be run again from its journal (it
    /// learned something the journal does not keep), if it cannot.
    pub unjournaled_by: std::sync::OnceLock<&'static str>,
    /// When this run last let an event refresh the session stream's
    /// EXPIRE (see `TaskLink::pace_ttl`).
    pub ttl_refreshed: Mutex<Option<Instant>>,
    /// Set when a wait dropped the instance: what the task waits for. The
    /// dispatcher waits for it and runs the task again.
    pub suspension: Mutex<Option<Suspension>>,
    pub services: Arc<Services>,
}

/// A called task's header metadata: the caller's, with `call_depth`.
fn with_call_depth(metadata: Value, depth: u32) -> Value {
    let mut metadata = match metadata {
        Value::Object(mut fields) => {
            fields.insert("call_depth".into(), depth.into());
            Value::Object(fields)
        }
        Value::Null => json!({ "call_depth": depth }),
        other => json!({ "call_depth": depth, "metadata": other }),
    };
    // Traces exported: the child's task span hangs under the host call's.
    if let Some(traceparent) = crate::telemetry::current_traceparent() {
        metadata[crate::telemetry::TRACEPARENT] = Value::String(traceparent);
    }
    metadata
}

/// How many calls led to a task, from its header's metadata.
pub fn call_depth(metadata: &Value) -> u32 {
    metadata
        .get("call_depth")
        .and_then(Value::as_u64)
        .map_or(0, |d| u32::try_from(d).unwrap_or(u32::MAX))
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

impl TaskLink {
    /// The depth of the tasks this one calls, or `error.denied` when that
    /// passes `worker.max_call_depth`.
    fn child_depth(&self) -> Result<u32, GuestError> {
        let depth = self.call_depth.saturating_add(1);
        if depth > self.services.max_call_depth {
            return Err(GuestError::Denied(format!(
                "call depth {depth} exceeds worker.max_call_depth ({}): agents calling agents this deep are refused",
                self.services.max_call_depth
            )));
        }
        Ok(depth)
    }

    /// No write of this task's guest or host calls goes out from now on.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The number of the task's next call to agents (from 1).
    fn next_call(&self) -> u32 {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .saturating_add(1)
    }

    /// Whether the next event is one the run before emitted already (then
    /// it is counted off and not written again).
    pub fn replayed(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.replayed_events.load(Relaxed) > 0
            && self
                .replayed_events
                .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Leaves out the events a run before this one emitted already.
    fn without_replayed(&self, mut writes: Vec<Write>) -> Vec<Write> {
        if self
            .replayed_events
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            writes.retain(|write| !(matches!(write, Write::Event { .. }) && self.replayed()));
        }
        writes
    }

    /// Counts the events among `writes` as produced by the task.
    fn count_produced(&self, writes: &[Write]) {
        let events = writes
            .iter()
            .filter(|write| matches!(write, Write::Event { .. }))
            .count();
        self.produced
            .fetch_add(events, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets only the first event of `writes` refresh the session stream's
    /// EXPIRE, and only when the task has not refreshed it within half the
    /// TTL: one EXPIRE with the task's first event instead of one with
    /// every batch. The stream never expires while the task writes to it,
    /// and its final writes refresh it again (the TTL counts from there).
    fn pace_ttl(&self, writes: &mut [Write]) {
        let mut events = writes.iter_mut().filter_map(|write| match write {
            Write::Event { refresh_ttl, .. } => Some(refresh_ttl),
            _ => None,
        });
        let Some(first) = events.next() else { return };
        let mut refreshed = self
            .ttl_refreshed
            .lock()
            .expect("ttl lock is never poisoned");
        let due = refreshed.is_none_or(|at| at.elapsed() >= self.writer.session_ttl() / 2);
        *first = due;
        if due {
            *refreshed = Some(Instant::now());
        }
        for later in events {
            *later = false;
        }
    }

    /// Queues writes of the running task; refused once it is closed.
    async fn send(&self, writes: Vec<Write>) -> Result<(), Stopping> {
        if self.is_closed() {
            return Err(Stopping);
        }
        self.count_produced(&writes);
        let mut writes = self.with_journal(self.without_replayed(writes));
        self.pace_ttl(&mut writes);
        if writes.is_empty() {
            return Ok(());
        }
        self.writer
            .send(&self.origin.session_id, writes)
            .await
            .map_err(|_| Stopping)
    }

    /// Queues writes of the running task and waits until they are applied;
    /// refused once it is closed.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), Stopping> {
        if self.is_closed() {
            return Err(Stopping);
        }
        self.count_produced(&writes);
        let mut writes = self.with_journal(self.without_replayed(writes));
        self.pace_ttl(&mut writes);
        if writes.is_empty() {
            return Ok(());
        }
        self.writer
            .commit(&self.origin.session_id, writes)
            .await
            .map(|_| ())
            .map_err(|_| Stopping)
    }

    /// Saves the reply streamed so far, unless it was saved already (the
    /// task completed without an end marker).
    pub fn finish_reply(&self) {
        let taken = self
            .reply
            .lock()
            .expect("reply lock is never poisoned")
            .take();
        if let Some(reply) = taken {
            self.save_reply(reply);
        }
    }

    fn save_reply(&self, reply: ReplyBuffer) {
        let mut metadata = serde_json::json!({
            "trace_id": self.origin.trace_id,
            "agent_id": self.origin.agent_id,
            "message_id": self.origin.message_id,
        });
        if reply.truncated {
            metadata["truncated"] = serde_json::Value::Bool(true);
        }
        let entry = crate::history::HistoryEntry::new(crate::history::Role::Assistant, reply.text)
            .with_metadata(metadata);
        self.services.history.record(&self.origin.session_id, entry);
    }

    /// Gives the task's permit back while it waits, if a waiting slot is
    /// free. Returns the slot; hand it to [`TaskLink::resume_permit`].
    fn lend_permit(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self
            .services
            .waiting_slots
            .clone()
            .try_acquire_owned()
            .ok()?;
        let permit = self
            .permit
            .lock()
            .expect("permit lock is never poisoned")
            .take();
        match permit {
            Some(permit) => {
                drop(permit);
                Some(slot)
            }
            None => None,
        }
    }

    /// Takes a permit again after a wait that lent it (waits in line with
    /// new work: the semaphore is fair).
    async fn resume_permit(&self, slot: Option<OwnedSemaphorePermit>) {
        let Some(slot) = slot else { return };
        if let Ok(permit) = self.services.permits.clone().acquire_owned().await {
            *self.permit.lock().expect("permit lock is never poisoned") = Some(permit);
        }
        drop(slot);
    }
}

impl TaskPort for TaskLink {
    fn emit(&self, data: String) -> PortFuture<'_, Result<(), Stopping>> {
        Box::pin(async move {
            let write = Write::Event {
                stream: self.stream.clone(),
                data,
                refresh_ttl: true,
            };
            self.send(vec![write]).await
        })
    }

    fn add_to_reply(&self, text: &str, end: bool) {
        let mut reply = self.reply.lock().expect("reply lock is never poisoned");
        let Some(buffer) = reply.as_mut() else { return };
        buffer.push(text, self.services.max_reply_bytes);
        if end {
            let done = std::mem::take(buffer);
            *reply = None;
            drop(reply);
            self.save_reply(done);
        }
    }

    fn call_agents(
        &self,
        calls: Vec<Result<AgentCall, GuestError>>,
        group: bool,
        timeout: Duration,
    ) -> PortFuture<'_, Result<Vec<Result<AgentReply, GuestError>>, Stopping>> {
        Box::pin(self.call_and_wait(calls, group, timeout))
    }

    fn send_agent(
        &self,
        call: AgentCall,
    ) -> PortFuture<'_, Result<Result<AgentReply, GuestError>, Stopping>> {
        Box::pin(self.send_without_reply(call))
    }

    fn ask_user(
        &self,
        prompt: String,
        metadata: Value,
        timeout: Duration,
    ) -> PortFuture<'_, Result<Result<UserReply, GuestError>, Stopping>> {
        Box::pin(self.wait_for_user(prompt, metadata, timeout))
    }

    fn active_workers(&self) -> PortFuture<'_, Result<Vec<WorkerInfo>, GuestError>> {
        Box::pin(self.workers_read())
    }

    fn history_recent(
        &self,
        limit: usize,
    ) -> PortFuture<'_, Result<Vec<HistoryEntry>, GuestError>> {
        Box::pin(self.history_read(limit))
    }

    fn unjournaled(&self, what: &'static str) {
        let _ = self.unjournaled_by.set(what);
    }

    fn outbound_request(&self, method: &str, uri: &str) -> byclaw_sandbox::port::Outbound {
        self.http_request(method, uri)
    }

    fn outbound_response(&self, n: usize, response: Option<byclaw_sandbox::port::KeptResponse>) {
        self.http_response(n, response);
    }

    fn host_call(&self, import: HostImport, took: Duration) {
        self.services
            .metrics
            .emit(crate::metrics::HostCallEnded { import, took });
    }

    fn guest_output_dropped(&self, lines: u64) {
        self.services
            .metrics
            .emit(crate::metrics::GuestLogDropped { lines });
    }

    fn tool_call(&self, caller: &str, owner: &str, allowed: bool) {
        self.services.metrics.emit(crate::metrics::ToolCalled {
            caller,
            owner,
            allowed,
        });
    }
}

impl TaskLink {
    fn state_write(&self, state: &str, metadata: Option<&Value>) -> Write {
        let metadata = metadata.map(raw);
        Write::Event {
            stream: self.stream.clone(),
            data: wire::state_event(&self.origin, state, metadata.as_deref()),
            refresh_ttl: true,
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
}

#[cfg(test)]
mod tests {
    use super::ReplyBuffer;

    #[test]
    fn a_reply_is_kept_up_to_its_bound_and_cut_on_a_character() {
        let mut reply = ReplyBuffer::default();
        reply.push("héllo ", 10);
        assert_eq!((reply.text.as_str(), reply.truncated), ("héllo ", false));
        // 7 bytes used; of "wörld" only "w" and "ö" (3 bytes) fit.
        reply.push("wörld", 10);
        assert_eq!((reply.text.as_str(), reply.truncated), ("héllo wö", true));
        reply.push("more", 10);
        assert_eq!(reply.text, "héllo wö");
    }
}
