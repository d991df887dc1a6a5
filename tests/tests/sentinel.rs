//! Redis Sentinel: the daemon and the client library find the master
//! through the sentinels, and follow it when it fails over — killed with
//! SIGKILL and its replica promoted, demoted by a planned failover while
//! it stays up, or cut off from the sentinels but not from us (followed on
//! the sentinels' `+switch-master` alone). Every task the new master knows
//! of ends. Sentinels, master and replica speaking TLS only serve the same.
//! The reference Python client, given a redis-py Sentinel client, is served
//! through them.

use integration_tests::sentinel::SentinelSet;
use integration_tests::*;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_on_when_the_master_is_killed_and_its_replica_promoted() -> anyhow::Result<()> {
    failover_under_load(Failover::Kill).await
}

/// The old master stays up as a replica of the new one: the sentinels drop
/// its clients, and a connection that reconnected to the same address (as
/// redis-rs' `ConnectionManager` does) would land on a replica answering
/// READONLY for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_on_through_a_planned_failover() -> anyhow::Result<()> {
    failover_under_load(Failover::Planned).await
}

#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL of the master.
    Kill,
    /// `SENTINEL FAILOVER`: the master is demoted to a replica.
    Planned,
}

async fn failover_under_load(failover: Failover) -> anyhow::Result<()> {
    let mut set = SentinelSet::start().await?;
    let plugins = plugin_dir(&["echo", "faults"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config_without_redis(plugins.path(), workspace.path());
    config.redis.sentinel_master = Some(set.master_name.clone());
    config.redis.sentinel_nodes = set.sentinel_urls();
    config.worker.claim_idle_ms = 1000;
    let endpoint = config.redis.endpoint()?;
    let mut daemon = Daemon::start_on(config, None, set.connect_master().await?, "echo").await?;
    // The client library through the sentinels too, connected before the
    // failover: it has to follow.
    let client = byclaw_client::Client::connect(endpoint).await?;

    // Tasks that stream for two seconds, and quick ones queued behind them.
    let mut conn = set.connect_master().await?;
    let mut before = Vec::new();
    for _ in 0..6 {
        before.push(send_ask(&mut conn, "slow", "2000").await?);
    }
    for i in 0..200 {
        before.push(send_ask(&mut conn, "echo", &format!("before {i}")).await?);
    }
    // The tasks are on the replica: a client that needs its XADDs to
    // survive a failover waits for them like this.
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await?;
    assert_eq!(replicas, 1, "the replica took the tasks");
    let first = before[0].session_id.clone();
    wait_for("a slow task to stream", WAIT, || {
        let mut conn = conn.clone();
        let first = first.clone();
        async move { Ok((!all_events(&mut conn, &first).await?.is_empty()).then_some(())) }
    })
    .await?;

    // The master goes while the slow tasks run.
    let started = Instant::now();
    let old_port = match failover {
        Failover::Kill => set.kill_master().await?,
        Failover::Planned => set.planned_failover().await?,
    };
    let new_port = set.wait_failover(old_port, WAIT).await?;
    if let Failover::Planned = failover {
        // Until the sentinels demote it, the old master still takes
        // writes, and drops them when it resyncs from the new one.
        set.wait_demoted(old_port, WAIT).await?;
    }
    eprintln!(
        "sentinel ({failover:?}): master {old_port} replaced by {new_port} after {:?}",
        started.elapsed()
    );

    // The client library sends through its connection made before: its
    // first send may fail (it learns the master moved from that failure,
    // unless `+switch-master` told it first); it is retried until the new
    // master takes it.
    let (after, failed_sends) = send_until_taken(&client, "after", 50).await?;

    // Every task ends on the new master: those sent before (their entries
    // reached the replica), those running when the master went, and those
    // sent after.
    let mut conn = set.connect_master().await?;
    let mut terminal_twice = 0;
    for session in before
        .iter()
        .map(|sent| sent.session_id.as_str())
        .chain(after.iter().map(String::as_str))
    {
        let events = events_until_terminal(&mut conn, session, WAIT).await?;
        assert_eq!(
            delta_content(events.last().unwrap()),
            "COMPLETED",
            "{session}: {events:#?}"
        );
        let terminals = all_events(&mut conn, session)
            .await?
            .iter()
            .filter(|event| delta_content(event) == "COMPLETED")
            .count();
        if terminals > 1 {
            terminal_twice += 1;
        }
    }
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:echo", WAIT).await?;
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:slow", WAIT).await?;
    eprintln!(
        "sentinel ({failover:?}): {} tasks ended, {terminal_twice} with their terminal state \
         written twice; the client's sends failed {failed_sends} times before reaching the new master",
        before.len() + after.len()
    );
    daemon.stop().await?;
    Ok(())
}

/// The reference SDK takes a host and port only, but its client takes any
/// redis-py client: given the one redis-py's Sentinel makes for the
/// master, it finds our worker, sends, and reads our events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_reaches_us_through_the_sentinels() -> anyhow::Result<()> {
    let python = python_venv().await?;
    let set = SentinelSet::start().await?;
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config_without_redis(plugins.path(), workspace.path());
    config.redis.sentinel_master = Some(set.master_name.clone());
    config.redis.sentinel_nodes = set.sentinel_urls();
    let mut daemon = Daemon::start_on(config, None, set.connect_master().await?, "echo").await?;

    let nodes: Vec<String> = set
        .sentinel_urls()
        .iter()
        .map(|url| url.trim_start_matches("redis://").to_owned())
        .collect();
    let text = "hello through the sentinels";
    // Nothing listens at the URL: the client must go through the sentinels.
    let nowhere = format!("redis://127.0.0.1:{}/0", free_port());
    let sentinel = format!("{}@{}", set.master_name, nodes.join(","));
    let result = python_interop(
        &python,
        &nowhere,
        &[
            "send",
            "--agent-type",
            "echo",
            "--text",
            text,
            "--sentinel",
            &sentinel,
        ],
    )
    .await?;
    assert_eq!(
        result["target_worker_id"],
        daemon.worker_id.as_str(),
        "{result}"
    );
    assert_eq!(result["terminal"], "COMPLETED", "{result}");
    assert_eq!(result["chunks"], text, "{result}");
    daemon.stop().await?;
    Ok(())
}

/// The user the daemon and the client library log in to the master and
/// the replica as; the sentinels log in as `default`, which the partition
/// switches off on the master.
const USER: &str = "gateway";
const PASSWORD: &str = "gateway-secret";

/// A master cut off from the sentinels but not from us (a partition): the
/// sentinels promote its replica while every command on the old master
/// still succeeds, so no failing command makes a connection ask them
/// again. Only their `+switch-master` announcement tells the daemon and
/// the client library to move; without following it they would go on
/// writing into the old master, whose writes are dropped when it comes
/// back and is demoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_off_from_the_sentinels_is_left_when_they_announce_the_switch()
-> anyhow::Result<()> {
    let set = SentinelSet::start().await?;
    set.add_user(USER, PASSWORD).await?;
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config_without_redis(plugins.path(), workspace.path());
    config.redis.sentinel_master = Some(set.master_name.clone());
    config.redis.sentinel_nodes = set.sentinel_urls();
    config.redis.username = Some(USER.into());
    config.redis.password = Some(PASSWORD.into());
    config.validate()?;
    let endpoint = config.redis.endpoint()?;
    let mut daemon = Daemon::start_on(config, None, set.connect_master().await?, "echo").await?;
    let client = byclaw_client::Client::connect(endpoint).await?;
    // One watcher per endpoint: the daemon's connections share one, the
    // client library and its event readers (the bridge opens one per
    // browser stream) another.
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut reader = client.event_reader().await?;
        reader
            .read(
                &format!("nobody-{}", suffix()),
                "0",
                1,
                Duration::from_millis(1),
            )
            .await?;
        readers.push(reader);
    }
    wait_for(
        "the daemon and the client library to listen to the sentinels",
        WAIT,
        || async { Ok((watchers(&set).await? >= 2).then_some(())) },
    )
    .await?;
    assert_eq!(
        watchers(&set).await?,
        2,
        "one subscription per endpoint, not one per connection"
    );

    let old_port = set.master_port().await?;
    let mut old = set.connect_to(old_port, Some((USER, PASSWORD))).await?;
    let served = send_echo_tasks(&client, "before", 5).await?;
    for session in &served {
        assert_completed(&mut old, session).await?;
    }

    let started = Instant::now();
    set.cut_master_off_from_sentinels(USER, PASSWORD).await?;
    let new_port = set.wait_failover(old_port, WAIT).await?;
    let promoted_after = started.elapsed();
    // The old master is still up and a master to us: our commands on it
    // succeed, and nothing but the sentinels' announcement says to leave.
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut old).await?;
    assert!(
        matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
        "the old master stays a master: {role:?}"
    );
    let _: () = redis::cmd("SET")
        .arg(format!("still-writable-{}", suffix()))
        .arg(1)
        .query_async(&mut old)
        .await?;

    // Every connection of the daemon and of the client library leaves it.
    let own_id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut old).await?;
    wait_for(
        "the daemon's and the client library's connections to leave the old master",
        WAIT,
        || {
            let mut old = old.clone();
            async move {
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut old)
                    .await?;
                let ours = clients
                    .lines()
                    .filter(|line| line.contains(&format!(" user={USER} ")))
                    .filter(|line| !line.starts_with(&format!("id={own_id} ")))
                    .count();
                Ok((ours == 0).then_some(()))
            }
        },
    )
    .await?;
    eprintln!(
        "sentinel (partition): master {old_port} replaced by {new_port} {promoted_after:?} after \
         the cut; every connection left it {:?} after the cut",
        started.elapsed()
    );

    // What is sent now runs on the new master, and none of it reaches the
    // old one.
    let mut new = set.connect_to(new_port, None).await?;
    let after = send_echo_tasks(&client, "after", 20).await?;
    for session in &after {
        assert_completed(&mut new, session).await?;
        let on_old: bool = redis::cmd("EXISTS")
            .arg(format!("byai_gateway:session:{session}:data_stream"))
            .query_async(&mut old)
            .await?;
        assert!(!on_old, "{session}: events written to the old master");
    }
    wait_all_acked(&new, "byai_gateway:ctrl:capability:echo", WAIT).await?;

    // The watchers end with the last clone of their connection.
    daemon.stop().await?;
    drop(client);
    drop(readers);
    wait_for("the watchers to end", WAIT, || async {
        Ok((watchers(&set).await? == 0).then_some(()))
    })
    .await?;
    Ok(())
}

