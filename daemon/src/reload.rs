//! Hot reload: watches the plugin directory and applies what changed while
//! the daemon serves.
//!
//! Changes are debounced, then the directory is loaded again off the hot
//! path ([`loader::reload_dir`]: unchanged files keep their compiled plugin,
//! a file that does not load keeps its previous version serving). The new
//! plugin table is swapped in as a whole: a task holds the plugin it started
//! with until it ends, new tasks get the new one. Consumer groups of new
//! capabilities are created before the swap, so the readers can read their
//! streams from the next fetch; the worker registry follows after it.

use crate::broker;
use crate::metrics::{PluginLoaded, PluginRejected};
use crate::registry::Membership;
use arc_swap::ArcSwap;
use byclaw_client::connection::Connection;
use byclaw_protocol::keys;
use byclaw_sandbox::loader::{self, PluginTable};
use byclaw_sandbox::{Plugin, Sandbox, hooks};
use notify::{EventKind, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// How long to wait before retrying a reload that Redis failed.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why the directory cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch plugin directory {dir}: {source}")]
pub struct WatchError {
    pub dir: PathBuf,
    pub source: notify::Error,
}

/// Everything a reload touches.
pub struct Reloader {
    /// Compiles new plugin files.
    pub sandbox: Arc<Sandbox>,
    /// The watched directory.
    pub dir: PathBuf,
    /// The table the dispatcher and the host calls read.
    pub plugins: Arc<ArcSwap<PluginTable>>,
    /// Woken after each swap (readers waiting for a first capability).
    pub changed: Arc<Notify>,
    /// The worker's registry entry, updated with the capabilities.
    pub membership: Arc<Membership>,
    /// Consumer group to create on new capability streams.
    pub group: String,
    /// Told to the worker hooks of the versions that come and go.
    pub worker_id: String,
    /// Counts loaded and rejected files.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Quiet time after the last change before reloading.
    pub debounce: Duration,
}

impl Reloader {
    /// Starts watching; the returned future reloads on changes until `stop`.
    /// Dropping it stops the watcher.
    pub fn watch(
        self,
        conn: Connection,
        stop: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()>, WatchError> {
        // Capacity 1: events only say "look again"; more than one pending
        // look is the same as one.
        let (tx, rx) = mpsc::channel::<()>(1);
        let watcher = watch_dir(&self.dir, concerns_plugins, tx.clone())?;
        Ok(async move {
            // Owned by the loop: watching ends with it.
            let _watcher = watcher;
            self.run(conn, rx, tx, stop).await;
        })
    }

    async fn run(
        self,
        mut conn: Connection,
        mut changes: mpsc::Receiver<()>,
        retry: mpsc::Sender<()>,
        stop: CancellationToken,
    ) {
        tracing::info!(dir = %self.dir.display(), "watching the plugin directory");
        loop {
            tokio::select! {
                change = changes.recv() => if change.is_none() { return },
                _ = stop.cancelled() => return,
            }
            // A copy in progress produces a burst of events.
            if !settle(&mut changes, self.debounce, &stop).await {
                return;
            }
            if let Err(error) = self.reload(&mut conn).await {
                tracing::warn!(%error, retry_s = RETRY_AFTER.as_secs(), "plugin reload postponed");
                let retry = retry.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_AFTER) => { let _ = retry.try_send(()); }
                        _ = stop.cancelled() => {}
                    }
                });
            }
        }
    }

    /// Loads the directory again and swaps the result in.
    async fn reload(&self, conn: &mut Connection) -> Result<(), ReloadError> {
        let previous = self.plugins.load_full();
        let loaded = loader::reload_dir(&self.sandbox, &self.dir, &previous)
            .await
            .map_err(ReloadError::Dir)?;
        for rejected in &loaded.rejected {
            self.metrics.emit(PluginRejected { error: rejected });
        }
        for (path, serving) in &loaded.kept {
            tracing::warn!(path = %path.display(), plugin = %serving, "the file did not load; the previous version keeps serving");
        }
        let before: BTreeSet<String> = previous.by_capability.keys().cloned().collect();
        let after: BTreeSet<String> = loaded.table.by_capability.keys().cloned().collect();
        for capability in after.difference(&before) {
            broker::ensure_group(conn, &keys::capability_stream(capability), &self.group)
                .await
                .map_err(ReloadError::Redis)?;
        }
        log_changes(&previous, &loaded.table);
        let is_new = |plugin: &&Arc<Plugin>| {
            previous
                .plugin(&plugin.manifest.id)
                .is_none_or(|old| !Arc::ptr_eq(old, plugin))
        };
        for plugin in loaded.table.plugins().filter(is_new) {
            self.metrics.emit(PluginLoaded {
                plugin: &plugin.label(),
                path: &plugin.path,
            });
        }
        hooks::worker_hooks(loaded.table.plugins().filter(is_new), true, &self.worker_id).await;
        let capabilities: Vec<String> = after.iter().cloned().collect();
        let table = Arc::new(loaded.table);
        self.plugins.store(table.clone());
        self.changed.notify_waiters();
        let is_gone = |plugin: &&Arc<Plugin>| {
            table
                .plugin(&plugin.manifest.id)
                .is_none_or(|new| !Arc::ptr_eq(new, plugin))
        };
        hooks::worker_hooks(previous.plugins().filter(is_gone), false, &self.worker_id).await;
        if before != after {
            tracing::info!(capabilities = ?capabilities, "serving a new set of capabilities");
            if let Err(error) = self.membership.set_capabilities(conn, capabilities).await {
                // The next heartbeat announces them again.
                tracing::warn!(%error, "cannot update the worker registry now");
            }
        }
        Ok(())
    }
}

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Dir(loader::DirError),
    #[error(transparent)]
    Redis(broker::BrokerError),
}

