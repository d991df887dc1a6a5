//! The event writer: every Redis write a task makes after it started — its
//! streamed events, the reply to a calling agent, the execution record, the
//! XACK — goes through here.
//!
//! Writes are queued on a few bounded lanes; each lane drains what has queued
//! up into one pipeline per round trip, so a chunk costs no round trip of its
//! own. A task's writes all go to the lane chosen by its session id, in the
//! order the task made them, so the terminal event is written before the XACK
//! that follows it.
//!
//! Each pipeline is one MULTI/EXEC transaction: Redis applies all of it or,
//! when it refuses it (out of memory under `noeviction`, a read-only replica,
//! loading), none of it — an XACK never lands while the events before it were
//! refused. A refused or unsent pipeline is retried until Redis takes it or
//! the daemon is force-stopped: delivery is at least once, never silently
//! lost. A task's final writes are one [`Write::Owned`] group, applied only
//! while the task's worker still holds the entry (see [`OWNED_BATCH`]).
//!
//! What is queued is bounded twice: in batches per lane, and in bytes for
//! the whole writer (`streams.writer_queue_bytes`). A batch holds its bytes
//! from the moment it is queued until Redis applied it; past the bound,
//! whoever writes waits — a guest emitting big events as fast as it can is
//! slowed to Redis' pace instead of growing the daemon.

use byclaw_client::connection::Connection;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One Redis command the writer may issue.
#[derive(Debug)]
pub enum Write {
    /// XADD an event to a session data stream (`MAXLEN ~`), and, when
    /// `refresh_ttl`, refresh the stream's EXPIRE (once per pipeline per
    /// key, before the next XACK). A task refreshes it with its first event,
    /// then at most once per half TTL, and with its final writes (see
    /// `TaskLink::pace_ttl`), not with every batch of events.
    Event {
        stream: Arc<str>,
        data: String,
        refresh_ttl: bool,
    },
    /// XADD an entry with one `data` field to a control stream.
    Control { stream: String, data: String },
    /// XADD an entry with several fields (dead letters, forwarded
    /// replies), trimmed to about `maxlen` entries when that is not 0.
    Fields {
        stream: String,
        fields: Vec<(String, Vec<u8>)>,
        maxlen: u64,
    },
    /// HSET one field and EXPIRE the hash (session registry).
    HashSet {
        key: String,
        field: String,
        value: String,
        ttl_s: u64,
    },
    /// Any other command (routes, group counters, cancels); its reply is
    /// ignored.
    Command(redis::Cmd),
    /// XACK an entry and, when configured, XDEL it.
    Ack {
        stream: Arc<str>,
        group: Arc<str>,
        id: String,
        delete: bool,
    },
    /// Writes applied only while `consumer` still holds entry `id` of
    /// `stream` in `group` — the task's lease — all of them or none (one
    /// script). A task's final writes go this way, so a worker whose entry
    /// another worker took over writes no terminal state and no XACK.
    Owned { lease: Lease, writes: Vec<Write> },
}

/// A pending entry as one consumer holds it.
#[derive(Debug, Clone)]
pub struct Lease {
    pub stream: Arc<str>,
    pub group: Arc<str>,
    pub consumer: Arc<str>,
    pub id: String,
}

/// How a committed batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Redis applied every write.
    Applied,
    /// An [`Write::Owned`] group was not applied: another consumer holds
    /// the entry now. The batch's other writes were applied.
    NotOwner,
    /// An [`Write::Owned`] group was not applied: the entry is no longer
    /// pending (acknowledged — by another worker, or by this batch on an
    /// earlier try whose reply was lost). The other writes were applied.
    Gone,
}

/// Applies the commands in ARGV (each as its word count, then its words)
/// only while consumer `ARGV[2]` holds entry `ARGV[3]` of stream `KEYS[1]` in
/// group `ARGV[1]`. 1 when applied, 0 when another consumer holds it, -1 when
/// it is not pending. The shebang makes Redis refuse the whole script when
/// it is out of memory, rather than fail half way.
pub const OWNED_BATCH: &str = r#"#!lua
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 then return -1 end
if p[1][2] ~= ARGV[2] then return 0 end
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return 1
"#;

impl Write {
    /// About how many bytes it holds (its keys and values), for the
    /// writer's byte bound.
    fn bytes(&self) -> usize {
        match self {
            Write::Event { stream, data, .. } => stream.len() + data.len(),
            Write::Control { stream, data } => stream.len() + data.len(),
            Write::Fields { stream, fields, .. } => {
                stream.len()
                    + fields
                        .iter()
                        .map(|(name, value)| name.len() + value.len())
                        .sum::<usize>()
            }
            Write::HashSet {
                key, field, value, ..
            } => key.len() + field.len() + value.len(),
            Write::Command(cmd) => cmd
                .args_iter()
                .map(|arg| match arg {
                    redis::Arg::Simple(bytes) => bytes.len(),
                    _ => 8,
                })
                .sum(),
            Write::Ack { stream, id, .. } => stream.len() + id.len(),
            Write::Owned { lease, writes } => {
                lease.stream.len() + lease.id.len() + writes.iter().map(Write::bytes).sum::<usize>()
            }
        }
    }
}

