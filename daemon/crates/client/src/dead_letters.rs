//! The dead-letter stream, for operators: the entries workers could not run
//! (malformed, no such agent, delivered too often), each with the reason,
//! where it came from and its original fields. [`Client::dead_letters`]
//! lists them, [`Client::replay_dead_letter`] puts one back on its stream,
//! [`Client::purge_dead_letters`] deletes them (`gatewayd dead-letters`).

use crate::{Client, ClientError, client::redis_error};
use byclaw_protocol::{EntryId, now_ms};
use redis::streams::{StreamId, StreamRangeReply};
use std::time::Duration;

/// The fields a worker adds to a dead letter; every other field is the
/// original entry's (an original field of one of these names is stored as
/// `original_<name>`).
const OWN_FIELDS: [&str; 7] = [
    "reason",
    "source_stream",
    "source_id",
    "consumer_group",
    "worker_id",
    "delivery_count",
    "dead_lettered_at",
];

/// Entries read per XRANGE while listing.
const PAGE: usize = 500;

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream (its time is when it was
    /// dead-lettered).
    pub id: String,
    /// Why it could not be run.
    pub reason: String,
    /// The stream it was read from.
    pub source_stream: String,
    /// Its id there.
    pub source_id: String,
    /// The consumer group that gave up on it.
    pub consumer_group: String,
    /// The worker that gave up on it.
    pub worker_id: String,
    /// How often it had been delivered.
    pub delivery_count: u64,
    /// The original entry's fields, as they were.
    pub original: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    fn from_entry(entry: &StreamId) -> DeadLetter {
        let text = |name: &str| entry.get::<String>(name).unwrap_or_default();
        let mut original: Vec<(String, Vec<u8>)> = entry
            .map
            .iter()
            .filter(|(name, _)| !OWN_FIELDS.contains(&name.as_str()))
            .map(|(name, value)| {
                let name = match name.strip_prefix("original_") {
                    Some(own) if OWN_FIELDS.contains(&own) => own.to_owned(),
                    _ => name.clone(),
                };
                (
                    name,
                    <Vec<u8> as redis::FromRedisValue>::from_redis_value_ref(value)
                        .unwrap_or_default(),
                )
            })
            .collect();
        original.sort();
        DeadLetter {
            id: entry.id.clone(),
            reason: text("reason"),
            source_stream: text("source_stream"),
            source_id: text("source_id"),
            consumer_group: text("consumer_group"),
            worker_id: text("worker_id"),
            delivery_count: text("delivery_count").parse().unwrap_or(0),
            original,
        }
    }

    /// When it was dead-lettered, ms since the epoch (from its id).
    pub fn dead_lettered_at_ms(&self) -> u64 {
        EntryId::parse(&self.id).map_or(0, |id| id.ms)
    }

    /// An original field, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.original
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// Which dead letters a command applies to; every condition set must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    /// The reason contains this text.
    pub reason: Option<String>,
    /// It came from this stream: its full name, or the agent type of a
    /// capability stream (`echo` for `byai_gateway:ctrl:capability:echo`).
    pub stream: Option<String>,
    /// Dead-lettered at least this long ago.
    pub older_than: Option<Duration>,
    /// Dead-lettered less than this long ago.
    pub newer_than: Option<Duration>,
}

impl DeadLetterFilter {
    /// Whether it selects every entry.
    pub fn is_empty(&self) -> bool {
        *self == DeadLetterFilter::default()
    }

    fn matches(&self, letter: &DeadLetter) -> bool {
        let reason = self
            .reason
            .as_ref()
            .is_none_or(|text| letter.reason.contains(text.as_str()));
        let stream = self.stream.as_ref().is_none_or(|stream| {
            letter.source_stream == *stream
                || letter.source_stream == byclaw_protocol::keys::capability_stream(stream)
        });
        reason && stream
    }

    /// The id range the ages allow, as XRANGE bounds.
    fn range(&self, now_ms: u64) -> (String, String) {
        let start = self.newer_than.map_or("-".to_owned(), |age| {
            format!("{}", now_ms.saturating_sub(age.as_millis() as u64) + 1)
        });
        let end = self.older_than.map_or("+".to_owned(), |age| {
            format!("{}", now_ms.saturating_sub(age.as_millis() as u64))
        });
        (start, end)
    }
}

