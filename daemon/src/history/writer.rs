//! The background writer: drains the queue into the store one batch at a
//! time, in the order entries were recorded, retrying a failed batch a
//! bounded number of times and counting every loss.

use super::*;

/// Drains the queue into the store, one batch at a time, so entries are
/// written in the order they were recorded.
pub(super) struct Writer {
    /// The store and the counters.
    pub(super) shared: Arc<Shared>,
    /// Entries and flush requests from the handles.
    pub(super) queue: mpsc::Receiver<Job>,
    /// See [`Handle::stop`].
    pub(super) stop: CancellationToken,
    /// `history.write_batch`.
    pub(super) max_batch: usize,
    /// `history.write_timeout_ms`, per attempt.
    pub(super) timeout: Duration,
    /// `history.write_attempts`.
    pub(super) attempts: u32,
    /// `history.write_backoff_ms`, the first wait between attempts.
    pub(super) backoff: Duration,
}

/// Longest wait between two attempts at a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Writer {
    pub(super) async fn run(mut self) {
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
        let mut backoff = crate::retry::Backoff::new(self.backoff, MAX_BACKOFF);
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
            let wait = backoff.next_wait();
            tracing::warn!(
                entries = pending.len(),
                attempt,
                retry_in_ms = wait.as_millis() as u64,
                %error,
                "history write failed; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
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
pub(super) fn sessions_of(records: &[Record], indices: &[usize]) -> String {
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
pub(super) struct Refusal {
    /// Their positions in the batch.
    pub(super) indices: Vec<usize>,
    /// Why.
    pub(super) error: HistoryError,
    /// Whether trying again may succeed (the store was unavailable) or not
    /// (it refused the data).
    pub(super) retry: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
