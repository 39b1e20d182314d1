//! `wasmlb plugin new`: the crate it writes passes its own native tests,
//! builds to a component, and loads into wasmlb (`--check` runs its init).

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmlb_tests::{
    ConfigFile, InProcessProxy, TestBackend, app_config, check, client, get, wasmlb_bin,
};

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

/// Run the crate's native tests, build its component and return the `.wasm`
/// path. Resolves with the workspace's lock file: the versions CI built.
fn test_and_build(dir: &Path, lib_name: &str) -> PathBuf {
    std::fs::copy(root().join("Cargo.lock"), dir.join("Cargo.lock")).expect("copy Cargo.lock");
    let manifest = dir.join("Cargo.toml");
    cargo(&manifest, &["test", "--quiet"]);
    cargo(
        &manifest,
        &["build", "--quiet", "--release", "--target", "wasm32-wasip2"],
    );
    let wasm = root().join(format!(
        "target/plugin-new/wasm32-wasip2/release/{lib_name}.wasm"
    ));
    assert!(wasm.is_file(), "{} missing", wasm.display());
    wasm
}

/// `wasmlb simulate --plugin WASM ARGS`; its report (panics on failure).
fn simulate_wasm(wasm: &Path, args: &[&str]) -> String {
    let out = Command::new(wasmlb_bin())
        .args(["simulate", "--plugin"])
        .arg(wasm)
        .args(args)
        .output()
        .expect("run wasmlb simulate");
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
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
    let wasm = test_and_build(&dir, "my_strategy");

    // Offline: the skeleton's weighted rotation, 1:3.
    let report = simulate_wasm(
        &wasm,
        &["--backends", "2", "--weights", "1,3", "--requests", "400"],
    );
    assert!(
        report.contains(" 100   25.0%") && report.contains(" 300   75.0%"),
        "{report}"
    );

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

/// Without this checkout: `--sdk-git` writes a git dependency, and an
/// `--sdk` that is not an SDK is refused before anything is written.
#[test]
fn plugin_new_takes_the_sdk_from_git_or_refuses_a_wrong_path() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(wasmlb_bin())
        .args(["plugin", "new", "from-git", "--dir"])
        .arg(tmp.path())
        .args(["--sdk-git", "https://git.example.com/wasmlb.git"])
        .output()
        .expect("run wasmlb plugin new");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cargo = std::fs::read_to_string(tmp.path().join("from-git/Cargo.toml")).unwrap();
    assert!(
        cargo.contains(r#"wasmlb-sdk = { git = "https://git.example.com/wasmlb.git" }"#),
        "{cargo}"
    );
    let out = Command::new(wasmlb_bin())
        .args(["plugin", "new", "nowhere", "--dir"])
        .arg(tmp.path())
        .args(["--sdk", "/nonexistent/sdk"])
        .output()
        .expect("run wasmlb plugin new");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--sdk /nonexistent/sdk: no Cargo.toml there"),
        "{stderr}"
    );
    assert!(!tmp.path().join("nowhere").exists());
}

/// The ```rust blocks of docs/tutorial.md, in order.
fn tutorial_rust_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("docs/tutorial.md")).expect("docs/tutorial.md");
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("```rust\n") {
        let body = &rest[start + "```rust\n".len()..];
        let end = body.find("```").expect("unterminated rust block");
        blocks.push(body[..end].to_string());
        rest = &body[end + 3..];
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_strategy_tests_builds_simulates_and_hot_swaps() {
    let blocks = tutorial_rust_blocks();
    assert_eq!(blocks.len(), 2, "the strategy and its tests");
    let strategy_lines = blocks[0].lines().count();
    assert!(
        strategy_lines < 30,
        "the tutorial promises under 30 lines, has {strategy_lines}"
    );
    let tmp = tempfile::tempdir().unwrap();
    assert!(plugin_new("header-canary", tmp.path()).status.success());
    let dir = tmp.path().join("header-canary");
    std::fs::write(dir.join("src/lib.rs"), blocks.join("\n")).unwrap();
    let wasm = test_and_build(&dir, "header_canary");
    let run = |extra: &[&str]| {
        let mut args = vec!["--backends", "3", "--requests", "1000"];
        args.extend(["--labels", "track=stable,track=stable,track=canary"]);
        args.extend(extra);
        simulate_wasm(&wasm, &args)
    };
    let plain = run(&[]);
    assert_eq!(plain.matches("     500   50.0%").count(), 2, "{plain}");
    let canary = run(&["--header", "x-canary: 1"]);
    assert!(canary.contains("    1000  100.0%"), "{canary}");

    // Step 5: hot-swap it into a running balancer through the admin API.
    let backends = TestBackend::start_many(3).await;
    let list = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let track = if i == 2 { "canary" } else { "stable" };
            format!(
                r#"{{ address = "{}", labels = {{ track = "{track}" }} }}"#,
                b.addr
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let admin = "[admin]\naddress = \"127.0.0.1:0\"\nmax_body_bytes = 2000000\n";
    let proxy = InProcessProxy::start(&app_config("round-robin", &list, admin)).await;
    let c = client();
    let bytes = std::fs::read(&wasm).expect("read the component");
    let r = c
        .put(proxy.admin_url("/upstreams/app/plugin"))
        .body(bytes)
        .send()
        .await
        .expect("swap");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    for _ in 0..4 {
        let (status, backend, _) = get(&c, &proxy.url("/")).await;
        assert_eq!(status, 200);
        assert_ne!(
            backend, backends[2].name,
            "stable traffic reached the canary"
        );
    }
    for _ in 0..2 {
        let r = c
            .get(proxy.url("/"))
            .header("x-canary", "1")
            .send()
            .await
            .expect("request");
        assert_eq!(r.headers()["x-backend"], backends[2].name.as_str());
    }
    assert!(proxy.stop().await);
}