/// A group of writes, applied in order, with an optional confirmation.
#[derive(Debug)]
struct Batch {
    writes: Vec<Write>,
    done: Option<oneshot::Sender<Committed>>,
    /// Its share of the writer's byte bound, given back when the batch is
    /// dropped (applied, or dropped at a forced stop).
    _bytes: OwnedSemaphorePermit,
}

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Number of lanes (concurrent pipelines).
    pub lanes: usize,
    /// Capacity of each lane's queue, in batches.
    pub queue: usize,
    /// Most writes put into one pipeline.
    pub max_batch: usize,
    /// Most bytes queued or in flight, all lanes together.
    pub queue_bytes: usize,
    /// `MAXLEN ~` of session data streams; 0 disables trimming.
    pub session_maxlen: u64,
    /// EXPIRE of session data streams, seconds.
    pub session_ttl_s: u64,
    /// Counts failed pipelines.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Error returned when the writer has stopped and cannot take more writes.
#[derive(Debug, thiserror::Error)]
#[error("the event writer has stopped")]
pub struct WriterClosed;

/// Handle to the writer; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    /// One queue per lane.
    lanes: Arc<[mpsc::Sender<Batch>]>,
    /// Picks the lane for a session.
    hasher: RandomState,
    /// One permit per byte queued or in flight (`queue_bytes` in all).
    bytes: Arc<Semaphore>,
    /// `queue_bytes`: a batch bigger than this takes all of it.
    queue_bytes: u32,
    /// The session streams' EXPIRE, for tasks pacing their refreshes.
    session_ttl: Duration,
}

impl Writer {
    /// Starts the lanes. They run until every `Writer` clone is dropped (then
    /// they drain what is queued) or `force_stop` fires (then they give up
    /// retrying and drop what is left; those entries stay pending).
    pub fn start(
        connection: Connection,
        config: WriterConfig,
        force_stop: CancellationToken,
    ) -> (Self, Vec<tokio::task::JoinHandle<()>>) {
        let mut senders = Vec::with_capacity(config.lanes.max(1));
        let mut handles = Vec::new();
        for lane in 0..config.lanes.max(1) {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            senders.push(tx);
            let lane_task = Lane {
                index: lane,
                connection: connection.clone(),
                config: config.clone(),
                force_stop: force_stop.clone(),
            };
            handles.push(tokio::spawn(lane_task.run(rx)));
        }
        let queue_bytes = u32::try_from(config.queue_bytes.max(1)).unwrap_or(u32::MAX);
        (
            Writer {
                lanes: senders.into(),
                hasher: RandomState::new(),
                bytes: Arc::new(Semaphore::new(queue_bytes as usize)),
                queue_bytes,
                session_ttl: Duration::from_secs(config.session_ttl_s),
            },
            handles,
        )
    }

    /// The EXPIRE given to session data streams.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// Bytes queued or in flight now.
    pub fn queued_bytes(&self) -> usize {
        self.queue_bytes as usize - self.bytes.available_permits()
    }

    /// Waits until `writes` fit under the byte bound; their share.
    async fn reserve(&self, writes: &[Write]) -> Result<OwnedSemaphorePermit, WriterClosed> {
        let bytes = writes.iter().map(Write::bytes).sum::<usize>().max(1);
        let share = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .min(self.queue_bytes);
        self.bytes
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(|_| WriterClosed)
    }

    fn lane(&self, session_id: &str) -> &mpsc::Sender<Batch> {
        let index = if self.lanes.len() == 1 {
            0
        } else {
            (self.hasher.hash_one(session_id) % self.lanes.len() as u64) as usize
        };
        &self.lanes[index]
    }

    /// Queues writes for a session, waiting while its lane is full.
    pub async fn send(&self, session_id: &str, writes: Vec<Write>) -> Result<(), WriterClosed> {
        let bytes = self.reserve(&writes).await?;
        self.lane(session_id)
            .send(Batch {
                writes,
                done: None,
                _bytes: bytes,
            })
            .await
            .map_err(|_| WriterClosed)
    }

