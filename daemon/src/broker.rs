//! Redis Streams as a work queue: connections, consumer groups, reading new
//! entries, and taking over entries that a dead consumer left pending.
//!
//! This module knows stream commands, not what the entries mean.

use byclaw_client::connection::Connection;
use byclaw_protocol::EntryId;
use redis::streams::{StreamClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::{RedisError, Value};
use std::sync::Arc;
use std::time::Duration;

/// A Redis failure, with what we were doing.
#[derive(Debug, thiserror::Error)]
#[error("redis {operation} on {key}: {source}")]
pub struct BrokerError {
    pub operation: &'static str,
    pub key: String,
    #[source]
    pub source: RedisError,
}

impl BrokerError {
    /// The consumer group (or its stream) is gone: Redis lost its data
    /// (restarted without persistence, flushed), or someone deleted it.
    pub fn is_missing_group(&self) -> bool {
        self.source.code() == Some("NOGROUP")
    }
}

fn err<'a>(operation: &'static str, key: &'a str) -> impl FnOnce(RedisError) -> BrokerError + 'a {
    move |source| BrokerError {
        operation,
        key: key.to_owned(),
        source,
    }
}

/// Opens a reconnecting, multiplexed connection (see
/// [`byclaw_client::connection::connect`]); errors name the URL without
/// its password.
pub async fn connect(
    endpoint: &byclaw_client::connection::Endpoint,
    response_timeout: Duration,
) -> Result<Connection, BrokerError> {
    let shown = endpoint.shown();
    byclaw_client::connection::connect(endpoint, response_timeout)
        .await
        .map_err(err("connect", &shown))
}

/// `XGROUP CREATE <stream> <group> 0 MKSTREAM`, BUSYGROUP ignored.
pub async fn ensure_group(
    conn: &mut Connection,
    stream: &str,
    group: &str,
) -> Result<(), BrokerError> {
    let result: Result<(), RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match result {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other.map_err(err("XGROUP CREATE", stream)),
    }
}

/// One entry read from a stream.
#[derive(Debug)]
pub struct Delivery {
    /// The stream it came from.
    pub stream: Arc<str>,
    /// Its entry id.
    pub id: String,
    /// Its fields.
    pub fields: Vec<(String, Vec<u8>)>,
    /// How many times it has been delivered, this time included.
    pub deliveries: u64,
}

impl Delivery {
    /// The value of one field.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn from_stream_id(stream: Arc<str>, entry: StreamId, deliveries: u64) -> Self {
        let fields = entry
            .map
            .into_iter()
            .map(|(name, value)| (name, value_bytes(value)))
            .collect();
        Delivery {
            stream,
            id: entry.id,
            fields,
            deliveries,
        }
    }
}

fn value_bytes(value: Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}

/// `XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s... > ...`.
pub async fn read_group(
    conn: &mut Connection,
    group: &str,
    consumer: &str,
    streams: &[Arc<str>],
    count: usize,
    block: Duration,
) -> Result<Vec<Delivery>, BrokerError> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS");
    for stream in streams {
        cmd.arg(&**stream);
    }
    for _ in streams {
        cmd.arg(">");
    }
    let reply: Option<StreamReadReply> = cmd
        .query_async(conn)
        .await
        .map_err(err("XREADGROUP", streams.first().map_or("", |s| &**s)))?;
    let mut out = Vec::new();
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        let stream = streams
            .iter()
            .find(|s| ***s == *key.key)
            .cloned()
            .unwrap_or_else(|| Arc::from(key.key.as_str()));
        for entry in key.ids {
            out.push(Delivery::from_stream_id(stream.clone(), entry, 1));
        }
    }
    Ok(out)
}

