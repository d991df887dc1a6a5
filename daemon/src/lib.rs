//! `gatewayd`: runs AI agents as sandboxed WebAssembly components, fed by the
//! Redis Streams of the byclaw gateway protocol.
//!
//! [`run`] is the whole daemon; `main.rs` only parses flags, sets up logging
//! and waits for a signal. Tests start the daemon in-process through [`run`].
//!
//! Modules, from the wire inwards: [`broker`] (stream commands), [`events`]
//! (the pipelined writer), [`dispatch`] (task lifecycle and the consuming
//! loops), [`task_link`] (a task's host calls over Redis), [`routing`] (which
//! task awaits which reply, and the journal), [`workspace`] (task
//! directories), [`registry`] (worker membership), [`history`], [`config`],
//! [`reload`] and [`config_reload`], [`http`] and [`metrics`]. Beside them,
//! crates of their own: [`byclaw_protocol`] (the wire's shapes, key names,
//! the session registry's scripts), [`byclaw_sandbox`] (engine, bindings,
//! host functions, loading), `byclaw-client` and `byclaw-bridge` (HTTP, SSE
//! and WebSocket for front ends).

pub mod broker;
pub mod config;
pub mod config_reload;
pub mod dispatch;
pub mod events;
pub mod history;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod reload;
mod retry;
pub mod routing;
pub mod scaffold;
pub mod task_link;
pub mod telemetry;
pub mod workspace;

