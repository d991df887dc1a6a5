//! `[plugins]` of the daemon's configuration and its `[plugins.<id>]`
//! tables: where plugins come from and what their tasks get.

use crate::outbound::OutboundHosts;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// `[plugins]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Directory of `*.wasm` plugin components.
    pub dir: PathBuf,
    /// Memory cap of one task's sandbox, MiB.
    pub memory_limit_mb: u64,
    /// Wall-clock deadline of one task, host calls included, seconds.
    pub deadline_s: u64,
    /// CPU time one task's code may use (its handler's, its host calls'
    /// and the tools it calls), ms; waiting for agents, the user or the
    /// network costs none. Past it the task fails. 0: no limit but the
    /// deadline.
    pub cpu_ms: u64,
    /// Largest event one emit may produce, bytes of JSON.
    pub max_event_bytes: usize,
    /// Events one task may emit per second, after a burst of as many: past
    /// it the guest waits in its emit call (nothing is dropped), so a
    /// plugin emitting in a loop cannot crowd Redis and its neighbours.
    pub max_events_per_s: u32,
    /// Largest result a handler may return, bytes of JSON: it is copied into
    /// the terminal event and the caller's RESUME. Tool arguments and tool
    /// results are held to it too.
    pub max_result_bytes: usize,
    /// Lines per second one task's guest may write to the daemon's log
    /// (stdout, stderr, `runtime.log`); the rest is dropped and counted.
    pub guest_log_lines_per_s: u32,
    /// Bytes one task's guest may write to the daemon's log in all.
    pub guest_log_bytes: u64,
    /// Watch `dir` and load, replace and drop plugins while serving.
    pub watch: bool,
    /// Quiet time after the last change in `dir` before it is reloaded, ms.
    pub reload_debounce_ms: u64,
    /// Keep compiled plugins on disk across restarts and reloads.
    pub compile_cache: bool,
    /// Where; unset: `$XDG_CACHE_HOME/gatewayd/compiled` or
    /// `$HOME/.cache/gatewayd/compiled`.
    pub compile_cache_dir: Option<PathBuf>,
    /// Most tasks of one plugin at once; 0: only `worker.max_concurrency`.
    pub max_concurrency: usize,
    /// Where plugins may send HTTP requests (`wasi:http`); empty: nowhere.
    pub allowed_outbound_hosts: Vec<String>,
    /// Host directories every plugin sees read-only: guest path → host path.
    pub read_only_dirs: std::collections::BTreeMap<String, PathBuf>,
    /// Budget of one lifecycle hook call (a plugin's `on-task-start`, ...), ms.
    pub hook_timeout_ms: u64,
    /// Threads running plugin code, apart from the daemon's own so a busy
    /// guest never holds up Redis; 0: one per CPU (a guest computing for
    /// its whole deadline then holds one of them, not all).
    pub guest_threads: usize,
    /// `[plugins.<id>]` tables: what one plugin gets instead of the above.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub policy: std::collections::BTreeMap<String, PluginPolicy>,
}

/// `[plugins.<id>]`: one plugin's limits and settings; an absent key falls
/// back to `[plugins]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginPolicy {
    /// Memory cap of one of its tasks, MiB.
    pub memory_limit_mb: Option<u64>,
    /// Deadline of one of its tasks, seconds.
    pub deadline_s: Option<u64>,
    /// CPU time one of its tasks may use, ms (0: no limit).
    pub cpu_ms: Option<u64>,
    /// Most of its tasks at once.
    pub max_concurrency: Option<usize>,
    /// Where it may send HTTP requests, instead of `[plugins]`'s list.
    pub allowed_outbound_hosts: Option<Vec<String>>,
    /// Read-only directories (guest path → host path), instead of
    /// `[plugins]`'s.
    pub read_only_dirs: Option<std::collections::BTreeMap<String, PathBuf>>,
    /// Budget of one of its lifecycle hook calls, ms.
    pub hook_timeout_ms: Option<u64>,
    /// Events one of its tasks may emit per second.
    pub max_events_per_s: Option<u32>,
    /// Values the plugin reads with `get-config(key)` (API keys, endpoints).
    /// Never logged.
    pub config: std::collections::BTreeMap<String, String>,
    /// Pins the plugin to one file: the hex SHA-256 of the only `.wasm`
    /// that may load under this id (`sha256sum plugin.wasm`); any other is
    /// refused with both digests named. Checked when a file is loaded.
    pub sha256: Option<String>,
    /// Plugin ids whose tasks may call this plugin's tools (a tool runs
    /// with this plugin's policy, its outbound hosts included). Unset: any
    /// plugin; `[]`: only its own tasks.
    pub tool_callers: Option<Vec<String>>,
}

