//! One client's view of a session's events: a reader task that follows the
//! data stream with `XREAD BLOCK` on its own connection and fills a bounded
//! queue that the SSE response or the WebSocket drains.
//!
//! A client that reads too slowly fills its queue. Its reader waits for
//! room at most `bridge.stall_timeout_ms` (no other client waits with it:
//! each has its own reader), then gives up on it and flags the stream as
//! failed, so the connection is dropped. The client reconnects from the last
//! event id it saw and misses nothing: the data stream is the buffer. The
//! short wait lets a client catch up on a backlog, which Redis serves
//! faster than any socket drains.

use super::AppState;
use super::api::ApiError;
use super::auth::Caller;
use byclaw_client::{EventReader, SessionEvent};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

/// Longest single XREAD BLOCK; a closed client or a shutdown interrupts it.
const READ_BLOCK: Duration = Duration::from_secs(10);

/// Most events one read asks for.
const READ_COUNT: usize = 100;

/// The receiving end of one client's events.
pub struct EventStream {
    /// Events in stream order, at most `bridge.buffer` waiting. Ends (None)
    /// when the bridge shuts down.
    pub events: mpsc::Receiver<SessionEvent>,
    /// Cancelled when the client fell behind or the read failed: drop the
    /// connection now, without flushing what is queued.
    pub failed: CancellationToken,
}

/// Whether `id` is a stream entry id a client may resume after (`0`,
/// `1732500000000`, `1732500000000-3`).
pub fn is_entry_id(id: &str) -> bool {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    digits(ms) && digits(seq)
}

/// Opens a stream of `session_id`'s events after entry `after` (`None`:
/// only events from now on).
pub async fn open(
    state: &AppState,
    caller: &Caller,
    session_id: &str,
    after: Option<String>,
) -> Result<EventStream, ApiError> {
    if let Some(after) = &after
        && !is_entry_id(after)
    {
        return Err(ApiError::BadRequest(format!(
            "{after:?} is not a stream entry id (e.g. 0 or 1732500000000-0)"
        )));
    }
    let tenant_permit = state.limits.stream(caller)?;
    let permit = state
        .streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Busy)?;
    let mut reader = state.client.event_reader().await?;
    let after = match after {
        Some(after) => after,
        None => reader.last_entry_id(session_id).await?,
    };
    let (sender, events) = mpsc::channel(state.buffer);
    let failed = CancellationToken::new();
    tracing::debug!(session_id, after = %after, "event stream opened");
    tokio::spawn(follow(Follow {
        reader,
        session_id: session_id.to_owned(),
        after,
        sender,
        stall_timeout: state.stall_timeout,
        failed: failed.clone(),
        shutdown: state.shutdown.clone(),
        _permit: permit,
        _tenant_permit: tenant_permit,
    }));
    Ok(EventStream { events, failed })
}

/// What the reader task owns.
struct Follow {
    /// Its own connection: blocking reads would hold up shared ones.
    reader: EventReader,
    /// The session followed (checked against the caller's tenant already).
    session_id: String,
    /// The last entry id queued; the next read starts after it.
    after: String,
    /// The client's queue.
    sender: mpsc::Sender<SessionEvent>,
    /// How long the queue may stay full.
    stall_timeout: Duration,
    /// Cancelled to tell the client side to drop the connection.
    failed: CancellationToken,
    /// The bridge's shutdown.
    shutdown: CancellationToken,
    /// One of `bridge.max_streams`, given back when the task ends.
    _permit: OwnedSemaphorePermit,
    /// One of the tenant's streams (none on an open bridge).
    _tenant_permit: Option<OwnedSemaphorePermit>,
}

async fn follow(mut f: Follow) {
    let buffer = f.sender.max_capacity();
    let count = READ_COUNT.min(buffer);
    loop {
        let read = tokio::select! {
            biased;
            () = f.shutdown.cancelled() => return,
            () = f.sender.closed() => return,
            read = f.reader.read(&f.session_id, &f.after, count, READ_BLOCK) => read,
        };
        match read {
            Ok(batch) => {
                for event in batch.events {
                    f.after = event.entry_id.clone();
                    let queued = tokio::select! {
                        biased;
                        () = f.shutdown.cancelled() => return,
                        queued = tokio::time::timeout(f.stall_timeout, f.sender.send(event)) => queued,
                    };
                    match queued {
                        Ok(Ok(())) => {}
                        Ok(Err(_closed)) => return,
                        Err(_stalled) => {
                            tracing::warn!(
                                session_id = %f.session_id,
                                buffer,
                                stall_timeout_ms = f.stall_timeout.as_millis() as u64,
                                "event client reads too slowly; disconnecting it (it resumes from its last event id)"
                            );
                            f.failed.cancel();
                            return;
                        }
                    }
                }
                // Past entries that were not events too.
                if let Some(last) = batch.last_entry_id {
                    f.after = last;
                }
            }
            Err(error) => {
                tracing::warn!(session_id = %f.session_id, %error, "reading session events failed; disconnecting the client");
                f.failed.cancel();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn entry_ids() {
        for good in ["0", "0-0", "1732500000000", "1732500000000-12"] {
            assert!(super::is_entry_id(good), "{good}");
        }
        for bad in ["", "$", "-", "1-", "-1", "1-2-3", "a-1", "1 ", "+"] {
            assert!(!super::is_entry_id(bad), "{bad}");
        }
    }
}
