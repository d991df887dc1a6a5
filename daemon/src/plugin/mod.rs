//! WebAssembly side of the daemon: the engine and its limits, compiled
//! plugins, and running one call of a plugin in a fresh sandbox.
//!
//! A plugin is compiled once per file version into an `AgentPre` (imports
//! resolved, ready to instantiate). Each task gets a new `Store` — its own
//! memory cap, epoch deadline, WASI context with only its two workspace
//! directories — and a new instance from the pooling allocator; nothing of one
//! task is visible to the next.

mod bindings;
pub mod hooks;
pub mod host;
pub mod loader;
mod outbound;
mod sandbox;

pub use outbound::OutboundHosts;

pub use bindings::GuestError;
pub use hooks::{Hook, HookCall, HookCounts, HookOutcome, HookSet, HookStats};

use bindings::{Command, Header, Workspace};
use byclaw_protocol::{Action, ControlCommand};
pub use host::{AwaitedChild, CancelSignal, Services, TaskHost, TaskShared};
pub use sandbox::{GUEST_PRIVATE_DIR, GUEST_PUBLIC_DIR, TaskDirs};

use bindings::{AgentPre, AgentWithHooks};
use host::TaskState;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

/// How often the epoch advances; a CPU-bound guest yields to the scheduler at
/// this interval, so deadlines and cancels take effect within about this long.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Limits applied to every store.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Cap on the sum of a store's linear memories, bytes.
    pub memory_bytes: usize,
    /// Wall-clock budget of one task, host calls included.
    pub deadline: Duration,
    /// Largest event a guest may emit, bytes of JSON.
    pub max_event_bytes: usize,
}

/// What the tasks of one plugin get (`[plugins.<id>]`, else `[plugins]`).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Memory cap of one of its stores, bytes.
    pub memory_bytes: usize,
    /// Wall-clock budget of one of its tasks.
    pub deadline: Duration,
    /// Bounds its tasks in progress; shared by every version of the plugin.
    pub concurrency: Option<Arc<tokio::sync::Semaphore>>,
    /// What `get-config(key)` answers.
    pub config: Arc<std::collections::BTreeMap<String, String>>,
    /// Where its HTTP requests may go.
    pub outbound: Arc<OutboundHosts>,
    /// Host directories it sees read-only: (host path, guest path).
    pub read_only_dirs: Arc<[(PathBuf, String)]>,
    /// Budget of one lifecycle hook call.
    pub hook_timeout: Duration,
}

/// Resolves the policy of each plugin id.
#[derive(Debug)]
pub struct Policies {
    /// `[plugins]`: most tasks of one plugin (0: no limit of its own).
    default_concurrency: usize,
    /// `[plugins] memory_limit_mb`; `None`: the sandbox's limit.
    default_memory_bytes: Option<usize>,
    /// `[plugins.<id>]` tables.
    by_id: std::collections::BTreeMap<String, crate::config::PluginPolicy>,
    /// `[plugins] allowed_outbound_hosts`.
    default_outbound: Vec<String>,
    /// `[plugins] read_only_dirs`.
    default_read_only: std::collections::BTreeMap<String, PathBuf>,
    /// `[plugins] hook_timeout_ms`.
    default_hook_timeout: Duration,
    /// `[plugins] deadline_s`; `None`: the sandbox's deadline.
    default_deadline: Option<Duration>,
    /// One semaphore per id with the limit it was made for, kept across
    /// versions of the plugin and across configuration reloads (a new
    /// limit gets a new semaphore; tasks holding the old one finish).
    semaphores: Arc<std::sync::Mutex<std::collections::HashMap<String, ConcurrencyLimit>>>,
}

/// A plugin's concurrency limit and the semaphore enforcing it.
#[derive(Debug)]
struct ConcurrencyLimit {
    limit: usize,
    semaphore: Arc<tokio::sync::Semaphore>,
}

