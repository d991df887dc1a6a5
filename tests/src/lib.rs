//! Test harness: a private redis-server per test, the example and fixture
//! plugins built for wasm32-wasip2, a daemon started in-process with
//! [`gatewayd::run`], and helpers that speak the wire protocol like the
//! Python client does.

use anyhow::{Context as _, Result, bail};
use gatewayd::config::Config;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

pub mod cluster;
pub mod postgres;
pub mod sentinel;
pub mod tls;

/// A redis-server of its own on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// Append-only file with fsync on every write, so a restart keeps everything.
    persistent: bool,
    dir: tempfile::TempDir,
    /// A second, TLS-only port (with the certificates it serves), when
    /// started by [`RedisServer::start_tls`]; `port` stays plain for the
    /// harness.
    tls: Option<(u16, tls::TlsMaterial)>,
}

impl RedisServer {
    /// A server that keeps nothing on disk.
    pub async fn start() -> Result<Self> {
        Self::start_with(false).await
    }

    /// A server whose data survives [`RedisServer::restart`] (AOF, fsync always).
    pub async fn start_persistent() -> Result<Self> {
        Self::start_with(true).await
    }

    /// A server that also listens with TLS on [`RedisServer::tls_url`],
    /// with a server certificate of a throwaway CA, asking clients for a
    /// certificate of that CA too.
    pub async fn start_tls() -> Result<Self> {
        let material = tls::TlsMaterial::generate()?;
        for _attempt in 0..5 {
            let dir = tempfile::tempdir()?;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let tls_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let tls = Some((tls_port, material.clone()));
            let child = Self::spawn_with(port, dir.path(), false, tls.as_ref())?;
            let mut server = RedisServer {
                child,
                port,
                persistent: false,
                dir,
                tls,
            };
            if server.wait_ready().await? {
                return Ok(server);
            }
        }
        bail!("could not start redis-server with TLS")
    }