impl PluginsConfig {
    /// `memory_limit_mb` in bytes.
    pub fn memory_limit_bytes(&self) -> usize {
        usize::try_from(self.memory_limit_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// The limits every store gets: the pool's memory slots are sized for
    /// the largest cap any plugin may get.
    pub fn limits(&self) -> crate::Limits {
        crate::Limits {
            memory_bytes: self.largest_memory_limit_bytes(),
            deadline: self.deadline(),
            max_event_bytes: self.max_event_bytes,
            max_tool_bytes: self.max_result_bytes,
            guest_log: crate::OutputLimits {
                lines_per_s: self.guest_log_lines_per_s,
                bytes: self.guest_log_bytes,
            },
            memory_budget_bytes: 0,
            guest_threads: 0,
        }
    }

    /// `deadline_s`.
    pub fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_s)
    }

    /// The memory cap of the plugin `id`'s tasks, bytes.
    pub fn memory_limit_bytes_of(&self, id: &str) -> usize {
        let mb = self
            .policy
            .get(id)
            .and_then(|p| p.memory_limit_mb)
            .unwrap_or(self.memory_limit_mb);
        usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// The largest memory cap any plugin may get: sizes the instance pool.
    pub fn largest_memory_limit_bytes(&self) -> usize {
        self.policy
            .keys()
            .map(|id| self.memory_limit_bytes_of(id))
            .chain([self.memory_limit_bytes()])
            .max()
            .unwrap_or_else(|| self.memory_limit_bytes())
    }

    /// The deadline of the plugin `id`'s tasks.
    pub fn deadline_of(&self, id: &str) -> Duration {
        Duration::from_secs(
            self.policy
                .get(id)
                .and_then(|p| p.deadline_s)
                .unwrap_or(self.deadline_s),
        )
    }

    /// Most tasks of the plugin `id` at once, if limited.
    pub fn max_concurrency_of(&self, id: &str) -> Option<usize> {
        let limit = self
            .policy
            .get(id)
            .and_then(|p| p.max_concurrency)
            .unwrap_or(self.max_concurrency);
        (limit > 0).then_some(limit)
    }

    /// The compile cache directory in use, if any.
    pub fn compile_cache_path(&self) -> Option<PathBuf> {
        if !self.compile_cache {
            return None;
        }
        if let Some(dir) = &self.compile_cache_dir {
            return Some(dir.clone());
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|home| PathBuf::from(home).join(".cache"))
            })?;
        Some(base.join("gatewayd").join("compiled"))
    }
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            dir: PathBuf::from("plugins"),
            memory_limit_mb: 128,
            deadline_s: 300,
            cpu_ms: 0,
            max_event_bytes: 1 << 20,
            max_events_per_s: 1000,
            max_result_bytes: 1 << 20,
            guest_log_lines_per_s: 100,
            guest_log_bytes: 1 << 20,
            watch: true,
            reload_debounce_ms: 200,
            compile_cache: true,
            compile_cache_dir: None,
            max_concurrency: 0,
            allowed_outbound_hosts: Vec::new(),
            read_only_dirs: std::collections::BTreeMap::new(),
            hook_timeout_ms: 5000,
            guest_threads: 0,
            policy: std::collections::BTreeMap::new(),
        }
    }
}

