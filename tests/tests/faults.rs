//! Misbehaving plugins and bad input: each ends in a clear `FAILED: ...` or a
//! dead letter while other tasks keep completing; nothing is lost.

use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const GROUP: &str = "agent_engines";
const WAIT: Duration = Duration::from_secs(30);

fn final_state(events: &[Value]) -> String {
    delta_content(events.last().unwrap()).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_loop_and_memory_bomb_fail_while_echo_keeps_completing() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo", "faults"], "fault-loop", |c| {
        c.plugins.deadline_s = 5;
        c.plugins.memory_limit_mb = 32;
    })
    .await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());

    let trap = send_ask(&mut conn, "fault-trap", "x").await?;
    // More CPU-bound loops than the runtime has worker threads.
    let endless = send_ask(&mut conn, "fault-loop", "x").await?;
    for _ in 0..2 {
        send_ask(&mut conn, "fault-loop", "x").await?;
    }
    let bomb = send_ask(&mut conn, "fault-memory", "x").await?;
    let refused = send_ask(&mut conn, "fault-error", "x").await?;
    // While those misbehave, ordinary tasks complete.
    let mut echoes = Vec::new();
    for i in 0..20 {
        echoes.push(send_ask(&mut conn, "echo", &format!("still alive {i}")).await?);
    }
    let mut last_echo_ms = 0;
    for echo in &echoes {
        let events = events_until_terminal(&mut conn, &echo.session_id, WAIT).await?;
        assert_eq!(final_state(&events), "COMPLETED");
        last_echo_ms = last_echo_ms.max(events.last().unwrap()["timestamp"].as_u64().unwrap());
    }

    let events = events_until_terminal(&mut conn, &trap.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(state.starts_with("FAILED: plugin trapped"), "{state}");
    assert!(
        events.iter().any(|e| delta_content(e) == "before trap"),
        "events emitted before the trap are kept"
    );

    let events = events_until_terminal(&mut conn, &endless.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "FAILED: deadline of 5 s exceeded");
    // Every echo completed while the endless loop was still spinning.
    let loop_failed_ms = events.last().unwrap()["timestamp"].as_u64().unwrap();
    assert!(
        last_echo_ms < loop_failed_ms,
        "echo tasks were held up by the endless loop"
    );

    let events = events_until_terminal(&mut conn, &bomb.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(
        state.starts_with("FAILED: memory limit of 32 MiB exceeded"),
        "{state}"
    );

    let events = events_until_terminal(&mut conn, &refused.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "FAILED: deliberate failure");

    for (agent, sent) in [
        ("fault-trap", &trap),
        ("fault-loop", &endless),
        ("fault-memory", &bomb),
    ] {
        let exec = execution(&mut conn, &sent.session_id, &sent.message_id)
            .await?
            .unwrap();
        assert_eq!(exec["status"], "FAILED", "{agent}");
        let stream = format!("byai_gateway:ctrl:capability:{agent}");
        wait_all_acked(&conn, &stream, WAIT).await?;
    }
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_reach_outside_its_workspace() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["faults"]);
    let root = tempfile::tempdir()?;
    let workspace = root.path().join("ws");
    std::fs::create_dir_all(&workspace)?;
    let config = test_config(&redis, plugins.path(), &workspace);
    let mut daemon = Daemon::start(config, &redis, "fault-escape").await?;
    let mut conn = redis.connect().await?;
    let before_tmp = std::path::Path::new("/tmp/escape.txt").exists();

    let sent = send_ask(&mut conn, "fault-escape", "x").await?;
    let events = events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    let last = events.last().unwrap();
    assert_eq!(delta_content(last), "COMPLETED", "{events:#?}");
    let attempts = &last["metadata"]["result"];
    let attempts = attempts.as_object().expect("a map of attempts");
    let mut outside = 0;
    for (name, outcome) in attempts {
        let outcome = outcome.as_str().unwrap();
        if name.contains("ok") || name.contains("legit") || name.contains("workspace") {
            assert_eq!(outcome, "ok", "{name} inside the workspace must work");
        } else {
            outside += 1;
            assert!(outcome.starts_with("error"), "{name} must fail: {outcome}");
        }
    }
    assert!(outside >= 4, "{attempts:?}");
    // Nothing appeared outside the workspace.
    assert_eq!(std::path::Path::new("/tmp/escape.txt").exists(), before_tmp);
    let stray: Vec<_> = walk(root.path())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "escape.txt"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    // What the guest wrote into the public workspace stays with the session.
    let note = workspace
        .join(&sent.session_id)
        .join("public/session/note.txt");
    assert!(note.is_file(), "{}", note.display());

    daemon.stop().await?;
    Ok(())
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_go_to_the_dead_letter_stream() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let (daemon, mut conn) = (&mut bed.daemon, bed.conn.clone());
    let dead_letters = bed.config.worker.dead_letter_stream.clone();
    let stream = "byai_gateway:ctrl:capability:echo";

    // Not JSON; no `data` field; JSON but not a command (session readable).
    xadd_data(&mut conn, stream, "{not json").await?;
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("payload")
        .arg("x")
        .query_async(&mut conn)
        .await?;
    let session = format!("sess-{}", suffix());
    let bad = json!({"action_type": "ASK_AGENT",
        "header": {"message_id": "msg-00000001", "session_id": session, "trace_id": "t"},
        "body": {"content": ""}});
    xadd_data(&mut conn, stream, &bad.to_string()).await?;
    // A good one after them still runs.
    let good = send_ask(&mut conn, "echo", "fine").await?;
    events_until_terminal(&mut conn, &good.session_id, WAIT).await?;

    let entries = wait_for("three dead letters", WAIT, || {
        let mut conn = conn.clone();
        let dead_letters = dead_letters.clone();
        async move {
            let entries = xrange(&mut conn, &dead_letters).await?;
            Ok((entries.len() >= 3).then_some(entries))
        }
    })
    .await?;
    let reasons: Vec<String> = entries
        .iter()
        .map(|e| e.get::<String>("reason").unwrap())
        .collect();
    // Entries are dead-lettered as their tasks are handled, in any order.
    let with_reason = |part: &str| {
        let at = reasons.iter().position(|r| r.contains(part));
        entries[at.unwrap_or_else(|| panic!("no dead letter says {part:?}: {reasons:?}"))].clone()
    };
    let not_json = with_reason("not a valid command JSON");
    let no_data = with_reason("no `data` field");
    let no_content = with_reason("content");
    assert_eq!(not_json.get::<String>("data").unwrap(), "{not json");
    assert_eq!(no_data.get::<String>("payload").unwrap(), "x");
    assert_eq!(no_content.get::<String>("source_stream").unwrap(), stream);
    // The session of the third gets told.
    let events = events_until_terminal(&mut conn, &session, WAIT).await?;
    assert!(final_state(&events).starts_with("FAILED: ASK_AGENT body.content"));
    wait_all_acked(&conn, stream, WAIT).await?;
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_by_a_dead_consumer_are_claimed_or_dead_lettered() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 1000;
    config.worker.max_deliveries = 3;
    let dead_letters = config.worker.dead_letter_stream.clone();
    let mut conn = redis.connect().await?;
    let stream = "byai_gateway:ctrl:capability:echo";
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await?;
    // A consumer that reads two entries and dies without acking them; one
    // of them has already been delivered too often.
    let orphan = send_ask(&mut conn, "echo", "orphaned").await?;
    let poison = send_ask(&mut conn, "echo", "poison").await?;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("dead-consumer")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut conn)
        .await?;
    for _ in 0..3 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg("dead-consumer")
            .arg(0)
            .arg(&poison.entry_id)
            .query_async(&mut conn)
            .await?;
    }

    // The dead consumer had recorded the poison entry as RUNNING.
    let registry = format!("byai_gateway:session:{}:registry", poison.session_id);
    let record = json!({"execution_id": "exec-dead0001", "message_id": poison.message_id,
        "session_id": poison.session_id, "worker_id": "dead-consumer", "status": "RUNNING"});
    let _: () = redis::cmd("HSET")
        .arg(&registry)
        .arg("exec:exec-dead0001")
        .arg(record.to_string())
        .arg(format!("msg_map:{}", poison.message_id))
        .arg("exec-dead0001")
        .query_async(&mut conn)
        .await?;

    let mut daemon = Daemon::start(config, &redis, "echo").await?;
    let events = events_until_terminal(&mut conn, &orphan.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");
    let events = events_until_terminal(&mut conn, &poison.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(state.starts_with("FAILED: delivered 5 times"), "{state}");
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&dead_letters)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    assert_eq!(reply.ids.len(), 1);
    assert_eq!(
        reply.ids[0].get::<String>("source_id").unwrap(),
        poison.entry_id
    );
    assert_eq!(reply.ids[0].get::<String>("delivery_count").unwrap(), "5");
    wait_all_acked(&conn, stream, WAIT).await?;

    // Replayed (as `gatewayd dead-letters replay` does), the poison entry
    // runs again, here, under its own message id, and leaves the stream.
    let client = byclaw_client::Client::connect(&redis.url()).await?;
    let letter = client
        .dead_letter(&dead_letters, &reply.ids[0].id)
        .await?
        .expect("the dead letter");
    assert_eq!(letter.source_stream, stream);
    client.replay_dead_letter(&dead_letters, &letter).await?;
    wait_for("the replayed task completes", WAIT, || {
        let mut conn = conn.clone();
        let poison = poison.clone();
        async move {
            let events = all_events(&mut conn, &poison.session_id).await?;
            let mine: Vec<Value> = events
                .into_iter()
                .filter(|e| e["message_id"] == poison.message_id.as_str())
                .collect();
            Ok((states(&mine).last().map(String::as_str) == Some("COMPLETED")).then_some(mine))
        }
    })
    .await?;
    assert!(
        xrange(&mut conn, &dead_letters).await?.is_empty(),
        "replayed entries leave the dead-letter stream"
    );
    wait_all_acked(&conn, stream, WAIT).await?;
    daemon.stop().await?;
    Ok(())
}

