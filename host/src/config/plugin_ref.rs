//! Where a plugin comes from: a built-in name, or a `.wasm` file resolved
//! against the config's directory (and, for the admin API, confined to
//! `plugin_dirs`).

use std::path::{Path, PathBuf};

use crate::builtin;

/// What a plugin is loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginRef {
    /// A strategy embedded in the binary (see [`crate::builtin`]).
    Builtin(String),
    /// A `.wasm` component file.
    File {
        /// The file (resolved against the config file's directory).
        path: PathBuf,
        /// How it is named in messages and the admin API: the resolved path
        /// for a config file's plugin, the path as given for an admin
        /// request's (which must not learn the server's directories).
        shown: String,
    },
}

/// Largest plugin file read, in bytes (16 MiB, the admin API's default
/// body limit); the size is checked before anything is read.
pub const MAX_PLUGIN_FILE_BYTES: u64 = 16 << 20;

impl PluginRef {
    /// Resolve a `plugin` value as written in a config file: one ending in
    /// `.wasm` or containing a path separator is a file relative to `base`
    /// (which must exist); anything else must name a built-in.
    ///
    /// # Errors
    /// A message naming the unknown built-in (and listing the built-ins) or
    /// the missing file.
    pub fn resolve(value: &str, base: &Path) -> Result<PluginRef, String> {
        if let Some(builtin) = Self::builtin(value)? {
            return Ok(builtin);
        }
        let file = base.join(value);
        if file.is_file() {
            Ok(PluginRef::File {
                shown: file.display().to_string(),
                path: file,
            })
        } else {
            Err(format!("plugin file {} not found", file.display()))
        }
    }

    /// Resolve a `plugin` value from an admin request (untrusted): a
    /// built-in, or a `.wasm` file that lies, after resolving `..` and
    /// symbolic links, inside one of `dirs` (relative paths are taken
    /// against `base`, the config file's directory). Messages name the value
    /// as given, never a resolved path, and do not tell whether a file
    /// outside `dirs` exists.
    ///
    /// # Errors
    /// A message: unknown built-in, not a `.wasm` path, outside the plugin
    /// directories, or not found inside them.
    pub fn resolve_confined(
        value: &str,
        base: &Path,
        dirs: &[PathBuf],
    ) -> Result<PluginRef, String> {
        if let Some(builtin) = Self::builtin(value)? {
            return Ok(builtin);
        }
        let outside = || {
            format!(
                "plugin path {value:?} is not a .wasm file inside the allowed plugin directories ([admin] plugin_dirs)"
            )
        };
        if !value.ends_with(".wasm") || value.contains('\0') {
            return Err(outside());
        }
        let file = lexical_normalize(&base.join(value));
        let dirs: Vec<PathBuf> = dirs.iter().map(|d| lexical_normalize(d)).collect();
        if !dirs.iter().any(|d| file.starts_with(d)) {
            return Err(outside());
        }
        let Ok(real) = file.canonicalize() else {
            return Err(format!(
                "plugin file {value:?} not found in the plugin directories"
            ));
        };
        let inside = dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| real.starts_with(d));
        if !inside || !real.is_file() {
            // A link out of the directories, or not a regular file.
            return Err(outside());
        }
        Ok(PluginRef::File {
            path: real,
            shown: value.to_string(),
        })
    }

    /// `Some` built-in for a value that is not path-like; an error for an
    /// unknown one; `None` for a path.
    fn builtin(value: &str) -> Result<Option<PluginRef>, String> {
        let looks_like_path =
            value.ends_with(".wasm") || value.contains('/') || value.contains('\\');
        if looks_like_path {
            return Ok(None);
        }
        match builtin::get(value) {
            Some(_) => Ok(Some(PluginRef::Builtin(value.to_string()))),
            None => Err(format!(
                "no built-in plugin named {value:?} (built-ins: {:?}; a file path must end in .wasm)",
                builtin::names()
            )),
        }
    }
}

/// `path` with `.` and `..` components resolved without touching the file
/// system (`..` never climbs above the root).
fn lexical_normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Read a plugin file of at most [`MAX_PLUGIN_FILE_BYTES`]: its size is
/// checked first, then its first 4 bytes must be the WebAssembly magic
/// `\0asm`, and only then is the rest read. Messages never quote the file.
///
/// # Errors
/// A message: cannot open, too large, or not WebAssembly.
pub fn read_plugin_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {}", e.kind()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat: {}", e.kind()))?
        .len();
    if len > MAX_PLUGIN_FILE_BYTES {
        return Err(format!(
            "{len} bytes, larger than the {MAX_PLUGIN_FILE_BYTES}-byte limit on plugin files"
        ));
    }
    let mut reader = file.take(MAX_PLUGIN_FILE_BYTES);
    let mut magic = [0u8; 4];
    if reader.read_exact(&mut magic).is_err() || &magic != b"\0asm" {
        return Err("not a WebAssembly file (no \\0asm header)".into());
    }
    let mut bytes = magic.to_vec();
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {}", e.kind()))?;
    Ok(bytes)
}

impl std::fmt::Display for PluginRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginRef::Builtin(n) => write!(f, "{n}"),
            PluginRef::File { shown, .. } => write!(f, "{shown}"),
        }
    }
}
