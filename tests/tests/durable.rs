//! A task outlives its daemon: the planner's daemon is killed with SIGKILL
//! mid-workflow and another daemon, under another worker id, finishes the
//! task from its journal — each agent it called ran once, and the session
//! saw each event once. A task also keeps the random numbers and clock
//! readings it drew, so its next run takes the path the first took.
//!
//! The killed daemon is a process of its own: this test binary started
//! again with `--ignored --exact daemon_process`, which runs a daemon in
//! that process (the same code as the tests link, never a stale binary).

use byclaw_client::Client;
use integration_tests::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// The environment variable that carries a daemon process' settings.
const DAEMON_SETTINGS: &str = "BYCLAW_TEST_DAEMON_SETTINGS";

/// The daemon process the tests below start and kill; run alone it finds no
/// settings and returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the body of the daemon process the SIGKILL tests start themselves"]
async fn daemon_process() -> anyhow::Result<()> {
    let Ok(settings) = std::env::var(DAEMON_SETTINGS) else {
        return Ok(());
    };
    let settings: Value = serde_json::from_str(&settings)?;
    let text = |key: &str| settings[key].as_str().unwrap_or_default().to_owned();
    let mut config = gatewayd::config::Config::default();
    config.redis.url = Some(text("redis_url"));
    config.worker.id = text("worker_id");
    config.worker.block_ms = 200;
    config.worker.claim_interval_ms = 200;
    config.worker.heartbeat_interval_s = 1;
    config.plugins.dir = text("plugins").into();
    config.plugins.deadline_s = 60;
    config.workspace.dir = text("workspace").into();
    config.http.listen = "127.0.0.1:0".into();
    if let Some(pattern) = settings["outbound"].as_str() {
        allow_faults_to_reach(&mut config, pattern);
    }
    gatewayd::run(config, std::future::pending()).await?;
    Ok(())
}

/// A daemon in a process of its own; killed with SIGKILL when dropped.
struct DaemonProcess {
    child: Child,
    worker_id: String,
}

impl DaemonProcess {
    /// Starts it and waits until it serves `capability`.
    async fn start(
        redis: &RedisServer,
        plugins: &Path,
        workspace: &Path,
        capability: &str,
    ) -> anyhow::Result<Self> {
        Self::start_reaching(redis, plugins, workspace, capability, None).await
    }