/// Echo's capability stream, which the trimming tests watch.
const ECHO_STREAM: &str = "byai_gateway:ctrl:capability:echo";

/// A daemon serving echo that acks without deleting, as the reference's
/// workers leave their entries, and trims every 100 ms (capped at
/// `control_maxlen`), beside a second consumer group `group` on echo's
/// stream — another application's workers.
struct TrimBed {
    daemon: Daemon,
    conn: redis::aio::MultiplexedConnection,
    _redis: RedisServer,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn trim_bed(group: &str, control_maxlen: u64) -> anyhow::Result<TrimBed> {
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.streams.delete_acked = false;
    config.streams.trim_interval_ms = 100;
    config.streams.control_maxlen = control_maxlen;
    let mut conn = redis.connect().await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(ECHO_STREAM)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await?;
    let daemon = Daemon::start(config, &redis, "echo").await?;
    Ok(TrimBed {
        daemon,
        conn,
        _redis: redis,
        _dirs: (plugins, workspace),
    })
}

impl TrimBed {
    /// Sends `n` echo tasks one at a time, each run before the next is
    /// added; their entry ids.
    async fn run_echo_tasks(&mut self, n: usize) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        for i in 0..n {
            let task = send_ask(&mut self.conn, "echo", &format!("task {i}")).await?;
            let events = events_until_terminal(&mut self.conn, &task.session_id, WAIT).await?;
            assert_eq!(final_state(&events), "COMPLETED");
            ids.push(task.entry_id);
        }
        Ok(ids)
    }