impl Default for Policies {
    /// `[plugins]`'s defaults, without `[plugins.<id>]` tables; memory
    /// capped by the sandbox's limit only.
    fn default() -> Self {
        Policies {
            default_memory_bytes: None,
            default_deadline: None,
            ..Policies::from_config(&crate::config::PluginsConfig::default())
        }
    }
}

impl Policies {
    /// From the `[plugins]` configuration.
    pub fn from_config(config: &crate::config::PluginsConfig) -> Self {
        Policies {
            default_concurrency: config.max_concurrency,
            default_memory_bytes: Some(config.memory_limit_bytes()),
            default_outbound: config.allowed_outbound_hosts.clone(),
            default_read_only: config.read_only_dirs.clone(),
            default_hook_timeout: Duration::from_millis(config.hook_timeout_ms),
            default_deadline: Some(config.deadline()),
            by_id: config.policy.clone(),
            semaphores: Default::default(),
        }
    }

    /// These policies, replacing `previous`: plugins whose concurrency
    /// limit stays keep their semaphore (and the tasks holding it count).
    pub fn succeeding(mut self, previous: &Policies) -> Self {
        self.semaphores = previous.semaphores.clone();
        self
    }

    fn resolve(&self, id: &str, limits: &Limits) -> Policy {
        let own = self.by_id.get(id);
        let memory_bytes = own
            .and_then(|p| p.memory_limit_mb)
            .map_or(
                self.default_memory_bytes.unwrap_or(limits.memory_bytes),
                |mb| usize::try_from(mb << 20).unwrap_or(usize::MAX),
            )
            // The pool was sized for the largest cap configured at start.
            .min(limits.memory_bytes);
        let deadline = own.and_then(|p| p.deadline_s).map_or(
            self.default_deadline.unwrap_or(limits.deadline),
            Duration::from_secs,
        );
        let limit = own
            .and_then(|p| p.max_concurrency)
            .unwrap_or(self.default_concurrency);
        let concurrency = (limit > 0).then(|| {
            let mut semaphores = self
                .semaphores
                .lock()
                .expect("semaphores lock is never poisoned");
            let entry = semaphores
                .entry(id.to_owned())
                .or_insert_with(|| ConcurrencyLimit {
                    limit,
                    semaphore: Arc::new(tokio::sync::Semaphore::new(limit)),
                });
            if entry.limit != limit {
                *entry = ConcurrencyLimit {
                    limit,
                    semaphore: Arc::new(tokio::sync::Semaphore::new(limit)),
                };
            }
            entry.semaphore.clone()
        });
        let patterns = own
            .and_then(|p| p.allowed_outbound_hosts.as_deref())
            .unwrap_or(&self.default_outbound);
        // Checked when the configuration was loaded; a bad list denies all.
        let outbound = OutboundHosts::parse(patterns).unwrap_or_default();
        let read_only_dirs = own
            .and_then(|p| p.read_only_dirs.as_ref())
            .unwrap_or(&self.default_read_only)
            .iter()
            .map(|(guest, host)| (host.clone(), guest.clone()))
            .collect();
        let hook_timeout = own
            .and_then(|p| p.hook_timeout_ms)
            .map_or(self.default_hook_timeout, Duration::from_millis);
        Policy {
            read_only_dirs,
            hook_timeout,
            outbound: Arc::new(outbound),
            memory_bytes,
            deadline,
            concurrency,
            config: Arc::new(own.map(|p| p.config.clone()).unwrap_or_default()),
        }
    }
}

/// Why the engine could not be set up or a plugin not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot configure the WebAssembly engine: {0}")]
    Engine(String),
    #[error("{path}: not a valid component: {reason}")]
    Compile { path: PathBuf, reason: String },
    #[error("{path}: does not fit the byclaw:gateway agent world: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("{path}: manifest() failed: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("{path}: invalid manifest: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },
}

