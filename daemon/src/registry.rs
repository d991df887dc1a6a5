//! This worker's membership in the reference registry: the worker-id lock,
//! the heartbeat that lets clients find it, and leaving cleanly.

use byclaw_client::connection::Connection;
use byclaw_protocol::{self as wire, keys};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the worker could not join.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "worker id {worker_id:?} is held by another live process (key {key}); pick another --worker-id or stop the other process"
    )]
    LockHeld { worker_id: String, key: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Refreshes the lock while it holds our token (1); takes it again when it
/// is gone — Redis restarted without persistence, or a partition outlasted
/// its TTL — (2); leaves it to another process that holds it (0).
const REFRESH_LOCK: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
  return 2
end
return 0
"#;

/// What a heartbeat found of the worker-id lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    Held,
    /// It was gone and is ours again.
    Retaken,
    /// Another process holds it.
    Lost,
}

/// Deletes the lock only while it still holds our token.
const RELEASE_LOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The registration of one worker id.
pub struct Membership {
    worker_id: String,
    /// Our lock value; only the holder may refresh or release it.
    token: String,
    lock_ttl_s: u64,
    /// What it serves now; replaced when plugins come and go.
    capabilities: std::sync::Mutex<Vec<String>>,
    /// Serializes registry updates, so a heartbeat cannot re-add a
    /// capability that an update is removing.
    updating: tokio::sync::Mutex<()>,
}

impl Membership {
    /// Takes the worker-id lock (`SET NX EX`) and announces the capabilities.
    pub async fn join(
        conn: &mut Connection,
        worker_id: &str,
        capabilities: Vec<String>,
        lock_ttl_s: u64,
    ) -> Result<Self, RegistryError> {
        let token = wire::new_token();
        let key = keys::worker_lock(worker_id);
        let acquired: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("EX")
            .arg(lock_ttl_s)
            .query_async(conn)
            .await?;
        if acquired.is_none() {
            return Err(RegistryError::LockHeld {
                worker_id: worker_id.to_owned(),
                key,
            });
        }
        let membership = Membership {
            worker_id: worker_id.to_owned(),
            token,
            lock_ttl_s,
            capabilities: std::sync::Mutex::new(capabilities),
            updating: tokio::sync::Mutex::new(()),
        };
        membership.announce(conn).await?;
        Ok(membership)
    }

    /// The heartbeat: ZADD the worker with the current time and re-add its
    /// capability sets (a Redis restart or a peer's cleanup may have lost them).
    async fn announce(&self, conn: &mut Connection) -> Result<(), redis::RedisError> {
        let _updating = self.updating.lock().await;
        self.announce_locked(conn).await
    }

    async fn announce_locked(&self, conn: &mut Connection) -> Result<(), redis::RedisError> {
        let capabilities = self.capabilities();
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(keys::ACTIVE_WORKERS)
            .arg(wire::now_ms())
            .arg(&self.worker_id)
            .ignore();
        let capabilities_key = keys::worker_capabilities(&self.worker_id);
        pipe.cmd("DEL").arg(&capabilities_key).ignore();
        if !capabilities.is_empty() {
            pipe.cmd("SADD")
                .arg(&capabilities_key)
                .arg(&capabilities)
                .ignore();
        }
        for capability in &capabilities {
            pipe.cmd("SADD")
                .arg(keys::capability_workers(capability))
                .arg(&self.worker_id)
                .ignore();
        }
        pipe.query_async::<()>(conn).await
    }

    /// The capabilities announced.
    pub fn capabilities(&self) -> Vec<String> {
        self.capabilities
            .lock()
            .expect("capabilities lock is never poisoned")
            .clone()
    }

    /// Announces a new set of capabilities: the worker leaves the sets of
    /// those it no longer serves and joins the new ones.
    pub async fn set_capabilities(
        &self,
        conn: &mut Connection,
        capabilities: Vec<String>,
    ) -> Result<(), redis::RedisError> {
        let _updating = self.updating.lock().await;
        let removed: Vec<String> = {
            let mut current = self
                .capabilities
                .lock()
                .expect("capabilities lock is never poisoned");
            let removed = current
                .iter()
                .filter(|c| !capabilities.contains(c))
                .cloned()
                .collect();
            *current = capabilities;
            removed
        };
        if !removed.is_empty() {
            let mut pipe = redis::pipe();
            for capability in &removed {
                pipe.cmd("SREM")
                    .arg(keys::capability_workers(capability))
                    .arg(&self.worker_id)
                    .ignore();
            }
            pipe.query_async::<()>(conn).await?;
        }
        self.announce_locked(conn).await
    }

    /// Refreshes the lock (taking it again if it is gone) and the heartbeat.
    async fn beat(&self, conn: &mut Connection) -> Result<Lock, redis::RedisError> {
        let refreshed: i64 = redis::Script::new(REFRESH_LOCK)
            .key(keys::worker_lock(&self.worker_id))
            .arg(&self.token)
            .arg(self.lock_ttl_s)
            .invoke_async(conn)
            .await?;
        self.announce(conn).await?;
        Ok(match refreshed {
            1 => Lock::Held,
            2 => Lock::Retaken,
            _ => Lock::Lost,
        })
    }

    /// Beats every `interval` until `stop` fires.
    pub async fn heartbeat(
        &self,
        mut conn: Connection,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            match self.beat(&mut conn).await {
                Ok(Lock::Held) => tracing::trace!(worker_id = %self.worker_id, "heartbeat"),
                Ok(Lock::Retaken) => tracing::warn!(
                    worker_id = %self.worker_id,
                    "worker-id lock was gone (Redis lost it, or it expired); taken again"
                ),
                Ok(Lock::Lost) => tracing::error!(
                    worker_id = %self.worker_id,
                    "worker-id lock held by another process; two processes may now share this worker id"
                ),
                Err(error) => {
                    tracing::warn!(worker_id = %self.worker_id, %error, "heartbeat failed")
                }
            }
        }
    }

    /// Removes the worker from the registry and releases the lock.
    pub async fn leave(&self, conn: &mut Connection) -> Result<(), redis::RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(keys::ACTIVE_WORKERS)
            .arg(&self.worker_id)
            .ignore();
        pipe.cmd("DEL")
            .arg(keys::worker_capabilities(&self.worker_id))
            .ignore();
        for capability in &self.capabilities() {
            pipe.cmd("SREM")
                .arg(keys::capability_workers(capability))
                .arg(&self.worker_id)
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
        let _: i64 = redis::Script::new(RELEASE_LOCK)
            .key(keys::worker_lock(&self.worker_id))
            .arg(&self.token)
            .invoke_async(conn)
            .await?;
        Ok(())
    }
}
