//! The operator commands of the `gatewayd` binary.

use std::process::Command;

fn gatewayd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(args)
        .output()
        .expect("gatewayd runs")
}

#[test]
fn cancel_answers_like_the_reference_client() {
    // The machine's Redis (the CI script starts one); ids nobody uses.
    let session = format!("cli-test-{:08x}", fastrand::u32(..));
    let out = gatewayd(&[
        "--redis-url",
        "redis://127.0.0.1:6379/0",
        "cancel",
        "msg-00000000",
        "--session",
        &session,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(answer["status"], "NOT_FOUND");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not cancelled: NOT_FOUND"));
}

#[test]
fn plugins_check_and_list_report_files_that_would_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0 truncated").unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let env_cache = ("GATEWAYD_PLUGINS__COMPILE_CACHE_DIR", cache.path());

    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .env(env_cache.0, env_cache.1)
        .args(["plugins", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.wasm: not a valid component"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .env(env_cache.0, env_cache.1)
        .args(["--plugin-dir", dir_arg, "plugins", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rejected: ") && stderr.contains("1 file(s) would not load"),
        "{stderr}"
    );

    std::fs::remove_file(&bad).unwrap();
    let out = gatewayd(&["--plugin-dir", dir_arg, "plugins", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `redis-cli` against the machine's Redis; its output, trimmed.
fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", "6379"])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn workers_lists_the_registry() {
    // A worker registered by hand in the machine's Redis, removed after.
    let id = format!("cli-worker-{:08x}", fastrand::u32(..));
    let redis = |args: &[&str]| {
        redis_cli(args);
    };
    redis(&[
        "ZADD",
        "byai_gateway:registry:active_workers",
        "4102444800000",
        &id,
    ]);
    redis(&[
        "SADD",
        &format!("byai_gateway:registry:worker:capabilities:{id}"),
        "b-agent",
        "a-agent",
    ]);
    let out = gatewayd(&["--redis-url", "redis://127.0.0.1:6379/0", "workers"]);
    redis(&["ZREM", "byai_gateway:registry:active_workers", &id]);
    redis(&[
        "DEL",
        &format!("byai_gateway:registry:worker:capabilities:{id}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine = listed
        .iter()
        .find(|w| w["worker_id"] == id.as_str())
        .expect("listed");
    assert_eq!(
        mine["capabilities"],
        serde_json::json!(["a-agent", "b-agent"])
    );
    assert_eq!(mine["last_seen"], 4102444800000u64);
}

#[test]
fn dead_letters_are_listed_shown_replayed_and_purged() {
    // A dead-letter stream and a source stream of this test's own in the
    // machine's Redis, filled as workers fill them, deleted after.
    let tag = format!("{:08x}", fastrand::u32(..));
    let dead = format!("cli-test-dead-{tag}");
    let source = format!("cli-test-source-{tag}");
    let other = format!("cli-test-other-{tag}");
    let redis = redis_cli;
    let command = |message_id: &str| {
        serde_json::json!({
            "action_type": "ASK_AGENT",
            "header": {"message_id": message_id, "session_id": "s", "trace_id": "t", "metadata": {"k": 1}},
            "body": {"content": "hi"},
        })
        .to_string()
    };
    let letters = [
        (
            "no plugin serves agent type \"ghost\"",
            source.as_str(),
            command("msg-a"),
        ),
        (
            "malformed entry: not JSON",
            other.as_str(),
            "not json".to_owned(),
        ),
        (
            "delivered 6 times (max_deliveries 5)",
            source.as_str(),
            command("msg-c"),
        ),
    ];
    let mut ids = Vec::new();
    for (reason, stream, data) in &letters {
        ids.push(redis(&[
            "XADD",
            &dead,
            "*",
            "reason",
            reason,
            "source_stream",
            stream,
            "source_id",
            "1-1",
            "consumer_group",
            "agent_engines",
            "worker_id",
            "w-1",
            "delivery_count",
            "6",
            "dead_lettered_at",
            "0",
            "data",
            data,
        ]));
    }
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .env("GATEWAYD_WORKER__DEAD_LETTER_STREAM", &dead)
            .args(["--redis-url", "redis://127.0.0.1:6379/0", "dead-letters"])
            .args(args)
            .output()
            .expect("gatewayd runs");
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON lines"))
            .collect();
        (
            out.status.code(),
            lines,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (code, listed, _) = run(&["list"]);
    assert_eq!(code, Some(0));
    let listed_ids: Vec<&str> = listed.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!(listed_ids, ids, "oldest first");
    assert_eq!(listed[0]["delivery_count"], 6);
    assert_eq!(listed[0]["source_stream"], source.as_str());
    let count = |args: &[&str]| run(args).1.len();
    assert_eq!(count(&["list", "--reason", "malformed"]), 1);
    assert_eq!(count(&["list", "--stream", &source]), 2);
    assert_eq!(
        count(&["list", "--stream", &source, "--reason", "delivered"]),
        1
    );
    assert_eq!(count(&["list", "--newer-than", "1h"]), 3);
    assert_eq!(count(&["list", "--older-than", "1h"]), 0);
    assert_eq!(count(&["list", "--limit", "2"]), 2);

    let (code, shown, _) = run(&["show", &ids[0]]);
    assert_eq!(code, Some(0));
    assert_eq!(shown[0]["fields"]["data"]["header"]["message_id"], "msg-a");
    assert_eq!(shown[0]["reason"], letters[0].0);
    let (code, _, stderr) = run(&["show", "1-1"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no entry 1-1"), "{stderr}");

    // Replay and purge want to be told which entries.
    let (code, _, stderr) = run(&["replay"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("say which entries"), "{stderr}");
    let (code, replayed, _) = run(&["replay", "--stream", &source]);
    assert_eq!(code, Some(0));
    assert_eq!(replayed.len(), 2);
    assert_eq!(redis(&["XLEN", &source]), "2");
    assert_eq!(redis(&["XLEN", &dead]), "1");
    let data = redis(&["XRANGE", &source, "-", "+", "COUNT", "1"]);
    let json_start = data.find('{').expect("the replayed data field");
    let command: serde_json::Value =
        serde_json::from_str(data[json_start..].lines().next().unwrap()).unwrap();
    assert_eq!(command["header"]["message_id"], "msg-a");
    assert_eq!(command["header"]["metadata"]["k"], 1);
    assert_eq!(
        command["header"]["metadata"]["replayed_from"]["dead_letter_id"],
        ids[0].as_str()
    );

    let (code, _, stderr) = run(&["purge"]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("say which entries"), "{stderr}");
    let (code, purged, _) = run(&["purge", "--older-than", "1h"]);
    assert_eq!((code, purged[0]["purged"].as_u64()), (Some(0), Some(0)));
    let (code, purged, _) = run(&["purge", "--all"]);
    assert_eq!((code, purged[0]["purged"].as_u64()), (Some(0), Some(1)));
    assert_eq!(redis(&["XLEN", &dead]), "0");
    redis(&["DEL", &dead, &source, &other]);
}

// ---------------------------------------------------------------------------
// `gatewayd send` and `gatewayd chat` against a daemon: each test starts a
// redis-server of its own and runs this binary as the daemon too, serving
// the example and fixture plugins (built by scripts/build-plugins into the
// harness's wasm target dir, so the integration tests' build is reused).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a test waits for any one condition.
const WAIT: Duration = Duration::from_secs(60);

/// A redis-server of one test, on a free port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    /// Its working directory, removed after it.
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            let mut redis = Redis {
                child,
                port,
                _dir: dir,
            };
            let ready = wait_until("redis-server answers PING", || {
                if let Ok(Some(_)) = redis.child.try_wait() {
                    // Port taken between bind and start: try another.
                    return Some(false);
                }
                let mut conn = redis::Client::open(redis.url())
                    .ok()?
                    .get_connection()
                    .ok()?;
                let pong: String = redis::cmd("PING").query(&mut conn).ok()?;
                (pong == "PONG").then_some(true)
            });
            if ready {
                return redis;
            }
        }
        panic!("could not start redis-server");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it gives a value; panics after [`WAIT`].
fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory of built plugin components (`echo.wasm`, `faults.wasm`...),
/// built once per test binary.
fn built_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        // The target dir the integration tests build plugins in: not the
        // one this `cargo test` holds locked.
        let exe = std::env::current_exe().unwrap();
        let target = exe
            .ancestors()
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
            .expect("test binary inside a cargo target directory")
            .join("wasm-plugins");
        let out = target.join("cli-out");
        let status = Command::new(root.join("scripts/build-plugins"))
            .args(["--fixtures", "--rust-only"])
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target)
            .stdout(Stdio::null())
            .status()
            .expect("scripts/build-plugins runs");
        assert!(status.success(), "building the plugins failed");
        out
    })
}

/// `gatewayd` run as the daemon, killed on drop.
struct Daemon {
    child: Child,
    /// Its configuration file, plugin directory and workspace.
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon serving the named plugins and waits until it has
    /// registered every capability in `ready`.
    fn start(redis: &Redis, plugins: &[&str], ready: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugin_dir).unwrap();
        for name in plugins {
            let file = format!("{name}.wasm");
            std::fs::copy(built_plugins().join(&file), plugin_dir.join(&file)).unwrap();
        }
        let worker = format!("cli-test-{:08x}", fastrand::u32(..));
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[redis]
url = "{url}"
[worker]
id = "{worker}"
block_ms = 200
claim_interval_ms = 200
heartbeat_interval_s = 1
shutdown_grace_s = 5
cancel_grace_ms = 500
[plugins]
dir = "{plugins}"
deadline_s = 60
[workspace]
dir = "{workspace}"
[http]
listen = "127.0.0.1:0"
"#,
                url = redis.url(),
                plugins = plugin_dir.display(),
                workspace = dir.path().join("workspace").display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("gatewayd runs");
        let mut conn = redis.conn();
        for capability in ready {
            wait_until(&format!("the daemon serving {capability}"), || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("the daemon exited: {status}");
                }
                let member: bool = redis::cmd("SISMEMBER")
                    .arg(format!(
                        "byai_gateway:registry:capability:workers:{capability}"
                    ))
                    .arg(&worker)
                    .query(&mut conn)
                    .unwrap();
                member.then_some(())
            });
        }
        Daemon { child, _dir: dir }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `gatewayd --redis-url URL ARGS...` with stdin empty.
fn client(redis: &Redis, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gatewayd"));
    command
        .args(["--redis-url", &redis.url()])
        .args(args)
        .stdin(Stdio::null());
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The id after `label ` on a line of `stderr` (`session sess-...`).
fn id_after(stderr: &str, label: &str) -> String {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix(label)?.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} line in {stderr}"))
        .to_owned()
}

/// The status of the execution of `message_id` in the session registry.
fn execution_status(redis: &Redis, session: &str, message_id: &str) -> Option<String> {
    let mut conn = redis.conn();
    let key = format!("byai_gateway:session:{session}:registry");
    let exec_id: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("msg_map:{message_id}"))
        .query(&mut conn)
        .unwrap();
    let raw: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("exec:{}", exec_id?))
        .query(&mut conn)
        .unwrap();
    let execution: serde_json::Value = serde_json::from_str(&raw?).unwrap();
    execution["status"].as_str().map(str::to_owned)
}

/// What a running child writes, gathered by a thread as it comes: the text
/// so far, and the thread, done at end of stream.
fn collect(
    mut stream: impl std::io::Read + Send + 'static,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(String::new()));
    let sink = seen.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (seen, thread)
}

/// Waits for a child to exit; panics after [`WAIT`].
fn exit_code(child: &mut Child) -> Option<i32> {
    let status = wait_until("the client to exit", || child.try_wait().unwrap());
    status.code()
}

#[test]
fn send_streams_the_reply_and_exits_0_when_completed() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["echo", "showcase"], &["echo", "showcase"]);

    let out = client(&redis, &["send", "--agent", "echo", "hello from the cli"])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "hello from the cli\n");
    // A new session, told so it can be continued; the final state, plain
    // (stderr is not a terminal).
    let session = id_after(&stderr, "session ");
    assert!(session.starts_with("sess-"), "{stderr}");
    assert_eq!(stderr.lines().last(), Some("COMPLETED"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");

    // Artifacts print as their URL, on a line of their own.
    let out = client(
        &redis,
        &[
            "send",
            "--agent",
            "showcase",
            "--session",
            &session,
            "two words",
        ],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("session "),
        "a given session is not announced: {stderr}"
    );
    // The states on the way, one a line, not dimmed either.
    assert!(stderr.contains("\n[ANALYZING]\n"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "Your message has 2 words. ", "{stdout}");
    assert!(
        lines[1].starts_with("file://") && lines[1].ends_with("output/report.txt"),
        "{stdout}"
    );
    assert_eq!(lines[2], "The report is attached.", "{stdout}");
}

#[test]
fn send_exits_3_when_the_task_fails() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["faults"], &["fault-error"]);
    let out = client(&redis, &["send", "--agent", "fault-error", "fail please"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("FAILED: "), "{stderr}");
    assert!(last.contains("deliberate failure"), "{stderr}");
}

#[test]
fn send_exits_5_when_the_timeout_passes_first() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["faults"], &["slow"]);
    let started = Instant::now();
    let out = client(
        &redis,
        &["send", "--agent", "slow", "--timeout", "3", "30000"],
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(stdout.starts_with("tick"), "streamed until then: {stdout}");
    assert!(
        stderr.contains("timed out; the task is still running"),
        "{stderr}"
    );
    // The task was left running, as documented.
    let session = id_after(&stderr, "session ");
    let message = id_after(&stderr, "message ");
    assert_eq!(
        execution_status(&redis, &session, &message).as_deref(),
        Some("RUNNING")
    );
}

/// Ctrl-C (SIGINT) while the task runs: the client asks the daemon to
/// cancel it, follows it to CANCELLED and exits 4.
#[test]
fn ctrl_c_cancels_the_task_of_send() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["faults"], &["slow"]);
    let mut child = client(&redis, &["send", "--agent", "slow", "30000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (stdout, _) = collect(child.stdout.take().unwrap());
    let (stderr, stderr_done) = collect(child.stderr.take().unwrap());
    // Running, and followed: its chunks reach the client.
    wait_until("the task's first chunk", || {
        stdout.lock().unwrap().contains("tick").then_some(())
    });
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = exit_code(&mut child);
    stderr_done.join().unwrap();
    let stderr = stderr.lock().unwrap().clone();
    assert_eq!(stderr.lines().last(), Some("CANCELLED"), "{stderr}");
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("cancel: CANCEL_REQUESTED"), "{stderr}");
    let session = id_after(&stderr, "session ");
    let message = id_after(&stderr, "message ");
    assert_eq!(
        execution_status(&redis, &session, &message).as_deref(),
        Some("CANCELLED")
    );
}

#[test]
fn send_skips_an_entry_that_is_not_an_event() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["faults"], &["slow"]);
    let session = format!("cli-bad-entry-{:08x}", fastrand::u32(..));
    let mut child = client(
        &redis,
        &["send", "--agent", "slow", "--session", &session, "600"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (stdout, _) = collect(child.stdout.take().unwrap());
    let (stderr, stderr_done) = collect(child.stderr.take().unwrap());
    wait_until("the task's first chunk", || {
        stdout.lock().unwrap().contains("tick").then_some(())
    });
    // Someone else writes garbage into the session's stream mid-task.
    let _: String = redis::cmd("XADD")
        .arg(format!("byai_gateway:session:{session}:data_stream"))
        .arg("*")
        .arg("data")
        .arg("this is not JSON")
        .query(&mut redis.conn())
        .unwrap();
    let code = exit_code(&mut child);
    stderr_done.join().unwrap();
    let stderr = stderr.lock().unwrap().clone();
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stderr.lines().last(), Some("COMPLETED"), "{stderr}");
    // Every tick after the bad entry arrived too (600 ms of 50 ms ticks).
    assert_eq!(stdout.lock().unwrap().matches("tick").count(), 12);
}

/// Runs `gatewayd chat --agent AGENT` with `input` piped to it, to the end.
fn chat_with_input(redis: &Redis, agent: &str, input: &[u8]) -> std::process::Output {
    let mut child = client(redis, &["chat", "--agent", agent])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn chat_sends_each_line_in_one_session() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["echo"], &["echo"]);
    let out = chat_with_input(&redis, "echo", b"first turn\n\nsecond turn\n");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "first turn\nsecond turn\n");
    assert_eq!(stderr.matches("COMPLETED").count(), 2, "{stderr}");
    let announced = stderr.lines().filter(|l| l.starts_with("session "));
    assert_eq!(announced.count(), 1, "{stderr}");
    // Both turns in that session: the daemon's history has them in order.
    let session = id_after(&stderr, "session ");
    let history = wait_until("both turns in the history", || {
        let out = client(&redis, &["history", &session]).output().unwrap();
        let history = text(&out.stdout);
        (history.lines().count() == 4).then_some(history)
    });
    assert_eq!(
        history,
        "user: first turn\nassistant: first turn\nuser: second turn\nassistant: second turn\n"
    );
}