/// The engine, the linker with all host functions, and the limits; shared by
/// every plugin and task.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<TaskState>,
    limits: Limits,
    /// Stops the epoch ticker thread when the sandbox is dropped.
    ticker_stop: Arc<AtomicBool>,
    /// Runs guest code, apart from the runtime that does the daemon's I/O: a
    /// CPU-bound guest only yields every epoch tick, and on a shared runtime
    /// a few of them would delay every Redis reply by whole ticks.
    guests: Option<tokio::runtime::Runtime>,
    /// Where compiled plugins are kept across restarts; `None` compiles
    /// every time.
    cache: Option<Arc<CompileCache>>,
    /// Per-plugin limits and settings; replaced when the configuration is
    /// reloaded.
    policies: arc_swap::ArcSwap<Policies>,
    /// How the plugins' lifecycle hooks went.
    hook_stats: Arc<HookStats>,
}

/// Compiled plugins on disk, keyed by the file's contents and the engine's
/// compatibility hash: a restart or a reload of an unchanged big component
/// (a Python or JavaScript one takes seconds to compile) loads in
/// milliseconds.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// Part of every key: artifacts of another wasmtime build or engine
    /// configuration are never looked at.
    engine_hash: u64,
}

impl CompileCache {
    /// Opens (creating it, mode 0700) a cache directory. Precompiled code is
    /// loaded without validation, so a directory that others can write is
    /// refused.
    fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create it: {e}"))?;
        let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
        let probe = dir.join(format!(".owner-probe-{}", std::process::id()));
        std::fs::write(&probe, b"").map_err(|e| format!("cannot write to it: {e}"))?;
        let own_uid = std::fs::metadata(&probe).map(|m| m.uid());
        let _ = std::fs::remove_file(&probe);
        if own_uid.map_err(|e| e.to_string())? != meta.uid() {
            return Err("it belongs to another user".into());
        }
        if meta.mode() & 0o022 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("it is writable by others and cannot be fixed: {e}"))?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompileCache {
            dir: dir.to_owned(),
            engine_hash: hasher.finish(),
        })
    }

    fn file_for(&self, bytes: &[u8]) -> PathBuf {
        self.dir.join(format!(
            "{:016x}-{}-{:016x}.cwasm",
            file_digest(bytes),
            bytes.len(),
            self.engine_hash
        ))
    }

    /// Compiles `bytes`, or loads the artifact compiled from the same bytes
    /// by the same engine earlier. Blocking. True when it came from the cache.
    fn compile(
        cache: Option<&Self>,
        engine: &Engine,
        bytes: &[u8],
    ) -> wasmtime::Result<(Component, bool)> {
        let Some(cache) = cache else {
            return Ok((Component::new(engine, bytes)?, false));
        };
        let file = cache.file_for(bytes);
        // Read into memory rather than mapped: a file changed in place under
        // a mapping would crash the daemon (SIGBUS).
        if let Ok(artifact) = std::fs::read(&file) {
            // SAFETY: the artifact was written by this program into a
            // directory only this user can write (checked in `open`), under
            // a name that binds it to these exact bytes and this engine's
            // compatibility hash; wasmtime checks the compatibility header
            // again.
            match unsafe { Component::deserialize(engine, &artifact) } {
                Ok(component) => return Ok((component, true)),
                Err(error) => {
                    tracing::warn!(file = %file.display(), error = %format!("{error:#}"), "unusable compiled plugin in the cache; compiling again");
                    let _ = std::fs::remove_file(&file);
                }
            }
        }
        let component = Component::new(engine, bytes)?;
        let stored = component
            .serialize()
            .map_err(|e| e.to_string())
            .and_then(|artifact| {
                let tmp = file.with_extension(format!(
                    "tmp-{}-{:016x}",
                    std::process::id(),
                    fastrand::u64(..)
                ));
                std::fs::write(&tmp, artifact)
                    .and_then(|()| std::fs::rename(&tmp, &file))
                    .map_err(|e| {
                        let _ = std::fs::remove_file(&tmp);
                        e.to_string()
                    })
            });
        if let Err(error) = stored {
            tracing::warn!(dir = %cache.dir.display(), %error, "cannot store the compiled plugin");
        }
        Ok((component, false))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(guests) = self.guests.take() {
            // Dropped from async code: must not block.
            guests.shutdown_background();
        }
    }
}

