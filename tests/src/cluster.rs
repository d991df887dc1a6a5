//! A Redis Cluster on loopback: six `redis-server` processes in cluster
//! mode (three masters, three replicas) joined with `redis-cli --cluster
//! create`, all killed on drop.

use crate::sentinel::{Process, answer, free_port, spawn};
use anyhow::{Result, bail};
use std::time::Duration;

/// Six nodes of one cluster.
pub struct RedisCluster {
    /// The nodes, in the order they were created.
    nodes: Vec<Process>,
    /// Their working directories (`nodes.conf`).
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node
    /// says `cluster_state:ok`.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        for index in 0..6 {
            let port = free_port()?;
            let node_dir = dir.path().join(format!("node-{index}"));
            std::fs::create_dir_all(&node_dir)?;
            let port_text = port.to_string();
            let child = spawn(
                &[
                    "--port",
                    port_text.as_str(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
                &node_dir,
            )?;
            nodes.push(Process { child, port });
        }
        let cluster = RedisCluster { nodes, _dir: dir };
        for node in &cluster.nodes {
            let port = node.port;
            crate::wait_for(
                "a cluster node to answer",
                Duration::from_secs(10),
                || async move { Ok(answer::<String>(port, &redis::cmd("PING")).await) },
            )
            .await?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for node in &cluster.nodes {
            let port = node.port;
            crate::wait_for(
                "the cluster to be ok",
                Duration::from_secs(30),
                || async move {
                    let info: Option<String> =
                        answer(port, redis::cmd("CLUSTER").arg("INFO")).await;
                    Ok(info
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                        .then_some(()))
                },
            )
            .await?;
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:<port>` of each node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect()
    }
}
