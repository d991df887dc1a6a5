//! The `gatewayd` command: flags, logging, signals; the daemon is
//! [`gatewayd::run`]. Operator commands (`gatewayd history ...`) are
//! variants of [`cli::Command`], each a small function over the library.

use anyhow::Context as _;
use clap::Parser;
use gatewayd::config::{Config, HistoryBackend, LogFormat, Overrides, Source};
use gatewayd::history::History;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

mod cli;
mod console;
mod dev;

use cli::*;

/// Many short-lived allocations per task, across threads: mimalloc's
/// thread-local heaps beat glibc's arenas here (see README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Errors created inside wasmtime on normal paths capture a backtrace
    // when RUST_BACKTRACE is set, which showed up as a per-task cost. Keep
    // backtraces for panics, not for library errors, unless asked for.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let mut cli = Cli::parse();
    // Writing a plugin project needs no configuration, Redis or logging.
    if let Some(Command::Plugins(PluginsCommand::New {
        name,
        lang,
        dir,
        sdk,
    })) = cli
        .command
        .take_if(|command| matches!(command, Command::Plugins(PluginsCommand::New { .. })))
    {
        return new_plugin(gatewayd::scaffold::NewPlugin {
            name,
            lang,
            dir,
            sdk,
        });
    }
    // An operator command prints its result; the daemon's info lines would
    // only get in the way.
    let log_level = match (&cli.command, cli.log_level) {
        (Some(command), None) if !matches!(command, Command::Bridge) => Some("warn".to_owned()),
        (_, level) => level,
    };
    let overrides = Overrides {
        redis_url: cli.redis_url,
        redis_sentinel_master: cli.redis_sentinel_master,
        redis_sentinel_nodes: cli.redis_sentinel_nodes,
        plugin_dir: cli.daemon.plugin_dir,
        worker_id: cli.daemon.worker_id,
        log_format: cli.log_format,
        log_level,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("gatewayd: invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    if cli.daemon.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    // Traces come from the daemon's tasks: the daemon and `dev` export
    // them when [telemetry] says so; client commands never do.
    let traced = matches!(cli.command, None | Some(Command::Dev(_)));
    let telemetry = match init_logging(&config, traced) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("gatewayd: {error:#}");
            return ExitCode::from(2);
        }
    };
    let code = match cli.command {
        None => run_daemon(
            config,
            cli.config.map(|file| Source {
                file,
                overrides: overrides.clone(),
            }),
        ),
        Some(Command::Bridge) => run_bridge(config),
        Some(Command::Dev(args)) => run_dev(config, args),
        Some(command) => run_command(config, command),
    };
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    code
}

/// The async runtime: multi-threaded for the daemon, one thread for a
/// command. `None` (after saying why) when it cannot start.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("gatewayd: cannot start the async runtime: {error}");
            None
        }
    }
}

