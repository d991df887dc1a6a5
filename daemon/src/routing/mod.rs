//! Reply routing: which task awaits which RESUME, and on which worker it runs.
//!
//! A RESUME lands on a capability stream, where any worker of that capability
//! may read it. A task that waits for one (in `call-agent`, `dispatch-group`
//! or `ask-user`) registers two things before it sends anything:
//!
//! - in process, a [`Waiting`] slot in [`Waiters`], keyed by the
//!   [`WaitKey`] the answer will carry;
//! - in Redis, a route `byai_gateway:await:<capability>:<kind>:<message id>`
//!   naming this worker, with a TTL a little past the wait.
//!
//! The daemon that reads the RESUME hands it to a local waiter if it has
//! one; else it looks the route up and, when the route names another live
//! worker, forwards the entry to that worker's control stream (the XADD and
//! the XACK in one pipeline). A RESUME with no waiter anywhere — the wait
//! timed out, the daemon restarted, the route expired or names a dead worker
//! — is an *orphan* and runs through the plugin's handler as a RESUME
//! command, as the reference worker would run it. A route whose wait was
//! answered or cancelled holds a marker instead of a worker id: a second
//! reply (a duplicate RESUME, a redelivered entry, a client that answered
//! twice) or a late one finds it and is acknowledged and dropped, never run.
//!
//! One task may ask the user several times, all under one key (a client's
//! answer names only the task). Each prompt has an id (`<message id>:u<n>`,
//! in the form event's and WAITING_USER's metadata); an answer that names
//! a prompt (`prompt_id` in its `reply_data` or `extra_payload`) reaches
//! that prompt only, and no answer is taken twice by one task.
//!
//! The kind (`agent` when the RESUME has a `source_agent_id`, `user` when a
//! client sent it) keeps a child's reply and the answer to the child's own
//! `ask-user` apart: both carry the child's message id.
//!
//! Every reply or answer to a task that is still unfinished is also kept in
//! the task's journal: see `journal.rs`.

mod journal;

pub use journal::{
    JOURNAL_TIMED_OUT, Journaled, Route, Routed, journal_timeouts, journal_write, route_reply,
    route_then_read_journal,
};

use crate::events::Write;
use byclaw_protocol::{self as wire, Header};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// Route value of a cancelled waiter: its replies are dropped.
pub const TOMBSTONE: &str = "!cancelled";
/// Route value of an answered wait: further replies are dropped.
pub const ANSWERED: &str = "!answered";
/// Lifetime of a task's journal, seconds: as long as a task group's.
pub const JOURNAL_TTL_S: u64 = 86_400;

/// Who sends the awaited RESUME.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    /// Another agent answering a call (`source_agent_id` set).
    Agent,
    /// A client answering `ask-user` (`source_agent_id` empty).
    User,
}

impl ReplyKind {
    fn as_str(self) -> &'static str {
        match self {
            ReplyKind::Agent => "agent",
            ReplyKind::User => "user",
        }
    }
}

/// What identifies an awaited RESUME.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WaitKey {
    /// The capability stream the RESUME is sent to (the waiter's agent type).
    pub capability: String,
    pub kind: ReplyKind,
    /// The RESUME's `parent_message_id`: the child's message id for a call,
    /// the waiting task's own message id for `ask-user`.
    pub message_id: String,
}

impl WaitKey {
    /// The key a RESUME read from `capability` answers.
    pub fn for_resume(capability: &str, header: &Header) -> Self {
        WaitKey {
            capability: capability.to_owned(),
            kind: if header.source_agent_id.is_empty() {
                ReplyKind::User
            } else {
                ReplyKind::Agent
            },
            message_id: header.parent_message_id.clone(),
        }
    }

    /// `byai_gateway:await:<capability>:<kind>:<message id>`.
    pub fn redis_key(&self) -> String {
        format!(
            "{}:await:{}:{}:{}",
            wire::PREFIX,
            self.capability,
            self.kind.as_str(),
            self.message_id
        )
    }

    /// The write that points the route at `worker_id` for `ttl`.
    pub fn route(&self, worker_id: &str, ttl: Duration) -> Write {
        Write::Command(self.route_cmd(worker_id, None, ttl))
    }

