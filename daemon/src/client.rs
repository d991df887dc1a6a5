//! A client of the gateway protocol for Rust backends, the CLI and tests:
//! sends ASK_AGENT and RESUME commands and cancels tasks exactly as the
//! reference Python client (`ByaiGatewayClient`) does, so Python workers and
//! `gatewayd` serve it alike.

pub use byclaw_protocol::workers::WorkerInfo;
use byclaw_protocol::{self as wire, Header, keys};
use byclaw_protocol::{CancelLookup, Executions};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("no worker serves agent type {agent_type:?} (the registry set is empty)")]
    NoWorker { agent_type: String },
    #[error("Redis {command} failed: {source}")]
    Redis {
        command: &'static str,
        source: redis::RedisError,
    },
}

fn redis_error(command: &'static str) -> impl FnOnce(redis::RedisError) -> ClientError {
    move |source| ClientError::Redis { command, source }
}

/// A command that was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub message_id: String,
    pub trace_id: String,
    /// The stream entry id.
    pub entry_id: String,
    /// A worker that serves the agent type (picked at random, as the
    /// reference client reports it; any worker of the type may run it).
    pub target_worker_id: String,
}

/// The answer to a cancel, named as the reference client names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelStatus {
    /// No execution of that message in that session.
    NotFound,
    /// The execution belongs to another session.
    SessionMismatch,
    /// It already ended (COMPLETED, FAILED or CANCELLED).
    AlreadyFinished,
    /// Marked CANCELLING; CANCEL_TASK sent to the worker running it.
    CancelRequested,
}

impl CancelStatus {
    /// The reference's status string.
    pub fn as_str(self) -> &'static str {
        match self {
            CancelStatus::NotFound => "NOT_FOUND",
            CancelStatus::SessionMismatch => "SESSION_MISMATCH",
            CancelStatus::AlreadyFinished => "ALREADY_FINISHED",
            CancelStatus::CancelRequested => "CANCEL_REQUESTED",
        }
    }
}

/// What a cancel found and did.
#[derive(Debug, Clone, PartialEq)]
pub struct CancelResponse {
    pub status: CancelStatus,
    pub execution_id: String,
    pub worker_id: String,
    /// Why it did not cancel, for the non-success answers.
    pub error: Option<String>,
}

/// `graceful` lets the agent notice `is-cancelled` and return; `force`
/// stops it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CancelMode {
    #[default]
    Graceful,
    Force,
}

/// A connection to the gateway's Redis.
#[derive(Clone)]
pub struct Client {
    /// The Redis URL, for the event readers' own connections.
    url: String,
    conn: ConnectionManager,
    registry: std::sync::Arc<Executions>,
    /// `header.tenant_id` of every command sent (empty: none).
    tenant_id: String,
}

