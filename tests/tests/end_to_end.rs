//! A task in wire format through a real Redis and an in-process daemon:
//! streamed chunks, terminal state with the result, ack, execution record,
//! replies to calling agents, replay protection.

use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_streams_three_chunks_then_completed_with_result() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let sent = send_ask(&mut conn, "echo", "hello wasm world").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;

    let chunks: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "answerDelta")
        .collect();
    assert_eq!(chunks.len(), 3, "{events:#?}");
    let text: String = chunks.iter().map(|e| delta_content(e)).collect();
    assert_eq!(text, "hello wasm world");
    for chunk in &chunks {
        assert_eq!(chunk["data"]["contentType"], "1002");
        assert_eq!(chunk["data"]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunk["source_agent_id"], "echo");
        assert_eq!(chunk["data"]["agentId"], "echo");
        assert_eq!(chunk["message_id"], sent.message_id.as_str());
        assert_eq!(chunk["trace_id"], sent.trace_id.as_str());
        assert_eq!(chunk["session_id"], sent.session_id.as_str());
    }
    let last = events.last().unwrap();
    assert_eq!(last["event_type"], "reasoningLogDelta");
    assert_eq!(delta_content(last), "COMPLETED");
    assert_eq!(
        last["metadata"]["result"],
        json!({"echo": "hello wasm world", "chunks": 3})
    );

    // Acked (and deleted), execution terminal, stream expiring.
    let stream = "byai_gateway:ctrl:capability:echo";
    wait_all_acked(&conn, stream, WAIT).await?;
    let length: u64 = redis::cmd("XLEN")
        .arg(stream)
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        length, 0,
        "acked entries are deleted (streams.delete_acked)"
    );
    let exec = execution(&mut conn, &sent.session_id, &sent.message_id)
        .await?
        .expect("execution recorded");
    assert_eq!(exec["status"], "COMPLETED");
    assert_eq!(exec["worker_id"], daemon.worker_id.as_str());
    assert!(exec["finished_at"].as_u64().unwrap() >= exec["started_at"].as_u64().unwrap());
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!(
            "byai_gateway:session:{}:data_stream",
            sent.session_id
        ))
        .query_async(&mut conn)
        .await?;
    assert!(ttl > 604_000, "session stream TTL {ttl}");
    // Echo declares no workspace: nothing was created on disk for it.
    assert!(!bed.workspace.path().join(&sent.session_id).exists());

    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn showcase_emits_states_artifact_and_calls_its_tool() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["showcase"], "showcase", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let sent = send_ask(&mut conn, "showcase", "one two three four").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    let states: Vec<&str> = events
        .iter()
        .filter(|e| e["data"]["contentType"] == "3003")
        .map(delta_content)
        .collect();
    assert_eq!(states.first(), Some(&"ANALYZING"), "{events:#?}");
    assert_eq!(states.last(), Some(&"COMPLETED"));
    let artifact = events
        .iter()
        .find(|e| e["data"]["contentType"] == "3010")
        .expect("an artifact event");
    let files: Value = serde_json::from_str(delta_content(artifact))?;
    assert!(
        files[0]["fileUrl"]
            .as_str()
            .unwrap()
            .ends_with("report.txt")
    );
    assert_eq!(artifact["metadata"]["name"], "report.txt");
    let result = &events.last().unwrap()["metadata"]["result"];
    assert_eq!(
        result["words"], 4,
        "the tool call counted the words: {result}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "appStreamResponse"),
        "the final chunk marks the end of the reply"
    );
    // The private workspace is gone after the task; the public one stays.
    let session_dir = bed.workspace.path().join(&sent.session_id);
    wait_for("private workspace removal", WAIT, || {
        let private = session_dir.join("private").join(&sent.message_id);
        async move { Ok((!private.exists()).then_some(())) }
    })
    .await?;
    assert!(session_dir.join("public/session").is_dir());

    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calling_agent_gets_a_resume_with_the_reply() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let caller = format!("py-caller-{}", suffix());
    let sent = send_ask_from(&mut conn, "echo", json!("ping"), &caller).await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    assert_eq!(
        delta_content(events.last().unwrap()),
        format!("QUEUED: {caller}")
    );

    let entries = xrange(&mut conn, &format!("byai_gateway:ctrl:capability:{caller}")).await?;
    assert_eq!(entries.len(), 1);
    let data: String = entries[0].get("data").unwrap();
    let resume: Value = serde_json::from_str(&data)?;
    assert_eq!(resume["action_type"], "RESUME");
    assert_eq!(resume["header"]["target_agent_type"], caller.as_str());
    assert_eq!(resume["header"]["source_agent_id"], "echo");
    assert_eq!(
        resume["header"]["parent_message_id"],
        sent.message_id.as_str()
    );
    assert_eq!(resume["header"]["session_id"], sent.session_id.as_str());
    assert_eq!(resume["header"]["trace_id"], sent.trace_id.as_str());
    assert!(
        resume["header"]["message_id"]
            .as_str()
            .unwrap()
            .starts_with("msg-")
    );
    assert_eq!(resume["body"]["status"], "COMPLETED");
    assert_eq!(
        resume["body"]["reply_data"],
        json!({"echo": "ping", "chunks": 3})
    );

    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_finished_task_is_acked_and_skipped() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let sent = send_ask(&mut conn, "echo", "once").await?;
    let first = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    // The same command again, as a duplicate delivery would bring it.
    let data = ask_agent_json(
        &sent.session_id,
        &sent.message_id,
        &sent.trace_id,
        "echo",
        json!("once"),
        "",
    );
    let stream = "byai_gateway:ctrl:capability:echo";
    xadd_data(&mut conn, stream, &data).await?;
    // A second task after it shows the duplicate has been handled.
    let later = send_ask(&mut conn, "echo", "after").await?;
    events_until_terminal(&mut conn, &later.session_id, WAIT).await?;
    wait_all_acked(&conn, stream, WAIT).await?;
    let all = all_events(&mut conn, &sent.session_id).await?;
    assert_eq!(
        all.len(),
        first.len(),
        "the duplicate produced no events: {all:#?}"
    );

    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_unregisters_and_releases_the_lock() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let (redis, daemon, mut conn) = (&bed.redis, &mut bed.daemon, bed.conn.clone());
    let worker_id = daemon.worker_id.clone();

    // A second process with the same worker id is refused.
    let err = gatewayd::run(bed.config.clone(), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("held by another live process"),
        "{err}"
    );

    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("byai_gateway:registry:active_workers")
        .arg(&worker_id)
        .query_async(&mut conn)
        .await?;
    assert!(score.is_some());
    daemon.stop().await?;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg("byai_gateway:registry:active_workers")
        .arg(&worker_id)
        .query_async(&mut conn)
        .await?;
    assert!(score.is_none());
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("byai_gateway:registry:capability:workers:echo")
        .query_async(&mut conn)
        .await?;
    assert!(!members.contains(&worker_id));
    let lock: Option<String> = redis::cmd("GET")
        .arg(format!("byai_gateway:registry:worker:lock:{worker_id}"))
        .query_async(&mut conn)
        .await?;
    assert!(lock.is_none());
    // And the id can be taken again.
    let mut again = Daemon::start(bed.config.clone(), redis, "echo").await?;
    again.stop().await?;
    Ok(())
}