/// Ctrl-C in a chat cancels the running task, then the chat goes on with
/// the next line (here: the end of input, so it exits 0).
#[test]
fn ctrl_c_cancels_the_task_of_a_chat_turn() {
    let redis = Redis::start();
    let _daemon = Daemon::start(&redis, &["faults"], &["slow"]);
    let mut child = client(&redis, &["chat", "--agent", "slow"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"30000\n").unwrap();
    let (stdout, _) = collect(child.stdout.take().unwrap());
    let (stderr, stderr_done) = collect(child.stderr.take().unwrap());
    wait_until("the task's first chunk", || {
        stdout.lock().unwrap().contains("tick").then_some(())
    });
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let code = exit_code(&mut child);
    stderr_done.join().unwrap();
    let stderr = stderr.lock().unwrap().clone();
    assert_eq!(stderr.lines().last(), Some("CANCELLED"), "{stderr}");
    assert_eq!(code, Some(0), "{stderr}");
    let session = id_after(&stderr, "session ");
    let message = id_after(&stderr, "message ");
    assert_eq!(
        execution_status(&redis, &session, &message).as_deref(),
        Some("CANCELLED")
    );
}

/// The planner asks the user which aspect to focus on: a chat answers with
/// the next line of input; `send` with no terminal to ask cannot, and
/// exits 6.
#[test]
fn questions_are_answered_by_the_next_chat_line_and_fail_send_without_a_terminal() {
    let redis = Redis::start();
    let _daemon = Daemon::start(
        &redis,
        &["planner", "translator", "researcher", "tools"],
        &["planner", "translator", "researcher"],
    );
    let out = chat_with_input(&redis, "planner", b"good morning world\nrisks\n");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("? Which aspect should the summary focus on"),
        "{stderr}"
    );
    assert!(stdout.starts_with("# bon matin monde\n"), "{stdout}");
    assert!(stdout.contains("Focus: risks."), "{stdout}");
    // One task: the answer was not sent as a turn of its own.
    assert_eq!(stderr.matches("message ").count(), 1, "{stderr}");
    assert_eq!(stderr.lines().last(), Some("COMPLETED"), "{stderr}");

    let out = client(
        &redis,
        &["send", "--agent", "planner", "good morning world"],
    )
    .output()
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(
        stderr.contains("cannot answer the agent (standard input is not a terminal)"),
        "{stderr}"
    );
}

