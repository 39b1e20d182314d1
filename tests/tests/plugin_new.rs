//! `wasmlb plugin new`: the crate it writes passes its own native tests,
//! builds to a component, and loads into wasmlb (`--check` runs its init).

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmlb_tests::{ConfigFile, app_config, check, wasmlb_bin};

/// The workspace root (this crate is `<root>/tests`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `cargo ARGS` on the generated crate, without the outer cargo's build
/// settings, sharing one target directory across runs.
fn cargo(manifest: &Path, args: &[&str]) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(root().join("target/plugin-new"));
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_PATH",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn plugin_new(name: &str, dir: &Path) -> std::process::Output {
    Command::new(wasmlb_bin())
        .args(["plugin", "new", name, "--dir"])
        .arg(dir)
        .arg("--sdk")
        .arg(root().join("sdk"))
        .output()
        .expect("run wasmlb plugin new")
}

#[test]
fn generated_crate_tests_builds_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = plugin_new("my-strategy", tmp.path());
    assert!(out.status.success(), "{out:?}");
    let dir = tmp.path().join("my-strategy");
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    // Resolve with the workspace's lock file: the versions CI already built.
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let manifest = dir.join("Cargo.toml");

    cargo(&manifest, &["test", "--quiet"]);
    cargo(
        &manifest,
        &["build", "--quiet", "--release", "--target", "wasm32-wasip2"],
    );
    let wasm = root().join("target/plugin-new/wasm32-wasip2/release/my_strategy.wasm");
    assert!(wasm.is_file(), "{} missing", wasm.display());

    let backends = r#"{ address = "127.0.0.1:9" }"#;
    let plugin = wasm.display().to_string();
    let good = ConfigFile::new(&app_config(
        &plugin,
        backends,
        "[upstream.app.plugin_config]\nmax_in_flight = 10\n",
    ));
    let (code, stdout, stderr) = check(&good.path);
    assert_eq!((code, stdout.trim()), (0, "ok"), "{stderr}");
    // Its init's own error reaches the operator.
    let bad = ConfigFile::new(&app_config(
        &plugin,
        backends,
        "[upstream.app.plugin_config]\nmax_in_flight = 0\n",
    ));
    let (code, _, stderr) = check(&bad.path);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("max_in_flight must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn plugin_new_refuses_bad_names_and_existing_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let out = plugin_new("Bad_Name", tmp.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid plugin name"));
    assert!(plugin_new("twice", tmp.path()).status.success());
    let again = plugin_new("twice", tmp.path());
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}
