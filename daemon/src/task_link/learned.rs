//! What a task learned from outside — replies, answers, timed-out waits,
//! reads past it, clock readings — kept in memory for its next run and
//! written to its journal ahead of its events; and the task's eviction: a
//! wait that drops the instance leaves a [`Suspension`] the dispatcher
//! waits on before it runs the task again from what it learned.

use super::{Stopping, TaskLink};
use crate::events::Write;
use crate::routing::{self, Expect, Journaled, Reply, Waiting};
use byclaw_client::connection::Connection;
use byclaw_protocol::keys;
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use tokio::sync::OwnedSemaphorePermit;

/// What a task learned from outside, by call or prompt id: a run after
/// this one is given it without asking Redis (the journal holds the same).
#[derive(Debug, Default)]
pub struct Learned {
    /// Replies of agents and answers of the user.
    pub replies: std::collections::HashMap<String, Reply>,
    /// Calls and prompts whose wait timed out.
    pub timed_out: std::collections::HashSet<String>,
    /// Each read past the task, in the order they started, as its journal
    /// keeps it; `None` while a read is in progress, or for one not kept.
    pub reads: Vec<Option<String>>,
    /// Bytes of `reads`, bounded.
    pub reads_bytes: usize,
    /// How many of `reads` the journal holds.
    pub reads_journaled: usize,
}

/// What one learned fact says of a call.
pub(super) enum Known {
    Reply(Box<Reply>),
    TimedOut,
}

impl Known {
    /// What a journal entry tells a wait that expects `expect`: a reply
    /// it would not take (another session's) tells it nothing.
    pub(super) fn from_journal(entry: Option<Journaled>, expect: &Expect) -> Option<Known> {
        match entry? {
            Journaled::Reply(reply) => expect.accepts(&reply).then_some(Known::Reply(reply)),
            Journaled::TimedOut => Some(Known::TimedOut),
        }
    }
}

impl Learned {
    /// What a run after a crash starts from: the reads its journal holds.
    pub fn from_journal(reads: Vec<String>) -> Learned {
        Learned {
            reads_bytes: reads.iter().map(String::len).sum(),
            reads_journaled: reads.len(),
            reads: reads.into_iter().map(Some).collect(),
            ..Learned::default()
        }
    }

    /// Takes in what a wait without an instance ended with: each call's
    /// reply, or `None` when it timed out.
    pub fn merge(&mut self, got: Vec<(String, Option<Reply>)>) {
        for (id, reply) in got {
            self.learn(id, reply);
        }
    }

    fn learn(&mut self, id: String, reply: Option<Reply>) {
        match reply {
            Some(reply) => {
                self.replies.insert(id, reply);
            }
            None => {
                self.timed_out.insert(id);
            }
        }
    }

    /// Whether the call or prompt `id` was answered or timed out.
    pub fn settled(&self, id: &str) -> bool {
        self.replies.contains_key(id) || self.timed_out.contains(id)
    }

    fn known(&self, id: &str) -> Option<Known> {
        if let Some(reply) = self.replies.get(id) {
            return Some(Known::Reply(Box::new(reply.clone())));
        }
        self.timed_out.contains(id).then_some(Known::TimedOut)
    }
}

/// A task whose instance was dropped while it waited: the waits it was in,
/// still registered, so a reply arriving now is taken (and journaled) here.
pub struct Suspension {
    /// The call or prompt id of each wait, and its waiter.
    pub waits: Vec<(String, Waiting)>,
    /// What the waits take: a reply the journal holds for a wait that timed
    /// out is taken only if the waiter would have taken it.
    pub expect: Expect,
    /// When the call stops waiting (its timeout).
    pub until: tokio::time::Instant,
    /// Its place under `worker.max_suspended`.
    pub slot: OwnedSemaphorePermit,
}

