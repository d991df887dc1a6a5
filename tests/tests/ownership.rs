//! One owner per task, one outcome per task, one answer per wait — at the
//! edges: Redis refusing writes while tasks finish, another daemon taking
//! an entry over, replies and answers that arrive twice, two prompts in one
//! task, an answer from another session or tenant, a cancel racing the
//! task's start, the worker lock lost, a wait's timeout Redis refuses to
//! journal.

use byclaw_client::{CancelMode, Client};
use integration_tests::*;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Terminal state events of `message_id` in its session.
async fn terminals(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    message_id: &str,
) -> anyhow::Result<Vec<String>> {
    Ok(all_events(conn, session_id)
        .await?
        .into_iter()
        .filter(|e| e["message_id"] == message_id && is_terminal_state(e))
        .map(|e| delta_content(&e).to_owned())
        .collect())
}

/// The `data` of every entry of a control stream whose action is `action`.
async fn control_entries(
    conn: &mut MultiplexedConnection,
    stream: &str,
    action: &str,
) -> anyhow::Result<Vec<Value>> {
    let mut found = Vec::new();
    for entry in xrange(conn, stream).await? {
        let data: String = entry.get("data").unwrap_or_default();
        let data: Value = serde_json::from_str(&data)?;
        if data["action_type"] == action {
            found.push(data);
        }
    }
    Ok(found)
}

/// The `n`th ask-user form event (1-based) of `message_id`, once it is there.
async fn wait_record_status(
    conn: &MultiplexedConnection,
    session_id: &str,
    message_id: &str,
    status: &str,
) -> anyhow::Result<Value> {
    wait_for(&format!("{message_id} {status}"), LONG, || {
        let mut conn = conn.clone();
        async move {
            let record = execution(&mut conn, session_id, message_id).await?;
            Ok(record.filter(|r| r["status"] == status))
        }
    })
    .await
}

