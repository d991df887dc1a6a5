//! The journal's side of routing. Every reply or answer to a task that is
//! still unfinished is also kept in the task's journal
//! (`byai_gateway:journal:{<message id>}:calls:<session id>`, see
//! [`keys::task_journal`]) under the id of the call it answers — a child's
//! message id (`<message id>:c<n>`, `:g<n>.<k>`) or a prompt id — in the
//! same step that reads the route ([`route_reply`]), or with the XACK when a
//! local waiter took it. A run of the task after its daemon died (by any
//! worker, under any worker id) sends the same call ids and finds there
//! what the first run was told; a reply whose route names a dead worker is
//! therefore acknowledged, not run as an orphan, while its task is
//! unfinished. A second, different reply to one call is dropped. A wait
//! that times out writes [`JOURNAL_TIMED_OUT`] into its field (unless a
//! reply is there first: then that reply answers the call after all), so a
//! reply that comes after the timeout is dropped while the task is
//! unfinished, and a run after a crash times the call out at once.

use super::{JOURNAL_TTL_S, Reply, ReplyKind, WaitKey};
use crate::events::Write;
use byclaw_client::connection::Connection;
use byclaw_protocol::keys;

/// Where a RESUME that no local waiter took must go.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Another live worker waits for it: forward to its control stream.
    Forward(String),
    /// Its wait was cancelled or answered already, or its call has another
    /// reply in the journal: acknowledge and drop.
    Dropped,
    /// Nobody waits (no route, a route to us, or to a dead worker).
    Orphan,
    /// It names an unfinished task of another tenant: refuse it.
    Foreign,
}

/// What [`route_reply`] found.
#[derive(Debug, PartialEq)]
pub struct Routed {
    pub route: Route,
    /// The reply is in its task's journal: the task is unfinished, so a
    /// reply nobody waits for now is for its next run, not an orphan.
    pub journaled: bool,
}

/// Reads a reply's route and, while its task is unfinished, keeps the reply
/// in the task's journal — one step, so a task that registers its route and
/// then reads its journal finds every reply: read before, it is in the
/// journal; after, it is routed to the task.
///
/// KEYS[1] the route, KEYS[2] the task's journal (in the reply's session),
/// KEYS[3] the reply's session registry. ARGV: journal field ('' for an
/// answer naming no prompt: the route's prompt), the reply JSON, the task's
/// message id, the journal TTL, the reply's tenant. Returns {'dropped'},
/// {'foreign'} (the task runs for another tenant) or {'route', worker ('' if
/// none), 1 if journaled}. Only a task of the reply's own session and
/// tenant has a journal the reply can enter: one a hostile client names
/// cannot be filled with an answer its real caller's reply then loses to.
const ROUTE_REPLY: &str = r#"
local route = redis.call('GET', KEYS[1])
if route == '!cancelled' or route == '!answered' then return {'dropped'} end
local worker, prompt = '', ''
if route then
  local space = string.find(route, ' ', 1, true)
  if space then
    worker = string.sub(route, 1, space - 1)
    prompt = string.sub(route, space + 1)
  else
    worker = route
  end
end
local field = ARGV[1]
if field == '' then field = prompt end
if field == '' or KEYS[2] == '' then return {'route', worker, 0} end
local exec_id = redis.call('HGET', KEYS[3], 'msg_map:' .. ARGV[3])
if not exec_id then return {'route', worker, 0} end
local raw = redis.call('HGET', KEYS[3], 'exec:' .. exec_id)
if not raw then return {'route', worker, 0} end
local ok, ex = pcall(cjson.decode, raw)
if not ok or type(ex) ~= 'table' then return {'route', worker, 0} end
local status = ex['status']
if status == 'COMPLETED' or status == 'FAILED' or status == 'CANCELLED' then
  return {'route', worker, 0}
