//! Redis Sentinel on loopback: one master, one replica and three
//! sentinels, each a `redis-server` process of its own on a free port,
//! all killed on drop; in plain TCP, or TLS only (a throwaway CA from
//! [`crate::tls`], client certificates required everywhere, replication
//! and the sentinels' own connections over TLS too).

use crate::tls::TlsMaterial;
use anyhow::{Context as _, Result, bail};
use byclaw_client::connection::{Endpoint, TlsPaths};
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
    /// Set by [`SentinelSet::start_tls`]: every process listens with TLS
    /// only, serving and trusting these certificates.
    tls: Option<TlsMaterial>,
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

/// A connection to the process on `port`: over TLS with the client
/// certificate of `tls` when given, as `user` when given.
async fn connect(
    port: u16,
    tls: Option<&TlsMaterial>,
    user: Option<(&str, &str)>,
) -> Result<MultiplexedConnection> {
    let credentials = user
        .map(|(name, password)| format!("{name}:{password}@"))
        .unwrap_or_default();
    let client = match tls {
        None => redis::Client::open(format!("redis://{credentials}127.0.0.1:{port}/0"))?,
        Some(tls) => Endpoint::with_tls(
            format!("rediss://{credentials}127.0.0.1:{port}/0"),
            &TlsPaths {
                ca_file: Some(tls.ca_cert.clone()),
                cert_file: Some(tls.client_cert.clone()),
                key_file: Some(tls.client_key.clone()),
            },
        )?
        .client()?,
    };
    Ok(client.get_multiplexed_async_connection().await?)
}

/// `cmd`'s answer from the process on `port`; `None` while it cannot give
/// one (not listening yet, loading, ...).
pub(crate) async fn answer<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Option<T> {
    answer_over(port, None, cmd).await
}

/// [`answer`], over TLS when `tls` is given.
async fn answer_over<T: redis::FromRedisValue>(
    port: u16,
    tls: Option<&TlsMaterial>,
    cmd: &redis::Cmd,
) -> Option<T> {
    let mut conn = connect(port, tls, None).await.ok()?;
    cmd.query_async(&mut conn).await.ok()
}

/// The settings that make a redis-server or a sentinel listen with TLS
/// only on `port` and speak TLS to the others: its server certificate, the
/// CA it trusts and asks clients for a certificate of, and the client
/// certificate it shows the master it replicates from or watches (the
/// server's own is for servers only). Command-line flags or lines of a
/// configuration file.
fn tls_settings(port: u16, tls: &TlsMaterial) -> Vec<(&'static str, String)> {
    let path = |path: &Path| path.display().to_string();
    vec![
        ("port", "0".to_owned()),
        ("tls-port", port.to_string()),
        ("tls-cert-file", path(&tls.server_cert)),
        ("tls-key-file", path(&tls.server_key)),
        ("tls-ca-cert-file", path(&tls.ca_cert)),
        ("tls-client-cert-file", path(&tls.client_cert)),
        ("tls-client-key-file", path(&tls.client_key)),
        ("tls-replication", "yes".to_owned()),
    ]
}

/// The command-line arguments that make a redis-server listen on `port`,
/// with TLS only when `tls` is given.
fn listen_args(port: u16, tls: Option<&TlsMaterial>) -> Vec<String> {
    match tls {
        None => vec!["--port".to_owned(), port.to_string()],
        Some(tls) => tls_settings(port, tls)
            .into_iter()
            .flat_map(|(key, value)| [format!("--{key}"), value])
            .collect(),
    }
}

impl SentinelSet {
    /// Starts the five processes and waits until every sentinel knows the
    /// master, its replica and the two other sentinels (so that a failover
    /// can be agreed on), and the replica is in sync.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// [`SentinelSet::start`] with TLS only: no plain port anywhere; the
    /// master, the replica and the sentinels serve a certificate of a
    /// throwaway CA and ask every client for one of that CA; the replica
    /// replicates and the sentinels watch over TLS with the client
    /// certificate ([`SentinelSet::tls_material`]).
    pub async fn start_tls() -> Result<Self> {
        Self::start_with(Some(TlsMaterial::generate()?)).await
    }