/// Sentinels over TLS: the master, its replica and the three sentinels
/// listen with TLS only (a private CA; every client, replication and the
/// sentinels' own connections show a certificate of it). The daemon and
/// the client library find the master through `rediss://` sentinel URLs
/// with the `[redis]` TLS files and listen to `+switch-master` over TLS;
/// tasks complete; the master is killed with SIGKILL, and tasks sent after
/// the promotion complete on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_served_through_sentinels_that_speak_tls_only() -> anyhow::Result<()> {
    let mut set = SentinelSet::start_tls().await?;
    let tls = set.tls_material().expect("started with TLS").clone();
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config_without_redis(plugins.path(), workspace.path());
    config.redis.sentinel_master = Some(set.master_name.clone());
    config.redis.sentinel_nodes = set.sentinel_urls();
    assert!(config.redis.sentinel_nodes[0].starts_with("rediss://"));
    config.redis.tls = true;
    config.redis.tls_ca_file = Some(tls.ca_cert.clone());
    config.redis.tls_cert_file = Some(tls.client_cert.clone());
    config.redis.tls_key_file = Some(tls.client_key.clone());
    config.validate()?;
    let endpoint = config.redis.endpoint()?;
    // Nothing is reached without TLS, or trusting another CA.
    let mut plain = config.redis.clone();
    plain.sentinel_nodes = plain
        .sentinel_nodes
        .iter()
        .map(|url| url.replace("rediss://", "redis://"))
        .collect();
    let mut other_ca = config.redis.clone();
    other_ca.tls_ca_file = Some(tls.other_ca_cert.clone());
    for (what, redis_config) in [("plain sentinel URLs", plain), ("another CA", other_ca)] {
        let refused = byclaw_client::Client::connect(redis_config.endpoint()?).await;
        assert!(refused.is_err(), "connected with {what}");
    }
    let mut daemon = Daemon::start_on(config, None, set.connect_master().await?, "echo").await?;
    let client = byclaw_client::Client::connect(endpoint).await?;
    // Both endpoints listen to `+switch-master` over TLS.
    wait_for(
        "the daemon and the client library to listen to the sentinels",
        WAIT,
        || async { Ok((watchers(&set).await? >= 2).then_some(())) },
    )
    .await?;

    let mut master = set.connect_master().await?;
    let sessions = send_echo_tasks(&client, "tls", 20).await?;
    for session in &sessions {
        assert_completed(&mut master, session).await?;
    }
    // Replication is asynchronous: what the replica has not received when
    // the master dies is lost, whoever wrote it.
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut master)
        .await?;
    assert_eq!(replicas, 1, "the replica has every write before the kill");

    let started = Instant::now();
    let old_port = set.kill_master().await?;
    let new_port = set.wait_failover(old_port, WAIT).await?;
    eprintln!(
        "sentinel (TLS): master {old_port} replaced by {new_port} after {:?}",
        started.elapsed()
    );
    // Sent through the connection made before the kill; it is retried
    // until the new master takes it.
    let (after, failed_sends) = send_until_taken(&client, "after", 20).await?;
    let mut new = set.connect_to(new_port, None).await?;
    for session in &after {
        assert_completed(&mut new, session).await?;
    }
    wait_all_acked(&new, "byai_gateway:ctrl:capability:echo", WAIT).await?;
    eprintln!("sentinel (TLS): the client's sends failed {failed_sends} times after the kill");
    daemon.stop().await?;
    Ok(())
}

