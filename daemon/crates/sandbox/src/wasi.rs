//! What a guest can reach: the task's two workspace directories (laid out as
//! the reference SDK lays them out), the read-only directories its policy
//! grants, and a stdout/stderr that lands in the daemon's log. No
//! environment, no arguments, no sockets, no other files.

use crate::output::OutputBudget;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

/// Where the private workspace appears inside the sandbox.
pub const GUEST_PRIVATE_DIR: &str = "/workspace/private";
/// Where the session's public workspace appears inside the sandbox.
pub const GUEST_PUBLIC_DIR: &str = "/workspace/public";

/// Host paths of one task's workspace.
#[derive(Debug, Clone)]
pub struct TaskDirs {
    /// `{base}/{session}/private/{message}`: removed when the task ends.
    pub private: PathBuf,
    /// `{base}/{session}/public`: kept with the session.
    pub public: PathBuf,
}

impl TaskDirs {
    /// The layout for a task. Ids were validated as plain path segments.
    pub fn new(base: &Path, session_id: &str, message_id: &str) -> Self {
        let session = base.join(session_id);
        TaskDirs {
            private: session.join("private").join(message_id),
            public: session.join("public"),
        }
    }

    /// Creates the directories (blocking). A private directory left by an
    /// earlier attempt of the same task (its daemon died, or another worker
    /// took the entry over) is emptied first: the task starts again from
    /// the beginning, so it starts from what the first attempt saw.
    pub fn create(&self) -> io::Result<()> {
        for sub in ["session", "memory/local_db", "agent_skills"] {
            std::fs::create_dir_all(self.public.join(sub))?;
        }
        self.remove_private()?;
        std::fs::create_dir_all(&self.private)?;
        for sub in ["input", "temp", "output", "system"] {
            std::fs::create_dir(self.private.join(sub))?;
        }
        Ok(())
    }

    /// Removes the private directory (blocking).
    pub fn remove_private(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.private) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Builds the WASI context of one store.
pub fn wasi_context(
    dirs: Option<&TaskDirs>,
    read_only: &[(std::path::PathBuf, String)],
    plugin: Arc<str>,
    message_id: Arc<str>,
    output: Arc<OutputBudget>,
    random: Option<crate::random::StoreRandom>,
    clocks: Option<&Arc<crate::clock::TaskClocks>>,
) -> io::Result<WasiCtx> {
    let mut builder = WasiCtxBuilder::new();
    if let Some(clocks) = clocks {
        let (wall, monotonic) = clocks.for_store();
        builder.wall_clock(wall).monotonic_clock(monotonic);
    }
    if let Some(random) = random {
        builder
            .secure_random(random.secure)
            .insecure_random(random.insecure)
            .insecure_random_seed(random.insecure_seed);
    }
    builder
        .stdout(GuestLog {
            plugin: plugin.clone(),
            message_id: message_id.clone(),
            stream: "stdout",
            output: output.clone(),
        })
        .stderr(GuestLog {
            plugin,
            message_id,
            stream: "stderr",
            output,
        })
        .allow_ip_name_lookup(false)
        .allow_tcp(false)
        .allow_udp(false);
    if let Some(dirs) = dirs {
        builder
            .preopened_dir(&dirs.private, GUEST_PRIVATE_DIR, FsPerms::ReadWrite)
            .map_err(|e| io::Error::other(format!("{}: {e}", dirs.private.display())))?;
        builder
            .preopened_dir(&dirs.public, GUEST_PUBLIC_DIR, FsPerms::ReadWrite)
            .map_err(|e| io::Error::other(format!("{}: {e}", dirs.public.display())))?;
    }
    for (host, guest) in read_only {
        builder
            .preopened_dir(host, guest, FsPerms::ReadOnly)
            .map_err(|e| io::Error::other(format!("{}: {e}", host.display())))?;
    }
    Ok(builder.build())
}

/// Guest stdout or stderr, written line by line to the daemon's log.
#[derive(Clone)]
struct GuestLog {
    plugin: Arc<str>,
    message_id: Arc<str>,
    stream: &'static str,
    /// Shared with the store's other output: what it may still log.
    output: Arc<OutputBudget>,
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            target: self.clone(),
            pending: Vec::new(),
        })
    }
}

/// Longest line logged as one record; longer output is split.
const MAX_LINE: usize = 4096;

struct LineWriter {
    target: GuestLog,
    /// Bytes of an unfinished line.
    pending: Vec<u8>,
}

impl LineWriter {
    fn log(&self, line: &[u8]) {
        if !self.target.output.admit(line.len()) {
            return;
        }
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        tracing::info!(
            plugin = %self.target.plugin,
            message_id = %self.target.message_id,
            stream = self.target.stream,
            "{text}"
        );
    }
}

impl tokio::io::AsyncWrite for LineWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut rest = buf;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                self.log(&rest[..newline]);
            } else {
                let mut line = std::mem::take(&mut self.pending);
                line.extend_from_slice(&rest[..newline]);
                self.log(&line);
            }
            rest = &rest[newline + 1..];
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.pending);
            self.log(&line);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.log(&line);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.log(&line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_task_gets_a_clean_private_directory() {
        let root = tempfile::tempdir().unwrap();
        let dirs = TaskDirs::new(root.path(), "session-1", "message-1");
        dirs.create().unwrap();
        let left = dirs.private.join("output/partial.txt");
        std::fs::write(&left, b"from the first attempt").unwrap();
        std::fs::write(dirs.public.join("session/kept.txt"), b"shared").unwrap();

        // The first attempt's daemon died; the retry creates the same dirs.
        dirs.create().unwrap();
        assert!(!left.exists(), "the first attempt's files are gone");
        assert!(dirs.private.join("output").is_dir());
        assert!(
            dirs.public.join("session/kept.txt").exists(),
            "the session's public files stay"
        );
    }
}
