//! Compiled plugins kept on disk across restarts and reloads.

use crate::plugin::file_digest;
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

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
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
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
    pub(crate) fn compile(
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