    /// The SET of the route: the worker and, for an `ask-user` wait, the
    /// prompt waited for (`<worker> <prompt id>`), so that whoever reads an
    /// answer that names no prompt journals it under the right one.
    pub fn route_cmd(&self, worker_id: &str, prompt_id: Option<&str>, ttl: Duration) -> redis::Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key());
        match prompt_id {
            Some(prompt) => cmd.arg(format!("{worker_id} {prompt}")),
            None => cmd.arg(worker_id),
        };
        cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        cmd
    }

    /// The task whose journal keeps a reply to this key, and the field:
    /// for a user's answer the task itself under the prompt `prompt_id`;
    /// for an agent's reply the caller whose deterministic call id the
    /// child's message id is (`<caller>:c<n>`, `<caller>:g<n>.<k>`) under
    /// that id. `None` for a child of a caller that names its calls
    /// otherwise (a reference worker's random ids) or an unknown prompt.
    pub fn journal_entry(&self, prompt_id: Option<&str>) -> Option<(String, String)> {
        match self.kind {
            ReplyKind::User => prompt_id.map(|prompt| (self.message_id.clone(), prompt.to_owned())),
            ReplyKind::Agent => {
                let (caller, call) = self.message_id.rsplit_once(':')?;
                let numbered = |rest: &str| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                };
                let ours = call
                    .strip_prefix('c')
                    .or_else(|| call.strip_prefix('g'))
                    .is_some_and(numbered);
                (ours && !caller.is_empty()).then(|| (caller.to_owned(), self.message_id.clone()))
            }
        }
    }

    /// The write that marks the route cancelled (if it still exists), so a
    /// late reply is dropped instead of run as an orphan.
    pub fn tombstone(&self) -> Write {
        self.mark(TOMBSTONE)
    }

    /// The write that marks the wait answered (if its route still exists),
    /// so a second reply is dropped instead of run as an orphan.
    pub fn answered(&self) -> Write {
        self.mark(ANSWERED)
    }

    fn mark(&self, marker: &str) -> Write {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.redis_key())
            .arg(marker)
            .arg("XX")
            .arg("KEEPTTL");
        Write::Command(cmd)
    }
}

/// What a waiter accepts besides its key.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// The waiting task's session: a reply from another session is
    /// refused, so knowing a message id is not enough to answer a task.
    pub session_id: String,
    /// The waiting task's tenant (`header.tenant_id`); a reply must carry
    /// the same.
    pub tenant_id: String,
    /// The prompt waited for: an answer naming another prompt is stale.
    pub prompt_id: Option<String>,
    /// RESUME message ids the task has taken already: never taken twice.
    pub taken: Vec<String>,
}

impl Expect {
    /// Whether the waiter would take `reply` (a journaled one, on a run
    /// after a crash: the same checks as a live reply's).
    pub fn accepts(&self, reply: &Reply) -> bool {
        self.judge(reply) == Delivered::Taken
    }

    /// What the waiter makes of `reply`.
    fn judge(&self, reply: &Reply) -> Delivered {
        if reply.session_id != self.session_id || reply.tenant_id != self.tenant_id {
            return Delivered::Foreign;
        }
        if self.taken.contains(&reply.message_id) {
            return Delivered::Stale;
        }
        match (&self.prompt_id, reply.prompt_id()) {
            (Some(expected), Some(named)) if expected != named => Delivered::Stale,
            _ => Delivered::Taken,
        }
    }
}

/// What became of a reply handed to [`Waiters::deliver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Its waiter has it.
    Taken,
    /// A waiter exists but the reply answers an earlier prompt, or was
    /// taken before: drop it.
    Stale,
    /// A waiter exists but the reply comes from another session or tenant
    /// than the task's: refuse it (the waiter keeps waiting).
    Foreign,
    /// Nobody here waits for it.
    NoWaiter,
}

/// A RESUME as the waiter receives it (and as the task's journal keeps it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// The RESUME's own message id.
    pub message_id: String,
    /// Who answered (`header.source_agent_id`; empty for a user).
    pub source_agent_id: String,
    /// The session it was sent in (`header.session_id`).
    pub session_id: String,
    /// The tenant it was sent for (`header.tenant_id`).
    pub tenant_id: String,
    pub status: String,
    pub content: Value,
    pub reply_data: Value,
    pub extra_payload: Value,
}

impl Reply {
    /// The prompt an answer names, if its client said which.
    pub fn prompt_id(&self) -> Option<&str> {
        [&self.reply_data, &self.extra_payload]
            .into_iter()
            .find_map(|v| v.get("prompt_id").and_then(Value::as_str))
    }
}

/// A registered waiter's end of the channel, tagged so a replaced
/// registration does not unregister its successor.
type Slot = (u64, Expect, oneshot::Sender<Reply>);