async fn info_field(conn: &mut MultiplexedConnection, section: &str, field: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|rest| {
            rest.trim()
                .trim_start_matches("count=")
                .split(',')
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Puts Redis at its memory limit under `noeviction`: XADD, HSET, HSETNX
/// and the like are refused (OOM), XACK and XDEL are not.
async fn fill_redis(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg("1")
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// Lifts the limit [`fill_redis`] set.
async fn redis_takes_writes_again(conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// How many `command` calls Redis refused before running them (`INFO
/// commandstats`, `rejected_calls`: out of memory, in a transaction too).
async fn rejected_calls(conn: &mut MultiplexedConnection, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|stat| stat.strip_prefix("rejected_calls="))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_refused_by_a_full_redis_leave_entries_pending_until_they_apply()
-> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "slow", |config| {
        config.worker.max_concurrency = 16;
    })
    .await?;
    let stream = "byai_gateway:ctrl:capability:slow";
    let mut sent = Vec::new();
    for _ in 0..8 {
        sent.push(send_ask(&mut bed.conn, "slow", "1200").await?);
    }
    for task in &sent {
        wait_record_status(&bed.conn, &task.session_id, &task.message_id, "RUNNING").await?;
    }
    // Redis full, noeviction: XADD and HSET are refused, XACK and XDEL are
    // not. Held while every task streams its chunks and finishes.
    let oom_before = info_field(&mut bed.conn, "errorstats", "errorstat_OOM").await;
    fill_redis(&mut bed.conn).await?;
    wait_for("the daemon's writes refused", LONG, || {
        let mut conn = bed.conn.clone();
        async move {
            Ok(
                (info_field(&mut conn, "errorstats", "errorstat_OOM").await > oom_before)
                    .then_some(()),
            )
        }
    })
    .await?;
    // Past the tasks' own 1.2 s: they all tried to finish while refused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut without_outcome = Vec::new();
    for task in &sent {
        if terminals(&mut bed.conn, &task.session_id, &task.message_id)
            .await?
            .is_empty()
        {
            without_outcome.push(task.message_id.clone());
        }
    }
    assert_eq!(
        without_outcome.len(),
        sent.len(),
        "no terminal event could be written while Redis was full"
    );
    assert_eq!(
        pending_count(&mut bed.conn, stream, "agent_engines").await?,
        sent.len() as u64,
        "every entry stays pending while its outcome cannot be written"
    );
    redis_takes_writes_again(&mut bed.conn).await?;

    for task in &sent {
        let events = task_events(&mut bed.conn, &task.session_id, &task.message_id, LONG).await?;
        assert_eq!(states(&events).last().unwrap(), "COMPLETED");
        assert_eq!(
            terminals(&mut bed.conn, &task.session_id, &task.message_id).await?,
            ["COMPLETED"],
            "one terminal event per task"
        );
        let record = execution(&mut bed.conn, &task.session_id, &task.message_id)
            .await?
            .unwrap();
        assert_eq!(record["status"], "COMPLETED");
    }
    wait_all_acked(&bed.conn, stream, LONG).await?;
    bed.daemon.stop().await?;
    Ok(())
}

/// A `late-call` task (faults fixture) waits for a call that times out
/// while Redis is full (`noeviction`): the timeout cannot be journaled, so
/// the run stops there and leaves its entry pending. Once Redis takes writes
/// again the task runs again from its journal and ends once, its call's
/// outcome streamed once — with its instance kept (`evict_after_ms` past the
/// wait) or dropped at once (0).
async fn a_timeout_refused_by_a_full_redis(evict_after_ms: u64) -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "late-call", |config| {
        config.worker.claim_idle_ms = 1000;
        config.worker.evict_after_ms = evict_after_ms;
    })
    .await?;
    let task = send_ask(&mut bed.conn, "late-call", "go").await?;
    let child = format!("{}:c1", task.message_id);
    wait_record_status(&bed.conn, &task.session_id, &child, "RUNNING").await?;
    let refused_before = rejected_calls(&mut bed.conn, "hsetnx").await;
    fill_redis(&mut bed.conn).await?;
    // The call times out 1.5 s after it was sent; its journal write is refused.
    wait_for("the timeout's journal write refused", LONG, || {
        let mut conn = bed.conn.clone();
        async move {
            Ok((rejected_calls(&mut conn, "hsetnx").await > refused_before).then_some(()))
        }
    })
    .await?;
    assert_eq!(
        bed.daemon.stats.metrics.reruns_total(),
        0,
        "the task ran again before Redis took writes"
    );
    redis_takes_writes_again(&mut bed.conn).await?;

    let events = task_events(&mut bed.conn, &task.session_id, &task.message_id, LONG).await?;
    let call = task_result(&events).expect("a result")["call"]
        .as_str()
        .expect("the call's outcome")
        .to_owned();
    assert_eq!(
        chunks(&events),
        [format!("call {call}").as_str()],
        "{events:#?}"
    );
    assert_eq!(
        terminals(&mut bed.conn, &task.session_id, &task.message_id).await?,
        ["COMPLETED"]
    );
    assert!(bed.daemon.stats.metrics.reruns_total() >= 1);
    wait_all_acked(&bed.conn, "byai_gateway:ctrl:capability:late-call", LONG).await?;
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_redis_refuses_to_journal_stops_the_run_and_it_ends_once_later()
-> anyhow::Result<()> {
    a_timeout_refused_by_a_full_redis(60_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_tasks_timeout_redis_refuses_to_journal_ends_once_later() -> anyhow::Result<()> {
    a_timeout_refused_by_a_full_redis(0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_taken_over_is_never_taken_back_and_only_its_new_owner_writes_the_outcome()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let config = |redis: &RedisServer| {
        let mut config = test_config(redis, plugins.path(), workspace.path());
        config.worker.claim_idle_ms = 1000;
        config.worker.claim_interval_ms = 100;
        config
    };
    let mut first = Daemon::start(config(&redis), &redis, "slow").await?;
    let mut conn = redis.connect().await?;
    let task = send_ask(&mut conn, "slow", "2500").await?;
    let record = wait_record_status(&conn, &task.session_id, &task.message_id, "RUNNING").await?;
    assert_eq!(record["worker_id"], first.worker_id.as_str());

    // The first daemon stalls (as in a long GC pause or a partition) and
    // the second takes the entry over, as its XAUTOCLAIM would.
    let mut second = Daemon::start(config(&redis), &redis, "slow").await?;
    let stream = "byai_gateway:ctrl:capability:slow";
    let (taken_over_s, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(stream)
        .arg("agent_engines")
        .arg(&second.worker_id)
        .arg(0)
        .arg(&task.entry_id)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await?;

    // The first daemon's lease renewal finds the entry held by another
    // consumer: it stops its run instead of taking the entry back.
    wait_for("the first daemon to give the task up", LONG, || {
        let lost = first.stats.metrics.leases_lost_total();
        async move { Ok((lost >= 1).then_some(())) }
    })
    .await?;
    // The entry is run again from its start by whoever holds it once it
    // is idle (the second daemon, or the first claiming it back after
    // claim_idle, as the protocol allows) and that run alone writes the
    // outcome: the first run, which began before the takeover, writes none.
    let done = wait_record_status(&conn, &task.session_id, &task.message_id, "COMPLETED").await?;
    assert!(
        done["started_at"].as_u64().unwrap() >= taken_over_s * 1000,
        "the outcome is the run started after the takeover: {done:#}"
    );
    wait_all_acked(&conn, stream, LONG).await?;
    assert_eq!(
        terminals(&mut conn, &task.session_id, &task.message_id).await?,
        ["COMPLETED"]
    );
    first.stop().await?;
    second.stop().await?;
    // Nothing the first run could still write lands after the end.
    assert_eq!(
        terminals(&mut conn, &task.session_id, &task.message_id).await?,
        ["COMPLETED"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_answers_delivered_twice_are_dropped_not_run() -> anyhow::Result<()> {
    let mut bed = TestBed::start(
        &["planner", "translator", "researcher", "tools"],
        "planner",
        |config| config.streams.delete_acked = false,
    )
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let sent = client
        .send(
            "planner",
            &session,
            "solar power",
            json!({ "ask_timeout_ms": 30000 }),
        )
        .await?;
    wait_for("the planner's question", LONG, || {
        let mut conn = bed.conn.clone();
        let (session, id) = (session.clone(), sent.message_id.clone());
        async move {
            Ok(all_events(&mut conn, &session)
                .await?
                .into_iter()
                .find(|e| e["message_id"] == id.as_str() && e["data"]["contentType"] == "3013"))
        }
    })
    .await?;
    client
        .answer_user("planner", &session, &sent.message_id, "risks")
        .await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    assert_eq!(states(&events).last().unwrap(), "COMPLETED");

    // Every RESUME the planner took — the translator's, the three
    // researchers' (a task group), the user's answer — arrives again, as a
    // redelivery or a client sending twice would bring it.
    let stream = "byai_gateway:ctrl:capability:planner";
    let resumes = control_entries(&mut bed.conn, stream, "RESUME").await?;
    assert_eq!(resumes.len(), 5, "{resumes:#?}");
    let dropped_before = bed.daemon.stats.metrics.duplicate_replies_total();
    for resume in &resumes {
        xadd_data(&mut bed.conn, stream, &resume.to_string()).await?;
    }
    wait_all_acked(&bed.conn, stream, LONG).await?;
    let dropped = bed.daemon.stats.metrics.duplicate_replies_total() - dropped_before;
    assert_eq!(dropped, 5, "each duplicate is counted as dropped");

    // None ran as an orphan RESUME (that would write events under its id),
    // the planner finished once, and the group counted each child once.
    let events = all_events(&mut bed.conn, &session).await?;
    for resume in &resumes {
        let id = &resume["header"]["message_id"];
        assert!(
            !events.iter().any(|e| e["message_id"] == *id),
            "a duplicate reply ran: {id}"
        );
    }
    assert_eq!(
        terminals(&mut bed.conn, &session, &sent.message_id).await?,
        ["COMPLETED"]
    );
    let group_id = resumes
        .iter()
        .find_map(|r| {
            r["header"]["task_group_id"]
                .as_str()
                .filter(|g| !g.is_empty())
        })
        .expect("the researchers' replies carry their task group");
    let completed: String = redis::cmd("HGET")
        .arg(format!("byai_gateway:task_group:{group_id}"))
        .arg("completed")
        .query_async(&mut bed.conn)
        .await?;
    assert_eq!(completed, "3");
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prompts_in_one_task_each_take_their_own_answer() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "ask-twice", |config| {
        config.streams.delete_acked = false;
        config.plugins.deadline_s = 60;
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let sent = client.send("ask-twice", &session, "go", json!({})).await?;
    let first = prompt_event(&bed.conn, &session, &sent.message_id, 1, LONG).await?;
    assert_eq!(
        first["metadata"]["prompt_id"],
        format!("{}:u1", sent.message_id)
    );
    let answer = client
        .answer_user("ask-twice", &session, &sent.message_id, "one")
        .await?;
    let second = prompt_event(&bed.conn, &session, &sent.message_id, 2, LONG).await?;
    let second_prompt = format!("{}:u2", sent.message_id);
    assert_eq!(second["metadata"]["prompt_id"], second_prompt.as_str());

    // While the second prompt waits: the first answer delivered again, and
    // a late answer that names the first prompt.
    let stream = "byai_gateway:ctrl:capability:ask-twice";
    let again = control_entries(&mut bed.conn, stream, "RESUME")
        .await?
        .into_iter()
        .find(|r| r["header"]["message_id"] == answer.message_id.as_str())
        .expect("the first answer's entry");
    xadd_data(&mut bed.conn, stream, &again.to_string()).await?;
    client
        .resume(
            "ask-twice",
            &session,
            &sent.message_id,
            "late",
            "USER_REPLIED",
            json!({ "user_input": "late", "prompt_id": format!("{}:u1", sent.message_id) }),
        )
        .await?;
    wait_for("both dropped", LONG, || {
        let dropped = bed.daemon.stats.metrics.duplicate_replies_total();
        async move { Ok((dropped >= 2).then_some(())) }
    })
    .await?;
    client
        .answer_user("ask-twice", &session, &sent.message_id, "two")
        .await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    let result = task_result(&events).unwrap();
    assert_eq!(result, &json!({ "first": "one", "second": "two" }));
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_another_session_or_tenant_is_refused() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "ask-twice", |config| {
        config.plugins.deadline_s = 60;
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let (acme, globex) = (client.for_tenant("acme"), client.for_tenant("globex"));
    let session = format!("acme-{}", suffix());
    let sent = acme.send("ask-twice", &session, "go", json!({})).await?;
    prompt_event(&bed.conn, &session, &sent.message_id, 1, LONG).await?;

    // Another tenant, in its own session, naming acme's task; the right
    // session without acme's tenant; acme's tenant from another session.
    let theirs = format!("globex-{}", suffix());
    globex
        .answer_user("ask-twice", &theirs, &sent.message_id, "globex says")
        .await?;
    client
        .answer_user("ask-twice", &session, &sent.message_id, "no tenant")
        .await?;
    acme.answer_user("ask-twice", &theirs, &sent.message_id, "wrong session")
        .await?;
    wait_for("three answers refused", LONG, || {
        let refused = bed.daemon.stats.metrics.foreign_replies_total();
        async move { Ok((refused >= 3).then_some(())) }
    })
    .await?;
    // The task still waits on its first prompt; its owner's answers go on.
    acme.answer_user("ask-twice", &session, &sent.message_id, "one")
        .await?;
    prompt_event(&bed.conn, &session, &sent.message_id, 2, LONG).await?;
    acme.answer_user("ask-twice", &session, &sent.message_id, "two")
        .await?;
    let events = task_events(&mut bed.conn, &session, &sent.message_id, LONG).await?;
    assert_eq!(
        task_result(&events).unwrap(),
        &json!({ "first": "one", "second": "two" })
    );
    assert_eq!(bed.daemon.stats.metrics.foreign_replies_total(), 3);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_as_soon_as_the_task_is_recorded_is_honoured() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["faults"], "slow", |config| {
        config.worker.max_concurrency = 64;
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let mut sent = Vec::new();
    for _ in 0..40 {
        let task = send_ask(&mut bed.conn, "slow", "20000").await?;
        // As soon as the client can see the execution record, it cancels.
        loop {
            if execution(&mut bed.conn, &task.session_id, &task.message_id)
                .await?
                .is_some()
            {
                break;
            }
            tokio::task::yield_now().await;
        }
        client
            .cancel(
                &task.message_id,
                &task.session_id,
                "changed my mind",
                CancelMode::Graceful,
            )
            .await?;
        sent.push(task);
    }
    for task in &sent {
        let events = task_events(&mut bed.conn, &task.session_id, &task.message_id, LONG).await?;
        assert_eq!(
            states(&events).last().unwrap(),
            "CANCELLED",
            "{}",
            task.message_id
        );
    }
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_lock_is_taken_again_when_redis_lost_it() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |_| {}).await?;
    let lock = format!("byai_gateway:registry:worker:lock:{}", bed.daemon.worker_id);
    let held: String = redis::cmd("GET")
        .arg(&lock)
        .query_async(&mut bed.conn)
        .await?;
    // As a Redis restarted without persistence would: the lock is gone.
    let _: i64 = redis::cmd("DEL")
        .arg(&lock)
        .query_async(&mut bed.conn)
        .await?;
    let again: String = wait_for("the lock taken again", LONG, || {
        let mut conn = bed.conn.clone();
        let lock = lock.clone();
        async move {
            let value: Option<String> = redis::cmd("GET").arg(&lock).query_async(&mut conn).await?;
            Ok(value)
        }
    })
    .await?;
    assert_eq!(
        again, held,
        "the same process holds it again, with its token"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&lock)
        .query_async(&mut bed.conn)
        .await?;
    assert!(ttl > 0, "it expires if the process dies: {ttl}");
    // And the daemon still works.
    let sent = send_ask(&mut bed.conn, "echo", "still here").await?;
    let events = task_events(&mut bed.conn, &sent.session_id, &sent.message_id, LONG).await?;
    assert_eq!(states(&events).last().unwrap(), "COMPLETED");
    bed.daemon.stop().await?;
    Ok(())
}
