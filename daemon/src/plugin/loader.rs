//! Loading a plugin directory: every `*.wasm` file compiled once, its manifest
//! read and checked, capabilities assigned. A bad file is reported and
//! skipped; the others serve.

use super::{Plugin, PluginError, Sandbox};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Capability → the plugin that serves it.
#[derive(Debug, Default, Clone)]
pub struct PluginTable {
    pub by_capability: BTreeMap<String, Arc<Plugin>>,
}

impl PluginTable {
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
        for capability in &plugin.manifest.capabilities {
            loaded
                .table
                .by_capability
                .insert(capability.clone(), plugin.clone());
        }
    }
    Ok(loaded)
}
