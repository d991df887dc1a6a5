//! The capability reader with more streams than free permits: an idle
//! stream never holds up a busy one, and entries read beyond the permits
//! held wait in the backlog and still run exactly once.

use integration_tests::*;
use std::time::Duration;

/// Longer than any test here may take: a reader that blocked on an idle
/// stream would sit this long per read.
const BLOCK_MS: u64 = 15_000;
const WAIT: Duration = Duration::from_secs(30);

const SIX_EXAMPLES: [&str; 6] = [
    "echo",
    "showcase",
    "planner",
    "translator",
    "researcher",
    "tools",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_do_not_delay_a_busy_one() -> anyhow::Result<()> {
    // One permit and six streams: the reader always holds fewer permits
    // than there are streams.
    let bed = TestBed::start(&SIX_EXAMPLES, "echo", |config| {
        config.worker.max_concurrency = 1;
        config.worker.fetch_count = 1;
        config.worker.block_ms = BLOCK_MS;
    })
    .await?;
    let mut conn = bed.conn.clone();

    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(send_ask(&mut conn, "echo", &format!("task {i}")).await?);
    }
    // Twenty tasks one after another: a read that blocked on any of the five
    // idle streams would take BLOCK_MS, and this wait would run out.
    for task in &sent {
        let events = task_events(&mut conn, &task.session_id, &task.message_id, WAIT).await?;
        assert_eq!(
            states(&events).last().map(String::as_str),
            Some("COMPLETED")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_beyond_the_permits_held_run_once_each() -> anyhow::Result<()> {
    // One permit, three busy streams: each read can return one entry per
    // stream, so two of every three wait in the backlog.
    let bed = TestBed::start(&["echo", "translator", "researcher"], "echo", |config| {
        config.worker.max_concurrency = 1;
        config.worker.fetch_count = 1;
        config.worker.block_ms = BLOCK_MS;
    })
    .await?;
    let mut conn = bed.conn.clone();

    let mut sent = Vec::new();
    for i in 0..10 {
        for agent in ["echo", "translator", "researcher"] {
            sent.push((
                agent,
                send_ask(&mut conn, agent, &format!("hello world {i}")).await?,
            ));
        }
    }
    for agent in ["echo", "translator", "researcher"] {
        let stream = format!("byai_gateway:ctrl:capability:{agent}");
        wait_all_acked(&conn, &stream, WAIT).await?;
    }
    // Every task ran exactly once: one COMPLETED event and a COMPLETED
    // record each, and thirty tasks counted in all.
    for (agent, task) in &sent {
        let events = task_events(&mut conn, &task.session_id, &task.message_id, WAIT).await?;
        let states = states(&events);
        assert_eq!(
            states.iter().filter(|s| *s == "COMPLETED").count(),
            1,
            "{agent}: {states:?}"
        );
        let record = execution(&mut conn, &task.session_id, &task.message_id)
            .await?
            .expect("execution recorded");
        assert_eq!(record["status"], "COMPLETED");
    }
    let metrics = bed.daemon.stats.metrics.render();
    let completed: u64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("gatewayd_tasks_finished_total{")
                && line.contains("outcome=\"completed\"")
        })
        .filter_map(|line| line.rsplit(" ").next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(completed, 30, "{metrics}");
    Ok(())
}