impl Client {
    /// Connects to the Redis at `url`.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let conn = crate::broker::connect(url, Duration::from_secs(10))
            .await
            .map_err(|e| ClientError::Connect {
                url: url.to_owned(),
                source: e.source,
            })?;
        Ok(Client {
            url: url.to_owned(),
            conn,
            registry: std::sync::Arc::new(Executions::new(wire::DEFAULT_SESSION_TTL_S)),
            tenant_id: String::new(),
        })
    }

    /// A worker serving `agent_type`, at random; `NoWorker` when none does.
    async fn pick_worker(&self, agent_type: &str) -> Result<String, ClientError> {
        let worker: Option<String> = redis::cmd("SRANDMEMBER")
            .arg(keys::capability_workers(agent_type))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error("SRANDMEMBER"))?;
        worker.ok_or_else(|| ClientError::NoWorker {
            agent_type: agent_type.to_owned(),
        })
    }

    async fn xadd(
        &self,
        agent_type: &str,
        action_type: &str,
        header: &Header,
        body: &Value,
    ) -> Result<Sent, ClientError> {
        let target_worker_id = self.pick_worker(agent_type).await?;
        let entry_id: String = redis::cmd("XADD")
            .arg(keys::capability_stream(agent_type))
            .arg("*")
            .arg("data")
            .arg(wire::control_json(action_type, header, body))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error("XADD"))?;
        Ok(Sent {
            message_id: header.message_id.clone(),
            trace_id: header.trace_id.clone(),
            entry_id,
            target_worker_id,
        })
    }

    /// The same client sending on behalf of `tenant_id`: every command it
    /// sends carries it as `header.tenant_id` (the bridge sends each
    /// tenant's messages this way).
    pub fn for_tenant(&self, tenant_id: &str) -> Client {
        Client {
            tenant_id: tenant_id.to_owned(),
            ..self.clone()
        }
    }

    /// The header of a new command from a client (no calling agent).
    fn new_header(&self, agent_type: &str, session_id: &str, parent_message_id: &str) -> Header {
        Header {
            message_id: wire::new_message_id(),
            session_id: session_id.to_owned(),
            trace_id: wire::new_trace_id(),
            target_agent_type: agent_type.to_owned(),
            parent_message_id: parent_message_id.to_owned(),
            tenant_id: self.tenant_id.clone(),
            metadata: json!({}),
            ..Header::default()
        }
    }

    /// Sends an ASK_AGENT with text content (the reference client's
    /// `send_message`).
    pub async fn send(
        &self,
        agent_type: &str,
        session_id: &str,
        content: &str,
        extra_payload: Value,
    ) -> Result<Sent, ClientError> {
        let header = self.new_header(agent_type, session_id, "");
        let mut body = json!({ "content": content, "wait_for_reply": false });
        if extra_payload.as_object().is_some_and(|o| !o.is_empty()) {
            body["extra_payload"] = extra_payload;
        }
        self.xadd(agent_type, "ASK_AGENT", &header, &body).await
    }

    /// Answers a task waiting in `ask-user` (the reference client's
    /// `send_message(action_type="RESUME", parent_message_id=...)`).
    pub async fn resume(
        &self,
        agent_type: &str,
        session_id: &str,
        parent_message_id: &str,
        content: &str,
        status: &str,
        reply_data: Value,
    ) -> Result<Sent, ClientError> {
        let header = self.new_header(agent_type, session_id, parent_message_id);
        let body = json!({
            "content": content,
            "status": status,
            "reply_data": reply_data,
            "extra_payload": {},
        });
        self.xadd(agent_type, "RESUME", &header, &body).await
    }

    /// Answers the question a task asked with `ask-user` (its ask-user
    /// event, [`SessionEvent::ask_user_prompt`]): a RESUME to `agent_type`
    /// whose parent is the waiting task's `message_id`, status
    /// `USER_REPLIED`, the text as `content` and as the form's field
    /// (`reply_data.user_input`). The task goes on under its own message id.
    pub async fn answer_user(
        &self,
        agent_type: &str,
        session_id: &str,
        message_id: &str,
        answer: &str,
    ) -> Result<Sent, ClientError> {
        self.resume(
            agent_type,
            session_id,
            message_id,
            answer,
            USER_REPLIED,
            json!({ "user_input": answer }),
        )
        .await
    }

    /// A reader of session event streams on a connection of its own (a
    /// blocking read would hold up every other command sharing one).
    pub async fn event_reader(&self) -> Result<EventReader, ClientError> {
        EventReader::connect(&self.url).await
    }

    /// The registry's workers, as the reference's `get_active_workers`
    /// returns them (every member of the active-workers set, most recent
    /// heartbeat first).
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        byclaw_protocol::workers::active_workers(&mut self.conn.clone())
            .await
            .map_err(redis_error("ZREVRANGE/SMEMBERS"))
    }

    /// Cancels a task as the reference client's `cancel_task` does: the
    /// execution is looked up in the session registry, marked CANCELLING,
    /// and CANCEL_TASK goes to the worker that runs it.
    pub async fn cancel(
        &self,
        message_id: &str,
        session_id: &str,
        reason: &str,
        mode: CancelMode,
    ) -> Result<CancelResponse, ClientError> {
        let mut conn = self.conn.clone();
        let lookup = self
            .registry
            .request_cancel(&mut conn, session_id, message_id, reason, false)
            .await
            .map_err(redis_error("EVALSHA"))?;
        let (status, execution_id, worker_id, error) = match lookup {
            CancelLookup::NotFound | CancelLookup::Precancelled { .. } => (
                CancelStatus::NotFound,
                String::new(),
                String::new(),
                Some(format!("execution not found for message_id={message_id}")),
            ),
            CancelLookup::SessionMismatch {
                execution_id,
                worker_id,
            } => (
                CancelStatus::SessionMismatch,
                execution_id,
                worker_id,
                Some(format!("session mismatch for message_id={message_id}")),
            ),
            CancelLookup::AlreadyFinished {
                execution_id,
                worker_id,
                status,
            } => (
                CancelStatus::AlreadyFinished,
                execution_id,
                worker_id,
                Some(format!("execution already in terminal state: {status}")),
            ),
            CancelLookup::Requested {
                execution_id,
                worker_id,
                target_agent_type,
            } => {
                let data = wire::cancel_task_json(&wire::CancelTarget {
                    session_id,
                    message_id,
                    execution_id: &execution_id,
                    worker_id: &worker_id,
                    target_agent_type: &target_agent_type,
                    reason,
                    requested_by: "client",
                    cancel_mode: match mode {
                        CancelMode::Graceful => "graceful",
                        CancelMode::Force => "force",
                    },
                });
                let _: String = redis::cmd("XADD")
                    .arg(keys::worker_stream(&worker_id))
                    .arg("*")
                    .arg("data")
                    .arg(data)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error("XADD"))?;
                (CancelStatus::CancelRequested, execution_id, worker_id, None)
            }
        };
        Ok(CancelResponse {
            status,
            execution_id,
            worker_id,
            error,
        })
    }
}