impl Suspension {
    /// Waits until every reply is in or the call's timeout passes: what
    /// came in and what timed out, by id, for [`Learned`]. Timeouts are
    /// journaled first (see [`routing::journal_timeouts`]), for the task
    /// `message_id`.
    pub async fn wait(
        self,
        conn: &mut Connection,
        session_id: &str,
        message_id: &str,
    ) -> Result<Vec<(String, Option<Reply>)>, redis::RedisError> {
        let Suspension {
            mut waits,
            until,
            expect,
            ..
        } = self;
        let mut got: Vec<(usize, Option<Reply>)> = Vec::with_capacity(waits.len());
        {
            let mut pending: FuturesUnordered<_> = waits
                .iter_mut()
                .enumerate()
                .map(|(index, (_, waiting))| async move { (index, waiting.recv().await) })
                .collect();
            loop {
                tokio::select! {
                    // A reply already in is taken before the timeout.
                    biased;
                    next = pending.next() => match next {
                        Some(done) => got.push(done),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            // Replies that raced the timeout.
            while let Some(Some(done)) = pending.next().now_or_never() {
                got.push(done);
            }
        }
        let mut results: Vec<(String, Option<Reply>)> = Vec::with_capacity(waits.len());
        for (index, (id, waiting)) in waits.into_iter().enumerate() {
            let reply = match got.iter_mut().find(|(done, _)| *done == index) {
                Some((_, reply)) => reply.take(),
                None => waiting.close(),
            };
            results.push((id, reply));
        }
        let timed_out: Vec<String> = results
            .iter()
            .filter(|(_, reply)| reply.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if !timed_out.is_empty() {
            let won = routing::journal_timeouts(conn, session_id, message_id, &timed_out).await?;
            for (id, reply) in timed_out.into_iter().zip(won) {
                if let Some(reply) = reply.filter(|reply| expect.accepts(reply))
                    && let Some(slot) = results.iter_mut().find(|(at, _)| *at == id)
                {
                    slot.1 = Some(reply);
                }
            }
        }
        Ok(results)
    }
}

impl TaskLink {
    /// Whether the task may drop its instance while it waits: everything it
    /// learned so far is in its journal, and its clock readings are kept
    /// (no read is still in progress).
    pub(super) fn evictable(&self) -> bool {
        self.unjournaled_by.get().is_none()
            && self.clocks.replayable()
            && !self.is_closed()
            && self
                .learned
                .lock()
                .expect("learned lock is never poisoned")
                .reads
                .iter()
                .all(Option::is_some)
    }

    /// A place under `worker.max_suspended`, if the task may drop its
    /// instance now.
    pub(super) fn suspended_slot(&self) -> Option<OwnedSemaphorePermit> {
        if !self.evictable() {
            return None;
        }
        self.services
            .suspended_slots
            .clone()
            .try_acquire_owned()
            .ok()
    }

    /// When a wait starting now drops the instance, if it may.
    pub(super) fn evict_at(&self) -> Option<tokio::time::Instant> {
        self.evictable()
            .then(|| tokio::time::Instant::now() + self.services.evict_after)
    }

    /// Ends the run in a wait: its waiters stay registered in `suspension`,
    /// its permit goes back, nothing more of the run is written; the guest
    /// is stopped by the `Stopping` this returns.
    pub(super) fn suspend(
        &self,
        waits: Vec<(String, Waiting)>,
        expect: Expect,
        until: tokio::time::Instant,
        slot: OwnedSemaphorePermit,
    ) -> Stopping {
        self.close();
        drop(
            self.permit
                .lock()
                .expect("permit lock is never poisoned")
                .take(),
        );
        *self
            .suspension
            .lock()
            .expect("suspension lock is never poisoned") = Some(Suspension {
            waits,
            expect,
            until,
            slot,
        });
        Stopping
    }

    /// Journals that the waits for `ids` timed out (see
    /// [`routing::journal_timeouts`]); for each, the reply `expect` takes
    /// that got into the journal first, if one did. Stops the run when the
    /// journal cannot be written: the entry stays pending and runs again.
    pub(super) async fn journal_timeouts(
        &self,
        ids: &[String],
        expect: &Expect,
    ) -> Result<Vec<Option<Reply>>, Stopping> {
        let won = routing::journal_timeouts(
            &mut self.services.redis.clone(),
            &self.origin.session_id,
            &self.origin.message_id,
            ids,
        )
        .await;
        match won {
            Ok(won) => Ok(won
                .into_iter()
                .map(|reply| reply.filter(|reply| expect.accepts(reply)))
                .collect()),
            Err(error) => {
                tracing::warn!(%error, "cannot journal a timed-out wait; run stopped, entry left pending");
                Err(Stopping)
            }
        }
    }

    /// What the task read from outside since its journal last took it —
    /// reads past the task and clock readings — for the journal. Written
    /// ahead of every batch of the task's writes, so a run after a crash
    /// reads what the first run read before each event it emitted.
    pub(super) fn journal_writes(&self) -> Vec<Write> {
        let mut writes = Vec::new();
        if let Some(reads) = self.reads_write() {
            writes.extend(reads);
        }
        if let Some(clocks) = self.clocks.journal_if_new() {
            let key = keys::task_journal_clocks(&self.origin.session_id, &self.origin.message_id);
            let mut append = redis::cmd("APPEND");
            append.arg(&key).arg(clocks);
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(&key).arg(routing::JOURNAL_TTL_S);
            writes.extend([Write::Command(append), Write::Command(expire)]);
        }
        writes
    }

    /// `writes`, after what the journal must hold before them.
    pub(super) fn with_journal(&self, writes: Vec<Write>) -> Vec<Write> {
        let mut journal = self.journal_writes();
        if journal.is_empty() {
            return writes;
        }
        journal.extend(writes);
        journal
    }

    /// Takes what a wait that dropped the instance left.
    pub fn take_suspension(&self) -> Option<Suspension> {
        self.suspension
            .lock()
            .expect("suspension lock is never poisoned")
            .take()
    }

    pub(super) fn learn(&self, id: &str, reply: Option<&Reply>) {
        self.learned
            .lock()
            .expect("learned lock is never poisoned")
            .learn(id.to_owned(), reply.cloned());
    }

    pub(super) fn known(&self, id: &str) -> Option<Known> {
        self.learned
            .lock()
            .expect("learned lock is never poisoned")
            .known(id)
    }
}