    /// [`DaemonProcess::start`], the faults plugin allowed to reach
    /// `outbound` (an `allowed_outbound_hosts` pattern).
    async fn start_reaching(
        redis: &RedisServer,
        plugins: &Path,
        workspace: &Path,
        capability: &str,
        outbound: Option<&str>,
    ) -> anyhow::Result<Self> {
        let worker_id = format!("durable-{}", suffix());
        let settings = json!({
            "redis_url": redis.url(),
            "worker_id": worker_id,
            "plugins": plugins,
            "workspace": workspace,
            "outbound": outbound,
        });
        let child = Command::new(std::env::current_exe()?)
            .args(["--ignored", "--exact", "daemon_process", "--nocapture"])
            .env(DAEMON_SETTINGS, settings.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let mut process = DaemonProcess { child, worker_id };
        let conn = redis.connect().await?;
        let key = format!("byai_gateway:registry:capability:workers:{capability}");
        let worker = process.worker_id.clone();
        wait_for("the daemon process to register", LONG, || {
            let mut conn = conn.clone();
            let (key, worker) = (key.clone(), worker.clone());
            async move {
                let member: bool = redis::cmd("SISMEMBER")
                    .arg(&key)
                    .arg(&worker)
                    .query_async(&mut conn)
                    .await?;
                Ok(member.then_some(()))
            }
        })
        .await?;
        anyhow::ensure!(
            process.child.try_wait()?.is_none(),
            "the daemon process exited"
        );
        Ok(process)
    }

    /// SIGKILL: no shutdown, no last write.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the planner's first daemon is killed.
#[derive(Clone, Copy, PartialEq)]
enum KillWhile {
    /// Waiting for its three researchers; they reply while no daemon
    /// serves the planner.
    WaitingForResearchers,
    /// Waiting for its three researchers, which still run when the task is
    /// run again: it sends them again, under the same ids.
    ResearchersStillRunning,
    /// Waiting for the user, who answers while no daemon serves it.
    WaitingForTheUser,
}

/// The planner workflow with its daemon killed at `kill_while`, finished by
/// a daemon under another worker id; compared with the same workflow run
/// without a crash.
async fn planner_survives_its_daemon(kill_while: KillWhile) -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    // The called agents run on a daemon that stays up.
    let (_helpers_dir, mut helpers) =
        start_planner_helpers(&redis, workspace.path(), |_| {}).await?;
    let planner_dir = plugin_dir(&["planner", "tools"]);
    let mut first =
        DaemonProcess::start(&redis, planner_dir.path(), workspace.path(), "planner").await?;

    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let research_delay_ms = match kill_while {
        KillWhile::ResearchersStillRunning => 6000,
        _ => 1500,
    };
    let payload = json!({ "research_delay_ms": research_delay_ms });
    let sent = client
        .send("planner", &session, "durable tasks", payload.clone())
        .await?;
    let task = &sent.message_id;
    match kill_while {
        KillWhile::WaitingForResearchers => {
            wait_event(&conn, &session, task, "the group wait", |e| {
                delta_content(e) == "WAITING_AGENT" && e["metadata"]["task_group_id"].is_string()
            })
            .await?;
            first.kill();
            // All three reply while nobody serves the planner.
            wait_for("the researchers' replies", LONG, || {
                let mut conn = conn.clone();
                let prefix = format!("{task}:g2.");
                let session = session.clone();
                async move {
                    let ended = all_events(&mut conn, &session)
                        .await?
                        .into_iter()
                        .filter(|e| {
                            e["message_id"]
                                .as_str()
                                .is_some_and(|id| id.starts_with(&prefix))
                                && is_terminal_state(e)
                        })
                        .count();
                    Ok((ended == 3).then_some(()))
                }
            })
            .await?;
        }
        KillWhile::ResearchersStillRunning => {
            wait_event(&conn, &session, task, "the group wait", |e| {
                delta_content(e) == "WAITING_AGENT" && e["metadata"]["task_group_id"].is_string()
            })
            .await?;
            first.kill();
        }
        KillWhile::WaitingForTheUser => {
            prompt_event(&conn, &session, task, 1, LONG).await?;
            wait_event(&conn, &session, task, "WAITING_USER", |e| {
                delta_content(e) == "WAITING_USER"
            })
            .await?;
            first.kill();
            client
                .answer_user("planner", &session, task, "risks")
                .await?;
        }
    }

    // Another daemon, another worker id: it reads what arrived meanwhile
    // and takes the task over once its lease has lapsed.
    let mut config = test_config(&redis, planner_dir.path(), workspace.path());
    config.worker.claim_idle_ms = 1000;
    let second_worker = config.worker.id.clone();
    assert_ne!(second_worker, first.worker_id);
    let mut second = Daemon::start(config, &redis, "planner").await?;
    if kill_while != KillWhile::WaitingForTheUser {
        prompt_event(&conn, &session, task, 1, LONG).await?;
        client
            .answer_user("planner", &session, task, "risks")
            .await?;
    }
    let events = task_events(&mut conn, &session, task, LONG).await?;
    let result = task_result(&events).expect("a result");
    assert_eq!(result["focus"], "risks", "{events:#?}");
    assert_eq!(result["findings"].as_array().map(Vec::len), Some(3));
    let record = execution(&mut conn, &session, task).await?.unwrap();
    assert_eq!(record["worker_id"], second_worker.as_str());
    assert_eq!(record["status"], "COMPLETED");
    wait_all_acked(&conn, "byai_gateway:ctrl:capability:planner", LONG).await?;
    let (crashed_events, crashed_children) = workflow(&mut conn, &session, task).await?;

    // The same workflow without a crash, for comparison.
    let calm_session = format!("sess-{}", suffix());
    let calm = client
        .send("planner", &calm_session, "durable tasks", payload)
        .await?;
    prompt_event(&conn, &calm_session, &calm.message_id, 1, LONG).await?;
    client
        .answer_user("planner", &calm_session, &calm.message_id, "risks")
        .await?;
    task_events(&mut conn, &calm_session, &calm.message_id, LONG).await?;
    let (calm_events, calm_children) = workflow(&mut conn, &calm_session, &calm.message_id).await?;

    // Each agent ran once, under the id its call has on every run.
    assert_eq!(crashed_children, planner_children_once());
    assert_eq!(crashed_children, calm_children);
    // The session saw what a run without a crash shows: nothing twice,
    // nothing missing, no late answer run as a RESUME of its own.
    assert_eq!(crashed_events, calm_events);
    // The reference's group counter saw each researcher once (where a
    // reply was forwarded to the killed daemon, whose lock had not expired
    // yet, nobody counted it: that counter is for observers only).
    let completed: String = redis::cmd("HGET")
        .arg(format!("byai_gateway:task_group:{task}:g2"))
        .arg("completed")
        .query_async(&mut conn)
        .await?;
    if kill_while != KillWhile::WaitingForResearchers {
        assert_eq!(completed, "3");
    }
    // It ran again from its journal, once.
    assert_eq!(second.stats.metrics.reruns_total(), 1);
    if kill_while == KillWhile::ResearchersStillRunning {
        // Sent again while they ran: each copy acked and skipped.
        assert_eq!(helpers.stats.metrics.copies_skipped_total(), 3);
    }

    second.stop().await?;
    helpers.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_daemon_is_killed_waiting_for_agents_completes_on_another()
-> anyhow::Result<()> {
    planner_survives_its_daemon(KillWhile::WaitingForResearchers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_daemon_is_killed_while_its_agents_run_completes_on_another()
-> anyhow::Result<()> {
    planner_survives_its_daemon(KillWhile::ResearchersStillRunning).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_whose_daemon_is_killed_waiting_for_the_user_completes_on_another()
-> anyhow::Result<()> {
    planner_survives_its_daemon(KillWhile::WaitingForTheUser).await
}

/// A `dice` task (faults fixture) on a daemon process, killed with SIGKILL
/// while it waits for the user, who answers while no daemon serves it;
/// then a daemon under another worker id, serving the plugins in
/// `second_plugins`, takes it over. Returns the task's events, its first
/// chunk (what the killed run drew) and the second daemon.
async fn dice_after_a_crash(
    redis: &RedisServer,
    second_plugins: &Path,
) -> anyhow::Result<(Vec<Value>, String, Daemon)> {
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let first_plugins = plugin_dir(&["faults"]);
    let mut first =
        DaemonProcess::start(redis, first_plugins.path(), workspace.path(), "dice").await?;
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let sent = client.send("dice", &session, "roll", json!({})).await?;
    let task = &sent.message_id;
    wait_event(&conn, &session, task, "WAITING_USER", |e| {
        delta_content(e) == "WAITING_USER"
    })
    .await?;
    first.kill();
    let drawn = wait_event(&conn, &session, task, "the first chunk", |e| {
        e["data"]["contentType"] != "3003" && e["data"]["contentType"] != "3013"
    })
    .await?;
    client.answer_user("dice", &session, task, "yes").await?;

    let mut config = test_config(redis, second_plugins, workspace.path());
    config.worker.claim_idle_ms = 1000;
    let second = Daemon::start(config, redis, "dice").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    Ok((events, delta_content(&drawn).to_owned(), second))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_again_after_a_crash_draws_the_same_random_numbers() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["faults"]);
    let (events, drawn, mut second) = dice_after_a_crash(&redis, plugins.path()).await?;
    let result = task_result(&events).expect("a result");
    // The run after the crash drew what the killed run drew (and streamed).
    assert_eq!(
        format!(
            "{} {}",
            result["secure"].as_str().unwrap(),
            result["insecure"].as_str().unwrap()
        ),
        drawn,
        "{events:#?}"
    );
    assert_eq!(result["answer"], "yes");
    // Streamed once: the killed run's chunks, then the second run's new
    // one; the second run read the times the first read (from the journal
    // written when it began to wait).
    assert_eq!(
        chunks(&events),
        [
            drawn.as_str(),
            result["clocks"].as_str().unwrap(),
            result["after"].as_str().unwrap()
        ]
    );
    assert_eq!(second.stats.metrics.reruns_total(), 1);
    second.stop().await?;
    Ok(())
}

/// A `survey` task (faults fixture) reads the session history and the
/// worker registry, lets a call time out, is answered, reads the clock and
/// streams it; then its daemon is killed with SIGKILL. The run after the
/// crash, on a daemon under another worker id — the history grown
/// meanwhile, the registry changed, the late reply to the timed-out call
/// in — reads and is told what the first run was: its result is what the
/// first run streamed, clock reading after the last wait included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_again_after_a_crash_reads_and_is_told_what_the_first_run_was()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut first =
        DaemonProcess::start(&redis, plugins.path(), workspace.path(), "survey").await?;
    let client = Client::connect(&redis.url()).await?;
    let (session, task, child) = survey_asking(&conn, &client).await?;
    let task = &task;
    // Busy for 5 s once it streamed the clock: killed there.
    client.answer_user("survey", &session, task, "5000").await?;
    wait_event(&conn, &session, task, "the clock's chunk", |e| {
        delta_content(e).starts_with("after ")
    })
    .await?;
    first.kill();
    add_history(&mut conn, &session, "said while no daemon ran the survey").await?;

    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 1000;
    let mut second = Daemon::start(config, &redis, "survey").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    let result = survey_result(&events);
    let read = result["read"].as_str().unwrap();
    assert!(read.ends_with(&format!(" {}", first.worker_id)), "{read}");
    // The journal says the call timed out: the late reply was dropped, not
    // taken as the call's answer by the second run.
    let journaled: Option<String> = redis::cmd("HGET")
        .arg(byclaw_protocol::keys::task_journal(&session, task))
        .arg(&child)
        .query_async(&mut conn)
        .await?;
    assert_eq!(journaled.as_deref(), Some("!timed-out"));
    assert_eq!(second.stats.metrics.reruns_total(), 1);
    second.stop().await?;
    Ok(())
}

/// A task that fetched a URL and waits for the user is killed with its
/// daemon (SIGKILL); the run on a daemon under another worker id is given
/// the response the first run read — the server is asked once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_run_again_after_a_crash_is_given_its_http_response_not_fetched_again()
-> anyhow::Result<()> {
    let (port, served) = counting_http_server().await?;
    let allowed = format!("http://127.0.0.1:{port}");
    let redis = RedisServer::start().await?;
    let mut conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut first = DaemonProcess::start_reaching(
        &redis,
        plugins.path(),
        workspace.path(),
        "fetch-ask",
        Some(&allowed),
    )
    .await?;
    let client = Client::connect(&redis.url()).await?;
    let session = format!("sess-{}", suffix());
    let url = format!("{allowed}/once");
    let sent = client.send("fetch-ask", &session, &url, json!({})).await?;
    let task = &sent.message_id;
    prompt_event(&conn, &session, task, 1, LONG).await?;
    first.kill();
    client
        .answer_user("fetch-ask", &session, task, "done")
        .await?;

    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 1000;
    allow_faults_to_reach(&mut config, &allowed);
    let mut second = Daemon::start(config, &redis, "fetch-ask").await?;
    let events = task_events(&mut conn, &session, task, LONG).await?;
    fetched_once(&events, &served);
    assert_eq!(second.stats.metrics.reruns_total(), 1);
    second.stop().await?;
    Ok(())
}

/// A task's daemon dies (SIGKILL) while the task waits for the user. Before
/// another daemon takes the task over, it reads an answer naming the task
/// in the task's session but without its tenant, then the owner's answer.
/// The foreign answer is refused and never enters the task's journal (had
/// it, the owner's answer would have found the prompt answered and been
/// dropped); the owner's is journaled, and the run after the crash takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_answer_read_while_no_daemon_runs_the_task_stays_out_of_its_journal()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let conn = redis.connect().await?;
    let workspace = tempfile::tempdir()?;
    let plugins = plugin_dir(&["faults"]);
    let mut first =
        DaemonProcess::start(&redis, plugins.path(), workspace.path(), "ask-twice").await?;
    let client = Client::connect(&redis.url()).await?;
    let acme = client.for_tenant("acme");
    let session = format!("acme-{}", suffix());
    let sent = acme.send("ask-twice", &session, "go", json!({})).await?;
    let task = &sent.message_id;
    prompt_event(&conn, &session, task, 1, LONG).await?;
    first.kill();
    client
        .answer_user("ask-twice", &session, task, "no tenant")
        .await?;
    let owners = acme.answer_user("ask-twice", &session, task, "one").await?;

    // Both answers are read long before the task can be taken over.
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.worker.claim_idle_ms = 8000;
    let mut second = Daemon::start(config, &redis, "ask-twice").await?;
    let journal = byclaw_protocol::keys::task_journal(&session, task);
    let prompt = format!("{task}:u1");
    let metrics = second.stats.metrics.clone();
    wait_for(
        "the foreign answer refused, the owner's journaled",
        LONG,
        || {
            let (mut conn, journal, prompt) = (conn.clone(), journal.clone(), prompt.clone());
            let (metrics, owners) = (metrics.clone(), owners.message_id.clone());
            async move {
                let kept: Option<String> = redis::cmd("HGET")
                    .arg(&journal)
                    .arg(&prompt)
                    .query_async(&mut conn)
                    .await?;
                let journaled = kept.is_some_and(|kept| kept.contains(&owners));
                Ok((journaled && metrics.foreign_replies_total() == 1).then_some(()))
            }
        },
    )
    .await?;
    assert_eq!(
        second.stats.metrics.reruns_total(),
        0,
        "taken over before both answers were read: the journal's path went untested"
    );
    // Taken over after claim_idle, the task is given its owner's answer.
    prompt_event(&conn, &session, task, 2, LONG).await?;
    acme.answer_user("ask-twice", &session, task, "two").await?;
    let events = task_events(&mut conn.clone(), &session, task, LONG).await?;
    assert_eq!(
        task_result(&events).unwrap(),
        &json!({ "first": "one", "second": "two" })
    );
    assert_eq!(second.stats.metrics.reruns_total(), 1);
    assert_eq!(second.stats.metrics.foreign_replies_total(), 1);
    second.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_plugin_changed_while_its_daemon_was_down_fails_and_says_why()
-> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // The same plugin with one more custom section: other bytes, another
    // SHA-256, the same behaviour.
    let plugins = plugin_dir(&[]);
    let mut bytes = std::fs::read(built_plugins().join("faults.wasm"))?;
    let (name, payload) = (b"byclaw-test", b"v2");
    bytes.push(0); // custom section
    bytes.push((1 + name.len() + payload.len()) as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(payload);
    std::fs::write(plugins.path().join("faults.wasm"), bytes)?;

    let (events, _, mut second) = dice_after_a_crash(&redis, plugins.path()).await?;
    let ended = states(&events).pop().unwrap();
    assert!(
        ended.starts_with("FAILED: the plugin changed since this task started"),
        "{ended}"
    );
    second.stop().await?;
    Ok(())
}
