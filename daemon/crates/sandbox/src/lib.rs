//! The sandbox: WebAssembly agents as components, each task in a fresh
//! store with its own memory cap, deadline, workspace and outbound-host
//! policy.
//!
//! It owns the engine and everything a plugin is made of — the WIT
//! bindings (`bindings`, one `bindgen!`), the host functions ([`host`],
//! one file per WIT interface), loading and checking a plugin directory
//! ([`loader`]), the compile cache, per-plugin policies ([`policy`],
//! `[plugins]` in [`config`]), lifecycle hooks ([`hooks`]) — and nothing of
//! Redis: what a task's host calls need from outside (its events, other
//! agents, the user, the registry, history) goes through the [`TaskPort`]
//! the daemon gives each task.
//!
//! ```text
//! Sandbox::load(file) ──▶ Plugin (compiled, linked, manifest checked)
//! Plugin::handle(TaskHost, command) ──▶ fresh Store ──▶ guest `handle`
//!        host calls ──▶ TaskContext.port: TaskPort (the daemon)
//! ```

mod bindings;
mod cache;
pub mod clock;
pub mod config;
pub mod cpu;
mod engine;
pub mod hooks;
pub mod host;
pub mod loader;
mod outbound;
pub mod output;
mod plugin;
pub mod policy;
pub mod port;
pub mod random;
mod wasi;

pub use bindings::GuestError;
pub use clock::TaskClocks;
pub use config::{PluginPolicy, PluginsConfig};
pub use cpu::CpuMeter;
pub use engine::{EPOCH_TICK, PluginError, Sandbox};
pub use hooks::{Hook, HookCall, HookCounts, HookOutcome, HookSet, HookStats};
pub use host::{CancelSignal, GuestMemory, MAX_TOOL_DEPTH, TaskContext, TaskHost};
pub use loader::PluginTable;
pub use outbound::OutboundHosts;
pub use output::{OutputBudget, OutputLimits};
pub use plugin::{CallError, FileDigest, Manifest, Plugin, PromptSpec, ToolSpec, file_digest};
pub use policy::{Limits, Policies, Policy};
pub use port::{AgentCall, HostImport, PortFuture, Stopping, TaskPort};
pub use random::TaskRandom;
pub use wasi::{GUEST_PRIVATE_DIR, GUEST_PUBLIC_DIR, TaskDirs};