/// The waiters of this daemon.
#[derive(Debug, Default)]
pub struct Waiters {
    slots: Mutex<HashMap<WaitKey, Slot>>,
    /// Source of registration tags.
    next_tag: std::sync::atomic::AtomicU64,
}

impl Waiters {
    /// Registers a waiter that takes only the replies `expect` accepts.
    /// Register before sending what will be answered. A second
    /// registration of the same key replaces the first (whose `recv` then
    /// ends with `None`).
    pub fn register_expecting(self: &Arc<Self>, key: WaitKey, expect: Expect) -> Waiting {
        let (tx, rx) = oneshot::channel();
        let tag = self
            .next_tag
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(key.clone(), (tag, expect, tx));
        Waiting {
            key,
            tag,
            rx,
            waiters: self.clone(),
        }
    }

    /// Hands a reply to its waiter.
    pub fn deliver(&self, key: &WaitKey, reply: Reply) -> Delivered {
        self.deliver_to_prompt(key, reply).0
    }

    /// Hands a reply to its waiter; when taken, also the prompt the waiter
    /// waited for (an `ask-user` wait's).
    pub fn deliver_to_prompt(&self, key: &WaitKey, reply: Reply) -> (Delivered, Option<String>) {
        let mut slots = self.lock();
        let Some((_, expect, _)) = slots.get(key) else {
            return (Delivered::NoWaiter, None);
        };
        let judged = expect.judge(&reply);
        if judged != Delivered::Taken {
            return (judged, None);
        }
        let (_, expect, tx) = slots.remove(key).expect("looked up above");
        drop(slots);
        if tx.send(reply).is_ok() {
            (Delivered::Taken, expect.prompt_id)
        } else {
            (Delivered::NoWaiter, None)
        }
    }

    /// How many waits are in progress.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WaitKey, Slot>> {
        self.slots.lock().expect("waiters lock is never poisoned")
    }
}

/// One registered wait; dropping it unregisters.
#[derive(Debug)]
pub struct Waiting {
    key: WaitKey,
    /// Which registration of `key` this is.
    tag: u64,
    rx: oneshot::Receiver<Reply>,
    waiters: Arc<Waiters>,
}

impl Waiting {
    /// The key this waits for.
    pub fn key(&self) -> &WaitKey {
        &self.key
    }

    /// Waits for the reply. `None` when the registration was replaced.
    pub async fn recv(&mut self) -> Option<Reply> {
        (&mut self.rx).await.ok()
    }

    /// Unregisters and returns a reply that was delivered in the meantime
    /// (so a reply racing a timeout is not lost).
    pub fn close(mut self) -> Option<Reply> {
        self.unregister();
        self.rx.try_recv().ok()
    }

