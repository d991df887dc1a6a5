//! The session registry hash (`exec:{id}` → execution JSON,
//! `msg_map:{message}` → execution id) as the reference SDK keeps it:
//! replay protection for redelivered entries, where a client finds which
//! worker runs a task, and the reference client's cancel — each one Lua
//! script, so one round trip and atomic.

use crate::event::state;
use crate::ids::{new_execution_id, now_ms};
use crate::keys;
use redis::aio::ConnectionLike;
use serde::{Deserialize, Serialize};

/// The execution record kept in the session registry hash (`exec:{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execution {
    pub execution_id: String,
    pub message_id: String,
    pub session_id: String,
    pub worker_id: String,
    pub target_agent_type: String,
    pub stream_name: String,
    pub redis_message_id: String,
    pub status: String,
    pub cancel_requested: bool,
    pub cancel_reason: String,
    pub created_at: u64,
    pub started_at: u64,
    pub finished_at: u64,
    pub updated_at: u64,
    /// SHA-256 (hex) of the plugin file the task first ran on: a run after
    /// a crash on other code fails instead of mixing code and journal.
    /// Ours; the reference keeps a record's unknown fields.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin_sha256: String,
    /// The seed of the random numbers its guests get, the same on every
    /// run of the task. Ours, as `plugin_sha256`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub random_seed: String,
    /// The tenant the task runs for (`header.tenant_id`), always written
    /// (even empty): a reply journaled for the task must carry the same.
    /// Ours, as `plugin_sha256`; a record without it checks nothing.
    #[serde(default)]
    pub tenant_id: String,
}

/// Looks up the execution of a message and, unless it is terminal or runs
/// from another stream entry, records this worker as running it — in one
/// round trip.
///
/// An execution that is not finished and was started from another entry
/// (another stream, or another entry id) is left alone: the same message
/// sent twice — a caller run again after its daemon died sends its calls
/// again under the same ids — runs once, from the entry that started it
/// (taken over from a dead worker, that entry keeps its id).
///
/// KEYS[1] registry hash. ARGV: message id, new execution id, new execution
/// JSON, worker id, stream, entry id, now (ms), ttl (s).
/// Returns {"terminal", exec_id, status} | {"elsewhere", exec_id, entry} |
/// {"taken", exec_id, json} | {"new", exec_id}.
const BEGIN_SCRIPT: &str = r#"
local exec_id = redis.call('HGET', KEYS[1], 'msg_map:' .. ARGV[1])
if exec_id then
  local raw = redis.call('HGET', KEYS[1], 'exec:' .. exec_id)
  if raw then
    local ok, ex = pcall(cjson.decode, raw)
    if ok and type(ex) == 'table' then
      local status = ex['status']
      if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then
        return {'terminal', exec_id, status}
      end
      local entry = ex['redis_message_id']
      local stream = ex['stream_name']
      if (type(entry) == 'string' and entry ~= '' and entry ~= ARGV[6])
        or (type(stream) == 'string' and stream ~= '' and stream ~= ARGV[5]) then
        return {'elsewhere', exec_id, tostring(stream) .. ' ' .. tostring(entry)}
      end
      ex['worker_id'] = ARGV[4]
      ex['stream_name'] = ARGV[5]
      ex['redis_message_id'] = ARGV[6]
      if ex['status'] ~= 'CANCELLING' then ex['status'] = 'RUNNING' end
      ex['started_at'] = tonumber(ARGV[7])
      ex['updated_at'] = tonumber(ARGV[7])
      local encoded = cjson.encode(ex)
      redis.call('HSET', KEYS[1], 'exec:' .. exec_id, encoded)
      redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
      return {'taken', exec_id, encoded}
    end
  end
