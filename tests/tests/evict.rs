//! Waits that cost no sandbox: a task waiting in call-agent,
//! dispatch-group or ask-user longer than `worker.evict_after_ms` drops its
//! instance, and runs again from what it learned when the reply comes —
//! repeating no event and no call, drawing the same random numbers and
//! reading the same times. Ten thousand of them park at once and all end,
//! each once.

use byclaw_client::Client;
use integration_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

/// The planner workflow (translator, three researchers, a tool, the user)
/// on a planner daemon configured by `evict_after_ms`: what its session
/// shows, what each called agent did, and how many times the planner's
/// instance was dropped.
async fn planner_workflow(
    redis: &RedisServer,
    evict_after_ms: u64,
) -> anyhow::Result<(Vec<String>, Vec<(String, usize)>, u64)> {
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let planner_dir = plugin_dir(&["planner", "tools"]);
    let mut config = test_config(redis, planner_dir.path(), workspace.path());
    config.worker.evict_after_ms = evict_after_ms;
    let mut planner = Daemon::start(config, redis, "planner").await?;
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let payload = json!({ "research_delay_ms": 100, "translate_delay_ms": 100 });
    let sent = client
        .send("planner", &session, "evicted tasks", payload)
        .await?;
    let task = &sent.message_id;
    prompt_event(&conn, &session, task, 1, LONG).await?;
    if evict_after_ms == 0 {
        // Parked without an instance before the answer comes.
        dropped_its_instance(&planner, "the planner to drop its instance").await?;
    }
    client
        .answer_user("planner", &session, task, "risks")
        .await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    let result = task_result(&events).expect("a result");
    assert_eq!(result["focus"], "risks", "{events:#?}");
    assert_eq!(result["findings"].as_array().map(Vec::len), Some(3));
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:planner", LONG).await?;
    let (shown, children) = workflow(&mut conn, &session, task).await?;
    let evictions = planner.stats.metrics.evictions_total();
    assert_eq!(planner.stats.metrics.tasks_suspended(), 0);
    // Runs after an eviction are not runs after a crash.
    assert_eq!(planner.stats.metrics.reruns_total(), 0);
    planner.stop().await?;
    Ok((shown, children, evictions))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_evicted_in_every_wait_shows_what_one_that_kept_its_instance_shows()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let (_helpers_dir, mut helpers) =
        start_planner_helpers(&redis, workspace.path(), |_| {}).await?;

    // Dropped at once in each of its three waits (the translator, the
    // group of researchers, the user), run again after each reply.
    let (evicted, evicted_children, evictions) = planner_workflow(&redis, 0).await?;
    assert_eq!(evictions, 3);
    // The same workflow with the instance kept throughout.
    let (kept, kept_children, no_evictions) = planner_workflow(&redis, 3_600_000).await?;
    assert_eq!(no_evictions, 0);

    // Each agent ran once, and the session saw what it sees without
    // eviction: nothing twice, nothing missing.
    assert_eq!(evicted_children, planner_children_once());
    assert_eq!(evicted_children, kept_children);
    assert_eq!(evicted, kept);
    helpers.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_task_draws_the_same_random_numbers_and_reads_the_same_times()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.evict_after_ms = 0;
    let mut daemon = Daemon::start(config, &redis, "dice").await?;
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let sent = client.send("dice", &session, "roll", json!({})).await?;
    let task = &sent.message_id;
    dropped_its_instance(&daemon, "the dice task to drop its instance").await?;
    client.answer_user("dice", &session, task, "yes").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    let result = task_result(&events).expect("a result");
    // What the first run streamed before its instance went is what the
    // second run computed; each chunk once.
    let drawn = format!(
        "{} {}",
        result["secure"].as_str().unwrap(),
        result["insecure"].as_str().unwrap()
    );
    assert_eq!(
        chunks(&events),
        [
            drawn.as_str(),
            result["clocks"].as_str().unwrap(),
            result["after"].as_str().unwrap()
        ],
        "{events:#?}"
    );
    assert_eq!(result["answer"], "yes");
    assert_eq!(daemon.stats.metrics.evictions_total(), 1);
    daemon.stop().await?;
    Ok(())
}

