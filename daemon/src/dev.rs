//! `gatewayd dev [DIR]`: a plugin author's loop in one command. It builds
//! the plugin project in DIR, runs a daemon serving it (on the configured
//! Redis, or on a `redis-server` started here when none answers on a
//! loopback address), rebuilds on every save and lets the daemon hot-reload
//! the new component, and talks to the agent (`chat`) in the foreground.
//!
//! This module owns the build, the watching of the sources and the
//! lifetimes of what it started (the daemon, the Redis, a scratch
//! directory); the daemon, its reload and the conversation are the
//! library's and [`crate::console`]'s.

use crate::cli::DevArgs;
use crate::console;
use anyhow::{Context as _, bail};
use gatewayd::config::Config;
use notify::{EventKind, RecursiveMode, Watcher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long the sources must be quiet after a change before a build starts
/// (an editor's save is often several writes).
const QUIET: Duration = Duration::from_millis(200);

/// How long the daemon may take to serve the first build, and a new build
/// to be loaded.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Directories of a project that builds write to, or that are not sources.
const NOT_SOURCES: [&str; 4] = ["target", "node_modules", ".git", "__pycache__"];

/// How a project is built into a component.
#[derive(Debug, Clone)]
enum Build {
    /// Its `build.sh OUT.wasm` (what `gatewayd plugins new` writes, and
    /// the example plugins have).
    Script(PathBuf),
    /// A Rust crate without a script: `cargo build --release --target
    /// wasm32-wasip2`, the cdylib it makes.
    Cargo,
}

impl Build {
    /// How `project` builds: its `build.sh`, else its `Cargo.toml`.
    fn detect(project: &Path) -> anyhow::Result<Self> {
        let script = project.join("build.sh");
        if script.is_file() {
            Ok(Build::Script(script))
        } else if project.join("Cargo.toml").is_file() {
            Ok(Build::Cargo)
        } else {
            bail!(
                "{} has neither a build.sh (called as `build.sh OUT.wasm`) nor a Cargo.toml; \
                 `gatewayd plugins new NAME --lang rust|python|js` writes a project that has",
                project.display()
            )
        }
    }

    /// Builds `project` into `out`; on failure the error carries what the
    /// build printed.
    async fn run(&self, project: &Path, out: &Path) -> anyhow::Result<()> {
        match self {
            Build::Script(script) => {
                let output = Command::new("bash")
                    .arg(script)
                    .arg(out)
                    .current_dir(project)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .with_context(|| format!("cannot run {}", script.display()))?;
                if !output.status.success() {
                    bail!(
                        "{} failed ({}):\n{}{}",
                        script.display(),
                        output.status,
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            }
            Build::Cargo => {
                let output = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
                    .args(["build", "--release", "--target", "wasm32-wasip2"])
                    .arg("--message-format=json-render-diagnostics")
                    .current_dir(project)
                    .kill_on_drop(true)
                    .output()
                    .await
                    .context("cannot run cargo")?;
                if !output.status.success() {
                    bail!(
                        "cargo build failed ({}):\n{}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
                let built = cdylib_of(&output.stdout).context(
                    "cargo built no .wasm: is the crate a cdylib (`crate-type = [\"cdylib\"]`)?",
                )?;
                std::fs::copy(&built, out)
                    .with_context(|| format!("cannot copy {}", built.display()))?;
            }
        }
        if !out.is_file() {
            bail!("the build succeeded but wrote no {}", out.display());
        }
        Ok(())
    }
}

/// The `.wasm` of the last cdylib in cargo's JSON messages.
fn cdylib_of(messages: &[u8]) -> Option<PathBuf> {
    let mut found = None;
    for line in messages.split(|&byte| byte == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let files = message["filenames"].as_array().into_iter().flatten();
        for file in files.filter_map(|file| file.as_str()) {
            if file.ends_with(".wasm") {
                found = Some(PathBuf::from(file));
            }
        }
    }
    found
}

/// `gatewayd dev`: the exit code is `chat`'s (0 when standard input ends).
pub(crate) async fn dev(mut config: Config, args: DevArgs) -> anyhow::Result<u8> {
    let project = std::fs::canonicalize(&args.dir)
        .with_context(|| format!("cannot open the project {}", args.dir.display()))?;
    let build = Build::detect(&project)?;
    let name = project
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("plugin")
        .to_owned();
    // The daemon watches `plugins`; builds land in `out` and are moved in
    // whole, so the daemon never loads half a file.
    let scratch = tempfile::Builder::new()
        .prefix("gatewayd-dev-")
        .tempdir()
        .context("cannot make a scratch directory")?;
    let plugin_dir = scratch.path().join("plugins");
    let out_dir = scratch.path().join("out");
    std::fs::create_dir_all(&plugin_dir)?;
    std::fs::create_dir_all(&out_dir)?;
    let component = Component {
        built: out_dir.join(format!("{name}.wasm")),
        served: plugin_dir.join(format!("{name}.wasm")),
    };

    eprintln!("dev: building {}", project.display());
    let started = Instant::now();
    build.run(&project, &component.built).await?;
    component.install()?;
    eprintln!("dev: built in {:.1} s", started.elapsed().as_secs_f64());

    let redis = LocalRedis::ensure(&config).await?;
    config.plugins.dir = plugin_dir;
    config.worker.id = format!("dev-{}-{}", name, std::process::id());
    // Beside another daemon on this machine: any free port.
    config.http.listen = "127.0.0.1:0".into();
    let worker_id = config.worker.id.clone();
    let client = byclaw_client::Client::connect(config.redis.endpoint()?)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;

    let stats = Arc::new(gatewayd::Stats::default());
    let stop = CancellationToken::new();
    let mut daemon = tokio::spawn(gatewayd::run_with(
        config,
        stop.clone().cancelled_owned(),
        gatewayd::RunOptions {
            stats: stats.clone(),
            ..Default::default()
        },
    ));
    let agent = tokio::select! {
        served = served_agent(&client, &worker_id, args.agent.as_deref()) => served?,
        ended = &mut daemon => bail!("the daemon stopped: {}", daemon_result(ended)),
    };
    let watching = tokio::spawn(watch(
        project.clone(),
        build,
        component,
        stats,
        stop.clone(),
    ));
    eprintln!(
        "dev: {agent} served by {worker_id}; watching {} (save to rebuild)",
        project.display()
    );

    let conversation = async {
        if args.no_chat {
            eprintln!("dev: Ctrl-C stops");
            let _ = tokio::signal::ctrl_c().await;
            Ok(console::exit::COMPLETED)
        } else {
            eprintln!("dev: talking to {agent}; one message per line, Ctrl-D to stop");
            console::chat(&client, &agent, None).await
        }
    };
    let code = tokio::select! {
        code = conversation => code,
        ended = &mut daemon => bail!("the daemon stopped: {}", daemon_result(ended)),
    };
    stop.cancel();
    let _ = watching.await;
    let stopped = daemon.await;
    if let Some(redis) = redis {
        redis.stop().await;
    }
    match stopped {
        Ok(Ok(())) => code,
        ended => bail!("the daemon stopped: {}", daemon_result(ended)),
    }
}

/// Says how the daemon's task ended.
fn daemon_result(ended: Result<Result<(), gatewayd::RunError>, tokio::task::JoinError>) -> String {
    match ended {
        Ok(Ok(())) => "it shut down".into(),
        Ok(Err(error)) => error.to_string(),
        Err(error) => format!("it panicked: {error}"),
    }
}

/// Waits until this daemon's worker is in the registry and returns the
/// agent type to talk to: `agent` when given (it must be served), else
/// the first capability the plugin serves.
async fn served_agent(
    client: &byclaw_client::Client,
    worker_id: &str,
    agent: Option<&str>,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    loop {
        ticks.tick().await;
        let workers = client
            .workers()
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        if let Some(me) = workers.iter().find(|worker| worker.worker_id == worker_id) {
            return match agent {
                Some(agent) if me.capabilities.iter().any(|c| c == agent) => Ok(agent.to_owned()),
                Some(agent) => bail!(
                    "the plugin does not serve {agent:?}; it serves {:?}",
                    me.capabilities
                ),
                None => {
                    me.capabilities.first().cloned().context(
                        "the plugin serves no agent type (its manifest has no capabilities)",
                    )
                }
            };
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not register within {LOAD_TIMEOUT:?}: did the plugin load? (see the log above)"
            );
        }
    }
}

/// Where a build lands, and where the daemon loads it from.
#[derive(Debug)]
struct Component {
    /// The build's output.
    built: PathBuf,
    /// The file in the daemon's plugin directory.
    served: PathBuf,
}

impl Component {
    /// Whether the build made the same bytes the daemon serves.
    fn unchanged(&self) -> bool {
        match (std::fs::read(&self.built), std::fs::read(&self.served)) {
            (Ok(built), Ok(served)) => built == served,
            _ => false,
        }
    }

    /// Moves the build into the plugin directory in one step (same file
    /// system: a rename).
    fn install(&self) -> anyhow::Result<()> {
        std::fs::rename(&self.built, &self.served)
            .with_context(|| format!("cannot move the build to {}", self.served.display()))
    }
}

/// Rebuilds after each change of the sources and waits for the daemon to
/// load the result, saying so; until `stop`.
async fn watch(
    project: PathBuf,
    build: Build,
    component: Component,
    stats: Arc<gatewayd::Stats>,
    stop: CancellationToken,
) {
    let (changed, mut changes) = mpsc::channel::<()>(16);
    let root = project.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let edits = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        );
        if edits && event.paths.iter().any(|path| is_source(&root, path)) {
            // Full: a build is already due.
            let _ = changed.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            eprintln!("dev: cannot watch the sources ({error}); no rebuilds");
            return;
        }
    };
    if let Err(error) = watcher.watch(&project, RecursiveMode::Recursive) {
        eprintln!(
            "dev: cannot watch {} ({error}); no rebuilds",
            project.display()
        );
        return;
    }
    loop {
        tokio::select! {
            got = changes.recv() => if got.is_none() { return },
            () = stop.cancelled() => return,
        }
        let saved = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(QUIET) => break,
                got = changes.recv() => if got.is_none() { return },
                () = stop.cancelled() => return,
            }
        }
        eprintln!("dev: change seen; building");
        let built = tokio::select! {
            built = build.run(&project, &component.built) => built,
            () = stop.cancelled() => return,
        };
        if let Err(error) = built {
            eprintln!("dev: build failed; the previous build keeps serving\n{error:#}");
            continue;
        }
        if component.unchanged() {
            eprintln!("dev: built; the component is unchanged, nothing to reload");
            continue;
        }
        let metrics = &stats.metrics;
        let (loaded, failed) = (
            metrics.plugins_loaded_total(),
            metrics.plugins_failed_total(),
        );
        if let Err(error) = component.install() {
            eprintln!("dev: {error:#}");
            continue;
        }
        let deadline = Instant::now() + LOAD_TIMEOUT;
        let mut ticks = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            if metrics.plugins_loaded_total() > loaded {
                eprintln!(
                    "dev: new build serving, {:.1} s after the save",
                    saved.elapsed().as_secs_f64()
                );
                break;
            }
            if metrics.plugins_failed_total() > failed {
                eprintln!(
                    "dev: the new build did not load (see the log above); the previous one keeps serving"
                );
                break;
            }
            if Instant::now() > deadline {
                eprintln!("dev: the daemon did not load the new build within {LOAD_TIMEOUT:?}");
                break;
            }
        }
    }
}