impl Sandbox {
    /// Builds the engine. `max_concurrent_tasks` sizes the instance pool.
    pub fn new(limits: Limits, max_concurrent_tasks: usize) -> Result<Arc<Self>, PluginError> {
        Self::with_compile_cache(limits, max_concurrent_tasks, None)
    }

    /// Like [`Sandbox::new`], keeping compiled plugins in `cache_dir`. A
    /// directory that cannot be used is logged and compiling goes on without.
    pub fn with_compile_cache(
        limits: Limits,
        max_concurrent_tasks: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Arc<Self>, PluginError> {
        Self::with_options(
            limits,
            max_concurrent_tasks,
            cache_dir,
            Policies::default(),
            Arc::default(),
        )
    }

    /// The full constructor: `limits.memory_bytes` must be the largest cap
    /// any policy gives (it sizes the pool's memory slots); hook calls are
    /// counted in `hook_stats`.
    pub fn with_options(
        limits: Limits,
        max_concurrent_tasks: usize,
        cache_dir: Option<&Path>,
        policies: Policies,
        hook_stats: Arc<HookStats>,
    ) -> Result<Arc<Self>, PluginError> {
        let engine_error = |e: wasmtime::Error| PluginError::Engine(format!("{e:#}"));
        // Each task may hold a nested tool-call instance; a few spare slots
        // serve plugin loading.
        let slots = u32::try_from(max_concurrent_tasks.saturating_mul(2).saturating_add(16))
            .unwrap_or(u32::MAX / 64);
        let mut pool = wasmtime::PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(16))
            .total_memories(slots.saturating_mul(4))
            .total_tables(slots.saturating_mul(16))
            .total_stacks(slots)
            .max_memory_size(limits.memory_bytes)
            .max_tables_per_module(4)
            .table_elements(100_000)
            // Reset small memories and tables with memset instead of
            // madvise, and batch the remaining decommits: per-task madvise
            // calls and their TLB shootdowns dominated the profile.
            .linear_memory_keep_resident(4 << 20)
            .table_keep_resident(256 << 10)
            .decommit_batch_size(32)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        // 4 GiB reservations let Cranelift drop bounds checks, but the pool
        // reserves one per memory slot; past ~32 TiB of address space fall
        // back to reserving just the cap.
        let four_gib = 4u64 << 30;
        if u64::from(slots) * 4 * four_gib > (32u64 << 40) {
            config.memory_reservation(limits.memory_bytes as u64);
        }
        let engine = Engine::new(&config).map_err(engine_error)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_error)?;
        // Linked for every plugin (JavaScript components import it even
        // when they never use it); requests are denied unless allowed.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_error)?;
        AgentWithHooks::add_to_linker::<_, HasSelf<TaskState>>(&mut linker, |state| state)
            .map_err(engine_error)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.weak();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match ticker_engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        let guests = tokio::runtime::Builder::new_multi_thread()
            .thread_name("guest")
            .enable_all()
            .build()
            .map_err(|e| PluginError::Engine(format!("cannot start the guest runtime: {e}")))?;
        let cache = cache_dir.and_then(|dir| match CompileCache::open(dir, &engine) {
            Ok(cache) => Some(Arc::new(cache)),
            Err(reason) => {
                tracing::warn!(dir = %dir.display(), %reason, "compile cache disabled");
                None
            }
        });
        Ok(Arc::new(Sandbox {
            engine,
            linker,
            limits,
            ticker_stop,
            guests: Some(guests),
            cache,
            policies: arc_swap::ArcSwap::from_pointee(policies),
            hook_stats,
        }))
    }

    /// The limits every store gets.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How the plugins' lifecycle hooks went.
    pub fn hook_stats(&self) -> &Arc<HookStats> {
        &self.hook_stats
    }

    /// Replaces the policies (a reloaded configuration) and gives each of
    /// `plugins` its new policy; tasks already running keep theirs. Plugins
    /// loaded from now on get the new ones.
    pub fn apply_policies<'a>(
        &self,
        policies: Policies,
        plugins: impl IntoIterator<Item = &'a Arc<Plugin>>,
    ) {
        let policies = Arc::new(policies.succeeding(&self.policies.load()));
        self.policies.store(policies.clone());
        for plugin in plugins {
            let policy = policies.resolve(&plugin.manifest.id, &self.limits);
            plugin.policy.store(Arc::new(policy));
        }
    }

    /// Compiles a component file, links it and reads its manifest.
    pub async fn load(
        self: &Arc<Self>,
        path: PathBuf,
        bytes: &[u8],
    ) -> Result<Plugin, PluginError> {
        let started = std::time::Instant::now();
        let (component, cached) = {
            let engine = self.engine.clone();
            let bytes = bytes.to_vec();
            let cache = self.cache.clone();
            tokio::task::spawn_blocking(move || {
                CompileCache::compile(cache.as_deref(), &engine, &bytes)
            })
            .await
            .map_err(|e| PluginError::Compile {
                path: path.clone(),
                reason: e.to_string(),
            })?
            .map_err(|e| PluginError::Compile {
                path: path.clone(),
                reason: format!("{e:#}"),
            })?
        };
        tracing::debug!(
            path = %path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            from_cache = cached,
            "plugin compiled"
        );
        let instance_pre =
            self.linker
                .instantiate_pre(&component)
                .map_err(|e| PluginError::Link {
                    path: path.clone(),
                    reason: format!("{e:#}"),
                })?;
        let pre = AgentPre::new(instance_pre).map_err(|e| PluginError::Link {
            path: path.clone(),
            reason: format!("{e:#}"),
        })?;
        let (manifest, hooks) =
            self.read_manifest(&pre)
                .await
                .map_err(|reason| PluginError::Manifest {
                    path: path.clone(),
                    reason,
                })?;
        let manifest =
            Manifest::validate(manifest).map_err(|reason| PluginError::InvalidManifest {
                path: path.clone(),
                reason,
            })?;
        let mut validators = std::collections::HashMap::with_capacity(manifest.tools.len());
        for tool in &manifest.tools {
            let validator = jsonschema::validator_for(&tool.input_schema).map_err(|e| {
                PluginError::InvalidManifest {
                    path: path.clone(),
                    reason: format!(
                        "tool {:?}: input-schema is not a usable JSON Schema: {e}",
                        tool.name
                    ),
                }
            })?;
            validators.insert(tool.name.clone(), validator);
        }
        Ok(Plugin {
            policy: arc_swap::ArcSwap::from_pointee(
                self.policies.load().resolve(&manifest.id, &self.limits),
            ),
            stamp: byclaw_protocol::plugin_stamp(&manifest.id, &manifest.version),
            manifest,
            path,
            digest: file_digest(bytes),
            from_cache: cached,
            hooks,
            pre,
            validators,
            sandbox: self.clone(),
        })
    }

    /// Calls `describe`, and `implemented-hooks` when the plugin exports
    /// hooks.
    async fn read_manifest(
        &self,
        pre: &AgentPre<TaskState>,
    ) -> Result<(bindings::Manifest, HookSet), String> {
        let mut store = self.store(TaskState::for_manifest(&self.limits));
        let call = async {
            let instance = pre.instantiate(&mut store).await?;
            // Checks the types of the hooks now rather than at a task's end.
            let hooks = pre
                .hooks(&mut store, &instance)
                .map_err(|e| e.context("its `hooks` export does not match the WIT"))?;
            let manifest = pre
                .handler(&mut store, &instance)?
                .call_describe(&mut store)
                .await?;
            let implemented = match hooks {
                Some(hooks) => HookSet::from_wit(&hooks.call_implemented_hooks(&mut store).await?),
                None => HookSet::default(),
            };
            wasmtime::Result::Ok((manifest, implemented))
        };
        match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(trap)) => Err(describe_trap(&trap, &self.limits)),
            Err(_) => Err("did not return within 10 s".into()),
        }
    }

    fn store(&self, state: TaskState) -> Store<TaskState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }
}