impl PluginsConfig {
    /// Checks the rules of `[plugins]` and every `[plugins.<id>]`:
    /// `check(ok, key, message)` is called for each rule with the dotted key
    /// it is about (the daemon's configuration collects every failed one).
    pub fn validate(&self, check: &mut impl FnMut(bool, &str, &str)) {
        let p = self;
        check(
            (1..=4096).contains(&p.memory_limit_mb),
            "plugins.memory_limit_mb",
            "must be between 1 and 4096",
        );
        check(
            p.deadline_s >= 1,
            "plugins.deadline_s",
            "must be at least 1",
        );
        check(
            p.guest_threads <= 1024,
            "plugins.guest_threads",
            "must be at most 1024 (0: one per CPU)",
        );
        check(
            (1..=600_000).contains(&p.hook_timeout_ms),
            "plugins.hook_timeout_ms",
            "must be between 1 and 600000",
        );
        check(
            p.max_event_bytes >= 1024,
            "plugins.max_event_bytes",
            "must be at least 1024",
        );
        check(
            p.max_result_bytes >= 1024,
            "plugins.max_result_bytes",
            "must be at least 1024",
        );
        check(
            (1..=1_000_000).contains(&p.max_events_per_s),
            "plugins.max_events_per_s",
            "must be between 1 and 1000000",
        );
        check(
            (1..=100_000).contains(&p.guest_log_lines_per_s),
            "plugins.guest_log_lines_per_s",
            "must be between 1 and 100000",
        );
        check(
            p.guest_log_bytes >= 1024,
            "plugins.guest_log_bytes",
            "must be at least 1024",
        );
        if let Err(why) = OutboundHosts::parse(&p.allowed_outbound_hosts) {
            check(false, "plugins.allowed_outbound_hosts", &why);
        }
        let mut read_only = vec![("plugins.read_only_dirs".to_owned(), &p.read_only_dirs)];
        for (id, policy) in &p.policy {
            if let Some(dirs) = &policy.read_only_dirs {
                read_only.push((format!("plugins.{id}.read_only_dirs"), dirs));
            }
        }
        for (key, dirs) in read_only {
            for (guest, host) in dirs {
                let under_workspace = guest == "/workspace" || guest.starts_with("/workspace/");
                check(
                    guest.starts_with('/') && guest.len() > 1 && !under_workspace,
                    &format!("{key}.{guest:?}"),
                    "the guest path must be absolute, not / and not under /workspace",
                );
                check(
                    host.is_dir(),
                    &format!("{key}.{guest:?}"),
                    &format!("{} is not a directory", host.display()),
                );
            }
        }
        for (id, policy) in &p.policy {
            if let Some(Err(why)) = policy
                .allowed_outbound_hosts
                .as_deref()
                .map(OutboundHosts::parse)
            {
                check(false, &format!("plugins.{id}.allowed_outbound_hosts"), &why);
            }
            check(
                policy
                    .memory_limit_mb
                    .is_none_or(|mb| (1..=4096).contains(&mb)),
                &format!("plugins.{id}.memory_limit_mb"),
                "must be between 1 and 4096",
            );
            check(
                policy.deadline_s != Some(0),
                &format!("plugins.{id}.deadline_s"),
                "must be at least 1",
            );
            check(
                policy
                    .max_events_per_s
                    .is_none_or(|n| (1..=1_000_000).contains(&n)),
                &format!("plugins.{id}.max_events_per_s"),
                "must be between 1 and 1000000",
            );
            check(
                policy
                    .hook_timeout_ms
                    .is_none_or(|ms| (1..=600_000).contains(&ms)),
                &format!("plugins.{id}.hook_timeout_ms"),
                "must be between 1 and 600000",
            );
            check(
                policy.sha256.as_deref().is_none_or(|hex| {
                    hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit())
                }),
                &format!("plugins.{id}.sha256"),
                "must be 64 hex digits (the output of sha256sum)",
            );
            check(
                policy.max_concurrency != Some(0),
                &format!("plugins.{id}.max_concurrency"),
                "must be at least 1 (leave it out for no limit of its own)",
            );
        }
        check(
            (10..=60_000).contains(&p.reload_debounce_ms),
            "plugins.reload_debounce_ms",
            "must be between 10 and 60000",
        );
        check(
            !p.dir.as_os_str().is_empty(),
            "plugins.dir",
            "must not be empty",
        );
    }
}
