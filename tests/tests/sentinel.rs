//! Redis Sentinel: the daemon and the client library find the master
//! through the sentinels, and follow it when it fails over — killed with
//! SIGKILL and its replica promoted, or demoted by a planned failover while
//! it stays up. Every task the new master knows of ends. The reference
//! Python client, given a redis-py Sentinel client, is served through them.

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
    // first send may fail (it learns the master moved from that failure);
    // it is retried until the new master takes it.
    let mut after = Vec::new();
    let mut failed_sends = 0;
    for i in 0..50 {
        let session = byclaw_client::new_session_id();
        let deadline = Instant::now() + WAIT;
        loop {
            match client
                .send(
                    "echo",
                    &session,
                    &format!("after {i}"),
                    serde_json::json!({}),
                )
                .await
            {
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
        after.push(session);
    }

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
