//! Task workspaces on the host file system, laid out as the reference SDK
//! lays them out: `{base}/{session}/public/{session,memory/local_db,agent_skills}`
//! (kept with the session) and `{base}/{session}/private/{message}/{input,temp,output,system}`
//! (removed when the task ends).
//!
//! Directory creation and removal are blocking system calls. They run on one
//! dedicated thread fed by a bounded queue: under load it drains jobs back to
//! back instead of paying a thread hand-off per call, and removal never
//! delays a task's completion.

use byclaw_sandbox::TaskDirs;
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use tokio::sync::oneshot;

enum Job {
    Create(TaskDirs, oneshot::Sender<io::Result<()>>),
    Remove(TaskDirs),
}

/// Handle to the workspace thread; the thread ends, after draining its
/// queue, when the last handle is dropped.
#[derive(Clone)]
pub struct Workspaces {
    base: PathBuf,
    jobs: SyncSender<Job>,
}

/// Jobs queued before callers fall back to a blocking-pool thread each.
const QUEUE: usize = 4096;

impl Workspaces {
    /// Starts the workspace thread for directories under `base`.
    pub fn start(base: PathBuf) -> io::Result<Self> {
        let (jobs, queue) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("workspace-fs".into())
            .spawn(move || run(queue))?;
        Ok(Workspaces { base, jobs })
    }

    /// The directories of a task.
    pub fn dirs(&self, session_id: &str, message_id: &str) -> TaskDirs {
        TaskDirs::new(&self.base, session_id, message_id)
    }

    /// Creates a task's directories.
    pub async fn create(&self, dirs: &TaskDirs) -> io::Result<()> {
        let (done, result) = oneshot::channel();
        match self.jobs.try_send(Job::Create(dirs.clone(), done)) {
            Ok(()) => result
                .await
                .unwrap_or_else(|_| Err(io::Error::other("workspace thread stopped"))),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let dirs = dirs.clone();
                tokio::task::spawn_blocking(move || dirs.create())
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }

    /// Removes a task's private directory, in the background.
    pub fn remove_private(&self, dirs: TaskDirs) {
        if let Err(
            TrySendError::Full(Job::Remove(dirs)) | TrySendError::Disconnected(Job::Remove(dirs)),
        ) = self.jobs.try_send(Job::Remove(dirs))
        {
            tokio::task::spawn_blocking(move || log_removal(&dirs, dirs.remove_private()));
        }
    }
}

fn log_removal(dirs: &TaskDirs, result: io::Result<()>) {
    if let Err(error) = result {
        tracing::warn!(dir = %dirs.private.display(), %error, "cannot remove the private workspace");
    }
}

fn run(queue: Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        match job {
            Job::Create(dirs, done) => {
                let _ = done.send(dirs.create());
            }
            Job::Remove(dirs) => log_removal(&dirs, dirs.remove_private()),
        }
    }
}
