//! The `gatewayd` command: flags, logging, signals; the daemon is [`gatewayd::run`].

use anyhow::Context as _;
use clap::Parser;
use gatewayd::config::{Config, LogFormat, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Many short-lived allocations per task, across threads: mimalloc's
/// thread-local heaps beat glibc's arenas here (see README, Performance).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs AI agents as sandboxed WebAssembly components, fed by Redis Streams.
///
/// Settings come from defaults, then the TOML file, then the environment
/// (GATEWAYD_<TABLE>__<KEY>, and the reference SDK's REDIS_HOST, REDIS_PORT,
/// BYAI_WORKER_CONCURRENCY, ...), then these flags.
#[derive(Debug, Parser)]
#[command(name = "gatewayd", version)]
struct Cli {
    /// TOML configuration file (see config/gateway.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/0 (overrides [redis]).
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Directory of plugin `*.wasm` components (overrides plugins.dir).
    #[arg(long, value_name = "DIR")]
    plugin_dir: Option<PathBuf>,
    /// Worker id: consumer name and registry identity (overrides worker.id).
    #[arg(long, value_name = "ID")]
    worker_id: Option<String>,
    /// Log format (overrides log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `gatewayd=debug` (overrides log.level).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    // Errors created inside wasmtime on normal paths capture a backtrace
    // when RUST_BACKTRACE is set, which showed up as a per-task cost. Keep
    // backtraces for panics, not for library errors, unless asked for.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    let cli = Cli::parse();
    let overrides = Overrides {
        redis_url: cli.redis_url,
        plugin_dir: cli.plugin_dir,
        worker_id: cli.worker_id,
        log_format: cli.log_format,
        log_level: cli.log_level,
    };
    let config = match Config::load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("gatewayd: invalid configuration:\n{errors}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    if let Err(error) = init_logging(&config) {
        eprintln!("gatewayd: {error:#}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gatewayd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gatewayd::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "gatewayd stopped");
            eprintln!("gatewayd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
        LogFormat::Human => builder.init(),
    }
    Ok(())
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