/// Entries delivered to `consumer` earlier and not acknowledged, with ids
/// after `after` (XREADGROUP with an id; start with `0`): what this worker
/// id left behind when it last stopped.
pub async fn read_own_pending(
    conn: &mut Connection,
    group: &str,
    consumer: &str,
    stream: &Arc<str>,
    after: &str,
    count: usize,
) -> Result<Vec<Delivery>, BrokerError> {
    let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(&**stream)
        .arg(after)
        .query_async(conn)
        .await
        .map_err(err("XREADGROUP", stream))?;
    Ok(reply
        .map(|r| r.keys)
        .unwrap_or_default()
        .into_iter()
        .flat_map(|key| key.ids)
        .map(|entry| Delivery::from_stream_id(stream.clone(), entry, 2))
        .collect())
}

/// An entry pending in a consumer group.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: String,
    pub consumer: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// `XPENDING <stream> <group> IDLE <ms> - + <count>`: entries idle at least `min_idle`.
pub async fn pending_idle(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    min_idle: Duration,
    count: usize,
) -> Result<Vec<Pending>, BrokerError> {
    let reply: StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("IDLE")
        .arg(min_idle.as_millis() as u64)
        .arg("-")
        .arg("+")
        .arg(count)
        .query_async(conn)
        .await
        .map_err(err("XPENDING", stream))?;
    Ok(reply
        .ids
        .into_iter()
        .map(|p| Pending {
            id: p.id,
            consumer: p.consumer,
            idle_ms: p.last_delivered_ms as u64,
            deliveries: p.times_delivered as u64,
        })
        .collect())
}

/// `XCLAIM` entries idle at least `min_idle` for `consumer`. Entries deleted
/// meanwhile are dropped from the pending list by Redis and not returned.
pub async fn claim(
    conn: &mut Connection,
    stream: &Arc<str>,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    pending: &[Pending],
) -> Result<Vec<Delivery>, BrokerError> {
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut cmd = redis::cmd("XCLAIM");
    cmd.arg(&**stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64);
    for p in pending {
        cmd.arg(&p.id);
    }
    let reply: StreamClaimReply = cmd.query_async(conn).await.map_err(err("XCLAIM", stream))?;
    Ok(reply
        .ids
        .into_iter()
        .map(|entry| {
            // XCLAIM counts this delivery too.
            let deliveries = pending
                .iter()
                .find(|p| p.id == entry.id)
                .map_or(1, |p| p.deliveries + 1);
            Delivery::from_stream_id(stream.clone(), entry, deliveries)
        })
        .collect())
}

/// Renews entries `consumer` holds: KEYS[1] the stream, ARGV[1] the group,
/// ARGV[2] the consumer, then the entry ids. Each id the consumer still
/// holds gets its idle time reset (XCLAIM 0 JUSTID); the ids it no longer
/// holds — another consumer took them over, or they were acknowledged —
/// are returned and left alone: a lease taken over is never taken back.
const RENEW_OWN: &str = r#"
local held = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    held[#held + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #held > 5 then
  held[#held + 1] = 'JUSTID'
  redis.call(unpack(held))
end
return lost
"#;

/// Resets the idle time of entries this consumer is still working on, so
/// no other worker takes them over. Returns the ids it no longer holds:
/// another worker took them over (after this one stalled longer than its
/// claim time) or acknowledged them; their tasks here must stop.
pub async fn renew(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    ids: &[String],
) -> Result<Vec<String>, BrokerError> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(RENEW_OWN));
    let mut lost = Vec::new();
    // Bounded so the script's argument list stays small.
    for ids in ids.chunks(500) {
        let mut invocation = SCRIPT.key(stream);
        invocation.arg(group).arg(consumer);
        for id in ids {
            invocation.arg(id);
        }
        let gone: Vec<String> = invocation
            .invoke_async(conn)
            .await
            .map_err(err("renew", stream))?;
        lost.extend(gone);
    }
    Ok(lost)
}

/// Gives up an entry delivered to `consumer` without acknowledging it: its
/// idle time is set to `idle` (XCLAIM ... IDLE, JUSTID so the delivery count
/// is unchanged), so the claimers of the workers that serve its stream take
/// it over at their next pass instead of after a full `claim_idle`.
pub async fn release(
    conn: &mut Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    id: &str,
    idle: Duration,
) -> Result<(), BrokerError> {
    let _: Value = redis::cmd("XCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(0)
        .arg(id)
        .arg("IDLE")
        .arg(idle.as_millis() as u64)
        .arg("JUSTID")
        .query_async(conn)
        .await
        .map_err(err("XCLAIM IDLE", stream))?;
    Ok(())
}

/// What one [`trim`] removed from a stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// Entries every consumer group had read and acknowledged.
    pub consumed: u64,
    /// Entries past the hard cap, read or not.
    pub over_cap: u64,
}

