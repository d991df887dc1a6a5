//! A task run again: what the run before it left (its clock readings and
//! reads from the journal, the events it emitted), and the wait of a task
//! that dropped its instance until what it waits for is in.

use super::*;

/// What a run after another knows of the run before.
pub(super) struct Rerun<'a> {
    /// Events the run before emitted: not emitted again.
    pub(super) events: usize,
    /// SHA-256 (hex) of the plugin it ran on ('' if unknown).
    pub(super) plugin_sha256: &'a str,
    /// The clock readings it journaled, if it read the clocks.
    pub(super) clocks: Option<String>,
    /// The reads past the task it journaled, in order.
    pub(super) reads: Vec<String>,
}

impl Dispatcher {
    /// Waits, without an instance, until what a run stopped in a wait for
    /// is in (or timed out), then takes a permit again: what the task has
    /// learned by then, for its next run. Ends with the task's outcome when
    /// it is cancelled, cut off, or past its deadline meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn wait_suspended(
        &self,
        suspension: Suspension,
        link: &TaskLink,
        awaiting: &Mutex<Vec<AwaitedChild>>,
        cancel: &CancelSignal,
        lease_lost: &CancellationToken,
        deadline_at: tokio::time::Instant,
        deadline: Duration,
    ) -> Result<(Learned, OwnedSemaphorePermit), Outcome> {
        let _suspended = self.services.metrics.emit(TaskEvicted {
            waits: suspension.waits.len(),
        });
        let mut conn = self.services.redis.clone();
        let got = tokio::select! {
            got = suspension.wait(&mut conn, &link.origin.session_id, &link.origin.message_id) => got,
            _ = cancel.requested_token.cancelled() => return Err(Outcome::Cancelled(cancel.reason())),
            _ = self.force_stop.cancelled() => return Err(Outcome::CutOff),
            _ = lease_lost.cancelled() => return Err(Outcome::CutOff),
            _ = tokio::time::sleep_until(deadline_at) => {
                return Err(Outcome::Failed(format!(
                    "deadline of {} s exceeded",
                    deadline.as_secs_f64()
                )));
            }
        };
        let got = got.map_err(|error| {
            tracing::warn!(%error, "cannot journal a timed-out wait; entry left pending");
            Outcome::CutOff
        })?;
        let mut learned =
            std::mem::take(&mut *link.learned.lock().expect("learned lock is never poisoned"));
        learned.merge(got);
        // Calls answered while it waited are no longer awaited.
        awaiting
            .lock()
            .expect("awaiting lock is never poisoned")
            .retain(|a| {
                a.child_message_id
                    .as_ref()
                    .is_none_or(|child| !learned.settled(child))
            });
        // A permit again, in line with new work (the semaphore is fair).
        let permit = tokio::select! {
            permit = self.services.permits.clone().acquire_owned() => permit.map_err(|_| Outcome::CutOff)?,
            _ = self.force_stop.cancelled() => return Err(Outcome::CutOff),
            _ = lease_lost.cancelled() => return Err(Outcome::CutOff),
        };
        Ok((learned, permit))
    }

    /// The clock readings and the reads past the task that a run before
    /// this one kept in the journal, in one round trip.
    pub(super) async fn journaled_reads(
        &self,
        session_id: &str,
        message_id: &str,
    ) -> Result<(Option<String>, Vec<String>), redis::RedisError> {
        redis::pipe()
            .cmd("GET")
            .arg(keys::task_journal_clocks(session_id, message_id))
            .cmd("LRANGE")
            .arg(keys::task_journal_reads(session_id, message_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.services.redis.clone())
            .await
    }

    /// How many events of `message_id` its session's stream holds: what a
    /// run before this one emitted (read only on a run after another).
    pub(super) async fn events_emitted(
        &self,
        session_id: &str,
        message_id: &str,
    ) -> Result<usize, redis::RedisError> {
        const PAGE: usize = 500;
        let stream = keys::session_data_stream(session_id);
        let mut conn = self.services.redis.clone();
        let mut start = "-".to_owned();
        let mut emitted = 0;
        loop {
            let page: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            for entry in &page.ids {
                let data: Option<String> = entry.get("data");
                let mine = data
                    .and_then(|data| serde_json::from_str::<serde_json::Value>(&data).ok())
                    .is_some_and(|event| event["message_id"] == message_id);
                if mine {
                    emitted += 1;
                }
            }
            match page.ids.last() {
                Some(last) if page.ids.len() == PAGE => start = format!("({}", last.id),
                _ => return Ok(emitted),
            }
        }
    }
}