/// What a plugin declares about itself, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub id: String,
    pub version: String,
    pub description: String,
    pub capabilities: Vec<String>,
    pub tools: Vec<ToolSpec>,
    pub prompts: Vec<PromptSpec>,
    /// Whether tasks get a workspace (directories created, preopened).
    pub workspace: bool,
}

/// One tool of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub input_schema: serde_json::Value,
}

/// One prompt template of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PromptSpec {
    pub name: String,
    pub description: String,
    pub template: String,
}

impl Manifest {
    fn validate(raw: bindings::Manifest) -> Result<Manifest, String> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !id_ok(&raw.id) {
            return Err(format!("id {:?} must be 1-64 of [a-z0-9_-]", raw.id));
        }
        if raw.capabilities.is_empty() {
            return Err("capabilities is empty; a plugin serves at least one agent type".into());
        }
        for capability in &raw.capabilities {
            if !byclaw_protocol::is_safe_id(capability) || capability.len() > 128 {
                return Err(format!(
                    "capability {capability:?} must be 1-128 of [A-Za-z0-9._:@-]"
                ));
            }
        }
        let mut capabilities = raw.capabilities.clone();
        capabilities.sort();
        if let Some(pair) = capabilities.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("capability {:?} listed twice", pair[0]));
        }
        let mut tools = Vec::with_capacity(raw.tools.len());
        for tool in raw.tools {
            if tool.name.is_empty() {
                return Err("a tool has an empty name".into());
            }
            if tools.iter().any(|t: &ToolSpec| t.name == tool.name) {
                return Err(format!("tool {:?} listed twice", tool.name));
            }
            let input_schema = serde_json::from_str(&tool.input_schema)
                .map_err(|e| format!("tool {:?}: input-schema is not JSON: {e}", tool.name))?;
            tools.push(ToolSpec {
                name: tool.name,
                description: tool.description,
                input_schema,
            });
        }
        Ok(Manifest {
            id: raw.id,
            version: raw.version,
            description: raw.description,
            capabilities: raw.capabilities,
            tools,
            workspace: raw.workspace,
            prompts: raw
                .prompts
                .into_iter()
                .map(|p| PromptSpec {
                    name: p.name,
                    description: p.description,
                    template: p.template,
                })
                .collect(),
        })
    }
}