    /// Queues writes and waits until Redis has applied them (or refused
    /// their fenced part).
    pub async fn commit(
        &self,
        session_id: &str,
        writes: Vec<Write>,
    ) -> Result<Committed, WriterClosed> {
        let (tx, rx) = oneshot::channel();
        let bytes = self.reserve(&writes).await?;
        self.lane(session_id)
            .send(Batch {
                writes,
                done: Some(tx),
                _bytes: bytes,
            })
            .await
            .map_err(|_| WriterClosed)?;
        rx.await.map_err(|_| WriterClosed)
    }
}

/// One lane: a queue drained into pipelines.
struct Lane {
    /// For logs.
    index: usize,
    /// Multiplexed; lanes share it and their pipelines interleave.
    connection: Connection,
    config: WriterConfig,
    /// Stops retrying during a forced shutdown.
    force_stop: CancellationToken,
}

impl Lane {
    async fn run(mut self, mut queue: mpsc::Receiver<Batch>) {
        let mut batches: Vec<Batch> = Vec::new();
        loop {
            batches.clear();
            let Some(first) = queue.recv().await else {
                tracing::debug!(lane = self.index, "event writer lane drained");
                return;
            };
            let mut writes = first.writes.len();
            batches.push(first);
            while writes < self.config.max_batch {
                match queue.try_recv() {
                    Ok(batch) => {
                        writes += batch.writes.len();
                        batches.push(batch);
                    }
                    Err(_) => break,
                }
            }
            let (pipeline, owned_in) = self.build(&batches);
            let Some(owned_results) = self.apply(&pipeline, writes).await else {
                tracing::warn!(
                    lane = self.index,
                    writes,
                    "forced stop while Redis was failing; queued writes dropped, their entries stay pending"
                );
                return;
            };
            let mut outcomes = vec![Committed::Applied; batches.len()];
            for (batch, outcome) in owned_in.iter().zip(owned_results) {
                if outcome != Committed::Applied {
                    outcomes[*batch] = outcome;
                }
            }
            for (batch, outcome) in batches.drain(..).zip(outcomes) {
                if let Some(done) = batch.done {
                    let _ = done.send(outcome);
                }
            }
        }
    }