    fn unregister(&mut self) {
        let mut slots = self.waiters.lock();
        if slots
            .get(&self.key)
            .is_some_and(|(tag, _, _)| *tag == self.tag)
        {
            slots.remove(&self.key);
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> WaitKey {
        WaitKey {
            capability: "planner".into(),
            kind: ReplyKind::Agent,
            message_id: id.into(),
        }
    }

    fn reply(id: &str) -> Reply {
        Reply {
            message_id: id.into(),
            source_agent_id: "translator".into(),
            session_id: "sess-1".into(),
            tenant_id: "acme".into(),
            status: "COMPLETED".into(),
            content: Value::Null,
            reply_data: Value::Null,
            extra_payload: Value::Null,
        }
    }

    /// What a task of session `sess-1`, tenant `acme`, expects.
    fn owned() -> Expect {
        Expect {
            session_id: "sess-1".into(),
            tenant_id: "acme".into(),
            ..Expect::default()
        }
    }

    impl Waiters {
        fn register(self: &Arc<Self>, key: WaitKey) -> Waiting {
            self.register_expecting(key, owned())
        }
    }

    #[tokio::test]
    async fn a_reply_from_another_session_or_tenant_is_refused_and_the_task_waits_on() {
        let waiters = Arc::new(Waiters::default());
        let mut waiting = waiters.register(key("msg-a"));
        let mut other_session = reply("r-1");
        other_session.session_id = "sess-globex".into();
        assert_eq!(
            waiters.deliver(&key("msg-a"), other_session),
            Delivered::Foreign
        );
        let mut other_tenant = reply("r-2");
        other_tenant.tenant_id = "globex".into();
        assert_eq!(
            waiters.deliver(&key("msg-a"), other_tenant),
            Delivered::Foreign
        );
        assert_eq!(
            waiters.deliver(&key("msg-a"), reply("r-3")),
            Delivered::Taken
        );
        assert_eq!(waiting.recv().await.unwrap().message_id, "r-3");
    }

    #[tokio::test]
    async fn delivered_reply_reaches_its_waiter_only() {
        let waiters = Arc::new(Waiters::default());
        let mut a = waiters.register(key("msg-a"));
        let _b = waiters.register(key("msg-b"));
        assert_eq!(
            waiters.deliver(&key("msg-a"), reply("r1")),
            Delivered::Taken
        );
        assert_eq!(a.recv().await.unwrap().message_id, "r1");
        // Nobody waits for msg-c; a second reply to msg-a finds no waiter.
        assert_eq!(
            waiters.deliver(&key("msg-c"), reply("r2")),
            Delivered::NoWaiter
        );
        assert_eq!(
            waiters.deliver(&key("msg-a"), reply("r3")),
            Delivered::NoWaiter
        );
        assert_eq!(waiters.len(), 1);
    }

    #[tokio::test]
    async fn dropped_or_closed_waiters_unregister() {
        let waiters = Arc::new(Waiters::default());
        drop(waiters.register(key("msg-a")));
        assert!(waiters.is_empty());
        assert_eq!(
            waiters.deliver(&key("msg-a"), reply("r")),
            Delivered::NoWaiter
        );

        let waiting = waiters.register(key("msg-b"));
        assert_eq!(
            waiters.deliver(&key("msg-b"), reply("late")),
            Delivered::Taken
        );
        // The reply raced the timeout: close() still returns it.
        assert_eq!(waiting.close().unwrap().message_id, "late");
        assert!(waiters.is_empty());
    }

    #[tokio::test]
    async fn a_second_prompt_takes_neither_an_answer_to_the_first_nor_one_taken_before() {
        let waiters = Arc::new(Waiters::default());
        let expect = Expect {
            prompt_id: Some("msg-a:u2".into()),
            taken: vec!["answer-1".into()],
            ..owned()
        };
        let mut second = waiters.register_expecting(key("msg-a"), expect);
        // The first prompt's answer, delivered again.
        assert_eq!(
            waiters.deliver(&key("msg-a"), reply("answer-1")),
            Delivered::Stale
        );
        // A late answer naming the first prompt.
        let mut late = reply("answer-1b");
        late.reply_data = serde_json::json!({ "prompt_id": "msg-a:u1" });
        assert_eq!(waiters.deliver(&key("msg-a"), late), Delivered::Stale);
        // The answer to the second prompt, by id or without one.
        let mut answer = reply("answer-2");
        answer.extra_payload = serde_json::json!({ "prompt_id": "msg-a:u2" });
        assert_eq!(waiters.deliver(&key("msg-a"), answer), Delivered::Taken);
        assert_eq!(second.recv().await.unwrap().message_id, "answer-2");
    }

    #[test]
    fn a_reply_is_journaled_for_the_caller_whose_call_id_it_answers() {
        assert_eq!(
            key("msg-1:c2").journal_entry(None),
            Some(("msg-1".into(), "msg-1:c2".into()))
        );
        assert_eq!(
            key("msg-1:c1:g3.2").journal_entry(None),
            Some(("msg-1:c1".into(), "msg-1:c1:g3.2".into()))
        );
        // A reference caller's random child ids have no caller to journal for.
        assert_eq!(key("msg-0badf00d").journal_entry(None), None);
        assert_eq!(key("msg-1:x2").journal_entry(None), None);
        assert_eq!(key(":c2").journal_entry(None), None);
        let user = WaitKey {
            kind: ReplyKind::User,
            ..key("msg-1")
        };
        assert_eq!(
            user.journal_entry(Some("msg-1:u2")),
            Some(("msg-1".into(), "msg-1:u2".into()))
        );
        assert_eq!(user.journal_entry(None), None);
    }

    #[test]
    fn user_and_agent_replies_to_one_message_are_told_apart() {
        let mut header = Header {
            parent_message_id: "msg-1".into(),
            ..Header::default()
        };
        let user = WaitKey::for_resume("translator", &header);
        header.source_agent_id = "translator".into();
        let agent = WaitKey::for_resume("translator", &header);
        assert_ne!(user, agent);
        assert_eq!(
            agent.redis_key(),
            "byai_gateway:await:translator:agent:msg-1"
        );
        assert_eq!(user.redis_key(), "byai_gateway:await:translator:user:msg-1");
    }
}
