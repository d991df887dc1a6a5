//! [`Client`]: sends ASK_AGENT and RESUME commands and cancels tasks
//! exactly as the reference Python client (`ByaiGatewayClient`) does.

use crate::EventReader;
use crate::connection::Connection;
pub use byclaw_protocol::workers::WorkerInfo;
use byclaw_protocol::{self as wire, Header, keys};
use byclaw_protocol::{CancelLookup, Executions};
use serde_json::{Value, json};
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Redis could not be reached (or refused the credentials).
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        /// The URL without its password, or the master's name and its
        /// sentinels ([`Endpoint::shown`](crate::connection::Endpoint::shown)).
        url: String,
        /// What redis-rs said.
        source: redis::RedisError,
    },
    /// Nobody would run the task: no worker registered for the agent type.
    #[error("no worker serves agent type {agent_type:?} (the registry set is empty)")]
    NoWorker {
        /// The agent type asked for.
        agent_type: String,
    },
    /// A dead letter that cannot be put back on its stream.
    #[error("dead letter {id} cannot be replayed: {reason}")]
    NotReplayable {
        /// Its id in the dead-letter stream.
        id: String,
        /// Why not (no source stream, no fields, ...).
        reason: String,
    },
    /// A Redis command failed.
    #[error("Redis {command} failed: {source}")]
    Redis {
        /// Which command (or script).
        command: &'static str,
        /// What redis-rs said.
        source: redis::RedisError,
    },
}

pub(crate) fn redis_error(command: &'static str) -> impl FnOnce(redis::RedisError) -> ClientError {
    move |source| ClientError::Redis { command, source }
}

/// A command that was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The task's id: what its events, its cancel and its answers name.
    pub message_id: String,
    /// The W3C trace id (32 hex) stamped on the task and what it causes.
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
    /// What the cancel found.
    pub status: CancelStatus,
    /// The execution cancelled ('' when none was found).
    pub execution_id: String,
    /// The worker running it, sent the CANCEL_TASK ('' when none).
    pub worker_id: String,
    /// Why it did not cancel, for the non-success answers.
    pub error: Option<String>,
}

/// `graceful` lets the agent notice `is-cancelled` and return; `force`
/// stops it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CancelMode {
    /// The agent sees `is-cancelled` and may return; stopped after the
    /// worker's grace (`worker.cancel_grace_ms`) if it does not.
    #[default]
    Graceful,
    /// Stopped at once.
    Force,
}

/// A connection to the gateway's Redis.
#[derive(Clone)]
pub struct Client {
    /// The Redis, for the event readers' own connections.
    endpoint: crate::connection::Endpoint,
    /// Multiplexed; every command of the client and its clones.
    pub(crate) conn: Connection,
    registry: std::sync::Arc<Executions>,
    /// `header.tenant_id` of every command sent (empty: none).
    tenant_id: String,
}

impl Client {
    /// Connects to the Redis at `endpoint` (a URL, or an
    /// [`Endpoint`](crate::connection::Endpoint) with TLS files).
    pub async fn connect(
        endpoint: impl Into<crate::connection::Endpoint>,
    ) -> Result<Self, ClientError> {
        let endpoint = endpoint.into();
        let conn = crate::connection::connect(&endpoint, Duration::from_secs(10))
            .await
            .map_err(|source| ClientError::Connect {
                url: endpoint.shown(),
                source,
            })?;
        Ok(Client {
            endpoint,
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

    /// Whether `message_id` is a task of `session_id` (its execution is in
    /// the session's registry): what a front end checks before it lets a
    /// user answer or resume a task, so that knowing another session's
    /// message id is not enough.
    pub async fn task_in_session(
        &self,
        session_id: &str,
        message_id: &str,
    ) -> Result<bool, ClientError> {
        redis::cmd("HEXISTS")
            .arg(byclaw_protocol::keys::session_registry(session_id))
            .arg(format!("msg_map:{message_id}"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error("HEXISTS"))
    }

    /// Answers the question a task asked with `ask-user` (its ask-user
    /// event, [`SessionEvent::ask_user_prompt`](crate::SessionEvent::ask_user_prompt)): a RESUME to `agent_type`
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
        EventReader::connect(&self.endpoint).await
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
