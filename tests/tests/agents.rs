//! Agents that talk: call-agent and dispatch-group across daemons with the
//! reply routed to the waiting task, ask-user answered live and late,
//! cancels that cascade to awaited children, tools across plugins.

use byclaw_client::{CancelMode, CancelStatus, Client};
use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

/// Waits until a task's execution record says it runs.
async fn wait_running(
    conn: &redis::aio::MultiplexedConnection,
    session_id: &str,
    message_id: &str,
) -> anyhow::Result<()> {
    wait_for(&format!("{message_id} running"), LONG, || {
        let mut conn = conn.clone();
        async move {
            let record = execution(&mut conn, session_id, message_id).await?;
            Ok(record.filter(|r| r["status"] == "RUNNING").map(|_| ()))
        }
    })
    .await
}

fn is_state(event: &Value, state: &str) -> bool {
    event["data"]["contentType"] == "3003" && delta_content(event) == state
}

async fn stream_len(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> anyhow::Result<u64> {
    Ok(redis::cmd("XLEN").arg(key).query_async(conn).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_agent_reply_read_by_another_daemon_reaches_the_waiting_task() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let callee_plugins = plugin_dir(&["translator", "researcher"]);
    let mut callees = Daemon::start(
        test_config(&redis, callee_plugins.path(), workspace.path()),
        &redis,
        "translator",
    )
    .await?;
    // Every permit of the caller daemon stays with its waiting tasks
    // (max_waiting = 0), so it cannot read the replies itself: another
    // daemon serving the same agent type must read and forward them.
    let caller_plugins = plugin_dir(&["planner", "tools"]);
    let mut caller_config = test_config(&redis, caller_plugins.path(), workspace.path());
    caller_config.worker.max_concurrency = 2;
    caller_config.worker.max_waiting = 0;
    caller_config.streams.delete_acked = false;
    let mut caller = Daemon::start(caller_config, &redis, "planner").await?;

    let client = Client::connect(&redis.url()).await?;
    let mut conn = redis.connect().await?;
    let mut tasks = Vec::new();
    for topic in ["solar energy", "the future of water"] {
        let session = format!("sess-{}", suffix());
        let payload = json!({ "skip_ask": true, "translate_delay_ms": 300 });
        let sent = client.send("planner", &session, topic, payload).await?;
        tasks.push((session, sent.message_id, topic));
    }
    for (session, message_id, _) in &tasks {
        wait_event(&conn, session, message_id, "WAITING_AGENT", |e| {
            is_state(e, "WAITING_AGENT")
        })
        .await?;
    }
    let relay_plugins = plugin_dir(&["planner"]);
    let mut relay = Daemon::start(
        test_config(&redis, relay_plugins.path(), workspace.path()),
        &redis,
        "planner",
    )
    .await?;

    for (session, message_id, topic) in &tasks {
        let events = task_events(&mut conn, session, message_id, LONG).await?;
        assert_eq!(
            states(&events).last().map(String::as_str),
            Some("COMPLETED"),
            "{events:#?}"
        );
        let result = task_result(&events).unwrap();
        assert_eq!(result["topic"], *topic);
        let expected_title = match *topic {
            "solar energy" => "solaire énergie",
            _ => "le avenir de eau",
        };
        assert_eq!(result["title"], expected_title);
        let findings = result["findings"].as_array().unwrap();
        assert_eq!(findings.len(), 3);
        // Only the caller ran planner tasks; the relay only forwarded.
        for event in all_events(&mut conn, session).await? {
            if event["source_agent_id"] == "planner" {
                assert_eq!(event["message_id"], message_id.as_str());
            }
        }
        let record = execution(&mut conn, session, message_id).await?.unwrap();
        assert_eq!(record["worker_id"], caller.worker_id.as_str());
    }
    let forwarded = stream_len(
        &mut conn,
        &format!("byai_gateway:ctrl:worker:{}", caller.worker_id),
    )
    .await?;
    assert!(
        forwarded >= 4,
        "only {forwarded} replies were forwarded to the caller"
    );
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:planner", LONG).await?;
    wait_all_acked(
        &conn,
        &format!("byai_gateway:ctrl:worker:{}", caller.worker_id),
        LONG,
    )
    .await?;

    relay.stop().await?;
    caller.stop().await?;
    callees.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_group_runs_children_on_two_daemons_and_answers_in_order() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let mut daemons = Vec::new();
    // Two researcher daemons that take one task at a time: three children
    // sent at once cannot all run on one of them.
    for plugins in [&["researcher", "translator"][..], &["researcher"][..]] {
        let dir = plugin_dir(plugins);
        let mut config = test_config(&redis, dir.path(), workspace.path());
        config.worker.max_concurrency = 1;
        daemons.push((Daemon::start(config, &redis, "researcher").await?, dir));
    }
    let caller_dir = plugin_dir(&["planner", "tools"]);
    let mut caller = Daemon::start(
        test_config(&redis, caller_dir.path(), workspace.path()),
        &redis,
        "planner",
    )
    .await?;
    let client = Client::connect(&redis.url()).await?;
    let mut conn = redis.connect().await?;
    let session = format!("sess-{}", suffix());
    let payload = json!({ "skip_ask": true, "research_delay_ms": 300 });
    let sent = client
        .send("planner", &session, "solar power", payload)
        .await?;

    let events = task_events(&mut conn, &session, &sent.message_id, LONG).await?;
    let result = task_result(&events).unwrap();
    let findings: Vec<&str> = result["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(findings.len(), 3, "{result:#}");
    for (finding, aspect) in findings.iter().zip(["history", "applications", "risks"]) {
        assert!(
            finding.starts_with(&format!("The {aspect} of solar power")),
            "{finding}"
        );
    }
    assert_eq!(
        result["stats"]["words"],
        findings.join(" ").split_whitespace().count()
    );

    let waiting = events
        .iter()
        .find(|e| is_state(e, "WAITING_AGENT") && e["metadata"]["task_group_id"].is_string())
        .expect("a WAITING_AGENT event for the group");
    let group_id = waiting["metadata"]["task_group_id"].as_str().unwrap();
    let children = waiting["metadata"]["children"].as_array().unwrap();
    assert_eq!(children.len(), 3);
    let mut workers = std::collections::BTreeSet::new();
    for child in children {
        let record = execution(&mut conn, &session, child["message_id"].as_str().unwrap())
            .await?
            .unwrap();
        assert_eq!(record["status"], "COMPLETED");
        workers.insert(record["worker_id"].as_str().unwrap().to_owned());
    }
    let researchers: std::collections::BTreeSet<String> =
        daemons.iter().map(|(d, _)| d.worker_id.clone()).collect();
    assert_eq!(
        workers, researchers,
        "the children ran on both researcher daemons"
    );
    // The reference's counter agrees.
    let group: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("byai_gateway:task_group:{group_id}"))
        .query_async(&mut conn)
        .await?;
    assert_eq!(group["total"], "3");
    assert_eq!(group["completed"], "3");
    assert_eq!(group["source_agent_id"], "planner");

    caller.stop().await?;
    for (daemon, _) in &mut daemons {
        daemon.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_user_is_answered_and_a_late_answer_runs_as_a_resume() -> anyhow::Result<()> {
    let mut bed = TestBed::start(
        &["planner", "translator", "researcher", "tools"],
        "planner",
        |_| {},
    )
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let conn = bed.conn.clone();

    // Answered in time.
    let session = format!("sess-{}", suffix());
    let payload = json!({ "ask_timeout_ms": 20000 });
    let sent = client
        .send("planner", &session, "good morning world", payload)
        .await?;
    let form = wait_event(
        &conn,
        &session,
        &sent.message_id,
        "the ask-user form",
        |e| e["data"]["contentType"] == "3013",
    )
    .await?;
    assert_eq!(form["event_type"], "reasoningLogDelta");
    let fields: Value = serde_json::from_str(delta_content(&form))?;
    assert_eq!(fields["pluginMachineFields"][0]["fieldCode"], "user_input");
    assert!(
        fields["pluginMachineFields"][0]["description"]
            .as_str()
            .unwrap()
            .contains("focus on")
    );
    wait_event(&conn, &session, &sent.message_id, "WAITING_USER", |e| {
        is_state(e, "WAITING_USER")
    })
    .await?;
    client
        .resume(
            "planner",
            &session,
            &sent.message_id,
            "risks",
            "USER_REPLIED",
            json!({ "user_input": "risks" }),
        )
        .await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    let seen = states(&events);
    assert_eq!(
        seen.last().map(String::as_str),
        Some("COMPLETED"),
        "{seen:?}"
    );
    let waiting_user = seen.iter().position(|s| s == "WAITING_USER").unwrap();
    assert_eq!(seen[waiting_user + 1], "RESUMED", "{seen:?}");
    let result = task_result(&events).unwrap();
    assert_eq!(result["focus"], "risks");
    assert_eq!(result["title"], "bon matin monde");

    // Not answered in time: the question times out and the task fails;
    // the answer that comes later runs through the handler as a RESUME.
    let session = format!("sess-{}", suffix());
    let payload = json!({ "ask_timeout_ms": 200 });
    let sent = client.send("planner", &session, "hello", payload).await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    let terminal = states(&events).pop().unwrap();
    assert!(terminal.starts_with("FAILED: timeout"), "{terminal}");
    let late = client
        .resume(
            "planner",
            &session,
            &sent.message_id,
            "applications",
            "USER_REPLIED",
            json!(null),
        )
        .await?;
    let events = task_events(&mut bed.conn, &session, &late.message_id, LONG).await?;
    assert_eq!(states(&events), ["RESUMED", "COMPLETED"]);
    assert_eq!(
        delta_content(&events[1]),
        "Thanks, noted your answer: applications"
    );
    assert_eq!(task_result(&events).unwrap()["late_answer"], "applications");

    bed.daemon.stop().await?;
    Ok(())
}

/// A daemon with the planner family, and a planner task waiting in
/// call-agent on a translator that is running (20 s of work).
async fn planner_waiting_on_its_translator()
-> anyhow::Result<(TestBed, Client, String, byclaw_client::Sent, String)> {
    let bed = TestBed::start(
        &["planner", "translator", "researcher", "tools"],
        "planner",
        |_| {},
    )
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let payload = json!({ "translate_delay_ms": 20000 });
    let sent = client
        .send("planner", &session, "hello world", payload)
        .await?;
    let waiting = wait_event(
        &bed.conn,
        &session,
        &sent.message_id,
        "WAITING_AGENT",
        |e| is_state(e, "WAITING_AGENT"),
    )
    .await?;
    let child = waiting["metadata"]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_running(&bed.conn, &session, &child).await?;
    Ok((bed, client, session, sent, child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_waiting_caller_cancels_its_child() -> anyhow::Result<()> {
    let (mut bed, client, session, sent, child) = planner_waiting_on_its_translator().await?;

    let response = client
        .cancel(
            &sent.message_id,
            &session,
            "user pressed stop",
            CancelMode::Graceful,
        )
        .await?;
    assert_eq!(
        response.status,
        CancelStatus::CancelRequested,
        "{response:?}"
    );
    assert_eq!(response.worker_id, bed.daemon.worker_id);

    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    let caller_states = states(&events);
    assert_eq!(
        caller_states[caller_states.len() - 2..],
        ["CANCELLING", "CANCELLED"],
        "{caller_states:?}"
    );
    let child_events = task_events(&mut bed.conn, &session, &child, LONG).await?;
    let child_states = states(&child_events);
    assert_eq!(
        child_states[child_states.len() - 2..],
        ["CANCELLING", "CANCELLED"],
        "{child_states:?}"
    );
    let record = execution(&mut bed.conn, &session, &child).await?.unwrap();
    assert_eq!(record["status"], "CANCELLED");
    assert!(
        record["cancel_reason"]
            .as_str()
            .unwrap()
            .contains("user pressed stop")
    );

    // The child's CANCELLED reply finds its route tombstoned and is dropped,
    // not run as an orphan RESUME of the cancelled planner.
    wait_all_acked(&bed.conn, "byai_gateway:ctrl:capability:planner", LONG).await?;
    let route: Option<String> = redis::cmd("GET")
        .arg(format!("byai_gateway:await:planner:agent:{child}"))
        .query_async(&mut bed.conn)
        .await?;
    assert_eq!(route.as_deref(), Some("!cancelled"));
    for event in all_events(&mut bed.conn, &session).await? {
        if event["source_agent_id"] == "planner" {
            assert_eq!(event["message_id"], sent.message_id.as_str(), "{event:#}");
        }
    }

    // The reference client's other answers.
    let again = client
        .cancel(&sent.message_id, &session, "", CancelMode::Graceful)
        .await?;
    assert_eq!(again.status, CancelStatus::AlreadyFinished);
    let unknown = client
        .cancel("msg-00000000", &session, "", CancelMode::Force)
        .await?;
    assert_eq!(unknown.status, CancelStatus::NotFound);
    let other_session = format!("sess-{}", suffix());
    let elsewhere = client
        .cancel(&sent.message_id, &other_session, "", CancelMode::Graceful)
        .await?;
    assert_eq!(elsewhere.status, CancelStatus::NotFound);
    redis::cmd("HSET")
        .arg(format!("byai_gateway:session:{other_session}:registry"))
        .arg("msg_map:msg-feedbeef")
        .arg("exec-feedbeef")
        .arg("exec:exec-feedbeef")
        .arg(json!({"execution_id": "exec-feedbeef", "session_id": "someone-else", "status": "RUNNING", "worker_id": "w"}).to_string())
        .query_async::<()>(&mut bed.conn)
        .await?;
    let mismatch = client
        .cancel("msg-feedbeef", &other_session, "", CancelMode::Graceful)
        .await?;
    assert_eq!(mismatch.status, CancelStatus::SessionMismatch);

    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_child_answers_its_caller_cancelled() -> anyhow::Result<()> {
    let (mut bed, client, session, sent, child) = planner_waiting_on_its_translator().await?;
    let response = client
        .cancel(&child, &session, "not needed", CancelMode::Graceful)
        .await?;
    assert_eq!(response.status, CancelStatus::CancelRequested);

    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    let states = states(&events);
    assert!(states.contains(&"RESUMED".to_owned()), "{states:?}");
    let terminal = states.last().unwrap();
    assert!(
        terminal.starts_with("FAILED: cancelled: translator was cancelled"),
        "the planner saw its call end CANCELLED: {terminal}"
    );
    bed.daemon.stop().await?;
    Ok(())
}

/// Asks the `tools` plugin's console and returns its answer.
async fn ask_tools(bed: &mut TestBed, client: &Client, request: Value) -> anyhow::Result<Value> {
    let session = format!("sess-{}", suffix());
    let sent = client
        .send("tools", &session, &request.to_string(), json!({}))
        .await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    Ok(task_result(&events).cloned().unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_of_any_plugin_are_listed_validated_and_called() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["tools", "showcase"], "tools", |_| {}).await?;
    let client = Client::connect(&bed.redis.url()).await?;

    let ok = ask_tools(
        &mut bed,
        &client,
        json!({"call": "add", "args": {"a": 1, "b": 2.5}}),
    )
    .await?;
    assert_eq!(ok, json!({"ok": {"sum": 3.5}}));

    let invalid = ask_tools(
        &mut bed,
        &client,
        json!({"call": "add", "args": {"a": "one"}}),
    )
    .await?;
    assert_eq!(invalid["error"]["kind"], "invalid-input", "{invalid:#}");
    let message = invalid["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/a:") && message.contains("\"b\""),
        "{message}"
    );

    let unknown = ask_tools(&mut bed, &client, json!({"call": "no_such_tool"})).await?;
    assert_eq!(unknown["error"]["kind"], "not-found", "{unknown:#}");

    // A tool of another plugin (showcase), by plain and qualified name.
    for name in ["word_count", "showcase/word_count"] {
        let words = ask_tools(
            &mut bed,
            &client,
            json!({"call": name, "args": {"text": "a b c"}}),
        )
        .await?;
        assert_eq!(words, json!({"ok": {"words": 3}}), "{name}");
    }
    let wrong = ask_tools(
        &mut bed,
        &client,
        json!({"call": "word_count", "args": {"text": 7}}),
    )
    .await?;
    assert_eq!(wrong["error"]["kind"], "invalid-input", "{wrong:#}");

    let catalog = ask_tools(&mut bed, &client, json!("list")).await?;
    let tools = catalog["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["word_count", "add", "word_stats"]);
    let add = &tools[1];
    assert_eq!(add["description"], "Adds two numbers");
    assert_eq!(add["inputSchema"]["required"], json!(["a", "b"]));

    // Prompt templates: own, another plugin's, missing variables, unknown.
    let own = ask_tools(
        &mut bed,
        &client,
        json!({"render": "explain", "variables": {"audience": "a child", "tool": "add", "result": "3"}}),
    )
    .await?;
    assert_eq!(
        own,
        json!({"ok": "Explain to a child what add returned: 3"})
    );
    let other = ask_tools(
        &mut bed,
        &client,
        json!({"render": "showcase/summarize", "variables": {"text": "gatewayd"}}),
    )
    .await?;
    assert_eq!(other, json!({"ok": "Summarize in one sentence: gatewayd"}));
    let missing = ask_tools(
        &mut bed,
        &client,
        json!({"render": "explain", "variables": {"tool": "add"}}),
    )
    .await?;
    assert_eq!(missing["error"]["kind"], "invalid-input");
    assert!(
        missing["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("audience, result"),
        "{missing:#}"
    );
    let unknown = ask_tools(&mut bed, &client, json!({"render": "nope"})).await?;
    assert_eq!(unknown["error"]["kind"], "not-found");

    let workers = ask_tools(&mut bed, &client, json!({"workers": true})).await?;
    let me = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == bed.daemon.worker_id.as_str())
        .expect("this daemon is listed");
    assert_eq!(me["capabilities"], json!(["showcase", "tools"]));
    assert!(me["last_seen"].as_u64().unwrap() > 1_600_000_000_000);

    bed.daemon.stop().await?;
    Ok(())
}

/// A reply forwarded to a worker that then died before acknowledging it is
/// read again when that worker id comes back; its waiter is gone, so it
/// runs through the handler as a RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_reply_left_pending_is_run_when_its_worker_restarts() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["planner"]);
    let config = test_config(&redis, plugins.path(), workspace.path());
    let worker_stream = format!("byai_gateway:ctrl:worker:{}", config.worker.id);
    let mut conn = redis.connect().await?;
    // What another daemon forwarded, delivered to this worker id just
    // before it died.
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&worker_stream)
        .arg("agent_engines")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await?;
    let session = format!("sess-{}", suffix());
    let resume_id = format!("msg-{}", suffix());
    let resume = json!({
        "action_type": "RESUME",
        "header": {"message_id": resume_id, "session_id": session, "trace_id": "0".repeat(32),
                   "target_agent_type": "planner", "parent_message_id": "msg-gone0001"},
        "body": {"content": "history", "status": "USER_REPLIED"}
    });
    redis::cmd("XADD")
        .arg(&worker_stream)
        .arg("*")
        .arg("data")
        .arg(resume.to_string())
        .arg("capability")
        .arg("planner")
        .query_async::<String>(&mut conn)
        .await?;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("agent_engines")
        .arg(&config.worker.id)
        .arg("STREAMS")
        .arg(&worker_stream)
        .arg(">")
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        pending_count(&mut conn, &worker_stream, "agent_engines").await?,
        1
    );

    let mut daemon = Daemon::start(config, &redis, "planner").await?;
    let events = task_events(&mut conn, &session, &resume_id, LONG).await?;
    assert_eq!(states(&events), ["RESUMED", "COMPLETED"]);
    assert_eq!(task_result(&events).unwrap()["late_answer"], "history");
    wait_all_acked(&conn, &worker_stream, LONG).await?;
    daemon.stop().await?;
    Ok(())
}