    /// Waits until echo's stream holds exactly `want`. The stream never
    /// grows back, so trimming past it ends the test with a timeout.
    async fn wait_for_ids(&self, want: &[String]) -> anyhow::Result<()> {
        wait_for(&format!("the stream to hold {want:?}"), WAIT, || {
            let mut conn = self.conn.clone();
            async move {
                let ids: Vec<String> = xrange(&mut conn, ECHO_STREAM)
                    .await?
                    .into_iter()
                    .map(|e| e.id)
                    .collect();
                Ok((ids == want).then_some(()))
            }
        })
        .await
    }

    fn assert_trimmed(&self, reason: &str, count: u64) {
        let metrics = self.daemon.stats.metrics.render();
        assert!(
            metrics.contains(&format!(
                "gatewayd_control_entries_trimmed_total{{stream=\"{ECHO_STREAM}\",reason=\"{reason}\"}} {count}"
            )),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_streams_keep_only_what_some_group_still_needs() -> anyhow::Result<()> {
    let others = "other-workers";
    let mut bed = trim_bed(others, 0).await?;
    let entry_ids = bed.run_echo_tasks(5).await?;
    wait_all_acked(&bed.conn, ECHO_STREAM, WAIT).await?;
    // The others read three and ack the first and third: the second is
    // pending with them, the last two unread, so only the first may go.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(others)
        .arg("other-1")
        .arg("COUNT")
        .arg(3)
        .arg("STREAMS")
        .arg(ECHO_STREAM)
        .arg(">")
        .query_async(&mut bed.conn)
        .await?;
    let _: u64 = redis::cmd("XACK")
        .arg(ECHO_STREAM)
        .arg(others)
        .arg(&entry_ids[0])
        .arg(&entry_ids[2])
        .query_async(&mut bed.conn)
        .await?;
    bed.wait_for_ids(&entry_ids[1..]).await?;
    // The second acked too: what they read is consumed, the unread stay.
    let _: u64 = redis::cmd("XACK")
        .arg(ECHO_STREAM)
        .arg(others)
        .arg(&entry_ids[1])
        .query_async(&mut bed.conn)
        .await?;
    bed.wait_for_ids(&entry_ids[3..]).await?;
    bed.assert_trimmed("consumed", 3);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_maxlen_caps_a_stream_even_when_a_group_has_not_read_it() -> anyhow::Result<()> {
    // A group that never reads: without the cap every entry would stay.
    // Tasks go one at a time, each read before the next is added (the cap
    // would trim entries nobody read yet — that is what it is for).
    let mut bed = trim_bed("never-reads", 2).await?;
    let entry_ids = bed.run_echo_tasks(5).await?;
    bed.wait_for_ids(&entry_ids[3..]).await?;
    bed.assert_trimmed("maxlen", 3);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plugin_files_are_reported_and_skipped() -> anyhow::Result<()> {
    let plugins = plugin_dir(&["echo"]);
    std::fs::write(plugins.path().join("garbage.wasm"), b"not wasm at all")?;
    // A second copy of echo claims the same capability.
    std::fs::copy(
        plugins.path().join("echo.wasm"),
        plugins.path().join("zz-echo-copy.wasm"),
    )?;
    let sandbox = byclaw_sandbox::Sandbox::new(
        byclaw_sandbox::Limits {
            memory_bytes: 64 << 20,
            deadline: Duration::from_secs(5),
            max_event_bytes: 1 << 20,
            max_tool_bytes: 1 << 20,
            guest_log: Default::default(),
            memory_budget_bytes: 0,
            guest_threads: 0,
        },
        4,
    )?;
    let loaded = byclaw_sandbox::loader::load_dir(&sandbox, plugins.path()).await?;
    assert_eq!(loaded.table.capabilities(), vec!["echo".to_owned()]);
    let errors: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("garbage.wasm") && errors[0].contains("not a valid component"),
        "{errors:#?}"
    );
    assert!(
        errors[1].contains("zz-echo-copy.wasm") && errors[1].contains("already served"),
        "{errors:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_plugin_loads_only_from_the_file_it_is_pinned_to() -> anyhow::Result<()> {
    let plugins = plugin_dir(&["echo", "faults"]);
    let hex = |digest: byclaw_sandbox::FileDigest| {
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let echo_sha256 = hex(byclaw_sandbox::file_digest(&std::fs::read(
        plugins.path().join("echo.wasm"),
    )?));
    let faults_sha256 = hex(byclaw_sandbox::file_digest(&std::fs::read(
        plugins.path().join("faults.wasm"),
    )?));
    let mut config = byclaw_sandbox::PluginsConfig::default();
    let pin = |sha256: &str| byclaw_sandbox::PluginPolicy {
        sha256: Some(sha256.to_owned()),
        ..Default::default()
    };
    config
        .policy
        .insert("echo".into(), pin(&echo_sha256.to_uppercase()));
    config.policy.insert("faults".into(), pin(&"0".repeat(64)));
    let sandbox = byclaw_sandbox::Sandbox::with_options(
        config.limits(),
        4,
        None,
        byclaw_sandbox::Policies::from_config(&config),
        Default::default(),
    )?;
    let loaded = byclaw_sandbox::loader::load_dir(&sandbox, plugins.path()).await?;
    assert_eq!(loaded.table.capabilities(), vec!["echo".to_owned()]);
    let errors: Vec<String> = loaded.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("faults.wasm")
            && errors[0].contains(&format!("pinned to SHA-256 {}", "0".repeat(64)))
            && errors[0].contains(&format!("this file's is {faults_sha256}")),
        "{errors:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lands_after_the_terminal_event_of_a_flooding_plugin() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "fault-flood", |c| {
        c.plugins.deadline_s = 1;
    })
    .await?;
    let mut conn = bed.conn.clone();
    let mut sent = Vec::new();
    for _ in 0..4 {
        sent.push(send_ask(&mut conn, "fault-flood", "x").await?);
    }
    for task in &sent {
        let events = task_events(&mut conn, &task.session_id, &task.message_id, WAIT).await?;
        let state = final_state(&events);
        assert!(state.starts_with("FAILED"), "{state}");
    }
    // Stopped daemon: everything it queued is written; still nothing after
    // each task's terminal event.
    bed.daemon.stop().await?;
    for task in &sent {
        let events: Vec<Value> = all_events(&mut conn, &task.session_id)
            .await?
            .into_iter()
            .filter(|e| e["message_id"] == task.message_id.as_str())
            .collect();
        let terminal = events
            .iter()
            .position(is_terminal_state)
            .expect("a terminal event");
        assert_eq!(
            terminal,
            events.len() - 1,
            "{} events after the terminal one",
            events.len() - 1 - terminal
        );
        assert!(terminal > 0, "the flood reached the stream before the end");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_plugin_is_paced_to_its_event_rate() -> anyhow::Result<()> {
    // 200 events a second after a burst of 200, for a task stopped by its
    // 2 s deadline: about 600 chunks, where unpaced it writes tens of
    // thousands. Echo, with the default rate, is not slowed.
    let mut bed = TestBed::start(&["faults", "echo"], "fault-flood", |c| {
        c.plugins.deadline_s = 2;
        c.plugins.policy.insert(
            "faults".into(),
            gatewayd::config::PluginPolicy {
                max_events_per_s: Some(200),
                ..Default::default()
            },
        );
    })
    .await?;
    let mut conn = bed.conn.clone();
    let flood = send_ask(&mut conn, "fault-flood", "x").await?;
    let events = task_events(&mut conn, &flood.session_id, &flood.message_id, WAIT).await?;
    let state = final_state(&events);
    assert!(state.starts_with("FAILED: deadline of 2 s"), "{state}");
    let chunks = events
        .iter()
        .filter(|e| e["data"]["contentType"] == "1002")
        .count();
    // Burst + rate × deadline, with room for the deadline's own slack.
    assert!(
        (400..=700).contains(&chunks),
        "{chunks} chunks in 2 s at 200/s after a burst of 200"
    );
    let echo = send_ask(&mut conn, "echo", "still here").await?;
    let events = events_until_terminal(&mut conn, &echo.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_cpu_budget_fails_and_waiting_costs_none() -> anyhow::Result<()> {
    // An endless loop under a 300 ms CPU budget and a 60 s deadline ends on
    // its budget, long before the deadline (the wait below is 30 s); a task
    // that sleeps for a second in 50 ms steps uses almost no CPU and
    // completes; echo, without a budget of its own, is not touched.
    let mut bed = TestBed::start(&["faults", "echo"], "fault-loop", |c| {
        c.plugins.deadline_s = 60;
        c.plugins.policy.insert(
            "faults".into(),
            gatewayd::config::PluginPolicy {
                cpu_ms: Some(300),
                ..Default::default()
            },
        );
    })
    .await?;
    let mut conn = bed.conn.clone();
    let endless = send_ask(&mut conn, "fault-loop", "x").await?;
    let sleeper = send_ask(&mut conn, "slow", "1000").await?;
    let echo = send_ask(&mut conn, "echo", "still here").await?;

    let events = events_until_terminal(&mut conn, &endless.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(
        state.starts_with("FAILED: CPU budget of 300 ms exceeded (plugins.cpu_ms; used "),
        "{state}"
    );
    let exec = execution(&mut conn, &endless.session_id, &endless.message_id)
        .await?
        .expect("the loop's execution is recorded");
    assert_eq!(exec["status"], "FAILED");

    let events = events_until_terminal(&mut conn, &sleeper.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");
    assert!(
        events.iter().filter(|e| delta_content(e) == "tick").count() >= 20,
        "the sleeper ran its whole second"
    );
    let events = events_until_terminal(&mut conn, &echo.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");

    // The tools a task calls spend its budget: a tool computing forever is
    // stopped on it, and so is the task that called it.
    let spinner = send_ask(&mut conn, "use-tool", "spin {}").await?;
    let events = task_events(&mut conn, &spinner.session_id, &spinner.message_id, WAIT).await?;
    let state = final_state(&events);
    assert!(
        state.starts_with("FAILED: CPU budget of 300 ms exceeded"),
        "{state}"
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_past_max_result_bytes_fails_the_task_with_the_sizes() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "fault-big-result", |c| {
        c.plugins.max_result_bytes = 64 * 1024;
    })
    .await?;
    let mut conn = bed.conn.clone();
    let small = send_ask(&mut conn, "fault-big-result", "1000").await?;
    let big = send_ask(&mut conn, "fault-big-result", "200000").await?;
    let events = events_until_terminal(&mut conn, &small.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");
    let events = events_until_terminal(&mut conn, &big.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(
        state.starts_with("FAILED: result of 2000")
            && state.ends_with("bytes exceeds the limit of 65536 bytes (plugins.max_result_bytes)"),
        "{state}"
    );
    let stream_bytes: u64 = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(format!(
            "byai_gateway:session:{}:data_stream",
            big.session_id
        ))
        .query_async(&mut conn)
        .await?;
    assert!(
        stream_bytes < 64 * 1024,
        "the big result was not written: {stream_bytes} bytes"
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_calling_itself_is_refused_past_max_call_depth() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "recurse", |c| {
        c.worker.max_call_depth = 3;
        c.streams.delete_acked = false;
    })
    .await?;
    let mut conn = bed.conn.clone();
    let root = send_ask(&mut conn, "recurse", "0").await?;
    let events = events_until_terminal(&mut conn, &root.session_id, WAIT).await?;
    let state = final_state(&events);
    assert!(state.starts_with("FAILED"), "{state}");
    let stream = "byai_gateway:ctrl:capability:recurse";
    wait_all_acked(&conn, stream, WAIT).await?;
    // The root and three calls below it; the task at depth 3 was refused.
    let asks: Vec<Value> = xrange(&mut conn, stream)
        .await?
        .into_iter()
        .filter_map(|entry| entry.get::<String>("data"))
        .filter_map(|data| serde_json::from_str::<Value>(&data).ok())
        .filter(|data| data["action_type"] == "ASK_AGENT")
        .collect();
    let depths: Vec<u64> = asks
        .iter()
        .map(|a| a["header"]["metadata"]["call_depth"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(depths, [0, 1, 2, 3], "{asks:#?}");
    let deepest = asks.last().unwrap()["header"]["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = task_events(&mut conn, &root.session_id, &deepest, WAIT).await?;
    let reason = events
        .iter()
        .rev()
        .find(|e| is_terminal_state(e))
        .map(|e| delta_content(e).to_owned())
        .unwrap();
    assert!(reason.contains("worker.max_call_depth (3)"), "{reason}");
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_plugin_is_held_to_its_log_budget() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "fault-chatter", |c| {
        c.plugins.guest_log_lines_per_s = 20;
    })
    .await?;
    let mut conn = bed.conn.clone();
    let started = std::time::Instant::now();
    let task = send_ask(&mut conn, "fault-chatter", "20000").await?;
    let events = events_until_terminal(&mut conn, &task.session_id, WAIT).await?;
    assert_eq!(
        final_state(&events),
        "COMPLETED",
        "output over budget never fails a task"
    );
    // Counted once, when the task's store is dropped.
    let dropped = wait_for("the dropped lines counted", WAIT, || {
        let dropped = bed.daemon.stats.metrics.guest_log_dropped_total();
        async move { Ok((dropped > 0).then_some(dropped)) }
    })
    .await?;
    let elapsed = started.elapsed().as_secs_f64();
    // 20,000 lines to stdout and 20,000 through runtime.log: at most one
    // second's burst and 20 a second since got through.
    let admitted_at_most = 20.0 + 20.0 * elapsed;
    assert!(
        dropped as f64 >= 40_000.0 - admitted_at_most,
        "{dropped} dropped in {elapsed:.1} s"
    );
    assert!(dropped <= 40_000);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_arguments_and_results_past_the_limit_are_refused_before_parsing() -> anyhow::Result<()>
{
    let mut bed = TestBed::start(&["faults"], "fault-big-tool", |c| {
        c.plugins.max_result_bytes = 64 * 1024;
    })
    .await?;
    let mut conn = bed.conn.clone();
    let small = send_ask(&mut conn, "fault-big-tool", "1000").await?;
    let big = send_ask(&mut conn, "fault-big-tool", "200000").await?;

    let events = events_until_terminal(&mut conn, &small.session_id, WAIT).await?;
    assert_eq!(final_state(&events), "COMPLETED");
    let result = task_result(&events).expect("a result");
    assert_eq!(result["sink"]["ok"]["took"], 1000, "{result}");
    assert!(result["bloat"]["ok"]["padding"].is_string(), "{result}");

    let events = events_until_terminal(&mut conn, &big.session_id, WAIT).await?;
    assert_eq!(
        final_state(&events),
        "COMPLETED",
        "the guest got errors, not a trap"
    );
    let result = task_result(&events).expect("a result");
    let sink = result["sink"]["error"].as_str().unwrap_or_default();
    assert!(
        sink.contains("arguments of tool \"sink\" are 2000")
            && sink.contains("over the limit of 65536 bytes (plugins.max_result_bytes)"),
        "{result}"
    );
    let bloat = result["bloat"]["error"].as_str().unwrap_or_default();
    assert!(
        bloat.contains("tool \"bloat\" returned 2000")
            && bloat.contains("over the limit of 65536 bytes"),
        "{result}"
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_holds_no_more_than_its_byte_bound_while_redis_is_slow() -> anyhow::Result<()> {
    use gatewayd::events::{Write, Writer, WriterConfig};
    use std::sync::Arc;
    const BOUND: usize = 1 << 20;
    const EVENT: usize = 256 << 10;
    let redis = RedisServer::start().await?;
    let connection =
        gatewayd::broker::connect(&redis.url().into(), Duration::from_secs(60)).await?;
    let (writer, _lanes) = Writer::start(
        connection,
        WriterConfig {
            lanes: 2,
            queue: 1000,
            max_batch: 512,
            queue_bytes: BOUND,
            session_maxlen: 0,
            session_ttl_s: 60,
            metrics: Arc::new(gatewayd::metrics::Metrics::new(Default::default())),
        },
        tokio_util::sync::CancellationToken::new(),
    );
    // Redis takes no writes for now: what is sent piles up in the writer.
    let mut admin = redis.connect().await?;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await?;
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    for i in 0..8 {
        let (writer, queued) = (writer.clone(), queued.clone());
        senders.push(tokio::spawn(async move {
            let stream: Arc<str> = Arc::from(format!("bound-test:{i}"));
            let write = Write::Event {
                stream,
                data: "x".repeat(EVENT),
                refresh_ttl: true,
            };
            writer.send(&format!("session-{i}"), vec![write]).await?;
            queued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            anyhow::Ok(())
        }));
    }
    wait_for("the writer to fill up", WAIT, || {
        let held = writer.queued_bytes();
        async move { Ok((held > BOUND - EVENT).then_some(())) }
    })
    .await?;
    assert!(writer.queued_bytes() <= BOUND, "{}", writer.queued_bytes());
    let taken = queued.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        taken <= BOUND / EVENT,
        "{taken} sends of {EVENT} bytes queued under {BOUND}"
    );
    // Redis takes writes again: every send goes through, nothing is lost.
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await?;
    for sender in senders {
        tokio::time::timeout(WAIT, sender).await???;
    }
    wait_for("every event written", WAIT, || {
        let mut conn = admin.clone();
        async move {
            let mut written = 0;
            for i in 0..8 {
                let len: usize = redis::cmd("XLEN")
                    .arg(format!("bound-test:{i}"))
                    .query_async(&mut conn)
                    .await?;
                written += len;
            }
            Ok((written == 8).then_some(()))
        }
    })
    .await?;
    // Each batch gives its bytes back once its lane has read Redis' reply,
    // a moment after the events became visible.
    wait_for("every byte given back", WAIT, || {
        let held = writer.queued_bytes();
        async move { Ok((held == 0).then_some(())) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_memory_budget_new_tasks_wait_and_none_fails() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "hold-memory", |c| {
        c.plugins.memory_limit_mb = 100;
        c.worker.memory_budget_mb = 100;
        c.plugins.deadline_s = 30;
    })
    .await?;
    let mut conn = bed.conn.clone();
    /// When the task's "holding" chunk was emitted (ms), once it is there.
    async fn holding_at(
        conn: &redis::aio::MultiplexedConnection,
        session: &str,
    ) -> anyhow::Result<u64> {
        wait_for("the holding chunk", WAIT, || {
            let mut conn = conn.clone();
            async move {
                Ok(all_events(&mut conn, session)
                    .await?
                    .iter()
                    .find(|e| delta_content(e) == "holding")
                    .and_then(|e| e["timestamp"].as_u64()))
            }
        })
        .await
    }
    // Two tasks hold 60 MiB each for 2 s: together past the budget.
    let a = send_ask(&mut conn, "hold-memory", "60 2000").await?;
    let b = send_ask(&mut conn, "hold-memory", "60 2000").await?;
    let a_at = holding_at(&bed.conn, &a.session_id).await?;
    let b_at = holding_at(&bed.conn, &b.session_id).await?;
    // A third waits until one of them gives its memory back.
    let c = send_ask(&mut conn, "hold-memory", "1 10").await?;
    let c_at = holding_at(&bed.conn, &c.session_id).await?;
    assert!(
        c_at >= a_at.min(b_at) + 2000,
        "started at {c_at}, while both held their memory ({a_at}, {b_at} + 2000 ms)"
    );
    for task in [&a, &b, &c] {
        let events = events_until_terminal(&mut conn, &task.session_id, WAIT).await?;
        assert_eq!(final_state(&events), "COMPLETED", "nothing fails");
    }
    assert!(bed.daemon.stats.metrics.memory_budget_waits_total() >= 1);
    bed.daemon.stop().await?;
    Ok(())
}