    /// One MULTI/EXEC pipeline of the batches — Redis applies all of it or,
    /// when it refuses the transaction, none — and for each owned group
    /// (whose reply is read) the batch it belongs to.
    fn build(&self, batches: &[Batch]) -> (redis::Pipeline, Vec<usize>) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut owned_in = Vec::new();
        let mut expire: HashSet<Arc<str>> = HashSet::new();
        for (index, batch) in batches.iter().enumerate() {
            for write in &batch.writes {
                if let Write::Owned { lease, writes } = write {
                    pipe.add_command(self.owned(lease, writes));
                    owned_in.push(index);
                    continue;
                }
                for cmd in self.commands(write, &mut expire) {
                    pipe.add_command(cmd).ignore();
                }
            }
        }
        for cmd in self.expire_all(&mut expire) {
            pipe.add_command(cmd).ignore();
        }
        (pipe, owned_in)
    }

    /// The script applying `writes` only while the lease is held.
    fn owned(&self, lease: &Lease, writes: &[Write]) -> redis::Cmd {
        let mut expire = HashSet::new();
        let mut commands = Vec::new();
        for write in writes {
            commands.extend(self.commands(write, &mut expire));
        }
        commands.extend(self.expire_all(&mut expire));
        let mut eval = redis::cmd("EVAL");
        eval.arg(OWNED_BATCH)
            .arg(1)
            .arg(&*lease.stream)
            .arg(&*lease.group)
            .arg(&*lease.consumer)
            .arg(&lease.id);
        for cmd in &commands {
            let words: Vec<&[u8]> = cmd
                .args_iter()
                .filter_map(|arg| match arg {
                    redis::Arg::Simple(bytes) => Some(bytes),
                    // Only scan commands have a cursor; none is written here.
                    _ => None,
                })
                .collect();
            eval.arg(words.len());
            for word in words {
                eval.arg(word);
            }
        }
        eval
    }

    /// The commands of one write. Session streams touched are collected in
    /// `expire`; their EXPIRE goes before the next XACK (so everything a
    /// task wrote is durable, TTL included, when its entry is acked) or at
    /// the end.
    fn commands(&self, write: &Write, expire: &mut HashSet<Arc<str>>) -> Vec<redis::Cmd> {
        match write {
            Write::Event {
                stream,
                data,
                refresh_ttl,
            } => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(&**stream);
                if self.config.session_maxlen > 0 {
                    cmd.arg("MAXLEN").arg("~").arg(self.config.session_maxlen);
                }
                cmd.arg("*").arg("data").arg(data);
                if *refresh_ttl {
                    expire.insert(stream.clone());
                }
                vec![cmd]
            }
            Write::Control { stream, data } => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream).arg("*").arg("data").arg(data);
                vec![cmd]
            }
            Write::Fields {
                stream,
                fields,
                maxlen,
            } => {
                let mut cmd = redis::cmd("XADD");
                cmd.arg(stream);
                if *maxlen > 0 {
                    cmd.arg("MAXLEN").arg("~").arg(*maxlen);
                }
                cmd.arg("*");
                for (name, value) in fields {
                    cmd.arg(name).arg(value);
                }
                vec![cmd]
            }
            Write::HashSet {
                key,
                field,
                value,
                ttl_s,
            } => {
                let mut hset = redis::cmd("HSET");
                hset.arg(key).arg(field).arg(value);
                let mut ttl = redis::cmd("EXPIRE");
                ttl.arg(key).arg(ttl_s);
                vec![hset, ttl]
            }
            Write::Command(cmd) => vec![cmd.clone()],
            Write::Ack {
                stream,
                group,
                id,
                delete,
            } => {
                let mut commands = self.expire_all(expire);
                let mut ack = redis::cmd("XACK");
                ack.arg(&**stream).arg(&**group).arg(id);
                commands.push(ack);
                if *delete {
                    let mut del = redis::cmd("XDEL");
                    del.arg(&**stream).arg(id);
                    commands.push(del);
                }
                commands
            }
            Write::Owned { writes, .. } => {
                // Only a top-level group is checked on its own; nested, its
                // writes join the enclosing group.
                writes
                    .iter()
                    .flat_map(|w| self.commands(w, expire))
                    .collect()
            }
        }
    }

    fn expire_all(&self, expire: &mut HashSet<Arc<str>>) -> Vec<redis::Cmd> {
        expire
            .drain()
            .map(|key| {
                let mut cmd = redis::cmd("EXPIRE");
                cmd.arg(&*key).arg(self.config.session_ttl_s);
                cmd
            })
            .collect()
    }

    /// Applies a pipeline, retrying with backoff while Redis cannot take
    /// it. Returns how each owned group went, or `None` when a forced stop
    /// ended the retries.
    async fn apply(&mut self, pipeline: &redis::Pipeline, writes: usize) -> Option<Vec<Committed>> {
        let mut backoff =
            crate::retry::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut attempt = 0u32;
        loop {
            let error = match pipeline
                .query_async::<Vec<redis::Value>>(&mut self.connection)
                .await
            {
                Ok(replies) => {
                    return Some(
                        replies
                            .iter()
                            .map(|reply| match reply {
                                redis::Value::Int(0) => Committed::NotOwner,
                                redis::Value::Int(-1) => Committed::Gone,
                                _ => Committed::Applied,
                            })
                            .collect(),
                    );
                }
                Err(error) => error,
            };
            if !refused_whole(&error) {
                // Redis ran the transaction and one command failed in it
                // (e.g. a key of the wrong type): the others are applied,
                // retrying cannot help.
                tracing::error!(
                    lane = self.index,
                    writes,
                    %error,
                    "Redis rejected part of an event pipeline"
                );
                return Some(Vec::new());
            }
            attempt += 1;
            self.config.metrics.emit(crate::metrics::PipelineRefused {
                lane: self.index,
                writes,
                attempt,
                error: &error,
            });
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_wait()) => {}
                _ = self.force_stop.cancelled() => return None,
            }
        }
    }
}

/// Whether Redis refused a transaction (or a script in it) rather than
/// failed a command it ran: it could not be sent or answered, or Redis
/// refused it for now (out of memory, a read-only replica, loading, a
/// failover in progress). Such a pipeline is retried; what of it was
/// applied is applied again (XACK, XDEL, EXPIRE and the scripts' checks make
/// that harmless; an event may repeat, never go missing). A command that
/// failed on its own (a key of the wrong type) is not retried.
pub fn refused_whole(error: &redis::RedisError) -> bool {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return true;
    }
    let refusal = |code: &str| {
        matches!(
            code,
            "OOM"
                | "EXECABORT"
                | "READONLY"
                | "LOADING"
                | "BUSY"
                | "MASTERDOWN"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "NOREPLICAS"
                | "MISCONF"
        )
    };
    if error.code().is_some_and(refusal) {
        return true;
    }
    // Errors inside EXEC come as a list, one per failed command.
    if let Some(errors) = error.clone().into_server_errors()
        && errors.iter().any(|(_, error)| refusal(error.code()))
    {
        return true;
    }
    !matches!(error.retry_method(), redis::RetryMethod::NoRetry)
}

impl From<byclaw_protocol::FinishedRecord> for Write {
    fn from(record: byclaw_protocol::FinishedRecord) -> Self {
        Write::HashSet {
            key: record.key,
            field: record.field,
            value: record.value,
            ttl_s: record.ttl_s,
        }
    }
}
