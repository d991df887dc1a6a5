//! `GET /v1/sessions/{id}/events`: a session's events as Server-Sent
//! Events. Each event's `id:` is its data-stream entry id and its `data:`
//! the DataMessage JSON; a browser's EventSource sends the last id back as
//! `Last-Event-ID` when it reconnects, and the stream resumes right after
//! it. Without one it starts from now, or after `?after=` (`0`: everything).

use super::AppState;
use super::api::ApiError;
use super::auth::{Caller, query_value};
use super::stream::{self, EventStream};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

/// Why an event stream was cut: the client fell behind or Redis failed.
/// Returned as the body's error, which makes the server drop the
/// connection at once instead of finishing the response.
#[derive(Debug, thiserror::Error)]
#[error("event stream dropped: the client fell behind or the read failed")]
pub struct Dropped;

/// Where a stream starts: `Last-Event-ID`, else `?after=`, else now.
pub fn start_position(
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Option<String>, ApiError> {
    if let Some(value) = headers.get("last-event-id") {
        let id = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("Last-Event-ID is not text".into()))?;
        return Ok(Some(id.trim().to_owned()));
    }
    Ok(query.and_then(|q| query_value(q, "after")))
}

/// The handler.
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    uri: http::Uri,
) -> Result<Response, ApiError> {
    let Path(session_id) = path?;
    let session_id = caller.session(&session_id)?;
    let after = start_position(&headers, uri.query())?;
    let stream = stream::open(&state, &caller, session_id, after).await?;
    tracing::info!(
        session_id,
        tenant = caller.tenant.as_deref().unwrap_or_default(),
        "SSE client connected"
    );
    let body = futures::stream::unfold(Some(stream), |stream| async move {
        let mut stream: EventStream = stream?;
        tokio::select! {
            biased;
            () = stream.failed.cancelled() => Some((Err(Dropped), None)),
            event = stream.events.recv() => {
                let event = event?;
                let sse = Event::default()
                    .id(event.entry_id)
                    .data(event.message.to_string());
                Some((Ok(sse), Some(stream)))
            }
        }
    });
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(state.keep_alive))
        .into_response())
}
