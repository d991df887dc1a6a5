//! The event writer: every Redis write a task makes after it started — its
//! streamed events, the reply to a calling agent, the execution record, the
//! XACK — goes through here.
//!
//! Writes are queued on a few bounded lanes; each lane drains what has queued
//! up into one pipeline per round trip, so a chunk costs no round trip of its
//! own. A task's writes all go to the lane chosen by its session id, in the
//! order the task made them, so the terminal event is written before the XACK
//! that follows it. A failed pipeline is retried until it succeeds or the
//! daemon is force-stopped: delivery is at least once, never silently lost.

use redis::aio::ConnectionManager;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One Redis command the writer may issue.
#[derive(Debug)]
pub enum Write {
    /// XADD an event to a session data stream (`MAXLEN ~`), and refresh the
    /// stream's EXPIRE (once per pipeline per key).
    Event { stream: Arc<str>, data: String },
    /// XADD an entry with one `data` field to a control stream.
    Control { stream: String, data: String },
    /// XADD an entry with several fields (dead letters).
    Fields {
        stream: String,
        fields: Vec<(String, Vec<u8>)>,
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
}

/// A group of writes, applied in order, with an optional confirmation.
#[derive(Debug)]
struct Batch {
    writes: Vec<Write>,
    done: Option<oneshot::Sender<()>>,
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
}

impl Writer {
    /// Starts the lanes. They run until every `Writer` clone is dropped (then
    /// they drain what is queued) or `force_stop` fires (then they give up
    /// retrying and drop what is left; those entries stay pending).
    pub fn start(
        connection: ConnectionManager,
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
        (
            Writer {
                lanes: senders.into(),
                hasher: RandomState::new(),
            },
            handles,
        )
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
        self.lane(session_id)
            .send(Batch { writes, done: None })
            .await
            .map_err(|_| WriterClosed)
    }

    /// Queues writes and waits until Redis has applied them.
    pub async fn commit(&self, session_id: &str, writes: Vec<Write>) -> Result<(), WriterClosed> {
        let (tx, rx) = oneshot::channel();
        self.lane(session_id)
            .send(Batch {
                writes,
                done: Some(tx),
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
    connection: ConnectionManager,
    config: WriterConfig,
    /// Stops retrying during a forced shutdown.
    force_stop: CancellationToken,
}

impl Lane {
    async fn run(mut self, mut queue: mpsc::Receiver<Batch>) {
        let mut batches: Vec<Batch> = Vec::new();
        let mut expired: HashSet<Arc<str>> = HashSet::new();
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
            let pipeline = self.build(&batches, &mut expired);
            if !self.apply(&pipeline, writes).await {
                tracing::warn!(
                    lane = self.index,
                    writes,
                    "forced stop while Redis was failing; queued writes dropped, their entries stay pending"
                );
                return;
            }
            for batch in batches.drain(..) {
                if let Some(done) = batch.done {
                    let _ = done.send(());
                }
            }
        }
    }

    fn build(&self, batches: &[Batch], expired: &mut HashSet<Arc<str>>) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        expired.clear();
        for write in batches.iter().flat_map(|b| b.writes.iter()) {
            match write {
                Write::Event { stream, data } => {
                    let cmd = pipe.cmd("XADD").arg(&**stream);
                    if self.config.session_maxlen > 0 {
                        cmd.arg("MAXLEN").arg("~").arg(self.config.session_maxlen);
                    }
                    cmd.arg("*").arg("data").arg(data).ignore();
                    expired.insert(stream.clone());
                }
                Write::Control { stream, data } => {
                    pipe.cmd("XADD")
                        .arg(stream)
                        .arg("*")
                        .arg("data")
                        .arg(data)
                        .ignore();
                }
                Write::Fields { stream, fields } => {
                    let cmd = pipe.cmd("XADD").arg(stream).arg("*");
                    for (name, value) in fields {
                        cmd.arg(name).arg(value);
                    }
                    cmd.ignore();
                }
                Write::HashSet {
                    key,
                    field,
                    value,
                    ttl_s,
                } => {
                    pipe.cmd("HSET").arg(key).arg(field).arg(value).ignore();
                    pipe.cmd("EXPIRE").arg(key).arg(ttl_s).ignore();
                }
                Write::Command(cmd) => {
                    pipe.add_command(cmd.clone()).ignore();
                }
                Write::Ack {
                    stream,
                    group,
                    id,
                    delete,
                } => {
                    // Expire the streams touched so far before the ack, so
                    // everything a task wrote is durable when its entry is acked.
                    for key in expired.drain() {
                        pipe.cmd("EXPIRE")
                            .arg(&*key)
                            .arg(self.config.session_ttl_s)
                            .ignore();
                    }
                    pipe.cmd("XACK")
                        .arg(&**stream)
                        .arg(&**group)
                        .arg(id)
                        .ignore();
                    if *delete {
                        pipe.cmd("XDEL").arg(&**stream).arg(id).ignore();
                    }
                }
            }
        }
        for key in expired.drain() {
            pipe.cmd("EXPIRE")
                .arg(&*key)
                .arg(self.config.session_ttl_s)
                .ignore();
        }
        pipe
    }

    /// Applies a pipeline, retrying with backoff. False when a forced stop
    /// ended the retries.
    async fn apply(&mut self, pipeline: &redis::Pipeline, writes: usize) -> bool {
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            match pipeline.query_async::<()>(&mut self.connection).await {
                Ok(()) => return true,
                Err(error) if matches!(error.retry_method(), redis::RetryMethod::NoRetry) => {
                    // Redis ran every command and refused some (e.g. a key
                    // of the wrong type). Retrying cannot help; the rest of
                    // the pipeline has been applied.
                    tracing::error!(
                        lane = self.index,
                        writes,
                        %error,
                        "Redis rejected part of an event pipeline"
                    );
                    return true;
                }
                Err(error) => {
                    attempt += 1;
                    self.config
                        .metrics
                        .redis_error(crate::metrics::RedisOperation::Write);
                    tracing::warn!(
                        lane = self.index,
                        writes,
                        attempt,
                        %error,
                        "event pipeline failed; retrying"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.force_stop.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
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
