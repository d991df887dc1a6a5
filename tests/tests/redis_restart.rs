//! Redis crashes and comes back: no task is lost. Writes that failed are
//! retried, entries left pending are taken over, and every task ends.

use integration_tests::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_completes_across_a_redis_crash() -> anyhow::Result<()> {
    let mut redis = RedisServer::start_persistent().await?;
    let plugins = plugin_dir(&["echo", "faults"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 1000;
    let mut daemon = Daemon::start(config, &redis, "echo").await?;
    let mut conn = redis.connect().await?;

    // Tasks that run for a while (streaming a chunk every 50 ms)...
    let mut sent = Vec::new();
    for _ in 0..20 {
        sent.push(send_ask(&mut conn, "slow", "400").await?);
    }
    for i in 0..100 {
        sent.push(send_ask(&mut conn, "echo", &format!("before {i}")).await?);
    }
    let first = sent[0].session_id.clone();
    wait_for("the slow tasks to run", WAIT, || {
        let mut conn = conn.clone();
        let first = first.clone();
        async move { Ok((!all_events(&mut conn, &first).await?.is_empty()).then_some(())) }
    })
    .await?;
    // ...are running when Redis crashes.
    redis.restart().await?;
    let mut conn = redis.connect().await?;
    for i in 0..100 {
        sent.push(send_ask(&mut conn, "echo", &format!("after {i}")).await?);
    }
    for task in &sent {
        let events = events_until_terminal(&mut conn, &task.session_id, WAIT).await?;
        assert_eq!(
            delta_content(events.last().unwrap()),
            "COMPLETED",
            "{events:#?}"
        );
    }
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:echo", WAIT).await?;
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:slow", WAIT).await?;
    daemon.stop().await?;
    Ok(())
}

/// Redis drops every connection of the daemon (a restart, a failover, a
/// `CLIENT KILL`): the first command sent on a connection that has not
/// reconnected yet fails. When that command is a task's replay check — the
/// entry having been read on the reader's own connection, reconnected
/// already — the check is tried again, paced, and the task runs; it is not
/// left pending for `worker.claim_idle_ms` (ten minutes here, past the
/// test's wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_read_just_after_connections_dropped_runs_at_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 600_000;
    let mut daemon = Daemon::start(config, &redis, "echo").await?;
    let mut conn = redis.connect().await?;
    for round in 0..5 {
        let task = send_ask(&mut conn, "echo", &format!("round {round}")).await?;
        let events = events_until_terminal(&mut conn, &task.session_id, WAIT).await?;
        assert_eq!(
            delta_content(events.last().unwrap()),
            "COMPLETED",
            "round {round}: {events:#?}"
        );
        // Every connection but the test's own is dropped.
        let _: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut conn)
            .await?;
    }
    let task = send_ask(&mut conn, "echo", "last").await?;
    let events = events_until_terminal(&mut conn, &task.session_id, WAIT).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:echo", WAIT).await?;
    daemon.stop().await?;
    Ok(())
}