/// A compiled, linked plugin, ready to instantiate.
pub struct Plugin {
    pub manifest: Manifest,
    /// The file it was loaded from.
    pub path: PathBuf,
    /// Hash of the file's bytes: an unchanged file is not compiled again.
    pub digest: u64,
    /// Whether the compiled code came from the compile cache.
    pub from_cache: bool,
    /// Its limits and settings; swapped when the configuration is reloaded
    /// (a task keeps the one it started with).
    policy: arc_swap::ArcSwap<Policy>,
    /// `{"plugin_id", "plugin_version"}`, merged into its tasks' event metadata.
    pub stamp: Arc<serde_json::value::RawValue>,
    /// The lifecycle hooks it implements (none when it exports no hooks).
    pub hooks: HookSet,
    pre: AgentPre<TaskState>,
    /// Compiled input schema of each tool, by tool name.
    validators: std::collections::HashMap<String, jsonschema::Validator>,
    sandbox: Arc<Sandbox>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("id", &self.manifest.id)
            .field("version", &self.manifest.version)
            .field("path", &self.path)
            .finish()
    }
}

/// A hash of a plugin file, to notice whether it changed.
pub fn file_digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Aborts a spawned guest task when the caller stops waiting for it
/// (deadline, cancel, shutdown), so the guest stops at its next yield.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a call into a plugin ended, when it did not return normally.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The guest returned its own `error`.
    #[error("{}", guest_error_text(.0))]
    Guest(GuestError),
    /// The guest trapped (panic, memory cap, invalid host call...).
    #[error("{0}")]
    Trap(String),
}

