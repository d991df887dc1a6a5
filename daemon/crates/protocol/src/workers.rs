//! Reading the reference worker registry: which workers are alive and
//! what they serve (the daemon's own membership lives in the daemon).

use crate::keys;
use redis::aio::ConnectionLike;

/// A worker as the registry lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerInfo {
    pub worker_id: String,
    /// Sorted.
    pub capabilities: Vec<String>,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_seen: u64,
}

/// Every worker of the registry with its capabilities, most recent
/// heartbeat first (what the reference's `get_active_workers` reads): two
/// round trips.
pub async fn active_workers(
    conn: &mut impl ConnectionLike,
) -> Result<Vec<WorkerInfo>, redis::RedisError> {
    let members: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
        .arg(keys::ACTIVE_WORKERS)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (worker, _) in &members {
        pipe.cmd("SMEMBERS").arg(keys::worker_capabilities(worker));
    }
    let capabilities: Vec<Vec<String>> = pipe.query_async(conn).await?;
    Ok(members
        .into_iter()
        .zip(capabilities)
        .map(|((worker_id, score), mut capabilities)| {
            capabilities.sort();
            WorkerInfo {
                worker_id,
                capabilities,
                last_seen: score.max(0.0) as u64,
            }
        })
        .collect())
}