end
local tenant = ex['tenant_id']
if type(tenant) == 'string' and tenant ~= ARGV[5] then return {'foreign'} end
local before = redis.call('HGET', KEYS[2], field)
if before and before ~= ARGV[2] then return {'dropped'} end
redis.call('HSET', KEYS[2], field, ARGV[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return {'route', worker, 1}
"#;

/// Routes a reply no local waiter took (see `ROUTE_REPLY`): one script,
/// plus an EXISTS of the worker lock when the route names another worker.
pub async fn route_reply(
    conn: &mut Connection,
    key: &WaitKey,
    reply: &Reply,
    own_worker_id: &str,
) -> Result<Routed, redis::RedisError> {
    let named = reply.prompt_id();
    let (task, field) = match key.kind {
        // The prompt the route names is filled in by the script.
        ReplyKind::User => (Some(key.message_id.clone()), named.unwrap_or("").to_owned()),
        ReplyKind::Agent => match key.journal_entry(None) {
            Some((caller, field)) => (Some(caller), field),
            None => (None, String::new()),
        },
    };
    let journal = task
        .as_deref()
        .map(|task| keys::task_journal(&reply.session_id, task))
        .unwrap_or_default();
    let json = serde_json::to_string(reply).expect("a reply serializes");
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(ROUTE_REPLY));
    let found: Vec<redis::Value> = SCRIPT
        .key(key.redis_key())
        .key(journal)
        .key(keys::session_registry(&reply.session_id))
        .arg(field)
        .arg(json)
        .arg(task.unwrap_or_default())
        .arg(JOURNAL_TTL_S)
        .arg(&reply.tenant_id)
        .invoke_async(conn)
        .await?;
    let text = |value: Option<&redis::Value>| -> String {
        match value {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(redis::Value::SimpleString(text)) => text.clone(),
            _ => String::new(),
        }
    };
    match text(found.first()).as_str() {
        "route" => {}
        "foreign" => {
            return Ok(Routed {
                route: Route::Foreign,
                journaled: false,
            });
        }
        _ => {
            return Ok(Routed {
                route: Route::Dropped,
                journaled: false,
            });
        }
    }
    let worker = text(found.get(1));
    let journaled = matches!(found.get(2), Some(redis::Value::Int(1)));
    let route = if worker.is_empty() || worker == own_worker_id {
        Route::Orphan
    } else {
        let alive: bool = redis::cmd("EXISTS")
            .arg(keys::worker_lock(&worker))
            .query_async(conn)
            .await?;
        if alive {
            Route::Forward(worker)
        } else {
            Route::Orphan
        }
    };
    Ok(Routed { route, journaled })
}

/// The journal's value for a call or prompt whose wait timed out: a reply
/// arriving later finds the field taken and is dropped, and a run after a
/// crash times the call out at once instead of waiting for it again.
pub const JOURNAL_TIMED_OUT: &str = "!timed-out";

/// What a task's journal says of one call or prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Journaled {
    /// Its reply or answer.
    Reply(Box<Reply>),
    /// Its wait timed out.
    TimedOut,
}

impl Journaled {
    fn parse(raw: &str) -> Option<Journaled> {
        if raw == JOURNAL_TIMED_OUT {
            return Some(Journaled::TimedOut);
        }
        serde_json::from_str(raw)
            .ok()
            .map(|reply| Journaled::Reply(Box::new(reply)))
    }
}

/// On a run after a crash: points the routes of the calls about to be
/// waited for at this worker, then reads what the task's journal holds for
/// them — one transaction, so a reply is either in what is read or routed
/// here (see `ROUTE_REPLY`).
pub async fn route_then_read_journal(
    conn: &mut Connection,
    routes: Vec<redis::Cmd>,
    session_id: &str,
    message_id: &str,
    fields: &[String],
) -> Result<Vec<Option<Journaled>>, redis::RedisError> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for route in routes {
        pipe.add_command(route).ignore();
    }
    pipe.cmd("HMGET")
        .arg(keys::task_journal(session_id, message_id))
        .arg(fields);
    let (raw,): (Vec<Option<String>>,) = pipe.query_async(conn).await?;
    Ok(raw
        .into_iter()
        .map(|entry| entry.as_deref().and_then(Journaled::parse))
        .collect())
}

/// Journals that the waits for `fields` timed out, unless a reply got into
/// the journal first: one transaction, whose answer is what the journal
/// holds now — the reply that won, or `None` for a timeout. A run after a
/// crash then reads the same (see [`JOURNAL_TIMED_OUT`]).
pub async fn journal_timeouts(
    conn: &mut Connection,
    session_id: &str,
    message_id: &str,
    fields: &[String],
) -> Result<Vec<Option<Reply>>, redis::RedisError> {
    let journal = keys::task_journal(session_id, message_id);
    let mut pipe = redis::pipe();
    pipe.atomic();
    for field in fields {
        pipe.cmd("HSETNX")
            .arg(&journal)
            .arg(field)
            .arg(JOURNAL_TIMED_OUT)
            .ignore();
    }
    pipe.cmd("EXPIRE").arg(&journal).arg(JOURNAL_TTL_S).ignore();
    pipe.cmd("HMGET").arg(&journal).arg(fields);
    let (raw,): (Vec<Option<String>>,) = pipe.query_async(conn).await?;
    Ok(raw
        .into_iter()
        .map(|entry| match entry.as_deref().and_then(Journaled::parse) {
            Some(Journaled::Reply(reply)) => Some(*reply),
            _ => None,
        })
        .collect())
}

/// The writes that keep `reply` in the journal of the task
/// `task_message_id` of the reply's session under `field`,
/// unless the field holds something already: a timeout journaled by the
/// task a moment before stands, as the task took it (see
/// [`journal_timeouts`]).
pub fn journal_write(task_message_id: &str, field: &str, reply: &Reply) -> [Write; 2] {
    let journal = keys::task_journal(&reply.session_id, task_message_id);
    let mut hsetnx = redis::cmd("HSETNX");
    hsetnx
        .arg(&journal)
        .arg(field)
        .arg(serde_json::to_string(reply).expect("a reply serializes"));
    let mut expire = redis::cmd("EXPIRE");
    expire.arg(&journal).arg(JOURNAL_TTL_S);
    [Write::Command(hsetnx), Write::Command(expire)]
}
