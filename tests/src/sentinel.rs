//! Redis Sentinel on loopback: one master, one replica and three
//! sentinels, each a `redis-server` process of its own on a free port,
//! all killed on drop.

use anyhow::{Context as _, Result, bail};
use redis::aio::MultiplexedConnection;
use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A master, its replica and three sentinels watching them.
pub struct SentinelSet {
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    /// The data nodes: the master first, then the replica.
    nodes: Vec<Process>,
    /// The sentinels.
    sentinels: Vec<Process>,
    /// Their working directories and configuration files.
    _dir: tempfile::TempDir,
}

/// One redis-server process, killed on drop.
pub(crate) struct Process {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn spawn(args: &[&str], dir: &Path) -> Result<Child> {
    Command::new("redis-server")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (is it installed?)")
}

async fn connect(port: u16) -> Result<MultiplexedConnection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/0"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// `cmd`'s answer from the process on `port`; `None` while it cannot give
/// one (not listening yet, loading, ...).
pub(crate) async fn answer<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = connect(port).await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

impl SentinelSet {
    /// Starts the five processes and waits until every sentinel knows the
    /// master, its replica and the two other sentinels (so that a failover
    /// can be agreed on), and the replica is in sync.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let master_name = format!("gw-{}", crate::suffix());
        let master_port = free_port()?;
        let replica_port = free_port()?;
        let common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
        let master_dir = dir.path().join("master");
        let replica_dir = dir.path().join("replica");
        std::fs::create_dir_all(&master_dir)?;
        std::fs::create_dir_all(&replica_dir)?;
        let master_port_text = master_port.to_string();
        let replica_port_text = replica_port.to_string();
        let master = Process {
            child: spawn(
                &[&["--port", master_port_text.as_str()], &common[..]].concat(),
                &master_dir,
            )?,
            port: master_port,
        };
        let replica = Process {
            child: spawn(
                &[
                    &["--port", replica_port_text.as_str()],
                    &common[..],
                    &["--replicaof", "127.0.0.1", master_port_text.as_str()],
                ]
                .concat(),
                &replica_dir,
            )?,
            port: replica_port,
        };
        let mut sentinels = Vec::new();
        for index in 0..3 {
            let port = free_port()?;
            let sentinel_dir = dir.path().join(format!("sentinel-{index}"));
            std::fs::create_dir_all(&sentinel_dir)?;
            let file = sentinel_dir.join("sentinel.conf");
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {master_name} 1000\n\
                     sentinel failover-timeout {master_name} 3000\n\
                     sentinel parallel-syncs {master_name} 1\n",
                    dir = sentinel_dir.display(),
                ),
            )?;
            let file = file.display().to_string();
            sentinels.push(Process {
                child: spawn(&[file.as_str(), "--sentinel"], &sentinel_dir)?,
                port,
            });
        }
        let set = SentinelSet {
            master_name,
            nodes: vec![master, replica],
            sentinels,
            _dir: dir,
        };
        crate::wait_for("the replica to sync", Duration::from_secs(20), || async {
            let info: Option<String> =
                answer(replica_port, redis::cmd("INFO").arg("replication")).await;
            Ok(info
                .is_some_and(|info| info.contains("master_link_status:up"))
                .then_some(()))
        })
        .await?;
        for sentinel in &set.sentinels {
            let port = sentinel.port;
            let name = set.master_name.clone();
            crate::wait_for(
                "the sentinels to know each other",
                Duration::from_secs(30),
                || {
                    let name = name.clone();
                    async move {
                        let Some(fields) = answer::<HashMap<String, String>>(
                            port,
                            redis::cmd("SENTINEL").arg("MASTER").arg(&name),
                        )
                        .await
                        else {
                            return Ok(None);
                        };
                        let count = |key: &str| fields.get(key).and_then(|v| v.parse::<u32>().ok());
                        Ok((count("num-other-sentinels") == Some(2)
                            && count("num-slaves") == Some(1))
                        .then_some(()))
                    }
                },
            )
            .await?;
        }
        Ok(set)
    }

    /// `redis://127.0.0.1:<port>` of each sentinel.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The port of the master the sentinels name now.
    pub async fn master_port(&self) -> Result<u16> {
        let mut conn = connect(self.sentinels[0].port).await?;
        let (_host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        Ok(port)
    }

    /// A connection to the master the sentinels name now.
    pub async fn connect_master(&self) -> Result<MultiplexedConnection> {
        connect(self.master_port().await?).await
    }

    /// Kills the master with SIGKILL, as a crash; returns its port.
    pub async fn kill_master(&mut self) -> Result<u16> {
        let port = self.master_port().await?;
        let Some(at) = self.nodes.iter().position(|n| n.port == port) else {
            bail!("the sentinels name a master ({port}) that is not one of ours");
        };
        drop(self.nodes.remove(at));
        Ok(port)
    }

    /// Asks the sentinels to fail over now (`SENTINEL FAILOVER`), as an
    /// operator does for maintenance: the master stays up and becomes a
    /// replica of the promoted one. Returns the old master's port.
    pub async fn planned_failover(&self) -> Result<u16> {
        let port = self.master_port().await?;
        let mut conn = connect(self.sentinels[0].port).await?;
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        Ok(port)
    }

    /// Waits until the old master on `port`, still running after a planned
    /// failover, says it is a replica: until then it still takes writes
    /// (which its resync from the new master then drops — Sentinel's
    /// failover window, not the gateway's).
    pub async fn wait_demoted(&self, port: u16, timeout: Duration) -> Result<()> {
        crate::wait_for(
            "the old master to become a replica",
            timeout,
            || async move {
                let role: Option<Vec<redis::Value>> = answer(port, &redis::cmd("ROLE")).await;
                let replica = role.is_some_and(
                |role| matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"slave"),
            );
                Ok(replica.then_some(()))
            },
        )
        .await
    }

    /// Waits until every sentinel names a master other than `old_port`,
    /// and that master says it is one; returns its port.
    pub async fn wait_failover(&self, old_port: u16, timeout: Duration) -> Result<u16> {
        let mut new_port = None;
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            let name = self.master_name.clone();
            let named = crate::wait_for("the sentinels to fail over", timeout, || {
                let name = name.clone();
                async move {
                    let named: Option<(String, u16)> = answer(
                        port,
                        redis::cmd("SENTINEL")
                            .arg("get-master-addr-by-name")
                            .arg(&name),
                    )
                    .await;
                    Ok(named.and_then(|(_, named)| (named != old_port).then_some(named)))
                }
            })
            .await?;
            new_port = Some(named);
        }
        let new_port = new_port.expect("three sentinels");
        crate::wait_for("the new master to take writes", timeout, || async move {
            let role: Option<Vec<redis::Value>> = answer(new_port, &redis::cmd("ROLE")).await;
            let master = role.is_some_and(
                |role| matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
            );
            Ok(master.then_some(new_port))
        })
        .await
    }
}