/// The RESUME status of a user's answer to `ask-user`.
pub const USER_REPLIED: &str = "USER_REPLIED";

/// A fresh session id: `sess-` + 16 lowercase hex. Reuse it for every turn
/// of a conversation so the daemon carries the history.
pub fn new_session_id() -> String {
    format!("sess-{:016x}", fastrand::u64(..))
}

/// One event of a session's data stream: the reference's DataMessage, with
/// the stream entry id it was read at (the position to resume after).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEvent {
    /// The data-stream entry id (`1732500000000-0`).
    pub entry_id: String,
    /// The DataMessage JSON, as written.
    pub message: Value,
}

impl SessionEvent {
    /// `event_type` (`answerDelta`, `reasoningLogDelta`, `appStreamResponse`...).
    pub fn event_type(&self) -> &str {
        self.message["event_type"].as_str().unwrap_or("")
    }

    /// The message id of the task that emitted it.
    pub fn message_id(&self) -> &str {
        self.message["message_id"].as_str().unwrap_or("")
    }

    /// The agent type that emitted it.
    pub fn agent_id(&self) -> &str {
        self.message["source_agent_id"].as_str().unwrap_or("")
    }

    /// `data.contentType` (`1002` text, `3003` state, `3010` artifact,
    /// `3013` ask-user form...).
    pub fn content_type(&self) -> &str {
        self.message["data"]["contentType"].as_str().unwrap_or("")
    }

    /// `data.choices[0].delta.content` as text.
    pub fn content(&self) -> &str {
        self.message["data"]["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
    }

    /// The state, for a state event (`STARTING`, `WAITING_USER`,
    /// `FAILED: reason`...).
    pub fn state(&self) -> Option<&str> {
        (self.content_type() == wire::content_type::THINK_TITLE).then(|| self.content())
    }

    /// The text of a chunk event.
    pub fn chunk(&self) -> Option<&str> {
        (self.content_type() == wire::content_type::TEXT).then(|| self.content())
    }

    /// The artifact URL of an artifact event: the `fileUrl` of the
    /// content (`[{"fileUrl": url}]`, where the reference emitter puts it),
    /// else the DataMessage's `artifact_url`.
    pub fn artifact_url(&self) -> Option<String> {
        if self.content_type() != wire::content_type::CREATE_FILE {
            return None;
        }
        let files: Option<Value> = serde_json::from_str(self.content()).ok();
        files
            .as_ref()
            .and_then(|files| files[0]["fileUrl"].as_str())
            .or_else(|| self.message["artifact_url"].as_str())
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
    }

    /// The question of an ask-user form event.
    pub fn ask_user_prompt(&self) -> Option<String> {
        if self.content_type() != wire::content_type::USER_INPUT {
            return None;
        }
        let form: Value = serde_json::from_str(self.content()).ok()?;
        form["pluginMachineFields"][0]["description"]
            .as_str()
            .map(str::to_owned)
    }

    /// Whether this event ends its task: `COMPLETED`, `FAILED: ...`,
    /// `CANCELLED`, or `QUEUED: <caller>` (a task another agent called
    /// hands its result back and ends).
    pub fn is_terminal(&self) -> bool {
        self.state().is_some_and(|state| {
            state == wire::state::COMPLETED
                || state == wire::state::CANCELLED
                || state == wire::state::FAILED
                || state.starts_with("FAILED: ")
                || state.starts_with("QUEUED: ")
        })
    }

    /// `metadata.result` of a terminal event (the handler's return value).
    pub fn result(&self) -> Option<&Value> {
        self.message["metadata"].get("result")
    }
}

/// Reads session data streams with `XREAD BLOCK`, on its own connection.
pub struct EventReader {
    conn: ConnectionManager,
}

/// The longest a single [`EventReader::read`] blocks.
pub const MAX_EVENT_BLOCK: Duration = Duration::from_secs(30);

impl EventReader {
    /// Opens a connection for blocking reads.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let conn = crate::broker::connect(url, MAX_EVENT_BLOCK + Duration::from_secs(10))
            .await
            .map_err(|e| ClientError::Connect {
                url: crate::broker::redact_password(url),
                source: e.source,
            })?;
        Ok(EventReader { conn })
    }

