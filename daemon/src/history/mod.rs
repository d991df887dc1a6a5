//! Session history: the messages of a session (the user's requests, the
//! agents' replies), stored so that later tasks of the session can be given
//! the recent ones.
//!
//! This module owns the storage: the entry format, the two stores (a capped
//! list per session in Redis, or the reference SDK's PostgreSQL table
//! `gateway_session_messages`), the background writer and its counters —
//! the handle and the entry format here, the rest one file each
//! (`writer`, `redis_store`, `postgres_store`).
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

mod error;
mod postgres_store;
mod redis_store;
mod writer;

pub use error::HistoryError;

use crate::config::{HistoryBackend, HistoryConfig};
use byclaw_client::connection::Connection;
use byclaw_protocol::PREFIX;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use postgres_store::PostgresStore;
use redis_store::RedisStore;
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
use writer::{Refusal, Writer};

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

/// A session's newest entries as JSON, oldest first, ready to be
/// injected as `extra_payload.history` (see [`History::recent_json`]).
#[derive(Debug, Default)]
pub struct RecentJson {
    /// Each entry's JSON object: `role`, `content`, `metadata` (`{}` when
    /// it had none).
    entries: Vec<String>,
}

impl RecentJson {
    /// Leaves out the entries saved for message `message_id` (a run after
    /// another: the first run saved its message already). Parses each
    /// entry; reruns are rare.
    pub fn without_message(&mut self, message_id: &str) {
        self.entries.retain(|entry| {
            serde_json::from_str::<Value>(entry).ok().and_then(|entry| {
                entry
                    .get("metadata")
                    .and_then(|m| m.get("message_id"))
                    .map(|id| id == message_id)
            }) != Some(true)
        });
    }

    /// The entries as one JSON array.
    pub fn to_json(&self) -> Box<serde_json::value::RawValue> {
        let mut array =
            String::with_capacity(2 + self.entries.iter().map(|e| e.len() + 1).sum::<usize>());
        array.push('[');
        for (n, entry) in self.entries.iter().enumerate() {
            if n > 0 {
                array.push(',');
            }
            array.push_str(entry);
        }
        array.push(']');
        serde_json::value::RawValue::from_string(array)
            .expect("a JSON array of JSON objects is JSON")
    }
}

/// A stored entry, borrowed from its JSON: checked to be an entry without
/// building its metadata.
#[derive(Deserialize)]
struct StoredEntry<'a> {
    role: Role,
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
    /// `None` when missing or `null`.
    #[serde(default, borrow)]
    metadata: Option<&'a serde_json::value::RawValue>,
}

/// An entry as injected: `metadata` is `{}` when it had none.
#[derive(Serialize)]
struct InjectedEntry<'a> {
    role: Role,
    content: &'a str,
    metadata: &'a serde_json::value::RawValue,
}

/// One stored entry's JSON, normalized for injection; `Err` when it is not
/// an entry.
fn injected_entry(stored: &[u8]) -> Result<String, serde_json::Error> {
    /// The metadata of an entry that has none, checked once.
    static EMPTY: std::sync::LazyLock<&'static serde_json::value::RawValue> =
        std::sync::LazyLock::new(|| serde_json::from_str("{}").expect("{} is JSON"));
    let entry: StoredEntry<'_> = serde_json::from_slice(stored)?;
    serde_json::to_string(&InjectedEntry {
        role: entry.role,
        content: &entry.content,
        metadata: entry.metadata.unwrap_or(*EMPTY),
    })
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

impl Handle {
    /// `read` within `history.read_timeout`; a failure or a timeout is
    /// counted.
    async fn timed_read<T>(
        &self,
        session_id: &str,
        read: impl std::future::Future<Output = Result<T, HistoryError>>,
    ) -> Result<T, HistoryError> {
        let result = match tokio::time::timeout(self.read_timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(HistoryError::Timeout {
                operation: "read",
                context: format!("session {session_id}"),
                after: self.read_timeout,
            }),
        };
        if result.is_err() {
            Counters::add(&self.shared.counters.read_failures, 1);
        }
        result
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

    /// [`History::recent`] as JSON, for injecting into a task: the entries
    /// as a JSON array, each checked to be an entry and normalized as
    /// `recent` does, without building a tree of them (from Redis, each
    /// entry's text is copied as it is stored, its metadata untouched).
    /// Never fails; empty when history is off or cannot be read.
    pub async fn recent_json(&self, session_id: &str, limit: usize) -> RecentJson {
        let Some(handle) = &self.inner else {
            return RecentJson::default();
        };
        if limit == 0 {
            return RecentJson::default();
        }
        let result = handle
            .timed_read(session_id, handle.shared.store.read_json(session_id, limit))
            .await;
        match result {
            Ok(entries) => RecentJson { entries },
            Err(error) => {
                tracing::warn!(session_id, limit, %error, "history read failed; going on without history");
                RecentJson::default()
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
        handle
            .timed_read(session_id, handle.shared.store.read(session_id, limit))
            .await
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

    /// [`Store::read`], each entry as injected JSON.
    async fn read_json(&self, session_id: &str, limit: usize) -> Result<Vec<String>, HistoryError> {
        match self {
            Store::Redis(store) => store.read_json(session_id, limit).await,
            Store::Postgres(store) => Ok(store
                .read(session_id, limit)
                .await?
                .iter()
                .map(|entry| serde_json::to_string(entry).expect("history entries serialize"))
                .collect()),
        }
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
    fn injected_json_is_what_the_parsed_entries_would_serialize_to() {
        // Each stored form (compact, spaced, escaped, extra fields, no or
        // null metadata) injected from its text equals the entry parsed,
        // normalized and serialized — the path this replaces.
        let stored = [
            r#"{"role":"user","content":"hi","metadata":{"message_id":"m1","trace_id":"t"}}"#,
            r#"{"role": "assistant", "content": "a \"quoted\"\nline \u00e9", "metadata": {"n": [1, 2]}}"#,
            r#"{"role":"tool","content":"x"}"#,
            r#"{"role":"system","content":"y","metadata":null,"timestamp":17}"#,
        ];
        for text in stored {
            let injected: Value =
                serde_json::from_str(&injected_entry(text.as_bytes()).unwrap()).unwrap();
            let parsed: HistoryEntry = serde_json::from_str(text).unwrap();
            assert_eq!(
                injected,
                serde_json::to_value(parsed.normalized()).unwrap(),
                "{text}"
            );
        }
        // Not entries: skipped, as the parsed path skips them.
        for text in [
            r#"{"role":"bot","content":"x"}"#,
            r#"{"content":"x"}"#,
            "[1]",
            "not json",
        ] {
            assert!(injected_entry(text.as_bytes()).is_err(), "{text}");
        }

        let mut recent = RecentJson {
            entries: stored
                .iter()
                .map(|text| injected_entry(text.as_bytes()).unwrap())
                .collect(),
        };
        let array: Value = serde_json::from_str(recent.to_json().get()).unwrap();
        assert_eq!(array.as_array().unwrap().len(), 4);
        recent.without_message("m1");
        let array: Value = serde_json::from_str(recent.to_json().get()).unwrap();
        assert_eq!(array.as_array().unwrap().len(), 3);
        assert_eq!(array[0]["role"], "assistant");
        assert_eq!(RecentJson::default().to_json().get(), "[]");
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
