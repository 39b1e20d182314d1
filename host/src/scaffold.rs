//! `wasmlb plugin new NAME`: write a ready-to-build strategy crate.
//!
//! The crate has a `Cargo.toml` (a `cdylib` depending on `wasmlb-sdk`, its own
//! empty `[workspace]` so it builds wherever it is put), `src/lib.rs` (a
//! documented weighted-rotation skeleton with a `plugin_config` type) and
//! native unit tests that run with `cargo test`, without wasm.

use std::path::{Path, PathBuf};

/// Where the generated crate takes `wasmlb-sdk` from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkSource {
    /// A local checkout of the SDK (the `sdk/` directory of wasmlb).
    Path(PathBuf),
    /// A git repository holding the wasmlb workspace (cargo finds the
    /// `wasmlb-sdk` package in it), e.g. a fork or an internal mirror.
    Git(String),
    /// A registry version requirement, e.g. `0.1` (once published).
    Version(String),
}

impl SdkSource {
    /// The SDK next to the sources this binary was built from, if it is
    /// still there. `None` when this binary outlived its checkout (copied
    /// to another machine, or the checkout moved): the caller then needs
    /// `--sdk` or `--sdk-git`, since `wasmlb-sdk` is not on crates.io.
    pub fn default_for_this_build() -> Option<Self> {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
        match sdk.canonicalize() {
            Ok(path) if path.join("Cargo.toml").is_file() => Some(Self::Path(path)),
            _ => None,
        }
    }

    fn dependency(&self) -> String {
        match self {
            Self::Path(p) => format!("{{ path = {:?} }}", p.display().to_string()),
            Self::Git(url) => format!("{{ git = {url:?} }}"),
            Self::Version(v) => format!("{v:?}"),
        }
    }
}

/// Why a crate could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not a valid crate name for a plugin.
    #[error(
        "invalid plugin name {0:?}: use lowercase letters, digits and '-', starting with a letter"
    )]
    InvalidName(String),
    /// The target directory already exists; nothing was written.
    #[error("{0} already exists; not overwriting it")]
    Exists(PathBuf),
    /// Creating a directory or writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Write the crate `NAME` into `parent/NAME` and return that directory.
///
/// # Errors
/// [`ScaffoldError::InvalidName`] unless `name` matches `[a-z][a-z0-9-]*`
/// (at most 64 bytes); [`ScaffoldError::Exists`] if `parent/NAME` exists;
/// [`ScaffoldError::Io`] naming the path that could not be written.
pub fn new_plugin(name: &str, parent: &Path, sdk: &SdkSource) -> Result<PathBuf, ScaffoldError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        return Err(ScaffoldError::InvalidName(name.to_string()));
    }
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Io { path, source }
    };
    let src = dir.join("src");
    std::fs::create_dir_all(&src).map_err(io(&src))?;
    let type_name = camel_case(name);
    let files = [
        (dir.join("Cargo.toml"), cargo_toml(name, sdk)),
        (dir.join("src/lib.rs"), lib_rs(name, &type_name)),
        (dir.join(".gitignore"), "/target\n".to_string()),
    ];
    for (path, text) in files {
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(dir)
}

/// `my-strategy` → `MyStrategy`.
fn camel_case(name: &str) -> String {
    name.split('-')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

fn cargo_toml(name: &str, sdk: &SdkSource) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the wasm component; rlib: native tests and benches.
crate-type = ["cdylib", "rlib"]

[dependencies]
wasmlb-sdk = {sdk}

# Build the component with `cargo build --release --target wasm32-wasip2`.
[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"

# Not part of any enclosing workspace.
[workspace]
"#,
        sdk = sdk.dependency()
    )
}

fn lib_rs(name: &str, ty: &str) -> String {
    let underscored = name.replace('-', "_");
    LIB_TEMPLATE
        .replace("{{name}}", name)
        .replace("{{file}}", &underscored)
        .replace("{{Type}}", ty)
}

const LIB_TEMPLATE: &str = r##"//! `{{name}}`: a wasmlb load-balancing strategy.
//!
//! Skeleton written by `wasmlb plugin new`: weighted rotation over the healthy
//! backends, skipping backends with more than `max_in_flight` requests in
//! flight. Replace `select` with your policy.
//!
//! Build:  cargo build --release --target wasm32-wasip2
//!         (-> target/wasm32-wasip2/release/{{file}}.wasm)
//! Test:   cargo test                     (natively, no wasm)
//! Check:  wasmlb --config wasmlb.toml --check   (loads it and runs its init)
//! Load:   plugin = "path/to/{{file}}.wasm" in an upstream of wasmlb.toml, or
//!         curl -X PUT localhost:9901/upstreams/app/plugin --data-binary @{{file}}.wasm
#![cfg_attr(target_arch = "wasm32", no_std)]

use wasmlb_sdk::prelude::*;
use wasmlb_sdk::serde::Deserialize;