/// The WIT only grows: a component built against the first release of it
/// (no `agents` interface, no `list-tools`) still loads and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_first_wit_still_runs() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let plugins = tempfile::tempdir()?;
    std::fs::copy(
        repo_root().join("tests/fixtures/compat/echo-foundation.wasm"),
        plugins.path().join("echo.wasm"),
    )?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, "echo").await?;
    let mut conn = redis.connect().await?;
    let sent = send_ask(&mut conn, "echo", "old plugin").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    assert_eq!(
        events.last().unwrap()["metadata"]["result"],
        json!({"echo": "old plugin", "chunks": 3})
    );
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_streaming_longer_than_the_session_ttl_keeps_its_stream_with_few_expires()
-> anyhow::Result<()> {
    use futures::StreamExt;
    // A 5 s session TTL and a task streaming a tick every 50 ms for 6 s:
    // each tick goes out in a pipeline of its own. The stream's EXPIRE is
    // refreshed with the first event and then once per half TTL, not with
    // every tick — and the stream never expires under the task.
    let mut bed = TestBed::start(&["faults"], "slow", |config| {
        config.streams.session_ttl_s = 5;
    })
    .await?;
    let mut conn = bed.conn.clone();
    // What Redis does to session streams, command by command, in order.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kgt")
        .query_async(&mut conn)
        .await?;
    let mut pubsub = redis::Client::open(bed.redis.url())?
        .get_async_pubsub()
        .await?;
    pubsub
        .psubscribe("__keyspace@0__:byai_gateway:session:*:data_stream")
        .await?;
    let mut notices = pubsub.on_message();

    let sent = send_ask(&mut conn, "slow", "6000").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    let ticks = events.iter().filter(|e| delta_content(e) == "tick").count();
    assert_eq!(ticks, 120, "{events:#?}");

    let stream = format!("byai_gateway:session:{}:data_stream", sent.session_id);
    let stored: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        stored.len(),
        events.len(),
        "every event the task wrote over 6 s is still in its stream (TTL 5 s)"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&stream)
        .query_async(&mut conn)
        .await?;
    assert!(
        (1..=5).contains(&ttl),
        "the stream's TTL counts from the task's end: {ttl}"
    );

    // The notices up to the EXPIRE that follows the terminal event's XADD.
    let (mut xadds, mut expires, mut last) = (0, 0, String::new());
    while xadds < events.len() || last != "expire" {
        let notice = tokio::time::timeout(WAIT, notices.next())
            .await?
            .expect("subscribed");
        last = notice.get_payload()?;
        match last.as_str() {
            "xadd" => xadds += 1,
            "expire" => expires += 1,
            _ => {}
        }
    }
    // With the first event, at 2.5 s and 5 s, and with the final writes.
    assert!(
        (2..=5).contains(&expires),
        "{expires} EXPIRE of the stream for {xadds} XADD: one per half TTL, not one per event"
    );
    drop(notices);
    bed.daemon.stop().await?;
    Ok(())
}