/// Runs the daemon; with a configuration file, its policy changes apply
/// while serving.
fn run_daemon(config: Config, source: Option<Source>) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(config.threads().io);
    let Some(runtime) = runtime(builder) else {
        return ExitCode::FAILURE;
    };
    let options = gatewayd::RunOptions {
        config_source: source,
        ..Default::default()
    };
    match runtime.block_on(gatewayd::run_with(config, shutdown_signal(), options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gatewayd stopped");
            eprintln!("gatewayd: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `gatewayd dev`: a daemon runs beside the conversation, so the runtime
/// is multi-threaded.
fn run_dev(config: Config, args: DevArgs) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(dev::dev(config, args)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("gatewayd dev: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `gatewayd bridge`: the bridge alone, until SIGINT or SIGTERM.
fn run_bridge(config: Config) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let endpoint = config.redis.endpoint()?;
        let bridge = byclaw_bridge::Bridge::bind(&config.bridge, endpoint).await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = tokio::spawn(bridge.serve(stop.clone()));
        shutdown_signal().await;
        tracing::info!("shutting down the bridge");
        stop.cancel();
        serving
            .await
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))?;
        anyhow::Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "bridge stopped");
            eprintln!("gatewayd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(config: Config, command: Command) -> ExitCode {
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        match command {
            Command::History(args) => print_history(&config, args).await.map(|()| 0),
            Command::Cancel(args) => cancel(&config, args).await.map(|()| 0),
            Command::Send(args) => send(&config, args).await,
            Command::Chat(args) => chat(&config, args).await,
            Command::Workers => workers(&config).await.map(|()| 0),
            Command::Plugins(command) => plugins(&config, command).await.map(|()| 0),
            Command::DeadLetters(command) => dead_letters(&config, command).await.map(|()| 0),
            Command::Bridge => unreachable!("run by run_bridge"),
            Command::Dev(_) => unreachable!("run by run_dev"),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("gatewayd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client of the configured Redis (TLS files included).
async fn client(config: &Config) -> anyhow::Result<byclaw_client::Client> {
    let endpoint = config.redis.endpoint()?;
    byclaw_client::Client::connect(endpoint)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))
}

/// `gatewayd send --agent TYPE TEXT`: the exit code says how the task ended.
async fn send(config: &Config, args: SendArgs) -> anyhow::Result<u8> {
    let client = client(config).await?;
    console::send(
        &client,
        &args.agent,
        args.session,
        args.timeout.map(Duration::from_secs),
        &args.text,
    )
    .await
}

/// `gatewayd chat --agent TYPE`.
async fn chat(config: &Config, args: ChatArgs) -> anyhow::Result<u8> {
    let client = client(config).await?;
    console::chat(&client, &args.agent, args.session).await
}

/// `gatewayd workers`.
async fn workers(config: &Config) -> anyhow::Result<()> {
    let client = client(config).await?;
    let workers = client
        .workers()
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    for worker in workers {
        println!("{}", serde_json::to_string(&worker)?);
    }
    Ok(())
}

/// `gatewayd dead-letters ...`.
async fn dead_letters(config: &Config, command: DeadLettersCommand) -> anyhow::Result<()> {
    let client = client(config).await?;
    let stream = &config.worker.dead_letter_stream;
    let failed = |error: byclaw_client::ClientError| anyhow::anyhow!("{error}");
    let now_ms = byclaw_protocol::now_ms();
    let summary = |letter: &byclaw_client::DeadLetter| {
        let at = letter.dead_lettered_at_ms();
        serde_json::json!({
            "id": letter.id,
            "reason": letter.reason,
            "source_stream": letter.source_stream,
            "source_id": letter.source_id,
            "consumer_group": letter.consumer_group,
            "worker_id": letter.worker_id,
            "delivery_count": letter.delivery_count,
            "dead_lettered_at_ms": at,
            "age_s": now_ms.saturating_sub(at) / 1000,
        })
    };
    let select = |filter: DeadLetterFilterArgs, all: bool| {
        let filter = byclaw_client::DeadLetterFilter::from(filter);
        if filter.is_empty() && !all {
            anyhow::bail!(
                "say which entries: ids, --reason/--stream/--older-than/--newer-than, or --all"
            );
        }
        Ok(filter)
    };
    let mut out = std::io::stdout().lock();
    match command {
        DeadLettersCommand::List { filter, limit } => {
            let filter = byclaw_client::DeadLetterFilter::from(filter);
            for letter in client
                .dead_letters(stream, &filter, limit)
                .await
                .map_err(failed)?
            {
                print_line(&mut out, &summary(&letter))?;
            }
        }
        DeadLettersCommand::Show { id } => {
            let letter = client
                .dead_letter(stream, &id)
                .await
                .map_err(failed)?
                .with_context(|| format!("no entry {id} in {stream}"))?;
            let mut shown = summary(&letter);
            let fields: serde_json::Map<String, serde_json::Value> = letter
                .original
                .iter()
                .map(|(name, value)| {
                    let value = serde_json::from_slice(value).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(value).into_owned())
                    });
                    (name.clone(), value)
                })
                .collect();
            shown["fields"] = fields.into();
            print_line(&mut out, &shown)?;
        }
        DeadLettersCommand::Replay { ids, filter, all } => {
            let letters = if ids.is_empty() {
                let filter = select(filter, all)?;
                client
                    .dead_letters(stream, &filter, 0)
                    .await
                    .map_err(failed)?
            } else {
                let mut letters = Vec::new();
                for id in &ids {
                    letters.push(
                        client
                            .dead_letter(stream, id)
                            .await
                            .map_err(failed)?
                            .with_context(|| format!("no entry {id} in {stream}"))?,
                    );
                }
                letters
            };
            for letter in letters {
                let new_id = client
                    .replay_dead_letter(stream, &letter)
                    .await
                    .map_err(failed)?;
                print_line(
                    &mut out,
                    &serde_json::json!({
                        "id": letter.id,
                        "replayed_to": letter.source_stream,
                        "new_id": new_id,
                    }),
                )?;
            }
        }
        DeadLettersCommand::Purge { filter, all } => {
            let filter = select(filter, all)?;
            let purged = client
                .purge_dead_letters(stream, &filter)
                .await
                .map_err(failed)?;
            print_line(&mut out, &serde_json::json!({ "purged": purged }))?;
        }
    }
    Ok(())
}

/// One JSON value on its own line; a closed pipe ends quietly.
fn print_line(out: &mut impl std::io::Write, value: &serde_json::Value) -> anyhow::Result<()> {
    match writeln!(out, "{value}") {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to standard output"),
    }
}