    /// The `rediss://` URL of the TLS port.
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|(port, _)| format!("rediss://127.0.0.1:{port}/0"))
    }

    /// The certificates the TLS port serves and trusts.
    pub fn tls_material(&self) -> Option<&tls::TlsMaterial> {
        self.tls.as_ref().map(|(_, material)| material)
    }

    fn spawn(port: u16, dir: &Path, persistent: bool) -> Result<Child> {
        Self::spawn_with(port, dir, persistent, None)
    }

    fn spawn_with(
        port: u16,
        dir: &Path,
        persistent: bool,
        tls: Option<&(u16, tls::TlsMaterial)>,
    ) -> Result<Child> {
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some((tls_port, material)) = tls {
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&material.server_cert)
                .arg("--tls-key-file")
                .arg(&material.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&material.ca_cert)
                .args(["--tls-auth-clients", "yes"]);
        }
        command
            .spawn()
            .context("starting redis-server (is it installed?)")
    }

    async fn start_with(persistent: bool) -> Result<Self> {
        for _attempt in 0..5 {
            let dir = tempfile::tempdir()?;
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let child = Self::spawn(port, dir.path(), persistent)?;
            let mut server = RedisServer {
                child,
                port,
                persistent,
                dir,
                tls: None,
            };
            if server.wait_ready().await? {
                return Ok(server);
            }
            // Port taken between bind and start: try another.
        }
        bail!("could not start redis-server")
    }

    /// Waits for PING; false if the process exited.
    async fn wait_ready(&mut self) -> Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut conn) = self.connect().await {
                let pong: redis::RedisResult<String> =
                    redis::cmd("PING").query_async(&mut conn).await;
                if pong.is_ok() {
                    return Ok(true);
                }
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("redis-server on port {} did not answer PING", self.port)
    }

    /// Kills the server (SIGKILL, as a crash) and starts it again on the same port and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.start_again().await
    }

    /// Kills the server (SIGKILL, as a crash); [`RedisServer::start_again`] brings it back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the killed server again on the same port and data.
    pub async fn start_again(&mut self) -> Result<()> {
        self.child = Self::spawn_with(
            self.port,
            self.dir.path(),
            self.persistent,
            self.tls.as_ref(),
        )?;
        anyhow::ensure!(
            self.wait_ready().await?,
            "redis-server did not restart on port {}",
            self.port
        );
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub async fn connect(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the example and fixture plugins once per test binary and returns
/// the directory holding `<name>.wasm` files.
pub fn built_plugins() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = repo_root();
        // A target dir apart from the one `cargo test` holds locked.
        // The binary is `<target>/<profile>/deps/<test>` or
        // `<target>/<profile>/<bin>`; cargo marks `<target>` with CACHEDIR.TAG.
        let exe = std::env::current_exe().expect("test binary path");
        let target = exe
            .ancestors()
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
            .expect("test binary inside a cargo target directory")
            .join("wasm-plugins");
        let out = target.join("out");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .args([
                "build",
                "--target",
                "wasm32-wasip2",
                "--profile",
                "plugin",
                "-p",
                "echo-plugin",
                "-p",
                "showcase-plugin",
                "-p",
                "faults-plugin",
                "-p",
                "planner-plugin",
                "-p",
                "translator-plugin",
                "-p",
                "researcher-plugin",
                "-p",
                "tools-plugin",
                "-p",
                "echo-v2-plugin",
                "-p",
                "hooks-plugin",
                "-p",
                "idle-plugin",
            ])
            .status()
            .expect("running cargo to build the plugins");
        assert!(status.success(), "building the wasm plugins failed");
        std::fs::create_dir_all(&out).unwrap();
        for (package, name) in [
            ("echo_plugin", "echo"),
            ("showcase_plugin", "showcase"),
            ("faults_plugin", "faults"),
            ("planner_plugin", "planner"),
            ("translator_plugin", "translator"),
            ("researcher_plugin", "researcher"),
            ("tools_plugin", "tools"),
            ("echo_v2_plugin", "echo-v2"),
            ("hooks_plugin", "hooks"),
            ("idle_plugin", "idle"),
        ] {
            let built = target
                .join("wasm32-wasip2/plugin")
                .join(format!("{package}.wasm"));
            std::fs::copy(&built, out.join(format!("{name}.wasm")))
                .unwrap_or_else(|e| panic!("{}: {e}", built.display()));
        }
        out
    })
}

/// A plugin directory with copies of the named plugins (`echo`, `showcase`,
/// `faults`, `planner`, `translator`, `researcher`, `tools`).
pub fn plugin_dir(names: &[&str]) -> tempfile::TempDir {
    let built = built_plugins();
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        std::fs::copy(
            built.join(format!("{name}.wasm")),
            dir.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    dir
}

/// A loopback port nothing listens on now, for a listener the test
/// configures by address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A random suffix for ids.
pub fn suffix() -> String {
    format!("{:08x}", fastrand::u32(..))
}

/// A config for a test: its own worker id, short timings.
pub fn test_config(redis: &RedisServer, plugins: &Path, workspace: &Path) -> Config {
    let mut config = test_config_without_redis(plugins, workspace);
    config.redis.url = Some(redis.url());
    config
}

/// [`test_config`] before it says where Redis is.
pub fn test_config_without_redis(plugins: &Path, workspace: &Path) -> Config {
    let mut config = Config::default();
    config.worker.id = format!("test-worker-{}", suffix());
    config.worker.block_ms = 200;
    config.worker.claim_interval_ms = 200;
    config.worker.heartbeat_interval_s = 1;
    config.worker.shutdown_grace_s = 5;
    config.worker.cancel_grace_ms = 500;
    config.plugins.dir = plugins.to_owned();
    config.plugins.deadline_s = 10;
    config.workspace.dir = workspace.to_owned();
    // Many daemons run at once: each gets a free port.
    config.http.listen = "127.0.0.1:0".into();
    config
}

/// A daemon running in-process.
pub struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gatewayd::RunError>>,
    pub worker_id: String,
    /// What the daemon counts (lifecycle hooks, ...).
    pub stats: std::sync::Arc<gatewayd::Stats>,
}