end
redis.call('HSET', KEYS[1], 'exec:' .. ARGV[2], ARGV[3], 'msg_map:' .. ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
return {'new', ARGV[2]}
"#;

/// Marks the execution of a message FAILED unless it is already terminal.
/// KEYS[1] registry hash. ARGV: message id, now (ms), ttl (s).
const FAIL_SCRIPT: &str = r#"
local exec_id = redis.call('HGET', KEYS[1], 'msg_map:' .. ARGV[1])
if not exec_id then return 0 end
local raw = redis.call('HGET', KEYS[1], 'exec:' .. exec_id)
if not raw then return 0 end
local ok, ex = pcall(cjson.decode, raw)
if not ok or type(ex) ~= 'table' then return 0 end
if ex['status'] == 'COMPLETED' or ex['status'] == 'FAILED' or ex['status'] == 'CANCELLED' then return 0 end
ex['status'] = 'FAILED'
ex['finished_at'] = tonumber(ARGV[2])
ex['updated_at'] = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'exec:' .. exec_id, cjson.encode(ex))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"#;

/// The reference client's cancel, atomically: looks the execution of a
/// message up and, unless it is finished, marks it CANCELLING. With a
/// placeholder (ARGV 6-7 non-empty) a message that has no execution yet gets
/// a CANCELLED record, so it is skipped when it is read.
///
/// KEYS[1] registry hash. ARGV: message id, session id, reason, now (ms),
/// ttl (s), placeholder execution id, placeholder JSON.
/// Returns {"not_found"} | {"precancelled", exec_id} |
/// {"session_mismatch", exec_id, worker} | {"finished", exec_id, worker, status} |
/// {"requested", exec_id, worker, target_agent_type}.
const CANCEL_SCRIPT: &str = r#"
local exec_id = redis.call('HGET', KEYS[1], 'msg_map:' .. ARGV[1])
if not exec_id then
  if ARGV[7] == '' then return {'not_found'} end
  redis.call('HSET', KEYS[1], 'exec:' .. ARGV[6], ARGV[7], 'msg_map:' .. ARGV[1], ARGV[6])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
  return {'precancelled', ARGV[6]}
end
local raw = redis.call('HGET', KEYS[1], 'exec:' .. exec_id)
if not raw then return {'not_found'} end
local ok, ex = pcall(cjson.decode, raw)
if not ok or type(ex) ~= 'table' then return {'not_found'} end
local worker = ex['worker_id']
if type(worker) ~= 'string' then worker = '' end
if type(ex['session_id']) == 'string' and ex['session_id'] ~= ARGV[2] then
  return {'session_mismatch', exec_id, worker}
end
local status = ex['status']
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then
  return {'finished', exec_id, worker, status}
end
ex['status'] = 'CANCELLING'
ex['cancel_requested'] = true
ex['cancel_reason'] = ARGV[3]
ex['updated_at'] = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'exec:' .. exec_id, cjson.encode(ex))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
local target = ex['target_agent_type']
if type(target) ~= 'string' then target = '' end
return {'requested', exec_id, worker, target}
"#;

/// What a cancel lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelLookup {
    /// No execution for the message (and none was created).
    NotFound,
    /// The message had not started; a CANCELLED record now stops it.
    Precancelled { execution_id: String },
    /// The execution belongs to another session.
    SessionMismatch {
        execution_id: String,
        worker_id: String,
    },
    /// Already COMPLETED / FAILED / CANCELLED.
    AlreadyFinished {
        execution_id: String,
        worker_id: String,
        status: String,
    },
    /// Marked CANCELLING; send CANCEL_TASK to the worker.
    Requested {
        execution_id: String,
        worker_id: String,
        target_agent_type: String,
    },
}

/// What to do with an entry, given its execution record.
#[derive(Debug)]
pub enum Begin {
    /// Already finished (a redelivery): ack and skip.
    Terminal {
        execution_id: String,
        status: String,
    },
    /// The message runs (or ran until its worker died) from another stream
    /// entry: this entry is a copy (the message sent again); ack and skip.
    Elsewhere {
        execution_id: String,
        /// The stream and entry id it runs from.
        entry: String,
    },
    /// Run it; the record now names this worker.
    Run {
        execution: Box<Execution>,
        /// The execution existed, unfinished: this is a run after another
        /// (a worker died or lost the entry). The task's journal and the
        /// events it emitted before count.
        rerun: bool,
    },
}

