//! Compiled plugins kept on disk across restarts and reloads.
//!
//! Loading precompiled code skips wasmtime's validation, so what is loaded
//! must be exactly what this program wrote: an artifact is named by the
//! SHA-256 of the component it was compiled from and by the engine's
//! compatibility hash, and it starts with the SHA-256 of the compiled code,
//! checked before the code is used. A corrupt or altered artifact is
//! deleted and the component compiled again. Artifacts no loaded plugin
//! has used for [`UNUSED_FOR`] are deleted.

use crate::plugin::{FileDigest, file_digest};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use wasmtime::Engine;
use wasmtime::component::Component;

/// How long an artifact may go unused before [`CompileCache::evict_unused`]
/// deletes it (several daemons may share one cache directory, each using
/// its own artifacts; each refreshes what it uses).
pub const UNUSED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);

/// File name extension of artifacts.
const EXTENSION: &str = "cwasm";

/// Compiled plugins on disk, keyed by the file's contents and the engine's
/// compatibility hash: a restart or a reload of an unchanged big component
/// (a Python or JavaScript one takes seconds to compile) loads in
/// milliseconds.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    /// Part of every name (hex of the SHA-256 of wasmtime's compatibility
    /// hash, shortened): artifacts of another wasmtime build or engine
    /// configuration are never looked at.
    engine_key: String,
}

impl CompileCache {
    /// Opens (creating it, mode 0700) a cache directory. Precompiled code is
    /// loaded without validation, so a directory that others can write is
    /// refused.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, String> {
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
        let mut hasher = Sha256::new();
        std::hash::Hash::hash(
            &engine.precompile_compatibility_hash(),
            &mut HashInto(&mut hasher),
        );
        let engine_key = hex(&hasher.finalize())[..16].to_owned();
        Ok(CompileCache {
            dir: dir.to_owned(),
            engine_key,
        })
    }

    /// Where the artifact of the component with this digest lives.
    pub(crate) fn file_for(&self, digest: &FileDigest) -> PathBuf {
        self.dir
            .join(format!("{}-{}.{EXTENSION}", hex(digest), self.engine_key))
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
        let file = cache.file_for(&file_digest(bytes));
        // Read into memory rather than mapped: a file changed in place under
        // a mapping would crash the daemon (SIGBUS).
        if let Ok(stored) = std::fs::read(&file) {
            match verified(&stored) {
                // SAFETY: the code is what this program serialized: its
                // SHA-256 matches the one written before it, in a file named
                // by the SHA-256 of these exact component bytes and this
                // engine's compatibility hash, in a directory only this user
                // can write (checked in `open`); wasmtime checks the
                // compatibility header again.
                Some(code) => match unsafe { Component::deserialize(engine, code) } {
                    Ok(component) => {
                        touch(&file);
                        return Ok((component, true));
                    }
                    Err(error) => {
                        tracing::warn!(file = %file.display(), error = %format!("{error:#}"), "unusable compiled plugin in the cache; compiling again");
                    }
                },
                None => {
                    tracing::warn!(file = %file.display(), "compiled plugin in the cache fails its checksum; deleting it and compiling again");
                }
            }
            let _ = std::fs::remove_file(&file);
        }
        let component = Component::new(engine, bytes)?;
        if let Err(error) = cache.store(&file, &component) {
            tracing::warn!(dir = %cache.dir.display(), %error, "cannot store the compiled plugin");
        }
        Ok((component, false))
    }

    /// Writes `component`'s code, after its SHA-256, atomically.
    fn store(&self, file: &Path, component: &Component) -> Result<(), String> {
        let code = component.serialize().map_err(|e| e.to_string())?;
        let mut stored = Vec::with_capacity(32 + code.len());
        stored.extend_from_slice(&Sha256::digest(&code));
        stored.extend_from_slice(&code);
        let tmp = file.with_extension(format!(
            "tmp-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&tmp, stored)
            .and_then(|()| std::fs::rename(&tmp, file))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                e.to_string()
            })
    }

    /// Deletes the artifacts not in `in_use` that nothing used for
    /// [`UNUSED_FOR`] (their modification time is refreshed on each use),
    /// and those of other engines as soon as they are that old. Returns how
    /// many were deleted.
    pub(crate) fn evict_unused(&self, in_use: &[FileDigest], unused_for: Duration) -> usize {
        let keep: Vec<PathBuf> = in_use.iter().map(|d| self.file_for(d)).collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut deleted = 0;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != EXTENSION) || keep.contains(&path) {
                continue;
            }
            let idle = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| now.duration_since(modified).ok());
            if idle.is_some_and(|idle| idle >= unused_for) && std::fs::remove_file(&path).is_ok() {
                tracing::debug!(file = %path.display(), "unused compiled plugin deleted from the cache");
                deleted += 1;
            }
        }
        deleted
    }
}

/// The code of a stored artifact, if it matches the SHA-256 before it.
fn verified(stored: &[u8]) -> Option<&[u8]> {
    let (sum, code) = stored.split_at_checked(32)?;
    (Sha256::digest(code).as_slice() == sum).then_some(code)
}

/// Marks an artifact used now.
fn touch(file: &Path) {
    let _ = std::fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(SystemTime::now()));
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Feeds a `Hash` value into a SHA-256.
struct HashInto<'a>(&'a mut Sha256);

impl std::hash::Hasher for HashInto<'_> {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    /// The smallest component: `(component)`.
    const EMPTY_COMPONENT: &[u8] = &[0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn a_stored_artifact_is_used_once_and_a_tampered_one_never() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        let (_, cached) = CompileCache::compile(Some(&cache), &engine, EMPTY_COMPONENT).unwrap();
        assert!(!cached);
        let file = cache.file_for(&file_digest(EMPTY_COMPONENT));
        assert!(file.is_file(), "stored under the component's SHA-256");
        let (_, cached) = CompileCache::compile(Some(&cache), &engine, EMPTY_COMPONENT).unwrap();
        assert!(cached);

        // One byte of the code changed: refused, deleted, compiled again.
        let mut stored = std::fs::read(&file).unwrap();
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        std::fs::write(&file, &stored).unwrap();
        let (_, cached) = CompileCache::compile(Some(&cache), &engine, EMPTY_COMPONENT).unwrap();
        assert!(!cached, "a tampered artifact is never loaded");
        assert!(verified(&std::fs::read(&file).unwrap()).is_some());
    }

    #[test]
    fn artifacts_unused_for_long_are_deleted_and_those_in_use_kept() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = CompileCache::open(dir.path(), &engine).unwrap();
        CompileCache::compile(Some(&cache), &engine, EMPTY_COMPONENT).unwrap();
        let in_use = file_digest(EMPTY_COMPONENT);
        let stale = dir
            .path()
            .join(format!("{}-0000000000000000.cwasm", "ab".repeat(32)));
        let fresh = dir
            .path()
            .join(format!("{}-0000000000000000.cwasm", "cd".repeat(32)));
        std::fs::write(&stale, b"old").unwrap();
        std::fs::write(&fresh, b"new").unwrap();
        let long_ago = SystemTime::now() - Duration::from_secs(30 * 24 * 3600);
        for file in [&stale, &cache.file_for(&in_use)] {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        assert_eq!(cache.evict_unused(&[in_use], UNUSED_FOR), 1);
        assert!(!stale.exists());
        assert!(fresh.exists(), "used recently, maybe by another daemon");
        assert!(cache.file_for(&in_use).exists(), "in use here");
    }
}
