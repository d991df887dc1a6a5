//! Reads past the task (`history-recent`, `active-workers`, outbound HTTP
//! responses) kept in order: a run after another is given what the run
//! before read, and the journal holds each read from the next write of the
//! task on (see [`TaskLink::journal_writes`]), so a run after a crash reads
//! it too.
//!
//! Each read takes the next place in `Learned::reads` when it starts and
//! fills it when it ends (an HTTP response once the guest has read its
//! body), so reads that overlap keep the order they started in. A place
//! never filled (a response not read to its end) is a gap: nothing after
//! it is journaled, and the task keeps its instance while it waits.

use super::*;
use byclaw_sandbox::port::{KeptResponse, Outbound};
use serde::{Deserialize, Serialize};

/// Most bytes of reads one task keeps; past them its reads are not kept
/// (such a task keeps its instance while it waits, and a run after a crash
/// reads live from there on).
const MAX_READS_BYTES: usize = 8 << 20;

/// One read as the journal keeps it (JSON, one list element).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KeptRead {
    /// `history-recent`: role, content, metadata of each entry.
    History(Vec<(String, String, String)>),
    /// `active-workers`: worker id, capabilities, last seen (ms).
    Workers(Vec<(String, Vec<String>, u64)>),
    /// History or registry read failed with `error.unavailable`.
    Unavailable(String),
    /// An outbound HTTP exchange, its response read to its end.
    Http(KeptResponse),
}

impl KeptRead {
    fn what(&self) -> &'static str {
        match self {
            KeptRead::History(_) => "history-recent",
            KeptRead::Workers(_) => "active-workers",
            KeptRead::Unavailable(_) => "a failed read",
            KeptRead::Http(_) => "outbound HTTP",
        }
    }
}

/// Where a read of this run goes in `Learned::reads`.
enum Place {
    /// A run before made this read: what it read.
    Kept(Result<KeptRead, String>),
    /// A new place, filled when the read ends.
    New(usize),
    /// Past a gap: read live, not kept.
    Unkept,
}

impl TaskLink {
    /// Takes the place of this run's next read.
    fn next_place(&self) -> Place {
        let n = self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut learned = self.learned.lock().expect("learned lock is never poisoned");
        match learned.reads.get(n) {
            Some(Some(kept)) => {
                Place::Kept(serde_json::from_str(kept).map_err(|e| {
                    format!("read {} of the run before cannot be decoded: {e}", n + 1)
                }))
            }
            Some(None) => Place::Unkept,
            None if learned.reads.len() == n => {
                learned.reads.push(None);
                Place::New(n)
            }
            None => Place::Unkept,
        }
    }

    /// Fills place `n` with `read` (not kept past the bound: a gap).
    fn fill(&self, n: usize, read: &KeptRead) {
        let json = serde_json::to_string(read).expect("a read serializes");
        let mut learned = self.learned.lock().expect("learned lock is never poisoned");
        if learned.reads_bytes + json.len() <= MAX_READS_BYTES {
            learned.reads_bytes += json.len();
            learned.reads[n] = Some(json);
        } else {
            drop(learned);
            self.unjournaled("reads past the journal's bound");
        }
    }

    /// [`TaskPort::outbound_request`]: the response of a run before, or a
    /// new place for this one's.
    pub(super) fn http_request(&self, method: &str, uri: &str) -> Outbound {
        match self.next_place() {
            Place::Kept(Ok(KeptRead::Http(kept))) if kept.method == method && kept.uri == uri => {
                Outbound::Kept(kept)
            }
            Place::Kept(Ok(KeptRead::Http(kept))) => Outbound::Mismatch(format!(
                "nondeterminism: the run before this one sent {} {} here, this one {method} {uri}",
                kept.method, kept.uri
            )),
            Place::Kept(Ok(other)) => Outbound::Mismatch(format!(
                "nondeterminism: the run before this one read {} here, this one sent {method} {uri}",
                other.what()
            )),
            Place::Kept(Err(why)) => Outbound::Mismatch(why),
            Place::New(n) => Outbound::Keep(n),
            Place::Unkept => {
                self.unjournaled("an outbound HTTP response past a gap");
                Outbound::Unkept
            }
        }
    }

    /// [`TaskPort::outbound_response`].
    pub(super) fn http_response(&self, n: usize, response: Option<KeptResponse>) {
        match response {
            Some(response) => self.fill(n, &KeptRead::Http(response)),
            None => self.unjournaled("an outbound HTTP response not read to its end"),
        }
    }
}