/// `gatewayd plugins new` refuses a non-empty directory (exit 1), a name
/// that is not an agent type (exit 2) and an `--sdk` that is not the SDK
/// (exit 1), saying why, and writes nothing. (What it writes is tested in
/// tests/tests/templates.rs: each template built and served.)
#[test]
fn plugins_new_refuses_a_non_empty_dir_and_a_bad_name() {
    let root = tempfile::tempdir().unwrap();
    let new = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_gatewayd"))
            .current_dir(root.path())
            .env_remove("BYCLAW_PLUGIN_SDK")
            .args(["plugins", "new"])
            .args(args)
            .output()
            .unwrap()
    };
    let entries = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // A directory with something in it is left alone.
    let taken = root.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), "mine").unwrap();
    let out = new(&["fine", "--lang", "python", "--dir", "taken"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("taken exists and is not empty") && stderr.contains("--dir"),
        "{stderr}"
    );
    assert_eq!(entries(&taken), ["notes.txt"]);

    // A name that is not an agent type: nothing is written (the default
    // directory is ./NAME).
    for (name, why) in [
        ("My-Agent", "'M' is not allowed"),
        ("my_agent", "'_' is not allowed"),
        ("1st", "it does not start with a letter"),
        ("", "it is empty"),
    ] {
        let out = new(&[name, "--lang", "js"]);
        assert_eq!(out.status.code(), Some(2), "{name:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid plugin name {name:?}: {why}"))
                && stderr.contains("lowercase letters (a-z), digits and '-'"),
            "{stderr}"
        );
    }
    assert_eq!(entries(root.path()), ["taken"]);

    // --sdk must be the SDK itself, not the source tree around it.
    let source_tree = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = new(&["fine", "--lang", "rust", "--sdk", source_tree]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not the plugin SDK") && stderr.contains("--sdk PATH"),
        "{stderr}"
    );
    assert_eq!(entries(root.path()), ["taken"]);
}