/// Whether a changed `path` is one of the project's sources: not in a
/// directory builds write to, not hidden, not an editor's swap file.
fn is_source(project: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(project) else {
        return false;
    };
    let ignored = relative.components().any(|part| {
        let part = part.as_os_str().to_string_lossy();
        NOT_SOURCES.contains(&part.as_ref()) || part.starts_with('.')
    });
    let name = relative.to_string_lossy();
    !ignored && !name.ends_with('~') && !name.ends_with(".swp") && !name.ends_with(".lock")
}

/// A `redis-server` this command started, stopped when it ends.
struct LocalRedis {
    /// The process.
    child: tokio::process::Child,
}

impl LocalRedis {
    /// Nothing when the configured Redis answers; a `redis-server` started
    /// on its port when it does not and its address is loopback; an error
    /// otherwise.
    async fn ensure(config: &Config) -> anyhow::Result<Option<LocalRedis>> {
        let url = config.redis.connection_url();
        if answers(&url).await {
            return Ok(None);
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .with_context(|| format!("redis URL {url:?}"))?;
        let port = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
                if matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]") =>
            {
                *port
            }
            _ => bail!("no Redis answers at {url}; start it, or point --redis-url at one"),
        };
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("no Redis answers and redis-server cannot be started (is it installed?)")?;
        let mut redis = LocalRedis { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ticks = tokio::time::interval(Duration::from_millis(50));
        loop {
            ticks.tick().await;
            if answers(&url).await {
                eprintln!(
                    "dev: no Redis answered at {url}; started redis-server on port {port} (stopped on exit)"
                );
                return Ok(Some(redis));
            }
            if let Some(status) = redis.child.try_wait()? {
                bail!("redis-server on port {port} exited ({status})");
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
        }
    }

    /// Stops it and waits for it to exit.
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// Whether a Redis at `url` answers PING within a second.
async fn answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ping).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_exclude_build_outputs_hidden_files_and_swap_files() {
        let project = Path::new("/p");
        assert!(is_source(project, Path::new("/p/src/lib.rs")));
        assert!(is_source(project, Path::new("/p/app.py")));
        assert!(!is_source(project, Path::new("/p/target/release/x.wasm")));
        assert!(!is_source(project, Path::new("/p/node_modules/a/b.js")));
        assert!(!is_source(project, Path::new("/p/.git/index")));
        assert!(!is_source(project, Path::new("/p/src/.lib.rs.swp")));
        assert!(!is_source(project, Path::new("/p/src/lib.rs~")));
        assert!(!is_source(project, Path::new("/p/Cargo.lock")));
        assert!(!is_source(project, Path::new("/elsewhere/lib.rs")));
    }

    #[test]
    fn the_cdylib_is_the_wasm_among_cargos_artifacts() {
        let messages = br#"{"reason":"compiler-artifact","filenames":["/t/libserde.rlib"]}
{"reason":"compiler-message","message":{}}
{"reason":"compiler-artifact","filenames":["/t/wasm32-wasip2/release/my_plugin.wasm"]}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            cdylib_of(messages),
            Some(PathBuf::from("/t/wasm32-wasip2/release/my_plugin.wasm"))
        );
        assert_eq!(cdylib_of(b"not json\n"), None);
    }
}