impl TaskLink {
    /// The `n`th read of this run: what a run before read, or `live` (then
    /// kept). A read the run before made of the other kind ends in
    /// `error.failed` naming both: the guest took another path.
    async fn read_once(
        &self,
        what: &'static str,
        live: impl std::future::Future<Output = KeptRead>,
    ) -> Result<KeptRead, GuestError> {
        match self.next_place() {
            Place::Kept(Ok(kept))
                if kept.what() == what || matches!(kept, KeptRead::Unavailable(_)) =>
            {
                Ok(kept)
            }
            Place::Kept(Ok(kept)) => Err(GuestError::Failed(format!(
                "nondeterminism: the run before this one read {} here, this one {what}",
                kept.what()
            ))),
            Place::Kept(Err(why)) => Err(GuestError::Failed(why)),
            Place::New(n) => {
                let read = live.await;
                self.fill(n, &read);
                Ok(read)
            }
            Place::Unkept => {
                self.unjournaled("a read past a gap");
                Ok(live.await)
            }
        }
    }

    /// The reads not in the journal yet, as one RPUSH (and its EXPIRE),
    /// marked as journaled.
    pub(super) fn reads_write(&self) -> Option<[Write; 2]> {
        let mut learned = self.learned.lock().expect("learned lock is never poisoned");
        let from = learned.reads_journaled;
        let ready: Vec<&String> = learned.reads[from.min(learned.reads.len())..]
            .iter()
            .map_while(Option::as_ref)
            .collect();
        if ready.is_empty() {
            return None;
        }
        let count = ready.len();
        let key = keys::task_journal_reads(&self.origin.session_id, &self.origin.message_id);
        let mut rpush = redis::cmd("RPUSH");
        rpush.arg(&key).arg(ready);
        learned.reads_journaled = from + count;
        let mut expire = redis::cmd("EXPIRE");
        expire.arg(&key).arg(routing::JOURNAL_TTL_S);
        Some([Write::Command(rpush), Write::Command(expire)])
    }

    pub(super) async fn history_read(&self, limit: usize) -> Result<Vec<HistoryEntry>, GuestError> {
        let read = self.read_once("history-recent", async {
            match self
                .services
                .history
                .read(&self.origin.session_id, limit)
                .await
            {
                Ok(entries) => KeptRead::History(
                    entries
                        .into_iter()
                        .map(|entry| {
                            (
                                entry.role.as_str().to_owned(),
                                entry.content,
                                entry.metadata.to_string(),
                            )
                        })
                        .collect(),
                ),
                Err(crate::history::HistoryError::Off) => KeptRead::History(Vec::new()),
                Err(error) => {
                    KeptRead::Unavailable(format!("the session history cannot be read: {error}"))
                }
            }
        });
        match read.await? {
            KeptRead::History(entries) => Ok(entries
                .into_iter()
                .map(|(role, content, metadata)| HistoryEntry {
                    role,
                    content,
                    metadata,
                })
                .collect()),
            KeptRead::Workers(_) | KeptRead::Http(_) => {
                unreachable!("read_once gives a read of the kind asked")
            }
            KeptRead::Unavailable(reason) => Err(GuestError::Unavailable(reason)),
        }
    }

    pub(super) async fn workers_read(&self) -> Result<Vec<WorkerInfo>, GuestError> {
        let read = self.read_once("active-workers", async {
            let workers =
                byclaw_protocol::workers::active_workers(&mut self.services.redis.clone()).await;
            match workers {
                Ok(workers) => KeptRead::Workers(
                    workers
                        .into_iter()
                        .map(|w| (w.worker_id, w.capabilities, w.last_seen))
                        .collect(),
                ),
                Err(error) => {
                    KeptRead::Unavailable(format!("cannot read the worker registry: {error}"))
                }
            }
        });
        match read.await? {
            KeptRead::Workers(workers) => Ok(workers
                .into_iter()
                .map(|(worker_id, capabilities, last_seen_ms)| WorkerInfo {
                    worker_id,
                    capabilities,
                    last_seen_ms,
                })
                .collect()),
            KeptRead::History(_) | KeptRead::Http(_) => {
                unreachable!("read_once gives a read of the kind asked")
            }
            KeptRead::Unavailable(reason) => Err(GuestError::Unavailable(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeptRead;

    #[test]
    fn a_kept_read_is_tagged_by_its_kind() {
        let read = KeptRead::Workers(vec![("w-1".into(), vec!["echo".into()], 7)]);
        let json = serde_json::to_string(&read).unwrap();
        assert_eq!(json, r#"{"workers":[["w-1",["echo"],7]]}"#);
        let back: KeptRead = serde_json::from_str(&json).unwrap();
        assert_eq!(back.what(), "active-workers");
        let failed: KeptRead =
            serde_json::from_str(r#"{"unavailable":"cannot read the worker registry"}"#).unwrap();
        assert_eq!(failed.what(), "a failed read");
    }
}