/// The id after `id`, for the next page of an XRANGE.
fn after(id: &str) -> String {
    format!("({id}")
}

impl Client {
    /// Dead letters of `stream` that match `filter`, oldest first, at most
    /// `limit` (0: all).
    pub async fn dead_letters(
        &self,
        stream: &str,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, ClientError> {
        let mut conn = self.conn.clone();
        let (mut start, end) = filter.range(now_ms());
        let mut found = Vec::new();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(stream)
                .arg(&start)
                .arg(&end)
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await
                .map_err(redis_error("XRANGE"))?;
            let Some(last) = page.ids.last() else {
                return Ok(found);
            };
            start = after(&last.id);
            let full = page.ids.len() == PAGE;
            for entry in &page.ids {
                let letter = DeadLetter::from_entry(entry);
                if filter.matches(&letter) {
                    found.push(letter);
                    if found.len() == limit {
                        return Ok(found);
                    }
                }
            }
            if !full {
                return Ok(found);
            }
        }
    }

    /// The dead letter with id `id` in `stream`, if it is there.
    pub async fn dead_letter(
        &self,
        stream: &str,
        id: &str,
    ) -> Result<Option<DeadLetter>, ClientError> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(id)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error("XRANGE"))?;
        Ok(reply.ids.first().map(DeadLetter::from_entry))
    }

    /// Puts a dead letter's original entry back on the stream it came from
    /// and deletes it from `stream`, in one transaction. When the entry is
    /// a control command (a `data` field holding a JSON object with a
    /// `header`), `header.metadata.replayed_from` says which dead letter it
    /// was and why (the reference ignores metadata it does not know), and
    /// the message's execution is forgotten from its session registry
    /// (`msg_map:<message_id>`), so the worker that reads it runs it again
    /// rather than skipping it as finished: its session sees the new run's
    /// events after the old `FAILED`. Returns the new entry's id.
    pub async fn replay_dead_letter(
        &self,
        stream: &str,
        letter: &DeadLetter,
    ) -> Result<String, ClientError> {
        if letter.source_stream.is_empty() || letter.original.is_empty() {
            return Err(ClientError::NotReplayable {
                id: letter.id.clone(),
                reason: "it names no source stream or has no original fields".into(),
            });
        }
        let mut add = redis::cmd("XADD");
        add.arg(&letter.source_stream).arg("*");
        for (name, value) in &letter.original {
            add.arg(name);
            if name == "data" {
                add.arg(noted(value, letter));
            } else {
                add.arg(value);
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic()
            .add_command(add)
            .cmd("XDEL")
            .arg(stream)
            .arg(&letter.id)
            .ignore();
        if let Some((session_id, message_id)) = letter.field("data").and_then(command_ids) {
            pipe.cmd("HDEL")
                .arg(byclaw_protocol::keys::session_registry(&session_id))
                .arg(format!("msg_map:{message_id}"))
                .ignore();
        }
        let (id,): (String,) = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(redis_error("XADD"))?;
        Ok(id)
    }

    /// Deletes the dead letters of `stream` that match `filter` and
    /// returns how many went. Only an age (`older_than`) trims the stream
    /// in one command; other conditions delete entry by entry.
    pub async fn purge_dead_letters(
        &self,
        stream: &str,
        filter: &DeadLetterFilter,
    ) -> Result<u64, ClientError> {
        let mut conn = self.conn.clone();
        let by_age_only = DeadLetterFilter {
            older_than: filter.older_than,
            ..Default::default()
        };
        if *filter == by_age_only {
            let mut trim = redis::cmd("XTRIM");
            trim.arg(stream);
            match filter.older_than {
                Some(age) => trim
                    .arg("MINID")
                    .arg(now_ms().saturating_sub(age.as_millis() as u64) + 1),
                None => trim.arg("MAXLEN").arg(0),
            };
            return trim
                .query_async(&mut conn)
                .await
                .map_err(redis_error("XTRIM"));
        }
        let letters = self.dead_letters(stream, filter, 0).await?;
        let mut deleted = 0;
        for chunk in letters.chunks(PAGE) {
            let mut del = redis::cmd("XDEL");
            del.arg(stream);
            for letter in chunk {
                del.arg(&letter.id);
            }
            deleted += del
                .query_async::<u64>(&mut conn)
                .await
                .map_err(redis_error("XDEL"))?;
        }
        Ok(deleted)
    }
}

/// The session and message ids of a control command.
fn command_ids(data: &[u8]) -> Option<(String, String)> {
    let command: serde_json::Value = serde_json::from_slice(data).ok()?;
    let header = command.get("header")?;
    let id = |name: &str| {
        header
            .get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Some((id("session_id")?, id("message_id")?))
}

/// The `data` field of a replayed entry: a control command gets
/// `header.metadata.replayed_from`; anything else goes back as it was.
fn noted(data: &[u8], letter: &DeadLetter) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut command)) = serde_json::from_slice(data) else {
        return data.to_vec();
    };
    let Some(serde_json::Value::Object(header)) = command.get_mut("header") else {
        return data.to_vec();
    };
    let metadata = header
        .entry("metadata")
        .or_insert_with(|| serde_json::json!({}));
    if !metadata.is_object() {
        return data.to_vec();
    }
    metadata["replayed_from"] = serde_json::json!({
        "dead_letter_id": letter.id,
        "reason": letter.reason,
        "source_id": letter.source_id,
        "replayed_at": now_ms(),
    });
    serde_json::to_vec(&command).unwrap_or_else(|_| data.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(fields: &[(&str, &str)]) -> DeadLetter {
        let entry = StreamId {
            id: "1700000000000-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        redis::Value::BulkString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
            ..Default::default()
        };
        DeadLetter::from_entry(&entry)
    }

    #[test]
    fn own_fields_and_original_ones_are_told_apart() {
        let letter = letter(&[
            ("reason", "no plugin serves agent type \"ghost\""),
            ("source_stream", "byai_gateway:ctrl:capability:ghost"),
            ("source_id", "1-0"),
            ("delivery_count", "3"),
            ("data", "{}"),
            ("original_reason", "theirs"),
        ]);
        assert_eq!(letter.delivery_count, 3);
        assert_eq!(letter.field("data"), Some(&b"{}"[..]));
        assert_eq!(letter.field("reason"), Some(&b"theirs"[..]));
        assert_eq!(letter.dead_lettered_at_ms(), 1_700_000_000_000);
        let by_agent = DeadLetterFilter {
            stream: Some("ghost".into()),
            reason: Some("no plugin".into()),
            ..Default::default()
        };
        assert!(by_agent.matches(&letter));
        let other = DeadLetterFilter {
            stream: Some("echo".into()),
            ..Default::default()
        };
        assert!(!other.matches(&letter));
    }

    #[test]
    fn a_replayed_command_says_where_it_came_from_and_other_data_is_kept() {
        let letter = letter(&[("reason", "too many deliveries"), ("source_id", "9-1")]);
        let command = br#"{"action_type":"ASK_AGENT","header":{"message_id":"msg-1","metadata":{"a":1}},"body":{}}"#;
        let replayed: serde_json::Value = serde_json::from_slice(&noted(command, &letter)).unwrap();
        let metadata = &replayed["header"]["metadata"];
        assert_eq!(metadata["a"], 1);
        assert_eq!(metadata["replayed_from"]["dead_letter_id"], letter.id);
        assert_eq!(metadata["replayed_from"]["reason"], "too many deliveries");
        assert_eq!(replayed["header"]["message_id"], "msg-1");
        assert_eq!(noted(b"not json", &letter), b"not json");
        assert_eq!(noted(br#"{"header":"x"}"#, &letter), br#"{"header":"x"}"#);
    }

    #[test]
    fn ages_become_id_bounds() {
        let filter = DeadLetterFilter {
            older_than: Some(Duration::from_secs(60)),
            newer_than: Some(Duration::from_secs(3600)),
            ..Default::default()
        };
        let (start, end) = filter.range(10_000_000);
        assert_eq!(start, "6400001");
        assert_eq!(end, "9940000");
        assert_eq!(
            DeadLetterFilter::default().range(5),
            ("-".into(), "+".into())
        );
    }
}