fn guest_error_text(error: &GuestError) -> String {
    match error {
        GuestError::InvalidInput(m) => format!("invalid input: {m}"),
        GuestError::NotFound(m) => format!("not found: {m}"),
        GuestError::Denied(m) => format!("denied: {m}"),
        GuestError::Timeout(m) => format!("timeout: {m}"),
        GuestError::Cancelled(m) => format!("cancelled: {m}"),
        GuestError::Unavailable(m) => format!("unavailable: {m}"),
        GuestError::Failed(m) => m.clone(),
    }
}

/// Turns a wasmtime error into one line an operator understands.
fn describe_trap(error: &wasmtime::Error, limits: &Limits) -> String {
    if let Some(limit) = error.downcast_ref::<host::MemoryCapExceeded>() {
        return limit.to_string();
    }
    if let Some(trap) = error.downcast_ref::<wasmtime::Trap>() {
        if *trap == wasmtime::Trap::Interrupt {
            return format!("deadline of {} s exceeded", limits.deadline.as_secs_f64());
        }
        let root = error.root_cause().to_string();
        return format!("plugin trapped: {trap}{}", trap_detail(error, &root));
    }
    format!("plugin trapped: {error:#}")
}

fn trap_detail(error: &wasmtime::Error, root: &str) -> String {
    // The wasm backtrace names the guest function, which is what a plugin
    // author needs; keep the first frame only to stay on one line.
    let frame = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| {
            bt.frames()
                .first()
                .and_then(|f| f.func_name().map(str::to_owned))
        });
    match frame {
        Some(func) if !root.is_empty() => format!(" in {func}"),
        _ => String::new(),
    }
}

impl Plugin {
    /// Its limits and settings now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// The plugin's id and version, for logs.
    pub fn label(&self) -> String {
        format!("{}@{}", self.manifest.id, self.manifest.version)
    }