use arc_swap::ArcSwap;
use config::Config;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Engine(#[from] byclaw_sandbox::PluginError),
    #[error(transparent)]
    PluginDir(#[from] byclaw_sandbox::loader::DirError),
    #[error("no plugin could be loaded from {dir} and plugins.watch is off; nothing to serve")]
    NoPlugins { dir: std::path::PathBuf },
    #[error(transparent)]
    Watch(#[from] reload::WatchError),
    #[error(transparent)]
    Redis(#[from] broker::BrokerError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    History(#[from] history::HistoryError),
    #[error("cannot start the workspace thread: {0}")]
    Workspace(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::ListenError),
    #[error(transparent)]
    Bridge(#[from] byclaw_bridge::BridgeError),
}

/// Runs the daemon until `shutdown` resolves, then stops gracefully: no new
/// reads, in-flight tasks get `worker.shutdown_grace_s` to finish (those cut
/// off stay pending for another worker), queued writes are flushed, and the
/// worker leaves the registry.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with(config, shutdown, RunOptions::default()).await
}

/// What [`run_with`] takes besides the configuration.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Where the daemon counts; the caller may read it while it runs.
    pub stats: Arc<Stats>,
    /// Where the configuration came from. When set, the file is watched
    /// (and SIGHUP read) and the plugin policies it sets are applied
    /// without a restart (see [`config_reload`]).
    pub config_source: Option<config::Source>,
}

/// What a running daemon counts, for whoever started it to read (tests,
/// `/metrics`, the summary at shutdown).
#[derive(Debug)]
pub struct Stats {
    /// Lifecycle hook calls by plugin version and hook.
    pub hooks: Arc<byclaw_sandbox::HookStats>,
    /// Everything `/metrics` shows (hook counts included).
    pub metrics: Arc<metrics::Metrics>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served, once bound.
    pub http_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Default for Stats {
    fn default() -> Self {
        let hooks = Arc::<byclaw_sandbox::HookStats>::default();
        Stats {
            metrics: Arc::new(metrics::Metrics::new(hooks.clone())),
            hooks,
            http_addr: std::sync::OnceLock::new(),
        }
    }
}

/// [`run`] with options.
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()>,
    options: RunOptions,
) -> Result<(), RunError> {
    config.validate()?;
    let hook_stats = options.stats.hooks.clone();
    let worker = &config.worker;
    let mut limits = config.plugins.limits();
    limits.memory_budget_bytes =
        usize::try_from(worker.memory_budget_mb << 20).unwrap_or(usize::MAX);
    limits.guest_threads = config.threads().guests;
    // Waiting tasks keep their instances while their permits serve others.
    let sandbox = byclaw_sandbox::Sandbox::with_options(
        limits,
        worker.max_concurrency + worker.max_waiting,
        config.plugins.compile_cache_path().as_deref(),
        byclaw_sandbox::Policies::from_config(&config.plugins),
        hook_stats,
    )?;

    let started = std::time::Instant::now();
    let loaded = byclaw_sandbox::loader::load_dir(&sandbox, &config.plugins.dir).await?;
    let metrics = options.stats.metrics.clone();
    for rejected in &loaded.rejected {
        metrics.emit(metrics::PluginRejected { error: rejected });
    }
    for plugin in loaded.table.plugins() {
        metrics.emit(metrics::PluginLoaded {
            plugin: &plugin.label(),
            path: &plugin.path,
        });
    }
    for (capability, plugin) in &loaded.table.by_capability {
        tracing::info!(%capability, plugin = %plugin.label(), path = %plugin.path.display(), "serving");
    }
    if loaded.table.by_capability.is_empty() {
        if !config.plugins.watch {
            return Err(RunError::NoPlugins {
                dir: config.plugins.dir.clone(),
            });
        }
        tracing::warn!(dir = %config.plugins.dir.display(), "no plugin loaded yet; waiting for one to be added");
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "plugins loaded"
    );
    byclaw_sandbox::hooks::worker_hooks(loaded.table.plugins(), true, &worker.id).await;
    let capabilities = loaded.table.capabilities();
    let plugins = Arc::new(ArcSwap::from_pointee(loaded.table));

    let url = config
        .redis
        .endpoint()
        .map_err(|error| config::ConfigErrors {
            errors: vec![error],
        })?;
    // Bound before anything starts, so a port in use stops us cleanly.
    let bridge = if config.bridge.enabled {
        Some(byclaw_bridge::Bridge::bind(&config.bridge, &url).await?)
    } else {
        None
    };
    let block = Duration::from_millis(worker.block_ms);
    let blocking_timeout = block + Duration::from_secs(10);
    let mut commands = broker::connect(&url, Duration::from_secs(10)).await?;
    let reader = broker::connect(&url, blocking_timeout).await?;
    let control_reader = broker::connect(&url, blocking_timeout).await?;
    let claimer = broker::connect(&url, Duration::from_secs(10)).await?;
    broker::warn_if_evicting(&mut commands).await;

    let capability_streams: Vec<Arc<str>> = plugins.load().streams().to_vec();
    let control_stream: Arc<str> = Arc::from(byclaw_protocol::keys::worker_stream(&worker.id));
    for stream in capability_streams.iter().chain([&control_stream]) {
        broker::ensure_group(&mut commands, stream, &worker.consumer_group).await?;
    }
    let membership = registry::Membership::join(
        &mut commands,
        &worker.id,
        capabilities.clone(),
        worker.lock_ttl_s,
    )
    .await?;
    tracing::info!(
        worker_id = %worker.id,
        group = %worker.consumer_group,
        capabilities = ?capabilities,
        max_concurrency = worker.max_concurrency,
        "worker registered"
    );

    let stop_reading = CancellationToken::new();
    let force_stop = CancellationToken::new();
    let (writer, writer_lanes) = events::Writer::start(
        commands.clone(),
        events::WriterConfig {
            lanes: 4,
            queue: config.streams.writer_queue,
            max_batch: config.streams.writer_batch,
            queue_bytes: config.streams.writer_queue_bytes,
            session_maxlen: config.streams.session_maxlen,
            session_ttl_s: config.streams.session_ttl_s,
            metrics: options.stats.metrics.clone(),
        },
        force_stop.clone(),
    );
    let history = history::History::start(&config.history, &url).await?;
    let permits = Arc::new(Semaphore::new(worker.max_concurrency));
    let plugins_changed = Arc::new(tokio::sync::Notify::new());
    let services = Arc::new(task_link::Services {
        worker_id: Arc::from(worker.id.as_str()),
        redis: commands.clone(),
        plugins: plugins.clone(),
        plugins_changed: plugins_changed.clone(),
        plugin_slot_freed: Arc::new(tokio::sync::Notify::new()),
        waiters: Arc::new(routing::Waiters::default()),
        permits: permits.clone(),
        waiting_slots: Arc::new(Semaphore::new(worker.max_waiting)),
        evict_after: Duration::from_millis(worker.evict_after_ms),
        suspended_slots: Arc::new(Semaphore::new(worker.max_suspended)),
        max_call_depth: worker.max_call_depth,
        max_reply_bytes: config.history.max_entry_bytes,
        history: history.clone(),
        metrics: options.stats.metrics.clone(),
    });
    let dispatcher = dispatch::Dispatcher::new(
        dispatch::Settings {
            worker_id: Arc::from(worker.id.as_str()),
            group: Arc::from(worker.consumer_group.as_str()),
            deadline: Duration::from_secs(config.plugins.deadline_s),
            cancel_grace: Duration::from_millis(worker.cancel_grace_ms),
            max_deliveries: worker.max_deliveries,
            dead_letter_stream: worker.dead_letter_stream.clone(),
            dead_letter_maxlen: config.streams.dead_letter_maxlen,
            trim_interval: config.streams.trim_interval(),
            control_maxlen: config.streams.control_maxlen,
            delete_acked: config.streams.delete_acked,
            fetch_count: worker.fetch_count,
            block,
            claim_idle: Duration::from_millis(worker.claim_idle_ms),
            claim_interval: Duration::from_millis(worker.claim_interval_ms),
            history_inject: config.history.inject_limit,
            max_result_bytes: config.plugins.max_result_bytes,
        },
        writer,
        byclaw_protocol::Executions::new(config.streams.session_ttl_s),
        workspace::Workspaces::start(config.workspace.dir.clone()).map_err(RunError::Workspace)?,
        force_stop.clone(),
        services,
    );
    let membership = Arc::new(membership);
    let reload = if config.plugins.watch {
        let reloader = reload::Reloader {
            sandbox: sandbox.clone(),
            dir: config.plugins.dir.clone(),
            plugins: plugins.clone(),
            changed: plugins_changed.clone(),
            membership: membership.clone(),
            group: worker.consumer_group.clone(),
            worker_id: worker.id.clone(),
            metrics: metrics.clone(),
            debounce: Duration::from_millis(config.plugins.reload_debounce_ms),
        };
        Some(reloader.watch(commands.clone(), stop_reading.clone())?)
    } else {
        None
    };
    let config_reload = match options.config_source {
        Some(source) => {
            let reloader = config_reload::ConfigReloader {
                source,
                current: config.clone(),
                sandbox: sandbox.clone(),
                plugins: plugins.clone(),
                debounce: Duration::from_millis(config.plugins.reload_debounce_ms),
                stats: options.stats.clone(),
            };
            Some(reloader.watch(stop_reading.clone())?)
        }
        None => None,
    };
    let stop_http = CancellationToken::new();
    let ops_server = match config.http.listen_addr().filter(|_| config.http.enabled) {
        Some(addr) => {
            let ops = http::Ops {
                redis: commands.clone(),
                plugins: plugins.clone(),
                group: Arc::from(worker.consumer_group.as_str()),
                draining: stop_reading.clone(),
                metrics: options.stats.metrics.clone(),
            };
            let tls = config
                .http
                .tls()
                .map_err(|(key, message)| http::ListenError::Tls { key, message })?;
            let (bound, server) = http::bind(addr, tls, ops, stop_http.clone()).await?;
            let _ = options.stats.http_addr.set(bound);
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let stop_control = CancellationToken::new();
    // Readers feed new tasks; they stop first on shutdown. The control
    // reader and the heartbeat keep going until the tasks are done, so a
    // cancel still reaches a task finishing in the grace period.
    let readers = tokio_util::task::TaskTracker::new();
    let background = tokio_util::task::TaskTracker::new();
    readers.spawn(
        dispatcher
            .clone()
            .consume(reader, permits.clone(), stop_reading.clone()),
    );
    readers.spawn(
        dispatcher
            .clone()
            .reclaim(claimer, permits.clone(), stop_reading.clone()),
    );
    readers.spawn(
        dispatcher
            .clone()
            .trim_streams(commands.clone(), stop_reading.clone()),
    );
    background.spawn(dispatcher.clone().control(
        control_reader,
        control_stream.clone(),
        stop_control.clone(),
    ));
    {
        let membership = membership.clone();
        let conn = commands.clone();
        let interval = Duration::from_secs(worker.heartbeat_interval_s);
        let stop = stop_control.clone();
        background.spawn(async move { membership.heartbeat(conn, interval, stop).await });
    }
    if let Some(reload) = reload {
        // Stops with the readers: no new plugin versions during shutdown.
        readers.spawn(reload);
    }
    if let Some(config_reload) = config_reload {
        readers.spawn(config_reload);
    }
    // The bridge for front ends, when enabled; it stops after the tasks,
    // so pages watching them see them end.
    let stop_bridge = CancellationToken::new();
    if let Some(bridge) = bridge {
        let stop = stop_bridge.clone();
        background.spawn(async move {
            if let Err(error) = bridge.serve(stop).await {
                tracing::error!(%error, "bridge stopped");
            }
        });
    }
    readers.close();
    background.close();

    shutdown.await;
    tracing::info!("shutting down: no new tasks are read");
    stop_reading.cancel();
    // A read in flight is finished (at most worker.block_ms) and its entries
    // are started, so nothing is delivered to us and then forgotten.
    readers.wait().await;
    let tasks = dispatcher.tracker().clone();
    tasks.close();
    let grace = Duration::from_secs(worker.shutdown_grace_s);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        let still_running = dispatcher.running_summary();
        tracing::warn!(
            grace_s = worker.shutdown_grace_s,
            count = still_running.len(),
            tasks = ?still_running,
            "grace period over; cutting off the tasks still running (their entries stay pending for another worker)"
        );
        force_stop.cancel();
        tasks.wait().await;
    }
    stop_control.cancel();
    stop_bridge.cancel();
    background.wait().await;
    byclaw_sandbox::hooks::worker_hooks(plugins.load().plugins(), false, &worker.id).await;
    sandbox.hook_stats().log_summary();
    // The last writer handles go with the dispatcher; the lanes then drain.
    drop(dispatcher);
    let flush = futures::future::join_all(writer_lanes);
    if tokio::time::timeout(Duration::from_secs(10), flush)
        .await
        .is_err()
    {
        tracing::warn!("event writer did not drain within 10 s; giving up on queued writes");
        force_stop.cancel();
    }
    // Replies saved by the last tasks are written before the daemon goes.
    if let Err(error) = history.close(Duration::from_secs(5)).await {
        tracing::warn!(%error, "session history not fully written at shutdown");
    }
    match membership.leave(&mut commands).await {
        Ok(()) => tracing::info!(worker_id = %worker.id, "worker unregistered"),
        Err(error) => tracing::warn!(%error, "could not unregister the worker"),
    }
    stop_http.cancel();
    if let Some(server) = ops_server {
        let _ = server.await;
    }
    Ok(())
}