/// A task that read the session history and the worker registry, and let
/// a call time out, drops its instance in its waits like any other; its
/// next runs are given what the first read and was told — the history grows
/// while it waits, the late reply to the call comes in — so what it returns
/// is what it streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_read_history_and_workers_is_evicted_and_runs_again_on_what_it_read()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.evict_after_ms = 0;
    let mut daemon = Daemon::start(config, &redis, "survey").await?;
    let client = Client::connect(&redis.url()).await?;
    let (session, task, _) = survey_asking(&conn, &client).await?;
    let task = &task;
    dropped_its_instance(&daemon, "the survey to drop its instance").await?;
    add_history(&mut conn, &session, "said while the survey waited").await?;
    client.answer_user("survey", &session, task, "0").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    let result = survey_result(&events);
    assert_eq!(result["answer"], "0");
    // Dropped in the call's wait and in the user's: reads past the task no
    // longer keep its instance.
    assert_eq!(daemon.stats.metrics.evictions_total(), 2);
    daemon.stop().await?;
    Ok(())
}

/// A task that made ten calls, dropping its instance in its waits, runs
/// again from them after every wait: none of the ten is sent twice,
/// and the session shows what a task that kept its instance shows. Prints
/// what the runs again cost (for the book): from sending to the prompt, and
/// from the answer to COMPLETED (the last run, given ten replies and the
/// answer), with and without eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_again_from_ten_calls_sends_none_of_them_twice() -> anyhow::Result<()> {
    const TASKS: u32 = 10;
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults", "echo"]);
    let client = Client::connect(&redis.url()).await?;
    let mut once: Vec<(String, usize)> = (1..=10).map(|n| (format!("<task>:c{n}"), 1)).collect();
    once.sort();
    let mut seen = Vec::new();
    for evict_after_ms in [60_000, 0] {
        let mut config = test_config(&redis, plugins.path(), workspace.path());
        config.worker.evict_after_ms = evict_after_ms;
        let mut daemon = Daemon::start(config, &redis, "chain").await?;
        let (mut to_prompt, mut to_end) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..TASKS {
            let session = format!("sess-{}", suffix());
            let sent_at = Instant::now();
            let sent = client
                .send("chain", &session, "ten calls", json!({}))
                .await?;
            let task = &sent.message_id;
            prompt_event(&conn, &session, task, 1, LONG).await?;
            to_prompt += sent_at.elapsed();
            let answered_at = Instant::now();
            client.answer_user("chain", &session, task, "yes").await?;
            let events = task_events(&mut conn, &session, task, LONG).await?;
            to_end += answered_at.elapsed();
            assert_eq!(task_result(&events).expect("a result")["completed"], 10);
            let (shown, children) = workflow(&mut conn, &session, task).await?;
            assert_eq!(children, once, "each call sent once");
            seen.push(shown);
        }
        // With evict_after_ms = 0 each wait drops the instance unless its
        // reply is in by the time the task looks; the user's answer never is.
        let evictions = daemon.stats.metrics.evictions_total();
        if evict_after_ms == 0 {
            assert!(
                (u64::from(TASKS)..=u64::from(11 * TASKS)).contains(&evictions),
                "{evictions}"
            );
        } else {
            assert_eq!(evictions, 0);
        }
        println!(
            "ten calls then a prompt, evict_after_ms={evict_after_ms}: send -> prompt {:?}, answer -> COMPLETED {:?} (mean of {TASKS}; {evictions} evictions)",
            to_prompt / TASKS,
            to_end / TASKS
        );
        daemon.stop().await?;
    }
    // Every task, evicted or not, showed the same events.
    assert!(seen.windows(2).all(|pair| pair[0] == pair[1]), "{seen:#?}");
    Ok(())
}