/// `gatewayd cancel MESSAGE_ID --session ID`.
async fn cancel(config: &Config, args: CancelArgs) -> anyhow::Result<()> {
    let client = client(config).await?;
    let mode = if args.force {
        byclaw_client::CancelMode::Force
    } else {
        byclaw_client::CancelMode::Graceful
    };
    let response = client
        .cancel(&args.message_id, &args.session, &args.reason, mode)
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    println!(
        "{}",
        serde_json::json!({
            "status": response.status.as_str(),
            "message_id": args.message_id,
            "execution_id": response.execution_id,
            "worker_id": response.worker_id,
            "error": response.error,
        })
    );
    if response.status == byclaw_client::CancelStatus::CancelRequested {
        Ok(())
    } else {
        anyhow::bail!("not cancelled: {}", response.status.as_str())
    }
}

/// `gatewayd plugins new NAME --lang LANG`: writes the project, prints what
/// it wrote and what to run next.
fn new_plugin(request: gatewayd::scaffold::NewPlugin) -> ExitCode {
    match gatewayd::scaffold::new_plugin(&request) {
        Ok(project) => {
            print!("{}", project.summary());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("gatewayd: {error}");
            match error {
                gatewayd::scaffold::ScaffoldError::InvalidName { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `gatewayd plugins check FILE` / `gatewayd plugins list`.
async fn plugins(config: &Config, command: PluginsCommand) -> anyhow::Result<()> {
    let limits = config.plugins.limits();
    let sandbox = byclaw_sandbox::Sandbox::with_options(
        limits,
        2,
        config.plugins.compile_cache_path().as_deref(),
        byclaw_sandbox::Policies::from_config(&config.plugins),
        Default::default(),
    )?;
    match command {
        PluginsCommand::Check { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let plugin = sandbox
                .load(file.clone(), &bytes)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            let mut described = serde_json::to_value(&plugin.manifest)?;
            described["hooks"] = serde_json::json!(plugin.hooks.names());
            println!("{}", serde_json::to_string_pretty(&described)?);
            Ok(())
        }
        PluginsCommand::New { .. } => unreachable!("run by new_plugin, before the configuration"),
        PluginsCommand::List => {
            let loaded = byclaw_sandbox::loader::load_dir(&sandbox, &config.plugins.dir)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            for plugin in loaded.table.plugins() {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": plugin.manifest.id,
                        "version": plugin.manifest.version,
                        "path": plugin.path,
                        "capabilities": plugin.manifest.capabilities,
                        "tools": plugin.manifest.tools.iter().map(|t| &t.name).collect::<Vec<_>>(),
                        "workspace": plugin.manifest.workspace,
                        "hooks": plugin.hooks.names(),
                    })
                );
            }
            for rejected in &loaded.rejected {
                eprintln!("rejected: {rejected}");
            }
            if loaded.rejected.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} file(s) would not load", loaded.rejected.len())
            }
        }
    }
}

/// `gatewayd history SESSION_ID [--limit N] [--json]`.
async fn print_history(config: &Config, args: HistoryArgs) -> anyhow::Result<()> {
    if config.history.backend == HistoryBackend::Off {
        anyhow::bail!("history.backend is off: no history is kept");
    }
    // Errors are rendered here, once: their messages already include their
    // causes, which `{:#}` would print again.
    let history = History::start(&config.history, config.redis.endpoint()?)
        .await
        .map_err(|error| anyhow::anyhow!("cannot open the history store: {error}"))?;
    let limit = args
        .limit
        .map_or(config.history.max_entries, |limit| limit as usize);
    let entries = history
        .read(&args.session_id, limit)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot read the history of session {}: {error}",
                args.session_id
            )
        })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = entries.iter().try_for_each(|entry| {
        if args.json {
            serde_json::to_writer(&mut out, entry)?;
            writeln!(out)
        } else {
            writeln!(out, "{}: {}", entry.role, entry.content)
        }
    });
    match written.and_then(|()| out.flush()) {
        // `gatewayd history S | head` closes the pipe early; that is fine.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write to standard output"),
    }
}

/// The log (to stderr, as `[log]` says) and, when `traced` and
/// `[telemetry] enabled`, the traces exporter to shut down at the end.
fn init_logging(
    config: &Config,
    traced: bool,
) -> anyhow::Result<Option<gatewayd::telemetry::Telemetry>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?;
    if !(traced && config.telemetry.enabled) {
        // The log alone, its filter global, the subscriber of the releases
        // before traces: what is filtered out stops at its call site.
        let log = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        match config.log.format {
            LogFormat::Json => log
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .init(),
            LogFormat::Human => log.init(),
        }
        return Ok(None);
    }
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = match config.log.format {
        LogFormat::Json => log
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Human => log.boxed(),
    };
    // Spans for traces whatever log.level says: a quiet log still exports
    // its tasks' traces.
    let (traces, telemetry) = gatewayd::telemetry::layer(&config.telemetry)?;
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(traces)
        .init();
    Ok(Some(telemetry))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing a SIGTERM handler cannot fail");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
