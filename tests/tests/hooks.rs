//! Lifecycle hooks: each runs with its own timeout; one that traps, hangs or
//! errs is counted and never fails its task or the daemon.

use byclaw_client::{CancelMode, Client};
use byclaw_sandbox::{Hook, HookCounts};
use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// XADDs an ASK_AGENT to `hooks` whose metadata tells the hooks what to do.
async fn ask(
    conn: &mut redis::aio::MultiplexedConnection,
    text: &str,
    hooks: Value,
) -> anyhow::Result<Sent> {
    send_ask_with(conn, "hooks", json!(text), "", json!({ "hooks": hooks })).await
}

fn last_state(events: &[Value]) -> String {
    events
        .iter()
        .rev()
        .find(|e| e["data"]["contentType"] == "3003")
        .map(|e| delta_content(e).to_owned())
        .unwrap_or_default()
}

/// (succeeded, failed, timed out)
fn outcomes(counts: HookCounts) -> (u64, u64, u64) {
    (counts.succeeded, counts.failed, counts.timed_out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_that_trap_hang_or_fail_never_fail_a_task_and_are_counted() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["hooks"], "hooks", |config| {
        config.plugins.hook_timeout_ms = 400;
        let policy = config.plugins.policy.entry("hooks".into()).or_default();
        // Startup hangs (the daemon serves anyway); shutdown traps.
        policy
            .config
            .insert("on-worker-startup".into(), "hang".into());
        policy
            .config
            .insert("on-worker-shutdown".into(), "trap".into());
    })
    .await?;
    let mut conn = bed.conn.clone();

    // Every hook succeeds.
    let fine = ask(&mut conn, "hello", json!({})).await?;
    let events = events_until_terminal(&mut conn, &fine.session_id, WAIT).await?;
    assert_eq!(last_state(&events), "COMPLETED", "{events:#?}");
    // The start hook traps, the completion hook hangs past its timeout.
    let trapped = ask(
        &mut conn,
        "hello",
        json!({"on-task-start": "trap", "on-task-complete": "hang"}),
    )
    .await?;
    let events = events_until_terminal(&mut conn, &trapped.session_id, WAIT).await?;
    assert_eq!(last_state(&events), "COMPLETED", "{events:#?}");
    assert_eq!(task_result(&events), Some(&json!({"echo": "hello"})));
    // The task fails on its own; its start hook hangs, its error hook errs.
    let failing = ask(
        &mut conn,
        "fail",
        json!({"on-task-start": "hang", "on-task-error": "error"}),
    )
    .await?;
    let events = events_until_terminal(&mut conn, &failing.session_id, WAIT).await?;
    assert_eq!(last_state(&events), "FAILED: asked to fail", "{events:#?}");
    // Cancelled while running; its cancel hook traps.
    let cancelled = ask(&mut conn, "wait", json!({"on-task-cancel": "trap"})).await?;
    wait_for("the task to wait", WAIT, || {
        let mut conn = conn.clone();
        let session = cancelled.session_id.clone();
        async move {
            let events = all_events(&mut conn, &session).await?;
            Ok(states(&events)
                .contains(&"WAITING".to_owned())
                .then_some(()))
        }
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    client
        .cancel(
            &cancelled.message_id,
            &cancelled.session_id,
            "test",
            CancelMode::Graceful,
        )
        .await?;
    let events = events_until_terminal(&mut conn, &cancelled.session_id, WAIT).await?;
    assert_eq!(last_state(&events), "CANCELLED", "{events:#?}");

    // Stopping waits for the end hooks and runs the shutdown hook.
    bed.daemon.stop().await?;
    let stats = &bed.daemon.stats.hooks;
    let counts = |hook| outcomes(stats.get("hooks@0.1.0", hook));
    assert_eq!(counts(Hook::WorkerStartup), (0, 0, 1), "startup hung");
    assert_eq!(
        counts(Hook::TaskStart),
        (2, 1, 1),
        "fine + cancelled, trapped, failing"
    );
    assert_eq!(counts(Hook::TaskComplete), (1, 0, 1), "fine, trapped");
    assert_eq!(counts(Hook::TaskError), (0, 1, 0), "failing");
    assert_eq!(counts(Hook::TaskCancel), (0, 1, 0), "cancelled");
    assert_eq!(counts(Hook::WorkerShutdown), (0, 1, 0), "shutdown trapped");
    let slowest = stats.get("hooks@0.1.0", Hook::TaskComplete).slowest;
    assert!(
        slowest >= Duration::from_millis(400) && slowest < Duration::from_secs(5),
        "a hung hook is stopped at its timeout: {slowest:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_without_hooks_runs_none() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let mut conn = bed.conn.clone();
    let sent = send_ask(&mut conn, "echo", "hi").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    assert_eq!(last_state(&events), "COMPLETED");
    bed.daemon.stop().await?;
    assert!(bed.daemon.stats.hooks.snapshot().is_empty());
    Ok(())
}
