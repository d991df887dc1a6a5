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
