//! Build-script helper: compile plugin crates of this workspace to
//! `wasm32-wasip2` components with a nested `cargo build`, and copy the
//! `.wasm` files into the calling build script's `OUT_DIR`.
//!
//! The nested build uses the workspace's `plugin` profile and its own target
//! directory (`<target>/wasm-plugins`), so it never waits on the outer build's
//! lock and its artifacts are shared by every build script that calls it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variables of the outer cargo that must not leak into the nested
/// one: flags meant for the host target, clippy's wrapper, a forced target.
const SCRUBBED_ENV: &[&str] = &[
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_PATH",
    "RUSTDOCFLAGS",
];

/// The wasm target plugins are built for.
pub const TARGET: &str = "wasm32-wasip2";

/// Build `packages` (workspace package names, e.g. `wasmlb-plugin-round-robin`)
/// for [`TARGET`] in one nested cargo invocation and copy each component to
/// `$OUT_DIR/<package>.wasm`. Emits `cargo:rerun-if-changed` for `watch`
/// (paths relative to the workspace root) and returns the copied paths in the
/// order of `packages`.
///
/// # Errors
/// A message naming what failed: a missing `wasm32-wasip2` target (with the
/// `rustup` command that installs it), the nested cargo's exit status, or a
/// missing output file.
pub fn build_plugins(packages: &[&str], watch: &[&str]) -> Result<Vec<PathBuf>, String> {
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let manifest_dir = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?,
    );
    let root = workspace_root(&manifest_dir)?;
    for path in watch {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    check_target_installed()?;

    let target_dir = shared_target_dir(&out_dir);
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--profile", "plugin", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    for p in packages {
        cmd.args(["-p", p]);
    }
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("running cargo for the wasm plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building wasm plugins {packages:?} failed ({status}); the nested cargo's errors are above"
        ));
    }
    let mut outputs = Vec::new();
    for p in packages {
        let built = target_dir
            .join(TARGET)
            .join("plugin")
            .join(format!("{}.wasm", p.replace('-', "_")));
        let dest = out_dir.join(format!("{p}.wasm"));
        std::fs::copy(&built, &dest)
            .map_err(|e| format!("copying {} to {}: {e}", built.display(), dest.display()))?;
        outputs.push(dest);
    }
    Ok(outputs)
}

/// The directory holding the workspace's `Cargo.lock`, from `start` upwards.
fn workspace_root(start: &Path) -> Result<PathBuf, String> {
    start
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file() && d.join("wit").is_dir())
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            format!(
                "no workspace root (Cargo.lock and wit/) above {}",
                start.display()
            )
        })
}

/// `<target>/wasm-plugins`, where `<target>` is the outer build's target
/// directory (the ancestor of `OUT_DIR` holding cargo's `CACHEDIR.TAG`), or
/// `$OUT_DIR/wasm-plugins` if there is none.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir)
        .join("wasm-plugins")
}

fn check_target_installed() -> Result<(), String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("running rustc --print sysroot: {e}"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_string();
    if Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .is_dir()
    {
        Ok(())
    } else {
        Err(format!(
            "the {TARGET} target is not installed; run: rustup target add {TARGET}"
        ))
    }
}
