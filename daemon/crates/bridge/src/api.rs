//! The request/response part of the bridge: send a message or an answer,
//! cancel a task, list the agent types served; and [`ApiError`], how every
//! failure of the bridge is shown to a client (a status and
//! `{"error": "..."}`).

use super::AppState;
use super::auth::Caller;
use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use byclaw_client::{CancelMode, ClientError, Sent};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Why a request failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No token, or one that is not configured: 401.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A valid token, but another tenant's session: 403.
    #[error("{0}")]
    Forbidden(String),
    /// The request is malformed: 400.
    #[error("{0}")]
    BadRequest(String),
    /// An extractor refused the request, with its own status (415 for a
    /// body that is not JSON, 422 for JSON of the wrong shape...).
    #[error("{1}")]
    Rejected(StatusCode, String),
    /// No such route: 404.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// A RESUME names a task that is not in the caller's session: 404.
    #[error("session {session_id} has no task {message_id}")]
    NoTask {
        session_id: String,
        message_id: String,
    },
    /// No worker serves the agent type: 404.
    #[error("no worker serves agent type {agent_type:?}")]
    NoWorker { agent_type: String },
    /// The caller's tenant is past one of its limits: 429 with Retry-After.
    #[error("{reason}")]
    TooManyRequests { reason: String, retry_after_s: u64 },
    /// Too many event streams open: 503.
    #[error("too many event streams are open; try again later")]
    Busy,
    /// Redis failed: 502.
    #[error("the gateway's Redis failed: {0}")]
    Redis(ClientError),
}

