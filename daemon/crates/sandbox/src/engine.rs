//! The engine and what every plugin shares: the wasmtime engine with its
//! pooling allocator and epoch ticker, the linker with every host
//! function, the runtime guest code runs on, the compile cache and the
//! policies. [`Sandbox::load`] turns a component file into a [`Plugin`].

use crate::bindings::{self, AgentPre, AgentWithHooks};
use crate::cache::CompileCache;
use crate::hooks::{HookSet, HookStats};
use crate::host::TaskState;
use crate::plugin::{Manifest, Plugin, describe_trap, file_digest};
use crate::policy::{Limits, Policies};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Engine, Store};

/// How often the epoch advances; a CPU-bound guest yields to the scheduler at
/// this interval, so deadlines and cancels take effect within about this long.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

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
    #[error(
        "{path}: plugin {id:?} is pinned to SHA-256 {pinned} (plugins.{id}.sha256) but this file's is {actual}; it is not loaded"
    )]
    Pinned {
        path: PathBuf,
        id: String,
        pinned: String,
        actual: String,
    },
}

/// The engine, the linker with all host functions, and the limits; shared by
/// every plugin and task.
pub struct Sandbox {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<TaskState>,
    pub(crate) limits: Limits,
    /// Stops the epoch ticker thread when the sandbox is dropped.
    ticker_stop: Arc<AtomicBool>,
    /// Runs guest code, apart from the runtime that does the daemon's I/O: a
    /// CPU-bound guest only yields every epoch tick, and on a shared runtime
    /// a few of them would delay every Redis reply by whole ticks.
    pub(crate) guests: Option<tokio::runtime::Runtime>,
    /// Where compiled plugins are kept across restarts; `None` compiles
    /// every time.
    pub(crate) cache: Option<Arc<CompileCache>>,
    /// Per-plugin limits and settings; replaced when the configuration is
    /// reloaded.
    pub(crate) policies: arc_swap::ArcSwap<Policies>,
    /// How the plugins' lifecycle hooks went.
    pub(crate) hook_stats: Arc<HookStats>,
    /// The linear memory of every store, against `limits.memory_budget_bytes`.
    pub(crate) guest_memory: Arc<crate::host::GuestMemory>,
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
        let mut guest_runtime = tokio::runtime::Builder::new_multi_thread();
        if limits.guest_threads > 0 {
            guest_runtime.worker_threads(limits.guest_threads);
        }
        let guests = guest_runtime
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
        let guest_memory = Arc::new(crate::host::GuestMemory::new(limits.memory_budget_bytes));
        Ok(Arc::new(Sandbox {
            guest_memory,
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

    /// The linear memory every store holds, and the budget new tasks wait
    /// under.
    pub fn guest_memory(&self) -> &Arc<crate::host::GuestMemory> {
        &self.guest_memory
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
        let digest = file_digest(bytes);
        let sha256 = crate::cache::hex(&digest);
        let policies = self.policies.load_full();
        if let Some(pinned) = policies.pinned_sha256(&manifest.id)
            && !pinned.eq_ignore_ascii_case(&sha256)
        {
            return Err(PluginError::Pinned {
                path,
                id: manifest.id.clone(),
                pinned: pinned.to_ascii_lowercase(),
                actual: sha256,
            });
        }
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
            policy: arc_swap::ArcSwap::from_pointee(policies.resolve(&manifest.id, &self.limits)),
            stamp: byclaw_protocol::plugin_stamp(&manifest.id, &manifest.version),
            manifest,
            path,
            digest,
            sha256: Arc::from(sha256),
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
        let mut store = self.store(TaskState::for_manifest(
            &self.limits,
            self.guest_memory.clone(),
        ));
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

    pub(crate) fn store(&self, state: TaskState) -> Store<TaskState> {
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        // Every tick of guest execution: yield to the other tasks, after
        // checking the task's CPU budget (on the thread that runs it).
        store.epoch_deadline_callback(|store| {
            if let Some(host) = &store.data().host {
                host.task.cpu.check()?;
            }
            Ok(wasmtime::UpdateDeadline::Yield(1))
        });
        store
    }
}
