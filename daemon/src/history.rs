//! Session history: the messages of a session (the user's requests, the
//! agents' replies), stored so that later tasks of the session can be given
//! the recent ones.
//!
//! This module owns the storage: the entry format, the two stores (a capped
//! list per session in Redis, or the reference SDK's PostgreSQL table
//! `gateway_session_messages`), the background writer and its counters.
//! Deciding what to record and injecting history into a task are left to
//! the dispatcher; exporting the counters as metrics is left to whoever
//! serves metrics.
//!
//! History is an aid, never a reason for a task to fail or wait:
//! [`History::record`] only queues (a full queue drops the entry), one
//! background task writes what has queued up in batches and retries a
//! failed batch a bounded number of times, and [`History::recent`] gives up
//! after `history.read_timeout_ms` with no history. Every loss is counted
//! ([`History::stats`]) and logged. Writes are at least once: a batch whose
//! outcome was lost in transit is written again.

use crate::config::{HistoryBackend, HistoryConfig};
use byclaw_protocol::PREFIX;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tokio_postgres::types::Json;
use tokio_util::sync::CancellationToken;

/// The Redis list of one session's history, oldest entry first.
pub fn history_key(session_id: &str) -> String {
    format!("{PREFIX}:session:{session_id}:history")
}

/// Who said it; the reference's table accepts exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person using the session.
    User,
    /// An agent's reply.
    Assistant,
    /// Instructions set by the application.
    System,
    /// The output of a tool call.
    Tool,
}

