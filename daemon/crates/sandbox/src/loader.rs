//! Loading a plugin directory: every `*.wasm` file compiled once, its manifest
//! read and checked, capabilities assigned. A bad file is reported and
//! skipped; the others serve. On a reload, unchanged files keep their
//! compiled plugin, and a file that no longer loads keeps its previous
//! version serving.

use crate::engine::{PluginError, Sandbox};
use crate::plugin::{Plugin, ToolSpec, file_digest};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The loaded plugins, indexed for routing and for tool calls.
#[derive(Debug, Default, Clone)]
pub struct PluginTable {
    /// Capability → the plugin that serves it.
    pub by_capability: BTreeMap<String, Arc<Plugin>>,
    /// Plugin id → plugin, sorted (tool name clashes resolve by this order).
    by_id: BTreeMap<String, Arc<Plugin>>,
    /// Tool name → the first plugin (by id) offering it.
    tool_owners: BTreeMap<String, Arc<Plugin>>,
    /// `byai_gateway:ctrl:capability:*` of every capability, for the readers.
    streams: Vec<Arc<str>>,
}

impl PluginTable {
    /// Adds a plugin whose capabilities are not served yet.
    pub fn insert(&mut self, plugin: Arc<Plugin>) {
        for capability in &plugin.manifest.capabilities {
            self.by_capability
                .insert(capability.clone(), plugin.clone());
        }
        self.by_id
            .insert(plugin.manifest.id.clone(), plugin.clone());
        self.streams = self
            .by_capability
            .keys()
            .map(|c| Arc::from(byclaw_protocol::keys::capability_stream(c)))
            .collect();
        self.tool_owners.clear();
        for plugin in self.by_id.values() {
            for tool in &plugin.manifest.tools {
                self.tool_owners
                    .entry(tool.name.clone())
                    .or_insert_with(|| plugin.clone());
            }
        }
    }

    /// The capability streams to read, sorted like the capabilities.
    pub fn streams(&self) -> &[Arc<str>] {
        &self.streams
    }

    /// Every plugin, by id.
    pub fn plugins(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.by_id.values()
    }

    /// The plugin with this id.
    pub fn plugin(&self, id: &str) -> Option<&Arc<Plugin>> {
        self.by_id.get(id)
    }

    /// The plugin that answers calls of a plain tool name.
    pub fn tool_owner(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.tool_owners.get(name)
    }

    /// Every tool, once per name: the plain name for the plugin that owns
    /// it, `plugin-id/name` for the others offering the same name.
    pub fn tools(&self) -> impl Iterator<Item = (String, &ToolSpec)> + '_ {
        self.by_id.values().flat_map(move |plugin| {
            plugin.manifest.tools.iter().map(move |tool| {
                let owner = self
                    .tool_owners
                    .get(&tool.name)
                    .is_some_and(|owner| Arc::ptr_eq(owner, plugin));
                let name = if owner {
                    tool.name.clone()
                } else {
                    format!("{}/{}", plugin.manifest.id, tool.name)
                };
                (name, tool)
            })
        })
    }

    /// The plugin serving an agent type.
    pub fn get(&self, capability: &str) -> Option<&Arc<Plugin>> {
        self.by_capability.get(capability)
    }

    /// All capabilities served, sorted.
    pub fn capabilities(&self) -> Vec<String> {
        self.by_capability.keys().cloned().collect()
    }
}

/// A file that was not loaded, and why.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: capability {capability:?} is already served by plugin {owner} ({owner_path}); this plugin is skipped"
    )]
    DuplicateCapability {
        path: PathBuf,
        capability: String,
        owner: String,
        owner_path: PathBuf,
    },
    #[error("{path}: plugin id {id:?} is already loaded from {owner_path}; this plugin is skipped")]
    DuplicateId {
        path: PathBuf,
        id: String,
        owner_path: PathBuf,
    },
}

/// The result of loading a directory.
#[derive(Debug, Default)]
pub struct Loaded {
    pub table: PluginTable,
    pub rejected: Vec<Rejected>,
    /// Files whose new contents did not load, with the previous version
    /// (`id@version`) that keeps serving in their place.
    pub kept: Vec<(PathBuf, String)>,
}

/// Error for a plugin directory that cannot be listed at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read plugin directory {dir}: {source}")]
pub struct DirError {
    pub dir: PathBuf,
    pub source: std::io::Error,
}

/// The `*.wasm` files of a directory, sorted by name (so which of two
/// plugins claiming a capability wins does not depend on the file system).
pub fn wasm_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DirError {
        dir: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every plugin of a directory.
pub async fn load_dir(sandbox: &Arc<Sandbox>, dir: &Path) -> Result<Loaded, DirError> {
    reload_dir(sandbox, dir, &PluginTable::default()).await
}

/// Loads a directory again: a file unchanged since `previous` keeps its
/// compiled plugin; a changed or new file is compiled; a file that fails to
/// read, compile or validate keeps its previous version, if it had one.
pub async fn reload_dir(
    sandbox: &Arc<Sandbox>,
    dir: &Path,
    previous: &PluginTable,
) -> Result<Loaded, DirError> {
    let before: std::collections::HashMap<&Path, &Arc<Plugin>> = previous
        .plugins()
        .map(|plugin| (plugin.path.as_path(), plugin))
        .collect();
    let mut loaded = Loaded::default();
    let mut candidates = Vec::new();
    for path in wasm_files(dir)? {
        let old = before.get(path.as_path()).copied();
        let keep_old = |loaded: &mut Loaded, candidates: &mut Vec<Arc<Plugin>>| {
            if let Some(old) = old {
                loaded.kept.push((path.clone(), old.label()));
                candidates.push(old.clone());
            }
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                keep_old(&mut loaded, &mut candidates);
                loaded.rejected.push(Rejected::Read {
                    path: path.clone(),
                    source,
                });
                continue;
            }
        };
        if let Some(old) = old
            && old.digest == file_digest(&bytes)
        {
            candidates.push(old.clone());
            continue;
        }
        match sandbox.load(path.clone(), &bytes).await {
            Ok(plugin) => candidates.push(Arc::new(plugin)),
            Err(error) => {
                keep_old(&mut loaded, &mut candidates);
                loaded.rejected.push(error.into());
            }
        }
    }
    for plugin in candidates {
        let path = plugin.path.clone();
        if let Some((capability, owner)) = plugin.manifest.capabilities.iter().find_map(|c| {
            loaded
                .table
                .by_capability
                .get(c)
                .map(|owner| (c.clone(), owner.clone()))
        }) {
            loaded.rejected.push(Rejected::DuplicateCapability {
                path,
                capability,
                owner: owner.manifest.id.clone(),
                owner_path: owner.path.clone(),
            });
            continue;
        }
        if let Some(owner) = loaded.table.plugin(&plugin.manifest.id) {
            loaded.rejected.push(Rejected::DuplicateId {
                path,
                id: plugin.manifest.id.clone(),
                owner_path: owner.path.clone(),
            });
            continue;
        }
        loaded.table.insert(plugin);
    }
    if let Some(cache) = sandbox.cache.clone() {
        let in_use: Vec<crate::FileDigest> = loaded.table.plugins().map(|p| p.digest).collect();
        // Directory listing and deletes: off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            cache.evict_unused(&in_use, crate::cache::UNUSED_FOR)
        })
        .await;
    }
    Ok(loaded)
}
