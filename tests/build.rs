//! Builds the example strategy and the hostile test plugins to wasm so the
//! tests can load them by path. The `wasi-import` plugin uses std
//! wit-bindgen, so it is built in its own cargo invocation (its features must
//! not unify with the SDK's no_std ones).

fn main() {
    let watch = ["wit", "sdk", "examples", "tests/plugins"];
    let result = wasmlb_build::build_plugins(
        &[
            "header-route",
            "rate-limit",
            "path-router",
            "mirror-canary",
            "test-plugin-edit-corpus",
            "test-plugin-trap",
            "test-plugin-busy-loop",
            "test-plugin-bad-answer",
            "test-plugin-bad-init",
            "test-plugin-memory-bomb",
            "test-plugin-deep-recursion",
            "test-plugin-host-call-flood",
            "test-plugin-protocol-route",
        ],
        &watch,
    )
    .and_then(|_| wasmlb_build::build_plugins(&["test-plugin-wasi-import"], &watch));
    if let Err(e) = result {
        println!("cargo:warning={e}");
        std::process::exit(1);
    }
}
