//! Loading a plugin directory: every `*.wasm` file compiled once, its manifest
//! read and checked, capabilities assigned. A bad file is reported and
//! skipped; the others serve.

use super::{Plugin, PluginError, Sandbox};
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
        self.tool_owners.clear();
        for plugin in self.by_id.values() {
            for tool in &plugin.manifest.tools {
                self.tool_owners
                    .entry(tool.name.clone())
                    .or_insert_with(|| plugin.clone());
            }
        }
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
    pub fn tools(&self) -> impl Iterator<Item = (String, &super::ToolSpec)> + '_ {
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
    let mut loaded = Loaded::default();
    for path in wasm_files(dir)? {
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(source) => {
                loaded.rejected.push(Rejected::Read { path, source });
                continue;
            }
        };
        let plugin = match sandbox.load(path.clone(), &bytes).await {
            Ok(plugin) => Arc::new(plugin),
            Err(error) => {
                loaded.rejected.push(error.into());
                continue;
            }
        };
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
    Ok(loaded)
}