    async fn start_with(tls: Option<TlsMaterial>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let master_name = format!("gw-{}", crate::suffix());
        let master_port = free_port()?;
        let replica_port = free_port()?;
        let common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(str::to_owned);
        let master_dir = dir.path().join("master");
        let replica_dir = dir.path().join("replica");
        std::fs::create_dir_all(&master_dir)?;
        std::fs::create_dir_all(&replica_dir)?;
        let master_args = [listen_args(master_port, tls.as_ref()), common.to_vec()].concat();
        let replica_of = [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master_port.to_string(),
        ];
        let replica_args = [
            listen_args(replica_port, tls.as_ref()),
            common.to_vec(),
            replica_of.to_vec(),
        ]
        .concat();
        fn as_strs(args: &[String]) -> Vec<&str> {
            args.iter().map(String::as_str).collect()
        }
        let master = Process {
            child: spawn(&as_strs(&master_args), &master_dir)?,
            port: master_port,
        };
        let replica = Process {
            child: spawn(&as_strs(&replica_args), &replica_dir)?,
            port: replica_port,
        };
        let mut sentinels = Vec::new();
        for index in 0..3 {
            let port = free_port()?;
            let sentinel_dir = dir.path().join(format!("sentinel-{index}"));
            std::fs::create_dir_all(&sentinel_dir)?;
            let file = sentinel_dir.join("sentinel.conf");
            let listen: String = match &tls {
                None => format!("port {port}\n"),
                Some(tls) => tls_settings(port, tls)
                    .into_iter()
                    .map(|(key, value)| format!("{key} {value}\n"))
                    .collect(),
            };
            std::fs::write(
                &file,
                format!(
                    "{listen}bind 127.0.0.1\ndir {dir}\n\
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
            tls,
            _dir: dir,
        };
        let tls = set.tls.as_ref();
        crate::wait_for("the replica to sync", Duration::from_secs(20), || async {
            let info: Option<String> =
                answer_over(replica_port, tls, redis::cmd("INFO").arg("replication")).await;
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
                        let Some(fields) = answer_over::<HashMap<String, String>>(
                            port,
                            tls,
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

    /// `redis://127.0.0.1:<port>` of each sentinel (`rediss://` with TLS).
    pub fn sentinel_urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.sentinels
            .iter()
            .map(|s| format!("{scheme}://127.0.0.1:{}", s.port))
            .collect()
    }

    /// The certificates every process serves and asks for, when started
    /// by [`SentinelSet::start_tls`].
    pub fn tls_material(&self) -> Option<&TlsMaterial> {
        self.tls.as_ref()
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// A connection to the process on `port` (a data node or a sentinel),
    /// as `user` when given, over TLS when the set speaks it.
    pub async fn connect_to(
        &self,
        port: u16,
        user: Option<(&str, &str)>,
    ) -> Result<MultiplexedConnection> {
        connect(port, self.tls.as_ref(), user).await
    }

    /// Gives the master and the replica an ACL user `name` with `password`
    /// and every right (ACL users are not replicated: each node needs its own).
    pub async fn add_user(&self, name: &str, password: &str) -> Result<()> {
        for node in &self.nodes {
            let mut conn = self.connect_to(node.port, None).await?;
            let _: () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg(name)
                .arg("on")
                .arg(format!(">{password}"))
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .query_async(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// A network partition between the master and the sentinels, played on
    /// loopback: the master stays up and serves clients that log in as
    /// `user` (see [`SentinelSet::add_user`]), but the `default` user the
    /// sentinels log in as is switched off on it and their connections
    /// are killed, so that they see it down and promote the replica. The
    /// old master goes on taking `user`'s writes as a master (the
    /// sentinels cannot demote it), as a partitioned one does. Returns its
    /// port.
    pub async fn cut_master_off_from_sentinels(&self, user: &str, password: &str) -> Result<u16> {
        let port = self.master_port().await?;
        let mut conn = self.connect_to(port, Some((user, password))).await?;
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg("default")
            .arg("off")
            .query_async(&mut conn)
            .await?;
        // The replica's link (type replica) stays: the promoted replica
        // holds what the master had.
        for client_type in ["normal", "pubsub"] {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg("default")
                .arg("TYPE")
                .arg(client_type)
                .query_async(&mut conn)
                .await?;
        }
        Ok(port)
    }

    /// The port of the master the sentinels name now.
    pub async fn master_port(&self) -> Result<u16> {
        let mut conn = self.connect_to(self.sentinels[0].port, None).await?;
        let (_host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut conn)
            .await?;
        Ok(port)
    }

    /// A connection to the master the sentinels name now.
    pub async fn connect_master(&self) -> Result<MultiplexedConnection> {
        self.connect_to(self.master_port().await?, None).await
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
        let mut conn = self.connect_to(self.sentinels[0].port, None).await?;
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
        let tls = self.tls.as_ref();
        crate::wait_for(
            "the old master to become a replica",
            timeout,
            || async move {
                let role: Option<Vec<redis::Value>> =
                    answer_over(port, tls, &redis::cmd("ROLE")).await;
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
        let tls = self.tls.as_ref();
        let mut new_port = None;
        for sentinel in &self.sentinels {
            let port = sentinel.port;
            let name = self.master_name.clone();
            let named = crate::wait_for("the sentinels to fail over", timeout, || {
                let name = name.clone();
                async move {
                    let named: Option<(String, u16)> = answer_over(
                        port,
                        tls,
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
            let role: Option<Vec<redis::Value>> =
                answer_over(new_port, tls, &redis::cmd("ROLE")).await;
            let master = role.is_some_and(
                |role| matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
            );
            Ok(master.then_some(new_port))
        })
        .await
    }
}
