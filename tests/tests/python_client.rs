//! The reference Python SDK (from PyPI) against gatewayd: its client finds
//! our worker in the registry, sends a task, reads our events with its own
//! field names, and cancels a running task through the session registry;
//! a reference Python worker calls our agent and gets the reply.

use integration_tests::*;
use serde_json::Value;
use std::time::Duration;

async fn interop(python: &str, redis: &RedisServer, args: &[&str]) -> anyhow::Result<Value> {
    python_interop(python, &redis.url(), args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_sends_reads_and_cancels() -> anyhow::Result<()> {
    let python = python_venv().await?;
    let mut bed = TestBed::start(&["echo", "faults"], "echo", |_| {}).await?;
    let (redis, daemon) = (&bed.redis, &mut bed.daemon);

    let text = "héllo from python, 你好";
    let reply = interop(
        &python,
        redis,
        &["send", "--agent-type", "echo", "--text", text],
    )
    .await?;
    assert_eq!(reply["target_worker_id"], daemon.worker_id.as_str());
    assert_eq!(reply["chunks"], text);
    assert_eq!(reply["terminal"], "COMPLETED");
    let events = reply["events"].as_array().unwrap();
    assert_eq!(events.len(), 4, "{events:#?}");
    for event in events {
        assert_eq!(event["session_id"], reply["session_id"]);
        assert_eq!(event["message_id"], reply["message_id"]);
        assert_eq!(event["source_agent_id"], "echo");
        assert!(event["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    }

    let cancelled = interop(
        &python,
        redis,
        &["cancel", "--agent-type", "slow", "--text", "20000"],
    )
    .await?;
    assert_eq!(
        cancelled["cancel"]["status"], "CANCEL_REQUESTED",
        "{cancelled:#}"
    );
    assert_eq!(cancelled["cancel"]["worker_id"], daemon.worker_id.as_str());
    assert_eq!(cancelled["terminal"], "CANCELLED");

    // A reference Python worker calls our agent and is resumed with its reply.
    let called = interop(
        &python,
        redis,
        &[
            "call-agent",
            "--agent-type",
            "echo",
            "--text",
            "from python",
        ],
    )
    .await?;
    assert_eq!(called["reply"]["status"], "COMPLETED", "{called:#}");
    assert_eq!(called["reply"]["reply_data"]["echo"], "from python");
    let caller = called["caller"].as_str().unwrap();
    let states: Vec<(&str, &str)> = called["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["contentType"] == "3003")
        .map(|e| (e["source_agent_id"].as_str().unwrap(), delta_content(e)))
        .collect();
    assert!(
        states.contains(&("echo", &*format!("QUEUED: {caller}"))),
        "{states:?}"
    );
    assert!(states.contains(&(caller, "RESUMED")), "{states:?}");

    daemon.stop().await?;
    Ok(())
}

/// A mixed cluster: our planner calls a translator served by a reference
/// Python worker and gets its reply; the reference Python client answers the
/// planner's ask-user question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_agent_calls_a_python_agent_and_a_python_client_answers_it() -> anyhow::Result<()> {
    let python = python_venv().await?;
    // No translator plugin here: the Python worker is the only translator.
    let mut bed = TestBed::start(&["planner", "researcher", "tools"], "planner", |_| {}).await?;
    let py_worker = format!("py-translator-{}", suffix());
    let mut translator = tokio::process::Command::new(&python)
        .arg(repo_root().join("tests/python/interop.py"))
        .args(["--redis-url", &bed.redis.url(), "serve-translator"])
        .args(["--agent-type", "translator", "--text", &py_worker])
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_for(
        "the Python translator registered",
        Duration::from_secs(60),
        || {
            let mut conn = bed.conn.clone();
            let py_worker = py_worker.clone();
            async move {
                let member: bool = redis::cmd("SISMEMBER")
                    .arg("byai_gateway:registry:capability:workers:translator")
                    .arg(&py_worker)
                    .query_async(&mut conn)
                    .await?;
                Ok(member.then_some(()))
            }
        },
    )
    .await?;

    // A tenant's task: the Python worker must copy `tenant_id` into its
    // reply, and the user's answer must carry it, or the daemon refuses them.
    let client = byclaw_client::Client::connect(&bed.redis.url())
        .await?
        .for_tenant("acme");
    let session = format!("sess-{}", suffix());
    let payload = serde_json::json!({ "ask_timeout_ms": 30000 });
    let sent = client
        .send("planner", &session, "hello from rust", payload)
        .await?;
    let conn = bed.conn.clone();
    wait_for("the ask-user form", Duration::from_secs(30), || {
        let mut conn = conn.clone();
        let (session, message_id) = (session.clone(), sent.message_id.clone());
        async move {
            Ok(all_events(&mut conn, &session)
                .await?
                .into_iter()
                .any(|e| {
                    e["message_id"] == message_id.as_str() && e["data"]["contentType"] == "3013"
                })
                .then_some(()))
        }
    })
    .await?;
    // An answer from a Python client of no tenant is refused; the task
    // waits on and takes the tenant's own answer.
    let answer = |tenant: &'static str| {
        let (python, redis) = (python.clone(), &bed.redis);
        let (session, parent) = (session.clone(), sent.message_id.clone());
        async move {
            interop(
                &python,
                redis,
                &[
                    "resume",
                    "--agent-type",
                    "planner",
                    "--text",
                    if tenant.is_empty() {
                        "not yours"
                    } else {
                        "applications"
                    },
                    "--session",
                    &session,
                    "--parent",
                    &parent,
                    "--tenant",
                    tenant,
                ],
            )
            .await
        }
    };
    let refused = answer("").await?;
    assert_eq!(refused["success"], true, "{refused:#}");
    wait_for(
        "the tenantless answer refused",
        Duration::from_secs(30),
        || {
            let refused = bed.daemon.stats.metrics.foreign_replies_total();
            async move { Ok((refused == 1).then_some(())) }
        },
    )
    .await?;
    let answered = answer("acme").await?;
    assert_eq!(answered["success"], true, "{answered:#}");

    let events = task_events(
        &mut bed.conn,
        &session,
        &sent.message_id,
        Duration::from_secs(30),
    )
    .await?;
    let result = task_result(&events).expect("the planner completed");
    assert_eq!(result["title"], "HELLO FROM RUST", "{result:#}");
    assert_eq!(result["focus"], "applications");
    assert_eq!(bed.daemon.stats.metrics.foreign_replies_total(), 1);
    // The Python worker ran the child and answered like any reference worker.
    let child = events
        .iter()
        .find(|e| delta_content(e) == "WAITING_AGENT")
        .map(|e| e["metadata"]["message_id"].as_str().unwrap().to_owned())
        .unwrap();
    let record = execution(&mut bed.conn, &session, &child).await?.unwrap();
    assert_eq!(record["worker_id"], py_worker.as_str());
    assert_eq!(record["status"], "COMPLETED");

    translator.kill().await?;
    bed.daemon.stop().await?;
    Ok(())
}