    /// The entries of `session_id`'s stream after entry id `after` (`0` for
    /// all of them, `$` for only new ones — pass the batch's
    /// [`EventBatch::last_entry_id`] to resume without a gap), at most
    /// `count`, waiting up to `block` (at most [`MAX_EVENT_BLOCK`]) when
    /// there is none yet. An entry that is not an event (written by someone
    /// else: no `data`, not JSON) is logged and skipped, never fatal.
    pub async fn read(
        &mut self,
        session_id: &str,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<EventBatch, ClientError> {
        let stream = keys::session_data_stream(session_id);
        let block = block.min(MAX_EVENT_BLOCK);
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&stream)
            .arg(after)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error("XREAD"))?;
        let mut batch = EventBatch::default();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                batch.last_entry_id = Some(entry.id.clone());
                let message = match entry.get::<String>("data") {
                    None => Err("no data field".to_owned()),
                    Some(data) => {
                        serde_json::from_str(&data).map_err(|e| format!("data is not JSON: {e}"))
                    }
                };
                match message {
                    Ok(message) => batch.events.push(SessionEvent {
                        entry_id: entry.id,
                        message,
                    }),
                    Err(reason) => tracing::warn!(
                        session_id,
                        entry_id = %entry.id,
                        %reason,
                        "skipping a stream entry that is not an event"
                    ),
                }
            }
        }
        Ok(batch)
    }

    /// Follows the task `message_id` of `session_id` from entry id `after`:
    /// its events only (a session also carries the events of the agents it
    /// calls, and of other tasks), ending with its terminal state. Take
    /// `after` with [`EventReader::last_entry_id`] *before* sending, so no
    /// event is missed:
    ///
    /// ```no_run
    /// # async fn demo(client: gatewayd::client::Client) -> Result<(), gatewayd::client::ClientError> {
    /// let session = gatewayd::client::new_session_id();
    /// let mut reader = client.event_reader().await?;
    /// let after = reader.last_entry_id(&session).await?;
    /// let sent = client.send("echo", &session, "hello", serde_json::json!({})).await?;
    /// let mut events = reader.follow(&session, &sent.message_id, &after);
    /// while let Some(event) = events.next().await? {
    ///     if let Some(text) = event.chunk() {
    ///         print!("{text}");
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn follow(&mut self, session_id: &str, message_id: &str, after: &str) -> TaskEvents<'_> {
        TaskEvents {
            reader: self,
            session_id: session_id.to_owned(),
            message_id: message_id.to_owned(),
            after: after.to_owned(),
            batch: VecDeque::new(),
            ended: false,
        }
    }

    /// The id of the newest entry of the session's stream (`0-0` when it
    /// has none): read after it to see only what comes next, with no gap.
    pub async fn last_entry_id(&mut self, session_id: &str) -> Result<String, ClientError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(keys::session_data_stream(session_id))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn)
            .await
            .map_err(redis_error("XREVRANGE"))?;
        Ok(reply
            .ids
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |entry| entry.id))
    }
}

/// What one [`EventReader::read`] got.
#[derive(Debug, Default)]
pub struct EventBatch {
    /// The events, in stream order.
    pub events: Vec<SessionEvent>,
    /// The id of the last entry read, event or not: where the next read
    /// starts. `None` when nothing came.
    pub last_entry_id: Option<String>,
}

/// Most events one read of [`TaskEvents`] takes from the stream: what it
/// holds in memory at once.
const FOLLOW_BATCH: usize = 64;

/// The events of one task as they come, until its terminal state; made by
/// [`EventReader::follow`].
pub struct TaskEvents<'r> {
    /// The reader's connection, borrowed for as long as the task is followed.
    reader: &'r mut EventReader,
    /// The session whose stream is read.
    session_id: String,
    /// The task whose events are yielded; others are skipped.
    message_id: String,
    /// The entry id of the last event taken from the stream: where the next
    /// read starts, so nothing is read twice or missed.
    after: String,
    /// Events of the last read not yet looked at (at most [`FOLLOW_BATCH`]).
    batch: VecDeque<SessionEvent>,
    /// Set once the terminal event was yielded.
    ended: bool,
}

impl TaskEvents<'_> {
    /// The next event of the task, waiting as long as it takes; `None`
    /// after the terminal one ([`SessionEvent::is_terminal`]).
    ///
    /// Cancel-safe: dropping the future (in a `select!` with a timeout or a
    /// Ctrl-C) loses no event; the next call reads from the same position
    /// (after the blocking read already sent returns on the connection).
    pub async fn next(&mut self) -> Result<Option<SessionEvent>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            while let Some(event) = self.batch.pop_front() {
                if event.message_id() == self.message_id {
                    self.ended = event.is_terminal();
                    return Ok(Some(event));
                }
            }
            let read = self
                .reader
                .read(&self.session_id, &self.after, FOLLOW_BATCH, MAX_EVENT_BLOCK)
                .await?;
            if let Some(last) = read.last_entry_id {
                self.after = last;
            }
            self.batch.extend(read.events);
        }
    }

    /// The task followed.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }
}