/// A task that fetched a URL drops its instance while it waits for the
/// user like any other, and its next run is given the response its first
/// run read, headers included: the server is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_task_is_given_its_http_response_again_not_fetched_again() -> anyhow::Result<()>
{
    let (port, served) = counting_http_server().await?;
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.evict_after_ms = 0;
    allow_faults_to_reach(&mut config, &format!("http://127.0.0.1:{port}"));
    let mut daemon = Daemon::start(config, &redis, "fetch-ask").await?;
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let url = format!("http://127.0.0.1:{port}/once");
    let sent = client.send("fetch-ask", &session, &url, json!({})).await?;
    let task = &sent.message_id;
    prompt_event(&conn, &session, task, 1, LONG).await?;
    dropped_its_instance(&daemon, "the task to drop its instance").await?;
    client
        .answer_user("fetch-ask", &session, task, "done")
        .await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    fetched_once(&events, &served);
    assert_eq!(daemon.stats.metrics.evictions_total(), 1);
    daemon.stop().await?;
    Ok(())
}

/// Waits until the one task on `daemon` that waits has dropped its
/// instance (`what` names it in the error).
async fn dropped_its_instance(daemon: &Daemon, what: &str) -> anyhow::Result<()> {
    wait_for(what, LONG, || {
        let suspended = daemon.stats.metrics.tasks_suspended();
        async move { Ok((suspended == 1).then_some(())) }
    })
    .await
}

