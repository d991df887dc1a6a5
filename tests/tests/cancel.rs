//! CANCEL_TASK on the worker's control stream (graceful and force), and
//! shutdown with tasks still running.

use integration_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const GROUP: &str = "agent_engines";
const WAIT: Duration = Duration::from_secs(30);

/// Sends CANCEL_TASK the way the reference client does.
async fn cancel(
    conn: &mut redis::aio::MultiplexedConnection,
    worker_id: &str,
    sent: &Sent,
    mode: &str,
) -> anyhow::Result<()> {
    let data = json!({
        "action_type": "CANCEL_TASK",
        "header": {
            "message_id": format!("msg-cancel-{}", suffix()),
            "session_id": sent.session_id,
            "trace_id": sent.trace_id,
            "source_agent_id": "", "target_agent_type": "", "parent_message_id": sent.message_id,
            "task_group_id": "", "tenant_id": "", "metadata": {}
        },
        "body": {"target_message_id": sent.message_id, "target_execution_id": "",
                 "target_worker_id": worker_id, "reason": "user pressed stop",
                 "requested_by": "test", "cancel_mode": mode}
    });
    xadd_data(
        conn,
        &format!("byai_gateway:ctrl:worker:{worker_id}"),
        &data.to_string(),
    )
    .await?;
    Ok(())
}

/// Waits until the task has emitted at least one chunk (it is running).
async fn wait_running(conn: &redis::aio::MultiplexedConnection, sent: &Sent) -> anyhow::Result<()> {
    wait_for("the task to start", WAIT, || {
        let mut conn = conn.clone();
        let session = sent.session_id.clone();
        async move { Ok((!all_events(&mut conn, &session).await?.is_empty()).then_some(())) }
    })
    .await
}

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["data"]["contentType"] == "3003")
        .map(|e| delta_content(e).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_cancel_lets_the_plugin_return_early() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "slow", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let sent = send_ask(&mut conn, "slow", "20000").await?;
    wait_running(&conn, &sent).await?;
    let asked = Instant::now();
    cancel(&mut conn, &daemon.worker_id, &sent, "graceful").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    assert_eq!(states(&events), ["CANCELLING", "CANCELLED"], "{events:#?}");
    assert!(asked.elapsed() < Duration::from_secs(5));
    let exec = execution(&mut conn, &sent.session_id, &sent.message_id)
        .await?
        .unwrap();
    assert_eq!(exec["status"], "CANCELLED");
    assert_eq!(exec["cancel_requested"], true);
    assert_eq!(exec["cancel_reason"], "user pressed stop");
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_cancel_and_expired_grace_stop_a_plugin_that_ignores_it() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "slow-ignore-cancel", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    // Force: dropped at once.
    let forced = send_ask(&mut conn, "slow-ignore-cancel", "20000").await?;
    wait_running(&conn, &forced).await?;
    cancel(&mut conn, &daemon.worker_id, &forced, "force").await?;
    let events = events_until_terminal(&mut conn, &forced.session_id, WAIT).await?;
    assert_eq!(states(&events), ["CANCELLING", "CANCELLED"]);

    // Graceful, ignored: stopped when the 500 ms grace is over.
    let ignored = send_ask(&mut conn, "slow-ignore-cancel", "20000").await?;
    wait_running(&conn, &ignored).await?;
    let asked = Instant::now();
    cancel(&mut conn, &daemon.worker_id, &ignored, "graceful").await?;
    let events = events_until_terminal(&mut conn, &ignored.session_id, WAIT).await?;
    assert_eq!(states(&events), ["CANCELLING", "CANCELLED"]);
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(500),
        "grace respected: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_off_tasks_past_the_grace_and_leaves_them_pending() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults", "echo"], "slow", |c| {
        c.worker.shutdown_grace_s = 1;
    })
    .await?;
    let (redis, daemon, mut conn) = (&bed.redis, &mut bed.daemon, bed.conn.clone());

    let long = send_ask(&mut conn, "slow", "60000").await?;
    let short = send_ask(&mut conn, "slow", "300").await?;
    wait_running(&conn, &long).await?;
    wait_running(&conn, &short).await?;
    let stopping = Instant::now();
    daemon.stop().await?;
    assert!(stopping.elapsed() < Duration::from_secs(5));

    // The short task finished within the grace period...
    let events = all_events(&mut conn, &short.session_id).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    // ...the long one was cut off: no terminal state, entry still pending.
    let events = all_events(&mut conn, &long.session_id).await?;
    assert!(!events.iter().any(is_terminal_state), "{events:#?}");
    let stream = "byai_gateway:ctrl:capability:slow";
    assert_eq!(pending_count(&mut conn, stream, GROUP).await?, 1);

    // Another worker takes it over once it has been idle long enough.
    let mut config = bed.config.clone();
    config.worker.id = format!("test-worker-{}", suffix());
    config.worker.claim_idle_ms = 1000;
    let mut successor = Daemon::start(config, redis, "slow").await?;
    let cancel_after = async {
        // Don't wait a minute: once the successor runs it, cancel it.
        wait_for("the successor to run it", WAIT, || {
            let mut conn = conn.clone();
            let sent = long.clone();
            let worker = successor.worker_id.clone();
            async move {
                let exec = execution(&mut conn, &sent.session_id, &sent.message_id).await?;
                Ok(exec
                    .filter(|e| e["worker_id"] == worker.as_str())
                    .map(|_| ()))
            }
        })
        .await
    };
    cancel_after.await?;
    cancel(&mut conn, &successor.worker_id, &long, "force").await?;
    let events = events_until_terminal(&mut conn, &long.session_id, WAIT).await?;
    assert_eq!(delta_content(events.last().unwrap()), "CANCELLED");
    successor.stop().await?;
    Ok(())
}
