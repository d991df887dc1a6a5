//! `history`: the session's recent messages, from the configured store.

use super::TaskState;
use crate::history::HistoryError;
use crate::plugin::bindings::GuestError;
use crate::plugin::bindings::byclaw::gateway::history::{HistoryEntry, Host};

/// Most entries one call returns.
const MAX_LIMIT: u32 = 1000;

impl Host for TaskState {
    async fn recent(
        &mut self,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<HistoryEntry>, GuestError>> {
        let _timer = self.timed(crate::metrics::HostImport::HistoryRecent);
        let shared = self.host("history.recent")?.shared.clone();
        let read = shared
            .services
            .history
            .read(&shared.origin.session_id, limit.min(MAX_LIMIT) as usize)
            .await;
        Ok(match read {
            Ok(entries) => Ok(entries
                .into_iter()
                .map(|entry| HistoryEntry {
                    role: entry.role.as_str().to_owned(),
                    content: entry.content,
                    metadata: entry.metadata.to_string(),
                })
                .collect()),
            Err(HistoryError::Off) => Ok(Vec::new()),
            Err(error) => Err(GuestError::Unavailable(format!(
                "the session history cannot be read: {error}"
            ))),
        })
    }
}