/// Sends `count` echo tasks through the client library, each in a session
/// of its own; their sessions.
async fn send_echo_tasks(
    client: &byclaw_client::Client,
    label: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut sessions = Vec::with_capacity(count);
    for i in 0..count {
        let session = byclaw_client::new_session_id();
        client
            .send(
                "echo",
                &session,
                &format!("{label} {i}"),
                serde_json::json!({}),
            )
            .await?;
        sessions.push(session);
    }
    Ok(sessions)
}

/// Sends `count` echo tasks through a connection that may still be on a
/// master that just went: a send that fails is retried (every 100 ms, for
/// up to [`WAIT`]) until the master the connection moved to takes it.
/// Their sessions, and how many sends failed.
async fn send_until_taken(
    client: &byclaw_client::Client,
    label: &str,
    count: usize,
) -> anyhow::Result<(Vec<String>, usize)> {
    let mut sessions = Vec::with_capacity(count);
    let mut failed_sends = 0;
    for i in 0..count {
        let session = byclaw_client::new_session_id();
        let deadline = Instant::now() + WAIT;
        loop {
            let sent = client
                .send(
                    "echo",
                    &session,
                    &format!("{label} {i}"),
                    serde_json::json!({}),
                )
                .await;
            match sent {
                Ok(_) => break,
                Err(error) if Instant::now() < deadline => {
                    failed_sends += 1;
                    if failed_sends < 5 {
                        eprintln!("send after the failover failed, retrying: {error}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        sessions.push(session);
    }
    Ok((sessions, failed_sends))
}

/// Reads `session`'s events on `conn` until its terminal state, which
/// must be COMPLETED.
async fn assert_completed(
    conn: &mut redis::aio::MultiplexedConnection,
    session: &str,
) -> anyhow::Result<()> {
    let events = events_until_terminal(conn, session, WAIT).await?;
    assert_eq!(
        delta_content(events.last().expect("a terminal event")),
        "COMPLETED",
        "{session}: {events:#?}"
    );
    Ok(())
}

/// How many connections listen to the sentinels' announcements (their
/// pub/sub clients: the sentinels themselves talk to each other through
/// the masters' `__sentinel__:hello` channel, not through these).
async fn watchers(set: &SentinelSet) -> anyhow::Result<usize> {
    let mut listening = 0;
    for port in set.sentinel_ports() {
        let mut sentinel = set.connect_to(port, None).await?;
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut sentinel)
            .await?;
        listening += clients.lines().count();
    }
    Ok(listening)
}
