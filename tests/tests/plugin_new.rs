//! `wasmlb plugin new`: the crate it writes passes its own native tests,
//! builds to a component, and loads into wasmlb (`--check` runs its init).

use std::path::{Path, PathBuf};
use std::process::Command;

use wasmlb_tests::{ConfigFile, app_config, check, free_port, wasmlb_bin};

/// The workspace root (this crate is `<root>/tests`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The outer cargo's build settings, which a cargo run on the generated
/// crate must not inherit.
const OUTER_CARGO_ENV: [&str; 7] = [
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_DIR",
];

/// `cargo ARGS` on the generated crate, without the outer cargo's build
/// settings, sharing one target directory across runs.
fn cargo(manifest: &Path, args: &[&str]) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(root().join("target/plugin-new"));
    for var in OUTER_CARGO_ENV {
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

/// The fenced blocks of docs/tutorial.md, in order: (language, body).
fn tutorial_blocks() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("docs/tutorial.md")).expect("docs/tutorial.md");
    let mut blocks = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("\n```") {
        let after = &rest[start + 4..];
        let (lang, body) = after.split_once('\n').expect("fence line");
        let end = body.find("\n```").expect("unterminated block");
        blocks.push((lang.trim().to_string(), body[..=end].to_string()));
        rest = &body[end + 4..];
    }
    blocks
}

/// docs/tutorial.md run as written, as one bash script, from a home
/// directory not named after the checkout. The test changes only what its
/// last paragraph says: the ports, and the first block (this build's
/// binaries on `PATH` instead of `rustup toolchain install` and `cargo build
/// --release`). After `plugin
/// new` it also pins the crate to the workspace's Cargo.lock and links its
/// `target/` to a build directory shared with the other tests here, so the
/// SDK's dependencies are compiled once.
#[test]
fn tutorial_runs_as_written_from_any_directory() {
    let blocks = tutorial_blocks();
    let langs: Vec<&str> = blocks.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        langs,
        [
            "sh", "sh", "rust", "rust", "sh", "sh", "sh", "sh", "sh", "sh", "sh"
        ],
        "the tutorial's steps changed: update this test"
    );
    let strategy_lines = blocks[2].1.lines().count();
    assert!(
        strategy_lines < 30,
        "the tutorial promises under 30 lines, has {strategy_lines}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home-of-a-user");
    std::fs::create_dir(&home).unwrap();
    let ports: Vec<(String, String)> = ["8080", "9901", "9001", "9002", "9003"]
        .iter()
        .map(|p| (format!(":{p}"), format!(":{}", free_port())))
        .collect();
    let substitute = |text: &str| {
        ports
            .iter()
            .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
    };
    let bin_dir = |p: PathBuf| p.parent().expect("bin dir").display().to_string();
    let mut script = format!(
        "set -euo pipefail\nexport HOME='{}'\nexport PATH='{}:{}':\"$PATH\"\n",
        home.display(),
        bin_dir(wasmlb_bin()),
        bin_dir(wasmlb_tests::demo_backend_bin()),
    );
    for (i, (lang, body)) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '=== block {i}'\n"));
        match (i, lang.as_str()) {
            (0, _) => {
                for line in body.lines() {
                    let ours = [
                        "rustup toolchain install",
                        "cargo build --release",
                        "export PATH=",
                        "rustup target add",
                    ];
                    if !ours.iter().any(|o| line.starts_with(o)) {
                        script.push_str(line);
                        script.push('\n');
                    }
                }
                for o in [
                    "cargo build --release -p wasmlb -p demo-backend",
                    "export PATH=",
                ] {
                    assert!(body.contains(o), "first block lacks {o}");
                }
            }
            (_, "rust") => {
                let redirect = if i == 2 { ">" } else { ">>" };
                script.push_str(&format!(
                    "cat {redirect} src/lib.rs <<'WASMLB_TUTORIAL_RUST'\n{body}WASMLB_TUTORIAL_RUST\n"
                ));
            }
            _ => {
                script.push_str(&substitute(body));
                if body.contains("wasmlb plugin new") {
                    script.push_str(&format!(
                        "cp '{}' Cargo.lock\nln -s '{}' target\n",
                        root().join("Cargo.lock").display(),
                        root().join("target/plugin-new").display()
                    ));
                }
            }
        }
    }
    std::fs::create_dir_all(root().join("target/plugin-new")).unwrap();
    let script_path = tmp.path().join("tutorial.sh");
    std::fs::write(&script_path, &script).unwrap();

    // Output to a file: the backgrounded servers would hold a pipe open.
    let log_path = tmp.path().join("tutorial.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new("timeout");
    cmd.args(["600", "bash"])
        .arg(&script_path)
        .current_dir(&home)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for var in OUTER_CARGO_ENV {
        cmd.env_remove(var);
    }
    use std::os::unix::process::CommandExt as _;
    let mut child = cmd.process_group(0).spawn().expect("run bash");
    let status = child.wait().expect("wait for the tutorial");
    // Whatever the script left running (it ends with `kill $(jobs -p)`).
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .status();
    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        status.success(),
        "the tutorial failed ({status}):\n{script}\n---\n{output}"
    );

    let block = |i: usize| {
        let start = output
            .find(&format!("=== block {i}\n"))
            .unwrap_or_else(|| panic!("no block {i} in:\n{output}"));
        let rest = &output[start..];
        let end = rest[1..].find("=== block ").map_or(rest.len(), |e| e + 1);
        rest[..end].to_string()
    };
    let hellos = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("hello from "))
            .map(str::to_string)
            .collect()
    };
    let simulated = block(6);
    assert_eq!(
        simulated.matches("     500   50.0%").count(),
        2,
        "{simulated}"
    );
    assert!(simulated.contains("    1000  100.0%"), "{simulated}");
    let swapped = block(8);
    assert!(swapped.contains("\"digest\": \"sha256:"), "{swapped}");
    let served = hellos(&swapped);
    assert_eq!(served.len(), 6, "{swapped}");
    assert!(
        served[..4].iter().all(|b| b == "b1" || b == "b2"),
        "{swapped}"
    );
    assert_eq!(served[4..], ["b3", "b3"], "{swapped}");
    let reloaded = block(9);
    assert!(
        reloaded.contains("header-canary/target/wasm32-wasip2/release/header_canary.wasm"),
        "the config's plugin did not take: {reloaded}"
    );
    assert_eq!(hellos(&reloaded), ["b3", "b3"], "{reloaded}");
}
