//! Session history through the daemon: what one daemon saves another sees,
//! in `extra_payload.history` and through the `history` import; the
//! PostgreSQL store; a database that is down never fails a task.

use byclaw_client::Client;
use gatewayd::config::{Config, HistoryBackend};
use gatewayd::history::{History, Role};
use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

async fn ask(
    client: &Client,
    conn: &mut redis::aio::MultiplexedConnection,
    agent: &str,
    session: &str,
    text: &str,
) -> anyhow::Result<Vec<Value>> {
    let sent = client.send(agent, session, text, json!({})).await?;
    task_events(conn, session, &sent.message_id, LONG).await
}

/// Waits until the session's stored history has `n` entries.
async fn wait_entries(history: &History, session: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    wait_for(&format!("{n} history entries"), LONG, || async {
        let entries = history.read(session, 100).await?;
        Ok((entries.len() >= n).then(|| {
            entries
                .iter()
                .map(|e| serde_json::to_value(e).unwrap())
                .collect()
        }))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_share_one_sessions_history() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let echo_dir = plugin_dir(&["echo"]);
    let mut first = Daemon::start(
        test_config(&redis, echo_dir.path(), workspace.path()),
        &redis,
        "echo",
    )
    .await?;
    let recall_dir = plugin_dir(&["faults"]);
    let mut second = Daemon::start(
        test_config(&redis, recall_dir.path(), workspace.path()),
        &redis,
        "recall",
    )
    .await?;
    let client = Client::connect(&redis.url()).await?;
    let mut conn = redis.connect().await?;
    let session = format!("sess-{}", suffix());

    let events = ask(&client, &mut conn, "echo", &session, "hello history").await?;
    assert_eq!(states(&events).last().unwrap(), "COMPLETED");
    let config = test_config(&redis, echo_dir.path(), workspace.path());
    let store = History::start(&config.history, &redis.url()).await?;
    let saved = wait_entries(&store, &session, 2).await?;
    assert_eq!(saved[0]["role"], "user");
    assert_eq!(saved[0]["content"], "hello history");
    assert_eq!(saved[1]["role"], "assistant");
    assert_eq!(
        saved[1]["content"], "hello history",
        "the three chunks joined"
    );
    assert_eq!(saved[1]["metadata"]["agent_id"], "echo");

    // The other daemon's task gets it injected and can read it.
    let events = ask(&client, &mut conn, "recall", &session, "what did I say?").await?;
    let result = task_result(&events).unwrap();
    let injected = result["injected"].as_array().unwrap();
    assert_eq!(injected.len(), 2, "{result:#}");
    assert_eq!(injected[0]["role"], "user");
    assert_eq!(injected[0]["content"], "hello history");
    assert_eq!(injected[1]["role"], "assistant");
    assert!(injected[0]["metadata"]["message_id"].is_string());
    let read = result["read"].as_array().unwrap();
    assert_eq!(
        read.last().unwrap()["content"],
        "what did I say?",
        "its own message was saved at start"
    );
    // Its reply is saved too: four entries, oldest first.
    let all = wait_entries(&store, &session, 4).await?;
    assert_eq!(all[3]["content"], "recalled");

    // The CLI's view (the same store, as `gatewayd history` reads it).
    let newest = store.read(&session, 1).await?;
    assert_eq!(newest[0].role, Role::Assistant);

    store.close(Duration::from_secs(5)).await?;
    first.stop().await?;
    second.stop().await?;
    Ok(())
}

fn postgres_config(config: &mut Config, dsn: &str) {
    config.history.backend = HistoryBackend::Postgres;
    config.history.postgres_dsn = Some(dsn.to_owned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_serves_the_daemon() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo", "faults"], "echo", |c| {
        postgres_config(c, POSTGRES)
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-pg-{}", suffix());
    ask(
        &client,
        &mut bed.conn,
        "echo",
        &session,
        "stored in postgres",
    )
    .await?;
    let store = History::start(&bed.config.history, &bed.redis.url()).await?;
    let saved = wait_entries(&store, &session, 2).await?;
    assert_eq!(saved[0]["content"], "stored in postgres");
    assert_eq!(saved[1]["role"], "assistant");
    let events = ask(&client, &mut bed.conn, "recall", &session, "and now?").await?;
    let injected = &task_result(&events).unwrap()["injected"];
    assert_eq!(injected.as_array().unwrap().len(), 2, "{injected:#}");
    store.close(Duration::from_secs(5)).await?;
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_down_never_fails_a_task() -> anyhow::Result<()> {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = closed.local_addr()?.port();
    drop(closed);
    let dsn = format!("postgres://postgres@127.0.0.1:{port}/test");
    let mut bed = TestBed::start(&["echo", "faults"], "echo", |c| {
        postgres_config(c, &dsn);
        c.history.read_timeout_ms = 500;
        c.history.write_attempts = 1;
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let events = ask(&client, &mut bed.conn, "echo", &session, "no database").await?;
    assert_eq!(states(&events).last().unwrap(), "COMPLETED");
    let events = ask(&client, &mut bed.conn, "recall", &session, "anything?").await?;
    let result = task_result(&events).expect("recall completed");
    assert_eq!(
        result["injected"],
        json!([]),
        "no history, but the task ran: {result:#}"
    );
    let error = result["read"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("unavailable: the session history cannot be read"),
        "{error}"
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reply_is_kept_up_to_max_entry_bytes_and_marked_truncated() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |c| {
        c.history.max_entry_bytes = 1024;
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-long-{}", suffix());
    let long = "é".repeat(3000);
    let events = ask(&client, &mut bed.conn, "echo", &session, &long).await?;
    assert_eq!(states(&events).last().unwrap(), "COMPLETED");
    // The session saw the whole reply; the history keeps a bounded part.
    let streamed: String = events
        .iter()
        .filter(|e| e["data"]["contentType"] == "1002")
        .map(delta_content)
        .collect();
    assert_eq!(streamed, long);
    let store = History::start(&Default::default(), &bed.redis.url()).await?;
    let saved = wait_entries(&store, &session, 2).await?;
    let reply = saved[1]["content"].as_str().unwrap();
    assert_eq!(saved[1]["role"], "assistant");
    assert_eq!(
        reply.len(),
        1024,
        "cut at a character boundary under the bound"
    );
    assert!(long.starts_with(reply));
    assert_eq!(saved[1]["metadata"]["truncated"], true);
    store.close(Duration::from_secs(5)).await?;
    bed.daemon.stop().await?;
    Ok(())
}