/// The resident set of this process, KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// How many of `tasks` (session, message id) show `state` as their last
/// event, in one pipeline.
async fn last_state_is(
    conn: &mut redis::aio::MultiplexedConnection,
    tasks: &[(String, String)],
    state: &str,
) -> anyhow::Result<usize> {
    let mut count = 0;
    for batch in tasks.chunks(2000) {
        let mut pipe = redis::pipe();
        for (session, _) in batch {
            pipe.cmd("XREVRANGE")
                .arg(format!("byai_gateway:session:{session}:data_stream"))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
        }
        let lasts: Vec<redis::streams::StreamRangeReply> = pipe.query_async(conn).await?;
        for ((_, task), last) in batch.iter().zip(lasts) {
            let event: Option<Value> = last
                .ids
                .first()
                .and_then(|entry| entry.get::<String>("data"))
                .and_then(|data| serde_json::from_str(&data).ok());
            if event.is_some_and(|e| e["message_id"] == task.as_str() && delta_content(&e) == state)
            {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// Ten thousand planner workflows park in ask-user on one daemon, which
/// keeps no sandbox for any of them; then every user answers, in random
/// order, one in ten twice: all complete, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_planners_park_in_ask_user_and_all_complete_once() -> anyhow::Result<()> {
    // BYCLAW_PARKED_TASKS measures more (the figures in the book).
    let count: usize = std::env::var("BYCLAW_PARKED_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    const VERY_LONG: Duration = Duration::from_secs(600);
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    // Both daemons tuned for a load: more in flight, longer reads, a
    // deadline past the whole run, no history.
    let for_load = |config: &mut gatewayd::config::Config| {
        config.worker.max_concurrency = 256;
        config.worker.fetch_count = 64;
        config.plugins.deadline_s = 600;
        config.history.backend = gatewayd::config::HistoryBackend::Off;
    };
    let (_helpers_dir, mut helpers) =
        start_planner_helpers(&redis, workspace.path(), for_load).await?;
    let planner_dir = plugin_dir(&["planner", "tools"]);
    let mut config = test_config(&redis, planner_dir.path(), workspace.path());
    for_load(&mut config);
    let mut planner = Daemon::start(config, &redis, "planner").await?;
    let client = Client::connect(&redis.url()).await?;

    let rss_before = rss_kib();
    let started = Instant::now();
    let mut tasks: Vec<(String, String)> = Vec::with_capacity(count);
    for n in 0..count {
        let session = format!("sess-{}-{n}", suffix());
        let sent = client
            .send("planner", &session, "parked tasks", json!({}))
            .await?;
        tasks.push((session, sent.message_id));
    }
    wait_for("every planner to park in ask-user", VERY_LONG, || {
        let mut conn = conn.clone();
        let tasks = &tasks;
        let suspended = planner.stats.metrics.tasks_suspended();
        async move {
            if suspended < count as i64 {
                return Ok(None);
            }
            let waiting = last_state_is(&mut conn, tasks, "WAITING_USER").await?;
            Ok((waiting == count).then_some(()))
        }
    })
    .await?;
    let parked_after = started.elapsed();
    let rss_parked = rss_kib();
    let evictions = planner.stats.metrics.evictions_total();

    // Every user answers, in random order; one in ten answers twice.
    let mut answers: Vec<usize> = (0..count).chain((0..count).step_by(10)).collect();
    fastrand::shuffle(&mut answers);
    let answering = Instant::now();
    for n in answers {
        let (session, task) = &tasks[n];
        client
            .answer_user("planner", session, task, "risks")
            .await?;
    }
    wait_for("every planner to complete", VERY_LONG, || {
        let mut conn = conn.clone();
        let tasks = &tasks;
        async move {
            let done = last_state_is(&mut conn, tasks, "COMPLETED").await?;
            Ok((done == count).then_some(()))
        }
    })
    .await?;
    let completed_after = answering.elapsed();
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:planner", VERY_LONG).await?;

    // Each completed once, with the user's answer; the second answers were
    // dropped as duplicates, never run as RESUMEs of their own.
    for (session, task) in &tasks {
        let events = all_events(&mut conn, session).await?;
        let ended: Vec<&Value> = events.iter().filter(|e| is_terminal_state(e)).collect();
        let own: Vec<&&Value> = ended
            .iter()
            .filter(|e| e["message_id"] == task.as_str())
            .collect();
        assert_eq!(own.len(), 1, "{events:#?}");
        assert_eq!(delta_content(own[0]), "COMPLETED", "{events:#?}");
        assert_eq!(own[0]["metadata"]["result"]["focus"], "risks");
        // The translator and three researchers, once each; nothing else.
        assert_eq!(ended.len(), 5, "{events:#?}");
    }
    assert_eq!(planner.stats.metrics.tasks_suspended(), 0);
    eprintln!(
        "{count} planners parked in {:.1} s (RSS {} MiB before, {} MiB parked: {} KiB per parked task; {evictions} evictions); all answered and completed in {:.1} s; {} duplicate answers dropped",
        parked_after.as_secs_f64(),
        rss_before / 1024,
        rss_parked / 1024,
        rss_parked.saturating_sub(rss_before) / count as u64,
        completed_after.as_secs_f64(),
        planner.stats.metrics.duplicate_replies_total(),
    );
    planner.stop().await?;
    helpers.stop().await?;
    Ok(())
}

/// A task waiting without its sandbox keeps its entry: renewed under its
/// lease, it is not taken over by another daemon however long it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_without_its_sandbox_keeps_its_entry_past_claim_idle() -> anyhow::Result<()>
{
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let mut config = test_config(&redis, plugins.path(), workspace.path());
        config.worker.evict_after_ms = 0;
        config.worker.claim_idle_ms = 1000;
        daemons.push(Daemon::start(config, &redis, "dice").await?);
    }
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let sent = client.send("dice", &session, "roll", json!({})).await?;
    let task = &sent.message_id;
    let owner = wait_for("the dice task to drop its instance", LONG, || {
        let suspended: Vec<i64> = daemons
            .iter()
            .map(|d| d.stats.metrics.tasks_suspended())
            .collect();
        async move { Ok(suspended.iter().position(|n| *n == 1)) }
    })
    .await?;
    // Three times the lease passes while the task waits without a sandbox.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    client.answer_user("dice", &session, task, "yes").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    assert_eq!(task_result(&events).expect("a result")["answer"], "yes");
    let ended = events.iter().filter(|e| is_terminal_state(e)).count();
    assert_eq!(ended, 1, "{events:#?}");
    let record = execution(&mut conn, &session, task).await?.unwrap();
    assert_eq!(record["worker_id"], daemons[owner].worker_id.as_str());
    for daemon in &daemons {
        assert_eq!(daemon.stats.metrics.reruns_total(), 0);
        assert_eq!(daemon.stats.metrics.leases_lost_total(), 0);
    }
    for mut daemon in daemons {
        daemon.stop().await?;
    }
    Ok(())
}
