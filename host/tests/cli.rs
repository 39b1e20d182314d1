//! The `wasmlb` binary's command line. (Also makes `cargo test --workspace`
//! build the binary, which the `wasmlb-tests` crate drives.)

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_wasmlb");

#[test]
fn check_accepts_a_good_config_with_builtin_plugins() {
    let dir = std::env::temp_dir().join(format!("wasmlb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ok.toml");
    std::fs::write(
        &path,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nupstream = \"a\"\n\
         [upstream.a]\nplugin = \"round-robin\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n\
         [upstream.b]\nplugin = \"least-connections\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn missing_config_file_is_named() {
    let out = Command::new(BIN)
        .args(["--check", "--config", "/nonexistent/wasmlb.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/wasmlb.toml: (file): cannot read"),
        "{err}"
    );
}
