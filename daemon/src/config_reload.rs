//! Configuration reload: watches the configuration file (and takes SIGHUP),
//! reads it again with the same environment and flags, and applies what can
//! change while serving — the plugins' policies, `[plugins]` limits and
//! `[plugins.<id>]` tables — to the loaded plugins. Tasks already running
//! keep the policy they started with. Keys that take effect only at a
//! restart are named in the log; a file that does not load or validate
//! changes nothing. Values are never logged (they hold API keys).

use crate::config::{Config, PluginsConfig, Source};
use crate::metrics::{ConfigApplied, ConfigRejected};
use crate::reload::{WatchError, settle, watch_dir};
use arc_swap::ArcSwap;
use byclaw_sandbox::loader::PluginTable;
use byclaw_sandbox::{Policies, Sandbox};
use notify::EventKind;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a configuration reload reads and changes.
pub struct ConfigReloader {
    /// Where the running configuration came from.
    pub source: Source,
    /// The configuration in effect: what a new file is compared with.
    pub current: Config,
    /// Holds the policies and hands them to plugins loaded later.
    pub sandbox: Arc<Sandbox>,
    /// The plugins serving now, which get the new policies.
    pub plugins: Arc<ArcSwap<PluginTable>>,
    /// Quiet time after the last change before the file is read (an editor
    /// writes in several steps).
    pub debounce: Duration,
    /// Counts reloads applied and rejected.
    pub stats: Arc<crate::Stats>,
}

impl ConfigReloader {
    /// Starts watching the file's directory (editors replace the file by
    /// renaming) and listening for SIGHUP; the returned future applies
    /// changes until `stop`.
    pub fn watch(
        self,
        stop: CancellationToken,
    ) -> Result<impl std::future::Future<Output = ()>, WatchError> {
        // Capacity 1: a pending "read it again" covers any number of changes.
        let (tx, rx) = mpsc::channel::<()>(1);
        let file = self.source.file.clone();
        let dir = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => std::path::PathBuf::from("."),
        };
        let name = file.file_name().map(|name| name.to_owned());
        let concerns_file = move |event: &notify::Event| {
            !matches!(event.kind, EventKind::Access(_))
                && event
                    .paths
                    .iter()
                    .any(|path| path.file_name() == name.as_deref())
        };
        let watcher = watch_dir(&dir, concerns_file, tx.clone())?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        Ok(async move {
            let _watcher = watcher;
            self.run(rx, tx, hangup.ok(), stop).await;
        })
    }

    async fn run(
        mut self,
        mut changes: mpsc::Receiver<()>,
        poke: mpsc::Sender<()>,
        mut hangup: Option<tokio::signal::unix::Signal>,
        stop: CancellationToken,
    ) {
        tracing::info!(file = %self.source.file.display(), "watching the configuration file (and SIGHUP) for policy changes");
        loop {
            tokio::select! {
                change = changes.recv() => if change.is_none() { return },
                Some(()) = async { match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                } } => { let _ = poke.try_send(()); continue; }
                _ = stop.cancelled() => return,
            }
            if !settle(&mut changes, self.debounce, &stop).await {
                return;
            }
            self.reload();
        }
    }

    /// Reads the file again and applies what changed.
    fn reload(&mut self) {
        let fresh = match self.source.load() {
            Ok(fresh) => fresh,
            Err(errors) => {
                self.stats.metrics.emit(ConfigRejected {
                    file: &self.source.file,
                    errors: &errors,
                });
                return;
            }
        };
        let mut changed = Vec::new();
        changed_keys(
            &serde_json::to_value(&self.current).expect("config serializes"),
            &serde_json::to_value(&fresh).expect("config serializes"),
            String::new(),
            &mut changed,
        );
        let (live, at_restart): (Vec<String>, Vec<String>) =
            changed.into_iter().partition(|key| is_live(key));
        if !live.is_empty() {
            let plugins = self.plugins.load_full();
            self.sandbox
                .apply_policies(Policies::from_config(&fresh.plugins), plugins.plugins());
            let pool = self.sandbox.limits().memory_bytes;
            if fresh.plugins.largest_memory_limit_bytes() > pool {
                tracing::warn!(
                    pool_mb = pool >> 20,
                    "a memory cap above the instance pool's slot size (the largest cap at start) is held to it until a restart"
                );
            }
            self.current.plugins = keep_restart_only(&self.current.plugins, fresh.plugins);
        }
        self.stats.metrics.emit(ConfigApplied {
            live: &live,
            at_restart: &at_restart,
        });
    }
}

