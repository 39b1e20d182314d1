//! Builds the built-in strategy plugins to wasm32-wasip2 components so the
//! binary can embed them (`plugin = "round-robin"` needs no file), and two
//! WIT 0.2 examples the `select` benchmark loads (not embedded).

fn main() {
    let built = wasmlb_build::build_plugins(
        &[
            "wasmlb-plugin-round-robin",
            "wasmlb-plugin-least-connections",
            "wasmlb-plugin-random",
            "wasmlb-plugin-p2c",
            "wasmlb-plugin-ip-hash",
            "wasmlb-plugin-maglev",
            "wasmlb-plugin-canary",
            "wasmlb-plugin-ring-hash",
            "wasmlb-plugin-peak-ewma",
            "wasmlb-plugin-sticky",
            "rate-limit",
            "path-router",
        ],
        &[
            "wit",
            "sdk",
            "plugins",
            "examples/rate-limit",
            "examples/path-router",
        ],
    );
    if let Err(e) = built {
        println!("cargo:warning={e}");
        std::process::exit(1);
    }
}