impl Daemon {
    /// Starts `run(config)` and waits until the worker is registered for `ready_capability`.
    pub async fn start(
        config: Config,
        redis: &RedisServer,
        ready_capability: &str,
    ) -> Result<Self> {
        Self::start_from(config, None, redis, ready_capability).await
    }

    /// Like [`Daemon::start`], watching the configuration `source` came
    /// from (its policy changes apply while serving).
    pub async fn start_from(
        config: Config,
        source: Option<gatewayd::config::Source>,
        redis: &RedisServer,
        ready_capability: &str,
    ) -> Result<Self> {
        let conn = redis.connect().await?;
        Self::start_on(config, source, conn, ready_capability).await
    }

    /// Like [`Daemon::start_from`], watching for its registration on `conn`
    /// (a Redis the test reaches otherwise than through a [`RedisServer`]).
    pub async fn start_on(
        config: Config,
        source: Option<gatewayd::config::Source>,
        mut conn: MultiplexedConnection,
        ready_capability: &str,
    ) -> Result<Self> {
        init_logging();
        let worker_id = config.worker.id.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let stats = std::sync::Arc::new(gatewayd::Stats::default());
        let options = gatewayd::RunOptions {
            stats: stats.clone(),
            config_source: source,
        };
        let task = tokio::spawn(gatewayd::run_with(
            config,
            async {
                let _ = rx.await;
            },
            options,
        ));
        let key = format!("byai_gateway:registry:capability:workers:{ready_capability}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let member: bool = redis::cmd("SISMEMBER")
                .arg(&key)
                .arg(&worker_id)
                .query_async(&mut conn)
                .await?;
            if member {
                break;
            }
            if task.is_finished() {
                let result = task.await?;
                bail!("daemon exited before registering: {result:?}");
            }
            if Instant::now() > deadline {
                bail!("daemon did not register {ready_capability} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Daemon {
            stop: Some(tx),
            task,
            worker_id,
            stats,
        })
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(&mut self) -> Result<(), gatewayd::RunError> {
        self.begin_stop();
        (&mut self.task).await.expect("daemon task panicked")
    }
}

/// Ids of one command sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub session_id: String,
    pub message_id: String,
    pub trace_id: String,
    pub entry_id: String,
}

/// The ASK_AGENT `data` JSON as the Python client writes it.
pub fn ask_agent_json(
    session_id: &str,
    message_id: &str,
    trace_id: &str,
    agent_type: &str,
    content: Value,
    source_agent_id: &str,
) -> String {
    json!({
        "action_type": "ASK_AGENT",
        "header": {
            "message_id": message_id,
            "session_id": session_id,
            "trace_id": trace_id,
            "source_agent_id": source_agent_id,
            "target_agent_type": agent_type,
            "parent_message_id": "",
            "task_group_id": "",
            "tenant_id": "",
            "metadata": {}
        },
        "body": {"content": content, "wait_for_reply": !source_agent_id.is_empty()}
    })
    .to_string()
}

/// XADDs an ASK_AGENT to a capability stream.
pub async fn send_ask(
    conn: &mut MultiplexedConnection,
    agent_type: &str,
    text: &str,
) -> Result<Sent> {
    send_ask_from(conn, agent_type, json!(text), "").await
}

/// XADDs an ASK_AGENT with a content value and a calling agent.
pub async fn send_ask_from(
    conn: &mut MultiplexedConnection,
    agent_type: &str,
    content: Value,
    source_agent_id: &str,
) -> Result<Sent> {
    send_ask_with(conn, agent_type, content, source_agent_id, json!({})).await
}

/// XADDs an ASK_AGENT with a content value, a calling agent and
/// `header.metadata`.
pub async fn send_ask_with(
    conn: &mut MultiplexedConnection,
    agent_type: &str,
    content: Value,
    source_agent_id: &str,
    metadata: Value,
) -> Result<Sent> {
    let session_id = format!("sess-{}", suffix());
    let message_id = format!("msg-{}", suffix());
    let trace_id = format!("{:032x}", fastrand::u128(..));
    let mut data: Value = serde_json::from_str(&ask_agent_json(
        &session_id,
        &message_id,
        &trace_id,
        agent_type,
        content,
        source_agent_id,
    ))?;
    data["header"]["metadata"] = metadata;
    let entry_id = xadd_data(
        conn,
        &format!("byai_gateway:ctrl:capability:{agent_type}"),
        &data.to_string(),
    )
    .await?;
    Ok(Sent {
        session_id,
        message_id,
        trace_id,
        entry_id,
    })
}

/// XADD with one `data` field.
pub async fn xadd_data(
    conn: &mut MultiplexedConnection,
    stream: &str,
    data: &str,
) -> Result<String> {
    Ok(redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("data")
        .arg(data)
        .query_async(conn)
        .await?)
}

/// One parsed event of a session stream.
pub fn delta_content(event: &Value) -> &str {
    event["data"]["choices"][0]["delta"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// The streamed chunks among a task's events (neither states, content
/// type 3003, nor `ask-user` forms, 3013), in order.
pub fn chunks(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["data"]["contentType"] != "3003" && e["data"]["contentType"] != "3013")
        .map(delta_content)
        .collect()
}

/// An HTTP server on loopback that answers the `n`th request (from 1)
/// with `body(n)`; the port, and how many requests it answered.
pub async fn loopback_http_server(
    body: impl Fn(usize) -> String + Send + Sync + 'static,
) -> Result<(u16, Arc<std::sync::atomic::AtomicUsize>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let body = Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (counter, body) = (counter.clone(), body.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let body = body(n);
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((port, served))
}

/// A [`loopback_http_server`] that answers `response <n>`.
pub async fn counting_http_server() -> Result<(u16, Arc<std::sync::atomic::AtomicUsize>)> {
    loopback_http_server(|n| format!("response {n}")).await
}

/// Sends a `survey` task (faults fixture) in a new session and waits until
/// it asks the user, the reply to its timed-out call come late (its `slow`
/// child ended): the session, the task's message id, and its call's id.
pub async fn survey_asking(
    conn: &MultiplexedConnection,
    client: &byclaw_client::Client,
) -> Result<(String, String, String)> {
    let session = format!("sess-{}", suffix());
    let sent = client.send("survey", &session, "look", json!({})).await?;
    let task = sent.message_id;
    prompt_event(conn, &session, &task, 1, Duration::from_secs(60)).await?;
    let child = format!("{task}:c1");
    wait_event(
        conn,
        &session,
        &child,
        "the slow child's end",
        is_terminal_state,
    )
    .await?;
    Ok((session, task, child))
}

/// The result of a `survey` task (faults fixture), checked against what it
/// streamed: its call timed out, and its chunks are its read, its call's
/// outcome and its clock reading after its last wait, each once — what a
/// run after an eviction or a crash returns only if it was given what the
/// first run read and was told.
pub fn survey_result(events: &[Value]) -> &Value {
    let result = task_result(events).expect("a result");
    let call = result["call"].as_str().expect("the call's outcome");
    assert!(call.starts_with("error timeout:"), "{call}");
    assert_eq!(
        chunks(events),
        [
            result["read"].as_str().unwrap(),
            format!("call {call}").as_str(),
            result["after"].as_str().unwrap()
        ],
        "{events:#?}"
    );
    result
}

/// Lets the faults fixture's requests reach `pattern` (an
/// `allowed_outbound_hosts` entry).
pub fn allow_faults_to_reach(config: &mut Config, pattern: &str) {
    config.plugins.policy.insert(
        "faults".into(),
        gatewayd::config::PluginPolicy {
            allowed_outbound_hosts: Some(vec![pattern.to_owned()]),
            ..Default::default()
        },
    );
}

/// Checks that a `fetch-ask` task (faults fixture) returned and streamed
/// the first response of a [`counting_http_server`], and that the server
/// was asked once.
pub fn fetched_once(events: &[Value], served: &std::sync::atomic::AtomicUsize) {
    let result = task_result(events).expect("a result");
    assert_eq!(
        result["fetched"],
        json!({ "status": 200, "body": "response 1" }),
        "{events:#?}"
    );
    assert_eq!(chunks(events), ["response 1"]);
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Adds a user message to a session's history (the Redis store's list), as
/// a client's earlier turn would have.
pub async fn add_history(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    text: &str,
) -> Result<()> {
    let entry = json!({ "role": "user", "content": text, "metadata": {} });
    redis::cmd("RPUSH")
        .arg(format!("byai_gateway:session:{session_id}:history"))
        .arg(entry.to_string())
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

/// True for a state event whose content is terminal for the caller.
pub fn is_terminal_state(event: &Value) -> bool {
    event["data"]["contentType"] == "3003" && {
        let content = delta_content(event);
        content == "COMPLETED"
            || content.starts_with("FAILED")
            || content == "CANCELLED"
            || content.starts_with("QUEUED: ")
    }
}

/// Reads a session's events until a terminal state event arrives.
pub async fn events_until_terminal(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    let stream = format!("byai_gateway:session:{session_id}:data_stream");
    let mut last = "0".to_owned();
    let mut events = Vec::new();
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(200)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last)
            .query_async(conn)
            .await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                last = entry.id.clone();
                let data: String = entry.get("data").context("event without data")?;
                let event: Value = serde_json::from_str(&data)?;
                let terminal = is_terminal_state(&event);
                events.push(event);
                if terminal {
                    return Ok(events);
                }
            }
        }
    }
    bail!("no terminal event on {stream} within {timeout:?}; got {events:#?}")
}

