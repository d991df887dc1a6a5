//! The operator's HTTP listener (`[http] listen`, loopback by default):
//! `/healthz` (the process answers), `/readyz` (Redis reachable, plugins
//! loaded, not draining) and `/metrics` (Prometheus). It runs until the
//! daemon has finished shutting down, so a draining worker reports itself
//! not ready instead of vanishing.

use crate::metrics::{Metrics, StreamState};
use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use byclaw_client::connection::Connection;
use byclaw_sandbox::loader::PluginTable;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for Redis to answer PING.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Tls { key: String, message: String },
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Ops {
    /// For PING and the stream statistics.
    pub redis: Connection,
    /// The plugins serving now: loaded or not, and their streams.
    pub plugins: Arc<ArcSwap<PluginTable>>,
    /// The consumer group whose lag and pending entries are reported.
    pub group: Arc<str>,
    /// Cancelled when shutdown begins: not ready from then on.
    pub draining: CancellationToken,
    /// Rendered by `/metrics`.
    pub metrics: Arc<Metrics>,
}

/// Binds `addr` now (so a taken port fails the start) and returns the
/// server, which runs until `stop`, and the address it got (port 0 picks
/// one).
pub async fn bind(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    ops: Ops,
    stop: CancellationToken,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), ListenError> {
    let bind_error = |source| ListenError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    let listener = byclaw_bridge::tls::ServeListener::new(listener, tls).map_err(bind_error)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops);
    tracing::info!(addr = %local, tls = listener.is_tls(), "serving /healthz, /readyz and /metrics");
    let server = async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the operator HTTP listener failed");
        }
    };
    Ok((local, server))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let mut reasons = Vec::new();
    if ops.draining.is_cancelled() {
        reasons.push("draining: shutting down, no new tasks are read".to_owned());
    }
    if ops.plugins.load().by_capability.is_empty() {
        reasons.push("no plugin loaded".to_owned());
    }
    let mut conn = ops.redis.clone();
    let ping = tokio::time::timeout(
        PING_TIMEOUT,
        redis::cmd("PING").query_async::<String>(&mut conn),
    )
    .await;
    match ping {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => reasons.push(format!("redis unreachable: {error}")),
        Err(_) => reasons.push(format!(
            "redis did not answer PING within {} ms",
            PING_TIMEOUT.as_millis()
        )),
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "ready": reasons.is_empty(), "reasons": reasons });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(ops): State<Ops>) -> Response {
    let streams: Vec<Arc<str>> = ops.plugins.load().streams().to_vec();
    let mut conn = ops.redis.clone();
    match tokio::time::timeout(PING_TIMEOUT, stream_states(&mut conn, &streams, &ops.group)).await {
        Ok(Ok(states)) => ops.metrics.set_streams(&states),
        Ok(Err(error)) => {
            tracing::debug!(%error, "stream statistics unavailable for this scrape");
            ops.metrics.set_streams(&[]);
        }
        Err(_) => ops.metrics.set_streams(&[]),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.metrics.render(),
    )
        .into_response()
}

/// XINFO GROUPS and XPENDING of every stream, in one pipeline.
async fn stream_states(
    conn: &mut Connection,
    streams: &[Arc<str>],
    group: &str,
) -> redis::RedisResult<Vec<(String, StreamState)>> {
    if streams.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for stream in streams {
        pipe.cmd("XINFO").arg("GROUPS").arg(&**stream);
        pipe.cmd("XPENDING").arg(&**stream).arg(group);
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let now_ms = byclaw_protocol::now_ms();
    Ok(streams
        .iter()
        .zip(replies.chunks(2))
        .map(|(stream, pair)| {
            let mut state = group_info(&pair[0], group);
            if let Some(oldest) = oldest_pending_ms(&pair[1]) {
                state.oldest_pending_s = now_ms.saturating_sub(oldest) as f64 / 1000.0;
            }
            (stream.to_string(), state)
        })
        .collect())
}

/// `lag` and `pending` of `group` in an XINFO GROUPS reply.
fn group_info(reply: &redis::Value, group: &str) -> StreamState {
    let mut state = StreamState::default();
    let redis::Value::Array(groups) = reply else {
        return state;
    };
    for entry in groups {
        let fields: Vec<(String, &redis::Value)> = match entry {
            redis::Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|kv| Some((text(&kv[0])?, kv.get(1)?)))
                .collect(),
            redis::Value::Map(map) => map
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, v)))
                .collect(),
            _ => continue,
        };
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        if get("name").and_then(text).as_deref() != Some(group) {
            continue;
        }
        state.pending = get("pending").and_then(int).unwrap_or(0);
        state.lag = get("lag").and_then(int).unwrap_or(0);
    }
    state
}

/// The timestamp (ms) of the smallest id in an XPENDING summary.
fn oldest_pending_ms(reply: &redis::Value) -> Option<u64> {
    let redis::Value::Array(parts) = reply else {
        return None;
    };
    let smallest = text(parts.get(1)?)?;
    byclaw_protocol::EntryId::parse(&smallest).map(|id| id.ms)
}

fn text(value: &redis::Value) -> Option<String> {
    match value {
        redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(value: &redis::Value) -> Option<i64> {
    match value {
        redis::Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}