impl Role {
    /// The stored spelling: `user`, `assistant`, `system` or `tool`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Role, UnknownRole> {
        match text {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "system" => Ok(Role::System),
            "tool" => Ok(Role::Tool),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// A role other than `user`, `assistant`, `system` or `tool`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown history role {0:?}; expected user, assistant, system or tool")]
pub struct UnknownRole(pub String);

/// One message of a session, as the reference SDK stores and injects it:
/// `{"role": ..., "content": ..., "metadata": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Who said it.
    pub role: Role,
    /// What was said; an empty one is never stored.
    pub content: String,
    /// Free-form context (the reference puts `message_id`, `trace_id`,
    /// `agent_id` here); an object, `{}` when there is none.
    #[serde(default = "empty_object")]
    pub metadata: Value,
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

impl HistoryEntry {
    /// An entry without metadata.
    pub fn new(role: Role, content: impl Into<String>) -> HistoryEntry {
        HistoryEntry {
            role,
            content: content.into(),
            metadata: empty_object(),
        }
    }

    /// The same entry with `metadata`.
    pub fn with_metadata(mut self, metadata: Value) -> HistoryEntry {
        self.metadata = metadata;
        self
    }

    /// Missing metadata as `{}`, as the reference writes and reads it.
    fn normalized(mut self) -> HistoryEntry {
        if self.metadata.is_null() {
            self.metadata = empty_object();
        }
        self
    }
}

/// Counters since the store was started; each only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Entries accepted by [`History::record`] into the write queue.
    pub recorded: u64,
    /// Entries the store confirmed.
    pub written: u64,
    /// Write attempts that failed, in whole or in part (each retry counts).
    pub write_failures: u64,
    /// Entries lost: refused by a full queue or a stopped writer, refused by
    /// the store, or still failing after `history.write_attempts`.
    pub dropped: u64,
    /// Reads that failed or timed out.
    pub read_failures: u64,
}

/// A history failure, with what we were doing.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The postgres backend needs a connection string.
    #[error("history.backend is postgres but history.postgres_dsn is not set")]
    MissingDsn,
    /// The connection string does not parse.
    #[error("history.postgres_dsn is not a usable PostgreSQL connection string: {}", pg_text(.0))]
    InvalidDsn(#[source] tokio_postgres::Error),
    /// The CA file for TLS to PostgreSQL cannot be used.
    #[error("history.postgres_ca_file {path}: {reason}")]
    PostgresCa {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The pool could not be built (a configuration problem, not an outage).
    #[error("cannot build the PostgreSQL pool for history: {0}")]
    Pool(#[source] deadpool_postgres::BuildError),
    /// Redis refused the connection settings or was unreachable at start.
    #[error("cannot connect to Redis for history: {0}")]
    RedisConnect(#[source] redis::RedisError),
    /// A Redis command failed.
    #[error("redis {operation} on {key}: {source}")]
    Redis {
        /// The command, e.g. `LRANGE`.
        operation: &'static str,
        /// The key, or a summary of the keys of a pipeline.
        key: String,
        #[source]
        source: redis::RedisError,
    },
    /// A PostgreSQL statement failed.
    #[error("postgres {operation} ({context}): {}", pg_text(.source))]
    Postgres {
        /// What the statement was for, e.g. `insert`.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be had from the pool.
    #[error("postgres {operation} ({context}): {}", pool_text(.source))]
    PostgresPool {
        /// What the connection was for.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        #[source]
        source: PoolError,
    },
    /// An entry could not be encoded as JSON.
    #[error("cannot encode a history entry of session {session_id}: {source}")]
    Encode {
        /// The session of the entry.
        session_id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The store did not answer in time.
    #[error("history {operation} ({context}) took longer than {after:?}")]
    Timeout {
        /// `read`, `write` or `flush`.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// `history.backend` is `off`: nothing is stored, nothing can be read.
    #[error("history is off (history.backend = \"off\")")]
    Off,
    /// The writer was stopped by [`History::close`].
    #[error("the history writer has stopped")]
    Closed,
}

impl HistoryError {
    /// The SQLSTATE of a PostgreSQL error, when the server sent one.
    fn sql_state(&self) -> Option<&str> {
        match self {
            HistoryError::Postgres { source, .. } => source.code().map(|code| code.code()),
            _ => None,
        }
    }

    /// The server refused the data itself (class 22, data exception, e.g. a
    /// NUL byte or a session id over 128 characters; class 23, integrity,
    /// e.g. the role check): the same rows will never be accepted.
    fn is_refused_data(&self) -> bool {
        self.sql_state()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
    }
}

/// tokio-postgres displays only the kind of an error ("db error"); add the
/// server's message or the I/O error under it.
fn pg_text(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

fn pool_text(error: &PoolError) -> String {
    match error {
        PoolError::Backend(error) => format!("cannot connect: {}", pg_text(error)),
        other => other.to_string(),
    }
}

/// The handle to the history store; cheap to clone. The background writer
/// runs until every clone is dropped (then it writes what is queued and
/// ends) or [`History::close`] is called.
#[derive(Clone)]
pub struct History {
    /// `None` when `history.backend` is `off`.
    inner: Option<Arc<Handle>>,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("backend", &self.backend())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What the clones of one [`History`] share.
struct Handle {
    /// Feeds the writer; dropping the last one lets it drain and end.
    queue: mpsc::Sender<Job>,
    /// The store and counters, also held by the writer.
    shared: Arc<Shared>,
    /// Cancelled by [`History::close`]: the writer stops retrying and drops
    /// what is left, so a shutdown is never held up by a dead store.
    stop: CancellationToken,
    /// The writer task, awaited by [`History::close`]; taken by the first
    /// close.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// `read_timeout_ms`.
    read_timeout: Duration,
    /// Start of the clock of `last_drop_warning_ms`.
    epoch: Instant,
    /// When a lost entry was last logged, ms since `epoch` plus one (0:
    /// never); limits those warnings to one a second under a flood.
    last_drop_warning_ms: AtomicU64,
}

/// The store and counters, shared by the handles and the writer.
struct Shared {
    /// Where entries go.
    store: Store,
    /// Read through [`History::stats`].
    counters: Counters,
}

/// The live counters behind [`HistoryStats`]; each field is the one of the
/// same name there. Relaxed: they are statistics, not synchronization.
#[derive(Default)]
struct Counters {
    /// Bumped by [`History::record`].
    recorded: AtomicU64,
    /// Bumped by the writer.
    written: AtomicU64,
    /// Bumped by the writer, once per failed attempt.
    write_failures: AtomicU64,
    /// Bumped by [`History::record`] (queue full) and the writer.
    dropped: AtomicU64,
    /// Bumped by [`History::read`].
    read_failures: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What the writer is asked to do, in queue order.
enum Job {
    /// Store an entry.
    Entry(Record),
    /// Confirm once everything queued before is written (or dropped).
    Flush(oneshot::Sender<()>),
}

/// An entry waiting to be written.
struct Record {
    /// Its session.
    session_id: Box<str>,
    /// The entry, metadata normalized.
    entry: HistoryEntry,
}

impl History {
    /// Opens the configured store and starts the writer. The Redis store
    /// connects to `redis` (the daemon's Redis). The PostgreSQL store
    /// builds a pool and creates the reference's table if it is missing;
    /// when the database cannot be reached the store starts anyway (writes
    /// then fail and are retried, then dropped, and reads give nothing,
    /// every time counted) and the table is created once it can be.
    pub async fn start(
        config: &HistoryConfig,
        redis: impl Into<byclaw_client::connection::Endpoint>,
    ) -> Result<History, HistoryError> {
        let redis = redis.into();
        let store = match config.backend {
            HistoryBackend::Off => {
                tracing::info!("history is off: nothing is stored, tasks get no history");
                return Ok(History { inner: None });
            }
            HistoryBackend::Redis => {
                if config
                    .postgres_dsn
                    .as_deref()
                    .is_some_and(|d| !d.is_empty())
                {
                    tracing::warn!(
                        "history.postgres_dsn is set but history.backend is redis; the DSN is unused"
                    );
                }
                Store::Redis(RedisStore::connect(&redis, config).await?)
            }
            HistoryBackend::Postgres => Store::Postgres(PostgresStore::connect(config).await?),
        };
        let shared = Arc::new(Shared {
            store,
            counters: Counters::default(),
        });
        let (queue, receiver) = mpsc::channel(config.queue.max(1));
        let stop = CancellationToken::new();
        let writer = Writer {
            shared: shared.clone(),
            queue: receiver,
            stop: stop.clone(),
            max_batch: config.write_batch.max(1),
            timeout: config.write_timeout(),
            attempts: config.write_attempts.max(1),
            backoff: config.write_backoff(),
        };
        let writer = tokio::spawn(writer.run());
        tracing::info!(
            backend = ?config.backend,
            max_entries = config.max_entries,
            queue = config.queue,
            "history store ready"
        );
        Ok(History {
            inner: Some(Arc::new(Handle {
                queue,
                shared,
                stop,
                writer: Mutex::new(Some(writer)),
                read_timeout: config.read_timeout(),
                epoch: Instant::now(),
                last_drop_warning_ms: AtomicU64::new(0),
            })),
        })
    }

    /// The configured store.
    pub fn backend(&self) -> HistoryBackend {
        match self.inner.as_deref().map(|h| &h.shared.store) {
            None => HistoryBackend::Off,
            Some(Store::Redis(_)) => HistoryBackend::Redis,
            Some(Store::Postgres(_)) => HistoryBackend::Postgres,
        }
    }

    /// Queues an entry for writing and returns at once; never blocks, never
    /// fails. An entry with empty content is not stored (as in the
    /// reference). When the queue is full the entry is dropped, counted and
    /// logged (at most one warning a second).
    pub fn record(&self, session_id: &str, entry: HistoryEntry) {
        let Some(handle) = &self.inner else {
            return;
        };
        if entry.content.is_empty() {
            tracing::trace!(session_id, role = %entry.role, "empty history entry not stored");
            return;
        }
        let record = Record {
            session_id: session_id.into(),
            entry: entry.normalized(),
        };
        match handle.queue.try_send(Job::Entry(record)) {
            Ok(()) => Counters::add(&handle.shared.counters.recorded, 1),
            Err(mpsc::error::TrySendError::Full(_)) => handle.lost(session_id, "the queue is full"),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                handle.lost(session_id, "the writer has stopped")
            }
        }
    }

    /// The newest `limit` entries of a session, oldest first. Never fails:
    /// when the store fails or does not answer within
    /// `history.read_timeout_ms`, this logs a warning, counts a read
    /// failure and returns no entries. Always empty when history is off.
    pub async fn recent(&self, session_id: &str, limit: usize) -> Vec<HistoryEntry> {
        match self.read(session_id, limit).await {
            Ok(entries) => entries,
            Err(HistoryError::Off) => Vec::new(),
            Err(error) => {
                tracing::warn!(session_id, limit, %error, "history read failed; going on without history");
                Vec::new()
            }
        }
    }

    /// Like [`History::recent`], but says why nothing could be read (for
    /// the command line). Failures are counted all the same.
    pub async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        let Some(handle) = &self.inner else {
            return Err(HistoryError::Off);
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let read = handle.shared.store.read(session_id, limit);
        let result = match tokio::time::timeout(handle.read_timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(HistoryError::Timeout {
                operation: "read",
                context: format!("session {session_id}"),
                after: handle.read_timeout,
            }),
        };
        if result.is_err() {
            Counters::add(&handle.shared.counters.read_failures, 1);
        }
        result
    }

    /// The counters so far; all zero when history is off.
    pub fn stats(&self) -> HistoryStats {
        let Some(handle) = &self.inner else {
            return HistoryStats::default();
        };
        let c = &handle.shared.counters;
        HistoryStats {
            recorded: c.recorded.load(Ordering::Relaxed),
            written: c.written.load(Ordering::Relaxed),
            write_failures: c.write_failures.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            read_failures: c.read_failures.load(Ordering::Relaxed),
        }
    }

    /// Waits until every entry recorded before this call has been written
    /// (or given up on and dropped), for at most `deadline`.
    pub async fn flush(&self, deadline: Duration) -> Result<(), HistoryError> {
        let Some(handle) = &self.inner else {
            return Ok(());
        };
        let (done, confirmed) = oneshot::channel();
        let flushed = async {
            handle
                .queue
                .send(Job::Flush(done))
                .await
                .map_err(|_| HistoryError::Closed)?;
            confirmed.await.map_err(|_| HistoryError::Closed)
        };
        tokio::time::timeout(deadline, flushed)
            .await
            .unwrap_or_else(|_| {
                Err(HistoryError::Timeout {
                    operation: "flush",
                    context: "queued entries".into(),
                    after: deadline,
                })
            })
    }

    /// The shutdown path: writes what is queued within `deadline`, then
    /// stops the writer for every clone (entries still queued, and any
    /// recorded later, are dropped and counted) and waits for it to end.
    pub async fn close(self, deadline: Duration) -> Result<(), HistoryError> {
        let Some(handle) = &self.inner else {
            return Ok(());
        };
        let started = Instant::now();
        let flushed = self.flush(deadline).await;
        handle.stop.cancel();
        let writer = handle
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(writer) = writer {
            // The writer ends at its next wait; an attempt in flight is
            // bounded by history.write_timeout_ms. At least a second even
            // when the flush used up the deadline, so it can notice.
            let left = deadline.saturating_sub(started.elapsed());
            let grace = left.max(Duration::from_secs(1));
            if tokio::time::timeout(grace, writer).await.is_err() {
                tracing::warn!(
                    grace_ms = grace.as_millis() as u64,
                    "history writer still busy; leaving it behind"
                );
            }
        }
        flushed
    }
}

impl Handle {
    /// Counts an entry refused by [`History::record`] and warns, at most
    /// once a second.
    fn lost(&self, session_id: &str, why: &str) {
        let dropped = self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_drop_warning_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= 1000;
        if due
            && self
                .last_drop_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                session_id,
                dropped_total = dropped,
                "history entry dropped: {why} (further drops within a second are counted, not logged)"
            );
        }
    }
}

/// Drains the queue into the store, one batch at a time, so entries are
/// written in the order they were recorded.
struct Writer {
    /// The store and the counters.
    shared: Arc<Shared>,
    /// Entries and flush requests from the handles.
    queue: mpsc::Receiver<Job>,
    /// See [`Handle::stop`].
    stop: CancellationToken,
    /// `history.write_batch`.
    max_batch: usize,
    /// `history.write_timeout_ms`, per attempt.
    timeout: Duration,
    /// `history.write_attempts`.
    attempts: u32,
    /// `history.write_backoff_ms`, the first wait between attempts.
    backoff: Duration,
}

/// Longest wait between two attempts at a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Writer {
    async fn run(mut self) {
        let mut records: Vec<Record> = Vec::with_capacity(self.max_batch);
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        loop {
            let job = tokio::select! {
                biased;
                _ = self.stop.cancelled() => {
                    self.abandon();
                    return;
                }
                job = self.queue.recv() => job,
            };
            let Some(job) = job else {
                tracing::debug!("history writer drained; every handle is gone");
                return;
            };
            let mut next = Some(job);
            while let Some(job) = next.take() {
                match job {
                    Job::Entry(record) => records.push(record),
                    Job::Flush(done) => flushes.push(done),
                }
                if records.len() < self.max_batch {
                    next = self.queue.try_recv().ok();
                }
            }
            if !records.is_empty() {
                self.store(std::mem::take(&mut records)).await;
            }
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
        }
    }

    /// Writes one batch: retries what failed for a passing reason with
    /// backoff, at most `attempts` times; drops (counted, logged) what the
    /// store refused and what is still failing then.
    async fn store(&self, mut pending: Vec<Record>) {
        let counters = &self.shared.counters;
        let mut backoff = self.backoff;
        for attempt in 1..=self.attempts {
            let write = self.shared.store.write(&pending);
            let outcome = match tokio::time::timeout(self.timeout, write).await {
                Ok(outcome) => outcome,
                Err(_) => Err(HistoryError::Timeout {
                    operation: "write",
                    context: format!("{} entries", pending.len()),
                    after: self.timeout,
                }),
            };
            let error = match outcome {
                Ok(refusals) if refusals.is_empty() => {
                    Counters::add(&counters.written, pending.len());
                    return;
                }
                Ok(refusals) => {
                    let refused: usize = refusals.iter().map(|r| r.indices.len()).sum();
                    Counters::add(&counters.written, pending.len().saturating_sub(refused));
                    Counters::add(&counters.write_failures, 1);
                    let mut retry = vec![false; pending.len()];
                    let mut last_error = None;
                    for refusal in refusals {
                        if refusal.retry {
                            for &index in &refusal.indices {
                                retry[index] = true;
                            }
                            last_error = Some(refusal.error);
                        } else {
                            let sessions = sessions_of(&pending, &refusal.indices);
                            Counters::add(&counters.dropped, refusal.indices.len());
                            tracing::error!(
                                entries = refusal.indices.len(),
                                sessions = %sessions,
                                error = %refusal.error,
                                "history entries refused by the store; dropped"
                            );
                        }
                    }
                    let mut flags = retry.into_iter();
                    pending.retain(|_| flags.next().unwrap_or(false));
                    match last_error {
                        Some(error) => error,
                        None => return,
                    }
                }
                Err(error) => {
                    Counters::add(&counters.write_failures, 1);
                    error
                }
            };
            if attempt == self.attempts {
                let every: Vec<usize> = (0..pending.len()).collect();
                Counters::add(&counters.dropped, pending.len());
                tracing::error!(
                    entries = pending.len(),
                    sessions = %sessions_of(&pending, &every),
                    attempts = self.attempts,
                    %error,
                    "history write still failing; entries dropped"
                );
                return;
            }
            tracing::warn!(
                entries = pending.len(),
                attempt,
                retry_in_ms = backoff.as_millis() as u64,
                %error,
                "history write failed; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => {
                    Counters::add(&counters.dropped, pending.len());
                    tracing::error!(
                        entries = pending.len(),
                        %error,
                        "history writer stopped while the store was failing; entries dropped"
                    );
                    return;
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Stopped by [`History::close`]: whatever is still queued is dropped.
    fn abandon(&mut self) {
        self.queue.close();
        let mut left = 0usize;
        while let Ok(job) = self.queue.try_recv() {
            if let Job::Entry(_) = job {
                left += 1;
            }
        }
        if left > 0 {
            Counters::add(&self.shared.counters.dropped, left);
            tracing::error!(
                entries = left,
                "history writer stopped before writing everything; entries dropped"
            );
        }
        tracing::debug!("history writer stopped");
    }
}

/// The distinct sessions of some records, for a log line.
fn sessions_of(records: &[Record], indices: &[usize]) -> String {
    let mut sessions: Vec<&str> = indices
        .iter()
        .filter_map(|&i| records.get(i))
        .map(|r| &*r.session_id)
        .collect();
    sessions.sort_unstable();
    sessions.dedup();
    const SHOWN: usize = 10;
    let more = sessions.len().saturating_sub(SHOWN);
    sessions.truncate(SHOWN);
    let mut text = sessions.join(",");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// Entries of a batch that the store did not take.
struct Refusal {
    /// Their positions in the batch.
    indices: Vec<usize>,
    /// Why.
    error: HistoryError,
    /// Whether trying again may succeed (the store was unavailable) or not
    /// (it refused the data).
    retry: bool,
}

/// One of the backends.
enum Store {
    /// `history.backend = "redis"`.
    Redis(RedisStore),
    /// `history.backend = "postgres"`.
    Postgres(PostgresStore),
}

impl Store {
    /// Writes a batch in order. `Err`: the whole batch failed (nothing, or
    /// an unknown part, was written); `Ok`: everything was written but the
    /// refusals.
    async fn write(&self, records: &[Record]) -> Result<Vec<Refusal>, HistoryError> {
        match self {
            Store::Redis(store) => store.write(records).await,
            Store::Postgres(store) => store.write(records).await,
        }
    }

    /// The newest `limit` entries, oldest first; `limit` is at least 1.
    async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        match self {
            Store::Redis(store) => store.read(session_id, limit).await,
            Store::Postgres(store) => store.read(session_id, limit).await,
        }
    }
}

/// The entries of one session in a Redis batch.
struct SessionWrites<'a> {
    /// The session.
    session_id: &'a str,
    /// Positions of its entries in the batch, in order.
    indices: Vec<usize>,
    /// Those entries as JSON, in the same order.
    encoded: Vec<Vec<u8>>,
}

/// A list per session: RPUSH the JSON entries, LTRIM to the newest
/// `max_entries`, EXPIRE; read with LRANGE.
struct RedisStore {
    /// Multiplexed and reconnecting; cloned per command.
    connection: ConnectionManager,
    /// `history.max_entries`.
    max_entries: usize,
    /// `history.ttl_s`.
    ttl_s: u64,
}

impl RedisStore {
    async fn connect(
        endpoint: &byclaw_client::connection::Endpoint,
        config: &HistoryConfig,
    ) -> Result<RedisStore, HistoryError> {
        let client = endpoint.client().map_err(HistoryError::RedisConnect)?;
        let response_timeout = config.write_timeout().max(config.read_timeout());
        let settings = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2));
        let connection = ConnectionManager::new_with_config(client, settings)
            .await
            .map_err(HistoryError::RedisConnect)?;
        Ok(RedisStore {
            connection,
            max_entries: config.max_entries.max(1),
            ttl_s: config.ttl_s.max(1),
        })
    }

    /// One pipeline: per session, one RPUSH of its entries in order, LTRIM,
    /// EXPIRE. Each command's result is checked, so a key Redis refuses
    /// (e.g. of another type) loses only its own entries.
    async fn write(&self, records: &[Record]) -> Result<Vec<Refusal>, HistoryError> {
        let mut refusals = Vec::new();
        // Sessions in order of first appearance, each with its entries.
        let mut slot: HashMap<&str, usize> = HashMap::new();
        let mut sessions: Vec<SessionWrites<'_>> = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let encoded = match serde_json::to_vec(&record.entry) {
                Ok(encoded) => encoded,
                Err(source) => {
                    refusals.push(Refusal {
                        indices: vec![index],
                        error: HistoryError::Encode {
                            session_id: record.session_id.to_string(),
                            source,
                        },
                        retry: false,
                    });
                    continue;
                }
            };
            let session_id: &str = &record.session_id;
            let at = *slot.entry(session_id).or_insert_with(|| {
                sessions.push(SessionWrites {
                    session_id,
                    indices: Vec::new(),
                    encoded: Vec::new(),
                });
                sessions.len() - 1
            });
            sessions[at].indices.push(index);
            sessions[at].encoded.push(encoded);
        }
        if sessions.is_empty() {
            return Ok(refusals);
        }
        let keep = -i64::try_from(self.max_entries).unwrap_or(i64::MAX);
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for session in &sessions {
            let key = history_key(session.session_id);
            let push = pipe.cmd("RPUSH").arg(&key);
            for entry in &session.encoded {
                push.arg(entry.as_slice());
            }
            pipe.cmd("LTRIM").arg(&key).arg(keep).arg(-1);
            pipe.cmd("EXPIRE").arg(&key).arg(self.ttl_s);
        }
        let mut connection = self.connection.clone();
        let replies: Vec<redis::RedisResult<redis::Value>> = pipe
            .query_async(&mut connection)
            .await
            .map_err(|source| HistoryError::Redis {
                operation: "RPUSH pipeline",
                key: format!("{} history lists", sessions.len()),
                source,
            })?;
        for (at, session) in sessions.into_iter().enumerate() {
            let SessionWrites {
                session_id,
                indices,
                ..
            } = session;
            let mut replies = replies.iter().skip(at * 3);
            if let Some(Err(source)) = replies.next() {
                let retry = !matches!(source.retry_method(), redis::RetryMethod::NoRetry);
                refusals.push(Refusal {
                    indices,
                    error: HistoryError::Redis {
                        operation: "RPUSH",
                        key: history_key(session_id),
                        source: source.clone(),
                    },
                    retry,
                });
                continue;
            }
            for (operation, reply) in ["LTRIM", "EXPIRE"].into_iter().zip(replies) {
                if let Err(error) = reply {
                    tracing::warn!(
                        session_id,
                        operation,
                        %error,
                        "history stored, but its list could not be trimmed or given its TTL"
                    );
                }
            }
        }
        Ok(refusals)
    }

    async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        let key = history_key(session_id);
        let from = -i64::try_from(limit).unwrap_or(i64::MAX);
        let mut connection = self.connection.clone();
        let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&key)
            .arg(from)
            .arg(-1)
            .query_async(&mut connection)
            .await
            .map_err(|source| HistoryError::Redis {
                operation: "LRANGE",
                key: key.clone(),
                source,
            })?;
        Ok(raw
            .iter()
            .filter_map(
                |bytes| match serde_json::from_slice::<HistoryEntry>(bytes) {
                    Ok(entry) => Some(entry.normalized()),
                    Err(error) => {
                        tracing::warn!(%key, %error, "skipping a history entry that is not one");
                        None
                    }
                },
            )
            .collect())
    }
}

/// The reference SDK's table, created as it creates it.
const CREATE_TABLE_SQL: &str = "
    CREATE TABLE IF NOT EXISTS gateway_session_messages (
        id BIGSERIAL PRIMARY KEY,
        session_id VARCHAR(128) NOT NULL,
        role VARCHAR(32) NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
        content TEXT NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}'::jsonb,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
    );
";

/// The reference SDK's index, serving the read below.
const CREATE_INDEX_SQL: &str = "
    CREATE INDEX IF NOT EXISTS idx_gateway_session_messages_session_created_at
    ON gateway_session_messages (session_id, created_at DESC, id DESC);
";

/// Serializes schema creation between processes: concurrent `CREATE TABLE
/// IF NOT EXISTS` can fail with a unique violation in `pg_type`.
const SCHEMA_LOCK_KEY: i64 = 0x6761_7465_7761_7968; // "gatewayh"

/// The reference's insert of one entry; used when a batch was refused, to
/// find the entries at fault.
const INSERT_ONE_SQL: &str = "
    INSERT INTO gateway_session_messages (session_id, role, content, metadata)
    VALUES ($1, $2, $3, $4)
";

/// A batch in one statement; `id` follows the batch order, so entries that
/// share a `created_at` (one transaction) still read back in order.
const INSERT_BATCH_SQL: &str = "
    INSERT INTO gateway_session_messages (session_id, role, content, metadata)
    SELECT session_id, role, content, metadata
    FROM unnest($1::varchar[], $2::varchar[], $3::text[], $4::jsonb[])
        WITH ORDINALITY AS batch (session_id, role, content, metadata, position)
    ORDER BY position
";

/// The reference's read: the newest first.
const SELECT_SQL: &str = "
    SELECT role, content, metadata
    FROM gateway_session_messages
    WHERE session_id = $1
    ORDER BY created_at DESC, id DESC
    LIMIT $2
";

/// The reference SDK's `gateway_session_messages` table behind a pool.
struct PostgresStore {
    /// Connections, opened on demand up to `history.postgres_pool`.
    pool: Pool,
    /// Whether the table and index are known to exist; reset when a
    /// statement finds the table missing.
    schema_ready: AtomicBool,
    /// One schema creation at a time in this process.
    schema_lock: tokio::sync::Mutex<()>,
}

/// TLS to PostgreSQL: the server's certificate checked against
/// `history.postgres_ca_file`, or the Mozilla roots without one.
fn postgres_tls(
    config: &HistoryConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, HistoryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match &config.postgres_ca_file {
        Some(path) => {
            let ca_error = |reason: String| HistoryError::PostgresCa {
                path: path.clone(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

impl PostgresStore {
    async fn connect(config: &HistoryConfig) -> Result<PostgresStore, HistoryError> {
        let dsn = config
            .postgres_dsn
            .as_deref()
            .filter(|dsn| !dsn.is_empty())
            .ok_or(HistoryError::MissingDsn)?;
        let mut pg: tokio_postgres::Config = dsn.parse().map_err(HistoryError::InvalidDsn)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("gatewayd");
        }
        let settings = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // `sslmode=require`: TLS, and the server's certificate checked
        // (stricter than libpq's require). Otherwise plain, as before.
        let manager = if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            Manager::from_config(pg, postgres_tls(config)?, settings)
        } else {
            Manager::from_config(pg, NoTls, settings)
        };
        let timeout = Some(config.write_timeout());
        let pool = Pool::builder(manager)
            .max_size(config.postgres_pool.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(HistoryError::Pool)?;
        let store = PostgresStore {
            pool,
            schema_ready: AtomicBool::new(false),
            schema_lock: tokio::sync::Mutex::new(()),
        };
        match tokio::time::timeout(config.write_timeout(), store.ensure_schema()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                %error,
                "history table not ready (is PostgreSQL up?); starting anyway: writes are retried, then dropped, reads give no history, until it is"
            ),
            Err(_) => tracing::warn!(
                timeout_ms = config.write_timeout_ms,
                "PostgreSQL did not answer in time; starting anyway (writes are retried, then dropped; reads give no history)"
            ),
        }
        Ok(store)
    }

    /// Creates the table and index if missing, once they are known to exist
    /// only again after a statement found the table gone.
    async fn ensure_schema(&self) -> Result<(), HistoryError> {
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.schema_lock.lock().await;
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let failed = |source| HistoryError::Postgres {
            operation: "create schema",
            context: "gateway_session_messages".into(),
            source,
        };
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|source| HistoryError::PostgresPool {
                operation: "create schema",
                context: "gateway_session_messages".into(),
                source,
            })?;
        let transaction = client.transaction().await.map_err(failed)?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .await
            .map_err(failed)?;
        transaction
            .batch_execute(CREATE_TABLE_SQL)
            .await
            .map_err(failed)?;
        transaction
            .batch_execute(CREATE_INDEX_SQL)
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        self.schema_ready.store(true, Ordering::Release);
        tracing::debug!("history table gateway_session_messages ready");
        Ok(())
    }

    /// Notes a missing table (dropped behind our back) so the next attempt
    /// creates it again.
    fn check_schema(&self, error: &HistoryError) {
        if error.sql_state() == Some("42P01") {
            self.schema_ready.store(false, Ordering::Release);
        }
    }

    async fn client(
        &self,
        operation: &'static str,
        context: impl FnOnce() -> String,
    ) -> Result<deadpool_postgres::Object, HistoryError> {
        self.pool
            .get()
            .await
            .map_err(|source| HistoryError::PostgresPool {
                operation,
                context: context(),
                source,
            })
    }

    /// One statement for the whole batch. When the server refuses the data
    /// (a NUL byte, an over-long session id), the entries are inserted one
    /// by one so that only the faulty ones are lost.
    async fn write(&self, records: &[Record]) -> Result<Vec<Refusal>, HistoryError> {
        self.ensure_schema().await?;
        let context = || format!("{} entries", records.len());
        let client = self.client("insert", context).await?;
        let sessions: Vec<&str> = records.iter().map(|r| &*r.session_id).collect();
        let roles: Vec<&str> = records.iter().map(|r| r.entry.role.as_str()).collect();
        let contents: Vec<&str> = records.iter().map(|r| r.entry.content.as_str()).collect();
        let metadata: Vec<Json<&Value>> = records.iter().map(|r| Json(&r.entry.metadata)).collect();
        let inserted = async {
            let statement = client.prepare_cached(INSERT_BATCH_SQL).await?;
            client
                .execute(&statement, &[&sessions, &roles, &contents, &metadata])
                .await
        }
        .await
        .map_err(|source| HistoryError::Postgres {
            operation: "insert",
            context: context(),
            source,
        });
        match inserted {
            Ok(_) => Ok(Vec::new()),
            Err(error) if error.is_refused_data() => {
                tracing::warn!(
                    entries = records.len(),
                    %error,
                    "history batch refused; inserting its entries one by one"
                );
                Ok(self.write_one_by_one(&client, records).await)
            }
            Err(error) => {
                self.check_schema(&error);
                Err(error)
            }
        }
    }

    /// Inserts in order; stops at the first failure that is not about the
    /// data, leaving it and the rest to be retried (so order holds).
    async fn write_one_by_one(
        &self,
        client: &deadpool_postgres::Object,
        records: &[Record],
    ) -> Vec<Refusal> {
        let mut refusals = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let inserted = async {
                let statement = client.prepare_cached(INSERT_ONE_SQL).await?;
                client
                    .execute(
                        &statement,
                        &[
                            &&*record.session_id,
                            &record.entry.role.as_str(),
                            &record.entry.content,
                            &Json(&record.entry.metadata),
                        ],
                    )
                    .await
            }
            .await
            .map_err(|source| HistoryError::Postgres {
                operation: "insert",
                context: format!("session {}", record.session_id),
                source,
            });
            match inserted {
                Ok(_) => {}
                Err(error) if error.is_refused_data() => refusals.push(Refusal {
                    indices: vec![index],
                    error,
                    retry: false,
                }),
                Err(error) => {
                    self.check_schema(&error);
                    refusals.push(Refusal {
                        indices: (index..records.len()).collect(),
                        error,
                        retry: true,
                    });
                    break;
                }
            }
        }
        refusals
    }

    async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.ensure_schema().await?;
        let context = || format!("session {session_id}");
        let client = self.client("select", context).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = async {
            let statement = client.prepare_cached(SELECT_SQL).await?;
            client.query(&statement, &[&session_id, &limit]).await
        }
        .await
        .map_err(|source| HistoryError::Postgres {
            operation: "select",
            context: context(),
            source,
        })
        .inspect_err(|error| self.check_schema(error))?;
        let mut entries = Vec::with_capacity(rows.len());
        // Newest first from the server; the reference returns oldest first.
        for row in rows.iter().rev() {
            let decoded = row
                .try_get::<_, String>("role")
                .and_then(|role| Ok((role, row.try_get::<_, String>("content")?)))
                .and_then(|(role, content)| {
                    let metadata = row.try_get::<_, Option<Json<Value>>>("metadata")?;
                    Ok((role, content, metadata))
                });
            let (role, content, metadata) = match decoded {
                Ok(columns) => columns,
                Err(source) => {
                    return Err(HistoryError::Postgres {
                        operation: "decode",
                        context: context(),
                        source,
                    });
                }
            };
            match role.parse::<Role>() {
                Ok(role) => entries.push(
                    HistoryEntry {
                        role,
                        content,
                        metadata: metadata.map_or(Value::Null, |Json(value)| value),
                    }
                    .normalized(),
                ),
                Err(error) => tracing::warn!(session_id, %error, "skipping a history row"),
            }
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_serialize_as_the_reference_stores_them() {
        let entry = HistoryEntry::new(Role::Assistant, "hi")
            .with_metadata(serde_json::json!({"trace_id": "t"}));
        assert_eq!(
            serde_json::to_string(&entry).unwrap(),
            r#"{"role":"assistant","content":"hi","metadata":{"trace_id":"t"}}"#
        );
        let read: HistoryEntry = serde_json::from_str(r#"{"role":"tool","content":"x"}"#).unwrap();
        assert_eq!(read, HistoryEntry::new(Role::Tool, "x"));
        let null: HistoryEntry =
            serde_json::from_str(r#"{"role":"user","content":"x","metadata":null}"#).unwrap();
        assert_eq!(null.normalized().metadata, serde_json::json!({}));
        assert!(serde_json::from_str::<HistoryEntry>(r#"{"role":"bot","content":"x"}"#).is_err());
    }

    #[test]
    fn roles_round_trip() {
        for role in [Role::User, Role::Assistant, Role::System, Role::Tool] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(
                serde_json::to_value(role).unwrap(),
                Value::String(role.to_string())
            );
        }
        assert_eq!("User".parse::<Role>(), Err(UnknownRole("User".into())));
    }

    #[test]
    fn the_key_is_in_the_session_namespace() {
        assert_eq!(history_key("s-1"), "byai_gateway:session:s-1:history");
    }

    #[test]
    fn log_lines_name_a_bounded_number_of_sessions() {
        let records: Vec<Record> = (0..15)
            .map(|i| Record {
                session_id: format!("s{i:02}").into(),
                entry: HistoryEntry::new(Role::User, "x"),
            })
            .collect();
        let all: Vec<usize> = (0..15).collect();
        assert_eq!(
            sessions_of(&records, &all),
            "s00,s01,s02,s03,s04,s05,s06,s07,s08,s09 and 5 more"
        );
        assert_eq!(sessions_of(&records, &[3, 3]), "s03");
    }

    #[tokio::test]
    async fn off_stores_nothing_and_reads_nothing() {
        let config = HistoryConfig {
            backend: HistoryBackend::Off,
            ..HistoryConfig::default()
        };
        let history = History::start(&config, "redis://unused").await.unwrap();
        history.record("s", HistoryEntry::new(Role::User, "hello"));
        assert!(history.recent("s", 10).await.is_empty());
        assert!(matches!(
            history.read("s", 10).await,
            Err(HistoryError::Off)
        ));
        assert_eq!(history.stats(), HistoryStats::default());
        history.close(Duration::from_secs(1)).await.unwrap();
    }
}