/// Reads a session's events until the task `message_id` reaches a terminal
/// state (a session carries the events of a caller and of the agents it
/// calls); returns that task's events only.
pub async fn task_events(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    message_id: &str,
    timeout: Duration,
) -> Result<Vec<Value>> {
    wait_for(
        &format!("a terminal state of {message_id}"),
        timeout,
        || {
            let mut conn = conn.clone();
            async move {
                let events: Vec<Value> = all_events(&mut conn, session_id)
                    .await?
                    .into_iter()
                    .filter(|e| e["message_id"] == message_id)
                    .collect();
                Ok(events.iter().any(is_terminal_state).then_some(events))
            }
        },
    )
    .await
}

/// The `metadata.result` of a task's COMPLETED (or `QUEUED: ...`) event.
pub fn task_result(events: &[Value]) -> Option<&Value> {
    events
        .iter()
        .rev()
        .find(|e| is_terminal_state(e))
        .map(|e| &e["metadata"]["result"])
}

/// The state texts of a task's events, in order.
pub fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["data"]["contentType"] == "3003")
        .map(|e| delta_content(e).to_owned())
        .collect()
}

/// All events of a session stream right now.
pub async fn all_events(conn: &mut MultiplexedConnection, session_id: &str) -> Result<Vec<Value>> {
    let stream = format!("byai_gateway:session:{session_id}:data_stream");
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(&stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    reply
        .ids
        .iter()
        .map(|e| {
            let data: String = e.get("data").context("event without data")?;
            Ok(serde_json::from_str(&data)?)
        })
        .collect()
}

/// The first event of `message_id` in its session that `matches`, once it
/// is there (within 60 s).
pub async fn wait_event(
    conn: &MultiplexedConnection,
    session_id: &str,
    message_id: &str,
    what: &str,
    matches: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_for(what, Duration::from_secs(60), || {
        let mut conn = conn.clone();
        let matches = &matches;
        async move {
            Ok(all_events(&mut conn, session_id)
                .await?
                .into_iter()
                .find(|e| e["message_id"] == message_id && matches(e)))
        }
    })
    .await
}

/// Waits up to `timeout` for the `n`th (from 1) `ask-user` prompt (content
/// type 3013) of a task in its session stream, and returns it.
pub async fn prompt_event(
    conn: &MultiplexedConnection,
    session_id: &str,
    message_id: &str,
    n: usize,
    timeout: Duration,
) -> Result<Value> {
    wait_for(&format!("prompt {n} of {message_id}"), timeout, || {
        let mut conn = conn.clone();
        async move {
            Ok(all_events(&mut conn, session_id)
                .await?
                .into_iter()
                .filter(|e| e["message_id"] == message_id && e["data"]["contentType"] == "3013")
                .nth(n - 1))
        }
    })
    .await
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Number of entries pending in a group on a stream.
pub async fn pending_count(
    conn: &mut MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Result<u64> {
    let reply: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async::<redis::Value>(conn)
        .await
        .map(|v| match v {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => json!(n),
                _ => json!(0),
            },
            _ => json!(0),
        })?;
    Ok(reply.as_u64().unwrap_or(0))
}

/// The execution record of a message from the session registry.
pub async fn execution(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    message_id: &str,
) -> Result<Option<Value>> {
    let key = format!("byai_gateway:session:{session_id}:registry");
    let exec_id: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("msg_map:{message_id}"))
        .query_async(conn)
        .await?;
    let Some(exec_id) = exec_id else {
        return Ok(None);
    };
    let raw: Option<String> = redis::cmd("HGET")
        .arg(&key)
        .arg(format!("exec:{exec_id}"))
        .query_async(conn)
        .await?;
    Ok(raw.map(|r| serde_json::from_str(&r)).transpose()?)
}

/// What most tests need: a private Redis, a plugin directory, a workspace,
/// a running daemon and a connection.
pub struct TestBed {
    pub redis: RedisServer,
    pub plugins: tempfile::TempDir,
    pub workspace: tempfile::TempDir,
    /// The configuration the daemon was started with.
    pub config: Config,
    pub daemon: Daemon,
    pub conn: MultiplexedConnection,
}

impl TestBed {
    /// Starts a daemon serving the named plugins once it registered `ready_capability`.
    pub async fn start(
        plugins: &[&str],
        ready_capability: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<Self> {
        let redis = RedisServer::start().await?;
        let plugins = plugin_dir(plugins);
        let workspace = tempfile::tempdir()?;
        let mut config = test_config(&redis, plugins.path(), workspace.path());
        tweak(&mut config);
        let daemon = Daemon::start(config.clone(), &redis, ready_capability).await?;
        let conn = redis.connect().await?;
        Ok(TestBed {
            redis,
            plugins,
            workspace,
            config,
            daemon,
            conn,
        })
    }
}

/// All entries of a stream.
pub async fn xrange(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> Result<Vec<redis::streams::StreamId>> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await?;
    Ok(reply.ids)
}

/// Waits until the consumer group `agent_engines` has nothing pending on `stream`.
pub async fn wait_all_acked(
    conn: &MultiplexedConnection,
    stream: &str,
    timeout: Duration,
) -> Result<()> {
    wait_for(&format!("every entry of {stream} acked"), timeout, || {
        let mut conn = conn.clone();
        async move { Ok((pending_count(&mut conn, stream, "agent_engines").await? == 0).then_some(())) }
    })
    .await
}

/// Runs `tests/python/interop.py --redis-url URL ARGS...` (the reference
/// Python SDK driving us) with the venv's `python`; its JSON result.
pub async fn python_interop(python: &str, redis_url: &str, args: &[&str]) -> Result<Value> {
    let script = repo_root().join("tests/python/interop.py");
    let run = tokio::process::Command::new(python)
        .arg(script)
        .args(["--redis-url", redis_url])
        .args(args)
        // The SDK writes a log file into its working directory.
        .current_dir(std::env::temp_dir())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await??;
    anyhow::ensure!(
        out.status.success(),
        "interop.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The SDK logs to stdout as well; the result is the JSON line.
    let stdout = String::from_utf8(out.stdout)?;
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("no JSON result in:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

/// The python of a venv holding the reference SDK and componentize-py
/// (created once by `tests/python/venv.sh`).
pub async fn python_venv() -> Result<String> {
    let script = repo_root().join("tests/python/venv.sh");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "venv.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    Ok(stdout.lines().last().unwrap_or_default().trim().to_owned())
}

/// Builds the echo agent in `plugins/<name>` with its `build.sh` (the
/// documented build command) and checks it serves tasks as the Rust echo
/// does: `ECHOING`, the text upper-cased (ASCII only), the text, COMPLETED
/// with `{"echo": text, "language": language}`. The second text needs every
/// kind of JSON escape both ways (a quote, a backslash, a newline, a tab, a
/// control character) and carries non-ASCII UTF-8, which the upper-casing
/// must leave alone.
pub async fn echo_agent_built_by_its_script_serves_tasks(name: &str, language: &str) -> Result<()> {
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join(format!("{name}.wasm"));
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join(format!("plugins/{name}/build.sh")))
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "building {name} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, name).await?;
    let mut conn = redis.connect().await?;
    for text in [
        format!("hello from {language}"),
        "say \"hi\" \\ back\\slash\nnew line\ttab \u{1} é 你好 🦀".to_owned(),
    ] {
        let sent = send_ask(&mut conn, name, &text).await?;
        let events =
            events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
        let contents: Vec<&str> = events.iter().map(delta_content).collect();
        assert_eq!(
            contents,
            ["ECHOING", &*text.to_ascii_uppercase(), &*text, "COMPLETED"],
            "{events:#?}"
        );
        assert_eq!(
            events.last().unwrap()["metadata"]["result"],
            json!({"echo": text, "language": language})
        );
        assert_eq!(events[0]["metadata"]["plugin_id"], name);
    }
    daemon.stop().await?;
    Ok(())
}

/// One event as the session shows it, without what differs between two
/// runs of one workflow (ids, times): its type, text and metadata.
pub fn shown(event: &Value, message_id: &str) -> String {
    format!(
        "{} {} {} {}",
        event["data"]["contentType"],
        delta_content(event),
        event["data"]["choices"][0]["delta"]["reasoning_content"],
        event["metadata"]
    )
    .replace(message_id, "<task>")
}

/// What one workflow left in its session: the planner's events (as
/// [`shown`]) and, per agent it called, how many times that child ended.
pub async fn workflow(
    conn: &mut MultiplexedConnection,
    session_id: &str,
    message_id: &str,
) -> anyhow::Result<(Vec<String>, Vec<(String, usize)>)> {
    let events = all_events(conn, session_id).await?;
    let planner = events
        .iter()
        .filter(|e| e["message_id"] == message_id)
        .map(|e| shown(e, message_id))
        .collect();
    let mut children: Vec<(String, usize)> = Vec::new();
    for event in &events {
        let id = event["message_id"].as_str().unwrap_or_default();
        if id == message_id || !is_terminal_state(event) {
            continue;
        }
        let child = id.replace(message_id, "<task>");
        match children.iter_mut().find(|(c, _)| *c == child) {
            Some((_, ended)) => *ended += 1,
            None => children.push((child, 1)),
        }
    }
    children.sort();
    Ok((planner, children))
}

/// What [`workflow`] shows of the planner's children when each agent it
/// calls (the translator, then three researchers in a group) ended once.
pub fn planner_children_once() -> Vec<(String, usize)> {
    ["<task>:c1", "<task>:g2.1", "<task>:g2.2", "<task>:g2.3"]
        .into_iter()
        .map(|child| (child.to_owned(), 1))
        .collect()
}

/// Starts the daemon that serves the planner's helpers (translator,
/// researchers, tools) with `tune` applied to its test configuration; the
/// plugin directory it loads from is returned with it, to keep while it runs.
pub async fn start_planner_helpers(
    redis: &RedisServer,
    workspace: &Path,
    tune: impl FnOnce(&mut Config),
) -> Result<(tempfile::TempDir, Daemon)> {
    let dir = plugin_dir(&["translator", "researcher", "tools"]);
    let mut config = test_config(redis, dir.path(), workspace);
    tune(&mut config);
    let daemon = Daemon::start(config, redis, "researcher").await?;
    Ok((dir, daemon))
}