/// The first entry id some consumer group on the stream still needs: the
/// oldest it holds pending, or the one after the last delivered to it when
/// it holds none. `None` without groups (nobody consumes the stream, so
/// nothing counts as consumed).
pub async fn first_needed_id(
    conn: &mut Connection,
    stream: &str,
) -> Result<Option<String>, BrokerError> {
    let groups: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .map_err(err("XINFO GROUPS", stream))?;
    let mut needed: Option<EntryId> = None;
    for group in &groups.groups {
        let Some(last) = EntryId::parse(&group.last_delivered_id) else {
            // An id we cannot read: keep everything rather than guess.
            return Ok(None);
        };
        let mut first = last.next();
        if group.pending > 0 {
            // Pending entries only move forward meanwhile (acks, and new
            // deliveries past `last`), so an answer read after XINFO never
            // lets an entry go that the group still needs.
            let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&group.name)
                .query_async(conn)
                .await
                .map_err(err("XPENDING", stream))?;
            if let redis::streams::StreamPendingReply::Data(data) = reply {
                match EntryId::parse(&data.start_id) {
                    Some(oldest) => first = first.min(oldest),
                    None => return Ok(None),
                }
            }
        }
        needed = Some(needed.map_or(first, |n| n.min(first)));
    }
    Ok(needed.map(|id| id.to_string()))
}

/// Trims a control stream: `XTRIM MINID` to the first entry some consumer
/// group still needs (see [`first_needed_id`]), then, when `maxlen` is not
/// 0, `XTRIM MAXLEN` to it. A group created later from id 0 does not see
/// what was trimmed before it existed.
pub async fn trim(
    conn: &mut Connection,
    stream: &str,
    maxlen: u64,
) -> Result<Trimmed, BrokerError> {
    let mut trimmed = Trimmed::default();
    if let Some(first) = first_needed_id(conn, stream).await? {
        trimmed.consumed = redis::cmd("XTRIM")
            .arg(stream)
            .arg("MINID")
            .arg(&first)
            .query_async(conn)
            .await
            .map_err(err("XTRIM MINID", stream))?;
    }
    if maxlen > 0 {
        trimmed.over_cap = redis::cmd("XTRIM")
            .arg(stream)
            .arg("MAXLEN")
            .arg(maxlen)
            .query_async(conn)
            .await
            .map_err(err("XTRIM MAXLEN", stream))?;
    }
    Ok(trimmed)
}

/// Whether Redis under `maxmemory-policy` may delete keys to make room:
/// every policy but `noeviction` can drop a stream, a pending list or an
/// execution record (the `volatile-*` ones the keys with a TTL, which
/// session streams and records have).
pub fn policy_evicts(policy: &str) -> bool {
    !policy.eq_ignore_ascii_case("noeviction")
}

/// Warns when Redis may evict keys: tasks, their events and their
/// execution records could then vanish without anyone acknowledging them.
/// Servers that refuse CONFIG (managed services, ACLs) are not checked.
pub async fn warn_if_evicting(conn: &mut Connection) {
    let reply: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    match reply {
        Ok(pair) => {
            if let Some(policy) = pair.get(1)
                && policy_evicts(policy)
            {
                tracing::warn!(
                    maxmemory_policy = %policy,
                    "Redis may evict keys when full: queued tasks, events and execution records can be lost; set maxmemory-policy noeviction (a full Redis then refuses writes, which the daemon retries)"
                );
            }
        }
        Err(error) => {
            tracing::debug!(%error, "cannot read maxmemory-policy; eviction not checked")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_keeps_every_key() {
        assert!(!policy_evicts("noeviction"));
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(policy_evicts(policy), "{policy}");
        }
    }
}
