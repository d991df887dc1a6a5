//! The bridge for front ends: an HTTP API that sends messages, answers
//! ask-user prompts and cancels tasks ([`api`]), the events of a session
//! as Server-Sent Events ([`sse`]) or over a WebSocket ([`ws`]), bearer
//! tokens limited to one tenant's sessions ([`auth`]), Host and Origin
//! checks against other pages in the user's browser ([`guard`]), and a chat
//! page.
//!
//! It owns the HTTP side only: commands go to Redis through
//! [`byclaw_client::Client`] exactly as the reference Python client sends
//! them, and events are read from the session data streams with
//! [`byclaw_client::EventReader`], so the bridge runs inside the daemon
//! (`[bridge] enabled`) or alone (`gatewayd bridge`) beside any workers.
//! Each open event stream has its own reader task, Redis connection and
//! bounded queue ([`stream`]); a client whose queue stays full is
//! disconnected and resumes from its last event id.

pub mod api;
pub mod auth;
mod config;
pub mod guard;
pub mod limits;
pub mod sse;
pub mod stream;
pub mod tls;
pub mod ws;

use axum::Router;
use axum::routing::{get, post};
use byclaw_client::{Client, ClientError};
pub use config::{BridgeConfig, BridgeToken, listener_tls};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The chat page, served at `/`.
const PAGE: &str = include_str!("page.html");

/// How long open connections get to close after shutdown is asked for
/// before the server stops waiting for them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the bridge could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge: cannot listen on {addr} (bridge.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("bridge: {0}")]
    Redis(#[from] ClientError),
    #[error("bridge: the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("bridge: {key}: {message}")]
    Tls { key: String, message: String },
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Sends commands and lists workers; one multiplexed Redis connection
    /// for every request.
    pub client: Client,
    /// Who may do what; empty means open (loopback only, checked by the
    /// configuration).
    pub auth: Arc<auth::Tokens>,
    /// Events queued per stream client.
    pub buffer: usize,
    /// How long a stream client's queue may stay full before it is
    /// disconnected.
    pub stall_timeout: Duration,
    /// Keep-alive interval of SSE comments and WebSocket pings.
    pub keep_alive: Duration,
    /// One permit per open event stream (each holds a Redis connection).
    pub streams: Arc<Semaphore>,
    /// Each tenant's streams and message rate.
    pub limits: Arc<limits::TenantLimits>,
    /// Cancelled on shutdown: every stream and socket ends with it.
    pub shutdown: CancellationToken,
}

/// A bound listener's routes and browser rules.
struct Routes {
    /// Host and Origin rules, checked before every handler.
    guard: Arc<guard::BrowserGuard>,
    /// CORS answers for `bridge.allowed_origins`, if any.
    cors: Option<tower_http::cors::CorsLayer>,
}

/// A bound listener, ready to serve.
pub struct Bridge {
    /// The socket, bound before serving so that a port in use is an error
    /// at start and tests can listen on port 0; TLS when configured.
    listener: tls::ServeListener,
    /// Handlers' state; its shutdown token is replaced by `serve`'s.
    state: AppState,
    /// What wraps the handlers.
    routes: Routes,
}

impl Bridge {
    /// Connects to Redis (a URL, or an endpoint with TLS files) and binds
    /// `config.listen`.
    pub async fn bind(
        config: &BridgeConfig,
        redis: impl Into<byclaw_client::connection::Endpoint>,
    ) -> Result<Self, BridgeError> {
        let tls = config
            .tls()
            .map_err(|(key, message)| BridgeError::Tls { key, message })?;
        let client = Client::connect(redis).await?;
        let bind_error = |source| BridgeError::Bind {
            addr: config.listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(bind_error)?;
        let listener = tls::ServeListener::new(listener, tls).map_err(bind_error)?;
        Ok(Bridge {
            listener,
            state: AppState {
                client,
                auth: Arc::new(auth::Tokens::new(&config.tokens)),
                buffer: config.buffer,
                stall_timeout: config.stall_timeout(),
                keep_alive: config.keep_alive(),
                streams: Arc::new(Semaphore::new(config.max_streams)),
                limits: Arc::new(limits::TenantLimits::new(config)),
                shutdown: CancellationToken::new(),
            },
            routes: Routes {
                guard: Arc::new(guard::BrowserGuard::new(config)),
                cors: guard::cors(config),
            },
        })
    }

    /// The address it listens on (the port chosen when `listen` had port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        axum::serve::Listener::local_addr(&self.listener)
    }

    /// Serves until `shutdown` is cancelled; then every event stream and
    /// socket is ended and open connections get a short grace to close.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let Bridge {
            listener,
            mut state,
            routes,
        } = self;
        let addr = axum::serve::Listener::local_addr(&listener).map_err(BridgeError::Serve)?;
        state.shutdown = shutdown.clone();
        let app = router(state, routes);
        tracing::info!(%addr, tls = listener.is_tls(), "bridge listening");
        let stopped = shutdown.clone();
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .into_future();
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => return result.map_err(BridgeError::Serve),
            () = shutdown.cancelled() => {}
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
            Ok(result) => result.map_err(BridgeError::Serve)?,
            Err(_) => tracing::warn!(
                grace_s = SHUTDOWN_GRACE.as_secs(),
                "bridge connections still open after the grace; closing them"
            ),
        }
        tracing::info!(%addr, "bridge stopped");
        Ok(())
    }
}

/// Routes of the bridge, behind the browser guard (and CORS, outermost, so
/// that preflight requests of listed origins are answered).
fn router(state: AppState, routes: Routes) -> Router {
    let app = Router::new()
        .route("/", get(page))
        .route("/v1/agents", get(api::agents))
        .route("/v1/sessions/{id}/messages", post(api::post_message))
        .route("/v1/sessions/{id}/cancel", post(api::cancel))
        .route("/v1/sessions/{id}/events", get(sse::events))
        .route("/v1/sessions/{id}/ws", get(ws::upgrade))
        .fallback(api::not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            routes.guard,
            guard::enforce,
        ));
    match routes.cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// `GET /`: the chat page (it holds no data; the API calls need a token).
async fn page() -> axum::response::Html<&'static str> {
    axum::response::Html(PAGE)
}
