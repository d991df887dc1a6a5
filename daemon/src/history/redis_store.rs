//! The Redis store: a capped list per session (RPUSH, LTRIM, EXPIRE; read
//! with LRANGE), every command of a batch succeeding or failing alone.

use super::*;

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
pub(super) struct RedisStore {
    /// Multiplexed and reconnecting; cloned per command.
    connection: Connection,
    /// `history.max_entries`.
    max_entries: usize,
    /// `history.ttl_s`.
    ttl_s: u64,
}

impl RedisStore {
    pub(super) async fn connect(
        endpoint: &byclaw_client::connection::Endpoint,
        config: &HistoryConfig,
    ) -> Result<RedisStore, HistoryError> {
        let response_timeout = config.write_timeout().max(config.read_timeout());
        let connection = byclaw_client::connection::connect(endpoint, response_timeout)
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
    pub(super) async fn write(&self, records: &[Record]) -> Result<Vec<Refusal>, HistoryError> {
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

    pub(super) async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.read_with(session_id, limit, |bytes| {
            serde_json::from_slice::<HistoryEntry>(bytes).map(HistoryEntry::normalized)
        })
        .await
    }

    /// [`RedisStore::read`] as injected JSON: each entry checked and
    /// normalized from its borrowed text, no tree built.
    pub(super) async fn read_json(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<String>, HistoryError> {
        self.read_with(session_id, limit, injected_entry).await
    }

    /// The newest `limit` entries, oldest first, each made by `entry` from
    /// its stored text; one that is not an entry is logged and skipped.
    async fn read_with<T>(
        &self,
        session_id: &str,
        limit: usize,
        entry: impl Fn(&[u8]) -> Result<T, serde_json::Error>,
    ) -> Result<Vec<T>, HistoryError> {
        let (key, raw) = self.read_raw(session_id, limit).await?;
        Ok(raw
            .iter()
            .filter_map(|bytes| match entry(bytes) {
                Ok(entry) => Some(entry),
                Err(error) => {
                    tracing::warn!(%key, %error, "skipping a history entry that is not one");
                    None
                }
            })
            .collect())
    }

    /// The newest `limit` stored entries, oldest first, and the key.
    async fn read_raw(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<(String, Vec<Vec<u8>>), HistoryError> {
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
        Ok((key, raw))
    }
}