/// Watches `dir` (not its subdirectories): each event `concerns` keeps,
/// and each watcher error, pokes `changes` (a full channel already says
/// "look again"). Dropping the watcher stops it.
pub(crate) fn watch_dir(
    dir: &Path,
    concerns: impl Fn(&notify::Event) -> bool + Send + 'static,
    changes: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, WatchError> {
    let watched = dir.to_owned();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event) if concerns(&event) => {
                let _ = changes.try_send(());
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(dir = %watched.display(), %error, "watcher error; looking again");
                let _ = changes.try_send(());
            }
        })
        .map_err(|source| WatchError {
            dir: dir.to_owned(),
            source,
        })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            dir: dir.to_owned(),
            source,
        })?;
    Ok(watcher)
}

/// Waits until `changes` has been quiet for `quiet`; false when it closed
/// or `stop` fired.
pub(crate) async fn settle(
    changes: &mut mpsc::Receiver<()>,
    quiet: Duration,
    stop: &CancellationToken,
) -> bool {
    loop {
        tokio::select! {
            more = tokio::time::timeout(quiet, changes.recv()) => match more {
                Ok(Some(())) => continue,
                Ok(None) => return false,
                Err(_quiet) => return true,
            },
            _ = stop.cancelled() => return false,
        }
    }
}

/// Whether a watcher event may change what the directory serves.
fn concerns_plugins(event: &notify::Event) -> bool {
    !matches!(event.kind, EventKind::Access(_))
        && event
            .paths
            .iter()
            .any(|path| path.extension().is_some_and(|ext| ext == "wasm"))
}

/// One log line per plugin version that came, was replaced or went.
fn log_changes(before: &PluginTable, after: &PluginTable) {
    for plugin in after.plugins() {
        match before.plugin(&plugin.manifest.id) {
            Some(old) if Arc::ptr_eq(old, plugin) => {}
            Some(old) => tracing::info!(
                plugin = %plugin.manifest.id,
                from = %old.manifest.version,
                to = %plugin.manifest.version,
                path = %plugin.path.display(),
                "plugin replaced; running tasks finish on the old version"
            ),
            None => tracing::info!(
                plugin = %plugin.label(),
                capabilities = ?plugin.manifest.capabilities,
                path = %plugin.path.display(),
                "plugin loaded"
            ),
        }
    }
    for plugin in before.plugins() {
        if after.plugin(&plugin.manifest.id).is_none() {
            tracing::info!(
                plugin = %plugin.label(),
                capabilities = ?plugin.manifest.capabilities,
                "plugin removed; its pending entries are left for other workers"
            );
        }
    }
}