    /// The tool of this plugin with that name.
    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        self.manifest.tools.iter().find(|tool| tool.name == name)
    }

    /// Checks tool arguments against the tool's input schema; the error
    /// lists each violation with where it is (`/path: problem`).
    pub fn check_tool_args(&self, tool: &str, args: &serde_json::Value) -> Result<(), String> {
        let Some(validator) = self.validators.get(tool) else {
            return Ok(());
        };
        let problems: Vec<String> = validator
            .iter_errors(args)
            .take(8)
            .map(|error| {
                let at = error.instance_path().to_string();
                let at = if at.is_empty() { "/".to_owned() } else { at };
                format!("{at}: {error}")
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    fn instantiate_store(&self, host: TaskHost) -> Result<Store<TaskState>, CallError> {
        let state = TaskState::new(host, &self.sandbox.limits)
            .map_err(|e| CallError::Trap(format!("cannot prepare the sandbox: {e}")))?;
        Ok(self.sandbox.store(state))
    }

    /// Runs `handle(command)` in a fresh instance on the guest runtime.
    /// Deadline and cancellation are the caller's: drop the future to stop
    /// the guest (it yields at every epoch tick, so it stops within
    /// [`EPOCH_TICK`]).
    pub async fn handle(
        self: &Arc<Self>,
        host: TaskHost,
        command: &ControlCommand,
        agent_type: &str,
    ) -> Result<String, CallError> {
        let command = to_wit_command(command, agent_type, host.shared.dirs.is_some());
        let plugin = self.clone();
        let mut task = self.on_guest_runtime(async move { plugin.run_handle(host, command).await });
        match (&mut task.0).await {
            Ok(result) => result,
            Err(error) => Err(CallError::Trap(format!(
                "the plugin's task failed: {error}"
            ))),
        }
    }

    /// Runs a call into the guest on the guest runtime; dropping the handle
    /// stops it at its next yield.
    fn on_guest_runtime<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = T> + Send + 'static,
    ) -> AbortOnDrop<T> {
        let guests = self
            .sandbox
            .guests
            .as_ref()
            .expect("guest runtime lives as long as the sandbox");
        AbortOnDrop(guests.spawn(call))
    }

    async fn run_handle(&self, host: TaskHost, command: Command) -> Result<String, CallError> {
        let mut store = self.instantiate_store(host)?;
        let result = async {
            let instance = self.pre.instantiate(&mut store).await?;
            self.pre
                .handler(&mut store, &instance)?
                .call_handle(&mut store, &command)
                .await
        }
        .await;
        self.finish(&mut store, result)
    }

    /// Runs `invoke-tool(name, args)` in a fresh instance.
    pub async fn invoke_tool(
        &self,
        host: TaskHost,
        name: &str,
        args: &str,
    ) -> Result<String, CallError> {
        let mut store = self.instantiate_store(host)?;
        let result = async {
            let instance = self.pre.instantiate(&mut store).await?;
            self.pre
                .handler(&mut store, &instance)?
                .call_invoke_tool(&mut store, name, &args.to_owned())
                .await
        }
        .await;
        self.finish(&mut store, result)
    }

    fn finish(
        &self,
        store: &mut Store<TaskState>,
        result: wasmtime::Result<Result<String, GuestError>>,
    ) -> Result<String, CallError> {
        match result {
            Ok(Ok(json)) => {
                if serde_json::from_str::<serde::de::IgnoredAny>(&json).is_err() {
                    return Err(CallError::Guest(GuestError::InvalidInput(
                        "the plugin returned text that is not JSON".into(),
                    )));
                }
                Ok(json)
            }
            Ok(Err(guest)) => Err(CallError::Guest(guest)),
            Err(trap) => {
                if let Some(reason) = store.data().limiter.exceeded() {
                    return Err(CallError::Trap(reason));
                }
                Err(CallError::Trap(describe_trap(&trap, &self.sandbox.limits)))
            }
        }
    }
}

/// The WIT view of a command.
fn to_wit_command(command: &ControlCommand, agent_type: &str, workspace: bool) -> Command {
    let header = to_wit_header(&command.header);
    let (content, extra_payload, wait_for_reply, status, reply_data) = match &command.action {
        Action::AskAgent {
            content,
            wait_for_reply,
            extra_payload,
        } => (
            content,
            extra_payload,
            *wait_for_reply,
            String::new(),
            "null".to_owned(),
        ),
        Action::Resume {
            content,
            status,
            reply_data,
            extra_payload,
        } => (
            content,
            extra_payload,
            false,
            status.clone(),
            reply_data.to_string(),
        ),
        Action::CancelTask(_) => unreachable!("dispatch never hands a cancel to a plugin"),
    };
    Command {
        action_type: command.action.name().to_owned(),
        agent_type: agent_type.to_owned(),
        header,
        content: content.to_string(),
        extra_payload: extra_payload.to_string(),
        wait_for_reply,
        status,
        reply_data,
        workspace: match workspace {
            true => Workspace {
                private_dir: GUEST_PRIVATE_DIR.to_owned(),
                public_dir: GUEST_PUBLIC_DIR.to_owned(),
            },
            false => Workspace {
                private_dir: String::new(),
                public_dir: String::new(),
            },
        },
    }
}

/// The WIT view of a command's header.
fn to_wit_header(h: &byclaw_protocol::Header) -> Header {
    Header {
        message_id: h.message_id.clone(),
        session_id: h.session_id.clone(),
        trace_id: h.trace_id.clone(),
        source_agent_id: h.source_agent_id.clone(),
        target_agent_type: h.target_agent_type.clone(),
        parent_message_id: h.parent_message_id.clone(),
        task_group_id: h.task_group_id.clone(),
        tenant_id: h.tenant_id.clone(),
        metadata: h.metadata.to_string(),
    }
}