impl From<ClientError> for ApiError {
    fn from(error: ClientError) -> Self {
        match error {
            ClientError::NoWorker { agent_type } => ApiError::NoWorker { agent_type },
            other => ApiError::Redis(other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError::Rejected(rejection.status(), rejection.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::Rejected(rejection.status(), rejection.body_text())
    }
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Rejected(status, _) => *status,
            ApiError::NotFound(_) | ApiError::NoWorker { .. } | ApiError::NoTask { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Redis(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = match &self {
            ApiError::TooManyRequests { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "bridge request failed");
        } else {
            tracing::debug!(%status, error = %self, "bridge request refused");
        }
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
        response
    }
}

/// `action_type` of a posted message.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    /// A new task.
    #[default]
    #[serde(rename = "ASK_AGENT")]
    AskAgent,
    /// The answer to a task waiting in ask-user.
    #[serde(rename = "RESUME")]
    Resume,
}

/// The body of `POST /v1/sessions/{id}/messages` (and of a WebSocket
/// `message` or `resume` frame).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    /// The agent type (capability) that gets it.
    pub agent_type: String,
    /// The text: the user's message, or the answer.
    #[serde(default)]
    pub content: String,
    /// ASK_AGENT (default) or RESUME.
    #[serde(default)]
    pub action_type: ActionType,
    /// RESUME: the task being answered.
    #[serde(default)]
    pub message_id: Option<String>,
    /// ASK_AGENT: `extra_payload`, an object handed to the agent.
    #[serde(default)]
    pub extra_payload: Option<Value>,
    /// RESUME: `status` (default `USER_REPLIED`).
    #[serde(default)]
    pub status: Option<String>,
    /// RESUME: `reply_data` (default `{"user_input": content}`, the field
    /// the ask-user form names).
    #[serde(default)]
    pub reply_data: Option<Value>,
}

/// Checks and sends one message; what HTTP and WebSocket clients share.
pub async fn send_message(
    state: &AppState,
    caller: &Caller,
    session_id: &str,
    request: MessageRequest,
) -> Result<Sent, ApiError> {
    if !byclaw_protocol::is_safe_id(&request.agent_type) {
        return Err(ApiError::BadRequest(format!(
            "agent_type {:?} is not a plain id",
            request.agent_type
        )));
    }
    state.limits.message(caller)?;
    // A tenant's commands say whose they are (`header.tenant_id`).
    let client = match &caller.tenant {
        Some(tenant) => state.client.for_tenant(tenant),
        None => state.client.clone(),
    };
    let sent = match request.action_type {
        ActionType::AskAgent => {
            if request.content.trim().is_empty() {
                return Err(ApiError::BadRequest("content must not be empty".into()));
            }
            if request.message_id.is_some()
                || request.status.is_some()
                || request.reply_data.is_some()
            {
                return Err(ApiError::BadRequest(
                    "message_id, status and reply_data are for action_type RESUME".into(),
                ));
            }
            let payload = match request.extra_payload {
                None => json!({}),
                Some(Value::Object(map)) => Value::Object(map),
                Some(_) => {
                    return Err(ApiError::BadRequest(
                        "extra_payload must be a JSON object".into(),
                    ));
                }
            };
            client
                .send(&request.agent_type, session_id, &request.content, payload)
                .await?
        }
        ActionType::Resume => {
            let message_id = request.message_id.as_deref().unwrap_or_default();
            if !byclaw_protocol::is_safe_id(message_id) {
                return Err(ApiError::BadRequest(
                    "RESUME needs message_id: the id of the task being answered".into(),
                ));
            }
            if request.extra_payload.is_some() {
                return Err(ApiError::BadRequest(
                    "extra_payload is for action_type ASK_AGENT".into(),
                ));
            }
            // Only a task of this session may be answered from it (the
            // daemon refuses an answer from another session too).
            if !state.client.task_in_session(session_id, message_id).await? {
                return Err(ApiError::NoTask {
                    session_id: session_id.to_owned(),
                    message_id: message_id.to_owned(),
                });
            }
            let status = request.status.as_deref().unwrap_or("USER_REPLIED");
            let reply_data = request
                .reply_data
                .unwrap_or_else(|| json!({ "user_input": request.content }));
            client
                .resume(
                    &request.agent_type,
                    session_id,
                    message_id,
                    &request.content,
                    status,
                    reply_data,
                )
                .await?
        }
    };
    tracing::info!(
        session_id,
        tenant = caller.tenant.as_deref().unwrap_or_default(),
        agent_type = %request.agent_type,
        action = ?request.action_type,
        message_id = %sent.message_id,
        "bridge sent a message"
    );
    Ok(sent)
}

/// The JSON answer to a sent message.
pub fn sent_json(sent: &Sent) -> Value {
    json!({
        "message_id": sent.message_id,
        "trace_id": sent.trace_id,
        "entry_id": sent.entry_id,
    })
}

/// `POST /v1/sessions/{id}/messages` → 202 `{"message_id", "trace_id", "entry_id"}`.
pub async fn post_message(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Path(session_id) = path?;
    let session_id = caller.session(&session_id)?;
    let Json(request) = body?;
    let sent = send_message(&state, &caller, session_id, request).await?;
    Ok((StatusCode::ACCEPTED, Json(sent_json(&sent))))
}

/// The body of `POST /v1/sessions/{id}/cancel` (and of a WebSocket
/// `cancel` frame).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The task to cancel.
    pub message_id: String,
    /// Why; recorded in the execution and given to the agent.
    #[serde(default)]
    pub reason: Option<String>,
    /// Stop it at once instead of letting the agent return.
    #[serde(default)]
    pub force: bool,
}

/// Cancels one task; what HTTP and WebSocket clients share. The answer is
/// `{"status", "message_id", "execution_id", "worker_id", "error"}` with
/// the reference's status string.
pub async fn cancel_task(
    state: &AppState,
    caller: &Caller,
    session_id: &str,
    request: CancelRequest,
) -> Result<Value, ApiError> {
    if !byclaw_protocol::is_safe_id(&request.message_id) {
        return Err(ApiError::BadRequest(
            "message_id must be the id of a task".into(),
        ));
    }
    let mode = if request.force {
        CancelMode::Force
    } else {
        CancelMode::Graceful
    };
    let reason = request.reason.as_deref().unwrap_or("cancelled by the user");
    let response = state
        .client
        .cancel(&request.message_id, session_id, reason, mode)
        .await?;
    tracing::info!(
        session_id,
        tenant = caller.tenant.as_deref().unwrap_or_default(),
        message_id = %request.message_id,
        status = response.status.as_str(),
        "bridge cancel"
    );
    Ok(json!({
        "status": response.status.as_str(),
        "message_id": request.message_id,
        "execution_id": response.execution_id,
        "worker_id": response.worker_id,
        "error": response.error,
    }))
}

/// `POST /v1/sessions/{id}/cancel` → 200 with the reference's status
/// (`CANCEL_REQUESTED`, `NOT_FOUND`, `SESSION_MISMATCH`, `ALREADY_FINISHED`).
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<CancelRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(session_id) = path?;
    let session_id = caller.session(&session_id)?;
    let Json(request) = body?;
    Ok(Json(
        cancel_task(&state, &caller, session_id, request).await?,
    ))
}

/// `GET /v1/agents` → `{"agents": [{"agent_type", "workers"}], "tenant",
/// "session_prefix"}`: the agent types some registered worker serves, and
/// what the caller's sessions must start with.
pub async fn agents(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for worker in state.client.workers().await? {
        for capability in worker.capabilities {
            *served.entry(capability).or_default() += 1;
        }
    }
    let agents: Vec<Value> = served
        .into_iter()
        .map(|(agent_type, workers)| json!({ "agent_type": agent_type, "workers": workers }))
        .collect();
    Ok(Json(json!({
        "agents": agents,
        "tenant": caller.tenant,
        "session_prefix": caller.session_prefix,
    })))
}

/// Any other path: 404 with a JSON body.
pub async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}
