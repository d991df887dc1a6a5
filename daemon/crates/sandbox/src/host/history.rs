//! `history`: the session's recent messages, from the daemon's store.

use super::TaskState;
use crate::bindings::GuestError;
use crate::bindings::byclaw::gateway::history::{HistoryEntry, Host};
use crate::port::HostImport;

/// Most entries one call returns.
const MAX_LIMIT: u32 = 1000;

impl Host for TaskState {
    async fn recent(
        &mut self,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<HistoryEntry>, GuestError>> {
        let _timer = self.timed(HostImport::HistoryRecent);
        let task = self.host("history.recent")?.task.clone();
        Ok(task
            .port
            .history_recent(limit.min(MAX_LIMIT) as usize)
            .await)
    }
}
