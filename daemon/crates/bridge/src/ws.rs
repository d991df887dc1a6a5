//! `GET /v1/sessions/{id}/ws`: one WebSocket per session for a page that
//! both watches and talks.
//!
//! Out: `{"type": "event", "id": <entry id>, "event": <DataMessage>}` for
//! each event (from `?after=`, else from now), and one reply per frame in.
//! In (JSON text frames; `request_id` is optional and echoed back):
//! - `{"type": "message", "agent_type", "content", "extra_payload"?}` →
//!   `{"type": "ack", "for": "message", "message_id", "trace_id", "entry_id"}`
//! - `{"type": "resume", "agent_type", "message_id", "content", "status"?,
//!   "reply_data"?}` (the answer to an ask-user prompt) → the same `ack`,
//!   `"for": "resume"`
//! - `{"type": "cancel", "message_id", "reason"?, "force"?}` →
//!   `{"type": "ack", "for": "cancel", "status", ...}`
//!
//! Anything wrong gets `{"type": "error", "status", "error"}`; the socket
//! stays open. A client too slow to take its events is disconnected, as
//! over SSE.

use super::AppState;
use super::api::{self, ActionType, ApiError, CancelRequest, MessageRequest};
use super::auth::{Caller, query_value};
use super::stream::{self, EventStream};
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use std::time::Duration;

/// Largest frame a client may send.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// The handler: checks the request, opens the event stream (so an error
/// is still an HTTP answer), then upgrades.
pub async fn upgrade(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    uri: http::Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Path(session_id) = path?;
    let session_id = caller.session(&session_id)?.to_owned();
    let upgrade = upgrade.map_err(|r| ApiError::Rejected(r.status(), r.body_text()))?;
    let after = uri.query().and_then(|q| query_value(q, "after"));
    let events = stream::open(&state, &caller, &session_id, after).await?;
    tracing::info!(
        session_id,
        tenant = caller.tenant.as_deref().unwrap_or_default(),
        "WebSocket client connected"
    );
    Ok(upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| serve(socket, state, caller, session_id, events)))
}

/// Runs one socket until the client leaves, falls behind, or the bridge
/// shuts down.
async fn serve(
    socket: WebSocket,
    state: AppState,
    caller: Caller,
    session_id: String,
    mut events: EventStream,
) {
    let (mut sink, mut source) = socket.split();
    let mut ping = tokio::time::interval(state.keep_alive);
    ping.tick().await;
    let shutdown = state.shutdown.clone();
    let why = loop {
        let outgoing = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                let close = Message::Close(Some(CloseFrame {
                    code: 1001,
                    reason: "the bridge is shutting down".into(),
                }));
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
                break "shutdown";
            }
            () = events.failed.cancelled() => break "fell behind or the read failed",
            event = events.events.recv() => match event {
                Some(event) => text_frame(json!({"type": "event", "id": event.entry_id, "event": event.message})),
                None => break "event stream ended",
            },
            incoming = source.next() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break "client left",
                Some(Ok(Message::Text(frame))) => {
                    text_frame(handle_frame(&state, &caller, &session_id, frame.as_str()).await)
                }
                Some(Ok(Message::Binary(_))) => text_frame(json!({
                    "type": "error", "status": 400, "error": "send JSON in text frames"
                })),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            },
            _ = ping.tick() => Message::Ping(Default::default()),
        };
        // A client that stops reading blocks this send; its queue then
        // stays full and the reader flags the stream failed.
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break "shutdown",
            () = events.failed.cancelled() => break "fell behind or the read failed",
            sent = sink.send(outgoing) => if sent.is_err() { break "send failed" },
        }
    };
    tracing::info!(session_id, reason = why, "WebSocket client disconnected");
}

/// Acts on one frame from the client; the reply frame.
async fn handle_frame(state: &AppState, caller: &Caller, session_id: &str, text: &str) -> Value {
    let mut frame: Value = match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(_) => {
            return error_frame(
                None,
                &ApiError::BadRequest("a frame must be a JSON object".into()),
            );
        }
        Err(e) => {
            return error_frame(
                None,
                &ApiError::BadRequest(format!("a frame must be JSON: {e}")),
            );
        }
    };
    let object = frame.as_object_mut().expect("checked to be an object");
    let request_id = object.remove("request_id");
    let kind = object.remove("type");
    let result = match kind.as_ref().and_then(Value::as_str) {
        Some("message") => match serde_json::from_value::<MessageRequest>(frame) {
            Ok(request) if request.action_type == ActionType::AskAgent => {
                sent(state, caller, session_id, request, "message").await
            }
            Ok(_) => Err(ApiError::BadRequest(
                "answer a prompt with {\"type\": \"resume\"}".into(),
            )),
            Err(e) => Err(ApiError::BadRequest(format!("bad message frame: {e}"))),
        },
        Some("resume") => {
            frame["action_type"] = json!("RESUME");
            match serde_json::from_value::<MessageRequest>(frame) {
                Ok(request) => sent(state, caller, session_id, request, "resume").await,
                Err(e) => Err(ApiError::BadRequest(format!("bad resume frame: {e}"))),
            }
        }
        Some("cancel") => match serde_json::from_value::<CancelRequest>(frame) {
            Ok(request) => api::cancel_task(state, caller, session_id, request)
                .await
                .map(|mut reply| {
                    reply["for"] = json!("cancel");
                    reply
                }),
            Err(e) => Err(ApiError::BadRequest(format!("bad cancel frame: {e}"))),
        },
        other => Err(ApiError::BadRequest(format!(
            "unknown frame type {}: expected message, resume or cancel",
            other.map_or_else(|| "(none)".to_owned(), |t| format!("{t:?}"))
        ))),
    };
    match result {
        Ok(mut reply) => {
            reply["type"] = json!("ack");
            if let Some(id) = request_id {
                reply["request_id"] = id;
            }
            reply
        }
        Err(error) => error_frame(request_id, &error),
    }
}

async fn sent(
    state: &AppState,
    caller: &Caller,
    session_id: &str,
    request: MessageRequest,
    kind: &str,
) -> Result<Value, ApiError> {
    let sent = api::send_message(state, caller, session_id, request).await?;
    let mut reply = api::sent_json(&sent);
    reply["for"] = json!(kind);
    Ok(reply)
}

fn text_frame(frame: Value) -> Message {
    Message::text(frame.to_string())
}

fn error_frame(request_id: Option<Value>, error: &ApiError) -> Value {
    let mut frame = json!({
        "type": "error",
        "status": error.status().as_u16(),
        "error": error.to_string(),
    });
    if let Some(id) = request_id {
        frame["request_id"] = id;
    }
    frame
}