/// `fresh`'s policy keys with `running`'s restart-only ones.
fn keep_restart_only(running: &PluginsConfig, fresh: PluginsConfig) -> PluginsConfig {
    PluginsConfig {
        dir: running.dir.clone(),
        watch: running.watch,
        reload_debounce_ms: running.reload_debounce_ms,
        compile_cache: running.compile_cache,
        compile_cache_dir: running.compile_cache_dir.clone(),
        max_event_bytes: running.max_event_bytes,
        max_result_bytes: running.max_result_bytes,
        guest_log_lines_per_s: running.guest_log_lines_per_s,
        guest_log_bytes: running.guest_log_bytes,
        ..fresh
    }
}

/// Whether a changed key applies without a restart.
fn is_live(key: &str) -> bool {
    const LIVE: &[&str] = &[
        "plugins.memory_limit_mb",
        "plugins.deadline_s",
        "plugins.max_concurrency",
        "plugins.allowed_outbound_hosts",
        "plugins.read_only_dirs",
        "plugins.hook_timeout_ms",
        "plugins.max_events_per_s",
        "plugins.cpu_ms",
    ];
    LIVE.iter()
        .any(|live| key == *live || key.starts_with(&format!("{live}.")))
        || !is_daemon_wide(key)
}

/// Whether a key is outside the `[plugins.<id>]` tables (those are all
/// live): of `[plugins]` itself, or of another table.
fn is_daemon_wide(key: &str) -> bool {
    const PLUGINS_KEYS: &[&str] = &[
        "dir",
        "memory_limit_mb",
        "deadline_s",
        "cpu_ms",
        "max_event_bytes",
        "max_events_per_s",
        "max_result_bytes",
        "guest_log_lines_per_s",
        "guest_log_bytes",
        "watch",
        "reload_debounce_ms",
        "compile_cache",
        "compile_cache_dir",
        "max_concurrency",
        "allowed_outbound_hosts",
        "read_only_dirs",
        "hook_timeout_ms",
    ];
    match key.strip_prefix("plugins.") {
        Some(rest) => PLUGINS_KEYS
            .iter()
            .any(|own| rest == *own || rest.starts_with(&format!("{own}."))),
        None => true,
    }
}

/// Dotted paths (as written in TOML: `plugins.<id>.key`) of the leaves that
/// differ between two serialized configurations.
fn changed_keys(before: &Value, after: &Value, at: String, out: &mut Vec<String>) {
    // An empty table is left out when serialized.
    let empty = Value::Object(Default::default());
    let (before, after) = match (before, after) {
        (Value::Null, Value::Object(_)) => (&empty, after),
        (Value::Object(_), Value::Null) => (before, &empty),
        _ => (before, after),
    };
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                // `[plugins.<id>]` tables are the `policy` map.
                let path = match (at.as_str(), key.as_str()) {
                    ("plugins", "policy") => "plugins".to_owned(),
                    ("", _) => key.clone(),
                    _ => format!("{at}.{key}"),
                };
                changed_keys(
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    path,
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(at),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(edit: impl FnOnce(&mut Config)) -> Vec<String> {
        let before = Config::default();
        let mut after = before.clone();
        edit(&mut after);
        let mut out = Vec::new();
        changed_keys(
            &serde_json::to_value(&before).unwrap(),
            &serde_json::to_value(&after).unwrap(),
            String::new(),
            &mut out,
        );
        out
    }

    #[test]
    fn changed_keys_are_named_as_in_toml_and_sorted_into_live_and_restart() {
        let changed = changes(|c| {
            c.plugins.deadline_s = 9;
            c.plugins.dir = "elsewhere".into();
            c.worker.max_concurrency = 3;
            let policy = c.plugins.policy.entry("tools".into()).or_default();
            policy.max_concurrency = Some(2);
            policy.config.insert("api_key".into(), "secret".into());
        });
        assert_eq!(
            changed,
            [
                "plugins.deadline_s",
                "plugins.dir",
                "plugins.tools.config.api_key",
                "plugins.tools.max_concurrency",
                "worker.max_concurrency"
            ]
        );
        let live: Vec<_> = changed.iter().filter(|k| is_live(k)).collect();
        assert_eq!(
            live,
            [
                "plugins.deadline_s",
                "plugins.tools.config.api_key",
                "plugins.tools.max_concurrency"
            ]
        );
        // An empty table changes nothing.
        assert!(
            changes(|c| {
                c.plugins.policy.entry("tools".into()).or_default();
            })
            .is_empty()
        );
    }
}
