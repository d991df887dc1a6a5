//! Reading what tasks emit: session events, read and followed with
//! `XREAD BLOCK` on a connection of their own.

use crate::ClientError;
use crate::client::redis_error;
use crate::connection::Connection;
use byclaw_protocol::{self as wire, keys};
use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;

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
    conn: Connection,
}

/// The longest a single [`EventReader::read`] blocks.
pub const MAX_EVENT_BLOCK: Duration = Duration::from_secs(30);

impl EventReader {
    /// Opens a connection for blocking reads.
    pub async fn connect(
        endpoint: impl Into<crate::connection::Endpoint>,
    ) -> Result<Self, ClientError> {
        let endpoint = endpoint.into();
        let conn = crate::connection::connect(&endpoint, MAX_EVENT_BLOCK + Duration::from_secs(10))
            .await
            .map_err(|source| ClientError::Connect {
                url: endpoint.shown(),
                source,
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
    /// # async fn demo(client: byclaw_client::Client) -> Result<(), byclaw_client::ClientError> {
    /// let session = byclaw_client::new_session_id();
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