/// The session registry's operations. Scripts are loaded once; `Script`
/// sends EVALSHA and falls back to EVAL.
pub struct Executions {
    script: redis::Script,
    fail_script: redis::Script,
    cancel_script: redis::Script,
    ttl_s: u64,
}

/// Everything `begin` needs to write a new record.
#[derive(Debug, Clone, Copy)]
pub struct NewExecution<'a> {
    pub message_id: &'a str,
    pub session_id: &'a str,
    pub worker_id: &'a str,
    pub target_agent_type: &'a str,
    pub stream_name: &'a str,
    pub redis_message_id: &'a str,
    /// SHA-256 (hex) of the plugin that will run it ('' when none serves it).
    pub plugin_sha256: &'a str,
    /// A new seed, kept when the task is new (see `Execution::random_seed`).
    pub random_seed: &'a str,
    /// The tenant of the message (see `Execution::tenant_id`).
    pub tenant_id: &'a str,
}

impl Executions {
    pub fn new(ttl_s: u64) -> Self {
        Executions {
            script: redis::Script::new(BEGIN_SCRIPT),
            fail_script: redis::Script::new(FAIL_SCRIPT),
            cancel_script: redis::Script::new(CANCEL_SCRIPT),
            ttl_s,
        }
    }

    /// Replay check plus RUNNING record, one round trip.
    pub async fn begin(
        &self,
        conn: &mut impl ConnectionLike,
        new: NewExecution<'_>,
    ) -> Result<Begin, redis::RedisError> {
        let now = now_ms();
        let execution = Execution {
            execution_id: new_execution_id(),
            message_id: new.message_id.to_owned(),
            session_id: new.session_id.to_owned(),
            worker_id: new.worker_id.to_owned(),
            target_agent_type: new.target_agent_type.to_owned(),
            stream_name: new.stream_name.to_owned(),
            redis_message_id: new.redis_message_id.to_owned(),
            status: "RUNNING".to_owned(),
            cancel_requested: false,
            cancel_reason: String::new(),
            created_at: now,
            started_at: now,
            finished_at: 0,
            updated_at: now,
            plugin_sha256: new.plugin_sha256.to_owned(),
            random_seed: new.random_seed.to_owned(),
            tenant_id: new.tenant_id.to_owned(),
        };
        let json = serde_json::to_string(&execution).expect("execution serializes");
        let reply: Vec<String> = self
            .script
            .key(keys::session_registry(new.session_id))
            .arg(new.message_id)
            .arg(&execution.execution_id)
            .arg(json)
            .arg(new.worker_id)
            .arg(new.stream_name)
            .arg(new.redis_message_id)
            .arg(now)
            .arg(self.ttl_s)
            .invoke_async(conn)
            .await?;
        let mut reply = reply.into_iter();
        let kind = reply.next().unwrap_or_default();
        let execution_id = reply.next().unwrap_or_default();
        let extra = reply.next();
        Ok(match kind.as_str() {
            "terminal" => Begin::Terminal {
                execution_id,
                status: extra.unwrap_or_default(),
            },
            "elsewhere" => Begin::Elsewhere {
                execution_id,
                entry: extra.unwrap_or_default(),
            },
            "taken" => {
                // Keep what the record says (cancel requests in particular);
                // fall back to ours where it is not our shape.
                let taken = extra
                    .and_then(|raw| serde_json::from_str::<serde_json::Value>(&raw).ok())
                    .unwrap_or_default();
                let mut execution = Execution {
                    execution_id,
                    ..execution
                };
                if let Some(created) = taken.get("created_at").and_then(|v| v.as_u64()) {
                    execution.created_at = created;
                }
                execution.cancel_requested = taken
                    .get("cancel_requested")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                execution.cancel_reason = taken
                    .get("cancel_reason")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                // What the first run ran on and drew from; a record without
                // them (written before, or by a reference worker) checks
                // nothing and seeds anew.
                execution.plugin_sha256 = taken
                    .get("plugin_sha256")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_owned();
                if let Some(seed) = taken.get("random_seed").and_then(|v| v.as_str()) {
                    execution.random_seed = seed.to_owned();
                }
                Begin::Run {
                    execution: Box::new(execution),
                    rerun: true,
                }
            }
            _ => Begin::Run {
                execution: Box::new(execution),
                rerun: false,
            },
        })
    }