/// The upstream's `[upstream.NAME.plugin_config]` table, as JSON.
#[derive(Debug, Deserialize)]
#[serde(crate = "wasmlb_sdk::serde", deny_unknown_fields, default)]
pub struct Config {
    /// Skip backends with more requests in flight than this (default: no limit).
    pub max_in_flight: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self { max_in_flight: u32::MAX }
    }
}

/// The strategy's state. The host keeps one instance per upstream and calls
/// it one request at a time, so plain fields are the upstream's state.
#[derive(Debug)]
pub struct {{Type}} {
    config: Config,
    /// Each backend id repeated `weight` times, healthy backends only.
    slots: Vec<u32>,
    next: usize,
}

impl Strategy for {{Type}} {
    type Config = Config;

    /// Called once when the plugin loads; an `Err` rejects the plugin with
    /// this message.
    fn new(config: Config) -> Result<Self, String> {
        if config.max_in_flight == 0 {
            return Err("max_in_flight must be at least 1".into());
        }
        Ok(Self { config, slots: Vec::new(), next: 0 })
    }

    /// Called when the backend set, a weight or a health state changes.
    /// (Weights above 100 count as 100 in this skeleton.)
    fn set_backends(&mut self, backends: Vec<Backend>) {
        self.slots = backends
            .iter()
            .filter(|b| b.healthy)
            .flat_map(|b| core::iter::repeat_n(b.id, b.weight.clamp(1, 100) as usize))
            .collect();
        self.next = 0;
    }

    /// Called for every request. `cx` reads the request (method, path,
    /// headers, client address) and live backend state (in-flight counts);
    /// every read is a host call of about 60 ns, so read only what you need.
    fn select(&mut self, cx: &dyn Context) -> Decision {
        for _ in 0..self.slots.len() {
            let id = self.slots[self.next % self.slots.len()];
            self.next = self.next.wrapping_add(1);
            if cx.in_flight(id) < self.config.max_in_flight {
                return Decision::Backend(id);
            }
        }
        Decision::Unavailable // the host answers 503
    }
}

wasmlb_sdk::export_strategy!({{Type}});

#[cfg(test)]
mod tests {
    use super::*;
    use wasmlb_sdk::testing::{MockContext, backends, spread};

    #[test]
    fn spread_follows_weights() {
        let set = backends(&[1, 3]);
        let counts = spread::<{{Type}}>("{}", &set, &MockContext::new(&set), 400).unwrap();
        assert_eq!(counts, vec![100, 300]);
    }

    #[test]
    fn busy_backends_are_skipped() {
        let set = backends(&[1, 1]);
        let cx = MockContext::new(&set).with_in_flight(&[5, 0]);
        let counts = spread::<{{Type}}>(r#"{"max_in_flight": 5}"#, &set, &cx, 10).unwrap();
        assert_eq!(counts, vec![0, 10]);
    }

    #[test]
    fn bad_config_is_rejected() {
        let err = wasmlb_sdk::instantiate::<{{Type}}>(r#"{"max_in_flight": 0}"#).unwrap_err();
        assert!(err.contains("max_in_flight"), "{err}");
    }
}
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        let dir = std::env::temp_dir();
        for bad in ["", "Upper", "9lives", "has space", "under_score", "../up"] {
            let e = new_plugin(bad, &dir, &SdkSource::Version("0.1".into())).unwrap_err();
            assert!(matches!(e, ScaffoldError::InvalidName(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn camel_case_of_names() {
        assert_eq!(camel_case("my-strategy"), "MyStrategy");
        assert_eq!(camel_case("canary2"), "Canary2");
    }

    #[test]
    fn writes_the_crate_and_refuses_to_overwrite_it() {
        let parent = std::env::temp_dir().join(format!("wasmlb-scaffold-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let sdk = SdkSource::Path("/opt/wasmlb/sdk".into());
        let dir = new_plugin("my-strategy", &parent, &sdk).unwrap();
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains(r#"wasmlb-sdk = { path = "/opt/wasmlb/sdk" }"#),
            "{cargo}"
        );
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("pub struct MyStrategy"));
        assert!(lib.contains("export_strategy!(MyStrategy)"));
        assert!(!lib.contains("{{"), "unfilled placeholder");
        let again = new_plugin("my-strategy", &parent, &sdk).unwrap_err();
        assert!(matches!(again, ScaffoldError::Exists(_)), "{again}");
        // From a git repository, when there is no checkout at hand.
        let git = SdkSource::Git("https://git.example.com/wasmlb.git".into());
        let dir = new_plugin("from-git", &parent, &git).unwrap();
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            cargo.contains(r#"wasmlb-sdk = { git = "https://git.example.com/wasmlb.git" }"#),
            "{cargo}"
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn the_sdk_of_this_build_is_found_while_its_checkout_exists() {
        // Tests run from the checkout, so it is there.
        assert!(matches!(
            SdkSource::default_for_this_build(),
            Some(SdkSource::Path(p)) if p.join("Cargo.toml").is_file()
        ));
    }
}
