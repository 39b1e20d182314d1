//! Config snippets for tests: backend lists, an upstream config, a config file.

use std::path::{Path, PathBuf};

use crate::*;

/// `{ address = "..." }` entries for a TOML `backends = [...]` list.
pub fn backend_list(backends: &[&TestBackend]) -> String {
    backends
        .iter()
        .map(|b| format!("{{ address = \"{}\" }}", b.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config with one listener on 127.0.0.1:0 whose default upstream `app`
/// uses `plugin` (a built-in name or a path) over `backends` (the inside of a
/// TOML list, see [`backend_list`]); `extra` is appended verbatim (more keys of
/// `[upstream.app]`, or further tables).
pub fn app_config(plugin: &str, backends: &str, extra: &str) -> String {
    format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"app\"\n\n\
         [upstream.app]\nplugin = '{plugin}'\nbackends = [ {backends} ]\n{extra}\n"
    )
}

/// Like [`backend_list`], with each backend labelled `name = "<its name>"`
/// (what `examples/header-route` matches its header against).
pub fn named_backend_list(backends: &[TestBackend]) -> String {
    backends
        .iter()
        .map(|b| {
            format!(
                r#"{{ address = "{}", labels = {{ name = "{}" }} }}"#,
                b.addr, b.name
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A config file in a fresh temporary directory (removed on drop).
#[derive(Debug)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ConfigFile {
    /// Write `toml` to `<tmp>/wasmlb.toml`.
    pub fn new(toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wasmlb.toml");
        std::fs::write(&path, toml).expect("write config");
        Self { path, _dir: dir }
    }

    /// The directory holding the file.
    pub fn dir(&self) -> &Path {
        self.path.parent().expect("config dir")
    }
}