    /// Marks the execution of a message FAILED if one exists and is not
    /// terminal (an entry given up on, e.g. after too many deliveries).
    pub async fn fail_message(
        &self,
        conn: &mut impl ConnectionLike,
        session_id: &str,
        message_id: &str,
    ) -> Result<bool, redis::RedisError> {
        let changed: i64 = self
            .fail_script
            .key(keys::session_registry(session_id))
            .arg(message_id)
            .arg(now_ms())
            .arg(self.ttl_s)
            .invoke_async(conn)
            .await?;
        Ok(changed == 1)
    }

    /// Marks the execution of a message CANCELLING, as the reference
    /// client's `cancel_task` does; with `precancel`, a message that has not
    /// started gets a CANCELLED record so no worker runs it.
    pub async fn request_cancel(
        &self,
        conn: &mut impl ConnectionLike,
        session_id: &str,
        message_id: &str,
        reason: &str,
        precancel: bool,
    ) -> Result<CancelLookup, redis::RedisError> {
        let now = now_ms();
        let (placeholder_id, placeholder) = if precancel {
            let execution = Execution {
                execution_id: new_execution_id(),
                message_id: message_id.to_owned(),
                session_id: session_id.to_owned(),
                worker_id: String::new(),
                target_agent_type: String::new(),
                stream_name: String::new(),
                redis_message_id: String::new(),
                status: state::CANCELLED.to_owned(),
                cancel_requested: true,
                cancel_reason: reason.to_owned(),
                created_at: now,
                started_at: 0,
                finished_at: now,
                updated_at: now,
                plugin_sha256: String::new(),
                random_seed: String::new(),
                tenant_id: String::new(),
            };
            let json = serde_json::to_string(&execution).expect("execution serializes");
            (execution.execution_id, json)
        } else {
            (String::new(), String::new())
        };
        let reply: Vec<String> = self
            .cancel_script
            .key(keys::session_registry(session_id))
            .arg(message_id)
            .arg(session_id)
            .arg(reason)
            .arg(now)
            .arg(self.ttl_s)
            .arg(placeholder_id)
            .arg(placeholder)
            .invoke_async(conn)
            .await?;
        let mut reply = reply.into_iter();
        let kind = reply.next().unwrap_or_default();
        let mut next = || reply.next().unwrap_or_default();
        Ok(match kind.as_str() {
            "precancelled" => CancelLookup::Precancelled {
                execution_id: next(),
            },
            "session_mismatch" => CancelLookup::SessionMismatch {
                execution_id: next(),
                worker_id: next(),
            },
            "finished" => CancelLookup::AlreadyFinished {
                execution_id: next(),
                worker_id: next(),
                status: next(),
            },
            "requested" => CancelLookup::Requested {
                execution_id: next(),
                worker_id: next(),
                target_agent_type: next(),
            },
            _ => CancelLookup::NotFound,
        })
    }

    /// Marks `execution` finished with `status` (terminal); returns the
    /// registry key, field and JSON to write (the daemon writes it with the
    /// task's other final writes, in order).
    pub fn finish(&self, execution: &mut Execution, status: &str) -> FinishedRecord {
        debug_assert!(state::is_terminal(status));
        let now = now_ms();
        execution.status = status.to_owned();
        execution.finished_at = now;
        execution.updated_at = now;
        FinishedRecord {
            key: keys::session_registry(&execution.session_id),
            field: format!("exec:{}", execution.execution_id),
            value: serde_json::to_string(execution).expect("execution serializes"),
            ttl_s: self.ttl_s,
        }
    }
}

/// The HSET (and EXPIRE) that records a finished execution.
#[derive(Debug, Clone)]
pub struct FinishedRecord {
    pub key: String,
    pub field: String,
    pub value: String,
    /// EXPIRE of the registry hash, seconds.
    pub ttl_s: u64,
}
