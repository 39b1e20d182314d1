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

/// The environment variable that, set to `0.1.1`, makes every config the
/// harness writes load the built-ins as built against WIT 0.1.1 (the
/// `tests/fixtures/<name>-wit-0.1.1.wasm` components) in place of the
/// embedded 0.2 builds: `WASMLB_TEST_BUILTINS=0.1.1 cargo test -p
/// wasmlb-tests` runs the integration suite against unchanged 0.1 plugins.
pub const BUILTINS_ENV: &str = "WASMLB_TEST_BUILTINS";

/// `toml` with each `plugin = "<built-in>"` and `shadow_plugin =
/// "<built-in>"` line pointed at the built-in's WIT 0.1.1 fixture when
/// [`BUILTINS_ENV`] is `0.1.1`; `toml` unchanged otherwise.
pub fn builtins_from_env(toml: &str) -> String {
    if std::env::var(BUILTINS_ENV).as_deref() == Ok("0.1.1") {
        builtins_to_0_1_1(toml)
    } else {
        toml.to_owned()
    }
}

/// The name the proxy reports for the built-in `name` (admin API, metrics,
/// `x-wasmlb-plugin`, errors): `name`, or with [`BUILTINS_ENV`] at `0.1.1`
/// the path of its fixture, which the configs then name instead.
pub fn builtin_name(name: &str) -> String {
    if std::env::var(BUILTINS_ENV).as_deref() == Ok("0.1.1") {
        plugins::builtin_wit_0_1_1(name)
    } else {
        name.to_owned()
    }
}

/// `toml` with each `plugin`/`shadow_plugin` line naming a built-in pointed
/// at that built-in's WIT 0.1.1 fixture; other lines unchanged.
pub fn builtins_to_0_1_1(toml: &str) -> String {
    let mut out = String::with_capacity(toml.len());
    for line in toml.split_inclusive('\n') {
        out.push_str(&builtin_line_to_0_1_1(line).unwrap_or_else(|| line.to_owned()));
    }
    out
}

fn builtin_line_to_0_1_1(line: &str) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    if !matches!(key.trim(), "plugin" | "shadow_plugin") {
        return None;
    }
    let value = value.trim_end_matches(['\r', '\n']);
    let name = value.trim().trim_matches(['"', '\'']);
    wasmlb::builtin::PLUGINS
        .iter()
        .any(|(builtin, _)| *builtin == name)
        .then(|| {
            let eol = &line[key.len() + 1 + value.len()..];
            format!("{key}= '{}'{eol}", plugins::builtin_wit_0_1_1(name))
        })
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
        std::fs::write(&path, builtins_from_env(toml)).expect("write config");
        Self { path, _dir: dir }
    }

    /// The directory holding the file.
    pub fn dir(&self) -> &Path {
        self.path.parent().expect("config dir")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_builtin_plugin_lines_are_pointed_at_the_fixtures() {
        let toml = "[upstream.a]\nplugin = 'round-robin'\nshadow_plugin = \"maglev\"\r\n\
                    plugin = \"/x/custom.wasm\"\nname = 'round-robin'\n";
        let out = builtins_to_0_1_1(toml);
        let rr = plugins::builtin_wit_0_1_1("round-robin");
        let maglev = plugins::builtin_wit_0_1_1("maglev");
        assert_eq!(
            out,
            format!(
                "[upstream.a]\nplugin = '{rr}'\nshadow_plugin = '{maglev}'\r\n\
                 plugin = \"/x/custom.wasm\"\nname = 'round-robin'\n"
            )
        );
        assert!(std::path::Path::new(&rr).is_file(), "{rr}");
    }
}
